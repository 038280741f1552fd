//! A node's side of training jobs run elsewhere: a coordinator asks it
//! (over `CONTROL`) to load a layer range of the model it serves and run
//! that stage's worker; the stage ends when the coordinator says `End`,
//! asks `TrainEnd`, or leaves the cluster.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hearth_models::train::{AdamWConfig, Method, TrainOptions, TrainStage};
use hearth_models::{StageSpec, WeightFile};
use hearth_net::NodeId;
use serde::{Deserialize, Serialize};
use tracing::info;

use super::net::TrainNet;
use super::schedule::Schedule;
use super::worker::{StageHandle, StageSetup, spawn_stage};

/// Longest row a job may ask for.
pub const MAX_SEQ_LEN: usize = 8192;
/// Largest LoRA rank a job may ask for (over HTTP and in a stage order).
pub const MAX_LORA_RANK: usize = 1024;
/// Most training stages this node runs at once (for any coordinators).
pub const MAX_STAGES_HERE: usize = 4;
/// Most checkpoint bytes any stage order may announce; the stage itself
/// then bounds it by its own state's size.
pub const MAX_RESTORE: u64 = 64 << 30;

/// What a coordinator asks a node to run (a control document).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StageOrder {
    /// The wire id of this attempt of the job.
    pub job: u64,
    pub stage: u16,
    pub stages: u16,
    pub spec: StageSpec,
    /// The content id of the model file every stage must hold.
    pub content: String,
    pub method: Method,
    pub schedule: Schedule,
    pub micro_batches: u32,
    pub prev: Option<String>,
    pub next: Option<String>,
    pub tied: Option<String>,
    pub seed: u64,
    pub optim: AdamWConfig,
    pub timeout_s: u64,
    pub restore_len: u64,
    pub max_len: usize,
}

impl StageOrder {
    pub(crate) fn check(&self) -> Result<(), String> {
        if self.stages == 0 || self.stage >= self.stages {
            return Err(format!("stage {} of {}", self.stage, self.stages));
        }
        if self.micro_batches == 0 || self.micro_batches > 4096 {
            return Err(format!("{} micro-batches", self.micro_batches));
        }
        if self.max_len == 0 || self.max_len > MAX_SEQ_LEN {
            return Err(format!("rows of {} tokens", self.max_len));
        }
        if !(1..=86_400).contains(&self.timeout_s) {
            return Err(format!("a timeout of {} s", self.timeout_s));
        }
        if self.restore_len > MAX_RESTORE {
            return Err(format!("a checkpoint of {} bytes", self.restore_len));
        }
        check_method(&self.method)?;
        let o = &self.optim;
        let unit = |x: f64| x.is_finite() && (0.0..1.0).contains(&x);
        let sane = unit(o.beta1)
            && unit(o.beta2)
            && o.eps.is_finite()
            && o.eps > 0.0
            && o.weight_decay.is_finite()
            && o.weight_decay >= 0.0;
        if !sane {
            return Err(format!("optimizer settings {o:?}"));
        }
        if (self.prev.is_none()) != (self.stage == 0)
            || (self.next.is_none()) != (self.stage + 1 == self.stages)
        {
            return Err("neighbours do not match the stage's position".into());
        }
        Ok(())
    }
}

/// The same bounds on a method as a job over HTTP has.
pub(crate) fn check_method(method: &Method) -> Result<(), String> {
    if let Method::Lora(l) = method {
        let targets: std::collections::HashSet<_> = l.targets.iter().collect();
        if l.rank == 0
            || l.rank > MAX_LORA_RANK
            || l.targets.is_empty()
            || targets.len() != l.targets.len()
            || !l.alpha.is_finite()
            || !(l.dropout.is_finite() && (0.0..1.0).contains(&l.dropout))
            || !l.init_b_std.is_finite()
        {
            return Err(format!(
                "LoRA needs a rank in 1..={MAX_LORA_RANK}, distinct targets, a finite alpha and a dropout in [0, 1) (got rank {}, {} targets)",
                l.rank,
                l.targets.len()
            ));
        }
    }
    Ok(())
}

fn node(s: &str) -> Result<NodeId, String> {
    s.parse().map_err(|e| format!("bad node id {s}: {e}"))
}

struct Running {
    coordinator: NodeId,
    handle: StageHandle,
}

/// The training stages this node runs.
#[derive(Clone)]
pub struct TrainHost {
    net: TrainNet,
    /// By (job, stage): a node may run two stages of one job (the first
    /// and the last of a U-shaped pipeline).
    stages: Arc<Mutex<HashMap<(u64, u16), Running>>>,
}

impl TrainHost {
    pub fn new(net: TrainNet) -> Self {
        Self {
            net,
            stages: Arc::default(),
        }
    }

    /// How many training stages run here now.
    pub(crate) fn running(&self) -> usize {
        self.stages.lock().map_or(0, |s| s.len())
    }

    /// This node's training transport.
    pub fn net(&self) -> &TrainNet {
        &self.net
    }

    /// Loads `order`'s stage from `model` (the file this node serves, whose
    /// content id is `content`) and starts its worker; `from` is the
    /// coordinator.
    pub async fn start(
        &self,
        from: NodeId,
        order: StageOrder,
        model: std::path::PathBuf,
        content: String,
    ) -> Result<(), String> {
        order.check()?;
        if order.content != content {
            return Err(format!(
                "this node serves another model file ({} ≠ {})",
                short(&content),
                short(&order.content)
            ));
        }
        self.collect();
        match self.stages.lock().map(|s| {
            // A job's stages here all answer to one coordinator (a
            // member cannot add a stage to another's job).
            let taken = s.contains_key(&(order.job, order.stage))
                || s.iter()
                    .any(|(k, r)| k.0 == order.job && r.coordinator != from);
            (taken, s.len())
        }) {
            Ok((true, _)) | Err(_) => {
                return Err(format!(
                    "job {} already runs stage {} here, or answers to another coordinator",
                    order.job, order.stage
                ));
            }
            Ok((false, n)) if n >= MAX_STAGES_HERE => {
                return Err(format!(
                    "this node already runs {n} training stages (at most {MAX_STAGES_HERE})"
                ));
            }
            Ok(_) => {}
        }
        let setup = StageSetup {
            job: order.job,
            stage: order.stage,
            stages: order.stages,
            micro_batches: order.micro_batches,
            schedule: order.schedule,
            prev: order.prev.as_deref().map(node).transpose()?,
            next: order.next.as_deref().map(node).transpose()?,
            coordinator: from,
            tied: order.tied.as_deref().map(node).transpose()?,
            seed: order.seed,
            optim: order.optim.clone(),
            timeout: Duration::from_secs(order.timeout_s),
            keep_grads: false,
            restore: None,
            restore_len: order.restore_len,
            max_len: order.max_len,
        };
        let (spec, method, seed) = (order.spec, order.method.clone(), order.seed);
        let stage = tokio::task::spawn_blocking(move || {
            let w = WeightFile::open(&model).map_err(|e| e.to_string())?;
            TrainStage::load(
                &w,
                spec,
                &TrainOptions {
                    method,
                    dtype: candle_core::DType::F32,
                    seed,
                },
            )
            .map_err(|e| e.to_string())
        })
        .await
        .map_err(|e| e.to_string())??;
        let handle = spawn_stage(&self.net, stage, setup).map_err(|e| e.to_string())?;
        info!(
            job = order.job,
            stage = order.stage,
            layers = %format!("{}..{}", spec.start, spec.end),
            "training stage started"
        );
        if let Ok(mut s) = self.stages.lock() {
            s.insert(
                (order.job, order.stage),
                Running {
                    coordinator: from,
                    handle,
                },
            );
        }
        Ok(())
    }

    /// Stops job `job`'s stages here, if `from` is its coordinator.
    pub fn end(&self, from: NodeId, job: u64) {
        let gone: Vec<Running> = match self.stages.lock() {
            Ok(mut s) => {
                let keys: Vec<(u64, u16)> = s
                    .iter()
                    .filter(|(k, r)| k.0 == job && r.coordinator == from)
                    .map(|(k, _)| *k)
                    .collect();
                keys.iter().filter_map(|k| s.remove(k)).collect()
            }
            Err(_) => Vec::new(),
        };
        for r in gone {
            let _ = r.handle.stop();
        }
    }

    /// Stops the stages of jobs whose coordinator left.
    pub fn peer_lost(&self, node: NodeId) {
        let gone: Vec<Running> = match self.stages.lock() {
            Ok(mut s) => {
                let keys: Vec<(u64, u16)> = s
                    .iter()
                    .filter(|(_, r)| r.coordinator == node)
                    .map(|(k, _)| *k)
                    .collect();
                keys.iter().filter_map(|k| s.remove(k)).collect()
            }
            Err(_) => Vec::new(),
        };
        for r in gone {
            let _ = r.handle.stop();
        }
    }

    /// Jobs with a stage here.
    pub fn jobs(&self) -> Vec<u64> {
        self.collect();
        let mut jobs: Vec<u64> = self
            .stages
            .lock()
            .map(|s| s.keys().map(|k| k.0).collect())
            .unwrap_or_default();
        jobs.sort_unstable();
        jobs.dedup();
        jobs
    }

    /// Forgets stages whose worker ended.
    fn collect(&self) {
        let done: Vec<Running> = match self.stages.lock() {
            Ok(mut s) => {
                let keys: Vec<(u64, u16)> = s
                    .iter()
                    .filter(|(_, r)| r.handle.is_finished())
                    .map(|(k, _)| *k)
                    .collect();
                keys.iter().filter_map(|k| s.remove(k)).collect()
            }
            Err(_) => Vec::new(),
        };
        for r in done {
            let _ = r.handle.stop();
        }
    }
}

fn short(s: &str) -> &str {
    s.get(..12).unwrap_or(s)
}
