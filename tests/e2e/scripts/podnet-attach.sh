#!/usr/bin/env bash
# Attach mode end to end (docs/NETWORK.md, "Attach mode"), in the lab's L1 (root, its
# own network stack, no NIC): run by linux_net_attach_end_to_end (tests/e2e/podnet.rs)
# or by hand:
#   flock /tmp/lab.lock tests/lab/lab.sh -- tests/e2e/scripts/podnet-attach.sh
# The script plays CNI: namespace cni-test gets a veth eth0 with a MAC, an MTU,
# 10.99.0.2/24 and fd00:99::2/64 and default routes via the peer, which stays in L1
# with 10.99.0.1/24 and fd00:99::1/64. `crib pod run` runs inside cni-test with
# "network": {"attach": "eth0"}; the pod serves HTTP and fetches from the peer. Checks:
# the pod answers at 10.99.0.2 (and fd00:99::2) from the peer side, reaches 10.99.0.1,
# its eth0 has the veth's MAC, address and MTU; after `crib pod stop` and after kill -9
# of crib no tap or tc filter is left in cni-test and eth0 still has its address.
# Uses $CRIB (default target/debug/crib) and crib's default guest lookup or
# $CRIB_GUEST_DIR. Prints "PASS name" or "FAIL name: why"; exits 1 if any failed.
set -uo pipefail

CRIB=${CRIB:-$(cd "$(dirname "$0")/../../.." && pwd)/target/debug/crib}
work=$(mktemp -d /tmp/podnet-attach.XXXXXX)
root=$work/run
ns=cni-test
mac=02:99:00:00:00:02
failed=0

pass() { echo "PASS $1"; }
fail() { echo "FAIL $1: $2"; failed=1; }
check() { # name, expected substring, command...
  local name=$1 want=$2; shift 2
  local got
  got=$("$@" 2>&1)
  if [[ $got == *"$want"* ]]; then pass "$name"; else fail "$name" "wanted '$want', got: ${got:0:400}"; fi
}
fetch() { timeout 10 busybox wget -q -O - "$1"; }
wait_console() { # file, seconds, text
  local i
  for ((i = 0; i < $2 * 5; i++)); do
    grep -q -- "$3" "$1" 2>/dev/null && return 0
    sleep 0.2
  done
  return 1
}
wait_listed() { # name, seconds
  local i
  for ((i = 0; i < $2 * 5; i++)); do
    "$CRIB" pod ls --run-root "$root" 2>/dev/null | awk '{print $1, $2}' | grep -qx "$1 running" && return 0
    sleep 0.2
  done
  return 1
}
# Nothing of crib's left in cni-test: no tun/tap device, no ingress qdisc on eth0.
leftovers() { echo "taps=$(ip -n $ns -o link show type tun | wc -l) ingress=$(ip netns exec $ns tc qdisc show dev eth0 | grep -c ingress)"; }
wait_clean() {
  local i
  for i in $(seq 100); do [[ $(leftovers) == "taps=0 ingress=0" ]] && return 0; sleep 0.2; done
  return 1
}
say() { echo "podnet-attach: $*"; }

for m in veth tun sch_ingress cls_matchall act_mirred; do modprobe -q "$m" 2>/dev/null; done
ip link set lo up

# --- what CNI would have made -----------------------------------------------------
ip netns add $ns
ip link add cni-peer type veth peer name eth0 netns $ns
ip addr add 10.99.0.1/24 dev cni-peer && ip -6 addr add fd00:99::1/64 dev cni-peer nodad
ip link set cni-peer up
ip -n $ns link set lo up
ip -n $ns link set eth0 address $mac mtu 1450 up
ip -n $ns addr add 10.99.0.2/24 dev eth0
ip -n $ns -6 addr add fd00:99::2/64 dev eth0 nodad
ip -n $ns route add default via 10.99.0.1
ip -n $ns -6 route add default via fd00:99::1
mkdir -p "$work/www-peer"
echo hello-from-peer > "$work/www-peer/index.html"
# A port no other network test serves on, so a leftover of one cannot answer instead.
busybox httpd -f -p 9137 -h "$work/www-peer" &
httpd=$!

client='exec >/dev/console 2>&1
try() { n=0; while [ $n -lt 60 ]; do r=$(timeout 10 wget -q -O - "$2" 2>/dev/null) && { echo "$1 $r"; return; }; n=$((n+1)); sleep 1; done; echo "$1 FAILED"; }
try POD-TO-PEER http://10.99.0.1:9137/
try POD6-TO-PEER http://[fd00:99::1]:9137/
echo "MAC $(cat /sys/class/net/eth0/address)"
echo "MTU $(cat /sys/class/net/eth0/mtu)"
echo "ADDR $(ip addr show dev eth0 2>&1 | tr -s " " | tr "\n" " ")"
echo "ROUTE $(ip route 2>&1 | tr "\n" " ")"
echo "RESOLV $(tr "\n" " " < /etc/resolv.conf)"
echo CLIENT-DONE
while true; do sleep 10; done'
json() { busybox awk 'BEGIN{s=ARGV[1]; gsub(/\\/,"\\\\",s); gsub(/"/,"\\\"",s); gsub(/\n/,"\\n",s); print "\"" s "\""}' "$1"; }
cat > "$work/cni.json" <<EOF
{"pod": {"name": "cni", "lifetime": "until-shutdown", "processes": [
  {"name": "httpd", "argv": ["/bin/sh", "-c", "mkdir -p /www && echo hello-from-attached > /www/index.html && exec httpd -f -p 80 -h /www"]},
  {"name": "client", "argv": ["/bin/sh", "-c", $(json "$client")]}]},
 "memory": "256M",
 "network": {"attach": "eth0", "dns": ["10.99.0.1"], "search": ["cluster.test"]}}
EOF
run() { ip netns exec $ns "$CRIB" pod run "$work/cni.json" --run-root "$root" > "$work/cni.out" 2>&1 & }

say "launching pod cni in $ns"
run
if wait_listed cni 180; then pass "the pod runs in $ns"; else
  fail "the pod runs in $ns" "$(cat "$work/cni.out")"
  ip netns del $ns
  exit 1
fi
check "crib pod run prints the attached network" "network: 10.99.0.2 fd00:99::2 attached to eth0" cat "$work/cni.out"
check "crib pod ls shows the addresses" "10.99.0.2 fd00:99::2" "$CRIB" pod ls --run-root "$root"
# Debian's kernel has cls_matchall: the u32 fallback is for kernels without it.
check "eth0's redirect is a matchall filter" "matchall" ip netns exec $ns tc filter show dev eth0 ingress
wait_console "$root/cni/console.log" 240 CLIENT-DONE || fail "the pod's client finished" "no CLIENT-DONE"
console=$(tr -d '\r' < "$root/cni/console.log")
con() { printf '%s\n' "$console"; }
for i in $(seq 60); do fetch http://10.99.0.2/ >/dev/null 2>&1 && break; sleep 1; done
check "peer -> pod at 10.99.0.2" hello-from-attached fetch http://10.99.0.2/
check "peer -> pod at fd00:99::2" hello-from-attached fetch "http://[fd00:99::2]/"
check "the peer's neighbour entry for 10.99.0.2 is eth0's MAC" "$mac" ip neigh show 10.99.0.2
check "pod -> peer 10.99.0.1" "POD-TO-PEER hello-from-peer" con
check "pod -> peer over IPv6" "POD6-TO-PEER hello-from-peer" con
check "the pod's eth0 has the veth's MAC" "MAC $mac" con
check "the pod's eth0 has the veth's MTU" "MTU 1450" con
check "the pod's eth0 has the veth's address" "inet 10.99.0.2/24" con
check "the pod's eth0 has the veth's IPv6 address" "inet6 fd00:99::2/64" con
check "the pod's default route is the veth's" "default via 10.99.0.1 dev eth0" con
check "resolv.conf from the launch file" "RESOLV nameserver 10.99.0.1 search cluster.test" con
cp "$root/cni/console.log" "${LAB_OUT:-$work}/podnet-attach-console.log" 2>/dev/null

say "stopping the pod"
timeout 60 "$CRIB" pod stop cni --timeout 20 --run-root "$root" >/dev/null 2>&1
if wait_clean; then pass "after the pod ends no tap or tc filter is left"; else fail "after the pod ends no tap or tc filter is left" "$(leftovers)"; fi
check "after the pod ends eth0 still has its address" "inet 10.99.0.2/24" ip -n $ns -o addr show dev eth0
check "after the pod ends eth0 still has its MAC" "$mac" ip -n $ns -o link show dev eth0

say "launching it again, then kill -9 of crib"
run
if wait_listed cni 180; then pass "the pod runs again"; else fail "the pod runs again" "$(cat "$work/cni.out")"; fi
for i in $(seq 60); do fetch http://10.99.0.2/ >/dev/null 2>&1 && break; sleep 1; done
check "peer -> pod again" hello-from-attached fetch http://10.99.0.2/
crib_pid=$(sed -n 's/.*"pid": \([0-9]*\).*/\1/p' "$root/cni/info.json" | head -1)
kill -9 "$crib_pid"
if wait_clean; then pass "after kill -9 of crib no tap or tc filter is left"; else fail "after kill -9 of crib no tap or tc filter is left" "$(leftovers)"; fi
check "after kill -9 eth0 still has its address" "inet 10.99.0.2/24" ip -n $ns -o addr show dev eth0
check "after kill -9 eth0 still has its default route" "default via 10.99.0.1 dev eth0" ip -n $ns route

if [[ $failed != 0 ]]; then
  echo "--- console"; tail -40 "$root/cni/console.log"
  echo "--- crib"; cat "$work/cni.out"
fi
kill $httpd 2>/dev/null
ip netns del $ns
exit $failed
