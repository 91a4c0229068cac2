#!/usr/bin/env bash
# The root filesystem `crib-bench pull` pushes as a ~150 MB Debian image: debootstrap
# --variant=minbase bookworm from Debian's mirror, packed as one tar (cached: does nothing
# when it exists):
#   target/bench-pull/debian-rootfs.tar
# Needs root (debootstrap); takes a few minutes the first time.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
out="$root/target/bench-pull"
tarball="$out/debian-rootfs.tar"
mirror="${CRIB_DEBIAN_MIRROR:-http://deb.debian.org/debian}"

[ -f "$tarball" ] && exit 0
if [ "$(id -u)" -ne 0 ]; then
  echo "debian-rootfs: needs root (debootstrap)" >&2
  exit 1
fi
command -v debootstrap >/dev/null || "$root/scripts/install-deps.sh"

mkdir -p "$out"
rootfs=$(mktemp -d "$out/rootfs.XXXXXX")
trap 'rm -rf "$rootfs" "$tarball.tmp"' EXIT
echo "debian-rootfs: debootstrap --variant=minbase bookworm into $rootfs" >&2
debootstrap --variant=minbase bookworm "$rootfs" "$mirror" >"$out/debootstrap.log" 2>&1 || {
  echo "debian-rootfs: debootstrap failed; the end of $out/debootstrap.log:" >&2
  tail -n 20 "$out/debootstrap.log" >&2
  exit 1
}
# What an image does not carry: apt's downloaded packages and lists.
rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
tar --numeric-owner --xattrs -C "$rootfs" -cf "$tarball.tmp" .
mv "$tarball.tmp" "$tarball"
du -h "$tarball" >&2
