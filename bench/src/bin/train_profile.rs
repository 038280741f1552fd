//! One training stage of the real model (SmolLM2-135M, the whole model,
//! LoRA rank 8 on every projection, f32) run directly, without a cluster:
//! micro-batches of `--len` tokens through `TrainStage::backward` (one
//! forward building the graph, then candle's backward), timed one by one.
//! What a single-node fine-tuning step spends its time on, without the
//! node around it; `bench/profile_train.sh` runs it under `perf` and sorts
//! the samples into matrix products, element-wise work, allocation and
//! threads.
//!
//! `cargo run --release -p hearth-bench --bin train-profile -- --micro 12`
#![allow(clippy::print_stdout)] // A command-line program: printing to stdout is its job.

use std::time::Instant;

use anyhow::{Context, Result};
use candle_core::DType;
use clap::Parser;
use hearth_bench::median;
use hearth_models::train::optim::{clip_factor, sq_norm};
use hearth_models::train::{
    AdamW, AdamWConfig, BatchLayout, DropCtx, IGNORE, LoraConfig, Method, Target, TrainInput,
    TrainOptions, TrainStage, Upstream, accumulate,
};
use hearth_models::{StageSpec, WeightFile};

#[derive(Debug, Parser)]
struct Args {
    /// Tokens per micro-batch (one sequence).
    #[arg(long, default_value_t = 64)]
    len: usize,
    /// Micro-batches timed (after one warm-up).
    #[arg(long, default_value_t = 12)]
    micro: usize,
    /// Full fine-tuning (every weight) instead of LoRA; the gradients are
    /// also summed over micro-batches and each step of `--step` of them
    /// ends with the norm and an AdamW update, timed apart.
    #[arg(long)]
    full: bool,
    /// Micro-batches per optimizer step (with `--full`).
    #[arg(long, default_value_t = 4)]
    step: usize,
}

fn main() -> Result<()> {
    // SAFETY: first thing in main, before any other thread exists (the
    // process is set up as `hearth` sets up its own).
    unsafe { hearth_models::threads::configure_process() };
    let args = Args::parse();
    let path = hearth_test_utils::real_model().context("the real model is missing")?;
    let w = WeightFile::open(&path)?;
    let cfg = w.config().clone();
    let stage = TrainStage::load(
        &w,
        StageSpec::full(cfg.num_hidden_layers),
        &TrainOptions {
            method: if args.full {
                Method::Full
            } else {
                Method::Lora(LoraConfig {
                    rank: 8,
                    alpha: 16.0,
                    dropout: 0.0,
                    targets: Target::ALL.to_vec(),
                    init_b_std: 0.0,
                })
            },
            dtype: DType::F32,
            seed: 1,
        },
    )?;
    let n = args.len;
    let layout = BatchLayout::new(1, n, vec![1; n])?;
    let vocab = cfg.vocab_size as u32;
    let mut times = Vec::new();
    let params = stage.trainables().to_vec();
    let mut acc: Vec<Option<candle_core::Tensor>> = vec![None; params.len()];
    let mut optim = AdamW::new(AdamWConfig::default());
    let (mut acc_s, mut optim_s) = (Vec::new(), Vec::new());
    for m in 0..=args.micro {
        let ids: Vec<u32> = (0..n as u32)
            .map(|i| (i * 7919 + m as u32 * 104_729 + 17) % vocab)
            .collect();
        let labels: Vec<u32> = (0..n)
            .map(|i| ids.get(i + 1).copied().unwrap_or(IGNORE))
            .collect();
        let t = Instant::now();
        let back = stage.backward(
            &TrainInput::Tokens(ids),
            &layout,
            &DropCtx::eval(),
            Upstream::Loss {
                labels: &labels,
                scale: 1.0 / (n - 1) as f64,
            },
        )?;
        let s = t.elapsed().as_secs_f64();
        if m > 0 {
            times.push(s);
        }
        let loss_sum = back.loss_sum;
        if args.full {
            let t = Instant::now();
            accumulate(&mut acc, back.grads)?;
            acc_s.push(t.elapsed().as_secs_f64());
            if (m + 1) % args.step.max(1) == 0 {
                let t = Instant::now();
                let norm = sq_norm(&acc)?.sqrt();
                optim.step(&params, &acc, 1e-5, clip_factor(norm, 1.0))?;
                acc = vec![None; params.len()];
                optim_s.push(t.elapsed().as_secs_f64());
            }
        }
        println!(
            "micro-batch {m}: {:.3} s, loss {:.4}",
            s,
            loss_sum.unwrap_or(f64::NAN) / (n - 1) as f64
        );
    }
    let med = median(&times);
    println!(
        "median {:.3} s per {n}-token micro-batch ({:.1} tokens/s) over {}",
        med,
        n as f64 / med,
        times.len()
    );
    if args.full {
        println!(
            "summing one micro-batch's gradients: median {:.3} s; norm + AdamW per step: median {:.3} s over {}",
            median(&acc_s),
            median(&optim_s),
            optim_s.len()
        );
    }
    Ok(())
}
