//! Messages of the inference pipeline: a request entering stage 0,
//! activations going stage to stage, sampled tokens coming back from the
//! last stage, and sequences ending. Every list is bounded by a named limit.

use crate::message::{Reader, put_blob};
use crate::tensor::TensorFrame;
use crate::{ProtoError, limits};

/// How one sequence is sampled and when it stops; travels with the
/// sequence's first chunk to the last stage, which owns its sampler.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct SeqParams {
    /// 0 is greedy.
    pub temperature: f32,
    pub top_p: f32,
    /// 0 is off.
    pub top_k: u32,
    pub seed: u64,
    /// Most tokens to generate.
    pub max_tokens: u32,
    /// Tokens that end the sequence (not part of the output); at most
    /// [`limits::MAX_STOP_IDS`].
    pub stop_ids: Vec<u32>,
    /// Subtracted once from a token's logit when it was generated before
    /// (OpenAI's `presence_penalty`, -2..=2).
    pub presence_penalty: f32,
    /// Subtracted per earlier occurrence (`frequency_penalty`, -2..=2).
    pub frequency_penalty: f32,
    /// Added to a token's logit (`logit_bias`, -100..=100); at most
    /// [`limits::MAX_LOGIT_BIAS`] entries.
    pub logit_bias: Vec<(u32, f32)>,
    /// Return each token's log-probability and this many alternatives
    /// (`None`: none; at most [`limits::MAX_TOP_LOGPROBS`]).
    pub logprobs: Option<u8>,
    /// A constraint on the output: an llguidance grammar as JSON (a JSON
    /// schema, a Lark grammar or a regex), at most [`limits::MAX_GRAMMAR`]
    /// bytes.
    pub grammar: Option<String>,
    /// Tokens this sequence already generated, ending its prompt (a
    /// sequence moved to a new placement): the sampler's penalties and
    /// constraint take them as drawn. At most [`limits::MAX_PROMPT_TOKENS`].
    pub history: Vec<u32>,
    /// The prompt's tokens, when their log-probabilities are asked for
    /// (with `logprobs` alternatives each); empty otherwise. At most
    /// [`limits::MAX_SCORED_PROMPT`].
    pub score_prompt: Vec<u32>,
    /// The LoRA adapter this sequence runs with, by id (the lower-case hex
    /// BLAKE3 of its files, [`limits::ADAPTER_ID_LEN`] characters); `None`:
    /// the base model. Each stage applies its slice of it.
    pub adapter: Option<String>,
}

/// Checks an adapter id: [`limits::ADAPTER_ID_LEN`] lower-case hex digits.
pub fn check_adapter_id(id: &str) -> Result<(), ProtoError> {
    if id.len() != limits::ADAPTER_ID_LEN
        || !id
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        return Err(ProtoError::InvalidField {
            what: "adapter",
            detail: format!(
                "an adapter id is {} lower-case hex digits",
                limits::ADAPTER_ID_LEN
            ),
        });
    }
    Ok(())
}

/// The tokens of one sequence in a batch: `len` tokens from position `pos`.
#[derive(Debug, Clone, PartialEq)]
pub struct SeqChunk {
    pub seq: u64,
    pub pos: u32,
    pub len: u32,
    /// Present on the sequence's first chunk (its prompt).
    pub params: Option<SeqParams>,
}

/// Why a sequence ended, as the last stage (or a failing stage) says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finish {
    /// Not finished: the token is fed back for the next step.
    No,
    /// The token is an end token and not part of the output.
    Stop,
    /// The token is the last one (token limit or context length).
    Length,
    /// A stage failed on this sequence; the token is meaningless.
    Failed,
}

impl Finish {
    fn code(self) -> u8 {
        match self {
            Self::No => 0,
            Self::Stop => 1,
            Self::Length => 2,
            Self::Failed => 3,
        }
    }

    fn from_code(c: u8) -> Result<Self, ProtoError> {
        Ok(match c {
            0 => Self::No,
            1 => Self::Stop,
            2 => Self::Length,
            3 => Self::Failed,
            other => {
                return Err(ProtoError::InvalidField {
                    what: "finish",
                    detail: format!("code {other}"),
                });
            }
        })
    }
}

/// A token sampled for one sequence at position `pos`.
#[derive(Debug, Clone, PartialEq)]
pub struct SampledToken {
    pub seq: u64,
    pub pos: u32,
    pub token: u32,
    pub finish: Finish,
    /// Present when the sequence asked for log-probabilities.
    pub logprobs: Option<TokenLogprobs>,
    /// With a sequence's first token, when it asked for its prompt scored:
    /// each prompt token's log-probability after the ones before it (from
    /// the second token on). At most [`limits::MAX_SCORED_PROMPT`].
    pub prompt_logprobs: Vec<TokenLogprobs>,
}

/// A sampled token's log-probability under the model, and the most likely
/// tokens at that position with theirs (most likely first).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct TokenLogprobs {
    pub logprob: f32,
    /// At most [`limits::MAX_TOP_LOGPROBS`].
    pub top: Vec<(u32, f32)>,
}

/// Hidden states of a batch from one stage to the next: the chunks in
/// order, and `hidden` of shape `[sum of len, hidden_size]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Forward {
    /// Which placement (layer assignment) the batch runs on.
    pub placement: u64,
    pub chunks: Vec<SeqChunk>,
    pub hidden: TensorFrame,
}

/// A generation request to stage 0: the prompt's token ids and how to sample.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerateRequest {
    pub placement: u64,
    /// At most [`limits::MAX_PROMPT_TOKENS`].
    pub prompt: Vec<u32>,
    pub params: SeqParams,
}

pub(crate) fn bounded(what: &'static str, n: usize, max: usize) -> Result<(), ProtoError> {
    if n > max {
        return Err(ProtoError::InvalidField {
            what,
            detail: format!("{n} entries, at most {max}"),
        });
    }
    Ok(())
}

pub(crate) fn put_u32s(
    out: &mut Vec<u8>,
    what: &'static str,
    v: &[u32],
    max: usize,
) -> Result<(), ProtoError> {
    bounded(what, v.len(), max)?;
    out.extend_from_slice(&(v.len() as u32).to_le_bytes());
    v.iter()
        .for_each(|x| out.extend_from_slice(&x.to_le_bytes()));
    Ok(())
}

pub(crate) fn get_u32s(
    r: &mut Reader<'_>,
    what: &'static str,
    max: usize,
) -> Result<Vec<u32>, ProtoError> {
    let n = r.u32(what)? as usize;
    bounded(what, n, max)?;
    // Check the bytes are there before allocating.
    let bytes = r.take(what, n * 4)?;
    Ok(bytes
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect())
}

fn finite(what: &'static str, v: f32) -> Result<f32, ProtoError> {
    if !v.is_finite() {
        return Err(ProtoError::InvalidField {
            what,
            detail: format!("{v} is not finite"),
        });
    }
    Ok(v)
}

/// A log-probability: finite or minus infinity (a token masked out).
fn logprob(what: &'static str, v: f32) -> Result<f32, ProtoError> {
    if v.is_nan() || v > 0.0 || v == f32::INFINITY {
        return Err(ProtoError::InvalidField {
            what,
            detail: format!("{v} is not a log-probability"),
        });
    }
    Ok(v)
}

fn within(what: &'static str, v: f32, bound: f32) -> Result<f32, ProtoError> {
    if !(v.is_finite() && v.abs() <= bound) {
        return Err(ProtoError::InvalidField {
            what,
            detail: format!("{v} is outside -{bound}..={bound}"),
        });
    }
    Ok(v)
}

impl SeqParams {
    pub(crate) fn encode(&self, out: &mut Vec<u8>) -> Result<(), ProtoError> {
        out.extend_from_slice(&finite("temperature", self.temperature)?.to_le_bytes());
        out.extend_from_slice(&finite("top_p", self.top_p)?.to_le_bytes());
        out.extend_from_slice(&self.top_k.to_le_bytes());
        out.extend_from_slice(&self.seed.to_le_bytes());
        out.extend_from_slice(&self.max_tokens.to_le_bytes());
        put_u32s(out, "stop ids", &self.stop_ids, limits::MAX_STOP_IDS)?;
        for (what, v) in [
            ("presence_penalty", self.presence_penalty),
            ("frequency_penalty", self.frequency_penalty),
        ] {
            out.extend_from_slice(&within(what, v, 2.0)?.to_le_bytes());
        }
        bounded("logit bias", self.logit_bias.len(), limits::MAX_LOGIT_BIAS)?;
        out.extend_from_slice(&(self.logit_bias.len() as u32).to_le_bytes());
        for (t, b) in &self.logit_bias {
            out.extend_from_slice(&t.to_le_bytes());
            out.extend_from_slice(&within("logit bias", *b, 100.0)?.to_le_bytes());
        }
        match self.logprobs {
            None => out.push(0),
            Some(n) => {
                bounded("top logprobs", n as usize, limits::MAX_TOP_LOGPROBS)?;
                out.push(1);
                out.push(n);
            }
        }
        match &self.grammar {
            None => out.push(0),
            Some(g) => {
                out.push(1);
                put_blob(out, "grammar", g.as_bytes(), limits::MAX_GRAMMAR)?;
            }
        }
        put_u32s(out, "history", &self.history, limits::MAX_PROMPT_TOKENS)?;
        put_u32s(
            out,
            "scored prompt",
            &self.score_prompt,
            limits::MAX_SCORED_PROMPT,
        )?;
        match &self.adapter {
            None => out.push(0),
            Some(a) => {
                check_adapter_id(a)?;
                out.push(1);
                out.extend_from_slice(a.as_bytes());
            }
        }
        Ok(())
    }

    pub(crate) fn decode(r: &mut Reader<'_>) -> Result<Self, ProtoError> {
        let temperature = finite("temperature", f32::from_le_bytes(r.array("params")?))?;
        let top_p = finite("top_p", f32::from_le_bytes(r.array("params")?))?;
        let top_k = r.u32("params")?;
        let seed = r.u64("params")?;
        let max_tokens = r.u32("params")?;
        let stop_ids = get_u32s(r, "stop ids", limits::MAX_STOP_IDS)?;
        let presence_penalty = within(
            "presence_penalty",
            f32::from_le_bytes(r.array("params")?),
            2.0,
        )?;
        let frequency_penalty = within(
            "frequency_penalty",
            f32::from_le_bytes(r.array("params")?),
            2.0,
        )?;
        let n = r.u32("logit bias")? as usize;
        bounded("logit bias", n, limits::MAX_LOGIT_BIAS)?;
        // The bytes are there before anything is allocated.
        let bytes = r.take("logit bias", n * 8)?;
        let mut logit_bias = Vec::with_capacity(n);
        for c in bytes.chunks_exact(8) {
            let t = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            let b = f32::from_le_bytes([c[4], c[5], c[6], c[7]]);
            logit_bias.push((t, within("logit bias", b, 100.0)?));
        }
        let logprobs = match r.u8("logprobs flag")? {
            0 => None,
            1 => {
                let n = r.u8("top logprobs")?;
                bounded("top logprobs", n as usize, limits::MAX_TOP_LOGPROBS)?;
                Some(n)
            }
            other => {
                return Err(ProtoError::InvalidField {
                    what: "logprobs flag",
                    detail: format!("{other}"),
                });
            }
        };
        let grammar = match r.u8("grammar flag")? {
            0 => None,
            1 => {
                let bytes = r.blob("grammar", limits::MAX_GRAMMAR)?;
                Some(
                    String::from_utf8(bytes)
                        .map_err(|_| ProtoError::BadUtf8 { what: "grammar" })?,
                )
            }
            other => {
                return Err(ProtoError::InvalidField {
                    what: "grammar flag",
                    detail: format!("{other}"),
                });
            }
        };
        let history = get_u32s(r, "history", limits::MAX_PROMPT_TOKENS)?;
        let score_prompt = get_u32s(r, "scored prompt", limits::MAX_SCORED_PROMPT)?;
        let adapter = match r.u8("adapter flag")? {
            0 => None,
            1 => {
                let bytes = r.take("adapter", limits::ADAPTER_ID_LEN)?;
                let id = String::from_utf8(bytes.to_vec())
                    .map_err(|_| ProtoError::BadUtf8 { what: "adapter" })?;
                check_adapter_id(&id)?;
                Some(id)
            }
            other => {
                return Err(ProtoError::InvalidField {
                    what: "adapter flag",
                    detail: format!("{other}"),
                });
            }
        };
        Ok(Self {
            score_prompt,
            adapter,
            temperature,
            top_p,
            top_k,
            seed,
            max_tokens,
            stop_ids,
            history,
            presence_penalty,
            frequency_penalty,
            logit_bias,
            logprobs,
            grammar,
        })
    }
}

impl Forward {
    pub(crate) fn encode(&self, out: &mut Vec<u8>) -> Result<(), ProtoError> {
        bounded("chunks", self.chunks.len(), limits::MAX_BATCH_SEQS)?;
        out.extend_from_slice(&self.placement.to_le_bytes());
        out.extend_from_slice(&(self.chunks.len() as u32).to_le_bytes());
        for c in &self.chunks {
            out.extend_from_slice(&c.seq.to_le_bytes());
            out.extend_from_slice(&c.pos.to_le_bytes());
            out.extend_from_slice(&c.len.to_le_bytes());
            match &c.params {
                None => out.push(0),
                Some(p) => {
                    out.push(1);
                    p.encode(out)?;
                }
            }
        }
        self.hidden.encode(out)
    }

    pub(crate) fn decode(r: &mut Reader<'_>) -> Result<Self, ProtoError> {
        let placement = r.u64("forward")?;
        let n = r.u32("forward")? as usize;
        bounded("chunks", n, limits::MAX_BATCH_SEQS)?;
        let mut chunks = Vec::with_capacity(n.min(64));
        for _ in 0..n {
            let seq = r.u64("chunk")?;
            let pos = r.u32("chunk")?;
            let len = r.u32("chunk")?;
            let params = match r.u8("chunk")? {
                0 => None,
                1 => Some(SeqParams::decode(r)?),
                other => {
                    return Err(ProtoError::InvalidField {
                        what: "chunk params flag",
                        detail: format!("{other}"),
                    });
                }
            };
            chunks.push(SeqChunk {
                seq,
                pos,
                len,
                params,
            });
        }
        let hidden = TensorFrame::decode(r)?;
        let tokens: u64 = chunks.iter().map(|c| u64::from(c.len)).sum();
        if hidden.shape.len() != 2 || u64::from(hidden.shape[0]) != tokens {
            return Err(ProtoError::InvalidField {
                what: "forward hidden states",
                detail: format!("shape {:?} for {tokens} tokens", hidden.shape),
            });
        }
        Ok(Self {
            placement,
            chunks,
            hidden,
        })
    }
}

pub(crate) fn encode_sampled(
    out: &mut Vec<u8>,
    placement: u64,
    tokens: &[SampledToken],
) -> Result<(), ProtoError> {
    bounded("sampled tokens", tokens.len(), limits::MAX_BATCH_SEQS)?;
    out.extend_from_slice(&placement.to_le_bytes());
    out.extend_from_slice(&(tokens.len() as u32).to_le_bytes());
    for t in tokens {
        out.extend_from_slice(&t.seq.to_le_bytes());
        out.extend_from_slice(&t.pos.to_le_bytes());
        out.extend_from_slice(&t.token.to_le_bytes());
        out.push(t.finish.code());
        match &t.logprobs {
            None => out.push(0),
            Some(l) => {
                out.push(1);
                put_logprobs(out, l)?;
            }
        }
        bounded(
            "prompt logprobs",
            t.prompt_logprobs.len(),
            limits::MAX_SCORED_PROMPT,
        )?;
        out.extend_from_slice(&(t.prompt_logprobs.len() as u32).to_le_bytes());
        for l in &t.prompt_logprobs {
            put_logprobs(out, l)?;
        }
    }
    Ok(())
}

fn put_logprobs(out: &mut Vec<u8>, l: &TokenLogprobs) -> Result<(), ProtoError> {
    bounded("top logprobs", l.top.len(), limits::MAX_TOP_LOGPROBS)?;
    out.extend_from_slice(&logprob("logprob", l.logprob)?.to_le_bytes());
    out.push(l.top.len() as u8);
    for (id, lp) in &l.top {
        out.extend_from_slice(&id.to_le_bytes());
        out.extend_from_slice(&logprob("logprob", *lp)?.to_le_bytes());
    }
    Ok(())
}

fn get_logprobs(r: &mut Reader<'_>) -> Result<TokenLogprobs, ProtoError> {
    let lp = logprob("logprob", f32::from_le_bytes(r.array("logprob")?))?;
    let k = r.u8("top logprobs")? as usize;
    bounded("top logprobs", k, limits::MAX_TOP_LOGPROBS)?;
    let mut top = Vec::with_capacity(k);
    for _ in 0..k {
        let id = r.u32("top logprob")?;
        top.push((
            id,
            logprob("logprob", f32::from_le_bytes(r.array("logprob")?))?,
        ));
    }
    Ok(TokenLogprobs { logprob: lp, top })
}

pub(crate) fn decode_sampled(r: &mut Reader<'_>) -> Result<(u64, Vec<SampledToken>), ProtoError> {
    let placement = r.u64("sampled")?;
    let n = r.u32("sampled")? as usize;
    bounded("sampled tokens", n, limits::MAX_BATCH_SEQS)?;
    let mut tokens = Vec::with_capacity(n.min(64));
    for _ in 0..n {
        let seq = r.u64("sampled token")?;
        let pos = r.u32("sampled token")?;
        let token = r.u32("sampled token")?;
        let finish = Finish::from_code(r.u8("sampled token")?)?;
        let logprobs = match r.u8("logprobs flag")? {
            0 => None,
            1 => Some(get_logprobs(r)?),
            other => {
                return Err(ProtoError::InvalidField {
                    what: "logprobs flag",
                    detail: format!("{other}"),
                });
            }
        };
        let n = r.u32("prompt logprobs")? as usize;
        bounded("prompt logprobs", n, limits::MAX_SCORED_PROMPT)?;
        // Each entry is read (and its bytes checked) before the next is
        // kept: what is allocated is what arrived.
        let mut prompt_logprobs = Vec::with_capacity(n.min(256));
        for _ in 0..n {
            prompt_logprobs.push(get_logprobs(r)?);
        }
        tokens.push(SampledToken {
            seq,
            pos,
            token,
            finish,
            logprobs,
            prompt_logprobs,
        });
    }
    Ok((placement, tokens))
}

pub(crate) fn encode_end(
    out: &mut Vec<u8>,
    placement: u64,
    seqs: &[u64],
) -> Result<(), ProtoError> {
    bounded("ended sequences", seqs.len(), limits::MAX_BATCH_SEQS)?;
    out.extend_from_slice(&placement.to_le_bytes());
    out.extend_from_slice(&(seqs.len() as u32).to_le_bytes());
    seqs.iter()
        .for_each(|s| out.extend_from_slice(&s.to_le_bytes()));
    Ok(())
}

pub(crate) fn decode_end(r: &mut Reader<'_>) -> Result<(u64, Vec<u64>), ProtoError> {
    let placement = r.u64("end")?;
    let n = r.u32("end")? as usize;
    bounded("ended sequences", n, limits::MAX_BATCH_SEQS)?;
    let bytes = r.take("end", n * 8)?;
    let seqs = bytes
        .chunks_exact(8)
        .map(|c| u64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
        .collect();
    Ok((placement, seqs))
}

impl GenerateRequest {
    pub(crate) fn encode(&self, out: &mut Vec<u8>) -> Result<(), ProtoError> {
        out.extend_from_slice(&self.placement.to_le_bytes());
        put_u32s(out, "prompt", &self.prompt, limits::MAX_PROMPT_TOKENS)?;
        self.params.encode(out)
    }

    pub(crate) fn decode(r: &mut Reader<'_>) -> Result<Self, ProtoError> {
        Ok(Self {
            placement: r.u64("generate")?,
            prompt: get_u32s(r, "prompt", limits::MAX_PROMPT_TOKENS)?,
            params: SeqParams::decode(r)?,
        })
    }
}
