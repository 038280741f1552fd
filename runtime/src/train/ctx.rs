//! What a job uses of its node: the served model, placement over the
//! members, stage orders over `CONTROL`, membership losses, events.

use std::path::PathBuf;
use std::time::Duration;

use hearth_models::StageSpec;
use hearth_models::train::Method;
use tokio::sync::broadcast;

use super::TrainNet;
use super::host::{StageOrder, TrainHost};
use super::schedule::Schedule;
use super::spec::{JobSpec, MethodSpec};
use crate::control::{Control, request};
use crate::events::EventKind;
use crate::membership::{Membership, MembershipEvent};
use crate::pipeline::service::Service;
use crate::placement::PlacementPolicy;
use crate::placement::{Split, decide, propose, with_home};
use crate::profile::{PlanRequest, ProfileBook, planner_input};

/// Training slowdowns measured from the stages' busy times that the
/// figures do not show (a program competing inside a device's own CPU
/// quota), per node id: (factor, the device's training figure then). An
/// entry holds until the device's figure gets faster by more than
/// [`NOTABLE`]; a slower figure explains part of it, and the rest holds.
pub(crate) type Observed = std::collections::HashMap<String, (f64, f64)>;

/// A figure that moves by more than this ratio tells something new.
const NOTABLE: f64 = 1.2;

/// A training re-plan must predict a step this many times shorter.
pub(crate) const REPLAN_GAIN: f64 = 1.25;

/// How long a stage node may take to load its layers.
const ORDER_TIMEOUT: Duration = Duration::from_secs(300);

/// A node's resources for the jobs it runs.
pub struct JobCtx {
    pub(crate) service: Service,
    pub(crate) membership: Membership,
    pub(crate) profiles: ProfileBook,
    pub(crate) policy: PlacementPolicy,
    pub(crate) host: TrainHost,
    /// Held by the running job.
    pub(crate) turn: tokio::sync::Mutex<()>,
}

impl JobCtx {
    /// The served model: its id, file and content id.
    pub(crate) fn model(&self) -> Option<(String, PathBuf, String)> {
        self.service.model().map(|m| {
            (
                m.info.times.model.clone(),
                m.info.path.clone(),
                m.info.times.content.clone().unwrap_or_default(),
            )
        })
    }

    /// Where a merged model goes so the node can load it by name.
    pub(crate) fn models_dir(&self) -> Option<PathBuf> {
        self.service.source().and_then(|s| s.models_dir())
    }

    pub(crate) fn net(&self) -> TrainNet {
        self.host.net().clone()
    }

    /// The placement policy for training `spec` in micro-batches of
    /// `micro_batch_tokens` tokens.
    fn training_policy(&self, spec: &JobSpec, micro_batch_tokens: u32) -> PlacementPolicy {
        match &self.policy {
            PlacementPolicy::Even => PlacementPolicy::Even,
            PlacementPolicy::Planned(req) => PlacementPolicy::Planned(PlanRequest {
                workload: "training".into(),
                micro_batch_tokens: micro_batch_tokens.max(1),
                micro_batches: spec.micro_batches.min(spec.batch_size as u32).max(1),
                schedule: match spec.schedule {
                    Schedule::OneFOneB => "1f1b".into(),
                    Schedule::Gpipe => "gpipe".into(),
                },
                recompute: true,
                method: match spec.method.method() {
                    Method::Full => "full".into(),
                    Method::Lora(_) => "lora".into(),
                },
                lora_rank: match &spec.method {
                    MethodSpec::Lora { rank, .. } => *rank as u32,
                    MethodSpec::Full => 0,
                },
                ..req.clone()
            }),
        }
    }

    /// Stages (node id, name, layers) over the live members that serve the
    /// model: the partitioner's training plan, or an even split; U-shaped
    /// around this node (the data's) when the job keeps its data home (by
    /// default whenever this node can hold the embedding and the head),
    /// with a note when the default could not. Slowdowns measured so far
    /// in the job (`observed`) scale the figures.
    pub(crate) async fn place(
        &self,
        spec: &JobSpec,
        micro_batch_tokens: u32,
        observed: &mut Observed,
    ) -> Result<(Vec<(String, String, StageSpec)>, Option<String>), String> {
        let model = self.service.model().ok_or("the model was unloaded")?;
        let view = self.membership.view().await.ok_or("the node is stopping")?;
        let members: Vec<String> = view.members.iter().map(|m| m.node_id.clone()).collect();
        let mut input = planner_input(&self.profiles.snapshot(&members), &model.info.times);
        apply_observed(&mut input, &Default::default(), observed);
        let policy = self.training_policy(spec, micro_batch_tokens);
        let own = self.net().id();
        let home = input
            .node_ids
            .iter()
            .position(|n| n.parse::<hearth_net::NodeId>().ok() == Some(own));
        let info = &model.info;
        let leaves = "token ids and labels go to other nodes";
        let ((stages, _, _), note) = match (spec.keep_data_home, home) {
            (Some(false), _) => (decide(&policy, &input, info, None)?, None),
            (Some(true), None) => {
                return Err("keep_data_home: this node (the data's) does not serve the model, so it cannot run the embedding and the head".into());
            }
            (Some(true), Some(h)) => (
                decide(&policy, &input, info, Some(h))
                    .map_err(|e| format!("keep_data_home: {e}"))?,
                None,
            ),
            (None, None) => (
                decide(&policy, &input, info, None)?,
                Some(format!(
                    "{leaves}: this node (the data's) does not serve the model"
                )),
            ),
            (None, Some(h)) => match decide(&policy, &input, info, Some(h)) {
                Ok(d) => (d, None),
                Err(e) => (
                    decide(&policy, &input, info, None)?,
                    Some(format!(
                        "{leaves}: this node (the data's) cannot run the embedding and the head ({e})"
                    )),
                ),
            },
        };
        let name_of = |id: &str| {
            view.members
                .iter()
                .find(|m| m.node_id == id)
                .map_or_else(|| id.get(..8).unwrap_or(id).to_string(), |m| m.name.clone())
        };
        let stages = stages
            .into_iter()
            .map(|(d, s)| {
                let id = input
                    .node_ids
                    .get(d)
                    .ok_or_else(|| format!("the plan names device {d}"))?;
                Ok((id.clone(), name_of(id), s))
            })
            .collect::<Result<_, String>>()?;
        Ok((stages, note))
    }

    /// A better training split than `current` under the members' figures
    /// now (a device got busy or freed up), if the planner predicts one
    /// with a step at least [`REPLAN_GAIN`] times shorter: the proposed
    /// split as (node id, layers) and why, in words. Never with an even
    /// split (nothing is measured then).
    ///
    /// `drifts` are the current split's stages' measured busy time per
    /// token now ÷ early in the split, with each device's training figure
    /// then; a slowdown they show beyond what the figures show goes into
    /// `observed`, whose entries scale those devices' figures.
    pub(crate) async fn better_split(
        &self,
        spec: &JobSpec,
        micro_batch_tokens: u32,
        current: &[(String, String, StageSpec)],
        drifts: &std::collections::HashMap<String, (f64, f64)>,
        observed: &mut Observed,
    ) -> Option<(Split, String)> {
        let PlacementPolicy::Planned(req) = self.training_policy(spec, micro_batch_tokens) else {
            return None;
        };
        let model = self.service.model()?;
        let view = self.membership.view().await?;
        let members: Vec<String> = view.members.iter().map(|m| m.node_id.clone()).collect();
        let mut input = planner_input(&self.profiles.snapshot(&members), &model.info.times);
        let current_split: Split = current
            .iter()
            .map(|(id, _, s)| (id.clone(), s.start, s.end))
            .collect();
        // A split that keeps the data on this node (both ends here: U-shaped
        // or this node alone) is only ever replaced by another that does.
        let own = self.net().id().to_string();
        let home = match (current_split.first(), current_split.last()) {
            _ if spec.keep_data_home == Some(false) => None,
            (Some(a), Some(b)) if a.0 == own && b.0 == own => {
                input.node_ids.iter().position(|n| *n == own)
            }
            _ => None,
        };
        let workload = with_home(req.workload(&model.info.config).ok()?, home);
        let slower = apply_observed(&mut input, drifts, observed);
        let current = current_split;
        let p = propose(&input, &model.info, workload, &current)?;
        let now = p.now.as_ref()?.step_s;
        tracing::debug!(now, best = p.best.step_s, proposal = ?p.split, "training re-plan check");
        if !p.beats(&current, REPLAN_GAIN) {
            return None;
        }
        let mut moved: Vec<String> = input
            .figures
            .iter()
            .filter_map(|f| {
                f.cores
                    .map(|c| format!("{}: {c:.2} cores available", f.name))
            })
            .collect();
        moved.extend(slower);
        let best = p.best.step_s;
        Some((
            p.split,
            format!(
                "{}predicted step {now:.2} s → {best:.2} s",
                if moved.is_empty() {
                    String::new()
                } else {
                    format!("{}; ", moved.join(", "))
                },
            ),
        ))
    }

    /// Each member's training figure now (one layer's forward + backward
    /// per token, current figures), by node id.
    pub(crate) async fn train_figures(&self) -> std::collections::HashMap<String, f64> {
        let (Some(model), Some(view)) = (self.service.model(), self.membership.view().await) else {
            return Default::default();
        };
        let members: Vec<String> = view.members.iter().map(|m| m.node_id.clone()).collect();
        let input = planner_input(&self.profiles.snapshot(&members), &model.info.times);
        input
            .node_ids
            .into_iter()
            .zip(input.devices.iter().map(|d| d.layer.train_s_per_token))
            .collect()
    }

    /// Has `node` load and run `order`'s stage.
    pub(crate) async fn order(&self, node: &str, order: StageOrder) -> Result<(), String> {
        let job = order.job;
        match request(
            &self.service,
            node,
            &Control::TrainStage { order },
            ORDER_TIMEOUT,
        )
        .await
        .map_err(|e| e.to_string())?
        {
            Control::Ready { id } if id == job => Ok(()),
            Control::Failed { reason, .. } => Err(format!("{}: {reason}", short(node))),
            other => Err(format!("{}: unexpected reply {other:?}", short(node))),
        }
    }

    /// Tells `node` to drop job `job`'s stage (best effort).
    pub(crate) async fn end(&self, node: &str, job: u64) {
        let _ = request(
            &self.service,
            node,
            &Control::TrainEnd { job },
            Duration::from_secs(10),
        )
        .await;
    }

    /// Resolves when one of `nodes` is not (or no longer) a member.
    pub(crate) async fn lost(&self, nodes: Vec<String>) -> String {
        let mut events = self.membership.events();
        if let Some(view) = self.membership.view().await
            && let Some(gone) = nodes
                .iter()
                .find(|n| !view.members.iter().any(|m| &m.node_id == *n))
        {
            return format!("stage node {} is not a member", short(gone));
        }
        loop {
            match events.recv().await {
                Ok(MembershipEvent::Left {
                    node_id,
                    name,
                    reason,
                }) if nodes.contains(&node_id.to_string()) => {
                    return format!("stage node {name} ({}) left: {reason}", node_id.short());
                }
                Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                Err(_) => return "the node is stopping".into(),
            }
        }
    }

    /// Records a cluster event about job `job`.
    pub(crate) fn cluster_event(&self, job: &str, message: &str) {
        self.service.events().emit(EventKind::Training {
            job: job.to_string(),
            message: message.to_string(),
        });
    }
}

/// Records in `observed` what `drifts` show beyond the figures in `input`,
/// updates entries whose device's figure has moved since (see
/// [`Observed`]), and scales the training figures in `input` by the rest;
/// returns them in words.
fn apply_observed(
    input: &mut crate::profile::PlannerInput,
    drifts: &std::collections::HashMap<String, (f64, f64)>,
    observed: &mut Observed,
) -> Vec<String> {
    let mut slower = Vec::new();
    for (d, node) in input.node_ids.iter().enumerate() {
        let Some(dev) = input.devices.get_mut(d) else {
            continue;
        };
        let fig = dev.layer.train_s_per_token;
        if let Some((drift, then)) = drifts.get(node) {
            // What the figures explain of the drift, and what they do not.
            let k = drift * then / fig;
            tracing::debug!(node = %node.get(..8).unwrap_or(node), drift, then, fig, k, "training pace");
            if k.is_finite() && k > NOTABLE {
                observed.insert(node.clone(), (k, fig));
            }
        }
        let Some(&(k, at)) = observed.get(node) else {
            continue;
        };
        let moved = fig / at;
        // Faster figures: whatever slowed the device may be gone.
        if !moved.is_finite() || moved < 1.0 / NOTABLE {
            observed.remove(node);
            continue;
        }
        // Slower figures (its offer dropped) explain part of the measured
        // slowdown; the rest still holds.
        let k = if moved > NOTABLE {
            let rest = k / moved;
            if rest <= NOTABLE {
                observed.remove(node);
                continue;
            }
            observed.insert(node.clone(), (rest, fig));
            rest
        } else {
            k
        };
        for t in [&mut dev.layer, &mut dev.embed, &mut dev.head] {
            t.train_s_per_token *= k;
            t.train_forward_s_per_token *= k;
        }
        let name = input.figures.get(d).map_or("?", |f| f.name.as_str());
        slower.push(format!(
            "{name}: training {k:.2}× slower than its figures (busy time)"
        ));
    }
    slower
}

fn short(s: &str) -> &str {
    s.get(..8).unwrap_or(s)
}
