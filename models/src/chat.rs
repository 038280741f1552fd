//! Chat templates: the model's own Jinja template rendered with minijinja,
//! configured like Hugging Face's renderer (trim/lstrip blocks, loop
//! controls, Python string methods, insertion-ordered maps, `tojson` as
//! Python's `json.dumps`, `raise_exception`, `strftime_now`), with the
//! context the reference renderers pass: `messages`, `tools`, `documents`,
//! `add_generation_prompt`, `bos_token`/`eos_token` and any extra keyword
//! arguments (e.g. `enable_thinking`).

use minijinja::value::{Kwargs, Value};
use minijinja::{Environment, ErrorKind};
use serde::{Deserialize, Serialize};

use crate::error::{ModelError, Result};

/// One chat message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

impl Message {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// What a template renders, as the reference renderers take it: messages
/// as JSON objects (tool calls, the `tool` role, content parts), optional
/// tool schemas and documents, and extra keyword arguments such as
/// `enable_thinking`.
#[derive(Debug, Clone, Default)]
pub struct ChatInputs {
    pub messages: serde_json::Value,
    pub tools: Option<serde_json::Value>,
    pub documents: Option<serde_json::Value>,
    pub add_generation_prompt: bool,
    pub kwargs: serde_json::Map<String, serde_json::Value>,
}

impl ChatInputs {
    /// Plain messages.
    pub fn from_messages(messages: &[Message], add_generation_prompt: bool) -> Self {
        Self {
            messages: serde_json::to_value(messages).unwrap_or_default(),
            add_generation_prompt,
            ..Self::default()
        }
    }
}

/// A compiled chat template: one, or several by name (a model's
/// `tool_use` template is picked when tools are given).
#[derive(Debug)]
pub struct ChatTemplate {
    env: Environment<'static>,
    names: Vec<String>,
    bos: String,
    eos: String,
}

/// ChatML, used when a model ships no template.
pub const CHATML: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

/// The name of the template used when no other is asked for.
pub const DEFAULT_TEMPLATE: &str = "default";

/// Context names a keyword argument cannot replace.
const RESERVED: &[&str] = &[
    "messages",
    "tools",
    "documents",
    "add_generation_prompt",
    "bos_token",
    "eos_token",
];

/// Python's `json.dumps(value, ensure_ascii=False, indent=indent,
/// sort_keys=sort_keys)`: `", "` and `": "` between items compactly, one
/// item a line when indented.
fn py_json(
    v: &serde_json::Value,
    indent: Option<usize>,
    sort: bool,
    depth: usize,
    out: &mut String,
) {
    use serde_json::Value as J;
    let newline = |out: &mut String, d: usize| {
        if let Some(n) = indent {
            out.push('\n');
            out.push_str(&" ".repeat(n * d));
        }
    };
    let sep = if indent.is_some() { "," } else { ", " };
    match v {
        J::Array(a) if a.is_empty() => out.push_str("[]"),
        J::Object(o) if o.is_empty() => out.push_str("{}"),
        J::Array(a) => {
            out.push('[');
            for (i, x) in a.iter().enumerate() {
                if i > 0 {
                    out.push_str(sep);
                }
                newline(out, depth + 1);
                py_json(x, indent, sort, depth + 1, out);
            }
            newline(out, depth);
            out.push(']');
        }
        J::Object(o) => {
            let mut items: Vec<(&String, &J)> = o.iter().collect();
            if sort {
                items.sort_by(|a, b| a.0.cmp(b.0));
            }
            out.push('{');
            for (i, (k, x)) in items.into_iter().enumerate() {
                if i > 0 {
                    out.push_str(sep);
                }
                newline(out, depth + 1);
                out.push_str(&J::String(k.clone()).to_string());
                out.push_str(": ");
                py_json(x, indent, sort, depth + 1, out);
            }
            newline(out, depth);
            out.push('}');
        }
        other => out.push_str(&other.to_string()),
    }
}

fn tojson(value: Value, kwargs: Kwargs) -> std::result::Result<Value, minijinja::Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    let sort: Option<bool> = kwargs.get("sort_keys")?;
    let json = serde_json::to_value(&value)
        .map_err(|e| minijinja::Error::new(ErrorKind::InvalidOperation, format!("tojson: {e}")))?;
    let mut out = String::new();
    py_json(&json, indent, sort.unwrap_or(false), 0, &mut out);
    Ok(Value::from_safe_string(out))
}

/// The time now as `format` (C `strftime` codes), in local time where the
/// process can tell it, else UTC.
fn strftime_now(format: String) -> std::result::Result<String, minijinja::Error> {
    let bad = |e: String| minijinja::Error::new(ErrorKind::InvalidOperation, e);
    let now = time::OffsetDateTime::now_local().unwrap_or_else(|_| time::OffsetDateTime::now_utc());
    let items = time::format_description::parse_strftime_borrowed(&format)
        .map_err(|e| bad(format!("strftime_now({format:?}): {e}")))?;
    now.format(&items)
        .map_err(|e| bad(format!("strftime_now({format:?}): {e}")))
}

impl ChatTemplate {
    /// Compiles `source`; `bos`/`eos` are exposed to it as `bos_token`/`eos_token`.
    pub fn new(source: &str, bos: &str, eos: &str) -> Result<Self> {
        Self::named(
            &[(DEFAULT_TEMPLATE.to_string(), source.to_string())],
            bos,
            eos,
        )
    }

    /// Compiles several templates by name (the first is the default).
    pub fn named(templates: &[(String, String)], bos: &str, eos: &str) -> Result<Self> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |msg: String| -> std::result::Result<String, minijinja::Error> {
                Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
            },
        );
        env.add_function("strftime_now", strftime_now);
        env.add_filter("tojson", tojson);
        let mut names = Vec::new();
        for (i, (name, source)) in templates.iter().enumerate() {
            match env.add_template_owned(name.clone(), source.clone()) {
                Ok(()) => names.push(name.clone()),
                // The default must compile; a variant that does not (say a
                // `tool_use` template using what minijinja lacks) is left out
                // rather than making the model unusable.
                Err(e) if i > 0 => {
                    tracing::warn!("chat template {name:?} does not compile, left out: {e}")
                }
                Err(e) => {
                    return Err(ModelError::Template(format!("template {name:?}: {e}")));
                }
            }
        }
        if names.is_empty() {
            return Err(ModelError::Template("no template".into()));
        }
        Ok(Self {
            env,
            names,
            bos: bos.to_string(),
            eos: eos.to_string(),
        })
    }

    /// The source of the template used with tools (`tool_use` if the
    /// model has one, else the default).
    pub fn tool_source(&self) -> String {
        ["tool_use", DEFAULT_TEMPLATE]
            .iter()
            .chain(self.names.first().map(String::as_str).iter())
            .find_map(|n| self.env.get_template(n).ok())
            .map(|t| t.source().to_string())
            .unwrap_or_default()
    }

    /// The template's names, the default first.
    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// Renders `messages`, ending with the assistant's turn opener when
    /// `add_generation_prompt` is set.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        self.render_inputs(&ChatInputs::from_messages(messages, add_generation_prompt))
    }

    /// Renders `inputs` as transformers' `apply_chat_template` does: the
    /// `tool_use` template when there are tools and the model has one,
    /// else the default; `tools` and `documents` are `none` when absent;
    /// keyword arguments join the context (never replacing the names above).
    pub fn render_inputs(&self, inputs: &ChatInputs) -> Result<String> {
        let has_tools = inputs
            .tools
            .as_ref()
            .is_some_and(|t| t.as_array().is_none_or(|a| !a.is_empty()));
        let name = if has_tools && self.names.iter().any(|n| n == "tool_use") {
            "tool_use"
        } else if self.names.iter().any(|n| n == DEFAULT_TEMPLATE) {
            DEFAULT_TEMPLATE
        } else {
            self.names.first().map_or(DEFAULT_TEMPLATE, String::as_str)
        };
        let tmpl = self
            .env
            .get_template(name)
            .map_err(|e| ModelError::Template(e.to_string()))?;
        let json = |v: &Option<serde_json::Value>| match v {
            Some(v) => Value::from_serialize(v),
            None => Value::from(()),
        };
        let mut ctx: Vec<(String, Value)> = vec![
            ("messages".into(), Value::from_serialize(&inputs.messages)),
            ("tools".into(), json(&inputs.tools)),
            ("documents".into(), json(&inputs.documents)),
            (
                "add_generation_prompt".into(),
                Value::from(inputs.add_generation_prompt),
            ),
            ("bos_token".into(), Value::from(self.bos.clone())),
            ("eos_token".into(), Value::from(self.eos.clone())),
        ];
        for (k, v) in &inputs.kwargs {
            if !RESERVED.contains(&k.as_str()) {
                ctx.push((k.clone(), Value::from_serialize(v)));
            }
        }
        let first = tmpl.render(ctx.iter().cloned().collect::<Value>());
        let err = match first {
            Ok(text) => return Ok(text),
            Err(e) => ModelError::Template(e.to_string()),
        };
        // A template that refuses a system turn (Gemma 2, some Mistral
        // ones) gets it as the opening of the first user turn, as people
        // using those models write it.
        let Some(folded) = fold_system(&inputs.messages) else {
            return Err(err);
        };
        ctx[0].1 = Value::from_serialize(&folded);
        tmpl.render(ctx.into_iter().collect::<Value>())
            .map_err(|_| err)
    }
}

/// `messages` with a leading system turn folded into the user turn after
/// it, if it has one.
fn fold_system(messages: &serde_json::Value) -> Option<serde_json::Value> {
    let list = messages.as_array()?;
    let (sys, user) = (list.first()?, list.get(1)?);
    if sys.get("role")?.as_str()? != "system" || user.get("role")?.as_str()? != "user" {
        return None;
    }
    let (a, b) = (
        sys.get("content")?.as_str()?,
        user.get("content")?.as_str()?,
    );
    let mut merged = user.clone();
    merged["content"] = serde_json::Value::String(format!("{a}\n\n{b}"));
    let mut out = vec![merged];
    out.extend(list[2..].iter().cloned());
    Some(serde_json::Value::Array(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMOLLM2: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    #[test]
    fn a_template_refusing_system_turns_gets_it_in_the_first_user_turn() {
        let t = ChatTemplate::new(
            "{% for m in messages %}{% if m.role == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}[{{ m.role }}]{{ m.content }}{% endfor %}",
            "<s>",
            "</s>",
        )
        .unwrap();
        let out = t
            .render(
                &[
                    Message::new("system", "Be brief."),
                    Message::new("user", "Hi"),
                    Message::new("assistant", "Yo"),
                ],
                false,
            )
            .unwrap();
        assert_eq!(out, "[user]Be brief.\n\nHi[assistant]Yo");
        // With no user turn to fold it into, the template's own error.
        let e = t
            .render(&[Message::new("system", "Be brief.")], false)
            .unwrap_err();
        assert!(e.to_string().contains("System role not supported"), "{e}");
    }

    #[test]
    fn smollm2_inserts_default_system_prompt() {
        let t = ChatTemplate::new(SMOLLM2, "<|im_start|>", "<|im_end|>").unwrap();
        let out = t.render(&[Message::new("user", "Hi")], true).unwrap();
        assert_eq!(
            out,
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
        let out = t
            .render(
                &[
                    Message::new("system", "Be brief."),
                    Message::new("user", "Hi"),
                ],
                false,
            )
            .unwrap();
        assert_eq!(
            out,
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        );
    }

    #[test]
    fn python_methods_and_raise_exception_work() {
        let src = "{% if messages[0].role != 'user' %}{{ raise_exception('first must be user') }}{% endif %}{{ messages[0].content.strip() | upper }}";
        let t = ChatTemplate::new(src, "", "").unwrap();
        assert_eq!(
            t.render(&[Message::new("user", "  hi ")], false).unwrap(),
            "HI"
        );
        let err = t
            .render(&[Message::new("assistant", "x")], false)
            .unwrap_err();
        assert!(err.to_string().contains("first must be user"), "{err}");
    }

    #[test]
    fn tojson_writes_what_pythons_json_dumps_writes() {
        let t = ChatTemplate::new(
            "{{ x | tojson }}|{{ x | tojson(indent=2) }}|{{ x | tojson(sort_keys=true) }}|{{ [] | tojson }}",
            "",
            "",
        )
        .unwrap();
        let x = serde_json::json!({"b": [1, 2.5, "é\n\"q\""], "a": {}, "c": null, "d": true});
        let mut kwargs = serde_json::Map::new();
        kwargs.insert("x".into(), x);
        let out = t
            .render_inputs(&ChatInputs {
                messages: serde_json::json!([]),
                kwargs,
                ..ChatInputs::default()
            })
            .unwrap();
        assert_eq!(
            out,
            "{\"b\": [1, 2.5, \"é\\n\\\"q\\\"\"], \"a\": {}, \"c\": null, \"d\": true}|{\n  \"b\": [\n    1,\n    2.5,\n    \"é\\n\\\"q\\\"\"\n  ],\n  \"a\": {},\n  \"c\": null,\n  \"d\": true\n}|{\"a\": {}, \"b\": [1, 2.5, \"é\\n\\\"q\\\"\"], \"c\": null, \"d\": true}|[]"
        );
    }

    #[test]
    fn strftime_now_formats_today() {
        let t = ChatTemplate::new("{{ strftime_now('%Y-%m-%d') }}", "", "").unwrap();
        let out = t.render(&[], false).unwrap();
        let utc = time::OffsetDateTime::now_utc();
        let y = utc.year().to_string();
        assert_eq!(out.len(), 10, "{out}");
        // Local time may be a day off UTC, never a year off but at New Year.
        assert!(
            out.starts_with(&y)
                || out.starts_with(&(utc.year() - 1).to_string())
                || out.starts_with(&(utc.year() + 1).to_string()),
            "{out}"
        );
        let bad = ChatTemplate::new("{{ strftime_now('%Q') }}", "", "").unwrap();
        assert!(bad.render(&[], false).is_err());
    }

    #[test]
    fn the_tool_use_template_is_picked_when_tools_are_given() {
        let t = ChatTemplate::named(
            &[
                ("default".into(), "plain".into()),
                ("tool_use".into(), "tools: {{ tools | length }}".into()),
            ],
            "",
            "",
        )
        .unwrap();
        let mut inputs = ChatInputs::from_messages(&[Message::new("user", "x")], true);
        assert_eq!(t.render_inputs(&inputs).unwrap(), "plain");
        inputs.tools = Some(serde_json::json!([{"type": "function"}]));
        assert_eq!(t.render_inputs(&inputs).unwrap(), "tools: 1");
        // A keyword argument cannot replace the messages.
        inputs
            .kwargs
            .insert("messages".into(), serde_json::json!("hijack"));
        assert_eq!(t.render_inputs(&inputs).unwrap(), "tools: 1");
    }

    #[test]
    fn bad_template_is_an_error() {
        assert!(ChatTemplate::new("{% for %}", "", "").is_err());
        // A broken variant beside a good default is left out.
        let t = ChatTemplate::named(
            &[
                ("default".into(), "ok".into()),
                ("tool_use".into(), "{% for %}".into()),
            ],
            "",
            "",
        )
        .unwrap();
        assert_eq!(t.names(), ["default"]);
        assert!(
            ChatTemplate::named(
                &[
                    ("default".into(), "{% for %}".into()),
                    ("tool_use".into(), "ok".into())
                ],
                "",
                ""
            )
            .is_err()
        );
    }
}
