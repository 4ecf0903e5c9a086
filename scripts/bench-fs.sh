#!/usr/bin/env bash
# The filesystem-aware clone benchmark (issue 15): a disk of SIZE MiB
# (default 4096) with an ext4, an NTFS and a FAT32 partition of a third
# each, each filled half full with files of random data and then half of
# those deleted (debugfs rm, ntfstruncate, mdel; the deleted bytes stay on
# disk). Prints time and allocated size of `qemu-img convert -O raw`,
# `cowdisk clone` and `cowdisk clone --compact` side by side.
# Usage: scripts/bench-fs.sh [SIZE_MIB] [DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
size_mib="${1:-4096}"
work="${2:-$(mktemp -d)}"
mkdir -p "$work"
cowdisk="$PWD/target/release/cowdisk"
cargo build --release --quiet --bin cowdisk
export MTOOLS_SKIP_CHECK=1

part_mib=$(( (size_mib - 2) / 3 ))
file_mib=16
files_per_fs=$(( part_mib / 2 / file_mib ))
echo "disk ${size_mib} MiB, three partitions of ${part_mib} MiB, ${files_per_fs} files of ${file_mib} MiB each, half deleted"

head -c $((file_mib << 20)) /dev/urandom > "$work/seed.bin"
mkdir -p "$work/files"
for i in $(seq 1 "$files_per_fs"); do
  # Distinct contents without generating more random data: the seed with
  # the file number in front.
  { printf '%08d' "$i"; cat "$work/seed.bin"; } | head -c $((file_mib << 20)) > "$work/files/f$i.bin"
done

# ext4
mke2fs -q -F -t ext4 -d "$work/files" "$work/ext4.img" "${part_mib}M"
for i in $(seq 1 2 "$files_per_fs"); do echo "rm f$i.bin"; done > "$work/rm.cmds"
debugfs -w -f "$work/rm.cmds" "$work/ext4.img" >/dev/null 2>&1
# NTFS
truncate -s "${part_mib}M" "$work/ntfs.img"
mkntfs -q -F -f "$work/ntfs.img" 2>/dev/null
for i in $(seq 1 "$files_per_fs"); do ntfscp -q "$work/ntfs.img" "$work/files/f$i.bin" "f$i.bin"; done
ntfsls -i "$work/ntfs.img" | while read -r inode name; do
  n="${name#f}"; n="${n%.bin}"
  if [ $((n % 2)) -eq 1 ]; then ntfstruncate "$work/ntfs.img" "$inode" 0x80 0 >/dev/null 2>&1; fi
done
# FAT32
rm -f "$work/fat.img"
mkfs.fat -F 32 -C "$work/fat.img" $((part_mib * 1024)) >/dev/null
mcopy -i "$work/fat.img" "$work"/files/*.bin ::/
for i in $(seq 1 2 "$files_per_fs"); do mdel -i "$work/fat.img" "::/F$i.BIN" 2>/dev/null || mdel -i "$work/fat.img" "::/f$i.bin"; done

disk="$work/disk.raw"
rm -f "$disk"
truncate -s "${size_mib}M" "$disk"
p=$((part_mib * 2048))
printf 'label: dos\nstart=2048, size=%d, type=83\nstart=%d, size=%d, type=7\nstart=%d, size=%d, type=c\n' \
  "$p" $((2048 + p)) "$p" $((2048 + 2 * p)) "$p" | sfdisk -q "$disk"
dd if="$work/ext4.img" of="$disk" bs=1M seek=1 conv=notrunc,sparse status=none
dd if="$work/ntfs.img" of="$disk" bs=512 seek=$((2048 + p)) conv=notrunc,sparse status=none
dd if="$work/fat.img" of="$disk" bs=512 seek=$((2048 + 2 * p)) conv=notrunc,sparse status=none
rm -f "$work/ext4.img" "$work/ntfs.img" "$work/fat.img" "$work/files"/*.bin

measure() {
  local name="$1" out="$2"; shift 2
  rm -f "$out"
  local start end
  start=$(date +%s.%N)
  "$@" >/dev/null
  end=$(date +%s.%N)
  printf '%-32s %8.2f s %10d MiB allocated\n' "$name" "$(echo "$end - $start" | bc)" \
    $(( $(du -B1 "$out" | cut -f1) >> 20 ))
}
echo "source: $(( $(du -B1 "$disk" | cut -f1) >> 20 )) MiB allocated"
"$cowdisk" info "$disk" | sed -n '/^filesystems/,$p'
measure "qemu-img convert -O raw" "$work/qemu.raw" qemu-img convert -O raw "$disk" "$work/qemu.raw"
measure "cowdisk clone" "$work/plain.raw" "$cowdisk" clone --no-verify "$disk" "$work/plain.raw"
measure "cowdisk clone --compact" "$work/compact.raw" "$cowdisk" clone --compact --no-verify "$disk" "$work/compact.raw"
rm -f "$work/qemu.raw" "$work/plain.raw" "$work/compact.raw"
