#!/usr/bin/env bash
# Fetch a Debian kernel by package name into the cache; never installs it.
#
#   guest/kernel/fetch-debian-kernel.sh cloud    # L2 guest kernel (pods)
#   guest/kernel/fetch-debian-kernel.sh generic  # L1 lab kernel
#
# Output (idempotent; a second run reuses it):
#   target/guest/debian-<flavor>/VERSION        e.g. 6.1.0-56-cloud-amd64
#   target/guest/debian-<flavor>/vmlinuz        bzImage
#   target/guest/debian-<flavor>/vmlinux        uncompressed ELF (cloud only)
#   target/guest/debian-<flavor>/config         the kernel's .config
#   target/guest/debian-<flavor>/root/lib/modules/<VERSION>/...  (depmod run)
# Prints the output directory on stdout.
set -euo pipefail

flavor=${1:-cloud}
root=$(cd "$(dirname "$0")/../.." && pwd)
cache=${CRIB_CACHE:-$root/target/guest}

case "$flavor" in
  cloud) meta=linux-image-cloud-amd64 ;;
  generic) meta=linux-image-amd64 ;;
  *) echo "usage: $0 cloud|generic" >&2; exit 2 ;;
esac

# The version moves with Debian's updates: resolve it from the meta package now.
pkg=$(apt-cache depends "$meta" 2>/dev/null | awk '/Depends: linux-image-/ {print $2; exit}')
if [ -z "$pkg" ]; then
  echo "fetch-debian-kernel: cannot resolve $meta (run 'apt-get update'?)" >&2
  exit 1
fi
ver=${pkg#linux-image-}
out=$cache/debian-$flavor
if [ -f "$out/VERSION" ] && [ "$(cat "$out/VERSION")" = "$ver" ] && [ -f "$out/vmlinuz" ]; then
  echo "$out"
  exit 0
fi

for tool in dpkg-deb depmod; do
  command -v "$tool" >/dev/null || { echo "fetch-debian-kernel: $tool is missing (apt-get install kmod dpkg)" >&2; exit 1; }
done

work=$(mktemp -d "$cache.tmp.XXXXXX" 2>/dev/null || { mkdir -p "$cache"; mktemp -d "$cache/tmp.XXXXXX"; })
trap 'rm -rf "$work"' EXIT
# The unsigned package has the same kernel without the signed-shim indirection.
(cd "$work" && apt-get download "${pkg}-unsigned" >/dev/null 2>&1 || apt-get download "$pkg" >/dev/null)
dpkg-deb -x "$work"/*.deb "$work/x"

mkdir -p "$work/out/root/lib"
mv "$work/x/lib/modules" "$work/out/root/lib/modules"
cp "$work/x/boot/vmlinuz-$ver" "$work/out/vmlinuz"
cp "$work/x/boot/config-$ver" "$work/out/config"
depmod -b "$work/out/root" "$ver"

if [ "$flavor" = cloud ]; then
  # The bzImage payload is LZ4: find the frame magic and decompress to the ELF.
  command -v lz4 >/dev/null || { echo "fetch-debian-kernel: lz4 is missing (apt-get install lz4)" >&2; exit 1; }
  off=$(grep -aboP '\x02\x21\x4c\x18' "$work/out/vmlinuz" | head -1 | cut -d: -f1)
  tail -c +"$((off + 1))" "$work/out/vmlinuz" | lz4 -dc > "$work/out/vmlinux" 2>/dev/null || true
  if ! head -c 4 "$work/out/vmlinux" | grep -q ELF; then
    echo "fetch-debian-kernel: could not extract vmlinux from $pkg" >&2
    exit 1
  fi
fi
echo "$ver" > "$work/out/VERSION"
rm -rf "$out"
mkdir -p "$(dirname "$out")"
mv "$work/out" "$out"
echo "$out"
