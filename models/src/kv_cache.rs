//! Per-sequence KV cache, kept outside the model: one per sequence per stage.

use candle_core::{DType, Device, Tensor};

use crate::error::Result;

/// Keys and values of one layer, `[kv_heads, capacity, head_dim]`, filled up to `len`.
#[derive(Debug, Clone, Default)]
struct LayerKv {
    k: Option<Tensor>,
    v: Option<Tensor>,
}

/// The KV cache of one sequence for the layers of one stage.
///
/// Storage grows by doubling and is written in place, so appending one token
/// costs O(1) copies instead of re-concatenating the whole history.
#[derive(Debug, Clone)]
pub struct KvCache {
    layers: Vec<LayerKv>,
    len: usize,
    capacity: usize,
}

impl KvCache {
    /// An empty cache for a stage of `layers` layers.
    pub fn new(layers: usize) -> Self {
        Self {
            layers: vec![LayerKv::default(); layers],
            len: 0,
            capacity: 0,
        }
    }

    /// Tokens stored so far (the position of the next token).
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing has been stored yet.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes held by the cache buffers.
    pub fn bytes(&self) -> usize {
        self.layers
            .iter()
            .flat_map(|l| [&l.k, &l.v])
            .flatten()
            .map(|t| t.elem_count() * t.dtype().size_in_bytes())
            .sum()
    }

    /// Drops the stored tokens after `len` (used to roll back a step).
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    /// Appends `k`, `v` (`[kv_heads, n, head_dim]`) for `layer` and returns the
    /// full keys and values so far. Call [`KvCache::advance`] once all layers
    /// of the stage have appended.
    pub(crate) fn append(
        &mut self,
        layer: usize,
        k: &Tensor,
        v: &Tensor,
    ) -> Result<(Tensor, Tensor)> {
        let (kvh, n, hd) = k.dims3()?;
        let need = self.len + n;
        if need > self.capacity {
            let cap = need.max(self.capacity * 2).max(64);
            for l in &mut self.layers {
                for slot in [&mut l.k, &mut l.v] {
                    if let Some(old) = slot.take() {
                        let (h, _, d) = old.dims3()?;
                        let grown = Tensor::zeros((h, cap, d), old.dtype(), old.device())?;
                        grown.slice_set(&old.narrow(1, 0, self.len)?.contiguous()?, 1, 0)?;
                        *slot = Some(grown);
                    }
                }
            }
            self.capacity = cap;
        }
        let l = &mut self.layers[layer];
        for (slot, src) in [(&mut l.k, k), (&mut l.v, v)] {
            if slot.is_none() {
                *slot = Some(Tensor::zeros(
                    (kvh, self.capacity, hd),
                    DType::F32,
                    &Device::Cpu,
                )?);
            }
            if let Some(buf) = slot.as_ref() {
                buf.slice_set(&src.contiguous()?, 1, self.len)?;
            }
        }
        let view = |t: &Option<Tensor>| -> Result<Tensor> {
            match t {
                Some(t) => Ok(t.narrow(1, 0, need)?),
                None => Err(crate::error::ModelError::BadStageInput(
                    "kv cache buffer missing".into(),
                )),
            }
        };
        Ok((view(&l.k)?, view(&l.v)?))
    }

    /// Marks `n` more tokens as stored.
    pub(crate) fn advance(&mut self, n: usize) {
        self.len += n;
    }
}
