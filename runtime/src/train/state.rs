//! Trainable state as safetensors bytes (f32 tensors plus string metadata):
//! what a stage sends for a checkpoint and what a restored stage starts from.

use std::collections::HashMap;

use candle_core::{Device, Tensor};
use safetensors::tensor::Dtype;

use super::TrainError;

fn err(e: impl std::fmt::Display) -> TrainError {
    TrainError::Checkpoint(e.to_string())
}

/// Serialises named tensors (as f32) with `meta`.
pub fn encode(
    tensors: &[(String, Tensor)],
    meta: HashMap<String, String>,
) -> Result<Vec<u8>, TrainError> {
    Ok(hearth_models::train::export::safetensors_bytes(
        tensors,
        Some(meta),
    )?)
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
