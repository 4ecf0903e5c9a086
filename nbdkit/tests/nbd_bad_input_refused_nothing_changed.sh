#!/usr/bin/env bash
# Bad input: nbdkit refuses to start, with the library's message on
# stderr, does not listen, and creates or changes nothing - a missing
# source, corrupt images, a chain without follow-parents, a store over the
# wrong source, a store open read-only elsewhere, a store file the server
# may not write, readonly=true without a store, granularity= on an
# existing store, an unknown parameter.
. "$(dirname "$0")/lib.sh"
cd "$work"

# refused NAME EXPECTED_TEXT PLUGIN_ARGS...: nbdkit must exit non-zero within
# the timeout, print EXPECTED_TEXT, and not create its socket.
refused() {
  local name=$1 text=$2 rc=0
  shift 2
  timeout 60 nbdkit -f -U "$work/$name.sock" "$PLUGIN" "$@" >"$name.out" 2>&1 || rc=$?
  [ "$rc" -ne 0 ] && [ "$rc" -ne 124 ] || fail "$name: nbdkit did not refuse (status $rc)"
  grep -qF -- "$text" "$name.out" || { cat "$name.out" >&2; fail "$name: no '$text' in the message"; }
  [ ! -e "$work/$name.sock" ] || fail "$name: nbdkit listened"
}

qemu-img create -q -f qcow2 good.qcow2 16M
qemu-io -f qcow2 -c 'write -P 0x17 0 1M' good.qcow2 >/dev/null

# A missing source: the library's "cannot open", no store created.
refused missing "$work/nope.vdi: No such file or directory" file="$work/nope.vdi" store="$work/new.cow"
[ ! -e new.cow ] || fail "missing: a store was created"

# Corrupt images: a qcow2 whose cluster_bits (byte 20) is 64, a VDI whose
# header is cut short.
cp good.qcow2 bad.qcow2
printf '\000\000\000\100' | dd of=bad.qcow2 bs=1 seek=20 conv=notrunc status=none
refused corrupt-qcow2 "cluster_bits" file="$work/bad.qcow2" store="$work/new.cow"
qemu-img convert -O vdi good.qcow2 good.vdi
head -c 100 good.vdi > short.vdi
refused corrupt-vdi "short.vdi" file="$work/short.vdi" store="$work/new.cow"
[ ! -e new.cow ] || fail "corrupt: a store was created"

# A chain whose parent may not be followed.
qemu-img create -q -f qcow2 -b good.qcow2 -F qcow2 top.qcow2
refused chain "needs its parent image" file="$work/top.qcow2"

# A store over another disk of the same size.
start_server make -- file="$work/good.qcow2" store="$work/s.cow"
qemu-io -f raw -c 'write -P 0x99 0 64k' "$URI" >/dev/null
stop_server
store_sum=$(sha256sum < s.cow)
qemu-img create -q -f raw other.raw 16M
refused mismatch "source mismatch: fingerprint" file="$work/other.raw" store="$work/s.cow"
[ "$(sha256sum < s.cow)" = "$store_sum" ] || fail "mismatch: the store changed"

# A store open read-only by another server cannot be opened for writing.
start_server reader -- file="$work/good.qcow2" store="$work/s.cow" readonly=true
refused locked "overlay store $work/s.cow is open for writing elsewhere" file="$work/good.qcow2" store="$work/s.cow"
qemu-img compare -q -f raw "$URI" good.qcow2 >/dev/null 2>&1 &&
  fail "locked: the reader should see the write made through the store"
stop_server
[ "$(sha256sum < s.cow)" = "$store_sum" ] || fail "locked: the store changed"

# A store file the server may not write (read-only permissions), opened for
# writing by an unprivileged user (root could write it anyway).
chmod 0755 "$work"
chmod 0444 s.cow
as_user=()
[ "$(id -u)" -eq 0 ] && as_user=(setpriv --reuid=65534 --regid=65534 --clear-groups)
mkdir -m 0777 "$work/sockets"
rc=0
timeout 60 "${as_user[@]}" nbdkit -f -U "$work/sockets/perm.sock" "$PLUGIN" \
  file="$work/good.qcow2" store="$work/s.cow" >perm.out 2>&1 || rc=$?
[ "$rc" -ne 0 ] && [ "$rc" -ne 124 ] || fail "read-only store file: nbdkit did not refuse"
grep -qF "overlay store $work/s.cow: Permission denied" perm.out ||
  { cat perm.out >&2; fail "read-only store file: not the library's message"; }
[ ! -e "$work/sockets/perm.sock" ] || fail "read-only store file: nbdkit listened"
chmod 0644 s.cow
[ "$(sha256sum < s.cow)" = "$store_sum" ] || fail "read-only store file: the store changed"

# readonly=true never creates a store; granularity= does not apply to an
# existing one; unknown parameters are refused.
refused ro-missing "no such store" file="$work/good.qcow2" store="$work/none.cow" readonly=true
[ ! -e none.cow ] || fail "readonly=true created a store"
refused granularity "granularity" file="$work/good.qcow2" store="$work/s.cow" granularity=64
refused unknown "unknown parameter" file="$work/good.qcow2" bogus=1
[ "$(sha256sum < s.cow)" = "$store_sum" ] || fail "the store changed"
echo "nbd_bad_input_refused_nothing_changed: ok"
