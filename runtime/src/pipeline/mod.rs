//! Pipeline inference: one model split by layers across the cluster.
//!
//! - The leader plans over the members that hold the model and sends each
//!   its stage ([`crate::placement`]); a node loads only its layer range and runs it
//!   on a [`worker`] thread that batches whatever is ready.
//! - A request enters at stage 0 ([`router`]), which embeds the prompt;
//!   hidden states go stage to stage over one ordered QUIC stream per pair
//!   of members ([`pipe`]); the last stage samples and sends the token back
//!   to stage 0, which feeds it in as the next step and streams it to the
//!   requester ([`client`]).
//! - Members outside the pipeline that hold the whole model serve as
//!   replicas: the requester sends a request to one of them instead when
//!   that adds to the total rate ([`balance`]).

pub(crate) mod balance;
pub(crate) mod client;
pub(crate) mod pipe;
pub(crate) mod router;
pub(crate) mod service;
pub(crate) mod worker;

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use hearth_models::{FinishReason, StageSpec};
use hearth_proto::Message;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

pub use crate::placement::{MAX_FIGURES, MAX_REASON, PlacedStage, Placement, PlacementPolicy};
pub use client::{GenEvent, GenStream, GenSummary, GenerateParams, Prompt, finish};

/// Most sequences stage 0 keeps in flight; more are refused as busy.
pub const MAX_IN_FLIGHT: usize = 256;
/// A sequence that gets no token for this long fails (a stage lost it).
pub const SEQ_TIMEOUT: Duration = Duration::from_secs(60);

/// Errors of pipeline inference.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PipelineError {
    #[error("no model is placed on the cluster yet (it is being fetched, measured or loaded)")]
    NotReady,
    #[error("the cluster is busy ({0} sequences in flight); try again shortly")]
    Busy(usize),
    #[error("invalid request: {0}")]
    BadRequest(String),
    #[error("the pipeline failed: {0}")]
    Failed(String),
    #[error("this node serves no model")]
    NoModel,
}

impl From<hearth_models::ModelError> for PipelineError {
    fn from(e: hearth_models::ModelError) -> Self {
        Self::BadRequest(e.to_string())
    }
}

/// Where results go: this node's stage 0 (in process) or a peer's pipe.
#[derive(Clone)]
pub(crate) enum Sink {
    Local(mpsc::UnboundedSender<router::RouterMsg>),
    Remote(mpsc::Sender<Message>),
}

impl Sink {
    /// Sends from a worker thread (blocking on a full pipe: backpressure).
    /// A closed route drops the message: the pipe's failure is reported
    /// to stage 0 separately.
    pub(crate) fn send(&self, msg: Message) {
        match self {
            Self::Local(tx) => {
                if let Message::Sampled { tokens, .. } = msg {
                    let _ = tx.send(router::RouterMsg::Sampled(tokens));
                }
            }
            Self::Remote(tx) => {
                let _ = tx.blocking_send(msg);
            }
        }
    }
}

/// Where a stage's time goes: compute (the forward) and handing the result
/// to the network (packing + queueing), summed over batches.
#[derive(Debug, Default)]
pub struct StageTimes {
    batches: AtomicU64,
    compute_ns: AtomicU64,
    send_ns: AtomicU64,
}

impl StageTimes {
    pub(crate) fn add(&self, compute: Duration, send: Duration) {
        self.batches.fetch_add(1, Ordering::Relaxed);
        self.compute_ns
            .fetch_add(compute.as_nanos() as u64, Ordering::Relaxed);
        self.send_ns
            .fetch_add(send.as_nanos() as u64, Ordering::Relaxed);
    }

    /// Batches run, seconds of compute, seconds packing and sending.
    pub fn snapshot(&self) -> (u64, f64, f64) {
        (
            self.batches.load(Ordering::Relaxed),
            self.compute_ns.load(Ordering::Relaxed) as f64 / 1e9,
            self.send_ns.load(Ordering::Relaxed) as f64 / 1e9,
        )
    }
}

/// Stage timings of this node, for the status API and benchmarks.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StageStats {
    pub placement: u64,
    pub index: usize,
    pub spec: StageSpec,
    pub batches: u64,
    pub compute_s: f64,
    pub send_s: f64,
    /// Sequences with state on this stage now.
    pub live_sequences: usize,
    /// LoRA adapters whose slices this stage holds, and their bytes.
    #[serde(default)]
    pub adapters: usize,
    #[serde(default)]
    pub adapter_bytes: u64,
}

/// Most bytes of logits one scored prompt takes on the last stage (every
/// position's row at once): 1 GiB.
const MAX_SCORE_LOGIT_BYTES: usize = 1 << 30;

/// The longest prompt a sequence may have scored on a model of `vocab`
/// logits: checked by the requester (a 400) and by the last stage (a peer's
/// request cannot make it allocate more).
pub(crate) fn scored_prompt_max(vocab: usize) -> usize {
    hearth_proto::limits::MAX_SCORED_PROMPT.min(MAX_SCORE_LOGIT_BYTES / (4 * vocab.max(1)))
}

pub(crate) fn to_seq_params(
    req: &client::GenerateParams,
    stop_ids: &[u32],
) -> hearth_proto::SeqParams {
    let sampling = &req.sampling;
    hearth_proto::SeqParams {
        temperature: sampling.temperature,
        top_p: sampling.top_p,
        top_k: sampling.top_k.min(u32::MAX as usize) as u32,
        seed: sampling.seed,
        max_tokens: req.max_tokens.min(u32::MAX as usize) as u32,
        stop_ids: stop_ids
            .iter()
            .copied()
            .take(hearth_proto::limits::MAX_STOP_IDS)
            .collect(),
        presence_penalty: req.shaping.presence_penalty,
        frequency_penalty: req.shaping.frequency_penalty,
        logit_bias: req.shaping.logit_bias.clone(),
        logprobs: req.logprobs,
        grammar: req.grammar.clone(),
        history: Vec::new(),
        score_prompt: Vec::new(),
        adapter: req.adapter.as_ref().map(|a| a.id.clone()),
    }
}

pub(crate) fn finish_reason(f: hearth_proto::Finish) -> Option<FinishReason> {
    match f {
        hearth_proto::Finish::Stop => Some(FinishReason::Stop),
        hearth_proto::Finish::Length => Some(FinishReason::Length),
        _ => None,
    }
}
