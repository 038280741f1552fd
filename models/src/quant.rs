//! Our own Q4_1 matrix kernels, exact to GGUF's Q4_1 format.
//!
//! candle's Q4_1 dot product is a scalar loop, and repacking Q4_1 to Q8_0
//! (which candle vectorises) rounds the weights a second time, enough to
//! change greedy tokens against llama.cpp. Here activations are quantized to
//! Q8_1 exactly as llama.cpp does (per 32 values: f16 scale, f16 scaled sum)
//! and the dot product runs on AVX-512 VNNI (two blocks per instruction, the
//! 4-bit by 8-bit products summed in one `vpdpbusd`) or AVX2+FMA on x86-64,
//! and on NEON's dot-product extension (`sdot`) or plain NEON on aarch64
//! (Apple Silicon, Raspberry Pi, phones) — chosen at run time, never at
//! build time, because a home cluster mixes CPUs — with a portable
//! fallback that computes the same integer sums.

use half::f16;
use rayon::prelude::*;

use crate::error::{ModelError, Result};

/// Values per block.
pub const QK: usize = 32;
/// Bytes of one GGUF Q4_1 block: f16 d, f16 m, 16 bytes of nibbles.
pub const Q4_1_BLOCK_BYTES: usize = 20;

/// One GGUF Q4_1 block: value = d * q + m, q in 0..16. Low nibbles hold
/// values 0..16, high nibbles values 16..32.
#[derive(Debug, Clone, Copy)]
#[repr(C)]
pub struct BlockQ4_1 {
    pub d: f16,
    pub m: f16,
    pub qs: [u8; 16],
}

/// One activation block: value ~= d * q; `s` = d * sum(q) (both rounded to f16 as llama.cpp).
#[derive(Debug, Clone, Copy)]
#[repr(C, align(32))]
pub struct BlockQ8_1 {
    pub qs: [i8; 32],
    pub d: f32,
    pub s: f32,
}

impl Default for BlockQ8_1 {
    fn default() -> Self {
        Self {
            qs: [0; 32],
            d: 0.0,
            s: 0.0,
        }
    }
}

/// A Q4_1 matrix `[rows, cols]`, row-major blocks.
#[derive(Debug, Clone)]
pub struct Q4_1Matrix {
    rows: usize,
    cols: usize,
    blocks: Vec<BlockQ4_1>,
}

impl Q4_1Matrix {
    /// Parses GGUF Q4_1 bytes of a `[rows, cols]` matrix.
    pub fn from_bytes(bytes: &[u8], rows: usize, cols: usize) -> Result<Self> {
        if !cols.is_multiple_of(QK) {
            return Err(ModelError::InvalidConfig(format!(
                "Q4_1 matrix has {cols} columns, not a multiple of {QK}"
            )));
        }
        let n = rows * cols / QK;
        if bytes.len() != n * Q4_1_BLOCK_BYTES {
            return Err(ModelError::InvalidConfig(format!(
                "Q4_1 matrix [{rows}, {cols}] needs {} bytes, got {}",
                n * Q4_1_BLOCK_BYTES,
                bytes.len()
            )));
        }
        let blocks = bytes
            .chunks_exact(Q4_1_BLOCK_BYTES)
            .map(|c| {
                let mut qs = [0u8; 16];
                qs.copy_from_slice(&c[4..20]);
                BlockQ4_1 {
                    d: f16::from_le_bytes([c[0], c[1]]),
                    m: f16::from_le_bytes([c[2], c[3]]),
                    qs,
                }
            })
            .collect();
        Ok(Self { rows, cols, blocks })
    }

    /// Stacks matrices with the same column count (e.g. Q, K, V into one QKV).
    pub fn vstack(parts: &[Q4_1Matrix]) -> Result<Self> {
        let cols = parts.first().map(|p| p.cols).unwrap_or(0);
        if parts.iter().any(|p| p.cols != cols) {
            return Err(ModelError::InvalidConfig(
                "stacked matrices differ in columns".into(),
            ));
        }
        Ok(Self {
            rows: parts.iter().map(|p| p.rows).sum(),
            cols,
            blocks: parts
                .iter()
                .flat_map(|p| p.blocks.iter().copied())
                .collect(),
        })
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Dequantizes to f32, row-major.
    pub fn to_f32(&self) -> Vec<f32> {
        let mut out = Vec::with_capacity(self.rows * self.cols);
        for b in &self.blocks {
            let (d, m) = (b.d.to_f32(), b.m.to_f32());
            out.extend(b.qs.iter().map(|q| d * (q & 0x0F) as f32 + m));
            out.extend(b.qs.iter().map(|q| d * (q >> 4) as f32 + m));
        }
        out
    }

    /// `y[i] = W x[i]` for each of the `n` rows of `x` (`[n, cols]` -> `[n, rows]`).
    pub fn matmul(&self, x: &[f32], n: usize) -> Result<Vec<f32>> {
        if x.len() != n * self.cols {
            return Err(ModelError::BadStageInput(format!(
                "input of {} values for {n} rows of {} columns",
                x.len(),
                self.cols
            )));
        }
        let bpr = self.cols / QK;
        let mut act = vec![BlockQ8_1::default(); n * bpr];
        for (xr, ar) in x.chunks_exact(self.cols).zip(act.chunks_exact_mut(bpr)) {
            quantize_row_q8_1(xr, ar);
        }
        let Kernels { dot, dot4 } = kernels();
        let mut out = vec![0f32; n * self.rows];
        // Work is split by output rows; each chunk writes its own column
        // strip of `out`, gathered after the parallel section.
        // A few chunks per thread: enough to balance, few enough that
        // scheduling stays cheap for single-token decode.
        let chunk = self.rows.div_ceil(rayon::current_num_threads() * 4).max(16);
        let strips: Vec<(usize, Vec<f32>)> = (0..self.rows.div_ceil(chunk))
            .into_par_iter()
            .map(|c| {
                let r0 = c * chunk;
                let r1 = (r0 + chunk).min(self.rows);
                let mut strip = vec![0f32; n * (r1 - r0)];
                let width = r1 - r0;
                for r in r0..r1 {
                    let w = &self.blocks[r * bpr..(r + 1) * bpr];
                    let mut i = 0;
                    // Four tokens per pass over the weight row (prefill).
                    while i + 4 <= n {
                        let ys = dot4(w, &act[i * bpr..(i + 4) * bpr], bpr);
                        for (k, y) in ys.into_iter().enumerate() {
                            strip[(i + k) * width + (r - r0)] = y;
                        }
                        i += 4;
                    }
                    for i in i..n {
                        strip[i * width + (r - r0)] = dot(w, &act[i * bpr..(i + 1) * bpr]);
                    }
                }
                (r0, strip)
            })
            .collect();
        for (r0, strip) in strips {
            let width = strip.len() / n.max(1);
            for i in 0..n {
                out[i * self.rows + r0..i * self.rows + r0 + width]
                    .copy_from_slice(&strip[i * width..(i + 1) * width]);
            }
        }
        Ok(out)
    }
}

/// Quantizes one row to Q8_1 as llama.cpp's reference `quantize_row_q8_1`.
pub fn quantize_row_q8_1(x: &[f32], out: &mut [BlockQ8_1]) {
    for (xb, b) in x.chunks_exact(QK).zip(out.iter_mut()) {
        let amax = xb.iter().fold(0f32, |a, v| a.max(v.abs()));
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        let mut sum = 0i32;
        for (q, v) in b.qs.iter_mut().zip(xb) {
            let r = round_half_away(v * id);
            *q = r as i8;
            sum += r;
        }
        b.d = f16::from_f32(d).to_f32();
        b.s = f16::from_f32(sum as f32 * d).to_f32();
    }
}

/// `x.round() as i32` (halves away from zero, as C's `roundf`) for
/// |x| < 2^23, in operations the compiler vectorises (`f32::round` is a
/// library call per value): truncate, then step by the exact remainder.
#[inline]
fn round_half_away(x: f32) -> i32 {
    let t = x as i32;
    let f = x - t as f32;
    t + i32::from(f >= 0.5) - i32::from(f <= -0.5)
}

type DotFn = fn(&[BlockQ4_1], &[BlockQ8_1]) -> f32;
/// One weight row against four activation rows (`bpr` blocks each, back to back).
type Dot4Fn = fn(&[BlockQ4_1], &[BlockQ8_1], usize) -> [f32; 4];

#[derive(Clone, Copy)]
struct Kernels {
    dot: DotFn,
    dot4: Dot4Fn,
}

/// The fastest kernels this CPU runs, picked once at run time.
fn kernels() -> Kernels {
    use std::sync::OnceLock;
    static K: OnceLock<Kernels> = OnceLock::new();
    *K.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        if std::env::var_os("HEARTH_NO_SIMD").is_none()
            && std::env::var_os("HEARTH_NO_AVX512").is_none()
            && avx512_vnni()
        {
            return Kernels {
                dot: dot_vnni_entry,
                dot4: dot4_vnni_entry,
            };
        }
        #[cfg(target_arch = "x86_64")]
        if std::env::var_os("HEARTH_NO_SIMD").is_none()
            && is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c")
        {
            return Kernels {
                dot: dot_avx2_entry,
                dot4: dot4_avx2_entry,
            };
        }
        #[cfg(target_arch = "aarch64")]
        if std::env::var_os("HEARTH_NO_SIMD").is_none()
            && std::env::var_os("HEARTH_NO_DOTPROD").is_none()
            && std::arch::is_aarch64_feature_detected!("dotprod")
        {
            return Kernels {
                dot: dot_sdot_entry,
                dot4: dot4_sdot_entry,
            };
        }
        #[cfg(target_arch = "aarch64")]
        if std::env::var_os("HEARTH_NO_SIMD").is_none() {
            return Kernels {
                dot: dot_neon_entry,
                dot4: dot4_neon_entry,
            };
        }
        Kernels {
            dot: dot_scalar,
            dot4: dot4_scalar,
        }
    })
}

fn dot4_scalar(w: &[BlockQ4_1], a: &[BlockQ8_1], bpr: usize) -> [f32; 4] {
    std::array::from_fn(|k| dot_scalar(w, &a[k * bpr..(k + 1) * bpr]))
}

/// Portable Q4_1 x Q8_1 dot product.
pub fn dot_scalar(w: &[BlockQ4_1], a: &[BlockQ8_1]) -> f32 {
    let mut acc = 0f32;
    let mut summs = 0f32;
    for (wb, ab) in w.iter().zip(a) {
        let mut isum = 0i32;
        for j in 0..16 {
            isum += (wb.qs[j] & 0x0F) as i32 * ab.qs[j] as i32;
            isum += (wb.qs[j] >> 4) as i32 * ab.qs[j + 16] as i32;
        }
        acc += wb.d.to_f32() * ab.d * isum as f32;
        summs += wb.m.to_f32() * ab.s;
    }
    acc + summs
}

#[cfg(target_arch = "x86_64")]
fn dot_avx2_entry(w: &[BlockQ4_1], a: &[BlockQ8_1]) -> f32 {
    // SAFETY: only selected by `kernel()` after detecting AVX2, FMA and F16C.
    unsafe { dot_avx2(w, a) }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_avx2(w: &[BlockQ4_1], a: &[BlockQ8_1]) -> f32 {
    use std::arch::x86_64::*;
    let n = w.len().min(a.len());
    let mask = _mm_set1_epi8(0x0F);
    let ones = _mm256_set1_epi16(1);
    let mut acc = _mm256_setzero_ps();
    let mut acc_m = _mm_setzero_ps();
    for i in 0..n {
        let wb = &w[i];
        let ab = &a[i];
        // SAFETY: `BlockQ4_1` starts with two f16 (4 bytes) then 16 bytes of
        // nibbles; `qs` of `BlockQ8_1` is 32 bytes. All loads are unaligned.
        let (dm, qs, q8) = unsafe {
            (
                _mm_cvtph_ps(_mm_cvtsi32_si128(std::ptr::read_unaligned(
                    wb as *const BlockQ4_1 as *const i32,
                ))),
                _mm_loadu_si128(wb.qs.as_ptr() as *const __m128i),
                _mm256_loadu_si256(ab.qs.as_ptr() as *const __m256i),
            )
        };
        // dm = [d, m, 0, 0] of the weights; ds = [d, s, 0, 0] of the activations.
        let ds = _mm_set_ps(0.0, 0.0, ab.s, ab.d);
        let prod = _mm_mul_ps(dm, ds); // [d*d8, m*s8, 0, 0]
        acc_m = _mm_add_ps(acc_m, prod);
        let lo = _mm_and_si128(qs, mask);
        let hi = _mm_and_si128(_mm_srli_epi16(qs, 4), mask);
        let q4 = _mm256_set_m128i(hi, lo);
        let p32 = _mm256_madd_epi16(_mm256_maddubs_epi16(q4, q8), ones);
        let scale = _mm256_broadcastss_ps(prod);
        acc = _mm256_fmadd_ps(scale, _mm256_cvtepi32_ps(p32), acc);
    }
    let hi = _mm256_extractf128_ps(acc, 1);
    let s = _mm_add_ps(_mm256_castps256_ps128(acc), hi);
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    // acc_m lane 1 holds the sum of m * s.
    _mm_cvtss_f32(s) + _mm_cvtss_f32(_mm_shuffle_ps(acc_m, acc_m, 1))
}

#[cfg(target_arch = "x86_64")]
fn dot4_avx2_entry(w: &[BlockQ4_1], a: &[BlockQ8_1], bpr: usize) -> [f32; 4] {
    // SAFETY: only selected by `kernels()` after detecting AVX2, FMA and F16C.
    unsafe { dot4_avx2(w, a, bpr) }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot4_avx2(w: &[BlockQ4_1], a: &[BlockQ8_1], bpr: usize) -> [f32; 4] {
    use std::arch::x86_64::*;
    let n = w.len().min(bpr);
    let mask = _mm_set1_epi8(0x0F);
    let ones = _mm256_set1_epi16(1);
    let mut acc = [_mm256_setzero_ps(); 4];
    let mut summs = [0f32; 4];
    debug_assert!(a.len() >= 4 * bpr, "four activation rows expected");
    for i in 0..n {
        let wb = &w[i];
        // SAFETY: see `dot_avx2`.
        let (dm, qs) = unsafe {
            (
                _mm_cvtph_ps(_mm_cvtsi32_si128(std::ptr::read_unaligned(
                    wb as *const BlockQ4_1 as *const i32,
                ))),
                _mm_loadu_si128(wb.qs.as_ptr() as *const __m128i),
            )
        };
        let d = _mm_cvtss_f32(dm);
        let m = _mm_cvtss_f32(_mm_shuffle_ps(dm, dm, 1));
        let lo = _mm_and_si128(qs, mask);
        let hi = _mm_and_si128(_mm_srli_epi16(qs, 4), mask);
        let q4 = _mm256_set_m128i(hi, lo);
        for k in 0..4 {
            let ab = &a[k * bpr + i];
            // SAFETY: `qs` is 32 bytes; unaligned load.
            let q8 = unsafe { _mm256_loadu_si256(ab.qs.as_ptr() as *const __m256i) };
            let p32 = _mm256_madd_epi16(_mm256_maddubs_epi16(q4, q8), ones);
            acc[k] = _mm256_fmadd_ps(_mm256_set1_ps(d * ab.d), _mm256_cvtepi32_ps(p32), acc[k]);
            summs[k] += m * ab.s;
        }
    }
    std::array::from_fn(|k| {
        let v = acc[k];
        let hi = _mm256_extractf128_ps(v, 1);
        let s = _mm_add_ps(_mm256_castps256_ps128(v), hi);
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
        _mm_cvtss_f32(s) + summs[k]
    })
}

/// Whether this CPU runs the AVX-512 VNNI kernels (and the AVX2 ones they
/// fall back to for an odd last block).
#[cfg(target_arch = "x86_64")]
fn avx512_vnni() -> bool {
    is_x86_feature_detected!("avx512f")
        && is_x86_feature_detected!("avx512bw")
        && is_x86_feature_detected!("avx512vl")
        && is_x86_feature_detected!("avx512vnni")
        && is_x86_feature_detected!("avx2")
        && is_x86_feature_detected!("fma")
        && is_x86_feature_detected!("f16c")
}

/// A Q4_1 block's 32 weights as unsigned bytes in value order (low
/// nibbles: values 0..16, high nibbles: 16..32), and its `[d, m]`.
///
/// # Safety
/// The CPU must have AVX2 and F16C.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q4_1_bytes(wb: &BlockQ4_1) -> (std::arch::x86_64::__m256i, [f32; 2]) {
    use std::arch::x86_64::*;
    let mask = _mm_set1_epi8(0x0F);
    // SAFETY: `BlockQ4_1` starts with two f16 (4 bytes) then 16 bytes of
    // nibbles; both loads are unaligned reads inside the block.
    let (dm, qs) = unsafe {
        (
            _mm_cvtph_ps(_mm_cvtsi32_si128(std::ptr::read_unaligned(
                wb as *const BlockQ4_1 as *const i32,
            ))),
            _mm_loadu_si128(wb.qs.as_ptr() as *const __m128i),
        )
    };
    let lo = _mm_and_si128(qs, mask);
    let hi = _mm_and_si128(_mm_srli_epi16(qs, 4), mask);
    let d = _mm_cvtss_f32(dm);
    let m = _mm_cvtss_f32(_mm_shuffle_ps(dm, dm, 1));
    (_mm256_set_m128i(hi, lo), [d, m])
}

/// 16 lanes: the first 8 `a`, the last 8 `b`.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx512f")]
fn halves_ps(a: f32, b: f32) -> std::arch::x86_64::__m512 {
    use std::arch::x86_64::*;
    _mm512_castpd_ps(_mm512_insertf64x4(
        _mm512_castpd256_pd512(_mm256_castps_pd(_mm256_set1_ps(a))),
        _mm256_castps_pd(_mm256_set1_ps(b)),
        1,
    ))
}

#[cfg(target_arch = "x86_64")]
fn dot_vnni_entry(w: &[BlockQ4_1], a: &[BlockQ8_1]) -> f32 {
    // SAFETY: only selected by `kernels()` after `avx512_vnni()`.
    unsafe { dot_vnni(w, a) }
}

/// Q4_1 x Q8_1 with AVX-512 VNNI: two blocks per step, their 64 byte
/// products summed into 16 lanes by one `vpdpbusd` (weights unsigned,
/// activations signed: the same integer sums as the portable kernel).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn dot_vnni(w: &[BlockQ4_1], a: &[BlockQ8_1]) -> f32 {
    use std::arch::x86_64::*;
    let n = w.len().min(a.len());
    let mut acc = _mm512_setzero_ps();
    let mut summs = 0f32;
    let mut i = 0;
    while i + 2 <= n {
        // SAFETY: the CPU has AVX2 and F16C (`avx512_vnni()`).
        let ((q0, [d0, m0]), (q1, [d1, m1])) =
            unsafe { (q4_1_bytes(&w[i]), q4_1_bytes(&w[i + 1])) };
        let (a0, a1) = (&a[i], &a[i + 1]);
        // SAFETY: `qs` of `BlockQ8_1` is 32 bytes; unaligned loads.
        let (x0, x1) = unsafe {
            (
                _mm256_loadu_si256(a0.qs.as_ptr() as *const __m256i),
                _mm256_loadu_si256(a1.qs.as_ptr() as *const __m256i),
            )
        };
        let q = _mm512_inserti64x4(_mm512_castsi256_si512(q0), q1, 1);
        let x = _mm512_inserti64x4(_mm512_castsi256_si512(x0), x1, 1);
        let p = _mm512_dpbusd_epi32(_mm512_setzero_si512(), q, x);
        acc = _mm512_fmadd_ps(halves_ps(d0 * a0.d, d1 * a1.d), _mm512_cvtepi32_ps(p), acc);
        summs += m0 * a0.s + m1 * a1.s;
        i += 2;
    }
    if i < n {
        // SAFETY: as above.
        let (q0, [d0, m0]) = unsafe { q4_1_bytes(&w[i]) };
        // SAFETY: as above.
        let x0 = unsafe { _mm256_loadu_si256(a[i].qs.as_ptr() as *const __m256i) };
        let p = _mm256_dpbusd_epi32(_mm256_setzero_si256(), q0, x0);
        summs += d0 * a[i].d * hsum_epi32(p) + m0 * a[i].s;
    }
    _mm512_reduce_add_ps(acc) + summs
}

/// The sum of 8 lanes, as f32 (each lane's byte products fit easily).
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx2")]
fn hsum_epi32(p: std::arch::x86_64::__m256i) -> f32 {
    use std::arch::x86_64::*;
    let t = _mm256_cvtepi32_ps(p);
    let h = _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1));
    let h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    let h = _mm_add_ss(h, _mm_shuffle_ps(h, h, 1));
    _mm_cvtss_f32(h)
}

#[cfg(target_arch = "x86_64")]
fn dot4_vnni_entry(w: &[BlockQ4_1], a: &[BlockQ8_1], bpr: usize) -> [f32; 4] {
    // SAFETY: only selected by `kernels()` after `avx512_vnni()`.
    unsafe { dot4_vnni(w, a, bpr) }
}

/// One weight row against four activation rows with AVX-512 VNNI: each
/// pair of weight blocks is unpacked once for the four.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn dot4_vnni(w: &[BlockQ4_1], a: &[BlockQ8_1], bpr: usize) -> [f32; 4] {
    use std::arch::x86_64::*;
    let n = w.len().min(bpr);
    debug_assert!(a.len() >= 4 * bpr, "four activation rows expected");
    let mut acc = [_mm512_setzero_ps(); 4];
    let mut summs = [0f32; 4];
    let mut i = 0;
    while i + 2 <= n {
        // SAFETY: the CPU has AVX2 and F16C (`avx512_vnni()`).
        let ((q0, [d0, m0]), (q1, [d1, m1])) =
            unsafe { (q4_1_bytes(&w[i]), q4_1_bytes(&w[i + 1])) };
        let q = _mm512_inserti64x4(_mm512_castsi256_si512(q0), q1, 1);
        for k in 0..4 {
            let (a0, a1) = (&a[k * bpr + i], &a[k * bpr + i + 1]);
            // SAFETY: `qs` of `BlockQ8_1` is 32 bytes; unaligned loads.
            let (x0, x1) = unsafe {
                (
                    _mm256_loadu_si256(a0.qs.as_ptr() as *const __m256i),
                    _mm256_loadu_si256(a1.qs.as_ptr() as *const __m256i),
                )
            };
            let x = _mm512_inserti64x4(_mm512_castsi256_si512(x0), x1, 1);
            let p = _mm512_dpbusd_epi32(_mm512_setzero_si512(), q, x);
            acc[k] = _mm512_fmadd_ps(
                halves_ps(d0 * a0.d, d1 * a1.d),
                _mm512_cvtepi32_ps(p),
                acc[k],
            );
            summs[k] += m0 * a0.s + m1 * a1.s;
        }
        i += 2;
    }
    let mut tail = [0f32; 4];
    if i < n {
        // SAFETY: as above.
        let (q0, [d0, m0]) = unsafe { q4_1_bytes(&w[i]) };
        for k in 0..4 {
            let ab = &a[k * bpr + i];
            // SAFETY: as above.
            let x0 = unsafe { _mm256_loadu_si256(ab.qs.as_ptr() as *const __m256i) };
            let p = _mm256_dpbusd_epi32(_mm256_setzero_si256(), q0, x0);
            tail[k] = d0 * ab.d * hsum_epi32(p);
            summs[k] += m0 * ab.s;
        }
    }
    std::array::from_fn(|k| _mm512_reduce_add_ps(acc[k]) + tail[k] + summs[k])
}

/// A Q4_1 block's 32 weights as signed bytes in value order (0..16 fit):
/// the low nibbles (values 0..16) and the high ones (16..32).
#[cfg(target_arch = "aarch64")]
#[inline]
#[target_feature(enable = "neon")]
fn q4_1_neon(wb: &BlockQ4_1) -> (std::arch::aarch64::int8x16_t, std::arch::aarch64::int8x16_t) {
    use std::arch::aarch64::*;
    // SAFETY: `qs` is 16 bytes; NEON loads need no alignment.
    let qs = unsafe { vld1q_u8(wb.qs.as_ptr()) };
    (
        vreinterpretq_s8_u8(vandq_u8(qs, vdupq_n_u8(0x0F))),
        vreinterpretq_s8_u8(vshrq_n_u8::<4>(qs)),
    )
}

/// An activation block's 32 signed bytes, as two halves.
#[cfg(target_arch = "aarch64")]
#[inline]
#[target_feature(enable = "neon")]
fn q8_1_neon(ab: &BlockQ8_1) -> (std::arch::aarch64::int8x16_t, std::arch::aarch64::int8x16_t) {
    use std::arch::aarch64::*;
    // SAFETY: `qs` is 32 bytes; both loads lie inside it.
    unsafe { (vld1q_s8(ab.qs.as_ptr()), vld1q_s8(ab.qs.as_ptr().add(16))) }
}

/// The block's 32 products summed into four lanes with plain NEON
/// (widening multiplies, pairwise adds): every aarch64 CPU has it.
#[cfg(target_arch = "aarch64")]
#[inline]
#[target_feature(enable = "neon")]
fn block_sums_neon(
    (lo, hi): (std::arch::aarch64::int8x16_t, std::arch::aarch64::int8x16_t),
    (x0, x1): (std::arch::aarch64::int8x16_t, std::arch::aarch64::int8x16_t),
) -> std::arch::aarch64::int32x4_t {
    use std::arch::aarch64::*;
    // Each product is at most 15 * 128 in size: pairs of them fit i16 sums
    // widened to i32.
    let p = vpaddlq_s16(vmull_s8(vget_low_s8(lo), vget_low_s8(x0)));
    let p = vpadalq_s16(p, vmull_high_s8(lo, x0));
    let p = vpadalq_s16(p, vmull_s8(vget_low_s8(hi), vget_low_s8(x1)));
    vpadalq_s16(p, vmull_high_s8(hi, x1))
}

#[cfg(target_arch = "aarch64")]
fn dot_neon_entry(w: &[BlockQ4_1], a: &[BlockQ8_1]) -> f32 {
    // SAFETY: NEON is part of the aarch64 baseline every Rust aarch64
    // Linux, macOS and Android target builds for.
    unsafe { dot_neon(w, a) }
}

/// Q4_1 x Q8_1 with NEON (aarch64's baseline): the same integer sums as
/// the portable kernel, scaled in four float lanes.
#[cfg(target_arch = "aarch64")]
#[target_feature(enable = "neon")]
fn dot_neon(w: &[BlockQ4_1], a: &[BlockQ8_1]) -> f32 {
    use std::arch::aarch64::*;
    let mut acc = vdupq_n_f32(0.0);
    let mut summs = 0f32;
    for (wb, ab) in w.iter().zip(a) {
        let p = block_sums_neon(q4_1_neon(wb), q8_1_neon(ab));
        acc = vfmaq_n_f32(acc, vcvtq_f32_s32(p), wb.d.to_f32() * ab.d);
        summs += wb.m.to_f32() * ab.s;
    }
    vaddvq_f32(acc) + summs
}

#[cfg(target_arch = "aarch64")]
fn dot4_neon_entry(w: &[BlockQ4_1], a: &[BlockQ8_1], bpr: usize) -> [f32; 4] {
    // SAFETY: as in `dot_neon_entry`.
    unsafe { dot4_neon(w, a, bpr) }
}

/// One weight row against four activation rows with NEON: each weight
/// block is unpacked once for the four.
#[cfg(target_arch = "aarch64")]
#[target_feature(enable = "neon")]
fn dot4_neon(w: &[BlockQ4_1], a: &[BlockQ8_1], bpr: usize) -> [f32; 4] {
    use std::arch::aarch64::*;
    debug_assert!(a.len() >= 4 * bpr, "four activation rows expected");
    let n = w.len().min(bpr).min(a.len() / 4);
    let mut acc = [vdupq_n_f32(0.0); 4];
    let mut summs = [0f32; 4];
    for (i, wb) in w.iter().enumerate().take(n) {
        let q = q4_1_neon(wb);
        let (d, m) = (wb.d.to_f32(), wb.m.to_f32());
        for k in 0..4 {
            let ab = &a[k * bpr + i];
            let p = block_sums_neon(q, q8_1_neon(ab));
            acc[k] = vfmaq_n_f32(acc[k], vcvtq_f32_s32(p), d * ab.d);
            summs[k] += m * ab.s;
        }
    }
    std::array::from_fn(|k| vaddvq_f32(acc[k]) + summs[k])
}

/// `acc += ` the four-byte dot products of `a` and `b`, lane by lane
/// (ARMv8.2 `sdot`). Rust's `vdotq_s32` is not stable yet, so the one
/// instruction is written out.
#[cfg(target_arch = "aarch64")]
#[inline]
#[target_feature(enable = "neon,dotprod")]
fn sdot(
    mut acc: std::arch::aarch64::int32x4_t,
    a: std::arch::aarch64::int8x16_t,
    b: std::arch::aarch64::int8x16_t,
) -> std::arch::aarch64::int32x4_t {
    // SAFETY: `sdot` reads and writes only these registers, and this
    // function only runs where the CPU has it (its target feature).
    unsafe {
        std::arch::asm!(
            "sdot {acc:v}.4s, {a:v}.16b, {b:v}.16b",
            acc = inout(vreg) acc,
            a = in(vreg) a,
            b = in(vreg) b,
            options(pure, nomem, nostack, preserves_flags),
        );
    }
    acc
}

#[cfg(target_arch = "aarch64")]
fn dot_sdot_entry(w: &[BlockQ4_1], a: &[BlockQ8_1]) -> f32 {
    // SAFETY: only selected by `kernels()` after detecting dotprod.
    unsafe { dot_sdot(w, a) }
}

/// Q4_1 x Q8_1 with NEON's dot-product extension: a block's 32 byte
/// products summed into four lanes by two `sdot`.
#[cfg(target_arch = "aarch64")]
#[target_feature(enable = "neon,dotprod")]
fn dot_sdot(w: &[BlockQ4_1], a: &[BlockQ8_1]) -> f32 {
    use std::arch::aarch64::*;
    let mut acc = vdupq_n_f32(0.0);
    let mut summs = 0f32;
    for (wb, ab) in w.iter().zip(a) {
        let ((lo, hi), (x0, x1)) = (q4_1_neon(wb), q8_1_neon(ab));
        let p = sdot(sdot(vdupq_n_s32(0), lo, x0), hi, x1);
        acc = vfmaq_n_f32(acc, vcvtq_f32_s32(p), wb.d.to_f32() * ab.d);
        summs += wb.m.to_f32() * ab.s;
    }
    vaddvq_f32(acc) + summs
}

#[cfg(target_arch = "aarch64")]
fn dot4_sdot_entry(w: &[BlockQ4_1], a: &[BlockQ8_1], bpr: usize) -> [f32; 4] {
    // SAFETY: only selected by `kernels()` after detecting dotprod.
    unsafe { dot4_sdot(w, a, bpr) }
}

/// One weight row against four activation rows with `sdot`.
#[cfg(target_arch = "aarch64")]
#[target_feature(enable = "neon,dotprod")]
fn dot4_sdot(w: &[BlockQ4_1], a: &[BlockQ8_1], bpr: usize) -> [f32; 4] {
    use std::arch::aarch64::*;
    debug_assert!(a.len() >= 4 * bpr, "four activation rows expected");
    let n = w.len().min(bpr).min(a.len() / 4);
    let mut acc = [vdupq_n_f32(0.0); 4];
    let mut summs = [0f32; 4];
    for (i, wb) in w.iter().enumerate().take(n) {
        let (lo, hi) = q4_1_neon(wb);
        let (d, m) = (wb.d.to_f32(), wb.m.to_f32());
        for k in 0..4 {
            let ab = &a[k * bpr + i];
            let (x0, x1) = q8_1_neon(ab);
            let p = sdot(sdot(vdupq_n_s32(0), lo, x0), hi, x1);
            acc[k] = vfmaq_n_f32(acc[k], vcvtq_f32_s32(p), d * ab.d);
            summs[k] += m * ab.s;
        }
    }
    std::array::from_fn(|k| vaddvq_f32(acc[k]) + summs[k])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn random_matrix(rows: usize, cols: usize, seed: u32) -> (Q4_1Matrix, Vec<u8>) {
        let mut state = seed;
        let mut next = || {
            state = state.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            state
        };
        let mut bytes = Vec::new();
        for _ in 0..rows * cols / QK {
            bytes.extend(f16::from_f32((next() % 1000) as f32 * 1e-4).to_le_bytes());
            bytes.extend(f16::from_f32((next() % 1000) as f32 * -1e-4).to_le_bytes());
            for _ in 0..16 {
                bytes.push((next() >> 8) as u8);
            }
        }
        (Q4_1Matrix::from_bytes(&bytes, rows, cols).unwrap(), bytes)
    }

    #[test]
    fn simd_and_scalar_agree_and_match_dense() {
        let (m, _) = random_matrix(70, 96, 3);
        let x: Vec<f32> = (0..3 * 96)
            .map(|i| ((i * 37 % 17) as f32 - 8.0) * 0.3)
            .collect();
        let y = m.matmul(&x, 3).unwrap();
        let dense = m.to_f32();
        for i in 0..3 {
            let mut act = vec![BlockQ8_1::default(); 3];
            quantize_row_q8_1(&x[i * 96..(i + 1) * 96], &mut act);
            for r in 0..70 {
                let w = &m.blocks[r * 3..(r + 1) * 3];
                let s = dot_scalar(w, &act);
                let k = (kernels().dot)(w, &act);
                assert!((s - k).abs() <= 1e-4 * s.abs().max(1.0), "{s} vs {k}");
                assert_eq!(y[i * 70 + r], k);
                let exact: f32 = (0..96).map(|c| dense[r * 96 + c] * x[i * 96 + c]).sum();
                let mag: f32 = (0..96)
                    .map(|c| (dense[r * 96 + c] * x[i * 96 + c]).abs())
                    .sum();
                // Activations are rounded to 8 bits: error well under 1% of sum |w x|.
                assert!((exact - s).abs() < 0.01 * mag, "{exact} vs {s} (mag {mag})");
            }
        }
    }

    /// Every kernel this CPU can run (not only the one `kernels()` picks)
    /// against the portable sums, one row and four, for odd and even
    /// block counts (the VNNI kernels take blocks in pairs).
    #[test]
    fn every_kernel_this_cpu_runs_gives_the_portable_sums() {
        let mut all: Vec<(&str, DotFn, Dot4Fn)> = vec![("scalar", dot_scalar, dot4_scalar)];
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx2")
                && is_x86_feature_detected!("fma")
                && is_x86_feature_detected!("f16c")
            {
                all.push(("avx2", dot_avx2_entry, dot4_avx2_entry));
            }
            if avx512_vnni() {
                all.push(("avx512-vnni", dot_vnni_entry, dot4_vnni_entry));
            } else {
                eprintln!("AVX-512 VNNI kernels not checked: this CPU lacks them");
            }
        }
        #[cfg(target_arch = "aarch64")]
        {
            all.push(("neon", dot_neon_entry, dot4_neon_entry));
            if std::arch::is_aarch64_feature_detected!("dotprod") {
                all.push(("neon-dotprod", dot_sdot_entry, dot4_sdot_entry));
            } else {
                eprintln!("NEON dotprod kernels not checked: this CPU lacks them");
            }
        }
        let names: Vec<&str> = all.iter().map(|k| k.0).collect();
        eprintln!("kernels checked: {names:?}");
        for cols in [32, 64, 96, 576, 1536] {
            let bpr = cols / QK;
            let (m, _) = random_matrix(5, cols, cols as u32);
            let x: Vec<f32> = (0..4 * cols)
                .map(|i| ((i * 31 % 23) as f32 - 11.0) * 0.17)
                .collect();
            let mut act = vec![BlockQ8_1::default(); 4 * bpr];
            for (xr, ar) in x.chunks_exact(cols).zip(act.chunks_exact_mut(bpr)) {
                quantize_row_q8_1(xr, ar);
            }
            for r in 0..5 {
                let w = &m.blocks[r * bpr..(r + 1) * bpr];
                let want: Vec<f32> = (0..4)
                    .map(|k| dot_scalar(w, &act[k * bpr..(k + 1) * bpr]))
                    .collect();
                for (name, dot, dot4) in &all {
                    let four = dot4(w, &act, bpr);
                    for k in 0..4 {
                        let one = dot(w, &act[k * bpr..(k + 1) * bpr]);
                        let tol = 1e-5 * want[k].abs().max(1.0);
                        assert!(
                            (one - want[k]).abs() <= tol,
                            "{name} {cols}: {one} vs {}",
                            want[k]
                        );
                        assert!(
                            (four[k] - want[k]).abs() <= tol,
                            "{name} dot4 {cols}: {} vs {}",
                            four[k],
                            want[k]
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn rounding_is_roundf() {
        let mut v: Vec<f32> = vec![0.5, -0.5, 1.5, -1.5, 2.5, -2.5, 0.0, -0.0, 127.0, -127.0];
        v.extend([
            0.49999997f32,
            -0.49999997,
            1.4999999,
            -1.4999999,
            126.5,
            -126.5,
        ]);
        v.extend((0..20_000).map(|i| (i as f32 - 10_000.0) * 0.012_7));
        for x in v {
            assert_eq!(round_half_away(x), x.round() as i32, "{x}");
        }
    }

    #[test]
    fn batched_rows_equal_single_rows() {
        let (m, _) = random_matrix(33, 64, 9);
        let n = 11;
        let x: Vec<f32> = (0..n * 64)
            .map(|i| ((i * 13 % 29) as f32 - 14.0) * 0.1)
            .collect();
        let all = m.matmul(&x, n).unwrap();
        for i in 0..n {
            let one = m.matmul(&x[i * 64..(i + 1) * 64], 1).unwrap();
            for r in 0..33 {
                let (a, b) = (all[i * 33 + r], one[r]);
                assert!(
                    (a - b).abs() <= 1e-5 * a.abs().max(1.0),
                    "row {i} col {r}: {a} vs {b}"
                );
            }
        }
    }

    #[test]
    fn vstack_and_bad_shapes() {
        let (a, _) = random_matrix(4, 64, 1);
        let (b, _) = random_matrix(2, 64, 2);
        let s = Q4_1Matrix::vstack(&[a.clone(), b.clone()]).unwrap();
        assert_eq!(s.rows(), 6);
        let x = vec![0.5f32; 64];
        let ys = s.matmul(&x, 1).unwrap();
        assert_eq!(&ys[..4], &a.matmul(&x, 1).unwrap()[..]);
        assert_eq!(&ys[4..], &b.matmul(&x, 1).unwrap()[..]);
        assert!(Q4_1Matrix::from_bytes(&[0u8; 19], 1, 32).is_err());
        assert!(Q4_1Matrix::from_bytes(&[0u8; 20], 1, 30).is_err());
        assert!(s.matmul(&x[..10], 1).is_err());
    }
}
