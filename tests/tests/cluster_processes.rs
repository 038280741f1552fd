//! `hearth up` as real processes on loopback: three nodes joined by token
//! and static peers form a cluster; `hearth status` shows it; a SIGKILLed
//! node leaves the others' views; SIGTERM shuts a node down cleanly.
#![allow(clippy::print_stdout)] // Prints the figures it measures.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use hearth_runtime::ClusterView;
use hearth_test_utils::netns::ChildGuard;
use hearth_test_utils::{free_port, hearth_binary};

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

fn up(home: &Path, name: &str, quic: u16, http: u16, extra: &[String]) -> Result<ChildGuard> {
    let mut c = Command::new(hearth_binary()?);
    c.args(["up", "--no-mdns", "--name", name])
        .arg("--home")
        .arg(home)
        .args(["--quic", &format!("127.0.0.1:{quic}")])
        .args(["--http", &format!("127.0.0.1:{http}")])
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    ChildGuard::spawn(c)
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
    let mut n0 = Some(up(&homes[0], "n0", quic[0], http[0], &[])?);
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
        rest.push(up(&homes[i], &format!("n{i}"), quic[i], http[i], &extra)?);
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
