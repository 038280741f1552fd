//! Hearth's wire protocol, sans-IO (no sockets, no async runtime, no clocks):
//! like `quinn-proto` beside `quinn`, the networking crate feeds it bytes.
//!
//! A frame is `[u32 LE length][u8 tag][body]`, where `length` counts the tag
//! and the body. Every length is checked against a named limit before any
//! allocation, on encode and on decode. Unknown tags, truncation, oversize
//! and inconsistent fields are typed errors; decoding never panics.
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

mod codec;
mod message;
mod node_id;
mod pipeline;
mod tensor;
mod train;

pub use codec::{FrameDecoder, decode_frame, encode_frame};
pub use message::{Hello, Message, PeerAddr, Refusal};
pub use node_id::NodeId;
pub use pipeline::{
    Finish, Forward, GenerateRequest, SampledToken, SeqChunk, SeqParams, TokenLogprobs,
    check_adapter_id,
};
pub use tensor::{TensorFrame, WireDType};
pub use train::{MicroKey, MicroLayout, TrainMsg};

/// Protocol version carried in [`Hello`]; peers with another version are
/// refused. Version 2 added penalties, logit bias, log-probabilities and
/// grammars to a sequence's parameters, and log-probabilities to sampled
/// tokens; version 3, scoring a prompt (its tokens' log-probabilities, for
/// completions' `echo` with `logprobs`); version 4, the receiving stage in
/// training messages (a node may run a job's first and last stages: the
/// U-shaped pipeline that keeps token ids and labels on the data's node);
/// version 5, a sequence's LoRA adapter (served beside the base model).
pub const PROTOCOL_VERSION: u16 = 5;

/// QUIC ALPN of protocol version 5.
pub const ALPN: &[u8] = b"hearth/5";

/// Named size limits, checked on send and on receive.
pub mod limits {
    /// Largest frame of any kind (tag + body): a tensor frame carries at most
    /// this many bytes of activations or gradients.
    pub const MAX_FRAME: usize = 64 * 1024 * 1024;
    /// Largest frame of a control message (everything but tensors).
    pub const MAX_CONTROL_FRAME: usize = 64 * 1024;
    /// Longest string field (names, reasons).
    pub const MAX_STRING: usize = 1024;
    /// Most dimensions of a tensor.
    pub const MAX_DIMS: usize = 8;
    /// Most entries in a `Peers` message (a home cluster is far smaller).
    pub const MAX_PEERS: usize = 256;
    /// Largest profile document (a device's hardware, times and links; a
    /// few kilobytes for a home cluster).
    pub const MAX_PROFILE: usize = 48 * 1024;
    /// Largest bandwidth-probe payload.
    pub const MAX_PROBE: usize = 16 * 1024 * 1024;
    /// Most sequences in one pipeline batch (`Forward`, `Sampled`, `EndSeqs`).
    pub const MAX_BATCH_SEQS: usize = 1024;
    /// Most end tokens of one sequence.
    pub const MAX_STOP_IDS: usize = 16;
    /// Most `logit_bias` entries of one sequence.
    pub const MAX_LOGIT_BIAS: usize = 1024;
    /// Most alternatives returned with a sampled token's log-probability.
    pub const MAX_TOP_LOGPROBS: usize = 20;
    /// Largest output constraint (an llguidance grammar as JSON) of one
    /// sequence: a big JSON schema or a few tool schemas.
    pub const MAX_GRAMMAR: usize = 256 * 1024;
    /// Longest prompt whose tokens' log-probabilities one sequence asks for
    /// (its logits are all computed at once on the last stage).
    pub const MAX_SCORED_PROMPT: usize = 8192;
    /// Length of a LoRA adapter's id: the hex BLAKE3 of its files.
    pub const ADAPTER_ID_LEN: usize = 64;
    /// Longest prompt in a `Generate` request, in tokens.
    pub const MAX_PROMPT_TOKENS: usize = 128 * 1024;
    /// Largest control document (a placement of a home cluster's stages,
    /// or the manifest of a weight transfer: one entry per tensor).
    pub const MAX_CONTROL_DOC: usize = 1024 * 1024;
    /// Largest chunk of a file in one frame (weight transfer).
    pub const MAX_FILE_CHUNK: usize = 4 * 1024 * 1024;
    /// Most token slots (rows × length) in one training micro-batch.
    pub const MAX_TRAIN_TOKENS: usize = 1 << 20;
    /// Largest trainable state (parameters and optimizer moments) of one
    /// stage sent in chunks for a checkpoint.
    pub const MAX_TRAIN_STATE: usize = 16 << 30;
}

/// What a stream is for, sent as [`Message::Open`] when it is opened; the
/// receiver routes it to the handler registered for that kind.
pub mod stream_kind {
    /// Heartbeats and member gossip between two members.
    pub const MEMBERSHIP: u16 = 1;
    /// Echo of tensor frames, for transport benchmarks and tests.
    pub const ECHO: u16 = 2;
    /// Fetch a member's device profile (`Profile` in reply).
    pub const PROFILE: u16 = 3;
    /// Bandwidth probe: `ProbeData` in, `ProbeAck` out.
    pub const PROBE: u16 = 4;
    /// Pipeline traffic from one member to another (`Forward`, `Sampled`,
    /// `EndSeqs`), one long-lived ordered stream per direction.
    pub const PIPE: u16 = 5;
    /// A generation request to stage 0: `Generate` in, `Sampled` out (or
    /// `Refuse`); closing the stream cancels the request.
    pub const GENERATE: u16 = 6;
    /// Placement of stages: `Control` in, `Control` out.
    pub const CONTROL: u16 = 7;
    /// Weight transfer: a `Control` fetch in; a `Control` manifest and
    /// `FileChunk`s out.
    pub const WEIGHTS: u16 = 8;
    /// Pipeline-parallel training: `Train` messages, one ordered stream
    /// per direction per pair of nodes.
    pub const TRAIN: u16 = 9;
}

/// Codes in [`Refusal`]: why a peer was turned away.
pub mod refusal {
    /// The peer speaks another protocol version.
    pub const VERSION: u16 = 1;
    /// The peer could not prove it knows the cluster secret.
    pub const AUTH: u16 = 2;
    /// The hello does not match the peer's TLS certificate.
    pub const IDENTITY: u16 = 3;
    /// The peer has this node's own identity.
    pub const SELF: u16 = 4;
    /// The peer broke the handshake (unexpected message, bad frame, timeout).
    pub const PROTOCOL: u16 = 5;
}

/// Everything that can be wrong with bytes from a peer or a message to send.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtoError {
    #[error("frame of {len} bytes exceeds the limit of {max}")]
    FrameTooLarge { len: usize, max: usize },
    #[error("empty frame")]
    EmptyFrame,
    #[error("unknown message tag {0:#04x}")]
    UnknownTag(u8),
    #[error("truncated {what}: needs {needed} bytes, {available} left")]
    Truncated {
        what: &'static str,
        needed: usize,
        available: usize,
    },
    #[error("{extra} unexpected bytes after a {what} message")]
    TrailingBytes { what: &'static str, extra: usize },
    #[error("string field {what} of {len} bytes exceeds the limit of {max}")]
    StringTooLong {
        what: &'static str,
        len: usize,
        max: usize,
    },
    #[error("string field {what} is not UTF-8")]
    BadUtf8 { what: &'static str },
    #[error("unknown tensor dtype {0}")]
    UnknownDType(u8),
    #[error("tensor has {dims} dimensions, at most {max} allowed")]
    TooManyDims { dims: usize, max: usize },
    #[error("tensor of shape {shape:?} as {dtype:?} needs {expected} bytes, frame has {actual}")]
    TensorSize {
        shape: Vec<u32>,
        dtype: WireDType,
        expected: usize,
        actual: usize,
    },
    #[error("invalid field {what}: {detail}")]
    InvalidField { what: &'static str, detail: String },
}
