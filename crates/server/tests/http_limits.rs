//! Connection limits over real TCP: clients that open connections and send
//! half a request, or sit idle after one, are closed once the header
//! timeout passes, and a normal client is served meanwhile.

use std::time::{Duration, Instant};

use hearth_net::{ClusterSecret, Identity};
use hearth_runtime::{Node, NodeConfig};
use hearth_server::{App, HttpLimits, Listener, ServerOptions};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

async fn node() -> Node {
    let mut cfg = NodeConfig::new(
        "solo",
        Identity::generate().unwrap(),
        ClusterSecret::generate(),
    );
    cfg.quic = "127.0.0.1:0".parse().unwrap();
    Node::start(cfg).await.unwrap()
}

/// A node's app served over real TCP on loopback with `limits`: the node,
/// its data folder, the address, the switch that stops the server and the
/// server's task.
async fn serving(
    limits: HttpLimits,
) -> (
    Node,
    tempfile::TempDir,
    std::net::SocketAddr,
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<Result<(), hearth_server::ServerError>>,
) {
    let node = node().await;
    let dir = tempfile::tempdir().unwrap();
    let app = App::new(
        node.clone(),
        ServerOptions {
            data_dir: dir.path().to_path_buf(),
            limits,
            ..Default::default()
        },
    );
    let listener = Listener::bind("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(listener.serve(app, async {
        let _ = stopped.await;
    }));
    (node, dir, addr, stop, server)
}

/// Reads until the peer closes (EOF or reset) or `deadline` passes;
/// returns whether it closed, and what it sent.
async fn closed_by(s: &mut TcpStream, deadline: Instant) -> (bool, Vec<u8>) {
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return (true, got),
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
            Err(_) => return (false, got),
        }
    }
}

/// One whole request on a fresh connection: the status line.
async fn health(addr: std::net::SocketAddr) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.unwrap();
    String::from_utf8_lossy(&out)
        .lines()
        .next()
        .unwrap_or("")
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_and_idle_clients_are_closed_and_others_are_served() {
    let timeout = Duration::from_secs(3);
    let (node, _dir, addr, stop, server) = serving(HttpLimits {
        header_timeout: timeout,
        max_connections: 4096,
    })
    .await;

    // 2000 connections that each send one header line and stop.
    let started = Instant::now();
    let mut slow = Vec::with_capacity(2000);
    for _ in 0..2000 {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET /health HTTP/1.1\r\n").await.unwrap();
        slow.push(s);
    }
    // One that finished a request and then sits idle, keeping the
    // connection alive.
    let mut idle = TcpStream::connect(addr).await.unwrap();
    idle.write_all(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 512];
    let n = idle.read(&mut buf).await.unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    let idle_since = Instant::now();

    // A normal client is served meanwhile.
    assert!(health(addr).await.starts_with("HTTP/1.1 200"));

    // Every slow connection is closed once the timeout passes (a second
    // of slack for 2000 sockets), none before it.
    let margin = Duration::from_secs(2);
    let early = started + timeout - Duration::from_millis(500);
    let (closed_early, _) = closed_by(&mut slow[0], early).await;
    assert!(!closed_early, "closed before the header timeout");
    let deadline = Instant::now().max(started + timeout) + margin + Duration::from_secs(1);
    let mut open = 0;
    for s in &mut slow {
        if !closed_by(s, deadline).await.0 {
            open += 1;
        }
    }
    assert_eq!(open, 0, "{open} of 2000 slow connections still open");
    let (closed, _) = closed_by(&mut idle, idle_since + timeout + margin).await;
    assert!(closed, "the idle connection is still open");
    // And the server still serves.
    assert!(health(addr).await.starts_with("HTTP/1.1 200"));

    let _ = stop.send(());
    tokio::time::timeout(Duration::from_secs(10), server)
        .await
        .expect("the server stops")
        .unwrap()
        .unwrap();
    node.shutdown().await;
}

#[tokio::test]
async fn connections_past_the_cap_are_closed_and_slots_come_back() {
    let (node, _dir, addr, stop, server) = serving(HttpLimits {
        header_timeout: Duration::from_secs(60),
        max_connections: 4,
    })
    .await;
    let mut held = Vec::new();
    for _ in 0..4 {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET /health HTTP/1.1\r\n").await.unwrap();
        held.push(s);
    }
    // Let the server take all four before the fifth arrives.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut fifth = TcpStream::connect(addr).await.unwrap();
    let (closed, got) = closed_by(&mut fifth, Instant::now() + Duration::from_secs(5)).await;
    assert!(closed && got.is_empty(), "the fifth connection was served");
    // Closing the held ones frees their slots.
    drop(held);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(health(addr).await.starts_with("HTTP/1.1 200"));
    let _ = stop.send(());
    let _ = tokio::time::timeout(Duration::from_secs(10), server).await;
    node.shutdown().await;
}
