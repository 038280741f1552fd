//! Live figures from real work: every stage this node runs reports each
//! batch it computed, with the time its start-up figures predicted for it.
//! The meter keeps time-decayed sums (half-life [`HALF_LIFE`]), so its
//! figures are moving averages: how much slower or faster than measured at
//! start-up this device runs now (`factor`), how busy its stages are, and
//! how many tokens they pass per second. Shared in the node's profile.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// Half-life of the moving averages.
pub const HALF_LIFE: Duration = Duration::from_secs(8);
/// Seconds of predicted work (decayed) the factor must rest on before it
/// replaces the start-up figures.
pub const MIN_EVIDENCE_S: f64 = 0.25;
/// Batches (decayed) the factor must rest on, likewise.
pub const MIN_BATCHES: f64 = 20.0;

/// This node's live figures, as shared with the cluster.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LiveFigures {
    /// Measured ÷ predicted compute time of the batches that could be
    /// compared (single-sequence decode steps and prefill chunks): 2.0
    /// means this device now runs at half its start-up speed.
    pub factor: f64,
    /// Decayed batches and predicted seconds the factor rests on.
    pub batches: f64,
    pub evidence_s: f64,
    /// Fraction of wall time the stages computed, lately.
    pub busy: f64,
    /// Tokens (sequence steps and prompt tokens) the stages passed per
    /// second, lately.
    pub tokens_per_s: f64,
    /// Whether the factor rests on enough work to replace start-up figures.
    pub trusted: bool,
}

#[derive(Debug)]
struct Sums {
    at: Instant,
    since: Instant,
    measured: f64,
    predicted: f64,
    batches: f64,
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
            measured: 0.0,
            predicted: 0.0,
            batches: 0.0,
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
        self.measured *= k;
        self.predicted *= k;
        self.batches *= k;
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
}

impl Default for LiveMeter {
    fn default() -> Self {
        Self {
            sums: Mutex::new(Sums::new(Instant::now())),
        }
    }
}

impl LiveMeter {
    /// A batch took `measured` seconds of compute and passed `tokens`
    /// tokens; `predicted` is what the start-up figures say it should have
    /// taken, when the batch is of a kind they predict.
    pub fn record(&self, measured: f64, predicted: Option<f64>, tokens: usize) {
        let Ok(mut s) = self.sums.lock() else { return };
        s.advance(Instant::now());
        s.busy += measured;
        s.tokens += tokens as f64;
        if let Some(p) = predicted.filter(|p| *p > 0.0 && p.is_finite())
            && measured.is_finite()
        {
            s.measured += measured;
            s.predicted += p;
            s.batches += 1.0;
        }
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
        let factor = if s.predicted > 0.0 {
            s.measured / s.predicted
        } else {
            1.0
        };
        Some(LiveFigures {
            factor,
            batches: s.batches,
            evidence_s: s.predicted,
            busy: (s.busy / wall).clamp(0.0, 1.0),
            tokens_per_s: s.tokens / wall,
            trusted: s.batches >= MIN_BATCHES
                && s.predicted >= MIN_EVIDENCE_S
                && factor.is_finite()
                && factor > 0.0,
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
            m.record(0.02, Some(0.01), 1);
        }
        let f = m.figures().unwrap();
        assert!((f.factor - 2.0).abs() < 1e-6, "{f:?}");
        assert!(!f.trusted, "10 batches of 10 ms are not enough: {f:?}");
        for _ in 0..40 {
            m.record(0.02, Some(0.01), 1);
        }
        let f = m.figures().unwrap();
        assert!(f.trusted, "{f:?}");
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
        s.measured = 8.0;
        s.advance(t0 + HALF_LIFE);
        assert!((s.measured - 4.0).abs() < 1e-9);
        // The covered wall time tends to half-life / ln 2.
        s.advance(t0 + HALF_LIFE * 40);
        assert!((s.wall - HALF_LIFE.as_secs_f64() / std::f64::consts::LN_2).abs() < 1e-6);
    }
}
