//! The `CONTROL` protocol between members: one JSON document (with its
//! format version) per stream each way, a request and its reply. The
//! leader assigns and activates placements with it, a job coordinator
//! orders training stages, members ask each other to load or unload a
//! model, for stage timings, and tell each other their events. Every
//! document from a peer is checked before it is acted on.

use std::sync::Arc;
use std::time::Duration;

use hearth_net::framed::{expect, write_message};
use hearth_net::{IncomingStream, NodeId};
use hearth_proto::{Message, stream_kind};
use serde::{Deserialize, Serialize};
use tracing::warn;

use crate::pipeline::service::Service;
use crate::placement::Placement;

/// Version of the control documents.
pub const CONTROL_FORMAT: u32 = 1;

/// Why a control exchange failed.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("bad node id {node:?}: {reason}")]
    NodeId { node: String, reason: String },
    #[error("no connection to {0}")]
    NotConnected(String),
    #[error("no reply from {node} in {} s", wait.as_secs())]
    Timeout { node: String, wait: Duration },
    #[error(transparent)]
    Net(#[from] hearth_net::NetError),
    #[error("control document of format {found}, this node reads {CONTROL_FORMAT}")]
    Format { found: u32 },
    #[error("malformed control document: {0}")]
    Malformed(#[from] serde_json::Error),
}

/// A control document.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub(crate) enum Control {
    /// Load your stage of this placement (reply `Ready` or `Failed`).
    Assign {
        placement: Placement,
    },
    /// Use this placement for new requests (reply `Ready`).
    Activate {
        placement: Placement,
    },
    Ready {
        id: u64,
    },
    Failed {
        id: u64,
        reason: String,
    },
    /// Send me these tensors (and the file's header) of the model with
    /// this content (on a `WEIGHTS` stream).
    Fetch {
        content: String,
        header: bool,
        tensors: Vec<String>,
    },
    /// What follows on a `WEIGHTS` stream: the header (if asked), then the
    /// pieces in order, as `FileChunk`s.
    Manifest {
        file_len: u64,
        header_len: u64,
        pieces: Vec<crate::model_file::Piece>,
        /// The model's whole hash tree (its root is the content id asked
        /// for), which proves the header and every piece.
        leaves: Vec<crate::model_file::Leaf>,
    },
    /// Load the model of this name from your own store (reply at once:
    /// `Ready`, or `Failed` if you cannot start; events tell the rest).
    Load {
        model: String,
        /// The members (node ids) that hold it, as the asker found them:
        /// a node without it receives it from them (at most
        /// `sharing::MAX_HOLDERS`).
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        holders: Vec<String>,
    },
    /// Stop serving the model (reply `Ready`).
    Unload,
    /// Something happened on the sender (no reply expected beyond `Ready`).
    Event {
        event: crate::events::EventKind,
    },
    /// Send me your stages' timings (reply `Stats`).
    StatsRequest,
    Stats {
        stages: Vec<crate::pipeline::StageStats>,
    },
    /// Load and run this training stage, coordinated by the sender (reply
    /// `Ready { id: job }` or `Failed`).
    TrainStage {
        order: crate::train::StageOrder,
    },
    /// Drop the sender's job's training stage here (reply `Ready`).
    TrainEnd {
        job: u64,
    },
    /// Send me the LoRA adapter with this id (on a `WEIGHTS` stream).
    FetchAdapter {
        id: String,
    },
    /// What follows a `FetchAdapter` on its stream: the adapter's config
    /// bytes, then its weights', as `FileChunk`s.
    AdapterManifest {
        config_len: u64,
        weights_len: u64,
    },
    /// Load your stage's slice of this adapter for the placement (reply
    /// `Ready { id: placement }` or `Failed`), receiving its files from
    /// its holders if you lack them.
    PrepareAdapter {
        placement: u64,
        adapter: crate::adapters::AdapterRef,
    },
    /// Which models can you load by name (reply `Catalog`)?
    CatalogRequest,
    /// The models this node holds (at most `sharing::MAX_CATALOG`).
    Catalog {
        models: Vec<crate::catalog::ModelEntry>,
    },
}

#[derive(Serialize, Deserialize)]
struct Envelope {
    format: u32,
    #[serde(flatten)]
    body: Control,
}

impl Control {
    pub(crate) fn to_message(&self) -> Result<Message, ControlError> {
        let doc = serde_json::to_vec(&Envelope {
            format: CONTROL_FORMAT,
            body: self.clone(),
        })?;
        Ok(Message::Control(doc))
    }

    pub(crate) fn from_bytes(bytes: &[u8]) -> Result<Self, ControlError> {
        #[derive(Deserialize)]
        struct Head {
            format: u32,
        }
        let head: Head = serde_json::from_slice(bytes)?;
        if head.format != CONTROL_FORMAT {
            return Err(ControlError::Format { found: head.format });
        }
        let env: Envelope = serde_json::from_slice(bytes)?;
        Ok(env.body)
    }
}

/// Largest control document read, except a weights manifest (which lists
/// the model's whole hash tree and may take up to a frame).
pub(crate) const MAX_CONTROL_DOC: usize = 1 << 20;

/// Reads one control document of at most `max` bytes from a stream.
pub(crate) async fn read_control(
    recv: &mut quinn::RecvStream,
    max: usize,
) -> Result<Control, ControlError> {
    let doc = expect(recv, max, "control", |m| match m {
        Message::Control(d) => Ok(d),
        other => Err(other),
    })
    .await?;
    Control::from_bytes(&doc)
}

/// Writes one control document to a stream.
pub(crate) async fn write_control(
    send: &mut quinn::SendStream,
    c: &Control,
) -> Result<(), ControlError> {
    Ok(write_message(send, &c.to_message()?).await?)
}

/// Sends `req` to `node` and waits for its reply.
pub(crate) async fn request(
    service: &Service,
    node: &str,
    req: &Control,
    wait: Duration,
) -> Result<Control, ControlError> {
    if node == service.me() {
        return Ok(handle(service, req.clone(), service.endpoint().id()).await);
    }
    request_peer(service, node, req, wait).await
}

/// [`request`] to another member only (never handled here, so a handler
/// may call it from a task of its own).
pub(crate) async fn request_peer(
    service: &Service,
    node: &str,
    req: &Control,
    wait: Duration,
) -> Result<Control, ControlError> {
    let id: NodeId = node.parse().map_err(|e| ControlError::NodeId {
        node: node.get(..16).unwrap_or(node).to_string(),
        reason: format!("{e}"),
    })?;
    let conn = service
        .endpoint()
        .peer(id)
        .ok_or_else(|| ControlError::NotConnected(id.short()))?;
    let exchange = async {
        let (mut send, mut recv) = conn.open(stream_kind::CONTROL).await?;
        write_control(&mut send, req).await?;
        let _ = send.finish();
        read_control(&mut recv, MAX_CONTROL_DOC).await
    };
    tokio::time::timeout(wait, exchange)
        .await
        .map_err(|_| ControlError::Timeout {
            node: id.short(),
            wait,
        })?
}

/// What a node does with a control request.
async fn handle(service: &Service, req: Control, from: NodeId) -> Control {
    match req {
        Control::TrainStage { order } => {
            let job = order.job;
            let Some(model) = service.model() else {
                return Control::Failed {
                    id: job,
                    reason: "this node serves no model".into(),
                };
            };
            let content = model.info.times.content.clone().unwrap_or_default();
            // A copy received from members first gets the stage's tensors.
            if order.content == content
                && let Err(reason) =
                    crate::sharing::complete(service, &model.info.path, &content, Some(order.spec))
                        .await
            {
                return Control::Failed {
                    id: job,
                    reason: format!("cannot receive the stage's weights: {reason}"),
                };
            }
            match service
                .train()
                .start(from, order, model.info.path.clone(), content)
                .await
            {
                Ok(()) => Control::Ready { id: job },
                Err(reason) => {
                    warn!(job, "cannot start a training stage: {reason}");
                    Control::Failed { id: job, reason }
                }
            }
        }
        Control::TrainEnd { job } => {
            service.train().end(from, job);
            Control::Ready { id: job }
        }
        Control::Assign { placement } | Control::Activate { placement }
            if let Err(reason) = placement
                .validate()
                .and_then(|()| placement_order_allowed(service, &placement, from)) =>
        {
            warn!(
                from = %from.short(),
                placement = placement.id,
                "refused a placement order: {reason}"
            );
            Control::Failed {
                id: placement.id,
                reason,
            }
        }
        Control::Assign { placement } => {
            let id = placement.id;
            match service.load_stage(Arc::new(placement)).await {
                Ok(()) => Control::Ready { id },
                Err(reason) => {
                    warn!(placement = id, "cannot load my stage: {reason}");
                    Control::Failed { id, reason }
                }
            }
        }
        Control::Activate { placement } => {
            let id = placement.id;
            service.activate(Arc::new(placement));
            Control::Ready { id }
        }
        Control::Load { holders, .. } if holders.len() > crate::sharing::MAX_HOLDERS => {
            Control::Failed {
                id: 0,
                reason: format!(
                    "a load naming {} holders (at most {})",
                    holders.len(),
                    crate::sharing::MAX_HOLDERS
                ),
            }
        }
        Control::Load { model, holders } => {
            match crate::sharing::load_or_adopt(service, &model, &holders).await {
                Ok(_) => Control::Ready { id: 0 },
                Err(e) => Control::Failed {
                    id: 0,
                    reason: e.to_string(),
                },
            }
        }
        Control::Unload => {
            service.unload_model();
            Control::Ready { id: 0 }
        }
        Control::PrepareAdapter { placement, adapter } => {
            match crate::adapters::prepare(service, from, placement, &adapter).await {
                Ok(()) => Control::Ready { id: placement },
                Err(reason) => {
                    warn!(placement, adapter = %adapter.name, "cannot prepare an adapter: {reason}");
                    Control::Failed {
                        id: placement,
                        reason,
                    }
                }
            }
        }
        Control::StatsRequest => Control::Stats {
            stages: service.stats(),
        },
        Control::CatalogRequest => {
            let s = service.clone();
            match tokio::task::spawn_blocking(move || crate::sharing::own_catalog(&s)).await {
                Ok(models) => Control::Catalog { models },
                Err(e) => Control::Failed {
                    id: 0,
                    reason: e.to_string(),
                },
            }
        }
        // Recorded by `serve`, which knows the sender; from this node
        // itself there is nothing to record twice.
        Control::Event { .. } => Control::Ready { id: 0 },
        Control::Ready { id } | Control::Failed { id, .. } => Control::Failed {
            id,
            reason: "not a request".into(),
        },
        Control::Stats { .. } | Control::Catalog { .. } => Control::Failed {
            id: 0,
            reason: "not a request".into(),
        },
        Control::Fetch { .. }
        | Control::Manifest { .. }
        | Control::FetchAdapter { .. }
        | Control::AdapterManifest { .. } => Control::Failed {
            id: 0,
            reason: "weights travel on their own stream".into(),
        },
    }
}

/// Furthest a placement id (milliseconds since the epoch on the leader
/// that made it) may be ahead of this node's clock: clocks in a home drift,
/// but not by a day.
pub(crate) const MAX_PLACEMENT_AHEAD_MS: u64 = 24 * 3600 * 1000;

/// Whether `from` may order `placement` here: only the leader (as this
/// node sees it) places the model, and its ids follow its clock, so an id
/// far past this node's clock (one that would leave no id above it) is
/// refused.
fn placement_order_allowed(
    service: &Service,
    placement: &Placement,
    from: NodeId,
) -> Result<(), String> {
    let me = service.endpoint().id();
    let leader = service.leader();
    if from != me && from != leader {
        return Err(format!(
            "only the leader ({}) orders placements, not {}",
            leader.short(),
            from.short()
        ));
    }
    let now = crate::placement::now_ms();
    if placement.id > now.saturating_add(MAX_PLACEMENT_AHEAD_MS) {
        return Err(format!(
            "placement id {} is more than a day ahead of this node's clock ({now})",
            placement.id
        ));
    }
    Ok(())
}

/// Serves one incoming control stream: one request, one reply.
pub(crate) async fn serve(stream: IncomingStream, service: Service) {
    let IncomingStream {
        peer,
        mut send,
        mut recv,
    } = stream;
    let reply = match tokio::time::timeout(
        Duration::from_secs(10),
        read_control(&mut recv, MAX_CONTROL_DOC),
    )
    .await
    {
        Ok(Ok(Control::Event { event })) => match event.check_from_peer() {
            Ok(()) => {
                service
                    .events()
                    .record(peer.node_id.to_string(), peer.name.clone(), event);
                Control::Ready { id: 0 }
            }
            Err(reason) => Control::Failed { id: 0, reason },
        },
        Ok(Ok(req)) => handle(&service, req, peer.node_id).await,
        Ok(Err(e)) => {
            warn!("bad control request from {}: {e}", peer.node_id.short());
            Control::Failed {
                id: 0,
                reason: e.to_string(),
            }
        }
        Err(_) => return,
    };
    let _ = write_control(&mut send, &reply).await;
    let _ = send.finish();
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A training order document with these numbers.
    fn order_doc(rank: u64, restore_len: u64, micro: u64, max_len: u64, beta1: f64) -> Vec<u8> {
        serde_json::to_vec(&serde_json::json!({"format": 1, "type": "train_stage", "order": {
            "job": 5, "stage": 0, "stages": 1,
            "spec": {"start": 0, "end": 2, "embed": true, "head": true},
            "content": "00",
            "method": {"type": "lora", "rank": rank, "alpha": 16.0, "targets": ["q", "v"]},
            "schedule": "gpipe", "micro_batches": micro, "prev": null, "next": null, "tied": null,
            "seed": 1, "optim": {"beta1": beta1, "beta2": 0.999, "eps": 1e-8, "weight_decay": 0.0},
            "timeout_s": 30, "restore_len": restore_len, "max_len": max_len,
        }}))
        .unwrap_or_default()
    }

    proptest! {
        /// Any bytes: a typed error or a document, never a panic.
        #[test]
        fn any_bytes_parse_or_fail_cleanly(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = Control::from_bytes(&bytes);
        }

        /// Well-formed training orders with any numbers: whatever passes
        /// the order's check is within every bound that sizes memory.
        #[test]
        fn training_orders_that_pass_are_bounded(
            rank in prop_oneof![0u64..2048, any::<u64>()],
            restore_len in prop_oneof![0u64..(1 << 20), any::<u64>()],
            micro in prop_oneof![0u64..8192, any::<u64>()],
            max_len in prop_oneof![0u64..16384, any::<u64>()],
            beta1 in prop_oneof![-1.0f64..2.0, any::<f64>()],
        ) {
            let doc = order_doc(rank, restore_len, micro, max_len, beta1);
            if let Ok(Control::TrainStage { order }) = Control::from_bytes(&doc)
                && order.check().is_ok()
            {
                let hearth_models::train::Method::Lora(l) = &order.method else {
                    panic!("not the method sent");
                };
                prop_assert!(l.rank >= 1 && l.rank <= crate::train::host::MAX_LORA_RANK);
                prop_assert!(order.restore_len <= crate::train::host::MAX_RESTORE);
                prop_assert!(order.micro_batches >= 1 && order.micro_batches <= 4096);
                prop_assert!(order.max_len >= 1 && order.max_len <= crate::train::host::MAX_SEQ_LEN);
                prop_assert!((0.0..1.0).contains(&order.optim.beta1));
            }
        }

        /// Adapter orders with any id, name and holders: whatever passes
        /// the reference's check names a plain folder and few holders.
        #[test]
        fn adapter_orders_that_pass_are_bounded(
            id in prop_oneof!["[0-9a-f]{64}", ".{0,80}"],
            name in prop_oneof!["[a-z0-9-]{1,20}", ".{0,300}"],
            holders in 0usize..400,
            placement in any::<u64>(),
        ) {
            let doc = serde_json::to_vec(&serde_json::json!({"format": 1, "type": "prepare_adapter",
                "placement": placement, "adapter": {"name": name, "id": id, "base_content": "c0",
                "holders": vec!["n"; holders]}})).unwrap_or_default();
            if let Ok(Control::PrepareAdapter { adapter, .. }) = Control::from_bytes(&doc)
                && adapter.check().is_ok()
            {
                prop_assert!(adapter.id.len() == 64 && adapter.id.bytes().all(|b| b.is_ascii_hexdigit()));
                prop_assert!(!adapter.name.contains('/') && !adapter.name.starts_with('.'));
                prop_assert!(adapter.holders.len() <= crate::sharing::MAX_HOLDERS);
            }
        }

        /// Mutated placement documents: refused or checked, never a panic.
        #[test]
        fn mutated_placement_documents_fail_cleanly(
            id in any::<u64>(),
            start in any::<u64>(),
            end in any::<u64>(),
            cut in 0usize..400,
        ) {
            let doc = serde_json::to_vec(&serde_json::json!({"format": 1, "type": "activate", "placement": {
                "id": id, "model": "m", "fingerprint": "f", "content": null, "members": ["a"],
                "stages": [{"node_id": "a", "name": "a", "spec": {"start": start, "end": end, "embed": true, "head": true}}],
            }})).unwrap_or_default();
            let doc = &doc[..cut.min(doc.len())];
            if let Ok(Control::Activate { placement }) = Control::from_bytes(doc) {
                let _ = placement.validate();
            }
        }
    }
}
