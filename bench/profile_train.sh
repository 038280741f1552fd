#!/usr/bin/env bash
# Where a single-node training micro-batch spends its time: runs
# train-profile (one TrainStage of SmolLM2-135M, LoRA r=8 on every
# projection, 64-token micro-batches) under `perf record` and prints the
# samples sorted into categories (bench/profile_train.py) as Markdown.
# Usage: bench/profile_train.sh [TITLE] [TRAIN-PROFILE-BINARY]
# (perf must be installed; apt-get install linux-perf)
set -euo pipefail
cd "$(dirname "$0")/.."
title=${1:-"training micro-batch"}
bin=${2:-}
if [[ -z "$bin" ]]; then
  cargo build -q --release -p hearth-bench --bin train-profile
  bin=./target/release/train-profile
fi
work=bench/.work
mkdir -p "$work"
perf record -q -F 999 -g -o "$work/train.perf" "$bin" --micro 10 > "$work/train-profile.txt" 2>/dev/null
perf report -i "$work/train.perf" --no-children --sort comm,dso,symbol --stdio -g none 2>/dev/null \
  | python3 bench/profile_train.py "$title" "$work/train-profile.txt"
