//! A heterogeneous home on one machine (issue #18): `hearth up` processes
//! each under its own CPU quota (cgroups, as root), planning by measured
//! figures. Asserts behaviour, never wall-clock figures:
//! - the device with less CPU gets fewer layers than the faster one (with
//!   none, it serves the whole model as a replica beside the pipeline);
//! - after the quotas swap mid-run, with requests flowing, the leader
//!   re-places the model onto the now-faster device, says why, and no
//!   request fails;
//! - a LoRA job whose devices swap quotas mid-job re-plans between steps,
//!   finishes on the new split, and ends at an uninterrupted run's weights;
//! - devices in network namespaces over `tc`-shaped links measure the
//!   shaped rate, are placed, and serve from their own namespace;
//! - busy programs inside one device's own quota (which its offer cannot
//!   see) slow its training stage; the job sees it in the stage's busy
//!   time and moves layers off it.
#![allow(clippy::print_stdout)] // Prints what it observes.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Result;
use hearth_test_utils::home::{Home, HomeSpec, LinkShape};
use hearth_test_utils::{TinySpec, cgroup, tiny_model};

fn model(dir: &std::path::Path) -> Result<std::path::PathBuf> {
    let tiny = tiny_model(
        dir,
        TinySpec {
            hidden: 256,
            intermediate: 768,
            layers: 8,
            heads: 4,
            kv_heads: 2,
            context: 512,
            ..TinySpec::default()
        },
    )?;
    Ok(tiny.gguf_q8_0)
}

/// One home at a time: each test sizes its devices' CPU on purpose, and a
/// second home's processes on the same two cores would be load none of
/// them planned for (a device measured under it measures again when it
/// ends, which is right but not what a test of busy time looks at).
fn one_home_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

fn whole(p: &hearth_runtime::pipeline::Placement) -> bool {
    p.stages.last().is_some_and(|s| s.spec.end == 8)
}

#[test]
fn the_slower_device_gets_fewer_layers() -> Result<()> {
    let _one = one_home_at_a_time();
    if !cgroup::available("the_slower_device_gets_fewer_layers") {
        return Ok(());
    }
    let dir = tempfile::tempdir()?;
    let home = Home::start(&model(dir.path())?, &HomeSpec::default())?;
    let p = home.wait_placement(0, Duration::from_secs(90), |p| {
        whole(p) && p.figures.len() == 2
    })?;
    let (a, b) = (Home::layers(&p, "a"), Home::layers(&p, "b"));
    println!(
        "placement: a {a} layers, b {b} layers; figures {:?}",
        p.figures
    );
    assert!(a > b, "a (1 core) got {a} layers, b (0.25 core) {b}");
    // A device left out of the pipeline still serves: the whole model as
    // a replica, predicted slower than the pipeline.
    if b == 0 {
        let r = p.replicas.iter().find(|r| r.name == "b");
        assert!(
            r.and_then(|r| r.predicted_tokens_per_s) < p.predicted_tokens_per_s,
            "b is no slower replica: {:?} beside {:?}",
            p.replicas,
            p.predicted_tokens_per_s
        );
        assert!(r.is_some());
    }
    // The profiles show what each machine offers: b's quota is 0.25 core.
    let view = home.view(0)?;
    let profiles = view.profiles.unwrap_or_default();
    let quota = |name: &str| {
        profiles
            .nodes
            .iter()
            .find(|n| n.name == name)
            .and_then(|n| n.offer)
            .and_then(|o| o.quota_cores)
    };
    assert_eq!(quota("a"), Some(1.0));
    assert_eq!(quota("b"), Some(0.25));
    // And the figures the plan used say b is the slower one.
    let fig = |name: &str| {
        p.figures
            .iter()
            .find(|f| f.name == name)
            .map(|f| f.layer_decode_s)
    };
    let (fa, fb) = (fig("a").unwrap_or(0.0), fig("b").unwrap_or(0.0));
    assert!(
        fb > fa * 1.5,
        "b's layer time {fb} is not well above a's {fa}"
    );
    Ok(())
}

#[test]
fn a_quota_swap_replaces_the_model_and_fails_no_request() -> Result<()> {
    let _one = one_home_at_a_time();
    if !cgroup::available("a_quota_swap_replaces_the_model_and_fails_no_request") {
        return Ok(());
    }
    let dir = tempfile::tempdir()?;
    let home = Arc::new(Home::start(&model(dir.path())?, &HomeSpec::default())?);
    let before = home.wait_placement(0, Duration::from_secs(90), |p| {
        whole(p) && Home::layers(p, "a") > Home::layers(p, "b")
    })?;
    println!("before: {:?}", before.stages);
    let name = before.model.clone();
    // Requests flow through b's API for the whole swap (bounded: at most
    // 5000 requests or until told to stop).
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let client = {
        let (home, stop, ok, failed) = (home.clone(), stop.clone(), ok.clone(), failed.clone());
        std::thread::spawn(move || {
            let mut errors = Vec::new();
            for i in 0..5000 {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                match home.complete(1, &name, &format!("hello {i}"), 12) {
                    Ok(n) if n > 0 => ok.fetch_add(1, Ordering::Relaxed),
                    Ok(_) => {
                        errors.push("no tokens".to_string());
                        failed.fetch_add(1, Ordering::Relaxed)
                    }
                    Err(e) => {
                        errors.push(format!("{e:#}"));
                        failed.fetch_add(1, Ordering::Relaxed)
                    }
                };
            }
            errors
        })
    };
    std::thread::sleep(Duration::from_secs(3));
    let served_before = ok.load(Ordering::Relaxed);
    home.set_cores(0, 0.25)?;
    home.set_cores(1, 1.0)?;
    let swapped = Instant::now();
    let after = home.wait_placement(0, Duration::from_secs(60), |p| {
        whole(p) && Home::layers(p, "b") > Home::layers(p, "a")
    });
    let secs = swapped.elapsed().as_secs_f64();
    // Keep the traffic going over the new placement for a while.
    std::thread::sleep(Duration::from_secs(3));
    stop.store(true, Ordering::Relaxed);
    let errors = client
        .join()
        .map_err(|_| anyhow::anyhow!("client panicked"))?;
    let after = after?;
    let (ok, failed) = (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    println!(
        "re-placed {secs:.1} s after the swap: {:?}; reason: {:?}; requests ok {ok} \
         (before the swap {served_before}), failed {failed}",
        after.stages, after.reason
    );
    assert!(failed == 0, "{failed} requests failed: {errors:?}");
    assert!(ok > served_before, "no request was served after the swap");
    // b was measured under 0.25 core: the plan that moves the model to it
    // used figures b measured again under its new core, not the old ones
    // scaled up (which overstate a device measured in short bursts).
    let b = after
        .figures
        .iter()
        .find(|f| f.name == "b")
        .ok_or_else(|| anyhow::anyhow!("the placement has no figures for b"))?;
    assert!(
        !(b.source == hearth_runtime::profile::FigureSource::Offer && b.factor < 1.0 / 1.2),
        "b's figures were scaled up from 0.25 core, not measured again: {b:?}"
    );
    let reason = after.reason.unwrap_or_default();
    assert!(
        reason.contains("cores available") && reason.contains("tok/s"),
        "the re-placement does not say why: {reason:?}"
    );
    Ok(())
}

#[test]
fn a_quota_swap_mid_job_re_plans_training_and_ends_at_the_uninterrupted_weights() -> Result<()> {
    let _one = one_home_at_a_time();
    if !cgroup::available(
        "a_quota_swap_mid_job_re_plans_training_and_ends_at_the_uninterrupted_weights",
    ) {
        return Ok(());
    }
    let dir = tempfile::tempdir()?;
    let home = Home::start(&model(dir.path())?, &HomeSpec::default())?;
    home.wait_placement(0, Duration::from_secs(90), |p| {
        whole(p) && Home::layers(p, "a") > Home::layers(p, "b")
    })?;
    let mut data = String::new();
    for i in 0..8 {
        data += &format!(
            "{{\"messages\":[{{\"role\":\"user\",\"content\":\"what is {i}\"}},{{\"role\":\"assistant\",\"content\":\"it is {i}{i}, of course\"}}]}}\n"
        );
        data += &format!("{{\"text\":\"a fox {i} jumps over {i} lazy dogs by the river\"}}\n");
    }
    let extras = serde_json::json!({
        "steps": 30, "batch_size": 4, "micro_batches": 2, "seq_len": 128,
        "learning_rate": 1e-2, "checkpoint_every": 0, "merge": false, "seed": 11,
        "method": {"type": "lora", "rank": 4, "alpha": 8.0, "dropout": 0.1},
    });
    // The uninterrupted run, on the split planned for a = 1, b = 0.25 core.
    let started = Instant::now();
    let reference = home.start_job(0, &data, extras.clone())?;
    let reference = home.wait_job(0, &reference, Duration::from_secs(600))?;
    assert_eq!(reference["status"], "succeeded", "{reference}");
    println!(
        "uninterrupted: {:.1} s on {}",
        started.elapsed().as_secs_f64(),
        reference["hearth"]["stages"]
    );
    // The same job; the quotas swap after a few steps.
    let id = home.start_job(0, &data, extras)?;
    home.wait_step(0, &id, 3, Duration::from_secs(300))?;
    home.set_cores(0, 0.25)?;
    home.set_cores(1, 1.0)?;
    let swapped_at = home.job(0, &id)?["hearth"]["step"].as_u64().unwrap_or(0);
    let done = home.wait_job(0, &id, Duration::from_secs(900))?;
    let log = home.job_messages(0, &id)?;
    assert_eq!(done["status"], "succeeded", "{done} {log:#?}");
    let moved: Vec<&String> = log
        .iter()
        .filter(|m| m.contains("Re-planning between steps"))
        .collect();
    println!(
        "swapped at step {swapped_at}; moves: {moved:#?}; final stages {}",
        done["hearth"]["stages"]
    );
    assert!(!moved.is_empty(), "no re-plan after the swap: {log:#?}");
    // After the move b (1 core now) holds more layers than a.
    assert!(
        Home::job_layers(&done, "b") > Home::job_layers(&done, "a"),
        "{}",
        done["hearth"]["stages"]
    );
    // No step lost or applied twice: the uninterrupted run's weights.
    let (want, got) = (Home::job_adapter(&reference)?, Home::job_adapter(&done)?);
    assert_eq!(want.len(), got.len());
    for ((n, w), (m, g)) in want.iter().zip(&got) {
        assert_eq!(n, m);
        let scale = w.iter().fold(0f32, |a, x| a.max(x.abs()));
        let diff = w.iter().zip(g).fold(0f32, |a, (x, y)| a.max((x - y).abs()));
        assert!(diff <= 1e-4 + 1e-4 * scale, "{n}: {diff} (scale {scale})");
    }
    Ok(())
}

#[test]
fn a_home_on_shaped_links_measures_them_places_and_serves() -> Result<()> {
    let _one = one_home_at_a_time();
    let test = "a_home_on_shaped_links_measures_them_places_and_serves";
    if !cgroup::available(test) || !hearth_test_utils::netns::available(test) {
        return Ok(());
    }
    let dir = tempfile::tempdir()?;
    // Each device in its own namespace, its traffic out limited to 20 Mbit/s
    // (`tc tbf`: this kernel has no `netem` for delays).
    let rate_mbit = 20.0;
    let home = Home::start(
        &model(dir.path())?,
        &HomeSpec {
            link: Some(LinkShape {
                rate_mbit,
                delay_ms: 0.0,
            }),
            ..HomeSpec::default()
        },
    )?;
    let p = home.wait_placement(0, Duration::from_secs(90), |p| {
        whole(p) && p.figures.len() == 2
    })?;
    println!("placement over shaped links: {:?}", p.stages);
    // The links the nodes measured over QUIC (a 2 MiB probe) show the
    // shaping: no faster than the limit (with room for the bucket's burst).
    let start = Instant::now();
    let rates = loop {
        let profiles = home.view(0)?.profiles.unwrap_or_default();
        let rates: Vec<f64> = profiles
            .nodes
            .iter()
            .flat_map(|n| n.links.iter().map(|l| l.bandwidth_bytes_per_s * 8.0 / 1e6))
            .filter(|r| *r > 0.0)
            .collect();
        if rates.len() >= 2 {
            break rates;
        }
        anyhow::ensure!(
            start.elapsed() < Duration::from_secs(90),
            "no links measured: {profiles:?}"
        );
        std::thread::sleep(Duration::from_millis(500));
    };
    println!("measured link rates: {rates:?} Mbit/s (limit {rate_mbit})");
    assert!(
        rates.iter().all(|r| *r <= rate_mbit * 1.5),
        "the {rate_mbit} Mbit/s limit is not seen: {rates:?}"
    );
    // Both devices serve requests from their own namespace.
    for i in 0..2 {
        let n = home.complete(i, &p.model, "hello over the LAN", 8)?;
        assert!(n > 0, "device {i} generated nothing");
    }
    Ok(())
}

#[test]
fn a_program_competing_inside_a_devices_quota_moves_the_job_by_its_busy_times() -> Result<()> {
    let _one = one_home_at_a_time();
    let test = "a_program_competing_inside_a_devices_quota_moves_the_job_by_its_busy_times";
    if !cgroup::available(test) {
        return Ok(());
    }
    let dir = tempfile::tempdir()?;
    // Two devices of one core each.
    let home = Home::start(
        &model(dir.path())?,
        &HomeSpec {
            cores: vec![1.0, 1.0],
            ..HomeSpec::default()
        },
    )?;
    home.wait_placement(0, Duration::from_secs(90), |p| {
        whole(p) && p.figures.len() == 2
    })?;
    let mut data = String::new();
    for i in 0..8 {
        data += &format!("{{\"text\":\"a fox {i} jumps over {i} lazy dogs by the river\"}}\n");
    }
    let extras = serde_json::json!({
        "steps": 80, "batch_size": 4, "micro_batches": 2, "seq_len": 128,
        "learning_rate": 1e-2, "checkpoint_every": 0, "merge": false,
        "method": {"type": "lora", "rank": 4, "alpha": 8.0},
    });
    let id = home.start_job(0, &data, extras)?;
    // Three steps at the unloaded pace: the baseline the busy times are
    // compared with.
    let job = home.wait_step(0, &id, 3, Duration::from_secs(300))?;
    let layers = Home::job_layers;
    // The device with the most layers gets busy programs inside its own
    // quota: its offer still says one core, while its stage gets about two
    // tenths of it (two compute threads against eight busy ones).
    let busy = if layers(&job, "a") >= layers(&job, "b") {
        0
    } else {
        1
    };
    let name = home.devices[busy].name.clone();
    let before = layers(&job, &name);
    let spin: Vec<_> = (0..8)
        .map(|_| home.devices[busy].group.spin())
        .collect::<Result<_>>()?;
    let done = home.wait_job(0, &id, Duration::from_secs(600))?;
    drop(spin);
    let log = home.job_messages(0, &id)?;
    assert_eq!(done["status"], "succeeded", "{done} {log:#?}");
    let moved: Vec<&String> = log
        .iter()
        .filter(|m| m.contains("Re-planning between steps"))
        .collect();
    println!(
        "{name} busy from step 3 ({before} layers); moves: {moved:#?}; final stages {}",
        done["hearth"]["stages"]
    );
    assert!(
        moved.iter().any(|m| m.contains("busy time")),
        "no move for the measured slowdown: {log:#?}"
    );
    assert!(
        layers(&done, &name) < before,
        "{name} kept {} of {before} layers",
        layers(&done, &name)
    );
    Ok(())
}
