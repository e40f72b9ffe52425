//! Human-readable renderings of status and metadata.

use blkrep_common::control::DaemonStatus;
use blkrep_engine::meta::Metadata;
use blkrep_engine::ConnState;
use std::fmt::Write;

pub use blkrep_common::human_bytes as bytes;

fn word<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_value(v)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_else(|| "?".into())
}

/// The `status` page.
pub fn status(s: &DaemonStatus) -> String {
    let e = &s.engine;
    let mut o = String::new();
    let _ = writeln!(
        o,
        "{}/{}: {} {} (generation {:016x}, {} mode, pid {})",
        s.resource,
        s.node,
        word(&e.role),
        word(&e.disk_state),
        e.generation,
        word(&e.mode),
        s.pid
    );
    let peer = match (&e.peer_role, &e.peer_disk_state) {
        (Some(r), Some(d)) => format!(" — peer is {} {}", word(r), word(d)),
        _ => String::new(),
    };
    let _ = writeln!(
        o,
        "  peer {} ({}): {}{peer}",
        s.peer,
        s.peer_address,
        word(&e.conn)
    );
    if let Some(r) = &e.refused_reason {
        let _ = writeln!(o, "    refused: {r}");
    }
    if s.link_security == "insecure" {
        let _ = writeln!(
            o,
            "  LINK INSECURE: plaintext and unauthenticated (resource.insecure = true); anyone \
             on the path can read or forge replication traffic"
        );
    } else if !s.link_security.is_empty() {
        let _ = writeln!(o, "  link {}", s.link_security);
    }
    if let (Some(le), false) = (&s.link_last_error, e.conn == ConnState::Connected) {
        let _ = writeln!(
            o,
            "    last link failure {:.0}s ago: {}",
            le.seconds_ago, le.message
        );
    }
    if e.split_brain {
        let _ = writeln!(
            o,
            "  SPLIT BRAIN: both nodes took writes separately; no data moves. See `blkrep \
             failback --plan`, then run `blkrep resolve --discard-local` on the losing node."
        );
    }
    if let Some(d) = &s.drill {
        let _ = writeln!(
            o,
            "  DRILL since {}: clone on {} ({} of the cut preserved, {} written by the clone){}",
            d.since,
            d.device.as_deref().unwrap_or(&d.nbd),
            bytes(d.preserved_bytes),
            bytes(d.clone_written_bytes),
            d.broken
                .as_deref()
                .map(|b| format!("; BROKEN: {b}"))
                .unwrap_or_default()
        );
    }
    if s.legs.len() > 1 || s.local == "failed" {
        let _ = writeln!(
            o,
            "  local: {}",
            match s.local.as_str() {
                "healthy" => "healthy (2 legs)".to_string(),
                "degraded" => "DEGRADED: running without its redundancy".to_string(),
                other => other.to_uppercase(),
            }
        );
        for l in &s.legs {
            let mut line = format!("    leg {} {}: {}", l.index, l.path, l.state);
            if !l.reason.is_empty() && l.state != "healthy" {
                line += &format!(" ({}, since {})", l.reason, l.since);
            }
            if let Some(r) = &l.rebuild {
                line += &format!(
                    ", {} of {} copied from leg {}",
                    bytes(r.copied_bytes),
                    bytes(r.total_bytes),
                    r.source
                );
            } else if l.lacks_bytes > 0 {
                line += &format!(", lacks {}", bytes(l.lacks_bytes));
            }
            let _ = writeln!(o, "{line}");
        }
    }
    if let Some(pg) = e.peer_generation {
        let rel = e
            .relation
            .map(|r| word(&r))
            .unwrap_or_else(|| "unknown".into());
        let _ = writeln!(o, "  peer generation {pg:016x} ({rel})");
    }
    let ro = if s.export_read_only {
        " (read-only)"
    } else {
        ""
    };
    match (&s.device, s.device_state.as_deref()) {
        (Some(d), Some("held")) => {
            let _ = writeln!(
                o,
                "  device {d}: recovered after a crash, I/O held until this node is promoted"
            );
        }
        (Some(d), Some(st)) if st != "live" => {
            let _ = writeln!(o, "  device {d} ({st}){ro}");
        }
        (Some(d), _) => {
            let _ = writeln!(o, "  device {d}{ro}");
        }
        (None, Some(st)) => {
            let _ = writeln!(o, "  device: none ({st})");
        }
        (None, None) => {
            let _ = writeln!(o, "  export {}{ro}", s.export);
        }
    }
    if e.role == blkrep_engine::Role::Primary {
        let _ = writeln!(
            o,
            "  stream: last seq {}, peer applied {}",
            e.last_seq, e.acked_seq
        );
    } else {
        let _ = writeln!(o, "  stream: applied seq {}", e.applied_seq);
    }
    let _ = writeln!(
        o,
        "  lag: {} items, {}, {:.3} s behind",
        e.lag_items,
        bytes(e.lag_bytes),
        e.lag_seconds
    );
    let _ = writeln!(
        o,
        "  in flight: {} writes, {}",
        e.writes_in_flight,
        bytes(e.bytes_in_flight)
    );
    if let Some(j) = &e.journal {
        let pct = j.used as f64 * 100.0 / j.capacity.max(1) as f64;
        let _ = writeln!(
            o,
            "  journal: {}, {} used ({pct:.1}% of {}), {} records{}{}",
            j.state,
            bytes(j.used),
            bytes(j.capacity),
            j.records,
            if j.overflows > 0 {
                format!(", overflowed {} times", j.overflows)
            } else {
                String::new()
            },
            if j.replay_pending > 0 {
                format!(
                    ", {} items from before the crash replayed at the next promote",
                    j.replay_pending
                )
            } else {
                String::new()
            }
        );
    }
    if let Some(u) = &e.undo {
        let _ = match u.state.as_str() {
            "active" | "rolling-back" => writeln!(
                o,
                "  catch-up protection: {} (a takeover rolls back to sequence {}); undo log {} \
                 saved, {} of {} used",
                u.state,
                u.rollback_seq.unwrap_or(0),
                bytes(u.saved_bytes),
                bytes(u.used),
                bytes(u.capacity)
            ),
            state => writeln!(
                o,
                "  catch-up protection: {state}; since start {} completed, {} rolled back, {} \
                 dropped (undo log full or failed)",
                u.completed, u.rollbacks, u.dropped
            ),
        };
    }
    if let Some(r) = &e.resync {
        let pct = if r.total_bytes > 0 {
            r.done_bytes as f64 * 100.0 / r.total_bytes as f64
        } else {
            100.0
        };
        let _ = writeln!(
            o,
            "  resync: {pct:.1}% ({} of {}) at {}/s",
            bytes(r.done_bytes),
            bytes(r.total_bytes),
            bytes(r.rate_bytes_per_sec as u64)
        );
    }
    if e.peer_needs_full_sync && e.resync.is_none() {
        let _ = writeln!(
            o,
            "  the peer lacks {} that only a resync brings (starts when it connects)",
            bytes(e.out_of_sync_bytes)
        );
    }
    if let Some(v) = &e.verify {
        let state = match (&v.aborted, v.done) {
            (Some(why), _) => format!("aborted ({why})"),
            (None, true) => "done".into(),
            (None, false) => format!(
                "{:.0}% checked",
                v.checked_bytes as f64 * 100.0 / v.total_bytes.max(1) as f64
            ),
        };
        let _ = writeln!(
            o,
            "  verify: {state}, {} differ{}",
            bytes(v.out_of_sync_bytes),
            if v.repair { " (repairing)" } else { "" }
        );
    }
    let _ = writeln!(
        o,
        "  since start: {} writes/trims/zeroes ({}), {} reads ({}), {} flushes, {} connects, up {:.0} s",
        e.client_writes,
        bytes(e.bytes_written),
        e.client_reads,
        bytes(e.bytes_read),
        e.flushes,
        e.connects,
        s.uptime_seconds
    );
    o
}

/// The `dump-md` page.
pub fn metadata(m: &Metadata) -> String {
    use blkrep_engine::meta::{FLAG_CLEAN, FLAG_PEER_NEEDS_FULL_SYNC};
    let mut o = String::new();
    let _ = writeln!(o, "resource      {}", m.resource);
    let _ = writeln!(o, "node          {}", m.node);
    let _ = writeln!(
        o,
        "volume size   {} ({})",
        m.volume_size,
        bytes(m.volume_size)
    );
    let _ = writeln!(o, "node uuid     {:016x}", m.node_uuid);
    let _ = writeln!(o, "generation    {:016x}", m.generation);
    let hist: Vec<String> = m.history.iter().map(|g| format!("{g:016x}")).collect();
    let _ = writeln!(
        o,
        "history       {}",
        if hist.is_empty() {
            "(none)".to_string()
        } else {
            hist.join(" ")
        }
    );
    let _ = writeln!(o, "applied seq   {}", m.applied_seq);
    let _ = writeln!(o, "role          {}", word(&m.role));
    let _ = writeln!(o, "disk state    {}", word(&m.disk_state));
    let _ = writeln!(o, "clean stop    {}", m.has(FLAG_CLEAN));
    let _ = writeln!(
        o,
        "dirty         {} in {} ranges (blocks of {}; activity-log extents included)",
        bytes(m.dirty.bytes()),
        m.dirty.ranges(),
        bytes(m.dirty.block())
    );
    let _ = writeln!(
        o,
        "peer needs full sync  {}",
        m.has(FLAG_PEER_NEEDS_FULL_SYNC)
    );
    let _ = writeln!(o, "update counter {}", m.counter);
    o
}

/// The `failback --plan` page.
pub fn plan(v: &serde_json::Value) -> String {
    let mut o = String::new();
    let s = |k: &str| v[k].as_str().unwrap_or("?").to_string();
    let gen = |k: &str| {
        v[k].as_u64()
            .map(|g| format!("{g:016x}"))
            .unwrap_or_else(|| "unknown".into())
    };
    let _ = writeln!(o, "failback plan (nothing moves until the nodes connect)");
    let _ = writeln!(
        o,
        "  peer          {}{}",
        v["peer"].as_str().unwrap_or("not heard from"),
        if v["peer_connected"].as_bool() == Some(true) {
            " (connected)"
        } else {
            " (not connected)"
        }
    );
    let _ = writeln!(
        o,
        "  this node     {} generation {}",
        s("role"),
        gen("local_generation")
    );
    let _ = writeln!(o, "  peer          generation {}", gen("peer_generation"));
    let _ = writeln!(
        o,
        "  relation      {}",
        v["relation"].as_str().unwrap_or("unknown")
    );
    let _ = writeln!(o, "  direction     {}", s("direction"));
    let _ = writeln!(o, "  method        {}", s("method"));
    let bytes_n = v["bytes"].as_u64().unwrap_or(0);
    let _ = writeln!(
        o,
        "  to move       {} ({} blocks of {})",
        bytes(bytes_n),
        v["blocks"].as_u64().unwrap_or(0),
        bytes(v["block_size"].as_u64().unwrap_or(4096))
    );
    let _ = writeln!(o, "  {}", s("summary"));
    o
}

/// A latency in microseconds, in the unit that reads best.
pub fn micros(us: f64) -> String {
    if us >= 1_000_000.0 {
        format!("{:.2} s", us / 1_000_000.0)
    } else if us >= 1000.0 {
        format!("{:.2} ms", us / 1000.0)
    } else {
        format!("{us:.0} µs")
    }
}

/// One histogram, biolatency style: a row per log2 slot with a bar.
fn histogram(out: &mut String, h: &blkrep_common::latency::Histogram) {
    use blkrep_common::latency::slot_bounds;
    let max = h.slots.iter().copied().max().unwrap_or(0).max(1);
    let first = h.slots.iter().position(|&c| c > 0).unwrap_or(0);
    let _ = writeln!(out, "  {:>21} : {:<9} distribution", "usecs", "count");
    for (i, &c) in h.slots.iter().enumerate().skip(first) {
        let (lo, hi) = slot_bounds(i);
        let bar = "*".repeat(((c * 40).div_ceil(max)) as usize);
        let _ = writeln!(
            out,
            "  {:>10} -> {:<8}: {:<9} |{bar:<40}|",
            lo as u64,
            hi as u64 - 1,
            c
        );
    }
}

fn summary_line(h: &blkrep_common::latency::Histogram) -> String {
    format!(
        "count {}  mean {}  p50 {}  p99 {}  p99.9 {}",
        h.count,
        micros(h.mean_us()),
        micros(h.p50_us),
        micros(h.p99_us),
        micros(h.p999_us)
    )
}

/// `blkrep latency`: the eBPF state, then each device/operation and each stage that has
/// samples (all stages with `all`).
pub fn latency(r: &blkrep_common::latency::LatencyReport, all: bool) -> String {
    let mut out = String::new();
    let e = &r.ebpf;
    match e.state.as_str() {
        "active" => {
            let _ = writeln!(
                out,
                "eBPF: active ({}) on {}",
                e.attach.as_deref().unwrap_or("?"),
                e.devices.join(", ")
            );
        }
        other => {
            let _ = writeln!(
                out,
                "eBPF: {other}: {} (block-device histograms missing; the stages below are the daemon's)",
                e.reason.as_deref().unwrap_or("no reason given")
            );
        }
    }
    if !e.programs.is_empty() {
        let runs: u64 = e.programs.iter().map(|p| p.run_count).sum();
        let ns: u64 = e.programs.iter().map(|p| p.run_time_ns).sum();
        let _ = writeln!(
            out,
            "eBPF cost (kernel.bpf_stats_enabled): {} runs, {:.0} ns per run, {:.3} s of CPU in all",
            runs,
            ns as f64 / runs.max(1) as f64,
            ns as f64 / 1e9
        );
    }
    let _ = writeln!(out, "over the last {:.1} s", r.uptime_s);
    for d in &r.devices {
        if d.hist.count == 0 && !all {
            continue;
        }
        let _ = writeln!(
            out,
            "\n{} {} ({}, {}): {}",
            d.device,
            d.op,
            d.role,
            d.dev,
            summary_line(&d.hist)
        );
        histogram(&mut out, &d.hist);
    }
    for s in &r.stages {
        if s.hist.count == 0 && !all {
            continue;
        }
        let _ = writeln!(
            out,
            "\nstage {} ({}): {}",
            s.stage,
            s.what,
            summary_line(&s.hist)
        );
        histogram(&mut out, &s.hist);
    }
    if r.devices.iter().all(|d| d.hist.count == 0) && r.stages.iter().all(|s| s.hist.count == 0) {
        let _ = writeln!(out, "\nno I/O yet");
    }
    out
}

/// What happened between two reports (for `--watch`): counts and slots subtracted, the
/// quantiles recomputed from the slots of the interval.
pub fn latency_delta(
    now: &blkrep_common::latency::LatencyReport,
    before: &blkrep_common::latency::LatencyReport,
) -> blkrep_common::latency::LatencyReport {
    use blkrep_common::latency::{Histogram, SLOTS};
    let sub = |a: &Histogram, b: Option<&Histogram>| {
        let mut slots = [0u64; SLOTS];
        for (i, s) in slots.iter_mut().enumerate() {
            let x = a.slots.get(i).copied().unwrap_or(0);
            let y = b.and_then(|b| b.slots.get(i).copied()).unwrap_or(0);
            *s = x.saturating_sub(y);
        }
        Histogram::from_slots(&slots, a.sum_ns.saturating_sub(b.map_or(0, |b| b.sum_ns)))
    };
    let mut r = now.clone();
    r.uptime_s = now.uptime_s - before.uptime_s;
    for d in &mut r.devices {
        let b = before
            .devices
            .iter()
            .find(|x| x.dev == d.dev && x.op == d.op);
        d.issued -= b.map_or(0, |b| b.issued.min(d.issued));
        d.completed -= b.map_or(0, |b| b.completed.min(d.completed));
        d.hist = sub(&d.hist, b.map(|b| &b.hist));
    }
    for s in &mut r.stages {
        let b = before.stages.iter().find(|x| x.stage == s.stage);
        s.hist = sub(&s.hist, b.map(|b| &b.hist));
    }
    r
}

#[cfg(test)]
mod tests {
    #[test]
    fn sizes() {
        assert_eq!(super::bytes(512), "512 B");
        assert_eq!(super::bytes(1536), "1.5 KiB");
        assert_eq!(super::bytes(3 << 30), "3.0 GiB");
    }

    #[test]
    fn latency_intervals_and_rendering() {
        use blkrep_common::latency::*;
        let hist = |slots: &[u64]| {
            let mut s = [0u64; SLOTS];
            s[..slots.len()].copy_from_slice(slots);
            Histogram::from_slots(&s, slots.iter().sum::<u64>() * 10_000)
        };
        let report = |slots: &[u64], up: f64| LatencyReport {
            ebpf: EbpfState {
                state: "active".into(),
                attach: Some("tp_btf".into()),
                reason: None,
                devices: vec!["loop0 (7:0, backing)".into()],
                programs: vec![],
            },
            uptime_s: up,
            devices: vec![DeviceLatency {
                device: "loop0".into(),
                dev: "7:0".into(),
                role: "backing".into(),
                op: "write".into(),
                issued: slots.iter().sum(),
                completed: slots.iter().sum(),
                hist: hist(slots),
            }],
            stages: vec![StageLatency {
                stage: "client_write".into(),
                what: "client write".into(),
                hist: hist(slots),
            }],
        };
        let before = report(&[0, 0, 0, 5], 10.0);
        let now = report(&[0, 0, 0, 5, 0, 0, 0, 20], 12.0);
        let d = super::latency_delta(&now, &before);
        assert_eq!(d.uptime_s, 2.0);
        let dh = &d.devices[0].hist;
        assert_eq!((dh.count, d.devices[0].completed), (20, 20));
        assert_eq!(dh.slots[3], 0);
        assert!((128.0..256.0).contains(&dh.p50_us), "{}", dh.p50_us);
        assert_eq!(d.stages[0].hist.count, 20);
        let text = super::latency(&d, false);
        assert!(
            text.contains("eBPF: active (tp_btf) on loop0 (7:0, backing)"),
            "{text}"
        );
        assert!(
            text.contains("loop0 write (backing, 7:0): count 20"),
            "{text}"
        );
        assert!(text.contains("128 -> 255"), "{text}");
        assert!(text.contains("stage client_write"), "{text}");
        let mut off = d.clone();
        off.ebpf = EbpfState {
            state: "unavailable".into(),
            attach: None,
            reason: Some("no BTF".into()),
            devices: vec![],
            programs: vec![],
        };
        off.devices.clear();
        assert!(super::latency(&off, false).contains("eBPF: unavailable: no BTF"));
    }
}
