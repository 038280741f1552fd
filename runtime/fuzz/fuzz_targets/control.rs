//! A member's `CONTROL` document on arbitrary bytes: a typed error or a
//! document, never a panic; placements, training orders and events that
//! pass their checks keep their invariants (`hearth_runtime::fuzzing`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    hearth_runtime::fuzzing::control_document(data);
});
