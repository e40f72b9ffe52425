#!/usr/bin/env bash
# vm-scenario: ci
# vm-timeout: 600
#
# Local legs (node.mirror, issue 7) on a real kernel, ublk frontend. siteA's two legs are
# device-mapper devices over loop devices, so a leg can be failed live by swapping its table
# for dm-error, or hung by suspending it. The first start rebuilds leg 1 in full. With ext4
# on /dev/ublkbN:
# * leg 1 fails (dm-error) under a verified fio write run: fio sees no error, the kernel logs
#   none for the ublk device or ext4, status says local = degraded and leg 1 failed, the
#   degraded_leg alert is raised and a `leg` event logged. Leg 1 comes back with its stale
#   data: `blkrep leg attach` copies only what it missed (checked against fio's file size
#   and the volume), the alert clears;
# * leg 0 fails (dm-error) under reads: fio's verify pass is served by leg 1; writes go on;
#   attach leg 0 copies what it missed from leg 1;
# * leg 1 hangs (suspended) under writes: after leg_timeout it is failed and the writes
#   complete; attach is refused while its requests hang, works once they are answered;
# * leg 1 detached, writes, a clean restart of siteA: the state file keeps it detached with
#   what it lacks; attach copies only that;
# * leg 1 dies (dm-error) and `blkrep leg replace` puts a new device in its place: a full
#   rebuild, online; the old device is released;
# * e2fsck -fn clean, both legs and siteB's backing byte-equal (blake3), files intact;
# * both legs fail: the volume fails cleanly (the client gets an I/O error, local = failed).
source "$(dirname "$0")/lib.sh"

SIZE=256M
BYTES=$((256 << 20))
FIO_SIZE_MIB=48
RATE_MIB=64   # rebuild_rate: a full rebuild of the volume takes at least SIZE / RATE - 1 s
MNT=/mnt/x

step "device-mapper legs on siteA, a ublk pair with siteA mirrored"
need_ublk
load_module dm_mod
setup_sites
make_backings $SIZE
truncate -s $SIZE "$WORK/siteA-leg1.img"
leg1_loop=$(losetup -f)
losetup "$leg1_loop" "$WORK/siteA-leg1.img"
dm_linear leg0 "$(backing siteA)"
dm_linear leg1 "$leg1_loop"
SECTORS=$(dm_sectors /dev/mapper/leg0)
LINEAR0="0 $SECTORS linear $(backing siteA) 0"
LINEAR1="0 $SECTORS linear $leg1_loop 0"
ERROR="0 $SECTORS error"
use_backing siteA /dev/mapper/leg0
log "siteA: leg 0 /dev/mapper/leg0 ($LINEAR0), leg 1 /dev/mapper/leg1 ($LINEAR1)"
FRONTEND=ublk MODE=sync SIZE=$SIZE write_config
node_config siteA 'mirror = "/dev/mapper/leg1"' 'leg_timeout = 2.0' \
  'read_policy = "balanced"' "rebuild_rate = \"${RATE_MIB}M\""
pair_up
promote siteA
wait_in_sync siteA 180
[ "$(field siteA '.legs | length')" = 2 ] ||
  fail "siteA's status has no two legs (.legs): $(field siteA '{local, legs}' | jq -c .)"
wait_leg siteA 1 healthy 180
assert_eq healthy "$(field siteA .local)" "siteA local after the first start"
first=$(leg siteA 1 .last_rebuild)
log "first start: leg 1 rebuilt $(jq -c . <<<"$first")"
assert_eq true "$(jq -r .full <<<"$first")" "the first start's rebuild of leg 1 is full"
assert_eq 1 "$(field siteB '.legs | length')" "siteB's legs (no mirror)"
dev=$(wait_device siteA)
dmesg_before=$(dmesg | wc -l)
# Kernel errors for the ublk device (and ext4 on it) since the scenario's I/O began: there
# must be none while a leg is left. Errors of the dm legs themselves are expected.
ublk_errors() {
  dmesg | tail -n +$((dmesg_before + 1)) |
    grep -iE "$(basename "$dev").*error|error.*$(basename "$dev")|EXT4-fs error" || true
}
lacks() { leg siteA "$1" .lacks_bytes; }
degraded_alert() { field siteA '.alerts[] | select(.name == "degraded_leg") | .message'; }
no_degraded_alert() { [ -z "$(degraded_alert)" ]; }
mib() { echo "$(($1 >> 20)) MiB"; }
# One fio job (the same offsets and sizes each run: --verify_only replays the writes as reads).
fio_verify() { # output name, then more fio options
  local name=$1; shift
  fio --name=legs --filename="$MNT/fio.dat" --size=${FIO_SIZE_MIB}M --bsrange=4k-64k \
    --ioengine=libaio --direct=1 --iodepth=16 --verify=crc32c --verify_fatal=1 --eta=never \
    --output-format=json --output="$WORK/$name.json" "$@"
}
fio_ok() { # name rc
  [ "$2" = 0 ] || fail "fio $1 exited with $2: $(cat "$WORK/$1.json" 2>/dev/null)"
  assert_eq 0 "$(jq '.jobs[0].error' "$WORK/$1.json")" "fio $1 job error"
  log "fio $1: $(jq -r '.jobs[0].read.io_kbytes' "$WORK/$1.json") KiB read back and verified"
}

step "ext4 on $dev, verified fio writes; leg 1 fails (dm-error) in the middle"
mkfs.ext4 -q -F -E lazy_itable_init=0,lazy_journal_init=0,nodiscard "$dev"
mkdir -p $MNT
mount -t ext4 "$dev" $MNT
written() { field siteA '.engine.bytes_written // 0'; }
w0=$(written)
fio_verify write --rw=randwrite --do_verify=1 &
fio_pid=$!
wrote_8mib() { [ $(($(written) - w0)) -ge $((8 << 20)) ]; }
wait_until 120 "8 MiB written by fio" wrote_8mib
kill -0 "$fio_pid" 2>/dev/null || fail "fio ended before leg 1 was failed (make it longer)"
dm_table leg1 "$ERROR"
wait_leg siteA 1 failed 30
w_failed=$(written)
assert_eq degraded "$(field siteA .local)" "siteA local with leg 1 failed"
assert_eq healthy "$(leg siteA 0 .state)" "leg 0 with leg 1 failed"
rc=0; wait "$fio_pid" || rc=$?
fio_ok write "$rc"
w_end=$(written)
log "written while leg 1 was failed: $(mib $((w_end - w_failed))) (engine bytes_written), leg 1 lacks $(mib "$(lacks 1)")"
[ $((w_end - w_failed)) -ge $((4 << 20)) ] ||
  fail "fio wrote only $((w_end - w_failed)) bytes after leg 1 failed: the workload did not overlap the failure"
assert_eq "" "$(ublk_errors)" "kernel errors for $dev (or its ext4) with leg 1 failed"
alert=$(degraded_alert)
[ -n "$alert" ] || fail "no degraded_leg alert with leg 1 failed: $(field siteA .alerts | jq -c .)"
log "ok: alert degraded_leg: $alert"
leg_events=$(blk siteA events --kind leg 2>&1) || fail "blkrep events --kind leg failed: $leg_events"
grep -q 'leg 1 .* failed' <<<"$leg_events" || fail "no leg event says leg 1 failed:"$'\n'"$leg_events"
log "ok: leg event: $(grep 'leg 1 .* failed' <<<"$leg_events" | tail -n 1)"

step "leg 1 returns with stale data (linear again): attach rebuilds only what it missed"
dm_table leg1 "$LINEAR1"
lacked=$(lacks 1)
[ "$lacked" -gt 0 ] || fail "leg 1 lacks nothing after writes while it was failed"
out=$(blk siteA leg attach --leg 1 --json 2>&1) || fail "blkrep leg attach --leg 1 failed: $out"
log "attach: $(tail -n 1 <<<"$out")"
assert_eq healthy "$(tail -n 1 <<<"$out" | jq -r .state)" "leg 1 state in attach's answer"
assert_eq healthy "$(leg siteA 1 .state)" "leg 1 state after attach"
assert_eq healthy "$(field siteA .local)" "siteA local after attach"
rebuilt=$(leg siteA 1 .last_rebuild)
copied=$(jq -r .copied_bytes <<<"$rebuilt")
log "rebuild of leg 1: $(jq -c . <<<"$rebuilt"); it lacked $(mib "$lacked")"
assert_eq false "$(jq -r .full <<<"$rebuilt")" "leg 1 rebuild's .full"
[ "$copied" -ge "$lacked" ] || fail "the rebuild copied $copied bytes, less than the $lacked leg 1 lacked"
[ "$copied" -le $(((FIO_SIZE_MIB + 64) << 20)) ] ||
  fail "the rebuild copied $(mib "$copied"): more than fio's file + 64 MiB, not only what leg 1 missed"
[ "$copied" -lt $((BYTES / 2)) ] || fail "the rebuild copied $(mib "$copied") of $(mib $BYTES): a full copy"
log "ok: leg 1 rebuild copied $(mib "$copied") of $(mib $BYTES)"
wait_until 30 "the degraded_leg alert cleared" no_degraded_alert
log "ok: degraded_leg cleared"

step "leg 0 fails (dm-error) under reads: fio's verify pass is served by leg 1"
echo 3 >/proc/sys/vm/drop_caches
dm_table leg0 "$ERROR"
rc=0; fio_verify reread --rw=randwrite --verify_only || rc=$?
fio_ok reread "$rc"
wait_leg siteA 0 failed 30
assert_eq healthy "$(leg siteA 1 .state)" "leg 1 with leg 0 failed"
assert_eq degraded "$(field siteA .local)" "siteA local with leg 0 failed"
for i in $(seq 1 8); do
  dd if=/dev/urandom of="$MNT/d$i" bs=64k count=16 2>/dev/null
done
sync
(cd $MNT && sha256sum d*) >"$WORK/sums"
log "8 MiB of files written with leg 0 failed; leg 0 lacks $(mib "$(lacks 0)")"
assert_eq "" "$(ublk_errors)" "kernel errors for $dev (or its ext4) with leg 0 failed"
dm_table leg0 "$LINEAR0"
out=$(blk siteA leg attach --leg 0 --json 2>&1) || fail "blkrep leg attach --leg 0 failed: $out"
rebuilt=$(leg siteA 0 .last_rebuild)
log "rebuild of leg 0: $(jq -c . <<<"$rebuilt")"
assert_eq 1 "$(jq -r .source <<<"$rebuilt")" "leg 0 rebuilt from leg"
[ "$(jq -r .copied_bytes <<<"$rebuilt")" -lt $((64 << 20)) ] ||
  fail "the rebuild of leg 0 copied $(jq -r .copied_bytes <<<"$rebuilt") bytes: not only what it missed"
assert_eq healthy "$(field siteA .local)" "siteA local after attach of leg 0"

step "leg 1 hangs (suspended) under writes: after leg_timeout it is failed, the writes complete"
dm suspend leg1
log "dm: leg1 suspended (its I/O waits)"
t0=$(now)
for i in $(seq 1 4); do
  dd if=/dev/urandom of="$MNT/h$i" bs=64k count=16 conv=fsync 2>/dev/null ||
    fail "a write to $MNT/h$i failed with leg 1 hung"
done
log "4 MiB written and fsync'd with leg 1 hung, in $(awk -v a="$t0" -v b="$(now)" 'BEGIN {print b - a}') s"
wait_leg siteA 1 failed 30
[ "$(leg siteA 1 .inflight)" -gt 0 ] || fail "leg 1 is hung but status shows no request in flight"
(cd $MNT && sha256sum d* h*) >"$WORK/sums"
expect_failure "attach of leg 1 with its requests still hung" blk siteA leg attach --leg 1 --no-wait
dm resume leg1
log "dm: leg1 resumed (its held requests complete)"
no_inflight() { [ "$(leg siteA 1 .inflight)" = 0 ]; }
wait_until 30 "leg 1's hung requests answered" no_inflight
out=$(blk siteA leg attach --leg 1 --json 2>&1) || fail "blkrep leg attach --leg 1 (after the hang) failed: $out"
log "rebuild of leg 1: $(leg siteA 1 .last_rebuild | jq -c .)"
assert_eq healthy "$(field siteA .local)" "siteA local after the hang and attach"
assert_eq "" "$(ublk_errors)" "kernel errors for $dev (or its ext4) with leg 1 hung"

step "leg 1 detached, writes, a restart of siteA: the state file keeps it out and what it lacks"
out=$(blk siteA leg detach --leg 1 2>&1) || fail "blkrep leg detach --leg 1 failed: $out"
log "detach: $out"
wait_leg siteA 1 detached 10
expect_failure "detach of the last healthy leg" blk siteA leg detach --leg 0
for i in $(seq 1 4); do
  dd if=/dev/urandom of="$MNT/r$i" bs=64k count=16 2>/dev/null
done
umount $MNT
lacked=$(lacks 1)
log "4 MiB of files written with leg 1 detached; it lacks $(mib "$lacked")"
blk siteA down
blk siteA up
promote siteA
wait_in_sync siteA 120
assert_eq detached "$(leg siteA 1 .state)" "leg 1 after the restart"
assert_eq degraded "$(field siteA .local)" "siteA local after the restart"
[ "$(lacks 1)" -ge "$lacked" ] ||
  fail "leg 1 lacks $(lacks 1) bytes after the restart, $lacked before: the state file lost writes"
out=$(blk siteA leg attach --leg 1 --json 2>&1) || fail "blkrep leg attach --leg 1 (after the restart) failed: $out"
rebuilt=$(leg siteA 1 .last_rebuild)
log "rebuild of leg 1: $(jq -c . <<<"$rebuilt")"
[ "$(jq -r .copied_bytes <<<"$rebuilt")" -lt $((32 << 20)) ] ||
  fail "the rebuild of leg 1 after the restart copied $(jq -r .copied_bytes <<<"$rebuilt") bytes: not only what it missed"
dev=$(wait_device siteA)
mount -t ext4 "$dev" $MNT
(cd $MNT && sha256sum d* h* r*) >"$WORK/sums"

step "leg 1 dies (dm-error) and is replaced by a new device: rebuilt in full, online"
dm_table leg1 "$ERROR"
dd if=/dev/urandom of="$MNT/x1" bs=64k count=16 conv=fsync 2>/dev/null ||
  fail "a write failed with leg 1 dead"
wait_leg siteA 1 failed 30
(cd $MNT && sha256sum d* h* r* x*) >"$WORK/sums"
truncate -s $SIZE "$WORK/siteA-leg2.img"
leg2_loop=$(losetup -f)
losetup "$leg2_loop" "$WORK/siteA-leg2.img"
dm_linear leg2 "$leg2_loop"
out=$(blk siteA leg replace --leg 1 --path /dev/mapper/leg2 --json 2>&1) ||
  fail "blkrep leg replace --leg 1 failed: $out"
rebuilt=$(leg siteA 1 .last_rebuild)
log "rebuild of leg 1 (new device): $(jq -c . <<<"$rebuilt")"
assert_eq /dev/mapper/leg2 "$(leg siteA 1 .path)" "leg 1's path after replace"
assert_eq true "$(jq -r .full <<<"$rebuilt")" "the replace's rebuild is full"
assert_eq "$BYTES" "$(jq -r .copied_bytes <<<"$rebuilt")" "bytes copied onto the new device"
# The rate limit holds (it lets at most one second's worth go at once).
jq -e --argjson min $((BYTES / (RATE_MIB << 20) - 1)) '.seconds >= $min' <<<"$rebuilt" >/dev/null ||
  fail "the full rebuild took $(jq .seconds <<<"$rebuilt") s: faster than rebuild_rate = ${RATE_MIB}M allows"
assert_eq healthy "$(field siteA .local)" "siteA local after replace"
# The daemon let go of the old device: it can be removed (and its memory freed).
dm remove leg1 || fail "dmsetup remove leg1 failed: the daemon still holds the replaced device"
losetup -d "$leg1_loop"
rm -f "$WORK/siteA-leg1.img"

step "e2fsck clean; both legs and siteB's backing hold the same bytes"
umount $MNT
e2fsck -fn "$dev" || fail "e2fsck -fn $dev reports problems"
wait_in_sync siteA 180
h0=$(b3 /dev/mapper/leg0)
assert_eq "$h0" "$(b3 /dev/mapper/leg2)" "blake3 of leg 1 (leg2) vs leg 0"
assert_eq "$h0" "$(b3 "$(backing siteB)")" "blake3 of siteB's backing vs siteA's leg 0"
mount -t ext4 -o ro "$dev" $MNT
(cd $MNT && sha256sum -c -s "$WORK/sums") || fail "files written while a leg was out differ"
umount $MNT

step "both legs fail: the volume fails cleanly (I/O error to the client)"
dm_table leg2 "$ERROR"
dm_table leg0 "$ERROR"
if dd if=/dev/urandom of="$dev" bs=4k count=1 seek=1000 oflag=direct 2>"$WORK/dd.err"; then
  fail "a write to $dev succeeded with both legs failed"
fi
log "ok: the write failed: $(tr '\n' ' ' <"$WORK/dd.err")"
local_failed() { [ "$(field siteA .local)" = failed ]; }
wait_until 30 "siteA local = failed" local_failed
log "status: $(field siteA '{local, legs: [.legs[] | {index, state, reason}], disk: .engine.disk_state}' | jq -c .)"
kill -0 "$(daemon_pid siteA)" || fail "siteA's daemon is gone"
log "siteA's leg and alert events:"$'\n'"$(blk siteA events --kind leg; blk siteA events --kind alert)"
