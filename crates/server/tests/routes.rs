//! The routes, driven with `oneshot` against a real (single) node.

use axum::body::Body;
use axum::http::{Request, StatusCode};
use hearth_net::{ClusterSecret, Identity};
use hearth_runtime::{ClusterView, MemberState, Node, NodeConfig};
use http_body_util::BodyExt;
use tower::ServiceExt;

async fn node() -> Node {
    let mut cfg = NodeConfig::new(
        "solo",
        Identity::generate().unwrap(),
        ClusterSecret::generate(),
    );
    cfg.quic = "127.0.0.1:0".parse().unwrap();
    Node::start(cfg).await.unwrap()
}

async fn get(app: axum::Router, path: &str) -> (StatusCode, Vec<u8>) {
    let resp = app
        .oneshot(Request::get(path).body(Body::empty()).unwrap())
        .await
        .unwrap();
    let status = resp.status();
    let body = resp
        .into_body()
        .collect()
        .await
        .unwrap()
        .to_bytes()
        .to_vec();
    (status, body)
}

#[tokio::test]
async fn cluster_view_is_json() {
    let n = node().await;
    let (status, body) = get(hearth_server::router(n.clone()), "/api/cluster").await;
    assert_eq!(status, StatusCode::OK);
    let v: ClusterView = serde_json::from_slice(&body).unwrap();
    assert_eq!(v.node_id, n.id().to_string());
    assert_eq!(v.members.len(), 1);
    assert_eq!(v.members[0].state, MemberState::Local);
    assert!(v.members[0].leader);
    // The wire names are the documented ones.
    let raw: serde_json::Value = serde_json::from_slice(&body).unwrap();
    let m = &raw["members"][0];
    for key in [
        "node_id",
        "name",
        "address",
        "state",
        "last_heartbeat_age_ms",
    ] {
        assert!(m.get(key).is_some(), "missing {key}: {m}");
    }
    assert_eq!(m["state"], "self");
    n.shutdown().await;
}

#[tokio::test]
async fn health_and_unknown_routes() {
    let n = node().await;
    let (status, body) = get(hearth_server::router(n.clone()), "/health").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body, br#"{"status":"ok"}"#);
    let (status, _) = get(hearth_server::router(n.clone()), "/nope").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    n.shutdown().await;
}
