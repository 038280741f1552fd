//! A pipeline stage: a contiguous layer range `[start, end)`, plus the token
//! embedding on the first stage and the final norm + LM head on the last.
//! A stage loads only its own tensors.

use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::adapter::StageAdapter;
use crate::config::Config;
use crate::error::{ModelError, Result};
use crate::kv_cache::KvCache;
use crate::layers::{
    Attention, Block, Embedding, GateUpProj, Linear, Mlp, QkvProj, RmsNorm, Rope, SeqSpan,
};
use crate::quant::Q4_1Matrix;
use crate::weights::{LayerTensor as L, TensorId, WeightFile};

/// Which part of the model a stage holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct StageSpec {
    pub start: usize,
    pub end: usize,
    /// Holds the token embedding (first stage).
    pub embed: bool,
    /// Holds the final norm and LM head (last stage).
    pub head: bool,
}

impl StageSpec {
    /// The whole model as one stage.
    pub fn full(layers: usize) -> Self {
        Self {
            start: 0,
            end: layers,
            embed: true,
            head: true,
        }
    }
    /// Number of layers in the stage.
    pub fn layers(&self) -> usize {
        self.end - self.start
    }

    /// Checks the layer range against a model of `layers` layers.
    pub fn check(&self, layers: usize) -> Result<()> {
        if self.start > self.end || self.end > layers {
            return Err(ModelError::BadLayerRange {
                start: self.start,
                end: self.end,
                layers,
            });
        }
        Ok(())
    }
}

/// How a stage holds its matrices.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Precision {
    /// GGUF quantized weights with fused kernels: fastest inference.
    Quantized,
    /// Dense f32 weights and only differentiable ops: reference and training.
    F32,
}

/// What a stage consumes.
#[derive(Debug, Clone)]
pub enum StageInput {
    /// Token ids `[n]` (first stage).
    Tokens(Vec<u32>),
    /// Hidden states `[n, hidden]` from the previous stage.
    Hidden(Tensor),
}

/// Which positions the head produces logits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Logits {
    /// Only the last token of every sequence (generation).
    Last,
    /// Every token (training, scoring).
    All,
}

/// A loaded stage.
#[derive(Debug, Clone)]
pub struct Stage {
    cfg: Config,
    spec: StageSpec,
    embed: Option<Embedding>,
    blocks: Vec<Block>,
    norm: Option<RmsNorm>,
    head: Option<Linear>,
    rope: Rope,
    /// Gemma 3's RoPE of sliding layers.
    rope_local: Option<Rope>,
    device: Device,
    /// Set when the stage runs on a GPU (the CPU parts above are then empty).
    #[cfg(feature = "wgpu")]
    gpu: Option<Arc<crate::gpu::GpuStage>>,
}

impl Stage {
    /// Loads the tensors of `spec` onto `gpu`: the stage then runs there,
    /// with its KV caches on the device.
    #[cfg(feature = "wgpu")]
    pub fn load_gpu(
        gpu: Arc<crate::gpu::Gpu>,
        weights: &WeightFile,
        spec: StageSpec,
        precision: Precision,
    ) -> Result<Self> {
        let cfg = weights.config().clone();
        let on_gpu = crate::gpu::GpuStage::load(gpu, weights, spec, precision)?;
        let rope = Rope::new(&cfg, cfg.max_position_embeddings, DType::F32, &Device::Cpu)?;
        Ok(Self {
            cfg,
            spec,
            embed: None,
            blocks: Vec::new(),
            norm: None,
            head: None,
            rope,
            rope_local: None,
            device: Device::Cpu,
            gpu: Some(Arc::new(on_gpu)),
        })
    }

    /// Bytes this stage's matrices take on its GPU, if it runs on one.
    #[cfg(feature = "wgpu")]
    pub fn gpu_matrix_bytes(&self) -> Option<u64> {
        self.gpu.as_ref().map(|g| g.matrix_bytes())
    }

    /// Whether [`Self::forward_adapted`] applies LoRA adapters here (CPU
    /// stages do; GPU stages refuse them).
    pub fn takes_adapters(&self) -> bool {
        #[cfg(feature = "wgpu")]
        if self.gpu.is_some() {
            return false;
        }
        true
    }

    /// The GPU adapter this stage runs on, if any.
    #[cfg(feature = "wgpu")]
    pub fn gpu_adapter(&self) -> Option<crate::gpu::AdapterSummary> {
        self.gpu.as_ref().map(|g| g.gpu().adapter())
    }

    /// Loads the tensors of `spec` from `weights`.
    pub fn load(weights: &WeightFile, spec: StageSpec, precision: Precision) -> Result<Self> {
        let cfg = weights.config().clone();
        spec.check(cfg.num_hidden_layers)?;
        let dev = Device::Cpu;
        let fused = precision == Precision::Quantized;
        let f32t = |id| weights.load_f32(id, &dev);
        // Loads one or more matrices with the same input size as one Linear:
        // in quantized mode they are stacked into one matrix (one matmul).
        let group =
            |parts: &[(TensorId, Option<TensorId>, usize)], cols: usize| -> Result<Linear> {
                let mut biases = Vec::new();
                for (_, bias, _) in parts {
                    if let Some(b) = bias
                        && cfg.attention_bias
                    {
                        biases.push(f32t(*b)?);
                    }
                }
                let b = match biases.len() {
                    0 => None,
                    1 => biases.pop(),
                    _ => Some(Tensor::cat(&biases, 0)?),
                };
                match precision {
                    Precision::F32 => {
                        let mut ws = Vec::new();
                        for (id, _, rows) in parts {
                            let w = f32t(*id)?;
                            check_shape(*id, w.dims(), &[*rows, cols])?;
                            ws.push(w);
                        }
                        let w = match ws.len() {
                            1 => ws.remove(0),
                            _ => Tensor::cat(&ws, 0)?,
                        };
                        Ok(Linear::Dense { w, b })
                    }
                    Precision::Quantized => {
                        let mut qs = Vec::new();
                        for (id, _, rows) in parts {
                            let q = weights.load_for_matmul(*id, &dev)?;
                            check_shape(*id, q.shape().dims(), &[*rows, cols])?;
                            qs.push(q);
                        }
                        stack_quantized(qs, cols, b)
                    }
                }
            };
        let norm = |id| -> Result<RmsNorm> {
            let w = f32t(id)?;
            check_shape(id, w.dims(), &[cfg.hidden_size])?;
            Ok(RmsNorm {
                // Gemma's `1 + w` once, not per token (nothing trains here).
                weight: (w + cfg.norm_shift())?,
                eps: cfg.rms_norm_eps,
                fused,
                shift: 0.0,
            })
        };
        let head_norm = |id| -> Result<RmsNorm> {
            let w = f32t(id)?;
            check_shape(id, w.dims(), &[cfg.head_dim])?;
            Ok(RmsNorm {
                // Gemma's `1 + w` once, not per token (nothing trains here).
                weight: (w + cfg.norm_shift())?,
                eps: cfg.rms_norm_eps,
                fused,
                shift: 0.0,
            })
        };
        let (h, hd) = (cfg.hidden_size, cfg.head_dim);
        let qdim = cfg.num_attention_heads * hd;
        let kvdim = cfg.num_key_value_heads * hd;
        let inter = cfg.intermediate_size;
        let mut blocks = Vec::with_capacity(spec.layers());
        for i in spec.start..spec.end {
            let id = |t| TensorId::Layer(i, t);
            let q = (id(L::Q), Some(id(L::QBias)), qdim);
            let k = (id(L::K), Some(id(L::KBias)), kvdim);
            let v = (id(L::V), Some(id(L::VBias)), kvdim);
            let gate = (id(L::Gate), None, inter);
            let up = (id(L::Up), None, inter);
            let (qkv, gate_up) = match precision {
                // Stored stacked (Phi-3): one matrix each, as stored...
                Precision::Quantized if cfg.fused_projections() => (
                    QkvProj::Fused {
                        qkv: group(&[(id(L::Qkv), None, qdim + 2 * kvdim)], h)?,
                        q_out: qdim,
                        kv_out: kvdim,
                    },
                    GateUpProj::Fused {
                        gate_up: group(&[(id(L::GateUp), None, 2 * inter)], h)?,
                        inter,
                    },
                ),
                // ...or split by rows, each projection its own matrix.
                Precision::F32 if cfg.fused_projections() => {
                    let qkv = f32t(id(L::Qkv))?;
                    check_shape(id(L::Qkv), qkv.dims(), &[qdim + 2 * kvdim, h])?;
                    let gu = f32t(id(L::GateUp))?;
                    check_shape(id(L::GateUp), gu.dims(), &[2 * inter, h])?;
                    let rows = |t: &Tensor, at: usize, n: usize| -> Result<Linear> {
                        Ok(Linear::Dense {
                            w: t.narrow(0, at, n)?.contiguous()?,
                            b: None,
                        })
                    };
                    (
                        QkvProj::Separate {
                            q: rows(&qkv, 0, qdim)?,
                            k: rows(&qkv, qdim, kvdim)?,
                            v: rows(&qkv, qdim + kvdim, kvdim)?,
                        },
                        GateUpProj::Separate {
                            gate: rows(&gu, 0, inter)?,
                            up: rows(&gu, inter, inter)?,
                        },
                    )
                }
                Precision::Quantized => (
                    QkvProj::Fused {
                        qkv: group(&[q, k, v], h)?,
                        q_out: qdim,
                        kv_out: kvdim,
                    },
                    GateUpProj::Fused {
                        gate_up: group(&[gate, up], h)?,
                        inter,
                    },
                ),
                Precision::F32 => (
                    QkvProj::Separate {
                        q: group(&[q], h)?,
                        k: group(&[k], h)?,
                        v: group(&[v], h)?,
                    },
                    GateUpProj::Separate {
                        gate: group(&[gate], h)?,
                        up: group(&[up], h)?,
                    },
                ),
            };
            let qk_norm = if cfg.qk_norm() {
                Some((head_norm(id(L::QNorm))?, head_norm(id(L::KNorm))?))
            } else {
                None
            };
            let sandwich =
                |t| -> Result<Option<RmsNorm>> { cfg.is_gemma().then(|| norm(id(t))).transpose() };
            blocks.push(Block {
                attn_norm: norm(id(L::AttnNorm))?,
                attn: Attention {
                    qkv,
                    qk_norm,
                    o: group(&[(id(L::O), None, h)], qdim)?,
                    heads: cfg.num_attention_heads,
                    kv_heads: cfg.num_key_value_heads,
                    head_dim: hd,
                    window: cfg.window(i),
                    scale: cfg.attn_scale(),
                    softcap: cfg.attn_logit_softcap,
                    fused,
                },
                post_attn_norm: sandwich(L::PostAttnNorm)?,
                ffn_norm: norm(id(L::ffn_norm(&cfg)))?,
                mlp: Mlp {
                    gate_up,
                    down: group(&[(id(L::Down), None, h)], inter)?,
                    act: cfg.hidden_act,
                },
                post_ffn_norm: sandwich(L::PostFfnNorm)?,
                local_rope: cfg.local_rope(i),
            });
        }
        let vocab_shape = [cfg.vocab_size, h];
        let embed = if spec.embed {
            Some(match precision {
                Precision::Quantized => {
                    let q = weights.load_raw_quantized(TensorId::Embed, &dev)?;
                    check_shape(TensorId::Embed, q.shape().dims(), &vocab_shape)?;
                    Embedding::Quantized(Arc::new(q))
                }
                Precision::F32 => {
                    let t = f32t(TensorId::Embed)?;
                    check_shape(TensorId::Embed, t.dims(), &vocab_shape)?;
                    Embedding::Dense(t)
                }
            })
        } else {
            None
        };
        let (norm_w, head) = if spec.head {
            let head_id = if weights.contains(TensorId::Head) {
                TensorId::Head
            } else {
                TensorId::Embed
            };
            let head = match (precision, &embed, head_id) {
                (Precision::F32, Some(Embedding::Dense(t)), TensorId::Embed) => Linear::Dense {
                    w: t.clone(),
                    b: None,
                },
                // Tied weights: reuse the loaded table when no repacking is needed.
                (Precision::Quantized, Some(Embedding::Quantized(q)), TensorId::Embed)
                    if q.dtype() == WeightFile::load_for_matmul_dtype(q.dtype()) =>
                {
                    shared_quantized(q)?
                }
                _ => group(&[(head_id, None, cfg.vocab_size)], h)?,
            };
            (Some(norm(TensorId::FinalNorm)?), Some(head))
        } else {
            (None, None)
        };
        let rope = Rope::new(&cfg, cfg.max_position_embeddings, DType::F32, &dev)?;
        let rope_local = Rope::local(&cfg, cfg.max_position_embeddings, DType::F32, &dev)?;
        Ok(Self {
            cfg,
            spec,
            embed,
            blocks,
            norm: norm_w,
            head,
            rope,
            rope_local,
            device: dev,
            #[cfg(feature = "wgpu")]
            gpu: None,
        })
    }

    /// The model's hyper-parameters.
    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// Which part of the model this stage holds.
    pub fn spec(&self) -> StageSpec {
        self.spec
    }

    /// A fresh KV cache for one sequence on this stage.
    pub fn new_cache(&self) -> KvCache {
        #[cfg(feature = "wgpu")]
        if self.gpu.is_some() {
            return KvCache::on_gpu();
        }
        KvCache::new(self.blocks.len())
    }

    /// Runs a ragged batch: sequence `i` contributes `lens[i]` tokens that
    /// continue `caches[i]`. Returns hidden states `[n, hidden]`, or logits
    /// (`[sequences, vocab]` for [`Logits::Last`], `[n, vocab]` for
    /// [`Logits::All`]) if this stage holds the head.
    ///
    /// A CPU stage runs the whole pass on one of rayon's workers: its
    /// matrix products then split their rows among the workers from inside
    /// the pool, instead of the calling thread handing each of them over
    /// and sleeping until it is done (hundreds of wake-ups per token).
    pub fn forward(
        &self,
        input: StageInput,
        lens: &[usize],
        caches: &mut [&mut KvCache],
        logits: Logits,
    ) -> Result<Tensor> {
        self.forward_adapted(input, lens, caches, logits, &[])
    }

    /// [`Self::forward`] with each sequence's LoRA adapter (`None`: the
    /// base model; an empty slice: the base for all), loaded for this
    /// stage's layers: a batch may mix sequences of several adapters and
    /// of the base (see [`crate::adapter`]). CPU stages only.
    pub fn forward_adapted(
        &self,
        input: StageInput,
        lens: &[usize],
        caches: &mut [&mut KvCache],
        logits: Logits,
        adapters: &[Option<&StageAdapter>],
    ) -> Result<Tensor> {
        #[cfg(feature = "wgpu")]
        if self.gpu.is_some() {
            if adapters.iter().any(Option::is_some) {
                return Err(ModelError::BadStageInput(
                    "LoRA adapters run on CPU stages only".into(),
                ));
            }
            return self.forward_here(input, lens, caches, logits, &[]);
        }
        if rayon::current_thread_index().is_some() {
            return self.forward_here(input, lens, caches, logits, adapters);
        }
        rayon::scope(|_| self.forward_here(input, lens, caches, logits, adapters))
    }

    fn forward_here(
        &self,
        input: StageInput,
        lens: &[usize],
        caches: &mut [&mut KvCache],
        logits: Logits,
        adapters: &[Option<&StageAdapter>],
    ) -> Result<Tensor> {
        if lens.len() != caches.len() || lens.is_empty() || lens.contains(&0) {
            return Err(ModelError::BadStageInput(format!(
                "{} sequence lengths for {} caches (each must be > 0)",
                lens.len(),
                caches.len()
            )));
        }
        if !adapters.is_empty() && adapters.len() != lens.len() {
            return Err(ModelError::BadStageInput(format!(
                "{} adapters for {} sequences",
                adapters.len(),
                lens.len()
            )));
        }
        if let Some(a) = adapters
            .iter()
            .flatten()
            .find(|a| a.start() != self.spec.start || a.layers() != self.blocks.len())
        {
            return Err(ModelError::BadStageInput(format!(
                "an adapter loaded for layers {}..{} on a stage of layers {}..{}",
                a.start(),
                a.start() + a.layers(),
                self.spec.start,
                self.spec.end
            )));
        }
        let n: usize = lens.iter().sum();
        let mut spans = Vec::with_capacity(lens.len());
        let mut positions = Vec::with_capacity(n);
        // Rows of the RoPE tables (LongRoPE's long table past its context).
        let mut rope_rows = Vec::with_capacity(n);
        let mut offset = 0;
        for (&len, cache) in lens.iter().zip(caches.iter()) {
            let start = cache.len();
            if start + len > self.rope.max_positions() {
                return Err(ModelError::PromptTooLong {
                    tokens: start + len,
                    context: self.rope.max_positions(),
                });
            }
            spans.push(SeqSpan {
                offset,
                len,
                start_pos: start,
            });
            positions.extend((start..start + len).map(|p| p as u32));
            rope_rows.extend(self.rope.rows(start, len));
            offset += len;
        }
        let first = self.spec.embed;
        match &input {
            StageInput::Tokens(ids) if first => {
                if ids.len() != n {
                    return Err(ModelError::BadStageInput(format!(
                        "{} tokens for lengths summing to {n}",
                        ids.len()
                    )));
                }
                if let Some(&id) = ids.iter().find(|&&id| id as usize >= self.cfg.vocab_size) {
                    return Err(ModelError::TokenOutOfRange {
                        id,
                        vocab: self.cfg.vocab_size,
                    });
                }
            }
            StageInput::Hidden(h) if !first => {
                if h.dims() != [n, self.cfg.hidden_size] || h.dtype() != DType::F32 {
                    return Err(ModelError::BadStageInput(format!(
                        "hidden states {:?} {:?}, expected [{n}, {}] f32",
                        h.dims(),
                        h.dtype(),
                        self.cfg.hidden_size
                    )));
                }
            }
            StageInput::Tokens(_) => {
                return Err(ModelError::BadStageInput(
                    "tokens sent to a stage without the embedding".into(),
                ));
            }
            StageInput::Hidden(_) => {
                return Err(ModelError::BadStageInput(
                    "hidden states sent to the first stage".into(),
                ));
            }
        }
        #[cfg(feature = "wgpu")]
        if let Some(gpu) = &self.gpu {
            let mut kvs = Vec::with_capacity(caches.len());
            for cache in caches.iter_mut() {
                kvs.push(cache.gpu_mut().ok_or_else(|| {
                    ModelError::BadStageInput("a host KV cache passed to a GPU stage".into())
                })?);
            }
            let (ids, hidden) = match &input {
                StageInput::Tokens(ids) => (Some(&ids[..]), None),
                StageInput::Hidden(h) => (None, Some(h)),
            };
            let out = gpu.forward(ids, hidden, &spans, &rope_rows, &mut kvs, logits)?;
            for (cache, &len) in caches.iter_mut().zip(lens) {
                cache.advance(len);
            }
            return Ok(out);
        }
        let positions = Tensor::from_vec(positions, n, &self.device)?;
        let mut x = match (input, &self.embed) {
            (StageInput::Tokens(ids), Some(embed)) => {
                let x = embed.forward(&Tensor::from_vec(ids, n, &self.device)?)?;
                match self.cfg.embed_scale() {
                    Some(s) => (x * s)?,
                    None => x,
                }
            }
            (StageInput::Hidden(h), None) => h,
            _ => {
                return Err(ModelError::BadStageInput(
                    "input does not fit the stage".into(),
                ));
            }
        };
        let rope = self
            .rope
            .at(&Tensor::from_vec(rope_rows, n, &self.device)?)?;
        let rope_local = match &self.rope_local {
            Some(r) => Some(r.at(&positions)?),
            None => None,
        };
        // Each row's adapter (none at all: no per-layer work below).
        let mut by_row: Vec<Option<&StageAdapter>> = Vec::new();
        if adapters.iter().any(Option::is_some) {
            by_row.reserve(n);
            for (span, a) in spans.iter().zip(adapters) {
                by_row.extend(std::iter::repeat_n(*a, span.len));
            }
        }
        for (i, block) in self.blocks.iter().enumerate() {
            let r = match (&rope_local, block.local_rope) {
                (Some(local), true) => local,
                _ => &rope,
            };
            let lora: Vec<Option<&crate::adapter::LayerAdapter>> =
                by_row.iter().map(|a| a.and_then(|a| a.layer(i))).collect();
            x = block.forward(i, &x, &spans, caches, r, &lora)?;
        }
        for (cache, &len) in caches.iter_mut().zip(lens) {
            cache.advance(len);
        }
        let (Some(norm), Some(head)) = (&self.norm, &self.head) else {
            return Ok(x);
        };
        let x = match logits {
            Logits::All => x,
            Logits::Last => {
                let last: Vec<u32> = spans
                    .iter()
                    .map(|s| (s.offset + s.len - 1) as u32)
                    .collect();
                let idx = Tensor::from_vec(last, spans.len(), &self.device)?;
                x.index_select(&idx, 0)?
            }
        };
        crate::layers::softcap(
            &head.forward(&norm.forward(&x)?)?,
            self.cfg.final_logit_softcap,
        )
    }
}

pub(crate) fn check_shape(id: TensorId, actual: &[usize], expected: &[usize]) -> Result<()> {
    if actual != expected {
        return Err(ModelError::ShapeMismatch {
            name: id.hf_name(),
            expected: expected.to_vec(),
            actual: actual.to_vec(),
        });
    }
    Ok(())
}

/// Q4_1 data as our kernel's matrix (the one place that decides Q4_1 runs there).
fn q4_1_matrix(q: &QTensor) -> Result<Q4_1Matrix> {
    let (rows, cols) = q.shape().dims2()?;
    Q4_1Matrix::from_bytes(&q.data()?, rows, cols)
}

/// A Linear over a matrix shared with the embedding (tied weights).
fn shared_quantized(q: &Arc<QTensor>) -> Result<Linear> {
    if q.dtype() == GgmlDType::Q4_1 {
        return Ok(Linear::Q4_1 {
            w: Arc::new(q4_1_matrix(q)?),
            b: None,
        });
    }
    Linear::quantized_shared(q.clone(), None)
}

/// One Linear from quantized matrices that share their column count, stacked by rows.
fn stack_quantized(qs: Vec<QTensor>, cols: usize, b: Option<Tensor>) -> Result<Linear> {
    let empty = || ModelError::InvalidConfig("no matrices to stack".into());
    let dtype = qs.first().map(|q| q.dtype()).ok_or_else(empty)?;
    let same = qs.iter().all(|q| q.dtype() == dtype);
    if same && dtype == GgmlDType::Q4_1 {
        let mut mats = qs.iter().map(q4_1_matrix).collect::<Result<Vec<_>>>()?;
        let w = match mats.len() {
            1 => mats.pop().ok_or_else(empty)?,
            _ => Q4_1Matrix::vstack(&mats)?,
        };
        return Ok(Linear::Q4_1 { w: Arc::new(w), b });
    }
    if qs.len() == 1 {
        let q = qs.into_iter().next().ok_or_else(empty)?;
        return Linear::quantized(q, b);
    }
    if same {
        // Rows are independent in every GGUF type: stack raw bytes.
        let rows: usize = qs.iter().map(|q| q.shape().dims()[0]).sum();
        let mut bytes = Vec::new();
        for q in &qs {
            bytes.extend_from_slice(&q.data()?);
        }
        let q = candle_core::quantized::ggml_file::qtensor_from_ggml(
            dtype,
            &bytes,
            vec![rows, cols],
            &Device::Cpu,
        )?;
        return Linear::quantized(q, b);
    }
    // Mixed types: dequantize and stack as f32 (rare).
    let dense = qs
        .iter()
        .map(|q| q.dequantize(&Device::Cpu))
        .collect::<candle_core::Result<Vec<_>>>()?;
    Ok(Linear::Dense {
        w: Tensor::cat(&dense, 0)?,
        b,
    })
}
