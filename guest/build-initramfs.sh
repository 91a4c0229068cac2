#!/usr/bin/env bash
# Build crib's guest initramfs.
#
#   guest/build-initramfs.sh [cloud|pod]
#
# Builds cradle (static glibc, stripped) and crib-initramfs and writes
#   cloud (default): target/guest/initramfs-cloud.cpio, for Debian's cloud
#                    kernel (fetched and cached by
#                    guest/kernel/fetch-debian-kernel.sh cloud), with the
#                    default module closure of that kernel;
#   pod:             target/guest/initramfs-pod.cpio, for crib's pod kernel
#                    (guest/kernel/build-pod-kernel.sh), which has everything
#                    built in: no modules, no kernel needed to build it;
# both uncompressed newc, with /init, /dev/console, busybox from
# Debian's busybox-static, and mkfs.ext4 from Debian's e2fsprogs (with its
# shared libraries and ELF interpreter, found with ldd) so cradle can format
# blank volumes. Prints the output path on stdout.
# Idempotent: with nothing changed it only runs cargo's up-to-date checks,
# and the archive is rewritten only if its bytes differ.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
target_dir=${CARGO_TARGET_DIR:-$root/target}
cache=${CRIB_CACHE:-$target_dir/guest}
triple=x86_64-unknown-linux-gnu
busybox=/bin/busybox
mkfs_ext4=/usr/sbin/mkfs.ext4

if [ ! -x "$busybox" ]; then
  echo "build-initramfs: $busybox is missing (apt-get install busybox-static)" >&2
  exit 1
fi
if [ ! -x "$mkfs_ext4" ]; then
  echo "build-initramfs: $mkfs_ext4 is missing (apt-get install e2fsprogs)" >&2
  exit 1
fi
if ! command -v ldd >/dev/null; then
  echo "build-initramfs: ldd is missing (apt-get install libc-bin)" >&2
  exit 1
fi

flavor=${1:-cloud}
case $flavor in
  cloud) kernel_args=(--kernel "$(guest/kernel/fetch-debian-kernel.sh cloud)") ;;
  pod) kernel_args=() ;;
  *) echo "usage: $0 [cloud|pod]" >&2; exit 2 ;;
esac

# There is no musl target here: static glibc. With --target, RUSTFLAGS does
# not reach build scripts or the host-side crates. Strip the debug info the
# workspace's release profile keeps: the image is copied at every boot.
RUSTFLAGS="-C target-feature=+crt-static" \
CARGO_PROFILE_RELEASE_DEBUG=false \
CARGO_PROFILE_RELEASE_STRIP=symbols \
  cargo build --quiet -p cradle --release --target "$triple" >&2
cargo build --quiet -p initramfs --bin crib-initramfs >&2

out=$cache/initramfs-$flavor.cpio
mkdir -p "$cache"
"$target_dir/debug/crib-initramfs" \
  --cradle "$target_dir/$triple/release/cradle" \
  "${kernel_args[@]}" \
  --busybox "$busybox" \
  --mkfs "$mkfs_ext4" \
  --output "$out" >&2
echo "$out"
