//! A pipeline with one stage on the CPU and one on a GPU (wgpu): the
//! tokens equal the all-CPU pipeline's, and the GPU node's profile is
//! measured on the GPU.
//!
//! Runs on whatever adapter wgpu finds, software ones included (CI uses
//! Mesa's llvmpipe Vulkan driver). Without one the test says so and
//! passes, unless `HEARTH_REQUIRE_GPU` is set.
#![allow(clippy::print_stdout)] // Prints the placement it checks.

use std::time::Duration;

use anyhow::{Context, Result};
use hearth_net::ClusterSecret;
use hearth_runtime::Compute;
use hearth_runtime::pipeline::PlacementPolicy;
use hearth_runtime::profile::{MeasureOptions, ModelInfo};
use hearth_test_utils::cluster::{generate_all, greedy, model_info, pipeline_cluster_with};
use hearth_test_utils::{TinySpec, tiny_model};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cpu_stage_and_a_wgpu_stage_give_the_all_cpu_tokens() -> Result<()> {
    let Some(gpu) = hearth_test_utils::gpu() else {
        return Ok(());
    };
    let dir = tempfile::tempdir()?;
    // f32 weights: both backends run the same dense arithmetic, so greedy
    // tokens cannot flip on rounding (quantized paths: models/tests/gpu.rs).
    let tiny = tiny_model(dir.path(), TinySpec::default())?;
    let info = model_info(&tiny.gguf_f32, dir.path())?;
    let weights = hearth_models::WeightFile::open(&tiny.gguf_f32)?;
    let (gpu_info, _) = ModelInfo::measure_with(
        &weights,
        &dir.path().join("profiles"),
        &MeasureOptions {
            compute: Compute::Gpu(gpu.clone()),
            ..MeasureOptions::quick()
        },
        false,
        &mut |_| {},
    )?;
    assert!(
        gpu_info.times.backend.starts_with("wgpu:"),
        "{}",
        gpu_info.times.backend
    );
    assert!(gpu_info.times.layer.decode_s > 0.0);
    assert_eq!(info.times.backend, "cpu");
    let prompt: Vec<u32> = vec![5, 17, 42, 9, 33, 7];

    let secret = ClusterSecret::generate();
    let cpu_nodes =
        pipeline_cluster_with(&secret, 2, 2, &info, PlacementPolicy::Even, |_, _| {}).await?;
    let want = generate_all(
        &cpu_nodes[0].node,
        greedy(prompt.clone(), 30),
        Duration::from_secs(30),
    )
    .await?
    .token_ids;
    drop(cpu_nodes);
    assert!(want.len() > 10, "{want:?}");

    let secret = ClusterSecret::generate();
    let nodes = pipeline_cluster_with(&secret, 2, 2, &info, PlacementPolicy::Even, |i, cfg| {
        if i == 1 {
            cfg.compute = Compute::Gpu(gpu.clone());
            cfg.model = Some(gpu_info.clone());
        }
    })
    .await?;
    let p = nodes[0].node.placement().context("no placement")?;
    println!(
        "{}",
        p.stages
            .iter()
            .map(|s| format!("{}:{}..{}", s.name, s.spec.start, s.spec.end))
            .collect::<Vec<_>>()
            .join(" ")
    );
    assert!(p.stages.iter().any(|s| s.name == "n1"), "n1 runs no stage");
    for t in &nodes {
        let got =
            generate_all(&t.node, greedy(prompt.clone(), 30), Duration::from_secs(60)).await?;
        assert_eq!(got.token_ids, want, "asked {}", t.name);
        assert_eq!(got.stages, 2);
    }
    Ok(())
}
