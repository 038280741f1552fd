//! The wgpu stage against the CPU reference on tiny random models: every
//! weight format, both precisions, prefill and ragged decode batches, and
//! stages split between the CPU and the GPU.
//!
//! Runs on whatever adapter wgpu finds, software ones included (CI uses
//! Mesa's llvmpipe Vulkan driver). Without one the tests say so and pass,
//! unless `HEARTH_REQUIRE_GPU` is set.
#![cfg(feature = "wgpu")]

use std::sync::Arc;

use anyhow::Result;
use candle_core::Tensor;
use hearth_models::gpu::Gpu;
use hearth_models::{KvCache, Logits, Precision, Stage, StageInput, StageSpec, WeightFile};
use hearth_test_utils::{TinySpec, tiny_model};

/// Largest difference relative to the largest magnitude of `want`.
fn rel_diff(got: &Tensor, want: &Tensor) -> Result<f32> {
    let d = (got - want)?.abs()?.max_all()?.to_scalar::<f32>()?;
    let m = want.abs()?.max_all()?.to_scalar::<f32>()?;
    Ok(d / m.max(1e-6))
}

/// Dense paths (f32 and f16 weights, f32 activations) differ only in float
/// summation order.
const F32_TOL: f32 = 1e-4;
/// Quantized paths quantize every matmul's input to 8-bit blocks, as the
/// CPU does. Summation-order noise (~1e-7) occasionally moves a value across
/// a rounding boundary there, which changes that value by one step (1/127 of
/// its block's range) and later layers carry it on: measured up to 9e-3 of
/// the largest logit on 4-layer random models, so the bound is 2e-2. The
/// kernels themselves agree to 1e-5 (src/gpu/tests.rs).
const QUANTIZED_TOL: f32 = 2e-2;

const PROMPT: [u32; 9] = [1, 40, 77, 100, 200, 5, 262, 3, 150];

/// Prefill of two sequences in one ragged batch, then two decode steps of
/// both together; every output of `a` against `b`.
fn compare(a: &Stage, b: &Stage, tol: f32, what: &str) -> Result<()> {
    let (mut ca1, mut ca2) = (a.new_cache(), a.new_cache());
    let (mut cb1, mut cb2) = (b.new_cache(), b.new_cache());
    let ids: Vec<u32> = PROMPT.iter().chain(&PROMPT[..4]).copied().collect();
    let run =
        |s: &Stage, c1: &mut KvCache, c2: &mut KvCache, ids: &[u32], lens: &[usize], l: Logits| {
            s.forward(StageInput::Tokens(ids.to_vec()), lens, &mut [c1, c2], l)
        };
    let ya = run(a, &mut ca1, &mut ca2, &ids, &[9, 4], Logits::All)?;
    let yb = run(b, &mut cb1, &mut cb2, &ids, &[9, 4], Logits::All)?;
    let d = rel_diff(&ya, &yb)?;
    assert!(d < tol, "{what}: prefill differs by {d}");
    for step in 0..2u32 {
        let ids = [10 + step, 20 + step];
        let ya = run(a, &mut ca1, &mut ca2, &ids, &[1, 1], Logits::Last)?;
        let yb = run(b, &mut cb1, &mut cb2, &ids, &[1, 1], Logits::Last)?;
        let d = rel_diff(&ya, &yb)?;
        assert!(d < tol, "{what}: decode step {step} differs by {d}");
    }
    assert_eq!(ca1.len(), 11);
    assert_eq!(ca2.len(), 6);
    Ok(())
}

#[test]
fn gpu_stage_matches_the_cpu_stage_for_every_format() -> Result<()> {
    let Some(gpu) = hearth_test_utils::gpu() else {
        return Ok(());
    };
    let dir = tempfile::tempdir()?;
    for (attention_bias, architecture) in [(false, "llama"), (true, "llama"), (false, "qwen3")] {
        let spec = TinySpec {
            attention_bias,
            architecture,
            ..TinySpec::default()
        };
        check_every_format(&gpu, &tiny_model(dir.path(), spec)?)?;
    }
    Ok(())
}

fn check_every_format(gpu: &Arc<Gpu>, m: &hearth_test_utils::TinyModel) -> Result<()> {
    let files = [
        ("f32 gguf", m.gguf_f32.clone()),
        ("q8_0 gguf", m.gguf_q8_0.clone()),
        ("q4_1 gguf", m.gguf_q4_1.clone()),
        ("safetensors", m.safetensors_dir.clone()),
    ];
    for (name, path) in files {
        let w = WeightFile::open(&path)?;
        let full = StageSpec::full(w.config().num_hidden_layers);
        for precision in [Precision::Quantized, Precision::F32] {
            let cpu = Stage::load(&w, full, precision)?;
            let on_gpu = Stage::load_gpu(gpu.clone(), &w, full, precision)?;
            let quantized = precision == Precision::Quantized && name.starts_with('q');
            let tol = if quantized { QUANTIZED_TOL } else { F32_TOL };
            compare(&on_gpu, &cpu, tol, &format!("{name} {precision:?}"))?;
        }
    }
    Ok(())
}

#[test]
fn untied_head_and_bad_inputs() -> Result<()> {
    let Some(gpu) = hearth_test_utils::gpu() else {
        return Ok(());
    };
    let dir = tempfile::tempdir()?;
    let m = tiny_model(
        dir.path(),
        TinySpec {
            tied: false,
            ..TinySpec::default()
        },
    )?;
    let w = WeightFile::open(&m.gguf_q4_1)?;
    let full = StageSpec::full(w.config().num_hidden_layers);
    let cpu = Stage::load(&w, full, Precision::Quantized)?;
    let on_gpu = Stage::load_gpu(gpu, &w, full, Precision::Quantized)?;
    compare(&on_gpu, &cpu, QUANTIZED_TOL, "untied q4_1")?;
    // Bad input is refused before anything runs on the device.
    let mut c = on_gpu.new_cache();
    assert!(
        on_gpu
            .forward(
                StageInput::Tokens(vec![100_000]),
                &[1],
                &mut [&mut c],
                Logits::Last
            )
            .is_err()
    );
    assert!(
        on_gpu
            .forward(
                StageInput::Tokens(vec![1, 2]),
                &[1],
                &mut [&mut c],
                Logits::Last
            )
            .is_err()
    );
    let mut host = KvCache::new(4);
    assert!(
        on_gpu
            .forward(
                StageInput::Tokens(vec![1]),
                &[1],
                &mut [&mut host],
                Logits::Last
            )
            .is_err()
    );
    assert_eq!(c.len(), 0);
    Ok(())
}

#[test]
fn a_mixed_cpu_gpu_split_equals_the_cpu_model() -> Result<()> {
    let Some(gpu) = hearth_test_utils::gpu() else {
        return Ok(());
    };
    let dir = tempfile::tempdir()?;
    let m = tiny_model(dir.path(), TinySpec::default())?;
    let w = WeightFile::open(&m.gguf_q4_1)?;
    let n = w.config().num_hidden_layers;
    let cut = |start, end| StageSpec {
        start,
        end,
        embed: start == 0,
        head: end == n,
    };
    let cpu_full = Stage::load(&w, StageSpec::full(n), Precision::Quantized)?;
    for gpu_first in [true, false] {
        let (a, b) = if gpu_first {
            (
                Stage::load_gpu(gpu.clone(), &w, cut(0, 2), Precision::Quantized)?,
                Stage::load(&w, cut(2, n), Precision::Quantized)?,
            )
        } else {
            (
                Stage::load(&w, cut(0, 2), Precision::Quantized)?,
                Stage::load_gpu(gpu.clone(), &w, cut(2, n), Precision::Quantized)?,
            )
        };
        let (mut c0, mut ca, mut cb) = (cpu_full.new_cache(), a.new_cache(), b.new_cache());
        let mut ids = PROMPT.to_vec();
        let mut lens = [ids.len()];
        for _ in 0..4 {
            let want = cpu_full.forward(
                StageInput::Tokens(ids.clone()),
                &lens,
                &mut [&mut c0],
                Logits::Last,
            )?;
            let h = a.forward(
                StageInput::Tokens(ids.clone()),
                &lens,
                &mut [&mut ca],
                Logits::Last,
            )?;
            let got = b.forward(StageInput::Hidden(h), &lens, &mut [&mut cb], Logits::Last)?;
            let d = rel_diff(&got, &want)?;
            assert!(
                d < QUANTIZED_TOL,
                "gpu first {gpu_first}: logits differ by {d}"
            );
            let next = want.argmax(1)?.to_vec1::<u32>()?[0];
            assert_eq!(got.argmax(1)?.to_vec1::<u32>()?[0], next);
            ids = vec![next];
            lens = [1];
        }
    }
    Ok(())
}

/// SmolLM2, its chat template and two questions as prompts.
fn smollm2() -> Result<Option<(WeightFile, Vec<Vec<u32>>)>> {
    let Some(path) = hearth_test_utils::real_model() else {
        return Ok(None);
    };
    let w = WeightFile::open(&path)?;
    let text = hearth_models::ModelText::load(&w)?;
    let mut prompts = Vec::new();
    for question in ["What is the capital of France?", "Name three colours."] {
        let chat = text.render_chat(&[hearth_models::Message::new("user", question)])?;
        prompts.push(text.encode_prompt(&chat)?);
    }
    Ok(Some((w, prompts)))
}

/// Greedy tokens of `stage` for `prompt`, `steps` of them.
fn greedy(stage: &Stage, prompt: &[u32], steps: usize) -> Result<Vec<u32>> {
    let mut cache = stage.new_cache();
    let mut input = prompt.to_vec();
    let mut out = Vec::new();
    for _ in 0..steps {
        let n = input.len();
        let logits = stage.forward(
            StageInput::Tokens(input),
            &[n],
            &mut [&mut cache],
            Logits::Last,
        )?;
        let next = logits.argmax(1)?.to_vec1::<u32>()?[0];
        out.push(next);
        input = vec![next];
    }
    Ok(out)
}

/// The dense path (weights dequantized to f32 once, f32 activations): the
/// GPU differs from the CPU only in summation order (3e-6 of the largest
/// logit on SmolLM2), so free-running greedy generations are identical.
#[test]
fn smollm2_greedy_tokens_match_the_cpu_path() -> Result<()> {
    let Some(gpu) = hearth_test_utils::gpu() else {
        return Ok(());
    };
    let Some((w, prompts)) = smollm2()? else {
        return Ok(());
    };
    let full = StageSpec::full(w.config().num_hidden_layers);
    let cpu = Stage::load(&w, full, Precision::F32)?;
    let on_gpu = Stage::load_gpu(gpu, &w, full, Precision::F32)?;
    for prompt in &prompts {
        let want = greedy(&cpu, prompt, 16)?;
        assert_eq!(greedy(&on_gpu, prompt, 16)?, want);
    }
    Ok(())
}

/// The quantized path runs the CPU's arithmetic, but re-quantizing every
/// matmul input makes 30 layers amplify summation-order noise (GPU vs CPU
/// logits differ by up to 4% of the largest, less than either differs from
/// the dense model), so a near-tie may go either way. With the CPU's tokens
/// fed to both (teacher forcing), the GPU must pick the CPU's token wherever
/// the CPU's top two are more than half a logit apart.
#[test]
fn smollm2_quantized_gpu_picks_the_cpu_token_wherever_the_choice_is_clear() -> Result<()> {
    let Some(gpu) = hearth_test_utils::gpu() else {
        return Ok(());
    };
    let Some((w, prompts)) = smollm2()? else {
        return Ok(());
    };
    let full = StageSpec::full(w.config().num_hidden_layers);
    let cpu = Stage::load(&w, full, Precision::Quantized)?;
    let on_gpu = Stage::load_gpu(gpu, &w, full, Precision::Quantized)?;
    let (mut clear, mut agree) = (0, 0);
    for prompt in &prompts {
        let (mut c1, mut c2) = (cpu.new_cache(), on_gpu.new_cache());
        let mut input = prompt.clone();
        for _ in 0..16 {
            let n = input.len();
            let want = cpu.forward(
                StageInput::Tokens(input.clone()),
                &[n],
                &mut [&mut c1],
                Logits::Last,
            )?;
            let got = on_gpu.forward(
                StageInput::Tokens(input),
                &[n],
                &mut [&mut c2],
                Logits::Last,
            )?;
            let mut v = want.to_vec2::<f32>()?.remove(0);
            let next = want.argmax(1)?.to_vec1::<u32>()?[0];
            let pick = got.argmax(1)?.to_vec1::<u32>()?[0];
            v.sort_by(|a, b| b.total_cmp(a));
            if v[0] - v[1] > 0.5 {
                clear += 1;
                assert_eq!(
                    pick,
                    next,
                    "a clear choice (margin {}) differs",
                    v[0] - v[1]
                );
            }
            agree += usize::from(pick == next);
            input = vec![next];
        }
    }
    eprintln!("{agree} of 32 tokens agree; {clear} clear choices all agree");
    assert!(clear >= 16, "only {clear} clear choices");
    Ok(())
}

/// A sliding window of 8 (transformers' Mistral fixture) on the device:
/// a prefill that crosses it, then decode steps past it, against the CPU
/// stage (which matches transformers, `stages.rs`). Then Gemma 2 and 3 the
/// same way: their windows on some layers, soft-caps, sandwich `1 + w`
/// norms, GeGLU, scaled embeddings, Gemma 3's q/k norms and local RoPE;
/// Phi-3's stacked projections, and LongRoPE on half of each head, whose
/// decode steps cross from the short to the long table.
#[test]
fn sliding_window_attention_on_the_gpu_equals_the_cpu() -> Result<()> {
    let Some(gpu) = hearth_test_utils::gpu() else {
        return Ok(());
    };
    for name in ["mistral-swa", "gemma2", "gemma3", "phi3", "phi3-longrope"] {
        on_the_gpu_equals_the_cpu(&gpu, name)?;
    }
    Ok(())
}

fn on_the_gpu_equals_the_cpu(gpu: &Arc<Gpu>, name: &str) -> Result<()> {
    let dir = hearth_test_utils::workspace_root()
        .join("tests/fixtures/hf")
        .join(name);
    let w = WeightFile::open(&dir)?;
    let full = StageSpec::full(w.config().num_hidden_layers);
    let ids: Vec<u32> = (0..20u32).map(|i| (7 * i + 3) % 64).collect();
    for precision in [Precision::F32, Precision::Quantized] {
        let cpu = Stage::load(&w, full, precision)?;
        let on_gpu = Stage::load_gpu(gpu.clone(), &w, full, precision)?;
        let (mut cc, mut gc) = (cpu.new_cache(), on_gpu.new_cache());
        let run = |s: &Stage, c: &mut KvCache, ids: &[u32], l: Logits| {
            s.forward(StageInput::Tokens(ids.to_vec()), &[ids.len()], &mut [c], l)
        };
        let a = run(&on_gpu, &mut gc, &ids[..12], Logits::All)?;
        let b = run(&cpu, &mut cc, &ids[..12], Logits::All)?;
        let d = rel_diff(&a, &b)?;
        assert!(d < F32_TOL, "{name} {precision:?}: prefill differs by {d}");
        for (i, id) in ids.iter().enumerate().skip(12) {
            let a = run(&on_gpu, &mut gc, &[*id], Logits::Last)?;
            let b = run(&cpu, &mut cc, &[*id], Logits::Last)?;
            let d = rel_diff(&a, &b)?;
            assert!(
                d < F32_TOL,
                "{name} {precision:?}: decode at {i} differs by {d}"
            );
        }
    }
    Ok(())
}

/// Every family's transformers fixture split across devices: two stages
/// on the GPU, and three alternating GPU, CPU, GPU where it has the layers,
/// against the CPU's single stage (prefill past the windows and LongRoPE's
/// original context, then decode steps).
#[test]
fn every_family_pipelines_across_the_gpu_and_the_cpu() -> Result<()> {
    let Some(gpu) = hearth_test_utils::gpu() else {
        return Ok(());
    };
    let tmp = tempfile::tempdir()?;
    for name in hearth_test_utils::HF_FAMILIES {
        let fixture = hearth_test_utils::workspace_root()
            .join("tests/fixtures/hf")
            .join(name);
        // Two-layer fixtures made four deep: every family in three stages.
        let dir = if WeightFile::open(&fixture)?.config().num_hidden_layers < 3 {
            hearth_test_utils::deepened_hf(&fixture, 4, &tmp.path().join(name))?
        } else {
            fixture
        };
        let w = WeightFile::open(&dir)?;
        let n = w.config().num_hidden_layers;
        let spec = |start, end| StageSpec {
            start,
            end,
            embed: start == 0,
            head: end == n,
        };
        let full = Stage::load(&w, StageSpec::full(n), Precision::F32)?;
        let mut splits = vec![vec![
            Stage::load_gpu(gpu.clone(), &w, spec(0, n / 2), Precision::F32)?,
            Stage::load_gpu(gpu.clone(), &w, spec(n / 2, n), Precision::F32)?,
        ]];
        assert!(n >= 3, "{name}: {n} layers");
        splits.push(vec![
            Stage::load_gpu(gpu.clone(), &w, spec(0, 1), Precision::F32)?,
            Stage::load(&w, spec(1, 2), Precision::F32)?,
            Stage::load_gpu(gpu.clone(), &w, spec(2, n), Precision::F32)?,
        ]);
        // Three stages, all on the GPU.
        splits.push(vec![
            Stage::load_gpu(gpu.clone(), &w, spec(0, 1), Precision::F32)?,
            Stage::load_gpu(gpu.clone(), &w, spec(1, 2), Precision::F32)?,
            Stage::load_gpu(gpu.clone(), &w, spec(2, n), Precision::F32)?,
        ]);
        let ids: Vec<u32> = (0..20u32).map(|i| (7 * i + 3) % 64).collect();
        for stages in &splits {
            chain_matches(name, &full, stages, &ids, 6, F32_TOL)?;
        }
    }
    Ok(())
}

/// K-quants held on the device in their own format (llama.cpp's Q4_K_M
/// file: Q4_K and Q6_K): the matrices take the file's bytes (Q6_K padded
/// to whole words), not f32's eight times more, and compute what the
/// dequantized weights compute on the CPU's f32 path.
#[test]
fn k_quants_stay_k_quants_on_the_gpu() -> Result<()> {
    let Some(gpu) = hearth_test_utils::gpu() else {
        return Ok(());
    };
    let path = hearth_test_utils::workspace_root()
        .join("tests/fixtures/llamacpp/llama-q4k/model-Q4_K_M.gguf");
    let w = WeightFile::open(&path)?;
    let full = StageSpec::full(w.config().num_hidden_layers);
    let on_gpu = Stage::load_gpu(gpu.clone(), &w, full, Precision::Quantized)?;
    let stored: u64 = w
        .tensor_layout()
        .iter()
        .filter(|t| t.shape.len() == 2)
        .map(|t| t.bytes)
        .sum();
    let elems: u64 = w
        .tensor_layout()
        .iter()
        .filter(|t| t.shape.len() == 2)
        .map(|t| t.shape.iter().product::<usize>() as u64)
        .sum();
    let held = on_gpu.gpu_matrix_bytes().unwrap_or(0);
    assert!(
        held >= stored && held <= stored + stored / 50,
        "held {held} bytes for {stored} stored ({} as f32)",
        elems * 4
    );
    let cpu = Stage::load(&w, full, Precision::F32)?;
    let (mut cg, mut cc) = (on_gpu.new_cache(), cpu.new_cache());
    let mut input: Vec<u32> = (0..20u32).map(|i| (7 * i + 3) % 64).collect();
    for step in 0..4 {
        let run = |s: &Stage, c: &mut KvCache, ids: &[u32]| {
            s.forward(
                StageInput::Tokens(ids.to_vec()),
                &[ids.len()],
                &mut [c],
                Logits::Last,
            )
        };
        let a = run(&on_gpu, &mut cg, &input)?;
        let b = run(&cpu, &mut cc, &input)?;
        let d = rel_diff(&a, &b)?;
        assert!(
            d < F32_TOL,
            "step {step}: the GPU's Q4_K_M differs from dequantized f32 by {d}"
        );
        input = vec![b.argmax(1)?.to_vec1::<u32>()?[0]];
    }
    Ok(())
}

/// Every family's llama.cpp-layout GGUF in Q8_0 and, widened to 256,
/// in llama.cpp's Q4_K_M (Phi-3's fused projections, Gemma's stored
/// `1 + w` norms, Llama 3's `rope_freqs`) on the GPU, held quantized,
/// whole and in two GPU stages: the CPU's logits.
#[test]
fn every_family_gguf_runs_quantized_on_the_gpu() -> Result<()> {
    let Some(gpu) = hearth_test_utils::gpu() else {
        return Ok(());
    };
    for (name, file) in hearth_test_utils::HF_FAMILIES
        .iter()
        .flat_map(|n| [(n, "model-Q8_0.gguf"), (n, "model-Q4_K_M.gguf")])
    {
        let path = hearth_test_utils::workspace_root()
            .join("tests/fixtures/llamacpp")
            .join(name)
            .join(file);
        let w = WeightFile::open(&path)?;
        let n = w.config().num_hidden_layers;
        let spec = |start, end| StageSpec {
            start,
            end,
            embed: start == 0,
            head: end == n,
        };
        // The GPU multiplies K-quant weights by f32 activations: it is
        // checked against the CPU's f32 path over the same weights (the
        // CPU's quantized path also rounds activations to 8 bits, 2-3% of
        // the largest logit here).
        let kquant = file.contains("_K");
        let reference = if kquant {
            Precision::F32
        } else {
            Precision::Quantized
        };
        let cpu = Stage::load(&w, StageSpec::full(n), reference)?;
        let splits = [
            vec![Stage::load_gpu(
                gpu.clone(),
                &w,
                StageSpec::full(n),
                Precision::Quantized,
            )?],
            vec![
                Stage::load_gpu(gpu.clone(), &w, spec(0, n / 2), Precision::Quantized)?,
                Stage::load_gpu(gpu.clone(), &w, spec(n / 2, n), Precision::Quantized)?,
            ],
        ];
        let vocab = w.config().vocab_size as u32;
        let ids: Vec<u32> = (0..20u32).map(|i| (7 * i + 3) % vocab).collect();
        for stages in &splits {
            chain_matches(
                &format!("{name} {file}"),
                &cpu,
                stages,
                &ids,
                4,
                if kquant { F32_TOL } else { QUANTIZED_TOL },
            )?;
        }
    }
    Ok(())
}

/// `stages` chained give `full`'s last logits within `tol` (relative), for
/// a prompt of `ids` and then `steps - 1` decode steps, both going on with
/// `full`'s greedy token.
fn chain_matches(
    name: &str,
    full: &Stage,
    stages: &[Stage],
    ids: &[u32],
    steps: usize,
    tol: f32,
) -> Result<()> {
    let mut cf = full.new_cache();
    let mut cs: Vec<KvCache> = stages.iter().map(Stage::new_cache).collect();
    let mut input = ids.to_vec();
    for step in 0..steps {
        let len = input.len();
        let want = full.forward(
            StageInput::Tokens(input.clone()),
            &[len],
            &mut [&mut cf],
            Logits::Last,
        )?;
        let mut x = StageInput::Tokens(input.clone());
        for (st, c) in stages.iter().zip(cs.iter_mut()) {
            x = StageInput::Hidden(st.forward(x, &[len], &mut [c], Logits::Last)?);
        }
        let StageInput::Hidden(got) = x else {
            anyhow::bail!("no output");
        };
        let d = rel_diff(&got, &want)?;
        assert!(
            d < tol,
            "{name}: {} stage(s), step {step}: logits differ by {d}",
            stages.len()
        );
        input = vec![want.argmax(1)?.to_vec1::<u32>()?[0]];
    }
    Ok(())
}
