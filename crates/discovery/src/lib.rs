//! How Hearth nodes find each other. A [`Discovery`] publishes this node and
//! reports peers of the same cluster as [`DiscoveryEvent`]s; the membership
//! layer dials what it hears about and decides liveness itself (by QUIC
//! heartbeats: a node killed with SIGKILL stays in mDNS caches for minutes).
//!
//! Implementations: [`MdnsDiscovery`] (zero configuration on a LAN),
//! [`StaticDiscovery`] (`--peer HOST:PORT`, for networks that block
//! multicast), [`MemoryDiscovery`] (in-process tests).
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

mod mdns;
mod memory;
mod static_peers;

use std::net::SocketAddr;

pub use hearth_proto::NodeId;
pub use mdns::{MdnsDiscovery, SERVICE_TYPE};
pub use memory::{MemoryDiscovery, MemoryNetwork};
pub use static_peers::StaticDiscovery;
use tokio::sync::mpsc;

/// What a node publishes about itself. Never the cluster secret: only the
/// cluster id derived from it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Announcement {
    pub node_id: NodeId,
    pub name: String,
    /// Hex cluster id (see `hearth_net::ClusterSecret::cluster_id`).
    pub cluster_id: String,
    pub quic_port: u16,
    pub version: u16,
}

/// A peer worth dialing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerHint {
    /// Known for mDNS and in-memory peers; unknown for `--peer` addresses.
    pub node_id: Option<NodeId>,
    /// Addresses to try, best first.
    pub addrs: Vec<SocketAddr>,
    /// Which discovery reported it ("mdns", "static", "memory").
    pub source: &'static str,
}

/// What a discovery reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DiscoveryEvent {
    Found(PeerHint),
    /// The peer withdrew its announcement (a hint only: liveness comes
    /// from heartbeats).
    Lost(NodeId),
}

/// Errors starting a discovery.
#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    #[error("mDNS: {0}")]
    Mdns(String),
    #[error("bad peer address {addr:?}: {detail}")]
    BadPeer { addr: String, detail: String },
}

/// A way of finding peers.
pub trait Discovery: Send + Sync {
    /// Short name for logs.
    fn name(&self) -> &'static str;

    /// Publishes `me` and sends peers of `me.cluster_id` on `events` until
    /// [`Discovery::stop`] (or until the receiver is dropped).
    fn start(
        &self,
        me: &Announcement,
        events: mpsc::Sender<DiscoveryEvent>,
    ) -> Result<(), DiscoveryError>;

    /// Withdraws the announcement and stops reporting.
    fn stop(&self);
}

/// The background task of a discovery: replacing or stopping it aborts the
/// old one, and so does dropping the slot.
#[derive(Debug, Default)]
pub(crate) struct TaskSlot(std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>);

impl TaskSlot {
    pub(crate) fn set(&self, task: tokio::task::JoinHandle<()>) {
        let old = self.0.lock().ok().and_then(|mut t| t.replace(task));
        if let Some(old) = old {
            old.abort();
        }
    }

    pub(crate) fn stop(&self) {
        let old = self.0.lock().ok().and_then(|mut t| t.take());
        if let Some(old) = old {
            old.abort();
        }
    }
}

impl Drop for TaskSlot {
    fn drop(&mut self) {
        self.stop();
    }
}
