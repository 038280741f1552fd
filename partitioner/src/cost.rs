//! The cost model: compute, transfer and memory of a stage, and the
//! evaluation of a whole assignment. Shared by the search and baselines.

use std::ops::Range;

use crate::{
    BottleneckKind, DeviceProfile, Links, Method, ModelProfile, PhaseTimes, Plan, PlanError,
    Schedule, Stage, Workload,
};

/// Most devices one plan considers (the search is exponential in it).
pub const MAX_DEVICES: usize = 12;

/// Validated inputs with prefix sums.
pub(crate) struct Ctx<'a> {
    pub model: &'a ModelProfile,
    pub devices: &'a [DeviceProfile],
    pub links: &'a Links,
    pub workload: Workload,
    /// Prefix sums over layers.
    scale: Vec<f64>,
    params: Vec<u64>,
    kv: Vec<u64>,
    train_act: Vec<u64>,
}

fn check(what: impl Into<String>, v: f64) -> Result<(), PlanError> {
    if v.is_finite() && v >= 0.0 {
        Ok(())
    } else {
        Err(PlanError::BadMeasurement {
            what: what.into(),
            value: v,
        })
    }
}

fn prefix(xs: impl Iterator<Item = u64>) -> Vec<u64> {
    let mut out = vec![0u64];
    for x in xs {
        let last = out.last().copied().unwrap_or(0);
        out.push(last.saturating_add(x));
    }
    out
}

impl<'a> Ctx<'a> {
    pub fn new(
        model: &'a ModelProfile,
        devices: &'a [DeviceProfile],
        links: &'a Links,
        workload: Workload,
    ) -> Result<Self, PlanError> {
        if model.layers.is_empty() {
            return Err(PlanError::NoLayers);
        }
        if devices.is_empty() {
            return Err(PlanError::NoDevices);
        }
        if devices.len() > MAX_DEVICES {
            return Err(PlanError::BadWorkload(format!(
                "{} devices; at most {MAX_DEVICES} are planned at once",
                devices.len()
            )));
        }
        let n = devices.len();
        for (name, m) in [("bandwidth", &links.bandwidth), ("rtt", &links.rtt)] {
            if m.len() != n || m.iter().any(|r| r.len() != n) {
                return Err(PlanError::LinkShape {
                    rows: m.len(),
                    cols: m.first().map_or(0, Vec::len),
                    devices: n,
                });
            }
            for (a, row) in m.iter().enumerate() {
                for (b, &v) in row.iter().enumerate() {
                    if a == b {
                        continue;
                    }
                    check(format!("{name}[{a}][{b}]"), v)?;
                    if name == "bandwidth" && v == 0.0 {
                        return Err(PlanError::BadMeasurement {
                            what: format!("{name}[{a}][{b}]"),
                            value: v,
                        });
                    }
                }
            }
        }
        for d in devices {
            for (part, t) in [("layer", d.layer), ("embed", d.embed), ("head", d.head)] {
                check(format!("{} {part} decode", d.name), t.decode_s)?;
                check(format!("{} {part} prefill", d.name), t.prefill_s_per_token)?;
                check(format!("{} {part} train", d.name), t.train_s_per_token)?;
                check(
                    format!("{} {part} train forward", d.name),
                    t.train_forward_s_per_token,
                )?;
            }
        }
        match workload {
            Workload::Decode { sequences: 0, .. } => {
                return Err(PlanError::BadWorkload(
                    "decode needs at least one sequence".into(),
                ));
            }
            Workload::Prefill { tokens: 0 } => {
                return Err(PlanError::BadWorkload(
                    "prefill needs at least one token".into(),
                ));
            }
            Workload::Train {
                micro_batch_tokens: 0,
                ..
            }
            | Workload::Train {
                micro_batches: 0, ..
            } => {
                return Err(PlanError::BadWorkload(
                    "training needs micro-batches of at least one token".into(),
                ));
            }
            Workload::Train { home: Some(h), .. } if h >= devices.len() => {
                return Err(PlanError::BadWorkload(format!(
                    "the data's device {h} does not exist"
                )));
            }
            _ => {}
        }
        let flops: Vec<f64> = model.layers.iter().map(|l| l.flops_per_token).collect();
        let mean = flops.iter().sum::<f64>() / flops.len() as f64;
        let mut scale = vec![0.0];
        for f in &flops {
            check("layer flops", *f)?;
            let s = if mean > 0.0 { f / mean } else { 1.0 };
            let last = scale.last().copied().unwrap_or(0.0);
            scale.push(last + s);
        }
        Ok(Self {
            model,
            devices,
            links,
            workload,
            scale,
            params: prefix(model.layers.iter().map(|l| l.param_bytes)),
            kv: prefix(model.layers.iter().map(|l| l.kv_bytes_per_token)),
            train_act: prefix(model.layers.iter().map(|l| l.train_act_bytes_per_token)),
        })
    }

    pub fn layers(&self) -> usize {
        self.model.layers.len()
    }

    /// Seconds of `t` for one micro-batch of the workload.
    fn phase(&self, t: PhaseTimes) -> f64 {
        match self.workload {
            Workload::Decode { .. } => t.decode_s,
            Workload::Prefill { tokens } => t.prefill_s_per_token * f64::from(tokens),
            Workload::Train {
                micro_batch_tokens,
                recompute,
                method,
                ..
            } => {
                let fwd = if t.train_forward_s_per_token > 0.0 {
                    t.train_forward_s_per_token
                } else {
                    t.train_s_per_token / 3.0
                };
                let mut per_token = t.train_s_per_token;
                // Recomputation runs the forward a second time.
                if recompute {
                    per_token += fwd;
                }
                // Weight gradients: one more matrix product per weight,
                // as many FLOPs as the forward.
                if method == Method::Full {
                    per_token += fwd;
                }
                per_token * f64::from(micro_batch_tokens)
            }
        }
    }

    /// One average decoder layer on device `d`, without embedding or head.
    pub fn one_layer(&self, d: usize) -> f64 {
        self.phase(self.devices[d].layer)
    }

    /// The device that holds the data in a U-shaped training plan.
    pub fn home(&self) -> Option<usize> {
        match self.workload {
            Workload::Train { home, .. } => home,
            _ => None,
        }
    }

    /// `t_k` of layers `r` on device `d` (with embed/head when at the
    /// ends). In a U-shaped plan the head runs on the data's device, whose
    /// first stage this is: its time is the device's, both stages'.
    pub fn compute(&self, d: usize, r: &Range<usize>) -> f64 {
        let dev = &self.devices[d];
        let mut t = self.phase(dev.layer) * (self.scale[r.end] - self.scale[r.start]);
        if r.start == 0 {
            t += self.phase(dev.embed);
        }
        let head = match self.home() {
            Some(h) => r.start == 0 && d == h,
            None => r.end == self.layers(),
        };
        if head {
            t += self.head_compute(d);
        }
        t
    }

    /// The final norm, LM head and loss on device `d`, per micro-batch.
    fn head_compute(&self, d: usize) -> f64 {
        self.phase(self.devices[d].head)
    }

    /// Bytes the head adds to the device that runs it (weights, and their
    /// gradient and moments under full fine-tuning), when it is a stage of
    /// its own: a tied head is a copy of the embedding.
    fn head_bytes(&self) -> u64 {
        let m = self.model;
        let w = if m.tied_embeddings {
            m.embed.param_bytes
        } else {
            m.head.param_bytes
        };
        match self.workload {
            Workload::Train {
                method: Method::Full,
                ..
            } => w.saturating_mul(4),
            _ => w,
        }
    }

    fn tokens_per_micro_batch(&self) -> u64 {
        match self.workload {
            Workload::Decode { .. } => 1,
            Workload::Prefill { tokens } => u64::from(tokens),
            Workload::Train {
                micro_batch_tokens, ..
            } => u64::from(micro_batch_tokens),
        }
    }

    /// `c` of the boundary before layer `at`, from device `a` to `b`.
    pub fn transfer(&self, a: usize, b: usize, at: usize) -> f64 {
        if a == b {
            return 0.0;
        }
        let act = self.model.layers[at.saturating_sub(1)].act_bytes_per_token;
        // In f64: huge workloads must not overflow.
        let mut bytes = act as f64 * self.tokens_per_micro_batch() as f64;
        if matches!(self.workload, Workload::Train { .. }) {
            bytes *= 2.0; // activations forward, gradients backward
        }
        self.links.rtt[a][b] / 2.0 + bytes / self.links.bandwidth[a][b]
    }

    /// The decode loop's return (the sampled token, last stage to first),
    /// or a U-shaped plan's (the last layer's activations forward and
    /// their gradients back, to and from the data's device).
    pub fn loop_back(&self, last: usize, first: usize) -> f64 {
        match self.workload {
            Workload::Decode { .. } if last != first => self.links.rtt[last][first] / 2.0,
            Workload::Train {
                home: Some(_),
                micro_batch_tokens,
                ..
            } if last != first => {
                let act = self.model.layers[self.layers() - 1].act_bytes_per_token as f64;
                let bytes = 2.0 * act * f64::from(micro_batch_tokens);
                self.links.rtt[last][first] / 2.0 + bytes / self.links.bandwidth[last][first]
            }
            _ => 0.0,
        }
    }

    /// Peak bytes on the device running layers `r` as stage `k` of `p`
    /// (saturating: a workload too large to count does not fit anywhere).
    pub fn memory(&self, r: &Range<usize>, k: usize, p: usize) -> u64 {
        let m = self.model;
        let mut weights = self.params[r.end] - self.params[r.start];
        let first = r.start == 0;
        let last = r.end == self.layers();
        if first {
            weights += m.embed.param_bytes;
        }
        // The head: on the last stage, or in a U-shaped plan on the data's
        // device (its first stage's), a copy of a tied embedding unless the
        // device runs the whole model as one stage.
        let head = match self.home() {
            Some(_) => first,
            None => last,
        };
        if head && !(m.tied_embeddings && first && last) {
            weights += if m.tied_embeddings {
                m.embed.param_bytes
            } else {
                m.head.param_bytes
            };
        }
        let kv = self.kv[r.end] - self.kv[r.start];
        let act_in = m.layers[r.start.saturating_sub(1)].act_bytes_per_token;
        match self.workload {
            Workload::Decode { sequences, context } => {
                let cache = kv
                    .saturating_mul(u64::from(context))
                    .saturating_mul(u64::from(sequences));
                weights.saturating_add(cache)
            }
            Workload::Prefill { tokens } => {
                weights.saturating_add((kv + act_in).saturating_mul(u64::from(tokens)))
            }
            Workload::Train {
                micro_batch_tokens,
                micro_batches,
                schedule,
                recompute,
                method,
                ..
            } => {
                let tokens = u64::from(micro_batch_tokens);
                let layers = (r.end - r.start) as u64;
                let optimizer = match method {
                    Method::Full => weights.saturating_mul(3),
                    Method::Lora {
                        adapter_bytes_per_layer,
                    } => adapter_bytes_per_layer.saturating_mul(4 * layers),
                };
                // A U-shaped plan runs one more stage (the head, last).
                let u_shaped = self.home().is_some() && !(first && last);
                let p = if u_shaped { p + 1 } else { p };
                let in_flight = match schedule {
                    Schedule::OneFOneB => u64::from(micro_batches).min((p - k) as u64),
                    Schedule::GPipe => u64::from(micro_batches),
                };
                // The data's device also stashes its head stage's inputs
                // (the last layer's activations): 1F1B's last stage holds
                // one micro-batch, GPipe's all.
                let head_stash = if u_shaped && first {
                    let held = match schedule {
                        Schedule::OneFOneB => 1,
                        Schedule::GPipe => u64::from(micro_batches),
                    };
                    held.saturating_mul(m.layers[self.layers() - 1].act_bytes_per_token)
                        .saturating_mul(tokens)
                } else {
                    0
                };
                let full = (self.train_act[r.end] - self.train_act[r.start]).saturating_mul(tokens);
                let acts = if recompute {
                    in_flight
                        .saturating_mul(act_in)
                        .saturating_mul(tokens)
                        .saturating_add(full)
                } else {
                    in_flight.saturating_mul(full)
                };
                weights
                    .saturating_add(optimizer)
                    .saturating_add(acts)
                    .saturating_add(head_stash)
            }
        }
    }

    /// Tokens one step produces or consumes.
    fn step_tokens(&self) -> f64 {
        match self.workload {
            Workload::Decode { sequences, .. } => f64::from(sequences),
            Workload::Prefill { tokens } => f64::from(tokens),
            Workload::Train {
                micro_batch_tokens,
                micro_batches,
                ..
            } => f64::from(micro_batch_tokens) * f64::from(micro_batches),
        }
    }

    /// The full plan of an assignment, or why it is infeasible. A U-shaped
    /// plan's assignment may end with its head-only stage (the data's
    /// device, layers `l..l`) or leave it out.
    pub fn evaluate(&self, assignment: &[(usize, Range<usize>)]) -> Result<Plan, PlanError> {
        let l = self.layers();
        let bad = |s: String| Err(PlanError::BadAssignment(s));
        let home = self.home();
        let assignment = match (home, assignment) {
            (Some(h), [rest @ .., (d, r)]) if !rest.is_empty() && *d == h && *r == (l..l) => rest,
            _ => assignment,
        };
        if assignment.is_empty() {
            return bad("no stages".into());
        }
        if let Some(h) = home
            && assignment[0].0 != h
        {
            return bad(format!(
                "the data's device {h} must run the first stage (it runs device {})",
                assignment[0].0
            ));
        }
        let mut next = 0;
        let mut seen = vec![false; self.devices.len()];
        for (d, r) in assignment {
            if *d >= self.devices.len() {
                return bad(format!("device {d} does not exist"));
            }
            if std::mem::replace(&mut seen[*d], true) {
                return bad(format!("device {d} appears twice"));
            }
            if r.start != next || r.end <= r.start {
                return bad(format!("layers {r:?} do not continue at {next}"));
            }
            next = r.end;
        }
        if next != l {
            return bad(format!("layers end at {next}, the model has {l}"));
        }
        let p = assignment.len();
        let mut stages = Vec::with_capacity(p);
        for (k, (d, r)) in assignment.iter().enumerate() {
            let dev = &self.devices[*d];
            let memory_bytes = self.memory(r, k, p);
            if memory_bytes > dev.memory_budget {
                return Err(PlanError::DoesNotFit(format!(
                    "{} needs {} for layers {}..{} but has {}",
                    dev.name,
                    human_bytes(memory_bytes),
                    r.start,
                    r.end,
                    human_bytes(dev.memory_budget)
                )));
            }
            let transfer_s = match assignment.get(k + 1) {
                Some((e, nr)) => self.transfer(*d, *e, nr.start),
                None => self.loop_back(*d, assignment[0].0),
            };
            stages.push(Stage {
                device: *d,
                device_name: dev.name.clone(),
                layers: r.clone(),
                embed: r.start == 0,
                head: r.end == l && !(home.is_some() && p > 1),
                compute_s: self.compute(*d, r),
                transfer_s,
                memory_bytes,
            });
        }
        // A U-shaped plan: the head-only last stage on the data's device,
        // whose first stage's figures so far held the head's.
        let u_shaped = home.is_some() && p > 1;
        if u_shaped {
            let head_s = self.head_compute(stages[0].device);
            let head_bytes = self.head_bytes();
            let front = &mut stages[0];
            let (device, device_name) = (front.device, front.device_name.clone());
            front.compute_s = (front.compute_s - head_s).max(0.0);
            front.memory_bytes = front.memory_bytes.saturating_sub(head_bytes);
            stages.push(Stage {
                device,
                device_name,
                layers: l..l,
                embed: false,
                head: true,
                compute_s: head_s,
                transfer_s: 0.0,
                memory_bytes: head_bytes,
            });
        }
        let m = f64::from(self.workload.in_flight());
        let sum: f64 = stages.iter().map(|s| s.compute_s + s.transfer_s).sum();
        let mut bottleneck = (0, BottleneckKind::Compute);
        let mut worst = f64::NEG_INFINITY;
        for (k, s) in stages.iter().enumerate() {
            // The data's device runs both ends of a U: its time is theirs.
            let compute_s = if u_shaped && s.device == stages[0].device {
                if k + 1 == stages.len() {
                    continue;
                }
                s.compute_s + stages[stages.len() - 1].compute_s
            } else {
                s.compute_s
            };
            for (v, kind) in [
                (compute_s, BottleneckKind::Compute),
                (s.transfer_s, BottleneckKind::Transfer),
            ] {
                if v > worst {
                    worst = v;
                    bottleneck = (k, kind);
                }
            }
        }
        let step_s = sum + (m - 1.0) * worst;
        let tokens_per_s = if step_s > 0.0 {
            self.step_tokens() / step_s
        } else {
            f64::INFINITY
        };
        Ok(Plan {
            stages,
            step_s,
            bottleneck,
            tokens_per_s,
            explanation: Vec::new(),
        })
    }
}

/// Bytes for people.
pub fn human_bytes(b: u64) -> String {
    let b = b as f64;
    if b >= 1e9 {
        format!("{:.1} GB", b / 1e9)
    } else if b >= 1e6 {
        format!("{:.0} MB", b / 1e6)
    } else {
        format!("{:.0} kB", b / 1e3)
    }
}

/// Evaluates a given assignment (device index, layer range) under the cost
/// model, for baselines and for checking a plan from elsewhere.
pub fn evaluate(
    model: &ModelProfile,
    devices: &[DeviceProfile],
    links: &Links,
    workload: Workload,
    assignment: &[(usize, Range<usize>)],
) -> Result<Plan, PlanError> {
    let ctx = Ctx::new(model, devices, links, workload)?;
    let mut plan = ctx.evaluate(assignment)?;
    plan.explanation = crate::search::explain(&ctx, &plan);
    Ok(plan)
}
