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
//!   parameters. Before each such request, the requester asks every member
//!   that runs a stage (or a replica) of it to prepare the adapter
//!   ([`ensure_prepared`]; one that has it answers at once): a member
//!   without the files receives them from a holder over a `WEIGHTS` stream
//!   (bounded, checked against the id), and loads its stage's slice of
//!   them. Only members of the placement may ask. A replica that cannot
//!   (a GPU stage) is left out of that request; a pipeline stage that
//!   cannot fails it.
//! - **A stage** keeps the slices it prepared ([`StageAdapters`], at most
//!   [`MAX_STAGE_ADAPTERS`] and [`MAX_STAGE_ADAPTER_BYTES`], least recently
//!   used dropped first) and applies each sequence's own to that sequence's
//!   rows of a batch (`hearth_models::adapter`). A sequence whose adapter
//!   the stage does not hold fails: it never gets the base model's answer
//!   under the fine-tune's name.

use std::collections::HashSet;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
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
/// Most adapters one stage holds; preparing another drops the one used
/// least recently (sequences running with it keep their copy).
pub const MAX_STAGE_ADAPTERS: usize = 64;
/// Most bytes of adapter slices one stage holds (f32), likewise.
pub const MAX_STAGE_ADAPTER_BYTES: u64 = 4 << 30;
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
/// An existing `dest` is moved aside first and removed only once the new
/// folder is in its place, so a crash leaves one of the two whole.
fn commit_dir(tmp: &Path, dest: &Path) -> Result<(), String> {
    sync_dir(tmp)?;
    let name = dest
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| format!("{} has no plain name", dest.display()))?;
    let old = dest.with_file_name(format!(".{name}.old"));
    if old.exists() {
        std::fs::remove_dir_all(&old).map_err(|e| format!("{}: {e}", old.display()))?;
    }
    let replaced = dest.exists();
    if replaced {
        std::fs::rename(dest, &old).map_err(|e| format!("{}: {e}", dest.display()))?;
    }
    std::fs::rename(tmp, dest).map_err(|e| format!("{}: {e}", dest.display()))?;
    if let Some(p) = dest.parent() {
        sync_dir(p)?;
    }
    if replaced {
        std::fs::remove_dir_all(&old).map_err(|e| format!("{}: {e}", old.display()))?;
    }
    Ok(())
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

/// Removes the registered adapter `name` from `models`, if it is there.
/// Blocking.
pub fn unregister(models: &Path, name: &str) -> Result<(), String> {
    check_name(name)?;
    let dir = models.join(format!("{name}{DIR_SUFFIX}"));
    if !dir.exists() {
        return Ok(());
    }
    std::fs::remove_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    sync_dir(models)
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
/// Blocking.
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

/// [`local_copy`], its files checked against the id (a copy changed on
/// disk since it was registered or received is not the adapter asked
/// for: it would run other weights than the other stages under one id).
/// Blocking.
fn verified_copy(service: &Service, id: &str) -> Result<Option<PathBuf>, String> {
    let Some(dir) = local_copy(service, id) else {
        return Ok(None);
    };
    let (got, _) = id_of_dir(&dir)?;
    if got != id {
        return Err(format!(
            "this node's copy of the adapter is not the one asked for (its files changed since it was stored: {})",
            dir.display()
        ));
    }
    Ok(Some(dir))
}

/// Most adapters received from members kept on disk; the oldest received
/// beyond it are removed (one removed while still served is received
/// again when next prepared).
const MAX_RECEIVED: usize = 128;

/// Removes the received adapters beyond [`MAX_RECEIVED`], the oldest
/// received first (never `keep`). Blocking.
fn collect_received(root: &Path, keep: &Path) {
    let Ok(rd) = std::fs::read_dir(root) else {
        return;
    };
    let mut dirs: Vec<(std::time::SystemTime, PathBuf)> = rd
        .flatten()
        .filter(|e| e.file_name().to_str().is_some_and(|n| !n.starts_with('.')))
        .filter_map(|e| Some((e.metadata().ok()?.modified().ok()?, e.path())))
        .collect();
    if dirs.len() <= MAX_RECEIVED {
        return;
    }
    dirs.sort();
    let over = dirs.len() - MAX_RECEIVED;
    for (_, d) in dirs.into_iter().filter(|(_, d)| d != keep).take(over) {
        if let Err(e) = std::fs::remove_dir_all(&d) {
            warn!("removing a received adapter {}: {e}", d.display());
        }
    }
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

/// What a model name is, as far as adapters go.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Resolved {
    /// Not a LoRA fine-tune the cluster knows.
    NotAdapter,
    /// A fine-tune of the served model: served beside it.
    Serve(AdapterRef),
    /// A fine-tune of another base (or of one while none is served).
    OtherBase { base_model: String },
}

/// What the fine-tune `name` is: registered here (this node's own record
/// wins), else as members' catalogs say (with the members that hold it).
/// Members that name it with different adapters make it ambiguous: a bad
/// request, never a guess.
pub(crate) async fn resolve(
    service: &Service,
    name: &str,
) -> Result<Resolved, crate::RuntimeError> {
    let served = service
        .model()
        .and_then(|m| m.info.times.content.clone())
        .filter(|c| !c.is_empty());
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
    let ours = found.is_some();
    let mut others: Vec<String> = Vec::new();
    for c in crate::sharing::member_catalogs(service, !ours).await {
        for m in &c.models {
            let Some(f) = m.adapter.as_ref().filter(|_| m.name == name) else {
                continue;
            };
            match &mut found {
                Some((have, holders)) if have.id == f.id => holders.push(c.node_id.clone()),
                Some(_) => others.push(c.name.clone()),
                None => found = Some((f.clone(), vec![c.node_id.clone()])),
            }
        }
    }
    let Some((facts, mut holders)) = found else {
        return Ok(Resolved::NotAdapter);
    };
    if !ours && !others.is_empty() {
        return Err(crate::RuntimeError::BadRequest(format!(
            "members hold different adapters named {name} ({} among them): ask a member that holds the one you mean",
            others.join(", ")
        )));
    }
    if served.as_deref() != Some(facts.base_content.as_str()) {
        return Ok(Resolved::OtherBase {
            base_model: facts.base_model,
        });
    }
    holders.truncate(crate::sharing::MAX_HOLDERS);
    Ok(Resolved::Serve(AdapterRef {
        name: name.to_string(),
        id: facts.id,
        base_content: facts.base_content,
        holders,
    }))
}

/// The adapter slices a stage holds, by id, least recently used first.
#[derive(Default)]
pub(crate) struct StageAdapters {
    held: std::sync::Mutex<Vec<(String, Arc<StageAdapter>)>>,
}

impl StageAdapters {
    /// The slice of adapter `id`, marked as just used.
    pub(crate) fn get(&self, id: &str) -> Option<Arc<StageAdapter>> {
        let mut held = self.held.lock().ok()?;
        let i = held.iter().position(|(i, _)| i == id)?;
        let e = held.remove(i);
        let a = e.1.clone();
        held.push(e);
        Some(a)
    }

    /// Holds `a` as adapter `id`, dropping the least recently used beyond
    /// [`MAX_STAGE_ADAPTERS`] or [`MAX_STAGE_ADAPTER_BYTES`].
    fn insert(&self, id: String, a: Arc<StageAdapter>) {
        if let Ok(mut held) = self.held.lock() {
            held.retain(|(i, _)| *i != id);
            held.push((id, a));
            while held.len() > 1
                && (held.len() > MAX_STAGE_ADAPTERS
                    || held.iter().map(|(_, a)| a.bytes()).sum::<u64>() > MAX_STAGE_ADAPTER_BYTES)
            {
                held.remove(0);
            }
        }
    }

    /// How many it holds and their bytes.
    pub(crate) fn size(&self) -> (usize, u64) {
        match self.held.lock() {
            Ok(h) => (h.len(), h.iter().map(|(_, a)| a.bytes()).sum()),
            Err(_) => (0, 0),
        }
    }
}

/// A member's locks while it prepares adapters: one per adapter, so a
/// slow transfer holds up only the requests for that adapter.
#[derive(Default)]
pub(crate) struct AdapterLocks {
    loading: std::sync::Mutex<std::collections::HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

impl AdapterLocks {
    fn lock_for(&self, id: &str) -> Option<Arc<tokio::sync::Mutex<()>>> {
        let mut m = self.loading.lock().ok()?;
        // Locks nobody waits on are dropped (bounded by what is in flight).
        m.retain(|_, l| Arc::strong_count(l) > 1);
        Some(m.entry(id.to_string()).or_default().clone())
    }
}

/// Makes sure every member that runs a stage or a replica of `placement`
/// holds its slice of `adapter`, asking each (a member that holds it
/// answers at once; asking every time means a slice dropped since is
/// loaded again rather than a sequence failing). Returns the replicas that
/// cannot serve it (a GPU replica, say): requests for it leave them out. A
/// pipeline stage that cannot is an error.
pub(crate) async fn ensure_prepared(
    service: &Service,
    placement: &Placement,
    adapter: &AdapterRef,
) -> Result<HashSet<String>, PipelineError> {
    if placement.content.as_deref() != Some(adapter.base_content.as_str()) {
        return Err(PipelineError::BadRequest(format!(
            "{} is an adapter of another base model than the placed {}",
            adapter.name, placement.model
        )));
    }
    let stages: Vec<&str> = placement
        .stages
        .iter()
        .map(|s| s.node_id.as_str())
        .collect();
    let mut nodes: Vec<&str> = stages.clone();
    for r in &placement.replicas {
        if !nodes.contains(&r.node_id.as_str()) {
            nodes.push(&r.node_id);
        }
    }
    let req = Control::PrepareAdapter {
        placement: placement.id,
        adapter: adapter.clone(),
    };
    let asks = nodes
        .iter()
        .map(|n| crate::control::request(service, n, &req, PREPARE_WAIT));
    let replies = futures_util::future::join_all(asks).await;
    let mut unable = HashSet::new();
    for (n, r) in nodes.iter().zip(replies) {
        let short = n.get(..8).unwrap_or(n);
        let why = match r {
            Ok(Control::Ready { .. }) => continue,
            Ok(Control::Failed { reason, .. }) => reason,
            Ok(_) => "an odd answer".to_string(),
            Err(e) => e.to_string(),
        };
        if stages.contains(n) {
            return Err(PipelineError::Failed(format!(
                "member {short} cannot serve the adapter {}: {why}",
                adapter.name
            )));
        }
        debug!(replica = short, adapter = %adapter.name, "a replica leaves the adapter to the pipeline: {why}");
        unable.insert(n.to_string());
    }
    Ok(unable)
}

/// Longest a member spends receiving an adapter from its holders, all of
/// them together (under the requester's [`PREPARE_WAIT`]).
const RECEIVE_DEADLINE: Duration = Duration::from_secs(240);
/// Most holders a member tries.
const MAX_TRIED_HOLDERS: usize = 4;

/// A member's part of [`ensure_prepared`], asked by `from`: its stage of
/// `placement` gets its slice of `adapter` (the files received from a
/// holder first, when this node has none). Only a member of the placement
/// may ask.
pub(crate) async fn prepare(
    service: &Service,
    from: NodeId,
    placement: u64,
    adapter: &AdapterRef,
) -> Result<(), String> {
    adapter.check()?;
    let stage = service
        .stage(placement)
        .ok_or_else(|| format!("no stage of placement {placement} here"))?;
    let asker = from.to_string();
    if from != service.endpoint().id() && !stage.placement.members.contains(&asker) {
        return Err("only a member of the placement prepares its adapters".into());
    }
    if !stage.takes_adapters {
        return Err("this stage runs on a GPU, which does not apply LoRA adapters".into());
    }
    let model = service.model().ok_or("this node serves no model")?;
    if model.info.times.content.as_deref() != Some(adapter.base_content.as_str()) {
        return Err(format!(
            "this node serves {}, not the adapter's base model",
            model.info.times.model
        ));
    }
    if stage.adapters.get(&adapter.id).is_some() {
        return Ok(());
    }
    let lock = service
        .adapter_locks()
        .lock_for(&adapter.id)
        .ok_or("the adapter locks are poisoned")?;
    let _one = lock.lock().await;
    if stage.adapters.get(&adapter.id).is_some() {
        return Ok(());
    }
    let local = {
        let (s, id) = (service.clone(), adapter.id.clone());
        tokio::task::spawn_blocking(move || verified_copy(&s, &id))
            .await
            .map_err(|e| e.to_string())??
    };
    let dir = match local {
        Some(d) => d,
        None => {
            let root =
                received_dir(service).ok_or("this node takes no files from members (no store)")?;
            let holders: Vec<String> = adapter
                .holders
                .iter()
                .take(MAX_TRIED_HOLDERS)
                .cloned()
                .collect();
            let got = tokio::time::timeout(
                RECEIVE_DEADLINE,
                fetch(service.endpoint(), &holders, adapter, &root),
            )
            .await
            .unwrap_or_else(|_| Err("receiving it took too long".into()))?;
            let (r, keep) = (root.clone(), got.clone());
            let _ = tokio::task::spawn_blocking(move || collect_received(&r, &keep)).await;
            got
        }
    };
    let spec = stage.placement.stages[stage.index].spec;
    let cfg = model.info.config.clone();
    let started = std::time::Instant::now();
    let slice = tokio::task::spawn_blocking(move || {
        let slice = StageAdapter::load_peft(&dir, &cfg, spec);
        // Loading copies each matrix a few times on its way to the slice;
        // what the allocator keeps of those copies goes back to the system,
        // so serving an adapter costs its slice, not its transients.
        release_freed_memory();
        slice
    })
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

/// Returns the allocator's free memory to the system (glibc keeps freed
/// blocks in its per-thread arenas). Blocking; elsewhere, nothing.
pub fn release_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: `malloc_trim` only releases memory the allocator holds free;
    // it touches no live allocation.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Serves a `FetchAdapter` on a `WEIGHTS` stream: its manifest, then the
/// config's bytes and the weights' as `FileChunk`s (offsets run on from
/// the config into the weights).
pub(crate) async fn serve(service: &Service, id: &str, send: &mut quinn::SendStream) {
    let copy = {
        let (s, id) = (service.clone(), id.to_string());
        tokio::task::spawn_blocking(move || local_copy(&s, &id))
            .await
            .ok()
            .flatten()
    };
    let planned = match copy {
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
    for id in crate::model_file::senders(endpoint, holders) {
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
    Err(crate::model_file::none_sent(
        &format!("the adapter {}", adapter.name),
        "none holds it",
        &errors,
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
    let kept = {
        let (tmp, dest) = (tmp.clone(), dest.clone());
        tokio::task::spawn_blocking(move || {
            write_record(&tmp, &record).and_then(|()| commit_dir(&tmp, &dest))
        })
        .await
        .map_err(|e| e.to_string())
        .and_then(|r| r)
    };
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
        let f = std::fs::File::create(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        let mut f = Some(f);
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
            at += data.len() as u64;
            offset += data.len() as u64;
            // Written off the async threads; the file comes back with it.
            let mut file = f.take().ok_or("the file is gone")?;
            let last = at == len;
            file = tokio::task::spawn_blocking(move || -> Result<std::fs::File, String> {
                file.write_all(&data).map_err(|e| e.to_string())?;
                if last {
                    file.sync_all().map_err(|e| e.to_string())?;
                }
                Ok(file)
            })
            .await
            .map_err(|e| e.to_string())??;
            f = Some(file);
        }
        if len == 0 {
            let file = f.take().ok_or("the file is gone")?;
            tokio::task::spawn_blocking(move || file.sync_all())
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| e.to_string())?;
        }
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
