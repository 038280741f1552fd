//! AdamW (decoupled weight decay, as PyTorch's `torch.optim.AdamW`), the
//! warmup + cosine learning rate, and gradient-norm clipping helpers.
//! Optimizer state is plain named tensors so checkpoints can hold it.

use std::collections::HashMap;

use candle_core::{DType, Tensor, Var};
use serde::{Deserialize, Serialize};

use crate::error::{ModelError, Result};

/// AdamW's hyper-parameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdamWConfig {
    #[serde(default = "defaults::beta1")]
    pub beta1: f64,
    #[serde(default = "defaults::beta2")]
    pub beta2: f64,
    #[serde(default = "defaults::eps")]
    pub eps: f64,
    #[serde(default)]
    pub weight_decay: f64,
}

mod defaults {
    pub fn beta1() -> f64 {
        0.9
    }
    pub fn beta2() -> f64 {
        0.999
    }
    pub fn eps() -> f64 {
        1e-8
    }
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        }
    }
}

/// Linear warmup to `peak`, then cosine decay to `peak * min_ratio` at `total` steps.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LrSchedule {
    pub peak: f64,
    pub warmup: u64,
    pub total: u64,
    pub min_ratio: f64,
}

impl LrSchedule {
    /// The learning rate of optimizer step `step` (0-based).
    pub fn at(&self, step: u64) -> f64 {
        if step < self.warmup {
            return self.peak * (step + 1) as f64 / self.warmup as f64;
        }
        let span = self.total.saturating_sub(self.warmup).max(1);
        let progress = ((step - self.warmup) as f64 / span as f64).min(1.0);
        let cosine = 0.5 * (1.0 + (std::f64::consts::PI * progress).cos());
        self.peak * (self.min_ratio + (1.0 - self.min_ratio) * cosine)
    }
}

/// Sum of squares of some gradients (in f64).
pub fn sq_norm(grads: &[Option<Tensor>]) -> Result<f64> {
    let mut s = 0.0;
    for g in grads.iter().flatten() {
        s += g
            .to_dtype(DType::F64)?
            .sqr()?
            .sum_all()?
            .to_scalar::<f64>()?;
    }
    Ok(s)
}

/// The factor that brings a global gradient norm down to `max_norm`
/// (PyTorch's `clip_grad_norm_`); 1 when it is within, or clipping is off.
pub fn clip_factor(norm: f64, max_norm: f64) -> f64 {
    if max_norm > 0.0 && norm > max_norm {
        max_norm / (norm + 1e-6)
    } else {
        1.0
    }
}

/// AdamW over a stage's trainable parameters.
#[derive(Debug)]
pub struct AdamW {
    cfg: AdamWConfig,
    /// Steps taken.
    t: u64,
    /// First and second moments by parameter name.
    state: HashMap<String, (Tensor, Tensor)>,
}

impl AdamW {
    pub fn new(cfg: AdamWConfig) -> Self {
        Self {
            cfg,
            t: 0,
            state: HashMap::new(),
        }
    }

    /// Steps taken so far.
    pub fn steps(&self) -> u64 {
        self.t
    }

    /// One update. `grads[i]` belongs to `params[i]`; a parameter without a
    /// gradient is left alone (as PyTorch does). Gradients are multiplied by
    /// `grad_scale` first (clipping).
    pub fn step(
        &mut self,
        params: &[(String, Var)],
        grads: &[Option<Tensor>],
        lr: f64,
        grad_scale: f64,
    ) -> Result<()> {
        if params.len() != grads.len() {
            return Err(ModelError::BadStageInput(format!(
                "{} gradients for {} parameters",
                grads.len(),
                params.len()
            )));
        }
        self.t += 1;
        let c = &self.cfg;
        let t = self.t as i32;
        let bc1 = 1.0 - c.beta1.powi(t);
        let bc2 = 1.0 - c.beta2.powi(t);
        for ((name, p), g) in params.iter().zip(grads) {
            let Some(g) = g else { continue };
            let g = (g * grad_scale)?;
            let (m, v) = match self.state.remove(name) {
                Some(s) => s,
                None => (p.zeros_like()?, p.zeros_like()?),
            };
            let m = ((m * c.beta1)? + (&g * (1.0 - c.beta1))?)?;
            let v = ((v * c.beta2)? + (g.sqr()? * (1.0 - c.beta2))?)?;
            let decayed = (p.as_tensor() * (1.0 - lr * c.weight_decay))?;
            let denom = ((&v / bc2)?.sqrt()? + c.eps)?;
            let update = ((&m / bc1)? / denom)?;
            p.set(&(decayed - (update * lr)?)?)?;
            self.state.insert(name.clone(), (m, v));
        }
        Ok(())
    }

    /// The moments as named tensors (`{name}.exp_avg`, `{name}.exp_avg_sq`).
    pub fn state_tensors(&self) -> Vec<(String, Tensor)> {
        let mut out: Vec<(String, Tensor)> = self
            .state
            .iter()
            .flat_map(|(n, (m, v))| {
                [
                    (format!("{n}.exp_avg"), m.clone()),
                    (format!("{n}.exp_avg_sq"), v.clone()),
                ]
            })
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    /// Restores moments saved by [`Self::state_tensors`] after `steps` steps,
    /// for the parameters in `params` (others in `saved` are ignored).
    pub fn restore(
        &mut self,
        params: &[(String, Var)],
        saved: &HashMap<String, Tensor>,
        steps: u64,
    ) -> Result<()> {
        self.t = steps;
        self.state.clear();
        for (name, p) in params {
            let m = saved.get(&format!("{name}.exp_avg"));
            let v = saved.get(&format!("{name}.exp_avg_sq"));
            if let (Some(m), Some(v)) = (m, v) {
                if m.dims() != p.dims() || v.dims() != p.dims() {
                    return Err(ModelError::ShapeMismatch {
                        name: name.clone(),
                        expected: p.dims().to_vec(),
                        actual: m.dims().to_vec(),
                    });
                }
                self.state.insert(
                    name.clone(),
                    (m.to_dtype(p.dtype())?, v.to_dtype(p.dtype())?),
                );
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn schedule_warms_up_then_decays_to_the_floor() {
        let s = LrSchedule {
            peak: 1.0,
            warmup: 4,
            total: 14,
            min_ratio: 0.1,
        };
        assert_eq!(s.at(0), 0.25);
        assert_eq!(s.at(3), 1.0);
        assert!((s.at(4) - 1.0).abs() < 1e-12);
        assert!((s.at(9) - 0.55).abs() < 1e-12);
        assert!((s.at(14) - 0.1).abs() < 1e-12);
        assert!((s.at(99) - 0.1).abs() < 1e-12);
    }

    /// One hand-computed AdamW step (PyTorch's formula).
    #[test]
    fn adamw_matches_the_formula() {
        let p = Var::from_tensor(&Tensor::new(&[1.0f64, -2.0], &Device::Cpu).unwrap()).unwrap();
        let params = vec![("w".to_string(), p.clone())];
        let g = Tensor::new(&[0.5f64, 0.0], &Device::Cpu).unwrap();
        let mut opt = AdamW::new(AdamWConfig {
            weight_decay: 0.1,
            ..Default::default()
        });
        opt.step(&params, &[Some(g)], 0.01, 2.0).unwrap();
        let w: Vec<f64> = p.as_tensor().to_vec1().unwrap();
        // g' = 1.0: m̂ = 1, v̂ = 1, update = 1/(1+1e-8)
        let want0 = 1.0 * (1.0 - 0.01 * 0.1) - 0.01 / (1.0 + 1e-8);
        assert!((w[0] - want0).abs() < 1e-12, "{}", w[0]);
        assert!((w[1] - (-2.0 * (1.0 - 0.001))).abs() < 1e-12);
        assert_eq!(opt.state_tensors().len(), 2);
        assert_eq!(clip_factor(2.0, 1.0), 1.0 / (2.0 + 1e-6));
        assert_eq!(clip_factor(0.5, 1.0), 1.0);
    }
}
