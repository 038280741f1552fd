//! Where a node's models come from, and how it gets its first one.
//!
//! [`ModelStore`] is the device's store as a [`ModelSource`]: the models
//! in its data folder's `models` (the default model fetched when missing),
//! plus the models this node fine-tuned, kept beside them
//! ([`hearth_models::dirs::Dirs`]). Loading
//! one by name resolves it and measures this device on it (cached).
//!
//! [`Node::start_model`] is the measure-then-serve start of a node: in the
//! background, get the model (from the store, or from the members with
//! `--from-peers`), measure it, and serve it; the node is a member at once
//! and offers its figures when they are known.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use hearth_models::WeightFile;
use hearth_models::store::{self, PullEvent};

use crate::catalog::{ModelEntry, ModelSource};
use crate::profile::{MeasureOptions, ModelInfo};
use crate::{Compute, Node, RuntimeError};

/// How often a node that takes its model from the members asks again while
/// none serves one.
const PEERS_RETRY: Duration = Duration::from_secs(2);

/// What getting a model reports, for people: the CLI draws bars, a UI
/// could show events.
#[derive(Debug, Clone)]
pub enum ModelProgress {
    /// Fetching the model into the store.
    Pull(PullEvent),
    /// A measuring step started.
    Measuring(String),
    /// Bytes of weights received from members so far, of a total.
    Received { done: u64, total: u64 },
    /// The model is measured and served (`cached`: the figures came from
    /// the profile cache; `from_peers`: the weights came from members).
    Served {
        info: Box<ModelInfo>,
        cached: bool,
        from_peers: bool,
    },
    /// No model yet, and why (from the members: it is tried again).
    Waiting(String),
    /// The node cannot serve the model.
    Failed(String),
}

/// The device's model store.
pub struct ModelStore {
    /// The store's models.
    models: PathBuf,
    /// Where this node's fine-tuned models go (`models/fine-tuned`).
    tuned: Option<PathBuf>,
    /// Models are measured on the node's compute, with these options.
    opts: MeasureOptions,
    /// The profile cache.
    cache: PathBuf,
}

impl ModelStore {
    /// The store of a node whose folders are `dirs` (models, fine-tuned
    /// models beside them, profiles in its cache), measuring with `opts`.
    pub fn new(dirs: &hearth_models::dirs::Dirs, opts: MeasureOptions) -> Self {
        Self {
            models: dirs.models(),
            tuned: Some(dirs.fine_tuned()),
            opts,
            cache: dirs.profiles(),
        }
    }

    /// This store with the fine-tuned models in `dir` instead.
    pub fn fine_tuned_in(mut self, dir: PathBuf) -> Self {
        self.tuned = Some(dir);
        self
    }

    /// Where copies of models received from members go (`models/peers`).
    pub fn peers_dir(&self) -> PathBuf {
        self.models.join("peers")
    }

    /// The compute models are measured on.
    pub fn compute(&self) -> &Compute {
        &self.opts.compute
    }

    /// Resolves `spec` (a .gguf file, a model directory, ORG/NAME from the
    /// Hugging Face cache, the default model's name or none: the default
    /// model, fetched when missing; or a model this node fine-tuned) and
    /// measures this device on it (`fresh`: ignore the cache). Blocking.
    /// Returns the info and whether the figures came from the cache.
    pub fn measure(
        &self,
        spec: Option<&str>,
        fresh: bool,
        progress: &mut dyn FnMut(ModelProgress),
    ) -> Result<(ModelInfo, bool), RuntimeError> {
        // A fine-tune by its id (its file's name, `.gguf` optional).
        let tuned = spec
            .filter(|s| !s.contains('/') && !s.contains('\\') && !s.starts_with('.'))
            .zip(self.tuned.as_ref())
            .and_then(|(s, dir)| {
                [dir.join(s), dir.join(format!("{s}.gguf"))]
                    .into_iter()
                    .find(|p| p.is_file())
            });
        let path = match tuned {
            Some(p) => p,
            None => store::resolve_in(&self.models, spec, &mut |e| {
                progress(ModelProgress::Pull(e))
            })?,
        };
        let weights = WeightFile::open(&path)?;
        Ok(ModelInfo::measure_with(
            &weights,
            &self.cache,
            &self.opts,
            fresh,
            &mut |step| progress(ModelProgress::Measuring(step.to_string())),
        )?)
    }
}

impl ModelSource for ModelStore {
    fn list(&self) -> Vec<ModelEntry> {
        let mut out: Vec<ModelEntry> = store::list_in(&self.models)
            .into_iter()
            .map(|m| ModelEntry {
                size_bytes: (m.bytes > 0).then_some(m.bytes),
                ..ModelEntry::held(m.name, m.path)
            })
            .collect();
        if let Some(Ok(rd)) = self.tuned.as_ref().map(std::fs::read_dir) {
            for p in rd.filter_map(|e| e.ok().map(|e| e.path())) {
                if p.extension().is_some_and(|x| x == "gguf") {
                    out.push(ModelEntry::held(store::model_id(&p), p));
                }
            }
        }
        let default = store::DEFAULT_MODEL.name;
        if !out.iter().any(|m| m.name == default) {
            out.insert(
                0,
                ModelEntry {
                    name: default.into(),
                    size_bytes: None,
                    download: true,
                    path: None,
                    holders: Vec::new(),
                    facts: None,
                    adapter: None,
                },
            );
        }
        out
    }

    fn load(&self, name: &str) -> Result<ModelInfo, String> {
        self.measure(Some(name), false, &mut |_| {})
            .map(|(info, _)| info)
            .map_err(|e| e.to_string())
    }

    fn models_dir(&self) -> Option<PathBuf> {
        self.tuned.clone()
    }

    fn peers_dir(&self) -> Option<PathBuf> {
        Some(self.peers_dir())
    }

    fn measure_file(&self, path: &std::path::Path) -> Result<ModelInfo, String> {
        let weights = WeightFile::open(path).map_err(|e| e.to_string())?;
        ModelInfo::measure_with(&weights, &self.cache, &self.opts, false, &mut |_| {})
            .map(|(info, _)| info)
            .map_err(|e| e.to_string())
    }
}

/// Where a node's first model comes from.
#[derive(Debug, Clone)]
pub enum FirstModel {
    /// From the store: this spec (see [`ModelStore::measure`]), or the
    /// default model.
    Store(Option<String>),
    /// From the members that serve one, into a sparse copy under this
    /// folder (`--from-peers`).
    Peers(PathBuf),
}

impl Node {
    /// Gets the node's first model in the background, measures this device
    /// on it and serves it: from the store, or from the members (asking
    /// again every 2 s while none serves a model). `report` is told each
    /// step.
    pub fn start_model(
        &self,
        store: Arc<ModelStore>,
        first: FirstModel,
        report: Arc<dyn Fn(ModelProgress) + Send + Sync>,
    ) -> tokio::task::JoinHandle<()> {
        let node = self.clone();
        // A device later offered clearly more CPU measures the model again.
        let (train, live) = (self.pipeline.train().clone(), self.profiles.live());
        crate::profile::spawn_remeasure(
            self.profiles.clone(),
            store.cache.clone(),
            store.opts.clone(),
            move || train.running() > 0 || live.figures().is_some_and(|f| f.busy > 0.2),
        );
        tokio::spawn(async move {
            match first {
                FirstModel::Store(spec) => {
                    let r = {
                        let (store, report) = (store.clone(), report.clone());
                        tokio::task::spawn_blocking(move || {
                            store.measure(spec.as_deref(), false, &mut |p| report(p))
                        })
                        .await
                    };
                    match r {
                        Ok(Ok((info, cached))) => match node.set_model(info.clone()) {
                            Ok(()) => report(ModelProgress::Served {
                                info: Box::new(info),
                                cached,
                                from_peers: false,
                            }),
                            Err(e) => report(ModelProgress::Failed(e.to_string())),
                        },
                        Ok(Err(e)) => report(ModelProgress::Failed(e.to_string())),
                        Err(e) => report(ModelProgress::Failed(e.to_string())),
                    }
                }
                FirstModel::Peers(dir) => loop {
                    let mut received = |done: u64, total: u64| {
                        report(ModelProgress::Received { done, total });
                    };
                    match node
                        .adopt_model_from_peers(&dir, &store.cache, &store.opts, &mut received)
                        .await
                    {
                        Ok(info) => {
                            report(ModelProgress::Served {
                                info: Box::new(info),
                                cached: false,
                                from_peers: true,
                            });
                            break;
                        }
                        Err(e) => report(ModelProgress::Waiting(e.to_string())),
                    }
                    tokio::time::sleep(PEERS_RETRY).await;
                },
            }
        })
    }
}
