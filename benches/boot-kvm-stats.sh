#!/bin/bash
# Run inside the lab (after `cargo build --release -p vmm`):
#   tests/lab/lab.sh -- benches/boot-kvm-stats.sh [RUNS]
# Where a boot's time goes before the guest's clock starts. Boots the pod kernel as an ELF
# and as a bzImage under crib and under QEMU `-M microvm,rtc=on` (RUNS times each,
# interleaved) with L1's kvm_exit and kvm_pio trace events on, and prints for each boot:
# how long the guest ran before its clock started (from the VM's first exit to the boot
# marker's port write at init, minus the guest's uptime then), and the exits by reason and
# the port accesses in that window, then the commonest exit sites of the whole boot with the
# guest kernel symbol of each. crib sees only the exits that reach user space; the
# trace shows the ones L1's KVM handles itself too (with L1's shadow paging, the guest's
# page faults and CR3 writes). Tracing slows the guest: compare rows, not absolute times.
# Caveat: the guest's uptime is CLOCK_MONOTONIC, kept by the jiffies clocksource until
# the kernel's fs_initcall switches to kvm-clock; ticks lost while the guest runs with
# interrupts off (a one-vCPU kernel patching its lock prefixes, before crib added
# noreplace-smp) are missing from it, so "before its clock" can include guest time that
# came after timekeeping started (docs/BENCHMARKS.md, issue 17).
cd "$(dirname "$0")/.."
runs=${1:-1}
CRIB=target/release/crib
K=target/guest/pod-kernel
INITRD=target/guest/initramfs-pod.cpio
CMD="console=ttyS0 panic=-1 quiet cradle.debug -- /bin/true"
mountpoint -q /sys/kernel/debug || mount -t debugfs none /sys/kernel/debug
echo "THP: enabled=$(cat /sys/kernel/mm/transparent_hugepage/enabled) shmem_enabled=$(cat /sys/kernel/mm/transparent_hugepage/shmem_enabled)"

qemu() { # kernel
  qemu-system-x86_64 -M microvm,rtc=on -enable-kvm -cpu host -m 512M -smp 1 -nodefaults \
    -no-user-config -nographic -serial stdio -no-reboot -append "$CMD" -kernel "$1" -initrd $INITRD
}

# One traced boot of each: L1's kvm_exit and kvm_pio events, split at the moment the guest's
# clock started (the boot marker's port write at init, minus the guest's uptime then).
tr=/sys/kernel/debug/tracing
traced() { # label, command...
  local label=$1; shift
  echo 0 > $tr/tracing_on; echo > $tr/trace; echo 65536 > $tr/buffer_size_kb
  echo 1 > $tr/events/kvm/kvm_exit/enable; echo 1 > $tr/events/kvm/kvm_pio/enable
  echo 1 > $tr/tracing_on
  local out; out=$("$@" < /dev/null 2>&1)
  echo 0 > $tr/tracing_on
  echo 0 > $tr/events/kvm/kvm_exit/enable; echo 0 > $tr/events/kvm/kvm_pio/enable
  local up; up=$(echo "$out" | sed -n 's/.*init started \([0-9.]*\) ms after boot.*/\1/p' | head -1)
  grep -v '^#' $tr/trace | awk -v label="$label" -v up="${up:-0}" '
    { for (i = 1; i <= NF; i++) if ($i ~ /^[0-9]+\.[0-9]+:$/) { t = substr($i, 1, length($i) - 1); break } }
    /kvm_exit:/ { if (t0 == "") t0 = t; n++; ts[n] = t; for (i = 1; i <= NF; i++) if ($i == "reason") { r[n] = $(i+1); break } }
    /kvm_pio:/ { p++; pt[p] = t; match($0, /pio_(read|write) at 0x[0-9a-f]+/); pk[p] = substr($0, RSTART, RLENGTH)
                 if (marker == "" && $0 ~ /pio_write at 0x440/) marker = t }
    END {
      if (marker == "") { print label ": no boot marker in the trace"; exit }
      clock = marker - up / 1000
      printf "%s: guest ran %.0f ms before its clock started (first exit to marker %.0f ms; uptime %s ms)\n", label, (clock - t0) * 1000, (marker - t0) * 1000, up
      for (i = 1; i <= n; i++) { if (ts[i] < clock) { pre[r[i]]++; npre++ } }
      printf "  exits before the clock: %d; after it, to power-off: %d\n", npre, n - npre
      for (k in pre) printf "  before clock: exit %s %d\n", k, pre[k]
      for (i = 1; i <= p; i++) { if (pt[i] < clock) pp[pk[i]]++ }
      for (k in pp) printf "  before clock: %s %d\n", k, pp[k]
    }'
  top_exit_sites
}

# The guest code behind most exits of the whole boot: the 8 commonest (reason, RIP) pairs
# with the pod kernel's symbol for each RIP (how the lock-prefix patching of a one-vCPU
# kernel showed up: 7,098 write_cr3 exits in switch_mm_irqs_off).
syms=$(mktemp)
nm -n $K/vmlinux | awk '$2 ~ /^[tTwW]$/ { print $1, $3 }' > "$syms"
top_exit_sites() {
  grep -v '^#' $tr/trace | awk '/kvm_exit:/ { for (i = 1; i <= NF; i++) { if ($i == "reason") r = $(i+1); if ($i == "rip") p = $(i+1) } print r, p }' |
    sort | uniq -c | sort -rn | head -8 | while read -r n reason rip; do
      hex=$(printf '%16s' "${rip#0x}" | tr ' ' 0)
      sym=$(awk -v a="$hex" '$1 <= a { s = $2 } $1 > a { exit } END { print s }' "$syms")
      echo "  exits at $rip ($reason): $n${sym:+, in $sym}"
    done
}
for i in $(seq "$runs"); do
  for form in vmlinux bzImage; do
    traced "crib $form" $CRIB run --memory 512M --kernel $K/$form --initrd $INITRD --cmdline "$CMD"
    traced "qemu $form" qemu $K/$form
  done
done
