#!/usr/bin/env bash
# vm-scenario: ci
# vm-timeout: 900
#
# The ublk frontend, end to end on a real kernel:
# - without ublk_drv, `frontend = "ublk"` is a clear error and leaves no daemon behind; an
#   impossible queue depth is refused naming the field;
# - each node serves /dev/ublkbN (status .device); the secondary's device serves reads and
#   refuses writes;
# - fio with verification and mkfs.ext4 + files + e2fsck through the primary's device, the
#   replica bit-exact afterwards;
# - a mounted device cannot be demoted or stopped (device_busy);
# - kill -9 of the secondary's daemon during reads: `blkrep up` takes the quiesced device
#   over and serves the re-issued reads at once, no read fails;
# - kill -9 of the primary's daemon in the middle of a verified fio run: `blkrep up` takes the
#   quiesced device over (I/O held), `blkrep promote` releases it, fio finishes without an
#   error, the kernel logged no I/O error for the device, and the peer gets a full copy;
# - `down` removes every device.
source "$(dirname "$0")/lib.sh"

io_errors() { # device -> count of kernel I/O errors logged for it
  dmesg | grep -c "I/O error, dev $(basename "$1")" || true
}
proc_gone() { # pid: exited (a zombie counts: its files are closed)
  [ ! -d "/proc/$1" ] || awk '{exit !($3 == "Z")}' "/proc/$1/stat" 2>/dev/null
}
device_state() { field "$1" '.device_state // empty'; }

step "without ublk_drv: frontend = \"ublk\" fails clearly, nothing is left"
setup_sites
make_backings 64M
FRONTEND=ublk write_config
blk siteA create-md >/dev/null
blk siteB create-md >/dev/null
[ ! -e /dev/ublk-control ] || fail "ublk_drv is loaded before the scenario loaded it"
expect_failure "blkrep up without ublk_drv" blk siteA up
grep -q "ublk_drv" <<<"$OUT" || fail "the error does not say to load ublk_drv: $OUT"
assert_eq "" "$(pidof blkrepd || true)" "daemons left after the failed up"

step "an impossible queue depth is refused, naming the field"
FRONTEND=ublk RESOURCE_EXTRA='ublk_depth = 5000' write_config
expect_failure "blkrep up with ublk_depth = 5000" blk siteA up
grep -q "resource.ublk_depth" <<<"$OUT" || fail "the error does not name resource.ublk_depth: $OUT"

step "ublk_drv loaded: both daemons up, each serves a device (2 queues, one event loop)"
need_ublk
FRONTEND=ublk RESOURCE_EXTRA='ublk_queues = 2' write_config
blk siteA up
blk siteB up
devA=$(wait_device siteA)
devB=$(wait_device siteB)
[ "$devA" != "$devB" ] || fail "both nodes report the same device $devA"
assert_eq 2 "$(ls "/sys/block/$(basename "$devA")/mq" | wc -l)" "hardware queues of $devA"
assert_eq live "$(device_state siteA)" "siteA's device state"
assert_eq ublk "$(field siteA .frontend)" "siteA's frontend"
blk siteA status | grep -q "device $devA" || fail "human status does not show $devA"
log "siteA serves $devA, siteB serves $devB"

step "siteA primary; siteB's device serves reads and refuses writes"
promote siteA
wait_in_sync siteA 180
blkrep-tools hash "$devB" >/dev/null || fail "reading siteB's device failed"
errs=$(io_errors "$devB")
expect_failure "a direct write to siteB's device" \
  fio --name=refused --filename="$devB" --rw=write --bs=4k --size=4k --direct=1 \
    --ioengine=psync --output=/dev/null
[ "$(io_errors "$devB")" -gt "$errs" ] || fail "no I/O error logged for the refused write"

step "fio with verification through siteA's device"
fio --name=verify --filename="$devA" --ioengine=libaio --direct=1 --iodepth=16 \
  --rw=randwrite --bsrange=4k-128k --size=32M --verify=crc32c --verify_fatal=1 \
  --do_verify=1 --randrepeat=0 --output="$WORK/fio1.txt" ||
  fail "fio verify failed: $(tail -n 20 "$WORK/fio1.txt")"
fio --name=seq --filename="$devA" --ioengine=libaio --direct=1 --iodepth=4 --rw=write \
  --bs=512k --offset=32M --size=16M --verify=md5 --do_verify=1 --output="$WORK/fio2.txt" ||
  fail "fio sequential verify failed: $(tail -n 20 "$WORK/fio2.txt")"
wait_in_sync siteA
assert_replica_equal

step "mkfs.ext4, files, e2fsck; discard reaches the device"
mkfs.ext4 -q -F "$devA"
mkdir -p /mnt/a
mount "$devA" /mnt/a
for i in 1 2 3 4; do
  head -c $((3 * 1024 * 1024 + i * 4096)) /dev/urandom >"/mnt/a/f$i"
done
(cd /mnt/a && sha256sum f1 f2 f3 f4 >"$WORK/files.sha")
rm /mnt/a/f4
fstrim -v /mnt/a || log "fstrim not available"
sync
umount /mnt/a
e2fsck -fn "$devA" || fail "e2fsck found errors on $devA"
mount -o ro "$devA" /mnt/a
(cd /mnt/a && grep -v ' f4$' "$WORK/files.sha" | sha256sum -c -) || fail "files read back differ"
umount /mnt/a
wait_in_sync siteA
assert_replica_equal

step "a mounted device can be neither demoted nor stopped"
mount "$devA" /mnt/a
expect_failure "demote while mounted" blk siteA demote
grep -q device_busy <<<"$OUT" || fail "demote refusal is not device_busy: $OUT"
expect_failure "down while mounted" blk siteA down
grep -q device_busy <<<"$OUT" || fail "down refusal is not device_busy: $OUT"
assert_eq primary "$(field siteA .engine.role)" "siteA's role after the refusals"
umount /mnt/a

step "kill -9 of the secondary's daemon during reads: recovered at once, no read fails"
errs=$(io_errors "$devB")
fio --name=reads --filename="$devB" --ioengine=libaio --direct=1 --iodepth=8 \
  --rw=randread --bsrange=4k-64k --size=48M --time_based --runtime=15 \
  --output="$WORK/fio-reads.txt" &
fio_pid=$!
reads_before=$(field siteB .engine.client_reads)
reading() { [ "$(field siteB .engine.client_reads)" -gt $((reads_before + 100)) ]; }
wait_until 60 "fio reads through siteB's device" reading
pid=$(daemon_pid siteB)
kill -9 "$pid"
wait_until 10 "blkrepd $pid exits" proc_gone "$pid"
log "killed blkrepd $pid (siteB, secondary) with fio reading"
blk siteB up
assert_eq "$devB" "$(device_of siteB)" "siteB's device after recovery"
assert_eq live "$(device_state siteB)" "siteB's device state after recovery"
wait "$fio_pid" || fail "fio reads failed across the crash: $(tail -n 20 "$WORK/fio-reads.txt")"
assert_eq "$errs" "$(io_errors "$devB")" "kernel I/O errors logged for $devB across the crash"
wait_until 30 "siteB reconnected" connected siteB

# Today's engine refuses to promote a restarted crashed primary while its peer has applied
# more than the primary's last persisted sequence (a primary persists it on role changes
# only), so the crash below happens during a link outage, right after a demote/promote
# round persisted the sequence: the peer then holds nothing newer.
step "kill -9 of the primary's daemon during a verified fio run (link down)"
wait_in_sync siteA
demote siteA
promote siteA
link_cut
disconnected() { ! connected "$1"; }
wait_until 30 "siteA notices the link is gone" disconnected siteA
errs=$(io_errors "$devA")
fio --name=crash --filename="$devA" --ioengine=libaio --direct=1 --iodepth=8 \
  --rw=randwrite --bsrange=4k-64k --size=24M --verify=crc32c --verify_fatal=1 \
  --do_verify=1 --randrepeat=0 --output="$WORK/fio3.txt" &
fio_pid=$!
writes_before=$(field siteA .engine.client_writes)
writing() { [ "$(field siteA .engine.client_writes)" -gt $((writes_before + 200)) ]; }
wait_until 60 "fio writes through siteA's device" writing
pid=$(daemon_pid siteA)
kill -9 "$pid"
wait_until 10 "blkrepd $pid exits" proc_gone "$pid"
log "killed blkrepd $pid (siteA, primary) with fio writing"
blk siteA up | tee "$WORK/up.txt"
grep -q "waits until this node is promoted" "$WORK/up.txt" || fail "up does not say the I/O is held"
assert_eq "$devA" "$(device_of siteA)" "siteA's device after recovery"
assert_eq held "$(device_state siteA)" "siteA's device state before promote"
kill -0 "$fio_pid" || fail "fio ended while the device was held"
link_restore
promote siteA
assert_eq live "$(device_state siteA)" "siteA's device state after promote"
wait "$fio_pid" || fail "fio failed across the crash: $(tail -n 20 "$WORK/fio3.txt")"
assert_eq "$errs" "$(io_errors "$devA")" "kernel I/O errors logged for $devA across the crash"
grep -q "err= 0" "$WORK/fio3.txt" || fail "fio reports errors: $(grep err= "$WORK/fio3.txt")"
wait_in_sync siteA 240
assert_replica_equal

step "down removes the devices"
blk siteA down
blk siteB down
assert_eq "" "$(ublk_devices)" "ublk block devices left"
assert_eq "" "$(ls "$RUN_DIR"/*.ublk 2>/dev/null || true)" "device records left"
assert_eq "" "$(pidof blkrepd || true)" "blkrepd processes left"
