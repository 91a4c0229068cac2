#!/usr/bin/env bash
# containerd with crib's shim against runc (docs/BENCHMARKS.md, "containerd: ctr run with
# crib's shim against runc"), in the lab's L1:
#   cargo build -p vmm -p crib-shim --bins
#   flock /tmp/lab.lock tests/lab/lab.sh -- benches/shim.sh
# A containerd of its own (temp root, state and socket; the shim's directory on PATH),
# a busybox image built here from Debian's busybox-static and `ctr image import`ed, then
# `ctr run --rm` of `echo READY` with io.containerd.crib.v2 and io.containerd.runc.v2
# (Debian's runc), interleaved, RUNS times each (default 7; the first of each dropped as
# warm-up): the time from starting ctr to the line READY on its stdout, and to ctr's
# exit (the task deleted, crib's VM shut down). Prints medians (min-max) and the ratio.
set -uo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
bin_dir=${CRIB_SHIM_DIR:-$repo/target/debug}
runs=${RUNS:-7}
work=$(mktemp -d /tmp/shim-bench.XXXXXX)
image=docker.io/library/crib-bench-busybox:1
for tool in containerd ctr runc busybox sha256sum; do
  command -v "$tool" >/dev/null || { echo "shim bench: $tool is missing (scripts/install-deps.sh)"; exit 1; }
done
for f in crib containerd-shim-crib-v2; do
  [ -x "$bin_dir/$f" ] || { echo "shim bench: $bin_dir/$f is missing (cargo build -p vmm -p crib-shim --bins)"; exit 1; }
done

cleanup() {
  [ -n "${containerd_pid:-}" ] && kill "$containerd_pid" 2>/dev/null && wait "$containerd_pid" 2>/dev/null
  grep -o " $work[^ ]*" /proc/self/mountinfo | sort -r | while read -r m; do umount -l "$m" 2>/dev/null; done
  rm -rf "$work"
}
trap cleanup EXIT
# Process substitution needs /dev/fd, which the lab's devtmpfs lacks.
[ -e /dev/fd ] || ln -s /proc/self/fd /dev/fd

# The image: busybox-static and its applets, as an OCI archive.
blob() { # file -> digest (the file moved into the layout's blobs)
  local d
  d=$(sha256sum "$1" | cut -d' ' -f1)
  mv "$1" "$work/layout/blobs/sha256/$d"
  echo "sha256:$d"
}
mkdir -p "$work/rootfs/bin" "$work/rootfs/etc" "$work/rootfs/tmp" "$work/layout/blobs/sha256"
cp /bin/busybox "$work/rootfs/bin/busybox"
for applet in $(/bin/busybox --list); do
  [ "$applet" = busybox ] || ln -s busybox "$work/rootfs/bin/$applet"
done
echo 'root:x:0:0:root:/root:/bin/sh' > "$work/rootfs/etc/passwd"
echo 'root:x:0:' > "$work/rootfs/etc/group"
chmod 1777 "$work/rootfs/tmp"
tar -C "$work/rootfs" -cf "$work/layer.tar" .
layer_size=$(stat -c %s "$work/layer.tar")
layer=$(blob "$work/layer.tar")
printf '{"architecture":"amd64","os":"linux","config":{"Env":["PATH=/bin"],"Cmd":["/bin/sh"]},"rootfs":{"type":"layers","diff_ids":["%s"]}}' \
  "$layer" > "$work/config.json"
config_size=$(stat -c %s "$work/config.json")
config=$(blob "$work/config.json")
printf '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"%s","size":%s},"layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"%s","size":%s}]}' \
  "$config" "$config_size" "$layer" "$layer_size" > "$work/manifest.json"
manifest_size=$(stat -c %s "$work/manifest.json")
manifest=$(blob "$work/manifest.json")
printf '{"schemaVersion":2,"manifests":[{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"%s","size":%s,"platform":{"architecture":"amd64","os":"linux"},"annotations":{"org.opencontainers.image.ref.name":"%s"}}]}' \
  "$manifest" "$manifest_size" "$image" > "$work/layout/index.json"
echo '{"imageLayoutVersion":"1.0.0"}' > "$work/layout/oci-layout"
tar -C "$work/layout" -cf "$work/image.tar" .

# containerd of our own.
cat > "$work/config.toml" <<TOML
version = 2
root = "$work/root"
state = "$work/state"
disabled_plugins = ["io.containerd.grpc.v1.cri", "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.aufs"]
[grpc]
  address = "$work/containerd.sock"
TOML
PATH="$bin_dir:$PATH" CRIB_BIN="$bin_dir/crib" CRIB_SHIM_STATE_DIR="$work/shim" \
  containerd --config "$work/config.toml" > "$work/containerd.log" 2>&1 &
containerd_pid=$!
ctr_() { ctr --address "$work/containerd.sock" "$@"; }
for _ in $(seq 100); do ctr_ version >/dev/null 2>&1 && break; sleep 0.2; done
ctr_ image import "$work/image.tar" >/dev/null || { echo "ctr image import failed"; tail -20 "$work/containerd.log"; exit 1; }

# One run: "<ms to READY> <ms to exit>", or "fail".
one_run() { # runtime id
  local t0 t1 t2 line
  t0=$(date +%s%N)
  exec 3< <(ctr_ run --rm --runtime "$1" "$image" "$2" echo READY 2>&1)
  line=
  while IFS= read -r line <&3; do [ "$line" = READY ] && break; done
  t1=$(date +%s%N)
  cat <&3 >/dev/null
  exec 3<&-
  wait $! 2>/dev/null
  t2=$(date +%s%N)
  if [ "$line" = READY ]; then
    echo "$(((t1 - t0) / 1000000)) $(((t2 - t0) / 1000000))"
  else
    echo fail
  fi
}
median() { sort -n | awk '{v[NR]=$1} END {if (NR == 0) {print "-"; exit}; m = (NR % 2) ? v[(NR+1)/2] : int((v[NR/2] + v[NR/2+1]) / 2); printf "%d (%d-%d)", m, v[1], v[NR]}'; }

: > "$work/crib.txt"
: > "$work/runc.txt"
for i in $(seq "$runs"); do
  for rt in crib runc; do
    r=$(one_run "io.containerd.$rt.v2" "bench-$rt-$i")
    echo "run $i $rt: $r"
    if [ "$r" = fail ]; then
      echo "  ctr run with $rt failed; containerd's log ends with:"; tail -5 "$work/containerd.log"
      continue
    fi
    [ "$i" -gt 1 ] && echo "$r" >> "$work/$rt.txt"
  done
done

echo "== ctr run --rm IMAGE echo READY: ms, median of runs 2-$runs (min-max)"
for rt in crib runc; do
  printf '%-6s to READY %-24s to exit %s\n' "$rt" \
    "$(cut -d' ' -f1 "$work/$rt.txt" | median)" "$(cut -d' ' -f2 "$work/$rt.txt" | median)"
done
m() { cut -d' ' -f"$2" "$work/$1.txt" | sort -n | awk '{v[NR]=$1} END {print (NR % 2) ? v[(NR+1)/2] : (v[NR/2] + v[NR/2+1]) / 2}'; }
awk -v a="$(m crib 1)" -v b="$(m runc 1)" -v c="$(m crib 2)" -v d="$(m runc 2)" \
  'BEGIN { if (b > 0 && d > 0) printf "ratio crib/runc: to READY %.2f, to exit %.2f\n", a / b, c / d }'
leftover=$(ls "$work/shim" 2>/dev/null | wc -l)
echo "shim state directories left: $leftover"
