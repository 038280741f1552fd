//! Token sampling: greedy at temperature 0, otherwise temperature, top-k and
//! top-p (nucleus) over a seeded RNG, so a seed reproduces a generation.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::error::{ModelError, Result};

/// How to pick the next token.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct SamplingParams {
    /// 0 means greedy.
    pub temperature: f32,
    /// Keep the smallest set of tokens whose probability reaches `top_p` (1 = off).
    pub top_p: f32,
    /// Keep the `top_k` most likely tokens (0 = off).
    pub top_k: usize,
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_p: 1.0,
            top_k: 0,
            seed: 0,
        }
    }
}

impl SamplingParams {
    /// Rejects values no sampler can honour.
    pub fn validate(&self) -> Result<()> {
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            return Err(ModelError::BadSampling(format!(
                "temperature must be >= 0, got {}",
                self.temperature
            )));
        }
        if !self.top_p.is_finite() || self.top_p <= 0.0 || self.top_p > 1.0 {
            return Err(ModelError::BadSampling(format!(
                "top_p must be in (0, 1], got {}",
                self.top_p
            )));
        }
        Ok(())
    }
}

/// What shapes the logits before a token is drawn, as OpenAI's API defines
/// it: `logit[t] += bias[t] - count[t] * frequency - (count[t] > 0) * presence`,
/// where `count[t]` is how often `t` was generated before in the sequence.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Shaping {
    /// -2..=2.
    pub presence_penalty: f32,
    /// -2..=2.
    pub frequency_penalty: f32,
    /// Token and bias (-100..=100); ids outside the vocabulary are ignored.
    pub logit_bias: Vec<(u32, f32)>,
}

impl Shaping {
    pub fn validate(&self) -> Result<()> {
        for (name, v) in [
            ("presence_penalty", self.presence_penalty),
            ("frequency_penalty", self.frequency_penalty),
        ] {
            if !(v.is_finite() && (-2.0..=2.0).contains(&v)) {
                return Err(ModelError::BadSampling(format!(
                    "{name} must be between -2 and 2, got {v}"
                )));
            }
        }
        if let Some((t, b)) = self
            .logit_bias
            .iter()
            .find(|(_, b)| !(b.is_finite() && (-100.0..=100.0).contains(b)))
        {
            return Err(ModelError::BadSampling(format!(
                "logit_bias of token {t} must be between -100 and 100, got {b}"
            )));
        }
        Ok(())
    }

    fn is_identity(&self) -> bool {
        self.presence_penalty == 0.0 && self.frequency_penalty == 0.0 && self.logit_bias.is_empty()
    }
}

/// A limit on what may be generated next (a grammar): the sampler draws
/// only among the tokens it allows, and tells it each token drawn.
pub trait Constraint: Send + std::fmt::Debug {
    /// The tokens allowed next, as a bit set over the vocabulary (bit `t %
    /// 32` of word `t / 32`), and whether the output may end here.
    fn allowed(&mut self) -> std::result::Result<Allowed, String>;
    /// Takes the drawn token (not an end token).
    fn accept(&mut self, token: u32) -> std::result::Result<(), String>;
}

/// What a [`Constraint`] allows next.
#[derive(Debug, Clone)]
pub struct Allowed {
    pub words: Vec<u32>,
    /// Whether an end token may come next.
    pub end: bool,
}

impl Allowed {
    pub fn allows(&self, t: u32) -> bool {
        self.words
            .get(t as usize / 32)
            .is_some_and(|w| w >> (t % 32) & 1 == 1)
    }
}

/// A drawn token, with its log-probability and the most likely tokens'
/// when they were asked for.
#[derive(Debug, Clone, PartialEq)]
pub struct Pick {
    pub token: u32,
    /// The token's log-probability under the model (its raw logits, before
    /// penalties, bias, constraint or temperature), and the `n` most likely
    /// tokens with theirs, most likely first.
    pub logprobs: Option<(f32, Vec<(u32, f32)>)>,
}

/// A seeded sampler for one sequence.
#[derive(Debug)]
pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
    shaping: Shaping,
    /// How often each token was drawn (for the penalties).
    counts: std::collections::HashMap<u32, u32>,
    logprobs: Option<usize>,
    constraint: Option<Box<dyn Constraint>>,
    /// Tokens that end the sequence: allowed when the constraint may end.
    ends: Vec<u32>,
    scratch: Vec<f32>,
}

/// Index of the largest value; the first one on ties (as llama.cpp's greedy sampler).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in logits.iter().enumerate() {
        if v > logits[best] {
            best = i;
        }
    }
    best as u32
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Result<Self> {
        params.validate()?;
        Ok(Self {
            params,
            rng: StdRng::seed_from_u64(params.seed),
            shaping: Shaping::default(),
            counts: Default::default(),
            logprobs: None,
            constraint: None,
            ends: Vec::new(),
            scratch: Vec::new(),
        })
    }

    /// Penalties and bias applied to every draw.
    pub fn with_shaping(mut self, shaping: Shaping) -> Result<Self> {
        shaping.validate()?;
        self.shaping = shaping;
        Ok(self)
    }

    /// Reports each token's log-probability and the `top` most likely.
    pub fn with_logprobs(mut self, top: usize) -> Self {
        self.logprobs = Some(top);
        self
    }

    /// Draws only what `constraint` allows; `ends` are the tokens that end
    /// the sequence, allowed when the constraint may end.
    pub fn with_constraint(mut self, constraint: Box<dyn Constraint>, ends: &[u32]) -> Self {
        self.constraint = Some(constraint);
        self.ends = ends.to_vec();
        self
    }

    /// Takes `tokens` as already drawn (a sequence resumed elsewhere): the
    /// penalties count them and the constraint advances over them.
    pub fn replay(&mut self, tokens: &[u32]) -> std::result::Result<(), String> {
        for &t in tokens {
            if let Some(c) = self.constraint.as_mut() {
                c.accept(t)?;
            }
            *self.counts.entry(t).or_insert(0) += 1;
            // Each sampled draw takes one number from the generator: the
            // resumed sequence goes on where the seed's stream would be.
            if self.params.temperature > 0.0 {
                let _: f32 = self.rng.random();
            }
        }
        Ok(())
    }

    /// Picks a token from one row of logits (penalties, bias, constraint
    /// and temperature applied), and records it.
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        match self.pick(logits) {
            Ok(p) => p.token,
            Err(_) => self.ends.first().copied().unwrap_or_else(|| argmax(logits)),
        }
    }

    /// As [`Sampler::sample`], with log-probabilities when asked for; an
    /// error when the constraint failed (its state is broken).
    pub fn pick(&mut self, logits: &[f32]) -> std::result::Result<Pick, String> {
        let logprobs = self.logprobs.map(|n| top_logprobs(logits, n));
        let token = if self.shaping.is_identity() && self.constraint.is_none() {
            self.draw(logits)
        } else {
            let mut row = std::mem::take(&mut self.scratch);
            row.clear();
            row.extend_from_slice(logits);
            let token = self.shape(&mut row).map(|()| self.draw(&row));
            self.scratch = row;
            token?
        };
        if !self.ends.contains(&token) {
            if let Some(c) = self.constraint.as_mut() {
                c.accept(token)?;
            }
            *self.counts.entry(token).or_insert(0) += 1;
        }
        Ok(Pick {
            token,
            logprobs: logprobs.map(|(lp, top)| (lp(token), top)),
        })
    }

    /// Applies penalties, bias and the constraint's mask to `row`.
    fn shape(&mut self, row: &mut [f32]) -> std::result::Result<(), String> {
        let s = &self.shaping;
        for (&t, &n) in &self.counts {
            if let Some(x) = row.get_mut(t as usize) {
                *x -= n as f32 * s.frequency_penalty + s.presence_penalty;
            }
        }
        for &(t, b) in &s.logit_bias {
            if let Some(x) = row.get_mut(t as usize) {
                *x += b;
            }
        }
        if let Some(c) = self.constraint.as_mut() {
            let allowed = c.allowed()?;
            let ends: Vec<(usize, f32)> = self
                .ends
                .iter()
                .filter_map(|&e| row.get(e as usize).map(|v| (e as usize, *v)))
                .collect();
            for (i, chunk) in row.chunks_mut(32).enumerate() {
                let w = allowed.words.get(i).copied().unwrap_or(0);
                if w == u32::MAX {
                    continue;
                }
                for (b, x) in chunk.iter_mut().enumerate() {
                    if w >> b & 1 == 0 {
                        *x = f32::NEG_INFINITY;
                    }
                }
            }
            for (e, v) in ends {
                row[e] = if allowed.end { v } else { f32::NEG_INFINITY };
            }
            if row.iter().all(|x| *x == f32::NEG_INFINITY) {
                return Err("the constraint allows no token of the vocabulary".into());
            }
        }
        Ok(())
    }

    /// Draws from processed logits.
    fn draw(&mut self, logits: &[f32]) -> u32 {
        let p = self.params;
        if p.temperature <= 0.0 || logits.is_empty() {
            return argmax(logits);
        }
        let mut cand: Vec<(u32, f32)> = logits
            .iter()
            .enumerate()
            .filter(|(_, v)| v.is_finite())
            .map(|(i, &v)| (i as u32, v))
            .collect();
        if cand.is_empty() {
            return argmax(logits);
        }
        let order = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
        if p.top_p >= 1.0 {
            // No nucleus: only the top k (if any) need finding, not a sort
            // of the whole vocabulary (tens of thousands of entries).
            if p.top_k > 0 {
                if p.top_k < cand.len() {
                    cand.select_nth_unstable_by(p.top_k - 1, order);
                    cand.truncate(p.top_k);
                }
                cand.sort_unstable_by(order);
            }
            let max = cand.iter().map(|c| c.1).fold(f32::NEG_INFINITY, f32::max);
            let weights: Vec<f32> = cand
                .iter()
                .map(|(_, v)| ((v - max) / p.temperature).exp())
                .collect();
            let total: f32 = weights.iter().sum();
            let mut r = self.rng.random::<f32>() * total;
            for (i, w) in weights.iter().enumerate() {
                r -= w;
                if r <= 0.0 {
                    return cand[i].0;
                }
            }
            return cand[cand.len() - 1].0;
        }
        cand.sort_unstable_by(order);
        if p.top_k > 0 {
            cand.truncate(p.top_k);
        }
        let max = cand[0].1;
        let mut probs: Vec<f32> = cand
            .iter()
            .map(|(_, v)| ((v - max) / p.temperature).exp())
            .collect();
        let total: f32 = probs.iter().sum();
        probs.iter_mut().for_each(|x| *x /= total);
        if p.top_p < 1.0 {
            let mut acc = 0.0;
            let mut keep = probs.len();
            for (i, x) in probs.iter().enumerate() {
                acc += x;
                if acc >= p.top_p {
                    keep = i + 1;
                    break;
                }
            }
            probs.truncate(keep);
            cand.truncate(keep);
        }
        let total: f32 = probs.iter().sum();
        let mut r = self.rng.random::<f32>() * total;
        for (i, x) in probs.iter().enumerate() {
            r -= x;
            if r <= 0.0 {
                return cand[i].0;
            }
        }
        cand[cand.len() - 1].0
    }
}

/// `token`'s log-probability in one row of raw logits, and the `n` most
/// likely tokens with theirs (most likely first): what scoring a prompt
/// returns for each of its tokens.
pub fn token_logprobs(logits: &[f32], token: u32, n: usize) -> (f32, Vec<(u32, f32)>) {
    let (lp, top) = top_logprobs(logits, n);
    (lp(token), top)
}

/// The log-probabilities of one row of raw logits: a function giving any
/// token's, and the `n` most likely tokens with theirs.
fn top_logprobs(logits: &[f32], n: usize) -> (impl Fn(u32) -> f32 + '_, Vec<(u32, f32)>) {
    let max = logits
        .iter()
        .copied()
        .filter(|v| v.is_finite())
        .fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = logits
        .iter()
        .filter(|v| v.is_finite())
        .map(|&v| f64::from(v - max).exp())
        .sum();
    let norm = max + sum.ln() as f32;
    let lp = move |t: u32| match logits.get(t as usize) {
        Some(v) if v.is_finite() => (v - norm).min(0.0),
        _ => f32::NEG_INFINITY,
    };
    let mut cand: Vec<(u32, f32)> = logits
        .iter()
        .enumerate()
        .filter(|(_, v)| v.is_finite())
        .map(|(i, &v)| (i as u32, v))
        .collect();
    let order = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
    if n > 0 && n < cand.len() {
        cand.select_nth_unstable_by(n - 1, order);
    }
    cand.truncate(n);
    cand.sort_unstable_by(order);
    let top = cand
        .into_iter()
        .map(|(t, v)| (t, (v - norm).min(0.0)))
        .collect();
    (lp, top)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_picks_first_max() {
        let mut s = Sampler::new(SamplingParams::default()).unwrap();
        assert_eq!(s.sample(&[0.1, 3.0, 3.0, -1.0]), 1);
    }

    #[test]
    fn seeded_sampling_is_reproducible_and_respects_top_k() {
        let logits: Vec<f32> = (0..50).map(|i| (i as f32 * 0.37).sin()).collect();
        let params = SamplingParams {
            temperature: 1.0,
            top_p: 1.0,
            top_k: 3,
            seed: 42,
        };
        let a: Vec<u32> = {
            let mut s = Sampler::new(params).unwrap();
            (0..20).map(|_| s.sample(&logits)).collect()
        };
        let b: Vec<u32> = {
            let mut s = Sampler::new(params).unwrap();
            (0..20).map(|_| s.sample(&logits)).collect()
        };
        assert_eq!(a, b);
        let mut top3: Vec<usize> = (0..50).collect();
        top3.sort_by(|&x, &y| logits[y].total_cmp(&logits[x]));
        for t in &a {
            assert!(top3[..3].contains(&(*t as usize)));
        }
    }

    #[test]
    fn full_vocabulary_sampling_follows_the_softmax() {
        let logits = [0.0f32, 1.0, 2.0, f32::NAN, -1.0];
        let t = 0.7;
        let mut s = Sampler::new(SamplingParams {
            temperature: t,
            top_p: 1.0,
            top_k: 0,
            seed: 3,
        })
        .unwrap();
        let n = 40_000;
        let mut counts = [0usize; 5];
        for _ in 0..n {
            counts[s.sample(&logits) as usize] += 1;
        }
        assert_eq!(counts[3], 0, "a NaN logit is never picked");
        let finite = [0usize, 1, 2, 4];
        let z: f32 = finite.iter().map(|&i| (logits[i] / t).exp()).sum();
        for &i in &finite {
            let want = (logits[i] / t).exp() / z;
            let got = counts[i] as f32 / n as f32;
            assert!((got - want).abs() < 0.01, "token {i}: {got} vs {want}");
        }
    }

    #[test]
    fn tiny_top_p_is_greedy() {
        let logits = [1.0, 5.0, 2.0];
        let mut s = Sampler::new(SamplingParams {
            temperature: 0.8,
            top_p: 0.01,
            top_k: 0,
            seed: 7,
        })
        .unwrap();
        for _ in 0..10 {
            assert_eq!(s.sample(&logits), 1);
        }
    }

    #[test]
    fn bad_params_are_rejected() {
        for (t, p) in [(-1.0, 1.0), (f32::NAN, 1.0), (1.0, 0.0), (1.0, 1.5)] {
            let params = SamplingParams {
                temperature: t,
                top_p: p,
                ..Default::default()
            };
            assert!(Sampler::new(params).is_err());
        }
    }
}
