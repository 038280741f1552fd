//! Measuring again when the machine offers this node clearly more CPU
//! than when it measured the model (a quota raised, other programs gone).
//!
//! Until then the planner scales the old figures by the offer, which
//! overstates a device measured under a small quota: there its decode ran
//! in short bursts that each go faster than sustained work. So a device
//! offered more measures its inference figures again (a few seconds), and
//! the leader waits for them before placing work on it for speed
//! ([`crate::placement`]'s re-planning, `REMEASURE_WAIT`).

use std::time::{Duration, Instant};

use tracing::{info, warn};

use super::book::{OFFER_CHANGE, OFFER_PERIOD};
use super::{MeasureOptions, ProfileBook};

/// Samples in a row the larger offer must hold before measuring again.
const HOLD: u32 = 2;
/// Least time between two measurements of the same model.
const MIN_GAP: Duration = Duration::from_secs(20);

/// Whether the machine offers `now` cores where the figures were measured
/// with `then`: clearly more (past [`OFFER_CHANGE`]).
pub(crate) fn offered_more(then: f64, now: f64) -> bool {
    then > 0.0 && now.is_finite() && now / then > OFFER_CHANGE
}

/// Watches what the machine offers against what the served model was
/// measured under, and measures again when it is clearly more (or takes
/// the figures cached in `cache` for this offer, if it had it before).
/// Each figure is timed as long as at start-up (`opts.min_secs`, 1 s by
/// default: sustained work across quota periods, not a burst). Runs until
/// the book stops. Only CPU figures follow a CPU offer; a node computing on
/// a GPU never measures again here.
/// Not while this node works: a measurement then competes with its stages
/// for the same CPU, is itself too slow, and makes the stages' measured
/// pace look slower than it is (`busy`: whether it trains or serves now).
pub(crate) fn spawn(
    book: ProfileBook,
    cache: std::path::PathBuf,
    opts: MeasureOptions,
    busy: impl Fn() -> bool + Send + 'static,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(OFFER_PERIOD);
        let mut held = 0u32;
        let mut last: Option<(String, Instant)> = None;
        loop {
            tokio::select! {
                _ = book.stopped() => return,
                _ = tick.tick() => {}
            }
            let (Some(info), Some(now)) = (book.model(), book.offer()) else {
                held = 0;
                continue;
            };
            let Some(then) = info.times.offer else {
                continue;
            };
            if info.times.backend != "cpu" || opts.compute.name() != "cpu" {
                continue;
            }
            if !offered_more(then.available(), now.available()) || busy() {
                held = 0;
                continue;
            }
            held += 1;
            let key = format!("{}|{:?}", info.times.fingerprint, info.times.content);
            let recent = last
                .as_ref()
                .is_some_and(|(k, t)| *k == key && t.elapsed() < MIN_GAP);
            if held < HOLD || recent {
                continue;
            }
            last = Some((key, Instant::now()));
            info!(
                from = then.available(),
                to = now.available(),
                "offered more CPU than when measured; measuring the model again"
            );
            let opts = opts.clone();
            let old = info.times.clone();
            let path = info.path.clone();
            let cache = cache.clone();
            let r = tokio::task::spawn_blocking(move || {
                let weights = hearth_models::WeightFile::open(&path)?;
                // Measured under this offer before (the cache key holds
                // the quota): those figures, training ones included.
                if let Some(t) = super::cache::cached_times(&weights, &cache, &opts)
                    && t.offer
                        .is_some_and(|o| !offered_more(o.available(), now.available()))
                {
                    return Ok(super::ModelTimes {
                        model: old.model.clone(),
                        content: old.content.clone(),
                        ..t
                    });
                }
                super::remeasure_inference(&weights, &old, &opts)
            })
            .await;
            match r {
                Ok(Ok(times)) => {
                    let layer_ms = times.layer.decode_s * 1e3;
                    if book.replace_times(times) {
                        info!(layer_decode_ms = layer_ms, "measured again");
                    }
                }
                Ok(Err(e)) => warn!("measuring again failed: {e}"),
                Err(e) => warn!("measuring again failed: {e}"),
            }
            held = 0;
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_clearly_larger_offer_counts() {
        assert!(offered_more(0.25, 1.0));
        assert!(!offered_more(1.0, 1.1));
        assert!(!offered_more(1.0, 0.25));
        assert!(!offered_more(0.0, 1.0));
        assert!(!offered_more(1.0, f64::NAN));
    }
}
