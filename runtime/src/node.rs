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
        }
    }
}

/// A running node; cheap to clone.
#[derive(Clone)]
pub struct Node {
    endpoint: Endpoint,
    membership: Membership,
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
            &[stream_kind::MEMBERSHIP],
        )?;
        let membership_streams = streams
            .remove(&stream_kind::MEMBERSHIP)
            .ok_or(RuntimeError::Stopped)?;
        let (dtx, drx) = mpsc::channel(256);
        let membership = membership::spawn(
            endpoint.clone(),
            cluster_id.clone(),
            drx,
            membership_streams,
            (cfg.heartbeat_interval, cfg.heartbeat_timeout),
        );
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
            discoveries: Arc::new(cfg.discoveries),
        })
    }

    pub fn id(&self) -> NodeId {
        self.endpoint.id()
    }

    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    /// The current view of the cluster.
    pub async fn view(&self) -> Result<ClusterView, RuntimeError> {
        self.membership.view().await.ok_or(RuntimeError::Stopped)
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
        self.membership.stop().await;
        self.endpoint.shutdown().await;
    }
}
