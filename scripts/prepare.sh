#!/usr/bin/env bash
# Everything a boot needs, built or fetched into target/ (cached; quick when up to date):
# crib's pod kernel (built from Debian's linux-source, a few minutes the first time),
# Debian's cloud kernel (bzImage + vmlinux + modules), cradle and its two initramfs
# images (with modules for the cloud kernel, without for the pod kernel), the marketplace
# VM image (Debian with systemd and sshd, from debootstrap), and crib.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

scripts/install-deps.sh
scripts/install-virtiofsd.sh
scripts/install-schemathesis.sh
apt-cache policy linux-image-cloud-amd64 2>/dev/null | grep -q Candidate: || apt-get update -qq
guest/kernel/fetch-debian-kernel.sh cloud >/dev/null
guest/kernel/build-pod-kernel.sh >/dev/null
guest/build-initramfs.sh cloud >/dev/null
guest/build-initramfs.sh pod >/dev/null
# The marketplace VM image (linux_marketplace_*): about 2 minutes the first time.
scripts/build-marketplace-image.sh
cargo build --quiet -p vmm
echo "prepare: ready (crib: target/debug/crib; pod kernel: target/guest/pod-kernel with target/guest/initramfs-pod.cpio; Debian kernel: target/guest/debian-cloud with target/guest/initramfs-cloud.cpio)"
