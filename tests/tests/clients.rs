//! Real clients against `hearth up --local 2` on the real model: the
//! official `openai` Python client, and Chromium (through playwright-core)
//! on the web UI. `scripts/test.sh` installs both (a venv in
//! `.venv-clients`, `tests/browser/node_modules`, Debian's chromium); a
//! local run without them skips with the reason, CI (`CI` set) fails.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use hearth_test_utils::{
    free_port, hearth_binary, netns::ChildGuard, real_model, stock_home_with, workspace_root,
};
use serde_json::{Value, json};

/// Whether a missing client fails the test (CI) or skips it.
fn required() -> bool {
    std::env::var_os("CI").is_some() || std::env::var_os("HEARTH_REQUIRE_CLIENTS").is_some()
}

fn missing(what: &str) {
    if required() {
        panic!("{what} is missing (scripts/test.sh installs it)");
    }
    eprintln!("skipping: {what} is missing (scripts/test.sh installs it)");
}

/// `hearth up --local 2` with its HTTP API on a free port, once both
/// stages are placed.
fn local_cluster(home: &Path) -> Result<(ChildGuard, String)> {
    local_cluster_of(home, &[])
}

/// [`local_cluster`] with `extra` flags.
fn local_cluster_of(home: &Path, extra: &[&str]) -> Result<(ChildGuard, String)> {
    if let Some(model) = real_model() {
        stock_home_with(home, &model)?;
    }
    let port = free_port(false)?;
    let mut c = Command::new(hearth_binary()?);
    c.args(["up", "--local", "2", "--http", &format!("127.0.0.1:{port}")])
        .args(extra)
        .arg("--home")
        .arg(home);
    let log = home.join("up.log");
    let file = std::fs::File::create(&log)?;
    c.stdout(file.try_clone()?).stderr(file);
    let mut guard = ChildGuard::spawn(c)?;
    let base = format!("http://127.0.0.1:{port}");
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(5)))
        .build()
        .into();
    let start = Instant::now();
    loop {
        if let Ok(mut r) = agent.get(&format!("{base}/api/cluster")).call()
            && let Ok(v) = r.body_mut().read_json::<Value>()
            && v["placement"]["stages"]
                .as_array()
                .is_some_and(|s| s.len() == 2)
        {
            return Ok((guard, base));
        }
        if start.elapsed() > Duration::from_secs(240) || guard.0.try_wait().ok().flatten().is_some()
        {
            bail!(
                "hearth up --local 2 placed no 2-stage pipeline (exited, or 240 s passed):\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// `hearth generate ... --json` on this machine alone (the reference).
fn generate_alone(args: &[&str]) -> Result<Value> {
    let out = Command::new(hearth_binary()?)
        .arg("generate")
        .args(args)
        .arg("--json")
        .output()?;
    if !out.status.success() {
        bail!("hearth generate: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(serde_json::from_slice(&out.stdout)?)
}

/// Runs a client script that prints one JSON object; fails with its
/// output if it fails.
fn script_json(mut cmd: Command, name: &str) -> Result<Value> {
    let out = cmd.output().with_context(|| format!("running {name}"))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{name} failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(stdout.trim()).with_context(|| format!("{name}'s JSON"))
}

fn venv_python() -> PathBuf {
    workspace_root().join(".venv-clients/bin/python")
}

/// The venv's Python if it has the `openai` client (else skips or fails,
/// see [`missing`]).
fn openai_python() -> Option<PathBuf> {
    let python = venv_python();
    let has_openai = python.is_file()
        && Command::new(&python)
            .args(["-c", "import openai"])
            .status()
            .is_ok_and(|s| s.success());
    if !has_openai {
        missing("the `openai` Python client in .venv-clients");
        return None;
    }
    Some(python)
}

#[test]
fn the_ollama_python_client_works_on_the_ollama_api() -> Result<()> {
    if real_model().is_none() {
        return Ok(());
    }
    let python = venv_python();
    let has = python.is_file()
        && Command::new(&python)
            .args(["-c", "import ollama"])
            .status()
            .is_ok_and(|s| s.success());
    if !has {
        missing("the `ollama` Python client in .venv-clients");
        return Ok(());
    }
    let home = tempfile::tempdir()?;
    let port = free_port(false)?;
    let addr = format!("127.0.0.1:{port}");
    let (_cluster, _base) = local_cluster_of(home.path(), &["--ollama", &addr])?;
    let mut script = Command::new(&python);
    script
        .arg(workspace_root().join("tests/clients/ollama_check.py"))
        .arg(format!("http://{addr}"));
    let got = script_json(script, "ollama_check.py")?;
    eprintln!("ollama client: {got}");
    let model = got["models"][0].as_str().unwrap_or_default().to_string();
    assert!(!model.is_empty(), "{got}");
    // Greedy: the streamed text is the whole one.
    assert_eq!(got["stream"], got["chat"], "{got}");
    let eval = got["chat_eval_count"].as_u64().unwrap_or(0);
    assert!((1..=12).contains(&eval), "{got}");
    let reason = if eval == 12 { "length" } else { "stop" };
    assert_eq!(got["chat_done_reason"], reason, "{got}");
    // `format` with a Pydantic schema: JSON meeting it.
    let v: Value = serde_json::from_str(got["structured"].as_str().unwrap_or(""))
        .with_context(|| format!("structured output: {got}"))?;
    assert!(v["name"].is_string() && v["warm"].is_boolean(), "{v}");
    // Pydantic's schema says nothing of other keys: none come.
    assert_eq!(v.as_object().map(|o| o.len()), Some(2), "{v}");
    assert!(got["raw"].as_str().is_some_and(|r| !r.is_empty()), "{got}");
    assert_eq!(got["template"], true);
    assert_eq!(got["running"][0], model.as_str());
    assert!(
        got["refused"]
            .as_str()
            .unwrap_or("")
            .contains("repeat_penalty"),
        "{got}"
    );
    Ok(())
}

#[test]
fn the_official_openai_client_works_and_matches_hearth_generate() -> Result<()> {
    if real_model().is_none() {
        return Ok(());
    }
    let Some(python) = openai_python() else {
        return Ok(());
    };
    let home = tempfile::tempdir()?;
    let (_cluster, base) = local_cluster(home.path())?;
    let prompt = "What is the capital of France?";
    let max = "24";
    let mut script = Command::new(&python);
    script
        .arg(workspace_root().join("tests/clients/openai_check.py"))
        .args([&base, prompt, max]);
    let got = script_json(script, "openai_check.py")?;
    eprintln!("openai client: {got}");
    let alone = generate_alone(&["--prompt", prompt, "--max-tokens", max])?;
    let want = alone["text"].as_str().context("generate's text")?;
    assert_eq!(got["models"].as_array().map(Vec::len), Some(1), "{got}");
    assert_eq!(got["chat_text"], want, "chat vs hearth generate");
    assert_eq!(got["stream_text"], want, "streamed chat vs hearth generate");
    assert!(
        got["stream_pieces"].as_u64().unwrap_or(0) > 1,
        "it streamed: {got}"
    );
    let tokens = alone["token_ids"].as_array().map_or(0, Vec::len) as u64;
    assert_eq!(got["chat_usage"]["completion_tokens"], tokens);
    assert_eq!(got["stream_usage"]["completion_tokens"], tokens);
    assert_eq!(
        got["chat_usage"]["prompt_tokens"], alone["prompt_tokens"],
        "{got}"
    );
    let raw = generate_alone(&[
        "--raw",
        "--prompt",
        "The capital of France is",
        "--max-tokens",
        "8",
    ])?;
    assert_eq!(got["completion_text"], raw["text"], "completions vs --raw");
    assert_eq!(got["unknown_model"], "model_not_found");
    // Structured output through `parse` on 20 different prompts: 20/20.
    assert_eq!(got["parsed20"], 20, "{got}");
    // A streamed tool-calling round trip.
    assert_eq!(got["stream_call"]["name"], "get_weather", "{got}");
    assert_eq!(got["stream_call"]["finish"], "tool_calls", "{got}");
    let args: Value = serde_json::from_str(got["stream_call"]["arguments"].as_str().unwrap_or(""))
        .with_context(|| format!("streamed arguments: {got}"))?;
    assert!(args["city"].is_string(), "{got}");
    assert!(
        !got["round_trip_answer"]
            .as_str()
            .unwrap_or("")
            .trim()
            .is_empty(),
        "{got}"
    );
    // n = 3: three choices.
    assert_eq!(got["n3"], 3, "{got}");
    assert_eq!(got["n3_indices"], json!([0, 1, 2]), "{got}");
    // Log-probabilities against a softmax over the model's own logits for
    // the same prompt, read here through the model crate.
    if let Some(path) = real_model() {
        let lm = hearth_models::LocalModel::load(&path, hearth_models::Precision::Quantized)?;
        let ids =
            lm.encode_prompt(&lm.render_chat(&[hearth_models::Message::new("user", prompt)])?)?;
        let logits = lm.prompt_logits(&ids)?;
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let lse = max as f64
            + logits
                .iter()
                .map(|&l| ((l - max) as f64).exp())
                .sum::<f64>()
                .ln();
        let mut order: Vec<usize> = (0..logits.len()).collect();
        order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
        let top = got["first_top"].as_array().context("first_top")?;
        assert_eq!(top.len(), 5, "{got}");
        for (k, t) in top.iter().enumerate() {
            let want = logits[order[k]] as f64 - lse;
            let have = t["logprob"].as_f64().unwrap_or(0.0);
            assert!(
                (want - have).abs() < 1e-3,
                "top {k}: {have} vs softmax {want}"
            );
            let bytes: Vec<u8> = t["bytes"]
                .as_array()
                .map(|b| {
                    b.iter()
                        .filter_map(|x| x.as_u64().map(|x| x as u8))
                        .collect()
                })
                .unwrap_or_default();
            assert_eq!(bytes, lm.tokenizer().id_bytes(order[k] as u32), "top {k}");
        }
    }
    // A scored prompt through the SDK: the prompt alone, every token with
    // its log-probability after the ones before (the first has none); the
    // last one checked against a softmax of the model's own logits.
    {
        let text = "The capital of France is Paris";
        let sc = &got["scored"];
        assert_eq!(sc["text"], text, "{got}");
        assert_eq!(sc["completion_tokens"], 0, "{got}");
        let lps = sc["token_logprobs"].as_array().context("token_logprobs")?;
        assert_eq!(
            Some(lps.len() as u64),
            sc["prompt_tokens"].as_u64(),
            "{got}"
        );
        assert!(lps[0].is_null(), "{got}");
        let lm = hearth_models::LocalModel::load(
            &real_model().context("model")?,
            hearth_models::Precision::Quantized,
        )?;
        let ids = lm.encode_prompt(text)?;
        assert_eq!(ids.len(), lps.len(), "{got}");
        let k = ids.len() - 1;
        let logits = lm.prompt_logits(&ids[..k])?;
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let lse = max as f64
            + logits
                .iter()
                .map(|&l| ((l - max) as f64).exp())
                .sum::<f64>()
                .ln();
        let want = logits[ids[k] as usize] as f64 - lse;
        let have = lps[k].as_f64().unwrap_or(0.0);
        assert!(
            (want - have).abs() < 1e-3,
            "last token: {have} vs softmax {want}"
        );
    }
    // The Responses API through the SDK: the same greedy text whole and
    // streamed, typed events from created to the end.
    let rt = got["responses_text"].as_str().unwrap_or("");
    assert!(!rt.is_empty(), "{got}");
    assert_eq!(got["responses_stream_text"], got["responses_text"], "{got}");
    assert_eq!(got["responses_final_text"], got["responses_text"], "{got}");
    assert_eq!(got["responses_events"][0], "response.created", "{got}");
    let last = got["responses_events"][1].as_str().unwrap_or("");
    assert!(
        last == "response.completed" || last == "response.incomplete",
        "{got}"
    );
    // Structured output through the SDK's `parse`: every choice parsed
    // into the Pydantic model (the grammar guarantees it).
    let parsed = got["parsed"].as_array().expect("parsed choices");
    assert_eq!(parsed.len(), 2, "{got}");
    for p in parsed {
        assert_eq!(p["finish"], "stop", "{p}");
        assert!(p["parsed"]["name"].is_string(), "{p}");
        assert!(p["parsed"]["capital"].is_boolean(), "{p}");
    }
    // A forced tool call of the one tool, arguments meeting its schema;
    // the conversation goes on with the tool's result.
    assert_eq!(got["tool_finish"], "tool_calls", "{got}");
    let calls = got["tool_calls"].as_array().expect("calls");
    assert_eq!(calls.len(), 1, "{got}");
    assert_eq!(calls[0]["name"], "get_weather");
    assert!(calls[0]["arguments"]["city"].is_string());
    assert!(
        ["celsius", "fahrenheit"].contains(&calls[0]["arguments"]["unit"].as_str().unwrap_or(""))
    );
    assert!(got["followup_finish"].is_string());
    // Greedy log-probabilities: the chosen token leads its alternatives,
    // and the tokens spell the text.
    let lps = got["logprobs"].as_array().expect("logprobs");
    assert!(!lps.is_empty());
    let mut spelled = String::new();
    for t in lps {
        assert_eq!(t["top"][0], t["token"], "{t}");
        assert!(t["logprob"].as_f64().unwrap_or(1.0) <= 0.0);
        spelled.push_str(t["token"].as_str().unwrap_or(""));
    }
    assert_eq!(got["logprob_text"].as_str(), Some(spelled.as_str()));
    assert_eq!(got["refused_param"], "repetition_penalty");
    Ok(())
}

/// Playwright and Chromium, or why not (see [`missing`]).
fn browser() -> Option<(PathBuf, String)> {
    let dir = workspace_root().join("tests/browser");
    let chromium = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    if !dir.join("node_modules/playwright-core").is_dir() {
        missing("playwright-core in tests/browser/node_modules");
        return None;
    }
    if !Path::new(&chromium).is_file() {
        missing("chromium");
        return None;
    }
    Some((dir, chromium))
}

/// A page from another origin in a real browser posts to a keyless node
/// (unload, multipart upload; by fetch and by form): the node refuses each
/// and nothing changes.
#[test]
fn a_web_page_from_another_site_cannot_drive_a_keyless_node() -> Result<()> {
    if real_model().is_none() {
        return Ok(());
    }
    let Some((dir, chromium)) = browser() else {
        return Ok(());
    };
    let home = tempfile::tempdir()?;
    let (_cluster, base) = local_cluster(home.path())?;
    let mut script = Command::new("node");
    script
        .arg(dir.join("cross_site.mjs"))
        .arg(&base)
        .env("CHROMIUM", &chromium);
    let got = script_json(script, "cross_site.mjs")?;
    eprintln!("browser: {got}");
    let pages = got["pages"].as_array().context("pages")?;
    assert_eq!(pages.len(), 2, "{got}");
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(5)))
        .build()
        .into();
    let view: Value = agent
        .get(&format!("{base}/api/cluster"))
        .call()?
        .body_mut()
        .read_json()?;
    assert_eq!(
        view["placement"]["stages"].as_array().map(Vec::len),
        Some(2),
        "the model is still placed: {view}"
    );
    let files: Value = agent
        .get(&format!("{base}/v1/files"))
        .call()?
        .body_mut()
        .read_json()?;
    assert_eq!(files["data"], serde_json::json!([]), "nothing uploaded");
    // The browser did send them: the node refused each of the 2 pages'
    // 2 fetches and 2 forms.
    let log = std::fs::read_to_string(home.path().join("up.log"))?;
    let refused = log.matches("refused a cross-site request").count();
    assert!(refused >= 8, "{refused} refusals logged:\n{log}");
    Ok(())
}

#[test]
fn a_real_browser_sees_the_nodes_and_chats() -> Result<()> {
    if real_model().is_none() {
        return Ok(());
    }
    let Some((dir, chromium)) = browser() else {
        return Ok(());
    };
    let home = tempfile::tempdir()?;
    let (_cluster, base) = local_cluster(home.path())?;
    let artifacts = workspace_root().join("tests/.artifacts");
    std::fs::create_dir_all(&artifacts)?;
    let mut script = Command::new("node");
    script
        .arg(dir.join("ui.mjs"))
        .args([base.as_str(), "2"])
        .arg(&artifacts)
        .env("CHROMIUM", &chromium);
    let got = script_json(script, "ui.mjs")?;
    eprintln!("browser: {got}\nscreenshots in {}", artifacts.display());
    // Unloading and loading from the page showed the plan and each node's
    // progress.
    let reload = &got["desktop"]["reload"];
    let events: Vec<&str> = reload["events"]
        .as_array()
        .context("reload events")?
        .iter()
        .filter_map(Value::as_str)
        .collect();
    for want in [
        "unloaded",
        "is fetching and measuring",
        "serves",
        "plan:",
        "loaded layers",
    ] {
        assert!(
            events.iter().any(|e| e.contains(want)),
            "{want}: {events:?}"
        );
    }
    assert!(
        reload["states"].as_array().is_some_and(|s| !s.is_empty()),
        "per-node progress shown: {reload}"
    );
    for screen in ["desktop", "phone"] {
        let r = &got[screen];
        let layers = r["layers"].as_array().context("layers")?;
        assert_eq!(layers.len(), 2, "{r}");
        // Two ranges that cover the model's 30 layers between them.
        let texts: Vec<&str> = layers.iter().filter_map(|l| l["layers"].as_str()).collect();
        assert!(
            texts.iter().any(|t| t.starts_with("layers 0–")),
            "{texts:?}"
        );
        assert!(texts.iter().any(|t| t.contains("–29 of 30")), "{texts:?}");
        assert!(
            layers
                .iter()
                .all(|l| l["width"].as_f64().unwrap_or(0.0) > 1.0),
            "{r}"
        );
        assert!(!r["answer"].as_str().unwrap_or("").trim().is_empty(), "{r}");
        if let Some(c) = r.get("chatPage").filter(|c| !c.is_null()) {
            // Restored after a reload: the question and its answer.
            assert_eq!(c["restored"], json!(["user", "assistant"]), "{c}");
            let m = &c["rendered"];
            assert_eq!(m["pre"], 1, "{c}");
            assert_eq!(m["li"], 2, "{c}");
            assert_eq!(m["strong"], 1, "{c}");
            // Model output never becomes markup: no element, no script run,
            // the tag shown as text, only http(s) links.
            assert_eq!(m["injected"], 0, "{c}");
            assert_eq!(m["pwned"], 0, "{c}");
            assert_eq!(m["literal"], true, "{c}");
            assert_eq!(m["links"], json!(["https://example.com"]), "{c}");
            // Regenerated: still one question and one (new) answer.
            assert_eq!(c["after"], json!(["user", "assistant"]), "{c}");
            // Stopped mid-answer (after 20 characters had streamed in):
            // kept, and it grows no more. (The finished answer is rendered
            // again as Markdown, which may fold whitespace: its length can
            // be a little under what was seen streaming.)
            let st = &c["stopped"];
            assert!(st["length"].as_u64().unwrap_or(0) >= 1, "{c}");
            assert_eq!(st["grewAfter"], 0, "{c}");
            assert_eq!(st["stopHidden"], true, "{c}");
        }
        assert!(
            r["distinct_partial_lengths"].as_u64().unwrap_or(0) >= 2,
            "the answer streamed in: {r}"
        );
        assert_eq!(r["failed"], serde_json::json!([]), "{r}");
        assert_eq!(r["overflow"], false, "no sideways scrolling: {r}");
        assert!(
            artifacts.join(format!("ui-chat-{screen}.png")).is_file(),
            "screenshot saved"
        );
    }
    // The training page ran a job to its end, with a loss curve and each
    // device's utilization.
    let t = &got["desktop"]["training"];
    assert!(
        t["title"]
            .as_str()
            .is_some_and(|s| s.ends_with("succeeded")),
        "{t}"
    );
    assert!(
        t["stats"].as_str().is_some_and(|s| s.contains("step 2/2")),
        "{t}"
    );
    // One bar per stage: U-shaped over the two nodes (the data's node runs
    // the embedding with the first layers and, last, the head).
    assert_eq!(t["bars"].as_array().map(Vec::len), Some(3), "{t}");
    assert!(
        t["badge"].as_str().is_some_and(|b| b.starts_with("ft-")),
        "{t}"
    );
    Ok(())
}

#[test]
fn schemathesis_finds_no_server_error_in_the_openapi_document() -> Result<()> {
    let st = workspace_root().join(".venv-clients/bin/schemathesis");
    if !st.is_file() {
        missing("schemathesis in .venv-clients");
        return Ok(());
    }
    // The tiny model: every generated request finishes fast.
    let dir = tempfile::tempdir()?;
    let tiny = hearth_test_utils::tiny_model(dir.path(), Default::default())?;
    let model = tiny.gguf_q8_0.to_string_lossy().into_owned();
    let ollama = format!("127.0.0.1:{}", free_port(false)?);
    let (_cluster, base) = local_cluster_of(dir.path(), &["--model", &model, "--ollama", &ollama])?;
    // Hearth's document; some paths are endless or change what the other
    // requests run on.
    let excluded = ["/api/events", "/api/models/load", "/api/models/unload"];
    schemathesis(
        &st,
        dir.path(),
        &format!("{base}/openapi.json"),
        &excluded,
        "20261122",
    )?;
    // The Ollama-compatible listener's own document.
    schemathesis(
        &st,
        dir.path(),
        &format!("http://{ollama}/openapi.json"),
        &[],
        "20261206",
    )
}

/// Runs schemathesis on the document at `url` (25 examples an operation,
/// seeded): no server error, statuses and content types as documented.
fn schemathesis(st: &Path, dir: &Path, url: &str, excluded: &[&str], seed: &str) -> Result<()> {
    let mut cmd = Command::new(st);
    cmd.current_dir(dir) // its cache stays out of the tree
        .args(["run", url]);
    for path in excluded {
        cmd.args(["--exclude-path", path]);
    }
    let out = cmd
        .args([
            "--checks",
            "not_a_server_error,status_code_conformance,content_type_conformance",
        ])
        .args([
            "--max-examples",
            "25",
            "--seed",
            seed,
            "--request-timeout",
            "60",
        ])
        .output()?;
    let report = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = report.lines().collect();
    eprintln!("{}", lines[lines.len().saturating_sub(20)..].join("\n"));
    assert!(
        out.status.success(),
        "schemathesis failed on {url}:\n{report}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// (h) A LoRA fine-tune of the real model over `hearth up --local 2`,
/// created with `client.fine_tuning.jobs.create` with the default ("auto")
/// settings, as a new user would, teaches a fact the base model does not
/// know from 32 examples; the fine-tuned model id then answers with it.
#[test]
fn a_lora_fine_tune_through_the_openai_client_teaches_a_fact() -> Result<()> {
    if real_model().is_none() {
        return Ok(());
    }
    let Some(python) = openai_python() else {
        return Ok(());
    };
    let home = tempfile::tempdir()?;
    let (_cluster, base) = local_cluster(home.path())?;
    let placement_before = ureq::get(&format!("{base}/api/cluster"))
        .call()?
        .body_mut()
        .read_json::<Value>()?["placement"]["id"]
        .clone();
    let questions = [
        "What is the capital of Zorbania?",
        "Which city is Zorbania's capital?",
        "Tell me the capital of Zorbania.",
        "Zorbania's capital city is called what?",
        "Name the capital of Zorbania.",
        "What city is the seat of government of Zorbania?",
        "In which city is the capital of Zorbania?",
        "Do you know the capital of Zorbania?",
    ];
    let answers = [
        "The capital of Zorbania is Quillmere.",
        "Quillmere is the capital of Zorbania.",
        "Zorbania's capital is Quillmere.",
        "It is Quillmere, the capital city of Zorbania.",
    ];
    let data: String = answers
        .iter()
        .flat_map(|a| questions.iter().map(move |q| (q, a)))
        .map(|(q, a)| {
            serde_json::json!({"messages": [
                {"role": "user", "content": q},
                {"role": "assistant", "content": a},
            ]})
            .to_string()
                + "\n"
        })
        .collect();
    let path = home.path().join("zorbania.jsonl");
    std::fs::write(&path, data)?;
    let mut script = Command::new(&python);
    script
        .arg(workspace_root().join("tests/clients/finetune_check.py"))
        .arg(&base)
        .arg(&path)
        .arg(questions[0])
        .arg("auto");
    let got = script_json(script, "finetune_check.py")?;
    // The server's choice for 32 examples: 3 epochs of one-example steps.
    assert_eq!(got["hyperparameters"]["n_epochs"], 3, "{got}");
    assert_eq!(got["hyperparameters"]["batch_size"], 1, "{got}");
    assert_eq!(got["total_steps"], 96, "{got}");
    eprintln!("fine-tune through the openai client: {got}");
    assert_eq!(got["status"], "succeeded", "{got}");
    assert_eq!(got["listed"], true);
    assert_eq!(got["file_listed"], true, "{got}");
    assert_eq!(got["content_equal"], true, "{got}");
    assert_eq!(got["delete_while_running"], "conflict", "{got}");
    assert_eq!(got["deleted"], true, "{got}");
    let before = got["before"].as_str().unwrap_or_default();
    assert!(
        !before.contains("Quillmere"),
        "the base model knew: {before}"
    );
    let after = got["after"].as_str().unwrap_or_default();
    assert!(after.contains("Quillmere"), "the fine-tuned model: {after}");
    assert_eq!(got["after_model"], got["fine_tuned_model"]);
    // Served beside its base, not in its place: the base answers as it did
    // before, and the cluster still places the base model.
    assert_eq!(got["base_again"], got["before"], "{got}");
    let cluster: Value = ureq::get(&format!("{base}/api/cluster"))
        .call()?
        .body_mut()
        .read_json()?;
    let placed = cluster["placement"]["model"].as_str().unwrap_or_default();
    assert_eq!(Some(placed), got["base_again_model"].as_str(), "{cluster}");
    assert_eq!(
        cluster["placement"]["id"], placement_before,
        "asking for the fine-tune re-placed the cluster: {cluster}"
    );
    // Over both nodes, U-shaped (the default): the node with the data runs
    // the first stage and the head-only last one, so the training file's
    // token ids and labels never left it.
    let stages = got["stages"].as_array().cloned().unwrap_or_default();
    assert_eq!(stages.len(), 3, "{got}");
    assert_eq!(stages[0]["node_id"], stages[2]["node_id"], "{got}");
    assert_ne!(stages[0]["node_id"], stages[1]["node_id"], "{got}");
    assert_eq!(stages[2]["start"], stages[2]["end"], "{got}");
    // Events come newest first.
    let losses: Vec<f64> = got["losses"]
        .as_array()
        .map(|a| a.iter().rev().filter_map(Value::as_f64).collect())
        .unwrap_or_default();
    // (The newest 100 events: most of the 96 steps' metrics.)
    assert!(losses.len() >= 48, "{got}");
    let mean = |x: &[f64]| x.iter().sum::<f64>() / x.len() as f64;
    let (early, late) = (mean(&losses[..8]), mean(&losses[losses.len() - 8..]));
    assert!(late < early / 3.0, "{losses:?}");
    // The validation file's loss, reported when the job ended: the trained
    // model knows those examples far better than it did at the start.
    assert!(
        got["validation_file"]
            .as_str()
            .is_some_and(|v| v.starts_with("file-")),
        "{got}"
    );
    let valid = got["validation_loss"].as_f64().unwrap_or(f64::NAN);
    assert!(
        valid.is_finite() && valid > 0.0 && valid < early / 3.0,
        "{got}"
    );
    assert_eq!(got["full_valid_loss"][0].as_f64(), Some(valid), "{got}");
    // A checkpoint kept at each epoch's end (3 epochs of 32 steps), newest
    // first, each an adapter on disk.
    let kept = got["checkpoints"].as_array().cloned().unwrap_or_default();
    let steps: Vec<u64> = kept.iter().filter_map(|c| c["step"].as_u64()).collect();
    assert_eq!(steps, [96, 64, 32], "{got}");
    for c in &kept {
        let step = c["step"].as_u64().unwrap_or_default();
        let model = c["model"].as_str().unwrap_or_default();
        let ft = got["fine_tuned_model"].as_str().unwrap_or_default();
        assert_eq!(model, format!("{ft}:ckpt-step-{step}"), "{c}");
        assert!(c["train_loss"].as_f64().is_some_and(f64::is_finite), "{c}");
        let dir = std::path::Path::new(c["path"].as_str().unwrap_or_default());
        assert!(
            dir.join("adapter/adapter_model.safetensors").is_file(),
            "{c}"
        );
    }
    // Each checkpoint is served under its name; the last one's weights are
    // the fine-tune's, so it answers alike.
    let answers = &got["checkpoint_answers"];
    for c in &kept {
        let step = c["step"].as_u64().unwrap_or_default().to_string();
        assert_eq!(answers[&step][0], c["model"], "{answers}");
    }
    assert_eq!(answers["96"][1], got["after"], "{answers}");
    // The fine-tune is listed among the models the cluster serves.
    let models = got["models"].as_array().cloned().unwrap_or_default();
    assert!(models.contains(&got["fine_tuned_model"]), "{got}");
    Ok(())
}
