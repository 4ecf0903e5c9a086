#!/usr/bin/env bash
# The plugin inside nbdkit under valgrind memcheck: nbdkit itself runs under
# valgrind (`valgrind nbdkit -f ...`), serves writes, zeroes, trims, reads
# from several connections at once and extents, then stops; valgrind must
# report no error and no definite leak (--error-exitcode). nbdkit.supp
# suppresses one leak of nbdkit's own, nothing of the plugin's.
. "$(dirname "$0")/lib.sh"
cd "$work"
valgrind=${VALGRIND:-valgrind}

qemu-img create -q -f qcow2 src.qcow2 8M
qemu-io -f qcow2 -c 'write -P 0x31 0 2M' -c 'write -z 3M 1M' src.qcow2 >/dev/null
qemu-img convert -O raw src.qcow2 model.raw

start_server memcheck "$valgrind" --error-exitcode=99 --leak-check=full \
  --suppressions="$tests_dir/nbdkit.supp" \
  --errors-for-leak-kinds=definite --show-possibly-lost=no --track-origins=yes --quiet \
  --trace-children=no -- file="$work/src.qcow2" store="$work/s.cow" granularity=64
"$NBD_CLIENT" write "$URI" model.raw 5 150
"$NBD_CLIENT" concurrent "$URI" model.raw 6 3 60
nbdinfo --map "$URI" >/dev/null
qemu-img compare -q -f raw -F raw "$URI" model.raw || fail "the export differs from the model"
stop_server # valgrind's status: 99 on an error
grep -q "==[0-9]*== [A-Z]" "$work/memcheck.log" &&
  { cat "$work/memcheck.log" >&2; fail "valgrind reported something"; }
"$NBD_CLIENT" check-store src.qcow2 s.cow model.raw
echo "nbd_plugin_memcheck: ok"
