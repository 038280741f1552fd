//! The OpenAI-compatible API: `GET /v1/models`, `POST /v1/chat/completions`
//! and `POST /v1/completions`, streamed (SSE ending in `[DONE]`) or not.
//!
//! Every request field is honoured or refused with a 400 naming it (see
//! `fields`): sampling with penalties and logit bias, `n` sequences batched
//! through the pipeline, log-probabilities, structured output
//! (`response_format`, enforced by constrained decoding), and tool calls
//! (rendered by the model's template, parsed from its output in the
//! template's format, forced by a grammar for `required` or a named tool).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use hearth_models::tools::{ToolCall, ToolFormat};
use hearth_models::{ChatInputs, FinishReason};
use hearth_proto::TokenLogprobs;
use hearth_runtime::pipeline::{
    GenEvent, GenStream, GenSummary, GenerateParams, PipelineError, Prompt,
};
use serde_json::{Map, Value, json};
use tokio::sync::mpsc;

use crate::fields::{self, Common, Invalid, Tools};

use crate::sse::{self, Step};
use crate::{ApiJson, AppState, REQUEST_TIMEOUT, api_error, bad_request};

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
/// fine-tunes) and what only other members hold, each under its one id; a
/// request naming another loads it.
pub(crate) async fn servable(s: &AppState) -> Vec<String> {
    servable_in(s, &s.node.cluster_models().await)
}

/// [`servable`] from the cluster's listing `listed`. A LoRA fine-tune is
/// listed while its base is served (it is served beside it), or when it
/// has a merged model file to load.
pub(crate) fn servable_in(s: &AppState, listed: &[hearth_runtime::ModelEntry]) -> Vec<String> {
    let mut ids: Vec<String> = served(s).into_iter().collect();
    let content = s.node.model_content();
    for m in listed.iter().cloned() {
        let adapter_ok = m.adapter.as_ref().is_none_or(|a| {
            m.has_model_file() || content.as_deref() == Some(a.base_content.as_str())
        });
        if !m.download && adapter_ok && !ids.contains(&m.name) {
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

impl IntoResponse for Invalid {
    fn into_response(self) -> Response {
        bad_request(self.0, Some(&self.1))
    }
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
pub(crate) enum Kind {
    Chat,
    Text,
}

/// One request's generations, as read.
pub(crate) struct Job {
    pub kind: Kind,
    pub common: Common,
    pub prompt: Prompt,
    pub logprobs: Option<u8>,
    pub grammar: Option<String>,
    pub tools: Option<Tools>,
    /// Completions' `echo`: the prompt's text before each choice's.
    pub echo: Option<String>,
    /// Completions' `echo` with `logprobs`: the prompt's tokens scored.
    pub score_prompt: bool,
    /// `echo` with `max_tokens: 0`: the generated token is dropped.
    pub prompt_only: bool,
}

impl Job {
    /// A read chat request's generations, answered as `kind`.
    pub(crate) fn chat(c: fields::Chat, kind: Kind) -> Self {
        Self {
            kind,
            common: c.common,
            prompt: Prompt::Chat(Box::new(c.inputs)),
            logprobs: c.logprobs,
            grammar: c.grammar,
            tools: c.tools,
            echo: None,
            score_prompt: false,
            prompt_only: false,
        }
    }
}

pub(crate) async fn chat(
    State(s): State<AppState>,
    ApiJson(body): ApiJson<Map<String, Value>>,
) -> Response {
    match fields::chat(body) {
        Ok(c) => run(s, Job::chat(c, Kind::Chat)).await,
        Err(e) => e.into_response(),
    }
}

pub(crate) async fn completions(
    State(s): State<AppState>,
    ApiJson(body): ApiJson<Map<String, Value>>,
) -> Response {
    let c = match fields::completion(body) {
        Ok(c) => c,
        Err(e) => return e.into_response(),
    };
    let (prompt, echo) = match c.prompt {
        Value::String(p) => (Prompt::Text(p.clone()), p),
        Value::Array(a) if a.len() == 1 && a[0].is_string() => {
            let p = a[0].as_str().unwrap_or_default().to_string();
            (Prompt::Text(p.clone()), p)
        }
        Value::Array(a) if !a.is_empty() && a.iter().all(|v| fields::index(v).is_some()) => {
            let ids: Option<Vec<u32>> = a
                .iter()
                .map(|v| fields::index(v).and_then(|x| u32::try_from(x).ok()))
                .collect();
            match ids {
                Some(ids) => {
                    let text = if c.echo {
                        s.node.detokenize(&ids)
                    } else {
                        String::new()
                    };
                    (Prompt::Tokens(ids), text)
                }
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
    let job = Job {
        kind: Kind::Text,
        common: c.common,
        prompt,
        logprobs: c.logprobs,
        grammar: None,
        tools: None,
        score_prompt: c.echo && c.logprobs.is_some(),
        prompt_only: c.prompt_only,
        echo: c.echo.then_some(echo),
    };
    run(s, job).await
}

/// How long a request waits for a model it asked for to be loaded.
const LOAD_WAIT: Duration = Duration::from_secs(300);

/// Makes `model` the served one: at once if it is, else by loading it from
/// the node's store (a fine-tuned model, say) and awaiting its placement.
async fn ensure_served(
    s: &AppState,
    model: &str,
) -> Result<Option<hearth_runtime::adapters::AdapterRef>, Response> {
    match s.node.ensure_model(model, LOAD_WAIT).await {
        Ok(adapter) => Ok(adapter),
        Err(hearth_runtime::RuntimeError::UnknownModel(_)) => Err(unknown_model(model)),
        Err(hearth_runtime::RuntimeError::BadRequest(m)) => {
            Err(crate::bad_request(m, Some("model")))
        }
        Err(e) => {
            tracing::debug!("ensure {model}: {e}");
            Err(pipeline_error(PipelineError::NotReady))
        }
    }
}

/// A generation's tokens with their log-probabilities, and its summary.
pub(crate) type Collected = (GenSummary, Vec<(u32, Option<TokenLogprobs>)>);

pub(crate) async fn collect(mut rx: GenStream) -> Result<Collected, PipelineError> {
    let mut tokens = Vec::new();
    while let Some(ev) = rx.recv().await {
        match ev {
            GenEvent::Token { id, logprobs, .. } => tokens.push((id, logprobs)),
            // A scored prompt's tokens come first (the first with none).
            GenEvent::Prompt { ids, logprobs } => {
                let scores = std::iter::once(None).chain(logprobs.into_iter().map(Some));
                tokens.extend(ids.into_iter().zip(scores));
            }
            GenEvent::Text(_) => {}
            GenEvent::Done(s) => return Ok((s, tokens)),
            GenEvent::Failed(e) => return Err(PipelineError::Failed(e)),
        }
    }
    Err(PipelineError::Failed("the generation ended early".into()))
}

pub(crate) fn finish_reason(f: FinishReason) -> &'static str {
    match f {
        FinishReason::Stop => "stop",
        FinishReason::Length => "length",
    }
}

/// Log-probabilities in the chat shape: one entry per token.
fn chat_logprob(node: &hearth_runtime::Node, id: u32, lp: &TokenLogprobs) -> Value {
    let mut ids = vec![id];
    ids.extend(lp.top.iter().map(|(t, _)| *t));
    let bytes = node.token_bytes(&ids);
    let entry = |b: &[u8], logprob: f32| {
        json!({
            "token": String::from_utf8_lossy(b),
            "logprob": finite(logprob),
            "bytes": b,
        })
    };
    let mut e = entry(&bytes[0], lp.logprob);
    e["top_logprobs"] = Value::Array(
        lp.top
            .iter()
            .zip(&bytes[1..])
            .map(|((_, l), b)| entry(b, *l))
            .collect(),
    );
    e
}

/// JSON has no -inf: a masked token's log-probability is written as
/// OpenAI writes its floor.
fn finite(lp: f32) -> f64 {
    if lp.is_finite() {
        f64::from(lp)
    } else {
        -9999.0
    }
}

/// Log-probabilities in the completions shape.
fn text_logprobs(
    node: &hearth_runtime::Node,
    tokens: &[(u32, Option<TokenLogprobs>)],
    offset: usize,
) -> Value {
    let ids: Vec<u32> = tokens.iter().map(|(t, _)| *t).collect();
    let texts = node.token_texts(&ids);
    // Offsets count characters of the returned text, as OpenAI's do; a
    // special token (a prompt's BOS) is not in that text.
    let mut at = offset;
    let mut offsets = Vec::with_capacity(texts.len());
    for t in &texts {
        offsets.push(at);
        if !node.is_special_token(t) {
            at += t.chars().count();
        }
    }
    let top: Vec<Value> = tokens
        .iter()
        .map(|(_, lp)| match lp {
            Some(lp) => {
                let alt: Vec<u32> = lp.top.iter().map(|(t, _)| *t).collect();
                let names = node.token_texts(&alt);
                let mut m = Map::new();
                for ((_, l), n) in lp.top.iter().zip(names) {
                    m.entry(n).or_insert(json!(finite(*l)));
                }
                Value::Object(m)
            }
            None => Value::Null,
        })
        .collect();
    json!({
        "tokens": texts,
        "token_logprobs": tokens.iter().map(|(_, lp)| lp.as_ref().map(|l| finite(l.logprob))).collect::<Vec<_>>(),
        "top_logprobs": top,
        "text_offset": offsets,
    })
}

/// A call as OpenAI returns it.
fn tool_call_json(c: &ToolCall) -> Value {
    json!({
        "id": new_id("call"),
        "type": "function",
        "function": {"name": c.name, "arguments": c.arguments},
    })
}

/// The message of a finished chat choice: content, or calls of the given
/// tools parsed from the output in the model's format.
pub(crate) fn chat_message(
    text: &str,
    tools: Option<&(Tools, ToolFormat)>,
    reason: &str,
) -> (Value, String) {
    if let Some((t, format)) = tools {
        let (content, mut calls) = format.parse(text, &t.names);
        if t.single {
            calls.truncate(1);
        }
        if !calls.is_empty() {
            let content = if content.trim().is_empty() {
                Value::Null
            } else {
                json!(content)
            };
            if t.legacy {
                let c = &calls[0];
                return (
                    json!({"role": "assistant", "content": content,
                        "function_call": {"name": c.name, "arguments": c.arguments}}),
                    "function_call".into(),
                );
            }
            let calls: Vec<Value> = calls.iter().map(tool_call_json).collect();
            // A named choice ends as OpenAI's does: `stop`.
            let reason = if t.named { "stop" } else { "tool_calls" };
            return (
                json!({"role": "assistant", "content": content, "tool_calls": calls}),
                reason.into(),
            );
        }
    }
    (
        json!({"role": "assistant", "content": text}),
        reason.to_string(),
    )
}

/// Checks what only the served model can: the output constraint compiles
/// and `logit_bias` names its tokens; each error names its field.
async fn check_for_model(s: &AppState, job: &Job) -> Result<(), Response> {
    if let Some(vocab) = s.node.vocab_size()
        && let Some((t, _)) = job
            .common
            .shaping
            .logit_bias
            .iter()
            .find(|(t, _)| *t as usize >= vocab)
    {
        return Err(bad_request(
            format!("logit_bias names token {t}, outside the model's vocabulary of {vocab}"),
            Some("logit_bias"),
        ));
    }
    if let Some(g) = &job.grammar
        && let Err(e) = s.node.check_grammar(g).await
    {
        let field = match &job.tools {
            Some(t) if t.forced.is_some() => "tool_choice",
            Some(t) if t.strict_auto => "tools",
            _ => "response_format",
        };
        return Err(bad_request(format!("{field}: {e}"), Some(field)));
    }
    Ok(())
}

/// For a template that does not show the model its tools: a system message
/// that does, asking for the bare JSON call the parser reads.
fn tools_prompt(inputs: &mut ChatInputs, tools: &[Value]) {
    let list: Vec<String> = tools.iter().map(|t| t["function"].to_string()).collect();
    let text = format!(
        "You can call these tools:\n{}\n\nTo call one, reply with only a JSON object {{\"name\": <tool name>, \"arguments\": <arguments object>}}.",
        list.join("\n")
    );
    if let Some(msgs) = inputs.messages.as_array_mut() {
        match msgs.first_mut() {
            Some(m) if m["role"] == "system" => {
                let old = m["content"].as_str().unwrap_or_default().to_string();
                m["content"] = json!(format!("{old}\n\n{text}"));
            }
            _ => msgs.insert(0, json!({"role": "system", "content": text})),
        }
    }
}

/// `tool_choice: auto` with strict tools: the grammar that lets the served
/// model answer or call in its own format, a call held to its schema.
fn strict_tools(s: &AppState, job: &mut Job) -> Result<(), Box<Response>> {
    let Some(t) = job.tools.as_ref().filter(|t| t.strict_auto) else {
        return Ok(());
    };
    let Some(format) = s.node.tool_format() else {
        return Ok(());
    };
    let node = s.node.clone();
    let g = hearth_models::tools::auto_grammar(
        format,
        &t.list,
        t.single,
        t.content.as_ref(),
        &|text| node.special_token_id(text),
    );
    if g.as_ref()
        .is_some_and(|g| g.len() > hearth_proto::limits::MAX_GRAMMAR)
    {
        return Err(Box::new(bad_request(
            format!(
                "the strict tools' schemas are over {} bytes",
                hearth_proto::limits::MAX_GRAMMAR
            ),
            Some("tools"),
        )));
    }
    job.grammar = g;
    Ok(())
}

/// The generations a read request asks for, started: the model served,
/// what only it can check checked, tools shown to it, and the `n`
/// sequences launched together (so the pipeline batches them; each seeded
/// `seed + i`, so a seed reproduces them all). With the tool format when
/// calls are to be parsed.
pub(crate) async fn start(s: &AppState, job: &mut Job) -> Result<Started, Response> {
    let adapter = ensure_served(s, &job.common.model).await?;
    strict_tools(s, job).map_err(|r| *r)?;
    check_for_model(s, job).await?;
    let tools = match (&job.tools, s.node.tool_format()) {
        (Some(t), Some(f)) => Some((t.clone(), f)),
        _ => None,
    };
    let renders_tools = s.node.template_renders_tools();
    if let (Prompt::Chat(inputs), Some(format)) = (&mut job.prompt, s.node.tool_format())
        && let Some(msgs) = inputs.messages.as_array_mut()
    {
        hearth_models::tools::fit_history(msgs, format, renders_tools);
    }
    if let (Some((t, _)), Prompt::Chat(inputs)) = (&tools, &mut job.prompt)
        && !renders_tools
    {
        tools_prompt(inputs, &t.list);
    }
    let common = &job.common;
    let max_tokens = common.max_tokens.unwrap_or(u32::MAX as usize);
    let mut streams = Vec::with_capacity(common.n);
    for i in 0..common.n {
        let mut sampling = common.sampling;
        sampling.seed = sampling.seed.wrapping_add(i as u64);
        let mut p = GenerateParams::new(
            job.prompt.clone(),
            max_tokens,
            sampling,
            common.stop.clone(),
        );
        p.shaping = common.shaping.clone();
        p.logprobs = job.logprobs;
        p.grammar = job.grammar.clone();
        p.special_text = tools.is_some();
        p.score_prompt = job.score_prompt;
        p.adapter = adapter.clone();
        streams.push(s.node.generate(p).await.map_err(pipeline_error)?);
    }
    Ok(Started { streams, tools })
}

/// A request's generations, running.
pub(crate) struct Started {
    pub streams: Vec<GenStream>,
    pub tools: Option<(Tools, ToolFormat)>,
}

async fn run(s: AppState, mut job: Job) -> Response {
    let arrived = std::time::Instant::now();
    let endpoint = match job.kind {
        Kind::Chat => "chat_completions",
        Kind::Text => "completions",
    };
    let Started { streams, tools } = match start(&s, &mut job).await {
        Ok(x) => x,
        Err(r) => return r,
    };
    let common = &job.common;
    let kind = job.kind;
    let (id, created, model) = (
        new_id(if kind == Kind::Chat {
            "chatcmpl"
        } else {
            "cmpl"
        }),
        now_s(),
        common.model.clone(),
    );
    // Counted open until the reply (or the stream) ends.
    let open = s.open_generation();
    let echo = job.echo.clone().unwrap_or_default();
    if !common.stream {
        let all = futures_util::future::join_all(streams.into_iter().map(collect));
        let results = match tokio::time::timeout(REQUEST_TIMEOUT, all).await {
            Ok(r) => r,
            Err(_) => {
                return api_error(
                    StatusCode::GATEWAY_TIMEOUT,
                    "server_error",
                    format!(
                        "the completion took longer than {} s",
                        REQUEST_TIMEOUT.as_secs()
                    ),
                    None,
                    Some("timeout"),
                );
            }
        };
        drop(open);
        let mut choices = Vec::with_capacity(results.len());
        let (mut prompt_tokens, mut completion_tokens) = (0, 0);
        for (i, r) in results.into_iter().enumerate() {
            let (mut sum, mut tokens) = match r {
                Ok(x) => x,
                Err(e) => return pipeline_error(e),
            };
            s.metrics.finished(&sum, endpoint, arrived);
            prompt_tokens = sum.prompt_tokens;
            if job.prompt_only {
                // The prompt alone: its one generated token is dropped.
                sum.text.clear();
                sum.token_ids.clear();
                sum.finish_reason = FinishReason::Length;
                tokens.truncate(if job.score_prompt { prompt_tokens } else { 0 });
            }
            completion_tokens += sum.token_ids.len();
            let reason = finish_reason(sum.finish_reason);
            let choice = match kind {
                Kind::Chat => {
                    let (message, reason) = chat_message(&sum.text, tools.as_ref(), reason);
                    let logprobs = job.logprobs.map(|_| {
                        json!({"content": tokens.iter().filter_map(|(t, lp)| lp.as_ref().map(|lp| chat_logprob(&s.node, *t, lp))).collect::<Vec<_>>(), "refusal": null})
                    });
                    json!({"index": i, "message": message, "logprobs": logprobs, "finish_reason": reason})
                }
                Kind::Text => {
                    // A scored prompt's tokens lead the list, from offset 0.
                    let offset = if job.score_prompt {
                        0
                    } else {
                        echo.chars().count()
                    };
                    let logprobs = job
                        .logprobs
                        .map(|_| text_logprobs(&s.node, &tokens, offset));
                    json!({"index": i, "text": format!("{echo}{}", sum.text), "logprobs": logprobs, "finish_reason": reason})
                }
            };
            choices.push(choice);
        }
        return Json(json!({
            "id": id,
            "object": if kind == Kind::Chat { "chat.completion" } else { "text_completion" },
            "created": created,
            "model": model,
            "system_fingerprint": null,
            "choices": choices,
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            },
        }))
        .into_response();
    }
    // Streamed: the choices' events merged, each tagged with its index;
    // dropping the merged stream (the client left) drops every generation.
    let n = streams.len();
    let (merged_tx, merged_rx) = mpsc::channel::<(usize, GenEvent)>(256);
    for (i, mut rx) in streams.into_iter().enumerate() {
        let tx = merged_tx.clone();
        tokio::spawn(async move {
            while let Some(ev) = rx.recv().await {
                let last = matches!(ev, GenEvent::Done(_) | GenEvent::Failed(_));
                if tx.send((i, ev)).await.is_err() || last {
                    break;
                }
            }
        });
    }
    drop(merged_tx);
    let include_usage = common.include_usage;
    let metrics = s.metrics.clone();
    let node = s.node.clone();
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
    struct Choice {
        /// The output so far, and how much of it went out as content.
        text: String,
        sent: usize,
        started: bool,
        done: bool,
    }
    let mut states: Vec<Choice> = (0..n)
        .map(|_| Choice {
            text: String::new(),
            sent: 0,
            started: false,
            done: false,
        })
        .collect();
    // Prompt and completion tokens over the choices.
    let mut totals = [0usize; 2];
    let want_logprobs = job.logprobs.is_some();
    let frames = sse::frames(merged_rx, s.shutdown.clone(), move |step| {
        let _open = &open;
        let mut out = Vec::new();
        let error = |msg: String, code: &str| {
            sse::data(
                &json!({"error": {"message": msg, "type": "server_error", "param": null, "code": code}}),
            )
        };
        let (i, ev) = match step {
            Step::Event(x) => x,
            Step::Closed => {
                out.push(error(
                    "the generation ended early".into(),
                    "pipeline_failed",
                ));
                out.push(Bytes::from_static(sse::DONE.as_bytes()));
                return (out, true);
            }
            Step::Stopped => {
                out.push(error("the server is shutting down".into(), "shutting_down"));
                out.push(Bytes::from_static(sse::DONE.as_bytes()));
                return (out, true);
            }
        };
        let Some(st) = states.get_mut(i) else {
            return (out, false);
        };
        if !st.started {
            st.started = true;
            // The echo, with its tokens' scores when they came first.
            let scored = match &ev {
                GenEvent::Prompt { ids, logprobs } if want_logprobs => {
                    let scores = std::iter::once(None).chain(logprobs.iter().cloned().map(Some));
                    let tokens: Vec<(u32, Option<TokenLogprobs>)> =
                        ids.iter().copied().zip(scores).collect();
                    Some(text_logprobs(&node, &tokens, 0))
                }
                _ => None,
            };
            match kind {
                Kind::Chat => out.push(chunk(
                    json!({"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": null, "finish_reason": null}),
                    None,
                )),
                Kind::Text if !echo.is_empty() => out.push(chunk(
                    json!({"index": i, "text": echo, "logprobs": scored, "finish_reason": null}),
                    None,
                )),
                Kind::Text => {}
            }
        }
        let piece = |text: &str, lp: Option<Value>| -> Value {
            match kind {
                Kind::Chat => {
                    json!({"index": i, "delta": {"content": text}, "logprobs": lp.map(|l| json!({"content": [l], "refusal": null})), "finish_reason": null})
                }
                Kind::Text => {
                    json!({"index": i, "text": text, "logprobs": lp, "finish_reason": null})
                }
            }
        };
        match ev {
            GenEvent::Token { id, text, logprobs } => {
                let offset = echo.chars().count() + st.text.chars().count();
                st.text.push_str(&text);
                let safe = match &tools {
                    Some((_, f)) => f.content_prefix(&st.text),
                    None => st.text.len(),
                };
                let new = if safe > st.sent {
                    let t = st.text[st.sent..safe].to_string();
                    st.sent = safe;
                    t
                } else {
                    String::new()
                };
                let lp = logprobs.filter(|_| want_logprobs).map(|lp| match kind {
                    Kind::Chat => chat_logprob(&node, id, &lp),
                    Kind::Text => text_logprobs(&node, &[(id, Some(lp))], offset),
                });
                if !new.is_empty() || lp.is_some() {
                    out.push(chunk(piece(&new, lp), None));
                }
                (out, false)
            }
            GenEvent::Text(text) => {
                st.text.push_str(&text);
                (out, false)
            }
            // Sent with the echo above.
            GenEvent::Prompt { .. } => (out, false),
            GenEvent::Done(sum) => {
                metrics.finished(&sum, endpoint, arrived);
                totals[0] = sum.prompt_tokens;
                totals[1] += sum.token_ids.len();
                let reason = finish_reason(sum.finish_reason);
                let (message, reason) = match kind {
                    Kind::Chat => chat_message(&st.text, tools.as_ref(), reason),
                    Kind::Text => (json!({"content": st.text}), reason.to_string()),
                };
                let content = message["content"].as_str().unwrap_or_default();
                // What was held back (a possible stop string or call) and
                // turned out to be content. (Parsed content keeps the text
                // before a call as it was, so it extends what went out.)
                if let Some(rest) = content.strip_prefix(&st.text[..st.sent])
                    && !rest.is_empty()
                {
                    out.push(chunk(piece(rest, None), None));
                }
                let mut end = match kind {
                    Kind::Chat => {
                        json!({"index": i, "delta": {}, "logprobs": null, "finish_reason": reason})
                    }
                    Kind::Text => {
                        json!({"index": i, "text": "", "logprobs": null, "finish_reason": reason})
                    }
                };
                if let Some(calls) = message["tool_calls"].as_array() {
                    let deltas: Vec<Value> = calls
                        .iter()
                        .enumerate()
                        .map(|(k, c)| {
                            let mut c = c.clone();
                            c["index"] = json!(k);
                            c
                        })
                        .collect();
                    out.push(chunk(
                        json!({"index": i, "delta": {"tool_calls": deltas}, "logprobs": null, "finish_reason": null}),
                        None,
                    ));
                } else if let Some(fc) = message.get("function_call") {
                    out.push(chunk(
                        json!({"index": i, "delta": {"function_call": fc}, "logprobs": null, "finish_reason": null}),
                        None,
                    ));
                }
                end["finish_reason"] = json!(reason);
                out.push(chunk(end, None));
                st.done = true;
                if states.iter().all(|c| c.done) {
                    if include_usage {
                        out.push(chunk(
                            Value::Null,
                            Some(json!({
                                "prompt_tokens": totals[0],
                                "completion_tokens": totals[1],
                                "total_tokens": totals[0] + totals[1],
                            })),
                        ));
                    }
                    out.push(Bytes::from_static(sse::DONE.as_bytes()));
                    return (out, true);
                }
                (out, false)
            }
            GenEvent::Failed(e) => {
                out.push(error(
                    format!("the pipeline failed: {e}"),
                    "pipeline_failed",
                ));
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
