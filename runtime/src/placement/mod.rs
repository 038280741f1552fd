//! Placement: which member runs which layers of the served model. The
//! [`Placement`] data (checked when it comes from a peer), the policy that
//! splits the model ([`PlacementPolicy`], [`decide`]), and the leader's
//! loop ([`leader`]) that places, re-places when members or their speed
//! change, and switches members over. Pipeline inference runs the active
//! placement's stages; training jobs place their stages with the same
//! policy and planner input.

pub(crate) mod leader;

use hearth_models::StageSpec;
use serde::{Deserialize, Serialize};

use crate::profile::{PlanRequest, PlannerInput, plan_report, planner_input};

/// Which member runs which layers of the model, as the leader decided.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Placement {
    /// Increases with every new placement (milliseconds since the epoch on
    /// the leader that made it, or one more than the previous).
    pub id: u64,
    /// The model's name, layout fingerprint and content hash.
    pub model: String,
    pub fingerprint: String,
    pub content: Option<String>,
    /// The stages in pipeline order.
    pub stages: Vec<PlacedStage>,
    /// The members that held the model when it was planned (a change
    /// triggers a new placement).
    pub members: Vec<String>,
    /// What the planner predicted for this split, if it planned.
    #[serde(default)]
    pub predicted_step_s: Option<f64>,
    /// Tokens per second the planner predicted, if it planned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub predicted_tokens_per_s: Option<f64>,
    /// Why the leader made this placement (members changed, or a device's
    /// figures moved), for people.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The figures the plan used for each device it considered.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub figures: Vec<crate::profile::DeviceFigures>,
    /// Members outside the pipeline that hold the whole model as one more
    /// stage each: requests go to one of them instead of the pipeline when
    /// that adds to the cluster's total rate ([`crate::pipeline`]'s
    /// balancer), so a device too slow to shorten the pipeline still adds
    /// work under concurrent requests.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub replicas: Vec<Replica>,
}

/// A member serving the whole model on its own, beside the pipeline.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Replica {
    pub node_id: String,
    pub name: String,
    /// Single-stream decode rate the planner predicted for it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub predicted_tokens_per_s: Option<f64>,
}

/// Milliseconds since the Unix epoch on this node's clock: what placement
/// ids follow (the leader makes them; members bound them by it).
pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Longest `reason` a placement from a peer may carry.
pub const MAX_REASON: usize = 4096;
/// Most devices a placement from a peer may describe.
pub const MAX_FIGURES: usize = 256;

/// One stage of a placement.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PlacedStage {
    pub node_id: String,
    pub name: String,
    pub spec: StageSpec,
}

impl Placement {
    /// The index of `node`'s stage, if it has one.
    pub fn stage_of(&self, node: &str) -> Option<usize> {
        self.stages.iter().position(|s| s.node_id == node)
    }

    /// The whole model as one stage (what a replica runs).
    pub fn whole_model(&self) -> Option<StageSpec> {
        self.stages.last().map(|s| StageSpec {
            start: 0,
            end: s.spec.end,
            embed: true,
            head: true,
        })
    }

    /// The pipeline `node` runs a stage of, and the index of its stage:
    /// this placement itself for a member of the pipeline, a one-stage
    /// pipeline of its own for a replica.
    pub fn pipeline_for(&self, node: &str) -> Option<(Placement, usize)> {
        if let Some(i) = self.stage_of(node) {
            return Some((self.clone(), i));
        }
        let r = self.replicas.iter().find(|r| r.node_id == node)?;
        let spec = self.whole_model()?;
        Some((
            Placement {
                stages: vec![PlacedStage {
                    node_id: r.node_id.clone(),
                    name: r.name.clone(),
                    spec,
                }],
                replicas: Vec::new(),
                predicted_tokens_per_s: r.predicted_tokens_per_s,
                predicted_step_s: r.predicted_tokens_per_s.map(|t| 1.0 / t.max(1e-9)),
                ..self.clone()
            },
            0,
        ))
    }

    /// Checks a placement from a peer: at least one stage, contiguous layer
    /// ranges from 0, the embedding on the first stage only, the head on the
    /// last only, each member at most once (in the pipeline or as a
    /// replica).
    pub fn validate(&self) -> Result<(), String> {
        if self.reason.as_ref().is_some_and(|r| r.len() > MAX_REASON)
            || self.figures.len() > MAX_FIGURES
            || self.replicas.len() > MAX_FIGURES
            || self
                .figures
                .iter()
                .any(|f| f.name.len() > MAX_REASON || f.node_id.len() > MAX_REASON)
            || self
                .replicas
                .iter()
                .any(|r| r.name.len() > MAX_REASON || r.node_id.len() > MAX_REASON)
        {
            return Err("a placement with oversized notes".into());
        }
        for (i, r) in self.replicas.iter().enumerate() {
            if self.stage_of(&r.node_id).is_some()
                || self.replicas[..i].iter().any(|o| o.node_id == r.node_id)
            {
                return Err(format!("member {} has two stages", r.node_id));
            }
            if r.predicted_tokens_per_s
                .is_some_and(|t| !t.is_finite() || t < 0.0)
            {
                return Err(format!("replica {} has a nonsense prediction", r.node_id));
            }
        }
        let last = self
            .stages
            .len()
            .checked_sub(1)
            .ok_or("a placement without stages")?;
        let mut next = 0;
        for (i, s) in self.stages.iter().enumerate() {
            let spec = s.spec;
            if spec.start != next || spec.end < spec.start {
                return Err(format!(
                    "stage {i} has layers {}..{} after layer {next}",
                    spec.start, spec.end
                ));
            }
            if spec.embed != (i == 0) || spec.head != (i == last) {
                return Err(format!(
                    "stage {i} holds the embedding or head out of place"
                ));
            }
            if self.stage_of(&s.node_id) != Some(i) {
                return Err(format!("member {} has two stages", s.node_id));
            }
            next = spec.end;
        }
        Ok(())
    }
}

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

/// Stages as (device index, layers), and the planner's predicted step
/// time and tokens per second.
pub(crate) type Decision = (Vec<(usize, StageSpec)>, Option<f64>, Option<f64>);

/// Sets a training workload's data device (`home`: a U-shaped plan).
pub(crate) fn with_home(
    mut workload: hearth_partitioner::Workload,
    home: Option<usize>,
) -> hearth_partitioner::Workload {
    if let hearth_partitioner::Workload::Train { home: h, .. } = &mut workload {
        *h = home;
    }
    workload
}

/// Makes `stages` U-shaped around device `home`: it runs the first stage
/// (the embedding) and the last (final norm, head and loss), adding a
/// zero-layer stage at either end another device held.
pub(crate) fn u_shape(
    mut stages: Vec<(usize, StageSpec)>,
    home: usize,
    layers: usize,
) -> Vec<(usize, StageSpec)> {
    if stages.first().is_none_or(|(d, _)| *d != home) {
        if let Some((_, s)) = stages.first_mut() {
            s.embed = false;
        }
        stages.insert(
            0,
            (
                home,
                StageSpec {
                    start: 0,
                    end: 0,
                    embed: true,
                    head: false,
                },
            ),
        );
    }
    if stages.last().is_none_or(|(d, _)| *d != home) {
        if let Some((_, s)) = stages.last_mut() {
            s.head = false;
        }
        stages.push((
            home,
            StageSpec {
                start: layers,
                end: layers,
                embed: false,
                head: true,
            },
        ));
    }
    stages
}

/// Splits `layers` into the stages of `policy` over `input`'s devices;
/// with `home` (a training workload's data device), U-shaped around it.
pub(crate) fn decide(
    policy: &PlacementPolicy,
    input: &PlannerInput,
    info: &crate::profile::ModelInfo,
    home: Option<usize>,
) -> Result<Decision, String> {
    let layers = info.config.num_hidden_layers;
    match policy {
        PlacementPolicy::Even => {
            let k = input.node_ids.len().min(layers).max(1);
            if input.node_ids.is_empty() {
                return Err("no member holds the model".into());
            }
            if home.is_some_and(|h| h >= input.node_ids.len()) {
                return Err("the data's node does not hold the model".into());
            }
            let even = (0..k)
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
                .collect();
            Ok((
                match home {
                    Some(h) => u_shape(even, h, layers),
                    None => even,
                },
                None,
                None,
            ))
        }
        PlacementPolicy::Planned(req) => {
            let workload = with_home(req.workload(&info.config)?, home);
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

/// The devices of `input` outside the pipeline (`used`) that could each run
/// the whole model on their own, with the single-stream decode rate the
/// planner predicts for each: the replicas a planned placement offers
/// beside its pipeline (none for [`PlacementPolicy::Even`], which uses
/// every member).
pub(crate) fn replicas(
    policy: &PlacementPolicy,
    input: &PlannerInput,
    info: &crate::profile::ModelInfo,
    used: &[usize],
) -> Vec<(usize, f64)> {
    let PlacementPolicy::Planned(req) = policy else {
        return Vec::new();
    };
    let layers = info.config.num_hidden_layers;
    let workload = hearth_partitioner::Workload::Decode {
        sequences: 1,
        context: req.context,
    };
    (0..input.node_ids.len())
        .filter(|d| !used.contains(d))
        .filter_map(|d| {
            let whole = vec![(input.node_ids[d].clone(), 0, layers)];
            let plan = evaluate_split(&whole, input, info, workload)?;
            (plan.tokens_per_s.is_finite() && plan.tokens_per_s > 0.0)
                .then_some((d, plan.tokens_per_s))
        })
        .collect()
}

/// The stages of a placement as (node id, layers), to compare splits.
pub(crate) type Split = Vec<(String, usize, usize)>;

pub(crate) fn split_of(p: &Placement) -> Split {
    p.stages
        .iter()
        .map(|s| (s.node_id.clone(), s.spec.start, s.spec.end))
        .collect()
}

/// `split` under `input`'s figures for `workload`, if its nodes are all in
/// `input` and it fits.
pub(crate) fn evaluate_split(
    split: &Split,
    input: &PlannerInput,
    info: &crate::profile::ModelInfo,
    workload: hearth_partitioner::Workload,
) -> Option<hearth_partitioner::Plan> {
    let assignment: Vec<(usize, std::ops::Range<usize>)> = split
        .iter()
        .map(|(node, start, end)| {
            input
                .node_ids
                .iter()
                .position(|n| n == node)
                .map(|d| (d, *start..*end))
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

/// What the planner proposes instead of a current split.
pub(crate) struct Proposal {
    /// The best split for the workload under the figures now.
    pub split: Split,
    pub best: hearth_partitioner::Plan,
    /// The current split under the same figures (none: it no longer fits
    /// or lost a member).
    pub now: Option<hearth_partitioner::Plan>,
}

impl Proposal {
    /// Whether `best` beats the current split by `gain` (a current split
    /// that cannot be evaluated is always beaten).
    pub fn beats(&self, current: &Split, gain: f64) -> bool {
        let now = self.now.as_ref().map_or(f64::INFINITY, |p| p.step_s);
        self.split != *current && now >= self.best.step_s * gain
    }
}

/// The planner's best split for `workload` under `input`'s figures, beside
/// `current` under the same figures: what inference and training re-plans
/// weigh.
pub(crate) fn propose(
    input: &PlannerInput,
    info: &crate::profile::ModelInfo,
    workload: hearth_partitioner::Workload,
    current: &Split,
) -> Option<Proposal> {
    let best = hearth_partitioner::plan(&info.cost, &input.devices, &input.links, workload).ok()?;
    let split = best
        .stages
        .iter()
        .map(|s| {
            let node = input.node_ids.get(s.device)?;
            Some((node.clone(), s.layers.start, s.layers.end))
        })
        .collect::<Option<Split>>()?;
    Some(Proposal {
        split,
        now: evaluate_split(current, input, info, workload),
        best,
    })
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
    evaluate_split(&split_of(placement), &input, info, workload)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(start: usize, end: usize, embed: bool, head: bool) -> StageSpec {
        StageSpec {
            start,
            end,
            embed,
            head,
        }
    }

    /// Any split becomes U-shaped around the data's device: it runs the
    /// embedding first and the head last, and no other stage keeps either.
    #[test]
    fn u_shape_puts_both_ends_on_the_data_device() {
        let even = vec![(0, spec(0, 4, true, false)), (1, spec(4, 8, false, true))];
        // The data's device already runs the first stage.
        assert_eq!(
            u_shape(even.clone(), 0, 8),
            vec![
                (0, spec(0, 4, true, false)),
                (1, spec(4, 8, false, false)),
                (0, spec(8, 8, false, true)),
            ]
        );
        // It runs the last one.
        assert_eq!(
            u_shape(even.clone(), 1, 8),
            vec![
                (1, spec(0, 0, true, false)),
                (0, spec(0, 4, false, false)),
                (1, spec(4, 8, false, true)),
            ]
        );
        // Neither: it gets both ends, the layers stay where they were.
        assert_eq!(
            u_shape(even, 2, 8),
            vec![
                (2, spec(0, 0, true, false)),
                (0, spec(0, 4, false, false)),
                (1, spec(4, 8, false, false)),
                (2, spec(8, 8, false, true)),
            ]
        );
        // Alone it runs the whole model as one stage.
        assert_eq!(
            u_shape(vec![(0, StageSpec::full(8))], 0, 8),
            vec![(0, StageSpec::full(8))]
        );
    }

    fn placement(replicas: serde_json::Value) -> Placement {
        serde_json::from_value(serde_json::json!({
            "id": 5, "model": "m", "fingerprint": "f", "content": null,
            "members": ["a", "b", "c"],
            "stages": [
                {"node_id": "a", "name": "a", "spec": {"start": 0, "end": 3, "embed": true, "head": false}},
                {"node_id": "b", "name": "b", "spec": {"start": 3, "end": 8, "embed": false, "head": true}}
            ],
            "replicas": replicas,
        }))
        .unwrap_or_else(|e| panic!("test placement: {e}"))
    }

    #[test]
    fn a_replica_runs_the_whole_model_as_a_pipeline_of_its_own() {
        let p = placement(
            serde_json::json!([{"node_id": "c", "name": "c", "predicted_tokens_per_s": 4.0}]),
        );
        assert_eq!(p.validate(), Ok(()));
        let (own, i) = p.pipeline_for("c").expect("c has a stage");
        assert_eq!(i, 0);
        assert_eq!(own.id, p.id);
        assert_eq!(own.stages.len(), 1);
        assert_eq!(own.stages[0].spec, StageSpec::full(8));
        assert!(own.replicas.is_empty());
        assert_eq!(own.validate(), Ok(()));
        // Pipeline members keep the placement as it is.
        assert_eq!(p.pipeline_for("b"), Some((p.clone(), 1)));
        assert_eq!(p.pipeline_for("d"), None);
        // Older documents without replicas still read.
        let old: Placement = serde_json::from_str(
            &serde_json::to_string(&placement(serde_json::json!([]))).unwrap_or_default(),
        )
        .expect("old placement");
        assert!(old.replicas.is_empty());
    }

    #[test]
    fn hostile_replica_lists_are_refused() {
        for bad in [
            // A pipeline member also as a replica: two stages on one node.
            serde_json::json!([{"node_id": "a", "name": "a"}]),
            // The same replica twice.
            serde_json::json!([{"node_id": "c", "name": "c"}, {"node_id": "c", "name": "c"}]),
            // Nonsense predictions.
            serde_json::json!([{"node_id": "c", "name": "c", "predicted_tokens_per_s": -1.0}]),
            // Oversized names.
            serde_json::json!([{"node_id": "c", "name": "x".repeat(MAX_REASON + 1)}]),
        ] {
            assert!(placement(bad.clone()).validate().is_err(), "{bad}");
        }
        let many: Vec<serde_json::Value> = (0..=MAX_FIGURES)
            .map(|i| serde_json::json!({"node_id": format!("r{i}"), "name": "r"}))
            .collect();
        assert!(placement(serde_json::Value::from(many)).validate().is_err());
    }
}
