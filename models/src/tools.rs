//! Tool calls in model output: which format a model's chat template teaches
//! it (Hermes/Qwen `<tool_call>` tags, Llama 3 JSON, Mistral
//! `[TOOL_CALLS]`), finding the calls in generated text, how much of a
//! stream is surely plain content, and the grammar that forces a call.

use serde_json::{Value, json};

/// How a model writes tool calls, as its chat template shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ToolFormat {
    /// `<tool_call>{"name": …, "arguments": …}</tool_call>` (Hermes, Qwen
    /// 2.5/3, SmolLM3 and many fine-tunes).
    Hermes,
    /// `[TOOL_CALLS][{"name": …, "arguments": …}]`, or
    /// `[TOOL_CALLS]name[ARGS]{…}` in newer Mistral templates.
    Mistral,
    /// A bare JSON object `{"name": …, "parameters": …}`, optionally after
    /// `<|python_tag|>`, several separated by `;` (Llama 3.1+).
    Llama3,
    /// No format in the template: a bare JSON object with `name` and
    /// `arguments` (what the forcing grammar produces).
    Json,
}

const HERMES_OPEN: &str = "<tool_call>";
const HERMES_CLOSE: &str = "</tool_call>";
const MISTRAL_MARK: &str = "[TOOL_CALLS]";
const MISTRAL_ARGS: &str = "[ARGS]";
const PYTHON_TAG: &str = "<|python_tag|>";

/// One call found in the output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ToolCall {
    pub name: String,
    /// The arguments as JSON text (an object).
    pub arguments: String,
}

impl ToolFormat {
    /// The format a template teaches, from its source.
    pub fn detect(template: &str) -> Self {
        if template.contains(HERMES_OPEN) {
            Self::Hermes
        } else if template.contains(MISTRAL_MARK) {
            Self::Mistral
        } else if template.contains(PYTHON_TAG)
            || (template.contains("\"parameters\"") && template.contains("ipython"))
        {
            Self::Llama3
        } else {
            Self::Json
        }
    }

    /// The marker that opens a call in this format, if it has one.
    fn marker(self) -> Option<&'static str> {
        match self {
            Self::Hermes => Some(HERMES_OPEN),
            Self::Mistral => Some(MISTRAL_MARK),
            Self::Llama3 => Some(PYTHON_TAG),
            Self::Json => None,
        }
    }

    /// How many bytes at the start of `text` (output so far) are surely
    /// content, not part of a tool call: up to a call's marker, holding
    /// back a tail that may be a marker's beginning; nothing while the
    /// output could be a bare JSON call.
    pub fn content_prefix(self, text: &str) -> usize {
        let lead = text.len() - text.trim_start().len();
        let rest = &text[lead..];
        if rest.is_empty() || rest.starts_with('{') || rest.starts_with('[') {
            return 0;
        }
        let Some(marker) = self.marker() else {
            return text.len();
        };
        if let Some(at) = text.find(marker) {
            return at;
        }
        // A tail that could grow into the marker is held back.
        let mut keep = text.len();
        for k in (1..marker.len()).rev() {
            if text.len() >= k
                && text.is_char_boundary(text.len() - k)
                && marker.starts_with(&text[text.len() - k..])
            {
                keep = text.len() - k;
                break;
            }
        }
        keep
    }

    /// Splits finished output into its content and its calls of the tools
    /// named `names`. Text that looks like a call but does not parse, or
    /// calls a tool not given, stays content.
    pub fn parse(self, text: &str, names: &[String]) -> (String, Vec<ToolCall>) {
        let known =
            |calls: &[ToolCall]| !calls.is_empty() && calls.iter().all(|c| names.contains(&c.name));
        let calls = match self {
            Self::Hermes => hermes(text),
            Self::Mistral => mistral(text),
            Self::Llama3 => llama3(text),
            Self::Json => None,
        };
        if let Some((content, calls)) = calls.filter(|(_, c)| known(c)) {
            return (content, calls);
        }
        // Any format: the whole output one JSON call (or a list of them),
        // as the forcing grammar writes it: `name` and `arguments` (or
        // `parameters`) and nothing else.
        match bare_calls(text.trim()) {
            Some(calls) if known(&calls) => (String::new(), calls),
            _ => (text.to_string(), Vec::new()),
        }
    }
}

/// A call from a JSON object with a name and its arguments (`arguments`
/// or `parameters`, an object or a JSON string of one).
fn call_of(v: &Value) -> Option<ToolCall> {
    let name = v.get("name")?.as_str()?.to_string();
    let args = v.get("arguments").or_else(|| v.get("parameters"));
    let arguments = match args {
        None | Some(Value::Null) => "{}".to_string(),
        Some(Value::String(s)) => {
            let parsed: Value = serde_json::from_str(s).ok()?;
            parsed.is_object().then(|| parsed.to_string())?
        }
        Some(o @ Value::Object(_)) => o.to_string(),
        Some(_) => return None,
    };
    Some(ToolCall { name, arguments })
}

/// A call written as bare JSON: only `name` and its arguments.
fn bare_call(v: &Value) -> Option<ToolCall> {
    let o = v.as_object()?;
    let args = o.contains_key("arguments") || o.contains_key("parameters");
    if !args || o.len() != 2 {
        return None;
    }
    call_of(v)
}

fn bare_calls(text: &str) -> Option<Vec<ToolCall>> {
    let text = text.strip_prefix(PYTHON_TAG).unwrap_or(text).trim();
    match serde_json::from_str::<Value>(text).ok()? {
        Value::Array(a) => a.iter().map(bare_call).collect(),
        v => Some(vec![bare_call(&v)?]),
    }
}

fn hermes(text: &str) -> Option<(String, Vec<ToolCall>)> {
    let first = text.find(HERMES_OPEN)?;
    // The content before the first call as it was (a stream sent it so),
    // then any text between and after calls on lines of their own.
    let mut content = text[..first].to_string();
    let mut calls = Vec::new();
    let mut rest = &text[first..];
    while let Some(at) = rest.find(HERMES_OPEN) {
        if !rest[..at].trim().is_empty() {
            content.push('\n');
            content.push_str(rest[..at].trim());
        }
        let body = &rest[at + HERMES_OPEN.len()..];
        let (inner, after) = match body.find(HERMES_CLOSE) {
            Some(end) => (&body[..end], &body[end + HERMES_CLOSE.len()..]),
            None => (body, ""),
        };
        calls.push(call_of(&serde_json::from_str(inner.trim()).ok()?)?);
        rest = after;
    }
    if !rest.trim().is_empty() {
        content.push('\n');
        content.push_str(rest.trim());
    }
    if content.trim().is_empty() {
        content.clear();
    }
    Some((content, calls))
}

fn mistral(text: &str) -> Option<(String, Vec<ToolCall>)> {
    let at = text.find(MISTRAL_MARK)?;
    let content = text[..at].trim().to_string();
    let body = text[at + MISTRAL_MARK.len()..].trim();
    // The list form.
    if let Ok(Value::Array(a)) = serde_json::from_str::<Value>(body) {
        return Some((content, a.iter().map(call_of).collect::<Option<_>>()?));
    }
    // `name[ARGS]{…}`, repeated after further markers.
    let mut calls = Vec::new();
    for part in body.split(MISTRAL_MARK) {
        let (name, args) = part.split_once(MISTRAL_ARGS)?;
        let v: Value = serde_json::from_str(args.trim()).ok()?;
        calls.push(call_of(&json!({"name": name.trim(), "arguments": v}))?);
    }
    Some((content, calls))
}

fn llama3(text: &str) -> Option<(String, Vec<ToolCall>)> {
    let t = text.trim();
    let t = t.strip_prefix(PYTHON_TAG).unwrap_or(t).trim();
    if !t.starts_with('{') {
        return None;
    }
    if let Some(calls) = bare_calls(t) {
        return Some((String::new(), calls));
    }
    // Several calls separated by `;` (which may also sit inside strings).
    let mut calls = Vec::new();
    let mut rest = t;
    while !rest.is_empty() {
        let mut values = serde_json::Deserializer::from_str(rest).into_iter::<Value>();
        let v = values.next()?.ok()?;
        calls.push(call_of(&v)?);
        rest = rest[values.byte_offset()..].trim_start();
        rest = rest.strip_prefix(';').unwrap_or(rest).trim_start();
        if !rest.is_empty() && !rest.starts_with('{') {
            return None;
        }
    }
    Some((String::new(), calls))
}

/// The JSON schema of one call of any of `tools` (OpenAI's `tools` list),
/// or of the one named `only`: `{"name": …, "arguments": {…}}`, each
/// tool's parameters as its arguments' schema. `None` when no tool matches.
pub fn call_schema(tools: &[Value], only: Option<&str>) -> Option<Value> {
    keyed_call_schema(tools, only, "arguments")
}

/// [`call_schema`] with the arguments under `key` (`parameters` for
/// Llama 3).
fn keyed_call_schema(tools: &[Value], only: Option<&str>, key: &str) -> Option<Value> {
    let options: Vec<Value> = tools
        .iter()
        .filter_map(|t| {
            let f = t.get("function")?;
            let name = f.get("name")?.as_str()?;
            if only.is_some_and(|o| o != name) {
                return None;
            }
            // Arguments are an object whatever the parameters say.
            let params = match f.get("parameters") {
                Some(p) if p.get("type").and_then(Value::as_str) == Some("object") => p.clone(),
                Some(p) => json!({"allOf": [p, {"type": "object"}]}),
                None => json!({"type": "object"}),
            };
            Some(json!({
                "type": "object",
                "properties": {
                    "name": {"const": name},
                    key: params,
                },
                "required": ["name", key],
                "additionalProperties": false,
            }))
        })
        .collect();
    match options.len() {
        0 => None,
        1 => options.into_iter().next(),
        _ => Some(json!({"anyOf": options})),
    }
}

/// Adapts a conversation's tool calls and results to the chat template
/// that renders it. A template that does not render tools gets each call
/// as the JSON text the tools prompt asks for, and each result as a user
/// turn (merged with neighbouring user turns, for templates that want
/// turns to alternate). Mistral's templates get call ids of the nine
/// letters and digits they require, each id mapped the same way wherever
/// it occurs, so calls and their results still pair.
pub fn fit_history(messages: &mut Vec<Value>, format: ToolFormat, renders_tools: bool) {
    if renders_tools {
        if format == ToolFormat::Mistral {
            for m in messages.iter_mut() {
                if let Some(calls) = m.get_mut("tool_calls").and_then(Value::as_array_mut) {
                    for c in calls {
                        if let Some(id) = c.get("id").and_then(Value::as_str) {
                            c["id"] = json!(mistral_id(id));
                        }
                    }
                }
                if let Some(id) = m.get("tool_call_id").and_then(Value::as_str) {
                    m["tool_call_id"] = json!(mistral_id(id));
                }
            }
        }
        return;
    }
    let has_tools = messages
        .iter()
        .any(|m| m.get("tool_calls").is_some() || m.get("role") == Some(&json!("tool")));
    if !has_tools {
        return;
    }
    let mut out: Vec<Value> = Vec::with_capacity(messages.len());
    // Whether the last message out is a user turn holding a tool result.
    let mut last_result = false;
    for mut m in messages.drain(..) {
        let role = m
            .get("role")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        let text = |m: &Value| {
            m.get("content")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string()
        };
        if role == "tool" {
            let name = m.get("name").and_then(Value::as_str);
            let result = match name {
                Some(n) => format!("Result of {n}: {}", text(&m)),
                None => format!("Tool result: {}", text(&m)),
            };
            match out.last_mut() {
                Some(prev) if prev.get("role") == Some(&json!("user")) => {
                    let joined = format!("{}\n\n{result}", text(prev));
                    prev["content"] = json!(joined);
                }
                _ => out.push(json!({"role": "user", "content": result})),
            }
            last_result = true;
            continue;
        }
        if let Some(o) = m.as_object_mut()
            && let Some(Value::Array(calls)) = o.remove("tool_calls")
        {
            let mut parts: Vec<String> = Vec::with_capacity(calls.len() + 1);
            let content = o
                .get("content")
                .and_then(Value::as_str)
                .unwrap_or("")
                .trim();
            if !content.is_empty() {
                parts.push(content.to_string());
            }
            for c in &calls {
                let f = c.get("function").unwrap_or(c);
                let args = match f.get("arguments") {
                    Some(Value::String(s)) => serde_json::from_str(s).unwrap_or(json!(s)),
                    Some(v) => v.clone(),
                    None => json!({}),
                };
                parts.push(
                    json!({"name": f.get("name").cloned().unwrap_or_default(), "arguments": args})
                        .to_string(),
                );
            }
            o.insert("content".into(), json!(parts.join("\n")));
        }
        if role == "user"
            && last_result
            && let Some(prev) = out.last_mut()
        {
            let joined = format!("{}\n\n{}", text(prev), text(&m));
            prev["content"] = json!(joined);
            last_result = false;
            continue;
        }
        last_result = false;
        out.push(m);
    }
    *messages = out;
}

/// A call id as Mistral's templates require it: nine letters and digits;
/// an id that is not one is mapped by its hash (the same id, the same
/// result).
pub fn mistral_id(id: &str) -> String {
    if id.len() == 9 && id.bytes().all(|b| b.is_ascii_alphanumeric()) {
        return id.to_string();
    }
    // FNV-1a: stable across builds and platforms.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in id.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    const DIGITS: &[u8] = b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ";
    (0..9)
        .map(|_| {
            let d = DIGITS[(h % 62) as usize] as char;
            h /= 62;
            d
        })
        .collect()
}

/// `text` as a regex matching it literally (inside Lark's `/…/`).
fn regex_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len() * 2);
    for c in text.chars() {
        if "\\.+*?()|[]{}^$/-&~#".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// How a format's marker is written: one special token of the vocabulary
/// (by id: `<[ID]>`), or its text.
fn lark_marker(text: &str, special_id: &dyn Fn(&str) -> Option<u32>) -> (String, bool) {
    match special_id(text) {
        Some(id) => (format!("<[{id}]>"), true),
        None => (crate::grammar::lark_literal(text), false),
    }
}

/// The grammar for `tool_choice: auto` when tools are `strict`: the model
/// may answer (free text, or JSON meeting `content` when a response format
/// asks for it) or call tools in its own format, and a call it starts is
/// held to the called tool's schema when the tool is `strict` (to a JSON
/// object when not). At most one call when `single`. `special_id` gives the
/// id of a marker text that is a special token of the model's vocabulary.
/// None when no tool has a name.
pub fn auto_grammar(
    format: ToolFormat,
    tools: &[Value],
    single: bool,
    content: Option<&Value>,
    special_id: &dyn Fn(&str) -> Option<u32>,
) -> Option<String> {
    use crate::grammar::lark_json;
    // `strict` is per tool, as OpenAI has it.
    let tools: Vec<Value> = tools
        .iter()
        .map(|t| {
            let mut t = t.clone();
            if t["function"]["strict"] != json!(true) {
                t["function"]["parameters"] = json!({"type": "object"});
            }
            t
        })
        .collect();
    let tools = &tools[..];
    let key = if format == ToolFormat::Llama3 {
        "parameters"
    } else {
        "arguments"
    };
    let call = keyed_call_schema(tools, None, key)?;
    // Lists of calls with JSON's free whitespace: llguidance 1.9, with
    // fixed separators, refuses the token `"}` after an enum value in an
    // array of closed objects (the canonical tokenization of such a list).
    let many = json!({"type": "array", "items": call, "minItems": 1,
        "x-guidance": {"whitespace_flexible": true}});
    // Free text (any, where a marker ends it), or the content's JSON.
    let answer = content.map(lark_json);
    let src = match format {
        ToolFormat::Hermes | ToolFormat::Mistral => {
            let (open, open_special) = lark_marker(format.marker().unwrap_or_default(), special_id);
            let body = if format == ToolFormat::Hermes {
                let (close, _) = lark_marker(HERMES_CLOSE, special_id);
                format!("\"\\n\"? {} \"\\n\"? {close}", lark_json(&call))
            } else {
                format!("\" \"? {}", lark_json(if single { &call } else { &many }))
            };
            let repeat = if single || format == ToolFormat::Mistral {
                "?"
            } else {
                "*"
            };
            // Text that holds no marker: a marker always starts a call.
            let text = format!(
                "TEXT: /(?s:.*)/ & ~/(?s:.*){}(?s:.*)/",
                regex_escape(format.marker().unwrap_or_default())
            );
            match answer {
                // Text, then calls; each call's text before it ends at its
                // marker (lazily, when the marker is text; a special token
                // ends text by itself).
                None if open_special => format!(
                    "start: call{repeat} TEXT\ncall: TEXT {open} body /\\s*/\nbody: {body}\n{text}\n"
                ),
                None => format!(
                    "start: call{repeat} TEXT\ncall: head body /\\s*/\nhead[lazy]: FREE {open}\nbody: {body}\nFREE: /(?s:.*)/\n{text}\n"
                ),
                Some(a) => format!(
                    "start: answer | calls\nanswer: {a}\ncalls: call{}\ncall: {open} body /\\s*/\nbody: {body}\n",
                    if repeat == "*" { "+" } else { "" }
                ),
            }
        }
        ToolFormat::Llama3 | ToolFormat::Json => {
            let tag = match special_id(PYTHON_TAG) {
                Some(id) if format == ToolFormat::Llama3 => format!("<[{id}]>? "),
                _ => String::new(),
            };
            // Text that cannot be read as a call: empty, or starting (after
            // spaces) with something other than `{` or `[`.
            let plain = answer.unwrap_or_else(|| r"/(?s:(\s*[^\s{\[].*)?)/".to_string());
            let calls = if single {
                String::new()
            } else {
                format!(" | {tag}calls\ncalls: {}", lark_json(&many))
            };
            format!(
                "start: answer | {tag}call{calls}\nanswer: {plain}\ncall: {}\n",
                lark_json(&call)
            )
        }
    };
    Some(crate::grammar::lark(&src))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names() -> Vec<String> {
        ["weather", "time", "f", "g"].map(String::from).to_vec()
    }

    fn call(name: &str, args: Value) -> ToolCall {
        ToolCall {
            name: name.into(),
            arguments: args.to_string(),
        }
    }

    #[test]
    fn formats_are_read_from_templates() {
        assert_eq!(
            ToolFormat::detect("{{- '<tool_call>\\n' }}"),
            ToolFormat::Hermes
        );
        assert_eq!(
            ToolFormat::detect("{{ '[TOOL_CALLS]' }}"),
            ToolFormat::Mistral
        );
        assert_eq!(
            ToolFormat::detect("<|python_tag|>{{ x }}"),
            ToolFormat::Llama3
        );
        assert_eq!(ToolFormat::detect("plain"), ToolFormat::Json);
    }

    #[test]
    fn hermes_calls_and_content() {
        let t = "Let me check.\n<tool_call>\n{\"name\": \"weather\", \"arguments\": {\"city\": \"Oslo\"}}\n</tool_call>\n<tool_call>\n{\"name\": \"time\", \"arguments\": \"{\\\"tz\\\": \\\"CET\\\"}\"}\n</tool_call>";
        let (content, calls) = ToolFormat::Hermes.parse(t, &names());
        assert_eq!(content, "Let me check.\n");
        assert_eq!(
            calls,
            vec![
                call("weather", json!({"city": "Oslo"})),
                call("time", json!({"tz": "CET"}))
            ]
        );
        // Unclosed at the end of output still counts.
        let (_, calls) =
            ToolFormat::Hermes.parse("<tool_call>{\"name\": \"f\", \"arguments\": {}}", &names());
        assert_eq!(calls, vec![call("f", json!({}))]);
        // Broken JSON stays content.
        let (content, calls) = ToolFormat::Hermes.parse("<tool_call>{\"name\": ", &names());
        assert!(calls.is_empty());
        assert_eq!(content, "<tool_call>{\"name\": ");
    }

    #[test]
    fn mistral_and_llama3_calls() {
        let (c, calls) = ToolFormat::Mistral.parse(
            "[TOOL_CALLS][{\"name\": \"f\", \"arguments\": {\"a\": 1}}]",
            &names(),
        );
        assert_eq!((c.as_str(), calls), ("", vec![call("f", json!({"a": 1}))]));
        let (_, calls) = ToolFormat::Mistral.parse(
            "[TOOL_CALLS]f[ARGS]{\"a\": 1}[TOOL_CALLS]g[ARGS]{}",
            &names(),
        );
        assert_eq!(
            calls,
            vec![call("f", json!({"a": 1})), call("g", json!({}))]
        );
        let (_, calls) = ToolFormat::Llama3.parse(
            "<|python_tag|>{\"name\": \"f\", \"parameters\": {\"x\": \"y\"}}",
            &names(),
        );
        assert_eq!(calls, vec![call("f", json!({"x": "y"}))]);
        let (_, calls) = ToolFormat::Llama3.parse(
            "{\"name\": \"f\", \"parameters\": {}}; {\"name\": \"g\", \"parameters\": {\"k\": 2}}",
            &names(),
        );
        assert_eq!(
            calls,
            vec![call("f", json!({})), call("g", json!({"k": 2}))]
        );
        // Prose is prose.
        let (c, calls) = ToolFormat::Llama3.parse("The answer is 4.", &names());
        assert!(calls.is_empty());
        assert_eq!(c, "The answer is 4.");
        // The forced format parses under every template format.
        for f in [ToolFormat::Hermes, ToolFormat::Mistral, ToolFormat::Json] {
            let (_, calls) = f.parse(" {\"name\": \"f\", \"arguments\": {\"q\": [1]}}", &names());
            assert_eq!(calls, vec![call("f", json!({"q": [1]}))]);
        }
        // A call must name a given function and give an object, and a
        // JSON answer that happens to have a name is not a call.
        for bad in [
            "{\"arguments\": {}}",
            "{\"name\": 3}",
            "{\"name\": \"f\", \"arguments\": 5}",
            "{\"name\": \"nope\", \"arguments\": {}}",
            "{\"name\": \"f\"}",
            "{\"name\": \"f\", \"age\": 3, \"arguments\": {}}",
        ] {
            assert!(ToolFormat::Json.parse(bad, &names()).1.is_empty(), "{bad}");
        }
        // A `;` inside an argument.
        let (_, calls) = ToolFormat::Llama3.parse(
            "{\"name\": \"f\", \"parameters\": {\"q\": \"a;b\"}};{\"name\": \"g\", \"parameters\": {}}",
            &names(),
        );
        assert_eq!(
            calls,
            vec![call("f", json!({"q": "a;b"})), call("g", json!({}))]
        );
    }

    #[test]
    fn streamed_content_stops_before_a_possible_call() {
        let h = ToolFormat::Hermes;
        assert_eq!(h.content_prefix("Hello there"), 11);
        assert_eq!(h.content_prefix("Hello <tool"), 6);
        assert_eq!(h.content_prefix("Hello <tool_call>{\"na"), 6);
        assert_eq!(h.content_prefix("Hi <b>"), 6);
        assert_eq!(h.content_prefix("  {\"name\""), 0);
        assert_eq!(ToolFormat::Json.content_prefix("Sure, 1 < 2"), 11);
        assert_eq!(ToolFormat::Mistral.content_prefix("ok [TOOL"), 3);
    }

    #[test]
    fn call_schemas_name_their_tools() {
        let tools = vec![
            json!({"type": "function", "function": {"name": "a", "parameters": {"type": "object", "properties": {"x": {"type": "integer"}}}}}),
            json!({"type": "function", "function": {"name": "b"}}),
        ];
        let s = call_schema(&tools, None).unwrap();
        assert_eq!(s["anyOf"].as_array().unwrap().len(), 2);
        let s = call_schema(&tools, Some("b")).unwrap();
        assert_eq!(s["properties"]["name"]["const"], "b");
        assert!(call_schema(&tools, Some("c")).is_none());
    }
    #[test]
    fn history_fits_templates_without_tools_and_mistral_ids() {
        let chat = || {
            vec![
                json!({"role": "system", "content": "S"}),
                json!({"role": "user", "content": "Weather?"}),
                json!({"role": "assistant", "content": "", "tool_calls": [
                    {"id": "call_1", "type": "function", "function": {"name": "weather", "arguments": {"city": "Oslo"}}},
                    {"id": "call_2", "type": "function", "function": {"name": "time", "arguments": "{\"tz\": \"CET\"}"}}]}),
                json!({"role": "tool", "tool_call_id": "call_1", "name": "weather", "content": "12 C"}),
                json!({"role": "tool", "tool_call_id": "call_2", "content": "noon"}),
                json!({"role": "user", "content": "Thanks"}),
            ]
        };
        let mut m = chat();
        fit_history(&mut m, ToolFormat::Json, false);
        let roles: Vec<&str> = m.iter().map(|x| x["role"].as_str().unwrap()).collect();
        assert_eq!(roles, ["system", "user", "assistant", "user"]);
        assert_eq!(
            m[2]["content"],
            "{\"name\":\"weather\",\"arguments\":{\"city\":\"Oslo\"}}\n{\"name\":\"time\",\"arguments\":{\"tz\":\"CET\"}}"
        );
        assert!(m[2].get("tool_calls").is_none());
        assert_eq!(
            m[3]["content"],
            "Result of weather: 12 C\n\nTool result: noon\n\nThanks"
        );
        // Templates that render tools keep them; Mistral's get its ids.
        let mut m = chat();
        fit_history(&mut m, ToolFormat::Hermes, true);
        assert_eq!(m, chat());
        fit_history(&mut m, ToolFormat::Mistral, true);
        let id = m[2]["tool_calls"][0]["id"].as_str().unwrap().to_string();
        assert_eq!(id.len(), 9);
        assert!(id.bytes().all(|b| b.is_ascii_alphanumeric()));
        assert_eq!(m[3]["tool_call_id"], id.as_str());
        assert_ne!(m[4]["tool_call_id"], id.as_str());
        assert_eq!(mistral_id("a1B2c3D4e"), "a1B2c3D4e");
        assert_eq!(mistral_id("call_1"), id);
    }
}
