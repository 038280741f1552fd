//! Models from the Hugging Face hub: `ORG/NAME[:QUANT]`.
//!
//! Downloads go through the `hf-hub` crate into the hub's own cache layout
//! (`$HF_HUB_CACHE`, else `$HF_HOME/hub`, else `~/.cache/huggingface/hub`:
//! `models--ORG--NAME/{blobs,snapshots/COMMIT,refs/main}`), so Python tools
//! and Hearth share one copy. `HF_ENDPOINT` picks the hub (or a mirror),
//! `HF_TOKEN` (else the token file beside the cache) authorizes gated
//! repositories, and an interrupted download resumes from its partial
//! blob. Each large (LFS) file is checked against the SHA-256 the hub names
//! it by before it is used.
//!
//! What is trusted: the hub endpoint's file names and headers shape where
//! `hf-hub` writes in the cache (the official hub over HTTPS, or a mirror the
//! user chose). File names from its listing are checked before they are
//! asked for, and the file contents are verified by hash and by the loaders.

use std::io::Read;
use std::path::{Path, PathBuf};

use hf_hub::api::Progress;
use hf_hub::api::sync::{Api, ApiBuilder, ApiRepo};
use hf_hub::{Cache, Repo, RepoType};
use sha2::{Digest, Sha256};

use crate::error::{ModelError, Result};
use crate::store::PullEvent;

/// The quantization picked when a repository holds several and none is named.
pub const PREFERRED_QUANT: &str = "Q4_K_M";

/// Side files a Hugging Face model folder may carry besides its weights.
const FOLDER_FILES: &[&str] = &[
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
    "model.safetensors.index.json",
];

/// Most files one pull fetches (a repository's listing is not bounded).
const MAX_FILES: usize = 256;

/// `ORG/NAME[:QUANT]`: a model repository and, for a repository of GGUF
/// files, which quantization.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubRef {
    pub repo: String,
    pub quant: Option<String>,
}

fn bad(s: &str, why: &str) -> ModelError {
    ModelError::NotFound {
        what: s.to_string(),
        hint: format!(" ({why}; expected ORG/NAME or ORG/NAME:QUANT)"),
    }
}

/// A part of a repository id: letters, digits, `-`, `_`, `.`; not `.` or `..`.
fn id_part(p: &str) -> bool {
    !p.is_empty()
        && p.len() <= 96
        && p != "."
        && p != ".."
        && p.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

impl HubRef {
    /// Parses `ORG/NAME[:QUANT]`.
    pub fn parse(s: &str) -> Result<Self> {
        let s = s.trim();
        let (repo, quant) = match s.split_once(':') {
            Some((r, q)) => (r, Some(q)),
            None => (s, None),
        };
        let Some((org, name)) = repo.split_once('/') else {
            return Err(bad(s, "no ORG/"));
        };
        if !id_part(org) || !id_part(name) {
            return Err(bad(s, "not a repository id"));
        }
        let quant = match quant {
            Some(q) if id_part(q) => Some(q.to_string()),
            Some(_) => return Err(bad(s, "not a quantization name")),
            None => None,
        };
        Ok(Self {
            repo: repo.to_string(),
            quant,
        })
    }

    /// The cache folder name, `models--ORG--NAME`.
    pub fn folder(&self) -> String {
        format!("models--{}", self.repo.replace('/', "--"))
    }
}

/// The hub cache root: `$HF_HUB_CACHE`, `$HF_HOME/hub` or
/// `~/.cache/huggingface/hub`.
pub fn hub_cache() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("HF_HUB_CACHE") {
        return Some(PathBuf::from(p));
    }
    if let Some(p) = std::env::var_os("HF_HOME") {
        return Some(PathBuf::from(p).join("hub"));
    }
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/huggingface/hub"))
}

/// Whether a file name from a listing is a plain relative path inside the
/// repository (no `..`, no absolute path, no backslash or control bytes).
fn safe_repo_path(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 512
        && !name.starts_with('/')
        && !name.chars().any(|c| c == '\\' || c.is_control())
        && name
            .split('/')
            .all(|p| !p.is_empty() && p != "." && p != "..")
}

/// The file name's quantization tag matches `quant`: the tag appears
/// between separators (`-`, `.`, `/`, `_` before it), case-insensitively,
/// so `Q4_K` does not pick `Q4_K_M`.
fn names_quant(file: &str, quant: &str) -> bool {
    let f = file.to_ascii_lowercase();
    let q = quant.to_ascii_lowercase();
    let mut from = 0;
    while let Some(i) = f[from..].find(&q) {
        let at = from + i;
        let before = f[..at].chars().last();
        let after = f[at + q.len()..].chars().next();
        let sep = |c: Option<char>| c.is_none_or(|c| matches!(c, '-' | '.' | '/' | '_'));
        let end = |c: Option<char>| c.is_none_or(|c| matches!(c, '-' | '.' | '/'));
        if sep(before) && end(after) {
            return true;
        }
        from = at + 1;
    }
    false
}

/// The parts of a split GGUF (`…-00001-of-00003.gguf`): its index and count.
fn split_part(file: &str) -> Option<(u32, u32)> {
    let stem = file.strip_suffix(".gguf")?;
    let (rest, of) = stem.rsplit_once("-of-")?;
    let (_, idx) = rest.rsplit_once('-')?;
    Some((idx.parse().ok()?, of.parse().ok()?))
}

/// Which GGUF files of `names` to use for `quant`: one file, or every part
/// of a split one (in order). None named: the only quantization there is,
/// else [`PREFERRED_QUANT`]; else an error listing what there is.
pub fn pick_gguf(repo: &str, names: &[String], quant: Option<&str>) -> Result<Vec<String>> {
    let ggufs: Vec<&String> = names.iter().filter(|n| n.ends_with(".gguf")).collect();
    // Group split parts under their base name, with the file they join
    // into (`NAME.gguf` beside `NAME-0000i-of-0000N.gguf`).
    let group = |n: &str| -> String {
        match split_part(n) {
            Some(_) => n
                .rsplit_once("-of-")
                .and_then(|(r, _)| r.rsplit_once('-'))
                .map_or(n.to_string(), |(base, _)| base.to_string()),
            None => n.strip_suffix(".gguf").unwrap_or(n).to_string(),
        }
    };
    let mut groups: Vec<String> = ggufs.iter().map(|n| group(n)).collect();
    groups.sort();
    groups.dedup();
    let chosen: Vec<&String> = match quant {
        Some(q) => groups.iter().filter(|g| names_quant(g, q)).collect(),
        None if groups.len() == 1 => groups.iter().collect(),
        None => groups
            .iter()
            .filter(|g| names_quant(g, PREFERRED_QUANT))
            .collect(),
    };
    // Each group as its first file's name.
    let list = || {
        groups
            .iter()
            .filter_map(|g| ggufs.iter().find(|n| group(n) == *g))
            .map(|n| n.rsplit('/').next().unwrap_or(n).to_string())
            .collect::<Vec<_>>()
            .join(", ")
    };
    let base = match chosen.as_slice() {
        [one] => (*one).clone(),
        [] => {
            return Err(ModelError::NotFound {
                what: match quant {
                    Some(q) => format!("{repo}:{q}"),
                    None => repo.to_string(),
                },
                hint: format!(" (its GGUF files: {}; name one as {repo}:QUANT)", list()),
            });
        }
        many => {
            return Err(ModelError::NotFound {
                what: format!("{repo}:{}", quant.unwrap_or(PREFERRED_QUANT)),
                hint: format!(
                    " (several files match: {}; name one more exactly)",
                    many.iter()
                        .map(|s| s.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            });
        }
    };
    // A joined file stands for its parts.
    if let Some(joined) = ggufs
        .iter()
        .find(|n| group(n) == base && split_part(n).is_none())
    {
        return Ok(vec![(*joined).clone()]);
    }
    let mut files: Vec<(u32, String)> = ggufs
        .iter()
        .filter(|n| group(n) == base)
        .map(|n| (split_part(n).map_or(1, |(i, _)| i), (*n).clone()))
        .collect();
    files.sort();
    if let Some((_, of)) = files.first().and_then(|(_, n)| split_part(n))
        && (files.len() != of as usize
            || files
                .iter()
                .enumerate()
                .any(|(i, (k, _))| *k as usize != i + 1))
    {
        return Err(ModelError::NotFound {
            what: base,
            hint: format!(
                " (a GGUF split in {of} parts, of which the repository lists {})",
                files.len()
            ),
        });
    }
    Ok(files.into_iter().map(|(_, n)| n).collect())
}

/// What a pull fetches from a listing: the GGUF file(s) picked for the
/// quantization, or a model folder (config, tokenizer, template and
/// safetensors). Returns the files and whether they are a folder.
/// Mistral's own weight files (`consolidated.safetensors`,
/// `consolidated-00001-of-00002.safetensors`).
pub fn is_consolidated(name: &str) -> bool {
    name.rsplit('/')
        .next()
        .is_some_and(|n| n.starts_with("consolidated") && n.ends_with(".safetensors"))
}

pub fn plan_files(r: &HubRef, names: &[String]) -> Result<(Vec<String>, bool)> {
    let names: Vec<String> = names
        .iter()
        .filter(|n| safe_repo_path(n))
        .cloned()
        .collect();
    let has = |n: &str| names.iter().any(|x| x == n);
    let mut safetensors: Vec<String> = names
        .iter()
        .filter(|n| !n.contains('/') && n.ends_with(".safetensors"))
        .cloned()
        .collect();
    // Mistral's repositories carry the weights twice: in Hugging Face's
    // layout and as `consolidated*.safetensors` in Mistral's own.
    if safetensors.iter().any(|n| !is_consolidated(n)) {
        safetensors.retain(|n| !is_consolidated(n));
    }
    let folder = has("config.json") && !safetensors.is_empty();
    let files = if r.quant.is_some() || !folder {
        if !names.iter().any(|n| n.ends_with(".gguf")) {
            return Err(ModelError::NotFound {
                what: r.repo.clone(),
                hint: " (the repository has neither GGUF files nor config.json with safetensors)"
                    .into(),
            });
        }
        (pick_gguf(&r.repo, &names, r.quant.as_deref())?, false)
    } else {
        let mut files: Vec<String> = FOLDER_FILES
            .iter()
            .filter(|f| has(f))
            .map(|f| f.to_string())
            .collect();
        // Mistral's tokenizer where there is no `tokenizer.json`.
        if !has("tokenizer.json") && has("tekken.json") {
            files.push("tekken.json".into());
        }
        files.extend(safetensors);
        (files, true)
    };
    if files.0.len() > MAX_FILES {
        return Err(ModelError::Pull(format!(
            "{} lists {} files to fetch; at most {MAX_FILES}",
            r.repo,
            files.0.len()
        )));
    }
    Ok(files)
}

/// Forwards `hf-hub`'s byte counts as [`PullEvent::Bytes`].
struct Forward<'a> {
    progress: &'a mut dyn FnMut(PullEvent),
    done: u64,
    total: u64,
}

impl Progress for Forward<'_> {
    fn init(&mut self, size: usize, _filename: &str) {
        self.total = size as u64;
        self.done = 0;
    }
    fn update(&mut self, size: usize) {
        self.done = self.done.saturating_add(size as u64);
        (self.progress)(PullEvent::Bytes {
            done: self.done,
            total: self.total,
        });
    }
    fn finish(&mut self) {}
}

fn api(cache: &Path) -> Result<Api> {
    let cache = Cache::new(cache.to_path_buf());
    let token = std::env::var("HF_TOKEN")
        .ok()
        .map(|t| t.trim().to_string())
        .filter(|t| !t.is_empty())
        .or_else(|| cache.token());
    let mut b = ApiBuilder::from_cache(cache)
        .with_progress(false)
        .with_retries(3)
        .with_token(token)
        .with_user_agent("hearth", env!("CARGO_PKG_VERSION"));
    if let Ok(endpoint) = std::env::var("HF_ENDPOINT") {
        b = b.with_endpoint(endpoint.trim_end_matches('/').to_string());
    }
    b.build().map_err(|e| ModelError::Pull(e.to_string()))
}

/// Runs `f` (which calls into `hf-hub`) with a panic in it, e.g. on a
/// malformed reply, turned into an error.
fn guarded<T>(what: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or_else(|_| {
        Err(ModelError::Pull(format!(
            "{what}: the hub's reply could not be handled"
        )))
    })
}

fn hub_error(repo: &str, e: hf_hub::api::sync::ApiError) -> ModelError {
    let text = e.to_string();
    // The status as the HTTP client words it: a bare "403" also matches a
    // port or a path in the URL the message quotes.
    let status = |code: &str| text.contains(&format!("status code {code}"));
    let hint = if status("401") || status("403") {
        " (a gated or private repository: set HF_TOKEN to a token with access)"
    } else if status("404") {
        " (no such repository or file on the hub)"
    } else {
        ""
    };
    ModelError::Pull(format!("{repo}: {text}{hint}"))
}

/// Streams a file through SHA-256.
fn sha256_file(path: &Path) -> Result<String> {
    let mut f = std::fs::File::open(path).map_err(|e| ModelError::io(path, e))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(|e| ModelError::io(path, e))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(format!("{:x}", h.finalize()))
}

/// Checks a downloaded file: it lies inside `cache`, and a blob the hub
/// names by its SHA-256 (LFS files) has that hash; a blob that does not is
/// removed with its snapshot link.
fn verify(cache: &Path, link: &Path) -> Result<()> {
    let real = std::fs::canonicalize(link).map_err(|e| ModelError::io(link, e))?;
    let root = std::fs::canonicalize(cache).map_err(|e| ModelError::io(cache, e))?;
    if !real.starts_with(&root) {
        return Err(ModelError::Pull(format!(
            "{} was written outside the hub cache",
            link.display()
        )));
    }
    let name = real
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    if name.len() == 64 && name.chars().all(|c| c.is_ascii_hexdigit()) {
        let got = sha256_file(&real)?;
        if !got.eq_ignore_ascii_case(&name) {
            let _ = std::fs::remove_file(&real);
            let _ = std::fs::remove_file(link);
            return Err(ModelError::Pull(format!(
                "{}: content hash {got} is not the hub's {name}; removed",
                link.display()
            )));
        }
    }
    Ok(())
}

fn download(
    repo: &ApiRepo,
    r: &HubRef,
    cache: &Path,
    file: &str,
    progress: &mut dyn FnMut(PullEvent),
) -> Result<PathBuf> {
    progress(PullEvent::Step(format!("fetching {}/{file}", r.repo)));
    let path = guarded(file, || {
        repo.download_with_progress(
            file,
            Forward {
                progress: &mut *progress,
                done: 0,
                total: 0,
            },
        )
        .map_err(|e| hub_error(&r.repo, e))
    })?;
    verify(cache, &path)?;
    Ok(path)
}

/// Fetches `r` into the hub cache `cache` (the files not there yet for the
/// repository's current `main`); returns what loads it: the GGUF file (the
/// first part of a split one) or the snapshot folder.
pub fn pull_into(cache: &Path, r: &HubRef, progress: &mut dyn FnMut(PullEvent)) -> Result<PathBuf> {
    std::fs::create_dir_all(cache).map_err(|e| ModelError::io(cache, e))?;
    let api = api(cache)?;
    let repo = api.repo(Repo::with_revision(
        r.repo.clone(),
        RepoType::Model,
        "main".into(),
    ));
    progress(PullEvent::Step(format!("listing {}", r.repo)));
    let info = guarded(&r.repo, || repo.info().map_err(|e| hub_error(&r.repo, e)))?;
    let names: Vec<String> = info.siblings.into_iter().map(|s| s.rfilename).collect();
    let (files, folder) = plan_files(r, &names)?;
    // A split GGUF joined by an earlier pull.
    if !folder
        && files.len() > 1
        && let Some(snap) = snapshot(cache, r)
        && let Some((_, joined)) = files
            .first()
            .and_then(|f| crate::split::parts_of(&snap.join(f)))
        && joined.is_file()
    {
        progress(PullEvent::Done(joined.clone()));
        return Ok(joined);
    }
    // Files already in `main`'s snapshot (a commit id names it) are kept.
    let snap = (info.sha.len() == 40 && info.sha.bytes().all(|b| b.is_ascii_hexdigit()))
        .then(|| cache.join(r.folder()).join("snapshots").join(&info.sha));
    let mut fetched = Vec::with_capacity(files.len());
    for f in &files {
        let kept = snap
            .as_ref()
            .map(|s| s.join(f))
            .filter(|p| p.is_file() && verify(cache, p).is_ok());
        match kept {
            Some(p) => {
                progress(PullEvent::Step(format!("{}/{f} is already here", r.repo)));
                fetched.push(p);
            }
            None => fetched.push(download(&repo, r, cache, f, progress)?),
        }
    }
    let Some(first) = fetched.first().cloned() else {
        return Err(ModelError::Pull(format!("{}: nothing to fetch", r.repo)));
    };
    // `main` is the snapshot the files came from, fetched or kept.
    if let Some(snap) = &snap
        && let Some(name) = snap.file_name()
    {
        let refs = cache.join(r.folder()).join("refs");
        let _ = std::fs::create_dir_all(&refs);
        let _ = crate::durable::write(&refs.join("main"), name.to_string_lossy().as_bytes());
    }
    let out = if folder {
        first
            .parent()
            .map(Path::to_path_buf)
            .ok_or_else(|| ModelError::Pull("no snapshot folder".into()))?
    } else if fetched.len() > 1 {
        join_parts(cache, &fetched, progress)?
    } else {
        first
    };
    progress(PullEvent::Done(out.clone()));
    Ok(out)
}

/// Joins a split GGUF's downloaded parts into one file beside them (what
/// the rest of Hearth loads and sends between members), then removes the
/// parts and their blobs so the model is on disk once.
fn join_parts(
    cache: &Path,
    parts: &[PathBuf],
    progress: &mut dyn FnMut(PullEvent),
) -> Result<PathBuf> {
    let first = parts
        .first()
        .ok_or_else(|| ModelError::Pull("no parts".into()))?;
    let Some((named, joined)) = crate::split::parts_of(first) else {
        return Err(ModelError::Pull(format!(
            "{}: split parts that are not named NAME-00001-of-0000N.gguf",
            first.display()
        )));
    };
    if named != parts {
        return Err(ModelError::Pull(format!(
            "{}: the parts fetched are not the {} its name says",
            first.display(),
            named.len()
        )));
    }
    progress(PullEvent::Step(format!(
        "joining {} parts into {}",
        parts.len(),
        joined.display()
    )));
    crate::split::join(parts, &joined, &mut |done, total| {
        progress(PullEvent::Bytes { done, total })
    })?;
    let root = cache.canonicalize().map_err(|e| ModelError::io(cache, e))?;
    for p in parts {
        // The snapshot's link, and the blob it points to (inside the cache).
        let linked = std::fs::symlink_metadata(p).is_ok_and(|m| m.file_type().is_symlink());
        if linked
            && let Ok(blob) = p.canonicalize()
            && blob.starts_with(&root)
        {
            std::fs::remove_file(&blob).map_err(|e| ModelError::io(&blob, e))?;
        }
        std::fs::remove_file(p).map_err(|e| ModelError::io(p, e))?;
    }
    Ok(joined)
}

/// [`pull_into`] the hub cache of this machine.
pub fn pull(r: &HubRef, progress: &mut dyn FnMut(PullEvent)) -> Result<PathBuf> {
    let cache = hub_cache().ok_or_else(|| {
        ModelError::Pull("no hub cache folder: set HF_HOME or HF_HUB_CACHE".into())
    })?;
    pull_into(&cache, r, progress)
}

/// The snapshot of `main` for a repository in `cache` (`refs/main`), else
/// the most recently written snapshot.
fn snapshot(cache: &Path, r: &HubRef) -> Option<PathBuf> {
    let root = cache.join(r.folder());
    let snaps = root.join("snapshots");
    if let Ok(commit) = std::fs::read_to_string(root.join("refs/main")) {
        let commit = commit.trim();
        if id_part(commit) {
            let d = snaps.join(commit);
            if d.is_dir() {
                return Some(d);
            }
        }
    }
    std::fs::read_dir(&snaps)
        .ok()?
        .filter_map(|e| e.ok())
        .filter(|e| e.path().is_dir())
        .max_by_key(|e| e.metadata().and_then(|m| m.modified()).ok())
        .map(|e| e.path())
}

/// Every file under `dir`, as paths relative to it (bounded depth).
fn files_under(dir: &Path) -> Vec<String> {
    fn walk(base: &Path, d: &Path, depth: usize, out: &mut Vec<String>) {
        let Ok(rd) = std::fs::read_dir(d) else {
            return;
        };
        for e in rd.filter_map(|e| e.ok()) {
            let p = e.path();
            if p.is_dir() && depth < 4 {
                walk(base, &p, depth + 1, out);
            } else if p.is_file()
                && let Ok(rel) = p.strip_prefix(base)
            {
                out.push(rel.to_string_lossy().into_owned());
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, dir, 0, &mut out);
    out.sort();
    out
}

/// Finds `r` in the hub cache `cache` without the network: in `main`'s
/// snapshot, the model folder, or the GGUF picked as [`pull_into`] picks it.
pub fn find_in(cache: &Path, r: &HubRef) -> Option<PathBuf> {
    let snap = snapshot(cache, r)?;
    let names = files_under(&snap);
    let (files, folder) = plan_files(r, &names).ok()?;
    if folder {
        return Some(snap);
    }
    let first = snap.join(files.first()?);
    first.is_file().then_some(first)
}

/// [`find_in`] this machine's hub cache.
pub fn find(r: &HubRef) -> Option<PathBuf> {
    find_in(&hub_cache()?, r)
}

/// The quantization tag of a GGUF file name (`…-Q4_K_M.gguf` → `Q4_K_M`),
/// if it has one.
pub fn quant_tag(file: &str) -> Option<String> {
    let name = file.rsplit('/').next().unwrap_or(file);
    let stem = name.strip_suffix(".gguf")?;
    let stem = match split_part(name) {
        Some(_) => stem
            .rsplit_once("-of-")
            .and_then(|(r, _)| r.rsplit_once('-'))
            .map_or(stem, |(b, _)| b),
        None => stem,
    };
    stem.rsplit(['-', '.'])
        .find(|t| {
            let u = t.to_ascii_uppercase();
            let digits = u.trim_start_matches('I').trim_start_matches('Q');
            (u.starts_with('Q') || u.starts_with("IQ"))
                && digits.chars().next().is_some_and(|c| c.is_ascii_digit())
                || matches!(u.as_str(), "F16" | "F32" | "BF16")
        })
        .map(str::to_string)
}

/// The models of the hub cache `cache`, each under the id that loads it:
/// `ORG/NAME` for a folder, `ORG/NAME:QUANT` for each quantization of GGUF
/// files (`ORG/NAME` for a lone GGUF whose name has no quantization tag).
pub fn list_in(cache: &Path) -> Vec<crate::store::ModelEntry> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir(cache) else {
        return out;
    };
    for e in rd.filter_map(|e| e.ok()) {
        let dirname = e.file_name().to_string_lossy().into_owned();
        let Some(rest) = dirname.strip_prefix("models--") else {
            continue;
        };
        let Ok(r) = HubRef::parse(&rest.replacen("--", "/", 1)) else {
            continue;
        };
        let Some(snap) = snapshot(cache, &r) else {
            continue;
        };
        let names = files_under(&snap);
        let size = |p: &Path| std::fs::metadata(p).map_or(0, |m| m.len());
        if let Ok((files, true)) = plan_files(&r, &names) {
            let bytes = files.iter().map(|f| size(&snap.join(f))).sum();
            out.push(crate::store::ModelEntry {
                name: r.repo.clone(),
                path: snap.clone(),
                format: "safetensors",
                bytes,
            });
            continue;
        }
        let mut tags: Vec<Option<String>> = names
            .iter()
            .filter(|n| n.ends_with(".gguf"))
            .map(|n| quant_tag(n))
            .collect();
        tags.sort();
        tags.dedup();
        let single = tags.len() == 1;
        for tag in tags {
            if tag.is_none() && !single {
                continue;
            }
            let r = HubRef {
                repo: r.repo.clone(),
                quant: tag,
            };
            let Ok((files, false)) = plan_files(&r, &names) else {
                continue;
            };
            let Some(first) = files.first() else {
                continue;
            };
            out.push(crate::store::ModelEntry {
                name: match &r.quant {
                    Some(q) => format!("{}:{q}", r.repo),
                    None => r.repo.clone(),
                },
                path: snap.join(first),
                format: "gguf",
                bytes: files.iter().map(|f| size(&snap.join(f))).sum(),
            });
        }
    }
    out
}

/// Removes a model from the hub cache `cache`: with a quantization
/// (`ORG/NAME:QUANT`), only the GGUF files whose quantization tag is that
/// one (in every snapshot; split parts and the file they were joined
/// into) and the blobs no other file uses, the repository going too once
/// it holds no model file; without one, the whole repository. Links are
/// never followed out of the repository. Returns whether it was there.
pub fn remove_in(cache: &Path, r: &HubRef) -> Result<bool> {
    let dir = cache.join(r.folder());
    if !dir.is_dir() {
        return Ok(false);
    }
    let Some(quant) = &r.quant else {
        std::fs::remove_dir_all(&dir).map_err(|e| ModelError::io(&dir, e))?;
        return Ok(true);
    };
    let root = std::fs::canonicalize(&dir).map_err(|e| ModelError::io(&dir, e))?;
    // Every file (or link to a blob) in the snapshots, without following a
    // linked folder.
    fn walk(d: &Path, depth: usize, out: &mut Vec<PathBuf>) {
        let Ok(rd) = std::fs::read_dir(d) else {
            return;
        };
        for e in rd.filter_map(|e| e.ok()) {
            let Ok(t) = e.file_type() else { continue };
            if t.is_dir() && depth < 4 {
                walk(&e.path(), depth + 1, out);
            } else if t.is_file() || t.is_symlink() {
                out.push(e.path());
            }
        }
    }
    let mut files = Vec::new();
    walk(&dir.join("snapshots"), 0, &mut files);
    let is_quant = |p: &Path| {
        let name = p.file_name().map(|n| n.to_string_lossy().into_owned());
        name.as_deref().is_some_and(|n| {
            n.ends_with(".gguf") && quant_tag(n).is_some_and(|t| t.eq_ignore_ascii_case(quant))
        })
    };
    let (gone, kept): (Vec<PathBuf>, Vec<PathBuf>) = files.into_iter().partition(|p| is_quant(p));
    if gone.is_empty() {
        return Ok(false);
    }
    let mut dropped_blobs = Vec::new();
    for p in &gone {
        // Inside the repository (its folder, not a linked one elsewhere).
        let parent = p.parent().and_then(|d| std::fs::canonicalize(d).ok());
        if !parent.is_some_and(|d| d.starts_with(&root)) {
            continue;
        }
        if let Ok(blob) = std::fs::canonicalize(p) {
            dropped_blobs.push(blob);
        }
        std::fs::remove_file(p).map_err(|e| ModelError::io(p, e))?;
    }
    let model_left = kept.iter().any(|p| {
        p.extension()
            .is_some_and(|x| x == "gguf" || x == "safetensors")
    });
    if !model_left {
        std::fs::remove_dir_all(&dir).map_err(|e| ModelError::io(&dir, e))?;
        return Ok(true);
    }
    let used: std::collections::HashSet<PathBuf> = kept
        .iter()
        .filter_map(|p| std::fs::canonicalize(p).ok())
        .collect();
    let blobs = root.join("blobs");
    for b in dropped_blobs {
        // Only the repository's own blobs, and only when nothing uses them.
        if !used.contains(&b) && b.starts_with(&blobs) {
            std::fs::remove_file(&b).map_err(|e| ModelError::io(&b, e))?;
        }
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn references_parse_and_hostile_ones_are_refused() {
        assert_eq!(
            HubRef::parse("bartowski/Llama-3.2-1B-Instruct-GGUF:Q4_K_M").unwrap(),
            HubRef {
                repo: "bartowski/Llama-3.2-1B-Instruct-GGUF".into(),
                quant: Some("Q4_K_M".into())
            }
        );
        assert_eq!(HubRef::parse("Qwen/Qwen3-0.6B").unwrap().quant, None);
        for bad in [
            "noslash",
            "../etc/passwd",
            "a/../b",
            "a/b/c",
            "/abs/x",
            "a/b:../../x",
            "a/b:",
            "a/ b",
            "a\\b/c",
            &format!("a/{}", "x".repeat(200)),
        ] {
            assert!(HubRef::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn quantization_tags_match_whole() {
        assert!(names_quant("Llama-3.2-1B-Instruct-Q4_K_M.gguf", "q4_k_m"));
        assert!(!names_quant("Llama-3.2-1B-Instruct-Q4_K_M.gguf", "Q4_K"));
        assert!(names_quant("model.Q4_K.gguf", "Q4_K"));
        assert!(names_quant("Q8_0/model-00001-of-00002.gguf", "Q8_0"));
        assert!(!names_quant("model-Q8_0.gguf", "Q8"));
    }

    #[test]
    fn gguf_picks_one_quant_every_split_part_or_says_what_there_is() {
        let list = names(&[
            "README.md",
            "m-Q4_K_M.gguf",
            "m-Q8_0.gguf",
            "m-Q4_K_S.gguf",
            "big/m-F16-00002-of-00002.gguf",
            "big/m-F16-00001-of-00002.gguf",
        ]);
        assert_eq!(pick_gguf("o/m", &list, None).unwrap(), ["m-Q4_K_M.gguf"]);
        assert_eq!(
            pick_gguf("o/m", &list, Some("q8_0")).unwrap(),
            ["m-Q8_0.gguf"]
        );
        assert_eq!(
            pick_gguf("o/m", &list, Some("F16")).unwrap(),
            [
                "big/m-F16-00001-of-00002.gguf",
                "big/m-F16-00002-of-00002.gguf"
            ]
        );
        let err = pick_gguf("o/m", &list, Some("IQ2_XS"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("m-Q8_0.gguf") && err.contains("o/m:QUANT"),
            "{err}"
        );
        // No preferred one and several: name one.
        let two = names(&["a-Q8_0.gguf", "a-Q6_K.gguf"]);
        assert!(pick_gguf("o/a", &two, None).is_err());
        assert_eq!(
            pick_gguf("o/a", &names(&["only.gguf"]), None).unwrap(),
            ["only.gguf"]
        );
        // A split with a part missing is refused.
        let holes = names(&["s-Q4_0-00001-of-00003.gguf", "s-Q4_0-00003-of-00003.gguf"]);
        assert!(pick_gguf("o/s", &holes, None).is_err());
        // A joined file (a pull's, in the cache) stands for its parts, even
        // where some parts are still there.
        let mut joined = holes.clone();
        joined.push("s-Q4_0.gguf".into());
        assert_eq!(pick_gguf("o/s", &joined, None).unwrap(), ["s-Q4_0.gguf"]);
        assert_eq!(
            pick_gguf("o/s", &joined, Some("Q4_0")).unwrap(),
            ["s-Q4_0.gguf"]
        );
    }

    #[test]
    fn a_folder_fetches_config_tokenizer_template_and_weights_and_skips_unsafe_names() {
        let r = HubRef::parse("Qwen/Qwen3-0.6B").unwrap();
        let list = names(&[
            ".gitattributes",
            "README.md",
            "config.json",
            "tokenizer.json",
            "tokenizer_config.json",
            "chat_template.jinja",
            "model-00001-of-00002.safetensors",
            "model-00002-of-00002.safetensors",
            "model.safetensors.index.json",
            "../escape.safetensors",
            "onnx/model.safetensors",
        ]);
        let (files, folder) = plan_files(&r, &list).unwrap();
        assert!(folder);
        assert_eq!(
            files,
            [
                "config.json",
                "tokenizer.json",
                "tokenizer_config.json",
                "chat_template.jinja",
                "model.safetensors.index.json",
                "model-00001-of-00002.safetensors",
                "model-00002-of-00002.safetensors"
            ]
        );
        let none = plan_files(&r, &names(&["README.md", "../x.gguf"]));
        assert!(none.is_err());
        // A Mistral repository: its tekken tokenizer, and the weights in
        // Hugging Face's layout only.
        let r = HubRef::parse("mistralai/Magistral-Small-2506").unwrap();
        let list = names(&[
            "config.json",
            "tekken.json",
            "params.json",
            "consolidated.safetensors",
            "model-00001-of-00002.safetensors",
            "model-00002-of-00002.safetensors",
            "model.safetensors.index.json",
        ]);
        let (files, folder) = plan_files(&r, &list).unwrap();
        assert!(folder);
        assert_eq!(
            files,
            [
                "config.json",
                "model.safetensors.index.json",
                "tekken.json",
                "model-00001-of-00002.safetensors",
                "model-00002-of-00002.safetensors"
            ]
        );
    }

    #[test]
    fn quant_tags_are_read_from_file_names() {
        for (f, t) in [
            ("Llama-3.2-1B-Instruct-Q4_K_M.gguf", Some("Q4_K_M")),
            ("qwen2.5-0.5b-instruct-q8_0.gguf", Some("q8_0")),
            ("Q8_0/m-Q8_0-00001-of-00002.gguf", Some("Q8_0")),
            ("m.IQ2_XS.gguf", Some("IQ2_XS")),
            ("m-f16.gguf", Some("f16")),
            ("model.gguf", None),
        ] {
            assert_eq!(quant_tag(f).as_deref(), t, "{f}");
        }
    }

    #[test]
    fn the_cache_lookup_follows_refs_main() {
        let dir = tempfile::tempdir().unwrap();
        let r = HubRef::parse("acme/tiny-GGUF:Q8_0").unwrap();
        let root = dir.path().join(r.folder());
        for (commit, file) in [("aaaa", "t-Q8_0.gguf"), ("ffff", "t-Q8_0.gguf")] {
            let d = root.join("snapshots").join(commit);
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(d.join(file), commit).unwrap();
            std::fs::write(d.join("t-Q4_0.gguf"), commit).unwrap();
        }
        std::fs::create_dir_all(root.join("refs")).unwrap();
        // main is the older-named snapshot, not the highest hash.
        std::fs::write(root.join("refs/main"), "aaaa").unwrap();
        let found = find_in(dir.path(), &r).unwrap();
        assert_eq!(found, root.join("snapshots/aaaa/t-Q8_0.gguf"));
        // Two quantizations and none named: not a guess.
        assert!(find_in(dir.path(), &HubRef::parse("acme/tiny-GGUF").unwrap()).is_none());
        // Listed once per quantization, under the id that loads it.
        let listed: Vec<String> = list_in(dir.path()).into_iter().map(|m| m.name).collect();
        assert_eq!(listed, ["acme/tiny-GGUF:Q4_0", "acme/tiny-GGUF:Q8_0"]);
        // One quantization goes; the other stays, listed alone.
        assert!(remove_in(dir.path(), &r).unwrap());
        assert!(!remove_in(dir.path(), &r).unwrap());
        let listed: Vec<String> = list_in(dir.path()).into_iter().map(|m| m.name).collect();
        assert_eq!(listed, ["acme/tiny-GGUF:Q4_0"]);
        // A tag that only part of a name matches removes nothing.
        for loose in [
            "acme/tiny-GGUF:0",
            "acme/tiny-GGUF:Q4",
            "acme/tiny-GGUF:gguf",
        ] {
            assert!(!remove_in(dir.path(), &HubRef::parse(loose).unwrap()).unwrap());
        }
        assert!(root.join("snapshots/aaaa/t-Q4_0.gguf").exists());
        // The last quantization takes the repository with it.
        assert!(remove_in(dir.path(), &HubRef::parse("acme/tiny-GGUF:Q4_0").unwrap()).unwrap());
        assert!(!root.exists());
        // Without a quantization: the whole repository.
        std::fs::create_dir_all(root.join("snapshots/aaaa")).unwrap();
        std::fs::write(root.join("snapshots/aaaa/t-Q8_0.gguf"), "x").unwrap();
        assert!(remove_in(dir.path(), &HubRef::parse("acme/tiny-GGUF").unwrap()).unwrap());
        assert!(!root.exists());
    }
}
