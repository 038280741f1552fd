//! `hearth train JOB.toml`: runs a fine-tuning job on this machine's
//! cluster of `--local N` nodes (real QUIC on loopback, the layers split
//! evenly), showing step, loss, tokens/s and ETA; Ctrl-C cancels (the last
//! checkpoint stays, and running the same file again resumes from it).

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Parser;
use hearth_net::{ClusterSecret, Identity};
use hearth_runtime::pipeline::PlacementPolicy;
use hearth_runtime::train::{JobSpec, JobState};
use hearth_runtime::{Node, NodeConfig};
use indicatif::{ProgressBar, ProgressStyle};

#[derive(Debug, Parser)]
pub struct Args {
    /// The job file (TOML: model, data, method, hyperparameters, output_dir, ...).
    job: PathBuf,
    /// Nodes to run on this machine (the model is split evenly over them).
    #[arg(long, default_value_t = 1)]
    local: usize,
    #[command(flatten)]
    home: crate::cluster::HomeArg,
}

/// Reads a job file; relative paths are taken from the file's folder.
pub fn read_job(path: &Path) -> Result<JobSpec> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut spec: JobSpec =
        toml::from_str(&text).with_context(|| format!("{} is not a job file", path.display()))?;
    let base = path.parent().unwrap_or(Path::new("."));
    for p in [&mut spec.data, &mut spec.output_dir]
        .into_iter()
        .chain(spec.validation.as_mut())
    {
        if p.is_relative() {
            *p = base.join(&*p);
        }
    }
    if let Some(v) = &spec.validation
        && !v.is_file()
    {
        bail!("no validation data at {}", v.display());
    }
    spec.check().map_err(anyhow::Error::msg)?;
    Ok(spec)
}

pub fn run(args: Args) -> Result<()> {
    if !(1..=16).contains(&args.local) {
        bail!("--local takes 1 to 16 nodes, got {}", args.local);
    }
    let mut spec = read_job(&args.job)?;
    if !spec.data.is_file() {
        bail!("no training data at {}", spec.data.display());
    }
    let (info, _) = crate::profile::measure_model(
        &args.home.dirs(),
        Some(&spec.model),
        false,
        &hearth_runtime::Compute::Cpu,
    )?;
    spec.model = info.times.model.clone();
    let home = args.home.dirs().sub("local").config;
    let (secret, _) = ClusterSecret::load_or_create(&home.join("cluster").join("secret"))?;
    let rt = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    rt.block_on(async move {
        let mut nodes: Vec<Node> = Vec::new();
        let mut first = None;
        for i in 0..args.local {
            let identity = Identity::load_or_create(&home.join(format!("node-{i}")).join("node"))?;
            let mut cfg = NodeConfig::new(format!("train-{i}"), identity, secret.clone());
            cfg.quic = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
            cfg.placement = PlacementPolicy::Even;
            cfg.model = Some(info.clone());
            if let Some(a) = first {
                cfg.discoveries = vec![Box::new(hearth_discovery::StaticDiscovery::new(vec![
                    format!("{a}"),
                ])?)];
            }
            let node = Node::start(cfg).await?;
            first.get_or_insert(node.endpoint().local_addr()?);
            nodes.push(node);
        }
        let lead = nodes[0].clone();
        // Every node knows the others' profiles once they are placed.
        let placed = tokio::time::timeout(Duration::from_secs(120), async {
            loop {
                if lead
                    .placement()
                    .is_some_and(|p| p.stages.len() == args.local)
                {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
        .await;
        if placed.is_err() {
            bail!(
                "the {} local nodes did not form a cluster in 120 s",
                args.local
            );
        }
        let id = format!("ftjob-cli{}", std::process::id());
        lead.start_job(id.clone(), spec)?;
        let job = lead.job(&id).context("the job vanished")?;
        let (past, mut rx) = job.events();
        let bar = ProgressBar::new(1);
        bar.set_style(
            ProgressStyle::with_template("{spinner} step {pos}/{len} [{bar:30}] {msg} (ETA {eta})")
                .map_err(|e| anyhow::anyhow!("{e}"))?
                .progress_chars("=> "),
        );
        for e in past {
            bar.println(e.message);
        }
        let show = |bar: &ProgressBar, e: &hearth_runtime::train::JobEvent| match &e.data {
            Some(d) => {
                bar.set_length(d["total_steps"].as_u64().unwrap_or(1));
                bar.set_position(d["step"].as_u64().unwrap_or(0));
                bar.set_message(format!(
                    "loss {:.4}, {:.0} tok/s",
                    d["train_loss"].as_f64().unwrap_or(f64::NAN),
                    d["tokens_per_s"].as_f64().unwrap_or(0.0)
                ));
            }
            None => bar.println(format!("  {}", e.message)),
        };
        let mut ctrl_c = std::pin::pin!(tokio::signal::ctrl_c());
        loop {
            tokio::select! {
                e = rx.recv() => match e {
                    Ok(e) => show(&bar, &e),
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                    Err(_) => break,
                },
                _ = &mut ctrl_c => {
                    bar.println("cancelling (the last checkpoint stays; run again to resume)");
                    job.cancel();
                }
                _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            }
            if job.info().is_some_and(|i| i.state.done()) {
                while let Ok(e) = rx.try_recv() {
                    show(&bar, &e);
                }
                break;
            }
        }
        bar.finish_and_clear();
        for n in &nodes {
            n.shutdown().await;
        }
        let info = job.info().context("the job vanished")?;
        match info.state {
            JobState::Succeeded => {
                println!(
                    "done: {} steps, final loss {:.4}; outputs in {}",
                    info.step,
                    info.loss.unwrap_or(f64::NAN),
                    info.output_dir.display()
                );
                if let Some(m) = info.fine_tuned_model {
                    println!("fine-tuned model: {m}");
                }
                Ok(())
            }
            JobState::Cancelled => bail!("cancelled at step {}", info.step),
            _ => bail!("{}", info.error.unwrap_or_else(|| "the job failed".into())),
        }
    })
}
