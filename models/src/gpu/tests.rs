//! Each kernel against the CPU reference on small shapes (odd sizes, partial
//! token tiles). Skipped with a message where wgpu finds no adapter, unless
//! `HEARTH_REQUIRE_GPU` is set.

use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{Device, Module, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::kernels::{Format, GpuMatrix};
use super::{Batch, Gpu};
use crate::config::Activation;
use crate::layers::{RmsNorm, Rope};
use crate::quant::{BlockQ8_1, Q4_1Matrix, quantize_row_q8_1};

/// hearth-test-utils' `gpu()`, which unit tests inside this crate cannot use
/// (test-utils links its own copy of `hearth-models`, so its `Gpu` is another
/// type here).
fn gpu() -> Option<Arc<Gpu>> {
    match Gpu::open(None, true) {
        Ok(g) => Some(g),
        Err(e) if std::env::var_os("HEARTH_REQUIRE_GPU").is_some() => {
            panic!("HEARTH_REQUIRE_GPU is set but no adapter opened: {e}")
        }
        Err(e) => {
            eprintln!("skipping: no wgpu adapter ({e}); install mesa-vulkan-drivers");
            None
        }
    }
}

fn randn(rng: &mut StdRng, n: usize) -> Vec<f32> {
    (0..n).map(|_| rng.random::<f32>() * 2.0 - 1.0).collect()
}

/// Records with `f`, runs, and reads `floats` values of `out`.
fn run<'g>(
    gpu: &'g Gpu,
    out: &wgpu::Buffer,
    floats: usize,
    f: impl FnOnce(&mut Batch<'g>),
) -> Vec<f32> {
    let mut encoder = gpu
        .device
        .create_command_encoder(&wgpu::CommandEncoderDescriptor { label: None });
    let mut b = Batch::new(gpu);
    f(&mut b);
    b.encode(&mut encoder);
    gpu.finish_and_read(encoder, out, floats).unwrap()
}

fn upload_f32(gpu: &Gpu, v: &[f32]) -> wgpu::Buffer {
    gpu.upload("test", bytemuck::cast_slice(v)).unwrap()
}

/// Room for `n` rows of `cols` activations quantized to 8-bit blocks.
fn act_q(gpu: &Gpu, n: usize, cols: usize) -> wgpu::Buffer {
    gpu.scratch("q", n * cols / 32 * 10).unwrap()
}

fn to_vec(t: &Tensor) -> Vec<f32> {
    t.to_dtype(candle_core::DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn assert_close(got: &[f32], want: &[f32], tol: f32, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    let m = want.iter().fold(0f32, |a, v| a.max(v.abs())).max(1e-6);
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!((g - w).abs() / m < tol, "{what}: [{i}] {g} vs {w}");
    }
}

#[test]
fn quantize_matches_llama_cpp_reference() {
    let Some(gpu) = gpu() else { return };
    let mut rng = StdRng::seed_from_u64(1);
    let blocks = 4000;
    // Magnitudes from 1e-3 to 1e3, so scales cover f16's range of interest.
    let mut x: Vec<f32> = randn(&mut rng, 32 * blocks)
        .chunks(32)
        .enumerate()
        .flat_map(|(k, c)| {
            let s = 10f32.powf((k % 7) as f32 - 3.0) * (1.0 + (k as f32 * 0.37).sin().abs());
            c.iter().map(move |v| v * s).collect::<Vec<_>>()
        })
        .collect();
    x[5] = 0.0;
    x[32..64].fill(0.0); // an all-zero block
    let xb = upload_f32(&gpu, &x);
    let out = gpu.scratch("q", blocks * 10).unwrap();
    let got = run(&gpu, &out, blocks * 10, |b| {
        b.push(
            &gpu.kernels.quantize,
            &[blocks as u32],
            &[(1, &xb), (2, &out)],
            super::grid1(blocks),
        );
    });
    let mut want = vec![BlockQ8_1::default(); blocks];
    quantize_row_q8_1(&x, &mut want);
    for (k, w) in want.iter().enumerate() {
        let words: Vec<u32> = got[k * 10..k * 10 + 10]
            .iter()
            .map(|f| f.to_bits())
            .collect();
        let qs: Vec<i8> = words[..8]
            .iter()
            .flat_map(|w| w.to_le_bytes())
            .map(|b| b as i8)
            .collect();
        assert_eq!(qs, w.qs.to_vec(), "block {k} values");
        assert_eq!(f32::from_bits(words[8]), w.d, "block {k} scale");
        assert_eq!(f32::from_bits(words[9]), w.s, "block {k} sum");
    }
}

/// The CPU result of `x [n, cols] W^T` for `w` stored as `dtype`.
fn cpu_matmul(dtype: GgmlDType, w: &Tensor, x: &[f32], n: usize) -> (Vec<u8>, Vec<f32>) {
    let q = QTensor::quantize(w, dtype).unwrap();
    let (rows, cols) = w.dims2().unwrap();
    let bytes = q.data().unwrap().into_owned();
    let xt = || Tensor::from_slice(x, (n, cols), &Device::Cpu).unwrap();
    let want = if dtype == GgmlDType::Q4_1 {
        Q4_1Matrix::from_bytes(&bytes, rows, cols)
            .unwrap()
            .matmul(x, n)
            .unwrap()
    } else if !matches!(dtype, GgmlDType::Q8_0 | GgmlDType::F32 | GgmlDType::F16) {
        // Held as stored, read against f32 activations: the dequantized
        // matrix's product.
        let dense = q.dequantize(&Device::Cpu).unwrap();
        to_vec(&xt().matmul(&dense.t().unwrap()).unwrap())
    } else {
        let xt = Tensor::from_slice(x, (n, cols), &Device::Cpu).unwrap();
        to_vec(&QMatMul::from_qtensor(q).unwrap().forward(&xt).unwrap())
    };
    (bytes, want)
}

#[test]
fn matmul_matches_the_cpu_for_every_format() {
    let Some(gpu) = gpu() else { return };
    let mut rng = StdRng::seed_from_u64(2);
    // Short rows (one invocation a row) and, forced, the shared-row kernel
    // on short and long rows.
    for (cols, shared) in [(96, false), (96, true), (512, false), (2048, true)] {
        gpu.shared_rows_always
            .store(shared, std::sync::atomic::Ordering::Relaxed);
        check_matmul(
            &gpu,
            &mut rng,
            70,
            cols,
            &format!("cols={cols} shared={shared}"),
        );
    }
    gpu.shared_rows_always
        .store(false, std::sync::atomic::Ordering::Relaxed);
    // Wrong byte counts and shapes are refused.
    assert!(GpuMatrix::upload(&gpu, Format::Q4_1, 2, 32, &[0; 39], None).is_err());
    assert!(GpuMatrix::upload(&gpu, Format::Q8_0, 1, 30, &[0; 34], None).is_err());
    assert!(GpuMatrix::upload(&gpu, Format::F32, 1, 4, &[0; 16], Some(&[1.0, 2.0])).is_err());
}

/// Every format the device holds as stored, beside its GGUF type.
const FORMATS: [(GgmlDType, Format); 10] = [
    (GgmlDType::Q4_1, Format::Q4_1),
    (GgmlDType::Q8_0, Format::Q8_0),
    (GgmlDType::F32, Format::F32),
    (GgmlDType::F16, Format::F16),
    (GgmlDType::Q4_0, Format::Q4_0),
    (GgmlDType::Q5_0, Format::Q5_0),
    (GgmlDType::Q5_1, Format::Q5_1),
    (GgmlDType::Q4K, Format::Q4K),
    (GgmlDType::Q5K, Format::Q5K),
    (GgmlDType::Q6K, Format::Q6K),
];

fn check_matmul(gpu: &Gpu, rng: &mut StdRng, rows: usize, cols: usize, what: &str) {
    let w = Tensor::from_vec(randn(rng, rows * cols), (rows, cols), &Device::Cpu).unwrap();
    let bias = randn(rng, rows);
    for (dtype, format) in FORMATS {
        // K-quants need rows of whole 256-value blocks.
        if format
            .block()
            .is_some_and(|(values, _, _)| !cols.is_multiple_of(values))
        {
            continue;
        }
        for n in [1, 3, 6] {
            let x = randn(rng, n * cols);
            let (bytes, want) = cpu_matmul(dtype, &w, &x, n);
            let m = GpuMatrix::upload(gpu, format, rows, cols, &bytes, Some(&bias)).unwrap();
            let xb = upload_f32(gpu, &x);
            let init = randn(rng, n * rows);
            let y = upload_f32(gpu, &init);
            let s = act_q(gpu, n, cols);
            // y = init + (x W^T + bias): the residual form.
            let got = run(gpu, &y, n * rows, |b| {
                b.matmul(&m, &xb, n, &y, true, &s).unwrap()
            });
            let want: Vec<f32> = want
                .iter()
                .enumerate()
                .map(|(i, v)| init[i] + v + bias[i % rows])
                .collect();
            // f16 weights: candle multiplies in f16 on the CPU; the GPU in f32.
            let tol = if format == Format::F16 { 2e-3 } else { 1e-5 };
            assert_close(&got, &want, tol, &format!("{what} {format:?} n={n}"));
        }
    }
}

#[test]
fn embedding_rows_dequantize_like_the_cpu() {
    let Some(gpu) = gpu() else { return };
    let mut rng = StdRng::seed_from_u64(3);
    let (rows, cols) = (40, 512);
    let w = Tensor::from_vec(randn(&mut rng, rows * cols), (rows, cols), &Device::Cpu).unwrap();
    let ids = [3u32, 0, 39, 3, 17];
    for (dtype, format) in FORMATS {
        let q = QTensor::quantize(&w, dtype).unwrap();
        let ids_t = Tensor::new(&ids[..], &Device::Cpu).unwrap();
        let want = to_vec(&q.embedding(&ids_t).unwrap());
        let m = GpuMatrix::upload(&gpu, format, rows, cols, &q.data().unwrap(), None).unwrap();
        let idb = gpu.upload("ids", bytemuck::cast_slice(&ids)).unwrap();
        let y = gpu.scratch("y", ids.len() * cols).unwrap();
        let got = run(&gpu, &y, ids.len() * cols, |b| {
            b.embed(&m, &idb, ids.len(), &y)
        });
        assert_eq!(got, want, "{format:?}");
    }
}

#[test]
fn rms_norm_rope_silu_and_gather_match_the_cpu() {
    let Some(gpu) = gpu() else { return };
    let mut rng = StdRng::seed_from_u64(4);
    let dev = Device::Cpu;
    // RMSNorm over 3 rows of 300 (more than one pass of 256 threads).
    let (n, cols) = (3, 300);
    let x = randn(&mut rng, n * cols);
    let wv = randn(&mut rng, cols);
    let norm = RmsNorm {
        weight: Tensor::from_slice(&wv, cols, &dev).unwrap(),
        eps: 1e-5,
        fused: true,
        shift: 0.0,
    };
    let want = to_vec(
        &norm
            .forward(&Tensor::from_slice(&x, (n, cols), &dev).unwrap())
            .unwrap(),
    );
    let (xb, wb, y) = (
        upload_f32(&gpu, &x),
        upload_f32(&gpu, &wv),
        gpu.scratch("y", n * cols).unwrap(),
    );
    let got = run(&gpu, &y, n * cols, |b| {
        b.rms_norm(&xb, &wb, n, cols, 1e-5, &y)
    });
    assert_close(&got, &want, 1e-6, "rms_norm");
    // Added to what y holds (Gemma's post-norms into the residual).
    let held = randn(&mut rng, n * cols);
    let yb = upload_f32(&gpu, &held);
    let got = run(&gpu, &yb, n * cols, |b| {
        b.rms_norm_into(&xb, &wb, [n, cols], 1e-5, &yb, true)
    });
    let sum: Vec<f32> = want.iter().zip(&held).map(|(a, b)| a + b).collect();
    assert_close(&got, &sum, 1e-6, "rms_norm added");

    // RoPE on 3 Q heads + 1 K head of 16, rows padded with 16 V values.
    let cfg = crate::config::Config {
        architecture: "llama".into(),
        vocab_size: 10,
        hidden_size: 48,
        intermediate_size: 64,
        num_hidden_layers: 1,
        num_attention_heads: 3,
        num_key_value_heads: 1,
        head_dim: 16,
        rope_theta: 10_000.0,
        rms_norm_eps: 1e-5,
        max_position_embeddings: 64,
        tie_word_embeddings: true,
        attention_bias: false,
        rope_scaling: None,
        sliding_window: None,
        sliding_layers: Vec::new(),
        hidden_act: Default::default(),
        query_pre_attn_scalar: None,
        attn_logit_softcap: None,
        final_logit_softcap: None,
        rope_local_theta: None,
        rotary_dim: None,
    };
    let (n, heads, hd, stride) = (4, 4, 16, 80);
    let x = randn(&mut rng, n * stride);
    let xt = Tensor::from_slice(&x, (n, stride), &dev).unwrap();
    // The CPU's rotation of the first `heads` heads at table `rows` (the
    // rest of each row, V's 16 values, passed through) against the kernel's.
    let check = |rope: &Rope, rows: &[u32], rot: usize, what: &str| -> Vec<f32> {
        let at = rope.at(&Tensor::new(rows, &dev).unwrap()).unwrap();
        let rotated = at
            .apply(
                &xt.narrow(1, 0, heads * hd)
                    .unwrap()
                    .reshape((n, heads, hd))
                    .unwrap(),
            )
            .unwrap()
            .reshape((n, heads * hd))
            .unwrap();
        let want =
            to_vec(&Tensor::cat(&[&rotated, &xt.narrow(1, heads * hd, 16).unwrap()], 1).unwrap());
        let xb = upload_f32(&gpu, &x);
        let pos = gpu.upload("rows", bytemuck::cast_slice(rows)).unwrap();
        let cos = upload_f32(&gpu, &to_vec(&rope.cos));
        let sin = upload_f32(&gpu, &to_vec(&rope.sin));
        let got = run(&gpu, &xb, n * stride, |b| {
            b.rope(&xb, &pos, (&cos, &sin), [n, heads, hd, stride, rot])
        });
        assert_close(&got, &want, 1e-6, what);
        got
    };
    let rope = Rope::new(&cfg, 64, candle_core::DType::F32, &dev).unwrap();
    check(&rope, &[0, 5, 6, 63], hd, "rope");
    // On the first 8 lanes of each head only (partial rotary), LongRoPE's
    // long rows, the rest passed through.
    let mut partial = cfg.clone();
    partial.rotary_dim = Some(8);
    partial.rope_scaling = Some(crate::config::RopeScaling::LongRope {
        short_factor: vec![1.0, 1.5, 2.0, 2.5],
        long_factor: vec![3.0, 4.0, 5.0, 6.0],
        original_max_position_embeddings: 6.0,
        attention_factor: 1.2,
    });
    let rope = Rope::new(&partial, 64, candle_core::DType::F32, &dev).unwrap();
    let rows: Vec<u32> = rope.rows(60, n).collect();
    assert_eq!(
        rows[0],
        64 + 60,
        "past the original context: the long table"
    );
    let got = check(&rope, &rows, 8, "partial rope");
    // The lanes past 8 are untouched.
    assert_eq!(got[8..16], x[8..16]);

    // SiLU-gated product over a fused [n, 2 * inter] gate/up.
    let (n, inter) = (3, 70);
    let gu = randn(&mut rng, n * 2 * inter);
    let gut = Tensor::from_slice(&gu, (n, 2 * inter), &dev).unwrap();
    let want = to_vec(
        &(candle_nn::ops::silu(&gut.narrow(1, 0, inter).unwrap()).unwrap()
            * gut.narrow(1, inter, inter).unwrap())
        .unwrap(),
    );
    let (gb, y) = (upload_f32(&gpu, &gu), gpu.scratch("y", n * inter).unwrap());
    let got = run(&gpu, &y, n * inter, |b| {
        b.gated(Activation::Silu, &gb, n, inter, &y)
    });
    assert_close(&got, &want, 1e-6, "silu_mul");
    // GeGLU (tanh GELU), over values wide enough to reach its tails.
    let wide: Vec<f32> = gu.iter().map(|v| v * 6.0).collect();
    let wt = Tensor::from_slice(&wide, (n, 2 * inter), &dev).unwrap();
    let want = to_vec(
        &(wt.narrow(1, 0, inter).unwrap().gelu().unwrap() * wt.narrow(1, inter, inter).unwrap())
            .unwrap(),
    );
    let gb = upload_f32(&gpu, &wide);
    let got = run(&gpu, &y, n * inter, |b| {
        b.gated(Activation::GeluTanh, &gb, n, inter, &y)
    });
    assert_close(&got, &want, 1e-5, "gelu_mul");
    // Scale, then soft-cap, in place.
    let yb = upload_f32(&gpu, &wide);
    let want: Vec<f32> = wide.iter().map(|v| 3.0 * (v * 2.0 / 3.0).tanh()).collect();
    let got = run(&gpu, &yb, wide.len(), |b| {
        b.scale_cap(&yb, wide.len(), 2.0, Some(3.0))
    });
    assert_close(&got, &want, 1e-6, "scale_cap");
    let yb = upload_f32(&gpu, &wide);
    let want: Vec<f32> = wide.iter().map(|v| v * 0.5).collect();
    let got = run(&gpu, &yb, wide.len(), |b| {
        b.scale_cap(&yb, wide.len(), 0.5, None)
    });
    assert_close(&got, &want, 1e-6, "scale");

    // Gather rows 2 and 0 of a [3, 5] matrix.
    let x: Vec<f32> = (0..15).map(|v| v as f32).collect();
    let (xb, rows, y) = (
        upload_f32(&gpu, &x),
        gpu.upload("rows", bytemuck::cast_slice(&[2u32, 0]))
            .unwrap(),
        gpu.scratch("y", 10).unwrap(),
    );
    let got = run(&gpu, &y, 10, |b| b.gather(&xb, &rows, 2, 5, &y));
    assert_eq!(got, [10.0, 11.0, 12.0, 13.0, 14.0, 0.0, 1.0, 2.0, 3.0, 4.0]);
}

/// Causal attention with grouped KV heads, the obvious way.
#[allow(clippy::too_many_arguments)]
fn naive_attention(
    q: &[f32],
    keys: &[f32],
    values: &[f32],
    l: usize,
    start: usize,
    heads: usize,
    kvh: usize,
    hd: usize,
    window: usize,
    cap: f32,
) -> Vec<f32> {
    let mut out = vec![0f32; l * heads * hd];
    for i in 0..l {
        for h in 0..heads {
            let g = h / (heads / kvh);
            let t = start + i + 1;
            // Keys p - window < j <= p (all of them with no window).
            let lo = if window > 0 {
                t.saturating_sub(window)
            } else {
                0
            };
            let qv = &q[(i * heads + h) * hd..(i * heads + h + 1) * hd];
            let s: Vec<f32> = (0..t)
                .map(|j| {
                    if j < lo {
                        return f32::NEG_INFINITY;
                    }
                    let k = &keys[(j * kvh + g) * hd..(j * kvh + g + 1) * hd];
                    let s = qv.iter().zip(k).map(|(a, b)| a * b).sum::<f32>() / (hd as f32).sqrt();
                    if cap > 0.0 { cap * (s / cap).tanh() } else { s }
                })
                .collect();
            let m = s.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
            let e: Vec<f32> = s.iter().map(|v| (v - m).exp()).collect();
            let z: f32 = e.iter().sum();
            for (j, p) in e.iter().enumerate() {
                for d in 0..hd {
                    out[(i * heads + h) * hd + d] += p / z * values[(j * kvh + g) * hd + d];
                }
            }
        }
    }
    out
}

#[test]
fn kv_append_and_attention_match_a_naive_reference() {
    let Some(gpu) = gpu() else { return };
    let mut rng = StdRng::seed_from_u64(5);
    let (heads, kvh, hd, layers) = (4, 2, 16, 2);
    let (qdim, kvdim) = (heads * hd, kvh * hd);
    let stride = qdim + 2 * kvdim;
    let cache_row = layers * 2 * kvdim;
    let layer = 1;
    // Five cached tokens, then three new ones.
    let (start, l) = (5, 3);
    let t = start + l;
    let keys = randn(&mut rng, t * kvdim);
    let values = randn(&mut rng, t * kvdim);
    let mut cache = vec![0f32; 16 * cache_row];
    for j in 0..start {
        let base = j * cache_row + layer * 2 * kvdim;
        cache[base..base + kvdim].copy_from_slice(&keys[j * kvdim..(j + 1) * kvdim]);
        cache[base + kvdim..base + 2 * kvdim].copy_from_slice(&values[j * kvdim..(j + 1) * kvdim]);
    }
    // The batch holds one row of another sequence before this one's.
    let offset = 1;
    let mut qkv = randn(&mut rng, (offset + l) * stride);
    let q: Vec<f32> = (0..l)
        .flat_map(|i| qkv[(offset + i) * stride..(offset + i) * stride + qdim].to_vec())
        .collect();
    for i in 0..l {
        let row = (offset + i) * stride;
        let j = start + i;
        qkv[row + qdim..row + qdim + kvdim].copy_from_slice(&keys[j * kvdim..(j + 1) * kvdim]);
        qkv[row + qdim + kvdim..row + stride].copy_from_slice(&values[j * kvdim..(j + 1) * kvdim]);
    }
    // No window, and one of 3 keys (the first new token sees 3 of its 6);
    // then soft-capped scores (Gemma 2).
    for (window, cap) in [(0usize, 0f32), (3, 0.0), (3, 1.5), (0, 0.7)] {
        let want = naive_attention(&q, &keys, &values, l, start, heads, kvh, hd, window, cap);
        let (qb, cb) = (upload_f32(&gpu, &qkv), upload_f32(&gpu, &cache));
        let scores = gpu.scratch("scores", l * heads * t).unwrap();
        let out = gpu.scratch("out", (offset + l) * qdim).unwrap();
        let scale = (1.0 / (hd as f32).sqrt()).to_bits();
        let layer_off = (layer * 2 * kvdim) as u32;
        let got = run(&gpu, &out, (offset + l) * qdim, |b| {
            b.kv_append(
                [
                    l as u32,
                    kvdim as u32,
                    offset as u32,
                    stride as u32,
                    qdim as u32,
                    start as u32,
                    cache_row as u32,
                    layer_off,
                ],
                &qb,
                &cb,
            );
            b.attention(
                &[
                    l as u32,
                    start as u32,
                    heads as u32,
                    kvh as u32,
                    hd as u32,
                    stride as u32,
                    offset as u32,
                    cache_row as u32,
                    layer_off,
                    kvdim as u32,
                    t as u32,
                    scale,
                    window as u32,
                    cap.to_bits(),
                ],
                &qb,
                &cb,
                &scores,
                &out,
            );
        });
        assert_close(
            &got[offset * qdim..],
            &want,
            1e-5,
            &format!("attention, window {window}"),
        );
    }
}
