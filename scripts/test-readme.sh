#!/usr/bin/env bash
# Runs the README's linking recipes exactly as written: each fenced block
# marked `<!-- ci: NAME -->` is taken verbatim from README.md. The install
# recipe installs into a scratch PREFIX; the CMake lines go into a minimal
# consumer project; the pkg-config and by-hand recipes compile the README's
# mytool.c; every program built is run on a sample disk.img.
set -euo pipefail
cd "$(dirname "$0")/.."
root="$PWD"
work="$(mktemp -d)"
trap 'rm -rf "$work"; rm -f "$root/mytool.c" "$root/mytool"' EXIT

# The block after the marker `<!-- ci: $1 -->`.
block() {
  awk -v name="$1" '
    $0 == "<!-- ci: " name " -->" { found = 1; next }
    found && /^```/ { if (inside) exit; inside = 1; next }
    inside { print }
  ' "$root/README.md"
}
for name in install cmake pkg-config by-hand mytool.c; do
  [ -n "$(block "$name")" ] || { echo "README.md has no '$name' block" >&2; exit 1; }
done

block mytool.c > "$work/mytool.c"
# The sample disk: 16 MiB, data in its first 8 MiB.
head -c $((8 << 20)) /dev/urandom > "$work/disk.img"
truncate -s 16M "$work/disk.img"
run_mytool() {
  local out
  out="$(cd "$work" && "$1")"
  echo "  $out"
  # 16 MiB + 2 MiB inserted = 18 pages of 1 MiB. A raw source is data
  # where the file holds data and unallocated in its holes (the last 8 MiB,
  # left by truncate); after the move the inserted 2 MiB are pages 2 and 3:
  # 18 - 2 - 8 pages to store.
  [ "$out" = "8 of 18 pages to store" ] || { echo "unexpected: $out" >&2; exit 1; }
}

echo "== README: install (PREFIX=$work/prefix)"
export PREFIX="$work/prefix"
bash -euo pipefail -c "$(block install)"

echo "== README: CMake find_package"
mkdir -p "$work/cmake-project"
cp "$work/mytool.c" "$work/cmake-project/"
{
  echo 'cmake_minimum_required(VERSION 3.16)'
  echo 'project(mytool LANGUAGES C)'
  echo 'add_executable(mytool mytool.c)'
  block cmake
} > "$work/cmake-project/CMakeLists.txt"
cmake -S "$work/cmake-project" -B "$work/cmake-project/build" \
  -DCMAKE_PREFIX_PATH="$PREFIX" >/dev/null
cmake --build "$work/cmake-project/build" >/dev/null
run_mytool "$work/cmake-project/build/mytool"

echo "== README: pkg-config"
mkdir -p "$work/pkg"
cp "$work/mytool.c" "$work/pkg/"
(cd "$work/pkg" && PKG_CONFIG_PATH="$PREFIX/lib/pkgconfig" bash -euo pipefail -c "$(block pkg-config)")
run_mytool "$work/pkg/mytool"

echo "== README: by hand"
cp "$work/mytool.c" "$root/mytool.c"
bash -euo pipefail -c "$(block by-hand)"
mv "$root/mytool" "$work/by-hand-mytool"
run_mytool "$work/by-hand-mytool"

echo "README recipes: 4 passed, 0 failed"
