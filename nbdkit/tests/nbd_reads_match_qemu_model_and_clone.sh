#!/usr/bin/env bash
# What a client reads over NBD equals an independent model - a raw copy of
# the source made by qemu-img, with the same qemu-io commands applied to it
# as were sent through NBD - for an overlay over a VDI and over a qcow2
# backing chain (follow-parents=true). After the server stops, a
# `cowdisk overlay commit` clone of the store equals the model too, and a
# read-only server on the same store reads the same as the clone.
. "$(dirname "$0")/lib.sh"
cd "$work"

qemu-img create -q -f raw base.raw 48M
qemu-io -f raw -c 'write -P 0x41 0 5M' -c 'write -P 0x42 17M 3M' \
  -c 'write -P 0x43 30M 100k' -c 'write -P 0x44 47M 1M' base.raw >/dev/null

# The same edits go through NBD and into the model (qemu-io on a raw file).
edits=(-c 'write -P 0x61 1M 64k' -c 'write -P 0x62 4095k 8k' -c 'discard 17M 1M'
  -c 'write -z 31M 1M' -c 'write -z -u 40M 2M' -c 'write -P 0x63 47M 512'
  -c 'write -P 0x64 12345678 1000')

check_source() { # NAME SOURCE [PLUGIN ARGS]
  local name=$1 source=$2
  shift 2
  qemu-img convert -O raw "$source" "$name-model.raw"
  qemu-io -f raw "${edits[@]}" "$name-model.raw" >/dev/null

  start_server "$name" -- file="$work/$source" store="$work/$name.cow" "$@"
  qemu-io -f raw "${edits[@]}" "$URI" >/dev/null
  qemu-img compare -q -f raw -F raw "$URI" "$name-model.raw" ||
    fail "$name: the export differs from the qemu-made model"
  stop_server

  local follow=()
  [ "$*" = "follow-parents=true" ] && follow=(--follow-parents)
  "$COWDISK" overlay commit "$source" "$name.cow" "$name-clone.img" "${follow[@]}" >/dev/null
  qemu-img compare -q -f raw -F raw "$name-clone.img" "$name-model.raw" ||
    fail "$name: the committed clone differs from the model"

  start_server "$name-ro" -- file="$work/$source" store="$work/$name.cow" readonly=true "$@"
  qemu-img compare -q -f raw -F raw "$URI" "$name-clone.img" ||
    fail "$name: a read-only server differs from the clone"
  if qemu-io -f raw -c 'write 0 512' "$URI" >/dev/null 2>&1; then
    fail "$name: a read-only server accepted a write"
  fi
  stop_server
}

qemu-img convert -O vdi base.raw src.vdi
check_source vdi src.vdi

# A qcow2 chain: the top image overrides part of the base.
qemu-img convert -O qcow2 base.raw base.qcow2
qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 top.qcow2
qemu-io -f qcow2 -c 'write -P 0x71 3M 2M' -c 'write -z 18M 1M' -c 'write -P 0x72 33M 64k' \
  top.qcow2 >/dev/null
check_source chain top.qcow2 follow-parents=true
echo "nbd_reads_match_qemu_model_and_clone: ok"
