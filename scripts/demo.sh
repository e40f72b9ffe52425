#!/usr/bin/env bash
# The main job on an embedded default: two blkrep nodes on loopback, a workload through the
# primary's NBD export, replica checks and a planned switchover (see README.md).
# Extra arguments go to `blkrep-tools demo` (e.g. --mode sync --ops 50000 --keep).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -d "$HOME/.cargo/bin" ] && export PATH="$HOME/.cargo/bin:$PATH"
bash scripts/install-deps.sh
echo "== building (release)"
cargo build --release --locked --bins
echo "== demo"
exec target/release/blkrep-tools demo "$@"
