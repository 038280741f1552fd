#![allow(clippy::print_stdout)] // Prints how long planning took.
//! Planning stays interactive at home-cluster sizes: 30 layers (SmolLM2)
//! and 80 layers (a 70B model) over 6 devices, in throughput mode (the
//! slowest search: every bottleneck bound is a candidate).

use std::time::Instant;

use hearth_partitioner::{
    DeviceProfile, LayerCost, Links, ModelProfile, PhaseTimes, Workload, plan,
};

#[test]
fn plans_six_devices_quickly() {
    for layers in [30, 80] {
        let l = LayerCost {
            param_bytes: 10_000_000,
            flops_per_token: 1.0,
            act_bytes_per_token: 2304,
            kv_bytes_per_token: 1536,
            train_act_bytes_per_token: 0,
        };
        let m = ModelProfile {
            name: "m".into(),
            layers: vec![l; layers],
            embed: l,
            head: l,
            tied_embeddings: false,
        };
        let devices: Vec<DeviceProfile> = (0..6)
            .map(|i| {
                let t = 1e-3 * (1.0 + i as f64 * 0.37);
                DeviceProfile {
                    name: format!("d{i}"),
                    memory_budget: 10_000_000_000,
                    layer: PhaseTimes {
                        decode_s: t,
                        prefill_s_per_token: t / 10.0,
                        train_forward_s_per_token: t / 3.0,
                        train_s_per_token: t,
                    },
                    embed: PhaseTimes::default(),
                    head: PhaseTimes {
                        decode_s: 2.5 * t,
                        ..Default::default()
                    },
                }
            })
            .collect();
        let n = devices.len();
        let links = Links {
            bandwidth: (0..n)
                .map(|a| (0..n).map(|b| 1e8 * (1 + (a + b) % 3) as f64).collect())
                .collect(),
            rtt: vec![vec![5e-4; n]; n],
        };
        let t = Instant::now();
        let p = plan(
            &m,
            &devices,
            &links,
            Workload::Decode {
                sequences: 32,
                context: 512,
            },
        )
        .unwrap();
        println!(
            "{layers} layers, 6 devices: {} stages in {:?}",
            p.stages.len(),
            t.elapsed()
        );
    }
}
