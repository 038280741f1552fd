#!/usr/bin/env bash
# Pipeline-parallel training benchmark (p = 1, 2, 3; m = 4p) with the
# single-node step beside PyTorch on the CPU. Installs torch and safetensors
# into .venv-torch the first time (PyPI's torch wheel brings its CUDA
# libraries along: about 5 GB on disk; the run itself uses the CPU only).
# Usage: bench/run_train.sh [extra train args, e.g. --steps 4]
set -euo pipefail
cd "$(dirname "$0")/.."
if ! .venv-torch/bin/python -c "import torch, safetensors" 2>/dev/null; then
  python3 -m venv .venv-torch
  .venv-torch/bin/pip install -q torch==2.15.0 safetensors numpy
fi
cargo run --release -p hearth-bench --bin train -- --torch .venv-torch/bin/python "$@"
