//! Two mDNS discoveries on this host find each other (same cluster) and
//! ignore a third (other cluster). Across real hosts this is tested in
//! network namespaces (tests/ crate); here it runs over whatever interfaces
//! the machine has, so it is skipped with a reason when none carries
//! multicast.

use std::time::Duration;

use hearth_discovery::{Announcement, Discovery, DiscoveryEvent, MdnsDiscovery, NodeId};
use tokio::sync::mpsc;

fn ann(id: u8, cluster: &str) -> Announcement {
    Announcement {
        node_id: NodeId([id; 32]),
        name: format!("n{id}"),
        cluster_id: cluster.into(),
        quic_port: 7000 + u16::from(id),
        version: 1,
    }
}

#[tokio::test]
async fn mdns_peers_of_one_cluster_find_each_other() {
    let (a, b, c) = (
        MdnsDiscovery::new(),
        MdnsDiscovery::new(),
        MdnsDiscovery::new(),
    );
    let (ta, mut ra) = mpsc::channel(64);
    let (tb, _rb) = mpsc::channel(64);
    let (tc, _rc) = mpsc::channel(64);
    a.start(&ann(1, "aaaa"), ta).unwrap();
    b.start(&ann(2, "aaaa"), tb).unwrap();
    c.start(&ann(3, "bbbb"), tc).unwrap();
    let found = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match ra.recv().await {
                Some(DiscoveryEvent::Found(h)) => {
                    assert_ne!(h.node_id, Some(NodeId([3; 32])), "other cluster reported");
                    if h.node_id == Some(NodeId([2; 32])) {
                        return h;
                    }
                }
                Some(_) => {}
                None => panic!("discovery ended"),
            }
        }
    })
    .await;
    let Ok(hint) = found else {
        eprintln!(
            "SKIPPED: no mDNS answer on this host's interfaces within 10 s (no multicast-capable interface?); the namespace test covers mDNS"
        );
        return;
    };
    assert!(hint.addrs.iter().all(|a| a.port() == 7002), "{hint:?}");
    // Withdrawal is reported.
    b.stop();
    let lost = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            if let Some(DiscoveryEvent::Lost(id)) = ra.recv().await {
                return id;
            }
        }
    })
    .await
    .unwrap();
    assert_eq!(lost, NodeId([2; 32]));
    a.stop();
    c.stop();
}
