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
    /// A Jinja chat template file used in place of the model's own.
    #[arg(long, value_name = "FILE", conflicts_with = "cluster")]
    chat_template: Option<std::path::PathBuf>,
    /// Send the request to a running cluster at this HTTP address
    /// (`hearth up`) instead of loading the model here.
    #[arg(long, value_name = "ADDR")]
    cluster: Option<String>,
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

/// The text of a `--chat-template FILE` (a bounded read: templates are
/// small).
pub fn read_template(path: Option<&std::path::Path>) -> Result<Option<String>> {
    let Some(p) = path else { return Ok(None) };
    let len = std::fs::metadata(p)
        .with_context(|| format!("--chat-template {}", p.display()))?
        .len();
    if len > 1 << 20 {
        anyhow::bail!(
            "--chat-template {}: {len} bytes; at most 1 MiB",
            p.display()
        );
    }
    let text =
        std::fs::read_to_string(p).with_context(|| format!("--chat-template {}", p.display()))?;
    // Compile it now, so a broken one is an error before anything starts.
    hearth_models::ChatTemplate::new(&text, "", "")
        .with_context(|| format!("--chat-template {}", p.display()))?;
    Ok(Some(text))
}

pub fn run(args: Args) -> Result<()> {
    if args.prompt.trim().is_empty() {
        anyhow::bail!("the prompt is empty");
    }
    if let Some(addr) = args.cluster.clone() {
        return run_cluster(&addr, &args);
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
    let template = read_template(args.chat_template.as_deref())?;
    let model = LocalModel::load_with(&path, precision, template.as_deref())
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

/// `--cluster ADDR`: the same request through a running cluster's
/// `POST /api/generate`, streamed as NDJSON.
fn run_cluster(addr: &str, args: &Args) -> Result<()> {
    use std::io::BufRead;
    if args.f32 {
        anyhow::bail!("--f32 applies to a model loaded here, not to --cluster");
    }
    let base = crate::cluster::base_url(addr);
    let url = format!("{base}/api/generate");
    let mut body = serde_json::json!({
        "max_tokens": args.max_tokens,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "top_k": args.top_k,
        "seed": args.seed,
        "stop": args.stop,
        "stream": true,
    });
    if args.raw {
        body["prompt"] = args.prompt.clone().into();
    } else {
        let mut msgs = Vec::new();
        if let Some(s) = &args.system {
            msgs.push(Message::new("system", s.clone()));
        }
        msgs.push(Message::new("user", args.prompt.clone()));
        body["messages"] = serde_json::to_value(msgs)?;
    }
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_connect(Some(std::time::Duration::from_secs(5)))
        .http_status_as_error(false)
        .build()
        .into();
    let mut resp = agent
        .post(&url)
        .send_json(&body)
        .with_context(|| format!("no Hearth node answers at {base} (is `hearth up` running?)"))?;
    if !resp.status().is_success() {
        let status = resp.status();
        let v: serde_json::Value = resp.body_mut().read_json().unwrap_or_default();
        let msg = v["error"]["message"]
            .as_str()
            .unwrap_or("no details")
            .to_string();
        anyhow::bail!("the cluster refused the request ({status}): {msg}");
    }
    let reader = std::io::BufReader::new(resp.body_mut().as_reader());
    let mut stdout = std::io::stdout().lock();
    for line in reader.lines() {
        let line = line.context("reading the cluster's answer")?;
        if line.trim().is_empty() {
            continue;
        }
        let ev: serde_json::Value = serde_json::from_str(&line)
            .with_context(|| format!("bad event from the cluster: {line}"))?;
        if let Some(e) = ev.get("error") {
            anyhow::bail!(
                "generation failed: {}",
                e.as_str().unwrap_or("unknown error")
            );
        }
        if let Some(done) = ev.get("done") {
            let s: Summary = serde_json::from_value(done.clone())?;
            let decode = if s.decode_secs > 0.0 {
                s.token_ids.len().saturating_sub(1) as f64 / s.decode_secs
            } else {
                0.0
            };
            let prefill = if s.prefill_secs > 0.0 {
                s.prompt_tokens as f64 / s.prefill_secs
            } else {
                0.0
            };
            if args.json {
                let out = JsonOut {
                    model: &s.model,
                    text: &s.text,
                    prompt_token_ids: &s.prompt_token_ids,
                    token_ids: &s.token_ids,
                    prompt_tokens: s.prompt_tokens,
                    completion_tokens: s.token_ids.len(),
                    finish_reason: s.finish_reason,
                    prefill_tok_per_s: prefill,
                    decode_tok_per_s: decode,
                };
                writeln!(stdout, "{}", serde_json::to_string(&out)?)?;
            } else {
                writeln!(stdout)?;
                eprintln!(
                    "[{} prompt tokens, {:.1} tok/s prefill; {} tokens, {:.1} tok/s decode; {:?}; {} stage(s)]",
                    s.prompt_tokens,
                    prefill,
                    s.token_ids.len(),
                    decode,
                    s.finish_reason,
                    s.stages
                );
            }
            return Ok(());
        }
        if !args.json
            && let Some(t) = ev.get("text").and_then(|t| t.as_str())
        {
            stdout.write_all(t.as_bytes())?;
            stdout.flush()?;
        }
    }
    anyhow::bail!("the cluster closed the answer before it was done")
}

/// The `done` event of `POST /api/generate`.
#[derive(serde::Deserialize)]
struct Summary {
    model: String,
    text: String,
    prompt_token_ids: Vec<u32>,
    token_ids: Vec<u32>,
    finish_reason: hearth_models::FinishReason,
    prompt_tokens: usize,
    prefill_secs: f64,
    decode_secs: f64,
    stages: usize,
}
