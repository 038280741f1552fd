//! An Ollama-compatible API on its own address (`--ollama ADDR`), so its
//! paths do not collide with Hearth's own `/api`: `/api/chat`,
//! `/api/generate`, `/api/tags`, `/api/show`, `/api/ps`, `/api/version`,
//! with NDJSON streaming (Ollama's default) and Ollama's `options`.
//!
//! Requests are translated into the OpenAI request the `fields` module
//! reads, so they run the same way: the same sampling, structured output
//! (`format`), tools and chat template. The field rule holds here too: a
//! field or option Hearth would not honour is a 400 naming it.

use axum::Json;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use hearth_runtime::ModelFacts;
use hearth_runtime::pipeline::GenEvent;
use serde_json::{Map, Value, json};

use crate::fields;
use crate::openai::{self, Job, Kind, Started, collect, finish_reason};
use crate::{ApiJson, AppState, REQUEST_TIMEOUT};

/// The Ollama API version this listener follows.
pub const OLLAMA_VERSION: &str = "0.12.0";

/// Ollama's error shape.
fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(json!({"error": message.into()}))).into_response()
}

/// A 400 in Ollama's shape (boxed: it travels in `Result`s).
fn bad(message: impl Into<String>) -> Box<Response> {
    Box::new(error(StatusCode::BAD_REQUEST, message))
}

/// An OpenAI-shaped error response in Ollama's shape (same status).
async fn reshape(r: Response) -> Response {
    let status = r.status();
    let bytes = axum::body::to_bytes(r.into_body(), 64 * 1024)
        .await
        .unwrap_or_default();
    let v: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    let msg = v["error"]["message"]
        .as_str()
        .unwrap_or("the request failed")
        .to_string();
    error(status, msg)
}

/// Options Hearth honours, and those that only tune how a runtime uses the
/// hardware (accepted; Hearth places work by its own measurements).
const OPTIONS: &[&str] = &[
    "temperature",
    "top_p",
    "top_k",
    "num_predict",
    "stop",
    "seed",
    "presence_penalty",
    "frequency_penalty",
];
const HARDWARE_OPTIONS: &[&str] = &[
    "num_ctx",
    "num_thread",
    "num_gpu",
    "num_batch",
    "main_gpu",
    "use_mmap",
    "use_mlock",
    "numa",
    "low_vram",
];

/// Ollama's top-level fields each endpoint honours.
const CHAT: &[&str] = &[
    "model",
    "messages",
    "tools",
    "format",
    "options",
    "stream",
    "keep_alive",
    "think",
];
const GENERATE: &[&str] = &[
    "model",
    "prompt",
    "system",
    "format",
    "options",
    "stream",
    "keep_alive",
    "think",
    "raw",
];
/// Ollama fields Hearth refuses unless empty.
const REFUSED: &[&str] = &["images", "suffix", "template", "context"];

fn is_empty(v: &Value) -> bool {
    match v {
        Value::Null => true,
        Value::String(s) => s.is_empty(),
        Value::Array(a) => a.is_empty(),
        Value::Bool(b) => !b,
        _ => false,
    }
}

/// The common part: model, stream, format, options and think, into an
/// OpenAI body.
fn common(
    body: &mut Map<String, Value>,
    allowed: &[&str],
) -> Result<Map<String, Value>, Box<Response>> {
    let mut out = Map::new();
    for (k, v) in body.iter() {
        if allowed.contains(&k.as_str()) {
            continue;
        }
        if REFUSED.contains(&k.as_str()) && is_empty(v) {
            continue;
        }
        return Err(bad(format!("`{k}` is not supported by Hearth")));
    }
    let model = body.remove("model").unwrap_or(Value::Null);
    if !model.is_string() {
        return Err(bad("`model` is required"));
    }
    out.insert("model".into(), model);
    // Ollama streams unless told not to.
    let stream = match body.remove("stream") {
        None | Some(Value::Null) => true,
        Some(Value::Bool(b)) => b,
        Some(_) => return Err(bad("`stream` must be a boolean")),
    };
    out.insert("stream".into(), json!(stream));
    match body.remove("format") {
        None | Some(Value::Null) => {}
        Some(Value::String(s)) if s == "json" => {
            out.insert("response_format".into(), json!({"type": "json_object"}));
        }
        Some(Value::String(s)) if s.is_empty() => {}
        Some(schema @ Value::Object(_)) => {
            out.insert(
                "response_format".into(),
                json!({"type": "json_schema", "json_schema": {"name": "format", "schema": schema}}),
            );
        }
        Some(_) => {
            return Err(bad("`format` must be \"json\" or a JSON schema"));
        }
    }
    match body.remove("options") {
        None | Some(Value::Null) => {}
        Some(Value::Object(o)) => {
            for (k, v) in o {
                if HARDWARE_OPTIONS.contains(&k.as_str()) || v.is_null() {
                    continue;
                }
                if !OPTIONS.contains(&k.as_str()) {
                    return Err(bad(format!("option `{k}` is not supported by Hearth")));
                }
                match k.as_str() {
                    // -1: no limit; -2: fill the context. Both: up to the
                    // context.
                    "num_predict" => {
                        if v.as_i64().is_some_and(|n| n > 0) {
                            out.insert("max_tokens".into(), v);
                        } else if !v.as_i64().is_some_and(|n| n == -1 || n == -2) {
                            return Err(bad("option `num_predict` must be positive, -1 or -2"));
                        }
                    }
                    _ => {
                        out.insert(k, v);
                    }
                }
            }
        }
        Some(_) => {
            return Err(bad("`options` must be an object"));
        }
    }
    // keep_alive: Hearth keeps a served model loaded until another is
    // asked for; any duration is accepted.
    body.remove("keep_alive");
    if let Some(t) = body.remove("think").filter(|v| !v.is_null()) {
        let Some(t) = t.as_bool() else {
            return Err(bad("`think` must be a boolean"));
        };
        out.insert("chat_template_kwargs".into(), json!({"enable_thinking": t}));
    }
    Ok(out)
}

/// Ollama messages as OpenAI's: tool calls get ids, and a `tool` message
/// answers the earliest unanswered call of its tool.
fn messages(msgs: Vec<Value>) -> Result<Vec<Value>, Box<Response>> {
    let mut out = Vec::with_capacity(msgs.len());
    let mut open: Vec<(String, String)> = Vec::new();
    let mut next = 0;
    for (i, m) in msgs.into_iter().enumerate() {
        let Value::Object(mut m) = m else {
            return Err(bad(format!("messages[{i}] must be an object")));
        };
        if m.get("images").is_some_and(|v| !is_empty(v)) {
            return Err(bad(format!("messages[{i}].images are not supported")));
        }
        m.remove("images");
        m.remove("thinking");
        let role = m
            .get("role")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        if let Some(Value::Array(calls)) = m.remove("tool_calls") {
            let mut converted = Vec::with_capacity(calls.len());
            for c in calls {
                let f = &c["function"];
                let name = f["name"].as_str().unwrap_or_default().to_string();
                let id = format!("call_{next}");
                next += 1;
                open.push((id.clone(), name.clone()));
                let args = match &f["arguments"] {
                    Value::String(s) => s.clone(),
                    v => v.to_string(),
                };
                converted.push(json!({"id": id, "type": "function", "function": {"name": name, "arguments": args}}));
            }
            m.insert("tool_calls".into(), Value::Array(converted));
        }
        if role == "tool" {
            let name = m
                .remove("tool_name")
                .or_else(|| m.remove("name"))
                .and_then(|v| v.as_str().map(String::from));
            let at = match &name {
                Some(n) => open.iter().position(|(_, c)| c == n),
                None => (!open.is_empty()).then_some(0),
            };
            let id = match at {
                Some(k) => open.remove(k).0,
                None => {
                    next += 1;
                    format!("call_{}", next - 1)
                }
            };
            m.insert("tool_call_id".into(), json!(id));
            if let Some(n) = name {
                m.insert("name".into(), json!(n));
            }
        }
        out.push(Value::Object(m));
    }
    Ok(out)
}

fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

fn ns(secs: f64) -> u64 {
    (secs.max(0.0) * 1e9) as u64
}

pub(crate) async fn chat(
    State(s): State<AppState>,
    ApiJson(mut body): ApiJson<Map<String, Value>>,
) -> Response {
    let mut oa = match common(&mut body, CHAT) {
        Ok(o) => o,
        Err(r) => return *r,
    };
    let msgs = match body.remove("messages") {
        Some(Value::Array(a)) => a,
        _ => return error(StatusCode::BAD_REQUEST, "`messages` must be a list"),
    };
    match messages(msgs) {
        Ok(m) => oa.insert("messages".into(), Value::Array(m)),
        Err(r) => return *r,
    };
    if let Some(t) = body.remove("tools").filter(|t| !t.is_null()) {
        oa.insert("tools".into(), t);
    }
    let c = match fields::chat(oa) {
        Ok(c) => c,
        Err(e) => return error(StatusCode::BAD_REQUEST, e.0),
    };
    run(s, Job::chat(c, Kind::Chat)).await
}

pub(crate) async fn generate(
    State(s): State<AppState>,
    ApiJson(mut body): ApiJson<Map<String, Value>>,
) -> Response {
    let mut oa = match common(&mut body, GENERATE) {
        Ok(o) => o,
        Err(r) => return *r,
    };
    let prompt = match body.remove("prompt") {
        Some(Value::String(p)) => p,
        None | Some(Value::Null) => String::new(),
        Some(_) => return error(StatusCode::BAD_REQUEST, "`prompt` must be a string"),
    };
    let model = oa["model"].as_str().unwrap_or_default().to_string();
    // An empty prompt loads the model, as Ollama's does.
    if prompt.is_empty() {
        return match s.node.ensure_model(&model, std::time::Duration::from_secs(300)).await {
            Ok(_) => Json(json!({"model": model, "created_at": now_rfc3339(), "response": "", "done": true, "done_reason": "load"})).into_response(),
            Err(e) => error(StatusCode::NOT_FOUND, e.to_string()),
        };
    }
    let raw = body
        .remove("raw")
        .and_then(|v| v.as_bool())
        .unwrap_or(false);
    let system = body
        .remove("system")
        .and_then(|v| v.as_str().map(String::from));
    let (kind, prompt) = if raw {
        if system.is_some() {
            return error(StatusCode::BAD_REQUEST, "`system` does not go with `raw`");
        }
        oa.remove("chat_template_kwargs");
        (Kind::Text, hearth_runtime::pipeline::Prompt::Text(prompt))
    } else {
        let mut msgs = Vec::new();
        if let Some(sys) = system {
            msgs.push(json!({"role": "system", "content": sys}));
        }
        msgs.push(json!({"role": "user", "content": prompt}));
        oa.insert("messages".into(), Value::Array(msgs));
        let c = match fields::chat(oa) {
            Ok(c) => c,
            Err(e) => return error(StatusCode::BAD_REQUEST, e.0),
        };
        // Ollama's generate answers text, and parses no tool calls.
        let mut job = Job::chat(c, Kind::Text);
        job.tools = None;
        return run(s, job).await;
    };
    // Raw: the prompt as is (no template), through the completions reader.
    let fmt = oa.remove("response_format");
    oa.insert("prompt".into(), json!(""));
    let c = match fields::completion(oa) {
        Ok(c) => c,
        Err(e) => return error(StatusCode::BAD_REQUEST, e.0),
    };
    let grammar = match fmt.as_ref().map(fields::response_format).transpose() {
        Ok(g) => g.flatten(),
        Err(e) => return error(StatusCode::BAD_REQUEST, e.0),
    };
    let job = Job {
        kind,
        common: c.common,
        prompt,
        logprobs: None,
        grammar,
        tools: None,
        echo: None,
        score_prompt: false,
        prompt_only: false,
    };
    run(s, job).await
}

/// Runs a translated request and answers in Ollama's shape: one object, or
/// NDJSON lines ending with the one that says `done`.
async fn run(s: AppState, mut job: Job) -> Response {
    let arrived = std::time::Instant::now();
    let Started { streams, tools } = match openai::start(&s, &mut job).await {
        Ok(x) => x,
        Err(r) => return reshape(r).await,
    };
    let Some(rx) = streams.into_iter().next() else {
        return error(StatusCode::INTERNAL_SERVER_ERROR, "no generation started");
    };
    let model = job.common.model.clone();
    let chat = job.kind == Kind::Chat;
    let open = s.open_generation();
    let endpoint = if chat {
        "ollama_chat"
    } else {
        "ollama_generate"
    };
    // The last line: the message (with any tool calls) and the timings.
    let done = move |sum: &hearth_runtime::pipeline::GenSummary,
                     text: &str,
                     tools: Option<&(fields::Tools, hearth_models::tools::ToolFormat)>,
                     rest: &str|
          -> Value {
        let reason = finish_reason(sum.finish_reason);
        let mut v = json!({
            "model": sum.model,
            "created_at": now_rfc3339(),
            "done": true,
            "done_reason": reason,
            "total_duration": ns(arrived.elapsed().as_secs_f64()),
            "load_duration": 0,
            "prompt_eval_count": sum.prompt_tokens,
            "prompt_eval_duration": ns(sum.prefill_secs),
            "eval_count": sum.token_ids.len(),
            "eval_duration": ns(sum.decode_secs),
        });
        if chat {
            let (msg, _) = openai::chat_message(text, tools, reason);
            let mut m = json!({"role": "assistant", "content": rest});
            if let Some(calls) = msg["tool_calls"].as_array() {
                m["content"] = json!("");
                m["tool_calls"] = Value::Array(
                    calls
                        .iter()
                        .map(|c| {
                            let args: Value = c["function"]["arguments"]
                                .as_str()
                                .and_then(|a| serde_json::from_str(a).ok())
                                .unwrap_or(json!({}));
                            json!({"function": {"name": c["function"]["name"], "arguments": args}})
                        })
                        .collect(),
                );
            }
            v["message"] = m;
        } else {
            v["response"] = json!(rest);
        }
        v
    };
    if !job.common.stream {
        let r = tokio::time::timeout(REQUEST_TIMEOUT, collect(rx)).await;
        drop(open);
        return match r {
            Ok(Ok((sum, _))) => {
                s.metrics.finished(&sum, endpoint, arrived);
                Json(done(&sum, &sum.text, tools.as_ref(), &sum.text)).into_response()
            }
            Ok(Err(e)) => reshape(openai::pipeline_error(e)).await,
            Err(_) => error(StatusCode::GATEWAY_TIMEOUT, "the generation took too long"),
        };
    }
    let metrics = s.metrics.clone();
    let mut text = String::new();
    let mut sent = 0usize;
    let piece = move |model: &str, t: &str| -> Value {
        if chat {
            json!({"model": model, "created_at": now_rfc3339(), "message": {"role": "assistant", "content": t}, "done": false})
        } else {
            json!({"model": model, "created_at": now_rfc3339(), "response": t, "done": false})
        }
    };
    let line = |v: &Value| Bytes::from(format!("{v}\n"));
    let frames = crate::sse::frames(rx, s.shutdown.clone(), move |step| {
        let _open = &open;
        match step {
            crate::sse::Step::Event(GenEvent::Token { text: t, .. } | GenEvent::Text(t)) => {
                text.push_str(&t);
                let safe = match &tools {
                    Some((_, f)) => f.content_prefix(&text),
                    None => text.len(),
                };
                if safe > sent {
                    let p = text[sent..safe].to_string();
                    sent = safe;
                    return (vec![line(&piece(&model, &p))], false);
                }
                (Vec::new(), false)
            }
            // Never asked for here.
            crate::sse::Step::Event(GenEvent::Prompt { .. }) => (Vec::new(), false),
            crate::sse::Step::Event(GenEvent::Done(sum)) => {
                metrics.finished(&sum, endpoint, arrived);
                // What was held back and is content after all goes out
                // with the last line.
                let (msg, _) = openai::chat_message(&text, tools.as_ref(), "stop");
                let content = if chat {
                    msg["content"].as_str().unwrap_or_default().to_string()
                } else {
                    text.clone()
                };
                let rest = content.strip_prefix(&text[..sent]).unwrap_or_default();
                (vec![line(&done(&sum, &text, tools.as_ref(), rest))], true)
            }
            crate::sse::Step::Event(GenEvent::Failed(e)) => (
                vec![line(&json!({"error": format!("the pipeline failed: {e}")}))],
                true,
            ),
            crate::sse::Step::Closed => (
                vec![line(&json!({"error": "the generation ended early"}))],
                true,
            ),
            crate::sse::Step::Stopped => (
                vec![line(&json!({"error": "the server is shutting down"}))],
                true,
            ),
        }
    });
    (
        [(header::CONTENT_TYPE, "application/x-ndjson")],
        Body::from_stream(frames),
    )
        .into_response()
}

/// A model as `/api/tags` and `/api/ps` list it.
fn model_entry(name: &str, size: u64, facts: Option<&ModelFacts>) -> Value {
    json!({
        "name": name,
        "model": name,
        "modified_at": now_rfc3339(),
        "size": size,
        // Ollama writes digests as bare hex.
        "digest": facts
            .map(|f| f.digest.trim_start_matches("sha256:"))
            .unwrap_or_default(),
        "details": details(facts),
    })
}

/// The base model `name` is a LoRA adapter of, when that base is the
/// served model (it is then served beside it).
fn adapter_parent(
    s: &AppState,
    entries: &[hearth_runtime::ModelEntry],
    name: &str,
) -> Option<String> {
    let content = s.node.model_content()?;
    let a = entries.iter().find(|m| m.name == name)?.adapter.as_ref()?;
    (a.base_content == content)
        .then(|| s.node.model_name())
        .flatten()
}

/// Ollama's `details` of a model, from its file.
fn details(facts: Option<&ModelFacts>) -> Value {
    match facts {
        Some(f) => json!({
            "parent_model": "",
            "format": f.format,
            "family": f.architecture,
            "families": [f.architecture],
            "parameter_size": parameter_size(f.parameters),
            "quantization_level": f.quantization,
        }),
        None => json!({"parent_model": "", "format": "", "family": "", "families": null,
            "parameter_size": "", "quantization_level": ""}),
    }
}

/// A parameter count as Ollama writes it: `134.52M`, `7.2B`.
fn parameter_size(n: u64) -> String {
    let n = n as f64;
    if n >= 1e9 {
        format!("{:.1}B", n / 1e9)
    } else if n >= 1e6 {
        format!("{:.2}M", n / 1e6)
    } else {
        format!("{:.0}K", n / 1e3)
    }
}

/// Every model the cluster can serve as (name, size, facts from its file,
/// or from a member holding it), under the ids `/v1/models` uses.
async fn listed(s: &AppState) -> Vec<(String, u64, Option<ModelFacts>)> {
    let entries = s.node.cluster_models().await;
    let names = openai::servable_in(s, &entries);
    let node = s.node.clone();
    tokio::task::spawn_blocking(move || {
        let served = node.model_name().zip(node.model_path());
        names
            .into_iter()
            .map(|name| {
                let entry = entries.iter().find(|m| m.name == name);
                // The served model's own file, else the store's entry.
                let path = match &served {
                    Some((n, p)) if *n == name => Some(p.clone()),
                    _ => entry.and_then(|m| m.path.clone()),
                };
                let size = path
                    .as_deref()
                    .and_then(|p| std::fs::metadata(p).ok())
                    .filter(|m| m.is_file())
                    .map_or_else(
                        || entry.and_then(|m| m.size_bytes).unwrap_or(0),
                        |m| m.len(),
                    );
                let facts = path
                    .as_deref()
                    .and_then(hearth_runtime::model_facts)
                    .or_else(|| entry.and_then(|m| m.facts.clone()));
                (name, size, facts)
            })
            .collect()
    })
    .await
    .unwrap_or_default()
}

pub(crate) async fn tags(State(s): State<AppState>) -> Response {
    let entries = s.node.cluster_models().await;
    let base = served(&s).await.and_then(|(_, _, f)| f);
    let models: Vec<Value> = listed(&s)
        .await
        .iter()
        .map(
            |(name, size, facts)| match adapter_parent(&s, &entries, name) {
                // A LoRA fine-tune served beside its base: the base's facts,
                // with the base as its parent (as Ollama shows an adapter).
                Some(parent) => {
                    let mut e = model_entry(name, *size, base.as_ref());
                    e["details"]["parent_model"] = json!(parent);
                    e
                }
                None => model_entry(name, *size, facts.as_ref()),
            },
        )
        .collect();
    Json(json!({"models": models})).into_response()
}

/// The served model's name, file size and facts (from its own file).
async fn served(s: &AppState) -> Option<(String, u64, Option<ModelFacts>)> {
    let node = s.node.clone();
    tokio::task::spawn_blocking(move || {
        let name = node.model_name()?;
        let path = node.model_path();
        let size = path
            .as_deref()
            .and_then(|p| std::fs::metadata(p).ok())
            .filter(|m| m.is_file())
            .map_or(0, |m| m.len());
        let facts = path.as_deref().and_then(hearth_runtime::model_facts);
        Some((name, size, facts))
    })
    .await
    .ok()
    .flatten()
}

pub(crate) async fn ps(State(s): State<AppState>) -> Response {
    let models: Vec<Value> = served(&s)
        .await
        .iter()
        .map(|(name, size, facts)| {
            let mut e = model_entry(name, *size, facts.as_ref());
            e["expires_at"] = json!("9999-12-31T23:59:59Z");
            e["size_vram"] = json!(0);
            e
        })
        .collect();
    Json(json!({"models": models})).into_response()
}

pub(crate) async fn show(
    State(s): State<AppState>,
    ApiJson(body): ApiJson<Map<String, Value>>,
) -> Response {
    // The field rule: `verbose` (tokenizer arrays in `model_info`) is not
    // given, so only its absence or `false` passes; nothing else is read.
    for (k, v) in &body {
        let ok = match k.as_str() {
            "model" | "name" => true,
            "verbose" => is_empty(v),
            _ => false,
        };
        if !ok {
            return error(
                StatusCode::BAD_REQUEST,
                format!("`{k}` is not supported by Hearth"),
            );
        }
    }
    let Some(name) = body
        .get("model")
        .or_else(|| body.get("name"))
        .and_then(Value::as_str)
    else {
        return error(StatusCode::BAD_REQUEST, "`model` is required");
    };
    let listed = s.node.cluster_models().await;
    let parent = adapter_parent(&s, &listed, name);
    if s.node.model_name().as_deref() != Some(name) && parent.is_none() {
        return if listed.iter().any(|m| m.name == name && !m.download) {
            error(
                StatusCode::NOT_FOUND,
                format!("model '{name}' is not loaded; a request naming it loads it"),
            )
        } else {
            error(StatusCode::NOT_FOUND, format!("model '{name}' not found"))
        };
    }
    let Some(c) = s.node.model_config() else {
        return error(StatusCode::NOT_FOUND, format!("model '{name}' not found"));
    };
    let arch = &c.architecture;
    let facts = served(&s).await.and_then(|(_, _, f)| f);
    let mut details = details(facts.as_ref());
    if let Some(p) = parent {
        details["parent_model"] = json!(p);
    }
    Json(json!({
        "modelfile": "",
        "parameters": "",
        "template": s.node.chat_template_source().unwrap_or_default(),
        "details": details,
        "model_info": {
            "general.architecture": arch,
            format!("{arch}.context_length"): c.max_position_embeddings,
            format!("{arch}.embedding_length"): c.hidden_size,
            format!("{arch}.block_count"): c.num_hidden_layers,
            format!("{arch}.attention.head_count"): c.num_attention_heads,
            format!("{arch}.attention.head_count_kv"): c.num_key_value_heads,
            "tokenizer.ggml.vocab_size": c.vocab_size,
        },
        "capabilities": ["completion", "tools"],
        "modified_at": now_rfc3339(),
    }))
    .into_response()
}

pub(crate) async fn version() -> Response {
    Json(json!({"version": OLLAMA_VERSION})).into_response()
}

/// `HEAD /` and `GET /`: Ollama's liveness answer.
pub(crate) async fn root() -> &'static str {
    "Ollama is running"
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The Ollama document lists exactly the fields and options honoured
    /// (or refused unless empty), and every route the listener serves.
    #[test]
    fn the_ollama_document_lists_exactly_what_is_honoured() {
        let doc = crate::openapi::ollama_document(false);
        let props = |path: &str| -> Vec<String> {
            let mut v: Vec<String> =
                doc["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
                    ["properties"]
                    .as_object()
                    .unwrap()
                    .keys()
                    .cloned()
                    .collect();
            v.sort();
            v
        };
        let want = |fields: &[&str], refused: &[&str]| {
            let mut v: Vec<String> = fields
                .iter()
                .chain(refused)
                .map(|s| s.to_string())
                .collect();
            v.sort();
            v
        };
        assert_eq!(props("/api/chat"), want(CHAT, &["images"]));
        assert_eq!(props("/api/generate"), want(GENERATE, REFUSED));
        let mut options: Vec<String> = doc["paths"]["/api/chat"]["post"]["requestBody"]["content"]
            ["application/json"]["schema"]["properties"]["options"]["properties"]
            .as_object()
            .unwrap()
            .keys()
            .cloned()
            .collect();
        options.sort();
        assert_eq!(options, want(OPTIONS, HARDWARE_OPTIONS));
        let paths = doc["paths"].as_object().unwrap();
        assert_eq!(paths.len(), crate::openapi::OLLAMA_OPERATIONS.len());
        for (method, path) in crate::openapi::OLLAMA_OPERATIONS {
            assert!(paths[*path][*method].is_object(), "{method} {path}");
        }
    }
}
