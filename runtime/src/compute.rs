//! What a node runs its inference stages on (`--backend cpu|wgpu|auto`):
//! the CPU, or one GPU through wgpu. The profiler measures stages on the
//! same compute, so the planner weighs a GPU node by its real times.
//! Training stages run on the CPU (the differentiable path).

use std::str::FromStr;

use hearth_models::{ModelError, Precision, Stage, StageSpec, WeightFile};
use serde::{Deserialize, Serialize};

/// The `--backend` choice.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// The CPU (the reference path).
    Cpu,
    /// A GPU through wgpu; software adapters (llvmpipe) are accepted.
    Wgpu,
    /// A hardware GPU when wgpu finds one, else the CPU.
    #[default]
    Auto,
}

impl FromStr for Backend {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "cpu" => Ok(Self::Cpu),
            "wgpu" => Ok(Self::Wgpu),
            "auto" => Ok(Self::Auto),
            other => Err(format!("unknown backend {other:?} (cpu, wgpu or auto)")),
        }
    }
}

/// A resolved compute device; cheap to clone.
#[derive(Debug, Clone, Default)]
pub enum Compute {
    #[default]
    Cpu,
    #[cfg(feature = "wgpu")]
    Gpu(std::sync::Arc<hearth_models::gpu::Gpu>),
}

impl Compute {
    /// Opens what `backend` asks for. `Wgpu` fails without an adapter
    /// (built without the `wgpu` feature too); `Auto` falls back to the CPU.
    /// `adapter` picks a GPU by name (case-insensitive substring, as `hearth
    /// profile` lists them) for `Wgpu` or `Auto`, and then a missing one is
    /// an error, not a fallback; with `Cpu` it is an error.
    pub fn resolve(backend: Backend, adapter: Option<&str>) -> Result<Self, ModelError> {
        match (backend, adapter) {
            (Backend::Cpu, None) => Ok(Self::Cpu),
            (Backend::Cpu, Some(_)) => Err(ModelError::Gpu(
                "a GPU adapter was named but the backend is the CPU".into(),
            )),
            #[cfg(feature = "wgpu")]
            (Backend::Wgpu, _) | (Backend::Auto, Some(_)) => {
                Ok(Self::Gpu(hearth_models::gpu::Gpu::open(adapter, true)?))
            }
            #[cfg(feature = "wgpu")]
            (Backend::Auto, None) => match hearth_models::gpu::Gpu::open(None, false) {
                Ok(gpu) => Ok(Self::Gpu(gpu)),
                Err(e) => {
                    tracing::info!(reason = %e, "running stages on the CPU");
                    Ok(Self::Cpu)
                }
            },
            #[cfg(not(feature = "wgpu"))]
            (Backend::Wgpu, _) | (Backend::Auto, Some(_)) => {
                Err(ModelError::Gpu("built without the wgpu feature".into()))
            }
            #[cfg(not(feature = "wgpu"))]
            (Backend::Auto, None) => Ok(Self::Cpu),
        }
    }

    /// `cpu`, or `wgpu:` and the adapter's name (profiles and the cache key).
    pub fn name(&self) -> String {
        match self {
            Self::Cpu => "cpu".into(),
            #[cfg(feature = "wgpu")]
            Self::Gpu(g) => format!("wgpu:{}", g.adapter().name),
        }
    }

    /// Loads an inference stage on this compute.
    pub fn load_stage(
        &self,
        weights: &WeightFile,
        spec: StageSpec,
        precision: Precision,
    ) -> Result<Stage, ModelError> {
        match self {
            Self::Cpu => Stage::load(weights, spec, precision),
            #[cfg(feature = "wgpu")]
            Self::Gpu(g) => Stage::load_gpu(g.clone(), weights, spec, precision),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backend_parses_and_cpu_resolves() {
        assert_eq!("cpu".parse::<Backend>(), Ok(Backend::Cpu));
        assert_eq!("wgpu".parse::<Backend>(), Ok(Backend::Wgpu));
        assert_eq!("auto".parse::<Backend>(), Ok(Backend::Auto));
        assert!("cuda".parse::<Backend>().is_err());
        assert_eq!(
            Compute::resolve(Backend::Cpu, None).map(|c| c.name()).ok(),
            Some("cpu".into())
        );
        // Auto never fails: a hardware GPU or the CPU.
        assert!(Compute::resolve(Backend::Auto, None).is_ok());
        // A named adapter is never silently replaced by the CPU.
        assert!(Compute::resolve(Backend::Cpu, Some("llvmpipe")).is_err());
        assert!(Compute::resolve(Backend::Auto, Some("no such adapter")).is_err());
        assert!(Compute::resolve(Backend::Wgpu, Some("no such adapter")).is_err());
    }
}
