//! mDNS across hosts: three network namespaces on one bridge (a home LAN on
//! one machine), one `hearth up` each, mDNS only (no --peer). All three
//! must list each other; the time to a full view is printed. A fourth node
//! with another token on the same bridge, told the others' addresses too,
//! never becomes a member. Needs root (CI runs as root); skipped with the
//! reason otherwise.
#![allow(clippy::print_stdout)] // Prints the figures it measures.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use hearth_net::ClusterSecret;
use hearth_runtime::ClusterView;
use hearth_test_utils::hearth_binary;
use hearth_test_utils::netns::{ChildGuard, Lan, available};

const QUIC: &str = "0.0.0.0:7410";
const HTTP: &str = "127.0.0.1:7411";

fn status(lan: &Lan, i: usize) -> Result<ClusterView> {
    let bin = hearth_binary()?;
    let out = lan
        .command(i, bin.to_str().unwrap_or("hearth"))
        .args(["status", "--json", "--http", HTTP])
        .output()?;
    if !out.status.success() {
        bail!(
            "status in host {i}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(serde_json::from_slice(&out.stdout)?)
}

fn up(
    lan: &Lan,
    i: usize,
    home: &std::path::Path,
    token: &str,
    extra: &[String],
) -> Result<ChildGuard> {
    let bin = hearth_binary()?;
    let mut c = lan.command(i, bin.to_str().unwrap_or("hearth"));
    c.args([
        "up",
        "--name",
        &format!("host{i}"),
        "--quic",
        QUIC,
        "--http",
        HTTP,
        "--join",
        token,
    ])
    .arg("--home")
    .arg(home)
    .args(extra)
    .env("HEARTH_LOG", "hearth=info")
    .stdout(Stdio::null())
    .stderr(Stdio::piped());
    ChildGuard::spawn(c)
}

#[test]
fn mdns_forms_a_cluster_across_namespaces_and_keeps_strangers_out() -> Result<()> {
    if !available("mdns_forms_a_cluster_across_namespaces") {
        return Ok(());
    }
    // Build the binary (if stale) before any clock starts.
    hearth_binary()?;
    let mut lan = Lan::new(3)?;
    let dir = tempfile::tempdir()?;
    let token = ClusterSecret::generate().token();
    let started = Instant::now();
    let _nodes: Vec<ChildGuard> = (0..3)
        .map(|i| up(&lan, i, &dir.path().join(format!("h{i}")), &token, &[]))
        .collect::<Result<_>>()?;
    let full = loop {
        let views: Vec<_> = (0..3).map(|i| status(&lan, i)).collect();
        if views
            .iter()
            .all(|v| v.as_ref().is_ok_and(|v| v.members.len() == 3))
        {
            break started.elapsed();
        }
        if started.elapsed() > Duration::from_secs(30) {
            bail!("no full view over mDNS in 30 s: {views:#?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    println!("mDNS: 3 hosts in full view {full:?} after start (processes included)");
    for i in 0..3 {
        let v = status(&lan, i)?;
        let mut addrs: Vec<String> = v.members[1..].iter().map(|m| m.address.clone()).collect();
        addrs.sort();
        let want: Vec<String> = (0..3)
            .filter(|&j| j != i)
            .map(|j| format!("{}:7410", lan.ip(j)))
            .collect();
        assert_eq!(addrs, want, "host {i} sees members at their LAN addresses");
    }

    // A stranger: same LAN, another token, and it knows everyone's address.
    let x = lan.add()?;
    let peers: Vec<String> = (0..3)
        .flat_map(|j| ["--peer".to_string(), format!("{}:7410", lan.ip(j))])
        .collect();
    let mut stranger = up(
        &lan,
        x,
        &dir.path().join("x"),
        &ClusterSecret::generate().token(),
        &peers,
    )?;
    let wait = Instant::now();
    while status(&lan, x).is_err() && wait.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_secs(4));
    for i in 0..3 {
        let v = status(&lan, i)?;
        assert_eq!(v.members.len(), 3, "host {i}: {v:#?}");
        assert!(v.members.iter().all(|m| m.name != format!("host{x}")));
    }
    let vx = status(&lan, x)?;
    assert_eq!(vx.members.len(), 1, "the stranger joined: {vx:#?}");
    // Its dials were refused by authentication.
    let _ = stranger.0.kill();
    let _ = stranger.0.wait();
    let mut out = String::new();
    if let Some(e) = stranger.0.stderr.as_mut() {
        std::io::Read::read_to_string(e, &mut out)?;
    }
    assert!(
        out.contains("refused") || out.contains("authentication"),
        "stranger log: {out}"
    );
    Ok(())
}

#[test]
fn namespace_helpers_clean_up() -> Result<()> {
    if !available("namespace_helpers_clean_up") {
        return Ok(());
    }
    let names: Vec<String> = {
        let lan = Lan::new(2)?;
        for i in 0..2 {
            let out = Command::new("ip")
                .args(["-n", lan.ns(i), "-4", "addr", "show", "eth0"])
                .output()?;
            let text = String::from_utf8_lossy(&out.stdout);
            assert!(
                text.contains(&lan.ip(i).to_string()) && text.contains("UP"),
                "{text}"
            );
        }
        (0..2).map(|i| lan.ns(i).to_string()).collect()
    };
    let list = Command::new("ip").args(["netns", "list"]).output()?;
    let list = String::from_utf8_lossy(&list.stdout);
    for n in names {
        assert!(!list.contains(&n), "{n} left behind");
    }
    Ok(())
}
