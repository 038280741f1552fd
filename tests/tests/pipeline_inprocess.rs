//! Pipeline inference in one process (each node on its own runtime, real
//! QUIC on loopback): greedy output through 1, 2 and 3 stages equals
//! single-node generation, many sequences at once give the same tokens as
//! alone, and a stage node that dies fails its requests and is planned
//! around.
#![allow(clippy::print_stdout)] // Prints the figures it measures.

use std::time::{Duration, Instant};

use anyhow::Result;
use hearth_models::{GenerateRequest, LocalModel, Precision, SamplingParams};
use hearth_runtime::pipeline::{GenEvent, PlacementPolicy};
use hearth_test_utils::cluster::{
    TunedStore, generate_all, greedy, model_info, pipeline_cluster, tiny_model_info,
};
use hearth_test_utils::{TinySpec, real_model, tiny_model};

/// Single-node reference tokens.
fn reference(
    model: &LocalModel,
    prompt: &[u32],
    max_tokens: usize,
    sampling: SamplingParams,
) -> Result<Vec<u32>> {
    Ok(model
        .generate(
            &GenerateRequest {
                prompt_ids: prompt.to_vec(),
                max_tokens,
                sampling,
                stop: Vec::new(),
            },
            |_| {},
        )?
        .token_ids)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tiny_model_pipelines_match_single_node() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let info = tiny_model_info(dir.path())?;
    let tiny = tiny_model(dir.path(), TinySpec::default())?;
    let local = LocalModel::load(&tiny.gguf_q8_0, Precision::Quantized)?;
    let prompt: Vec<u32> = vec![5, 17, 42, 9, 33, 7];
    let want = reference(&local, &prompt, 40, SamplingParams::default())?;
    let seeded = SamplingParams {
        temperature: 0.9,
        top_p: 0.95,
        top_k: 20,
        seed: 11,
    };
    let want_seeded = reference(&local, &prompt, 40, seeded)?;
    assert!(want.len() > 10, "{want:?}");
    for n in 1..=3 {
        let nodes = pipeline_cluster(n, n, &info, PlacementPolicy::Even).await?;
        let p = nodes[0].node.placement().unwrap();
        println!(
            "{n} node(s): {}",
            p.stages
                .iter()
                .map(|s| format!("{}:{}..{}", s.name, s.spec.start, s.spec.end))
                .collect::<Vec<_>>()
                .join(" ")
        );
        // From every node: the requester need not run stage 0.
        for t in &nodes {
            let got =
                generate_all(&t.node, greedy(prompt.clone(), 40), Duration::from_secs(30)).await?;
            assert_eq!(got.token_ids, want, "{n} stages, asked {}", t.name);
            assert_eq!(got.stages, n);
        }
        let mut params = greedy(prompt.clone(), 40);
        params.sampling = seeded;
        let got = generate_all(&nodes[n - 1].node, params, Duration::from_secs(30)).await?;
        assert_eq!(got.token_ids, want_seeded, "{n} stages, seeded sampling");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_sequences_at_once_match_their_solo_runs() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let info = tiny_model_info(dir.path())?;
    let tiny = tiny_model(dir.path(), TinySpec::default())?;
    let local = LocalModel::load(&tiny.gguf_q8_0, Precision::Quantized)?;
    let prompts: Vec<Vec<u32>> = (0..8u32)
        .map(|i| {
            (0..(3 + i as usize * 2))
                .map(|k| (i * 31 + k as u32 * 7) % 200 + 1)
                .collect()
        })
        .collect();
    let lens: Vec<usize> = (0..8).map(|i| 10 + i * 3).collect();
    let mut want = Vec::new();
    for (p, &m) in prompts.iter().zip(&lens) {
        want.push(reference(&local, p, m, SamplingParams::default())?);
    }
    let nodes = pipeline_cluster(3, 3, &info, PlacementPolicy::Even).await?;
    let node = nodes[1].node.clone();
    let started = Instant::now();
    let runs = prompts.iter().zip(&lens).map(|(p, &m)| {
        let node = node.clone();
        let params = greedy(p.clone(), m);
        tokio::spawn(async move { generate_all(&node, params, Duration::from_secs(60)).await })
    });
    let handles: Vec<_> = runs.collect();
    for (i, h) in handles.into_iter().enumerate() {
        let got = h.await??;
        assert_eq!(got.token_ids, want[i], "sequence {i}");
    }
    println!(
        "8 concurrent sequences through 3 stages in {:?}",
        started.elapsed()
    );
    // Batching happened: fewer batches than tokens on some stage.
    let tokens: usize = lens.iter().sum();
    for t in &nodes {
        for s in t.node.stage_stats() {
            println!(
                "  {}: stage {} ran {} batches (live {})",
                t.name, s.index, s.batches, s.live_sequences
            );
            assert!((s.batches as usize) < tokens + 8, "{s:?}");
        }
    }
    wait_freed(&nodes).await
}

/// Planned over two equal members, single-stream decode keeps the tiny
/// model on one of them; the other holds it whole as a replica, and
/// concurrent requests (entering at either member) run on both, each
/// giving the tokens it gives alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_also_run_on_a_whole_model_replica() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let info = tiny_model_info(dir.path())?;
    let tiny = tiny_model(dir.path(), TinySpec::default())?;
    let local = LocalModel::load(&tiny.gguf_q8_0, Precision::Quantized)?;
    let nodes = pipeline_cluster(2, 1, &info, PlacementPolicy::default()).await?;
    // A member may place the model alone before it has heard of the other;
    // the placement over both follows.
    let started = Instant::now();
    let p = loop {
        let p = nodes[0]
            .node
            .placement()
            .ok_or_else(|| anyhow::anyhow!("no placement"))?;
        if p.members.len() == 2 || started.elapsed() > Duration::from_secs(30) {
            break p;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    println!("placement {:?} replicas {:?}", p.stages, p.replicas);
    assert_eq!(
        p.replicas.len(),
        1,
        "the member outside the pipeline is a replica: {p:?}"
    );
    assert_ne!(p.replicas[0].node_id, p.stages[0].node_id);
    let prompts: Vec<Vec<u32>> = (0..8u32)
        .map(|i| {
            (0..(4 + i as usize))
                .map(|k| (i * 17 + k as u32 * 5) % 200 + 1)
                .collect()
        })
        .collect();
    let mut want = Vec::new();
    for p in &prompts {
        want.push(reference(&local, p, 24, SamplingParams::default())?);
    }
    let handles: Vec<_> = prompts
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let node = nodes[i % 2].node.clone();
            let params = greedy(p.clone(), 24);
            tokio::spawn(async move { generate_all(&node, params, Duration::from_secs(60)).await })
        })
        .collect();
    for (i, h) in handles.into_iter().enumerate() {
        let got = h.await??;
        assert_eq!(got.token_ids, want[i], "sequence {i}");
    }
    for t in &nodes {
        let stats = t.node.stage_stats();
        println!("  {}: {stats:?}", t.name);
        assert!(
            stats.iter().any(|s| s.placement == p.id && s.batches > 0),
            "{} computed nothing for placement {}: {stats:?}",
            t.name,
            p.id
        );
    }
    wait_freed(&nodes).await
}

/// Waits until no stage holds a sequence's cache.
async fn wait_freed(nodes: &[hearth_test_utils::cluster::TestNode]) -> Result<()> {
    let start = Instant::now();
    loop {
        let live: usize = nodes
            .iter()
            .flat_map(|t| t.node.stage_stats())
            .map(|s| s.live_sequences)
            .sum();
        if live == 0 {
            return Ok(());
        }
        anyhow::ensure!(
            start.elapsed() < Duration::from_secs(5),
            "caches still held: {live}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_strings_and_cancellation_free_the_sequence() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let info = tiny_model_info(dir.path())?;
    let nodes = pipeline_cluster(2, 2, &info, PlacementPolicy::Even).await?;
    // Cancel by dropping the stream after two tokens.
    let mut rx = nodes[1].node.generate(greedy(vec![1, 2, 3], 100)).await?;
    let mut seen = 0;
    while let Some(ev) = tokio::time::timeout(Duration::from_secs(10), rx.recv()).await? {
        if let GenEvent::Token { .. } = ev {
            seen += 1;
            if seen == 2 {
                break;
            }
        }
    }
    drop(rx);
    // Every stage frees the sequence.
    wait_freed(&nodes).await?;
    // A stop string: the text ends before it, the reason is "stop", and
    // every stage frees the sequence although no end token came.
    let full = generate_all(
        &nodes[1].node,
        greedy(vec![1, 2, 3], 60),
        Duration::from_secs(30),
    )
    .await?;
    let chars: Vec<char> = full.text.chars().collect();
    assert!(chars.len() > 12, "{:?}", full.text);
    let stop: String = chars[8..11].iter().collect();
    let cut = full.text.find(&stop).unwrap();
    let mut params = greedy(vec![1, 2, 3], 60);
    params.stop = vec![stop.clone()];
    let stopped = generate_all(&nodes[1].node, params, Duration::from_secs(30)).await?;
    assert_eq!(stopped.text, full.text[..cut], "stop {stop:?}");
    assert_eq!(stopped.finish_reason, hearth_models::FinishReason::Stop);
    assert!(stopped.token_ids.len() < full.token_ids.len());
    wait_freed(&nodes).await?;
    // Bad requests are refused with a clear error.
    let err = nodes[0].node.generate(greedy(vec![], 5)).await.unwrap_err();
    assert!(err.to_string().contains("empty"), "{err}");
    let err = nodes[0]
        .node
        .generate(greedy(vec![1], 0))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("max_tokens"), "{err}");
    let mut bad = greedy(vec![1], 3);
    bad.sampling.top_p = 0.0;
    assert!(nodes[0].node.generate(bad).await.is_err());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_model_pipelines_match_single_node() -> Result<()> {
    let Some(path) = real_model() else {
        println!("skipped: the real model is not in the cache (scripts/test.sh fetches it)");
        return Ok(());
    };
    let dir = tempfile::tempdir()?;
    let info = model_info(&path, dir.path())?;
    let local = LocalModel::load(&path, Precision::Quantized)?;
    let prompt = local.encode_prompt(&local.render_chat(&[hearth_models::Message {
        role: "user".into(),
        content: "What is the capital of France?".into(),
    }])?)?;
    let want = reference(&local, &prompt, 24, SamplingParams::default())?;
    println!("single node: {:?}", local.tokenizer().decode(&want)?);
    for n in [1, 2, 3] {
        let nodes = pipeline_cluster(n, n, &info, PlacementPolicy::Even).await?;
        let got = generate_all(
            &nodes[0].node,
            greedy(prompt.clone(), 24),
            Duration::from_secs(60),
        )
        .await?;
        println!(
            "{n} stages: {:?} ({:.1} tok/s)",
            got.text,
            got.decode_tok_per_s()
        );
        assert_eq!(got.token_ids, want, "{n} stages");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_pipeline_streams_do_not_hurt_the_cluster() -> Result<()> {
    use hearth_net::ClusterSecret;
    use hearth_net::framed::read_message;
    use hearth_proto::{
        Forward, GenerateRequest as WireGenerate, Message, SeqChunk, SeqParams, TensorFrame,
        WireDType, encode_frame, limits, stream_kind,
    };
    use hearth_test_utils::cluster::{pipeline_cluster_in, rogue_member};

    let dir = tempfile::tempdir()?;
    let info = tiny_model_info(dir.path())?;
    let secret = ClusterSecret::generate();
    let nodes = pipeline_cluster_in(&secret, 2, 2, &info, PlacementPolicy::Even).await?;
    let placement = nodes[0].node.placement().unwrap();
    let prompt = vec![3, 1, 4, 1, 5];
    let want = generate_all(
        &nodes[0].node,
        greedy(prompt.clone(), 20),
        Duration::from_secs(30),
    )
    .await?
    .token_ids;
    let params = SeqParams {
        temperature: 0.0,
        top_p: 1.0,
        top_k: 0,
        seed: 0,
        max_tokens: 5,
        stop_ids: vec![],
        ..SeqParams::default()
    };
    for t in &nodes {
        let (rogue, conn) = rogue_member(&secret, t).await?;
        // Pipe: garbage, an oversize prefix, and well-formed messages the
        // rogue may not send (it runs no stage of the placement).
        let hidden = TensorFrame::from_f32(0, 0, vec![1, 64], &[0.5; 64], WireDType::F32)?;
        let forward = Message::Forward(Forward {
            placement: placement.id,
            chunks: vec![SeqChunk {
                seq: 1,
                pos: 0,
                len: 1,
                params: Some(params.clone()),
            }],
            hidden,
        });
        let pipe_payloads: Vec<Vec<u8>> = vec![
            vec![0xff; 64],
            (u32::MAX).to_le_bytes().to_vec(),
            encode_frame(&forward)?,
            encode_frame(&Message::Sampled {
                placement: placement.id,
                tokens: vec![hearth_proto::SampledToken {
                    seq: 1,
                    pos: 1,
                    token: 1,
                    finish: hearth_proto::Finish::No,
                    logprobs: None,
                    // A forged prompt score, as large as allowed.
                    prompt_logprobs: vec![
                        hearth_proto::TokenLogprobs {
                            logprob: -1.0,
                            top: vec![(1, -1.0); 20],
                        };
                        hearth_proto::limits::MAX_SCORED_PROMPT
                    ],
                }],
            })?,
            encode_frame(&Message::EndSeqs {
                placement: placement.id,
                seqs: vec![1, 2, 3],
            })?,
            encode_frame(&Message::Heartbeat { seq: 1 })?,
        ];
        for p in &pipe_payloads {
            let (mut s, _r) = conn.open(stream_kind::PIPE).await?;
            s.write_all(p).await?;
            let _ = s.finish();
        }
        // Generate: garbage, another message, an unknown placement, an
        // empty prompt; each gets a refusal (or nothing), never tokens.
        let gen_payloads: Vec<Vec<u8>> = vec![
            vec![0xff; 16],
            encode_frame(&Message::AuthOk)?,
            encode_frame(&Message::Generate(Box::new(WireGenerate {
                placement: 12345,
                prompt: vec![1, 2],
                params: params.clone(),
            })))?,
            encode_frame(&Message::Generate(Box::new(WireGenerate {
                placement: placement.id,
                prompt: vec![],
                params: params.clone(),
            })))?,
            encode_frame(&Message::Generate(Box::new(WireGenerate {
                placement: placement.id,
                prompt: vec![1, u32::MAX],
                params: params.clone(),
            })))?,
        ];
        for p in &gen_payloads {
            let (mut s, mut r) = conn.open(stream_kind::GENERATE).await?;
            s.write_all(p).await?;
            let got = tokio::time::timeout(
                Duration::from_secs(12),
                read_message(&mut r, limits::MAX_CONTROL_FRAME),
            )
            .await?;
            assert!(
                matches!(got, Ok(Some(Message::Refuse(_))) | Ok(None) | Err(_)),
                "{got:?}"
            );
        }
        // Control: garbage, a document of another format, an assignment
        // naming no stage of this node: all refused.
        // An activation of a placement without stages (or with a gap in its
        // layers) must not replace the active one.
        let mut hollow = placement.clone();
        hollow.id += 1_000;
        hollow.stages.clear();
        let mut gap = placement.clone();
        gap.id += 2_000;
        gap.stages[1].spec.start += 1;
        let activate = |p: &hearth_runtime::pipeline::Placement| -> Result<Vec<u8>> {
            let doc = serde_json::json!({"format": 1, "type": "activate", "placement": p});
            Ok(encode_frame(&Message::Control(serde_json::to_vec(&doc)?))?)
        };
        // Well-formed but hostile: a whole placement on the rogue (which
        // would route every prompt to it), one with the last possible id
        // (no placement could follow it), and an assignment of a valid
        // placement. Only the leader places the model.
        let rogue_id = rogue.id().to_string();
        let mut takeover = placement.clone();
        takeover.id += 1;
        takeover.stages = vec![hearth_runtime::pipeline::PlacedStage {
            node_id: rogue_id.clone(),
            name: "rogue".into(),
            spec: hearth_models::StageSpec::full(info.config.num_hidden_layers),
        }];
        takeover.members.push(rogue_id.clone());
        let mut last_id = placement.clone();
        last_id.id = u64::MAX;
        let mut reassign = placement.clone();
        reassign.id += 3;
        let assign = |p: &hearth_runtime::pipeline::Placement| -> Result<Vec<u8>> {
            let doc = serde_json::json!({"format": 1, "type": "assign", "placement": p});
            Ok(encode_frame(&Message::Control(serde_json::to_vec(&doc)?))?)
        };
        // Training orders past every bound: a LoRA rank of 2^28, a
        // checkpoint of u64::MAX bytes, one of 1 GiB for a tiny stage, an
        // optimizer with a NaN, a fifth stage. Each is refused; none aborts.
        let order = |rank: u64, restore_len: u64, beta1: f64| -> Result<Vec<u8>> {
            let doc = serde_json::json!({"format": 1, "type": "train_stage", "order": {
                "job": 77, "stage": 0, "stages": 1,
                "spec": {"start": 0, "end": info.config.num_hidden_layers, "embed": true, "head": true},
                "content": info.times.content.clone().unwrap_or_default(),
                "method": {"type": "lora", "rank": rank, "alpha": 16.0, "targets": ["q", "v"]},
                "schedule": "gpipe", "micro_batches": 2, "prev": null, "next": null, "tied": null,
                "seed": 1, "optim": {"beta1": beta1, "beta2": 0.999, "eps": 1e-8, "weight_decay": 0.0},
                "timeout_s": 30, "restore_len": restore_len, "max_len": 64,
            }});
            Ok(encode_frame(&Message::Control(serde_json::to_vec(&doc)?))?)
        };
        // Adapter orders: from outside the placement, with an id that is a
        // path, naming a thousand holders.
        let prepare = |id: &str, holders: usize| -> Result<Vec<u8>> {
            let doc = serde_json::json!({"format": 1, "type": "prepare_adapter",
                "placement": placement.id, "adapter": {"name": "ft-x", "id": id,
                "base_content": info.times.content.clone().unwrap_or_default(),
                "holders": vec![rogue_id.clone(); holders]}});
            Ok(encode_frame(&Message::Control(serde_json::to_vec(&doc)?))?)
        };
        // Each with (part of) the reason it must be refused for.
        let control_payloads: Vec<(Vec<u8>, &str)> = vec![
            (prepare(&"ab".repeat(32), 1)?, "only a member of the placement"),
            (prepare("../../../../etc/passwd", 1)?, "lower-case hex"),
            (prepare(&"ab".repeat(32), 1000)?, "holders"),
            (activate(&takeover)?, "only the leader"),
            (activate(&last_id)?, "only the leader"),
            (assign(&takeover)?, "only the leader"),
            (assign(&reassign)?, "only the leader"),
            (order(1 << 28, 0, 0.9)?, "rank"),
            (order(4, u64::MAX, 0.9)?, "checkpoint of"),
            (order(4, 1 << 30, 0.9)?, "state takes at most"),
            (order(4, 0, 1.5)?, "optimizer"),
            (activate(&hollow)?, ""),
            (activate(&gap)?, ""),
            (encode_frame(&Message::Control(b"{not json".to_vec()))?, ""),
            (
                encode_frame(&Message::Control(
                    br#"{"format":99,"type":"ready","id":1}"#.to_vec(),
                ))?,
                "",
            ),
            (
                encode_frame(&Message::Control(
                    br#"{"format":1,"type":"assign","placement":{"id":9,"model":"x","fingerprint":"x","content":null,"stages":[],"members":[]}}"#
                        .to_vec(),
                ))?,
                "",
            ),
        ];
        for (p, why) in &control_payloads {
            let (mut s, mut r) = conn.open(stream_kind::CONTROL).await?;
            s.write_all(p).await?;
            let _ = s.finish();
            let got = tokio::time::timeout(
                Duration::from_secs(12),
                read_message(&mut r, limits::MAX_CONTROL_FRAME),
            )
            .await??;
            let Some(Message::Control(doc)) = got else {
                panic!("expected a control reply, got {got:?}");
            };
            let v: serde_json::Value = serde_json::from_slice(&doc)?;
            assert_eq!(v["type"], "failed", "{v}");
            assert!(
                v["reason"].as_str().unwrap_or("").contains(why),
                "refused for another reason than {why:?}: {v}"
            );
        }
        // Weights: garbage, a fetch of another model, of a tensor that does
        // not exist: refused, never a manifest.
        let content = info.times.content.clone().unwrap();
        let weight_payloads: Vec<Vec<u8>> = vec![
            vec![0xff; 32],
            encode_frame(&Message::Control(
                br#"{"format":1,"type":"fetch","content":"00","header":true,"tensors":[]}"#.to_vec(),
            ))?,
            encode_frame(&Message::Control(
                format!(r#"{{"format":1,"type":"fetch","content":"{content}","header":false,"tensors":["nope"]}}"#)
                    .into_bytes(),
            ))?,
            encode_frame(&Message::FileChunk {
                offset: 0,
                data: vec![1, 2, 3],
            })?,
            // An adapter nobody registered, and one named by a path.
            encode_frame(&Message::Control(
                format!(r#"{{"format":1,"type":"fetch_adapter","id":"{}"}}"#, "cd".repeat(32))
                    .into_bytes(),
            ))?,
            encode_frame(&Message::Control(
                br#"{"format":1,"type":"fetch_adapter","id":"../../../../etc/passwd"}"#.to_vec(),
            ))?,
        ];
        for p in &weight_payloads {
            let (mut s, mut r) = conn.open(stream_kind::WEIGHTS).await?;
            s.write_all(p).await?;
            let _ = s.finish();
            let got = tokio::time::timeout(
                Duration::from_secs(12),
                read_message(&mut r, limits::MAX_FRAME),
            )
            .await?;
            if let Ok(Some(Message::Control(doc))) = &got {
                let v: serde_json::Value = serde_json::from_slice(doc)?;
                assert_eq!(v["type"], "failed", "{v}");
            } else {
                assert!(matches!(got, Ok(None) | Err(_)), "{got:?}");
            }
        }
        rogue.shutdown().await;
    }
    // The cluster still serves the same tokens with the same placement.
    let got = generate_all(&nodes[1].node, greedy(prompt, 20), Duration::from_secs(30)).await?;
    assert_eq!(got.token_ids, want);
    assert_eq!(nodes[0].node.placement().map(|p| p.id), Some(placement.id));
    wait_freed(&nodes).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_without_the_model_receives_its_stage_from_a_peer() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let tiny = tiny_model(dir.path(), TinySpec::default())?;
    transfer_case(&tiny.gguf_q8_0, dir.path()).await?;
    // The real model's tensors span many chunks.
    match real_model() {
        Some(path) => transfer_case(&path, dir.path()).await,
        None => {
            println!("real model skipped: not in the cache (scripts/test.sh fetches it)");
            Ok(())
        }
    }
}

/// Node `a` serving `info` and node `b` without a model, once `b` has
/// `a`'s profile (so it can take the model from `a`).
async fn holder_and_newcomer(
    info: &hearth_runtime::profile::ModelInfo,
) -> Result<(
    hearth_test_utils::cluster::TestNode,
    hearth_test_utils::cluster::TestNode,
)> {
    use hearth_test_utils::cluster::TestNode;
    let net = hearth_discovery::MemoryNetwork::new();
    let secret = hearth_net::ClusterSecret::generate();
    let a = TestNode::start_with("a", &secret, vec![Box::new(net.discovery())], |cfg| {
        cfg.model = Some(info.clone());
        cfg.placement = PlacementPolicy::Even;
    })?;
    let b = TestNode::start_with("b", &secret, vec![Box::new(net.discovery())], |cfg| {
        cfg.placement = PlacementPolicy::Even;
    })?;
    let start = Instant::now();
    while !b
        .view()
        .await?
        .profiles
        .is_some_and(|p| p.nodes.iter().any(|n| n.model.is_some()))
    {
        anyhow::ensure!(
            start.elapsed() < Duration::from_secs(20),
            "b never saw a's model"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok((a, b))
}

async fn transfer_case(path: &std::path::Path, dir: &std::path::Path) -> Result<()> {
    use hearth_runtime::model_file::{read_have, stage_tensors};
    use hearth_runtime::profile::MeasureOptions;

    let info = model_info(path, dir)?;
    let local = LocalModel::load(path, Precision::Quantized)?;
    let prompt = vec![9, 8, 7, 6];
    let want = reference(&local, &prompt, 30, SamplingParams::default())?;

    // b learns a's profile, then takes the model from a.
    let (a, b) = holder_and_newcomer(&info).await?;
    let empty = tempfile::tempdir()?;
    let mut received = 0;
    let got_info = b
        .node
        .adopt_model_from_peers(
            &empty.path().join("models"),
            &empty.path().join("profiles"),
            &MeasureOptions::quick(),
            &mut |done, total| {
                assert!(done <= total);
                received = done;
            },
        )
        .await?;
    assert!(received > 0);
    assert_eq!(
        got_info.times.content, info.times.content,
        "the copy stands for the original"
    );
    assert_eq!(got_info.times.fingerprint, info.times.fingerprint);
    // One id across the cluster: the copy is served under the original's.
    assert_eq!(got_info.times.model, info.times.model);
    assert_eq!(b.node.model_name(), a.node.model_name());
    // The leader places the model over both; b fetches its stage's tensors.
    let start = Instant::now();
    let placement = loop {
        if let Some(p) = a.node.placement().filter(|p| p.stages.len() == 2)
            && b.node.placement().is_some_and(|q| q.id == p.id)
        {
            break p;
        }
        anyhow::ensure!(
            start.elapsed() < Duration::from_secs(60),
            "no 2-stage placement"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    for t in [&a, &b] {
        let got =
            generate_all(&t.node, greedy(prompt.clone(), 30), Duration::from_secs(30)).await?;
        assert_eq!(got.token_ids, want, "asked {}", t.name);
    }
    // b holds exactly what measuring and its stage read, not the whole model.
    let have = read_have(&got_info.path).expect("a partial copy");
    let spec = placement.stages[placement.stage_of(&b.node.id().to_string()).unwrap()].spec;
    let all: Vec<String> = {
        let mut f = std::fs::File::open(path)?;
        candle_core::quantized::gguf_file::Content::read(&mut f)?
            .tensor_infos
            .into_keys()
            .collect()
    };
    let mut expected = stage_tensors(all.iter().cloned(), spec);
    for m in hearth_runtime::model_file::measurement_spec() {
        expected.extend(stage_tensors(all.iter().cloned(), m));
    }
    assert_eq!(have.tensors, expected);
    assert!(
        have.tensors.len() < all.len(),
        "{} of {}",
        have.tensors.len(),
        all.len()
    );
    println!(
        "{}: b received {} of {} tensors (stage {}..{} + what measuring reads)",
        path.file_name().unwrap_or_default().to_string_lossy(),
        have.tensors.len(),
        all.len(),
        spec.start,
        spec.end
    );
    Ok(())
}

/// A member that serves a poisoned copy of the model (one byte of one
/// tensor changed) under the honest content id: the manifest it sends
/// cannot prove its pieces, so the node adopting the model refuses every
/// piece and writes nothing it would use.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poisoned_copy_under_the_honest_content_id_is_refused() -> Result<()> {
    use hearth_runtime::profile::MeasureOptions;

    let dir = tempfile::tempdir()?;
    let tiny = tiny_model(dir.path(), TinySpec::default())?;
    let honest = model_info(&tiny.gguf_q8_0, dir.path())?;
    // The same file with one byte of its largest tensor flipped, served
    // under the honest file's content id.
    let (_, tree) =
        hearth_runtime::model_file::leaves(&tiny.gguf_q8_0).map_err(anyhow::Error::msg)?;
    let victim = tree
        .iter()
        .max_by_key(|l| l.len)
        .ok_or_else(|| anyhow::anyhow!("no tensors"))?;
    let poisoned = dir.path().join("poisoned.gguf");
    let mut bytes = std::fs::read(&tiny.gguf_q8_0)?;
    bytes[(victim.offset + victim.len / 2) as usize] ^= 0x55;
    std::fs::write(&poisoned, bytes)?;
    let mut rogue = honest.clone();
    rogue.path = poisoned;

    let (a, b) = holder_and_newcomer(&rogue).await?;
    let empty = tempfile::tempdir()?;
    let got = b
        .node
        .adopt_model_from_peers(
            &empty.path().join("models"),
            &empty.path().join("profiles"),
            &MeasureOptions::quick(),
            &mut |_, _| {},
        )
        .await;
    let err = got.expect_err("a poisoned copy was adopted");
    assert!(
        err.to_string().contains("hash tree"),
        "refused for another reason: {err}"
    );
    assert!(b.node.model_name().is_none());
    drop(a);
    Ok(())
}

/// Two LoRA fine-tunes and their base, asked at once through a two-stage
/// pipeline (entering at either member): every answer equals that model
/// served alone (its merged file, greedy), nothing is reloaded or
/// re-placed, the member without the adapters' files receives them over
/// QUIC, and each stage holds only its layers' slice of each adapter. An
/// adapter nobody can send, or one whose bytes are not its id's, fails the
/// request instead of answering with the base.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_fine_tunes_and_their_base_share_one_pipeline() -> Result<()> {
    use hearth_runtime::EventKind;
    let dir = tempfile::tempdir()?;
    let tiny = tiny_model(dir.path(), TinySpec::default())?;
    let info = model_info(&tiny.gguf_f32, dir.path())?;
    let content = info.times.content.clone().unwrap_or_default();
    let base = hearth_models::WeightFile::open(&tiny.gguf_f32)?;
    let stores: Vec<TunedStore> = (0..2)
        .map(|i| TunedStore {
            name: info.times.model.clone(),
            base: tiny.gguf_f32.clone(),
            dir: dir.path().join(format!("node{i}")),
        })
        .collect();
    // Node 0 holds both fine-tunes; node 1 holds neither.
    let tuned = stores[0].tuned();
    let mut merged = Vec::new();
    let mut pefts = Vec::new();
    for (name, seed) in [("ft-a", 1u64), ("ft-b", 2)] {
        let d = dir.path().join(name);
        let (peft, m) = hearth_test_utils::lora_with_merged(
            &base,
            &d,
            seed,
            4,
            &hearth_models::train::Target::ALL,
            0.2,
        )?;
        let r = hearth_runtime::adapters::register(&tuned, name, &peft, &content, "tiny")
            .map_err(anyhow::Error::msg)?;
        assert_eq!(r.name, name);
        merged.push(LocalModel::load(&m, Precision::Quantized)?);
        pefts.push(peft);
    }
    let alone = LocalModel::load(&tiny.gguf_f32, Precision::Quantized)?;
    let prompts: Vec<Vec<u32>> = (0..6u32)
        .map(|i| {
            (0..(4 + i as usize))
                .map(|k| (i * 29 + k as u32 * 11) % 200 + 1)
                .collect()
        })
        .collect();
    // Request i: model i % 3 (base, ft-a, ft-b), 12 tokens.
    let mut want = Vec::new();
    for (i, p) in prompts.iter().enumerate() {
        let m = match i % 3 {
            0 => &alone,
            k => &merged[k - 1],
        };
        want.push(reference(m, p, 12, SamplingParams::default())?);
    }
    // The fine-tunes answer differently from the base and each other.
    assert_ne!(
        want[0],
        reference(&merged[0], &prompts[0], 12, SamplingParams::default())?
    );
    assert_ne!(
        want[1],
        reference(&merged[1], &prompts[1], 12, SamplingParams::default())?
    );
    let stores: Vec<std::sync::Arc<TunedStore>> =
        stores.into_iter().map(std::sync::Arc::new).collect();
    let nodes = hearth_test_utils::cluster::pipeline_cluster_with(
        &hearth_net::ClusterSecret::generate(),
        2,
        2,
        &info,
        PlacementPolicy::Even,
        |i, cfg| cfg.models = Some(stores[i].clone()),
    )
    .await?;
    let before = nodes[0]
        .node
        .placement()
        .ok_or_else(|| anyhow::anyhow!("no placement"))?;
    let loads = |n: &hearth_test_utils::cluster::TestNode| {
        n.node
            .cluster_events()
            .0
            .iter()
            .filter(|e| {
                matches!(
                    e.kind,
                    EventKind::ModelLoading { .. } | EventKind::StageLoading { .. }
                )
            })
            .count()
    };
    let loads_before: Vec<usize> = nodes.iter().map(loads).collect();
    // The fine-tunes are listed, as adapters of the served base.
    let listed = nodes[1].node.cluster_models().await;
    for name in ["ft-a", "ft-b"] {
        let e = listed
            .iter()
            .find(|m| m.name == name)
            .ok_or_else(|| anyhow::anyhow!("{name} not listed: {listed:?}"))?;
        assert_eq!(
            e.adapter.as_ref().map(|a| a.base_content.as_str()),
            Some(content.as_str())
        );
    }
    // Resolved at either member: node 1 learns of them from node 0.
    let mut runs = Vec::new();
    for (i, p) in prompts.iter().enumerate() {
        let node = nodes[i % 2].node.clone();
        let name = [info.times.model.as_str(), "ft-a", "ft-b"][i % 3];
        let adapter = node.ensure_model(name, Duration::from_secs(30)).await?;
        assert_eq!(adapter.is_some(), i % 3 != 0, "{name}");
        if let Some(a) = &adapter {
            assert_eq!(a.holders, vec![nodes[0].node.id().to_string()], "{name}");
        }
        let mut params = greedy(p.clone(), 12);
        params.adapter = adapter;
        runs.push(tokio::spawn(async move {
            generate_all(&node, params, Duration::from_secs(60)).await
        }));
    }
    for (i, h) in runs.into_iter().enumerate() {
        let got = h.await??;
        assert_eq!(got.token_ids, want[i], "request {i}");
        assert_eq!(
            got.model,
            [info.times.model.as_str(), "ft-a", "ft-b"][i % 3]
        );
        assert_eq!(got.stages, 2);
    }
    // No reload, no new placement.
    let after = nodes[0]
        .node
        .placement()
        .ok_or_else(|| anyhow::anyhow!("no placement"))?;
    assert_eq!(after.id, before.id);
    assert_eq!(nodes.iter().map(loads).collect::<Vec<_>>(), loads_before);
    for n in &nodes {
        assert_eq!(
            n.node.model_name().as_deref(),
            Some(info.times.model.as_str())
        );
    }
    // Memory: each stage holds its layers' slice of the two adapters, and
    // the slices add up to the adapters themselves.
    let full = |peft: &std::path::Path, spec| -> Result<u64> {
        Ok(hearth_models::StageAdapter::load_peft(peft, &info.config, spec)?.bytes())
    };
    let whole: u64 = pefts
        .iter()
        .map(|p| {
            full(
                p,
                hearth_models::StageSpec::full(info.config.num_hidden_layers),
            )
        })
        .sum::<Result<u64>>()?;
    let mut held = 0;
    for n in &nodes {
        // (A stage of an earlier placement may still be draining.)
        for s in n
            .node
            .stage_stats()
            .into_iter()
            .filter(|s| s.placement == before.id)
        {
            let slice: u64 = pefts.iter().map(|p| full(p, s.spec)).sum::<Result<u64>>()?;
            assert_eq!((s.adapters, s.adapter_bytes), (2, slice), "{s:?}");
            held += s.adapter_bytes;
        }
    }
    assert_eq!(held, whole);
    println!("two adapters of {whole} bytes held as slices on 2 stages");
    // An adapter no member holds: the request fails, never the base's answer.
    let forged = hearth_runtime::adapters::AdapterRef {
        name: "ft-ghost".into(),
        id: "ab".repeat(32),
        base_content: content.clone(),
        holders: vec![nodes[0].node.id().to_string()],
    };
    let mut params = greedy(prompts[0].clone(), 4);
    params.adapter = Some(forged);
    let err = nodes[1].node.generate(params).await.err();
    assert!(
        err.as_ref()
            .is_some_and(|e| e.to_string().contains("ft-ghost")),
        "{err:?}"
    );
    // A holder whose files are not the adapter's id (changed on disk after
    // it was registered): the member that asks refuses them.
    let d = dir.path().join("ft-c");
    let (peft, _) = hearth_test_utils::lora_with_merged(
        &base,
        &d,
        3,
        4,
        &hearth_models::train::Target::ALL,
        0.2,
    )?;
    hearth_runtime::adapters::register(&tuned, "ft-c", &peft, &content, "tiny")
        .map_err(anyhow::Error::msg)?;
    let file = tuned.join("ft-c.lora/adapter_model.safetensors");
    let mut bytes = std::fs::read(&file)?;
    let last = bytes.len() - 1;
    bytes[last] ^= 0x55;
    std::fs::write(&file, bytes)?;
    let adapter = nodes[0]
        .node
        .ensure_model("ft-c", Duration::from_secs(30))
        .await?;
    let mut params = greedy(prompts[0].clone(), 4);
    params.adapter = adapter;
    let err = nodes[0].node.generate(params).await.err();
    assert!(
        err.as_ref()
            .is_some_and(|e| e.to_string().contains("not the one asked for")),
        "{err:?}"
    );
    wait_freed(&nodes).await
}
