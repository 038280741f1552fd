//! In-memory discovery for in-process clusters: every node sharing a
//! [`MemoryNetwork`] sees the others of its cluster at once.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};

use tokio::sync::{broadcast, mpsc};

use crate::{Announcement, Discovery, DiscoveryError, DiscoveryEvent, NodeId, PeerHint, TaskSlot};

#[derive(Debug, Clone)]
enum Change {
    Up(Announcement),
    Down(NodeId),
}

/// The shared "LAN" of in-memory discoveries.
#[derive(Debug, Clone)]
pub struct MemoryNetwork {
    nodes: Arc<Mutex<HashMap<NodeId, Announcement>>>,
    changes: broadcast::Sender<Change>,
}

impl Default for MemoryNetwork {
    fn default() -> Self {
        Self {
            nodes: Arc::default(),
            changes: broadcast::channel(256).0,
        }
    }
}

impl MemoryNetwork {
    pub fn new() -> Self {
        Self::default()
    }

    /// A discovery on this network.
    pub fn discovery(&self) -> MemoryDiscovery {
        MemoryDiscovery {
            net: self.clone(),
            me: Mutex::new(None),
            task: TaskSlot::default(),
        }
    }

    /// Withdraws a node's announcement, as if it left the network.
    pub fn remove(&self, id: NodeId) {
        if let Ok(mut n) = self.nodes.lock() {
            n.remove(&id);
        }
        let _ = self.changes.send(Change::Down(id));
    }
}

/// One node's view of a [`MemoryNetwork`]; every node is on 127.0.0.1.
#[derive(Debug)]
pub struct MemoryDiscovery {
    net: MemoryNetwork,
    me: Mutex<Option<NodeId>>,
    task: TaskSlot,
}

fn hint(a: &Announcement) -> PeerHint {
    PeerHint {
        node_id: Some(a.node_id),
        addrs: vec![SocketAddr::new(
            IpAddr::V4(Ipv4Addr::LOCALHOST),
            a.quic_port,
        )],
        source: "memory",
    }
}

impl Discovery for MemoryDiscovery {
    fn name(&self) -> &'static str {
        "memory"
    }

    fn start(
        &self,
        me: &Announcement,
        events: mpsc::Sender<DiscoveryEvent>,
    ) -> Result<(), DiscoveryError> {
        let mut changes = self.net.changes.subscribe();
        let existing: Vec<Announcement> = match self.net.nodes.lock() {
            Ok(mut n) => {
                n.insert(me.node_id, me.clone());
                n.values().cloned().collect()
            }
            Err(_) => Vec::new(),
        };
        let _ = self.net.changes.send(Change::Up(me.clone()));
        if let Ok(mut m) = self.me.lock() {
            *m = Some(me.node_id);
        }
        let me = me.clone();
        let relevant =
            move |a: &Announcement| a.node_id != me.node_id && a.cluster_id == me.cluster_id;
        let task = tokio::spawn(async move {
            for a in existing.iter().filter(|a| relevant(a)) {
                if events.send(DiscoveryEvent::Found(hint(a))).await.is_err() {
                    return;
                }
            }
            loop {
                let ev = match changes.recv().await {
                    Ok(Change::Up(a)) if relevant(&a) => DiscoveryEvent::Found(hint(&a)),
                    Ok(Change::Down(id)) => DiscoveryEvent::Lost(id),
                    Ok(_) => continue,
                    Err(broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(broadcast::error::RecvError::Closed) => return,
                };
                if events.send(ev).await.is_err() {
                    return;
                }
            }
        });
        self.task.set(task);
        Ok(())
    }

    fn stop(&self) {
        self.task.stop();
        let me = self.me.lock().ok().and_then(|mut m| m.take());
        if let Some(id) = me {
            self.net.remove(id);
        }
    }
}
