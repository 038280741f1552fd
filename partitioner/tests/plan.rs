//! The planner against exhaustive search, baselines and hand-checked cases.

use hearth_partitioner::{
    Baseline, BottleneckKind, DeviceProfile, LayerCost, Links, Method, ModelProfile, PhaseTimes,
    PlanError, Schedule, Workload, baseline, evaluate, plan, plan_exhaustive,
};
use proptest::prelude::*;

fn model(layers: usize, param: u64) -> ModelProfile {
    let l = LayerCost {
        param_bytes: param,
        flops_per_token: 1e6,
        act_bytes_per_token: 2304,
        kv_bytes_per_token: 1536,
        train_act_bytes_per_token: 40_000,
    };
    ModelProfile {
        name: "m".into(),
        layers: vec![l; layers],
        embed: LayerCost {
            param_bytes: 2 * param,
            ..Default::default()
        },
        head: LayerCost {
            param_bytes: 2 * param,
            ..Default::default()
        },
        tied_embeddings: true,
    }
}

fn device(name: &str, layer_ms: f64, memory: u64) -> DeviceProfile {
    let t = |x: f64| PhaseTimes {
        decode_s: x / 1e3,
        prefill_s_per_token: x / 1e3 / 20.0,
        train_forward_s_per_token: x / 1e3 / 15.0,
        train_s_per_token: x / 1e3 / 5.0,
    };
    DeviceProfile {
        name: name.into(),
        memory_budget: memory,
        layer: t(layer_ms),
        embed: t(layer_ms * 0.1),
        head: t(layer_ms * 2.5),
    }
}

fn links(n: usize, bw: f64, rtt: f64) -> Links {
    Links {
        bandwidth: vec![vec![bw; n]; n],
        rtt: vec![vec![rtt; n]; n],
    }
}

const GB: u64 = 1_000_000_000;

fn arb_workload() -> impl Strategy<Value = Workload> {
    prop_oneof![
        (1u32..9, 1u32..2048).prop_map(|(s, c)| Workload::Decode {
            sequences: s,
            context: c
        }),
        (1u32..512).prop_map(|t| Workload::Prefill { tokens: t }),
        (
            1u32..256,
            1u32..8,
            any::<bool>(),
            any::<bool>(),
            any::<bool>(),
            any::<bool>()
        )
            .prop_map(|(t, m, f, r, full, u)| {
                Workload::Train {
                    micro_batch_tokens: t,
                    micro_batches: m,
                    schedule: if f {
                        Schedule::OneFOneB
                    } else {
                        Schedule::GPipe
                    },
                    recompute: r,
                    method: if full {
                        Method::Full
                    } else {
                        Method::Lora {
                            adapter_bytes_per_layer: 10_000,
                        }
                    },
                    // A U-shaped plan around device 0 (which always exists).
                    home: u.then_some(0),
                }
            }),
    ]
}

fn arb_instance() -> impl Strategy<Value = (ModelProfile, Vec<DeviceProfile>, Links, Workload)> {
    (1usize..7, 1usize..4).prop_flat_map(|(l, n)| {
        (
            Just(l),
            prop::collection::vec((0.1f64..10.0, 1u64..40), n),
            prop::collection::vec(1e6f64..1e9, n * n),
            prop::collection::vec(0.0f64..5e-3, n * n),
            arb_workload(),
        )
            .prop_map(move |(l, devs, bw, rtt, w)| {
                let m = model(l, 10_000_000);
                let devices: Vec<DeviceProfile> = devs
                    .iter()
                    .enumerate()
                    .map(|(i, &(ms, mem))| device(&format!("d{i}"), ms, mem * 10_000_000))
                    .collect();
                let links = Links {
                    bandwidth: bw.chunks(n).map(<[f64]>::to_vec).collect(),
                    rtt: rtt.chunks(n).map(<[f64]>::to_vec).collect(),
                };
                (m, devices, links, w)
            })
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]

    /// The dynamic program finds exactly the exhaustive optimum.
    #[test]
    fn dp_equals_brute_force((m, d, l, w) in arb_instance()) {
        let fast = plan(&m, &d, &l, w);
        let slow = plan_exhaustive(&m, &d, &l, w);
        match (fast, slow) {
            (Ok(a), Ok(b)) => {
                let tol = 1e-9 * b.step_s.max(1e-12);
                prop_assert!((a.step_s - b.step_s).abs() <= tol, "dp {} vs brute {}: {:?} / {:?}", a.step_s, b.step_s, a.stages, b.stages);
                // The plan's own figures are consistent.
                let again = evaluate(&m, &d, &l, w, &a.stages.iter().map(|s| (s.device, s.layers.clone())).collect::<Vec<_>>()).unwrap();
                prop_assert!((again.step_s - a.step_s).abs() <= tol);
            }
            (Err(PlanError::DoesNotFit(_)), Err(PlanError::DoesNotFit(_))) => {}
            (a, b) => prop_assert!(false, "dp {a:?} vs brute {b:?}"),
        }
    }

    /// Never worse than any baseline that fits, nor the best single device.
    #[test]
    fn never_worse_than_baselines_or_one_device((m, d, l, w) in arb_instance()) {
        let Ok(best) = plan(&m, &d, &l, w) else { return Ok(()); };
        for kind in [Baseline::Even, Baseline::MemoryProportional, Baseline::FlopsProportional] {
            if let Ok(b) = baseline(kind, &m, &d, &l, w) {
                prop_assert!(best.step_s <= b.step_s * (1.0 + 1e-9), "{kind:?}");
            }
        }
        for i in 0..d.len() {
            if let Ok(one) = evaluate(&m, &d, &l, w, &[(i, 0..m.layers.len())]) {
                prop_assert!(best.step_s <= one.step_s * (1.0 + 1e-9));
            }
        }
    }
}

#[test]
fn a_slow_device_that_only_slows_the_pipeline_is_left_out() {
    let m = model(30, 5_000_000);
    let d = vec![device("desk", 1.0, 8 * GB), device("mini", 20.0, 8 * GB)];
    let l = links(2, 100e6, 1e-3);
    let p = plan(
        &m,
        &d,
        &l,
        Workload::Decode {
            sequences: 1,
            context: 512,
        },
    )
    .unwrap();
    assert_eq!(p.stages.len(), 1);
    assert_eq!(p.stages[0].device_name, "desk");
    assert!(
        p.explanation.iter().any(|e| e.starts_with("mini left out")),
        "{:#?}",
        p.explanation
    );
    // The even split (what a naive tool does) is much slower.
    let even = baseline(
        Baseline::Even,
        &m,
        &d,
        &l,
        Workload::Decode {
            sequences: 1,
            context: 512,
        },
    )
    .unwrap();
    assert!(
        even.step_s > 5.0 * p.step_s,
        "{} vs {}",
        even.step_s,
        p.step_s
    );
}

#[test]
fn throughput_mode_uses_every_stage_and_balances() {
    let m = model(30, 5_000_000);
    let d = vec![
        device("a", 1.0, 8 * GB),
        device("b", 1.0, 8 * GB),
        device("c", 2.0, 8 * GB),
    ];
    let l = links(3, 1e9, 2e-4);
    let w = Workload::Decode {
        sequences: 64,
        context: 256,
    };
    let p = plan(&m, &d, &l, w).unwrap();
    assert_eq!(p.stages.len(), 3, "{:#?}", p.explanation);
    // The slower device gets fewer layers.
    let c = p.stages.iter().find(|s| s.device_name == "c").unwrap();
    let a = p.stages.iter().find(|s| s.device_name == "a").unwrap();
    assert!(c.layers.len() < a.layers.len());
    let single = evaluate(&m, &d, &l, w, &[(0, 0..30)]).unwrap();
    assert!(p.tokens_per_s > 2.0 * single.tokens_per_s);
}

#[test]
fn a_model_too_big_for_one_device_is_split_by_memory() {
    let m = model(30, 100_000_000); // 3 GB of layers + 0.2 GB embedding
    let d = vec![device("a", 1.0, 2 * GB), device("b", 1.0, 2 * GB)];
    let l = links(2, 1e9, 1e-4);
    let p = plan(
        &m,
        &d,
        &l,
        Workload::Decode {
            sequences: 1,
            context: 128,
        },
    )
    .unwrap();
    assert_eq!(p.stages.len(), 2);
    for s in &p.stages {
        assert!(s.memory_bytes <= 2 * GB);
    }
    let tiny = vec![device("a", 1.0, GB / 10)];
    let err = plan(
        &m,
        &tiny,
        &links(1, 1e9, 0.0),
        Workload::Decode {
            sequences: 1,
            context: 128,
        },
    )
    .unwrap_err();
    assert!(matches!(err, PlanError::DoesNotFit(_)), "{err}");
    // It says how much memory is missing.
    let text = err.to_string();
    assert!(
        text.contains("short") && text.contains("needs about"),
        "{text}"
    );
}

#[test]
fn a_slow_link_is_the_bottleneck_and_is_avoided() {
    let m = model(8, 1_000_000);
    let d = vec![device("a", 1.0, 8 * GB), device("b", 1.0, 8 * GB)];
    // 100 kB/s: each boundary costs far more than compute.
    let l = links(2, 1e5, 1e-3);
    let w = Workload::Prefill { tokens: 512 };
    let p = plan(&m, &d, &l, w).unwrap();
    assert_eq!(p.stages.len(), 1);
    let forced = evaluate(&m, &d, &l, w, &[(0, 0..4), (1, 4..8)]).unwrap();
    assert_eq!(forced.bottleneck, (0, BottleneckKind::Transfer));
}

#[test]
fn one_f_one_b_memory_falls_along_the_pipeline() {
    let m = model(12, 1_000_000);
    let d = vec![
        device("a", 1.0, 64 * GB),
        device("b", 1.0, 64 * GB),
        device("c", 1.0, 64 * GB),
    ];
    let l = links(3, 1e9, 1e-4);
    let w = |schedule| Workload::Train {
        micro_batch_tokens: 256,
        micro_batches: 8,
        schedule,
        recompute: false,
        method: Method::Full,
        home: None,
    };
    let a = [(0, 0..4), (1, 4..8), (2, 8..12)];
    let f = evaluate(&m, &d, &l, w(Schedule::OneFOneB), &a).unwrap();
    let g = evaluate(&m, &d, &l, w(Schedule::GPipe), &a).unwrap();
    // Stage 1 (no embedding or head) holds min(8, 3 − 1) = 2 micro-batches
    // under 1F1B, 8 under GPipe.
    assert!(f.stages[1].memory_bytes < g.stages[1].memory_bytes);
    assert!(f.stages[0].memory_bytes > f.stages[2].memory_bytes);
}

#[test]
fn invalid_input_is_a_typed_error() {
    let m = model(4, 1);
    let d = vec![device("a", 1.0, GB)];
    let w = Workload::Decode {
        sequences: 1,
        context: 1,
    };
    assert_eq!(
        plan(&model(0, 1), &d, &links(1, 1.0, 0.0), w),
        Err(PlanError::NoLayers)
    );
    assert_eq!(
        plan(&m, &[], &links(0, 1.0, 0.0), w),
        Err(PlanError::NoDevices)
    );
    assert!(matches!(
        plan(&m, &d, &links(2, 1.0, 0.0), w),
        Err(PlanError::LinkShape { .. })
    ));
    let mut bad = d.clone();
    bad[0].layer.decode_s = f64::NAN;
    assert!(matches!(
        plan(&m, &bad, &links(1, 1.0, 0.0), w),
        Err(PlanError::BadMeasurement { .. })
    ));
    let two = vec![device("a", 1.0, GB), device("b", 1.0, GB)];
    assert!(matches!(
        plan(&m, &two, &links(2, 0.0, 0.0), w),
        Err(PlanError::BadMeasurement { .. })
    ));
    assert!(matches!(
        plan(
            &m,
            &d,
            &links(1, 1.0, 0.0),
            Workload::Decode {
                sequences: 0,
                context: 1
            }
        ),
        Err(PlanError::BadWorkload(_))
    ));
    assert!(matches!(
        evaluate(&m, &d, &links(1, 1.0, 0.0), w, &[(0, 0..2)]),
        Err(PlanError::BadAssignment(_))
    ));
    assert!(matches!(
        evaluate(&m, &two, &links(2, 1.0, 0.0), w, &[(0, 0..2), (0, 2..4)]),
        Err(PlanError::BadAssignment(_))
    ));
}

#[test]
fn planning_is_deterministic() {
    let m = model(30, 5_000_000);
    let d: Vec<_> = (0..4)
        .map(|i| device(&format!("d{i}"), 1.0, 8 * GB))
        .collect();
    let l = links(4, 1e9, 1e-4);
    let w = Workload::Decode {
        sequences: 16,
        context: 256,
    };
    let a = plan(&m, &d, &l, w).unwrap();
    let b = plan(&m, &d, &l, w).unwrap();
    assert_eq!(a, b);
}

/// A U-shaped training plan: the data's device (a laptop too small for the
/// model) runs the embedding and the head at both ends, a bigger device
/// the layers; token ids and labels never leave the laptop.
#[test]
fn a_u_shaped_plan_keeps_both_ends_on_the_data_device() {
    let m = model(12, 100_000_000);
    let d = vec![
        device("laptop", 2.0, 3 * GB / 2),
        device("desk", 1.0, 16 * GB),
    ];
    let l = links(2, 100e6, 1e-3);
    let w = |home| Workload::Train {
        micro_batch_tokens: 256,
        micro_batches: 8,
        schedule: Schedule::OneFOneB,
        recompute: true,
        method: Method::Lora {
            adapter_bytes_per_layer: 1_000_000,
        },
        home,
    };
    let free = plan(&m, &d, &l, w(None)).unwrap();
    let u = plan(&m, &d, &l, w(Some(0))).unwrap();
    let first = &u.stages[0];
    let last = u.stages.last().unwrap();
    assert_eq!(first.device_name, "laptop");
    assert!(first.embed && !first.head);
    assert_eq!(last.device_name, "laptop");
    assert_eq!(last.layers, 12..12);
    assert!(last.head && !last.embed && last.memory_bytes > 0);
    assert!(u.stages.len() >= 3, "{:#?}", u.stages);
    for s in &u.stages[1..u.stages.len() - 1] {
        assert_eq!(s.device_name, "desk");
        assert!(!s.embed && !s.head);
    }
    // The laptop's two stages together stay within its memory.
    let laptop: u64 = u
        .stages
        .iter()
        .filter(|s| s.device == 0)
        .map(|s| s.memory_bytes)
        .sum();
    assert!(laptop <= d[0].memory_budget);
    // Not a linear pipeline's split: the head runs beside the desk's
    // layers, so either may be faster; both are finite plans.
    assert!(u.step_s.is_finite() && free.step_s.is_finite() && u.step_s > 0.0);
    // The plan evaluates the same with or without its head-only stage, and
    // an assignment that starts elsewhere is refused.
    let a: Vec<_> = u
        .stages
        .iter()
        .map(|s| (s.device, s.layers.clone()))
        .collect();
    let again = evaluate(&m, &d, &l, w(Some(0)), &a).unwrap();
    let short = evaluate(&m, &d, &l, w(Some(0)), &a[..a.len() - 1]).unwrap();
    assert!((again.step_s - u.step_s).abs() <= 1e-12 && (short.step_s - u.step_s).abs() <= 1e-12);
    assert!(matches!(
        evaluate(&m, &d, &l, w(Some(0)), &[(1, 0..12)]),
        Err(PlanError::BadAssignment(_))
    ));
    assert!(matches!(
        plan(&m, &d, &l, w(Some(2))),
        Err(PlanError::BadWorkload(_))
    ));
    // A data device too small for even the embedding and head: no U.
    let tiny = vec![device("phone", 2.0, GB / 10), device("desk", 1.0, 16 * GB)];
    assert!(matches!(
        plan(&m, &tiny, &l, w(Some(0))),
        Err(PlanError::DoesNotFit(_))
    ));
}
