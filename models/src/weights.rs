//! Weight files: GGUF (quantized or not) and Hugging Face safetensors directories.
//!
//! Tensors are addressed by [`TensorId`] and loaded one at a time, so a stage
//! reads only the tensors of its own layer range. Both formats end up in the
//! Hugging Face layout: llama.cpp's converter permutes the rows of `q_proj` and
//! `k_proj` for its interleaved RoPE, and we undo that permutation at load
//! (on raw quantized rows, so it is lossless) so one RoPE serves every format.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use candle_core::quantized::{GgmlDType, QTensor, gguf_file};
use candle_core::{DType, Device, Tensor};

use crate::config::{Config, SUPPORTED_ARCHITECTURES};
use crate::error::{ModelError, Result};

/// One tensor of a layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LayerTensor {
    AttnNorm,
    Q,
    K,
    V,
    O,
    QBias,
    KBias,
    VBias,
    /// Per-head RMSNorm of the queries, before RoPE (Qwen3).
    QNorm,
    /// Per-head RMSNorm of the keys, before RoPE (Qwen3).
    KNorm,
    FfnNorm,
    Gate,
    Up,
    Down,
    /// Gemma's norm of the attention output, before the residual add.
    PostAttnNorm,
    /// Gemma's norm before the MLP (its `FfnNorm`, under its own HF name).
    PreFfnNorm,
    /// Gemma's norm of the MLP output, before the residual add.
    PostFfnNorm,
    /// Q, K and V stacked by rows (Phi-3's `qkv_proj`).
    Qkv,
    /// Gate and up stacked by rows, gate first (Phi-3's `gate_up_proj`).
    GateUp,
}

impl LayerTensor {
    /// Every tensor a layer may have.
    pub const ALL: [LayerTensor; 19] = [
        Self::AttnNorm,
        Self::Q,
        Self::K,
        Self::V,
        Self::O,
        Self::QBias,
        Self::KBias,
        Self::VBias,
        Self::QNorm,
        Self::KNorm,
        Self::FfnNorm,
        Self::Gate,
        Self::Up,
        Self::Down,
        Self::PostAttnNorm,
        Self::PreFfnNorm,
        Self::PostFfnNorm,
        Self::Qkv,
        Self::GateUp,
    ];

    /// The tensors a layer of `cfg`'s architecture may have (no two with
    /// the same name in either format).
    pub fn of(cfg: &Config) -> Vec<LayerTensor> {
        Self::ALL
            .into_iter()
            .filter(|t| match t {
                Self::FfnNorm => !cfg.is_gemma(),
                Self::PostAttnNorm | Self::PreFfnNorm | Self::PostFfnNorm => cfg.is_gemma(),
                Self::QNorm | Self::KNorm => cfg.qk_norm(),
                Self::QBias | Self::KBias | Self::VBias => cfg.attention_bias,
                Self::Q | Self::K | Self::V | Self::Gate | Self::Up => !cfg.fused_projections(),
                Self::Qkv | Self::GateUp => cfg.fused_projections(),
                _ => true,
            })
            .collect()
    }

    /// The norm before the MLP in `cfg`'s architecture.
    pub fn ffn_norm(cfg: &Config) -> LayerTensor {
        if cfg.is_gemma() {
            Self::PreFfnNorm
        } else {
            Self::FfnNorm
        }
    }

    /// Whether this is an RMSNorm weight.
    pub fn is_norm(self) -> bool {
        matches!(
            self,
            Self::AttnNorm
                | Self::QNorm
                | Self::KNorm
                | Self::FfnNorm
                | Self::PostAttnNorm
                | Self::PreFfnNorm
                | Self::PostFfnNorm
        )
    }

    fn hf(self) -> &'static str {
        match self {
            Self::AttnNorm => "input_layernorm.weight",
            Self::Q => "self_attn.q_proj.weight",
            Self::K => "self_attn.k_proj.weight",
            Self::V => "self_attn.v_proj.weight",
            Self::O => "self_attn.o_proj.weight",
            Self::QBias => "self_attn.q_proj.bias",
            Self::KBias => "self_attn.k_proj.bias",
            Self::VBias => "self_attn.v_proj.bias",
            Self::QNorm => "self_attn.q_norm.weight",
            Self::KNorm => "self_attn.k_norm.weight",
            Self::FfnNorm => "post_attention_layernorm.weight",
            Self::Gate => "mlp.gate_proj.weight",
            Self::Up => "mlp.up_proj.weight",
            Self::Down => "mlp.down_proj.weight",
            Self::PostAttnNorm => "post_attention_layernorm.weight",
            Self::PreFfnNorm => "pre_feedforward_layernorm.weight",
            Self::PostFfnNorm => "post_feedforward_layernorm.weight",
            Self::Qkv => "self_attn.qkv_proj.weight",
            Self::GateUp => "mlp.gate_up_proj.weight",
        }
    }
    fn gguf(self) -> &'static str {
        match self {
            Self::AttnNorm => "attn_norm.weight",
            Self::Q => "attn_q.weight",
            Self::K => "attn_k.weight",
            Self::V => "attn_v.weight",
            Self::O => "attn_output.weight",
            Self::QBias => "attn_q.bias",
            Self::KBias => "attn_k.bias",
            Self::VBias => "attn_v.bias",
            Self::QNorm => "attn_q_norm.weight",
            Self::KNorm => "attn_k_norm.weight",
            Self::FfnNorm => "ffn_norm.weight",
            Self::Gate => "ffn_gate.weight",
            Self::Up => "ffn_up.weight",
            Self::Down => "ffn_down.weight",
            Self::PostAttnNorm => "post_attention_norm.weight",
            Self::PreFfnNorm => "ffn_norm.weight",
            Self::PostFfnNorm => "post_ffw_norm.weight",
            Self::Qkv => "attn_qkv.weight",
            // llama.cpp keeps Phi-3's gate and up together under the up name.
            Self::GateUp => "ffn_up.weight",
        }
    }
}

/// A tensor of the model, independent of the file format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TensorId {
    Embed,
    FinalNorm,
    Head,
    Layer(usize, LayerTensor),
}

impl TensorId {
    /// The Hugging Face (safetensors) name, e.g. `model.layers.3.self_attn.q_proj.weight`.
    pub fn hf_name(self) -> String {
        match self {
            Self::Embed => "model.embed_tokens.weight".into(),
            Self::FinalNorm => "model.norm.weight".into(),
            Self::Head => "lm_head.weight".into(),
            Self::Layer(i, t) => format!("model.layers.{i}.{}", t.hf()),
        }
    }
    /// The GGUF name, e.g. `blk.3.attn_q.weight`.
    pub fn gguf_name(self) -> String {
        match self {
            Self::Embed => "token_embd.weight".into(),
            Self::FinalNorm => "output_norm.weight".into(),
            Self::Head => "output.weight".into(),
            Self::Layer(i, t) => format!("blk.{i}.{}", t.gguf()),
        }
    }
    /// Every tensor a full model of `cfg`'s shape may have.
    pub fn all(cfg: &Config) -> impl Iterator<Item = TensorId> {
        let kinds = LayerTensor::of(cfg);
        [Self::Embed, Self::FinalNorm, Self::Head]
            .into_iter()
            .chain(
                (0..cfg.num_hidden_layers)
                    .flat_map(move |i| kinds.clone().into_iter().map(move |t| Self::Layer(i, t))),
            )
    }

    /// Whether this is an RMSNorm weight.
    pub fn is_norm(self) -> bool {
        match self {
            Self::FinalNorm => true,
            Self::Layer(_, t) => t.is_norm(),
            _ => false,
        }
    }
}

/// The GGUF tensor of per-frequency RoPE divisors (Llama 3.x).
pub const ROPE_FREQS: &str = "rope_freqs.weight";
/// Phi-3's LongRoPE divisors past its original context.
pub const ROPE_FACTORS_LONG: &str = "rope_factors_long.weight";
/// Phi-3's LongRoPE divisors within its original context.
pub const ROPE_FACTORS_SHORT: &str = "rope_factors_short.weight";

/// GGUF metadata that is not part of [`Config`] but needed by the tokenizer.
pub type GgufMetadata = HashMap<String, gguf_file::Value>;

/// An opened weight file or directory. Cheap to keep around: tensors are read on demand.
#[derive(Debug)]
pub struct WeightFile {
    path: PathBuf,
    config: Config,
    kind: Kind,
}

enum Kind {
    Gguf {
        content: gguf_file::Content,
        /// llama.cpp permuted Q/K rows for interleaved RoPE.
        permuted_qk: bool,
    },
    Safetensors {
        tensors: candle_core::safetensors::MmapedSafetensors,
        /// Where the text decoder's tensors sit in a multimodal checkpoint
        /// (Gemma 3's `language_model.model.…`), none for a plain one.
        prefix: Prefix,
    },
}

/// How a checkpoint names its text decoder's tensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Prefix {
    /// `model.layers.…`, `lm_head.weight`.
    Plain,
    /// `language_model.model.layers.…`, `language_model.lm_head.weight`
    /// (a multimodal wrapper as released).
    LanguageModel,
    /// `model.language_model.layers.…`, `lm_head.weight` (the wrapper as
    /// newer transformers name it).
    ModelLanguageModel,
}

impl Prefix {
    fn name(self, id: TensorId) -> String {
        let plain = id.hf_name();
        match self {
            Self::Plain => plain,
            Self::LanguageModel => format!("language_model.{plain}"),
            Self::ModelLanguageModel => match plain.strip_prefix("model.") {
                Some(rest) => format!("model.language_model.{rest}"),
                None => plain,
            },
        }
    }

    /// Whether a stored tensor belongs to the text decoder.
    fn holds(self, stored: &str) -> bool {
        match self {
            Self::Plain => true,
            Self::LanguageModel => stored.starts_with("language_model."),
            Self::ModelLanguageModel => {
                stored.starts_with("model.language_model.") || stored == "lm_head.weight"
            }
        }
    }
}

impl std::fmt::Debug for Kind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Gguf {
                content,
                permuted_qk,
            } => f
                .debug_struct("Gguf")
                .field("tensors", &content.tensor_infos.len())
                .field("permuted_qk", permuted_qk)
                .finish(),
            Self::Safetensors { .. } => f.write_str("Safetensors"),
        }
    }
}

impl WeightFile {
    /// Opens a `.gguf` file or a directory with `config.json` and `*.safetensors`.
    pub fn open(path: &Path) -> Result<Self> {
        if path.is_dir() {
            Self::open_safetensors(path)
        } else {
            Self::open_gguf(path)
        }
    }

    /// Path this was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The model's hyper-parameters.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// GGUF metadata, if this is a GGUF file.
    pub fn gguf_metadata(&self) -> Option<&GgufMetadata> {
        match &self.kind {
            Kind::Gguf { content, .. } => Some(&content.metadata),
            Kind::Safetensors { .. } => None,
        }
    }

    /// Whether the file holds `id`.
    pub fn contains(&self, id: TensorId) -> bool {
        match &self.kind {
            Kind::Gguf { content, .. } => content.tensor_infos.contains_key(&id.gguf_name()),
            Kind::Safetensors { tensors, prefix } => tensors.get(&prefix.name(id)).is_ok(),
        }
    }

    /// Bytes `id` takes as stored (quantized size for GGUF), if present.
    pub fn stored_bytes(&self, id: TensorId) -> Option<u64> {
        match &self.kind {
            Kind::Gguf { content, .. } => {
                let info = content.tensor_infos.get(&id.gguf_name())?;
                Some(gguf_bytes(info))
            }
            Kind::Safetensors { tensors, prefix } => tensors
                .get(&prefix.name(id))
                .ok()
                .map(|v| v.data().len() as u64),
        }
    }

    /// Every tensor in the file (name, stored type, shape, bytes), sorted by
    /// name: what identifies the model's content without hashing its data.
    pub fn tensor_layout(&self) -> Vec<TensorLayout> {
        let mut out: Vec<TensorLayout> = match &self.kind {
            Kind::Gguf { content, .. } => content
                .tensor_infos
                .iter()
                .map(|(name, info)| TensorLayout {
                    name: name.clone(),
                    dtype: format!("{:?}", info.ggml_dtype),
                    shape: info.shape.dims().to_vec(),
                    bytes: gguf_bytes(info),
                })
                .collect(),
            Kind::Safetensors { tensors, prefix } => tensors
                .tensors()
                .into_iter()
                .filter(|(name, _)| prefix.holds(name))
                .map(|(name, v)| TensorLayout {
                    name,
                    dtype: format!("{:?}", v.dtype()),
                    shape: v.shape().to_vec(),
                    bytes: v.data().len() as u64,
                })
                .collect(),
        };
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }

    fn open_gguf(path: &Path) -> Result<Self> {
        let mut file = File::open(path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => ModelError::NotFound {
                what: path.display().to_string(),
                hint: String::new(),
            },
            _ => ModelError::io(path, e),
        })?;
        let len = file.metadata().map_err(|e| ModelError::io(path, e))?.len();
        let content = crate::gguf::read_content(&mut file, path)?;
        // A GGUF split in parts (`-00001-of-0000N`) holds only some tensors
        // in each part.
        if let Some(n) = content.metadata.get("split.count").and_then(value_usize)
            && n > 1
        {
            return Err(ModelError::BadGguf {
                path: path.to_path_buf(),
                reason: format!(
                    "it is one of {n} parts of a split GGUF: join them into one file with `hearth models join {}` (`hearth models pull` joins what it fetches)",
                    path.display()
                ),
            });
        }
        // Check every tensor fits in the file before anything is loaded, so a
        // truncated download is reported up front and by name.
        for (name, info) in &content.tensor_infos {
            let elems = info.shape.elem_count() as u64;
            let block = info.ggml_dtype.block_size() as u64;
            if !elems.is_multiple_of(block) {
                return Err(ModelError::BadGguf {
                    path: path.to_path_buf(),
                    reason: format!(
                        "tensor {name} has {elems} elements, not a multiple of {block}"
                    ),
                });
            }
            let size = elems / block * info.ggml_dtype.type_size() as u64;
            let end = content
                .tensor_data_offset
                .saturating_add(info.offset)
                .saturating_add(size);
            if end > len {
                return Err(ModelError::Truncated {
                    path: path.to_path_buf(),
                    tensor: name.clone(),
                    needed: end,
                    len,
                });
            }
        }
        let mut config = gguf_config(&content)?;
        // Llama 3.x GGUFs carry their RoPE scaling as one divisor per
        // rotary frequency.
        if let Some(info) = content.tensor_infos.get(ROPE_FREQS) {
            let want = config.rotary_dim() / 2;
            if info.shape.elem_count() != want {
                return Err(ModelError::BadGguf {
                    path: path.to_path_buf(),
                    reason: format!(
                        "{ROPE_FREQS} has {} values for a head of {} (want {want})",
                        info.shape.elem_count(),
                        config.head_dim
                    ),
                });
            }
            let t = info
                .read(&mut file, content.tensor_data_offset, &Device::Cpu)?
                .dequantize(&Device::Cpu)?;
            let factors = t
                .flatten_all()?
                .to_vec1::<f32>()?
                .into_iter()
                .map(f64::from)
                .collect();
            config.rope_scaling = Some(crate::config::RopeScaling::Factors { factors });
            config.validate()?;
        }
        // Phi-3's LongRoPE: its two factor lists as tensors, the original
        // context and attention factor in metadata.
        if content.tensor_infos.contains_key(ROPE_FACTORS_LONG)
            || content.tensor_infos.contains_key(ROPE_FACTORS_SHORT)
        {
            let want = config.rotary_dim() / 2;
            let mut read =
                |name: &str| -> Result<Vec<f64>> {
                    let info = content.tensor_infos.get(name).ok_or_else(|| {
                        ModelError::MissingTensor {
                            name: name.to_string(),
                        }
                    })?;
                    if info.shape.elem_count() != want {
                        return Err(ModelError::BadGguf {
                            path: path.to_path_buf(),
                            reason: format!(
                                "{name} has {} values for {} rotary lanes (want {want})",
                                info.shape.elem_count(),
                                config.rotary_dim()
                            ),
                        });
                    }
                    let t = info
                        .read(&mut file, content.tensor_data_offset, &Device::Cpu)?
                        .dequantize(&Device::Cpu)?;
                    Ok(t.flatten_all()?
                        .to_vec1::<f32>()?
                        .into_iter()
                        .map(f64::from)
                        .collect())
                };
            let (long, short) = (read(ROPE_FACTORS_LONG)?, read(ROPE_FACTORS_SHORT)?);
            let arch = &config.architecture;
            let key = |s: &str| {
                content
                    .metadata
                    .get(&format!("{arch}.{s}"))
                    .and_then(value_f64)
            };
            let orig = key("rope.scaling.original_context_length").ok_or_else(|| {
                ModelError::MissingMetadata {
                    key: format!("{arch}.rope.scaling.original_context_length"),
                }
            })?;
            let factor = config.max_position_embeddings as f64 / orig;
            let attention_factor = key("rope.scaling.attn_factor").unwrap_or(if factor <= 1.0 {
                1.0
            } else {
                (1.0 + factor.ln() / orig.ln()).sqrt()
            });
            config.rope_scaling = Some(crate::config::RopeScaling::LongRope {
                short_factor: short,
                long_factor: long,
                original_max_position_embeddings: orig,
                attention_factor,
            });
            config.validate()?;
        }
        let permuted_qk = matches!(config.architecture.as_str(), "llama" | "mistral");
        Ok(Self {
            path: path.to_path_buf(),
            config,
            kind: Kind::Gguf {
                content,
                permuted_qk,
            },
        })
    }

    fn open_safetensors(dir: &Path) -> Result<Self> {
        let cfg_path = dir.join("config.json");
        let text = std::fs::read_to_string(&cfg_path).map_err(|e| ModelError::io(&cfg_path, e))?;
        let config = Config::from_hf_json(&text)?;
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(|e| ModelError::io(dir, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
            .collect();
        // Mistral's own copy of the weights beside Hugging Face's layout.
        let consolidated = |p: &PathBuf| crate::hub::is_consolidated(&p.to_string_lossy());
        if files.iter().any(|p| !consolidated(p)) {
            files.retain(|p| !consolidated(p));
        }
        files.sort();
        if files.is_empty() {
            return Err(ModelError::NotFound {
                what: format!("*.safetensors in {}", dir.display()),
                hint: String::new(),
            });
        }
        // SAFETY: the files are memory-mapped read-only; like every loader of
        // mmapped weights we rely on them not being modified while mapped.
        let tensors = unsafe { candle_core::safetensors::MmapedSafetensors::multi(&files) }?;
        let embed = TensorId::Embed;
        let prefix = [
            Prefix::Plain,
            Prefix::LanguageModel,
            Prefix::ModelLanguageModel,
        ]
        .into_iter()
        .find(|p| tensors.get(&p.name(embed)).is_ok())
        .unwrap_or(Prefix::Plain);
        Ok(Self {
            path: dir.to_path_buf(),
            config,
            kind: Kind::Safetensors { tensors, prefix },
        })
    }

    /// Rotary heads whose rows this file stores in llama.cpp's Q/K order
    /// (GGUF llama), if `id` is such a tensor.
    pub fn permuted_heads(&self, id: TensorId) -> Option<usize> {
        self.heads_for(id)
    }

    fn heads_for(&self, id: TensorId) -> Option<usize> {
        match (&self.kind, id) {
            (
                Kind::Gguf {
                    permuted_qk: true, ..
                },
                TensorId::Layer(_, LayerTensor::Q | LayerTensor::QBias),
            ) => Some(self.config.num_attention_heads),
            (
                Kind::Gguf {
                    permuted_qk: true, ..
                },
                TensorId::Layer(_, LayerTensor::K | LayerTensor::KBias),
            ) => Some(self.config.num_key_value_heads),
            _ => None,
        }
    }

    /// What llama.cpp's converter added to `id` (Gemma's norms hold `1 +
    /// w` in a GGUF; Hearth holds `w`, as transformers does).
    pub fn gguf_shift(&self, id: TensorId) -> f64 {
        match self.kind {
            Kind::Gguf { .. } if id.is_norm() => self.config.norm_shift(),
            _ => 0.0,
        }
    }

    /// Loads `id` as a dense f32 tensor (dequantizing GGUF data), in the HF layout.
    pub fn load_f32(&self, id: TensorId, device: &Device) -> Result<Tensor> {
        let t = match &self.kind {
            Kind::Gguf { content, .. } => {
                let t = self.read_gguf(content, id)?.dequantize(device)?;
                let shift = self.gguf_shift(id);
                if shift == 0.0 { t } else { (t - shift)? }
            }
            Kind::Safetensors { tensors, prefix } => {
                let name = prefix.name(id);
                tensors
                    .load(&name, device)
                    .map_err(|_| ModelError::MissingTensor { name })?
                    .to_dtype(DType::F32)?
            }
        };
        match self.heads_for(id) {
            Some(heads) => unpermute_dense(&t, heads),
            None => Ok(t),
        }
    }

    /// Loads `id` as stored in a GGUF file (no repacking), in the HF layout.
    /// For safetensors this is the f32 tensor wrapped as an F32 `QTensor`.
    pub fn load_raw_quantized(&self, id: TensorId, device: &Device) -> Result<QTensor> {
        match &self.kind {
            Kind::Gguf { .. } if self.gguf_shift(id) != 0.0 => Ok(QTensor::quantize(
                &self.load_f32(id, device)?,
                GgmlDType::F32,
            )?),
            Kind::Gguf { content, .. } => {
                let q = self.read_gguf(content, id)?;
                match self.heads_for(id) {
                    Some(heads) => unpermute_rows(&q, heads, device),
                    None => Ok(q),
                }
            }
            Kind::Safetensors { .. } => Ok(QTensor::quantize(
                &self.load_f32(id, device)?,
                GgmlDType::F32,
            )?),
        }
    }

    /// Loads a matrix for fast inference: Q5_0/Q5_1, which have no SIMD kernel,
    /// are repacked to Q8_0 (a second rounding); the others stay as stored
    /// (Q4_1 runs on our own exact kernel, see [`crate::quant`]).
    pub fn load_for_matmul(&self, id: TensorId, device: &Device) -> Result<QTensor> {
        let q = self.load_raw_quantized(id, device)?;
        let target = Self::load_for_matmul_dtype(q.dtype());
        if target == q.dtype() {
            return Ok(q);
        }
        Ok(QTensor::quantize(&q.dequantize(device)?, target)?)
    }

    /// The type [`WeightFile::load_for_matmul`] turns a stored type into.
    pub fn load_for_matmul_dtype(stored: GgmlDType) -> GgmlDType {
        match stored {
            GgmlDType::Q5_0 | GgmlDType::Q5_1 | GgmlDType::Q8_1 => GgmlDType::Q8_0,
            other => other,
        }
    }

    fn read_gguf(&self, content: &gguf_file::Content, id: TensorId) -> Result<QTensor> {
        let name = id.gguf_name();
        if !content.tensor_infos.contains_key(&name) {
            return Err(ModelError::MissingTensor { name });
        }
        let mut file = File::open(&self.path).map_err(|e| ModelError::io(&self.path, e))?;
        Ok(content.tensor(&mut file, &name, &Device::Cpu)?)
    }
}

/// One tensor as a file stores it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorLayout {
    pub name: String,
    pub dtype: String,
    pub shape: Vec<usize>,
    pub bytes: u64,
}

fn gguf_bytes(info: &gguf_file::TensorInfo) -> u64 {
    let elems = info.shape.elem_count() as u64;
    elems / info.ggml_dtype.block_size() as u64 * info.ggml_dtype.type_size() as u64
}

/// HF layout → llama.cpp's Q/K row order (what `convert_hf_to_gguf` does);
/// the inverse of what [`WeightFile`] undoes at load.
pub fn permute_for_gguf(w: &Tensor, heads: usize) -> Result<Tensor> {
    let dims = w.dims().to_vec();
    let out = dims[0];
    if heads == 0 || !out.is_multiple_of(heads * 2) {
        return Err(ModelError::InvalidConfig(format!(
            "cannot split {out} rows into {heads} rotary heads"
        )));
    }
    let half = out / heads / 2;
    let mut shape = vec![heads, 2, half];
    shape.extend(&dims[1..]);
    Ok(w.reshape(shape)?
        .transpose(1, 2)?
        .contiguous()?
        .reshape(dims)?)
}

/// Undo llama.cpp's Q/K permutation on a dense tensor ([out, in] or [out]).
fn unpermute_dense(t: &Tensor, heads: usize) -> Result<Tensor> {
    let dims = t.dims().to_vec();
    let out = dims[0];
    if heads == 0 || !out.is_multiple_of(heads * 2) {
        return Err(ModelError::InvalidConfig(format!(
            "cannot split {out} rows into {heads} rotary heads"
        )));
    }
    let half = out / heads / 2;
    let rest: Vec<usize> = dims[1..].to_vec();
    let mut shape = vec![heads, half, 2];
    shape.extend(&rest);
    let t = t.reshape(shape)?.transpose(1, 2)?.contiguous()?;
    Ok(t.reshape(dims)?)
}

/// Undo llama.cpp's Q/K permutation by moving whole quantized rows (lossless).
fn unpermute_rows(q: &QTensor, heads: usize, device: &Device) -> Result<QTensor> {
    let dims = q.shape().dims().to_vec();
    let out = dims[0];
    if heads == 0 || !out.is_multiple_of(heads * 2) {
        return Err(ModelError::InvalidConfig(format!(
            "cannot split {out} rows into {heads} rotary heads"
        )));
    }
    if dims.len() == 1 {
        let d = unpermute_dense(&q.dequantize(device)?, heads)?;
        return Ok(QTensor::quantize(&d, GgmlDType::F32)?);
    }
    let data = q.data()?;
    let row_bytes = data.len() / out;
    let head_dim = out / heads;
    let half = head_dim / 2;
    let mut dst = vec![0u8; data.len()];
    for h in 0..heads {
        for r in 0..2 {
            for j in 0..half {
                let hf_row = h * head_dim + r * half + j;
                let gguf_row = h * head_dim + 2 * j + r;
                dst[hf_row * row_bytes..(hf_row + 1) * row_bytes]
                    .copy_from_slice(&data[gguf_row * row_bytes..(gguf_row + 1) * row_bytes]);
            }
        }
    }
    Ok(candle_core::quantized::ggml_file::qtensor_from_ggml(
        q.dtype(),
        &dst,
        dims,
        device,
    )?)
}

fn meta<'a>(c: &'a gguf_file::Content, key: &str) -> Result<&'a gguf_file::Value> {
    c.metadata
        .get(key)
        .ok_or_else(|| ModelError::MissingMetadata {
            key: key.to_string(),
        })
}

/// Reads an integer metadata value whatever its stored width.
pub(crate) fn value_usize(v: &gguf_file::Value) -> Option<usize> {
    use gguf_file::Value as V;
    match *v {
        V::U8(x) => Some(x as usize),
        V::I8(x) => usize::try_from(x).ok(),
        V::U16(x) => Some(x as usize),
        V::I16(x) => usize::try_from(x).ok(),
        V::U32(x) => Some(x as usize),
        V::I32(x) => usize::try_from(x).ok(),
        V::U64(x) => usize::try_from(x).ok(),
        V::I64(x) => usize::try_from(x).ok(),
        _ => None,
    }
}

fn value_f64(v: &gguf_file::Value) -> Option<f64> {
    match *v {
        gguf_file::Value::F32(x) => Some(x as f64),
        gguf_file::Value::F64(x) => Some(x),
        _ => value_usize(v).map(|x| x as f64),
    }
}

fn meta_usize(c: &gguf_file::Content, key: &str) -> Result<usize> {
    value_usize(meta(c, key)?)
        .ok_or_else(|| ModelError::InvalidConfig(format!("{key} is not an integer")))
}

fn gguf_config(c: &gguf_file::Content) -> Result<Config> {
    let arch = match meta(c, "general.architecture")? {
        gguf_file::Value::String(s) => s.clone(),
        _ => {
            return Err(ModelError::InvalidConfig(
                "general.architecture is not a string".into(),
            ));
        }
    };
    let k = |s: &str| format!("{arch}.{s}");
    // Mixtral keeps the llama architecture name; its experts show in the
    // metadata and the tensors.
    let experts = c.metadata.get(&k("expert_count")).and_then(value_usize);
    let expert_tensors = c.tensor_infos.keys().any(|n| n.contains("_exps."));
    if experts.is_some_and(|n| n > 1) || expert_tensors {
        let used = c
            .metadata
            .get(&k("expert_used_count"))
            .and_then(value_usize);
        return Err(ModelError::InvalidConfig(crate::config::moe_refusal(
            &arch,
            experts.unwrap_or(0),
            used,
        )));
    }
    if !SUPPORTED_ARCHITECTURES.contains(&arch.as_str()) {
        return Err(ModelError::UnsupportedArchitecture {
            arch,
            supported: SUPPORTED_ARCHITECTURES.join(", "),
        });
    }
    let hidden = meta_usize(c, &k("embedding_length"))?;
    let heads = meta_usize(c, &k("attention.head_count"))?;
    let kv_heads = match c.metadata.get(&k("attention.head_count_kv")) {
        Some(v) => {
            value_usize(v).ok_or_else(|| ModelError::InvalidConfig("head_count_kv".into()))?
        }
        None => heads,
    };
    let head_dim = match c.metadata.get(&k("attention.key_length")) {
        Some(v) => value_usize(v).unwrap_or(0),
        None if heads > 0 => hidden / heads,
        None => 0,
    };
    let vocab = match c.metadata.get(&k("vocab_size")).and_then(value_usize) {
        Some(v) => v,
        None => match c.metadata.get("tokenizer.ggml.tokens") {
            Some(gguf_file::Value::Array(a)) => a.len(),
            _ => c
                .tensor_infos
                .get("token_embd.weight")
                .map(|t| t.shape.dims()[0])
                .ok_or_else(|| ModelError::MissingTensor {
                    name: "token_embd.weight".into(),
                })?,
        },
    };
    let layers = meta_usize(c, &k("block_count"))?;
    if layers > crate::config::MAX_LAYERS {
        return Err(ModelError::InvalidConfig(format!(
            "block_count {layers} (at most {})",
            crate::config::MAX_LAYERS
        )));
    }
    let gemma = matches!(arch.as_str(), "gemma2" | "gemma3");
    // RoPE over the first `rot` lanes of each head (Phi-4-mini).
    let rotary_dim = c
        .metadata
        .get(&k("rope.dimension_count"))
        .and_then(value_usize)
        .filter(|rot| *rot != head_dim);
    let f64_key = |key: &str| c.metadata.get(&k(key)).and_then(value_f64);
    // Every layer slides where the file names a window and no pattern
    // (llama.cpp's converter writes no window for Llama or Mistral, which
    // it then runs with full attention, as Hearth does). Gemma's windows
    // follow llama.cpp's fixed patterns: Gemma 2 the even layers (4096
    // when the key is missing), Gemma 3 all but every sixth.
    let window = c
        .metadata
        .get(&k("attention.sliding_window"))
        .and_then(value_usize)
        .or((arch == "gemma2").then_some(4096))
        .filter(|w| *w > 0);
    let sliding_layers = match c.metadata.get(&k("attention.sliding_window_pattern")) {
        // One bool per layer.
        Some(gguf_file::Value::Array(a)) => a
            .iter()
            .map(|v| match v {
                gguf_file::Value::Bool(b) => Ok(*b),
                _ => Err(ModelError::InvalidConfig(
                    "attention.sliding_window_pattern holds a non-boolean".into(),
                )),
            })
            .collect::<Result<Vec<bool>>>()?,
        // A period: every this-many-th layer is global.
        Some(v) if value_usize(v).is_some_and(|p| p > 0) => {
            let p = value_usize(v).unwrap_or(1);
            (0..layers).map(|i| (i + 1) % p != 0).collect()
        }
        Some(_) => {
            return Err(ModelError::InvalidConfig(
                "attention.sliding_window_pattern is not a list (nor a period)".into(),
            ));
        }
        None if window.is_some() && arch == "gemma2" => (0..layers).map(|i| i % 2 == 0).collect(),
        None if window.is_some() && arch == "gemma3" => (0..layers).map(|i| i % 6 != 5).collect(),
        None => Vec::new(),
    };
    // llama.cpp's RoPE scaling keys: a linear factor (Gemma 3's global
    // layers, long-context Llama 2s). Llama 3's comes as `rope_freqs`.
    let rope_scaling = match c.metadata.get(&k("rope.scaling.type")) {
        Some(gguf_file::Value::String(t)) if t == "linear" => {
            match f64_key("rope.scaling.factor") {
                Some(f) if f != 1.0 => Some(crate::config::RopeScaling::Linear { factor: f }),
                _ => None,
            }
        }
        _ => None,
    };
    let cfg = Config {
        vocab_size: vocab,
        hidden_size: hidden,
        intermediate_size: meta_usize(c, &k("feed_forward_length"))?,
        num_hidden_layers: layers,
        num_attention_heads: heads,
        num_key_value_heads: kv_heads,
        head_dim,
        rope_theta: f64_key("rope.freq_base").unwrap_or(if arch == "gemma3" {
            1e6
        } else {
            10_000.0
        }),
        rms_norm_eps: value_f64(meta(c, &k("attention.layer_norm_rms_epsilon"))?)
            .ok_or_else(|| ModelError::InvalidConfig("rms epsilon is not a number".into()))?,
        max_position_embeddings: meta_usize(c, &k("context_length"))?,
        tie_word_embeddings: !c.tensor_infos.contains_key("output.weight"),
        attention_bias: c.tensor_infos.contains_key("blk.0.attn_q.bias"),
        rope_scaling,
        sliding_window: window,
        sliding_layers,
        hidden_act: if gemma {
            crate::config::Activation::GeluTanh
        } else {
            crate::config::Activation::Silu
        },
        // Not stored: llama.cpp derives it, hidden / heads for the 27B
        // models (46 layers of Gemma 2, 62 of Gemma 3), else the head size.
        query_pre_attn_scalar: gemma.then(|| match f64_key("attention.scale") {
            Some(s) if s > 0.0 => 1.0 / (s * s),
            _ if (arch == "gemma2" && layers == 46) || (arch == "gemma3" && layers == 62) => {
                (hidden / heads.max(1)) as f64
            }
            _ => head_dim as f64,
        }),
        attn_logit_softcap: if arch == "gemma2" {
            f64_key("attn_logit_softcapping").filter(|c| *c > 0.0)
        } else {
            None
        },
        final_logit_softcap: if gemma {
            f64_key("final_logit_softcapping").filter(|c| *c > 0.0)
        } else {
            None
        },
        rope_local_theta: (arch == "gemma3")
            .then(|| f64_key("rope.freq_base_swa").unwrap_or(10_000.0)),
        rotary_dim,
        architecture: arch,
    };
    cfg.validate()?;
    Ok(cfg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_map_both_ways() {
        let id = TensorId::Layer(3, LayerTensor::Q);
        assert_eq!(id.hf_name(), "model.layers.3.self_attn.q_proj.weight");
        assert_eq!(id.gguf_name(), "blk.3.attn_q.weight");
        let mut cfg = crate::config::Config::from_hf_json(
            r#"{"model_type":"llama","vocab_size":8,"hidden_size":8,"intermediate_size":8,
            "num_hidden_layers":2,"num_attention_heads":2}"#,
        )
        .unwrap();
        assert_eq!(TensorId::all(&cfg).count(), 3 + 2 * 9);
        // Gemma's three extra norms; no name twice in either format.
        cfg.architecture = "gemma3".into();
        let all: Vec<TensorId> = TensorId::all(&cfg).collect();
        assert_eq!(all.len(), 3 + 2 * 13);
        for name in [TensorId::hf_name, TensorId::gguf_name] {
            let names: std::collections::HashSet<String> = all.iter().map(|id| name(*id)).collect();
            assert_eq!(names.len(), all.len());
        }
    }

    #[test]
    fn a_mixture_of_experts_gguf_is_refused_by_name() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let p = dir.path().join("mixtral.gguf");
        let t = QTensor::quantize(
            &Tensor::zeros(32, DType::F32, &Device::Cpu)?,
            GgmlDType::F32,
        )?;
        let arch = gguf_file::Value::String("llama".into());
        let (n, k) = (gguf_file::Value::U32(8), gguf_file::Value::U32(2));
        let mut f = File::create(&p)?;
        gguf_file::write(
            &mut f,
            &[
                ("general.architecture", &arch),
                ("llama.expert_count", &n),
                ("llama.expert_used_count", &k),
            ],
            &[("blk.0.ffn_gate_exps.weight", &t)],
        )?;
        drop(f);
        let err = WeightFile::open(&p).unwrap_err().to_string();
        assert!(
            err.contains("mixture-of-experts") && err.contains("8 experts with 2 used"),
            "{err}"
        );
        Ok(())
    }

    #[test]
    fn a_part_of_a_split_gguf_is_refused_with_how_to_join_it() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let p = dir.path().join("m-00001-of-00002.gguf");
        let t = QTensor::quantize(
            &Tensor::zeros(32, DType::F32, &Device::Cpu)?,
            GgmlDType::F32,
        )?;
        let arch = gguf_file::Value::String("llama".into());
        let count = gguf_file::Value::U16(2);
        let mut f = File::create(&p)?;
        gguf_file::write(
            &mut f,
            &[("general.architecture", &arch), ("split.count", &count)],
            &[("token_embd.weight", &t)],
        )?;
        drop(f);
        let err = WeightFile::open(&p).unwrap_err().to_string();
        assert!(
            err.contains("split GGUF") && err.contains("hearth models join"),
            "{err}"
        );
        Ok(())
    }

    #[test]
    fn row_unpermute_matches_dense_unpermute() -> anyhow::Result<()> {
        let dev = Device::Cpu;
        // 2 heads of dim 8 -> 16 rows of 32 columns.
        let t = Tensor::arange(0f32, 16.0 * 32.0, &dev)?.reshape((16, 32))?;
        let q = QTensor::quantize(&t, GgmlDType::Q8_0)?;
        let rows = unpermute_rows(&q, 2, &dev)?.dequantize(&dev)?;
        let dense = unpermute_dense(&q.dequantize(&dev)?, 2)?;
        let diff = (rows - dense)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert_eq!(diff, 0.0);
        // Row 1 of the HF layout (r=0, j=1) is GGUF row 2.
        let d = unpermute_dense(&t, 2)?;
        assert_eq!(d.get(1)?.get(0)?.to_scalar::<f32>()?, 64.0);
        assert_eq!(d.get(4)?.get(0)?.to_scalar::<f32>()?, 32.0);
        Ok(())
    }
}
