# shellcheck shell=bash
# Helpers for the VM scenarios. Sourced by each scenario; runs inside the guest as root, where
# everything lives in tmpfs and the machine is thrown away afterwards (no cleanup needed: init
# powers off, killing whatever still runs).
#
# Two sites in one guest: network namespaces siteA and siteB joined by a veth pair
# (vA 10.99.0.1/24 in siteA <-> vB 10.99.0.2/24 in siteB). Each node's daemon runs inside
# its namespace; the filesystem (backing files, sockets, /dev) is shared.
set -Eeuo pipefail

WORK=/tmp/blkrep        # configs, backing files, metadata, run dir (tmpfs)
RUN_DIR=$WORK/run       # control and NBD sockets, daemon logs
CFG=$WORK/r0.toml
RES=r0
PORT=7789
declare -A ADDR=([siteA]=10.99.0.1 [siteB]=10.99.0.2)
declare -A VETH=([siteA]=vA [siteB]=vB)
SCENARIO=$(basename "${BASH_SOURCE[1]:-$0}" .sh)
mkdir -p "$WORK" "$RUN_DIR"

# ---- output and failure -------------------------------------------------------------------

now() { cut -d' ' -f1 /proc/uptime; }   # seconds since boot, centiseconds
log() { printf '[%7.2f] %s\n' "$(now)" "$*"; }
step() { log "== $*"; }

# Everything that helps to understand a failure: each node's status and log tail, the kernel's
# last words, block devices, processes.
show_context() {
  echo "---- context ($SCENARIO) ----"
  local n
  if [ -f "$CFG" ]; then
    for n in siteA siteB; do
      echo "-- $n: blkrep status"
      blk "$n" status 2>&1 | sed 's/^/   /' || true
      if [ -f "$RUN_DIR/$RES-$n.log" ]; then
        echo "-- $n: last 40 lines of $RUN_DIR/$RES-$n.log"
        tail -n 40 "$RUN_DIR/$RES-$n.log" | sed 's/^/   /'
      fi
    done
  fi
  echo "-- dmesg (last 25 lines)"
  dmesg | tail -n 25 | sed 's/^/   /'
  echo "-- /dev/ublk*: $(echo /dev/ublk*)"
  echo "-- processes"
  # shellcheck disable=SC2009 # busybox has no pgrep; kernel threads ([name]) are left out
  ps -o pid,stat,args | grep -v -e ' ps ' -e '\[' | sed 's/^/   /' || true
  echo "---- end of context ----"
}

# fail may run inside $(...) (e.g. a wait in `dev=$(wait_device siteA)`): it writes to stderr,
# which is not captured, and marks the context as shown with a file, which the main shell
# sees too.
CONTEXT_MARK=$WORK/.context-shown
rm -f "$CONTEXT_MARK"
context_once() {
  [ -e "$CONTEXT_MARK" ] && return 0
  touch "$CONTEXT_MARK"
  show_context >&2
}
fail() {
  echo "FAIL: $*" >&2
  context_once
  exit 1
}

# A command that failed outside a condition (set -e) ends the scenario; say which command,
# and where, with the chain of calls that led there.
FAILED_AT=""
on_err() { # exit status
  local i where=""
  for ((i = 1; i < ${#BASH_SOURCE[@]}; i++)); do
    where+="${where:+ <- }$(basename "${BASH_SOURCE[i]}"):${BASH_LINENO[i - 1]}${FUNCNAME[i]:+ (${FUNCNAME[i]})}"
  done
  FAILED_AT="$BASH_COMMAND (exit $1), at $where"
}
trap 'on_err $?' ERR
on_exit() {
  local rc=$?
  if [ "$rc" != 0 ] && [ ! -e "$CONTEXT_MARK" ]; then
    if [ -n "$FAILED_AT" ]; then
      echo "FAIL: $SCENARIO: command failed: $FAILED_AT" >&2
    else
      echo "FAIL: $SCENARIO exited with $rc" >&2
    fi
    context_once
  elif [ "$rc" = 0 ]; then
    log "PASS: $SCENARIO"
  fi
}
trap on_exit EXIT
trap 'fail "terminated (the scenario timeout expired)"' TERM

assert_eq() { # expected actual what
  [ "$1" = "$2" ] || fail "$3: expected '$1', got '$2'"
  log "ok: $3 = '$2'"
}

# Run a command that must fail; its output (stdout+stderr) is left in $OUT.
OUT=""
expect_failure() { # what command...
  local what=$1; shift
  if OUT=$("$@" 2>&1); then
    fail "$what: succeeded but should have failed: $*"$'\n'"$OUT"
  fi
  log "ok: $what fails: $(head -n 3 <<<"$OUT" | tr '\n' ' ')"
}

# Poll a command until it succeeds; fail after TIMEOUT seconds. Never a bare sleep for
# readiness: every wait says what it waits for.
wait_until() { # timeout description command...
  local timeout=$1 what=$2; shift 2
  local deadline
  deadline=$(awk -v n="$(now)" -v t="$timeout" 'BEGIN {print n + t}')
  until "$@" >/dev/null 2>&1; do
    if awk -v n="$(now)" -v d="$deadline" 'BEGIN {exit !(n > d)}'; then
      fail "timed out after ${timeout}s waiting for: $what"
    fi
    sleep 0.1
  done
}

# ---- kernel ----------------------------------------------------------------------------------

load_module() { # name
  modprobe "$1" || fail "modprobe $1 failed"
  [ -d "/sys/module/$1" ] || fail "module $1 not present after modprobe"
}

need_ublk() {
  load_module ublk_drv
  wait_until 5 "/dev/ublk-control" test -c /dev/ublk-control
}

# ---- the two sites ---------------------------------------------------------------------------

in_site() { # site command... : run a command inside a site's network namespace
  local site=$1; shift
  ip netns exec "$site" "$@"
}

setup_sites() {
  ip netns add siteA
  ip netns add siteB
  ip link add vA netns siteA type veth peer name vB netns siteB
  local s
  for s in siteA siteB; do
    in_site "$s" ip link set lo up
    in_site "$s" ip addr add "${ADDR[$s]}/24" dev "${VETH[$s]}"
    in_site "$s" ip link set "${VETH[$s]}" up
  done
  wait_until 10 "siteA reaches siteB" in_site siteA ping -c 1 -W 1 "${ADDR[siteB]}"
  log "sites up: siteA ${ADDR[siteA]} (vA) <-> siteB ${ADDR[siteB]} (vB)"
}

# netem on both ends of the link, e.g. `netem delay 10ms` (RTT 20 ms) or `netem loss 1%`.
netem() {
  local s
  for s in siteA siteB; do
    in_site "$s" tc qdisc replace dev "${VETH[$s]}" root netem "$@"
  done
  log "link: netem $* (each direction)"
}
netem_clear() {
  local s
  for s in siteA siteB; do
    in_site "$s" tc qdisc del dev "${VETH[$s]}" root 2>/dev/null || true
  done
}
link_cut() { in_site siteA ip link set vA down; log "link: cut"; }
link_restore() {
  in_site siteA ip link set vA up
  wait_until 10 "the link is back" in_site siteA ping -c 1 -W 1 "${ADDR[siteB]}"
  log "link: restored"
}

# Average ping RTT in ms from siteA to siteB (busybox ping: "min/avg/max = a/b/c ms").
rtt_ms() { # pings
  in_site siteA ping -c "$1" -q "${ADDR[siteB]}" | awk -F/ '/min\/avg\/max/ {print $4}'
}

# ---- blkrep ---------------------------------------------------------------------------------

# Each node's backing is a loop device over a sparse file in tmpfs: the daemon gets a block
# device, as in production (O_DIRECT, and write-zeroes that the block layer emulates where the
# device cannot do it). A tmpfs file itself would not do: tmpfs has no FALLOC_FL_ZERO_RANGE.
backing() { cat "$WORK/$1.loop"; }          # the node's loop device
make_backings() { # size (default $SIZE or 64M)
  local size=${1:-${SIZE:-64M}} s dev
  for s in siteA siteB; do
    if [ -f "$WORK/$s.loop" ]; then
      losetup -d "$(backing "$s")"
    fi
    rm -f "$WORK/$s.img"
    truncate -s "$size" "$WORK/$s.img"
    dev=$(losetup -f) || fail "no free loop device"
    losetup "$dev" "$WORK/$s.img"
    echo "$dev" >"$WORK/$s.loop"
  done
  log "backings: siteA $(backing siteA), siteB $(backing siteB) ($size each, loop over tmpfs)"
}

# Write the resource config. Environment: SIZE (default 64M), MODE (sync), FRONTEND (unset:
# the default frontend), RESOURCE_EXTRA (more lines for [resource], e.g. a queue depth;
# "insecure = true" there leaves TLS out). Each site gets a key from `blkrep keygen`.
# Backings come from make_backings.
write_config() {
  local s
  {
    echo "[resource]"
    echo "name = \"$RES\""
    echo "size = \"${SIZE:-64M}\""
    echo "mode = \"${MODE:-sync}\""
    echo "run_dir = \"$RUN_DIR\""
    if [ -n "${FRONTEND:-}" ]; then echo "frontend = \"$FRONTEND\""; fi
    if [ -n "${RESOURCE_EXTRA:-}" ]; then echo "$RESOURCE_EXTRA"; fi
    for s in siteA siteB; do
      echo
      echo "[[node]]"
      echo "name = \"$s\""
      echo "address = \"${ADDR[$s]}:$PORT\""
      echo "backing = \"$(backing "$s")\""
      echo "metadata = \"$WORK/$s.md\""
      if [ -n "${NODE_EXTRA:-}" ]; then echo "$NODE_EXTRA"; fi
      if ! grep -q '^insecure = true' <<<"${RESOURCE_EXTRA:-}"; then
        [ -f "$WORK/$s.toml" ] || blkrep keygen --force --out "$WORK/$s" >"$WORK/$s.toml"
        grep -E '^(key|cert|fingerprint) =' "$WORK/$s.toml"
      fi
    done
  } >"$CFG"
}

# The blkrep command for a node, run inside the node's namespace.
blk() { # node verb args...
  local node=$1; shift
  in_site "$node" blkrep --config "$CFG" --node "$node" "$@"
}

# Does this build's config know `frontend`? (Until the ublk frontend lands it does not, and
# the config parser refuses unknown fields.)
config_knows_frontend() {
  local probe=$WORK/probe.toml out
  { echo "[resource]"; echo 'frontend = "nbd"'; grep -v '^\[resource\]$' "$CFG"; } >"$probe"
  out=$(blkrep --config "$probe" --node siteA status 2>&1 || true)
  rm -f "$probe"
  ! grep -q 'unknown field' <<<"$out"
}

# create-md and up on both nodes.
pair_up() {
  local s
  for s in siteA siteB; do
    blk "$s" create-md >/dev/null
    blk "$s" up
  done
}

# A ublk pair, siteA primary and in sync with siteB: the sites, loop backings of SIZE, the
# config in MODE, both daemons up. `wait_device siteA` then names siteA's device.
ublk_pair() { # size mode
  setup_sites
  make_backings "$1"
  FRONTEND=ublk MODE=$2 SIZE=$1 write_config
  pair_up
  promote siteA
  wait_in_sync siteA 180
}

status_json() { blk "$1" status --json 2>/dev/null || true; }
# One field of a node's status, e.g. `field siteA .engine.role`.
field() { status_json "$1" | jq -r "$2"; }
daemon_pid() { field "$1" '.pid // empty'; }

# The primary and its peer agree that everything written has been applied on the peer.
in_sync() { # primary
  status_json "$1" | jq -e '.engine as $e
    | $e.role == "primary" and $e.conn == "connected" and $e.lag_items == 0
      and $e.resync == null and $e.acked_seq == $e.last_seq' >/dev/null
}
wait_in_sync() { # primary [timeout]
  wait_until "${2:-120}" "$1 and its peer in sync" in_sync "$1"
  log "in sync: $1 -> peer (last_seq $(field "$1" .engine.last_seq))"
}

connected() { # node
  [ "$(field "$1" .engine.conn)" = connected ]
}

promote() { # node
  local out
  out=$(blk "$1" promote --timeout 60 2>&1) || fail "blkrep promote on $1 failed:"$'\n'"$out"
  echo "$out"
  assert_eq primary "$(field "$1" .engine.role)" "role of $1 after promote"
}
demote() { # node
  local out
  out=$(blk "$1" demote 2>&1) || fail "blkrep demote on $1 failed:"$'\n'"$out"
  echo "$out"
  assert_eq secondary "$(field "$1" .engine.role)" "role of $1 after demote"
}

nbd_uri() { echo "nbd+unix:///$RES?socket=$RUN_DIR/$RES-$1.nbd"; }

# The ublk block device a node serves (status field `device`), empty if none.
device_of() { field "$1" '.device // empty'; }
has_device() { # node
  local d
  d=$(device_of "$1")
  [ -n "$d" ] && [ -b "$d" ]
}
wait_device() { # node -> prints the device path
  wait_until "${2:-30}" "$1 serves a ublk block device (status .device)" has_device "$1"
  device_of "$1"
}

b3() { blkrep-tools hash "$1" | cut -d' ' -f1; }   # blake3 of a file or device

# Both backing files hold the same bytes.
assert_replica_equal() {
  local out
  out=$(blkrep-tools compare "$(backing siteA)" "$(backing siteB)") ||
    fail "the backings differ:"$'\n'"$out"
  log "ok: backings equal ($out)"
}

# ublk devices currently present.
ublk_devices() { find /dev -maxdepth 1 -name 'ublkb*' | sort | tr '\n' ' '; }

# ---- local legs and device-mapper ---------------------------------------------------------

# A node's backing is DEV from now on (e.g. a device-mapper device over its loop device):
# write_config, assert_replica_equal and `backing` use it.
use_backing() { # node dev
  echo "$2" >"$WORK/$1.loop"
}

# More lines for one node's [[node]] section of the written config (write_config's
# NODE_EXTRA goes to every node), e.g. `node_config siteA 'mirror = "/dev/mapper/leg1"'`.
node_config() { # node line...
  local node=$1; shift
  awk -v node="$node" -v extra="$(printf '%s\n' "$@")" '
    { print }
    prev == "[[node]]" && $0 == "name = \"" node "\"" { print extra; found = 1 }
    { prev = $0 }
    END { exit !found }' "$CFG" >"$CFG.tmp" || fail "node_config: no [[node]] named $node in $CFG"
  mv "$CFG.tmp" "$CFG"
}

# dmsetup without udev (the guest runs none): libdevmapper makes the /dev/mapper nodes itself.
dm() { DM_DISABLE_UDEV=1 dmsetup "$@"; }
dm_sectors() { blockdev --getsz "$1"; }   # a block device's size in 512-byte sectors
# A device-mapper device NAME mapping all of DEV linearly: /dev/mapper/NAME.
dm_linear() { # name dev
  dm create "$1" --table "0 $(dm_sectors "$2") linear $2 0"
  [ -b "/dev/mapper/$1" ] || fail "dmsetup create $1 made no /dev/mapper/$1"
}
# Swap a live device's table: suspend (in-flight I/O completes, new I/O waits), load, resume.
# E.g. `dm_table leg1 "0 $n error"` makes every request to it fail from now on.
dm_table() { # name table
  dm suspend "$1"
  dm reload "$1" --table "$2"
  dm resume "$1"
  log "dm: $1 is now \"$2\""
}

# One local leg's status field, e.g. `leg siteA 1 .state`.
leg() { # node index jq
  field "$1" ".legs[$2]$3"
}
leg_is() { # node index state
  [ "$(leg "$1" "$2" .state)" = "$3" ]
}
wait_leg() { # node index state [timeout]
  wait_until "${4:-60}" "leg $2 of $1 $3" leg_is "$1" "$2" "$3"
  log "leg $2 of $1: $3 ($(field "$1" ".legs[$2] | {lacks_bytes, reason, inflight}" | jq -c .))"
}
