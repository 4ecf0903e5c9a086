# Shared by the nbdkit plugin's tests (sourced; ctest passes PLUGIN,
# NBD_CLIENT, COWDISK and VALGRIND in the environment). Every server
# listens on a Unix socket in this test's own temporary folder, runs under
# `timeout`, and is stopped when the test exits, however it exits.
set -euo pipefail

: "${PLUGIN:?the plugin file}" "${NBD_CLIENT:?the nbd_client test program}"
: "${COWDISK:?the cowdisk CLI}"

tests_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
work=$(mktemp -d "${TMPDIR:-/tmp}/cowdisk-nbd-XXXXXX")
server_pidfiles=()
server_waiters=()

cleanup() {
  local pidfile pid
  for pidfile in "${server_pidfiles[@]}"; do
    pid=$(cat "$pidfile" 2>/dev/null || true)
    [ -n "$pid" ] && kill -KILL "$pid" 2>/dev/null || true
  done
  for pid in "${server_waiters[@]}"; do
    kill -KILL "$pid" 2>/dev/null || true
  done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

fail() {
  echo "FAIL: $*" >&2
  exit 1
}

# start_server NAME [PREFIX COMMAND ...] -- PLUGIN ARGS...: starts nbdkit in
# the foreground on $work/NAME.sock (under PREFIX, e.g. valgrind, if given),
# waits until it has written its pid file (it does once it accepts
# connections), and sets URI, SERVER (the waiting `timeout` process) and
# SERVER_PID (nbdkit's own pid, or valgrind's).
start_server() {
  local name=$1 prefix=() i
  shift
  while [ "$1" != "--" ]; do prefix+=("$1"); shift; done
  shift
  local sock="$work/$name.sock" pidfile="$work/$name.pid"
  rm -f "$sock" "$pidfile"
  timeout 600 "${prefix[@]}" nbdkit -f --exit-with-parent -P "$pidfile" -U "$sock" \
    "$PLUGIN" "$@" 2>>"$work/$name.log" &
  SERVER=$!
  server_waiters+=("$SERVER")
  server_pidfiles+=("$pidfile")
  for i in $(seq 1 1200); do
    [ -s "$pidfile" ] && break
    if ! kill -0 "$SERVER" 2>/dev/null; then
      cat "$work/$name.log" >&2
      fail "nbdkit ($name) did not start"
    fi
    sleep 0.05
  done
  [ -s "$pidfile" ] || fail "nbdkit ($name) not ready after 60 s"
  SERVER_PID=$(cat "$pidfile")
  URI="nbd+unix:///?socket=$sock"
}

# stop_server: SIGTERM, as an operator would; nbdkit closes the overlay
# (flushing the store) and must exit with status 0.
stop_server() {
  kill -TERM "$SERVER_PID"
  local rc=0
  wait "$SERVER" || rc=$?
  [ "$rc" -eq 0 ] || { cat "$work"/*.log >&2; fail "nbdkit exited with status $rc"; }
}

# kill_server: SIGKILL, a crash.
kill_server() {
  kill -KILL "$SERVER_PID"
  wait "$SERVER" 2>/dev/null || true
}

# The allocation class of every 4 KiB block, one "block class" line each,
# from "start length class" runs on stdin (class D = data, Z = zero but
# allocated, H = hole; a block holding any data is D, else any Z is Z).
blocks_of_runs() {
  awk '
    { first = int($1 / 4096); last = int(($1 + $2 - 1) / 4096)
      for (b = first; b <= last; b++) {
        c = $3; old = cls[b]
        if (old == "D" || (old == "Z" && c == "H")) c = old
        cls[b] = c; if (b > max) max = b } }
    END { for (b = 0; b <= max; b++) print b, cls[b] }'
}

# Runs from nbdinfo --map (types: 0 data, 2 zero, 3 hole).
nbdinfo_runs() {
  nbdinfo --map --json "$1" |
    jq -r '.[] | "\(.offset) \(.length) \(if .type == 0 then "D" elif .type == 2 then "Z" else "H" end)"'
}

# Runs from qemu-img map (over NBD, or of an image file): data that is not
# zero is D, allocated zeros Z, the rest H.
qemu_map_runs() {
  qemu-img map --output=json "$@" |
    jq -r '.[] | "\(.start) \(.length) \(if .data and (.zero | not) then "D" elif .present and .zero and (.data or (.offset == null)) then "Z" else "H" end)"'
}

# Runs from `cowdisk map --json` (at 4 KiB resolution).
cowdisk_map_runs() {
  "$COWDISK" map --json --granularity 8 "$@" |
    jq -r '.[] | "\(.start) \(.length) \(if .data then "D" elif .allocated then "Z" else "H" end)"'
}

same_blocks() { # WHAT EXPECTED ACTUAL
  if ! diff -q "$2" "$3" >/dev/null; then
    diff "$2" "$3" | head -20 >&2
    fail "$1"
  fi
}
