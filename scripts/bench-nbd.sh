#!/usr/bin/env bash
# The NBD benchmark (figures, not a test; never fails on speed): one raw
# base of 1 GiB (256 MiB with --quick), served three ways side by side in
# one run, each measured with `qemu-img bench` over a Unix socket:
#   (a) nbdkit with the cowdisk plugin (a fresh persistent store),
#   (b) nbdkit's file plugin with the cow filter (the reference
#       copy-on-write NBD export of nbdkit),
#   (c) qemu-nbd on a fresh qcow2 overlay backed by the raw base.
# (a) runs twice: with the plugin's default copy-on-write unit (64 KiB, the
# size of (b)'s blocks and (c)'s clusters) and with granularity=2048 (the
# library's legacy 1 MiB, column a1M). Measures sequential 1 MiB reads at queue depth 1 and 16, a
# whole-disk read by nbdcopy over 1 and 4 connections (multi-conn; reads
# of one overlay run in parallel in the library), and 4 KiB writes (sequential, and one per MiB so each lands in a fresh
# copy-on-write unit/cluster); every server starts fresh three times and
# the best run counts (the machine may be shared). Prints MiB/s or IOPS
# and the ratios of (a) to (b) and (c).
# Usage: scripts/bench-nbd.sh [--quick] [--dir DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

size_mib=1024
dir=""
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) size_mib=256 ;;
    --dir) dir=$2; shift ;;
    *) echo "usage: $0 [--quick] [--dir DIR]" >&2; exit 2 ;;
  esac
  shift
done

for tool in nbdkit qemu-nbd qemu-img qemu-io cmake; do
  command -v "$tool" >/dev/null || { echo "$tool is missing: run scripts/install-deps.sh" >&2; exit 1; }
done

build="${COWDISK_BUILD_DIR:-target/ctest}"
echo "== building the plugin (CMake harness in $build)"
cmake -S cmake -B "$build" -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build "$build" --target nbdkit_cowdisk_plugin >"$build/bench-nbd-build.log" 2>&1 ||
  { cat "$build/bench-nbd-build.log" >&2; exit 1; }
plugin="$root/$build/nbdkit-cowdisk-plugin.so"

work=$(mktemp -d "${dir:-${TMPDIR:-/tmp}}/cowdisk-bench-nbd-XXXXXX")
pid=""
stop() {
  if [ -n "$pid" ]; then
    kill -TERM "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    pid=""
  fi
}
trap 'stop; rm -rf "$work"' EXIT
sock="$work/nbd.sock"
uri="nbd+unix:///?socket=$sock"

echo "== base: $size_mib MiB raw, every byte written (in $work)"
qemu-img create -q -f raw "$work/base.raw" "${size_mib}M"
qemu-io -f raw -c "write -P 0x5a 0 ${size_mib}M" "$work/base.raw" >/dev/null

wait_ready() {
  local i
  for i in $(seq 1 600); do
    [ -S "$sock" ] && qemu-img info -f raw "$uri" >/dev/null 2>&1 && return 0
    sleep 0.05
  done
  echo "the server did not start" >&2
  exit 1
}

start() { # a | a1M | b | c
  rm -f "$sock" "$work/s.cow" "$work/overlay.qcow2"
  case "$1" in
    a) timeout 600 nbdkit -f -U "$sock" "$plugin" file="$work/base.raw" store="$work/s.cow" & ;;
    a1M) timeout 600 nbdkit -f -U "$sock" "$plugin" file="$work/base.raw" store="$work/s.cow" \
           granularity=2048 & ;;
    b) timeout 600 nbdkit -f -U "$sock" --filter=cow file "$work/base.raw" & ;;
    c) qemu-img create -q -f qcow2 -b "$work/base.raw" -F raw "$work/overlay.qcow2"
       timeout 600 qemu-nbd -t -e 8 -k "$sock" -f qcow2 "$work/overlay.qcow2" & ;;
  esac
  pid=$!
  wait_ready
}

# seconds ARGS...: the run time qemu-img bench reports.
seconds() {
  qemu-img bench -f raw "$@" "$uri" | sed -n 's/^Run completed in \([0-9.]*\) seconds.*/\1/p'
}

# copy_seconds CONNECTIONS: a whole-disk read by nbdcopy into null:.
copy_seconds() {
  local start end
  start=$(date +%s.%N)
  nbdcopy --connections="$1" "$uri" null:
  end=$(date +%s.%N)
  awk -v a="$start" -v b="$end" 'BEGIN { printf "%.4f", b - a }'
}

mib=$((1024 * 1024))
reads=$size_mib
seq_writes=8192                   # 32 MiB of 4 KiB writes
sparse_writes=$((size_mib - 2))   # one 4 KiB write per MiB
declare -A result
best() { # KEY SECONDS: keeps the shortest time
  if [ -z "${result[$1]:-}" ] || awk -v a="$2" -v b="${result[$1]}" 'BEGIN { exit !(a < b) }'; then
    result[$1]=$2
  fi
}
echo "== measuring (3 rounds)"
for round in 1 2 3; do
  for server in a a1M b c; do
    start "$server"
    best "$server.read1" "$(seconds -c "$reads" -s 1M -d 1)"
    best "$server.read16" "$(seconds -c "$reads" -s 1M -d 16)"
    best "$server.copy1" "$(copy_seconds 1)"
    best "$server.copy4" "$(copy_seconds 4)"
    best "$server.seqw" "$(seconds -w -c "$seq_writes" -s 4k -d 16 -o 0)"
    best "$server.sparsew" "$(seconds -w -c "$sparse_writes" -s 4k -S 1M -o $((mib + 512 * 1024)) -d 16)"
    stop
  done
done

rate() { awk -v n="$1" -v t="$2" 'BEGIN { printf "%.0f", n / t }'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2fx", b / a }'; } # time b / time a = speed a / speed b
row() { # LABEL KEY COUNT UNIT
  local a=${result[a.$2]} a1M=${result[a1M.$2]} b=${result[b.$2]} c=${result[c.$2]}
  printf "%-34s %8s %8s %8s %8s %6s  %6s %6s %6s %6s\n" "$1" "$(rate "$3" "$a")" \
    "$(rate "$3" "$a1M")" "$(rate "$3" "$b")" "$(rate "$3" "$c")" "$4" \
    "$(ratio "$a" "$b")" "$(ratio "$a" "$c")" "$(ratio "$a1M" "$b")" "$(ratio "$a1M" "$c")"
}
echo
echo "qemu-img bench over NBD (Unix socket), $size_mib MiB raw base; higher is better;"
echo "a/b, a/c: the plugin's speed over the other's (target >= 1.00x)"
printf "%-34s %8s %8s %8s %8s %6s  %6s %6s %6s %6s\n" "" "(a)" "(a1M)" "(b)" "(c)" "unit" \
  "a/b" "a/c" "a1M/b" "a1M/c"
row "sequential 1 MiB reads, depth 1" read1 "$reads" MiB/s
row "sequential 1 MiB reads, depth 16" read16 "$reads" MiB/s
row "nbdcopy whole disk, 1 connection" copy1 "$reads" MiB/s
row "nbdcopy whole disk, 4 connections" copy4 "$reads" MiB/s
row "4 KiB writes, sequential, depth 16" seqw "$seq_writes" IOPS
row "4 KiB writes, 1 per MiB, depth 16" sparsew "$sparse_writes" IOPS
echo
echo "(a) nbdkit + nbdkit-cowdisk-plugin.so, persistent store, 64 KiB units (PARALLEL"
echo "    thread model; reads of one overlay run in parallel, writes one at a time)"
echo "(a1M) the same with granularity=2048 (1 MiB units, the library's default)"
echo "(b) nbdkit file --filter=cow (its overlay is a temporary file, never synced)"
echo "(c) qemu-nbd -e 8 on a qcow2 overlay over the raw base (it does not offer"
echo "    multi-conn for a writable export, so nbdcopy uses one connection there)"
