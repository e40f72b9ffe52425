#!/usr/bin/env bash
# vm-scenario: ci
# vm-timeout: 720
#
# A WAN-like link and an outage under load: fio writes to /dev/ublkb0 on siteA (async,
# TLS) while the link has netem delay 50 ms and 1% loss on each end; mid-run the link goes
# down for 10 s and comes back. The writer is paced below what such a link carries. Client writes never stop; shipping resumes where the
# secondary stopped (no resync); after fio ends the pair converges, `blkrep verify` finds
# no block that differs, and the backings are equal.
source "$(dirname "$0")/lib.sh"

step "ublk pair over a 50 ms / 1% loss link, async, TLS"
need_ublk
setup_sites
make_backings 64M
RESOURCE_EXTRA='queue_limit = "256M"' FRONTEND=ublk MODE=async SIZE=64M write_config
grep -q '^fingerprint = "sha256:' "$CFG" || fail "the config has no TLS identities"
pair_up
promote siteA
wait_in_sync siteA 300
field siteA .link_security | grep -q '^tls' || fail "the link is not TLS: $(field siteA .link_security)"
dev=$(wait_device siteA)
netem delay 50ms loss 1%
resyncs() { grep -c 'resync to the peer started' "$RUN_DIR/$RES-siteA.log" || true; }
n0=$(resyncs)
connects0=$(field siteA .engine.connects)

# 1% loss each way at 100 ms RTT holds one TCP stream to a few hundred KiB/s (Mathis:
# MSS / RTT × 1.22 / √p), so the writer is paced below that.
step "fio (random 64 KiB writes, 256 KiB/s, 40 s) with a 10 s link cut in the middle"
fio --name=outage --filename="$dev" --rw=randwrite --bs=64k --iodepth=4 --direct=1 \
    --ioengine=libaio --size=48M --time_based --runtime=40 --rate=256k \
    --output="$WORK/fio.json" --output-format=json &
fio_pid=$!
sleep 12
link_cut
down_seen() { [ "$(field siteA .engine.conn)" = disconnected ]; }
wait_until 20 "siteA notices the cut" down_seen
sleep 10
lag=$(field siteA .engine.lag_bytes)
log "cut: $lag bytes waiting to ship; client writes go on"
[ "$lag" -gt 0 ] || fail "no writes queued during the cut: did fio stop?"
link_restore
wait "$fio_pid" || fail "fio failed: $(cat "$WORK/fio.json")"
log "fio wrote $(jq '.jobs[0].write.io_kbytes' "$WORK/fio.json") KiB"

step "converged without a resync, verify finds nothing"
wait_in_sync siteA 300
[ "$(field siteA .engine.connects)" -gt "$connects0" ] || fail "no reconnect after the cut"
assert_eq "$n0" "$(resyncs)" "resyncs started (the outage must resume, not resync)"
grep -q 'resumed at sequence' "$RUN_DIR/$RES-siteA.log" || fail "no resume in siteA's log"
out=$(blk siteA verify --json) || fail "verify: $out"
assert_eq 0 "$(jq -r .out_of_sync_bytes <<<"$out")" "bytes verify found different"
netem_clear
blk siteA down
blk siteB down
assert_eq "$(b3 "$(backing siteA)")" "$(b3 "$(backing siteB)")" "blake3 of the backings"
