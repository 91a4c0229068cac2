#!/usr/bin/env bash
# Every test: formatting, clippy, unit tests, and the end-to-end tests (inside the lab when
# this CPU has no VT-x/AMD-V).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

scripts/prepare.sh
cargo fmt --all -- --check
cargo clippy --quiet --workspace --all-targets -- -D warnings
cargo test --workspace
