//! Pipeline inference benchmark on the real model (SmolLM2-135M Q4_1),
//! every figure beside its reference from the same run:
//!
//! - single-stream decode tok/s through 1, 2 and 3 in-process nodes (real
//!   QUIC on loopback, equal layer ranges), as a ratio to 1 node, and where
//!   each token's time goes (compute, packing + sending, the rest: network,
//!   queueing, sampling);
//! - aggregate tok/s with 1, 4 and 8 concurrent streams on 1, 2, 3 nodes;
//! - `hearth up` processes pinned to one core each: two nodes against one
//!   node on one core, 8 concurrent streams;
//! - with root: two `hearth up` processes in network namespaces whose links
//!   are rate-limited with `tc tbf`, against the same unlimited.
//!
//! `cargo run --release -p hearth-bench --bin pipeline`
#![allow(clippy::print_stdout)] // A command-line program: printing to stdout is its job.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;
use hearth_bench::{Row, cpu_name, median, print, write_results};
use hearth_models::SamplingParams;
use hearth_runtime::pipeline::{GenSummary, GenerateParams, PlacementPolicy, Prompt};
use hearth_test_utils::cluster::{generate_all, model_info, pipeline_cluster};
use hearth_test_utils::netns::{ChildGuard, Lan, available};
use hearth_test_utils::{free_port, hearth_release_binary as hearth_binary, real_model};

#[derive(Debug, Parser)]
struct Args {
    /// Tokens per single-stream run.
    #[arg(long, default_value_t = 128)]
    tokens: usize,
    /// Single-stream rounds, interleaved over the configurations (medians kept).
    #[arg(long, default_value_t = 7)]
    runs: usize,
    /// Tokens per stream in the concurrent runs.
    #[arg(long, default_value_t = 64)]
    concurrent_tokens: usize,
    #[arg(long, default_value = "bench/results")]
    out: PathBuf,
}

fn params(tokens: usize, salt: usize) -> GenerateParams {
    // A fixed seed at a high temperature keeps runs long and repeatable
    // (greedy decoding of this model soon hits an end token).
    GenerateParams::new(
        Prompt::Text(format!(
            "Story {salt}: once upon a time, in a small village by the sea,"
        )),
        tokens,
        SamplingParams {
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            seed: 7 + salt as u64,
        },
        Vec::new(),
    )
}

/// Tokens per second of `streams` generations at once, and their summaries.
async fn concurrent(
    node: &hearth_runtime::Node,
    streams: usize,
    tokens: usize,
) -> Result<(f64, Vec<GenSummary>)> {
    let started = Instant::now();
    let handles: Vec<_> = (0..streams)
        .map(|i| {
            let node = node.clone();
            tokio::spawn(async move {
                generate_all(&node, params(tokens, i), Duration::from_secs(600)).await
            })
        })
        .collect();
    let mut out = Vec::new();
    for h in handles {
        out.push(h.await??);
    }
    let total: usize = out.iter().map(|s| s.token_ids.len()).sum();
    Ok((total as f64 / started.elapsed().as_secs_f64(), out))
}

fn stage_totals(nodes: &[hearth_test_utils::cluster::TestNode]) -> (f64, f64) {
    nodes
        .iter()
        .flat_map(|t| t.node.stage_stats())
        .fold((0.0, 0.0), |(c, s), st| (c + st.compute_s, s + st.send_s))
}

async fn in_process(
    args: &Args,
    model: &Path,
    rows: &mut Vec<Row>,
    meta: &mut serde_json::Value,
) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let info = model_info(model, dir.path())?;
    // All three clusters stay up; single-stream runs are interleaved
    // (1, 2, 3 nodes, then again) so this machine's drifting speed hits
    // every configuration alike, and the medians are compared.
    let mut clusters = Vec::new();
    for n in 1..=3 {
        let nodes = pipeline_cluster(n, n, &info, PlacementPolicy::Even).await?;
        // Warm up (first batches allocate caches and pages).
        generate_all(&nodes[0].node, params(16, 99), Duration::from_secs(120)).await?;
        clusters.push(nodes);
    }
    let mut rates = vec![Vec::new(); 3];
    let mut per_token = vec![Vec::new(); 3];
    let mut compute = vec![Vec::new(); 3];
    let mut send = vec![Vec::new(); 3];
    for r in 0..args.runs {
        for (k, nodes) in clusters.iter().enumerate() {
            let (c0, s0) = stage_totals(nodes);
            let s = generate_all(
                &nodes[0].node,
                params(args.tokens, r),
                Duration::from_secs(600),
            )
            .await?;
            let (c1, s1) = stage_totals(nodes);
            let steps = s.token_ids.len() as f64;
            rates[k].push(s.decode_tok_per_s());
            per_token[k].push((s.prefill_secs + s.decode_secs) / steps * 1e3);
            compute[k].push((c1 - c0) / steps * 1e3);
            send[k].push((s1 - s0) / steps * 1e3);
        }
    }
    let mut single = Vec::new();
    for k in 0..3 {
        let n = k + 1;
        let rate = median(&rates[k]);
        single.push(rate);
        let (t, c, s) = (median(&per_token[k]), median(&compute[k]), median(&send[k]));
        print(&format!(
            "{n} node(s): single stream {rate:.1} tok/s; per token {t:.2} ms = compute {c:.2} + pack/send {s:.3} + rest {:.2}",
            t - c - s
        ))?;
        meta[format!("split_{n}_nodes")] = serde_json::json!({
            "per_token_ms": t, "compute_ms": c, "pack_send_ms": s, "rest_ms": t - c - s,
            "single_stream_tok_per_s": rates[k],
        });
    }
    let mut agg: Vec<Vec<f64>> = vec![Vec::new(); 3];
    for streams in [1, 4, 8] {
        for (k, nodes) in clusters.iter().enumerate() {
            let (tps, _) = concurrent(&nodes[0].node, streams, args.concurrent_tokens).await?;
            print(&format!(
                "{} node(s): {streams} streams {tps:.1} tok/s aggregate",
                k + 1
            ))?;
            agg[k].push(tps);
        }
    }
    for n in 0..3 {
        rows.push(Row::new(
            &format!(
                "single-stream decode tok/s, {} node(s) vs 1 (target >= 0.95)",
                n + 1
            ),
            single[n],
            single[0],
        ));
    }
    for (ci, streams) in [1, 4, 8].iter().enumerate() {
        for n in 0..3 {
            rows.push(Row::new(
                &format!("aggregate tok/s, {streams} streams, {} node(s) vs 1", n + 1),
                agg[n][ci],
                agg[0][ci],
            ));
        }
    }
    for n in 1..=3 {
        let s = &meta[format!("split_{n}_nodes")];
        let t = s["per_token_ms"].as_f64().unwrap_or(0.0);
        rows.push(Row::new(
            &format!("per-token ms, {n} node(s): compute (vs whole token)"),
            s["compute_ms"].as_f64().unwrap_or(0.0),
            t,
        ));
        rows.push(Row::new(
            &format!("per-token ms, {n} node(s): pack + send (vs whole token)"),
            s["pack_send_ms"].as_f64().unwrap_or(0.0),
            t,
        ));
        rows.push(Row::new(
            &format!("per-token ms, {n} node(s): network, queues, sampling (vs whole token)"),
            s["rest_ms"].as_f64().unwrap_or(0.0),
            t,
        ));
    }
    Ok(())
}

/// A `hearth up` process; `prefix` runs it under taskset or in a namespace.
fn up(
    prefix: &[String],
    home: &Path,
    name: &str,
    quic: &str,
    http: &str,
    model: &Path,
    extra: &[String],
) -> Result<ChildGuard> {
    let bin = hearth_binary()?;
    let mut c = Command::new(&prefix[0]);
    c.args(&prefix[1..])
        .arg(&bin)
        .args(["up", "--no-mdns", "--split", "even", "--name", name])
        .arg("--home")
        .arg(home)
        .args(["--quic", quic, "--http", http])
        .arg("--model")
        .arg(model)
        .args(extra)
        .env("RAYON_NUM_THREADS", "1")
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    ChildGuard::spawn(c)
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(600)))
        .build()
        .into()
}

/// Waits until the node at `url` has a placement of `stages` stages.
fn wait_stages(url: &str, stages: usize) -> Result<()> {
    let start = Instant::now();
    loop {
        let v: Option<serde_json::Value> = agent()
            .get(&format!("{url}/api/cluster"))
            .call()
            .ok()
            .and_then(|mut r| r.body_mut().read_json().ok());
        if v.as_ref()
            .and_then(|v| v["placement"]["stages"].as_array())
            .is_some_and(|s| s.len() == stages)
        {
            return Ok(());
        }
        if start.elapsed() > Duration::from_secs(180) {
            bail!("no {stages}-stage placement at {url}: {v:?}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Aggregate tok/s of `streams` concurrent HTTP generations.
fn http_concurrent(url: &str, streams: usize, tokens: usize) -> Result<f64> {
    let started = Instant::now();
    let handles: Vec<_> = (0..streams)
        .map(|i| {
            let url = url.to_string();
            std::thread::spawn(move || -> Result<usize> {
                let v: serde_json::Value = agent()
                    .post(&format!("{url}/api/generate"))
                    .send_json(serde_json::json!({
                        "prompt": format!("Story {i}: once upon a time, in a small village by the sea,"),
                        "max_tokens": tokens, "temperature": 1.0, "seed": 7 + i,
                    }))?
                    .body_mut()
                    .read_json()?;
                v["token_ids"]
                    .as_array()
                    .map(|a| a.len())
                    .context("no token_ids in the answer")
            })
        })
        .collect();
    let mut total = 0;
    for h in handles {
        total += h
            .join()
            .map_err(|_| anyhow::anyhow!("client thread panicked"))??;
    }
    Ok(total as f64 / started.elapsed().as_secs_f64())
}

fn pinned(args: &Args, model: &Path, rows: &mut Vec<Row>) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let run = |nodes: usize| -> Result<(f64, f64)> {
        let quic: Vec<u16> = (0..nodes).map(|_| free_port(true)).collect::<Result<_>>()?;
        let http = free_port(false)?;
        let mut procs = Vec::new();
        let token_home = dir.path().join(format!("p{nodes}-0"));
        for i in 0..nodes {
            let home = dir.path().join(format!("p{nodes}-{i}"));
            let prefix = vec!["taskset".to_string(), "-c".into(), i.to_string()];
            let mut extra = Vec::new();
            if i > 0 {
                let token = String::from_utf8(
                    Command::new(hearth_binary()?)
                        .arg("token")
                        .arg("--home")
                        .arg(&token_home)
                        .output()?
                        .stdout,
                )?;
                extra = vec![
                    "--join".into(),
                    token.trim().to_string(),
                    "--peer".into(),
                    format!("127.0.0.1:{}", quic[0]),
                ];
            }
            let h = if i == 0 { http } else { free_port(false)? };
            procs.push(up(
                &prefix,
                &home,
                &format!("core{i}"),
                &format!("127.0.0.1:{}", quic[i]),
                &format!("127.0.0.1:{h}"),
                model,
                &extra,
            )?);
            if i == 0 {
                wait_up(&format!("http://127.0.0.1:{http}"))?;
            }
        }
        let url = format!("http://127.0.0.1:{http}");
        wait_stages(&url, nodes)?;
        http_concurrent(&url, 1, 16)?; // warm-up
        let one = http_concurrent(&url, 1, args.tokens)?;
        let eight = http_concurrent(&url, 8, args.concurrent_tokens)?;
        drop(procs);
        Ok((one, eight))
    };
    let (one_1, eight_1) = run(1)?;
    let (one_2, eight_2) = run(2)?;
    print(&format!(
        "pinned: 1 node on 1 core {eight_1:.1} tok/s (8 streams), 2 nodes on 1 core each {eight_2:.1} tok/s"
    ))?;
    rows.push(Row::new(
        "pinned, 8 streams: 2 nodes on 1 core each vs 1 node on 1 core, tok/s (target >= 1.8)",
        eight_2,
        eight_1,
    ));
    rows.push(Row::new(
        "pinned, 1 stream: 2 nodes on 1 core each vs 1 node on 1 core, tok/s",
        one_2,
        one_1,
    ));
    Ok(())
}

fn wait_up(url: &str) -> Result<()> {
    let start = Instant::now();
    while agent().get(&format!("{url}/health")).call().is_err() {
        if start.elapsed() > Duration::from_secs(30) {
            bail!("no node at {url}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

/// Single-stream decode between two namespaces at each link rate.
fn rate_limited(
    args: &Args,
    model: &Path,
    rows: &mut Vec<Row>,
    meta: &mut serde_json::Value,
) -> Result<()> {
    if !available("rate-limited links") {
        return Ok(());
    }
    let bin = hearth_binary()?;
    let dir = tempfile::tempdir()?;
    let lan = Lan::new(2)?;
    let mut results = Vec::new();
    let quic = 7410;
    let http = 7411;
    let ns = |i: usize| {
        vec![
            "ip".to_string(),
            "netns".into(),
            "exec".into(),
            lan.ns(i).to_string(),
        ]
    };
    let home0 = dir.path().join("ns0");
    let n0 = up(
        &ns(0),
        &home0,
        "ns0",
        &format!("{}:{quic}", lan.ip(0)),
        &format!("127.0.0.1:{http}"),
        model,
        &[],
    )?;
    std::thread::sleep(Duration::from_secs(2));
    let token = String::from_utf8(
        Command::new(&bin)
            .arg("token")
            .arg("--home")
            .arg(&home0)
            .output()?
            .stdout,
    )?;
    let n1 = up(
        &ns(1),
        &dir.path().join("ns1"),
        "ns1",
        &format!("{}:{quic}", lan.ip(1)),
        &format!("127.0.0.1:{http}"),
        model,
        &[
            "--join".into(),
            token.trim().to_string(),
            "--peer".into(),
            format!("{}:{quic}", lan.ip(0)),
        ],
    )?;
    let generate = || -> Result<f64> {
        let out = lan
            .command(0, bin.to_str().context("binary path")?)
            .args([
                "generate",
                "--cluster",
                &format!("127.0.0.1:{http}"),
                "--raw",
                "--json",
            ])
            .args([
                "--prompt",
                "Story: once upon a time, in a small village by the sea,",
            ])
            .args([
                "--temperature",
                "1",
                "--seed",
                "7",
                "--max-tokens",
                &args.tokens.to_string(),
            ])
            .output()?;
        if !out.status.success() {
            bail!("generate failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
        v["decode_tok_per_s"]
            .as_f64()
            .context("no decode_tok_per_s")
    };
    // Wait for the 2-stage placement (asked from inside the namespace).
    let start = Instant::now();
    loop {
        let out = lan
            .command(0, bin.to_str().context("binary path")?)
            .args(["status", "--json", "--http", &format!("127.0.0.1:{http}")])
            .output()?;
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        if v["placement"]["stages"]
            .as_array()
            .is_some_and(|s| s.len() == 2)
        {
            break;
        }
        if start.elapsed() > Duration::from_secs(180) {
            bail!("no 2-stage placement across the namespaces");
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    let _ = generate()?; // warm-up
    for rate in ["unlimited", "1gbit", "100mbit", "10mbit"] {
        for i in 0..2 {
            let tc = |args: &[&str]| lan.command(i, "tc").args(["qdisc"]).args(args).output();
            let _ = tc(&["del", "dev", "eth0", "root"]);
            if rate != "unlimited" {
                let out = tc(&[
                    "add", "dev", "eth0", "root", "tbf", "rate", rate, "burst", "32kbit",
                    "latency", "50ms",
                ])?;
                if !out.status.success() {
                    bail!(
                        "tc tbf {rate} failed: {}",
                        String::from_utf8_lossy(&out.stderr)
                    );
                }
            }
        }
        let rates: Vec<f64> = (0..args.runs).map(|_| generate()).collect::<Result<_>>()?;
        let r = median(&rates);
        print(&format!("2 namespaces, links {rate}: {r:.1} tok/s"))?;
        results.push((rate, r));
    }
    let base = results[0].1;
    for (rate, r) in &results[1..] {
        rows.push(Row::new(
            &format!("single-stream tok/s, 2 stages over a {rate} link (tc tbf) vs unlimited"),
            *r,
            base,
        ));
    }
    meta["rate_limited"] = serde_json::json!(
        results
            .iter()
            .map(|(k, v)| (k.to_string(), *v))
            .collect::<std::collections::BTreeMap<_, _>>()
    );
    drop(n1);
    drop(n0);
    Ok(())
}

fn main() -> Result<()> {
    let args = Args::parse();
    let model =
        real_model().context("the real model is not in the cache: run `hearth models pull`")?;
    let mut rows = Vec::new();
    let mut meta = serde_json::json!({
        "cpu": cpu_name(),
        "cores": std::thread::available_parallelism().map_or(1, |n| n.get()),
        "model": model.file_name().map(|n| n.to_string_lossy().into_owned()),
        "tokens": args.tokens,
        "runs": args.runs,
        "concurrent_tokens": args.concurrent_tokens,
        "sampling": "temperature 1, fixed seeds",
    });
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(in_process(&args, &model, &mut rows, &mut meta))?;
    drop(rt);
    pinned(&args, &model, &mut rows)?;
    rate_limited(&args, &model, &mut rows, &mut meta)?;
    let md = write_results(
        &args.out,
        "pipeline",
        "Pipeline inference (SmolLM2-135M Q4_1, this machine)",
        "measured",
        "reference",
        &rows,
        meta,
    )?;
    print(&md)
}
