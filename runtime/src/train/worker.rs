//! A training stage's worker: a thread that runs the schedule's ops for
//! each step as micro-batches arrive, stashing only each micro-batch's
//! input and recomputing the stage in backward; then exchanges the tied
//! embedding gradient, reports its gradient norm and loss, and applies the
//! coordinator's verdict with its own AdamW (saving state when asked).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc as std_mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor, Var};
use hearth_models::train::{
    AdamW, AdamWConfig, BatchLayout, DropCtx, TrainInput, TrainStage, Upstream, accumulate,
};
use hearth_net::NodeId;
use hearth_proto::{MicroKey, MicroLayout, TensorFrame, TrainMsg, WireDType, limits};
use tracing::{debug, info_span, warn};

use super::TrainError;
use super::net::{StageRoute, TrainNet};
use super::schedule::{Op, Schedule};

/// Everything a stage needs to know about its job.
#[derive(Debug, Clone)]
pub struct StageSetup {
    pub job: u64,
    pub stage: u16,
    pub stages: u16,
    pub micro_batches: u32,
    pub schedule: Schedule,
    pub prev: Option<NodeId>,
    pub next: Option<NodeId>,
    pub coordinator: NodeId,
    /// The node with the other copy of a tied embedding / LM head (full
    /// fine-tuning of a model split across stages).
    pub tied: Option<NodeId>,
    /// Seeds dropout.
    pub seed: u64,
    pub optim: AdamWConfig,
    /// Longest wait for any one message.
    pub timeout: Duration,
    /// Keep each step's summed gradients readable (tests).
    pub keep_grads: bool,
    /// Trainable state to start from (a checkpoint's safetensors bytes).
    pub restore: Option<Vec<u8>>,
    /// Bytes of state the coordinator sends as `Restore` chunks before the
    /// first step (0: none).
    pub restore_len: u64,
    /// Longest row a micro-batch may have (bounds the attention mask).
    pub max_len: usize,
}

/// Most attention-mask entries (rows × len²) one micro-batch may need.
pub const MAX_MASK: usize = 1 << 26;

/// A running stage worker.
#[derive(Debug)]
pub struct StageHandle {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<Result<(), TrainError>>>,
    trainables: Vec<(String, Var)>,
    grads: Arc<Mutex<Vec<Option<Tensor>>>>,
}

impl StageHandle {
    /// The current values of the stage's trainable parameters.
    pub fn trainables(&self) -> &[(String, Var)] {
        &self.trainables
    }

    /// The last step's summed gradients (with `keep_grads`).
    pub fn last_grads(&self) -> Vec<Option<Tensor>> {
        self.grads.lock().map(|g| g.clone()).unwrap_or_default()
    }

    /// Whether the worker thread has ended.
    pub fn is_finished(&self) -> bool {
        self.thread.as_ref().is_none_or(|t| t.is_finished())
    }

    /// Stops the worker and returns how it ended.
    pub fn stop(mut self) -> Result<(), TrainError> {
        self.stop.store(true, Ordering::SeqCst);
        match self.thread.take().map(|t| t.join()) {
            Some(Ok(r)) => r,
            Some(Err(_)) => Err(TrainError::Stage("the stage thread panicked".into())),
            None => Ok(()),
        }
    }
}

impl Drop for StageHandle {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// Starts a worker for `stage` on this node.
pub fn spawn_stage(
    net: &TrainNet,
    stage: TrainStage,
    setup: StageSetup,
) -> Result<StageHandle, TrainError> {
    // The checkpoint a stage restores holds its trainable tensors and two
    // optimizer moments each (f32), plus names: one announced as larger
    // would only make this node buffer what it can never use.
    let state_bound: u64 = stage
        .trainables()
        .iter()
        .map(|(_, v)| v.as_tensor().elem_count() as u64 * 12)
        .sum::<u64>()
        + (1 << 20);
    if setup.restore_len > state_bound {
        return Err(TrainError::Protocol(format!(
            "a checkpoint of {} bytes for a stage whose state takes at most {state_bound}",
            setup.restore_len
        )));
    }
    let m = setup.micro_batches as usize;
    let cap = 2 * m + 8;
    let (inputs_tx, inputs) = std_mpsc::sync_channel(cap);
    let (labels_tx, labels) = std_mpsc::sync_channel(cap);
    let (grads_tx, grads) = std_mpsc::sync_channel(cap);
    let (control_tx, control) = std_mpsc::sync_channel(cap);
    let chunks = setup.restore_len.div_ceil(limits::MAX_FILE_CHUNK as u64) as usize;
    let (restore_tx, restore_rx) = std_mpsc::sync_channel(chunks + 1);
    let stop = Arc::new(AtomicBool::new(false));
    net.add_stage(
        setup.job,
        setup.stage,
        StageRoute {
            prev: setup.prev,
            next: setup.next,
            coordinator: setup.coordinator,
            tied: setup.tied,
            inputs: inputs_tx,
            labels: labels_tx,
            grads: grads_tx,
            control: control_tx,
            restore: restore_tx,
            stop: stop.clone(),
        },
    );
    let mut optim = AdamW::new(setup.optim.clone());
    if let Some(bytes) = &setup.restore {
        restore(&stage, &mut optim, bytes)?;
    }
    let trainables = stage.trainables().to_vec();
    let kept = Arc::new(Mutex::new(Vec::new()));
    let worker = Worker {
        net: net.clone(),
        stage,
        optim,
        setup,
        stop: stop.clone(),
        inputs,
        labels,
        grads,
        control,
        restore: restore_rx,
        kept: kept.clone(),
    };
    let thread = std::thread::Builder::new()
        .name("train-stage".into())
        .spawn(move || worker.run())
        .map_err(|e| TrainError::Stage(format!("cannot start the stage thread: {e}")))?;
    Ok(StageHandle {
        stop,
        thread: Some(thread),
        trainables,
        grads: kept,
    })
}

struct Worker {
    net: TrainNet,
    stage: TrainStage,
    optim: AdamW,
    setup: StageSetup,
    stop: Arc<AtomicBool>,
    inputs: std_mpsc::Receiver<TrainMsg>,
    labels: std_mpsc::Receiver<TrainMsg>,
    grads: std_mpsc::Receiver<TrainMsg>,
    control: std_mpsc::Receiver<TrainMsg>,
    restore: std_mpsc::Receiver<TrainMsg>,
    kept: Arc<Mutex<Vec<Option<Tensor>>>>,
}

impl Worker {
    fn run(mut self) -> Result<(), TrainError> {
        let s = &self.setup;
        let _span = info_span!("train-stage", job = s.job, stage = s.stage).entered();
        let (job, stage) = (s.job, s.stage);
        let result = (|| {
            if self.setup.restore_len > 0 {
                self.receive_state()?;
            }
            // 0, or the restored optimizer's step count.
            let mut step = self.optim.steps();
            loop {
                match self.step(step) {
                    Ok(()) => step += 1,
                    Err(TrainError::Stopped) => return Ok(()),
                    Err(e) => return Err(e),
                }
            }
        })();
        if let Err(e) = &result {
            warn!("training stage failed: {e}");
            let _ = self.net.send_blocking(
                self.setup.coordinator,
                TrainMsg::Failed {
                    job,
                    stage,
                    reason: e.to_string(),
                },
            );
        }
        self.net.remove_stage(job, stage);
        result
    }

    /// Takes the checkpoint the coordinator sends before the first step.
    fn receive_state(&mut self) -> Result<(), TrainError> {
        let total = self.setup.restore_len;
        let mut buf: Vec<u8> = Vec::new();
        while (buf.len() as u64) < total {
            match self.recv(&self.restore, "the checkpoint")? {
                TrainMsg::Restore {
                    offset,
                    total: t,
                    data,
                    ..
                } if t == total && offset == buf.len() as u64 => buf.extend_from_slice(&data),
                other => {
                    return Err(TrainError::Protocol(format!(
                        "unexpected {} while receiving the checkpoint",
                        super::net::name(&other)
                    )));
                }
            }
        }
        restore(&self.stage, &mut self.optim, &buf)
    }

    /// The next message of a queue, waiting at most the setup's timeout
    /// (or without limit when `what` is the first input of a step: the
    /// coordinator paces steps).
    fn recv(&self, rx: &std_mpsc::Receiver<TrainMsg>, what: &str) -> Result<TrainMsg, TrainError> {
        self.recv_within(rx, what, Some(self.setup.timeout))
    }

    fn recv_within(
        &self,
        rx: &std_mpsc::Receiver<TrainMsg>,
        what: &str,
        timeout: Option<Duration>,
    ) -> Result<TrainMsg, TrainError> {
        let deadline = timeout.map(|t| Instant::now() + t);
        loop {
            if self.stop.load(Ordering::SeqCst) {
                return Err(TrainError::Stopped);
            }
            match rx.recv_timeout(Duration::from_millis(100)) {
                Ok(m) => return Ok(m),
                Err(std_mpsc::RecvTimeoutError::Disconnected) => return Err(TrainError::Stopped),
                Err(std_mpsc::RecvTimeoutError::Timeout) => {}
            }
            if deadline.is_some_and(|d| Instant::now() > d) {
                return Err(TrainError::Timeout(format!(
                    "stage {} waited {:?} for {what}",
                    self.setup.stage, self.setup.timeout
                )));
            }
        }
    }

    fn expect_key(&self, got: MicroKey, step: u64, mb: u32, what: &str) -> Result<(), TrainError> {
        let want = key(&self.setup, step, mb, self.setup.stage);
        if got != want {
            return Err(TrainError::Protocol(format!(
                "{what} for {got:?} while waiting for {want:?}"
            )));
        }
        Ok(())
    }

    fn step(&mut self, step: u64) -> Result<(), TrainError> {
        let s = self.setup.clone();
        let (first, last) = (s.prev.is_none(), s.next.is_none());
        let ops = s
            .schedule
            .ops(s.stages as usize, s.micro_batches, s.stage as usize);
        let mut stash: HashMap<u32, (TrainInput, BatchLayout)> = HashMap::new();
        let mut labels: HashMap<u32, (Vec<u32>, u64)> = HashMap::new();
        let mut acc: Vec<Option<Tensor>> = vec![None; self.stage.trainables().len()];
        let (mut loss_sum, mut targets) = (0.0, 0u64);
        let mut busy = Duration::ZERO;
        for op in ops {
            match op {
                Op::Forward(mb) => {
                    let _span = info_span!("fwd", step, mb).entered();
                    // A step starts when the coordinator says (it detects
                    // silent stages); inside a step, waits are bounded.
                    let limit = (mb > 0).then_some(s.timeout);
                    let (input, layout) = match self.recv_within(&self.inputs, "an input", limit)? {
                        TrainMsg::Tokens {
                            key,
                            layout,
                            tokens,
                        } => {
                            self.expect_key(key, step, mb, "tokens")?;
                            (TrainInput::Tokens(tokens), to_layout(layout, s.max_len)?)
                        }
                        TrainMsg::Activations {
                            key,
                            layout,
                            hidden,
                        } => {
                            self.expect_key(key, step, mb, "activations")?;
                            let layout = to_layout(layout, s.max_len)?;
                            let h = from_frame(
                                &hidden,
                                layout.tokens(),
                                self.stage.config().hidden_size,
                            )?;
                            (TrainInput::Hidden(h), layout)
                        }
                        other => {
                            return Err(TrainError::Protocol(format!("unexpected {other:?}")));
                        }
                    };
                    if last {
                        match self.recv(&self.labels, "labels")? {
                            TrainMsg::Labels {
                                key,
                                step_targets,
                                labels: l,
                            } => {
                                self.expect_key(key, step, mb, "labels")?;
                                if l.len() != layout.tokens() {
                                    return Err(TrainError::Protocol(format!(
                                        "{} labels for {} tokens",
                                        l.len(),
                                        layout.tokens()
                                    )));
                                }
                                labels.insert(mb, (l, step_targets));
                            }
                            other => {
                                return Err(TrainError::Protocol(format!("unexpected {other:?}")));
                            }
                        }
                    } else {
                        // The last stage recomputes in backward anyway, so
                        // only the others run forward now.
                        let t0 = Instant::now();
                        let out =
                            self.stage
                                .forward(&input, &layout, &dropout_ctx(&s, step, mb))?;
                        busy += t0.elapsed();
                        let hidden = to_frame(&out, s.job, step)?;
                        let msg = TrainMsg::Activations {
                            key: key(&s, step, mb, s.stage + 1),
                            layout: from_layout(&layout),
                            hidden,
                        };
                        self.send(s.next, msg)?;
                    }
                    stash.insert(mb, (input, layout));
                }
                Op::Backward(mb) => {
                    let _span = info_span!("bwd", step, mb).entered();
                    let (input, layout) = stash.remove(&mb).ok_or_else(|| {
                        TrainError::Protocol(format!(
                            "backward of micro-batch {mb} before its forward"
                        ))
                    })?;
                    let d = dropout_ctx(&s, step, mb);
                    // Busy time is compute alone: not the wait for the
                    // next stage's gradient.
                    let mut t0 = Instant::now();
                    let back = if last {
                        let (l, step_targets) = labels.remove(&mb).ok_or_else(|| {
                            TrainError::Protocol(format!("no labels for micro-batch {mb}"))
                        })?;
                        let scale = 1.0 / step_targets.max(1) as f64;
                        self.stage.backward(
                            &input,
                            &layout,
                            &d,
                            Upstream::Loss { labels: &l, scale },
                        )?
                    } else {
                        let g = match self.recv(&self.grads, "a gradient")? {
                            TrainMsg::Gradient { key, grad } => {
                                self.expect_key(key, step, mb, "gradient")?;
                                from_frame(&grad, layout.tokens(), self.stage.config().hidden_size)?
                            }
                            other => {
                                return Err(TrainError::Protocol(format!("unexpected {other:?}")));
                            }
                        };
                        t0 = Instant::now();
                        self.stage
                            .backward(&input, &layout, &d, Upstream::Grad(&g))?
                    };
                    busy += t0.elapsed();
                    loss_sum += back.loss_sum.unwrap_or(0.0);
                    targets += back.targets as u64;
                    if let (false, Some(g)) = (first, &back.input_grad) {
                        let msg = TrainMsg::Gradient {
                            key: key(&s, step, mb, s.stage.saturating_sub(1)),
                            grad: to_frame(g, s.job, step)?,
                        };
                        self.send(s.prev, msg)?;
                    }
                    accumulate(&mut acc, back.grads)?;
                }
            }
        }
        // Tied embedding / head: both copies get the sum of both gradients.
        let tied_name = hearth_models::TensorId::Embed.hf_name();
        let tied_idx = self
            .stage
            .trainables()
            .iter()
            .position(|(n, _)| *n == tied_name);
        if let (Some(partner), Some(i)) = (s.tied, tied_idx) {
            let own = match &acc[i] {
                Some(g) => g.clone(),
                None => self.stage.trainables()[i].1.zeros_like()?,
            };
            self.net.send_blocking(
                partner,
                TrainMsg::Tied {
                    job: s.job,
                    step,
                    // The other end of the pipeline.
                    stage: if first { s.stages - 1 } else { 0 },
                    name: tied_name.clone(),
                    grad: to_frame(&own, s.job, step)?,
                },
            )?;
            let other = match self.recv(&self.control, "the tied gradient")? {
                TrainMsg::Tied {
                    step: st,
                    name,
                    grad,
                    ..
                } if st == step && name == tied_name => {
                    let dims = own.dims2()?;
                    from_frame(&grad, dims.0, dims.1)?
                }
                other => return Err(TrainError::Protocol(format!("unexpected {other:?}"))),
            };
            acc[i] = Some((own + other)?);
        }
        if s.keep_grads
            && let Ok(mut k) = self.kept.lock()
        {
            *k = acc.clone();
        }
        // The tied parameter's norm is counted once, by the first stage.
        let counted: Vec<Option<Tensor>> = acc
            .iter()
            .enumerate()
            .map(|(j, g)| {
                if Some(j) == tied_idx && s.tied.is_some() && !first {
                    None
                } else {
                    g.clone()
                }
            })
            .collect();
        let sq_norm = hearth_models::train::optim::sq_norm(&counted)?;
        self.net.send_blocking(
            s.coordinator,
            TrainMsg::Report {
                job: s.job,
                step,
                stage: s.stage,
                busy_s: busy.as_secs_f64(),
                sq_norm: if sq_norm.is_finite() {
                    sq_norm
                } else {
                    f64::MAX
                },
                loss_sum: if loss_sum.is_finite() {
                    loss_sum
                } else {
                    f64::MAX
                },
                targets,
            },
        )?;
        let (apply, save, lr, grad_scale) = match self.recv(&self.control, "the step's verdict")? {
            TrainMsg::Apply {
                step: st,
                apply,
                save,
                lr,
                grad_scale,
                ..
            } if st == step => (apply, save, lr, grad_scale),
            other => return Err(TrainError::Protocol(format!("unexpected {other:?}"))),
        };
        if apply {
            let params = self.stage.trainables().to_vec();
            self.optim.step(&params, &acc, lr, grad_scale)?;
        }
        debug!(step, apply, "step done");
        // Applied first: the coordinator times the step (the optimizer's
        // update included) by it, and then collects any checkpoint state.
        self.net.send_blocking(
            s.coordinator,
            TrainMsg::Applied {
                job: s.job,
                step,
                stage: s.stage,
            },
        )?;
        if save {
            let bytes = self.state_bytes()?;
            let total = bytes.len() as u64;
            let chunks: Vec<&[u8]> = if bytes.is_empty() {
                vec![&[]]
            } else {
                bytes.chunks(limits::MAX_FILE_CHUNK).collect()
            };
            let mut offset = 0u64;
            for c in chunks {
                self.net.send_blocking(
                    s.coordinator,
                    TrainMsg::State {
                        job: s.job,
                        step,
                        stage: s.stage,
                        offset,
                        total,
                        data: c.to_vec(),
                    },
                )?;
                offset += c.len() as u64;
            }
        }
        Ok(())
    }

    fn send(&self, to: Option<NodeId>, msg: TrainMsg) -> Result<(), TrainError> {
        let to = to.ok_or_else(|| TrainError::Protocol("no neighbour to send to".into()))?;
        Ok(self.net.send_blocking(to, msg)?)
    }

    /// Trainable parameters and AdamW moments as safetensors, with the
    /// optimizer's step count in the metadata.
    fn state_bytes(&self) -> Result<Vec<u8>, TrainError> {
        let mut tensors: Vec<(String, Tensor)> = self
            .stage
            .trainables()
            .iter()
            .map(|(n, v)| Ok((n.clone(), v.as_tensor().to_dtype(DType::F32)?)))
            .collect::<Result<_, candle_core::Error>>()?;
        for (n, t) in self.optim.state_tensors()? {
            tensors.push((format!("optimizer.{n}"), t.to_dtype(DType::F32)?));
        }
        let meta = HashMap::from([
            (
                "optimizer_steps".to_string(),
                self.optim.steps().to_string(),
            ),
            ("stage".to_string(), self.setup.stage.to_string()),
        ]);
        super::state::encode(&tensors, meta)
    }
}

/// Restores trainables and optimizer moments from safetensors bytes
/// holding (at least) this stage's names.
pub(crate) fn restore(
    stage: &TrainStage,
    optim: &mut AdamW,
    bytes: &[u8],
) -> Result<(), TrainError> {
    let (loaded, meta) = super::state::decode(bytes)?;
    let steps = meta
        .get("optimizer_steps")
        .and_then(|s| s.parse::<u64>().ok())
        .ok_or_else(|| TrainError::Checkpoint("no optimizer_steps in the checkpoint".into()))?;
    for (name, _) in stage.trainables() {
        let t = loaded
            .get(name)
            .ok_or_else(|| TrainError::Checkpoint(format!("the checkpoint lacks {name}")))?;
        stage.set(name, t)?;
    }
    let moments: HashMap<String, Tensor> = loaded
        .iter()
        .filter_map(|(k, v)| {
            k.strip_prefix("optimizer.")
                .map(|n| (n.to_string(), v.clone()))
        })
        .collect();
    optim.restore(stage.trainables(), &moments, steps)?;
    Ok(())
}

/// The key of micro-batch `mb` for stage `to`.
fn key(s: &StageSetup, step: u64, mb: u32, to: u16) -> MicroKey {
    MicroKey {
        job: s.job,
        step,
        micro: mb,
        stage: to,
    }
}

fn dropout_ctx(s: &StageSetup, step: u64, mb: u32) -> DropCtx {
    DropCtx {
        seed: s.seed,
        step,
        micro: mb,
        train: true,
    }
}

fn to_layout(l: MicroLayout, max_len: usize) -> Result<BatchLayout, TrainError> {
    let (rows, len) = (l.rows as usize, l.len as usize);
    if len > max_len || rows.saturating_mul(len).saturating_mul(len) > MAX_MASK {
        return Err(TrainError::Protocol(format!(
            "a {rows}×{len} micro-batch exceeds the job's bound (rows of at most {max_len}, rows×len² at most {MAX_MASK})"
        )));
    }
    Ok(BatchLayout::new(
        l.rows as usize,
        l.len as usize,
        l.segments,
    )?)
}

fn from_layout(l: &BatchLayout) -> MicroLayout {
    MicroLayout {
        rows: l.rows as u32,
        len: l.len as u32,
        segments: l.segments.clone(),
    }
}

/// A `[n, hidden]` tensor as f32 on the wire.
fn to_frame(t: &Tensor, job: u64, step: u64) -> Result<TensorFrame, TrainError> {
    let shape: Vec<u32> = t.dims().iter().map(|&d| d as u32).collect();
    let v = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    TensorFrame::from_f32(job, step, shape, &v, WireDType::F32)
        .map_err(|e| TrainError::Protocol(e.to_string()))
}

fn from_frame(f: &TensorFrame, rows: usize, cols: usize) -> Result<Tensor, TrainError> {
    if f.shape != [rows as u32, cols as u32] {
        return Err(TrainError::Protocol(format!(
            "tensor {:?}, expected [{rows}, {cols}]",
            f.shape
        )));
    }
    Ok(Tensor::from_vec(f.to_f32(), (rows, cols), &Device::Cpu)?)
}
