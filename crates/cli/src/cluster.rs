//! `hearth up`, `hearth token`, `hearth status`: run a node, show the join
//! token, show a running node's view of the cluster.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use hearth_discovery::{Discovery, MdnsDiscovery, StaticDiscovery};
use hearth_models::dirs::Dirs;
use hearth_net::{ClusterSecret, Identity};
use hearth_runtime::pipeline::{Placement, PlacementPolicy};
use hearth_runtime::{
    ClusterView, FirstModel, MemberState, MembershipEvent, ModelProgress, Node, NodeConfig,
};

/// Default QUIC address: every interface, so the LAN can reach the node.
pub const DEFAULT_QUIC: &str = "0.0.0.0:7410";
/// Default HTTP address: loopback only (another address needs an API key).
pub const DEFAULT_HTTP: &str = "127.0.0.1:7411";

pub use crate::args::HomeArg;

fn secret_path(home: &Path) -> PathBuf {
    home.join("cluster").join("secret")
}

#[derive(Debug, clap::Args)]
pub struct UpArgs {
    /// Name shown to other members [default: the host name].
    #[arg(long)]
    name: Option<String>,
    /// UDP address of the QUIC endpoint.
    #[arg(long, value_name = "ADDR", default_value = DEFAULT_QUIC)]
    quic: SocketAddr,
    /// Address of the HTTP API and the web UI. On an address other than
    /// loopback every API request needs the API key.
    #[arg(long, value_name = "ADDR", default_value = DEFAULT_HTTP)]
    http: SocketAddr,
    /// Also serve an Ollama-compatible API (`/api/chat`, `/api/generate`,
    /// `/api/tags`, ...) on this address, e.g. 127.0.0.1:11434 [default:
    /// off]. It takes the same API key as the HTTP API.
    #[arg(long, value_name = "ADDR")]
    ollama: Option<SocketAddr>,
    /// Bearer token for the HTTP API (required off loopback; one is
    /// generated and printed when absent).
    #[arg(
        long,
        value_name = "KEY",
        env = "HEARTH_API_KEY",
        hide_env_values = true
    )]
    api_key: Option<String>,
    /// A member to join directly (repeatable); for networks without multicast.
    #[arg(long = "peer", value_name = "HOST:PORT")]
    peers: Vec<String>,
    /// Join the cluster of this token (from `hearth token` on a member).
    #[arg(long, value_name = "TOKEN")]
    join: Option<String>,
    /// With --join: replace this device's saved cluster secret when it is
    /// of another cluster (without it, that is an error: the device would
    /// leave its cluster for good).
    #[arg(long, requires = "join")]
    leave_cluster: bool,
    /// Do not use mDNS (only --peer addresses and gossip).
    #[arg(long)]
    no_mdns: bool,
    /// The model this node serves and measures itself on: a .gguf file, a
    /// model directory, or the default model's name (fetched when missing).
    #[arg(long)]
    model: Option<String>,
    /// A Jinja chat template file used in place of the served model's own
    /// (for a model that ships none, or a fixed one).
    #[arg(long, value_name = "FILE")]
    chat_template: Option<PathBuf>,
    /// Take the model from a member of the cluster instead of the internet:
    /// only the file's header and the tensors this node needs are sent.
    #[arg(long, conflicts_with = "model")]
    from_peers: bool,
    /// Start N nodes in this process (real QUIC on loopback, their own
    /// cluster under HOME/local) and split the model across them.
    #[arg(long, value_name = "N")]
    local: Option<usize>,
    /// How the leader splits the model: `plan` (the partitioner over
    /// measured profiles) or `even` (equal layer ranges over every node)
    /// [default: plan; even with --local, whose nodes share one machine].
    #[arg(long, value_name = "HOW")]
    split: Option<Split>,
    #[command(flatten)]
    backend: BackendArg,
    #[command(flatten)]
    home: HomeArg,
}

#[derive(Debug, clap::Args)]
pub struct BackendArg {
    /// What this node runs its inference stages on: `cpu`, `wgpu` (a GPU
    /// through Vulkan, Metal or DX12; software adapters too) or `auto` (a
    /// hardware GPU when there is one, else the CPU). The model is measured
    /// on the same, so the planner weighs the device by its real speed.
    #[arg(long, value_name = "BACKEND", default_value = "auto", value_parser = parse_backend)]
    pub backend: hearth_runtime::Backend,
    /// With `wgpu` or `auto`: the GPU whose adapter name contains NAME
    /// (case-insensitive; `hearth profile` lists them), for a machine with
    /// several. A named GPU that is missing is an error, not a CPU fallback.
    #[arg(long, value_name = "NAME")]
    pub gpu: Option<String>,
}

fn parse_backend(s: &str) -> Result<hearth_runtime::Backend, String> {
    s.parse()
}

impl BackendArg {
    /// Opens the chosen compute device and says which it is.
    pub fn resolve(&self) -> Result<hearth_runtime::Compute> {
        let compute = hearth_runtime::Compute::resolve(self.backend, self.gpu.as_deref())
            .with_context(|| match &self.gpu {
                Some(name) => format!("--backend {:?} --gpu {name:?}", self.backend),
                None => format!("--backend {:?}", self.backend),
            })?;
        Ok(compute)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Split {
    Plan,
    Even,
}

impl Split {
    fn policy(self) -> PlacementPolicy {
        match self {
            Self::Plan => PlacementPolicy::default(),
            Self::Even => PlacementPolicy::Even,
        }
    }
}

/// The model store of the node whose folders are `dirs`, measuring on
/// `compute`.
fn model_store(dirs: &Dirs, compute: &hearth_runtime::Compute) -> Arc<hearth_runtime::ModelStore> {
    Arc::new(hearth_runtime::ModelStore::new(
        dirs,
        crate::profile::measure_options(compute),
    ))
}

/// Prints what getting the first model reports, with progress bars.
fn model_reporter() -> Arc<dyn Fn(ModelProgress) + Send + Sync> {
    let pull = std::sync::Mutex::new(crate::models::progress_printer());
    let received: std::sync::Mutex<Option<(u64, indicatif::ProgressBar)>> =
        std::sync::Mutex::new(None);
    // A spinner with the measuring step, cleared once the model is served.
    let measuring: std::sync::Mutex<Option<indicatif::ProgressBar>> = std::sync::Mutex::new(None);
    let done_measuring = move |m: &std::sync::Mutex<Option<indicatif::ProgressBar>>| {
        if let Some(b) = m.lock().ok().and_then(|mut b| b.take()) {
            b.finish_and_clear();
        }
    };
    Arc::new(move |p| match p {
        ModelProgress::Pull(e) => {
            if let Ok(mut f) = pull.lock() {
                f(e);
            }
        }
        ModelProgress::Received { done, total } => {
            let Ok(mut bar) = received.lock() else { return };
            if bar.as_ref().is_none_or(|(t, _)| *t != total) {
                let b = indicatif::ProgressBar::new(total);
                if let Ok(style) = indicatif::ProgressStyle::with_template(
                    "receiving weights {bar:40} {bytes}/{total_bytes} {bytes_per_sec}",
                ) {
                    b.set_style(style);
                }
                *bar = Some((total, b));
            }
            if let Some((_, b)) = bar.as_ref() {
                b.set_position(done);
                if done >= total {
                    b.finish_and_clear();
                }
            }
        }
        ModelProgress::Measuring(step) => {
            if let Ok(mut bar) = measuring.lock() {
                bar.get_or_insert_with(crate::profile::spinner)
                    .set_message(format!("measuring the model: {step}"));
            }
        }
        ModelProgress::Served {
            info,
            cached,
            from_peers,
        } => {
            done_measuring(&measuring);
            let t = &info.times;
            println!(
                "  model      {} ({} layers){}: {:.3} ms per layer per decoded token{}",
                t.model,
                info.cost.layers.len(),
                if from_peers {
                    " received from a member and measured"
                } else {
                    ""
                },
                t.layer.decode_s * 1e3,
                if cached { " (cached profile)" } else { "" }
            );
        }
        ModelProgress::Waiting(why) => tracing::debug!("no model from peers yet: {why}"),
        ModelProgress::Failed(why) => {
            done_measuring(&measuring);
            eprintln!("warning: cannot serve the model: {why}")
        }
    })
}

/// Where this device's API key is saved (mode 0600).
fn key_path(home: &Path) -> PathBuf {
    home.join("api_key")
}

/// This device's saved API key: made and saved the first time, replaced
/// with `rotate`. It stays the same across restarts, so configured clients
/// keep working.
fn saved_api_key(home: &Path, rotate: bool) -> Result<String> {
    let path = key_path(home);
    if !rotate && let Ok(text) = std::fs::read_to_string(&path) {
        let key = text.trim();
        if key.len() >= 32 && key.bytes().all(|b| b.is_ascii_graphic()) {
            return Ok(key.to_string());
        }
        tracing::warn!(
            "{} does not hold a usable key; making a new one",
            path.display()
        );
    }
    let key = hearth_server::new_api_key();
    hearth_models::durable::write(&path, format!("{key}\n").as_bytes())
        .with_context(|| format!("saving the API key to {}", path.display()))?;
    Ok(key)
}

/// The API key to require: the given one, else (off loopback) this
/// device's saved one.
fn api_key(http: SocketAddr, given: Option<String>, home: &Path) -> Result<Option<String>> {
    Ok(match given.filter(|k| !k.trim().is_empty()) {
        Some(k) => Some(k.trim().to_string()),
        None if !http.ip().is_loopback() => Some(saved_api_key(home, false)?),
        None => None,
    })
}

/// Starts the HTTP server (and the Ollama-compatible one when its listener
/// is given); returns the task and the switch that stops both.
fn serve_http(
    listener: hearth_server::Listener,
    ollama: Option<hearth_server::Listener>,
    node: Node,
    api_key: Option<String>,
    data_dir: PathBuf,
) -> (
    tokio::task::JoinHandle<Result<(), hearth_server::ServerError>>,
    tokio::sync::oneshot::Sender<()>,
) {
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let (both_tx, mut both_rx) = tokio::sync::watch::channel(false);
    let app = hearth_server::App::new(
        node,
        hearth_server::ServerOptions {
            api_key,
            data_dir,
            ..Default::default()
        },
    );
    if let Some(l) = ollama {
        let (router, limits) = (app.ollama_router(), app.limits());
        tokio::spawn(async move {
            let stop = async move {
                let _ = both_rx.wait_for(|s| *s).await;
            };
            // The main server's stop tells the streams both serve to end.
            if let Err(e) = l.serve_router(router, limits, stop, || {}).await {
                tracing::warn!("the Ollama-compatible API stopped: {e}");
            }
        });
    }
    let server = tokio::spawn(listener.serve(app, async move {
        let _ = stop_rx.await;
        let _ = both_tx.send(true);
    }));
    (server, stop_tx)
}

/// Prints where the UI and API are, and the key if one is required.
fn print_http(http: SocketAddr, key: Option<&str>, given: bool) {
    println!("  web UI     http://{http}/");
    println!("  API        http://{http}/v1 (OpenAI-compatible)");
    if let Some(k) = key {
        if given {
            println!("  API key    required (from --api-key / HEARTH_API_KEY)");
        } else {
            println!(
                "  API key    {k}   (this address is reachable off this machine; \
                 `hearth key` shows it, `hearth key --rotate` replaces it)"
            );
        }
    }
}

/// Stops the HTTP server (open streams get the grace period), then the nodes.
async fn stop_all(
    nodes: &[Node],
    server: tokio::task::JoinHandle<Result<(), hearth_server::ServerError>>,
    stop: tokio::sync::oneshot::Sender<()>,
) {
    let _ = stop.send(());
    let grace = hearth_server::SHUTDOWN_GRACE + Duration::from_secs(2);
    let _ = tokio::time::timeout(grace, server).await;
    for node in nodes {
        node.shutdown().await;
    }
}

pub fn host_name() -> String {
    sysinfo::System::host_name()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "hearth".into())
}

/// The cluster secret: from `--join`, else the saved one, else a new one.
/// A saved secret of another cluster is replaced only with `leave`.
fn cluster_secret(
    home: &Path,
    join: Option<&str>,
    leave: bool,
) -> Result<(ClusterSecret, &'static str)> {
    let path = secret_path(home);
    if let Some(token) = join {
        let secret: ClusterSecret = token.parse().context("--join")?;
        let old = path
            .exists()
            .then(|| ClusterSecret::load(&path))
            .transpose()?;
        match old {
            Some(old) if old == secret => return Ok((secret, "saved")),
            Some(_) if !leave => bail!(
                "{} holds the secret of another cluster; joining this one would leave it for good. \
                 Add --leave-cluster to do so, or use another --home",
                path.display()
            ),
            _ => {
                secret.save(&path)?;
                return Ok((secret, "joined with --join"));
            }
        }
    }
    let (secret, created) = ClusterSecret::load_or_create(&path)?;
    Ok((secret, if created { "new" } else { "saved" }))
}

pub fn up(args: UpArgs) -> Result<()> {
    if let Some(n) = args.local {
        return up_local(args, n);
    }
    let dirs = args.home.dirs();
    let home = dirs.config.clone();
    let (secret, origin) = cluster_secret(&home, args.join.as_deref(), args.leave_cluster)?;
    let identity = Identity::load_or_create(&home.join("node"))?;
    let name = args.name.clone().unwrap_or_else(host_name);
    let mut discoveries: Vec<Box<dyn Discovery>> = Vec::new();
    if !args.peers.is_empty() {
        discoveries.push(Box::new(StaticDiscovery::new(args.peers.clone())?));
    }
    if !args.no_mdns {
        discoveries.push(Box::new(MdnsDiscovery::new()));
    }
    let compute = args.backend.resolve()?;
    let template = crate::generate::read_template(args.chat_template.as_deref())?;
    let rt = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    rt.block_on(async move {
        let mut cfg = NodeConfig::new(name.clone(), identity, secret.clone());
        cfg.quic = args.quic;
        cfg.discoveries = discoveries;
        cfg.placement = args.split.unwrap_or(Split::Plan).policy();
        let store = model_store(&dirs, &compute);
        cfg.models = Some(store.clone());
        cfg.compute = compute.clone();
        cfg.chat_template = template.clone();
        let listener = hearth_server::Listener::bind(args.http).await?;
        let node = Node::start(cfg).await?;
        let quic = node.endpoint().local_addr()?;
        let http = listener.local_addr().unwrap_or(args.http);
        let mut events = node.events();
        let discovery = match (args.no_mdns, args.peers.len()) {
            (false, 0) => "mDNS".to_string(),
            (false, n) => format!("mDNS + {n} static peer(s)"),
            (true, 0) => "none (waiting to be dialed)".to_string(),
            (true, n) => format!("{n} static peer(s)"),
        };
        println!("hearth node {name:?} ({})", node.id().short());
        println!("  cluster    {} ({origin})", secret.cluster_id());
        if origin == "new" {
            println!(
                "             other devices join with: hearth up --join <token from `hearth token`>"
            );
        }
        println!("  QUIC       {quic}");
        // A key is needed when either API is reachable off this machine.
        let exposed = args
            .ollama
            .filter(|a| !a.ip().is_loopback())
            .unwrap_or(http);
        let key = api_key(exposed, args.api_key.clone(), &home)?;
        print_http(http, key.as_deref(), args.api_key.is_some());
        println!("  discovery  {discovery}");
        println!("  compute    {}", compute.name());
        let placements = tokio::spawn(print_placements(node.clone()));
        let ollama = match args.ollama {
            Some(a) => Some(hearth_server::Listener::bind(a).await?),
            None => None,
        };
        if let Some(a) = ollama.as_ref().and_then(|l| l.local_addr()) {
            println!("  Ollama API http://{a} (Ollama-compatible)");
        }
        let (server, stop_tx) = serve_http(listener, ollama, node.clone(), key, dirs.node_data());
        // Get and measure the model in the background: the node is a
        // member at once, and offers its times when they are known.
        let first = if args.from_peers {
            FirstModel::Peers(store.peers_dir())
        } else {
            FirstModel::Store(args.model.clone())
        };
        let model = node.start_model(store, first, model_reporter());
        let printer = tokio::spawn(async move {
            loop {
                match events.recv().await {
                    Ok(MembershipEvent::Joined(m)) => {
                        println!(
                            "+ {} ({}) joined from {}",
                            m.name,
                            short(&m.node_id),
                            m.address
                        )
                    }
                    Ok(MembershipEvent::Left {
                        node_id,
                        name,
                        reason,
                    }) => {
                        println!("- {name} ({}) left: {reason}", node_id.short())
                    }
                    Ok(MembershipEvent::LeaderChanged(id)) => {
                        println!("  leader is now {}", id.short())
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(_) => break,
                }
            }
        });
        wait_for_signal().await;
        println!("shutting down");
        stop_all(std::slice::from_ref(&node), server, stop_tx).await;
        printer.abort();
        placements.abort();
        model.abort();
        anyhow::Ok(())
    })
}

/// "MODEL in N stage(s): a layers 0..10 → b layers 10..30".
fn describe(p: &Placement) -> String {
    let split: Vec<String> = p
        .stages
        .iter()
        .map(|s| format!("{} layers {}..{}", s.name, s.spec.start, s.spec.end))
        .collect();
    format!(
        "{} in {} stage(s): {}",
        p.model,
        p.stages.len(),
        split.join(" → ")
    )
}

/// Prints each placement as it becomes active.
async fn print_placements(node: Node) {
    let mut last = None;
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let p = node.placement();
        let id = p.as_ref().map(|p| p.id);
        if id == last {
            continue;
        }
        last = id;
        match p {
            Some(p) => println!("  serving    {}", describe(&p)),
            None => println!("  serving    nothing (re-placing the model)"),
        }
    }
}

/// `hearth up --local N`: N nodes in this process, one cluster, one model.
fn up_local(args: UpArgs, n: usize) -> Result<()> {
    if !(1..=16).contains(&n) {
        bail!("--local takes 1 to 16 nodes, got {n}");
    }
    if !args.peers.is_empty() || args.join.is_some() {
        bail!("--local starts its own cluster: it takes neither --peer nor --join");
    }
    let device = args.home.dirs();
    let dirs = device.sub("local");
    let home = dirs.config.clone();
    let (secret, _) = ClusterSecret::load_or_create(&secret_path(&home))?;
    let policy = args.split.unwrap_or(Split::Even).policy();
    let host = args.name.clone().unwrap_or_else(host_name);
    let compute = args.backend.resolve()?;
    let template = crate::generate::read_template(args.chat_template.as_deref())?;
    let rt = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    rt.block_on(async move {
        let listener = hearth_server::Listener::bind(args.http).await?;
        let http = listener.local_addr().unwrap_or(args.http);
        let mut nodes: Vec<Node> = Vec::new();
        let mut first: Option<SocketAddr> = None;
        for i in 0..n {
            let identity = Identity::load_or_create(&home.join(format!("node-{i}")).join("node"))?;
            let mut cfg = NodeConfig::new(format!("{host}-{i}"), identity, secret.clone());
            cfg.quic = SocketAddr::from(([127, 0, 0, 1], 0));
            cfg.placement = policy.clone();
            // The device's models; what this cluster fine-tunes, its own.
            cfg.models = Some(Arc::new(
                hearth_runtime::ModelStore::new(&device, crate::profile::measure_options(&compute))
                    .fine_tuned_in(dirs.fine_tuned()),
            ));
            cfg.compute = compute.clone();
            cfg.chat_template = template.clone();
            if let Some(a) = first {
                cfg.discoveries = vec![Box::new(StaticDiscovery::new(vec![a.to_string()])?)];
            }
            let node = Node::start(cfg).await?;
            first.get_or_insert(node.endpoint().local_addr()?);
            nodes.push(node);
        }
        println!(
            "hearth: {n} local node(s) on loopback, stages on {}",
            compute.name()
        );
        for node in &nodes {
            println!(
                "  {} ({})  QUIC {}",
                node.endpoint().name(),
                node.id().short(),
                node.endpoint().local_addr()?
            );
        }
        // A key is needed when either API is reachable off this machine.
        let exposed = args
            .ollama
            .filter(|a| !a.ip().is_loopback())
            .unwrap_or(http);
        let key = api_key(exposed, args.api_key.clone(), &home)?;
        print_http(http, key.as_deref(), args.api_key.is_some());
        let ollama = match args.ollama {
            Some(a) => Some(hearth_server::Listener::bind(a).await?),
            None => None,
        };
        if let Some(a) = ollama.as_ref().and_then(|l| l.local_addr()) {
            println!("  Ollama API http://{a} (Ollama-compatible)");
        }
        let (server, stop_tx) =
            serve_http(listener, ollama, nodes[0].clone(), key, dirs.node_data());
        let placements = tokio::spawn(print_placements(nodes[0].clone()));
        let profiler = {
            let nodes = nodes.clone();
            let model = args.model.clone();
            let compute = compute.clone();
            let device = device.clone();
            tokio::task::spawn_blocking(move || {
                match crate::profile::measure_model(&device, model.as_deref(), false, &compute) {
                    Ok((info, _)) => {
                        println!(
                            "  model      {} ({} layers) measured; placing it across the nodes",
                            info.times.model,
                            info.cost.layers.len()
                        );
                        for node in &nodes {
                            if let Err(e) = node.set_model(info.clone()) {
                                eprintln!("warning: cannot serve the model: {e}");
                            }
                        }
                    }
                    Err(e) => eprintln!("error: no model to serve: {e:#}"),
                }
            })
        };
        let ready = {
            let node = nodes[0].clone();
            tokio::spawn(async move {
                if node
                    .wait_placement(Duration::from_secs(3600))
                    .await
                    .is_some()
                {
                    println!(
                        "ready: hearth generate --cluster {http} --prompt \"Why is the sky blue?\""
                    );
                }
            })
        };
        wait_for_signal().await;
        println!("shutting down");
        stop_all(&nodes, server, stop_tx).await;
        placements.abort();
        ready.abort();
        drop(profiler);
        anyhow::Ok(())
    })
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}

#[derive(Debug, clap::Args)]
pub struct TokenArgs {
    #[command(flatten)]
    home: HomeArg,
}

pub fn token(args: TokenArgs) -> Result<()> {
    let path = secret_path(&args.home.dirs().config);
    if !path.exists() {
        bail!(
            "this device is in no cluster yet: run `hearth up` to create one, or `hearth up --join TOKEN` to join one"
        );
    }
    println!("{}", ClusterSecret::load(&path)?.token());
    Ok(())
}

#[derive(Debug, clap::Args)]
pub struct KeyArgs {
    /// Replace the key with a new one (running nodes keep the old one until
    /// restarted).
    #[arg(long)]
    rotate: bool,
    #[command(flatten)]
    home: HomeArg,
}

/// Prints this device's API key (made the first time), or a new one.
pub fn key(args: KeyArgs) -> Result<()> {
    let home = args.home.dirs().config;
    let key = saved_api_key(&home, args.rotate)?;
    println!("{key}");
    if args.rotate {
        eprintln!(
            "saved in {}; restart `hearth up` to require it",
            key_path(&home).display()
        );
    }
    Ok(())
}

#[derive(Debug, clap::Args)]
pub struct StatusArgs {
    /// HTTP address of the node to ask.
    #[arg(long, value_name = "ADDR", default_value = DEFAULT_HTTP)]
    http: String,
    /// Print the raw JSON view.
    #[arg(long)]
    json: bool,
}

/// `ADDR` or a URL as the base URL of a node's HTTP API.
pub fn base_url(http: &str) -> String {
    let base = if http.starts_with("http://") || http.starts_with("https://") {
        http.to_string()
    } else {
        format!("http://{http}")
    };
    base.trim_end_matches('/').to_string()
}

pub fn status(args: StatusArgs) -> Result<()> {
    let base = base_url(&args.http);
    let url = format!("{base}/api/cluster");
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(5)))
        .build()
        .into();
    let mut resp = agent
        .get(&url)
        .call()
        .with_context(|| format!("no Hearth node answers at {base} (is `hearth up` running?)"))?;
    let view: ClusterView = resp
        .body_mut()
        .read_json()
        .with_context(|| format!("{url} did not return a cluster view"))?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&view)?);
        return Ok(());
    }
    print!("{}", render(&view));
    Ok(())
}

/// The first 8 characters of an id (from a node's JSON: any text, so never
/// sliced by bytes).
fn short(id: &str) -> String {
    id.chars().take(8).collect()
}

fn render(v: &ClusterView) -> String {
    let leader = v
        .members
        .iter()
        .find(|m| m.leader)
        .map_or(String::new(), |m| format!(" ({})", m.name));
    let mut out = format!(
        "cluster {} · {} member(s) · leader {}{leader}\n",
        v.cluster_id,
        v.members.len(),
        short(&v.leader)
    );
    let rows: Vec<[String; 6]> = v
        .members
        .iter()
        .map(|m| {
            [
                format!("{}{}", if m.leader { "*" } else { " " }, short(&m.node_id)),
                m.name.clone(),
                m.address.clone(),
                match m.state {
                    MemberState::Local => "self".into(),
                    MemberState::Alive => "alive".into(),
                },
                match m.state {
                    MemberState::Local => "-".into(),
                    MemberState::Alive => {
                        format!("{:.1}s ago", m.last_heartbeat_age_ms as f64 / 1e3)
                    }
                },
                m.rtt_ms.map_or("-".into(), |r| format!("{r:.2} ms")),
            ]
        })
        .collect();
    let header = ["NODE", "NAME", "ADDRESS", "STATE", "HEARTBEAT", "RTT"].map(String::from);
    let mut widths = [0usize; 6];
    for r in std::iter::once(&header).chain(&rows) {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    for r in std::iter::once(&header).chain(&rows) {
        let line: Vec<String> = r
            .iter()
            .zip(widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    match &v.placement {
        Some(p) => out.push_str(&format!("serving {}\n", describe(p))),
        None => {
            out.push_str("serving nothing yet (the model is being fetched, measured or placed)\n")
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use hearth_runtime::MemberView;

    #[test]
    fn joining_another_cluster_over_a_saved_secret_needs_leave_cluster() {
        let home = tempfile::tempdir().unwrap();
        let a = ClusterSecret::generate().token();
        let b = ClusterSecret::generate().token();
        let (s, how) = cluster_secret(home.path(), Some(&a), false).unwrap();
        assert_eq!((s.token(), how), (a.clone(), "joined with --join"));
        // The same token again, or none: the saved secret.
        assert_eq!(
            cluster_secret(home.path(), Some(&a), false).unwrap().1,
            "saved"
        );
        assert_eq!(
            cluster_secret(home.path(), None, false).unwrap().0.token(),
            a
        );
        // Another cluster's token: refused, and the saved secret stays.
        let e = cluster_secret(home.path(), Some(&b), false).unwrap_err();
        assert!(e.to_string().contains("--leave-cluster"), "{e}");
        assert_eq!(
            ClusterSecret::load(&secret_path(home.path()))
                .unwrap()
                .token(),
            a
        );
        // Unless asked to leave.
        let (s, _) = cluster_secret(home.path(), Some(&b), true).unwrap();
        assert_eq!(s.token(), b);
        assert_eq!(
            ClusterSecret::load(&secret_path(home.path()))
                .unwrap()
                .token(),
            b
        );
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
            let path = secret_path(home.path());
            assert_eq!(mode(&path), 0o600);
            assert_eq!(mode(path.parent().unwrap()), 0o700);
        }
    }

    #[test]
    fn an_address_off_loopback_always_gets_an_api_key() {
        let lan: SocketAddr = "0.0.0.0:7411".parse().unwrap();
        let local: SocketAddr = "127.0.0.1:7411".parse().unwrap();
        let home = tempfile::tempdir().unwrap();
        let h = home.path();
        let generated = api_key(lan, None, h).unwrap().unwrap();
        assert_eq!(generated.len(), 64);
        // Saved: the same key after a restart, until rotated.
        assert_eq!(api_key(lan, None, h).unwrap(), Some(generated.clone()));
        let rotated = saved_api_key(h, true).unwrap();
        assert_ne!(rotated, generated);
        assert_eq!(api_key(lan, None, h).unwrap(), Some(rotated));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(key_path(h)).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        assert_eq!(
            api_key(lan, Some(" k ".into()), h).unwrap().as_deref(),
            Some("k")
        );
        assert!(api_key(lan, Some("  ".into()), h).unwrap().is_some());
        assert_eq!(api_key(local, None, h).unwrap(), None);
        assert_eq!(
            api_key(local, Some("k".into()), h).unwrap().as_deref(),
            Some("k")
        );
    }

    #[test]
    fn render_takes_any_text_from_the_server() {
        let odd = "é".repeat(9);
        let v = ClusterView {
            node_id: odd.clone(),
            name: "x".into(),
            cluster_id: "c".into(),
            leader: "ab".into(),
            members: vec![MemberView {
                node_id: odd,
                name: "n".into(),
                address: "a".into(),
                state: MemberState::Alive,
                version: 1,
                last_heartbeat_age_ms: 1200,
                rtt_ms: Some(0.5),
                leader: true,
            }],
            profiles: None,
            placement: None,
            predicted_now: None,
        };
        let out = render(&v);
        assert!(
            out.contains("*éééééééé") && out.contains("1.2s ago"),
            "{out}"
        );
    }
}
