//! Measures how fast this device runs the real model: one decoder layer,
//! the embedding and the head, for decode, prefill and training.
//!
//! Inference runs the quantized stage exactly as serving does, decode over
//! enough copies of the weights that they come from memory, not cache. Training runs
//! the dense f32 stage (the only differentiable one): "forward" is its
//! forward pass, "train" is forward plus the backward pass to the stage's
//! input, which is what a frozen base (LoRA) costs; the planner adds the
//! weight gradients of full fine-tuning and recomputation from "forward".

use std::time::Instant;

use candle_core::{Device, Tensor, Var};
use hearth_models::{Logits, Precision, Stage, StageInput, StageSpec, WeightFile};
use hearth_partitioner::PhaseTimes;

use super::{ModelTimes, ProfileError, unix_now};

/// How figures are measured; part of the cache key, so figures measured
/// another way are measured again (2: decode over copies of the weights).
pub(crate) const METHOD: u32 = 2;

/// How much to measure.
#[derive(Debug, Clone)]
pub struct MeasureOptions {
    /// Prompt length for prefill, and the context decode steps attend over.
    pub prompt_tokens: usize,
    /// Tokens per training micro-batch.
    pub train_tokens: usize,
    /// Timed decode steps (the median is kept).
    pub decode_reps: usize,
    /// Timed prefill and training passes (the median is kept).
    pub reps: usize,
    /// Least wall time each figure is timed over (seconds). A figure is the
    /// mean over all repetitions in that time, so it spans CPU-quota
    /// periods and turbo/thermal effects: the sustained speed, not a burst
    /// that fits in one quota period. 0 keeps the median of the counted
    /// repetitions (quick measurements for tests).
    pub min_secs: f64,
    /// Where inference stages run (training is measured on the CPU).
    pub compute: crate::Compute,
}

impl Default for MeasureOptions {
    fn default() -> Self {
        Self {
            prompt_tokens: 128,
            train_tokens: 128,
            decode_reps: 64,
            reps: 3,
            min_secs: 1.0,
            compute: crate::Compute::Cpu,
        }
    }
}

impl MeasureOptions {
    /// The default measurement on `compute`; `HEARTH_MEASURE_SECS` (0 to
    /// 60) sets how long each figure is timed over.
    pub fn for_compute(compute: &crate::Compute) -> Self {
        let default = Self::default();
        let min_secs = std::env::var("HEARTH_MEASURE_SECS")
            .ok()
            .and_then(|v| v.trim().parse::<f64>().ok())
            .filter(|v| v.is_finite() && (0.0..=60.0).contains(v))
            .unwrap_or(default.min_secs);
        Self {
            compute: compute.clone(),
            min_secs,
            ..default
        }
    }

    /// A quick measurement for tests (noisier).
    pub fn quick() -> Self {
        Self {
            prompt_tokens: 32,
            train_tokens: 32,
            decode_reps: 8,
            reps: 1,
            min_secs: 0.0,
            compute: crate::Compute::Cpu,
        }
    }
}

/// Seconds per run of `f`, after one untimed warm-up run: with
/// `min_secs` > 0, the mean wall time over at least `reps` runs lasting at
/// least `min_secs` (throttled periods count, as they do when serving);
/// else the median of `reps` runs.
fn time_s(
    reps: usize,
    min_secs: f64,
    mut f: impl FnMut() -> Result<(), ProfileError>,
) -> Result<f64, ProfileError> {
    f()?;
    let reps = reps.max(1);
    if min_secs > 0.0 {
        let start = Instant::now();
        let mut runs = 0usize;
        while runs < reps || start.elapsed().as_secs_f64() < min_secs {
            f()?;
            runs += 1;
        }
        return Ok(start.elapsed().as_secs_f64() / runs as f64);
    }
    let mut times = Vec::with_capacity(reps);
    for _ in 0..reps {
        let t = Instant::now();
        f()?;
        times.push(t.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    Ok(times[times.len() / 2])
}

/// Inference times of a quantized stage fed hidden states (or token ids).
/// Decode steps rotate over `stages`, copies of the same weights, so that
/// each step reads its weights from memory as serving does when a whole
/// model streams through (one small layer timed alone would stay in cache
/// and look faster than it runs). Prefill is timed on the first copy.
fn inference_times(
    stages: &[Stage],
    tokens: bool,
    opts: &MeasureOptions,
) -> Result<(f64, f64), ProfileError> {
    let Some(stage) = stages.first() else {
        return Err(ProfileError::Candle(candle_core::Error::Msg(
            "nothing to measure".into(),
        )));
    };
    let dev = Device::Cpu;
    let hidden = stage.config().hidden_size;
    // Leave room for the decode step in a model with a short context.
    let context = stage.config().max_position_embeddings;
    let p = opts
        .prompt_tokens
        .clamp(1, context.saturating_sub(1).max(1));
    let input = |n: usize| -> Result<StageInput, ProfileError> {
        Ok(if tokens {
            // Ids inside any vocabulary (tiny test models have a few hundred).
            let vocab = stage.config().vocab_size.clamp(2, 1000) as u32;
            StageInput::Tokens((0..n as u32).map(|i| (i * 7 + 1) % vocab).collect())
        } else {
            StageInput::Hidden(Tensor::randn(0f32, 1f32, (n, hidden), &dev)?)
        })
    };
    let prompt = input(p)?;
    let prefill = time_s(opts.reps, opts.min_secs, || {
        let mut cache = stage.new_cache();
        stage.forward(prompt.clone(), &[p], &mut [&mut cache], Logits::Last)?;
        Ok(())
    })?;
    let mut caches = Vec::with_capacity(stages.len());
    for s in stages {
        let mut cache = s.new_cache();
        s.forward(prompt.clone(), &[p], &mut [&mut cache], Logits::Last)?;
        caches.push(cache);
    }
    let one = input(1)?;
    let mut next = 0usize;
    let decode = time_s(opts.decode_reps.max(stages.len()), opts.min_secs, || {
        let i = next % stages.len();
        next = next.wrapping_add(1);
        let (s, cache) = (&stages[i], &mut caches[i]);
        s.forward(one.clone(), &[1], &mut [cache], Logits::Last)?;
        cache.truncate(p);
        Ok(())
    })?;
    Ok((decode, prefill / p as f64))
}

/// Most bytes of weight copies decode is timed over ([`inference_times`]):
/// past any CPU's per-core caches and most last-level caches.
const STREAM_BYTES: u64 = 256 << 20;
/// Most copies, for tiny models.
const MAX_COPIES: u64 = 64;

/// How many copies of a part of `part_bytes` to rotate over so that decode
/// reads as many weight bytes as `model_bytes` (the whole model's, up to
/// [`STREAM_BYTES`]) before reading a copy again.
fn copies(part_bytes: u64, model_bytes: u64) -> usize {
    let target = model_bytes.min(STREAM_BYTES);
    target.div_ceil(part_bytes.max(1)).clamp(1, MAX_COPIES) as usize
}

/// Training times per token of a dense stage: (forward, forward + backward).
fn train_times(stage: &Stage, opts: &MeasureOptions) -> Result<(f64, f64), ProfileError> {
    let dev = Device::Cpu;
    let n = opts
        .train_tokens
        .clamp(1, stage.config().max_position_embeddings.max(1));
    let hidden = stage.config().hidden_size;
    let x = Var::from_tensor(&Tensor::randn(0f32, 1f32, (n, hidden), &dev)?)?;
    let forward = || -> Result<Tensor, ProfileError> {
        let mut cache = stage.new_cache();
        let input = StageInput::Hidden(x.as_tensor().clone());
        Ok(stage.forward(input, &[n], &mut [&mut cache], Logits::All)?)
    };
    let fwd = time_s(opts.reps, opts.min_secs, || forward().map(drop))?;
    // The backward alone, after an untimed forward each time: a training
    // pass is the forward plus this, so its time never comes out below the
    // forward's however the machine's speed drifts between the two.
    let mut bwd = Vec::new();
    let start = Instant::now();
    for run in 0.. {
        let loss = forward()?.sqr()?.mean_all()?;
        let t = Instant::now();
        let grads = loss.backward()?;
        let s = t.elapsed().as_secs_f64();
        if grads.get(x.as_tensor()).is_none() {
            return Err(ProfileError::Candle(candle_core::Error::Msg(
                "the stage's input received no gradient".into(),
            )));
        }
        if run > 0 {
            bwd.push(s);
        }
        if bwd.len() >= opts.reps.max(1) && start.elapsed().as_secs_f64() >= opts.min_secs {
            break;
        }
    }
    // The same statistic as `time_s` gave the forward: the mean over a
    // sustained window, else the median.
    let back = if opts.min_secs > 0.0 {
        bwd.iter().sum::<f64>() / bwd.len().max(1) as f64
    } else {
        bwd.sort_by(f64::total_cmp);
        bwd.get(bwd.len() / 2).copied().unwrap_or(0.0)
    };
    Ok((fwd / n as f64, (fwd + back) / n as f64))
}

/// Decode and prefill times of `spec` quantized, over `copies` copies.
fn inference_part(
    weights: &WeightFile,
    spec: StageSpec,
    copies: usize,
    opts: &MeasureOptions,
) -> Result<(f64, f64), ProfileError> {
    let stages = (0..copies.max(1))
        .map(|_| opts.compute.load_stage(weights, spec, Precision::Quantized))
        .collect::<Result<Vec<_>, _>>()?;
    inference_times(&stages, spec.embed, opts)
}

/// Inference times of `spec` quantized, and training times in f32.
fn measure_part(
    weights: &WeightFile,
    spec: StageSpec,
    copies: usize,
    what: &str,
    opts: &MeasureOptions,
    progress: &mut dyn FnMut(&str),
) -> Result<PhaseTimes, ProfileError> {
    progress(&format!("{what}: decode and prefill"));
    let (decode_s, prefill_s_per_token) = inference_part(weights, spec, copies, opts)?;
    progress(&format!("{what}: training"));
    let stage = Stage::load(weights, spec, Precision::F32)?;
    let (train_forward_s_per_token, train_s_per_token) = train_times(&stage, opts)?;
    Ok(PhaseTimes {
        decode_s,
        prefill_s_per_token,
        train_forward_s_per_token,
        train_s_per_token,
    })
}

/// Measures `weights` on `opts.compute`. `progress` is told each step.
pub fn measure(
    weights: &WeightFile,
    opts: &MeasureOptions,
    progress: &mut dyn FnMut(&str),
) -> Result<ModelTimes, ProfileError> {
    let start = Instant::now();
    // Other programs' load over the whole measurement.
    let mut load = super::offer::LoadSampler::default();
    let (one_layer, embed_only, head_only) = parts(weights);

    // Decode reads as many distinct weight bytes per step as the model
    // holds, as serving does.
    let (layer_copies, head_copies) = copies_of(weights);
    let layer = measure_part(
        weights,
        one_layer,
        layer_copies,
        "decoder layer",
        opts,
        progress,
    )?;

    progress("embedding");
    let (decode, prefill) = inference_part(weights, embed_only, 1, opts)?;
    // The frozen embedding is a lookup with no backward work.
    let embed = PhaseTimes {
        decode_s: decode,
        prefill_s_per_token: prefill,
        train_forward_s_per_token: prefill,
        train_s_per_token: prefill,
    };

    let head = measure_part(weights, head_only, head_copies, "LM head", opts, progress)?;

    let model = model_name(weights);
    Ok(ModelTimes {
        model,
        fingerprint: super::model_fingerprint(weights),
        backend: opts.compute.name(),
        threads: candle_core::utils::get_num_threads(),
        layer,
        embed,
        head,
        measured_at: unix_now(),
        took_s: start.elapsed().as_secs_f64(),
        content: None,
        offer: Some(load.offer()),
    })
}

/// The parts measured: one decoder layer, the embedding, the head.
fn parts(weights: &WeightFile) -> (StageSpec, StageSpec, StageSpec) {
    let layers = weights.config().num_hidden_layers;
    let spec = |start: usize, end: usize, embed: bool, head: bool| StageSpec {
        start,
        end,
        embed,
        head,
    };
    (
        spec(0, 1.min(layers), false, false),
        spec(0, 0, true, false),
        spec(layers, layers, false, true),
    )
}

/// Copies to rotate decode over for the layer and the head of `weights`
/// (see [`copies`]).
fn copies_of(weights: &WeightFile) -> (usize, usize) {
    let cost = super::model_cost::model_cost(weights);
    let model_bytes: u64 =
        cost.layers.iter().map(|l| l.param_bytes).sum::<u64>() + cost.head.param_bytes;
    let layer_bytes = cost.layers.first().map_or(0, |l| l.param_bytes);
    (
        copies(layer_bytes, model_bytes),
        copies(cost.head.param_bytes, model_bytes),
    )
}

/// Measures the inference figures of `weights` again under what the
/// machine offers now, keeping the rest of `old` (the same model measured
/// under another offer). Training figures follow the offer linearly: they
/// are compute-bound, and timing them again would take far longer.
///
/// Used when a device is offered more CPU than when it was measured: decode
/// under a small quota runs in short bursts that each go faster than
/// sustained work does, so scaling a throttled measurement up to a larger
/// offer overstates the device (by about 25% from 0.25 to 1 core on the
/// machines here).
pub fn remeasure_inference(
    weights: &WeightFile,
    old: &ModelTimes,
    opts: &MeasureOptions,
) -> Result<ModelTimes, ProfileError> {
    let start = Instant::now();
    let mut load = super::offer::LoadSampler::default();
    let (one_layer, embed_only, head_only) = parts(weights);
    let (layer_copies, head_copies) = copies_of(weights);
    let layer = inference_part(weights, one_layer, layer_copies, opts)?;
    let embed = inference_part(weights, embed_only, 1, opts)?;
    let head = inference_part(weights, head_only, head_copies, opts)?;
    let offer = load.offer();
    // Training time ∝ 1 / cores offered.
    let train = match old.offer {
        Some(then) => then.available() / offer.available(),
        None => 1.0,
    };
    let train = if train.is_finite() && train > 0.0 {
        train
    } else {
        1.0
    };
    let with = |old: PhaseTimes, (decode_s, prefill_s_per_token): (f64, f64)| PhaseTimes {
        decode_s,
        prefill_s_per_token,
        train_forward_s_per_token: old.train_forward_s_per_token * train,
        train_s_per_token: old.train_s_per_token * train,
    };
    let mut embed = with(old.embed, embed);
    // The frozen embedding's training work is its lookup.
    embed.train_forward_s_per_token = embed.prefill_s_per_token;
    embed.train_s_per_token = embed.prefill_s_per_token;
    Ok(ModelTimes {
        layer: with(old.layer, layer),
        embed,
        head: with(old.head, head),
        measured_at: unix_now(),
        took_s: start.elapsed().as_secs_f64(),
        offer: Some(offer),
        ..old.clone()
    })
}

/// The name a model is served under: its one id
/// ([`hearth_models::store::model_id`]).
pub(crate) fn model_name(weights: &WeightFile) -> String {
    hearth_models::store::model_id(weights.path())
}
