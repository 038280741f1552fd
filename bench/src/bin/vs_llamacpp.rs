//! Hearth vs llama.cpp on the same GGUF, same prompt, same thread count,
//! runs interleaved (hearth, llama.cpp, hearth, ...) so machine noise hits
//! both alike. Prints a Markdown table and writes JSON + Markdown under
//! `bench/results/`.
//!
//! `bench/run_vs_llamacpp.sh` sets up llama-cpp-python and runs this.

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::Parser;
use hearth_bench::{Row, median, write_results};
use hearth_models::{LocalModel, Logits, Message, Precision, StageInput, sampling::argmax};

#[derive(Debug, Parser)]
struct Args {
    /// GGUF file (default: the default model, fetched when missing).
    #[arg(long)]
    model: Option<String>,
    /// Python with llama-cpp-python installed.
    #[arg(long, default_value = ".venv-llama/bin/python")]
    llama_python: PathBuf,
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Interleaved rounds per engine.
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// Decode steps per round.
    #[arg(long, default_value_t = 128)]
    decode: usize,
    #[arg(long, default_value = "bench/results")]
    out: PathBuf,
    /// Runs Hearth's rounds alone (no llama.cpp, nothing written): for
    /// profiling, e.g. under `perf record`.
    #[arg(long)]
    hearth_only: bool,
}

struct Timing {
    prefill_tps: f64,
    decode_tps: f64,
}

fn hearth_round(model: &LocalModel, prompt: &[u32], decode: usize) -> Result<Timing> {
    let stage = model.stage();
    let mut cache = stage.new_cache();
    let t0 = Instant::now();
    let mut logits = stage.forward(
        StageInput::Tokens(prompt.to_vec()),
        &[prompt.len()],
        &mut [&mut cache],
        Logits::Last,
    )?;
    let prefill = t0.elapsed().as_secs_f64();
    let t1 = Instant::now();
    for _ in 0..decode {
        let tok = argmax(&logits.squeeze(0)?.to_vec1::<f32>()?);
        logits = stage.forward(
            StageInput::Tokens(vec![tok]),
            &[1],
            &mut [&mut cache],
            Logits::Last,
        )?;
    }
    let dec = t1.elapsed().as_secs_f64();
    Ok(Timing {
        prefill_tps: prompt.len() as f64 / prefill,
        decode_tps: decode as f64 / dec,
    })
}

fn main() -> Result<()> {
    let args = Args::parse();
    // Both engines get the same number of threads (candle and rayon read this).
    // SAFETY: set before any thread pool exists, while single-threaded.
    unsafe { std::env::set_var("RAYON_NUM_THREADS", args.threads.to_string()) };
    // SAFETY: as above; then the rest as `hearth` sets its process up.
    unsafe { hearth_models::threads::configure_process() };
    let path = hearth_models::store::resolve(args.model.as_deref(), &mut |_| {})?;
    let model = LocalModel::load(&path, Precision::Quantized)?;
    let user = "Write a short story about a family that builds a computer cluster from the old laptops in their home, and what they ask it first.";
    let prompt_text = model.render_chat(&[Message::new("user", user)])?;
    let prompt = model.encode_prompt(&prompt_text)?;

    if args.hearth_only {
        hearth_round(&model, &prompt, 8)?;
        for r in 0..args.rounds {
            let h = hearth_round(&model, &prompt, args.decode)?;
            eprintln!(
                "round {r}: hearth prefill {:.1} decode {:.1} tok/s",
                h.prefill_tps, h.decode_tps
            );
        }
        return Ok(());
    }
    let runner = hearth_test_utils::workspace_root().join("bench/llamacpp_runner.py");
    let mut child = Command::new(&args.llama_python)
        .arg(&runner)
        .arg(&path)
        .arg(args.threads.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .with_context(|| {
            format!(
                "starting {} (run bench/run_vs_llamacpp.sh to set it up)",
                args.llama_python.display()
            )
        })?;
    let mut to_llama = child.stdin.take().context("runner stdin")?;
    let mut from_llama = BufReader::new(child.stdout.take().context("runner stdout")?);
    let mut line = String::new();
    from_llama.read_line(&mut line)?;
    let hello: serde_json::Value = serde_json::from_str(&line).context("runner did not start")?;
    let llama_version = hello["llama_cpp_python"]
        .as_str()
        .unwrap_or("?")
        .to_string();

    // Warm-up for both, then interleaved rounds.
    hearth_round(&model, &prompt, 8)?;
    let mut llama_round = |decode: usize| -> Result<Timing> {
        let req = serde_json::json!({"prompt_ids": prompt, "decode": decode});
        writeln!(to_llama, "{req}")?;
        to_llama.flush()?;
        line.clear();
        from_llama.read_line(&mut line)?;
        let v: serde_json::Value = serde_json::from_str(&line).context("runner reply")?;
        let (p, d) = (v["prefill_s"].as_f64(), v["decode_s"].as_f64());
        let (Some(p), Some(d)) = (p, d) else {
            bail!("bad runner reply {line}")
        };
        Ok(Timing {
            prefill_tps: prompt.len() as f64 / p,
            decode_tps: decode as f64 / d,
        })
    };
    llama_round(8)?;
    let (mut hp, mut hd, mut lp, mut ld) = (vec![], vec![], vec![], vec![]);
    for r in 0..args.rounds {
        let h = hearth_round(&model, &prompt, args.decode)?;
        let l = llama_round(args.decode)?;
        eprintln!(
            "round {r}: hearth prefill {:.1} decode {:.1} | llama.cpp prefill {:.1} decode {:.1} tok/s",
            h.prefill_tps, h.decode_tps, l.prefill_tps, l.decode_tps
        );
        hp.push(h.prefill_tps);
        hd.push(h.decode_tps);
        lp.push(l.prefill_tps);
        ld.push(l.decode_tps);
    }
    drop(to_llama);
    let _ = child.wait();
    let rows = vec![
        Row::new("prefill tok/s", median(&hp), median(&lp)),
        Row::new("decode tok/s", median(&hd), median(&ld)),
    ];
    let meta = serde_json::json!({
        "model": path.file_name().map(|f| f.to_string_lossy().into_owned()),
        "prompt_tokens": prompt.len(),
        "decode_tokens": args.decode,
        "threads": args.threads,
        "rounds": args.rounds,
        "reference": format!("llama.cpp (llama-cpp-python {llama_version}, F32 KV cache)"),
        "cpu": hearth_bench::cpu_name(),
        "samples": {"hearth_prefill": hp, "hearth_decode": hd, "llama_prefill": lp, "llama_decode": ld},
    });
    let md = write_results(
        &args.out,
        "vs_llamacpp",
        "Hearth vs llama.cpp, single node",
        "hearth",
        "llama.cpp",
        &rows,
        meta,
    )?;
    hearth_bench::print(&md)?;
    Ok(())
}
