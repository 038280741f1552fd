//! Mistral's `tekken.json` read as Mistral's own library reads it
//! (tests/fixtures/make_tekken_reference.py, mistral-common 1.13.1): token
//! ids of hard strings, and chats rendered by the template that goes with
//! the file's version and tokenized, against its instruct tokenizers' ids
//! (v3 as shipped, and the same vocabulary declared v7). The tekken file is
//! Mistral Nemo's, from the mistral-common wheel (scripts/test.sh puts it
//! in .cache/).

use hearth_models::Tokenizer;
use hearth_models::chat::{ChatInputs, ChatTemplate};
use serde_json::Value;

fn tekken_file() -> Option<std::path::PathBuf> {
    let p = hearth_test_utils::workspace_root().join(".cache/tekken_240718.json");
    if p.is_file() {
        return Some(p);
    }
    assert!(
        std::env::var_os("HEARTH_REQUIRE_MODEL").is_none(),
        "{} is missing (scripts/test.sh extracts it from the mistral-common wheel)",
        p.display()
    );
    eprintln!(
        "skipped: {} is missing (scripts/test.sh extracts it from the mistral-common wheel)",
        p.display()
    );
    None
}

/// A model folder holding only `tekken.json` (declared `version`).
fn folder(src: &std::path::Path, version: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let mut v: Value = serde_json::from_str(&std::fs::read_to_string(src).unwrap()).unwrap();
    v["config"]["version"] = Value::from(version);
    std::fs::write(dir.path().join("tekken.json"), v.to_string()).unwrap();
    dir
}

#[test]
fn tekken_folders_tokenize_and_chat_as_mistral_common() {
    let Some(src) = tekken_file() else { return };
    let reference: Value = serde_json::from_str(
        &std::fs::read_to_string(
            hearth_test_utils::workspace_root().join("tests/fixtures/tekken/reference.json"),
        )
        .unwrap(),
    )
    .unwrap();
    for version in ["v3", "v7"] {
        let dir = folder(&src, version);
        let tok = Tokenizer::from_dir(dir.path()).unwrap();
        assert_eq!(tok.vocab_size(), 131_072);
        assert_eq!(tok.bos_id(), Some(1));
        assert_eq!(tok.eos_ids(), &[2]);
        for case in reference["texts"].as_array().unwrap() {
            let text = case["text"].as_str().unwrap();
            let want: Vec<u32> = serde_json::from_value(case["ids"].clone()).unwrap();
            assert_eq!(tok.decode(&want).unwrap(), text, "{text:?}");
            if text.contains("[INST]") {
                // Hearth reads a rendered prompt's control-token text as
                // the token (as llama.cpp does); mistral-common's plain
                // `encode` spells it out.
                let ids = tok.encode(text).unwrap();
                assert_eq!(ids[0], 3, "{ids:?}");
                assert!(ids.contains(&4) && ids.contains(&1) && ids.contains(&2));
                continue;
            }
            assert_eq!(tok.encode(text).unwrap(), want, "{text:?}");
        }
        let template = tok.chat_template().unwrap();
        let t = ChatTemplate::new(template, "<s>", "</s>").unwrap();
        let mut chats = 0;
        for case in reference["chats"].as_array().unwrap() {
            if case["version"] != version {
                continue;
            }
            let inputs = ChatInputs {
                messages: case["messages"].clone(),
                tools: None,
                documents: None,
                add_generation_prompt: true,
                kwargs: Default::default(),
            };
            let text = t.render_inputs(&inputs).unwrap();
            assert_eq!(text, case["text"].as_str().unwrap(), "{version}");
            let want: Vec<u32> = serde_json::from_value(case["ids"].clone()).unwrap();
            assert_eq!(tok.encode(&text).unwrap(), want, "{version}: {text:?}");
            chats += 1;
        }
        assert_eq!(chats, 3, "{version}");
    }
}

#[test]
fn a_broken_tekken_file_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    for bad in [
        "{}",
        r#"{"config": {"pattern": "\\s+", "default_vocab_size": 10, "default_num_special_tokens": 2}, "vocab": []}"#,
        r#"{"config": {"pattern": "\\s+", "default_vocab_size": 4, "default_num_special_tokens": 2}, "vocab": [{"rank": 0, "token_bytes": "!!"}, {"rank": 1, "token_bytes": "YQ=="}]}"#,
        r#"{"config": {"pattern": "\\s+", "default_vocab_size": 4, "default_num_special_tokens": 2}, "vocab": [{"rank": 0, "token_bytes": "YQ=="}, {"rank": 0, "token_bytes": "Yg=="}]}"#,
        r#"{"config": {"pattern": "\\s+", "default_vocab_size": 3, "default_num_special_tokens": 1}, "special_tokens": [{"rank": 5, "token_str": "<s>"}], "vocab": [{"rank": 0, "token_bytes": "YQ=="}, {"rank": 1, "token_bytes": "Yg=="}]}"#,
    ] {
        std::fs::write(dir.path().join("tekken.json"), bad).unwrap();
        let e = Tokenizer::from_dir(dir.path()).unwrap_err();
        assert!(e.to_string().contains("tekken.json"), "{e}");
    }
}
