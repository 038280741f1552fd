//! Constrained decoding on the real model's vocabulary: whatever the logits
//! say (random rows, seeded), a sequence drawn under a grammar's mask is
//! text the grammar accepts — JSON that parses and meets its schema, or a
//! regex match — and it ends only when the grammar may end. Sampling's
//! penalties, bias and log-probabilities are checked by their definitions.

use hearth_models::grammar::{self, Grammars};
use hearth_models::{ModelText, Sampler, SamplingParams, Shaping, WeightFile};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};

fn text() -> Option<ModelText> {
    let path = hearth_test_utils::real_model()?;
    let w = WeightFile::open(&path).unwrap();
    Some(ModelText::load(&w).unwrap())
}

/// Draws up to `max` tokens under `grammar` from random logits that favour
/// the end token more and more (so outputs stay short): the text, and
/// whether it ended on an end token.
fn draw(text: &ModelText, grammar: &str, seed: u64, max: usize) -> (String, bool) {
    let g = text.grammars().unwrap().compile(grammar).unwrap();
    let ends = text.tokenizer().eos_ids().to_vec();
    let mut s = Sampler::new(SamplingParams {
        temperature: 1.0,
        seed,
        ..Default::default()
    })
    .unwrap()
    .with_constraint(Box::new(g), &ends);
    let vocab = text.vocab_size();
    let mut rng = StdRng::seed_from_u64(seed ^ 0x5eed);
    let mut out = Vec::new();
    for step in 0..max {
        let mut row: Vec<f32> = (0..vocab).map(|_| rng.random::<f32>() * 4.0).collect();
        for &e in &ends {
            row[e as usize] = step as f32 * 0.5;
        }
        let t = s.pick(&row).unwrap().token;
        if ends.contains(&t) {
            return (text.tokenizer().decode(&out).unwrap(), true);
        }
        out.push(t);
    }
    (text.tokenizer().decode(&out).unwrap(), false)
}

#[test]
fn sequences_drawn_under_a_json_schema_parse_and_validate() {
    let Some(text) = text() else { return };
    let schema = json!({
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 12},
            "age": {"type": "integer", "minimum": 0, "maximum": 150},
            "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3},
            "ok": {"type": "boolean"}
        },
        // No `additionalProperties`: closed all the same (as llama.cpp's
        // and vLLM's engines read it), so exactly these four keys come.
        "required": ["name", "age", "tags", "ok"]
    });
    let g = grammar::json_schema(&schema);
    for seed in 0..6 {
        let (out, ended) = draw(&text, &g, seed, 400);
        assert!(ended, "seed {seed}: never ended: {out:?}");
        let v: Value = serde_json::from_str(&out)
            .unwrap_or_else(|e| panic!("seed {seed}: {out:?} is not JSON: {e}"));
        let o = v.as_object().unwrap();
        assert_eq!(o.len(), 4, "{out}");
        assert!(o["name"].as_str().unwrap().chars().count() <= 12, "{out}");
        let age = o["age"].as_i64().unwrap();
        assert!((0..=150).contains(&age), "{out}");
        let tags = o["tags"].as_array().unwrap();
        assert!(tags.len() <= 3);
        assert!(
            tags.iter()
                .all(|t| ["a", "b", "c"].contains(&t.as_str().unwrap()))
        );
        assert!(o["ok"].is_boolean());
    }
    // Any JSON object.
    for seed in 0..4 {
        let (out, ended) = draw(&text, &grammar::json_object(), seed, 300);
        if ended {
            let v: Value = serde_json::from_str(&out).unwrap();
            assert!(v.is_object(), "{out}");
        } else {
            // Cut short: still a prefix of an object.
            assert!(out.trim_start().starts_with('{'), "{out}");
        }
    }
}

#[test]
fn a_regex_grammar_is_matched_whole() {
    let Some(text) = text() else { return };
    let g = grammar::regex(r"(yes|no), [0-9]{2,4}");
    for seed in 0..8 {
        let (out, ended) = draw(&text, &g, seed, 50);
        assert!(ended, "{out:?}");
        let (word, num) = out.split_once(", ").unwrap();
        assert!(word == "yes" || word == "no", "{out}");
        assert!((2..=4).contains(&num.len()) && num.chars().all(|c| c.is_ascii_digit()));
    }
}

#[test]
fn bad_grammars_are_errors_not_panics() {
    let Some(text) = text() else { return };
    let g: &Grammars = text.grammars().unwrap();
    for bad in [
        "",
        "{",
        "not json",
        r#"{"grammars": 5}"#,
        &grammar::lark("start: ( unclosed"),
        &grammar::json_schema(&json!({"type": "no-such-type"})),
        &grammar::json_schema(&json!({"$ref": "#/definitions/missing"})),
    ] {
        assert!(g.compile(bad).is_err(), "{bad}");
    }
    // A very large schema compiles under llguidance's limits (or is
    // refused by them): either way an answer, not a hang or a panic.
    let mut props = serde_json::Map::new();
    for i in 0..4000 {
        props.insert(
            format!("p{i}"),
            json!({"type": "string", "pattern": "[a-z]{1,40}[0-9]{3,9}"}),
        );
    }
    let huge = grammar::json_schema(
        &json!({"type": "object", "properties": props, "required": props.keys().collect::<Vec<_>>()}),
    );
    let start = std::time::Instant::now();
    let r = g.compile(&huge);
    eprintln!(
        "a 4000-property schema: {:?} in {:?}",
        r.as_ref().map(|_| ()),
        start.elapsed()
    );
}

#[test]
fn penalties_bias_and_logprobs_follow_their_definitions() {
    let row = vec![1.0f32, 2.0, 3.0, 0.5];
    let greedy = SamplingParams::default();
    // Bias makes token 0 the argmax; -100 bans the natural one.
    let mut s = Sampler::new(greedy)
        .unwrap()
        .with_shaping(Shaping {
            logit_bias: vec![(0, 5.0), (2, -100.0), (99, 3.0)],
            ..Default::default()
        })
        .unwrap();
    assert_eq!(s.sample(&row), 0);
    // Frequency penalty: after token 2 was drawn k times its logit is
    // 3 - k * 0.8, so greedy switches to token 1 at the second draw.
    let mut s = Sampler::new(greedy)
        .unwrap()
        .with_shaping(Shaping {
            frequency_penalty: 0.8,
            ..Default::default()
        })
        .unwrap();
    assert_eq!(s.sample(&row), 2);
    assert_eq!(s.sample(&row), 2); // 3 - 0.8 = 2.2 > 2
    assert_eq!(s.sample(&row), 1); // 3 - 1.6 = 1.4 < 2
    // Presence penalty: once, however often.
    let mut s = Sampler::new(greedy)
        .unwrap()
        .with_shaping(Shaping {
            presence_penalty: 1.5,
            ..Default::default()
        })
        .unwrap();
    assert_eq!(s.sample(&row), 2);
    assert_eq!(s.sample(&row), 1); // 1.5 < 2
    assert_eq!(s.sample(&row), 2); // 1.5 beats 0.5 (token 1) and 1.0: no more penalty
    // Out of range is refused.
    for bad in [
        Shaping {
            presence_penalty: 2.5,
            ..Default::default()
        },
        Shaping {
            logit_bias: vec![(1, f32::NAN)],
            ..Default::default()
        },
    ] {
        assert!(Sampler::new(greedy).unwrap().with_shaping(bad).is_err());
    }
    // Log-probabilities are the raw row's log-softmax, whatever shaping did.
    let mut s = Sampler::new(greedy)
        .unwrap()
        .with_shaping(Shaping {
            logit_bias: vec![(0, 10.0)],
            ..Default::default()
        })
        .unwrap()
        .with_logprobs(2);
    let p = s.pick(&row).unwrap();
    let z: f32 = row.iter().map(|x| x.exp()).sum::<f32>().ln();
    let (lp, top) = p.logprobs.unwrap();
    assert_eq!(p.token, 0);
    assert!((lp - (1.0 - z)).abs() < 1e-5);
    assert_eq!(top.len(), 2);
    assert_eq!(top[0].0, 2);
    assert!((top[0].1 - (3.0 - z)).abs() < 1e-5);
    assert_eq!(top[1].0, 1);
    assert!((top[1].1 - (2.0 - z)).abs() < 1e-5);
}

#[test]
fn a_resumed_sampler_goes_on_as_the_original() {
    let rows: Vec<Vec<f32>> = (0..12)
        .map(|i| {
            (0..30)
                .map(|j| ((i * 31 + j * 7) as f32 * 0.37).sin())
                .collect()
        })
        .collect();
    let params = SamplingParams {
        temperature: 0.9,
        seed: 77,
        ..Default::default()
    };
    let shaping = Shaping {
        frequency_penalty: 0.7,
        presence_penalty: 0.3,
        ..Default::default()
    };
    let mut whole = Sampler::new(params)
        .unwrap()
        .with_shaping(shaping.clone())
        .unwrap();
    let all: Vec<u32> = rows.iter().map(|r| whole.sample(r)).collect();
    // Moved after 5 tokens: replayed, then sampling on.
    let mut moved = Sampler::new(params).unwrap().with_shaping(shaping).unwrap();
    moved.replay(&all[..5]).unwrap();
    let rest: Vec<u32> = rows[5..].iter().map(|r| moved.sample(r)).collect();
    assert_eq!(rest, all[5..]);
}

/// Whether `text` (tokenized as the model would write it) is allowed token
/// by token under `grammar`, and may end there.
fn follows(
    grammars: &Grammars,
    tok: &hearth_models::Tokenizer,
    grammar: &str,
    text: &[&str],
) -> bool {
    use hearth_models::sampling::Constraint;
    let mut g = grammars.compile(grammar).unwrap();
    for piece in text {
        let ids = tok.encode_continuation(piece).unwrap();
        for t in ids {
            if !g.allowed().unwrap().allows(t) {
                return false;
            }
            g.accept(t).unwrap();
        }
    }
    g.allowed().unwrap().end
}

fn weather_tools() -> Vec<Value> {
    vec![
        json!({"type": "function", "function": {"name": "get_weather", "strict": true,
        "parameters": {"type": "object", "properties": {"city": {"enum": ["Oslo", "Rome"]}},
            "required": ["city"], "additionalProperties": false}}}),
    ]
}

/// `tool_choice: auto` with strict tools: the model may answer in free
/// text or call, in its template's format, and a call it starts meets the
/// tool's schema. Markers that are text (SmolLM2's vocabulary has no
/// `<tool_call>` token) end the text before them lazily; markers that are
/// special tokens (a vocabulary given `<tool_call>` and `</tool_call>`,
/// as Qwen's has) end it by themselves.
#[test]
fn strict_tools_under_auto_allow_text_or_a_valid_call() {
    use hearth_models::tools::{ToolFormat, auto_grammar};
    let Some(text) = text() else { return };
    let tok = text.tokenizer();
    let grammars = text.grammars().unwrap();
    let tools = weather_tools();
    let none = |_: &str| None;
    let ok = r#"{"name": "get_weather", "arguments": {"city": "Oslo"}}"#;
    let bad = r#"{"name": "get_weather", "arguments": {"city": "Paris"}}"#;
    let hermes = auto_grammar(ToolFormat::Hermes, &tools, false, None, &none).unwrap();
    assert!(follows(grammars, tok, &hermes, &["Sure, it is sunny."]));
    assert!(follows(grammars, tok, &hermes, &[""]));
    assert!(follows(
        grammars,
        tok,
        &hermes,
        &["Let me check.", "<tool_call>\n", ok, "\n</tool_call>"]
    ));
    assert!(follows(
        grammars,
        tok,
        &hermes,
        &[
            "<tool_call>\n",
            ok,
            "\n</tool_call>\n<tool_call>\n",
            ok,
            "\n</tool_call>"
        ]
    ));
    assert!(!follows(
        grammars,
        tok,
        &hermes,
        &["Let me check.", "<tool_call>\n", bad]
    ));
    assert!(!follows(
        grammars,
        tok,
        &hermes,
        &["<tool_call>\n{\"name\": \"nope\""]
    ));
    // One call at most.
    let single = auto_grammar(ToolFormat::Hermes, &tools, true, None, &none).unwrap();
    assert!(!follows(
        grammars,
        tok,
        &single,
        &["<tool_call>\n", ok, "\n</tool_call>\n<tool_call>"]
    ));
    // Mistral: `[TOOL_CALLS]` and a list of calls.
    let mistral = auto_grammar(ToolFormat::Mistral, &tools, false, None, &none).unwrap();
    assert!(follows(grammars, tok, &mistral, &["Hello there"]));
    assert!(follows(
        grammars,
        tok,
        &mistral,
        &["[TOOL_CALLS]", "[", ok, "]"]
    ));
    assert!(!follows(
        grammars,
        tok,
        &mistral,
        &["[TOOL_CALLS]", "[", bad]
    ));
    // Bare JSON (templates without a format), and Llama 3's `parameters`.
    let json_fmt = auto_grammar(ToolFormat::Json, &tools, false, None, &none).unwrap();
    assert!(follows(grammars, tok, &json_fmt, &["It is sunny."]));
    assert!(follows(grammars, tok, &json_fmt, &[ok]));
    assert!(follows(grammars, tok, &json_fmt, &["[", ok, ", ", ok, "]"]));
    assert!(!follows(grammars, tok, &json_fmt, &[bad]));
    assert!(!follows(
        grammars,
        tok,
        &json_fmt,
        &["{\"city\": \"Oslo\"}"]
    ));
    let llama = auto_grammar(ToolFormat::Llama3, &tools, true, None, &none).unwrap();
    assert!(follows(
        grammars,
        tok,
        &llama,
        &[r#"{"name": "get_weather", "parameters": {"city": "Rome"}}"#]
    ));
    assert!(!follows(grammars, tok, &llama, &[ok]));
    // With a response format: its JSON, or a call; no free text.
    let content = json!({"type": "object", "properties": {"answer": {"type": "string"}}, "required": ["answer"]});
    let both = auto_grammar(ToolFormat::Hermes, &tools, false, Some(&content), &none).unwrap();
    assert!(follows(grammars, tok, &both, &[r#"{"answer": "sunny"}"#]));
    assert!(follows(
        grammars,
        tok,
        &both,
        &["<tool_call>\n", ok, "\n</tool_call>"]
    ));
    assert!(!follows(grammars, tok, &both, &["Sure"]));
    let both = auto_grammar(ToolFormat::Json, &tools, false, Some(&content), &none).unwrap();
    assert!(follows(grammars, tok, &both, &[r#"{"answer": "sunny"}"#]));
    assert!(follows(grammars, tok, &both, &[ok]));
    assert!(!follows(grammars, tok, &both, &["Sure"]));
}

#[test]
fn strict_tools_with_special_token_markers() {
    use hearth_models::tools::{ToolFormat, auto_grammar};
    // A tiny model's tokenizer given `<tool_call>` and `</tool_call>` as
    // special tokens, as Qwen's vocabulary has them.
    let dir = tempfile::tempdir().unwrap();
    let m = hearth_test_utils::tiny_model(dir.path(), Default::default()).unwrap();
    let path = m.safetensors_dir.join("tokenizer.json");
    let mut t: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let next = m.vocab as u64;
    let added = t["added_tokens"].as_array_mut().unwrap();
    for (i, name) in ["<tool_call>", "</tool_call>", "[TOOL_CALLS]"]
        .iter()
        .enumerate()
    {
        added.push(
            json!({"id": next + i as u64, "content": name, "single_word": false, "lstrip": false,
            "rstrip": false, "normalized": false, "special": true}),
        );
    }
    std::fs::write(&path, t.to_string()).unwrap();
    let tok = hearth_models::Tokenizer::from_dir(&m.safetensors_dir).unwrap();
    assert!(tok.is_special("<tool_call>") && !tok.is_special("tool"));
    let grammars = Grammars::new(&tok, m.vocab + 3).unwrap();
    let tools = weather_tools();
    let special = |s: &str| tok.special_id(s);
    let g = auto_grammar(ToolFormat::Hermes, &tools, false, None, &special).unwrap();
    let open = next as u32;
    let close = open + 1;
    let ok = r#"{"name": "get_weather", "arguments": {"city": "Oslo"}}"#;
    // Token by token: text, the special opening token, a valid call, the
    // special closing token.
    use hearth_models::sampling::Constraint;
    let mut c = grammars.compile(&g).unwrap();
    let mut feed = |ids: &[u32]| -> bool {
        for &t in ids {
            if !c.allowed().unwrap().allows(t) {
                return false;
            }
            c.accept(t).unwrap();
        }
        true
    };
    assert!(feed(&tok.encode_continuation("Let me look.").unwrap()));
    assert!(feed(&[open]));
    assert!(feed(
        &tok.encode_continuation(&format!("\n{ok}\n")).unwrap()
    ));
    assert!(feed(&[close]));
    assert!(c.allowed().unwrap().end);
    // Inside a call, its schema holds and the text marker is not a call.
    let mut c = grammars.compile(&g).unwrap();
    c.accept(open).unwrap();
    let bad = tok
        .encode_continuation("\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris")
        .unwrap();
    let mut refused = false;
    for t in bad {
        if !c.allowed().unwrap().allows(t) {
            refused = true;
            break;
        }
        c.accept(t).unwrap();
    }
    assert!(refused);
    // Mistral's `[TOOL_CALLS]` as a special token (named by id: Lark reads
    // only `<…>` as token names), and a tool that is not strict beside a
    // strict one: its arguments are any object.
    let mut tools = weather_tools();
    tools.push(json!({"type": "function", "function": {"name": "note",
        "parameters": {"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]}}}));
    let g = auto_grammar(ToolFormat::Mistral, &tools, false, None, &special).unwrap();
    let calls = open + 2;
    let run = |pieces: &[Result<&str, u32>]| -> bool {
        let mut c = grammars.compile(&g).unwrap();
        for p in pieces {
            let ids = match p {
                Ok(text) => tok.encode_continuation(text).unwrap(),
                Err(id) => vec![*id],
            };
            for t in ids {
                if !c.allowed().unwrap().allows(t) {
                    return false;
                }
                c.accept(t).unwrap();
            }
        }
        c.allowed().unwrap().end
    };
    assert!(run(&[Ok("Sure.")]));
    assert!(run(&[Ok("Sure."), Err(calls), Ok("["), Ok(ok), Ok("]")]));
    assert!(run(&[
        Err(calls),
        Ok(r#"[{"name": "note", "arguments": {"anything": 1}}]"#)
    ]));
    assert!(!run(&[
        Err(calls),
        Ok(r#"[{"name": "get_weather", "arguments": {"city": "Paris"}}]"#)
    ]));
}
