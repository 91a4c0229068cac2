#!/usr/bin/env bash
# Pod networking benchmarks (docs/BENCHMARKS.md, "Pod networking"), in the lab's L1:
#   flock /tmp/lab.lock tests/lab/lab.sh --env CRIB -- benches/podnet.sh
# HTTP (wrk, busybox httpd) and TCP (iperf3, both directions) from L1 against a pod at
# its address, through a published port, and against the same servers in a plain
# network namespace of L1 (a veth pair); pod start time with and without networking.
# The pod runs L1's iperf3 from a read-only virtio-fs share of L1's / (mounted at /host),
# through L1's dynamic loader rather than `chroot /host`: iperf3's server creates each
# test stream's buffer file in $TMPDIR (else /tmp) and gives up on the stream ("unable
# to create a new stream") when it cannot, which a chroot into a read-only tree makes
# certain. Outside the chroot, TMPDIR=/tmp is the pod's own writable /tmp.
set -uo pipefail

CRIB=${CRIB:-$(cd "$(dirname "$0")/.." && pwd)/target/debug/crib}
work=$(mktemp -d /tmp/podnet-bench.XXXXXX)
root=$work/run
runs=${RUNS:-5}
for m in bridge tun veth nf_tables nf_conntrack nf_nat nft_chain_nat nft_nat nft_masq nft_ct nft_fib nft_fib_inet nft_fib_ipv4 nft_fib_ipv6; do modprobe -q "$m" 2>/dev/null; done
ip link set lo up

wait_http() { for _ in $(seq 300); do timeout 5 busybox wget -q -O /dev/null "$1" 2>/dev/null && return 0; sleep 0.5; done; return 1; }
wrk_line() { # label url
  local out
  out=$(wrk -t2 -c16 -d10s --latency "$2" 2>&1)
  printf '%-34s %10s req/s  p50 %8s  p99 %8s\n' "$1" \
    "$(awk '/Requests\/sec/ {print $2}' <<<"$out")" \
    "$(awk '$1 == "50%" {print $2}' <<<"$out")" \
    "$(awk '$1 == "99%" {print $2}' <<<"$out")"
}
iperf_line() { # label host
  local up down
  up=$(iperf3 -c "$2" -t 8 -J 2>/dev/null | awk -F'[:,]' '/"sum_received"/ {f=1} f && /bits_per_second/ {print $2/1e9; exit}')
  down=$(iperf3 -c "$2" -t 8 -R -J 2>/dev/null | awk -F'[:,]' '/"sum_received"/ {f=1} f && /bits_per_second/ {print $2/1e9; exit}')
  printf '%-34s L1->server %6.2f Gbit/s  server->L1 %6.2f Gbit/s\n' "$1" "${up:-0}" "${down:-0}"
}

mkdir -p "$work/www"
head -c 1024 /dev/zero | tr '\0' x > "$work/www/index.html"

# The reference: the same servers in a plain network namespace.
ip netns add plain
ip link add vp0 type veth peer name vp1
ip link set vp1 netns plain
ip addr add 10.202.0.1/24 dev vp0 && ip link set vp0 up
ip -n plain addr add 10.202.0.2/24 dev vp1 && ip -n plain link set vp1 up && ip -n plain link set lo up
ip netns exec plain busybox httpd -p 80 -h "$work/www"
ip netns exec plain iperf3 -s -D

cat > "$work/bench.json" <<JSON
{"pod": {"name": "bench", "lifetime": "until-shutdown",
  "filesystems": [{"tag": "host", "path": "/host", "readonly": true}],
  "processes": [
    {"name": "httpd", "argv": ["/bin/sh", "-c", "mkdir -p /www && head -c 1024 /dev/zero | tr '\\\\0' x > /www/index.html && exec httpd -f -p 80 -h /www"]},
    {"name": "iperf3", "argv": ["/bin/sh", "-c", "mkdir -p /tmp && TMPDIR=/tmp exec /host/usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2 --library-path /host/usr/lib/x86_64-linux-gnu /host/usr/bin/iperf3 -s"]}]},
 "cpus": 2, "memory": "512M", "shares": {"host": {"dir": "/"}},
 "network": {"address": "10.88.0.60", "ports": ["8080:80/tcp"]}}
JSON
"$CRIB" pod run "$work/bench.json" --run-root "$root" > "$work/bench.out" 2>&1 &
wait_http http://10.88.0.60/ || { echo "the pod did not serve HTTP"; cat "$work/bench.out"; tail -30 "$root/bench/console.log"; exit 1; }
sleep 2
echo "== HTTP, 1 KiB page, wrk -t2 -c16 -d10s"
wrk_line "plain netns (veth)" http://10.202.0.2/
wrk_line "pod at its address" http://10.88.0.60/
wrk_line "pod through published port" http://127.0.0.1:8080/
echo "== TCP, iperf3 -t 8"
iperf_line "plain netns (veth)" 10.202.0.2
iperf_line "pod at its address" 10.88.0.60
grep -a "iperf3" "$root/bench/console.log" | tail -5
"$CRIB" pod stop bench --run-root "$root" >/dev/null

echo "== pod start to its process's exit (crib pod run wall time, $runs runs)"
start_time() { # network value
  cat > "$work/start.json" <<JSON
{"pod": {"name": "start", "processes": [{"name": "p", "argv": ["/bin/true"]}]}, "memory": "256M", "network": $1}
JSON
  local t0 t1
  t0=$(date +%s%N)
  "$CRIB" pod run "$work/start.json" --run-root "$root" >/dev/null 2>&1
  t1=$(date +%s%N)
  echo $(((t1 - t0) / 1000000))
}
for net in '"none"' '{}'; do
  times=()
  for _ in $(seq "$runs"); do times+=("$(start_time "$net")"); done
  sorted=$(printf '%s\n' "${times[@]}" | sort -n | tr '\n' ' ')
  median=$(printf '%s\n' "${times[@]}" | sort -n | sed -n "$(((runs + 1) / 2))p")
  printf '%-34s median %6s ms  (all: %s)\n' "network $net" "$median" "$sorted"
done
