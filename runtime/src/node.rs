//! A running node: endpoint, discoveries and membership, started together
//! and shut down together.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use hearth_discovery::{Announcement, Discovery};
use hearth_net::{ClusterSecret, Endpoint, EndpointConfig, Identity, NodeId};
use hearth_proto::{PROTOCOL_VERSION, stream_kind};
use tokio::sync::{broadcast, mpsc};

use crate::catalog::{ModelEntry, ModelSource};
use crate::events::{ClusterEvent, EventKind, Events};
use crate::membership::{self, HEARTBEAT_INTERVAL, HEARTBEAT_TIMEOUT, Membership, MembershipEvent};
use crate::pipeline::service::Service;
use crate::pipeline::{self, GenStream, GenerateParams, PipelineError, StageStats};
use crate::placement::{Placement, PlacementPolicy};
use crate::profile::{
    ClusterProfiles, ModelInfo, NodeProfile, PROBE_PERIOD, PlanReport, PlanRequest, ProfileBook,
    plan_report, planner_input,
};
use crate::train::{JobHandle, JobInfo, JobSpec};
use crate::{ClusterView, RuntimeError};

/// How to start a node.
pub struct NodeConfig {
    pub name: String,
    pub identity: Identity,
    pub secret: ClusterSecret,
    /// UDP address of the QUIC endpoint (port 0 picks one).
    pub quic: SocketAddr,
    pub discoveries: Vec<Box<dyn Discovery>>,
    pub heartbeat_interval: Duration,
    pub heartbeat_timeout: Duration,
    /// The model this node serves with this device's measured times (see
    /// [`ModelInfo::measure`]); may also be set later with [`Node::set_model`].
    pub model: Option<ModelInfo>,
    /// How often links to members are measured again.
    pub probe_period: Duration,
    /// How the leader splits the model over the members that hold it.
    pub placement: PlacementPolicy,
    /// Where models are loaded from by name (`Node::load_model`).
    pub models: Option<Arc<dyn ModelSource>>,
    /// What inference stages run on (measure `model` on the same).
    pub compute: crate::Compute,
    /// A chat template (Jinja source) used in place of every served
    /// model's own (`--chat-template FILE`).
    pub chat_template: Option<String>,
}

impl NodeConfig {
    /// Defaults: heartbeats every 300 ms, a member silent for 2.5 s leaves.
    pub fn new(name: impl Into<String>, identity: Identity, secret: ClusterSecret) -> Self {
        Self {
            name: name.into(),
            identity,
            secret,
            quic: SocketAddr::from(([0, 0, 0, 0], 0)),
            discoveries: Vec::new(),
            heartbeat_interval: HEARTBEAT_INTERVAL,
            heartbeat_timeout: HEARTBEAT_TIMEOUT,
            model: None,
            probe_period: PROBE_PERIOD,
            placement: PlacementPolicy::default(),
            models: None,
            compute: crate::Compute::Cpu,
            chat_template: None,
        }
    }
}

/// A running node; cheap to clone.
#[derive(Clone)]
pub struct Node {
    endpoint: Endpoint,
    membership: Membership,
    pub(crate) profiles: ProfileBook,
    pub(crate) pipeline: Service,
    jobs: Arc<crate::train::JobCtx>,
    job_list: Arc<std::sync::Mutex<Vec<Arc<JobHandle>>>>,
    discoveries: Arc<Vec<Box<dyn Discovery>>>,
    tasks: Arc<Vec<tokio::task::AbortHandle>>,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node")
            .field("endpoint", &self.endpoint)
            .finish()
    }
}

impl Node {
    /// Binds the endpoint, starts membership and the discoveries.
    pub async fn start(cfg: NodeConfig) -> Result<Self, RuntimeError> {
        let cluster_id = cfg.secret.cluster_id().to_string();
        let (endpoint, mut streams) = Endpoint::bind(
            EndpointConfig {
                identity: cfg.identity,
                secret: cfg.secret,
                name: cfg.name.clone(),
                bind: cfg.quic,
            },
            &[
                stream_kind::MEMBERSHIP,
                stream_kind::PROFILE,
                stream_kind::PROBE,
                stream_kind::PIPE,
                stream_kind::GENERATE,
                stream_kind::CONTROL,
                stream_kind::WEIGHTS,
                stream_kind::TRAIN,
            ],
        )?;
        let mut take = |kind| streams.remove(&kind).ok_or(RuntimeError::Stopped);
        let membership_streams = take(stream_kind::MEMBERSHIP)?;
        let profile_streams = take(stream_kind::PROFILE)?;
        let probe_streams = take(stream_kind::PROBE)?;
        let pipe_streams = take(stream_kind::PIPE)?;
        let generate_streams = take(stream_kind::GENERATE)?;
        let control_streams = take(stream_kind::CONTROL)?;
        let weight_streams = take(stream_kind::WEIGHTS)?;
        let train_streams = take(stream_kind::TRAIN)?;
        let train = crate::train::TrainHost::new(crate::train::TrainNet::new(
            endpoint.clone(),
            train_streams,
        ));
        let (dtx, drx) = mpsc::channel(256);
        let membership = membership::spawn(
            endpoint.clone(),
            cluster_id.clone(),
            drx,
            membership_streams,
            (cfg.heartbeat_interval, cfg.heartbeat_timeout),
        );
        let profiles = ProfileBook::spawn(
            endpoint.clone(),
            NodeProfile::new(endpoint.id().to_string(), &cfg.name, None),
            profile_streams,
            probe_streams,
            membership.events(),
            cfg.probe_period,
        );
        let events = Events::new(endpoint.id().to_string(), cfg.name.clone());
        let service = Service::new(
            endpoint.clone(),
            profiles.clone(),
            events.clone(),
            train.clone(),
            membership.leader(),
            crate::pipeline::service::Serving {
                source: cfg.models,
                compute: cfg.compute,
                chat_template: cfg.chat_template,
            },
        );
        events.set_share(share_with_members(service.clone()));
        if let Some(info) = cfg.model {
            service.serve_model(info)?;
        }
        let mut tasks = vec![
            serve_streams(pipe_streams, service.clone(), pipeline::pipe::serve),
            serve_streams(generate_streams, service.clone(), pipeline::client::serve),
            serve_streams(control_streams, service.clone(), crate::control::serve),
            serve_streams(weight_streams, service.clone(), crate::model_file::serve),
            crate::placement::leader::spawn(
                service.clone(),
                membership.clone(),
                profiles.clone(),
                cfg.placement.clone(),
            )
            .abort_handle(),
        ];
        // A member that leaves takes its stages with it.
        let mut left = membership.events();
        let watcher = service.clone();
        tasks.push(
            tokio::spawn(async move {
                loop {
                    match left.recv().await {
                        Ok(MembershipEvent::Left {
                            node_id,
                            name,
                            reason,
                        }) => {
                            watcher.events().record(
                                node_id.to_string(),
                                name.clone(),
                                EventKind::MemberLeft {
                                    reason: reason.clone(),
                                },
                            );
                            watcher.train().peer_lost(node_id);
                            watcher.peer_lost(
                                &node_id.to_string(),
                                &format!("stage node {name} ({}) left: {reason}", node_id.short()),
                            )
                        }
                        Ok(MembershipEvent::Joined(m)) => watcher.events().record(
                            m.node_id,
                            m.name,
                            EventKind::MemberJoined { address: m.address },
                        ),
                        Ok(MembershipEvent::LeaderChanged(id)) => {
                            watcher.events().emit(EventKind::LeaderChanged {
                                leader: id.to_string(),
                            })
                        }
                        Err(broadcast::error::RecvError::Lagged(_)) => {}
                        Err(_) => break,
                    }
                }
            })
            .abort_handle(),
        );
        let me = Announcement {
            node_id: endpoint.id(),
            name: cfg.name,
            cluster_id,
            quic_port: endpoint.local_addr()?.port(),
            version: PROTOCOL_VERSION,
        };
        for d in &cfg.discoveries {
            d.start(&me, dtx.clone())?;
        }
        let jobs = Arc::new(crate::train::JobCtx {
            service: service.clone(),
            membership: membership.clone(),
            profiles: profiles.clone(),
            policy: cfg.placement,
            host: train,
            turn: tokio::sync::Mutex::new(()),
        });
        Ok(Self {
            endpoint,
            membership,
            profiles,
            jobs,
            job_list: Arc::default(),
            pipeline: service,
            discoveries: Arc::new(cfg.discoveries),
            tasks: Arc::new(tasks),
        })
    }

    pub fn id(&self) -> NodeId {
        self.endpoint.id()
    }

    /// This node's name (as members list it).
    pub fn name(&self) -> &str {
        self.endpoint.name()
    }

    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    /// The current view of the cluster, with the members' profiles.
    pub async fn view(&self) -> Result<ClusterView, RuntimeError> {
        let mut view = self.membership.view().await.ok_or(RuntimeError::Stopped)?;
        let profiles = self.profiles(&view);
        view.placement = self.placement();
        view.predicted_now = view
            .placement
            .as_ref()
            .zip(self.pipeline.model())
            .and_then(|(p, m)| crate::placement::predict_now(p, &profiles, &m.info))
            .map(|plan| crate::view::PredictedNow {
                tokens_per_s: plan.tokens_per_s,
                step_s: plan.step_s,
            });
        view.profiles = Some(profiles);
        Ok(view)
    }

    /// The profiles of this node and of the members in `view`.
    fn profiles(&self, view: &ClusterView) -> ClusterProfiles {
        let members: Vec<String> = view.members.iter().map(|m| m.node_id.clone()).collect();
        self.profiles.snapshot(&members)
    }

    /// Sets the model this node serves, with its measured times; members
    /// see the times with their next profile refresh, and the leader places
    /// the model over the members that hold it.
    pub fn set_model(&self, info: ModelInfo) -> Result<(), RuntimeError> {
        Ok(self.pipeline.serve_model(info)?)
    }

    /// The name of the model this node serves, if any.
    pub fn model_name(&self) -> Option<String> {
        self.pipeline.model().map(|m| m.info.times.model.clone())
    }

    /// The content id of the model this node serves, if any and known.
    pub fn model_content(&self) -> Option<String> {
        self.pipeline
            .model()
            .and_then(|m| m.info.times.content.clone())
            .filter(|c| !c.is_empty())
    }

    /// Whether `text` is one special token of the served model's
    /// vocabulary.
    pub fn is_special_token(&self, text: &str) -> bool {
        self.special_token_id(text).is_some()
    }

    /// The id of `text` when it is one special token of the served model's
    /// vocabulary.
    pub fn special_token_id(&self, text: &str) -> Option<u32> {
        self.pipeline
            .model()
            .and_then(|m| m.text.tokenizer().special_id(text))
    }

    /// Where the served model's file is on this node, if it serves one.
    pub fn model_path(&self) -> Option<std::path::PathBuf> {
        self.pipeline.model().map(|m| m.info.path.clone())
    }

    /// How the served model writes tool calls (from its chat template).
    pub fn tool_format(&self) -> Option<hearth_models::tools::ToolFormat> {
        self.pipeline.model().map(|m| m.text.tool_format())
    }

    /// The text of `ids` decoded together (special tokens left out).
    pub fn detokenize(&self, ids: &[u32]) -> String {
        self.pipeline
            .model()
            .and_then(|m| m.text.tokenizer().decode(ids).ok())
            .unwrap_or_default()
    }

    /// Whether the served model's chat template shows the model its tools.
    pub fn template_renders_tools(&self) -> bool {
        self.pipeline
            .model()
            .is_some_and(|m| m.text.renders_tools())
    }

    /// Compiles an output constraint for the served model (off the async
    /// threads): the error says what is wrong with it.
    pub async fn check_grammar(&self, grammar: &str) -> Result<(), String> {
        let m = self.pipeline.model().ok_or("no model is served")?;
        let g = grammar.to_string();
        tokio::task::spawn_blocking(move || {
            m.text
                .grammars()
                .and_then(|gs| gs.compile(&g))
                .map(|_| ())
                .map_err(|e| e.to_string())
        })
        .await
        .map_err(|e| e.to_string())?
    }

    /// The served model's configuration.
    pub fn model_config(&self) -> Option<hearth_models::Config> {
        self.pipeline.model().map(|m| m.info.config.clone())
    }

    /// The served model's chat template source (the one used with tools).
    pub fn chat_template_source(&self) -> Option<String> {
        self.pipeline.model().map(|m| m.text.template_source_text())
    }

    /// The served model's vocabulary size (its logit width).
    pub fn vocab_size(&self) -> Option<usize> {
        self.pipeline.model().map(|m| m.info.config.vocab_size)
    }

    /// Each token's bytes on its own (special tokens as their text), for
    /// log-probability reports.
    pub fn token_bytes(&self, ids: &[u32]) -> Vec<Vec<u8>> {
        let Some(m) = self.pipeline.model() else {
            return ids.iter().map(|_| Vec::new()).collect();
        };
        ids.iter()
            .map(|&id| m.text.tokenizer().id_bytes(id))
            .collect()
    }

    /// Each token's text on its own ([`Node::token_bytes`] as UTF-8, a
    /// partial character replaced).
    pub fn token_texts(&self, ids: &[u32]) -> Vec<String> {
        self.token_bytes(ids)
            .into_iter()
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .collect()
    }

    /// Whether `name` is another name of the served model: its file's name
    /// or stem (what earlier versions served it under).
    pub fn serves_under(&self, name: &str) -> bool {
        let Some(m) = self.pipeline.model() else {
            return false;
        };
        let p = &m.info.path;
        let is = |o: Option<&std::ffi::OsStr>| o.is_some_and(|f| f.to_string_lossy() == name);
        // A copy received from members has a name of its own: its id's
        // file name stands for it.
        is(p.file_name()) || is(p.file_stem()) || name == format!("{}.gguf", m.info.times.model)
    }

    /// The models this node can load by name.
    pub fn available_models(&self) -> Vec<ModelEntry> {
        self.pipeline.source().map(|s| s.list()).unwrap_or_default()
    }

    /// Every model the cluster can load by name: this device's own (those
    /// its store would download included), then those only other members
    /// hold; each names the members that hold it (`holders`).
    pub async fn cluster_models(&self) -> Vec<ModelEntry> {
        crate::sharing::cluster_models(&self.pipeline).await
    }

    /// Loads the model named `name` on this node (from its store, or from
    /// the members that hold it) and asks every member to load it too
    /// (from its own store, or from the holders); each is measured on it
    /// and the leader places it. Returns at once (events tell the
    /// progress) with the members that refused, as (name, reason).
    pub async fn load_model(&self, name: &str) -> Result<Vec<(String, String)>, RuntimeError> {
        // A LoRA fine-tune of the served model is served beside it: there
        // is nothing to load. One of another base loads as its merged
        // model, if it has one.
        match crate::adapters::resolve(&self.pipeline, name).await? {
            crate::adapters::Resolved::Serve(_) => return Ok(Vec::new()),
            crate::adapters::Resolved::OtherBase { base_model } => {
                if let Some(entry) = self
                    .cluster_models()
                    .await
                    .into_iter()
                    .find(|m| m.name == name)
                {
                    adapter_of_another_base(name, &base_model, &entry)?;
                }
            }
            crate::adapters::Resolved::NotAdapter => {}
        }
        // Members are asked even when this node cannot load it: the
        // holders can still serve it.
        let here = crate::sharing::load_or_adopt(&self.pipeline, name, &[]).await;
        let holders = here.as_ref().map(Vec::clone).unwrap_or_default();
        let wait = crate::sharing::CATALOG_WAIT + Duration::from_secs(3);
        let replies = self
            .ask_members(
                crate::control::Control::Load {
                    model: name.to_string(),
                    holders: holders.clone(),
                },
                wait,
            )
            .await;
        let mut accepted = Vec::new();
        let mut refused = Vec::new();
        for (id, n, r) in replies {
            match r {
                Ok(crate::control::Control::Ready { .. }) => accepted.push(id),
                Ok(crate::control::Control::Failed { reason, .. }) => refused.push((n, reason)),
                Ok(_) => refused.push((n, "unexpected reply".into())),
                Err(e) => refused.push((n, e.to_string())),
            }
        }
        // Receiving from holders that all refused would wait in vain.
        if !holders.is_empty() && !holders.iter().any(|h| accepted.contains(h)) {
            self.pipeline.cancel_adopt();
            let why: Vec<String> = refused.iter().map(|(n, r)| format!("{n}: {r}")).collect();
            return Err(RuntimeError::BadRequest(format!(
                "no member that holds {name} can load it ({})",
                why.join("; ")
            )));
        }
        match here {
            Ok(_) => Ok(refused),
            Err(e) if accepted.is_empty() => Err(e),
            Err(e) => {
                refused.push((self.name().to_string(), e.to_string()));
                Ok(refused)
            }
        }
    }

    /// Stops serving the model on this node and on every member.
    pub async fn unload_model(&self) {
        self.pipeline.unload_model();
        self.ask_members(crate::control::Control::Unload, Duration::from_secs(2))
            .await;
    }

    /// The recent events, then every new one.
    pub fn cluster_events(&self) -> (Vec<ClusterEvent>, broadcast::Receiver<ClusterEvent>) {
        self.pipeline.events().subscribe()
    }

    /// Stage timings of every member (node id, name, its stages).
    pub async fn cluster_stage_stats(&self) -> Vec<(String, String, Vec<StageStats>)> {
        let mut out = vec![(
            self.id().to_string(),
            self.endpoint.name().to_string(),
            self.stage_stats(),
        )];
        for (id, name, r) in self
            .ask_members(
                crate::control::Control::StatsRequest,
                Duration::from_secs(2),
            )
            .await
        {
            if let Ok(crate::control::Control::Stats { stages }) = r {
                out.push((id, name, stages));
            }
        }
        out
    }

    /// Sends `req` to every other member at once (`wait` each).
    async fn ask_members(
        &self,
        req: crate::control::Control,
        wait: Duration,
    ) -> Vec<(
        String,
        String,
        Result<crate::control::Control, crate::control::ControlError>,
    )> {
        let peers = self.endpoint.peers();
        let asks = peers.iter().map(|p| {
            let id = p.info().node_id.to_string();
            let (service, req) = (self.pipeline.clone(), req.clone());
            async move { crate::control::request(&service, &id, &req, wait).await }
        });
        let replies = futures_util::future::join_all(asks).await;
        peers
            .iter()
            .zip(replies)
            .map(|(p, r)| (p.info().node_id.to_string(), p.info().name.clone(), r))
            .collect()
    }

    /// Obtains the model the cluster serves from a member instead of the
    /// internet: the file's header and the tensors a measurement reads go
    /// into a sparse copy under `dir`; this device is measured on them and
    /// serves the model from then on (a stage's other tensors are fetched
    /// when the leader assigns it). Returns the measured info.
    pub async fn adopt_model_from_peers(
        &self,
        dir: &std::path::Path,
        cache_dir: &std::path::Path,
        opts: &crate::profile::MeasureOptions,
        progress: &mut (dyn FnMut(u64, u64) + Send),
    ) -> Result<ModelInfo, RuntimeError> {
        let Some((dest, model)) =
            crate::sharing::receive(&self.pipeline, None, dir, progress).await?
        else {
            return Err(RuntimeError::BadRequest(
                "no member serves a model yet".into(),
            ));
        };
        let (d, c, o) = (dest.clone(), cache_dir.to_path_buf(), opts.clone());
        let info = tokio::task::spawn_blocking(move || -> Result<ModelInfo, RuntimeError> {
            let weights = hearth_models::WeightFile::open(&d)?;
            let (info, _) = ModelInfo::measure_with(&weights, &c, &o, false, &mut |_| {})
                .map_err(|e| RuntimeError::BadRequest(e.to_string()))?;
            Ok(info)
        })
        .await
        .map_err(|e| RuntimeError::BadRequest(e.to_string()))??;
        // Served under the id the cluster knows it by, not its copy's name.
        let mut info = info;
        info.times.model = model;
        self.set_model(info.clone())?;
        Ok(info)
    }

    /// Generates on the cluster's active placement: tokens stream on the
    /// returned channel; dropping it cancels the generation.
    pub async fn generate(&self, req: GenerateParams) -> Result<GenStream, PipelineError> {
        pipeline::client::generate(&self.pipeline, req).await
    }

    /// The placement new requests use, if any.
    pub fn placement(&self) -> Option<Placement> {
        self.pipeline.active().map(|p| (*p).clone())
    }

    /// Makes `model` servable: at once if it is the served model (a
    /// request then fails fast as not ready while its placement is still
    /// being made); as the served model plus its LoRA adapter when it is a
    /// fine-tune of it (returned: requests carry it in
    /// [`GenerateParams::adapter`]; nothing is reloaded); else by loading
    /// it from the node's store (a merged fine-tune, say) across the
    /// cluster and awaiting its placement on the placement watch, for at
    /// most `wait`. A name may carry its file's `.gguf`.
    pub async fn ensure_model(
        &self,
        model: &str,
        wait: Duration,
    ) -> Result<Option<crate::adapters::AdapterRef>, RuntimeError> {
        if self.model_name().as_deref() == Some(model) || self.serves_under(model) {
            return Ok(None);
        }
        let resolved = crate::adapters::resolve(&self.pipeline, model).await?;
        if let crate::adapters::Resolved::Serve(a) = resolved {
            return Ok(Some(a));
        }
        let gguf = format!("{model}.gguf");
        let entry = self
            .cluster_models()
            .await
            .into_iter()
            .find(|m| !m.download && (m.name == model || m.name == gguf))
            .ok_or_else(|| RuntimeError::UnknownModel(model.to_string()))?;
        if let crate::adapters::Resolved::OtherBase { base_model } = resolved {
            adapter_of_another_base(model, &base_model, &entry)?;
        }
        let name = entry.name.clone();
        let placed = |p: &Option<Arc<Placement>>| p.as_ref().is_some_and(|p| p.model == name);
        let ready = |node: &Self| {
            node.model_name().as_deref() == Some(name.as_str()) && placed(&node.pipeline.active())
        };
        tracing::info!(model, holders = ?entry.holders, "a request asks for a held model; loading it");
        match self.load_model(&name).await {
            Ok(_) => {}
            // Another request is loading it already: wait with it.
            Err(RuntimeError::BadRequest(e)) if e.starts_with("already loading") => {
                tracing::debug!("load {model}: {e}")
            }
            Err(e) => return Err(e),
        }
        let mut rx = self.pipeline.watch_active();
        let waited = tokio::time::timeout(wait, async {
            loop {
                if ready(self) {
                    return true;
                }
                // Woken by each new placement; the served model is set
                // before its placement is made.
                if rx.changed().await.is_err() {
                    return false;
                }
            }
        })
        .await;
        match waited {
            Ok(true) => Ok(None),
            Ok(false) => Err(RuntimeError::Stopped),
            Err(_) => Err(RuntimeError::NotPlaced(model.to_string(), wait)),
        }
    }

    /// Waits until a placement is active (for at most `timeout`).
    pub async fn wait_placement(&self, timeout: Duration) -> Option<Placement> {
        let mut rx = self.pipeline.watch_active();
        let found = tokio::time::timeout(timeout, rx.wait_for(|p| p.is_some())).await;
        match found {
            Ok(Ok(p)) => p.as_ref().map(|p| (**p).clone()),
            _ => None,
        }
    }

    /// Timings of the stages this node runs.
    pub fn stage_stats(&self) -> Vec<StageStats> {
        self.pipeline.stats()
    }

    /// Plans the model this node serves over the members that measured it.
    pub async fn plan(&self, req: &PlanRequest) -> Result<PlanReport, RuntimeError> {
        let info = self.profiles.model().ok_or(RuntimeError::NoModel)?;
        let mut workload = req
            .workload(&info.config)
            .map_err(RuntimeError::BadRequest)?;
        let view = self.membership.view().await.ok_or(RuntimeError::Stopped)?;
        let input = planner_input(&self.profiles(&view), &info.times);
        if req.keep_data_home {
            let me = self.id().to_string();
            match &mut workload {
                hearth_partitioner::Workload::Train { home, .. } => {
                    *home = Some(input.node_ids.iter().position(|n| *n == me).ok_or_else(
                        || {
                            RuntimeError::BadRequest(
                                "this node has not measured the model, so it cannot hold the data's ends"
                                    .into(),
                            )
                        },
                    )?);
                }
                _ => {
                    return Err(RuntimeError::BadRequest(
                        "keep_data_home plans training only".into(),
                    ));
                }
            }
        }
        Ok(plan_report(&info.cost, input, workload))
    }

    /// Membership events from now on.
    pub fn events(&self) -> broadcast::Receiver<MembershipEvent> {
        self.membership.events()
    }

    /// Starts a fine-tuning job on this node (it holds the data and
    /// coordinates); it runs when the jobs before it are done.
    pub fn start_job(&self, id: String, spec: JobSpec) -> Result<JobInfo, RuntimeError> {
        spec.check().map_err(RuntimeError::BadRequest)?;
        let job = JobHandle::new(id, spec);
        let info = job
            .info()
            .ok_or_else(|| RuntimeError::BadRequest("job state poisoned".into()))?;
        if let Ok(mut l) = self.job_list.lock() {
            l.push(job.clone());
        }
        job.emit(
            "info",
            format!("Created fine-tuning job: {}", info.id),
            None,
        );
        job.save();
        tokio::spawn(crate::train::job::run(self.jobs.clone(), job));
        Ok(info)
    }

    /// Brings back the jobs whose records lie in `dir`'s subdirectories
    /// (each job's output directory; see [`crate::train::RECORD_FILE`]), so
    /// a restarted node still lists its past jobs. A job that had not ended
    /// comes back failed as interrupted. Jobs this node already has are
    /// skipped; a record that cannot be read is logged and skipped.
    /// Returns how many came back.
    pub fn restore_jobs(&self, dir: &Path) -> usize {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return 0;
        };
        let mut restored: Vec<Arc<JobHandle>> = Vec::new();
        for e in entries.flatten() {
            let path = e.path().join(crate::train::RECORD_FILE);
            if !path.is_file() {
                continue;
            }
            match JobHandle::restore(&path) {
                Ok(job) => {
                    if let Some(i) = job.info()
                        && self.job(&i.id).is_none()
                    {
                        restored.push(job);
                    }
                }
                Err(e) => tracing::warn!("skipping a fine-tuning job: {e}"),
            }
        }
        let n = restored.len();
        if let Ok(mut l) = self.job_list.lock() {
            // Oldest first, as `jobs` promises.
            l.extend(restored);
            l.sort_by_key(|j| j.info().map_or(0, |i| i.created_at));
        }
        n
    }

    /// The jobs this node ran or runs, oldest first.
    pub fn jobs(&self) -> Vec<Arc<JobHandle>> {
        self.job_list.lock().map(|l| l.clone()).unwrap_or_default()
    }

    /// Job `id`, if this node has it.
    pub fn job(&self, id: &str) -> Option<Arc<JobHandle>> {
        self.jobs()
            .into_iter()
            .find(|j| j.info().is_some_and(|i| i.id == id))
    }

    /// Withdraws from discovery and closes every connection, so peers see
    /// this node leave at once rather than after the heartbeat timeout.
    pub async fn shutdown(&self) {
        for d in self.discoveries.iter() {
            d.stop();
        }
        self.profiles.stop();
        for t in self.tasks.iter() {
            t.abort();
        }
        self.pipeline.stop();
        self.membership.stop().await;
        self.endpoint.shutdown().await;
    }
}

/// Sends this node's shared events to every member (best effort: an event
/// that does not arrive in 2 s is dropped).
fn share_with_members(service: Service) -> impl Fn(EventKind) + Send + Sync + 'static {
    let rt = tokio::runtime::Handle::current();
    move |event| {
        let service = service.clone();
        rt.spawn(async move {
            let req = crate::control::Control::Event { event };
            for p in service.endpoint().peers() {
                let (service, req) = (service.clone(), req.clone());
                let id = p.info().node_id.to_string();
                tokio::spawn(async move {
                    let _ =
                        crate::control::request(&service, &id, &req, Duration::from_secs(2)).await;
                });
            }
        });
    }
}

/// Runs `handler` on every incoming stream of one kind.
fn serve_streams<F, Fut>(
    mut streams: mpsc::Receiver<hearth_net::IncomingStream>,
    service: Service,
    handler: F,
) -> tokio::task::AbortHandle
where
    F: Fn(hearth_net::IncomingStream, Service) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    tokio::spawn(async move {
        while let Some(s) = streams.recv().await {
            tokio::spawn(handler(s, service.clone()));
        }
    })
    .abort_handle()
}

/// A LoRA fine-tune whose base is not the served model loads as its merged
/// model file; without one, the base must be loaded first.
fn adapter_of_another_base(
    name: &str,
    base_model: &str,
    entry: &ModelEntry,
) -> Result<(), RuntimeError> {
    if entry.has_model_file() {
        return Ok(());
    }
    Err(RuntimeError::BadRequest(format!(
        "{name} is a LoRA adapter of {base_model}, which the cluster does not serve now: load {base_model}, and {name} is served beside it"
    )))
}
