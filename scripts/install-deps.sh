#!/usr/bin/env bash
# Installs the Debian packages crib's scripts, tests and lab need; does nothing when they
# are all present. Needs root (or sudo) only when something is missing.
set -euo pipefail

packages=(
  qemu-system-x86   # the lab's L1 VM (TCG) and the QEMU baseline in benchmarks
  busybox-static    # the lab's L1 userland and the test initramfs' shell
  cpio kmod lz4     # initramfs packing, module dependencies, vmlinux extraction
  e2fsprogs         # mkfs.ext4 for cradle's blank volumes; debugfs in the tests
  fio               # run in the guest by the e2e tests (chrooted from a disk image)
  make gcc flex bison bc libelf-dev  # guest/kernel/build-pod-kernel.sh
  debootstrap       # scripts/build-marketplace-image.sh (the marketplace VM image)
  acpica-tools      # iasl: a unit test disassembles crib's DSDT
  iperf3            # crib-bench net: TCP throughput host <-> marketplace guest
  iproute2 nftables # pod networking (podnet/): bridge, taps, NAT and published ports
  dnsmasq-base      # crib run --net pod: the bridge's DHCP server; the pod-network e2e test's DNS server
  wrk               # docs/BENCHMARKS.md: HTTP req/s against a pod
  socat             # vsock peer in the guest for the vsock e2e tests (chrooted)
  nvme-cli          # the VFIO test gives an SR-IOV VF of the lab's NVMe its resources
  dmsetup           # linux_fault_*: a device-mapper volume whose middle fails with EIO
  libseccomp-dev libcap-ng-dev  # to build virtiofsd (scripts/install-virtiofsd.sh)
  erofs-utils       # mkfs.erofs: crib's image store converts each layer to an erofs image
  skopeo            # the image store's tests make docker-save archives from OCI layouts
  docker-registry   # images' pull tests and crib-bench pull: a loopback registry
  containerd        # linux_shim_*: containerd (and ctr) drive containerd-shim-crib-v2
  runc              # benches/shim.sh: io.containerd.runc.v2, the baseline of the shim bench
  bsdutils          # script(1): linux_shim_* gives `ctr task exec -t` a terminal
  protobuf-compiler # protoc: k8s-cri's build.rs (the CRI client of linux_shim_cri_*, a dev-dependency of crib-tests)
  containernetworking-plugins  # /usr/lib/cni: bridge, host-local, loopback for linux_shim_cri_*'s CNI network
  ca-certificates
)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done
# The docker CLI drives pods in the e2e tests (vdocker). These machines ship the client
# (no engine); elsewhere Debian's docker.io provides it.
command -v docker >/dev/null || missing+=(docker.io)
# crib-bench pull measures `docker pull` against crib's: the engine, dockerd.
command -v dockerd >/dev/null || missing+=(docker.io)
[ ${#missing[@]} -eq 0 ] && exit 0

sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
echo "install-deps: installing ${missing[*]}" >&2
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
