//! Planner benchmark: predicted step time of Hearth's plan beside the
//! splits other tools use (even, memory-proportional as in exo,
//! FLOPS-proportional) and the best single device, for emulated home
//! clusters, under one cost model, in one run.
//!
//! Device speeds are this machine's *measured* SmolLM2 profile scaled by
//! an assumed speed factor per device (stated in the output); links are
//! typical home figures. Bigger models reuse the measured per-layer time
//! scaled by bytes (decode is memory-bound) and FLOPs (prefill, training).
//!
//! `cargo run --release -p hearth-bench --bin plan`
#![allow(clippy::print_stdout)] // A command-line program: printing to stdout is its job.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Parser;
use hearth_bench::cpu_name;
use hearth_models::WeightFile;
use hearth_partitioner::{
    DeviceProfile, LayerCost, Links, Method, ModelProfile, PhaseTimes, Schedule, Workload,
};
use hearth_runtime::profile::{
    ModelInfo, PlanReport, PlannerInput, lora_bytes_per_layer, plan_report,
};
use serde::Serialize;

#[derive(Debug, Parser)]
struct Args {
    /// The measured model (default: the default model, fetched if missing).
    #[arg(long)]
    model: Option<String>,
    /// Measure this machine again instead of using the cached profile.
    #[arg(long)]
    fresh: bool,
    #[arg(long, default_value = "bench/results")]
    out: PathBuf,
}

/// An assumed device: its speed relative to this machine and its memory.
#[derive(Debug, Clone, Serialize)]
struct Dev {
    name: &'static str,
    /// Throughput relative to the machine running the benchmark.
    speed: f64,
    /// Memory the plan may use, GB.
    budget_gb: f64,
    /// Where the figure comes from.
    basis: &'static str,
}

const DESKTOP: Dev = Dev {
    name: "desktop",
    speed: 4.0,
    budget_gb: 24.0,
    basis: "8-core desktop CPU, 32 GB: 4 x the 2 vCPUs here (cores x per-core)",
};
const LAPTOP: Dev = Dev {
    name: "laptop",
    speed: 2.0,
    budget_gb: 12.0,
    basis: "4-core laptop, 16 GB: 2 x",
};
const LAPTOP_SMALL: Dev = Dev {
    name: "small laptop",
    speed: 1.5,
    budget_gb: 6.0,
    basis: "4-core laptop at lower clocks, 8 GB: 1.5 x",
};
const MINI_PC: Dev = Dev {
    name: "mini-PC",
    speed: 1.0,
    budget_gb: 12.0,
    basis: "4 efficiency cores (N100 class), 16 GB: 1 x",
};
const OLD_LAPTOP: Dev = Dev {
    name: "old laptop",
    speed: 0.5,
    budget_gb: 3.0,
    basis: "old 2-core laptop, 4 GB: 0.5 x",
};

/// A link kind: bits per second and round trip.
#[derive(Debug, Clone, Copy, Serialize)]
struct Link {
    name: &'static str,
    mbit: f64,
    rtt_ms: f64,
}

const GBE: Link = Link {
    name: "1 GbE",
    mbit: 940.0,
    rtt_ms: 0.3,
};
const WIFI: Link = Link {
    name: "Wi-Fi 5",
    mbit: 300.0,
    rtt_ms: 3.0,
};
const WIFI_FAR: Link = Link {
    name: "Wi-Fi, far room",
    mbit: 40.0,
    rtt_ms: 8.0,
};

struct Scenario {
    name: &'static str,
    /// Each device and the link that attaches it to the home network; a
    /// path between two devices is as slow as the slower attachment, and
    /// pays both round trips.
    devices: Vec<(Dev, Link)>,
}

fn scenarios() -> Vec<Scenario> {
    vec![
        Scenario {
            name: "desktop, laptop, mini-PC on 1 GbE",
            devices: vec![(DESKTOP, GBE), (LAPTOP, GBE), (MINI_PC, GBE)],
        },
        Scenario {
            name: "desktop + mini-PC on 1 GbE, two laptops on Wi-Fi",
            devices: vec![
                (DESKTOP, GBE),
                (LAPTOP, WIFI),
                (LAPTOP_SMALL, WIFI),
                (MINI_PC, GBE),
            ],
        },
        Scenario {
            name: "whole home: + an old laptop on far Wi-Fi",
            devices: vec![
                (DESKTOP, GBE),
                (LAPTOP, WIFI),
                (LAPTOP_SMALL, WIFI),
                (MINI_PC, GBE),
                (OLD_LAPTOP, WIFI_FAR),
            ],
        },
    ]
}

fn scaled(t: PhaseTimes, decode: f64, compute: f64) -> PhaseTimes {
    PhaseTimes {
        decode_s: t.decode_s * decode,
        prefill_s_per_token: t.prefill_s_per_token * compute,
        train_forward_s_per_token: t.train_forward_s_per_token * compute,
        train_s_per_token: t.train_s_per_token * compute,
    }
}

/// A llama-shaped model's cost profile, Q4_1 weights (0.625 bytes each).
struct Shape {
    name: &'static str,
    layers: usize,
    hidden: u64,
    intermediate: u64,
    heads: u64,
    kv_heads: u64,
    vocab: u64,
}

const LLAMA_8B: Shape = Shape {
    name: "8B llama (Llama-3-8B shape), Q4_1",
    layers: 32,
    hidden: 4096,
    intermediate: 14336,
    heads: 32,
    kv_heads: 8,
    vocab: 128_256,
};
const LLAMA_70B: Shape = Shape {
    name: "70B llama (Llama-3-70B shape), Q4_1",
    layers: 80,
    hidden: 8192,
    intermediate: 28672,
    heads: 64,
    kv_heads: 8,
    vocab: 128_256,
};

impl Shape {
    /// The hyper-parameters, for the LoRA adapter size.
    fn config(&self) -> hearth_models::Config {
        hearth_models::Config {
            architecture: "llama".into(),
            vocab_size: self.vocab as usize,
            hidden_size: self.hidden as usize,
            intermediate_size: self.intermediate as usize,
            num_hidden_layers: self.layers,
            num_attention_heads: self.heads as usize,
            num_key_value_heads: self.kv_heads as usize,
            head_dim: (self.hidden / self.heads) as usize,
            rope_theta: 500_000.0,
            rms_norm_eps: 1e-5,
            max_position_embeddings: 8192,
            tie_word_embeddings: false,
            attention_bias: false,
            rope_scaling: None,
            sliding_window: None,
            sliding_layers: Vec::new(),
            hidden_act: Default::default(),
            query_pre_attn_scalar: None,
            attn_logit_softcap: None,
            final_logit_softcap: None,
            rope_local_theta: None,
            rotary_dim: None,
        }
    }

    fn profile(&self) -> ModelProfile {
        let h = self.hidden;
        let hd = h / self.heads;
        let kv = self.kv_heads * hd;
        let params = 2 * h * h + 2 * h * kv + 3 * h * self.intermediate;
        let q4 = |p: u64| p * 5 / 8;
        let layer = LayerCost {
            param_bytes: q4(params),
            flops_per_token: 2.0 * params as f64,
            act_bytes_per_token: 4 * h,
            kv_bytes_per_token: 2 * 4 * kv,
            train_act_bytes_per_token: 4 * (8 * h + 3 * kv + 4 * self.intermediate)
                + 2 * 4 * self.heads * 256,
        };
        let table = LayerCost {
            param_bytes: q4(h * self.vocab),
            flops_per_token: 2.0 * (h * self.vocab) as f64,
            act_bytes_per_token: 4 * h,
            kv_bytes_per_token: 0,
            train_act_bytes_per_token: 4 * (2 * h + self.vocab),
        };
        ModelProfile {
            name: self.name.into(),
            layers: vec![layer; self.layers],
            embed: LayerCost {
                flops_per_token: 0.0,
                ..table
            },
            head: table,
            tied_embeddings: false,
        }
    }
}

/// This machine's times for `model`, scaled from the measured model.
fn times_for(measured: &ModelInfo, model: &ModelProfile) -> (PhaseTimes, PhaseTimes, PhaseTimes) {
    let base = &measured.cost;
    let per = |m: &ModelProfile| {
        let l = &m.layers[0];
        (l.param_bytes as f64, l.flops_per_token)
    };
    let (b0, f0) = per(base);
    let (b1, f1) = per(model);
    let head = |m: &ModelProfile| (m.head.param_bytes as f64, m.head.flops_per_token);
    let (hb0, hf0) = head(base);
    let (hb1, hf1) = head(model);
    let t = &measured.times;
    (
        scaled(t.layer, b1 / b0, f1 / f0),
        scaled(
            t.embed,
            1.0,
            (model.layers[0].act_bytes_per_token as f64)
                / base.layers[0].act_bytes_per_token as f64,
        ),
        scaled(t.head, hb1 / hb0, hf1 / hf0),
    )
}

fn input(s: &Scenario, times: (PhaseTimes, PhaseTimes, PhaseTimes)) -> PlannerInput {
    let n = s.devices.len();
    let devices = s
        .devices
        .iter()
        .map(|(d, _)| DeviceProfile {
            name: d.name.into(),
            memory_budget: (d.budget_gb * 1e9) as u64,
            layer: scaled(times.0, 1.0 / d.speed, 1.0 / d.speed),
            embed: scaled(times.1, 1.0 / d.speed, 1.0 / d.speed),
            head: scaled(times.2, 1.0 / d.speed, 1.0 / d.speed),
        })
        .collect();
    let mut bandwidth = vec![vec![0.0; n]; n];
    let mut rtt = vec![vec![0.0; n]; n];
    for a in 0..n {
        for b in 0..n {
            if a != b {
                let (la, lb) = (s.devices[a].1, s.devices[b].1);
                bandwidth[a][b] = la.mbit.min(lb.mbit) * 1e6 / 8.0;
                rtt[a][b] = (la.rtt_ms + lb.rtt_ms) / 2.0 / 1e3;
            }
        }
    }
    PlannerInput {
        node_ids: s.devices.iter().map(|(d, _)| d.name.to_string()).collect(),
        devices,
        links: Links { bandwidth, rtt },
        excluded: Vec::new(),
        unmeasured_links: Vec::new(),
        figures: Vec::new(),
    }
}

#[derive(Serialize)]
struct Entry {
    scenario: String,
    model: String,
    workload: String,
    report: PlanReport,
}

fn cell(r: &PlanReport, i: Option<usize>) -> String {
    let p = match i {
        None => r.plan.as_ref(),
        Some(i) => r.alternatives.get(i).and_then(|a| a.plan.as_ref()),
    };
    let Some(p) = p else {
        return "does not fit".into();
    };
    let best = r.plan.as_ref().map_or(f64::NAN, |b| b.step_s);
    let t = if p.step_s >= 1.0 {
        format!("{:.2} s", p.step_s)
    } else {
        format!("{:.1} ms", p.step_s * 1e3)
    };
    match i {
        None if p.stages.len() == 1 => format!("{t} (1 stage)"),
        None => format!("{t} ({} stages)", p.stages.len()),
        Some(_) => format!("{t} ({:.2}×)", p.step_s / best),
    }
}

fn main() -> Result<()> {
    let args = Args::parse();
    let path = hearth_models::store::resolve(args.model.as_deref(), &mut |_| {})?;
    let weights = WeightFile::open(&path)?;
    let (measured, cached) = ModelInfo::measure(&weights, args.fresh, &mut |s| eprintln!("{s}"))?;
    let t = &measured.times;
    println!(
        "measured on {} ({} threads{}): layer decode {:.3} ms, prefill {:.3} ms/token, train {:.3} ms/token; head decode {:.3} ms",
        cpu_name(),
        t.threads,
        if cached { ", cached profile" } else { "" },
        t.layer.decode_s * 1e3,
        t.layer.prefill_s_per_token * 1e3,
        t.layer.train_s_per_token * 1e3,
        t.head.decode_s * 1e3
    );
    let models: Vec<(String, ModelProfile, u64)> = vec![
        (
            "SmolLM2-135M, Q4_1 (measured)".into(),
            measured.cost.clone(),
            lora_bytes_per_layer(&measured.config, 8),
        ),
        (
            LLAMA_8B.name.into(),
            LLAMA_8B.profile(),
            lora_bytes_per_layer(&LLAMA_8B.config(), 8),
        ),
        (
            LLAMA_70B.name.into(),
            LLAMA_70B.profile(),
            lora_bytes_per_layer(&LLAMA_70B.config(), 8),
        ),
    ];
    let workloads = |lora: u64| {
        vec![
            (
                "decode, 1 stream".to_string(),
                Workload::Decode {
                    sequences: 1,
                    context: 1024,
                },
            ),
            (
                "decode, 8 streams".to_string(),
                Workload::Decode {
                    sequences: 8,
                    context: 1024,
                },
            ),
            (
                "LoRA training, 1F1B, m=8 x 512 tokens".to_string(),
                Workload::Train {
                    micro_batch_tokens: 512,
                    micro_batches: 8,
                    schedule: Schedule::OneFOneB,
                    recompute: true,
                    method: Method::Lora {
                        adapter_bytes_per_layer: lora,
                    },
                    home: None,
                },
            ),
        ]
    };
    let mut entries = Vec::new();
    let mut md =
        String::from("## Planner vs the usual splits (predicted step time, same cost model)\n\n");
    md.push_str(&format!(
        "Device speeds: this machine's measured SmolLM2 profile ({}, {} threads: layer decode {:.3} ms, head decode {:.3} ms) scaled per device:\n\n",
        cpu_name(),
        t.threads,
        t.layer.decode_s * 1e3,
        t.head.decode_s * 1e3
    ));
    for d in [DESKTOP, LAPTOP, LAPTOP_SMALL, MINI_PC, OLD_LAPTOP] {
        md.push_str(&format!(
            "- {}: {} x this machine, {} GB budget ({})\n",
            d.name, d.speed, d.budget_gb, d.basis
        ));
    }
    md.push_str(&format!(
        "\nLinks: {} ({} Mbit/s, {} ms), {} ({} Mbit/s, {} ms), {} ({} Mbit/s, {} ms); a path runs at its slower end.\n",
        GBE.name, GBE.mbit, GBE.rtt_ms, WIFI.name, WIFI.mbit, WIFI.rtt_ms, WIFI_FAR.name, WIFI_FAR.mbit, WIFI_FAR.rtt_ms
    ));
    md.push_str("Bigger models: the measured layer time scaled by bytes (decode) and FLOPs (prefill, training). Ratios are each split's step time over the plan's (lower is better; the plan is optimal under the model, so ≥ 1).\n\n");
    md.push_str("| cluster | model | workload | Hearth plan | even | memory-prop. (exo) | FLOPS-prop. | best single device |\n|---|---|---|---|---|---|---|---|\n");
    for s in scenarios() {
        for (mname, model, lora) in &models {
            let times = times_for(&measured, model);
            for (wname, w) in workloads(*lora) {
                let report = plan_report(model, input(&s, times), w);
                md.push_str(&format!(
                    "| {} | {} | {} | {} | {} | {} | {} | {} |\n",
                    s.name,
                    mname,
                    wname,
                    cell(&report, None),
                    cell(&report, Some(0)),
                    cell(&report, Some(1)),
                    cell(&report, Some(2)),
                    cell(&report, Some(3)),
                ));
                if let Some(p) = &report.plan {
                    for e in &p.explanation {
                        eprintln!("  [{} / {mname} / {wname}] {e}", s.name);
                    }
                }
                entries.push(Entry {
                    scenario: s.name.into(),
                    model: mname.clone(),
                    workload: wname,
                    report,
                });
            }
        }
    }
    // One plan explained in full: the whole home on the 70B model.
    if let Some(e) = entries.iter().find(|e| {
        e.scenario.starts_with("whole home")
            && e.model.starts_with("70B")
            && e.workload == "decode, 1 stream"
    }) && let Some(p) = &e.report.plan
    {
        md.push_str(&format!(
            "\nThe planner's explanation for {} / {} / {}:\n\n",
            e.scenario, e.model, e.workload
        ));
        for line in &p.explanation {
            md.push_str(&format!("- {line}\n"));
        }
    }
    md.push_str("\nMeasured runs with nodes throttled to unequal CPU shares, and the prediction error, come with pipeline inference (issue #5).\n");
    println!("{md}");
    std::fs::create_dir_all(&args.out)?;
    std::fs::write(args.out.join("plan.md"), &md)?;
    let json = serde_json::json!({
        "title": "planner vs baselines",
        "machine": cpu_name(),
        "measured": measured.times,
        "devices": [DESKTOP, LAPTOP, LAPTOP_SMALL, MINI_PC, OLD_LAPTOP],
        "links": [GBE, WIFI, WIFI_FAR],
        "entries": entries,
    });
    std::fs::write(
        args.out.join("plan.json"),
        serde_json::to_string_pretty(&json).context("results")? + "\n",
    )?;
    Ok(())
}
