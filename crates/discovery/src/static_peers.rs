//! `--peer HOST:PORT`: addresses given by the user, resolved and reported
//! again every few seconds so a peer that starts later is still found.

use std::time::Duration;

use tokio::sync::mpsc;
use tracing::debug;

use crate::{Announcement, Discovery, DiscoveryError, DiscoveryEvent, PeerHint, TaskSlot};

/// How often static peers are reported again.
const REPEAT: Duration = Duration::from_secs(2);

/// Peers named on the command line.
#[derive(Debug)]
pub struct StaticDiscovery {
    peers: Vec<String>,
    task: TaskSlot,
}

impl StaticDiscovery {
    /// Checks that every entry looks like `HOST:PORT`.
    pub fn new(peers: Vec<String>) -> Result<Self, DiscoveryError> {
        for p in &peers {
            let ok = p
                .rsplit_once(':')
                .is_some_and(|(h, port)| !h.is_empty() && port.parse::<u16>().is_ok_and(|n| n > 0));
            if !ok {
                return Err(DiscoveryError::BadPeer {
                    addr: p.clone(),
                    detail: "expected HOST:PORT".into(),
                });
            }
        }
        Ok(Self {
            peers,
            task: TaskSlot::default(),
        })
    }
}

impl Discovery for StaticDiscovery {
    fn name(&self) -> &'static str {
        "static"
    }

    fn start(
        &self,
        _me: &Announcement,
        events: mpsc::Sender<DiscoveryEvent>,
    ) -> Result<(), DiscoveryError> {
        let peers = self.peers.clone();
        let task = tokio::spawn(async move {
            loop {
                for p in &peers {
                    match tokio::net::lookup_host(p.as_str()).await {
                        Ok(addrs) => {
                            let addrs: Vec<_> = addrs.collect();
                            if addrs.is_empty() {
                                continue;
                            }
                            let hint = PeerHint {
                                node_id: None,
                                addrs,
                                source: "static",
                            };
                            if events.send(DiscoveryEvent::Found(hint)).await.is_err() {
                                return;
                            }
                        }
                        Err(e) => debug!("cannot resolve peer {p}: {e}"),
                    }
                }
                tokio::time::sleep(REPEAT).await;
            }
        });
        self.task.set(task);
        Ok(())
    }

    fn stop(&self) {
        self.task.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_addresses_are_checked() {
        assert!(StaticDiscovery::new(vec!["10.0.0.1:7000".into(), "box.local:1".into()]).is_ok());
        for bad in ["10.0.0.1", ":7000", "host:0", "host:99999", "host:x"] {
            assert!(StaticDiscovery::new(vec![bad.into()]).is_err(), "{bad}");
        }
    }

    #[tokio::test]
    async fn reports_resolved_addresses_repeatedly() {
        let d = StaticDiscovery::new(vec!["127.0.0.1:4242".into()]).unwrap();
        let (tx, mut rx) = mpsc::channel(8);
        let me = Announcement {
            node_id: crate::NodeId([0; 32]),
            name: "me".into(),
            cluster_id: "c".into(),
            quic_port: 1,
            version: 1,
        };
        d.start(&me, tx).unwrap();
        for _ in 0..2 {
            let ev = tokio::time::timeout(Duration::from_secs(5), rx.recv())
                .await
                .unwrap()
                .unwrap();
            assert_eq!(
                ev,
                DiscoveryEvent::Found(PeerHint {
                    node_id: None,
                    addrs: vec!["127.0.0.1:4242".parse().unwrap()],
                    source: "static"
                })
            );
        }
        d.stop();
    }
}
