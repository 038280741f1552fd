//! The cluster control API: the view, the plan, the model catalog, loading
//! and unloading a model across the cluster, and the events stream.

use std::convert::Infallible;
use std::time::Duration;

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use hearth_runtime::profile::PlanRequest;
use hearth_runtime::{ClusterEvent, RuntimeError};
use serde::Deserialize;
use serde_json::json;
use tokio::sync::broadcast::error::RecvError;

use crate::{ApiJson, AppState, api_error, bad_request, error, sse};

/// How often an idle events stream sends a comment (keeps proxies open).
const KEEPALIVE: Duration = Duration::from_secs(15);

fn unavailable(message: String) -> Response {
    error(StatusCode::SERVICE_UNAVAILABLE, "server_error", message)
}

pub(crate) async fn cluster(State(s): State<AppState>) -> Response {
    match tokio::time::timeout(Duration::from_secs(5), s.node.view()).await {
        Ok(Ok(view)) => Json(view).into_response(),
        _ => unavailable("the node is not running".into()),
    }
}

/// The plan for the model this node serves, over the members that
/// measured it (query: the fields of [`PlanRequest`]).
pub(crate) async fn plan(
    State(s): State<AppState>,
    query: Result<Query<PlanRequest>, QueryRejection>,
) -> Response {
    let req = match query {
        Ok(Query(req)) => req,
        Err(e) => return bad_request(e.body_text(), None),
    };
    match tokio::time::timeout(Duration::from_secs(10), s.node.plan(&req)).await {
        Ok(Ok(report)) => Json(report).into_response(),
        Ok(Err(RuntimeError::BadRequest(m))) => bad_request(m, None),
        // No model measured yet, or the node is stopping.
        Ok(Err(e)) => unavailable(e.to_string()),
        Err(_) => unavailable("planning timed out".into()),
    }
}

/// The models the cluster can load (each with the members that hold it),
/// and the one it serves.
pub(crate) async fn models(State(s): State<AppState>) -> Response {
    let available = s.node.cluster_models().await;
    Json(json!({
        "node": s.node.name(),
        "available": available,
        "loaded": s.node.model_name(),
        "placement": s.node.placement(),
    }))
    .into_response()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct LoadRequest {
    model: String,
}

/// Loads a model on every member; answers 202 at once (the events stream
/// shows each node measuring and loading, then the plan and the stages).
pub(crate) async fn load(
    State(s): State<AppState>,
    ApiJson(req): ApiJson<LoadRequest>,
) -> Response {
    match s.node.load_model(&req.model).await {
        Ok(refused) => (
            StatusCode::ACCEPTED,
            Json(json!({
                "model": req.model,
                "status": "loading",
                "refused": refused
                    .into_iter()
                    .map(|(node, reason)| json!({"node": node, "reason": reason}))
                    .collect::<Vec<_>>(),
            })),
        )
            .into_response(),
        Err(e @ RuntimeError::UnknownModel(_)) => api_error(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            format!("{e} (GET /api/models lists them)"),
            Some("model"),
            Some("model_not_found"),
        ),
        Err(e) => api_error(
            StatusCode::CONFLICT,
            "invalid_request_error",
            e.to_string(),
            Some("model"),
            Some("cannot_load"),
        ),
    }
}

/// Stops serving the model on every member.
pub(crate) async fn unload(State(s): State<AppState>) -> Response {
    let old = s.node.model_name();
    s.node.unload_model().await;
    Json(json!({"unloaded": old})).into_response()
}

fn event_frame(ev: &ClusterEvent) -> Bytes {
    match serde_json::to_string(ev) {
        Ok(j) => Bytes::from(format!("id: {}\nevent: cluster\ndata: {j}\n\n", ev.seq)),
        Err(_) => Bytes::new(),
    }
}

/// Server-sent events: recent history, then each new cluster event; ends
/// when the server stops.
pub(crate) async fn events(State(s): State<AppState>) -> Response {
    let (history, rx) = s.node.cluster_events();
    struct St {
        rx: tokio::sync::broadcast::Receiver<ClusterEvent>,
        shutdown: tokio::sync::watch::Receiver<bool>,
        history: std::vec::IntoIter<ClusterEvent>,
        /// False once the shutdown switch is gone (no server to stop).
        watching: bool,
    }
    let st = St {
        watching: true,
        rx,
        shutdown: s.shutdown.clone(),
        history: history.into_iter(),
    };
    let frames = futures_util::stream::unfold(st, |mut st| async move {
        if let Some(ev) = st.history.next() {
            return Some((Ok::<_, Infallible>(event_frame(&ev)), st));
        }
        if *st.shutdown.borrow() {
            return None;
        }
        let frame = tokio::select! {
            ev = st.rx.recv() => match ev {
                Ok(ev) => event_frame(&ev),
                Err(RecvError::Lagged(n)) => Bytes::from(format!(
                    "event: lagged\ndata: {{\"missed\": {n}}}\n\n"
                )),
                Err(RecvError::Closed) => return None,
            },
            _ = tokio::time::sleep(KEEPALIVE) => Bytes::from_static(b": keepalive\n\n"),
            changed = st.shutdown.changed(), if st.watching => {
                if changed.is_ok() {
                    return None;
                }
                st.watching = false;
                Bytes::from_static(b": keepalive\n\n")
            }
        };
        Some((Ok(frame), st))
    });
    sse::response(frames)
}
