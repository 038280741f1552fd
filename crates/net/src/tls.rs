//! TLS for QUIC: TLS 1.3 only, the ring provider only, ALPN `hearth/5`, and
//! mutual authentication by self-signed certificates. Certificates are not
//! checked against any authority (a home has none); instead the handshake
//! signatures are verified, the node id is bound to the certificate's key,
//! and membership is proven by the cluster-secret challenge in [`crate::auth`].

use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};

use crate::{Identity, NetError};

/// The server name every node presents and expects (certificates are
/// self-signed; identity is the key, not the name).
pub const SERVER_NAME: &str = "hearth";

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Transport parameters sized for bulk tensors between a few peers.
pub fn transport_config() -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    t.max_concurrent_bidi_streams(1024u32.into())
        .max_concurrent_uni_streams(256u32.into())
        .stream_receive_window((32u32 * 1024 * 1024).into())
        .receive_window((128u32 * 1024 * 1024).into())
        .send_window(128 * 1024 * 1024)
        .keep_alive_interval(Some(Duration::from_secs(1)));
    if let Ok(idle) = quinn::IdleTimeout::try_from(Duration::from_secs(10)) {
        t.max_idle_timeout(Some(idle));
    }
    t
}

/// The QUIC server side: presents `identity`, requires a client certificate.
pub fn server_config(identity: &Identity) -> Result<quinn::ServerConfig, NetError> {
    let p = provider();
    let verifier = Arc::new(AnyCert(p.signature_verification_algorithms));
    let mut tls = rustls::ServerConfig::builder_with_provider(p)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| NetError::Tls(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(vec![identity.cert().clone()], identity.key())
        .map_err(|e| NetError::Tls(e.to_string()))?;
    tls.alpn_protocols = vec![hearth_proto::ALPN.to_vec()];
    let quic = QuicServerConfig::try_from(tls).map_err(|e| NetError::Tls(e.to_string()))?;
    let mut cfg = quinn::ServerConfig::with_crypto(Arc::new(quic));
    cfg.transport_config(Arc::new(transport_config()));
    Ok(cfg)
}

/// The QUIC client side: presents `identity`, accepts any well-formed
/// server certificate whose handshake signature verifies.
pub fn client_config(identity: &Identity) -> Result<quinn::ClientConfig, NetError> {
    client_config_with_alpn(identity, hearth_proto::ALPN)
}

/// As [`client_config`] with another ALPN (tests of refusal).
pub fn client_config_with_alpn(
    identity: &Identity,
    alpn: &[u8],
) -> Result<quinn::ClientConfig, NetError> {
    let p = provider();
    let verifier = Arc::new(AnyCert(p.signature_verification_algorithms));
    let mut tls = rustls::ClientConfig::builder_with_provider(p)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| NetError::Tls(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_auth_cert(vec![identity.cert().clone()], identity.key())
        .map_err(|e| NetError::Tls(e.to_string()))?;
    tls.alpn_protocols = vec![alpn.to_vec()];
    let quic = QuicClientConfig::try_from(tls).map_err(|e| NetError::Tls(e.to_string()))?;
    let mut cfg = quinn::ClientConfig::new(Arc::new(quic));
    cfg.transport_config(Arc::new(transport_config()));
    Ok(cfg)
}

/// The handshake-signature checks, the same for both verifier traits.
macro_rules! signature_methods {
    () => {
        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0)
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0)
        }

        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            self.0.supported_schemes()
        }
    };
}

/// Accepts any parsable certificate; verifies handshake signatures with it.
#[derive(Debug)]
struct AnyCert(WebPkiSupportedAlgorithms);

fn check_parses(cert: &CertificateDer<'_>) -> Result<(), rustls::Error> {
    rustls::server::ParsedCertificate::try_from(cert).map(|_| ())
}

impl ServerCertVerifier for AnyCert {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        check_parses(end_entity)?;
        Ok(ServerCertVerified::assertion())
    }

    signature_methods!();
}

impl ClientCertVerifier for AnyCert {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        check_parses(end_entity)?;
        Ok(ClientCertVerified::assertion())
    }

    signature_methods!();
}
