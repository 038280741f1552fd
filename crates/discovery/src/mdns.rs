//! mDNS / DNS-SD with mdns-sd: service `_hearth._udp.local.`, one instance
//! per node, TXT `id` (node id), `cluster` (cluster id), `port` (QUIC),
//! `v` (protocol version), `name`. Addresses are published automatically
//! (and follow interface changes); browsing is continuous.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr, SocketAddrV6};
use std::sync::Mutex;

use mdns_sd::{ResolvedService, ScopedIp, ServiceDaemon, ServiceEvent, ServiceInfo};
use tokio::sync::mpsc;
use tracing::{debug, warn};

use crate::{Announcement, Discovery, DiscoveryError, DiscoveryEvent, NodeId, PeerHint};

/// The DNS-SD service type.
pub const SERVICE_TYPE: &str = "_hearth._udp.local.";

/// Zero-configuration discovery on the local network.
#[derive(Default)]
pub struct MdnsDiscovery {
    state: Mutex<Option<(ServiceDaemon, String)>>,
}

impl std::fmt::Debug for MdnsDiscovery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MdnsDiscovery")
    }
}

impl MdnsDiscovery {
    pub fn new() -> Self {
        Self::default()
    }
}

fn err(e: impl std::fmt::Display) -> DiscoveryError {
    DiscoveryError::Mdns(e.to_string())
}

/// The peer a resolved service describes, if it is a member of our cluster
/// and speaks our version.
fn parse(svc: &ResolvedService, me: &Announcement) -> Option<(NodeId, PeerHint)> {
    let id: NodeId = svc.get_property_val_str("id")?.parse().ok()?;
    if id == me.node_id || svc.get_property_val_str("cluster")? != me.cluster_id {
        return None;
    }
    let version: u16 = svc.get_property_val_str("v")?.parse().ok()?;
    if version != me.version {
        debug!(peer = %id.short(), version, "ignoring a node of another protocol version");
        return None;
    }
    let port = svc
        .get_property_val_str("port")
        .and_then(|p| p.parse().ok())
        .unwrap_or(svc.get_port());
    let mut addrs: Vec<SocketAddr> = svc
        .get_addresses()
        .iter()
        .filter_map(|ip| match ip {
            ScopedIp::V4(v4) => Some(SocketAddr::new(IpAddr::V4(*v4.addr()), port)),
            ScopedIp::V6(v6) => {
                let scope = v6.scope_id().index;
                let link_local = v6.addr().segments()[0] & 0xffc0 == 0xfe80;
                (!link_local || scope != 0)
                    .then(|| SocketAddr::V6(SocketAddrV6::new(*v6.addr(), port, 0, scope)))
            }
            _ => None, // ScopedIp is non_exhaustive
        })
        .collect();
    // IPv4 first: it is what most home networks route.
    addrs.sort_by_key(|a| (a.is_ipv6(), a.ip().is_loopback(), *a));
    if addrs.is_empty() {
        return None;
    }
    Some((
        id,
        PeerHint {
            node_id: Some(id),
            addrs,
            source: "mdns",
        },
    ))
}

impl Discovery for MdnsDiscovery {
    fn name(&self) -> &'static str {
        "mdns"
    }

    fn start(
        &self,
        me: &Announcement,
        events: mpsc::Sender<DiscoveryEvent>,
    ) -> Result<(), DiscoveryError> {
        let daemon = ServiceDaemon::new().map_err(err)?;
        // Instance and host names are the node id: unique, no probing races.
        let short = &me.node_id.to_string()[..16];
        let instance = format!("hearth-{short}");
        let host = format!("hearth-{short}.local.");
        let props = [
            ("id", me.node_id.to_string()),
            ("cluster", me.cluster_id.clone()),
            ("port", me.quic_port.to_string()),
            ("v", me.version.to_string()),
            ("name", me.name.chars().take(63).collect()),
        ];
        let mut info =
            ServiceInfo::new(SERVICE_TYPE, &instance, &host, (), me.quic_port, &props[..])
                .map_err(err)?
                .enable_addr_auto();
        // Names derive from the node id (a key hash), so they cannot clash:
        // skip RFC 6762 probing, which delays the first announcement ~750 ms.
        info.set_requires_probe(false);
        let fullname = info.get_fullname().to_string();
        daemon.register(info).map_err(err)?;
        let rx = daemon.browse(SERVICE_TYPE).map_err(err)?;
        let me = me.clone();
        tokio::spawn(async move {
            let mut names: HashMap<String, NodeId> = HashMap::new();
            while let Ok(ev) = rx.recv_async().await {
                let out = match ev {
                    ServiceEvent::ServiceResolved(svc) => match parse(&svc, &me) {
                        Some((id, hint)) => {
                            names.insert(svc.fullname.clone(), id);
                            DiscoveryEvent::Found(hint)
                        }
                        None => continue,
                    },
                    ServiceEvent::ServiceRemoved(_, name) => match names.remove(&name) {
                        Some(id) => DiscoveryEvent::Lost(id),
                        None => continue,
                    },
                    _ => continue,
                };
                if events.send(out).await.is_err() {
                    break;
                }
            }
        });
        if let Ok(mut s) = self.state.lock()
            && let Some((old, name)) = s.replace((daemon, fullname))
        {
            let _ = old.unregister(&name);
            let _ = old.shutdown();
        }
        Ok(())
    }

    fn stop(&self) {
        let state = self.state.lock().ok().and_then(|mut s| s.take());
        if let Some((daemon, name)) = state {
            // Goodbye packets tell peers at once; then stop the daemon.
            if let Ok(rx) = daemon.unregister(&name) {
                let _ = rx.recv_timeout(std::time::Duration::from_millis(500));
            }
            if let Err(e) = daemon.shutdown() {
                warn!("mDNS shutdown: {e}");
            }
        }
    }
}

impl Drop for MdnsDiscovery {
    fn drop(&mut self) {
        self.stop();
    }
}
