//! What the device is: CPU, memory and GPU adapters.

use serde::{Deserialize, Serialize};

/// Memory the planner leaves to the system and other programs: the larger
/// of this and a tenth of the total.
const MIN_HEADROOM: u64 = 512 * 1024 * 1024;

/// A GPU adapter as wgpu reports it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GpuAdapter {
    pub name: String,
    /// Vulkan, Metal, Dx12, Gl, ...
    pub backend: String,
    /// DiscreteGpu, IntegratedGpu, VirtualGpu, Cpu (a software driver), Other.
    pub device_type: String,
    /// Largest single buffer the adapter allows (wgpu reports no total).
    pub max_buffer_bytes: u64,
}

/// The device's hardware.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Hardware {
    pub cpu: String,
    pub arch: String,
    pub physical_cores: usize,
    pub logical_cores: usize,
    pub total_memory: u64,
    pub available_memory: u64,
    pub os: String,
    /// GPU adapters seen by wgpu (empty when built without the `wgpu`
    /// feature or when there are none).
    pub gpus: Vec<GpuAdapter>,
}

impl Hardware {
    /// Reads the hardware now.
    pub fn detect() -> Self {
        use sysinfo::{CpuRefreshKind, MemoryRefreshKind, RefreshKind, System};
        let sys = System::new_with_specifics(
            RefreshKind::nothing()
                .with_cpu(CpuRefreshKind::nothing())
                .with_memory(MemoryRefreshKind::nothing().with_ram()),
        );
        let cpu = sys
            .cpus()
            .first()
            .map(|c| c.brand().trim().to_string())
            .filter(|b| !b.is_empty())
            .unwrap_or_else(|| "unknown CPU".into());
        let logical = std::thread::available_parallelism().map_or(1, |n| n.get());
        Self {
            cpu,
            arch: System::cpu_arch(),
            physical_cores: System::physical_core_count().unwrap_or(logical),
            logical_cores: logical,
            total_memory: sys.total_memory(),
            available_memory: sys.available_memory(),
            os: System::long_os_version().unwrap_or_else(|| std::env::consts::OS.into()),
            gpus: gpu_adapters(),
        }
    }

    /// Bytes the planner may use: available memory minus headroom.
    pub fn memory_budget(&self) -> u64 {
        let headroom = MIN_HEADROOM.max(self.total_memory / 10);
        self.available_memory.saturating_sub(headroom)
    }

    /// What identifies this device's speed for the profile cache: CPU, core
    /// counts, memory size (in GiB) and GPUs. Not free memory: it changes.
    pub fn cache_identity(&self) -> String {
        let gpus: Vec<&str> = self.gpus.iter().map(|g| g.name.as_str()).collect();
        format!(
            "{}|{}|{}|{}|{}GiB|{}",
            self.cpu,
            self.arch,
            self.physical_cores,
            self.logical_cores,
            self.total_memory >> 30,
            gpus.join(",")
        )
    }
}

/// Adapters of wgpu's primary backends (Vulkan, Metal, DX12), enumerated
/// once per process. GL is left out: its compute support is partial and
/// probing it without a display only produces driver noise.
#[cfg(feature = "wgpu")]
fn gpu_adapters() -> Vec<GpuAdapter> {
    static ADAPTERS: std::sync::OnceLock<Vec<GpuAdapter>> = std::sync::OnceLock::new();
    ADAPTERS
        .get_or_init(|| {
            let instance = wgpu::Instance::new(&wgpu::InstanceDescriptor {
                backends: wgpu::Backends::PRIMARY,
                ..wgpu::InstanceDescriptor::from_env_or_default()
            });
            instance
                .enumerate_adapters(wgpu::Backends::PRIMARY)
                .into_iter()
                .map(|a| {
                    let info = a.get_info();
                    GpuAdapter {
                        name: info.name,
                        backend: format!("{:?}", info.backend),
                        device_type: format!("{:?}", info.device_type),
                        max_buffer_bytes: a.limits().max_buffer_size,
                    }
                })
                .collect()
        })
        .clone()
}

#[cfg(not(feature = "wgpu"))]
fn gpu_adapters() -> Vec<GpuAdapter> {
    Vec::new()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detects_this_machine() {
        let hw = Hardware::detect();
        assert!(hw.logical_cores >= 1);
        assert!(hw.total_memory > 0);
        assert!(hw.available_memory <= hw.total_memory);
        assert!(hw.memory_budget() < hw.available_memory.max(1));
        assert!(!hw.cache_identity().is_empty());
    }
}
