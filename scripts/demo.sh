#!/usr/bin/env bash
# The main job on a fresh machine: build the cowdisk tool, generate sample
# disks (MBR and GPT, two partitions of recognisable data each), enlarge
# them through a copy-on-write overlay (grow a partition, slide the next
# one, rewrite the partition table), write compact clones, and show
# `cowdisk info` of the results. The sources are checked to be untouched.
# Output goes to demo-output/ (or the folder given as $1).
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-demo-output}"
cargo build --release --quiet --bin cowdisk
cowdisk() { target/release/cowdisk "$@"; }
rm -rf "$out" && mkdir -p "$out"

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "1. sample disks (64 MiB each)"
cowdisk sample "$out/sample-mbr.img" --table mbr
cowdisk sample "$out/sample-gpt.img" --table gpt
before_mbr=$(sha256sum < "$out/sample-mbr.img")
before_gpt=$(sha256sum < "$out/sample-gpt.img")
cowdisk info "$out/sample-mbr.img"

step "2. enlarge the MBR disk to 1 GiB (partition 1 grows, partition 2 slides up)"
cowdisk enlarge "$out/sample-mbr.img" "$out/enlarged-mbr.img" --size 1G --partition 1

step "3. cowdisk info of the result"
cowdisk info "$out/enlarged-mbr.img"

step "4. enlarge the GPT disk to 2 GiB into a VDI image (backup GPT moved to the new end)"
cowdisk enlarge "$out/sample-gpt.img" "$out/enlarged-gpt.vdi" --size 2G
cowdisk info "$out/enlarged-gpt.vdi"

step "5. checks"
# Partition 2 of the MBR sample starts at sector 83968; after the move it
# starts 960 MiB (1966080 sectors) later. Its first sector's text moved.
printf 'partition 2, first sector, before: '
dd if="$out/sample-mbr.img" bs=512 skip=83968 count=1 status=none | head -c 32; echo
printf 'partition 2, first sector, after:  '
dd if="$out/enlarged-mbr.img" bs=512 skip=$((83968 + 1966080)) count=1 status=none | head -c 32; echo
[ "$(sha256sum < "$out/sample-mbr.img")" = "$before_mbr" ] &&
  [ "$(sha256sum < "$out/sample-gpt.img")" = "$before_gpt" ] &&
  echo "sources unchanged (sha256)"
printf 'enlarged raw image: %s apparent, %s on disk (sparse)\n' \
  "$(du -h --apparent-size "$out/enlarged-mbr.img" | cut -f1)" "$(du -h "$out/enlarged-mbr.img" | cut -f1)"
if command -v sfdisk >/dev/null; then sfdisk --verify "$out/enlarged-mbr.img"; fi
echo "done: the images are in $out/"
