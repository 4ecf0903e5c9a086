#!/usr/bin/env bash
# The benchmark: ratios measured side by side in one run against pread,
# qemu-img bench, qemu-io and qemu-img convert (pass --quick for a short
# run). Prints figures; never fails on speed. `cowdisk bench`, then the NBD
# benchmark (scripts/bench-nbd.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --quiet --bin cowdisk
target/release/cowdisk bench "$@"
# Serving over NBD: the nbdkit plugin against nbdkit's cow filter and
# qemu-nbd (docs/NBD.md).
bash scripts/bench-nbd.sh "$@"
