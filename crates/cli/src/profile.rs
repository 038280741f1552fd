//! `hearth profile`: what this device is and how fast it runs the model.

use anyhow::Result;
use hearth_runtime::profile::{ModelInfo, NodeProfile};
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The model to measure: a .gguf file, a model directory, or the
    /// default model's name (fetched when missing).
    #[arg(long)]
    model: Option<String>,
    /// Measure again instead of using the cached figures.
    #[arg(long)]
    fresh: bool,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    backend: crate::cluster::BackendArg,
}

/// A spinner on stderr that shows each measuring step.
pub fn spinner() -> ProgressBar {
    let bar = ProgressBar::new_spinner();
    if let Ok(style) = ProgressStyle::with_template("{spinner} {msg} ({elapsed})") {
        bar.set_style(style);
    }
    bar.enable_steady_tick(std::time::Duration::from_millis(120));
    bar
}

/// How to measure on `compute`: each figure timed over at least 1 s
/// (`HEARTH_MEASURE_SECS` changes it).
pub fn measure_options(
    compute: &hearth_runtime::Compute,
) -> hearth_runtime::profile::MeasureOptions {
    hearth_runtime::profile::MeasureOptions::for_compute(compute)
}

/// Resolves `model` (fetched when missing, with a progress bar) and
/// measures this device on it, with a spinner; returns the info and whether
/// the figures came from the cache.
pub fn measure_model(
    dirs: &hearth_models::dirs::Dirs,
    model: Option<&str>,
    fresh: bool,
    compute: &hearth_runtime::Compute,
) -> Result<(ModelInfo, bool)> {
    let store = hearth_runtime::ModelStore::new(dirs, measure_options(compute));
    let mut pull = crate::models::progress_printer();
    let mut bar: Option<ProgressBar> = None;
    let r = store.measure(model, fresh, &mut |p| match p {
        hearth_runtime::ModelProgress::Pull(e) => pull(e),
        hearth_runtime::ModelProgress::Measuring(step) => bar
            .get_or_insert_with(|| {
                let b = spinner();
                b.set_message("reading the profile cache");
                b
            })
            .set_message(step),
        _ => {}
    });
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    Ok(r?)
}

#[derive(Serialize)]
struct JsonOut<'a> {
    #[serde(flatten)]
    profile: &'a NodeProfile,
    cached: bool,
    model_cost: &'a hearth_partitioner::ModelProfile,
}

pub fn run(args: Args) -> Result<()> {
    let compute = args.backend.resolve()?;
    let (info, cached) = measure_model(
        &hearth_models::dirs::Dirs::resolve(None),
        args.model.as_deref(),
        args.fresh,
        &compute,
    )?;
    let name = crate::cluster::host_name();
    let profile = NodeProfile::new("(this device)", name, Some(info.times.clone()));
    if args.json {
        let out = JsonOut {
            profile: &profile,
            cached,
            model_cost: &info.cost,
        };
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    print!("{}", render(&profile, &info, cached));
    Ok(())
}

fn gib(b: u64) -> String {
    format!("{:.1} GiB", b as f64 / f64::from(1u32 << 30))
}

fn render(p: &NodeProfile, info: &ModelInfo, cached: bool) -> String {
    let hw = &p.hardware;
    let mut out = String::new();
    let mut line = |s: String| {
        out.push_str(&s);
        out.push('\n');
    };
    line(format!("device   {}", p.name));
    line(format!(
        "cpu      {} ({} cores, {} threads, {})",
        hw.cpu, hw.physical_cores, hw.logical_cores, hw.arch
    ));
    line(format!(
        "memory   {} total, {} available, plan budget {}",
        gib(hw.total_memory),
        gib(hw.available_memory),
        gib(p.memory_budget)
    ));
    if hw.gpus.is_empty() {
        line("gpus     none seen by wgpu".into());
    }
    for g in &hw.gpus {
        line(format!(
            "gpu      {} ({}, {}, largest buffer {})",
            g.name,
            g.backend,
            g.device_type,
            gib(g.max_buffer_bytes)
        ));
    }
    line(format!("os       {}", hw.os));
    let t = &info.times;
    let ms = |s: f64| format!("{:.3} ms", s * 1e3);
    line(String::new());
    line(format!(
        "model    {} ({} layers, fingerprint {}; {} on {} threads, {})",
        t.model,
        info.cost.layers.len(),
        t.fingerprint,
        t.backend,
        t.threads,
        if cached {
            "cached".to_string()
        } else {
            format!("measured in {:.1} s", t.took_s)
        }
    ));
    line(format!(
        "{:<14} {:>12} {:>16} {:>18} {:>18}",
        "", "decode", "prefill/token", "train fwd/token", "fwd+bwd/token"
    ));
    for (part, x) in [
        ("decoder layer", t.layer),
        ("embedding", t.embed),
        ("norm + head", t.head),
    ] {
        line(format!(
            "{:<14} {:>12} {:>16} {:>18} {:>18}",
            part,
            ms(x.decode_s),
            ms(x.prefill_s_per_token),
            ms(x.train_forward_s_per_token),
            ms(x.train_s_per_token)
        ));
    }
    let layers = info.cost.layers.len() as f64;
    let token = layers * t.layer.decode_s + t.embed.decode_s + t.head.decode_s;
    line(format!(
        "\nwhole model on this device: {:.1} ms per decoded token ({:.1} tok/s), head = {:.1} layers",
        token * 1e3,
        1.0 / token,
        t.head.decode_s / t.layer.decode_s.max(1e-12)
    ));
    out
}
