#!/usr/bin/env bash
# Installs schemathesis (PyPI) into a virtualenv under target/tools/schemathesis, where the
# e2e test micro_api_conforms_to_docs_api_yaml finds it (or set CRIB_SCHEMATHESIS to the
# `schemathesis` executable). Idempotent: does nothing when the pinned version is there.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

version=4.32.5
venv=target/tools/schemathesis
bin=$venv/bin/schemathesis
if [ -x "$bin" ] && "$venv/bin/pip" show schemathesis 2>/dev/null | grep -q "^Version: $version$"; then
  exit 0
fi
echo "install-schemathesis: installing schemathesis $version into $venv" >&2
python3 -m venv "$venv"
# A package index that drops a connection once must not sink the whole test run: three tries,
# pip's own log shown on the last.
log=$(mktemp)
trap 'rm -f "$log"' EXIT
for try in 1 2 3; do
  if "$venv/bin/pip" install --disable-pip-version-check "schemathesis==$version" >"$log" 2>&1; then
    exit 0
  fi
  echo "install-schemathesis: pip install failed (try $try of 3)" >&2
  sleep $((try * 5))
done
tail -30 "$log" >&2
exit 1
