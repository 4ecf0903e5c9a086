#!/usr/bin/env bash
# Installs, from Debian's packages, whatever tool the tests need that this
# machine lacks. Never skips: if a tool cannot be installed, this fails.
set -euo pipefail

declare -A package_of=(
  [cmake]=cmake
  [valgrind]=valgrind
  [pkg-config]=pkg-config
  [qemu-img]=qemu-utils
  [qemu-io]=qemu-utils
  [uml_mkcow]=uml-utilities
  [nbdkit]=nbdkit
  [nbdinfo]=libnbd-bin
  [nbdcopy]=libnbd-bin
  [jq]=jq
  [setpriv]=util-linux
  [sfdisk]=fdisk
  [sgdisk]=gdisk
  [c++]=g++
  [strace]=strace
  [mke2fs]=e2fsprogs
  [mkfs.fat]=dosfstools
  [fsck.fat]=dosfstools
  [mcopy]=mtools
  [mkswap]=util-linux
)
# Headers the C harness builds against: the nbdkit plugin and its libnbd
# test client (nbdkit/).
declare -A package_of_header=(
  [/usr/include/nbdkit-plugin.h]=nbdkit-plugin-dev
  [/usr/include/libnbd.h]=libnbd-dev
)
missing=()
for tool in "${!package_of[@]}"; do
  command -v "$tool" >/dev/null 2>&1 || missing+=("${package_of[$tool]}")
done
for header in "${!package_of_header[@]}"; do
  [ -e "$header" ] || missing+=("${package_of_header[$header]}")
done
# The thread checker (scripts/race-check.sh) rebuilds the standard library
# instrumented: it needs the nightly toolchain with rust-src.
if ! rustup +nightly component list --installed 2>/dev/null | grep '^rust-src' >/dev/null; then
  echo "installing: the nightly toolchain's rust-src (for ThreadSanitizer)"
  rustup toolchain install nightly --profile minimal --component rust-src >/dev/null
fi
if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi
mapfile -t missing < <(printf '%s\n' "${missing[@]}" | sort -u)
echo "installing: ${missing[*]}"
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq
$sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
