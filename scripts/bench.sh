#!/usr/bin/env bash
# The benchmark: ratios measured side by side in one run against pread,
# qemu-img bench, qemu-io and qemu-img convert (pass --quick for a short
# run). Prints figures; never fails on speed. Same as `cowdisk bench`.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --quiet --bin cowdisk
exec target/release/cowdisk bench "$@"
