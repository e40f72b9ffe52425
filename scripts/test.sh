#!/usr/bin/env bash
# Run every check and test of the project: formatting, clippy, unit and integration tests
# (two real daemons on loopback driven by qemu-io, qemu-img and our Rust NBD client).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -d "$HOME/.cargo/bin" ] && export PATH="$HOME/.cargo/bin:$PATH"
bash scripts/install-deps.sh
echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "== build binaries"
cargo build --workspace --bins --locked
echo "== tests"
mkdir -p target
set +e
cargo test --workspace --locked -- --test-threads="${TEST_THREADS:-2}" 2>&1 | tee target/test.log
rc=${PIPESTATUS[0]}
set -e
summary=$(grep -E '^test result:' target/test.log | awk '{p+=$4; f+=$6; i+=$8} END {print p" passed, "f" failed, "i" ignored"}')
echo "== summary: $summary (cargo test exit $rc)"
exit "$rc"
