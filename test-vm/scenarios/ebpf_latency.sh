#!/usr/bin/env bash
# vm-scenario: ci
# vm-timeout: 600
#
# eBPF latency tracking on a real kernel (Debian's 6.12, with BTF), ublk frontend:
# - with `ebpf = "require"` both daemons start and attach the BTF tracepoints;
# - under fio (4 KiB random writes, O_DIRECT, queue depth 8) on /dev/ublkbN, the write
#   histograms of the ublk device and of its backing loop device grow by fio's I/O count
#   (within 1%), and the client_write stage by exactly that count;
# - the histograms carry quantiles and the human rendering shows both devices.
source "$(dirname "$0")/lib.sh"

# The write count of one device's histogram in a `blkrep latency --json` report.
writes_of() { # report-file device
  jq -r --arg d "$2" '[.devices[] | select(.device == $d and .op == "write") | .hist.count] | add // 0' "$1"
}
stage_count() { # report-file stage
  jq -r --arg s "$2" '.stages[] | select(.stage == $s) | .hist.count' "$1"
}
within_1pct() { # expected actual what
  awk -v e="$1" -v a="$2" 'BEGIN { d = a - e; if (d < 0) d = -d; exit !(e > 0 && d * 100 <= e) }' ||
    fail "$3: $2, expected $1 within 1%"
  log "$3: $2 (fio: $1)"
}

step "a pair on ublk with eBPF required"
need_ublk
setup_sites
make_backings 64M
FRONTEND=ublk NODE_EXTRA='ebpf = "require"' write_config
pair_up
devA=$(wait_device siteA)
promote siteA
wait_in_sync siteA 180
blk siteA latency --json >"$WORK/before.json"
assert_eq active "$(jq -r .ebpf.state "$WORK/before.json")" "eBPF state"
assert_eq tp_btf "$(jq -r .ebpf.attach "$WORK/before.json")" "attach kind"
ublk=$(basename "$devA")
loopA=$(basename "$(backing siteA)")
jq -e --arg d "$ublk" '.ebpf.devices | any(startswith($d + " (") and contains("frontend"))' \
  "$WORK/before.json" >/dev/null || fail "$ublk is not traced: $(jq -c .ebpf "$WORK/before.json")"
jq -e --arg d "$loopA" '.ebpf.devices | any(startswith($d + " (") and contains("backing"))' \
  "$WORK/before.json" >/dev/null || fail "$loopA is not traced: $(jq -c .ebpf "$WORK/before.json")"

step "fio 4k random writes on $devA"
fio --name=lat --filename="$devA" --ioengine=libaio --direct=1 --iodepth=8 --rw=randwrite \
  --bs=4k --size=48M --io_size=24M --randrepeat=0 --output-format=json \
  --output="$WORK/fio.json" || fail "fio failed: $(tail -n 20 "$WORK/fio.json")"
ios=$(jq '.jobs[0].write.total_ios' "$WORK/fio.json")
[ "$ios" -gt 1000 ] || fail "fio did only $ios writes"
blk siteA latency --json >"$WORK/after.json"

step "the histograms count what fio did"
within_1pct "$ios" $(( $(writes_of "$WORK/after.json" "$ublk") - $(writes_of "$WORK/before.json" "$ublk") )) \
  "writes in the $ublk histogram"
within_1pct "$ios" $(( $(writes_of "$WORK/after.json" "$loopA") - $(writes_of "$WORK/before.json" "$loopA") )) \
  "writes in the $loopA histogram"
assert_eq "$ios" $(( $(stage_count "$WORK/after.json" client_write) - $(stage_count "$WORK/before.json" client_write) )) \
  "client_write stage count"
jq -e --arg d "$ublk" '.devices[] | select(.device == $d and .op == "write") | .hist | (.p50_us > 0 and .p99_us >= .p50_us and .p999_us >= .p99_us)' \
  "$WORK/after.json" >/dev/null || fail "no quantiles for $ublk writes"
blk siteA latency >"$WORK/human.txt"
grep -q "^$ublk write (frontend" "$WORK/human.txt" || fail "human latency lacks $ublk: $(head -20 "$WORK/human.txt")"
grep -q "^$loopA write (backing" "$WORK/human.txt" || fail "human latency lacks $loopA"
sed -n '1,12p' "$WORK/human.txt"
blk siteB latency --json >"$WORK/b.json"
[ "$(stage_count "$WORK/b.json" remote_apply)" -ge "$ios" ] || fail "siteB's remote_apply stage is short"

step "down"
blk siteA down
blk siteB down
