//! The profile book: this node's profile and the latest profile of every
//! member. It answers profile requests, fetches members' profiles when they
//! join and every [`PROFILE_REFRESH`] after, and measures the link to each
//! member when it joins and every [`PROBE_PERIOD`](super::PROBE_PERIOD).

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use hearth_net::framed::{expect, write_message};
use hearth_net::{Endpoint, IncomingStream, NetError, NodeId, PeerConn};
use hearth_proto::{Message, limits, stream_kind};
use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, mpsc, watch};
use tracing::{debug, info, warn};

use super::links::{PROBE_BYTES, measure_link};
use super::{LinkProfile, ModelInfo, NodeProfile, unix_now};
use crate::MembershipEvent;

/// How often members' profiles are fetched again (they carry their links,
/// which change as those are re-measured).
pub const PROFILE_REFRESH: Duration = Duration::from_secs(2);
/// How often this node samples what the machine offers it.
pub const OFFER_PERIOD: Duration = Duration::from_secs(1);
/// A change of the cores available by more than this ratio makes the live
/// figures start over (they were taken under another offer).
pub(crate) const OFFER_CHANGE: f64 = 1.2;
/// Longest a profile request may take.
const FETCH_TIMEOUT: Duration = Duration::from_secs(3);

/// Every known profile: this node's first, then the members' by node id.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ClusterProfiles {
    pub nodes: Vec<NodeProfile>,
}

#[derive(Debug)]
struct Inner {
    own: NodeProfile,
    /// The model this node serves, with its cost profile.
    model: Option<ModelInfo>,
    /// Links measured from this node, by peer.
    links: HashMap<NodeId, LinkProfile>,
    peers: HashMap<NodeId, NodeProfile>,
    /// What the machine offers now.
    offer: Option<super::Offer>,
    /// Cores available when the live figures last started over.
    live_cores: Option<f64>,
    live: Arc<super::LiveMeter>,
}

impl Inner {
    /// This node's profile as members see it: with the served model's
    /// times and the links measured so far.
    fn own_profile(&self) -> NodeProfile {
        let mut p = self.own.clone();
        p.model = self.model.as_ref().map(|m| m.times.clone());
        let mut links: Vec<LinkProfile> = self.links.values().cloned().collect();
        links.sort_by(|a, b| a.peer.cmp(&b.peer));
        p.links = links;
        p.offer = self.offer;
        p.live = self.live.figures();
        p
    }
}

/// Handle to the book; cheap to clone. Its tasks stop with [`ProfileBook::stop`]
/// or when the node's endpoint closes.
#[derive(Debug, Clone)]
pub struct ProfileBook {
    inner: Arc<RwLock<Inner>>,
    stop: watch::Sender<bool>,
}

impl ProfileBook {
    /// Starts serving `own` and tracking the members' profiles.
    pub(crate) fn spawn(
        endpoint: Endpoint,
        own: NodeProfile,
        profile_streams: mpsc::Receiver<IncomingStream>,
        probe_streams: mpsc::Receiver<IncomingStream>,
        events: broadcast::Receiver<MembershipEvent>,
        probe_period: Duration,
    ) -> Self {
        let inner = Arc::new(RwLock::new(Inner {
            own,
            model: None,
            links: HashMap::new(),
            peers: HashMap::new(),
            offer: None,
            live_cores: None,
            live: Arc::default(),
        }));
        let (stop, stopped) = watch::channel(false);
        tokio::spawn(sample_offer(inner.clone(), stopped.clone()));
        tokio::spawn(serve_profiles(profile_streams, inner.clone()));
        tokio::spawn(super::links::serve(probe_streams));
        tokio::spawn(track(
            endpoint,
            inner.clone(),
            events,
            stopped,
            probe_period,
        ));
        Self { inner, stop }
    }

    /// This node's profile and those of `members` (node ids, hex).
    pub fn snapshot(&self, members: &[String]) -> ClusterProfiles {
        let Ok(i) = self.inner.read() else {
            return ClusterProfiles { nodes: Vec::new() };
        };
        let mut peers: Vec<(String, NodeProfile)> = i
            .peers
            .iter()
            .map(|(id, p)| (id.to_string(), p.clone()))
            .filter(|(id, _)| members.contains(id))
            .collect();
        peers.sort_by(|a, b| a.0.cmp(&b.0));
        let mut nodes = vec![i.own_profile()];
        nodes.extend(peers.into_iter().map(|(_, p)| p));
        ClusterProfiles { nodes }
    }

    /// Sets the model this node serves (its measured times go into the
    /// profile members fetch).
    pub(crate) fn set_model(&self, info: ModelInfo) {
        if let Ok(mut i) = self.inner.write() {
            i.live.rebase(info.times.clone());
            i.model = Some(info);
        }
    }

    /// This node serves no model any more.
    pub(crate) fn clear_model(&self) {
        if let Ok(mut i) = self.inner.write() {
            i.model = None;
        }
    }

    /// The model this node serves.
    pub(crate) fn model(&self) -> Option<ModelInfo> {
        self.inner.read().ok().and_then(|i| i.model.clone())
    }

    /// The meter this node's stages report their work to.
    pub(crate) fn live(&self) -> Arc<super::LiveMeter> {
        match self.inner.read() {
            Ok(i) => i.live.clone(),
            Err(_) => Arc::default(),
        }
    }

    /// This node's own profile now.
    pub fn own(&self) -> Option<NodeProfile> {
        self.inner.read().ok().map(|i| i.own_profile())
    }

    /// What the machine offers this node now, once sampled.
    pub(crate) fn offer(&self) -> Option<super::Offer> {
        self.inner.read().ok().and_then(|i| i.offer)
    }

    /// Replaces the served model's times with `times` measured again, if
    /// the node still serves that model (same fingerprint and content).
    /// Returns whether it did.
    pub(crate) fn replace_times(&self, times: super::ModelTimes) -> bool {
        let Ok(mut i) = self.inner.write() else {
            return false;
        };
        let live = i.live.clone();
        match i.model.as_mut() {
            Some(m)
                if m.times.fingerprint == times.fingerprint && m.times.content == times.content =>
            {
                live.rebase(times.clone());
                m.times = times;
                true
            }
            _ => false,
        }
    }

    /// Resolves when the book is stopped.
    pub(crate) async fn stopped(&self) {
        let mut rx = self.stop.subscribe();
        while !*rx.borrow_and_update() {
            if rx.changed().await.is_err() {
                return;
            }
        }
    }

    pub(crate) fn stop(&self) {
        let _ = self.stop.send(true);
    }
}

/// Samples the machine's offer every [`OFFER_PERIOD`] until stopped; a
/// large change of the cores available restarts the live figures.
async fn sample_offer(inner: Arc<RwLock<Inner>>, mut stopped: watch::Receiver<bool>) {
    let mut sampler = super::LoadSampler::default();
    let mut tick = tokio::time::interval(OFFER_PERIOD);
    loop {
        tokio::select! {
            _ = stopped.changed() => return,
            _ = tick.tick() => {}
        }
        let offer = sampler.offer();
        let Ok(mut i) = inner.write() else { return };
        let now = offer.available();
        match i.live_cores {
            Some(then) if (now / then).max(then / now) > OFFER_CHANGE => {
                info!(
                    from = then,
                    to = now,
                    "the cores available changed; live figures start over"
                );
                i.live.reset();
                i.live_cores = Some(now);
            }
            None => i.live_cores = Some(now),
            Some(_) => {}
        }
        i.offer = Some(offer);
    }
}

async fn serve_profiles(mut streams: mpsc::Receiver<IncomingStream>, inner: Arc<RwLock<Inner>>) {
    while let Some(mut s) = streams.recv().await {
        let doc = inner
            .read()
            .ok()
            .map(|i| i.own_profile())
            .and_then(|p| p.to_json().ok());
        tokio::spawn(async move {
            let Some(doc) = doc else { return };
            let r = async {
                write_message(&mut s.send, &Message::Profile(doc)).await?;
                let _ = s.send.finish();
                Ok::<_, NetError>(())
            };
            if let Err(e) = r.await {
                debug!(peer = %s.peer.node_id.short(), "profile request failed: {e}");
            }
        });
    }
}

/// Asks `conn` for its profile.
async fn fetch(conn: &PeerConn) -> Result<NodeProfile, String> {
    let run = async {
        let (mut send, mut recv) = conn.open(stream_kind::PROFILE).await?;
        let _ = send.finish();
        expect(
            &mut recv,
            limits::MAX_CONTROL_FRAME,
            "profile",
            |m| match m {
                Message::Profile(doc) => Ok(doc),
                m => Err(m),
            },
        )
        .await
    };
    let doc = tokio::time::timeout(FETCH_TIMEOUT, run)
        .await
        .map_err(|_| "timed out".to_string())?
        .map_err(|e: NetError| e.to_string())?;
    let profile = NodeProfile::from_json(&doc).map_err(|e| e.to_string())?;
    if profile.node_id != conn.info().node_id.to_string() {
        return Err(format!(
            "profile names node {} but came from {}",
            profile.node_id,
            conn.info().node_id
        ));
    }
    Ok(profile)
}

/// Fetches profiles and measures links until stopped.
async fn track(
    endpoint: Endpoint,
    inner: Arc<RwLock<Inner>>,
    mut events: broadcast::Receiver<MembershipEvent>,
    mut stopped: watch::Receiver<bool>,
    probe_period: Duration,
) {
    let mut refresh = tokio::time::interval(PROFILE_REFRESH);
    refresh.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut probed: HashMap<NodeId, Instant> = HashMap::new();
    loop {
        tokio::select! {
            _ = stopped.changed() => return,
            _ = refresh.tick() => {}
            ev = events.recv() => match ev {
                Ok(MembershipEvent::Joined(_)) => {}
                Ok(MembershipEvent::Left { node_id, .. }) => {
                    if let Ok(mut i) = inner.write() {
                        i.peers.remove(&node_id);
                        i.links.remove(&node_id);
                    }
                    probed.remove(&node_id);
                    continue;
                }
                Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => continue,
                Err(broadcast::error::RecvError::Closed) => return,
            },
        }
        let conns = endpoint.peers();
        // Forget nodes we no longer have a connection to.
        let live: Vec<NodeId> = conns.iter().map(|c| c.info().node_id).collect();
        if let Ok(mut i) = inner.write() {
            i.peers.retain(|id, _| live.contains(id));
            i.links.retain(|id, _| live.contains(id));
        }
        probed.retain(|id, _| live.contains(id));
        // Links first (one at a time, so probes do not share the wire),
        // then profiles, which carry the peers' own link measurements.
        for conn in &conns {
            let id = conn.info().node_id;
            if probed.get(&id).is_some_and(|t| t.elapsed() < probe_period) {
                continue;
            }
            probed.insert(id, Instant::now());
            match measure_link(conn, PROBE_BYTES).await {
                Ok((rtt, bandwidth)) => {
                    debug!(peer = %id.short(), rtt_ms = rtt.as_secs_f64() * 1e3, mbit_s = bandwidth * 8.0 / 1e6, "link measured");
                    if let Ok(mut i) = inner.write() {
                        i.links.insert(
                            id,
                            LinkProfile {
                                peer: id.to_string(),
                                rtt_ms: rtt.as_secs_f64() * 1e3,
                                bandwidth_bytes_per_s: bandwidth,
                                measured_at: unix_now(),
                            },
                        );
                    }
                }
                Err(e) => {
                    // Try again at the next refresh, not a whole period later.
                    probed.remove(&id);
                    warn!(peer = %id.short(), "link probe failed: {e}");
                }
            }
            if *stopped.borrow() {
                return;
            }
        }
        for conn in &conns {
            let id = conn.info().node_id;
            match fetch(conn).await {
                Ok(p) => {
                    if let Ok(mut i) = inner.write()
                        && i.peers.insert(id, p).is_none()
                    {
                        info!(peer = %id.short(), "received the member's profile");
                    }
                }
                Err(e) => debug!(peer = %id.short(), "profile fetch failed: {e}"),
            }
        }
    }
}
