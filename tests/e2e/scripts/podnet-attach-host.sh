#!/usr/bin/env bash
# Attach mode's host side without a booting guest (docs/NETWORK.md, "Attach mode"): run
# as root, it re-executes itself in a network namespace of its own (unshare -n), so
# nothing touches the host's network.
#   CRIB_TEST_KERNEL=halt.elf tests/e2e/scripts/podnet-attach-host.sh
# A namespace "cni" (a process's, not a named one) plays the pod sandbox CNI made: eth0,
# a veth with an address, a MAC, an MTU and default routes; its peer stays in the
# script's namespace with the gateway's address. `crib pod run` with
# "network": {"attach": "eth0"} runs in "cni" with a guest that only halts
# ($CRIB_TEST_KERNEL, an ELF the e2e test writes), so crib holds the network while the
# script looks. Checks: what crib prints and records (info.json, the spec, pod ls), the
# tap and both tc redirects, that a ping from the peer is redirected away from the
# namespace's own stack, the refusals (bridge-mode fields, a missing interface, one
# without IPv4, an interface another pod holds), the keeper's cleanup after kill -9 of
# crib, and a leftover of kill -9 of crib and keeper replaced by the next run. eth0
# keeps its address, MAC and route throughout.
# Prints PASS/FAIL lines; exits 1 if any failed.
set -uo pipefail
if [[ ${PODNET_IN_NETNS:-} != 1 ]]; then
  PODNET_IN_NETNS=1 exec unshare -n "$0" "$@"
fi
CRIB=${CRIB:-$(cd "$(dirname "$0")/../../.." && pwd)/target/debug/crib}
work=$(mktemp -d /tmp/podnet-attach.XXXXXX)
export CRIB_NET_DIR=$work/net
root=$work/run
failed=0
pass() { echo "PASS $1"; }
fail() { echo "FAIL $1: $2"; failed=1; }
check() { local name=$1 want=$2 got; shift 2; got=$("$@" 2>&1)
  if [[ $got == *"$want"* ]]; then pass "$name"; else fail "$name" "wanted '$want', got: ${got:0:400}"; fi; }
refute() { local name=$1 unwanted=$2 got; shift 2; got=$("$@" 2>&1)
  if [[ $got != *"$unwanted"* ]]; then pass "$name"; else fail "$name" "did not want '$unwanted', got: ${got:0:400}"; fi; }
gone() { # what, command that succeeds while it exists
  local what=$1 i; shift
  for i in $(seq 50); do "$@" >/dev/null 2>&1 || { pass "$what"; return; }; sleep 0.1; done
  fail "$what" "still there: $("$@" 2>&1 | head -5)"
}

modprobe -q -a veth tun sch_ingress cls_matchall cls_u32 act_mirred 2>/dev/null || true
ip link set lo up
cp "${CRIB_TEST_KERNEL:?set CRIB_TEST_KERNEL to a guest ELF that halts}" "$work/kernel"
touch "$work/initrd"

unshare -n sleep 600 & cni=$!
sleep 0.3
in_cni() { nsenter -t $cni -n "$@"; }
ip link add peer0 type veth peer name eth0 && ip link set eth0 netns $cni
ip addr add 10.99.0.1/24 dev peer0 && ip -6 addr add fd00:99::1/64 dev peer0 nodad && ip link set peer0 up
in_cni sh -c 'ip link set lo up; ip link set eth0 address 02:99:00:00:00:02 mtu 1450 up
  ip addr add 10.99.0.2/24 dev eth0; ip -6 addr add fd00:99::2/64 dev eth0 nodad
  ip route add default via 10.99.0.1; ip -6 route add default via fd00:99::1
  ip link add eth1 type veth peer name eth1p; ip link set eth1 up'
eth0_before=$(in_cni ip -br addr show dev eth0)

launch() { # name network-json
  printf '{"pod": {"name": "%s"}, "kernel": "%s", "initrd": "%s", "network": %s}\n' \
    "$1" "$work/kernel" "$work/initrd" "$2" > "$work/$1.json"
}
run_pod() { # name: starts it in "cni" in the background (nsenter execs crib: $crib is
  # crib's pid), waits for its network line
  nsenter -t $cni -n "$CRIB" pod run "$work/$1.json" --run-root "$root" > "$work/$1.out" 2>&1 &
  crib=$!
  for _ in $(seq 100); do grep -q '^network:' "$work/$1.out" && return; sleep 0.1; done
}

launch web '{"attach": "eth0", "search": ["svc.cluster.local"]}'
run_pod web
check "crib pod run prints the attached network" \
  "network: 10.99.0.2 fd00:99::2 attached to eth0 (tap crib" cat "$work/web.out"
check "... with eth0's MAC, MTU and gateway" "MAC 02:99:00:00:00:02, MTU 1450, gateway 10.99.0.1)" cat "$work/web.out"
tap=$(sed -n 's/.*(tap \([^,]*\),.*/\1/p' "$work/web.out")
check "the tap has eth0's MTU and is up" "mtu 1450" in_cni ip -o link show "$tap"
check "the tap is up" "UP" in_cni ip -o link show "$tap"
check "eth0's ingress is redirected to the tap" "Redirect to device $tap" in_cni tc filter show dev eth0 ingress
check "the tap's ingress is redirected to eth0" "Redirect to device eth0" in_cni tc filter show dev "$tap" ingress
check "the VM's NIC has eth0's MAC" '"mac": "02:99:00:00:00:02"' cat "$root/web/info.json"
check "info.json records the interface" '"attach": "eth0"' cat "$root/web/info.json"
check "the spec gives cradle eth0's address" '"address": "10.99.0.2/24"' cat "$root/web/spec.json"
check "the spec gives cradle the gateway" '"gateway": "10.99.0.1"' cat "$root/web/spec.json"
check "the spec gives cradle the IPv6 address" '"address6": "fd00:99::2/64"' cat "$root/web/spec.json"
check "the spec gives cradle the IPv6 gateway" '"gateway6": "fd00:99::1"' cat "$root/web/spec.json"
check "the spec gives cradle the MTU" '"mtu": 1450' cat "$root/web/spec.json"
check "crib pod ls shows the addresses" "10.99.0.2 fd00:99::2" "$CRIB" pod ls --run-root "$root"
# The namespace's own stack no longer sees eth0's traffic: pings from the peer (to eth0's
# MAC, no ARP needed) go to the tap, where the halted guest reads nothing, and the
# redirect counts them.
ip neigh replace 10.99.0.2 lladdr 02:99:00:00:00:02 dev peer0 nud permanent
pinged=$(busybox ping -c 3 -w 3 10.99.0.2 2>&1)
if [[ $pinged == *"3 packets transmitted, 0 packets received"* ]]; then pass "pings to 10.99.0.2 are not answered by the namespace"
else fail "pings to 10.99.0.2 are not answered by the namespace" "$pinged"; fi
stats=$(in_cni tc -s filter show dev eth0 ingress)
sent=$(sed -n 's/.*Sent [0-9]* bytes \([0-9]*\) pkt.*/\1/p' <<< "$stats" | sort -n | tail -1)
if [[ ${sent:-0} -ge 3 ]]; then pass "the redirect to the tap took them ($sent packets)"; else fail "the redirect to the tap took them" "$stats"; fi
ip neigh del 10.99.0.2 dev peer0

launch ports '{"attach": "eth0", "ports": ["8080:80"]}'
check "attach with ports is refused by name" "network.ports cannot be combined with network.attach" \
  in_cni "$CRIB" pod run "$work/ports.json" --run-root "$root"
launch nope '{"attach": "nope0"}'
check "a missing interface is refused" "there is no interface nope0 in crib's network namespace" \
  in_cni "$CRIB" pod run "$work/nope.json" --run-root "$root"
launch bare '{"attach": "eth1"}'
check "an interface without IPv4 is refused" "eth1 has no IPv4 address" \
  in_cni "$CRIB" pod run "$work/bare.json" --run-root "$root"
launch twin '{"attach": "eth0"}'
check "an interface another pod holds is refused" "eth0 already has tc ingress filters that crib did not add (" \
  in_cni "$CRIB" pod run "$work/twin.json" --run-root "$root"
check "... and keeps that pod's redirect" "Redirect to device $tap" in_cni tc filter show dev eth0 ingress
check "a refused pod leaves no tap" "1" sh -c "nsenter -t $cni -n ip -o link show type tun | wc -l"

kill -9 $crib
gone "kill -9 of crib: the keeper removes the tap" in_cni ip link show "$tap"
gone "kill -9 of crib: the keeper removes eth0's ingress qdisc" sh -c "nsenter -t $cni -n tc qdisc show dev eth0 | grep -q ingress"
check "eth0 keeps its addresses" "$eth0_before" in_cni ip -br addr show dev eth0
check "eth0 keeps its MAC" "02:99:00:00:00:02" in_cni ip -o link show dev eth0
check "eth0 keeps its default route" "default via 10.99.0.1 dev eth0" in_cni ip route
check "no lease was taken" "0" sh -c "ls $CRIB_NET_DIR/leases 2>/dev/null | wc -l"

# kill -9 of crib and keeper leaves the tap and the redirect; the next run replaces them.
run_pod web
kill -9 $(pgrep -P $crib) $crib
sleep 0.5
check "kill -9 of crib and keeper leaves the tap" "$tap" in_cni ip -o link show "$tap"
run_pod web
check "the next run replaces the leftovers" "attached to eth0 (tap $tap," cat "$work/web.out"
check "... with one redirect on eth0" "1" sh -c "nsenter -t $cni -n tc filter show dev eth0 ingress | grep -c 'Redirect to device'"
kill -9 $crib
gone "and its keeper removes them" in_cni ip link show "$tap"
check "eth0 still has its address at the end" "10.99.0.2/24" in_cni ip -br addr show dev eth0

if [[ $failed != 0 ]]; then
  for f in "$work"/*.out; do echo "--- $f"; cat "$f"; done
fi
kill $cni 2>/dev/null
rm -rf "$work"
exit $failed
