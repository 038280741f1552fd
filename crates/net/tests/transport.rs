//! The transport over real QUIC on loopback: authenticated connections,
//! stream routing, refusal of every kind of bad peer, duplicate dials,
//! graceful shutdown.

use std::net::SocketAddr;
use std::time::Duration;

use hearth_net::framed::{expect_message, read_message, write_message};
use hearth_net::{
    ClusterSecret, Endpoint, EndpointConfig, Identity, NetError, NetEvent, StreamReceivers, auth,
    close_code, stream_code, tls,
};
use hearth_proto::{Hello, Message, PROTOCOL_VERSION, TensorFrame, WireDType, limits, stream_kind};
use quinn::{ConnectionError, VarInt};

const T: Duration = Duration::from_secs(10);

async fn within<F: std::future::Future>(f: F) -> F::Output {
    tokio::time::timeout(T, f).await.expect("timed out")
}

fn node(name: &str, secret: &ClusterSecret) -> (Endpoint, StreamReceivers) {
    Endpoint::bind(
        EndpointConfig {
            identity: Identity::generate().unwrap(),
            secret: secret.clone(),
            name: name.into(),
            bind: "127.0.0.1:0".parse().unwrap(),
        },
        &[stream_kind::ECHO],
    )
    .unwrap()
}

/// Echoes every message of every ECHO stream.
fn serve_echo(mut rx: StreamReceivers) {
    let mut rx = rx.remove(&stream_kind::ECHO).unwrap();
    tokio::spawn(async move {
        while let Some(mut s) = rx.recv().await {
            tokio::spawn(async move {
                while let Ok(Some(m)) = read_message(&mut s.recv, limits::MAX_FRAME).await {
                    if write_message(&mut s.send, &m).await.is_err() {
                        break;
                    }
                }
                let _ = s.send.finish();
            });
        }
    });
}

fn addr(e: &Endpoint) -> SocketAddr {
    e.local_addr().unwrap()
}

#[tokio::test]
async fn authenticated_peers_exchange_tensors_and_see_each_other() {
    let secret = ClusterSecret::generate();
    let (a, _ra) = node("a", &secret);
    let (b, rb) = node("b", &secret);
    serve_echo(rb);
    let mut b_events = b.events();
    let conn = within(a.connect(addr(&b))).await.unwrap();
    assert_eq!(conn.info().node_id, b.id());
    assert_eq!(conn.info().name, "b");
    assert_eq!(conn.info().addr, addr(&b));
    match within(b_events.recv()).await.unwrap() {
        NetEvent::PeerUp(p) => {
            assert_eq!(p.node_id, a.id());
            assert_eq!(p.name, "a");
            assert_eq!(p.addr, addr(&a), "listening address from the hello");
        }
        other => panic!("{other:?}"),
    }
    let (mut send, mut recv) = within(conn.open(stream_kind::ECHO)).await.unwrap();
    let vals: Vec<f32> = (0..1000).map(|i| i as f32 * 0.5).collect();
    let t = TensorFrame::from_f32(3, 4, vec![10, 100], &vals, WireDType::F32).unwrap();
    within(write_message(&mut send, &Message::Tensor(t.clone())))
        .await
        .unwrap();
    let back = within(expect_message(&mut recv, limits::MAX_FRAME))
        .await
        .unwrap();
    assert_eq!(back, Message::Tensor(t));
    // Connecting again returns the pooled connection.
    let again = within(a.connect(addr(&b))).await.unwrap();
    assert_eq!(a.peers().len(), 1);
    assert_eq!(again.info().node_id, b.id());
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test]
async fn wrong_token_is_refused_on_both_sides() {
    let (a, _ra) = node("a", &ClusterSecret::generate());
    let (b, _rb) = node("b", &ClusterSecret::generate());
    let mut b_events = b.events();
    let err = within(a.connect(addr(&b))).await.unwrap_err();
    assert!(matches!(err, NetError::AuthFailed(_)), "{err}");
    match within(b_events.recv()).await.unwrap() {
        NetEvent::Rejected { reason, .. } => assert!(reason.contains("authentication"), "{reason}"),
        other => panic!("{other:?}"),
    }
    assert!(a.peers().is_empty());
    assert!(b.peers().is_empty());
}

/// A hand-driven client: real QUIC + TLS with its own certificate, but it
/// speaks the handshake as the test decides.
struct RawClient {
    identity: Identity,
    endpoint: quinn::Endpoint,
}

impl RawClient {
    fn new(identity: Identity) -> Self {
        let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        endpoint.set_default_client_config(tls::client_config(&identity).unwrap());
        Self { identity, endpoint }
    }

    async fn connect(&self, to: SocketAddr) -> quinn::Connection {
        within(self.endpoint.connect(to, tls::SERVER_NAME).unwrap())
            .await
            .unwrap()
    }

    fn hello(&self) -> Message {
        Message::Hello(Hello {
            version: PROTOCOL_VERSION,
            node_id: self.identity.id().0,
            name: "raw".into(),
            quic_port: 1,
        })
    }
}

async fn close_code_of(conn: &quinn::Connection) -> u64 {
    match within(conn.closed()).await {
        ConnectionError::ApplicationClosed(c) => c.error_code.into_inner(),
        other => panic!("closed without an application code: {other}"),
    }
}

#[tokio::test]
async fn replayed_proof_is_rejected() {
    let secret = ClusterSecret::generate();
    let (b, _rb) = node("b", &secret);
    let raw = RawClient::new(Identity::generate().unwrap());
    // Connection 1: an honest handshake; record the proof it sent.
    let c1 = raw.connect(addr(&b)).await;
    let ekm1 = auth::keying_material(&c1).unwrap();
    let (mut s1, mut r1) = within(c1.open_bi()).await.unwrap();
    within(write_message(&mut s1, &raw.hello())).await.unwrap();
    within(write_message(
        &mut s1,
        &Message::AuthChallenge { nonce: [1; 32] },
    ))
    .await
    .unwrap();
    let Message::AuthChallenge { nonce } = within(expect_message(&mut r1, 4096)).await.unwrap()
    else {
        panic!("no challenge")
    };
    let mac = auth::proof(
        &secret,
        auth::Role::Dialer,
        &ekm1,
        &nonce,
        raw.identity.id(),
        b.id(),
    );
    within(write_message(&mut s1, &Message::AuthProof { mac }))
        .await
        .unwrap();
    assert!(matches!(
        within(expect_message(&mut r1, 4096)).await.unwrap(),
        Message::Hello(_)
    ));
    // Connection 2: same identity, replays connection 1's proof.
    let c2 = raw.connect(addr(&b)).await;
    let (mut s2, mut r2) = within(c2.open_bi()).await.unwrap();
    within(write_message(&mut s2, &raw.hello())).await.unwrap();
    within(write_message(
        &mut s2,
        &Message::AuthChallenge { nonce: [1; 32] },
    ))
    .await
    .unwrap();
    let _ = within(expect_message(&mut r2, 4096)).await.unwrap();
    within(write_message(&mut s2, &Message::AuthProof { mac }))
        .await
        .unwrap();
    assert!(within(read_message(&mut r2, 4096)).await.is_err());
    assert_eq!(close_code_of(&c2).await, u64::from(close_code::AUTH_FAILED));
}

#[tokio::test]
async fn tls_client_without_the_token_gets_no_data() {
    let secret = ClusterSecret::generate();
    let (b, rb) = node("b", &secret);
    serve_echo(rb);
    let raw = RawClient::new(Identity::generate().unwrap());
    let c = raw.connect(addr(&b)).await;
    let (mut s, mut r) = within(c.open_bi()).await.unwrap();
    within(write_message(&mut s, &raw.hello())).await.unwrap();
    within(write_message(
        &mut s,
        &Message::AuthChallenge { nonce: [2; 32] },
    ))
    .await
    .unwrap();
    // Try to reach a handler before authenticating.
    let (mut es, mut er) = within(c.open_bi()).await.unwrap();
    within(write_message(
        &mut es,
        &Message::Open {
            kind: stream_kind::ECHO,
        },
    ))
    .await
    .unwrap();
    let t = TensorFrame::from_f32(0, 0, vec![1], &[1.0], WireDType::F32).unwrap();
    within(write_message(&mut es, &Message::Tensor(t)))
        .await
        .unwrap();
    // All the acceptor says before a proof is a random challenge.
    assert!(matches!(
        within(expect_message(&mut r, 4096)).await.unwrap(),
        Message::AuthChallenge { .. }
    ));
    within(write_message(&mut s, &Message::AuthProof { mac: [0; 32] }))
        .await
        .unwrap();
    assert_eq!(close_code_of(&c).await, u64::from(close_code::AUTH_FAILED));
    let mut buf = [0u8; 64];
    assert!(
        !matches!(er.read(&mut buf).await, Ok(Some(n)) if n > 0),
        "the echo handler answered an unauthenticated peer"
    );
    assert!(b.peers().is_empty());

    // A client that never proves anything is dropped after the timeout.
    let c = raw.connect(addr(&b)).await;
    let (mut s, _r) = within(c.open_bi()).await.unwrap();
    within(write_message(&mut s, &raw.hello())).await.unwrap();
    assert_eq!(
        close_code_of(&c).await,
        u64::from(close_code::PROTOCOL_ERROR)
    );
}

#[tokio::test]
async fn wrong_alpn_fails_tls() {
    let (b, _rb) = node("b", &ClusterSecret::generate());
    let id = Identity::generate().unwrap();
    let mut ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    ep.set_default_client_config(tls::client_config_with_alpn(&id, b"h3").unwrap());
    let r = within(ep.connect(addr(&b), tls::SERVER_NAME).unwrap()).await;
    assert!(r.is_err());
}

#[tokio::test]
async fn bad_hellos_are_refused_with_their_codes() {
    let secret = ClusterSecret::generate();
    let (b, _rb) = node("b", &secret);
    let raw = RawClient::new(Identity::generate().unwrap());
    let cases: Vec<(Vec<u8>, u32)> = vec![
        // Another protocol version.
        (
            hearth_proto::encode_frame(&Message::Hello(Hello {
                version: 99,
                node_id: raw.identity.id().0,
                name: "x".into(),
                quic_port: 1,
            }))
            .unwrap(),
            close_code::VERSION_MISMATCH,
        ),
        // An id that is not the certificate's.
        (
            hearth_proto::encode_frame(&Message::Hello(Hello {
                version: PROTOCOL_VERSION,
                node_id: [9; 32],
                name: "x".into(),
                quic_port: 1,
            }))
            .unwrap(),
            close_code::IDENTITY,
        ),
        // The acceptor's own id.
        (
            hearth_proto::encode_frame(&Message::Hello(Hello {
                version: PROTOCOL_VERSION,
                node_id: b.id().0,
                name: "x".into(),
                quic_port: 1,
            }))
            .unwrap(),
            close_code::IDENTITY,
        ),
        // Garbage, an unknown tag, an oversize prefix, the wrong message.
        (
            vec![0xde, 0xad, 0xbe, 0xef, 0x00],
            close_code::PROTOCOL_ERROR,
        ),
        (vec![1, 0, 0, 0, 0x7f], close_code::PROTOCOL_ERROR),
        (
            (u32::MAX).to_le_bytes().to_vec(),
            close_code::PROTOCOL_ERROR,
        ),
        (
            hearth_proto::encode_frame(&Message::AuthOk).unwrap(),
            close_code::PROTOCOL_ERROR,
        ),
    ];
    for (bytes, code) in cases {
        let c = raw.connect(addr(&b)).await;
        let (mut s, _r) = within(c.open_bi()).await.unwrap();
        within(s.write_all(&bytes)).await.unwrap();
        let _ = s.finish();
        assert_eq!(close_code_of(&c).await, u64::from(code), "{bytes:?}");
    }
    assert!(b.peers().is_empty());
    // The endpoint still serves honest peers afterwards.
    let (a, _ra) = node("a", &secret);
    within(a.connect(addr(&b))).await.unwrap();
}

#[tokio::test]
async fn simultaneous_dials_settle_on_one_connection() {
    let secret = ClusterSecret::generate();
    let (a, ra) = node("a", &secret);
    let (b, rb) = node("b", &secret);
    serve_echo(ra);
    serve_echo(rb);
    let (x, y) = tokio::join!(within(a.connect(addr(&b))), within(b.connect(addr(&a))));
    x.unwrap();
    y.unwrap();
    // Give the losing connection's close time to arrive.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(a.peers().len(), 1);
    assert_eq!(b.peers().len(), 1);
    let pa = a.peer(b.id()).unwrap();
    let pb = b.peer(a.id()).unwrap();
    let (mut s, mut r) = within(pa.open(stream_kind::ECHO)).await.unwrap();
    within(write_message(&mut s, &Message::Heartbeat { seq: 1 }))
        .await
        .unwrap();
    assert_eq!(
        within(expect_message(&mut r, 4096)).await.unwrap(),
        Message::Heartbeat { seq: 1 }
    );
    // Both sides kept the same connection: its TLS exports agree.
    assert_eq!(
        auth::keying_material(pa.connection()).unwrap(),
        auth::keying_material(pb.connection()).unwrap()
    );
}

#[tokio::test]
async fn unknown_stream_kind_is_reset_and_shutdown_is_announced() {
    let secret = ClusterSecret::generate();
    let (a, _ra) = node("a", &secret);
    let (b, _rb) = node("b", &secret);
    let conn = within(a.connect(addr(&b))).await.unwrap();
    let (mut s, mut r) = within(conn.open(999)).await.unwrap();
    within(write_message(&mut s, &Message::Heartbeat { seq: 1 }))
        .await
        .unwrap();
    match within(r.read_to_end(100)).await {
        Err(quinn::ReadToEndError::Read(quinn::ReadError::Reset(code))) => {
            assert_eq!(code, VarInt::from_u32(stream_code::UNKNOWN_KIND))
        }
        other => panic!("{other:?}"),
    }
    let mut a_events = a.events();
    b.shutdown().await;
    loop {
        match within(a_events.recv()).await.unwrap() {
            NetEvent::PeerDown { node_id, reason } => {
                assert_eq!(node_id, b.id());
                assert!(reason.contains("shut down"), "{reason}");
                break;
            }
            _ => continue,
        }
    }
    assert!(a.peers().is_empty());
    assert!(matches!(b.connect(addr(&a)).await, Err(NetError::Shutdown)));
}

/// A peer that starts a frame (its prefix claims 1 MiB) and then stops
/// sending does not hold the reader: the read fails once the frame's
/// deadline passes, and what arrived is all that was buffered.
#[tokio::test]
async fn a_frame_that_stops_midway_times_out() {
    let secret = ClusterSecret::generate();
    let (a, _ra) = node("a", &secret);
    let (b, mut rb) = node("b", &secret);
    let mut echo = rb.remove(&stream_kind::ECHO).unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        if let Some(mut s) = echo.recv().await {
            let started = std::time::Instant::now();
            let r = hearth_net::framed::read_message_within(
                &mut s.recv,
                1 << 20,
                Duration::from_millis(500),
            )
            .await;
            let _ = tx.send((r, started.elapsed()));
        }
    });
    let conn = within(a.connect(addr(&b))).await.unwrap();
    let (mut send, _recv) = within(conn.open(stream_kind::ECHO)).await.unwrap();
    let mut partial = ((1u32 << 20) - 8).to_le_bytes().to_vec();
    partial.extend_from_slice(&[0x06; 100]);
    send.write_all(&partial).await.unwrap();
    // Never finished: the stream stays open, silent.
    let (r, took) = tokio::time::timeout(Duration::from_secs(20), rx)
        .await
        .expect("the read never gave up")
        .unwrap();
    assert!(
        matches!(r, Err(NetError::Read(ref m)) if m.contains("not whole")),
        "{r:?}"
    );
    // 0.5 s + 4 s for the 1 MiB this read accepts.
    assert!(took < Duration::from_secs(10), "{took:?}");
    a.shutdown().await;
    b.shutdown().await;
}
