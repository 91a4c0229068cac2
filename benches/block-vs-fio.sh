#!/bin/bash
# Interleaved rounds of the block device-model bench (cargo bench -p crib-benches --bench block
# --no-run first) and fio io_uring on the same kind of file; see docs/BENCHMARKS.md. Each
# round runs the bench twice: its driver halt-polling as KVM does for a vCPU (the default),
# and sleeping at once on every interrupt (CRIB_BENCH_HALT_POLL_US=0).
B=${BLOCK_BENCH:-$(ls -t "$(dirname "$0")"/../target/release/deps/block-* | grep -v "\\.d$" | head -1)}
F=/tmp/blkab.img
rounds=${ROUNDS:-4}
[ -f $F ] || dd if=/dev/urandom of=$F bs=1M count=256 status=none
cat $F > /dev/null
for r in $(seq "$rounds"); do
  for poll in 200 0; do
    CRIB_BENCH_HALT_POLL_US=$poll $B --bench 2>&1 | grep -oE "[14]q io_uring: [0-9]+ IOPS" | sed "s/^/round $r crib halt-poll=$poll /"
  done
  for j in 1 4; do
    fio --name=r --filename=$F --ioengine=io_uring --rw=randread --bs=4k --iodepth=32 --size=256M --runtime=5 --time_based --invalidate=0 --numjobs=$j --group_reporting --output-format=terse --terse-version=3 2>/dev/null | awk -F';' -v r=$r -v j=$j '{print "round " r " fio " j " jobs: " $8 " IOPS"}'
  done
  echo "round $r load: $(cut -d' ' -f1-3 /proc/loadavg)"
done
rm -f $F
