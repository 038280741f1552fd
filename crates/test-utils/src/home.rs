//! A heterogeneous home on one machine, for tests and benchmarks: `hearth
//! up` processes on loopback, each in its own CPU cgroup with its own quota
//! (a fast desktop, a busy laptop), joined into one cluster. A test can
//! change a device's quota mid-run or start a competing CPU-bound program
//! in its group, then watch the cluster through its HTTP API. With
//! [`HomeSpec::link`] each device also sits in its own network namespace on
//! one bridge, its outgoing traffic shaped by `tc` (rate, and delay where
//! the kernel has `netem`), as devices on a home LAN or Wi-Fi.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use hearth_runtime::ClusterView;
use hearth_runtime::pipeline::Placement;

use crate::cgroup::CpuGroup;
use crate::netns::{ChildGuard, Lan};
use crate::{free_port, hearth_binary, hearth_release_binary, hearth_up_command_at};

/// One device: a node process in its CPU group.
pub struct Device {
    pub name: String,
    /// Where it listens: loopback, or its address on the home's LAN.
    pub ip: std::net::IpAddr,
    pub quic: u16,
    pub http: u16,
    pub group: CpuGroup,
    /// The API key its HTTP API requires (off loopback).
    key: Option<String>,
    process: Option<ChildGuard>,
}

impl Device {
    fn url(&self, path: &str) -> String {
        format!("http://{}:{}{path}", self.ip, self.http)
    }

    /// `r` with this device's API key, if it has one.
    fn authorized<B>(&self, r: ureq::RequestBuilder<B>) -> ureq::RequestBuilder<B> {
        match &self.key {
            Some(k) => r.header("Authorization", &format!("Bearer {k}")),
            None => r,
        }
    }

    fn get(
        &self,
        path: &str,
        timeout: Duration,
    ) -> ureq::RequestBuilder<ureq::typestate::WithoutBody> {
        self.authorized(agent(timeout).get(&self.url(path)))
    }

    fn post(
        &self,
        path: &str,
        timeout: Duration,
    ) -> ureq::RequestBuilder<ureq::typestate::WithBody> {
        self.authorized(agent(timeout).post(&self.url(path)))
    }

    /// This device's node as the cluster sees it.
    pub fn view(&self) -> Result<ClusterView> {
        Ok(self
            .get("/api/cluster", Duration::from_secs(5))
            .call()?
            .body_mut()
            .read_json()?)
    }
}

/// The devices of one cluster.
pub struct Home {
    pub devices: Vec<Device>,
    /// The LAN of namespaces, when the devices sit on one (dropped after
    /// the devices: fields drop in order).
    _lan: Option<Lan>,
    _dir: tempfile::TempDir,
}

/// A shaped link: each device's outgoing traffic limited to `rate_mbit`
/// (`tc tbf`) and, when `delay_ms` > 0, delayed by that much (`tc netem`,
/// where the kernel has it), so a round trip takes twice the delay.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LinkShape {
    pub rate_mbit: f64,
    pub delay_ms: f64,
}

/// How to start a home.
#[derive(Debug, Clone)]
pub struct HomeSpec {
    /// Cores' worth of CPU time for each device, in order (names a, b, c…).
    pub cores: Vec<f64>,
    /// Least seconds each start-up figure is timed over
    /// (`HEARTH_MEASURE_SECS`); 1 s spans ten quota periods.
    pub measure_secs: f64,
    /// More `hearth up` flags for every node (e.g. `--split even`).
    pub extra: Vec<String>,
    /// The release binary instead of the debug one (benchmarks).
    pub release: bool,
    /// Each device in its own network namespace with this link shape
    /// (needs root and iproute2; see [`crate::netns::available`]); none:
    /// every device on loopback.
    pub link: Option<LinkShape>,
}

impl Default for HomeSpec {
    fn default() -> Self {
        Self {
            cores: vec![1.0, 0.25],
            measure_secs: 1.0,
            extra: Vec::new(),
            release: false,
            link: None,
        }
    }
}

fn agent(timeout: Duration) -> ureq::Agent {
    ureq::Agent::config_builder()
        .timeout_global(Some(timeout))
        .build()
        .into()
}

impl Home {
    /// Starts one node per entry of `spec.cores`, serving `model` and
    /// planning by measured figures (`--split plan`), the first one
    /// making the cluster and the others joining it. Returns once every
    /// node answers HTTP (not yet placed: see [`Home::wait_placement`]).
    pub fn start(model: &Path, spec: &HomeSpec) -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let lan = match spec.link {
            Some(shape) => {
                let lan = Lan::new(spec.cores.len())?;
                lan.reach_from_host()?;
                for i in 0..spec.cores.len() {
                    lan.shape(i, shape.rate_mbit, shape.delay_ms)?;
                }
                Some(lan)
            }
            None => None,
        };
        let mut devices: Vec<Device> = Vec::new();
        let mut token = None;
        for (i, &cores) in spec.cores.iter().enumerate() {
            let name = ((b'a' + i as u8) as char).to_string();
            let home = dir.path().join(&name);
            let (quic, http) = (free_port(true)?, free_port(false)?);
            let ip: std::net::IpAddr = match &lan {
                Some(l) => l.ip(i).into(),
                None => std::net::Ipv4Addr::LOCALHOST.into(),
            };
            // Off loopback the API requires a key: give it one.
            let key = lan
                .as_ref()
                .map(|_| format!("home-key-{}-{i}", std::process::id()));
            let mut extra = vec![
                "--model".to_string(),
                model.display().to_string(),
                "--split".into(),
                "plan".into(),
            ];
            if let Some(k) = &key {
                extra.extend(["--api-key".to_string(), k.clone()]);
            }
            extra.extend(spec.extra.iter().cloned());
            if let (Some(t), Some(first)) = (&token, devices.first()) {
                extra.extend(["--join".to_string(), String::clone(t)]);
                extra.extend(["--peer".to_string(), format!("{}:{}", first.ip, first.quic)]);
            }
            let binary = if spec.release {
                hearth_release_binary()?
            } else {
                hearth_binary()?
            };
            let mut cmd = hearth_up_command_at(&binary, &home, &name, ip, quic, http, &extra)?;
            if let Some(l) = &lan {
                // `ip netns exec` enters the namespace and execs the node
                // in the same process, which the group then holds.
                let mut inside = l.command(i, &binary.display().to_string());
                inside.args(cmd.get_args());
                inside
                    .stdout(std::process::Stdio::null())
                    .stderr(std::process::Stdio::null());
                cmd = inside;
            }
            cmd.env("HEARTH_MEASURE_SECS", spec.measure_secs.to_string());
            if std::env::var_os("HEARTH_HOME_LOGS").is_some() {
                cmd.stderr(std::process::Stdio::inherit());
            }
            let group = CpuGroup::new(cores)?;
            let process = ChildGuard::spawn(group.wrap(&cmd))?;
            devices.push(Device {
                name,
                ip,
                quic,
                http,
                group,
                key,
                process: Some(process),
            });
            let start = Instant::now();
            while devices[i].view().is_err() {
                if start.elapsed() > Duration::from_secs(30) {
                    bail!("node {i} did not answer HTTP in 30 s");
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            if token.is_none() {
                let out = std::process::Command::new(&binary)
                    .arg("token")
                    .arg("--home")
                    .arg(&home)
                    .output()
                    .context("hearth token")?;
                token = Some(String::from_utf8(out.stdout)?.trim().to_string());
            }
        }
        Ok(Self {
            devices,
            _lan: lan,
            _dir: dir,
        })
    }

    /// Device `i`'s node as the cluster sees it.
    pub fn view(&self, i: usize) -> Result<ClusterView> {
        self.devices[i].view()
    }

    /// Waits (up to `limit`) for device `i` to report an active placement
    /// that `ok` accepts, and returns it.
    pub fn wait_placement(
        &self,
        i: usize,
        limit: Duration,
        ok: impl Fn(&Placement) -> bool,
    ) -> Result<Placement> {
        let start = Instant::now();
        loop {
            if let Ok(v) = self.view(i)
                && let Some(p) = v.placement
                && ok(&p)
            {
                return Ok(p);
            }
            if start.elapsed() > limit {
                bail!(
                    "no such placement in {limit:?}; last: {:?}",
                    self.view(i).ok().and_then(|v| v.placement)
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Layers device `name` runs in `p` (0 if it has no stage).
    pub fn layers(p: &Placement, name: &str) -> usize {
        p.stages
            .iter()
            .filter(|s| s.name == name)
            .map(|s| s.spec.end - s.spec.start)
            .sum()
    }

    /// Changes device `i`'s CPU quota.
    pub fn set_cores(&self, i: usize, cores: f64) -> Result<()> {
        self.devices[i].group.set_cores(cores)
    }

    /// Kills device `i`'s process.
    pub fn kill(&mut self, i: usize) {
        self.devices[i].process.take();
    }

    /// One generation of `max_tokens` tokens through device `i`'s
    /// `POST /api/generate` (seeded sampling at temperature 1, so it runs
    /// its length); returns (tokens generated, seconds from the first token
    /// to the last).
    pub fn generate(&self, i: usize, salt: u64, max_tokens: u32) -> Result<(usize, f64)> {
        let v: serde_json::Value = self.devices[i]
            .post("/api/generate", Duration::from_secs(300))
            .send_json(serde_json::json!({
                "prompt": format!("Story {salt}: once upon a time, in a small village by the sea,"),
                "max_tokens": max_tokens, "temperature": 1.0, "seed": 7 + salt,
            }))?
            .body_mut()
            .read_json()?;
        let n = v["token_ids"]
            .as_array()
            .map(|a| a.len())
            .with_context(|| format!("no token_ids in {v}"))?;
        let secs = v["decode_secs"].as_f64().unwrap_or(0.0);
        Ok((n, secs))
    }

    /// A streamed generation of `max_tokens` tokens through device `i`'s
    /// `POST /api/generate`; returns when each token arrived.
    pub fn stream(&self, i: usize, salt: u64, max_tokens: u32) -> Result<Vec<std::time::Instant>> {
        use std::io::BufRead;
        let mut resp = self.devices[i]
            .post("/api/generate", Duration::from_secs(300))
            .send_json(serde_json::json!({
                "prompt": format!("Story {salt}: once upon a time, in a small village by the sea,"),
                "max_tokens": max_tokens, "temperature": 1.0, "seed": 7 + salt, "stream": true,
            }))?;
        let mut arrived = Vec::new();
        for line in std::io::BufReader::new(resp.body_mut().as_reader()).lines() {
            let line = line?;
            let v: serde_json::Value = serde_json::from_str(&line)
                .with_context(|| format!("a line that is not JSON: {line}"))?;
            if v.get("token").is_some() {
                arrived.push(std::time::Instant::now());
            } else if let Some(e) = v.get("error") {
                anyhow::bail!("the generation failed: {e}");
            } else if v.get("done").is_some() {
                break;
            }
        }
        Ok(arrived)
    }

    /// One non-streamed completion of `max_tokens` tokens through device
    /// `i`'s API; returns the number of tokens generated.
    pub fn complete(&self, i: usize, model: &str, prompt: &str, max_tokens: u32) -> Result<u64> {
        let body = serde_json::json!({
            "model": model,
            "prompt": prompt,
            "max_tokens": max_tokens,
            "temperature": 0.0,
        });
        let v: serde_json::Value = self.devices[i]
            .post("/v1/completions", Duration::from_secs(120))
            .send_json(&body)?
            .body_mut()
            .read_json()?;
        v["usage"]["completion_tokens"]
            .as_u64()
            .with_context(|| format!("no usage in {v}"))
    }

    /// Uploads `jsonl` through device `i`'s `POST /v1/files` (purpose
    /// fine-tune) and starts a fine-tuning job on it with `hearth` extras
    /// (steps, method, …); returns the job id.
    pub fn start_job(&self, i: usize, jsonl: &str, hearth: serde_json::Value) -> Result<String> {
        let boundary = "hearth-home-boundary-7f3a";
        let body = format!(
            "--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nfine-tune\r\n\
             --{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"data.jsonl\"\r\n\
             Content-Type: application/jsonl\r\n\r\n{jsonl}\r\n--{boundary}--\r\n"
        );
        let file: serde_json::Value = self.devices[i]
            .post("/v1/files", Duration::from_secs(30))
            .header(
                "Content-Type",
                &format!("multipart/form-data; boundary={boundary}"),
            )
            .send(body.as_bytes())?
            .body_mut()
            .read_json()?;
        let file_id = file["id"]
            .as_str()
            .with_context(|| format!("no file id in {file}"))?;
        let model = self
            .view(i)?
            .placement
            .map(|p| p.model)
            .context("no model placed")?;
        let job: serde_json::Value = self.devices[i]
            .post("/v1/fine_tuning/jobs", Duration::from_secs(30))
            .send_json(serde_json::json!({
                "model": model, "training_file": file_id, "hearth": hearth,
            }))?
            .body_mut()
            .read_json()?;
        job["id"]
            .as_str()
            .map(str::to_string)
            .with_context(|| format!("no job id in {job}"))
    }

    /// Device `i`'s `GET /v1/fine_tuning/jobs/{id}`.
    pub fn job(&self, i: usize, id: &str) -> Result<serde_json::Value> {
        Ok(self.devices[i]
            .get(
                &format!("/v1/fine_tuning/jobs/{id}"),
                Duration::from_secs(10),
            )
            .call()?
            .body_mut()
            .read_json()?)
    }

    /// Job `id`'s events on device `i`, oldest first (as the API gives
    /// them: `message`, `level`, `data` with a step's metrics).
    pub fn job_events(&self, i: usize, id: &str) -> Result<Vec<serde_json::Value>> {
        let v: serde_json::Value = self.devices[i]
            .get(
                &format!("/v1/fine_tuning/jobs/{id}/events"),
                Duration::from_secs(10),
            )
            .call()?
            .body_mut()
            .read_json()?;
        let mut out: Vec<serde_json::Value> = v["data"].as_array().cloned().unwrap_or_default();
        // The API lists the newest first.
        out.reverse();
        Ok(out)
    }

    /// The messages of job `id`'s events on device `i`, oldest first.
    pub fn job_messages(&self, i: usize, id: &str) -> Result<Vec<String>> {
        Ok(self
            .job_events(i, id)?
            .iter()
            .filter_map(|e| e["message"].as_str().map(str::to_string))
            .collect())
    }

    /// Waits until job `id` on device `i` ends (or `limit` passes); returns
    /// its last object.
    pub fn wait_job(&self, i: usize, id: &str, limit: Duration) -> Result<serde_json::Value> {
        let start = Instant::now();
        loop {
            let j = self.job(i, id)?;
            if matches!(
                j["status"].as_str(),
                Some("succeeded" | "failed" | "cancelled")
            ) {
                return Ok(j);
            }
            if start.elapsed() > limit {
                bail!("job {id} did not end in {limit:?}: {j}");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// The LoRA adapter a finished job wrote (under `hearth.output_dir` of
    /// its object), as (tensor name, f32 values) sorted by name.
    pub fn job_adapter(job: &serde_json::Value) -> Result<Vec<(String, Vec<f32>)>> {
        let out = job["hearth"]["output_dir"]
            .as_str()
            .with_context(|| format!("no output_dir in {job}"))?;
        let bytes = std::fs::read(Path::new(out).join("adapter/adapter_model.safetensors"))?;
        let st = safetensors::SafeTensors::deserialize(&bytes)?;
        let mut all: Vec<(String, Vec<f32>)> = st
            .tensors()
            .into_iter()
            .map(|(name, view)| {
                let v = view
                    .data()
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect();
                (name, v)
            })
            .collect();
        all.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(all)
    }

    /// Waits until job `id` on device `i` has done `step` steps (or `limit`
    /// passes); returns its object then.
    pub fn wait_step(
        &self,
        i: usize,
        id: &str,
        step: u64,
        limit: Duration,
    ) -> Result<serde_json::Value> {
        let start = Instant::now();
        loop {
            let j = self.job(i, id)?;
            if j["hearth"]["step"].as_u64().unwrap_or(0) >= step {
                return Ok(j);
            }
            if start.elapsed() > limit {
                bail!(
                    "no step {step} in {limit:?}: {:?}",
                    self.job_messages(i, id)?
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Layers device `name` runs in a job object's current split.
    pub fn job_layers(job: &serde_json::Value, name: &str) -> u64 {
        job["hearth"]["stages"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|s| s["name"] == name)
            .map(|s| {
                let (start, end) = (s["start"].as_u64(), s["end"].as_u64());
                end.unwrap_or(0).saturating_sub(start.unwrap_or(0))
            })
            .sum()
    }
}
