//! LoRA adapters served beside their base model (as S-LoRA and Punica do):
//! a stage holds its layers' slice of each adapter it serves, and a ragged
//! batch applies each sequence's own adapter to that sequence's rows: one
//! pair of small matrix products `(x_rows · Aᵀ) · (scale · Bᵀ)` per run of
//! consecutive sequences sharing an adapter, per adapted projection. Rows
//! of the base model take no extra work, and the base weights are never
//! changed, so any number of adapters and the base serve from one copy.
//!
//! Adapters are read in PEFT's format (`adapter_config.json` and
//! `adapter_model.safetensors`), which is what Hearth's fine-tuning jobs
//! write: a LoRA on each of q/k/v/o/gate/up/down, or on the stacked
//! `qkv_proj` / `gate_up_proj` of a model stored that way (Phi-3).

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use serde::Deserialize;

use crate::{Config, ModelError, Result, StageSpec};

/// Largest adapter file read (its tensors are held in f32).
pub const MAX_ADAPTER_BYTES: u64 = 2 << 30;
/// Largest `adapter_config.json` read.
const MAX_CONFIG_BYTES: u64 = 1 << 20;
/// Largest rank an adapter may have (per projection, stacked ones too).
pub const MAX_ADAPTER_RANK: usize = 4096;

/// The projections a LoRA may adapt, in this order.
const TARGETS: [&str; 7] = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];
pub(crate) const Q: usize = 0;
pub(crate) const K: usize = 1;
pub(crate) const V: usize = 2;
pub(crate) const O: usize = 3;
pub(crate) const GATE: usize = 4;
pub(crate) const UP: usize = 5;
pub(crate) const DOWN: usize = 6;

/// One projection's adapter: its output changes by `Σ_j (x · a_j) · bt_j`
/// (`a` is A, `[rank, input]` row-major; `bt` is Bᵀ with the scale folded
/// in, `[rank, output]` row-major).
#[derive(Debug, Clone)]
struct LoraPair {
    rank: usize,
    input: usize,
    output: usize,
    a: Arc<Vec<f32>>,
    bt: Vec<f32>,
}

/// One layer's adapters, by projection.
#[derive(Debug, Clone, Default)]
pub struct LayerAdapter {
    parts: [Option<LoraPair>; 7],
}

/// An adapter's slice for the layers of one stage.
#[derive(Debug, Clone)]
pub struct StageAdapter {
    start: usize,
    layers: Vec<LayerAdapter>,
    bytes: u64,
}

#[derive(Debug, Deserialize)]
struct PeftConfig {
    r: usize,
    lora_alpha: f64,
    #[serde(default)]
    use_rslora: bool,
    #[serde(default)]
    fan_in_fan_out: bool,
    #[serde(default)]
    rank_pattern: HashMap<String, serde_json::Value>,
    #[serde(default)]
    alpha_pattern: HashMap<String, serde_json::Value>,
}

fn bad(msg: impl Into<String>) -> ModelError {
    ModelError::InvalidConfig(format!("LoRA adapter: {}", msg.into()))
}

fn read_bounded(path: &Path, limit: u64) -> Result<Vec<u8>> {
    let len = std::fs::metadata(path)
        .map_err(|e| ModelError::io(path, e))?
        .len();
    if len > limit {
        return Err(bad(format!(
            "{} has {len} bytes (at most {limit})",
            path.display()
        )));
    }
    std::fs::read(path).map_err(|e| ModelError::io(path, e))
}

/// The decoder layer a tensor name is in (`...layers.N.…`), if any.
fn decoder_layer(name: &str) -> Option<usize> {
    let (_, rest) = name.split_once("layers.")?;
    rest.split_once('.')?.0.parse().ok()
}

/// A pattern entry's number for module `module`: the longest key that is
/// the module's name or a dotted suffix of it (PEFT's plain keys; its
/// regular-expression keys are not read).
fn pattern(map: &HashMap<String, serde_json::Value>, module: &str) -> Option<f64> {
    map.iter()
        .filter(|(k, _)| module == k.as_str() || module.ends_with(&format!(".{k}")))
        .filter_map(|(k, v)| Some((k, v.as_f64()?)))
        .max_by(|a, b| (a.0.len(), a.0).cmp(&(b.0.len(), b.0)))
        .map(|(_, v)| v)
}

impl StageAdapter {
    /// Reads the PEFT adapter in `dir` for the layers of `spec` of a model
    /// shaped like `cfg`. Every LoRA tensor of those layers must name a
    /// projection the model has, with the model's shapes.
    pub fn load_peft(dir: &Path, cfg: &Config, spec: StageSpec) -> Result<Self> {
        spec.check(cfg.num_hidden_layers)?;
        let config: PeftConfig = serde_json::from_slice(&read_bounded(
            &dir.join("adapter_config.json"),
            MAX_CONFIG_BYTES,
        )?)
        .map_err(|e| bad(format!("adapter_config.json: {e}")))?;
        if config.fan_in_fan_out {
            return Err(bad(
                "fan_in_fan_out adapters (GPT-2's Conv1D) are not supported",
            ));
        }
        let path = dir.join("adapter_model.safetensors");
        let file = std::fs::File::open(&path).map_err(|e| ModelError::io(&path, e))?;
        let len = file.metadata().map_err(|e| ModelError::io(&path, e))?.len();
        if len > MAX_ADAPTER_BYTES {
            return Err(bad(format!(
                "{} has {len} bytes (at most {MAX_ADAPTER_BYTES})",
                path.display()
            )));
        }
        // Mapped, not read: a stage copies out only its layers' matrices,
        // so serving an adapter grows memory by that slice, not by the file.
        // SAFETY: mapped read-only; the file is the node's own copy (checked
        // against its id), which nothing writes while it is loaded.
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| ModelError::io(&path, e))?;
        let st = safetensors::SafeTensors::deserialize(&map)
            .map_err(|e| bad(format!("adapter_model.safetensors: {e}")))?;
        let names: std::collections::HashSet<String> =
            st.names().into_iter().map(str::to_string).collect();
        let mut tensors: HashMap<String, Tensor> = HashMap::new();
        let mut elsewhere = 0usize;
        for (name, view) in st.tensors() {
            // Another stage's layer: checked for its pair, not converted.
            if let Some(layer) = decoder_layer(&name)
                && !(spec.start..spec.end).contains(&layer)
            {
                let module = name
                    .strip_suffix(".lora_A.weight")
                    .or_else(|| name.strip_suffix(".lora_B.weight"));
                let paired = module.is_some_and(|m| {
                    names.contains(&format!("{m}.lora_A.weight"))
                        && names.contains(&format!("{m}.lora_B.weight"))
                });
                if !paired {
                    return Err(bad(format!("{name} is not half of a LoRA A/B pair")));
                }
                if layer >= cfg.num_hidden_layers {
                    return Err(bad(format!(
                        "{name}: layer {layer} of a model with {}",
                        cfg.num_hidden_layers
                    )));
                }
                elsewhere += 1;
                continue;
            }
            let dtype = match view.dtype() {
                safetensors::Dtype::F32 => DType::F32,
                safetensors::Dtype::F16 => DType::F16,
                safetensors::Dtype::BF16 => DType::BF16,
                other => return Err(bad(format!("{name} is {other:?}"))),
            };
            let t = Tensor::from_raw_buffer(view.data(), dtype, view.shape(), &Device::Cpu)?
                .to_dtype(DType::F32)?;
            tensors.insert(name, t);
        }
        Self::from_tensors(&tensors, &config, cfg, spec, elsewhere)
    }

    /// `elsewhere`: LoRA matrices of other stages' layers (checked, not
    /// given).
    fn from_tensors(
        tensors: &HashMap<String, Tensor>,
        config: &PeftConfig,
        cfg: &Config,
        spec: StageSpec,
        elsewhere: usize,
    ) -> Result<Self> {
        let (h, hd) = (cfg.hidden_size, cfg.head_dim);
        let qdim = cfg.num_attention_heads * hd;
        let kvdim = cfg.num_key_value_heads * hd;
        let inter = cfg.intermediate_size;
        // (input, output) of each target, and the stacked projections.
        let shape = |p: usize| match p {
            Q => (h, qdim),
            K | V => (h, kvdim),
            O => (qdim, h),
            GATE | UP => (h, inter),
            _ => (inter, h),
        };
        let mut layers = vec![LayerAdapter::default(); spec.layers()];
        let mut seen = elsewhere;
        let mut bytes = 0u64;
        for (name, a) in tensors {
            let Some(module) = name.strip_suffix(".lora_A.weight") else {
                if let Some(m) = name.strip_suffix(".lora_B.weight") {
                    if !tensors.contains_key(&format!("{m}.lora_A.weight")) {
                        return Err(bad(format!("{m} has lora_B but no lora_A")));
                    }
                    continue;
                }
                return Err(bad(format!(
                    "{name}: only LoRA A/B matrices are supported (no modules_to_save, no DoRA)"
                )));
            };
            let b = tensors
                .get(&format!("{module}.lora_B.weight"))
                .ok_or_else(|| bad(format!("{module} has lora_A but no lora_B")))?;
            let rest = module
                .split_once("layers.")
                .map(|(_, r)| r)
                .ok_or_else(|| bad(format!("{name} is not in a decoder layer")))?;
            let (index, proj) = rest
                .split_once('.')
                .ok_or_else(|| bad(format!("{name}: no layer index")))?;
            let layer: usize = index
                .parse()
                .map_err(|_| bad(format!("{name}: layer {index:?}")))?;
            if layer >= cfg.num_hidden_layers {
                return Err(bad(format!(
                    "{name}: layer {layer} of a model with {}",
                    cfg.num_hidden_layers
                )));
            }
            seen += 1;
            if !(spec.start..spec.end).contains(&layer) {
                continue;
            }
            let proj = proj.rsplit('.').next().unwrap_or(proj);
            let (r_a, a_in) = a.dims2()?;
            let (b_out, r_b) = b.dims2()?;
            if r_a != r_b || r_a == 0 || r_a > MAX_ADAPTER_RANK {
                return Err(bad(format!(
                    "{module}: A is {:?} and B {:?} (ranks must agree, 1..={MAX_ADAPTER_RANK})",
                    a.dims(),
                    b.dims()
                )));
            }
            // The scale is alpha over the module's rank: its matrices' rank,
            // which the config must state (PEFT refuses a mismatch too).
            let said = pattern(&config.rank_pattern, module).unwrap_or(config.r as f64);
            if said != r_a as f64 {
                return Err(bad(format!(
                    "{module}: its matrices have rank {r_a}, the config says {said} (rank_pattern keys are read as module names or suffixes)"
                )));
            }
            let rank = r_a as f64;
            let alpha = pattern(&config.alpha_pattern, module).unwrap_or(config.lora_alpha);
            if !alpha.is_finite() {
                return Err(bad(format!("{module}: alpha {alpha}")));
            }
            let scale = if config.use_rslora {
                alpha / rank.sqrt()
            } else {
                alpha / rank
            };
            let a_rows: Arc<Vec<f32>> = Arc::new(a.flatten_all()?.to_vec1()?);
            // Bᵀ scaled: [r, out] row-major.
            let b_t = (b.t()? * scale)?.contiguous()?;
            bytes += 4 * (a.elem_count() + b.elem_count()) as u64;
            // Which targets this matrix adapts, and where in B's rows.
            let parts: Vec<(usize, usize)> = match proj {
                "qkv_proj" => vec![(Q, 0), (K, qdim), (V, qdim + kvdim)],
                "gate_up_proj" => vec![(GATE, 0), (UP, inter)],
                p => match TARGETS.iter().position(|t| *t == p) {
                    Some(t) => vec![(t, 0)],
                    None => return Err(bad(format!("{name}: unknown projection {p:?}"))),
                },
            };
            let (input, _) = shape(parts[0].0);
            let total: usize = parts.iter().map(|(t, _)| shape(*t).1).sum();
            if a_in != input || b_out != total {
                return Err(bad(format!(
                    "{module}: A is {:?} and B {:?}, but the model's {proj} maps {input} to {total}",
                    a.dims(),
                    b.dims()
                )));
            }
            let slot = &mut layers[layer - spec.start];
            for (t, at) in parts {
                let out = shape(t).1;
                let bt: Vec<f32> = b_t
                    .narrow(1, at, out)?
                    .contiguous()?
                    .flatten_all()?
                    .to_vec1()?;
                if slot.parts[t].is_some() {
                    return Err(bad(format!("{module}: {} adapted twice", TARGETS[t])));
                }
                slot.parts[t] = Some(LoraPair {
                    rank: r_a,
                    input,
                    output: out,
                    a: a_rows.clone(),
                    bt,
                });
            }
        }
        if seen == 0 {
            return Err(bad("no LoRA matrices in decoder layers"));
        }
        Ok(Self {
            start: spec.start,
            layers,
            bytes,
        })
    }

    /// Bytes its matrices take (f32).
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// First layer of the stage it was loaded for.
    pub fn start(&self) -> usize {
        self.start
    }

    /// Layers it holds (the stage's).
    pub fn layers(&self) -> usize {
        self.layers.len()
    }

    pub(crate) fn layer(&self, i: usize) -> Option<&LayerAdapter> {
        self.layers.get(i)
    }
}

/// Each row's adapter for one layer, for a whole batch (`None`: the base
/// model's row), or an empty slice when no row has one.
pub type RowAdapters<'a> = [Option<&'a LayerAdapter>];

/// `y`, the output `[n, width]` of a projection of `x` `[n, input]` whose
/// output is the targets `parts` side by side (`(target, width)`: one
/// part, or q/k/v or gate/up stacked), plus the change each row's adapter
/// makes to it: computed row by row in place (a handful of `input`-long
/// dot products and `width`-long updates per row, the rows in parallel),
/// with no tensor operation per adapter. `y` must be a projection's fresh
/// output, shared with nothing: it is changed in place.
pub(crate) fn adapt(
    y: Tensor,
    x: &Tensor,
    by_row: &RowAdapters<'_>,
    parts: &[(usize, usize)],
) -> Result<Tensor> {
    if !by_row
        .iter()
        .flatten()
        .any(|l| parts.iter().any(|(t, _)| l.parts[*t].is_some()))
    {
        return Ok(y);
    }
    let (n, input) = x.dims2()?;
    let width: usize = parts.iter().map(|(_, w)| w).sum();
    if y.dims() != [n, width] || by_row.len() != n {
        return Err(ModelError::BadStageInput(format!(
            "an adapted projection's output is {:?} with {} rows' adapters, expected [{n}, {width}]",
            y.dims(),
            by_row.len()
        )));
    }
    let y = y.contiguous()?;
    y.inplace_op2(
        &x.contiguous()?,
        &LoraOp {
            by_row,
            parts,
            input,
            width,
        },
    )?;
    Ok(y)
}

struct LoraOp<'a> {
    by_row: &'a [Option<&'a LayerAdapter>],
    parts: &'a [(usize, usize)],
    input: usize,
    width: usize,
}

impl candle_core::InplaceOp2 for LoraOp<'_> {
    fn name(&self) -> &'static str {
        "lora"
    }

    fn cpu_fwd(
        &self,
        y: &mut candle_core::CpuStorage,
        ly: &candle_core::Layout,
        x: &candle_core::CpuStorage,
        lx: &candle_core::Layout,
    ) -> candle_core::Result<()> {
        use candle_core::CpuStorage as S;
        use rayon::prelude::*;
        let msg = |m: String| candle_core::Error::Msg(m);
        let (Some((y0, y1)), Some((x0, x1))) = (ly.contiguous_offsets(), lx.contiguous_offsets())
        else {
            return Err(msg("LoRA needs contiguous tensors".into()));
        };
        let (S::F32(y), S::F32(x)) = (y, x) else {
            return Err(msg("LoRA runs on f32 activations".into()));
        };
        let n = self.by_row.len();
        let (y, x) = (&mut y[y0..y1], &x[x0..x1]);
        if y.len() != n * self.width || x.len() != n * self.input {
            return Err(msg(format!(
                "LoRA: {} outputs and {} inputs for {n} rows",
                y.len(),
                x.len()
            )));
        }
        // Every adapter matches the projection's shape (checked once).
        for layer in self.by_row.iter().flatten() {
            for (t, w) in self.parts {
                if let Some(p) = &layer.parts[*t]
                    && (p.input != self.input || p.output != *w)
                {
                    return Err(msg(format!(
                        "an adapter of {}→{} on a projection of {}→{w}",
                        p.input, p.output, self.input
                    )));
                }
            }
        }
        y.par_chunks_mut(self.width)
            .zip(x.par_chunks(self.input))
            .zip(self.by_row.par_iter())
            .for_each(|((yr, xr), layer)| {
                let Some(layer) = layer else { return };
                let mut t = Vec::new();
                let mut at = 0;
                for (part, w) in self.parts {
                    if let Some(p) = &layer.parts[*part] {
                        t.clear();
                        t.extend(
                            p.a.chunks_exact(p.input)
                                .take(p.rank)
                                .map(|a| crate::layers::dot_f32(xr, a)),
                        );
                        let out = &mut yr[at..at + w];
                        for (tj, b) in t.iter().zip(p.bt.chunks_exact(p.output)) {
                            for (o, bv) in out.iter_mut().zip(b) {
                                *o += tj * bv;
                            }
                        }
                    }
                    at += w;
                }
            });
        Ok(())
    }
}
