//! `hearth models pull|list`, and the progress display used when a command
//! fetches the default model.

use anyhow::Result;
use clap::Subcommand;
use hearth_models::store::{self, PullEvent};
use indicatif::{ProgressBar, ProgressStyle};

#[derive(Debug, Subcommand)]
pub enum Cmd {
    /// Fetch the default model (SmolLM2-135M-Instruct, GGUF Q4_1) into the
    /// model store (`models` in the data folder).
    Pull {
        /// Download again even if the model is present.
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        home: crate::args::HomeArg,
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
        Cmd::Pull { force, home } => {
            let models = home.dirs().models();
            let path = if force {
                store::pull_default_in(&models, &mut progress_printer())?
            } else {
                store::ensure_default_in(&models, &mut progress_printer())?
            };
            eprintln!("model ready: {}", path.display());
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
