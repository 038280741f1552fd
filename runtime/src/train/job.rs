//! Fine-tuning jobs: the node that holds the data runs the job. It reads
//! and tokenizes the JSONL file, places the stages over the members that
//! serve the model (by the partitioner, or evenly), drives the steps as the
//! coordinator, writes checkpoints (each stage's trainable state and
//! optimizer moments, plus the step — which fixes the data cursor and the
//! dropout draws), and at the end writes the adapter (PEFT) or weights and
//! a merged model file that the cluster can serve.
//!
//! A stage that fails or leaves mid-step means no optimizer step anywhere
//! for that step: the job re-plans over the live members and resumes from
//! the last checkpoint.
//!
//! Between steps the job also asks the planner, with the members' figures
//! now (a device got busy or freed up), whether another split would make
//! the step clearly shorter. If so, twice in a row, the next step saves a
//! checkpoint, the stages end, and the job resumes from that checkpoint on
//! the new split: no step is lost or applied twice, and the weights are
//! those of an uninterrupted run.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use candle_core::Tensor;
use hearth_models::train::export::{
    merged_tensors, write_atomic, write_merged_gguf, write_peft_adapter,
};
use hearth_models::train::{AdamWConfig, Batching, LrSchedule, Method, Tokenized, load_jsonl};
use hearth_models::{ModelText, WeightFile};
use hearth_net::NodeId;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::sync::{broadcast, watch};
use tracing::{info, warn};

use super::TrainError;
use super::checkpoint::Checkpoint;
use super::coordinator::{Coordinator, StepOutcome};
use super::ctx::JobCtx;
use super::host::StageOrder;
pub use super::spec::{JobSpec, MethodSpec};

/// Events a job keeps.
const MAX_EVENTS: usize = 10_000;
/// The file in a job's output directory that keeps its record (state,
/// progress, events) across restarts of the node.
pub const RECORD_FILE: &str = "job-record.json";
/// The record's format; a record of another version is not read.
const RECORD_VERSION: u32 = 1;
/// A record larger than this is not read (10 000 events fit many times).
const MAX_RECORD_BYTES: u64 = 64 << 20;
/// How often a job re-plans after failures before it gives up.
const MAX_REPLANS: u32 = 3;
/// How often a job may move to a faster split between steps.
const MAX_MOVES: u32 = 8;
/// How often a running job asks the planner whether a faster split exists.
const MOVE_CHECK: Duration = Duration::from_secs(1);
/// Least time a split runs before it is replaced for speed.
const MOVE_DWELL: Duration = Duration::from_secs(3);
/// Checks in a row that must propose the same faster split.
const MOVE_STABLE: u32 = 2;

fn now_s() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Where a job is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    ValidatingFiles,
    Queued,
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

impl JobState {
    pub fn done(self) -> bool {
        matches!(self, Self::Succeeded | Self::Failed | Self::Cancelled)
    }
}

/// One stage of the job's current placement.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobStage {
    pub node_id: String,
    pub name: String,
    pub start: usize,
    pub end: usize,
    /// Share of the last step's wall time the stage computed.
    pub utilization: f64,
}

/// A checkpoint kept at the end of an epoch: what was trained so far,
/// written as the job's outputs are (a PEFT adapter, or the trained
/// tensors), in its own folder.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobCheckpoint {
    /// Optimizer steps taken.
    pub step: u64,
    pub created_at: u64,
    /// The step's training loss.
    pub train_loss: f64,
    /// The model id this checkpoint is known by: the fine-tune's,
    /// `:ckpt-step-N` appended.
    pub model: String,
    /// Where its files are.
    pub path: PathBuf,
}

/// Epoch checkpoints a job keeps (the newest; older ones are removed).
pub const KEPT_CHECKPOINTS: usize = 3;

/// A job as the API shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobInfo {
    pub id: String,
    pub model: String,
    pub state: JobState,
    pub created_at: u64,
    pub finished_at: Option<u64>,
    pub fine_tuned_model: Option<String>,
    pub error: Option<String>,
    pub step: u64,
    pub total_steps: u64,
    pub loss: Option<f64>,
    pub trained_tokens: u64,
    pub tokens_per_s: Option<f64>,
    pub stages: Vec<JobStage>,
    /// (p−1)/(m+p−1) of the current placement.
    pub ideal_bubble: Option<f64>,
    /// Mean loss per target token of the trained model on the validation
    /// examples, once the job ended (with a validation file).
    #[serde(default)]
    pub validation_loss: Option<f64>,
    /// The epoch checkpoints kept, oldest first.
    #[serde(default)]
    pub checkpoints: Vec<JobCheckpoint>,
    pub spec: JobSpec,
    pub output_dir: PathBuf,
}

/// Something that happened to a job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobEvent {
    pub seq: u64,
    pub created_at: u64,
    /// info, warn or error.
    pub level: String,
    pub message: String,
    /// Step metrics (`step`, `loss`, `lr`, `grad_norm`, `tokens_per_s`, ...).
    pub data: Option<Value>,
}

/// What [`RECORD_FILE`] holds.
#[derive(Serialize, Deserialize)]
struct Record {
    version: u32,
    info: JobInfo,
    events: Vec<JobEvent>,
}

/// A job's shared state.
pub struct JobHandle {
    info: Mutex<JobInfo>,
    events: Mutex<Vec<JobEvent>>,
    tx: broadcast::Sender<JobEvent>,
    cancel: watch::Sender<bool>,
}

impl JobHandle {
    pub fn new(id: String, spec: JobSpec) -> Arc<Self> {
        Arc::new(Self {
            info: Mutex::new(JobInfo {
                id,
                model: spec.model.clone(),
                state: JobState::ValidatingFiles,
                created_at: now_s(),
                finished_at: None,
                fine_tuned_model: None,
                error: None,
                step: 0,
                total_steps: 0,
                loss: None,
                trained_tokens: 0,
                tokens_per_s: None,
                stages: Vec::new(),
                ideal_bubble: None,
                validation_loss: None,
                checkpoints: Vec::new(),
                output_dir: spec.output_dir.clone(),
                spec,
            }),
            events: Mutex::new(Vec::new()),
            tx: broadcast::channel(256).0,
            cancel: watch::channel(false).0,
        })
    }

    pub fn info(&self) -> Option<JobInfo> {
        self.info.lock().ok().map(|i| i.clone())
    }

    /// Changes the job's info; a change of state is saved to its record.
    fn update(&self, f: impl FnOnce(&mut JobInfo)) {
        let changed = match self.info.lock() {
            Ok(mut i) => {
                let before = i.state;
                f(&mut i);
                i.state != before
            }
            Err(_) => false,
        };
        if changed {
            self.save();
        }
    }

    /// Writes the job's record into its output directory, whole or not
    /// at all. A failure costs the record, not the job: it is logged.
    pub fn save(&self) {
        let (Some(info), Ok(events)) = (self.info(), self.events.lock().map(|e| e.clone())) else {
            return;
        };
        let path = info.output_dir.join(RECORD_FILE);
        let record = Record {
            version: RECORD_VERSION,
            info,
            events,
        };
        let written = serde_json::to_vec(&record)
            .map_err(|e| e.to_string())
            .and_then(|bytes| {
                std::fs::create_dir_all(&record.info.output_dir).map_err(|e| e.to_string())?;
                write_atomic(&path, &bytes).map_err(|e| e.to_string())
            });
        if let Err(e) = written {
            warn!("cannot save the job record {}: {e}", path.display());
        }
    }

    /// A job from its record. One that had not ended was interrupted by
    /// the node stopping: it is restored as failed, saying so (its
    /// checkpoint stays in its output directory).
    pub fn restore(path: &Path) -> Result<Arc<Self>, TrainError> {
        let bad = |e: String| TrainError::Record(format!("{}: {e}", path.display()));
        let len = std::fs::metadata(path)
            .map_err(|e| bad(e.to_string()))?
            .len();
        if len > MAX_RECORD_BYTES {
            return Err(bad(format!("{len} bytes, more than {MAX_RECORD_BYTES}")));
        }
        let bytes = std::fs::read(path).map_err(|e| bad(e.to_string()))?;
        let r: Record = serde_json::from_slice(&bytes).map_err(|e| bad(e.to_string()))?;
        if r.version != RECORD_VERSION {
            return Err(bad(format!(
                "version {}, this build reads {RECORD_VERSION}",
                r.version
            )));
        }
        let mut info = r.info;
        // The record lies in the job's output directory, wherever that
        // directory is now (a moved data directory moves its jobs).
        if let Some(dir) = path.parent() {
            info.output_dir = dir.to_path_buf();
            info.spec.output_dir = dir.to_path_buf();
        }
        let interrupted = !info.state.done();
        let job = Arc::new(Self {
            info: Mutex::new(info),
            events: Mutex::new(r.events),
            tx: broadcast::channel(256).0,
            cancel: watch::channel(false).0,
        });
        if interrupted {
            let step = job.info().map_or(0, |i| i.step);
            job.finish(
                JobState::Failed,
                Some(format!(
                    "interrupted: the node stopped while the job ran (at step {step}); its last checkpoint is kept in its output directory"
                )),
            );
        }
        Ok(job)
    }

    /// Past events and a receiver for the next ones.
    pub fn events(&self) -> (Vec<JobEvent>, broadcast::Receiver<JobEvent>) {
        let rx = self.tx.subscribe();
        (
            self.events.lock().map(|e| e.clone()).unwrap_or_default(),
            rx,
        )
    }

    pub fn emit(&self, level: &str, message: impl Into<String>, data: Option<Value>) {
        let message = message.into();
        match level {
            "error" | "warn" => warn!("{message}"),
            _ => info!("{message}"),
        }
        let Ok(mut ev) = self.events.lock() else {
            return;
        };
        let e = JobEvent {
            seq: ev.len() as u64,
            created_at: now_s(),
            level: level.into(),
            message,
            data,
        };
        if ev.len() < MAX_EVENTS {
            ev.push(e.clone());
        }
        let _ = self.tx.send(e);
    }

    /// Asks the job to stop (it ends `cancelled`).
    pub fn cancel(&self) {
        self.cancel.send_replace(true);
    }

    fn cancelled(&self) -> bool {
        *self.cancel.borrow()
    }

    fn finish(&self, state: JobState, error: Option<String>) {
        if let Ok(mut i) = self.info.lock() {
            i.state = state;
            i.error = error.clone();
            i.finished_at = Some(now_s());
        }
        match (state, error) {
            (JobState::Failed, Some(e)) => self.emit("error", format!("The job failed: {e}"), None),
            (JobState::Cancelled, _) => self.emit("info", "The job was cancelled", None),
            _ => {}
        }
        self.save();
    }
}

/// The job's data, tokenized.
struct Data {
    examples: Vec<Tokenized>,
    /// The validation examples (with a validation file).
    validation: Vec<Tokenized>,
    base: WeightFile,
}

/// Runs a job to its end (the caller spawns it).
pub async fn run(ctx: Arc<JobCtx>, job: Arc<JobHandle>) {
    // One job at a time: the others wait their turn (queued).
    let result = {
        let _turn = ctx.turn.lock().await;
        run_inner(&ctx, &job).await
    };
    let id = job.info().map(|i| i.id).unwrap_or_default();
    match result {
        // A job that ended with its outputs written stays succeeded.
        Ok(()) if job.info().is_some_and(|i| i.state == JobState::Succeeded) => {}
        Ok(()) if job.cancelled() => job.finish(JobState::Cancelled, None),
        Ok(()) => {}
        Err(e) if job.cancelled() => {
            tracing::debug!("cancelled job ended with {e}");
            job.finish(JobState::Cancelled, None)
        }
        Err(e) => job.finish(JobState::Failed, Some(e.to_string())),
    }
    if let Some(i) = job.info() {
        ctx.cluster_event(
            &id,
            &format!("fine-tuning job {id} {:?}", i.state).to_lowercase(),
        );
    }
}

async fn run_inner(ctx: &Arc<JobCtx>, job: &Arc<JobHandle>) -> Result<(), TrainError> {
    let Some(info) = job.info() else {
        return Err(TrainError::Stage("the job's state is gone".into()));
    };
    let spec = info.spec.clone();
    spec.check().map_err(TrainError::Stage)?;
    let (served, path, content) = ctx
        .model()
        .ok_or_else(|| TrainError::Stage("the cluster serves no model to fine-tune".into()))?;
    if served != spec.model {
        return Err(TrainError::Stage(format!(
            "the cluster serves {served}, not {}; load {} first",
            spec.model, spec.model
        )));
    }
    job.emit(
        "info",
        format!("Validating training file {}", spec.data.display()),
        None,
    );
    let mut data = {
        let (path, file, seq_len) = (path.clone(), spec.data.clone(), spec.seq_len);
        let valid = spec.validation.clone();
        let template = ctx.service.chat_template().map(str::to_string);
        tokio::task::spawn_blocking(move || -> Result<Data, String> {
            let base = WeightFile::open(&path).map_err(|e| e.to_string())?;
            let text =
                ModelText::load_with(&base, template.as_deref()).map_err(|e| e.to_string())?;
            let raw = std::fs::read_to_string(&file)
                .map_err(|e| format!("cannot read {}: {e}", file.display()))?;
            // Rows never outgrow the model's context.
            let seq_len = seq_len.min(text.context_length());
            let examples = load_jsonl(&text, &raw, seq_len).map_err(|e| e.to_string())?;
            let validation = match &valid {
                Some(file) => {
                    let raw = std::fs::read_to_string(file)
                        .map_err(|e| format!("cannot read {}: {e}", file.display()))?;
                    let v = load_jsonl(&text, &raw, seq_len)
                        .map_err(|e| format!("the validation file: {e}"))?;
                    if v.len() > MAX_VALIDATION_EXAMPLES {
                        return Err(format!(
                            "the validation file holds {} examples (at most {MAX_VALIDATION_EXAMPLES})",
                            v.len()
                        ));
                    }
                    v
                }
                None => Vec::new(),
            };
            Ok(Data {
                examples,
                validation,
                base,
            })
        })
        .await
        .map_err(|e| TrainError::Stage(e.to_string()))?
        .map_err(TrainError::Stage)?
    };
    let n = data.examples.len();
    let batching = spec.batching();
    let m = batching.micro_batches;
    let epochs = match spec.steps {
        Some(s) => (s * spec.batch_size as u64).div_ceil(n as u64).max(1),
        None => spec.epochs,
    };
    let total = spec.steps.unwrap_or_else(|| batching.steps(n, epochs));
    let tokens: usize = data.examples.iter().map(|e| e.tokens.len()).sum();
    job.emit(
        "info",
        format!(
            "{n} examples ({tokens} tokens); {total} steps of {} examples in {m} micro-batches",
            spec.batch_size
        ),
        None,
    );
    job.update(|i| {
        i.total_steps = total;
        i.state = JobState::Queued;
    });
    let ckpt_dir = spec.output_dir.join("checkpoint");
    let mut ckpt = tokio::task::block_in_place(|| Checkpoint::load(&ckpt_dir, &spec))?;
    if let Some(c) = &ckpt {
        job.emit(
            "info",
            format!("Resuming from the checkpoint at step {}", c.step),
            None,
        );
    }
    let method = spec.method.method();
    let longest = data
        .examples
        .iter()
        .map(|e| e.tokens.len())
        .max()
        .unwrap_or(1);
    let mb_tokens = (spec.batch_size.div_ceil(m) * longest).min(u32::MAX as usize) as u32;
    // Epoch e ends once e passes over the data are done (the last step
    // always ends one).
    let epoch_ends: Vec<u64> = (1..=epochs)
        .map(|e| batching.steps(n, e).min(total))
        .chain(std::iter::once(total))
        .collect::<std::collections::BTreeSet<u64>>()
        .into_iter()
        .filter(|&s| s > 0)
        .collect();
    let plan = Plan {
        spec: &spec,
        method: &method,
        data: &data,
        batching: &batching,
        epochs,
        total,
        mb_tokens,
        tied_model: data.base.config().tie_word_embeddings,
        content: &content,
        ckpt_dir: &ckpt_dir,
        epoch_ends: &epoch_ends,
        max_state: std::fs::metadata(&path)
            .map_or(u64::MAX, |m| m.len())
            .saturating_mul(24)
            .saturating_add(64 << 20),
    };
    let mut replans = 0;
    let mut moves = 0;
    let mut observed = super::ctx::Observed::new();
    let final_state = loop {
        if job.cancelled() {
            return Ok(());
        }
        if let Some(c) = &ckpt
            && c.step >= total
        {
            break c.clone();
        }
        match attempt(ctx, job, &plan, &mut ckpt, &mut observed, moves < MAX_MOVES).await {
            Ok(Ended::Done(state)) => break *state,
            Ok(Ended::Stopped) => return Ok(()),
            Ok(Ended::Move(why)) => {
                moves += 1;
                let from = ckpt.as_ref().map_or(0, |c| c.step);
                job.emit(
                    "info",
                    format!("Re-planning between steps: {why}. Resuming from step {from} on the new split"),
                    None,
                );
                ctx.cluster_event(&info.id, &format!("training re-planned: {why}"));
                job.update(|i| i.state = JobState::Queued);
            }
            Err(e) if job.cancelled() => return Err(e.error),
            Err(e) if replans < MAX_REPLANS && e.retryable => {
                replans += 1;
                let from = ckpt.as_ref().map_or(0, |c| c.step);
                job.emit(
                    "warn",
                    format!(
                        "{}; no optimizer step was applied for step {}. Re-planning over the live members and resuming from step {from} (attempt {} of {})",
                        e.error, e.step + 1, replans + 1, MAX_REPLANS + 1
                    ),
                    None,
                );
                ctx.cluster_event(
                    &info.id,
                    &format!("training step failed: {}; re-planning", e.error),
                );
                job.update(|i| i.state = JobState::Queued);
                tokio::time::sleep(Duration::from_secs(3)).await;
            }
            Err(e) => return Err(e.error),
        }
    };
    // Outputs.
    let fine_tuned = fine_tuned_name(&spec, &info.id);
    // A merged model and the validation pass need every base tensor: a
    // copy received from members gets the ones it lacks first.
    if (spec.merge || !data.validation.is_empty())
        && let Err(e) = crate::sharing::complete(&ctx.service, &path, &content, None).await
    {
        return Err(TrainError::Stage(format!(
            "cannot receive the base model's weights (for the merge or the validation pass): {e}"
        )));
    }
    // What the validation pass needs once the outputs are written.
    let validation = (
        std::mem::take(&mut data.validation),
        method.clone(),
        final_state.clone(),
    );
    job.emit("info", "Writing the fine-tuned model", None);
    let models_dir = ctx.models_dir();
    let out = spec.output_dir.clone();
    let (written, registered) = {
        let (spec, fine_tuned, content) = (spec.clone(), fine_tuned.clone(), content.clone());
        tokio::task::spawn_blocking(move || -> Result<Written, TrainError> {
            write_outputs(
                &data.base,
                &spec,
                &method,
                &final_state,
                &fine_tuned,
                &out,
                models_dir.as_deref(),
                &content,
            )
        })
        .await
        .map_err(|e| TrainError::Stage(e.to_string()))??
    };
    job.update(|i| {
        i.fine_tuned_model =
            (written.is_some() || registered.is_some()).then(|| fine_tuned.clone());
    });
    let adapter = if registered.is_some() {
        ", served beside its base model as a LoRA adapter"
    } else {
        ""
    };
    job.emit(
        "info",
        match (&written, &registered) {
            (Some(p), _) => format!(
                "New fine-tuned model created: {fine_tuned} ({}{adapter})",
                p.display()
            ),
            (None, Some(_)) => format!("New fine-tuned model created: {fine_tuned}{adapter}"),
            (None, None) => format!("Adapter written to {}", spec.output_dir.display()),
        },
        None,
    );
    let (valid, m, st) = validation;
    if !valid.is_empty() {
        // Best effort: the outputs are written; a failure here is told.
        job.emit(
            "info",
            format!(
                "Evaluating the trained model on {} validation examples",
                valid.len()
            ),
            None,
        );
        let (p, cancel) = (path.clone(), job.cancel.subscribe());
        let seq_len = spec.seq_len;
        let scored = tokio::task::spawn_blocking(move || {
            let base = WeightFile::open(&p)?;
            validation_loss(&base, &m, &st, &valid, seq_len, &cancel)
        })
        .await
        .map_err(|e| TrainError::Stage(e.to_string()))
        .and_then(|r| r);
        match scored {
            Ok(Some((loss, targets))) => {
                job.update(|i| i.validation_loss = Some(loss));
                let last = job.info().and_then(|i| i.loss);
                job.emit(
                    "info",
                    format!("Validation loss {loss:.4} over {targets} target tokens"),
                    Some(json!({
                        "step": total, "total_steps": total, "train_loss": last,
                        "full_valid_loss": loss, "valid_targets": targets,
                    })),
                );
            }
            Ok(None) => job.emit(
                "info",
                "Validation skipped: cancelled after the outputs were written",
                None,
            ),
            Err(e) => job.emit("warn", format!("No validation loss: {e}"), None),
        }
    }
    job.finish(JobState::Succeeded, None);
    job.emit("info", "The job has successfully completed", None);
    Ok(())
}

/// Writes the trained state `c` (an epoch's end) as the job's outputs are
/// written, into `checkpoints/step-N` of the output folder, records it, and
/// removes the oldest beyond [`KEPT_CHECKPOINTS`]. A LoRA checkpoint is
/// also registered in the fine-tuned models' folder of `serve` (with the
/// base's content id) under its model name, so it is served beside the
/// base as OpenAI's checkpoints are, until it is removed.
async fn keep_epoch_checkpoint(
    job: &Arc<JobHandle>,
    data: &Data,
    spec: &JobSpec,
    method: &Method,
    c: &Checkpoint,
    train_loss: f64,
    serve: Option<(PathBuf, &str)>,
) -> Result<(), AttemptError> {
    let Some(info) = job.info() else {
        return Ok(());
    };
    let dir = spec
        .output_dir
        .join("checkpoints")
        .join(format!("step-{}", c.step));
    let (base, spec2, method2, c2, d) = (
        data.base.path().to_path_buf(),
        JobSpec {
            merge: false,
            ..spec.clone()
        },
        method.clone(),
        c.clone(),
        dir.clone(),
    );
    tokio::task::spawn_blocking(move || -> Result<(), TrainError> {
        let base = WeightFile::open(&base)?;
        write_outputs(&base, &spec2, &method2, &c2, "", &d, None, "").map(|_| ())
    })
    .await
    .map_err(|e| AttemptError::from(TrainError::Checkpoint(e.to_string())))??;
    let kept = JobCheckpoint {
        step: c.step,
        created_at: now_s(),
        train_loss,
        model: format!("{}:ckpt-step-{}", fine_tuned_name(spec, &info.id), c.step),
        path: dir,
    };
    let lora = matches!(method, Method::Lora(_));
    if let Some((models, content)) = serve.as_ref().filter(|(_, c)| lora && !c.is_empty()) {
        let (models, content, name) = (models.clone(), content.to_string(), kept.model.clone());
        let (peft, base) = (kept.path.join("adapter"), spec.model.clone());
        let registered = tokio::task::spawn_blocking(move || {
            crate::adapters::register(&models, &name, &peft, &content, &base)
        })
        .await
        .map_err(|e| e.to_string())
        .and_then(|r| r);
        if let Err(e) = registered {
            warn!("checkpoint {} cannot be served: {e}", kept.model);
        }
    }
    let mut dropped = Vec::new();
    job.update(|i| {
        i.checkpoints.retain(|k| k.step != kept.step);
        i.checkpoints.push(kept.clone());
        while i.checkpoints.len() > KEPT_CHECKPOINTS {
            dropped.push(i.checkpoints.remove(0));
        }
    });
    for d in dropped {
        if let Err(e) = std::fs::remove_dir_all(&d.path) {
            warn!("cannot remove checkpoint {}: {e}", d.path.display());
        }
        if let Some((models, _)) = &serve
            && let Err(e) = crate::adapters::unregister(models, &d.model)
        {
            warn!("cannot remove checkpoint {}'s adapter: {e}", d.model);
        }
    }
    job.emit(
        "info",
        format!("Kept the epoch checkpoint at step {}", c.step),
        None,
    );
    Ok(())
}

/// Most validation examples a job takes (each is scored on the whole model
/// on the job's own node).
pub const MAX_VALIDATION_EXAMPLES: usize = 4096;

/// The mean loss per target token of the base model with the trained
/// `state` on `examples`, one at a time on the whole model here, nothing
/// trainable (so no autograd graph is kept). `None` when the job is
/// cancelled meanwhile. Blocking.
fn validation_loss(
    base: &WeightFile,
    method: &Method,
    state: &Checkpoint,
    examples: &[Tokenized],
    seq_len: usize,
    cancel: &watch::Receiver<bool>,
) -> Result<Option<(f64, usize)>, TrainError> {
    use hearth_models::train::{DropCtx, TrainInput, TrainOptions, TrainStage};
    let layers = base.config().num_hidden_layers;
    let stage = TrainStage::load(
        base,
        hearth_models::StageSpec::full(layers),
        &TrainOptions {
            method: method.clone(),
            dtype: candle_core::DType::F32,
            seed: 0,
        },
    )?;
    // Every trainable from the state, as a restore takes them.
    for (name, _) in stage.trainables() {
        let t = state
            .tensors
            .get(name)
            .ok_or_else(|| TrainError::Checkpoint(format!("the trained state lacks {name}")))?;
        stage.set(name, t)?;
    }
    let stage = stage.merged()?;
    let one = Batching {
        batch_size: 1,
        micro_batches: 1,
        pack: false,
        seq_len,
        seed: 0,
    };
    let (mut sum, mut targets) = (0f64, 0usize);
    for i in 0..examples.len() {
        if *cancel.borrow() {
            return Ok(None);
        }
        for mb in one.micro_batches(examples, &[i])? {
            let logits = stage.forward(
                &TrainInput::Tokens(mb.tokens.clone()),
                &mb.layout,
                &DropCtx::eval(),
            )?;
            let (s, n) = hearth_models::train::loss_sum(&logits, &mb.labels)?;
            sum += s
                .to_dtype(candle_core::DType::F64)
                .and_then(|s| s.to_scalar::<f64>())
                .map_err(hearth_models::ModelError::from)?;
            targets += n;
        }
    }
    if targets == 0 {
        return Err(TrainError::Stage(
            "the validation examples have no assistant tokens to score".into(),
        ));
    }
    Ok(Some((sum / targets as f64, targets)))
}

/// The id job `id`'s fine-tuned model is served under.
fn fine_tuned_name(spec: &JobSpec, id: &str) -> String {
    format!(
        "ft-{}-{}-{}",
        sanitize(&spec.model),
        spec.suffix.as_deref().unwrap_or("hearth"),
        id.trim_start_matches("ftjob-").get(..8).unwrap_or(id)
    )
}

fn sanitize(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '-'
            }
        })
        .collect()
}

/// What a job wrote for serving: its merged model file, and its adapter
/// registered beside the fine-tuned models.
type Written = (Option<PathBuf>, Option<crate::adapters::AdapterRecord>);

/// Writes the adapter or weights to `out`; registers a LoRA adapter in
/// `models_dir` as the fine-tune `name` of the base with content id
/// `base_content` (served beside it); writes the merged model to
/// `models_dir` (or `out`) when the spec asks for it.
#[allow(clippy::too_many_arguments)]
fn write_outputs(
    base: &WeightFile,
    spec: &JobSpec,
    method: &Method,
    state: &Checkpoint,
    name: &str,
    out: &Path,
    models_dir: Option<&Path>,
    base_content: &str,
) -> Result<Written, TrainError> {
    let trained: Vec<(String, Tensor)> = state
        .tensors
        .iter()
        .filter(|(n, _)| !n.starts_with("optimizer."))
        .map(|(n, t)| (n.clone(), t.clone()))
        .collect();
    let mut registered = None;
    match method {
        Method::Lora(c) => {
            write_peft_adapter(
                &out.join("adapter"),
                c,
                &spec.model,
                &trained,
                base.config(),
            )?;
            // Served beside its base from now on (a base of unknown
            // content cannot be matched, so it is served merged only). Best
            // effort: the job's own outputs are written either way.
            if let Some(dir) = models_dir.filter(|_| !base_content.is_empty()) {
                match crate::adapters::register(
                    dir,
                    name,
                    &out.join("adapter"),
                    base_content,
                    &spec.model,
                ) {
                    Ok(r) => registered = Some(r),
                    Err(e) => tracing::warn!("the adapter cannot be served beside its base: {e}"),
                }
            }
        }
        Method::Full => {
            let bytes = hearth_models::train::export::safetensors_bytes(&trained, None)?;
            write_atomic(&out.join("model.safetensors"), &bytes)?;
        }
    }
    if !spec.merge {
        return Ok((None, registered));
    }
    let map: HashMap<String, Tensor> = trained.into_iter().collect();
    let merged = merged_tensors(base, method, &map)?;
    let dir = models_dir.unwrap_or(out);
    std::fs::create_dir_all(dir)
        .map_err(|e| TrainError::Checkpoint(format!("{}: {e}", dir.display())))?;
    let dst = dir.join(format!("{name}.gguf"));
    write_merged_gguf(base, &merged, name, &dst, spec.quantize_merged)?;
    Ok((Some(dst), registered))
}

/// A stage's busy time per token lately (the last 2 steps) ÷ early in its
/// split (the faster of steps 2 and 3: the first warms up, and a slowdown
/// that starts during step 3 must not raise the baseline), once there are
/// 5 steps.
fn drift(steps: &[f64]) -> Option<f64> {
    if steps.len() < 5 {
        return None;
    }
    let early = steps[1].min(steps[2]);
    let late = steps[steps.len() - 2..].iter().sum::<f64>() / 2.0;
    let d = late / early;
    (d.is_finite() && d > 0.0).then_some(d)
}

/// How an attempt ended without error.
enum Ended {
    /// Every step ran: the final state.
    Done(Box<Checkpoint>),
    /// The job was cancelled.
    Stopped,
    /// A checkpoint was saved to move to a faster split, for this reason.
    Move(String),
}

/// Why an attempt ended early.
struct AttemptError {
    error: TrainError,
    step: u64,
    retryable: bool,
}

impl From<TrainError> for AttemptError {
    fn from(error: TrainError) -> Self {
        Self {
            error,
            step: 0,
            retryable: false,
        }
    }
}

/// What every attempt of a job shares.
struct Plan<'a> {
    spec: &'a JobSpec,
    method: &'a Method,
    data: &'a Data,
    batching: &'a Batching,
    /// Passes over the data that `total` steps make.
    epochs: u64,
    total: u64,
    mb_tokens: u32,
    tied_model: bool,
    content: &'a str,
    ckpt_dir: &'a Path,
    /// The steps that end an epoch (a checkpoint is kept at each).
    epoch_ends: &'a [u64],
    /// Most bytes a stage's state may take: its tensors and two optimizer
    /// moments in f32 (at most the whole model's, ~24× its quantized file).
    max_state: u64,
}

/// One placement of the job, from the last checkpoint to the end (the
/// final state), until something fails, or (when `may_move`) until a
/// clearly faster split is found between steps. `observed`: the training
/// slowdowns the job's stages have shown so far, beyond their figures.
async fn attempt(
    ctx: &Arc<JobCtx>,
    job: &Arc<JobHandle>,
    plan: &Plan<'_>,
    ckpt: &mut Option<Checkpoint>,
    observed: &mut super::ctx::Observed,
    may_move: bool,
) -> Result<Ended, AttemptError> {
    let Plan {
        spec,
        method,
        data,
        batching,
        epochs,
        total,
        mb_tokens,
        tied_model,
        content,
        ckpt_dir,
        epoch_ends,
        max_state,
    } = *plan;
    let retry = |error: TrainError, step: u64| AttemptError {
        error,
        step,
        retryable: true,
    };
    let start = ckpt.as_ref().map_or(0, |c| c.step);
    let (stages, note) = ctx.place(spec, mb_tokens, observed).await.map_err(|e| {
        retry(
            TrainError::Stage(format!("cannot place the job: {e}")),
            start,
        )
    })?;
    let p = stages.len();
    if let Some(note) = note {
        job.emit("warn", note, None);
    }
    let m = batching.micro_batches;
    job.emit(
        "info",
        format!(
            "Placed over {p} stage(s): {}",
            stages
                .iter()
                .map(|(_, name, s)| format!("{name} layers {}..{}", s.start, s.end))
                .collect::<Vec<_>>()
                .join(", ")
        ),
        None,
    );
    if p > 1 && stages.first().map(|s| &s.0) == stages.last().map(|s| &s.0) {
        job.emit(
            "info",
            format!(
                "U-shaped: {} runs the embedding and the head, so token ids and labels stay there",
                stages[0].1
            ),
            None,
        );
    }
    job.update(|i| {
        i.stages = stages
            .iter()
            .map(|(id, name, s)| JobStage {
                node_id: id.clone(),
                name: name.clone(),
                start: s.start,
                end: s.end,
                utilization: 0.0,
            })
            .collect();
        i.ideal_bubble = Some((p as f64 - 1.0) / (m as f64 + p as f64 - 1.0));
    });
    let wire: u64 = rand::random::<u64>() >> 1;
    let tied = matches!(method, Method::Full) && p > 1 && tied_model;
    let nodes: Vec<String> = stages.iter().map(|(id, _, _)| id.clone()).collect();
    let mut restores = Vec::with_capacity(p);
    for (_, _, s) in &stages {
        restores.push(match ckpt {
            Some(c) => c.for_stage(*s, tied)?,
            None => Vec::new(),
        });
    }
    let orders: Vec<StageOrder> = (0..p)
        .map(|i| StageOrder {
            job: wire,
            stage: i as u16,
            stages: p as u16,
            spec: stages[i].2,
            content: content.to_string(),
            method: method.clone(),
            schedule: spec.schedule,
            micro_batches: m as u32,
            prev: (i > 0).then(|| nodes[i - 1].clone()),
            next: (i + 1 < p).then(|| nodes[i + 1].clone()),
            tied: match (tied, i) {
                (true, 0) => Some(nodes[p - 1].clone()),
                (true, i) if i + 1 == p => Some(nodes[0].clone()),
                _ => None,
            },
            seed: spec.seed,
            optim: AdamWConfig {
                weight_decay: spec.weight_decay,
                ..AdamWConfig::default()
            },
            timeout_s: spec.timeout_s,
            restore_len: restores[i].len() as u64,
            max_len: spec.seq_len,
        })
        .collect();
    let ids: Vec<NodeId> = nodes
        .iter()
        .map(|n| n.parse::<NodeId>())
        .collect::<Result<_, _>>()
        .map_err(|e| AttemptError::from(TrainError::Protocol(format!("node id: {e}"))))?;
    let net = ctx.net();
    let mut coord = Coordinator::new(&net, wire, ids, Duration::from_secs(spec.timeout_s))
        .with_max_state(max_state);
    let ordered =
        futures_util::future::join_all(nodes.iter().zip(orders).map(|(n, o)| ctx.order(n, o)))
            .await;
    let end_all = |ctx: Arc<JobCtx>, nodes: Vec<String>| async move {
        for n in &nodes {
            ctx.end(n, wire).await;
        }
    };
    if let Some(e) = ordered.into_iter().find_map(Result::err) {
        coord.end().await;
        end_all(ctx.clone(), nodes.clone()).await;
        return Err(retry(
            TrainError::Stage(format!("a stage could not start: {e}")),
            start,
        ));
    }
    for (i, r) in restores.iter().enumerate() {
        if !r.is_empty()
            && let Err(e) = coord.send_state(i, r).await
        {
            coord.end().await;
            end_all(ctx.clone(), nodes.clone()).await;
            return Err(retry(e, start));
        }
    }
    job.update(|i| i.state = JobState::Running);
    let schedule = LrSchedule {
        peak: spec.learning_rate,
        warmup: spec.warmup_steps,
        total,
        min_ratio: spec.min_lr_ratio,
    };
    let mut cancel = job.cancel.subscribe();
    let mut result = None;
    let began = std::time::Instant::now();
    let mut checked = began;
    // Each stage's busy seconds per token, step by step, and the training
    // figures its device had when the split started.
    let mut pace: Vec<Vec<f64>> = vec![Vec::new(); p];
    let start_figures = ctx.train_figures().await;
    let mut proposal: Option<(crate::placement::Split, u32)> = None;
    let mut moving: Option<String> = None;
    for step in start..total {
        if job.cancelled() {
            break;
        }
        let last = step + 1 == total;
        if may_move && !last && began.elapsed() >= MOVE_DWELL && checked.elapsed() >= MOVE_CHECK {
            checked = std::time::Instant::now();
            // A node running two stages (a U-shaped job's data node) is
            // judged by both together, step by step.
            let mut per_node: Vec<(&String, Vec<f64>)> = Vec::new();
            for (steps, node) in pace.iter().zip(&nodes) {
                match per_node.iter_mut().find(|(n, _)| *n == node) {
                    Some((_, sum)) => {
                        for (s, v) in sum.iter_mut().zip(steps) {
                            *s += v;
                        }
                    }
                    None => per_node.push((node, steps.clone())),
                }
            }
            let drifts: HashMap<String, (f64, f64)> = per_node
                .into_iter()
                .filter_map(|(node, steps)| {
                    Some((node.clone(), (drift(&steps)?, *start_figures.get(node)?)))
                })
                .collect();
            match ctx
                .better_split(spec, mb_tokens, &stages, &drifts, observed)
                .await
            {
                Some((split, why)) => {
                    let seen = match &mut proposal {
                        Some((p, n)) if *p == split => {
                            *n += 1;
                            *n
                        }
                        _ => {
                            proposal = Some((split, 1));
                            1
                        }
                    };
                    if seen >= MOVE_STABLE {
                        moving = Some(why);
                    }
                }
                None => proposal = None,
            }
        }
        let idx = batching.step_examples(data.examples.len(), epochs, step);
        let batches = batching
            .micro_batches(&data.examples, &idx)
            .map_err(|e| AttemptError::from(TrainError::Model(e)))?;
        let epoch_end = epoch_ends.contains(&(step + 1));
        let save = last
            || epoch_end
            || moving.is_some()
            || (spec.checkpoint_every > 0 && (step + 1) % spec.checkpoint_every == 0);
        let lr = schedule.at(step);
        let outcome: Result<StepOutcome, TrainError> = tokio::select! {
            r = coord.step(step, &batches, lr, spec.max_grad_norm, save) => r,
            reason = ctx.lost(nodes.clone()) => Err(TrainError::Stage(reason)),
            _ = cancel.wait_for(|c| *c) => Err(TrainError::Stopped),
        };
        let out = match outcome {
            Ok(o) => o,
            Err(e) => {
                coord.end().await;
                end_all(ctx.clone(), nodes.clone()).await;
                if job.cancelled() {
                    return Ok(Ended::Stopped);
                }
                return Err(retry(e, step));
            }
        };
        if out.tokens > 0 {
            for (k, b) in out.busy_s.iter().enumerate() {
                if let Some(v) = pace.get_mut(k) {
                    v.push(b / out.tokens as f64);
                    // [`drift`] reads the first 3 steps and the last 2.
                    if v.len() > 5 {
                        v.remove(3);
                    }
                }
            }
        }
        // Throughput over the whole step, optimizer included; utilization
        // over the schedule the stages computed in.
        let tok_s = out.tokens as f64 / out.step_s.max(1e-9);
        let utilization: Vec<f64> = out
            .busy_s
            .iter()
            .map(|b| (b / out.wall_s.max(1e-9)).min(1.0))
            .collect();
        job.update(|i| {
            i.step = step + 1;
            i.loss = Some(out.loss);
            i.trained_tokens += out.tokens;
            i.tokens_per_s = Some(tok_s);
            for (s, u) in i.stages.iter_mut().zip(&utilization) {
                s.utilization = *u;
            }
        });
        job.emit(
            "info",
            format!("Step {}/{total}: training loss={:.4}", step + 1, out.loss),
            Some(json!({
                "step": step + 1, "total_steps": total, "train_loss": out.loss, "lr": out.lr,
                "grad_norm": out.grad_norm, "applied": out.applied, "tokens": out.tokens,
                "targets": out.targets, "step_s": out.step_s, "schedule_s": out.wall_s, "tokens_per_s": tok_s,
                "utilization": utilization,
            })),
        );
        if save {
            let c = Checkpoint::from_states(&out.states, step + 1)?;
            let (c2, spec2, dir) = (c.clone(), spec.clone(), ckpt_dir.to_path_buf());
            tokio::task::spawn_blocking(move || c2.save(&dir, &spec2, total))
                .await
                .map_err(|e| AttemptError::from(TrainError::Checkpoint(e.to_string())))??;
            job.emit(
                "info",
                format!("Checkpoint saved at step {}", step + 1),
                None,
            );
            if epoch_end {
                let serve = ctx.models_dir().map(|d| (d, content));
                keep_epoch_checkpoint(job, data, spec, method, &c, out.loss, serve).await?;
            }
            job.save();
            if last {
                result = Some(c.clone());
            }
            *ckpt = Some(c);
            if let Some(why) = moving.take().filter(|_| !last) {
                coord.end().await;
                end_all(ctx.clone(), nodes).await;
                return Ok(Ended::Move(why));
            }
        }
    }
    coord.end().await;
    end_all(ctx.clone(), nodes).await;
    Ok(match result {
        Some(c) => Ended::Done(Box::new(c)),
        None => Ended::Stopped,
    })
}

#[cfg(test)]
mod drift_tests {
    use super::drift;

    #[test]
    fn drift_needs_five_steps_and_compares_late_with_the_fast_early_pace() {
        assert_eq!(drift(&[1.0, 1.0, 1.0, 1.0]), None);
        assert_eq!(drift(&[3.0, 1.0, 1.0, 1.0, 1.0]), Some(1.0));
        // A slowdown that began during the third step: the baseline is
        // the second step's pace, not the mean with the slowed one.
        assert_eq!(drift(&[3.0, 1.0, 4.0, 5.0, 5.0, 5.0]), Some(5.0));
        // Nothing measured: no drift.
        assert_eq!(drift(&[0.0, 0.0, 0.0, 0.0, 0.0]), None);
    }
}
