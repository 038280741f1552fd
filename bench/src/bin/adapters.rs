//! Many adapters, one base: aggregate decode throughput of one batch of
//! sequences when they use 1, 2 or 4 different LoRA adapters, against the
//! same batch on the base model alone, measured in the same run on the
//! real model (SmolLM2-135M, Q4_1):
//!
//! - as one CPU stage (the whole model), batches driven directly;
//! - through a two-stage pipeline of two in-process nodes (real QUIC on
//!   loopback), requests as the API makes them: the adapters are
//!   registered on one node as a fine-tuning job registers them, the other
//!   receives them when the first request names them, and each stage holds
//!   its layers' slice (reported beside the base file's size).
//!
//! Each adapter is rank 8 on all seven projections of every layer (what a
//! Hearth LoRA job trains by default), random, read from PEFT files as a
//! job writes them. Sequences are assigned to adapters round-robin, so an
//! adapter's rows are scattered through the batch (the unfavourable case
//! for segmented LoRA: gathered rows). Rounds interleave the cases; the
//! figures are medians.
//!
//! `cargo run --release -p hearth-bench --bin adapters`
#![allow(clippy::print_stdout)] // A command-line program: printing to stdout is its job.
#![recursion_limit = "256"]

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};
use candle_core::DType;
use clap::Parser;
use hearth_bench::{Row, cpu_name, median, print, write_results};
use hearth_models::adapter::StageAdapter;
use hearth_models::{KvCache, Logits, Precision, Stage, StageInput, StageSpec, WeightFile};
use hearth_test_utils::real_model;
use serde_json::json;

#[derive(Debug, Parser)]
struct Args {
    /// Sequences in the batch.
    #[arg(long, default_value_t = 8)]
    batch: usize,
    /// Prompt tokens per sequence (prefilled before timing).
    #[arg(long, default_value_t = 32)]
    prompt: usize,
    /// Decode steps timed per round.
    #[arg(long, default_value_t = 24)]
    steps: usize,
    /// Interleaved rounds.
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// LoRA rank.
    #[arg(long, default_value_t = 8)]
    rank: usize,
    /// Tokens each request generates in the pipeline runs.
    #[arg(long, default_value_t = 32)]
    pipeline_tokens: usize,
    #[arg(long, default_value = "bench/results")]
    out: PathBuf,
}

/// Decode tokens per second of the batch, each sequence with `which[i]`'s
/// adapter, after prefilling the prompts.
fn run(
    stage: &Stage,
    adapters: &[StageAdapter],
    which: &[Option<usize>],
    prompt: usize,
    steps: usize,
    vocab: u32,
) -> Result<f64> {
    let b = which.len();
    let mut caches: Vec<KvCache> = (0..b).map(|_| stage.new_cache()).collect();
    let ads: Vec<Option<&StageAdapter>> = which.iter().map(|w| w.map(|i| &adapters[i])).collect();
    let ids: Vec<u32> = (0..b * prompt)
        .map(|i| (i as u32 * 97 + 11) % vocab)
        .collect();
    let mut cs: Vec<&mut KvCache> = caches.iter_mut().collect();
    let logits = stage.forward_adapted(
        StageInput::Tokens(ids),
        &vec![prompt; b],
        &mut cs,
        Logits::Last,
        &ads,
    )?;
    let mut next: Vec<u32> = logits.argmax(1)?.to_vec1()?;
    let start = Instant::now();
    for _ in 0..steps {
        let mut cs: Vec<&mut KvCache> = caches.iter_mut().collect();
        let logits = stage.forward_adapted(
            StageInput::Tokens(next.clone()),
            &vec![1; b],
            &mut cs,
            Logits::Last,
            &ads,
        )?;
        next = logits.argmax(1)?.to_vec1()?;
    }
    Ok((b * steps) as f64 / start.elapsed().as_secs_f64())
}

/// Aggregate tokens per second of `which.len()` requests at once through
/// `node`, request `i` on adapter `which[i]` (`None`: the base).
async fn pipeline_run(
    node: &hearth_runtime::Node,
    names: &[String],
    which: &[Option<usize>],
    tokens: usize,
    round: usize,
) -> Result<f64> {
    use hearth_runtime::pipeline::{GenerateParams, Prompt};
    let mut params = Vec::new();
    for (i, w) in which.iter().enumerate() {
        let adapter = match w {
            Some(k) => node
                .ensure_model(&names[*k], std::time::Duration::from_secs(60))
                .await?
                .context("not served as an adapter")?,
            None => {
                params.push((i, None));
                continue;
            }
        };
        params.push((i, Some(adapter)));
    }
    let started = Instant::now();
    let runs: Vec<_> = params
        .into_iter()
        .map(|(i, adapter)| {
            let node = node.clone();
            // Sampled at temperature 1 with fixed seeds: runs stay long
            // (greedy decoding of this model soon ends) and repeatable.
            let mut p = GenerateParams::new(
                Prompt::Tokens(
                    (0..16)
                        .map(|k| (k * 97 + i as u32 * 13 + 11) % 40000)
                        .collect(),
                ),
                tokens,
                hearth_models::SamplingParams {
                    temperature: 1.0,
                    top_p: 1.0,
                    top_k: 0,
                    seed: (round * 100 + i) as u64,
                },
                Vec::new(),
            );
            p.adapter = adapter;
            tokio::spawn(async move {
                hearth_test_utils::cluster::generate_all(
                    &node,
                    p,
                    std::time::Duration::from_secs(600),
                )
                .await
            })
        })
        .collect();
    let mut total = 0;
    for r in runs {
        total += r.await??.token_ids.len();
    }
    Ok(total as f64 / started.elapsed().as_secs_f64())
}

/// This process's resident anonymous memory (heap, not mapped files),
/// from `/proc/self/status`.
fn rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("RssAnon:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// The pipeline runs: rows and per-round figures.
async fn pipeline(
    args: &Args,
    path: &Path,
    cases: &[(String, Vec<Option<usize>>)],
    rows: &mut Vec<Row>,
    meta: &mut serde_json::Value,
) -> Result<()> {
    use hearth_test_utils::cluster::{TunedStore, model_info, pipeline_cluster_with};
    let dir = tempfile::tempdir()?;
    let info = model_info(path, dir.path())?;
    let cfg = info.config.clone();
    let content = info.times.content.clone().context("no content id")?;
    let stores: Vec<std::sync::Arc<TunedStore>> = (0..2)
        .map(|i| {
            std::sync::Arc::new(TunedStore {
                name: info.times.model.clone(),
                base: path.to_path_buf(),
                dir: dir.path().join(format!("node{i}")),
            })
        })
        .collect();
    let mut names = Vec::new();
    for k in 0..4 {
        let peft = dir.path().join(format!("peft-{k}"));
        hearth_test_utils::write_random_peft(&peft, &cfg, args.rank)?;
        let name = format!("ft-bench-{k}");
        hearth_runtime::adapters::register(
            &stores[0].tuned(),
            &name,
            &peft,
            &content,
            &info.times.model,
        )
        .map_err(anyhow::Error::msg)?;
        names.push(name);
    }
    let nodes = pipeline_cluster_with(
        &hearth_net::ClusterSecret::generate(),
        2,
        2,
        &info,
        hearth_runtime::pipeline::PlacementPolicy::Even,
        |i, c| c.models = Some(stores[i].clone()),
    )
    .await?;
    let node = nodes[0].node.clone();
    let placement = node.placement().context("no placement")?.id;
    // Warm-up on the base (caches, buffers), then with every adapter
    // prepared on both stages: what the process grew by in between is
    // what serving the four adapters costs in memory.
    pipeline_run(&node, &names, &cases[0].1, 8, 998).await?;
    // Measured with what the allocator holds free given back each time.
    hearth_runtime::adapters::release_freed_memory();
    let rss_before = rss_bytes();
    pipeline_run(&node, &names, &cases[3].1, 8, 999).await?;
    hearth_runtime::adapters::release_freed_memory();
    let rss_after = rss_bytes();
    // Once more with them held: what a mixed batch itself leaves behind.
    pipeline_run(&node, &names, &cases[3].1, 8, 997).await?;
    hearth_runtime::adapters::release_freed_memory();
    let rss_again = rss_bytes();
    let mut rates: Vec<Vec<f64>> = vec![Vec::new(); cases.len()];
    for round in 0..args.rounds {
        for (c, (name, which)) in cases.iter().enumerate() {
            let r = pipeline_run(&node, &names, which, args.pipeline_tokens, round).await?;
            print(&format!("pipeline round {round}: {name}: {r:.1} tok/s"))?;
            rates[c].push(r);
        }
    }
    let med: Vec<f64> = rates.iter().map(|r| median(r)).collect();
    for ((name, _), m) in cases.iter().zip(&med).skip(1) {
        rows.push(Row::new(
            &format!("2-stage pipeline, {} requests at once: {name}", args.batch),
            *m,
            med[0],
        ));
    }
    let stages: Vec<serde_json::Value> = nodes
        .iter()
        .flat_map(|n| n.node.stage_stats())
        .map(|s| {
            json!({"layers": format!("{}..{}", s.spec.start, s.spec.end),
                "adapters": s.adapters, "adapter_bytes": s.adapter_bytes})
        })
        .collect();
    let held: u64 = nodes
        .iter()
        .flat_map(|n| n.node.stage_stats())
        .map(|s| s.adapter_bytes)
        .sum();
    let grew = rss_after.zip(rss_before).map(|(a, b)| a.saturating_sub(b));
    if let Some(g) = grew {
        rows.push(Row::new(
            "2-stage pipeline: anonymous memory grown by preparing 4 adapters (MB) vs the adapters' slices held (MB)",
            g as f64 / 1e6,
            held as f64 / 1e6,
        ));
    }
    meta["rss_anon_bytes"] = json!({"after_base_warm_up": rss_before,
        "after_preparing_4_adapters": rss_after, "after_another_mixed_run": rss_again});
    let reloaded = node.placement().context("no placement")?.id != placement;
    anyhow::ensure!(!reloaded, "the placement changed during the runs");
    meta["pipeline"] = json!({
        "nodes": 2, "stages": stages, "tokens_per_request": args.pipeline_tokens,
        "same_placement_throughout": !reloaded,
        "per_round_tok_s": cases.iter().map(|(n, _)| n.clone()).zip(rates).collect::<Vec<_>>(),
    });
    Ok(())
}

fn main() -> Result<()> {
    let args = Args::parse();
    let path = real_model().context("the real model is needed (hearth models pull)")?;
    let w = WeightFile::open(&path)?;
    let cfg = w.config().clone();
    let spec = StageSpec::full(cfg.num_hidden_layers);
    let stage = Stage::load(&w, spec, Precision::Quantized)?;
    let dir = tempfile::tempdir()?;
    let mut adapters = Vec::new();
    for k in 0..4u64 {
        let d = dir.path().join(format!("adapter-{k}"));
        hearth_test_utils::write_random_peft(&d, &cfg, args.rank)?;
        adapters.push(StageAdapter::load_peft(&d, &cfg, spec)?);
    }
    let adapter_bytes = adapters[0].bytes();
    let base_bytes = std::fs::metadata(&path)?.len();
    let vocab = cfg.vocab_size as u32;
    let cases: Vec<(String, Vec<Option<usize>>)> = vec![
        ("base alone".into(), vec![None; args.batch]),
        ("1 adapter".into(), vec![Some(0); args.batch]),
        (
            "2 adapters".into(),
            (0..args.batch).map(|i| Some(i % 2)).collect(),
        ),
        (
            "4 adapters".into(),
            (0..args.batch).map(|i| Some(i % 4)).collect(),
        ),
        (
            "4 adapters and the base".into(),
            (0..args.batch)
                .map(|i| (i % 5 < 4).then_some(i % 5))
                .collect(),
        ),
    ];
    // Warm-up.
    run(&stage, &adapters, &cases[3].1, args.prompt, 2, vocab)?;
    let mut rates: Vec<Vec<f64>> = vec![Vec::new(); cases.len()];
    for round in 0..args.rounds {
        for (c, (name, which)) in cases.iter().enumerate() {
            let r = run(&stage, &adapters, which, args.prompt, args.steps, vocab)?;
            print(&format!("round {round}: {name}: {r:.1} tok/s"))?;
            rates[c].push(r);
        }
    }
    let med: Vec<f64> = rates.iter().map(|r| median(r)).collect();
    let mut rows: Vec<Row> = cases
        .iter()
        .zip(&med)
        .skip(1)
        .map(|((name, _), m)| {
            Row::new(
                &format!("decode tok/s, batch of {}: {name}", args.batch),
                *m,
                med[0],
            )
        })
        .collect();
    let mut meta = json!({
        "cpu": cpu_name(),
        "threads": std::thread::available_parallelism().map_or(1, usize::from),
        "batch": args.batch, "prompt_tokens": args.prompt, "decode_steps": args.steps,
        "rounds": args.rounds, "rank": args.rank,
        "adapter_bytes_f32": adapter_bytes,
        "base_file_bytes": base_bytes,
        "adapter_share_of_base": adapter_bytes as f64 / base_bytes as f64,
        "per_round_tok_s": cases.iter().map(|(n, _)| n.clone()).zip(rates).collect::<Vec<_>>(),
        "dtype": format!("{:?}", DType::F32),
    });
    drop(stage);
    drop(adapters);
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?
        .block_on(pipeline(&args, &path, &cases, &mut rows, &mut meta))?;
    let md = write_results(
        &args.out,
        "adapters",
        "Many adapters, one base: decode throughput of a mixed batch (SmolLM2-135M Q4_1; one CPU stage, and a 2-stage pipeline)",
        "with adapters",
        "base alone",
        &rows,
        meta,
    )?;
    println!("{md}");
    Ok(())
}
