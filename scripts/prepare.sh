#!/usr/bin/env bash
# Everything a boot needs, built or fetched into target/ (cached; quick when up to date):
# Debian's cloud kernel (bzImage + vmlinux + modules), cradle and its initramfs, and crib.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

scripts/install-deps.sh
apt-cache policy linux-image-cloud-amd64 2>/dev/null | grep -q Candidate: || apt-get update -qq
guest/kernel/fetch-debian-kernel.sh cloud >/dev/null
guest/build-initramfs.sh >/dev/null
cargo build --quiet -p vmm
echo "prepare: ready (crib: target/debug/crib, kernel: target/guest/debian-cloud, initramfs: target/guest/initramfs-cloud.cpio)"
