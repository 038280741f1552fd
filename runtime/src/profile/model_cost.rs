//! The model as the planner sees it, read from the weight file: bytes per
//! layer as stored, FLOPs, and the sizes of activations and KV cache.

use hearth_models::weights::LayerTensor;
use hearth_models::{TensorId, WeightFile};
use hearth_partitioner::{LayerCost, ModelProfile};

/// Bytes of an f32 (activations on the wire and KV cache are f32).
const F32: u64 = 4;
/// Sequence length assumed for the attention scores a training forward
/// keeps (they grow with it; the rest of a layer's activations do not).
const TRAIN_SEQ: u64 = 256;

/// The cost profile of the model in `weights`.
pub fn model_cost(weights: &WeightFile) -> ModelProfile {
    let c = weights.config();
    let h = c.hidden_size as u64;
    let i = c.intermediate_size as u64;
    let q = (c.num_attention_heads * c.head_dim) as u64;
    let kv = (c.num_key_value_heads * c.head_dim) as u64;
    let heads = c.num_attention_heads as u64;
    let bytes = |id: TensorId| weights.stored_bytes(id).unwrap_or(0);
    // Multiply-adds per token of the layer's matrices (attention over the
    // context grows with it and is left out: it is small at home lengths).
    let matmul = h * q + 2 * h * kv + q * h + 3 * h * i;
    // What a training forward keeps per token: norm inputs and outputs, q,
    // k, v before and after RoPE, attention output, the MLP's four
    // intermediates, residuals; plus scores and probabilities per head.
    let train_act = F32 * (6 * h + 2 * (q + 2 * kv) + q + 4 * i) + 2 * F32 * heads * TRAIN_SEQ;
    let layers = (0..c.num_hidden_layers)
        .map(|l| {
            let param_bytes = LayerTensor::of(c)
                .into_iter()
                .map(|t| bytes(TensorId::Layer(l, t)))
                .sum();
            LayerCost {
                param_bytes,
                flops_per_token: 2.0 * matmul as f64,
                act_bytes_per_token: F32 * h,
                kv_bytes_per_token: 2 * F32 * kv,
                train_act_bytes_per_token: train_act,
            }
        })
        .collect();
    let vocab = c.vocab_size as u64;
    let embed_bytes = bytes(TensorId::Embed);
    let tied = c.tie_word_embeddings || !weights.contains(TensorId::Head);
    let head_bytes = if tied {
        embed_bytes
    } else {
        bytes(TensorId::Head)
    } + bytes(TensorId::FinalNorm);
    let name = weights
        .path()
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model".into());
    ModelProfile {
        name,
        layers,
        embed: LayerCost {
            param_bytes: embed_bytes,
            flops_per_token: 0.0,
            act_bytes_per_token: F32 * h,
            kv_bytes_per_token: 0,
            train_act_bytes_per_token: 0,
        },
        head: LayerCost {
            param_bytes: head_bytes,
            flops_per_token: 2.0 * (h * vocab) as f64,
            act_bytes_per_token: F32 * vocab,
            kv_bytes_per_token: 0,
            // Normalised input and logits.
            train_act_bytes_per_token: F32 * (2 * h + vocab),
        },
        tied_embeddings: tied,
    }
}
