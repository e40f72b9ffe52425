#!/usr/bin/env python3
"""Summarise scripts/bench.sh results: median (min-max) per job and contender, ratios of
medians to raw and to nbdkit. Usage: bench_report.py DIR ROUNDS RUNTIME SIZE REPLICA_DIR"""
import glob
import json
import os
import statistics
import sys

out, rounds, runtime, size, replica = sys.argv[1:6]
KNOWN = ["raw", "nbdkit", "qemu-nbd", "async", "sync", "async-plain", "sync-plain", "async-journal", "async-mirror", "async-noebpf", "async-bpfstats"]
res = {}
CPUS = os.cpu_count() or 1
RUNTIME = float(runtime)
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
    # BPF run-time statistics around the job (async-bpfstats): the programs' CPU time.
    before, after = f[:-5] + ".before.lat", f[:-5] + ".after.lat"
    if os.path.exists(before) and os.path.exists(after):
        def cost(path):
            progs = json.load(open(path))["ebpf"].get("programs", [])
            return sum(p["run_time_ns"] for p in progs), sum(p["run_count"] for p in progs)
        (t0, n0), (t1, n1) = cost(before), cost(after)
        ios = w["total_ios"]
        res[job][contender][-1]["bpf"] = {
            "ns_per_run": (t1 - t0) / max(n1 - n0, 1),
            "ns_per_io": (t1 - t0) / max(ios, 1),
            # fio's runtime plus its ramp: the programs ran all along.
            "cpu_share": (t1 - t0) / ((RUNTIME + 1) * 1e9 * CPUS),
        }

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
    bpf = [x["bpf"] for x in res[job].get("async-bpfstats", []) if "bpf" in x]
    if bpf:
        share = sorted(b["cpu_share"] * 100 for b in bpf)
        per_io = sorted(b["ns_per_io"] for b in bpf)
        per_run = sorted(b["ns_per_run"] for b in bpf)
        print(
            f"- eBPF programs (async-bpfstats, {len(bpf)} rounds): "
            f"{statistics.median(per_run):.0f} ns per run ({per_run[0]:.0f}–{per_run[-1]:.0f}), "
            f"{statistics.median(per_io):.0f} ns per client write ({per_io[0]:.0f}–{per_io[-1]:.0f}), "
            f"{statistics.median(share):.2f}% of the {CPUS} CPUs' time ({share[0]:.2f}–{share[-1]:.2f}%)"
        )
    print()
    # Same-round ratios of A to B (interleaved in one run): median and spread.
    for a, b in [("async", "async-plain"), ("sync", "sync-plain"), ("async-journal", "async"), ("async-mirror", "async"), ("async", "async-noebpf")]:
        if a in res[job] and b in res[job]:
            rb = {x["round"]: x[unit] for x in res[job][b]}
            ratios = sorted(x[unit] / rb[x["round"]] for x in res[job][a] if rb.get(x["round"]))
            if ratios:
                print(
                    f"- {a} / {b}: {statistics.median(ratios):.3f} "
                    f"(per round {min(ratios):.3f}–{max(ratios):.3f}, {len(ratios)} rounds)"
                )
    print()
