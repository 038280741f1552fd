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
//! `cargo run --release -p hearth-bench --bin train`
#![allow(clippy::print_stdout)] // A command-line program: printing to stdout is its job.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;
use hearth_bench::{Row, cpu_name, median, print, write_results};
use hearth_runtime::pipeline::PlacementPolicy;
use hearth_runtime::train::{JobSpec, JobState};
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
    /// Where the tables go.
    #[arg(long, default_value = "bench/results")]
    out: PathBuf,
}

struct Figures {
    step_s: f64,
    tok_s: f64,
    bubble: f64,
}

async fn run(p: usize, args: &Args, dir: &std::path::Path) -> Result<Figures> {
    let model = real_model().context("the real model is missing (hearth models pull)")?;
    let info = model_info(&model, dir)?;
    let nodes = pipeline_cluster(p, p, &info, PlacementPolicy::Even).await?;
    let m = 4 * p;
    // Words of about one token each, so examples fill `len` tokens.
    let data: String = (0..m)
        .map(|i| {
            let words: Vec<String> = (0..args.len)
                .map(|k| format!("w{}", (i * 7 + k) % 97))
                .collect();
            serde_json::json!({"text": words.join(" ")}).to_string() + "\n"
        })
        .collect();
    let path = dir.join(format!("data-{p}.jsonl"));
    std::fs::write(&path, data)?;
    let spec: JobSpec = serde_json::from_value(serde_json::json!({
        "model": info.times.model,
        "data": path,
        "output_dir": dir.join(format!("out-{p}")),
        "steps": args.steps,
        "batch_size": m,
        "micro_batches": m,
        "seq_len": args.len,
        "checkpoint_every": 0,
        "merge": false,
    }))?;
    let node = &nodes[0].node;
    let id = format!("ftjob-bench{p}");
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
    let metrics: Vec<serde_json::Value> = job
        .events()
        .0
        .into_iter()
        .filter_map(|e| e.data)
        .skip(1)
        .collect();
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
    })
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let args = Args::parse();
    let dir = tempfile::tempdir()?;
    let mut figs = Vec::new();
    for p in 1..=3 {
        let f = run(p, &args, dir.path()).await?;
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
    let md = write_results(
        &args.out,
        "train",
        "Pipeline-parallel LoRA training, SmolLM2-135M, loopback",
        "measured",
        "reference",
        &rows,
        serde_json::json!({
            "cpu": cpu_name(),
            "cores": std::thread::available_parallelism().map_or(1, |n| n.get()),
            "tokens_per_micro_batch": args.len,
            "steps_counted": args.steps.saturating_sub(1),
            "method": "LoRA r=8 on q,k,v,o,gate,up,down; f32; 1F1B; recompute",
            "note": "all nodes share this machine's cores",
        }),
    )?;
    print(&md)?;
    Ok(())
}
