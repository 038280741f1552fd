//! Pipeline inference across `hearth up` processes on loopback, on the
//! real model: a SIGKILLed stage process fails the request in flight
//! within 5 s with a clear error, the leader re-plans over the survivors,
//! and the next request succeeds with the single-node tokens.
#![allow(clippy::print_stdout)] // Prints the figures it measures.

use std::io::BufRead;
use std::path::Path;
use std::process::Command;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use hearth_models::{GenerateRequest, LocalModel, Precision, SamplingParams};
use hearth_runtime::ClusterView;
use hearth_test_utils::netns::ChildGuard;
use hearth_test_utils::{free_port, hearth_binary, hearth_up, real_model};

fn view(http: u16) -> Result<ClusterView> {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(5)))
        .build()
        .into();
    Ok(agent
        .get(&format!("http://127.0.0.1:{http}/api/cluster"))
        .call()?
        .body_mut()
        .read_json()?)
}

fn wait_stages(http: u16, stages: usize, limit: Duration) -> Result<ClusterView> {
    let start = Instant::now();
    loop {
        if let Ok(v) = view(http)
            && v.placement
                .as_ref()
                .is_some_and(|p| p.stages.len() == stages)
        {
            return Ok(v);
        }
        if start.elapsed() > limit {
            bail!(
                "no {stages}-stage placement on :{http} in {limit:?}: {:?}",
                view(http).ok().map(|v| v.placement)
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn up(home: &Path, name: &str, quic: u16, http: u16, extra: &[String]) -> Result<ChildGuard> {
    let mut flags = vec!["--split".to_string(), "even".into()];
    flags.extend_from_slice(extra);
    hearth_up(home, name, quic, http, &flags)
}

/// Streams `POST /api/generate`, sending each NDJSON event to `tx`.
fn stream_generate(
    http: u16,
    body: serde_json::Value,
    tx: mpsc::Sender<serde_json::Value>,
) -> Result<()> {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(120)))
        .build()
        .into();
    let mut resp = agent
        .post(&format!("http://127.0.0.1:{http}/api/generate"))
        .send_json(&body)?;
    let reader = std::io::BufReader::new(resp.body_mut().as_reader());
    for line in reader.lines() {
        let line = line?;
        if line.is_empty() {
            continue;
        }
        if tx.send(serde_json::from_str(&line)?).is_err() {
            break;
        }
    }
    Ok(())
}

#[test]
fn killed_stage_fails_the_request_fast_and_the_cluster_replans() -> Result<()> {
    let Some(model) = real_model() else {
        println!("skipped: the real model is not in the cache (scripts/test.sh fetches it)");
        return Ok(());
    };
    let dir = tempfile::tempdir()?;
    let homes: Vec<_> = (0..3).map(|i| dir.path().join(format!("n{i}"))).collect();
    let quic: Vec<u16> = (0..3).map(|_| free_port(true)).collect::<Result<_>>()?;
    let http: Vec<u16> = (0..3).map(|_| free_port(false)).collect::<Result<_>>()?;
    let model_arg = ["--model".to_string(), model.display().to_string()];
    let mut procs = vec![Some(up(&homes[0], "n0", quic[0], http[0], &model_arg)?)];
    let start = Instant::now();
    while view(http[0]).is_err() {
        if start.elapsed() > Duration::from_secs(20) {
            bail!("n0 did not start");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let token = String::from_utf8(
        Command::new(hearth_binary()?)
            .arg("token")
            .arg("--home")
            .arg(&homes[0])
            .output()?
            .stdout,
    )?
    .trim()
    .to_string();
    for i in 1..3 {
        let mut extra = model_arg.to_vec();
        extra.extend(["--join".to_string(), token.clone()]);
        extra.extend(["--peer".to_string(), format!("127.0.0.1:{}", quic[0])]);
        procs.push(Some(up(
            &homes[i],
            &format!("n{i}"),
            quic[i],
            http[i],
            &extra,
        )?));
    }
    let v = wait_stages(http[0], 3, Duration::from_secs(120))?;
    let placement = v.placement.context("placement")?;
    println!(
        "3 stages placed {:?} after start: {}",
        start.elapsed(),
        placement
            .stages
            .iter()
            .map(|s| format!("{}:{}..{}", s.name, s.spec.start, s.spec.end))
            .collect::<Vec<_>>()
            .join(" ")
    );
    // Kill the last stage's process unless it is n0 (which takes the request).
    let victim = placement
        .stages
        .iter()
        .rev()
        .find(|s| s.name != "n0")
        .context("a stage not on n0")?
        .name
        .clone();
    let victim_idx: usize = victim[1..].parse()?;

    let local = LocalModel::load(&model, Precision::Quantized)?;
    let prompt = "Write a long story about a lighthouse keeper.";
    let (tx, rx) = mpsc::channel();
    let body = serde_json::json!({
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": 2000,
        "stream": true,
    });
    let h0 = http[0];
    let client = std::thread::spawn(move || stream_generate(h0, body, tx));
    let mut tokens = 0;
    while tokens < 20 {
        let ev = rx
            .recv_timeout(Duration::from_secs(30))
            .context("no token")?;
        if ev.get("token").is_some() {
            tokens += 1;
        } else {
            bail!("the request ended before the kill: {ev}");
        }
    }
    let killed = Instant::now();
    drop(procs[victim_idx].take());
    let failed_after = loop {
        let ev = rx
            .recv_timeout(Duration::from_secs(10))
            .context("the request hung after the kill")?;
        if let Some(e) = ev.get("error") {
            println!("request failed {:?} after the kill: {e}", killed.elapsed());
            break killed.elapsed();
        }
        if ev.get("done").is_some() {
            bail!("the request finished despite the kill: {ev}");
        }
    };
    assert!(failed_after < Duration::from_secs(5), "{failed_after:?}");
    let _ = client.join();

    // Re-planned over the two survivors; the next request succeeds.
    let v = wait_stages(http[0], 2, Duration::from_secs(60))?;
    println!(
        "re-planned to 2 stages {:?} after the kill",
        killed.elapsed()
    );
    assert!(
        v.placement
            .iter()
            .flat_map(|p| &p.stages)
            .all(|s| s.name != victim)
    );
    let ids =
        local.encode_prompt(&local.render_chat(&[hearth_models::Message::new("user", prompt)])?)?;
    let want = local
        .generate(
            &GenerateRequest {
                prompt_ids: ids,
                max_tokens: 16,
                sampling: SamplingParams::default(),
                stop: Vec::new(),
            },
            |_| {},
        )?
        .token_ids;
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(60)))
        .build()
        .into();
    let got: serde_json::Value = agent
        .post(&format!("http://127.0.0.1:{}/api/generate", http[0]))
        .send_json(serde_json::json!({
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": 16,
        }))?
        .body_mut()
        .read_json()?;
    let got: Vec<u32> = serde_json::from_value(got["token_ids"].clone())?;
    assert_eq!(got, want);
    assert_eq!(view(http[0])?.placement.map(|p| p.stages.len()), Some(2));
    Ok(())
}

/// `hearth up --chat-template FILE`: the node renders chats with the given
/// template instead of the model's own (the prompt the API counts is the
/// one `hearth generate --chat-template` builds), and a broken one is
/// refused at start.
#[test]
fn up_renders_chats_with_a_given_template() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let m = hearth_test_utils::tiny_model(
        &dir.path().join("m"),
        hearth_test_utils::TinySpec::default(),
    )?;
    let model = m.gguf_q8_0.display().to_string();
    let tmpl = dir.path().join("t.jinja");
    std::fs::write(&tmpl, "[{{ messages[-1].content | upper }}]")?;
    let t = tmpl.display().to_string();
    // What the CLI builds with the same template.
    let out = Command::new(hearth_binary()?)
        .args([
            "generate",
            "--model",
            &model,
            "--prompt",
            "the cat",
            "--max-tokens",
            "1",
            "--json",
        ])
        .args(["--chat-template", &t])
        .env("HEARTH_HOME", dir.path().join("cli"))
        .output()?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .with_context(|| String::from_utf8_lossy(&out.stderr).into_owned())?;
    let want = v["prompt_token_ids"].as_array().map(Vec::len).unwrap_or(0);
    assert!(want > 0, "{v}");
    let prompt_tokens = |extra: &[String]| -> Result<u64> {
        let (quic, http) = (free_port(true)?, free_port(false)?);
        let mut flags = vec!["--model".to_string(), model.clone()];
        flags.extend_from_slice(extra);
        let home = dir.path().join(format!("n{http}"));
        let _node = up(&home, "n", quic, http, &flags)?;
        wait_stages(http, 1, Duration::from_secs(60))?;
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .timeout_global(Some(Duration::from_secs(60)))
            .build()
            .into();
        let r: serde_json::Value = agent
            .post(&format!("http://127.0.0.1:{http}/v1/chat/completions"))
            .send_json(serde_json::json!({
                "model": "tiny-q8_0", "max_tokens": 1,
                "messages": [{"role": "user", "content": "the cat"}],
            }))?
            .body_mut()
            .read_json()?;
        r["usage"]["prompt_tokens"]
            .as_u64()
            .with_context(|| format!("no usage in {r}"))
    };
    let given = prompt_tokens(&["--chat-template".to_string(), t.clone()])?;
    assert_eq!(given, want as u64);
    assert_ne!(
        prompt_tokens(&[])?,
        given,
        "the model's own template differs"
    );
    // A broken template: `up` exits with a clear error.
    std::fs::write(&tmpl, "{% for %}")?;
    let out = Command::new(hearth_binary()?)
        .args(["up", "--no-mdns", "--model", &model, "--chat-template", &t])
        .args(["--quic", "127.0.0.1:0", "--http", "127.0.0.1:0"])
        .arg("--home")
        .arg(dir.path().join("broken"))
        .output()?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("chat-template") || err.contains("template"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
    Ok(())
}
