//! Several "hosts" on one machine: network namespaces whose `eth0` ends
//! are joined by a Linux bridge, as devices on one home LAN. Needs root;
//! everything made here is removed on drop, also when a test panics.

use std::net::Ipv4Addr;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::{Context, Result, bail};

/// Whether a namespace test can run. When it cannot, prints why and
/// returns false (the test then skips), unless `HEARTH_REQUIRE_NETNS` is
/// set (the test script sets it when running as root, as CI does): then a
/// missing prerequisite fails the test instead of skipping it.
pub fn available(test: &str) -> bool {
    match unavailable() {
        None => true,
        Some(why) if std::env::var_os("HEARTH_REQUIRE_NETNS").is_some() => {
            panic!("{test}: HEARTH_REQUIRE_NETNS is set but {why}")
        }
        Some(why) => {
            eprintln!("SKIPPED {test}: {why}");
            false
        }
    }
}

/// Why namespace tests cannot run here, if they cannot.
pub fn unavailable() -> Option<String> {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc_geteuid() } == 0;
    if !root {
        return Some("network-namespace tests need root".into());
    }
    match Command::new("ip").arg("-V").output() {
        Ok(o) if o.status.success() => None,
        _ => Some("`ip` (iproute2) is not installed".into()),
    }
}

unsafe extern "C" {
    #[link_name = "geteuid"]
    fn libc_geteuid() -> u32;
}

fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .with_context(|| format!("running ip {}", args.join(" ")))?;
    if !out.status.success() {
        bail!(
            "ip {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// A bridge and `hosts` namespaces on it, `10.77.<n>.<i+1>/24` each (`n`
/// differs between the LANs of one process, so several can coexist).
pub struct Lan {
    tag: String,
    subnet: u8,
    bridge: String,
    namespaces: Vec<String>,
    veths: Vec<String>,
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

impl Lan {
    /// Builds the LAN. Names carry the process id, so parallel tests and
    /// leftovers of a crashed run do not collide.
    pub fn new(hosts: usize) -> Result<Self> {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let tag = format!("{}{}", std::process::id() % 100_000, n);
        let mut lan = Self {
            bridge: format!("hbr{tag}"),
            tag,
            subnet: (n % 250) as u8,
            namespaces: Vec::new(),
            veths: Vec::new(),
        };
        let _ = ip(&["link", "del", &lan.bridge]);
        ip(&["link", "add", &lan.bridge, "type", "bridge"])?;
        // Flood multicast to every port, as a home switch without IGMP
        // snooping does.
        let _ = ip(&[
            "link",
            "set",
            "dev",
            &lan.bridge,
            "type",
            "bridge",
            "mcast_snooping",
            "0",
        ]);
        ip(&["link", "set", &lan.bridge, "up"])?;
        for i in 0..hosts {
            lan.add_host(i)?;
        }
        Ok(lan)
    }

    fn add_host(&mut self, i: usize) -> Result<()> {
        let ns = format!("hearth-{}-{i}", self.tag);
        let veth = format!("hv{}x{i}", self.tag);
        let _ = ip(&["netns", "del", &ns]);
        ip(&["netns", "add", &ns])?;
        self.namespaces.push(ns.clone());
        ip(&[
            "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", &ns,
        ])?;
        self.veths.push(veth.clone());
        ip(&["link", "set", &veth, "master", &self.bridge])?;
        ip(&["link", "set", &veth, "up"])?;
        let addr = format!("{}/24", self.ip(i));
        ip(&["-n", &ns, "addr", "add", &addr, "dev", "eth0"])?;
        ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
        ip(&["-n", &ns, "link", "set", "lo", "up"])?;
        ip(&["-n", &ns, "route", "add", "default", "dev", "eth0"])?;
        Ok(())
    }

    /// Adds one more host (index = current count).
    pub fn add(&mut self) -> Result<usize> {
        let i = self.namespaces.len();
        self.add_host(i)?;
        Ok(i)
    }

    /// Host `i`'s address.
    pub fn ip(&self, i: usize) -> Ipv4Addr {
        Ipv4Addr::new(10, 77, self.subnet, (i + 1) as u8)
    }

    /// Gives this machine's own namespace the address `.254` on the
    /// bridge, so a test reaches the hosts directly (their HTTP APIs).
    pub fn reach_from_host(&self) -> Result<Ipv4Addr> {
        let me = Ipv4Addr::new(10, 77, self.subnet, 254);
        // Removed with the bridge.
        ip(&["addr", "add", &format!("{me}/24"), "dev", &self.bridge])?;
        Ok(me)
    }

    /// Shapes host `i`'s outgoing traffic: at most `rate_mbit` Mbit/s
    /// (`tc tbf`), and with `delay_ms` > 0 each packet delayed by that
    /// much (`tc netem`, which needs the kernel's `sch_netem`; a round trip
    /// between two shaped hosts then takes twice the delay).
    pub fn shape(&self, i: usize, rate_mbit: f64, delay_ms: f64) -> Result<()> {
        let rate = format!("{rate_mbit}mbit");
        let mut tc = Command::new("ip");
        tc.args([
            "netns",
            "exec",
            self.ns(i),
            "tc",
            "qdisc",
            "replace",
            "dev",
            "eth0",
        ]);
        if delay_ms > 0.0 {
            tc.args(["root", "netem", "delay", &format!("{delay_ms}ms")])
                .args(["rate", &rate, "limit", "10000"]);
        } else {
            tc.args([
                "root", "tbf", "rate", &rate, "burst", "32kbit", "latency", "400ms",
            ]);
        }
        let out = tc.output().context("running tc")?;
        if !out.status.success() {
            bail!(
                "tc on host {i} failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(())
    }

    /// Host `i`'s namespace name.
    pub fn ns(&self, i: usize) -> &str {
        &self.namespaces[i]
    }

    /// A command that runs `program` inside host `i`.
    pub fn command(&self, i: usize, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", self.ns(i), program]);
        c
    }
}

impl Drop for Lan {
    fn drop(&mut self) {
        for ns in &self.namespaces {
            let _ = ip(&["netns", "del", ns]);
        }
        for v in &self.veths {
            let _ = ip(&["link", "del", v]);
        }
        let _ = ip(&["link", "del", &self.bridge]);
    }
}

/// A child process killed (SIGKILL) and reaped on drop.
pub struct ChildGuard(pub Child);

impl ChildGuard {
    pub fn spawn(mut cmd: Command) -> Result<Self> {
        cmd.stdin(Stdio::null());
        Ok(Self(cmd.spawn().context("spawning child")?))
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
