#!/usr/bin/env bash
# vm-scenario: bench
# vm-timeout: 3600
#
# The VM benchmark (not a test: never run by --all or CI; `bash test-vm/bench.sh` runs it and
# turns the log into a table). In one guest, on the same two backing devices (loop devices over
# zero-filled tmpfs files, one per site) and the same veth link, fio (libaio, O_DIRECT) runs
# 4k random writes at iodepth 32 and 1 MiB sequential writes at iodepth 8 against:
#   loop          the primary's loop device itself (no replication)
#   blkrep-async  /dev/ublkbN of the primary blkrep node, mode = "async"
#   blkrep-sync   the same, mode = "sync"
#   drbd-A        /dev/drbd0 of the primary, DRBD 8.4 (the kernel's drbd.ko), protocol A
#   drbd-C        the same, protocol C
# interleaved round by round (loop, blkrep-async, ..., drbd-C, loop, ...). Each contender is
# brought up before its jobs and down after them (they share the backings); before each job
# the peer is connected and in sync, after it the replication backlog is drained (timed).
# Each job prints one line `@@BENCH contender=... job=... round=... iops=... ...@@`.
#
# Knobs on the kernel command line (bash test-vm/run.sh --append "bench.rounds=5 ..."):
#   bench.rounds=N     rounds (default 3)
#   bench.runtime=S    measured seconds per job (default 10), after bench.ramp=S (default 2)
#   bench.size=NM      backing and volume size in MiB, e.g. 256M (default)
#   bench.delay=5ms    netem delay on each end of the link (default none)
#   bench.only=a,b     contenders to run (default all five, in the order above)
#
# The link: DRBD 8.4 opens its sockets in the initial network namespace (drbd_receiver.c:
# sock_create_kern(&init_net, ...)), so it cannot run inside the harness's siteA/siteB
# namespaces. Here both sites live in the initial namespace instead, with a veth pair
# vA (10.99.0.1) <-> vB (10.99.0.2) and policy routing that sends locally generated traffic
# for the other site's address out through the pair instead of the loopback device; both
# blkrep daemons and both DRBD minors use that same pair. Each job reports the bytes that
# crossed it, and a replicated job whose data did not cross it fails the run.
source "$(dirname "$0")/lib.sh"

ROUNDS=3 RUNTIME=10 RAMP=2 SIZE_MIB=256 DELAY=""
CONTENDERS="loop blkrep-async blkrep-sync drbd-A drbd-C"
JOBS="4k-randwrite-qd32 1m-write-qd8"
DRBD_PORT=7790
RESULTS=$WORK/results      # fio's JSON output, one file per job

# shellcheck disable=SC2013 # words are wanted
for arg in $(cat /proc/cmdline); do
  case "$arg" in
    bench.rounds=*) ROUNDS=${arg#*=} ;;
    bench.runtime=*) RUNTIME=${arg#*=} ;;
    bench.ramp=*) RAMP=${arg#*=} ;;
    bench.size=*) SIZE_MIB=${arg#*=}; SIZE_MIB=${SIZE_MIB%M} ;;
    bench.delay=*) DELAY=${arg#*=} ;;
    bench.only=*) CONTENDERS=${arg#*=}; CONTENDERS=${CONTENDERS//,/ } ;;
  esac
done
for v in ROUNDS RUNTIME RAMP SIZE_MIB; do
  [[ ${!v} =~ ^[0-9]+$ ]] || fail "bench: $v must be a number, got '${!v}'"
done
for c in $CONTENDERS; do
  case "$c" in loop|blkrep-async|blkrep-sync|drbd-A|drbd-C) ;; *) fail "bench: unknown contender $c" ;; esac
done
SIZE=${SIZE_MIB}M
mkdir -p "$RESULTS"

# Every daemon and tool runs in the initial network namespace (see above): the blkrep command
# without `ip netns exec`. lib.sh's helpers (status_json, promote, wait_in_sync, ...) use blk.
blk() { # node verb args...
  local node=$1; shift
  blkrep --config "$CFG" --node "$node" "$@"
}
# On a failure, DRBD's view too.
eval "lib_$(declare -f show_context)"
show_context() {
  lib_show_context
  echo "-- /proc/drbd"
  sed 's/^/   /' /proc/drbd 2>/dev/null || true
}

# One machine-readable line for the host's bench-report.py, on a line of its own.
report() { printf '\n@@%s@@\n' "$*"; }

# ---- the link ------------------------------------------------------------------------------

sysctl_set() { echo "$2" >"/proc/sys/net/ipv4/conf/$1"; }
setup_link() {
  ip link add vA type veth peer name vB
  ip addr add "${ADDR[siteA]}/32" dev vA
  ip addr add "${ADDR[siteB]}/32" dev vB
  ip link set vA up
  ip link set vB up
  # Packets from one local address to another arrive on vA/vB: accept them (accept_local) and
  # skip the reverse-path check; no ARP needed.
  sysctl_set all/rp_filter 0
  local d
  for d in vA vB; do
    sysctl_set "$d/rp_filter" 0
    sysctl_set "$d/accept_local" 1
  done
  ip neigh replace "${ADDR[siteB]}" lladdr "$(cat /sys/class/net/vB/address)" dev vA nud permanent
  ip neigh replace "${ADDR[siteA]}" lladdr "$(cat /sys/class/net/vA/address)" dev vB nud permanent
  # Locally generated traffic (iif lo) to the other site's address leaves through its veth end;
  # the local table, which would short-cut it through lo, is consulted only after that.
  ip route add "${ADDR[siteB]}/32" dev vA src "${ADDR[siteA]}" table 100
  ip route add "${ADDR[siteA]}/32" dev vB src "${ADDR[siteB]}" table 101
  ip rule add pref 100 iif lo to "${ADDR[siteB]}/32" lookup 100
  ip rule add pref 101 iif lo to "${ADDR[siteA]}/32" lookup 101
  ip rule add pref 1000 lookup local
  ip rule del pref 0 lookup local
  ip route get "${ADDR[siteB]}" from "${ADDR[siteA]}" | grep -q "dev vA" ||
    fail "traffic to siteB does not leave through vA: $(ip route get "${ADDR[siteB]}")"
  local before
  before=$(link_bytes)
  ping -c 3 -q "${ADDR[siteB]}" >/dev/null || fail "siteA cannot reach siteB over vA"
  [ "$(link_bytes)" -gt "$before" ] || fail "pings to siteB did not cross the veth pair"
  if [ -n "$DELAY" ]; then
    for d in vA vB; do tc qdisc replace dev "$d" root netem delay "$DELAY"; done
  fi
  log "link: vA ${ADDR[siteA]} <-> vB ${ADDR[siteB]} in the initial namespace, netem delay ${DELAY:-none}, ping RTT $(ping -c 5 -q "${ADDR[siteB]}" | awk -F/ '/min\/avg\/max/ {print $4}') ms"
}
# Bytes sent on the pair, both directions.
link_bytes() {
  echo $(($(cat /sys/class/net/vA/statistics/tx_bytes) + $(cat /sys/class/net/vB/statistics/tx_bytes)))
}

# ---- backings ------------------------------------------------------------------------------

setup_backings() {
  make_backings "$SIZE"
  local s md
  for s in siteA siteB; do
    # Written once, so that no contender pays for tmpfs allocating pages.
    dd if=/dev/zero of="$WORK/$s.img" bs=1M count="$SIZE_MIB" conv=notrunc 2>/dev/null
    # DRBD's metadata: external, on a loop device of its own (the data device keeps its full
    # size, as blkrep's metadata file does).
    truncate -s 16M "$WORK/$s.drbd-md.img"
    md=$(losetup -f) || fail "no free loop device"
    losetup "$md" "$WORK/$s.drbd-md.img"
    echo "$md" >"$WORK/$s.drbd-md"
  done
  log "backings preconditioned (zeros); DRBD metadata on $(cat "$WORK/siteA.drbd-md") and $(cat "$WORK/siteB.drbd-md")"
}

# ---- contenders ----------------------------------------------------------------------------
# up: bring the contender up on the shared backings and set DEV; ready: true when the peer is
# connected and in sync; drained: true when no replication is outstanding; down.

DEV=""
declare -A MINOR=([siteA]=0 [siteB]=1)
declare -A PEER=([siteA]=siteB [siteB]=siteA)

blkrep_up() { # mode
  MODE=$1 FRONTEND=ublk write_config
  if [ ! -f "$WORK/siteA.md" ]; then
    blk siteA create-md >/dev/null
    blk siteB create-md >/dev/null
  fi
  blk siteA up
  blk siteB up
  promote siteA >/dev/null
  wait_until 900 "siteA and siteB in sync" in_sync siteA
  DEV=$(wait_device siteA)
}
blkrep_down() {
  blk siteA down
  blk siteB down
}

drbd_up() { # protocol
  local s first=0
  if [ ! -e "$WORK/drbd-md-created" ]; then
    for s in siteA siteB; do
      drbdmeta --force "${MINOR[$s]}" v08 "$(cat "$WORK/$s.drbd-md")" flex-external create-md >/dev/null
    done
    first=1
  fi
  for s in siteA siteB; do
    # As `drbdadm up` does: replay the activity log of the last session (else attach refuses
    # with "Found unclean meta data").
    drbdmeta --force "${MINOR[$s]}" v08 "$(cat "$WORK/$s.drbd-md")" flex-external apply-al >/dev/null
    drbdsetup-84 new-resource "r0-$s"
    drbdsetup-84 new-minor "r0-$s" "${MINOR[$s]}" 0
    drbdsetup-84 attach "${MINOR[$s]}" "$(backing "$s")" "$(cat "$WORK/$s.drbd-md")" flexible
    drbdsetup-84 connect "r0-$s" "ipv4:${ADDR[$s]}:$DRBD_PORT" "ipv4:${ADDR[${PEER[$s]}]}:$DRBD_PORT" \
      --protocol="$1"
  done
  wait_until 60 "DRBD minors 0 and 1 connected" drbd_connected
  if [ "$first" = 1 ]; then
    # Fresh metadata on empty devices: skip the initial sync (drbdsetup-8.4(8),
    # new-current-uuid: "Connected Secondary/Secondary Inconsistent/Inconsistent", then
    # new-current-uuid --clear-bitmap on one node gives UpToDate/UpToDate).
    drbdsetup-84 new-current-uuid 0 --clear-bitmap
    touch "$WORK/drbd-md-created"
  fi
  wait_until 900 "DRBD minors 0 and 1 UpToDate/UpToDate" drbd_ready
  drbdsetup-84 primary 0
  assert_eq Primary/Secondary "$(drbdsetup-84 role 0)" "DRBD minor 0 role"
  DEV=/dev/drbd0
  wait_until 10 "$DEV" test -b "$DEV"
}
drbd_connected() {
  [ "$(drbdsetup-84 cstate 0)" = Connected ] && [ "$(drbdsetup-84 cstate 1)" = Connected ]
}
drbd_ready() {
  drbd_connected && [ "$(drbdsetup-84 dstate 0)" = UpToDate/UpToDate ] &&
    [ "$(drbdsetup-84 dstate 1)" = UpToDate/UpToDate ]
}
# No request local, pending at the peer, unacknowledged or waiting, nothing out of sync
# (/proc/drbd counters lo pe ua ap oos of both minors).
drbd_drained() {
  awk '/ ns:/ { for (i = 1; i <= NF; i++) { split($i, kv, ":")
                  if (kv[1] ~ /^(lo|pe|ua|ap|oos)$/ && kv[2] != 0) busy = 1 } }
       END { exit busy }' /proc/drbd
}
drbd_down() {
  drbdsetup-84 secondary 0
  drbdsetup-84 down r0-siteA
  drbdsetup-84 down r0-siteB
}

contender_up() {
  case "$1" in
    loop) DEV=$(backing siteA) ;;
    blkrep-async) blkrep_up async ;;
    blkrep-sync) blkrep_up sync ;;
    drbd-A) drbd_up A ;;
    drbd-C) drbd_up C ;;
  esac
}
contender_ready() {
  case "$1" in
    loop) true ;;
    blkrep-*) in_sync siteA ;;
    drbd-*) drbd_ready && drbd_drained ;;
  esac
}
contender_drained() {
  case "$1" in
    loop) true ;;
    blkrep-*) in_sync siteA ;;
    drbd-*) drbd_drained ;;
  esac
}
contender_down() {
  case "$1" in
    loop) true ;;
    blkrep-*) blkrep_down ;;
    drbd-*) drbd_down ;;
  esac
  DEV=""
}

# ---- where the CPU time goes ---------------------------------------------------------------
# Under TCG the vCPUs are the scarce resource, so each job also reports how busy the guest was
# (in % of one CPU: 200 = both vCPUs saturated) and its busiest threads: blkrepd's event loop
# is the thread named blkrepd (A: the primary's, B: the secondary's), DRBD's kernel threads are
# drbd_w_ (worker, also the sender in 8.4), drbd_r_ (receiver) and drbd_a_ (ack sender) with
# the resource name (r0-siteA: the primary).

cpu_snapshot() { # file: "ALL - - busy total" and "pid tid comm ticks" per thread
  {
    awk '/^cpu / {t = 0; for (i = 2; i <= NF; i++) t += $i; print "ALL - -", t - $5 - $6, t; exit}' /proc/stat
    # grep -H names each file (the pid is in the path) and skips threads that exit meanwhile.
    grep -H '' /proc/[0-9]*/task/[0-9]*/stat 2>/dev/null |
      awk '{split($1, p, "/"); c = $2; gsub(/[()]/, "", c); print p[3], p[5], c, $14 + $15}'
  } >"$1" || true
}
cpu_summary() { # before after seconds -> "busy=N top=label:pct,..."
  local busy top pa pb
  pa=$(daemon_pid siteA 2>/dev/null || true)
  pb=$(daemon_pid siteB 2>/dev/null || true)
  busy=$(awk 'NR == FNR {if ($1 == "ALL") {b = $4; t = $5}; next}
              $1 == "ALL" {printf "%d", ($4 - b) / ($5 - t) * 100 * '"$(nproc)"'}' "$1" "$2")
  top=$(awk -v secs="$3" -v pa="${pa:-x}" -v pb="${pb:-x}" '
          NR == FNR {b[$1 " " $2] = $4; next}
          $1 != "ALL" {
            d = $4 - b[$1 " " $2]; if (d <= 0) next
            l = ($1 == pa ? "A:" : $1 == pb ? "B:" : "") $3
            sum[l] += d
          }
          END {for (l in sum) printf "%d %s\n", sum[l] / secs, l}' "$1" "$2" |
        sort -rn | head -n 4 | awk '{printf "%s%s:%d", (NR > 1 ? "," : ""), $2, $1}')
  echo "busy=$busy top=$top"
}

# ---- jobs ----------------------------------------------------------------------------------

# Sectors written to a block device so far (/sys/block/NAME/stat, field 7): what fio wrote
# including its ramp, which fio's own figures leave out.
dev_written() { awk '{print $7}' "/sys/block/$(basename "$1")/stat"; }

job_args() {
  case "$1" in
    4k-randwrite-qd32) echo "--rw=randwrite --bs=4k --iodepth=32" ;;
    1m-write-qd8) echo "--rw=write --bs=1M --iodepth=8" ;;
  esac
}

run_job() { # round contender job
  local r=$1 c=$2 j=$3 out=$RESULTS/$1-$2-$3.json b0 w0 t0 cpu drain_s link_mib dev_mib line
  wait_until 120 "$c ready (peer connected and in sync) before $j" contender_ready "$c"
  b0=$(link_bytes)
  w0=$(dev_written "$DEV")
  cpu_snapshot "$WORK/cpu0"
  t0=$(now)
  # shellcheck disable=SC2046 # job_args is a list of options
  fio --name="$j" $(job_args "$j") --filename="$DEV" --ioengine=libaio --direct=1 \
    --time_based --runtime="$RUNTIME" --ramp_time="$RAMP" --randrepeat=0 --norandommap \
    --group_reporting --eta=never --output-format=json --output="$out" ||
    fail "fio $j on $c ($DEV) failed: $(tail -n 20 "$out" 2>/dev/null)"
  cpu_snapshot "$WORK/cpu1"
  cpu=$(cpu_summary "$WORK/cpu0" "$WORK/cpu1" "$(awk -v a="$t0" -v b="$(now)" 'BEGIN {print b - a}')")
  assert_eq 0 "$(jq '.jobs[0].error' "$out")" "fio error, $j on $c"
  t0=$(now)
  wait_until 600 "$c drained after $j" contender_drained "$c"
  drain_s=$(awk -v a="$t0" -v b="$(now)" 'BEGIN {printf "%.1f", b - a}')
  link_mib=$(awk -v b="$(($(link_bytes) - b0))" 'BEGIN {printf "%.1f", b / 1048576}')
  dev_mib=$(awk -v s="$(($(dev_written "$DEV") - w0))" 'BEGIN {printf "%.1f", s / 2048}')
  line=$(jq -r --arg c "$c" --arg j "$j" --arg r "$r" --arg l "$link_mib" --arg d "$drain_s" \
    --arg dm "$dev_mib" '
    .jobs[0].write as $w
    | "BENCH contender=\($c) job=\($j) round=\($r)"
      + " iops=\($w.iops | floor) bw_mib=\($w.bw_bytes / 1048576 * 10 | floor / 10)"
      + " p50us=\($w.clat_ns.percentile["50.000000"] / 1000 | floor)"
      + " p99us=\($w.clat_ns.percentile["99.000000"] / 1000 | floor)"
      + " io_mib=\($w.io_bytes / 1048576 | floor) dev_mib=\($dm) link_mib=\($l) drain_s=\($d)"' "$out")
  report "$line $cpu"
  # Replicated data must have crossed the veth pair (not the loopback device).
  if [ "$c" != loop ]; then
    awk -v l="$link_mib" -v w="$dev_mib" 'BEGIN {exit !(l >= w)}' ||
      fail "$c: only $link_mib MiB crossed the veth pair for $dev_mib MiB written to $DEV"
  fi
}

# ---- main ----------------------------------------------------------------------------------

step "setup: ublk_drv, drbd, the link, the backings"
need_ublk
command -v drbdsetup-84 >/dev/null ||
  fail "drbdsetup-84 is not in the image: install drbd-utils on the host (bash scripts/install-deps.sh --vm) and rebuild"
# No user-space helper: this guest has no drbdadm configuration for DRBD to call back into.
modprobe drbd usermode_helper=/usr/bin/true || fail "modprobe drbd failed"
mkdir -p /var/lib/drbd /var/run/drbd /var/lock
setup_link
setup_backings

# Two yardsticks of this guest's speed under TCG: single-threaded blake3 (blkrep checksums every
# replicated byte with it, once on each side) and a plain memory copy.
mibs() { # seconds MiB
  awk -v s="$1" -v m="$2" 'BEGIN {printf "%d", (s > 0 ? m / s : 0)}'
}
t0=$(now)
blkrep-tools hash "$WORK/siteA.img" >/dev/null
B3_MIBS=$(mibs "$(awk -v a="$t0" -v b="$(now)" 'BEGIN {print b - a}')" "$SIZE_MIB")
t0=$(now)
dd if=/dev/zero of=/dev/null bs=1M count=2048 2>/dev/null
COPY_MIBS=$(mibs "$(awk -v a="$t0" -v b="$(now)" 'BEGIN {print b - a}')" 2048)
log "in this guest: blake3 $B3_MIBS MiB/s (blkrep-tools hash of a tmpfs file), memory copy $COPY_MIBS MiB/s (dd)"

report "BENCH-META kernel=$(uname -r) cpus=$(nproc) mem_mib=$(awk '/MemTotal/ {print int($2/1024)}' /proc/meminfo)" \
  "fio=$(fio --version) blkrep=$(blkrep --version | awk '{print $2}')" \
  "drbd=$(awk '/^version:/ {print $2; exit}' /proc/drbd) rounds=$ROUNDS runtime=$RUNTIME ramp=$RAMP" \
  "size_mib=$SIZE_MIB delay=${DELAY:-none} blake3_mibs=$B3_MIBS copy_mibs=$COPY_MIBS contenders=${CONTENDERS// /,} jobs=${JOBS// /,}"

for r in $(seq "$ROUNDS"); do
  for c in $CONTENDERS; do
    step "round $r of $ROUNDS: $c"
    t0=$(now)
    contender_up "$c"
    log "$c: $DEV ready after $(awk -v a="$t0" -v b="$(now)" 'BEGIN {printf "%.1f", b - a}') s"
    for j in $JOBS; do run_job "$r" "$c" "$j"; done
    contender_down "$c"
  done
done
report "BENCH-DONE rounds=$ROUNDS"
