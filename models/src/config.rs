//! Model hyper-parameters, read from GGUF metadata or a Hugging Face `config.json`.

use serde::{Deserialize, Serialize};

use crate::error::{ModelError, Result};

/// Most layers a model may declare (the largest open models have under
/// 200): per-layer tables are built from the count before anything else
/// checks it.
pub const MAX_LAYERS: usize = 4096;

/// Architectures whose decoder this crate implements (llama family).
pub const SUPPORTED_ARCHITECTURES: &[&str] = &[
    "llama", "qwen2", "qwen3", "mistral", "gemma2", "gemma3", "phi3",
];

/// The error for a mixture-of-experts model: what it is, and that Hearth
/// runs dense decoders only.
pub fn moe_refusal(arch: &str, experts: usize, used: Option<usize>) -> String {
    let what = match (experts, used) {
        (0, _) => String::new(),
        (n, Some(k)) => format!(", {n} experts with {k} used per token"),
        (n, None) => format!(", {n} experts"),
    };
    format!(
        "{arch} is a mixture-of-experts model{what}; Hearth runs dense decoders only and does not run MoE models (Mixtral, Qwen3-MoE, DeepSeek) yet"
    )
}

/// Hyper-parameters of a llama-family decoder.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Config {
    pub architecture: String,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub rope_theta: f64,
    pub rms_norm_eps: f64,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    /// Biases on the q/k/v projections (Qwen2).
    pub attention_bias: bool,
    /// How the rotary frequencies are rescaled for long contexts (Llama
    /// 3.x); none: plain RoPE.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_scaling: Option<RopeScaling>,
    /// Sliding-window attention: a query at position p sees the keys at
    /// positions p - w < j <= p (w keys, itself included), as transformers
    /// masks them. Mistral 7B v0.1's every layer; Qwen's layers from
    /// `max_window_layers` on when `use_sliding_window` is set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sliding_window: Option<usize>,
    /// Which layers slide (by global index); empty: all of them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sliding_layers: Vec<bool>,
    /// The MLP's gate activation.
    #[serde(default)]
    pub hidden_act: Activation,
    /// Attention scores are scaled by `1/sqrt(query_pre_attn_scalar)`
    /// (Gemma) rather than `1/sqrt(head_dim)`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub query_pre_attn_scalar: Option<f64>,
    /// Attention scores soft-capped to `(-c, c)` by `c·tanh(s/c)` before
    /// the mask (Gemma 2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attn_logit_softcap: Option<f64>,
    /// Output logits soft-capped the same way (Gemma 2, some Gemma 3).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub final_logit_softcap: Option<f64>,
    /// The RoPE theta of sliding-window layers, unscaled, where it differs
    /// from the global layers' (Gemma 3's local RoPE).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_local_theta: Option<f64>,
    /// Lanes of each head that RoPE rotates (the first ones, paired within
    /// them), where not all: Phi-4-mini's `partial_rotary_factor`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rotary_dim: Option<usize>,
}

/// The activation of the MLP's gate.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    /// `x·sigmoid(x)` (Llama, Qwen, Mistral, Phi).
    #[default]
    Silu,
    /// GELU's tanh approximation, `gelu_pytorch_tanh` (Gemma).
    GeluTanh,
}

impl Activation {
    /// Reads a transformers activation name.
    pub fn from_hf(name: &str) -> Result<Self> {
        match name {
            "silu" | "swish" => Ok(Self::Silu),
            "gelu_pytorch_tanh" | "gelu_new" | "gelu_fast" => Ok(Self::GeluTanh),
            other => Err(ModelError::InvalidConfig(format!(
                "the MLP activation {other:?} is not supported (supported: silu, gelu_pytorch_tanh)"
            ))),
        }
    }
}

/// A rescaling of the rotary frequencies.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum RopeScaling {
    /// Llama 3.1's: wavelengths longer than `original_max_position_embeddings
    /// / low_freq_factor` are stretched by `factor`, those shorter than
    /// `... / high_freq_factor` kept, and the ones between blended.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: f64,
    },
    /// Every frequency divided by `factor` (positions interpolated): Gemma
    /// 3's global layers, older long-context Llama 2s.
    Linear { factor: f64 },
    /// Phi-3's LongRoPE: per-frequency divisors, `short_factor` for a
    /// sequence that stays within `original_max_position_embeddings`,
    /// `long_factor` once it runs past (decided per forward pass from the
    /// sequence's last position, as transformers does), cos and sin scaled
    /// by `attention_factor`.
    LongRope {
        short_factor: Vec<f64>,
        long_factor: Vec<f64>,
        original_max_position_embeddings: f64,
        attention_factor: f64,
    },
    /// One divisor per rotary frequency, as llama.cpp's GGUF files store a
    /// scaling (`rope_freqs.weight`: Llama 3.x's, computed by its converter).
    Factors { factors: Vec<f64> },
}

impl RopeScaling {
    /// The rescaled inverse frequency `inv` (radians per position) of
    /// rotary pair `i`.
    pub fn apply(&self, i: usize, inv: f64) -> f64 {
        match *self {
            Self::Factors { ref factors } => inv / factors.get(i).copied().unwrap_or(1.0),
            Self::Linear { factor } => inv / factor,
            // The short table; `Rope` builds the long one beside it.
            Self::LongRope {
                ref short_factor, ..
            } => inv / short_factor.get(i).copied().unwrap_or(1.0),
            Self::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings: old,
            } => {
                let wavelen = 2.0 * std::f64::consts::PI / inv;
                if wavelen < old / high_freq_factor {
                    inv
                } else if wavelen > old / low_freq_factor {
                    inv / factor
                } else {
                    let smooth =
                        (old / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor);
                    (1.0 - smooth) * inv / factor + smooth * inv
                }
            }
        }
    }

    fn validate(&self, head_dim: usize) -> std::result::Result<(), String> {
        match *self {
            Self::LongRope {
                ref short_factor,
                ref long_factor,
                original_max_position_embeddings,
                attention_factor,
            } => {
                for f in [short_factor, long_factor] {
                    Self::Factors { factors: f.clone() }.validate(head_dim)?;
                }
                let orig_ok = original_max_position_embeddings.is_finite()
                    && original_max_position_embeddings >= 1.0;
                if !orig_ok || !attention_factor.is_finite() || attention_factor <= 0.0 {
                    return Err(
                        "longrope needs a positive original context and attention factor".into(),
                    );
                }
                Ok(())
            }
            Self::Linear { factor } => {
                if !factor.is_finite() || factor <= 0.0 {
                    return Err(format!(
                        "linear rope_scaling factor {factor} must be positive"
                    ));
                }
                Ok(())
            }
            Self::Factors { ref factors } => {
                if factors.len() != head_dim / 2 {
                    return Err(format!(
                        "{} RoPE frequency factors for a head of {head_dim} (want {})",
                        factors.len(),
                        head_dim / 2
                    ));
                }
                if factors.iter().any(|f| !f.is_finite() || *f <= 0.0) {
                    return Err("RoPE frequency factors must be positive".into());
                }
                Ok(())
            }
            Self::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => {
                let all = [
                    factor,
                    low_freq_factor,
                    high_freq_factor,
                    original_max_position_embeddings,
                ];
                if all.iter().any(|v| !v.is_finite() || *v <= 0.0) {
                    return Err("llama3 rope_scaling values must be positive".into());
                }
                if high_freq_factor <= low_freq_factor {
                    return Err(format!(
                        "llama3 rope_scaling: high_freq_factor {high_freq_factor} must exceed low_freq_factor {low_freq_factor}"
                    ));
                }
                Ok(())
            }
        }
    }
}

/// Reads `rope_scaling` (or transformers 5's `rope_parameters`) of a
/// `config.json`: Llama 3's; none, or a `default`
/// type, is plain RoPE; any other type is refused by name rather than run
/// wrong.
/// `max_pos` and `original` (a top-level `original_max_position_embeddings`,
/// which wins over one inside, as in transformers) complete LongRoPE's.
fn hf_rope_scaling(
    v: Option<&serde_json::Value>,
    max_pos: usize,
    original: Option<f64>,
) -> Result<Option<RopeScaling>> {
    let Some(v) = v.filter(|v| !v.is_null()) else {
        return Ok(None);
    };
    // No type and no factor (e.g. `rope_parameters` with only a theta):
    // plain RoPE.
    let kind = v
        .get("rope_type")
        .or_else(|| v.get("type"))
        .and_then(serde_json::Value::as_str)
        .unwrap_or(if v.get("factor").is_some() {
            ""
        } else {
            "default"
        });
    let num = |k: &str| -> Result<f64> {
        v.get(k).and_then(serde_json::Value::as_f64).ok_or_else(|| {
            ModelError::InvalidConfig(format!("rope_scaling of type {kind} needs a number {k}"))
        })
    };
    match kind {
        "default" => Ok(None),
        "linear" => Ok(Some(RopeScaling::Linear {
            factor: num("factor")?,
        })),
        "llama3" => Ok(Some(RopeScaling::Llama3 {
            factor: num("factor")?,
            low_freq_factor: num("low_freq_factor")?,
            high_freq_factor: num("high_freq_factor")?,
            original_max_position_embeddings: num("original_max_position_embeddings")?,
        })),
        "longrope" | "su" => {
            let factors = |k: &str| -> Result<Vec<f64>> {
                v.get(k)
                    .and_then(serde_json::Value::as_array)
                    .and_then(|a| a.iter().map(serde_json::Value::as_f64).collect())
                    .ok_or_else(|| {
                        ModelError::InvalidConfig(format!(
                            "rope_scaling of type {kind} needs a list of numbers {k}"
                        ))
                    })
            };
            let orig = match original {
                Some(o) => o,
                None => num("original_max_position_embeddings")?,
            };
            // transformers' defaults: the context's stretch (always, when
            // the original context is a top-level key), and the attention
            // factor that follows from it.
            let factor = match (
                original,
                v.get("factor").and_then(serde_json::Value::as_f64),
            ) {
                (None, Some(f)) => f,
                _ => max_pos as f64 / orig,
            };
            let attention_factor = match v
                .get("attention_factor")
                .and_then(serde_json::Value::as_f64)
            {
                Some(a) => a,
                None if factor <= 1.0 => 1.0,
                None => (1.0 + factor.ln() / orig.ln()).sqrt(),
            };
            Ok(Some(RopeScaling::LongRope {
                short_factor: factors("short_factor")?,
                long_factor: factors("long_factor")?,
                original_max_position_embeddings: orig,
                attention_factor,
            }))
        }
        other => Err(ModelError::InvalidConfig(format!(
            "rope_scaling of type {other:?} is not supported (supported: llama3, linear, longrope)"
        ))),
    }
}

/// The sliding window of a `config.json` as transformers reads it: the
/// window and which layers slide (empty: all).
/// - Mistral: every layer, `sliding_window` (4096 where the key is missing,
///   none where it is null); transformers ignores `layer_types` there.
/// - Qwen2/3: only with `use_sliding_window`, the layers from
///   `max_window_layers` (28) on, or as `layer_types` names them.
/// - Gemma 2/3: `sliding_window` (4096 where missing), on the layers
///   `layer_types` names, or else all but every `pattern`-th (Gemma 2: 2,
///   the even layers slide; Gemma 3: `sliding_window_pattern`, 6).
/// - Others (Llama): full attention; a `layer_types` naming sliding layers
///   is refused.
///
/// `layer_types` naming any other kind is refused, as transformers does.
fn hf_sliding_window(
    arch: &str,
    sliding_window: Option<&serde_json::Value>,
    use_sliding_window: bool,
    max_window_layers: Option<usize>,
    layer_types: &[String],
    layers: usize,
    pattern: Option<usize>,
) -> Result<(Option<usize>, Vec<bool>)> {
    let bad = |m: String| Err(ModelError::InvalidConfig(m));
    // Missing: None; null: Some(None).
    let window = match sliding_window {
        None => None,
        Some(v) if v.is_null() => Some(None),
        Some(v) => match v.as_u64().and_then(|w| usize::try_from(w).ok()) {
            Some(w) if w > 0 => Some(Some(w)),
            _ => return bad(format!("sliding_window {v} is not a positive size")),
        },
    };
    let mut named = Vec::with_capacity(layer_types.len());
    for t in layer_types {
        named.push(match t.as_str() {
            "full_attention" => false,
            "sliding_attention" => true,
            other => {
                return bad(format!(
                    "layer_types names {other:?} layers; only full and sliding attention are supported"
                ));
            }
        });
    }
    match arch {
        "mistral" => Ok((window.unwrap_or(Some(4096)), Vec::new())),
        // Every layer, where set (transformers applies it; llama.cpp
        // currently runs Phi-3 with full attention).
        "phi3" => Ok((window.flatten(), Vec::new())),
        "qwen2" | "qwen3" | "gemma2" | "gemma3" => {
            let gemma = arch.starts_with("gemma");
            let w = if use_sliding_window || gemma {
                window.unwrap_or(Some(4096))
            } else {
                None
            };
            let Some(w) = w else {
                return Ok((None, Vec::new()));
            };
            let kinds = if named.is_empty() && gemma {
                let period = if arch == "gemma2" {
                    2
                } else {
                    pattern.unwrap_or(6)
                };
                if period == 0 {
                    return bad("sliding_window_pattern 0".into());
                }
                (0..layers).map(|i| (i + 1) % period != 0).collect()
            } else if named.is_empty() {
                let from = max_window_layers.unwrap_or(28);
                (0..layers).map(|i| i >= from).collect()
            } else if named.len() == layers {
                named
            } else {
                return bad(format!(
                    "layer_types names {} layers of {layers}",
                    named.len()
                ));
            };
            Ok(if kinds.contains(&true) {
                (Some(w), kinds)
            } else {
                (None, Vec::new())
            })
        }
        _ if named.contains(&true) => bad(format!(
            "layer_types names \"sliding_attention\" layers; only full attention is supported for {arch}"
        )),
        _ => Ok((None, Vec::new())),
    }
}

impl Config {
    /// Checks the relations between fields that the decoder relies on.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(ModelError::InvalidConfig(m));
        if !SUPPORTED_ARCHITECTURES.contains(&self.architecture.as_str()) {
            return Err(ModelError::UnsupportedArchitecture {
                arch: self.architecture.clone(),
                supported: SUPPORTED_ARCHITECTURES.join(", "),
            });
        }
        if self.vocab_size == 0 || self.hidden_size == 0 || self.num_hidden_layers == 0 {
            return bad("vocab, hidden size and layer count must be positive".into());
        }
        if self.num_hidden_layers > MAX_LAYERS {
            return bad(format!(
                "{} layers (at most {MAX_LAYERS})",
                self.num_hidden_layers
            ));
        }
        if self.num_attention_heads == 0 || self.num_key_value_heads == 0 {
            return bad("head counts must be positive".into());
        }
        if !self
            .num_attention_heads
            .is_multiple_of(self.num_key_value_heads)
        {
            return bad(format!(
                "{} attention heads are not a multiple of {} KV heads",
                self.num_attention_heads, self.num_key_value_heads
            ));
        }
        if self.head_dim == 0 || !self.head_dim.is_multiple_of(2) {
            return bad(format!("head dim {} must be even", self.head_dim));
        }
        if self.rope_theta <= 0.0 || self.rms_norm_eps <= 0.0 {
            return bad("rope theta and rms eps must be positive".into());
        }
        if self.max_position_embeddings == 0 {
            return bad("context length must be positive".into());
        }
        let rot = self.rotary_dim();
        if rot == 0 || rot > self.head_dim || !rot.is_multiple_of(2) {
            return bad(format!(
                "RoPE over {rot} lanes of a head of {}",
                self.head_dim
            ));
        }
        if let Some(r) = &self.rope_scaling {
            r.validate(rot).map_err(ModelError::InvalidConfig)?;
            if self.rope_local_theta.is_some() && matches!(r, RopeScaling::LongRope { .. }) {
                return bad("LongRoPE with a local RoPE".into());
            }
        }
        let positive = |v: Option<f64>| v.is_none_or(|v| v.is_finite() && v > 0.0);
        if !positive(self.query_pre_attn_scalar)
            || !positive(self.attn_logit_softcap)
            || !positive(self.final_logit_softcap)
            || !positive(self.rope_local_theta)
        {
            return bad(
                "query_pre_attn_scalar, soft-caps and the local RoPE theta must be positive".into(),
            );
        }
        if self.sliding_window == Some(0) {
            return bad("a sliding window of 0 tokens".into());
        }
        if !self.sliding_layers.is_empty() && self.sliding_layers.len() != self.num_hidden_layers {
            return bad(format!(
                "{} layer kinds for {} layers",
                self.sliding_layers.len(),
                self.num_hidden_layers
            ));
        }
        Ok(())
    }

    /// Whether each layer normalizes its query and key heads (RMSNorm over
    /// the head dimension, before RoPE): Qwen3.
    pub fn qk_norm(&self) -> bool {
        matches!(self.architecture.as_str(), "qwen3" | "gemma3")
    }

    /// Lanes of each head that RoPE rotates.
    pub fn rotary_dim(&self) -> usize {
        self.rotary_dim.unwrap_or(self.head_dim)
    }

    /// Whether the checkpoint stores q/k/v as one `qkv_proj` and gate/up as
    /// one `gate_up_proj` (Phi-3).
    pub fn fused_projections(&self) -> bool {
        self.architecture == "phi3"
    }

    /// Gemma's decoder: embeddings scaled by `sqrt(hidden)`, RMSNorms that
    /// multiply by `1 + w`, and a norm after attention and after the MLP
    /// as well as before them.
    pub fn is_gemma(&self) -> bool {
        matches!(self.architecture.as_str(), "gemma2" | "gemma3")
    }

    /// What each RMSNorm adds to its stored weight before multiplying
    /// (Gemma's `1 + w`; weights are held as transformers stores them).
    pub fn norm_shift(&self) -> f64 {
        if self.is_gemma() { 1.0 } else { 0.0 }
    }

    /// The factor token embeddings are multiplied by (Gemma: `sqrt(hidden)`
    /// in f32, as llama.cpp and transformers in f32 compute it).
    pub fn embed_scale(&self) -> Option<f64> {
        self.is_gemma()
            .then(|| f64::from((self.hidden_size as f32).sqrt()))
    }

    /// The multiplier of `q·k`.
    pub fn attn_scale(&self) -> f64 {
        1.0 / self
            .query_pre_attn_scalar
            .unwrap_or(self.head_dim as f64)
            .sqrt()
    }

    /// Whether layer `layer` (global index) uses the local RoPE.
    pub fn local_rope(&self, layer: usize) -> bool {
        self.rope_local_theta.is_some() && self.window(layer).is_some()
    }

    /// The attention window of layer `layer` (its global index), if it
    /// slides.
    pub fn window(&self, layer: usize) -> Option<usize> {
        let w = self.sliding_window?;
        (self.sliding_layers.is_empty() || self.sliding_layers.get(layer).copied() == Some(true))
            .then_some(w)
    }

    /// Query heads per KV head.
    pub fn gqa_groups(&self) -> usize {
        self.num_attention_heads / self.num_key_value_heads
    }

    /// Reads a Hugging Face `config.json`.
    pub fn from_hf_json(text: &str) -> Result<Self> {
        #[derive(Deserialize)]
        struct Hf {
            #[serde(default)]
            architectures: Vec<String>,
            #[serde(default)]
            model_type: Option<String>,
            vocab_size: usize,
            hidden_size: usize,
            intermediate_size: usize,
            num_hidden_layers: usize,
            num_attention_heads: usize,
            num_key_value_heads: Option<usize>,
            head_dim: Option<usize>,
            rope_theta: Option<f64>,
            #[serde(default = "default_eps")]
            rms_norm_eps: f64,
            max_position_embeddings: Option<usize>,
            tie_word_embeddings: Option<bool>,
            attention_bias: Option<bool>,
            #[serde(default)]
            rope_scaling: Option<serde_json::Value>,
            /// transformers 5's form: the theta and the scaling together.
            #[serde(default)]
            rope_parameters: Option<serde_json::Value>,
            /// Qwen's switch for its sliding-window layers.
            #[serde(default)]
            use_sliding_window: bool,
            /// Qwen: layers from this index on slide (when switched on).
            max_window_layers: Option<usize>,
            /// transformers 5: each layer's attention kind.
            #[serde(default)]
            layer_types: Vec<String>,
            /// Mixture-of-experts: Mixtral's, Qwen-MoE's, DeepSeek's counts.
            num_local_experts: Option<usize>,
            num_experts: Option<usize>,
            n_routed_experts: Option<usize>,
            num_experts_per_tok: Option<usize>,
            hidden_act: Option<String>,
            /// Gemma's name for the activation.
            hidden_activation: Option<String>,
            query_pre_attn_scalar: Option<f64>,
            /// Gemma 3: the unscaled theta of its sliding layers.
            rope_local_base_freq: Option<f64>,
            /// Gemma 3: every this-many-th layer is global.
            sliding_window_pattern: Option<usize>,
            #[serde(default)]
            use_bidirectional_attention: Option<bool>,
        }
        fn default_eps() -> f64 {
            1e-6
        }
        let invalid = |e: serde_json::Error| ModelError::InvalidConfig(format!("config.json: {e}"));
        let raw: serde_json::Value = serde_json::from_str(text).map_err(invalid)?;
        // A multimodal Gemma 3 (most of its downloads): its text decoder,
        // under `text_config`, runs alone (the vision tower is not read).
        let first_arch = raw
            .get("architectures")
            .and_then(|a| a.get(0))
            .and_then(serde_json::Value::as_str);
        let wrapper = first_arch == Some("Gemma3ForConditionalGeneration")
            || (raw.get("model_type").and_then(serde_json::Value::as_str) == Some("gemma3")
                && raw.get("vision_config").is_some());
        if wrapper && let Some(serde_json::Value::Object(text)) = raw.get("text_config") {
            let mut text = text.clone();
            text.entry("model_type")
                .or_insert_with(|| serde_json::json!("gemma3_text"));
            text.remove("architectures");
            // transformers' wrapper computes its logits with no final
            // soft-cap (released configs name none either).
            text.insert("final_logit_softcapping".into(), serde_json::Value::Null);
            // The wrapper's own keys the text decoder inherits.
            for k in ["tie_word_embeddings", "torch_dtype", "dtype"] {
                if let Some(v) = raw.get(k)
                    && !text.contains_key(k)
                {
                    text.insert(k.into(), v.clone());
                }
            }
            if text.get("model_type").and_then(serde_json::Value::as_str) != Some("gemma3_text") {
                return Err(ModelError::InvalidConfig(
                    "a Gemma 3 wrapper whose text_config is not gemma3_text".into(),
                ));
            }
            return Self::from_hf_json(&serde_json::Value::Object(text).to_string());
        }
        let hf = Hf::deserialize(&raw).map_err(invalid)?;
        let arch = match hf.model_type.as_deref() {
            Some(t) => t.to_string(),
            None => match hf.architectures.first().map(String::as_str) {
                Some("LlamaForCausalLM") => "llama".into(),
                Some("Qwen2ForCausalLM") => "qwen2".into(),
                Some("Qwen3ForCausalLM") => "qwen3".into(),
                Some("MistralForCausalLM") => "mistral".into(),
                Some("Gemma2ForCausalLM") => "gemma2".into(),
                Some("Gemma3ForCausalLM") => "gemma3".into(),
                Some("Phi3ForCausalLM") => "phi3".into(),
                other => other.unwrap_or("unknown").to_string(),
            },
        };
        // transformers names Gemma 3's text decoder apart from the
        // multimodal model that wraps it.
        let arch = if arch == "gemma3_text" {
            "gemma3".to_string()
        } else {
            arch
        };
        if raw.get("vision_config").is_some() || raw.get("text_config").is_some() {
            return Err(ModelError::InvalidConfig(format!(
                "{arch} here is a multimodal model (its text decoder under text_config); Hearth runs text decoders only: use the text-only checkpoint or a GGUF of it"
            )));
        }
        if hf.use_bidirectional_attention == Some(true) {
            return Err(ModelError::InvalidConfig(
                "use_bidirectional_attention (an embedding model) is not a causal decoder".into(),
            ));
        }
        let gemma = matches!(arch.as_str(), "gemma2" | "gemma3");
        // RoPE on part of each head (Phi-4-mini's 0.75).
        let partial = raw
            .get("partial_rotary_factor")
            .or_else(|| hf.rope_parameters.as_ref()?.get("partial_rotary_factor"))
            .and_then(serde_json::Value::as_f64)
            .filter(|f| *f != 1.0);
        if partial.is_some_and(|f| !(f > 0.0 && f <= 1.0)) {
            return Err(ModelError::InvalidConfig(format!(
                "partial_rotary_factor {partial:?} is not in (0, 1]"
            )));
        }
        let max_pos = hf.max_position_embeddings.unwrap_or(match arch.as_str() {
            "gemma2" => 8192,
            "gemma3" => 131_072,
            _ => 4096,
        });
        let original = raw
            .get("original_max_position_embeddings")
            .and_then(serde_json::Value::as_f64);
        let experts = hf
            .num_local_experts
            .or(hf.num_experts)
            .or(hf.n_routed_experts)
            .unwrap_or(0);
        if experts > 1 || arch.contains("moe") || arch == "mixtral" {
            return Err(ModelError::InvalidConfig(moe_refusal(
                &arch,
                experts,
                hf.num_experts_per_tok,
            )));
        }
        let attention_bias = hf.attention_bias.unwrap_or(arch == "qwen2");
        if hf.num_hidden_layers > MAX_LAYERS {
            return Err(ModelError::InvalidConfig(format!(
                "num_hidden_layers {} (at most {MAX_LAYERS})",
                hf.num_hidden_layers
            )));
        }
        let (sliding_window, sliding_layers) = hf_sliding_window(
            &arch,
            raw.get("sliding_window"),
            hf.use_sliding_window,
            hf.max_window_layers,
            &hf.layer_types,
            hf.num_hidden_layers,
            hf.sliding_window_pattern,
        )?;
        // A key that is missing takes the architecture's default; one that
        // is null means none.
        let opt_f64 = |k: &str, default: Option<f64>| -> Result<Option<f64>> {
            match raw.get(k) {
                None => Ok(default),
                Some(v) if v.is_null() => Ok(None),
                Some(v) => v
                    .as_f64()
                    .map(Some)
                    .ok_or_else(|| ModelError::InvalidConfig(format!("{k} {v} is not a number"))),
            }
        };
        let hidden_act = match hf.hidden_activation.as_deref().or(hf.hidden_act.as_deref()) {
            Some(name) => Activation::from_hf(name)?,
            None if gemma => Activation::GeluTanh,
            None => Activation::Silu,
        };
        // RoPE: transformers 5 nests Gemma 3's two under the layer kinds;
        // older files give the global theta, its scaling and a local theta.
        let nested = hf.rope_parameters.as_ref().and_then(|p| {
            p.get("full_attention")
                .map(|f| (f, p.get("sliding_attention")))
        });
        let theta_of = |v: Option<&serde_json::Value>| {
            v.and_then(|p| p.get("rope_theta"))
                .and_then(serde_json::Value::as_f64)
        };
        let default_theta = if arch == "gemma3" { 1e6 } else { 10_000.0 };
        let (rope_theta, rope_scaling, rope_local_theta) = match nested {
            Some((full, local)) => {
                if hf_rope_scaling(local, max_pos, original)?.is_some() {
                    return Err(ModelError::InvalidConfig(
                        "a scaled RoPE on sliding layers is not supported".into(),
                    ));
                }
                (
                    theta_of(Some(full)).unwrap_or(default_theta),
                    hf_rope_scaling(Some(full), max_pos, original)?,
                    theta_of(local).or((arch == "gemma3").then_some(10_000.0)),
                )
            }
            None => (
                hf.rope_theta
                    .or_else(|| theta_of(hf.rope_parameters.as_ref()))
                    .unwrap_or(default_theta),
                hf_rope_scaling(
                    hf.rope_scaling.as_ref().or(hf.rope_parameters.as_ref()),
                    max_pos,
                    original,
                )?,
                hf.rope_local_base_freq
                    .or((arch == "gemma3").then_some(10_000.0)),
            ),
        };
        if hf.num_attention_heads == 0 {
            return Err(ModelError::InvalidConfig("num_attention_heads is 0".into()));
        }
        let cfg = Config {
            head_dim: hf.head_dim.unwrap_or(if gemma {
                256
            } else {
                hf.hidden_size / hf.num_attention_heads
            }),
            num_key_value_heads: hf.num_key_value_heads.unwrap_or(hf.num_attention_heads),
            vocab_size: hf.vocab_size,
            hidden_size: hf.hidden_size,
            intermediate_size: hf.intermediate_size,
            num_hidden_layers: hf.num_hidden_layers,
            num_attention_heads: hf.num_attention_heads,
            rope_theta,
            rms_norm_eps: hf.rms_norm_eps,
            max_position_embeddings: max_pos,
            tie_word_embeddings: hf.tie_word_embeddings.unwrap_or(gemma),
            attention_bias,
            rope_scaling,
            sliding_window,
            sliding_layers,
            hidden_act,
            query_pre_attn_scalar: if gemma {
                Some(hf.query_pre_attn_scalar.unwrap_or(256.0))
            } else {
                hf.query_pre_attn_scalar
            },
            // Gemma 3 has no attention cap, whatever its file says.
            attn_logit_softcap: if arch == "gemma2" {
                opt_f64("attn_logit_softcapping", Some(50.0))?
            } else {
                None
            },
            final_logit_softcap: match arch.as_str() {
                "gemma2" => opt_f64("final_logit_softcapping", Some(30.0))?,
                "gemma3" => opt_f64("final_logit_softcapping", None)?,
                _ => None,
            },
            rope_local_theta,
            rotary_dim: partial.map(|f| {
                let hd = hf
                    .head_dim
                    .unwrap_or(hf.hidden_size / hf.num_attention_heads);
                (hd as f64 * f) as usize
            }),
            architecture: arch,
        };
        cfg.validate()?;
        Ok(cfg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hf_config_parses_and_validates() {
        let json = r#"{"architectures":["LlamaForCausalLM"],"vocab_size":100,"hidden_size":64,
            "intermediate_size":128,"num_hidden_layers":2,"num_attention_heads":4,
            "num_key_value_heads":2,"rope_theta":10000.0,"rms_norm_eps":1e-5,
            "max_position_embeddings":256,"tie_word_embeddings":true}"#;
        let cfg = Config::from_hf_json(json).unwrap();
        assert_eq!(cfg.architecture, "llama");
        assert_eq!(cfg.head_dim, 16);
        assert_eq!(cfg.gqa_groups(), 2);
        assert!(cfg.tie_word_embeddings);
        assert!(!cfg.attention_bias);
    }

    #[test]
    fn qwen2_defaults_to_attention_bias() {
        let json = r#"{"model_type":"qwen2","vocab_size":100,"hidden_size":64,
            "intermediate_size":128,"num_hidden_layers":2,"num_attention_heads":4}"#;
        let cfg = Config::from_hf_json(json).unwrap();
        assert!(cfg.attention_bias);
        assert_eq!(cfg.num_key_value_heads, 4);
    }

    #[test]
    fn qwen3_has_qk_norm_and_no_bias() {
        let json = r#"{"architectures":["Qwen3ForCausalLM"],"vocab_size":100,"hidden_size":64,
            "intermediate_size":128,"num_hidden_layers":2,"num_attention_heads":4,
            "num_key_value_heads":2,"head_dim":32,"use_sliding_window":false}"#;
        let cfg = Config::from_hf_json(json).unwrap();
        assert_eq!(cfg.architecture, "qwen3");
        assert!(cfg.qk_norm());
        assert!(!cfg.attention_bias);
        // Wider heads than hidden / heads, as Qwen3 has.
        assert_eq!(cfg.head_dim, 32);
        assert_eq!(cfg.window(0), None);
        // Switched on: the layers from max_window_layers (28) on slide, so
        // none of these two.
        let sliding = json.replace(
            r#""use_sliding_window":false"#,
            r#""use_sliding_window":true"#,
        );
        assert_eq!(Config::from_hf_json(&sliding).unwrap().sliding_window, None);
        let from_one = sliding.replace(
            r#""use_sliding_window":true"#,
            r#""use_sliding_window":true,"max_window_layers":1,"sliding_window":16"#,
        );
        let cfg = Config::from_hf_json(&from_one).unwrap();
        assert_eq!((cfg.window(0), cfg.window(1)), (None, Some(16)));
        assert!(
            !Config::from_hf_json(&json.replace("Qwen3", "Qwen2"))
                .unwrap()
                .qk_norm()
        );
    }

    #[test]
    fn sliding_windows_read_as_transformers_reads_them() {
        let base = r#"{"model_type":"mistral","vocab_size":100,"hidden_size":64,
            "intermediate_size":128,"num_hidden_layers":2,"num_attention_heads":4"#;
        let cfg = |extra: &str| Config::from_hf_json(&format!("{base}{extra}}}"));
        // Mistral: every layer; 4096 when the key is missing, none when null.
        let c = cfg("").unwrap();
        assert_eq!((c.window(0), c.window(1)), (Some(4096), Some(4096)));
        assert_eq!(cfg(r#","sliding_window":null"#).unwrap().window(1), None);
        let c = cfg(r#","sliding_window":8"#).unwrap();
        assert_eq!((c.window(0), c.window(1)), (Some(8), Some(8)));
        for bad in [
            r#","sliding_window":0"#,
            r#","sliding_window":-3"#,
            r#","sliding_window":"x""#,
        ] {
            let err = cfg(bad).unwrap_err().to_string();
            assert!(err.contains("sliding_window"), "{bad}: {err}");
        }
        // Qwen with layer_types: as they say.
        let qwen = r#"{"model_type":"qwen2","vocab_size":100,"hidden_size":64,
            "intermediate_size":128,"num_hidden_layers":2,"num_attention_heads":4,
            "use_sliding_window":true,"sliding_window":5,
            "layer_types":["sliding_attention","full_attention"]}"#;
        let c = Config::from_hf_json(qwen).unwrap();
        assert_eq!((c.window(0), c.window(1)), (Some(5), None));
        let short = qwen.replace(r#","full_attention""#, "");
        assert!(
            Config::from_hf_json(&short)
                .unwrap_err()
                .to_string()
                .contains("layer_types")
        );
        let odd = qwen.replace("full_attention", "chunked_attention");
        assert!(
            Config::from_hf_json(&odd)
                .unwrap_err()
                .to_string()
                .contains("chunked_attention")
        );
        // Llama has no sliding layers in transformers: refused, not run wrong.
        let llama = qwen.replace("qwen2", "llama");
        assert!(
            Config::from_hf_json(&llama)
                .unwrap_err()
                .to_string()
                .contains("sliding_attention")
        );
        // A layer list that does not cover the layers is invalid.
        let mut c = Config::from_hf_json(qwen).unwrap();
        c.sliding_layers.push(true);
        assert!(c.validate().is_err());
        // Older documents without the fields still read.
        let mut v = serde_json::to_value(Config::from_hf_json(qwen).unwrap()).unwrap();
        let o = v.as_object_mut().unwrap();
        o.remove("sliding_window");
        o.remove("sliding_layers");
        assert_eq!(serde_json::from_value::<Config>(v).unwrap().window(0), None);
    }

    #[test]
    fn gemma_configs_read_as_transformers_reads_them() {
        // Gemma 2 as the hub has it: no layer_types, caps, a query scalar
        // other than the head size (27B's).
        let g2 = r#"{"architectures":["Gemma2ForCausalLM"],"model_type":"gemma2","vocab_size":100,
            "hidden_size":64,"intermediate_size":128,"num_hidden_layers":4,"num_attention_heads":4,
            "num_key_value_heads":2,"head_dim":16,"hidden_act":"gelu_pytorch_tanh",
            "hidden_activation":"gelu_pytorch_tanh","query_pre_attn_scalar":144,
            "rope_theta":10000.0,"sliding_window":4096,"final_logit_softcapping":30.0,
            "attn_logit_softcapping":50.0}"#;
        let c = Config::from_hf_json(g2).unwrap();
        assert!(c.is_gemma() && c.tie_word_embeddings && !c.qk_norm());
        assert_eq!(c.hidden_act, Activation::GeluTanh);
        assert_eq!(
            (0..4).map(|i| c.window(i)).collect::<Vec<_>>(),
            [Some(4096), None, Some(4096), None]
        );
        assert_eq!(
            (c.attn_logit_softcap, c.final_logit_softcap),
            (Some(50.0), Some(30.0))
        );
        assert!((c.attn_scale() - 1.0 / 12.0).abs() < 1e-12);
        assert_eq!(c.embed_scale(), Some(8.0));
        assert_eq!((c.norm_shift(), c.rope_local_theta), (1.0, None));
        // Missing keys take Gemma 2's defaults; null caps are none.
        let bare = r#"{"model_type":"gemma2","vocab_size":100,"hidden_size":64,
            "intermediate_size":128,"num_hidden_layers":2,"num_attention_heads":4"#;
        let c = Config::from_hf_json(&format!("{bare}}}")).unwrap();
        assert_eq!(c.head_dim, 256);
        assert_eq!(c.query_pre_attn_scalar, Some(256.0));
        assert_eq!(
            (c.attn_logit_softcap, c.final_logit_softcap),
            (Some(50.0), Some(30.0))
        );
        assert_eq!(c.max_position_embeddings, 8192);
        let c = Config::from_hf_json(&format!(
            r#"{bare},"attn_logit_softcapping":null,"final_logit_softcapping":null}}"#
        ))
        .unwrap();
        assert_eq!((c.attn_logit_softcap, c.final_logit_softcap), (None, None));
        // Gemma 3 as the hub has it: a pattern, a global theta with linear
        // scaling, a local theta; its attention cap is ignored.
        let g3 = r#"{"architectures":["Gemma3ForCausalLM"],"model_type":"gemma3_text","vocab_size":100,
            "hidden_size":64,"intermediate_size":128,"num_hidden_layers":7,"num_attention_heads":4,
            "num_key_value_heads":1,"head_dim":16,"rope_theta":1000000.0,"rope_local_base_freq":10000.0,
            "rope_scaling":{"rope_type":"linear","factor":8.0},"sliding_window":512,
            "sliding_window_pattern":6,"attn_logit_softcapping":50.0,"final_logit_softcapping":null}"#;
        let c = Config::from_hf_json(g3).unwrap();
        assert_eq!(c.architecture, "gemma3");
        assert!(c.qk_norm());
        assert_eq!(
            (0..7).map(|i| c.local_rope(i)).collect::<Vec<_>>(),
            [true, true, true, true, true, false, true]
        );
        assert_eq!((c.window(5), c.window(6)), (None, Some(512)));
        assert_eq!((c.rope_theta, c.rope_local_theta), (1e6, Some(10_000.0)));
        assert_eq!(c.rope_scaling, Some(RopeScaling::Linear { factor: 8.0 }));
        assert_eq!((c.attn_logit_softcap, c.final_logit_softcap), (None, None));
        // transformers 5's nested RoPE parameters read the same.
        let nested = g3.replace(
            r#""rope_theta":1000000.0,"rope_local_base_freq":10000.0,
            "rope_scaling":{"rope_type":"linear","factor":8.0},"#,
            r#""rope_parameters":{"full_attention":{"rope_type":"linear","factor":8.0,"rope_theta":1000000.0},
            "sliding_attention":{"rope_type":"default","rope_theta":10000.0}},"#,
        );
        assert_ne!(nested, g3);
        assert_eq!(Config::from_hf_json(&nested).unwrap(), c);
        // Gemma 3's multimodal wrapper reads as its text decoder (the
        // wrapper's tie_word_embeddings carried in).
        let text: serde_json::Value = serde_json::from_str(g3).unwrap();
        let mut text = text.as_object().unwrap().clone();
        text.remove("model_type");
        let wrapped = serde_json::json!({"architectures": ["Gemma3ForConditionalGeneration"],
            "model_type": "gemma3", "text_config": text, "vision_config": {"model_type": "siglip_vision_model"},
            "tie_word_embeddings": true});
        assert_eq!(Config::from_hf_json(&wrapped.to_string()).unwrap(), c);
        // Another multimodal wrapper, an embedding model and an unknown
        // activation are refused by name.
        let mm = r#"{"model_type":"llava","vocab_size":100,"hidden_size":64,"intermediate_size":128,
            "num_hidden_layers":2,"num_attention_heads":4,"text_config":{},"vision_config":{}}"#;
        assert!(
            Config::from_hf_json(mm)
                .unwrap_err()
                .to_string()
                .contains("multimodal")
        );
        let emb = g3.replace(
            r#""sliding_window":512,"#,
            r#""sliding_window":512,"use_bidirectional_attention":true,"#,
        );
        assert!(
            Config::from_hf_json(&emb)
                .unwrap_err()
                .to_string()
                .contains("bidirectional")
        );
        let erf = g2.replace(
            r#""hidden_activation":"gelu_pytorch_tanh""#,
            r#""hidden_activation":"gelu""#,
        );
        assert!(
            Config::from_hf_json(&erf)
                .unwrap_err()
                .to_string()
                .contains("\"gelu\"")
        );
    }

    #[test]
    fn phi3_longrope_and_partial_rotary_read_as_transformers_reads_them() {
        let phi = r#"{"architectures":["Phi3ForCausalLM"],"model_type":"phi3","vocab_size":100,
            "hidden_size":64,"intermediate_size":128,"num_hidden_layers":2,"num_attention_heads":4,
            "num_key_value_heads":2,"sliding_window":2047,"rope_scaling":null"#;
        let c = Config::from_hf_json(&format!("{phi}}}")).unwrap();
        assert!(c.fused_projections() && !c.is_gemma() && !c.tie_word_embeddings);
        assert_eq!(
            (c.head_dim, c.window(0), c.window(1)),
            (16, Some(2047), Some(2047))
        );
        assert_eq!(c.hidden_act, Activation::Silu);
        // No window key: full attention (Phi-4).
        let c = Config::from_hf_json(&format!(
            "{}}}",
            phi.replace(r#""sliding_window":2047,"#, "")
        ))
        .unwrap();
        assert_eq!(c.window(0), None);
        // LongRoPE ("su" is its old name), with transformers' defaults:
        // factor = context / original, attention factor from it; the
        // top-level original context wins.
        let longrope = |kind: &str, extra: &str| {
            format!(
                r#"{},"max_position_embeddings":131072,"original_max_position_embeddings":4096,
                "rope_scaling":{{"type":"{kind}","short_factor":[1,1,1,1,1,1,1,1],
                "long_factor":[2,2,2,2,2,2,2,2],"original_max_position_embeddings":7}}{extra}}}"#,
                phi.replace(r#","rope_scaling":null"#, "")
            )
        };
        for kind in ["longrope", "su"] {
            let c = Config::from_hf_json(&longrope(kind, "")).unwrap();
            let Some(RopeScaling::LongRope {
                original_max_position_embeddings: orig,
                attention_factor,
                ref long_factor,
                ..
            }) = c.rope_scaling
            else {
                panic!("{kind}: {:?}", c.rope_scaling)
            };
            assert_eq!((orig, long_factor[0]), (4096.0, 2.0));
            assert!(
                (attention_factor - 1.190_238_071_4).abs() < 1e-9,
                "{attention_factor}"
            );
        }
        // Partial rotary: the factors cover the rotated lanes only.
        let c = Config::from_hf_json(
            &longrope("longrope", r#","partial_rotary_factor":0.5"#)
                .replace("[1,1,1,1,1,1,1,1]", "[1,1,1,1]")
                .replace("[2,2,2,2,2,2,2,2]", "[2,2,2,2]"),
        )
        .unwrap();
        assert_eq!(c.rotary_dim(), 8);
        for (json, needle) in [
            // Eight factors for a rotated quarter of 16 lanes (want 2).
            (
                longrope("longrope", r#","partial_rotary_factor":0.25"#),
                "RoPE frequency factors",
            ),
            (
                longrope("longrope", "").replace(r#""short_factor":[1,1,1,1,1,1,1,1],"#, ""),
                "short_factor",
            ),
            (
                format!("{phi},\"partial_rotary_factor\":1.5}}"),
                "partial_rotary_factor",
            ),
            (
                format!("{}}}", phi.replace("null", r#"{"type":"yarn","factor":4}"#)),
                "yarn",
            ),
        ] {
            let err = Config::from_hf_json(&json).unwrap_err().to_string();
            assert!(err.contains(needle), "{json}: {err}");
        }
    }

    #[test]
    fn mixture_of_experts_is_refused_by_name() {
        for (json, needle) in [
            (
                r#"{"model_type":"mixtral","vocab_size":100,"hidden_size":64,"intermediate_size":128,
                "num_hidden_layers":2,"num_attention_heads":4,"num_local_experts":8,"num_experts_per_tok":2}"#,
                "8 experts with 2 used per token",
            ),
            (
                r#"{"model_type":"qwen3_moe","vocab_size":100,"hidden_size":64,"intermediate_size":128,
                "num_hidden_layers":2,"num_attention_heads":4,"num_experts":128,"num_experts_per_tok":8}"#,
                "128 experts",
            ),
        ] {
            let err = Config::from_hf_json(json).unwrap_err().to_string();
            assert!(
                err.contains("mixture-of-experts") && err.contains(needle),
                "{err}"
            );
        }
    }

    #[test]
    fn a_layer_count_no_model_has_is_refused() {
        let json = r#"{"model_type":"gemma2","vocab_size":100,"hidden_size":64,
            "intermediate_size":128,"num_hidden_layers":1000000000000,"num_attention_heads":4}"#;
        let err = Config::from_hf_json(json).unwrap_err().to_string();
        assert!(err.contains("num_hidden_layers"), "{err}");
    }

    #[test]
    fn rejects_bad_configs() {
        let json = r#"{"model_type":"gpt_neox","vocab_size":100,"hidden_size":64,
            "intermediate_size":128,"num_hidden_layers":2,"num_attention_heads":4}"#;
        assert!(matches!(
            Config::from_hf_json(json),
            Err(ModelError::UnsupportedArchitecture { .. })
        ));
        let json = r#"{"model_type":"llama","vocab_size":100,"hidden_size":64,
            "intermediate_size":128,"num_hidden_layers":2,"num_attention_heads":4,
            "num_key_value_heads":3}"#;
        assert!(matches!(
            Config::from_hf_json(json),
            Err(ModelError::InvalidConfig(_))
        ));
        assert!(Config::from_hf_json("{not json").is_err());
    }

    fn with_scaling(scaling: &str) -> String {
        format!(
            r#"{{"model_type":"llama","vocab_size":10,"hidden_size":8,"intermediate_size":16,
            "num_hidden_layers":1,"num_attention_heads":2,"num_key_value_heads":2,
            "rope_scaling":{scaling}}}"#
        )
    }

    #[test]
    fn llama3_rope_scaling_is_read_and_other_kinds_are_refused_by_name() {
        let c = Config::from_hf_json(&with_scaling(
            r#"{"rope_type":"llama3","factor":8.0,"low_freq_factor":1.0,"high_freq_factor":4.0,"original_max_position_embeddings":8192}"#,
        ))
        .unwrap();
        assert_eq!(
            c.rope_scaling,
            Some(RopeScaling::Llama3 {
                factor: 8.0,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_max_position_embeddings: 8192.0
            })
        );
        // transformers 5 writes the theta and the scaling together.
        let c = Config::from_hf_json(&with_scaling("null").replace(
            r#""rope_scaling":null"#,
            r#""rope_parameters":{"rope_type":"llama3","rope_theta":500000.0,"factor":32.0,"low_freq_factor":1.0,"high_freq_factor":4.0,"original_max_position_embeddings":8192}"#,
        ))
        .unwrap();
        assert_eq!(c.rope_theta, 500_000.0);
        assert!(matches!(
            c.rope_scaling,
            Some(RopeScaling::Llama3 { factor: 32.0, .. })
        ));
        // Plain RoPE either way.
        for plain in [
            "null",
            r#"{"rope_type":"default"}"#,
            r#"{"rope_theta":10000.0}"#,
        ] {
            assert_eq!(
                Config::from_hf_json(&with_scaling(plain))
                    .unwrap()
                    .rope_scaling,
                None
            );
        }
        let err = Config::from_hf_json(&with_scaling(r#"{"rope_type":"yarn","factor":4.0}"#))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("yarn") && err.contains("not supported"),
            "{err}"
        );
        // A factor with no type says nothing of how to apply it.
        assert!(Config::from_hf_json(&with_scaling(r#"{"factor":8.0}"#)).is_err());
        let err = Config::from_hf_json(&with_scaling(r#"{"rope_type":"llama3","factor":8.0}"#))
            .unwrap_err()
            .to_string();
        assert!(err.contains("low_freq_factor"), "{err}");
        for bad in [
            r#"{"rope_type":"llama3","factor":0,"low_freq_factor":1,"high_freq_factor":4,"original_max_position_embeddings":8192}"#,
            r#"{"rope_type":"llama3","factor":8,"low_freq_factor":4,"high_freq_factor":4,"original_max_position_embeddings":8192}"#,
        ] {
            assert!(Config::from_hf_json(&with_scaling(bad)).is_err(), "{bad}");
        }
    }

    #[test]
    fn llama3_scaling_keeps_short_wavelengths_stretches_long_ones_and_blends_between() {
        let r = RopeScaling::Llama3 {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 64.0,
        };
        let tau = 2.0 * std::f64::consts::PI;
        // Wavelength 8 < 64/4: kept.
        assert_eq!(r.apply(0, tau / 8.0), tau / 8.0);
        // Wavelength 128 > 64/1: divided by the factor.
        assert_eq!(r.apply(0, tau / 128.0), tau / 128.0 / 8.0);
        // Between: continuous at both ends and in between.
        let at = |w: f64| r.apply(0, tau / w) * w / tau;
        assert!((at(16.0 + 1e-9) - 1.0).abs() < 1e-6);
        assert!((at(64.0 - 1e-9) - 1.0 / 8.0).abs() < 1e-6);
        let mid = at(32.0);
        assert!(mid > 1.0 / 8.0 && mid < 1.0, "{mid}");
    }
}
