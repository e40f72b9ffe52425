#!/usr/bin/env bash
# Run every check and test of the project: formatting, clippy, unit and integration tests
# (two real daemons on loopback driven by qemu-io, qemu-img and our Rust NBD client), then
# the VM scenarios marked `ci` (test-vm/: a real 6.12 kernel with ublk under qemu).
#   --no-vm   skip the VM scenarios
# Without a package registry the VM part is skipped with the reason (an error when CI=true).
set -euo pipefail
cd "$(dirname "$0")/.."
vm=1
for a in "$@"; do
  case "$a" in
    --no-vm) vm=0 ;;
    *) echo "test.sh: unknown argument $a (use --no-vm to skip the VM scenarios)" >&2; exit 2 ;;
  esac
done
[ -d "$HOME/.cargo/bin" ] && export PATH="$HOME/.cargo/bin:$PATH"
if [ "$vm" = 1 ]; then bash scripts/install-deps.sh --vm; else bash scripts/install-deps.sh; fi
echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "== build binaries"
cargo build --workspace --bins --locked
echo "== tests"
mkdir -p target
set +e
cargo test --workspace --locked --no-fail-fast -- --test-threads="${TEST_THREADS:-2}" 2>&1 | tee target/test.log
rc=${PIPESTATUS[0]}
set -e
echo "== simulator (release): the CI budget of seeds, and every planted bug caught"
set +e
cargo test --release --locked --no-fail-fast -p blkrep-sim -- --ignored --nocapture 2>&1 | tee target/test-sim.log
sim_rc=${PIPESTATUS[0]}
set -e
[ "$rc" != 0 ] || rc=$sim_rc
summary=$(cat target/test.log target/test-sim.log | grep -E '^test result:' | awk '{p+=$4; f+=$6; i+=$8} END {print p" passed, "f" failed, "i" ignored"}')
echo "== cargo test: $summary (exit $rc)"
vm_summary="skipped (--no-vm)"
if [ "$vm" = 1 ]; then
  echo "== VM scenarios (test-vm/run.sh --all)"
  set +e
  bash test-vm/run.sh --all 2>&1 | tee target/test-vm.log
  vm_rc=${PIPESTATUS[0]}
  set -e
  vm_summary=$(grep -E '^test-vm: (summary|SKIP|FAIL:)' target/test-vm.log | tail -n 1 | sed 's/^test-vm: //; s/^summary: //')
  vm_summary="${vm_summary:-no summary} (exit $vm_rc)"
  [ "$rc" != 0 ] || rc=$vm_rc
fi
echo "== summary: $summary; VM scenarios: $vm_summary"
exit "$rc"
