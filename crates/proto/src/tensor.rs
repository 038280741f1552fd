//! Tensor frames: a small header (ids, dtype, shape) and raw little-endian
//! values. f32 is exact; f16/bf16 halve the bytes on the wire.

use half::{bf16, f16};

use crate::message::Reader;
use crate::{ProtoError, limits};

/// Element type on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WireDType {
    F32,
    F16,
    BF16,
}

impl WireDType {
    fn code(self) -> u8 {
        match self {
            Self::F32 => 0,
            Self::F16 => 1,
            Self::BF16 => 2,
        }
    }

    fn from_code(c: u8) -> Result<Self, ProtoError> {
        Ok(match c {
            0 => Self::F32,
            1 => Self::F16,
            2 => Self::BF16,
            other => return Err(ProtoError::UnknownDType(other)),
        })
    }

    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            Self::F32 => 4,
            Self::F16 | Self::BF16 => 2,
        }
    }
}

/// Activations or gradients of one micro-batch or decode step.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorFrame {
    /// Which pipeline stream (request batch, training step) this belongs to.
    pub stream_id: u64,
    /// Sequence or micro-batch id within the stream.
    pub seq_id: u64,
    pub dtype: WireDType,
    pub shape: Vec<u32>,
    /// Little-endian values, `shape.product() * dtype.size()` bytes.
    pub data: Vec<u8>,
}

fn expected_bytes(shape: &[u32], dtype: WireDType) -> Option<usize> {
    shape
        .iter()
        .try_fold(dtype.size(), |acc, &d| acc.checked_mul(d as usize))
}

impl TensorFrame {
    /// Packs f32 values as `dtype`.
    pub fn from_f32(
        stream_id: u64,
        seq_id: u64,
        shape: Vec<u32>,
        values: &[f32],
        dtype: WireDType,
    ) -> Result<Self, ProtoError> {
        let expected = expected_bytes(&shape, WireDType::F32).unwrap_or(usize::MAX) / 4;
        if values.len() != expected {
            return Err(ProtoError::InvalidField {
                what: "tensor values",
                detail: format!("{} values for shape {shape:?}", values.len()),
            });
        }
        let mut data = Vec::with_capacity(values.len() * dtype.size());
        match dtype {
            WireDType::F32 => values
                .iter()
                .for_each(|v| data.extend_from_slice(&v.to_le_bytes())),
            WireDType::F16 => values
                .iter()
                .for_each(|v| data.extend_from_slice(&f16::from_f32(*v).to_le_bytes())),
            WireDType::BF16 => values
                .iter()
                .for_each(|v| data.extend_from_slice(&bf16::from_f32(*v).to_le_bytes())),
        }
        Ok(Self {
            stream_id,
            seq_id,
            dtype,
            shape,
            data,
        })
    }

    /// Unpacks to f32 values.
    pub fn to_f32(&self) -> Vec<f32> {
        match self.dtype {
            WireDType::F32 => self
                .data
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            WireDType::F16 => self
                .data
                .chunks_exact(2)
                .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            WireDType::BF16 => self
                .data
                .chunks_exact(2)
                .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
        }
    }

    fn check(&self) -> Result<(), ProtoError> {
        if self.shape.len() > limits::MAX_DIMS {
            return Err(ProtoError::TooManyDims {
                dims: self.shape.len(),
                max: limits::MAX_DIMS,
            });
        }
        let expected = expected_bytes(&self.shape, self.dtype).unwrap_or(usize::MAX);
        if expected != self.data.len() {
            return Err(ProtoError::TensorSize {
                shape: self.shape.clone(),
                dtype: self.dtype,
                expected,
                actual: self.data.len(),
            });
        }
        Ok(())
    }

    pub(crate) fn encode(&self, out: &mut Vec<u8>) -> Result<(), ProtoError> {
        self.check()?;
        out.extend_from_slice(&self.stream_id.to_le_bytes());
        out.extend_from_slice(&self.seq_id.to_le_bytes());
        out.push(self.dtype.code());
        out.push(self.shape.len() as u8);
        for d in &self.shape {
            out.extend_from_slice(&d.to_le_bytes());
        }
        out.extend_from_slice(&self.data);
        Ok(())
    }

    pub(crate) fn decode(r: &mut Reader<'_>) -> Result<Self, ProtoError> {
        let stream_id = r.u64("tensor header")?;
        let seq_id = r.u64("tensor header")?;
        let dtype = WireDType::from_code(r.u8("tensor header")?)?;
        let ndims = r.u8("tensor header")? as usize;
        if ndims > limits::MAX_DIMS {
            return Err(ProtoError::TooManyDims {
                dims: ndims,
                max: limits::MAX_DIMS,
            });
        }
        let shape = (0..ndims)
            .map(|_| r.u32("tensor shape"))
            .collect::<Result<Vec<_>, _>>()?;
        let frame = Self {
            stream_id,
            seq_id,
            dtype,
            shape,
            data: r.rest().to_vec(),
        };
        frame.check()?;
        Ok(frame)
    }
}
