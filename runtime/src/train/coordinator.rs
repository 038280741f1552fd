//! The job's coordinator: feeds each step's micro-batches to the first
//! stage (tokens) and the last (labels) — in a U-shaped pipeline both on
//! the coordinator's own node, so neither leaves it — gathers the stages' reports,
//! reduces the global gradient norm, and sends the verdict (learning rate,
//! clipping factor, apply or skip, checkpoint or not). A stage that fails
//! or goes silent fails the step before any optimizer step is applied
//! anywhere it was not already.

use std::time::Duration;

use hearth_models::train::MicroBatch;
use hearth_models::train::optim::clip_factor;
use hearth_net::NodeId;
use hearth_proto::{MicroKey, MicroLayout, TrainMsg};
use tokio::sync::mpsc;

use super::TrainError;
use super::net::{CoordRoute, TrainNet};

/// What one step did.
#[derive(Debug, Clone)]
pub struct StepOutcome {
    pub step: u64,
    /// Mean cross-entropy per target token.
    pub loss: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    pub lr: f64,
    /// Whether the optimizer step was applied (false: non-finite gradients).
    pub applied: bool,
    pub targets: u64,
    /// Token slots processed (padding included).
    pub tokens: u64,
    /// Each stage's state (safetensors bytes) when a checkpoint was asked.
    pub states: Vec<Vec<u8>>,
    /// Each stage's compute time in the step.
    pub busy_s: Vec<f64>,
    /// Wall time from the first micro-batch sent to the last report: the
    /// forward/backward schedule, against which stages' utilization is read.
    pub wall_s: f64,
    /// The whole step: the schedule, then every stage's optimizer update
    /// acknowledged (not the checkpoint state that may follow). What a
    /// PyTorch user's step time measures.
    pub step_s: f64,
}

/// Drives a job's steps over placed stage workers.
#[derive(Debug)]
pub struct Coordinator {
    net: TrainNet,
    job: u64,
    stages: Vec<NodeId>,
    rx: mpsc::UnboundedReceiver<(NodeId, TrainMsg)>,
    timeout: Duration,
    /// Most bytes a stage's state may announce.
    max_state: u64,
}

impl Coordinator {
    /// Registers as job `job`'s coordinator on this node; `stages` are the
    /// nodes of stages 0..p in order.
    pub fn new(net: &TrainNet, job: u64, stages: Vec<NodeId>, timeout: Duration) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        net.add_coordinator(
            job,
            CoordRoute {
                stages: stages.clone(),
                tx,
            },
        );
        Self {
            net: net.clone(),
            job,
            stages,
            rx,
            timeout,
            max_state: super::host::MAX_RESTORE,
        }
    }

    /// Bounds each stage's state to `bytes` (see `max_state`).
    pub fn with_max_state(mut self, bytes: u64) -> Self {
        self.max_state = bytes.min(super::host::MAX_RESTORE);
        self
    }

    async fn next(&mut self, what: &str) -> Result<(NodeId, TrainMsg), TrainError> {
        match tokio::time::timeout(self.timeout, self.rx.recv()).await {
            Ok(Some((from, TrainMsg::Failed { stage, reason, .. }))) => {
                Err(TrainError::StageFailed {
                    stage,
                    node: from.short(),
                    reason,
                })
            }
            Ok(Some(m)) => Ok(m),
            Ok(None) => Err(TrainError::Stopped),
            Err(_) => Err(TrainError::Timeout(format!(
                "waited {:?} for {what}",
                self.timeout
            ))),
        }
    }

    /// Runs optimizer step `step` over `batches` (one per micro-batch).
    pub async fn step(
        &mut self,
        step: u64,
        batches: &[MicroBatch],
        lr: f64,
        max_grad_norm: f64,
        save: bool,
    ) -> Result<StepOutcome, TrainError> {
        let p = self.stages.len();
        let (first, last) = match (self.stages.first(), self.stages.last()) {
            (Some(f), Some(l)) => (*f, *l),
            _ => return Err(TrainError::Protocol("a job without stages".into())),
        };
        let started = std::time::Instant::now();
        let step_targets: u64 = batches.iter().map(|b| b.targets() as u64).sum();
        let tokens: u64 = batches.iter().map(|b| b.tokens.len() as u64).sum();
        for (i, b) in batches.iter().enumerate() {
            let key = |stage: usize| MicroKey {
                job: self.job,
                step,
                micro: i as u32,
                stage: stage as u16,
            };
            self.net
                .send(
                    first,
                    TrainMsg::Tokens {
                        key: key(0),
                        layout: MicroLayout {
                            rows: b.layout.rows as u32,
                            len: b.layout.len as u32,
                            segments: b.layout.segments.clone(),
                        },
                        tokens: b.tokens.clone(),
                    },
                )
                .await?;
            self.net
                .send(
                    last,
                    TrainMsg::Labels {
                        key: key(p - 1),
                        step_targets,
                        labels: b.labels.clone(),
                    },
                )
                .await?;
        }
        let mut reported = vec![false; p];
        let (mut sq, mut loss_sum) = (0.0, 0.0);
        let mut busy_s = vec![0.0; p];
        while reported.iter().any(|r| !r) {
            match self.next("the stages' reports").await? {
                (
                    from,
                    TrainMsg::Report {
                        step: st,
                        stage,
                        sq_norm,
                        loss_sum: l,
                        busy_s: b,
                        ..
                    },
                ) if st == step && self.runs(from, stage) && !reported[stage as usize] => {
                    reported[stage as usize] = true;
                    busy_s[stage as usize] = b;
                    sq += sq_norm;
                    loss_sum += l;
                }
                (from, other) => {
                    return Err(TrainError::Protocol(format!(
                        "unexpected {other:?} from {}",
                        from.short()
                    )));
                }
            }
        }
        let wall_s = started.elapsed().as_secs_f64();
        let norm = sq.sqrt();
        let applied = norm.is_finite() && loss_sum.is_finite() && sq < f64::MAX;
        let grad_scale = if applied {
            clip_factor(norm, max_grad_norm)
        } else {
            1.0
        };
        for (k, &node) in self.stages.iter().enumerate() {
            self.net
                .send(
                    node,
                    TrainMsg::Apply {
                        job: self.job,
                        step,
                        stage: k as u16,
                        apply: applied,
                        save,
                        lr,
                        grad_scale,
                    },
                )
                .await?;
        }
        let mut done = vec![false; p];
        let mut states: Vec<Vec<u8>> = vec![Vec::new(); p];
        // Each stage's announced state size, once its first chunk came.
        let mut totals: Vec<Option<u64>> = vec![None; p];
        // The step ends when every stage has applied it (each stage says so
        // before it sends any checkpoint state).
        let mut step_s = None;
        let incomplete = |totals: &[Option<u64>], states: &[Vec<u8>]| {
            save && totals
                .iter()
                .zip(states)
                .any(|(t, b)| *t != Some(b.len() as u64))
        };
        while done.iter().any(|d| !d) || incomplete(&totals, &states) {
            match self.next("the stages' acknowledgements").await? {
                (
                    from,
                    TrainMsg::Applied {
                        step: st, stage, ..
                    },
                ) if st == step && self.runs(from, stage) => {
                    done[stage as usize] = true;
                    if step_s.is_none() && done.iter().all(|d| *d) {
                        step_s = Some(started.elapsed().as_secs_f64());
                    }
                }
                (
                    from,
                    TrainMsg::State {
                        step: st,
                        stage,
                        offset,
                        total,
                        data,
                        ..
                    },
                ) if st == step && save && self.runs(from, stage) => {
                    let buf = &mut states[stage as usize];
                    let announced = totals[stage as usize].get_or_insert(total);
                    let end = offset.saturating_add(data.len() as u64);
                    if offset != buf.len() as u64
                        || end > total
                        || total > self.max_state
                        || *announced != total
                    {
                        return Err(TrainError::Protocol(format!(
                            "state chunk of {} bytes at {offset} of {total} (expected at {}, at most {} in all)",
                            data.len(),
                            buf.len(),
                            self.max_state
                        )));
                    }
                    // Grows as chunks arrive, never past `total`, which is
                    // bounded by what the model can hold.
                    buf.extend_from_slice(&data);
                }
                (from, other) => {
                    return Err(TrainError::Protocol(format!(
                        "unexpected {other:?} from {}",
                        from.short()
                    )));
                }
            }
        }
        let step_s = step_s.unwrap_or_else(|| started.elapsed().as_secs_f64());
        Ok(StepOutcome {
            step,
            loss: loss_sum / step_targets.max(1) as f64,
            grad_norm: norm,
            lr,
            applied,
            targets: step_targets,
            tokens,
            states,
            busy_s,
            wall_s,
            step_s,
        })
    }

    /// Sends stage `stage` the checkpoint it starts from (its setup
    /// announced `state.len()` bytes), in chunks.
    pub async fn send_state(&self, stage: usize, state: &[u8]) -> Result<(), TrainError> {
        let node = *self
            .stages
            .get(stage)
            .ok_or_else(|| TrainError::Protocol(format!("no stage {stage}")))?;
        let total = state.len() as u64;
        for (i, chunk) in state
            .chunks(hearth_proto::limits::MAX_FILE_CHUNK)
            .enumerate()
        {
            self.net
                .send(
                    node,
                    TrainMsg::Restore {
                        job: self.job,
                        stage: stage as u16,
                        offset: (i * hearth_proto::limits::MAX_FILE_CHUNK) as u64,
                        total,
                        data: chunk.to_vec(),
                    },
                )
                .await?;
        }
        Ok(())
    }

    /// Whether `from` runs stage `stage` (a member cannot speak for a
    /// stage it does not run).
    fn runs(&self, from: NodeId, stage: u16) -> bool {
        self.stages.get(stage as usize) == Some(&from)
    }

    /// Tells every stage the job is over and forgets it here (one `End`
    /// per node ends all its stages of the job).
    pub async fn end(self) {
        let mut told = Vec::new();
        for &node in &self.stages {
            if told.contains(&node) {
                continue;
            }
            told.push(node);
            let _ = self.net.send(node, TrainMsg::End { job: self.job }).await;
        }
        self.net.remove_coordinator(self.job);
    }
}
