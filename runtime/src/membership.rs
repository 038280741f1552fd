//! Membership: an actor that owns the member table. Members are the peers
//! with an authenticated connection that answer heartbeats; a peer silent
//! for [`HEARTBEAT_TIMEOUT`] leaves (mDNS cannot tell: a killed node stays
//! in its caches for minutes). Discovery hints and member gossip feed a
//! table of candidates that are dialed with backoff.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use hearth_discovery::{DiscoveryEvent, PeerHint};
use hearth_net::framed::{expect, write_message};
use hearth_net::{Endpoint, IncomingStream, NetEvent, NodeId, PeerInfo, close_code};
use hearth_proto::{Message, PeerAddr, limits, stream_kind};
use tokio::sync::{broadcast, mpsc, oneshot, watch};
use tracing::{debug, info, warn};

use crate::view::{ClusterView, MemberState, MemberView};

/// How often each member is sent a heartbeat.
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_millis(300);
/// A member not heard from for this long leaves; with the interval and the
/// check period this removes a killed node within 3 s.
pub const HEARTBEAT_TIMEOUT: Duration = Duration::from_millis(2500);
/// How often the table is checked.
const CHECK_PERIOD: Duration = Duration::from_millis(100);
/// Most candidates kept (a home has far fewer devices; bounds what gossip
/// can make us remember).
const MAX_CANDIDATES: usize = 1024;
/// Most candidates from one source ("mdns", "gossip", ...): a flood of
/// spoofed mDNS records leaves room for gossip, and the reverse.
const MAX_PER_SOURCE: usize = MAX_CANDIDATES / 2;
/// Failed dials, with no success ever, after which a candidate that no
/// one typed in (`--peer`) is forgotten (discovery may report it again).
const EXPIRE_FAILURES: u32 = 3;
/// Longest wait between dial attempts to a candidate.
const MAX_BACKOFF: Duration = Duration::from_secs(10);

/// A change in membership.
#[derive(Debug, Clone, PartialEq)]
pub enum MembershipEvent {
    Joined(MemberView),
    Left {
        node_id: NodeId,
        name: String,
        reason: String,
    },
    LeaderChanged(NodeId),
}

#[derive(Debug)]
struct Member {
    info: PeerInfo,
    last_heard: Instant,
    rtt: Option<Duration>,
    heartbeat_in_flight: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum CandidateKey {
    Id(NodeId),
    Addr(SocketAddr),
}

#[derive(Debug)]
struct Candidate {
    addrs: Vec<SocketAddr>,
    source: &'static str,
    next_try: Instant,
    backoff: Duration,
    dialing: bool,
    warned: bool,
    /// Failed dials since it last answered.
    failures: u32,
    /// Whether a dial ever succeeded.
    answered: bool,
}

/// Messages to the actor.
enum Msg {
    View(oneshot::Sender<ClusterView>),
    Stop,
    HeartbeatOk {
        node: NodeId,
        rtt: Duration,
        peers: Vec<PeerAddr>,
    },
    HeartbeatFailed {
        node: NodeId,
    },
    HeardFrom {
        node: NodeId,
        peers: Vec<PeerAddr>,
    },
    DialDone {
        key: CandidateKey,
        result: Result<NodeId, String>,
    },
}

/// The actor's handle.
#[derive(Clone)]
pub(crate) struct Membership {
    tx: mpsc::Sender<Msg>,
    events: broadcast::Sender<MembershipEvent>,
    leader: watch::Receiver<NodeId>,
}

impl Membership {
    pub(crate) async fn view(&self) -> Option<ClusterView> {
        let (tx, rx) = oneshot::channel();
        self.tx.send(Msg::View(tx)).await.ok()?;
        rx.await.ok()
    }

    /// Stops the actor (no more dials or heartbeats).
    pub(crate) async fn stop(&self) {
        let _ = self.tx.send(Msg::Stop).await;
    }

    pub(crate) fn events(&self) -> broadcast::Receiver<MembershipEvent> {
        self.events.subscribe()
    }

    /// The leader as this node sees it now, kept current.
    pub(crate) fn leader(&self) -> watch::Receiver<NodeId> {
        self.leader.clone()
    }
}

/// Spawns the actor and the handler for incoming membership streams.
pub(crate) fn spawn(
    endpoint: Endpoint,
    cluster_id: String,
    discovery: mpsc::Receiver<DiscoveryEvent>,
    streams: mpsc::Receiver<IncomingStream>,
    timing: (Duration, Duration),
) -> Membership {
    let (tx, rx) = mpsc::channel(256);
    let events = broadcast::channel(256).0;
    let (leader_tx, leader_rx) = watch::channel(endpoint.id());
    let gossip: Arc<RwLock<Vec<PeerAddr>>> = Arc::default();
    let actor = Actor {
        net_events: endpoint.events(),
        endpoint,
        cluster_id,
        members: HashMap::new(),
        candidates: HashMap::new(),
        leader: None,
        leader_tx,
        seq: 0,
        tx: tx.clone(),
        events: events.clone(),
        gossip: gossip.clone(),
        interval: timing.0,
        timeout: timing.1,
        last_round: Instant::now(),
    };
    tokio::spawn(serve_streams(streams, tx.clone(), gossip));
    tokio::spawn(actor.run(rx, discovery));
    Membership {
        tx,
        events,
        leader: leader_rx,
    }
}

fn peers_of(m: Message) -> Result<Vec<PeerAddr>, Message> {
    match m {
        Message::Peers(p) => Ok(p),
        m => Err(m),
    }
}

/// Answers heartbeats: `Heartbeat`, `Peers` in; `HeartbeatAck`, `Peers` out.
async fn serve_streams(
    mut streams: mpsc::Receiver<IncomingStream>,
    tx: mpsc::Sender<Msg>,
    gossip: Arc<RwLock<Vec<PeerAddr>>>,
) {
    while let Some(mut s) = streams.recv().await {
        let tx = tx.clone();
        let gossip = gossip.clone();
        tokio::spawn(async move {
            let exchange = async {
                let max = limits::MAX_CONTROL_FRAME;
                let seq = expect(&mut s.recv, max, "heartbeat", |m| match m {
                    Message::Heartbeat { seq } => Ok(seq),
                    m => Err(m),
                })
                .await?;
                let peers = expect(&mut s.recv, max, "peers", peers_of).await?;
                let ours = gossip.read().map(|g| g.clone()).unwrap_or_default();
                write_message(&mut s.send, &Message::HeartbeatAck { seq }).await?;
                write_message(&mut s.send, &Message::Peers(ours)).await?;
                let _ = s.send.finish();
                Ok::<_, hearth_net::NetError>(peers)
            };
            match tokio::time::timeout(Duration::from_secs(2), exchange).await {
                Ok(Ok(peers)) => {
                    let _ = tx
                        .send(Msg::HeardFrom {
                            node: s.peer.node_id,
                            peers,
                        })
                        .await;
                }
                Ok(Err(e)) => debug!(peer = %s.peer.node_id.short(), "bad heartbeat: {e}"),
                Err(_) => debug!(peer = %s.peer.node_id.short(), "heartbeat timed out"),
            }
        });
    }
}

struct Actor {
    endpoint: Endpoint,
    net_events: broadcast::Receiver<NetEvent>,
    cluster_id: String,
    members: HashMap<NodeId, Member>,
    candidates: HashMap<CandidateKey, Candidate>,
    leader: Option<NodeId>,
    leader_tx: watch::Sender<NodeId>,
    seq: u64,
    tx: mpsc::Sender<Msg>,
    events: broadcast::Sender<MembershipEvent>,
    gossip: Arc<RwLock<Vec<PeerAddr>>>,
    interval: Duration,
    timeout: Duration,
    last_round: Instant,
}

impl Actor {
    async fn run(
        mut self,
        mut rx: mpsc::Receiver<Msg>,
        mut discovery: mpsc::Receiver<DiscoveryEvent>,
    ) {
        let mut tick = tokio::time::interval(CHECK_PERIOD);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        self.update_leader();
        let mut discovery_open = true;
        loop {
            tokio::select! {
                msg = rx.recv() => match msg {
                    Some(Msg::Stop) | None => break,
                    Some(m) => self.on_msg(m),
                },
                ev = self.net_events.recv() => match ev {
                    Ok(ev) => self.on_net(ev),
                    Err(broadcast::error::RecvError::Lagged(n)) => warn!("missed {n} network events"),
                    Err(broadcast::error::RecvError::Closed) => break,
                },
                ev = discovery.recv(), if discovery_open => match ev {
                    Some(ev) => self.on_discovery(ev),
                    None => discovery_open = false,
                },
                _ = tick.tick() => self.on_tick(),
            }
        }
    }

    fn on_msg(&mut self, msg: Msg) {
        match msg {
            Msg::View(reply) => {
                let _ = reply.send(self.view());
            }
            Msg::HeartbeatOk { node, rtt, peers } => {
                if let Some(m) = self.members.get_mut(&node) {
                    m.last_heard = Instant::now();
                    m.rtt = Some(rtt);
                    m.heartbeat_in_flight = false;
                }
                self.learn(peers);
            }
            Msg::HeartbeatFailed { node } => {
                if let Some(m) = self.members.get_mut(&node) {
                    m.heartbeat_in_flight = false;
                }
            }
            Msg::HeardFrom { node, peers } => {
                if let Some(m) = self.members.get_mut(&node) {
                    m.last_heard = Instant::now();
                }
                self.learn(peers);
            }
            Msg::DialDone { key, result } => self.on_dial_done(key, result),
            Msg::Stop => {}
        }
    }

    fn on_net(&mut self, ev: NetEvent) {
        match ev {
            NetEvent::PeerUp(info) => {
                if self.members.contains_key(&info.node_id) {
                    return;
                }
                let id = info.node_id;
                info!(peer = %id.short(), name = %info.name, addr = %info.addr, "member joined");
                self.members.insert(
                    id,
                    Member {
                        info,
                        last_heard: Instant::now(),
                        rtt: None,
                        heartbeat_in_flight: false,
                    },
                );
                if let Some(c) = self.candidates.get_mut(&CandidateKey::Id(id)) {
                    c.backoff = Duration::ZERO;
                }
                let view = self.member_view(id);
                self.publish_gossip();
                if let Some(v) = view {
                    let _ = self.events.send(MembershipEvent::Joined(v));
                }
                self.update_leader();
            }
            NetEvent::PeerDown { node_id, reason } => self.remove(node_id, reason),
            NetEvent::Rejected { addr, reason } => {
                debug!(%addr, "connection rejected: {reason}");
            }
        }
    }

    fn on_discovery(&mut self, ev: DiscoveryEvent) {
        match ev {
            DiscoveryEvent::Found(hint) => self.add_candidate(hint),
            DiscoveryEvent::Lost(id) => {
                self.candidates.remove(&CandidateKey::Id(id));
            }
        }
    }

    /// Peers a member told us about become candidates.
    fn learn(&mut self, peers: Vec<PeerAddr>) {
        for p in peers {
            self.add_candidate(PeerHint {
                node_id: Some(NodeId(p.node_id)),
                addrs: vec![p.addr],
                source: "gossip",
            });
        }
    }

    fn add_candidate(&mut self, hint: PeerHint) {
        let hint = PeerHint {
            addrs: hint
                .addrs
                .into_iter()
                .filter(|a| !a.ip().is_unspecified() && a.port() != 0)
                .collect(),
            ..hint
        };
        let Some(first) = hint.addrs.first().copied() else {
            return;
        };
        if hint.node_id == Some(self.endpoint.id()) {
            return;
        }
        let key = match hint.node_id {
            Some(id) => CandidateKey::Id(id),
            None => CandidateKey::Addr(first),
        };
        if !self.candidates.contains_key(&key) && !self.make_room(hint.source) {
            debug!("candidate table full; ignoring {key:?}");
            return;
        }
        let c = self.candidates.entry(key).or_insert_with(|| Candidate {
            addrs: Vec::new(),
            source: hint.source,
            next_try: Instant::now(),
            backoff: Duration::ZERO,
            dialing: false,
            warned: false,
            failures: 0,
            answered: false,
        });
        for a in hint.addrs {
            if !c.addrs.contains(&a) && c.addrs.len() < 8 {
                c.addrs.push(a);
            }
        }
    }

    /// Makes room for one more candidate from `source` if the table (or
    /// that source's share) is full, by forgetting one that is not a member
    /// and was not typed in: the one that failed most, else any (chosen at
    /// random, so hints that keep arriving cannot keep an honest newcomer
    /// out). Returns whether there is room.
    fn make_room(&mut self, source: &'static str) -> bool {
        let of_source = self
            .candidates
            .values()
            .filter(|c| c.source == source)
            .count();
        let source_full = of_source >= MAX_PER_SOURCE;
        if !source_full && self.candidates.len() < MAX_CANDIDATES {
            return true;
        }
        let victim = self
            .candidates
            .iter()
            .filter(|(k, c)| {
                c.source != "static"
                    && (!source_full || c.source == source)
                    && !self.connected(k, c)
            })
            .max_by_key(|(_, c)| (c.failures, !c.dialing, rand::random::<u32>()))
            .map(|(k, _)| k.clone());
        match victim {
            Some(k) => {
                self.candidates.remove(&k);
                true
            }
            None => false,
        }
    }

    fn connected(&self, key: &CandidateKey, c: &Candidate) -> bool {
        match key {
            CandidateKey::Id(id) => self.members.contains_key(id),
            CandidateKey::Addr(_) => self
                .members
                .values()
                .any(|m| c.addrs.contains(&m.info.addr)),
        }
    }

    fn on_tick(&mut self) {
        let now = Instant::now();
        // Leave: silent for too long.
        let silent: Vec<NodeId> = self
            .members
            .iter()
            .filter(|(_, m)| now.duration_since(m.last_heard) > self.timeout)
            .map(|(id, _)| *id)
            .collect();
        for id in silent {
            if let Some(c) = self.endpoint.peer(id) {
                c.close(close_code::PEER_TIMEOUT, "missed heartbeats");
            }
            let secs = self.timeout.as_secs_f32();
            self.remove(id, format!("no heartbeat for {secs:.1} s"));
        }
        // Heartbeats.
        if now.duration_since(self.last_round) >= self.interval {
            self.last_round = now;
            let ids: Vec<NodeId> = self
                .members
                .iter()
                .filter(|(_, m)| !m.heartbeat_in_flight)
                .map(|(id, _)| *id)
                .collect();
            for id in ids {
                self.send_heartbeat(id);
            }
        }
        // Dials.
        let due: Vec<CandidateKey> = self
            .candidates
            .iter()
            .filter(|(k, c)| !c.dialing && c.next_try <= now && !self.connected(k, c))
            .map(|(k, _)| k.clone())
            .collect();
        for key in due {
            self.dial(key);
        }
    }

    fn send_heartbeat(&mut self, id: NodeId) {
        let Some(conn) = self.endpoint.peer(id) else {
            return;
        };
        let Some(m) = self.members.get_mut(&id) else {
            return;
        };
        m.heartbeat_in_flight = true;
        self.seq += 1;
        let seq = self.seq;
        let ours = self.gossip.read().map(|g| g.clone()).unwrap_or_default();
        let tx = self.tx.clone();
        let limit = self.timeout;
        tokio::spawn(async move {
            let start = Instant::now();
            let exchange = async {
                let (mut send, mut recv) = conn.open(stream_kind::MEMBERSHIP).await?;
                write_message(&mut send, &Message::Heartbeat { seq }).await?;
                write_message(&mut send, &Message::Peers(ours)).await?;
                let _ = send.finish();
                let max = limits::MAX_CONTROL_FRAME;
                expect(&mut recv, max, "heartbeat-ack", |m| match m {
                    Message::HeartbeatAck { seq: s } if s == seq => Ok(()),
                    m => Err(m),
                })
                .await?;
                let rtt = start.elapsed();
                let peers = expect(&mut recv, max, "peers", peers_of).await?;
                Ok::<_, hearth_net::NetError>((rtt, peers))
            };
            let msg = match tokio::time::timeout(limit, exchange).await {
                Ok(Ok((rtt, peers))) => Msg::HeartbeatOk {
                    node: id,
                    rtt,
                    peers,
                },
                Ok(Err(e)) => {
                    debug!(peer = %id.short(), "heartbeat failed: {e}");
                    Msg::HeartbeatFailed { node: id }
                }
                Err(_) => Msg::HeartbeatFailed { node: id },
            };
            let _ = tx.send(msg).await;
        });
    }

    fn dial(&mut self, key: CandidateKey) {
        let Some(c) = self.candidates.get_mut(&key) else {
            return;
        };
        c.dialing = true;
        let addrs = c.addrs.clone();
        let endpoint = self.endpoint.clone();
        let tx = self.tx.clone();
        tokio::spawn(async move {
            let mut last = String::from("no address");
            let mut result = Err(last.clone());
            for a in addrs {
                match endpoint.connect(a).await {
                    Ok(conn) => {
                        result = Ok(conn.info().node_id);
                        break;
                    }
                    Err(e) => {
                        last = e.to_string();
                        result = Err(last.clone());
                    }
                }
            }
            let _ = tx.send(Msg::DialDone { key, result }).await;
        });
    }

    fn on_dial_done(&mut self, key: CandidateKey, result: Result<NodeId, String>) {
        let Some(c) = self.candidates.get_mut(&key) else {
            return;
        };
        c.dialing = false;
        match result {
            Ok(_) => {
                c.backoff = Duration::ZERO;
                c.warned = false;
                c.failures = 0;
                c.answered = true;
            }
            Err(e) => {
                c.failures = c.failures.saturating_add(1);
                if !c.answered && c.failures >= EXPIRE_FAILURES && c.source != "static" {
                    debug!(
                        source = c.source,
                        "forgetting {:?}: never answered", c.addrs
                    );
                    self.candidates.remove(&key);
                    return;
                }
                c.backoff = (c.backoff * 2).clamp(Duration::from_millis(500), MAX_BACKOFF);
                c.next_try = Instant::now() + c.backoff;
                if !c.warned {
                    warn!(source = c.source, "cannot join {:?}: {e}", c.addrs);
                    c.warned = true;
                } else {
                    debug!(source = c.source, "cannot join {:?}: {e}", c.addrs);
                }
            }
        }
    }

    fn remove(&mut self, id: NodeId, reason: String) {
        let Some(m) = self.members.remove(&id) else {
            return;
        };
        info!(peer = %id.short(), name = %m.info.name, "member left: {reason}");
        // Dial again if discovery still lists it, after a pause.
        if let Some(c) = self.candidates.get_mut(&CandidateKey::Id(id)) {
            c.backoff = Duration::from_secs(1);
            c.next_try = Instant::now() + c.backoff;
        }
        self.publish_gossip();
        let _ = self.events.send(MembershipEvent::Left {
            node_id: id,
            name: m.info.name,
            reason,
        });
        self.update_leader();
    }

    fn update_leader(&mut self) {
        let me = self.endpoint.id();
        let leader = self.members.keys().copied().chain([me]).min().unwrap_or(me);
        if self.leader != Some(leader) {
            self.leader = Some(leader);
            self.leader_tx.send_replace(leader);
            info!(leader = %leader.short(), "leader");
            let _ = self.events.send(MembershipEvent::LeaderChanged(leader));
        }
    }

    fn publish_gossip(&self) {
        let list: Vec<PeerAddr> = self
            .members
            .values()
            .take(limits::MAX_PEERS)
            .map(|m| PeerAddr {
                node_id: m.info.node_id.0,
                addr: m.info.addr,
            })
            .collect();
        if let Ok(mut g) = self.gossip.write() {
            *g = list;
        }
    }

    fn member_view(&self, id: NodeId) -> Option<MemberView> {
        let m = self.members.get(&id)?;
        Some(MemberView {
            node_id: id.to_string(),
            name: m.info.name.clone(),
            address: m.info.addr.to_string(),
            state: MemberState::Alive,
            version: m.info.version,
            last_heartbeat_age_ms: m.last_heard.elapsed().as_millis() as u64,
            rtt_ms: m.rtt.map(|r| r.as_secs_f64() * 1e3),
            leader: self.leader == Some(id),
        })
    }

    fn view(&self) -> ClusterView {
        let me = self.endpoint.id();
        let leader = self.leader.unwrap_or(me);
        let mut ids: Vec<NodeId> = self.members.keys().copied().collect();
        ids.sort();
        let local = MemberView {
            node_id: me.to_string(),
            name: self.endpoint.name().to_string(),
            address: self
                .endpoint
                .local_addr()
                .map(|a| a.to_string())
                .unwrap_or_default(),
            state: MemberState::Local,
            version: hearth_proto::PROTOCOL_VERSION,
            last_heartbeat_age_ms: 0,
            rtt_ms: None,
            leader: leader == me,
        };
        ClusterView {
            node_id: me.to_string(),
            name: self.endpoint.name().to_string(),
            cluster_id: self.cluster_id.clone(),
            leader: leader.to_string(),
            members: std::iter::once(local)
                .chain(ids.into_iter().filter_map(|id| self.member_view(id)))
                .collect(),
            profiles: None,
            placement: None,
            predicted_now: None,
        }
    }
}
