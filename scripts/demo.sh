#!/usr/bin/env bash
# The main job: a pod running a container image, on the pod network.
#
#  1. Builds what it shows, and nothing else: crib (release), crib's pod kernel, cradle's
#     initramfs, and a busybox image made from Debian's busybox-static (no network).
#  2. Starts Debian's docker-registry on loopback, pushes the image with skopeo, and pulls
#     it with `crib image pull` (verified, converted once to an erofs layer).
#  3. `crib pod run`s a pod whose process runs that image (busybox httpd) with port 8080
#     published, fetches its page through the published port, lists it with the plain
#     `docker` CLI on the pod's Docker socket, stops it, and states the boot time crib
#     measured.
# On a host without VT-x/AMD-V step 3 runs inside the lab (tests/lab/lab.sh) by itself.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

if [ "$(id -u)" -ne 0 ]; then
  echo "demo: run as root (the pod network creates a bridge, a tap and nftables rules)" >&2
  exit 1
fi
scripts/install-deps.sh
apt-cache policy linux-source-6.1 2>/dev/null | grep -q Candidate: || apt-get update -qq
echo "demo: building crib's pod kernel (the first time: a few minutes), cradle's initramfs and crib" >&2
guest/kernel/build-pod-kernel.sh >/dev/null 2>"$root/target/pod-kernel-build.log" ||
  { tail -30 "$root/target/pod-kernel-build.log" >&2; exit 1; }
guest/build-initramfs.sh pod >/dev/null
cargo build --quiet --release -p vmm --bin crib
cargo build --quiet --release -p images --example busybox_layout --features fixtures
crib=$root/target/release/crib

demo=$root/target/demo
rm -rf "$demo"
mkdir -p "$demo"

# 2. A loopback registry with the image in it, then crib's pull.
port=5055
cat > "$demo/registry.yml" <<YML
version: 0.1
storage:
  filesystem:
    rootdirectory: $demo/registry
http:
  addr: 127.0.0.1:$port
YML
docker-registry serve "$demo/registry.yml" >"$demo/registry.log" 2>&1 &
registry=$!
trap 'kill $registry 2>/dev/null || true' EXIT
for _ in $(seq 50); do
  curl -fs "http://127.0.0.1:$port/v2/" >/dev/null 2>&1 && break
  sleep 0.1
done
target/release/examples/busybox_layout "$demo/layout" >/dev/null
image=127.0.0.1:$port/demo/busybox:latest
skopeo copy --quiet --dest-tls-verify=false "oci:$demo/layout:latest" "docker://$image"
echo "demo: pushed $image to a loopback docker-registry; pulling it with crib:"
"$crib" image pull --state-dir "$demo/store" "$image"
"$crib" image ls --state-dir "$demo/store"

# 3. The pod: the image's busybox serves a page on port 80, published as 8080.
cat > "$demo/pod.json" <<JSON
{
  "pod": {
    "name": "demo",
    "processes": [
      {"name": "web", "image": "$image", "entrypoint": ["/bin/sh", "-c"],
       "argv": ["mkdir -p /www && echo \"hello from \$(cat /etc/hostname), an image in a crib pod, kernel \$(uname -r)\" > /www/index.html && exec busybox httpd -f -p 80 -h /www"]}
    ]
  },
  "network": {"ports": ["8080:80/tcp"]},
  "image_store": "$demo/store",
  "pull": "never",
  "run_dir": "$demo/run",
  "cpus": 2,
  "memory": "512M"
}
JSON

# Runs the pod in the background, shows it from the outside, stops it.
show_pod() {
  local crib=$1 demo=$2
  "$crib" pod run "$demo/pod.json" >"$demo/pod.out" 2>"$demo/crib.log" &
  local pod=$!
  local page=""
  for _ in $(seq 600); do
    page=$(curl -fs --max-time 2 http://127.0.0.1:8080/ 2>/dev/null) && break
    kill -0 "$pod" 2>/dev/null || break
    sleep 0.5
  done
  cat "$demo/pod.out"
  if [ -n "$page" ]; then
    echo "demo: GET http://127.0.0.1:8080/ (the published port) -> $page"
    docker -H "unix://$demo/run/docker.sock" ps || true
  else
    echo "demo: the pod did not answer on port 8080; crib's log and the pod's console:" >&2
    tail -20 "$demo/crib.log" >&2
    tail -30 "$demo/run/console.log" >&2
  fi
  "$crib" pod stop "$demo/run" || true
  wait "$pod" || true
  local init ready
  init=$(sed -n 's/.*guest boot to init: \([0-9]*\) ms.*/\1/p' "$demo/crib.log" | head -1)
  ready=$(sed -n 's/.*guest boot to ready: \([0-9]*\) ms.*/\1/p' "$demo/crib.log" | head -1)
  echo "demo: boot time measured by crib (release build): ${init:-?} ms to init, ${ready:-?} ms to cradle ready"
  [ -n "$page" ]
}

if grep -qwE 'vmx|svm' /proc/cpuinfo; then
  show_pod "$crib" "$demo"
  exit
fi
echo "demo: this CPU has no VT-x/AMD-V; running the pod inside the lab (an L1 VM with nested KVM; lab times are TCG-emulated, far slower than a real host)" >&2
tests/lab/lab.sh -- bash -c "$(declare -f show_pod); show_pod \"\$@\"" demo "$crib" "$demo"
