#!/usr/bin/env bash
# Side-by-side fio benchmark, one run, contenders interleaved round by round:
#   raw       fio io_uring, O_DIRECT, on the backing file itself
#   nbdkit    nbdkit file plugin on the same file (fio nbd engine)
#   qemu-nbd  qemu-nbd --cache=none --aio=io_uring on the same file (fio nbd engine)
#   async     blkrep pair on loopback, async mode, primary backing = the same file
#   sync      blkrep pair on loopback, sync mode
#   async-plain, sync-plain   the same with resource.insecure = true (no TLS): the cost of
#             the encrypted link is async / async-plain
#   async-journal   async with the primary's persistent journal (512M, a file beside the
#             backing, on the same disk): the cost of the journal is async-journal / async
#   async-mirror    async with a second local leg (node.mirror, a file beside the backing,
#             on the same disk): the cost of the local mirror is async-mirror / async
#   async-noebpf    async with `ebpf = "off"`: the cost of the eBPF latency programs
#             (attached to the disk under the backing, as root) is async / async-noebpf
#   async-bpfstats  async with the kernel's BPF run-time statistics on during each job
#             (kernel.bpf_stats_enabled=1): the CPU time the programs took, per request and
#             as a share of the machine's CPU time during the job (an upper bound of the
#             throughput they can cost a CPU-bound run), without the noise of an A/B
# The replica's backing lives in --replica-dir (default /dev/shm): a remote node has a disk
# of its own, so by default the replica does not compete for this disk (it still competes
# for the CPUs). --replica-dir on the same disk as --dir shows the same-disk case.
# Jobs: 4k random write qd1, 4k random write qd32, 1 MiB sequential write qd8.
#
# Usage: bash scripts/bench.sh [--rounds N] [--runtime SECONDS] [--size SIZE] [--dir DIR]
#                              [--replica-dir DIR] [--only "raw nbdkit ..."]
# Results: target/bench/<round>-<job>-<contender>.json and target/bench/summary.md
# (medians with min–max over the rounds, and ratios to raw and nbdkit).
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=3
RUNTIME=5
SIZE=1G
DIR=/var/tmp/blkrep-bench
REPLICA_DIR=/dev/shm/blkrep-bench
ONLY="raw nbdkit qemu-nbd async sync"
while [ $# -gt 0 ]; do
  case "$1" in
    --rounds) ROUNDS=$2; shift 2 ;;
    --runtime) RUNTIME=$2; shift 2 ;;
    --size) SIZE=$2; shift 2 ;;
    --dir) DIR=$2; shift 2 ;;
    --replica-dir) REPLICA_DIR=$2; shift 2 ;;
    --only) ONLY=$2; shift 2 ;;
    *) echo "bench: unknown argument $1" >&2; exit 2 ;;
  esac
done
[ -d "$HOME/.cargo/bin" ] && export PATH="$HOME/.cargo/bin:$PATH"
bash scripts/install-deps.sh
cargo build --release --locked --bins >/dev/null
BIN=$PWD/target/release
OUT=$PWD/target/bench
rm -rf "$OUT" && mkdir -p "$OUT"
mkdir -p "$DIR"
IMG=$DIR/bench.img
mkdir -p "$REPLICA_DIR"
REPLICA=$REPLICA_DIR/replica.img
RUN=$DIR/run
mkdir -p "$RUN"

pids=()
cleanup() {
  for p in "${pids[@]:-}"; do [ -n "$p" ] && kill "$p" 2>/dev/null || true; done
  for m in async sync async-plain sync-plain async-journal async-mirror async-noebpf async-bpfstats; do
    [ -f "$DIR/$m.toml" ] && for n in alpha beta; do
      "$BIN/blkrep" --config "$DIR/$m.toml" --node $n down --timeout 20 >/dev/null 2>&1 || true
    done
  done
}
trap '[ -w /proc/sys/kernel/bpf_stats_enabled ] && echo 0 >/proc/sys/kernel/bpf_stats_enabled; cleanup; case "$REPLICA_DIR" in /dev/shm/*) rm -rf "$REPLICA_DIR";; esac' EXIT

bytes=$(numfmt --from=iec "$SIZE")
echo "bench: preconditioning $IMG and $REPLICA ($SIZE, non-zero data)"
for f in "$IMG" "$REPLICA"; do
  if [ ! -f "$f" ] || [ "$(stat -c %s "$f")" != "$bytes" ]; then
    rm -f "$f"
    direct=1; [ "$(stat -f -c %T "$(dirname "$f")")" = tmpfs ] && direct=0
    fio --name=pre --filename="$f" --size="$bytes" --rw=write --bs=1M --direct=$direct \
        --ioengine=libaio --iodepth=8 --refill_buffers --output=/dev/null
  fi
done

port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

mkdir -p "$DIR/keys"
for n in alpha beta; do
  "$BIN/blkrep" keygen --force --out "$DIR/keys/$n" >"$DIR/keys/$n.toml"
done
tls_lines() { # node contender
  case "$2" in *-plain) ;; *) grep -E '^(key|cert|fingerprint) =' "$DIR/keys/$1.toml" ;; esac
}

journal_lines() { # contender
  case "$1" in *-journal) printf 'journal = "%s"\njournal_size = "512M"\n' "$DIR/alpha.journal" ;; esac
}

mirror_lines() { # contender
  case "$1" in *-mirror) printf 'mirror = "%s"\n' "$DIR/alpha-mirror.img" ;; esac
}

ebpf_lines() { # contender
  case "$1" in *-noebpf) echo 'ebpf = "off"' ;; esac
}

write_config() { # contender: async, sync, async-plain, sync-plain, async-journal, async-noebpf
  local c=$1 m=${1%%-*} insecure=false
  case "$c" in *-plain) insecure=true ;; esac
  cat >"$DIR/$c.toml" <<EOF
[resource]
name = "r0"
size = $bytes
mode = "$m"
run_dir = "$RUN/$c"
frontend = "nbd"
insecure = $insecure

[[node]]
name = "alpha"
address = "127.0.0.1:$(port)"
backing = "$IMG"
metadata = "$DIR/alpha-$c.md"
$(tls_lines alpha "$c")
$(journal_lines "$c")
$(mirror_lines "$c")
$(ebpf_lines "$c")

[[node]]
name = "beta"
address = "127.0.0.1:$(port)"
backing = "$REPLICA"
metadata = "$DIR/beta-$c.md"
$(tls_lines beta "$c")
$(ebpf_lines "$c")
EOF
}

wait_mirror() { # config: until leg 1 is healthy
  for _ in $(seq 6000); do
    "$BIN/blkrep" --config "$1" --node alpha status --json |
      python3 -c 'import json,sys; sys.exit(0 if json.load(sys.stdin)["legs"][1]["state"]=="healthy" else 1)' && return 0
    sleep 0.1
  done
  echo "bench: the mirror never became healthy" >&2; exit 1
}

wait_sock() { for _ in $(seq 200); do [ -S "$1" ] && return 0; sleep 0.05; done; echo "bench: $1 never appeared" >&2; exit 1; }

wait_in_sync() { # config
  for _ in $(seq 6000); do
    if "$BIN/blkrep" --config "$1" --node alpha status --json | python3 -c '
import json,sys
e=json.load(sys.stdin)["engine"]
sys.exit(0 if e["conn"]=="connected" and e["lag_items"]==0 and e["resync"] is None and e["acked_seq"]==e["last_seq"] else 1)'; then
      return 0
    fi
    sleep 0.1
  done
  echo "bench: pair never got in sync" >&2; exit 1
}

JOBS="4k-randwrite-qd1 4k-randwrite-qd32 1m-write-qd8"
job_args() {
  case "$1" in
    4k-randwrite-qd1) echo "--rw=randwrite --bs=4k --iodepth=1" ;;
    4k-randwrite-qd32) echo "--rw=randwrite --bs=4k --iodepth=32" ;;
    1m-write-qd8) echo "--rw=write --bs=1M --iodepth=8" ;;
  esac
}

run_fio() { # round job contender engine-args...
  local r=$1 j=$2 c=$3; shift 3
  # shellcheck disable=SC2046
  fio --name="$j" $(job_args "$j") --time_based --runtime="$RUNTIME" --ramp_time=1 \
      --size="$bytes" --randrepeat=0 --norandommap --group_reporting \
      --output-format=json --output="$OUT/$r-$j-$c.json" "$@" >/dev/null
  python3 - "$OUT/$r-$j-$c.json" "$r" "$j" "$c" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))["jobs"][0]["write"]
print(f"  round {sys.argv[2]} {sys.argv[3]:<18} {sys.argv[4]:<9} {d['iops']:>10.0f} IOPS {d['bw_bytes']/2**20:>9.1f} MiB/s")
PY
}

nbd_fio() { # round contender uri
  local r=$1 c=$2 uri=$3
  for j in $JOBS; do run_fio "$r" "$j" "$c" --ioengine=nbd --uri="$uri"; done
}

for r in $(seq "$ROUNDS"); do
  echo "bench: round $r of $ROUNDS"
  # Even rounds run the contenders in reverse order: whatever the order itself costs (the
  # disk's state after the previous contender, a warm cache) falls on each side in turn.
  order=$ONLY
  if [ $((r % 2)) = 0 ]; then order=$(tr ' ' '\n' <<<"$ONLY" | tac | tr '\n' ' '); fi
  for c in $order; do
    case "$c" in
      raw)
        for j in $JOBS; do run_fio "$r" "$j" raw --ioengine=io_uring --direct=1 --filename="$IMG"; done ;;
      nbdkit)
        rm -f "$RUN/nbdkit.sock"
        nbdkit -f -U "$RUN/nbdkit.sock" -e vol file "$IMG" & pids+=($!)
        wait_sock "$RUN/nbdkit.sock"
        nbd_fio "$r" nbdkit "nbd+unix:///vol?socket=$RUN/nbdkit.sock"
        kill "${pids[-1]}"; wait "${pids[-1]}" 2>/dev/null || true ;;
      qemu-nbd)
        rm -f "$RUN/qemu.sock"
        qemu-nbd -t -f raw -x vol -k "$RUN/qemu.sock" --cache=none --aio=io_uring "$IMG" & pids+=($!)
        wait_sock "$RUN/qemu.sock"
        nbd_fio "$r" qemu-nbd "nbd+unix:///vol?socket=$RUN/qemu.sock"
        kill "${pids[-1]}"; wait "${pids[-1]}" 2>/dev/null || true ;;
      async|sync|async-plain|sync-plain|async-journal|async-mirror|async-noebpf|async-bpfstats)
        write_config "$c"
        cfg=$DIR/$c.toml
        [ "$c" = async-mirror ] && truncate -s "$bytes" "$DIR/alpha-mirror.img"
        for n in alpha beta; do
          "$BIN/blkrep" --config "$cfg" --node $n create-md --force >/dev/null
          "$BIN/blkrep" --config "$cfg" --node $n up >/dev/null
        done
        "$BIN/blkrep" --config "$cfg" --node alpha promote --timeout 30 >/dev/null
        wait_in_sync "$cfg"   # the initial full sync of a new pair
        [ "$c" = async-mirror ] && wait_mirror "$cfg"   # the mirror's initial full copy
        for j in $JOBS; do
          if [ "$c" = async-bpfstats ]; then
            echo 1 >/proc/sys/kernel/bpf_stats_enabled
            "$BIN/blkrep" --config "$cfg" --node alpha latency --json >"$OUT/$r-$j-$c.before.lat"
          fi
          run_fio "$r" "$j" "$c" --ioengine=nbd --uri="nbd+unix:///r0?socket=$RUN/$c/r0-alpha.nbd"
          if [ "$c" = async-bpfstats ]; then
            "$BIN/blkrep" --config "$cfg" --node alpha latency --json >"$OUT/$r-$j-$c.after.lat"
            echo 0 >/proc/sys/kernel/bpf_stats_enabled
          fi
          wait_in_sync "$cfg" # an async backlog must not spill into the next job
        done
        for n in alpha beta; do "$BIN/blkrep" --config "$cfg" --node $n down --timeout 60 >/dev/null; done ;;
      *) echo "bench: unknown contender $c" >&2; exit 2 ;;
    esac
  done
done

python3 scripts/bench_report.py "$OUT" "$ROUNDS" "$RUNTIME" "$SIZE" "$REPLICA_DIR" | tee "$OUT/summary.md"
