//! Fine-tuning jobs on in-process clusters (real QUIC on loopback, a tiny
//! random model): a job placed over two nodes trains, checkpoints and
//! writes a PEFT adapter and a merged model; a stage node killed mid-job
//! costs no optimizer step, the job re-plans over the live nodes, resumes
//! from its checkpoint and ends with the weights of an uninterrupted run.

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use candle_core::Tensor;
use hearth_runtime::Node;
use hearth_runtime::pipeline::PlacementPolicy;
use hearth_runtime::train::{JobInfo, JobSpec, JobState, MethodSpec};
use hearth_test_utils::cluster::{TestNode, pipeline_cluster, tiny_model_info};

fn write_data(dir: &Path) -> Result<std::path::PathBuf> {
    let mut lines = String::new();
    for i in 0..6 {
        lines += &format!(
            "{{\"messages\":[{{\"role\":\"system\",\"content\":\"be brief\"}},{{\"role\":\"user\",\"content\":\"what is {i}\"}},{{\"role\":\"assistant\",\"content\":\"it is {i}{i}\"}}]}}\n"
        );
        lines += &format!("{{\"text\":\"a fox {i} jumps over {i} dogs\"}}\n");
    }
    let path = dir.join("data.jsonl");
    std::fs::write(&path, lines)?;
    Ok(path)
}

fn spec(model: &str, data: &Path, out: &Path, steps: u64) -> JobSpec {
    let mut s: JobSpec = serde_json::from_value(serde_json::json!({
        "model": model,
        "data": data,
        "output_dir": out,
    }))
    .unwrap();
    s.steps = Some(steps);
    s.batch_size = 4;
    s.micro_batches = 2;
    s.seq_len = 128;
    s.learning_rate = 1e-2;
    s.checkpoint_every = 2;
    s.method = MethodSpec::Lora {
        rank: 4,
        alpha: 8.0,
        dropout: 0.1,
        targets: hearth_models::train::Target::ALL.to_vec(),
    };
    s
}

async fn wait_done(node: &Node, id: &str, limit: Duration) -> Result<JobInfo> {
    let start = Instant::now();
    loop {
        if let Some(i) = node.job(id).and_then(|j| j.info())
            && i.state.done()
        {
            return Ok(i);
        }
        if start.elapsed() > limit {
            bail!(
                "job {id} not done in {limit:?}: {:?}",
                node.job(id).and_then(|j| j.info())
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn messages(node: &Node, id: &str) -> Vec<String> {
    node.job(id)
        .map(|j| j.events().0.into_iter().map(|e| e.message).collect())
        .unwrap_or_default()
}

fn adapter(out: &Path) -> Result<HashMap<String, Tensor>> {
    let bytes = std::fs::read(out.join("adapter/adapter_model.safetensors"))?;
    let st = safetensors::SafeTensors::deserialize(&bytes)?;
    let mut m = HashMap::new();
    for (name, view) in st.tensors() {
        let v: Vec<f32> = view
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        m.insert(
            name,
            Tensor::from_vec(v, view.shape(), &candle_core::Device::Cpu)?,
        );
    }
    Ok(m)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_over_two_nodes_trains_checkpoints_and_writes_its_outputs() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let info = tiny_model_info(dir.path())?;
    let nodes = pipeline_cluster(2, 2, &info, PlacementPolicy::Even).await?;
    let data = write_data(dir.path())?;
    let out = dir.path().join("out");
    let model = info.times.model.clone();
    let node = &nodes[0].node;
    node.start_job("ftjob-a".into(), spec(&model, &data, &out, 6))?;
    let done = wait_done(node, "ftjob-a", Duration::from_secs(120)).await?;
    let log = messages(node, "ftjob-a");
    assert_eq!(done.state, JobState::Succeeded, "{log:#?}");
    assert_eq!((done.step, done.total_steps), (6, 6));
    // U-shaped by default: node 0 (the data's) runs the embedding with
    // the first layers and, as a third stage, the head with the loss.
    assert_eq!(
        done.stages.len(),
        3,
        "placed over both nodes: {:?}",
        done.stages
    );
    let home = nodes[0].node.id().to_string();
    assert_eq!(done.stages[0].node_id, home);
    assert_eq!(done.stages[2].node_id, home);
    assert_ne!(done.stages[1].node_id, home);
    assert_eq!((done.stages[2].start, done.stages[2].end), (4, 4));
    assert!(log.iter().any(|m| m.starts_with("U-shaped")), "{log:#?}");
    assert!(
        done.stages.iter().all(|s| s.utilization > 0.0),
        "{:?}",
        done.stages
    );
    let losses: Vec<f64> = node
        .job("ftjob-a")
        .map(|j| j.events().0)
        .unwrap_or_default()
        .iter()
        .filter_map(|e| e.data.as_ref()?.get("train_loss")?.as_f64())
        .collect();
    assert_eq!(losses.len(), 6, "{log:#?}");
    assert!(losses[5] < losses[0], "the loss fell: {losses:?}");
    assert!(
        log.iter().any(|m| m == "Checkpoint saved at step 4"),
        "{log:#?}"
    );
    // Outputs: the PEFT adapter, the checkpoint, the merged model.
    let a = adapter(&out)?;
    assert_eq!(a.len(), 4 * 7 * 2, "A and B of 7 projections in 4 layers");
    let conf: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("adapter/adapter_config.json"))?)?;
    assert_eq!(conf["r"], 4);
    assert!(out.join("checkpoint/job.json").is_file());
    let ft = done.fine_tuned_model.clone().expect("a fine-tuned model");
    let merged = out.join(format!("{ft}.gguf"));
    let w = hearth_models::WeightFile::open(&merged)?;
    assert_eq!(w.config().num_hidden_layers, info.config.num_hidden_layers);
    // Run again with the same output dir: the final checkpoint is resumed,
    // nothing is trained again, and the same adapter comes out.
    node.start_job("ftjob-b".into(), spec(&model, &data, &out, 6))?;
    let again = wait_done(node, "ftjob-b", Duration::from_secs(60)).await?;
    assert_eq!(
        again.state,
        JobState::Succeeded,
        "{:#?}",
        messages(node, "ftjob-b")
    );
    assert!(
        messages(node, "ftjob-b")
            .iter()
            .any(|m| m.contains("Resuming from the checkpoint at step 6"))
    );
    let b = adapter(&out)?;
    for (n, t) in &a {
        let diff = (t - &b[n])?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert_eq!(diff, 0.0, "{n}");
    }
    // A bad file is refused with its line number, and nothing runs.
    std::fs::write(
        dir.path().join("bad.jsonl"),
        "{\"text\":\"ok\"}\n{\"messages\":[]}\n",
    )?;
    node.start_job(
        "ftjob-c".into(),
        spec(
            &model,
            &dir.path().join("bad.jsonl"),
            &dir.path().join("out-c"),
            2,
        ),
    )?;
    let bad = wait_done(node, "ftjob-c", Duration::from_secs(30)).await?;
    assert_eq!(bad.state, JobState::Failed);
    assert!(
        bad.error.as_deref().is_some_and(|e| e.contains("line 2")),
        "{:?}",
        bad.error
    );
    // Asked not to keep the data home: a plain two-stage pipeline.
    let mut plain = spec(&model, &data, &dir.path().join("plain"), 2);
    plain.keep_data_home = Some(false);
    node.start_job("ftjob-p".into(), plain)?;
    let done = wait_done(node, "ftjob-p", Duration::from_secs(120)).await?;
    assert_eq!(done.state, JobState::Succeeded);
    assert_eq!(done.stages.len(), 2, "{:?}", done.stages);
    assert_ne!(done.stages[1].node_id, home);
    // Numbers out of range are refused at once.
    let mut wrong = spec(&model, &data, &out, 2);
    wrong.learning_rate = f64::NAN;
    assert!(node.start_job("ftjob-d".into(), wrong).is_err());
    Ok(())
}

/// A stage node killed mid-job: the step is applied nowhere, the job
/// re-plans over the two live nodes, restores its checkpoint (cut for the
/// new split) and ends with the weights of an uninterrupted run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_stage_node_costs_no_step_and_the_job_resumes_on_a_new_split() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let info = tiny_model_info(dir.path())?;
    let data = write_data(dir.path())?;
    let model = info.times.model.clone();
    let steps = 40;
    // Uninterrupted, on two nodes.
    let reference = {
        let nodes = pipeline_cluster(2, 2, &info, PlacementPolicy::Even).await?;
        let out = dir.path().join("ref");
        nodes[0]
            .node
            .start_job("ftjob-ref".into(), spec(&model, &data, &out, steps))?;
        let done = wait_done(&nodes[0].node, "ftjob-ref", Duration::from_secs(120)).await?;
        assert_eq!(done.state, JobState::Succeeded);
        adapter(&out)?
    };
    // Three nodes; the third dies after step 3 (checkpoints every 2 steps).
    let mut nodes: Vec<TestNode> = pipeline_cluster(3, 3, &info, PlacementPolicy::Even).await?;
    let out = dir.path().join("killed");
    let node = nodes[0].node.clone();
    node.start_job("ftjob-k".into(), spec(&model, &data, &out, steps))?;
    let start = Instant::now();
    while node
        .job("ftjob-k")
        .and_then(|j| j.info())
        .is_none_or(|i| i.step < 3)
    {
        if start.elapsed() > Duration::from_secs(120) {
            bail!("no step 3: {:#?}", messages(&node, "ftjob-k"));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    nodes.remove(2).kill();
    let done = wait_done(&node, "ftjob-k", Duration::from_secs(180)).await?;
    let log = messages(&node, "ftjob-k");
    assert_eq!(done.state, JobState::Succeeded, "{log:#?}");
    // U-shaped over the two live nodes.
    assert_eq!(done.stages.len(), 3, "re-planned over the live nodes");
    let live: std::collections::HashSet<&str> =
        done.stages.iter().map(|s| s.node_id.as_str()).collect();
    assert_eq!(live.len(), 2, "{:?}", done.stages);
    assert!(
        log.iter()
            .any(|m| m.contains("no optimizer step was applied")
                && m.contains("left")
                && m.contains("resuming from step")),
        "{log:#?}"
    );
    let got = adapter(&out)?;
    for (n, want) in &reference {
        let diff = (want - &got[n])?.abs()?.max_all()?.to_scalar::<f32>()?;
        let scale = want.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff <= 1e-4 + 1e-4 * scale, "{n}: {diff} (scale {scale})");
    }
    Ok(())
}
