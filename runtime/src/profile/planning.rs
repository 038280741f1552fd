//! Turns the cluster's profiles into the planner's input: one device per
//! node that measured the model, and the link matrix from their probes.

use hearth_models::Config;
use hearth_partitioner::{
    Baseline, DeviceProfile, Links, Method, ModelProfile, Plan, PlanError, Schedule, Workload,
    baseline, evaluate,
};
use serde::{Deserialize, Serialize};

use super::{ClusterProfiles, ModelTimes};

/// Bandwidth assumed for a link nobody has measured yet (100 Mbit/s, a
/// slow home link: an unmeasured link should not attract layers).
const UNMEASURED_BANDWIDTH: f64 = 100e6 / 8.0;
/// Round trip assumed for an unmeasured link.
const UNMEASURED_RTT_S: f64 = 5e-3;

/// What the planner is given, and what was left out.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PlannerInput {
    /// Node ids (hex) in device order.
    pub node_ids: Vec<String>,
    pub devices: Vec<DeviceProfile>,
    pub links: Links,
    /// Nodes that cannot take part, and why.
    pub excluded: Vec<String>,
    /// Device pairs whose link was not measured yet (both directions
    /// unknown), so the defaults above stand in.
    pub unmeasured_links: Vec<(usize, usize)>,
    /// Where each device's figures came from (in device order).
    #[serde(default)]
    pub figures: Vec<DeviceFigures>,
}

/// The figures the planner used for one device, for people to read.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeviceFigures {
    pub node_id: String,
    pub name: String,
    /// Cores' worth of CPU time offered now, if known.
    pub cores: Option<f64>,
    /// Current ÷ start-up time.
    pub factor: f64,
    pub source: super::FigureSource,
    /// One decoder layer's decode step, as used (seconds).
    pub layer_decode_s: f64,
}

/// The planner's devices and links for `model` (the nodes that measured
/// the same model and, where known, hold byte-identical weights).
pub fn planner_input(profiles: &ClusterProfiles, model: &ModelTimes) -> PlannerInput {
    let mut node_ids = Vec::new();
    let mut devices = Vec::new();
    let mut excluded = Vec::new();
    let mut used = Vec::new();
    let mut figures = Vec::new();
    for p in &profiles.nodes {
        let Some(current) = p.current() else {
            excluded.push(format!("{}: has not measured a model", p.name));
            continue;
        };
        let times = &current.times;
        if times.fingerprint != model.fingerprint {
            excluded.push(format!(
                "{}: measured another model ({})",
                p.name, times.model
            ));
            continue;
        }
        if let (Some(a), Some(b)) = (&times.content, &model.content)
            && a != b
        {
            excluded.push(format!(
                "{}: its copy of {} has other weights (content {a}, expected {b})",
                p.name, times.model
            ));
            continue;
        }
        let short = p.node_id.get(..8).unwrap_or(&p.node_id);
        let dup = profiles.nodes.iter().filter(|q| q.name == p.name).count() > 1;
        let name = if dup {
            format!("{} ({short})", p.name)
        } else {
            p.name.clone()
        };
        figures.push(DeviceFigures {
            node_id: p.node_id.clone(),
            name: name.clone(),
            cores: current.cores,
            factor: current.factor,
            source: current.source,
            layer_decode_s: times.layer.decode_s,
        });
        devices.push(DeviceProfile {
            name,
            memory_budget: p.memory_budget,
            layer: times.layer,
            embed: times.embed,
            head: times.head,
        });
        node_ids.push(p.node_id.clone());
        used.push(p);
    }
    let n = used.len();
    let mut bandwidth = vec![vec![0.0; n]; n];
    let mut rtt = vec![vec![0.0; n]; n];
    let mut unmeasured_links = Vec::new();
    let measured = |a: usize, b: usize| {
        used[a]
            .links
            .iter()
            .find(|l| l.peer == used[b].node_id)
            .filter(|l| l.bandwidth_bytes_per_s > 0.0 && l.bandwidth_bytes_per_s.is_finite())
    };
    for a in 0..n {
        for b in 0..n {
            if a == b {
                continue; // never read: a device does not send to itself
            }
            // A link measured in one direction stands for both.
            match measured(a, b).or_else(|| measured(b, a)) {
                Some(l) => {
                    bandwidth[a][b] = l.bandwidth_bytes_per_s;
                    rtt[a][b] = (l.rtt_ms / 1e3).max(0.0);
                }
                None => {
                    bandwidth[a][b] = UNMEASURED_BANDWIDTH;
                    rtt[a][b] = UNMEASURED_RTT_S;
                    if a < b {
                        unmeasured_links.push((a, b));
                    }
                }
            }
        }
    }
    PlannerInput {
        node_ids,
        devices,
        links: Links { bandwidth, rtt },
        excluded,
        unmeasured_links,
        figures,
    }
}

/// What to plan for, as the CLI's flags and the HTTP API's query name it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct PlanRequest {
    /// "inference" or "training".
    pub workload: String,
    /// Inference: sequences decoded at once (1: single-stream latency).
    pub sequences: u32,
    /// Inference: tokens of context each sequence keeps in its KV cache.
    pub context: u32,
    /// Inference: plan for one prompt of this many tokens instead (0: decode).
    pub prefill: u32,
    /// Training: tokens per micro-batch.
    pub micro_batch_tokens: u32,
    /// Training: micro-batches per step (`m`).
    pub micro_batches: u32,
    /// Training: "1f1b" or "gpipe".
    pub schedule: String,
    /// Training: keep only each stage's input and recompute in backward.
    pub recompute: bool,
    /// Training: "lora" or "full".
    pub method: String,
    /// Training: LoRA rank (adapters on every linear layer).
    pub lora_rank: u32,
    /// Training: the answering node holds the data, and runs the
    /// embedding and the head with the loss (a U-shaped pipeline whose
    /// first and last stages are that node), as a job keeps its data home.
    pub keep_data_home: bool,
}

impl Default for PlanRequest {
    fn default() -> Self {
        Self {
            workload: "inference".into(),
            sequences: 1,
            context: 512,
            prefill: 0,
            micro_batch_tokens: 512,
            micro_batches: 8,
            schedule: "1f1b".into(),
            recompute: true,
            method: "lora".into(),
            lora_rank: 8,
            keep_data_home: false,
        }
    }
}

impl PlanRequest {
    /// The partitioner's workload for a model with `cfg`.
    pub fn workload(&self, cfg: &Config) -> Result<Workload, String> {
        match self.workload.as_str() {
            "inference" if self.prefill > 0 => Ok(Workload::Prefill {
                tokens: self.prefill,
            }),
            "inference" => Ok(Workload::Decode {
                sequences: self.sequences,
                context: self.context,
            }),
            "training" => {
                let schedule = match self.schedule.to_ascii_lowercase().as_str() {
                    "1f1b" => Schedule::OneFOneB,
                    "gpipe" => Schedule::GPipe,
                    other => return Err(format!("unknown schedule {other:?} (1f1b or gpipe)")),
                };
                let method = match self.method.as_str() {
                    "full" => Method::Full,
                    "lora" => Method::Lora {
                        adapter_bytes_per_layer: lora_bytes_per_layer(cfg, self.lora_rank),
                    },
                    other => return Err(format!("unknown method {other:?} (lora or full)")),
                };
                Ok(Workload::Train {
                    micro_batch_tokens: self.micro_batch_tokens,
                    micro_batches: self.micro_batches,
                    schedule,
                    recompute: self.recompute,
                    method,
                    home: None,
                })
            }
            other => Err(format!(
                "unknown workload {other:?} (inference or training)"
            )),
        }
    }
}

/// f32 bytes of rank-`r` LoRA adapters (A: r×in, B: out×r) on every
/// linear layer of one decoder layer.
pub fn lora_bytes_per_layer(cfg: &Config, rank: u32) -> u64 {
    let h = cfg.hidden_size as u64;
    let i = cfg.intermediate_size as u64;
    let q = (cfg.num_attention_heads * cfg.head_dim) as u64;
    let kv = (cfg.num_key_value_heads * cfg.head_dim) as u64;
    let io = [(h, q), (h, kv), (h, kv), (q, h), (h, i), (h, i), (i, h)];
    io.iter().map(|(a, b)| a + b).sum::<u64>() * u64::from(rank) * 4
}

/// One comparison plan.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Alternative {
    pub name: String,
    /// The plan, if it fits.
    pub plan: Option<Plan>,
    /// Why it does not fit (or could not be evaluated).
    pub error: Option<String>,
}

/// A plan, its inputs and what the usual splits would do instead.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PlanReport {
    pub model: String,
    pub workload: Workload,
    pub input: PlannerInput,
    /// The planner's choice, if the model fits at all.
    pub plan: Option<Plan>,
    /// Why there is no plan.
    pub error: Option<String>,
    /// Even split, memory-proportional (exo), FLOPS-proportional, and the
    /// best single device, under the same cost model.
    pub alternatives: Vec<Alternative>,
}

/// Plans `model` over `input` and evaluates the baselines beside it.
pub fn plan_report(model: &ModelProfile, input: PlannerInput, workload: Workload) -> PlanReport {
    let outcome = |r: Result<Plan, PlanError>| match r {
        Ok(p) => (Some(p), None),
        Err(e) => (None, Some(e.to_string())),
    };
    let (plan, error) = outcome(hearth_partitioner::plan(
        model,
        &input.devices,
        &input.links,
        workload,
    ));
    let mut alternatives = Vec::new();
    for (name, kind) in [
        ("even split", Baseline::Even),
        ("memory-proportional (exo)", Baseline::MemoryProportional),
        ("FLOPS-proportional", Baseline::FlopsProportional),
    ] {
        let (plan, error) = outcome(baseline(
            kind,
            model,
            &input.devices,
            &input.links,
            workload,
        ));
        alternatives.push(Alternative {
            name: name.into(),
            plan,
            error,
        });
    }
    // The best single device (what a user without a cluster gets).
    let l = model.layers.len();
    let single = (0..input.devices.len())
        .filter_map(|d| evaluate(model, &input.devices, &input.links, workload, &[(d, 0..l)]).ok())
        .min_by(|a, b| a.step_s.total_cmp(&b.step_s));
    alternatives.push(Alternative {
        name: "best single device".into(),
        error: single
            .is_none()
            .then(|| "the model fits on no single device".to_string()),
        plan: single,
    });
    PlanReport {
        model: model.name.clone(),
        workload,
        input,
        plan,
        error,
        alternatives,
    }
}
