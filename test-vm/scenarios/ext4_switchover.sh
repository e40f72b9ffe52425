#!/usr/bin/env bash
# vm-scenario: ci
# vm-timeout: 600
#
# ext4 on the ublk device across a planned switchover. siteA (primary) serves /dev/ublkbN;
# mkfs.ext4, a tree of files and a fio verify workload go onto it; after sync the replica's
# bytes equal the primary's (blake3). Then demote siteA, promote siteB: siteB's device passes
# `e2fsck -fn`, every file's checksum matches, and fio's verify-only pass finds its data.
source "$(dirname "$0")/lib.sh"

FIO_JOB=(--name=ext4verify --filename=fio.dat --size=16M --rw=randwrite --bs=4k
         --ioengine=libaio --direct=1 --iodepth=8 --verify=crc32c --verify_fatal=1 --eta=never)

step "ublk, two sites, a pair with frontend = \"ublk\""
need_ublk
ublk_pair 64M sync
dev_a=$(wait_device siteA)
log "siteA serves $dev_a"

step "mkfs.ext4, a file tree and a fio verify workload on $dev_a"
mkfs.ext4 -q -F "$dev_a"
mkdir -p /mnt/a
mount -t ext4 "$dev_a" /mnt/a
for d in 0 1 2 3 4; do
  mkdir -p "/mnt/a/dir$d/sub"
  for i in $(seq 1 10); do
    dd if=/dev/urandom of="/mnt/a/dir$d/f$i" bs=4k count=$(((d * 10 + i) % 37 + 1)) 2>/dev/null
    dd if=/dev/urandom of="/mnt/a/dir$d/sub/s$i" bs=1000 count=$((i % 7 + 1)) 2>/dev/null
  done
done
(cd /mnt/a && fio "${FIO_JOB[@]}" --do_verify=1 --output-format=json --output="$WORK/fio-a.json") ||
  fail "fio on siteA failed: $(cat "$WORK/fio-a.json" 2>/dev/null)"
assert_eq 0 "$(jq '.jobs[0].error' "$WORK/fio-a.json")" "fio error on siteA"
(cd /mnt/a && find . -type f ! -name fio.dat | sort | xargs sha256sum) >"$WORK/sums"
log "$(wc -l <"$WORK/sums") files, $(du -sk /mnt/a | cut -f1) KiB on the filesystem"
sync
umount /mnt/a

step "the replica holds the same bytes"
wait_in_sync siteA
h_a=$(b3 "$(backing siteA)")
assert_eq "$h_a" "$(b3 "$(backing siteB)")" "blake3 of siteB's backing vs siteA's"
assert_eq "$h_a" "$(b3 "$dev_a")" "blake3 read through $dev_a vs siteA's backing"

step "planned switchover: demote siteA, promote siteB"
demote siteA
promote siteB
dev_b=$(wait_device siteB)
log "siteB serves $dev_b"

step "siteB's filesystem is clean and holds the data"
e2fsck -fn "$dev_b" || fail "e2fsck -fn $dev_b reports problems"
mkdir -p /mnt/b
mount -t ext4 "$dev_b" /mnt/b
(cd /mnt/b && sha256sum -c -s "$WORK/sums") || fail "file checksums differ on siteB"
log "ok: $(wc -l <"$WORK/sums") file checksums match on siteB"
(cd /mnt/b && fio "${FIO_JOB[@]}" --verify_only --output-format=json --output="$WORK/fio-b.json") ||
  fail "fio verify-only on siteB failed: $(cat "$WORK/fio-b.json" 2>/dev/null)"
assert_eq 0 "$(jq '.jobs[0].error' "$WORK/fio-b.json")" "fio verify error on siteB"
umount /mnt/b

step "down removes the devices"
blk siteA down
blk siteB down
assert_eq "" "$(ublk_devices)" "ublk block devices left after down"
assert_eq "" "$(pidof blkrepd || true)" "blkrepd processes left"
