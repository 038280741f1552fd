//! Hearth's transport: one QUIC endpoint per node (quinn, rustls with the
//! ring provider only, ALPN `hearth/5`), persistent node identities, cluster
//! authentication, a pool of one connection per peer, and routing of incoming
//! streams to the handler registered for their kind. Like iroh's `Router`.
//!
//! A connection is usable only after cluster authentication: after the TLS
//! handshake both sides MAC a fresh challenge with the cluster secret, bound
//! to the connection's TLS keying-material export (so a proof cannot be
//! replayed on another connection). A peer that fails is closed with
//! [`close_code::AUTH_FAILED`] before any stream reaches a handler.
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

pub mod auth;
mod endpoint;
pub mod framed;
mod identity;
mod secret;
pub mod tls;

pub use endpoint::{
    Endpoint, EndpointConfig, IncomingStream, NetEvent, PeerConn, PeerInfo, StreamReceivers,
};
pub use hearth_proto::NodeId;
pub use identity::Identity;
pub use secret::{ClusterId, ClusterSecret};

/// QUIC application close codes: why this side closed a connection.
pub mod close_code {
    /// The node is shutting down (graceful).
    pub const SHUTDOWN: u32 = 0;
    /// The peer failed cluster authentication (wrong or missing secret,
    /// replayed or forged proof).
    pub const AUTH_FAILED: u32 = 0x4801;
    /// The peer speaks another protocol version.
    pub const VERSION_MISMATCH: u32 = 0x4802;
    /// The peer broke the protocol (bad frame, unexpected message, timeout).
    pub const PROTOCOL_ERROR: u32 = 0x4803;
    /// Another connection to the same peer is kept instead of this one.
    pub const DUPLICATE: u32 = 0x4804;
    /// The peer claims an identity its certificate does not prove, or ours.
    pub const IDENTITY: u32 = 0x4805;
    /// The peer stopped answering heartbeats and was removed.
    pub const PEER_TIMEOUT: u32 = 0x4806;
}

/// Stream reset / stop codes.
pub mod stream_code {
    /// No handler for the stream's kind.
    pub const UNKNOWN_KIND: u32 = 0x5301;
    /// The handler's queue is full.
    pub const BUSY: u32 = 0x5302;
    /// The stream broke the protocol.
    pub const PROTOCOL_ERROR: u32 = 0x5303;
}

/// Everything that can go wrong in the transport.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("i/o error on {what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("TLS setup failed: {0}")]
    Tls(String),
    #[error("certificate generation failed: {0}")]
    Cert(String),
    #[error("bad identity file {path}: {detail}")]
    BadIdentity { path: String, detail: String },
    #[error("bad cluster secret: {0}")]
    BadSecret(String),
    #[error("cannot connect to {addr}: {detail}")]
    Connect { addr: String, detail: String },
    #[error("connection lost: {0}")]
    Connection(#[from] quinn::ConnectionError),
    #[error("stream write failed: {0}")]
    Write(#[from] quinn::WriteError),
    #[error("stream read failed: {0}")]
    Read(String),
    #[error("protocol error: {0}")]
    Proto(#[from] hearth_proto::ProtoError),
    #[error("peer sent {got} where {expected} was expected")]
    Unexpected { expected: &'static str, got: String },
    #[error("cluster authentication failed: {0}")]
    AuthFailed(String),
    #[error("peer speaks protocol version {theirs}, this node speaks {ours}")]
    VersionMismatch { theirs: u16, ours: u16 },
    #[error("peer identity mismatch: {0}")]
    Identity(String),
    #[error("timed out during {0}")]
    Timeout(&'static str),
    #[error("the endpoint is shut down")]
    Shutdown,
}

impl NetError {
    pub(crate) fn io(what: impl Into<String>, source: std::io::Error) -> Self {
        Self::Io {
            what: what.into(),
            source,
        }
    }
}
