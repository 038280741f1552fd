//! Pipeline schedules for one optimizer step of `m` micro-batches over `p`
//! stages, and a simulator that checks a schedule without any network.
//!
//! - GPipe: every forward, then every backward.
//! - 1F1B (PipeDream-Flush): stage `s` runs `min(p - s - 1, m)` warm-up
//!   forwards, then alternates one forward and one backward, then drains.
//!   It holds at most `min(m, p - s)` micro-batches' inputs at once.
//!
//! Micro-batches go forward and backward in increasing order on every
//! stage, so each link carries them in order and a stage can take the next
//! message of a kind without searching.

use serde::{Deserialize, Serialize};

/// One unit of work on a stage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Op {
    Forward(u32),
    Backward(u32),
}

/// Which schedule a job runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Schedule {
    #[default]
    #[serde(rename = "1f1b", alias = "one_f_one_b")]
    OneFOneB,
    Gpipe,
}

impl Schedule {
    /// The ops of `stage` (0-based) of `p` for `m` micro-batches.
    pub fn ops(self, p: usize, m: u32, stage: usize) -> Vec<Op> {
        match self {
            Self::Gpipe => (0..m)
                .map(Op::Forward)
                .chain((0..m).map(Op::Backward))
                .collect(),
            Self::OneFOneB => {
                let warmup = (p.saturating_sub(stage + 1) as u32).min(m);
                let mut ops: Vec<Op> = (0..warmup).map(Op::Forward).collect();
                let (mut f, mut b) = (warmup, 0);
                while f < m {
                    ops.push(Op::Forward(f));
                    f += 1;
                    ops.push(Op::Backward(b));
                    b += 1;
                }
                ops.extend((b..m).map(Op::Backward));
                ops
            }
        }
    }

    /// Most micro-batches whose input a stage holds at once (`None`: no bound).
    pub fn in_flight_bound(self, p: usize, m: u32, stage: usize) -> Option<u32> {
        match self {
            Self::Gpipe => None,
            Self::OneFOneB => Some(m.min((p - stage) as u32)),
        }
    }
}

/// What is wrong with a schedule.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScheduleError {
    #[error("stage {stage} runs {op:?} more than once")]
    Duplicate { stage: usize, op: Op },
    #[error("stage {stage} never runs {op:?}")]
    Missing { stage: usize, op: Op },
    #[error("stage {stage} runs {op:?} for a micro-batch outside 0..{m}")]
    OutOfRange { stage: usize, op: Op, m: u32 },
    #[error("deadlock: no stage can go on (next ops {waiting:?})")]
    Deadlock { waiting: Vec<Option<Op>> },
    #[error("stage {stage} holds {held} micro-batches, over its bound of {bound}")]
    InFlight { stage: usize, held: u32, bound: u32 },
    #[error("stage {stage} sends micro-batch {mb} out of order")]
    OutOfOrder { stage: usize, mb: u32 },
}

/// What a simulated step took, with forward = 1 and backward = `backward`
/// time units on every stage and free links.
#[derive(Debug, Clone, PartialEq)]
pub struct Simulation {
    /// Time of the whole step.
    pub makespan: f64,
    /// Idle share of all stages' time in the step.
    pub bubble: f64,
    /// Most micro-batches held at once, per stage.
    pub max_in_flight: Vec<u32>,
}

/// Runs `ops` (one list per stage) as the pipeline would: a forward needs
/// the previous stage's forward of the same micro-batch, a backward needs
/// this stage's forward and the next stage's backward. Rejects duplicates,
/// gaps, out-of-order sends, deadlock and exceeding `bound` per stage.
pub fn simulate(
    ops: &[Vec<Op>],
    m: u32,
    backward: f64,
    bound: impl Fn(usize) -> Option<u32>,
) -> Result<Simulation, ScheduleError> {
    let p = ops.len();
    // Completeness first: each stage runs each F and B exactly once, in order.
    for (s, list) in ops.iter().enumerate() {
        let mut seen = std::collections::HashSet::new();
        let (mut next_f, mut next_b) = (0, 0);
        for &op in list {
            let mb = match op {
                Op::Forward(mb) | Op::Backward(mb) => mb,
            };
            if mb >= m {
                return Err(ScheduleError::OutOfRange { stage: s, op, m });
            }
            if !seen.insert(op) {
                return Err(ScheduleError::Duplicate { stage: s, op });
            }
            let next = match op {
                Op::Forward(_) => &mut next_f,
                Op::Backward(_) => &mut next_b,
            };
            if mb != *next {
                return Err(ScheduleError::OutOfOrder { stage: s, mb });
            }
            *next += 1;
        }
        for mb in 0..m {
            for op in [Op::Forward(mb), Op::Backward(mb)] {
                if !seen.contains(&op) {
                    return Err(ScheduleError::Missing { stage: s, op });
                }
            }
        }
    }
    // Event simulation: finish times of each (stage, op).
    let mut f_done = vec![vec![None::<f64>; m as usize]; p];
    let mut b_done = vec![vec![None::<f64>; m as usize]; p];
    let mut pc = vec![0usize; p];
    let mut clock = vec![0f64; p];
    let mut busy = vec![0f64; p];
    let mut held = vec![0u32; p];
    let mut max_held = vec![0u32; p];
    loop {
        let mut progressed = false;
        for s in 0..p {
            let Some(&op) = ops[s].get(pc[s]) else {
                continue;
            };
            let ready = match op {
                Op::Forward(mb) => {
                    if s == 0 {
                        Some(0.0)
                    } else {
                        f_done[s - 1][mb as usize]
                    }
                }
                Op::Backward(mb) => {
                    let own = f_done[s][mb as usize];
                    let next = if s + 1 == p {
                        Some(0.0)
                    } else {
                        b_done[s + 1][mb as usize]
                    };
                    match (own, next) {
                        (Some(a), Some(b)) => Some(a.max(b)),
                        _ => None,
                    }
                }
            };
            let Some(ready) = ready else { continue };
            let (cost, slot) = match op {
                Op::Forward(mb) => (1.0, &mut f_done[s][mb as usize]),
                Op::Backward(mb) => (backward, &mut b_done[s][mb as usize]),
            };
            let start = clock[s].max(ready);
            clock[s] = start + cost;
            busy[s] += cost;
            *slot = Some(clock[s]);
            match op {
                Op::Forward(_) => {
                    held[s] += 1;
                    max_held[s] = max_held[s].max(held[s]);
                    if let Some(b) = bound(s)
                        && held[s] > b
                    {
                        return Err(ScheduleError::InFlight {
                            stage: s,
                            held: held[s],
                            bound: b,
                        });
                    }
                }
                Op::Backward(_) => held[s] -= 1,
            }
            pc[s] += 1;
            progressed = true;
        }
        if (0..p).all(|s| pc[s] == ops[s].len()) {
            break;
        }
        if !progressed {
            return Err(ScheduleError::Deadlock {
                waiting: (0..p).map(|s| ops[s].get(pc[s]).copied()).collect(),
            });
        }
    }
    let makespan = clock.iter().copied().fold(0.0, f64::max);
    let idle: f64 = busy.iter().map(|b| makespan - b).sum();
    Ok(Simulation {
        makespan,
        bubble: if makespan > 0.0 {
            idle / (makespan * p as f64)
        } else {
            0.0
        },
        max_in_flight: max_held,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all(s: Schedule, p: usize, m: u32) -> Vec<Vec<Op>> {
        (0..p).map(|i| s.ops(p, m, i)).collect()
    }

    /// (d) Both schedules complete for every p ≤ 4 and m ≤ 2p+1, within
    /// 1F1B's bound, with the textbook bubble (p−1)/(m+p−1).
    #[test]
    fn schedules_complete_within_bounds_with_the_textbook_bubble() {
        for p in 1..=4usize {
            for m in 1..=(2 * p as u32 + 1) {
                for s in [Schedule::Gpipe, Schedule::OneFOneB] {
                    let sim = simulate(&all(s, p, m), m, 2.0, |i| s.in_flight_bound(p, m, i))
                        .unwrap_or_else(|e| panic!("{s:?} p={p} m={m}: {e}"));
                    let textbook = (p as f64 - 1.0) / (m as f64 + p as f64 - 1.0);
                    assert!(
                        (sim.bubble - textbook).abs() < 1e-9,
                        "{s:?} p={p} m={m}: bubble {} vs {textbook}",
                        sim.bubble
                    );
                    if s == Schedule::OneFOneB {
                        for i in 0..p {
                            assert_eq!(sim.max_in_flight[i], m.min((p - i) as u32));
                        }
                    } else {
                        assert_eq!(sim.max_in_flight[0], m);
                    }
                }
            }
        }
    }

    #[test]
    fn simulator_rejects_broken_schedules() {
        let (p, m) = (3, 4);
        let good = all(Schedule::OneFOneB, p, m);
        let bound = |i: usize| Schedule::OneFOneB.in_flight_bound(p, m, i);
        // Missing.
        let mut bad = good.clone();
        bad[1].retain(|op| *op != Op::Backward(3));
        assert!(matches!(
            simulate(&bad, m, 2.0, bound),
            Err(ScheduleError::Missing { stage: 1, .. })
        ));
        // Duplicated.
        let mut bad = good.clone();
        bad[2].push(Op::Forward(1));
        assert!(matches!(
            simulate(&bad, m, 2.0, bound),
            Err(ScheduleError::Duplicate { stage: 2, .. })
        ));
        // Out of range.
        let mut bad = good.clone();
        bad[0].push(Op::Forward(9));
        assert!(matches!(
            simulate(&bad, m, 2.0, bound),
            Err(ScheduleError::OutOfRange { .. })
        ));
        // Deadlock: the first stage alternates strictly, so it waits for
        // backward 0 while stage 1 (1F1B) waits for forward 1 first.
        let alternating: Vec<Op> = (0..m)
            .flat_map(|i| [Op::Forward(i), Op::Backward(i)])
            .collect();
        let mut bad = good.clone();
        bad[0] = alternating.clone();
        assert!(matches!(
            simulate(&bad, m, 2.0, |_| None),
            Err(ScheduleError::Deadlock { .. })
        ));
        // Deadlock: a middle stage runs a backward before any forward.
        let mut bad = good.clone();
        bad[1] = alternating;
        bad[1].swap(0, 1);
        assert!(matches!(
            simulate(&bad, m, 2.0, |_| None),
            Err(ScheduleError::Deadlock { .. })
        ));
        // GPipe exceeds 1F1B's in-flight bound.
        assert!(matches!(
            simulate(&all(Schedule::Gpipe, p, m), m, 2.0, bound),
            Err(ScheduleError::InFlight { .. })
        ));
        // Out-of-order sends.
        let mut bad = good;
        bad[2].swap(0, 2);
        assert!(matches!(
            simulate(&bad, m, 2.0, |_| None),
            Err(ScheduleError::OutOfOrder { .. })
        ));
    }
}
