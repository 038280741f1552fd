//! Cluster events as one node sees them, for people (the web UI's events
//! log and load progress, `GET /api/events`): members coming and going,
//! models loading, placements planned, stages loading, placements becoming
//! active. A bounded history lets a new subscriber see what just happened.
//!
//! Membership and activation events are observed by every node itself;
//! the model and stage events of one node are also sent to the members
//! (over `CONTROL` streams), which record them under the sender's
//! authenticated identity.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

use crate::placement::Placement;

/// How many past events a node keeps for new subscribers.
pub const EVENT_HISTORY: usize = 256;
/// Largest event a member may send, serialized.
pub const MAX_EVENT_BYTES: usize = 64 * 1024;
/// Longest text in an event a member may send.
pub const MAX_EVENT_TEXT: usize = 4096;

/// What happened.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum EventKind {
    MemberJoined {
        address: String,
    },
    MemberLeft {
        reason: String,
    },
    LeaderChanged {
        leader: String,
    },
    /// The node started fetching or measuring a model.
    ModelLoading {
        model: String,
    },
    /// The node serves the model, measured at this speed.
    ModelLoaded {
        model: String,
        layer_decode_ms: f64,
    },
    ModelFailed {
        model: String,
        reason: String,
    },
    ModelUnloaded {
        model: String,
    },
    /// The leader split the model over the members (stages load next).
    PlacementPlanned {
        placement: Placement,
    },
    StageLoading {
        placement: u64,
        start: usize,
        end: usize,
    },
    StageLoaded {
        placement: u64,
        start: usize,
        end: usize,
        secs: f64,
    },
    StageFailed {
        placement: u64,
        reason: String,
    },
    /// New requests now use this placement.
    PlacementActive {
        placement: Placement,
    },
    /// No placement is active any more.
    PlacementCleared {
        reason: String,
    },
    /// A fine-tuning job run by this node changed state.
    Training {
        job: String,
        message: String,
    },
}

impl EventKind {
    /// Whether members are told of this event (what only this node can
    /// observe: its model and its stages, and the leader's plans).
    fn shared(&self) -> bool {
        matches!(
            self,
            Self::ModelLoading { .. }
                | Self::ModelLoaded { .. }
                | Self::ModelFailed { .. }
                | Self::ModelUnloaded { .. }
                | Self::PlacementPlanned { .. }
                | Self::StageLoading { .. }
                | Self::StageLoaded { .. }
                | Self::StageFailed { .. }
        )
    }

    /// Checks an event received from a member: only shared kinds, bounded
    /// text, a valid placement.
    pub(crate) fn check_from_peer(&self) -> Result<(), String> {
        if !self.shared() {
            return Err("members do not send this kind of event".into());
        }
        let texts: Vec<&str> = match self {
            Self::ModelLoading { model }
            | Self::ModelLoaded { model, .. }
            | Self::ModelUnloaded { model } => vec![model],
            Self::ModelFailed { model, reason } => vec![model, reason],
            Self::StageFailed { reason, .. } => vec![reason],
            Self::PlacementPlanned { placement } => {
                placement.validate()?;
                vec![]
            }
            _ => vec![],
        };
        if texts.iter().any(|t| t.len() > MAX_EVENT_TEXT) {
            return Err(format!("event text over {MAX_EVENT_TEXT} bytes"));
        }
        // Kept (up to the log's length) and sent to every subscriber: the
        // whole event is bounded too.
        let size = serde_json::to_vec(self).map_or(usize::MAX, |v| v.len());
        if size > MAX_EVENT_BYTES {
            return Err(format!(
                "an event of {size} bytes (at most {MAX_EVENT_BYTES})"
            ));
        }
        Ok(())
    }
}

/// One event, with where and when it happened.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClusterEvent {
    /// Increasing per observing node (a subscriber can tell what it missed).
    pub seq: u64,
    /// Milliseconds since the Unix epoch, on the observing node's clock.
    pub at_ms: u64,
    /// The node the event is about (hex id) and its name.
    pub node_id: String,
    pub node: String,
    #[serde(flatten)]
    pub kind: EventKind,
}

/// Sends a shared event to the members.
type Share = Box<dyn Fn(EventKind) + Send + Sync>;

/// The node's event bus; a cheap handle.
#[derive(Clone)]
pub(crate) struct Events {
    inner: Arc<Inner>,
}

struct Inner {
    me: String,
    name: String,
    seq: AtomicU64,
    tx: broadcast::Sender<ClusterEvent>,
    history: Mutex<VecDeque<ClusterEvent>>,
    /// Where shared events go (set once the node's service exists).
    share: Mutex<Option<Share>>,
}

impl Events {
    pub(crate) fn new(me: String, name: String) -> Self {
        Self {
            inner: Arc::new(Inner {
                me,
                name,
                seq: AtomicU64::new(0),
                tx: broadcast::channel(EVENT_HISTORY).0,
                history: Mutex::new(VecDeque::with_capacity(EVENT_HISTORY)),
                share: Mutex::new(None),
            }),
        }
    }

    pub(crate) fn set_share(&self, f: impl Fn(EventKind) + Send + Sync + 'static) {
        if let Ok(mut s) = self.inner.share.lock() {
            *s = Some(Box::new(f));
        }
    }

    /// Records an event about this node (and tells members if shared).
    pub(crate) fn emit(&self, kind: EventKind) {
        if kind.shared()
            && let Ok(s) = self.inner.share.lock()
            && let Some(f) = s.as_ref()
        {
            f(kind.clone());
        }
        self.record(self.inner.me.clone(), self.inner.name.clone(), kind);
    }

    /// Records an event about `node_id`.
    pub(crate) fn record(&self, node_id: String, node: String, kind: EventKind) {
        let ev = ClusterEvent {
            seq: self.inner.seq.fetch_add(1, Ordering::Relaxed) + 1,
            at_ms: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
            node_id,
            node,
            kind,
        };
        if let Ok(mut h) = self.inner.history.lock() {
            if h.len() == EVENT_HISTORY {
                h.pop_front();
            }
            h.push_back(ev.clone());
        }
        let _ = self.inner.tx.send(ev);
    }

    /// The recent history, then every new event.
    pub(crate) fn subscribe(&self) -> (Vec<ClusterEvent>, broadcast::Receiver<ClusterEvent>) {
        // Subscribe under the lock so no event falls between the two.
        match self.inner.history.lock() {
            Ok(h) => (h.iter().cloned().collect(), self.inner.tx.subscribe()),
            Err(_) => (Vec::new(), self.inner.tx.subscribe()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn history_is_bounded_and_ordered() {
        let ev = Events::new("a".into(), "n".into());
        for i in 0..(EVENT_HISTORY + 10) {
            ev.emit(EventKind::LeaderChanged {
                leader: i.to_string(),
            });
        }
        let (h, _) = ev.subscribe();
        assert_eq!(h.len(), EVENT_HISTORY);
        assert_eq!(h[0].seq, 11);
        assert!(h.windows(2).all(|w| w[0].seq + 1 == w[1].seq));
    }

    #[test]
    fn members_may_send_only_their_own_kinds_with_bounded_text() {
        let ok = EventKind::ModelLoading { model: "m".into() };
        assert!(ok.check_from_peer().is_ok());
        let long = EventKind::ModelFailed {
            model: "m".into(),
            reason: "x".repeat(MAX_EVENT_TEXT + 1),
        };
        assert!(long.check_from_peer().is_err());
        let observed = EventKind::MemberLeft { reason: "r".into() };
        assert!(observed.check_from_peer().is_err());
        // A well-formed plan carrying a megabyte of figures.
        let figure = crate::profile::DeviceFigures {
            node_id: "ab".repeat(32),
            name: "x".repeat(200),
            cores: Some(1.0),
            factor: 1.0,
            source: crate::profile::FigureSource::Measured,
            layer_decode_s: 1e-3,
        };
        let huge = EventKind::PlacementPlanned {
            placement: crate::placement::Placement {
                id: 1,
                model: "m".into(),
                fingerprint: "f".into(),
                content: None,
                stages: vec![crate::placement::PlacedStage {
                    node_id: "ab".repeat(32),
                    name: "a".into(),
                    spec: hearth_models::StageSpec::full(2),
                }],
                members: vec!["ab".repeat(32)],
                predicted_step_s: None,
                predicted_tokens_per_s: None,
                reason: None,
                figures: vec![figure; 3000],
                replicas: Vec::new(),
            },
        };
        assert!(huge.check_from_peer().is_err());
    }

    #[test]
    fn events_serialize_flat_with_a_kind_tag() {
        let ev = Events::new("a".into(), "n".into());
        ev.emit(EventKind::ModelLoading { model: "m".into() });
        let (h, _) = ev.subscribe();
        let v = serde_json::to_value(&h[0]).unwrap();
        assert_eq!(v["kind"], "model_loading");
        assert_eq!(v["model"], "m");
        assert_eq!(v["node"], "n");
    }
}
