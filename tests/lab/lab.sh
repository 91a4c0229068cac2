#!/usr/bin/env bash
# Run ONE command inside a fresh lab L1 VM (QEMU TCG, emulated AMD CPU with
# SVM, so L1 has a working /dev/kvm) and report its output and exit code.
# See tests/lab/README.md and ../shared/docs/LAB.md (why the lab exists).
#
#   tests/lab/lab.sh [--nvme IMG [--nvme-vfs N]] [--mem MIB] [--timeout SECS]
#                    [--env NAME[=VALUE]]... [--npt on|off] [--verbose] -- COMMAND [ARGS...]
#
# Host packages (Debian); this script never installs anything:
#   apt-get install -y qemu-system-x86 busybox-static cpio kmod lz4
#
# Exit status: COMMAND's own; 124 on --timeout; 125 if the lab itself failed
# (missing tools, L1 setup failure, L1 died, hung or stayed silent every attempt).
# QEMU option values contain commas; they are not array separators:
# shellcheck disable=SC2054
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/../.." && pwd)

# Defaults. LAB_SILENCE_SECS exists for the lab's own tests (the freeze path).
mem=4096
timeout=1800
nvme=
nvme_vfs=0
verbose=${LAB_VERBOSE:-0}
silence=${LAB_SILENCE_SECS:-90}
# L1's KVM gives L2 shadow page tables unless asked for nested paging: see --npt in
# tests/lab/README.md for why that is the default.
npt=${LAB_NPT:-off}
# QEMU's TCG threading for L1's vCPUs: multi (one host thread per vCPU, the default) or
# single (both on one thread: slower, for telling MTTCG races apart from other freezes).
tcg_thread=${LAB_TCG_THREAD:-multi}
# Three reruns: a full CI run once saw the same group's L1 freeze three times in a row.
max_reruns=3
env_names=()

# Modules packed into the initramfs (their dependencies are resolved at pack
# time), with insmod parameters. Changing this list changes the cache key.
modules=(
  virtio_pci 9pnet_virtio 9p overlay
  "kvm-amd nested=1" # npt= comes from the kernel command line (--npt)
  tun fuse loop nvme vfio-pci vfio_iommu_type1
)

say() { echo "lab: $*" >&2; }
die() { say "$*"; exit 125; }
usage() {
  cat >&2 <<'EOF'
usage: tests/lab/lab.sh [--nvme IMG [--nvme-vfs N]] [--mem MIB] [--timeout SECS] [--env NAME[=VALUE]]...
                        [--npt on|off] [--verbose] -- COMMAND [ARGS...]
Runs COMMAND inside a fresh lab VM (see tests/lab/README.md).
EOF
  exit 2
}
is_uint() { [[ $1 =~ ^[0-9]+$ ]]; }

while (($#)); do
  case $1 in
    --nvme) nvme=${2:?--nvme needs an image}; shift 2 ;;
    --nvme-vfs) nvme_vfs=${2:?--nvme-vfs needs a count}; shift 2 ;;
    --mem) mem=${2:?}; shift 2 ;;
    --timeout) timeout=${2:?}; shift 2 ;;
    --env) env_names+=("${2:?}"); shift 2 ;;
    --npt) npt=${2:?--npt needs on or off}; shift 2 ;;
    -v | --verbose) verbose=1; shift ;;
    --) shift; break ;;
    -h | --help) usage ;;
    *) say "unknown option: $1"; usage ;;
  esac
done
(($#)) || usage
{ is_uint "$mem" && is_uint "$timeout" && is_uint "$silence" && ((timeout > 0 && silence > 0)); } ||
  die "--mem, --timeout and LAB_SILENCE_SECS take positive whole numbers"
{ is_uint "$nvme_vfs" && ((nvme_vfs <= 7)); } || die "--nvme-vfs takes 0 to 7 (virtual functions share the PF's PCI slot)"
((nvme_vfs == 0)) || [ -n "$nvme" ] || die "--nvme-vfs needs --nvme IMG (the VFs are the NVMe's)"
case $npt in
  on) npt_param=1 ;;
  off) npt_param=0 ;;
  *) die "--npt (or LAB_NPT) takes on or off, not '$npt'" ;;
esac
case $tcg_thread in
  multi | single) ;;
  *) die "LAB_TCG_THREAD takes multi or single, not '$tcg_thread'" ;;
esac

# --- host prerequisites: say exactly what to install ---------------------------
apt_line="apt-get install -y qemu-system-x86 busybox-static cpio kmod lz4"
qemu=$(command -v qemu-system-x86_64) || die "qemu-system-x86_64 not found: $apt_line"
for tool in cpio modprobe depmod sha256sum; do
  command -v "$tool" >/dev/null || die "$tool not found: $apt_line"
done
# A dynamic busybox (package `busybox`) cannot run in the initramfs: no libc.
{ [ -x /bin/busybox ] && ! ldd /bin/busybox >/dev/null 2>&1; } ||
  die "/bin/busybox is missing or not static: $apt_line"
((BASH_VERSINFO[0] >= 5)) || die "bash 5 or later is needed (EPOCHREALTIME)"
[ -x /bin/bash ] || die "/bin/bash is needed (it runs the command inside L1)"

# QEMU must not outlive this script even if it is SIGKILLed (a cancelled CI
# job): the kernel sends QEMU SIGTERM when its parent (this shell) dies.
pdeath=()
if setpriv --help 2>/dev/null | grep -q -- --pdeathsig; then
  pdeath=(setpriv --pdeathsig TERM --)
fi

# QEMU option values are comma-separated: a literal comma must be doubled.
qopt() { printf '%s' "${1//,/,,}"; }

# Single-quote a value for the busybox sh that sources `conf` in L1.
shq() { printf "'%s'" "${1//\'/\'\\\'\'}"; }

# Somewhere without whitespace: the run dir's path goes on the kernel command line.
tmpbase=${TMPDIR:-/tmp}
[[ $tmpbase =~ ^/[^[:space:]]*$ && -d $tmpbase && -w $tmpbase ]] || tmpbase=/tmp

priv=
out_tmp=
qpid=
cleanup() {
  local rc=$?
  stop_qemu
  [ -n "$priv" ] && rm -rf "$priv"
  # A default (unchosen) results dir is kept only if the command wrote to it.
  if [ -n "$out_tmp" ]; then
    rmdir "$out_tmp" 2>/dev/null || say "files written to LAB_OUT are in $out_tmp"
  fi
  exit "$rc"
}
stop_qemu() {
  [ -n "$qpid" ] || return 0
  if kill -0 "$qpid" 2>/dev/null; then
    kill "$qpid" 2>/dev/null || true
    # QEMU exits promptly on SIGTERM; SIGKILL if it does not within 5 s.
    for _ in 1 2 3 4 5 6 7 8 9 10; do kill -0 "$qpid" 2>/dev/null || break; sleep 0.5; done
    kill -9 "$qpid" 2>/dev/null || true
  fi
  wait "$qpid" 2>/dev/null || true
  qpid=
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
trap 'exit 129' HUP

# --- L1 kernel + initramfs, cached under target/lab/<kver>-<hash>/ -------------
# The key covers everything packed: kernel version, init script, module list,
# this packing code, busybox binary. A new key is packed next to the old ones,
# which are then pruned.
build_l1() {
  kdir=$("$root/guest/kernel/fetch-debian-kernel.sh" generic) || die "cannot fetch the L1 kernel (guest/kernel/fetch-debian-kernel.sh generic)"
  kver=$(cat "$kdir/VERSION")
  kmods=$kdir/root/lib/modules/$kver
  local hash
  hash=$({
    cat "$here/init"
    printf '%s\n' "${modules[@]}"
    declare -f build_l1 extract_vmlinux # how it is packed
    cat /bin/busybox
  } | sha256sum | cut -c1-12)
  local cachedir=${LAB_CACHE:-$root/target/lab}
  l1=$cachedir/$kver-$hash
  [ -f "$l1/initramfs.cpio" ] && [ -f "$l1/kernel" ] && return 0

  say "packing the L1 initramfs into $l1"
  mkdir -p "$cachedir"
  local stage
  stage=$(mktemp -d "$cachedir/tmp.XXXXXX")
  chmod 0755 "$stage" # mktemp made it private
  local r=$stage/root
  mkdir -p "$r/bin" "$r/dev" "$r/proc" "$r/sys" "$r/lib/lab-modules"
  cp /bin/busybox "$r/bin/busybox"
  ln -s busybox "$r/bin/sh"
  install -m 0755 "$here/init" "$r/init"

  # Dependencies in load order, each module once. `builtin` lines need nothing.
  local spec name params kw path base
  local -A seen=()
  for spec in "${modules[@]}"; do
    read -r name params <<<"$spec"
    local deps
    deps=$(modprobe -d "$kdir/root" -S "$kver" --show-depends "$name") ||
      { rm -rf "$stage"; die "module $name not found for $kver"; }
    while read -r kw path _; do
      [ "$kw" = insmod ] || continue
      [ -z "${seen[$path]:-}" ] || continue
      seen[$path]=1
      base=${path##*/}
      # Newer Debian kernels compress modules; busybox insmod wants them plain.
      case $base in
        *.ko.xz) xz -dc "$path" >"$r/lib/lab-modules/${base%.xz}"; base=${base%.xz} ;;
        *.ko.zst) zstd -qdc "$path" >"$r/lib/lab-modules/${base%.zst}"; base=${base%.zst} ;;
        *.ko.gz) gzip -dc "$path" >"$r/lib/lab-modules/${base%.gz}"; base=${base%.gz} ;;
        *) cp "$path" "$r/lib/lab-modules/" ;;
      esac
      # Parameters belong to the named module, not to its dependencies.
      if [ "${base%.ko}" = "$name" ] || [ "${base%.ko}" = "${name//-/_}" ]; then
        echo "$base $params"
      else
        echo "$base"
      fi >>"$r/lib/lab-modules/order"
    done <<<"$deps"
  done

  # Uncompressed on purpose: decompressing under TCG costs more than copying.
  (cd "$r" && find . | LC_ALL=C sort | cpio -o -H newc -R 0:0 --quiet >"$stage/initramfs.cpio")
  # The bzImage decompresses itself under TCG in about 3 s, every boot. QEMU
  # boots the uncompressed ELF directly (PVH entry), so unpack it once here.
  if grep -qx 'CONFIG_PVH=y' "$kdir/config" && extract_vmlinux "$kdir/vmlinuz" "$stage/kernel"; then
    :
  else
    cp "$kdir/vmlinuz" "$stage/kernel"
  fi
  echo "$kver" >"$stage/VERSION"
  rm -rf "$r"
  # Atomic publish; a concurrent lab.sh may have won the race, which is fine.
  if ! mv -T "$stage" "$l1" 2>/dev/null; then
    if [ -f "$l1/initramfs.cpio" ] && [ -f "$l1/kernel" ]; then
      rm -rf "$stage"
    else # a broken leftover: replace it
      rm -rf "$l1"
      mv -T "$stage" "$l1"
    fi
  fi
  local old
  for old in "$cachedir"/*-*; do
    [ "$old" = "$l1" ] || [[ ${old##*/} == tmp.* ]] || rm -rf "$old"
  done
}

# The ELF vmlinux inside a bzImage ($1) into $2. The payload's offset comes from
# the boot protocol header (setup_sects at 0x1f1, payload_offset at 0x248), its
# format from its magic. Anything after the compressed stream is ignored.
extract_vmlinux() {
  local setup_sects payload_offset start magic dec
  setup_sects=$(od -An -tu1 -j $((0x1f1)) -N1 "$1" | tr -d ' ')
  payload_offset=$(od -An -tu4 -j $((0x248)) -N4 "$1" | tr -d ' ')
  start=$(((setup_sects + 1) * 512 + payload_offset))
  magic=$(od -An -tx1 -j "$start" -N4 "$1" | tr -d ' ')
  case $magic in
    fd377a58) dec=(xz -dc --single-stream) ;;
    1f8b*) dec=(gzip -dc) ;;
    28b52ffd) dec=(zstd -qdc) ;;
    02214c18) dec=(lz4 -dc) ;;
    *) return 1 ;;
  esac
  command -v "${dec[0]}" >/dev/null || return 1
  tail -c +$((start + 1)) "$1" | "${dec[@]}" >"$2" 2>/dev/null || true
  [ "$(head -c 4 "$2" | od -An -tx1 | tr -d ' ')" = 7f454c46 ]
}

build_l1

# --- the run dir: conf + run.sh, read by L1 through the 9p root ----------------
priv=$(mktemp -d "$tmpbase/lab.XXXXXX")
nonce=$(od -An -N8 -tx1 /dev/urandom | tr -d ' \n')

if [ -n "${LAB_OUT:-}" ]; then
  mkdir -p "$LAB_OUT" || die "cannot create LAB_OUT=$LAB_OUT"
  out=$(cd "$LAB_OUT" && pwd -P)
else
  out_tmp=$(mktemp -d "$tmpbase/lab-out.XXXXXX")
  out=$out_tmp
fi
# Physical path: symlinks into /tmp or /run would not resolve the same in L1.
cwd=$(pwd -P)

{
  echo "LAB_OUT=$(shq "$out")"
  echo "LAB_CWD=$(shq "$cwd")"
  # The repository (its target/ holds the binaries under test) may live under /tmp too.
  echo "LAB_ROOT=$(shq "$(cd "$root" && pwd -P)")"
  echo "LAB_KMODS=$(shq "$kmods")"
} >"$priv/conf"

{
  echo '# Generated by tests/lab/lab.sh; runs under bash in the chroot inside L1.'
  echo 'export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin'
  echo 'export HOME=/root TERM=dumb LANG=C.UTF-8'
  # Always passed: the Rust backtrace switch and crib's own knobs.
  names=(RUST_BACKTRACE CRIB_LOG)
  while IFS= read -r name; do names+=("$name"); done < <(compgen -e | grep '^CRIB_' || true)
  for spec in "${names[@]}" "${env_names[@]}"; do
    if [[ $spec == *=* ]]; then
      name=${spec%%=*} value=${spec#*=}
    else
      name=$spec
      [ -n "${!name+set}" ] || continue
      value=${!name}
    fi
    [[ $name =~ ^[A-Za-z_][A-Za-z0-9_]*$ ]] || die "--env: bad variable name: $name"
    printf 'export %s=%q\n' "$name" "$value"
  done
  printf 'export LAB_OUT=%q\n' "$out"
  printf 'cd -- %q || { echo "lab: no such directory in L1: %q" >&2; exit 125; }\n' "$cwd" "$cwd"
  printf 'exec'
  printf ' %q' "$@"
  printf '\n'
} >"$priv/run.sh"

# --- QEMU ----------------------------------------------------------------------
append="console=ttyS0 quiet panic=-1 lab.dir=$priv lab.nonce=$nonce lab.npt=$npt_param"
qargs=(
  -accel "tcg,thread=$tcg_thread" -cpu EPYC,+svm,+npt -M q35 -m "$mem" -smp 2
  -nographic -nodefaults -serial stdio -no-reboot
  # "Triple fault" (and the CPU state at resets) goes here: how an L1 that died ended.
  -d cpu_reset -D "$priv/qemu-reset.log"
  -kernel "$l1/kernel" -initrd "$l1/initramfs.cpio"
)
if [ -n "$nvme" ]; then
  { [ -r "$nvme" ] && [ -w "$nvme" ]; } || die "--nvme: $nvme is not a readable and writable image"
  nvme=$(cd "$(dirname "$nvme")" && pwd -P)/${nvme##*/}
  # The vIOMMU is listed before the PCI devices, as QEMU documents for it.
  qargs+=(
    -device intel-iommu
    -drive "file=$(qopt "$nvme"),if=none,id=nv0,format=raw"
  )
  if ((nvme_vfs == 0)); then
    qargs+=(-device nvme,serial=crib-nvme0,drive=nv0)
  else
    # SR-IOV (QEMU's docs/system/devices/nvme.rst): the namespace sits in a subsystem
    # and is shared, so each VF's secondary controller sees it too. Each VF may be given
    # 4 queues (admin + 3 I/O) and 4 interrupt vectors from the flexible pools; the PF
    # keeps 4 I/O queue pairs. QEMU 7.2 sizes a VF's BAR 0 from the PF's queue and
    # vector counts but advertises it from the per-VF ones (fixed upstream in 2024):
    # these stay within the same 16 KiB.
    vf_queues=$((4 * nvme_vfs))
    qargs+=(
      -device nvme-subsys,id=nvsub0,nqn=crib-subsys0
      -device "nvme,id=nvme0,serial=crib-nvme0,subsys=nvsub0,max_ioqpairs=$((vf_queues + 4)),msix_qsize=$((vf_queues + 5)),sriov_max_vfs=$nvme_vfs,sriov_vq_flexible=$vf_queues,sriov_vi_flexible=$vf_queues"
      -device nvme-ns,bus=nvme0,drive=nv0,nsid=1
    )
  fi
  append+=" intel_iommu=on iommu=pt"
fi
qargs+=(
  -virtfs local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap
  -virtfs "local,path=$(qopt "$out"),mount_tag=labout,security_model=none"
  -append "$append"
)

# Print the part of the pending partial line $buf that cannot belong to a
# marker: hold back from the first "LAB-" on (a marker may still be arriving), a
# trailing "L", "LA" or "LAB", and a trailing "\r" (ONLCR's, see below).
flush_partial() {
  local keep="" p
  if [[ $buf == *LAB-* ]]; then
    keep=LAB-${buf#*LAB-}
  else
    for p in LAB LA L $'\r'; do
      if [[ $buf == *"$p" ]]; then keep=$p; break; fi
    done
  fi
  printf '%s' "${buf%"$keep"}"
  buf=$keep
}

# Seconds from $1 to $2 (two $EPOCHREALTIME values; $2 defaults to now), as
# "12.3". Integer arithmetic: no dependence on the locale's decimal point.
elapsed() {
  local from=${1/[.,]/} to=${2:-$EPOCHREALTIME}
  to=${to/[.,]/}
  printf '%d.%d' $(((to - from) / 1000000)) $(((to - from) / 100000 % 10))
}

# One L1 boot. Streams the command's output to stdout and sets:
#   result=exit  (code in $exit_code) | fail (message in $fail_msg)
#          | silent | stuck (L1 watchdog) | timeout | died (QEMU ended without a marker)
run_once() {
  local fifo=$priv/console bootlog=$priv/bootlog
  rm -f "$fifo"
  mkfifo "$fifo"
  : >"$bootlog"
  # stdin is /dev/null: with no stdin (CI) or a terminal, QEMU must never wait
  # on it nor put it in raw mode. QEMU's stderr (TCG feature warnings) is kept
  # for failure reports only.
  "${pdeath[@]}" "$qemu" "${qargs[@]}" </dev/null >"$fifo" 2>"$priv/qemu.err" &
  qpid=$!
  local fd
  exec {fd}<"$fifo"

  local buf="" chunk line pre rc started=0 ended=0
  local last=$SECONDS t0=$EPOCHREALTIME t_start="" t_end=0
  result=died exit_code='' fail_msg=''
  while :; do
    if IFS= read -r -t 1 -u "$fd" chunk; then
      line=$buf$chunk buf=""
      last=$SECONDS
    else
      rc=$?
      if ((rc > 128)); then
        # After the exit marker, only wait (a little) for QEMU to close the pipe.
        if ((ended)); then ((SECONDS - t_end < 10)) || break; continue; fi
        # Timed out: bash keeps the partial line read so far in $chunk.
        if [ -n "$chunk" ]; then buf+=$chunk; last=$SECONDS; fi
        # Show a long-pending partial line (e.g. "running tests ... ") now.
        ((started && !ended)) && [ -n "$buf" ] && flush_partial
        if ((SECONDS >= deadline)); then result=timeout; break; fi
        if ((!ended && SECONDS - last >= silence)); then result=silent; break; fi
        continue
      fi
      # EOF: QEMU is gone. Handle an unterminated last line, then stop.
      line=$buf$chunk buf=""
      [ -n "$line" ] || break
    fi
    ((ended)) && continue # poweroff chatter after the exit marker
    ((SECONDS < deadline)) || { result=timeout; break; }
    # The serial console's ONLCR turns each "\n" into "\r\n": drop that one "\r".
    line=${line%$'\r'}
    case $line in
      *"LAB-HB $nonce")
        # A heartbeat may land after an unterminated partial line: print the
        # part before it without a newline, so the output is unchanged.
        ((started)) && printf '%s' "${line%"LAB-HB $nonce"}"
        ;;
      *"LAB-START $nonce")
        started=1 t_start=$EPOCHREALTIME
        ;;
      *"LAB-EXIT $nonce: "*)
        pre=${line%"LAB-EXIT $nonce: "*}
        exit_code=${line##*"LAB-EXIT $nonce: "}
        printf '%s' "$pre"
        ended=1 t_end=$SECONDS result=exit
        ;;
      *"LAB-FAIL $nonce: "*)
        fail_msg=${line##*"LAB-FAIL $nonce: "} ended=1 t_end=$SECONDS result=fail
        ;;
      *"LAB-WARN $nonce: "*)
        say "warning: ${line##*"LAB-WARN $nonce: "}"
        ;;
      *"BUG: soft lockup - CPU#"* | *"rcu_sched detected stalls"* | *"rcu_preempt detected stalls"*)
        # L1's kernel is stuck (a nested-virtualization hang under TCG): its
        # watchdog keeps printing, so silence detection would never fire.
        say "L1 kernel reports a hang: ${line#*] }"
        result=stuck
        break
        ;;
      *)
        if ((started)); then
          printf '%s\n' "$line"
        else
          # Timestamped (seconds since QEMU start): shows where a slow boot went.
          printf '%6s %s\n' "$(elapsed "$t0")" "$line" >>"$bootlog"
        fi
        ;;
    esac
  done
  exec {fd}<&-
  stop_qemu
  if ((verbose)); then
    say "L1 boot log:"
    sed 's/^/  | /' "$bootlog" >&2
    [ -z "$t_start" ] ||
      say "times: L1 boot to command $(elapsed "$t0" "$t_start") s, command + poweroff $(elapsed "$t_start") s"
  fi
}

# Show what is known about a lab that failed before or without the exit marker.
report_failure() {
  say "L1 boot log (last lines):"
  tail -n 40 "$priv/bootlog" | sed 's/^/  | /' >&2
  # Without the harmless "TCG doesn't support requested feature" warnings.
  local -a err
  mapfile -t err < <(grep -v "TCG doesn't support requested feature" "$priv/qemu.err" || true)
  ((${#err[@]} == 0)) || { say "QEMU stderr:"; printf '  | %s\n' "${err[@]}" >&2; }
  if grep -q "Triple fault" "$priv/qemu-reset.log" 2>/dev/null; then
    say "QEMU's log: L1 triple-faulted"
  fi
}

deadline=$((SECONDS + timeout))
attempt=0
while :; do
  run_once
  case $result in
    exit) exit "$exit_code" ;;
    fail)
      report_failure
      die "L1 setup failed: $fail_msg"
      ;;
    timeout)
      say "timed out after $timeout s (--timeout): QEMU killed"
      exit 124
      ;;
    silent)
      if ((attempt < max_reruns)); then
        attempt=$((attempt + 1))
        say "L1 silent for $silence s (no output, no heartbeat): QEMU killed;" \
          "rerunning the whole command (rerun $attempt of $max_reruns), its output so far will repeat"
        continue
      fi
      report_failure
      die "L1 silent for $silence s on every attempt ($((max_reruns + 1))): giving up"
      ;;
    stuck)
      if ((attempt < max_reruns)); then
        attempt=$((attempt + 1))
        say "QEMU killed; rerunning the whole command (rerun $attempt of $max_reruns)," \
          "its output so far will repeat"
        continue
      fi
      report_failure
      die "L1 kernel hung on every attempt ($((max_reruns + 1))): giving up"
      ;;
    died)
      # QEMU-TCG's emulated SVM sometimes takes L1 down under nested load (a triple
      # fault in L1, or QEMU ending without a word): like a frozen L1, a lab failure.
      report_failure
      if ((attempt < max_reruns)); then
        attempt=$((attempt + 1))
        say "L1 ended without reporting the command's exit status;" \
          "rerunning the whole command (rerun $attempt of $max_reruns), its output so far will repeat"
        continue
      fi
      die "L1 ended without reporting the command's exit status on every attempt ($((max_reruns + 1))): giving up"
      ;;
  esac
done
