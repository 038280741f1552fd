//! Placement: the leader plans the model over the members that hold it,
//! has each stage node load its layer range, and activates the placement
//! on every member once all stages are loaded. A change in the set of
//! members holding the model (a join, a leave, a model measured) leads to a
//! new placement; until it is active, requests use the previous one.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use hearth_models::StageSpec;
use hearth_net::framed::{expect, write_message};
use hearth_net::{IncomingStream, NodeId};
use hearth_proto::{Message, limits, stream_kind};
use serde::{Deserialize, Serialize};
use tracing::{debug, info, warn};

use super::service::Service;
use super::{PlacedStage, Placement};
use crate::membership::Membership;
use crate::profile::{PlanRequest, PlannerInput, ProfileBook, plan_report, planner_input};

/// Version of the control documents.
pub const CONTROL_FORMAT: u32 = 1;
/// How long the set of members must hold still before it is placed on.
const SETTLE: Duration = Duration::from_millis(1500);
/// How long a stage node may take to load its layers.
const LOAD_TIMEOUT: Duration = Duration::from_secs(300);
/// Wait after a failed placement before trying again.
const RETRY: Duration = Duration::from_secs(5);
/// How often the leader looks at the cluster.
const PERIOD: Duration = Duration::from_millis(300);

/// How the leader splits the model.
#[derive(Debug, Clone)]
pub enum PlacementPolicy {
    /// The partitioner's plan for this workload over the measured profiles.
    Planned(PlanRequest),
    /// Equal layer ranges over every member that holds the model (in node
    /// order): for tests and for several nodes on one machine, whose
    /// profiles each claim the whole machine.
    Even,
}

impl Default for PlacementPolicy {
    /// Single-stream decode, what a person chatting feels, with room for
    /// 8192 tokens of KV cache (eight 1024-token streams' worth). The cost
    /// model times decode one sequence at a time, so planning for many
    /// sequences in flight credits a split with pipelining while a single
    /// device's batching (which serves them together) goes uncounted: a
    /// split then wins on paper and loses in practice.
    fn default() -> Self {
        Self::Planned(PlanRequest {
            sequences: 1,
            context: 8192,
            ..PlanRequest::default()
        })
    }
}

/// How often the leader re-plans from the members' current figures.
const REPLAN_PERIOD: Duration = Duration::from_secs(2);
/// Least time a placement stays before one is made for speed alone.
const DWELL: Duration = Duration::from_secs(6);
/// A re-plan must predict this much more speed to replace a placement...
const GAIN: f64 = 1.25;
/// ...or this much to fall back to one device (the best single device is
/// what a user without the cluster would get: never be slower than it).
const FALLBACK_GAIN: f64 = 1.05;
/// ...in this many consecutive checks proposing the same split.
const STABLE_CHECKS: u32 = 2;
/// A device's cores or speed factor must move by this ratio to be named as
/// the reason of a re-placement.
const NOTABLE: f64 = 1.15;

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
        header_sha256: Option<String>,
        pieces: Vec<super::weights::Piece>,
    },
    /// Load the model of this name from your own store (reply at once:
    /// `Ready`, or `Failed` if you cannot start; events tell the rest).
    Load {
        model: String,
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
        stages: Vec<super::StageStats>,
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
}

#[derive(Serialize, Deserialize)]
struct Envelope {
    format: u32,
    #[serde(flatten)]
    body: Control,
}

impl Control {
    pub(crate) fn to_message(&self) -> Result<Message, String> {
        let doc = serde_json::to_vec(&Envelope {
            format: CONTROL_FORMAT,
            body: self.clone(),
        })
        .map_err(|e| e.to_string())?;
        Ok(Message::Control(doc))
    }

    pub(crate) fn from_bytes(bytes: &[u8]) -> Result<Self, String> {
        #[derive(Deserialize)]
        struct Head {
            format: u32,
        }
        let head: Head = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
        if head.format != CONTROL_FORMAT {
            return Err(format!(
                "control document of format {}, this node reads {CONTROL_FORMAT}",
                head.format
            ));
        }
        let env: Envelope = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
        Ok(env.body)
    }
}

/// Reads one control document from a stream.
pub(crate) async fn read_control(recv: &mut quinn::RecvStream) -> Result<Control, String> {
    let doc = expect(recv, limits::MAX_FRAME, "control", |m| match m {
        Message::Control(d) => Ok(d),
        other => Err(other),
    })
    .await
    .map_err(|e| e.to_string())?;
    Control::from_bytes(&doc)
}

/// Writes one control document to a stream.
pub(crate) async fn write_control(send: &mut quinn::SendStream, c: &Control) -> Result<(), String> {
    write_message(send, &c.to_message()?)
        .await
        .map_err(|e| e.to_string())
}

/// Sends `req` to `node` and waits for its reply.
pub(crate) async fn request(
    service: &Service,
    node: &str,
    req: &Control,
    wait: Duration,
) -> Result<Control, String> {
    if node == service.me() {
        return Ok(handle(service, req.clone(), service.endpoint().id()).await);
    }
    let id: NodeId = node.parse().map_err(|e| format!("{e}"))?;
    let conn = service
        .endpoint()
        .peer(id)
        .ok_or_else(|| format!("no connection to {}", id.short()))?;
    let exchange = async {
        let (mut send, mut recv) = conn
            .open(stream_kind::CONTROL)
            .await
            .map_err(|e| e.to_string())?;
        write_control(&mut send, req).await?;
        let _ = send.finish();
        read_control(&mut recv).await
    };
    tokio::time::timeout(wait, exchange)
        .await
        .map_err(|_| format!("no reply from {} in {} s", id.short(), wait.as_secs()))?
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
            match service
                .train()
                .start(
                    from,
                    order,
                    model.info.path.clone(),
                    model.info.times.content.clone().unwrap_or_default(),
                )
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
            if let Err(reason) = placement.validate() =>
        {
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
        Control::Load { model } => match service.load_model(&model) {
            Ok(()) => Control::Ready { id: 0 },
            Err(e) => Control::Failed {
                id: 0,
                reason: e.to_string(),
            },
        },
        Control::Unload => {
            service.unload_model();
            Control::Ready { id: 0 }
        }
        Control::StatsRequest => Control::Stats {
            stages: service.stats(),
        },
        // Recorded by `serve`, which knows the sender; from this node
        // itself there is nothing to record twice.
        Control::Event { .. } => Control::Ready { id: 0 },
        Control::Ready { id } | Control::Failed { id, .. } => Control::Failed {
            id,
            reason: "not a request".into(),
        },
        Control::Stats { .. } => Control::Failed {
            id: 0,
            reason: "not a request".into(),
        },
        Control::Fetch { .. } | Control::Manifest { .. } => Control::Failed {
            id: 0,
            reason: "weights travel on their own stream".into(),
        },
    }
}

/// Serves one incoming control stream: one request, one reply.
pub(crate) async fn serve(stream: IncomingStream, service: Service) {
    let IncomingStream {
        peer,
        mut send,
        mut recv,
    } = stream;
    let reply = match tokio::time::timeout(Duration::from_secs(10), read_control(&mut recv)).await {
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
        Ok(Err(reason)) => {
            warn!(
                "bad control request from {}: {reason}",
                peer.node_id.short()
            );
            Control::Failed { id: 0, reason }
        }
        Err(_) => return,
    };
    let _ = write_control(&mut send, &reply).await;
    let _ = send.finish();
}

/// Stages as (device index, layers), and the planner's predicted step
/// time and tokens per second.
type Decision = (Vec<(usize, StageSpec)>, Option<f64>, Option<f64>);

/// Splits `layers` into the stages of `policy` over `input`'s devices.
pub(crate) fn decide(
    policy: &PlacementPolicy,
    input: &PlannerInput,
    info: &crate::profile::ModelInfo,
) -> Result<Decision, String> {
    let layers = info.config.num_hidden_layers;
    match policy {
        PlacementPolicy::Even => {
            let k = input.node_ids.len().min(layers).max(1);
            if input.node_ids.is_empty() {
                return Err("no member holds the model".into());
            }
            Ok((
                (0..k)
                    .map(|i| {
                        (
                            i,
                            StageSpec {
                                start: layers * i / k,
                                end: layers * (i + 1) / k,
                                embed: i == 0,
                                head: i + 1 == k,
                            },
                        )
                    })
                    .collect(),
                None,
                None,
            ))
        }
        PlacementPolicy::Planned(req) => {
            let workload = req.workload(&info.config)?;
            let report = plan_report(&info.cost, input.clone(), workload);
            let plan = report
                .plan
                .ok_or_else(|| report.error.unwrap_or_else(|| "no plan".into()))?;
            Ok((
                plan.stages
                    .iter()
                    .map(|s| {
                        (
                            s.device,
                            StageSpec {
                                start: s.layers.start,
                                end: s.layers.end,
                                embed: s.embed,
                                head: s.head,
                            },
                        )
                    })
                    .collect(),
                Some(plan.step_s),
                Some(plan.tokens_per_s),
            ))
        }
    }
}

/// The stages of a placement as (node id, layers), to compare splits.
type Split = Vec<(String, usize, usize)>;

fn split_of(p: &Placement) -> Split {
    p.stages
        .iter()
        .map(|s| (s.node_id.clone(), s.spec.start, s.spec.end))
        .collect()
}

/// The leader's re-planning for speed: hysteresis (a large predicted gain,
/// the same proposal in consecutive checks, a dwell time after each
/// switch) so figures that wobble do not make placements flap.
struct Replan {
    last_check: Instant,
    last_switch: Instant,
    proposal: Option<(Split, u32)>,
}

impl Replan {
    fn new() -> Self {
        let now = Instant::now();
        Self {
            last_check: now,
            last_switch: now,
            proposal: None,
        }
    }

    /// A placement was made (for whatever reason).
    fn switched(&mut self) {
        self.last_switch = Instant::now();
        self.proposal = None;
    }

    /// Whether to re-place `current` now, and why.
    fn check(
        &mut self,
        policy: &PlacementPolicy,
        input: &PlannerInput,
        info: &crate::profile::ModelInfo,
        current: &Placement,
    ) -> Option<String> {
        let PlacementPolicy::Planned(req) = policy else {
            return None;
        };
        if self.last_check.elapsed() < REPLAN_PERIOD || self.last_switch.elapsed() < DWELL {
            return None;
        }
        self.last_check = Instant::now();
        let workload = req.workload(&info.config).ok()?;
        let now = evaluate_placement(current, input, info, workload);
        let best =
            hearth_partitioner::plan(&info.cost, &input.devices, &input.links, workload).ok()?;
        let proposal: Split = best
            .stages
            .iter()
            .map(|s| {
                (
                    input.node_ids[s.device].clone(),
                    s.layers.start,
                    s.layers.end,
                )
            })
            .collect();
        let now_step = now.as_ref().map_or(f64::INFINITY, |p| p.step_s);
        let need = if best.stages.len() == 1 {
            FALLBACK_GAIN
        } else {
            GAIN
        };
        if proposal == split_of(current) || now_step < best.step_s * need {
            self.proposal = None;
            return None;
        }
        let seen = match &mut self.proposal {
            Some((p, n)) if *p == proposal => {
                *n += 1;
                *n
            }
            _ => {
                self.proposal = Some((proposal, 1));
                1
            }
        };
        if seen < STABLE_CHECKS {
            return None;
        }
        let moved = moved_figures(&current.figures, &input.figures);
        let now_tok = now.map_or(0.0, |p| p.tokens_per_s);
        Some(format!(
            "{}predicted {now_tok:.1} → {:.1} tok/s",
            if moved.is_empty() {
                String::new()
            } else {
                format!("{}; ", moved.join("; "))
            },
            best.tokens_per_s
        ))
    }
}

/// `placement` under `input`'s figures for `workload`, if its members are
/// all in `input` and it fits.
fn evaluate_placement(
    placement: &Placement,
    input: &PlannerInput,
    info: &crate::profile::ModelInfo,
    workload: hearth_partitioner::Workload,
) -> Option<hearth_partitioner::Plan> {
    let assignment: Vec<(usize, std::ops::Range<usize>)> = placement
        .stages
        .iter()
        .map(|s| {
            input
                .node_ids
                .iter()
                .position(|n| *n == s.node_id)
                .map(|d| (d, s.spec.start..s.spec.end))
        })
        .collect::<Option<_>>()?;
    hearth_partitioner::evaluate(
        &info.cost,
        &input.devices,
        &input.links,
        workload,
        &assignment,
    )
    .ok()
}

/// The single-stream decode rate `placement` should give with the figures
/// the cluster has now (live ones where trusted): what the leader compares
/// re-plans against, for people to set beside what they measure.
pub(crate) fn predict_now(
    placement: &Placement,
    profiles: &crate::profile::ClusterProfiles,
    info: &crate::profile::ModelInfo,
) -> Option<hearth_partitioner::Plan> {
    let input = planner_input(profiles, &info.times);
    // Decode time does not depend on the context; the smallest one fits
    // wherever the placement does.
    let workload = hearth_partitioner::Workload::Decode {
        sequences: 1,
        context: 1,
    };
    evaluate_placement(placement, &input, info, workload)
}

/// What changed between the figures a placement used and the current
/// ones, in words ("b: 0.25 → 1.00 cores available").
fn moved_figures(
    then: &[crate::profile::DeviceFigures],
    now: &[crate::profile::DeviceFigures],
) -> Vec<String> {
    let notable = |a: f64, b: f64| a > 0.0 && b > 0.0 && (a / b).max(b / a) >= NOTABLE;
    let mut out = Vec::new();
    for f in now {
        let Some(old) = then.iter().find(|o| o.node_id == f.node_id) else {
            out.push(format!("{}: now considered", f.name));
            continue;
        };
        if let (Some(a), Some(b)) = (old.cores, f.cores)
            && notable(a, b)
        {
            out.push(format!("{}: {a:.2} → {b:.2} cores available", f.name));
        } else if notable(old.layer_decode_s, f.layer_decode_s) {
            out.push(format!(
                "{}: {:.3} → {:.3} ms per layer ({:?} figures)",
                f.name,
                old.layer_decode_s * 1e3,
                f.layer_decode_s * 1e3,
                f.source
            ));
        }
    }
    out
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Runs the leader's side on every node (it acts only while the node leads).
pub(crate) fn spawn(
    service: Service,
    membership: Membership,
    profiles: ProfileBook,
    policy: PlacementPolicy,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut seen: Vec<String> = Vec::new();
        let mut seen_since = Instant::now();
        let mut retry_at: Option<Instant> = None;
        let mut informed = Informed::default();
        let mut replan = Replan::new();
        let mut tick = tokio::time::interval(PERIOD);
        loop {
            tick.tick().await;
            service.collect_garbage();
            let Some(view) = membership.view().await else {
                break;
            };
            if view.leader != service.me() {
                continue;
            }
            let Some(model) = service.model() else {
                continue;
            };
            let members: Vec<String> = view.members.iter().map(|m| m.node_id.clone()).collect();
            let input = planner_input(&profiles.snapshot(&members), &model.info.times);
            let mut holders = input.node_ids.clone();
            holders.sort();
            if holders != seen {
                seen = holders.clone();
                seen_since = Instant::now();
            }
            let current = service.active();
            let alive = |p: &Placement| p.stages.iter().all(|s| members.contains(&s.node_id));
            let stale = current.as_ref().is_none_or(|p| {
                p.members != holders || !alive(p) || p.fingerprint != model.info.times.fingerprint
            });
            let reason = if let (false, Some(p)) = (stale, &current) {
                // Tell members that joined since which placement is active.
                informed.tell(&service, p, &members).await;
                // Stages of an older placement still draining here: wait,
                // so at most two placements' stages are ever loaded.
                if service.draining() {
                    continue;
                }
                match replan.check(&policy, &input, &model.info, p) {
                    Some(why) => why,
                    None => continue,
                }
            } else {
                if seen_since.elapsed() < SETTLE || retry_at.is_some_and(|t| Instant::now() < t) {
                    continue;
                }
                match &current {
                    None => "no placement is active".to_string(),
                    Some(p) if p.fingerprint != model.info.times.fingerprint => {
                        format!("the model is now {}", model.info.times.model)
                    }
                    Some(_) => format!(
                        "the members holding the model changed ({} now)",
                        holders.len()
                    ),
                }
            };
            let stages = match decide(&policy, &input, &model.info) {
                Ok(s) => s,
                Err(e) => {
                    warn!("cannot place the model: {e}");
                    retry_at = Some(Instant::now() + RETRY);
                    continue;
                }
            };
            let name_of = |id: &str| {
                view.members
                    .iter()
                    .find(|m| m.node_id == id)
                    .map_or_else(|| id.get(..8).unwrap_or(id).to_string(), |m| m.name.clone())
            };
            let placement = Placement {
                id: now_ms().max(current.as_ref().map_or(0, |p| p.id + 1)),
                model: model.info.times.model.clone(),
                fingerprint: model.info.times.fingerprint.clone(),
                content: model.info.times.content.clone(),
                stages: stages
                    .0
                    .iter()
                    .map(|(d, spec)| PlacedStage {
                        node_id: input.node_ids[*d].clone(),
                        name: name_of(&input.node_ids[*d]),
                        spec: *spec,
                    })
                    .collect(),
                members: holders.clone(),
                predicted_step_s: stages.1,
                predicted_tokens_per_s: stages.2,
                reason: Some(reason),
                figures: input.figures.clone(),
            };
            replan.switched();
            info!(
                placement = placement.id,
                split = %placement
                    .stages
                    .iter()
                    .map(|s| format!("{}:{}..{}", s.name, s.spec.start, s.spec.end))
                    .collect::<Vec<_>>()
                    .join(" "),
                reason = placement.reason.as_deref().unwrap_or(""),
                "placing the model"
            );
            service
                .events()
                .emit(crate::events::EventKind::PlacementPlanned {
                    placement: placement.clone(),
                });
            let assign = Control::Assign {
                placement: placement.clone(),
            };
            let replies = futures_join(placement.stages.iter().map(|s| {
                let service = service.clone();
                let assign = assign.clone();
                let node = s.node_id.clone();
                async move {
                    (
                        node.clone(),
                        request(&service, &node, &assign, LOAD_TIMEOUT).await,
                    )
                }
            }))
            .await;
            let failed: Vec<String> = replies
                .into_iter()
                .filter_map(|(node, r)| match r {
                    Ok(Control::Ready { id }) if id == placement.id => None,
                    Ok(Control::Failed { reason, .. }) => {
                        Some(format!("{}: {reason}", name_of(&node)))
                    }
                    Ok(other) => Some(format!("{}: unexpected reply {other:?}", name_of(&node))),
                    Err(e) => Some(format!("{}: {e}", name_of(&node))),
                })
                .collect();
            if !failed.is_empty() {
                warn!("placement {} failed: {}", placement.id, failed.join("; "));
                retry_at = Some(Instant::now() + RETRY);
                continue;
            }
            retry_at = None;
            informed.tell(&service, &placement, &members).await;
        }
    })
}

/// Which members have been sent the active placement.
#[derive(Default)]
struct Informed {
    placement: u64,
    members: HashSet<String>,
}

impl Informed {
    /// Activates `placement` on each of `members` not yet told of it.
    async fn tell(&mut self, service: &Service, placement: &Placement, members: &[String]) {
        if self.placement != placement.id {
            self.placement = placement.id;
            self.members.clear();
        }
        let activate = Control::Activate {
            placement: placement.clone(),
        };
        for m in members {
            if self.members.contains(m) {
                continue;
            }
            match request(service, m, &activate, Duration::from_secs(5)).await {
                Ok(_) => {
                    self.members.insert(m.clone());
                }
                Err(e) => debug!("activating on {m}: {e}"),
            }
        }
    }
}

/// Runs futures concurrently and collects their outputs in order.
async fn futures_join<F: std::future::Future + Send + 'static>(
    futs: impl Iterator<Item = F>,
) -> Vec<F::Output>
where
    F::Output: Send + 'static,
{
    let handles: Vec<_> = futs.map(tokio::spawn).collect();
    let mut out = Vec::with_capacity(handles.len());
    for h in handles {
        if let Ok(v) = h.await {
            out.push(v);
        }
    }
    out
}
