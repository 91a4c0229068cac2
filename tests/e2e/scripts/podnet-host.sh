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
# nothing is left; then `crib run --net pod` (two VMs): DHCP answers their MACs with
# their leases and no other MAC, one dnsmasq, a refused duplicate --id, and after
# kill -9 of each crib its lease, tap, port, then dnsmasq and its directory go.
# Prints PASS/FAIL lines; exits 1 if any failed.
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
# crib run --net pod: two marketplace-style VMs (the halting guest) on the bridge; a
# namespace with a veth of a VM's MAC asks crib's dnsmasq in the VM's place.
printf '#!/bin/sh\n[ "$1" = bound ] && echo "BOUND ip=$ip mask=$mask router=$router mtu=$mtu"\nexit 0\n' > "$work/udhcpc.sh"
chmod +x "$work/udhcpc.sh"
unshare -n sleep 600 & client=$!
"$CRIB" run --kernel "$work/kernel" --id vm1 --console off --net pod,port=2222:22 > "$work/vm1.out" 2>&1 &
vm1=$!
"$CRIB" run --kernel "$work/kernel" --id vm2 --console off --net pod > "$work/vm2.out" 2>&1 &
vm2=$!
for _ in $(seq 50); do grep -q 'network:' "$work/vm1.out" && grep -q 'network:' "$work/vm2.out" && break; sleep 0.1; done
check "crib run --net pod logs its network" "over DHCP; ports [2222:22/tcp]" cat "$work/vm1.out"
field() { sed -n "s/.*$2.*/\\1/p" "$work/$1.out" | head -1; }
addr1=$(field vm1 'network: \([0-9.]*\) on'); mac1=$(field vm1 'MAC \([0-9a-f:]*\),'); tap1=$(field vm1 '(tap \([^,]*\),')
addr2=$(field vm2 'network: \([0-9.]*\) on'); mac2=$(field vm2 'MAC \([0-9a-f:]*\),')
dhcp_as() { # MAC: a DHCP exchange from a veth with that MAC on crib0
  ip link add dv0 type veth peer name dv1 && ip link set dv1 netns $client && ip link set dv0 master crib0 up
  in_ns $client ip link set dv1 address "$1" up
  in_ns $client timeout 30 busybox udhcpc -i dv1 -n -q -f -t 4 -T 1 -O mtu -s "$work/udhcpc.sh" 2>&1
  ip link del dv0 2>/dev/null
}
check "a VM's MAC gets its leased address over DHCP" "BOUND ip=$addr1 mask=16 router=10.88.0.1 mtu=1500" dhcp_as "$mac1"
check "a MAC crib did not lease gets no address" "no lease" dhcp_as 02:11:22:33:44:55
check "one DHCP server for the bridge" "1" pgrep -c -f "dnsmasq .*$CRIB_NET_DIR"
check "the same --id twice is refused" "already on the pod network" \
  "$CRIB" run --kernel "$work/kernel" --id vm1 --console off --net pod
check "a refused VM leaves no lease" "2" sh -c "ls $CRIB_NET_DIR/leases | wc -l"
kill -9 $vm1
gone "kill -9 of crib run: the keeper removes the VM's lease" test -e "$CRIB_NET_DIR/leases/$addr1.json"
gone "kill -9 of crib run: the keeper removes its tap" ip link show "$tap1"
gone "kill -9 of crib run: the keeper removes its published port" sh -c "nft list table inet crib | grep -q 2222"
check "the other VM still gets its address (dnsmasq restarted)" "BOUND ip=$addr2 " dhcp_as "$mac2"
kill -9 $vm2
gone "the last VM gone: its DHCP server stops" pgrep -f "dnsmasq .*$CRIB_NET_DIR"
gone "the last VM gone: no DHCP directory" test -e "$CRIB_NET_DIR/dhcp-crib0"
gone "the last VM gone: no VM directory" sh -c "ls -d $CRIB_NET_DIR/vm-* 2>/dev/null | grep -q ."
"$CRIB" run --kernel "$work/kernel" --id vm3 --console off --net pod > "$work/vm3.out" 2>&1 &
vm3=$!
for _ in $(seq 50); do grep -q 'network:' "$work/vm3.out" && break; sleep 0.1; done
kill -9 $(pgrep -P $vm3) $vm3
sleep 0.3
check "kill -9 of crib run and its keeper leaves its VM directory" "lock" ls "$CRIB_NET_DIR/vm-vm3"
check "crib pod net-sweep removes the VM's network" "vm3" "$CRIB" pod net-sweep
gone "the sweep removes the VM directory" test -e "$CRIB_NET_DIR/vm-vm3"
gone "the sweep stops the DHCP server" pgrep -f "dnsmasq .*$CRIB_NET_DIR"
kill $client 2>/dev/null
taps=$(ip -o link | grep -c ': crib[0-9a-f]\{8\}')
chains=$(nft list table inet crib | grep -c 'chain pod-')
leases=$(ls "$CRIB_NET_DIR/leases" | wc -l)
if [[ $taps == 0 && $chains == 0 && $leases == 0 ]]; then pass "nothing left"; else fail "nothing left" "taps $taps chains $chains leases $leases"; fi
kill $httpd1 $httpd2 $pod $remote $other 2>/dev/null
rm -rf "$work"
exit $failed
