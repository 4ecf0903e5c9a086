#!/usr/bin/env bash
# Several clients at once (the plugin claims multi-conn and runs in nbdkit's
# parallel thread model): four connections each write, zero, trim and read
# their own byte range - neighbouring ranges meet inside sectors, so
# sub-sector writes race in the plugin's read-modify-write - and the whole
# export, and the store reopened after the server stops, equal the model.
# Then nbdcopy with four connections copies a file in and out again.
. "$(dirname "$0")/lib.sh"
cd "$work"

qemu-img create -q -f qcow2 src.qcow2 32M
qemu-io -f qcow2 -c 'write -P 0x21 0 8M' -c 'write -P 0x22 20M 4M' src.qcow2 >/dev/null
qemu-img convert -O raw src.qcow2 model.raw

start_server parallel -- file="$work/src.qcow2" store="$work/s.cow"
"$NBD_CLIENT" concurrent "$URI" model.raw 11 4 400
stop_server
"$NBD_CLIENT" check-store src.qcow2 s.cow model.raw

# nbdcopy in and out with four connections each (multi-conn).
head -c 16M /dev/urandom > random.raw
truncate -s 32M random.raw # the rest: zeros, which nbdcopy may send as zero requests
start_server copy -- file="$work/src.qcow2" store="$work/s.cow"
nbdcopy --connections=4 --requests=16 random.raw "$URI"
nbdcopy --connections=4 "$URI" copied.raw
cmp random.raw copied.raw || fail "nbdcopy out of the export differs from what was copied in"
stop_server
"$NBD_CLIENT" check-store src.qcow2 s.cow random.raw
echo "nbd_concurrent_clients_match_model: ok"
