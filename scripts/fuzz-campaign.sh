#!/usr/bin/env bash
# The coverage-guided fuzz campaign: every libFuzzer target of fuzz/ (or the
# ones named), one after another, each for SECONDS, single process
# (-jobs=1 equivalent), under AddressSanitizer (cargo fuzz's default).
#
#   scripts/fuzz-campaign.sh SECONDS [TARGET...]
#
# Corpora live in fuzz/corpus/TARGET (seeded on first use with small images
# made by qemu-img, stores made by the cowdisk binary, and every committed
# regression input under fuzz/regressions/TARGET). Findings land in
# fuzz/artifacts/TARGET/; logs in $FUZZ_LOG_DIR (default /tmp/cowdisk-fuzz).
# A summary line per target (seconds, runs, execs/s, edges covered,
# features, corpus size, findings) ends the run and is kept in
# $FUZZ_LOG_DIR/summary.txt.
#
# A finding: reproduce it with `fuzz/target/*/release/TARGET FILE`, fix the
# bug, and commit the input under fuzz/regressions/TARGET/ so
# tests/fuzz_corpus.rs replays it in every CI run.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
secs="${1:?usage: scripts/fuzz-campaign.sh SECONDS [TARGET...]}"
shift
logs="${FUZZ_LOG_DIR:-/tmp/cowdisk-fuzz}"
mkdir -p "$logs"

command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz
(cd fuzz && cargo +nightly fuzz build)
bin="$root/fuzz/target/x86_64-unknown-linux-gnu/release"
if [ $# -eq 0 ]; then
  set -- $(cd fuzz && cargo +nightly fuzz list)
fi

# Scratch files of the targets on tmpfs when there is one.
if [ -d /dev/shm ] && [ -w /dev/shm ]; then export TMPDIR=/dev/shm; fi

seed_images() {
  local t=$1 c=$2 tmp
  tmp=$(mktemp -d)
  local w=(-c 'write -P 0x5a 1000 300000' -c 'write -P 0x5b 700000 5000')
  case $t in
    vdi) qemu-img create -q -f vdi "$tmp/a" 2M && qemu-io -f vdi "${w[@]}" "$tmp/a" >/dev/null ;;
    parallels) qemu-img create -q -f parallels "$tmp/a" 2M && qemu-io -f parallels "${w[@]}" "$tmp/a" >/dev/null ;;
    vhd|vhd_fixed)
      qemu-img create -q -f vpc "$tmp/a" 2M && qemu-io -f vpc "${w[@]}" "$tmp/a" >/dev/null
      qemu-img create -q -f vpc -o subformat=fixed "$tmp/b" 1M ;;
    vhdx|vhdx_fixed)
      qemu-img create -q -f vhdx -o block_size=1M,log_size=1M "$tmp/a" 4M
      qemu-io -f vhdx "${w[@]}" "$tmp/a" >/dev/null ;;
    qcow2)
      qemu-img create -q -f qcow2 -o cluster_size=4096 "$tmp/a" 2M
      qemu-io -f qcow2 "${w[@]}" "$tmp/a" >/dev/null ;;
    vmdk_sparse)
      qemu-img create -q -f vmdk "$tmp/a" 2M && qemu-io -f vmdk "${w[@]}" "$tmp/a" >/dev/null
      qemu-img create -q -f vmdk -o subformat=streamOptimized "$tmp/b" 2M ;;
    vmdk_descriptor)
      (cd "$tmp" && qemu-img create -q -f vmdk -o subformat=monolithicFlat extent.vmdk 1M \
        && rm extent-flat.vmdk && mv extent.vmdk a) ;;
    umlcow)
      if command -v uml_mkcow >/dev/null; then
        head -c 65536 /dev/zero >"$tmp/base" && (cd "$tmp" && uml_mkcow a base >/dev/null) && rm -f "$tmp/base"
      fi ;;
    store_fixed) seed_stores "$tmp" ;;
    fs) seed_filesystems "$tmp" ;;
  esac
  find "$tmp" -type f -size -12M -exec cp {} "$c/" \; 2>/dev/null || true
  rm -rf "$tmp"
}

# Disks with a partition table and real filesystems (FAT16, ext4, NTFS,
# swap; and GPT with FAT32 and ext2), in the sparse encoding of the fs
# target.
seed_filesystems() {
  local tmp=$1 part
  python3 - "$tmp" <<'PY'
import subprocess, sys, os
tmp = sys.argv[1]
def encode(b):
    out = bytearray()
    for i in range(0, len(b), 4096):
        page = b[i:i + 4096]
        if any(page) or i + 4096 >= len(b):
            out += (i // 4096).to_bytes(4, 'little') + page.ljust(4096, b'\0')
    return bytes(out)
def disk(name, label, parts):
    img = os.path.join(tmp, name + '.img')
    end = max(s + n for s, n, _, _ in parts) + 2048
    with open(img, 'wb') as f: f.truncate(end * 512)
    table = 'label: %s\n' % label + ''.join('start=%d, size=%d, type=%s\n' % (s, n, t) for s, n, t, _ in parts)
    subprocess.run(['sfdisk', '-q', img], input=table.encode(), check=True)
    data = bytearray(open(img, 'rb').read())
    for s, n, _, mkfs in parts:
        p = img + '.part'
        with open(p, 'wb') as f: f.truncate(n * 512)
        subprocess.run(mkfs + [p], check=True, stdout=subprocess.DEVNULL)
        data[s * 512:(s + n) * 512] = open(p, 'rb').read()
        os.remove(p)
    os.remove(img)
    open(os.path.join(tmp, name), 'wb').write(encode(bytes(data)))
disk('mbr', 'dos', [(2048, 14336, 'c', ['mkfs.fat', '-F', '16', '-s', '1']),
                    (16384, 16384, '83', ['mke2fs', '-q', '-t', 'ext4', '-F']),
                    (32768, 24576, '7', ['mkntfs', '-q', '-F', '-f', '-s', '512']),
                    (57344, 4096, '82', ['mkswap'])])
disk('gpt', 'gpt', [(2048, 69632, 'U', ['mkfs.fat', '-F', '32', '-s', '1']),
                    (71680, 8192, 'L', ['mke2fs', '-q', '-t', 'ext2', '-F'])])
PY
}

# Stores made by the real binary, in the sparse encoding of the store_fixed
# target; one with its last transactions made replayable again (its header
# pointed back at the entries the close left in the log).
seed_stores() {
  local tmp=$1
  cargo build --release -q --bin cowdisk
  local cli="$root/target/release/cowdisk"
  head -c 1048576 /dev/urandom >"$tmp/src.raw"
  head -c 4096 /dev/urandom >"$tmp/w.bin"
  "$cli" overlay create "$tmp/src.raw" "$tmp/s.cow" --granularity 8 >/dev/null
  "$cli" overlay edit "$tmp/src.raw" "$tmp/s.cow" --write 8:"$tmp/w.bin" --insert 100:50 \
    --move 10:400:30 --discard 600:9 --delete 900:20 >/dev/null
  "$cli" overlay edit "$tmp/src.raw" "$tmp/s.cow" --write 300:"$tmp/w.bin" --insert 0:3 >/dev/null
  python3 - "$tmp/s.cow" "$tmp" <<'PY'
import struct, sys
data = bytearray(open(sys.argv[1], 'rb').read())
def encode(b):
    out = bytearray()
    n = (len(b) + 4095) // 4096
    for i in range(n):
        page = bytes(b[i*4096:(i+1)*4096]).ljust(4096, b'\0')
        if any(page) or i == n - 1:
            out += struct.pack('<I', i) + page
    return out
open(sys.argv[2] + '/store-closed', 'wb').write(encode(data))
# Entries left in the log (1 MiB .. 17 MiB): replay the newest GUID's.
entries = []
for off in range(1 << 20, 17 << 20, 4096):
    if data[off:off+4] == b'CDLG':
        seq, = struct.unpack_from('<Q', data, off + 8)
        entries.append((seq, off, bytes(data[off+16:off+32])))
if entries:
    last = max(entries)
    group = sorted(e for e in entries if e[2] == last[2])
    seq, off, guid = group[0]
    slots = [4096, 8192]
    cur = max(slots, key=lambda s: struct.unpack_from('<Q', data, s + 16)[0])
    data[cur+16+24:cur+16+40] = guid
    struct.pack_into('<QQ', data, cur + 16 + 56, off - (1 << 20), seq)
    open(sys.argv[2] + '/store-replay', 'wb').write(encode(data))
PY
  rm -f "$tmp/src.raw" "$tmp/w.bin" "$tmp/s.cow"
}

summary="$logs/summary.txt"
for t in "$@"; do
  corpus="fuzz/corpus/$t"
  mkdir -p "$corpus" "fuzz/artifacts/$t"
  if [ -z "$(ls -A "$corpus")" ]; then
    seed_images "$t" "$corpus"
    if [ -d "fuzz/regressions/$t" ]; then cp fuzz/regressions/$t/* "$corpus/" 2>/dev/null || true; fi
  fi
  extra=()
  case $t in
    capi) extra=(-max_len=2048) ;;
    store|store_fixed) extra=(-max_len=262144) ;;
    # The seed disks' metadata pages, encoded, are about 1-2 MiB.
    fs) extra=(-max_len=4194304) ;;
    # A qemu-made VHDX is 9 MiB (1 MiB-aligned regions): let the fuzzer
    # keep whole images (libFuzzer's default cap is 1 MiB).
    vhdx|vhdx_fixed) extra=(-max_len=12582912) ;;
  esac
  before=$(ls "fuzz/artifacts/$t" | wc -l)
  echo "== $t: ${secs}s"
  set +e
  "$bin/$t" "$corpus" -max_total_time="$secs" -timeout=20 -rss_limit_mb=2560 \
    -print_final_stats=1 -artifact_prefix="fuzz/artifacts/$t/" "${extra[@]}" \
    >"$logs/$t.log" 2>&1
  rc=$?
  set -e
  after=$(ls "fuzz/artifacts/$t" | wc -l)
  last=$(grep -E '^#[0-9]+' "$logs/$t.log" | tail -1)
  runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$logs/$t.log")
  eps=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$logs/$t.log")
  cov=$(sed -n 's/.* cov: \([0-9]*\).*/\1/p' <<<"$last")
  ft=$(sed -n 's/.* ft: \([0-9]*\).*/\1/p' <<<"$last")
  corp=$(sed -n 's/.* corp: \([0-9]*\).*/\1/p' <<<"$last")
  line="$t secs=$secs exit=$rc runs=${runs:-?} exec/s=${eps:-?} cov=${cov:-?} ft=${ft:-?} corpus=${corp:-?} findings=$((after - before))"
  echo "$line" | tee -a "$summary"
done
