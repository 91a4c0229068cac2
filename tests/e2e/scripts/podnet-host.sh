#!/usr/bin/env bash
# The host side of pod networking without KVM: run as root, it re-executes itself in a
# network namespace of its own (unshare -n), so nothing touches the host's network.
#   tests/e2e/scripts/podnet-host.sh
# `crib pod run` sets a pod's network up and then runs a guest that only halts
# ($CRIB_TEST_KERNEL, an ELF the e2e test writes: needs /dev/kvm); a network namespace with a veth on crib's bridge and the pod's addresses stands in
# for the pod. Checks the published port (127.0.0.1, the host's own address, another
# "host" namespace over IPv4 and IPv6), the pod's addresses, NAT to a "remote"
# namespace without a route back, a refused port and not-a-bridge, the keeper's
# cleanup after kill -9 of crib, the sweep after kill -9 of crib and keeper, and that
# nothing is left. Prints PASS/FAIL lines; exits 1 if any failed.
set -uo pipefail
if [[ ${PODNET_IN_NETNS:-} != 1 ]]; then
  PODNET_IN_NETNS=1 exec unshare -n "$0" "$@"
fi
CRIB=${CRIB:-$(cd "$(dirname "$0")/../../.." && pwd)/target/debug/crib}
work=$(mktemp -d /tmp/podnet-host.XXXXXX)
export CRIB_NET_DIR=$work/net
root=$work/run
failed=0
pass() { echo "PASS $1"; }
fail() { echo "FAIL $1: $2"; failed=1; }
check() { local name=$1 want=$2 got; shift 2; got=$("$@" 2>&1)
  if [[ $got == *"$want"* ]]; then pass "$name"; else fail "$name" "wanted '$want', got: ${got:0:300}"; fi; }
w() { timeout 5 busybox wget -q -O - "$@"; }
in_ns() { local pid=$1; shift; nsenter -t "$pid" -n "$@"; }
gone() { # what, command that succeeds while it exists
  local what=$1 i; shift
  for i in $(seq 50); do "$@" >/dev/null 2>&1 || { pass "$what"; return; }; sleep 0.1; done
  fail "$what" "still there"
}

# Module autoloading may not reach a chroot (the lab's): load what the test itself uses.
modprobe -q veth 2>/dev/null || true
ip link set lo up
cp "${CRIB_TEST_KERNEL:?set CRIB_TEST_KERNEL to a guest ELF that halts}" "$work/kernel"
touch "$work/initrd"
mkdir -p "$work/www" "$work/wwwr"
echo hello-from-pod > "$work/www/index.html"
echo hello-from-remote > "$work/wwwr/index.html"
launch() { # name ports-json
  printf '{"pod": {"name": "%s"}, "kernel": "%s", "initrd": "%s", "network": {"ports": %s}}\n' \
    "$1" "$work/kernel" "$work/initrd" "$2" > "$work/$1.json"
}
launch web '["8080:80/tcp"]'
"$CRIB" pod run "$work/web.json" --run-root "$root" > "$work/web.out" 2>&1 &
crib=$!
for _ in $(seq 50); do grep -q '^network:' "$work/web.out" && break; sleep 0.1; done
check "crib pod run prints the network" "network: 10.88.0.2 fd63:7269:6200::2 on crib0" cat "$work/web.out"
tap=$(sed -n 's/.*(tap \([^,]*\),.*/\1/p' "$work/web.out")

unshare -n sleep 600 & pod=$!
unshare -n sleep 600 & remote=$!
unshare -n sleep 600 & other=$!
sleep 0.3
ip link add fpv0 type veth peer name fpv1 && ip link set fpv1 netns $pod && ip link set fpv0 master crib0 up
in_ns $pod sh -c 'ip link set lo up; ip link set fpv1 up; ip addr add 10.88.0.2/16 dev fpv1
  ip -6 addr add fd63:7269:6200::2/64 dev fpv1 nodad; ip route add default via 10.88.0.1
  ip -6 route add default via fd63:7269:6200::1'
nsenter -t $pod -n busybox httpd -f -p 80 -h "$work/www" & httpd1=$!
ip link add rv0 type veth peer name rv1 && ip link set rv1 netns $remote
ip addr add 10.200.0.1/24 dev rv0 && ip link set rv0 up
in_ns $remote sh -c 'ip link set lo up; ip link set rv1 up; ip addr add 10.200.0.2/24 dev rv1'
nsenter -t $remote -n busybox httpd -f -p 10.200.0.2:9000 -h "$work/wwwr" & httpd2=$!
ip link add ov0 type veth peer name ov1 && ip link set ov1 netns $other
ip addr add 10.201.0.1/24 dev ov0 && ip -6 addr add fd00:201::1/64 dev ov0 nodad && ip link set ov0 up
in_ns $other sh -c 'ip link set lo up; ip link set ov1 up; ip addr add 10.201.0.2/24 dev ov1
  ip -6 addr add fd00:201::2/64 dev ov1 nodad'
sleep 0.5

check "host -> pod address" hello-from-pod w http://10.88.0.2/
check "host -> pod IPv6 address" hello-from-pod w "http://[fd63:7269:6200::2]/"
check "host -> published port on 127.0.0.1" hello-from-pod w http://127.0.0.1:8080/
check "host -> published port on its own address" hello-from-pod w http://10.201.0.1:8080/
check "other host -> published port" hello-from-pod in_ns $other timeout 5 busybox wget -q -O - http://10.201.0.1:8080/
check "other host -> published port over IPv6" hello-from-pod in_ns $other timeout 5 busybox wget -q -O - "http://[fd00:201::1]:8080/"
check "pod -> remote through NAT" hello-from-remote in_ns $pod timeout 5 busybox wget -q -O - http://10.200.0.2:9000/
check "the tap is on the bridge" "master crib0" ip -o link show "$tap"

launch thief '["8080:81"]'
check "a published port is refused" "host port 8080/tcp is already published by pod web" \
  "$CRIB" pod run "$work/thief.json" --run-root "$root"
printf '{"pod": {"name": "lo"}, "kernel": "%s", "initrd": "%s", "network": {"bridge": "lo"}}\n' \
  "$work/kernel" "$work/initrd" > "$work/lo.json"
check "an interface that is not a bridge is refused" "lo exists but is not a bridge" \
  "$CRIB" pod run "$work/lo.json" --run-root "$root"
check "a refused pod leaves no lease" "1" sh -c "ls $CRIB_NET_DIR/leases | wc -l"

kill -9 $crib
gone "kill -9 of crib: the keeper removes the tap" ip link show "$tap"
gone "kill -9 of crib: the keeper removes the chain" sh -c "nft list table inet crib | grep -q 'chain pod-web'"
gone "kill -9 of crib: the keeper releases the lease" test -e "$CRIB_NET_DIR/leases/10.88.0.2.json"

"$CRIB" pod run "$work/web.json" --run-root "$root" > "$work/web.out" 2>&1 &
crib=$!
for _ in $(seq 50); do grep -q '^network:' "$work/web.out" && break; sleep 0.1; done
kill -9 $(pgrep -P $crib) $crib
sleep 0.3
check "kill -9 of crib and keeper leaves a lease" "10.88.0.2.json" ls "$CRIB_NET_DIR/leases"
check "crib pod net-sweep removes it" "removed the network of pod web" "$CRIB" pod net-sweep
taps=$(ip -o link | grep -c ': crib[0-9a-f]\{8\}')
chains=$(nft list table inet crib | grep -c 'chain pod-')
leases=$(ls "$CRIB_NET_DIR/leases" | wc -l)
if [[ $taps == 0 && $chains == 0 && $leases == 0 ]]; then pass "nothing left"; else fail "nothing left" "taps $taps chains $chains leases $leases"; fi
kill $httpd1 $httpd2 $pod $remote $other 2>/dev/null
rm -rf "$work"
exit $failed
