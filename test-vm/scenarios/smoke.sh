#!/usr/bin/env bash
# vm-scenario: ci
# vm-timeout: 420
#
# Smoke: proves the harness end to end with what blkrep has today (the NBD frontend).
# ublk_drv loads on this kernel; a pair runs across the two network namespaces over a veth
# with netem delay; writes through the primary's NBD export reach the replica bit-exact and in
# order (write-order log); the secondary's export refuses writes; a link cut is survived and
# caught up; a planned switchover keeps every byte; `down` stops both daemons.
source "$(dirname "$0")/lib.sh"

step "ublk_drv loads, /dev/ublk-control appears"
need_ublk

step "two sites; 5 ms netem delay each way"
setup_sites
before=$(rtt_ms 3)
netem delay 5ms
after=$(rtt_ms 3)
log "ping RTT siteA -> siteB: ${before} ms without netem, ${after} ms with"
awk -v r="$after" 'BEGIN {exit !(r >= 10)}' || fail "netem delay not in effect (RTT ${after} ms, want >= 10)"

step "config, metadata, both daemons up, siteA primary (initial full sync)"
make_backings 64M
MODE=sync SIZE=64M write_config
# Once the config knows `frontend`, ask for the NBD export explicitly: this scenario is about
# NBD, whatever the default becomes.
if config_knows_frontend; then
  FRONTEND=nbd MODE=sync SIZE=64M write_config
  log "config: frontend = \"nbd\""
fi
pair_up
promote siteA
wait_in_sync siteA 180

step "random writes through siteA's NBD export (sync mode)"
in_site siteA blkrep-tools workload --uri "$(nbd_uri siteA)" --seed 1 --ops 3000 --qd 8 \
  --max-io 128K --log "$WORK/w1.log"
wait_in_sync siteA
assert_replica_equal
blkrep-tools verify --image "$(backing siteB)" --log "$WORK/w1.log" || fail "replica does not match the write-order log"

step "the secondary's export refuses writes"
expect_failure "a write through siteB's export" \
  in_site siteB blkrep-tools workload --uri "$(nbd_uri siteB)" --seed 9 --ops 10 --qd 1

step "link cut: writes go on locally, the replica catches up when the link returns"
link_cut
disconnected() { ! connected "$1"; }
wait_until 30 "siteA notices the link is gone" disconnected siteA
in_site siteA blkrep-tools workload --uri "$(nbd_uri siteA)" --seed 2 --ops 1000 --qd 8 \
  --max-io 128K --log "$WORK/w2.log"
lag=$(field siteA .engine.lag_items)
[ "$lag" -gt 0 ] || fail "no writes queued for the peer during the cut (lag_items $lag)"
log "ok: $lag writes queued for the peer while cut"
link_restore
wait_in_sync siteA 120
assert_replica_equal
blkrep-tools verify --image "$(backing siteB)" --log "$WORK/w2.log" || fail "replica does not match the write-order log after the cut"

step "planned switchover: demote siteA, promote siteB, write there"
demote siteA
promote siteB
in_site siteB blkrep-tools workload --uri "$(nbd_uri siteB)" --seed 3 --ops 1000 --qd 8 \
  --max-io 128K --log "$WORK/w3.log"
wait_in_sync siteB
assert_replica_equal
blkrep-tools verify --image "$(backing siteA)" --log "$WORK/w3.log" || fail "siteA does not match siteB's writes"

step "down"
blk siteA down
blk siteB down
rc=0; blk siteA status >/dev/null 2>&1 || rc=$?
assert_eq 3 "$rc" "blkrep status exit code after down (3 = not running)"
assert_eq "" "$(pidof blkrepd || true)" "blkrepd processes left"
