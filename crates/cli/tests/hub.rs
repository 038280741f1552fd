//! `hearth models pull ORG/NAME[:QUANT]` through the real hub client
//! (`hf-hub`) against a local server with the hub's HTTP layout
//! (`hearth_test_utils::hub`): GGUF repositories with several
//! quantizations, model folders, gated repositories and `HF_TOKEN`, a
//! download cut short and resumed (within a run, and in the next run
//! after the process was killed), a corrupted blob, `refs/main` moving,
//! and `hearth models rm`.

use std::path::Path;
use std::process::{Command, Output};

use anyhow::Result;
use hearth_test_utils::hub::{HubMock, MockRepo};
use hearth_test_utils::{TinySpec, tiny_model};

/// `hearth ARGS` with its home under `home` and the hub at `hub`.
fn hearth_command(args: &[&str], home: &Path, hub: &HubMock, token: Option<&str>) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_hearth"));
    c.args(args)
        .env("HEARTH_HOME", home)
        .env("HF_HOME", home.join("hf-home"))
        .env_remove("HF_HUB_CACHE")
        .env_remove("HF_TOKEN")
        .env("HF_ENDPOINT", &hub.url);
    if let Some(t) = token {
        c.env("HF_TOKEN", t);
    }
    c
}

fn hearth(args: &[&str], home: &Path, hub: &HubMock, token: Option<&str>) -> Result<Output> {
    Ok(hearth_command(args, home, hub, token).output()?)
}

fn ok(out: &Output) -> String {
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "failed: {err}");
    assert!(!err.contains("panicked"), "{err}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn failed(out: &Output, needle: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "expected failure: {err}");
    assert!(!err.contains("panicked"), "{err}");
    assert!(err.contains(needle), "expected {needle:?} in {err}");
}

fn read(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap_or_default()
}

/// Generates 3 tokens with `model`: the pulled model loads and runs.
fn generates(model: &str, home: &Path, hub: &HubMock) -> Result<()> {
    let out = hearth(
        &[
            "generate",
            "--model",
            model,
            "--prompt",
            "the",
            "--max-tokens",
            "3",
            "--json",
        ],
        home,
        hub,
        None,
    )?;
    let v: serde_json::Value = serde_json::from_str(&ok(&out))?;
    assert_eq!(v["completion_tokens"], 3, "{v}");
    Ok(())
}

#[test]
fn gguf_quantizations_resume_gating_and_rm() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let m = tiny_model(&dir.path().join("m"), TinySpec::default())?;
    let (q8, q41) = (read(&m.gguf_q8_0), read(&m.gguf_q4_1));
    let repo = MockRepo {
        id: "acme/tiny-GGUF".into(),
        commit: "1111111111111111111111111111111111111111".into(),
        files: vec![
            ("README.md".into(), b"# tiny".to_vec()),
            ("tiny-Q8_0.gguf".into(), q8.clone()),
            ("tiny-Q4_1.gguf".into(), q41.clone()),
        ],
        token: None,
        wrong_hash: vec![],
    };
    let gated = MockRepo {
        id: "acme/gated-GGUF".into(),
        commit: "2222222222222222222222222222222222222222".into(),
        files: vec![("gated-Q8_0.gguf".into(), q8.clone())],
        token: Some("hf_secret".into()),
        wrong_hash: vec![],
    };
    let hub = HubMock::start(vec![repo.clone(), gated])?;
    let home = dir.path().join("home");
    let cache = home.join("hf-home/hub");

    // Several quantizations, none named, none preferred: the error lists them.
    let out = hearth(&["models", "pull", "acme/tiny-GGUF"], &home, &hub, None)?;
    failed(&out, "tiny-Q8_0.gguf");

    // A download cut short resumes where it stopped.
    hub.cut_once("acme/tiny-GGUF", "tiny-Q8_0.gguf", q8.len() / 3);
    let out = hearth(
        &["models", "pull", "acme/tiny-GGUF:Q8_0"],
        &home,
        &hub,
        None,
    )?;
    ok(&out);
    let snap = cache
        .join("models--acme--tiny-GGUF/snapshots")
        .join(&repo.commit);
    assert_eq!(read(&snap.join("tiny-Q8_0.gguf")), q8);
    assert!(
        !snap.join("tiny-Q4_1.gguf").exists(),
        "fetched one quantization only"
    );
    assert_eq!(
        std::fs::read_to_string(cache.join("models--acme--tiny-GGUF/refs/main"))?.trim(),
        repo.commit
    );
    let bodies: Vec<Option<String>> = hub
        .requests()
        .into_iter()
        .filter(|(p, r)| p.ends_with("tiny-Q8_0.gguf") && r.as_deref() != Some("bytes=0-0"))
        .map(|(_, r)| r)
        .collect();
    let resumed = bodies.iter().flatten().any(|r| {
        r.strip_prefix("bytes=")
            .and_then(|r| r.split('-').next())
            .and_then(|a| a.parse::<usize>().ok())
            .is_some_and(|a| a > 0)
    });
    assert!(resumed, "no request resumed past byte 0: {bodies:?}");

    // Pulled again: nothing is fetched twice.
    let fetched = |hub: &HubMock| {
        hub.requests()
            .into_iter()
            .filter(|(p, r)| p.ends_with("tiny-Q8_0.gguf") && r.as_deref() != Some("bytes=0-0"))
            .count()
    };
    let before = fetched(&hub);
    ok(&hearth(
        &["models", "pull", "acme/tiny-GGUF:Q8_0"],
        &home,
        &hub,
        None,
    )?);
    assert_eq!(fetched(&hub), before, "the file was downloaded again");

    // It is listed and it runs under the id it was pulled by.
    let list = ok(&hearth(&["models", "list"], &home, &hub, None)?);
    assert!(list.contains("acme/tiny-GGUF:Q8_0"), "{list}");
    generates("acme/tiny-GGUF:Q8_0", &home, &hub)?;
    // Not pulled: a clear pointer to `models pull`.
    let out = hearth(
        &[
            "generate",
            "--model",
            "acme/tiny-GGUF:Q4_1",
            "--prompt",
            "x",
        ],
        &home,
        &hub,
        None,
    )?;
    failed(&out, "hearth models pull acme/tiny-GGUF:Q4_1");

    // A gated repository: refused without a token (saying so), fetched with it.
    let out = hearth(&["models", "pull", "acme/gated-GGUF"], &home, &hub, None)?;
    failed(&out, "HF_TOKEN");
    let out = hearth(
        &["models", "pull", "acme/gated-GGUF"],
        &home,
        &hub,
        Some("hf_secret"),
    )?;
    ok(&out);

    // `main` moves to a new commit with new bytes: pulled again, used.
    let mut moved = repo.clone();
    moved.commit = "3333333333333333333333333333333333333333".into();
    moved.files[1].1 = q41.clone();
    hub.set_repo(moved.clone());
    ok(&hearth(
        &["models", "pull", "acme/tiny-GGUF:Q8_0"],
        &home,
        &hub,
        None,
    )?);
    let list = ok(&hearth(&["models", "list", "--json"], &home, &hub, None)?);
    let list: serde_json::Value = serde_json::from_str(&list)?;
    let entry = list
        .as_array()
        .into_iter()
        .flatten()
        .find(|e| e["name"] == "acme/tiny-GGUF:Q8_0")
        .cloned()
        .unwrap_or_default();
    let path = entry["path"].as_str().unwrap_or_default();
    assert!(path.contains(&moved.commit), "{entry}");
    assert_eq!(read(Path::new(path)), q41);

    // rm of one quantization takes only its files (and the blobs nothing
    // else uses) out; here Q4_1's file shares its blob with the new Q8_0.
    ok(&hearth(
        &["models", "pull", "acme/tiny-GGUF:Q4_1"],
        &home,
        &hub,
        None,
    )?);
    let snapshot = Path::new(path)
        .parent()
        .unwrap_or(Path::new("/"))
        .to_path_buf();
    let other: Vec<String> = std::fs::read_dir(&snapshot)?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".gguf") && !n.contains("Q8_0"))
        .collect();
    assert!(
        !other.is_empty(),
        "another quantization stays in the snapshot"
    );
    let blobs =
        || std::fs::read_dir(cache.join("models--acme--tiny-GGUF/blobs")).map(|d| d.count());
    let before = blobs()?;
    ok(&hearth(
        &["models", "rm", "acme/tiny-GGUF:Q8_0"],
        &home,
        &hub,
        None,
    )?);
    assert!(!Path::new(path).exists(), "the Q8_0 file is gone");
    for n in &other {
        assert!(snapshot.join(n).exists(), "{n} was kept");
        assert!(!read(&snapshot.join(n)).is_empty());
    }
    assert!(blobs()? < before, "the Q8_0 blob went with it");
    let list = ok(&hearth(&["models", "list", "--json"], &home, &hub, None)?);
    assert!(!list.contains("acme/tiny-GGUF:Q8_0"), "{list}");
    // rm takes the repository out of the cache.
    ok(&hearth(
        &["models", "rm", "acme/tiny-GGUF"],
        &home,
        &hub,
        None,
    )?);
    assert!(!cache.join("models--acme--tiny-GGUF").exists());
    let out = hearth(&["models", "rm", "acme/tiny-GGUF"], &home, &hub, None)?;
    failed(&out, "no model");
    Ok(())
}

#[test]
fn a_model_folder_is_pulled_whole_and_a_corrupted_blob_is_refused() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let m = tiny_model(&dir.path().join("m"), TinySpec::default())?;
    let st = &m.safetensors_dir;
    let mut files = vec![(".gitattributes".to_string(), b"*.safetensors lfs".to_vec())];
    for f in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ] {
        files.push((f.to_string(), read(&st.join(f))));
    }
    let folder = MockRepo {
        id: "acme/tiny".into(),
        commit: "4444444444444444444444444444444444444444".into(),
        files: files.clone(),
        token: None,
        wrong_hash: vec![],
    };
    let corrupt = MockRepo {
        id: "acme/corrupt".into(),
        commit: "5555555555555555555555555555555555555555".into(),
        files,
        token: None,
        wrong_hash: vec!["model.safetensors".into()],
    };
    let hub = HubMock::start(vec![folder.clone(), corrupt])?;
    let home = dir.path().join("home");
    ok(&hearth(
        &["models", "pull", "acme/tiny"],
        &home,
        &hub,
        None,
    )?);
    let snap = home
        .join("hf-home/hub/models--acme--tiny/snapshots")
        .join(&folder.commit);
    for f in ["config.json", "model.safetensors", "tokenizer.json"] {
        assert!(snap.join(f).is_file(), "{f}");
    }
    assert!(!snap.join(".gitattributes").exists());
    generates("acme/tiny", &home, &hub)?;

    let out = hearth(&["models", "pull", "acme/corrupt"], &home, &hub, None)?;
    failed(&out, "content hash");
    let blobs = home.join("hf-home/hub/models--acme--corrupt/blobs");
    let kept: Vec<u64> = std::fs::read_dir(&blobs)?
        .filter_map(|e| e.ok()?.metadata().ok().map(|m| m.len()))
        .collect();
    let weights = read(&st.join("model.safetensors")).len() as u64;
    assert!(!kept.contains(&weights), "the corrupted blob was kept");
    // No such repository: the hub's answer, said plainly.
    let out = hearth(&["models", "pull", "acme/missing"], &home, &hub, None)?;
    failed(&out, "no such repository");
    Ok(())
}

/// A GGUF split in parts on the hub: `pull` fetches every part, joins them
/// into one file (the model's bytes once on disk: the parts and their blobs
/// go), lists and runs it under the id it was pulled by, and a second pull
/// fetches nothing. `hearth models join` joins parts fetched by hand.
#[test]
fn a_split_gguf_is_pulled_joined_and_runs() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let m = tiny_model(&dir.path().join("m"), TinySpec::default())?;
    let parts_dir = dir.path().join("parts");
    std::fs::create_dir_all(&parts_dir)?;
    let parts = hearth_test_utils::split_gguf(&m.gguf_q8_0, &parts_dir, "tiny-Q8_0", 3)?;
    let mut files: Vec<(String, Vec<u8>)> = parts
        .iter()
        .map(|p| {
            (
                format!(
                    "Q8_0/{}",
                    p.file_name().and_then(|n| n.to_str()).unwrap_or_default()
                ),
                read(p),
            )
        })
        .collect();
    files.push(("tiny-Q4_1.gguf".into(), read(&m.gguf_q4_1)));
    let repo = MockRepo {
        id: "acme/split-GGUF".into(),
        commit: "4444444444444444444444444444444444444444".into(),
        files,
        token: None,
        wrong_hash: vec![],
    };
    let hub = HubMock::start(vec![repo.clone()])?;
    let home = dir.path().join("home");
    let cache = home.join("hf-home/hub/models--acme--split-GGUF");
    let out = hearth(
        &["models", "pull", "acme/split-GGUF:Q8_0"],
        &home,
        &hub,
        None,
    )?;
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    ok(&out);
    assert!(err.contains("joining 3 parts"), "{err}");
    let snap = cache.join("snapshots").join(&repo.commit).join("Q8_0");
    let joined = snap.join("tiny-Q8_0.gguf");
    let (a, b) = (
        hearth_models::WeightFile::open(&m.gguf_q8_0)?,
        hearth_models::WeightFile::open(&joined)?,
    );
    assert_eq!(a.tensor_layout(), b.tensor_layout());
    for p in &parts {
        let name = p.file_name().unwrap_or_default();
        assert!(
            !snap.join(name).exists(),
            "{} stayed",
            name.to_string_lossy()
        );
    }
    // Only the joined file's bytes remain in the cache's blobs.
    let blobs: u64 = std::fs::read_dir(cache.join("blobs"))?
        .filter_map(|e| e.ok()?.metadata().ok())
        .map(|m| m.len())
        .sum();
    assert_eq!(blobs, 0, "the parts' blobs are gone");
    let list = ok(&hearth(&["models", "list", "--json"], &home, &hub, None)?);
    let list: serde_json::Value = serde_json::from_str(&list)?;
    let entry = list
        .as_array()
        .into_iter()
        .flatten()
        .find(|e| e["name"] == "acme/split-GGUF:Q8_0")
        .cloned()
        .unwrap_or_default();
    assert_eq!(entry["path"].as_str(), joined.to_str(), "{list}");
    generates("acme/split-GGUF:Q8_0", &home, &hub)?;
    // Pulled again: nothing fetched.
    let before = hub.requests().len();
    ok(&hearth(
        &["models", "pull", "acme/split-GGUF:Q8_0"],
        &home,
        &hub,
        None,
    )?);
    let fetched: Vec<String> = hub.requests()[before..]
        .iter()
        .map(|(p, _)| p.clone())
        .filter(|p| p.ends_with(".gguf"))
        .collect();
    assert!(fetched.is_empty(), "{fetched:?}");

    // By hand: a part refuses to load and says how; `models join` joins.
    let out = hearth(
        &[
            "generate",
            "--model",
            parts[0].to_str().unwrap_or_default(),
            "--prompt",
            "x",
        ],
        &home,
        &hub,
        None,
    )?;
    failed(&out, "hearth models join");
    ok(&hearth(
        &["models", "join", parts[1].to_str().unwrap_or_default()],
        &home,
        &hub,
        None,
    )?);
    let by_hand = hearth_models::WeightFile::open(&parts_dir.join("tiny-Q8_0.gguf"))?;
    assert_eq!(a.tensor_layout(), by_hand.tensor_layout());
    let out = hearth(
        &["models", "join", m.gguf_q8_0.to_str().unwrap_or_default()],
        &home,
        &hub,
        None,
    )?;
    failed(&out, "not named as a part");
    Ok(())
}

/// A pull killed in the middle of a file leaves the part it had; the next
/// `hearth models pull` asks only for the rest, and the file is whole.
#[test]
fn a_pull_killed_midway_resumes_in_the_next_run() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let m = tiny_model(&dir.path().join("m"), TinySpec::default())?;
    let q8 = read(&m.gguf_q8_0);
    let repo = MockRepo {
        id: "acme/slow-GGUF".into(),
        commit: "4444444444444444444444444444444444444444".into(),
        files: vec![("slow-Q8_0.gguf".into(), q8.clone())],
        token: None,
        wrong_hash: vec![],
    };
    let hub = HubMock::start(vec![repo.clone()])?;
    let home = dir.path().join("home");
    let blobs = home.join("hf-home/hub/models--acme--slow-GGUF/blobs");
    let part = q8.len() / 2;
    hub.stall_once("acme/slow-GGUF", "slow-Q8_0.gguf", part);
    let mut child = hearth_command(
        &["models", "pull", "acme/slow-GGUF:Q8_0"],
        &home,
        &hub,
        None,
    )
    .stdout(std::process::Stdio::null())
    .stderr(std::process::Stdio::null())
    .spawn()?;
    // Wait until the partial file holds what was sent, then kill the pull.
    let partial = || -> u64 {
        std::fs::read_dir(&blobs)
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .filter(|e| !e.file_name().to_string_lossy().ends_with(".lock"))
                    .filter_map(|e| e.metadata().ok())
                    .map(|m| m.len())
                    .max()
                    .unwrap_or(0)
            })
            .unwrap_or(0)
    };
    let t0 = std::time::Instant::now();
    while partial() < part as u64 {
        assert!(
            t0.elapsed().as_secs() < 30,
            "the pull never wrote its first half"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    child.kill()?;
    let _ = child.wait()?;
    let before = hub.requests().len();
    ok(&hearth(
        &["models", "pull", "acme/slow-GGUF:Q8_0"],
        &home,
        &hub,
        None,
    )?);
    let snap = home
        .join("hf-home/hub/models--acme--slow-GGUF/snapshots")
        .join(&repo.commit);
    assert_eq!(
        read(&snap.join("slow-Q8_0.gguf")),
        q8,
        "whole after resuming"
    );
    // The second run asked for the rest only.
    let asked: Vec<Option<String>> = hub.requests()[before..]
        .iter()
        .filter(|(p, r)| p.ends_with("slow-Q8_0.gguf") && r.as_deref() != Some("bytes=0-0"))
        .map(|(_, r)| r.clone())
        .collect();
    let from: Vec<usize> = asked
        .iter()
        .flatten()
        .filter_map(|r| r.strip_prefix("bytes=")?.split('-').next()?.parse().ok())
        .collect();
    assert!(from.iter().any(|&a| a >= part), "asked {asked:?}");
    assert!(!from.contains(&0), "asked {asked:?}");
    Ok(())
}
