//! Training traffic between nodes: one ordered QUIC stream per direction
//! per pair (kind `TRAIN`), and local delivery when sender and receiver are
//! the same node. Every message to a stage names the receiving stage (a
//! node may run two stages of one job: the first and the last of a
//! U-shaped pipeline). Incoming messages are checked against who may send
//! them (the previous stage's node for activations, the next stage's for
//! gradients, the coordinator for inputs and verdicts) and queued for that
//! stage or the job's coordinator.

use std::collections::HashMap;
use std::sync::mpsc as std_mpsc;
use std::sync::{Arc, Mutex};

use hearth_net::framed::{read_message, write_message};
use hearth_net::{Endpoint, IncomingStream, NodeId};
use hearth_proto::{Message, TrainMsg, limits, stream_kind};
use tokio::sync::mpsc;
use tracing::{Instrument, debug, info_span, warn};

/// Messages queued per peer before a sender blocks.
const OUT_QUEUE: usize = 64;

/// Where a stage's mail goes, and who may send each kind.
pub(crate) struct StageRoute {
    pub prev: Option<NodeId>,
    pub next: Option<NodeId>,
    pub coordinator: NodeId,
    pub tied: Option<NodeId>,
    /// Tokens and activations, in micro-batch order.
    pub inputs: std_mpsc::SyncSender<TrainMsg>,
    pub labels: std_mpsc::SyncSender<TrainMsg>,
    pub grads: std_mpsc::SyncSender<TrainMsg>,
    /// Tied gradients and verdicts.
    pub control: std_mpsc::SyncSender<TrainMsg>,
    /// Checkpoint chunks to start from.
    pub restore: std_mpsc::SyncSender<TrainMsg>,
    /// Set by `End` from the coordinator.
    pub stop: Arc<std::sync::atomic::AtomicBool>,
}

/// Where a coordinator's mail goes.
pub(crate) struct CoordRoute {
    pub stages: Vec<NodeId>,
    pub tx: mpsc::UnboundedSender<(NodeId, TrainMsg)>,
}

#[derive(Default)]
struct Routes {
    /// By (job, stage).
    stages: HashMap<(u64, u16), StageRoute>,
    coordinators: HashMap<u64, CoordRoute>,
}

/// How many training messages of each kind this node sent to each node
/// (itself included), for tests and diagnostics: what left the node.
pub type SentCounts = HashMap<(NodeId, &'static str), u64>;

/// This node's training transport.
#[derive(Clone)]
pub struct TrainNet {
    endpoint: Endpoint,
    routes: Arc<Mutex<Routes>>,
    out: Arc<Mutex<HashMap<NodeId, mpsc::Sender<Message>>>>,
    sent: Arc<Mutex<SentCounts>>,
    /// Writer tasks are spawned here (senders may be stage threads).
    runtime: tokio::runtime::Handle,
}

impl std::fmt::Debug for TrainNet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TrainNet")
            .field("id", &self.endpoint.id())
            .finish()
    }
}

/// Why a message could not be delivered or sent.
#[derive(Debug, thiserror::Error)]
pub enum TrainNetError {
    #[error("no connection to {0}")]
    NoPeer(String),
    #[error("the training stream to {0} is closed")]
    Closed(String),
}

/// The stage a message is for (`None`: the coordinator's mail, or `End`,
/// which is for every stage of the job here).
fn stage_of(msg: &TrainMsg) -> Option<u16> {
    match msg {
        TrainMsg::Tokens { key, .. }
        | TrainMsg::Labels { key, .. }
        | TrainMsg::Activations { key, .. }
        | TrainMsg::Gradient { key, .. } => Some(key.stage),
        TrainMsg::Tied { stage, .. }
        | TrainMsg::Apply { stage, .. }
        | TrainMsg::Restore { stage, .. } => Some(*stage),
        TrainMsg::Report { .. }
        | TrainMsg::Applied { .. }
        | TrainMsg::State { .. }
        | TrainMsg::Failed { .. }
        | TrainMsg::End { .. } => None,
    }
}

fn job_of(msg: &TrainMsg) -> u64 {
    match msg {
        TrainMsg::Tokens { key, .. }
        | TrainMsg::Labels { key, .. }
        | TrainMsg::Activations { key, .. }
        | TrainMsg::Gradient { key, .. } => key.job,
        TrainMsg::Tied { job, .. }
        | TrainMsg::Report { job, .. }
        | TrainMsg::Apply { job, .. }
        | TrainMsg::Applied { job, .. }
        | TrainMsg::State { job, .. }
        | TrainMsg::Restore { job, .. }
        | TrainMsg::Failed { job, .. }
        | TrainMsg::End { job } => *job,
    }
}

impl TrainNet {
    /// Serves incoming `TRAIN` streams from `incoming` on this endpoint.
    /// Must be called within a tokio runtime.
    pub fn new(endpoint: Endpoint, mut incoming: mpsc::Receiver<IncomingStream>) -> Self {
        let net = Self {
            endpoint,
            routes: Arc::default(),
            out: Arc::default(),
            sent: Arc::default(),
            runtime: tokio::runtime::Handle::current(),
        };
        let n = net.clone();
        tokio::spawn(async move {
            while let Some(stream) = incoming.recv().await {
                let n = n.clone();
                let span = info_span!("train-in", peer = %stream.peer.node_id.short());
                tokio::spawn(n.serve(stream).instrument(span));
            }
        });
        net
    }

    /// This node's id.
    pub fn id(&self) -> NodeId {
        self.endpoint.id()
    }

    pub(crate) fn add_stage(&self, job: u64, stage: u16, route: StageRoute) {
        if let Ok(mut r) = self.routes.lock() {
            r.stages.insert((job, stage), route);
        }
    }

    pub(crate) fn add_coordinator(&self, job: u64, route: CoordRoute) {
        if let Ok(mut r) = self.routes.lock() {
            r.coordinators.insert(job, route);
        }
    }

    pub(crate) fn remove_stage(&self, job: u64, stage: u16) {
        if let Ok(mut r) = self.routes.lock() {
            r.stages.remove(&(job, stage));
        }
    }

    /// The training messages this node has sent, by destination and kind.
    pub fn sent_counts(&self) -> SentCounts {
        self.sent.lock().map(|s| s.clone()).unwrap_or_default()
    }

    fn count(&self, to: NodeId, msg: &TrainMsg) {
        if let Ok(mut s) = self.sent.lock() {
            *s.entry((to, name(msg))).or_default() += 1;
        }
    }

    pub(crate) fn remove_coordinator(&self, job: u64) {
        if let Ok(mut r) = self.routes.lock() {
            r.coordinators.remove(&job);
        }
    }

    async fn serve(self, stream: IncomingStream) {
        let IncomingStream { peer, mut recv, .. } = stream;
        loop {
            match read_message(&mut recv, limits::MAX_FRAME).await {
                Ok(Some(Message::Train(t))) => self.deliver(peer.node_id, *t),
                Ok(Some(other)) => {
                    warn!("unexpected {} message on a training stream", other.name());
                    break;
                }
                Ok(None) => break,
                Err(e) => {
                    debug!("training stream closed: {e}");
                    break;
                }
            }
        }
    }

    /// Queues `msg` from `from` for this node's stage or coordinator, if
    /// `from` may send it; drops it (with a log line) otherwise.
    pub(crate) fn deliver(&self, from: NodeId, msg: TrainMsg) {
        let job = job_of(&msg);
        let Ok(routes) = self.routes.lock() else {
            return;
        };
        let to_coord = matches!(
            msg,
            TrainMsg::Report { .. }
                | TrainMsg::Applied { .. }
                | TrainMsg::State { .. }
                | TrainMsg::Failed { .. }
        );
        if to_coord {
            match routes.coordinators.get(&job) {
                Some(c) if c.stages.contains(&from) => {
                    let _ = c.tx.send((from, msg));
                }
                _ => debug!(job, "dropped a {} for no coordinator here", name(&msg)),
            }
            return;
        }
        let Some(stage) = stage_of(&msg) else {
            // `End`: every stage of the job here that `from` coordinates.
            for ((j, _), s) in routes.stages.iter() {
                if *j == job && s.coordinator == from {
                    s.stop.store(true, std::sync::atomic::Ordering::SeqCst);
                }
            }
            return;
        };
        let Some(s) = routes.stages.get(&(job, stage)) else {
            debug!(job, stage, "dropped a {} for no stage here", name(&msg));
            return;
        };
        let (allowed, queue) = match &msg {
            TrainMsg::Tokens { .. } => (s.prev.is_none() && from == s.coordinator, &s.inputs),
            TrainMsg::Activations { .. } => (s.prev == Some(from), &s.inputs),
            TrainMsg::Labels { .. } => (s.next.is_none() && from == s.coordinator, &s.labels),
            TrainMsg::Gradient { .. } => (s.next == Some(from), &s.grads),
            TrainMsg::Tied { .. } => (s.tied == Some(from), &s.control),
            TrainMsg::Restore { .. } => (from == s.coordinator, &s.restore),
            _ => (from == s.coordinator, &s.control),
        };
        if !allowed {
            warn!(
                job,
                "dropped a {} from {} (not its sender)",
                name(&msg),
                from.short()
            );
            return;
        }
        if queue.try_send(msg).is_err() {
            warn!(
                job,
                "a stage's training queue is full or gone; message dropped"
            );
        }
    }

    /// Sends `msg` to `to` (this node included), in order with earlier sends.
    pub async fn send(&self, to: NodeId, msg: TrainMsg) -> Result<(), TrainNetError> {
        self.count(to, &msg);
        if to == self.id() {
            self.deliver(to, msg);
            return Ok(());
        }
        let tx = self.pipe(to)?;
        tx.send(Message::Train(Box::new(msg)))
            .await
            .map_err(|_| TrainNetError::Closed(to.short()))
    }

    /// [`Self::send`] from a blocking thread (a stage worker).
    pub(crate) fn send_blocking(&self, to: NodeId, msg: TrainMsg) -> Result<(), TrainNetError> {
        self.count(to, &msg);
        if to == self.id() {
            self.deliver(to, msg);
            return Ok(());
        }
        let tx = self.pipe(to)?;
        tx.blocking_send(Message::Train(Box::new(msg)))
            .map_err(|_| TrainNetError::Closed(to.short()))
    }

    fn pipe(&self, to: NodeId) -> Result<mpsc::Sender<Message>, TrainNetError> {
        let mut out = self
            .out
            .lock()
            .map_err(|_| TrainNetError::Closed(to.short()))?;
        if let Some(tx) = out.get(&to).filter(|t| !t.is_closed()) {
            return Ok(tx.clone());
        }
        let conn = self
            .endpoint
            .peer(to)
            .ok_or_else(|| TrainNetError::NoPeer(to.short()))?;
        let (tx, mut rx) = mpsc::channel::<Message>(OUT_QUEUE);
        out.insert(to, tx.clone());
        let span = info_span!("train-out", peer = %to.short());
        self.runtime.spawn(
            async move {
                let (mut send, _recv) = match conn.open(stream_kind::TRAIN).await {
                    Ok(s) => s,
                    Err(e) => {
                        warn!("cannot open a training stream: {e}");
                        return;
                    }
                };
                while let Some(msg) = rx.recv().await {
                    if let Err(e) = write_message(&mut send, &msg).await {
                        warn!("training stream broke: {e}");
                        return;
                    }
                }
                let _ = send.finish();
            }
            .instrument(span),
        );
        Ok(tx)
    }
}

pub(crate) fn name(m: &TrainMsg) -> &'static str {
    match m {
        TrainMsg::Tokens { .. } => "tokens",
        TrainMsg::Labels { .. } => "labels",
        TrainMsg::Activations { .. } => "activations",
        TrainMsg::Gradient { .. } => "gradient",
        TrainMsg::Tied { .. } => "tied gradient",
        TrainMsg::Report { .. } => "report",
        TrainMsg::Apply { .. } => "verdict",
        TrainMsg::Applied { .. } => "applied",
        TrainMsg::State { .. } => "state",
        TrainMsg::Restore { .. } => "restore",
        TrainMsg::Failed { .. } => "failure",
        TrainMsg::End { .. } => "end",
    }
}
