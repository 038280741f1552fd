//! Live figures from real work: every stage this node runs reports each
//! batch it computed, with the time its start-up figures predicted for it.
//! The meter keeps time-decayed sums (half-life [`HALF_LIFE`]), so its
//! figures are moving averages: how much slower or faster than measured at
//! start-up this device runs decode steps now (`factor`) and prefill chunks
//! (`prefill_factor`), kept apart because one can drift without the other;
//! how busy its stages are, and how many tokens they pass per second.
//! Shared in the node's profile.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// Half-life of the moving averages.
pub const HALF_LIFE: Duration = Duration::from_secs(8);
/// Seconds of predicted work (decayed) the factor must rest on before it
/// replaces the start-up figures.
pub const MIN_EVIDENCE_S: f64 = 0.25;
/// Batches (decayed) the factor must rest on, likewise.
pub const MIN_BATCHES: f64 = 20.0;
/// Prefill chunks (decayed) the prefill factor must rest on (each is many
/// tokens' work).
pub const MIN_PREFILL_BATCHES: f64 = 3.0;

/// The kinds of batch the start-up figures predict.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Work {
    /// One sequence's decode step.
    Decode,
    /// One sequence's prompt chunk.
    Prefill,
}

impl Work {
    fn index(self) -> usize {
        match self {
            Self::Decode => 0,
            Self::Prefill => 1,
        }
    }
}

/// This node's live figures, as shared with the cluster.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LiveFigures {
    /// Measured ÷ predicted compute time of single-sequence decode steps:
    /// 2.0 means this device now decodes at half its start-up speed.
    pub factor: f64,
    /// Decayed decode steps and their predicted seconds the factor rests on.
    pub batches: f64,
    pub evidence_s: f64,
    /// The same for prefill chunks, once there are enough of them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefill_factor: Option<f64>,
    /// Fraction of wall time the stages computed, lately.
    pub busy: f64,
    /// Tokens (sequence steps and prompt tokens) the stages passed per
    /// second, lately.
    pub tokens_per_s: f64,
    /// Whether the decode factor rests on enough work to replace start-up
    /// figures.
    pub trusted: bool,
}

#[derive(Debug)]
struct Sums {
    at: Instant,
    since: Instant,
    /// Per [`Work`] kind.
    measured: [f64; 2],
    predicted: [f64; 2],
    batches: [f64; 2],
    busy: f64,
    tokens: f64,
    /// Wall time covered (decayed), for rates.
    wall: f64,
}

impl Sums {
    fn new(now: Instant) -> Self {
        Self {
            at: now,
            since: now,
            measured: [0.0; 2],
            predicted: [0.0; 2],
            batches: [0.0; 2],
            busy: 0.0,
            tokens: 0.0,
            wall: 0.0,
        }
    }

    /// Decays every sum to `now`; wall time grows by the time passed.
    fn advance(&mut self, now: Instant) {
        let dt = now.saturating_duration_since(self.at).as_secs_f64();
        if dt <= 0.0 {
            return;
        }
        let k = 0.5f64.powf(dt / HALF_LIFE.as_secs_f64());
        for i in 0..2 {
            self.measured[i] *= k;
            self.predicted[i] *= k;
            self.batches[i] *= k;
        }
        self.busy *= k;
        self.tokens *= k;
        // ∫ decayed dt over the step: the wall time the sums cover.
        self.wall = self.wall * k + (1.0 - k) * HALF_LIFE.as_secs_f64() / std::f64::consts::LN_2;
        self.at = now;
    }
}

/// The meter every stage of this node reports to.
#[derive(Debug)]
pub struct LiveMeter {
    sums: Mutex<Sums>,
    /// The figures stages predict their batches from: the factors are
    /// measured ÷ predicted, so they mean something only against these
    /// (see [`LiveMeter::rebase`]).
    basis: Mutex<Option<Arc<super::ModelTimes>>>,
}

impl Default for LiveMeter {
    fn default() -> Self {
        Self {
            sums: Mutex::new(Sums::new(Instant::now())),
            basis: Mutex::new(None),
        }
    }
}

impl LiveMeter {
    /// A batch took `measured` seconds of compute and passed `tokens`
    /// tokens; `predicted` is what the start-up figures say it should have
    /// taken, when the batch is of a kind they predict.
    pub fn record(&self, measured: f64, predicted: Option<(Work, f64)>, tokens: usize) {
        let Ok(mut s) = self.sums.lock() else { return };
        s.advance(Instant::now());
        if measured.is_finite() && measured >= 0.0 {
            s.busy += measured;
        }
        s.tokens += tokens as f64;
        if let Some((work, p)) = predicted.filter(|(_, p)| *p > 0.0 && p.is_finite())
            && measured.is_finite()
            && measured >= 0.0
        {
            let i = work.index();
            s.measured[i] += measured;
            s.predicted[i] += p;
            s.batches[i] += 1.0;
        }
    }

    /// The figures batches are predicted from now.
    pub fn basis(&self) -> Option<Arc<super::ModelTimes>> {
        self.basis.lock().ok().and_then(|b| b.clone())
    }

    /// Predicts batches from `times` from now on and forgets the work
    /// seen (its factors were against the previous figures): a model set,
    /// or measured again.
    pub fn rebase(&self, times: super::ModelTimes) {
        if let Ok(mut b) = self.basis.lock() {
            *b = Some(Arc::new(times));
        }
        self.reset();
    }

    /// Forgets everything (the offer changed: old work no longer tells
    /// the speed now).
    pub fn reset(&self) {
        if let Ok(mut s) = self.sums.lock() {
            *s = Sums::new(Instant::now());
        }
    }

    /// The figures now, if any work was seen since the last reset.
    pub fn figures(&self) -> Option<LiveFigures> {
        let mut s = self.sums.lock().ok()?;
        s.advance(Instant::now());
        if s.tokens <= 1e-9 && s.busy <= 1e-12 {
            return None;
        }
        let wall = s.wall.max(0.5);
        let ratio = |i: usize| {
            let f = s.measured[i] / s.predicted[i];
            (s.predicted[i] > 0.0 && f.is_finite() && f > 0.0).then_some(f)
        };
        let (d, p) = (Work::Decode.index(), Work::Prefill.index());
        let factor = ratio(d);
        let prefill_factor = ratio(p)
            .filter(|_| s.batches[p] >= MIN_PREFILL_BATCHES && s.predicted[p] >= MIN_EVIDENCE_S);
        Some(LiveFigures {
            factor: factor.unwrap_or(1.0),
            batches: s.batches[d],
            evidence_s: s.predicted[d],
            prefill_factor,
            busy: (s.busy / wall).clamp(0.0, 1.0),
            tokens_per_s: s.tokens / wall,
            trusted: factor.is_some()
                && s.batches[d] >= MIN_BATCHES
                && s.predicted[d] >= MIN_EVIDENCE_S,
        })
    }

    /// When the sums started (the last reset).
    pub fn since(&self) -> Option<Instant> {
        self.sums.lock().ok().map(|s| s.since)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_factor_is_measured_over_predicted_and_needs_evidence() {
        let m = LiveMeter::default();
        assert!(m.figures().is_none());
        for _ in 0..10 {
            m.record(0.02, Some((Work::Decode, 0.01)), 1);
        }
        let f = m.figures().unwrap();
        assert!((f.factor - 2.0).abs() < 1e-6, "{f:?}");
        assert!(!f.trusted, "10 batches of 10 ms are not enough: {f:?}");
        for _ in 0..40 {
            m.record(0.02, Some((Work::Decode, 0.01)), 1);
        }
        let f = m.figures().unwrap();
        assert!(f.trusted, "{f:?}");
        assert_eq!(f.prefill_factor, None, "no prompt was seen");
        // Prefill is tracked apart: it does not move the decode factor.
        for _ in 0..4 {
            m.record(0.05, Some((Work::Prefill, 0.1)), 64);
        }
        let f = m.figures().unwrap();
        assert!((f.factor - 2.0).abs() < 1e-3, "{f:?}");
        assert!((f.prefill_factor.unwrap() - 0.5).abs() < 1e-3, "{f:?}");
        // Nonsense figures are ignored.
        m.record(f64::NAN, Some((Work::Decode, 0.01)), 1);
        m.record(0.01, Some((Work::Decode, f64::INFINITY)), 1);
        m.record(-1.0, Some((Work::Decode, 0.01)), 1);
        assert!((m.figures().unwrap().factor - 2.0).abs() < 1e-3);
        // Batches it cannot predict count for busy time and tokens only.
        m.record(1.0, None, 8);
        let g = m.figures().unwrap();
        assert!((g.factor - 2.0).abs() < 1e-3);
        assert!(g.busy >= f.busy && g.tokens_per_s > f.tokens_per_s);
        m.reset();
        assert!(m.figures().is_none());
    }

    #[test]
    fn sums_decay_by_half_every_half_life() {
        let t0 = Instant::now();
        let mut s = Sums::new(t0);
        s.measured = [8.0, 2.0];
        s.advance(t0 + HALF_LIFE);
        assert!((s.measured[0] - 4.0).abs() < 1e-9);
        assert!((s.measured[1] - 1.0).abs() < 1e-9);
        // The covered wall time tends to half-life / ln 2.
        s.advance(t0 + HALF_LIFE * 40);
        assert!((s.wall - HALF_LIFE.as_secs_f64() / std::f64::consts::LN_2).abs() < 1e-6);
    }
}
