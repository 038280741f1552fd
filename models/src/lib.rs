//! Hearth's model core: a llama-family decoder in candle that can be sliced
//! into pipeline stages by layer range, its loaders (GGUF, safetensors), the
//! tokenizer and chat template, sampling and single-node generation.
//!
//! This crate knows nothing about the network.
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

pub mod adapter;
pub mod chat;
pub mod config;
pub mod dirs;
pub mod durable;
pub mod error;
pub mod generate;
pub mod gguf;
#[cfg(feature = "wgpu")]
pub mod gpu;
pub mod grammar;
pub mod hub;
pub mod kv_cache;
pub mod layers;
pub mod quant;
pub mod sampling;
pub mod split;
pub mod stage;
pub mod store;
pub mod threads;
pub mod tokenizer;
pub mod tools;
pub mod train;
pub mod weights;

pub use adapter::StageAdapter;
pub use chat::{ChatInputs, ChatTemplate, Message};
pub use config::Config;
pub use error::{ModelError, Result};
pub use generate::{
    FinishReason, GenerateRequest, Generation, LocalModel, ModelText, TemplateSource, TextStream,
};
pub use kv_cache::KvCache;
pub use sampling::{Allowed, Constraint, Pick, Sampler, SamplingParams, Shaping};
pub use stage::{Logits, Precision, Stage, StageInput, StageSpec};
pub use tokenizer::Tokenizer;
pub use weights::{TensorId, TensorLayout, WeightFile};
