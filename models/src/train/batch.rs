//! A micro-batch as the model sees it: `rows` rows of `len` tokens, where a
//! segment id per token says which document it belongs to. Padding is
//! segment 0; several documents may share a row (packing). A token attends
//! to earlier tokens of its own segment only, and positions restart at each
//! segment, so packed documents do not see each other.

use candle_core::{DType, Device, Tensor};

use crate::error::{ModelError, Result};

/// Label of a token that carries no loss (padding, prompt, user turns).
pub const IGNORE: u32 = u32::MAX;

/// Shape and segmentation of one micro-batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchLayout {
    pub rows: usize,
    pub len: usize,
    /// `rows * len` segment ids; 0 is padding.
    pub segments: Vec<u32>,
}

impl BatchLayout {
    /// Checks that the ids fill the shape.
    pub fn new(rows: usize, len: usize, segments: Vec<u32>) -> Result<Self> {
        if rows == 0 || len == 0 || segments.len() != rows * len {
            return Err(ModelError::BadStageInput(format!(
                "{} segment ids for a {rows}×{len} batch",
                segments.len()
            )));
        }
        Ok(Self {
            rows,
            len,
            segments,
        })
    }

    /// Tokens in the batch.
    pub fn tokens(&self) -> usize {
        self.rows * self.len
    }

    /// Position of every token: its index within its segment's run.
    pub fn positions(&self) -> Vec<u32> {
        let mut out = Vec::with_capacity(self.tokens());
        for row in self.segments.chunks(self.len) {
            let mut pos = 0u32;
            for (i, &s) in row.iter().enumerate() {
                if i > 0 && s != row[i - 1] {
                    pos = 0;
                }
                out.push(pos);
                pos += 1;
            }
        }
        out
    }

    /// Additive attention mask `[rows, 1, len, len]`: 0 where query `i` may
    /// see key `j` (`j <= i`, same segment), `-inf` elsewhere. The diagonal
    /// is always visible, so no row is empty (padding attends to itself).
    pub fn mask(&self, dtype: DType, device: &Device) -> Result<Tensor> {
        self.windowed_mask(None, dtype, device)
    }

    /// [`BatchLayout::mask`] of a sliding-window layer: query `i` sees
    /// only the `window` keys up to itself (`i - j < window`).
    pub fn windowed_mask(
        &self,
        window: Option<usize>,
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor> {
        let w = window.unwrap_or(usize::MAX);
        let l = self.len;
        let mut m = Vec::with_capacity(self.rows * l * l);
        for row in self.segments.chunks(l) {
            for i in 0..l {
                for j in 0..l {
                    let visible = j <= i && i - j < w && row[i] == row[j];
                    m.push(if visible { 0f32 } else { f32::NEG_INFINITY });
                }
            }
        }
        Ok(Tensor::from_vec(m, (self.rows, 1, l, l), device)?.to_dtype(dtype)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_restart_per_segment_and_mask_blocks_other_segments() {
        let b = BatchLayout::new(1, 5, vec![1, 1, 2, 2, 0]).unwrap();
        assert_eq!(b.positions(), vec![0, 1, 0, 1, 0]);
        let m = b.mask(DType::F32, &Device::Cpu).unwrap();
        let m: Vec<Vec<f32>> = m.squeeze(0).unwrap().squeeze(0).unwrap().to_vec2().unwrap();
        assert_eq!(m[1][0], 0.0);
        assert_eq!(m[2][1], f32::NEG_INFINITY); // other document
        assert_eq!(m[3][2], 0.0);
        assert_eq!(m[0][1], f32::NEG_INFINITY); // future
        assert_eq!(m[4][4], 0.0); // padding sees itself
        assert!(BatchLayout::new(2, 2, vec![1; 3]).is_err());
    }
}

/// One micro-batch with its inputs and labels.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MicroBatch {
    pub layout: BatchLayout,
    /// `rows * len` token ids (padding included).
    pub tokens: Vec<u32>,
    /// `rows * len` labels: the next token, or [`IGNORE`].
    pub labels: Vec<u32>,
}

impl MicroBatch {
    /// Tokens that carry loss.
    pub fn targets(&self) -> usize {
        self.labels.iter().filter(|&&l| l != IGNORE).count()
    }
}
