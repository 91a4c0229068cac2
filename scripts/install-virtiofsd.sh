#!/usr/bin/env bash
# Installs virtiofsd (crates.io) into target/tools/bin, where crib's --fs dir=PATH finds
# it (or set CRIB_VIRTIOFSD). Idempotent: does nothing when it is already there. Needs
# Debian's libseccomp-dev and libcap-ng-dev (scripts/install-deps.sh installs them).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

version=1.14.0
bin=target/tools/bin/virtiofsd
if [ -x "$bin" ] && "$bin" --version 2>/dev/null | grep -q "$version"; then
  exit 0
fi
echo "install-virtiofsd: building virtiofsd $version into target/tools (a few minutes)" >&2
cargo install --quiet --locked virtiofsd --version "$version" --root target/tools
