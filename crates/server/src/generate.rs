//! `POST /api/generate`: Hearth's own generation endpoint over the
//! cluster's pipeline. With `"stream": true` the answer is NDJSON, one
//! event per line: `{"token": id, "text": "..."}` as tokens come, then
//! `{"done": {...}}` or `{"error": "..."}`. Otherwise one JSON summary.

use axum::Json;
use axum::body::Body;
use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use hearth_models::{ChatInputs, Message, SamplingParams};
use hearth_runtime::Node;
use hearth_runtime::pipeline::{GenEvent, GenerateParams, Prompt, finish};
use serde::Deserialize;
use serde_json::json;

use crate::openai::pipeline_error;
use crate::{ApiJson, bad_request};

/// The request body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct GenerateBody {
    /// Plain text, sent as is.
    #[serde(default)]
    prompt: Option<String>,
    /// Chat messages, rendered by the model's template.
    #[serde(default)]
    messages: Option<Vec<Message>>,
    /// Token ids.
    #[serde(default)]
    prompt_ids: Option<Vec<u32>>,
    #[serde(default = "default_max_tokens")]
    max_tokens: usize,
    #[serde(default)]
    temperature: f32,
    #[serde(default = "one")]
    top_p: f32,
    #[serde(default)]
    top_k: usize,
    #[serde(default)]
    seed: u64,
    #[serde(default)]
    stop: Vec<String>,
    #[serde(default)]
    stream: bool,
}

fn default_max_tokens() -> usize {
    256
}

fn one() -> f32 {
    1.0
}

pub(crate) async fn generate(
    State(node): State<Node>,
    ApiJson(b): ApiJson<GenerateBody>,
) -> Response {
    let prompt = match (b.prompt, b.messages, b.prompt_ids) {
        (Some(p), None, None) => Prompt::Text(p),
        (None, Some(m), None) => Prompt::Chat(Box::new(ChatInputs::from_messages(&m, true))),
        (None, None, Some(ids)) => Prompt::Tokens(ids),
        _ => {
            return bad_request(
                "give exactly one of prompt, messages, prompt_ids".into(),
                None,
            );
        }
    };
    let params = GenerateParams::new(
        prompt,
        b.max_tokens,
        SamplingParams {
            temperature: b.temperature,
            top_p: b.top_p,
            top_k: b.top_k,
            seed: b.seed,
        },
        b.stop,
    );
    let mut rx = match node.generate(params).await {
        Ok(rx) => rx,
        Err(e) => return pipeline_error(e),
    };
    if !b.stream {
        return match finish(&mut rx).await {
            Ok(s) => Json(s).into_response(),
            Err(e) => pipeline_error(e),
        };
    }
    // Dropping the body (the client went away) drops `rx`: that cancels.
    let lines = futures_util::stream::unfold(Some(rx), |rx| async move {
        let mut rx = rx?;
        let ev = rx.recv().await?;
        let (line, last) = match ev {
            GenEvent::Token { id, text, .. } => (json!({"token": id, "text": text}), false),
            GenEvent::Text(text) => (json!({"text": text}), false),
            // Not asked for here.
            GenEvent::Prompt { .. } => (json!({"text": ""}), false),
            GenEvent::Done(s) => (json!({"done": s}), true),
            GenEvent::Failed(e) => (json!({"error": e}), true),
        };
        let mut bytes = line.to_string().into_bytes();
        bytes.push(b'\n');
        let next = if last { None } else { Some(rx) };
        Some((Ok::<_, std::convert::Infallible>(bytes), next))
    });
    (
        [(header::CONTENT_TYPE, "application/x-ndjson")],
        Body::from_stream(lines),
    )
        .into_response()
}
