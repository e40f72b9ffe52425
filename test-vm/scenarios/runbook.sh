#!/usr/bin/env bash
# vm-scenario: ci
# vm-timeout: 600
#
# docs/runbook.md, followed literally. The command blocks of its "Emergency takeover" and
# "Failback" sections (```sh node=NODE) are extracted from the runbook at run time and run
# in order, each inside its node's site with BLKREP_NODE=NODE and the configuration at the
# runbook's default path /etc/blkrep/r0.toml; no text in them is substituted. Between the
# blocks the scenario does what the runbook leaves to the operator (the applications: an
# ext4 filesystem on the ublk device) and checks: the data written before the site loss
# reads back with the same bytes at siteB after the takeover; what siteB writes during the
# takeover is on siteA, byte for byte, after the failback; siteA primary and siteB
# secondary at the end; the failback resync moved changed blocks only. The site loss is
# simulated as in ext4_takeover: kill -9 of siteA's daemon.
source "$(dirname "$0")/lib.sh"

# The runbook: docs/runbook.md in the repository, /docs/runbook.md in the guest (build.sh
# copies it next to /scenarios).
RUNBOOK=${RUNBOOK:-$(dirname "$0")/../docs/runbook.md}
BLOCKS=$WORK/runbook-blocks
BLOCK_TIMEOUT=300 # seconds for one block (the resync wait loop is one)
CFG=/etc/blkrep/r0.toml # the runbook's default configuration path (no --config needed)
mkdir -p /etc/blkrep
[ "$RES" = r0 ] || fail "the runbook is written for resource r0, lib.sh uses $RES"

# ---- the runbook's blocks -------------------------------------------------------------------

# Extract the ```sh blocks of one "## HEADING" section (up to the next "## " heading, outside
# code) into DIR/NN.NODE.sh, in order. Exit status 3: no such section; 4: unterminated block.
extract_section() { # heading dir
  local heading=$1 dir=$2
  rm -rf "$dir"
  mkdir -p "$dir"
  awk -v want="## $heading" -v dir="$dir" '
    function ltrim(s, n) { while (n > 0 && substr(s, 1, 1) == " ") { s = substr(s, 2); n-- } return s }
    # A fence: three backticks, indented or not, and an info string without backticks
    # (a line starting with "```` ```sh ```` ..." is inline code).
    !fence && /^ *```[^`]*$/ {
      fence = 1; grab = 0
      indent = match($0, /[^ ]/) - 1
      info = substr($0, indent + 4)
      if (insec && info ~ /^sh([ \t]|$)/) {
        node = ""
        k = split(info, w, /[ \t]+/)
        for (i = 2; i <= k; i++) if (w[i] ~ /^node=/) node = substr(w[i], 6)
        n++
        file = sprintf("%s/%02d.%s.sh", dir, n, node == "" ? "NO-NODE" : node)
        printf "" > file
        grab = 1
      }
      next
    }
    fence && /^ *```[ \t]*$/ { fence = 0; if (grab) close(file); grab = 0; next }
    fence { if (grab) print ltrim($0, indent) > file; next }
    /^## / { insec = ($0 == want); if (insec) found = 1 }
    END { if (!found) exit 3; if (fence) exit 4 }
  ' "$RUNBOOK" || {
    case $? in
      3) fail "runbook $RUNBOOK has no section \"## $heading\"" ;;
      4) fail "runbook $RUNBOOK: a code block is not closed" ;;
      *) fail "extracting \"## $heading\" from $RUNBOOK failed" ;;
    esac
  }
  local f n=0
  for f in "$dir"/*.sh; do
    [ -e "$f" ] || continue
    n=$((n + 1))
    case "$(block_node "$f")" in
      siteA | siteB) ;;
      *) fail "runbook \"## $heading\", block $(basename "$f"): its info string names no node siteA or siteB (\`\`\`sh node=NODE)" ;;
    esac
  done
  [ "$n" -gt 0 ] || fail "runbook \"## $heading\" has no \`\`\`sh node=... block"
  log "runbook: \"## $heading\": $n blocks"
}
block_node() { basename "$1" .sh | cut -d. -f2; }

# The block of DIR that runs on NODE and contains a line matching the extended regex RE
# (its path); the scenario fails when there is none.
find_block() { # dir node regex what
  local f
  for f in "$1"/*."$2".sh; do
    if [ -e "$f" ] && grep -Eq "$3" "$f"; then
      echo "$f"
      return 0
    fi
  done
  fail "runbook: no block on $2 that $4 (a line matching /$3/) in $(basename "$1")"
}

# Run one block on its node, the way every scenario runs commands on a site.
run_block() { # file
  local f=$1 node
  node=$(block_node "$f")
  log "runbook: block $(basename "$f" .sh) on $node:"
  sed 's/^/      | /' "$f"
  if ! in_site "$node" env BLKREP_NODE="$node" timeout "$BLOCK_TIMEOUT" \
        bash -Eeuo pipefail "$f" 2>&1 | sed "s/^/      $node> /"; then
    fail "runbook block $(basename "$f" .sh) failed on $node (or ran longer than ${BLOCK_TIMEOUT}s)"
  fi
}

# Run every block of DIR in order; HOOK_BEFORE[file] / HOOK_AFTER[file] name scenario
# functions to run around a block.
declare -A HOOK_BEFORE=() HOOK_AFTER=()
run_section() { # dir
  local f
  for f in "$1"/*.sh; do
    if [ -n "${HOOK_BEFORE[$f]:-}" ]; then ${HOOK_BEFORE[$f]}; fi
    run_block "$f"
    if [ -n "${HOOK_AFTER[$f]:-}" ]; then ${HOOK_AFTER[$f]}; fi
  done
}

# ---- data helpers ---------------------------------------------------------------------------

# Same files, same bytes: the file lists of two trees are equal and every file compares equal.
assert_tree_equal() { # expected_dir actual_dir what
  local exp=$1 act=$2 what=$3 f n=0
  local le la
  le=$(cd "$exp" && find . -type f ! -path './lost+found/*' | sort)
  la=$(cd "$act" && find . -type f ! -path './lost+found/*' | sort)
  [ "$le" = "$la" ] || fail "$what: the file lists differ:"$'\n'"$(diff <(echo "$le") <(echo "$la") || true)"
  while read -r f; do
    cmp -s "$exp/$f" "$act/$f" || fail "$what: $f differs (cmp)"
    n=$((n + 1))
  done <<<"$le"
  log "ok: $what: $n files, same bytes"
}

write_file() { # path kib
  mkdir -p "$(dirname "$1")"
  dd if=/dev/urandom of="$1" bs=1k count="$2" 2>/dev/null
}

# ---- the pair and the data before the site loss -----------------------------------------------

step "ublk, two sites, a pair with frontend = \"ublk\" (configuration at $CFG)"
[ -f "$RUNBOOK" ] || fail "no runbook at $RUNBOOK"
extract_section "Emergency takeover" "$BLOCKS/takeover"
extract_section "Failback" "$BLOCKS/failback"
# The steps the scenario's own actions hang on; each must be in the runbook.
t_force=$(find_block "$BLOCKS/takeover" siteB '^[^#]*blkrep promote --force r0' "runs the forced promote")
f_plan=$(find_block "$BLOCKS/failback" siteB '^[^#]*blkrep failback --plan r0' "shows the failback plan")
f_up=$(find_block "$BLOCKS/failback" siteA '^[^#]*blkrep up r0' "starts siteA's daemon")
f_demote=$(find_block "$BLOCKS/failback" siteB '^[^#]*blkrep demote r0' "demotes siteB")
f_promote=$(find_block "$BLOCKS/failback" siteA '^[^#]*blkrep promote r0' "promotes siteA")
[[ "$f_plan" < "$f_up" ]] || fail "runbook: the failback plan must come before siteA's 'blkrep up'"
[[ "$f_up" < "$f_demote" && "$f_demote" < "$f_promote" ]] ||
  fail "runbook: failback order must be: up on siteA, demote on siteB, promote on siteA"

need_ublk
# `ip netns exec` gives each command a copy of the mount table. siteA's daemon starts (the
# runbook's `blkrep up r0`) while siteB's filesystem is mounted; with the guest's private
# root its copy would keep that filesystem, and siteB's device busy, after the unmount
# before the demote. A shared root makes the copies slaves, so the unmount reaches them (two
# sites in one kernel only; on real nodes the daemon never sees the other site's mounts).
mount --make-rshared /
ublk_pair 128M async
dev_a=$(wait_device siteA)

step "ext4 and files on siteA ($dev_a): the data before the site loss"
REF=$WORK/ref   # what siteA's filesystem holds before the loss
for d in 0 1 2 3; do
  for i in $(seq 1 10); do
    write_file "$REF/dir$d/f$i" $(((d * 10 + i) * 37 % 200 + 4))
  done
done
write_file "$REF/big" 6144
mkfs.ext4 -q -F "$dev_a"
mkdir -p /mnt/a /mnt/b
mount -t ext4 "$dev_a" /mnt/a
cp -r "$REF/." /mnt/a/
sync
assert_tree_equal "$REF" /mnt/a "siteA's files before the loss"
umount /mnt/a
wait_in_sync siteA
# Let the activity log cool, as it does on an idle primary.
cooled() { [ "$(field siteA .engine.hot_extents)" = 0 ]; }
wait_until 30 "siteA's activity log cooled" cooled
sleep 1
h_before=$(b3 "$(backing siteA)")
assert_eq "$h_before" "$(b3 "$(backing siteB)")" "blake3 of siteB's backing vs siteA's before the loss"

step "siteA is lost: kill -9 its daemon"
pid=$(daemon_pid siteA)
kill -9 "$pid"
gone() { [ ! -d "/proc/$1" ] || awk '{exit !($3 == "Z")}' "/proc/$1/stat" 2>/dev/null; }
wait_until 10 "blkrepd $pid gone" gone "$pid"
not_connected() { [ "$(field siteB .engine.conn)" != connected ]; }
wait_until 30 "siteB notices" not_connected

# ---- the runbook: emergency takeover ----------------------------------------------------------

FINAL=$WORK/final  # what siteB's filesystem holds when the service moves back

after_takeover() {
  step "scenario: the service at siteB (the runbook's step 4, by hand)"
  assert_eq primary "$(field siteB .engine.role)" "siteB's role after the takeover"
  dev_b=$(wait_device siteB)
  assert_eq "$h_before" "$(b3 "$dev_b")" "blake3 read through siteB's $dev_b vs siteA's backing before the loss"
  e2fsck -fn "$dev_b" || fail "siteB's image is not a clean filesystem"
  mount -t ext4 "$dev_b" /mnt/b
  assert_tree_equal "$REF" /mnt/b "the data written before the takeover, read at siteB"
  # Writes during the takeover: files changed, removed and added.
  rm -f /mnt/b/dir0/f1 /mnt/b/dir0/f2
  for i in $(seq 1 6); do
    write_file "/mnt/b/dir1/f$i" 28
    write_file "/mnt/b/new/n$i" 256
  done
  write_file /mnt/b/new/big 4096
  sync
  log "siteB wrote $(du -sk /mnt/b/new | cut -f1) KiB of new files and changed dir1"
}
HOOK_AFTER[$t_force]=after_takeover

step "runbook: Emergency takeover ($(find "$BLOCKS/takeover" -name '*.sh' | wc -l) blocks)"
run_section "$BLOCKS/takeover"

# ---- the runbook: failback --------------------------------------------------------------------

after_up() {
  assert_eq secondary "$(field siteA .engine.role)" "siteA's role after its return"
  # The applications on siteB go on writing while siteA comes back.
  write_file /mnt/b/new/during-resync 512
  sync
}
HOOK_AFTER[$f_up]=after_up

before_demote() {
  step "scenario: stop the applications on siteB (sync, unmount)"
  sync
  rm -rf "$FINAL"
  mkdir -p "$FINAL"
  cp -r /mnt/b/. "$FINAL"/
  rm -rf "$FINAL/lost+found"
  umount /mnt/b
}
HOOK_BEFORE[$f_demote]=before_demote

step "runbook: Failback ($(find "$BLOCKS/failback" -name '*.sh' | wc -l) blocks)"
run_section "$BLOCKS/failback"

# ---- where the runbook leaves the pair --------------------------------------------------------

step "scenario: the pair after the failback"
assert_eq primary "$(field siteA .engine.role)" "siteA's role at the end"
assert_eq secondary "$(field siteB .engine.role)" "siteB's role at the end"
wait_in_sync siteA 120
assert_eq up_to_date "$(field siteB .engine.disk_state)" "siteB's disk state at the end"
moved=$(blk siteB events --kind resync --json |
  jq -r 'select(.message | startswith("resync to the peer started")) | .message' |
  tail -n 1 | sed -n 's/^resync to the peer started: \([0-9]*\) of .*/\1/p')
[ -n "$moved" ] || fail "no 'resync to the peer started' event on siteB"
log "the failback resync moved $moved of $((128 << 20)) bytes"
[ "$moved" -lt $((32 << 20)) ] || fail "the failback resync moved $moved bytes: not changed blocks only"
assert_replica_equal

step "scenario: siteA serves what siteB wrote during the takeover"
dev_a2=$(wait_device siteA)
log "siteA serves $dev_a2 (before the loss: $dev_a)"
e2fsck -fn "$dev_a2" || fail "e2fsck -fn $dev_a2 reports problems after the failback"
mount -t ext4 "$dev_a2" /mnt/a
assert_tree_equal "$FINAL" /mnt/a "siteA after the failback vs siteB's files at the switch back"
[ ! -e /mnt/a/dir0/f1 ] || fail "a file deleted during the takeover is back on siteA"
cmp -s "$REF/dir2/f3" /mnt/a/dir2/f3 || fail "a file untouched since before the loss differs on siteA"
umount /mnt/a

step "down"
blk siteA down
blk siteB down
