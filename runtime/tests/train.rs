//! Pipeline-parallel training against single-process training, over real
//! QUIC between in-process nodes on loopback (f32 on the wire):
//! (a) gradients equal for GPipe and 1F1B, p ∈ {1,2,3}, m ∈ 1..=2p+1, on
//! every stage; (e) weights after k AdamW steps equal; (g) checkpoint →
//! kill → resume ends with the weights of an uninterrupted run.

use std::collections::HashMap;
use std::time::Duration;

use candle_core::{DType, Tensor};
use hearth_models::train::{
    AdamW, AdamWConfig, BatchLayout, IGNORE, LoraConfig, Method, MicroBatch, Target, TrainOptions,
    TrainStage, optim, step_grads,
};
use hearth_models::{StageSpec, WeightFile};
use hearth_net::{ClusterSecret, Endpoint, EndpointConfig, Identity};
use hearth_proto::stream_kind;
use hearth_runtime::train::{
    Coordinator, Schedule, StageHandle, StageSetup, TrainNet, spawn_stage,
};
use hearth_test_utils::{TinySpec, tiny_model};

const SEED: u64 = 11;
const LAYERS: usize = 4;

fn weights(dir: &std::path::Path) -> WeightFile {
    let m = tiny_model(
        dir,
        TinySpec {
            hidden: 32,
            intermediate: 64,
            layers: LAYERS,
            heads: 4,
            kv_heads: 2,
            context: 64,
            ..Default::default()
        },
    )
    .unwrap();
    WeightFile::open(&m.gguf_f32).unwrap()
}

/// `m` micro-batches of 2 rows × 8 tokens: packed documents and padding.
fn batches(m: u32, vocab: u32, salt: u32) -> Vec<MicroBatch> {
    (0..m)
        .map(|k| {
            let segs: Vec<u32> = [1, 1, 1, 1, 1, 2, 2, 2, 1, 1, 1, 1, 1, 1, 0, 0].to_vec();
            let tokens: Vec<u32> = (0..16u32)
                .map(|i| (i * 31 + k * 17 + salt * 7 + 5) % vocab)
                .collect();
            let labels = (0..16)
                .map(|i| {
                    let end = i % 8 == 7 || segs[i] == 0 || segs[i + 1] != segs[i];
                    if end || ((k + salt).is_multiple_of(3) && i == 1) {
                        IGNORE
                    } else {
                        tokens[i + 1]
                    }
                })
                .collect();
            MicroBatch {
                layout: BatchLayout::new(2, 8, segs).unwrap(),
                tokens,
                labels,
            }
        })
        .collect()
}

/// Layer ranges of `p` stages over `LAYERS` layers.
fn split(p: usize) -> Vec<StageSpec> {
    let bounds: Vec<usize> = match p {
        1 => vec![0, 4],
        2 => vec![0, 2, 4],
        3 => vec![0, 1, 3, 4],
        _ => unreachable!(),
    };
    (0..p)
        .map(|i| StageSpec {
            start: bounds[i],
            end: bounds[i + 1],
            embed: i == 0,
            head: i + 1 == p,
        })
        .collect()
}

struct Cluster {
    nets: Vec<TrainNet>,
    _endpoints: Vec<Endpoint>,
}

async fn cluster(n: usize) -> Cluster {
    let secret = ClusterSecret::generate();
    let mut endpoints = Vec::new();
    let mut nets = Vec::new();
    for i in 0..n {
        let (ep, mut rx) = Endpoint::bind(
            EndpointConfig {
                identity: Identity::generate().unwrap(),
                secret: secret.clone(),
                name: format!("n{i}"),
                bind: "127.0.0.1:0".parse().unwrap(),
            },
            &[stream_kind::TRAIN],
        )
        .unwrap();
        nets.push(TrainNet::new(
            ep.clone(),
            rx.remove(&stream_kind::TRAIN).unwrap(),
        ));
        endpoints.push(ep);
    }
    for i in 0..n {
        for j in i + 1..n {
            let addr = endpoints[j].local_addr().unwrap();
            tokio::time::timeout(Duration::from_secs(10), endpoints[i].connect(addr))
                .await
                .unwrap()
                .unwrap();
        }
    }
    // Both ends know each connection before any stream is opened.
    for _ in 0..100 {
        if (0..n).all(|i| endpoints[i].peers().len() == n - 1) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Cluster {
        nets,
        _endpoints: endpoints,
    }
}

struct Job {
    coord: Coordinator,
    stages: Vec<StageHandle>,
}

#[allow(clippy::too_many_arguments)]
fn start_job(
    c: &Cluster,
    w: &WeightFile,
    job: u64,
    method: &Method,
    schedule: Schedule,
    p: usize,
    m: u32,
    restore: Option<Vec<Vec<u8>>>,
) -> Job {
    let placement: Vec<(usize, StageSpec)> = split(p).into_iter().enumerate().collect();
    let optim = AdamWConfig {
        weight_decay: 0.01,
        ..Default::default()
    };
    start_placed(c, w, job, method, schedule, &placement, m, restore, optim)
}

fn close(name: &str, got: &Tensor, want: &Tensor, rtol: f32, atol: f32) {
    let got: Vec<f32> = got.flatten_all().unwrap().to_vec1().unwrap();
    let want: Vec<f32> = want.flatten_all().unwrap().to_vec1().unwrap();
    assert_eq!(got.len(), want.len(), "{name}");
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert!(
            (g - w).abs() <= atol + rtol * w.abs(),
            "{name}[{i}]: pipeline {g} vs single process {w}"
        );
    }
}

fn full_stage(w: &WeightFile, method: &Method) -> TrainStage {
    TrainStage::load(
        w,
        StageSpec::full(LAYERS),
        &TrainOptions {
            method: method.clone(),
            dtype: DType::F32,
            seed: SEED,
        },
    )
    .unwrap()
}

fn lora() -> Method {
    Method::Lora(LoraConfig {
        rank: 2,
        alpha: 4.0,
        dropout: 0.1,
        targets: Target::ALL.to_vec(),
        init_b_std: 0.05,
    })
}

/// (a) For both schedules, p ∈ {1, 2, 3} and m ∈ 1..=2p+1, every stage's
/// gradients equal single-process gradients (full fine-tuning, so the
/// embedding tied to the head across stages is covered), and also for
/// LoRA with dropout at the largest m.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_gradients_equal_single_process() {
    let dir = tempfile::tempdir().unwrap();
    let w = weights(dir.path());
    let vocab = w.config().vocab_size as u32;
    let c = cluster(3).await;
    let mut job = 0;
    let mut cases = Vec::new();
    for schedule in [Schedule::Gpipe, Schedule::OneFOneB] {
        for p in 1..=3usize {
            for m in 1..=(2 * p as u32 + 1) {
                cases.push((schedule, p, m, Method::Full));
            }
            cases.push((schedule, p, 2 * p as u32 + 1, lora()));
        }
    }
    for (schedule, p, m, method) in cases {
        job += 1;
        let data = batches(m, vocab, job as u32);
        let reference = step_grads(&full_stage(&w, &method), &data, SEED, 0).unwrap();
        let names: Vec<String> = full_stage(&w, &method)
            .trainables()
            .iter()
            .map(|(n, _)| n.clone())
            .collect();
        let want: HashMap<&str, &Tensor> = names
            .iter()
            .zip(&reference.grads)
            .map(|(n, g)| (n.as_str(), g.as_ref().unwrap()))
            .collect();
        let mut j = start_job(&c, &w, job, &method, schedule, p, m, None);
        // lr 0: the verdict applies a zero-size step, gradients stay readable.
        let out = j.coord.step(0, &data, 0.0, 0.0, false).await.unwrap();
        let loss = reference.loss_sum / reference.targets as f64;
        assert!(
            (out.loss - loss).abs() <= 1e-5 * loss.abs(),
            "{schedule:?} p={p} m={m}: loss {} vs {loss}",
            out.loss
        );
        let mut seen = 0;
        for (i, st) in j.stages.iter().enumerate() {
            let grads = st.last_grads();
            assert_eq!(grads.len(), st.trainables().len());
            for ((name, _), g) in st.trainables().iter().zip(&grads) {
                let g = g
                    .as_ref()
                    .unwrap_or_else(|| panic!("stage {i}: {name} has no gradient"));
                close(
                    &format!("{schedule:?} p={p} m={m} stage {i} {name}"),
                    g,
                    want[name.as_str()],
                    1e-5,
                    4e-5,
                );
                seen += 1;
            }
        }
        let tied_copies = usize::from(matches!(method, Method::Full) && p > 1);
        assert_eq!(
            seen,
            names.len() + tied_copies,
            "every parameter lives on a stage"
        );
        j.coord.end().await;
        for s in j.stages {
            s.stop().unwrap();
        }
    }
}

/// Applies k steps of single-process training with the same verdicts.
fn single_process_steps(
    w: &WeightFile,
    method: &Method,
    steps: &[Vec<MicroBatch>],
    lr: f64,
    clip: f64,
) -> TrainStage {
    let stage = full_stage(w, method);
    let mut opt = AdamW::new(AdamWConfig {
        weight_decay: 0.01,
        ..Default::default()
    });
    for (k, data) in steps.iter().enumerate() {
        let g = step_grads(&stage, data, SEED, k as u64).unwrap();
        let norm = optim::sq_norm(&g.grads).unwrap().sqrt();
        let params = stage.trainables().to_vec();
        opt.step(&params, &g.grads, lr, optim::clip_factor(norm, clip))
            .unwrap();
    }
    stage
}

fn assert_weights_equal(label: &str, stages: &[StageHandle], reference: &TrainStage, atol: f32) {
    let want: HashMap<&str, Tensor> = reference
        .trainables()
        .iter()
        .map(|(n, v)| (n.as_str(), v.as_tensor().clone()))
        .collect();
    for (i, st) in stages.iter().enumerate() {
        for (name, v) in st.trainables() {
            close(
                &format!("{label} stage {i} {name}"),
                v.as_tensor(),
                &want[name.as_str()],
                1e-5,
                atol,
            );
        }
    }
}

/// (e) After 3 AdamW steps with clipping active, the pipelined weights
/// equal the single-process weights, for full fine-tuning and LoRA.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weights_after_k_steps_equal_single_process() {
    let dir = tempfile::tempdir().unwrap();
    let w = weights(dir.path());
    let vocab = w.config().vocab_size as u32;
    let c = cluster(3).await;
    let (lr, clip, m) = (1e-3, 0.5, 4);
    let steps: Vec<Vec<MicroBatch>> = (0..3).map(|k| batches(m, vocab, 100 + k)).collect();
    for (job, method) in [(1u64, Method::Full), (2, lora())] {
        let reference = single_process_steps(&w, &method, &steps, lr, clip);
        let mut j = start_job(&c, &w, job, &method, Schedule::OneFOneB, 3, m, None);
        for (k, data) in steps.iter().enumerate() {
            let out = j.coord.step(k as u64, data, lr, clip, false).await.unwrap();
            assert!(out.applied);
            assert!(
                out.grad_norm > clip,
                "clipping must be active (norm {})",
                out.grad_norm
            );
        }
        assert_weights_equal(&format!("{method:?}"), &j.stages, &reference, 2e-5);
        // Training moved the weights.
        let before = full_stage(&w, &method);
        let moved =
            before
                .trainables()
                .iter()
                .zip(reference.trainables())
                .any(|((_, a), (_, b))| {
                    (a.as_tensor() - b.as_tensor())
                        .unwrap()
                        .abs()
                        .unwrap()
                        .max_all()
                        .unwrap()
                        .to_scalar::<f32>()
                        .unwrap()
                        > 1e-4
                });
        assert!(moved);
        j.coord.end().await;
        for s in j.stages {
            s.stop().unwrap();
        }
    }
}

/// (g) Checkpoint after step 2, kill every stage, restore new stages from
/// the checkpoint and run steps 3–4: the weights equal an uninterrupted run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkpoint_kill_resume_matches_uninterrupted() {
    let dir = tempfile::tempdir().unwrap();
    let w = weights(dir.path());
    let vocab = w.config().vocab_size as u32;
    let c = cluster(2).await;
    let (lr, clip, m) = (2e-3, 1.0, 3);
    let method = Method::Full;
    let steps: Vec<Vec<MicroBatch>> = (0..4).map(|k| batches(m, vocab, 200 + k)).collect();
    // Uninterrupted.
    let mut a = start_job(&c, &w, 1, &method, Schedule::OneFOneB, 2, m, None);
    for (k, data) in steps.iter().enumerate() {
        a.coord.step(k as u64, data, lr, clip, false).await.unwrap();
    }
    // Interrupted after a checkpoint at step 2.
    let mut b = start_job(&c, &w, 2, &method, Schedule::OneFOneB, 2, m, None);
    let mut saved = None;
    for (k, data) in steps.iter().enumerate().take(2) {
        let out = b
            .coord
            .step(k as u64, data, lr, clip, k == 1)
            .await
            .unwrap();
        if k == 1 {
            saved = Some(out.states);
        }
    }
    let saved = saved.unwrap();
    assert!(
        saved.iter().all(|s| !s.is_empty()),
        "{:?}",
        saved.iter().map(|s| s.len()).collect::<Vec<_>>()
    );
    for s in b.stages {
        s.stop().unwrap();
    }
    drop(b.coord);
    let mut r = start_job(
        &c,
        &w,
        3,
        &method,
        Schedule::OneFOneB,
        2,
        m,
        Some(saved.clone()),
    );
    r.coord.send_state(1, &saved[1]).await.unwrap();
    for (k, data) in steps.iter().enumerate().skip(2) {
        r.coord.step(k as u64, data, lr, clip, false).await.unwrap();
    }
    for (x, y) in a.stages.iter().zip(&r.stages) {
        for ((n, v), (_, u)) in x.trainables().iter().zip(y.trainables()) {
            close(
                &format!("resumed {n}"),
                u.as_tensor(),
                v.as_tensor(),
                0.0,
                0.0,
            );
        }
    }
    for j in [a, r] {
        j.coord.end().await;
        for s in j.stages {
            s.stop().unwrap();
        }
    }
}

/// Starts a job whose stage `k` runs `placement[k].1` on node
/// `placement[k].0` (a node may run two stages: a U-shaped pipeline),
/// coordinated from node 0. With `restore`, stage 0 starts from its state
/// directly and the others get theirs from the coordinator over the
/// network.
#[allow(clippy::too_many_arguments)]
fn start_placed(
    c: &Cluster,
    w: &WeightFile,
    job: u64,
    method: &Method,
    schedule: Schedule,
    placement: &[(usize, StageSpec)],
    m: u32,
    restore: Option<Vec<Vec<u8>>>,
    optim: AdamWConfig,
) -> Job {
    let p = placement.len();
    let ids: Vec<_> = placement.iter().map(|(n, _)| c.nets[*n].id()).collect();
    let tied = matches!(method, Method::Full) && p > 1 && w.config().tie_word_embeddings;
    let stages = placement
        .iter()
        .enumerate()
        .map(|(i, (node, spec))| {
            let stage = TrainStage::load(
                w,
                *spec,
                &TrainOptions {
                    method: method.clone(),
                    dtype: DType::F32,
                    seed: SEED,
                },
            )
            .unwrap();
            let setup = StageSetup {
                job,
                stage: i as u16,
                stages: p as u16,
                micro_batches: m,
                schedule,
                prev: (i > 0).then(|| ids[i - 1]),
                next: (i + 1 < p).then(|| ids[i + 1]),
                coordinator: c.nets[0].id(),
                tied: match (tied, i) {
                    (true, 0) => Some(ids[p - 1]),
                    (true, i) if i + 1 == p => Some(ids[0]),
                    _ => None,
                },
                seed: SEED,
                optim: optim.clone(),
                timeout: Duration::from_secs(30),
                keep_grads: true,
                restore: restore.as_ref().filter(|_| i == 0).map(|r| r[i].clone()),
                restore_len: restore
                    .as_ref()
                    .filter(|_| i > 0)
                    .map_or(0, |r| r[i].len() as u64),
                max_len: 64,
            };
            spawn_stage(&c.nets[*node], stage, setup).unwrap()
        })
        .collect();
    Job {
        coord: Coordinator::new(&c.nets[0], job, ids, Duration::from_secs(60)),
        stages,
    }
}

/// The training messages node `i` sent to other nodes since `before`, by
/// kind.
fn left_node(
    c: &Cluster,
    i: usize,
    before: &hearth_runtime::train::SentCounts,
) -> HashMap<&'static str, u64> {
    let me = c.nets[i].id();
    let mut out = HashMap::new();
    for ((to, kind), n) in c.nets[i].sent_counts() {
        let was = before.get(&(to, kind)).copied().unwrap_or(0);
        if to != me && n > was {
            *out.entry(kind).or_default() += n - was;
        }
    }
    out
}

/// A U-shaped pipeline: the data's node (0, also the coordinator) runs the
/// embedding as the first stage and the head with the loss as the last,
/// other nodes the layers between. Counting every training message each
/// node sends shows that no token ids or labels leave node 0 (they go to
/// its own stages) while activations and gradients do; every stage's
/// gradients still equal single-process training's, for full fine-tuning
/// (the tied embedding/head exchanged between two stages of one node) and
/// LoRA, under both schedules, with the data's node holding layers too or
/// none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn u_shaped_pipeline_keeps_tokens_and_labels_on_the_data_node() {
    let dir = tempfile::tempdir().unwrap();
    let w = weights(dir.path());
    let vocab = w.config().vocab_size as u32;
    let c = cluster(3).await;
    let spec = |start, end, embed, head| StageSpec {
        start,
        end,
        embed,
        head,
    };
    let layouts: Vec<Vec<(usize, StageSpec)>> = vec![
        // Node 0 holds only the two ends.
        vec![
            (0, spec(0, 0, true, false)),
            (1, spec(0, 2, false, false)),
            (2, spec(2, LAYERS, false, false)),
            (0, spec(LAYERS, LAYERS, false, true)),
        ],
        // Node 0 holds the embedding and the first layer, and the head.
        vec![
            (0, spec(0, 1, true, false)),
            (1, spec(1, LAYERS, false, false)),
            (0, spec(LAYERS, LAYERS, false, true)),
        ],
    ];
    let mut job = 100;
    for layout in &layouts {
        for (schedule, method) in [
            (Schedule::OneFOneB, Method::Full),
            (Schedule::Gpipe, lora()),
        ] {
            job += 1;
            let m = 3;
            let data = batches(m, vocab, job as u32);
            let reference = step_grads(&full_stage(&w, &method), &data, SEED, 0).unwrap();
            let names: Vec<String> = full_stage(&w, &method)
                .trainables()
                .iter()
                .map(|(n, _)| n.clone())
                .collect();
            let want: HashMap<&str, &Tensor> = names
                .iter()
                .zip(&reference.grads)
                .map(|(n, g)| (n.as_str(), g.as_ref().unwrap()))
                .collect();
            let before: Vec<_> = c.nets.iter().map(|n| n.sent_counts()).collect();
            let mut j = start_placed(
                &c,
                &w,
                job,
                &method,
                schedule,
                layout,
                m,
                None,
                AdamWConfig::default(),
            );
            let out = j.coord.step(0, &data, 0.0, 0.0, false).await.unwrap();
            let label = format!("{} stages, {schedule:?}, {method:?}", layout.len());
            let loss = reference.loss_sum / reference.targets as f64;
            assert!(
                (out.loss - loss).abs() <= 1e-5 * loss.abs(),
                "{label}: loss {} vs {loss}",
                out.loss
            );
            let mut seen = 0;
            for (i, st) in j.stages.iter().enumerate() {
                for ((name, _), g) in st.trainables().iter().zip(st.last_grads()) {
                    let g =
                        g.unwrap_or_else(|| panic!("{label}: stage {i}: {name} has no gradient"));
                    close(
                        &format!("{label} stage {i} {name}"),
                        &g,
                        want[name.as_str()],
                        1e-5,
                        4e-5,
                    );
                    seen += 1;
                }
            }
            let tied_copies = usize::from(matches!(method, Method::Full));
            assert_eq!(
                seen,
                names.len() + tied_copies,
                "{label}: every parameter lives on a stage"
            );
            // What left each node.
            let home = left_node(&c, 0, &before[0]);
            for kind in ["tokens", "labels"] {
                assert!(
                    !home.contains_key(kind),
                    "{label}: {kind} left the data's node: {home:?}"
                );
                let local = c.nets[0]
                    .sent_counts()
                    .get(&(c.nets[0].id(), kind))
                    .copied()
                    .unwrap_or(0)
                    - before[0].get(&(c.nets[0].id(), kind)).copied().unwrap_or(0);
                assert_eq!(
                    local,
                    u64::from(m),
                    "{label}: {kind} went to the node's own stage"
                );
            }
            assert_eq!(
                home.get("activations").copied(),
                Some(u64::from(m)),
                "{label}: {home:?}"
            );
            assert!(home.contains_key("verdict"), "{label}: {home:?}");
            let others: Vec<usize> = layout.iter().map(|(n, _)| *n).filter(|n| *n != 0).collect();
            for &n in &others {
                let sent = left_node(&c, n, &before[n]);
                assert!(
                    sent.keys()
                        .all(|k| matches!(*k, "activations" | "gradient" | "report" | "applied")),
                    "{label}: node {n} sent {sent:?}"
                );
            }
            // The last layer-holding node sends its activations back home,
            // and node 0's head sends their gradient back.
            let back = left_node(
                &c,
                *others.last().unwrap(),
                &before[*others.last().unwrap()],
            );
            assert_eq!(
                back.get("activations").copied(),
                Some(u64::from(m)),
                "{label}: {back:?}"
            );
            assert_eq!(
                home.get("gradient").copied(),
                Some(u64::from(m)),
                "{label}: {home:?}"
            );
            j.coord.end().await;
            for s in j.stages {
                s.stop().unwrap();
            }
        }
    }
}
