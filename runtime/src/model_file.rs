//! Weight transfer between members: a node that lacks the model receives
//! the GGUF header and exactly the tensors it needs from a member that has
//! them, over QUIC. Every piece is verified against the model's content id,
//! which is the root of a hash tree every holder computes the same way
//! ([`leaves`], [`content_root`]): BLAKE3 of the header and of each tensor,
//! then of the list of (name, offset, length, hash) and the file's length.
//! A sender cannot make a piece pass that is not the model's own. The pieces are written
//! at their offsets in a sparse file of the original's size, so the result
//! is a GGUF with the original layout (same fingerprint) whose missing
//! tensors are holes; a sidecar `<file>.have.json` lists what is present
//! and the original's content hash. The model is downloaded once per home.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use hearth_models::StageSpec;
use hearth_net::framed::{read_message, write_message};
use hearth_net::{Endpoint, IncomingStream, NodeId};
use hearth_proto::{Message, limits, stream_kind};
use serde::{Deserialize, Serialize};
use tracing::{debug, info, warn};

use crate::control::{Control, read_control, write_control};
use crate::pipeline::service::Service;

/// Bytes per `FileChunk`.
const CHUNK: usize = 1 << 20;
/// Longest a transfer may take.
const FETCH_TIMEOUT: Duration = Duration::from_secs(600);

/// Where one tensor's bytes are in a GGUF file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Piece {
    pub name: String,
    /// Absolute byte offset in the file.
    pub offset: u64,
    pub len: u64,
}

/// One leaf of a model file's content tree: its header, or one tensor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Leaf {
    /// The tensor's name, or [`HEADER_LEAF`].
    pub name: String,
    pub offset: u64,
    pub len: u64,
    /// BLAKE3 of the bytes, hex.
    pub blake3: String,
}

/// The header's leaf name (no tensor has it: GGUF names have no parentheses).
pub const HEADER_LEAF: &str = "(header)";

/// The sidecar of a partial copy.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Have {
    /// Content id of the original file (the root of its leaves).
    pub content: String,
    pub tensors: BTreeSet<String>,
    /// The original's leaves (checked against `content`), so a partial
    /// copy can prove the pieces it serves.
    #[serde(default)]
    pub leaves: Vec<Leaf>,
}

/// BLAKE3 (hex) of `len` bytes of `f` from `offset`, read in chunks.
fn blake3_range(f: &std::fs::File, offset: u64, len: u64) -> Result<String, String> {
    use std::os::unix::fs::FileExt;
    let mut h = blake3::Hasher::new();
    let mut buf = vec![0u8; CHUNK];
    let mut at = 0u64;
    while at < len {
        let n = (len - at).min(CHUNK as u64) as usize;
        f.read_exact_at(&mut buf[..n], offset + at)
            .map_err(|e| e.to_string())?;
        h.update(&buf[..n]);
        at += n as u64;
    }
    Ok(h.finalize().to_hex().to_string())
}

/// The leaves of the (whole) GGUF at `path`: its header, then every tensor
/// in file order; and the file's length.
pub fn leaves(path: &Path) -> Result<(u64, Vec<Leaf>), String> {
    let Layout(header_len, file_len, all) = layout(path)?;
    let f = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut tensors: Vec<(String, u64, u64)> =
        all.into_iter().map(|(n, (o, l))| (n, o, l)).collect();
    tensors.sort_by(|a, b| (a.1, &a.0).cmp(&(b.1, &b.0)));
    let mut out = Vec::with_capacity(tensors.len() + 1);
    out.push(Leaf {
        name: HEADER_LEAF.into(),
        offset: 0,
        len: header_len,
        blake3: blake3_range(&f, 0, header_len)?,
    });
    for (name, offset, len) in tensors {
        if offset.saturating_add(len) > file_len {
            return Err(format!(
                "{}: tensor {name} passes the end of the file",
                path.display()
            ));
        }
        out.push(Leaf {
            blake3: blake3_range(&f, offset, len)?,
            name,
            offset,
            len,
        });
    }
    Ok((file_len, out))
}

/// The content id of a file of `file_len` bytes with these leaves: the
/// root of its tree (the first 16 bytes of a BLAKE3, hex).
pub fn content_root(file_len: u64, leaves: &[Leaf]) -> String {
    let mut h = blake3::Hasher::new();
    h.update(b"hearth model content v1\0");
    h.update(&file_len.to_le_bytes());
    h.update(&(leaves.len() as u64).to_le_bytes());
    for l in leaves {
        h.update(&(l.name.len() as u64).to_le_bytes());
        h.update(l.name.as_bytes());
        h.update(&l.offset.to_le_bytes());
        h.update(&l.len.to_le_bytes());
        h.update(l.blake3.as_bytes());
    }
    h.finalize().as_bytes()[..16]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The leaves a manifest gives, by name, if their root is `content`.
fn proven_leaves(
    content: &str,
    file_len: u64,
    leaves: &[Leaf],
) -> Result<HashMap<String, Leaf>, String> {
    if content_root(file_len, leaves) != content {
        return Err("the manifest's hash tree is not the model's content id".into());
    }
    let by_name: HashMap<String, Leaf> =
        leaves.iter().map(|l| (l.name.clone(), l.clone())).collect();
    if by_name.len() != leaves.len() {
        return Err("the manifest's tree names a part twice".into());
    }
    Ok(by_name)
}

/// Leaves computed once per served file (hashing reads the whole file).
fn served_leaves(path: &Path) -> Result<std::sync::Arc<(u64, Vec<Leaf>)>, String> {
    type Cache = std::sync::Mutex<HashMap<(PathBuf, u64), std::sync::Arc<(u64, Vec<Leaf>)>>>;
    static CACHE: std::sync::OnceLock<Cache> = std::sync::OnceLock::new();
    let len = std::fs::metadata(path).map_err(|e| e.to_string())?.len();
    let key = (path.to_path_buf(), len);
    let cache = CACHE.get_or_init(Default::default);
    if let Some(l) = cache.lock().ok().and_then(|c| c.get(&key).cloned()) {
        return Ok(l);
    }
    let l = std::sync::Arc::new(leaves(path)?);
    if let Ok(mut c) = cache.lock() {
        if c.len() > 16 {
            c.clear();
        }
        c.insert(key, l.clone());
    }
    Ok(l)
}

/// The sidecar path of a (possibly partial) model file.
pub fn have_path(path: &Path) -> PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(".have.json");
    PathBuf::from(p)
}

/// What a partial copy holds; `None` for a complete file.
pub fn read_have(path: &Path) -> Option<Have> {
    let bytes = std::fs::read(have_path(path)).ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// Header length, file length and every tensor's byte range (offset,
/// length) of a GGUF.
struct Layout(u64, u64, HashMap<String, (u64, u64)>);

fn layout(path: &Path) -> Result<Layout, String> {
    let mut f = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let file_len = f.metadata().map_err(|e| e.to_string())?.len();
    let content = hearth_models::gguf::read_content(&mut f, path).map_err(|e| e.to_string())?;
    let base = content.tensor_data_offset;
    let mut out = HashMap::new();
    for (name, t) in &content.tensor_infos {
        // Checked: the header may come from a peer.
        let elems = t
            .shape
            .dims()
            .iter()
            .try_fold(1u64, |a, &d| a.checked_mul(d as u64));
        let block = (t.ggml_dtype.block_size() as u64).max(1);
        let range = elems
            .and_then(|e| (e / block).checked_mul(t.ggml_dtype.type_size() as u64))
            .and_then(|len| base.checked_add(t.offset).map(|o| (o, len)))
            .filter(|(o, len)| o.checked_add(*len).is_some());
        let Some(range) = range else {
            return Err(format!(
                "{}: tensor {name} lies past any file",
                path.display()
            ));
        };
        out.insert(name.clone(), range);
    }
    Ok(Layout(base, file_len, out))
}

/// The GGUF tensor names a stage reads (see `Stage::load`).
pub fn stage_tensors(all: impl Iterator<Item = String>, spec: StageSpec) -> BTreeSet<String> {
    let all: Vec<String> = all.collect();
    // Tied weights: without an output matrix, the head is the embedding.
    let tied = !all.iter().any(|n| n == "output.weight");
    all.into_iter()
        .filter(|n| {
            let layer = n
                .strip_prefix("blk.")
                .and_then(|r| r.split('.').next())
                .and_then(|i| i.parse::<usize>().ok());
            match layer {
                Some(i) => (spec.start..spec.end).contains(&i),
                None => match n.as_str() {
                    "token_embd.weight" => spec.embed || (spec.head && tied),
                    "output_norm.weight" | "output.weight" => spec.head,
                    // Every stage's rotary tables (and the config) use them.
                    hearth_models::weights::ROPE_FREQS
                    | hearth_models::weights::ROPE_FACTORS_LONG
                    | hearth_models::weights::ROPE_FACTORS_SHORT => true,
                    _ => false,
                },
            }
        })
        .collect()
}

/// What `ModelInfo::measure` reads: layer 0, the embedding and the head.
pub fn measurement_spec() -> [StageSpec; 2] {
    [
        StageSpec {
            start: 0,
            end: 1,
            embed: true,
            head: false,
        },
        StageSpec {
            start: 0,
            end: 0,
            embed: false,
            head: true,
        },
    ]
}

/// Serves one `WEIGHTS` stream: a `Fetch` in; a `Manifest`, then the
/// header and the pieces as `FileChunk`s out (or `Failed`).
pub(crate) async fn serve(stream: IncomingStream, service: Service) {
    let IncomingStream {
        peer,
        mut send,
        mut recv,
    } = stream;
    let req = match tokio::time::timeout(
        Duration::from_secs(10),
        read_control(&mut recv, crate::control::MAX_CONTROL_DOC),
    )
    .await
    {
        Ok(r) => r,
        Err(_) => return,
    };
    let result = match req {
        Ok(Control::Fetch {
            content,
            header,
            tensors,
        }) => plan_send(&service, &content, header, &tensors).await,
        Ok(Control::FetchAdapter { id }) => {
            crate::adapters::serve(&service, &id, &mut send).await;
            let _ = send.finish();
            return;
        }
        Ok(_) => Err("expected a fetch request".into()),
        Err(e) => Err(e.to_string()),
    };
    let (path, manifest, ranges) = match result {
        Ok(r) => r,
        Err(reason) => {
            debug!(
                "weights request from {} refused: {reason}",
                peer.node_id.short()
            );
            let _ = write_control(&mut send, &Control::Failed { id: 0, reason }).await;
            let _ = send.finish();
            return;
        }
    };
    if write_control(&mut send, &manifest).await.is_err() {
        return;
    }
    let sent = send_ranges(&path, &ranges, &mut send).await;
    if let Err(e) = sent {
        warn!("sending weights to {}: {e}", peer.node_id.short());
    }
    let _ = send.finish();
}

type SendPlan = (PathBuf, Control, Vec<(u64, u64)>);

async fn plan_send(
    service: &Service,
    content: &str,
    header: bool,
    tensors: &[String],
) -> Result<SendPlan, String> {
    let model = service.model().ok_or("this node has no model")?;
    if model.info.times.content.as_deref() != Some(content) {
        return Err("this node holds another model".into());
    }
    let path = model.info.path.clone();
    let have = read_have(&path);
    if tensors.len() > 4096 {
        return Err("too many tensors requested".into());
    }
    let p = path.clone();
    let Layout(header_len, file_len, all) = tokio::task::spawn_blocking(move || layout(&p))
        .await
        .map_err(|e| e.to_string())??;
    let mut pieces = Vec::new();
    let mut ranges = Vec::new();
    if header {
        ranges.push((0, header_len));
    }
    for name in tensors {
        let &(offset, len) = all.get(name).ok_or_else(|| format!("no tensor {name}"))?;
        if have.as_ref().is_some_and(|h| !h.tensors.contains(name)) {
            return Err(format!("this node has no copy of {name}"));
        }
        pieces.push((name.clone(), offset, len));
        ranges.push((offset, len));
    }
    // The tree that proves every piece: computed from a whole file, or
    // as received (and proven) for a partial copy.
    let leaves = match &have {
        Some(h) if h.leaves.is_empty() => {
            return Err("this node's partial copy has no hash tree to prove pieces with".into());
        }
        Some(h) => h.leaves.clone(),
        None => {
            let p = path.clone();
            tokio::task::spawn_blocking(move || served_leaves(&p))
                .await
                .map_err(|e| e.to_string())??
                .1
                .clone()
        }
    };
    let pieces = pieces
        .into_iter()
        .map(|(name, offset, len)| Piece { name, offset, len })
        .collect();
    Ok((
        path,
        Control::Manifest {
            file_len,
            header_len,
            pieces,
            leaves,
        },
        ranges,
    ))
}

async fn send_ranges(
    path: &Path,
    ranges: &[(u64, u64)],
    send: &mut quinn::SendStream,
) -> Result<(), String> {
    use std::os::unix::fs::FileExt;
    let f = std::sync::Arc::new(std::fs::File::open(path).map_err(|e| e.to_string())?);
    for &(offset, len) in ranges {
        let mut at = 0u64;
        while at < len {
            let n = (len - at).min(CHUNK as u64);
            let f = f.clone();
            let data = tokio::task::spawn_blocking(move || -> Result<Vec<u8>, String> {
                let mut buf = vec![0u8; n as usize];
                f.read_exact_at(&mut buf, offset + at)
                    .map_err(|e| e.to_string())?;
                Ok(buf)
            })
            .await
            .map_err(|e| e.to_string())??;
            write_message(
                send,
                &Message::FileChunk {
                    offset: offset + at,
                    data,
                },
            )
            .await
            .map_err(|e| e.to_string())?;
            at += n;
        }
    }
    Ok(())
}

/// Fetches `tensors` (and the header, if `dest` does not exist yet) of the
/// model with `content` from the first of `sources` that has them, into
/// `dest`. Progress is logged and reported to `progress(done, total)`.
pub(crate) async fn fetch(
    endpoint: &Endpoint,
    sources: &[String],
    content: &str,
    dest: &Path,
    tensors: BTreeSet<String>,
    progress: &mut (dyn FnMut(u64, u64) + Send),
) -> Result<(), String> {
    let have = read_have(dest);
    let header = have.is_none();
    let missing: Vec<String> = tensors
        .into_iter()
        .filter(|t| have.as_ref().is_none_or(|h| !h.tensors.contains(t)))
        .collect();
    if missing.is_empty() && !header {
        return Ok(());
    }
    let mut errors = Vec::new();
    for id in senders(endpoint, sources) {
        let attempt = tokio::time::timeout(
            FETCH_TIMEOUT,
            fetch_from(endpoint, id, content, dest, header, &missing, progress),
        )
        .await
        .unwrap_or_else(|_| Err("timed out".into()));
        match attempt {
            Ok(()) => return Ok(()),
            Err(e) => {
                debug!("fetching weights from {}: {e}", id.short());
                errors.push(format!("{}: {e}", id.short()));
            }
        }
    }
    Err(none_sent(
        "the weights",
        "no member holds the model",
        &errors,
    ))
}

/// The members of `sources` (node ids) to receive from in turn: the
/// well-formed ids other than this node's.
pub(crate) fn senders<'a>(
    endpoint: &'a Endpoint,
    sources: &'a [String],
) -> impl Iterator<Item = NodeId> + 'a {
    sources
        .iter()
        .filter_map(|s| s.parse::<NodeId>().ok())
        .filter(move |id| *id != endpoint.id())
}

/// Why no member sent `what`: each one's error, or `none` when none was
/// asked.
pub(crate) fn none_sent(what: &str, none: &str, errors: &[String]) -> String {
    format!(
        "no member could send {what} ({})",
        if errors.is_empty() {
            none.to_string()
        } else {
            errors.join("; ")
        }
    )
}

async fn fetch_from(
    endpoint: &Endpoint,
    id: NodeId,
    content: &str,
    dest: &Path,
    header: bool,
    tensors: &[String],
    progress: &mut (dyn FnMut(u64, u64) + Send),
) -> Result<(), String> {
    use std::os::unix::fs::FileExt;
    let conn = endpoint.peer(id).ok_or("not connected")?;
    let (mut send, mut recv) = conn
        .open(stream_kind::WEIGHTS)
        .await
        .map_err(|e| e.to_string())?;
    let req = Control::Fetch {
        content: content.to_string(),
        header,
        tensors: tensors.to_vec(),
    };
    write_control(&mut send, &req)
        .await
        .map_err(|e| e.to_string())?;
    let _ = send.finish();
    let reply = read_control(&mut recv, limits::MAX_FRAME)
        .await
        .map_err(|e| e.to_string())?;
    let (file_len, header_len, pieces, leaves) = match reply {
        Control::Manifest {
            file_len,
            header_len,
            pieces,
            leaves,
        } => (file_len, header_len, pieces, leaves),
        Control::Failed { reason, .. } => return Err(reason),
        other => return Err(format!("unexpected reply {other:?}")),
    };
    // The tree must be the model's (its root is the content id we asked
    // for), and every part we receive must be where the tree says.
    if leaves.len() > 1 << 20 {
        return Err("the manifest's tree is too large".into());
    }
    let proven = proven_leaves(content, file_len, &leaves)?;
    let header_leaf = proven
        .get(HEADER_LEAF)
        .ok_or("the manifest's tree has no header")?;
    if header && header_leaf.len != header_len {
        return Err("the manifest's header length is not the tree's".into());
    }
    for p in &pieces {
        match proven.get(&p.name) {
            Some(l) if l.offset == p.offset && l.len == p.len => {}
            _ => return Err(format!("{} is not where the model's tree puts it", p.name)),
        }
    }
    // Every range must lie in the file, and the pieces must be the ones asked.
    let mut ranges: Vec<(u64, u64)> = Vec::new();
    if header {
        ranges.push((0, header_len));
    }
    for (p, want) in pieces.iter().zip(tensors) {
        if &p.name != want {
            return Err(format!("sent {} for {want}", p.name));
        }
        ranges.push((p.offset, p.len));
    }
    if pieces.len() != tensors.len()
        || file_len > MAX_PEER_FILE
        || ranges
            .iter()
            .any(|&(o, l)| o.checked_add(l).is_none_or(|e| e > file_len))
    {
        return Err("the manifest does not match the request".into());
    }
    // Once the header is here, the file's length and every piece's range
    // come from it, not from the sender's word.
    if !header {
        let Layout(_, _, layout) = layout(dest)?;
        let end = layout
            .values()
            .map(|&(o, l)| o.saturating_add(l))
            .max()
            .unwrap_or(0);
        let misplaced = pieces
            .iter()
            .any(|p| layout.get(&p.name) != Some(&(p.offset, p.len)));
        if misplaced || file_len < end {
            return Err("the manifest disagrees with the model's header".into());
        }
    }
    let total: u64 = ranges.iter().map(|r| r.1).sum();
    if let Some(dir) = dest.parent() {
        std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
    }
    let f = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .read(true)
        .truncate(false)
        .open(dest)
        .map_err(|e| format!("{}: {e}", dest.display()))?;
    let len_now = f.metadata().map_err(|e| e.to_string())?.len();
    if len_now != file_len {
        f.set_len(file_len).map_err(|e| e.to_string())?;
    }
    let started = Instant::now();
    let mut done = 0u64;
    let mut last_log = Instant::now();
    for &(offset, len) in &ranges {
        let mut at = 0u64;
        while at < len {
            let msg = read_message(&mut recv, limits::MAX_FRAME)
                .await
                .map_err(|e| e.to_string())?
                .ok_or("the sender stopped early")?;
            let Message::FileChunk { offset: o, data } = msg else {
                return Err(format!("expected a file chunk, got {}", msg.name()));
            };
            if o != offset + at || data.is_empty() || data.len() as u64 > len - at {
                return Err(format!("chunk at {o} of {} bytes out of place", data.len()));
            }
            f.write_all_at(&data, o).map_err(|e| e.to_string())?;
            at += data.len() as u64;
            done += data.len() as u64;
            progress(done, total);
            if last_log.elapsed() > Duration::from_secs(1) {
                last_log = Instant::now();
                info!(
                    "receiving weights from {}: {:.0}%",
                    id.short(),
                    done as f64 * 100.0 / total.max(1) as f64
                );
            }
        }
    }
    // Verify what arrived against the model's tree before recording it.
    let verify = |offset: u64, len: u64| blake3_range(&f, offset, len);
    if header && verify(0, header_len)? != header_leaf.blake3 {
        return Err("the header is not the model's".into());
    }
    let mut have = read_have(dest).unwrap_or(Have {
        content: content.to_string(),
        tensors: BTreeSet::new(),
        leaves: leaves.clone(),
    });
    for p in &pieces {
        let want = proven.get(&p.name).map(|l| l.blake3.as_str());
        if Some(verify(p.offset, p.len)?.as_str()) != want {
            return Err(format!("{} is not the model's (its hash differs)", p.name));
        }
        have.tensors.insert(p.name.clone());
    }
    if have.leaves.is_empty() {
        have.leaves = leaves;
    }
    f.sync_all().map_err(|e| e.to_string())?;
    let doc = serde_json::to_vec_pretty(&have).map_err(|e| e.to_string())?;
    hearth_models::durable::write(&have_path(dest), &doc).map_err(|e| e.to_string())?;
    info!(
        from = %id.short(),
        tensors = pieces.len(),
        bytes = done,
        secs = started.elapsed().as_secs_f64(),
        "received weights"
    );
    Ok(())
}

/// Largest model file a peer may announce (the largest open models are
/// a few hundred GB).
pub const MAX_PEER_FILE: u64 = 2 << 40;

/// The file name a model received from peers is stored under, from the
/// name and content id a member's profile gives: a plain name of safe
/// characters (a hub id's `/` and `:` spelled `--` and `_`), never a path,
/// so nothing is written outside the models folder.
pub fn peer_file_name(model: &str, content: &str) -> Result<String, String> {
    // A hub id (`ORG/NAME:QUANT`) as one name: `ORG--NAME_QUANT`.
    let model = &model.replace('/', "--").replace(':', "_");
    let safe_name = !model.is_empty()
        && model.len() <= 128
        && !model.starts_with('.')
        && model
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if !safe_name {
        return Err(format!(
            "a member names its model {:?}: not a plain file name",
            model.chars().take(64).collect::<String>()
        ));
    }
    let hex = !content.is_empty()
        && content.len() <= 128
        && content.bytes().all(|b| b.is_ascii_hexdigit());
    if !hex {
        return Err("a member gives a content id that is not hexadecimal".into());
    }
    Ok(format!(
        "{model}-{}.gguf",
        &content[..content.len().min(12)]
    ))
}

/// Every tensor of the model file at `path` (its header must be there).
pub(crate) fn all_tensors(path: &Path) -> Result<BTreeSet<String>, String> {
    let Layout(_, _, all) = layout(path)?;
    Ok(all.into_keys().collect())
}

/// The tensors of `spec` in the model file at `path` (its header must be there).
pub(crate) fn needed(path: &Path, spec: StageSpec) -> Result<BTreeSet<String>, String> {
    let Layout(_, _, all) = layout(path)?;
    Ok(stage_tensors(all.into_keys(), spec))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_content_id_is_the_root_of_a_tree_that_proves_each_piece() {
        let dir = tempfile::tempdir().unwrap();
        let m = hearth_test_utils::tiny_model(dir.path(), hearth_test_utils::TinySpec::default())
            .unwrap();
        let path = m.gguf_q8_0;
        let (len, tree) = leaves(&path).unwrap();
        assert_eq!(tree[0].name, HEADER_LEAF);
        let root = content_root(len, &tree);
        assert_eq!(crate::profile::content_hash(&path).unwrap(), root);
        assert!(proven_leaves(&root, len, &tree).is_ok());
        // A tree with one leaf, one offset or the length changed is not
        // the model's.
        let mut bad = tree.clone();
        bad[1].blake3 = "00".repeat(32);
        assert!(proven_leaves(&root, len, &bad).is_err());
        let mut moved = tree.clone();
        moved[2].offset += 32;
        assert!(proven_leaves(&root, len, &moved).is_err());
        assert!(proven_leaves(&root, len + 1, &tree).is_err());
        // A poisoned copy: one byte of one tensor changed. Its tensor's
        // leaf differs from the tree's (so the piece is refused), the
        // others do not, and its root is another content id.
        let poisoned = dir.path().join("poisoned.gguf");
        let mut bytes = std::fs::read(&path).unwrap();
        let victim = &tree[tree.len() / 2];
        bytes[(victim.offset + victim.len / 2) as usize] ^= 0x55;
        std::fs::write(&poisoned, bytes).unwrap();
        let (plen, ptree) = leaves(&poisoned).unwrap();
        for (a, b) in tree.iter().zip(&ptree) {
            assert_eq!(a.name == victim.name, a.blake3 != b.blake3, "{}", a.name);
        }
        assert_ne!(content_root(plen, &ptree), root);
    }

    #[test]
    fn a_stage_reads_its_layers_the_ends_it_holds_and_the_rope_tables() {
        let all = [
            "token_embd.weight",
            "output_norm.weight",
            "rope_freqs.weight",
            "rope_factors_long.weight",
            "rope_factors_short.weight",
            "blk.0.attn_q.weight",
            "blk.1.attn_q.weight",
            "blk.1.attn_q_norm.weight",
            "blk.2.ffn_up.weight",
            "blk.x.bogus",
            "other.weight",
        ]
        .map(String::from);
        let spec = StageSpec {
            start: 1,
            end: 2,
            embed: false,
            head: false,
        };
        let got = stage_tensors(all.iter().cloned(), spec);
        let want: BTreeSet<String> = [
            "rope_freqs.weight",
            "rope_factors_long.weight",
            "rope_factors_short.weight",
            "blk.1.attn_q.weight",
            "blk.1.attn_q_norm.weight",
        ]
        .map(String::from)
        .into();
        assert_eq!(got, want);
        // The last stage of a tied model reads the embedding as its head.
        let last = StageSpec {
            start: 2,
            end: 3,
            embed: false,
            head: true,
        };
        let got = stage_tensors(all.iter().cloned(), last);
        assert!(got.contains("token_embd.weight") && got.contains("output_norm.weight"));
        assert!(got.contains("rope_freqs.weight") && !got.contains("blk.1.attn_q.weight"));
    }

    #[test]
    fn a_peers_model_name_is_a_plain_file_name() {
        assert_eq!(
            peer_file_name("SmolLM2-135M.Q4_1", "b179c9523d0e6a0f98a330c7").unwrap(),
            "SmolLM2-135M.Q4_1-b179c9523d0e.gguf"
        );
        // Hub ids become one plain name.
        assert_eq!(
            peer_file_name("acme/tiny-GGUF:Q8_0", "ab12").unwrap(),
            "acme--tiny-GGUF_Q8_0-ab12.gguf"
        );
        assert_eq!(
            peer_file_name("/etc/passwd", "ab12").unwrap(),
            "--etc--passwd-ab12.gguf"
        );
        for bad in [
            "../evil",
            "./a",
            ".hidden",
            "",
            "a\\b",
            "x\0y",
            &"a".repeat(200),
        ] {
            assert!(peer_file_name(bad, "ab12").is_err(), "{bad:?}");
        }
        for bad in ["", "../x", "zz", &"a".repeat(200)] {
            assert!(peer_file_name("m", bad).is_err(), "{bad:?}");
        }
    }
}
