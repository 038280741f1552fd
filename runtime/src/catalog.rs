//! Which models a node can load by name (`POST /api/models/load`, the web
//! UI's model picker). The runtime knows no store or download: the
//! program that starts the node supplies a [`ModelSource`].

use serde::{Deserialize, Serialize};

use crate::profile::ModelInfo;

/// A model this device can load.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelEntry {
    /// The name to load it by.
    pub name: String,
    /// Size on disk, if it is here.
    pub size_bytes: Option<u64>,
    /// Whether loading needs a download first.
    pub download: bool,
    /// Where it is on this device, if it is here.
    #[serde(skip)]
    pub path: Option<std::path::PathBuf>,
    /// The members (by name) that hold it, in a cluster-wide listing
    /// ([`crate::Node::cluster_models`]); empty in a device's own.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub holders: Vec<String>,
    /// What its file says about itself, where a holder read it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub facts: Option<ModelFacts>,
    /// When it is a fine-tune that can be served as its base model plus a
    /// LoRA adapter: the adapter's id and the base it belongs to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adapter: Option<crate::adapters::AdapterFacts>,
}

impl ModelEntry {
    /// Whether it has a model file to load (here, or as its holder's facts
    /// say), not only a LoRA adapter to serve beside its base.
    pub fn has_model_file(&self) -> bool {
        self.path.as_deref().is_some_and(std::path::Path::is_file) || self.facts.is_some()
    }

    /// A model held here at `path` (`size_bytes` from the file).
    pub fn held(name: String, path: std::path::PathBuf) -> Self {
        let size_bytes = std::fs::metadata(&path).ok().map(|m| m.len());
        Self {
            name,
            size_bytes,
            download: false,
            path: Some(path),
            holders: Vec::new(),
            facts: None,
            adapter: None,
        }
    }
}

/// What a model file says about itself, read from its header and tensor
/// table (no weights are read).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelFacts {
    /// `gguf` or `safetensors`.
    pub format: String,
    pub architecture: String,
    /// Weights, counted.
    pub parameters: u64,
    /// The stored type holding most of the bytes (`Q4_1`, `BF16`, ...).
    pub quantization: String,
    /// `sha256:` of the tensor layout and config: the same file gives the
    /// same digest on every device.
    pub digest: String,
}

/// [`ModelFacts`] of the model at `path`, cached by path, size and
/// modification time (a changed file is read again). Blocking.
pub fn model_facts(path: &std::path::Path) -> Option<ModelFacts> {
    use std::collections::HashMap;
    use std::sync::{Mutex, OnceLock};
    type Key = (std::path::PathBuf, u64, Option<std::time::SystemTime>);
    static CACHE: OnceLock<Mutex<HashMap<Key, ModelFacts>>> = OnceLock::new();
    let meta = std::fs::metadata(path).ok()?;
    // A folder: its files' total size and latest change (a file rewritten
    // in place changes them; the folder's own times would not).
    let (len, modified) = if meta.is_dir() {
        let mut len = 0u64;
        let mut latest = meta.modified().ok();
        for e in std::fs::read_dir(path).ok()?.flatten().take(4096) {
            if let Ok(m) = e.metadata() {
                len = len.saturating_add(m.len());
                latest = latest.max(m.modified().ok());
            }
        }
        (len, latest)
    } else {
        (meta.len(), meta.modified().ok())
    };
    let key = (path.to_path_buf(), len, modified);
    let cache = CACHE.get_or_init(Default::default);
    if let Some(f) = cache.lock().ok()?.get(&key) {
        return Some(f.clone());
    }
    let w = hearth_models::WeightFile::open(path).ok()?;
    let layout = w.tensor_layout();
    let parameters = layout
        .iter()
        .map(|t| t.shape.iter().map(|&d| d as u64).product::<u64>())
        .sum();
    let mut by_type: Vec<(String, u64)> = Vec::new();
    for t in &layout {
        match by_type.iter_mut().find(|(d, _)| *d == t.dtype) {
            Some((_, b)) => *b += t.bytes,
            None => by_type.push((t.dtype.clone(), t.bytes)),
        }
    }
    let quantization = by_type
        .into_iter()
        .max_by_key(|(_, b)| *b)
        .map(|(d, _)| d.to_uppercase())
        .unwrap_or_default();
    let digest = crate::profile::layout_digest(&w);
    let facts = ModelFacts {
        format: if path.is_dir() { "safetensors" } else { "gguf" }.into(),
        architecture: w.config().architecture.clone(),
        parameters,
        quantization,
        digest: format!(
            "sha256:{}",
            digest
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect::<String>()
        ),
    };
    let mut c = cache.lock().ok()?;
    // Bounded: models on one device are few; a store rewritten many times
    // starts over.
    if c.len() >= 256 {
        c.clear();
    }
    c.insert(key, facts.clone());
    Some(facts)
}

/// Resolves model names to measured models.
pub trait ModelSource: Send + Sync {
    /// The models this device can load.
    fn list(&self) -> Vec<ModelEntry>;
    /// Fetches `name` if needed and measures this device on it. Blocking
    /// (file I/O and compute): the runtime calls it off the async threads.
    fn load(&self, name: &str) -> Result<ModelInfo, String>;
    /// Where fine-tuned models are written so that [`Self::list`] and
    /// [`Self::load`] find them (by file name).
    fn models_dir(&self) -> Option<std::path::PathBuf> {
        None
    }
    /// Where copies of models received from members go (a model only
    /// other members hold is loaded by fetching the tensors it needs from
    /// them); `None`: this device loads only its own models.
    fn peers_dir(&self) -> Option<std::path::PathBuf> {
        None
    }
    /// Measures this device on the model file at `path` (a copy received
    /// from members). Blocking.
    fn measure_file(&self, path: &std::path::Path) -> Result<ModelInfo, String> {
        Err(format!(
            "this device does not measure models from members ({})",
            path.display()
        ))
    }
}
