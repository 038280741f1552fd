//! Crash consistency of fine-tuning: `hearth train` killed with SIGKILL at
//! random moments, over and over, mid-step and mid-checkpoint. After every
//! kill the checkpoint on disk is whole (one file naming its job and step,
//! never behind an earlier one), and the job, run to its end, ends at the
//! weights of a run that was never interrupted.

use std::collections::HashMap;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use hearth_test_utils::{TinySpec, tiny_model};

/// Kills in the loop (bounded; the loop also ends when a run finishes the
/// job before its kill).
const RUNS: usize = 50;
const STEPS: u64 = 12;

fn job(model: &Path, out: &str) -> String {
    format!(
        "model = {:?}\ndata = \"data.jsonl\"\noutput_dir = {out:?}\nsteps = {STEPS}\nbatch_size = 4\n\
         micro_batches = 2\nseq_len = 64\nlearning_rate = 0.01\ncheckpoint_every = 1\nseed = 7\n\n\
         [method]\ntype = \"lora\"\nrank = 4\n",
        model.to_string_lossy()
    )
}

fn train(dir: &Path, job: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_hearth"));
    c.arg("train")
        .arg(job)
        .arg("--home")
        .arg(dir.join("home"))
        .env("HEARTH_HOME", dir.join("home"))
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    c
}

/// The adapter's tensors, as f32 values by name.
fn adapter(out: &Path) -> Result<HashMap<String, Vec<f32>>> {
    let bytes = std::fs::read(out.join("adapter/adapter_model.safetensors"))?;
    let st = safetensors::SafeTensors::deserialize(&bytes)?;
    let mut m = HashMap::new();
    for (name, view) in st.tensors() {
        let v = view
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        m.insert(name, v);
    }
    Ok(m)
}

/// The checkpoint's step, if there is one; fails when it is not whole.
fn checkpoint_step(out: &Path) -> Result<Option<u64>> {
    let path = out.join("checkpoint/state.safetensors");
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    safetensors::SafeTensors::deserialize(&bytes).context("the state does not parse")?;
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes)?;
    let meta = header.metadata().clone().unwrap_or_default();
    if !meta.contains_key("hearth.job") {
        bail!("the state names no job: {meta:?}");
    }
    let step = meta
        .get("optimizer_steps")
        .and_then(|s| s.parse().ok())
        .context("the state records no step")?;
    Ok(Some(step))
}

/// Whether a file is being written in `dir`: a temporary file is there
/// beside the checkpoint's own.
fn writing(dir: &Path) -> bool {
    std::fs::read_dir(dir).is_ok_and(|rd| {
        rd.filter_map(|e| e.ok())
            .any(|e| e.file_name().to_string_lossy().starts_with('.'))
    })
}

/// A small deterministic generator for the kill moments (xorshift).
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n.max(1)
    }
}

#[test]
fn train_killed_at_random_moments_resumes_to_the_uninterrupted_weights() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let m = tiny_model(&dir.path().join("m"), TinySpec::default())?;
    let mut data = String::new();
    for i in 0..16 {
        data += &format!("{{\"text\":\"the fox {i} jumps over {} dogs\"}}\n", i * 3);
    }
    std::fs::write(dir.path().join("data.jsonl"), data)?;
    let reference = dir.path().join("reference.toml");
    std::fs::write(&reference, job(&m.gguf_q8_0, "reference"))?;
    let crashed = dir.path().join("crashed.toml");
    std::fs::write(&crashed, job(&m.gguf_q8_0, "crashed"))?;

    // Measure the device on the model first (cached), so every run below
    // is the job alone.
    let out = Command::new(env!("CARGO_BIN_EXE_hearth"))
        .args(["profile", "--backend", "cpu", "--model"])
        .arg(&m.gguf_q8_0)
        .env("HEARTH_HOME", dir.path().join("home"))
        .output()?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The uninterrupted run, timed: kills land anywhere inside such a run.
    let start = Instant::now();
    let out = train(dir.path(), &reference).output()?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let whole = start.elapsed();
    let want = adapter(&dir.path().join("reference"))?;

    let seed = 0x9E37_79B9_7F4A_7C15u64 ^ whole.as_nanos() as u64;
    eprintln!("uninterrupted run: {whole:?}; kill moments from seed {seed:#x}");
    let mut rng = Rng(seed | 1);
    let out_dir = dir.path().join("crashed");
    let mut last = 0u64;
    let mut kills = 0;
    let mut mid_write = 0;
    for run in 0..RUNS {
        let mut child = train(dir.path(), &crashed).spawn()?;
        // Kill moments fall in the first 60% of an uninterrupted run's time
        // (a resumed run starts later in the job and may finish sooner), and
        // the first run is always cut short: a run that ends on its own
        // before any kill would leave nothing tested.
        let span = whole.as_millis() as u64 * 6 / 10 + 1;
        let span = if run == 0 { span / 2 + 1 } else { span };
        let window = Duration::from_millis(rng.below(span));
        if run % 2 == 0 {
            // A random moment.
            std::thread::sleep(window);
        } else {
            // The moment a checkpoint is being written (its temporary file
            // is there), or the end of the window.
            let until = Instant::now() + window;
            while Instant::now() < until {
                if writing(&out_dir.join("checkpoint")) {
                    mid_write += 1;
                    break;
                }
                std::thread::sleep(Duration::from_micros(200));
            }
        }
        let finished = child.try_wait()?.is_some();
        if !finished {
            child.kill()?;
            kills += 1;
        }
        let status = child.wait()?;
        let step = checkpoint_step(&out_dir).with_context(|| format!("after run {run}"))?;
        let step = step.unwrap_or(0);
        assert!(
            step >= last && step <= STEPS,
            "run {run}: the checkpoint went from step {last} to {step}"
        );
        last = step;
        if finished {
            assert!(status.success(), "run {run} failed on its own");
            break;
        }
    }
    eprintln!(
        "{kills} kills ({mid_write} while a checkpoint file was being written); \
         the checkpoint reached step {last}"
    );
    assert!(kills > 0, "no run was killed");
    // To the end, without a kill.
    let out = train(dir.path(), &crashed).output()?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(checkpoint_step(&out_dir)?, Some(STEPS));
    let got = adapter(&out_dir)?;
    assert_eq!(got.len(), want.len());
    let scale = want
        .values()
        .flatten()
        .fold(0f32, |m, x| m.max(x.abs()))
        .max(1e-12);
    let mut worst = 0f32;
    for (name, w) in &want {
        let g = got.get(name).with_context(|| format!("{name} missing"))?;
        assert_eq!(g.len(), w.len(), "{name}");
        for (a, b) in g.iter().zip(w) {
            worst = worst.max((a - b).abs());
        }
    }
    eprintln!("worst difference ÷ largest weight: {}", worst / scale);
    assert!(
        worst / scale <= 1e-5,
        "the resumed job's weights differ from the uninterrupted run's by {}",
        worst / scale
    );
    Ok(())
}
