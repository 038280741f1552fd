//! Persistent node identity: a key pair and a self-signed certificate kept
//! under the node's home directory. The node id is the SHA-256 of the public
//! key, so peers can check a claimed id against the TLS certificate.

use std::path::{Path, PathBuf};

use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use sha2::{Digest, Sha256};

use crate::{NetError, NodeId};

const KEY_FILE: &str = "node.key";
const CERT_FILE: &str = "node.crt";

/// A node's key, certificate and id.
#[derive(Debug)]
pub struct Identity {
    key: PrivatePkcs8KeyDer<'static>,
    cert: CertificateDer<'static>,
    id: NodeId,
}

impl Clone for Identity {
    fn clone(&self) -> Self {
        Self {
            key: self.key.clone_key(),
            cert: self.cert.clone(),
            id: self.id,
        }
    }
}

impl Identity {
    /// A fresh identity held only in memory (tests, throwaway nodes).
    pub fn generate() -> Result<Self, NetError> {
        let key = rcgen::KeyPair::generate().map_err(|e| NetError::Cert(e.to_string()))?;
        Self::from_key(key)
    }

    /// Loads the identity from `dir`, creating (and saving, key mode 0600) a
    /// new one the first time.
    pub fn load_or_create(dir: &Path) -> Result<Self, NetError> {
        let key_path = dir.join(KEY_FILE);
        if key_path.exists() {
            let pem = std::fs::read_to_string(&key_path)
                .map_err(|e| NetError::io(key_path.display().to_string(), e))?;
            let key = rcgen::KeyPair::from_pem(&pem).map_err(|e| NetError::BadIdentity {
                path: key_path.display().to_string(),
                detail: e.to_string(),
            })?;
            return Self::from_key(key);
        }
        private_dir(dir)?;
        let key = rcgen::KeyPair::generate().map_err(|e| NetError::Cert(e.to_string()))?;
        write_private(&key_path, key.serialize_pem().as_bytes())?;
        let (me, cert_pem) = Self::build(key)?;
        // The certificate is derived from the key; saved for inspection only.
        let cert_path: PathBuf = dir.join(CERT_FILE);
        write_private(&cert_path, cert_pem.as_bytes())?;
        Ok(me)
    }

    fn from_key(key: rcgen::KeyPair) -> Result<Self, NetError> {
        Ok(Self::build(key)?.0)
    }

    /// The identity and its certificate as PEM.
    fn build(key: rcgen::KeyPair) -> Result<(Self, String), NetError> {
        let mut params = rcgen::CertificateParams::new(vec!["hearth".to_string()])
            .map_err(|e| NetError::Cert(e.to_string()))?;
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "hearth node");
        let cert = params
            .self_signed(&key)
            .map_err(|e| NetError::Cert(e.to_string()))?;
        // Computed exactly as peers will compute it from the certificate.
        let id = node_id_of_cert(cert.der())?;
        let key_der = PrivatePkcs8KeyDer::from(key.serialize_der());
        let me = Self {
            key: key_der,
            cert: cert.der().clone(),
            id,
        };
        Ok((me, cert.pem()))
    }

    /// This node's id.
    pub fn id(&self) -> NodeId {
        self.id
    }

    /// The self-signed certificate presented in TLS.
    pub fn cert(&self) -> &CertificateDer<'static> {
        &self.cert
    }

    pub(crate) fn key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(self.key.clone_key())
    }
}

/// The node id a certificate proves: SHA-256 of its SubjectPublicKeyInfo.
pub fn node_id_of_cert(cert: &CertificateDer<'_>) -> Result<NodeId, NetError> {
    let parsed = rustls::server::ParsedCertificate::try_from(cert)
        .map_err(|e| NetError::Identity(format!("unparsable certificate: {e}")))?;
    Ok(NodeId(
        Sha256::digest(parsed.subject_public_key_info().as_ref()).into(),
    ))
}

/// Makes `dir` and its missing parents, those made here 0700.
pub(crate) fn private_dir(dir: &Path) -> Result<(), NetError> {
    let mut b = std::fs::DirBuilder::new();
    b.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        b.mode(0o700);
    }
    b.create(dir)
        .map_err(|e| NetError::io(dir.display().to_string(), e))
}

/// Writes a file readable only by its owner, durably: a temporary file
/// beside it, fsynced, renamed over it, the folder fsynced. A crash leaves
/// the old file or the new one, never an empty one.
pub(crate) fn write_private(path: &Path, bytes: &[u8]) -> Result<(), NetError> {
    use std::io::Write;
    let io = |e| NetError::io(path.display().to_string(), e);
    let mut f = atomic_write_file::AtomicWriteFile::open(path).map_err(io)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        f.as_file()
            .set_permissions(std::fs::Permissions::from_mode(0o600))
            .map_err(io)?;
    }
    f.write_all(bytes).map_err(io)?;
    f.commit().map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::pki_types::pem::PemObject;

    #[test]
    fn identity_persists_and_matches_its_certificate() {
        let dir = tempfile::tempdir().unwrap();
        let a = Identity::load_or_create(dir.path()).unwrap();
        let b = Identity::load_or_create(dir.path()).unwrap();
        assert_eq!(a.id(), b.id());
        assert_eq!(node_id_of_cert(a.cert()).unwrap(), a.id());
        assert_ne!(Identity::generate().unwrap().id(), a.id());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir.path().join(KEY_FILE))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let pem = std::fs::read(dir.path().join(CERT_FILE)).unwrap();
        let cert = CertificateDer::from_pem_slice(&pem).unwrap();
        assert_eq!(cert, *a.cert());
    }

    #[test]
    fn corrupt_key_file_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(KEY_FILE), "not a key").unwrap();
        let err = Identity::load_or_create(dir.path()).unwrap_err();
        assert!(matches!(err, NetError::BadIdentity { .. }), "{err}");
    }
}
