#!/usr/bin/env bash
# The benchmark: ratios measured side by side in one run (pass --quick for
# a short run). Prints figures; never fails on speed.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo run --release --example bench -- "$@"
