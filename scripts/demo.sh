#!/usr/bin/env bash
# The main job on a fresh machine: build, then enlarge a generated sample
# disk through an overlay and write a sparse clone (into demo-output/).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo run --release --example demo -- "${1:-demo-output}"
