//! Test helpers shared by Hearth's crates: tiny random-weight llama models
//! written to disk in every format the loaders read, and the location of the
//! real default model for end-to-end checks.

pub mod cgroup;
pub mod cluster;
pub mod home;
pub mod hub;
pub mod netns;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use candle_core::quantized::gguf_file::Value;
use candle_core::quantized::{GgmlDType, QTensor, gguf_file};
use candle_core::{DType, Device, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// SmolLM2's chat template (also used by the tiny models).
pub const SMOLLM2_TEMPLATE: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

/// Shape of a tiny model.
#[derive(Debug, Clone)]
pub struct TinySpec {
    pub hidden: usize,
    pub intermediate: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub context: usize,
    pub tied: bool,
    pub attention_bias: bool,
    pub architecture: &'static str,
    pub seed: u64,
    /// More GGUF matrix types to write (K-quants need `hidden` and
    /// `intermediate` to be multiples of 256).
    pub extra_types: Vec<GgmlDType>,
    /// The GGUF's chat template [default: SmolLM2's].
    pub chat_template: Option<String>,
}

impl Default for TinySpec {
    fn default() -> Self {
        Self {
            hidden: 64,
            intermediate: 128,
            layers: 4,
            heads: 4,
            kv_heads: 2,
            context: 128,
            tied: true,
            attention_bias: false,
            architecture: "llama",
            seed: 7,
            extra_types: Vec::new(),
            chat_template: None,
        }
    }
}

/// Paths of one tiny model written in several formats with the same weights.
#[derive(Debug, Clone)]
pub struct TinyModel {
    pub spec: TinySpec,
    pub vocab: usize,
    /// GGUF with f32 tensors (Q/K rows permuted as llama.cpp's converter does).
    pub gguf_f32: PathBuf,
    /// GGUF with Q8_0 matrices.
    pub gguf_q8_0: PathBuf,
    /// GGUF with Q4_1 matrices (repacked to Q8_0 at load).
    pub gguf_q4_1: PathBuf,
    /// Directory with config.json, model.safetensors, tokenizer.json.
    pub safetensors_dir: PathBuf,
    /// The `extra_types` GGUFs.
    pub extra: Vec<(GgmlDType, PathBuf)>,
}

/// GPT-2's byte-to-unicode table: the 256 byte-level "characters".
pub fn byte_level_alphabet() -> Vec<char> {
    let mut bs: Vec<u32> = (b'!' as u32..=b'~' as u32)
        .chain(0xA1..=0xAC)
        .chain(0xAE..=0xFF)
        .collect();
    let mut cs = bs.clone();
    let mut n = 0;
    for b in 0..256u32 {
        if !bs.contains(&b) {
            bs.push(b);
            cs.push(256 + n);
            n += 1;
        }
    }
    let mut pairs: Vec<(u32, u32)> = bs.into_iter().zip(cs).collect();
    pairs.sort();
    pairs
        .into_iter()
        .filter_map(|(_, c)| char::from_u32(c))
        .collect()
}

/// Tokens of the tiny vocabulary: 3 specials, 256 bytes, a few merges.
fn tiny_vocab() -> (Vec<String>, Vec<String>, Vec<i32>) {
    let mut tokens: Vec<String> = vec![
        "<|endoftext|>".into(),
        "<|im_start|>".into(),
        "<|im_end|>".into(),
    ];
    let mut types = vec![3, 3, 3];
    for c in byte_level_alphabet() {
        tokens.push(c.to_string());
        types.push(1);
    }
    let merges: Vec<String> = vec!["Ġ t".into(), "h e".into(), "Ġt he".into(), "i n".into()];
    for m in &merges {
        tokens.push(m.replace(' ', ""));
        types.push(1);
    }
    (tokens, merges, types)
}

/// Writes a tiny random llama model in every supported format under `dir`.
pub fn tiny_model(dir: &Path, spec: TinySpec) -> Result<TinyModel> {
    std::fs::create_dir_all(dir)?;
    let mut rng = StdRng::seed_from_u64(spec.seed);
    let (tokens, merges, types) = tiny_vocab();
    let vocab = tokens.len();
    let hd = spec.hidden / spec.heads;
    let mut randn = |shape: &[usize], std: f32, mean: f32| -> Result<Tensor> {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n)
            .map(|_| {
                // Box-Muller
                let u1: f32 = rng.random::<f32>().max(1e-7);
                let u2: f32 = rng.random::<f32>();
                mean + std * (-2.0 * u1.ln()).sqrt() * (std::f32::consts::TAU * u2).cos()
            })
            .collect();
        Ok(Tensor::from_vec(v, shape, &Device::Cpu)?)
    };
    // HF-named tensors.
    let mut hf: Vec<(String, Tensor)> = Vec::new();
    let h = spec.hidden;
    hf.push((
        "model.embed_tokens.weight".into(),
        randn(&[vocab, h], 1.0, 0.0)?,
    ));
    for i in 0..spec.layers {
        let p = format!("model.layers.{i}");
        let s = 1.0 / (h as f32).sqrt();
        hf.push((
            format!("{p}.input_layernorm.weight"),
            randn(&[h], 0.1, 1.0)?,
        ));
        hf.push((
            format!("{p}.self_attn.q_proj.weight"),
            randn(&[spec.heads * hd, h], s, 0.0)?,
        ));
        hf.push((
            format!("{p}.self_attn.k_proj.weight"),
            randn(&[spec.kv_heads * hd, h], s, 0.0)?,
        ));
        hf.push((
            format!("{p}.self_attn.v_proj.weight"),
            randn(&[spec.kv_heads * hd, h], s, 0.0)?,
        ));
        if spec.attention_bias {
            hf.push((
                format!("{p}.self_attn.q_proj.bias"),
                randn(&[spec.heads * hd], 0.1, 0.0)?,
            ));
            hf.push((
                format!("{p}.self_attn.k_proj.bias"),
                randn(&[spec.kv_heads * hd], 0.1, 0.0)?,
            ));
            hf.push((
                format!("{p}.self_attn.v_proj.bias"),
                randn(&[spec.kv_heads * hd], 0.1, 0.0)?,
            ));
        }
        if spec.architecture == "qwen3" {
            // Per-head query and key norms.
            hf.push((
                format!("{p}.self_attn.q_norm.weight"),
                randn(&[hd], 0.2, 1.0)?,
            ));
            hf.push((
                format!("{p}.self_attn.k_norm.weight"),
                randn(&[hd], 0.2, 1.0)?,
            ));
        }
        hf.push((
            format!("{p}.self_attn.o_proj.weight"),
            randn(&[h, spec.heads * hd], s, 0.0)?,
        ));
        hf.push((
            format!("{p}.post_attention_layernorm.weight"),
            randn(&[h], 0.1, 1.0)?,
        ));
        hf.push((
            format!("{p}.mlp.gate_proj.weight"),
            randn(&[spec.intermediate, h], s, 0.0)?,
        ));
        hf.push((
            format!("{p}.mlp.up_proj.weight"),
            randn(&[spec.intermediate, h], s, 0.0)?,
        ));
        let sd = 1.0 / (spec.intermediate as f32).sqrt();
        hf.push((
            format!("{p}.mlp.down_proj.weight"),
            randn(&[h, spec.intermediate], sd, 0.0)?,
        ));
    }
    hf.push(("model.norm.weight".into(), randn(&[h], 0.1, 1.0)?));
    if !spec.tied {
        hf.push(("lm_head.weight".into(), randn(&[vocab, h], 0.3, 0.0)?));
    }

    // Safetensors + config.json + tokenizer files.
    let st_dir = dir.join("safetensors");
    std::fs::create_dir_all(&st_dir)?;
    let map: HashMap<String, Tensor> = hf.iter().cloned().collect();
    candle_core::safetensors::save(&map, st_dir.join("model.safetensors"))?;
    let config = serde_json::json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": spec.architecture,
        "vocab_size": vocab,
        "hidden_size": h,
        "intermediate_size": spec.intermediate,
        "num_hidden_layers": spec.layers,
        "num_attention_heads": spec.heads,
        "num_key_value_heads": spec.kv_heads,
        "rope_theta": 10000.0,
        "rms_norm_eps": 1e-5,
        "max_position_embeddings": spec.context,
        "tie_word_embeddings": spec.tied,
        "attention_bias": spec.attention_bias,
    });
    std::fs::write(
        st_dir.join("config.json"),
        serde_json::to_string_pretty(&config)?,
    )?;
    write_tokenizer_json(&st_dir, &tokens, &merges)?;

    // GGUF variants.
    let permuted = spec.architecture == "llama";
    let write = |path: &Path, dtype: GgmlDType| -> Result<()> {
        let mut qts: Vec<(String, QTensor)> = Vec::new();
        for (name, t) in &hf {
            let mut t = t.clone();
            if permuted && (name.contains("q_proj") || name.contains("k_proj")) {
                let heads = if name.contains("q_proj") {
                    spec.heads
                } else {
                    spec.kv_heads
                };
                t = hearth_models::weights::permute_for_gguf(&t, heads)?;
            }
            let is_matrix = t.rank() == 2;
            let dt = if is_matrix { dtype } else { GgmlDType::F32 };
            qts.push((
                gguf_name(name),
                QTensor::quantize(&t.to_dtype(DType::F32)?, dt)?,
            ));
        }
        let arch = spec.architecture;
        let meta: Vec<(String, Value)> = vec![
            ("general.architecture".into(), Value::String(arch.into())),
            (
                format!("{arch}.block_count"),
                Value::U32(spec.layers as u32),
            ),
            (
                format!("{arch}.context_length"),
                Value::U32(spec.context as u32),
            ),
            (format!("{arch}.embedding_length"), Value::U32(h as u32)),
            (
                format!("{arch}.feed_forward_length"),
                Value::U32(spec.intermediate as u32),
            ),
            (
                format!("{arch}.attention.head_count"),
                Value::U32(spec.heads as u32),
            ),
            (
                format!("{arch}.attention.head_count_kv"),
                Value::U32(spec.kv_heads as u32),
            ),
            (format!("{arch}.rope.freq_base"), Value::F32(10000.0)),
            (
                format!("{arch}.attention.layer_norm_rms_epsilon"),
                Value::F32(1e-5),
            ),
            ("tokenizer.ggml.model".into(), Value::String("gpt2".into())),
            ("tokenizer.ggml.pre".into(), Value::String("smollm".into())),
            (
                "tokenizer.ggml.tokens".into(),
                Value::Array(tokens.iter().map(|t| Value::String(t.clone())).collect()),
            ),
            (
                "tokenizer.ggml.token_type".into(),
                Value::Array(types.iter().map(|&t| Value::I32(t)).collect()),
            ),
            (
                "tokenizer.ggml.merges".into(),
                Value::Array(merges.iter().map(|t| Value::String(t.clone())).collect()),
            ),
            ("tokenizer.ggml.bos_token_id".into(), Value::U32(1)),
            ("tokenizer.ggml.eos_token_id".into(), Value::U32(2)),
            (
                "tokenizer.chat_template".into(),
                Value::String(
                    spec.chat_template
                        .clone()
                        .unwrap_or_else(|| SMOLLM2_TEMPLATE.into()),
                ),
            ),
        ];
        let meta_refs: Vec<(&str, &Value)> = meta.iter().map(|(k, v)| (k.as_str(), v)).collect();
        let t_refs: Vec<(&str, &QTensor)> = qts.iter().map(|(k, v)| (k.as_str(), v)).collect();
        let mut f = std::fs::File::create(path).with_context(|| path.display().to_string())?;
        gguf_file::write(&mut f, &meta_refs, &t_refs)?;
        Ok(())
    };
    let gguf_f32 = dir.join("tiny-f32.gguf");
    let gguf_q8_0 = dir.join("tiny-q8_0.gguf");
    let gguf_q4_1 = dir.join("tiny-q4_1.gguf");
    write(&gguf_f32, GgmlDType::F32)?;
    write(&gguf_q8_0, GgmlDType::Q8_0)?;
    write(&gguf_q4_1, GgmlDType::Q4_1)?;
    let mut extra = Vec::new();
    for &t in &spec.extra_types {
        let p = dir.join(format!("tiny-{t:?}.gguf").to_lowercase());
        write(&p, t)?;
        extra.push((t, p));
    }
    Ok(TinyModel {
        spec,
        vocab,
        gguf_f32,
        gguf_q8_0,
        gguf_q4_1,
        safetensors_dir: st_dir,
        extra,
    })
}

/// llama.cpp's GGUF name of a Hugging Face tensor name.
pub fn gguf_name(name: &str) -> String {
    name.replace("model.embed_tokens", "token_embd")
        .replace("model.norm", "output_norm")
        .replace("lm_head", "output")
        .replace("model.layers.", "blk.")
        .replace("self_attn.q_proj", "attn_q")
        .replace("self_attn.k_proj", "attn_k")
        .replace("self_attn.v_proj", "attn_v")
        .replace("self_attn.o_proj", "attn_output")
        .replace("self_attn.q_norm", "attn_q_norm")
        .replace("self_attn.k_norm", "attn_k_norm")
        .replace("self_attn.qkv_proj", "attn_qkv")
        .replace("mlp.gate_up_proj", "ffn_up")
        .replace("post_attention_layernorm", "ffn_norm")
        .replace("input_layernorm", "attn_norm")
        .replace("mlp.gate_proj", "ffn_gate")
        .replace("mlp.up_proj", "ffn_up")
        .replace("mlp.down_proj", "ffn_down")
}

/// Writes a Hugging Face llama folder (`config.json` + safetensors) as an
/// f32 GGUF the way llama.cpp's converter lays it out (Q/K rows permuted
/// for its interleaved RoPE), plus `extra` tensors under their GGUF names,
/// and `llama.attention.sliding_window` where `config.json` has a window.
/// A Gemma 2/3 folder is written as llama.cpp's `gemma2`/`gemma3`: no
/// permutation, every norm stored as `1 + w`, its post-norms' names, the
/// soft-caps, the global RoPE theta and scaling and the local theta; Gemma
/// 2's layer pattern left to the reader (llama.cpp writes none), and the
/// query scale as `attention.scale` where it is not the head size's. A
/// Phi-3 folder is written as `phi3`: its stacked `attn_qkv` and `ffn_up`
/// (gate and up), unpermuted.
/// Holds no tokenizer: for model-code checks.
pub fn hf_llama_to_gguf(hf_dir: &Path, out: &Path, extra: &[(String, Tensor)]) -> Result<()> {
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(hf_dir.join("config.json"))?)?;
    let num = |k: &str| -> Result<u32> {
        cfg[k]
            .as_u64()
            .map(|v| v as u32)
            .with_context(|| format!("config.json {k}"))
    };
    let theta = cfg["rope_theta"]
        .as_f64()
        .or_else(|| cfg["rope_parameters"]["rope_theta"].as_f64())
        .unwrap_or(10_000.0);
    let (heads, kv_heads) = (num("num_attention_heads")?, num("num_key_value_heads")?);
    let hf =
        hearth_models::Config::from_hf_json(&std::fs::read_to_string(hf_dir.join("config.json"))?)?;
    let tensors = candle_core::safetensors::load(hf_dir.join("model.safetensors"), &Device::Cpu)?;
    let gemma = hf.is_gemma();
    // Architectures llama.cpp keeps under their own name, unpermuted.
    let native = gemma || hf.fused_projections();
    let mut qts: Vec<(String, QTensor)> = Vec::new();
    for (name, t) in &tensors {
        let mut t = t.to_dtype(DType::F32)?;
        if native {
            let name = if gemma {
                if name.ends_with("norm.weight") {
                    t = (t + 1.0)?;
                }
                gguf_name(
                    &name
                        .replace("post_attention_layernorm", "post_attention_norm")
                        .replace("pre_feedforward_layernorm", "ffn_norm")
                        .replace("post_feedforward_layernorm", "post_ffw_norm"),
                )
            } else {
                gguf_name(name)
            };
            qts.push((name, QTensor::quantize(&t, GgmlDType::F32)?));
            continue;
        }
        if name.contains("q_proj") || name.contains("k_proj") {
            let h = if name.contains("q_proj") {
                heads
            } else {
                kv_heads
            };
            t = hearth_models::weights::permute_for_gguf(&t, h as usize)?;
        }
        qts.push((gguf_name(name), QTensor::quantize(&t, GgmlDType::F32)?));
    }
    for (name, t) in extra {
        qts.push((name.clone(), QTensor::quantize(t, GgmlDType::F32)?));
    }
    // Phi-3's LongRoPE factors, as llama.cpp's converter stores them.
    if let Some(hearth_models::config::RopeScaling::LongRope {
        short_factor,
        long_factor,
        ..
    }) = &hf.rope_scaling
    {
        for (name, f) in [
            (hearth_models::weights::ROPE_FACTORS_SHORT, short_factor),
            (hearth_models::weights::ROPE_FACTORS_LONG, long_factor),
        ] {
            let v: Vec<f32> = f.iter().map(|x| *x as f32).collect();
            let t = Tensor::from_vec(v, f.len(), &Device::Cpu)?;
            qts.push((name.to_string(), QTensor::quantize(&t, GgmlDType::F32)?));
        }
    }
    qts.sort_by(|a, b| a.0.cmp(&b.0));
    let a = if native {
        hf.architecture.as_str()
    } else {
        "llama"
    };
    let meta: Vec<(String, Value)> = vec![
        ("general.architecture".into(), Value::String(a.into())),
        (
            format!("{a}.block_count"),
            Value::U32(num("num_hidden_layers")?),
        ),
        (
            format!("{a}.context_length"),
            Value::U32(num("max_position_embeddings")?),
        ),
        (
            format!("{a}.embedding_length"),
            Value::U32(num("hidden_size")?),
        ),
        (
            format!("{a}.feed_forward_length"),
            Value::U32(num("intermediate_size")?),
        ),
        (format!("{a}.attention.head_count"), Value::U32(heads)),
        (format!("{a}.attention.head_count_kv"), Value::U32(kv_heads)),
        (
            format!("{a}.attention.key_length"),
            Value::U32(u32::try_from(hf.head_dim)?),
        ),
        (format!("{a}.vocab_size"), Value::U32(num("vocab_size")?)),
        (
            format!("{a}.rope.freq_base"),
            Value::F32(if gemma { hf.rope_theta } else { theta } as f32),
        ),
        (
            format!("{a}.attention.layer_norm_rms_epsilon"),
            Value::F32(cfg["rms_norm_eps"].as_f64().unwrap_or(1e-5) as f32),
        ),
    ];
    let mut meta = meta;
    if native {
        meta.push((
            format!("{a}.rope.dimension_count"),
            Value::U32(u32::try_from(hf.rotary_dim())?),
        ));
    }
    if let Some(hearth_models::config::RopeScaling::LongRope {
        original_max_position_embeddings,
        attention_factor,
        ..
    }) = hf.rope_scaling
    {
        meta.push((
            format!("{a}.rope.scaling.attn_factor"),
            Value::F32(attention_factor as f32),
        ));
        meta.push((
            format!("{a}.rope.scaling.original_context_length"),
            Value::U32(original_max_position_embeddings as u32),
        ));
    }
    if gemma {
        let mut push = |k: &str, v: Value| meta.push((format!("{a}.{k}"), v));
        if let Some(c) = hf.attn_logit_softcap {
            push("attn_logit_softcapping", Value::F32(c as f32));
        }
        if let Some(c) = hf.final_logit_softcap {
            push("final_logit_softcapping", Value::F32(c as f32));
        }
        if let Some(t) = hf.rope_local_theta {
            push("rope.freq_base_swa", Value::F32(t as f32));
        }
        if let Some(hearth_models::config::RopeScaling::Linear { factor }) = hf.rope_scaling {
            push("rope.scaling.type", Value::String("linear".into()));
            push("rope.scaling.factor", Value::F32(factor as f32));
        }
        if hf.query_pre_attn_scalar != Some(hf.head_dim as f64) {
            push("attention.scale", Value::F32(hf.attn_scale() as f32));
        }
    }
    // The window, as transformers reads the folder (Qwen's only when
    // switched on), with the layers it covers where not all.
    if let Some(w) = hf.sliding_window {
        meta.push((
            format!("{a}.attention.sliding_window"),
            Value::U32(u32::try_from(w)?),
        ));
        if !hf.sliding_layers.is_empty() && a != "gemma2" {
            meta.push((
                format!("{a}.attention.sliding_window_pattern"),
                Value::Array(hf.sliding_layers.iter().map(|b| Value::Bool(*b)).collect()),
            ));
        }
    }
    let meta_refs: Vec<(&str, &Value)> = meta.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let t_refs: Vec<(&str, &QTensor)> = qts.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut f = std::fs::File::create(out).with_context(|| out.display().to_string())?;
    gguf_file::write(&mut f, &meta_refs, &t_refs)?;
    Ok(())
}

fn write_tokenizer_json(dir: &Path, tokens: &[String], merges: &[String]) -> Result<()> {
    let vocab: serde_json::Map<String, serde_json::Value> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), serde_json::json!(i)))
        .collect();
    let added: Vec<serde_json::Value> = tokens[..3]
        .iter()
        .enumerate()
        .map(|(i, t)| serde_json::json!({"id": i, "content": t, "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}))
        .collect();
    let tok = serde_json::json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": true},
            {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true}
        ]},
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
                  "vocab": vocab, "merges": merges}
    });
    std::fs::write(dir.join("tokenizer.json"), serde_json::to_string(&tok)?)?;
    let cfg = serde_json::json!({
        "bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "add_bos_token": false,
        "chat_template": SMOLLM2_TEMPLATE,
    });
    std::fs::write(
        dir.join("tokenizer_config.json"),
        serde_json::to_string(&cfg)?,
    )?;
    Ok(())
}

/// Puts the real default model `model` into the store of a node whose
/// `--home` is `home` (a symbolic link), as `hearth models pull` would have:
/// such a node then finds the default model by name without fetching it.
pub fn stock_home_with(home: &Path, model: &Path) -> std::io::Result<()> {
    let models = hearth_models::dirs::Dirs::resolve(Some(home)).models();
    std::fs::create_dir_all(&models)?;
    let dest = hearth_models::store::default_model_path_in(&models);
    if !dest.exists() {
        std::os::unix::fs::symlink(model, &dest)?;
    }
    Ok(())
}

/// The real default model if it is on disk.
///
/// Returns `None` (after printing why) when it is missing, unless
/// `HEARTH_REQUIRE_MODEL` is set — CI sets it, so there the test fails
/// instead of silently skipping.
pub fn real_model() -> Option<PathBuf> {
    // The store `hearth models pull` fills; or where versions before the
    // platform folders kept it, until a `hearth` command moves it.
    let path = hearth_models::store::default_model_path();
    if path.is_file() {
        return Some(path);
    }
    if let Some(old) = hearth_models::dirs::Dirs::legacy()
        .map(|l| hearth_models::store::default_model_path_in(&l.join("models")))
        .filter(|p| p.is_file())
    {
        return Some(old);
    }
    if std::env::var_os("HEARTH_REQUIRE_MODEL").is_some() {
        panic!(
            "HEARTH_REQUIRE_MODEL is set but {} is missing (run `hearth models pull`)",
            path.display()
        );
    }
    eprintln!(
        "skipping: the real model {} is missing (run `hearth models pull`)",
        path.display()
    );
    None
}

/// A wgpu device on the best adapter wgpu finds, software ones included
/// (Mesa's llvmpipe where there is no GPU).
///
/// Returns `None` (after printing why) when there is none, unless
/// `HEARTH_REQUIRE_GPU` is set — CI sets it, so there the test fails.
pub fn gpu() -> Option<std::sync::Arc<hearth_models::gpu::Gpu>> {
    match hearth_models::gpu::Gpu::open(None, true) {
        Ok(g) => Some(g),
        Err(e) if std::env::var_os("HEARTH_REQUIRE_GPU").is_some() => {
            panic!("HEARTH_REQUIRE_GPU is set but no adapter opened: {e}")
        }
        Err(e) => {
            eprintln!("skipping: no wgpu adapter ({e}); install mesa-vulkan-drivers");
            None
        }
    }
}

/// The workspace root (for fixtures).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .nth(2)
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// Copies a GGUF file, setting the type id of tensor `name` to `type_id`
/// (e.g. 16 = IQ2_XXS, which the loaders do not support).
pub fn gguf_with_tensor_type(src: &Path, dst: &Path, name: &str, type_id: u32) -> Result<()> {
    let mut b = std::fs::read(src)?;
    let needle = name.as_bytes();
    let at = b
        .windows(needle.len())
        .position(|w| w == needle)
        .with_context(|| format!("no tensor {name}"))?;
    // After the name: n_dims (u32), then n_dims u64 dims, then the type (u32).
    let nd_at = at + needle.len();
    let n_dims = u32::from_le_bytes([b[nd_at], b[nd_at + 1], b[nd_at + 2], b[nd_at + 3]]) as usize;
    let ty_at = nd_at + 4 + 8 * n_dims;
    b[ty_at..ty_at + 4].copy_from_slice(&type_id.to_le_bytes());
    std::fs::write(dst, b)?;
    Ok(())
}

/// The `hearth` binary of this workspace (debug profile), for tests that run
/// nodes as processes. `cargo test --workspace` has built it already; it is
/// rebuilt (once per test process) only if a source file is newer.
pub fn hearth_binary() -> Result<PathBuf> {
    static BUILT: std::sync::OnceLock<Result<PathBuf, String>> = std::sync::OnceLock::new();
    BUILT
        .get_or_init(|| build_hearth(false))
        .clone()
        .map_err(|e| anyhow::anyhow!(e))
}

/// The release `hearth` binary, for benchmarks (built like [`hearth_binary`]).
pub fn hearth_release_binary() -> Result<PathBuf> {
    static BUILT: std::sync::OnceLock<Result<PathBuf, String>> = std::sync::OnceLock::new();
    BUILT
        .get_or_init(|| build_hearth(true))
        .clone()
        .map_err(|e| anyhow::anyhow!(e))
}

/// Starts `hearth up` on loopback (no mDNS) with its own home, QUIC and
/// HTTP ports and `extra` flags; killed when the guard drops.
pub fn hearth_up(
    home: &Path,
    name: &str,
    quic: u16,
    http: u16,
    extra: &[String],
) -> Result<netns::ChildGuard> {
    netns::ChildGuard::spawn(hearth_up_command(home, name, quic, http, extra)?)
}

/// The command [`hearth_up`] runs (to wrap it, e.g. into a CPU cgroup).
pub fn hearth_up_command(
    home: &Path,
    name: &str,
    quic: u16,
    http: u16,
    extra: &[String],
) -> Result<std::process::Command> {
    hearth_up_command_with(&hearth_binary()?, home, name, quic, http, extra)
}

/// [`hearth_up_command`] with another `hearth` binary (a release build).
pub fn hearth_up_command_with(
    binary: &Path,
    home: &Path,
    name: &str,
    quic: u16,
    http: u16,
    extra: &[String],
) -> Result<std::process::Command> {
    hearth_up_command_at(
        binary,
        home,
        name,
        std::net::Ipv4Addr::LOCALHOST.into(),
        quic,
        http,
        extra,
    )
}

/// [`hearth_up_command_with`] listening on `ip` (a namespace's LAN
/// address, say) instead of loopback.
pub fn hearth_up_command_at(
    binary: &Path,
    home: &Path,
    name: &str,
    ip: std::net::IpAddr,
    quic: u16,
    http: u16,
    extra: &[String],
) -> Result<std::process::Command> {
    let mut c = std::process::Command::new(binary);
    c.args(["up", "--no-mdns", "--name", name])
        .arg("--home")
        .arg(home)
        .args(["--quic", &format!("{ip}:{quic}")])
        .args(["--http", &format!("{ip}:{http}")])
        .args(extra)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    Ok(c)
}

fn build_hearth(release: bool) -> Result<PathBuf, String> {
    let root = workspace_root();
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    let bin = target
        .join(if release { "release" } else { "debug" })
        .join("hearth");
    let built = std::fs::metadata(&bin).and_then(|m| m.modified()).ok();
    let fresh = built.is_some_and(|b| {
        [
            "crates",
            "runtime",
            "models",
            "partitioner",
            "web-ui",
            "Cargo.lock",
        ]
        .iter()
        .all(|d| newest_mtime(&root.join(d)).is_none_or(|t| t <= b))
    });
    if !fresh {
        let mut cmd = std::process::Command::new(env!("CARGO"));
        cmd.args(["build", "-q", "-p", "hearth-cli"])
            .current_dir(&root);
        if release {
            cmd.arg("--release");
        }
        let status = cmd
            .status()
            .map_err(|e| format!("running cargo build: {e}"))?;
        if !status.success() {
            return Err("cargo build -p hearth-cli failed".into());
        }
    }
    Ok(bin)
}

/// The newest modification time of the Rust sources, manifests and web UI
/// files under `path` (skipping tests, which do not go into the binary).
fn newest_mtime(path: &Path) -> Option<std::time::SystemTime> {
    let meta = std::fs::metadata(path).ok()?;
    if meta.is_file() {
        return meta.modified().ok();
    }
    let mut newest = None;
    for e in std::fs::read_dir(path).ok()?.flatten() {
        let p = e.path();
        let name = e.file_name();
        let name = name.to_string_lossy();
        let t = if p.is_dir() {
            if name == "tests" || name == "target" || name.starts_with('.') {
                continue;
            }
            newest_mtime(&p)
        } else if [".rs", ".html", ".js", ".css"]
            .iter()
            .any(|x| name.ends_with(x))
            || name == "Cargo.toml"
        {
            e.metadata().ok().and_then(|m| m.modified().ok())
        } else {
            None
        };
        newest = newest.max(t);
    }
    newest
}

/// A free port on 127.0.0.1 for UDP (`udp`) or TCP (racy, fine for tests).
pub fn free_port(udp: bool) -> Result<u16> {
    Ok(if udp {
        std::net::UdpSocket::bind("127.0.0.1:0")?
            .local_addr()?
            .port()
    } else {
        std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port()
    })
}

/// Splits the GGUF `src` into `parts` files `{base}-0000i-of-0000n.gguf` in
/// `dir` as llama.cpp's gguf-split writes them: the first holds the
/// metadata and every part `split.no`, `split.count` and
/// `split.tensors.count`; the tensors are dealt out in name order, in
/// contiguous runs. Returns the parts' paths.
pub fn split_gguf(src: &Path, dir: &Path, base: &str, parts: usize) -> Result<Vec<PathBuf>> {
    let mut f = std::fs::File::open(src)?;
    let content = gguf_file::Content::read(&mut f)?;
    let mut names: Vec<&String> = content.tensor_infos.keys().collect();
    names.sort();
    let total = names.len();
    let per = total.div_ceil(parts.max(1));
    let mut out = Vec::new();
    for (i, chunk) in names.chunks(per.max(1)).enumerate() {
        let tensors = chunk
            .iter()
            .map(|n| Ok(((*n).clone(), content.tensor(&mut f, n, &Device::Cpu)?)))
            .collect::<Result<Vec<(String, QTensor)>>>()?;
        let mut meta: Vec<(String, Value)> = if i == 0 {
            content
                .metadata
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect()
        } else {
            Vec::new()
        };
        meta.push(("split.no".into(), Value::U16(u16::try_from(i)?)));
        meta.push(("split.count".into(), Value::U16(u16::try_from(parts)?)));
        meta.push((
            "split.tensors.count".into(),
            Value::I32(i32::try_from(total)?),
        ));
        meta.sort_by(|a, b| a.0.cmp(&b.0));
        let path = dir.join(format!("{base}-{:05}-of-{parts:05}.gguf", i + 1));
        let m: Vec<(&str, &Value)> = meta.iter().map(|(k, v)| (k.as_str(), v)).collect();
        let t: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
        let mut w = std::fs::File::create(&path)?;
        gguf_file::write(&mut w, &m, &t)?;
        out.push(path);
    }
    anyhow::ensure!(
        out.len() == parts,
        "{total} tensors do not fill {parts} parts"
    );
    Ok(out)
}

/// The model families with tiny fixtures written by transformers
/// (`tests/fixtures/hf/NAME`) and by llama.cpp's layout
/// (`tests/fixtures/llamacpp/NAME`).
pub const HF_FAMILIES: [&str; 8] = [
    "llama3-rope",
    "qwen3",
    "mistral-swa",
    "qwen2-swa",
    "gemma2",
    "gemma3",
    "phi3",
    "phi3-longrope",
];

/// A copy of the Hugging Face model folder `dir` (one `model.safetensors`)
/// made `layers` deep, written under `out`: layer `i` is a copy of layer
/// `i % n`, and the config's `num_hidden_layers` and `layer_types` follow
/// (the types repeat). The copy is a model of the same family with enough
/// layers to cut in three; pipelines over it are compared with itself.
pub fn deepened_hf(dir: &Path, layers: usize, out: &Path) -> Result<PathBuf> {
    std::fs::create_dir_all(out)?;
    for e in std::fs::read_dir(dir)? {
        let p = e?.path();
        let name = p.file_name().map(|n| n.to_string_lossy().into_owned());
        match name.as_deref() {
            Some("config.json" | "model.safetensors") | None => {}
            Some(n) if p.is_file() => {
                std::fs::copy(&p, out.join(n))?;
            }
            Some(_) => {}
        }
    }
    let mut config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("config.json"))?)?;
    // Layer-count-dependent settings it does not rescale: refused, not
    // copied wrong.
    for key in ["text_config", "vision_config", "sliding_window_pattern"] {
        if !config[key].is_null() {
            anyhow::bail!("deepened_hf does not rescale {key} ({})", dir.display());
        }
    }
    if config["use_sliding_window"] == true && !config["max_window_layers"].is_null() {
        anyhow::bail!(
            "deepened_hf does not rescale max_window_layers ({})",
            dir.display()
        );
    }
    let n = config["num_hidden_layers"]
        .as_u64()
        .ok_or_else(|| anyhow::anyhow!("no num_hidden_layers"))? as usize;
    config["num_hidden_layers"] = layers.into();
    if let Some(types) = config["layer_types"].as_array().cloned()
        && !types.is_empty()
    {
        let t: Vec<serde_json::Value> = (0..layers)
            .map(|i| types[i % types.len()].clone())
            .collect();
        config["layer_types"] = t.into();
    }
    std::fs::write(out.join("config.json"), serde_json::to_vec_pretty(&config)?)?;
    let tensors =
        candle_core::safetensors::load(dir.join("model.safetensors"), &candle_core::Device::Cpu)?;
    let mut deep = std::collections::HashMap::new();
    for (name, t) in tensors {
        let layer = name
            .split_once(".layers.")
            .and_then(|(pre, rest)| rest.split_once('.').map(|(i, post)| (pre, i, post)))
            .and_then(|(pre, i, post)| {
                Some((pre.to_string(), i.parse::<usize>().ok()?, post.to_string()))
            });
        match layer {
            Some((pre, i, post)) => {
                for j in (i..layers).step_by(n) {
                    deep.insert(format!("{pre}.layers.{j}.{post}"), t.clone());
                }
            }
            None if name.contains("layers.") => {
                anyhow::bail!("deepened_hf: {name} is a layer tensor of an unknown naming")
            }
            None => {
                deep.insert(name, t);
            }
        }
    }
    candle_core::safetensors::save(&deep, out.join("model.safetensors"))?;
    Ok(out.to_path_buf())
}

/// A random rank-`rank` LoRA adapter on all seven projections of every
/// layer of a model shaped like `cfg`, written in `dir` as PEFT's files
/// (what a Hearth LoRA job writes; candle's generator: each call a new
/// one).
pub fn write_random_peft(dir: &Path, cfg: &hearth_models::Config, rank: usize) -> Result<()> {
    use hearth_models::train::export::{safetensors_bytes, write_atomic};
    std::fs::create_dir_all(dir)?;
    let (h, hd) = (cfg.hidden_size, cfg.head_dim);
    let q = cfg.num_attention_heads * hd;
    let kv = cfg.num_key_value_heads * hd;
    let inter = cfg.intermediate_size;
    let projs = [
        ("self_attn.q_proj", h, q),
        ("self_attn.k_proj", h, kv),
        ("self_attn.v_proj", h, kv),
        ("self_attn.o_proj", q, h),
        ("mlp.gate_proj", h, inter),
        ("mlp.up_proj", h, inter),
        ("mlp.down_proj", inter, h),
    ];
    let dev = Device::Cpu;
    let mut tensors = Vec::new();
    for layer in 0..cfg.num_hidden_layers {
        for (name, input, output) in projs.iter() {
            let pre = format!("base_model.model.model.layers.{layer}.{name}");
            let a = Tensor::randn(0f32, 0.02, (rank, *input), &dev)?;
            let b = Tensor::randn(0f32, 0.02, (*output, rank), &dev)?;
            tensors.push((format!("{pre}.lora_A.weight"), a));
            tensors.push((format!("{pre}.lora_B.weight"), b));
        }
    }
    write_atomic(
        &dir.join("adapter_model.safetensors"),
        &safetensors_bytes(&tensors, None)?,
    )?;
    let config = serde_json::json!({"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank,
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]});
    write_atomic(
        &dir.join("adapter_config.json"),
        &serde_json::to_vec(&config)?,
    )?;
    Ok(())
}

/// A trained-looking LoRA adapter of `base` (random A, B drawn with
/// `init_b_std`, so it changes the model) on `targets`, written as PEFT
/// files under `dir/adapter`, and its merged model at `dir/merged.gguf`
/// (what serving the fine-tune alone would load). Returns both paths.
pub fn lora_with_merged(
    base: &hearth_models::WeightFile,
    dir: &Path,
    seed: u64,
    rank: usize,
    targets: &[hearth_models::train::Target],
    init_b_std: f64,
) -> Result<(PathBuf, PathBuf)> {
    use hearth_models::train::export::{merged_tensors, write_merged_gguf, write_peft_adapter};
    use hearth_models::train::{LoraConfig, Method, TrainOptions, TrainStage};
    let lora = LoraConfig {
        rank,
        alpha: 2.0 * rank as f64,
        dropout: 0.0,
        targets: targets.to_vec(),
        init_b_std,
    };
    let method = Method::Lora(lora.clone());
    let stage = TrainStage::load(
        base,
        hearth_models::StageSpec::full(base.config().num_hidden_layers),
        &TrainOptions {
            method: method.clone(),
            dtype: DType::F32,
            seed,
        },
    )?;
    let tensors: Vec<(String, Tensor)> = stage
        .trainables()
        .iter()
        .map(|(n, v)| (n.clone(), v.as_tensor().clone()))
        .collect();
    let peft = dir.join("adapter");
    write_peft_adapter(&peft, &lora, "tiny", &tensors, base.config())?;
    let trained: HashMap<String, Tensor> = tensors.into_iter().collect();
    let merged = dir.join("merged.gguf");
    write_merged_gguf(
        base,
        &merged_tensors(base, &method, &trained)?,
        "merged",
        &merged,
        false,
    )?;
    Ok((peft, merged))
}
