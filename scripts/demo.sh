#!/usr/bin/env bash
# The main job: boot a demo pod VM (crib's pod kernel + cradle) with a data volume and
# show its output, then the boot time crib measured (process start to cradle's init and
# to its ready line, from crib's own log). crib is an optimized build. On a host without
# VT-x/AMD-V the VM runs inside the lab (tests/lab/lab.sh) automatically.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

scripts/prepare.sh
cargo build --quiet --release -p vmm

demo=target/demo
mkdir -p "$demo"
rm -f "$demo/data.img"
truncate -s 256M "$demo/data.img"
cat > "$demo/pod.json" <<'JSON'
{
  "name": "demo",
  "volumes": [{"name": "data", "path": "/data"}],
  "processes": [
    {"name": "hello", "argv": ["/bin/sh", "-c",
      "echo; echo hello from a crib pod: $(uname -sr), $(grep -c ^processor /proc/cpuinfo) CPUs; date > /data/hello; echo volume data: $(df -h /data | tail -1); echo"]}
  ]
}
JSON

run=(target/release/crib run
  --kernel target/guest/pod-kernel/vmlinux
  --initrd target/guest/initramfs-pod.cpio
  --cpus 2 --memory 512M
  --cmdline "console=ttyS0 panic=-1 quiet"
  --pod "$demo/pod.json"
  --disk "path=$demo/data.img,id=data")

# Runs the VM with crib's log on stderr and in crib.log, then states the boot time.
boot_and_report() {
  local log=$1
  shift
  local rc=0
  "$@" 2> >(tee "$log" >&2) || rc=$?
  wait
  local init ready
  init=$(sed -n 's/.*guest boot to init: \([0-9]*\) ms.*/\1/p' "$log" | head -1)
  ready=$(sed -n 's/.*guest boot to ready: \([0-9]*\) ms.*/\1/p' "$log" | head -1)
  echo "demo: boot time measured by crib (release build): ${init:-?} ms to init, ${ready:-?} ms to cradle ready"
  return "$rc"
}

if grep -qwE 'vmx|svm' /proc/cpuinfo; then
  boot_and_report "$demo/crib.log" "${run[@]}"
  exit
fi
echo "demo: this CPU has no VT-x/AMD-V; booting inside the lab (an L1 VM with nested KVM; lab times are TCG-emulated, far slower than a real host)" >&2
exec tests/lab/lab.sh -- bash -c "$(declare -f boot_and_report); boot_and_report /tmp/crib-demo.log \"\$@\"" demo "${run[@]}"
