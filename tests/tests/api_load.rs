//! A bounded load test of the HTTP API: 48 concurrent streaming clients,
//! three requests each, against a 2-stage pipeline of the tiny model over
//! real QUIC and real HTTP on loopback. Every request completes or gets a
//! 429/503; none gets a 5xx; afterwards no stage holds a sequence and the
//! process's memory is back near its baseline.

use std::time::{Duration, Instant};

use hearth_runtime::pipeline::PlacementPolicy;
use hearth_server::{App, Listener, ServerOptions};
use hearth_test_utils::cluster::{pipeline_cluster, tiny_model_info};
use serde_json::json;

const CLIENTS: usize = 48;
const ROUNDS: usize = 3;

fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    pages * 4096
}

/// One wave of clients; returns (completed, refused, other) counts.
fn wave(addr: std::net::SocketAddr, model: &str) -> (usize, usize, Vec<String>) {
    let handles: Vec<_> = (0..CLIENTS)
        .map(|i| {
            let model = model.to_string();
            std::thread::spawn(move || {
                let agent: ureq::Agent = ureq::Agent::config_builder()
                    .timeout_global(Some(Duration::from_secs(120)))
                    .http_status_as_error(false)
                    .build()
                    .into();
                let mut out = Vec::new();
                for r in 0..ROUNDS {
                    let body = json!({"model": model, "stream": true, "max_tokens": 16,
                        "temperature": 0.8, "seed": (i * ROUNDS + r) as u64,
                        "messages": [{"role": "user", "content": format!("client {i} round {r}")}]});
                    let resp = agent
                        .post(&format!("http://{addr}/v1/chat/completions"))
                        .header("content-type", "application/json")
                        .send(body.to_string());
                    out.push(match resp {
                        Ok(mut resp) => {
                            let status = resp.status().as_u16();
                            let text = resp.body_mut().read_to_string().unwrap_or_default();
                            (status, text)
                        }
                        Err(e) => (0, e.to_string()),
                    });
                }
                out
            })
        })
        .collect();
    let (mut done, mut refused, mut other) = (0, 0, Vec::new());
    for h in handles {
        for (status, text) in h.join().unwrap_or_default() {
            match status {
                200 if text.trim_end().ends_with("data: [DONE]") && !text.contains("\"error\"") => {
                    done += 1
                }
                429 | 503 => refused += 1,
                _ => other.push(format!(
                    "{status}: {}",
                    text.chars().take(200).collect::<String>()
                )),
            }
        }
    }
    (done, refused, other)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_streaming_clients_complete_or_are_refused_and_nothing_leaks() {
    let dir = tempfile::tempdir().unwrap();
    let info = tiny_model_info(dir.path()).unwrap();
    let nodes = pipeline_cluster(2, 2, &info, PlacementPolicy::Even)
        .await
        .unwrap();
    let node = nodes[0].node.clone();
    let model = node.model_name().unwrap();
    let listener = Listener::bind("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(listener.serve(
        App::new(node.clone(), ServerOptions::default()),
        async {
            let _ = stop_rx.await;
        },
    ));

    // Two waves warm the allocator's arenas (the clients' threads are in
    // this process too) and the caches; then the baseline.
    let m = model.clone();
    let warm = tokio::task::spawn_blocking(move || [wave(addr, &m), wave(addr, &m)])
        .await
        .unwrap();
    assert!(warm.iter().all(|w| w.2.is_empty()), "{:?}", warm[0].2);
    let baseline = rss_bytes();
    let started = Instant::now();
    let m = model.clone();
    let (done, refused, other) = tokio::task::spawn_blocking(move || {
        let a = wave(addr, &m);
        let b = wave(addr, &m);
        (a.0 + b.0, a.1 + b.1, [a.2, b.2].concat())
    })
    .await
    .unwrap();
    let secs = started.elapsed().as_secs_f64();
    assert!(
        other.is_empty(),
        "requests neither completed nor refused: {other:?}"
    );
    assert_eq!(done + refused, 2 * CLIENTS * ROUNDS);
    assert!(done > 0);

    // Every stage lets go of every sequence.
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        let live: u64 = nodes
            .iter()
            .flat_map(|t| t.node.stage_stats())
            .map(|s| s.live_sequences as u64)
            .sum();
        if live == 0 {
            break;
        }
        assert!(Instant::now() < until, "{live} sequences still held");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let after = rss_bytes();
    eprintln!(
        "load: {} requests from {CLIENTS} clients in {secs:.1} s: {done} completed, {refused} refused; \
         RSS {:.1} MiB after warm-up, {:.1} MiB after",
        2 * CLIENTS * ROUNDS,
        baseline as f64 / (1 << 20) as f64,
        after as f64 / (1 << 20) as f64
    );
    assert!(
        after <= baseline + baseline / 5 + (32 << 20),
        "memory grew from {baseline} to {after} bytes"
    );
    let _ = stop_tx.send(());
    let _ = tokio::time::timeout(Duration::from_secs(15), server).await;
    for t in nodes {
        t.shutdown();
    }
}
