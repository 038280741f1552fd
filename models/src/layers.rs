//! Decoder building blocks: linear layers (quantized or dense), RMSNorm, RoPE,
//! attention and the SiLU-gated MLP.
//!
//! Every op here has a backward pass in candle when `fused` is off: the fused
//! `rms_norm` and `softmax_last_dim` kernels drop gradients, so training
//! builds stages with `fused = false`. RoPE is always the explicit form.

use std::sync::Arc;

use candle_core::quantized::{QMatMul, QTensor};
use candle_core::{D, DType, Device, Module, Tensor};

use crate::adapter::{self, RowAdapters};
use crate::config::{Activation, Config, RopeScaling};
use crate::error::Result;
use crate::kv_cache::KvCache;
use crate::quant::Q4_1Matrix;

/// `y = x W^T + b` with W quantized (inference) or dense f32 (training / reference).
#[derive(Debug, Clone)]
pub enum Linear {
    /// Any GGUF type through candle's quantized matmul.
    Quantized {
        w: QMatMul,
        b: Option<Tensor>,
    },
    /// GGUF Q4_1 through our exact, run-time dispatched kernel.
    Q4_1 {
        w: Arc<Q4_1Matrix>,
        b: Option<Tensor>,
    },
    Dense {
        w: Tensor,
        b: Option<Tensor>,
    },
}

/// Whether this CPU runs candle's quantized types (Q8_0, the K-quants;
/// not Q4_1) dequantized to f32, see [`qmatmul`]: aarch64 cores without
/// the dot-product extension.
pub fn candle_quantized_runs_dequantized() -> bool {
    #[cfg(target_arch = "aarch64")]
    {
        !std::arch::is_aarch64_feature_detected!("dotprod")
    }
    #[cfg(not(target_arch = "aarch64"))]
    {
        false
    }
}

/// candle's matmul over a quantized tensor. candle's aarch64 kernels for
/// Q8_0 and the K-quants run `sdot` (ARMv8.2's dot product) without
/// asking whether the CPU has it, and die with an illegal instruction on
/// older cores (a Raspberry Pi 4's Cortex-A72, a Pi 3's A53). There such a
/// tensor is dequantized to f32 at load and runs as a dense matmul: four
/// to eight times its memory, but right. Q4_1 never comes here (our own
/// kernels, chosen at run time).
fn qmatmul(w: Arc<QTensor>) -> Result<QMatMul> {
    if candle_quantized_runs_dequantized()
        && !matches!(
            w.dtype(),
            candle_core::quantized::GgmlDType::F32
                | candle_core::quantized::GgmlDType::F16
                | candle_core::quantized::GgmlDType::BF16
        )
    {
        static ONCE: std::sync::Once = std::sync::Once::new();
        ONCE.call_once(|| {
            tracing::warn!(
                "this CPU lacks the dot-product extension: {:?} and other quantized \
                 tensors (but Q4_1) run dequantized to f32",
                w.dtype()
            );
        });
        return Ok(QMatMul::Tensor(w.dequantize(&w.device())?));
    }
    Ok(QMatMul::from_arc(w)?)
}

impl Linear {
    /// From a quantized tensor `[out, in]`.
    pub fn quantized(w: QTensor, b: Option<Tensor>) -> Result<Self> {
        Ok(Self::Quantized {
            w: qmatmul(Arc::new(w))?,
            b,
        })
    }
    /// From a shared quantized tensor (tied embedding / head).
    pub fn quantized_shared(w: std::sync::Arc<QTensor>, b: Option<Tensor>) -> Result<Self> {
        Ok(Self::Quantized { w: qmatmul(w)?, b })
    }
    /// `x`: `[n, in]` -> `[n, out]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (y, b) = match self {
            Self::Quantized { w, b } => (w.forward(x)?, b),
            Self::Q4_1 { w, b } => {
                let n = x.dim(0)?;
                let xs = x.flatten_all()?.to_vec1::<f32>()?;
                let y = w.matmul(&xs, n)?;
                (Tensor::from_vec(y, (n, w.rows()), x.device())?, b)
            }
            Self::Dense { w, b } => (x.matmul(&w.t()?)?, b),
        };
        Ok(match b {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        })
    }
}

/// Root-mean-square norm with a learned scale: `x / rms(x) · (w + shift)`.
#[derive(Debug, Clone)]
pub struct RmsNorm {
    pub weight: Tensor,
    pub eps: f64,
    pub fused: bool,
    /// Added to the weight before it multiplies (Gemma's `1 + w`: 1).
    pub shift: f64,
}

impl RmsNorm {
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let shifted;
        let w = if self.shift == 0.0 {
            &self.weight
        } else {
            shifted = (&self.weight + self.shift)?;
            &shifted
        };
        if self.fused {
            return Ok(candle_nn::ops::rms_norm(x, w, self.eps as f32)?);
        }
        let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
        let x = x.broadcast_div(&(ms + self.eps)?.sqrt()?)?;
        Ok(x.broadcast_mul(w)?)
    }
}

/// `c · tanh(x / c)`: Gemma's soft cap, smooth and bounded by `±c`.
pub fn softcap(x: &Tensor, cap: Option<f64>) -> Result<Tensor> {
    match cap {
        Some(c) => Ok(((x / c)?.tanh()? * c)?),
        None => Ok(x.clone()),
    }
}

/// Rotary position embedding tables (HF "rotate half" layout, over the
/// first `Config::rotary_dim` lanes of each head). With LongRoPE the long
/// table follows the short one: [`Rope::rows`] picks.
#[derive(Debug, Clone)]
pub struct Rope {
    pub(crate) cos: Tensor,
    pub(crate) sin: Tensor,
    /// Positions each table covers.
    positions: usize,
    /// LongRoPE: a span ending past this position reads the long table.
    long_after: Option<usize>,
}

impl Rope {
    /// Tables for positions `0..max_pos` in `dtype` (computed in f64).
    pub fn new(cfg: &Config, max_pos: usize, dtype: DType, device: &Device) -> Result<Self> {
        Self::with(
            cfg,
            cfg.rope_theta,
            cfg.rope_scaling.as_ref(),
            max_pos,
            dtype,
            device,
        )
    }

    /// The local (sliding-layer) tables, unscaled, where `cfg` has them.
    pub fn local(
        cfg: &Config,
        max_pos: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<Option<Self>> {
        cfg.rope_local_theta
            .map(|theta| Self::with(cfg, theta, None, max_pos, dtype, device))
            .transpose()
    }

    fn with(
        cfg: &Config,
        theta: f64,
        scaling: Option<&RopeScaling>,
        max_pos: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let rot = cfg.rotary_dim();
        let base: Vec<f64> = (0..rot / 2)
            .map(|i| 1.0 / theta.powf(2.0 * i as f64 / rot as f64))
            .collect();
        // (inverse frequencies, cos/sin multiplier) of each table.
        let (tables, long_after) = match scaling {
            Some(RopeScaling::LongRope {
                short_factor,
                long_factor,
                original_max_position_embeddings,
                attention_factor,
            }) => {
                let div =
                    |fs: &[f64]| -> Vec<f64> { base.iter().zip(fs).map(|(f, d)| f / d).collect() };
                (
                    vec![
                        (div(short_factor), *attention_factor),
                        (div(long_factor), *attention_factor),
                    ],
                    Some(*original_max_position_embeddings as usize),
                )
            }
            Some(r) => (
                vec![(
                    base.iter()
                        .enumerate()
                        .map(|(i, f)| r.apply(i, *f))
                        .collect(),
                    1.0,
                )],
                None,
            ),
            None => (vec![(base.clone(), 1.0)], None),
        };
        let len = tables.len() * max_pos * rot;
        let mut cos = Vec::with_capacity(len);
        let mut sin = Vec::with_capacity(len);
        for (inv, m) in &tables {
            for p in 0..max_pos {
                // The two halves of the rotated lanes share frequencies
                // ("rotate half").
                for _half in 0..2 {
                    for f in inv {
                        let a = p as f64 * f;
                        cos.push(a.cos() * m);
                        sin.push(a.sin() * m);
                    }
                }
            }
        }
        let table = |v: Vec<f64>| -> Result<Tensor> {
            Ok(Tensor::from_vec(v, (tables.len() * max_pos, rot), device)?.to_dtype(dtype)?)
        };
        Ok(Self {
            cos: table(cos)?,
            sin: table(sin)?,
            positions: max_pos,
            long_after,
        })
    }

    /// Longest position this table covers.
    pub fn max_positions(&self) -> usize {
        self.positions
    }

    /// Where the rows of a pass whose last position is `end - 1` start:
    /// the long table's for LongRoPE past its original context, else 0.
    pub fn table_offset(&self, end: usize) -> usize {
        match self.long_after {
            Some(o) if end > o => self.positions,
            _ => 0,
        }
    }

    /// The table rows of positions `start..start + len` of one sequence.
    pub fn rows(&self, start: usize, len: usize) -> impl Iterator<Item = u32> {
        let off = self.table_offset(start + len);
        (start..start + len).map(move |p| (p + off) as u32)
    }

    /// The tables at `rows` (`[n]` u32, see [`Rope::rows`]), shaped
    /// `[n, 1, rotary_dim]`.
    pub fn at(&self, rows: &Tensor) -> Result<RopeAt> {
        Ok(RopeAt {
            cos: self.cos.index_select(rows, 0)?.unsqueeze(1)?,
            sin: self.sin.index_select(rows, 0)?.unsqueeze(1)?,
        })
    }
}

/// RoPE tables picked for the tokens of one batch.
#[derive(Debug, Clone)]
pub struct RopeAt {
    cos: Tensor,
    sin: Tensor,
}

impl RopeAt {
    /// `x`: `[n, heads, head_dim]`.
    pub fn apply(&self, x: &Tensor) -> Result<Tensor> {
        rotate(x, &self.cos, &self.sin)
    }
}

/// Rotates the first `cos.dim(-1)` lanes of `x`'s last dimension ("rotate
/// half" within them) and passes the rest through (differentiable).
pub fn rotate(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let hd = x.dim(D::Minus1)?;
    let rot = cos.dim(D::Minus1)?;
    let xr = if rot == hd {
        x.clone()
    } else {
        x.narrow(D::Minus1, 0, rot)?
    };
    let half = rot / 2;
    let x1 = xr.narrow(D::Minus1, 0, half)?;
    let x2 = xr.narrow(D::Minus1, half, half)?;
    let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
    let y = (xr.broadcast_mul(cos)? + rotated.broadcast_mul(sin)?)?;
    if rot == hd {
        return Ok(y);
    }
    Ok(Tensor::cat(
        &[&y, &x.narrow(D::Minus1, rot, hd - rot)?],
        D::Minus1,
    )?)
}

/// Q, K and V projections: separate (training: each its own parameter) or
/// stacked into one matrix (inference: one matmul, one pass over the input).
#[derive(Debug, Clone)]
pub enum QkvProj {
    Separate {
        q: Linear,
        k: Linear,
        v: Linear,
    },
    Fused {
        qkv: Linear,
        q_out: usize,
        kv_out: usize,
    },
}

impl QkvProj {
    /// With `lora` (each row's adapter), each row also gets its adapter's change.
    fn forward(&self, x: &Tensor, lora: &RowAdapters<'_>) -> Result<(Tensor, Tensor, Tensor)> {
        match self {
            Self::Separate { q, k, v } => {
                let one = |l: &Linear, t: usize| -> Result<Tensor> {
                    let y = l.forward(x)?;
                    let w = y.dim(1)?;
                    adapter::adapt(y, x, lora, &[(t, w)])
                };
                Ok((
                    one(q, adapter::Q)?,
                    one(k, adapter::K)?,
                    one(v, adapter::V)?,
                ))
            }
            Self::Fused { qkv, q_out, kv_out } => {
                let y = adapter::adapt(
                    qkv.forward(x)?,
                    x,
                    lora,
                    &[
                        (adapter::Q, *q_out),
                        (adapter::K, *kv_out),
                        (adapter::V, *kv_out),
                    ],
                )?;
                Ok((
                    y.narrow(1, 0, *q_out)?,
                    y.narrow(1, *q_out, *kv_out)?,
                    y.narrow(1, q_out + kv_out, *kv_out)?,
                ))
            }
        }
    }
}

/// Self-attention with grouped-query heads.
#[derive(Debug, Clone)]
pub struct Attention {
    pub qkv: QkvProj,
    /// Per-head RMSNorm of the queries and keys before RoPE (Qwen3).
    pub qk_norm: Option<(RmsNorm, RmsNorm)>,
    pub o: Linear,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    /// Sliding-window attention: each query sees this many keys at most,
    /// its own and those just before it (`Config::window`).
    pub window: Option<usize>,
    /// The multiplier of `q·k` (`Config::attn_scale`).
    pub scale: f64,
    /// Soft cap of the scores, before the mask (Gemma 2).
    pub softcap: Option<f64>,
    pub fused: bool,
}

/// Where each sequence's tokens sit in a ragged batch.
#[derive(Debug, Clone, Copy)]
pub struct SeqSpan {
    /// First row of this sequence in the batch.
    pub offset: usize,
    /// Rows (tokens) of this sequence in the batch.
    pub len: usize,
    /// Position of the first of them.
    pub start_pos: usize,
}

impl Attention {
    /// `x`: `[n, hidden]` holding the tokens of several sequences back to back.
    pub fn forward(
        &self,
        layer: usize,
        x: &Tensor,
        spans: &[SeqSpan],
        caches: &mut [&mut KvCache],
        rope: &RopeAt,
        lora: &RowAdapters<'_>,
    ) -> Result<Tensor> {
        let n = x.dim(0)?;
        let (q, k, v) = self.qkv.forward(x, lora)?;
        let q = q.reshape((n, self.heads, self.head_dim))?;
        let k = k.reshape((n, self.kv_heads, self.head_dim))?;
        let v = v.reshape((n, self.kv_heads, self.head_dim))?;
        let (q, k) = match &self.qk_norm {
            Some((qn, kn)) => (qn.forward(&q)?, kn.forward(&k)?),
            None => (q, k),
        };
        let q = rope.apply(&q)?;
        let k = rope.apply(&k)?;
        let scale = self.scale;
        let groups = self.heads / self.kv_heads;
        let mut outs = Vec::with_capacity(spans.len());
        for (span, cache) in spans.iter().zip(caches.iter_mut()) {
            let l = span.len;
            cache.append(
                layer,
                &k.narrow(0, span.offset, l)?,
                &v.narrow(0, span.offset, l)?,
            )?;
            let t = span.start_pos + l;
            if l == 1 && self.fused {
                // Single-token decode: attend straight over the cache rows
                // (the window's last ones, when it slides).
                let qv = q
                    .narrow(0, span.offset, 1)?
                    .flatten_all()?
                    .to_vec1::<f32>()?;
                let (ks, vs) = cache.slices(layer, t);
                let skip = self.window.map_or(0, |w| t.saturating_sub(w));
                let row = self.kv_heads * self.head_dim;
                let o = self.decode_attention(
                    &qv,
                    ks.get(skip * row..).unwrap_or_default(),
                    vs.get(skip * row..).unwrap_or_default(),
                );
                outs.push(Tensor::from_vec(
                    o,
                    (1, self.heads * self.head_dim),
                    x.device(),
                )?);
                continue;
            }
            // [l, h, d] -> [h, l, d]
            let qs = q.narrow(0, span.offset, l)?.transpose(0, 1)?.contiguous()?;
            let (kall, vall) = if span.start_pos == 0 && !self.fused {
                // Nothing cached before: attend over this batch's own keys
                // and values, so gradients reach the K and V projections.
                let own = |x: &Tensor| -> Result<Tensor> {
                    Ok(x.narrow(0, span.offset, l)?.transpose(0, 1)?.contiguous()?)
                };
                (own(&k)?, own(&v)?)
            } else {
                cache.tensors(layer, t, self.kv_heads, self.head_dim)?
            };
            // Heads h*groups..(h+1)*groups share KV head h: fold them into rows.
            let qg = (qs.reshape((self.kv_heads, groups * l, self.head_dim))? * scale)?;
            let scores = qg.matmul(&kall.t()?)?; // [kvh, g*l, t]
            // Capped before the mask: tanh(-inf) would unmask.
            let scores = softcap(&scores, self.softcap)?;
            let slides = self.window.is_some_and(|w| t > w);
            let scores = if l > 1 || slides {
                let mask = causal_mask(l, t, span.start_pos, self.window, x.device())?;
                scores
                    .reshape((self.kv_heads, groups, l, t))?
                    .broadcast_add(&mask)?
                    .reshape((self.kv_heads, groups * l, t))?
            } else {
                scores
            };
            let probs = if self.fused {
                candle_nn::ops::softmax_last_dim(&scores)?
            } else {
                softmax(&scores)?
            };
            let o = probs.matmul(&vall)?; // [kvh, g*l, d]
            let o = o
                .reshape((self.heads, l, self.head_dim))?
                .transpose(0, 1)?
                .reshape((l, self.heads * self.head_dim))?;
            outs.push(o);
        }
        let o = if outs.len() == 1 {
            outs.pop()
                .ok_or_else(|| crate::error::ModelError::BadStageInput("empty batch".into()))?
        } else {
            Tensor::cat(&outs, 0)?
        };
        let y = self.o.forward(&o)?;
        let w = y.dim(1)?;
        adapter::adapt(y, &o, lora, &[(adapter::O, w)])
    }
}

/// Attention of one query token over `t` cached tokens (token-major rows of
/// `kv_heads * head_dim`), for inference. Returns `[heads * head_dim]`.
impl Attention {
    fn decode_attention(&self, q: &[f32], ks: &[f32], vs: &[f32]) -> Vec<f32> {
        let (heads, kv_heads, head_dim) = (self.heads, self.kv_heads, self.head_dim);
        let scale = self.scale as f32;
        let cap = self.softcap.map(|c| c as f32);
        let row = kv_heads * head_dim;
        let t = ks.len() / row.max(1);
        let groups = heads / kv_heads.max(1);
        let mut out = vec![0f32; heads * head_dim];
        let mut scores = vec![0f32; t];
        for h in 0..heads {
            let g = h / groups.max(1);
            let qh = &q[h * head_dim..(h + 1) * head_dim];
            let mut max = f32::NEG_INFINITY;
            for (j, s) in scores.iter_mut().enumerate() {
                let kj = &ks[j * row + g * head_dim..j * row + (g + 1) * head_dim];
                *s = dot_f32(qh, kj) * scale;
                if let Some(c) = cap {
                    *s = c * (*s / c).tanh();
                }
                max = max.max(*s);
            }
            let mut sum = 0f32;
            for s in scores.iter_mut() {
                *s = (*s - max).exp();
                sum += *s;
            }
            let oh = &mut out[h * head_dim..(h + 1) * head_dim];
            for (j, s) in scores.iter().enumerate() {
                let p = s / sum;
                let vj = &vs[j * row + g * head_dim..j * row + (g + 1) * head_dim];
                for (o, v) in oh.iter_mut().zip(vj) {
                    *o += p * v;
                }
            }
        }
        out
    }
}

/// `a · b` in eight independent lanes (so the compiler keeps it in one
/// vector register; a single running sum is a chain of dependent adds).
pub(crate) fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// Differentiable softmax over the last dimension.
pub fn softmax(x: &Tensor) -> Result<Tensor> {
    // The shift cancels in the quotient: no gradient goes through it.
    let max = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    let s = e.sum_keepdim(D::Minus1)?;
    Ok(e.broadcast_div(&s)?)
}

/// `[l, t]` additive mask: query i (at position p = start+i) sees keys
/// 0..=p, or with a sliding window w only those with p - j < w.
fn causal_mask(
    l: usize,
    t: usize,
    start: usize,
    window: Option<usize>,
    device: &Device,
) -> Result<Tensor> {
    let w = window.unwrap_or(usize::MAX);
    let mask: Vec<f32> = (0..l)
        .flat_map(|i| {
            (0..t).map(move |j| {
                let p = start + i;
                if j <= p && p - j < w {
                    0.0
                } else {
                    f32::NEG_INFINITY
                }
            })
        })
        .collect();
    Ok(Tensor::from_vec(mask, (l, t), device)?)
}

/// Gate and up projections, separate or stacked (see [`QkvProj`]).
#[derive(Debug, Clone)]
pub enum GateUpProj {
    Separate { gate: Linear, up: Linear },
    Fused { gate_up: Linear, inter: usize },
}

/// Gated feed-forward: `down(act(gate(x)) * up(x))`, SiLU (SwiGLU) or
/// tanh-GELU (GeGLU).
#[derive(Debug, Clone)]
pub struct Mlp {
    pub gate_up: GateUpProj,
    pub down: Linear,
    pub act: Activation,
}

/// The gate activation (inference: candle's kernels).
pub fn activate(act: Activation, x: &Tensor) -> Result<Tensor> {
    Ok(match act {
        Activation::Silu => x.silu()?,
        Activation::GeluTanh => x.gelu()?,
    })
}

/// The gate activation for training: built from primitive ops so autograd
/// differentiates it exactly (candle's own GELU backward rounds its
/// constants to six digits, about 1e-6 of the gradient).
pub fn activate_exact(act: Activation, x: &Tensor) -> Result<Tensor> {
    Ok(match act {
        Activation::Silu => x.silu()?,
        Activation::GeluTanh => {
            let c = (2.0 / std::f64::consts::PI).sqrt();
            let inner = ((x.sqr()? * x)? * 0.044715)?.add(x)?;
            let t = (inner * c)?.tanh()?;
            ((x * 0.5)? * (t + 1.0)?)?
        }
    })
}

impl Mlp {
    /// With `lora` (each row's adapter), each row also gets its adapter's change.
    pub fn forward(&self, x: &Tensor, lora: &RowAdapters<'_>) -> Result<Tensor> {
        let (g, u) = match &self.gate_up {
            GateUpProj::Separate { gate, up } => {
                let g = gate.forward(x)?;
                let u = up.forward(x)?;
                let w = g.dim(1)?;
                (
                    adapter::adapt(g, x, lora, &[(adapter::GATE, w)])?,
                    adapter::adapt(u, x, lora, &[(adapter::UP, w)])?,
                )
            }
            GateUpProj::Fused { gate_up, inter } => {
                let y = adapter::adapt(
                    gate_up.forward(x)?,
                    x,
                    lora,
                    &[(adapter::GATE, *inter), (adapter::UP, *inter)],
                )?;
                (y.narrow(1, 0, *inter)?, y.narrow(1, *inter, *inter)?)
            }
        };
        let h = (activate(self.act, &g)? * u)?;
        let y = self.down.forward(&h)?;
        let w = y.dim(1)?;
        adapter::adapt(y, &h, lora, &[(adapter::DOWN, w)])
    }
}

/// One decoder layer.
#[derive(Debug, Clone)]
pub struct Block {
    pub attn_norm: RmsNorm,
    pub attn: Attention,
    /// Gemma's norm of the attention output.
    pub post_attn_norm: Option<RmsNorm>,
    pub ffn_norm: RmsNorm,
    pub mlp: Mlp,
    /// Gemma's norm of the MLP output.
    pub post_ffn_norm: Option<RmsNorm>,
    /// Whether it takes the local RoPE (`Config::local_rope`).
    pub local_rope: bool,
}

impl Block {
    pub fn forward(
        &self,
        layer: usize,
        x: &Tensor,
        spans: &[SeqSpan],
        caches: &mut [&mut KvCache],
        rope: &RopeAt,
        lora: &RowAdapters<'_>,
    ) -> Result<Tensor> {
        let post = |n: &Option<RmsNorm>, h: Tensor| match n {
            Some(n) => n.forward(&h),
            None => Ok(h),
        };
        let h = self.attn_norm.forward(x)?;
        let h = self.attn.forward(layer, &h, spans, caches, rope, lora)?;
        let x = (x + post(&self.post_attn_norm, h)?)?;
        let h = self.mlp.forward(&self.ffn_norm.forward(&x)?, lora)?;
        Ok((x + post(&self.post_ffn_norm, h)?)?)
    }
}

/// Token embedding table, quantized (looked up by dequantizing rows) or dense.
#[derive(Debug, Clone)]
pub enum Embedding {
    Quantized(std::sync::Arc<QTensor>),
    Dense(Tensor),
}

impl Embedding {
    /// `ids`: `[n]` u32 -> `[n, hidden]` f32.
    pub fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        match self {
            Self::Quantized(q) => Ok(q.embedding(ids)?.to_dtype(DType::F32)?),
            Self::Dense(t) => Ok(t.index_select(ids, 0)?),
        }
    }
}
