//! Per-sequence KV cache, kept outside the model: one per sequence per stage.
//!
//! Keys and values are stored token-major (`[tokens, kv_heads, head_dim]`) in
//! plain vectors, so appending a token is a copy of its rows and single-token
//! decode attention reads them in place (see `layers::Attention`).

use candle_core::{Device, Tensor};

use crate::error::Result;

#[derive(Debug, Clone, Default)]
struct LayerKv {
    k: Vec<f32>,
    v: Vec<f32>,
}

/// The KV cache of one sequence for the layers of one stage: in host
/// memory, or on the device of a GPU stage.
#[derive(Debug)]
pub struct KvCache {
    layers: Vec<LayerKv>,
    len: usize,
    /// Floats per token per layer (`kv_heads * head_dim`), known after the first append.
    row: usize,
    #[cfg(feature = "wgpu")]
    gpu: Option<crate::gpu::GpuKv>,
}

impl KvCache {
    /// An empty cache for a stage of `layers` layers.
    pub fn new(layers: usize) -> Self {
        Self {
            layers: vec![LayerKv::default(); layers],
            len: 0,
            row: 0,
            #[cfg(feature = "wgpu")]
            gpu: None,
        }
    }

    /// An empty cache kept on a GPU stage's device.
    #[cfg(feature = "wgpu")]
    pub(crate) fn on_gpu() -> Self {
        Self {
            layers: Vec::new(),
            len: 0,
            row: 0,
            gpu: Some(crate::gpu::GpuKv::default()),
        }
    }

    /// The device part of a GPU stage's cache.
    #[cfg(feature = "wgpu")]
    pub(crate) fn gpu_mut(&mut self) -> Option<&mut crate::gpu::GpuKv> {
        self.gpu.as_mut()
    }

    /// Tokens stored so far (the position of the next token).
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing has been stored yet.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes held by the cache.
    pub fn bytes(&self) -> usize {
        let host: usize = self
            .layers
            .iter()
            .map(|l| (l.k.capacity() + l.v.capacity()) * 4)
            .sum();
        #[cfg(feature = "wgpu")]
        let host = host + self.gpu.as_ref().map_or(0, crate::gpu::GpuKv::bytes);
        host
    }

    /// Drops the stored tokens after `len` (used to roll back a step).
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
        let keep = self.len * self.row;
        for l in &mut self.layers {
            l.k.truncate(keep);
            l.v.truncate(keep);
        }
    }

    /// Appends the keys and values (`[n, kv_heads, head_dim]`) of `layer`.
    /// Call [`KvCache::advance`] once all layers of the stage have appended.
    pub(crate) fn append(&mut self, layer: usize, k: &Tensor, v: &Tensor) -> Result<()> {
        let (_, kvh, hd) = k.dims3()?;
        self.row = kvh * hd;
        let keep = self.len * self.row;
        let l = &mut self.layers[layer];
        l.k.truncate(keep);
        l.v.truncate(keep);
        l.k.extend(k.flatten_all()?.to_vec1::<f32>()?);
        l.v.extend(v.flatten_all()?.to_vec1::<f32>()?);
        Ok(())
    }

    /// Keys and values of `layer` for the first `tokens` tokens, token-major.
    pub(crate) fn slices(&self, layer: usize, tokens: usize) -> (&[f32], &[f32]) {
        let l = &self.layers[layer];
        let n = (tokens * self.row).min(l.k.len()).min(l.v.len());
        (&l.k[..n], &l.v[..n])
    }

    /// The same as tensors `[kv_heads, tokens, head_dim]` (copied).
    pub(crate) fn tensors(
        &self,
        layer: usize,
        tokens: usize,
        kv_heads: usize,
        head_dim: usize,
    ) -> Result<(Tensor, Tensor)> {
        let (k, v) = self.slices(layer, tokens);
        let shape = (k.len() / (kv_heads * head_dim), kv_heads, head_dim);
        let k = Tensor::from_slice(k, shape, &Device::Cpu)?
            .transpose(0, 1)?
            .contiguous()?;
        let v = Tensor::from_slice(v, shape, &Device::Cpu)?
            .transpose(0, 1)?
            .contiguous()?;
        Ok((k, v))
    }

    /// Marks `n` more tokens as stored.
    pub(crate) fn advance(&mut self, n: usize) {
        self.len += n;
    }
}
