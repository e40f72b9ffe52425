//! Human-readable renderings of status and metadata.

use blkrep_common::control::DaemonStatus;
use blkrep_engine::meta::Metadata;
use blkrep_engine::ConnState;
use std::fmt::Write;

/// `1.5 MiB` style sizes.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

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

#[cfg(test)]
mod tests {
    #[test]
    fn sizes() {
        assert_eq!(super::bytes(512), "512 B");
        assert_eq!(super::bytes(1536), "1.5 KiB");
        assert_eq!(super::bytes(3 << 30), "3.0 GiB");
    }
}
