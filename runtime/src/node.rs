//! A running node: endpoint, discoveries and membership, started together
//! and shut down together.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hearth_discovery::{Announcement, Discovery};
use hearth_net::{ClusterSecret, Endpoint, EndpointConfig, Identity, NodeId};
use hearth_proto::{PROTOCOL_VERSION, stream_kind};
use tokio::sync::{broadcast, mpsc};

use crate::membership::{self, HEARTBEAT_INTERVAL, HEARTBEAT_TIMEOUT, Membership, MembershipEvent};
use crate::profile::{
    ClusterProfiles, ModelInfo, NodeProfile, PROBE_PERIOD, PlanReport, PlanRequest, ProfileBook,
    plan_report, planner_input,
};
use crate::{ClusterView, RuntimeError};

/// How to start a node.
pub struct NodeConfig {
    pub name: String,
    pub identity: Identity,
    pub secret: ClusterSecret,
    /// UDP address of the QUIC endpoint (port 0 picks one).
    pub quic: SocketAddr,
    pub discoveries: Vec<Box<dyn Discovery>>,
    pub heartbeat_interval: Duration,
    pub heartbeat_timeout: Duration,
    /// The model this node serves with this device's measured times (see
    /// [`ModelInfo::measure`]); may also be set later with [`Node::set_model`].
    pub model: Option<ModelInfo>,
    /// How often links to members are measured again.
    pub probe_period: Duration,
}

impl NodeConfig {
    /// Defaults: heartbeats every 300 ms, a member silent for 2.5 s leaves.
    pub fn new(name: impl Into<String>, identity: Identity, secret: ClusterSecret) -> Self {
        Self {
            name: name.into(),
            identity,
            secret,
            quic: SocketAddr::from(([0, 0, 0, 0], 0)),
            discoveries: Vec::new(),
            heartbeat_interval: HEARTBEAT_INTERVAL,
            heartbeat_timeout: HEARTBEAT_TIMEOUT,
            model: None,
            probe_period: PROBE_PERIOD,
        }
    }
}

/// A running node; cheap to clone.
#[derive(Clone)]
pub struct Node {
    endpoint: Endpoint,
    membership: Membership,
    profiles: ProfileBook,
    discoveries: Arc<Vec<Box<dyn Discovery>>>,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node")
            .field("endpoint", &self.endpoint)
            .finish()
    }
}

impl Node {
    /// Binds the endpoint, starts membership and the discoveries.
    pub async fn start(cfg: NodeConfig) -> Result<Self, RuntimeError> {
        let cluster_id = cfg.secret.cluster_id().to_string();
        let (endpoint, mut streams) = Endpoint::bind(
            EndpointConfig {
                identity: cfg.identity,
                secret: cfg.secret,
                name: cfg.name.clone(),
                bind: cfg.quic,
            },
            &[
                stream_kind::MEMBERSHIP,
                stream_kind::PROFILE,
                stream_kind::PROBE,
            ],
        )?;
        let mut take = |kind| streams.remove(&kind).ok_or(RuntimeError::Stopped);
        let membership_streams = take(stream_kind::MEMBERSHIP)?;
        let profile_streams = take(stream_kind::PROFILE)?;
        let probe_streams = take(stream_kind::PROBE)?;
        let (dtx, drx) = mpsc::channel(256);
        let membership = membership::spawn(
            endpoint.clone(),
            cluster_id.clone(),
            drx,
            membership_streams,
            (cfg.heartbeat_interval, cfg.heartbeat_timeout),
        );
        let profiles = ProfileBook::spawn(
            endpoint.clone(),
            NodeProfile::new(endpoint.id().to_string(), &cfg.name, None),
            profile_streams,
            probe_streams,
            membership.events(),
            cfg.probe_period,
        );
        if let Some(info) = cfg.model {
            profiles.set_model(info);
        }
        let me = Announcement {
            node_id: endpoint.id(),
            name: cfg.name,
            cluster_id,
            quic_port: endpoint.local_addr()?.port(),
            version: PROTOCOL_VERSION,
        };
        for d in &cfg.discoveries {
            d.start(&me, dtx.clone())?;
        }
        Ok(Self {
            endpoint,
            membership,
            profiles,
            discoveries: Arc::new(cfg.discoveries),
        })
    }

    pub fn id(&self) -> NodeId {
        self.endpoint.id()
    }

    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    /// The current view of the cluster, with the members' profiles.
    pub async fn view(&self) -> Result<ClusterView, RuntimeError> {
        let mut view = self.membership.view().await.ok_or(RuntimeError::Stopped)?;
        view.profiles = Some(self.profiles(&view));
        Ok(view)
    }

    /// The profiles of this node and of the members in `view`.
    fn profiles(&self, view: &ClusterView) -> ClusterProfiles {
        let members: Vec<String> = view.members.iter().map(|m| m.node_id.clone()).collect();
        self.profiles.snapshot(&members)
    }

    /// Sets the model this node serves, with its measured times; members
    /// see the times with their next profile refresh.
    pub fn set_model(&self, info: ModelInfo) {
        self.profiles.set_model(info);
    }

    /// Plans the model this node serves over the members that measured it.
    pub async fn plan(&self, req: &PlanRequest) -> Result<PlanReport, RuntimeError> {
        let info = self.profiles.model().ok_or(RuntimeError::NoModel)?;
        let workload = req
            .workload(&info.config)
            .map_err(RuntimeError::BadRequest)?;
        let view = self.membership.view().await.ok_or(RuntimeError::Stopped)?;
        let input = planner_input(&self.profiles(&view), &info.times.fingerprint);
        Ok(plan_report(&info.cost, input, workload))
    }

    /// Membership events from now on.
    pub fn events(&self) -> broadcast::Receiver<MembershipEvent> {
        self.membership.events()
    }

    /// Withdraws from discovery and closes every connection, so peers see
    /// this node leave at once rather than after the heartbeat timeout.
    pub async fn shutdown(&self) {
        for d in self.discoveries.iter() {
            d.stop();
        }
        self.profiles.stop();
        self.membership.stop().await;
        self.endpoint.shutdown().await;
    }
}
