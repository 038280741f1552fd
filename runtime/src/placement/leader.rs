//! Placement: the leader plans the model over the members that hold it,
//! has each stage node load its layer range, and activates the placement
//! on every member once all stages are loaded. A change in the set of
//! members holding the model (a join, a leave, a model measured) leads to a
//! new placement; until it is active, requests use the previous one.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use tracing::{debug, info, warn};

use super::{
    PlacedStage, Placement, PlacementPolicy, Replica, Split, decide, now_ms, propose, replicas,
    split_of,
};
use crate::control::{Control, request};
use crate::membership::Membership;
use crate::pipeline::service::Service;
use crate::profile::{FigureSource, PlannerInput, ProfileBook, planner_input};

/// How long the set of members must hold still before it is placed on.
const SETTLE: Duration = Duration::from_millis(1500);
/// How long a stage node may take to load its layers.
const LOAD_TIMEOUT: Duration = Duration::from_secs(300);
/// Wait after a failed placement before trying again.
const RETRY: Duration = Duration::from_secs(5);
/// How often the leader looks at the cluster.
const PERIOD: Duration = Duration::from_millis(300);

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

/// Longest the leader waits for a device offered clearly more CPU than when
/// it measured to measure again (`profile::remeasure`) before re-planning
/// for speed with its old figures scaled up by the offer.
const REMEASURE_WAIT: Duration = Duration::from_secs(20);

/// The leader's re-planning for speed: hysteresis (a large predicted gain,
/// the same proposal in consecutive checks, a dwell time after each
/// switch) so figures that wobble do not make placements flap.
struct Replan {
    last_check: Instant,
    last_switch: Instant,
    proposal: Option<(Split, u32)>,
    /// Devices whose figures are their measurement scaled up to a larger
    /// offer, since when (they are measuring again).
    scaled_up: HashMap<String, Instant>,
}

impl Replan {
    fn new() -> Self {
        let now = Instant::now();
        Self {
            last_check: now,
            last_switch: now,
            proposal: None,
            scaled_up: HashMap::new(),
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
        if self.awaiting_measurement(&input.figures) {
            return None;
        }
        let workload = req.workload(&info.config).ok()?;
        let current_split = split_of(current);
        let p = propose(input, info, workload, &current_split)?;
        debug!(
            now_step = p.now.as_ref().map(|n| n.step_s),
            best_step = p.best.step_s,
            proposal = ?p.split,
            "re-plan check"
        );
        let need = if p.best.stages.len() == 1 {
            FALLBACK_GAIN
        } else {
            GAIN
        };
        if !p.beats(&current_split, need) {
            self.proposal = None;
            return None;
        }
        let seen = match &mut self.proposal {
            Some((s, n)) if *s == p.split => {
                *n += 1;
                *n
            }
            _ => {
                self.proposal = Some((p.split.clone(), 1));
                1
            }
        };
        if seen < STABLE_CHECKS {
            return None;
        }
        let moved = moved_figures(&current.figures, &input.figures);
        let now_tok = p.now.map_or(0.0, |n| n.tokens_per_s);
        Some(format!(
            "{}predicted {now_tok:.1} → {:.1} tok/s",
            if moved.is_empty() {
                String::new()
            } else {
                format!("{}; ", moved.join("; "))
            },
            p.best.tokens_per_s
        ))
    }
}

impl Replan {
    /// Whether a device's figures are still its old measurement scaled up
    /// to a larger offer, for less than [`REMEASURE_WAIT`]: such a device
    /// is measuring again, and a plan on the scaled figures would predict
    /// more than it delivers.
    fn awaiting_measurement(&mut self, figures: &[crate::profile::DeviceFigures]) -> bool {
        let scaled_up = |f: &&crate::profile::DeviceFigures| {
            f.source == FigureSource::Offer && crate::profile::offered_more(f.factor, 1.0)
        };
        self.scaled_up
            .retain(|id, _| figures.iter().filter(scaled_up).any(|f| f.node_id == *id));
        let mut waiting = false;
        for f in figures.iter().filter(scaled_up) {
            let since = *self
                .scaled_up
                .entry(f.node_id.clone())
                .or_insert_with(Instant::now);
            if since.elapsed() < REMEASURE_WAIT {
                debug!(device = %f.name, "waiting for its figures under the larger offer");
                waiting = true;
            }
        }
        waiting
    }
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
            let stages = match decide(&policy, &input, &model.info, None) {
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
            let used: Vec<usize> = stages.0.iter().map(|(d, _)| *d).collect();
            let mut placement = Placement {
                id: now_ms().max(current.as_ref().map_or(0, |p| p.id.saturating_add(1))),
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
                replicas: replicas(&policy, &input, &model.info, &used)
                    .into_iter()
                    .map(|(d, tokens_per_s)| Replica {
                        node_id: input.node_ids[d].clone(),
                        name: name_of(&input.node_ids[d]),
                        predicted_tokens_per_s: Some(tokens_per_s),
                    })
                    .collect(),
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
                replicas = %placement
                    .replicas
                    .iter()
                    .map(|r| r.name.as_str())
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
            let nodes = placement
                .stages
                .iter()
                .map(|s| s.node_id.clone())
                .chain(placement.replicas.iter().map(|r| r.node_id.clone()));
            let replies = futures_join(nodes.map(|node| {
                let service = service.clone();
                let assign = assign.clone();
                async move {
                    (
                        node.clone(),
                        request(&service, &node, &assign, LOAD_TIMEOUT).await,
                    )
                }
            }))
            .await;
            // A replica that could not load is left out; a pipeline stage
            // that could not fails the placement.
            let (replies, replica_replies): (Vec<_>, Vec<_>) = replies
                .into_iter()
                .partition(|(node, _)| placement.stage_of(node).is_some());
            for (node, r) in replica_replies {
                if !matches!(r, Ok(Control::Ready { id }) if id == placement.id) {
                    warn!(
                        "replica {} left out of placement {}: {r:?}",
                        name_of(&node),
                        placement.id
                    );
                    placement.replicas.retain(|x| x.node_id != node);
                }
            }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::profile::DeviceFigures;

    fn figures(source: FigureSource, factor: f64) -> Vec<DeviceFigures> {
        vec![DeviceFigures {
            node_id: "b".into(),
            name: "b".into(),
            cores: Some(1.0),
            factor,
            source,
            layer_decode_s: 1e-3,
        }]
    }

    #[test]
    fn re_plans_wait_for_a_device_offered_more_to_measure_again() {
        let mut r = Replan::new();
        // Scaled up from a quarter of the offer: wait.
        assert!(r.awaiting_measurement(&figures(FigureSource::Offer, 0.25)));
        assert!(r.awaiting_measurement(&figures(FigureSource::Offer, 0.25)));
        // Scaled down, measured, or live: no wait.
        assert!(!r.awaiting_measurement(&figures(FigureSource::Offer, 4.0)));
        assert!(!r.awaiting_measurement(&figures(FigureSource::Measured, 1.0)));
        assert!(!r.awaiting_measurement(&figures(FigureSource::Live, 0.5)));
        assert!(r.scaled_up.is_empty());
        // A device that never measures again is waited for only so long.
        r.scaled_up
            .insert("b".into(), Instant::now() - REMEASURE_WAIT);
        assert!(!r.awaiting_measurement(&figures(FigureSource::Offer, 0.25)));
    }
}
