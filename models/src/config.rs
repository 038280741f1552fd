//! Model hyper-parameters, read from GGUF metadata or a Hugging Face `config.json`.

use serde::{Deserialize, Serialize};

use crate::error::{ModelError, Result};

/// Architectures whose decoder this crate implements (llama family).
pub const SUPPORTED_ARCHITECTURES: &[&str] = &["llama", "qwen2", "mistral"];

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
        Ok(())
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
            #[serde(default = "default_theta")]
            rope_theta: f64,
            #[serde(default = "default_eps")]
            rms_norm_eps: f64,
            #[serde(default = "default_ctx")]
            max_position_embeddings: usize,
            #[serde(default)]
            tie_word_embeddings: bool,
            attention_bias: Option<bool>,
        }
        fn default_theta() -> f64 {
            10_000.0
        }
        fn default_eps() -> f64 {
            1e-6
        }
        fn default_ctx() -> usize {
            4096
        }
        let hf: Hf = serde_json::from_str(text)
            .map_err(|e| ModelError::InvalidConfig(format!("config.json: {e}")))?;
        let arch = match hf.model_type.as_deref() {
            Some(t) => t.to_string(),
            None => match hf.architectures.first().map(String::as_str) {
                Some("LlamaForCausalLM") => "llama".into(),
                Some("Qwen2ForCausalLM") => "qwen2".into(),
                Some("MistralForCausalLM") => "mistral".into(),
                other => other.unwrap_or("unknown").to_string(),
            },
        };
        let attention_bias = hf.attention_bias.unwrap_or(arch == "qwen2");
        if hf.num_attention_heads == 0 {
            return Err(ModelError::InvalidConfig("num_attention_heads is 0".into()));
        }
        let cfg = Config {
            head_dim: hf
                .head_dim
                .unwrap_or(hf.hidden_size / hf.num_attention_heads),
            num_key_value_heads: hf.num_key_value_heads.unwrap_or(hf.num_attention_heads),
            architecture: arch,
            vocab_size: hf.vocab_size,
            hidden_size: hf.hidden_size,
            intermediate_size: hf.intermediate_size,
            num_hidden_layers: hf.num_hidden_layers,
            num_attention_heads: hf.num_attention_heads,
            rope_theta: hf.rope_theta,
            rms_norm_eps: hf.rms_norm_eps,
            max_position_embeddings: hf.max_position_embeddings,
            tie_word_embeddings: hf.tie_word_embeddings,
            attention_bias,
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
}
