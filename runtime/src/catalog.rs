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
}
