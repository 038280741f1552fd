//! What a finished fine-tune writes: a LoRA adapter in PEFT's format
//! (`adapter_model.safetensors` + `adapter_config.json`), full weights as
//! safetensors, and a merged model as GGUF (the base file's metadata and
//! untouched tensors byte for byte, changed tensors as f32) that the
//! inference path serves like any other model file.

use std::collections::HashMap;
use std::path::Path;

use candle_core::quantized::{GgmlDType, QTensor, gguf_file};
use candle_core::{DType, Device, Tensor};
use safetensors::tensor::{Dtype, TensorView};

use super::stage::{LoraConfig, Method, TrainOptions, TrainStage};
use crate::error::{ModelError, Result};
use crate::stage::StageSpec;
use crate::weights::{LayerTensor, TensorId, WeightFile, permute_for_gguf};

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> ModelError + '_ {
    move |e| ModelError::io(path, e)
}

/// Writes `bytes` to `path` durably (see [`crate::durable`]): a reader
/// never sees half a file, a crash leaves the old file or the new one.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    crate::durable::write(path, bytes)
}

/// Named tensors as f32 safetensors bytes.
pub fn safetensors_bytes(
    tensors: &[(String, Tensor)],
    meta: Option<HashMap<String, String>>,
) -> Result<Vec<u8>> {
    let mut raw: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::with_capacity(tensors.len());
    for (name, t) in tensors {
        let v = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        raw.push((
            name.clone(),
            t.dims().to_vec(),
            v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        ));
    }
    let views = raw
        .iter()
        .map(|(n, shape, b)| {
            TensorView::new(Dtype::F32, shape.clone(), b)
                .map(|v| (n.as_str(), v))
                .map_err(|e| ModelError::InvalidConfig(e.to_string()))
        })
        .collect::<Result<Vec<_>>>()?;
    safetensors::serialize(views, meta).map_err(|e| ModelError::InvalidConfig(e.to_string()))
}

/// Writes a LoRA adapter as PEFT loads it: `adapter_model.safetensors`
/// (the `lora_A`/`lora_B` tensors under PEFT's names) and
/// `adapter_config.json`. For a model whose checkpoint fuses q/k/v and
/// gate/up (Phi-3), the separate LoRAs Hearth trains are written as the one
/// LoRA on each fused matrix they are exactly: A stacked, B block-diagonal,
/// rank and alpha multiplied by the parts (PEFT's `rank_pattern` and
/// `alpha_pattern`), so the adapter loads onto transformers' model.
pub fn write_peft_adapter(
    dir: &Path,
    lora: &LoraConfig,
    base_model: &str,
    tensors: &[(String, Tensor)],
    cfg: &crate::Config,
) -> Result<()> {
    crate::durable::create_dir(dir)?;
    let mut adapters: Vec<(String, Tensor)> = tensors
        .iter()
        .filter(|(n, _)| n.contains(".lora_A.") || n.contains(".lora_B."))
        .cloned()
        .collect();
    if adapters.is_empty() {
        return Err(ModelError::InvalidConfig("no LoRA tensors to write".into()));
    }
    let mut targets: Vec<String> = lora
        .targets
        .iter()
        .map(|t| t.peft_name().to_string())
        .collect();
    let mut rank_pattern = serde_json::Map::new();
    let mut alpha_pattern = serde_json::Map::new();
    if cfg.fused_projections() {
        let q = cfg.num_attention_heads * cfg.head_dim;
        let kv = cfg.num_key_value_heads * cfg.head_dim;
        let inter = cfg.intermediate_size;
        for (kind, parts, fused) in [
            (
                "self_attn",
                &[("q_proj", q), ("k_proj", kv), ("v_proj", kv)][..],
                "qkv_proj",
            ),
            (
                "mlp",
                &[("gate_proj", inter), ("up_proj", inter)][..],
                "gate_up_proj",
            ),
        ] {
            let present = parts
                .iter()
                .filter(|(n, _)| targets.iter().any(|t| t == n))
                .count();
            if present == 0 {
                continue;
            }
            adapters = fuse_lora(adapters, kind, parts, fused, lora.rank)?;
            targets.retain(|t| !parts.iter().any(|(n, _)| n == t));
            targets.push(fused.to_string());
            rank_pattern.insert(fused.into(), serde_json::json!(present * lora.rank));
            alpha_pattern.insert(fused.into(), serde_json::json!(present as f64 * lora.alpha));
        }
    }
    let mut meta = HashMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    write_atomic(
        &dir.join("adapter_model.safetensors"),
        &safetensors_bytes(&adapters, Some(meta))?,
    )?;
    let config = serde_json::json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": lora.rank,
        "lora_alpha": lora.alpha,
        "lora_dropout": lora.dropout,
        "target_modules": targets,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "bias": "none",
        "fan_in_fan_out": false,
        "inference_mode": true,
        "init_lora_weights": true,
        "modules_to_save": null,
    });
    let text =
        serde_json::to_vec_pretty(&config).map_err(|e| ModelError::InvalidConfig(e.to_string()))?;
    write_atomic(&dir.join("adapter_config.json"), &text)
}

/// Replaces each layer's LoRAs on `parts` (name and output rows, in the
/// fused matrix's row order) of `kind` (`self_attn` or `mlp`) by one LoRA
/// on `fused`: A the present parts' A stacked, B block-diagonal (zero rows
/// for a part not adapted).
fn fuse_lora(
    adapters: Vec<(String, Tensor)>,
    kind: &str,
    parts: &[(&str, usize)],
    fused: &str,
    rank: usize,
) -> Result<Vec<(String, Tensor)>> {
    let mut by_name: HashMap<String, Tensor> = adapters.iter().cloned().collect();
    let mut prefixes: Vec<String> = Vec::new();
    for (n, _) in &adapters {
        for (part, _) in parts {
            if let Some(pre) = n.strip_suffix(&format!(".{kind}.{part}.lora_A.weight"))
                && !prefixes.iter().any(|p| p == pre)
            {
                prefixes.push(pre.to_string());
            }
        }
    }
    let mut out: Vec<(String, Tensor)> = adapters
        .into_iter()
        .filter(|(n, _)| {
            !parts
                .iter()
                .any(|(part, _)| n.contains(&format!(".{kind}.{part}.lora_")))
        })
        .collect();
    for pre in prefixes {
        let name = |part: &str, which: char| format!("{pre}.{kind}.{part}.lora_{which}.weight");
        let present: Vec<(usize, Tensor, Tensor)> = parts
            .iter()
            .enumerate()
            .filter_map(|(i, (part, _))| {
                let a = by_name.remove(&name(part, 'A'))?;
                let b = by_name.remove(&name(part, 'B'))?;
                Some((i, a, b))
            })
            .collect();
        let Some((_, a0, _)) = present.first() else {
            continue;
        };
        let (dtype, device) = (a0.dtype(), a0.device().clone());
        let k = present.len();
        let a = Tensor::cat(&present.iter().map(|(_, a, _)| a).collect::<Vec<_>>(), 0)?;
        // B: each part's rows; its own rank columns, zeros elsewhere.
        let mut rows = Vec::with_capacity(parts.len());
        for (i, (_, out_rows)) in parts.iter().enumerate() {
            let slot = present.iter().position(|(j, _, _)| *j == i);
            let mut cols = Vec::with_capacity(k);
            for c in 0..k {
                cols.push(match slot {
                    Some(s) if s == c => present[s].2.clone(),
                    _ => Tensor::zeros((*out_rows, rank), dtype, &device)?,
                });
            }
            rows.push(Tensor::cat(&cols, 1)?);
        }
        let b = Tensor::cat(&rows, 0)?;
        out.push((format!("{pre}.{kind}.{fused}.lora_A.weight"), a));
        out.push((format!("{pre}.{kind}.{fused}.lora_B.weight"), b));
    }
    Ok(out)
}

/// The whole model with `trained` (a state's tensors by name: LoRA
/// matrices, or full weights) applied, folded into plain weights: every
/// tensor that training changed, under its [`TensorId`], in the HF layout.
pub fn merged_tensors(
    base: &WeightFile,
    method: &Method,
    trained: &HashMap<String, Tensor>,
) -> Result<Vec<(TensorId, Tensor)>> {
    let layers = base.config().num_hidden_layers;
    let opts = TrainOptions {
        method: method.clone(),
        dtype: DType::F32,
        seed: 0,
    };
    let stage = TrainStage::load(base, StageSpec::full(layers), &opts)?;
    for (name, _) in stage.trainables() {
        let t = trained
            .get(name)
            .ok_or_else(|| ModelError::MissingTensor { name: name.clone() })?;
        stage.set(name, t)?;
    }
    let by_name: HashMap<String, TensorId> = TensorId::all(base.config())
        .map(|id| (id.hf_name(), id))
        .collect();
    let changed = |id: TensorId| match method {
        Method::Full => true,
        Method::Lora(c) => match id {
            TensorId::Layer(_, t) => c.targets.iter().any(|x| {
                let x = x.tensor();
                x == t
                    || (t == LayerTensor::Qkv
                        && matches!(x, LayerTensor::Q | LayerTensor::K | LayerTensor::V))
                    || (t == LayerTensor::GateUp
                        && matches!(x, LayerTensor::Gate | LayerTensor::Up))
            }),
            _ => false,
        },
    };
    let mut out = Vec::new();
    for (name, t) in stage.merged_weights()? {
        if let Some(&id) = by_name.get(&name)
            && changed(id)
        {
            out.push((id, t));
        }
    }
    Ok(out)
}

/// Writes a GGUF model at `dst`: the base file's metadata (with
/// `general.name` set to `name`) and tensors, except those in `replaced`,
/// which are written as f32 (in llama.cpp's row order where the base file
/// uses it), or with `quantize` in the base tensor's own type where that is
/// a quantized one (a file the size of the base; the quantization costs
/// what the base's did).
pub fn write_merged_gguf(
    base: &WeightFile,
    replaced: &[(TensorId, Tensor)],
    name: &str,
    dst: &Path,
    quantize: bool,
) -> Result<()> {
    if base.gguf_metadata().is_none() {
        return Err(ModelError::InvalidConfig(
            "a merged GGUF needs a GGUF base model".into(),
        ));
    }
    let src = base.path();
    let mut file = std::fs::File::open(src).map_err(io(src))?;
    let content = crate::gguf::read_content(&mut file, src)?;
    let mut new: HashMap<String, QTensor> = HashMap::new();
    for (id, t) in replaced {
        let t = t.to_dtype(DType::F32)?;
        let t = match base.permuted_heads(*id) {
            Some(heads) => permute_for_gguf(&t, heads)?,
            None => t,
        };
        // Gemma's norms go back to llama.cpp's `1 + w`.
        let shift = base.gguf_shift(*id);
        let t = if shift == 0.0 { t } else { (t + shift)? };
        let gguf = id.gguf_name();
        let dtype = match content.tensor_infos.get(&gguf).map(|i| i.ggml_dtype) {
            Some(d)
                if quantize && !matches!(d, GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16) =>
            {
                d
            }
            _ => GgmlDType::F32,
        };
        let q = QTensor::quantize(&t, dtype).map_err(|e| {
            ModelError::InvalidConfig(format!("cannot write {gguf} as {dtype:?}: {e}"))
        })?;
        new.insert(gguf, q);
    }
    let mut names: Vec<&String> = content.tensor_infos.keys().collect();
    names.sort();
    let mut tensors: Vec<(String, QTensor)> = Vec::with_capacity(names.len());
    for n in names {
        let q = match new.remove(n) {
            Some(q) => q,
            None => content.tensor(&mut file, n, &Device::Cpu)?,
        };
        tensors.push((n.clone(), q));
    }
    if let Some(left) = new.keys().next() {
        return Err(ModelError::MissingTensor { name: left.clone() });
    }
    let mut meta: Vec<(String, gguf_file::Value)> = content
        .metadata
        .iter()
        .filter(|(k, _)| k.as_str() != "general.name")
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    meta.push((
        "general.name".into(),
        gguf_file::Value::String(name.to_string()),
    ));
    meta.sort_by(|a, b| a.0.cmp(&b.0));
    let meta_refs: Vec<(&str, &gguf_file::Value)> =
        meta.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let t_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut f = std::io::BufWriter::new(crate::durable::create(dst)?);
    gguf_file::write(&mut f, &meta_refs, &t_refs)?;
    let f = f
        .into_inner()
        .map_err(|e| ModelError::io(dst, e.into_error()))?;
    f.commit().map_err(io(dst))
}
