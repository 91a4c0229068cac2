#!/usr/bin/env bash
# Builds every fuzz target on the stable toolchain (libFuzzer with sancov coverage, no
# sanitizer; debug with debug assertions) and runs each for a bounded time from a copy of
# its committed seed corpus (fuzz/corpus/<target>/), so CI never modifies the repository.
#
# -len_control=0: inputs may be as long as the seeds from the start; the structured inputs
# need a few hundred bytes to reach deep paths.
#
# Prints one line per target and a libtest-style summary line ("test result: ok. N passed;
# M failed; ...") that scripts/test.sh counts. On a crash: the crash file's path and the
# command that replays it, and a non-zero exit.
#
# FUZZ_SECONDS: seconds per target (default 15). FUZZ_TARGETS: the targets to run
# (default: every [[bin]] of fuzz/Cargo.toml).
set -euo pipefail
fuzz=$(cd "$(dirname "$0")" && pwd)
cd "$fuzz"

seconds=${FUZZ_SECONDS:-15}
triple=x86_64-unknown-linux-gnu
export RUSTFLAGS="--cfg fuzzing -Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
-Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table \
-Cllvm-args=-sanitizer-coverage-trace-compares -Cdebug-assertions"
# A CI cache of the root target/ must not get these flags' builds: the fuzz crate has its own.
export CARGO_TARGET_DIR="$fuzz/target"
targets=${FUZZ_TARGETS:-$(awk '/^\[\[bin\]\]/ { bin = 1 } bin && /^name *=/ { gsub(/[" ]/, "", $3); print $3; bin = 0 }' Cargo.toml)}

start=$(date +%s)
# --target keeps build scripts and proc macros uninstrumented.
cargo build --quiet --bins --target "$triple"
echo "fuzz: built in $(($(date +%s) - start)) s; $(echo $targets | wc -w) targets, ${seconds} s each"

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# Crash files are written in the temporary directory and only a failure's is kept, in
# fuzz/artifacts/<target>/ (ignored by git).
artifacts="$fuzz/artifacts"
passed=0
failed=0
for target in $targets; do
    bin="$CARGO_TARGET_DIR/$triple/debug/$target"
    corpus="$work/$target"
    mkdir -p "$corpus" "$work/$target.artifacts"
    if [ -d "corpus/$target" ]; then
        cp -r "corpus/$target/." "$corpus/"
    fi
    log="$work/$target.log"
    status=0
    # TMPDIR: a target's scratch files (layer_tar's unpack tree) go with $work.
    TMPDIR="$work" "$bin" "$corpus" -max_total_time="$seconds" -rss_limit_mb=2048 -timeout=10 -len_control=0 \
        -print_final_stats=1 -artifact_prefix="$work/$target.artifacts/" >"$log" 2>&1 || status=$?
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
    cov=$( (grep -Eo 'cov: [0-9]+' "$log" || true) | tail -1 | cut -d' ' -f2)
    if [ "$status" -eq 0 ]; then
        passed=$((passed + 1))
        echo "fuzz $target ... ok (${execs:-0} executions, ${cov:-0} coverage points)"
    else
        failed=$((failed + 1))
        written=$(sed -n 's/.*Test unit written to \(.*\)$/\1/p' "$log" | tail -1)
        echo "fuzz $target ... FAILED (exit $status)"
        { grep -A1 "panicked at" "$log" || true; grep "SUMMARY: libFuzzer" "$log" || true; } |
            head -5 | sed 's/^/    /'
        if [ -n "$written" ] && [ -f "$written" ]; then
            mkdir -p "$artifacts/$target"
            crash="$artifacts/$target/$(basename "$written")"
            cp "$written" "$crash"
            echo "    crash file: $crash"
            echo "    replay (after this script built the targets): $bin $crash"
        else
            tail -20 "$log" | sed 's/^/    /'
        fi
    fi
done
elapsed=$(($(date +%s) - start))
result=ok
[ "$failed" -eq 0 ] || result=FAILED
echo "test result: $result. $passed passed; $failed failed; 0 ignored; 0 measured; 0 filtered out; finished in ${elapsed}s"
[ "$failed" -eq 0 ]
