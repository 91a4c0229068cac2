#!/usr/bin/env bash
# Build crib's minimal pod kernel from Debian's kernel source package.
#
#   guest/kernel/build-pod-kernel.sh
#
# Downloads `linux-source-6.1` by package name (the version is whatever
# Debian ships now), applies guest/kernel/pod.config to `make tinyconfig`,
# checks that every option the fragment asks for is in the final config, and
# builds. The source tarball stays in target/guest/pod-kernel-src (a changed
# fragment skips the download); the extracted tree (about 1.5 GB with objects)
# is removed after the build unless CRIB_KEEP_KERNEL_TREE=1. Output (cached: a second run with the
# same source version and fragment returns at once):
#   target/guest/pod-kernel/vmlinux   uncompressed ELF (what crib loads fastest)
#   target/guest/pod-kernel/bzImage   the same kernel, compressed
#   target/guest/pod-kernel/config    the final .config
#   target/guest/pod-kernel/VERSION   source package version + fragment hash
# Prints the output directory on stdout; build output goes to stderr.
# Needs: gcc make flex bison bc libelf-dev (scripts/install-deps.sh).
set -euo pipefail

root=$(cd "$(dirname "$0")/../.." && pwd)
cache=${CRIB_CACHE:-$root/target/guest}
fragment=$root/guest/kernel/pod.config
series=${CRIB_POD_KERNEL_SERIES:-6.1}
pkg=linux-source-$series
out=$cache/pod-kernel

die() { echo "build-pod-kernel: $*" >&2; exit 1; }

for tool in apt-cache apt-get dpkg-deb make gcc flex bison bc; do
  command -v "$tool" >/dev/null || die "$tool is missing (run scripts/install-deps.sh)"
done
[ -e /usr/include/libelf.h ] || die "libelf-dev is missing (run scripts/install-deps.sh)"

srcver=$(apt-cache policy "$pkg" 2>/dev/null | awk '/Candidate:/ {print $2; exit}')
{ [ -n "$srcver" ] && [ "$srcver" != "(none)" ]; } ||
  die "apt knows no $pkg (run 'apt-get update', or set CRIB_POD_KERNEL_SERIES)"
stamp="$pkg $srcver fragment $(sha256sum "$fragment" | cut -c1-16)"
if [ -f "$out/VERSION" ] && [ "$(cat "$out/VERSION")" = "$stamp" ] && [ -f "$out/vmlinux" ]; then
  echo "$out"
  exit 0
fi

# The source tarball is kept per source version (one download); the tree is extracted for a
# build and removed after it (about 1.5 GB with objects), unless CRIB_KEEP_KERNEL_TREE=1 keeps
# it for kernel work (a changed fragment then skips the extraction, not the compile).
mkdir -p "$cache"
tarball_dir=$cache/pod-kernel-src/$srcver
src=$tarball_dir/tree
if [ ! -f "$src/Makefile" ]; then
  tarball=
  if [ -d "$tarball_dir" ]; then
    tarball=$(find "$tarball_dir" -maxdepth 1 -name "linux-source-*.tar.*" | head -1)
  fi
  if [ -z "$tarball" ]; then
    work=$cache/pod-kernel-src/download
    rm -rf "$cache/pod-kernel-src"
    mkdir -p "$work" "$tarball_dir"
    echo "build-pod-kernel: fetching $pkg $srcver" >&2
    (cd "$work" && apt-get download "$pkg=$srcver" >/dev/null)
    dpkg-deb -x "$work"/*.deb "$work/deb"
    found=$(find "$work/deb/usr/src" -maxdepth 1 -name "linux-source-*.tar.*" | head -1)
    [ -n "$found" ] || die "$pkg has no source tarball under /usr/src"
    mv "$found" "$tarball_dir/"
    rm -rf "$work"
    tarball=$(find "$tarball_dir" -maxdepth 1 -name "linux-source-*.tar.*" | head -1)
  fi
  extract=$tarball_dir/extract
  rm -rf "$extract" "$src"
  mkdir -p "$extract"
  tar -xf "$tarball" -C "$extract"
  tree=$(find "$extract" -mindepth 1 -maxdepth 1 -type d -name "linux-source-*" | head -1)
  [ -n "$tree" ] || die "$tarball holds no linux-source-* directory"
  mv "$tree" "$src"
  rm -rf "$extract"
fi

jobs=$(nproc)
kmake() { make -C "$src" ARCH=x86_64 -j"$jobs" "$@"; }
echo "build-pod-kernel: configuring (tinyconfig + $(basename "$fragment"))" >&2
kmake tinyconfig >&2
"$src/scripts/kconfig/merge_config.sh" -m -O "$src" "$src/.config" "$fragment" >&2
kmake olddefconfig >&2

# merge_config only warns when a value does not stick: fail instead, naming it.
missing=()
while IFS= read -r line; do
  case $line in
    CONFIG_*=*) grep -qxF "$line" "$src/.config" || missing+=("$line") ;;
    "# CONFIG_"*" is not set")
      opt=${line#"# "} opt=${opt%" is not set"}
      ! grep -q "^$opt=[ym]" "$src/.config" || missing+=("$line")
      ;;
  esac
done <"$fragment"
((${#missing[@]} == 0)) ||
  die "options of $(basename "$fragment") that the final config does not match (a dependency is missing, or something selects an excluded option): ${missing[*]}"

echo "build-pod-kernel: building vmlinux and bzImage with $jobs jobs" >&2
start=$SECONDS
kmake vmlinux bzImage >&2
echo "build-pod-kernel: built in $((SECONDS - start)) s" >&2

rm -rf "$out"
mkdir -p "$out"
cp "$src/vmlinux" "$out/vmlinux"
cp "$src/arch/x86/boot/bzImage" "$out/bzImage"
cp "$src/.config" "$out/config"
echo "$stamp" >"$out/VERSION"
[ "${CRIB_KEEP_KERNEL_TREE:-0}" = 1 ] || rm -rf "$src"
echo "$out"
