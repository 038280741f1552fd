#!/usr/bin/env bash
# Benchmark Hearth against llama.cpp on the default model (same GGUF, same
# prompt, same threads, interleaved runs). Builds llama-cpp-python from
# source into .venv-llama the first time (about 10 minutes on 2 cores).
# Usage: bench/run_vs_llamacpp.sh [extra vs-llamacpp args, e.g. --rounds 7]
set -euo pipefail
cd "$(dirname "$0")/.."
if ! .venv-llama/bin/python -c "import llama_cpp" 2>/dev/null; then
  python3 -m venv .venv-llama
  # AMX is off: llama.cpp's AMX path crashes on the machines this was made on.
  CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON \
    -DGGML_AVX512=ON -DGGML_AVX512_VBMI=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON -DGGML_AVX_VNNI=ON \
    -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF -DLLAMA_CURL=OFF" \
  CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" .venv-llama/bin/pip install -q llama-cpp-python==0.3.36 numpy
fi
cargo run --release -p hearth-bench --bin vs-llamacpp -- --llama-python .venv-llama/bin/python "$@"
