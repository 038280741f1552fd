//! Pure pipeline planning (no I/O, deterministic): given what each device
//! *measured*, the links between them, the model's per-layer costs and the
//! workload, choose an ordered set of stages (device, contiguous layer range)
//! minimising the step time
//!
//! ```text
//! T = Σ_k (t_k + c_k) + (m − 1) · max_k max(t_k, c_k)
//! ```
//!
//! (Alpa's form: `t_k` compute of stage k for one micro-batch, `c_k` its
//! outgoing transfer, `m` micro-batches or sequences in flight), subject to
//! each device's memory budget (weights, KV cache or in-flight activations,
//! optimizer state). A training workload may name the device that holds
//! the data: the plan is then U-shaped (that device runs the first stage
//! and a head-only last stage, and its time per micro-batch is both
//! stages'). The search is exact: a dynamic program over (layers
//! assigned, devices used, last device), as in PipeEdge, run for each
//! candidate bottleneck bound, so device order is chosen and devices may be
//! left out; the best single device is always a candidate.
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

mod baseline;
mod cost;
mod search;

use std::ops::Range;

pub use baseline::{Baseline, baseline};
pub use cost::MAX_DEVICES;
pub use cost::evaluate;
pub use search::{plan, plan_exhaustive};
use serde::{Deserialize, Serialize};

/// Costs of one decoder layer (or of the embedding / head).
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct LayerCost {
    /// Bytes of weights as the device holds them.
    pub param_bytes: u64,
    /// FLOPs per token (forward), for the FLOPS-proportional baseline.
    pub flops_per_token: f64,
    /// Bytes of the activation leaving this layer, per token (what crosses
    /// a stage boundary after it).
    pub act_bytes_per_token: u64,
    /// KV-cache bytes per token of context.
    pub kv_bytes_per_token: u64,
    /// Bytes of activations a training forward keeps per token for the
    /// backward pass (without recomputation).
    pub train_act_bytes_per_token: u64,
}

/// The model as the planner sees it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelProfile {
    pub name: String,
    pub layers: Vec<LayerCost>,
    pub embed: LayerCost,
    pub head: LayerCost,
    /// Embedding and LM head share one matrix (SmolLM2): a last stage on
    /// another device holds its own copy.
    pub tied_embeddings: bool,
}

/// Measured seconds of one piece of work, per phase.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct PhaseTimes {
    /// One decode step of one sequence (1 token).
    pub decode_s: f64,
    /// Prefill, per token (measured on a long prompt).
    pub prefill_s_per_token: f64,
    /// Training forward pass alone, per token (what recomputation repeats;
    /// the weight gradients of full fine-tuning cost about as much again).
    /// 0 when unknown: a third of `train_s_per_token` is assumed.
    #[serde(default)]
    pub train_forward_s_per_token: f64,
    /// Training forward + backward to the stage input (frozen weights, as
    /// under LoRA), per token.
    pub train_s_per_token: f64,
}

/// A device as measured by the profiler.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeviceProfile {
    pub name: String,
    /// Bytes the plan may use on this device (headroom already removed).
    pub memory_budget: u64,
    /// Time of one decoder layer (all layers of a llama-family model cost
    /// the same; a layer with other FLOPs is scaled by its FLOPs).
    pub layer: PhaseTimes,
    pub embed: PhaseTimes,
    pub head: PhaseTimes,
}

/// Measured links: `bandwidth[a][b]` in bytes/s, `rtt[a][b]` in seconds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Links {
    pub bandwidth: Vec<Vec<f64>>,
    pub rtt: Vec<Vec<f64>>,
}

/// The pipeline schedule for training.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Schedule {
    /// 1F1B (PipeDream-Flush): stage k holds min(m, p − k) micro-batches.
    OneFOneB,
    /// GPipe: every stage holds all m micro-batches.
    GPipe,
}

/// What is trained.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub enum Method {
    /// Every weight, with AdamW: weight + gradient + two moments.
    Full,
    /// LoRA adapters on a frozen base: adapter bytes per layer (their
    /// gradients and AdamW moments are counted too).
    Lora { adapter_bytes_per_layer: u64 },
}

/// What the plan is for.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub enum Workload {
    /// Decode with `sequences` in flight (1: single-stream latency; more:
    /// throughput) and `context` tokens of KV cache per sequence.
    Decode { sequences: u32, context: u32 },
    /// One prompt of `tokens`.
    Prefill { tokens: u32 },
    /// A training step of `micro_batches` micro-batches of
    /// `micro_batch_tokens` tokens.
    Train {
        micro_batch_tokens: u32,
        micro_batches: u32,
        schedule: Schedule,
        recompute: bool,
        method: Method,
        /// The device that holds the training data, when token ids and
        /// labels must not leave it: it runs the first stage (embedding
        /// and any layers the plan gives it) and a last stage of its own
        /// (final norm, LM head and loss): a U-shaped pipeline. Other
        /// devices see only activations and gradients.
        #[serde(default)]
        home: Option<usize>,
    },
}

impl Workload {
    /// `m` in the objective.
    pub fn in_flight(&self) -> u32 {
        match *self {
            Self::Decode { sequences, .. } => sequences.max(1),
            Self::Prefill { .. } => 1,
            Self::Train { micro_batches, .. } => micro_batches.max(1),
        }
    }
}

/// One stage of a plan.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Stage {
    /// Index into the device list.
    pub device: usize,
    pub device_name: String,
    pub layers: Range<usize>,
    pub embed: bool,
    pub head: bool,
    /// `t_k`: compute time for one micro-batch (seconds).
    pub compute_s: f64,
    /// `c_k`: outgoing transfer per micro-batch (seconds; for the last
    /// stage of a decode loop, the sampled token back to the first).
    pub transfer_s: f64,
    /// Predicted peak memory on the device (bytes).
    pub memory_bytes: u64,
}

/// Whether the bottleneck is a stage's compute or its outgoing link.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum BottleneckKind {
    Compute,
    Transfer,
}

/// A plan and what it predicts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    pub stages: Vec<Stage>,
    /// `T`: seconds per step (decode: one token for each of m sequences).
    pub step_s: f64,
    /// Stage index and kind of the largest `max(t_k, c_k)`.
    pub bottleneck: (usize, BottleneckKind),
    /// Tokens per second the plan predicts (decode: generated tokens over
    /// all sequences; prefill: prompt tokens; training: trained tokens).
    pub tokens_per_s: f64,
    /// Why each device got what it got, and why any was left out.
    pub explanation: Vec<String>,
}

/// Invalid input (the only way planning fails, besides "does not fit").
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PlanError {
    #[error("the model has no layers")]
    NoLayers,
    #[error("no devices")]
    NoDevices,
    #[error("the link matrix is {rows}×{cols}, expected {devices}×{devices}")]
    LinkShape {
        rows: usize,
        cols: usize,
        devices: usize,
    },
    #[error("invalid measurement for {what}: {value} (must be finite and non-negative)")]
    BadMeasurement { what: String, value: f64 },
    #[error("invalid workload: {0}")]
    BadWorkload(String),
    #[error("the model does not fit: {0}")]
    DoesNotFit(String),
    #[error("invalid assignment: {0}")]
    BadAssignment(String),
}
