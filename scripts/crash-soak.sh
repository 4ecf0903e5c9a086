#!/usr/bin/env bash
# The long crash-consistency run: 100,000 randomized power-loss points
# (CI runs 2,000). Pass another count as the first argument.
set -euo pipefail
cd "$(dirname "$0")/.."
COWDISK_CRASH_POINTS="${1:-100000}" cargo test --release --test store_crash -- --nocapture
