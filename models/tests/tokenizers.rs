//! GGUF SentencePiece (`tokenizer.ggml.model = llama`) vocabularies against
//! the sentencepiece library itself: a tiny byte-fallback BPE model trained
//! by tests/fixtures/make_spm_reference.py, written as llama.cpp's converter
//! writes GGUF metadata, and sentencepiece's ids and decoded text for
//! texts with spaces, digits, newlines, accents, CJK and emoji (bytes).

use candle_core::quantized::gguf_file::Value;
use hearth_models::Tokenizer;
use hearth_models::weights::GgufMetadata;

fn fixture(name: &str) -> serde_json::Value {
    let p = hearth_test_utils::workspace_root()
        .join("tests/fixtures/spm")
        .join(name);
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

/// The vocabulary as GGUF metadata; `add_bos` absent when `None`.
fn metadata(add_bos: Option<bool>) -> GgufMetadata {
    let v = fixture("vocab.json");
    let arr = |k: &str, f: &dyn Fn(&serde_json::Value) -> Value| {
        Value::Array(v[k].as_array().unwrap().iter().map(f).collect())
    };
    let mut m = GgufMetadata::new();
    m.insert("tokenizer.ggml.model".into(), Value::String("llama".into()));
    m.insert(
        "tokenizer.ggml.tokens".into(),
        arr("tokens", &|t| Value::String(t.as_str().unwrap().into())),
    );
    m.insert(
        "tokenizer.ggml.scores".into(),
        arr("scores", &|t| Value::F32(t.as_f64().unwrap() as f32)),
    );
    m.insert(
        "tokenizer.ggml.token_type".into(),
        arr("token_type", &|t| Value::I32(t.as_i64().unwrap() as i32)),
    );
    for k in ["unknown_token_id", "bos_token_id", "eos_token_id"] {
        m.insert(
            format!("tokenizer.ggml.{k}"),
            Value::U32(v[k].as_u64().unwrap() as u32),
        );
    }
    if let Some(b) = add_bos {
        m.insert("tokenizer.ggml.add_bos_token".into(), Value::Bool(b));
    }
    m
}

#[test]
fn sentencepiece_gguf_vocabulary_encodes_and_decodes_as_sentencepiece() {
    let tok = Tokenizer::from_gguf(&metadata(Some(false))).unwrap();
    let cases = fixture("reference.json");
    let mut checked = 0;
    for c in cases["cases"].as_array().unwrap() {
        let text = c["text"].as_str().unwrap();
        let want: Vec<u32> = serde_json::from_value(c["ids"].clone()).unwrap();
        let got = tok.encode(text).unwrap();
        assert_eq!(got, want, "{text:?}");
        let decoded = tok.decode(&got).unwrap();
        assert_eq!(decoded, c["decoded"].as_str().unwrap(), "{text:?}");
        checked += 1;
    }
    assert!(checked >= 10);
    // Bytes the vocabulary lacks went through byte pieces, not <unk>.
    let emoji = tok.encode("🙂").unwrap();
    assert!(emoji.len() >= 4 && !emoji.contains(&0), "{emoji:?}");
}

#[test]
fn a_sentencepiece_vocabulary_starts_with_bos_unless_told_not_to() {
    let bos = fixture("vocab.json")["bos_token_id"].as_u64().unwrap() as u32;
    let tok = Tokenizer::from_gguf(&metadata(None)).unwrap();
    assert_eq!(tok.encode("Hello").unwrap().first(), Some(&bos));
    let tok = Tokenizer::from_gguf(&metadata(Some(false))).unwrap();
    assert_ne!(tok.encode("Hello").unwrap().first(), Some(&bos));
}

#[test]
fn a_sentencepiece_vocabulary_with_missing_or_mismatched_scores_is_an_error() {
    let mut m = metadata(None);
    m.remove("tokenizer.ggml.scores");
    let err = Tokenizer::from_gguf(&m).unwrap_err().to_string();
    assert!(err.contains("scores"), "{err}");
    let mut m = metadata(None);
    m.insert(
        "tokenizer.ggml.scores".into(),
        Value::Array(vec![Value::F32(0.0); 3]),
    );
    let err = Tokenizer::from_gguf(&m).unwrap_err().to_string();
    assert!(err.contains("scores"), "{err}");
    let mut m = metadata(None);
    m.insert("tokenizer.ggml.model".into(), Value::String("bert".into()));
    assert!(Tokenizer::from_gguf(&m).is_err());
}
