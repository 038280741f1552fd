//! `hearth up` as real processes on loopback: three nodes joined by token
//! and static peers form a cluster; `hearth status` shows it; a SIGKILLed
//! node leaves the others' views; SIGTERM shuts a node down cleanly.
#![allow(clippy::print_stdout)] // Prints the figures it measures.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use hearth_runtime::ClusterView;
use hearth_runtime::profile::PlanReport;
use hearth_test_utils::{free_port, hearth_binary, hearth_up};

fn status(http: u16) -> Result<ClusterView> {
    let out = Command::new(hearth_binary()?)
        .args(["status", "--json", "--http", &format!("127.0.0.1:{http}")])
        .output()?;
    if !out.status.success() {
        bail!("status failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(serde_json::from_slice(&out.stdout)?)
}

fn wait_members(http: u16, n: usize, limit: Duration) -> Result<Duration> {
    let start = Instant::now();
    loop {
        if let Ok(v) = status(http)
            && v.members.len() == n
        {
            return Ok(start.elapsed());
        }
        if start.elapsed() > limit {
            bail!(
                "node on :{http} did not see {n} members in {limit:?}: {:?}",
                status(http).ok()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn three_processes_form_a_cluster_with_static_peers() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let homes: Vec<_> = (0..3).map(|i| dir.path().join(format!("n{i}"))).collect();
    let quic: Vec<u16> = (0..3).map(|_| free_port(true)).collect::<Result<_>>()?;
    let http: Vec<u16> = (0..3).map(|_| free_port(false)).collect::<Result<_>>()?;
    let bin = hearth_binary()?;

    // No cluster yet: `hearth token` says what to do.
    let out = Command::new(&bin)
        .arg("token")
        .arg("--home")
        .arg(&homes[0])
        .output()?;
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("hearth up"));

    let started = Instant::now();
    let mut n0 = Some(hearth_up(&homes[0], "n0", quic[0], http[0], &[])?);
    wait_members(http[0], 1, Duration::from_secs(20))?;
    let out = Command::new(&bin)
        .arg("token")
        .arg("--home")
        .arg(&homes[0])
        .output()?;
    let token = String::from_utf8(out.stdout)?.trim().to_string();
    assert!(token.starts_with("hearth1-"), "{token}");
    // The secret file is private.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(homes[0].join("cluster/secret"))?
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    let peers = |skip: usize| -> Vec<String> {
        (0..3)
            .filter(|&j| j != skip)
            .flat_map(|j| ["--peer".to_string(), format!("127.0.0.1:{}", quic[j])])
            .collect()
    };
    let mut rest = Vec::new();
    for i in 1..3 {
        let mut extra = vec!["--join".to_string(), token.clone()];
        extra.extend(peers(i));
        rest.push(hearth_up(
            &homes[i],
            &format!("n{i}"),
            quic[i],
            http[i],
            &extra,
        )?);
    }
    for &h in &http {
        wait_members(h, 3, Duration::from_secs(20))?;
    }
    println!(
        "3 processes formed a cluster {:?} after the first started",
        started.elapsed()
    );

    // Every view agrees on the members and the leader.
    let views: Vec<ClusterView> = http.iter().map(|&h| status(h)).collect::<Result<_>>()?;
    for v in &views {
        assert_eq!(v.leader, views[0].leader);
        assert_eq!(v.cluster_id, views[0].cluster_id);
        let mut names: Vec<_> = v.members.iter().map(|m| m.name.as_str()).collect();
        names.sort();
        assert_eq!(names, ["n0", "n1", "n2"]);
    }
    // The human-readable status lists them too.
    let out = Command::new(&bin)
        .args(["status", "--http", &format!("127.0.0.1:{}", http[1])])
        .output()?;
    let text = String::from_utf8(out.stdout)?;
    assert!(
        text.contains("3 member(s)") && text.contains("n0") && text.contains("alive"),
        "{text}"
    );

    // Each node measured the model (one at a time, then from the cache),
    // the nodes probed their links and swapped profiles: `hearth plan`
    // plans from those measured numbers.
    if hearth_test_utils::real_model().is_some() {
        plan_from_measured_profiles(&bin, &http)?;
    }

    // SIGKILL n2: the others drop it by heartbeat timeout.
    let killed = Instant::now();
    drop(rest.pop());
    for &h in &http[..2] {
        wait_members(h, 2, Duration::from_secs(6))?;
    }
    println!(
        "SIGKILLed node gone from both views after {:?}",
        killed.elapsed()
    );

    // SIGTERM n0: it exits 0 and n1 sees it leave at once.
    let mut g = n0.take().context("n0")?;
    let left = Instant::now();
    let pid = g.0.id().to_string();
    Command::new("kill").args(["-TERM", &pid]).status()?;
    let code = loop {
        if let Some(s) = g.0.try_wait()? {
            break s.code();
        }
        if left.elapsed() > Duration::from_secs(10) {
            bail!("n0 did not exit on SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(code, Some(0));
    let t = wait_members(http[1], 1, Duration::from_secs(5))?;
    println!("graceful exit seen by n1 after {:?}", left.elapsed());
    assert!(t < Duration::from_secs(2), "{t:?}");
    Ok(())
}

fn plan_json(bin: &Path, http: u16, extra: &[&str]) -> Result<PlanReport> {
    let out = Command::new(bin)
        .args(["plan", "--json", "--http", &format!("127.0.0.1:{http}")])
        .args(extra)
        .output()?;
    if !out.status.success() {
        bail!("plan failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(serde_json::from_slice(&out.stdout)?)
}

fn plan_from_measured_profiles(bin: &Path, http: &[u16]) -> Result<()> {
    let start = Instant::now();
    let report = loop {
        // Every node probes both peers and re-fetches profiles every 5 s:
        // wait until node 1 has seen all six measurements.
        let all_links = status(http[1]).is_ok_and(|v| {
            v.profiles
                .is_some_and(|p| p.nodes.len() == 3 && p.nodes.iter().all(|n| n.links.len() == 2))
        });
        match plan_json(bin, http[1], &[]) {
            Ok(r)
                if all_links
                    && r.input.devices.len() == 3
                    && r.input.unmeasured_links.is_empty() =>
            {
                break r;
            }
            other => {
                if start.elapsed() > Duration::from_secs(150) {
                    bail!("no plan over 3 measured devices after 150 s: {other:?}");
                }
            }
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    println!("plan over 3 measured devices after {:?}", start.elapsed());
    // The devices carry the times the nodes measured and published.
    let view = status(http[1])?;
    let profiles = view.profiles.context("no profiles in the view")?;
    assert_eq!(profiles.nodes.len(), 3);
    for (id, dev) in report.input.node_ids.iter().zip(&report.input.devices) {
        let p = profiles
            .nodes
            .iter()
            .find(|p| &p.node_id == id)
            .context("device without a profile")?;
        let times = p.model.as_ref().context("profile without model times")?;
        // The planner used the published decode times scaled by the factor
        // it reports for that device (current figures: offer or live);
        // prefill and training have factors of their own, never nonsense.
        let fig = report
            .input
            .figures
            .iter()
            .find(|f| &f.node_id == id)
            .context("device without figures")?;
        let scaled = times.scaled(fig.factor);
        let eq = |x: f64, y: f64| (x - y).abs() <= 1e-12 * x.abs().max(y.abs());
        for (used, want) in [(dev.layer, scaled.layer), (dev.head, scaled.head)] {
            assert!(eq(used.decode_s, want.decode_s), "{used:?} vs {want:?}");
            for t in [
                used.prefill_s_per_token,
                used.train_forward_s_per_token,
                used.train_s_per_token,
            ] {
                assert!(t > 0.0 && t.is_finite(), "{used:?}");
            }
        }
        assert!(fig.factor > 0.0 && fig.factor.is_finite());
        assert!(times.layer.decode_s > 0.0);
        assert!(dev.memory_budget > 0);
        // Links were measured over QUIC to both other nodes.
        assert_eq!(p.links.len(), 2, "{:?}", p.links);
        for l in &p.links {
            assert!(l.bandwidth_bytes_per_s > 1e6 && l.rtt_ms >= 0.0, "{l:?}");
        }
    }
    let plan = report.plan.context("no plan")?;
    assert!(plan.step_s > 0.0 && plan.tokens_per_s > 0.0);
    assert_eq!(plan.stages.first().map(|s| s.layers.start), Some(0));
    assert_eq!(plan.stages.last().map(|s| s.layers.end), Some(30));
    assert_eq!(report.alternatives.len(), 4);
    // Every alternative is at best as fast as the plan.
    for a in &report.alternatives {
        if let Some(p) = &a.plan {
            assert!(p.step_s >= plan.step_s * (1.0 - 1e-9), "{}: {p:?}", a.name);
        }
    }
    // Training and throughput plans too, and the human-readable form.
    let train = plan_json(
        bin,
        http[0],
        &["--workload", "training", "--micro-batches", "6"],
    )?;
    assert!(train.plan.is_some(), "{:?}", train.error);
    let out = Command::new(bin)
        .args(["plan", "--http", &format!("127.0.0.1:{}", http[2])])
        .args(["--sequences", "8"])
        .output()?;
    let text = String::from_utf8(out.stdout)?;
    println!("{text}");
    assert!(
        text.contains("predicted") && text.contains("even split") && text.contains("why:"),
        "{text}"
    );
    Ok(())
}

/// A member that sends a `hearth up` process orders past every bound (a
/// LoRA rank of 2^28, a checkpoint of u64::MAX bytes or of 1 GiB for a
/// tiny stage, a takeover placement): each is answered `Failed` with its
/// reason, and the process is still alive and serving afterwards. (As a
/// process, so an allocation failure, which aborts, would show.)
#[test]
fn a_node_process_refuses_hostile_orders_and_keeps_serving() -> Result<()> {
    use hearth_net::framed::read_message;
    use hearth_net::{ClusterSecret, Endpoint, EndpointConfig, Identity};
    use hearth_proto::{Message, encode_frame, limits, stream_kind};

    let dir = tempfile::tempdir()?;
    let tiny = hearth_test_utils::tiny_model(dir.path(), hearth_test_utils::TinySpec::default())?;
    let home = dir.path().join("victim");
    let (quic, http) = (free_port(true)?, free_port(false)?);
    let model = tiny.gguf_q8_0.to_string_lossy().into_owned();
    let mut node = hearth_up(&home, "victim", quic, http, &["--model".into(), model])?;
    let base = format!("http://127.0.0.1:{http}");
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(5)))
        .http_status_as_error(false)
        .build()
        .into();
    let start = Instant::now();
    while agent
        .get(&format!("{base}/ready"))
        .call()
        .map_or(true, |r| r.status() != 200)
    {
        anyhow::ensure!(start.elapsed() < Duration::from_secs(90), "never ready");
        std::thread::sleep(Duration::from_millis(200));
    }
    let view: serde_json::Value = agent
        .get(&format!("{base}/api/cluster"))
        .call()?
        .body_mut()
        .read_json()?;
    let content = view["profiles"]["nodes"][0]["model"]["content"]
        .as_str()
        .context("the node's content id")?
        .to_string();
    let layers = view["placement"]["stages"][0]["spec"]["end"]
        .as_u64()
        .context("layers")?;
    let token = Command::new(hearth_binary()?)
        .args(["token", "--home"])
        .arg(&home)
        .output()?;
    let secret: ClusterSecret = String::from_utf8(token.stdout)?.trim().parse()?;

    let order = |rank: u64, restore_len: u64| -> Result<Vec<u8>> {
        let doc = serde_json::json!({"format": 1, "type": "train_stage", "order": {
            "job": 5, "stage": 0, "stages": 1,
            "spec": {"start": 0, "end": layers, "embed": true, "head": true},
            "content": content,
            "method": {"type": "lora", "rank": rank, "alpha": 16.0, "targets": ["q", "v"]},
            "schedule": "gpipe", "micro_batches": 2, "prev": null, "next": null, "tied": null,
            "seed": 1, "optim": {"beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 0.0},
            "timeout_s": 30, "restore_len": restore_len, "max_len": 64,
        }});
        Ok(encode_frame(&Message::Control(serde_json::to_vec(&doc)?))?)
    };
    let mut takeover = view["placement"].clone();
    takeover["id"] = serde_json::json!(u64::MAX);
    let activate = encode_frame(&Message::Control(serde_json::to_vec(
        &serde_json::json!({"format": 1, "type": "activate", "placement": takeover}),
    )?))?;
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (order(1 << 28, 0)?, "rank"),
        (order(4, u64::MAX)?, "checkpoint of"),
        (order(4, 1 << 30)?, "state takes at most"),
        (activate, "only the leader"),
    ];
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async {
        let mut identity = Identity::generate()?;
        let me = view["node_id"].as_str().unwrap_or("").to_string();
        // Above the node's id: not the leader of a two-member view.
        while identity.id().to_string() <= me {
            identity = Identity::generate()?;
        }
        let (rogue, _rx) = Endpoint::bind(
            EndpointConfig {
                identity,
                secret,
                name: "rogue".into(),
                bind: "127.0.0.1:0".parse()?,
            },
            &[],
        )?;
        let conn = rogue.connect(format!("127.0.0.1:{quic}").parse()?).await?;
        for (payload, why) in &cases {
            let (mut s, mut r) = conn.open(stream_kind::CONTROL).await?;
            s.write_all(payload).await?;
            let _ = s.finish();
            let got = tokio::time::timeout(
                Duration::from_secs(30),
                read_message(&mut r, limits::MAX_CONTROL_FRAME),
            )
            .await??;
            let Some(Message::Control(doc)) = got else {
                bail!("expected a control reply to the {why:?} case, got {got:?}");
            };
            let v: serde_json::Value = serde_json::from_slice(&doc)?;
            assert_eq!(v["type"], "failed", "{v}");
            assert!(
                v["reason"].as_str().unwrap_or("").contains(why),
                "{why}: {v}"
            );
        }
        rogue.shutdown().await;
        Ok::<_, anyhow::Error>(())
    })?;
    // Still alive, still serving, on the same placement.
    assert!(node.0.try_wait()?.is_none(), "the node process died");
    let r = agent
        .post(&format!("{base}/v1/completions"))
        .send_json(serde_json::json!({
            "model": view["placement"]["model"], "prompt": "the fox", "max_tokens": 3,
        }))?;
    assert_eq!(r.status(), 200);
    let after: serde_json::Value = agent
        .get(&format!("{base}/api/cluster"))
        .call()?
        .body_mut()
        .read_json()?;
    assert_eq!(after["placement"]["id"], view["placement"]["id"]);
    Ok(())
}
