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

/// A seeded sampler for one sequence.
#[derive(Debug, Clone)]
pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
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
        })
    }

    /// Picks a token from one row of logits.
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
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
