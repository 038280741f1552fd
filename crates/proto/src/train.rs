//! Messages of pipeline-parallel training: micro-batch inputs and labels,
//! activations forward and gradients backward between stages, the
//! per-step report and verdict between stages and the job's coordinator,
//! the tied-embedding gradient exchange, and checkpoint state in chunks.
//! Every list is bounded by a named limit; floats must be finite.

use crate::message::{Reader, put_blob, put_string};
use crate::pipeline::{bounded, get_u32s, put_u32s};
use crate::tensor::TensorFrame;
use crate::{ProtoError, limits};

/// Which micro-batch of which step of which job, for which stage (the
/// receiver: one node may run two stages of a job, the first and the last
/// of a U-shaped pipeline).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MicroKey {
    pub job: u64,
    pub step: u64,
    pub micro: u32,
    pub stage: u16,
}

/// Shape and document segmentation of a micro-batch (0 is padding).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MicroLayout {
    pub rows: u32,
    pub len: u32,
    /// `rows * len` segment ids.
    pub segments: Vec<u32>,
}

/// One training message.
#[derive(Debug, Clone, PartialEq)]
pub enum TrainMsg {
    /// Token ids of a micro-batch, to the first stage.
    Tokens {
        key: MicroKey,
        layout: MicroLayout,
        tokens: Vec<u32>,
    },
    /// Labels of a micro-batch (`u32::MAX` = no loss), to the last stage,
    /// with the number of target tokens in the whole step (the loss is
    /// normalised by it once).
    Labels {
        key: MicroKey,
        step_targets: u64,
        labels: Vec<u32>,
    },
    /// Hidden states of a micro-batch, stage to next stage.
    Activations {
        key: MicroKey,
        layout: MicroLayout,
        hidden: TensorFrame,
    },
    /// Gradient of the loss with respect to the receiver's output.
    Gradient { key: MicroKey, grad: TensorFrame },
    /// A tied parameter's gradient (embedding and LM head on different
    /// stages), to stage `stage`.
    Tied {
        job: u64,
        step: u64,
        stage: u16,
        name: String,
        grad: TensorFrame,
    },
    /// A stage finished a step's backward passes.
    Report {
        job: u64,
        step: u64,
        stage: u16,
        /// Sum of squares of its gradients (tied ones counted once).
        sq_norm: f64,
        /// Summed cross-entropy (last stage; 0 elsewhere).
        loss_sum: f64,
        targets: u64,
        /// Seconds the stage computed during the step (its utilisation).
        busy_s: f64,
    },
    /// The coordinator's verdict: apply the step (or, with `apply` false,
    /// drop the accumulated gradients); with `save`, then send the
    /// trainable state as `State` chunks (a checkpoint). To stage `stage`.
    Apply {
        job: u64,
        step: u64,
        stage: u16,
        apply: bool,
        save: bool,
        lr: f64,
        grad_scale: f64,
    },
    /// A stage applied (or dropped) a step.
    Applied { job: u64, step: u64, stage: u16 },
    /// The job is over (or cancelled): the stage frees its state.
    End { job: u64 },
    /// A chunk of safetensors bytes (a stage's state, either way).
    State {
        job: u64,
        step: u64,
        stage: u16,
        offset: u64,
        total: u64,
        data: Vec<u8>,
    },
    /// A chunk of a checkpoint for a stage to start from (coordinator to
    /// stage, before the first step, when the setup announced one).
    Restore {
        job: u64,
        stage: u16,
        offset: u64,
        total: u64,
        data: Vec<u8>,
    },
    /// A stage failed; the job cannot go on with this placement.
    Failed {
        job: u64,
        stage: u16,
        reason: String,
    },
}

const T_TOKENS: u8 = 1;
const T_LABELS: u8 = 2;
const T_ACT: u8 = 3;
const T_GRAD: u8 = 4;
const T_TIED: u8 = 5;
const T_REPORT: u8 = 6;
const T_APPLY: u8 = 7;
const T_APPLIED: u8 = 8;
const T_END: u8 = 9;
const T_STATE: u8 = 10;
const T_FAILED: u8 = 11;
const T_RESTORE: u8 = 12;

/// Checks that a state chunk lies within its announced total.
fn check_chunk(offset: u64, len: usize, total: u64) -> Result<(), ProtoError> {
    if offset.checked_add(len as u64).is_none_or(|end| end > total) {
        return Err(ProtoError::InvalidField {
            what: "state",
            detail: format!("chunk at {offset} of {len} bytes past {total}"),
        });
    }
    bounded("state total", total as usize, limits::MAX_TRAIN_STATE)?;
    Ok(())
}

fn put_key(out: &mut Vec<u8>, k: &MicroKey) {
    out.extend_from_slice(&k.job.to_le_bytes());
    out.extend_from_slice(&k.step.to_le_bytes());
    out.extend_from_slice(&k.micro.to_le_bytes());
    out.extend_from_slice(&k.stage.to_le_bytes());
}

fn get_key(r: &mut Reader<'_>) -> Result<MicroKey, ProtoError> {
    Ok(MicroKey {
        job: r.u64("train key")?,
        step: r.u64("train key")?,
        micro: r.u32("train key")?,
        stage: r.u16("train key")?,
    })
}

fn put_layout(out: &mut Vec<u8>, l: &MicroLayout) -> Result<(), ProtoError> {
    out.extend_from_slice(&l.rows.to_le_bytes());
    out.extend_from_slice(&l.len.to_le_bytes());
    put_u32s(out, "segments", &l.segments, limits::MAX_TRAIN_TOKENS)
}

fn get_layout(r: &mut Reader<'_>) -> Result<MicroLayout, ProtoError> {
    let rows = r.u32("layout")?;
    let len = r.u32("layout")?;
    let segments = get_u32s(r, "segments", limits::MAX_TRAIN_TOKENS)?;
    if (rows as u64) * (len as u64) != segments.len() as u64 || rows == 0 || len == 0 {
        return Err(ProtoError::InvalidField {
            what: "layout",
            detail: format!("{} segment ids for {rows}×{len}", segments.len()),
        });
    }
    Ok(MicroLayout {
        rows,
        len,
        segments,
    })
}

fn put_f64(out: &mut Vec<u8>, v: f64) {
    out.extend_from_slice(&v.to_le_bytes());
}

fn get_f64(r: &mut Reader<'_>, what: &'static str) -> Result<f64, ProtoError> {
    let v = f64::from_bits(r.u64(what)?);
    if !v.is_finite() {
        return Err(ProtoError::InvalidField {
            what,
            detail: format!("{v} is not finite"),
        });
    }
    Ok(v)
}

impl TrainMsg {
    pub(crate) fn encode(&self, out: &mut Vec<u8>) -> Result<(), ProtoError> {
        match self {
            Self::Tokens {
                key,
                layout,
                tokens,
            } => {
                out.push(T_TOKENS);
                put_key(out, key);
                put_layout(out, layout)?;
                put_u32s(out, "tokens", tokens, limits::MAX_TRAIN_TOKENS)?;
            }
            Self::Labels {
                key,
                step_targets,
                labels,
            } => {
                out.push(T_LABELS);
                put_key(out, key);
                out.extend_from_slice(&step_targets.to_le_bytes());
                put_u32s(out, "labels", labels, limits::MAX_TRAIN_TOKENS)?;
            }
            Self::Activations {
                key,
                layout,
                hidden,
            } => {
                out.push(T_ACT);
                put_key(out, key);
                put_layout(out, layout)?;
                hidden.encode(out)?;
            }
            Self::Gradient { key, grad } => {
                out.push(T_GRAD);
                put_key(out, key);
                grad.encode(out)?;
            }
            Self::Tied {
                job,
                step,
                stage,
                name,
                grad,
            } => {
                out.push(T_TIED);
                out.extend_from_slice(&job.to_le_bytes());
                out.extend_from_slice(&step.to_le_bytes());
                out.extend_from_slice(&stage.to_le_bytes());
                put_string(out, "tied name", name)?;
                grad.encode(out)?;
            }
            Self::Report {
                job,
                step,
                stage,
                sq_norm,
                loss_sum,
                targets,
                busy_s,
            } => {
                out.push(T_REPORT);
                out.extend_from_slice(&job.to_le_bytes());
                out.extend_from_slice(&step.to_le_bytes());
                out.extend_from_slice(&stage.to_le_bytes());
                put_f64(out, *sq_norm);
                put_f64(out, *loss_sum);
                out.extend_from_slice(&targets.to_le_bytes());
                put_f64(out, *busy_s);
            }
            Self::Apply {
                job,
                step,
                stage,
                apply,
                save,
                lr,
                grad_scale,
            } => {
                out.push(T_APPLY);
                out.extend_from_slice(&job.to_le_bytes());
                out.extend_from_slice(&step.to_le_bytes());
                out.extend_from_slice(&stage.to_le_bytes());
                out.push(u8::from(*apply) | (u8::from(*save) << 1));
                put_f64(out, *lr);
                put_f64(out, *grad_scale);
            }
            Self::Applied { job, step, stage } => {
                out.push(T_APPLIED);
                out.extend_from_slice(&job.to_le_bytes());
                out.extend_from_slice(&step.to_le_bytes());
                out.extend_from_slice(&stage.to_le_bytes());
            }
            Self::End { job } => {
                out.push(T_END);
                out.extend_from_slice(&job.to_le_bytes());
            }
            Self::State {
                job,
                step,
                stage,
                offset,
                total,
                data,
            } => {
                out.push(T_STATE);
                out.extend_from_slice(&job.to_le_bytes());
                out.extend_from_slice(&step.to_le_bytes());
                out.extend_from_slice(&stage.to_le_bytes());
                out.extend_from_slice(&offset.to_le_bytes());
                out.extend_from_slice(&total.to_le_bytes());
                put_blob(out, "state", data, limits::MAX_FILE_CHUNK)?;
            }
            Self::Restore {
                job,
                stage,
                offset,
                total,
                data,
            } => {
                out.push(T_RESTORE);
                out.extend_from_slice(&job.to_le_bytes());
                out.extend_from_slice(&stage.to_le_bytes());
                out.extend_from_slice(&offset.to_le_bytes());
                out.extend_from_slice(&total.to_le_bytes());
                put_blob(out, "restore", data, limits::MAX_FILE_CHUNK)?;
            }
            Self::Failed { job, stage, reason } => {
                out.push(T_FAILED);
                out.extend_from_slice(&job.to_le_bytes());
                out.extend_from_slice(&stage.to_le_bytes());
                put_string(out, "reason", reason)?;
            }
        }
        Ok(())
    }

    pub(crate) fn decode(r: &mut Reader<'_>) -> Result<Self, ProtoError> {
        Ok(match r.u8("train tag")? {
            T_TOKENS => {
                let key = get_key(r)?;
                let layout = get_layout(r)?;
                let tokens = get_u32s(r, "tokens", limits::MAX_TRAIN_TOKENS)?;
                if tokens.len() != layout.segments.len() {
                    return Err(ProtoError::InvalidField {
                        what: "tokens",
                        detail: format!(
                            "{} tokens for {} slots",
                            tokens.len(),
                            layout.segments.len()
                        ),
                    });
                }
                Self::Tokens {
                    key,
                    layout,
                    tokens,
                }
            }
            T_LABELS => Self::Labels {
                key: get_key(r)?,
                step_targets: r.u64("labels")?,
                labels: get_u32s(r, "labels", limits::MAX_TRAIN_TOKENS)?,
            },
            T_ACT => Self::Activations {
                key: get_key(r)?,
                layout: get_layout(r)?,
                hidden: TensorFrame::decode(r)?,
            },
            T_GRAD => Self::Gradient {
                key: get_key(r)?,
                grad: TensorFrame::decode(r)?,
            },
            T_TIED => Self::Tied {
                job: r.u64("tied")?,
                step: r.u64("tied")?,
                stage: r.u16("tied")?,
                name: r.string("tied name")?,
                grad: TensorFrame::decode(r)?,
            },
            T_REPORT => Self::Report {
                job: r.u64("report")?,
                step: r.u64("report")?,
                stage: r.u16("report")?,
                sq_norm: get_f64(r, "sq_norm")?,
                loss_sum: get_f64(r, "loss_sum")?,
                targets: r.u64("report")?,
                busy_s: get_f64(r, "busy_s")?,
            },
            T_APPLY => {
                let (job, step, stage) = (r.u64("apply")?, r.u64("apply")?, r.u16("apply")?);
                let flags = r.u8("apply")?;
                if flags > 3 {
                    return Err(ProtoError::InvalidField {
                        what: "apply",
                        detail: format!("flags {flags:#x}"),
                    });
                }
                Self::Apply {
                    job,
                    step,
                    stage,
                    apply: flags & 1 != 0,
                    save: flags & 2 != 0,
                    lr: get_f64(r, "lr")?,
                    grad_scale: get_f64(r, "grad_scale")?,
                }
            }
            T_APPLIED => Self::Applied {
                job: r.u64("applied")?,
                step: r.u64("applied")?,
                stage: r.u16("applied")?,
            },
            T_END => Self::End { job: r.u64("end")? },
            T_STATE => {
                let (job, step, stage) = (r.u64("state")?, r.u64("state")?, r.u16("state")?);
                let (offset, total) = (r.u64("state")?, r.u64("state")?);
                let data = r.blob("state", limits::MAX_FILE_CHUNK)?;
                check_chunk(offset, data.len(), total)?;
                Self::State {
                    job,
                    step,
                    stage,
                    offset,
                    total,
                    data,
                }
            }
            T_RESTORE => {
                let (job, stage) = (r.u64("restore")?, r.u16("restore")?);
                let (offset, total) = (r.u64("restore")?, r.u64("restore")?);
                let data = r.blob("restore", limits::MAX_FILE_CHUNK)?;
                check_chunk(offset, data.len(), total)?;
                Self::Restore {
                    job,
                    stage,
                    offset,
                    total,
                    data,
                }
            }
            T_FAILED => Self::Failed {
                job: r.u64("failed")?,
                stage: r.u16("failed")?,
                reason: r.string("reason")?,
            },
            other => {
                return Err(ProtoError::InvalidField {
                    what: "train tag",
                    detail: format!("{other}"),
                });
            }
        })
    }
}
