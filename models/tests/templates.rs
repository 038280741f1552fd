//! Chat templates against Hugging Face transformers' own renderer
//! (tests/fixtures/make_template_reference.py): tools and tool calls, the
//! tool role, documents, `enable_thinking` and other keyword arguments,
//! loop controls, `tojson`; and where a model keeps its templates.

use hearth_models::chat::{ChatInputs, ChatTemplate};
use hearth_models::{Message, ModelText, TemplateSource, Tokenizer, WeightFile};
use hearth_test_utils::{TinySpec, tiny_model};

#[test]
fn templates_render_what_transformers_renders() {
    let path = hearth_test_utils::workspace_root().join("tests/fixtures/templates/reference.json");
    let fixture: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let mut checked = 0;
    for case in fixture["cases"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let t = ChatTemplate::new(case["template"].as_str().unwrap(), "<s>", "</s>").unwrap();
        let opt = |k: &str| Some(case[k].clone()).filter(|v| !v.is_null());
        let inputs = ChatInputs {
            messages: case["messages"].clone(),
            tools: opt("tools"),
            documents: opt("documents"),
            add_generation_prompt: case["add_generation_prompt"].as_bool().unwrap(),
            kwargs: case["kwargs"].as_object().cloned().unwrap_or_default(),
        };
        let got = t.render_inputs(&inputs).unwrap();
        assert_eq!(got, case["rendered"].as_str().unwrap(), "case {name}");
        checked += 1;
    }
    assert!(checked >= 12);
}

/// A copy of a tiny model folder without its chat template.
fn bare_folder(dir: &std::path::Path) -> std::path::PathBuf {
    let m = tiny_model(&dir.join("m"), TinySpec::default()).unwrap();
    let st = m.safetensors_dir;
    let cfg = st.join("tokenizer_config.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg).unwrap()).unwrap();
    v.as_object_mut().unwrap().remove("chat_template");
    std::fs::write(&cfg, v.to_string()).unwrap();
    st
}

#[test]
fn a_folder_keeps_templates_in_a_jinja_file_or_as_a_named_list() {
    let dir = tempfile::tempdir().unwrap();
    let st = bare_folder(dir.path());
    // None: ChatML, and the model text says so.
    let w = WeightFile::open(&st).unwrap();
    let text = ModelText::load(&w).unwrap();
    assert_eq!(text.template_source(), TemplateSource::ChatmlFallback);
    assert!(
        text.render(&[Message::new("user", "hi")], true)
            .unwrap()
            .contains("<|im_start|>user\nhi<|im_end|>")
    );
    // Only a chat_template.json (as processors save it): read from there.
    let side = st.join("chat_template.json");
    std::fs::write(&side, r#"{"chat_template": "S{{ messages[0].content }}"}"#).unwrap();
    let text = ModelText::load(&WeightFile::open(&st).unwrap()).unwrap();
    assert_eq!(text.template_source(), TemplateSource::Model);
    assert_eq!(
        text.render(&[Message::new("user", "x")], true).unwrap(),
        "Sx"
    );
    std::fs::remove_file(&side).unwrap();
    // A named list in tokenizer_config.json: default and tool_use.
    let cfg = st.join("tokenizer_config.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg).unwrap()).unwrap();
    v["chat_template"] = serde_json::json!([
        {"name": "tool_use", "template": "T{{ tools | length }}"},
        {"name": "default", "template": "D{{ messages | length }}"}
    ]);
    std::fs::write(&cfg, v.to_string()).unwrap();
    let tok = Tokenizer::from_dir(&st).unwrap();
    let names: Vec<&str> = tok
        .chat_templates()
        .iter()
        .map(|(n, _)| n.as_str())
        .collect();
    assert_eq!(names, ["default", "tool_use"]);
    let text = ModelText::load(&WeightFile::open(&st).unwrap()).unwrap();
    assert_eq!(text.template_source(), TemplateSource::Model);
    let mut inputs = ChatInputs::from_messages(&[Message::new("user", "x")], true);
    assert_eq!(text.render_inputs(&inputs).unwrap(), "D1");
    inputs.tools = Some(serde_json::json!([{"type": "function"}, {"type": "function"}]));
    assert_eq!(text.render_inputs(&inputs).unwrap(), "T2");
    // chat_template.jinja wins over tokenizer_config.json's default.
    std::fs::write(st.join("chat_template.jinja"), "J{{ messages[0].content }}").unwrap();
    let text = ModelText::load(&WeightFile::open(&st).unwrap()).unwrap();
    assert_eq!(
        text.render(&[Message::new("user", "x")], true).unwrap(),
        "Jx"
    );
    // A given template replaces them all.
    let given = ModelText::load_with(&WeightFile::open(&st).unwrap(), Some("G")).unwrap();
    assert_eq!(given.template_source(), TemplateSource::Given);
    assert_eq!(given.render(&[], true).unwrap(), "G");
    // A broken one is a clear error.
    let err = ModelText::load_with(&WeightFile::open(&st).unwrap(), Some("{% for %}"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("template"), "{err}");
}

#[test]
fn a_gguf_keeps_named_templates_beside_the_default() {
    use candle_core::quantized::gguf_file::Value;
    let dir = tempfile::tempdir().unwrap();
    let m = tiny_model(dir.path(), TinySpec::default()).unwrap();
    let w = WeightFile::open(&m.gguf_q8_0).unwrap();
    let mut meta = w.gguf_metadata().unwrap().clone();
    meta.insert(
        "tokenizer.chat_template.tool_use".into(),
        Value::String("tools!".into()),
    );
    let tok = Tokenizer::from_gguf(&meta).unwrap();
    let names: Vec<&str> = tok
        .chat_templates()
        .iter()
        .map(|(n, _)| n.as_str())
        .collect();
    assert_eq!(names, ["default", "tool_use"]);
}
