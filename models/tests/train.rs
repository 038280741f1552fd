//! Training-side model checks on tiny random models: finite differences
//! against autograd (f64), every trainable parameter gets a gradient, LoRA
//! merged equals unmerged, and the trainable stage computes what the
//! inference stage computes.

use candle_core::{DType, Device, Tensor};
use hearth_models::train::{
    BatchLayout, DropCtx, IGNORE, LoraConfig, Method, Target, TrainInput, TrainOptions, TrainStage,
    Upstream,
};
use hearth_models::{KvCache, Logits, Precision, Stage, StageInput, StageSpec, WeightFile};
use hearth_test_utils::{TinySpec, tiny_model};

fn tiny(dir: &std::path::Path) -> WeightFile {
    let m = tiny_model(
        dir,
        TinySpec {
            hidden: 32,
            intermediate: 64,
            layers: 2,
            heads: 4,
            kv_heads: 2,
            context: 32,
            ..Default::default()
        },
    )
    .unwrap();
    WeightFile::open(&m.gguf_f32).unwrap()
}

/// Two rows: one packed with two documents, one padded.
fn batch(vocab: u32) -> (Vec<u32>, BatchLayout, Vec<u32>) {
    let segs = vec![1, 1, 1, 2, 2, 2, 1, 1, 1, 1, 0, 0];
    let layout = BatchLayout::new(2, 6, segs.clone()).unwrap();
    let tokens: Vec<u32> = (0..12u32).map(|i| (i * 37 + 11) % vocab).collect();
    let labels = (0..12)
        .map(|i| {
            if segs[i] == 0 || i % 6 == 5 || i == 2 {
                IGNORE
            } else {
                tokens[i + 1]
            }
        })
        .collect();
    (tokens, layout, labels)
}

/// Largest absolute entry of an f32 tensor.
fn max_abs(t: &Tensor) -> f32 {
    t.abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

fn lora_all(init_b_std: f64, dropout: f64) -> Method {
    Method::Lora(LoraConfig {
        rank: 2,
        alpha: 4.0,
        dropout,
        targets: Target::ALL.to_vec(),
        init_b_std,
    })
}

fn opts(method: Method, dtype: DType) -> TrainOptions {
    TrainOptions {
        method,
        dtype,
        seed: 5,
    }
}

fn loss(stage: &TrainStage, tokens: &[u32], b: &BatchLayout, labels: &[u32]) -> f64 {
    let out = stage
        .forward(&TrainInput::Tokens(tokens.to_vec()), b, &DropCtx::eval())
        .unwrap();
    let (sum, _) = hearth_models::train::loss_sum(&out, labels).unwrap();
    sum.to_dtype(DType::F64)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

/// (c) Central differences in f64 agree with autograd for every trainable
/// tensor of a full fine-tune and of LoRA (a few entries each).
#[test]
fn finite_differences_match_autograd_in_f64() {
    let dir = tempfile::tempdir().unwrap();
    let w = tiny(dir.path());
    let vocab = w.config().vocab_size as u32;
    let (tokens, layout, labels) = batch(vocab);
    let spec = StageSpec::full(2);
    for method in [Method::Full, lora_all(0.02, 0.0)] {
        let stage = TrainStage::load(&w, spec, &opts(method.clone(), DType::F64)).unwrap();
        let back = stage
            .backward(
                &TrainInput::Tokens(tokens.clone()),
                &layout,
                &DropCtx::eval(),
                Upstream::Loss {
                    labels: &labels,
                    scale: 1.0,
                },
            )
            .unwrap();
        let mut checked = 0;
        for ((name, var), grad) in stage.trainables().iter().zip(&back.grads) {
            let grad = grad
                .as_ref()
                .unwrap_or_else(|| panic!("{name}: no gradient"));
            let g: Vec<f64> = grad.flatten_all().unwrap().to_vec1().unwrap();
            let base: Vec<f64> = var.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
            // The largest entry and one fixed-stride entry.
            let (imax, _) =
                g.iter().enumerate().fold(
                    (0, 0.0),
                    |a, (i, v)| if v.abs() > a.1 { (i, v.abs()) } else { a },
                );
            for i in [imax, (g.len() * 7 / 11) % g.len()] {
                let h = 1e-5;
                let eval = |delta: f64| {
                    let mut v = base.clone();
                    v[i] += delta;
                    let t = Tensor::from_vec(v, var.dims(), &Device::Cpu).unwrap();
                    stage.set(name, &t).unwrap();
                    loss(&stage, &tokens, &layout, &labels)
                };
                let fd = (eval(h) - eval(-h)) / (2.0 * h);
                stage
                    .set(
                        name,
                        &Tensor::from_vec(base.clone(), var.dims(), &Device::Cpu).unwrap(),
                    )
                    .unwrap();
                let tol = 1e-6 + 1e-5 * fd.abs().max(g[i].abs());
                assert!(
                    (fd - g[i]).abs() <= tol,
                    "{name}[{i}]: finite difference {fd} vs autograd {}",
                    g[i]
                );
                checked += 1;
            }
        }
        assert!(checked >= 2 * stage.trainables().len());
    }
}

/// (b) Every trainable parameter receives a non-zero gradient, for full
/// fine-tuning and for LoRA on all seven projections (with dropout).
#[test]
fn every_trainable_parameter_gets_a_gradient() {
    let dir = tempfile::tempdir().unwrap();
    let w = tiny(dir.path());
    let (tokens, layout, labels) = batch(w.config().vocab_size as u32);
    for method in [Method::Full, lora_all(0.02, 0.1)] {
        let stage = TrainStage::load(&w, StageSpec::full(2), &opts(method, DType::F32)).unwrap();
        let expected = match stage.trainables().len() {
            // embed (tied head) + final norm + per layer 2 norms + 7 matrices
            n if n == 1 + 1 + 2 * 9 => n,
            // 2 layers × 7 projections × (A, B)
            n if n == 28 => n,
            n => panic!("unexpected number of trainables {n}"),
        };
        let drop = DropCtx {
            seed: 3,
            step: 0,
            micro: 0,
            train: true,
        };
        let back = stage
            .backward(
                &TrainInput::Tokens(tokens.clone()),
                &layout,
                &drop,
                Upstream::Loss {
                    labels: &labels,
                    scale: 0.1,
                },
            )
            .unwrap();
        assert_eq!(back.grads.len(), expected);
        for ((name, _), g) in stage.trainables().iter().zip(&back.grads) {
            let g = g.as_ref().unwrap_or_else(|| panic!("{name}: no gradient"));
            let norm = g
                .sqr()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(
                norm > 0.0 && norm.is_finite(),
                "{name}: gradient norm² {norm}"
            );
        }
        assert_eq!(
            back.targets,
            labels.iter().filter(|&&l| l != IGNORE).count()
        );
    }
}

/// A hidden-state stage passes a gradient to its input, and the frozen
/// base of LoRA gets none.
#[test]
fn middle_stage_returns_an_input_gradient() {
    let dir = tempfile::tempdir().unwrap();
    let w = tiny(dir.path());
    let (tokens, layout, _) = batch(w.config().vocab_size as u32);
    let o = opts(lora_all(0.02, 0.0), DType::F32);
    let first = TrainStage::load(
        &w,
        StageSpec {
            start: 0,
            end: 1,
            embed: true,
            head: false,
        },
        &o,
    )
    .unwrap();
    let second = TrainStage::load(
        &w,
        StageSpec {
            start: 1,
            end: 2,
            embed: false,
            head: false,
        },
        &o,
    )
    .unwrap();
    let h = first
        .forward(&TrainInput::Tokens(tokens), &layout, &DropCtx::eval())
        .unwrap();
    let ones = Tensor::ones((12, 32), DType::F32, &Device::Cpu).unwrap();
    let back = second
        .backward(
            &TrainInput::Hidden(h.detach()),
            &layout,
            &DropCtx::eval(),
            Upstream::Grad(&ones),
        )
        .unwrap();
    let g = back.input_grad.unwrap();
    assert_eq!(g.dims(), &[12, 32]);
    assert!(
        g.abs()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
            > 0.0
    );
    assert_eq!(second.trainables().len(), 14);
}

/// (f) An adapter folded into its base weights gives the same logits as
/// the adapter applied on the side.
#[test]
fn lora_merged_equals_unmerged() {
    let dir = tempfile::tempdir().unwrap();
    let w = tiny(dir.path());
    let (tokens, layout, _) = batch(w.config().vocab_size as u32);
    let stage = TrainStage::load(
        &w,
        StageSpec::full(2),
        &opts(lora_all(0.5, 0.3), DType::F32),
    )
    .unwrap();
    let input = TrainInput::Tokens(tokens);
    let base = TrainStage::load(&w, StageSpec::full(2), &opts(Method::Full, DType::F32)).unwrap();
    let a = stage.forward(&input, &layout, &DropCtx::eval()).unwrap();
    let b = stage
        .merged()
        .unwrap()
        .forward(&input, &layout, &DropCtx::eval())
        .unwrap();
    let c = base.forward(&input, &layout, &DropCtx::eval()).unwrap();
    let diff = max_abs(&(&a - &b).unwrap());
    let scale = max_abs(&a);
    assert!(
        diff <= 1e-5 * scale.max(1.0),
        "merged differs by {diff} (scale {scale})"
    );
    // The adapter does something: the un-adapted base differs.
    let moved = max_abs(&(&a - &c).unwrap());
    assert!(moved > 1e-3, "adapter changed nothing ({moved})");
    assert_eq!(stage.merged_weights().unwrap().len(), 1 + 2 * 9 + 1);
}

/// Every position's logits of the whole model through the inference stage
/// (dense f32).
fn inference_logits(w: &WeightFile, tokens: Vec<u32>) -> Tensor {
    let n = tokens.len();
    let layers = w.config().num_hidden_layers;
    let inf = Stage::load(w, StageSpec::full(layers), Precision::F32).unwrap();
    let mut cache = KvCache::new(layers);
    inf.forward(
        StageInput::Tokens(tokens),
        &[n],
        &mut [&mut cache],
        Logits::All,
    )
    .unwrap()
}

/// The trainable stage computes what the inference stage computes.
#[test]
fn training_forward_matches_inference_forward() {
    let dir = tempfile::tempdir().unwrap();
    let w = tiny(dir.path());
    let vocab = w.config().vocab_size as u32;
    let tokens: Vec<u32> = (0..7u32).map(|i| (i * 53 + 3) % vocab).collect();
    let layout = BatchLayout::new(1, 7, vec![1; 7]).unwrap();
    let stage = TrainStage::load(
        &w,
        StageSpec::full(2),
        &opts(lora_all(0.0, 0.1), DType::F32),
    )
    .unwrap();
    let train = stage
        .forward(
            &TrainInput::Tokens(tokens.clone()),
            &layout,
            &DropCtx::eval(),
        )
        .unwrap();
    let logits = inference_logits(&w, tokens);
    let diff = max_abs(&(&train - &logits).unwrap());
    assert!(
        diff < 1e-4,
        "training and inference forward differ by {diff}"
    );
}

/// A merged fine-tune written as GGUF serves what training computed; the
/// base's untouched tensors are copied as stored; the PEFT adapter holds
/// PEFT's names and config.
#[test]
fn merged_gguf_and_peft_adapter_hold_what_was_trained() {
    use hearth_models::train::export::{merged_tensors, write_merged_gguf, write_peft_adapter};
    let dir = tempfile::tempdir().unwrap();
    let m = tiny_model(
        dir.path(),
        TinySpec {
            hidden: 32,
            intermediate: 64,
            layers: 2,
            heads: 4,
            kv_heads: 2,
            context: 32,
            ..Default::default()
        },
    )
    .unwrap();
    let base = WeightFile::open(&m.gguf_q8_0).unwrap();
    let method = lora_all(0.5, 0.0);
    let stage =
        TrainStage::load(&base, StageSpec::full(2), &opts(method.clone(), DType::F32)).unwrap();
    let trained: std::collections::HashMap<String, Tensor> = stage
        .trainables()
        .iter()
        .map(|(n, v)| (n.clone(), v.as_tensor().clone()))
        .collect();
    let replaced = merged_tensors(&base, &method, &trained).unwrap();
    assert_eq!(replaced.len(), 2 * 7, "the seven projections of two layers");
    let out = dir.path().join("ft.gguf");
    write_merged_gguf(&base, &replaced, "ft-tiny", &out, false).unwrap();
    let merged = WeightFile::open(&out).unwrap();
    assert!(matches!(
        merged.gguf_metadata().and_then(|m| m.get("general.name")),
        Some(candle_core::quantized::gguf_file::Value::String(s)) if s == "ft-tiny"
    ));
    let layout = |w: &WeightFile, name: &str| {
        w.tensor_layout()
            .into_iter()
            .find(|t| t.name == name)
            .map(|t| t.dtype)
    };
    assert_eq!(
        layout(&merged, "token_embd.weight"),
        layout(&base, "token_embd.weight")
    );
    assert_eq!(
        layout(&merged, "blk.1.attn_q.weight").as_deref(),
        Some("F32")
    );
    let vocab = base.config().vocab_size as u32;
    let tokens: Vec<u32> = (0..7u32).map(|i| (i * 41 + 5) % vocab).collect();
    let want = stage
        .forward(
            &TrainInput::Tokens(tokens.clone()),
            &BatchLayout::new(1, 7, vec![1; 7]).unwrap(),
            &DropCtx::eval(),
        )
        .unwrap();
    let got = inference_logits(&merged, tokens);
    let diff = max_abs(&(&got - &want).unwrap());
    assert!(diff < 1e-4, "merged model differs from training by {diff}");

    let Method::Lora(cfg) = &method else {
        unreachable!()
    };
    let adapter = dir.path().join("adapter");
    let all: Vec<(String, Tensor)> = trained.into_iter().collect();
    write_peft_adapter(&adapter, cfg, "tiny", &all, base.config()).unwrap();
    let bytes = std::fs::read(adapter.join("adapter_model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    assert_eq!(st.names().len(), 2 * 7 * 2);
    let a = st
        .tensor("base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight")
        .unwrap();
    assert_eq!(a.shape(), &[cfg.rank, 32]);
    let conf: serde_json::Value =
        serde_json::from_slice(&std::fs::read(adapter.join("adapter_config.json")).unwrap())
            .unwrap();
    assert_eq!(conf["peft_type"], "LORA");
    assert_eq!(conf["r"], cfg.rank);
    assert_eq!(conf["target_modules"].as_array().map(|a| a.len()), Some(7));
}

/// A full fine-tune's backward against PyTorch autograd (transformers'
/// model in float64, tests/fixtures/make_hf_reference.py): the summed
/// next-token cross-entropy, and for every parameter the L2 norm of its
/// gradient and its first 64 entries.
fn backward_matches_transformers(name: &str) {
    let dir = hearth_test_utils::workspace_root()
        .join("tests/fixtures/hf")
        .join(name);
    let w = WeightFile::open(&dir).unwrap();
    let layers = w.config().num_hidden_layers;
    let stage =
        TrainStage::load(&w, StageSpec::full(layers), &opts(Method::Full, DType::F64)).unwrap();
    let want: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap())
            .unwrap();
    matches_reference(name, &dir, &stage, &want, rtol(name));
}

/// How close gradients must be: 1e-6 of their norm, except where the
/// reference itself computes in f32 inside its float64 model (transformers'
/// Gemma RMSNorm casts to float32), 1e-5.
fn rtol(name: &str) -> f64 {
    if name.starts_with("gemma") {
        1e-5
    } else {
        1e-6
    }
}

/// One step's loss and every trainable's gradient against a reference
/// (`loss_sum`, and per parameter `norm` and `head`, its first entries),
/// on the fixture's ids.
fn matches_reference(
    name: &str,
    dir: &std::path::Path,
    stage: &TrainStage,
    want: &serde_json::Value,
    rtol: f64,
) {
    let fixture: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap())
            .unwrap();
    let ids: Vec<u32> = fixture["ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect();
    let n = ids.len();
    let labels: Vec<u32> = (0..n)
        .map(|i| ids.get(i + 1).copied().unwrap_or(IGNORE))
        .collect();
    let back = stage
        .backward(
            &TrainInput::Tokens(ids),
            &BatchLayout::new(1, n, vec![1; n]).unwrap(),
            &DropCtx::eval(),
            Upstream::Loss {
                labels: &labels,
                scale: 1.0,
            },
        )
        .unwrap();
    let loss = back.loss_sum.unwrap();
    let want_loss = want["loss_sum"].as_f64().unwrap();
    assert!(
        (loss - want_loss).abs() < 1e-5 * want_loss.abs(),
        "{name}: loss {loss} vs {want_loss}"
    );
    let grads = want["grads"].as_object().unwrap();
    // Every parameter torch has, Hearth trains, and no other.
    let mut ours: Vec<&str> = stage.trainables().iter().map(|(n, _)| n.as_str()).collect();
    let mut theirs: Vec<&str> = grads.keys().map(String::as_str).collect();
    ours.sort_unstable();
    theirs.sort_unstable();
    assert_eq!(ours, theirs, "{name}: parameters");
    for ((pname, _), grad) in stage.trainables().iter().zip(&back.grads) {
        let g: Vec<f64> = grad
            .as_ref()
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let r = &grads[pname];
        let norm = g.iter().map(|x| x * x).sum::<f64>().sqrt();
        let want_norm = r["norm"].as_f64().unwrap();
        assert!(
            (norm - want_norm).abs() <= rtol * want_norm.max(1e-9),
            "{name} {pname}: gradient norm {norm} vs {want_norm}"
        );
        for (i, w) in r["head"].as_array().unwrap().iter().enumerate() {
            let w = w.as_f64().unwrap();
            assert!(
                (g[i] - w).abs() <= 1e-9 + rtol * want_norm,
                "{name} {pname}[{i}]: {} vs {w}",
                g[i]
            );
        }
    }
}

/// The LoRA a PEFT fixture's `reference.json` describes (no dropout, B
/// not drawn: the fixture sets it).
fn lora_of(want: &serde_json::Value) -> LoraConfig {
    LoraConfig {
        rank: want["rank"].as_u64().unwrap() as usize,
        alpha: want["alpha"].as_f64().unwrap(),
        dropout: 0.0,
        targets: serde_json::from_value(want["targets"].clone()).unwrap(),
        init_b_std: 0.0,
    }
}

/// LoRA against PEFT: the fixture's adapter (rank 4, alpha 8, A and B
/// random, as PEFT saved it) loaded into Hearth's stage, one step's loss
/// and every adapter matrix's gradient against PEFT's in float64
/// (tests/fixtures/make_hf_reference.py).
fn lora_matches_peft(name: &str) {
    let dir = hearth_test_utils::workspace_root()
        .join("tests/fixtures/hf")
        .join(name);
    let want: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("lora/reference.json")).unwrap())
            .unwrap();
    let method = Method::Lora(lora_of(&want));
    let w = WeightFile::open(&dir).unwrap();
    let layers = w.config().num_hidden_layers;
    let stage = TrainStage::load(&w, StageSpec::full(layers), &opts(method, DType::F64)).unwrap();
    let adapter =
        candle_core::safetensors::load(dir.join("lora/adapter_model.safetensors"), &Device::Cpu)
            .unwrap();
    assert_eq!(adapter.len(), stage.trainables().len(), "{name}");
    for (n, _) in stage.trainables() {
        stage.set(n, &adapter[n]).unwrap();
    }
    matches_reference(name, &dir, &stage, &want, rtol(name));
}

#[test]
fn lora_matches_peft_for_every_family() {
    for name in hearth_test_utils::HF_FAMILIES {
        lora_matches_peft(name);
    }
}

#[test]
fn qwen3_backward_matches_pytorch() {
    backward_matches_transformers("qwen3");
}

#[test]
fn sliding_window_backward_matches_pytorch() {
    backward_matches_transformers("mistral-swa");
    backward_matches_transformers("qwen2-swa");
}

#[test]
fn llama3_rope_scaling_backward_matches_pytorch() {
    backward_matches_transformers("llama3-rope");
}

/// Gemma 2 and 3: gradients through the soft-caps, the sandwich and
/// `1 + w` norms (q/k norms too on Gemma 3), GeGLU, the scaled embedding
/// shared with the head, and both RoPEs.
#[test]
fn gemma_backward_matches_pytorch() {
    backward_matches_transformers("gemma2");
    backward_matches_transformers("gemma3");
}

/// Phi-3's stacked qkv and gate/up are one parameter each, as in torch.
#[test]
fn phi3_backward_matches_pytorch() {
    backward_matches_transformers("phi3");
    // LongRoPE (the long table: 40 ids past a context of 16) on half of
    // each head.
    backward_matches_transformers("phi3-longrope");
}

/// A full fine-tune of a Gemma GGUF writes its norms back as llama.cpp
/// stores them (`1 + w`), and one of a Phi-3 its stacked projections: the
/// merged file, with every weight nudged, serves what the training stage
/// computes.
#[test]
fn gemma_and_phi3_fine_tunes_merge_into_their_ggufs() {
    use hearth_models::train::export::{merged_tensors, write_merged_gguf};
    let dir = tempfile::tempdir().unwrap();
    for name in ["gemma2", "gemma3", "phi3"] {
        let hf = hearth_test_utils::workspace_root()
            .join("tests/fixtures/hf")
            .join(name);
        let gguf = dir.path().join(format!("{name}.gguf"));
        hearth_test_utils::hf_llama_to_gguf(&hf, &gguf, &[]).unwrap();
        let base = WeightFile::open(&gguf).unwrap();
        let layers = base.config().num_hidden_layers;
        // A full fine-tune, and adapters on every projection (which on
        // Phi-3 fold into its stacked matrices).
        for method in [Method::Full, lora_all(0.5, 0.0)] {
            let stage = TrainStage::load(
                &base,
                StageSpec::full(layers),
                &opts(method.clone(), DType::F32),
            )
            .unwrap();
            // "Training": every full weight moved a little; adapters as
            // initialised (non-zero).
            let trained: std::collections::HashMap<String, Tensor> = stage
                .trainables()
                .iter()
                .map(|(n, v)| {
                    let t = v.as_tensor();
                    let t = match method {
                        Method::Full => (t * 1.01).unwrap(),
                        Method::Lora(_) => t.copy().unwrap(),
                    };
                    (n.clone(), t)
                })
                .collect();
            for (n, t) in &trained {
                stage.set(n, t).unwrap();
            }
            let replaced = merged_tensors(&base, &method, &trained).unwrap();
            if let Method::Lora(_) = method {
                assert_eq!(
                    replaced.len(),
                    layers * if name == "phi3" { 4 } else { 7 },
                    "{name}"
                );
            }
            let out = dir.path().join(format!("{name}-ft.gguf"));
            write_merged_gguf(&base, &replaced, "ft", &out, false).unwrap();
            let merged = WeightFile::open(&out).unwrap();
            let tokens: Vec<u32> = (0..12u32).map(|i| (i * 41 + 5) % 64).collect();
            let want = stage
                .forward(
                    &TrainInput::Tokens(tokens.clone()),
                    &BatchLayout::new(1, 12, vec![1; 12]).unwrap(),
                    &DropCtx::eval(),
                )
                .unwrap();
            let got = inference_logits(&merged, tokens.clone());
            let diff = max_abs(&(&got - &want).unwrap());
            assert!(
                diff < 1e-4,
                "{name} {method:?}: merged model differs from training by {diff}"
            );
            let before = inference_logits(&base, tokens);
            assert!(
                max_abs(&(&before - &want).unwrap()) > 1e-3,
                "{name}: nothing changed"
            );
        }
    }
}

/// A Phi-3 LoRA exports as PEFT loads it onto transformers' Phi-3 (whose
/// q/k/v and gate/up are fused): separate LoRAs drawn by
/// tests/fixtures/make_peft_fused_reference.py, set in Hearth's stage, give
/// PEFT's logits of the same LoRAs on the fused matrices (within 1e-4), and
/// the adapter Hearth writes is the one PEFT saved for them: the same
/// tensors under the same names, the same targets, ranks and alphas.
#[test]
fn a_phi3_lora_is_written_as_peft_saves_it_for_fused_projections() {
    use hearth_models::train::export::write_peft_adapter;
    let dir = hearth_test_utils::workspace_root().join("tests/fixtures/hf/phi3");
    let fused = dir.join("lora_fused");
    let want: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fused.join("reference.json")).unwrap())
            .unwrap();
    let cfg = lora_of(&want);
    let w = WeightFile::open(&dir).unwrap();
    let layers = w.config().num_hidden_layers;
    let stage = TrainStage::load(
        &w,
        StageSpec::full(layers),
        &opts(Method::Lora(cfg.clone()), DType::F32),
    )
    .unwrap();
    let separate =
        candle_core::safetensors::load(fused.join("separate.safetensors"), &Device::Cpu).unwrap();
    assert_eq!(separate.len(), stage.trainables().len());
    for (n, _) in stage.trainables() {
        stage.set(n, &separate[n]).unwrap();
    }
    // The logits of the adapted model against PEFT's.
    let ids: Vec<u32> = (0..40).map(|i| ((7 * i + 3) % 64) as u32).collect();
    let n = ids.len();
    let logits = stage
        .forward(
            &TrainInput::Tokens(ids),
            &BatchLayout::new(1, n, vec![1; n]).unwrap(),
            &DropCtx::eval(),
        )
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .reshape((n, ()))
        .unwrap()
        .to_vec2::<f64>()
        .unwrap();
    let peft_logits = want["logits"].as_array().unwrap();
    let mut worst: f64 = 0.0;
    for (row, want_row) in logits.iter().zip(peft_logits) {
        for (a, b) in row.iter().zip(want_row.as_array().unwrap()) {
            let b = b.as_f64().unwrap();
            worst = worst.max((a - b).abs() / b.abs().max(1.0));
        }
    }
    assert!(worst < 1e-4, "logits differ from PEFT's by {worst}");
    // The adapter as PEFT saved it.
    let out = tempfile::tempdir().unwrap();
    let trained: Vec<(String, Tensor)> = stage
        .trainables()
        .iter()
        .map(|(n, v)| (n.clone(), v.as_tensor().clone()))
        .collect();
    write_peft_adapter(out.path(), &cfg, "phi3", &trained, w.config()).unwrap();
    let ours =
        candle_core::safetensors::load(out.path().join("adapter_model.safetensors"), &Device::Cpu)
            .unwrap();
    let theirs =
        candle_core::safetensors::load(fused.join("adapter_model.safetensors"), &Device::Cpu)
            .unwrap();
    let mut a: Vec<&String> = ours.keys().collect();
    let mut b: Vec<&String> = theirs.keys().collect();
    a.sort();
    b.sort();
    assert_eq!(a, b);
    for (name, t) in &theirs {
        let d = (ours[name].clone() - t)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(d < 1e-6, "{name}: {d}");
    }
    let conf = |p: &std::path::Path| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(p.join("adapter_config.json")).unwrap())
            .unwrap()
    };
    let (ours, theirs) = (conf(out.path()), conf(&fused));
    let sorted = |v: &serde_json::Value| {
        let mut t: Vec<String> = v
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_str().unwrap().to_string())
            .collect();
        t.sort();
        t
    };
    assert_eq!(
        sorted(&ours["target_modules"]),
        sorted(&theirs["target_modules"])
    );
    // Numbers compare as numbers (`8.0` is PEFT's `8`).
    let num = |v: &serde_json::Value| -> serde_json::Value {
        match v {
            serde_json::Value::Object(o) => o
                .iter()
                .map(|(k, x)| (k.clone(), serde_json::json!(x.as_f64())))
                .collect::<serde_json::Map<_, _>>()
                .into(),
            x if x.is_number() => serde_json::json!(x.as_f64()),
            x => x.clone(),
        }
    };
    for k in [
        "r",
        "lora_alpha",
        "rank_pattern",
        "alpha_pattern",
        "peft_type",
    ] {
        assert_eq!(num(&ours[k]), num(&theirs[k]), "{k}");
    }
}

/// Phi-3's LoRAs on q, k, v, gate and up against PEFT's on the fused
/// `qkv_proj` and `gate_up_proj` (the adapters of the test above): one
/// step in f64 gives PEFT's loss, and each separate LoRA's gradient equals
/// the block of the fused gradient it occupies (A's rows, B's diagonal
/// block), as tests/fixtures/make_peft_fused_reference.py reads them off.
#[test]
fn phi3_loras_on_fused_projections_get_peft_gradients() {
    let dir = hearth_test_utils::workspace_root().join("tests/fixtures/hf/phi3");
    let fused = dir.join("lora_fused");
    let want: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fused.join("reference.json")).unwrap())
            .unwrap();
    let w = WeightFile::open(&dir).unwrap();
    let layers = w.config().num_hidden_layers;
    let stage = TrainStage::load(
        &w,
        StageSpec::full(layers),
        &opts(Method::Lora(lora_of(&want)), DType::F64),
    )
    .unwrap();
    let separate =
        candle_core::safetensors::load(fused.join("separate.safetensors"), &Device::Cpu).unwrap();
    for (n, _) in stage.trainables() {
        stage.set(n, &separate[n]).unwrap();
    }
    assert_eq!(want["grads"].as_object().unwrap().len(), 24);
    matches_reference("phi3 fused", &dir, &stage, &want, rtol("phi3"));
}

/// Every family's full fine-tune split into two stages (the first stage's
/// input gradient fed back from the second) gives the loss and every
/// parameter's gradient of the whole model in one stage, in f64 (a tied
/// embedding's two halves summed, as partner stages sum them).
#[test]
fn every_family_trains_split_into_two_stages_as_in_one() {
    for name in hearth_test_utils::HF_FAMILIES {
        let dir = hearth_test_utils::workspace_root()
            .join("tests/fixtures/hf")
            .join(name);
        let w = WeightFile::open(&dir).unwrap();
        let n = w.config().num_hidden_layers;
        let o = opts(Method::Full, DType::F64);
        let whole = TrainStage::load(&w, StageSpec::full(n), &o).unwrap();
        let cut = n / 2;
        let first = TrainStage::load(
            &w,
            StageSpec {
                start: 0,
                end: cut,
                embed: true,
                head: false,
            },
            &o,
        )
        .unwrap();
        let second = TrainStage::load(
            &w,
            StageSpec {
                start: cut,
                end: n,
                embed: false,
                head: true,
            },
            &o,
        )
        .unwrap();
        let ids: Vec<u32> = (0..16u32)
            .map(|i| (11 * i + 5) % w.config().vocab_size as u32)
            .collect();
        let len = ids.len();
        let labels: Vec<u32> = (0..len)
            .map(|i| ids.get(i + 1).copied().unwrap_or(IGNORE))
            .collect();
        let layout = BatchLayout::new(1, len, vec![1; len]).unwrap();
        let loss = || Upstream::Loss {
            labels: &labels,
            scale: 1.0,
        };
        let tokens = TrainInput::Tokens(ids.clone());
        let want = whole
            .backward(&tokens, &layout, &DropCtx::eval(), loss())
            .unwrap();
        let h = first.forward(&tokens, &layout, &DropCtx::eval()).unwrap();
        let late = second
            .backward(
                &TrainInput::Hidden(h.detach()),
                &layout,
                &DropCtx::eval(),
                loss(),
            )
            .unwrap();
        let g = late.input_grad.clone().unwrap();
        let early = first
            .backward(&tokens, &layout, &DropCtx::eval(), Upstream::Grad(&g))
            .unwrap();
        let (a, b) = (want.loss_sum.unwrap(), late.loss_sum.unwrap());
        assert!((a - b).abs() <= 1e-9 * a.abs(), "{name}: loss {b} vs {a}");
        // Each parameter's gradient, summed over the stages that hold it.
        let mut split: std::collections::HashMap<String, Tensor> = Default::default();
        for (stage, back) in [(&first, &early), (&second, &late)] {
            for ((pname, _), grad) in stage.trainables().iter().zip(&back.grads) {
                let grad = grad.clone().unwrap();
                let sum = match split.remove(pname) {
                    Some(g) => (g + grad).unwrap(),
                    None => grad,
                };
                split.insert(pname.clone(), sum);
            }
        }
        assert_eq!(split.len(), whole.trainables().len(), "{name}: parameters");
        for ((pname, _), grad) in whole.trainables().iter().zip(&want.grads) {
            let want = grad.as_ref().unwrap();
            let got = split
                .get(pname)
                .unwrap_or_else(|| panic!("{name}: {pname} has no gradient when split"));
            let max64 = |t: &Tensor| -> f64 {
                t.abs()
                    .and_then(|t| t.max_all())
                    .and_then(|t| t.to_dtype(DType::F64))
                    .and_then(|t| t.to_scalar::<f64>())
                    .unwrap()
            };
            let scale = max64(want).max(1e-12);
            let diff = max64(&(got - want).unwrap());
            assert!(
                diff <= 1e-9 * scale,
                "{name} {pname}: split gradients differ by {diff} (largest {scale})"
            );
        }
    }
}
