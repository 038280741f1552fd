//! A heterogeneous home on one machine (issue #18), on the real model:
//! `hearth up` processes (release build), each in its own CPU cgroup,
//! planning by measured figures (`--split plan`). Every figure beside its
//! reference from the same run:
//!
//! 1. a = 1 core, b = 0.25 core: single-stream decode through the cluster
//!    and the aggregate of 8 clients each streaming one generation after
//!    another (tokens arriving in a 12 s window after 3 s of warm-up),
//!    against the best single device (one node under a 1-core quota that
//!    runs beside each configuration, idle while the other is measured;
//!    the two are measured in turns, run by run, so the host's drift over
//!    minutes falls on both sides alike);
//! 2. three nodes at 1 / 0.5 / 0.25 core, the same two figures;
//! 3. a's quota drops to 0.25 while b's rises to 1 core, mid-run with
//!    requests flowing: seconds until the re-placement, decode after it
//!    against the best single device, requests failed;
//! 4. for every placement used, the planner's predicted single-stream rate
//!    against the measured one: predicted when it was placed (start-up or
//!    offer figures) and from the live figures after the traffic.
//!
//! 5. a LoRA job on a = 1 core, b = 0.25 core: its step time against the
//!    same job on the best single device (jobs in turns: single, cluster,
//!    single, ...; the means); then the same job with the swap
//!    of 3. mid-job: whether it re-planned, and how far its final weights
//!    are from the uninterrupted run's.
//!
//! Needs root (cgroups). `cargo run --release -p hearth-bench --bin hetero`
//! (`--part serve` or `--part train` for one half).
#![allow(clippy::print_stdout)] // A command-line program: printing to stdout is its job.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use clap::Parser;
use hearth_bench::{Row, cpu_name, median, print, write_results};
use hearth_runtime::pipeline::Placement;
use hearth_test_utils::home::{Home, HomeSpec};
use hearth_test_utils::{cgroup, real_model};

#[derive(Debug, Parser)]
struct Args {
    /// Tokens per single-stream run.
    #[arg(long, default_value_t = 64)]
    tokens: u32,
    /// Single-stream runs per configuration (the median is kept).
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// Tokens per stream in the 8-stream runs.
    #[arg(long, default_value_t = 32)]
    concurrent_tokens: u32,
    /// LoRA steps per training run.
    #[arg(long, default_value_t = 12)]
    train_steps: u64,
    /// `all`, `serve` (1 to 4) or `train` (5).
    #[arg(long, default_value = "all")]
    part: String,
    #[arg(long, default_value = "bench/results")]
    out: PathBuf,
}

/// Rounds in which a cluster job and a single-device job run at once.
const TRAIN_ROUNDS: usize = 4;

/// A small chat fine-tune (the same for every run).
fn train_data() -> String {
    let mut data = String::new();
    for i in 0..8 {
        data += &format!(
            "{{\"messages\":[{{\"role\":\"user\",\"content\":\"What is the code word number {i}?\"}},{{\"role\":\"assistant\",\"content\":\"The code word number {i} is heron-{i}.\"}}]}}\n"
        );
    }
    data
}

fn train_extras(steps: u64) -> serde_json::Value {
    serde_json::json!({
        "steps": steps, "batch_size": 2, "micro_batches": 2, "seq_len": 64,
        "learning_rate": 1e-3, "checkpoint_every": 0, "merge": false, "seed": 5,
        "method": {"type": "lora", "rank": 8, "alpha": 16.0, "dropout": 0.0},
    })
}

/// Median step seconds of a job's events after its first step.
fn step_median(home: &Home, id: &str) -> Result<f64> {
    let steps: Vec<f64> = home
        .job_events(0, id)?
        .iter()
        .filter_map(|e| e["data"]["step_s"].as_f64())
        .skip(1)
        .collect();
    Ok(median(&steps))
}

/// Waits for job `id` on `home`'s device 0 to succeed.
fn finished(home: &Home, id: &str) -> Result<serde_json::Value> {
    let done = home.wait_job(0, id, Duration::from_secs(1800))?;
    if done["status"] != "succeeded" {
        bail!("job failed: {done} {:?}", home.job_messages(0, id)?);
    }
    Ok(done)
}

/// CPU seconds and throttled periods of each of `home`'s devices.
fn usage(home: &Home) -> Result<Vec<(f64, u64)>> {
    home.devices.iter().map(|d| d.group.usage()).collect()
}

/// Prints what each device of `home` used since `before`, over `wall` s.
fn print_usage(label: &str, home: &Home, before: &[(f64, u64)], wall: f64) -> Result<()> {
    for (d, (cpu0, thr0)) in home.devices.iter().zip(before) {
        let (cpu, thr) = d.group.usage()?;
        println!(
            "    {label} {}: {:.1} CPU s in {wall:.1} s ({:.2} cores), throttled in {} periods",
            d.name,
            cpu - cpu0,
            (cpu - cpu0) / wall,
            thr.saturating_sub(*thr0),
        );
    }
    Ok(())
}

/// Runs a job on device 0 to its end; returns (median step seconds after
/// the first step, the job object). `during` runs once step 2 is done.
fn train(
    home: &Home,
    steps: u64,
    during: impl FnOnce() -> Result<()>,
) -> Result<(f64, serde_json::Value)> {
    let id = home.start_job(0, &train_data(), train_extras(steps))?;
    home.wait_step(0, &id, 2, Duration::from_secs(900))?;
    during()?;
    let done = finished(home, &id)?;
    Ok((step_median(home, &id)?, done))
}

/// The same job on `single` and on `cluster` at once (each on its own
/// share of the host's cores, under the same host conditions): the two
/// median step times, the cluster's job object.
fn train_together(
    single: &Home,
    cluster: &Home,
    steps: u64,
) -> Result<(f64, f64, serde_json::Value)> {
    let (u_single, u_cluster) = (usage(single)?, usage(cluster)?);
    let t0 = Instant::now();
    let a = single.start_job(0, &train_data(), train_extras(steps))?;
    let b = cluster.start_job(0, &train_data(), train_extras(steps))?;
    finished(single, &a)?;
    let job = finished(cluster, &b)?;
    // Over the time until both ended.
    let wall = t0.elapsed().as_secs_f64();
    print_usage("single", single, &u_single, wall)?;
    print_usage("cluster", cluster, &u_cluster, wall)?;
    Ok((step_median(single, &a)?, step_median(cluster, &b)?, job))
}

fn stages(job: &serde_json::Value) -> String {
    job["hearth"]["stages"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|s| {
            format!(
                "{}:{}..{}",
                s["name"].as_str().unwrap_or("?"),
                s["start"],
                s["end"]
            )
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// Part 5: the LoRA job rows.
fn training(args: &Args, rows: &mut Vec<Row>, placements: &mut Vec<String>) -> Result<()> {
    // The best single device runs beside the cluster, and in each round
    // the two run the same job at the same time, each on its own core's
    // worth of the host (2 cores here): the host's speed, which drifts by
    // 10-25% over minutes, is then the same for both. Each side's figure
    // is the mean over rounds of its jobs' median step.
    println!("training: the best single device (1 core) beside a=1, b=0.25, jobs at the same time");
    let (reference, _) = start(&[1.0])?;
    let (home, _) = start(&[1.0, 0.25])?;
    let (mut singles, mut clusters) = (Vec::new(), Vec::new());
    let mut uninterrupted = serde_json::Value::Null;
    for _ in 0..TRAIN_ROUNDS {
        let (s, c, job) = train_together(&reference, &home, args.train_steps)?;
        println!(
            "  single device {s:.2} s per step; cluster {c:.2} s per step on {}",
            stages(&job)
        );
        singles.push(s);
        clusters.push(c);
        if uninterrupted.is_null() {
            uninterrupted = job;
        }
    }
    drop(reference);
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
    let (single_s, cluster_s) = (mean(&singles), mean(&clusters));
    println!("  single {singles:.2?} → {single_s:.2}; cluster {clusters:.2?} → {cluster_s:.2}");
    let want = Home::job_adapter(&uninterrupted)?;
    println!("training: the same job, a 1 → 0.25 core and b 0.25 → 1 core after step 2");
    let (_, swapped) = train(&home, args.train_steps, || {
        home.set_cores(0, 0.25)?;
        home.set_cores(1, 1.0)
    })?;
    let id = swapped["id"].as_str().unwrap_or_default().to_string();
    let moves: Vec<String> = home
        .job_messages(0, &id)?
        .into_iter()
        .filter(|m| m.contains("Re-planning between steps"))
        .collect();
    let got = Home::job_adapter(&swapped)?;
    let mut worst = 0f64;
    for ((n, w), (m, g)) in want.iter().zip(&got) {
        if n != m || w.len() != g.len() {
            bail!("the adapters differ in layout: {n} / {m}");
        }
        let scale = w.iter().fold(0f32, |a, x| a.max(x.abs())).max(1e-6);
        let diff = w.iter().zip(g).fold(0f32, |a, (x, y)| a.max((x - y).abs()));
        worst = worst.max(f64::from(diff / scale));
    }
    println!(
        "  moves: {moves:?}; final split {}; worst relative weight difference {worst:.2e}",
        stages(&swapped)
    );
    rows.push(Row::new(
        "LoRA a=1, b=0.25: step seconds (vs best single device; lower is better)",
        cluster_s,
        single_s,
    ));
    rows.push(Row::new(
        "LoRA swap mid-job: re-plans between steps (vs expected 1)",
        moves.len() as f64,
        1.0,
    ));
    rows.push(Row::new(
        "LoRA swap mid-job: worst weight difference ÷ largest weight, against the uninterrupted run (vs 1e-4 bound)",
        worst,
        1e-4,
    ));
    placements.push(format!(
        "LoRA a=1, b=0.25: {}; after the swap: {} ({})",
        stages(&uninterrupted),
        stages(&swapped),
        moves.join(" | ")
    ));
    Ok(())
}

fn whole(p: &Placement) -> bool {
    p.stages.last().is_some_and(|s| s.spec.head)
}

fn split(p: &Placement) -> String {
    let stages = p
        .stages
        .iter()
        .map(|s| format!("{}:{}..{}", s.name, s.spec.start, s.spec.end))
        .collect::<Vec<_>>()
        .join(" ");
    if p.replicas.is_empty() {
        return stages;
    }
    let replicas: Vec<&str> = p.replicas.iter().map(|r| r.name.as_str()).collect();
    format!("{stages}, replicas {}", replicas.join(" "))
}

/// Seconds the 8-stream load runs before tokens are counted (the requester
/// learns each pipeline's pace), and seconds they are counted for.
const EIGHT_WARM_S: f64 = 3.0;
const EIGHT_WINDOW_S: f64 = 12.0;

/// Aggregate tok/s of 8 clients through device `i`, each sending one
/// streamed generation after another (a sustained load of 8 concurrent
/// streams): tokens that arrive within the counting window, over its
/// length.
fn eight(home: &Arc<Home>, i: usize, args: &Args) -> Result<f64> {
    let started = Instant::now();
    let from = started + Duration::from_secs_f64(EIGHT_WARM_S);
    let until = from + Duration::from_secs_f64(EIGHT_WINDOW_S);
    let handles: Vec<_> = (0..8u64)
        .map(|s| {
            let (home, tokens) = (home.clone(), args.concurrent_tokens);
            std::thread::spawn(move || -> Result<usize> {
                let mut counted = 0;
                let mut n = 0u64;
                while Instant::now() < until {
                    let arrived = home.stream(i, 100 + s * 1000 + n, tokens)?;
                    counted += arrived
                        .iter()
                        .filter(|t| **t >= from && **t < until)
                        .count();
                    n += 1;
                }
                Ok(counted)
            })
        })
        .collect();
    let mut total = 0;
    for h in handles {
        total += h
            .join()
            .map_err(|_| anyhow::anyhow!("client thread panicked"))??;
    }
    Ok(total as f64 / EIGHT_WINDOW_S)
}

/// The active placement's rate predicted from the figures now (live ones
/// where trusted), as device `i` sees it.
fn now(home: &Home, i: usize) -> Option<f64> {
    home.view(i)
        .ok()
        .and_then(|v| v.predicted_now)
        .map(|p| p.tokens_per_s)
}

fn start(cores: &[f64]) -> Result<(Arc<Home>, Placement)> {
    let Some(model) = real_model() else {
        bail!("the real model is not in the cache: run `hearth models pull`")
    };
    let home = Home::start(
        &model,
        &HomeSpec {
            cores: cores.to_vec(),
            release: true,
            ..HomeSpec::default()
        },
    )?;
    let n = cores.len();
    let p = home.wait_placement(0, Duration::from_secs(300), |p| {
        whole(p) && p.figures.len() == n
    })?;
    // Let live figures and the re-planner settle before timing.
    std::thread::sleep(Duration::from_secs(3));
    let p = home.view(0)?.placement.unwrap_or(p);
    Ok((Arc::new(home), p))
}

/// Measured single-stream rate beside the placement's predictions.
type Predicted = Vec<(String, Placement, f64, Option<f64>)>;

/// The best single device: one node under a 1-core quota. It runs beside
/// each configuration (idle while the other is measured) and the two are
/// measured in turns, run by run, so the host's drift over minutes (10-25%
/// here) falls on both sides alike.
fn reference_home() -> Result<(Arc<Home>, Placement)> {
    println!("reference: one node under a 1-core quota");
    start(&[1.0])
}

/// Single-stream decode tok/s through the configuration's device `ci` and
/// through the reference, alternating run by run: the medians.
fn paired_single(cl: &Home, ci: usize, reference: &Home, args: &Args) -> Result<Paired> {
    let (mut ours, mut theirs) = (Vec::new(), Vec::new());
    let rate = |(n, secs): (usize, f64)| (n > 1 && secs > 0.0).then(|| (n - 1) as f64 / secs);
    let mut ref_now = None;
    for r in 0..args.runs {
        theirs.extend(rate(reference.generate(0, r as u64, args.tokens)?));
        // The reference's prediction from live figures while its
        // single-stream work is fresh (they decay with an 8 s half-life).
        if r + 1 == args.runs {
            ref_now = now(reference, 0);
        }
        ours.extend(rate(cl.generate(ci, r as u64, args.tokens)?));
    }
    Ok(Paired {
        ours: median(&ours),
        theirs: median(&theirs),
        ours_now: now(cl, ci),
        theirs_now: ref_now,
    })
}

/// Single-stream decode through a configuration and through the
/// reference (medians), with each one's rate predicted from its live
/// figures right after its last run.
struct Paired {
    ours: f64,
    theirs: f64,
    ours_now: Option<f64>,
    theirs_now: Option<f64>,
}

/// Windows of 8 concurrent streams per side, in turns.
const EIGHT_TURNS: usize = 2;

/// 8-stream aggregate tok/s through the configuration and through the
/// reference, in turns: the means.
fn paired_eight(
    cl: &Arc<Home>,
    ci: usize,
    reference: &Arc<Home>,
    args: &Args,
) -> Result<(f64, f64)> {
    let (mut ours, mut theirs) = (0.0, 0.0);
    for _ in 0..EIGHT_TURNS {
        theirs += eight(reference, 0, args)?;
        ours += eight(cl, ci, args)?;
    }
    Ok((ours / EIGHT_TURNS as f64, theirs / EIGHT_TURNS as f64))
}

/// Parts 1 to 4: serving rows.
fn serving(
    args: &Args,
    rows: &mut Vec<Row>,
    placements: &mut Vec<String>,
    predicted: &mut Predicted,
) -> Result<()> {
    let (reference, ref_p) = reference_home()?;
    let mut alone: Option<(f64, Option<f64>)> = None;
    for (label, cores) in [
        ("a=1, b=0.25", vec![1.0, 0.25]),
        ("a=1, b=0.5, c=0.25", vec![1.0, 0.5, 0.25]),
    ] {
        println!("{label}");
        let (home, p) = start(&cores)?;
        let ci = cores.len() - 1;
        let single = paired_single(&home, ci, &reference, args)?;
        let (s, ref_single) = (single.ours, single.theirs);
        let (e, ref_eight) = paired_eight(&home, ci, &reference, args)?;
        println!(
            "  placement {}; single {s:.1} tok/s (reference {ref_single:.1}), 8 streams {e:.1} tok/s (reference {ref_eight:.1})",
            split(&p)
        );
        alone.get_or_insert((ref_single, single.theirs_now));
        let n = single.ours_now;
        drop(home);
        rows.push(Row::new(
            &format!("{label}: single-stream decode tok/s (vs best single device)"),
            s,
            ref_single,
        ));
        rows.push(Row::new(
            &format!("{label}: 8 streams aggregate tok/s (vs best single device)"),
            e,
            ref_eight,
        ));
        placements.push(format!("{label}: {}", split(&p)));
        predicted.push((label.to_string(), p, s, n));
    }
    predicted.insert(
        0,
        (
            "1 core alone".to_string(),
            ref_p,
            alone.map_or(f64::NAN, |a| a.0),
            alone.and_then(|a| a.1),
        ),
    );

    println!("swap: a 1 → 0.25 core, b 0.25 → 1 core, requests flowing through b");
    let (home, before) = start(&[1.0, 0.25])?;
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let traffic = {
        let (home, stop, ok, failed) = (home.clone(), stop.clone(), ok.clone(), failed.clone());
        std::thread::spawn(move || {
            for i in 0..2000u64 {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                match home.generate(1, 1000 + i, 16) {
                    Ok(_) => ok.fetch_add(1, Ordering::Relaxed),
                    Err(e) => {
                        println!("  request failed: {e:#}");
                        failed.fetch_add(1, Ordering::Relaxed)
                    }
                };
            }
        })
    };
    std::thread::sleep(Duration::from_secs(5));
    home.set_cores(0, 0.25)?;
    home.set_cores(1, 1.0)?;
    let t = Instant::now();
    let after = home.wait_placement(0, Duration::from_secs(120), |p| {
        whole(p) && Home::layers(p, "b") > Home::layers(p, "a") && p.id != before.id
    });
    let secs = t.elapsed().as_secs_f64();
    std::thread::sleep(Duration::from_secs(5));
    stop.store(true, Ordering::Relaxed);
    let _ = traffic.join();
    let after = after?;
    std::thread::sleep(Duration::from_secs(2));
    let single = paired_single(&home, 1, &reference, args)?;
    let (s, ref_single, after_now) = (single.ours, single.theirs, single.ours_now);
    let failed = failed.load(Ordering::Relaxed);
    println!(
        "  {} → {} after {secs:.1} s ({}); after: {s:.1} tok/s; requests ok {}, failed {failed}",
        split(&before),
        split(&after),
        after.reason.clone().unwrap_or_default(),
        ok.load(Ordering::Relaxed)
    );
    placements.push(format!(
        "swap: {} → {} ({})",
        split(&before),
        split(&after),
        after.reason.clone().unwrap_or_default()
    ));
    predicted.push(("after the swap".to_string(), after, s, after_now));
    drop(home);
    drop(reference);
    rows.push(Row::new("swap: seconds until re-placement", secs, 0.0));
    rows.push(Row::new(
        "swap: decode tok/s after it (vs best single device)",
        s,
        ref_single,
    ));
    rows.push(Row::new(
        "swap: requests failed (of those sent during it)",
        failed as f64,
        ok.load(Ordering::Relaxed) as f64 + failed as f64,
    ));

    for (label, p, measured, now) in predicted.iter() {
        if let Some(pred) = p.predicted_tokens_per_s {
            rows.push(Row::new(
                &format!("{label}: measured single-stream tok/s (vs prediction when placed)"),
                *measured,
                pred,
            ));
        }
        if let Some(pred) = now {
            rows.push(Row::new(
                &format!("{label}: measured single-stream tok/s (vs prediction from live figures)"),
                *measured,
                *pred,
            ));
        }
    }

    Ok(())
}

fn main() -> Result<()> {
    let args = Args::parse();
    if let Some(why) = cgroup::unavailable() {
        bail!("this benchmark needs CPU cgroups: {why}");
    }
    let mut rows = Vec::new();
    let mut placements = Vec::new();
    let mut predicted = Predicted::new();
    if args.part == "all" || args.part == "serve" {
        serving(&args, &mut rows, &mut placements, &mut predicted)?;
    }
    // What each prediction came from: the figures the plan used per device
    // (source, cores offered, current ÷ start-up factor, decode per layer).
    let plans: Vec<serde_json::Value> = predicted
        .iter()
        .map(|(label, p, measured, now)| {
            serde_json::json!({
                "label": label,
                "split": split(p),
                "reason": p.reason,
                "measured_tokens_per_s": measured,
                "predicted_when_placed": p.predicted_tokens_per_s,
                "predicted_from_live_figures": now,
                "figures": p.figures,
            })
        })
        .collect();
    if args.part == "all" || args.part == "train" {
        training(&args, &mut rows, &mut placements)?;
    }

    let md = write_results(
        &args.out,
        "hetero",
        "Heterogeneous home: CPU quotas per node (cgroups), plan from sustained and current figures",
        "Hearth",
        "reference",
        &rows,
        serde_json::json!({
            "cpu": cpu_name(),
            "tokens": args.tokens,
            "runs": args.runs,
            "concurrent_tokens": args.concurrent_tokens,
            "train_steps": args.train_steps,
            "part": args.part,
            "placements": placements,
            "method": "the best single device (one node, 1-core quota) runs beside each configuration and the two are measured in turns: single-stream runs alternate (medians), 8-stream windows alternate (means), LoRA jobs run at the same time on both, each on its own core of the host (means over rounds of each job's median step)",
            "plans": plans,
        }),
    )?;
    print(&md)?;
    Ok(())
}
