//! The OpenAI-compatible API: `GET /v1/models`, `POST /v1/chat/completions`
//! and `POST /v1/completions`, streamed (SSE ending in `[DONE]`) or not.
//!
//! Unknown request fields are ignored (clients send many); known fields
//! are checked, and what Hearth cannot honour (`n` > 1, logprobs, tools,
//! images) is a 400 naming the field rather than a silent difference.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use hearth_models::{FinishReason, Message, SamplingParams};
use hearth_runtime::pipeline::{
    GenEvent, GenSummary, GenerateParams, PipelineError, Prompt, finish,
};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::sse::{self, Step};
use crate::{ApiJson, AppState, REQUEST_TIMEOUT, api_error, bad_request};

/// Tokens generated when the request sets no limit.
pub const DEFAULT_MAX_TOKENS: usize = 512;
/// Most stop sequences a request may give (as OpenAI).
pub const MAX_STOP: usize = 4;

pub(crate) fn now_s() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

pub(crate) fn new_id(prefix: &str) -> String {
    use rand::RngCore;
    let mut b = [0u8; 12];
    rand::rng().fill_bytes(&mut b);
    let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!("{prefix}-{hex}")
}

/// The model this node's cluster serves, if any.
fn served(s: &AppState) -> Option<String> {
    s.node.model_name()
}

fn model_object(id: &str) -> Value {
    json!({"id": id, "object": "model", "created": 0, "owned_by": "hearth"})
}

/// Every model the cluster can serve by name: the served one first, then
/// what this node holds (its model store, the Hugging Face cache, its
/// fine-tunes), each under its one id; a request naming another loads it.
async fn servable(s: &AppState) -> Vec<String> {
    let node = s.node.clone();
    let listed = tokio::task::spawn_blocking(move || node.available_models())
        .await
        .unwrap_or_default();
    let mut ids: Vec<String> = served(s).into_iter().collect();
    for m in listed {
        if !m.download && !ids.contains(&m.name) {
            ids.push(m.name);
        }
    }
    ids
}

pub(crate) async fn models(State(s): State<AppState>) -> Json<Value> {
    let data: Vec<Value> = servable(&s).await.iter().map(|m| model_object(m)).collect();
    Json(json!({"object": "list", "data": data}))
}

pub(crate) async fn model(State(s): State<AppState>, Path(id): Path<String>) -> Response {
    if servable(&s).await.contains(&id) {
        return Json(model_object(&id)).into_response();
    }
    unknown_model(&id)
}

fn unknown_model(id: &str) -> Response {
    api_error(
        StatusCode::NOT_FOUND,
        "invalid_request_error",
        format!("the model `{id}` does not exist on this cluster (GET /v1/models lists it)"),
        Some("model"),
        Some("model_not_found"),
    )
}

/// A field the request got wrong: the message and the field's name.
pub(crate) struct Invalid(String, &'static str);

impl IntoResponse for Invalid {
    fn into_response(self) -> Response {
        bad_request(self.0, Some(self.1))
    }
}

/// `stop`: one string or a list.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Stop {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Default, Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

/// The sampling fields both endpoints share.
#[derive(Debug, Deserialize)]
struct Sampling {
    model: String,
    #[serde(default)]
    stream: bool,
    #[serde(default)]
    stream_options: Option<StreamOptions>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    /// Hearth's extension (not in OpenAI's API).
    #[serde(default, deserialize_with = "integer")]
    top_k: Option<usize>,
    #[serde(default, deserialize_with = "integer")]
    max_tokens: Option<usize>,
    #[serde(default, deserialize_with = "integer")]
    max_completion_tokens: Option<usize>,
    stop: Option<Stop>,
    #[serde(default, deserialize_with = "integer")]
    seed: Option<u64>,
    #[serde(default, deserialize_with = "integer")]
    n: Option<u32>,
    #[serde(default)]
    logprobs: Option<Value>,
    #[serde(default)]
    tools: Option<Value>,
}

/// An optional non-negative integer, also written as an integral float
/// (`16.0`), as JSON Schema's `integer` allows.
fn integer<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: TryFrom<u64>,
{
    use serde::de::Error;
    let Some(v) = Option::<Value>::deserialize(d)? else {
        return Ok(None);
    };
    let int = index(&v)
        .ok_or_else(|| D::Error::custom(format!("expected a non-negative integer, got {v}")))?;
    T::try_from(int)
        .map(Some)
        .map_err(|_| D::Error::custom(format!("{int} is out of range")))
}

/// A non-negative integer, also written as an integral float.
fn index(v: &Value) -> Option<u64> {
    v.as_u64().or_else(|| {
        v.as_f64()
            .filter(|f| *f >= 0.0 && f.fract() == 0.0 && *f < u64::MAX as f64)
            .map(|f| f as u64)
    })
}

impl Sampling {
    /// Checks the fields and builds the generation's parameters.
    fn params(&self, prompt: Prompt) -> Result<GenerateParams, Invalid> {
        let temperature = self.temperature.unwrap_or(1.0);
        if !(0.0..=2.0).contains(&temperature) {
            return Err(Invalid(
                format!("temperature must be between 0 and 2, got {temperature}"),
                "temperature",
            ));
        }
        let top_p = self.top_p.unwrap_or(1.0);
        if !(top_p > 0.0 && top_p <= 1.0) {
            return Err(Invalid(
                format!("top_p must be in (0, 1], got {top_p}"),
                "top_p",
            ));
        }
        if self.n.is_some_and(|n| n != 1) {
            return Err(Invalid("only n = 1 is supported".into(), "n"));
        }
        if self
            .logprobs
            .as_ref()
            .is_some_and(|v| !v.is_null() && *v != json!(false))
        {
            return Err(Invalid("logprobs are not supported".into(), "logprobs"));
        }
        if self.tools.as_ref().is_some_and(|v| !v.is_null()) {
            return Err(Invalid("tools are not supported".into(), "tools"));
        }
        let max_tokens = self
            .max_completion_tokens
            .or(self.max_tokens)
            .unwrap_or(DEFAULT_MAX_TOKENS);
        if max_tokens == 0 {
            return Err(Invalid(
                "max_tokens must be at least 1".into(),
                "max_tokens",
            ));
        }
        let stop = match &self.stop {
            None => Vec::new(),
            Some(Stop::One(s)) => vec![s.clone()],
            Some(Stop::Many(v)) => v.clone(),
        };
        if stop.len() > MAX_STOP || stop.iter().any(String::is_empty) {
            return Err(Invalid(
                format!("stop takes at most {MAX_STOP} non-empty strings"),
                "stop",
            ));
        }
        Ok(GenerateParams {
            prompt,
            max_tokens,
            sampling: SamplingParams {
                temperature,
                top_p,
                top_k: self.top_k.unwrap_or(0),
                seed: self.seed.unwrap_or_else(rand::random),
            },
            stop,
        })
    }

    fn include_usage(&self) -> bool {
        self.stream_options
            .as_ref()
            .is_some_and(|o| o.include_usage)
    }
}

#[derive(Debug, Deserialize)]
pub(crate) struct ChatRequest {
    messages: Vec<ChatMessage>,
    #[serde(flatten)]
    sampling: Sampling,
}

#[derive(Debug, Deserialize)]
struct ChatMessage {
    role: String,
    #[serde(default)]
    content: Value,
}

/// OpenAI's message content: a string, or a list of text parts.
fn message(i: usize, m: ChatMessage) -> Result<Message, Invalid> {
    let role = match m.role.as_str() {
        "system" | "developer" => "system",
        "user" => "user",
        "assistant" => "assistant",
        other => {
            return Err(Invalid(
                format!("messages[{i}]: role {other:?} is not supported (system, user, assistant)"),
                "messages",
            ));
        }
    };
    let content = match m.content {
        Value::String(s) => s,
        Value::Array(parts) => {
            let mut text = String::new();
            for p in parts {
                match (p.get("type").and_then(Value::as_str), p.get("text")) {
                    (Some("text"), Some(Value::String(t))) => text.push_str(t),
                    _ => {
                        return Err(Invalid(
                            format!("messages[{i}]: only text content parts are supported"),
                            "messages",
                        ));
                    }
                }
            }
            text
        }
        Value::Null if role == "assistant" => String::new(),
        _ => {
            return Err(Invalid(
                format!("messages[{i}]: content must be a string or a list of text parts"),
                "messages",
            ));
        }
    };
    Ok(Message::new(role, content))
}

fn finish_reason(f: FinishReason) -> &'static str {
    match f {
        FinishReason::Stop => "stop",
        FinishReason::Length => "length",
    }
}

fn usage(s: &GenSummary) -> Value {
    json!({
        "prompt_tokens": s.prompt_tokens,
        "completion_tokens": s.token_ids.len(),
        "total_tokens": s.prompt_tokens + s.token_ids.len(),
    })
}

pub(crate) fn pipeline_error(e: PipelineError) -> Response {
    let (status, kind, code) = match &e {
        PipelineError::BadRequest(_) => (StatusCode::BAD_REQUEST, "invalid_request_error", None),
        PipelineError::Busy(_) => (
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limit_error",
            Some("rate_limit_exceeded"),
        ),
        PipelineError::NotReady | PipelineError::NoModel => (
            StatusCode::SERVICE_UNAVAILABLE,
            "server_error",
            Some("model_not_ready"),
        ),
        PipelineError::Failed(_) => (
            StatusCode::BAD_GATEWAY,
            "server_error",
            Some("pipeline_failed"),
        ),
    };
    api_error(status, kind, e.to_string(), None, code)
}

/// Which of the two endpoints is answering.
#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Chat,
    Text,
}

pub(crate) async fn chat(
    State(s): State<AppState>,
    ApiJson(req): ApiJson<ChatRequest>,
) -> Response {
    if req.messages.is_empty() {
        return bad_request("messages must not be empty".into(), Some("messages"));
    }
    let mut msgs = Vec::with_capacity(req.messages.len());
    for (i, m) in req.messages.into_iter().enumerate() {
        match message(i, m) {
            Ok(m) => msgs.push(m),
            Err(e) => return e.into_response(),
        }
    }
    run(s, Kind::Chat, &req.sampling, Prompt::Chat(msgs)).await
}

#[derive(Debug, Deserialize)]
pub(crate) struct CompletionRequest {
    prompt: Value,
    #[serde(flatten)]
    sampling: Sampling,
    #[serde(default)]
    echo: bool,
    suffix: Option<String>,
    best_of: Option<u32>,
}

pub(crate) async fn completions(
    State(s): State<AppState>,
    ApiJson(req): ApiJson<CompletionRequest>,
) -> Response {
    if req.echo || req.suffix.is_some() || req.best_of.is_some_and(|b| b != 1) {
        return bad_request(
            "echo, suffix and best_of are not supported".into(),
            Some("echo"),
        );
    }
    let prompt = match req.prompt {
        Value::String(p) => Prompt::Text(p),
        Value::Array(a) if a.len() == 1 && a[0].is_string() => {
            Prompt::Text(a[0].as_str().unwrap_or_default().to_string())
        }
        Value::Array(a) if !a.is_empty() && a.iter().all(|v| index(v).is_some()) => {
            let ids: Option<Vec<u32>> = a
                .iter()
                .map(|v| index(v).and_then(|x| u32::try_from(x).ok()))
                .collect();
            match ids {
                Some(ids) => Prompt::Tokens(ids),
                None => return bad_request("token id out of range".into(), Some("prompt")),
            }
        }
        _ => {
            return bad_request(
                "prompt must be a string, a list of one string, or a list of token ids".into(),
                Some("prompt"),
            );
        }
    };
    run(s, Kind::Text, &req.sampling, prompt).await
}

/// How long a request waits for a model it asked for to be loaded.
const LOAD_WAIT: Duration = Duration::from_secs(300);

/// Makes `model` the served one: at once if it is, else by loading it from
/// the node's store (a fine-tuned model, say) and awaiting its placement.
async fn ensure_served(s: &AppState, model: &str) -> Result<(), Response> {
    match s.node.ensure_model(model, LOAD_WAIT).await {
        Ok(()) => Ok(()),
        Err(hearth_runtime::RuntimeError::UnknownModel(_)) => Err(unknown_model(model)),
        Err(e) => {
            tracing::debug!("ensure {model}: {e}");
            Err(pipeline_error(PipelineError::NotReady))
        }
    }
}

async fn run(s: AppState, kind: Kind, sampling: &Sampling, prompt: Prompt) -> Response {
    if let Err(r) = ensure_served(&s, &sampling.model).await {
        return r;
    }
    let params = match sampling.params(prompt) {
        Ok(p) => p,
        Err(e) => return e.into_response(),
    };
    let mut rx = match s.node.generate(params).await {
        Ok(rx) => rx,
        Err(e) => return pipeline_error(e),
    };
    let (id, created, model) = (
        new_id(if kind == Kind::Chat {
            "chatcmpl"
        } else {
            "cmpl"
        }),
        now_s(),
        sampling.model.clone(),
    );
    // Counted open until the reply (or the stream) ends.
    let open = s.open_generation();
    if !sampling.stream {
        return match tokio::time::timeout(REQUEST_TIMEOUT, finish(&mut rx)).await {
            Ok(Ok(sum)) => {
                s.metrics.finished(&sum);
                let choice = match kind {
                    Kind::Chat => json!({
                        "index": 0,
                        "message": {"role": "assistant", "content": sum.text},
                        "logprobs": null,
                        "finish_reason": finish_reason(sum.finish_reason),
                    }),
                    Kind::Text => json!({
                        "index": 0,
                        "text": sum.text,
                        "logprobs": null,
                        "finish_reason": finish_reason(sum.finish_reason),
                    }),
                };
                Json(json!({
                    "id": id,
                    "object": if kind == Kind::Chat { "chat.completion" } else { "text_completion" },
                    "created": created,
                    "model": model,
                    "system_fingerprint": null,
                    "choices": [choice],
                    "usage": usage(&sum),
                }))
                .into_response()
            }
            Ok(Err(e)) => pipeline_error(e),
            Err(_) => api_error(
                StatusCode::GATEWAY_TIMEOUT,
                "server_error",
                format!(
                    "the completion took longer than {} s",
                    REQUEST_TIMEOUT.as_secs()
                ),
                None,
                Some("timeout"),
            ),
        };
    }
    let include_usage = sampling.include_usage();
    let metrics = s.metrics.clone();
    let object = if kind == Kind::Chat {
        "chat.completion.chunk"
    } else {
        "text_completion"
    };
    let chunk = move |choice: Value, usage: Option<Value>| -> Bytes {
        let mut c = json!({
            "id": id,
            "object": object,
            "created": created,
            "model": model,
            "system_fingerprint": null,
            "choices": if choice.is_null() { json!([]) } else { json!([choice]) },
        });
        if include_usage {
            c["usage"] = usage.unwrap_or(Value::Null);
        }
        sse::data(&c)
    };
    let piece = move |text: &str, reason: Option<&str>| -> Value {
        match kind {
            Kind::Chat => {
                json!({"index": 0, "delta": if reason.is_some() { json!({}) } else { json!({"content": text}) }, "logprobs": null, "finish_reason": reason})
            }
            Kind::Text => {
                json!({"index": 0, "text": text, "logprobs": null, "finish_reason": reason})
            }
        }
    };
    let mut first = kind == Kind::Chat;
    let frames = sse::frames(rx, s.shutdown.clone(), move |step| {
        let _open = &open;
        let mut out = Vec::new();
        if first {
            first = false;
            out.push(chunk(
                json!({"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": null, "finish_reason": null}),
                None,
            ));
        }
        match step {
            Step::Event(GenEvent::Token { text, .. } | GenEvent::Text(text)) => {
                if !text.is_empty() {
                    out.push(chunk(piece(&text, None), None));
                }
                (out, false)
            }
            Step::Event(GenEvent::Done(sum)) => {
                metrics.finished(&sum);
                out.push(chunk(
                    piece("", Some(finish_reason(sum.finish_reason))),
                    None,
                ));
                if include_usage {
                    out.push(chunk(Value::Null, Some(usage(&sum))));
                }
                out.push(Bytes::from_static(sse::DONE.as_bytes()));
                (out, true)
            }
            Step::Event(GenEvent::Failed(e)) => {
                out.push(sse::data(&json!({"error": {
                    "message": format!("the pipeline failed: {e}"),
                    "type": "server_error", "param": null, "code": "pipeline_failed"}})));
                out.push(Bytes::from_static(sse::DONE.as_bytes()));
                (out, true)
            }
            Step::Stopped => {
                out.push(sse::data(&json!({"error": {
                    "message": "the server is shutting down",
                    "type": "server_error", "param": null, "code": "shutting_down"}})));
                out.push(Bytes::from_static(sse::DONE.as_bytes()));
                (out, true)
            }
        }
    });
    sse::response(frames)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_or_unready_pipelines_ask_clients_to_retry() {
        for (e, status) in [
            (PipelineError::Busy(256), StatusCode::TOO_MANY_REQUESTS),
            (PipelineError::NotReady, StatusCode::SERVICE_UNAVAILABLE),
            (PipelineError::NoModel, StatusCode::SERVICE_UNAVAILABLE),
        ] {
            let r = pipeline_error(e);
            assert_eq!(r.status(), status);
            assert_eq!(r.headers()["retry-after"], "2");
        }
        let r = pipeline_error(PipelineError::Failed("x".into()));
        assert_eq!(r.status(), StatusCode::BAD_GATEWAY);
        assert!(!r.headers().contains_key("retry-after"));
        let r = pipeline_error(PipelineError::BadRequest("x".into()));
        assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    }
}
