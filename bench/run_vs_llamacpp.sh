#!/usr/bin/env bash
# Benchmark Hearth against llama.cpp on the default model (same GGUF, same
# prompt, same threads, interleaved runs). Builds llama-cpp-python from
# source into .venv-llama the first time (about 10 minutes on 2 cores).
# Usage: bench/run_vs_llamacpp.sh [extra vs-llamacpp args, e.g. --rounds 7]
set -euo pipefail
cd "$(dirname "$0")/.."
if ! .venv-llama/bin/python -c "import llama_cpp" 2>/dev/null; then
  python3 -m venv .venv-llama
  # llama.cpp's widest x86 paths, each only where this CPU has it (a path
  # the CPU lacks dies with an illegal instruction). AMX stays off: its path
  # crashes on the machines this was made on. No cached wheel: it would
  # carry the flags of the machine that built it.
  flags=$(grep -m1 '^flags' /proc/cpuinfo || true)
  has() { [[ " $flags " == *" $1 "* ]] && echo ON || echo OFF; }
  CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=$(has avx) -DGGML_AVX2=$(has avx2) -DGGML_FMA=$(has fma) \
    -DGGML_F16C=$(has f16c) -DGGML_BMI2=$(has bmi2) -DGGML_AVX512=$(has avx512f) \
    -DGGML_AVX512_VBMI=$(has avx512vbmi) -DGGML_AVX512_VNNI=$(has avx512_vnni) \
    -DGGML_AVX512_BF16=$(has avx512_bf16) -DGGML_AVX_VNNI=$(has avx_vnni) \
    -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF -DLLAMA_CURL=OFF" \
  CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" .venv-llama/bin/pip install -q --no-cache-dir llama-cpp-python==0.3.36 numpy
fi
cargo run --release -p hearth-bench --bin vs-llamacpp -- --llama-python .venv-llama/bin/python "$@"
