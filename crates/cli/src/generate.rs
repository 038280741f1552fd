//! `hearth generate`: one prompt through a model held whole on this machine.

use std::io::Write;

use anyhow::{Context, Result};
use hearth_models::store;
use hearth_models::{GenerateRequest, LocalModel, Message, Precision, SamplingParams};
use serde::Serialize;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// A .gguf file, a directory with config.json + *.safetensors, ORG/NAME from
    /// the Hugging Face cache, or the default model's name.
    #[arg(long)]
    model: Option<String>,
    /// The user message (or the whole prompt with --raw).
    #[arg(long)]
    prompt: String,
    /// A system message.
    #[arg(long)]
    system: Option<String>,
    /// Send the prompt as is, without the chat template.
    #[arg(long)]
    raw: bool,
    #[arg(long, default_value_t = 256)]
    max_tokens: usize,
    /// 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    /// 0 disables top-k.
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Stop when this text appears (may repeat).
    #[arg(long)]
    stop: Vec<String>,
    /// Weights as dense f32 instead of quantized (slower; the training path).
    #[arg(long)]
    f32: bool,
    /// Print one JSON object instead of streaming text.
    #[arg(long)]
    json: bool,
}

#[derive(Serialize)]
struct JsonOut<'a> {
    model: &'a str,
    text: &'a str,
    prompt_token_ids: &'a [u32],
    token_ids: &'a [u32],
    prompt_tokens: usize,
    completion_tokens: usize,
    finish_reason: hearth_models::FinishReason,
    prefill_tok_per_s: f64,
    decode_tok_per_s: f64,
}

pub fn run(args: Args) -> Result<()> {
    if args.prompt.trim().is_empty() {
        anyhow::bail!("the prompt is empty");
    }
    let path = store::resolve(
        args.model.as_deref(),
        &mut crate::models::progress_printer(),
    )?;
    let precision = if args.f32 {
        Precision::F32
    } else {
        Precision::Quantized
    };
    let model = LocalModel::load(&path, precision)
        .with_context(|| format!("loading {}", path.display()))?;
    let prompt_text = if args.raw {
        args.prompt.clone()
    } else {
        let mut msgs = Vec::new();
        if let Some(s) = &args.system {
            msgs.push(Message::new("system", s.clone()));
        }
        msgs.push(Message::new("user", args.prompt.clone()));
        model.render_chat(&msgs)?
    };
    let prompt_ids = model.encode_prompt(&prompt_text)?;
    let req = GenerateRequest {
        prompt_ids: prompt_ids.clone(),
        max_tokens: args.max_tokens,
        sampling: SamplingParams {
            temperature: args.temperature,
            top_p: args.top_p,
            top_k: args.top_k,
            seed: args.seed,
        },
        stop: args.stop.clone(),
    };
    let stream = !args.json;
    let mut stdout = std::io::stdout().lock();
    let gen_out = model.generate(&req, |piece| {
        if stream {
            let _ = stdout.write_all(piece.as_bytes());
            let _ = stdout.flush();
        }
    })?;
    let name = if path == store::default_model_path() {
        store::DEFAULT_MODEL.name.to_string()
    } else {
        model.name.clone()
    };
    if args.json {
        let out = JsonOut {
            model: &name,
            text: &gen_out.text,
            prompt_token_ids: &prompt_ids,
            token_ids: &gen_out.token_ids,
            prompt_tokens: prompt_ids.len(),
            completion_tokens: gen_out.token_ids.len(),
            finish_reason: gen_out.finish_reason,
            prefill_tok_per_s: gen_out.prefill_tok_per_s(),
            decode_tok_per_s: gen_out.decode_tok_per_s(),
        };
        writeln!(stdout, "{}", serde_json::to_string(&out)?)?;
    } else {
        writeln!(stdout)?;
        eprintln!(
            "[{} prompt tokens, {:.1} tok/s prefill; {} tokens, {:.1} tok/s decode; {:?}]",
            prompt_ids.len(),
            gen_out.prefill_tok_per_s(),
            gen_out.token_ids.len(),
            gen_out.decode_tok_per_s(),
            gen_out.finish_reason
        );
    }
    Ok(())
}
