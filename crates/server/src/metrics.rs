//! `GET /metrics` in Prometheus' text format: requests by route and
//! status, tokens, decode speed, open generations, latency histograms by
//! endpoint (time to first token, time per output token, end to end, queue
//! wait; built with `prometheus-client`), and every member's stage times
//! (compute, and packing + sending activations) with the sequences each
//! stage holds.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use hearth_runtime::pipeline::{GenSummary, StageStats};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::AppState;

/// The endpoint a generation answered (the histograms' one label: a fixed
/// set, nothing that changes with placements).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Endpoint {
    endpoint: &'static str,
}

type Latency = Family<Endpoint, Histogram, fn() -> Histogram>;

/// Seconds from 5 ms to about 80 s, doubling.
fn seconds() -> Histogram {
    Histogram::new(exponential_buckets(0.005, 2.0, 15))
}

/// Seconds per token, from 1 ms to about 2 s.
fn per_token() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 1.6, 17))
}

/// The latency histograms and their registry.
struct Histograms {
    registry: Registry,
    ttft: Latency,
    tpot: Latency,
    e2e: Latency,
    queue: Latency,
}

impl Default for Histograms {
    fn default() -> Self {
        let ttft = Latency::new_with_constructor(seconds as fn() -> Histogram);
        let tpot = Latency::new_with_constructor(per_token as fn() -> Histogram);
        let e2e = Latency::new_with_constructor(seconds as fn() -> Histogram);
        let queue = Latency::new_with_constructor(seconds as fn() -> Histogram);
        let mut registry = Registry::default();
        registry.register(
            "hearth_time_to_first_token_seconds",
            "Seconds from a generation's admission request to its first token (queue wait and prefill through every stage).",
            ttft.clone(),
        );
        registry.register(
            "hearth_time_per_output_token_seconds",
            "Seconds per generated token after the first.",
            tpot.clone(),
        );
        registry.register(
            "hearth_request_duration_seconds",
            "Seconds from a generation request's arrival to its last token.",
            e2e.clone(),
        );
        registry.register(
            "hearth_queue_wait_seconds",
            "Seconds a generation waited to be admitted by the first stage.",
            queue.clone(),
        );
        Self {
            registry,
            ttft,
            tpot,
            e2e,
            queue,
        }
    }
}

impl std::fmt::Debug for Histograms {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Histograms").finish_non_exhaustive()
    }
}

/// The server's counters.
#[derive(Debug, Default)]
pub struct Metrics {
    histograms: Histograms,
    requests: Mutex<BTreeMap<(String, u16), u64>>,
    prompt_tokens: AtomicU64,
    completion_tokens: AtomicU64,
    generations: AtomicU64,
    open: AtomicU64,
    /// The last finished generation's decode speed (f64 bits).
    last_tok_s: AtomicU64,
}

/// Keeps a generation counted as open until dropped.
pub(crate) struct OpenGuard(std::sync::Arc<Metrics>);

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Metrics {
    pub(crate) fn request(&self, route: &str, status: u16) {
        if let Ok(mut m) = self.requests.lock() {
            *m.entry((route.to_string(), status)).or_default() += 1;
        }
    }

    /// A finished generation of `endpoint`, whose request arrived at
    /// `arrived`.
    pub(crate) fn finished(&self, s: &GenSummary, endpoint: &'static str, arrived: Instant) {
        let label = Endpoint { endpoint };
        let h = &self.histograms;
        h.ttft.get_or_create(&label).observe(s.prefill_secs);
        h.queue.get_or_create(&label).observe(s.queue_secs);
        h.e2e
            .get_or_create(&label)
            .observe(arrived.elapsed().as_secs_f64());
        if s.token_ids.len() > 1 {
            h.tpot
                .get_or_create(&label)
                .observe(s.decode_secs / (s.token_ids.len() - 1) as f64);
        }
        self.prompt_tokens
            .fetch_add(s.prompt_tokens as u64, Ordering::Relaxed);
        self.completion_tokens
            .fetch_add(s.token_ids.len() as u64, Ordering::Relaxed);
        self.generations.fetch_add(1, Ordering::Relaxed);
        self.last_tok_s
            .store(s.decode_tok_per_s().to_bits(), Ordering::Relaxed);
    }

    /// Generations whose reply is still being produced.
    pub fn open_generations(&self) -> u64 {
        self.open.load(Ordering::Relaxed)
    }

    fn render(&self, out: &mut String) {
        family(
            out,
            "hearth_http_requests_total",
            "counter",
            "HTTP requests by route and status.",
        );
        if let Ok(m) = self.requests.lock() {
            for ((route, status), n) in m.iter() {
                let _ = writeln!(
                    out,
                    "hearth_http_requests_total{{route=\"{}\",status=\"{status}\"}} {n}",
                    escape(route)
                );
            }
        }
        let counters = [
            (
                "hearth_generations_total",
                "Generations finished.",
                &self.generations,
            ),
            (
                "hearth_prompt_tokens_total",
                "Prompt tokens of finished generations.",
                &self.prompt_tokens,
            ),
            (
                "hearth_completion_tokens_total",
                "Tokens generated by finished generations.",
                &self.completion_tokens,
            ),
        ];
        for (name, help, v) in counters {
            family(out, name, "counter", help);
            let _ = writeln!(out, "{name} {}", v.load(Ordering::Relaxed));
        }
        family(
            out,
            "hearth_open_generations",
            "gauge",
            "Generations this server is answering now.",
        );
        let _ = writeln!(out, "hearth_open_generations {}", self.open_generations());
        family(
            out,
            "hearth_decode_tokens_per_second",
            "gauge",
            "Decode speed of the last finished generation.",
        );
        let _ = writeln!(
            out,
            "hearth_decode_tokens_per_second {}",
            f64::from_bits(self.last_tok_s.load(Ordering::Relaxed))
        );
        // The histograms, in the same text format (OpenMetrics' end marker
        // left out: more families follow).
        let mut h = String::new();
        if prometheus_client::encoding::text::encode(&mut h, &self.histograms.registry).is_ok() {
            out.push_str(h.trim_end().trim_end_matches("# EOF").trim_end());
            out.push('\n');
        }
    }
}

impl AppState {
    pub(crate) fn open_generation(&self) -> OpenGuard {
        self.metrics.open.fetch_add(1, Ordering::Relaxed);
        OpenGuard(self.metrics.clone())
    }
}

fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

/// A label value as Prometheus reads it.
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

pub(crate) async fn metrics(State(s): State<AppState>) -> Response {
    let mut out = String::new();
    s.metrics.render(&mut out);
    let stats = tokio::time::timeout(Duration::from_secs(3), s.node.cluster_stage_stats()).await;
    let stages: Vec<_> = stats.unwrap_or_default();
    type Value = fn(&StageStats) -> f64;
    let fams: [(&str, &str, &str, Value); 4] = [
        (
            "hearth_stage_batches_total",
            "counter",
            "Batches a stage has run.",
            |s| s.batches as f64,
        ),
        (
            "hearth_stage_compute_seconds_total",
            "counter",
            "Seconds a stage spent computing its layers.",
            |s| s.compute_s,
        ),
        (
            "hearth_stage_network_seconds_total",
            "counter",
            "Seconds a stage spent packing and sending activations to the next stage.",
            |s| s.send_s,
        ),
        (
            "hearth_stage_sequences",
            "gauge",
            "Sequences a stage holds now (queue depth).",
            |s| s.live_sequences as f64,
        ),
    ];
    for (name, kind, help, value) in fams {
        family(&mut out, name, kind, help);
        for (node_id, node, list) in &stages {
            for st in list {
                let _ = writeln!(
                    out,
                    "{name}{{node=\"{}\",node_id=\"{}\",placement=\"{}\",stage=\"{}\",layers=\"{}..{}\"}} {}",
                    escape(node),
                    escape(node_id),
                    st.placement,
                    st.index,
                    st.spec.start,
                    st.spec.end,
                    value(st)
                );
            }
        }
    }
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        out,
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
