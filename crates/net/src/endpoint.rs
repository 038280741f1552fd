//! The node's QUIC endpoint: dialing and accepting authenticated
//! connections, the pool (one connection per peer), routing incoming streams
//! to handlers by kind, and graceful shutdown.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hearth_proto::{Message, NodeId, limits};
use quinn::{Connection, ConnectionError, RecvStream, SendStream, VarInt};
use tokio::sync::{broadcast, mpsc, watch};
use tracing::{Instrument, debug, info, info_span, warn};

use crate::auth::{self, HANDSHAKE_TIMEOUT, LocalInfo};
use crate::framed::{read_message, write_message};
use crate::{ClusterSecret, Identity, NetError, close_code, stream_code, tls};

/// Socket buffers for bulk tensors; smaller ones dropped packets when tried.
pub const SOCKET_BUFFER: usize = 4 * 1024 * 1024;

/// Longest time to establish QUIC + TLS with a peer.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// How to start an endpoint.
#[derive(Debug, Clone)]
pub struct EndpointConfig {
    pub identity: Identity,
    pub secret: ClusterSecret,
    /// Human-readable node name, sent in the hello.
    pub name: String,
    /// UDP address to listen on (port 0 picks one).
    pub bind: SocketAddr,
}

/// An authenticated peer as it described itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerInfo {
    pub node_id: NodeId,
    pub name: String,
    /// Where the peer's endpoint listens (its address as seen from here,
    /// with the QUIC port from its hello).
    pub addr: SocketAddr,
    pub version: u16,
}

/// An authenticated connection to a peer; cheap to clone.
#[derive(Debug, Clone)]
pub struct PeerConn {
    info: Arc<PeerInfo>,
    conn: Connection,
    dialer: NodeId,
}

impl PeerConn {
    pub fn info(&self) -> &PeerInfo {
        &self.info
    }

    /// Opens a bidirectional stream for the handler of `kind` on the peer.
    pub async fn open(&self, kind: u16) -> Result<(SendStream, RecvStream), NetError> {
        let (mut send, recv) = self.conn.open_bi().await?;
        write_message(&mut send, &Message::Open { kind }).await?;
        Ok((send, recv))
    }

    /// QUIC's current round-trip estimate.
    pub fn rtt(&self) -> Duration {
        self.conn.rtt()
    }

    /// Closes the connection with an application code.
    pub fn close(&self, code: u32, reason: &str) {
        self.conn.close(VarInt::from_u32(code), reason.as_bytes());
    }

    /// Whether the connection is still open.
    pub fn is_alive(&self) -> bool {
        self.conn.close_reason().is_none()
    }

    /// The underlying quinn connection.
    pub fn connection(&self) -> &Connection {
        &self.conn
    }
}

/// A stream a peer opened for one of our handlers.
#[derive(Debug)]
pub struct IncomingStream {
    pub peer: Arc<PeerInfo>,
    pub send: SendStream,
    pub recv: RecvStream,
}

/// What happens to peers.
#[derive(Debug, Clone)]
pub enum NetEvent {
    /// A peer authenticated and its connection entered the pool.
    PeerUp(PeerInfo),
    /// The last connection to a peer closed.
    PeerDown { node_id: NodeId, reason: String },
    /// A connection failed the handshake (wrong token, version, identity).
    Rejected { addr: SocketAddr, reason: String },
}

/// Channels of incoming streams, one per registered kind.
pub type StreamReceivers = HashMap<u16, mpsc::Receiver<IncomingStream>>;

struct Inner {
    quic: quinn::Endpoint,
    identity: Identity,
    secret: ClusterSecret,
    local: LocalInfo,
    client: quinn::ClientConfig,
    handlers: HashMap<u16, mpsc::Sender<IncomingStream>>,
    pool: Mutex<HashMap<NodeId, PeerConn>>,
    events: broadcast::Sender<NetEvent>,
    shutdown: watch::Sender<bool>,
}

/// A node's endpoint; a cheap handle.
#[derive(Clone)]
pub struct Endpoint {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Endpoint")
            .field("id", &self.inner.identity.id())
            .field("addr", &self.local_addr().ok())
            .finish()
    }
}

fn udp_socket(bind: SocketAddr) -> Result<std::net::UdpSocket, NetError> {
    use socket2::{Domain, Protocol, Socket, Type};
    let io = |e| NetError::io(format!("UDP socket {bind}"), e);
    let s = Socket::new(Domain::for_address(bind), Type::DGRAM, Some(Protocol::UDP)).map_err(io)?;
    // Best effort: the kernel caps these at net.core.{r,w}mem_max.
    let _ = s.set_recv_buffer_size(SOCKET_BUFFER);
    let _ = s.set_send_buffer_size(SOCKET_BUFFER);
    if let (Ok(r), Ok(w)) = (s.recv_buffer_size(), s.send_buffer_size()) {
        debug!(recv = r, send = w, "UDP socket buffers");
        if r < SOCKET_BUFFER / 2 {
            debug!(
                "receive buffer capped at {r} bytes; raise net.core.rmem_max for bulk transfers"
            );
        }
    }
    s.bind(&bind.into()).map_err(io)?;
    s.set_nonblocking(true).map_err(io)?;
    Ok(s.into())
}

impl Endpoint {
    /// Binds the endpoint and starts accepting. Streams of each kind in
    /// `kinds` are delivered on the returned receivers; other kinds are
    /// refused with [`stream_code::UNKNOWN_KIND`].
    pub fn bind(cfg: EndpointConfig, kinds: &[u16]) -> Result<(Self, StreamReceivers), NetError> {
        let server = tls::server_config(&cfg.identity)?;
        let client = tls::client_config(&cfg.identity)?;
        let socket = udp_socket(cfg.bind)?;
        let quic = quinn::Endpoint::new(
            quinn::EndpointConfig::default(),
            Some(server),
            socket,
            Arc::new(quinn::TokioRuntime),
        )
        .map_err(|e| NetError::io(format!("QUIC endpoint on {}", cfg.bind), e))?;
        let port = quic
            .local_addr()
            .map_err(|e| NetError::io("local address", e))?
            .port();
        let mut handlers = HashMap::new();
        let mut receivers = HashMap::new();
        for &k in kinds {
            let (tx, rx) = mpsc::channel(64);
            handlers.insert(k, tx);
            receivers.insert(k, rx);
        }
        let inner = Arc::new(Inner {
            quic,
            identity: cfg.identity,
            secret: cfg.secret,
            local: LocalInfo {
                name: cfg.name,
                quic_port: port,
            },
            client,
            handlers,
            pool: Mutex::new(HashMap::new()),
            events: broadcast::channel(256).0,
            shutdown: watch::channel(false).0,
        });
        let me = Self { inner };
        let span = info_span!("endpoint", node = %me.id().short());
        tokio::spawn(me.clone().accept_loop().instrument(span));
        Ok((me, receivers))
    }

    /// This node's id.
    pub fn id(&self) -> NodeId {
        self.inner.identity.id()
    }

    /// This node's name.
    pub fn name(&self) -> &str {
        &self.inner.local.name
    }

    /// The cluster this endpoint authenticates into.
    pub fn secret(&self) -> &ClusterSecret {
        &self.inner.secret
    }

    /// The bound UDP address.
    pub fn local_addr(&self) -> Result<SocketAddr, NetError> {
        self.inner
            .quic
            .local_addr()
            .map_err(|e| NetError::io("local address", e))
    }

    /// Peer events from now on.
    pub fn events(&self) -> broadcast::Receiver<NetEvent> {
        self.inner.events.subscribe()
    }

    /// The pooled connection to `id`, if it is open.
    pub fn peer(&self, id: NodeId) -> Option<PeerConn> {
        let pool = self.inner.pool.lock().ok()?;
        pool.get(&id).filter(|c| c.is_alive()).cloned()
    }

    /// All open pooled connections.
    pub fn peers(&self) -> Vec<PeerConn> {
        match self.inner.pool.lock() {
            Ok(pool) => pool.values().filter(|c| c.is_alive()).cloned().collect(),
            Err(_) => Vec::new(),
        }
    }

    fn is_shut_down(&self) -> bool {
        *self.inner.shutdown.borrow()
    }

    /// Dials `addr`, authenticates, and pools the connection. If a
    /// connection to that peer already exists the pool's choice is returned.
    pub async fn connect(&self, addr: SocketAddr) -> Result<PeerConn, NetError> {
        if self.is_shut_down() {
            return Err(NetError::Shutdown);
        }
        if let Some(c) = self.peers().into_iter().find(|c| c.info.addr == addr) {
            return Ok(c);
        }
        let err = |detail: String| NetError::Connect {
            addr: addr.to_string(),
            detail,
        };
        let connecting = self
            .inner
            .quic
            .connect_with(self.inner.client.clone(), addr, tls::SERVER_NAME)
            .map_err(|e| err(e.to_string()))?;
        let conn = tokio::time::timeout(CONNECT_TIMEOUT, connecting)
            .await
            .map_err(|_| err("timed out".into()))?
            .map_err(|e| err(e.to_string()))?;
        let inner = &self.inner;
        let result = tokio::time::timeout(
            HANDSHAKE_TIMEOUT,
            auth::dial(&conn, &inner.identity, &inner.secret, &inner.local),
        )
        .await
        .unwrap_or(Err(NetError::Timeout("cluster authentication")));
        match result {
            Ok(info) => {
                debug!(peer = %info.node_id.short(), %addr, "dialed");
                Ok(self.register(conn, info, self.id()))
            }
            Err(e) => {
                // Lost a race with a connection the peer dialed: use that.
                if let Some(c) = auth::peer_cert_id(&conn).ok().and_then(|id| self.peer(id)) {
                    return Ok(c);
                }
                let e = refused_by_peer(&conn).unwrap_or(e);
                conn.close(
                    VarInt::from_u32(auth::close_code_for(&e)),
                    e.to_string().as_bytes(),
                );
                let _ = self.inner.events.send(NetEvent::Rejected {
                    addr,
                    reason: e.to_string(),
                });
                Err(e)
            }
        }
    }

    /// Closes every connection and the endpoint, telling peers this node
    /// is leaving, and waits (briefly) for the close to be sent.
    pub async fn shutdown(&self) {
        self.inner.shutdown.send_replace(true);
        let conns: Vec<PeerConn> = match self.inner.pool.lock() {
            Ok(mut pool) => pool.drain().map(|(_, c)| c).collect(),
            Err(_) => Vec::new(),
        };
        for c in conns {
            c.close(close_code::SHUTDOWN, "node shutting down");
            let _ = self.inner.events.send(NetEvent::PeerDown {
                node_id: c.info.node_id,
                reason: "this node shut down".into(),
            });
        }
        self.inner.quic.close(
            VarInt::from_u32(close_code::SHUTDOWN),
            b"node shutting down",
        );
        let _ = tokio::time::timeout(Duration::from_secs(2), self.inner.quic.wait_idle()).await;
    }

    async fn accept_loop(self) {
        let mut stop = self.inner.shutdown.subscribe();
        loop {
            let incoming = tokio::select! {
                i = self.inner.quic.accept() => i,
                _ = stop.wait_for(|s| *s) => None,
            };
            let Some(incoming) = incoming else { break };
            let me = self.clone();
            let remote = incoming.remote_address();
            tokio::spawn(
                async move { me.accept_one(incoming).await }
                    .instrument(info_span!("accept", %remote)),
            );
        }
    }

    async fn accept_one(self, incoming: quinn::Incoming) {
        let remote = incoming.remote_address();
        let conn = match tokio::time::timeout(CONNECT_TIMEOUT, incoming).await {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => {
                debug!("TLS handshake failed: {e}");
                let _ = self.inner.events.send(NetEvent::Rejected {
                    addr: remote,
                    reason: format!("TLS handshake failed: {e}"),
                });
                return;
            }
            Err(_) => return,
        };
        let inner = &self.inner;
        let result = tokio::time::timeout(
            HANDSHAKE_TIMEOUT,
            auth::accept(&conn, &inner.identity, &inner.secret, &inner.local),
        )
        .await
        .unwrap_or(Err(NetError::Timeout("cluster authentication")));
        match result {
            Ok(info) => {
                let dialer = info.node_id;
                self.register(conn, info, dialer);
            }
            Err(e) => {
                warn!("rejected peer at {remote}: {e}");
                conn.close(
                    VarInt::from_u32(auth::close_code_for(&e)),
                    e.to_string().as_bytes(),
                );
                let _ = self.inner.events.send(NetEvent::Rejected {
                    addr: remote,
                    reason: e.to_string(),
                });
            }
        }
    }

    /// Puts an authenticated connection in the pool. With two connections
    /// to one peer (both dialed at once), both sides keep the one dialed by
    /// the lower node id, so they agree without talking.
    fn register(&self, conn: Connection, info: PeerInfo, dialer: NodeId) -> PeerConn {
        let peer = info.node_id;
        let new = PeerConn {
            info: Arc::new(info),
            conn,
            dialer,
        };
        let preferred = self.id().min(peer);
        let (kept, up) = {
            let Ok(mut pool) = self.inner.pool.lock() else {
                return new;
            };
            match pool.get(&peer).filter(|c| c.is_alive()).cloned() {
                Some(old) if !(new.dialer == preferred && old.dialer != preferred) => {
                    new.close(close_code::DUPLICATE, "duplicate connection");
                    return old;
                }
                Some(old) => {
                    pool.insert(peer, new.clone());
                    old.close(close_code::DUPLICATE, "duplicate connection");
                    (new, false)
                }
                None => {
                    pool.insert(peer, new.clone());
                    (new, true)
                }
            }
        };
        if *self.inner.shutdown.borrow() {
            kept.close(close_code::SHUTDOWN, "node shutting down");
            return kept;
        }
        if up {
            info!(peer = %peer.short(), name = %kept.info.name, addr = %kept.info.addr, "peer up");
            let _ = self
                .inner
                .events
                .send(NetEvent::PeerUp((*kept.info).clone()));
        }
        let span = info_span!("conn", peer = %peer.short());
        tokio::spawn(self.clone().serve(kept.clone()).instrument(span));
        kept
    }

    /// Routes the connection's incoming streams until it closes, then
    /// removes it from the pool.
    async fn serve(self, pc: PeerConn) {
        while let Ok((send, recv)) = pc.conn.accept_bi().await {
            let me = self.clone();
            let info = pc.info.clone();
            tokio::spawn(async move { me.route(info, send, recv).await }.in_current_span());
        }
        let reason = pc
            .conn
            .close_reason()
            .map_or_else(|| "closed".to_string(), |e| describe_close(&e));
        let removed = match self.inner.pool.lock() {
            Ok(mut pool) => {
                let same = pool
                    .get(&pc.info.node_id)
                    .is_some_and(|c| c.conn.stable_id() == pc.conn.stable_id());
                if same {
                    pool.remove(&pc.info.node_id);
                }
                same
            }
            Err(_) => false,
        };
        if removed {
            info!(peer = %pc.info.node_id.short(), "peer down: {reason}");
            let _ = self.inner.events.send(NetEvent::PeerDown {
                node_id: pc.info.node_id,
                reason,
            });
        }
    }

    async fn route(&self, peer: Arc<PeerInfo>, mut send: SendStream, mut recv: RecvStream) {
        let first = tokio::time::timeout(
            HANDSHAKE_TIMEOUT,
            read_message(&mut recv, limits::MAX_CONTROL_FRAME),
        )
        .await;
        let kind = match first {
            Ok(Ok(Some(Message::Open { kind }))) => kind,
            other => {
                debug!("stream without a valid open: {other:?}");
                let _ = recv.stop(VarInt::from_u32(stream_code::PROTOCOL_ERROR));
                let _ = send.reset(VarInt::from_u32(stream_code::PROTOCOL_ERROR));
                return;
            }
        };
        let Some(tx) = self.inner.handlers.get(&kind) else {
            debug!(kind, "no handler for stream kind");
            let _ = recv.stop(VarInt::from_u32(stream_code::UNKNOWN_KIND));
            let _ = send.reset(VarInt::from_u32(stream_code::UNKNOWN_KIND));
            return;
        };
        if let Err(e) = tx.try_send(IncomingStream { peer, send, recv }) {
            let s = e.into_inner();
            let (mut send, mut recv) = (s.send, s.recv);
            let _ = recv.stop(VarInt::from_u32(stream_code::BUSY));
            let _ = send.reset(VarInt::from_u32(stream_code::BUSY));
        }
    }
}

/// If the peer closed the connection during the handshake, what it said.
fn refused_by_peer(conn: &Connection) -> Option<NetError> {
    match conn.close_reason()? {
        ConnectionError::ApplicationClosed(c) => {
            let reason = String::from_utf8_lossy(&c.reason).into_owned();
            let code = c.error_code.into_inner();
            Some(if code == u64::from(close_code::AUTH_FAILED) {
                NetError::AuthFailed(format!("the peer refused us (wrong join token?): {reason}"))
            } else if code == u64::from(close_code::VERSION_MISMATCH) {
                NetError::Unexpected {
                    expected: "the same protocol version",
                    got: reason,
                }
            } else if code == u64::from(close_code::IDENTITY) {
                NetError::Identity(reason)
            } else {
                NetError::AuthFailed(format!("the peer closed the handshake: {reason}"))
            })
        }
        _ => None,
    }
}

/// A close reason for logs and events.
pub(crate) fn describe_close(e: &ConnectionError) -> String {
    match e {
        ConnectionError::ApplicationClosed(c) => {
            let code = c.error_code.into_inner();
            let reason = String::from_utf8_lossy(&c.reason);
            let what = match u32::try_from(code) {
                Ok(close_code::SHUTDOWN) => "peer shut down",
                Ok(close_code::AUTH_FAILED) => "authentication failed",
                Ok(close_code::DUPLICATE) => "duplicate connection",
                Ok(close_code::PEER_TIMEOUT) => "missed heartbeats",
                Ok(close_code::VERSION_MISMATCH) => "protocol version mismatch",
                _ => "closed",
            };
            format!("{what} ({reason})")
        }
        ConnectionError::LocallyClosed => "closed by this node".into(),
        ConnectionError::TimedOut => "idle timeout".into(),
        other => other.to_string(),
    }
}
