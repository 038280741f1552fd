//! The wgpu backend: a stage's layers on any GPU wgpu reaches (Vulkan,
//! Metal, DX12), with WGSL compute kernels for everything a decoder stage
//! does. The CPU stage stays the reference: quantized matrices run the same
//! arithmetic as the CPU kernels (activations quantized to 8-bit blocks
//! exactly as llama.cpp and candle do, integer block dot products), so the
//! two agree to float summation order.
//!
//! [`Gpu`] is one opened device with its compiled kernels; [`GpuStage`]
//! holds a layer range's weights on it and runs ragged batches whose KV
//! caches stay on the device.

mod kernels;
mod stage;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use wgpu::util::DeviceExt;

pub use stage::{GpuKv, GpuStage};

use crate::error::{ModelError, Result};
use kernels::Kernels;

/// A GPU adapter as wgpu reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdapterSummary {
    pub name: String,
    pub backend: String,
    pub device_type: String,
    /// A CPU implementation (llvmpipe, WARP, SwiftShader): correct but slow.
    pub software: bool,
}

fn instance() -> wgpu::Instance {
    wgpu::Instance::new(&wgpu::InstanceDescriptor {
        backends: wgpu::Backends::PRIMARY,
        ..wgpu::InstanceDescriptor::from_env_or_default()
    })
}

fn summary(info: &wgpu::AdapterInfo) -> AdapterSummary {
    AdapterSummary {
        name: info.name.clone(),
        backend: format!("{:?}", info.backend),
        device_type: format!("{:?}", info.device_type),
        software: info.device_type == wgpu::DeviceType::Cpu,
    }
}

/// How strongly an adapter is preferred (higher first).
fn rank(t: wgpu::DeviceType) -> u8 {
    match t {
        wgpu::DeviceType::DiscreteGpu => 4,
        wgpu::DeviceType::IntegratedGpu => 3,
        wgpu::DeviceType::VirtualGpu => 2,
        wgpu::DeviceType::Other => 1,
        wgpu::DeviceType::Cpu => 0,
    }
}

fn gpu_err(e: impl std::fmt::Display) -> ModelError {
    ModelError::Gpu(e.to_string())
}

/// One opened wgpu device with Hearth's kernels compiled for it.
pub struct Gpu {
    device: wgpu::Device,
    queue: wgpu::Queue,
    info: wgpu::AdapterInfo,
    limits: wgpu::Limits,
    /// A CPU implementation (llvmpipe): kernels avoid workgroup barriers.
    software: bool,
    /// Tests set this to run the shared-row matmul on any row length.
    shared_rows_always: AtomicBool,
    /// Bound where a matrix has no bias (a binding cannot be left empty).
    no_bias: wgpu::Buffer,
    kernels: Kernels,
    /// Set by the device's error handler: a validation error or lost device.
    failed: Arc<AtomicBool>,
    last_error: Arc<Mutex<Option<String>>>,
}

impl std::fmt::Debug for Gpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gpu")
            .field("adapter", &self.info.name)
            .finish()
    }
}

impl Gpu {
    /// Every adapter of wgpu's primary backends, best first.
    pub fn adapters() -> Vec<AdapterSummary> {
        let mut all = instance().enumerate_adapters(wgpu::Backends::PRIMARY);
        all.sort_by_key(|a| std::cmp::Reverse(rank(a.get_info().device_type)));
        all.iter().map(|a| summary(&a.get_info())).collect()
    }

    /// Opens the best adapter, or the first whose name contains `name`
    /// (case-insensitive). `allow_software` admits CPU implementations
    /// when nothing else is there (or when `name` picks one).
    pub fn open(name: Option<&str>, allow_software: bool) -> Result<Arc<Self>> {
        let mut all = instance().enumerate_adapters(wgpu::Backends::PRIMARY);
        all.sort_by_key(|a| std::cmp::Reverse(rank(a.get_info().device_type)));
        let adapter = all
            .into_iter()
            .find(|a| {
                let info = a.get_info();
                match name {
                    Some(n) => info.name.to_lowercase().contains(&n.to_lowercase()),
                    None => allow_software || info.device_type != wgpu::DeviceType::Cpu,
                }
            })
            .ok_or_else(|| {
                ModelError::Gpu(match name {
                    Some(n) => format!("no GPU adapter named like {n:?}"),
                    None if allow_software => "no GPU adapter (wgpu found none)".into(),
                    None => "no hardware GPU adapter (only software ones, or none)".into(),
                })
            })?;
        let info = adapter.get_info();
        let limits = adapter.limits();
        let (device, queue) = pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
            label: Some("hearth"),
            required_features: wgpu::Features::empty(),
            required_limits: limits.clone(),
            memory_hints: wgpu::MemoryHints::Performance,
            trace: wgpu::Trace::Off,
        }))
        .map_err(gpu_err)?;
        let failed = Arc::new(AtomicBool::new(false));
        let last_error = Arc::new(Mutex::new(None));
        {
            let (failed, last) = (failed.clone(), last_error.clone());
            device.on_uncaptured_error(Box::new(move |e| {
                tracing::error!(error = %e, "wgpu error");
                failed.store(true, Ordering::SeqCst);
                if let Ok(mut l) = last.lock() {
                    *l = Some(e.to_string());
                }
            }));
        }
        device.push_error_scope(wgpu::ErrorFilter::Validation);
        let kernels = Kernels::new(&device);
        if let Some(e) = pollster::block_on(device.pop_error_scope()) {
            return Err(ModelError::Gpu(format!("compiling kernels: {e}")));
        }
        let no_bias = device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("no bias"),
            size: 4,
            usage: wgpu::BufferUsages::STORAGE,
            mapped_at_creation: false,
        });
        tracing::info!(adapter = %info.name, backend = ?info.backend, "wgpu device opened");
        Ok(Arc::new(Self {
            device,
            queue,
            software: info.device_type == wgpu::DeviceType::Cpu,
            shared_rows_always: AtomicBool::new(false),
            no_bias,
            info,
            limits,
            kernels,
            failed,
            last_error,
        }))
    }

    /// The adapter this device runs on.
    pub fn adapter(&self) -> AdapterSummary {
        summary(&self.info)
    }

    /// Largest buffer the device allows.
    pub fn max_buffer_bytes(&self) -> u64 {
        self.limits
            .max_buffer_size
            .min(u64::from(self.limits.max_storage_buffer_binding_size))
    }

    fn check(&self) -> Result<()> {
        if self.failed.swap(false, Ordering::SeqCst) {
            let e = self
                .last_error
                .lock()
                .ok()
                .and_then(|mut l| l.take())
                .unwrap_or_else(|| "unknown wgpu error".into());
            return Err(ModelError::Gpu(e));
        }
        Ok(())
    }

    /// A storage buffer holding `bytes` (at least 4 bytes: empty bindings are invalid).
    fn upload(&self, label: &str, bytes: &[u8]) -> Result<wgpu::Buffer> {
        if bytes.len() as u64 > self.max_buffer_bytes() {
            return Err(ModelError::Gpu(format!(
                "{label}: {} bytes exceed the device's largest buffer ({})",
                bytes.len(),
                self.max_buffer_bytes()
            )));
        }
        let pad;
        let contents = if bytes.len() < 4 {
            pad = [0u8; 4];
            &pad[..]
        } else {
            bytes
        };
        Ok(self
            .device
            .create_buffer_init(&wgpu::util::BufferInitDescriptor {
                label: Some(label),
                contents,
                usage: wgpu::BufferUsages::STORAGE
                    | wgpu::BufferUsages::COPY_SRC
                    | wgpu::BufferUsages::COPY_DST,
            }))
    }

    /// An uninitialised storage buffer of `floats` f32 values.
    fn scratch(&self, label: &str, floats: usize) -> Result<wgpu::Buffer> {
        let size = (floats.max(1) * 4) as u64;
        if size > self.max_buffer_bytes() {
            return Err(ModelError::Gpu(format!(
                "{label}: {size} bytes exceed the device's largest buffer ({})",
                self.max_buffer_bytes()
            )));
        }
        Ok(self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some(label),
            size,
            usage: wgpu::BufferUsages::STORAGE
                | wgpu::BufferUsages::COPY_SRC
                | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        }))
    }

    /// Runs `encoder`'s work, then reads `floats` f32 values of `src` back.
    fn finish_and_read(
        &self,
        mut encoder: wgpu::CommandEncoder,
        src: &wgpu::Buffer,
        floats: usize,
    ) -> Result<Vec<f32>> {
        let size = (floats * 4) as u64;
        let staging = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("readback"),
            size: size.max(4),
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        if size > 0 {
            encoder.copy_buffer_to_buffer(src, 0, &staging, 0, size);
        }
        self.queue.submit([encoder.finish()]);
        let slice = staging.slice(..);
        let (tx, rx) = std::sync::mpsc::channel();
        slice.map_async(wgpu::MapMode::Read, move |r| {
            let _ = tx.send(r);
        });
        // A slow device (a software one, a long prefill) may take longer than
        // one wait allows (wgpu gives up after 60 s): keep waiting, up to
        // MAX_WAIT, while the work is still running.
        let start = std::time::Instant::now();
        let mapped = loop {
            match self.device.poll(wgpu::PollType::Wait) {
                Ok(_) => {}
                Err(wgpu::PollError::Timeout) if start.elapsed() < MAX_WAIT => {
                    tracing::warn!(
                        waited_s = start.elapsed().as_secs(),
                        "GPU work still running"
                    );
                }
                Err(e) => return Err(gpu_err(e)),
            }
            match rx.try_recv() {
                Ok(r) => break r,
                Err(std::sync::mpsc::TryRecvError::Empty) if start.elapsed() < MAX_WAIT => {}
                Err(e) => return Err(gpu_err(format!("GPU work did not finish: {e}"))),
            }
        };
        mapped.map_err(gpu_err)?;
        self.check()?;
        let out = {
            let data = slice.get_mapped_range();
            bytemuck::cast_slice::<u8, f32>(&data[..size as usize]).to_vec()
        };
        staging.unmap();
        Ok(out)
    }
}

/// Longest a stage's GPU work may run before it counts as failed.
const MAX_WAIT: std::time::Duration = std::time::Duration::from_secs(600);

/// A grid of 64-wide workgroups covering `count` invocations (wider than
/// 65535 workgroups spills into y; kernels flatten with `flat`).
fn grid1(count: usize) -> [u32; 3] {
    let wgs = count.div_ceil(64).max(1) as u32;
    let x = wgs.min(65535);
    [x, wgs.div_ceil(x), 1]
}

/// Workgroups for `rows` independent rows (x, spilling into y).
fn grid_rows(rows: usize) -> [u32; 3] {
    let rows = rows.max(1) as u32;
    let x = rows.min(65535);
    [x, rows.div_ceil(x), 1]
}

/// Dispatches recorded for one submission: each kernel's parameters go into
/// one uniform buffer (a slot each), bound at their offsets.
struct Batch<'g> {
    gpu: &'g Gpu,
    params: Vec<u8>,
    ops: Vec<Op<'g>>,
}

struct Op<'g> {
    pipeline: &'g wgpu::ComputePipeline,
    offset: u64,
    buffers: Vec<(u32, wgpu::Buffer)>,
    grid: [u32; 3],
}

/// Bytes of one parameter slot (the largest uniform offset alignment wgpu allows).
const SLOT: usize = 256;

impl<'g> Batch<'g> {
    fn new(gpu: &'g Gpu) -> Self {
        Self {
            gpu,
            params: Vec::new(),
            ops: Vec::new(),
        }
    }

    /// Records one dispatch: `params` as 32-bit words (f32 values as bits)
    /// and `(binding, buffer)` pairs.
    fn push(
        &mut self,
        pipeline: &'g wgpu::ComputePipeline,
        params: &[u32],
        buffers: &[(u32, &wgpu::Buffer)],
        grid: [u32; 3],
    ) {
        let align = (self.gpu.limits.min_uniform_buffer_offset_alignment as usize).max(SLOT);
        let offset = self.params.len();
        let mut slot = vec![0u8; align];
        for (i, w) in params.iter().enumerate().take(align / 4) {
            slot[i * 4..i * 4 + 4].copy_from_slice(&w.to_le_bytes());
        }
        self.params.extend_from_slice(&slot);
        self.ops.push(Op {
            pipeline,
            offset: offset as u64,
            buffers: buffers
                .iter()
                .map(|(b, buf)| (*b, (*buf).clone()))
                .collect(),
            grid,
        });
    }

    /// Encodes every dispatch into one compute pass of `encoder`.
    fn encode(self, encoder: &mut wgpu::CommandEncoder) {
        if self.ops.is_empty() {
            return;
        }
        let params = self
            .gpu
            .device
            .create_buffer_init(&wgpu::util::BufferInitDescriptor {
                label: Some("params"),
                contents: &self.params,
                usage: wgpu::BufferUsages::UNIFORM,
            });
        let groups: Vec<wgpu::BindGroup> = self
            .ops
            .iter()
            .map(|op| {
                let mut entries = vec![wgpu::BindGroupEntry {
                    binding: 0,
                    resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                        buffer: &params,
                        offset: op.offset,
                        size: wgpu::BufferSize::new(SLOT as u64),
                    }),
                }];
                entries.extend(op.buffers.iter().map(|(b, buf)| wgpu::BindGroupEntry {
                    binding: *b,
                    resource: buf.as_entire_binding(),
                }));
                self.gpu
                    .device
                    .create_bind_group(&wgpu::BindGroupDescriptor {
                        label: None,
                        layout: &op.pipeline.get_bind_group_layout(0),
                        entries: &entries,
                    })
            })
            .collect();
        let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
            label: Some("stage"),
            timestamp_writes: None,
        });
        for (op, group) in self.ops.iter().zip(&groups) {
            pass.set_pipeline(op.pipeline);
            pass.set_bind_group(0, group, &[]);
            pass.dispatch_workgroups(op.grid[0], op.grid[1], op.grid[2]);
        }
    }
}

#[cfg(test)]
mod tests;
