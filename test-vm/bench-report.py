#!/usr/bin/env python3
"""Turn the console log of the VM benchmark (test-vm/scenarios/bench.sh) into Markdown.

Usage: python3 test-vm/bench-report.py [LOG] [-o FILE]
       (LOG defaults to target/test-vm/logs/bench.log)

The scenario prints one line per fio job:
  @@BENCH contender=C job=J round=R iops=N bw_mib=F p50us=N p99us=N io_mib=N dev_mib=F
         link_mib=F drain_s=F busy=N top=thread:pct,...@@
plus @@BENCH-META ...@@ (the guest and the knobs) and @@BENCH-DONE ...@@ at the end.

Output: per job, the median (min-max over the rounds) of each contender's IOPS, MiB/s and
completion latency; the ratios blkrep/DRBD (async vs protocol A, sync vs protocol C) and each
contender vs the bare loop device, both as the ratio of the medians and as the median
(min-max) of the per-round ratios (contenders of one round ran back to back). Exit status 1
when the log holds no result or the run did not finish (what there is is still printed).
"""

import argparse
import re
import statistics
import sys
from collections import defaultdict

CONTENDERS = ["loop", "blkrep-async", "blkrep-sync", "drbd-A", "drbd-C"]
JOB_TITLES = {
    "4k-randwrite-qd32": "4k random write, iodepth 32",
    "1m-write-qd8": "1 MiB sequential write, iodepth 8",
}
# The figure the ratios compare: IOPS for small blocks, MiB/s for large ones (with a fixed
# block size the two ratios are the same).
HEADLINE = {"4k-randwrite-qd32": "iops", "1m-write-qd8": "bw_mib"}
PAIRS = [
    ("blkrep-async", "drbd-A", "blkrep async / DRBD protocol A"),
    ("blkrep-sync", "drbd-C", "blkrep sync / DRBD protocol C"),
    ("blkrep-async", "loop", "blkrep async / loop"),
    ("blkrep-sync", "loop", "blkrep sync / loop"),
    ("drbd-A", "loop", "DRBD A / loop"),
    ("drbd-C", "loop", "DRBD C / loop"),
]
LINE = re.compile(r"@@(BENCH(?:-META|-DONE)?) (.*?)@@")


def parse(path):
    meta, done, rows = {}, None, []
    with open(path, encoding="utf-8", errors="replace") as f:
        for text in f:
            m = LINE.search(text)
            if not m:
                continue
            fields = dict(kv.split("=", 1) for kv in m.group(2).split() if "=" in kv)
            if m.group(1) == "BENCH-META":
                meta = fields
            elif m.group(1) == "BENCH-DONE":
                done = fields
            else:
                for k in ("iops", "bw_mib", "p50us", "p99us", "io_mib", "dev_mib", "link_mib", "drain_s", "busy"):
                    if k in fields:
                        fields[k] = float(fields[k])
                fields["round"] = int(fields["round"])
                rows.append(fields)
    return meta, done, rows


def fmt(v):
    if v >= 100:
        return f"{v:.0f}"
    if v >= 10:
        return f"{v:.1f}"
    return f"{v:.2f}"


def mmm(values):
    """median (min–max)"""
    if not values:
        return "–"
    med = statistics.median(values)
    if len(values) == 1:
        return fmt(med)
    return f"{fmt(med)} ({fmt(min(values))}–{fmt(max(values))})"


def spread(values):
    if len(values) < 2:
        return "–"
    med = statistics.median(values)
    return f"{(max(values) - min(values)) / med * 100:.0f} %" if med else "–"


def verdict(ratio_med, per_round):
    if ratio_med is None:
        return "not measured"
    lo, hi = (min(per_round), max(per_round)) if per_round else (ratio_med, ratio_med)
    if lo >= 1.0:
        return "**yes** (every round)"
    if ratio_med >= 1.0:
        return "yes on the medians, not in every round"
    if hi >= 1.0:
        return "no on the medians (some rounds yes)"
    return "**no** (no round)"


def report(meta, done, rows, log):
    out = []
    jobs = [j for j in JOB_TITLES if any(r["job"] == j for r in rows)]
    jobs += sorted({r["job"] for r in rows} - set(jobs))
    contenders = [c for c in CONTENDERS if any(r["contender"] == c for r in rows)]
    by = defaultdict(list)  # (job, contender) -> rows
    for r in rows:
        by[(r["job"], r["contender"])].append(r)
    rounds = sorted({r["round"] for r in rows})

    out.append(f"Source: `{log}`" + ("" if done else " — **incomplete run** (no BENCH-DONE line)"))
    if meta:
        out.append("")
        out.append(
            f"Guest: kernel {meta.get('kernel')}, {meta.get('cpus')} vCPUs (qemu TCG), "
            f"{meta.get('mem_mib')} MiB; {meta.get('fio')}, blkrep {meta.get('blkrep')}, "
            f"DRBD {meta.get('drbd')} (drbd.ko of that kernel). Rounds {len(rounds)} "
            f"(asked {meta.get('rounds')}), {meta.get('runtime')} s per job after "
            f"{meta.get('ramp')} s ramp, volume {meta.get('size_mib')} MiB, netem delay "
            f"{meta.get('delay')}. In the guest: blake3 {meta.get('blake3_mibs')} MiB/s "
            f"(one thread), dd /dev/zero → /dev/null {meta.get('copy_mibs')} MiB/s."
        )
    for j in jobs:
        out.append("")
        out.append(f"#### {JOB_TITLES.get(j, j)}")
        out.append("")
        out.append(
            "| contender | IOPS | MiB/s | p50 µs | p99 µs | spread | link bytes per byte written "
            "| drain s | guest CPU % | busiest threads (% of a CPU, last round) |"
        )
        out.append("|---|---|---|---|---|---|---|---|---|---|")
        for c in contenders:
            rs = sorted(by[(j, c)], key=lambda r: r["round"])
            if not rs:
                continue
            head = [r[HEADLINE.get(j, "iops")] for r in rs]
            # Bytes on the veth pair (both directions) per byte fio wrote to the device
            # (its ramp included).
            link = [r["link_mib"] / r["dev_mib"] for r in rs if r.get("dev_mib")]
            out.append(
                f"| {c} | {mmm([r['iops'] for r in rs])} | {mmm([r['bw_mib'] for r in rs])} "
                f"| {mmm([r['p50us'] for r in rs])} | {mmm([r['p99us'] for r in rs])} "
                f"| {spread(head)} | {mmm(link) if c != 'loop' else '–'} "
                f"| {mmm([r['drain_s'] for r in rs]) if c != 'loop' else '–'} "
                f"| {mmm([r['busy'] for r in rs if 'busy' in r])} "
                f"| {rs[-1].get('top', '').replace(',', ', ')} |"
            )

    out.append("")
    out.append(
        "*spread*: (max − min) / median of the headline figure (IOPS for 4k, MiB/s for 1 MiB) "
        "over the rounds. *link bytes per byte written*: bytes sent on the veth pair (both "
        "directions: data, headers, acknowledgements) per byte fio wrote to the device (ramp "
        "included). *drain*: seconds from the end of fio until nothing was outstanding (blkrep: "
        "peer acked the last sequence; DRBD: /proc/drbd lo, pe, ua, ap, oos all 0), polled "
        "every ~0.1 s. *guest CPU %*: both vCPUs together, in % of one (200 = saturated). "
        "*busiest threads*: threads alive at the end of the job (fio's own worker has exited "
        "by then and is not listed); `A:blkrepd`/`B:blkrepd` are the primary's and the "
        "secondary's event loops, `drbd_w_/drbd_r_/drbd_a_r0-siteX` DRBD's worker (sender), "
        "receiver and ack threads of the primary (siteA) and secondary (siteB)."
    )
    out.append("")
    out.append("#### Ratios")
    out.append("")
    out.append(
        "IOPS for 4k, MiB/s for 1 MiB. *Of medians*: the ratio of the two medians above; "
        "*per round*: the ratio inside each round (the two contenders ran minutes apart at "
        "most), median (min–max)."
    )
    out.append("")
    out.append("| job | ratio | of medians | per round | ≥ 1? |")
    out.append("|---|---|---|---|---|")
    for j in jobs:
        key = HEADLINE.get(j, "iops")
        for a, b, title in PAIRS:
            ra = {r["round"]: r[key] for r in by[(j, a)]}
            rb = {r["round"]: r[key] for r in by[(j, b)]}
            if not ra or not rb:
                continue
            med = statistics.median(ra.values()) / statistics.median(rb.values())
            per = [ra[k] / rb[k] for k in sorted(ra) if k in rb and rb[k]]
            goal = verdict(med, per) if b != "loop" else ""
            out.append(f"| {JOB_TITLES.get(j, j)} | {title} | {med:.2f} | {mmm(per)} | {goal} |")

    out.append("")
    out.append("#### Per round")
    out.append("")
    out.append(
        "The headline figure of every job. Run order: round 1 loop (4k, then 1 MiB), "
        "blkrep-async (4k, 1 MiB), blkrep-sync, drbd-A, drbd-C, then round 2, ...: a column "
        "that moves together shows the machine, not the contender."
    )
    out.append("")
    out.append("| job | contender | " + " | ".join(f"round {k}" for k in rounds) + " |")
    out.append("|---|---|" + "---|" * len(rounds))
    for j in jobs:
        unit = "IOPS" if HEADLINE.get(j, "iops") == "iops" else "MiB/s"
        for c in contenders:
            vals = {r["round"]: r[HEADLINE.get(j, "iops")] for r in by[(j, c)]}
            cells = [fmt(vals[k]) if k in vals else "–" for k in rounds]
            out.append(f"| {j} ({unit}) | {c} | " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("log", nargs="?", default="target/test-vm/logs/bench.log")
    ap.add_argument("-o", "--output", help="also write the Markdown here")
    args = ap.parse_args()
    meta, done, rows = parse(args.log)
    if not rows:
        print(f"bench-report: no @@BENCH lines in {args.log}", file=sys.stderr)
        return 1
    text = report(meta, done, rows, args.log)
    sys.stdout.write(text)
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            f.write(text)
    if not done:
        print("bench-report: the run did not finish (no BENCH-DONE line)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
