#!/usr/bin/env bash
# vm-scenario: ci
# vm-timeout: 600
#
# A resync interrupted by a cut of the replication link resumes where it was. siteB is
# stopped while siteA writes 16 MiB; the small ship queue overflows, so the blocks go to
# the dirty set. siteB returns and gets a rate-limited resync (8 MiB/s); the link is cut
# (ip link down between the namespaces) half-way, both sides notice, the link comes back:
# the second resync moves less than the first, and the backings end equal.
source "$(dirname "$0")/lib.sh"

step "ublk pair, resync_rate 8M, queue_limit 1M"
need_ublk
setup_sites
make_backings 64M
RESOURCE_EXTRA=$'resync_rate = "8M"\nqueue_limit = "1M"' FRONTEND=ublk MODE=async SIZE=64M write_config
pair_up
promote siteA
wait_in_sync siteA 300
dev_a=$(wait_device siteA)

step "siteB away while siteA writes 16 MiB"
blk siteB down
dd if=/dev/urandom of="$dev_a" bs=1M count=16 seek=8 oflag=direct status=none
sync
log "siteA: $(field siteA .engine.out_of_sync_bytes) bytes in the dirty set"

step "siteB returns: a resync of the changed blocks, cut half-way"
blk siteB up
resyncing() { [ "$(field siteA '.engine.resync.done_bytes // 0')" -ge $((10 << 20)) ]; }
wait_until 60 "siteA's resync past 10 MiB (a checkpoint on siteB made part of it durable)" resyncing
total1=$(field siteA .engine.resync.total_bytes)
resyncs() { grep -o 'resync to the peer started: [0-9]*' "$RUN_DIR/$RES-siteA.log" | grep -o '[0-9]*$'; }
n1=$(resyncs | wc -l)
link_cut
down_seen() { [ "$(field siteA .engine.conn)" != sync_source ] && [ "$(field siteA .engine.conn)" != connected ]; }
wait_until 30 "siteA notices the cut" down_seen
left=$(field siteA .engine.out_of_sync_bytes)
log "cut: resync of $total1 bytes interrupted, $left bytes left"
link_restore

step "the resync resumes with what is left"
restarted() { [ "$(resyncs | wc -l)" -gt "$n1" ]; }
wait_until 60 "a new resync" restarted
total2=$(resyncs | tail -1)
log "second resync: $total2 bytes (first: $total1)"
[ "$total2" -lt "$total1" ] || fail "the resync started over after the link cut: $total2 of $total1"
wait_in_sync siteA 120
blk siteA down
blk siteB down
assert_eq "$(b3 "$(backing siteA)")" "$(b3 "$(backing siteB)")" "blake3 of the backings"
