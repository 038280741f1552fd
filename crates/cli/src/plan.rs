//! `hearth plan`: the partitioner's plan for the running cluster (from
//! its measured profiles) or for a cluster described in a TOML file.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use hearth_models::{WeightFile, store};
use hearth_partitioner::{BottleneckKind, DeviceProfile, Links, PhaseTimes, Plan, Workload};
use hearth_runtime::profile::{PlanReport, PlanRequest, PlannerInput, model_cost, plan_report};
use serde::Deserialize;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Plan for the cluster of the node answering at this HTTP address.
    #[arg(long, value_name = "ADDR", conflicts_with = "devices")]
    http: Option<String>,
    /// Plan for a hypothetical cluster described in this TOML file (see
    /// the README for its format).
    #[arg(long, value_name = "FILE")]
    devices: Option<PathBuf>,
    /// With --devices: the model (default: the file's `model`, else the
    /// default model).
    #[arg(long)]
    model: Option<String>,
    /// inference or training.
    #[arg(long, default_value = "inference")]
    workload: String,
    /// Inference: sequences decoded at once (1: single-stream latency).
    #[arg(long, default_value_t = 1)]
    sequences: u32,
    /// Inference: context tokens per sequence (KV cache).
    #[arg(long, default_value_t = 512)]
    context: u32,
    /// Inference: plan for one prompt of this many tokens instead of decode.
    #[arg(long, default_value_t = 0)]
    prefill: u32,
    /// Training: tokens per micro-batch.
    #[arg(long, default_value_t = 512)]
    micro_batch_tokens: u32,
    /// Training: micro-batches per step.
    #[arg(long, default_value_t = 8)]
    micro_batches: u32,
    /// Training: 1f1b or gpipe.
    #[arg(long, default_value = "1f1b")]
    schedule: String,
    /// Training: keep every activation instead of recomputing in backward.
    #[arg(long)]
    no_recompute: bool,
    /// Training: lora or full.
    #[arg(long, default_value = "lora")]
    method: String,
    /// Training: LoRA rank.
    #[arg(long, default_value_t = 8)]
    lora_rank: u32,
    /// Training: the answering node holds the data and runs the embedding
    /// and the head (U-shaped), as a job does by default.
    #[arg(long)]
    keep_data_home: bool,
    /// Print the whole report as JSON.
    #[arg(long)]
    json: bool,
}

impl Args {
    fn request(&self) -> PlanRequest {
        PlanRequest {
            workload: self.workload.clone(),
            sequences: self.sequences,
            context: self.context,
            prefill: self.prefill,
            micro_batch_tokens: self.micro_batch_tokens,
            micro_batches: self.micro_batches,
            schedule: self.schedule.clone(),
            recompute: !self.no_recompute,
            method: self.method.clone(),
            lora_rank: self.lora_rank,
            keep_data_home: self.keep_data_home,
        }
    }
}

pub fn run(args: Args) -> Result<()> {
    if args.keep_data_home && args.devices.is_some() {
        bail!("--keep-data-home plans around the node that answers (--http), not a --devices file");
    }
    let report = match &args.devices {
        Some(file) => from_file(file, &args)?,
        None => from_node(
            args.http.as_deref().unwrap_or(crate::cluster::DEFAULT_HTTP),
            &args.request(),
        )?,
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", render(&report));
    }
    if report.plan.is_none() {
        std::process::exit(2);
    }
    Ok(())
}

fn from_node(http: &str, req: &PlanRequest) -> Result<PlanReport> {
    let base = crate::cluster::base_url(http);
    let url = format!("{base}/api/plan");
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(15)))
        .http_status_as_error(false)
        .build()
        .into();
    let mut resp = agent
        .get(&url)
        .query("workload", &req.workload)
        .query("sequences", req.sequences.to_string())
        .query("context", req.context.to_string())
        .query("prefill", req.prefill.to_string())
        .query("micro_batch_tokens", req.micro_batch_tokens.to_string())
        .query("micro_batches", req.micro_batches.to_string())
        .query("schedule", &req.schedule)
        .query("recompute", req.recompute.to_string())
        .query("method", &req.method)
        .query("lora_rank", req.lora_rank.to_string())
        .query("keep_data_home", req.keep_data_home.to_string())
        .call()
        .with_context(|| format!("no Hearth node answers at {base} (is `hearth up` running?)"))?;
    let status = resp.status();
    let body: serde_json::Value = resp
        .body_mut()
        .read_json()
        .with_context(|| format!("{url} did not return JSON"))?;
    if !status.is_success() {
        let msg = body["error"]["message"].as_str().unwrap_or("unknown error");
        bail!("{url}: {msg}");
    }
    serde_json::from_value(body).with_context(|| format!("{url} did not return a plan report"))
}

/// A hypothetical cluster.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ClusterFile {
    /// A .gguf path or the default model's name.
    model: Option<String>,
    #[serde(default)]
    defaults: LinkDefaults,
    #[serde(rename = "device")]
    devices: Vec<DeviceEntry>,
    #[serde(default, rename = "link")]
    links: Vec<LinkEntry>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DeviceEntry {
    name: String,
    /// Memory the plan may use on it, GB (10^9 bytes).
    memory_gb: f64,
    /// Speed relative to this machine's measured profile (2.0: twice as fast).
    speed: Option<f64>,
    /// Measured times (the `model` part of `hearth profile --json` on it).
    times: Option<Times>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Times {
    layer: PhaseTimes,
    embed: PhaseTimes,
    head: PhaseTimes,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct LinkEntry {
    between: [String; 2],
    bandwidth_mbit: f64,
    rtt_ms: f64,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct LinkDefaults {
    bandwidth_mbit: f64,
    rtt_ms: f64,
}

impl Default for LinkDefaults {
    fn default() -> Self {
        // Gigabit Ethernet.
        Self {
            bandwidth_mbit: 940.0,
            rtt_ms: 0.5,
        }
    }
}

fn scaled(t: PhaseTimes, speed: f64) -> PhaseTimes {
    PhaseTimes {
        decode_s: t.decode_s / speed,
        prefill_s_per_token: t.prefill_s_per_token / speed,
        train_forward_s_per_token: t.train_forward_s_per_token / speed,
        train_s_per_token: t.train_s_per_token / speed,
    }
}

fn from_file(path: &std::path::Path, args: &Args) -> Result<PlanReport> {
    let text = std::fs::read_to_string(path).with_context(|| format!("{}", path.display()))?;
    let file: ClusterFile = toml::from_str(&text)
        .with_context(|| format!("{} is not a valid cluster file", path.display()))?;
    if file.devices.is_empty() {
        bail!("{}: no [[device]] entries", path.display());
    }
    for d in &file.devices {
        if !(d.memory_gb.is_finite() && d.memory_gb >= 0.0) {
            bail!(
                "device {:?}: memory_gb must be a non-negative number",
                d.name
            );
        }
        match (&d.times, d.speed) {
            (Some(_), None) => {}
            (None, Some(s)) if s.is_finite() && s > 0.0 => {}
            (Some(_), Some(_)) => bail!("device {:?}: give speed or times, not both", d.name),
            _ => bail!(
                "device {:?}: needs speed (> 0, relative to this machine) or times",
                d.name
            ),
        }
    }
    let model = args.model.clone().or(file.model.clone());
    let model_path = store::resolve(model.as_deref(), &mut crate::models::progress_printer())?;
    let weights = WeightFile::open(&model_path)?;
    let cost = model_cost(&weights);
    // Relative speeds need this machine's own measurement.
    let here = if file.devices.iter().any(|d| d.times.is_none()) {
        Some(
            crate::profile::measure_model(
                &hearth_models::dirs::Dirs::resolve(None),
                Some(&model_path.to_string_lossy()),
                false,
                &hearth_runtime::Compute::Cpu,
            )?
            .0,
        )
    } else {
        None
    };
    let mut devices = Vec::new();
    for d in &file.devices {
        let (layer, embed, head) = match (&d.times, d.speed, &here) {
            (Some(t), _, _) => (t.layer, t.embed, t.head),
            (None, Some(s), Some(h)) => (
                scaled(h.times.layer, s),
                scaled(h.times.embed, s),
                scaled(h.times.head, s),
            ),
            _ => bail!("device {:?}: needs speed or times", d.name),
        };
        devices.push(DeviceProfile {
            name: d.name.clone(),
            memory_budget: (d.memory_gb * 1e9) as u64,
            layer,
            embed,
            head,
        });
    }
    let n = devices.len();
    let index = |name: &str| {
        devices
            .iter()
            .position(|d| d.name == name)
            .with_context(|| format!("link names unknown device {name:?}"))
    };
    let mut bandwidth = vec![vec![file.defaults.bandwidth_mbit * 1e6 / 8.0; n]; n];
    let mut rtt = vec![vec![file.defaults.rtt_ms / 1e3; n]; n];
    let mut listed = vec![vec![false; n]; n];
    for l in &file.links {
        let (a, b) = (index(&l.between[0])?, index(&l.between[1])?);
        for (x, y) in [(a, b), (b, a)] {
            bandwidth[x][y] = l.bandwidth_mbit * 1e6 / 8.0;
            rtt[x][y] = l.rtt_ms / 1e3;
            listed[x][y] = true;
        }
    }
    for (a, row) in bandwidth.iter_mut().enumerate() {
        row[a] = 0.0;
        rtt[a][a] = 0.0;
    }
    let unmeasured_links = (0..n)
        .flat_map(|a| (a + 1..n).map(move |b| (a, b)))
        .filter(|&(a, b)| !listed[a][b])
        .collect();
    let input = PlannerInput {
        node_ids: devices.iter().map(|d| d.name.clone()).collect(),
        devices,
        links: Links { bandwidth, rtt },
        excluded: Vec::new(),
        unmeasured_links,
        figures: Vec::new(),
    };
    let workload = args
        .request()
        .workload(weights.config())
        .map_err(anyhow::Error::msg)?;
    Ok(plan_report(&cost, input, workload))
}

fn describe(w: &Workload) -> String {
    match *w {
        Workload::Decode {
            sequences: 1,
            context,
        } => {
            format!("single-stream decode, {context} tokens of context")
        }
        Workload::Decode { sequences, context } => {
            format!(
                "decode throughput, {sequences} sequences in flight, {context} tokens of context"
            )
        }
        Workload::Prefill { tokens } => format!("prefill of a {tokens}-token prompt"),
        Workload::Train {
            micro_batch_tokens,
            micro_batches,
            schedule,
            recompute,
            method,
            home,
        } => format!(
            "training step: {micro_batches} micro-batches of {micro_batch_tokens} tokens, {schedule:?}{}, {}{}",
            if recompute { " with recomputation" } else { "" },
            match method {
                hearth_partitioner::Method::Full => "full fine-tuning".to_string(),
                hearth_partitioner::Method::Lora { .. } => "LoRA".to_string(),
            },
            match home {
                Some(d) => format!(", U-shaped: the data stays on device {d}"),
                None => String::new(),
            }
        ),
    }
}

fn ms(s: f64) -> String {
    if s >= 1.0 {
        format!("{s:.2} s")
    } else {
        format!("{:.2} ms", s * 1e3)
    }
}

fn mb(b: u64) -> String {
    format!("{:.0} MB", b as f64 / 1e6)
}

fn render(r: &PlanReport) -> String {
    let mut out = String::new();
    let mut line = |s: String| {
        out.push_str(&s);
        out.push('\n');
    };
    line(format!("model     {}", r.model));
    line(format!("workload  {}", describe(&r.workload)));
    line(format!("devices   {}", r.input.devices.len()));
    for e in &r.input.excluded {
        line(format!("  left out {e}"));
    }
    for &(a, b) in &r.input.unmeasured_links {
        let name = |i: usize| r.input.devices.get(i).map_or("?", |d| d.name.as_str());
        line(format!(
            "  link {} <-> {} not measured: assumed {:.0} Mbit/s, {:.1} ms",
            name(a),
            name(b),
            r.input.links.bandwidth[a][b] * 8.0 / 1e6,
            r.input.links.rtt[a][b] * 1e3
        ));
    }
    let Some(plan) = &r.plan else {
        line(format!(
            "\nno plan: {}",
            r.error.as_deref().unwrap_or("unknown")
        ));
        return out;
    };
    line(String::new());
    line(format!(
        "{:<6} {:<22} {:<10} {:<11} {:>10} {:>10} {:>9}",
        "stage", "device", "layers", "", "compute", "transfer", "memory"
    ));
    for (k, s) in plan.stages.iter().enumerate() {
        let ends = match (s.embed, s.head) {
            (true, true) => "embed+head",
            (true, false) => "embed",
            (false, true) => "head",
            _ => "",
        };
        line(format!(
            "{:<6} {:<22} {:<10} {:<11} {:>10} {:>10} {:>9}",
            k,
            s.device_name,
            format!("{}..{}", s.layers.start, s.layers.end),
            ends,
            ms(s.compute_s),
            ms(s.transfer_s),
            mb(s.memory_bytes)
        ));
    }
    let (k, kind) = plan.bottleneck;
    line(format!(
        "\npredicted {} per step, {:.1} tokens/s; bottleneck: stage {k} {}",
        ms(plan.step_s),
        plan.tokens_per_s,
        match kind {
            BottleneckKind::Compute => "compute",
            BottleneckKind::Transfer => "transfer",
        }
    ));
    line("why:".into());
    for e in &plan.explanation {
        line(format!("  - {e}"));
    }
    line("\ncompared under the same cost model:".into());
    let row = |name: &str, p: Option<&Plan>, err: Option<&str>| match p {
        Some(p) => format!(
            "  {:<28} {:>10} {:>9.1} tok/s {:>6.2}× the plan's time",
            name,
            ms(p.step_s),
            p.tokens_per_s,
            p.step_s / plan.step_s
        ),
        None => format!("  {:<28} does not fit: {}", name, err.unwrap_or("?")),
    };
    line(row("this plan", Some(plan), None));
    for a in &r.alternatives {
        line(row(&a.name, a.plan.as_ref(), a.error.as_deref()));
    }
    out
}
