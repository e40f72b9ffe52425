#!/usr/bin/env bash
# vm-scenario: ci
# vm-timeout: 600
#
# A crash of the primary's daemon under load: kill -9 blkrepd on siteA while fio writes (with
# verification) to its ublk device. `blkrep up` takes the very same device over (ublk user
# recovery); the I/O that waited in the kernel completes; fio sees no I/O error and its
# verify pass finds every block it wrote; the kernel logged no error for the device; the
# replica converges to the primary's bytes.
source "$(dirname "$0")/lib.sh"

step "ublk, two sites, a pair with frontend = \"ublk\""
need_ublk
ublk_pair 64M sync
dev=$(wait_device siteA)
devnum=$(stat -c '%t:%T' "$dev")
log "siteA serves $dev ($devnum)"

step "fio random writes with verify on $dev, in the background"
dmesg_before=$(dmesg | wc -l)   # judge only what the kernel logs from here on
fio --name=crash --filename="$dev" --size=48M --rw=randwrite --bsrange=4k-64k \
  --ioengine=libaio --direct=1 --iodepth=16 --verify=crc32c --verify_fatal=1 --do_verify=1 --eta=never \
  --output-format=json --output="$WORK/fio.json" &
fio_pid=$!

written_mib() { field siteA '(.engine.bytes_written // 0) / 1048576 | floor'; }
at_least_8mib() { [ "$(written_mib)" -ge 8 ]; }
wait_until 120 "8 MiB written by fio through siteA" at_least_8mib

step "kill -9 siteA's daemon mid-workload"
pid=$(daemon_pid siteA)
mib=$(written_mib)
kill -9 "$pid"
log "killed blkrepd $pid after $mib MiB"
gone() { # pid: exited (a zombie counts: its files, the ublk char device among them, are closed)
  [ ! -d "/proc/$1" ] || awk '{exit !($3 == "Z")}' "/proc/$1/stat" 2>/dev/null
}
wait_until 10 "blkrepd $pid gone" gone "$pid"
kill -0 "$fio_pid" 2>/dev/null || fail "fio ended when the daemon died (it should wait for recovery)"
[ -b "$dev" ] || fail "$dev vanished with the daemon (user recovery keeps it)"

step "blkrep up recovers the same device"
blk siteA up
assert_eq "$dev" "$(device_of siteA)" "device after recovery"
assert_eq "$devnum" "$(stat -c '%t:%T' "$dev")" "device number after recovery"
# A recovered primary holds the device's I/O until the operator promotes it again.
state=$(field siteA '.device_state // empty')
log "device state after up: ${state:-?}"
if [ "$state" = held ]; then
  promote siteA
fi

step "fio completes without an error, its verify passes"
fio_done() { ! kill -0 "$fio_pid" 2>/dev/null; }
wait_until 300 "fio to finish" fio_done
rc=0; wait "$fio_pid" || rc=$?
[ "$rc" = 0 ] || fail "fio exited with $rc: $(cat "$WORK/fio.json" 2>/dev/null)"
assert_eq 0 "$(jq '.jobs[0].error' "$WORK/fio.json")" "fio job error"
log "fio: $(jq -r '.jobs[0].write.io_kbytes' "$WORK/fio.json") KiB written, $(jq -r '.jobs[0].read.io_kbytes' "$WORK/fio.json") KiB read back and verified"
errors=$(dmesg | tail -n +$((dmesg_before + 1)) | grep -E "dev $(basename "$dev")|$(basename "$dev"):" | grep -i error || true)
assert_eq "" "$errors" "kernel errors logged for $dev"

step "the replica converges"
wait_in_sync siteA 300
assert_replica_equal
assert_eq "$(b3 "$(backing siteA)")" "$(b3 "$dev")" "blake3 through $dev vs siteA's backing"

step "down removes the device"
blk siteA down
blk siteB down
assert_eq "" "$(ublk_devices)" "ublk block devices left after down"
