#!/usr/bin/env bash
# The long crash-consistency run: 100,000 randomized power-loss points
# (CI runs 2,000), over log sizes from 64 KiB to 16 MiB, plus a twentieth
# as many huge-transaction points (CI: 100). Pass another count as the
# first argument. Prints the journal counters that prove the rare paths
# (multi-entry transactions, checkpoints made to find room, refused
# oversized transactions, wraps) were reached, and the time taken.
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
COWDISK_CRASH_POINTS="${1:-100000}" cargo test --release --test store_crash -- --nocapture --test-threads=1
echo "crash soak: $(( $(date +%s) - start )) s"
