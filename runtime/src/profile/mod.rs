//! The device profiler: what this device is (CPU, memory, GPU adapters),
//! how fast it runs the model (measured per-layer times of the real model,
//! cached on disk by hardware and model), and how fast its links to the
//! other members are (measured over QUIC, refreshed periodically). Profiles
//! are shared between members so every node can plan for the whole cluster.

mod book;
mod cache;
mod hardware;
mod links;
pub mod live;
mod measure;
mod model_cost;
pub mod offer;
mod planning;
mod remeasure;

use std::time::{SystemTime, UNIX_EPOCH};

pub use book::{ClusterProfiles, PROFILE_REFRESH, ProfileBook};
pub use cache::{default_dir as default_cache_dir, profile_model_with};
pub use hardware::{GpuAdapter, Hardware};
pub use links::{PROBE_BYTES, PROBE_PERIOD, measure_link};
pub use live::{LiveFigures, LiveMeter};
pub use measure::{MeasureOptions, measure, remeasure_inference};
pub use model_cost::model_cost;
pub use offer::{LoadSampler, Offer};
pub use planning::{
    Alternative, DeviceFigures, PlanReport, PlanRequest, PlannerInput, lora_bytes_per_layer,
    plan_report, planner_input,
};
pub(crate) use remeasure::{offered_more, spawn as spawn_remeasure};

use hearth_partitioner::PhaseTimes;
use serde::{Deserialize, Serialize};

/// Version of the profile document shared between members and cached on
/// disk; a document of another version is ignored (and re-measured).
pub const PROFILE_FORMAT: u32 = 1;

/// Errors of the profiler.
#[derive(Debug, thiserror::Error)]
pub enum ProfileError {
    #[error(transparent)]
    Model(#[from] hearth_models::ModelError),
    #[error("measuring: {0}")]
    Candle(#[from] candle_core::Error),
    #[error("profile document: {0}")]
    Json(#[from] serde_json::Error),
    #[error("profile document of format {found}, this node reads format {PROFILE_FORMAT}")]
    Format { found: u32 },
    #[error("{path}: {source}")]
    Io {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
}

/// Measured times of one model on one device.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelTimes {
    /// The model's name (file stem).
    pub model: String,
    /// Identifies the model's content (see [`model_fingerprint`]).
    pub fingerprint: String,
    /// How the model ran: "cpu" (the only backend so far).
    pub backend: String,
    /// Threads the measurement used.
    pub threads: usize,
    /// One decoder layer.
    pub layer: PhaseTimes,
    /// The token embedding.
    pub embed: PhaseTimes,
    /// The final norm and LM head (with tied weights, the embedding matrix).
    pub head: PhaseTimes,
    /// Seconds since the Unix epoch when measured.
    pub measured_at: u64,
    /// Wall time the measurement took (seconds).
    pub took_s: f64,
    /// SHA-256 (first 16 bytes, hex) of the weight file(s): nodes serve a
    /// model together only when their files are byte-identical. Not part of
    /// the cached times (the same layout with other weights times the same).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
    /// What the machine offered while measuring (cores, quota, load of
    /// other programs); absent in documents of older nodes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub offer: Option<Offer>,
}

impl ModelTimes {
    /// Every figure multiplied by `k` (a slower device: k > 1).
    pub fn scaled(&self, k: f64) -> Self {
        self.scaled_by(k, k, k)
    }

    /// Decode figures multiplied by `decode`, prefill by `prefill` and
    /// training by `train`.
    pub fn scaled_by(&self, decode: f64, prefill: f64, train: f64) -> Self {
        let s = |t: PhaseTimes| PhaseTimes {
            decode_s: t.decode_s * decode,
            prefill_s_per_token: t.prefill_s_per_token * prefill,
            train_forward_s_per_token: t.train_forward_s_per_token * train,
            train_s_per_token: t.train_s_per_token * train,
        };
        Self {
            layer: s(self.layer),
            embed: s(self.embed),
            head: s(self.head),
            ..self.clone()
        }
    }
}

/// Where the figures a plan used for a device came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FigureSource {
    /// The start-up measurement as taken.
    Measured,
    /// The start-up measurement scaled to the CPU time offered now.
    Offer,
    /// Live figures from the stages' real work.
    Live,
}

/// A device's figures as the planner uses them now, and where they came
/// from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CurrentFigures {
    pub times: ModelTimes,
    /// Current ÷ start-up time (2.0: half the start-up speed).
    pub factor: f64,
    pub source: FigureSource,
    /// Cores' worth of CPU time offered now, if known.
    pub cores: Option<f64>,
}

/// A model as this node knows it: measured times, cost profile, config.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelInfo {
    pub times: ModelTimes,
    pub cost: hearth_partitioner::ModelProfile,
    pub config: hearth_models::Config,
    /// Where the weights are on this node.
    #[serde(default)]
    pub path: std::path::PathBuf,
}

impl ModelInfo {
    /// Profiles `weights` on this device (from the cache in
    /// `$HEARTH_HOME/profiles` unless `fresh`); returns the info and whether
    /// the times came from the cache.
    pub fn measure(
        weights: &hearth_models::WeightFile,
        fresh: bool,
        progress: &mut dyn FnMut(&str),
    ) -> Result<(Self, bool), ProfileError> {
        Self::measure_with(
            weights,
            &cache::default_dir(),
            &MeasureOptions::default(),
            fresh,
            progress,
        )
    }

    /// [`ModelInfo::measure`] with a cache directory and measurement options.
    pub fn measure_with(
        weights: &hearth_models::WeightFile,
        cache_dir: &std::path::Path,
        opts: &MeasureOptions,
        fresh: bool,
        progress: &mut dyn FnMut(&str),
    ) -> Result<(Self, bool), ProfileError> {
        let (mut times, cached) = profile_model_with(weights, cache_dir, opts, fresh, progress)?;
        // The cache is keyed by layout, which files of other names share
        // (two fine-tunes of one base): the name is always this file's.
        times.model = measure::model_name(weights);
        progress("hashing the weights");
        times.content = Some(content_hash(weights.path())?);
        Ok((
            Self {
                times,
                cost: model_cost(weights),
                config: weights.config().clone(),
                path: weights.path().to_path_buf(),
            },
            cached,
        ))
    }
}

/// A measured link from the profile's node to a peer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LinkProfile {
    /// The peer's node id (hex).
    pub peer: String,
    /// Round-trip time (QUIC's smoothed estimate), milliseconds.
    pub rtt_ms: f64,
    /// Measured bulk throughput over QUIC, bytes per second.
    pub bandwidth_bytes_per_s: f64,
    /// Seconds since the Unix epoch when measured.
    pub measured_at: u64,
}

/// Everything a node tells the cluster about itself.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeProfile {
    pub format: u32,
    pub node_id: String,
    pub name: String,
    pub hardware: Hardware,
    /// Bytes of memory the planner may use here (available minus headroom).
    pub memory_budget: u64,
    /// Measured times of the model this node serves, if one is set.
    pub model: Option<ModelTimes>,
    /// Links to the other members, as measured from this node.
    pub links: Vec<LinkProfile>,
    /// What the machine offers the node now (sampled every second).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub offer: Option<Offer>,
    /// Figures from the stages' real work, once there is some.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub live: Option<LiveFigures>,
}

impl NodeProfile {
    /// A profile of this device now (links are filled in later).
    pub fn new(
        node_id: impl Into<String>,
        name: impl Into<String>,
        model: Option<ModelTimes>,
    ) -> Self {
        let hardware = Hardware::detect();
        Self {
            format: PROFILE_FORMAT,
            node_id: node_id.into(),
            name: name.into(),
            memory_budget: hardware.memory_budget(),
            hardware,
            model,
            links: Vec::new(),
            offer: None,
            live: None,
        }
    }

    /// The model's figures as the planner should use them now: the
    /// start-up times scaled by trusted live figures, else by the CPU time
    /// offered now against what was offered while measuring, else as
    /// measured.
    pub fn current(&self) -> Option<CurrentFigures> {
        let times = self.model.as_ref()?;
        let cores = self.offer.map(|o| o.available());
        let usable = |k: &f64| k.is_finite() && *k > 0.0;
        // CPU time offered while measuring ÷ now.
        let offered = match (times.offer, self.offer) {
            (Some(then), Some(now)) => Some(then.available() / now.available()).filter(usable),
            _ => None,
        };
        if let Some(l) = self.live.filter(|l| l.trusted && usable(&l.factor)) {
            // What live work does not show (prefill without enough prompts
            // yet, training) follows the offer.
            let other = offered.unwrap_or(1.0);
            // Live figures time each batch. Under a CPU quota a short batch
            // fits inside one period and looks as fast as ever, while the
            // quota still caps sustained work: a device offered less CPU
            // than when measured is never credited with more than that.
            let floor = |k: f64| if other > 1.0 { k.max(other) } else { k };
            let decode = floor(l.factor);
            let prefill = floor(l.prefill_factor.filter(usable).unwrap_or(other));
            return Some(CurrentFigures {
                times: times.scaled_by(decode, prefill, other),
                factor: decode,
                source: FigureSource::Live,
                cores,
            });
        }
        if let Some(k) = offered {
            return Some(CurrentFigures {
                times: times.scaled(k),
                factor: k,
                source: FigureSource::Offer,
                cores,
            });
        }
        Some(CurrentFigures {
            times: times.clone(),
            factor: 1.0,
            source: FigureSource::Measured,
            cores,
        })
    }

    /// The document as sent to peers.
    pub fn to_json(&self) -> Result<Vec<u8>, ProfileError> {
        Ok(serde_json::to_vec(self)?)
    }

    /// Parses a peer's document, refusing other formats.
    pub fn from_json(bytes: &[u8]) -> Result<Self, ProfileError> {
        #[derive(Deserialize)]
        struct Head {
            format: u32,
        }
        let head: Head = serde_json::from_slice(bytes)?;
        if head.format != PROFILE_FORMAT {
            return Err(ProfileError::Format { found: head.format });
        }
        Ok(serde_json::from_slice(bytes)?)
    }
}

pub(crate) fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// SHA-256 (first 16 bytes, hex) of a weight file, or of a model
/// directory's `.safetensors` files and `config.json` in name order.
pub fn content_hash(path: &std::path::Path) -> Result<String, ProfileError> {
    use sha2::{Digest, Sha256};
    use std::io::Read;
    // A partial copy received from a member stands for the original.
    if let Some(have) = crate::model_file::read_have(path) {
        return Ok(have.content);
    }
    let io = |p: &std::path::Path| {
        let path = p.to_path_buf();
        move |source| ProfileError::Io { path, source }
    };
    // A GGUF: the root of its hash tree, which members verify received
    // pieces against (`model_file`).
    if path.is_file()
        && let Ok((len, leaves)) = crate::model_file::leaves(path)
    {
        return Ok(crate::model_file::content_root(len, &leaves));
    }
    let files = if path.is_dir() {
        let mut v: Vec<_> = std::fs::read_dir(path)
            .map_err(io(path))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.extension().is_some_and(|e| e == "safetensors")
                    || p.file_name().is_some_and(|n| n == "config.json")
            })
            .collect();
        v.sort();
        v
    } else {
        vec![path.to_path_buf()]
    };
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    for f in &files {
        let mut file = std::fs::File::open(f).map_err(io(f))?;
        loop {
            let n = file.read(&mut buf).map_err(io(f))?;
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
        }
    }
    let digest = h.finalize();
    Ok(digest[..16].iter().map(|b| format!("{b:02x}")).collect())
}

/// A short hash of the model's tensor layout (names, types, shapes, sizes)
/// and config: the same file gives the same fingerprint on every device,
/// without reading gigabytes of weights.
pub fn model_fingerprint(weights: &hearth_models::WeightFile) -> String {
    layout_digest(weights)[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// SHA-256 of the model's config and tensor layout.
pub fn layout_digest(weights: &hearth_models::WeightFile) -> [u8; 32] {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(format!("{:?}", weights.config()).as_bytes());
    for t in weights.tensor_layout() {
        h.update(t.name.as_bytes());
        h.update(t.dtype.as_bytes());
        for d in &t.shape {
            h.update((*d as u64).to_le_bytes());
        }
        h.update(t.bytes.to_le_bytes());
    }
    h.finalize().into()
}
