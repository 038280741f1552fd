//! The compiled WGSL kernels and the helpers that record one dispatch each.

use super::{Batch, Gpu, grid_rows, grid1};
use crate::config::Activation;
use crate::error::{ModelError, Result};

const COMMON: &str = include_str!("wgsl/common.wgsl");

/// How a matrix is held on the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// GGUF Q4_1 blocks as stored (20 bytes: 5 words).
    Q4_1,
    /// GGUF Q8_0 blocks padded to 36 bytes (9 words).
    Q8_0,
    F32,
    F16,
    /// GGUF Q4_0 blocks padded to 20 bytes.
    Q4_0,
    /// GGUF Q5_0 blocks padded to 24 bytes.
    Q5_0,
    /// GGUF Q5_1 blocks as stored (24 bytes).
    Q5_1,
    /// GGUF Q4_K super-blocks as stored (144 bytes, 256 values).
    Q4K,
    /// GGUF Q5_K super-blocks as stored (176 bytes).
    Q5K,
    /// GGUF Q6_K super-blocks padded to 212 bytes.
    Q6K,
}

impl Format {
    const ALL: [Format; 10] = [
        Format::Q4_1,
        Format::Q8_0,
        Format::F32,
        Format::F16,
        Format::Q4_0,
        Format::Q5_0,
        Format::Q5_1,
        Format::Q4K,
        Format::Q5K,
        Format::Q6K,
    ];

    fn index(self) -> usize {
        Self::ALL.iter().position(|f| *f == self).unwrap_or(0)
    }

    fn source(self) -> String {
        let block = |fmt: &str| format!("{fmt}\n{}", include_str!("wgsl/blocks.wgsl"));
        match self {
            Format::Q4_1 => include_str!("wgsl/fmt_q4_1.wgsl").into(),
            Format::Q8_0 => include_str!("wgsl/fmt_q8_0.wgsl").into(),
            Format::F32 => include_str!("wgsl/fmt_f32.wgsl").into(),
            Format::F16 => include_str!("wgsl/fmt_f16.wgsl").into(),
            Format::Q4_0 => block(include_str!("wgsl/fmt_q4_0.wgsl")),
            Format::Q5_0 => block(include_str!("wgsl/fmt_q5_0.wgsl")),
            Format::Q5_1 => block(include_str!("wgsl/fmt_q5_1.wgsl")),
            Format::Q4K => block(include_str!("wgsl/fmt_q4_k.wgsl")),
            Format::Q5K => block(include_str!("wgsl/fmt_q5_k.wgsl")),
            Format::Q6K => block(include_str!("wgsl/fmt_q6_k.wgsl")),
        }
    }

    /// The block formats held as stored: (values a block, bytes a block as
    /// GGUF stores it, bytes on the device: padded to whole words).
    pub fn block(self) -> Option<(usize, usize, usize)> {
        match self {
            Format::Q4_1 => Some((32, 20, 20)),
            Format::Q8_0 => Some((32, 34, 36)),
            Format::Q4_0 => Some((32, 18, 20)),
            Format::Q5_0 => Some((32, 22, 24)),
            Format::Q5_1 => Some((32, 24, 24)),
            Format::Q4K => Some((256, 144, 144)),
            Format::Q5K => Some((256, 176, 176)),
            Format::Q6K => Some((256, 210, 212)),
            Format::F32 | Format::F16 => None,
        }
    }

    /// Whether the matmul reads activations quantized to 8-bit blocks.
    pub fn quantized(self) -> bool {
        matches!(self, Format::Q4_1 | Format::Q8_0)
    }
}

pub(crate) struct Kernels {
    pub(super) quantize: wgpu::ComputePipeline,
    rms_norm: wgpu::ComputePipeline,
    head_norm: wgpu::ComputePipeline,
    rope: wgpu::ComputePipeline,
    kv_append: wgpu::ComputePipeline,
    attention: wgpu::ComputePipeline,
    silu_mul: wgpu::ComputePipeline,
    gelu_mul: wgpu::ComputePipeline,
    scale_cap: wgpu::ComputePipeline,
    gather: wgpu::ComputePipeline,
    matmul: Vec<wgpu::ComputePipeline>,
    matmul_rows: Vec<wgpu::ComputePipeline>,
    embed: Vec<wgpu::ComputePipeline>,
}

fn pipeline(device: &wgpu::Device, label: &str, body: &str, entry: &str) -> wgpu::ComputePipeline {
    let source = format!("{COMMON}\n{body}");
    let module = device.create_shader_module(wgpu::ShaderModuleDescriptor {
        label: Some(label),
        source: wgpu::ShaderSource::Wgsl(source.into()),
    });
    device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
        label: Some(label),
        layout: None,
        module: &module,
        entry_point: Some(entry),
        compilation_options: Default::default(),
        cache: None,
    })
}

impl Kernels {
    pub(crate) fn new(device: &wgpu::Device) -> Self {
        // One pipeline per weight format, its `deq`/`row_dot` spliced in.
        let per_format = |label: &str, file: &str, entry: &str| -> Vec<wgpu::ComputePipeline> {
            Format::ALL
                .iter()
                .map(|&f| pipeline(device, label, &file.replace("//FORMAT", &f.source()), entry))
                .collect()
        };
        let elementwise = include_str!("wgsl/elementwise.wgsl");
        Self {
            quantize: pipeline(
                device,
                "quantize",
                include_str!("wgsl/quantize.wgsl"),
                "main",
            ),
            rms_norm: pipeline(
                device,
                "rms_norm",
                include_str!("wgsl/rms_norm.wgsl"),
                "main",
            ),
            head_norm: pipeline(
                device,
                "head_norm",
                include_str!("wgsl/head_norm.wgsl"),
                "main",
            ),
            rope: pipeline(device, "rope", include_str!("wgsl/rope.wgsl"), "main"),
            kv_append: pipeline(
                device,
                "kv_append",
                include_str!("wgsl/kv_append.wgsl"),
                "main",
            ),
            attention: pipeline(
                device,
                "attention",
                include_str!("wgsl/attention.wgsl"),
                "main",
            ),
            silu_mul: pipeline(device, "silu_mul", elementwise, "silu_mul"),
            gelu_mul: pipeline(device, "gelu_mul", elementwise, "gelu_mul"),
            scale_cap: pipeline(
                device,
                "scale_cap",
                include_str!("wgsl/scale_cap.wgsl"),
                "main",
            ),
            gather: pipeline(device, "gather", elementwise, "gather"),
            matmul: per_format("matmul", include_str!("wgsl/matmul.wgsl"), "main"),
            matmul_rows: per_format("matmul rows", include_str!("wgsl/matmul.wgsl"), "rowwise"),
            embed: per_format("embed", include_str!("wgsl/embed.wgsl"), "embed"),
        }
    }
}

/// A matrix `[rows, cols]` on the device, with an optional f32 bias `[rows]`.
#[derive(Debug, Clone)]
pub struct GpuMatrix {
    pub format: Format,
    pub rows: usize,
    pub cols: usize,
    pub buf: wgpu::Buffer,
    pub bias: Option<wgpu::Buffer>,
    /// Further rows in other formats (projections stacked into one whose
    /// files store them differently, e.g. Q4_K_M's Q4_K q and k beside a
    /// Q6_K v), each held in its own and written after the rows before it.
    pub more: Vec<GpuMatrix>,
}

impl GpuMatrix {
    /// Uploads a matrix from the bytes of one of the GGUF layouts, as
    /// stored (Q8_0: 34-byte blocks; Q4_0, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K,
    /// Q4_1, f32, f16), rows back to back.
    pub fn upload(
        gpu: &Gpu,
        format: Format,
        rows: usize,
        cols: usize,
        bytes: &[u8],
        bias: Option<&[f32]>,
    ) -> Result<Self> {
        let bad =
            |why: String| ModelError::InvalidConfig(format!("GPU matrix [{rows}, {cols}]: {why}"));
        let expected = match format.block() {
            Some((values, _, _)) if !cols.is_multiple_of(values) => {
                return Err(bad(format!("columns are not a multiple of {values}")));
            }
            Some((values, stored, _)) => rows * cols / values * stored,
            None if format == Format::F16 && !cols.is_multiple_of(2) => {
                return Err(bad("f16 needs an even column count".into()));
            }
            None if format == Format::F16 => rows * cols * 2,
            None => rows * cols * 4,
        };
        if bytes.len() != expected {
            return Err(bad(format!("{} bytes, expected {expected}", bytes.len())));
        }
        let buf = match format.block() {
            // Blocks padded to whole words: the stored bytes, then zeros
            // (Q8_0 keeps its padding after the scale, where its kernel
            // reads it).
            Some((_, stored, padded)) if padded != stored => {
                let mut out = Vec::with_capacity(bytes.len() / stored * padded);
                for b in bytes.chunks_exact(stored) {
                    if format == Format::Q8_0 {
                        out.extend_from_slice(&b[..2]);
                        out.extend_from_slice(&[0, 0]);
                        out.extend_from_slice(&b[2..]);
                    } else {
                        out.extend_from_slice(b);
                        out.resize(out.len() + padded - stored, 0);
                    }
                }
                gpu.upload("matrix", &out)?
            }
            _ => gpu.upload("matrix", bytes)?,
        };
        let bias = match bias {
            Some(b) if b.len() != rows => {
                return Err(bad(format!("bias of {} values", b.len())));
            }
            Some(b) => Some(gpu.upload("bias", bytemuck::cast_slice(b))?),
            None => None,
        };
        Ok(Self {
            format,
            rows,
            cols,
            buf,
            bias,
            more: Vec::new(),
        })
    }

    /// Rows of this matrix and every block after it.
    pub fn total_rows(&self) -> usize {
        self.rows + self.more.iter().map(|m| m.rows).sum::<usize>()
    }

    /// Bytes on the device, every block's.
    pub fn bytes(&self) -> u64 {
        self.buf.size() + self.more.iter().map(|m| m.buf.size()).sum::<u64>()
    }
}

impl<'g> Batch<'g> {
    /// `y[n, rows] (+)= x[n, cols] W^T (+ bias)`; quantizes `x` into `act_q`
    /// (10 words per 32 values) first when the matrix format wants it.
    /// `accumulate` adds into `y` (residual).
    pub(crate) fn matmul(
        &mut self,
        m: &GpuMatrix,
        x: &wgpu::Buffer,
        n: usize,
        y: &wgpu::Buffer,
        accumulate: bool,
        act_q: &wgpu::Buffer,
    ) -> Result<()> {
        if n.div_ceil(4) > 65535 {
            return Err(ModelError::Gpu(format!(
                "a batch of {n} tokens is too large"
            )));
        }
        // Each block writes its rows of the [n, total] output.
        let stride = m.total_rows();
        let mut off = 0;
        for block in std::iter::once(m).chain(&m.more) {
            self.matmul_block(block, x, n, y, accumulate, act_q, [stride, off]);
            off += block.rows;
        }
        Ok(())
    }

    /// One block of rows: output row `off + r` of `stride` per token.
    #[allow(clippy::too_many_arguments)]
    fn matmul_block(
        &mut self,
        m: &GpuMatrix,
        x: &wgpu::Buffer,
        n: usize,
        y: &wgpu::Buffer,
        accumulate: bool,
        act_q: &wgpu::Buffer,
        [stride, off]: [usize; 2],
    ) {
        let k = &self.gpu.kernels;
        let input = if m.format.quantized() {
            let blocks = n * m.cols / 32;
            self.push(
                &k.quantize,
                &[blocks as u32],
                &[(1, x), (2, act_q)],
                grid1(blocks),
            );
            act_q
        } else {
            x
        };
        let flags = u32::from(accumulate) | (u32::from(m.bias.is_some()) << 1);
        let bias = m.bias.as_ref().unwrap_or(&self.gpu.no_bias);
        let tiles = n.div_ceil(4) as u32;
        // A workgroup shares a row only when the row has work for all 64
        // invocations; software adapters pay dearly for its barriers.
        let shared = (m.cols / 32 >= 64 && !self.gpu.software)
            || self
                .gpu
                .shared_rows_always
                .load(std::sync::atomic::Ordering::Relaxed);
        let (pipeline, [gx, gy, _]) = if shared {
            (&k.matmul[m.format.index()], grid_rows(m.rows))
        } else {
            (&k.matmul_rows[m.format.index()], grid1(m.rows))
        };
        self.push(
            pipeline,
            &[
                n as u32,
                m.rows as u32,
                m.cols as u32,
                flags,
                gx,
                stride as u32,
                off as u32,
            ],
            &[(1, &m.buf), (2, input), (3, bias), (4, y)],
            [gx, gy, tiles],
        );
    }

    /// `y[t, :] = table[ids[t], :]` for `n` ids.
    pub(crate) fn embed(
        &mut self,
        table: &GpuMatrix,
        ids: &wgpu::Buffer,
        n: usize,
        y: &wgpu::Buffer,
    ) {
        let k = &self.gpu.kernels;
        self.push(
            &k.embed[table.format.index()],
            &[n as u32, table.rows as u32, table.cols as u32, 0, 0],
            &[(1, &table.buf), (4, y), (5, ids)],
            grid1(n * table.cols),
        );
    }

    pub(crate) fn rms_norm(
        &mut self,
        x: &wgpu::Buffer,
        w: &wgpu::Buffer,
        n: usize,
        cols: usize,
        eps: f64,
        y: &wgpu::Buffer,
    ) {
        self.rms_norm_into(x, w, [n, cols], eps, y, false);
    }

    /// RMSNorm of `x` (`dims` = `[n, cols]`) into `y`, or added to it.
    pub(crate) fn rms_norm_into(
        &mut self,
        x: &wgpu::Buffer,
        w: &wgpu::Buffer,
        dims: [usize; 2],
        eps: f64,
        y: &wgpu::Buffer,
        add: bool,
    ) {
        let [n, cols] = dims;
        let k = &self.gpu.kernels;
        self.push(
            &k.rms_norm,
            &[
                n as u32,
                cols as u32,
                (eps as f32).to_bits(),
                u32::from(add),
            ],
            &[(1, x), (2, w), (3, y)],
            grid_rows(n),
        );
    }

    /// In place: `y = cap·tanh(y·scale/cap)` with a cap, else `y·scale`.
    pub(crate) fn scale_cap(
        &mut self,
        y: &wgpu::Buffer,
        count: usize,
        scale: f32,
        cap: Option<f32>,
    ) {
        let k = &self.gpu.kernels;
        self.push(
            &k.scale_cap,
            &[count as u32, scale.to_bits(), cap.unwrap_or(0.0).to_bits()],
            &[(2, y)],
            grid1(count),
        );
    }

    /// RMSNorm in place over `heads` heads of `head_dim` values from
    /// column `col0` of each of `n` rows of `stride` (per-head q/k norms);
    /// `dims` = `[n, heads, head_dim, stride, col0]`.
    pub(crate) fn head_norm(
        &mut self,
        x: &wgpu::Buffer,
        w: &wgpu::Buffer,
        dims: [usize; 5],
        eps: f64,
    ) {
        let [n, heads, head_dim, stride, col0] = dims;
        let k = &self.gpu.kernels;
        self.push(
            &k.head_norm,
            &[
                (n * heads) as u32,
                heads as u32,
                head_dim as u32,
                stride as u32,
                col0 as u32,
                (eps as f32).to_bits(),
            ],
            &[(1, x), (2, w)],
            grid_rows(n * heads),
        );
    }

    /// RoPE in place on the first `rot` lanes of the first `heads` heads
    /// of each of `n` rows of `stride` values, reading table row
    /// `rows[t]`; `dims` = `[n, heads, head_dim, stride, rot]`.
    pub(crate) fn rope(
        &mut self,
        x: &wgpu::Buffer,
        rows: &wgpu::Buffer,
        tables: (&wgpu::Buffer, &wgpu::Buffer),
        dims: [usize; 5],
    ) {
        let [n, heads, head_dim, stride, rot] = dims;
        let k = &self.gpu.kernels;
        self.push(
            &k.rope,
            &[
                n as u32,
                heads as u32,
                head_dim as u32,
                stride as u32,
                rot as u32,
            ],
            &[(1, rows), (2, tables.0), (3, tables.1), (4, x)],
            grid1(n * heads * rot / 2),
        );
    }

    /// Parameters: tokens, kv_dim, src_row, stride, k_col, dst_pos,
    /// cache_row, layer_off (see kv_append.wgsl).
    pub(crate) fn kv_append(&mut self, params: [u32; 8], src: &wgpu::Buffer, cache: &wgpu::Buffer) {
        let k = &self.gpu.kernels;
        let count = params[0] as usize * params[1] as usize;
        self.push(&k.kv_append, &params, &[(1, src), (2, cache)], grid1(count));
    }

    /// Parameters as attention.wgsl's `Params`; `heads` x `tokens` workgroups.
    pub(crate) fn attention(
        &mut self,
        params: &[u32; 14],
        qkv: &wgpu::Buffer,
        cache: &wgpu::Buffer,
        scores: &wgpu::Buffer,
        out: &wgpu::Buffer,
    ) {
        let k = &self.gpu.kernels;
        let (tokens, heads) = (params[0], params[2]);
        self.push(
            &k.attention,
            params,
            &[(1, qkv), (2, cache), (3, scores), (4, out)],
            [heads, tokens, 1],
        );
    }

    /// `y[t, i] = act(x[t, i]) * x[t, inter + i]`: the gated MLP's product.
    pub(crate) fn gated(
        &mut self,
        act: Activation,
        x: &wgpu::Buffer,
        n: usize,
        inter: usize,
        y: &wgpu::Buffer,
    ) {
        let k = &self.gpu.kernels;
        let pipeline = match act {
            Activation::Silu => &k.silu_mul,
            Activation::GeluTanh => &k.gelu_mul,
        };
        let count = n * inter;
        self.push(
            pipeline,
            &[count as u32, inter as u32],
            &[(1, x), (2, y)],
            grid1(count),
        );
    }

    /// `y[k, :] = x[rows[k], :]` for `count` rows of `width`.
    pub(crate) fn gather(
        &mut self,
        x: &wgpu::Buffer,
        rows: &wgpu::Buffer,
        count: usize,
        width: usize,
        y: &wgpu::Buffer,
    ) {
        let k = &self.gpu.kernels;
        self.push(
            &k.gather,
            &[(count * width) as u32, width as u32],
            &[(1, x), (2, y), (3, rows)],
            grid1(count * width),
        );
    }
}
