//! The decoder on tiny random-weight models: stage slicing, ragged batching,
//! format equivalence (GGUF with llama.cpp's Q/K permutation vs safetensors),
//! quantized vs f32, and every bad input giving its error.

use anyhow::Result;
use candle_core::Tensor;
use hearth_models::{
    KvCache, LocalModel, Logits, ModelError, Precision, Stage, StageInput, StageSpec, WeightFile,
};
use hearth_test_utils::{TinyModel, TinySpec, tiny_model};

fn tiny(spec: TinySpec) -> Result<(tempfile::TempDir, TinyModel)> {
    let dir = tempfile::tempdir()?;
    let m = tiny_model(dir.path(), spec)?;
    Ok((dir, m))
}

fn max_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
    Ok((a - b)?.abs()?.max_all()?.to_scalar::<f32>()?)
}

fn max_abs(a: &Tensor) -> Result<f32> {
    Ok(a.abs()?.max_all()?.to_scalar::<f32>()?)
}

const PROMPT: [u32; 9] = [1, 40, 77, 100, 200, 5, 262, 3, 150];

/// Full-model logits for all positions of `ids`.
fn full_logits(w: &WeightFile, p: Precision, ids: &[u32]) -> Result<Tensor> {
    let st = Stage::load(w, StageSpec::full(w.config().num_hidden_layers), p)?;
    let mut c = st.new_cache();
    Ok(st.forward(
        StageInput::Tokens(ids.to_vec()),
        &[ids.len()],
        &mut [&mut c],
        Logits::All,
    )?)
}

/// The unquantized reference: safetensors weights on the f32 path.
fn reference_logits(m: &TinyModel) -> Result<Tensor> {
    full_logits(
        &WeightFile::open(&m.safetensors_dir)?,
        Precision::F32,
        &PROMPT,
    )
}

#[test]
fn chained_stages_equal_the_full_model() -> Result<()> {
    let (_d, m) = tiny(TinySpec::default())?;
    for path in [&m.gguf_f32, &m.gguf_q8_0] {
        let w = WeightFile::open(path)?;
        for precision in [Precision::F32, Precision::Quantized] {
            let n = w.config().num_hidden_layers;
            let full = Stage::load(&w, StageSpec::full(n), precision)?;
            for k in 1..n {
                let a = Stage::load(
                    &w,
                    StageSpec {
                        start: 0,
                        end: k,
                        embed: true,
                        head: false,
                    },
                    precision,
                )?;
                let b = Stage::load(
                    &w,
                    StageSpec {
                        start: k,
                        end: n,
                        embed: false,
                        head: true,
                    },
                    precision,
                )?;
                let (mut cf, mut ca, mut cb) = (full.new_cache(), a.new_cache(), b.new_cache());
                // Prefill then three decode steps, compared at every step.
                let mut input: Vec<u32> = PROMPT.to_vec();
                for _ in 0..4 {
                    let len = input.len();
                    let want = full.forward(
                        StageInput::Tokens(input.clone()),
                        &[len],
                        &mut [&mut cf],
                        Logits::Last,
                    )?;
                    let h = a.forward(
                        StageInput::Tokens(input.clone()),
                        &[len],
                        &mut [&mut ca],
                        Logits::Last,
                    )?;
                    assert_eq!(h.dims(), [len, w.config().hidden_size]);
                    let got =
                        b.forward(StageInput::Hidden(h), &[len], &mut [&mut cb], Logits::Last)?;
                    assert_eq!(
                        max_diff(&want, &got)?,
                        0.0,
                        "{path:?} {precision:?} split at {k}"
                    );
                    let next = want.squeeze(0)?.argmax(0)?.to_scalar::<u32>()?;
                    input = vec![next];
                }
            }
        }
    }
    Ok(())
}

#[test]
fn ragged_batch_equals_sequences_run_alone() -> Result<()> {
    let (_d, m) = tiny(TinySpec::default())?;
    let w = WeightFile::open(&m.gguf_q8_0)?;
    for precision in [Precision::F32, Precision::Quantized] {
        let st = Stage::load(&w, StageSpec::full(4), precision)?;
        let prompts: [&[u32]; 3] = [&PROMPT, &[5, 6], &[100, 101, 102, 103, 104]];
        // Alone: prefill, then one decode step each.
        let mut alone = Vec::new();
        let mut caches: Vec<KvCache> = Vec::new();
        for p in prompts {
            let mut c = st.new_cache();
            st.forward(
                StageInput::Tokens(p.to_vec()),
                &[p.len()],
                &mut [&mut c],
                Logits::Last,
            )?;
            let l = st.forward(
                StageInput::Tokens(vec![7]),
                &[1],
                &mut [&mut c],
                Logits::Last,
            )?;
            alone.push(l);
            let mut c2 = st.new_cache();
            st.forward(
                StageInput::Tokens(p.to_vec()),
                &[p.len()],
                &mut [&mut c2],
                Logits::Last,
            )?;
            caches.push(c2);
        }
        // Together: one decode step for the three sequences at different positions,
        // plus a fresh sequence's prefill in the same batch.
        let mut fresh = st.new_cache();
        let mut refs: Vec<&mut KvCache> = caches.iter_mut().collect();
        refs.push(&mut fresh);
        let ids = vec![7, 7, 7, 9, 8, 7];
        let out = st.forward(
            StageInput::Tokens(ids),
            &[1, 1, 1, 3],
            &mut refs,
            Logits::Last,
        )?;
        assert_eq!(out.dims(), [4, m.vocab]);
        for (i, a) in alone.iter().enumerate() {
            let d = max_diff(&out.narrow(0, i, 1)?, a)?;
            assert!(
                d < 1e-4 * max_abs(a)?.max(1.0),
                "{precision:?} seq {i}: {d}"
            );
        }
        let mut c = st.new_cache();
        let f = st.forward(
            StageInput::Tokens(vec![9, 8, 7]),
            &[3],
            &mut [&mut c],
            Logits::Last,
        )?;
        assert!(max_diff(&out.narrow(0, 3, 1)?, &f)? < 1e-4 * max_abs(&f)?.max(1.0));
    }
    Ok(())
}

#[test]
fn gguf_permuted_qk_equals_safetensors() -> Result<()> {
    for bias in [false, true] {
        let spec = TinySpec {
            attention_bias: bias,
            tied: !bias,
            ..TinySpec::default()
        };
        let (_d, m) = tiny(spec)?;
        let st = reference_logits(&m)?;
        let gg = full_logits(&WeightFile::open(&m.gguf_f32)?, Precision::F32, &PROMPT)?;
        let d = max_diff(&st, &gg)?;
        assert!(d < 1e-4, "bias={bias}: {d}");
        // Quantized path on an f32 GGUF agrees too (fused kernels only).
        let q = full_logits(
            &WeightFile::open(&m.gguf_f32)?,
            Precision::Quantized,
            &PROMPT,
        )?;
        assert!(max_diff(&st, &q)? < 1e-3 * max_abs(&st)?);
    }
    Ok(())
}

#[test]
fn quantized_and_f32_paths_are_close() -> Result<()> {
    let (_d, m) = tiny(TinySpec::default())?;
    let reference = reference_logits(&m)?;
    let scale = max_abs(&reference)?;
    for (path, tol) in [(&m.gguf_q8_0, 0.05), (&m.gguf_q4_1, 0.25)] {
        let w = WeightFile::open(path)?;
        let q = full_logits(&w, Precision::Quantized, &PROMPT)?;
        let f = full_logits(&w, Precision::F32, &PROMPT)?;
        let dq = max_diff(&q, &reference)? / scale;
        let df = max_diff(&f, &reference)? / scale;
        assert!(dq < tol, "{path:?}: quantized rel err {dq}");
        assert!(df < tol, "{path:?}: dequantized f32 rel err {df}");
        // Greedy choices at the last position agree.
        let last = |t: &Tensor| -> Result<u32> {
            Ok(t.get(PROMPT.len() - 1)?.argmax(0)?.to_scalar::<u32>()?)
        };
        assert_eq!(last(&q)?, last(&reference)?, "{path:?}");
    }
    Ok(())
}

#[test]
fn generation_is_the_same_from_every_format() -> Result<()> {
    let (_d, m) = tiny(TinySpec::default())?;
    let req = |model: &LocalModel| -> Result<Vec<u32>> {
        let ids = model.encode_prompt(
            &model.render_chat(&[hearth_models::Message::new("user", "the cat")])?,
        )?;
        let r = hearth_models::GenerateRequest {
            prompt_ids: ids,
            max_tokens: 12,
            sampling: Default::default(),
            stop: vec![],
        };
        Ok(model.generate(&r, |_| {})?.token_ids)
    };
    let a = req(&LocalModel::load(&m.gguf_f32, Precision::F32)?)?;
    let b = req(&LocalModel::load(&m.safetensors_dir, Precision::F32)?)?;
    assert_eq!(a, b);
    assert!(!a.is_empty());
    Ok(())
}

#[test]
fn bad_stage_inputs_are_errors() -> Result<()> {
    let (_d, m) = tiny(TinySpec::default())?;
    let w = WeightFile::open(&m.gguf_q8_0)?;
    assert!(matches!(
        Stage::load(
            &w,
            StageSpec {
                start: 2,
                end: 9,
                embed: false,
                head: false
            },
            Precision::F32
        ),
        Err(ModelError::BadLayerRange { .. })
    ));
    let first = Stage::load(
        &w,
        StageSpec {
            start: 0,
            end: 2,
            embed: true,
            head: false,
        },
        Precision::F32,
    )?;
    let second = Stage::load(
        &w,
        StageSpec {
            start: 2,
            end: 4,
            embed: false,
            head: true,
        },
        Precision::F32,
    )?;
    let mut c = first.new_cache();
    // Token outside the vocabulary.
    let r = first.forward(
        StageInput::Tokens(vec![100_000]),
        &[1],
        &mut [&mut c],
        Logits::Last,
    );
    assert!(
        matches!(r, Err(ModelError::TokenOutOfRange { .. })),
        "{r:?}"
    );
    // Lengths that do not match.
    let r = first.forward(
        StageInput::Tokens(vec![1, 2]),
        &[3],
        &mut [&mut c],
        Logits::Last,
    );
    assert!(matches!(r, Err(ModelError::BadStageInput(_))));
    // Hidden states of the wrong shape / to the wrong stage.
    let h = Tensor::zeros((2, 7), candle_core::DType::F32, &candle_core::Device::Cpu)?;
    let mut c2 = second.new_cache();
    let r = second.forward(
        StageInput::Hidden(h.clone()),
        &[2],
        &mut [&mut c2],
        Logits::Last,
    );
    assert!(matches!(r, Err(ModelError::BadStageInput(_))));
    let r = first.forward(StageInput::Hidden(h), &[2], &mut [&mut c], Logits::Last);
    assert!(matches!(r, Err(ModelError::BadStageInput(_))));
    let r = second.forward(
        StageInput::Tokens(vec![1]),
        &[1],
        &mut [&mut c2],
        Logits::Last,
    );
    assert!(matches!(r, Err(ModelError::BadStageInput(_))));
    // Past the context length (128 in the tiny model).
    let long: Vec<u32> = (0..129).map(|i| i % 200).collect();
    let r = first.forward(
        StageInput::Tokens(long),
        &[129],
        &mut [&mut c],
        Logits::Last,
    );
    assert!(matches!(r, Err(ModelError::PromptTooLong { .. })));
    Ok(())
}

#[test]
fn bad_files_give_clear_errors() -> Result<()> {
    let (d, m) = tiny(TinySpec::default())?;
    // Missing.
    let r = WeightFile::open(&d.path().join("nope.gguf"));
    assert!(matches!(r, Err(ModelError::NotFound { .. })), "{r:?}");
    // Not a GGUF at all.
    let junk = d.path().join("junk.gguf");
    std::fs::write(&junk, b"this is not a model")?;
    let r = WeightFile::open(&junk);
    assert!(matches!(r, Err(ModelError::BadGguf { .. })), "{r:?}");
    // Empty file.
    std::fs::write(&junk, b"")?;
    assert!(WeightFile::open(&junk).is_err());
    // Truncated: cut in the tensor data, and cut in the header.
    let bytes = std::fs::read(&m.gguf_q8_0)?;
    let cut = d.path().join("cut.gguf");
    std::fs::write(&cut, &bytes[..bytes.len() - 1000])?;
    let r = WeightFile::open(&cut);
    assert!(matches!(r, Err(ModelError::Truncated { .. })), "{r:?}");
    std::fs::write(&cut, &bytes[..2000])?;
    let r = WeightFile::open(&cut);
    assert!(matches!(r, Err(ModelError::BadGguf { .. })), "{r:?}");
    // Random bit flips in the header must never panic.
    for i in 0..200 {
        let mut b = bytes[..4096].to_vec();
        let pos = (i * 7919) % b.len();
        b[pos] ^= 1 << (i % 8);
        b.extend_from_slice(&bytes[4096..]);
        std::fs::write(&cut, &b)?;
        if let Ok(w) = WeightFile::open(&cut) {
            let _ = Stage::load(
                &w,
                StageSpec::full(w.config().num_hidden_layers.min(4)),
                Precision::Quantized,
            );
        }
    }
    // Unsupported architecture.
    let spec = TinySpec {
        architecture: "gpt_neox",
        ..TinySpec::default()
    };
    let (_d2, m2) = tiny(spec)?;
    let r = WeightFile::open(&m2.gguf_q8_0);
    assert!(
        matches!(r, Err(ModelError::UnsupportedArchitecture { .. })),
        "{r:?}"
    );
    // Unsupported tensor type (IQ2_XXS = 16).
    hearth_test_utils::gguf_with_tensor_type(&m.gguf_q8_0, &cut, "token_embd.weight", 16)?;
    let r = WeightFile::open(&cut);
    assert!(
        matches!(r, Err(ModelError::UnsupportedQuant { .. })),
        "{r:?}"
    );
    Ok(())
}

#[test]
fn empty_and_too_long_prompts_are_errors() -> Result<()> {
    let (_d, m) = tiny(TinySpec::default())?;
    let model = LocalModel::load(&m.gguf_q8_0, Precision::Quantized)?;
    assert!(matches!(
        model.encode_prompt(""),
        Err(ModelError::EmptyPrompt)
    ));
    assert!(matches!(
        model.encode_prompt("  \n"),
        Err(ModelError::EmptyPrompt)
    ));
    let long = "word ".repeat(200);
    assert!(matches!(
        model.encode_prompt(&long),
        Err(ModelError::PromptTooLong { .. })
    ));
    Ok(())
}

#[test]
fn k_quants_and_q4_0_run_close_to_f32() -> Result<()> {
    use candle_core::quantized::GgmlDType;
    let spec = TinySpec {
        hidden: 256,
        intermediate: 512,
        heads: 4,
        kv_heads: 2,
        layers: 2,
        extra_types: vec![
            GgmlDType::Q4_0,
            GgmlDType::Q4K,
            GgmlDType::Q5K,
            GgmlDType::Q6K,
            GgmlDType::Q5_0,
        ],
        ..TinySpec::default()
    };
    let (_d, m) = tiny(spec)?;
    let reference = reference_logits(&m)?;
    let scale = max_abs(&reference)?;
    for (dtype, path) in &m.extra {
        let w = WeightFile::open(path)?;
        let q = full_logits(&w, Precision::Quantized, &PROMPT)?;
        let f = full_logits(&w, Precision::F32, &PROMPT)?;
        // Quantized kernels agree with their own dequantized weights...
        let dqf = max_diff(&q, &f)? / max_abs(&f)?;
        assert!(
            dqf < 0.05,
            "{dtype:?}: quantized vs dequantized rel err {dqf}"
        );
        // ...and stay near the unquantized model.
        let dref = max_diff(&f, &reference)? / scale;
        assert!(dref < 0.3, "{dtype:?}: rel err vs f32 {dref}");
    }
    Ok(())
}

/// Hugging Face transformers' logits (tests/fixtures/make_hf_reference.py)
/// for the model in `tests/fixtures/hf/{name}`, beside Hearth's on the f32
/// path: the largest difference, and the largest logit.
fn against_transformers(name: &str) -> Result<(f32, f32)> {
    let dir = hearth_test_utils::workspace_root()
        .join("tests/fixtures/hf")
        .join(name);
    let (ids, want) = transformers_logits(&dir)?;
    let got = full_logits(&WeightFile::open(&dir)?, Precision::F32, &ids)?;
    let got = got.reshape(want.shape())?;
    Ok((max_diff(&got, &want)?, max_abs(&want)?))
}

/// The token ids and transformers' logits `[ids, vocab]` of a fixture
/// folder's `reference.json`.
fn transformers_logits(dir: &std::path::Path) -> Result<(Vec<u32>, Tensor)> {
    let want: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json"))?)?;
    let ids: Vec<u32> = serde_json::from_value(want["ids"].clone())?;
    let rows: Vec<Vec<f32>> = serde_json::from_value(want["logits"].clone())?;
    let vocab = rows.first().map_or(0, Vec::len);
    let logits = Tensor::from_vec(
        rows.into_iter().flatten().collect::<Vec<f32>>(),
        (ids.len(), vocab),
        &candle_core::Device::Cpu,
    )?;
    Ok((ids, logits))
}

#[test]
fn qwen3_matches_transformers() -> Result<()> {
    // Per-head q/k norms, heads wider than hidden / heads, tied head.
    let (diff, scale) = against_transformers("qwen3")?;
    assert!(
        diff < 1e-4 * scale.max(1.0),
        "max diff {diff} (logits up to {scale})"
    );
    Ok(())
}

/// Every position's logits of `ids` run through `st` one chunk after
/// another, each continuing the cache: `[ids, vocab]`.
fn in_chunks(st: &Stage, ids: &[u32], chunks: &[usize], vocab: usize) -> Result<Tensor> {
    let mut c = st.new_cache();
    let mut rows = Vec::with_capacity(chunks.len());
    let mut at = 0;
    for &len in chunks {
        let y = st.forward(
            StageInput::Tokens(ids[at..at + len].to_vec()),
            &[len],
            &mut [&mut c],
            Logits::All,
        )?;
        rows.push(y.reshape((len, vocab))?);
        at += len;
    }
    Ok(Tensor::cat(&rows, 0)?)
}

/// transformers' sliding-window models (a window of 8 on every layer of a
/// Mistral; of 6 on layers 1 and 2 of a Qwen2; Gemma 2's even layers and
/// Gemma 3's two of every three, with their soft-caps, sandwich norms,
/// GeGLU, scaled embeddings and Gemma 3's local RoPE; Phi-3's stacked
/// projections and window on every layer), over 40 ids: all at once,
/// in chunks that start inside and past the window, and token by token
/// (the single-token decode path), on the f32 and the fused paths.
#[test]
fn sliding_window_models_match_transformers() -> Result<()> {
    for name in [
        "mistral-swa",
        "qwen2-swa",
        "gemma2",
        "gemma3",
        "gemma3-mm",
        "phi3",
    ] {
        let dir = hearth_test_utils::workspace_root()
            .join("tests/fixtures/hf")
            .join(name);
        let w = WeightFile::open(&dir)?;
        assert!(w.config().sliding_window.is_some(), "{name}");
        let (ids, want) = transformers_logits(&dir)?;
        let (n, vocab) = want.dims2()?;
        let scale = max_abs(&want)?;
        let mut steps = vec![13];
        steps.resize(n - 13 + 1, 1);
        for precision in [Precision::F32, Precision::Quantized] {
            let st = Stage::load(&w, StageSpec::full(w.config().num_hidden_layers), precision)?;
            for chunks in [vec![n], vec![3, 9, 1, 5, 22], steps.clone()] {
                let got = in_chunks(&st, &ids, &chunks, vocab)?;
                let d = max_diff(&got, &want)?;
                assert!(
                    d < 1e-4 * scale.max(1.0),
                    "{name} {precision:?} in chunks {:?}: max diff {d} (logits up to {scale})",
                    &chunks[..chunks.len().min(6)]
                );
            }
        }
    }
    Ok(())
}

/// A GGUF that names a window (`llama.attention.sliding_window`) runs it
/// on every layer, as transformers runs the same Mistral.
#[test]
fn a_gguf_sliding_window_matches_transformers() -> Result<()> {
    // Every layer (Mistral), and the layers a pattern names (Qwen2's 1, 2).
    for (name, windows) in [
        ("mistral-swa", vec![Some(8), Some(8)]),
        ("qwen2-swa", vec![None, Some(6), Some(6)]),
        // llama.cpp's phi3 layout: attn_qkv, and gate and up in ffn_up.
        ("phi3", vec![Some(8), Some(8)]),
    ] {
        let dir = hearth_test_utils::workspace_root()
            .join("tests/fixtures/hf")
            .join(name);
        let out = tempfile::tempdir()?;
        let gguf = out.path().join("swa.gguf");
        hearth_test_utils::hf_llama_to_gguf(&dir, &gguf, &[])?;
        let w = WeightFile::open(&gguf)?;
        let got: Vec<Option<usize>> = (0..windows.len()).map(|i| w.config().window(i)).collect();
        assert_eq!(got, windows, "{name}");
        let (ids, want) = transformers_logits(&dir)?;
        let got = full_logits(&w, Precision::F32, &ids)?.reshape(want.shape())?;
        let (d, scale) = (max_diff(&got, &want)?, max_abs(&want)?);
        assert!(
            d < 1e-4 * scale.max(1.0),
            "{name}: max diff {d} (logits up to {scale})"
        );
    }
    Ok(())
}

/// Gemma 2 and 3 as llama.cpp's converter writes them (norms stored as
/// `1 + w`, the post-norms under their own names, Gemma 2's layer pattern
/// left for the reader to derive, Gemma 3's local theta and linear scaling
/// in metadata) run as transformers runs the folders, on both paths.
#[test]
fn gemma_ggufs_match_transformers() -> Result<()> {
    for (name, windows) in [
        ("gemma2", vec![Some(6), None, Some(6), None]),
        ("gemma3", vec![Some(6), Some(6), None, Some(6)]),
    ] {
        let dir = hearth_test_utils::workspace_root()
            .join("tests/fixtures/hf")
            .join(name);
        let out = tempfile::tempdir()?;
        let gguf = out.path().join("gemma.gguf");
        hearth_test_utils::hf_llama_to_gguf(&dir, &gguf, &[])?;
        let w = WeightFile::open(&gguf)?;
        let hf = WeightFile::open(&dir)?;
        let got: Vec<Option<usize>> = (0..windows.len()).map(|i| w.config().window(i)).collect();
        assert_eq!(got, windows, "{name}");
        // The same decoder read from either format (the query scale and
        // epsilon are read back through f32).
        let mut c = w.config().clone();
        c.query_pre_attn_scalar = hf.config().query_pre_attn_scalar;
        c.rms_norm_eps = hf.config().rms_norm_eps;
        assert_eq!(&c, hf.config(), "{name}");
        // The file holds 1 + w; Hearth holds w, as transformers does.
        let norm = hearth_models::TensorId::Layer(0, hearth_models::weights::LayerTensor::AttnNorm);
        let cpu = candle_core::Device::Cpu;
        assert!(max_diff(&w.load_f32(norm, &cpu)?, &hf.load_f32(norm, &cpu)?)? < 1e-6);
        let (ids, want) = transformers_logits(&dir)?;
        let scale = max_abs(&want)?;
        for precision in [Precision::F32, Precision::Quantized] {
            let got = full_logits(&w, precision, &ids)?.reshape(want.shape())?;
            let d = max_diff(&got, &want)?;
            assert!(
                d < 1e-4 * scale.max(1.0),
                "{name} {precision:?}: max diff {d} (logits up to {scale})"
            );
        }
    }
    Ok(())
}

/// LongRoPE on half of each head (Phi-3.5 / Phi-4-mini): transformers'
/// logits for 40 ids at once (the long factors, past the original 16), for
/// the first 12 alone (the short ones), and for 12 then one at a time with
/// its cache (short until a position passes 16, then long for the new
/// tokens while the cached keys keep theirs); from the folder and from
/// llama.cpp's layout (factor tensors, attention factor and rotary lanes in
/// metadata), on both paths.
#[test]
fn phi3_longrope_matches_transformers() -> Result<()> {
    let dir = hearth_test_utils::workspace_root().join("tests/fixtures/hf/phi3-longrope");
    let out = tempfile::tempdir()?;
    let gguf = out.path().join("phi3.gguf");
    hearth_test_utils::hf_llama_to_gguf(&dir, &gguf, &[])?;
    let want: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json"))?)?;
    let rows = |k: &str| -> Result<Tensor> {
        let r: Vec<Vec<f32>> = serde_json::from_value(want[k].clone())?;
        let (n, v) = (r.len(), r.first().map_or(0, Vec::len));
        Ok(Tensor::from_vec(
            r.into_iter().flatten().collect::<Vec<f32>>(),
            (n, v),
            &candle_core::Device::Cpu,
        )?)
    };
    let (ids, full) = transformers_logits(&dir)?;
    let (short, cached) = (rows("short_logits")?, rows("cached_logits")?);
    let scale = max_abs(&full)?;
    for w in [WeightFile::open(&dir)?, WeightFile::open(&gguf)?] {
        let cfg = w.config();
        assert_eq!(cfg.rotary_dim(), 8, "{}", w.path().display());
        assert!(matches!(
            cfg.rope_scaling,
            Some(hearth_models::config::RopeScaling::LongRope { .. })
        ));
        for precision in [Precision::F32, Precision::Quantized] {
            let st = Stage::load(&w, StageSpec::full(cfg.num_hidden_layers), precision)?;
            let run = |chunks: &[usize]| in_chunks(&st, &ids, chunks, cfg.vocab_size);
            let mut steps = vec![12];
            steps.resize(ids.len() - 12 + 1, 1);
            for (what, got, want) in [
                ("at once", run(&[ids.len()])?, &full),
                ("first 12", run(&[12])?, &short),
                ("cached steps", run(&steps)?, &cached),
            ] {
                let d = max_diff(&got, want)?;
                assert!(
                    d < 1e-4 * scale.max(1.0),
                    "{} {precision:?} {what}: max diff {d} (logits up to {scale})",
                    w.path().display()
                );
            }
        }
    }
    Ok(())
}

#[test]
fn qwen3_gguf_equals_safetensors() -> Result<()> {
    let (_d, m) = tiny(TinySpec {
        architecture: "qwen3",
        ..TinySpec::default()
    })?;
    let st = reference_logits(&m)?;
    for (path, precision, tol) in [
        (&m.gguf_f32, Precision::F32, 1e-4),
        (&m.gguf_f32, Precision::Quantized, 1e-3),
        (&m.gguf_q8_0, Precision::Quantized, 0.05),
    ] {
        let w = WeightFile::open(path)?;
        assert!(w.config().qk_norm());
        let got = full_logits(&w, precision, &PROMPT)?;
        let d = max_diff(&st, &got)? / max_abs(&st)?;
        assert!(d < tol, "{} {precision:?}: rel diff {d}", path.display());
    }
    Ok(())
}

/// `rope_freqs.weight` as llama.cpp's converter computes it from a Llama
/// 3 `config.json` (one divisor per rotary frequency).
fn llama3_rope_freqs(config: &serde_json::Value) -> Vec<f32> {
    let p = &config["rope_parameters"];
    let f = |k: &str| p[k].as_f64().unwrap_or(f64::NAN);
    let (theta, factor, low, high, old) = (
        f("rope_theta"),
        f("factor"),
        f("low_freq_factor"),
        f("high_freq_factor"),
        f("original_max_position_embeddings"),
    );
    let dim = config["head_dim"].as_u64().unwrap_or(0) as usize;
    (0..dim / 2)
        .map(|i| {
            let freq = 1.0 / theta.powf((2 * i) as f64 / dim as f64);
            let wavelen = 2.0 * std::f64::consts::PI / freq;
            if wavelen < old / high {
                1.0
            } else if wavelen > old / low {
                factor as f32
            } else {
                let smooth = (old / wavelen - low) / (high - low);
                (1.0 / ((1.0 - smooth) / factor + smooth)) as f32
            }
        })
        .collect()
}

#[test]
fn llama3_gguf_rope_freqs_match_transformers() -> Result<()> {
    let hf = hearth_test_utils::workspace_root().join("tests/fixtures/hf/llama3-rope");
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(hf.join("config.json"))?)?;
    let (ids, want) = transformers_logits(&hf)?;
    let scale = max_abs(&want)?;
    let factors = llama3_rope_freqs(&config);
    let dir = tempfile::tempdir()?;
    let (with, without) = (
        dir.path().join("with.gguf"),
        dir.path().join("without.gguf"),
    );
    let freqs = Tensor::new(factors.as_slice(), &candle_core::Device::Cpu)?;
    hearth_test_utils::hf_llama_to_gguf(&hf, &with, &[("rope_freqs.weight".into(), freqs)])?;
    hearth_test_utils::hf_llama_to_gguf(&hf, &without, &[])?;
    for precision in [Precision::F32, Precision::Quantized] {
        let got = full_logits(&WeightFile::open(&with)?, precision, &ids)?;
        let d = max_diff(&got, &want)?;
        assert!(d < 1e-4 * scale.max(1.0), "{precision:?}: max diff {d}");
    }
    // The factors are what makes it right.
    let plain = full_logits(&WeightFile::open(&without)?, Precision::F32, &ids)?;
    assert!(max_diff(&plain, &want)? > 1e-3 * scale);
    // A table of the wrong length, or a factor of zero, is a clear error.
    for (bad, what) in [
        (factors[1..].to_vec(), "values for a head"),
        ([vec![0.0], factors[1..].to_vec()].concat(), "positive"),
    ] {
        let p = dir.path().join("bad.gguf");
        let t = Tensor::new(bad.as_slice(), &candle_core::Device::Cpu)?;
        hearth_test_utils::hf_llama_to_gguf(&hf, &p, &[("rope_freqs.weight".into(), t)])?;
        let err = WeightFile::open(&p).unwrap_err().to_string();
        assert!(err.contains(what), "{err}");
    }
    Ok(())
}

#[test]
fn llama3_rope_scaling_matches_transformers() -> Result<()> {
    let (diff, scale) = against_transformers("llama3-rope")?;
    assert!(
        diff < 1e-4 * scale.max(1.0),
        "max diff {diff} (logits up to {scale})"
    );
    Ok(())
}

/// `src` rewritten with `extra` metadata entries added (tensors as they are).
fn gguf_with_meta(
    src: &std::path::Path,
    dst: &std::path::Path,
    extra: Vec<(String, candle_core::quantized::gguf_file::Value)>,
) -> Result<()> {
    use candle_core::quantized::{QTensor, gguf_file};
    let mut f = std::fs::File::open(src)?;
    let c = gguf_file::Content::read(&mut f)?;
    let mut meta: Vec<(String, gguf_file::Value)> = c
        .metadata
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    meta.extend(extra);
    let mut tensors: Vec<(String, QTensor)> = Vec::new();
    for n in c.tensor_infos.keys() {
        tensors.push((n.clone(), c.tensor(&mut f, n, &candle_core::Device::Cpu)?));
    }
    let m: Vec<(&str, &gguf_file::Value)> = meta.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let t: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    gguf_file::write(&mut std::fs::File::create(dst)?, &m, &t)?;
    Ok(())
}

/// A GGUF's window and per-layer pattern: honoured when well formed, a
/// clear error when the pattern is not a list of one bool per layer.
#[test]
fn gguf_sliding_window_patterns_are_checked() -> Result<()> {
    use candle_core::quantized::gguf_file::Value;
    let (d, m) = tiny(TinySpec::default())?;
    let layers = WeightFile::open(&m.gguf_f32)?.config().num_hidden_layers;
    let out = d.path().join("swa.gguf");
    let window = ("llama.attention.sliding_window".to_string(), Value::U32(4));
    let pattern = |v: Value| ("llama.attention.sliding_window_pattern".to_string(), v);
    // Every layer but the first.
    let kinds: Vec<Value> = (0..layers).map(|i| Value::Bool(i > 0)).collect();
    gguf_with_meta(
        &m.gguf_f32,
        &out,
        vec![window.clone(), pattern(Value::Array(kinds))],
    )?;
    let w = WeightFile::open(&out)?;
    assert_eq!(
        (w.config().window(0), w.config().window(1)),
        (None, Some(4))
    );
    // The window cuts this prompt: the logits move.
    let with = full_logits(&w, Precision::F32, &PROMPT)?;
    let without = full_logits(&WeightFile::open(&m.gguf_f32)?, Precision::F32, &PROMPT)?;
    assert!(max_diff(&with, &without)? > 1e-4);
    for (bad, needle) in [
        (Value::Array(vec![Value::Bool(true)]), "layer kinds"),
        (
            Value::Array((0..layers).map(|_| Value::U32(1)).collect()),
            "non-boolean",
        ),
        (Value::Bool(true), "not a list"),
    ] {
        gguf_with_meta(&m.gguf_f32, &out, vec![window.clone(), pattern(bad)])?;
        let err = WeightFile::open(&out).err().map(|e| e.to_string());
        assert!(
            err.as_deref().is_some_and(|e| e.contains(needle)),
            "{needle}: {err:?}"
        );
    }
    // A layer count no model has is refused before anything is built per
    // layer (a window makes a per-layer table).
    gguf_with_meta(
        &m.gguf_f32,
        &out,
        vec![
            window,
            ("llama.block_count".to_string(), Value::U64(1 << 40)),
        ],
    )?;
    let err = WeightFile::open(&out).err().map(|e| e.to_string());
    assert!(
        err.as_deref().is_some_and(|e| e.contains("block_count")),
        "{err:?}"
    );
    Ok(())
}

/// A GGUF split in parts as llama.cpp's gguf-split writes them: a part is
/// refused with how to join it; joined, it is the same model (the same
/// tensors, types, shapes and bytes, the same logits), without the
/// `split.*` keys; parts that are missing, out of order, truncated, that
/// hold a tensor twice or miscount their tensors are refused by name.
#[test]
fn a_split_gguf_joins_into_the_same_model() -> Result<()> {
    use candle_core::quantized::gguf_file;
    use hearth_models::split;
    let (d, m) = tiny(TinySpec::default())?;
    let dir = d.path().join("split");
    std::fs::create_dir_all(&dir)?;
    let parts = hearth_test_utils::split_gguf(&m.gguf_q8_0, &dir, "tiny-Q8_0", 3)?;
    let err = WeightFile::open(&parts[1])
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(err.contains("hearth models join"), "{err}");
    // Any part names them all, and the joined file beside them.
    let (named, joined) = split::parts_of(&parts[2]).expect("a part's name");
    assert_eq!(named, parts);
    assert_eq!(joined, dir.join("tiny-Q8_0.gguf"));
    let mut seen = Vec::new();
    split::join(&parts, &joined, &mut |done, total| seen.push((done, total)))?;
    assert!(
        seen.last().is_some_and(|(d, t)| d == t && *t > 0),
        "{seen:?}"
    );
    let (a, b) = (WeightFile::open(&m.gguf_q8_0)?, WeightFile::open(&joined)?);
    assert_eq!(a.tensor_layout(), b.tensor_layout());
    assert_eq!(a.config(), b.config());
    let meta = b.gguf_metadata().cloned().unwrap_or_default();
    assert!(!meta.keys().any(|k| k.starts_with("split.")));
    assert_eq!(meta.len(), a.gguf_metadata().map_or(0, |m| m.len()));
    let (la, lb) = (
        full_logits(&a, Precision::Quantized, &PROMPT)?,
        full_logits(&b, Precision::Quantized, &PROMPT)?,
    );
    assert_eq!(max_diff(&la, &lb)?, 0.0);
    // Names that are not a part's.
    for name in [
        "tiny.gguf",
        "tiny-1-of-3.gguf",
        "tiny-00004-of-00003.gguf",
        "-00001-of-00002.gguf",
    ] {
        assert!(split::parts_of(&dir.join(name)).is_none(), "{name}");
    }
    // Hostile parts.
    let out = dir.join("out.gguf");
    let err = |parts: &[std::path::PathBuf]| {
        split::join(parts, &out, &mut |_, _| {})
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default()
    };
    let missing = dir.join("gone-00002-of-00003.gguf");
    let e = err(&[parts[0].clone(), missing, parts[2].clone()]);
    assert!(e.contains("part 2 of 3"), "{e}");
    let e = err(&[parts[0].clone(), parts[2].clone(), parts[1].clone()]);
    assert!(e.contains("split.no"), "{e}");
    let e = err(&[parts[0].clone(), parts[1].clone()]);
    assert!(e.contains("split.count"), "{e}");
    // A part cut short.
    let cut = dir.join("cut-00003-of-00003.gguf");
    let bytes = std::fs::read(&parts[2])?;
    std::fs::write(&cut, &bytes[..bytes.len() - 100])?;
    let e = err(&[parts[0].clone(), parts[1].clone(), cut]);
    assert!(e.contains("truncated") || e.contains("needs"), "{e}");
    // A tensor in two parts, and a count that does not add up.
    type Meta = Vec<(String, gguf_file::Value)>;
    type Tensors = Vec<(String, candle_core::quantized::QTensor)>;
    let rewrite = |src: &std::path::Path,
                   dst: &std::path::Path,
                   f: &dyn Fn(&mut Meta, &mut Tensors)|
     -> Result<()> {
        let mut r = std::fs::File::open(src)?;
        let c = gguf_file::Content::read(&mut r)?;
        let mut meta: Vec<(String, gguf_file::Value)> = c
            .metadata
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let mut ts = Vec::new();
        for n in c.tensor_infos.keys() {
            ts.push((n.clone(), c.tensor(&mut r, n, &candle_core::Device::Cpu)?));
        }
        f(&mut meta, &mut ts);
        let m: Vec<(&str, &gguf_file::Value)> = meta.iter().map(|(k, v)| (k.as_str(), v)).collect();
        let t: Vec<(&str, &candle_core::quantized::QTensor)> =
            ts.iter().map(|(k, v)| (k.as_str(), v)).collect();
        gguf_file::write(&mut std::fs::File::create(dst)?, &m, &t)?;
        Ok(())
    };
    let twice = dir.join("twice-00002-of-00003.gguf");
    let first_name = {
        let mut r = std::fs::File::open(&parts[0])?;
        let c = gguf_file::Content::read(&mut r)?;
        let n = c.tensor_infos.keys().next().cloned().unwrap_or_default();
        let t = c.tensor(&mut r, &n, &candle_core::Device::Cpu)?;
        (n, t.dequantize(&candle_core::Device::Cpu)?)
    };
    rewrite(&parts[1], &twice, &|_, ts| {
        if let Ok(q) = candle_core::quantized::QTensor::quantize(
            &first_name.1,
            candle_core::quantized::GgmlDType::F32,
        ) {
            ts.push((first_name.0.clone(), q));
        }
    })?;
    let e = err(&[parts[0].clone(), twice, parts[2].clone()]);
    assert!(e.contains("in two parts"), "{e}");
    let miscount = dir.join("count-00001-of-00003.gguf");
    rewrite(&parts[0], &miscount, &|meta, _| {
        for (k, v) in meta.iter_mut() {
            if k == "split.tensors.count" {
                *v = gguf_file::Value::I32(7);
            }
        }
    })?;
    let e = err(&[miscount, parts[1].clone(), parts[2].clone()]);
    assert!(e.contains("split.tensors.count"), "{e}");
    // An alignment whose padding would be huge.
    let wide = dir.join("wide-00001-of-00003.gguf");
    rewrite(&parts[0], &wide, &|meta, _| {
        meta.retain(|(k, _)| k != "general.alignment");
        meta.push(("general.alignment".into(), gguf_file::Value::U32(1 << 30)))
    })?;
    let e = err(&[wide, parts[1].clone(), parts[2].clone()]);
    assert!(e.contains("alignment"), "{e}");
    Ok(())
}

/// The transformers fixture of every family, as folders.
use hearth_test_utils::HF_FAMILIES as FAMILIES;

/// Every way to cut `n` layers into 1 to 3 non-empty stages.
fn cuts(n: usize) -> Vec<Vec<StageSpec>> {
    let spec = |start: usize, end: usize| StageSpec {
        start,
        end,
        embed: start == 0,
        head: end == n,
    };
    let mut out = vec![vec![spec(0, n)]];
    for a in 1..n {
        out.push(vec![spec(0, a), spec(a, n)]);
        for b in a + 1..n {
            out.push(vec![spec(0, a), spec(a, b), spec(b, n)]);
        }
    }
    out
}

/// Every family through 1, 2 and 3 chained stages (every cut of its
/// layers) equals the single stage exactly: a prefill past the windows and
/// LongRoPE's original context, then decode steps, on both paths.
#[test]
fn every_family_pipelines_into_any_number_of_stages() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    for name in FAMILIES {
        let fixture = hearth_test_utils::workspace_root()
            .join("tests/fixtures/hf")
            .join(name);
        // Fixtures of two layers are made four deep (their layers
        // repeated) so that every family is cut into three stages too.
        let dir = if WeightFile::open(&fixture)?.config().num_hidden_layers < 3 {
            hearth_test_utils::deepened_hf(&fixture, 4, &tmp.path().join(name))?
        } else {
            fixture.clone()
        };
        let w = WeightFile::open(&dir)?;
        let (ids, _) = transformers_logits(&fixture)?;
        let n = w.config().num_hidden_layers;
        assert!(n >= 3, "{name}: {n} layers cannot be cut in three");
        for precision in [Precision::F32, Precision::Quantized] {
            let full = Stage::load(&w, StageSpec::full(n), precision)?;
            for cut in cuts(n).into_iter().skip(1) {
                let stages = cut
                    .iter()
                    .map(|s| Stage::load(&w, *s, precision))
                    .collect::<std::result::Result<Vec<_>, _>>()?;
                let mut cf = full.new_cache();
                let mut cs: Vec<KvCache> = stages.iter().map(Stage::new_cache).collect();
                let mut input = ids[..20].to_vec();
                for step in 0..6 {
                    let len = input.len();
                    let want = full.forward(
                        StageInput::Tokens(input.clone()),
                        &[len],
                        &mut [&mut cf],
                        Logits::Last,
                    )?;
                    let mut x = StageInput::Tokens(input.clone());
                    let mut got = None;
                    for (st, c) in stages.iter().zip(cs.iter_mut()) {
                        let y = st.forward(x, &[len], &mut [c], Logits::Last)?;
                        x = StageInput::Hidden(y.clone());
                        got = Some(y);
                    }
                    let got = got.ok_or_else(|| anyhow::anyhow!("no stages"))?;
                    let ranges: Vec<(usize, usize)> =
                        cut.iter().map(|s| (s.start, s.end)).collect();
                    assert_eq!(
                        max_diff(&want, &got)?,
                        0.0,
                        "{name} {precision:?} stages {ranges:?} step {step}"
                    );
                    input = vec![want.squeeze(0)?.argmax(0)?.to_scalar::<u32>()?];
                }
            }
        }
    }
    Ok(())
}
