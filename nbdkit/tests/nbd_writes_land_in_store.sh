#!/usr/bin/env bash
# Writes through NBD land in the store: random writes, zeroes and trims -
# aligned, unaligned and inside single sectors, read back against a model
# as they go - then the server stops and the store, reopened with
# COW_OpenCowOverlay, holds exactly the model, sector for sector.
# Crashes: after a flush, `kill -9` the server: everything flushed is
# there. Then writes that are acknowledged but never flushed, and `kill
# -9`: every sector holds the flushed state or the unflushed write, and the
# store is consistent.
. "$(dirname "$0")/lib.sh"
cd "$work"

qemu-img create -q -f qcow2 src.qcow2 32M
qemu-io -f qcow2 -c 'write -P 0x5A 0 3M' -c 'write -P 0xA5 9M 1M' -c 'write -z 12M 1M' \
  -c 'write -P 0x3C 31M 1M' src.qcow2 >/dev/null
qemu-img convert -O raw src.qcow2 model.raw
source_sum=$(sha256sum < src.qcow2)

# Clean stop. A small granularity (64 sectors) so writes cross COW units.
start_server clean -- file="$work/src.qcow2" store="$work/s.cow" granularity=64
"$NBD_CLIENT" write "$URI" model.raw 1 600
stop_server
"$NBD_CLIENT" check-store src.qcow2 s.cow model.raw

# kill -9 right after a flush (the writer ends with one).
start_server flushed -- file="$work/src.qcow2" store="$work/s.cow"
"$NBD_CLIENT" write "$URI" model.raw 2 400
kill_server
"$NBD_CLIENT" check-store src.qcow2 s.cow model.raw

# kill -9 after acknowledged, unflushed writes (each sector written once).
start_server unflushed -- file="$work/src.qcow2" store="$work/s.cow"
cp model.raw flushed.raw
"$NBD_CLIENT" scatter "$URI" model.raw 3 200
kill_server
"$NBD_CLIENT" check-store src.qcow2 s.cow flushed.raw model.raw

[ "$(sha256sum < src.qcow2)" = "$source_sum" ] || fail "the source image was written"
echo "nbd_writes_land_in_store: ok"
