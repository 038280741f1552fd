//! Trainable state as safetensors bytes (f32 tensors plus string metadata):
//! what a stage sends for a checkpoint and what a restored stage starts from.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use safetensors::tensor::{Dtype, TensorView};

use super::TrainError;

fn err(e: impl std::fmt::Display) -> TrainError {
    TrainError::Checkpoint(e.to_string())
}

/// Serialises named tensors (as f32) with `meta`.
pub fn encode(
    tensors: &[(String, Tensor)],
    meta: HashMap<String, String>,
) -> Result<Vec<u8>, TrainError> {
    let mut raw: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::with_capacity(tensors.len());
    for (name, t) in tensors {
        let v = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        raw.push((name.clone(), t.dims().to_vec(), bytes));
    }
    let views = raw
        .iter()
        .map(|(n, shape, b)| {
            Ok((
                n.as_str(),
                TensorView::new(Dtype::F32, shape.clone(), b).map_err(err)?,
            ))
        })
        .collect::<Result<Vec<_>, TrainError>>()?;
    safetensors::serialize(views, Some(meta)).map_err(err)
}

/// Named tensors and string metadata of a state file.
pub type Decoded = (HashMap<String, Tensor>, HashMap<String, String>);

/// Parses bytes written by [`encode`] (or any f32 safetensors).
pub fn decode(bytes: &[u8]) -> Result<Decoded, TrainError> {
    let st = safetensors::SafeTensors::deserialize(bytes).map_err(err)?;
    let (_, header) = safetensors::SafeTensors::read_metadata(bytes).map_err(err)?;
    let meta = header.metadata().clone().unwrap_or_default();
    let mut out = HashMap::new();
    for (name, view) in st.tensors() {
        if view.dtype() != Dtype::F32 {
            return Err(err(format!("{name} is {:?}, expected F32", view.dtype())));
        }
        let v: Vec<f32> = view
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        out.insert(name, Tensor::from_vec(v, view.shape(), &Device::Cpu)?);
    }
    Ok((out, meta))
}
