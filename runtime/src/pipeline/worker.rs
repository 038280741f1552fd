//! A stage worker: one thread that owns a loaded [`Stage`] and the KV
//! caches of the sequences passing through it. It takes whatever work is
//! queued (prefill chunks and decode steps of many sequences), runs it as
//! one ragged batch (continuous batching), and sends the result on: hidden
//! states to the next stage, or sampled tokens back to stage 0.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use candle_core::{Device, Tensor};
use hearth_models::{KvCache, Logits, Sampler, SamplingParams, Shaping, Stage, StageInput};
use hearth_proto::{
    Finish, Forward, Message, SampledToken, SeqChunk, SeqParams, TensorFrame, TokenLogprobs,
    WireDType,
};
use tokio::sync::mpsc;
use tracing::{debug, warn};

use super::service::ServedModel;
use super::{Sink, StageTimes};

/// Most tokens one batch takes (a long prompt alone may exceed it).
pub(crate) const MAX_BATCH_TOKENS: usize = 4096;
/// A sequence untouched this long has its cache dropped (a lost end).
pub(crate) const IDLE_CACHE: Duration = Duration::from_secs(120);

/// The input of some chunks.
pub(crate) enum Input {
    Tokens(Vec<u32>),
    /// Row-major `[tokens, hidden]`.
    Hidden(Vec<f32>),
}

/// Work for the stage.
pub(crate) enum WorkItem {
    Run {
        chunks: Vec<SeqChunk>,
        input: Input,
    },
    /// The sequences ended: free them here and tell the next stage.
    End(Vec<u64>),
}

struct SeqState {
    cache: KvCache,
    /// This stage's slice of the sequence's LoRA adapter (`None`: the base).
    adapter: Option<Arc<hearth_models::StageAdapter>>,
    /// On the last stage: how this sequence is sampled and stopped.
    head: Option<HeadState>,
    /// Forwarded with the sequence's next chunk to the next stage (once).
    params: Option<SeqParams>,
    last_used: Instant,
}

struct HeadState {
    sampler: Sampler,
    /// Whether each token goes back with its log-probabilities.
    logprobs: bool,
    stop_ids: Vec<u32>,
    /// Most tokens to generate (already clipped to the context).
    max_new: usize,
    generated: usize,
    /// The prompt, when its tokens' log-probabilities go back with the
    /// first token (emptied once sent).
    score: Vec<u32>,
    /// Alternatives per log-probability.
    top: usize,
}

/// How a stage reports its work to the node's live figures: the meter,
/// whose basis (the node's measured times) predicts each batch.
pub(crate) struct StageMeter {
    pub live: Arc<crate::profile::LiveMeter>,
}

impl StageMeter {
    /// What the start-up figures predict for a batch of `lens` chunks on
    /// `spec`: one sequence's decode step, or one prompt chunk of 8 tokens
    /// or more (batched decode is cheaper per sequence than the figures,
    /// which time one sequence, so it is left out).
    fn predict(
        &self,
        spec: hearth_models::StageSpec,
        lens: &[usize],
    ) -> Option<(crate::profile::live::Work, f64)> {
        use crate::profile::live::Work;
        let t = self.live.basis()?;
        let layers = spec.end.saturating_sub(spec.start) as f64;
        let part = |f: fn(&hearth_partitioner::PhaseTimes) -> f64| {
            layers * f(&t.layer)
                + if spec.embed { f(&t.embed) } else { 0.0 }
                + if spec.head { f(&t.head) } else { 0.0 }
        };
        match lens {
            [1] => Some((Work::Decode, part(|p| p.decode_s))),
            [n] if *n >= 8 => Some((Work::Prefill, *n as f64 * part(|p| p.prefill_s_per_token))),
            _ => None,
        }
    }
}

/// Where a worker's results go.
pub(crate) struct Routes {
    pub placement: u64,
    /// The next stage (none on the last stage).
    pub next: Option<Sink>,
    /// Stage 0, for sampled tokens and failures.
    pub first: Sink,
}

/// The handle: a bounded queue into the thread, and its live sequence count.
#[derive(Clone)]
pub(crate) struct Worker {
    pub tx: mpsc::Sender<WorkItem>,
    pub live: Arc<AtomicUsize>,
    pub times: Arc<StageTimes>,
}

/// Queue capacity: above the most sequences in flight, so the pipeline's
/// loop (stage 0 → … → last → stage 0) can never fill every queue at once.
pub(crate) const QUEUE: usize = 2 * super::MAX_IN_FLIGHT + 64;

/// Starts the worker thread for `stage`.
pub(crate) fn spawn(
    stage: Stage,
    adapters: Arc<crate::adapters::StageAdapters>,
    routes: Routes,
    meter: Option<StageMeter>,
    text: Option<Arc<ServedModel>>,
) -> std::io::Result<Worker> {
    let (tx, rx) = mpsc::channel(QUEUE);
    let live = Arc::new(AtomicUsize::new(0));
    let times = Arc::new(StageTimes::default());
    let w = Worker {
        tx,
        live: live.clone(),
        times: times.clone(),
    };
    let spec = stage.spec();
    std::thread::Builder::new()
        .name(format!("stage-{}-{}", spec.start, spec.end))
        .spawn(move || {
            StageLoop {
                stage,
                adapters,
                routes,
                seqs: HashMap::new(),
                backlog: VecDeque::new(),
                live,
                times,
                meter,
                text,
            }
            .run(rx)
        })?;
    Ok(w)
}

struct StageLoop {
    stage: Stage,
    /// The adapters' slices this stage was asked to prepare.
    adapters: Arc<crate::adapters::StageAdapters>,
    routes: Routes,
    seqs: HashMap<u64, SeqState>,
    /// Work taken from the queue but left for the next batch (a sequence
    /// already in this batch, or over the token budget).
    backlog: VecDeque<WorkItem>,
    live: Arc<AtomicUsize>,
    times: Arc<StageTimes>,
    meter: Option<StageMeter>,
    /// The model's text side, for grammars (the last stage).
    text: Option<Arc<ServedModel>>,
}

impl StageLoop {
    fn run(mut self, mut rx: mpsc::Receiver<WorkItem>) {
        let mut last_sweep = Instant::now();
        loop {
            let first = match self.backlog.pop_front() {
                Some(w) => w,
                None => match rx.blocking_recv() {
                    Some(w) => w,
                    None => break, // the stage was dropped
                },
            };
            let mut batch: Vec<(SeqChunk, Input)> = Vec::new();
            let mut in_batch = HashSet::new();
            let mut tokens = 0;
            let mut ends = Vec::new();
            let mut pending = Some(first);
            loop {
                let item = match pending.take() {
                    Some(w) => w,
                    None => match self.backlog.pop_front().or_else(|| rx.try_recv().ok()) {
                        Some(w) => w,
                        None => break,
                    },
                };
                match item {
                    WorkItem::End(seqs) => ends.extend(seqs),
                    WorkItem::Run { chunks, input } => {
                        let n: usize = chunks.iter().map(|c| c.len as usize).sum();
                        let clash = chunks.iter().any(|c| in_batch.contains(&c.seq));
                        if !batch.is_empty() && (clash || tokens + n > MAX_BATCH_TOKENS) {
                            self.backlog.push_back(WorkItem::Run { chunks, input });
                            break;
                        }
                        tokens += n;
                        for (c, i) in split(chunks, input, self.stage.config().hidden_size) {
                            in_batch.insert(c.seq);
                            batch.push((c, i));
                        }
                    }
                }
            }
            if !batch.is_empty() {
                self.run_batch(batch);
            }
            if !ends.is_empty() {
                self.end(ends);
            }
            if last_sweep.elapsed() > Duration::from_secs(10) {
                last_sweep = Instant::now();
                let before = self.seqs.len();
                self.seqs.retain(|_, s| s.last_used.elapsed() < IDLE_CACHE);
                if self.seqs.len() < before {
                    warn!(
                        dropped = before - self.seqs.len(),
                        "dropped idle sequence caches"
                    );
                }
            }
            self.live.store(self.seqs.len(), Ordering::Relaxed);
        }
        debug!("stage worker stopped");
    }

    fn end(&mut self, seqs: Vec<u64>) {
        for s in &seqs {
            self.seqs.remove(s);
        }
        if let Some(next) = &self.routes.next {
            next.send(Message::EndSeqs {
                placement: self.routes.placement,
                seqs,
            });
        }
    }

    fn fail(&mut self, chunks: &[SeqChunk], why: &str) {
        warn!(sequences = chunks.len(), "stage failed: {why}");
        for c in chunks {
            self.seqs.remove(&c.seq);
        }
        let tokens = chunks
            .iter()
            .map(|c| SampledToken {
                seq: c.seq,
                pos: c.pos,
                token: 0,
                finish: Finish::Failed,
                logprobs: None,
                prompt_logprobs: Vec::new(),
            })
            .collect();
        self.routes.first.send(Message::Sampled {
            placement: self.routes.placement,
            tokens,
        });
    }

    fn run_batch(&mut self, batch: Vec<(SeqChunk, Input)>) {
        let started = Instant::now();
        let head = self.stage.spec().head;
        let ctx = self.stage.config().max_position_embeddings;
        // Admit: a sequence's first chunk creates its state; any other
        // chunk must continue where its cache ends.
        let mut ok = Vec::with_capacity(batch.len());
        let mut bad = Vec::new();
        for (c, input) in batch {
            let check = match (&c.params, self.seqs.get(&c.seq)) {
                // One bad chunk must not fail the batch it would join.
                _ if c.len == 0 => Err("empty chunk"),
                (Some(_), Some(_)) => Err("sequence started twice"),
                (Some(_), None) if c.pos != 0 => Err("first chunk not at position 0"),
                (Some(p), None) => match new_state(
                    &self.stage,
                    &self.adapters,
                    p,
                    c.len as usize,
                    head.then_some(self.text.as_deref()),
                    ctx,
                ) {
                    Ok(s) => {
                        self.seqs.insert(c.seq, s);
                        Ok(())
                    }
                    Err(e) => {
                        warn!("bad sequence parameters: {e}");
                        Err("bad sequence parameters")
                    }
                },
                (None, None) => Err("unknown sequence (ended or timed out)"),
                (None, Some(s)) if s.cache.len() != c.pos as usize => Err("chunk out of order"),
                (None, Some(_)) => Ok(()),
            };
            match check {
                Ok(()) => ok.push((c, input)),
                Err(why) => bad.push((c, why)),
            }
        }
        for (c, why) in bad {
            self.fail(std::slice::from_ref(&c), why);
        }
        if ok.is_empty() {
            return;
        }
        // A sequence admitted here counts as live before its (possibly long)
        // prefill runs: an old placement's stage is dropped only when idle.
        self.live.store(self.seqs.len(), Ordering::Relaxed);
        // A prompt to score needs every position's logits: each such
        // sequence runs alone (its logits bounded by the requester's
        // check), the rest of the batch with last-position logits.
        let scores = |s: &Self, c: &SeqChunk| {
            head && s
                .seqs
                .get(&c.seq)
                .and_then(|s| s.head.as_ref())
                .is_some_and(|h| !h.score.is_empty())
        };
        let (scoring, rest): (Vec<_>, Vec<_>) = ok.into_iter().partition(|(c, _)| scores(self, c));
        if !rest.is_empty() {
            self.compute(rest, head, false, started);
        }
        for one in scoring {
            self.compute(vec![one], head, true, Instant::now());
        }
    }

    /// Runs admitted chunks through the stage, then samples (last stage) or
    /// sends the hidden states on; `all`: every position's logits.
    fn compute(&mut self, ok: Vec<(SeqChunk, Input)>, head: bool, all: bool, started: Instant) {
        let chunks: Vec<SeqChunk> = ok.iter().map(|(c, _)| c.clone()).collect();
        let result = self.forward(ok, if all { Logits::All } else { Logits::Last });
        let compute = started.elapsed();
        if let Some(m) = &self.meter
            && result.is_ok()
        {
            let lens: Vec<usize> = chunks.iter().map(|c| c.len as usize).collect();
            let predicted = m.predict(self.stage.spec(), &lens);
            m.live
                .record(compute.as_secs_f64(), predicted, lens.iter().sum());
        }
        match result {
            Err(e) => self.fail(&chunks, &format!("forward: {e}")),
            Ok(out) if head => match self.rows(&chunks, &out, all) {
                Ok((rows, scored)) => self.sample(chunks, rows, scored),
                Err(e) => self.fail(&chunks, &format!("reading logits: {e}")),
            },
            Ok(out) => {
                let sent = Instant::now();
                self.send_hidden(chunks, out);
                self.times.add(compute, sent.elapsed());
                return;
            }
        }
        self.times.add(compute, Duration::ZERO);
    }

    /// The batch's logits as one row per chunk to sample from, and the
    /// prompt log-probabilities of the sequences that asked for them (when
    /// `all` logits were computed).
    #[allow(clippy::type_complexity)]
    fn rows(
        &mut self,
        chunks: &[SeqChunk],
        logits: &Tensor,
        all: bool,
    ) -> Result<(Vec<Vec<f32>>, HashMap<u64, Vec<TokenLogprobs>>), String> {
        let rows = logits.to_vec2::<f32>().map_err(|e| e.to_string())?;
        let mut scored = HashMap::new();
        if !all {
            return Ok((rows, scored));
        }
        let total: usize = chunks.iter().map(|c| c.len as usize).sum();
        if rows.len() != total {
            return Err(format!("{} logit rows for {total} tokens", rows.len()));
        }
        let mut last = Vec::with_capacity(chunks.len());
        let mut at = 0;
        for c in chunks {
            let len = c.len as usize;
            if let Some(h) = self.seqs.get_mut(&c.seq).and_then(|s| s.head.as_mut())
                && !h.score.is_empty()
            {
                let score = std::mem::take(&mut h.score);
                let lps: Vec<TokenLogprobs> = (0..len.saturating_sub(1))
                    .filter_map(|i| {
                        let t = *score.get(i + 1)?;
                        let (logprob, top) =
                            hearth_models::sampling::token_logprobs(&rows[at + i], t, h.top);
                        Some(TokenLogprobs { logprob, top })
                    })
                    .collect();
                scored.insert(c.seq, lps);
            }
            last.push(rows[at + len - 1].clone());
            at += len;
        }
        Ok((last, scored))
    }

    fn forward(&mut self, batch: Vec<(SeqChunk, Input)>, logits: Logits) -> Result<Tensor, String> {
        let lens: Vec<usize> = batch.iter().map(|(c, _)| c.len as usize).collect();
        let n: usize = lens.iter().sum();
        let input = if self.stage.spec().embed {
            let mut ids = Vec::with_capacity(n);
            for (_, i) in &batch {
                match i {
                    Input::Tokens(t) => ids.extend_from_slice(t),
                    Input::Hidden(_) => return Err("hidden states sent to the first stage".into()),
                }
            }
            StageInput::Tokens(ids)
        } else {
            let h = self.stage.config().hidden_size;
            let mut values = Vec::with_capacity(n * h);
            for (_, i) in &batch {
                match i {
                    Input::Hidden(v) => values.extend_from_slice(v),
                    Input::Tokens(_) => return Err("tokens sent to a middle stage".into()),
                }
            }
            let t = Tensor::from_vec(values, (n, h), &Device::Cpu).map_err(|e| e.to_string())?;
            StageInput::Hidden(t)
        };
        // Take the batch's states out for the forward (the batch has no
        // duplicates), and put them back whatever the outcome.
        let now = Instant::now();
        let mut taken: Vec<(u64, SeqState)> = batch
            .iter()
            .filter_map(|(c, _)| self.seqs.remove_entry(&c.seq))
            .collect();
        let out = if taken.len() != batch.len() {
            Err("sequence vanished".to_string())
        } else {
            // (Only a batch with an adapted sequence gathers them.)
            let adapters: Vec<Option<Arc<hearth_models::StageAdapter>>> =
                if taken.iter().any(|(_, s)| s.adapter.is_some()) {
                    taken.iter().map(|(_, s)| s.adapter.clone()).collect()
                } else {
                    Vec::new()
                };
            let mut caches: Vec<&mut KvCache> = taken
                .iter_mut()
                .map(|(_, s)| {
                    s.last_used = now;
                    &mut s.cache
                })
                .collect();
            if !adapters.is_empty() {
                let each: Vec<Option<&hearth_models::StageAdapter>> =
                    adapters.iter().map(|a| a.as_deref()).collect();
                self.stage
                    .forward_adapted(input, &lens, &mut caches, logits, &each)
                    .map_err(|e| e.to_string())
            } else {
                self.stage
                    .forward(input, &lens, &mut caches, logits)
                    .map_err(|e| e.to_string())
            }
        };
        self.seqs.extend(taken);
        out
    }

    fn send_hidden(&mut self, chunks: Vec<SeqChunk>, hidden: Tensor) {
        let Some(next) = &self.routes.next else {
            return;
        };
        let frame = hidden
            .dims2()
            .and_then(|(n, h)| Ok(((n, h), hidden.flatten_all()?.to_vec1::<f32>()?)))
            .map_err(|e| e.to_string())
            .and_then(|((n, h), v)| {
                TensorFrame::from_f32(0, 0, vec![n as u32, h as u32], &v, WireDType::F32)
                    .map_err(|e| e.to_string())
            });
        let frame = match frame {
            Ok(f) => f,
            Err(e) => return self.fail(&chunks, &format!("packing hidden states: {e}")),
        };
        // Each sequence's parameters go on with its first chunk only.
        let chunks = chunks
            .into_iter()
            .map(|mut c| {
                if let Some(s) = self.seqs.get_mut(&c.seq) {
                    c.params = s.params.take();
                }
                c
            })
            .collect();
        next.send(Message::Forward(Forward {
            placement: self.routes.placement,
            chunks,
            hidden: frame,
        }));
    }

    fn sample(
        &mut self,
        chunks: Vec<SeqChunk>,
        rows: Vec<Vec<f32>>,
        mut scored: HashMap<u64, Vec<TokenLogprobs>>,
    ) {
        if rows.len() != chunks.len() {
            return self.fail(
                &chunks,
                &format!("{} logit rows for {} sequences", rows.len(), chunks.len()),
            );
        }
        let mut out = Vec::with_capacity(chunks.len());
        for (c, row) in chunks.iter().zip(rows) {
            let Some(h) = self.seqs.get_mut(&c.seq).and_then(|s| s.head.as_mut()) else {
                continue;
            };
            let (token, logprobs) = match h.sampler.pick(&row) {
                Ok(p) => (p.token, p.logprobs),
                Err(why) => {
                    warn!(seq = c.seq, "sampling failed: {why}");
                    self.seqs.remove(&c.seq);
                    out.push(SampledToken {
                        seq: c.seq,
                        pos: c.pos + c.len,
                        token: 0,
                        finish: Finish::Failed,
                        logprobs: None,
                        prompt_logprobs: Vec::new(),
                    });
                    continue;
                }
            };
            h.generated += 1;
            let finish = if h.stop_ids.contains(&token) {
                Finish::Stop
            } else if h.generated >= h.max_new {
                Finish::Length
            } else {
                Finish::No
            };
            let logprobs = logprobs
                .filter(|_| h.logprobs)
                .map(|(logprob, top)| TokenLogprobs { logprob, top });
            if finish != Finish::No {
                self.seqs.remove(&c.seq);
            }
            out.push(SampledToken {
                seq: c.seq,
                pos: c.pos + c.len,
                token,
                finish,
                logprobs,
                prompt_logprobs: scored.remove(&c.seq).unwrap_or_default(),
            });
        }
        // A token with its prompt's log-probabilities goes in a message of
        // its own, so each stays within the frame limit.
        let (own, rest): (Vec<_>, Vec<_>) =
            out.into_iter().partition(|t| !t.prompt_logprobs.is_empty());
        for t in own {
            self.routes.first.send(Message::Sampled {
                placement: self.routes.placement,
                tokens: vec![t],
            });
        }
        if !rest.is_empty() {
            self.routes.first.send(Message::Sampled {
                placement: self.routes.placement,
                tokens: rest,
            });
        }
    }
}

/// A sequence's state; `head` holds the model's text side when this stage
/// samples (`Some(None)`: it samples but has no text side, so it cannot
/// take a grammar).
fn new_state(
    stage: &Stage,
    adapters: &crate::adapters::StageAdapters,
    p: &SeqParams,
    prompt: usize,
    head: Option<Option<&ServedModel>>,
    ctx: usize,
) -> Result<SeqState, String> {
    let head = if let Some(text) = head {
        let sampling = SamplingParams {
            temperature: p.temperature,
            top_p: p.top_p,
            top_k: p.top_k as usize,
            seed: p.seed,
        };
        let max_new = (p.max_tokens as usize).min(ctx.saturating_sub(prompt));
        if max_new == 0 {
            return Err(format!(
                "no room to generate: {prompt} prompt tokens of {ctx}"
            ));
        }
        let mut sampler = Sampler::new(sampling)
            .and_then(|s| {
                s.with_shaping(Shaping {
                    presence_penalty: p.presence_penalty,
                    frequency_penalty: p.frequency_penalty,
                    logit_bias: p.logit_bias.clone(),
                })
            })
            .map_err(|e| e.to_string())?;
        if let Some(n) = p.logprobs {
            sampler = sampler.with_logprobs(n as usize);
        }
        if p.history.len() > prompt {
            return Err(format!(
                "{} replayed tokens for a prefix of {prompt}",
                p.history.len()
            ));
        }
        if let Some(g) = &p.grammar {
            if p.stop_ids.is_empty() {
                return Err("an output constraint needs end tokens".into());
            }
            let text = text.ok_or("this stage cannot apply an output constraint")?;
            let c = text
                .text
                .grammars()
                .and_then(|gs| gs.compile(g))
                .map_err(|e| e.to_string())?;
            sampler = sampler.with_constraint(Box::new(c), &p.stop_ids);
        }
        sampler.replay(&p.history)?;
        // Scoring computes every prompt position's logits at once: bounded
        // here too, whatever the requester checked.
        let scored_max = super::scored_prompt_max(stage.config().vocab_size);
        if !p.score_prompt.is_empty()
            && (p.score_prompt.len() != prompt
                || p.logprobs.is_none()
                || p.score_prompt.len() > scored_max)
        {
            return Err(format!(
                "{} tokens to score for a prompt of {prompt}, logprobs {:?}",
                p.score_prompt.len(),
                p.logprobs
            ));
        }
        Some(HeadState {
            sampler,
            logprobs: p.logprobs.is_some(),
            stop_ids: p.stop_ids.clone(),
            max_new,
            generated: 0,
            score: p.score_prompt.clone(),
            top: p.logprobs.unwrap_or(0) as usize,
        })
    } else {
        None
    };
    // An adapter this stage was not asked to prepare fails the sequence:
    // never the base model's answer under a fine-tune's name.
    let adapter = match &p.adapter {
        None => None,
        Some(id) => Some(adapters.get(id).ok_or_else(|| {
            format!(
                "adapter {} is not prepared on this stage",
                id.get(..12).unwrap_or(id)
            )
        })?),
    };
    Ok(SeqState {
        cache: stage.new_cache(),
        adapter,
        head,
        params: Some(p.clone()),
        last_used: Instant::now(),
    })
}

/// Splits a multi-chunk item into one input per chunk.
fn split(chunks: Vec<SeqChunk>, input: Input, hidden: usize) -> Vec<(SeqChunk, Input)> {
    let mut out = Vec::with_capacity(chunks.len());
    match input {
        Input::Tokens(t) => {
            let mut at = 0;
            for c in chunks {
                let end = (at + c.len as usize).min(t.len());
                out.push((c, Input::Tokens(t[at..end].to_vec())));
                at = end;
            }
        }
        Input::Hidden(v) => {
            let mut at = 0;
            for c in chunks {
                let end = (at + c.len as usize * hidden).min(v.len());
                out.push((c, Input::Hidden(v[at..end].to_vec())));
                at = end;
            }
        }
    }
    out
}
