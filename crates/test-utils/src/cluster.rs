//! An in-process cluster: each node runs on its own tokio runtime (on its
//! own thread), so a test can kill one abruptly (drop its runtime: no close
//! frames, no goodbyes), as SIGKILL would.

use std::net::SocketAddr;
use std::sync::mpsc as std_mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow};
use hearth_discovery::Discovery;
use hearth_net::{ClusterSecret, Identity};
use hearth_runtime::profile::{MeasureOptions, ModelInfo};
use hearth_runtime::{ClusterView, Node, NodeConfig};

/// A node on its own runtime.
pub struct TestNode {
    pub node: Node,
    pub name: String,
    stop: Option<tokio::sync::oneshot::Sender<bool>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl TestNode {
    /// Starts a node named `name` on 127.0.0.1 with these discoveries.
    pub fn start(
        name: &str,
        secret: &ClusterSecret,
        discoveries: Vec<Box<dyn Discovery>>,
    ) -> Result<Self> {
        Self::start_with(name, secret, discoveries, |_| {})
    }

    /// [`TestNode::start`], with `configure` applied to the config last.
    pub fn start_with(
        name: &str,
        secret: &ClusterSecret,
        discoveries: Vec<Box<dyn Discovery>>,
        configure: impl FnOnce(&mut NodeConfig),
    ) -> Result<Self> {
        let mut cfg = NodeConfig::new(name, Identity::generate()?, secret.clone());
        cfg.quic = SocketAddr::from(([127, 0, 0, 1], 0));
        cfg.discoveries = discoveries;
        configure(&mut cfg);
        let (tx, rx) = std_mpsc::channel();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<bool>();
        let thread = std::thread::Builder::new()
            .name(format!("node-{name}"))
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(1)
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = tx.send(Err(anyhow!(e)));
                        return;
                    }
                };
                let started = rt.block_on(Node::start(cfg)).map_err(|e| anyhow!(e));
                let node = started.as_ref().ok().cloned();
                let _ = tx.send(started);
                let graceful = rt.block_on(async { stop_rx.await.unwrap_or(false) });
                if graceful {
                    if let Some(n) = node {
                        rt.block_on(n.shutdown());
                    }
                    rt.shutdown_timeout(Duration::from_secs(1));
                } else {
                    // Abrupt: tasks and sockets vanish without a word.
                    rt.shutdown_background();
                }
            })?;
        let node = rx
            .recv_timeout(Duration::from_secs(10))
            .context("node did not start")??;
        Ok(Self {
            node,
            name: name.to_string(),
            stop: Some(stop_tx),
            thread: Some(thread),
        })
    }

    /// Kills the node abruptly.
    pub fn kill(mut self) {
        self.finish(false);
    }

    /// Shuts the node down gracefully.
    pub fn shutdown(mut self) {
        self.finish(true);
    }

    fn finish(&mut self, graceful: bool) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(graceful);
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }

    /// The node's current view.
    pub async fn view(&self) -> Result<ClusterView> {
        Ok(tokio::time::timeout(Duration::from_secs(5), self.node.view()).await??)
    }
}

impl Drop for TestNode {
    fn drop(&mut self) {
        self.finish(true);
    }
}

/// Polls `views` until `done` holds for all of them, up to `limit`;
/// returns how long it took.
pub async fn wait_for_views(
    nodes: &[&TestNode],
    limit: Duration,
    done: impl Fn(&ClusterView) -> bool,
) -> Result<Duration> {
    let start = Instant::now();
    loop {
        let mut all = true;
        let mut last = Vec::new();
        for n in nodes {
            let v = n.view().await?;
            all &= done(&v);
            last.push(v);
        }
        if all {
            return Ok(start.elapsed());
        }
        if start.elapsed() > limit {
            return Err(anyhow!(
                "condition not reached in {limit:?}; views: {last:#?}"
            ));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Greedy generation of `max_tokens` after the token ids `prompt`.
pub fn greedy(prompt: Vec<u32>, max_tokens: usize) -> hearth_runtime::pipeline::GenerateParams {
    hearth_runtime::pipeline::GenerateParams::new(
        hearth_runtime::pipeline::Prompt::Tokens(prompt),
        max_tokens,
        hearth_models::SamplingParams::default(),
        Vec::new(),
    )
}

/// A tiny random model written under `dir`, measured quickly on this
/// device (cached under `dir`): what a node serving it would hold.
pub fn tiny_model_info(dir: &std::path::Path) -> Result<ModelInfo> {
    let tiny = crate::tiny_model(dir, crate::TinySpec::default())?;
    model_info(&tiny.gguf_q8_0, dir)
}

/// `path` measured quickly on this device (cached under `dir`).
pub fn model_info(path: &std::path::Path, dir: &std::path::Path) -> Result<ModelInfo> {
    let weights = hearth_models::WeightFile::open(path)?;
    let (info, _) = ModelInfo::measure_with(
        &weights,
        &dir.join("profiles"),
        &MeasureOptions::quick(),
        false,
        &mut |_| {},
    )?;
    Ok(info)
}

/// Starts `n` nodes on an in-memory network, each serving `info`, and waits
/// until every one has an active placement of `stages` stages.
pub async fn pipeline_cluster(
    n: usize,
    stages: usize,
    info: &ModelInfo,
    policy: hearth_runtime::pipeline::PlacementPolicy,
) -> Result<Vec<TestNode>> {
    pipeline_cluster_in(&ClusterSecret::generate(), n, stages, info, policy).await
}

/// [`pipeline_cluster`] in the cluster of `secret`.
pub async fn pipeline_cluster_in(
    secret: &ClusterSecret,
    n: usize,
    stages: usize,
    info: &ModelInfo,
    policy: hearth_runtime::pipeline::PlacementPolicy,
) -> Result<Vec<TestNode>> {
    pipeline_cluster_with(secret, n, stages, info, policy, |_, _| {}).await
}

/// [`pipeline_cluster_in`], with `configure(i, cfg)` applied to node `i`'s
/// config last (its compute, another measured profile, ...).
pub async fn pipeline_cluster_with(
    secret: &ClusterSecret,
    n: usize,
    stages: usize,
    info: &ModelInfo,
    policy: hearth_runtime::pipeline::PlacementPolicy,
    configure: impl Fn(usize, &mut NodeConfig),
) -> Result<Vec<TestNode>> {
    let net = hearth_discovery::MemoryNetwork::new();
    let nodes: Vec<TestNode> = (0..n)
        .map(|i| {
            let info = info.clone();
            let policy = policy.clone();
            let configure = &configure;
            TestNode::start_with(
                &format!("n{i}"),
                secret,
                vec![Box::new(net.discovery())],
                move |cfg| {
                    cfg.model = Some(info);
                    cfg.placement = policy;
                    configure(i, cfg);
                },
            )
        })
        .collect::<Result<_>>()?;
    let start = Instant::now();
    loop {
        let ok = nodes
            .iter()
            .all(|t| t.node.placement().is_some_and(|p| p.stages.len() == stages));
        if ok {
            return Ok(nodes);
        }
        if start.elapsed() > Duration::from_secs(60) {
            let got: Vec<_> = nodes.iter().map(|t| t.node.placement()).collect();
            return Err(anyhow!(
                "no {stages}-stage placement on all {n} nodes in 60 s: {got:#?}"
            ));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Runs a generation to its end; returns the tokens' summary.
pub async fn generate_all(
    node: &Node,
    params: hearth_runtime::pipeline::GenerateParams,
    limit: Duration,
) -> Result<hearth_runtime::pipeline::GenSummary> {
    let mut rx = node.generate(params).await?;
    let run = async {
        hearth_runtime::pipeline::finish(&mut rx)
            .await
            .map_err(|e| anyhow!(e))
    };
    tokio::time::timeout(limit, run)
        .await
        .map_err(|_| anyhow!("generation did not finish in {limit:?}"))?
}

/// An authenticated member that speaks nonsense, connected to `a`; no
/// handlers of its own. Its node id is above the leader `a` knows, so it
/// never leads (the lowest id leads; a member that grinds its id lower is
/// out of the trust model's reach). Above the leader, not above every
/// member: an earlier rogue still listed near the top of the id range made
/// 1000 draws above it fail now and then, and the last draw was kept.
pub async fn rogue_member(
    secret: &ClusterSecret,
    a: &TestNode,
) -> Result<(hearth_net::Endpoint, hearth_net::PeerConn)> {
    let leader = a.view().await?.leader;
    let mut identity = hearth_net::Identity::generate()?;
    for _ in 0..1000 {
        if identity.id().to_string() > leader {
            break;
        }
        identity = hearth_net::Identity::generate()?;
    }
    if identity.id().to_string() <= leader {
        return Err(anyhow!("no rogue identity above the leader in 1000 draws"));
    }
    let (rogue, _rx) = hearth_net::Endpoint::bind(
        hearth_net::EndpointConfig {
            identity,
            secret: secret.clone(),
            name: "rogue".into(),
            bind: "127.0.0.1:0".parse()?,
        },
        &[],
    )?;
    let conn = rogue.connect(a.node.endpoint().local_addr()?).await?;
    Ok((rogue, conn))
}

/// A model store for tests: names mapped to models measured under `dir`
/// (as a node's program would supply its own store).
pub struct TestModels {
    /// (name, model file).
    pub models: Vec<(String, std::path::PathBuf)>,
    /// Where measurements are cached.
    pub dir: std::path::PathBuf,
}

impl TestModels {
    /// One tiny random model named `tiny`, written under `dir`.
    pub fn tiny(dir: &std::path::Path) -> Result<std::sync::Arc<Self>> {
        Self::tiny_with(dir, crate::TinySpec::default())
    }

    /// [`TestModels::tiny`] of another shape (a longer context, say).
    pub fn tiny_with(dir: &std::path::Path, spec: crate::TinySpec) -> Result<std::sync::Arc<Self>> {
        let tiny = crate::tiny_model(dir, spec)?;
        Ok(std::sync::Arc::new(Self {
            models: vec![("tiny".into(), tiny.gguf_q8_0)],
            dir: dir.to_path_buf(),
        }))
    }
}

impl hearth_runtime::ModelSource for TestModels {
    fn list(&self) -> Vec<hearth_runtime::ModelEntry> {
        self.models
            .iter()
            .map(|(name, path)| hearth_runtime::ModelEntry::held(name.clone(), path.clone()))
            .collect()
    }

    fn load(&self, name: &str) -> Result<ModelInfo, String> {
        let (_, path) = self
            .models
            .iter()
            .find(|(n, _)| n == name)
            .ok_or_else(|| format!("no model {name}"))?;
        model_info(path, &self.dir).map_err(|e| format!("{e:#}"))
    }

    fn peers_dir(&self) -> Option<std::path::PathBuf> {
        Some(self.dir.join("peers"))
    }

    fn measure_file(&self, path: &std::path::Path) -> Result<ModelInfo, String> {
        model_info(path, &self.dir).map_err(|e| format!("{e:#}"))
    }
}

/// A node's store of one model file, with a fine-tuned models' folder
/// (where LoRA adapters are registered) and a folder for what members send,
/// both under `dir`.
pub struct TunedStore {
    /// The model's name.
    pub name: String,
    /// Its file.
    pub base: std::path::PathBuf,
    pub dir: std::path::PathBuf,
}

impl TunedStore {
    /// The fine-tuned models' folder.
    pub fn tuned(&self) -> std::path::PathBuf {
        self.dir.join("fine-tuned")
    }
}

impl hearth_runtime::ModelSource for TunedStore {
    fn list(&self) -> Vec<hearth_runtime::ModelEntry> {
        vec![hearth_runtime::ModelEntry::held(
            self.name.clone(),
            self.base.clone(),
        )]
    }

    fn load(&self, name: &str) -> Result<ModelInfo, String> {
        if name != self.name {
            return Err(format!("no model {name}"));
        }
        model_info(&self.base, &self.dir).map_err(|e| format!("{e:#}"))
    }

    fn models_dir(&self) -> Option<std::path::PathBuf> {
        Some(self.tuned())
    }

    fn peers_dir(&self) -> Option<std::path::PathBuf> {
        Some(self.dir.join("peers"))
    }
}
