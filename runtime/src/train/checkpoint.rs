//! A job's checkpoint: the union of every stage's trainable tensors and
//! optimizer moments under their parameter names, and the step, in the
//! job's `checkpoint/` folder. It is cut per stage when restored, so a
//! resumed or re-planned job restores it onto any split.

use std::collections::HashMap;
use std::path::Path;

use candle_core::Tensor;
use hearth_models::StageSpec;
use hearth_models::durable::write as write_atomic;
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
        self.encode(|n| belongs(n, spec, tied), None)
    }

    /// The tensors whose names pass `keep`, as a state file (by name),
    /// naming `job` in its header when given.
    fn encode(
        &self,
        keep: impl Fn(&str) -> bool,
        job: Option<&Value>,
    ) -> Result<Vec<u8>, TrainError> {
        let mut mine: Vec<(String, Tensor)> = self
            .tensors
            .iter()
            .filter(|(n, _)| keep(n))
            .map(|(n, t)| (n.clone(), t.clone()))
            .collect();
        mine.sort_by(|a, b| a.0.cmp(&b.0));
        let mut meta = HashMap::from([("optimizer_steps".to_string(), self.step.to_string())]);
        if let Some(job) = job {
            meta.insert(JOB_KEY.to_string(), job.to_string());
        }
        state::encode(&mine, meta)
    }

    /// Saves the checkpoint as one file, durably: the state carries the
    /// step and the job it belongs to in its own header, so a crash at any
    /// moment leaves the previous checkpoint or this one whole. `job.json`
    /// beside it is written after, for people (a resume never reads its
    /// step).
    pub(crate) fn save(
        &self,
        dir: &Path,
        spec: &JobSpec,
        total_steps: u64,
    ) -> Result<(), TrainError> {
        let fingerprint = spec.fingerprint();
        write_atomic(
            &dir.join(STATE_FILE),
            &self.encode(|_| true, Some(&fingerprint))?,
        )?;
        let job = json!({
            "format": 1,
            "step": self.step,
            "total_steps": total_steps,
            "examples_seen": self.step * spec.batch_size as u64,
            "seed": spec.seed,
            "spec": fingerprint,
        });
        write_atomic(
            &dir.join("job.json"),
            &serde_json::to_vec_pretty(&job).map_err(|e| TrainError::Checkpoint(e.to_string()))?,
        )?;
        Ok(())
    }

    /// The checkpoint in `dir`, if it was written by the same job. The step
    /// and the job come from the state file's own header; a state without
    /// them (or naming another job) is refused.
    pub(crate) fn load(dir: &Path, spec: &JobSpec) -> Result<Option<Self>, TrainError> {
        let path = dir.join(STATE_FILE);
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(TrainError::Checkpoint(format!("{}: {e}", path.display()))),
        };
        let (tensors, meta) = state::decode(&bytes)?;
        let job: Value = meta
            .get(JOB_KEY)
            .and_then(|j| serde_json::from_str(j).ok())
            .ok_or_else(|| {
                TrainError::Checkpoint(format!(
                    "{} does not say which job it belongs to; use another output_dir",
                    path.display()
                ))
            })?;
        if job != spec.fingerprint() {
            return Err(TrainError::Checkpoint(format!(
                "{} holds a checkpoint of another job (different model, data cut or method); use another output_dir",
                dir.display()
            )));
        }
        let step = meta
            .get("optimizer_steps")
            .and_then(|s| s.parse::<u64>().ok())
            .ok_or_else(|| TrainError::Checkpoint(format!("{} records no step", path.display())))?;
        Ok(Some(Self { step, tensors }))
    }
}

/// The checkpoint's one file.
const STATE_FILE: &str = "state.safetensors";
/// The state header's entry naming the job (its spec fingerprint).
const JOB_KEY: &str = "hearth.job";

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
