//! The cluster as one node sees it: plain data, served as JSON by
//! `GET /api/cluster` and printed by `hearth status`.

use serde::{Deserialize, Serialize};

use crate::profile::ClusterProfiles;

/// A member's state in the view.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MemberState {
    /// The node serving the view.
    #[serde(rename = "self")]
    Local,
    /// An authenticated peer answering heartbeats.
    Alive,
}

/// One member.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MemberView {
    pub node_id: String,
    pub name: String,
    /// Where its QUIC endpoint listens.
    pub address: String,
    pub state: MemberState,
    pub version: u16,
    /// Milliseconds since it was last heard from (0 for this node).
    pub last_heartbeat_age_ms: u64,
    /// Last measured heartbeat round trip (none for this node).
    pub rtt_ms: Option<f64>,
    /// Whether this member is the leader.
    pub leader: bool,
}

/// The whole view.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClusterView {
    /// The node serving the view.
    pub node_id: String,
    pub name: String,
    /// Public id of the cluster (derived from its secret).
    pub cluster_id: String,
    /// Lowest node id among the live members (this node included).
    pub leader: String,
    /// This node first, then the peers by node id.
    pub members: Vec<MemberView>,
    /// Device profiles (hardware, measured model times, links) of this
    /// node and the members it has received them from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub profiles: Option<ClusterProfiles>,
    /// Which member runs which layers of the served model, if placed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub placement: Option<crate::placement::Placement>,
    /// The placement's single-stream decode rate predicted from the
    /// figures now (live ones where trusted), beside the rate predicted
    /// when it was made (`placement.predicted_tokens_per_s`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub predicted_now: Option<PredictedNow>,
}

/// What the planner's cost model says the active placement does now.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct PredictedNow {
    pub tokens_per_s: f64,
    pub step_s: f64,
}
