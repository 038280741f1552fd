//! `POST /v1/responses`, OpenAI's Responses API, stateless: nothing is
//! stored, so `previous_response_id` and `store: true` are refused by name.
//! A request is translated into the chat request `fields` reads (input
//! items to messages, flat tools to chat tools, `text.format` to
//! `response_format`) and runs the same way; the reply is a `response`
//! object, or its typed server-sent events when streamed.

use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use hearth_models::tools::ToolFormat;
use hearth_runtime::pipeline::{GenEvent, GenSummary};
use serde_json::{Map, Value, json};

use crate::fields::{self, Invalid};
use crate::openai::{self, Job, Kind, Started, collect, new_id, now_s};
use crate::sse::{self, Step};
use crate::{ApiJson, AppState, REQUEST_TIMEOUT, api_error, bad_request};

/// Fields honoured.
pub const FIELDS: &[&str] = &[
    "model",
    "input",
    "instructions",
    "max_output_tokens",
    "temperature",
    "top_p",
    "stream",
    "tools",
    "tool_choice",
    "parallel_tool_calls",
    "text",
    "store",
    "metadata",
    "user",
    "safety_identifier",
    "prompt_cache_key",
    "service_tier",
    "truncation",
];
/// Fields refused unless null (or `false`, or empty).
pub const REFUSED: &[&str] = &[
    "previous_response_id",
    "conversation",
    "reasoning",
    "include",
    "background",
    "prompt",
    "max_tool_calls",
    "top_logprobs",
    "stream_options",
];

fn invalid(field: &str, msg: impl Into<String>) -> Invalid {
    Invalid(msg.into(), field.to_string())
}

/// Text of a content value: a string, or parts of `input_text` /
/// `output_text` / `text`.
fn text_of(v: &Value, at: &str) -> Result<String, Invalid> {
    match v {
        Value::String(s) => Ok(s.clone()),
        Value::Array(parts) => {
            let mut t = String::new();
            for p in parts {
                match (p["type"].as_str(), p["text"].as_str()) {
                    (Some("input_text" | "output_text" | "text"), Some(x)) => t.push_str(x),
                    _ => {
                        return Err(invalid(
                            "input",
                            format!("{at}: only text content parts are supported"),
                        ));
                    }
                }
            }
            Ok(t)
        }
        _ => Err(invalid("input", format!("{at}: content must be text"))),
    }
}

/// The request as the chat request it means.
fn translate(mut body: Map<String, Value>) -> Result<(Map<String, Value>, Value), Invalid> {
    for (k, v) in &body {
        if FIELDS.contains(&k.as_str()) {
            continue;
        }
        let empty =
            v.is_null() || *v == Value::Bool(false) || v.as_array().is_some_and(Vec::is_empty);
        if REFUSED.contains(&k.as_str()) {
            if empty {
                continue;
            }
            let why = if k == "previous_response_id" || k == "conversation" {
                "Hearth's Responses API is stateless (send the whole input)"
            } else {
                "not supported by Hearth"
            };
            return Err(invalid(k, format!("`{k}` is {why}")));
        }
        return Err(invalid(k, format!("unknown field `{k}`")));
    }
    for k in REFUSED {
        body.remove(*k);
    }
    let mut chat = Map::new();
    let mut messages = Vec::new();
    if let Some(i) = body.remove("instructions").filter(|v| !v.is_null()) {
        let Value::String(i) = i else {
            return Err(invalid("instructions", "`instructions` must be a string"));
        };
        messages.push(json!({"role": "system", "content": i}));
    }
    match body.remove("input") {
        Some(Value::String(s)) => messages.push(json!({"role": "user", "content": s})),
        Some(Value::Array(items)) => {
            for (n, item) in items.iter().enumerate() {
                let at = format!("input[{n}]");
                match item["type"].as_str().unwrap_or("message") {
                    "message" => {
                        let role = item["role"].as_str().unwrap_or("");
                        if !matches!(role, "user" | "assistant" | "system" | "developer") {
                            return Err(invalid(
                                "input",
                                format!("{at}: role {role:?} is not supported"),
                            ));
                        }
                        messages.push(
                            json!({"role": role, "content": text_of(&item["content"], &at)?}),
                        );
                    }
                    "function_call" => {
                        let call = json!({"id": item["call_id"], "type": "function",
                            "function": {"name": item["name"], "arguments": item["arguments"]}});
                        // Consecutive calls join one assistant turn.
                        match messages.last_mut() {
                            Some(m) if m["role"] == "assistant" && m["tool_calls"].is_array() => {
                                if let Some(a) = m["tool_calls"].as_array_mut() {
                                    a.push(call);
                                }
                            }
                            _ => messages.push(
                                json!({"role": "assistant", "content": null, "tool_calls": [call]}),
                            ),
                        }
                    }
                    "function_call_output" => {
                        let output = match &item["output"] {
                            Value::String(s) => s.clone(),
                            other => text_of(other, &at)?,
                        };
                        messages.push(json!({"role": "tool", "tool_call_id": item["call_id"], "content": output}));
                    }
                    other => {
                        return Err(invalid(
                            "input",
                            format!("{at}: item type {other:?} is not supported"),
                        ));
                    }
                }
            }
        }
        _ => {
            return Err(invalid(
                "input",
                "`input` must be a string or a list of items",
            ));
        }
    }
    chat.insert("messages".into(), Value::Array(messages));
    for k in [
        "model",
        "temperature",
        "top_p",
        "stream",
        "parallel_tool_calls",
        "metadata",
        "user",
        "safety_identifier",
        "prompt_cache_key",
        "service_tier",
    ] {
        if let Some(v) = body.remove(k) {
            chat.insert(k.into(), v);
        }
    }
    if let Some(m) = body.remove("max_output_tokens") {
        chat.insert("max_tokens".into(), m);
    }
    if let Some(s) = body.remove("store").filter(|v| !v.is_null())
        && s != Value::Bool(false)
    {
        return Err(invalid(
            "store",
            "Hearth does not store responses (store: true)",
        ));
    }
    if let Some(t) = body.remove("truncation").filter(|v| !v.is_null())
        && t != json!("disabled")
    {
        return Err(invalid(
            "truncation",
            "only truncation \"disabled\" is supported",
        ));
    }
    let tools = match body.remove("tools") {
        None | Some(Value::Null) => None,
        Some(Value::Array(t)) => Some(t),
        Some(_) => return Err(invalid("tools", "`tools` must be a list")),
    };
    if let Some(tools) = tools {
        let mut out = Vec::with_capacity(tools.len());
        for (i, t) in tools.into_iter().enumerate() {
            if t["type"] != "function" {
                return Err(invalid(
                    "tools",
                    format!("tools[{i}]: only function tools are supported"),
                ));
            }
            let mut f = Map::new();
            for k in ["name", "description", "parameters", "strict"] {
                if let Some(v) = t.get(k).filter(|v| !v.is_null()) {
                    f.insert(k.into(), v.clone());
                }
            }
            out.push(json!({"type": "function", "function": f}));
        }
        chat.insert("tools".into(), Value::Array(out));
    }
    if let Some(c) = body.remove("tool_choice").filter(|v| !v.is_null()) {
        let c = match c {
            Value::Object(o) if o.get("type").and_then(Value::as_str) == Some("function") => {
                json!({"type": "function", "function": {"name": o.get("name").cloned().unwrap_or(Value::Null)}})
            }
            other => other,
        };
        chat.insert("tool_choice".into(), c);
    }
    let text = body.remove("text").unwrap_or(Value::Null);
    if !(text.is_null() || text.is_object()) {
        return Err(invalid("text", "`text` must be an object"));
    }
    if let Some(k) = text
        .as_object()
        .and_then(|o| o.keys().find(|k| *k != "format" && *k != "verbosity"))
    {
        return Err(invalid("text", format!("text.{k} is not supported")));
    }
    if text
        .get("verbosity")
        .is_some_and(|v| !v.is_null() && *v != json!("medium"))
    {
        return Err(invalid("text", "text.verbosity is not supported"));
    }
    if let Some(f) = text.get("format").filter(|v| !v.is_null()) {
        let rf = match f["type"].as_str() {
            Some("json_schema") => json!({"type": "json_schema", "json_schema": {
                "name": f["name"], "schema": f["schema"], "strict": f["strict"]}}),
            _ => f.clone(),
        };
        chat.insert("response_format".into(), rf);
    }
    Ok((chat, text))
}

/// The `response` object.
#[allow(clippy::too_many_arguments)]
fn response_object(
    id: &str,
    created: u64,
    model: &str,
    status: &str,
    output: Vec<Value>,
    usage: Option<(usize, usize)>,
    incomplete: bool,
    text: &Value,
) -> Value {
    json!({
        "id": id,
        "object": "response",
        "created_at": created,
        "status": status,
        "error": null,
        "incomplete_details": if incomplete { json!({"reason": "max_output_tokens"}) } else { Value::Null },
        "model": model,
        "output": output,
        "parallel_tool_calls": true,
        "store": false,
        "text": if text.is_null() { json!({"format": {"type": "text"}}) } else { text.clone() },
        "usage": usage.map(|(i, o)| json!({
            "input_tokens": i,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": o,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": i + o,
        })),
    })
}

fn message_item(id: &str, text: &str, status: &str) -> Value {
    json!({"type": "message", "id": id, "status": status, "role": "assistant",
        "content": [{"type": "output_text", "text": text, "annotations": []}]})
}

/// The output items of a finished generation: a message and/or calls.
fn output_items(msg_id: &str, message: &Value) -> Vec<Value> {
    let mut items = Vec::new();
    if let Some(c) = message["content"].as_str().filter(|c| !c.is_empty()) {
        items.push(message_item(msg_id, c, "completed"));
    }
    for call in message["tool_calls"].as_array().into_iter().flatten() {
        items.push(json!({
            "type": "function_call",
            "id": new_id("fc"),
            "call_id": call["id"],
            "name": call["function"]["name"],
            "arguments": call["function"]["arguments"],
            "status": "completed",
        }));
    }
    items
}

pub(crate) async fn create(
    State(s): State<AppState>,
    ApiJson(body): ApiJson<Map<String, Value>>,
) -> Response {
    let arrived = std::time::Instant::now();
    let (chat, text_cfg) = match translate(body) {
        Ok(x) => x,
        Err(e) => return e.into_response(),
    };
    let c = match fields::chat(chat) {
        Ok(c) => c,
        // The chat reader names chat fields; say them as this API does.
        Err(Invalid(msg, field)) => {
            let field = match field.as_str() {
                "max_tokens" => "max_output_tokens",
                "response_format" => "text",
                "messages" => "input",
                f => f,
            };
            return bad_request(msg, Some(field));
        }
    };
    let mut job = Job::chat(c, Kind::Chat);
    let Started { streams, tools } = match openai::start(&s, &mut job).await {
        Ok(x) => x,
        Err(r) => return r,
    };
    let Some(rx) = streams.into_iter().next() else {
        return bad_request("nothing to generate".into(), None);
    };
    let (id, created, model) = (new_id("resp"), now_s(), job.common.model.clone());
    let msg_id = new_id("msg");
    let open = s.open_generation();
    let finished =
        move |sum: &GenSummary, text: &str, tools: Option<&(fields::Tools, ToolFormat)>| {
            let reason = openai::finish_reason(sum.finish_reason);
            let (message, _) = openai::chat_message(text, tools, reason);
            (message, reason == "length")
        };
    if !job.common.stream {
        let r = tokio::time::timeout(REQUEST_TIMEOUT, collect(rx)).await;
        drop(open);
        return match r {
            Ok(Ok((sum, _))) => {
                s.metrics.finished(&sum, "responses", arrived);
                let (message, incomplete) = finished(&sum, &sum.text, tools.as_ref());
                let status = if incomplete {
                    "incomplete"
                } else {
                    "completed"
                };
                Json(response_object(
                    &id,
                    created,
                    &model,
                    status,
                    output_items(&msg_id, &message),
                    Some((sum.prompt_tokens, sum.token_ids.len())),
                    incomplete,
                    &text_cfg,
                ))
                .into_response()
            }
            Ok(Err(e)) => openai::pipeline_error(e),
            Err(_) => api_error(
                StatusCode::GATEWAY_TIMEOUT,
                "server_error",
                "the response took too long".into(),
                None,
                Some("timeout"),
            ),
        };
    }
    // Streamed: typed events, each with its sequence number.
    let metrics = s.metrics.clone();
    let mut seq = 0u64;
    let mut event = move |kind: &str, mut data: Value| -> Bytes {
        data["type"] = json!(kind);
        data["sequence_number"] = json!(seq);
        seq += 1;
        Bytes::from(format!("event: {kind}\ndata: {data}\n\n"))
    };
    let mut text = String::new();
    let mut sent = 0usize;
    let mut started_msg = false;
    let mut first = true;
    let frames = sse::frames(rx, s.shutdown.clone(), move |step| {
        let _open = &open;
        let mut out = Vec::new();
        if first {
            first = false;
            let r = response_object(
                &id,
                created,
                &model,
                "in_progress",
                Vec::new(),
                None,
                false,
                &text_cfg,
            );
            out.push(event("response.created", json!({"response": r.clone()})));
            out.push(event("response.in_progress", json!({"response": r})));
        }
        let open_message = |out: &mut Vec<Bytes>, event: &mut dyn FnMut(&str, Value) -> Bytes| {
            out.push(event(
                "response.output_item.added",
                json!({"output_index": 0, "item": {"type": "message", "id": msg_id, "status": "in_progress", "role": "assistant", "content": []}}),
            ));
            out.push(event(
                "response.content_part.added",
                json!({"item_id": msg_id, "output_index": 0, "content_index": 0, "part": {"type": "output_text", "text": "", "annotations": []}}),
            ));
        };
        match step {
            Step::Event(GenEvent::Token { text: t, .. } | GenEvent::Text(t)) => {
                text.push_str(&t);
                let safe = match &tools {
                    Some((_, f)) => f.content_prefix(&text),
                    None => text.len(),
                };
                if safe > sent {
                    if !started_msg {
                        started_msg = true;
                        open_message(&mut out, &mut event);
                    }
                    let delta = text[sent..safe].to_string();
                    sent = safe;
                    out.push(event(
                        "response.output_text.delta",
                        json!({"item_id": msg_id, "output_index": 0, "content_index": 0, "delta": delta, "logprobs": []}),
                    ));
                }
                (out, false)
            }
            // Never asked for here.
            Step::Event(GenEvent::Prompt { .. }) => (Vec::new(), false),
            Step::Event(GenEvent::Done(sum)) => {
                metrics.finished(&sum, "responses", arrived);
                let (message, incomplete) = finished(&sum, &text, tools.as_ref());
                let content = message["content"].as_str().unwrap_or_default().to_string();
                let rest = content.strip_prefix(&text[..sent]).unwrap_or_default();
                if !rest.is_empty() {
                    if !started_msg {
                        started_msg = true;
                        open_message(&mut out, &mut event);
                    }
                    out.push(event(
                        "response.output_text.delta",
                        json!({"item_id": msg_id, "output_index": 0, "content_index": 0, "delta": rest, "logprobs": []}),
                    ));
                }
                let items = output_items(&msg_id, &message);
                let mut index = 0;
                if started_msg {
                    out.push(event(
                        "response.output_text.done",
                        json!({"item_id": msg_id, "output_index": 0, "content_index": 0, "text": content, "logprobs": []}),
                    ));
                    out.push(event(
                        "response.content_part.done",
                        json!({"item_id": msg_id, "output_index": 0, "content_index": 0, "part": {"type": "output_text", "text": content, "annotations": []}}),
                    ));
                    out.push(event(
                        "response.output_item.done",
                        json!({"output_index": 0, "item": message_item(&msg_id, &content, "completed")}),
                    ));
                    index = 1;
                }
                for item in items.iter().filter(|i| i["type"] == "function_call") {
                    let mut added = item.clone();
                    added["status"] = json!("in_progress");
                    added["arguments"] = json!("");
                    out.push(event(
                        "response.output_item.added",
                        json!({"output_index": index, "item": added}),
                    ));
                    out.push(event(
                        "response.function_call_arguments.delta",
                        json!({"item_id": item["id"], "output_index": index, "delta": item["arguments"]}),
                    ));
                    out.push(event(
                        "response.function_call_arguments.done",
                        json!({"item_id": item["id"], "output_index": index, "arguments": item["arguments"]}),
                    ));
                    out.push(event(
                        "response.output_item.done",
                        json!({"output_index": index, "item": item}),
                    ));
                    index += 1;
                }
                let status = if incomplete {
                    "incomplete"
                } else {
                    "completed"
                };
                let r = response_object(
                    &id,
                    created,
                    &model,
                    status,
                    items,
                    Some((sum.prompt_tokens, sum.token_ids.len())),
                    incomplete,
                    &text_cfg,
                );
                let kind = if incomplete {
                    "response.incomplete"
                } else {
                    "response.completed"
                };
                out.push(event(kind, json!({"response": r})));
                (out, true)
            }
            Step::Event(GenEvent::Failed(e)) => {
                let mut r = response_object(
                    &id,
                    created,
                    &model,
                    "failed",
                    Vec::new(),
                    None,
                    false,
                    &text_cfg,
                );
                r["error"] =
                    json!({"code": "server_error", "message": format!("the pipeline failed: {e}")});
                out.push(event("response.failed", json!({"response": r})));
                (out, true)
            }
            Step::Closed | Step::Stopped => {
                out.push(event(
                    "error",
                    json!({"code": "server_error", "message": "the generation ended early", "param": null}),
                ));
                (out, true)
            }
        }
    });
    sse::response(frames)
}
