//! The splits other tools use, evaluated under the same cost model so the
//! planner's advantage is measured, not assumed: an even split, exo's
//! memory-proportional split, and a FLOPS-proportional split (cake, with
//! measured rather than guessed speed). All use every device, in the given
//! order.

use crate::cost::Ctx;
use crate::{DeviceProfile, Links, ModelProfile, Plan, PlanError, Workload};

/// Which baseline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Baseline {
    Even,
    MemoryProportional,
    FlopsProportional,
}

/// The baseline's plan, or why it does not fit.
pub fn baseline(
    kind: Baseline,
    model: &ModelProfile,
    devices: &[DeviceProfile],
    links: &Links,
    workload: Workload,
) -> Result<Plan, PlanError> {
    let ctx = Ctx::new(model, devices, links, workload)?;
    let l = ctx.layers();
    let n = devices.len().min(l);
    let weights: Vec<f64> = devices[..n]
        .iter()
        .map(|d| match kind {
            Baseline::Even => 1.0,
            Baseline::MemoryProportional => d.memory_budget as f64,
            Baseline::FlopsProportional => {
                let t = d.layer.decode_s.max(d.layer.prefill_s_per_token).max(1e-12);
                1.0 / t
            }
        })
        .collect();
    let counts = apportion(l, &weights);
    let mut a = Vec::new();
    let mut start = 0;
    for (d, c) in counts.into_iter().enumerate() {
        if c > 0 {
            a.push((d, start..start + c));
            start += c;
        }
    }
    let mut plan = ctx.evaluate(&a)?;
    plan.explanation = crate::search::explain(&ctx, &plan);
    Ok(plan)
}

/// Splits `total` layers in proportion to `weights` (largest remainders),
/// each device at least one layer while layers last.
fn apportion(total: usize, weights: &[f64]) -> Vec<usize> {
    let n = weights.len();
    let sum: f64 = weights.iter().sum();
    let spare = total.saturating_sub(n);
    let exact: Vec<f64> = weights
        .iter()
        .map(|w| {
            if sum > 0.0 {
                w / sum * spare as f64
            } else {
                spare as f64 / n as f64
            }
        })
        .collect();
    let mut counts: Vec<usize> = exact.iter().map(|e| e.floor() as usize).collect();
    let mut left = spare - counts.iter().sum::<usize>();
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&a, &b| (exact[b] - exact[b].floor()).total_cmp(&(exact[a] - exact[a].floor())));
    for i in order {
        if left == 0 {
            break;
        }
        counts[i] += 1;
        left -= 1;
    }
    counts.iter().map(|c| c + usize::from(total >= n)).collect()
}

#[cfg(test)]
mod tests {
    use super::apportion;

    #[test]
    fn apportion_sums_and_is_proportional() {
        assert_eq!(apportion(30, &[1.0, 1.0, 1.0]), vec![10, 10, 10]);
        assert_eq!(apportion(30, &[2.0, 1.0]).iter().sum::<usize>(), 30);
        assert_eq!(apportion(10, &[3.0, 1.0]), vec![7, 3]);
        assert_eq!(apportion(3, &[100.0, 1.0, 1.0]), vec![1, 1, 1]);
    }
}
