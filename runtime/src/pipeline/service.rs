//! The node's pipeline state: the model it serves, the stages it runs (one
//! per placement, while a placement is current or still draining), the
//! active placement, and the pipes to other members.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};

use hearth_models::{ModelText, Precision, Stage, WeightFile};
use hearth_net::{Endpoint, NodeId};
use tokio::sync::{mpsc, watch};
use tracing::{info, warn};

use super::pipe::{Hop, Pipes};
use super::router::{self, RouterMsg};
use super::worker::{self, Routes, Worker};
use super::{Placement, Sink, StageStats};
use crate::catalog::ModelSource;
use crate::events::{EventKind, Events};
use crate::profile::{ModelInfo, ProfileBook};

/// The model this node serves: measured info and its text side.
pub(crate) struct ServedModel {
    pub info: ModelInfo,
    pub text: ModelText,
}

/// A stage this node runs for one placement.
pub(crate) struct LocalStage {
    pub placement: Arc<Placement>,
    pub index: usize,
    pub hidden_size: usize,
    pub worker: Worker,
    /// Stage 0's sequence table.
    pub router: Option<mpsc::UnboundedSender<RouterMsg>>,
    /// The LoRA adapters' slices this stage holds.
    pub adapters: Arc<crate::adapters::StageAdapters>,
    /// Whether it can apply adapters (a GPU stage cannot).
    pub takes_adapters: bool,
    /// Garbage-collection ticks seen idle while not active.
    idle_ticks: std::sync::atomic::AtomicU32,
}

impl Drop for LocalStage {
    fn drop(&mut self) {
        if let Some(r) = &self.router {
            let _ = r.send(RouterMsg::Stop);
        }
    }
}

struct Inner {
    endpoint: Endpoint,
    me: String,
    model: RwLock<Option<Arc<ServedModel>>>,
    stages: Mutex<HashMap<u64, Arc<LocalStage>>>,
    active: watch::Sender<Option<Arc<Placement>>>,
    pipes: Pipes,
    profiles: ProfileBook,
    events: Events,
    source: Option<Arc<dyn ModelSource>>,
    /// The model being loaded by name, if any.
    loading: Mutex<Option<String>>,
    /// Members' catalogs, as last asked.
    catalogs: crate::sharing::CatalogCache,
    /// Bumped by every load and unload: a model being received from
    /// members under an older number is no longer wanted.
    adopt_generation: std::sync::atomic::AtomicU64,
    /// The leader as this node sees it: only it orders placements.
    leader: watch::Receiver<NodeId>,
    /// Training stages run here for jobs coordinated anywhere.
    train: crate::train::TrainHost,
    /// Where inference stages run.
    compute: crate::Compute,
    /// Which pipeline (or replica) new requests from here go to.
    balancer: super::balance::Balancer,
    /// A chat template in place of the served models' own.
    chat_template: Option<String>,
    /// One lock per adapter this node is preparing.
    adapter_locks: crate::adapters::AdapterLocks,
}

/// What a node serves with: where models come from by name, what its
/// stages run on, and a chat template in place of the models' own.
pub(crate) struct Serving {
    pub source: Option<Arc<dyn ModelSource>>,
    pub compute: crate::Compute,
    pub chat_template: Option<String>,
}

/// A cheap handle.
#[derive(Clone)]
pub(crate) struct Service {
    inner: Arc<Inner>,
}

impl Service {
    pub(crate) fn new(
        endpoint: Endpoint,
        profiles: ProfileBook,
        events: Events,
        train: crate::train::TrainHost,
        leader: watch::Receiver<NodeId>,
        serving: Serving,
    ) -> Self {
        let Serving {
            source,
            compute,
            chat_template,
        } = serving;
        Self {
            inner: Arc::new(Inner {
                me: endpoint.id().to_string(),
                endpoint,
                model: RwLock::new(None),
                stages: Mutex::new(HashMap::new()),
                active: watch::channel(None).0,
                pipes: Pipes::default(),
                profiles,
                events,
                source,
                loading: Mutex::new(None),
                catalogs: Default::default(),
                adopt_generation: Default::default(),
                leader,
                train,
                compute,
                balancer: Default::default(),
                chat_template,
                adapter_locks: Default::default(),
            }),
        }
    }

    /// The chat template given in place of the models' own, if any.
    pub(crate) fn chat_template(&self) -> Option<&str> {
        self.inner.chat_template.as_deref()
    }

    pub(crate) fn adapter_locks(&self) -> &crate::adapters::AdapterLocks {
        &self.inner.adapter_locks
    }

    pub(crate) fn train(&self) -> &crate::train::TrainHost {
        &self.inner.train
    }

    pub(crate) fn events(&self) -> &Events {
        &self.inner.events
    }

    pub(crate) fn source(&self) -> Option<&Arc<dyn ModelSource>> {
        self.inner.source.as_ref()
    }

    /// Serves `info`'s model from now on (members see its times with their
    /// next profile refresh; the leader places it).
    pub(crate) fn serve_model(&self, info: ModelInfo) -> Result<(), hearth_models::ModelError> {
        let weights = WeightFile::open(&info.path)?;
        let text = ModelText::load_with(&weights, self.chat_template())?;
        let (model, ms) = (info.times.model.clone(), info.times.layer.decode_s * 1e3);
        if let Ok(mut m) = self.inner.model.write() {
            *m = Some(Arc::new(ServedModel {
                info: info.clone(),
                text,
            }));
        }
        self.inner.profiles.set_model(info);
        self.inner.events.emit(EventKind::ModelLoaded {
            model,
            layer_decode_ms: ms,
        });
        Ok(())
    }

    /// Starts loading the model named `name`, which `source` lists, from
    /// it (in the background; its events tell how it went).
    pub(crate) fn load_listed(
        &self,
        source: Arc<dyn ModelSource>,
        name: &str,
    ) -> Result<(), crate::RuntimeError> {
        self.claim_loading(name)?;
        let me = self.clone();
        let name = name.to_string();
        tokio::task::spawn_blocking(move || {
            let result = source.load(&name).and_then(|mut info| {
                // Served under the name it was asked by: one id everywhere.
                info.times.model = name.clone();
                me.serve_model(info).map_err(|e| e.to_string())
            });
            me.loading_ended(&name, result.err());
        });
        Ok(())
    }

    /// Takes the node's one loading slot for `name` (a second load is
    /// refused while one runs) and tells that it started.
    pub(crate) fn claim_loading(&self, name: &str) -> Result<(), crate::RuntimeError> {
        use crate::RuntimeError::BadRequest;
        {
            let mut loading = self
                .inner
                .loading
                .lock()
                .map_err(|e| BadRequest(e.to_string()))?;
            if let Some(other) = loading.as_ref() {
                return Err(BadRequest(format!("already loading {other}")));
            }
            *loading = Some(name.to_string());
        }
        self.inner.events.emit(EventKind::ModelLoading {
            model: name.to_string(),
        });
        Ok(())
    }

    /// The model being loaded by name, if any.
    pub(crate) fn loading(&self) -> Option<String> {
        self.inner.loading.lock().ok().and_then(|l| l.clone())
    }

    /// Frees the loading slot; a failure is told as an event.
    pub(crate) fn loading_ended(&self, name: &str, failure: Option<String>) {
        if let Some(reason) = failure {
            warn!("cannot load {name}: {reason}");
            self.inner.events.emit(EventKind::ModelFailed {
                model: name.to_string(),
                reason,
            });
        }
        if let Ok(mut l) = self.inner.loading.lock() {
            *l = None;
        }
    }

    /// The number a model being received from members must still have to
    /// be served.
    pub(crate) fn adopt_generation(&self) -> u64 {
        self.inner
            .adopt_generation
            .load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Calls off receiving a model from members (a newer load or an
    /// unload came); the loading slot frees within a poll.
    pub(crate) fn cancel_adopt(&self) {
        self.inner
            .adopt_generation
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }

    /// Measured figures of this node and its members.
    pub(crate) fn profiles(&self) -> &ProfileBook {
        &self.inner.profiles
    }

    /// Members' catalogs, as last asked (see `crate::sharing`).
    pub(crate) fn catalog_cache(&self) -> &crate::sharing::CatalogCache {
        &self.inner.catalogs
    }

    /// Stops serving the model: its stages stop (failing what is in flight)
    /// and no placement is active here until a model is loaded again.
    pub(crate) fn unload_model(&self) {
        self.cancel_adopt();
        let old = self.inner.model.write().ok().and_then(|mut m| m.take());
        self.inner.profiles.clear_model();
        let stages: Vec<Arc<LocalStage>> = match self.inner.stages.lock() {
            Ok(mut s) => s.drain().map(|(_, st)| st).collect(),
            Err(_) => Vec::new(),
        };
        for st in &stages {
            if let Some(r) = &st.router {
                let _ = r.send(RouterMsg::FailAll("the model was unloaded".into()));
            }
        }
        if self.inner.active.send_replace(None).is_some() {
            self.inner.events.emit(EventKind::PlacementCleared {
                reason: "the model was unloaded".into(),
            });
        }
        if let Some(m) = old {
            self.inner.events.emit(EventKind::ModelUnloaded {
                model: m.info.times.model.clone(),
            });
        }
    }

    /// The leader as this node sees it now.
    pub(crate) fn leader(&self) -> NodeId {
        *self.inner.leader.borrow()
    }

    pub(crate) fn balancer(&self) -> &super::balance::Balancer {
        &self.inner.balancer
    }

    pub(crate) fn me(&self) -> &str {
        &self.inner.me
    }

    pub(crate) fn endpoint(&self) -> &Endpoint {
        &self.inner.endpoint
    }

    pub(crate) fn model(&self) -> Option<Arc<ServedModel>> {
        self.inner.model.read().ok().and_then(|m| m.clone())
    }

    pub(crate) fn active(&self) -> Option<Arc<Placement>> {
        self.inner.active.borrow().clone()
    }

    pub(crate) fn watch_active(&self) -> watch::Receiver<Option<Arc<Placement>>> {
        self.inner.active.subscribe()
    }

    fn stages(&self) -> Vec<Arc<LocalStage>> {
        match self.inner.stages.lock() {
            Ok(s) => s.values().cloned().collect(),
            Err(_) => Vec::new(),
        }
    }

    pub(crate) fn stage(&self, placement: u64) -> Option<Arc<LocalStage>> {
        self.inner.stages.lock().ok()?.get(&placement).cloned()
    }

    /// This node's stage of `placement`, if `from` may send to it.
    pub(crate) fn stage_for(
        &self,
        placement: u64,
        from: &str,
        hop: Hop,
    ) -> Result<Arc<LocalStage>, String> {
        let st = self
            .stage(placement)
            .ok_or_else(|| format!("no stage of placement {placement} here"))?;
        let allowed = match hop {
            Hop::Previous => st
                .index
                .checked_sub(1)
                .is_some_and(|i| st.placement.stages[i].node_id == from),
            Hop::AnyMember => st.placement.stage_of(from).is_some(),
        };
        if !allowed {
            return Err(format!("{from} is not the sender this stage expects"));
        }
        Ok(st)
    }

    /// Loads this node's stage of `placement` (checking it holds the same
    /// model, byte for byte) and starts its worker.
    pub(crate) async fn load_stage(&self, placement: Arc<Placement>) -> Result<(), String> {
        if self.stage(placement.id).is_some() {
            return Ok(());
        }
        let active = self.active().map(|a| a.id);
        if let Some(a) = active.filter(|a| placement.id < *a) {
            return Err(format!(
                "placement {} is older than the active one ({a})",
                placement.id
            ));
        }
        // At most one placement waits to become active here: a newer order
        // replaces a pending one (stages of the active placement and of
        // older ones still draining stay).
        if let Ok(mut stages) = self.inner.stages.lock() {
            stages.retain(|id, _| active.is_some_and(|a| *id <= a));
        }
        // A replica runs a one-stage pipeline of its own.
        let (placement, index) = placement
            .pipeline_for(self.me())
            .map(|(p, i)| (Arc::new(p), i))
            .ok_or("this node has no stage in the placement")?;
        let model = self.model().ok_or("this node has no model")?;
        let times = &model.info.times;
        if times.fingerprint != placement.fingerprint
            || (placement.content.is_some() && times.content != placement.content)
        {
            return Err(format!(
                "this node's model {} ({}) is not the placed model {} ({})",
                times.model,
                times.content.as_deref().unwrap_or(&times.fingerprint),
                placement.model,
                placement
                    .content
                    .as_deref()
                    .unwrap_or(&placement.fingerprint),
            ));
        }
        let spec = placement.stages[index].spec;
        self.inner.events.emit(EventKind::StageLoading {
            placement: placement.id,
            start: spec.start,
            end: spec.end,
        });
        let result = self.start_stage(&placement, index, &model).await;
        self.inner.events.emit(match &result {
            Ok(secs) => EventKind::StageLoaded {
                placement: placement.id,
                start: spec.start,
                end: spec.end,
                secs: *secs,
            },
            Err(reason) => EventKind::StageFailed {
                placement: placement.id,
                reason: reason.clone(),
            },
        });
        result.map(|_| ())
    }

    /// Loads stage `index` of `placement` and starts its worker; returns
    /// the seconds it took.
    async fn start_stage(
        &self,
        placement: &Arc<Placement>,
        index: usize,
        model: &Arc<ServedModel>,
    ) -> Result<f64, String> {
        let spec = placement.stages[index].spec;
        let path = model.info.path.clone();
        let started = std::time::Instant::now();
        // A partial copy (received from members) first gets what it lacks.
        if crate::model_file::read_have(&path).is_some() {
            let p = path.clone();
            let needed = tokio::task::spawn_blocking(move || crate::model_file::needed(&p, spec))
                .await
                .map_err(|e| e.to_string())??;
            let content = placement
                .content
                .clone()
                .ok_or("the placement names no content")?;
            crate::model_file::fetch(
                &self.inner.endpoint,
                &placement.members,
                &content,
                &path,
                needed,
                &mut |_, _| {},
            )
            .await?;
        }
        let compute = self.inner.compute.clone();
        let stage = tokio::task::spawn_blocking(move || -> Result<Stage, String> {
            let weights = WeightFile::open(&path).map_err(|e| e.to_string())?;
            compute
                .load_stage(&weights, spec, Precision::Quantized)
                .map_err(|e| e.to_string())
        })
        .await
        .map_err(|e| e.to_string())??;
        let hidden_size = stage.config().hidden_size;
        let takes_adapters = stage.takes_adapters();
        // The last stage samples: its vocabulary index for output
        // constraints is built now, off the stage thread, not on the first
        // constrained request.
        if spec.head {
            let m = model.clone();
            std::thread::Builder::new()
                .name("grammar-index".into())
                .spawn(move || {
                    if let Err(e) = m.text.grammars() {
                        tracing::warn!("output constraints are unavailable: {e}");
                    }
                })
                .map_err(|e| format!("starting the grammar index: {e}"))?;
        }
        let (router_tx, router_rx) = mpsc::unbounded_channel();
        let remote = |node: &str| -> Result<Sink, String> {
            let id: NodeId = node.parse().map_err(|e| format!("node id {node}: {e}"))?;
            let me = self.clone();
            Ok(Sink::Remote(self.inner.pipes.to(
                &self.inner.endpoint,
                id,
                move |peer, why| {
                    me.peer_lost(
                        &peer.to_string(),
                        &format!("pipe to {} broke: {why}", peer.short()),
                    )
                },
            )))
        };
        let next = match placement.stages.get(index + 1) {
            Some(s) => Some(remote(&s.node_id)?),
            None => None,
        };
        let first = if index == 0 {
            Sink::Local(router_tx.clone())
        } else {
            remote(&placement.stages[0].node_id)?
        };
        let adapters = Arc::new(crate::adapters::StageAdapters::default());
        let worker = worker::spawn(
            stage,
            adapters.clone(),
            Routes {
                placement: placement.id,
                next,
                first,
            },
            Some(worker::StageMeter {
                live: self.inner.profiles.live(),
            }),
            placement.stages[index].spec.head.then(|| model.clone()),
        )
        .map_err(|e| format!("starting the stage thread: {e}"))?;
        let router = (index == 0).then(|| {
            router::start(router_rx, worker.tx.clone());
            router_tx
        });
        info!(
            placement = placement.id,
            stage = index,
            layers = %format!("{}..{}", spec.start, spec.end),
            took_ms = started.elapsed().as_millis() as u64,
            "stage loaded"
        );
        let st = Arc::new(LocalStage {
            placement: placement.clone(),
            index,
            hidden_size,
            worker,
            router,
            adapters,
            takes_adapters,
            idle_ticks: Default::default(),
        });
        if let Ok(mut stages) = self.inner.stages.lock() {
            stages.insert(placement.id, st);
        }
        Ok(started.elapsed().as_secs_f64())
    }

    /// Makes `placement` the one new requests use (if it is newer).
    pub(crate) fn activate(&self, placement: Arc<Placement>) {
        let newer = self
            .active()
            .is_none_or(|a| a.id < placement.id || (a.id == placement.id && *a != *placement));
        if newer {
            info!(
                placement = placement.id,
                stages = placement.stages.len(),
                "placement active"
            );
            self.inner.active.send_replace(Some(placement.clone()));
            self.inner.events.emit(EventKind::PlacementActive {
                placement: (*placement).clone(),
            });
        }
    }

    /// A member left or its pipe broke: fail what runs through it, drop the
    /// stages of placements that include it, and stop using such a placement.
    pub(crate) fn peer_lost(&self, node: &str, reason: &str) {
        let hit: Vec<Arc<LocalStage>> = self
            .stages()
            .into_iter()
            .filter(|s| s.placement.stage_of(node).is_some())
            .collect();
        for st in &hit {
            if let Some(r) = &st.router {
                let _ = r.send(RouterMsg::FailAll(reason.to_string()));
            }
        }
        if let Ok(mut stages) = self.inner.stages.lock() {
            for st in &hit {
                stages.remove(&st.placement.id);
            }
        }
        let active_hit = self.active().is_some_and(|a| a.stage_of(node).is_some());
        if active_hit {
            warn!("the active placement lost a stage: {reason}");
            self.inner.active.send_replace(None);
            self.inner.events.emit(EventKind::PlacementCleared {
                reason: reason.to_string(),
            });
        }
    }

    /// Drops stages of placements older than the active one once they
    /// have drained.
    pub(crate) fn collect_garbage(&self) {
        let active = self.active().map(|a| a.id);
        let Ok(mut stages) = self.inner.stages.lock() else {
            return;
        };
        stages.retain(|id, st| {
            let old = active.is_some_and(|a| *id < a);
            if !old {
                return true;
            }
            let idle = st.worker.live.load(std::sync::atomic::Ordering::Relaxed) == 0;
            if !idle {
                // Idle ticks count in a row.
                st.idle_ticks.store(0, std::sync::atomic::Ordering::Relaxed);
                return true;
            }
            let ticks = st
                .idle_ticks
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            ticks < 2
        });
    }

    /// Whether stages of a placement older than the active one are still
    /// loaded here (draining their sequences).
    pub(crate) fn draining(&self) -> bool {
        let active = self.active().map(|a| a.id);
        self.stages()
            .iter()
            .any(|s| active.is_some_and(|a| s.placement.id < a))
    }

    /// Timings of the stages this node runs.
    pub(crate) fn stats(&self) -> Vec<StageStats> {
        let mut v: Vec<StageStats> = self
            .stages()
            .iter()
            .map(|s| {
                let (batches, compute_s, send_s) = s.worker.times.snapshot();
                let (adapters, adapter_bytes) = s.adapters.size();
                StageStats {
                    adapters,
                    adapter_bytes,
                    placement: s.placement.id,
                    index: s.index,
                    spec: s.placement.stages[s.index].spec,
                    batches,
                    compute_s,
                    send_s,
                    live_sequences: s.worker.live.load(std::sync::atomic::Ordering::Relaxed),
                }
            })
            .collect();
        v.sort_by_key(|s| s.placement);
        v
    }

    /// Stops every stage (node shutdown).
    pub(crate) fn stop(&self) {
        if let Ok(mut stages) = self.inner.stages.lock() {
            stages.clear();
        }
        self.inner.active.send_replace(None);
    }
}
