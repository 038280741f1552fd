#!/usr/bin/env bash
# The aarch64 (ARM) path, proven here on x86-64: cross-compiles the model
# crate for aarch64-unknown-linux-gnu with Debian's cross toolchain and runs
# its kernel tests and its llama.cpp parity tests under qemu-user, twice:
# on qemu's "max" CPU (NEON with the dot-product extension: the `sdot`
# kernels) and on a Cortex-A53 (NEON without it, a Raspberry Pi 3's core:
# the plain NEON kernels). qemu cannot time anything; it proves the
# kernels compute what the x86 ones and llama.cpp compute.
#
# Called by scripts/test.sh; installs what it needs as root, and elsewhere
# skips with the reason when a piece is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
TARGET=aarch64-unknown-linux-gnu
skip() {
  echo "skipping the aarch64 tests: $*"
  exit 0
}
if ! command -v aarch64-linux-gnu-gcc >/dev/null || ! command -v qemu-aarch64 >/dev/null; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
      gcc-aarch64-linux-gnu libc6-dev-arm64-cross qemu-user
  else
    skip "aarch64-linux-gnu-gcc or qemu-aarch64 is missing (apt-get install gcc-aarch64-linux-gnu libc6-dev-arm64-cross qemu-user, as root)"
  fi
fi
if ! rustup target list --installed | grep -qx "$TARGET"; then
  if ! rustup target add "$TARGET" && [ "$(id -u)" != 0 ]; then
    skip "rustup could not add the $TARGET standard library"
  elif ! rustup target list --installed | grep -qx "$TARGET"; then
    echo "rustup could not add the $TARGET standard library" >&2
    exit 1
  fi
fi
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
export CC_aarch64_unknown_linux_gnu=aarch64-linux-gnu-gcc
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER="qemu-aarch64 -L /usr/aarch64-linux-gnu"
run() {
  cargo test -p hearth-models --target "$TARGET" --lib quant:: -- --nocapture
  cargo test -p hearth-models --target "$TARGET" --test llamacpp_reference \
    every_family -- --nocapture
}
QEMU_CPU=max run
QEMU_CPU=cortex-a53 run
