#!/usr/bin/env bash
# The thread checker: runs the race tests under ThreadSanitizer — the
# built-in backend tables (tests/backend_race.rs: calls through a table
# racing with its close) and the parallel readers (tests/parallel_reads.rs:
# threads reading one image of every format, and one overlay handle while
# another thread writes) — with the standard library rebuilt instrumented
# (no false reports from an uninstrumented std). Needs the nightly
# toolchain with rust-src (`rustup component add rust-src --toolchain
# nightly`). Fails on any report. Rounds: first argument (default 300).
set -euo pipefail
cd "$(dirname "$0")/.."
target=$(rustc -vV | sed -n 's/^host: //p')
export RUSTFLAGS="-Zsanitizer=thread"
export TSAN_OPTIONS="halt_on_error=1 second_deadlock_stack=1"
export COWDISK_RACE_ROUNDS="${1:-300}"
cargo +nightly test -Zbuild-std --target "$target" --target-dir target/tsan \
  --release --test backend_race --test parallel_reads -- --nocapture
