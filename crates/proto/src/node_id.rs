//! A node's identity on the wire.

use std::fmt;
use std::str::FromStr;

use crate::ProtoError;

/// A node's persistent identity: the SHA-256 of its certificate's public key
/// (SubjectPublicKeyInfo). Ordered, so "the lowest live node id" picks a
/// leader deterministically.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NodeId(pub [u8; 32]);

impl NodeId {
    /// The first 8 hex digits, for logs and tables.
    pub fn short(&self) -> String {
        self.to_string()[..8].to_string()
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NodeId({})", self.short())
    }
}

impl FromStr for NodeId {
    type Err = ProtoError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = |detail: &str| ProtoError::InvalidField {
            what: "node id",
            detail: detail.to_string(),
        };
        if !s.is_ascii() || s.len() != 64 {
            return Err(bad("expected 64 hex digits"));
        }
        let mut out = [0u8; 32];
        for (i, o) in out.iter_mut().enumerate() {
            *o = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).map_err(|_| bad("not hex"))?;
        }
        Ok(Self(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trip_and_errors() {
        let id = NodeId([0xA5; 32]);
        let s = id.to_string();
        assert_eq!(s.len(), 64);
        assert_eq!(s.parse::<NodeId>().unwrap(), id);
        assert_eq!(id.short(), "a5a5a5a5");
        assert!("zz".parse::<NodeId>().is_err());
        assert!("g".repeat(64).parse::<NodeId>().is_err());
        assert!("é".repeat(32).parse::<NodeId>().is_err());
        assert!(format!("a{}a", "é".repeat(31)).parse::<NodeId>().is_err());
    }
}
