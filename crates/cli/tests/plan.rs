//! `hearth profile` and `hearth plan --devices FILE`: a hypothetical
//! cluster from a TOML file, planned on a tiny model (fast, no cache
//! needed) and, where the real model is present, the README's example.

use std::path::Path;
use std::process::{Command, Output};

use anyhow::Result;
use hearth_runtime::profile::PlanReport;
use hearth_test_utils::{TinySpec, tiny_model, workspace_root};

fn hearth(args: &[&str], home: &Path) -> Result<Output> {
    Ok(Command::new(env!("CARGO_BIN_EXE_hearth"))
        .args(args)
        .env("HEARTH_HOME", home)
        .output()?)
}

/// Runs `hearth ARGS`, requires success (else fails with its stderr) and
/// parses its JSON output.
fn hearth_json<T: serde::de::DeserializeOwned>(args: &[&str], home: &Path) -> Result<T> {
    let out = hearth(args, home)?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(serde_json::from_slice(&out.stdout)?)
}

fn times(ms: f64) -> String {
    let t = |x: f64| {
        format!(
            "{{ decode_s = {}, prefill_s_per_token = {}, train_forward_s_per_token = {}, train_s_per_token = {} }}",
            x / 1e3,
            x / 1e4,
            x / 2e4,
            x / 5e3
        )
    };
    format!(
        "[device.times]\nlayer = {}\nembed = {}\nhead = {}\n",
        t(ms),
        t(ms / 50.0),
        t(ms * 3.0)
    )
}

#[test]
fn plans_a_cluster_described_in_a_file() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let m = tiny_model(&dir.path().join("m"), TinySpec::default())?;
    let file = dir.path().join("cluster.toml");
    let text = format!(
        "model = {:?}\n[[device]]\nname = \"fast\"\nmemory_gb = 8\n{}\n[[device]]\nname = \"slow\"\nmemory_gb = 8\n{}\n[[device]]\nname = \"far\"\nmemory_gb = 8\n{}\n[[link]]\nbetween = [\"far\", \"fast\"]\nbandwidth_mbit = 1\nrtt_ms = 200\n",
        m.gguf_q8_0.to_string_lossy(),
        times(1.0),
        times(4.0),
        times(1.0),
    );
    std::fs::write(&file, text)?;
    let f = file.to_string_lossy().into_owned();
    let r: PlanReport = hearth_json(&["plan", "--devices", &f, "--json"], dir.path())?;
    let plan = r.plan.expect("a plan");
    // Single-stream decode of a 4-layer model: the fast device alone wins.
    assert_eq!(plan.stages.len(), 1);
    assert_eq!(plan.stages[0].device_name, "fast");
    assert_eq!(r.input.unmeasured_links, vec![(0, 1), (1, 2)]);
    assert_eq!(r.input.links.bandwidth[0][2], 1e6 / 8.0);

    // Throughput: the fast device and one more, never the far one.
    let out = hearth(
        &["plan", "--devices", &f, "--json", "--sequences", "16"],
        dir.path(),
    )?;
    let r: PlanReport = serde_json::from_slice(&out.stdout)?;
    let plan = r.plan.expect("a plan");
    assert!(
        plan.stages.iter().all(|s| s.device_name != "far"),
        "{plan:?}"
    );

    // Training, and the human-readable output.
    let out = hearth(
        &[
            "plan",
            "--devices",
            &f,
            "--workload",
            "training",
            "--micro-batches",
            "5",
        ],
        dir.path(),
    )?;
    let text = String::from_utf8(out.stdout)?;
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("training step") && text.contains("why:"),
        "{text}"
    );

    // Not enough memory anywhere: a plan-less report saying what is missing, exit 2.
    let tight = std::fs::read_to_string(&file)?.replace("memory_gb = 8", "memory_gb = 0.0001");
    std::fs::write(&file, tight)?;
    let out = hearth(&["plan", "--devices", &f], dir.path())?;
    let text = String::from_utf8(out.stdout)?;
    assert_eq!(out.status.code(), Some(2), "{text}");
    assert!(text.contains("no plan") && text.contains("fit"), "{text}");
    Ok(())
}

#[test]
fn bad_cluster_files_get_one_line_errors() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let m = tiny_model(&dir.path().join("m"), TinySpec::default())?;
    let model = format!("model = {:?}\n", m.gguf_q8_0.to_string_lossy());
    let dev = format!("[[device]]\nname = \"a\"\nmemory_gb = 8\n{}", times(1.0));
    let cases = [
        ("this is not toml", "not a valid cluster file"),
        (&*model, "not a valid cluster file"),
        (
            &*format!(
                "{model}{dev}[[link]]\nbetween = [\"a\", \"zz\"]\nbandwidth_mbit = 1\nrtt_ms = 1\n"
            ),
            "unknown device",
        ),
        (
            &*format!("{model}[[device]]\nname = \"b\"\nmemory_gb = 8\n"),
            "needs speed",
        ),
        (
            &*format!("{model}[[device]]\nname = \"b\"\nmemory_gb = -1\nspeed = 1.0\n"),
            "memory_gb",
        ),
        (
            &*format!("{model}{dev}colour = \"red\"\n"),
            "not a valid cluster file",
        ),
    ];
    for (i, (text, needle)) in cases.iter().enumerate() {
        let file = dir.path().join(format!("c{i}.toml"));
        std::fs::write(&file, text)?;
        let out = hearth(&["plan", "--devices", &file.to_string_lossy()], dir.path())?;
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "case {i}: {err}");
        assert!(!err.contains("panicked"), "case {i}: {err}");
        assert!(
            err.contains(needle),
            "case {i}: expected {needle:?} in {err}"
        );
    }
    // No node to ask.
    let out = hearth(&["plan", "--http", "127.0.0.1:9"], dir.path())?;
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("hearth up"));
    Ok(())
}

/// The README's example file, with speeds relative to this machine's
/// measured profile of the real model.
#[test]
fn the_readme_example_plans_and_profile_prints() -> Result<()> {
    let Some(model) = hearth_test_utils::real_model() else {
        return Ok(());
    };
    let home = model
        .parent()
        .and_then(Path::parent)
        .map(Path::to_path_buf)
        .expect("models dir inside HEARTH_HOME");
    let example = workspace_root().join("examples/home-cluster.toml");
    let r: PlanReport = hearth_json(
        &["plan", "--devices", &example.to_string_lossy(), "--json"],
        &home,
    )?;
    let plan = r.plan.expect("a plan");
    assert_eq!(plan.stages[0].device_name, "desktop");
    assert!(
        plan.explanation
            .iter()
            .any(|e| e.contains("old-laptop left out")),
        "{:?}",
        plan.explanation
    );
    let v: serde_json::Value = hearth_json(&["profile", "--json"], &home)?;
    assert!(v["model"]["layer"]["decode_s"].as_f64().unwrap() > 0.0);
    assert_eq!(v["model_cost"]["layers"].as_array().map(Vec::len), Some(30));
    assert!(v["hardware"]["logical_cores"].as_u64().unwrap() >= 1);
    Ok(())
}

/// `hearth profile --backend wgpu` measures the model on the GPU (Mesa's
/// llvmpipe where there is none) and lists the adapters; a bad backend
/// gets a one-line error.
#[test]
fn profile_measures_on_the_chosen_backend() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let m = tiny_model(&dir.path().join("m"), TinySpec::default())?;
    let model = m.gguf_q4_1.to_string_lossy().into_owned();
    let out = hearth(
        &["profile", "--backend", "cuda", "--model", &model],
        dir.path(),
    )?;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown backend"));
    let v: serde_json::Value = hearth_json(
        &["profile", "--backend", "cpu", "--model", &model, "--json"],
        dir.path(),
    )?;
    assert_eq!(v["model"]["backend"], "cpu");
    let out = hearth(
        &["profile", "--backend", "wgpu", "--model", &model, "--json"],
        dir.path(),
    )?;
    if !out.status.success() && std::env::var_os("HEARTH_REQUIRE_GPU").is_none() {
        eprintln!(
            "skipping the wgpu half: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
        return Ok(());
    }
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let backend = v["model"]["backend"].as_str().unwrap_or_default();
    assert!(backend.starts_with("wgpu:"), "{backend}");
    assert!(v["model"]["layer"]["decode_s"].as_f64().unwrap() > 0.0);
    assert!(!v["hardware"]["gpus"].as_array().unwrap().is_empty());
    // --gpu picks an adapter by name; a missing one is an error, not the CPU.
    let out = hearth(
        &[
            "profile",
            "--backend",
            "auto",
            "--gpu",
            "no such adapter",
            "--model",
            &model,
        ],
        dir.path(),
    )?;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no GPU adapter named like"), "{err}");
    let name = backend.trim_start_matches("wgpu:");
    let word = name.split_whitespace().next().unwrap_or(name);
    let v: serde_json::Value = hearth_json(
        &[
            "profile",
            "--backend",
            "auto",
            "--gpu",
            word,
            "--model",
            &model,
            "--json",
        ],
        dir.path(),
    )?;
    assert_eq!(v["model"]["backend"].as_str(), Some(backend));
    Ok(())
}
