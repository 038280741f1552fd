//! Fused training ops with their own backward: RMSNorm, the gated
//! activation (`act(gate) · up`), rotary embedding and the attention's
//! scaled, masked softmax.
//!
//! Built from candle's element-wise ops, each of these is a chain of
//! passes over the activations, each with its own buffer; in backward every
//! op of the chain adds a few more, plus candle's zero-filled gradient and
//! a sum per op. Fused, each is one pass forward and one pass backward
//! over contiguous rows. They compute the same functions (the composed
//! versions stay in [`crate::layers`], and the tests here check both the
//! values and the gradients against them); they run on the CPU in f32 or
//! f64, the dtypes a [`super::TrainStage`] trains in, and fall back to
//! the composed ops anywhere else.

use std::ops::{Add, Mul, Neg, Sub};

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Layout, Shape, Tensor};
use rayon::prelude::*;

use crate::config::Activation;
use crate::error::Result;
use crate::layers::{RmsNorm, activate_exact, rotate, softmax};

/// Element count from which a fused op splits its rows among the
/// training pool's workers (candle's element-wise threshold).
const PAR_MIN: usize = 64 * 1024;
/// About how many elements one parallel task takes.
const PAR_CHUNK: usize = 16 * 1024;

/// The float types the fused kernels run in.
trait Float:
    Copy
    + Send
    + Sync
    + PartialOrd
    + Add<Output = Self>
    + Sub<Output = Self>
    + Mul<Output = Self>
    + Neg<Output = Self>
    + 'static
{
    const ZERO: Self;
    fn of(v: f64) -> Self;
    fn exp(self) -> Self;
    fn tanh(self) -> Self;
    fn sqrt(self) -> Self;
    fn recip(self) -> Self;
    fn slice(s: &CpuStorage) -> Option<&[Self]>;
    fn storage(v: Vec<Self>) -> CpuStorage;
}

macro_rules! float {
    ($t:ty, $variant:ident) => {
        impl Float for $t {
            const ZERO: Self = 0.0;
            fn of(v: f64) -> Self {
                v as $t
            }
            fn exp(self) -> Self {
                <$t>::exp(self)
            }
            fn tanh(self) -> Self {
                <$t>::tanh(self)
            }
            fn sqrt(self) -> Self {
                <$t>::sqrt(self)
            }
            fn recip(self) -> Self {
                <$t>::recip(self)
            }
            fn slice(s: &CpuStorage) -> Option<&[Self]> {
                match s {
                    CpuStorage::$variant(v) => Some(v),
                    _ => None,
                }
            }
            fn storage(v: Vec<Self>) -> CpuStorage {
                CpuStorage::$variant(v)
            }
        }
    };
}
float!(f32, F32);
float!(f64, F64);

/// Runs `$body` with `$t` the storage's float type and wraps the vector
/// it returns as storage.
macro_rules! by_dtype {
    ($dtype:expr, $name:expr, $t:ident => $body:expr) => {
        match $dtype {
            DType::F32 => {
                type $t = f32;
                <$t as Float>::storage($body)
            }
            DType::F64 => {
                type $t = f64;
                <$t as Float>::storage($body)
            }
            _ => return Err(op_err($name, "not f32 or f64")),
        }
    };
}

fn op_err(op: &str, what: &str) -> candle_core::Error {
    candle_core::Error::Msg(format!("{op}: {what}"))
}

/// The contiguous elements of an argument.
fn elems<'a, T: Float>(s: &'a CpuStorage, l: &Layout, op: &str) -> candle_core::Result<&'a [T]> {
    let v = T::slice(s).ok_or_else(|| op_err(op, "mixed or unsupported dtypes"))?;
    let (a, b) = l
        .contiguous_offsets()
        .ok_or_else(|| op_err(op, "an argument is not contiguous"))?;
    v.get(a..b)
        .ok_or_else(|| op_err(op, "an argument's layout runs past its storage"))
}

/// Whether the fused ops apply to these tensors: CPU, f32 or f64.
fn fusable(ts: &[&Tensor]) -> bool {
    let dt = ts.first().map(|t| t.dtype());
    ts.iter().all(|t| {
        t.device().is_cpu() && matches!(t.dtype(), DType::F32 | DType::F64) && Some(t.dtype()) == dt
    })
}

/// Runs `f(first_row, rows_out)` over `out` in whole rows of `width`,
/// split among the pool's workers when `out` is large.
fn by_rows<T: Float>(out: &mut [T], width: usize, f: impl Fn(usize, &mut [T]) + Sync + Send) {
    if width == 0 {
        return;
    }
    let rows = (PAR_CHUNK / width).max(1);
    if out.len() < PAR_MIN {
        f(0, out);
    } else {
        out.par_chunks_mut(rows * width)
            .enumerate()
            .for_each(|(i, chunk)| f(i * rows, chunk));
    }
}

/// `Σ a·b`, eight lanes at a time (so the compiler can vectorise it).
fn dot<T: Float>(a: &[T], b: &[T]) -> T {
    let mut acc = [T::ZERO; 8];
    let (ac, bc) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ar, br) = (ac.remainder(), bc.remainder());
    for (x, y) in ac.zip(bc) {
        for k in 0..8 {
            acc[k] = acc[k] + x[k] * y[k];
        }
    }
    let mut s = T::ZERO;
    for (x, y) in ar.iter().zip(br) {
        s = s + *x * *y;
    }
    let pairs = [
        acc[0] + acc[4],
        acc[1] + acc[5],
        acc[2] + acc[6],
        acc[3] + acc[7],
    ];
    s + (pairs[0] + pairs[2]) + (pairs[1] + pairs[3])
}

// ------------------------------------------------------------ products

/// Whether `x · wᵀ` runs as one of the training products' ops: both
/// matrices, on the CPU, of one float type, of matching widths.
pub(crate) fn products_fit(x: &Tensor, w: &Tensor) -> bool {
    fusable(&[x, w]) && x.rank() == 2 && w.rank() == 2 && x.dim(1).ok() == w.dim(1).ok()
}

/// `x · wᵀ` from `x`'s storage: `[n, k] · [m, k]ᵀ`.
pub(crate) fn x_wt(
    s: &CpuStorage,
    l: &Layout,
    w: &Tensor,
) -> candle_core::Result<(CpuStorage, Shape)> {
    let (ws, wl) = w.storage_and_layout();
    let candle_core::Storage::Cpu(ws) = &*ws else {
        return Err(op_err("product", "the weight is not on the CPU"));
    };
    product_t(s, l, ws, wl)
}

/// `a · bᵀ` of two matrices' storages.
fn product_t(
    a: &CpuStorage,
    al: &Layout,
    b: &CpuStorage,
    bl: &Layout,
) -> candle_core::Result<(CpuStorage, Shape)> {
    let (n, k) = al.shape().dims2()?;
    let (m, k2) = bl.shape().dims2()?;
    if k != k2 {
        return Err(op_err("product", "the matrices' widths do not match"));
    }
    let out = a.matmul(b, (1, n, m, k), al, &bl.transpose(0, 1)?)?;
    Ok((out, Shape::from((n, m))))
}

/// `x · wᵀ + scale · (x · aᵀ) · bᵀ`.
pub(crate) fn x_wt_plus_lora(
    s: &CpuStorage,
    l: &Layout,
    w: &Tensor,
    (sa, la): (&CpuStorage, &Layout),
    (sb, lb): (&CpuStorage, &Layout),
    scale: f64,
) -> candle_core::Result<(CpuStorage, Shape)> {
    let (base, shape) = x_wt(s, l, w)?;
    let (u, ul) = product_t(s, l, sa, la)?;
    let (z, zl) = product_t(&u, &Layout::contiguous(ul), sb, lb)?;
    if zl != shape {
        return Err(op_err(
            "lora product",
            "the adapter does not fit the weight",
        ));
    }
    let out = match (base, &z) {
        (CpuStorage::F32(mut y), CpuStorage::F32(z)) => {
            add_scaled(&mut y, z, scale as f32);
            CpuStorage::F32(y)
        }
        (CpuStorage::F64(mut y), CpuStorage::F64(z)) => {
            add_scaled(&mut y, z, scale);
            CpuStorage::F64(y)
        }
        _ => return Err(op_err("lora product", "not f32 or f64")),
    };
    Ok((out, shape))
}

/// `y += s · z`.
fn add_scaled<T: Float>(y: &mut [T], z: &[T], s: T) {
    let width = PAR_CHUNK.min(y.len()).max(1);
    by_rows(y, width, |i0, y| {
        for (y, &z) in y.iter_mut().zip(&z[i0 * width..]) {
            *y = *y + s * z;
        }
    });
}

/// Rows `ids` of a `[rows, width]` table.
pub(crate) fn gather_rows(
    s: &CpuStorage,
    l: &Layout,
    ids: &[u32],
) -> candle_core::Result<(CpuStorage, Shape)> {
    let (rows, width) = l.shape().dims2()?;
    if ids.iter().any(|&i| i as usize >= rows) {
        return Err(op_err("embedding rows", "an id past the table"));
    }
    let out = by_dtype!(s.dtype(), "embedding rows", T => {
        let t = elems::<T>(s, l, "embedding rows")?;
        let mut out = Vec::with_capacity(ids.len() * width);
        for &i in ids {
            let i = i as usize;
            out.extend_from_slice(&t[i * width..(i + 1) * width]);
        }
        out
    });
    Ok((out, Shape::from((ids.len(), width))))
}

/// Adds row `k` of its second argument into row `ids[k]` of the table it
/// runs on, in place (an embedding's gradient).
pub(crate) struct AddRows {
    pub(crate) ids: Vec<u32>,
}

fn add_rows<T: Float>(table: &mut [T], rows: &[T], ids: &[u32], width: usize) {
    for (&i, row) in ids.iter().zip(rows.chunks_exact(width)) {
        let i = i as usize;
        for (d, &r) in table[i * width..(i + 1) * width].iter_mut().zip(row) {
            *d = *d + r;
        }
    }
}

impl candle_core::InplaceOp2 for AddRows {
    fn name(&self) -> &'static str {
        "add-rows"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<()> {
        let (rows, width) = l1.shape().dims2()?;
        if l2.shape().dims2()? != (self.ids.len(), width)
            || self.ids.iter().any(|&i| i as usize >= rows)
        {
            return Err(op_err(self.name(), "the rows do not fit the table"));
        }
        let ((a, b), (c, d)) = match (l1.contiguous_offsets(), l2.contiguous_offsets()) {
            (Some(x), Some(y)) => (x, y),
            _ => return Err(op_err(self.name(), "an argument is not contiguous")),
        };
        let past = || op_err("add-rows", "a layout runs past its storage");
        match (s1, s2) {
            (CpuStorage::F32(t), CpuStorage::F32(r)) => add_rows(
                t.get_mut(a..b).ok_or_else(past)?,
                r.get(c..d).ok_or_else(past)?,
                &self.ids,
                width,
            ),
            (CpuStorage::F64(t), CpuStorage::F64(r)) => add_rows(
                t.get_mut(a..b).ok_or_else(past)?,
                r.get(c..d).ok_or_else(past)?,
                &self.ids,
                width,
            ),
            _ => return Err(op_err(self.name(), "not f32 or f64")),
        }
        Ok(())
    }
}

// ---------------------------------------------------------------- RMSNorm

/// `x / rms(x) · (w + shift)` over the last dimension, as
/// [`RmsNorm::forward`] computes it; one backward pass yields the input's
/// gradient and, when the weight is trained, the weight's.
pub(crate) fn rms_norm(n: &RmsNorm, x: &Tensor) -> Result<Tensor> {
    let h = x.dim(candle_core::D::Minus1)?;
    if n.fused || !fusable(&[x, &n.weight]) || n.weight.dims() != [h] || h == 0 {
        return n.forward(x);
    }
    Ok(x.contiguous()?.apply_op2(
        &n.weight.contiguous()?,
        RmsNormOp {
            eps: n.eps,
            shift: n.shift,
        },
    )?)
}

struct RmsNormOp {
    eps: f64,
    shift: f64,
}

/// `1 / sqrt(mean(x²) + eps)` of one row.
fn inv_rms<T: Float>(x: &[T], eps: f64) -> T {
    let ms = dot(x, x) * T::of(1.0 / x.len() as f64);
    (ms + T::of(eps)).sqrt().recip()
}

/// Checks that `x`'s rows are `w`'s width (and `dy`, when given, is `x`'s
/// size).
fn check_rows(op: &str, x: &Layout, w: usize, dy: Option<usize>) -> candle_core::Result<()> {
    let n = x.shape().elem_count();
    if w == 0 || x.dims().last() != Some(&w) || dy.is_some_and(|d| d != n) {
        return Err(op_err(op, "the arguments' sizes do not match"));
    }
    Ok(())
}

fn rms_fwd<T: Float>(x: &[T], w: &[T], eps: f64, shift: f64) -> Vec<T> {
    let h = w.len();
    let shift = T::of(shift);
    let mut out = vec![T::ZERO; x.len()];
    by_rows(&mut out, h, |row0, out| {
        for (i, y) in out.chunks_exact_mut(h).enumerate() {
            let xr = &x[(row0 + i) * h..(row0 + i + 1) * h];
            let r = inv_rms(xr, eps);
            for ((y, &xv), &wv) in y.iter_mut().zip(xr).zip(w) {
                *y = xv * r * (wv + shift);
            }
        }
    });
    out
}

/// The input's gradient (`x`'s shape), then with `dw` the weight's, summed
/// over the rows in fixed blocks and the blocks in order (the same sum for
/// any number of threads).
fn rms_bwd<T: Float>(x: &[T], w: &[T], dy: &[T], eps: f64, shift: f64, dw: bool) -> Vec<T> {
    let h = w.len();
    let shift = T::of(shift);
    let inv_h = T::of(1.0 / h as f64);
    let mut out = vec![T::ZERO; x.len() + if dw { h } else { 0 }];
    let (dx, dw_row) = out.split_at_mut(x.len());
    let row = |i: usize, dx: &mut [T], part: &mut [T]| {
        let xr = &x[i * h..(i + 1) * h];
        let gr = &dy[i * h..(i + 1) * h];
        let r = inv_rms(xr, eps);
        // dx = r · (g − x̂ · mean(g · x̂)), g = dy · (w + shift), x̂ = x · r
        let mut acc = T::ZERO;
        for ((&xv, &gv), &wv) in xr.iter().zip(gr).zip(w) {
            acc = acc + gv * (wv + shift) * xv;
        }
        let m = acc * r * inv_h;
        for (((d, &xv), &gv), &wv) in dx.iter_mut().zip(xr).zip(gr).zip(w) {
            *d = r * (gv * (wv + shift) - xv * r * m);
        }
        // dw += dy · x̂ (`part` is empty when the weight is frozen)
        for ((d, &xv), &gv) in part.iter_mut().zip(xr).zip(gr) {
            *d = *d + gv * xv * r;
        }
    };
    let block = (PAR_CHUNK / h).max(1);
    let part_len = if dw { h } else { 0 };
    let parts: Vec<Vec<T>> = if x.len() < PAR_MIN {
        let mut part = vec![T::ZERO; part_len];
        for (i, d) in dx.chunks_exact_mut(h).enumerate() {
            row(i, d, &mut part);
        }
        vec![part]
    } else {
        dx.par_chunks_mut(block * h)
            .enumerate()
            .map(|(b, chunk)| {
                let mut part = vec![T::ZERO; part_len];
                for (i, d) in chunk.chunks_exact_mut(h).enumerate() {
                    row(b * block + i, d, &mut part);
                }
                part
            })
            .collect()
    };
    for part in &parts {
        for (d, &p) in dw_row.iter_mut().zip(part) {
            *d = *d + p;
        }
    }
    out
}

impl CustomOp2 for RmsNormOp {
    fn name(&self) -> &'static str {
        "hearth-rms-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let out = by_dtype!(s1.dtype(), self.name(), T => {
            let (x, w) = (elems::<T>(s1, l1, self.name())?, elems::<T>(s2, l2, self.name())?);
            check_rows(self.name(), l1, w.len(), None)?;
            rms_fwd(x, w, self.eps, self.shift)
        });
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let want_w = w.track_op();
        let flat = x.detach().apply_op3(
            &w.detach(),
            &grad.detach().contiguous()?,
            RmsNormGrad {
                eps: self.eps,
                shift: self.shift,
                dw: want_w,
            },
        )?;
        let len = x.elem_count();
        let dx = flat.narrow(0, 0, len)?.reshape(x.shape())?;
        let dw = match want_w {
            true => Some(flat.narrow(0, len, w.elem_count())?.reshape(w.shape())?),
            false => None,
        };
        Ok((Some(dx), dw))
    }
}

/// The backward of [`RmsNormOp`]: flat, the input's gradient, then the
/// weight's when asked.
struct RmsNormGrad {
    eps: f64,
    shift: f64,
    dw: bool,
}

impl CustomOp3 for RmsNormGrad {
    fn name(&self) -> &'static str {
        "hearth-rms-norm-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let n = l1.shape().elem_count() + if self.dw { l2.shape().elem_count() } else { 0 };
        let out = by_dtype!(s1.dtype(), self.name(), T => {
            let x = elems::<T>(s1, l1, self.name())?;
            let w = elems::<T>(s2, l2, self.name())?;
            let dy = elems::<T>(s3, l3, self.name())?;
            check_rows(self.name(), l1, w.len(), Some(dy.len()))?;
            rms_bwd(x, w, dy, self.eps, self.shift, self.dw)
        });
        Ok((out, Shape::from(n)))
    }
}

// ---------------------------------------------------- gated activation

/// `act(gate) · up`, element by element.
pub(crate) fn gated(act: Activation, gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    if !fusable(&[gate, up]) || gate.shape() != up.shape() {
        return Ok((activate_exact(act, gate)? * up)?);
    }
    Ok(gate
        .contiguous()?
        .apply_op2(&up.contiguous()?, Gated { act })?)
}

struct Gated {
    act: Activation,
}

/// √(2/π), GELU's tanh approximation's constant.
const GELU_C: f64 = 0.797_884_560_802_865_4;

/// `act(g)` and `act'(g)`.
fn act_and_slope<T: Float>(act: Activation, g: T) -> (T, T) {
    let one = T::of(1.0);
    match act {
        Activation::Silu => {
            let s = (one + (-g).exp()).recip();
            (g * s, s * (one + g * (one - s)))
        }
        Activation::GeluTanh => {
            let (half, c, k) = (T::of(0.5), T::of(GELU_C), T::of(0.044_715));
            let t = (c * (g + k * g * g * g)).tanh();
            let slope =
                half * (one + t) + half * g * (one - t * t) * c * (one + T::of(3.0) * k * g * g);
            (half * g * (one + t), slope)
        }
    }
}

fn gated_fwd<T: Float>(act: Activation, g: &[T], u: &[T]) -> Vec<T> {
    let mut out = vec![T::ZERO; g.len()];
    let width = PAR_CHUNK.min(g.len()).max(1);
    by_rows(&mut out, width, |i0, out| {
        let (g, u) = (&g[i0 * width..], &u[i0 * width..]);
        for ((y, &gv), &uv) in out.iter_mut().zip(g).zip(u) {
            *y = act_and_slope(act, gv).0 * uv;
        }
    });
    out
}

/// Flat: the gate's gradient, then the up projection's.
fn gated_bwd<T: Float>(act: Activation, g: &[T], u: &[T], dy: &[T]) -> Vec<T> {
    let n = g.len();
    let mut out = vec![T::ZERO; 2 * n];
    let (dg, du) = out.split_at_mut(n);
    let width = PAR_CHUNK.min(n).max(1);
    let run = |i0: usize, dg: &mut [T], du: &mut [T]| {
        let (g, u, dy) = (&g[i0..], &u[i0..], &dy[i0..]);
        for ((((dg, du), &gv), &uv), &d) in dg.iter_mut().zip(du.iter_mut()).zip(g).zip(u).zip(dy) {
            let (a, slope) = act_and_slope(act, gv);
            *dg = d * uv * slope;
            *du = d * a;
        }
    };
    if n < PAR_MIN {
        run(0, dg, du);
    } else {
        dg.par_chunks_mut(width)
            .zip(du.par_chunks_mut(width))
            .enumerate()
            .for_each(|(i, (dg, du))| run(i * width, dg, du));
    }
    out
}

impl CustomOp2 for Gated {
    fn name(&self) -> &'static str {
        "hearth-gated-activation"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let out = by_dtype!(s1.dtype(), self.name(), T => {
            let (g, u) = (elems::<T>(s1, l1, self.name())?, elems::<T>(s2, l2, self.name())?);
            if g.len() != u.len() {
                return Err(op_err(self.name(), "the arguments' sizes do not match"));
            }
            gated_fwd(self.act, g, u)
        });
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        g: &Tensor,
        u: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let n = g.elem_count();
        let flat = g.detach().apply_op3(
            &u.detach(),
            &grad.detach().contiguous()?,
            GatedGrad { act: self.act },
        )?;
        Ok((
            Some(flat.narrow(0, 0, n)?.reshape(g.shape())?),
            Some(flat.narrow(0, n, n)?.reshape(u.shape())?),
        ))
    }
}

/// The backward of [`Gated`].
struct GatedGrad {
    act: Activation,
}

impl CustomOp3 for GatedGrad {
    fn name(&self) -> &'static str {
        "hearth-gated-activation-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let n = l1.shape().elem_count();
        let out = by_dtype!(s1.dtype(), self.name(), T => {
            let g = elems::<T>(s1, l1, self.name())?;
            let u = elems::<T>(s2, l2, self.name())?;
            let dy = elems::<T>(s3, l3, self.name())?;
            if u.len() != g.len() || dy.len() != g.len() {
                return Err(op_err(self.name(), "the arguments' sizes do not match"));
            }
            gated_bwd(self.act, g, u, dy)
        });
        Ok((out, Shape::from(2 * n)))
    }
}

// ------------------------------------------------------ rotary embedding

/// HF's "rotate half" RoPE of `x` `[rows, heads, len, d]` with tables
/// `[rows, 1, len, rot]` (lanes past `rot` pass through), as
/// [`rotate`] computes it. Its backward is the inverse rotation.
pub(crate) fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let fits = match (x.dims(), cos.dims()) {
        (&[r, _, l, d], &[cr, 1, cl, rot]) => {
            cr == r && cl == l && rot <= d && rot % 2 == 0 && sin.dims() == cos.dims()
        }
        _ => false,
    };
    if !fits || !fusable(&[x, cos, sin]) {
        return rotate(x, cos, sin);
    }
    Ok(x.contiguous()?.apply_op3(
        &cos.detach().contiguous()?,
        &sin.detach().contiguous()?,
        Rope { inverse: false },
    )?)
}

/// Rotates by the tables' angles, or with `inverse` by their negatives
/// (the forward's transpose: its backward).
struct Rope {
    inverse: bool,
}

/// `x [rows, heads, len, d]` rotated; `cos`/`sin` are `[rows, len, rot]`.
fn rope_apply<T: Float>(
    x: &[T],
    cos: &[T],
    sin: &[T],
    dims: [usize; 4],
    rot: usize,
    inverse: bool,
) -> Vec<T> {
    let [_, heads, len, d] = dims;
    let half = rot / 2;
    let mut out = vec![T::ZERO; x.len()];
    by_rows(&mut out, d, |row0, out| {
        for (i, y) in out.chunks_exact_mut(d).enumerate() {
            let r = row0 + i; // (row, head, position)
            let (row, pos) = (r / (heads * len), r % len);
            let t = (row * len + pos) * rot;
            let (c, s) = (&cos[t..t + rot], &sin[t..t + rot]);
            let xr = &x[r * d..(r + 1) * d];
            let (y1, rest) = y.split_at_mut(half);
            let (y2, pass) = rest.split_at_mut(half);
            let (x1, x2) = (&xr[..half], &xr[half..rot]);
            let (c1, c2, s1, s2) = (&c[..half], &c[half..], &s[..half], &s[half..]);
            if inverse {
                for k in 0..half {
                    y1[k] = x1[k] * c1[k] + x2[k] * s2[k];
                    y2[k] = x2[k] * c2[k] - x1[k] * s1[k];
                }
            } else {
                for k in 0..half {
                    y1[k] = x1[k] * c1[k] - x2[k] * s1[k];
                    y2[k] = x2[k] * c2[k] + x1[k] * s2[k];
                }
            }
            pass.copy_from_slice(&xr[rot..]);
        }
    });
    out
}

impl CustomOp3 for Rope {
    fn name(&self) -> &'static str {
        "hearth-rope"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (&[r, h, l, d], &[cr, 1, cl, rot]) = (l1.dims(), l2.dims()) else {
            return Err(op_err(
                self.name(),
                "expected [rows, heads, len, d] and [rows, 1, len, rot]",
            ));
        };
        if cr != r || cl != l || rot > d || rot % 2 != 0 || l3.dims() != l2.dims() {
            return Err(op_err(self.name(), "the tables do not fit the input"));
        }
        let out = by_dtype!(s1.dtype(), self.name(), T => {
            let x = elems::<T>(s1, l1, self.name())?;
            let cos = elems::<T>(s2, l2, self.name())?;
            let sin = elems::<T>(s3, l3, self.name())?;
            rope_apply(x, cos, sin, [r, h, l, d], rot, self.inverse)
        });
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let dx = grad.detach().contiguous()?.apply_op3(
            cos,
            sin,
            Rope {
                inverse: !self.inverse,
            },
        )?;
        Ok((Some(dx), None, None))
    }
}

// --------------------------------------------- scaled, masked softmax

/// `softmax(scores · scale + mask)` over the last dimension: `scores`
/// `[rows, heads, len, keys]`, `mask` `[rows or 1, 1, len, keys]` (added,
/// `-inf` where a key is hidden, no gradient), as the attention's
/// composed ops compute it.
pub(crate) fn masked_softmax(scores: &Tensor, mask: &Tensor, scale: f64) -> Result<Tensor> {
    let fits = match (scores.dims(), mask.dims()) {
        (&[r, _, l, t], &[mr, 1, ml, mt]) => (mr == r || mr == 1) && ml == l && mt == t,
        _ => false,
    };
    if !fits || !fusable(&[scores, mask]) {
        return softmax(&(scores * scale)?.broadcast_add(mask)?);
    }
    Ok(scores
        .contiguous()?
        .apply_op2(&mask.detach().contiguous()?, MaskedSoftmax { scale })?)
}

struct MaskedSoftmax {
    scale: f64,
}

fn softmax_fwd<T: Float>(
    s: &[T],
    mask: &[T],
    dims: [usize; 4],
    mask_rows: usize,
    scale: f64,
) -> Vec<T> {
    let [_, heads, len, keys] = dims;
    let scale = T::of(scale);
    let mut out = vec![T::ZERO; s.len()];
    by_rows(&mut out, keys, |row0, out| {
        for (i, y) in out.chunks_exact_mut(keys).enumerate() {
            let r = row0 + i;
            let (row, q) = (r / (heads * len), r % len);
            let m = (if mask_rows == 1 { 0 } else { row } * len + q) * keys;
            let (sr, mr) = (&s[r * keys..(r + 1) * keys], &mask[m..m + keys]);
            let mut max = T::of(f64::NEG_INFINITY);
            for ((y, &sv), &mv) in y.iter_mut().zip(sr).zip(mr) {
                *y = sv * scale + mv;
                if *y > max {
                    max = *y;
                }
            }
            if max == T::of(f64::NEG_INFINITY) {
                // Every key hidden (never in a batch's own mask).
                y.fill(T::ZERO);
                continue;
            }
            let mut sum = T::ZERO;
            for y in y.iter_mut() {
                *y = (*y - max).exp();
                sum = sum + *y;
            }
            let inv = sum.recip();
            for y in y.iter_mut() {
                *y = *y * inv;
            }
        }
    });
    out
}

/// `scale · y · (dy − Σ dy·y)`, row by row.
fn softmax_bwd<T: Float>(y: &[T], dy: &[T], keys: usize, scale: f64) -> Vec<T> {
    let scale = T::of(scale);
    let mut out = vec![T::ZERO; y.len()];
    by_rows(&mut out, keys, |row0, out| {
        for (i, ds) in out.chunks_exact_mut(keys).enumerate() {
            let r = row0 + i;
            let (yr, dr) = (&y[r * keys..(r + 1) * keys], &dy[r * keys..(r + 1) * keys]);
            let dot = dot(yr, dr);
            for ((d, &yv), &dv) in ds.iter_mut().zip(yr).zip(dr) {
                *d = scale * yv * (dv - dot);
            }
        }
    });
    out
}

impl CustomOp2 for MaskedSoftmax {
    fn name(&self) -> &'static str {
        "hearth-masked-softmax"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (&[r, h, l, t], &[mr, 1, ml, mt]) = (l1.dims(), l2.dims()) else {
            return Err(op_err(
                self.name(),
                "expected [rows, heads, len, keys] and [rows, 1, len, keys]",
            ));
        };
        if !(mr == r || mr == 1) || ml != l || mt != t {
            return Err(op_err(self.name(), "the mask does not fit the scores"));
        }
        let out = by_dtype!(s1.dtype(), self.name(), T => {
            let s = elems::<T>(s1, l1, self.name())?;
            let mask = elems::<T>(s2, l2, self.name())?;
            softmax_fwd(s, mask, [r, h, l, t], mr, self.scale)
        });
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        _scores: &Tensor,
        _mask: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let ds = res.detach().apply_op2(
            &grad.detach().contiguous()?,
            SoftmaxGrad { scale: self.scale },
        )?;
        Ok((Some(ds), None))
    }
}

/// The backward of [`MaskedSoftmax`], from its output and the output's
/// gradient.
struct SoftmaxGrad {
    scale: f64,
}

impl CustomOp2 for SoftmaxGrad {
    fn name(&self) -> &'static str {
        "hearth-masked-softmax-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let keys = l1.dims().last().copied().unwrap_or(0);
        if keys == 0 || l1.shape() != l2.shape() {
            return Err(op_err(self.name(), "the arguments' shapes do not match"));
        }
        let out = by_dtype!(s1.dtype(), self.name(), T => {
            let y = elems::<T>(s1, l1, self.name())?;
            let dy = elems::<T>(s2, l2, self.name())?;
            softmax_bwd(y, dy, keys, self.scale)
        });
        Ok((out, l1.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{D, Device, Var};

    use super::*;
    use crate::layers::softcap;

    fn random(shape: &[usize], seed: u64, dtype: DType) -> Tensor {
        let mut s = crate::train::rng::Stream::new(seed);
        let n: usize = shape.iter().product();
        let v: Vec<f64> = (0..n).map(|_| s.uniform() * 4.0 - 2.0).collect();
        Tensor::from_vec(v, shape, &Device::Cpu)
            .unwrap()
            .to_dtype(dtype)
            .unwrap()
    }

    /// Largest `|a − b| / (1 + |b|)`.
    fn gap(a: &Tensor, b: &Tensor) -> f64 {
        assert_eq!(a.dims(), b.dims());
        let a: Vec<f64> = a
            .to_dtype(DType::F64)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let b: Vec<f64> = b
            .to_dtype(DType::F64)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        a.iter()
            .zip(&b)
            .map(|(x, y)| (x - y).abs() / (1.0 + y.abs()))
            .fold(0.0, f64::max)
    }

    /// The value of `f` on `vars` and every var's gradient of `Σ f · r`
    /// (`r` random, so every output element weighs differently).
    fn value_and_grads(vars: &[Var], f: impl Fn(&[Tensor]) -> Tensor) -> (Tensor, Vec<Tensor>) {
        let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
        let y = f(&ts);
        let r = random(y.dims(), 99, y.dtype());
        let grads = (&y * &r).unwrap().sum_all().unwrap().backward().unwrap();
        let g = ts
            .iter()
            .map(|t| grads.get(t).cloned().expect("a gradient"))
            .collect();
        (y, g)
    }

    /// `fused` and `composed` agree on the value and every gradient.
    fn agree(
        vars: &[Var],
        tol: f64,
        fused: impl Fn(&[Tensor]) -> Tensor,
        composed: impl Fn(&[Tensor]) -> Tensor,
    ) {
        let (y1, g1) = value_and_grads(vars, fused);
        let (y2, g2) = value_and_grads(vars, composed);
        assert!(gap(&y1, &y2) < tol, "values differ by {}", gap(&y1, &y2));
        for (i, (a, b)) in g1.iter().zip(&g2).enumerate() {
            assert!(gap(a, b) < tol, "gradient {i} differs by {}", gap(a, b));
        }
    }

    fn var(shape: &[usize], seed: u64, dtype: DType) -> Var {
        Var::from_tensor(&random(shape, seed, dtype)).unwrap()
    }

    #[test]
    fn rms_norm_matches_the_composed_ops_with_its_gradients() {
        for (dtype, tol) in [(DType::F64, 1e-12), (DType::F32, 1e-5)] {
            // Rows past the parallel threshold, a qk-norm's 4-d shape, a
            // shifted weight (Gemma), a frozen weight.
            for (shape, shift) in [
                (vec![300, 576], 0.0),
                (vec![2, 3, 5, 64], 1.0),
                (vec![3, 7], 0.0),
            ] {
                let h = shape[shape.len() - 1];
                let x = var(&shape, 1, dtype);
                let w = var(&[h], 2, dtype);
                let norm = |w: &Tensor| RmsNorm {
                    weight: w.clone(),
                    eps: 1e-5,
                    fused: false,
                    shift,
                };
                agree(
                    &[x.clone(), w.clone()],
                    tol,
                    |t| rms_norm(&norm(&t[1]), &t[0]).unwrap(),
                    |t| norm(&t[1]).forward(&t[0]).unwrap(),
                );
                let frozen = w.as_tensor().detach();
                let y = rms_norm(&norm(&frozen), x.as_tensor()).unwrap();
                let g = y.sum_all().unwrap().backward().unwrap();
                assert!(g.get(x.as_tensor()).is_some() && g.get(&frozen).is_none());
            }
        }
    }

    #[test]
    fn gated_activations_match_the_composed_ops_with_their_gradients() {
        for act in [Activation::Silu, Activation::GeluTanh] {
            for (dtype, tol) in [(DType::F64, 1e-12), (DType::F32, 1e-5)] {
                for shape in [vec![64, 1536], vec![70, 1000], vec![5, 11]] {
                    let g = var(&shape, 3, dtype);
                    let u = var(&shape, 4, dtype);
                    agree(
                        &[g, u],
                        tol,
                        |t| gated(act, &t[0], &t[1]).unwrap(),
                        |t| (activate_exact(act, &t[0]).unwrap() * &t[1]).unwrap(),
                    );
                }
            }
        }
    }

    #[test]
    fn rope_matches_the_composed_ops_with_its_gradient() {
        for (dtype, tol) in [(DType::F64, 1e-12), (DType::F32, 1e-5)] {
            // Full and partial rotary lanes; tables whose halves differ.
            for (rows, heads, len, d, rot) in
                [(2, 9, 64, 64, 64), (3, 2, 5, 8, 4), (1, 40, 70, 64, 64)]
            {
                let x = var(&[rows, heads, len, d], 5, dtype);
                let cos = random(&[rows, 1, len, rot], 6, dtype);
                let sin = random(&[rows, 1, len, rot], 7, dtype);
                agree(
                    &[x],
                    tol,
                    |t| rope(&t[0], &cos, &sin).unwrap(),
                    |t| rotate(&t[0], &cos, &sin).unwrap(),
                );
            }
        }
    }

    #[test]
    fn masked_softmax_matches_the_composed_ops_with_its_gradient() {
        for (dtype, tol) in [(DType::F64, 1e-12), (DType::F32, 1e-5)] {
            for (rows, heads, len, mask_rows) in
                [(2, 3, 6, 2), (2, 3, 6, 1), (1, 9, 64, 1), (2, 9, 70, 2)]
            {
                let s = var(&[rows, heads, len, len], 8, dtype);
                // Causal, with a second document from the middle on.
                let m: Vec<f32> = (0..mask_rows * len * len)
                    .map(|k| {
                        let (i, j) = ((k / len) % len, k % len);
                        let same = (i < len / 2) == (j < len / 2);
                        if j <= i && same {
                            0.0
                        } else {
                            f32::NEG_INFINITY
                        }
                    })
                    .collect();
                let mask = Tensor::from_vec(m, (mask_rows, 1, len, len), &Device::Cpu)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap();
                agree(
                    std::slice::from_ref(&s),
                    tol,
                    |t| masked_softmax(&t[0], &mask, 0.125).unwrap(),
                    |t| {
                        softmax(
                            &softcap(&(&t[0] * 0.125).unwrap(), None)
                                .unwrap()
                                .broadcast_add(&mask)
                                .unwrap(),
                        )
                        .unwrap()
                    },
                );
                let y = masked_softmax(s.as_tensor(), &mask, 0.125).unwrap();
                let sums: Vec<f64> = y
                    .to_dtype(DType::F64)
                    .unwrap()
                    .sum(D::Minus1)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap();
                assert!(sums.iter().all(|s| (s - 1.0).abs() < 1e-5));
            }
        }
    }

    #[test]
    fn fused_ops_refuse_arguments_that_do_not_fit() {
        let x = random(&[4, 8], 1, DType::F32);
        let w = random(&[5], 2, DType::F32);
        // A weight of the wrong width goes to the composed ops (which fail).
        let n = RmsNorm {
            weight: w,
            eps: 1e-5,
            fused: false,
            shift: 0.0,
        };
        assert!(rms_norm(&n, &x).is_err());
        let x = random(&[1, 2, 3, 8], 1, DType::F32);
        let cos = random(&[1, 1, 4, 8], 2, DType::F32);
        assert!(rope(&x, &cos, &cos).is_err());
        // Mixed dtypes: composed ops, which refuse them too.
        let m = random(&[1, 1, 3, 3], 2, DType::F64);
        let s = random(&[1, 2, 3, 3], 3, DType::F32);
        assert!(masked_softmax(&s, &m, 1.0).is_err());
        // The ops themselves check what they are given.
        assert!(
            x.apply_op2(
                &random(&[3], 1, DType::F32),
                RmsNormOp {
                    eps: 1e-5,
                    shift: 0.0
                }
            )
            .is_err()
        );
        assert!(x.apply_op3(&cos, &cos, Rope { inverse: false }).is_err());
        assert!(
            s.apply_op2(
                &random(&[1, 1, 2, 3], 1, DType::F32),
                MaskedSoftmax { scale: 1.0 }
            )
            .is_err()
        );
    }

    /// Gathered rows equal `index_select`, and the rows' gradient added in
    /// place equals `index_add` (repeated ids summed); ids past the table
    /// and rows that do not fit are refused.
    #[test]
    fn embedding_rows_and_their_gradient_match_index_select() {
        let table = random(&[10, 6], 1, DType::F32);
        let ids = [3u32, 0, 3, 9, 3];
        let (s, l) = table.storage_and_layout();
        let candle_core::Storage::Cpu(s) = &*s else {
            panic!("a CPU tensor")
        };
        let (rows, shape) = gather_rows(s, l, &ids).unwrap();
        assert!(gather_rows(s, l, &[10]).is_err());
        let CpuStorage::F32(rows) = rows else {
            panic!("f32 rows")
        };
        let rows = Tensor::from_vec(rows, shape, &Device::Cpu).unwrap();
        let idx = Tensor::new(&ids, &Device::Cpu).unwrap();
        assert_eq!(gap(&rows, &table.index_select(&idx, 0).unwrap()), 0.0);
        let grad = random(&[5, 6], 2, DType::F32);
        let dense = table.zeros_like().unwrap();
        dense
            .inplace_op2(&grad, &AddRows { ids: ids.to_vec() })
            .unwrap();
        let want = table
            .zeros_like()
            .unwrap()
            .index_add(&idx, &grad, 0)
            .unwrap();
        assert!(gap(&dense, &want) < 1e-6);
        assert!(
            dense
                .inplace_op2(
                    &random(&[4, 6], 3, DType::F32),
                    &AddRows { ids: ids.to_vec() }
                )
                .is_err()
        );
        assert!(
            dense
                .inplace_op2(
                    &grad,
                    &AddRows {
                        ids: vec![1, 2, 3, 4, 10]
                    }
                )
                .is_err()
        );
    }
}
