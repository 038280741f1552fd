//! The cluster secret (shared by every member, shown as the join token) and
//! the cluster id derived from it for discovery.

use std::fmt;
use std::path::Path;
use std::str::FromStr;

use rand::RngCore;
use sha2::{Digest, Sha256};

use crate::NetError;
use crate::identity::write_private;

const TOKEN_PREFIX: &str = "hearth1-";

/// 32 random bytes every member knows. Its `Debug` never shows it.
#[derive(Clone, PartialEq, Eq)]
pub struct ClusterSecret([u8; 32]);

impl fmt::Debug for ClusterSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ClusterSecret(cluster {})", self.cluster_id())
    }
}

impl ClusterSecret {
    /// A fresh random secret.
    pub fn generate() -> Self {
        let mut b = [0u8; 32];
        rand::rng().fill_bytes(&mut b);
        Self(b)
    }

    /// The join token: `hearth1-` and 64 hex digits.
    pub fn token(&self) -> String {
        let mut s = String::from(TOKEN_PREFIX);
        for b in self.0 {
            s.push_str(&format!("{b:02x}"));
        }
        s
    }

    /// What discovery advertises: derived one-way from the secret, so it
    /// tells members apart without revealing the secret.
    pub fn cluster_id(&self) -> ClusterId {
        let mut h = Sha256::new();
        h.update(b"hearth cluster id v1");
        h.update(self.0);
        let d = h.finalize();
        let mut id = [0u8; 8];
        id.copy_from_slice(&d[..8]);
        ClusterId(id)
    }

    pub(crate) fn bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Reads the secret file (a token on one line).
    pub fn load(path: &Path) -> Result<Self, NetError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| NetError::io(path.display().to_string(), e))?;
        text.trim().parse()
    }

    /// Writes the secret file, mode 0600.
    pub fn save(&self, path: &Path) -> Result<(), NetError> {
        if let Some(dir) = path.parent() {
            crate::identity::private_dir(dir)?;
        }
        write_private(path, format!("{}\n", self.token()).as_bytes())
    }

    /// Loads the secret at `path`, creating and saving a new one if there is
    /// none. Returns whether it was created.
    pub fn load_or_create(path: &Path) -> Result<(Self, bool), NetError> {
        if path.exists() {
            return Ok((Self::load(path)?, false));
        }
        let s = Self::generate();
        s.save(path)?;
        Ok((s, true))
    }
}

impl FromStr for ClusterSecret {
    type Err = NetError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let hex = s.trim().strip_prefix(TOKEN_PREFIX).ok_or_else(|| {
            NetError::BadSecret(format!("a join token starts with `{TOKEN_PREFIX}`"))
        })?;
        if !hex.is_ascii() || hex.len() != 64 {
            return Err(NetError::BadSecret(format!(
                "a join token is `{TOKEN_PREFIX}` and 64 hex digits"
            )));
        }
        let mut b = [0u8; 32];
        for (i, o) in b.iter_mut().enumerate() {
            *o = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16)
                .map_err(|_| NetError::BadSecret("the join token is not hex".into()))?;
        }
        Ok(Self(b))
    }
}

/// Public id of a cluster, advertised over mDNS (16 hex digits).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ClusterId(pub [u8; 8]);

impl fmt::Display for ClusterId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_round_trips_and_file_is_private() {
        let s = ClusterSecret::generate();
        let t = s.token();
        assert_eq!(t.parse::<ClusterSecret>().unwrap(), s);
        assert!(!format!("{s:?}").contains(&t[8..]));
        assert_ne!(ClusterSecret::generate().cluster_id(), s.cluster_id());
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cluster").join("secret");
        let (a, created) = ClusterSecret::load_or_create(&path).unwrap();
        assert!(created);
        let (b, created) = ClusterSecret::load_or_create(&path).unwrap();
        assert!(!created);
        assert_eq!(a, b);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }

    #[test]
    fn bad_tokens_are_clear_errors() {
        for bad in [
            "",
            "hearth1-",
            "hearth1-zz",
            "nope",
            &format!("hearth1-{}", "g".repeat(64)),
        ] {
            assert!(bad.parse::<ClusterSecret>().is_err(), "{bad}");
        }
        let odd = format!("hearth1-a{}a", "é".repeat(31));
        assert!(odd.parse::<ClusterSecret>().is_err());
    }
}
