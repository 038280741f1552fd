//! A stage's layer range on one wgpu device.

use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};

use super::kernels::{Format, GpuMatrix};
use super::{Batch, Gpu};
use crate::config::Config;
use crate::error::{ModelError, Result};
use crate::layers::{Rope, SeqSpan};
use crate::stage::{Logits, Precision, StageSpec, check_shape};
use crate::weights::{LayerTensor as L, TensorId, WeightFile};

/// One sequence's KV cache on the device: `[capacity][layers][K | V][kv_dim]`
/// f32, grown by doubling.
#[derive(Debug, Default)]
pub struct GpuKv {
    buf: Option<wgpu::Buffer>,
    capacity: usize,
}

impl GpuKv {
    /// Bytes held on the device.
    pub fn bytes(&self) -> usize {
        self.buf.as_ref().map_or(0, |b| b.size() as usize)
    }
}

struct GpuLayer {
    attn_norm: wgpu::Buffer,
    qkv: GpuMatrix,
    /// Per-head query and key norm weights (Qwen3).
    qk_norm: Option<(wgpu::Buffer, wgpu::Buffer)>,
    /// Sliding-window attention: keys seen per query (0: all).
    window: u32,
    /// Takes the local RoPE tables (Gemma 3's sliding layers).
    local_rope: bool,
    o: GpuMatrix,
    /// Gemma's norms of the attention and MLP outputs.
    post_attn_norm: Option<wgpu::Buffer>,
    ffn_norm: wgpu::Buffer,
    gate_up: GpuMatrix,
    down: GpuMatrix,
    post_ffn_norm: Option<wgpu::Buffer>,
}

/// The layers `[start, end)` (plus embedding / head) of a model on a GPU.
pub struct GpuStage {
    gpu: Arc<Gpu>,
    cfg: Config,
    embed: Option<GpuMatrix>,
    layers: Vec<GpuLayer>,
    norm: Option<wgpu::Buffer>,
    head: Option<GpuMatrix>,
    cos: wgpu::Buffer,
    sin: wgpu::Buffer,
    /// The local RoPE's tables (Gemma 3).
    local: Option<(wgpu::Buffer, wgpu::Buffer)>,
}

impl std::fmt::Debug for GpuStage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GpuStage")
            .field("gpu", &self.gpu)
            .field("layers", &self.layers.len())
            .finish()
    }
}

/// A GGUF tensor's bytes in a device format: Q4_0, Q4_1, Q5_0, Q5_1,
/// Q8_0, Q4_K, Q5_K, Q6_K, f32 and f16 as stored (the device reads them in
/// their own format), anything else (Q2_K, Q3_K, BF16) dequantized to f32.
fn device_bytes(q: &QTensor) -> Result<(Format, Vec<u8>)> {
    let stored = |f: Format| -> Result<(Format, Vec<u8>)> { Ok((f, q.data()?.into_owned())) };
    Ok(match q.dtype() {
        GgmlDType::Q4_1 => stored(Format::Q4_1)?,
        GgmlDType::Q8_0 => stored(Format::Q8_0)?,
        GgmlDType::F32 => stored(Format::F32)?,
        GgmlDType::F16 => stored(Format::F16)?,
        GgmlDType::Q4_0 => stored(Format::Q4_0)?,
        GgmlDType::Q5_0 => stored(Format::Q5_0)?,
        GgmlDType::Q5_1 => stored(Format::Q5_1)?,
        GgmlDType::Q4K => stored(Format::Q4K)?,
        GgmlDType::Q5K => stored(Format::Q5K)?,
        GgmlDType::Q6K => stored(Format::Q6K)?,
        other => {
            // Said once per type, not once per tensor.
            static SAID: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());
            let name = format!("{other:?}");
            if let Ok(mut said) = SAID.lock()
                && !said.contains(&name)
            {
                tracing::warn!(
                    dtype = %name,
                    "wgpu has no kernel for this tensor type: held as f32 on the device"
                );
                said.push(name);
            }
            let v = q
                .dequantize(&Device::Cpu)?
                .flatten_all()?
                .to_vec1::<f32>()?;
            (Format::F32, bytemuck::cast_slice(&v).to_vec())
        }
    })
}

fn f32_bytes(t: &Tensor) -> Result<Vec<u8>> {
    let v = t.flatten_all()?.to_vec1::<f32>()?;
    Ok(bytemuck::cast_slice(&v).to_vec())
}

impl GpuStage {
    /// Loads the tensors of `spec` from `weights` onto `gpu`.
    pub fn load(
        gpu: Arc<Gpu>,
        weights: &WeightFile,
        spec: StageSpec,
        precision: Precision,
    ) -> Result<Self> {
        let cfg = weights.config().clone();
        spec.check(cfg.num_hidden_layers)?;
        let dev = Device::Cpu;
        // Norm weights as they multiply (Gemma's `1 + w`).
        let vector = |id: TensorId, len: usize| -> Result<wgpu::Buffer> {
            let w = (weights.load_f32(id, &dev)? + cfg.norm_shift())?;
            check_shape(id, w.dims(), &[len])?;
            gpu.upload("norm", &f32_bytes(&w)?)
        };
        // One or more matrices with the same input size, stacked by rows.
        let group =
            |parts: &[(TensorId, Option<TensorId>, usize)], cols: usize| -> Result<GpuMatrix> {
                let mut bias = Vec::new();
                let mut mats = Vec::new();
                for &(id, b, rows) in parts {
                    if let Some(b) = b
                        && cfg.attention_bias
                    {
                        bias.extend(weights.load_f32(b, &dev)?.to_vec1::<f32>()?);
                    }
                    let m = match precision {
                        // As stored: the device reads each format itself
                        // (no repacking as the CPU's fast path does).
                        Precision::Quantized => {
                            let q = weights.load_raw_quantized(id, &dev)?;
                            check_shape(id, q.shape().dims(), &[rows, cols])?;
                            device_bytes(&q)?
                        }
                        Precision::F32 => {
                            let t = weights.load_f32(id, &dev)?;
                            check_shape(id, t.dims(), &[rows, cols])?;
                            (Format::F32, f32_bytes(&t)?)
                        }
                    };
                    mats.push((m, rows));
                }
                let rows: usize = mats.iter().map(|(_, r)| r).sum();
                let bias = (!bias.is_empty()).then_some(&bias[..]);
                let format = mats.first().map_or(Format::F32, |((f, _), _)| *f);
                if mats.iter().all(|((f, _), _)| *f == format) {
                    // Rows are independent in every format: stack the bytes.
                    let bytes: Vec<u8> = mats.into_iter().flat_map(|((_, b), _)| b).collect();
                    return GpuMatrix::upload(&gpu, format, rows, cols, &bytes, bias);
                }
                // Mixed formats (Q4_K_M's Q6_K v beside Q4_K q and k):
                // each run of one format a block, held as stored.
                if let Some(b) = bias
                    && b.len() != rows
                {
                    return Err(ModelError::InvalidConfig(format!(
                        "{} bias values for {rows} rows",
                        b.len()
                    )));
                }
                let mut blocks: Vec<GpuMatrix> = Vec::new();
                let mut at = 0;
                let mut run: Vec<((Format, Vec<u8>), usize)> = Vec::new();
                let mut flush =
                    |run: &mut Vec<((Format, Vec<u8>), usize)>, at: &mut usize| -> Result<()> {
                        let Some(((format, _), _)) = run.first() else {
                            return Ok(());
                        };
                        let format = *format;
                        let r: usize = run.iter().map(|(_, r)| r).sum();
                        let bytes: Vec<u8> = run.drain(..).flat_map(|((_, b), _)| b).collect();
                        let b = bias.map(|b| &b[*at..*at + r]);
                        blocks.push(GpuMatrix::upload(&gpu, format, r, cols, &bytes, b)?);
                        *at += r;
                        Ok(())
                    };
                for (m, r) in mats {
                    if run.first().is_some_and(|((f, _), _)| *f != m.0) {
                        flush(&mut run, &mut at)?;
                    }
                    run.push((m, r));
                }
                flush(&mut run, &mut at)?;
                let mut blocks = blocks.into_iter();
                let mut head = blocks
                    .next()
                    .ok_or_else(|| ModelError::Gpu("an empty group of matrices".into()))?;
                head.more = blocks.collect();
                Ok(head)
            };
        let (h, hd) = (cfg.hidden_size, cfg.head_dim);
        let qdim = cfg.num_attention_heads * hd;
        let kvdim = cfg.num_key_value_heads * hd;
        let inter = cfg.intermediate_size;
        let mut layers = Vec::with_capacity(spec.layers());
        for i in spec.start..spec.end {
            let id = |t| TensorId::Layer(i, t);
            let sandwich = |t| -> Result<Option<wgpu::Buffer>> {
                cfg.is_gemma().then(|| vector(id(t), h)).transpose()
            };
            layers.push(GpuLayer {
                attn_norm: vector(id(L::AttnNorm), h)?,
                qkv: if cfg.fused_projections() {
                    group(&[(id(L::Qkv), None, qdim + 2 * kvdim)], h)?
                } else {
                    group(
                        &[
                            (id(L::Q), Some(id(L::QBias)), qdim),
                            (id(L::K), Some(id(L::KBias)), kvdim),
                            (id(L::V), Some(id(L::VBias)), kvdim),
                        ],
                        h,
                    )?
                },
                qk_norm: if cfg.qk_norm() {
                    Some((vector(id(L::QNorm), hd)?, vector(id(L::KNorm), hd)?))
                } else {
                    None
                },
                window: cfg
                    .window(i)
                    .map_or(0, |w| u32::try_from(w).unwrap_or(u32::MAX)),
                local_rope: cfg.local_rope(i),
                o: group(&[(id(L::O), None, h)], qdim)?,
                post_attn_norm: sandwich(L::PostAttnNorm)?,
                ffn_norm: vector(id(L::ffn_norm(&cfg)), h)?,
                gate_up: if cfg.fused_projections() {
                    group(&[(id(L::GateUp), None, 2 * inter)], h)?
                } else {
                    group(&[(id(L::Gate), None, inter), (id(L::Up), None, inter)], h)?
                },
                down: group(&[(id(L::Down), None, h)], inter)?,
                post_ffn_norm: sandwich(L::PostFfnNorm)?,
            });
        }
        // The embedding table, which also serves as a tied head.
        let embed = if spec.embed {
            let id = TensorId::Embed;
            let (format, bytes, as_head) = match precision {
                Precision::Quantized => {
                    let q = weights.load_raw_quantized(id, &dev)?;
                    check_shape(id, q.shape().dims(), &[cfg.vocab_size, h])?;
                    let (format, bytes) = device_bytes(&q)?;
                    (format, bytes, true)
                }
                Precision::F32 => {
                    let t = weights.load_f32(id, &dev)?;
                    check_shape(id, t.dims(), &[cfg.vocab_size, h])?;
                    (Format::F32, f32_bytes(&t)?, true)
                }
            };
            let m = GpuMatrix::upload(&gpu, format, cfg.vocab_size, h, &bytes, None)?;
            Some((m, as_head))
        } else {
            None
        };
        let (norm, head) = if spec.head {
            let head = match (&embed, weights.contains(TensorId::Head)) {
                // Tied weights: the embedding table serves as the head.
                (Some((e, true)), false) => e.clone(),
                (_, false) => group(&[(TensorId::Embed, None, cfg.vocab_size)], h)?,
                (_, true) => group(&[(TensorId::Head, None, cfg.vocab_size)], h)?,
            };
            (Some(vector(TensorId::FinalNorm, h)?), Some(head))
        } else {
            (None, None)
        };
        let embed = embed.map(|(m, _)| m);
        let rope = Rope::new(
            &cfg,
            cfg.max_position_embeddings,
            candle_core::DType::F32,
            &dev,
        )?;
        let cos = gpu.upload("rope cos", &f32_bytes(&rope.cos)?)?;
        let sin = gpu.upload("rope sin", &f32_bytes(&rope.sin)?)?;
        let local = match Rope::local(
            &cfg,
            cfg.max_position_embeddings,
            candle_core::DType::F32,
            &dev,
        )? {
            Some(r) => Some((
                gpu.upload("local rope cos", &f32_bytes(&r.cos)?)?,
                gpu.upload("local rope sin", &f32_bytes(&r.sin)?)?,
            )),
            None => None,
        };
        Ok(Self {
            gpu,
            cfg,
            embed,
            layers,
            norm,
            head,
            cos,
            sin,
            local,
        })
    }

    /// Bytes the stage's matrices take on the device (a tied head shares
    /// the embedding's buffer and is counted once).
    pub fn matrix_bytes(&self) -> u64 {
        let size = |m: &GpuMatrix| m.bytes();
        let layers: u64 = self
            .layers
            .iter()
            .map(|l| size(&l.qkv) + size(&l.o) + size(&l.gate_up) + size(&l.down))
            .sum();
        let embed = self.embed.as_ref().map_or(0, size);
        let head = match (&self.head, &self.embed) {
            (Some(h), Some(e)) if h.buf == e.buf => 0,
            (Some(h), _) => size(h),
            (None, _) => 0,
        };
        layers + embed + head
    }

    /// The device this stage runs on.
    pub fn gpu(&self) -> &Arc<Gpu> {
        &self.gpu
    }

    /// Runs a ragged batch (see `Stage::forward`, which checked the input):
    /// `ids` for a first stage, else `hidden` `[n, hidden]`; `caches[i]`
    /// holds `spans[i].start_pos` tokens; `positions` are the tokens' RoPE
    /// table rows (`Rope::rows`: their positions, offset into LongRoPE's
    /// long table where a span runs past its context). Returns hidden
    /// states or logits.
    pub(crate) fn forward(
        &self,
        ids: Option<&[u32]>,
        hidden: Option<&Tensor>,
        spans: &[SeqSpan],
        positions: &[u32],
        caches: &mut [&mut GpuKv],
        logits: Logits,
    ) -> Result<Tensor> {
        let cfg = &self.cfg;
        let gpu = &self.gpu;
        let n = positions.len();
        let (h, hd) = (cfg.hidden_size, cfg.head_dim);
        let (heads, kvh) = (cfg.num_attention_heads, cfg.num_key_value_heads);
        let (qdim, kvdim) = (heads * hd, kvh * hd);
        let stride = qdim + 2 * kvdim;
        let inter = cfg.intermediate_size;
        let cache_row = self.layers.len() * 2 * kvdim;
        let mut encoder = gpu
            .device
            .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                label: Some("stage"),
            });
        // Grow the caches first (copies precede the compute pass).
        for (span, kv) in spans.iter().zip(caches.iter_mut()) {
            let need = span.start_pos + span.len;
            if need > kv.capacity || kv.buf.is_none() {
                let cap = need.max(kv.capacity * 2).max(16);
                let buf = gpu.scratch("kv cache", cap * cache_row)?;
                if let Some(old) = &kv.buf {
                    let keep = (span.start_pos * cache_row * 4) as u64;
                    if keep > 0 {
                        encoder.copy_buffer_to_buffer(old, 0, &buf, 0, keep);
                    }
                }
                kv.buf = Some(buf);
                kv.capacity = cap;
            }
        }
        let widest = [h, qdim, inter].into_iter().max().unwrap_or(h);
        let act_q = gpu.scratch("activations q8", n * widest / 32 * 10)?;
        let pos = gpu.upload("positions", bytemuck::cast_slice(positions))?;
        let hn = gpu.scratch("normed", n * h)?;
        let qkv = gpu.scratch("qkv", n * stride)?;
        let att = gpu.scratch("attention", n * qdim)?;
        let gu = gpu.scratch("gate_up", n * 2 * inter)?;
        let hm = gpu.scratch("mlp", n * inter)?;
        let t_max = spans.iter().map(|s| s.start_pos + s.len).max().unwrap_or(1);
        let scores_len = spans.iter().map(|s| s.len).max().unwrap_or(1) * heads * t_max;
        let scores = gpu.scratch("scores", scores_len)?;
        let mut b = Batch::new(gpu);
        // The residual stream: embedded token ids, or the hidden states in.
        let x = match (ids, hidden, &self.embed) {
            (Some(ids), _, Some(table)) => {
                let idb = gpu.upload("ids", bytemuck::cast_slice(ids))?;
                let out = gpu.scratch("residual", n * h)?;
                b.embed(table, &idb, n, &out);
                if let Some(s) = cfg.embed_scale() {
                    b.scale_cap(&out, n * h, s as f32, None);
                }
                out
            }
            (_, Some(t), None) => gpu.upload("hidden", &f32_bytes(t)?)?,
            _ => {
                return Err(ModelError::BadStageInput(
                    "input does not fit the stage".into(),
                ));
            }
        };
        let scale = cfg.attn_scale();
        let cap = cfg.attn_logit_softcap.unwrap_or(0.0) as f32;
        // Gemma: block outputs land here, then are normed into the residual.
        let block_out = if cfg.is_gemma() {
            Some(gpu.scratch("block out", n * h)?)
        } else {
            None
        };
        for (li, layer) in self.layers.iter().enumerate() {
            b.rms_norm(&x, &layer.attn_norm, n, h, cfg.rms_norm_eps, &hn);
            b.matmul(&layer.qkv, &hn, n, &qkv, false, &act_q)?;
            if let Some((qn, kn)) = &layer.qk_norm {
                b.head_norm(&qkv, qn, [n, heads, hd, stride, 0], cfg.rms_norm_eps);
                b.head_norm(&qkv, kn, [n, kvh, hd, stride, qdim], cfg.rms_norm_eps);
            }
            let tables = match (&self.local, layer.local_rope) {
                (Some((cos, sin)), true) => (cos, sin),
                _ => (&self.cos, &self.sin),
            };
            b.rope(
                &qkv,
                &pos,
                tables,
                [n, heads + kvh, hd, stride, cfg.rotary_dim()],
            );
            for (span, kv) in spans.iter().zip(caches.iter()) {
                let cache = kv
                    .buf
                    .as_ref()
                    .ok_or_else(|| ModelError::Gpu("no cache".into()))?;
                let layer_off = li * 2 * kvdim;
                b.kv_append(
                    [
                        span.len as u32,
                        kvdim as u32,
                        span.offset as u32,
                        stride as u32,
                        qdim as u32,
                        span.start_pos as u32,
                        cache_row as u32,
                        layer_off as u32,
                    ],
                    &qkv,
                    cache,
                );
                b.attention(
                    &[
                        span.len as u32,
                        span.start_pos as u32,
                        heads as u32,
                        kvh as u32,
                        hd as u32,
                        stride as u32,
                        span.offset as u32,
                        cache_row as u32,
                        layer_off as u32,
                        kvdim as u32,
                        t_max as u32,
                        (scale as f32).to_bits(),
                        layer.window,
                        cap.to_bits(),
                    ],
                    &qkv,
                    cache,
                    &scores,
                    &att,
                );
            }
            // x += post_norm(o(att)), or x += o(att).
            let residual_add = |b: &mut Batch<'_>,
                                m: &GpuMatrix,
                                input: &wgpu::Buffer,
                                post: &Option<wgpu::Buffer>|
             -> Result<()> {
                match (post, &block_out) {
                    (Some(w), Some(tmp)) => {
                        b.matmul(m, input, n, tmp, false, &act_q)?;
                        b.rms_norm_into(tmp, w, [n, h], cfg.rms_norm_eps, &x, true);
                    }
                    _ => b.matmul(m, input, n, &x, true, &act_q)?,
                }
                Ok(())
            };
            residual_add(&mut b, &layer.o, &att, &layer.post_attn_norm)?;
            b.rms_norm(&x, &layer.ffn_norm, n, h, cfg.rms_norm_eps, &hn);
            b.matmul(&layer.gate_up, &hn, n, &gu, false, &act_q)?;
            b.gated(cfg.hidden_act, &gu, n, inter, &hm);
            residual_add(&mut b, &layer.down, &hm, &layer.post_ffn_norm)?;
        }
        let (Some(norm), Some(head)) = (&self.norm, &self.head) else {
            b.encode(&mut encoder);
            let out = gpu.finish_and_read(encoder, &x, n * h)?;
            return Ok(Tensor::from_vec(out, (n, h), &Device::Cpu)?);
        };
        let (rows, picked) = match logits {
            Logits::All => (n, x),
            Logits::Last => {
                let last: Vec<u32> = spans
                    .iter()
                    .map(|s| (s.offset + s.len - 1) as u32)
                    .collect();
                let idx = gpu.upload("last rows", bytemuck::cast_slice(&last))?;
                let out = gpu.scratch("last", last.len() * h)?;
                b.gather(&x, &idx, last.len(), h, &out);
                (last.len(), out)
            }
        };
        let normed = gpu.scratch("final norm", rows * h)?;
        b.rms_norm(&picked, norm, rows, h, cfg.rms_norm_eps, &normed);
        let out = gpu.scratch("logits", rows * cfg.vocab_size)?;
        b.matmul(head, &normed, rows, &out, false, &act_q)?;
        if let Some(c) = cfg.final_logit_softcap {
            b.scale_cap(&out, rows * cfg.vocab_size, 1.0, Some(c as f32));
        }
        b.encode(&mut encoder);
        let v = gpu.finish_and_read(encoder, &out, rows * cfg.vocab_size)?;
        Ok(Tensor::from_vec(v, (rows, cfg.vocab_size), &Device::Cpu)?)
    }
}
