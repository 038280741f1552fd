//! Devices of other speeds on one machine: each node process runs in its
//! own CPU cgroup with a quota (cgroup v1 `cpu.cfs_quota_us`, or v2
//! `cpu.max`), which a test can change mid-run, and a competing CPU-bound
//! process can be started inside a group ("the laptop got busy"). Needs
//! root; each group is removed on drop (its processes moved out first).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::{Context, Result, bail};

use crate::netns::ChildGuard;

/// The quota period used (100 ms, the kernel's default).
const PERIOD_US: u64 = 100_000;

/// Whether a cgroup test can run. When it cannot, prints why and returns
/// false (the test then skips), unless `HEARTH_REQUIRE_CGROUPS` is set
/// (the test script sets it as root, as in CI): then it fails instead.
pub fn available(test: &str) -> bool {
    match unavailable() {
        None => true,
        Some(why) if std::env::var_os("HEARTH_REQUIRE_CGROUPS").is_some() => {
            panic!("{test}: HEARTH_REQUIRE_CGROUPS is set but {why}")
        }
        Some(why) => {
            eprintln!("SKIPPED {test}: {why}");
            false
        }
    }
}

/// Why CPU cgroups cannot be made here, if they cannot.
pub fn unavailable() -> Option<String> {
    if crate::netns::unavailable().is_some_and(|w| w.contains("root")) {
        return Some("CPU cgroups need root".into());
    }
    match Hierarchy::find() {
        Ok(_) => None,
        Err(e) => Some(format!("{e:#}")),
    }
}

#[derive(Debug, Clone)]
enum Hierarchy {
    /// A v1 hierarchy with the `cpu` controller, mounted here.
    V1(PathBuf),
    /// The v2 (unified) hierarchy, mounted here, with `cpu` delegated.
    V2(PathBuf),
}

impl Hierarchy {
    fn find() -> Result<Self> {
        let mounts = std::fs::read_to_string("/proc/self/mountinfo")
            .context("reading /proc/self/mountinfo")?;
        let mut v2 = None;
        for line in mounts.lines() {
            let Some((left, right)) = line.split_once(" - ") else {
                continue;
            };
            let Some(mount) = left.split(' ').nth(4) else {
                continue;
            };
            let mut r = right.split(' ');
            let fs = r.next().unwrap_or("");
            let opts = r.nth(1).unwrap_or("");
            if fs == "cgroup" && opts.split(',').any(|o| o == "cpu") {
                return Ok(Self::V1(PathBuf::from(mount)));
            }
            if fs == "cgroup2" && v2.is_none() {
                v2 = Some(PathBuf::from(mount));
            }
        }
        let Some(root) = v2 else {
            bail!("no cgroup hierarchy with the cpu controller is mounted")
        };
        let controllers =
            std::fs::read_to_string(root.join("cgroup.controllers")).unwrap_or_default();
        if !controllers.split_whitespace().any(|c| c == "cpu") {
            bail!(
                "the cgroup v2 hierarchy at {} has no cpu controller",
                root.display()
            );
        }
        // Delegate cpu to children of the root (no-op if it is already).
        let _ = std::fs::write(root.join("cgroup.subtree_control"), "+cpu");
        Ok(Self::V2(root))
    }

    fn root(&self) -> &Path {
        match self {
            Self::V1(p) | Self::V2(p) => p,
        }
    }
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A CPU cgroup with a quota in cores.
pub struct CpuGroup {
    dir: PathBuf,
    hierarchy: Hierarchy,
    cores: f64,
}

impl CpuGroup {
    /// A new group allowed `cores` cores' worth of CPU time.
    pub fn new(cores: f64) -> Result<Self> {
        let hierarchy = Hierarchy::find()?;
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let dir = hierarchy
            .root()
            .join(format!("hearth-test-{}-{n}", std::process::id()));
        if dir.exists() {
            let _ = std::fs::remove_dir(&dir);
        }
        std::fs::create_dir(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let g = Self {
            dir,
            hierarchy,
            cores,
        };
        g.set_cores(cores)?;
        Ok(g)
    }

    /// Changes the quota (takes effect at once for the group's processes).
    pub fn set_cores(&self, cores: f64) -> Result<()> {
        if !(cores.is_finite() && cores > 0.0) {
            bail!("a quota of {cores} cores");
        }
        let quota = ((cores * PERIOD_US as f64).round() as u64).max(1000);
        match &self.hierarchy {
            Hierarchy::V1(_) => {
                write(&self.dir.join("cpu.cfs_period_us"), &PERIOD_US.to_string())?;
                write(&self.dir.join("cpu.cfs_quota_us"), &quota.to_string())?;
            }
            Hierarchy::V2(_) => {
                write(&self.dir.join("cpu.max"), &format!("{quota} {PERIOD_US}"))?;
            }
        }
        Ok(())
    }

    /// The quota set last.
    pub fn cores(&self) -> f64 {
        self.cores
    }

    /// CPU seconds its processes have used so far (user + system, all
    /// threads, from `/proc/PID/stat`), and how many quota periods it was
    /// throttled in (`cpu.stat`; 0 where the file lacks it).
    pub fn usage(&self) -> Result<(f64, u64)> {
        let procs = std::fs::read_to_string(self.dir.join("cgroup.procs"))?;
        // Clock ticks per second: 100 on every Linux this runs on.
        let mut ticks = 0u64;
        for pid in procs.split_whitespace() {
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
                continue;
            };
            // Fields after the command (which may hold spaces) in `)`.
            let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
            let f: Vec<&str> = rest.split_whitespace().collect();
            // utime and stime are fields 14 and 15, i.e. 11 and 12 here.
            for i in [11, 12] {
                ticks += f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
            }
        }
        let stat = std::fs::read_to_string(self.dir.join("cpu.stat")).unwrap_or_default();
        let throttled = stat
            .lines()
            .find_map(|l| l.strip_prefix("nr_throttled "))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0);
        Ok((ticks as f64 / 100.0, throttled))
    }

    /// The group's directory.
    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// Moves process `pid` into the group.
    pub fn add(&self, pid: u32) -> Result<()> {
        write(&self.dir.join("cgroup.procs"), &pid.to_string())
    }

    /// `cmd` made to start inside the group: a shell writes its own pid to
    /// the group, then execs the program, so the program never runs a
    /// moment outside it (its first CPU-time reading already sees the
    /// quota). Keeps `cmd`'s arguments, environment and directory.
    pub fn wrap(&self, cmd: &Command) -> Command {
        let mut c = Command::new("sh");
        c.arg("-c")
            .arg("echo $$ > \"$0\" && exec \"$@\"")
            .arg(self.dir.join("cgroup.procs"))
            .arg(cmd.get_program())
            .args(cmd.get_args());
        for (k, v) in cmd.get_envs() {
            match v {
                Some(v) => c.env(k, v),
                None => c.env_remove(k),
            };
        }
        if let Some(d) = cmd.get_current_dir() {
            c.current_dir(d);
        }
        c
    }

    /// A CPU-bound process competing for this group's quota (killed when
    /// the guard drops).
    pub fn spin(&self) -> Result<ChildGuard> {
        let mut c = Command::new("sh");
        c.args(["-c", "while :; do :; done"]);
        ChildGuard::spawn(self.wrap(&c))
    }

    fn parent_procs(&self) -> PathBuf {
        self.hierarchy.root().join("cgroup.procs")
    }
}

impl Drop for CpuGroup {
    fn drop(&mut self) {
        // A group with processes cannot be removed: move them out first.
        if let Ok(procs) = std::fs::read_to_string(self.dir.join("cgroup.procs")) {
            for pid in procs.split_whitespace() {
                let _ = std::fs::write(self.parent_procs(), pid);
            }
        }
        for _ in 0..50 {
            if std::fs::remove_dir(&self.dir).is_ok() || !self.dir.exists() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
}

fn write(path: &Path, value: &str) -> Result<()> {
    std::fs::write(path, value).with_context(|| format!("writing {value} to {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_quota_limits_a_busy_process() {
        if !available("a_quota_limits_a_busy_process") {
            return;
        }
        let g = CpuGroup::new(0.25).unwrap();
        let mut child = g.spin().unwrap();
        let pid = child.0.id();
        let cpu = || -> f64 {
            let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
            let f: Vec<&str> = s[s.rfind(')').unwrap() + 1..].split_whitespace().collect();
            (f[11].parse::<f64>().unwrap() + f[12].parse::<f64>().unwrap()) / 100.0
        };
        // The wrapper moves itself into the group before it runs anything.
        let inside = || {
            std::fs::read_to_string(g.path().join("cgroup.procs"))
                .unwrap()
                .split_whitespace()
                .any(|p| p == pid.to_string())
        };
        let t = std::time::Instant::now();
        while !inside() && t.elapsed() < std::time::Duration::from_secs(5) {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert!(inside(), "the process did not enter its group");
        let t0 = (std::time::Instant::now(), cpu());
        std::thread::sleep(std::time::Duration::from_millis(1500));
        let used = (cpu() - t0.1) / t0.0.elapsed().as_secs_f64();
        assert!(used < 0.45, "a 0.25-core group used {used:.2} cores");
        g.set_cores(1.0).unwrap();
        let t1 = (std::time::Instant::now(), cpu());
        std::thread::sleep(std::time::Duration::from_millis(1500));
        let used1 = (cpu() - t1.1) / t1.0.elapsed().as_secs_f64();
        assert!(
            used1 > used * 1.8,
            "raising the quota: {used:.2} → {used1:.2} cores"
        );
        let _ = child.0.kill();
    }
}
