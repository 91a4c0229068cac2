#!/usr/bin/env bash
# The main job: boot a demo pod VM (crib's pod kernel + cradle) with a data volume and
# show its output. On a host without VT-x/AMD-V the VM runs inside the lab
# (tests/lab/lab.sh) automatically.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

scripts/prepare.sh

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

run=(target/debug/crib run
  --kernel target/guest/pod-kernel/vmlinux
  --initrd target/guest/initramfs-pod.cpio
  --cpus 2 --memory 512M
  --cmdline "console=ttyS0 panic=-1 quiet"
  --pod "$demo/pod.json"
  --disk "path=$demo/data.img,id=data")

if grep -qwE 'vmx|svm' /proc/cpuinfo; then
  exec "${run[@]}"
fi
echo "demo: this CPU has no VT-x/AMD-V; booting inside the lab (an L1 VM with nested KVM)" >&2
exec tests/lab/lab.sh -- "${run[@]}"
