#!/usr/bin/env bash
# The VM benchmark: blkrep (async, sync) vs the bare loop device vs DRBD 8.4 (protocol A, C),
# in one guest, on the same backing devices and the same veth link (scenarios/bench.sh), then
# the Markdown report (bench-report.py): medians with min–max over the rounds, and the ratios.
# Not a test (never part of --all or CI). Takes about 3 minutes per round with the defaults (2-core host).
#
# Usage: bash test-vm/bench.sh [--rounds N] [--runtime S] [--ramp S] [--size MIB]
#                              [--delay 5ms] [--only loop,blkrep-async,...] [-v]
#   --rounds N     rounds, contenders interleaved in each (default 3)
#   --runtime S    measured seconds per fio job (default 10), after --ramp S (default 2)
#   --size MIB     backing and volume size in MiB (default 256)
#   --delay D      netem delay on each end of the link, e.g. 5ms (default none)
#   --only LIST    contenders, comma-separated (default loop,blkrep-async,blkrep-sync,drbd-A,drbd-C)
#   -v             stream the guest console
# Output: the report on stdout and in target/test-vm/bench.md; the console log in
# target/test-vm/logs/bench.log (each job's @@BENCH line). Needs drbd-utils on the host for
# the DRBD contenders (bash scripts/install-deps.sh --vm).
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
OUT=${BLKREP_VM_OUT:-$(dirname "$HERE")/target/test-vm}
rounds=3 runtime=10 ramp=2 size=256 delay="" only="" verbose=()
while [ $# -gt 0 ]; do
  case "$1" in
    --rounds) rounds=$2; shift 2 ;;
    --runtime) runtime=$2; shift 2 ;;
    --ramp) ramp=$2; shift 2 ;;
    --size) size=${2%M}; shift 2 ;;
    --delay) delay=$2; shift 2 ;;
    --only) only=$2; shift 2 ;;
    -v) verbose=(-v); shift ;;
    -h|--help) awk 'NR > 1 && /^#/ {sub(/^# ?/, ""); print; next} NR > 1 {exit}' "$0"; exit 0 ;;
    *) echo "bench.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
for v in "$rounds" "$runtime" "$ramp" "$size"; do
  [[ $v =~ ^[0-9]+$ ]] || { echo "bench.sh: not a number: $v" >&2; exit 2; }
done

append="bench.rounds=$rounds bench.runtime=$runtime bench.ramp=$ramp bench.size=${size}M"
[ -n "$delay" ] && append+=" bench.delay=$delay"
[ -n "$only" ] && append+=" bench.only=$only"
# Generous: per round and contender two jobs plus bring-up, drain and tear-down under TCG,
# and the first full sync of the blkrep pair.
timeout=$((600 + rounds * 5 * (2 * (runtime + ramp + 30) + 60)))

rc=0
bash "$HERE/run.sh" "${verbose[@]}" --timeout "$timeout" --append "$append" bench || rc=$?
# A failed run still reports the jobs it finished (marked incomplete).
if [ -f "$OUT/logs/bench.log" ]; then
  python3 "$HERE/bench-report.py" "$OUT/logs/bench.log" -o "$OUT/bench.md" || rc=1
  echo "bench.sh: report written to $OUT/bench.md"
fi
exit "$rc"
