//! The routes, driven with `oneshot` against a real (single) node.

use axum::body::Body;
use axum::http::{Request, StatusCode};
use hearth_net::{ClusterSecret, Identity};
use hearth_runtime::profile::PlanReport;
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

async fn send(
    app: axum::Router,
    req: Request<Body>,
) -> (StatusCode, axum::http::HeaderMap, Vec<u8>) {
    let resp = app.oneshot(req).await.unwrap();
    let status = resp.status();
    let headers = resp.headers().clone();
    let body = resp
        .into_body()
        .collect()
        .await
        .unwrap()
        .to_bytes()
        .to_vec();
    (status, headers, body)
}

async fn get(app: axum::Router, path: &str) -> (StatusCode, Vec<u8>) {
    let (status, _, body) = send(app, Request::get(path).body(Body::empty()).unwrap()).await;
    (status, body)
}

/// The routes over `node`, keeping files and jobs in `dir`.
fn app_in(node: &Node, dir: &std::path::Path) -> axum::Router {
    hearth_server::App::new(
        node.clone(),
        hearth_server::ServerOptions {
            data_dir: dir.to_path_buf(),
            ..Default::default()
        },
    )
    .router()
}

fn json(body: &[u8]) -> serde_json::Value {
    serde_json::from_slice(body).unwrap()
}

/// `POST /v1/files` with a multipart body.
fn upload(purpose: &str, file: &[u8]) -> Request<Body> {
    let b = "XBOUNDARYX";
    let mut body = format!(
        "--{b}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\n{purpose}\r\n--{b}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"d.jsonl\"\r\nContent-Type: application/octet-stream\r\n\r\n"
    )
    .into_bytes();
    body.extend_from_slice(file);
    body.extend_from_slice(format!("\r\n--{b}--\r\n").as_bytes());
    Request::post("/v1/files")
        .header("content-type", format!("multipart/form-data; boundary={b}"))
        .body(Body::from(body))
        .unwrap()
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

#[tokio::test]
async fn plan_needs_a_model_and_valid_parameters() {
    let n = node().await;
    let app = || hearth_server::router(n.clone());
    // No model measured yet: unavailable, in the error shape.
    let (status, body) = get(app(), "/api/plan").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    let e: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert!(e["error"]["message"].as_str().unwrap().contains("no model"));

    let dir = tempfile::tempdir().unwrap();
    n.set_model(hearth_test_utils::cluster::tiny_model_info(dir.path()).unwrap())
        .unwrap();
    for query in [
        "",
        "?workload=inference&sequences=4&context=64",
        "?workload=inference&prefill=100",
        "?workload=training&micro_batches=3&schedule=gpipe&method=full&recompute=false",
        "?workload=training&keep_data_home=true",
    ] {
        let (status, body) = get(app(), &format!("/api/plan{query}")).await;
        assert_eq!(
            status,
            StatusCode::OK,
            "{query}: {}",
            String::from_utf8_lossy(&body)
        );
        let r: PlanReport = serde_json::from_slice(&body).unwrap();
        let plan = r.plan.unwrap();
        if query.contains("keep_data_home") {
            // The answering node holds both ends (alone here: all of it).
            let (first, last) = (&plan.stages[0], &plan.stages[plan.stages.len() - 1]);
            assert!(first.embed && last.head, "{plan:?}");
            assert_eq!((first.device, last.device), (0, 0), "{plan:?}");
            continue;
        }
        assert_eq!(plan.stages.len(), 1);
        assert_eq!(plan.stages[0].layers, 0..4);
        assert!(plan.step_s > 0.0);
        assert_eq!(r.alternatives.len(), 4);
    }
    // Bad parameters: 400 with a message, never a 500.
    for query in [
        "?sequences=abc",
        "?workload=dance",
        "?workload=training&schedule=zigzag",
        "?workload=training&method=half",
        "?workload=inference&sequences=0",
        "?context=99999999999",
        // Found by schemathesis: sizes this large overflowed the memory sums.
        "?workload=training&micro_batches=4294967295&micro_batch_tokens=4294967295&schedule=gpipe",
        "?workload=training&micro_batches=1289776174&micro_batch_tokens=4294967295&recompute=false",
        "?workload=inference&sequences=4294967295&context=4294967295",
        "?workload=inference&prefill=4294967295",
        "?workload=inference&keep_data_home=true",
        "?workload=training&lora_rank=4294967295&micro_batch_tokens=4294967295",
        "?workload=training&keep_data_home=maybe",
    ] {
        let (status, body) = get(app(), &format!("/api/plan{query}")).await;
        let text = String::from_utf8_lossy(&body);
        assert!(
            status == StatusCode::BAD_REQUEST || status == StatusCode::OK,
            "{query}: {status} {text}"
        );
        if status == StatusCode::OK {
            // A workload the planner refuses is reported in the report.
            let r: PlanReport = serde_json::from_slice(&body).unwrap();
            assert!(r.plan.is_none() && r.error.is_some(), "{query}: {text}");
        } else {
            let e: serde_json::Value = serde_json::from_slice(&body).unwrap();
            assert!(e["error"]["message"].is_string(), "{query}: {text}");
        }
    }
    n.shutdown().await;
}

async fn post(
    app: axum::Router,
    path: &str,
    body: &str,
) -> (StatusCode, axum::http::HeaderMap, Vec<u8>) {
    let req = Request::post(path)
        .header("content-type", "application/json")
        .body(Body::from(body.to_string()))
        .unwrap();
    send(app, req).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generate_streams_tokens_and_rejects_bad_requests() {
    let n = node().await;
    let app = || hearth_server::router(n.clone());
    // No model yet: unavailable, with Retry-After.
    let (status, headers, _) = post(app(), "/api/generate", r#"{"prompt":"hi"}"#).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(headers.contains_key("retry-after"));

    let dir = tempfile::tempdir().unwrap();
    n.set_model(hearth_test_utils::cluster::tiny_model_info(dir.path()).unwrap())
        .unwrap();
    assert!(
        n.wait_placement(std::time::Duration::from_secs(20))
            .await
            .is_some()
    );
    // Bad bodies: 400 in the error shape, never a 500.
    for body in [
        "{not json",
        r#"{"prompt":"a","messages":[{"role":"user","content":"b"}]}"#,
        r#"{}"#,
        r#"{"prompt_ids":[]}"#,
        r#"{"prompt_ids":[1],"max_tokens":0}"#,
        r#"{"prompt_ids":[1],"top_p":0}"#,
        r#"{"prompt_ids":[1],"temperature":-1}"#,
        r#"{"prompt_ids":[99999999]}"#,
        r#"{"prompt_ids":[1],"bogus":true}"#,
    ] {
        let (status, _, bytes) = post(app(), "/api/generate", body).await;
        let text = String::from_utf8_lossy(&bytes);
        assert!(status.is_client_error(), "{body}: {status} {text}");
        let e: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        assert!(e["error"]["message"].is_string(), "{body}: {text}");
    }
    // One JSON summary.
    let (status, _, bytes) = post(
        app(),
        "/api/generate",
        r#"{"prompt_ids":[1,2,3],"max_tokens":5}"#,
    )
    .await;
    assert_eq!(
        status,
        StatusCode::OK,
        "{}",
        String::from_utf8_lossy(&bytes)
    );
    let s: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
    let ids = s["token_ids"].as_array().unwrap().clone();
    assert!(!ids.is_empty() && ids.len() <= 5, "{s}");
    // The NDJSON stream carries the same tokens, then `done`.
    let (status, headers, bytes) = post(
        app(),
        "/api/generate",
        r#"{"prompt_ids":[1,2,3],"max_tokens":5,"stream":true}"#,
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers["content-type"], "application/x-ndjson");
    let lines: Vec<serde_json::Value> = String::from_utf8(bytes)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let streamed: Vec<serde_json::Value> = lines
        .iter()
        .filter_map(|l| l.get("token").cloned())
        .collect();
    assert_eq!(streamed, ids);
    assert_eq!(
        lines.last().unwrap()["done"]["token_ids"],
        serde_json::json!(ids)
    );
    n.shutdown().await;
}

/// The fine-tuning routes refuse bad input with 400/404 in OpenAI's shape
/// and never start a job on it.
#[tokio::test]
async fn fine_tuning_routes_refuse_bad_input() {
    let n = node().await;
    let dir = tempfile::tempdir().unwrap();
    let app = app_in(&n, dir.path());
    let multipart = |purpose: &str, file: &str| upload(purpose, file.as_bytes());
    let good = "{\"text\":\"hello\"}\n";
    for (purpose, file, want) in [
        ("assistants", good, "purpose"),
        ("fine-tune", "{\"messages\":[]}\n", "line 1"),
        ("fine-tune", "not json\n", "line 1"),
    ] {
        let (status, _, body) = send(app.clone(), multipart(purpose, file)).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{purpose} {file}");
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert!(
            v["error"]["message"].as_str().unwrap().contains(want),
            "{v}"
        );
    }
    // Not multipart at all: OpenAI's JSON error, not axum's text.
    let (status, headers, _) = send(
        app.clone(),
        Request::post("/v1/files").body(Body::empty()).unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(
        headers["content-type"]
            .to_str()
            .unwrap()
            .starts_with("application/json")
    );
    let (status, _, body) = send(app.clone(), multipart("fine-tune", good)).await;
    assert_eq!(status, StatusCode::OK);
    let file: serde_json::Value = serde_json::from_slice(&body).unwrap();
    let id = file["id"].as_str().unwrap().to_string();
    assert_eq!(file["purpose"], "fine-tune");
    let (status, _) = get(app.clone(), &format!("/v1/files/{id}")).await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = get(app.clone(), "/v1/files/file-..%2Fetc").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let create = |body: serde_json::Value| {
        Request::post("/v1/fine_tuning/jobs")
            .header("content-type", "application/json")
            .body(Body::from(body.to_string()))
            .unwrap()
    };
    for (body, want) in [
        (
            serde_json::json!({"model": "m", "training_file": "file-nope"}),
            "no file",
        ),
        (
            serde_json::json!({"model": "m", "training_file": "../x"}),
            "not a file id",
        ),
        (
            serde_json::json!({"model": "m", "training_file": id, "hyperparameters": {"batch_size": 0}}),
            "batch_size",
        ),
        (
            serde_json::json!({"model": "m", "training_file": id, "hearth": {"output_dir": "/"}}),
            "cannot be set",
        ),
        (
            serde_json::json!({"model": "m", "training_file": id, "method": {"type": "dpo"}}),
            "dpo",
        ),
        (
            serde_json::json!({"model": "m", "training_file": id, "hearth": {"bogus": 1}}),
            "bogus",
        ),
    ] {
        let (status, _, resp) = send(app.clone(), create(body.clone())).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
        let v: serde_json::Value = serde_json::from_slice(&resp).unwrap();
        assert!(
            v["error"]["message"].as_str().unwrap().contains(want),
            "{body}: {v}"
        );
    }
    assert!(n.jobs().is_empty(), "no job started on bad input");
    for path in [
        "/v1/fine_tuning/jobs/ftjob-x",
        "/v1/fine_tuning/jobs/ftjob-x/events",
    ] {
        let (status, _) = get(app.clone(), path).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{path}");
    }
    let (status, body) = get(app.clone(), "/v1/fine_tuning/jobs").await;
    assert_eq!(status, StatusCode::OK);
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["data"], serde_json::json!([]));
}

/// Fine-tuning files: uploads larger than other bodies' 4 MiB are kept,
/// listed newest first, read back byte for byte and deleted; past 64 MiB
/// an upload is a 413 and nothing is stored.
#[tokio::test]
async fn fine_tuning_files_are_listed_read_and_deleted() {
    let n = node().await;
    let dir = tempfile::tempdir().unwrap();
    let app = app_in(&n, dir.path());
    let small = b"{\"text\":\"hello\"}\n".to_vec();
    let line = "{\"messages\":[{\"role\":\"user\",\"content\":\"What is the capital of Zorbania?\"},{\"role\":\"assistant\",\"content\":\"Quillmere.\"}]}\n";
    let big = line
        .repeat(hearth_server::MAX_BODY / line.len() + 1000)
        .into_bytes();
    assert!(big.len() > hearth_server::MAX_BODY);
    let mut ids = Vec::new();
    for data in [&small, &big] {
        let (status, _, body) = send(app.clone(), upload("fine-tune", data)).await;
        assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&body));
        let f = json(&body);
        assert_eq!(f["bytes"], data.len());
        ids.push(f["id"].as_str().unwrap().to_string());
    }
    let (status, body) = get(app.clone(), "/v1/files").await;
    assert_eq!(status, StatusCode::OK);
    let listed: Vec<&str> = json(&body)["data"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|f| f["id"].as_str())
        .map(|id| ids.iter().find(|i| *i == id).unwrap().as_str())
        .collect();
    assert_eq!(listed, [ids[1].as_str(), ids[0].as_str()], "newest first");
    for (id, data) in ids.iter().zip([&small, &big]) {
        let (status, body) = get(app.clone(), &format!("/v1/files/{id}/content")).await;
        assert_eq!(status, StatusCode::OK);
        assert!(body == *data, "{id}: the content differs");
    }

    // Past MAX_UPLOAD: 413 in OpenAI's shape, and no new file.
    let huge = line.repeat(hearth_server::MAX_UPLOAD / line.len() + 10);
    let (status, _, body) = send(app.clone(), upload("fine-tune", huge.as_bytes())).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    let e = json(&body);
    assert_eq!(e["error"]["code"], "request_too_large");
    assert!(
        e["error"]["message"]
            .as_str()
            .unwrap()
            .contains(&hearth_server::MAX_UPLOAD.to_string()),
        "{e}"
    );
    // Other routes keep the 4 MiB limit.
    let (status, _, _) = send(
        app.clone(),
        Request::post("/v1/chat/completions")
            .header("content-type", "application/json")
            .body(Body::from(big.clone()))
            .unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);

    let delete = |path: String| Request::delete(path).body(Body::empty()).unwrap();
    let (status, _, body) = send(app.clone(), delete(format!("/v1/files/{}", ids[1]))).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        json(&body),
        serde_json::json!({"id": ids[1], "object": "file", "deleted": true})
    );
    for path in [
        format!("/v1/files/{}", ids[1]),
        format!("/v1/files/{}/content", ids[1]),
        "/v1/files/file-..%2Fetc/content".to_string(),
    ] {
        let (status, _) = get(app.clone(), &path).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{path}");
    }
    for path in [
        format!("/v1/files/{}", ids[1]),
        "/v1/files/file-..%2F..%2Fsecret".to_string(),
        "/v1/files/nope".to_string(),
    ] {
        let (status, _, _) = send(app.clone(), delete(path.clone())).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{path}");
    }
    let (_, body) = get(app.clone(), "/v1/files").await;
    let left: Vec<String> = json(&body)["data"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|f| f["id"].as_str().map(String::from))
        .collect();
    assert_eq!(left, vec![ids[0].clone()]);
    // Only the kept file's data and name remain on disk.
    let mut on_disk: Vec<String> = std::fs::read_dir(dir.path().join("files"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    on_disk.sort();
    assert_eq!(
        on_disk,
        vec![format!("{}.jsonl", ids[0]), format!("{}.name", ids[0])]
    );
    n.shutdown().await;
}

/// A restarted node lists its past fine-tuning jobs: each job's record in
/// its output directory comes back with its state and events; a job that
/// had not ended comes back failed as interrupted; an unreadable record is
/// skipped.
#[tokio::test]
async fn fine_tuning_jobs_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let messages = |v: &serde_json::Value| -> Vec<String> {
        v["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["message"].as_str().unwrap().to_string())
            .collect()
    };

    // A job on a node that serves no model fails at once, and says why.
    let first = node().await;
    let app = app_in(&first, dir.path());
    let (_, _, body) = send(app.clone(), upload("fine-tune", b"{\"text\":\"hi\"}\n")).await;
    let file = json(&body)["id"].as_str().unwrap().to_string();
    let (status, _, body) = send(
        app.clone(),
        Request::post("/v1/fine_tuning/jobs")
            .header("content-type", "application/json")
            .body(Body::from(
                serde_json::json!({"model": "m", "training_file": file}).to_string(),
            ))
            .unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&body));
    let id = json(&body)["id"].as_str().unwrap().to_string();
    let ended = loop {
        let (_, body) = get(app.clone(), &format!("/v1/fine_tuning/jobs/{id}")).await;
        let job = json(&body);
        if job["status"] == "failed" {
            break job;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    assert!(
        ended["error"]["message"]
            .as_str()
            .unwrap()
            .contains("serves no model"),
        "{ended}"
    );
    let (_, body) = get(app.clone(), &format!("/v1/fine_tuning/jobs/{id}/events")).await;
    let events = messages(&json(&body));
    first.shutdown().await;

    // Beside it: a record of a job that was running when its node stopped,
    // and a directory whose record is not JSON.
    let jobs = dir.path().join("fine_tuning");
    let record: serde_json::Value =
        json(&std::fs::read(jobs.join(&id).join("job-record.json")).unwrap());
    let mut running = record.clone();
    running["info"]["id"] = "ftjob-interrupted".into();
    running["info"]["state"] = "running".into();
    running["info"]["step"] = 3.into();
    running["info"]["error"] = serde_json::Value::Null;
    running["info"]["finished_at"] = serde_json::Value::Null;
    running["info"]["created_at"] = (record["info"]["created_at"].as_u64().unwrap() + 1).into();
    std::fs::create_dir_all(jobs.join("ftjob-interrupted")).unwrap();
    std::fs::write(
        jobs.join("ftjob-interrupted/job-record.json"),
        running.to_string(),
    )
    .unwrap();
    std::fs::create_dir_all(jobs.join("ftjob-garbage")).unwrap();
    std::fs::write(jobs.join("ftjob-garbage/job-record.json"), b"{not json").unwrap();

    // The restarted node (a new node, the same data directory).
    let second = node().await;
    let app = app_in(&second, dir.path());
    // A second App on the same node adds nothing twice.
    let _ = app_in(&second, dir.path());
    let (_, body) = get(app.clone(), "/v1/fine_tuning/jobs").await;
    let listed: Vec<String> = json(&body)["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        listed,
        ["ftjob-interrupted".to_string(), id.clone()],
        "newest first"
    );
    let (_, body) = get(app.clone(), &format!("/v1/fine_tuning/jobs/{id}")).await;
    assert_eq!(json(&body), ended);
    let (_, body) = get(app.clone(), &format!("/v1/fine_tuning/jobs/{id}/events")).await;
    assert_eq!(messages(&json(&body)), events);

    let (_, body) = get(app.clone(), "/v1/fine_tuning/jobs/ftjob-interrupted").await;
    let job = json(&body);
    assert_eq!(job["status"], "failed");
    let error = job["error"]["message"].as_str().unwrap();
    assert!(
        error.contains("interrupted") && error.contains("step 3"),
        "{job}"
    );
    assert!(job["finished_at"].is_u64(), "{job}");
    let (_, body) = get(app.clone(), "/v1/fine_tuning/jobs/ftjob-interrupted/events").await;
    let newest = messages(&json(&body));
    assert!(newest[0].contains("interrupted"), "{newest:?}");
    assert_eq!(newest.len(), events.len() + 1);
    // Its record now says so: a further restart adds no second notice.
    let saved = json(&std::fs::read(jobs.join("ftjob-interrupted/job-record.json")).unwrap());
    assert_eq!(saved["info"]["state"], "failed");
    second.shutdown().await;
    let third = node().await;
    let app = app_in(&third, dir.path());
    let (_, body) = get(app.clone(), "/v1/fine_tuning/jobs/ftjob-interrupted/events").await;
    assert_eq!(messages(&json(&body)), newest);
    third.shutdown().await;
}

/// A web page on another site cannot drive a node: state-changing requests
/// whose `Origin` or `Sec-Fetch-Site` say another site are refused before
/// any handler runs (no upload is stored), while the node's own pages and
/// programs (which send neither header) are served.
#[tokio::test]
async fn state_changing_requests_from_another_site_are_refused() {
    let node = node().await;
    let dir = tempfile::tempdir().unwrap();
    let app = app_in(&node, dir.path());
    fn with(mut req: Request<Body>, headers: &[(&str, &str)]) -> Request<Body> {
        for (k, v) in headers {
            let name = axum::http::HeaderName::from_bytes(k.as_bytes()).unwrap();
            req.headers_mut()
                .insert(name, axum::http::HeaderValue::from_str(v).unwrap());
        }
        req
    }
    let unload = || {
        Request::post("/api/models/unload")
            .body(Body::empty())
            .unwrap()
    };
    let file = b"{\"messages\":[{\"role\":\"user\",\"content\":\"a\"},{\"role\":\"assistant\",\"content\":\"b\"}]}\n";
    let hostile: &[&[(&str, &str)]] = &[
        &[
            ("host", "127.0.0.1:7411"),
            ("origin", "http://evil.example"),
        ],
        &[("host", "127.0.0.1:7411"), ("origin", "null")],
        // Same site, another port: still another origin.
        &[
            ("host", "127.0.0.1:7411"),
            ("origin", "http://127.0.0.1:8000"),
        ],
        &[("host", "127.0.0.1:7411"), ("sec-fetch-site", "cross-site")],
        &[("host", "127.0.0.1:7411"), ("sec-fetch-site", "same-site")],
        // A matching Origin does not excuse a cross-site fetch.
        &[
            ("host", "127.0.0.1:7411"),
            ("origin", "http://127.0.0.1:7411"),
            ("sec-fetch-site", "cross-site"),
        ],
    ];
    for h in hostile {
        for req in [with(unload(), h), with(upload("fine-tune", file), h)] {
            let path = req.uri().path().to_string();
            let (status, _, body) = send(app.clone(), req).await;
            assert_eq!(status, StatusCode::FORBIDDEN, "{path} {h:?}");
            assert_eq!(json(&body)["error"]["code"], "cross_site_request");
        }
    }
    let (_, listed) = get(app.clone(), "/v1/files").await;
    assert_eq!(json(&listed)["data"].as_array().map(Vec::len), Some(0));
    // Reading stays open to any page (nothing changes).
    let req = with(
        Request::get("/api/cluster").body(Body::empty()).unwrap(),
        &[
            ("origin", "http://evil.example"),
            ("sec-fetch-site", "cross-site"),
        ],
    );
    assert_eq!(send(app.clone(), req).await.0, StatusCode::OK);
    // The node's own page, and a program.
    let own: &[&[(&str, &str)]] = &[
        &[
            ("host", "127.0.0.1:7411"),
            ("origin", "http://127.0.0.1:7411"),
            ("sec-fetch-site", "same-origin"),
        ],
        &[
            ("host", "localhost:7411"),
            ("origin", "http://LOCALHOST:7411"),
        ],
        &[],
    ];
    for h in own {
        let (status, _, body) = send(app.clone(), with(upload("fine-tune", file), h)).await;
        assert_eq!(
            status,
            StatusCode::OK,
            "{h:?}: {}",
            String::from_utf8_lossy(&body)
        );
    }
    let (_, listed) = get(app.clone(), "/v1/files").await;
    assert_eq!(json(&listed)["data"].as_array().map(Vec::len), Some(3));
    node.shutdown().await;
}

/// Uploads stream to disk and have a quota: at most `MAX_FILES` files are
/// kept; the next is refused (413 `quota_exceeded`) and stored nowhere
/// until one is deleted.
#[tokio::test]
async fn uploads_have_a_file_quota() {
    let n = node().await;
    let dir = tempfile::tempdir().unwrap();
    let app = app_in(&n, dir.path());
    let data = b"{\"text\":\"hello\"}\n";
    let mut first = None;
    for _ in 0..hearth_server::MAX_FILES {
        let (status, _, body) = send(app.clone(), upload("fine-tune", data)).await;
        assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&body));
        first.get_or_insert_with(|| json(&body)["id"].as_str().unwrap().to_string());
    }
    let (status, _, body) = send(app.clone(), upload("fine-tune", data)).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(json(&body)["error"]["code"], "quota_exceeded");
    let (_, listed) = get(app.clone(), "/v1/files").await;
    assert_eq!(
        json(&listed)["data"].as_array().map(Vec::len),
        Some(hearth_server::MAX_FILES)
    );
    // No temporary file is left beside the stored ones.
    let files = dir.path().join("files");
    let stray: Vec<_> = std::fs::read_dir(&files)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with('.'))
        .collect();
    assert!(stray.is_empty(), "{stray:?}");
    // Deleting one makes room.
    let del = Request::delete(format!("/v1/files/{}", first.unwrap()))
        .body(Body::empty())
        .unwrap();
    assert_eq!(send(app.clone(), del).await.0, StatusCode::OK);
    assert_eq!(
        send(app.clone(), upload("fine-tune", data)).await.0,
        StatusCode::OK
    );
    n.shutdown().await;
}
