//! Reading OpenAI requests under one rule: **a request field is either
//! honoured or refused with a 400 that names it.** Every field of OpenAI's
//! chat and completions schemas is in [`CHAT_FIELDS`]/[`COMPLETION_FIELDS`]
//! (honoured) or in [`CHAT_REFUSED`]/[`COMPLETION_REFUSED`] (a 400 unless it
//! is null or `false`); any other field is a 400 naming it too.
//! Hearth's extensions (`top_k`, `chat_template_kwargs`, `documents`) are
//! listed with the honoured fields.

use hearth_models::grammar;
use hearth_models::{ChatInputs, SamplingParams, Shaping};
use hearth_proto::limits;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value, json};

/// A field the request got wrong: the message and the field's name.
#[derive(Debug)]
pub(crate) struct Invalid(pub String, pub String);

fn invalid(field: &str, msg: impl Into<String>) -> Invalid {
    Invalid(msg.into(), field.to_string())
}

/// Chat fields Hearth honours.
pub const CHAT_FIELDS: &[&str] = &[
    "messages",
    "model",
    "stream",
    "stream_options",
    "temperature",
    "top_p",
    "top_k",
    "max_tokens",
    "max_completion_tokens",
    "stop",
    "seed",
    "n",
    "presence_penalty",
    "frequency_penalty",
    "logit_bias",
    "logprobs",
    "top_logprobs",
    "response_format",
    "tools",
    "tool_choice",
    "parallel_tool_calls",
    "functions",
    "function_call",
    "modalities",
    "store",
    "service_tier",
    "user",
    "safety_identifier",
    "prompt_cache_key",
    "metadata",
    "chat_template_kwargs",
    "documents",
];

/// Chat fields of OpenAI's schema Hearth cannot honour: a 400 unless null
/// (or `false`).
pub const CHAT_REFUSED: &[&str] = &[
    "audio",
    "prediction",
    "reasoning_effort",
    "verbosity",
    "web_search_options",
];

/// Completion fields Hearth honours.
pub const COMPLETION_FIELDS: &[&str] = &[
    "prompt",
    "model",
    "stream",
    "stream_options",
    "temperature",
    "top_p",
    "top_k",
    "max_tokens",
    "stop",
    "seed",
    "n",
    "best_of",
    "presence_penalty",
    "frequency_penalty",
    "logit_bias",
    "logprobs",
    "echo",
    "user",
];

/// Completion fields Hearth cannot honour (fill-in-the-middle).
pub const COMPLETION_REFUSED: &[&str] = &["suffix"];

/// Most tools one request may give.
pub const MAX_TOOLS: usize = 128;
/// Most sequences one request may ask for.
pub const MAX_N: usize = 8;

/// The body's fields, taken one by one so an error names its field.
pub(crate) struct Fields(Map<String, Value>);

impl Fields {
    /// Checks every field is one Hearth honours.
    pub(crate) fn check(
        body: Map<String, Value>,
        honoured: &[&str],
        refused: &[&str],
    ) -> Result<Self, Invalid> {
        for (k, v) in &body {
            if honoured.contains(&k.as_str()) {
                continue;
            }
            if refused.contains(&k.as_str()) {
                if v.is_null() || *v == Value::Bool(false) {
                    continue;
                }
                return Err(invalid(k, format!("`{k}` is not supported by Hearth")));
            }
            return Err(invalid(
                k,
                format!("unknown field `{k}` (Hearth refuses fields it would not honour)"),
            ));
        }
        Ok(Self(body))
    }

    /// The field's value, `None` when absent or null.
    pub(crate) fn take<T: DeserializeOwned>(&mut self, name: &str) -> Result<Option<T>, Invalid> {
        match self.0.remove(name) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => serde_json::from_value(v)
                .map(Some)
                .map_err(|e| invalid(name, format!("`{name}`: {e}"))),
        }
    }

    fn raw(&mut self, name: &str) -> Option<Value> {
        self.0.remove(name).filter(|v| !v.is_null())
    }
}

/// A non-negative integer, also written as an integral float (`16.0`).
pub(crate) fn index(v: &Value) -> Option<u64> {
    v.as_u64().or_else(|| {
        v.as_f64()
            .filter(|f| *f >= 0.0 && f.fract() == 0.0 && *f < u64::MAX as f64)
            .map(|f| f as u64)
    })
}

fn int(f: &mut Fields, name: &str) -> Result<Option<u64>, Invalid> {
    match f.raw(name) {
        None => Ok(None),
        Some(v) => index(&v)
            .map(Some)
            .ok_or_else(|| invalid(name, format!("`{name}` must be a non-negative integer"))),
    }
}

/// What both endpoints share.
#[derive(Debug)]
pub(crate) struct Common {
    pub model: String,
    pub stream: bool,
    pub include_usage: bool,
    pub sampling: SamplingParams,
    pub max_tokens: Option<usize>,
    pub stop: Vec<String>,
    pub n: usize,
    pub shaping: Shaping,
}

/// Most stop sequences a request may give (as OpenAI).
pub const MAX_STOP: usize = 4;

pub(crate) fn common(f: &mut Fields, chat: bool) -> Result<Common, Invalid> {
    let model: String = f
        .take("model")?
        .ok_or_else(|| invalid("model", "`model` is required"))?;
    let stream = f.take::<bool>("stream")?.unwrap_or(false);
    let mut include_usage = false;
    if let Some(o) = f.take::<Map<String, Value>>("stream_options")? {
        for (k, v) in o {
            match (k.as_str(), v) {
                ("include_usage", Value::Bool(b)) => include_usage = b,
                ("include_obfuscation", Value::Bool(false) | Value::Null) => {}
                (k, _) => {
                    return Err(invalid(
                        "stream_options",
                        format!("stream_options.{k} is not supported"),
                    ));
                }
            }
        }
        if !stream {
            return Err(invalid(
                "stream_options",
                "stream_options is only allowed with stream: true",
            ));
        }
    }
    let temperature = f.take::<f32>("temperature")?.unwrap_or(1.0);
    if !(0.0..=2.0).contains(&temperature) {
        return Err(invalid(
            "temperature",
            format!("temperature must be between 0 and 2, got {temperature}"),
        ));
    }
    let top_p = f.take::<f32>("top_p")?.unwrap_or(1.0);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(invalid(
            "top_p",
            format!("top_p must be in (0, 1], got {top_p}"),
        ));
    }
    let top_k = int(f, "top_k")?.unwrap_or(0) as usize;
    let seed = int(f, "seed")?;
    let mut max_tokens = int(f, "max_tokens")?;
    if chat && let Some(m) = int(f, "max_completion_tokens")? {
        max_tokens = Some(m);
    }
    let max_tokens = max_tokens.map(|m| m.min(u32::MAX as u64) as usize);
    if max_tokens == Some(0) {
        return Err(invalid("max_tokens", "max_tokens must be at least 1"));
    }
    let stop = match f.raw("stop") {
        None => Vec::new(),
        Some(Value::String(s)) => vec![s],
        Some(Value::Array(a)) => a
            .into_iter()
            .map(|v| match v {
                Value::String(s) => Ok(s),
                _ => Err(invalid(
                    "stop",
                    "stop must be a string or a list of strings",
                )),
            })
            .collect::<Result<_, _>>()?,
        Some(_) => {
            return Err(invalid(
                "stop",
                "stop must be a string or a list of strings",
            ));
        }
    };
    if stop.len() > MAX_STOP || stop.iter().any(String::is_empty) {
        return Err(invalid(
            "stop",
            format!("stop takes at most {MAX_STOP} non-empty strings"),
        ));
    }
    let n = int(f, "n")?.unwrap_or(1) as usize;
    if n == 0 || n > MAX_N {
        return Err(invalid("n", format!("n must be between 1 and {MAX_N}")));
    }
    let mut shaping = Shaping::default();
    for (name, slot) in [
        ("presence_penalty", &mut shaping.presence_penalty),
        ("frequency_penalty", &mut shaping.frequency_penalty),
    ] {
        let v = f.take::<f32>(name)?.unwrap_or(0.0);
        if !(-2.0..=2.0).contains(&v) {
            return Err(invalid(
                name,
                format!("{name} must be between -2 and 2, got {v}"),
            ));
        }
        *slot = v;
    }
    if let Some(bias) = f.take::<Map<String, Value>>("logit_bias")? {
        if bias.len() > limits::MAX_LOGIT_BIAS {
            return Err(invalid(
                "logit_bias",
                format!("logit_bias takes at most {} tokens", limits::MAX_LOGIT_BIAS),
            ));
        }
        for (k, v) in bias {
            let t: u32 = k.parse().map_err(|_| {
                invalid(
                    "logit_bias",
                    format!("logit_bias key {k:?} is not a token id"),
                )
            })?;
            let b = v
                .as_f64()
                .filter(|b| (-100.0..=100.0).contains(b))
                .ok_or_else(|| {
                    invalid(
                        "logit_bias",
                        format!("logit_bias of {k} must be between -100 and 100"),
                    )
                })?;
            shaping.logit_bias.push((t, b as f32));
        }
    }
    // Hints that do not change what is generated; checked for shape.
    let _: Option<String> = f.take("user")?;
    if chat {
        let _: Option<String> = f.take("safety_identifier")?;
        let _: Option<String> = f.take("prompt_cache_key")?;
        let _: Option<Map<String, Value>> = f.take("metadata")?;
        if f.take::<bool>("store")? == Some(true) {
            return Err(invalid(
                "store",
                "Hearth does not store completions (store: true)",
            ));
        }
        if let Some(t) = f.take::<String>("service_tier")?
            && !matches!(t.as_str(), "auto" | "default")
        {
            return Err(invalid(
                "service_tier",
                format!("service_tier {t:?} is not offered"),
            ));
        }
        if let Some(m) = f.take::<Vec<String>>("modalities")?
            && m.iter().any(|m| m != "text")
        {
            return Err(invalid("modalities", "only the text modality is supported"));
        }
    }
    Ok(Common {
        model,
        stream,
        include_usage,
        sampling: SamplingParams {
            temperature,
            top_p,
            top_k,
            seed: seed.unwrap_or_else(rand::random),
        },
        max_tokens,
        stop,
        n,
        shaping,
    })
}

/// How tools take part in a chat.
#[derive(Debug, Clone)]
pub(crate) struct Tools {
    /// OpenAI's `tools` list (legacy `functions` wrapped as tools).
    pub list: Vec<Value>,
    /// Calls are parsed from the output (`tool_choice` not `none`).
    pub parse: bool,
    /// At most one call (`parallel_tool_calls: false`, or a named choice).
    pub single: bool,
    /// The legacy `functions` API: the reply is a `function_call`.
    pub legacy: bool,
    /// The grammar a forced choice (`required`, or a named function) sets.
    pub forced: Option<String>,
    /// The choice names one function.
    pub named: bool,
    /// The tools' names (a parsed call must name one).
    pub names: Vec<String>,
    /// `tool_choice: auto` with a `strict` tool: a call the model starts
    /// is held to its schema (the grammar is built for the served model's
    /// format when the request starts).
    pub strict_auto: bool,
    /// With `strict_auto`: the schema an answer that is not a call must
    /// meet (the request's `response_format`), if any.
    pub content: Option<Value>,
}

/// A chat request, read.
#[derive(Debug)]
pub(crate) struct Chat {
    pub common: Common,
    pub inputs: ChatInputs,
    pub logprobs: Option<u8>,
    pub grammar: Option<String>,
    pub tools: Option<Tools>,
}

pub(crate) fn chat(body: Map<String, Value>) -> Result<Chat, Invalid> {
    let mut f = Fields::check(body, CHAT_FIELDS, CHAT_REFUSED)?;
    let messages: Vec<Value> = f
        .take("messages")?
        .ok_or_else(|| invalid("messages", "`messages` is required"))?;
    if messages.is_empty() {
        return Err(invalid("messages", "messages must not be empty"));
    }
    let common = common(&mut f, true)?;
    let logprobs = f.take::<bool>("logprobs")?.unwrap_or(false);
    let top = int(&mut f, "top_logprobs")?;
    let logprobs = match (logprobs, top) {
        (false, None) => None,
        (false, Some(_)) => {
            return Err(invalid("top_logprobs", "top_logprobs needs logprobs: true"));
        }
        (true, t) => {
            let t = t.unwrap_or(0);
            if t > limits::MAX_TOP_LOGPROBS as u64 {
                return Err(invalid(
                    "top_logprobs",
                    format!("top_logprobs must be at most {}", limits::MAX_TOP_LOGPROBS),
                ));
            }
            Some(t as u8)
        }
    };
    let rf: Option<Value> = f.take("response_format")?;
    let mut grammar = match &rf {
        None => None,
        Some(rf) => response_format(rf)?,
    };
    let rf_schema = rf.as_ref().and_then(response_schema);
    let mut tools = tools(&mut f)?;
    if let Some(t) = tools.as_mut().filter(|t| t.strict_auto) {
        // The answer's schema (if any) joins the tools' grammar.
        t.content = rf_schema;
        grammar = None;
    }
    if let Some(g) = tools.as_ref().and_then(|t| t.forced.clone()) {
        if grammar.is_some() {
            return Err(invalid(
                "response_format",
                "response_format cannot be combined with a forced tool_choice",
            ));
        }
        grammar = Some(g);
    }
    let tool_list = tools
        .as_ref()
        .filter(|t| t.parse)
        .map(|t| Value::Array(t.list.clone()));
    let mut kwargs = f
        .take::<Map<String, Value>>("chat_template_kwargs")?
        .unwrap_or_default();
    kwargs.retain(|k, _| !matches!(k.as_str(), "messages" | "tools" | "documents"));
    let documents: Option<Value> = f.take("documents")?;
    let messages = chat_messages(messages)?;
    Ok(Chat {
        common,
        inputs: ChatInputs {
            messages: Value::Array(messages),
            tools: tool_list,
            documents,
            add_generation_prompt: true,
            kwargs,
        },
        logprobs,
        grammar,
        tools: tools.filter(|t| t.parse && !t.list.is_empty()),
    })
}

/// The schema a (valid) `response_format` asks answers to meet, if any.
fn response_schema(rf: &Value) -> Option<Value> {
    match rf.get("type").and_then(Value::as_str) {
        Some("json_object") => Some(json!({"type": "object"})),
        Some("json_schema") => Some(
            rf.get("json_schema")
                .and_then(|js| js.get("schema"))
                .cloned()
                .unwrap_or_else(|| json!({})),
        ),
        _ => None,
    }
}

/// `response_format`: text, any JSON object, or JSON meeting a schema.
pub(crate) fn response_format(rf: &Value) -> Result<Option<String>, Invalid> {
    let field = "response_format";
    match rf.get("type").and_then(Value::as_str) {
        Some("text") => Ok(None),
        Some("json_object") => Ok(Some(grammar::json_object())),
        Some("json_schema") => {
            let js = rf
                .get("json_schema")
                .ok_or_else(|| invalid(field, "response_format.json_schema is required"))?;
            if js.get("name").and_then(Value::as_str).is_none() {
                return Err(invalid(
                    field,
                    "response_format.json_schema.name is required",
                ));
            }
            let schema = js.get("schema").cloned().unwrap_or_else(|| json!({}));
            if !schema.is_object() {
                return Err(invalid(
                    field,
                    "response_format.json_schema.schema must be an object",
                ));
            }
            let g = grammar::json_schema(&schema);
            if g.len() > limits::MAX_GRAMMAR {
                return Err(invalid(
                    field,
                    format!("the schema is over {} bytes", limits::MAX_GRAMMAR),
                ));
            }
            Ok(Some(g))
        }
        other => Err(invalid(
            field,
            format!(
                "response_format type {other:?} is not supported (text, json_object, json_schema)"
            ),
        )),
    }
}

fn tools(f: &mut Fields) -> Result<Option<Tools>, Invalid> {
    let tools: Option<Vec<Value>> = f.take("tools")?;
    let functions: Option<Vec<Value>> = f.take("functions")?;
    let tool_choice: Option<Value> = f.take("tool_choice")?;
    let function_call: Option<Value> = f.take("function_call")?;
    let parallel: Option<bool> = f.take("parallel_tool_calls")?;
    let (list, choice, legacy, field) = match (tools, functions) {
        (Some(_), Some(_)) => {
            return Err(invalid("functions", "give tools or functions, not both"));
        }
        (Some(t), None) => {
            if function_call.is_some() {
                return Err(invalid(
                    "function_call",
                    "function_call goes with functions",
                ));
            }
            (t, tool_choice, false, "tools")
        }
        (None, Some(fs)) => {
            if tool_choice.is_some() {
                return Err(invalid("tool_choice", "tool_choice goes with tools"));
            }
            let wrapped = fs
                .into_iter()
                .map(|f| json!({"type": "function", "function": f}))
                .collect();
            let choice = function_call.map(|c| match c {
                Value::Object(o) => json!({"type": "function", "function": o}),
                other => other,
            });
            (wrapped, choice, true, "functions")
        }
        (None, None) => {
            for (name, c) in [
                ("tool_choice", tool_choice),
                ("function_call", function_call),
            ] {
                if c.is_some_and(|c| c != json!("none")) {
                    return Err(invalid(name, format!("{name} needs tools")));
                }
            }
            return Ok(None);
        }
    };
    if list.len() > MAX_TOOLS {
        return Err(invalid(field, format!("at most {MAX_TOOLS} tools")));
    }
    let mut names = Vec::new();
    for (i, t) in list.iter().enumerate() {
        if t.get("type").and_then(Value::as_str) != Some("function") {
            return Err(invalid(
                field,
                format!("{field}[{i}]: only function tools are supported"),
            ));
        }
        let func = t
            .get("function")
            .and_then(Value::as_object)
            .ok_or_else(|| invalid(field, format!("{field}[{i}].function is required")))?;
        let name = func
            .get("name")
            .and_then(Value::as_str)
            .filter(|n| {
                !n.is_empty()
                    && n.len() <= 64
                    && n.chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
            })
            .ok_or_else(|| {
                invalid(
                    field,
                    format!("{field}[{i}].function.name must be 1-64 of a-z, A-Z, 0-9, _ and -"),
                )
            })?;
        if let Some(p) = func.get("parameters")
            && !p.is_object()
        {
            return Err(invalid(
                field,
                format!("{field}[{i}].function.parameters must be an object"),
            ));
        }
        names.push(name.to_string());
    }
    let choice_field = if legacy {
        "function_call"
    } else {
        "tool_choice"
    };
    let (parse, forced) = match choice {
        None => (true, None),
        Some(Value::String(s)) => match s.as_str() {
            "auto" => (true, None),
            "none" => (false, None),
            "required" if !legacy => (true, Some(None)),
            _ => {
                return Err(invalid(
                    choice_field,
                    format!("{choice_field} {s:?} is not one of auto, none, required"),
                ));
            }
        },
        Some(Value::Object(o)) => {
            let name = o
                .get("function")
                .and_then(|f| f.get("name"))
                .and_then(Value::as_str)
                .ok_or_else(|| {
                    invalid(choice_field, format!("{choice_field} names no function"))
                })?;
            if !names.iter().any(|n| n == name) {
                return Err(invalid(
                    choice_field,
                    format!("{choice_field} names {name:?}, which is not among the tools"),
                ));
            }
            (true, Some(Some(name.to_string())))
        }
        Some(_) => {
            return Err(invalid(
                choice_field,
                format!("{choice_field} must be a string or an object"),
            ));
        }
    };
    let single = parallel == Some(false) || legacy || matches!(forced, Some(Some(_)));
    let forced_grammar = match &forced {
        None => None,
        Some(name) => Some(
            hearth_models::tools::call_schema(&list, name.as_deref())
                .map(|s| grammar::json_schema(&s))
                .ok_or_else(|| invalid(choice_field, "no tool to call"))?,
        ),
    };
    if forced_grammar
        .as_ref()
        .is_some_and(|g| g.len() > limits::MAX_GRAMMAR)
    {
        return Err(invalid(
            field,
            format!("the tools' schemas are over {} bytes", limits::MAX_GRAMMAR),
        ));
    }
    let strict = list.iter().any(|t| t["function"]["strict"] == json!(true));
    Ok(Some(Tools {
        strict_auto: strict && parse && forced.is_none(),
        list,
        parse,
        single,
        legacy,
        named: matches!(forced, Some(Some(_))),
        forced: forced_grammar,
        names,
        content: None,
    }))
}

/// OpenAI messages as the chat template takes them.
fn chat_messages(messages: Vec<Value>) -> Result<Vec<Value>, Invalid> {
    let field = "messages";
    let mut out = Vec::with_capacity(messages.len());
    // Tool call ids and their function names, for `tool` messages.
    let mut call_names: Vec<(String, String)> = Vec::new();
    for (i, m) in messages.into_iter().enumerate() {
        let Value::Object(m) = m else {
            return Err(invalid(field, format!("messages[{i}] must be an object")));
        };
        let role = m.get("role").and_then(Value::as_str).unwrap_or("");
        let role = match role {
            "system" | "developer" => "system",
            "user" | "assistant" | "tool" => role,
            "function" => "tool",
            other => {
                return Err(invalid(
                    field,
                    format!(
                        "messages[{i}]: role {other:?} is not supported (system, developer, user, assistant, tool)"
                    ),
                ));
            }
        };
        for k in m.keys() {
            if !matches!(
                k.as_str(),
                "role"
                    | "content"
                    | "name"
                    | "tool_calls"
                    | "tool_call_id"
                    | "function_call"
                    | "refusal"
            ) {
                return Err(invalid(
                    field,
                    format!("messages[{i}].{k} is not supported"),
                ));
            }
        }
        let content = match m.get("content") {
            Some(Value::String(s)) => Value::String(s.clone()),
            Some(Value::Array(parts)) => {
                let mut text = String::new();
                for p in parts {
                    match (p.get("type").and_then(Value::as_str), p.get("text")) {
                        (Some("text"), Some(Value::String(t))) => text.push_str(t),
                        _ => {
                            return Err(invalid(
                                field,
                                format!("messages[{i}]: only text content parts are supported"),
                            ));
                        }
                    }
                }
                Value::String(text)
            }
            // No content beside tool calls: empty text, as templates
            // concatenate it.
            None | Some(Value::Null) if role == "assistant" => Value::String(String::new()),
            _ => {
                return Err(invalid(
                    field,
                    format!("messages[{i}]: content must be a string or a list of text parts"),
                ));
            }
        };
        let mut msg = Map::new();
        msg.insert("role".into(), json!(role));
        msg.insert("content".into(), content);
        if let Some(n) = m.get("name").and_then(Value::as_str) {
            msg.insert("name".into(), json!(n));
        }
        // Assistant calls: the arguments as an object (what templates
        // expect), and their ids remembered.
        let mut calls: Vec<Value> = match m.get("tool_calls") {
            Some(Value::Array(a)) if role == "assistant" => a.clone(),
            None | Some(Value::Null) => Vec::new(),
            Some(_) => {
                return Err(invalid(
                    field,
                    format!("messages[{i}].tool_calls must be a list on an assistant message"),
                ));
            }
        };
        if let Some(fc) = m.get("function_call").filter(|v| !v.is_null()) {
            calls.push(json!({"id": format!("call_{i}"), "type": "function", "function": fc}));
        }
        if !calls.is_empty() {
            let mut rendered = Vec::with_capacity(calls.len());
            for c in calls {
                let func = c.get("function").and_then(Value::as_object);
                let name = func.and_then(|f| f.get("name")).and_then(Value::as_str);
                let Some(name) = name else {
                    return Err(invalid(
                        field,
                        format!("messages[{i}]: a tool call names no function"),
                    ));
                };
                let args = match func.and_then(|f| f.get("arguments")) {
                    Some(Value::String(s)) => {
                        serde_json::from_str::<Value>(s).unwrap_or(Value::String(s.clone()))
                    }
                    Some(v) => v.clone(),
                    None => json!({}),
                };
                let id = c
                    .get("id")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_string();
                call_names.push((id.clone(), name.to_string()));
                rendered.push(json!({
                    "id": id,
                    "type": "function",
                    "function": {"name": name, "arguments": args},
                }));
            }
            msg.insert("tool_calls".into(), Value::Array(rendered));
        }
        if role == "tool" {
            let id = m.get("tool_call_id").and_then(Value::as_str);
            if let Some(id) = id {
                msg.insert("tool_call_id".into(), json!(id));
                if !msg.contains_key("name")
                    && let Some((_, n)) = call_names.iter().find(|(c, _)| c == id)
                {
                    msg.insert("name".into(), json!(n));
                }
            } else if m.get("role").and_then(Value::as_str) == Some("tool") {
                return Err(invalid(
                    field,
                    format!("messages[{i}]: a tool message needs tool_call_id"),
                ));
            }
        }
        out.push(Value::Object(msg));
    }
    Ok(out)
}

/// A completions request, read.
#[derive(Debug)]
pub(crate) struct Completion {
    pub common: Common,
    pub prompt: Value,
    pub logprobs: Option<u8>,
    pub echo: bool,
    /// `echo` with `max_tokens: 0`: the prompt alone (scored, with
    /// `logprobs`), nothing generated.
    pub prompt_only: bool,
}

pub(crate) fn completion(body: Map<String, Value>) -> Result<Completion, Invalid> {
    let mut f = Fields::check(body, COMPLETION_FIELDS, COMPLETION_REFUSED)?;
    let prompt: Value = f
        .take("prompt")?
        .ok_or_else(|| invalid("prompt", "`prompt` is required"))?;
    let echo = f.0.get("echo") == Some(&Value::Bool(true));
    // `echo` with `max_tokens: 0` asks for the prompt alone (how
    // evaluation harnesses score text): one token is generated and dropped.
    let prompt_only = echo && f.0.get("max_tokens").and_then(index) == Some(0);
    if prompt_only {
        if f.0.get("stream") == Some(&Value::Bool(true)) {
            return Err(invalid(
                "max_tokens",
                "max_tokens 0 (the prompt alone) is not streamed",
            ));
        }
        f.0.insert("max_tokens".into(), json!(1));
    }
    let common = common(&mut f, false)?;
    let echo = f.take::<bool>("echo")?.unwrap_or(false);
    let logprobs = match int(&mut f, "logprobs")? {
        None => None,
        Some(n) if n <= limits::MAX_TOP_LOGPROBS as u64 => Some(n as u8),
        Some(_) => {
            return Err(invalid(
                "logprobs",
                format!("logprobs must be at most {}", limits::MAX_TOP_LOGPROBS),
            ));
        }
    };
    if let Some(b) = int(&mut f, "best_of")?
        && b as usize != common.n
    {
        return Err(invalid(
            "best_of",
            "best_of must equal n (Hearth returns every sequence)",
        ));
    }
    Ok(Completion {
        common,
        prompt,
        logprobs,
        echo,
        prompt_only,
    })
}
