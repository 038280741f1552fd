//! Training on the model core: trainable stages (LoRA or full), the loss,
//! and the optimizer. The pipeline schedule and the network live in
//! `hearth-runtime`; everything here works on one stage in one process.

pub mod batch;
pub mod data;
pub mod export;
mod fused;
pub mod optim;
pub mod rng;
pub mod stage;

pub use batch::{BatchLayout, IGNORE, MicroBatch};
pub use data::{Batching, Example, Tokenized, load_jsonl, parse_jsonl, tokenize};
pub use optim::{AdamW, AdamWConfig, LrSchedule};
pub use stage::{
    Backward, DropCtx, LoraConfig, Method, StepGrads, Target, TrainInput, TrainOptions, TrainStage,
    Upstream, accumulate, lora_name, loss_sum, step_grads,
};
