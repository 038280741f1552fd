//! Hearth against llama.cpp on the real SmolLM2-135M-Instruct Q4_1 GGUF.
//!
//! The fixture `tests/fixtures/llamacpp_golden.json` was made once by
//! `tests/fixtures/make_llamacpp_golden.py` (llama-cpp-python, F32 KV cache,
//! greedy). It holds, per chat prompt, llama.cpp's prompt ids, its greedy
//! output ids and the top-2 logit margin at every generated position.

use anyhow::{Context, Result};
use hearth_models::{GenerateRequest, LocalModel, Logits, Message, Precision, StageInput};
use serde::Deserialize;

#[derive(Deserialize)]
struct Golden {
    tokenizer_cases: Vec<TokCase>,
    cases: Vec<Case>,
}

#[derive(Deserialize)]
struct TokCase {
    text: String,
    ids: Vec<u32>,
}

#[derive(Deserialize)]
struct Case {
    user: String,
    prompt: String,
    prompt_ids: Vec<u32>,
    token_ids: Vec<u32>,
    top2_margins: Vec<f32>,
}

/// Below this top-2 margin llama.cpp's own choice is a coin flip at our precision.
const MARGIN: f32 = 0.3;

fn golden() -> Result<Golden> {
    let path = hearth_test_utils::workspace_root().join("tests/fixtures/llamacpp_golden.json");
    let text = std::fs::read_to_string(&path).with_context(|| path.display().to_string())?;
    Ok(serde_json::from_str(&text)?)
}

fn load(precision: Precision) -> Result<Option<LocalModel>> {
    let Some(path) = hearth_test_utils::real_model() else {
        return Ok(None);
    };
    Ok(Some(LocalModel::load(&path, precision)?))
}

#[test]
fn tokenizer_ids_equal_llama_cpp_and_round_trip() -> Result<()> {
    let Some(model) = load(Precision::Quantized)? else {
        return Ok(());
    };
    let g = golden()?;
    for c in &g.tokenizer_cases {
        let ids = model.tokenizer().encode(&c.text)?;
        assert_eq!(ids, c.ids, "ids for {:?}", c.text);
        let back = model.tokenizer().decode_with_special(&ids)?;
        assert_eq!(back, c.text, "round trip of {:?}", c.text);
    }
    Ok(())
}

#[test]
fn chat_prompts_render_and_tokenize_like_llama_cpp() -> Result<()> {
    let Some(model) = load(Precision::Quantized)? else {
        return Ok(());
    };
    for c in golden()?.cases {
        let rendered = model.render_chat(&[Message::new("user", c.user.clone())])?;
        assert_eq!(rendered, c.prompt);
        assert_eq!(model.encode_prompt(&rendered)?, c.prompt_ids);
    }
    Ok(())
}

/// Index of the first position where llama.cpp itself was unsure.
fn confident_prefix(c: &Case) -> usize {
    c.top2_margins
        .iter()
        .position(|&m| m < MARGIN)
        .unwrap_or(c.top2_margins.len())
        .min(c.token_ids.len())
}

#[test]
fn greedy_generation_equals_llama_cpp_up_to_first_low_margin() -> Result<()> {
    let Some(model) = load(Precision::Quantized)? else {
        return Ok(());
    };
    let mut compared = 0;
    for c in golden()?.cases {
        let req = GenerateRequest {
            prompt_ids: c.prompt_ids.clone(),
            max_tokens: c.token_ids.len().max(1),
            sampling: Default::default(),
            stop: vec![],
        };
        let out = model.generate(&req, |_| {})?;
        let n = confident_prefix(&c);
        assert_eq!(
            out.token_ids.get(..n),
            c.token_ids.get(..n),
            "prompt {:?}: first {n} tokens differ",
            c.user
        );
        compared += n;
    }
    eprintln!("compared {compared} free-running greedy tokens");
    Ok(())
}

/// (prompt, generated position, llama.cpp's top-2 margin there).
type Disagreement = (String, usize, f32);

/// Feeds llama.cpp's own tokens through `stage` and compares our argmax
/// with llama.cpp's token at every position where its top-2 margin is at
/// least `min_margin`. Returns (positions checked, disagreements as
/// (prompt, position, margin)).
fn teacher_forced(
    stage: &hearth_models::Stage,
    min_margin: f32,
) -> Result<(usize, Vec<Disagreement>)> {
    let mut checked = 0;
    let mut disagreements = Vec::new();
    for c in golden()?.cases {
        let mut seq = c.prompt_ids.clone();
        seq.extend(&c.token_ids);
        let mut cache = stage.new_cache();
        let logits = stage.forward(
            StageInput::Tokens(seq.clone()),
            &[seq.len()],
            &mut [&mut cache],
            Logits::All,
        )?;
        let p = c.prompt_ids.len();
        for (i, &m) in c.top2_margins.iter().enumerate() {
            if m < min_margin || i >= c.token_ids.len() {
                continue;
            }
            checked += 1;
            let ours = logits.get(p - 1 + i)?.argmax(0)?.to_scalar::<u32>()?;
            if ours != c.token_ids[i] {
                disagreements.push((c.user.clone(), i, m));
            }
        }
    }
    Ok((checked, disagreements))
}

/// Feeds llama.cpp's own tokens and checks our argmax at every position
/// where llama.cpp was confident: this covers whole sequences, not just the
/// prefix before the first near-tie.
#[test]
fn teacher_forced_argmax_equals_llama_cpp_where_confident() -> Result<()> {
    let Some(model) = load(Precision::Quantized)? else {
        return Ok(());
    };
    let (checked, disagreements) = teacher_forced(model.stage(), MARGIN)?;
    eprintln!(
        "teacher-forced: {}/{checked} confident positions agree",
        checked - disagreements.len()
    );
    assert!(checked > 100, "too few positions checked: {checked}");
    assert!(
        disagreements.is_empty(),
        "disagreements (prompt, position, margin): {disagreements:?}"
    );
    Ok(())
}

/// The f32 path (dequantized weights, differentiable ops) follows llama.cpp's
/// choices where it is very sure: it differs from llama.cpp only by not
/// quantizing activations.
#[test]
fn f32_path_agrees_where_llama_cpp_is_very_sure() -> Result<()> {
    let Some(model) = load(Precision::F32)? else {
        return Ok(());
    };
    let (checked, disagreements) = teacher_forced(model.stage(), 2.0)?;
    let agree = checked - disagreements.len();
    eprintln!("f32 path: {agree}/{checked} very confident positions agree");
    assert!(checked > 50);
    assert!(agree as f64 >= 0.97 * checked as f64, "{agree}/{checked}");
    Ok(())
}
