//! Shared helpers for Hearth's benchmarks: every figure is printed side by
//! side with its reference from the same run, as a ratio, and saved as JSON
//! and Markdown. Benchmarks never gate CI on wall-clock numbers.

use std::path::Path;

use anyhow::Result;
use serde::Serialize;

/// One measured figure and its reference.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub metric: String,
    pub value: f64,
    pub reference: f64,
    pub ratio: f64,
}

impl Row {
    pub fn new(metric: &str, value: f64, reference: f64) -> Self {
        Self {
            metric: metric.to_string(),
            value,
            reference,
            ratio: if reference > 0.0 {
                value / reference
            } else {
                f64::NAN
            },
        }
    }
}

/// Median of the samples (0 when empty).
pub fn median(xs: &[f64]) -> f64 {
    let mut v = xs.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// The CPU's model name, for the record.
pub fn cpu_name() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_string())
        })
        .unwrap_or_else(|| std::env::consts::ARCH.to_string())
}

/// Writes `NAME.json` and `NAME.md` under `dir`; returns the Markdown.
pub fn write_results(
    dir: &Path,
    name: &str,
    title: &str,
    ours: &str,
    reference: &str,
    rows: &[Row],
    meta: serde_json::Value,
) -> Result<String> {
    std::fs::create_dir_all(dir)?;
    let json = serde_json::json!({"title": title, "rows": rows, "meta": meta});
    std::fs::write(
        dir.join(format!("{name}.json")),
        serde_json::to_string_pretty(&json)? + "\n",
    )?;
    let mut md =
        format!("## {title}\n\n| metric | {ours} | {reference} | ratio |\n|---|---:|---:|---:|\n");
    for r in rows {
        md.push_str(&format!(
            "| {} | {:.1} | {:.1} | {:.2} |\n",
            r.metric, r.value, r.reference, r.ratio
        ));
    }
    md.push_str(&format!(
        "\n```json\n{}\n```\n",
        serde_json::to_string_pretty(&meta)?
    ));
    std::fs::write(dir.join(format!("{name}.md")), &md)?;
    Ok(md)
}

/// Prints to stdout (benchmarks are binaries; this keeps clippy's print lint honest).
pub fn print(s: &str) -> Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    writeln!(out, "{s}")?;
    Ok(())
}
