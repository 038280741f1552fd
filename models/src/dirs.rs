//! Where Hearth keeps its files: configuration (the node's key, the
//! cluster secret, the API key), data (models, fine-tuned models, job
//! data and uploads) and cache (measured profiles, which can be measured
//! again) apart, as the platform lays them out (the `directories` crate:
//! XDG on Linux, `~/Library/...` on macOS, `%APPDATA%` on Windows). Nothing
//! that cannot be made again lives under the cache, which cleaners wipe.
//!
//! `--home DIR` or `$HEARTH_HOME` keeps everything in one folder instead
//! (a service's state directory, tests, several nodes on one machine).
//!
//! Earlier versions kept everything under `~/.cache/hearth`;
//! [`Dirs::migrate_legacy`] moves what is there to its new place.

use std::path::{Path, PathBuf};

use crate::error::{ModelError, Result};

/// The folders of one device (or one `--home`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dirs {
    /// The node's key, the cluster secret, the API key (kept private).
    pub config: PathBuf,
    /// Models, fine-tuned models, job data and uploads.
    pub data: PathBuf,
    /// What can be made again: measured profiles.
    pub cache: PathBuf,
}

/// What [`Dirs::migrate_legacy`] moved, from where to where.
pub type Moved = Vec<(PathBuf, PathBuf)>;

/// The configuration files and folders of earlier versions' single folder.
const LEGACY_CONFIG: &[&str] = &["node", "cluster", "api_key"];
/// The data of earlier versions' single folder (`models` holds fine-tuned
/// models too).
const LEGACY_DATA: &[&str] = &["models", "data", "local"];

impl Dirs {
    /// Everything in one folder.
    pub fn in_one(dir: impl Into<PathBuf>) -> Self {
        let dir = dir.into();
        Self {
            config: dir.clone(),
            data: dir.clone(),
            cache: dir,
        }
    }

    /// The platform's folders for Hearth, where a home directory is known.
    pub fn platform() -> Option<Self> {
        let p = directories::ProjectDirs::from("", "", "hearth")?;
        Some(Self {
            config: p.config_dir().to_path_buf(),
            data: p.data_dir().to_path_buf(),
            cache: p.cache_dir().to_path_buf(),
        })
    }

    /// `home` if given, else `$HEARTH_HOME`, else the platform's folders
    /// (else `./hearth`, with no home directory at all).
    pub fn resolve(home: Option<&Path>) -> Self {
        if let Some(h) = home {
            return Self::in_one(h);
        }
        if let Some(h) = std::env::var_os("HEARTH_HOME").filter(|h| !h.is_empty()) {
            return Self::in_one(PathBuf::from(h));
        }
        Self::platform().unwrap_or_else(|| Self::in_one("hearth"))
    }

    /// Whether this is one folder for everything.
    pub fn is_one(&self) -> bool {
        self.config == self.data && self.data == self.cache
    }

    /// Folders for a group of nodes kept apart from this device's own (the
    /// `--local` cluster): `name` under config and data; the cache (this
    /// machine's profiles) is shared.
    pub fn sub(&self, name: &str) -> Self {
        Self {
            config: self.config.join(name),
            data: self.data.join(name),
            cache: self.cache.clone(),
        }
    }

    /// The node's own key.
    pub fn node_key(&self) -> PathBuf {
        self.config.join("node")
    }

    /// The cluster secret.
    pub fn secret(&self) -> PathBuf {
        self.config.join("cluster").join("secret")
    }

    /// The saved API key.
    pub fn api_key(&self) -> PathBuf {
        self.config.join("api_key")
    }

    /// The model store.
    pub fn models(&self) -> PathBuf {
        self.data.join("models")
    }

    /// Models this node fine-tuned.
    pub fn fine_tuned(&self) -> PathBuf {
        self.models().join("fine-tuned")
    }

    /// Job records, uploads and checkpoints.
    pub fn node_data(&self) -> PathBuf {
        self.data.join("data")
    }

    /// Measured profiles.
    pub fn profiles(&self) -> PathBuf {
        self.cache.join("profiles")
    }

    /// Moves what earlier versions kept in `legacy` (one folder, by default
    /// `~/.cache/hearth`) to where it goes now, leaving anything already
    /// there alone; returns what moved. Does nothing when these folders are
    /// one (then `legacy` is whatever was asked for).
    pub fn migrate_legacy(&self, legacy: &Path) -> Result<Moved> {
        let mut moved = Vec::new();
        if self.is_one() || !legacy.is_dir() {
            return Ok(moved);
        }
        let items = LEGACY_CONFIG
            .iter()
            .map(|n| (n, &self.config))
            .chain(LEGACY_DATA.iter().map(|n| (n, &self.data)));
        for (name, to_dir) in items {
            let from = legacy.join(name);
            let to = to_dir.join(name);
            if from == to || !from.exists() || to.exists() {
                continue;
            }
            move_path(&from, &to)?;
            moved.push((from, to));
        }
        Ok(moved)
    }

    /// The single folder earlier versions used: `~/.cache/hearth`.
    pub fn legacy() -> Option<PathBuf> {
        std::env::var_os("HOME")
            .filter(|h| !h.is_empty())
            .map(|h| PathBuf::from(h).join(".cache").join("hearth"))
    }
}

/// Moves `from` to `to` (a file or a folder): a rename where both are on
/// one file system, else a durable copy, then the original's removal.
fn move_path(from: &Path, to: &Path) -> Result<()> {
    let parent = to.parent().unwrap_or(Path::new("."));
    crate::durable::create_dir(parent)?;
    if std::fs::rename(from, to).is_ok() {
        return crate::durable::sync_dir(parent);
    }
    copy_tree(from, to)?;
    if from.is_dir() {
        std::fs::remove_dir_all(from)
    } else {
        std::fs::remove_file(from)
    }
    .map_err(|e| ModelError::io(from, e))
}

/// Copies a file or a folder tree, each file durably.
fn copy_tree(from: &Path, to: &Path) -> Result<()> {
    if from.is_dir() {
        crate::durable::create_dir(to)?;
        for entry in std::fs::read_dir(from).map_err(|e| ModelError::io(from, e))? {
            let entry = entry.map_err(|e| ModelError::io(from, e))?;
            copy_tree(&entry.path(), &to.join(entry.file_name()))?;
        }
        Ok(())
    } else {
        let mut src = std::fs::File::open(from).map_err(|e| ModelError::io(from, e))?;
        let mut f = crate::durable::create(to)?;
        std::io::copy(&mut src, &mut f).map_err(|e| ModelError::io(to, e))?;
        f.commit().map_err(|e| ModelError::io(to, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_folder_keeps_everything_together() {
        let d = Dirs::in_one("/srv/hearth");
        assert!(d.is_one());
        assert_eq!(d.models(), Path::new("/srv/hearth/models"));
        assert_eq!(d.secret(), Path::new("/srv/hearth/cluster/secret"));
        assert_eq!(d.profiles(), Path::new("/srv/hearth/profiles"));
        assert_eq!(d.fine_tuned(), Path::new("/srv/hearth/models/fine-tuned"));
        let l = d.sub("local");
        assert_eq!(l.secret(), Path::new("/srv/hearth/local/cluster/secret"));
        assert_eq!(l.profiles(), d.profiles());
        assert_eq!(Dirs::resolve(Some(Path::new("/x"))), Dirs::in_one("/x"));
    }

    #[test]
    fn platform_folders_keep_secrets_and_models_out_of_the_cache() {
        let Some(d) = Dirs::platform() else {
            eprintln!("skipped: no home directory here");
            return;
        };
        assert!(!d.is_one());
        for p in [
            d.secret(),
            d.node_key(),
            d.api_key(),
            d.models(),
            d.fine_tuned(),
        ] {
            assert!(
                !p.starts_with(&d.cache),
                "{} is under the cache",
                p.display()
            );
        }
    }

    #[test]
    fn the_legacy_folder_moves_to_config_and_data() -> anyhow::Result<()> {
        let tmp = tempfile::tempdir()?;
        let legacy = tmp.path().join("old");
        std::fs::create_dir_all(legacy.join("cluster"))?;
        std::fs::create_dir_all(legacy.join("models/fine-tuned"))?;
        std::fs::create_dir_all(legacy.join("profiles"))?;
        std::fs::write(legacy.join("cluster/secret"), b"s")?;
        std::fs::write(legacy.join("node"), b"k")?;
        std::fs::write(legacy.join("models/m.gguf"), b"m")?;
        std::fs::write(legacy.join("models/fine-tuned/t.gguf"), b"t")?;
        std::fs::write(legacy.join("profiles/p.json"), b"{}")?;
        let d = Dirs {
            config: tmp.path().join("config"),
            data: tmp.path().join("data"),
            cache: legacy.clone(),
        };
        // Already at the new place: left alone.
        std::fs::create_dir_all(&d.config)?;
        std::fs::write(d.api_key(), b"new")?;
        std::fs::write(legacy.join("api_key"), b"old")?;
        let moved = d.migrate_legacy(&legacy)?;
        assert_eq!(moved.len(), 3, "{moved:?}");
        assert_eq!(std::fs::read(d.secret())?, b"s");
        assert_eq!(std::fs::read(d.node_key())?, b"k");
        assert_eq!(std::fs::read(d.models().join("m.gguf"))?, b"m");
        assert_eq!(std::fs::read(d.fine_tuned().join("t.gguf"))?, b"t");
        assert_eq!(std::fs::read(d.api_key())?, b"new");
        assert!(!legacy.join("cluster").exists() && !legacy.join("models").exists());
        // Profiles are cache: they stay.
        assert!(legacy.join("profiles/p.json").exists());
        // Twice is a no-op.
        assert!(d.migrate_legacy(&legacy)?.is_empty());
        // One folder never migrates.
        assert!(Dirs::in_one(&legacy).migrate_legacy(&legacy)?.is_empty());
        Ok(())
    }

    #[test]
    fn copying_across_file_systems_keeps_every_byte() -> anyhow::Result<()> {
        let tmp = tempfile::tempdir()?;
        let from = tmp.path().join("a");
        std::fs::create_dir_all(from.join("x/y"))?;
        std::fs::write(from.join("x/y/f"), vec![7u8; 100_000])?;
        std::fs::write(from.join("g"), b"g")?;
        copy_tree(&from, &tmp.path().join("b"))?;
        assert_eq!(
            std::fs::read(tmp.path().join("b/x/y/f"))?,
            vec![7u8; 100_000]
        );
        assert_eq!(std::fs::read(tmp.path().join("b/g"))?, b"g");
        Ok(())
    }
}
