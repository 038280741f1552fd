//! The OpenAI-compatible routes, the control routes added with them, the
//! UI's files, auth and errors, driven with `oneshot` against a real node
//! serving a tiny random model.

use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use hearth_net::{ClusterSecret, Identity};
use hearth_runtime::{Node, NodeConfig};
use hearth_server::{App, ServerOptions};
use hearth_test_utils::cluster::TestModels;
use http_body_util::BodyExt;
use serde_json::{Value, json};
use tower::ServiceExt;

/// The tiny model's context.
const CONTEXT: usize = 1024;

/// A node with a store holding `tiny`, serving it once placed.
async fn node(dir: &std::path::Path, serve: bool) -> Node {
    // A context long enough for tool schemas in the prompt.
    let spec = hearth_test_utils::TinySpec {
        context: CONTEXT,
        ..Default::default()
    };
    node_with(TestModels::tiny_with(dir, spec).unwrap(), serve).await
}

/// A node with the store `models`, serving its `tiny` once placed.
async fn node_with(models: std::sync::Arc<dyn hearth_runtime::ModelSource>, serve: bool) -> Node {
    let mut cfg = NodeConfig::new(
        "solo",
        Identity::generate().unwrap(),
        ClusterSecret::generate(),
    );
    cfg.quic = "127.0.0.1:0".parse().unwrap();
    cfg.models = Some(models);
    let n = Node::start(cfg).await.unwrap();
    if serve {
        n.load_model("tiny").await.unwrap();
        assert!(n.wait_placement(Duration::from_secs(30)).await.is_some());
    }
    n
}

struct Reply {
    status: StatusCode,
    headers: axum::http::HeaderMap,
    body: Vec<u8>,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&self.body)))
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// Asserts OpenAI's error shape and returns the error object.
    fn error(&self) -> Value {
        let v = self.json();
        let e = &v["error"];
        assert!(e["message"].is_string(), "{v}");
        assert!(e["type"].is_string(), "{v}");
        assert!(e.get("param").is_some() && e.get("code").is_some(), "{v}");
        e.clone()
    }

    /// The `data:` payloads of an SSE body.
    fn sse(&self) -> Vec<String> {
        assert_eq!(self.headers["content-type"], "text/event-stream");
        self.text()
            .split("\n\n")
            .filter_map(|f| f.strip_prefix("data: ").map(str::to_string))
            .collect()
    }
}

async fn send(app: axum::Router, req: Request<Body>) -> Reply {
    let resp = tokio::time::timeout(Duration::from_secs(60), app.oneshot(req))
        .await
        .unwrap()
        .unwrap();
    let status = resp.status();
    let headers = resp.headers().clone();
    let body = tokio::time::timeout(Duration::from_secs(60), resp.into_body().collect())
        .await
        .unwrap()
        .unwrap()
        .to_bytes()
        .to_vec();
    Reply {
        status,
        headers,
        body,
    }
}

async fn get(app: axum::Router, path: &str) -> Reply {
    send(app, Request::get(path).body(Body::empty()).unwrap()).await
}

/// The ids `/v1/models` lists.
async fn model_ids(app: axum::Router) -> Vec<String> {
    get(app, "/v1/models").await.json()["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap().to_string())
        .collect()
}

async fn post(app: axum::Router, path: &str, body: &str) -> Reply {
    let req = Request::post(path)
        .header("content-type", "application/json")
        .body(Body::from(body.to_string()))
        .unwrap();
    send(app, req).await
}

fn chat_body(extra: Value) -> String {
    let mut b = json!({
        "model": "tiny-model",
        "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}],
        "temperature": 0,
        "max_tokens": 12,
    });
    for (k, v) in extra.as_object().unwrap() {
        b[k] = v.clone();
    }
    b.to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_and_completions_answer_in_openais_shapes() {
    let dir = tempfile::tempdir().unwrap();
    let n = node(dir.path(), true).await;
    let app = || hearth_server::router(n.clone());
    let model = n.model_name().unwrap();
    let body = |extra: Value| chat_body(extra).replace("tiny-model", &model);

    // The model list names what the cluster serves.
    let r = get(app(), "/v1/models").await;
    assert_eq!(r.status, StatusCode::OK);
    let list = r.json();
    assert_eq!(list["object"], "list");
    assert_eq!(list["data"][0]["id"], model.as_str());
    assert_eq!(list["data"][0]["object"], "model");
    assert_eq!(
        get(app(), &format!("/v1/models/{model}")).await.json()["id"],
        model.as_str()
    );
    let r = get(app(), "/v1/models/nope").await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert_eq!(r.error()["code"], "model_not_found");
    // Hub ids carry a slash: still one id.
    let r = get(app(), "/v1/models/acme/none-GGUF:Q8_0").await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert_eq!(r.error()["code"], "model_not_found");
    // The served file's name is another name of it (what earlier versions
    // served it under).
    let file = n.model_path().unwrap();
    let file = file.file_name().unwrap().to_string_lossy();
    let by_file = chat_body(json!({"max_tokens": 2})).replace("tiny-model", &file);
    let r = post(app(), "/v1/chat/completions", &by_file).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());

    // Not streamed: one completion with usage.
    let r = post(app(), "/v1/chat/completions", &body(json!({}))).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let c = r.json();
    assert_eq!(c["object"], "chat.completion");
    assert!(c["id"].as_str().unwrap().starts_with("chatcmpl-"));
    assert_eq!(c["model"], model.as_str());
    let choice = &c["choices"][0];
    assert_eq!(choice["message"]["role"], "assistant");
    let text = choice["message"]["content"].as_str().unwrap().to_string();
    let u = &c["usage"];
    let completion = u["completion_tokens"].as_u64().unwrap();
    assert!((1..=12).contains(&completion), "{c}");
    assert_eq!(
        u["total_tokens"].as_u64().unwrap(),
        u["prompt_tokens"].as_u64().unwrap() + completion
    );
    assert_eq!(
        choice["finish_reason"],
        if completion == 12 { "length" } else { "stop" }
    );
    // The same greedy answer as Hearth's own endpoint.
    let own = post(
        app(),
        "/api/generate",
        &json!({"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}], "max_tokens": 12}).to_string(),
    )
    .await
    .json();
    assert_eq!(own["text"].as_str().unwrap(), text);

    // Streamed: a role chunk, content deltas that add up to the same text,
    // a finish chunk, a usage chunk, then [DONE].
    let r = post(
        app(),
        "/v1/chat/completions",
        &body(json!({"stream": true, "stream_options": {"include_usage": true}})),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    let frames = r.sse();
    assert_eq!(frames.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = frames[..frames.len() - 1]
        .iter()
        .map(|f| serde_json::from_str(f).unwrap())
        .collect();
    assert!(
        chunks
            .iter()
            .all(|c| c["object"] == "chat.completion.chunk")
    );
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let streamed: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(streamed, text);
    let usage = chunks.last().unwrap();
    assert_eq!(usage["choices"], json!([]));
    assert_eq!(usage["usage"]["completion_tokens"], completion);
    let fin = &chunks[chunks.len() - 2];
    assert!(fin["choices"][0]["finish_reason"].is_string(), "{fin}");
    // Without include_usage no chunk carries usage.
    let r = post(
        app(),
        "/v1/chat/completions",
        &body(json!({"stream": true})),
    )
    .await;
    assert!(r.sse().iter().all(|f| !f.contains("\"usage\"")));

    // Text completions, both ways, agree.
    let prompt =
        json!({"model": model, "prompt": "Once upon a time", "max_tokens": 8, "temperature": 0});
    let r = post(app(), "/v1/completions", &prompt.to_string()).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let c = r.json();
    assert_eq!(c["object"], "text_completion");
    let text = c["choices"][0]["text"].as_str().unwrap().to_string();
    let mut streamed_req = prompt.clone();
    streamed_req["stream"] = json!(true);
    let r = post(app(), "/v1/completions", &streamed_req.to_string()).await;
    let frames = r.sse();
    assert_eq!(frames.last().unwrap(), "[DONE]");
    let streamed: String = frames[..frames.len() - 1]
        .iter()
        .map(|f| serde_json::from_str::<Value>(f).unwrap())
        .filter_map(|c| c["choices"][0]["text"].as_str().map(str::to_string))
        .collect();
    assert_eq!(streamed, text);
    // A stop string cuts the text and finishes with "stop".
    if text.chars().count() > 2 {
        let stop: String = text.chars().skip(1).take(1).collect();
        let mut req = prompt.clone();
        req["stop"] = json!([stop]);
        let c = post(app(), "/v1/completions", &req.to_string())
            .await
            .json();
        assert_eq!(c["choices"][0]["finish_reason"], "stop", "{c}");
        assert!(!c["choices"][0]["text"].as_str().unwrap().contains(&stop));
    }
    n.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_openai_errors_never_a_500() {
    let dir = tempfile::tempdir().unwrap();
    let n = node(dir.path(), true).await;
    let app = || hearth_server::router(n.clone());
    let model = n.model_name().unwrap();
    let m = |s: &str| s.replace("MODEL", &model);
    let cases: Vec<(&str, String, StatusCode, Option<&str>)> = vec![
        (
            "/v1/chat/completions",
            "{not json".into(),
            StatusCode::BAD_REQUEST,
            None,
        ),
        (
            "/v1/chat/completions",
            "[]".into(),
            StatusCode::BAD_REQUEST,
            None,
        ),
        (
            "/v1/chat/completions",
            m(r#"{"model":"MODEL"}"#),
            StatusCode::BAD_REQUEST,
            None,
        ),
        (
            "/v1/chat/completions",
            m(r#"{"model":"MODEL","messages":[]}"#),
            StatusCode::BAD_REQUEST,
            Some("messages"),
        ),
        (
            "/v1/chat/completions",
            m(r#"{"model":"MODEL","messages":[{"role":"tool","content":"x"}]}"#),
            StatusCode::BAD_REQUEST,
            Some("messages"),
        ),
        (
            "/v1/chat/completions",
            m(r#"{"model":"MODEL","messages":[{"role":"user","content":[{"type":"image_url"}]}]}"#),
            StatusCode::BAD_REQUEST,
            Some("messages"),
        ),
        (
            "/v1/chat/completions",
            m(r#"{"model":"MODEL","messages":[{"role":"user","content":7}]}"#),
            StatusCode::BAD_REQUEST,
            Some("messages"),
        ),
        (
            "/v1/chat/completions",
            m(r#"{"model":"MODEL","messages":[{"role":"user","content":"x"}],"temperature":3}"#),
            StatusCode::BAD_REQUEST,
            Some("temperature"),
        ),
        (
            "/v1/chat/completions",
            m(r#"{"model":"MODEL","messages":[{"role":"user","content":"x"}],"top_p":0}"#),
            StatusCode::BAD_REQUEST,
            Some("top_p"),
        ),
        (
            "/v1/chat/completions",
            m(r#"{"model":"MODEL","messages":[{"role":"user","content":"x"}],"n":9}"#),
            StatusCode::BAD_REQUEST,
            Some("n"),
        ),
        (
            "/v1/chat/completions",
            m(r#"{"model":"MODEL","messages":[{"role":"user","content":"x"}],"max_tokens":0}"#),
            StatusCode::BAD_REQUEST,
            Some("max_tokens"),
        ),
        (
            "/v1/chat/completions",
            m(
                r#"{"model":"MODEL","messages":[{"role":"user","content":"x"}],"stop":["a","b","c","d","e"]}"#,
            ),
            StatusCode::BAD_REQUEST,
            Some("stop"),
        ),
        (
            "/v1/chat/completions",
            m(
                r#"{"model":"MODEL","messages":[{"role":"user","content":"x"}],"logprobs":true,"top_logprobs":21}"#,
            ),
            StatusCode::BAD_REQUEST,
            Some("top_logprobs"),
        ),
        (
            "/v1/chat/completions",
            m(
                r#"{"model":"MODEL","messages":[{"role":"user","content":"x"}],"temperature":"hot"}"#,
            ),
            StatusCode::BAD_REQUEST,
            None,
        ),
        (
            "/v1/chat/completions",
            r#"{"model":"gpt-4o","messages":[{"role":"user","content":"x"}]}"#.into(),
            StatusCode::NOT_FOUND,
            Some("model"),
        ),
        (
            "/v1/completions",
            m(r#"{"model":"MODEL","prompt":{"a":1}}"#),
            StatusCode::BAD_REQUEST,
            Some("prompt"),
        ),
        (
            "/v1/completions",
            m(r#"{"model":"MODEL","prompt":[99999999999]}"#),
            StatusCode::BAD_REQUEST,
            Some("prompt"),
        ),
        (
            "/v1/completions",
            m(r#"{"model":"MODEL","prompt":[4000000000]}"#),
            StatusCode::BAD_REQUEST,
            None,
        ),
        (
            "/v1/completions",
            m(r#"{"model":"MODEL","prompt":"x","echo":true,"logprobs":21}"#),
            StatusCode::BAD_REQUEST,
            Some("logprobs"),
        ),
        (
            "/v1/completions",
            m(r#"{"model":"MODEL","prompt":"x","suffix":"y"}"#),
            StatusCode::BAD_REQUEST,
            Some("suffix"),
        ),
        (
            "/v1/chat/completions",
            m(r#"{"model":"MODEL","messages":[{"role":"user","content":"x"}],"min_p":0.1}"#),
            StatusCode::BAD_REQUEST,
            Some("min_p"),
        ),
        (
            "/v1/chat/completions",
            m(
                r#"{"model":"MODEL","messages":[{"role":"user","content":"x"}],"audio":{"voice":"alloy","format":"wav"}}"#,
            ),
            StatusCode::BAD_REQUEST,
            Some("audio"),
        ),
        (
            "/v1/chat/completions",
            m(
                r#"{"model":"MODEL","messages":[{"role":"user","content":"x"}],"response_format":{"type":"yaml"}}"#,
            ),
            StatusCode::BAD_REQUEST,
            Some("response_format"),
        ),
        (
            "/v1/chat/completions",
            m(
                r#"{"model":"MODEL","messages":[{"role":"user","content":"x"}],"response_format":{"type":"json_schema","json_schema":{"name":"x","schema":{"type":"no-such-type"}}}}"#,
            ),
            StatusCode::BAD_REQUEST,
            None,
        ),
        (
            "/v1/chat/completions",
            m(
                r#"{"model":"MODEL","messages":[{"role":"user","content":"x"}],"tools":[{"type":"function","function":{"name":"bad name"}}]}"#,
            ),
            StatusCode::BAD_REQUEST,
            Some("tools"),
        ),
        (
            "/v1/chat/completions",
            m(
                r#"{"model":"MODEL","messages":[{"role":"user","content":"x"}],"tools":[{"type":"function","function":{"name":"f"}}],"tool_choice":{"type":"function","function":{"name":"g"}}}"#,
            ),
            StatusCode::BAD_REQUEST,
            Some("tool_choice"),
        ),
        (
            "/v1/chat/completions",
            m(
                r#"{"model":"MODEL","messages":[{"role":"user","content":"x"}],"logit_bias":{"7":101}}"#,
            ),
            StatusCode::BAD_REQUEST,
            Some("logit_bias"),
        ),
        (
            "/v1/chat/completions",
            m(
                r#"{"model":"MODEL","messages":[{"role":"user","content":"x"}],"logit_bias":{"99999999":1}}"#,
            ),
            StatusCode::BAD_REQUEST,
            None,
        ),
        (
            "/v1/chat/completions",
            m(
                r#"{"model":"MODEL","messages":[{"role":"user","content":"x"}],"presence_penalty":-2.5}"#,
            ),
            StatusCode::BAD_REQUEST,
            Some("presence_penalty"),
        ),
        (
            "/v1/completions",
            r#"{"model":"nope","prompt":"x"}"#.into(),
            StatusCode::NOT_FOUND,
            Some("model"),
        ),
        (
            "/api/models/load",
            r#"{"model":"nope"}"#.into(),
            StatusCode::NOT_FOUND,
            Some("model"),
        ),
        (
            "/api/models/load",
            r#"{"name":"tiny"}"#.into(),
            StatusCode::BAD_REQUEST,
            None,
        ),
    ];
    for (path, body, want, param) in cases {
        let r = post(app(), path, &body).await;
        assert_eq!(r.status, want, "{path} {body}: {}", r.text());
        let e = r.error();
        if let Some(p) = param {
            assert_eq!(e["param"], p, "{path} {body}: {e}");
        }
    }
    // Not JSON at all (no content type): a 400, not axum's 415.
    let req = Request::post("/v1/chat/completions")
        .body(Body::from("hello"))
        .unwrap();
    let r = send(app(), req).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    r.error();
    // A body over the limit: 413, in the same shape.
    let huge = format!(
        r#"{{"model":"{model}","messages":[{{"role":"user","content":"{}"}}]}}"#,
        "a".repeat(hearth_server::MAX_BODY + 10)
    );
    let r = post(app(), "/v1/chat/completions", &huge).await;
    assert_eq!(r.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(r.error()["code"], "request_too_large");
    // Unknown routes and wrong methods.
    let r = get(app(), "/v1/nothing").await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    r.error();
    let r = get(app(), "/v1/chat/completions").await;
    assert_eq!(r.status, StatusCode::METHOD_NOT_ALLOWED);
    r.error();
    // A prompt longer than the model's context: a 400 from the pipeline.
    let long = json!({"model": model, "prompt": "word ".repeat(5000), "max_tokens": 4});
    let r = post(app(), "/v1/completions", &long.to_string()).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.text());
    r.error();
    // The node still answers after all that.
    let ok = post(
        app(),
        "/v1/chat/completions",
        &chat_body(json!({})).replace("tiny-model", &model),
    )
    .await;
    assert_eq!(ok.status, StatusCode::OK);
    n.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_model_served_lists_what_can_be_then_loading_and_unloading_work() {
    let dir = tempfile::tempdir().unwrap();
    let n = node(dir.path(), false).await;
    let app = || hearth_server::router(n.clone());
    // Nothing served, but what the node holds is listed: asking for it
    // loads it.
    let ids = |v: Value| -> Vec<String> {
        v["data"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|m| m["id"].as_str().map(str::to_string))
            .collect()
    };
    assert_eq!(ids(get(app(), "/v1/models").await.json()), ["tiny"]);
    assert_eq!(get(app(), "/v1/models/tiny").await.status, StatusCode::OK);
    // Live, but not ready.
    assert_eq!(get(app(), "/health").await.status, StatusCode::OK);
    let r = get(app(), "/ready").await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(r.json()["reason"], "no model is loaded");
    let r = post(app(), "/v1/chat/completions", &chat_body(json!({}))).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    let catalog = get(app(), "/api/models").await.json();
    assert_eq!(catalog["available"][0]["name"], "tiny", "{catalog}");
    assert!(catalog["loaded"].is_null());

    let r = post(app(), "/api/models/load", r#"{"model":"tiny"}"#).await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.text());
    assert_eq!(r.json()["status"], "loading");
    let p = n.wait_placement(Duration::from_secs(30)).await.unwrap();
    let model = n.model_name().unwrap();
    assert_eq!(p.model, model);
    let r = get(app(), "/ready").await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(r.json()["status"], "ready");
    assert_eq!(
        get(app(), "/v1/models").await.json()["data"][0]["id"],
        model.as_str()
    );
    // The events tell the story: loading, loaded, planned, stage, active.
    // (The active placement is published just before its event: a moment
    // may pass between `wait_placement` returning and the event.)
    let kinds = || -> Vec<String> {
        n.cluster_events()
            .0
            .iter()
            .map(|e| {
                serde_json::to_value(e).unwrap()["kind"]
                    .as_str()
                    .unwrap()
                    .to_string()
            })
            .collect()
    };
    let waited = std::time::Instant::now();
    while !kinds().iter().any(|k| k == "placement_active")
        && waited.elapsed() < Duration::from_secs(5)
    {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let kinds = kinds();
    for k in [
        "model_loading",
        "model_loaded",
        "placement_planned",
        "stage_loading",
        "stage_loaded",
        "placement_active",
    ] {
        assert!(kinds.iter().any(|x| x == k), "{k} missing from {kinds:?}");
    }

    let r = post(app(), "/api/models/unload", "{}").await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.json()["unloaded"], model.as_str());
    assert!(n.placement().is_none());
    assert_eq!(ids(get(app(), "/v1/models").await.json()), ["tiny"]);
    assert_eq!(
        get(app(), "/ready").await.status,
        StatusCode::SERVICE_UNAVAILABLE
    );
    n.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_api_key_guards_everything_but_health_and_the_ui_and_no_cors() {
    let dir = tempfile::tempdir().unwrap();
    let n = node(dir.path(), false).await;
    let app = App::new(
        n.clone(),
        ServerOptions {
            api_key: Some("s3cret".into()),
            ..Default::default()
        },
    );
    let r = get(app.router(), "/v1/models").await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert_eq!(r.error()["code"], "invalid_api_key");
    assert_eq!(r.headers["www-authenticate"], "Bearer");
    for auth in ["Bearer wrong", "Bearer s3cret2", "s3cret", "Basic s3cret"] {
        let req = Request::get("/api/cluster")
            .header("authorization", auth)
            .body(Body::empty())
            .unwrap();
        assert_eq!(
            send(app.router(), req).await.status,
            StatusCode::UNAUTHORIZED,
            "{auth}"
        );
    }
    let req = Request::get("/v1/models")
        .header("authorization", "Bearer s3cret")
        .header("origin", "http://evil.example")
        .body(Body::empty())
        .unwrap();
    let r = send(app.router(), req).await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(!r.headers.contains_key("access-control-allow-origin"));
    // A CORS preflight gets no permission either.
    let req = Request::options("/v1/chat/completions")
        .header("origin", "http://evil.example")
        .header("access-control-request-method", "POST")
        .body(Body::empty())
        .unwrap();
    let r = send(app.router(), req).await;
    assert!(!r.headers.contains_key("access-control-allow-origin"));
    assert!(r.status.is_client_error());
    for open in ["/health", "/", "/ui/app.js", "/ui/style.css"] {
        assert_eq!(
            get(app.router(), open).await.status,
            StatusCode::OK,
            "{open}"
        );
    }
    n.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_openapi_ui_and_events() {
    let dir = tempfile::tempdir().unwrap();
    let n = node(dir.path(), true).await;
    // One app: its counters persist across requests.
    let shared = App::new(n.clone(), ServerOptions::default());
    let app = || shared.router();
    let model = n.model_name().unwrap();
    // One generation, then the counters show it.
    let r = post(
        app(),
        "/v1/chat/completions",
        &chat_body(json!({})).replace("tiny-model", &model),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    let tokens = r.json()["usage"]["completion_tokens"].as_u64().unwrap();
    let r = get(app(), "/metrics").await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(
        r.headers["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain")
    );
    let text = r.text();
    for want in [
        "# TYPE hearth_http_requests_total counter",
        "hearth_generations_total 1",
        &format!("hearth_completion_tokens_total {tokens}"),
        "hearth_open_generations 0",
        "hearth_decode_tokens_per_second ",
        "hearth_stage_compute_seconds_total{node=\"solo\"",
        "hearth_stage_network_seconds_total{",
        "hearth_stage_sequences{",
        "# TYPE hearth_time_to_first_token_seconds histogram",
        "# TYPE hearth_time_per_output_token_seconds histogram",
        "# TYPE hearth_request_duration_seconds histogram",
        "# TYPE hearth_queue_wait_seconds histogram",
        "hearth_time_to_first_token_seconds_count{endpoint=\"chat_completions\"} 1",
        "hearth_request_duration_seconds_bucket{le=\"+Inf\",endpoint=\"chat_completions\"} 1",
    ] {
        assert!(text.contains(want), "{want} missing from\n{text}");
    }
    // Buckets are cumulative, and the end-to-end time covers the first token.
    let sum = |name: &str| -> f64 {
        text.lines()
            .find(|l| l.starts_with(&format!("{name}_sum{{")))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{name}_sum missing"))
    };
    assert!(sum("hearth_request_duration_seconds") >= sum("hearth_time_to_first_token_seconds"));
    let buckets: Vec<f64> = text
        .lines()
        .filter(|l| l.starts_with("hearth_time_to_first_token_seconds_bucket{"))
        .map(|l| l.rsplit(' ').next().unwrap().parse().unwrap())
        .collect();
    assert!(buckets.len() > 5 && buckets.windows(2).all(|w| w[0] <= w[1]));
    // Every line is a comment or `name{labels} number`.
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let value = line.rsplit(' ').next().unwrap();
        assert!(value.parse::<f64>().is_ok(), "{line}");
    }

    // The OpenAPI document lists every route, and every listed route is served.
    let doc = get(app(), "/openapi.json").await.json();
    assert_eq!(doc["openapi"], "3.1.0");
    for (method, path) in hearth_server::openapi::OPERATIONS {
        assert!(doc["paths"][path][method].is_object(), "{method} {path}");
        let concrete = path.replace("{id}", &model);
        let req = Request::builder()
            .method(method.to_uppercase().as_str())
            .uri(&concrete)
            .header("content-type", "application/json")
            .body(Body::from("{}"))
            .unwrap();
        if *path == "/api/events" || *path == "/api/models/unload" {
            continue; // endless stream; unloading is tested elsewhere
        }
        let r = send(app(), req).await;
        assert!(
            r.status != StatusCode::NOT_FOUND || r.json()["error"]["code"] != "unknown_url",
            "{method} {path} is not routed"
        );
        assert_ne!(r.status, StatusCode::METHOD_NOT_ALLOWED, "{method} {path}");
        assert!(!r.status.is_server_error(), "{method} {path}: {}", r.status);
    }

    // The UI: the page and its files, served with a strict CSP.
    let r = get(app(), "/").await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(
        r.headers["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/html")
    );
    assert!(
        r.headers["content-security-policy"]
            .to_str()
            .unwrap()
            .contains("default-src 'self'")
    );
    assert!(r.text().contains("/ui/app.js"));
    assert!(!r.text().contains("http://") && !r.text().contains("https://"));
    let js = get(app(), "/ui/app.js").await;
    assert!(
        js.headers["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/javascript")
    );
    assert!(
        !js.text().contains("https://"),
        "the UI fetches nothing from elsewhere"
    );
    assert_eq!(
        get(app(), "/ui/nope.js").await.status,
        StatusCode::NOT_FOUND
    );

    // Events: the history arrives first on the stream.
    let resp = app()
        .oneshot(Request::get("/api/events").body(Body::empty()).unwrap())
        .await
        .unwrap();
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let mut body = resp.into_body();
    let mut seen = String::new();
    let until = tokio::time::Instant::now() + Duration::from_secs(10);
    while !seen.contains("placement_active") {
        let frame = tokio::time::timeout_at(until, body.frame())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        if let Ok(b) = frame.into_data() {
            seen.push_str(&String::from_utf8_lossy(&b));
        }
    }
    assert!(
        seen.contains("event: cluster") && seen.contains("\"kind\":\"model_loaded\""),
        "{seen}"
    );
    n.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_ends_open_streams_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let n = node(dir.path(), true).await;
    let model = n.model_name().unwrap();
    let listener = hearth_server::Listener::bind("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let app = App::new(n.clone(), ServerOptions::default());
    let server = tokio::spawn(listener.serve(app, async {
        let _ = stop_rx.await;
    }));
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(60)))
        .http_status_as_error(false)
        .build()
        .into();
    // An endless events stream and a generation, both open at shutdown.
    let events = {
        let agent = agent.clone();
        std::thread::spawn(move || {
            let mut r = agent
                .get(&format!("http://{addr}/api/events"))
                .call()
                .unwrap();
            r.body_mut().read_to_string()
        })
    };
    let chat = {
        let body = json!({"model": model, "messages": [{"role": "user", "content": "Tell a long story"}],
            "max_tokens": 200, "stream": true, "temperature": 0});
        std::thread::spawn(move || {
            let mut r = agent
                .post(&format!("http://{addr}/v1/chat/completions"))
                .header("content-type", "application/json")
                .send(body.to_string())
                .unwrap();
            r.body_mut().read_to_string()
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let _ = stop_tx.send(());
    tokio::time::timeout(
        hearth_server::SHUTDOWN_GRACE + Duration::from_secs(5),
        server,
    )
    .await
    .expect("the server stops within the grace period")
    .unwrap()
    .unwrap();
    let events = tokio::task::spawn_blocking(move || events.join().unwrap())
        .await
        .unwrap();
    assert!(events.unwrap().contains("event: cluster"));
    let chat = tokio::task::spawn_blocking(move || chat.join().unwrap())
        .await
        .unwrap()
        .unwrap();
    assert!(chat.trim_end().ends_with("data: [DONE]"), "{chat}");
    n.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stalls_mid_body_gets_a_408() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dir = tempfile::tempdir().unwrap();
    let n = node(dir.path(), false).await;
    let listener = hearth_server::Listener::bind("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let addr = listener.local_addr().unwrap();
    let app = App::new(
        n.clone(),
        ServerOptions {
            body_timeout: Duration::from_millis(300),
            ..Default::default()
        },
    );
    let server = tokio::spawn(listener.serve(app, std::future::pending()));
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tcp.write_all(
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{\"model\":",
    )
    .await
    .unwrap();
    let mut reply = vec![0u8; 4096];
    let got = tokio::time::timeout(Duration::from_secs(5), tcp.read(&mut reply))
        .await
        .expect("an answer before the client finishes")
        .unwrap();
    let text = String::from_utf8_lossy(&reply[..got]);
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(text.contains("\"code\":\"timeout\""), "{text}");
    server.abort();
    n.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_key_only_local_host_names_are_served() {
    let dir = tempfile::tempdir().unwrap();
    let n = node(dir.path(), false).await;
    let app = || hearth_server::router(n.clone());
    let with_host = |h: &str| {
        Request::get("/v1/models")
            .header("host", h)
            .body(Body::empty())
            .unwrap()
    };
    for ok in [
        "localhost:7411",
        "127.0.0.1:7411",
        "[::1]:7411",
        "192.168.1.20",
        "LOCALHOST",
        "app.localhost:80",
    ] {
        assert_eq!(
            send(app(), with_host(ok)).await.status,
            StatusCode::OK,
            "{ok}"
        );
    }
    // A name re-pointed at loopback (DNS rebinding) is refused.
    for bad in [
        "evil.example",
        "evil.example:7411",
        "127.0.0.1.evil.example",
    ] {
        let r = send(app(), with_host(bad)).await;
        assert_eq!(r.status, StatusCode::FORBIDDEN, "{bad}");
        assert_eq!(r.error()["code"], "host_not_allowed");
    }
    n.shutdown().await;
}

/// OpenAI's request fields (chat completions and completions), written
/// here from OpenAI's API reference, each with a value a client might send
/// (and what it needs beside it). The rule: each is honoured (a 200) or a
/// 400 naming it; and anything else is a 400 naming it too.
fn openai_chat_fields() -> Vec<(&'static str, Value)> {
    vec![
        (
            "audio",
            json!({"audio": {"voice": "alloy", "format": "wav"}}),
        ),
        ("frequency_penalty", json!({"frequency_penalty": 0.5})),
        (
            "function_call",
            json!({"function_call": "auto", "functions": [{"name": "f", "parameters": {"type": "object"}}]}),
        ),
        (
            "functions",
            json!({"functions": [{"name": "f", "description": "d", "parameters": {"type": "object"}}]}),
        ),
        ("logit_bias", json!({"logit_bias": {"5": 2.5}})),
        ("logprobs", json!({"logprobs": true})),
        ("max_completion_tokens", json!({"max_completion_tokens": 3})),
        ("max_tokens", json!({"max_tokens": 3})),
        ("metadata", json!({"metadata": {"k": "v"}})),
        ("modalities", json!({"modalities": ["text"]})),
        ("n", json!({"n": 2})),
        (
            "parallel_tool_calls",
            json!({"parallel_tool_calls": false, "tools": [{"type": "function", "function": {"name": "f"}}]}),
        ),
        (
            "prediction",
            json!({"prediction": {"type": "content", "content": "x"}}),
        ),
        ("presence_penalty", json!({"presence_penalty": -0.5})),
        ("prompt_cache_key", json!({"prompt_cache_key": "k"})),
        ("reasoning_effort", json!({"reasoning_effort": "low"})),
        (
            "response_format",
            json!({"response_format": {"type": "json_object"}}),
        ),
        ("safety_identifier", json!({"safety_identifier": "u1"})),
        ("seed", json!({"seed": 3})),
        ("service_tier", json!({"service_tier": "auto"})),
        ("stop", json!({"stop": ["\n\n"]})),
        ("store", json!({"store": false})),
        ("stream", json!({"stream": false})),
        (
            "stream_options",
            json!({"stream": true, "stream_options": {"include_usage": true}}),
        ),
        ("temperature", json!({"temperature": 0.5})),
        (
            "tool_choice",
            json!({"tool_choice": "none", "tools": [{"type": "function", "function": {"name": "f"}}]}),
        ),
        (
            "tools",
            json!({"tools": [{"type": "function", "function": {"name": "get_weather", "description": "d", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}, "strict": true}}]}),
        ),
        ("top_logprobs", json!({"logprobs": true, "top_logprobs": 2})),
        ("top_p", json!({"top_p": 0.9})),
        ("user", json!({"user": "u1"})),
        ("verbosity", json!({"verbosity": "low"})),
        ("web_search_options", json!({"web_search_options": {}})),
    ]
}

fn openai_completion_fields() -> Vec<(&'static str, Value)> {
    vec![
        ("best_of", json!({"best_of": 1})),
        ("echo", json!({"echo": true})),
        ("frequency_penalty", json!({"frequency_penalty": 1.0})),
        ("logit_bias", json!({"logit_bias": {"7": -100}})),
        ("logprobs", json!({"logprobs": 2})),
        ("max_tokens", json!({"max_tokens": 3})),
        ("n", json!({"n": 2})),
        ("presence_penalty", json!({"presence_penalty": 1.0})),
        ("seed", json!({"seed": 1})),
        ("stop", json!({"stop": "x"})),
        ("stream", json!({"stream": false})),
        (
            "stream_options",
            json!({"stream": true, "stream_options": {"include_usage": true}}),
        ),
        ("suffix", json!({"suffix": "end"})),
        ("temperature", json!({"temperature": 0})),
        ("top_p", json!({"top_p": 0.5})),
        ("user", json!({"user": "u"})),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_openai_field_is_honoured_or_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let n = node(dir.path(), true).await;
    let app = || hearth_server::router(n.clone());
    let model = n.model_name().unwrap();
    for (path, fields, honoured, base) in [
        (
            "/v1/chat/completions",
            openai_chat_fields(),
            hearth_server::fields::CHAT_FIELDS,
            json!({"model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3}),
        ),
        (
            "/v1/completions",
            openai_completion_fields(),
            hearth_server::fields::COMPLETION_FIELDS,
            json!({"model": model, "prompt": "Once", "max_tokens": 3}),
        ),
    ] {
        for (field, extra) in &fields {
            let mut body = base.clone();
            for (k, v) in extra.as_object().unwrap() {
                body[k] = v.clone();
            }
            let r = post(app(), path, &body.to_string()).await;
            if honoured.contains(field) {
                assert_eq!(r.status, StatusCode::OK, "{path} {field}: {}", r.text());
            } else {
                assert_eq!(
                    r.status,
                    StatusCode::BAD_REQUEST,
                    "{path} {field}: {}",
                    r.text()
                );
                assert_eq!(r.error()["param"], *field, "{path}: {}", r.text());
            }
        }
        // Every honoured field is OpenAI's, or one of Hearth's extensions.
        for h in honoured {
            assert!(
                fields.iter().any(|(f, _)| f == h)
                    || [
                        "model",
                        "messages",
                        "prompt",
                        "top_k",
                        "chat_template_kwargs",
                        "documents"
                    ]
                    .contains(h),
                "{h} is honoured but is not in OpenAI's schema"
            );
        }
        // The OpenAPI document lists exactly the honoured fields.
        let doc = get(app(), "/openapi.json").await.json();
        let props = doc["paths"][path]["post"]["requestBody"]["content"]["application/json"]
            ["schema"]["properties"]
            .as_object()
            .unwrap();
        let mut documented: Vec<&str> = props.keys().map(String::as_str).collect();
        let mut listed = honoured.to_vec();
        documented.sort_unstable();
        listed.sort_unstable();
        assert_eq!(documented, listed, "{path}");
        // A field nobody defined is refused by name.
        let mut body = base.clone();
        body["frobnicate"] = json!(1);
        let r = post(app(), path, &body.to_string()).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST);
        assert_eq!(r.error()["param"], "frobnicate");
    }
    n.shutdown().await;
}

/// Completions' tokens (as texts) and their log-probabilities.
fn token_logprobs(v: &Value) -> (Vec<String>, Vec<f64>) {
    let lp = &v["choices"][0]["logprobs"];
    (
        lp["tokens"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t.as_str().unwrap().to_string())
            .collect(),
        lp["token_logprobs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t.as_f64().unwrap())
            .collect(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sampling_fields_do_what_they_say() {
    let dir = tempfile::tempdir().unwrap();
    let n = node(dir.path(), true).await;
    let app = || hearth_server::router(n.clone());
    let model = n.model_name().unwrap();
    let complete = |extra: Value| {
        let mut b = json!({"model": model, "prompt": "The cat", "max_tokens": 6, "temperature": 0});
        for (k, v) in extra.as_object().unwrap() {
            b[k] = v.clone();
        }
        b.to_string()
    };
    // Greedy with log-probabilities: each token is its position's most
    // likely, its log-probability the first alternative's, all <= 0.
    let r = post(app(), "/v1/completions", &complete(json!({"logprobs": 3}))).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let v = r.json();
    let (tokens, lps) = token_logprobs(&v);
    assert_eq!(
        tokens.len(),
        v["usage"]["completion_tokens"].as_u64().unwrap() as usize
    );
    assert_eq!(tokens.concat(), v["choices"][0]["text"].as_str().unwrap());
    let tops = v["choices"][0]["logprobs"]["top_logprobs"]
        .as_array()
        .unwrap();
    for ((t, lp), top) in tokens.iter().zip(&lps).zip(tops) {
        let top = top.as_object().unwrap();
        assert!(!top.is_empty() && top.len() <= 3);
        let best = top
            .values()
            .map(|x| x.as_f64().unwrap())
            .fold(f64::MIN, f64::max);
        assert!(
            *lp <= 0.0 && (lp - best).abs() < 1e-4,
            "{t}: {lp} vs {best}"
        );
    }
    // logit_bias +100 on one token: greedy repeats it.
    let r = post(
        app(),
        "/v1/completions",
        &complete(json!({"logprobs": 0, "logit_bias": {"70": 100}})),
    )
    .await;
    let (tokens, _) = token_logprobs(&r.json());
    let forced = n.token_texts(&[70]).remove(0);
    assert!(tokens.iter().all(|t| *t == forced), "{tokens:?}");
    // -100 on the natural first token: it never comes.
    let plain = token_logprobs(
        &post(app(), "/v1/completions", &complete(json!({"logprobs": 0})))
            .await
            .json(),
    )
    .0;
    let banned_id = (0..200u32)
        .find(|&i| n.token_texts(&[i])[0] == plain[0])
        .expect("the first token's id");
    let r = post(
        app(),
        "/v1/completions",
        &complete(json!({"logprobs": 0, "logit_bias": {banned_id.to_string(): -100}})),
    )
    .await;
    let (tokens, _) = token_logprobs(&r.json());
    assert!(!tokens.contains(&plain[0]), "{tokens:?}");
    // Penalties: greedy output repeats itself; with both penalties high it
    // uses more distinct tokens.
    let distinct = |t: &[String]| t.iter().collect::<std::collections::HashSet<_>>().len();
    let long = |extra: Value| {
        let mut e = json!({"logprobs": 0, "max_tokens": 16});
        for (k, v) in extra.as_object().unwrap() {
            e[k] = v.clone();
        }
        complete(e)
    };
    let base = token_logprobs(
        &post(app(), "/v1/completions", &long(json!({})))
            .await
            .json(),
    )
    .0;
    let pen = token_logprobs(
        &post(
            app(),
            "/v1/completions",
            &long(json!({"frequency_penalty": 2, "presence_penalty": 2})),
        )
        .await
        .json(),
    )
    .0;
    assert!(distinct(&pen) > distinct(&base), "{base:?} vs {pen:?}");
    // n sequences, each seeded; the same seed gives the same choices. (The
    // random model all but always says "\n": that is biased away.)
    let newline = (0..400u32)
        .find(|&i| n.token_bytes(&[i])[0] == b"\n")
        .unwrap();
    let nbody = json!({"model": model, "messages": [{"role": "user", "content": "Hi"}], "n": 3, "seed": 11, "temperature": 2.0, "max_tokens": 8, "logit_bias": {newline.to_string(): -100}}).to_string();
    let a = post(app(), "/v1/chat/completions", &nbody).await.json();
    let b = post(app(), "/v1/chat/completions", &nbody).await.json();
    let texts = |v: &Value| -> Vec<String> {
        v["choices"]
            .as_array()
            .unwrap()
            .iter()
            .enumerate()
            .map(|(i, c)| {
                assert_eq!(c["index"], i);
                c["message"]["content"].as_str().unwrap().to_string()
            })
            .collect()
    };
    assert_eq!(texts(&a).len(), 3);
    assert_eq!(texts(&a), texts(&b));
    assert!(distinct(&texts(&a)) > 1, "{:?}", texts(&a));
    // Streamed, the choices arrive by index and each ends once.
    let mut sb: Value = serde_json::from_str(&nbody).unwrap();
    sb["stream"] = json!(true);
    let r = post(app(), "/v1/chat/completions", &sb.to_string()).await;
    let frames = r.sse();
    assert_eq!(frames.last().unwrap(), "[DONE]");
    let mut streamed = vec![String::new(); 3];
    let mut ends = 0;
    for f in &frames[..frames.len() - 1] {
        let v: Value = serde_json::from_str(f).unwrap();
        for c in v["choices"].as_array().unwrap() {
            let i = c["index"].as_u64().unwrap() as usize;
            if let Some(t) = c["delta"]["content"].as_str() {
                streamed[i].push_str(t);
            }
            if !c["finish_reason"].is_null() {
                ends += 1;
            }
        }
    }
    assert_eq!(ends, 3);
    assert_eq!(streamed, texts(&a));
    // Chat log-probabilities: one entry per token, alternatives sorted.
    let r = post(
        app(),
        "/v1/chat/completions",
        &json!({"model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 5, "temperature": 0, "logprobs": true, "top_logprobs": 4}).to_string(),
    )
    .await
    .json();
    let content = r["choices"][0]["logprobs"]["content"].as_array().unwrap();
    assert_eq!(
        content.len(),
        r["usage"]["completion_tokens"].as_u64().unwrap() as usize
    );
    for e in content {
        let top = e["top_logprobs"].as_array().unwrap();
        assert_eq!(top.len(), 4);
        assert_eq!(top[0]["token"], e["token"]);
        let l: Vec<f64> = top.iter().map(|t| t["logprob"].as_f64().unwrap()).collect();
        assert!(l.windows(2).all(|w| w[0] >= w[1]), "{l:?}");
        assert_eq!(
            e["bytes"].as_array().unwrap().len(),
            e["token"].as_str().unwrap().len()
        );
    }
    // No max_tokens: up to the context.
    let r = post(
        app(),
        "/v1/completions",
        &json!({"model": model, "prompt": "The cat", "temperature": 0}).to_string(),
    )
    .await
    .json();
    let total = r["usage"]["total_tokens"].as_u64().unwrap();
    assert!(
        total == CONTEXT as u64 || r["choices"][0]["finish_reason"] == "stop",
        "{r}"
    );
    // Echo puts the prompt before the text.
    let r = post(app(), "/v1/completions", &complete(json!({"echo": true})))
        .await
        .json();
    assert!(
        r["choices"][0]["text"]
            .as_str()
            .unwrap()
            .starts_with("The cat")
    );
    n.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn structured_output_and_forced_tool_calls_always_parse() {
    let dir = tempfile::tempdir().unwrap();
    let n = node(dir.path(), true).await;
    let app = || hearth_server::router(n.clone());
    let model = n.model_name().unwrap();
    let schema = json!({
        "type": "object",
        "properties": {"answer": {"enum": ["yes", "no", "maybe"]}, "sure": {"type": "boolean"}},
        "required": ["answer", "sure"],
        "additionalProperties": false
    });
    // A random-weight model, greedy and sampled, streamed and not: the
    // output is JSON meeting the schema every time.
    for (temperature, stream) in [(0.0, false), (1.0, false), (1.0, true)] {
        let body = json!({
            "model": model,
            "messages": [{"role": "system", "content": "."}, {"role": "user", "content": "Is it?"}],
            "temperature": temperature,
            "seed": 5,
            "n": 2,
            "max_tokens": 100,
            "stream": stream,
            "response_format": {"type": "json_schema", "json_schema": {"name": "verdict", "strict": true, "schema": schema}},
        });
        let r = post(app(), "/v1/chat/completions", &body.to_string()).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text());
        let outputs: Vec<String> = if stream {
            let mut out = vec![String::new(); 2];
            for f in r.sse().iter().filter(|f| *f != "[DONE]") {
                let v: Value = serde_json::from_str(f).unwrap();
                for c in v["choices"].as_array().unwrap() {
                    if let Some(t) = c["delta"]["content"].as_str() {
                        out[c["index"].as_u64().unwrap() as usize].push_str(t);
                    }
                }
            }
            out
        } else {
            r.json()["choices"]
                .as_array()
                .unwrap()
                .iter()
                .map(|c| {
                    assert_eq!(c["finish_reason"], "stop", "{c}");
                    c["message"]["content"].as_str().unwrap().to_string()
                })
                .collect()
        };
        for o in outputs {
            let v: Value = serde_json::from_str(&o).unwrap_or_else(|e| panic!("{o:?}: {e}"));
            assert!(
                ["yes", "no", "maybe"].contains(&v["answer"].as_str().unwrap()),
                "{o}"
            );
            assert!(v["sure"].is_boolean(), "{o}");
            assert_eq!(v.as_object().unwrap().len(), 2, "{o}");
        }
    }
    // json_object: any object.
    let r = post(
        app(),
        "/v1/chat/completions",
        &json!({"model": model, "messages": [{"role": "system", "content": "."}, {"role": "user", "content": "x"}], "temperature": 0, "max_tokens": 100, "response_format": {"type": "json_object"}}).to_string(),
    )
    .await
    .json();
    let c = &r["choices"][0];
    let text = c["message"]["content"].as_str().unwrap();
    if c["finish_reason"] == "stop" {
        assert!(
            serde_json::from_str::<Value>(text).unwrap().is_object(),
            "{text}"
        );
    } else {
        assert!(text.starts_with('{'), "{text}");
    }
    // tool_choice required / named: a call of a listed tool, its arguments
    // meeting the tool's parameters, finish_reason tool_calls; streamed as
    // tool_calls deltas.
    let tools = json!([
        {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {"unit": {"enum": ["c", "f"]}}, "required": ["unit"], "additionalProperties": false}}},
        {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {"utc": {"type": "boolean"}}, "required": ["utc"], "additionalProperties": false}}}
    ]);
    for (choice, want) in [
        (json!("required"), None),
        (
            json!({"type": "function", "function": {"name": "get_time"}}),
            Some("get_time"),
        ),
    ] {
        for stream in [false, true] {
            let body = json!({
                "model": model,
                "messages": [{"role": "system", "content": "."}, {"role": "user", "content": "Weather?"}],
                "temperature": 0.8, "seed": 2, "max_tokens": 100, "stream": stream,
                "tools": tools, "tool_choice": choice,
            });
            let r = post(app(), "/v1/chat/completions", &body.to_string()).await;
            assert_eq!(r.status, StatusCode::OK, "{}", r.text());
            let (calls, reason) = if stream {
                let mut calls = Vec::new();
                let mut reason = Value::Null;
                for f in r.sse().iter().filter(|f| *f != "[DONE]") {
                    let v: Value = serde_json::from_str(f).unwrap();
                    let c = &v["choices"][0];
                    if let Some(tc) = c["delta"]["tool_calls"].as_array() {
                        calls.extend(tc.iter().cloned());
                    }
                    if !c["finish_reason"].is_null() {
                        reason = c["finish_reason"].clone();
                    }
                }
                (calls, reason)
            } else {
                let v = r.json();
                let c = &v["choices"][0];
                assert!(c["message"]["content"].is_null(), "{c}");
                (
                    c["message"]["tool_calls"].as_array().unwrap().clone(),
                    c["finish_reason"].clone(),
                )
            };
            // OpenAI ends a named choice with `stop`, else `tool_calls`.
            assert_eq!(reason, if want.is_some() { "stop" } else { "tool_calls" });
            assert_eq!(calls.len(), 1, "{calls:?}");
            let f = &calls[0]["function"];
            let name = f["name"].as_str().unwrap();
            if let Some(w) = want {
                assert_eq!(name, w);
            }
            let args: Value = serde_json::from_str(f["arguments"].as_str().unwrap()).unwrap();
            match name {
                "get_weather" => assert!(["c", "f"].contains(&args["unit"].as_str().unwrap())),
                "get_time" => assert!(args["utc"].is_boolean()),
                other => panic!("{other}"),
            }
            assert!(calls[0]["id"].as_str().unwrap().starts_with("call"));
        }
    }
    // A conversation with a call and its result renders and answers.
    let body = json!({
        "model": model, "max_tokens": 4, "temperature": 0, "tools": tools,
        "messages": [
            {"role": "user", "content": "Weather?"},
            {"role": "assistant", "content": null, "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"unit\": \"c\"}"}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "21 C"}
        ],
    });
    let r = post(app(), "/v1/chat/completions", &body.to_string()).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    n.shutdown().await;
}

/// NDJSON lines of a body.
fn ndjson(r: &Reply) -> Vec<Value> {
    assert_eq!(r.headers["content-type"], "application/x-ndjson");
    r.text()
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ollama_api_answers_in_ollamas_shapes() {
    let dir = tempfile::tempdir().unwrap();
    // Two models of other families: the served one, and a Qwen3 one in
    // Q4_1 that `/api/tags` describes from its own file.
    let spec = hearth_test_utils::TinySpec {
        context: CONTEXT,
        ..Default::default()
    };
    let mut models = TestModels::tiny_with(&dir.path().join("a"), spec).unwrap();
    let other = hearth_test_utils::tiny_model(
        &dir.path().join("b"),
        hearth_test_utils::TinySpec {
            architecture: "qwen3",
            ..Default::default()
        },
    )
    .unwrap();
    std::sync::Arc::get_mut(&mut models)
        .unwrap()
        .models
        .push(("other".into(), other.gguf_q4_1.clone()));
    let n = node_with(models, true).await;
    let shared = App::new(n.clone(), ServerOptions::default());
    let app = || shared.ollama_router();
    let model = n.model_name().unwrap();
    assert_eq!(get(app(), "/").await.text(), "Ollama is running");
    assert!(get(app(), "/api/version").await.json()["version"].is_string());
    let tags = get(app(), "/api/tags").await.json();
    let names: Vec<&str> = tags["models"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["name"].as_str().unwrap())
        .collect();
    assert!(names.contains(&model.as_str()), "{tags}");
    // Each entry described from its own file: family, quantization,
    // parameter count and a content digest.
    let entry = |name: &str| {
        tags["models"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["name"] == name)
            .unwrap_or_else(|| panic!("{name} in {tags}"))
            .clone()
    };
    let (a, b) = (entry(&model), entry("other"));
    assert_eq!(a["details"]["family"], "llama", "{a}");
    assert_eq!(a["details"]["quantization_level"], "Q8_0", "{a}");
    assert_eq!(b["details"]["family"], "qwen3", "{b}");
    assert_eq!(b["details"]["quantization_level"], "Q4_1", "{b}");
    assert!(
        a["details"]["parameter_size"]
            .as_str()
            .unwrap()
            .ends_with('K'),
        "{a}"
    );
    for e in [&a, &b] {
        let d = e["digest"].as_str().unwrap();
        assert!(
            d.len() == 64 && d.bytes().all(|b| b.is_ascii_hexdigit()),
            "{e}"
        );
        assert!(e["size"].as_u64().unwrap() > 0, "{e}");
    }
    assert_ne!(a["digest"], b["digest"]);
    let ps = get(app(), "/api/ps").await.json();
    assert_eq!(ps["models"].as_array().unwrap().len(), 1, "{ps}");
    assert_eq!(ps["models"][0]["name"], model);
    assert_eq!(ps["models"][0]["digest"], a["digest"]);
    // The listener's own OpenAPI document.
    let doc = get(app(), "/openapi.json").await.json();
    assert_eq!(doc["openapi"], "3.1.0");
    assert!(doc["paths"]["/api/chat"]["post"].is_object());
    let show = post(app(), "/api/show", &json!({"model": model}).to_string()).await;
    assert_eq!(show.status, StatusCode::OK, "{}", show.text());
    let show = show.json();
    assert_eq!(show["model_info"]["llama.context_length"], CONTEXT);
    assert!(show["template"].as_str().unwrap().contains("im_start"));
    // A field it would not honour is refused by name.
    for (k, v) in [("verbose", json!(true)), ("system", json!("x"))] {
        let mut b = json!({"model": model});
        b[k] = v;
        let r = post(app(), "/api/show", &b.to_string()).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.text());
        assert!(r.json()["error"].as_str().unwrap().contains(k));
    }
    let r = post(app(), "/api/show", &json!({"model": "nope"}).to_string()).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert!(r.json()["error"].is_string());

    // Chat, whole and streamed (Ollama's default): the same greedy text;
    // counts and durations in the last line.
    let chat = |stream: Option<bool>| {
        let mut b = json!({"model": model, "messages": [{"role": "system", "content": "."}, {"role": "user", "content": "Hi"}],
            "options": {"temperature": 0, "num_predict": 8, "num_ctx": 2048}, "keep_alive": "5m"});
        if let Some(s) = stream {
            b["stream"] = json!(s);
        }
        b.to_string()
    };
    let whole = post(app(), "/api/chat", &chat(Some(false))).await;
    assert_eq!(whole.status, StatusCode::OK, "{}", whole.text());
    let whole = whole.json();
    assert_eq!(whole["done"], true);
    assert_eq!(whole["message"]["role"], "assistant");
    assert_eq!(whole["eval_count"], 8);
    assert!(whole["prompt_eval_count"].as_u64().unwrap() > 0);
    assert!(whole["total_duration"].as_u64().unwrap() >= whole["eval_duration"].as_u64().unwrap());
    assert_eq!(whole["done_reason"], "length");
    let lines = ndjson(&post(app(), "/api/chat", &chat(None)).await);
    let last = lines.last().unwrap();
    assert_eq!(last["done"], true);
    assert!(lines[..lines.len() - 1].iter().all(|l| l["done"] == false));
    let streamed: String = lines
        .iter()
        .map(|l| l["message"]["content"].as_str().unwrap())
        .collect();
    assert_eq!(streamed, whole["message"]["content"].as_str().unwrap());

    // Generate: templated with a system prompt, and raw.
    let g = post(
        app(),
        "/api/generate",
        &json!({"model": model, "prompt": "Hello", "system": ".", "stream": false, "options": {"temperature": 0, "num_predict": 4}}).to_string(),
    )
    .await;
    assert_eq!(g.status, StatusCode::OK, "{}", g.text());
    let g = g.json();
    assert!(
        g["response"].is_string() && g["done"] == true && g["eval_count"] == 4,
        "{g}"
    );
    let raw = ndjson(
        &post(
            app(),
            "/api/generate",
            &json!({"model": model, "prompt": "The cat", "raw": true, "options": {"temperature": 0, "num_predict": 4}}).to_string(),
        )
        .await,
    );
    assert_eq!(raw.last().unwrap()["done"], true);
    // An empty prompt loads the model.
    let load = post(app(), "/api/generate", &json!({"model": model}).to_string())
        .await
        .json();
    assert_eq!(load["done_reason"], "load");

    // `format`: a schema, enforced.
    let schema = json!({"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"], "additionalProperties": false});
    let f = post(
        app(),
        "/api/chat",
        &json!({"model": model, "stream": false, "format": schema, "messages": [{"role": "system", "content": "."}, {"role": "user", "content": "ok?"}], "options": {"temperature": 1, "seed": 4, "num_predict": 60}}).to_string(),
    )
    .await
    .json();
    let v: Value = serde_json::from_str(f["message"]["content"].as_str().unwrap()).unwrap();
    assert!(v["ok"].is_boolean(), "{f}");
    // A conversation with Ollama-style tool calls and a tool answer.
    let t = post(
        app(),
        "/api/chat",
        &json!({"model": model, "stream": false, "options": {"num_predict": 2},
            "tools": [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}],
            "messages": [
                {"role": "user", "content": "Weather in Oslo?"},
                {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}]},
                {"role": "tool", "tool_name": "get_weather", "content": "12 C"}
            ]}).to_string(),
    )
    .await;
    assert_eq!(t.status, StatusCode::OK, "{}", t.text());
    // What Hearth would not honour is refused by name.
    for (body, name) in [
        (
            json!({"model": model, "messages": [], "options": {"repeat_penalty": 1.1}}),
            "repeat_penalty",
        ),
        (
            json!({"model": model, "messages": [{"role": "user", "content": "x", "images": ["aGk="]}]}),
            "images",
        ),
        (
            json!({"model": model, "messages": [], "frobnicate": 1}),
            "frobnicate",
        ),
    ] {
        let r = post(app(), "/api/chat", &body.to_string()).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.text());
        assert!(
            r.json()["error"].as_str().unwrap().contains(name),
            "{}",
            r.text()
        );
    }
    let r = post(
        app(),
        "/api/chat",
        &json!({"model": "nope", "messages": [{"role": "user", "content": "x"}]}).to_string(),
    )
    .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert!(r.json()["error"].is_string());
    n.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_responses_api_answers_whole_and_in_typed_events() {
    let dir = tempfile::tempdir().unwrap();
    let n = node(dir.path(), true).await;
    let app = || hearth_server::router(n.clone());
    let model = n.model_name().unwrap();
    let body = |extra: Value| {
        let mut b = json!({"model": model, "instructions": ".", "input": "Hi", "max_output_tokens": 8, "temperature": 0});
        for (k, v) in extra.as_object().unwrap() {
            b[k] = v.clone();
        }
        b.to_string()
    };
    let r = post(app(), "/v1/responses", &body(json!({}))).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let v = r.json();
    assert_eq!(v["object"], "response");
    assert!(v["id"].as_str().unwrap().starts_with("resp"));
    assert_eq!(v["status"], "incomplete");
    assert_eq!(v["incomplete_details"]["reason"], "max_output_tokens");
    assert_eq!(v["usage"]["output_tokens"], 8);
    let item = &v["output"][0];
    assert_eq!(item["type"], "message");
    assert_eq!(item["role"], "assistant");
    let whole = item["content"][0]["text"].as_str().unwrap().to_string();
    assert_eq!(item["content"][0]["type"], "output_text");
    // Streamed: typed events in order, numbered; the deltas spell the text.
    let r = post(app(), "/v1/responses", &body(json!({"stream": true}))).await;
    let text = r.text();
    let mut kinds = Vec::new();
    let mut deltas = String::new();
    for frame in text.split("\n\n").filter(|f| !f.trim().is_empty()) {
        let kind = frame
            .lines()
            .find_map(|l| l.strip_prefix("event: "))
            .unwrap();
        let data: Value = serde_json::from_str(
            frame
                .lines()
                .find_map(|l| l.strip_prefix("data: "))
                .unwrap(),
        )
        .unwrap();
        assert_eq!(data["type"], kind);
        assert_eq!(data["sequence_number"], kinds.len());
        if kind == "response.output_text.delta" {
            deltas.push_str(data["delta"].as_str().unwrap());
        }
        kinds.push(kind.to_string());
    }
    assert_eq!(kinds[0], "response.created");
    assert_eq!(kinds[1], "response.in_progress");
    assert_eq!(kinds.last().unwrap(), "response.incomplete");
    for k in [
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.done",
        "response.output_item.done",
    ] {
        assert!(kinds.iter().any(|x| x == k), "{k} missing: {kinds:?}");
    }
    assert_eq!(deltas, whole);
    // Structured output through `text.format`.
    let schema = json!({"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"], "additionalProperties": false});
    let r = post(app(), "/v1/responses", &body(json!({"max_output_tokens": 60, "text": {"format": {"type": "json_schema", "name": "v", "schema": schema, "strict": true}}}))).await.json();
    assert_eq!(r["status"], "completed", "{r}");
    let out: Value =
        serde_json::from_str(r["output"][0]["content"][0]["text"].as_str().unwrap()).unwrap();
    assert!(out["ok"].is_boolean());
    // A forced call, then its output sent back as input items.
    let tools = json!([{"type": "function", "name": "lookup", "parameters": {"type": "object", "properties": {"q": {"enum": ["a", "b"]}}, "required": ["q"], "additionalProperties": false}, "strict": true}]);
    let r = post(
        app(),
        "/v1/responses",
        &body(json!({"max_output_tokens": 60, "tools": tools, "tool_choice": "required"})),
    )
    .await
    .json();
    let call = r["output"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["type"] == "function_call")
        .unwrap_or_else(|| panic!("{r}"))
        .clone();
    assert_eq!(call["name"], "lookup");
    let args: Value = serde_json::from_str(call["arguments"].as_str().unwrap()).unwrap();
    assert!(["a", "b"].contains(&args["q"].as_str().unwrap()));
    let r = post(
        app(),
        "/v1/responses",
        &json!({"model": model, "max_output_tokens": 2, "tools": tools, "input": [
            {"role": "user", "content": [{"type": "input_text", "text": "Look up a"}]},
            call,
            {"type": "function_call_output", "call_id": call["call_id"], "output": "found"}
        ]})
        .to_string(),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    // Stateless: what needs stored responses is refused by name.
    for (extra, field) in [
        (
            json!({"previous_response_id": "resp_1"}),
            "previous_response_id",
        ),
        (json!({"store": true}), "store"),
        (json!({"reasoning": {"effort": "low"}}), "reasoning"),
        (json!({"max_output_tokens": 0}), "max_output_tokens"),
        (json!({"wat": 1}), "wat"),
    ] {
        let r = post(app(), "/v1/responses", &body(extra)).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.text());
        assert_eq!(r.error()["param"], field);
    }
    n.shutdown().await;
}

/// A chat template of one model family, from the transformers reference
/// fixture (tests/fixtures/make_template_reference.py).
fn family_template(case: &str) -> String {
    let path = hearth_test_utils::workspace_root().join("tests/fixtures/templates/reference.json");
    let v: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    v["cases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == case)
        .unwrap()["template"]
        .as_str()
        .unwrap()
        .to_string()
}

/// Tools, tool calls, their results and structured output through the chat
/// template of each model family: Qwen3 (Hermes `<tool_call>`), Llama 3.1
/// (JSON with `parameters`, the `ipython` role), Mistral v3 (`[TOOL_CALLS]`,
/// 9-character ids), and Gemma and Phi-3, whose templates know no tools
/// (Hearth shows them the tools in a system turn, and their calls and
/// results as text, turns still alternating).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_template_family_gets_tools_calls_them_and_answers_in_json() {
    use hearth_models::tools::ToolFormat;
    for (case, format, renders) in [
        ("tools_thinking", ToolFormat::Hermes, true),
        ("llama3_tools", ToolFormat::Llama3, true),
        ("mistral_tools", ToolFormat::Mistral, true),
        ("gemma_plain", ToolFormat::Json, false),
        ("phi3_plain", ToolFormat::Json, false),
    ] {
        template_family(case, format, renders).await;
    }
}

async fn template_family(case: &str, format: hearth_models::tools::ToolFormat, renders: bool) {
    let dir = tempfile::tempdir().unwrap();
    let spec = hearth_test_utils::TinySpec {
        context: 4096,
        chat_template: Some(family_template(case)),
        ..Default::default()
    };
    let n = node_with(TestModels::tiny_with(dir.path(), spec).unwrap(), true).await;
    assert_eq!(n.tool_format(), Some(format), "{case}");
    assert_eq!(n.template_renders_tools(), renders, "{case}");
    let app = || hearth_server::router(n.clone());
    let model = n.model_name().unwrap();
    let tools = json!([{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"enum": ["Oslo", "Rome"]}}, "required": ["city"], "additionalProperties": false}}}]);
    let ask = |extra: Value| {
        let mut b = json!({"model": model, "max_tokens": 60, "temperature": 0,
            "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather in Oslo?"}]});
        for (k, v) in extra.as_object().unwrap() {
            b[k] = v.clone();
        }
        b.to_string()
    };
    // The model is shown its tools (by its template, or by Hearth's system
    // turn): the prompt grows by their schema.
    let plain = post(
        app(),
        "/v1/chat/completions",
        &ask(json!({"max_tokens": 1})),
    )
    .await;
    assert_eq!(plain.status, StatusCode::OK, "{case}: {}", plain.text());
    let with = post(
        app(),
        "/v1/chat/completions",
        &ask(json!({"max_tokens": 1, "tools": tools})),
    )
    .await;
    assert_eq!(with.status, StatusCode::OK, "{case}: {}", with.text());
    let grown = with.json()["usage"]["prompt_tokens"].as_u64().unwrap()
        - plain.json()["usage"]["prompt_tokens"].as_u64().unwrap();
    assert!(grown > 100, "{case}: {grown}");
    // Forced, by `required` and by name: a call of the tool, streamed and
    // not, with arguments that validate.
    for choice in [
        json!("required"),
        json!({"type": "function", "function": {"name": "get_weather"}}),
    ] {
        for stream in [false, true] {
            let r = post(
                app(),
                "/v1/chat/completions",
                &ask(json!({"tools": tools, "tool_choice": choice, "stream": stream})),
            )
            .await;
            assert_eq!(r.status, StatusCode::OK, "{case}: {}", r.text());
            let (calls, reason): (Vec<Value>, String) = if stream {
                let frames: Vec<Value> = r
                    .sse()
                    .iter()
                    .filter(|f| *f != "[DONE]")
                    .filter_map(|f| serde_json::from_str::<Value>(f).ok())
                    .collect();
                let reason = frames
                    .iter()
                    .filter_map(|v| v["choices"][0]["finish_reason"].as_str())
                    .collect();
                let calls = frames
                    .iter()
                    .filter_map(|v| v["choices"][0]["delta"]["tool_calls"].as_array().cloned())
                    .flatten()
                    .collect();
                (calls, reason)
            } else {
                let v = r.json();
                (
                    v["choices"][0]["message"]["tool_calls"]
                        .as_array()
                        .unwrap()
                        .clone(),
                    v["choices"][0]["finish_reason"]
                        .as_str()
                        .unwrap()
                        .to_string(),
                )
            };
            assert_eq!(calls.len(), 1, "{case}: {calls:?}");
            // A named choice ends as OpenAI's does: `stop`.
            let want = if choice == "required" {
                "tool_calls"
            } else {
                "stop"
            };
            assert_eq!(reason, want, "{case} {choice} stream {stream}");
            assert_eq!(calls[0]["function"]["name"], "get_weather", "{case}");
            let args: Value =
                serde_json::from_str(calls[0]["function"]["arguments"].as_str().unwrap()).unwrap();
            assert!(
                ["Oslo", "Rome"].contains(&args["city"].as_str().unwrap()),
                "{case}: {args}"
            );
        }
    }
    // Structured output through the same template.
    let r = post(
        app(),
        "/v1/chat/completions",
        &ask(json!({"response_format": {"type": "json_schema", "json_schema": {"name": "w", "strict": true,
            "schema": {"type": "object", "properties": {"city": {"enum": ["Oslo", "Rome"]}, "warm": {"type": "boolean"}},
                "required": ["city", "warm"], "additionalProperties": false}}}})),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{case}: {}", r.text());
    let v: Value = serde_json::from_str(
        r.json()["choices"][0]["message"]["content"]
            .as_str()
            .unwrap(),
    )
    .unwrap();
    assert!(v["warm"].is_boolean() && ["Oslo", "Rome"].contains(&v["city"].as_str().unwrap()));
    // `tool_choice: auto` with a strict tool: a call the model starts meets
    // the tool's schema. The model is pushed to open with `{` (a bare JSON
    // call, in a template without a format of its own): unconstrained it
    // writes braces; strict, the call it started is completed and valid.
    if format == hearth_models::tools::ToolFormat::Json {
        let vocab = n.vocab_size().unwrap() as u32;
        let texts = n.token_texts(&(0..vocab).collect::<Vec<_>>());
        let brace = texts.iter().position(|t| t == "{").unwrap();
        for strict in [false, true] {
            let mut strict_tools = tools.clone();
            strict_tools[0]["function"]["strict"] = json!(strict);
            let r = post(
                app(),
                "/v1/chat/completions",
                &ask(json!({"tools": strict_tools, "logit_bias": {brace.to_string(): 100}})),
            )
            .await;
            assert_eq!(r.status, StatusCode::OK, "{case}: {}", r.text());
            let v = r.json();
            let choice = &v["choices"][0];
            if strict {
                assert_eq!(choice["finish_reason"], "tool_calls", "{case}: {v}");
                let args: Value = serde_json::from_str(
                    choice["message"]["tool_calls"][0]["function"]["arguments"]
                        .as_str()
                        .unwrap(),
                )
                .unwrap();
                assert!(
                    ["Oslo", "Rome"].contains(&args["city"].as_str().unwrap()),
                    "{v}"
                );
            } else {
                assert!(choice["message"]["tool_calls"].is_null(), "{case}: {v}");
                assert!(
                    choice["message"]["content"]
                        .as_str()
                        .unwrap()
                        .starts_with('{')
                );
            }
        }
    }
    // Calls and their results go back through the template: OpenAI-style
    // ids (Mistral's template refuses ids that are not 9 characters, and
    // Gemma's turns that do not alternate), one call where the family
    // calls one tool at a time.
    const CITIES: [&str; 2] = ["Oslo", "Rome"];
    let calls = if format == hearth_models::tools::ToolFormat::Llama3 {
        1
    } else {
        2
    };
    let mut messages = vec![
        json!({"role": "system", "content": "Be brief."}),
        json!({"role": "user", "content": "Weather in Oslo and Rome?"}),
        json!({"role": "assistant", "content": null, "tool_calls": (0..calls).map(|i| json!(
            {"id": format!("call_{i}"), "type": "function", "function": {"name": "get_weather",
             "arguments": json!({"city": CITIES[i]}).to_string()}})).collect::<Vec<_>>()}),
    ];
    for i in 0..calls {
        messages.push(json!({"role": "tool", "tool_call_id": format!("call_{i}"), "content": format!("{} C", 12 + i)}));
    }
    for stream in [false, true] {
        let r = post(
            app(),
            "/v1/chat/completions",
            &json!({"model": model, "max_tokens": 4,
            "tools": tools, "messages": messages, "stream": stream})
            .to_string(),
        )
        .await;
        assert_eq!(r.status, StatusCode::OK, "{case}: {}", r.text());
    }
    n.shutdown().await;
}

/// Completions' `echo` with `logprobs` scores the prompt: each prompt
/// token's log-probability after the ones before it, checked against the
/// model run alone on each prefix (its last position's logits, a separate
/// path from the pipeline's all-positions logits). `max_tokens: 0` gives
/// the prompt alone, as evaluation harnesses ask; streamed, the echo chunk
/// carries the same scores.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn echo_with_logprobs_scores_the_prompt() {
    let dir = tempfile::tempdir().unwrap();
    let n = node(dir.path(), true).await;
    let app = || hearth_server::router(n.clone());
    let model = n.model_name().unwrap();
    let local = hearth_models::LocalModel::load(
        &n.model_path().unwrap(),
        hearth_models::Precision::Quantized,
    )
    .unwrap();
    let prompt: Vec<u32> = vec![5, 17, 99, 3, 42, 8, 64, 23, 11];
    let want: Vec<f64> = (1..prompt.len())
        .map(|i| {
            let row = local.prompt_logits(&prompt[..i]).unwrap();
            let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
            let sum: f64 = row.iter().map(|&v| (v as f64 - max).exp()).sum();
            row[prompt[i] as usize] as f64 - max - sum.ln()
        })
        .collect();
    let echo_text = n.detokenize(&prompt);
    let check = |lp: &Value, from: usize| {
        let token_lps = lp["token_logprobs"].as_array().unwrap();
        assert!(token_lps[from].is_null(), "{lp}");
        for (i, w) in want.iter().enumerate() {
            let got = token_lps[from + i + 1].as_f64().unwrap();
            assert!((got - w).abs() < 1e-3, "token {}: {got} vs {w}", i + 1);
            let top = lp["top_logprobs"][from + i + 1].as_object().unwrap();
            assert!(!top.is_empty() && top.len() <= 2, "{top:?}");
            let best = top
                .values()
                .map(|v| v.as_f64().unwrap())
                .fold(f64::MIN, f64::max);
            assert!(best >= got - 1e-6);
        }
        let texts: String = lp["tokens"].as_array().unwrap()[from..from + prompt.len()]
            .iter()
            .map(|t| t.as_str().unwrap())
            .collect();
        assert_eq!(texts, echo_text);
        assert_eq!(lp["text_offset"][from], 0);
    };
    // The prompt alone.
    let r = post(
        app(),
        "/v1/completions",
        &json!({"model": model, "prompt": prompt,
        "echo": true, "logprobs": 2, "max_tokens": 0})
        .to_string(),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let v = r.json();
    assert_eq!(v["choices"][0]["text"], echo_text.as_str());
    assert_eq!(v["usage"]["completion_tokens"], 0);
    assert_eq!(v["usage"]["prompt_tokens"], prompt.len());
    let lp = &v["choices"][0]["logprobs"];
    assert_eq!(lp["tokens"].as_array().unwrap().len(), prompt.len());
    check(lp, 0);
    // With generated tokens after it: the prompt's scores, then theirs.
    let r = post(
        app(),
        "/v1/completions",
        &json!({"model": model, "prompt": prompt,
        "echo": true, "logprobs": 2, "max_tokens": 3, "temperature": 0})
        .to_string(),
    )
    .await;
    let v = r.json();
    let lp = &v["choices"][0]["logprobs"];
    assert_eq!(
        lp["tokens"].as_array().unwrap().len(),
        prompt.len() + 3,
        "{v}"
    );
    check(lp, 0);
    assert!(
        v["choices"][0]["text"]
            .as_str()
            .unwrap()
            .starts_with(&echo_text)
    );
    // Streamed: the echo chunk carries the scores.
    let r = post(
        app(),
        "/v1/completions",
        &json!({"model": model, "prompt": prompt,
        "echo": true, "logprobs": 2, "max_tokens": 3, "temperature": 0, "stream": true})
        .to_string(),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let frames: Vec<Value> = r
        .sse()
        .iter()
        .filter(|f| *f != "[DONE]")
        .map(|f| serde_json::from_str(f).unwrap())
        .collect();
    assert_eq!(frames[0]["choices"][0]["text"], echo_text.as_str());
    check(&frames[0]["choices"][0]["logprobs"], 0);
    // The first token ends the sequence (the end tokens pushed up): the
    // prompt's scores still come, with nothing generated after them.
    // (The tiny model's end token is id 2, as its GGUF says.)
    let bias = json!({"2": 100});
    let r = post(
        app(),
        "/v1/completions",
        &json!({"model": model, "prompt": prompt,
        "echo": true, "logprobs": 2, "max_tokens": 3, "temperature": 0, "logit_bias": bias})
        .to_string(),
    )
    .await;
    let v = r.json();
    assert_eq!(v["choices"][0]["finish_reason"], "stop", "{v}");
    let lp = &v["choices"][0]["logprobs"];
    assert_eq!(lp["tokens"].as_array().unwrap().len(), prompt.len(), "{v}");
    check(lp, 0);
    // A one-token prompt: itself, with no score.
    let r = post(
        app(),
        "/v1/completions",
        &json!({"model": model, "prompt": [prompt[0]],
        "echo": true, "logprobs": 1, "max_tokens": 0})
        .to_string(),
    )
    .await;
    let v = r.json();
    let lp = &v["choices"][0]["logprobs"];
    assert_eq!(lp["tokens"].as_array().unwrap().len(), 1, "{v}");
    assert!(lp["token_logprobs"][0].is_null(), "{v}");
    // max_tokens 0 is the prompt alone only with echo, and not streamed.
    for body in [
        json!({"model": model, "prompt": prompt, "max_tokens": 0}),
        json!({"model": model, "prompt": prompt, "echo": true, "max_tokens": 0, "stream": true}),
    ] {
        let r = post(app(), "/v1/completions", &body.to_string()).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.text());
        assert_eq!(r.error()["param"], "max_tokens");
    }
    n.shutdown().await;
}

/// Two members, one holding the models: the other lists them (with who
/// holds them, and facts from the holder's files) and serves one that a
/// request names, receiving what it needs from the holder; its answer is
/// a lone node's own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_only_a_member_holds_is_listed_and_served_from_any_member() {
    use hearth_test_utils::cluster::TestNode;
    let dir = tempfile::tempdir().unwrap();
    let spec = hearth_test_utils::TinySpec {
        context: CONTEXT,
        ..Default::default()
    };
    let mut held = TestModels::tiny_with(&dir.path().join("b"), spec.clone()).unwrap();
    let other = hearth_test_utils::tiny_model(
        &dir.path().join("q"),
        hearth_test_utils::TinySpec {
            architecture: "qwen3",
            ..Default::default()
        },
    )
    .unwrap();
    std::sync::Arc::get_mut(&mut held)
        .unwrap()
        .models
        .push(("other".into(), other.gguf_q4_1.clone()));
    let empty = std::sync::Arc::new(TestModels {
        models: Vec::new(),
        dir: dir.path().join("a"),
    });
    let (secret, net) = (
        ClusterSecret::generate(),
        hearth_discovery::MemoryNetwork::new(),
    );
    let start = |name: &str, models: std::sync::Arc<TestModels>| {
        TestNode::start_with(name, &secret, vec![Box::new(net.discovery())], move |c| {
            c.models = Some(models)
        })
        .unwrap()
    };
    let (a, b) = (start("a", empty), start("b", held));
    let t0 = std::time::Instant::now();
    while a.node.endpoint().peers().is_empty() || b.node.endpoint().peers().is_empty() {
        assert!(t0.elapsed() < Duration::from_secs(30), "the two never met");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let shared = App::new(a.node.clone(), ServerOptions::default());
    let app = || shared.router();
    // Listed on a, which holds nothing itself.
    let ids = model_ids(app()).await;
    for want in ["tiny", "other"] {
        assert!(ids.iter().any(|i| i == want), "{want} not in {ids:?}");
    }
    let listed = get(app(), "/api/models").await.json();
    assert_eq!(listed["node"], "a");
    let tiny = listed["available"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == "tiny")
        .unwrap_or_else(|| panic!("{listed}"))
        .clone();
    assert_eq!(tiny["holders"], json!(["b"]), "{tiny}");
    assert_eq!(tiny["download"], false);
    assert!(tiny["size_bytes"].as_u64().unwrap() > 0, "{tiny}");
    // Ollama's listing describes a member's model from the holder's file.
    let tags = get(shared.ollama_router(), "/api/tags").await.json();
    let q = tags["models"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == "other")
        .unwrap_or_else(|| panic!("{tags}"))
        .clone();
    assert_eq!(q["details"]["family"], "qwen3", "{q}");
    assert_eq!(q["details"]["quantization_level"], "Q4_1", "{q}");
    // A name nobody holds is refused at once.
    let r = post(
        app(),
        "/v1/chat/completions",
        &json!({"model": "nobody-has-it", "messages": [{"role": "user", "content": "Hi"}]})
            .to_string(),
    )
    .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND, "{}", r.text());
    assert_eq!(r.json()["error"]["code"], "model_not_found");
    // A chat on a naming b's model: the cluster loads it and answers.
    let body = json!({"model": "tiny", "temperature": 0, "max_tokens": 8,
        "messages": [{"role": "user", "content": "Hi"}]})
    .to_string();
    let r = post(app(), "/v1/chat/completions", &body).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let got = r.json()["choices"][0]["message"]["content"].clone();
    assert_eq!(a.node.model_name().as_deref(), Some("tiny"));
    assert_eq!(b.node.model_name().as_deref(), Some("tiny"));
    // a's copy is the holder's header and the tensors it needed, received.
    let copy = a.node.model_path().unwrap();
    assert!(
        copy.starts_with(dir.path().join("a").join("peers")),
        "{copy:?}"
    );
    // A lone node holding the same file answers the same.
    let lone = node_with(
        TestModels::tiny_with(&dir.path().join("c"), spec).unwrap(),
        true,
    )
    .await;
    let r = post(
        App::new(lone.clone(), ServerOptions::default()).router(),
        "/v1/chat/completions",
        &body,
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(r.json()["choices"][0]["message"]["content"], got);
    lone.shutdown().await;
    // Switching to b's other model through a: both serve it, a again from
    // what it received.
    let r = post(app(), "/api/models/load", r#"{"model":"other"}"#).await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.text());
    let t0 = std::time::Instant::now();
    while [&a, &b]
        .iter()
        .any(|n| n.node.placement().is_none_or(|p| p.model != "other"))
    {
        assert!(t0.elapsed() < Duration::from_secs(60), "never switched");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let r = post(
        app(),
        "/v1/chat/completions",
        &body.replace("tiny", "other"),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert!(
        a.node
            .model_path()
            .unwrap()
            .starts_with(dir.path().join("a").join("peers"))
    );
    a.shutdown();
    b.shutdown();
}

/// A LoRA fine-tune of the served model is listed and answered under its
/// own name beside the base (nothing reloads), and Ollama's routes describe
/// it as an adapter of the base; one of another base is neither listed
/// nor served, and says which base it needs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lora_fine_tune_is_served_beside_its_base_over_http() {
    let dir = tempfile::tempdir().unwrap();
    let tiny = hearth_test_utils::tiny_model(
        dir.path(),
        hearth_test_utils::TinySpec {
            context: CONTEXT,
            ..Default::default()
        },
    )
    .unwrap();
    let store = std::sync::Arc::new(hearth_test_utils::cluster::TunedStore {
        name: "tiny".into(),
        base: tiny.gguf_q8_0.clone(),
        dir: dir.path().join("store"),
    });
    let n = node_with(store.clone(), true).await;
    let placed = n.placement().unwrap();
    let content = n.model_content().unwrap();
    let w = hearth_models::WeightFile::open(&tiny.gguf_q8_0).unwrap();
    for (name, base) in [("ft-mine", content.as_str()), ("ft-other", &"0".repeat(32))] {
        let peft = dir.path().join(name);
        hearth_test_utils::write_random_peft(&peft, w.config(), 4).unwrap();
        hearth_runtime::adapters::register(&store.tuned(), name, &peft, base, "some-base").unwrap();
    }
    let shared = App::new(n.clone(), ServerOptions::default());
    let app = || shared.router();
    let ids = model_ids(app()).await;
    assert!(ids.contains(&"ft-mine".to_string()), "{ids:?}");
    assert!(!ids.contains(&"ft-other".to_string()), "{ids:?}");
    let ask = |model: &str| chat_body(json!({"model": model, "max_tokens": 4, "temperature": 0}));
    let r = post(app(), "/v1/chat/completions", &ask("ft-mine")).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(r.json()["model"], "ft-mine");
    let r = post(app(), "/v1/chat/completions", &ask("ft-other")).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.text());
    let e = r.error();
    assert!(
        e["message"]
            .as_str()
            .unwrap()
            .contains("LoRA adapter of some-base"),
        "{e}"
    );
    // Nothing was loaded in the base's place.
    assert_eq!(n.placement().map(|p| p.id), Some(placed.id));
    assert_eq!(n.model_name().as_deref(), Some("tiny"));
    let stats = n.stage_stats();
    assert_eq!(
        stats.iter().map(|s| s.adapters).sum::<usize>(),
        1,
        "{stats:?}"
    );
    // Ollama's routes: listed and shown as an adapter of the served base.
    let ollama = || shared.ollama_router();
    let tags = get(ollama(), "/api/tags").await.json();
    let entry = tags["models"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == "ft-mine")
        .cloned()
        .unwrap_or_else(|| panic!("{tags}"));
    assert_eq!(entry["details"]["parent_model"], "tiny", "{entry}");
    let show = post(
        ollama(),
        "/api/show",
        &json!({"model": "ft-mine"}).to_string(),
    )
    .await;
    assert_eq!(show.status, StatusCode::OK, "{}", show.text());
    assert_eq!(show.json()["details"]["parent_model"], "tiny");
    let show = post(
        ollama(),
        "/api/show",
        &json!({"model": "ft-other"}).to_string(),
    )
    .await;
    assert_eq!(show.status, StatusCode::NOT_FOUND, "{}", show.text());
    // Loading it by name: nothing to load for one of the served base; one
    // of another base without a merged file says which base it needs.
    assert!(n.load_model("ft-mine").await.unwrap().is_empty());
    let err = n.load_model("ft-other").await.unwrap_err().to_string();
    assert!(err.contains("load some-base"), "{err}");
    assert_eq!(n.placement().map(|p| p.id), Some(placed.id));
}
