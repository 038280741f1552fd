//! The exact search: for each stage count p (and, for a decode loop, each
//! first device), a dynamic program over (layers assigned, devices used,
//! last device) minimises Σ(t_k + c_k) with every t_k, c_k under a bound B;
//! B runs over the candidate stage/transfer times in ascending order and
//! stops once Σ_min + (m − 1)·B cannot beat the best plan found.

use std::ops::Range;

use crate::cost::{Ctx, human_bytes};
use crate::{BottleneckKind, DeviceProfile, Links, ModelProfile, Plan, PlanError, Workload};

/// Stages as (device index, layer range).
type Assignment = Vec<(usize, Range<usize>)>;

/// The plan with the lowest predicted step time.
pub fn plan(
    model: &ModelProfile,
    devices: &[DeviceProfile],
    links: &Links,
    workload: Workload,
) -> Result<Plan, PlanError> {
    let ctx = Ctx::new(model, devices, links, workload)?;
    let mut best: Option<Plan> = None;
    let m = f64::from(workload.in_flight());
    let candidates = if m > 1.0 {
        candidate_bounds(&ctx)
    } else {
        Vec::new()
    };
    let decode_loop = matches!(workload, Workload::Decode { .. });
    // Memory depends on the stage count only under 1F1B; otherwise one DP
    // covers every stage count at once.
    let per_p = matches!(
        workload,
        Workload::Train {
            schedule: crate::Schedule::OneFOneB,
            ..
        }
    );
    let max_p = devices.len().min(ctx.layers());
    let counts: Vec<Option<usize>> = if per_p {
        (1..=max_p).map(Some).collect()
    } else {
        vec![None]
    };
    for p in counts {
        let firsts: Vec<Option<usize>> = if let Some(h) = ctx.home() {
            // A U-shaped plan starts (and ends) on the data's device.
            vec![Some(h)]
        } else if decode_loop && p != Some(1) {
            (0..devices.len()).map(Some).collect()
        } else {
            vec![None]
        };
        for first in firsts {
            let Some((sum_min, a)) = dp(&ctx, p, first, f64::INFINITY) else {
                continue;
            };
            consider(&ctx, &mut best, &a)?;
            if candidates.is_empty() {
                continue;
            }
            // The smallest feasible bound (feasibility grows with it).
            let (mut lo, mut hi) = (0, candidates.len() - 1);
            if dp(&ctx, p, first, candidates[hi]).is_none() {
                continue;
            }
            while lo < hi {
                let mid = (lo + hi) / 2;
                if dp(&ctx, p, first, candidates[mid]).is_some() {
                    hi = mid;
                } else {
                    lo = mid + 1;
                }
            }
            for &b in &candidates[lo..] {
                let best_t = best.as_ref().map_or(f64::INFINITY, |p| p.step_s);
                if sum_min + (m - 1.0) * b >= best_t {
                    break;
                }
                if let Some((_, a)) = dp(&ctx, p, first, b) {
                    consider(&ctx, &mut best, &a)?;
                }
            }
        }
    }
    let mut plan = best.ok_or_else(|| does_not_fit(&ctx))?;
    plan.explanation = explain(&ctx, &plan);
    Ok(plan)
}

fn does_not_fit(ctx: &Ctx<'_>) -> PlanError {
    let total: u64 = ctx.devices.iter().map(|d| d.memory_budget).sum();
    let need = ctx.memory(&(0..ctx.layers()), 0, 1);
    let short = if need > total {
        format!(", {} short", human_bytes(need - total))
    } else {
        // Enough in sum, but no device order and split fits each device.
        ", but no split fits each device's share".to_string()
    };
    PlanError::DoesNotFit(format!(
        "no assignment fits the devices' memory (the whole model needs about {}; the devices offer {} together{short})",
        human_bytes(need),
        human_bytes(total)
    ))
}

/// Keeps the better plan; ties go to fewer stages, then the smaller
/// assignment, so the result is deterministic.
fn consider(
    ctx: &Ctx<'_>,
    best: &mut Option<Plan>,
    a: &[(usize, Range<usize>)],
) -> Result<(), PlanError> {
    let plan = ctx.evaluate(a)?;
    let better = match best {
        None => true,
        Some(b) => {
            let eps = 1e-12 * b.step_s.abs().max(1e-30);
            plan.step_s < b.step_s - eps
                || ((plan.step_s - b.step_s).abs() <= eps && key(&plan) < key(b))
        }
    };
    if better {
        *best = Some(plan);
    }
    Ok(())
}

fn key(p: &Plan) -> (usize, Vec<(usize, usize)>) {
    (
        p.stages.len(),
        p.stages.iter().map(|s| (s.device, s.layers.end)).collect(),
    )
}

/// Every stage or transfer time that could be the bottleneck, ascending.
fn candidate_bounds(ctx: &Ctx<'_>) -> Vec<f64> {
    let (l, n) = (ctx.layers(), ctx.devices.len());
    let mut v = Vec::new();
    for d in 0..n {
        for i in 0..l {
            for j in i + 1..=l {
                v.push(ctx.compute(d, &(i..j)));
            }
        }
        for e in 0..n {
            if d != e {
                for i in 1..l {
                    v.push(ctx.transfer(d, e, i));
                }
                v.push(ctx.loop_back(d, e));
            }
        }
    }
    v.sort_by(f64::total_cmp);
    v.dedup_by(|a, b| (*a - *b).abs() <= 1e-15 * b.abs().max(1e-30));
    v
}

/// Min Σ(t + c) over assignments into exactly `p` stages with every t, c
/// ≤ `bound`, starting on `first` if given. Returns the sum and assignment.
fn dp(
    ctx: &Ctx<'_>,
    p: Option<usize>,
    first: Option<usize>,
    bound: f64,
) -> Option<(f64, Assignment)> {
    let (l, n) = (ctx.layers(), ctx.devices.len());
    // Stages at most; with `p` given, exactly that many.
    let stages = p.unwrap_or(n.min(l));
    let exact = p.is_some();
    let masks = 1usize << n;
    let idx = |i: usize, s: usize, d: usize| (i * masks + s) * n + d;
    let mut cost = vec![f64::INFINITY; (l + 1) * masks * n];
    let mut parent = vec![(usize::MAX, usize::MAX); (l + 1) * masks * n];
    let fits = |d: usize, r: &Range<usize>, k: usize| {
        ctx.memory(r, k, stages) <= ctx.devices[d].memory_budget
    };
    // Layers that must remain after stage k ends (for the later stages).
    let reserve = |k: usize| if exact { stages - k - 1 } else { 0 };
    // Stage 0.
    for d in 0..n {
        if first.is_some_and(|f| f != d) {
            continue;
        }
        for j in 1..=l - reserve(0) {
            if exact && stages == 1 && j != l {
                continue;
            }
            let r = 0..j;
            if !fits(d, &r, 0) {
                // Memory grows with j, but for a U-shaped plan's data
                // device: alone (0..l) it needs no second copy of a tied
                // head.
                if ctx.home().is_some() && j < l {
                    continue;
                }
                break;
            }
            let t = ctx.compute(d, &r);
            if t <= bound {
                cost[idx(j, 1 << d, d)] = t;
            }
        }
    }
    // Stages 1.., in order of devices used.
    for k in 1..stages {
        for s in 0..masks {
            if s.count_ones() as usize != k {
                continue;
            }
            // A state at i == l is complete; only earlier ones go on.
            for i in k..=(l - reserve(k - 1)).min(l - 1) {
                for d in 0..n {
                    let here = cost[idx(i, s, d)];
                    if !here.is_finite() {
                        continue;
                    }
                    for e in 0..n {
                        if s & (1 << e) != 0 {
                            continue;
                        }
                        let c = ctx.transfer(d, e, i);
                        if c > bound {
                            continue;
                        }
                        let last = exact && k + 1 == stages;
                        for j in i + 1..=l - reserve(k) {
                            if last && j != l {
                                continue;
                            }
                            let r = i..j;
                            if !fits(e, &r, k) {
                                break;
                            }
                            let t = ctx.compute(e, &r);
                            if t > bound {
                                continue;
                            }
                            let v = here + c + t;
                            let at = idx(j, s | (1 << e), e);
                            if v < cost[at] {
                                cost[at] = v;
                                parent[at] = (i, d);
                            }
                        }
                    }
                }
            }
        }
    }
    // Best final state (with the decode loop's return, if any).
    let mut best: Option<(f64, usize, usize)> = None;
    for s in 1..masks {
        let used = s.count_ones() as usize;
        if exact && used != stages {
            continue;
        }
        for d in 0..n {
            let v = cost[idx(l, s, d)];
            if !v.is_finite() {
                continue;
            }
            let back = if used > 1 {
                first.map_or(0.0, |f| ctx.loop_back(d, f))
            } else {
                0.0
            };
            if back > bound {
                continue;
            }
            let total = v + back;
            if best.is_none_or(|(b, _, _)| total < b) {
                best = Some((total, s, d));
            }
        }
    }
    let (total, mut s, mut d) = best?;
    let mut i = l;
    let mut out = Vec::new();
    loop {
        let (pi, pd) = parent[idx(i, s, d)];
        if pi == usize::MAX {
            out.push((d, 0..i));
            break;
        }
        out.push((d, pi..i));
        s &= !(1 << d);
        i = pi;
        d = pd;
    }
    out.reverse();
    Some((total, out))
}

/// Exhaustive search over every ordered subset of devices and every split
/// of the layers: the reference the dynamic program is tested against
/// (exponential; small instances only).
pub fn plan_exhaustive(
    model: &ModelProfile,
    devices: &[DeviceProfile],
    links: &Links,
    workload: Workload,
) -> Result<Plan, PlanError> {
    let ctx = Ctx::new(model, devices, links, workload)?;
    let l = ctx.layers();
    let mut best: Option<Plan> = None;
    fn orders(n: usize, cur: &mut Vec<usize>, out: &mut Vec<Vec<usize>>) {
        if !cur.is_empty() {
            out.push(cur.clone());
        }
        for d in 0..n {
            if !cur.contains(&d) {
                cur.push(d);
                orders(n, cur, out);
                cur.pop();
            }
        }
    }
    let mut all = Vec::new();
    orders(devices.len(), &mut Vec::new(), &mut all);
    for order in all {
        let p = order.len();
        if p > l || ctx.home().is_some_and(|h| order[0] != h) {
            continue;
        }
        // Every choice of p − 1 cut points among 1..l.
        let mut cuts: Vec<usize> = (1..p).collect();
        loop {
            let mut a = Vec::with_capacity(p);
            let mut start = 0;
            for (k, &d) in order.iter().enumerate() {
                let end = if k + 1 == p { l } else { cuts[k] };
                a.push((d, start..end));
                start = end;
            }
            if let Ok(plan) = ctx.evaluate(&a) {
                let better = best
                    .as_ref()
                    .is_none_or(|b| plan.step_s < b.step_s * (1.0 - 1e-9));
                if better {
                    best = Some(plan);
                }
            }
            // Next combination.
            let Some(pos) = (0..cuts.len())
                .rev()
                .find(|&q| cuts[q] < l - (cuts.len() - q))
            else {
                break;
            };
            cuts[pos] += 1;
            for q in pos + 1..cuts.len() {
                cuts[q] = cuts[q - 1] + 1;
            }
        }
    }
    best.ok_or_else(|| does_not_fit(&ctx))
}

/// A short human-readable account of the plan.
pub(crate) fn explain(ctx: &Ctx<'_>, plan: &Plan) -> Vec<String> {
    let mut out = Vec::new();
    let total: f64 = plan.stages.iter().map(|s| s.compute_s).sum();
    for (k, s) in plan.stages.iter().enumerate() {
        let dev = &ctx.devices[s.device];
        let mut parts = format!("layers {}..{}", s.layers.start, s.layers.end);
        if s.embed {
            parts.push_str(" + embedding");
        }
        if s.head {
            parts.push_str(" + head");
        }
        let share = if total > 0.0 {
            100.0 * s.compute_s / total
        } else {
            0.0
        };
        let mut line = format!(
            "stage {k}: {} runs {parts}: {:.2} ms compute ({share:.0}% of the pipeline's), {} of {} memory",
            dev.name,
            s.compute_s * 1e3,
            human_bytes(s.memory_bytes),
            human_bytes(dev.memory_budget),
        );
        if plan.stages.len() > 1 {
            line.push_str(&format!(", {:.2} ms to send on", s.transfer_s * 1e3));
        }
        out.push(line);
    }
    let (bk, kind) = plan.bottleneck;
    let what = match kind {
        BottleneckKind::Compute => "compute",
        BottleneckKind::Transfer => "its outgoing link",
    };
    out.push(format!(
        "bottleneck: stage {bk} ({}), {what}; predicted {:.1} tokens/s, {:.2} ms per step",
        plan.stages[bk].device_name,
        plan.tokens_per_s,
        plan.step_s * 1e3
    ));
    for (d, dev) in ctx.devices.iter().enumerate() {
        if plan.stages.iter().any(|s| s.device == d) {
            continue;
        }
        let one_layer_fits =
            (0..ctx.layers()).any(|i| ctx.memory(&(i..i + 1), 0, 1) <= dev.memory_budget);
        let reason = if !one_layer_fits {
            format!(
                "not enough memory for even one layer ({})",
                human_bytes(dev.memory_budget)
            )
        } else {
            format!(
                "adding it would not lower the step time (one layer: {:.2} ms here)",
                ctx.one_layer(d) * 1e3
            )
        };
        out.push(format!("{} left out: {reason}", dev.name));
    }
    out
}
