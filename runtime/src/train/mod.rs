//! Pipeline-parallel training.
//!
//! A job's model is split into stages by layer range, one stage per node.
//! The coordinator (on the node that holds the data) sends each step's
//! micro-batches: token ids to the first stage, labels to the last. Stage
//! workers run the schedule ([`schedule`]: 1F1B or GPipe), pushing
//! activations forward and gradients backward over QUIC ([`net`]), keeping
//! only each micro-batch's input and recomputing in backward. After the
//! step's last backward every stage reports its gradient norm²; the
//! coordinator reduces the global norm and sends one verdict (learning rate,
//! clipping factor, apply or skip) that every stage applies with its own
//! AdamW — so no stage steps unless all finished the step.

mod checkpoint;
pub mod coordinator;
mod ctx;
pub mod host;
pub mod job;
pub mod net;
pub mod schedule;
pub mod spec;
pub mod state;
pub mod worker;

pub use coordinator::{Coordinator, StepOutcome};
pub(crate) use ctx::JobCtx;
pub use host::{StageOrder, TrainHost};
pub use job::{JobEvent, JobHandle, JobInfo, JobSpec, JobStage, JobState, MethodSpec, RECORD_FILE};
pub use net::{SentCounts, TrainNet, TrainNetError};
pub use schedule::{Op, Schedule, ScheduleError, Simulation, simulate};
pub use worker::{StageHandle, StageSetup, spawn_stage};

/// Why training failed.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error(transparent)]
    Model(#[from] hearth_models::ModelError),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error(transparent)]
    Net(#[from] TrainNetError),
    #[error("training protocol: {0}")]
    Protocol(String),
    #[error("timed out: {0}")]
    Timeout(String),
    #[error("stage {stage} on {node} failed: {reason}")]
    StageFailed {
        stage: u16,
        node: String,
        reason: String,
    },
    #[error("stage: {0}")]
    Stage(String),
    #[error("checkpoint: {0}")]
    Checkpoint(String),
    #[error("job record {0}")]
    Record(String),
    #[error("the job was stopped")]
    Stopped,
}
