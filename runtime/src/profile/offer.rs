//! What the machine offers this process right now: the CPUs it may run on
//! (affinity), the CPU quota of its cgroup (v1 `cpu.cfs_quota_us` /
//! `cpu.cfs_period_us`, or v2 `cpu.max`, the tightest along the cgroup's
//! path), and the CPU time other processes take. A device's measured speed
//! is only true under the offer it was measured with; when the offer
//! changes (a quota is lowered, another program gets busy), figures are
//! scaled by [`Offer::available`] until live figures replace them.

use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::{Deserialize, Serialize};

/// What the machine offers this process.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Offer {
    /// CPUs this process may run on (its affinity mask).
    pub cpus: usize,
    /// Cores' worth of CPU time the cgroup quota allows, if one is set.
    pub quota_cores: Option<f64>,
    /// Cores' worth of CPU time other processes used lately (machine-wide
    /// busy time minus this process's own).
    pub others_load: f64,
    /// Threads this process computes with.
    pub threads: usize,
}

impl Offer {
    /// Cores' worth of CPU time the compute threads can get: their number,
    /// capped by the quota, and by a fair share of the CPUs when the other
    /// processes' load and ours exceed them.
    pub fn available(&self) -> f64 {
        let want = self.threads.max(1) as f64;
        let cpus = self.cpus.max(1) as f64;
        let others = self.others_load.max(0.0);
        let share = if want + others <= cpus {
            want
        } else {
            cpus * want / (want + others)
        };
        let capped = match self.quota_cores {
            Some(q) if q > 0.0 => share.min(q),
            _ => share,
        };
        capped.clamp(0.01, want)
    }

    /// What identifies this offer for the profile cache: the CPUs and the
    /// quota (two decimals), not the passing load of other programs.
    pub fn cache_identity(&self) -> String {
        match self.quota_cores {
            Some(q) => format!("cpus{}|quota{:.2}", self.cpus, q),
            None => format!("cpus{}|noquota", self.cpus),
        }
    }
}

/// CPUs in this process's affinity mask.
pub fn affinity_cpus() -> usize {
    // SAFETY: cpu_set_t is plain data; sched_getaffinity writes at most
    // `size_of::<cpu_set_t>()` bytes into it.
    #[cfg(target_os = "linux")]
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) == 0 {
            let n = libc::CPU_COUNT(&set);
            if n > 0 {
                return n as usize;
            }
        }
    }
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// The CPU quota (in cores) of this process's cgroup now: the tightest
/// limit on its path, v2 (`cpu.max`) or v1 (`cpu.cfs_quota_us`).
pub fn cgroup_quota() -> Option<f64> {
    let cgroups = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    quota_from(&cgroups, &mounts, Path::new("/"))
}

/// The quota described by `/proc/self/cgroup` and `/proc/self/mountinfo`
/// contents, with cgroup files read under `root` (tests pass a temporary
/// directory laid out like `/sys/fs/cgroup`).
pub(crate) fn quota_from(cgroups: &str, mountinfo: &str, root: &Path) -> Option<f64> {
    let mut best: Option<f64> = None;
    let mut tighter = |q: Option<f64>| {
        if let Some(q) = q {
            best = Some(best.map_or(q, |b: f64| b.min(q)));
        }
    };
    for line in cgroups.lines() {
        let mut parts = line.splitn(3, ':');
        let (Some(_), Some(controllers), Some(path)) = (parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        if controllers.is_empty() {
            // cgroup v2 (unified).
            if let Some(mount) = mount_point(mountinfo, |fs, _| fs == "cgroup2") {
                tighter(walk(&root.join(strip(&mount)), path, read_v2));
            }
        } else if controllers.split(',').any(|c| c == "cpu") {
            let mount = mount_point(mountinfo, |fs, opts| {
                fs == "cgroup" && opts.split(',').any(|o| o == "cpu")
            });
            if let Some(mount) = mount {
                tighter(walk(&root.join(strip(&mount)), path, read_v1));
            }
        }
    }
    best
}

fn strip(p: &str) -> &str {
    p.trim_start_matches('/')
}

/// The mount point of the first cgroup file system `pick` accepts
/// (by file-system type and super options).
fn mount_point(mountinfo: &str, pick: impl Fn(&str, &str) -> bool) -> Option<String> {
    for line in mountinfo.lines() {
        // "id parent maj:min root mount-point opts [optional…] - fstype source superopts"
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        let mount = left.split(' ').nth(4)?;
        let mut r = right.split(' ');
        let fs = r.next().unwrap_or("");
        let _source = r.next();
        let opts = r.next().unwrap_or("");
        if pick(fs, opts) {
            return Some(mount.to_string());
        }
    }
    None
}

/// The tightest quota along `path` (from the mount's root down to it).
fn walk(mount: &Path, path: &str, read: fn(&Path) -> Option<f64>) -> Option<f64> {
    let mut dir = PathBuf::from(mount);
    let mut best = read(&dir);
    for part in path.split('/').filter(|p| !p.is_empty() && *p != "..") {
        dir.push(part);
        if let Some(q) = read(&dir) {
            best = Some(best.map_or(q, |b| b.min(q)));
        }
    }
    best
}

fn read_v2(dir: &Path) -> Option<f64> {
    let s = std::fs::read_to_string(dir.join("cpu.max")).ok()?;
    let mut it = s.split_whitespace();
    let quota = it.next()?;
    let period: f64 = it.next().and_then(|p| p.parse().ok()).unwrap_or(100_000.0);
    if quota == "max" || period <= 0.0 {
        return None;
    }
    let q: f64 = quota.parse().ok()?;
    (q > 0.0).then_some(q / period)
}

fn read_v1(dir: &Path) -> Option<f64> {
    let quota: f64 = std::fs::read_to_string(dir.join("cpu.cfs_quota_us"))
        .ok()?
        .trim()
        .parse()
        .ok()?;
    let period: f64 = std::fs::read_to_string(dir.join("cpu.cfs_period_us"))
        .ok()?
        .trim()
        .parse()
        .ok()?;
    (quota > 0.0 && period > 0.0).then_some(quota / period)
}

/// Samples other processes' CPU use: machine-wide busy time from
/// `/proc/stat` minus this process's own from `/proc/self/stat`, between
/// two calls of [`LoadSampler::sample`].
#[derive(Debug)]
pub struct LoadSampler {
    last: Option<(Instant, f64, f64)>,
    /// The last figure (cores), kept when a sample fails.
    load: f64,
}

impl Default for LoadSampler {
    fn default() -> Self {
        let mut s = Self {
            last: None,
            load: 0.0,
        };
        s.sample();
        s
    }
}

/// Clock ticks per second of `/proc` times.
fn ticks_per_s() -> f64 {
    // SAFETY: sysconf has no preconditions.
    #[cfg(target_os = "linux")]
    {
        let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
        if t > 0 {
            return t as f64;
        }
    }
    100.0
}

/// Busy seconds of the whole machine (every CPU), from `/proc/stat`.
fn machine_busy_s() -> Option<f64> {
    let s = std::fs::read_to_string("/proc/stat").ok()?;
    let cpu = s.lines().find(|l| l.starts_with("cpu "))?;
    let v: Vec<f64> = cpu
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal ...
    let busy: f64 = v
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != 3 && *i != 4)
        .take(8)
        .map(|(_, x)| x)
        .sum();
    Some(busy / ticks_per_s())
}

/// CPU seconds this process used (user + system), from `/proc/self/stat`.
fn own_busy_s() -> Option<f64> {
    let s = std::fs::read_to_string("/proc/self/stat").ok()?;
    // The command name may hold spaces: fields start after the last ')'.
    let rest = &s[s.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // After ')': state(0) ppid(1) … utime(11) stime(12).
    let utime: f64 = f.get(11)?.parse().ok()?;
    let stime: f64 = f.get(12)?.parse().ok()?;
    Some((utime + stime) / ticks_per_s())
}

impl LoadSampler {
    /// Other processes' load (cores) since the last sample (at least
    /// 0.2 s apart; sooner calls return the last figure).
    pub fn sample(&mut self) -> f64 {
        let now = Instant::now();
        let (Some(machine), Some(own)) = (machine_busy_s(), own_busy_s()) else {
            return self.load;
        };
        match self.last {
            Some((t, m0, o0)) => {
                let dt = now.duration_since(t).as_secs_f64();
                if dt < 0.2 {
                    return self.load;
                }
                self.load = (((machine - m0) - (own - o0)) / dt).max(0.0);
                self.last = Some((now, machine, own));
            }
            None => self.last = Some((now, machine, own)),
        }
        self.load
    }

    /// The offer now, with the last load sample.
    pub fn offer(&mut self) -> Offer {
        Offer {
            cpus: affinity_cpus(),
            quota_cores: cgroup_quota(),
            others_load: self.sample(),
            threads: candle_core::utils::get_num_threads(),
        }
    }
}

/// The offer now, with other processes' load over the next `window`
/// (blocks for it).
pub fn offer_now(window: std::time::Duration) -> Offer {
    let mut s = LoadSampler::default();
    std::thread::sleep(window);
    s.offer()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn available_is_capped_by_quota_and_shared_under_load() {
        let o = |cpus, quota, others, threads| Offer {
            cpus,
            quota_cores: quota,
            others_load: others,
            threads,
        };
        assert_eq!(o(2, None, 0.0, 1).available(), 1.0);
        assert_eq!(o(2, Some(0.25), 0.0, 1).available(), 0.25);
        assert_eq!(o(2, Some(4.0), 0.0, 2).available(), 2.0);
        // One busy program beside one thread on two CPUs: no contention.
        assert_eq!(o(2, None, 1.0, 1).available(), 1.0);
        // Three busy programs and two threads on two CPUs: a fair share.
        assert!((o(2, None, 3.0, 2).available() - 0.8).abs() < 1e-9);
        assert_ne!(
            o(2, Some(0.25), 0.0, 1).cache_identity(),
            o(2, Some(1.0), 0.0, 1).cache_identity()
        );
        assert_eq!(
            o(2, None, 0.0, 1).cache_identity(),
            o(2, None, 1.5, 1).cache_identity()
        );
    }

    fn write(p: &Path, s: &str) {
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, s).unwrap();
    }

    #[test]
    fn reads_v1_and_v2_quotas_along_the_path() {
        let root = tempfile::tempdir().unwrap();
        let r = root.path();
        // v1: cpu,cpuacct mounted at /sys/fs/cgroup/cpu,cpuacct; the
        // parent allows 1.5 cores, the leaf 0.25.
        let v1 = r.join("sys/fs/cgroup/cpu,cpuacct");
        write(&v1.join("a/cpu.cfs_quota_us"), "150000\n");
        write(&v1.join("a/cpu.cfs_period_us"), "100000\n");
        write(&v1.join("a/b/cpu.cfs_quota_us"), "25000\n");
        write(&v1.join("a/b/cpu.cfs_period_us"), "100000\n");
        write(&v1.join("cpu.cfs_quota_us"), "-1\n");
        write(&v1.join("cpu.cfs_period_us"), "100000\n");
        let mounts =
            "30 25 0:27 / /sys/fs/cgroup/cpu,cpuacct rw,nosuid - cgroup cgroup rw,cpu,cpuacct\n";
        let q = quota_from("4:cpu,cpuacct:/a/b\n", mounts, r).unwrap();
        assert!((q - 0.25).abs() < 1e-9, "{q}");
        // Only the parent limits: its quota.
        let q = quota_from("4:cpu,cpuacct:/a\n", mounts, r).unwrap();
        assert!((q - 1.5).abs() < 1e-9, "{q}");
        // No quota at the root: none.
        assert_eq!(quota_from("4:cpu,cpuacct:/\n", mounts, r), None);

        // v2: cpu.max "max" at the top, "50000 100000" below.
        let v2 = r.join("sys/fs/cgroup2");
        write(&v2.join("cpu.max"), "max 100000\n");
        write(&v2.join("svc/cpu.max"), "50000 100000\n");
        let mounts2 = "40 1 0:30 / /sys/fs/cgroup2 rw - cgroup2 cgroup2 rw\n";
        let q = quota_from("0::/svc\n", mounts2, r).unwrap();
        assert!((q - 0.5).abs() < 1e-9, "{q}");
        assert_eq!(quota_from("0::/\n", mounts2, r), None);
        // Garbage is no quota, not a panic.
        assert_eq!(quota_from("nonsense\n::\n", "junk", r), None);
    }

    #[test]
    fn samples_this_machine() {
        let o = offer_now(std::time::Duration::from_millis(250));
        assert!(o.cpus >= 1);
        assert!(o.others_load >= 0.0 && o.others_load.is_finite());
        assert!(o.available() > 0.0);
    }
}
