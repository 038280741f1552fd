//! Pipeline-parallel training benchmark on the real model (SmolLM2-135M,
//! LoRA rank 8 on every projection, f32): fine-tuning jobs over p = 1, 2, 3
//! in-process nodes (real QUIC on loopback, equal layer ranges) with
//! m = 4p micro-batches of one `--len`-token example each. Printed beside
//! their references from the same run:
//!
//! - step time and tokens/s of p stages next to p = 1;
//! - the measured bubble (1 − a stage's compute time / the step's wall
//!   time, averaged over stages) next to the textbook (p−1)/(m+p−1).
//!
//! The nodes share this machine's cores, so on a small machine stages
//! compete for compute and the step time does not fall with p; the bubble
//! and the per-stage compute are what the schedule controls.
//!
//! With `--torch PYTHON` (a Python with torch and safetensors) the same
//! single-node step also runs in PyTorch on the CPU: the GGUF's tensors
//! dequantized to f32 under their HF names, the job's own micro-batches
//! (ids, labels, segments, positions), the same LoRA and optimizer. The
//! first step's loss of both (LoRA's B starts at zero, so it is the base
//! model's loss) shows they ran the same model on the same tokens.
//!
//! Then (unless `--no-full`) one node runs full fine-tuning (every weight,
//! the tied embedding and the norms trained), and PyTorch the same. A
//! step's time is the whole step on both sides: forward, backward,
//! clipping and the AdamW update. The single-node runs of both methods
//! alternate with PyTorch's over `--rounds` rounds (medians), since this
//! kind of machine's speed drifts by tens of percent within minutes.
//!
//! `bench/run_train.sh` (installs torch into `.venv-torch`), or
//! `cargo run --release -p hearth-bench --bin train [-- --torch PYTHON]`
#![allow(clippy::print_stdout)] // A command-line program: printing to stdout is its job.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use candle_core::Device;
use clap::Parser;
use hearth_bench::{Row, cpu_name, median, print, write_results};
use hearth_models::train::export::{safetensors_bytes, write_atomic};
use hearth_models::train::{IGNORE, load_jsonl};
use hearth_models::weights::TensorId;
use hearth_models::{ModelText, WeightFile};
use hearth_runtime::pipeline::PlacementPolicy;
use hearth_runtime::train::{JobSpec, JobState, MethodSpec};
use hearth_test_utils::cluster::{model_info, pipeline_cluster};
use hearth_test_utils::real_model;

#[derive(Debug, Parser)]
struct Args {
    /// Tokens per example (one example per micro-batch).
    #[arg(long, default_value_t = 64)]
    len: usize,
    /// Steps per configuration (the first is a warm-up and not counted).
    #[arg(long, default_value_t = 3)]
    steps: u64,
    /// A Python with torch and safetensors: also time the p = 1 step in PyTorch.
    #[arg(long)]
    torch: Option<PathBuf>,
    /// Where the tables go.
    #[arg(long, default_value = "bench/results")]
    out: PathBuf,
    /// The most pipeline stages measured (1 to 3).
    #[arg(long, default_value_t = 3)]
    max_stages: usize,
    /// Skip the single-node full fine-tuning step (every weight trained).
    #[arg(long)]
    no_full: bool,
    /// Interleaved rounds of the single-node comparison with PyTorch.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
}

/// Jobs specified so far (each gets its own output folder).
static RUNS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

struct Figures {
    step_s: f64,
    tok_s: f64,
    bubble: f64,
    /// The first step's training loss.
    first_loss: f64,
}

/// What the PyTorch run measured.
struct TorchFigures {
    version: String,
    threads: u64,
    step_s: f64,
    tok_s: f64,
    first_loss: f64,
}

/// The job of `p` stages (m = 4p micro-batches of one example each),
/// LoRA or, with `full`, every weight. The data holds one step's examples
/// per step, so the whole run is one epoch: a job keeps a checkpoint at
/// each epoch's end (for full fine-tuning every weight written to disk),
/// which a run of one-step epochs would do between every two timed steps,
/// and PyTorch's loop does not.
fn job_spec(p: usize, args: &Args, model: &str, dir: &Path, full: bool) -> Result<JobSpec> {
    let m = 4 * p;
    let examples = m * args.steps.max(1) as usize;
    // Words of about one token each, so examples fill `len` tokens.
    let data: String = (0..examples)
        .map(|i| {
            let words: Vec<String> = (0..args.len)
                .map(|k| format!("w{}", (i * 7 + k) % 97))
                .collect();
            serde_json::json!({"text": words.join(" ")}).to_string() + "\n"
        })
        .collect();
    let path = dir.join(format!("data-{p}.jsonl"));
    std::fs::write(&path, data)?;
    let method = if full {
        serde_json::json!({"type": "full"})
    } else {
        serde_json::to_value(MethodSpec::default())?
    };
    Ok(serde_json::from_value(serde_json::json!({
        "model": model,
        "data": path,
        "method": method,
        // A fresh folder per job: a finished job's checkpoint would be resumed.
        "output_dir": dir.join(format!(
            "out-{p}{}-{}",
            if full { "-full" } else { "" },
            RUNS.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        )),
        "steps": args.steps,
        "batch_size": m,
        "micro_batches": m,
        "seq_len": args.len,
        "checkpoint_every": 0,
        "merge": false,
    }))?)
}

async fn run(p: usize, args: &Args, dir: &Path, full: bool) -> Result<Figures> {
    let model = real_model().context("the real model is missing (hearth models pull)")?;
    let info = model_info(&model, dir)?;
    let nodes = pipeline_cluster(p, p, &info, PlacementPolicy::Even).await?;
    let spec = job_spec(p, args, &info.times.model, dir, full)?;
    let node = &nodes[0].node;
    let id = format!("ftjob-bench{p}{}", if full { "-full" } else { "" });
    node.start_job(id.clone(), spec)?;
    let start = Instant::now();
    let job = node.job(&id).context("no job")?;
    loop {
        let i = job.info().context("no job")?;
        if i.state.done() {
            if i.state != JobState::Succeeded {
                bail!("p={p}: {:?}", i.error);
            }
            break;
        }
        if start.elapsed() > Duration::from_secs(3600) {
            bail!("p={p}: not done in an hour");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let all: Vec<serde_json::Value> = job.events().0.into_iter().filter_map(|e| e.data).collect();
    let first_loss = all
        .iter()
        .find(|d| d["step"] == 1)
        .and_then(|d| d["train_loss"].as_f64())
        .context("no first step")?;
    let metrics: Vec<serde_json::Value> = all.into_iter().skip(1).collect();
    let get = |k: &str| -> Vec<f64> { metrics.iter().filter_map(|d| d[k].as_f64()).collect() };
    let bubble: Vec<f64> = metrics
        .iter()
        .filter_map(|d| {
            let u: Vec<f64> = d["utilization"]
                .as_array()?
                .iter()
                .filter_map(serde_json::Value::as_f64)
                .collect();
            Some(1.0 - u.iter().sum::<f64>() / u.len().max(1) as f64)
        })
        .collect();
    Ok(Figures {
        step_s: median(&get("step_s")),
        tok_s: median(&get("tokens_per_s")),
        bubble: median(&bubble),
        first_loss,
    })
}

/// Runs the p = 1 step in PyTorch (`bench/torch_train_step.py`) on what
/// the Hearth job trained on.
fn torch_step(python: &Path, args: &Args, dir: &Path, full: bool) -> Result<TorchFigures> {
    let model = real_model().context("the real model is missing (hearth models pull)")?;
    let spec = job_spec(1, args, "base", dir, full)?;
    let out = dir.join(if full { "torch-full" } else { "torch" });
    std::fs::create_dir_all(&out)?;
    let weights = WeightFile::open(&model)?;
    let cfg = weights.config().clone();
    // Written once; later rounds reuse it.
    if !out.join("model.safetensors").exists() {
        let tensors = TensorId::all(&cfg)
            .filter(|&id| weights.contains(id))
            .map(|id| Ok((id.hf_name(), weights.load_f32(id, &Device::Cpu)?)))
            .collect::<Result<Vec<_>>>()?;
        write_atomic(
            &out.join("model.safetensors"),
            &safetensors_bytes(&tensors, None)?,
        )?;
    }
    std::fs::write(out.join("config.json"), serde_json::to_vec(&cfg)?)?;
    // The micro-batches exactly as the job cuts its first step.
    let text = ModelText::load(&weights)?;
    let raw = std::fs::read_to_string(&spec.data)?;
    let examples = load_jsonl(&text, &raw, spec.seq_len.min(text.context_length()))?;
    let batching = spec.batching();
    let idx = batching.step_examples(examples.len(), 1, 0);
    let batches: Vec<serde_json::Value> = batching
        .micro_batches(&examples, &idx)?
        .iter()
        .map(|b| {
            let labels: Vec<i64> = b
                .labels
                .iter()
                .map(|&l| if l == IGNORE { -100 } else { i64::from(l) })
                .collect();
            serde_json::json!({
                "rows": b.layout.rows, "len": b.layout.len, "tokens": b.tokens,
                "labels": labels, "segments": b.layout.segments,
                "positions": b.layout.positions(),
            })
        })
        .collect();
    std::fs::write(out.join("batch.json"), serde_json::to_vec(&batches)?)?;
    let optimizer = serde_json::json!({
        "learning_rate": spec.learning_rate, "weight_decay": spec.weight_decay,
        "max_grad_norm": spec.max_grad_norm,
    });
    let method = match &spec.method {
        MethodSpec::Lora {
            rank,
            alpha,
            targets,
            ..
        } => {
            let targets: Vec<&str> = targets.iter().map(|t| t.peft_name()).collect();
            serde_json::json!({"method": "lora", "rank": rank, "alpha": alpha, "targets": targets})
        }
        MethodSpec::Full => serde_json::json!({"method": "full"}),
    };
    let mut train = method;
    if let (Some(t), Some(o)) = (train.as_object_mut(), optimizer.as_object()) {
        t.extend(o.clone());
    }
    std::fs::write(out.join("train.json"), serde_json::to_vec(&train)?)?;
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let script = hearth_test_utils::workspace_root().join("bench/torch_train_step.py");
    let run = Command::new(python)
        .arg(&script)
        .arg(&out)
        .arg(args.steps.max(2).to_string())
        .arg(threads.to_string())
        .output()
        .with_context(|| {
            format!(
                "starting {} (bench/run_train.sh sets it up)",
                python.display()
            )
        })?;
    if !run.status.success() {
        bail!(
            "PyTorch run failed: {}",
            String::from_utf8_lossy(&run.stderr)
        );
    }
    let v: serde_json::Value = serde_json::from_slice(&run.stdout)?;
    let nums = |k: &str| -> Vec<f64> {
        v[k].as_array()
            .map(|a| a.iter().filter_map(serde_json::Value::as_f64).collect())
            .unwrap_or_default()
    };
    // The first step warms up, as on Hearth's side.
    let step_s = median(nums("step_s").get(1..).unwrap_or_default());
    let tokens = v["tokens"].as_f64().context("no token count")?;
    Ok(TorchFigures {
        version: v["torch"].as_str().unwrap_or("?").to_string(),
        threads: v["threads"].as_u64().unwrap_or(0),
        step_s,
        tok_s: tokens / step_s,
        first_loss: *nums("loss").first().context("no loss")?,
    })
}

fn main() -> Result<()> {
    // SAFETY: first thing in main, before any other thread exists (the
    // process is set up as `hearth` sets up its own).
    unsafe { hearth_models::threads::configure_process() };
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?
        .block_on(bench())
}

/// One side of the single-node comparison over interleaved rounds.
#[derive(Default)]
struct Rounds {
    step_s: Vec<f64>,
    tok_s: Vec<f64>,
    first_loss: Option<f64>,
}

impl Rounds {
    fn push(&mut self, step_s: f64, tok_s: f64, first_loss: f64) {
        self.step_s.push(step_s);
        self.tok_s.push(tok_s);
        self.first_loss.get_or_insert(first_loss);
    }
}

async fn bench() -> Result<()> {
    let args = Args::parse();
    let dir = tempfile::tempdir()?;
    let mut figs = Vec::new();
    for p in 1..=args.max_stages.clamp(1, 3) {
        let f = run(p, &args, dir.path(), false).await?;
        print(&format!(
            "p={p} m={}: step {:.2} s, {:.1} tok/s, bubble {:.3} (textbook {:.3})",
            4 * p,
            f.step_s,
            f.tok_s,
            f.bubble,
            (p as f64 - 1.0) / (5.0 * p as f64 - 1.0)
        ))?;
        figs.push(f);
    }
    // The single node against PyTorch, LoRA then full fine-tuning, in
    // interleaved rounds (Hearth, PyTorch, Hearth, PyTorch, ...) so that
    // both see the same machine as its speed drifts; medians.
    let methods: &[bool] = if args.no_full {
        &[false]
    } else {
        &[false, true]
    };
    let mut hearth: [Rounds; 2] = Default::default();
    let mut torch: [Rounds; 2] = Default::default();
    let mut torch_version = None;
    for round in 0..args.rounds.max(1) {
        for &full in methods {
            let name = if full { "full" } else { "LoRA" };
            let f = run(1, &args, dir.path(), full).await?;
            print(&format!(
                "round {round}, {name}, p=1 m=4: step {:.2} s, {:.1} tok/s",
                f.step_s, f.tok_s
            ))?;
            hearth[usize::from(full)].push(f.step_s, f.tok_s, f.first_loss);
            if let Some(python) = &args.torch {
                let t = torch_step(python, &args, dir.path(), full)?;
                print(&format!(
                    "round {round}, PyTorch {} ({} threads), {name}: step {:.2} s, {:.1} tok/s, first loss {:.5} (Hearth {:.5})",
                    t.version, t.threads, t.step_s, t.tok_s, t.first_loss, f.first_loss
                ))?;
                torch[usize::from(full)].push(t.step_s, t.tok_s, t.first_loss);
                torch_version = Some((t.version, t.threads));
            }
        }
    }
    let mut rows = Vec::new();
    for (i, f) in figs.iter().enumerate() {
        let p = i + 1;
        rows.push(Row::new(
            &format!("p={p} m={} step time (s) vs p=1", 4 * p),
            f.step_s,
            figs[0].step_s,
        ));
        rows.push(Row::new(
            &format!("p={p} m={} tokens/s vs p=1", 4 * p),
            f.tok_s,
            figs[0].tok_s,
        ));
        rows.push(Row::new(
            &format!("p={p} m={} bubble ×1000 vs (p−1)/(m+p−1) ×1000", 4 * p),
            f.bubble * 1000.0,
            (p as f64 - 1.0) / (5.0 * p as f64 - 1.0) * 1000.0,
        ));
    }
    for &full in methods {
        let (h, t) = (&hearth[usize::from(full)], &torch[usize::from(full)]);
        let name = if full { "full fine-tuning" } else { "LoRA" };
        if t.step_s.is_empty() {
            if full {
                rows.push(Row::new(
                    "full fine-tuning p=1 m=4 step time (s) vs LoRA p=1",
                    median(&h.step_s),
                    median(&hearth[0].step_s),
                ));
            }
            continue;
        }
        rows.push(Row::new(
            &format!(
                "{name} p=1 m=4 step time (s) vs PyTorch CPU, median of {}",
                h.step_s.len()
            ),
            median(&h.step_s),
            median(&t.step_s),
        ));
        rows.push(Row::new(
            &format!("{name} p=1 m=4 tokens/s vs PyTorch CPU"),
            median(&h.tok_s),
            median(&t.tok_s),
        ));
        rows.push(Row::new(
            &format!("{name} first-step loss ×1000 vs PyTorch (same weights and tokens)"),
            h.first_loss.unwrap_or(f64::NAN) * 1000.0,
            t.first_loss.unwrap_or(f64::NAN) * 1000.0,
        ));
    }
    let all = |r: &[Rounds; 2]| -> serde_json::Value {
        serde_json::json!({"lora_step_s": r[0].step_s, "full_step_s": r[1].step_s})
    };
    let md = write_results(
        &args.out,
        "train",
        "Pipeline-parallel LoRA training and single-node full fine-tuning, SmolLM2-135M, loopback",
        "measured",
        "reference",
        &rows,
        serde_json::json!({
            "cpu": cpu_name(),
            "cores": std::thread::available_parallelism().map_or(1, |n| n.get()),
            "tokens_per_micro_batch": args.len,
            "steps_counted": args.steps.saturating_sub(1),
            "method": "LoRA r=8 on q,k,v,o,gate,up,down (and full fine-tuning: every weight, the tied embedding and the norms); f32; 1F1B; recompute",
            "step": "the whole step: forward, backward, clipping and the AdamW update, on both sides",
            "note": "all nodes share this machine's cores",
            "rounds": {"hearth": all(&hearth), "pytorch": all(&torch)},
            "pytorch": torch_version.as_ref().map(|(version, threads)| serde_json::json!({
                "version": version,
                "threads": threads,
                "style": "eager modules, autograd, no activation checkpointing, SDPA; same micro-batches, method and AdamW",
            })),
        }),
    )?;
    print(&md)?;
    Ok(())
}
