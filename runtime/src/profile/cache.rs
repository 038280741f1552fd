//! The on-disk cache of measured model times, keyed by hardware, what the
//! machine offers (CPUs, quota) and model: measuring takes seconds, so
//! nodes started close together (a restart, several nodes on one machine)
//! reuse it. An entry is current for [`PROFILE_TTL`]: a machine's speed
//! drifts over hours (other tenants, thermal state, power settings), and a
//! plan from a day-old figure predicts what the device no longer does. An
//! older entry, one of another format, or one that does not parse is
//! measured again.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use hearth_models::WeightFile;
use serde::{Deserialize, Serialize};
use tracing::{debug, info, warn};

use super::{
    Hardware, MeasureOptions, ModelTimes, PROFILE_FORMAT, ProfileError, measure, model_fingerprint,
};

#[derive(Serialize, Deserialize)]
struct Entry {
    format: u32,
    hardware: String,
    times: ModelTimes,
}

fn cache_key(hardware: &str, fingerprint: &str, threads: usize) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    let method = super::measure::METHOD;
    h.update(format!("{PROFILE_FORMAT}|{method}|{hardware}|{fingerprint}|{threads}").as_bytes());
    h.finalize()[..12]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// How long a measured profile stands for the device's current speed.
pub const PROFILE_TTL: Duration = Duration::from_secs(3600);

fn read_entry(path: &Path, hardware: &str) -> Option<ModelTimes> {
    let age = std::fs::metadata(path)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.elapsed().ok());
    if age.is_some_and(|a| a > PROFILE_TTL) {
        debug!(path = %path.display(), "profile cache entry older than an hour: measuring again");
        return None;
    }
    let bytes = std::fs::read(path).ok()?;
    match serde_json::from_slice::<Entry>(&bytes) {
        Ok(e) if e.format == PROFILE_FORMAT && e.hardware == hardware => Some(e.times),
        Ok(_) => None,
        Err(e) => {
            warn!(path = %path.display(), error = %e, "ignoring a damaged profile cache entry");
            None
        }
    }
}

fn write_entry(path: &Path, entry: &Entry) -> Result<(), ProfileError> {
    // A reader (another node on this machine) never sees half a file.
    hearth_models::durable::write(path, &serde_json::to_vec_pretty(entry)?).map_err(|e| match e {
        hearth_models::ModelError::Io { path, source } => ProfileError::Io { path, source },
        e => ProfileError::Model(e),
    })
}

/// Longest a measurement may hold the lock before others take it over.
const STALE_LOCK: Duration = Duration::from_secs(120);

/// The right to measure: one process per machine measures a model at a
/// time (nodes started together would otherwise measure side by side, each
/// at a fraction of the CPU, and cache numbers that are too slow); the
/// others wait and read its result.
struct Turn(Option<PathBuf>);

enum Waited {
    Turn(Turn),
    Done(Box<ModelTimes>),
}

impl Turn {
    fn wait(lock: &Path, done: impl Fn() -> Option<ModelTimes>) -> Waited {
        if let Some(dir) = lock.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        let start = Instant::now();
        loop {
            match std::fs::File::create_new(lock) {
                Ok(_) => return Waited::Turn(Turn(Some(lock.to_path_buf()))),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    if let Some(times) = done() {
                        return Waited::Done(Box::new(times));
                    }
                    let age = std::fs::metadata(lock)
                        .and_then(|m| m.modified())
                        .ok()
                        .and_then(|t| t.elapsed().ok());
                    if age.is_some_and(|a| a > STALE_LOCK) || start.elapsed() > STALE_LOCK {
                        warn!(lock = %lock.display(), "taking over a stale profiling lock");
                        let _ = std::fs::remove_file(lock);
                        continue;
                    }
                    std::thread::sleep(Duration::from_millis(200));
                }
                // No lock possible (read-only cache): measure anyway.
                Err(_) => return Waited::Turn(Turn(None)),
            }
        }
    }
}

impl Drop for Turn {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// The default cache directory: `profiles` in this device's cache folder
/// (`$HEARTH_HOME/profiles`, else the platform's; see
/// [`hearth_models::dirs`]).
pub fn default_dir() -> PathBuf {
    hearth_models::dirs::Dirs::resolve(None).profiles()
}

/// Where `weights` measured on this device under what the machine offers
/// now is cached in `dir`, and the hardware identity the entry records.
fn entry_path(weights: &WeightFile, dir: &Path, opts: &MeasureOptions) -> (PathBuf, String) {
    // What the machine offers (CPUs, quota) is part of the key: a
    // throttled device never reuses an unthrottled measurement.
    let offer = super::Offer {
        cpus: super::offer::affinity_cpus(),
        quota_cores: super::offer::cgroup_quota(),
        others_load: 0.0,
        threads: candle_core::utils::get_num_threads(),
    };
    let mut hardware = format!(
        "{}|{}",
        Hardware::detect().cache_identity(),
        offer.cache_identity()
    );
    // A GPU's times are its own (CPU entries keep their old keys).
    if !matches!(opts.compute, crate::Compute::Cpu) {
        hardware = format!("{hardware}|{}", opts.compute.name());
    }
    let fingerprint = model_fingerprint(weights);
    let threads = candle_core::utils::get_num_threads();
    let path = dir.join(format!(
        "{}.json",
        cache_key(&hardware, &fingerprint, threads)
    ));
    (path, hardware)
}

/// Times of `weights` on this device under what the machine offers now, if
/// the cache in `dir` has them (a device offered this much CPU before).
pub(crate) fn cached_times(
    weights: &WeightFile,
    dir: &Path,
    opts: &MeasureOptions,
) -> Option<ModelTimes> {
    let (path, hardware) = entry_path(weights, dir, opts);
    read_entry(&path, &hardware)
}

/// Times of `weights` on this device: from the cache in `dir` unless
/// `fresh`, else measured (and cached there). Returns the times and
/// whether they came from the cache.
pub fn profile_model_with(
    weights: &WeightFile,
    dir: &Path,
    opts: &MeasureOptions,
    fresh: bool,
    progress: &mut dyn FnMut(&str),
) -> Result<(ModelTimes, bool), ProfileError> {
    let (path, hardware) = entry_path(weights, dir, opts);
    if !fresh && let Some(times) = read_entry(&path, &hardware) {
        debug!(path = %path.display(), "profile from cache");
        return Ok((times, true));
    }
    let _turn = match Turn::wait(&path.with_extension("lock"), || {
        (!fresh).then(|| read_entry(&path, &hardware)).flatten()
    }) {
        Waited::Done(times) => return Ok((*times, true)),
        Waited::Turn(t) => t,
    };
    progress("measuring this device (cached for an hour)");
    let times = measure(weights, opts, progress)?;
    info!(
        model = %times.model,
        layer_decode_ms = times.layer.decode_s * 1e3,
        took_s = times.took_s,
        "measured the model on this device"
    );
    let entry = Entry {
        format: PROFILE_FORMAT,
        hardware,
        times,
    };
    if let Err(e) = write_entry(&path, &entry) {
        warn!(error = %e, "could not cache the profile");
    }
    Ok((entry.times, false))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_differ_by_hardware_model_and_threads() {
        let a = cache_key("cpu A", "f1", 2);
        assert_eq!(a, cache_key("cpu A", "f1", 2));
        assert_ne!(a, cache_key("cpu B", "f1", 2));
        assert_ne!(a, cache_key("cpu A", "f2", 2));
        assert_ne!(a, cache_key("cpu A", "f1", 4));
    }

    #[test]
    fn entries_older_than_the_ttl_are_measured_again() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("e.json");
        let tiny =
            hearth_test_utils::tiny_model(dir.path(), hearth_test_utils::TinySpec::default())?;
        let weights = WeightFile::open(&tiny.gguf_q8_0)?;
        let times = measure(&weights, &MeasureOptions::quick(), &mut |_| {})?;
        let entry = Entry {
            format: PROFILE_FORMAT,
            hardware: "hw".into(),
            times,
        };
        write_entry(&path, &entry)?;
        assert!(read_entry(&path, "hw").is_some());
        assert!(read_entry(&path, "other hw").is_none());
        let old = std::time::SystemTime::now() - PROFILE_TTL - Duration::from_secs(60);
        std::fs::File::options()
            .write(true)
            .open(&path)?
            .set_modified(old)?;
        assert!(read_entry(&path, "hw").is_none(), "a stale entry was used");
        Ok(())
    }
}
