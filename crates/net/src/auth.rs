//! Cluster authentication, run on the first bidirectional stream of every
//! connection right after the TLS handshake.
//!
//! ```text
//! dialer D                                   acceptor A
//!   Hello(D), AuthChallenge(n_d)      ->
//!                                     <-  AuthChallenge(n_a)
//!   AuthProof(mac_D)                  ->
//!                                     <-  Hello(A), AuthProof(mac_A), AuthOk
//! mac_X = HMAC-SHA256(secret, label | role X | EKM | nonce of the other | id X | id other)
//! ```
//! EKM is the connection's TLS keying-material export, so a proof is valid
//! on one connection only: replaying it on another fails. Each side also
//! checks that the node id in the peer's hello is the hash of the key in the
//! peer's TLS certificate. The acceptor sends nothing but a random nonce
//! until the dialer has proven itself, and no stream reaches a handler
//! before both proofs are checked.

use std::net::SocketAddr;
use std::time::Duration;

use hearth_proto::{Hello, Message, NodeId, PROTOCOL_VERSION, limits};
use hmac::{Hmac, Mac};
use quinn::Connection;
use rand::RngCore;
use rustls::pki_types::CertificateDer;
use sha2::Sha256;

use crate::framed::{expect, write_message};
use crate::identity::node_id_of_cert;
use crate::{ClusterSecret, Identity, NetError, PeerInfo, close_code};

/// Longest time a peer may take to authenticate.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

const EKM_LABEL: &[u8] = b"EXPORTER-hearth-cluster-auth-v1";
const MAC_LABEL: &[u8] = b"hearth cluster auth v1";

/// Which side of the handshake a proof is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Dialer,
    Acceptor,
}

/// The connection's TLS keying-material export (32 bytes).
pub fn keying_material(conn: &Connection) -> Result<[u8; 32], NetError> {
    let mut out = [0u8; 32];
    conn.export_keying_material(&mut out, EKM_LABEL, b"")
        .map_err(|_| NetError::Tls("keying material export failed".into()))?;
    Ok(out)
}

/// The proof `prover` gives on a connection with keying material `ekm` for
/// the challenge `nonce` that `verifier` sent.
pub fn proof(
    secret: &ClusterSecret,
    role: Role,
    ekm: &[u8; 32],
    nonce: &[u8; 32],
    prover: NodeId,
    verifier: NodeId,
) -> [u8; 32] {
    mac(secret, role, ekm, nonce, prover, verifier)
        .finalize()
        .into_bytes()
        .into()
}

fn mac(
    secret: &ClusterSecret,
    role: Role,
    ekm: &[u8; 32],
    nonce: &[u8; 32],
    prover: NodeId,
    verifier: NodeId,
) -> Hmac<Sha256> {
    // HMAC accepts keys of any length; a 32-byte key cannot fail.
    let mut m = <Hmac<Sha256> as Mac>::new_from_slice(secret.bytes())
        .unwrap_or_else(|_| unreachable!("HMAC takes any key length"));
    m.update(MAC_LABEL);
    m.update(match role {
        Role::Dialer => b"D",
        Role::Acceptor => b"A",
    });
    m.update(ekm);
    m.update(nonce);
    m.update(&prover.0);
    m.update(&verifier.0);
    m
}

fn verify(
    secret: &ClusterSecret,
    role: Role,
    ekm: &[u8; 32],
    nonce: &[u8; 32],
    prover: NodeId,
    verifier: NodeId,
    got: &[u8; 32],
) -> Result<(), NetError> {
    mac(secret, role, ekm, nonce, prover, verifier)
        .verify_slice(got)
        .map_err(|_| {
            NetError::AuthFailed("the peer's proof does not match the cluster secret".into())
        })
}

fn nonce() -> [u8; 32] {
    let mut n = [0u8; 32];
    rand::rng().fill_bytes(&mut n);
    n
}

/// The node id proven by the peer's TLS certificate.
pub fn peer_cert_id(conn: &Connection) -> Result<NodeId, NetError> {
    let certs = conn
        .peer_identity()
        .and_then(|any| any.downcast::<Vec<CertificateDer<'static>>>().ok())
        .ok_or_else(|| NetError::Identity("the peer presented no certificate".into()))?;
    let cert = certs
        .first()
        .ok_or_else(|| NetError::Identity("the peer presented no certificate".into()))?;
    node_id_of_cert(cert)
}

fn check_hello(hello: &Hello, cert_id: NodeId, me: NodeId) -> Result<NodeId, NetError> {
    if hello.version != PROTOCOL_VERSION {
        return Err(NetError::VersionMismatch {
            theirs: hello.version,
            ours: PROTOCOL_VERSION,
        });
    }
    let claimed = NodeId(hello.node_id);
    if claimed != cert_id {
        return Err(NetError::Identity(format!(
            "hello claims node {} but the certificate is node {}",
            claimed.short(),
            cert_id.short()
        )));
    }
    if claimed == me {
        return Err(NetError::Identity(
            "the peer has this node's own identity (same HEARTH_HOME?)".into(),
        ));
    }
    Ok(claimed)
}

/// What this node says about itself in a hello.
#[derive(Debug, Clone)]
pub struct LocalInfo {
    pub name: String,
    pub quic_port: u16,
}

fn hello(identity: &Identity, local: &LocalInfo) -> Message {
    Message::Hello(Hello {
        version: PROTOCOL_VERSION,
        node_id: identity.id().0,
        name: local.name.clone(),
        quic_port: local.quic_port,
    })
}

/// The close code for a failed handshake.
pub fn close_code_for(err: &NetError) -> u32 {
    match err {
        NetError::AuthFailed(_) => close_code::AUTH_FAILED,
        NetError::VersionMismatch { .. } => close_code::VERSION_MISMATCH,
        NetError::Identity(_) => close_code::IDENTITY,
        _ => close_code::PROTOCOL_ERROR,
    }
}

fn peer_info(hello: &Hello, id: NodeId, remote: SocketAddr) -> PeerInfo {
    PeerInfo {
        node_id: id,
        name: hello.name.clone(),
        addr: SocketAddr::new(remote.ip(), hello.quic_port),
        version: hello.version,
    }
}

/// The dialer's side. On error the caller closes the connection.
pub async fn dial(
    conn: &Connection,
    identity: &Identity,
    secret: &ClusterSecret,
    local: &LocalInfo,
) -> Result<PeerInfo, NetError> {
    let ekm = keying_material(conn)?;
    let cert_id = peer_cert_id(conn)?;
    let (mut send, mut recv) = conn.open_bi().await?;
    let n_d = nonce();
    write_message(&mut send, &hello(identity, local)).await?;
    write_message(&mut send, &Message::AuthChallenge { nonce: n_d }).await?;
    let max = limits::MAX_CONTROL_FRAME;
    let n_a = expect(&mut recv, max, "auth-challenge", |m| match m {
        Message::AuthChallenge { nonce } => Ok(nonce),
        m => Err(m),
    })
    .await?;
    // The acceptor's id is known from its certificate already; the proof
    // is bound to it and to this connection.
    let mac_d = proof(secret, Role::Dialer, &ekm, &n_a, identity.id(), cert_id);
    write_message(&mut send, &Message::AuthProof { mac: mac_d }).await?;
    let their_hello = expect(&mut recv, max, "hello", |m| match m {
        Message::Hello(h) => Ok(h),
        m => Err(m),
    })
    .await?;
    let peer = check_hello(&their_hello, cert_id, identity.id())?;
    let mac_a = expect(&mut recv, max, "auth-proof", |m| match m {
        Message::AuthProof { mac } => Ok(mac),
        m => Err(m),
    })
    .await?;
    verify(
        secret,
        Role::Acceptor,
        &ekm,
        &n_d,
        peer,
        identity.id(),
        &mac_a,
    )?;
    expect(&mut recv, max, "auth-ok", |m| match m {
        Message::AuthOk => Ok(()),
        m => Err(m),
    })
    .await?;
    let _ = send.finish();
    Ok(peer_info(&their_hello, peer, conn.remote_address()))
}

/// The acceptor's side: it sends nothing but a random challenge until the
/// dialer has proven it knows the secret. On error the caller closes the
/// connection.
pub async fn accept(
    conn: &Connection,
    identity: &Identity,
    secret: &ClusterSecret,
    local: &LocalInfo,
) -> Result<PeerInfo, NetError> {
    let ekm = keying_material(conn)?;
    let cert_id = peer_cert_id(conn)?;
    let (mut send, mut recv) = conn.accept_bi().await?;
    let max = limits::MAX_CONTROL_FRAME;
    let their_hello = expect(&mut recv, max, "hello", |m| match m {
        Message::Hello(h) => Ok(h),
        m => Err(m),
    })
    .await?;
    let peer = check_hello(&their_hello, cert_id, identity.id())?;
    let n_d = expect(&mut recv, max, "auth-challenge", |m| match m {
        Message::AuthChallenge { nonce } => Ok(nonce),
        m => Err(m),
    })
    .await?;
    let n_a = nonce();
    write_message(&mut send, &Message::AuthChallenge { nonce: n_a }).await?;
    let mac_d = expect(&mut recv, max, "auth-proof", |m| match m {
        Message::AuthProof { mac } => Ok(mac),
        m => Err(m),
    })
    .await?;
    verify(
        secret,
        Role::Dialer,
        &ekm,
        &n_a,
        peer,
        identity.id(),
        &mac_d,
    )?;
    let mac_a = proof(secret, Role::Acceptor, &ekm, &n_d, identity.id(), peer);
    write_message(&mut send, &hello(identity, local)).await?;
    write_message(&mut send, &Message::AuthProof { mac: mac_a }).await?;
    write_message(&mut send, &Message::AuthOk).await?;
    let _ = send.finish();
    Ok(peer_info(&their_hello, peer, conn.remote_address()))
}
