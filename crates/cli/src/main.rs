//! `hearth`: run models, and run and inspect cluster nodes.
#![allow(clippy::print_stdout)] // A command-line program: printing to stdout is its job.

mod args;
mod cluster;
mod generate;
mod models;
mod plan;
mod profile;
mod train;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "hearth",
    version,
    about = "Run language models across the devices in your home"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Generate text on this machine.
    Generate(generate::Args),
    /// Fetch and list models.
    #[command(subcommand)]
    Models(models::Cmd),
    /// Run a node of this device's cluster until Ctrl-C.
    Up(cluster::UpArgs),
    /// Print the cluster's join token (secret: share it only with your devices).
    Token(cluster::TokenArgs),
    /// Print the API key required off loopback (secret), or replace it.
    Key(cluster::KeyArgs),
    /// Show a running node's view of the cluster.
    Status(cluster::StatusArgs),
    /// Show this device's hardware and its measured speed on the model.
    Profile(profile::Args),
    /// Show how the model is split across the cluster, and why.
    Plan(plan::Args),
    /// Fine-tune a model as a job file says (TOML), with a progress bar.
    Train(train::Args),
}

fn main() {
    // SAFETY: first thing in main, before any other thread exists.
    unsafe { hearth_models::threads::configure_process() };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("HEARTH_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    args::migrate_legacy();
    let result: Result<()> = match cli.command {
        Command::Generate(args) => generate::run(args),
        Command::Models(cmd) => models::run(cmd),
        Command::Up(args) => cluster::up(args),
        Command::Token(args) => cluster::token(args),
        Command::Key(args) => cluster::key(args),
        Command::Status(args) => cluster::status(args),
        Command::Profile(args) => profile::run(args),
        Command::Plan(args) => plan::run(args),
        Command::Train(args) => train::run(args),
    };
    if let Err(e) = result {
        // One line: the error and its causes (some carry a backtrace after
        // a newline when RUST_BACKTRACE is set; keep the first line of each).
        let first = |s: String| s.lines().next().unwrap_or("").trim().to_string();
        let mut msg = format!("error: {}", first(e.to_string()));
        for cause in e.chain().skip(1) {
            let c = first(cause.to_string());
            if !msg.contains(&c) {
                msg.push_str(&format!(": {c}"));
            }
        }
        eprintln!("{msg}");
        std::process::exit(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The service files shipped in `dist/` start `hearth` with arguments
    /// it takes.
    #[test]
    fn the_service_files_run_a_command_hearth_takes() {
        let unit = include_str!("../dist/hearth.service");
        let exec: Vec<&str> = unit
            .lines()
            .find_map(|l| l.strip_prefix("ExecStart="))
            .expect("ExecStart")
            .split_whitespace()
            .collect();
        assert!(exec[0].ends_with("/hearth"), "{exec:?}");
        let cli = Cli::try_parse_from(&exec).expect("the unit's command parses");
        assert!(matches!(cli.command, Command::Up(_)));

        let plist = include_str!("../dist/dev.hearth.node.plist");
        let args = plist
            .split("<key>ProgramArguments</key>")
            .nth(1)
            .and_then(|s| s.split("</array>").next())
            .expect("ProgramArguments");
        let argv: Vec<&str> = args
            .split("<string>")
            .skip(1)
            .filter_map(|s| s.split("</string>").next())
            .collect();
        assert!(argv[0].ends_with("/hearth"), "{argv:?}");
        let cli = Cli::try_parse_from(&argv).expect("the plist's command parses");
        assert!(matches!(cli.command, Command::Up(_)));
    }
}
