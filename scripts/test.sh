#!/usr/bin/env bash
# The whole test suite, from a fresh machine: installs missing tools, checks
# formatting, lints (the whole workspace: the library and cli/), checks
# the committed C headers are what the build generates, runs the Rust
# tests, then builds the C harness with CMake and runs the C tests with
# ctest (each also under valgrind memcheck), the README's recipes, and the
# race tests under ThreadSanitizer (scripts/race-check.sh).
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/install-deps.sh

echo "== cargo fmt --check"
cargo fmt --all -- --check

echo "== cargo clippy -D warnings"
cargo clippy --release --workspace --all-targets -- -D warnings

echo "== generated headers are committed as generated"
cargo build --release --lib
if git rev-parse --is-inside-work-tree >/dev/null 2>&1; then
  if ! git diff --exit-code -- include/ || [ -n "$(git status --porcelain -- include/)" ]; then
    echo "include/ differs from a fresh generation: run 'cargo build' and commit include/" >&2
    exit 1
  fi
fi

echo "== cargo test (the library and the cli/ package)"
cargo test --release --workspace --all-targets

echo "== C tests (CMake + ctest, valgrind memcheck)"
build="${COWDISK_BUILD_DIR:-target/ctest}"
cmake -S cmake -B "$build" -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build "$build" -j "$(nproc)"
(cd "$build" && ctest --output-on-failure -j "$(nproc)")

echo "== the README's linking recipes, as written"
bash scripts/test-readme.sh

echo "== the race tests under ThreadSanitizer"
bash scripts/race-check.sh 100
