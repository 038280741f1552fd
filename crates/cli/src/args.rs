//! Arguments several commands share, and where this device's files live.

use std::path::PathBuf;

use hearth_models::dirs::Dirs;

#[derive(Debug, Clone, clap::Args)]
pub struct HomeArg {
    /// One folder for all of this node's files: its identity, the cluster
    /// secret, the API key, models, job data and profiles [default:
    /// $HEARTH_HOME; else the platform's folders, e.g. ~/.config/hearth,
    /// ~/.local/share/hearth and ~/.cache/hearth].
    #[arg(long, value_name = "DIR")]
    home: Option<PathBuf>,
}

impl HomeArg {
    /// The folders this command uses.
    pub(crate) fn dirs(&self) -> Dirs {
        Dirs::resolve(self.home.as_deref())
    }
}

/// Moves what earlier versions kept in `~/.cache/hearth` (secrets, the
/// node's key, models, job data) to the platform's folders, once, when
/// those are in use (no `$HEARTH_HOME`); says what moved.
pub(crate) fn migrate_legacy() {
    let dirs = Dirs::resolve(None);
    let Some(legacy) = Dirs::legacy() else { return };
    match dirs.migrate_legacy(&legacy) {
        Ok(moved) => {
            for (from, to) in moved {
                eprintln!("hearth: moved {} to {}", from.display(), to.display());
            }
        }
        Err(e) => tracing::warn!(
            "could not move the files in {} to their new folders: {e}",
            legacy.display()
        ),
    }
}
