#!/usr/bin/env bash
# The benchmark: ratios measured side by side in one run against pread,
# qemu-img bench, qemu-io and qemu-img convert (pass --quick for a short
# run). Prints figures; never fails on speed. `cowdisk bench`, then the NBD
# benchmark (scripts/bench-nbd.sh), then filesystem-aware clones
# (scripts/bench-fs.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --quiet --bin cowdisk
target/release/cowdisk bench "$@"
# Serving over NBD: the nbdkit plugin against nbdkit's cow filter and
# qemu-nbd (docs/NBD.md).
bash scripts/bench-nbd.sh "$@"
# Filesystem-aware clones (docs/FILESYSTEMS.md): compact clone vs plain
# clone vs qemu-img convert on a 4 GiB disk (512 MiB with --quick).
fs_mib=4096
for arg in "$@"; do [ "$arg" = "--quick" ] && fs_mib=512; done
fs_work=$(mktemp -d)
bash scripts/bench-fs.sh "$fs_mib" "$fs_work"
rm -rf "$fs_work"
