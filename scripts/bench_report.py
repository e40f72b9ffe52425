#!/usr/bin/env python3
"""Summarise scripts/bench.sh results: median (min-max) per job and contender, ratios of
medians to raw and to nbdkit. Usage: bench_report.py DIR ROUNDS RUNTIME SIZE REPLICA_DIR"""
import glob
import json
import os
import statistics
import sys

out, rounds, runtime, size, replica = sys.argv[1:6]
KNOWN = ["raw", "nbdkit", "qemu-nbd", "async", "sync", "async-plain", "sync-plain", "async-journal", "async-noebpf"]
res = {}
for f in glob.glob(os.path.join(out, "*.json")):
    r, rest = os.path.basename(f)[:-5].split("-", 1)
    contender = next(c for c in sorted(KNOWN, key=len, reverse=True) if rest.endswith("-" + c))
    job = rest[: -len(contender) - 1]
    w = json.load(open(f))["jobs"][0]["write"]
    p = w["clat_ns"].get("percentile", {})
    res.setdefault(job, {}).setdefault(contender, []).append(
        {
            "round": int(r),
            "iops": w["iops"],
            "mibs": w["bw_bytes"] / 2**20,
            "p50": p.get("50.000000", 0) / 1000,
            "p99": p.get("99.000000", 0) / 1000,
        }
    )

order = KNOWN
print(f"# fio results: {rounds} rounds x {runtime} s per job, {size} preconditioned file, replica in {replica}\n")
for job in sorted(res):
    unit = "mibs" if job.startswith("1m") else "iops"
    label = "MiB/s" if unit == "mibs" else "IOPS"
    med = {c: statistics.median(x[unit] for x in v) for c, v in res[job].items()}
    print(f"## {job}\n")
    print(f"| contender | {label} median (min–max) | p50 µs | p99 µs | × raw | × nbdkit |")
    print("|---|---|---|---|---|---|")
    for c in order:
        if c not in res[job]:
            continue
        v = [x[unit] for x in res[job][c]]
        p50 = statistics.median(x["p50"] for x in res[job][c])
        p99 = statistics.median(x["p99"] for x in res[job][c])
        xr = f"{med[c] / med['raw']:.2f}" if med.get("raw") else "–"
        xn = f"{med[c] / med['nbdkit']:.2f}" if med.get("nbdkit") else "–"
        print(
            f"| {c} | {med[c]:.0f} ({min(v):.0f}–{max(v):.0f}) | {p50:.0f} | {p99:.0f} | {xr} | {xn} |"
        )
    print()
    # Same-round ratios of A to B (interleaved in one run): median and spread.
    for a, b in [("async", "async-plain"), ("sync", "sync-plain"), ("async-journal", "async"), ("async", "async-noebpf")]:
        if a in res[job] and b in res[job]:
            rb = {x["round"]: x[unit] for x in res[job][b]}
            ratios = sorted(x[unit] / rb[x["round"]] for x in res[job][a] if rb.get(x["round"]))
            if ratios:
                print(
                    f"- {a} / {b}: {statistics.median(ratios):.3f} "
                    f"(per round {min(ratios):.3f}–{max(ratios):.3f}, {len(ratios)} rounds)"
                )
    print()
