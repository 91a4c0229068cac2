#!/usr/bin/env bash
# Pod networking end to end, in the lab's L1 (root, its own network stack, no NIC):
# run by the linux_net_pod_* test (tests/e2e/podnet.rs) or by hand:
#   flock /tmp/lab.lock tests/lab/lab.sh -- tests/e2e/scripts/podnet.sh
# Uses $CRIB (default target/debug/crib) and crib's default guest lookup or
# $CRIB_GUEST_DIR. Every address it talks to is a pod's, L1's own, or in a network
# namespace it makes. Prints "PASS name" or "FAIL name: why" per check and exits 1 if
# any failed; the pods' consoles go to $LAB_OUT (or the scratch dir) on failure.
set -uo pipefail

CRIB=${CRIB:-$(cd "$(dirname "$0")/../../.." && pwd)/target/debug/crib}
work=$(mktemp -d /tmp/podnet.XXXXXX)
root=$work/run
netdir=${CRIB_NET_DIR:-/run/crib/.net}
out=${LAB_OUT:-$work}
failed=0
pids=()

pass() { echo "PASS $1"; }
fail() { echo "FAIL $1: $2"; failed=1; }
check() { # name, expected substring, command...
  local name=$1 want=$2; shift 2
  local got
  got=$("$@" 2>&1)
  if [[ $got == *"$want"* ]]; then pass "$name"; else fail "$name" "wanted '$want', got: ${got:0:300}"; fi
}
fetch() { timeout 10 busybox wget -q -O - "$1"; }
# Waits up to $2 s for console $1 to contain $3.
wait_console() {
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
launch() { # name, launch json
  printf '%s\n' "$2" > "$work/$1.json"
  "$CRIB" pod run "$work/$1.json" --run-root "$root" > "$work/$1.out" 2>&1 &
  pids+=($!)
}
stop() { timeout 60 "$CRIB" pod stop "$1" --timeout 20 --run-root "$root" >/dev/null 2>&1; }
say() { echo "podnet: $*"; }

for m in bridge tun veth nf_tables nf_conntrack nf_nat nft_chain_nat nft_nat nft_masq nft_ct nft_fib nft_fib_inet nft_fib_ipv4 nft_fib_ipv6; do modprobe -q "$m" 2>/dev/null; done
ip link set lo up

# --- the world around the pods --------------------------------------------------
mkdir -p "$work/www-host" "$work/www-remote"
echo hello-from-host > "$work/www-host/index.html"
echo hello-from-remote > "$work/www-remote/index.html"
# In the foreground of a background job, so the end of the script can stop it (a
# daemonized httpd outlived the script and answered on :9000 for the next test in L1).
busybox httpd -f -p 9000 -h "$work/www-host" & host_httpd=$!
# "remote": reachable from L1 only, no route back to the pods: answers only NATed traffic.
ip netns add remote
ip link add vr0 type veth peer name vr1
ip link set vr1 netns remote
ip addr add 10.200.0.1/24 dev vr0 && ip link set vr0 up
ip -n remote addr add 10.200.0.2/24 dev vr1
ip -n remote link set vr1 up && ip -n remote link set lo up
ip netns exec remote busybox httpd -f -p 10.200.0.2:9000 -h "$work/www-remote" & remote_httpd=$!
# "other": plays another host that reaches the pod through L1's published port.
ip netns add other
ip link add vo0 type veth peer name vo1
ip link set vo1 netns other
ip addr add 10.201.0.1/24 dev vo0 && ip -6 addr add fd00:201::1/64 dev vo0 nodad && ip link set vo0 up
ip -n other addr add 10.201.0.2/24 dev vo1 && ip -n other -6 addr add fd00:201::2/64 dev vo1 nodad
ip -n other link set vo1 up && ip -n other link set lo up
# The pods' DNS: dnsmasq on the bridge, which the test makes (crib uses an existing one).
ip link add crib0 type bridge
ip addr add 10.88.0.1/16 dev crib0 && ip link set crib0 up
dnsmasq --conf-file=/dev/null --user=root --listen-address=10.88.0.1 --bind-interfaces \
  --no-resolv --no-hosts --address=/example.test/10.9.8.7 --pid-file="$work/dnsmasq.pid"

say "launching pods web and peer"
# --- two pods ------------------------------------------------------------------
client='exec >/dev/console 2>&1
try() { n=0; while [ $n -lt 60 ]; do r=$(timeout 10 wget -q -O - "$2" 2>/dev/null) && { echo "$1 $r"; return; }; n=$((n+1)); sleep 1; done; echo "$1 FAILED"; }
'
web_client="$client"'try POD-TO-HOST http://10.88.0.1:9000/
try POD-TO-REMOTE http://10.200.0.2:9000/
try POD6-TO-HOST http://[fd63:7269:6200::1]:9000/
try HAIRPIN http://10.201.0.1:8080/
echo "DNS $(nslookup example.test 2>&1 | tr "\n" " ")"
echo "RESOLV $(tr "\n" " " < /etc/resolv.conf)"
echo "HOSTS $(tr "\n" " " < /etc/hosts)"
echo "MTU $(cat /sys/class/net/eth0/mtu)"
echo "HOSTNAME $(hostname)"
echo CLIENT-DONE
while true; do sleep 10; done'
peer_client="$client"'try PEER http://10.88.0.50/
try PEER-PUBLISHED http://10.88.0.1:8080/
while true; do sleep 10; done'
json() { busybox awk 'BEGIN{s=ARGV[1]; gsub(/\\/,"\\\\",s); gsub(/"/,"\\\"",s); gsub(/\n/,"\\n",s); print "\"" s "\""}' "$1"; }
launch web '{"pod": {"name": "web", "lifetime": "until-shutdown", "processes": [
  {"name": "httpd", "argv": ["/bin/sh", "-c", "mkdir -p /www && echo hello-from-web > /www/index.html && exec httpd -f -p 80 -h /www"]},
  {"name": "client", "argv": ["/bin/sh", "-c", '"$(json "$web_client")"']}]},
  "memory": "256M",
  "network": {"address": "10.88.0.50", "ports": ["8080:80/tcp"], "dns": ["10.88.0.1"], "search": ["example.test"], "mtu": 1400}}'
launch peer '{"pod": {"name": "peer", "lifetime": "until-shutdown", "processes": [
  {"name": "client", "argv": ["/bin/sh", "-c", '"$(json "$peer_client")"']}]},
  "memory": "256M", "network": {"address": "10.88.0.51"}}'

if wait_listed web 180 && wait_listed peer 180; then pass "two pods run"; else fail "two pods run" "$(cat "$work"/web.out "$work"/peer.out)"; fi
say "waiting for web's client"
wait_console "$root/web/console.log" 240 CLIENT-DONE || fail "web client finished" "no CLIENT-DONE"
wait_console "$root/peer/console.log" 120 "PEER-PUBLISHED " || true
console=$(tr -d '\r' < "$root/web/console.log")
peer_console=$(tr -d '\r' < "$root/peer/console.log")
con() { printf '%s\n' "$console"; }

check "crib pod ls shows the address" "10.88.0.50" "$CRIB" pod ls --run-root "$root"
check "info.json has the network" '"address": "10.88.0.50"' cat "$root/web/info.json"
for i in $(seq 60); do fetch http://10.88.0.50/ >/dev/null 2>&1 && break; sleep 1; done
check "host -> pod address" hello-from-web fetch http://10.88.0.50/
# 10.88.0.50 is host number 50 = 0x32 of the /16, so ::32 of the /64.
check "info.json has the IPv6 address" '"address6": "fd63:7269:6200::32"' cat "$root/web/info.json"
check "host -> pod IPv6 address" hello-from-web fetch "http://[fd63:7269:6200::32]/"
check "host -> published port on 127.0.0.1" hello-from-web fetch http://127.0.0.1:8080/
check "host -> published port on its own address" hello-from-web fetch http://10.201.0.1:8080/
check "other host -> published port" hello-from-web ip netns exec other timeout 10 busybox wget -q -O - http://10.201.0.1:8080/
check "other host -> published port over IPv6" hello-from-web ip netns exec other timeout 10 busybox wget -q -O - "http://[fd00:201::1]:8080/"
check "pod -> host" "POD-TO-HOST hello-from-host" con
check "pod -> remote through NAT" "POD-TO-REMOTE hello-from-remote" con
check "pod -> host over IPv6" "POD6-TO-HOST hello-from-host" con
check "DNS in the pod against the test's dnsmasq" "10.9.8.7" con
check "resolv.conf from the launch file" "RESOLV nameserver 10.88.0.1 search example.test" con
check "hosts lists the pod and its processes" "10.88.0.50	web httpd client" con
check "MTU from the launch file" "MTU 1400" con
check "hostname is the pod's name" "HOSTNAME web" con
check "pod -> pod by address" "PEER hello-from-web" printf '%s\n' "$peer_console"
check "pod -> its own published port (hairpin)" "HAIRPIN hello-from-web" con
check "pod -> another pod's published port" "PEER-PUBLISHED hello-from-web" printf '%s\n' "$peer_console"
echo '{"pod": {"name": "thief"}, "network": {"ports": ["8080:81"]}}' > "$work/thief.json"
check "the published port of a running pod is refused" "already published by pod web" \
  "$CRIB" pod run "$work/thief.json" --run-root "$root"

# --- kill -9: the keeper removes the network --------------------------------------
crib_pid=$(sed -n 's/.*"pid": \([0-9]*\).*/\1/p' "$root/peer/info.json" | head -1)
peer_tap=$(sed -n 's/.*"tap": "\([^"]*\)".*/\1/p' "$root/peer/info.json" | head -1)
kill -9 "$crib_pid"
for i in $(seq 50); do ip link show "$peer_tap" >/dev/null 2>&1 || break; sleep 0.2; done
if ip link show "$peer_tap" >/dev/null 2>&1; then fail "kill -9: tap removed" "$peer_tap is still there"; else pass "kill -9: tap removed"; fi
if [[ -e $netdir/leases/10.88.0.51.json ]]; then fail "kill -9: lease released" "10.88.0.51 still leased"; else pass "kill -9: lease released"; fi

web_tap=$(sed -n 's/.*"tap": "\([^"]*\)".*/\1/p' "$root/web/info.json" | head -1)
stop web
cp "$root/web/console.log" "$out/podnet-web-console.log" 2>/dev/null
cp "$root/peer/console.log" "$out/podnet-peer-console.log" 2>/dev/null

say "launching ten pods"
# --- ten pods at once ------------------------------------------------------------
for i in $(seq 0 9); do
  launch "p$i" '{"pod": {"name": "p'"$i"'", "lifetime": "until-shutdown", "processes": [
    {"name": "idle", "argv": ["/bin/sh", "-c", "while true; do sleep 10; done"]}]}, "memory": "128M"}'
done
up=0
deadline=$((SECONDS + 400))
for i in $(seq 0 9); do wait_listed "p$i" $((deadline > SECONDS ? deadline - SECONDS : 1)) && up=$((up + 1)); done
addrs=$("$CRIB" pod ls --run-root "$root" | awk '$1 ~ /^p[0-9]$/ {print $4}' | sort -u | wc -l)
if [[ $up == 10 && $addrs == 10 ]]; then pass "ten pods at once get ten addresses"; else fail "ten pods at once get ten addresses" "$up up, $addrs distinct: $("$CRIB" pod ls --run-root "$root")"; fi
say "stopping ten pods"
for i in $(seq 0 9); do stop "p$i" & done
for pid in "${pids[@]}"; do
  for _ in $(seq 300); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
  kill -0 "$pid" 2>/dev/null && { fail "pod ended" "crib pid $pid still runs"; kill -9 "$pid"; }
done

# --- nothing left ----------------------------------------------------------------
# Each pod's keeper tears its network down once its crib has exited, one after another
# under the IPAM lock, each running `nft` and `ip`: slow in a loaded lab, so wait for it.
# Only this test's pods count: other tests may run pods meanwhile.
leftovers() {
  taps=0
  for tap in "$web_tap" $(cat "$root"/p*/info.json | sed -n 's/.*"tap": "\([^"]*\)".*/\1/p'); do
    [[ -n $tap ]] && ip link show "$tap" >/dev/null 2>&1 && taps=$((taps + 1))
  done
  chains=$(nft list table inet crib | grep -cE 'chain pod-(web|peer|p[0-9])-[0-9a-f]{8} ')
  elements=$(nft list map inet crib ports | grep -c 'tcp . 8080')
  leases=$(grep -l "$root" "$netdir"/leases/*.json 2>/dev/null | wc -l)
  [[ $taps == 0 && $chains == 0 && $elements == 0 && $leases == 0 ]]
}
waited=0
until leftovers || ((waited >= 60)); do sleep 1; waited=$((waited + 1)); done
if leftovers; then pass "teardown leaves no tap, rule or lease (after ${waited} s)"
else fail "teardown leaves no tap, rule or lease" "taps $taps chains $chains elements $elements leases $leases: $(ip -o link; nft list table inet crib; ls "$netdir"/leases)"; fi

if [[ $failed != 0 ]]; then
  echo "--- web console"; tail -40 "$root/web/console.log"
  echo "--- web out"; cat "$work/web.out"
fi
kill "$(cat "$work/dnsmasq.pid")" "$host_httpd" "$remote_httpd" 2>/dev/null
exit $failed
