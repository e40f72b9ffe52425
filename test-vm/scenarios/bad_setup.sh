#!/usr/bin/env bash
# vm-scenario: ci
# vm-timeout: 300
#
# A bad setup fails clearly and leaves nothing half-created: `blkrep up` with
# frontend = "ublk" while ublk_drv is not loaded, and with impossible ublk queue depths,
# exits non-zero with a message that names the problem, and afterwards there is no
# /dev/ublkb*, no /dev/ublkc*, no blkrepd and no ublk device record. Once the setup is fixed,
# `up` works and `down` removes the device.
source "$(dirname "$0")/lib.sh"

# Nothing of siteA's daemon is left: no process, no ublk device, no socket, no device record.
assert_clean() { # what
  assert_eq "" "$(pidof blkrepd || true)" "blkrepd processes after $1"
  assert_eq "" "$(ublk_devices)" "ublk block devices after $1"
  assert_eq "" "$(find /dev -maxdepth 1 -name 'ublkc*' | tr '\n' ' ')" "ublk char devices after $1"
  # A leftover device record would send the next `up` looking for a device to recover.
  assert_eq "" "$(find "$RUN_DIR" -name "$RES-siteA.ublk")" "ublk device record after $1"
  # A stale control socket is harmless (nobody answers on it), but worth a note.
  if [ -e "$RUN_DIR/$RES-siteA.ctl" ]; then
    log "note: a stale control socket $RUN_DIR/$RES-siteA.ctl is left after $1"
  fi
}

setup_sites
make_backings 32M
SIZE=32M

step "frontend = \"ublk\" without ublk_drv"
[ ! -e /sys/module/ublk_drv ] || fail "ublk_drv is loaded already; this case needs it absent"
[ ! -e /dev/ublk-control ] || fail "/dev/ublk-control exists without ublk_drv"
FRONTEND=ublk write_config
blk siteA create-md >/dev/null
expect_failure "blkrep up without ublk_drv" blk siteA up
grep -qiE 'ublk_drv|ublk-control' <<<"$OUT" ||
  fail "the error does not say that ublk_drv / /dev/ublk-control is missing:"$'\n'"$OUT"
assert_clean "up without ublk_drv"

step "impossible queue depths are refused"
need_ublk
for extra in "ublk_depth = 5000" "ublk_depth = 0" "ublk_queues = 0"; do
  FRONTEND=ublk RESOURCE_EXTRA=$extra write_config
  expect_failure "blkrep up with $extra" blk siteA up
  field_name=${extra%% *}
  grep -q "$field_name" <<<"$OUT" || fail "the error does not name $field_name:"$'\n'"$OUT"
  if grep -qi 'unknown field' <<<"$OUT"; then
    fail "the config does not know $field_name (the test needs updating):"$'\n'"$OUT"
  fi
  assert_clean "up with $extra"
done

step "fixed: up and promote give a device, down removes it"
FRONTEND=ublk write_config
blk siteB create-md >/dev/null
blk siteA up
blk siteB up
promote siteA
dev=$(wait_device siteA)
log "siteA serves $dev"
blk siteA down
blk siteB down
assert_clean "down"
