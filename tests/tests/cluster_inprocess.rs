//! A whole cluster in one process (each node on its own runtime, real QUIC
//! on loopback, in-memory discovery): it forms, elects the lowest node id,
//! learns members by gossip, and removes a killed node within 3 s.
#![allow(clippy::print_stdout)] // Prints the figures it measures.

use std::time::{Duration, Instant};

use anyhow::Result;
use hearth_discovery::{Discovery, MemoryNetwork, StaticDiscovery};
use hearth_net::ClusterSecret;
use hearth_runtime::{MemberState, MembershipEvent};
use hearth_test_utils::cluster::{TestNode, wait_for_views};

fn mem(net: &MemoryNetwork) -> Vec<Box<dyn Discovery>> {
    vec![Box::new(net.discovery())]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_form_and_a_killed_node_leaves_within_3s() -> Result<()> {
    let net = MemoryNetwork::new();
    let secret = ClusterSecret::generate();
    let a = TestNode::start("a", &secret, mem(&net))?;
    let b = TestNode::start("b", &secret, mem(&net))?;
    let c = TestNode::start("c", &secret, mem(&net))?;
    let formed = wait_for_views(&[&a, &b, &c], Duration::from_secs(10), |v| {
        v.members.len() == 3
    })
    .await?;
    println!("3-node in-memory cluster formed in {formed:?}");

    // Everyone agrees on the leader: the lowest node id.
    let lowest = [a.node.id(), b.node.id(), c.node.id()]
        .into_iter()
        .min()
        .unwrap();
    for n in [&a, &b, &c] {
        let v = n.view().await?;
        assert_eq!(v.leader, lowest.to_string());
        assert_eq!(v.members.iter().filter(|m| m.leader).count(), 1);
        assert_eq!(v.members[0].state, MemberState::Local);
        assert!(v.members[1..].iter().all(|m| m.state == MemberState::Alive));
        assert!(
            v.members
                .iter()
                .all(|m| m.address.starts_with("127.0.0.1:"))
        );
    }
    // Heartbeats flow: ages stay well under the timeout and RTTs appear.
    tokio::time::sleep(Duration::from_millis(800)).await;
    let v = a.view().await?;
    for m in &v.members[1..] {
        assert!(m.last_heartbeat_age_ms < 1500, "{m:?}");
        assert!(m.rtt_ms.is_some(), "{m:?}");
    }

    // Kill c abruptly: no close frame, no goodbye. It stays in discovery.
    let mut a_events = a.node.events();
    let c_id = c.node.id();
    let killed = Instant::now();
    c.kill();
    let detected = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match a_events.recv().await {
                Ok(MembershipEvent::Left {
                    node_id, reason, ..
                }) if node_id == c_id => {
                    return (killed.elapsed(), reason);
                }
                Ok(_) => continue,
                Err(e) => panic!("{e}"),
            }
        }
    })
    .await?;
    println!(
        "killed node detected after {:?} ({})",
        detected.0, detected.1
    );
    assert!(
        detected.0 <= Duration::from_secs(3),
        "took {:?}",
        detected.0
    );
    assert!(detected.1.contains("heartbeat"), "{}", detected.1);
    wait_for_views(&[&a, &b], Duration::from_secs(3), |v| v.members.len() == 2).await?;

    // A graceful leave is seen at once.
    let b_id = b.node.id();
    let left = Instant::now();
    b.shutdown();
    let took = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            if let Ok(MembershipEvent::Left { node_id, .. }) = a_events.recv().await
                && node_id == b_id
            {
                return left.elapsed();
            }
        }
    })
    .await?;
    println!("graceful leave seen after {took:?}");
    assert!(took < Duration::from_secs(1), "{took:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_static_peer_is_enough_to_meet_everyone() -> Result<()> {
    let secret = ClusterSecret::generate();
    let a = TestNode::start("a", &secret, vec![])?;
    let a_addr = a.node.endpoint().local_addr()?.to_string();
    let peer = |addr: &str| -> Vec<Box<dyn Discovery>> {
        vec![Box::new(
            StaticDiscovery::new(vec![addr.to_string()]).unwrap(),
        )]
    };
    let b = TestNode::start("b", &secret, peer(&a_addr))?;
    let c = TestNode::start("c", &secret, peer(&a_addr))?;
    // b and c only know a; they meet through a's member gossip.
    let t = wait_for_views(&[&a, &b, &c], Duration::from_secs(10), |v| {
        v.members.len() == 3
    })
    .await?;
    println!("full mesh through gossip in {t:?}");
    let v = b.view().await?;
    assert!(
        v.members
            .iter()
            .any(|m| m.node_id == c.node.id().to_string())
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_with_another_secret_never_joins() -> Result<()> {
    let net = MemoryNetwork::new();
    let secret = ClusterSecret::generate();
    let a = TestNode::start("a", &secret, mem(&net))?;
    let b = TestNode::start("b", &secret, mem(&net))?;
    // The intruder is told a's address directly (discovery would hide a
    // cluster with another id) and keeps trying.
    let a_addr = a.node.endpoint().local_addr()?.to_string();
    let x = TestNode::start(
        "intruder",
        &ClusterSecret::generate(),
        vec![Box::new(StaticDiscovery::new(vec![a_addr])?)],
    )?;
    wait_for_views(&[&a, &b], Duration::from_secs(10), |v| v.members.len() == 2).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    for n in [&a, &b] {
        let v = n.view().await?;
        assert_eq!(v.members.len(), 2, "{v:#?}");
        assert!(v.members.iter().all(|m| m.name != "intruder"));
    }
    assert_eq!(x.view().await?.members.len(), 1);
    assert!(x.node.endpoint().peers().is_empty());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_membership_streams_do_not_hurt_a_node() -> Result<()> {
    use hearth_net::{Endpoint, EndpointConfig, Identity};
    use hearth_proto::{Message, PeerAddr, stream_kind};

    let secret = ClusterSecret::generate();
    let a = TestNode::start("a", &secret, vec![])?;
    // A member that speaks nonsense on its membership streams.
    let (rogue, _rx) = Endpoint::bind(
        EndpointConfig {
            identity: Identity::generate()?,
            secret: secret.clone(),
            name: "rogue".into(),
            bind: "127.0.0.1:0".parse()?,
        },
        &[],
    )?;
    let conn = rogue.connect(a.node.endpoint().local_addr()?).await?;
    let payloads: Vec<Vec<u8>> = vec![
        vec![0xff; 64],
        vec![5, 0, 0, 0, 0x06, 1],
        (u32::MAX).to_le_bytes().to_vec(),
        hearth_proto::encode_frame(&Message::AuthOk)?,
        // A heartbeat followed by gossip pointing at nonsense addresses.
        [
            hearth_proto::encode_frame(&Message::Heartbeat { seq: 1 })?,
            hearth_proto::encode_frame(&Message::Peers(vec![
                PeerAddr {
                    node_id: [0; 32],
                    addr: "0.0.0.0:0".parse()?,
                };
                50
            ]))?,
        ]
        .concat(),
    ];
    for p in payloads {
        let (mut s, _r) = conn.open(stream_kind::MEMBERSHIP).await?;
        s.write_all(&p).await?;
        let _ = s.finish();
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    // The node still answers, and honest members still join.
    let b = TestNode::start(
        "b",
        &secret,
        vec![Box::new(StaticDiscovery::new(vec![
            a.node.endpoint().local_addr()?.to_string(),
        ])?)],
    )?;
    // Each view holds itself, so both names present means both met.
    wait_for_views(&[&a, &b], Duration::from_secs(10), |v| {
        ["a", "b"]
            .iter()
            .all(|n| v.members.iter().any(|m| m.name == *n))
    })
    .await?;
    rogue.shutdown().await;
    Ok(())
}
