//! Training orders with fuzzed numbers: whatever passes the order's check
//! is within every bound that sizes memory (`hearth_runtime::fuzzing`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    hearth_runtime::fuzzing::training_order(data);
});
