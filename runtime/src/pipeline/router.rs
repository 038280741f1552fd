//! Stage 0's sequence table: admits requests, feeds each sampled token
//! back in as its sequence's next step, streams tokens to the requester,
//! and ends sequences (finished, cancelled, timed out, failed) on every
//! stage. An actor: one task owns the table.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use hearth_proto::{Finish, SampledToken, SeqChunk, SeqParams};
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, warn};

use super::worker::{Input, WorkItem};
use super::{MAX_IN_FLIGHT, PipelineError, SEQ_TIMEOUT};

/// What the requester receives for its sequence.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum SeqOut {
    Tokens(Vec<SampledToken>),
    Failed(String),
}

pub(crate) enum RouterMsg {
    Admit {
        prompt: Vec<u32>,
        params: SeqParams,
        sink: mpsc::UnboundedSender<SeqOut>,
        reply: oneshot::Sender<Result<u64, PipelineError>>,
    },
    Sampled(Vec<SampledToken>),
    Cancel(u64),
    /// Every sequence fails (a stage node left, a pipe broke).
    FailAll(String),
    /// The stage is gone: fail what is in flight and stop.
    Stop,
}

struct Seq {
    sink: mpsc::UnboundedSender<SeqOut>,
    last_token: Instant,
}

/// Starts the table for a stage 0 whose worker is `worker`, fed by `rx`.
pub(crate) fn start(rx: mpsc::UnboundedReceiver<RouterMsg>, worker: mpsc::Sender<WorkItem>) {
    tokio::spawn(run(rx, worker));
}

async fn run(mut rx: mpsc::UnboundedReceiver<RouterMsg>, worker: mpsc::Sender<WorkItem>) {
    let mut seqs: HashMap<u64, Seq> = HashMap::new();
    let mut next_id: u64 = 1;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        let msg = tokio::select! {
            m = rx.recv() => match m { Some(m) => m, None => break },
            _ = tick.tick() => {
                let stale: Vec<u64> = seqs
                    .iter()
                    .filter(|(_, s)| s.last_token.elapsed() > SEQ_TIMEOUT || s.sink.is_closed())
                    .map(|(k, _)| *k)
                    .collect();
                for id in &stale {
                    if let Some(s) = seqs.remove(id) {
                        let _ = s.sink.send(SeqOut::Failed(format!(
                            "no token for {} s: a stage lost the sequence",
                            SEQ_TIMEOUT.as_secs()
                        )));
                    }
                }
                if !stale.is_empty() {
                    let _ = worker.send(WorkItem::End(stale)).await;
                }
                continue;
            }
        };
        match msg {
            RouterMsg::Admit {
                prompt,
                params,
                sink,
                reply,
            } => {
                if seqs.len() >= MAX_IN_FLIGHT {
                    let _ = reply.send(Err(PipelineError::Busy(seqs.len())));
                    continue;
                }
                let id = next_id;
                next_id += 1;
                let chunk = SeqChunk {
                    seq: id,
                    pos: 0,
                    len: prompt.len() as u32,
                    params: Some(params),
                };
                seqs.insert(
                    id,
                    Seq {
                        sink,
                        last_token: Instant::now(),
                    },
                );
                let item = WorkItem::Run {
                    chunks: vec![chunk],
                    input: Input::Tokens(prompt),
                };
                if worker.send(item).await.is_err() {
                    seqs.remove(&id);
                    let _ = reply.send(Err(PipelineError::Failed("the stage stopped".into())));
                    continue;
                }
                let _ = reply.send(Ok(id));
            }
            RouterMsg::Sampled(tokens) => {
                let mut chunks = Vec::new();
                let mut next = Vec::new();
                let mut ended = Vec::new();
                let mut per_seq: HashMap<u64, Vec<SampledToken>> = HashMap::new();
                for t in tokens {
                    per_seq.entry(t.seq).or_default().push(t);
                }
                for (id, toks) in per_seq {
                    let Some(s) = seqs.get_mut(&id) else {
                        continue; // cancelled meanwhile
                    };
                    s.last_token = Instant::now();
                    let Some(last) = toks.last().map(|t| (t.finish, t.pos, t.token)) else {
                        continue;
                    };
                    let (finish, pos, token) = last;
                    if finish == Finish::Failed {
                        let _ = s
                            .sink
                            .send(SeqOut::Failed("a stage failed on this sequence".into()));
                        seqs.remove(&id);
                        ended.push(id);
                        continue;
                    }
                    let delivered = s.sink.send(SeqOut::Tokens(toks)).is_ok();
                    if finish != Finish::No || !delivered {
                        seqs.remove(&id);
                        ended.push(id);
                    } else {
                        chunks.push(SeqChunk {
                            seq: id,
                            pos,
                            len: 1,
                            params: None,
                        });
                        next.push(token);
                    }
                }
                if !chunks.is_empty() {
                    let _ = worker
                        .send(WorkItem::Run {
                            chunks,
                            input: Input::Tokens(next),
                        })
                        .await;
                }
                if !ended.is_empty() {
                    let _ = worker.send(WorkItem::End(ended)).await;
                }
            }
            RouterMsg::Cancel(id) => {
                if seqs.remove(&id).is_some() {
                    debug!(seq = id, "cancelled");
                    let _ = worker.send(WorkItem::End(vec![id])).await;
                }
            }
            RouterMsg::FailAll(reason) => {
                if !seqs.is_empty() {
                    warn!(
                        sequences = seqs.len(),
                        "failing in-flight sequences: {reason}"
                    );
                }
                let ids: Vec<u64> = seqs.keys().copied().collect();
                for (_, s) in seqs.drain() {
                    let _ = s.sink.send(SeqOut::Failed(reason.clone()));
                }
                if !ids.is_empty() {
                    let _ = worker.try_send(WorkItem::End(ids));
                }
            }
            RouterMsg::Stop => {
                for (_, s) in seqs.drain() {
                    let _ = s.sink.send(SeqOut::Failed("the stage was unloaded".into()));
                }
                break;
            }
        }
    }
}
