//! The `hearth` binary's contract: `generate` flags and `--json` fields, and
//! one-line errors with a non-zero exit (never a panic) for bad input.

use std::path::Path;
use std::process::{Command, Output};

use anyhow::Result;
use hearth_test_utils::{TinySpec, tiny_model};

fn hearth(args: &[&str], home: &Path) -> Result<Output> {
    Ok(Command::new(env!("CARGO_BIN_EXE_hearth"))
        .args(args)
        .env("HEARTH_HOME", home)
        .env("HF_HUB_CACHE", home.join("hf"))
        .output()?)
}

/// Asserts a clean failure: non-zero exit, no panic, and exactly one
/// `error:` line, the last on stderr, mentioning `needle` (progress lines
/// such as "pip download ..." may come before it).
fn assert_clean_error(out: &Output, needle: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "expected failure, stderr: {err}");
    assert!(!err.contains("panicked"), "panic: {err}");
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    let errors: Vec<&&str> = lines.iter().filter(|l| l.starts_with("error")).collect();
    assert_eq!(errors.len(), 1, "expected one error line, got: {err}");
    let last = lines.last().copied().unwrap_or("");
    assert!(last.starts_with("error: "), "{err}");
    assert!(last.contains(needle), "expected {needle:?} in: {err}");
}

#[test]
fn a_given_chat_template_replaces_the_models_own() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let m = tiny_model(&dir.path().join("m"), TinySpec::default())?;
    let model = m.gguf_q8_0.to_string_lossy().into_owned();
    let tmpl = dir.path().join("t.jinja");
    std::fs::write(&tmpl, "[{{ messages[-1].content | upper }}]")?;
    let ids = |extra: &[&str], prompt: &str| -> Result<serde_json::Value> {
        let mut a = vec!["generate", "--model", &model, "--prompt", prompt];
        a.extend_from_slice(&["--max-tokens", "1", "--json"]);
        a.extend_from_slice(extra);
        let out = hearth(&a, dir.path())?;
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
        Ok(v["prompt_token_ids"].clone())
    };
    let t = tmpl.to_string_lossy().into_owned();
    let given = ids(&["--chat-template", &t], "the cat")?;
    let raw = ids(&["--raw"], "[THE CAT]")?;
    assert_eq!(given, raw);
    assert_ne!(given, ids(&[], "the cat")?);
    // A broken template is refused before anything loads.
    std::fs::write(&tmpl, "{% for %}")?;
    let out = hearth(
        &[
            "generate",
            "--model",
            &model,
            "--prompt",
            "x",
            "--chat-template",
            &t,
        ],
        dir.path(),
    )?;
    assert_clean_error(&out, "--chat-template");
    Ok(())
}

/// A model that ships no chat template is chatted with as ChatML, and the
/// CLI says so on stderr; one that ships a template says nothing of it.
#[test]
fn a_model_without_a_template_gets_chatml_with_a_warning() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let m = tiny_model(&dir.path().join("m"), TinySpec::default())?;
    // The model's folder with its tokenizer_config.json's template taken out.
    let bare = m.safetensors_dir.clone();
    let cfg = bare.join("tokenizer_config.json");
    let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&cfg)?)?;
    v.as_object_mut().map(|o| o.remove("chat_template"));
    std::fs::write(&cfg, v.to_string())?;
    let run = |model: &Path| -> Result<(String, serde_json::Value)> {
        let m = model.to_string_lossy().into_owned();
        let out = hearth(
            &[
                "generate",
                "--model",
                &m,
                "--prompt",
                "hi",
                "--max-tokens",
                "1",
                "--json",
            ],
            dir.path(),
        )?;
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(out.status.success(), "{err}");
        Ok((
            err,
            serde_json::from_slice::<serde_json::Value>(&out.stdout)?,
        ))
    };
    let (err, _) = run(&bare)?;
    assert!(
        err.contains("ships no chat template") && err.contains("ChatML"),
        "{err}"
    );
    let (err, _) = run(&m.gguf_q8_0)?;
    assert!(!err.contains("ships no chat template"), "{err}");
    Ok(())
}

#[test]
fn generate_json_has_the_contract_fields() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let m = tiny_model(&dir.path().join("m"), TinySpec::default())?;
    let model = m.gguf_q8_0.to_string_lossy().into_owned();
    let out = hearth(
        &[
            "generate",
            "--model",
            &model,
            "--prompt",
            "the cat",
            "--max-tokens",
            "5",
            "--json",
        ],
        dir.path(),
    )?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout)?;
    assert_eq!(
        stdout.trim().lines().count(),
        1,
        "exactly one JSON object: {stdout}"
    );
    let v: serde_json::Value = serde_json::from_str(stdout.trim())?;
    for f in [
        "model",
        "text",
        "prompt_token_ids",
        "token_ids",
        "prompt_tokens",
        "completion_tokens",
        "finish_reason",
        "prefill_tok_per_s",
        "decode_tok_per_s",
    ] {
        assert!(v.get(f).is_some(), "missing {f} in {v}");
    }
    assert_eq!(
        v["prompt_tokens"].as_u64(),
        Some(v["prompt_token_ids"].as_array().map_or(0, |a| a.len()) as u64)
    );
    assert_eq!(
        v["completion_tokens"].as_u64(),
        Some(v["token_ids"].as_array().map_or(0, |a| a.len()) as u64)
    );
    assert!(matches!(
        v["finish_reason"].as_str(),
        Some("stop" | "length")
    ));
    // The chat template was applied: the prompt starts with <|im_start|> (id 1).
    assert_eq!(v["prompt_token_ids"][0].as_u64(), Some(1));
    // --raw sends the text as is.
    let out = hearth(
        &[
            "generate",
            "--model",
            &model,
            "--prompt",
            "the cat",
            "--raw",
            "--max-tokens",
            "3",
            "--json",
        ],
        dir.path(),
    )?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    assert_ne!(v["prompt_token_ids"][0].as_u64(), Some(1));
    Ok(())
}

#[test]
fn seeded_sampling_is_reproducible_from_the_cli() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let m = tiny_model(&dir.path().join("m"), TinySpec::default())?;
    let model = m.gguf_q8_0.to_string_lossy().into_owned();
    let run = |seed: &str| -> Result<serde_json::Value> {
        let out = hearth(
            &[
                "generate",
                "--model",
                &model,
                "--prompt",
                "hello",
                "--temperature",
                "1.0",
                "--top-p",
                "0.9",
                "--seed",
                seed,
                "--max-tokens",
                "12",
                "--json",
            ],
            dir.path(),
        )?;
        Ok(serde_json::from_slice(&out.stdout)?)
    };
    assert_eq!(run("3")?["token_ids"], run("3")?["token_ids"]);
    Ok(())
}

#[test]
fn bad_inputs_get_one_line_errors() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let home = dir.path();
    let m = tiny_model(&home.join("m"), TinySpec::default())?;
    let model = m.gguf_q8_0.to_string_lossy().into_owned();
    let gen_with = |model: &str, prompt: &str| {
        hearth(
            &[
                "generate",
                "--model",
                model,
                "--prompt",
                prompt,
                "--max-tokens",
                "2",
            ],
            home,
        )
    };

    assert_clean_error(
        &gen_with(&home.join("missing.gguf").to_string_lossy(), "hi")?,
        "not found",
    );

    let junk = home.join("junk.gguf");
    std::fs::write(&junk, b"GGUF but not really")?;
    assert_clean_error(
        &gen_with(&junk.to_string_lossy(), "hi")?,
        "not a valid GGUF",
    );

    let cut = home.join("cut.gguf");
    let bytes = std::fs::read(&m.gguf_q8_0)?;
    std::fs::write(&cut, &bytes[..bytes.len() / 2])?;
    assert_clean_error(&gen_with(&cut.to_string_lossy(), "hi")?, "truncated");

    let m2 = tiny_model(
        &home.join("neox"),
        TinySpec {
            architecture: "gpt_neox",
            ..TinySpec::default()
        },
    )?;
    assert_clean_error(
        &gen_with(&m2.gguf_q8_0.to_string_lossy(), "hi")?,
        "unsupported architecture",
    );

    let iq = home.join("iq.gguf");
    hearth_test_utils::gguf_with_tensor_type(&m.gguf_q8_0, &iq, "token_embd.weight", 16)?;
    assert_clean_error(
        &gen_with(&iq.to_string_lossy(), "hi")?,
        "unsupported tensor type",
    );

    assert_clean_error(&gen_with(&model, "")?, "empty");
    assert_clean_error(&gen_with(&model, "   ")?, "empty");
    // The tiny model's context is 128 tokens.
    assert_clean_error(&gen_with(&model, &"word ".repeat(300))?, "context");

    let out = hearth(
        &[
            "generate",
            "--model",
            &model,
            "--prompt",
            "hi",
            "--temperature=-1",
        ],
        home,
    )?;
    assert_clean_error(&out, "temperature");
    Ok(())
}

#[test]
fn missing_pip_says_how_to_pass_a_model() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let out = Command::new(env!("CARGO_BIN_EXE_hearth"))
        .args(["generate", "--prompt", "hi"])
        .env("HEARTH_HOME", dir.path())
        .env("HEARTH_PYTHON", dir.path().join("no-such-python"))
        .output()?;
    assert_clean_error(&out, "--model");
    Ok(())
}

#[test]
fn models_list_shows_the_store_and_the_hf_cache() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let home = dir.path();
    let m = tiny_model(&home.join("m"), TinySpec::default())?;
    std::fs::create_dir_all(home.join("models"))?;
    std::fs::copy(&m.gguf_q8_0, home.join("models/tiny.gguf"))?;
    // A Hugging Face cache entry resolved by ORG/NAME.
    let snap = home.join("hf/models--acme--tiny/snapshots/abc123");
    std::fs::create_dir_all(&snap)?;
    for f in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ] {
        std::fs::copy(m.safetensors_dir.join(f), snap.join(f))?;
    }
    let out = hearth(&["models", "list"], home)?;
    let text = String::from_utf8(out.stdout)?;
    assert!(text.contains("tiny.gguf"), "{text}");
    assert!(text.contains("acme/tiny"), "{text}");
    assert!(text.contains("smollm2-135m-instruct"), "{text}");
    // Both an ORG/NAME from the cache and a safetensors directory load and generate.
    for model in ["acme/tiny", &m.safetensors_dir.to_string_lossy()] {
        let out = hearth(
            &[
                "generate",
                "--model",
                model,
                "--prompt",
                "the",
                "--max-tokens",
                "3",
                "--json",
            ],
            home,
        )?;
        assert!(
            out.status.success(),
            "{model}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// The real model through the CLI: greedy ids equal llama.cpp's golden prefix.
#[test]
fn real_model_greedy_matches_llama_cpp_fixture() -> Result<()> {
    let Some(path) = hearth_test_utils::real_model() else {
        return Ok(());
    };
    let fixture = hearth_test_utils::workspace_root().join("tests/fixtures/llamacpp_golden.json");
    let g: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(fixture)?)?;
    let case = &g["cases"][1];
    let margins: Vec<f64> = case["top2_margins"]
        .as_array()
        .map(|a| a.iter().filter_map(|x| x.as_f64()).collect())
        .unwrap_or_default();
    let n = margins
        .iter()
        .position(|&m| m < 0.3)
        .unwrap_or(margins.len());
    let user = case["user"].as_str().unwrap_or_default();
    let dir = tempfile::tempdir()?;
    let out = hearth(
        &[
            "generate",
            "--model",
            &path.to_string_lossy(),
            "--prompt",
            user,
            "--max-tokens",
            "24",
            "--json",
        ],
        dir.path(),
    )?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(v["prompt_token_ids"], case["prompt_ids"]);
    let ours: Vec<u64> = v["token_ids"]
        .as_array()
        .map(|a| a.iter().filter_map(|x| x.as_u64()).collect())
        .unwrap_or_default();
    let theirs: Vec<u64> = case["token_ids"]
        .as_array()
        .map(|a| a.iter().filter_map(|x| x.as_u64()).collect())
        .unwrap_or_default();
    assert!(n >= 3, "fixture case should have a confident prefix");
    assert_eq!(ours[..n.min(ours.len())], theirs[..n.min(ours.len())]);
    Ok(())
}

#[test]
fn cluster_commands_fail_cleanly_on_bad_input() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let home = dir.path();
    // No cluster yet.
    assert_clean_error(&hearth(&["token"], home)?, "no cluster yet");
    // Bad tokens and peers are refused before anything starts.
    for (args, needle) in [
        (vec!["up", "--join", "nope", "--no-mdns"], "join token"),
        (
            vec!["up", "--join", "hearth1-zz", "--no-mdns"],
            "join token",
        ),
        (vec!["up", "--peer", "no-port", "--no-mdns"], "HOST:PORT"),
        (
            vec!["status", "--http", "127.0.0.1:1"],
            "no Hearth node answers",
        ),
    ] {
        assert_clean_error(&hearth(&args, home)?, needle);
    }
    // clap's own usage error for a malformed address.
    let out = hearth(&["up", "--quic", "not-an-addr"], home)?;
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("invalid socket address"));
    // An address in use is a clear error, not a panic.
    let taken = std::net::TcpListener::bind("127.0.0.1:0")?;
    let http = taken.local_addr()?.to_string();
    let out = hearth(
        &["up", "--no-mdns", "--quic", "127.0.0.1:0", "--http", &http],
        home,
    )?;
    assert_clean_error(&out, "cannot listen");
    // `up` made the cluster before failing to listen; `token` prints it.
    let out = hearth(&["token"], home)?;
    assert!(out.status.success());
    assert!(String::from_utf8(out.stdout)?.starts_with("hearth1-"));
    Ok(())
}

/// `hearth train JOB.toml` runs a job over two local nodes, writes the
/// adapter and a merged model, and refuses a bad job file in one line.
#[test]
fn train_runs_a_job_file_and_refuses_a_bad_one() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let m = tiny_model(&dir.path().join("m"), TinySpec::default())?;
    let mut data = String::new();
    for i in 0..8 {
        data += &format!("{{\"text\":\"the fox {i} jumps over {i} dogs\"}}\n");
    }
    std::fs::write(dir.path().join("data.jsonl"), data)?;
    let job = format!(
        "model = {:?}\ndata = \"data.jsonl\"\noutput_dir = \"out\"\nsteps = 3\nbatch_size = 4\nmicro_batches = 2\nseq_len = 64\nlearning_rate = 0.01\n\n[method]\ntype = \"lora\"\nrank = 4\n",
        m.gguf_q8_0.to_string_lossy()
    );
    let path = dir.path().join("job.toml");
    std::fs::write(&path, job)?;
    let home = dir.path().join("home");
    let p = path.to_string_lossy().into_owned();
    let h = home.to_string_lossy().into_owned();
    let out = hearth(&["train", &p, "--local", "2", "--home", &h], &home)?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("done: 3 steps"), "{stdout}");
    assert!(stdout.contains("fine-tuned model: ft-"), "{stdout}");
    assert!(
        dir.path()
            .join("out/adapter/adapter_model.safetensors")
            .is_file()
    );
    assert!(dir.path().join("out/checkpoint/job.json").is_file());

    std::fs::write(
        &path,
        "model = \"x\"\ndata = \"data.jsonl\"\noutput_dir = \"o\"\nbatch = 3\n",
    )?;
    let out = hearth(&["train", &p, "--home", &h], &home)?;
    assert_clean_error(&out, "not a job file");
    std::fs::write(
        &path,
        "model = \"x\"\ndata = \"data.jsonl\"\noutput_dir = \"o\"\nlearning_rate = -1.0\n",
    )?;
    let out = hearth(&["train", &p, "--home", &h], &home)?;
    assert_clean_error(&out, "learning_rate");
    Ok(())
}
