//! A Hearth node: the cluster fabric's membership (which authenticated peers
//! are alive, by QUIC heartbeats; join/leave events; a deterministic
//! leader), the device profiler (hardware, measured model times, measured
//! links, shared between members), pipeline inference (placement, stage
//! workers on the CPU or a GPU, the scheduler) and pipeline-parallel
//! training (schedules, stage workers, fine-tuning jobs).
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

pub mod adapters;
pub mod catalog;
pub mod compute;
pub(crate) mod control;
pub mod events;
#[cfg(feature = "fuzzing")]
pub mod fuzzing;
mod membership;
pub mod model_file;
pub mod model_store;
mod node;
pub mod pipeline;
pub mod placement;
pub mod profile;
mod sharing;
pub mod train;
mod view;

pub use catalog::{ModelEntry, ModelFacts, ModelSource, model_facts};
pub use compute::{Backend, Compute};
pub use events::{ClusterEvent, EventKind};
pub use membership::{HEARTBEAT_INTERVAL, HEARTBEAT_TIMEOUT, MembershipEvent};
pub use model_store::{FirstModel, ModelProgress, ModelStore};
pub use node::{Node, NodeConfig};
pub use view::{ClusterView, MemberState, MemberView, PredictedNow};

/// Errors starting or running a node.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error(transparent)]
    Net(#[from] hearth_net::NetError),
    #[error(transparent)]
    Discovery(#[from] hearth_discovery::DiscoveryError),
    #[error("the node has stopped")]
    Stopped,
    #[error("this node serves no model yet (it is still being fetched or measured)")]
    NoModel,
    #[error("invalid request: {0}")]
    BadRequest(String),
    #[error("no model named {0:?} on this node")]
    UnknownModel(String),
    #[error("{0} was not placed across the cluster within {1:?}")]
    NotPlaced(String, std::time::Duration),
    #[error(transparent)]
    Model(#[from] hearth_models::ModelError),
    #[error(transparent)]
    Profile(#[from] crate::profile::ProfileError),
}
