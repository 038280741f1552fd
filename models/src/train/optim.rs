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

/// Sum of squares of some gradients (in f64), read where they lie.
pub fn sq_norm(grads: &[Option<Tensor>]) -> Result<f64> {
    super::stage::in_train_pool(|| sq_norm_here(grads))
}

fn sq_norm_here(grads: &[Option<Tensor>]) -> Result<f64> {
    use candle_core::{CpuStorage as S, Storage};
    let mut s = 0.0;
    for g in grads.iter().flatten() {
        let direct = {
            let (storage, layout) = g.storage_and_layout();
            match (&*storage, layout.contiguous_offsets()) {
                (Storage::Cpu(S::F32(v)), Some((a, b))) => Some(sum_sq(&v[a..b], f64::from)),
                (Storage::Cpu(S::F64(v)), Some((a, b))) => Some(sum_sq(&v[a..b], |x| x)),
                _ => None,
            }
        };
        s += match direct {
            Some(v) => v,
            None => g
                .to_dtype(DType::F64)?
                .sqr()?
                .sum_all()?
                .to_scalar::<f64>()?,
        };
    }
    Ok(s)
}

/// Σ x² in f64, in parallel chunks summed in order (reproducible).
fn sum_sq<T: Copy + Sync>(v: &[T], f: impl Fn(T) -> f64 + Sync) -> f64 {
    use rayon::prelude::*;
    let parts: Vec<f64> = v
        .par_chunks(UPDATE_CHUNK)
        .map(|c| c.iter().map(|&x| f(x) * f(x)).sum())
        .collect();
    parts.iter().sum()
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

/// One parameter's first and second moments, in its own precision.
#[derive(Debug)]
enum Moments {
    F32 { m: Vec<f32>, v: Vec<f32> },
    F64 { m: Vec<f64>, v: Vec<f64> },
}

impl Moments {
    fn zeros(dtype: DType, n: usize) -> Result<Self> {
        match dtype {
            DType::F32 => Ok(Self::F32 {
                m: vec![0.0; n],
                v: vec![0.0; n],
            }),
            DType::F64 => Ok(Self::F64 {
                m: vec![0.0; n],
                v: vec![0.0; n],
            }),
            other => Err(ModelError::InvalidConfig(format!(
                "AdamW runs in f32 or f64, not {other:?}"
            ))),
        }
    }

    fn from_tensors(m: &Tensor, v: &Tensor, dtype: DType) -> Result<Self> {
        let (m, v) = (m.flatten_all()?, v.flatten_all()?);
        match dtype {
            DType::F64 => Ok(Self::F64 {
                m: m.to_dtype(dtype)?.to_vec1()?,
                v: v.to_dtype(dtype)?.to_vec1()?,
            }),
            _ => Ok(Self::F32 {
                m: m.to_dtype(DType::F32)?.to_vec1()?,
                v: v.to_dtype(DType::F32)?.to_vec1()?,
            }),
        }
    }

    fn len(&self) -> usize {
        match self {
            Self::F32 { m, .. } => m.len(),
            Self::F64 { m, .. } => m.len(),
        }
    }

    fn tensors(&self, shape: &[usize]) -> Result<(Tensor, Tensor)> {
        let dev = &candle_core::Device::Cpu;
        Ok(match self {
            Self::F32 { m, v } => (
                Tensor::from_slice(m, shape, dev)?,
                Tensor::from_slice(v, shape, dev)?,
            ),
            Self::F64 { m, v } => (
                Tensor::from_slice(m, shape, dev)?,
                Tensor::from_slice(v, shape, dev)?,
            ),
        })
    }
}

/// The per-step constants of one AdamW update.
#[derive(Debug, Clone, Copy)]
struct Update {
    grad_scale: f64,
    beta1: f64,
    beta2: f64,
    /// 1 − lr · weight decay.
    decay: f64,
    bc1: f64,
    bc2: f64,
    eps: f64,
    lr: f64,
}

/// Elements per parallel chunk of a pass over a parameter-sized buffer
/// (an update, a norm, a gradient sum).
pub(crate) const UPDATE_CHUNK: usize = 1 << 16;

macro_rules! adamw_update {
    ($name:ident, $t:ty) => {
        /// One AdamW update of `p` in place, moments updated with it:
        /// PyTorch's formula, each value once through memory.
        fn $name(p: &mut [$t], g: &[$t], m: &mut [$t], v: &mut [$t], u: Update) {
            use rayon::prelude::*;
            let (gs, b1, b2) = (u.grad_scale as $t, u.beta1 as $t, u.beta2 as $t);
            let (c1, c2) = ((1.0 - u.beta1) as $t, (1.0 - u.beta2) as $t);
            let (decay, bc1, bc2) = (u.decay as $t, u.bc1 as $t, u.bc2 as $t);
            let (eps, lr) = (u.eps as $t, u.lr as $t);
            p.par_chunks_mut(UPDATE_CHUNK)
                .zip(g.par_chunks(UPDATE_CHUNK))
                .zip(m.par_chunks_mut(UPDATE_CHUNK))
                .zip(v.par_chunks_mut(UPDATE_CHUNK))
                .for_each(|(((p, g), m), v)| {
                    for (((p, &g), m), v) in p.iter_mut().zip(g).zip(m).zip(v) {
                        let g = g * gs;
                        *m = *m * b1 + g * c1;
                        *v = *v * b2 + (g * g) * c2;
                        let denom = (*v / bc2).sqrt() + eps;
                        *p = *p * decay - (*m / bc1) / denom * lr;
                    }
                });
        }
    };
}
adamw_update!(adamw_f32, f32);
adamw_update!(adamw_f64, f64);

/// The in-place AdamW update of one parameter tensor from its gradient.
struct AdamWOp<'a> {
    moments: std::sync::Mutex<&'a mut Moments>,
    update: Update,
}

impl candle_core::InplaceOp2 for AdamWOp<'_> {
    fn name(&self) -> &'static str {
        "adamw"
    }

    fn cpu_fwd(
        &self,
        p: &mut candle_core::CpuStorage,
        lp: &candle_core::Layout,
        g: &candle_core::CpuStorage,
        lg: &candle_core::Layout,
    ) -> candle_core::Result<()> {
        use candle_core::CpuStorage as S;
        let (Some((p0, p1)), Some((g0, g1))) = (lp.contiguous_offsets(), lg.contiguous_offsets())
        else {
            return Err(candle_core::Error::Msg(
                "AdamW needs contiguous tensors".into(),
            ));
        };
        let mut guard = self
            .moments
            .lock()
            .map_err(|_| candle_core::Error::Msg("AdamW moments poisoned".into()))?;
        let n = p1 - p0;
        if g1 - g0 != n || guard.len() != n {
            return Err(candle_core::Error::Msg(format!(
                "AdamW: {n} values, a gradient of {} and moments of {}",
                g1 - g0,
                guard.len()
            )));
        }
        match (p, g, &mut **guard) {
            (S::F32(p), S::F32(g), Moments::F32 { m, v }) => {
                adamw_f32(&mut p[p0..p1], &g[g0..g1], m, v, self.update);
            }
            (S::F64(p), S::F64(g), Moments::F64 { m, v }) => {
                adamw_f64(&mut p[p0..p1], &g[g0..g1], m, v, self.update);
            }
            _ => {
                return Err(candle_core::Error::Msg(
                    "AdamW: parameter, gradient and moments differ in type".into(),
                ));
            }
        }
        Ok(())
    }
}

/// AdamW over a stage's trainable parameters. Each update is one fused
/// pass in place over the parameter, its gradient and its moments (a
/// chain of tensor operations would allocate a parameter-sized buffer
/// per operation: a dozen of them for every weight under full
/// fine-tuning).
#[derive(Debug)]
pub struct AdamW {
    cfg: AdamWConfig,
    /// Steps taken.
    t: u64,
    /// First and second moments by parameter name, with its shape.
    state: HashMap<String, (Vec<usize>, Moments)>,
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
        // Every gradient checked before any parameter moves.
        for ((name, p), g) in params.iter().zip(grads) {
            if let Some(g) = g
                && (g.dims() != p.dims() || g.dtype() != p.dtype())
            {
                return Err(ModelError::BadStageInput(format!(
                    "{name}: a {:?} {:?} gradient for a {:?} {:?} parameter",
                    g.dtype(),
                    g.dims(),
                    p.dtype(),
                    p.dims()
                )));
            }
        }
        self.t += 1;
        let c = &self.cfg;
        let t = self.t as i32;
        let update = Update {
            grad_scale,
            beta1: c.beta1,
            beta2: c.beta2,
            decay: 1.0 - lr * c.weight_decay,
            bc1: 1.0 - c.beta1.powi(t),
            bc2: 1.0 - c.beta2.powi(t),
            eps: c.eps,
            lr,
        };
        let state = &mut self.state;
        // On the training pool: the update's parallel loops stay off the
        // pool inference uses.
        super::stage::in_train_pool(|| {
            for ((name, p), g) in params.iter().zip(grads) {
                let Some(g) = g else { continue };
                let (_, moments) = match state.entry(name.clone()) {
                    std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
                    std::collections::hash_map::Entry::Vacant(e) => e.insert((
                        p.dims().to_vec(),
                        Moments::zeros(p.dtype(), p.elem_count())?,
                    )),
                };
                let op = AdamWOp {
                    moments: std::sync::Mutex::new(moments),
                    update,
                };
                p.as_tensor().inplace_op2(&g.contiguous()?, &op)?;
            }
            Ok(())
        })
    }

    /// The moments as named tensors (`{name}.exp_avg`, `{name}.exp_avg_sq`).
    pub fn state_tensors(&self) -> Result<Vec<(String, Tensor)>> {
        let mut out = Vec::with_capacity(2 * self.state.len());
        for (n, (shape, moments)) in &self.state {
            let (m, v) = moments.tensors(shape)?;
            out.push((format!("{n}.exp_avg"), m));
            out.push((format!("{n}.exp_avg_sq"), v));
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
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
                    (p.dims().to_vec(), Moments::from_tensors(m, v, p.dtype())?),
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

    /// The fused update over a parameter larger than one parallel chunk,
    /// three steps in f32, against PyTorch's formula computed value by
    /// value in f64; then moments saved and restored into a fresh
    /// optimizer carry on exactly as the original does.
    #[test]
    fn fused_adamw_follows_the_formula_and_restores_exactly() {
        let n = (UPDATE_CHUNK * 2 + 77) / 7 * 7;
        let dev = Device::Cpu;
        let init: Vec<f32> = (0..n)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.01)
            .collect();
        let grad = |k: usize| -> Vec<f32> {
            (0..n)
                .map(|i| ((i * 13 + k * 7) % 23) as f32 * 0.05 - 0.5)
                .collect()
        };
        let cfg = AdamWConfig {
            weight_decay: 0.01,
            ..Default::default()
        };
        let p = Var::from_tensor(&Tensor::from_slice(&init, (n / 7, 7), &dev).unwrap()).unwrap();
        let params = vec![("w".to_string(), p.clone())];
        let mut opt = AdamW::new(cfg.clone());
        let (mut want, mut m, mut v) = (
            init.iter().map(|&x| f64::from(x)).collect::<Vec<f64>>(),
            vec![0f64; n],
            vec![0f64; n],
        );
        let (lr, scale) = (1e-3, 0.5);
        for k in 0..3 {
            let g = grad(k);
            let t = Tensor::from_slice(&g, (n / 7, 7), &dev).unwrap();
            opt.step(&params, &[Some(t)], lr, scale).unwrap();
            let step = (k + 1) as i32;
            let (bc1, bc2) = (1.0 - 0.9f64.powi(step), 1.0 - 0.999f64.powi(step));
            for i in 0..n {
                let g = f64::from(g[i]) * scale;
                m[i] = 0.9 * m[i] + 0.1 * g;
                v[i] = 0.999 * v[i] + 0.001 * g * g;
                want[i] =
                    want[i] * (1.0 - lr * 0.01) - lr * (m[i] / bc1) / ((v[i] / bc2).sqrt() + 1e-8);
            }
        }
        let got: Vec<f32> = p.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
        for i in 0..n {
            assert!(
                (f64::from(got[i]) - want[i]).abs() < 1e-6,
                "{i}: {} vs {}",
                got[i],
                want[i]
            );
        }
        // Save, restore into a copy, and take one more step on both.
        let saved: HashMap<String, Tensor> = opt.state_tensors().unwrap().into_iter().collect();
        let q = Var::from_tensor(p.as_tensor()).unwrap();
        let copy = vec![("w".to_string(), q.clone())];
        let mut restored = AdamW::new(cfg);
        restored.restore(&copy, &saved, opt.steps()).unwrap();
        let g = Tensor::from_slice(&grad(3), (n / 7, 7), &dev).unwrap();
        opt.step(&params, &[Some(g.clone())], lr, scale).unwrap();
        restored.step(&copy, &[Some(g)], lr, scale).unwrap();
        let a: Vec<f32> = p.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
        let b: Vec<f32> = q.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(a, b);
        // A gradient of the wrong shape is an error, not a panic.
        let bad = Tensor::zeros((3, 7), DType::F32, &dev).unwrap();
        assert!(opt.step(&params, &[Some(bad)], lr, scale).is_err());
        // The norm read in place equals the tensor computation.
        let g = Tensor::from_slice(&grad(4), (n / 7, 7), &dev).unwrap();
        let want: f64 = grad(4).iter().map(|&x| f64::from(x) * f64::from(x)).sum();
        let got = sq_norm(&[Some(g.clone()), None, Some(g.t().unwrap())]).unwrap();
        assert!(
            (got - 2.0 * want).abs() < 1e-9 * want,
            "{got} vs {}",
            2.0 * want
        );
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
        assert_eq!(opt.state_tensors().unwrap().len(), 2);
        assert_eq!(clip_factor(2.0, 1.0), 1.0 / (2.0 + 1e-6));
        assert_eq!(clip_factor(0.5, 1.0), 1.0);
    }
}
