//! Transport benchmark: tensor-frame round-trip latency and one-way
//! throughput over Hearth's authenticated QUIC on loopback, for payloads
//! from 4 KiB to 16 MiB, beside a raw TCP baseline (same framing, same
//! runtime, TCP_NODELAY) measured in the same run. With root, also the time
//! for three `hearth up` processes in separate network namespaces to reach
//! a full view over mDNS.
//!
//! `cargo run --release -p hearth-bench --bin transport`
#![allow(clippy::print_stdout)] // A command-line program: printing to stdout is its job.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;
use hearth_bench::{Row, cpu_name, median, write_results};
use hearth_net::framed::{expect_message, read_message, write_message};
use hearth_net::{ClusterSecret, Endpoint, EndpointConfig, Identity, PeerConn};
use hearth_proto::{Message, TensorFrame, WireDType, encode_frame, limits, stream_kind};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A bench-private stream kind: read everything, answer with the count.
const SINK: u16 = 0xBE01;

#[derive(Debug, Parser)]
struct Args {
    /// Round trips per payload size.
    #[arg(long, default_value_t = 30)]
    rounds: usize,
    /// Bytes sent per throughput measurement (at least 4 frames).
    #[arg(long, default_value_t = 256 << 20)]
    volume: usize,
    /// mDNS formation runs (needs root; 0 skips).
    #[arg(long, default_value_t = 3)]
    mdns_runs: usize,
    #[arg(long, default_value = "bench/results")]
    out: PathBuf,
}

fn frame(bytes: usize) -> Result<Message> {
    let n = bytes / 4;
    let vals: Vec<f32> = (0..n).map(|i| i as f32).collect();
    Ok(Message::Tensor(TensorFrame::from_f32(
        1,
        1,
        vec![n as u32],
        &vals,
        WireDType::F32,
    )?))
}

async fn quic_pair() -> Result<(Endpoint, PeerConn)> {
    let secret = ClusterSecret::generate();
    let cfg = |name: &str| -> Result<EndpointConfig> {
        Ok(EndpointConfig {
            identity: Identity::generate()?,
            secret: secret.clone(),
            name: name.into(),
            bind: "127.0.0.1:0".parse()?,
        })
    };
    let (a, _) = Endpoint::bind(cfg("a")?, &[])?;
    let (b, mut rx) = Endpoint::bind(cfg("b")?, &[stream_kind::ECHO, SINK])?;
    let mut echo = rx.remove(&stream_kind::ECHO).context("echo")?;
    let mut sink = rx.remove(&SINK).context("sink")?;
    tokio::spawn(async move {
        while let Some(mut s) = echo.recv().await {
            tokio::spawn(async move {
                while let Ok(Some(m)) = read_message(&mut s.recv, limits::MAX_FRAME).await {
                    if write_message(&mut s.send, &m).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    tokio::spawn(async move {
        while let Some(mut s) = sink.recv().await {
            tokio::spawn(async move {
                let mut n = 0u64;
                while let Ok(Some(_)) = read_message(&mut s.recv, limits::MAX_FRAME).await {
                    n += 1;
                }
                let _ = write_message(&mut s.send, &Message::HeartbeatAck { seq: n }).await;
                let _ = s.send.finish();
            });
        }
    });
    let conn = a.connect(b.local_addr()?).await?;
    Ok((a, conn))
}

async fn quic_rtt(conn: &PeerConn, msg: &Message, rounds: usize) -> Result<f64> {
    let (mut s, mut r) = conn.open(stream_kind::ECHO).await?;
    let mut times = Vec::new();
    for i in 0..rounds + 2 {
        let t = Instant::now();
        write_message(&mut s, msg).await?;
        expect_message(&mut r, limits::MAX_FRAME).await?;
        if i >= 2 {
            times.push(t.elapsed().as_secs_f64() * 1e6);
        }
    }
    Ok(median(&times))
}

async fn quic_throughput(conn: &PeerConn, msg: &Message, count: usize) -> Result<f64> {
    let bytes = encode_frame(msg)?.len();
    let t = Instant::now();
    let (mut s, mut r) = conn.open(SINK).await?;
    for _ in 0..count {
        write_message(&mut s, msg).await?;
    }
    s.finish()?;
    match expect_message(&mut r, 1024).await? {
        Message::HeartbeatAck { seq } if seq as usize == count => {}
        other => bail!("sink answered {other:?}"),
    }
    Ok((bytes * count) as f64 / t.elapsed().as_secs_f64() / 1e6)
}

/// The TCP baseline: the same `[len][tag][body]` frames.
async fn tcp_pair() -> Result<(TcpStream, TcpStream)> {
    let l = TcpListener::bind("127.0.0.1:0").await?;
    let addr = l.local_addr()?;
    // Echo server on one connection, sink on the other.
    tokio::spawn(async move {
        for mode in ["echo", "sink"] {
            let Ok((mut s, _)) = l.accept().await else {
                return;
            };
            let _ = s.set_nodelay(true);
            tokio::spawn(async move {
                let mut n = 0u64;
                loop {
                    let mut len = [0u8; 4];
                    if s.read_exact(&mut len).await.is_err() {
                        break;
                    }
                    let mut body = vec![0u8; u32::from_le_bytes(len) as usize];
                    if s.read_exact(&mut body).await.is_err() {
                        break;
                    }
                    if body.first() == Some(&0xFF) {
                        let _ = s.write_all(&n.to_le_bytes()).await;
                        continue;
                    }
                    n += 1;
                    if mode == "echo" {
                        let _ = s.write_all(&len).await;
                        let _ = s.write_all(&body).await;
                    }
                }
            });
        }
    });
    let e = TcpStream::connect(addr).await?;
    e.set_nodelay(true)?;
    let k = TcpStream::connect(addr).await?;
    k.set_nodelay(true)?;
    Ok((e, k))
}

async fn tcp_rtt(s: &mut TcpStream, bytes: &[u8], rounds: usize) -> Result<f64> {
    let mut times = Vec::new();
    let mut back = vec![0u8; bytes.len()];
    for i in 0..rounds + 2 {
        let t = Instant::now();
        s.write_all(bytes).await?;
        s.read_exact(&mut back).await?;
        if i >= 2 {
            times.push(t.elapsed().as_secs_f64() * 1e6);
        }
    }
    Ok(median(&times))
}

async fn tcp_throughput(s: &mut TcpStream, bytes: &[u8], count: usize) -> Result<f64> {
    let t = Instant::now();
    for _ in 0..count {
        s.write_all(bytes).await?;
    }
    s.write_all(&[1, 0, 0, 0, 0xFF]).await?;
    // The sink's answer (a frame count) marks the end; only the time matters.
    let mut n = [0u8; 8];
    s.read_exact(&mut n).await?;
    Ok((bytes.len() * count) as f64 / t.elapsed().as_secs_f64() / 1e6)
}

/// Median time for 3 `hearth up` processes in 3 namespaces to reach a full
/// view, over mDNS (`mdns`) or with static peers and mDNS off.
fn formation(runs: usize, mdns: bool) -> Result<Option<Vec<f64>>> {
    use hearth_test_utils::netns::{ChildGuard, Lan, unavailable};
    if runs == 0 {
        return Ok(None);
    }
    if let Some(why) = unavailable() {
        eprintln!("skipping mDNS formation: {why}");
        return Ok(None);
    }
    let bin = std::env::current_exe()?
        .parent()
        .context("exe dir")?
        .join("hearth");
    if !bin.exists() {
        bail!(
            "{} missing: run `cargo build --release -p hearth-cli` first",
            bin.display()
        );
    }
    let bin = bin.to_string_lossy().into_owned();
    let mut times = Vec::new();
    for _ in 0..runs {
        let lan = Lan::new(3)?;
        let dir = tempfile_dir()?;
        let token = ClusterSecret::generate().token();
        let t = Instant::now();
        let _nodes: Vec<ChildGuard> = (0..3)
            .map(|i| {
                let mut c = lan.command(i, &bin);
                c.args(["up", "--name", &format!("h{i}"), "--join", &token]);
                if !mdns {
                    c.arg("--no-mdns");
                    for j in (0..3).filter(|&j| j != i) {
                        c.args(["--peer", &format!("{}:7410", lan.ip(j))]);
                    }
                }
                c.args([
                    "--quic",
                    "0.0.0.0:7410",
                    "--http",
                    "127.0.0.1:7411",
                    "--home",
                ])
                .arg(dir.join(format!("h{i}")))
                .stdout(Stdio::null())
                .stderr(Stdio::null());
                ChildGuard::spawn(c)
            })
            .collect::<Result<_>>()?;
        loop {
            let full = (0..3).all(|i| {
                lan.command(i, &bin)
                    .args(["status", "--json", "--http", "127.0.0.1:7411"])
                    .output()
                    .ok()
                    .and_then(|o| {
                        serde_json::from_slice::<hearth_runtime::ClusterView>(&o.stdout).ok()
                    })
                    .is_some_and(|v| v.members.len() == 3)
            });
            if full {
                times.push(t.elapsed().as_secs_f64() * 1e3);
                break;
            }
            if t.elapsed() > Duration::from_secs(30) {
                bail!("no full view in 30 s");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
    Ok(Some(times))
}

fn tempfile_dir() -> Result<PathBuf> {
    let d = std::env::temp_dir().join(format!("hearth-bench-{}", std::process::id()));
    std::fs::create_dir_all(&d)?;
    Ok(d)
}

fn main() -> Result<()> {
    let args = Args::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let sizes = [4 << 10, 64 << 10, 1 << 20, 16 << 20];
    let mut rows = Vec::new();
    let mut table = Vec::new();
    rt.block_on(async {
        let (_a, conn) = quic_pair().await?;
        let (mut tcp_echo, mut tcp_sink) = tcp_pair().await?;
        for &size in &sizes {
            let msg = frame(size)?;
            let bytes = encode_frame(&msg)?;
            let label = if size >= 1 << 20 {
                format!("{} MiB", size >> 20)
            } else {
                format!("{} KiB", size >> 10)
            };
            let rounds = if size >= 16 << 20 { args.rounds.min(10) } else { args.rounds };
            let count = (args.volume / size).max(4);
            let q_rtt = quic_rtt(&conn, &msg, rounds).await?;
            let t_rtt = tcp_rtt(&mut tcp_echo, &bytes, rounds).await?;
            let q_tp = quic_throughput(&conn, &msg, count).await?;
            let t_tp = tcp_throughput(&mut tcp_sink, &bytes, count).await?;
            println!(
                "{label:>7}: RTT QUIC {q_rtt:9.1} us  TCP {t_rtt:9.1} us   throughput QUIC {q_tp:8.1} MB/s  TCP {t_tp:8.1} MB/s"
            );
            rows.push(Row::new(&format!("round trip {label} (us, lower is better)"), q_rtt, t_rtt));
            rows.push(Row::new(&format!("throughput {label} (MB/s)"), q_tp, t_tp));
            table.push(serde_json::json!({"size": size, "quic_rtt_us": q_rtt, "tcp_rtt_us": t_rtt, "quic_mb_s": q_tp, "tcp_mb_s": t_tp}));
        }
        anyhow::Ok(())
    })?;
    let mut meta = serde_json::json!({
        "cpu": cpu_name(),
        "threads": std::thread::available_parallelism().map_or(1, |n| n.get()),
        "rounds": args.rounds,
        "volume_bytes": args.volume,
        "transport": "hearth-net (quinn, TLS 1.3, authenticated) vs tokio TCP, loopback",
        "sizes": table,
    });
    if let (Some(m), Some(st)) = (
        formation(args.mdns_runs, true)?,
        formation(args.mdns_runs, false)?,
    ) {
        let (mm, sm) = (median(&m), median(&st));
        println!(
            "full view, 3 namespaces: mDNS {mm:.0} ms, static peers {sm:.0} ms (medians of {m:?} / {st:?})"
        );
        meta["formation_mdns_ms"] = serde_json::json!(m);
        meta["formation_static_ms"] = serde_json::json!(st);
        rows.push(Row::new(
            "cluster formation, 3 namespaces, process start to full view (ms; reference: static --peer)",
            mm,
            sm,
        ));
    }
    let md = write_results(
        &args.out,
        "transport",
        "Transport: tensor frames over authenticated QUIC vs raw TCP (loopback)",
        "Hearth QUIC",
        "TCP",
        &rows,
        meta,
    )?;
    println!("\n{md}");
    Ok(())
}
