#!/bin/bash
# Run inside the lab: LAB_OUT=/tmp/fsab tests/lab/lab.sh -- benches/shared-ram-ab.sh (after cargo build --release -p vmm).
# Stock L1 (shmem_enabled=never): a VM with a virtio-fs share, guest RAM on crib's
# huge=always tmpfs (default) against the plain memfd (CRIB_RAM_BACKING=memfd).
cd "$(dirname "$0")/.."
CRIB=target/release/crib
K=target/guest/pod-kernel/vmlinux
INITRD=target/guest/initramfs-pod.cpio
mkdir -p ${OUT:-/tmp/fsab}/share && echo hi > ${OUT:-/tmp/fsab}/share/f
CMD="console=ttyS0 panic=-1 quiet cradle.debug -- /bin/true"
cat /sys/kernel/mm/transparent_hugepage/shmem_enabled
one() { # label, env
  local label=$1 envs=$2 out start end
  start=$(date +%s%N)
  out=$(env $envs $CRIB run --memory 512M --kernel $K --initrd $INITRD --fs tag=gfs,dir=${OUT:-/tmp/fsab}/share --cmdline "$CMD" 2>&1)
  end=$(date +%s%N)
  local up=$(echo "$out" | sed -n 's/.*init started \([0-9.]*\) ms after boot.*/\1/p' | head -1)
  local init=$(echo "$out" | sed -n 's/.*guest boot to init: \([0-9]*\) ms.*/\1/p' | head -1)
  local ram=$(echo "$out" | sed -n 's/.*guest RAM: \(.*\)$/\1/p' | head -1)
  echo "$label: uptime_at_init=${up:-?} boot_to_init=${init:-?} wall=$(( (end-start)/1000000 )) [$ram]"
}
for i in 1 2 3 4 5; do
  one "tmpfs" ""
  one "memfd" "CRIB_RAM_BACKING=memfd"
done
