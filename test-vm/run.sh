#!/usr/bin/env bash
# Run VM scenarios: one fresh guest per scenario (Debian 6.12 kernel under qemu TCG, the
# initramfs from build.sh), serial console to target/test-vm/logs/SCENARIO.log. The guest's
# init runs /scenarios/SCENARIO.sh and prints a result marker carrying a per-run token; this
# script reads the marker and reports the scenario's exit status.
#
# Usage: bash test-vm/run.sh [options] SCENARIO [SCENARIO...]
#        bash test-vm/run.sh [options] --all | --ci | --pending | --list
#   --all         every scenario whose header says `# vm-scenario: ci`
#   --ci          the same; a missing kernel or tool is then an error, never a skip
#                 (also when CI=true)
#   --pending     the scenarios marked `# vm-scenario: pending` (written ahead of the code)
#                 (scenarios marked otherwise, e.g. `bench`, run only when named)
#   --list        list the scenarios with their marks and timeouts
#   --no-build    do not run build.sh first
#   --timeout S   override every scenario's timeout (header `# vm-timeout: S`, default 600)
#   --append ARGS more kernel command line for the scenario to read from /proc/cmdline,
#                 e.g. --append "bench.rounds=5 bench.delay=5ms" (see scenarios/bench.sh)
#   -v            stream each guest's console while it runs
# Environment: BLKREP_VM_MEM (MiB, default 2048), BLKREP_VM_SMP (default 2), and build.sh's.
# Exit status: 0 all passed (or skipped outside CI), 1 a scenario failed or timed out.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(dirname "$HERE")
OUT=${BLKREP_VM_OUT:-$ROOT/target/test-vm}
LOGS=$OUT/logs
MEM=${BLKREP_VM_MEM:-2048}
SMP=${BLKREP_VM_SMP:-2}
BOOT_MARGIN=90 # seconds on top of a scenario's timeout: boot, the guest's own timeout, poweroff

strict=0
[ "${CI:-}" = true ] && strict=1
build=1 verbose=0 timeout_override="" select="" append=""
names=()
while [ $# -gt 0 ]; do
  case "$1" in
    --all) select=ci; shift ;;
    --ci) select=ci; strict=1; shift ;;
    --pending) select=pending; shift ;;
    --list) select=list; shift ;;
    --no-build) build=0; shift ;;
    --timeout) timeout_override=$2; shift 2 ;;
    --append) append=$2; shift 2 ;;
    -v|--verbose) verbose=1; shift ;;
    -h|--help) awk 'NR > 1 && /^#/ {sub(/^# ?/, ""); print; next} NR > 1 {exit}' "$0"; exit 0 ;;
    -*) echo "run.sh: unknown option $1" >&2; exit 2 ;;
    *) names+=("${1%.sh}"); shift ;;
  esac
done

header() { # scenario key -> value of "# vm-KEY: value" in its first lines
  sed -n "1,15s/^# vm-$2: *//p" "$HERE/scenarios/$1.sh" | head -n 1
}
all_scenarios() {
  local f
  for f in "$HERE"/scenarios/*.sh; do
    [ "$(basename "$f")" = lib.sh ] || basename "$f" .sh
  done
}

if [ "$select" = list ]; then
  for s in $(all_scenarios); do
    printf '%-20s %-8s timeout %ss\n' "$s" "$(header "$s" scenario)" "$(header "$s" timeout)"
  done
  exit 0
fi
if [ -n "$select" ]; then
  for s in $(all_scenarios); do
    [ "$(header "$s" scenario)" = "$select" ] && names+=("$s")
  done
fi
[ ${#names[@]} -gt 0 ] || { echo "run.sh: no scenario given (see --help, --list)" >&2; exit 2; }
for s in "${names[@]}"; do
  [ -f "$HERE/scenarios/$s.sh" ] || { echo "run.sh: no scenario $s (have: $(all_scenarios | tr '\n' ' '))" >&2; exit 2; }
done

# The VM cannot run here (no kernel, no qemu): an error in CI, a skip with the reason elsewhere.
cannot_run() {
  if [ "$strict" = 1 ]; then
    echo "test-vm: FAIL: VM scenarios cannot run: $*" >&2
    exit 1
  fi
  echo "test-vm: SKIP: VM scenarios not run: $* (CI=true or --ci makes this an error)"
  exit 0
}

command -v qemu-system-x86_64 >/dev/null ||
  cannot_run "qemu-system-x86_64 is missing (package qemu-system-x86; bash scripts/install-deps.sh --vm)"
if [ "$build" = 1 ]; then
  rc=0
  bash "$HERE/build.sh" || rc=$?
  case "$rc" in
    0) ;;
    77) cannot_run "build.sh could not obtain a kernel or a tool (see above)" ;;
    *) echo "test-vm: FAIL: build.sh failed (exit $rc)" >&2; exit 1 ;;
  esac
fi
for f in vmlinuz initramfs.cpio; do
  [ -f "$OUT/$f" ] || { echo "test-vm: FAIL: $OUT/$f missing (run test-vm/build.sh)" >&2; exit 1; }
done
mkdir -p "$LOGS"

# The console log without the firmware's terminal escapes.
clean_log() { sed -e 's/\x1b\[[0-9;?]*[a-zA-Z]//g' -e 's/\x1bc//g' -e 's/\r$//' "$1"; }

ms_now() { echo $(($(date +%s%N) / 1000000)); }
secs() { printf '%d.%d' $(($1 / 1000)) $(($1 % 1000 / 100)); }

passed=() failed=()
run_one() { # scenario
  local s=$1 log=$LOGS/$1.log timeout token rc=0 qrc=0 start took result tail_pid=""
  timeout=${timeout_override:-$(header "$s" timeout)}
  timeout=${timeout:-600}
  token=$(od -An -tx8 -N8 /dev/urandom | tr -d ' ')
  : >"$log"
  echo "test-vm: $s: booting (timeout ${timeout}s, log $log)"
  [ "$verbose" = 1 ] && { tail -n +1 -f "$log" & tail_pid=$!; }
  start=$(ms_now)
  local boot
  for boot in 1 2 3; do
    qrc=0
    # -no-reboot: a guest panic (panic=-1 reboots at once) ends qemu instead of looping.
    timeout -k 10 $((timeout + BOOT_MARGIN)) \
      qemu-system-x86_64 -accel tcg,thread=multi -cpu max -smp "$SMP" -m "$MEM" \
        -nographic -monitor none -serial "file:$log" -no-reboot -nic none \
        -kernel "$OUT/vmlinuz" -initrd "$OUT/initramfs.cpio" \
        -append "console=ttyS0,115200 panic=-1 quiet blkrep.scenario=$s blkrep.token=$token blkrep.timeout=$timeout${append:+ $append}" \
        </dev/null 2>"$log.qemu" || qrc=$?
    # The guest kernel itself sometimes dies while booting under multi-threaded TCG (an
    # int3 oops in text patching, seen in sched_clock_cpu): the scenario never started,
    # so boot again rather than report it. A crash after the scenario started is a failure.
    if clean_log "$log" | grep -aq "init: running scenario"; then break; fi
    if clean_log "$log" | grep -aq "@@BLKREP-VM-RESULT token=$token"; then break; fi
    [ "$qrc" = 124 ] || [ "$qrc" = 137 ] && break
    [ "$boot" = 3 ] && break
    echo "test-vm: $s: the guest kernel died before the scenario started (boot $boot); booting again"
    clean_log "$log" | grep -a -m1 -E "Oops|Kernel panic|BUG:" | sed 's/^/  | /' || true
    cp "$log" "$log.boot$boot"
    : >"$log"
  done
  took=$(($(ms_now) - start))
  [ -n "$tail_pid" ] && kill "$tail_pid" 2>/dev/null
  result=$(clean_log "$log" | sed -n "s/.*@@BLKREP-VM-RESULT token=$token rc=\([0-9]*\)@@.*/\1/p" | tail -n 1)
  if [ -n "$result" ] && [ "$result" = 0 ]; then
    echo "test-vm: PASS $s ($(secs "$took") s)"
    passed+=("$s")
    return
  fi
  if [ -n "$result" ]; then
    rc="exit $result"
    [ "$result" = 124 ] && rc="TIMEOUT in the guest after ${timeout}s"
  elif [ "$qrc" = 124 ] || [ "$qrc" = 137 ]; then
    rc="TIMEOUT: guest killed after $((timeout + BOOT_MARGIN))s"
  else
    rc="no result marker (guest crashed or panicked? qemu exit $qrc)"
  fi
  echo "test-vm: FAIL $s: $rc ($(secs "$took") s)"
  clean_log "$log" | grep -a '^FAIL' | sed 's/^/  > /' || true
  echo "  last 60 lines of $log:"
  clean_log "$log" | tail -n 60 | sed 's/^/  | /'
  [ -s "$log.qemu" ] && grep -v "TCG doesn't support requested feature" "$log.qemu" | sed 's/^/  qemu: /'
  failed+=("$s")
}

for s in "${names[@]}"; do run_one "$s"; done

echo "test-vm: summary: ${#passed[@]} passed, ${#failed[@]} failed${failed:+ (${failed[*]})}"
[ ${#failed[@]} -eq 0 ]
