//! The requester's side: tokenize, hand the prompt to stage 0 (in process,
//! or over a `GENERATE` stream to the member running it), and turn the
//! sampled tokens into text, with stop strings and cancellation. Also stage
//! 0's side of the `GENERATE` stream.

use std::time::{Duration, Instant};

use hearth_models::{ChatInputs, FinishReason, SamplingParams, Shaping, TextStream};
use hearth_net::framed::{read_message, write_message};
use hearth_net::{IncomingStream, NodeId};
use hearth_proto::{
    Finish, GenerateRequest, Message, Refusal, SampledToken, SeqParams, TokenLogprobs, limits,
    stream_kind,
};
use serde::Serialize;
use tokio::sync::{mpsc, oneshot};
use tracing::debug;

use super::balance;
use super::router::{RouterMsg, SeqOut};
use super::service::Service;
use super::{PipelineError, finish_reason, to_seq_params};

/// Refusal codes on a `GENERATE` stream.
pub mod refusal {
    /// No stage 0 of that placement here (re-planned meanwhile).
    pub const NOT_READY: u16 = 100;
    /// Too many sequences in flight.
    pub const BUSY: u16 = 101;
    /// The request is invalid.
    pub const BAD_REQUEST: u16 = 102;
    /// The pipeline failed on the sequence.
    pub const FAILED: u16 = 103;
}

/// What to generate from.
#[derive(Debug, Clone)]
pub enum Prompt {
    /// Plain text, tokenized as is.
    Text(String),
    /// Chat messages (and tools, documents, template arguments), rendered
    /// by the model's chat template.
    Chat(Box<ChatInputs>),
    /// Token ids.
    Tokens(Vec<u32>),
}

/// A generation request to the cluster.
#[derive(Debug, Clone)]
pub struct GenerateParams {
    pub prompt: Prompt,
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    /// Stop strings (the text is cut before the first one).
    pub stop: Vec<String>,
    /// Penalties and logit bias.
    pub shaping: Shaping,
    /// Each token's log-probability, with this many alternatives.
    pub logprobs: Option<u8>,
    /// An output constraint: an llguidance grammar as JSON (see
    /// `hearth_models::grammar`).
    pub grammar: Option<String>,
    /// Special tokens appear in the text (a tool call's markers may be
    /// special tokens); end tokens never do.
    pub special_text: bool,
    /// Score the prompt: its tokens' log-probabilities (with `logprobs`
    /// alternatives) come first, as [`GenEvent::Prompt`].
    pub score_prompt: bool,
    /// A fine-tune served as the placed base model plus this LoRA adapter
    /// (as [`crate::Node::ensure_model`] resolved it); `None`: the base.
    pub adapter: Option<crate::adapters::AdapterRef>,
}

impl GenerateParams {
    /// Plain sampling of `prompt`: no penalties, log-probabilities or
    /// constraint.
    pub fn new(
        prompt: Prompt,
        max_tokens: usize,
        sampling: SamplingParams,
        stop: Vec<String>,
    ) -> Self {
        Self {
            prompt,
            max_tokens,
            sampling,
            stop,
            shaping: Shaping::default(),
            logprobs: None,
            grammar: None,
            special_text: false,
            score_prompt: false,
            adapter: None,
        }
    }
}

/// What a generation yields, in order: tokens, then `Done` or `Failed`.
#[derive(Debug, Clone, PartialEq)]
pub enum GenEvent {
    /// A generated token and the text that became final with it (may be empty).
    Token {
        id: u32,
        text: String,
        /// When asked for: the token's log-probability and alternatives.
        logprobs: Option<TokenLogprobs>,
    },
    /// Text held back until the end (a possible stop string that was not).
    Text(String),
    /// Before the first token, when the prompt was scored: its tokens, and
    /// each one's log-probability after the ones before it (from the
    /// second).
    Prompt {
        ids: Vec<u32>,
        logprobs: Vec<TokenLogprobs>,
    },
    Done(GenSummary),
    Failed(String),
}

/// A finished generation.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GenSummary {
    /// The placed model's name.
    pub model: String,
    pub text: String,
    pub prompt_token_ids: Vec<u32>,
    pub token_ids: Vec<u32>,
    pub finish_reason: FinishReason,
    pub prompt_tokens: usize,
    /// Seconds until the first token (prefill through every stage).
    pub prefill_secs: f64,
    /// Seconds the request waited to be admitted by stage 0 (part of
    /// `prefill_secs`).
    pub queue_secs: f64,
    /// Seconds from the first token to the last.
    pub decode_secs: f64,
    /// The placement that ran it, and how many stages it has.
    pub placement: u64,
    pub stages: usize,
}

impl GenSummary {
    /// Generated tokens per second after the first one.
    pub fn decode_tok_per_s(&self) -> f64 {
        let n = self.token_ids.len().saturating_sub(1);
        if self.decode_secs > 0.0 {
            n as f64 / self.decode_secs
        } else {
            0.0
        }
    }
}

/// The events of one generation; dropping it cancels the generation.
pub type GenStream = mpsc::Receiver<GenEvent>;

/// Waits for a generation's end, passing over its tokens.
pub async fn finish(rx: &mut GenStream) -> Result<GenSummary, PipelineError> {
    while let Some(ev) = rx.recv().await {
        match ev {
            GenEvent::Done(s) => return Ok(s),
            GenEvent::Failed(e) => return Err(PipelineError::Failed(e)),
            GenEvent::Token { .. } | GenEvent::Text(_) | GenEvent::Prompt { .. } => {}
        }
    }
    Err(PipelineError::Failed("the generation ended early".into()))
}

/// Starts a generation on the active placement.
pub(crate) async fn generate(
    service: &Service,
    req: GenerateParams,
) -> Result<GenStream, PipelineError> {
    let model = service.model().ok_or(PipelineError::NoModel)?;
    let text = &model.text;
    let ids = match &req.prompt {
        Prompt::Text(t) => text.encode_prompt(t)?,
        Prompt::Chat(m) => text.encode_prompt(&text.render_inputs(m)?)?,
        Prompt::Tokens(t) => {
            if t.is_empty() {
                return Err(PipelineError::BadRequest("empty prompt".into()));
            }
            if t.len() >= text.context_length() {
                return Err(PipelineError::BadRequest(format!(
                    "the prompt has {} tokens; the model's context is {}",
                    t.len(),
                    text.context_length()
                )));
            }
            let vocab = model.info.config.vocab_size;
            if let Some(bad) = t.iter().find(|&&id| id as usize >= vocab) {
                return Err(PipelineError::BadRequest(format!(
                    "token id {bad} is outside the model's vocabulary of {vocab}"
                )));
            }
            t.clone()
        }
    };
    if ids.len() > limits::MAX_PROMPT_TOKENS {
        return Err(PipelineError::BadRequest(format!(
            "the prompt has {} tokens, at most {} are accepted",
            ids.len(),
            limits::MAX_PROMPT_TOKENS
        )));
    }
    if req.max_tokens == 0 {
        return Err(PipelineError::BadRequest(
            "max_tokens must be at least 1".into(),
        ));
    }
    req.sampling
        .validate()
        .and_then(|()| req.shaping.validate())
        .map_err(|e| PipelineError::BadRequest(e.to_string()))?;
    if req.shaping.logit_bias.len() > limits::MAX_LOGIT_BIAS {
        return Err(PipelineError::BadRequest(format!(
            "logit_bias has {} entries, at most {}",
            req.shaping.logit_bias.len(),
            limits::MAX_LOGIT_BIAS
        )));
    }
    if let Some(n) = req
        .logprobs
        .filter(|&n| n as usize > limits::MAX_TOP_LOGPROBS)
    {
        return Err(PipelineError::BadRequest(format!(
            "{n} top log-probabilities asked, at most {}",
            limits::MAX_TOP_LOGPROBS
        )));
    }
    let vocab = model.info.config.vocab_size;
    if let Some((bad, _)) = req
        .shaping
        .logit_bias
        .iter()
        .find(|(t, _)| *t as usize >= vocab)
    {
        return Err(PipelineError::BadRequest(format!(
            "logit_bias names token {bad}, outside the model's vocabulary of {vocab}"
        )));
    }
    if let Some(g) = &req.grammar {
        if g.len() > limits::MAX_GRAMMAR {
            return Err(PipelineError::BadRequest(format!(
                "the output constraint is {} bytes, at most {}",
                g.len(),
                limits::MAX_GRAMMAR
            )));
        }
        // Compiled here first (off the async threads: the first use builds
        // the vocabulary's index), so a bad one is the client's error, not
        // a stage's failure.
        let (m, g) = (model.clone(), g.clone());
        tokio::task::spawn_blocking(move || {
            m.text.grammars().and_then(|gs| gs.compile(&g)).map(|_| ())
        })
        .await
        .map_err(|e| PipelineError::Failed(e.to_string()))??;
    }
    // Scoring computes every prompt position's logits at once on the last
    // stage: bounded in tokens and in bytes.
    let scored_max = super::scored_prompt_max(vocab);
    if req.score_prompt && (req.logprobs.is_none() || ids.len() > scored_max) {
        return Err(PipelineError::BadRequest(format!(
            "scoring a prompt needs logprobs and at most {scored_max} prompt tokens for this model ({} here)",
            ids.len()
        )));
    }
    if let Some(a) = &req.adapter {
        a.check().map_err(PipelineError::BadRequest)?;
    }
    let stop_ids = text.tokenizer().eos_ids().to_vec();
    let mut params = to_seq_params(&req, &stop_ids);
    if req.score_prompt {
        params.score_prompt = ids.clone();
    }
    let prompt_tokens = ids.len();
    let prompt_token_ids = ids.clone();
    let context = text.context_length();
    let (tok_tx, tok_rx) = mpsc::unbounded_channel::<SeqOut>();
    let started = Instant::now();
    let adapter = req.adapter.clone();
    let first = match launch(
        service,
        ids.clone(),
        params.clone(),
        adapter.as_ref(),
        tok_tx.clone(),
    )
    .await
    {
        // The placement changed under the request (a re-placement's
        // switch-over): the new one takes it.
        Err((e, tried))
            if !matches!(e, PipelineError::BadRequest(_))
                && service.active().is_some_and(|a| a.id != tried) =>
        {
            debug!("placement {tried} refused a request ({e}); the newer one takes it");
            launch(
                service,
                ids.clone(),
                params.clone(),
                adapter.as_ref(),
                tok_tx,
            )
            .await
            .map_err(|(e, _)| e)?
        }
        other => other.map_err(|(e, _)| e)?,
    };
    let queue_secs = started.elapsed().as_secs_f64();
    let model_name = first.model.clone();
    let (tx, rx) = mpsc::channel(256);
    let tokenizer = model.clone();
    let service = service.clone();
    tokio::spawn(async move {
        let mut tok_rx = tok_rx;
        let mut run = first;
        let mut replays = 0;
        let mut stream = TextStream::new(req.stop.clone());
        let mut out: Vec<u32> = Vec::new();
        let mut first_at: Option<Instant> = None;
        let mut scored = false;
        let finish = 'outer: loop {
            let failed = match tok_rx.recv().await {
                None => "the pipeline closed the sequence".to_string(),
                Some(SeqOut::Failed(why)) => why,
                Some(SeqOut::Tokens(tokens)) => {
                    run.ticket.tokens(tokens.len());
                    let mut failed = None;
                    for mut t in tokens {
                        first_at.get_or_insert_with(Instant::now);
                        if t.finish == Finish::Failed {
                            failed = Some("a stage failed on this sequence".to_string());
                            break;
                        }
                        // The prompt's scores came with the first token,
                        // even one that ends the sequence.
                        if req.score_prompt && !scored {
                            scored = true;
                            let logprobs = std::mem::take(&mut t.prompt_logprobs);
                            let ev = GenEvent::Prompt {
                                ids: prompt_token_ids.clone(),
                                logprobs,
                            };
                            if tx.send(ev).await.is_err() {
                                break 'outer Err("the client went away".into());
                            }
                        }
                        if t.finish == Finish::Stop {
                            break 'outer Ok(FinishReason::Stop);
                        }
                        out.push(t.token);
                        let tok = tokenizer.text.tokenizer();
                        let decoded = if req.special_text {
                            tok.decode_with_special(&out)
                        } else {
                            tok.decode(&out)
                        }
                        .unwrap_or_default();
                        let (piece, stopped) = stream.update(decoded);
                        if tx
                            .send(GenEvent::Token {
                                id: t.token,
                                text: piece,
                                logprobs: t.logprobs,
                            })
                            .await
                            .is_err()
                        {
                            break 'outer Err("the client went away".into());
                        }
                        if stopped {
                            break 'outer Ok(FinishReason::Stop);
                        }
                        if let Some(r) = finish_reason(t.finish) {
                            break 'outer Ok(r);
                        }
                    }
                    match failed {
                        Some(f) => f,
                        None => continue,
                    }
                }
            };
            // The pipeline failed under the sequence. When a re-placement's
            // switch-over took its stages (a newer placement is active), it
            // moves to the new placement, replaying its prompt and what it
            // already produced, for what is left of its length. A stage
            // that died fails it at once (the leader re-plans meanwhile).
            let remaining = (params.max_tokens as usize).saturating_sub(out.len());
            let prefix: Vec<u32> = prompt_token_ids.iter().chain(&out).copied().collect();
            if replays >= MAX_REPLAYS
                || remaining == 0
                || prefix.len() >= context
                || prefix.len() > limits::MAX_PROMPT_TOKENS
            {
                break Err(failed);
            }
            if let Some(c) = run.cancel.take() {
                c();
            }
            // A switch-over in progress finishes.
            tokio::time::sleep(REPLAY_PAUSE).await;
            if service.active().is_none_or(|a| a.id <= run.placement) {
                break Err(failed);
            }
            replays += 1;
            let mut p = params.clone();
            p.max_tokens = remaining as u32;
            p.history = out.clone();
            // The prompt's scores came with the first token, if it came.
            if scored {
                p.score_prompt.clear();
            }
            let (again_tx, again_rx) = mpsc::unbounded_channel::<SeqOut>();
            match launch(&service, prefix, p, adapter.as_ref(), again_tx).await {
                Ok(next) => {
                    debug!(
                        "a sequence's pipeline failed ({failed}); replayed {} tokens on placement {}",
                        out.len(),
                        next.placement
                    );
                    run = next;
                    tok_rx = again_rx;
                }
                Err((e, _)) => break Err(format!("{failed}; moving it failed: {e}")),
            }
        };
        let ended = Instant::now();
        match finish {
            Ok(reason) => {
                // A stop string ends it early: tell stage 0.
                if let Some(c) = run.cancel.take() {
                    c();
                }
                let rest = stream.flush();
                if !rest.is_empty() {
                    let _ = tx.send(GenEvent::Text(rest)).await;
                }
                let first = first_at.unwrap_or(ended);
                let _ = tx
                    .send(GenEvent::Done(GenSummary {
                        model: model_name,
                        text: stream.text().to_string(),
                        prompt_token_ids,
                        token_ids: out,
                        finish_reason: reason,
                        prompt_tokens,
                        prefill_secs: (first - started).as_secs_f64(),
                        queue_secs,
                        decode_secs: (ended - first).as_secs_f64(),
                        placement: run.placement,
                        stages: run.stages,
                    }))
                    .await;
            }
            Err(why) => {
                if let Some(c) = run.cancel.take() {
                    c();
                }
                let _ = tx.send(GenEvent::Failed(why)).await;
            }
        }
    });
    Ok(rx)
}

/// Times a sequence whose pipeline a switch-over took is moved to the
/// newer placement (its prefix replayed).
const MAX_REPLAYS: usize = 2;

/// Pause before a replay, for a switch-over in progress to finish.
const REPLAY_PAUSE: Duration = Duration::from_millis(200);

/// A sequence started on a pipeline.
struct Launched {
    /// Stops it at stage 0 (taken when used).
    cancel: Option<Box<dyn FnOnce() + Send>>,
    ticket: balance::Ticket,
    /// The placement and its model, and the stages of the pipeline taken.
    placement: u64,
    model: String,
    stages: usize,
}

/// Starts `ids` on the active placement: on the pipeline or a replica,
/// whichever adds most; a replica that cannot take it after all leaves it
/// to the pipeline. An error names the placement tried.
async fn launch(
    service: &Service,
    ids: Vec<u32>,
    params: SeqParams,
    adapter: Option<&crate::adapters::AdapterRef>,
    tok_tx: mpsc::UnboundedSender<SeqOut>,
) -> Result<Launched, (PipelineError, u64)> {
    let placement = service.active().ok_or((PipelineError::NotReady, 0))?;
    let id = placement.id;
    // Every member of the placement holds its slice of the adapter first;
    // a replica that cannot leaves the request to the others.
    let unable = match adapter {
        Some(a) => crate::adapters::ensure_prepared(service, &placement, a)
            .await
            .map_err(|e| (e, id))?,
        None => Default::default(),
    };
    let reachable = |n: &str| {
        n == service.me()
            || n.parse::<NodeId>()
                .ok()
                .and_then(|id| service.endpoint().peer(id))
                .is_some()
    };
    let candidates = balance::candidates(&placement, |n| reachable(n) && !unable.contains(n));
    let mut ticket = service
        .balancer()
        .choose(id, &candidates)
        .ok_or((PipelineError::NotReady, id))?;
    let main = &placement.stages[0].node_id;
    let started = start(
        service,
        &placement,
        ticket.node(),
        ids.clone(),
        params.clone(),
        tok_tx.clone(),
    )
    .await;
    let cancel = match started {
        Err(e) if ticket.node() != main => {
            debug!(
                "replica {} refused a request ({e}); the pipeline takes it",
                ticket.node()
            );
            drop(ticket);
            ticket = service
                .balancer()
                .choose(id, &candidates[..1])
                .ok_or((PipelineError::NotReady, id))?;
            start(service, &placement, main, ids, params, tok_tx)
                .await
                .map_err(|e| (e, id))?
        }
        other => other.map_err(|e| (e, id))?,
    };
    let stages = if ticket.node() == main {
        placement.stages.len()
    } else {
        1
    };
    Ok(Launched {
        cancel: Some(cancel),
        ticket,
        placement: id,
        model: adapter.map_or_else(|| placement.model.clone(), |a| a.name.clone()),
        stages,
    })
}

/// Hands the request to the first stage of a pipeline on `node` (this
/// node's router, or a peer's over a `GENERATE` stream); returns what
/// cancels it.
async fn start(
    service: &Service,
    placement: &super::Placement,
    node: &str,
    ids: Vec<u32>,
    params: SeqParams,
    tok_tx: mpsc::UnboundedSender<SeqOut>,
) -> Result<Box<dyn FnOnce() + Send>, PipelineError> {
    if node == service.me() {
        let stage = service.stage(placement.id).ok_or(PipelineError::NotReady)?;
        let router = stage.router.clone().ok_or(PipelineError::NotReady)?;
        let (reply, rx) = oneshot::channel();
        router
            .send(RouterMsg::Admit {
                prompt: ids,
                params,
                sink: tok_tx,
                reply,
            })
            .map_err(|_| PipelineError::NotReady)?;
        let seq = rx.await.map_err(|_| PipelineError::NotReady)??;
        Ok(Box::new(move || {
            let _ = router.send(RouterMsg::Cancel(seq));
        }))
    } else {
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        remote(service, node, placement.id, ids, params, tok_tx, stop_rx).await?;
        Ok(Box::new(move || {
            let _ = stop_tx.send(());
        }))
    }
}

/// Sends the request to the member running stage 0 and relays its tokens
/// to `sink` until the sequence ends or `stop` fires.
async fn remote(
    service: &Service,
    node: &str,
    placement: u64,
    prompt: Vec<u32>,
    params: SeqParams,
    sink: mpsc::UnboundedSender<SeqOut>,
    mut stop: oneshot::Receiver<()>,
) -> Result<(), PipelineError> {
    let id: NodeId = node
        .parse()
        .map_err(|e| PipelineError::Failed(format!("node id {node}: {e}")))?;
    let conn = service.endpoint().peer(id).ok_or_else(|| {
        PipelineError::Failed(format!("no connection to stage 0 ({})", id.short()))
    })?;
    let (mut send, mut recv) = conn
        .open(stream_kind::GENERATE)
        .await
        .map_err(|e| PipelineError::Failed(e.to_string()))?;
    write_message(
        &mut send,
        &Message::Generate(Box::new(GenerateRequest {
            placement,
            prompt,
            params,
        })),
    )
    .await
    .map_err(|e| PipelineError::Failed(e.to_string()))?;
    // The first reply says whether the request was admitted.
    let first = tokio::time::timeout(
        Duration::from_secs(10),
        read_message(&mut recv, limits::MAX_CONTROL_FRAME),
    )
    .await
    .map_err(|_| PipelineError::Failed("stage 0 did not answer".into()))?
    .map_err(|e| PipelineError::Failed(e.to_string()))?;
    let first = match first {
        Some(Message::Sampled { tokens, .. }) => tokens,
        Some(Message::Refuse(r)) => return Err(refused(&r)),
        Some(other) => {
            return Err(PipelineError::Failed(format!(
                "stage 0 answered with {}",
                other.name()
            )));
        }
        None => return Err(PipelineError::Failed("stage 0 closed the request".into())),
    };
    tokio::spawn(async move {
        if !first.is_empty() && sink.send(SeqOut::Tokens(first)).is_err() {
            return;
        }
        loop {
            let msg = tokio::select! {
                m = read_message(&mut recv, limits::MAX_CONTROL_FRAME) => m,
                _ = &mut stop => {
                    let _ = send.reset(0u32.into());
                    return;
                }
            };
            let out = match msg {
                Ok(Some(Message::Sampled { tokens, .. })) => SeqOut::Tokens(tokens),
                Ok(Some(Message::Refuse(r))) => SeqOut::Failed(refused(&r).to_string()),
                Ok(Some(other)) => SeqOut::Failed(format!("stage 0 sent {}", other.name())),
                Ok(None) => return,
                Err(e) => SeqOut::Failed(format!("lost stage 0: {e}")),
            };
            let end = matches!(out, SeqOut::Failed(_));
            if sink.send(out).is_err() || end {
                return;
            }
        }
    });
    Ok(())
}

fn refused(r: &Refusal) -> PipelineError {
    match r.code {
        refusal::NOT_READY => PipelineError::NotReady,
        refusal::BUSY => PipelineError::Busy(super::MAX_IN_FLIGHT),
        refusal::BAD_REQUEST => PipelineError::BadRequest(r.reason.clone()),
        _ => PipelineError::Failed(r.reason.clone()),
    }
}

/// Stage 0's side of a `GENERATE` stream: admit, then stream the tokens;
/// the requester closing the stream cancels the sequence.
pub(crate) async fn serve(stream: IncomingStream, service: Service) {
    let IncomingStream {
        peer,
        mut send,
        mut recv,
    } = stream;
    let refuse = |code: u16, reason: String| Message::Refuse(Refusal { code, reason });
    let req = match tokio::time::timeout(
        Duration::from_secs(10),
        read_message(&mut recv, limits::MAX_FRAME),
    )
    .await
    {
        Ok(Ok(Some(Message::Generate(g)))) => *g,
        Ok(Ok(other)) => {
            debug!("generate stream from {}: {other:?}", peer.node_id.short());
            let _ = write_message(
                &mut send,
                &refuse(refusal::BAD_REQUEST, "expected a generate request".into()),
            )
            .await;
            let _ = send.finish();
            return;
        }
        Ok(Err(e)) => {
            let _ = write_message(&mut send, &refuse(refusal::BAD_REQUEST, e.to_string())).await;
            let _ = send.finish();
            return;
        }
        Err(_) => return,
    };
    let router = service
        .stage(req.placement)
        .filter(|s| s.index == 0)
        .and_then(|s| s.router.clone());
    let Some(router) = router else {
        let _ = write_message(
            &mut send,
            &refuse(
                refusal::NOT_READY,
                "no stage 0 of that placement here".into(),
            ),
        )
        .await;
        let _ = send.finish();
        return;
    };
    let vocab = service.model().map_or(0, |m| m.info.config.vocab_size);
    if let Some(bad) = req.prompt.iter().find(|&&id| id as usize >= vocab) {
        let why = format!("token id {bad} is outside the model's vocabulary of {vocab}");
        let _ = write_message(&mut send, &refuse(refusal::BAD_REQUEST, why)).await;
        let _ = send.finish();
        return;
    }
    if req.prompt.is_empty() {
        let _ = write_message(
            &mut send,
            &refuse(refusal::BAD_REQUEST, "empty prompt".into()),
        )
        .await;
        let _ = send.finish();
        return;
    }
    let (tok_tx, mut tok_rx) = mpsc::unbounded_channel();
    let (reply, rx) = oneshot::channel();
    if router
        .send(RouterMsg::Admit {
            prompt: req.prompt,
            params: req.params,
            sink: tok_tx,
            reply,
        })
        .is_err()
    {
        let _ = write_message(
            &mut send,
            &refuse(refusal::NOT_READY, "the stage stopped".into()),
        )
        .await;
        return;
    }
    let seq = match rx.await {
        Ok(Ok(seq)) => seq,
        Ok(Err(e)) => {
            // Nothing was admitted: the requester may take it elsewhere.
            let code = match e {
                PipelineError::Busy(_) => refusal::BUSY,
                PipelineError::BadRequest(_) => refusal::BAD_REQUEST,
                _ => refusal::NOT_READY,
            };
            let _ = write_message(&mut send, &refuse(code, e.to_string())).await;
            let _ = send.finish();
            return;
        }
        Err(_) => {
            // The stage stopped (a switch-over dropped it) before answering.
            let _ = write_message(
                &mut send,
                &refuse(refusal::NOT_READY, "the stage stopped".into()),
            )
            .await;
            let _ = send.finish();
            return;
        }
    };
    // Admitted: say so at once with an empty batch.
    let placement = req.placement;
    let ack = Message::Sampled {
        placement,
        tokens: Vec::new(),
    };
    if write_message(&mut send, &ack).await.is_err() {
        let _ = router.send(RouterMsg::Cancel(seq));
        return;
    }
    let mut probe = [0u8; 1];
    loop {
        tokio::select! {
            out = tok_rx.recv() => {
                let msg = match out {
                    Some(SeqOut::Tokens(tokens)) => {
                        let done = tokens.iter().any(|t: &SampledToken| t.finish != Finish::No);
                        let m = Message::Sampled { placement, tokens };
                        if write_message(&mut send, &m).await.is_err() {
                            let _ = router.send(RouterMsg::Cancel(seq));
                            return;
                        }
                        if done {
                            let _ = send.finish();
                            return;
                        }
                        continue;
                    }
                    Some(SeqOut::Failed(why)) => refuse(refusal::FAILED, why),
                    None => refuse(refusal::FAILED, "the stage stopped".into()),
                };
                let _ = write_message(&mut send, &msg).await;
                let _ = send.finish();
                return;
            }
            // The requester sends nothing more: any end of its side
            // (finish, reset, lost connection) cancels.
            _ = recv.read(&mut probe) => {
                debug!(seq, "requester closed the stream: cancelling");
                let _ = router.send(RouterMsg::Cancel(seq));
                return;
            }
        }
    }
}
