#!/usr/bin/env bash
# Cross-builds lopper for aarch64 Linux and runs the kernel and format tests under QEMU user
# emulation, so the NEON kernels are checked against their naive references on an x86 machine.
# (Correctness only: emulated timings mean nothing.)
#
# Needs: rustup target aarch64-unknown-linux-gnu, and the Debian packages gcc-aarch64-linux-gnu,
# libc6-dev-arm64-cross, qemu-user. `--setup` installs them (apt, root).
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ "${1:-}" == "--setup" ]]; then
    rustup target add aarch64-unknown-linux-gnu
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q gcc-aarch64-linux-gnu libc6-dev-arm64-cross qemu-user
    shift
fi
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER="qemu-aarch64 -L /usr/aarch64-linux-gnu"
cargo test --release --target aarch64-unknown-linux-gnu --lib --test kernels --test formats "$@"
