//! Entry points for the cargo-fuzz targets in `runtime/fuzz` (feature
//! `fuzzing`): what a member's `CONTROL` documents and training orders go
//! through before they touch anything. Each panics only on a broken
//! invariant: that is what the fuzzer looks for.

use crate::control::Control;
use crate::train::host::{MAX_LORA_RANK, MAX_RESTORE, MAX_SEQ_LEN};

/// Any bytes as a control document from a peer: a typed error or a
/// document; placements are checked, and one that passes has contiguous
/// stages and members once each; training orders that pass their check are
/// within every bound that sizes memory; events are checked for size.
pub fn control_document(bytes: &[u8]) {
    let Ok(c) = Control::from_bytes(bytes) else {
        return;
    };
    match c {
        Control::Assign { placement } | Control::Activate { placement }
            if placement.validate().is_ok() =>
        {
            let last = placement.stages.last().map(|s| s.spec.end);
            for s in &placement.stages {
                assert!(s.spec.start <= s.spec.end);
                let (own, i) = placement
                    .pipeline_for(&s.node_id)
                    .unwrap_or_else(|| panic!("a stage's member has no pipeline"));
                assert_eq!(own.stages[i].node_id, s.node_id);
            }
            for r in &placement.replicas {
                let (own, _) = placement
                    .pipeline_for(&r.node_id)
                    .unwrap_or_else(|| panic!("a replica has no pipeline"));
                assert_eq!(own.stages.len(), 1);
                assert_eq!(Some(own.stages[0].spec.end), last);
                assert!(own.validate().is_ok());
            }
        }
        Control::TrainStage { order } => training_order_checked(&order),
        Control::Event { event } if event.check_from_peer().is_ok() => {
            let size = serde_json::to_vec(&event).map_or(0, |v| v.len());
            assert!(
                size <= crate::events::MAX_EVENT_BYTES,
                "{size} bytes passed"
            );
        }
        _ => {}
    }
}

/// A training order built from fuzzed numbers (rank, checkpoint length,
/// micro-batches, row length, stage, stages, timeout, beta1): whatever
/// passes its check is bounded.
pub fn training_order(bytes: &[u8]) {
    let mut words = bytes.chunks(8).map(|c| {
        let mut w = [0u8; 8];
        w[..c.len()].copy_from_slice(c);
        u64::from_le_bytes(w)
    });
    let mut next = || words.next().unwrap_or(0);
    // Small values most of the time, any value sometimes.
    let mut num = |small: u64| {
        let w = next();
        if w & 1 == 0 { (w >> 1) % small } else { w >> 1 }
    };
    let (rank, restore, micro, max_len) = (num(4096), num(1 << 24), num(8192), num(1 << 16));
    let (stage, stages, timeout) = (num(8), num(8), num(100_000));
    let beta1 = f64::from_bits(next());
    let doc = serde_json::json!({"format": 1, "type": "train_stage", "order": {
        "job": 5, "stage": stage, "stages": stages,
        "spec": {"start": 0, "end": 2, "embed": true, "head": true},
        "content": "00",
        "method": {"type": "lora", "rank": rank, "alpha": 16.0, "targets": ["q", "v"]},
        "schedule": "1f1b", "micro_batches": micro, "prev": null, "next": null, "tied": null,
        "seed": 1, "optim": {"beta1": beta1, "beta2": 0.999, "eps": 1e-8, "weight_decay": 0.0},
        "timeout_s": timeout, "restore_len": restore, "max_len": max_len,
    }});
    let Ok(bytes) = serde_json::to_vec(&doc) else {
        return;
    };
    if let Ok(Control::TrainStage { order }) = Control::from_bytes(&bytes) {
        training_order_checked(&order);
    }
}

fn training_order_checked(order: &crate::train::host::StageOrder) {
    if order.check().is_err() {
        return;
    }
    if let hearth_models::train::Method::Lora(l) = &order.method {
        assert!(l.rank >= 1 && l.rank <= MAX_LORA_RANK, "rank {}", l.rank);
    }
    assert!(order.restore_len <= MAX_RESTORE);
    assert!(order.micro_batches >= 1 && order.micro_batches <= 4096);
    assert!(order.max_len >= 1 && order.max_len <= MAX_SEQ_LEN);
    assert!(order.stage < order.stages);
    assert!(
        (0.0..1.0).contains(&order.optim.beta1),
        "beta1 {}",
        order.optim.beta1
    );
}
