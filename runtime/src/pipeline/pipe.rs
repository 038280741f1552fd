//! Pipeline streams between members: one long-lived ordered QUIC stream
//! per direction per pair, carrying `Forward`, `Sampled` and `EndSeqs`.
//! Order matters (a sequence's end must follow its last chunk), so each
//! pair uses one stream, written by one task.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use hearth_net::framed::{read_message, write_message};
use hearth_net::{Endpoint, IncomingStream, NodeId};
use hearth_proto::{Message, limits, stream_kind};
use tokio::sync::mpsc;
use tracing::{Instrument, debug, info_span, warn};

use super::service::Service;
use super::worker::{Input, WorkItem};

/// Messages queued per peer before a worker blocks (backpressure).
const PIPE_QUEUE: usize = super::worker::QUEUE;

/// Outgoing pipes, opened on first use.
#[derive(Clone, Default)]
pub(crate) struct Pipes {
    out: Arc<Mutex<HashMap<NodeId, mpsc::Sender<Message>>>>,
}

impl Pipes {
    /// The queue into the pipe to `peer`, opening it if needed. When the
    /// stream breaks, `on_broken` is called with the peer.
    pub(crate) fn to(
        &self,
        endpoint: &Endpoint,
        peer: NodeId,
        on_broken: impl FnOnce(NodeId, String) + Send + 'static,
    ) -> mpsc::Sender<Message> {
        let Ok(mut out) = self.out.lock() else {
            return mpsc::channel(1).0;
        };
        if let Some(tx) = out.get(&peer).filter(|t| !t.is_closed()) {
            return tx.clone();
        }
        let (tx, rx) = mpsc::channel(PIPE_QUEUE);
        out.insert(peer, tx.clone());
        let endpoint = endpoint.clone();
        let span = info_span!("pipe-out", peer = %peer.short());
        tokio::spawn(
            async move {
                if let Err(e) = write_loop(&endpoint, peer, rx).await {
                    warn!("pipe to {} broke: {e}", peer.short());
                    on_broken(peer, e);
                }
            }
            .instrument(span),
        );
        tx
    }
}

async fn write_loop(
    endpoint: &Endpoint,
    peer: NodeId,
    mut rx: mpsc::Receiver<Message>,
) -> Result<(), String> {
    let conn = endpoint
        .peer(peer)
        .ok_or_else(|| format!("no connection to {}", peer.short()))?;
    let (mut send, _recv) = conn
        .open(stream_kind::PIPE)
        .await
        .map_err(|e| e.to_string())?;
    while let Some(msg) = rx.recv().await {
        write_message(&mut send, &msg)
            .await
            .map_err(|e| e.to_string())?;
    }
    let _ = send.finish();
    Ok(())
}

/// Serves one incoming pipe stream until it ends or breaks the protocol.
pub(crate) async fn serve(stream: IncomingStream, service: Service) {
    let IncomingStream { peer, recv, .. } = stream;
    let mut recv = recv;
    let from = peer.node_id.to_string();
    loop {
        let msg = match read_message(&mut recv, limits::MAX_FRAME).await {
            Ok(Some(m)) => m,
            Ok(None) => break,
            Err(e) => {
                debug!("pipe from {} closed: {e}", peer.node_id.short());
                break;
            }
        };
        let result = match msg {
            Message::Forward(f) => {
                let placement = f.placement;
                match service.stage_for(placement, &from, Hop::Previous) {
                    Err(e) => Err(e),
                    Ok(st) => {
                        let hidden = st.hidden_size;
                        if f.hidden.shape.get(1).copied() != Some(hidden as u32) {
                            Err(format!(
                                "hidden states {:?}, expected [_, {hidden}]",
                                f.hidden.shape
                            ))
                        } else {
                            let input = Input::Hidden(f.hidden.to_f32());
                            st.worker
                                .tx
                                .send(WorkItem::Run {
                                    chunks: f.chunks,
                                    input,
                                })
                                .await
                                .map_err(|_| "the stage stopped".to_string())
                        }
                    }
                }
            }
            Message::EndSeqs { placement, seqs } => {
                match service.stage_for(placement, &from, Hop::Previous) {
                    Err(e) => Err(e),
                    Ok(st) => st
                        .worker
                        .tx
                        .send(WorkItem::End(seqs))
                        .await
                        .map_err(|_| "the stage stopped".to_string()),
                }
            }
            Message::Sampled { placement, tokens } => {
                match service.stage_for(placement, &from, Hop::AnyMember) {
                    Err(e) => Err(e),
                    Ok(st) => match &st.router {
                        Some(r) => r
                            .send(super::router::RouterMsg::Sampled(tokens))
                            .map_err(|_| "the stage stopped".to_string()),
                        None => Err("sampled tokens sent to a stage other than the first".into()),
                    },
                }
            }
            other => {
                warn!(
                    "pipe from {}: unexpected {} message; closing the stream",
                    peer.node_id.short(),
                    other.name()
                );
                break;
            }
        };
        if let Err(e) = result {
            // A message for a placement this node no longer runs (or from
            // the wrong member) is dropped; the stream stays usable.
            debug!("pipe from {}: dropped a message: {e}", peer.node_id.short());
        }
    }
}

/// Who may send a message to a stage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Hop {
    /// Only the member running the previous stage.
    Previous,
    /// Any member of the placement (sampled tokens from the last stage,
    /// failures from any stage).
    AnyMember,
}
