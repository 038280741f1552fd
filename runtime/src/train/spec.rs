//! What a fine-tuning job asks for: `JobSpec` (the fields of a `hearth
//! train` job file, and of the API's jobs with their `hearth` extras),
//! with its defaults and the checks a spec must pass before anything runs.

use std::path::PathBuf;

use hearth_models::train::{Batching, LoraConfig, Method, Target};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::host::{MAX_LORA_RANK, MAX_SEQ_LEN};
use super::schedule::Schedule;

/// What to train, on what, and how (`hearth train JOB.toml`, or the API).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobSpec {
    /// The model the cluster serves (its id in `/v1/models`).
    pub model: String,
    /// JSONL on this node.
    pub data: PathBuf,
    /// Held-out examples (the same JSONL format): the trained model's mean
    /// loss on them is reported when the job ends (`validation_loss`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub validation: Option<PathBuf>,
    #[serde(default)]
    pub method: MethodSpec,
    /// Passes over the data (ignored when `steps` is set).
    #[serde(default = "defaults::epochs")]
    pub epochs: u64,
    /// Optimizer steps (instead of epochs).
    #[serde(default)]
    pub steps: Option<u64>,
    /// Examples per optimizer step.
    #[serde(default = "defaults::batch_size")]
    pub batch_size: usize,
    /// Micro-batches per step (`m`; at most `batch_size`).
    #[serde(default = "defaults::micro_batches")]
    pub micro_batches: u32,
    /// Longest example in tokens (longer ones are cut).
    #[serde(default = "defaults::seq_len")]
    pub seq_len: usize,
    /// Pack several examples into each row.
    #[serde(default)]
    pub pack: bool,
    #[serde(default = "defaults::learning_rate")]
    pub learning_rate: f64,
    #[serde(default)]
    pub warmup_steps: u64,
    /// The cosine decay ends at `learning_rate * min_lr_ratio`.
    #[serde(default = "defaults::min_lr_ratio")]
    pub min_lr_ratio: f64,
    #[serde(default)]
    pub weight_decay: f64,
    #[serde(default = "defaults::max_grad_norm")]
    pub max_grad_norm: f64,
    #[serde(default)]
    pub schedule: Schedule,
    #[serde(default = "defaults::seed")]
    pub seed: u64,
    /// Checkpoint every this many steps (0: only at the end).
    #[serde(default = "defaults::checkpoint_every")]
    pub checkpoint_every: u64,
    /// Where checkpoints and the adapter go.
    pub output_dir: PathBuf,
    /// Part of the fine-tuned model's name.
    #[serde(default)]
    pub suffix: Option<String>,
    /// Also write a merged model the cluster can serve.
    #[serde(default = "defaults::yes")]
    pub merge: bool,
    /// Write the merged model's changed tensors in the base's quantized
    /// type (a file the size of the base) instead of f32.
    #[serde(default)]
    pub quantize_merged: bool,
    /// Longest wait for one stage message, in seconds.
    #[serde(default = "defaults::timeout_s")]
    pub timeout_s: u64,
    /// Keep the token ids and labels on this node (the data's): it runs
    /// the embedding and the head with the loss itself, as the first and
    /// the last stage of a U-shaped pipeline, and other nodes see only
    /// activations and gradients. Unset: whenever this node can hold them
    /// (else the job says it could not, and goes on); `true`: always (the
    /// job fails where it cannot); `false`: never.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_data_home: Option<bool>,
}

mod defaults {
    pub fn epochs() -> u64 {
        3
    }
    pub fn batch_size() -> usize {
        8
    }
    pub fn micro_batches() -> u32 {
        4
    }
    pub fn seq_len() -> usize {
        512
    }
    pub fn learning_rate() -> f64 {
        2e-4
    }
    pub fn min_lr_ratio() -> f64 {
        0.1
    }
    pub fn max_grad_norm() -> f64 {
        1.0
    }
    pub fn seed() -> u64 {
        42
    }
    pub fn checkpoint_every() -> u64 {
        50
    }
    pub fn yes() -> bool {
        true
    }
    pub fn timeout_s() -> u64 {
        600
    }
}

/// `method` of a job file: LoRA (the default) or full fine-tuning.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum MethodSpec {
    Lora {
        #[serde(default = "lora::rank")]
        rank: usize,
        #[serde(default = "lora::alpha")]
        alpha: f64,
        #[serde(default)]
        dropout: f64,
        #[serde(default = "lora::targets")]
        targets: Vec<Target>,
    },
    Full,
}

mod lora {
    pub fn rank() -> usize {
        8
    }
    pub fn alpha() -> f64 {
        16.0
    }
    pub fn targets() -> Vec<hearth_models::train::Target> {
        hearth_models::train::Target::ALL.to_vec()
    }
}

impl Default for MethodSpec {
    fn default() -> Self {
        Self::Lora {
            rank: lora::rank(),
            alpha: lora::alpha(),
            dropout: 0.0,
            targets: lora::targets(),
        }
    }
}

impl MethodSpec {
    pub fn method(&self) -> Method {
        match self {
            Self::Lora {
                rank,
                alpha,
                dropout,
                targets,
            } => Method::Lora(LoraConfig {
                rank: *rank,
                alpha: *alpha,
                dropout: *dropout,
                targets: targets.clone(),
                init_b_std: 0.0,
            }),
            Self::Full => Method::Full,
        }
    }
}

impl JobSpec {
    /// How the job cuts its data into steps and micro-batches (m is at
    /// most the batch size).
    pub fn batching(&self) -> Batching {
        Batching {
            batch_size: self.batch_size,
            micro_batches: (self.micro_batches as usize).min(self.batch_size).max(1),
            pack: self.pack,
            seq_len: self.seq_len,
            seed: self.seed,
        }
    }

    /// Checks the numbers a person typed.
    pub fn check(&self) -> Result<(), String> {
        let bad = |s: String| Err(s);
        if self.batch_size == 0 || self.batch_size > 65_536 {
            return bad(format!(
                "batch_size {} is not in 1..=65536",
                self.batch_size
            ));
        }
        if self.micro_batches == 0 || self.micro_batches > 1024 {
            return bad(format!(
                "micro_batches {} is not in 1..=1024",
                self.micro_batches
            ));
        }
        if self.seq_len < 2 || self.seq_len > MAX_SEQ_LEN {
            return bad(format!(
                "seq_len {} is not in 2..={MAX_SEQ_LEN}",
                self.seq_len
            ));
        }
        if self.steps.is_none() && !(1..=1000).contains(&self.epochs) {
            return bad(format!("epochs {} is not in 1..=1000", self.epochs));
        }
        if self.steps == Some(0) {
            return bad("steps must be at least 1".into());
        }
        for (name, v) in [
            ("learning_rate", self.learning_rate),
            ("max_grad_norm", self.max_grad_norm),
        ] {
            if !(v.is_finite() && v > 0.0 && v < 10.0) {
                return bad(format!("{name} {v} is not in (0, 10)"));
            }
        }
        if !(0.0..=1.0).contains(&self.min_lr_ratio) || !(0.0..1.0).contains(&self.weight_decay) {
            return bad("min_lr_ratio must be in [0, 1] and weight_decay in [0, 1)".into());
        }
        if let MethodSpec::Lora {
            rank,
            dropout,
            targets,
            alpha,
        } = &self.method
        {
            if *rank == 0 || *rank > MAX_LORA_RANK || targets.is_empty() || !alpha.is_finite() {
                return bad(format!(
                    "LoRA needs a rank in 1..={MAX_LORA_RANK}, an alpha and targets"
                ));
            }
            if !(0.0..1.0).contains(dropout) {
                return bad(format!("LoRA dropout {dropout} is not in [0, 1)"));
            }
        }
        if let Some(s) = &self.suffix
            && (s.len() > 40
                || !s
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'))
        {
            return bad("suffix: up to 40 letters, digits, '-' or '_'".into());
        }
        if !(1..=86_400).contains(&self.timeout_s) {
            return bad(format!("timeout_s {} is not in 1..=86400", self.timeout_s));
        }
        Ok(())
    }

    /// What a checkpoint must agree with to be resumed.
    pub(crate) fn fingerprint(&self) -> Value {
        json!({
            "model": self.model, "method": self.method, "batch_size": self.batch_size,
            "micro_batches": self.micro_batches, "seq_len": self.seq_len, "pack": self.pack,
            "seed": self.seed, "epochs": self.epochs, "steps": self.steps,
        })
    }
}
