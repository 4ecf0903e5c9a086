#!/usr/bin/env bash
# `cowdisk serve`: prints a URI that qemu-img and qemu-io use; writes land in
# the store; SIGTERM to cowdisk stops nbdkit cleanly (the store is closed
# and reopens with the writes); --readonly refuses writes; --port serves on
# 127.0.0.1; installed (cmake --install), cowdisk finds the plugin beside
# it and the plugin finds libcowdisk.so; a missing nbdkit, a missing plugin
# and a bad source are clear errors.
. "$(dirname "$0")/lib.sh"
cd "$work"
export COWDISK_NBDKIT_PLUGIN="$PLUGIN"

qemu-img create -q -f raw src.raw 16M
qemu-io -f raw -c 'write -P 0x4D 0 4M' src.raw >/dev/null
cp src.raw model.raw

# serve_in_background OUT ARGS...: starts `cowdisk serve`, waits for its
# first line (the URI) and sets SERVE (its pid) and URI.
serve_in_background() {
  local out=$1 i
  shift
  timeout 300 "$COWDISK" serve "$@" >"$out" 2>"$out.err" &
  SERVE=$!
  server_waiters+=("$SERVE")
  for i in $(seq 1 1200); do
    [ -s "$out" ] && break
    kill -0 "$SERVE" 2>/dev/null || { cat "$out.err" >&2; fail "cowdisk serve exited"; }
    sleep 0.05
  done
  URI=$(head -n 1 "$out")
  [ -n "$URI" ] || fail "cowdisk serve printed no URI"
}
stop_serve() {
  kill -TERM "$SERVE"
  local rc=0
  wait "$SERVE" || rc=$?
  [ "$rc" -eq 0 ] || { cat "$work"/*.err >&2; fail "cowdisk serve exited with $rc after SIGTERM"; }
}

serve_in_background unix.out src.raw --store s.cow --socket "$work/serve.sock"
[ "$URI" = "nbd+unix:///?socket=$work/serve.sock" ] || fail "unexpected URI: $URI"
[ "$(qemu-img info --output=json -f raw "$URI" | jq '."virtual-size"')" -eq 16777216 ] ||
  fail "qemu-img info over the printed URI: wrong size"
qemu-io -f raw -c 'write -P 0x6E 1M 8k' -c 'write -P 0x6F 15M 1M' "$URI" >/dev/null
qemu-io -f raw -c 'write -P 0x6E 1M 8k' -c 'write -P 0x6F 15M 1M' model.raw >/dev/null
qemu-img compare -q -f raw -F raw "$URI" model.raw || fail "the export differs from the model"
stop_serve
"$NBD_CLIENT" check-store src.raw s.cow model.raw

# --readonly, on the default socket in a temporary folder.
serve_in_background ro.out src.raw --store s.cow --readonly
case "$URI" in nbd+unix:///\?socket=*) ;; *) fail "unexpected URI: $URI" ;; esac
qemu-img compare -q -f raw -F raw "$URI" model.raw || fail "read-only: differs from the model"
if qemu-io -f raw -c 'write 0 512' "$URI" >/dev/null 2>&1; then
  fail "--readonly accepted a write"
fi
stop_serve

# --port, on 127.0.0.1 (a few tries in case a port is taken).
served=no
for port in $((20000 + $$ % 20000)) $((20001 + $$ % 20000)) $((20002 + $$ % 20000)); do
  timeout 300 "$COWDISK" serve src.raw --port "$port" >port.out 2>port.out.err &
  SERVE=$!
  server_waiters+=("$SERVE")
  for i in $(seq 1 1200); do
    [ -s port.out ] && break
    kill -0 "$SERVE" 2>/dev/null || break
    sleep 0.05
  done
  if [ -s port.out ]; then
    URI=$(head -n 1 port.out)
    [ "$URI" = "nbd://127.0.0.1:$port" ] || fail "unexpected URI: $URI"
    qemu-img compare -q -f raw -F raw "$URI" src.raw || fail "--port: differs from the source"
    stop_serve
    served=yes
    break
  fi
  wait "$SERVE" || true
done
[ "$served" = yes ] || { cat port.out.err >&2; fail "--port never served"; }

# The install layout: PREFIX/bin/cowdisk finds PREFIX/lib*/nbdkit/plugins/,
# whose plugin loads PREFIX/lib*/libcowdisk.so through its RPATH.
: "${BUILD_DIR:?the CMake build folder}"
cmake --install "$BUILD_DIR" --prefix "$work/prefix" >/dev/null
mkdir -p "$work/prefix/bin"
cp "$COWDISK" "$work/prefix/bin/cowdisk"
installed=$(find "$work/prefix" -name nbdkit-cowdisk-plugin.so)
[ -n "$installed" ] || fail "cmake --install did not install the plugin"
# grep reads all of ldd's output (with -q it would stop at the match, and
# ldd, writing on, would die of SIGPIPE and fail the pipeline).
ldd "$installed" | grep "libcowdisk.so.1 => $work/prefix" >/dev/null ||
  fail "the installed plugin does not load the installed library: $(ldd "$installed")"
(
  unset COWDISK_NBDKIT_PLUGIN
  COWDISK="$work/prefix/bin/cowdisk"
  serve_in_background installed.out src.raw --store s.cow --readonly
  qemu-img compare -q -f raw -F raw "$URI" model.raw || fail "installed: differs from the model"
  stop_serve
)

# Clear errors.
rc=0
PATH=/nonexistent "$COWDISK" serve src.raw 2>nonbdkit.err || rc=$?
[ "$rc" -eq 1 ] && grep -q "nbdkit not found" nonbdkit.err || fail "missing nbdkit: $(cat nonbdkit.err)"
rc=0
COWDISK_NBDKIT_PLUGIN="$work/none.so" "$COWDISK" serve src.raw 2>noplugin.err || rc=$?
[ "$rc" -eq 1 ] && grep -q "no such plugin file" noplugin.err || fail "missing plugin: $(cat noplugin.err)"
rc=0
timeout 60 "$COWDISK" serve "$work/nope.raw" >/dev/null 2>nosource.err || rc=$?
[ "$rc" -eq 1 ] && grep -q "No such file or directory" nosource.err &&
  grep -q "nbdkit did not start" nosource.err || fail "missing source: $(cat nosource.err)"
echo "cowdisk_serve_launches_nbdkit: ok"
