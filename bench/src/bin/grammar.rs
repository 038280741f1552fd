//! What an output constraint costs per token, on the real model's
//! vocabulary (SmolLM2-135M, 49 152 tokens), beside references from the
//! same run: sampling without a constraint, and the model's own decode
//! time per token (single node, this machine's threads).
//!
//! Each step draws from the model's real last-position logits plus noise
//! (so the path through the grammar varies), under three constraints: any
//! JSON object, a JSON schema of the kind `response_format` carries, and a
//! regex. Figures are medians over steps; the first sequence per grammar
//! (which warms llguidance's caches) is counted too.
//!
//! `cargo run --release -p hearth-bench --bin grammar`
#![allow(clippy::print_stdout)] // A command-line program: printing to stdout is its job.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::Parser;
use hearth_bench::{Row, cpu_name, median, print, write_results};
use hearth_models::generate::GenerateRequest;
use hearth_models::grammar;
use hearth_models::{LocalModel, Precision, Sampler, SamplingParams};
use hearth_test_utils::real_model;
use serde_json::json;

#[derive(Debug, Parser)]
struct Args {
    /// Sequences drawn per grammar.
    #[arg(long, default_value_t = 20)]
    sequences: usize,
    /// Most tokens per sequence.
    #[arg(long, default_value_t = 200)]
    tokens: usize,
    #[arg(long, default_value = "bench/results")]
    out: PathBuf,
}

/// A cheap deterministic noise source (no RNG dependency needed here).
struct Noise(u64);

impl Noise {
    fn next(&mut self) -> f32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 40) as f32 / (1u64 << 24) as f32
    }
}

fn main() -> Result<()> {
    let args = Args::parse();
    let path = real_model().context("the real model is needed (hearth models pull)")?;
    let model = LocalModel::load(&path, Precision::Quantized)?;
    let prompt = model.encode_prompt(&model.render_chat(&[hearth_models::Message::new(
        "user",
        "Describe a person as JSON.",
    )])?)?;
    // The reference: decode time per token of this model here.
    let g = model.generate(
        &GenerateRequest {
            prompt_ids: prompt.clone(),
            max_tokens: 64,
            sampling: SamplingParams::default(),
            stop: Vec::new(),
        },
        |_| {},
    )?;
    let decode_us = g.decode_secs * 1e6 / g.token_ids.len().saturating_sub(1).max(1) as f64;
    let base = model.prompt_logits(&prompt)?;
    let text = model.text();
    let start = Instant::now();
    let grammars = text.grammars()?;
    let build_ms = start.elapsed().as_secs_f64() * 1e3;
    let ends = text.tokenizer().eos_ids().to_vec();
    let schema = json!({
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 40},
            "age": {"type": "integer", "minimum": 0, "maximum": 130},
            "email": {"type": "string", "pattern": "^[a-z]+@[a-z]+\\.[a-z]{2,3}$"},
            "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 5},
            "address": {"type": "object", "properties": {"city": {"type": "string"}, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}}, "required": ["city", "zip"]}
        },
        "required": ["name", "age", "email", "tags", "address"],
        "additionalProperties": false
    });
    let cases = [
        ("json_object", grammar::json_object()),
        ("json_schema", grammar::json_schema(&schema)),
        (
            "regex",
            grammar::regex(r"(yes|no|maybe)(, [A-Z][a-z]{2,12}){1,6}\."),
        ),
    ];
    let mut rows = Vec::new();
    let mut noise = Noise(0x9e37_79b9_7f4a_7c15);
    let mut row = vec![0f32; base.len()];
    // Unconstrained sampling: the reference for the sampler's own cost.
    let mut plain = Vec::new();
    let mut s = Sampler::new(SamplingParams {
        temperature: 1.0,
        seed: 1,
        ..Default::default()
    })?;
    for _ in 0..args.sequences * 20 {
        for (r, b) in row.iter_mut().zip(&base) {
            *r = b + noise.next() * 2.0;
        }
        let t = Instant::now();
        let _ = s.pick(&row);
        plain.push(t.elapsed().as_secs_f64() * 1e6);
    }
    let plain_us = median(&plain);
    for (name, g) in &cases {
        let mut times = Vec::new();
        let mut compile = Vec::new();
        let mut lens = Vec::new();
        for seq in 0..args.sequences {
            let t = Instant::now();
            let c = grammars.compile(g)?;
            compile.push(t.elapsed().as_secs_f64() * 1e3);
            let mut s = Sampler::new(SamplingParams {
                temperature: 1.0,
                seed: seq as u64,
                ..Default::default()
            })?
            .with_constraint(Box::new(c), &ends);
            let mut n = 0;
            for step in 0..args.tokens {
                for (r, b) in row.iter_mut().zip(&base) {
                    *r = b + noise.next() * 2.0;
                }
                // Ending grows likelier as the sequence goes on.
                for &e in &ends {
                    row[e as usize] += step as f32 * 0.05;
                }
                let t = Instant::now();
                let p = s.pick(&row).map_err(anyhow::Error::msg)?;
                times.push(t.elapsed().as_secs_f64() * 1e6);
                n += 1;
                if ends.contains(&p.token) {
                    break;
                }
            }
            lens.push(n as f64);
        }
        let us = median(&times);
        let mut sorted = times.clone();
        sorted.sort_by(f64::total_cmp);
        let p99 = sorted[(sorted.len() * 99 / 100).min(sorted.len() - 1)];
        print(&format!(
            "{name}: median {us:.1} µs/token (p99 {p99:.1}), compile {:.2} ms, {:.0} tokens per sequence",
            median(&compile),
            median(&lens)
        ))?;
        rows.push(Row::new(
            &format!("{name}: constrained sample, µs/token (ref: unconstrained)"),
            us,
            plain_us,
        ));
        rows.push(Row::new(
            &format!("{name}: constrained sample p99, µs/token (ref: decode µs/token)"),
            p99,
            decode_us,
        ));
        rows.push(Row::new(
            &format!("{name}: constrained sample, µs/token (ref: decode µs/token)"),
            us,
            decode_us,
        ));
        rows.push(Row::new(
            &format!("{name}: compile, ms (ref: decode ms/token)"),
            median(&compile),
            decode_us / 1e3,
        ));
    }
    print(&format!(
        "vocabulary index built once per model: {build_ms:.0} ms; decode {decode_us:.0} µs/token; unconstrained sample {plain_us:.1} µs/token"
    ))?;
    write_results(
        &args.out,
        "grammar",
        &format!(
            "Constrained decoding cost on SmolLM2-135M's vocabulary ({} tokens), {}",
            base.len(),
            cpu_name()
        ),
        "Hearth constrained sampling",
        "unconstrained sampling / the model's decode step",
        &rows,
        json!({
            "vocabulary": base.len(),
            "index_build_ms": build_ms,
            "decode_us_per_token": decode_us,
            "unconstrained_sample_us": plain_us,
            "sequences_per_grammar": args.sequences,
            "command": "cargo run --release -p hearth-bench --bin grammar",
        }),
    )?;
    Ok(())
}
