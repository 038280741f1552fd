//! LoRA adapters served beside the base model: a batch that mixes
//! sequences of two adapters and of the base gives each sequence the
//! logits of its own merged model served alone (the merge Hearth's jobs
//! export), over prefill and decode, on one stage or split over two; and
//! bad adapters are refused with a reason.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::Result;
use candle_core::{DType, Tensor};
use hearth_models::adapter::StageAdapter;
use hearth_models::train::export::{merged_tensors, write_merged_gguf};
use hearth_models::train::{LoraConfig, Method, Target, TrainOptions, TrainStage};
use hearth_models::{KvCache, Logits, Precision, Stage, StageInput, StageSpec, WeightFile};
use hearth_test_utils::{TinySpec, tiny_model};

/// A trained-looking adapter on `targets` and its merged model (see
/// [`hearth_test_utils::lora_with_merged`]).
fn adapter(
    base: &WeightFile,
    dir: &Path,
    seed: u64,
    rank: usize,
    targets: &[Target],
) -> Result<(PathBuf, PathBuf)> {
    hearth_test_utils::lora_with_merged(base, dir, seed, rank, targets, 0.05)
}

fn rel_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
    let d = (a - b)?.abs()?.max_all()?.to_scalar::<f32>()?;
    let s = b.abs()?.max_all()?.to_scalar::<f32>()?;
    Ok(d / s.max(1e-6))
}

/// Prompts of different lengths, one per sequence.
fn prompts(vocab: u32) -> Vec<Vec<u32>> {
    [5usize, 3, 7, 4]
        .iter()
        .enumerate()
        .map(|(s, &len)| {
            (0..len as u32)
                .map(|i| (i * 37 + s as u32 * 101 + 3) % vocab)
                .collect()
        })
        .collect()
}

/// The logits of every position of one sequence run alone on `stages`
/// (chained), prompt then `decode` one-token steps.
fn alone(stages: &[Stage], prompt: &[u32], decode: &[u32]) -> Result<Vec<Tensor>> {
    let mut caches: Vec<KvCache> = stages.iter().map(Stage::new_cache).collect();
    let mut out = Vec::new();
    let mut step = |ids: &[u32]| -> Result<Tensor> {
        let mut x = StageInput::Tokens(ids.to_vec());
        let mut y = None;
        for (s, c) in stages.iter().zip(caches.iter_mut()) {
            let t = s.forward(x, &[ids.len()], &mut [c], Logits::All)?;
            x = StageInput::Hidden(t.clone());
            y = Some(t);
        }
        Ok(y.expect("at least one stage"))
    };
    out.push(step(prompt)?);
    for &t in decode {
        out.push(step(&[t])?);
    }
    Ok(out)
}

/// Every sequence in one ragged batch on `stages`, each with its adapter
/// (by index into `adapters[stage]`), prompt then decode steps; each
/// sequence's logits, step by step.
fn mixed(
    stages: &[Stage],
    adapters: &[Vec<StageAdapter>],
    which: &[Option<usize>],
    prompts: &[Vec<u32>],
    decode: &[Vec<u32>],
) -> Result<Vec<Vec<Tensor>>> {
    let mut caches: Vec<Vec<KvCache>> = stages
        .iter()
        .map(|s| prompts.iter().map(|_| s.new_cache()).collect())
        .collect();
    let mut got: Vec<Vec<Tensor>> = vec![Vec::new(); prompts.len()];
    let steps = 1 + decode[0].len();
    for k in 0..steps {
        let ids: Vec<Vec<u32>> = if k == 0 {
            prompts.to_vec()
        } else {
            decode.iter().map(|d| vec![d[k - 1]]).collect()
        };
        let lens: Vec<usize> = ids.iter().map(Vec::len).collect();
        let mut x = StageInput::Tokens(ids.concat());
        let mut y = None;
        for (i, s) in stages.iter().enumerate() {
            let ads: Vec<Option<&StageAdapter>> =
                which.iter().map(|w| w.map(|j| &adapters[i][j])).collect();
            let mut cs: Vec<&mut KvCache> = caches[i].iter_mut().collect();
            let t = s.forward_adapted(x, &lens, &mut cs, Logits::All, &ads)?;
            x = StageInput::Hidden(t.clone());
            y = Some(t);
        }
        let y = y.expect("at least one stage");
        let mut at = 0;
        for (seq, len) in lens.iter().enumerate() {
            got[seq].push(y.narrow(0, at, *len)?);
            at += len;
        }
    }
    Ok(got)
}

#[test]
fn a_mixed_batch_gives_each_sequence_its_own_merged_models_logits() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let m = tiny_model(
        dir.path(),
        TinySpec {
            attention_bias: true,
            ..TinySpec::default()
        },
    )?;
    let base = WeightFile::open(&m.gguf_f32)?;
    let cfg = base.config().clone();
    let n = cfg.num_hidden_layers;
    let d1 = dir.path().join("one");
    let d2 = dir.path().join("two");
    let (peft1, merged1) = adapter(&base, &d1, 1, 4, &Target::ALL)?;
    let (peft2, merged2) = adapter(&base, &d2, 2, 2, &[Target::Q, Target::V, Target::Down])?;
    let vocab = cfg.vocab_size as u32;
    let prompts = prompts(vocab);
    let decode: Vec<Vec<u32>> = (0..prompts.len())
        .map(|s| {
            (0..3)
                .map(|k| (s as u32 * 13 + k * 7 + 1) % vocab)
                .collect()
        })
        .collect();
    // Sequence 0 and 3 the first adapter (not adjacent), 1 the base, 2 the second.
    let which = [Some(0), None, Some(1), Some(0)];
    let models: Vec<WeightFile> = vec![
        WeightFile::open(&merged1)?,
        WeightFile::open(&m.gguf_f32)?,
        WeightFile::open(&merged2)?,
        WeightFile::open(&merged1)?,
    ];
    // Stacked q/k/v and gate/up (quantized) and separate matrices (f32);
    // one stage, then split in two.
    for (precision, cut) in [
        (Precision::Quantized, None),
        (Precision::Quantized, Some(2)),
        (Precision::F32, Some(1)),
    ] {
        let specs: Vec<StageSpec> = match cut {
            None => vec![StageSpec::full(n)],
            Some(c) => vec![
                StageSpec {
                    start: 0,
                    end: c,
                    embed: true,
                    head: false,
                },
                StageSpec {
                    start: c,
                    end: n,
                    embed: false,
                    head: true,
                },
            ],
        };
        let stages: Vec<Stage> = specs
            .iter()
            .map(|s| Stage::load(&base, *s, precision))
            .collect::<Result<_, _>>()?;
        let adapters: Vec<Vec<StageAdapter>> = specs
            .iter()
            .map(|s| {
                Ok(vec![
                    StageAdapter::load_peft(&peft1, &cfg, *s)?,
                    StageAdapter::load_peft(&peft2, &cfg, *s)?,
                ])
            })
            .collect::<Result<_>>()?;
        let got = mixed(&stages, &adapters, &which, &prompts, &decode)?;
        for (seq, model) in models.iter().enumerate() {
            let own: Vec<Stage> = specs
                .iter()
                .map(|s| Stage::load(model, *s, precision))
                .collect::<Result<_, _>>()?;
            let want = alone(&own, &prompts[seq], &decode[seq])?;
            for (k, (g, w)) in got[seq].iter().zip(&want).enumerate() {
                let d = rel_diff(g, w)?;
                assert!(
                    d < 1e-4,
                    "{precision:?}, cut {cut:?}, sequence {seq} ({:?}), step {k}: {d}",
                    which[seq]
                );
            }
        }
        // The adapters change the logits (the check above is not vacuous).
        let base_stages: Vec<Stage> = specs
            .iter()
            .map(|s| Stage::load(&base, *s, precision))
            .collect::<Result<_, _>>()?;
        let plain = alone(&base_stages, &prompts[0], &decode[0])?;
        assert!(rel_diff(&got[0][0], &plain[0])? > 1e-2);
    }
    Ok(())
}

#[test]
fn bad_adapters_are_refused_with_a_reason() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let m = tiny_model(dir.path(), TinySpec::default())?;
    let base = WeightFile::open(&m.gguf_f32)?;
    let cfg = base.config().clone();
    let n = cfg.num_hidden_layers;
    let (peft, _) = adapter(&base, &dir.path().join("a"), 1, 4, &Target::ALL)?;
    let full = StageSpec::full(n);
    // Another model's shape.
    let other_dir = dir.path().join("wide");
    let wide = tiny_model(
        &other_dir,
        TinySpec {
            hidden: 96,
            ..TinySpec::default()
        },
    )?;
    let wide = WeightFile::open(&wide.gguf_f32)?;
    let err = StageAdapter::load_peft(&peft, wide.config(), full).unwrap_err();
    assert!(err.to_string().contains("maps"), "{err}");
    // A truncated tensor file, a missing or malformed config.
    let broken = dir.path().join("broken");
    std::fs::create_dir_all(&broken)?;
    std::fs::copy(
        peft.join("adapter_config.json"),
        broken.join("adapter_config.json"),
    )?;
    let bytes = std::fs::read(peft.join("adapter_model.safetensors"))?;
    std::fs::write(
        broken.join("adapter_model.safetensors"),
        &bytes[..bytes.len() / 2],
    )?;
    let err = StageAdapter::load_peft(&broken, &cfg, full).unwrap_err();
    assert!(err.to_string().contains("safetensors"), "{err}");
    std::fs::write(broken.join("adapter_config.json"), b"{\"r\": \"eight\"}")?;
    let err = StageAdapter::load_peft(&broken, &cfg, full).unwrap_err();
    assert!(err.to_string().contains("adapter_config.json"), "{err}");
    std::fs::remove_file(broken.join("adapter_config.json"))?;
    assert!(StageAdapter::load_peft(&broken, &cfg, full).is_err());
    // A config whose rank is not its matrices' (the scale would be wrong).
    let lying = dir.path().join("lying");
    std::fs::create_dir_all(&lying)?;
    std::fs::copy(
        peft.join("adapter_model.safetensors"),
        lying.join("adapter_model.safetensors"),
    )?;
    std::fs::write(
        lying.join("adapter_config.json"),
        b"{\"r\": 2, \"lora_alpha\": 4.0}",
    )?;
    let err = StageAdapter::load_peft(&lying, &cfg, full).unwrap_err();
    assert!(err.to_string().contains("rank 4"), "{err}");
    // An adapter loaded for other layers than the stage's.
    let stage = Stage::load(
        &base,
        StageSpec {
            start: 0,
            end: 2,
            embed: true,
            head: false,
        },
        Precision::Quantized,
    )?;
    let wrong = StageAdapter::load_peft(&peft, &cfg, full)?;
    let mut c = stage.new_cache();
    let err = stage
        .forward_adapted(
            StageInput::Tokens(vec![1, 2]),
            &[2],
            &mut [&mut c],
            Logits::Last,
            &[Some(&wrong)],
        )
        .unwrap_err();
    assert!(err.to_string().contains("layers 0..4"), "{err}");
    // One adapter entry per sequence, or none.
    let right = StageAdapter::load_peft(&peft, &cfg, stage.spec())?;
    let mut c2 = stage.new_cache();
    assert!(
        stage
            .forward_adapted(
                StageInput::Tokens(vec![1, 2]),
                &[1, 1],
                &mut [&mut c, &mut c2],
                Logits::Last,
                &[Some(&right)],
            )
            .is_err()
    );
    assert!(right.bytes() > 0 && right.bytes() < wrong.bytes());
    Ok(())
}

/// The merged export quantized back to the base's type when asked: the
/// changed tensors keep the base's Q4_1, the file keeps the base's size,
/// and its logits stay near the f32 merge's.
#[test]
fn a_merged_export_can_keep_the_base_quantization() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let m = tiny_model(dir.path(), TinySpec::default())?;
    let base = WeightFile::open(&m.gguf_q4_1)?;
    let (peft, merged_f32) = adapter(&base, &dir.path().join("a"), 3, 4, &Target::ALL)?;
    assert!(peft.join("adapter_model.safetensors").is_file());
    let lora = LoraConfig {
        rank: 4,
        alpha: 8.0,
        dropout: 0.0,
        targets: Target::ALL.to_vec(),
        init_b_std: 0.05,
    };
    let method = Method::Lora(lora);
    let n = base.config().num_hidden_layers;
    let stage = TrainStage::load(
        &base,
        StageSpec::full(n),
        &TrainOptions {
            method: method.clone(),
            dtype: DType::F32,
            seed: 3,
        },
    )?;
    let trained: HashMap<String, Tensor> = stage
        .trainables()
        .iter()
        .map(|(n, v)| (n.clone(), v.as_tensor().clone()))
        .collect();
    let quantized = dir.path().join("merged-q4_1.gguf");
    write_merged_gguf(
        &base,
        &merged_tensors(&base, &method, &trained)?,
        "merged",
        &quantized,
        true,
    )?;
    let size = |p: &Path| std::fs::metadata(p).map(|m| m.len());
    let (b, f, q) = (size(&m.gguf_q4_1)?, size(&merged_f32)?, size(&quantized)?);
    assert!(q.abs_diff(b) * 50 < b, "base {b} B, quantized merge {q} B");
    assert!(
        f > q * 2,
        "the f32 merge ({f} B) is several times the quantized one ({q} B)"
    );
    // Every layer matrix is Q4_1 again.
    let mut file = std::fs::File::open(&quantized)?;
    let content = candle_core::quantized::gguf_file::Content::read(&mut file)?;
    let q4_1 = content
        .tensor_infos
        .iter()
        .filter(|(n, i)| {
            n.starts_with("blk.")
                && n.ends_with("_q.weight")
                && i.ggml_dtype == candle_core::quantized::GgmlDType::Q4_1
        })
        .count();
    assert_eq!(
        q4_1,
        n,
        "{:?}",
        content.tensor_infos.keys().collect::<Vec<_>>()
    );
    // Its logits are the f32 merge's, up to the quantization.
    let ids: Vec<u32> = vec![3, 17, 99, 4, 250, 8];
    let logits = |p: &Path| -> Result<Tensor> {
        let w = WeightFile::open(p)?;
        let st = Stage::load(&w, StageSpec::full(n), Precision::Quantized)?;
        Ok(alone(&[st], &ids, &[])?.remove(0))
    };
    // The yardstick: what Q4_1 does to this random-weight model's logits.
    let d_base = rel_diff(&logits(&m.gguf_q4_1)?, &logits(&m.gguf_f32)?)?;
    let d = rel_diff(&logits(&quantized)?, &logits(&merged_f32)?)?;
    eprintln!("quantized merge vs f32 merge: {d}; Q4_1 base vs f32 base: {d_base}");
    assert!(
        d > 0.0 && d <= 2.0 * d_base,
        "quantized merge vs f32 merge: {d}, Q4_1 itself: {d_base}"
    );
    Ok(())
}
