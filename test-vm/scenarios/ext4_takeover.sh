#!/usr/bin/env bash
# vm-scenario: ci
# vm-timeout: 600
#
# Forced takeover and failback with ext4 on the ublk device. siteA (primary) holds a file
# tree; its daemon is killed (kill -9: the site is lost). siteB takes over with
# `promote --force`, mounts the filesystem, changes and adds files. siteA returns as
# secondary and is resynced from siteB: only the blocks written during the takeover move
# (checked against the volume size). Failback: demote siteB, promote siteA; siteA's device
# passes `e2fsck -fn` and every file matches siteB's checksums.
source "$(dirname "$0")/lib.sh"

step "ublk, two sites, a pair with frontend = \"ublk\""
need_ublk
ublk_pair 128M async
dev_a=$(wait_device siteA)

step "ext4 and a file tree on siteA ($dev_a)"
mkfs.ext4 -q -F "$dev_a"
mkdir -p /mnt/a /mnt/b
mount -t ext4 "$dev_a" /mnt/a
for d in 0 1 2 3; do
  mkdir -p "/mnt/a/dir$d"
  for i in $(seq 1 12); do
    dd if=/dev/urandom of="/mnt/a/dir$d/f$i" bs=4k count=$(((d * 12 + i) % 29 + 1)) 2>/dev/null
  done
done
sync
umount /mnt/a
wait_in_sync siteA
# Let the activity log cool, as it does on an idle primary.
cooled() { [ "$(field siteA .engine.hot_extents)" = 0 ]; }
wait_until 30 "siteA's activity log cooled" cooled
sleep 1

step "siteA is lost: kill -9 its daemon"
pid=$(daemon_pid siteA)
kill -9 "$pid"
gone() { [ ! -d "/proc/$1" ] || awk '{exit !($3 == "Z")}' "/proc/$1/stat" 2>/dev/null; }
wait_until 10 "blkrepd $pid gone" gone "$pid"
not_connected() { [ "$(field siteB .engine.conn)" != connected ]; }
wait_until 30 "siteB notices" not_connected

step "forced takeover at siteB"
out=$(blk siteB promote --force 2>&1) || fail "promote --force on siteB failed: $out"
log "$out"
assert_eq primary "$(field siteB .engine.role)" "siteB role after the takeover"
dev_b=$(wait_device siteB)
e2fsck -fn "$dev_b" || fail "siteB's replica is not a clean filesystem"
mount -t ext4 "$dev_b" /mnt/b
rm -f /mnt/b/dir0/f1 /mnt/b/dir0/f2
for i in $(seq 1 8); do
  dd if=/dev/urandom of="/mnt/b/dir1/f$i" bs=4k count=7 2>/dev/null
  dd if=/dev/urandom of="/mnt/b/new$i" bs=64k count=4 2>/dev/null
done
(cd /mnt/b && find . -type f ! -path './lost+found/*' | sort | xargs sha256sum) >"$WORK/sums"
sync
umount /mnt/b
plan=$(blk siteB failback --plan --json)
log "plan: $(jq -c '{direction, method, bytes}' <<<"$plan")"
assert_eq local_to_peer "$(jq -r .direction <<<"$plan")" "plan direction"

step "siteA returns as secondary and is resynced from siteB"
blk siteA up
assert_eq secondary "$(field siteA .engine.role)" "siteA role after its return"
wait_in_sync siteB 180
moved=$(grep -o 'resync to the peer started: [0-9]*' "$RUN_DIR/$RES-siteB.log" | tail -1 | grep -o '[0-9]*$')
log "resync moved $moved bytes of $((128 << 20))"
[ "$moved" -lt $((32 << 20)) ] || fail "the failback resync moved $moved bytes: not changed blocks only"
assert_eq "$(b3 "$(backing siteB)")" "$(b3 "$(backing siteA)")" "blake3 of the backings after the resync"

step "failback: demote siteB, promote siteA"
demote siteB
promote siteA
dev_a=$(wait_device siteA)
e2fsck -fn "$dev_a" || fail "e2fsck -fn $dev_a reports problems after the failback"
mount -t ext4 "$dev_a" /mnt/a
(cd /mnt/a && sha256sum -c -s "$WORK/sums") || fail "file checksums differ on siteA after the failback"
[ ! -e /mnt/a/dir0/f1 ] || fail "a file deleted during the takeover is back on siteA"
log "ok: $(wc -l <"$WORK/sums") files match on siteA"
umount /mnt/a

step "down"
blk siteA down
blk siteB down
