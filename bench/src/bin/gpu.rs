//! Decode and prefill speed of a wgpu stage against the CPU stage on the
//! real model (SmolLM2-135M Q4_1, the whole model as one stage), in one
//! process with interleaved rounds (cpu, wgpu, cpu, ...; medians):
//!
//! - decode tok/s of one sequence, and of `--batch` sequences stepped
//!   together (the batched decode the pipeline's workers do);
//! - prefill tok/s of the chat prompt.
//!
//! The adapter is the best wgpu finds (software ones included), or the
//! first whose name contains `--adapter`. Figures on a software adapter
//! (llvmpipe) show the path works, not what a GPU does.
//!
//! `cargo run --release -p hearth-bench --bin gpu [-- --adapter NAME]`
#![allow(clippy::print_stdout)] // A command-line program: printing to stdout is its job.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::Parser;
use hearth_bench::{Row, cpu_name, median, print, write_results};
use hearth_models::gpu::Gpu;
use hearth_models::{
    Logits, Message, ModelText, Precision, Stage, StageInput, StageSpec, WeightFile,
};
use hearth_test_utils::real_model;

#[derive(Debug, Parser)]
struct Args {
    /// Use the first adapter whose name contains this.
    #[arg(long)]
    adapter: Option<String>,
    /// Decode steps timed per round.
    #[arg(long, default_value_t = 32)]
    decode: usize,
    /// Sequences in the batched decode.
    #[arg(long, default_value_t = 8)]
    batch: usize,
    /// Rounds (each runs both backends).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Where the tables go.
    #[arg(long, default_value = "bench/results")]
    out: PathBuf,
}

struct Round {
    prefill_tok_s: f64,
    decode_tok_s: f64,
    batch_tok_s: f64,
}

/// Prefill of `prompt`, `decode` greedy steps of one sequence, then
/// `decode` steps of `batch` sequences together.
fn round(stage: &Stage, prompt: &[u32], decode: usize, batch: usize) -> Result<Round> {
    let mut cache = stage.new_cache();
    let n = prompt.len();
    let t = Instant::now();
    let logits = stage.forward(
        StageInput::Tokens(prompt.to_vec()),
        &[n],
        &mut [&mut cache],
        Logits::Last,
    )?;
    let prefill_s = t.elapsed().as_secs_f64();
    let mut next = logits.argmax(1)?.to_vec1::<u32>()?[0];
    let t = Instant::now();
    for _ in 0..decode {
        let l = stage.forward(
            StageInput::Tokens(vec![next]),
            &[1],
            &mut [&mut cache],
            Logits::Last,
        )?;
        next = l.argmax(1)?.to_vec1::<u32>()?[0];
    }
    let decode_s = t.elapsed().as_secs_f64();
    // `batch` sequences, each after its own copy of the prompt.
    let mut caches: Vec<_> = (0..batch).map(|_| stage.new_cache()).collect();
    let ids: Vec<u32> = (0..batch).flat_map(|_| prompt.iter().copied()).collect();
    let lens = vec![n; batch];
    let mut refs: Vec<_> = caches.iter_mut().collect();
    let l = stage.forward(StageInput::Tokens(ids), &lens, &mut refs, Logits::Last)?;
    let mut nexts = l.argmax(1)?.to_vec1::<u32>()?;
    let ones = vec![1; batch];
    let t = Instant::now();
    for _ in 0..decode {
        let l = stage.forward(StageInput::Tokens(nexts), &ones, &mut refs, Logits::Last)?;
        nexts = l.argmax(1)?.to_vec1::<u32>()?;
    }
    let batch_s = t.elapsed().as_secs_f64();
    Ok(Round {
        prefill_tok_s: n as f64 / prefill_s,
        decode_tok_s: decode as f64 / decode_s,
        batch_tok_s: (decode * batch) as f64 / batch_s,
    })
}

fn main() -> Result<()> {
    let args = Args::parse();
    let path = real_model().context("the real model is missing (hearth models pull)")?;
    let weights = WeightFile::open(&path)?;
    let text = ModelText::load(&weights)?;
    let prompt = text.encode_prompt(&text.render_chat(&[Message::new(
        "user",
        "Explain in a few sentences why the sky is blue, and why sunsets are red.",
    )])?)?;
    let gpu = Gpu::open(args.adapter.as_deref(), true)?;
    let adapter = gpu.adapter();
    print(&format!(
        "adapter: {} ({}, {})",
        adapter.name, adapter.backend, adapter.device_type
    ))?;
    let full = StageSpec::full(weights.config().num_hidden_layers);
    let cpu = Stage::load(&weights, full, Precision::Quantized)?;
    let on_gpu = Stage::load_gpu(gpu.clone(), &weights, full, Precision::Quantized)?;
    // Warm-up (pipelines, caches, buffers).
    round(&cpu, &prompt, 2, 2)?;
    round(&on_gpu, &prompt, 2, 2)?;
    let (mut c, mut g) = (Vec::new(), Vec::new());
    for r in 0..args.rounds {
        c.push(round(&cpu, &prompt, args.decode, args.batch)?);
        g.push(round(&on_gpu, &prompt, args.decode, args.batch)?);
        print(&format!(
            "round {r}: decode cpu {:.1} / wgpu {:.1} tok/s; batch {} cpu {:.1} / wgpu {:.1} tok/s; prefill cpu {:.0} / wgpu {:.0} tok/s",
            c[r].decode_tok_s,
            g[r].decode_tok_s,
            args.batch,
            c[r].batch_tok_s,
            g[r].batch_tok_s,
            c[r].prefill_tok_s,
            g[r].prefill_tok_s
        ))?;
    }
    let m = |v: &[Round], f: fn(&Round) -> f64| median(&v.iter().map(f).collect::<Vec<_>>());
    let rows = vec![
        Row::new(
            "decode tok/s, 1 sequence",
            m(&g, |r| r.decode_tok_s),
            m(&c, |r| r.decode_tok_s),
        ),
        Row::new(
            &format!("decode tok/s, {} sequences", args.batch),
            m(&g, |r| r.batch_tok_s),
            m(&c, |r| r.batch_tok_s),
        ),
        Row::new(
            &format!("prefill tok/s ({}-token prompt)", prompt.len()),
            m(&g, |r| r.prefill_tok_s),
            m(&c, |r| r.prefill_tok_s),
        ),
    ];
    let md = write_results(
        &args.out,
        "gpu",
        &format!(
            "wgpu stage on {} vs the CPU stage, SmolLM2-135M Q4_1",
            adapter.name
        ),
        "wgpu",
        "cpu",
        &rows,
        serde_json::json!({
            "adapter": adapter.name,
            "backend": adapter.backend,
            "device_type": adapter.device_type,
            "software_adapter": adapter.software,
            "cpu": cpu_name(),
            "cpu_threads": candle_core::utils::get_num_threads(),
            "decode_steps": args.decode,
            "rounds": args.rounds,
        }),
    )?;
    print(&md)?;
    Ok(())
}
