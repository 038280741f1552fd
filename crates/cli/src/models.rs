//! `hearth models pull|list|rm|join`, and the progress display used when a
//! command fetches a model.

use anyhow::Result;
use clap::Subcommand;
use hearth_models::hub::{self, HubRef};
use hearth_models::store::{self, PullEvent};
use indicatif::{ProgressBar, ProgressStyle};

#[derive(Debug, Subcommand)]
pub enum Cmd {
    /// Fetch a model: the default one (SmolLM2-135M-Instruct, GGUF Q4_1)
    /// into the model store (`models` in the data folder), or `ORG/NAME`
    /// (a model folder or a repository of one GGUF) or `ORG/NAME:QUANT`
    /// (e.g. `:Q4_K_M`) from the Hugging Face hub into its cache. Honours
    /// HF_TOKEN, HF_HOME / HF_HUB_CACHE and HF_ENDPOINT; an interrupted
    /// download resumes.
    Pull {
        /// `ORG/NAME[:QUANT]`; none: the default model.
        model: Option<String>,
        /// Download the default model again even if it is present.
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        home: crate::args::HomeArg,
    },
    /// Remove a model: a file of the model store, or a repository from the
    /// Hugging Face cache (`ORG/NAME`, all its files).
    Rm {
        /// As `hearth models list` names it.
        name: String,
        #[command(flatten)]
        home: crate::args::HomeArg,
    },
    /// Join the parts of a split GGUF (`NAME-00001-of-0000N.gguf`, as
    /// llama.cpp's gguf-split writes them) into one file, `NAME.gguf`
    /// beside them unless `--out` says where. The parts stay.
    Join {
        /// Any part of the split model.
        part: std::path::PathBuf,
        /// Where to write the joined model.
        #[arg(long)]
        out: Option<std::path::PathBuf>,
    },
    /// Show the models on this machine.
    List {
        /// Print JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        home: crate::args::HomeArg,
    },
}

pub fn run(cmd: Cmd) -> Result<()> {
    match cmd {
        Cmd::Pull {
            model: Some(m),
            force: _,
            home: _,
        } if m != store::DEFAULT_MODEL.name && m != "default" => {
            let r = HubRef::parse(&m)?;
            let path = hub::pull(&r, &mut progress_printer())?;
            eprintln!("model ready: {} ({})", m, path.display());
            Ok(())
        }
        Cmd::Pull { force, home, .. } => {
            let models = home.dirs().models();
            let path = if force {
                store::pull_default_in(&models, &mut progress_printer())?
            } else {
                store::ensure_default_in(&models, &mut progress_printer())?
            };
            eprintln!("model ready: {}", path.display());
            Ok(())
        }
        Cmd::Rm { name, home } => {
            let models = home.dirs().models();
            let file = if name == store::DEFAULT_MODEL.name {
                store::default_model_path_in(&models)
            } else {
                models.join(&name)
            };
            // Only a plain name of the store's own folder.
            let plain = !name.contains(['/', '\\']) && !name.starts_with('.');
            if plain && file.is_file() {
                std::fs::remove_file(&file)?;
                eprintln!("removed {}", file.display());
                return Ok(());
            }
            let r = HubRef::parse(&name)
                .map_err(|_| anyhow::anyhow!("no model {name:?} (see `hearth models list`)"))?;
            let cache =
                hub::hub_cache().ok_or_else(|| anyhow::anyhow!("no Hugging Face cache folder"))?;
            if hub::remove_in(&cache, &r)? {
                eprintln!("removed {} from {}", r.repo, cache.display());
                Ok(())
            } else {
                anyhow::bail!("no model {name:?} (see `hearth models list`)")
            }
        }
        Cmd::Join { part, out } => {
            let (parts, joined) = hearth_models::split::parts_of(&part).ok_or_else(|| {
                anyhow::anyhow!(
                    "{} is not named as a part of a split GGUF (NAME-00001-of-0000N.gguf)",
                    part.display()
                )
            })?;
            let dst = out.unwrap_or(joined);
            let mut show = progress_printer();
            show(PullEvent::Step(format!(
                "joining {} parts into {}",
                parts.len(),
                dst.display()
            )));
            hearth_models::split::join(&parts, &dst, &mut |done, total| {
                show(PullEvent::Bytes { done, total })
            })?;
            show(PullEvent::Done(dst));
            Ok(())
        }
        Cmd::List { json, home } => {
            let list = store::list_in(&home.dirs().models());
            let mut out = String::new();
            if json {
                out = serde_json::to_string_pretty(&list)?;
            } else {
                if !list.iter().any(|m| m.name == store::DEFAULT_MODEL.name) {
                    out.push_str(&format!(
                        "{:<32} {:<12} (not downloaded: `hearth models pull`)\n",
                        store::DEFAULT_MODEL.name,
                        "gguf"
                    ));
                }
                for m in &list {
                    let size = if m.bytes > 0 {
                        format!("{:.1} MB", m.bytes as f64 / 1e6)
                    } else {
                        String::new()
                    };
                    out.push_str(&format!(
                        "{:<32} {:<12} {:>10}  {}\n",
                        m.name,
                        m.format,
                        size,
                        m.path.display()
                    ));
                }
            }
            write_stdout(out.trim_end())
        }
    }
}

/// Writes a line to stdout (the CLI's only stdout path besides streaming).
pub fn write_stdout(s: &str) -> Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    writeln!(out, "{s}")?;
    Ok(())
}

/// A progress callback that draws a bar on stderr.
pub fn progress_printer() -> impl FnMut(PullEvent) {
    let mut bar: Option<ProgressBar> = None;
    move |ev| match ev {
        PullEvent::Step(s) => eprintln!("{s}"),
        PullEvent::Bytes { done, total } => {
            let b = bar.get_or_insert_with(|| {
                let b = ProgressBar::new(total);
                if let Ok(style) = ProgressStyle::with_template(
                    "{bar:40} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
                ) {
                    b.set_style(style);
                }
                b
            });
            b.set_length(total);
            b.set_position(done);
        }
        PullEvent::Done(p) => {
            if let Some(b) = bar.take() {
                b.finish_and_clear();
            }
            eprintln!("saved {}", p.display());
        }
    }
}
