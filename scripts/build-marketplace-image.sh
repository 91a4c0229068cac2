#!/usr/bin/env bash
# Builds a marketplace-style Debian bookworm VM image (cached: does nothing when it exists):
#   target/marketplace/debian.img     2 GiB raw ext4, the root filesystem (no partition table)
#   target/marketplace/vmlinuz        the image's own kernel (linux-image-cloud-amd64)
#   target/marketplace/initrd.img     the image's own initramfs (initramfs-tools)
# debootstrap (variant minbase) with systemd as init, udev, dbus (logind needs it to act on
# the ACPI power button), openssh-server, iproute2, iperf3 (crib-bench net) and Debian's
# cloud kernel; then
# `mkfs.ext4 -d`. Test settings: root's password is "crib", root is logged in on ttyS0
# automatically, eth0 gets 10.0.1.2/24 from systemd-networkd, sshd and an iperf3 server
# are enabled.
# Boot it directly with the image's kernel and initrd (see README, "Marketplace VMs"):
#   crib run --kernel target/marketplace/vmlinuz --initrd target/marketplace/initrd.img \
#     --disk path=debian.img,id=root --cmdline "root=/dev/vda rw console=ttyS0" ...
# Needs root (debootstrap, chroot) and Debian's package mirror; takes a few minutes.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
out="$root/target/marketplace"
image="$out/debian.img"
mirror="${CRIB_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
size="${CRIB_MARKETPLACE_IMAGE_SIZE:-2G}"

# The cache key: this script (package list, settings) and the image size.
key=$( (cat "$0"; echo "$size") | sha256sum | cut -c1-16)
if [ -f "$image" ] && [ -f "$out/vmlinuz" ] && [ -f "$out/initrd.img" ] &&
  [ "$(cat "$out/KEY" 2>/dev/null)" = "$key" ]; then
  exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "build-marketplace-image: needs root (debootstrap and chroot)" >&2
  exit 1
fi
command -v debootstrap >/dev/null || "$root/scripts/install-deps.sh"

start=$SECONDS
mkdir -p "$out"
rootfs=$(mktemp -d "$out/rootfs.XXXXXX")
cleanup() {
  for m in dev/pts dev proc sys; do
    mountpoint -q "$rootfs/$m" 2>/dev/null && umount -l "$rootfs/$m"
  done
  rm -rf "$rootfs" "$image.tmp"
}
trap cleanup EXIT

echo "build-marketplace-image: debootstrap bookworm into $rootfs" >&2
debootstrap --variant=minbase \
  --include=systemd,systemd-sysv,udev,dbus,kmod,openssh-server,iproute2,iputils-ping,iperf3,linux-image-cloud-amd64 \
  bookworm "$rootfs" "$mirror" >"$out/debootstrap.log" 2>&1 || {
  echo "build-marketplace-image: debootstrap failed; the end of $out/debootstrap.log:" >&2
  tail -n 20 "$out/debootstrap.log" >&2
  exit 1
}

echo marketplace >"$rootfs/etc/hostname"
printf '127.0.0.1 localhost\n127.0.1.1 marketplace\n' >"$rootfs/etc/hosts"
printf '/dev/vda / ext4 rw,errors=remount-ro 0 1\n' >"$rootfs/etc/fstab"
echo 'root:crib' | chroot "$rootfs" chpasswd

# Root on the serial console without a password prompt (tests drive it).
mkdir -p "$rootfs/etc/systemd/system/serial-getty@ttyS0.service.d"
cat >"$rootfs/etc/systemd/system/serial-getty@ttyS0.service.d/autologin.conf" <<'EOF'
[Service]
ExecStart=
ExecStart=-/sbin/agetty --autologin root --keep-baud 115200,57600,38400,9600 %I $TERM
EOF

# Static address on the first Ethernet device, whatever udev names it.
mkdir -p "$rootfs/etc/systemd/network"
cat >"$rootfs/etc/systemd/network/10-eth0.network" <<'EOF'
[Match]
Name=eth0 en*

[Network]
Address=10.0.1.2/24
Gateway=10.0.1.1
EOF
chroot "$rootfs" systemctl enable systemd-networkd.service ssh.service >/dev/null 2>&1
# An iperf3 server on port 5201 for crib-bench net.
chroot "$rootfs" systemctl enable iperf3.service >/dev/null 2>&1 || {
  echo "build-marketplace-image: cannot enable iperf3.service" >&2
  exit 1
}

# Smaller image: no package lists or downloaded packages.
rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*

kernel=$(find "$rootfs/boot" -name 'vmlinuz-*' | sort -V | tail -n 1)
version=${kernel##*/vmlinuz-}
if [ -z "$kernel" ] || [ ! -f "$rootfs/boot/initrd.img-$version" ]; then
  echo "build-marketplace-image: no kernel and initrd in the image's /boot" >&2
  exit 1
fi
cp "$kernel" "$out/vmlinuz"
cp "$rootfs/boot/initrd.img-$version" "$out/initrd.img"
echo "$version" >"$out/VERSION"

rm -f "$image.tmp"
truncate -s "$size" "$image.tmp"
mkfs.ext4 -q -F -L root -d "$rootfs" "$image.tmp"
mv "$image.tmp" "$image"
echo "$key" >"$out/KEY"
echo "build-marketplace-image: $image ready (kernel $(cat "$out/VERSION")) in $((SECONDS - start)) s" >&2
