//! Durable file writes: every file that matters (checkpoints, job records,
//! uploads, exports, the sparse model's `.have.json`) goes to a temporary
//! file beside its destination, is fsynced, renamed over it, and the
//! directory fsynced, so a crash at any moment leaves the old file or the
//! new one, never half of one (`atomic-write-file` does the steps). Files
//! are readable by their owner only, and folders made here are 0700: they
//! hold people's training data and models.

use std::io::Write;
use std::path::Path;

use atomic_write_file::AtomicWriteFile;

use crate::error::{ModelError, Result};

/// Mode of files written here.
#[cfg(unix)]
const FILE_MODE: u32 = 0o600;
/// Mode of folders made here.
#[cfg(unix)]
const DIR_MODE: u32 = 0o700;

/// A file that replaces `path` when [`AtomicWriteFile::commit`] is called
/// (dropped uncommitted, it leaves `path` as it was). Mode 0600; readable.
pub fn create(path: &Path) -> Result<AtomicWriteFile> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        create_dir(dir)?;
    }
    // Readable too, so a caller can check what it wrote before committing.
    let f = AtomicWriteFile::options()
        .read(true)
        .open(path)
        .map_err(|e| ModelError::io(path, e))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        f.as_file()
            .set_permissions(std::fs::Permissions::from_mode(FILE_MODE))
            .map_err(|e| ModelError::io(path, e))?;
    }
    Ok(f)
}

/// Replaces `path` with `bytes`, durably.
pub fn write(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut f = create(path)?;
    f.write_all(bytes).map_err(|e| ModelError::io(path, e))?;
    f.commit().map_err(|e| ModelError::io(path, e))
}

/// Makes `dir` and its missing parents; those made here are 0700.
pub fn create_dir(dir: &Path) -> Result<()> {
    let mut b = std::fs::DirBuilder::new();
    b.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        b.mode(DIR_MODE);
    }
    b.create(dir).map_err(|e| ModelError::io(dir, e))
}

/// Fsyncs the directory `dir`, so entries renamed or created in it survive
/// a crash.
pub fn sync_dir(dir: &Path) -> Result<()> {
    #[cfg(unix)]
    {
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| ModelError::io(dir, e))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_replace_whole_files_owner_only() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a/b/f.json");
        write(&path, b"one").unwrap();
        write(&path, b"two").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"two");
        // Nothing but the file itself is left beside it.
        let names: Vec<_> = std::fs::read_dir(path.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("f.json")]);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode(&path), 0o600);
            assert_eq!(mode(&dir.path().join("a")), 0o700);
            assert_eq!(mode(&dir.path().join("a/b")), 0o700);
        }
        // An uncommitted write leaves the old file.
        let mut f = create(&path).unwrap();
        f.write_all(b"three").unwrap();
        drop(f);
        assert_eq!(std::fs::read(&path).unwrap(), b"two");
    }
}
