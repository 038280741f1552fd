//! Which pipeline a new request goes to: the placement's pipeline or one
//! of its replicas (members that hold the whole model beside it).
//!
//! The requester's node counts the sequences it has in flight on each and
//! times the tokens they get: the seconds between a sequence's tokens,
//! against how many sequences that pipeline had in flight then. A line fit
//! through those (decayed, half-life [`HALF_LIFE`]) predicts each
//! pipeline's per-sequence rate with one more sequence; before there is
//! evidence the planner's single-stream prediction stands in, with a
//! [`PRIOR_SLOPE`] for what batching costs. A request goes where it adds the
//! most to the total rate, among the pipelines that would give it at least
//! [`FAIR`] of the best per-sequence rate on offer: one stream always goes
//! to the fastest pipeline, and a slow replica takes a stream only when
//! the pipeline is so loaded that batching one more gains less than the
//! replica adds.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::Placement;

/// Half-life of the timing evidence.
pub const HALF_LIFE: Duration = Duration::from_secs(20);
/// Least per-sequence rate, as a fraction of the best on offer, a request
/// is sent to.
pub const FAIR: f64 = 0.75;
/// Assumed growth of a decode step's time per extra sequence in the batch,
/// as a fraction of a single-sequence step, until measured.
pub const PRIOR_SLOPE: f64 = 0.15;
/// Decayed tokens of evidence before a fit replaces the prediction.
const MIN_TOKENS: f64 = 16.0;
/// Weighted variance of the concurrency the slope is fitted from, at least.
const MIN_SPREAD: f64 = 0.5;

/// Decayed least-squares sums of (concurrency, seconds per token).
#[derive(Debug, Clone)]
struct Fit {
    at: Instant,
    w: f64,
    k: f64,
    kk: f64,
    y: f64,
    ky: f64,
}

impl Fit {
    fn new(now: Instant) -> Self {
        Self {
            at: now,
            w: 0.0,
            k: 0.0,
            kk: 0.0,
            y: 0.0,
            ky: 0.0,
        }
    }

    fn decay(&mut self, now: Instant) {
        let dt = now.saturating_duration_since(self.at).as_secs_f64();
        if dt > 0.0 {
            let f = 0.5f64.powf(dt / HALF_LIFE.as_secs_f64());
            self.w *= f;
            self.k *= f;
            self.kk *= f;
            self.y *= f;
            self.ky *= f;
            self.at = now;
        }
    }

    fn add(&mut self, now: Instant, k: f64, secs_per_token: f64, tokens: f64) {
        self.decay(now);
        self.w += tokens;
        self.k += tokens * k;
        self.kk += tokens * k * k;
        self.y += tokens * secs_per_token;
        self.ky += tokens * k * secs_per_token;
    }

    /// Seconds per token for each of `k` sequences in flight, from the
    /// evidence (a line through it, or the prior slope through its mean),
    /// or from `single` (seconds per token alone) without any.
    fn predict(&self, k: f64, single: Option<f64>) -> Option<f64> {
        if self.w >= MIN_TOKENS {
            let (mk, my) = (self.k / self.w, self.y / self.w);
            let var = self.kk / self.w - mk * mk;
            if var >= MIN_SPREAD {
                let slope = (self.ky / self.w - mk * my) / var;
                let at = my + slope.max(0.0) * (k - mk);
                if at.is_finite() && at > 0.0 {
                    return Some(at);
                }
            }
            let one = my / (1.0 + PRIOR_SLOPE * (mk - 1.0).max(0.0));
            return Some(one * (1.0 + PRIOR_SLOPE * (k - 1.0).max(0.0)));
        }
        single.map(|s| s * (1.0 + PRIOR_SLOPE * (k - 1.0).max(0.0)))
    }
}

#[derive(Debug)]
struct Lane {
    in_flight: usize,
    fit: Fit,
}

#[derive(Debug, Default)]
struct State {
    placement: u64,
    /// By the node running the pipeline's first stage.
    lanes: HashMap<String, Lane>,
}

/// The requester's view of each pipeline's load and pace.
#[derive(Debug, Clone, Default)]
pub(crate) struct Balancer {
    state: Arc<Mutex<State>>,
}

/// One pipeline a request may go to.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Candidate {
    /// The node running its first stage.
    pub node: String,
    /// Predicted single-stream tokens per second.
    pub predicted: Option<f64>,
}

/// The pipelines of `placement` a request may go to, the pipeline first,
/// then the replicas `reachable` says can be asked.
pub(crate) fn candidates(
    placement: &Placement,
    reachable: impl Fn(&str) -> bool,
) -> Vec<Candidate> {
    let mut out: Vec<Candidate> = placement
        .stages
        .first()
        .map(|s| Candidate {
            node: s.node_id.clone(),
            predicted: placement.predicted_tokens_per_s,
        })
        .into_iter()
        .collect();
    out.extend(
        placement
            .replicas
            .iter()
            .filter(|r| reachable(&r.node_id))
            .map(|r| Candidate {
                node: r.node_id.clone(),
                predicted: r.predicted_tokens_per_s,
            }),
    );
    out
}

/// A request in flight on one pipeline: counts while it lives, and times
/// its tokens.
pub(crate) struct Ticket {
    balancer: Balancer,
    placement: u64,
    node: String,
    last: Option<Instant>,
}

impl Ticket {
    /// The node running the first stage of the pipeline it went to.
    pub(crate) fn node(&self) -> &str {
        &self.node
    }

    /// `tokens` arrived now (the first of a sequence only starts the clock:
    /// it carries the prompt's time).
    pub(crate) fn tokens(&mut self, tokens: usize) {
        let now = Instant::now();
        if let Some(last) = self.last.replace(now)
            && tokens > 0
        {
            let per = now.saturating_duration_since(last).as_secs_f64() / tokens as f64;
            self.balancer
                .record(self.placement, &self.node, now, per, tokens);
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if let Ok(mut s) = self.balancer.state.lock()
            && s.placement == self.placement
            && let Some(l) = s.lanes.get_mut(&self.node)
        {
            l.in_flight = l.in_flight.saturating_sub(1);
        }
    }
}

impl Balancer {
    fn record(&self, placement: u64, node: &str, now: Instant, per: f64, tokens: usize) {
        if let Ok(mut s) = self.state.lock()
            && s.placement == placement
            && let Some(l) = s.lanes.get_mut(node)
        {
            let k = l.in_flight.max(1) as f64;
            l.fit.add(now, k, per, tokens as f64);
        }
    }

    /// Picks the pipeline for a new request among `candidates` of
    /// `placement` (the pipeline first) and counts the request on it.
    pub(crate) fn choose(&self, placement: u64, candidates: &[Candidate]) -> Option<Ticket> {
        let now = Instant::now();
        let mut s = self.state.lock().ok()?;
        if s.placement != placement {
            s.placement = placement;
            s.lanes.clear();
        }
        let mut options = Vec::with_capacity(candidates.len());
        for c in candidates {
            let lane = s.lanes.entry(c.node.clone()).or_insert_with(|| Lane {
                in_flight: 0,
                fit: Fit::new(now),
            });
            lane.fit.decay(now);
            let single = c.predicted.filter(|t| *t > 0.0).map(|t| 1.0 / t);
            let k = lane.in_flight as f64;
            let (Some(next), now_y) = (
                lane.fit.predict(k + 1.0, single),
                lane.fit.predict(k.max(1.0), single),
            ) else {
                continue;
            };
            let total_now = if k > 0.0 {
                now_y.map_or(0.0, |y| k / y)
            } else {
                0.0
            };
            options.push((c.node.clone(), (k + 1.0) / next - total_now, 1.0 / next));
        }
        let best_rate = options.iter().map(|o| o.2).fold(0.0, f64::max);
        let pick = options
            .iter()
            .filter(|o| o.2 >= FAIR * best_rate)
            // The first (the pipeline) wins ties.
            .fold(None::<&(String, f64, f64)>, |best, o| match best {
                Some(b) if b.1 >= o.1 => Some(b),
                _ => Some(o),
            })
            .map(|o| o.0.clone())
            .or_else(|| candidates.first().map(|c| c.node.clone()))?;
        if let Some(l) = s.lanes.get_mut(&pick) {
            l.in_flight += 1;
        } else {
            s.lanes.insert(
                pick.clone(),
                Lane {
                    in_flight: 1,
                    fit: Fit::new(now),
                },
            );
        }
        Some(Ticket {
            balancer: self.clone(),
            placement,
            node: pick,
            last: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cands(main: f64, replica: f64) -> Vec<Candidate> {
        vec![
            Candidate {
                node: "a".into(),
                predicted: Some(main),
            },
            Candidate {
                node: "b".into(),
                predicted: Some(replica),
            },
        ]
    }

    /// Feeds `tokens` tokens at `secs` each as if `k` sequences were in
    /// flight on `node`.
    fn feed(b: &Balancer, placement: u64, node: &str, k: usize, secs: f64, tokens: usize) {
        if let Ok(mut s) = b.state.lock() {
            let lane = s.lanes.get_mut(node).map(|l| {
                let was = l.in_flight;
                l.in_flight = k;
                was
            });
            drop(s);
            b.record(placement, node, Instant::now(), secs, tokens);
            if let (Some(was), Ok(mut s)) = (lane, b.state.lock())
                && let Some(l) = s.lanes.get_mut(node)
            {
                l.in_flight = was;
            }
        }
    }

    #[test]
    fn one_stream_goes_to_the_fastest_pipeline() {
        let b = Balancer::default();
        let t = b.choose(1, &cands(34.0, 8.0)).map(|t| t.node().to_string());
        assert_eq!(t.as_deref(), Some("a"));
        // Faster replica: it gets the single stream.
        let b = Balancer::default();
        let t = b.choose(1, &cands(8.0, 34.0)).map(|t| t.node().to_string());
        assert_eq!(t.as_deref(), Some("b"));
    }

    #[test]
    fn a_slow_replica_takes_a_stream_once_batching_gains_less_than_it_adds() {
        let b = Balancer::default();
        let c = cands(34.0, 8.3);
        let mut held = Vec::new();
        // The pipeline's measured pace: a decode step of 18 ms + 11 ms per
        // sequence (a 1-core device's batching).
        let t = b.choose(7, &c).expect("a pick");
        held.push(t);
        for k in 1..=8 {
            feed(&b, 7, "a", k, 0.018 + 0.011 * k as f64, 40);
        }
        for _ in 0..7 {
            held.push(b.choose(7, &c).expect("a pick"));
        }
        let on = |n: &str, h: &[Ticket]| h.iter().filter(|t| t.node() == n).count();
        // With 3 in flight on a, a 4th gains ~5.7 tok/s there, the replica
        // adds 8.3, but would give that stream 8.3 tok/s against ~16 on a:
        // under FAIR, so a keeps streams until its per-stream pace nears
        // the replica's.
        assert!(
            on("b", &held) <= 1,
            "{:?}",
            held.iter()
                .map(|t| t.node().to_string())
                .collect::<Vec<_>>()
        );
        assert_eq!(on("a", &held) + on("b", &held), 8);
        assert_eq!(on("b", &held), 1, "the 8th stream adds more on b");
        // Releasing a ticket frees its slot.
        held.retain(|t| t.node() != "b");
        let again = b.choose(7, &c).expect("a pick");
        assert_eq!(again.node(), "b");
    }

    #[test]
    fn replicas_unknown_or_unreachable_are_not_asked() {
        let mut p: Placement = serde_json::from_value(serde_json::json!({
            "id": 1, "model": "m", "fingerprint": "f", "content": null,
            "stages": [{"node_id": "a", "name": "a",
                        "spec": {"start": 0, "end": 4, "embed": true, "head": true}}],
            "members": ["a", "b", "c"],
            "predicted_tokens_per_s": 30.0,
            "replicas": [{"node_id": "b", "name": "b", "predicted_tokens_per_s": 30.0},
                         {"node_id": "c", "name": "c"}]
        }))
        .expect("placement");
        assert!(p.validate().is_ok());
        let c = candidates(&p, |n| n != "b");
        assert_eq!(c.len(), 2);
        let b = Balancer::default();
        // c has no prediction and no evidence: never chosen.
        for _ in 0..4 {
            let t = b.choose(1, &c).expect("a pick");
            assert_eq!(t.node(), "a");
            std::mem::forget(t);
        }
        // A replica that is also a stage is refused.
        p.replicas[0].node_id = "a".into();
        assert!(p.validate().is_err());
    }

    #[test]
    fn a_new_placement_starts_over() {
        let b = Balancer::default();
        let c = cands(34.0, 8.3);
        let held: Vec<Ticket> = (0..20).filter_map(|_| b.choose(1, &c)).collect();
        assert!(held.iter().any(|t| t.node() == "b"));
        let t = b.choose(2, &c).expect("a pick");
        assert_eq!(t.node(), "a", "nothing in flight on the new placement");
        drop(held);
        if let Ok(s) = b.state.lock() {
            assert_eq!(s.lanes.get("a").map(|l| l.in_flight), Some(1));
        }
    }
}
