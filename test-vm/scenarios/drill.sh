#!/usr/bin/env bash
# vm-scenario: ci
# vm-timeout: 600
#
# A DR drill under a live workload, with ext4 on the ublk device. siteA (primary) holds a
# file tree with known checksums and runs a writer (fsync'd files) the whole time. siteB
# runs `blkrep drill`: a copy-on-write clone of its replica at a consistent cut appears
# as a third ublk device; blkrep mounts it (the ext4 journal replays into the clone),
# runs a probe (the tree's checksums on the clone), unmounts, runs `e2fsck -fn`, and
# tears it down. Checked: verdict pass with every check passed, RPO and step times in
# the report, the writer never failed and kept going during the drill, the replica
# converged to the primary's bytes afterwards, the clone device is gone.
source "$(dirname "$0")/lib.sh"

step "ublk, two sites, a pair with frontend = \"ublk\""
need_ublk
ublk_pair 128M async
dev_a=$(wait_device siteA)

step "ext4 and a file tree on siteA ($dev_a)"
mkfs.ext4 -q -F "$dev_a"
mkdir -p /mnt/a
mount -t ext4 "$dev_a" /mnt/a
mkdir -p /mnt/a/tree /mnt/a/load
for i in $(seq 1 20); do
  dd if=/dev/urandom of="/mnt/a/tree/f$i" bs=4k count=$((i % 9 + 1)) 2>/dev/null
done
(cd /mnt/a && find tree -type f | sort | xargs sha256sum) >"$WORK/tree.sums"
sync

step "a writer on siteA for the whole drill"
rm -f "$WORK/stop" "$WORK/load.err"
echo 0 >"$WORK/load.count"
(
  i=0
  while [ ! -e "$WORK/stop" ]; do
    dd if=/dev/urandom of="/mnt/a/load/f$((i % 40))" bs=64k count=2 conv=fsync 2>/dev/null ||
      echo "write $i failed" >>"$WORK/load.err"
    i=$((i + 1))
    echo "$i" >"$WORK/load.count"
  done
) &
writer=$!
sleep 2
before=$(cat "$WORK/load.count")
[ "$before" -gt 0 ] || fail "the writer is not writing"
devices_before=$(ublk_devices)

step "blkrep drill on siteB (mount, probe, fsck)"
probe="cd \"\$BLKREP_DRILL_MOUNT\" && sha256sum -c -s $WORK/tree.sums && echo tree intact"
set +e
report=$(blk siteB drill --checks mount,probe,fsck --probe "$probe" --json 2>"$WORK/drill.err")
rc=$?
set -e
after=$(cat "$WORK/load.count")
log "drill exit $rc; writer: $before -> $after fsync'd writes"
[ -n "$report" ] || fail "no report: $(cat "$WORK/drill.err")"
jq -r '.steps[] | "  \(.step): \(.result) \(.seconds)s \(.detail)"' <<<"$report"
assert_eq 0 "$rc" "drill exit code"
assert_eq pass "$(jq -r .verdict <<<"$report")" "verdict"
for s in cut mount probe umount fsck teardown replication; do
  assert_eq pass "$(jq -r --arg s "$s" '.steps[] | select(.step == $s) | .result' <<<"$report")" "step $s"
done
clone=$(jq -r .clone.device <<<"$report")
case "$clone" in /dev/ublkb*) ;; *) fail "the clone was not a ublk device: $clone" ;; esac
[ "$clone" != "$dev_a" ] || fail "the clone is the primary's device"
jq -e '.steps[] | select(.step == "fsck") | .detail | test("clean")' <<<"$report" >/dev/null ||
  fail "fsck detail"
jq -e '.rpo.seconds_max >= 0 and .rto_estimate_seconds > 0' <<<"$report" >/dev/null ||
  fail "RPO/RTO missing: $(jq -c .rpo <<<"$report")"
log "RPO <= $(jq -r .rpo.seconds_max <<<"$report")s, estimated RTO $(jq -r .rto_estimate_seconds <<<"$report")s"
[ "$after" -gt "$before" ] || fail "the writer made no progress during the drill"
[ ! -s "$WORK/load.err" ] || fail "the writer saw errors: $(cat "$WORK/load.err")"
applied=$(jq -r .teardown.applied_during <<<"$report")
[ "$applied" -gt 0 ] || fail "the replica applied nothing during the drill"
log "ok: $applied items applied to the replica during the drill"
assert_eq "$devices_before" "$(ublk_devices)" "ublk devices after the drill"
md=$(jq -r '.files[] | select(endswith(".md"))' <<<"$report")
grep -q "PASS" "$md" || fail "the Markdown report has no verdict"
blk siteB drill --history | grep -q PASS || fail "drill --history does not list the drill"

step "the replica converges"
touch "$WORK/stop"
wait "$writer"
sync
umount /mnt/a
wait_in_sync siteA 120
assert_replica_equal

step "down"
blk siteA down
blk siteB down
