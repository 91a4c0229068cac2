#!/usr/bin/env bash
# Build crib's guest initramfs for the Debian cloud kernel.
#
#   guest/build-initramfs.sh
#
# Builds cradle (static glibc, stripped) and crib-initramfs, fetches the
# kernel (guest/kernel/fetch-debian-kernel.sh cloud, cached), and writes
#   target/guest/initramfs-cloud.cpio   (uncompressed newc)
# with /init, /dev/console, the default module closure, busybox from
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

kernel_dir=$(guest/kernel/fetch-debian-kernel.sh cloud)

# There is no musl target here: static glibc. With --target, RUSTFLAGS does
# not reach build scripts or the host-side crates. Strip the debug info the
# workspace's release profile keeps: the image is copied at every boot.
RUSTFLAGS="-C target-feature=+crt-static" \
CARGO_PROFILE_RELEASE_DEBUG=false \
CARGO_PROFILE_RELEASE_STRIP=symbols \
  cargo build --quiet -p cradle --release --target "$triple" >&2
cargo build --quiet -p initramfs --bin crib-initramfs >&2

out=$cache/initramfs-cloud.cpio
mkdir -p "$cache"
"$target_dir/debug/crib-initramfs" \
  --cradle "$target_dir/$triple/release/cradle" \
  --kernel "$kernel_dir" \
  --busybox "$busybox" \
  --mkfs "$mkfs_ext4" \
  --output "$out" >&2
echo "$out"
