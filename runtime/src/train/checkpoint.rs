//! A job's checkpoint: the union of every stage's trainable tensors and
//! optimizer moments under their parameter names, and the step, in the
//! job's `checkpoint/` folder. It is cut per stage when restored, so a
//! resumed or re-planned job restores it onto any split.

use std::collections::HashMap;
use std::path::Path;

use candle_core::Tensor;
use hearth_models::StageSpec;
use hearth_models::train::export::write_atomic;
use serde_json::{Value, json};

use super::TrainError;
use super::spec::JobSpec;
use super::state;

/// Parameter-name → tensor, plus the optimizer's step count.
#[derive(Clone, Default)]
pub(crate) struct Checkpoint {
    pub(crate) step: u64,
    pub(crate) tensors: HashMap<String, Tensor>,
}

impl Checkpoint {
    pub(crate) fn from_states(states: &[Vec<u8>], step: u64) -> Result<Self, TrainError> {
        let mut tensors = HashMap::new();
        for s in states {
            let (t, _) = state::decode(s)?;
            tensors.extend(t);
        }
        Ok(Self { step, tensors })
    }

    /// The state file for a stage of `spec` (its own tensors only).
    pub(crate) fn for_stage(&self, spec: StageSpec, tied: bool) -> Result<Vec<u8>, TrainError> {
        self.encode(|n| belongs(n, spec, tied))
    }

    /// The tensors whose names pass `keep`, as a state file (by name).
    fn encode(&self, keep: impl Fn(&str) -> bool) -> Result<Vec<u8>, TrainError> {
        let mut mine: Vec<(String, Tensor)> = self
            .tensors
            .iter()
            .filter(|(n, _)| keep(n))
            .map(|(n, t)| (n.clone(), t.clone()))
            .collect();
        mine.sort_by(|a, b| a.0.cmp(&b.0));
        let meta = HashMap::from([("optimizer_steps".to_string(), self.step.to_string())]);
        state::encode(&mine, meta)
    }

    pub(crate) fn save(
        &self,
        dir: &Path,
        spec: &JobSpec,
        total_steps: u64,
    ) -> Result<(), TrainError> {
        let io = |e: std::io::Error| TrainError::Checkpoint(format!("{}: {e}", dir.display()));
        std::fs::create_dir_all(dir).map_err(io)?;
        write_atomic(&dir.join("state.safetensors"), &self.encode(|_| true)?)?;
        let job = json!({
            "format": 1,
            "step": self.step,
            "total_steps": total_steps,
            "examples_seen": self.step * spec.batch_size as u64,
            "seed": spec.seed,
            "spec": spec.fingerprint(),
        });
        write_atomic(
            &dir.join("job.json"),
            &serde_json::to_vec_pretty(&job).map_err(|e| TrainError::Checkpoint(e.to_string()))?,
        )?;
        Ok(())
    }

    /// The checkpoint in `dir`, if it was written by the same job.
    pub(crate) fn load(dir: &Path, spec: &JobSpec) -> Result<Option<Self>, TrainError> {
        let Ok(text) = std::fs::read(dir.join("job.json")) else {
            return Ok(None);
        };
        let job: Value = serde_json::from_slice(&text)
            .map_err(|e| TrainError::Checkpoint(format!("job.json: {e}")))?;
        if job["spec"] != spec.fingerprint() {
            return Err(TrainError::Checkpoint(format!(
                "{} holds a checkpoint of another job (different model, data cut or method); use another output_dir",
                dir.display()
            )));
        }
        let step = job["step"]
            .as_u64()
            .ok_or_else(|| TrainError::Checkpoint("job.json has no step".into()))?;
        let bytes = std::fs::read(dir.join("state.safetensors"))
            .map_err(|e| TrainError::Checkpoint(format!("state.safetensors: {e}")))?;
        let (tensors, _) = state::decode(&bytes)?;
        Ok(Some(Self { step, tensors }))
    }
}

/// Whether the state entry `name` belongs to a stage of `spec`.
fn belongs(name: &str, spec: StageSpec, tied_copy: bool) -> bool {
    let base = name.strip_prefix("optimizer.").unwrap_or(name);
    if let Some(rest) = base.split("layers.").nth(1)
        && let Some(i) = rest.split('.').next().and_then(|i| i.parse::<usize>().ok())
    {
        return (spec.start..spec.end).contains(&i);
    }
    if base.contains("embed_tokens") {
        return spec.embed || (spec.head && tied_copy);
    }
    spec.head
}
