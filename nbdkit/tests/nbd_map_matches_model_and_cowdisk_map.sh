#!/usr/bin/env bash
# Extents over NBD: `nbdinfo --map` and `qemu-img map` of the served
# overlay show the same data, zeros and holes (per 4 KiB block) as
#  - an independent model: qemu-img's own map of the qcow2 source (made by
#    qemu-img/qemu-io) with the writes, discards and zeroes done through NBD
#    applied by hand, and
#  - `cowdisk map --store` of the same store.
# Then the same over a store whose edits (an insert) came from the CLI:
# the model is the source map shifted by hand; and over an anonymous
# overlay with a data run longer than one extents call covers.
. "$(dirname "$0")/lib.sh"
cd "$work"

MiB=1048576
qemu-img create -q -f qcow2 src.qcow2 64M
qemu-io -f qcow2 \
  -c 'write -P 0x11 0 1M' -c 'write -z 4M 1M' -c 'write -P 0x22 10M 64k' \
  -c 'write -P 0x33 20M 3M' -c 'write -P 0x44 40M 4k' src.qcow2 >/dev/null
qemu_map_runs src.qcow2 | blocks_of_runs > source.blocks

# Edits through NBD, each 4 KiB aligned; the model applies them by hand.
start_server rw -- file="$work/src.qcow2" store="$work/s.cow"
[ "$(qemu-img info --output=json -f raw "$URI" | jq '."virtual-size"')" -eq $((64 * MiB)) ] ||
  fail "qemu-img info over NBD: wrong virtual size"
qemu-io -f raw "$URI" \
  -c 'write -P 0x55 2M 4k' \
  -c 'write -P 0x66 21M 8k' \
  -c 'discard 20M 512k' \
  -c 'write -z -u 30M 1M' \
  -c 'write -z 50M 64k' \
  -c 'discard 4M 256k' \
  -c 'write -P 0x77 63M 1M' >/dev/null
# block ranges: [first, last] in 4 KiB blocks, and what they become
apply() { # FIRST_BYTE LENGTH CLASS
  awk -v f=$(($1 / 4096)) -v l=$((($1 + $2) / 4096 - 1)) -v c="$3" \
    '{ if ($1 >= f && $1 <= l) $2 = c; print }'
}
apply $((2 * MiB)) 4096 D < source.blocks |
  apply $((21 * MiB)) 8192 D |
  apply $((20 * MiB)) $((512 * 1024)) H |
  apply $((30 * MiB)) $MiB H |
  apply $((50 * MiB)) 65536 D |
  apply $((4 * MiB)) $((256 * 1024)) H |
  apply $((63 * MiB)) $MiB D > model.blocks
grep -q ' D$' model.blocks && grep -q ' Z$' model.blocks && grep -q ' H$' model.blocks ||
  fail "the model should hold all three classes"

nbdinfo_runs "$URI" | blocks_of_runs > nbdinfo.blocks
qemu_map_runs -f raw "$URI" | blocks_of_runs > qemu.blocks
same_blocks "nbdinfo --map (read-write server) differs from the model" model.blocks nbdinfo.blocks
same_blocks "qemu-img map over NBD (read-write server) differs from the model" model.blocks qemu.blocks
stop_server

# A read-only server and `cowdisk map --store` share the store.
start_server ro -- file="$work/src.qcow2" store="$work/s.cow" readonly=true
nbdinfo_runs "$URI" | blocks_of_runs > nbdinfo-ro.blocks
qemu_map_runs -f raw "$URI" | blocks_of_runs > qemu-ro.blocks
cowdisk_map_runs src.qcow2 --store s.cow | blocks_of_runs > cowdisk.blocks
same_blocks "cowdisk map --store differs from the model" model.blocks cowdisk.blocks
same_blocks "nbdinfo --map differs from cowdisk map --store" cowdisk.blocks nbdinfo-ro.blocks
same_blocks "qemu-img map over NBD differs from cowdisk map --store" cowdisk.blocks qemu-ro.blocks
stop_server

# Inserted space is a hole: 1 MiB inserted at 8 MiB shifts the rest up.
"$COWDISK" overlay create src.qcow2 e.cow >/dev/null
"$COWDISK" overlay edit src.qcow2 e.cow --insert 16384:2048 >/dev/null
awk -v at=2048 -v n=256 '
  $1 < at { print; next }
  $1 == at { for (i = 0; i < n; i++) print at + i, "H" }
  { print $1 + n, $2 }' source.blocks > inserted-model.blocks
start_server ins -- file="$work/src.qcow2" store="$work/e.cow" readonly=true
[ "$(qemu-img info --output=json -f raw "$URI" | jq '."virtual-size"')" -eq $((65 * MiB)) ] ||
  fail "the enlarged drive should be 65 MiB over NBD"
nbdinfo_runs "$URI" | blocks_of_runs > inserted-nbdinfo.blocks
qemu_map_runs -f raw "$URI" | blocks_of_runs > inserted-qemu.blocks
same_blocks "nbdinfo --map of an overlay with an insert differs from the model" \
  inserted-model.blocks inserted-nbdinfo.blocks
same_blocks "qemu-img map of an overlay with an insert differs from the model" \
  inserted-model.blocks inserted-qemu.blocks
stop_server
# A data run longer than one extents call describes (65,536 status queries
# of 4 KiB: 256 MiB): clients ask again from where it stopped.
qemu-img create -q -f qcow2 big.qcow2 320M
qemu-io -f qcow2 -c 'write -P 0x1 0 300M' -c 'write -P 0x2 310M 64k' big.qcow2 >/dev/null
qemu_map_runs big.qcow2 | blocks_of_runs > big-model.blocks
start_server big -- file="$work/big.qcow2" readonly=false
nbdinfo_runs "$URI" | blocks_of_runs > big-nbdinfo.blocks
qemu_map_runs -f raw "$URI" | blocks_of_runs > big-qemu.blocks
same_blocks "nbdinfo --map of a 300 MiB data run differs from qemu-img's map" \
  big-model.blocks big-nbdinfo.blocks
same_blocks "qemu-img map of a 300 MiB data run differs from qemu-img's map of the image" \
  big-model.blocks big-qemu.blocks
stop_server
echo "nbd_map_matches_model_and_cowdisk_map: ok"
