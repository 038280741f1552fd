//! The message enum and its body encoding.

use std::net::{IpAddr, SocketAddr};

use crate::pipeline::{self, Forward, GenerateRequest, SampledToken};
use crate::tensor::TensorFrame;
use crate::train::TrainMsg;
use crate::{ProtoError, limits};

pub(crate) const TAG_HELLO: u8 = 0x01;
pub(crate) const TAG_REFUSE: u8 = 0x02;
pub(crate) const TAG_AUTH_CHALLENGE: u8 = 0x03;
pub(crate) const TAG_AUTH_PROOF: u8 = 0x04;
pub(crate) const TAG_AUTH_OK: u8 = 0x05;
pub(crate) const TAG_HEARTBEAT: u8 = 0x06;
pub(crate) const TAG_HEARTBEAT_ACK: u8 = 0x07;
pub(crate) const TAG_OPEN: u8 = 0x08;
pub(crate) const TAG_PEERS: u8 = 0x09;
pub(crate) const TAG_PROFILE: u8 = 0x0A;
pub(crate) const TAG_PROBE_DATA: u8 = 0x0B;
pub(crate) const TAG_PROBE_ACK: u8 = 0x0C;
pub(crate) const TAG_TENSOR: u8 = 0x10;
pub(crate) const TAG_FORWARD: u8 = 0x11;
pub(crate) const TAG_SAMPLED: u8 = 0x12;
pub(crate) const TAG_END_SEQS: u8 = 0x13;
pub(crate) const TAG_GENERATE: u8 = 0x14;
pub(crate) const TAG_CONTROL: u8 = 0x15;
pub(crate) const TAG_FILE_CHUNK: u8 = 0x16;
pub(crate) const TAG_TRAIN: u8 = 0x17;

/// First message on a connection, in both directions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    pub version: u16,
    /// The node's persistent identity (hash of its public key).
    pub node_id: [u8; 32],
    pub name: String,
    /// The UDP port the node's QUIC endpoint listens on.
    pub quic_port: u16,
}

/// Why a peer is refused (the connection is closed after it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub code: u16,
    pub reason: String,
}

/// A member's identity and where it listens, as gossiped between members.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerAddr {
    pub node_id: [u8; 32],
    pub addr: SocketAddr,
}

/// Every message of protocol version 1.
#[derive(Debug, Clone, PartialEq)]
pub enum Message {
    Hello(Hello),
    Refuse(Refusal),
    /// A random nonce the peer must MAC with the cluster secret.
    AuthChallenge {
        nonce: [u8; 32],
    },
    /// HMAC over the challenge, bound to the TLS session.
    AuthProof {
        mac: [u8; 32],
    },
    AuthOk,
    Heartbeat {
        seq: u64,
    },
    HeartbeatAck {
        seq: u64,
    },
    /// First message on every stream after authentication: which handler
    /// the stream is for (see [`crate::stream_kind`]).
    Open {
        kind: u16,
    },
    /// The live members the sender knows, so a node that was given one
    /// peer learns the rest (at most [`limits::MAX_PEERS`]).
    Peers(Vec<PeerAddr>),
    /// A node's device profile (hardware, measured layer times, links) as a
    /// versioned JSON document, at most [`limits::MAX_PROFILE`] bytes; the
    /// runtime owns its schema.
    Profile(Vec<u8>),
    /// Filler bytes for a bandwidth probe (at most [`limits::MAX_PROBE`]).
    ProbeData(Vec<u8>),
    /// The probe's receiver got `bytes` bytes.
    ProbeAck {
        bytes: u64,
    },
    Tensor(TensorFrame),
    /// Hidden states of a batch, from one pipeline stage to the next.
    Forward(Forward),
    /// Tokens the last stage sampled (to stage 0, and from stage 0 to the
    /// requester).
    Sampled {
        placement: u64,
        tokens: Vec<SampledToken>,
    },
    /// Sequences that ended (finished, cancelled, failed): free their state.
    EndSeqs {
        placement: u64,
        seqs: Vec<u64>,
    },
    /// A generation request to the first stage.
    Generate(Box<GenerateRequest>),
    /// A cluster control document (placement of stages, readiness) as
    /// versioned JSON, at most [`limits::MAX_CONTROL_DOC`] bytes; the
    /// runtime owns its schema.
    Control(Vec<u8>),
    /// Bytes of a file at `offset` (weight transfer), at most
    /// [`limits::MAX_FILE_CHUNK`].
    FileChunk {
        offset: u64,
        data: Vec<u8>,
    },
    /// Pipeline-parallel training (see [`TrainMsg`]).
    Train(Box<TrainMsg>),
}

impl Message {
    /// Short name for logs and errors.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Hello(_) => "hello",
            Self::Refuse(_) => "refuse",
            Self::AuthChallenge { .. } => "auth-challenge",
            Self::AuthProof { .. } => "auth-proof",
            Self::AuthOk => "auth-ok",
            Self::Heartbeat { .. } => "heartbeat",
            Self::HeartbeatAck { .. } => "heartbeat-ack",
            Self::Open { .. } => "open",
            Self::Peers(_) => "peers",
            Self::Profile(_) => "profile",
            Self::ProbeData(_) => "probe-data",
            Self::ProbeAck { .. } => "probe-ack",
            Self::Tensor(_) => "tensor",
            Self::Forward(_) => "forward",
            Self::Sampled { .. } => "sampled",
            Self::EndSeqs { .. } => "end-seqs",
            Self::Generate(_) => "generate",
            Self::Control(_) => "control",
            Self::FileChunk { .. } => "file-chunk",
            Self::Train(_) => "train",
        }
    }

    /// Writes the body into `out`, returning the tag.
    pub(crate) fn encode_body(&self, out: &mut Vec<u8>) -> Result<u8, ProtoError> {
        Ok(match self {
            Self::Hello(h) => {
                out.extend_from_slice(&h.version.to_le_bytes());
                out.extend_from_slice(&h.node_id);
                put_string(out, "name", &h.name)?;
                out.extend_from_slice(&h.quic_port.to_le_bytes());
                TAG_HELLO
            }
            Self::Refuse(r) => {
                out.extend_from_slice(&r.code.to_le_bytes());
                put_string(out, "reason", &r.reason)?;
                TAG_REFUSE
            }
            Self::AuthChallenge { nonce } => {
                out.extend_from_slice(nonce);
                TAG_AUTH_CHALLENGE
            }
            Self::AuthProof { mac } => {
                out.extend_from_slice(mac);
                TAG_AUTH_PROOF
            }
            Self::AuthOk => TAG_AUTH_OK,
            Self::Heartbeat { seq } => {
                out.extend_from_slice(&seq.to_le_bytes());
                TAG_HEARTBEAT
            }
            Self::HeartbeatAck { seq } => {
                out.extend_from_slice(&seq.to_le_bytes());
                TAG_HEARTBEAT_ACK
            }
            Self::Open { kind } => {
                out.extend_from_slice(&kind.to_le_bytes());
                TAG_OPEN
            }
            Self::Peers(peers) => {
                if peers.len() > limits::MAX_PEERS {
                    return Err(ProtoError::InvalidField {
                        what: "peers",
                        detail: format!("{} entries, at most {}", peers.len(), limits::MAX_PEERS),
                    });
                }
                out.extend_from_slice(&(peers.len() as u16).to_le_bytes());
                for p in peers {
                    out.extend_from_slice(&p.node_id);
                    put_addr(out, &p.addr);
                }
                TAG_PEERS
            }
            Self::Profile(doc) => {
                put_blob(out, "profile", doc, limits::MAX_PROFILE)?;
                TAG_PROFILE
            }
            Self::ProbeData(data) => {
                put_blob(out, "probe-data", data, limits::MAX_PROBE)?;
                TAG_PROBE_DATA
            }
            Self::ProbeAck { bytes } => {
                out.extend_from_slice(&bytes.to_le_bytes());
                TAG_PROBE_ACK
            }
            Self::Tensor(t) => {
                t.encode(out)?;
                TAG_TENSOR
            }
            Self::Forward(f) => {
                f.encode(out)?;
                TAG_FORWARD
            }
            Self::Sampled { placement, tokens } => {
                pipeline::encode_sampled(out, *placement, tokens)?;
                TAG_SAMPLED
            }
            Self::EndSeqs { placement, seqs } => {
                pipeline::encode_end(out, *placement, seqs)?;
                TAG_END_SEQS
            }
            Self::Generate(g) => {
                g.encode(out)?;
                TAG_GENERATE
            }
            Self::Control(doc) => {
                put_blob(out, "control", doc, limits::MAX_CONTROL_DOC)?;
                TAG_CONTROL
            }
            Self::FileChunk { offset, data } => {
                out.extend_from_slice(&offset.to_le_bytes());
                put_blob(out, "file-chunk", data, limits::MAX_FILE_CHUNK)?;
                TAG_FILE_CHUNK
            }
            Self::Train(t) => {
                t.encode(out)?;
                TAG_TRAIN
            }
        })
    }

    /// Parses a body; all of it must be used.
    pub(crate) fn decode_body(tag: u8, body: &[u8]) -> Result<Self, ProtoError> {
        let mut r = Reader::new(body);
        let msg = match tag {
            TAG_HELLO => Self::Hello(Hello {
                version: r.u16("hello")?,
                node_id: r.array("hello")?,
                name: r.string("name")?,
                quic_port: r.u16("hello")?,
            }),
            TAG_REFUSE => Self::Refuse(Refusal {
                code: r.u16("refuse")?,
                reason: r.string("reason")?,
            }),
            TAG_AUTH_CHALLENGE => Self::AuthChallenge {
                nonce: r.array("auth-challenge")?,
            },
            TAG_AUTH_PROOF => Self::AuthProof {
                mac: r.array("auth-proof")?,
            },
            TAG_AUTH_OK => Self::AuthOk,
            TAG_HEARTBEAT => Self::Heartbeat {
                seq: r.u64("heartbeat")?,
            },
            TAG_HEARTBEAT_ACK => Self::HeartbeatAck {
                seq: r.u64("heartbeat-ack")?,
            },
            TAG_OPEN => Self::Open {
                kind: r.u16("open")?,
            },
            TAG_PEERS => {
                let n = r.u16("peers")? as usize;
                if n > limits::MAX_PEERS {
                    return Err(ProtoError::InvalidField {
                        what: "peers",
                        detail: format!("{n} entries, at most {}", limits::MAX_PEERS),
                    });
                }
                let mut peers = Vec::with_capacity(n);
                for _ in 0..n {
                    peers.push(PeerAddr {
                        node_id: r.array("peers")?,
                        addr: r.addr("peers")?,
                    });
                }
                Self::Peers(peers)
            }
            TAG_PROFILE => Self::Profile(r.blob("profile", limits::MAX_PROFILE)?),
            TAG_PROBE_DATA => Self::ProbeData(r.blob("probe-data", limits::MAX_PROBE)?),
            TAG_PROBE_ACK => Self::ProbeAck {
                bytes: r.u64("probe-ack")?,
            },
            TAG_TENSOR => Self::Tensor(TensorFrame::decode(&mut r)?),
            TAG_FORWARD => Self::Forward(Forward::decode(&mut r)?),
            TAG_SAMPLED => {
                let (placement, tokens) = pipeline::decode_sampled(&mut r)?;
                Self::Sampled { placement, tokens }
            }
            TAG_END_SEQS => {
                let (placement, seqs) = pipeline::decode_end(&mut r)?;
                Self::EndSeqs { placement, seqs }
            }
            TAG_GENERATE => Self::Generate(Box::new(GenerateRequest::decode(&mut r)?)),
            TAG_CONTROL => Self::Control(r.blob("control", limits::MAX_CONTROL_DOC)?),
            TAG_FILE_CHUNK => Self::FileChunk {
                offset: r.u64("file-chunk")?,
                data: r.blob("file-chunk", limits::MAX_FILE_CHUNK)?,
            },
            TAG_TRAIN => Self::Train(Box::new(TrainMsg::decode(&mut r)?)),
            other => return Err(ProtoError::UnknownTag(other)),
        };
        r.finish(msg.name())?;
        Ok(msg)
    }
}

pub(crate) fn put_string(out: &mut Vec<u8>, what: &'static str, s: &str) -> Result<(), ProtoError> {
    if s.len() > limits::MAX_STRING {
        return Err(ProtoError::StringTooLong {
            what,
            len: s.len(),
            max: limits::MAX_STRING,
        });
    }
    out.extend_from_slice(&(s.len() as u16).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
    Ok(())
}

/// A byte string as `[u32 LE length][bytes]`, at most `max` bytes.
pub(crate) fn put_blob(
    out: &mut Vec<u8>,
    what: &'static str,
    bytes: &[u8],
    max: usize,
) -> Result<(), ProtoError> {
    if bytes.len() > max {
        return Err(ProtoError::InvalidField {
            what,
            detail: format!("{} bytes, at most {max}", bytes.len()),
        });
    }
    out.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
    out.extend_from_slice(bytes);
    Ok(())
}

/// An address as `[family 4|6][ip bytes][u16 LE port]`.
fn put_addr(out: &mut Vec<u8>, addr: &SocketAddr) {
    match addr.ip() {
        IpAddr::V4(ip) => {
            out.push(4);
            out.extend_from_slice(&ip.octets());
        }
        IpAddr::V6(ip) => {
            out.push(6);
            out.extend_from_slice(&ip.octets());
        }
    }
    out.extend_from_slice(&addr.port().to_le_bytes());
}

/// A bounds-checked cursor over a body.
pub(crate) struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    pub(crate) fn new(buf: &'a [u8]) -> Self {
        Self { buf, pos: 0 }
    }

    pub(crate) fn take(&mut self, what: &'static str, n: usize) -> Result<&'a [u8], ProtoError> {
        let available = self.buf.len() - self.pos;
        if n > available {
            return Err(ProtoError::Truncated {
                what,
                needed: n,
                available,
            });
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    pub(crate) fn u8(&mut self, what: &'static str) -> Result<u8, ProtoError> {
        Ok(self.take(what, 1)?[0])
    }

    pub(crate) fn u16(&mut self, what: &'static str) -> Result<u16, ProtoError> {
        Ok(u16::from_le_bytes(self.array(what)?))
    }

    pub(crate) fn u32(&mut self, what: &'static str) -> Result<u32, ProtoError> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    pub(crate) fn u64(&mut self, what: &'static str) -> Result<u64, ProtoError> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    pub(crate) fn array<const N: usize>(
        &mut self,
        what: &'static str,
    ) -> Result<[u8; N], ProtoError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(what, N)?);
        Ok(a)
    }

    fn addr(&mut self, what: &'static str) -> Result<SocketAddr, ProtoError> {
        let ip = match self.u8(what)? {
            4 => IpAddr::from(self.array::<4>(what)?),
            6 => IpAddr::from(self.array::<16>(what)?),
            other => {
                return Err(ProtoError::InvalidField {
                    what,
                    detail: format!("address family {other}"),
                });
            }
        };
        Ok(SocketAddr::new(ip, self.u16(what)?))
    }

    pub(crate) fn blob(&mut self, what: &'static str, max: usize) -> Result<Vec<u8>, ProtoError> {
        let len = self.u32(what)? as usize;
        if len > max {
            return Err(ProtoError::InvalidField {
                what,
                detail: format!("{len} bytes, at most {max}"),
            });
        }
        Ok(self.take(what, len)?.to_vec())
    }

    pub(crate) fn string(&mut self, what: &'static str) -> Result<String, ProtoError> {
        let len = self.u16(what)? as usize;
        if len > limits::MAX_STRING {
            return Err(ProtoError::StringTooLong {
                what,
                len,
                max: limits::MAX_STRING,
            });
        }
        let bytes = self.take(what, len)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| ProtoError::BadUtf8 { what })
    }

    pub(crate) fn rest(&mut self) -> &'a [u8] {
        let s = &self.buf[self.pos..];
        self.pos = self.buf.len();
        s
    }

    fn finish(&self, what: &'static str) -> Result<(), ProtoError> {
        let extra = self.buf.len() - self.pos;
        if extra > 0 {
            return Err(ProtoError::TrailingBytes { what, extra });
        }
        Ok(())
    }
}
