//! The one error type of `hearth-models`.

use std::path::PathBuf;

/// Everything that can go wrong while loading or running a model.
///
/// Variants carry the data a user needs to fix the problem; the `Display`
/// text is meant to be shown as a one-line error by the CLI.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("model not found: {what}{hint}")]
    NotFound { what: String, hint: String },
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a valid GGUF file: {reason}")]
    BadGguf { path: PathBuf, reason: String },
    #[error(
        "{path} is truncated: tensor {tensor} ends at byte {needed} but the file has {len} bytes"
    )]
    Truncated {
        path: PathBuf,
        tensor: String,
        needed: u64,
        len: u64,
    },
    #[error("unsupported architecture {arch:?} (supported: {supported})")]
    UnsupportedArchitecture { arch: String, supported: String },
    #[error(
        "unsupported tensor type {dtype} for {tensor} (supported: F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K..Q8_K)"
    )]
    UnsupportedQuant { tensor: String, dtype: String },
    #[error("missing metadata {key}")]
    MissingMetadata { key: String },
    #[error("missing tensor {name}")]
    MissingTensor { name: String },
    #[error("tensor {name} has shape {actual:?}, expected {expected:?}")]
    ShapeMismatch {
        name: String,
        expected: Vec<usize>,
        actual: Vec<usize>,
    },
    #[error("invalid model config: {0}")]
    InvalidConfig(String),
    #[error("invalid layer range {start}..{end} for a model of {layers} layers")]
    BadLayerRange {
        start: usize,
        end: usize,
        layers: usize,
    },
    #[error("stage input does not match the stage: {0}")]
    BadStageInput(String),
    #[error("GPU: {0}")]
    Gpu(String),
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("unsupported tokenizer {model:?} / pre-tokenizer {pre:?}")]
    UnsupportedTokenizer { model: String, pre: String },
    #[error("chat template: {0}")]
    Template(String),
    #[error("the prompt is empty")]
    EmptyPrompt,
    #[error("the prompt has {tokens} tokens but the context holds {context}")]
    PromptTooLong { tokens: usize, context: usize },
    #[error("token id {id} is outside the vocabulary of {vocab}")]
    TokenOutOfRange { id: u32, vocab: usize },
    #[error("invalid sampling parameter: {0}")]
    BadSampling(String),
    #[error("output constraint: {0}")]
    Grammar(String),
    #[error("model download failed: {0}")]
    Pull(String),
    #[error("training data, line {line}: {reason}")]
    BadData { line: usize, reason: String },
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// Result alias for this crate.
pub type Result<T, E = ModelError> = std::result::Result<T, E>;

impl ModelError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            source,
        }
    }
}
