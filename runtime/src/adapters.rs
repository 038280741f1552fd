//! Fine-tunes served as their base model plus a LoRA adapter, many at
//! once: asking for one never reloads the cluster.
//!
//! - **The store.** A LoRA job registers its adapter beside the fine-tuned
//!   models as `<name>.lora/` (PEFT's `adapter_config.json` and
//!   `adapter_model.safetensors`, plus [`RECORD_FILE`] naming the base
//!   model's content id and the adapter's id). The id is a BLAKE3 over both
//!   files ([`adapter_id`]), so a copy is proven byte for byte. Members
//!   learn of it from the holder's catalog ([`AdapterFacts`]).
//! - **A request** for the fine-tune, while its base is the served model,
//!   runs on the active placement with the adapter's id in its sequence
//!   parameters. Before the first such request on a placement, the
//!   requester asks every member that runs a stage (or a replica) of it to
//!   prepare the adapter ([`ensure_prepared`]): a member without the files
//!   receives them from a holder over a `WEIGHTS` stream (bounded, checked
//!   against the id), and loads its stage's slice of them.
//! - **A stage** keeps the slices it prepared ([`StageAdapters`], at most
//!   [`MAX_STAGE_ADAPTERS`]) and applies each sequence's own to that
//!   sequence's rows of a batch (`hearth_models::adapter`).

use std::collections::HashSet;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use hearth_models::StageAdapter;
use hearth_net::framed::{read_message, write_message};
use hearth_net::{Endpoint, NodeId};
use hearth_proto::{Message, limits, stream_kind};
use serde::{Deserialize, Serialize};
use tracing::{debug, info, warn};

use crate::control::{Control, read_control, write_control};
use crate::pipeline::PipelineError;
use crate::pipeline::service::Service;
use crate::placement::Placement;

/// The record in an adapter's folder.
pub const RECORD_FILE: &str = "hearth-adapter.json";
/// What an adapter's folder name ends with, after the fine-tune's name.
pub const DIR_SUFFIX: &str = ".lora";
const CONFIG_FILE: &str = "adapter_config.json";
const WEIGHTS_FILE: &str = "adapter_model.safetensors";
/// Largest `adapter_config.json` stored or received.
pub const MAX_CONFIG_BYTES: u64 = 1 << 20;
/// Largest adapter weights file stored or received.
pub const MAX_WEIGHTS_BYTES: u64 = hearth_models::adapter::MAX_ADAPTER_BYTES;
/// Most adapters one stage holds; preparing another drops the one prepared
/// longest ago (sequences running with it keep their copy).
pub const MAX_STAGE_ADAPTERS: usize = 64;
/// Format of [`RECORD_FILE`].
const RECORD_FORMAT: u32 = 1;
/// Largest record read.
const MAX_RECORD_BYTES: u64 = 64 * 1024;
/// Bytes per `FileChunk` sent.
const CHUNK: usize = 1 << 20;
/// Longest a transfer may take.
const FETCH_TIMEOUT: Duration = Duration::from_secs(600);
/// How long a member has to prepare an adapter (receiving it included).
const PREPARE_WAIT: Duration = Duration::from_secs(300);
/// Most (placement, adapter) pairs a requester remembers as prepared.
const MAX_PREPARED: usize = 4096;

/// An adapter's folder record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AdapterRecord {
    pub format: u32,
    /// The fine-tune's name (what requests ask for).
    pub name: String,
    /// [`adapter_id`] of its files.
    pub id: String,
    /// Content id of the base model it was trained on.
    pub base_content: String,
    /// The base model's name.
    pub base_model: String,
    /// Bytes of its weights file.
    pub bytes: u64,
}

/// What a holder's catalog says of a model that is an adapter.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AdapterFacts {
    pub id: String,
    /// Content id of its base model.
    pub base_content: String,
    pub base_model: String,
}

/// A fine-tune to serve as its base plus this adapter.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AdapterRef {
    pub name: String,
    pub id: String,
    pub base_content: String,
    /// The members (node ids) that hold its files (at most
    /// `sharing::MAX_HOLDERS`).
    #[serde(default)]
    pub holders: Vec<String>,
}

impl AdapterRef {
    /// Checks a reference from a peer: bounded and well formed.
    pub(crate) fn check(&self) -> Result<(), String> {
        hearth_proto::check_adapter_id(&self.id).map_err(|e| e.to_string())?;
        check_name(&self.name)?;
        if self.base_content.len() > 128 || self.base_content.chars().any(char::is_control) {
            return Err("an adapter's base content id is malformed".into());
        }
        if self.holders.len() > crate::sharing::MAX_HOLDERS
            || self.holders.iter().any(|h| h.len() > 128)
        {
            return Err(format!(
                "an adapter naming {} holders (at most {})",
                self.holders.len(),
                crate::sharing::MAX_HOLDERS
            ));
        }
        Ok(())
    }
}

/// A fine-tune's name as a folder name: a plain name, never a path.
fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty()
        || name.len() > crate::sharing::MAX_NAME
        || name.starts_with('.')
        || name.contains(['/', '\\'])
        || name.chars().any(char::is_control)
    {
        return Err(format!("{name:?} is not a plain fine-tune name"));
    }
    Ok(())
}

/// The id of an adapter whose files hold these bytes: BLAKE3 of a domain
/// tag, then each file's length and bytes (config first), as hex.
pub fn adapter_id(config: &[u8], weights: &[u8]) -> String {
    let mut h = IdHasher::new(config.len() as u64);
    h.update(config);
    h.weights(weights.len() as u64);
    h.update(weights);
    h.finish()
}

/// [`adapter_id`] fed piece by piece: the config's bytes, then (after
/// [`IdHasher::weights`]) the weights'.
struct IdHasher(blake3::Hasher);

impl IdHasher {
    fn new(config_len: u64) -> Self {
        let mut h = blake3::Hasher::new();
        h.update(b"hearth lora adapter v1\0");
        h.update(&config_len.to_le_bytes());
        Self(h)
    }
    fn weights(&mut self, len: u64) {
        self.0.update(&len.to_le_bytes());
    }
    fn update(&mut self, b: &[u8]) {
        self.0.update(b);
    }
    fn finish(self) -> String {
        self.0.finalize().to_hex().to_string()
    }
}

fn len_within(path: &Path, max: u64) -> Result<u64, String> {
    let len = std::fs::metadata(path)
        .map_err(|e| format!("{}: {e}", path.display()))?
        .len();
    if len > max {
        return Err(format!(
            "{} has {len} bytes (at most {max})",
            path.display()
        ));
    }
    Ok(len)
}

/// [`adapter_id`] of the PEFT files in `dir`, read in chunks, and the
/// weights file's length.
fn id_of_dir(dir: &Path) -> Result<(String, u64), String> {
    let (config, weights) = (dir.join(CONFIG_FILE), dir.join(WEIGHTS_FILE));
    let config_len = len_within(&config, MAX_CONFIG_BYTES)?;
    let weights_len = len_within(&weights, MAX_WEIGHTS_BYTES)?;
    let mut h = IdHasher::new(config_len);
    let feed = |path: &Path, len: u64, h: &mut IdHasher| -> Result<(), String> {
        let mut f = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let mut buf = vec![0u8; CHUNK];
        let mut left = len;
        while left > 0 {
            let n = (left.min(CHUNK as u64)) as usize;
            f.read_exact(&mut buf[..n])
                .map_err(|e| format!("{}: {e}", path.display()))?;
            h.update(&buf[..n]);
            left -= n as u64;
        }
        Ok(())
    };
    feed(&config, config_len, &mut h)?;
    h.weights(weights_len);
    feed(&weights, weights_len, &mut h)?;
    Ok((h.finish(), weights_len))
}

fn sync_dir(dir: &Path) -> Result<(), String> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| format!("{}: {e}", dir.display()))
}

/// Makes `tmp` (a filled folder) the folder `dest`, durably: its files are
/// synced by the caller; the rename and the parent are synced here.
fn commit_dir(tmp: &Path, dest: &Path) -> Result<(), String> {
    sync_dir(tmp)?;
    if dest.exists() {
        std::fs::remove_dir_all(dest).map_err(|e| format!("{}: {e}", dest.display()))?;
    }
    std::fs::rename(tmp, dest).map_err(|e| format!("{}: {e}", dest.display()))?;
    match dest.parent() {
        Some(p) => sync_dir(p),
        None => Ok(()),
    }
}

fn write_record(dir: &Path, record: &AdapterRecord) -> Result<(), String> {
    let doc = serde_json::to_vec_pretty(record).map_err(|e| e.to_string())?;
    hearth_models::durable::write(&dir.join(RECORD_FILE), &doc).map_err(|e| e.to_string())
}

/// Registers the PEFT adapter in `peft` as the fine-tune `name` of the
/// base model `base_model` (content `base_content`), in the fine-tuned
/// models' folder `models`: copied into `<name>.lora/` with its record,
/// written atomically. Blocking.
pub fn register(
    models: &Path,
    name: &str,
    peft: &Path,
    base_content: &str,
    base_model: &str,
) -> Result<AdapterRecord, String> {
    check_name(name)?;
    std::fs::create_dir_all(models).map_err(|e| format!("{}: {e}", models.display()))?;
    let tmp = models.join(format!(".{name}{DIR_SUFFIX}.tmp"));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| format!("{}: {e}", tmp.display()))?;
    }
    std::fs::create_dir_all(&tmp).map_err(|e| format!("{}: {e}", tmp.display()))?;
    for f in [CONFIG_FILE, WEIGHTS_FILE] {
        let (from, to) = (peft.join(f), tmp.join(f));
        std::fs::copy(&from, &to).map_err(|e| format!("{}: {e}", from.display()))?;
        std::fs::File::open(&to)
            .and_then(|f| f.sync_all())
            .map_err(|e| format!("{}: {e}", to.display()))?;
    }
    let (id, bytes) = id_of_dir(&tmp)?;
    let record = AdapterRecord {
        format: RECORD_FORMAT,
        name: name.to_string(),
        id,
        base_content: base_content.to_string(),
        base_model: base_model.to_string(),
        bytes,
    };
    write_record(&tmp, &record)?;
    commit_dir(&tmp, &models.join(format!("{name}{DIR_SUFFIX}")))?;
    Ok(record)
}

/// The record of the adapter folder `dir`, if it has a good one.
fn read_record(dir: &Path) -> Option<AdapterRecord> {
    let path = dir.join(RECORD_FILE);
    let len = std::fs::metadata(&path).ok()?.len();
    if len > MAX_RECORD_BYTES {
        return None;
    }
    let r: AdapterRecord = serde_json::from_slice(&std::fs::read(&path).ok()?).ok()?;
    (r.format == RECORD_FORMAT && hearth_proto::check_adapter_id(&r.id).is_ok()).then_some(r)
}

/// The adapters registered in `models` (the fine-tuned models' folder).
pub fn list(models: &Path) -> Vec<(PathBuf, AdapterRecord)> {
    let Ok(rd) = std::fs::read_dir(models) else {
        return Vec::new();
    };
    let mut out: Vec<(PathBuf, AdapterRecord)> = rd
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.is_dir()
                && p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.ends_with(DIR_SUFFIX) && !n.starts_with('.'))
        })
        .filter_map(|p| read_record(&p).map(|r| (p, r)))
        .collect();
    out.sort_by(|a, b| a.1.name.cmp(&b.1.name));
    out
}

/// The registered adapter named `name` in `models`.
pub fn find(models: &Path, name: &str) -> Option<(PathBuf, AdapterRecord)> {
    check_name(name).ok()?;
    let dir = models.join(format!("{name}{DIR_SUFFIX}"));
    let r = read_record(&dir)?;
    (r.name == name).then_some((dir, r))
}

/// Where this node keeps adapters received from members: by id.
fn received_dir(service: &Service) -> Option<PathBuf> {
    service
        .source()
        .and_then(|s| s.peers_dir())
        .map(|d| d.join("adapters"))
}

/// This node's copy of the adapter `id`: registered here, or received.
fn local_copy(service: &Service, id: &str) -> Option<PathBuf> {
    hearth_proto::check_adapter_id(id).ok()?;
    let source = service.source()?;
    if let Some(models) = source.models_dir()
        && let Some((dir, _)) = list(&models).into_iter().find(|(_, r)| r.id == id)
    {
        return Some(dir);
    }
    let dir = received_dir(service)?.join(id);
    read_record(&dir).filter(|r| r.id == id).map(|_| dir)
}

/// Adds the adapter facts of this device's registered adapters to its
/// model list: on the entry of the same name (a merged model file), or as
/// an entry of its own. Blocking.
pub(crate) fn annotate(service: &Service, models: &mut Vec<crate::catalog::ModelEntry>) {
    let Some(dir) = service.source().and_then(|s| s.models_dir()) else {
        return;
    };
    for (path, r) in list(&dir) {
        let facts = AdapterFacts {
            id: r.id,
            base_content: r.base_content,
            base_model: r.base_model,
        };
        match models.iter_mut().find(|m| m.name == r.name) {
            Some(m) => m.adapter = Some(facts),
            None => models.push(crate::catalog::ModelEntry {
                size_bytes: Some(r.bytes),
                adapter: Some(facts),
                ..crate::catalog::ModelEntry::held(r.name, path)
            }),
        }
    }
}

/// Checks an adapter's facts in a member's catalog.
pub(crate) fn check_facts(f: &AdapterFacts) -> Result<(), String> {
    hearth_proto::check_adapter_id(&f.id).map_err(|e| e.to_string())?;
    for (what, s) in [
        ("a base content id", &f.base_content),
        ("a base model", &f.base_model),
    ] {
        if s.len() > crate::sharing::MAX_NAME || s.chars().any(char::is_control) {
            return Err(format!(
                "{what} of {} bytes or with control characters",
                s.len()
            ));
        }
    }
    Ok(())
}

/// The fine-tune `name` as an adapter of the model this node serves, if
/// it is one: registered here, or in a member's catalog (with the members
/// that hold it). `Err` (a bad request) when it is an adapter of another
/// base.
pub(crate) async fn resolve(
    service: &Service,
    name: &str,
) -> Result<Option<AdapterRef>, crate::RuntimeError> {
    let Some(model) = service.model() else {
        return Ok(None);
    };
    let served = model.info.times.content.clone().unwrap_or_default();
    let me = service.me().to_string();
    let own = {
        let (s, n) = (service.clone(), name.to_string());
        tokio::task::spawn_blocking(move || {
            s.source()
                .and_then(|src| src.models_dir())
                .and_then(|d| find(&d, &n))
        })
        .await
        .ok()
        .flatten()
    };
    let mut found: Option<(AdapterFacts, Vec<String>)> = own.map(|(_, r)| {
        (
            AdapterFacts {
                id: r.id,
                base_content: r.base_content,
                base_model: r.base_model,
            },
            vec![me.clone()],
        )
    });
    for c in crate::sharing::member_catalogs(service, found.is_none()).await {
        for m in &c.models {
            let Some(f) = m.adapter.as_ref().filter(|_| m.name == name) else {
                continue;
            };
            match &mut found {
                Some((have, holders)) if have.id == f.id => holders.push(c.node_id.clone()),
                Some(_) => {}
                None => found = Some((f.clone(), vec![c.node_id.clone()])),
            }
        }
    }
    let Some((facts, mut holders)) = found else {
        return Ok(None);
    };
    if facts.base_content != served {
        // Served as its merged model, if there is one; else the base must be
        // loaded first.
        return Err(crate::RuntimeError::BadRequest(format!(
            "{name} is a LoRA adapter of {}, and the cluster serves {}: load {} to serve it beside its base",
            facts.base_model, model.info.times.model, facts.base_model
        )));
    }
    holders.truncate(crate::sharing::MAX_HOLDERS);
    Ok(Some(AdapterRef {
        name: name.to_string(),
        id: facts.id,
        base_content: facts.base_content,
        holders,
    }))
}

/// The adapter slices a stage holds, by id, oldest first.
#[derive(Default)]
pub(crate) struct StageAdapters {
    held: RwLock<Vec<(String, Arc<StageAdapter>)>>,
}

impl StageAdapters {
    pub(crate) fn get(&self, id: &str) -> Option<Arc<StageAdapter>> {
        let held = self.held.read().ok()?;
        held.iter().find(|(i, _)| i == id).map(|(_, a)| a.clone())
    }

    fn insert(&self, id: String, a: Arc<StageAdapter>) {
        if let Ok(mut held) = self.held.write() {
            held.retain(|(i, _)| *i != id);
            held.push((id, a));
            let over = held.len().saturating_sub(MAX_STAGE_ADAPTERS);
            held.drain(..over);
        }
    }

    /// How many it holds and their bytes.
    pub(crate) fn size(&self) -> (usize, u64) {
        match self.held.read() {
            Ok(h) => (h.len(), h.iter().map(|(_, a)| a.bytes()).sum()),
            Err(_) => (0, 0),
        }
    }
}

/// What a requester remembers: the adapters every member of a placement
/// has prepared.
#[derive(Default)]
pub(crate) struct Prepared {
    done: std::sync::Mutex<HashSet<(u64, String)>>,
    /// One round of asking the members at a time, from here.
    asking: tokio::sync::Mutex<()>,
    /// One adapter received and loaded at a time, here.
    loading: tokio::sync::Mutex<()>,
}

impl Prepared {
    fn has(&self, placement: u64, id: &str) -> bool {
        self.done
            .lock()
            .is_ok_and(|d| d.contains(&(placement, id.to_string())))
    }

    fn add(&self, placement: u64, id: &str) {
        if let Ok(mut d) = self.done.lock() {
            if d.len() >= MAX_PREPARED {
                d.clear();
            }
            d.insert((placement, id.to_string()));
        }
    }
}

/// Makes sure every member that runs a stage or a replica of `placement`
/// holds its slice of `adapter`, asking those that have not said so yet.
pub(crate) async fn ensure_prepared(
    service: &Service,
    placement: &Placement,
    adapter: &AdapterRef,
) -> Result<(), PipelineError> {
    if placement.content.as_deref() != Some(adapter.base_content.as_str()) {
        return Err(PipelineError::BadRequest(format!(
            "{} is an adapter of another base model than the placed {}",
            adapter.name, placement.model
        )));
    }
    let prepared = service.prepared_adapters();
    if prepared.has(placement.id, &adapter.id) {
        return Ok(());
    }
    let _one = prepared.asking.lock().await;
    if prepared.has(placement.id, &adapter.id) {
        return Ok(());
    }
    let mut nodes: Vec<&str> = placement
        .stages
        .iter()
        .map(|s| s.node_id.as_str())
        .chain(placement.replicas.iter().map(|r| r.node_id.as_str()))
        .collect();
    nodes.dedup();
    let req = Control::PrepareAdapter {
        placement: placement.id,
        adapter: adapter.clone(),
    };
    let asks = nodes
        .iter()
        .map(|n| crate::control::request(service, n, &req, PREPARE_WAIT));
    let replies = futures_util::future::join_all(asks).await;
    for (n, r) in nodes.iter().zip(replies) {
        let short = n.get(..8).unwrap_or(n);
        match r {
            Ok(Control::Ready { .. }) => {}
            Ok(Control::Failed { reason, .. }) => {
                return Err(PipelineError::Failed(format!(
                    "member {short} cannot serve the adapter {}: {reason}",
                    adapter.name
                )));
            }
            Ok(_) => {
                return Err(PipelineError::Failed(format!(
                    "member {short} answered an adapter order oddly"
                )));
            }
            Err(e) => {
                return Err(PipelineError::Failed(format!(
                    "member {short} did not prepare the adapter {}: {e}",
                    adapter.name
                )));
            }
        }
    }
    prepared.add(placement.id, &adapter.id);
    info!(
        placement = placement.id,
        adapter = %adapter.name,
        members = nodes.len(),
        "adapter prepared on every member of the placement"
    );
    Ok(())
}

/// A member's part of [`ensure_prepared`]: its stage of `placement` gets
/// its slice of `adapter` (the files received from a holder first, when
/// this node has none).
pub(crate) async fn prepare(
    service: &Service,
    placement: u64,
    adapter: &AdapterRef,
) -> Result<(), String> {
    adapter.check()?;
    let model = service.model().ok_or("this node serves no model")?;
    if model.info.times.content.as_deref() != Some(adapter.base_content.as_str()) {
        return Err(format!(
            "this node serves {}, not the adapter's base model",
            model.info.times.model
        ));
    }
    let stage = service
        .stage(placement)
        .ok_or_else(|| format!("no stage of placement {placement} here"))?;
    if stage.adapters.get(&adapter.id).is_some() {
        return Ok(());
    }
    let _one = service.prepared_adapters().loading.lock().await;
    if stage.adapters.get(&adapter.id).is_some() {
        return Ok(());
    }
    let dir = match local_copy(service, &adapter.id) {
        Some(d) => d,
        None => {
            let root =
                received_dir(service).ok_or("this node takes no files from members (no store)")?;
            fetch(service.endpoint(), &adapter.holders, adapter, &root).await?
        }
    };
    let spec = stage.placement.stages[stage.index].spec;
    let cfg = model.info.config.clone();
    let started = std::time::Instant::now();
    let slice = tokio::task::spawn_blocking(move || StageAdapter::load_peft(&dir, &cfg, spec))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
    info!(
        placement,
        adapter = %adapter.name,
        layers = %format!("{}..{}", spec.start, spec.end),
        bytes = slice.bytes(),
        took_ms = started.elapsed().as_millis() as u64,
        "adapter slice loaded"
    );
    stage.adapters.insert(adapter.id.clone(), Arc::new(slice));
    Ok(())
}

/// Serves a `FetchAdapter` on a `WEIGHTS` stream: its manifest, then the
/// config's bytes and the weights' as `FileChunk`s (offsets run on from
/// the config into the weights).
pub(crate) async fn serve(service: &Service, id: &str, send: &mut quinn::SendStream) {
    let planned = match local_copy(service, id) {
        Some(dir) => {
            let (c, w) = (dir.join(CONFIG_FILE), dir.join(WEIGHTS_FILE));
            match (
                len_within(&c, MAX_CONFIG_BYTES),
                len_within(&w, MAX_WEIGHTS_BYTES),
            ) {
                (Ok(cl), Ok(wl)) => Ok((c, cl, w, wl)),
                (Err(e), _) | (_, Err(e)) => Err(e),
            }
        }
        None => Err("this node has no such adapter".to_string()),
    };
    let (config, config_len, weights, weights_len) = match planned {
        Ok(p) => p,
        Err(reason) => {
            let _ = write_control(send, &Control::Failed { id: 0, reason }).await;
            return;
        }
    };
    let manifest = Control::AdapterManifest {
        config_len,
        weights_len,
    };
    if write_control(send, &manifest).await.is_err() {
        return;
    }
    let mut offset = 0u64;
    for (path, len) in [(config, config_len), (weights, weights_len)] {
        if let Err(e) = send_file(&path, len, &mut offset, send).await {
            warn!("sending an adapter: {e}");
            return;
        }
    }
}

async fn send_file(
    path: &Path,
    len: u64,
    offset: &mut u64,
    send: &mut quinn::SendStream,
) -> Result<(), String> {
    use std::os::unix::fs::FileExt;
    let f = Arc::new(std::fs::File::open(path).map_err(|e| e.to_string())?);
    let mut at = 0u64;
    while at < len {
        let n = (len - at).min(CHUNK as u64);
        let f = f.clone();
        let data = tokio::task::spawn_blocking(move || -> Result<Vec<u8>, String> {
            let mut buf = vec![0u8; n as usize];
            f.read_exact_at(&mut buf, at).map_err(|e| e.to_string())?;
            Ok(buf)
        })
        .await
        .map_err(|e| e.to_string())??;
        write_message(
            send,
            &Message::FileChunk {
                offset: *offset,
                data,
            },
        )
        .await
        .map_err(|e| e.to_string())?;
        at += n;
        *offset += n;
    }
    Ok(())
}

/// Receives the adapter from the first of `holders` that sends it whole,
/// into `root/<id>/` (checked against its id before it is kept).
async fn fetch(
    endpoint: &Endpoint,
    holders: &[String],
    adapter: &AdapterRef,
    root: &Path,
) -> Result<PathBuf, String> {
    let mut errors = Vec::new();
    for h in holders {
        let Ok(id) = h.parse::<NodeId>() else {
            continue;
        };
        if id == endpoint.id() {
            continue;
        }
        let got = tokio::time::timeout(FETCH_TIMEOUT, fetch_from(endpoint, id, adapter, root))
            .await
            .unwrap_or_else(|_| Err("timed out".into()));
        match got {
            Ok(dir) => return Ok(dir),
            Err(e) => {
                debug!(
                    "receiving adapter {} from {}: {e}",
                    adapter.name,
                    id.short()
                );
                errors.push(format!("{}: {e}", id.short()));
            }
        }
    }
    Err(format!(
        "no member could send the adapter {} ({})",
        adapter.name,
        if errors.is_empty() {
            "none holds it".to_string()
        } else {
            errors.join("; ")
        }
    ))
}

async fn fetch_from(
    endpoint: &Endpoint,
    from: NodeId,
    adapter: &AdapterRef,
    root: &Path,
) -> Result<PathBuf, String> {
    let conn = endpoint.peer(from).ok_or("not connected")?;
    let (mut send, mut recv) = conn
        .open(stream_kind::WEIGHTS)
        .await
        .map_err(|e| e.to_string())?;
    write_control(
        &mut send,
        &Control::FetchAdapter {
            id: adapter.id.clone(),
        },
    )
    .await
    .map_err(|e| e.to_string())?;
    let _ = send.finish();
    let (config_len, weights_len) = match read_control(&mut recv, crate::control::MAX_CONTROL_DOC)
        .await
        .map_err(|e| e.to_string())?
    {
        Control::AdapterManifest {
            config_len,
            weights_len,
        } => (config_len, weights_len),
        Control::Failed { reason, .. } => return Err(reason),
        other => return Err(format!("unexpected reply {other:?}")),
    };
    if config_len > MAX_CONFIG_BYTES || weights_len > MAX_WEIGHTS_BYTES {
        return Err(format!(
            "an adapter of {config_len} + {weights_len} bytes (at most {MAX_CONFIG_BYTES} + {MAX_WEIGHTS_BYTES})"
        ));
    }
    std::fs::create_dir_all(root).map_err(|e| format!("{}: {e}", root.display()))?;
    let tmp = root.join(format!(".{}.tmp-{}", adapter.id, std::process::id()));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| e.to_string())?;
    }
    std::fs::create_dir_all(&tmp).map_err(|e| e.to_string())?;
    let received = receive_into(&mut recv, &tmp, config_len, weights_len, &adapter.id).await;
    if let Err(e) = received {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    let record = AdapterRecord {
        format: RECORD_FORMAT,
        name: adapter.name.clone(),
        id: adapter.id.clone(),
        base_content: adapter.base_content.clone(),
        base_model: String::new(),
        bytes: weights_len,
    };
    let dest = root.join(&adapter.id);
    let kept = write_record(&tmp, &record).and_then(|()| commit_dir(&tmp, &dest));
    if let Err(e) = kept {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    info!(
        from = %from.short(),
        adapter = %adapter.name,
        bytes = config_len + weights_len,
        "received an adapter"
    );
    Ok(dest)
}

/// Reads the config's and the weights' chunks into `dir`, in order, and
/// checks them against `id`.
async fn receive_into(
    recv: &mut quinn::RecvStream,
    dir: &Path,
    config_len: u64,
    weights_len: u64,
    id: &str,
) -> Result<(), String> {
    let mut h = IdHasher::new(config_len);
    let mut offset = 0u64;
    for (name, len) in [(CONFIG_FILE, config_len), (WEIGHTS_FILE, weights_len)] {
        if name == WEIGHTS_FILE {
            h.weights(len);
        }
        let path = dir.join(name);
        let mut f = std::fs::File::create(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        let mut at = 0u64;
        while at < len {
            let msg = read_message(recv, limits::MAX_FRAME)
                .await
                .map_err(|e| e.to_string())?
                .ok_or("the sender stopped early")?;
            let Message::FileChunk { offset: o, data } = msg else {
                return Err(format!("expected a file chunk, got {}", msg.name()));
            };
            if o != offset || data.is_empty() || data.len() as u64 > len - at {
                return Err(format!("chunk at {o} of {} bytes out of place", data.len()));
            }
            h.update(&data);
            f.write_all(&data).map_err(|e| e.to_string())?;
            at += data.len() as u64;
            offset += data.len() as u64;
        }
        f.sync_all().map_err(|e| e.to_string())?;
    }
    let got = h.finish();
    if got != id {
        return Err(format!(
            "the adapter received is not the one asked for (its id is {got})"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_adapters_id_covers_both_files_and_where_one_ends() {
        let a = adapter_id(b"{}", b"weights");
        assert_eq!(a.len(), limits::ADAPTER_ID_LEN);
        assert!(hearth_proto::check_adapter_id(&a).is_ok());
        assert_ne!(a, adapter_id(b"{}", b"weightz"));
        assert_ne!(a, adapter_id(b"{}w", b"eights"), "the boundary counts");
        assert_eq!(a, adapter_id(b"{}", b"weights"));
    }

    #[test]
    fn a_registered_adapter_is_found_by_name_and_its_files_prove_its_id() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let peft = dir.path().join("peft");
        std::fs::create_dir_all(&peft).unwrap_or_else(|e| panic!("{e}"));
        std::fs::write(peft.join(CONFIG_FILE), b"{\"r\": 4}").unwrap_or_else(|e| panic!("{e}"));
        std::fs::write(peft.join(WEIGHTS_FILE), vec![7u8; 3 * CHUNK + 5])
            .unwrap_or_else(|e| panic!("{e}"));
        let models = dir.path().join("models");
        let r =
            register(&models, "ft-x", &peft, "c0ffee", "base").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(r.id, adapter_id(b"{\"r\": 4}", &vec![7u8; 3 * CHUNK + 5]));
        assert_eq!(r.bytes, 3 * CHUNK as u64 + 5);
        let (path, found) = find(&models, "ft-x").unwrap_or_else(|| panic!("not found"));
        assert_eq!(found, r);
        assert_eq!(path, models.join("ft-x.lora"));
        assert_eq!(list(&models).len(), 1);
        // Registered again (a rerun): replaced, not doubled.
        std::fs::write(peft.join(CONFIG_FILE), b"{\"r\": 8}").unwrap_or_else(|e| panic!("{e}"));
        let again =
            register(&models, "ft-x", &peft, "c0ffee", "base").unwrap_or_else(|e| panic!("{e}"));
        assert_ne!(again.id, r.id);
        assert_eq!(list(&models).len(), 1);
        // Names that are paths are refused.
        for bad in ["../x", ".hidden", "a/b", ""] {
            assert!(register(&models, bad, &peft, "c", "b").is_err(), "{bad}");
            assert!(find(&models, bad).is_none());
        }
    }

    #[test]
    fn hostile_adapter_references_are_refused() {
        let good = AdapterRef {
            name: "ft-a".into(),
            id: "ab".repeat(32),
            base_content: "c0ffee".into(),
            holders: vec!["n".into()],
        };
        assert!(good.check().is_ok());
        let mut bad = good.clone();
        bad.id = "../../etc".into();
        assert!(bad.check().is_err());
        let mut bad = good.clone();
        bad.id = "AB".repeat(32);
        assert!(bad.check().is_err(), "upper case is not an id");
        let mut bad = good.clone();
        bad.name = "../../x".into();
        assert!(bad.check().is_err());
        let mut bad = good.clone();
        bad.holders = vec!["n".into(); crate::sharing::MAX_HOLDERS + 1];
        assert!(bad.check().is_err());
        let mut bad = good;
        bad.base_content = "x".repeat(1000);
        assert!(bad.check().is_err());
    }
}
