//! The Prometheus text-format endpoint (`[[node]] metrics = "127.0.0.1:9707"`).
//!
//! A thread accepts HTTP connections, asks the daemon for its status over its own control
//! socket (the same answer `blkrep status --json` gets) and renders the figures in the
//! text exposition format (version 0.0.4). Written by hand: a few lines of HTTP/1.0 on
//! loopback do not justify an HTTP server crate.

use blkrep_common::control::{self, Request};
use serde_json::Value;
use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::time::Duration;

/// Bind the endpoint (a clear startup error when the address is taken).
pub fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr)
}

/// Serve the endpoint from a thread.
pub fn spawn(listener: TcpListener, control_socket: PathBuf) {
    let _ = std::thread::Builder::new()
        .name("metrics".into())
        .spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut conn) = conn else { continue };
                let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
                let _ = conn.set_write_timeout(Some(Duration::from_secs(5)));
                // Read the request head; the path does not matter.
                let mut reader = BufReader::new(match conn.try_clone() {
                    Ok(c) => c,
                    Err(_) => continue,
                });
                let mut line = String::new();
                while reader.read_line(&mut line).map(|n| n > 2).unwrap_or(false) {
                    line.clear();
                }
                let ask = |r: &Request| control::call(&control_socket, r, Duration::from_secs(5));
                let (status, body) = match ask(&Request::Status) {
                    Ok(v) => {
                        let mut body = render(&v);
                        if let Ok(l) = ask(&Request::Latency) {
                            body.push_str(&render_latency(&v, &l));
                        }
                        ("200 OK", body)
                    }
                    Err(e) => ("503 Service Unavailable", format!("# daemon busy: {e}\n")),
                };
                let _ = write!(
                    conn,
                    "HTTP/1.0 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
            }
        });
}

fn num(v: &Value) -> f64 {
    v.as_f64()
        .or_else(|| v.as_bool().map(|b| b as u8 as f64))
        .unwrap_or(0.0)
}

fn node_labels(s: &Value) -> String {
    format!(
        "resource=\"{}\",node=\"{}\"",
        s["resource"].as_str().unwrap_or(""),
        s["node"].as_str().unwrap_or("")
    )
}

/// The latency report as Prometheus summaries (quantiles in seconds, `_sum`, `_count`):
/// `blkrep_block_latency_seconds` per device and operation (eBPF), and
/// `blkrep_stage_latency_seconds` per stage; `blkrep_ebpf_active` says whether the
/// block-device figures exist.
pub fn render_latency(status: &Value, report: &Value) -> String {
    use blkrep_common::latency::{Histogram, LatencyReport};
    let Ok(r) = serde_json::from_value::<LatencyReport>(report.clone()) else {
        return "# latency report unreadable\n".into();
    };
    let base = node_labels(status);
    let mut o = String::new();
    let _ = writeln!(
        o,
        "# HELP blkrep_ebpf_active 1 while the eBPF block-device latency programs are attached"
    );
    let _ = writeln!(o, "# TYPE blkrep_ebpf_active gauge");
    let _ = writeln!(
        o,
        "blkrep_ebpf_active{{{base}}} {}",
        (r.ebpf.state == "active") as u8
    );
    let summary = |o: &mut String, name: &str, labels: &str, h: &Histogram| {
        for (q, v) in [("0.5", h.p50_us), ("0.99", h.p99_us), ("0.999", h.p999_us)] {
            let _ = writeln!(o, "{name}{{{labels},quantile=\"{q}\"}} {}", v / 1e6);
        }
        let _ = writeln!(o, "{name}_sum{{{labels}}} {}", h.sum_ns as f64 / 1e9);
        let _ = writeln!(o, "{name}_count{{{labels}}} {}", h.count);
    };
    let name = "blkrep_block_latency_seconds";
    let _ = writeln!(
        o,
        "# HELP {name} block-layer request latency of the volume's devices (eBPF), issue to complete"
    );
    let _ = writeln!(o, "# TYPE {name} summary");
    for d in &r.devices {
        let labels = format!(
            "{base},device=\"{}\",role=\"{}\",op=\"{}\"",
            d.device, d.role, d.op
        );
        summary(&mut o, name, &labels, &d.hist);
    }
    let name = "blkrep_stage_latency_seconds";
    let _ = writeln!(
        o,
        "# HELP {name} latency of each stage of the replication path, timed by the daemon"
    );
    let _ = writeln!(o, "# TYPE {name} summary");
    for s in &r.stages {
        let labels = format!("{base},stage=\"{}\"", s.stage);
        summary(&mut o, name, &labels, &s.hist);
    }
    o
}

/// The status as Prometheus text.
pub fn render(s: &Value) -> String {
    let e = &s["engine"];
    let labels = node_labels(s);
    let mut o = String::new();
    let mut metric = |name: &str, kind: &str, help: &str, value: f64| {
        let _ = writeln!(o, "# HELP blkrep_{name} {help}");
        let _ = writeln!(o, "# TYPE blkrep_{name} {kind}");
        let _ = writeln!(o, "blkrep_{name}{{{labels}}} {value}");
    };
    metric("up", "gauge", "1 while the daemon answers", 1.0);
    metric(
        "primary",
        "gauge",
        "1 when this node is primary",
        (e["role"] == "primary") as u8 as f64,
    );
    metric(
        "link_up",
        "gauge",
        "1 while the replication link is connected (or syncing)",
        matches!(
            e["conn"].as_str(),
            Some("connected" | "sync_source" | "sync_target")
        ) as u8 as f64,
    );
    metric(
        "split_brain",
        "gauge",
        "1 when the peer was refused as a split brain",
        num(&e["split_brain"]),
    );
    metric(
        "disk_up_to_date",
        "gauge",
        "1 when this node's disk is UpToDate",
        (e["disk_state"] == "up_to_date") as u8 as f64,
    );
    metric(
        "lag_seconds",
        "gauge",
        "age of the oldest write the peer has not applied (the current RPO)",
        num(&e["lag_seconds"]),
    );
    metric(
        "lag_bytes",
        "gauge",
        "payload bytes the peer has not applied",
        num(&e["lag_bytes"]),
    );
    metric(
        "out_of_sync_bytes",
        "gauge",
        "bytes the peer lacks that only a resync brings",
        num(&e["out_of_sync_bytes"]),
    );
    metric(
        "journal_used_bytes",
        "gauge",
        "bytes of the primary's journal held by records the peer lacks (0 without a journal)",
        num(&e["journal"]["used"]),
    );
    metric(
        "journal_capacity_bytes",
        "gauge",
        "size of the journal's ring (0 without a journal)",
        num(&e["journal"]["capacity"]),
    );
    metric(
        "journal_overflows_total",
        "counter",
        "times the journal filled while the peer was away (bitmap mode followed)",
        num(&e["journal"]["overflows"]),
    );
    metric(
        "catchup_protected",
        "gauge",
        "1 while a secondary's catch-up is protected by its undo log (a takeover rolls back)",
        (e["undo"]["state"] == "active") as u64 as f64,
    );
    metric(
        "catchup_undo_saved_bytes",
        "gauge",
        "old content saved in the undo log by the catch-up under way",
        num(&e["undo"]["saved_bytes"]),
    );
    metric(
        "hot_extents",
        "gauge",
        "activity-log extents currently recorded",
        num(&e["hot_extents"]),
    );
    metric(
        "resync_remaining_bytes",
        "gauge",
        "bytes the running resync still has to move",
        num(&e["resync"]["total_bytes"]) - num(&e["resync"]["done_bytes"]),
    );
    metric(
        "connects_total",
        "counter",
        "successful handshakes since the daemon started",
        num(&e["connects"]),
    );
    metric(
        "client_writes_total",
        "counter",
        "client writes completed",
        num(&e["client_writes"]),
    );
    metric(
        "client_reads_total",
        "counter",
        "client reads completed",
        num(&e["client_reads"]),
    );
    metric(
        "written_bytes_total",
        "counter",
        "bytes written by clients",
        num(&e["bytes_written"]),
    );
    let _ = writeln!(
        o,
        "# HELP blkrep_alert 1 while the alert is raised (thresholds in [alerts])"
    );
    let _ = writeln!(o, "# TYPE blkrep_alert gauge");
    for name in blkrep_common::control::ALERT_NAMES {
        let raised = s["alerts"]
            .as_array()
            .is_some_and(|a| a.iter().any(|x| x["name"] == name));
        let _ = writeln!(
            o,
            "blkrep_alert{{{labels},alert=\"{name}\"}} {}",
            raised as u8
        );
    }
    let mut metric = |name: &str, kind: &str, help: &str, value: f64| {
        let _ = writeln!(o, "# HELP blkrep_{name} {help}");
        let _ = writeln!(o, "# TYPE blkrep_{name} {kind}");
        let _ = writeln!(o, "blkrep_{name}{{{labels}}} {value}");
    };
    metric(
        "uptime_seconds",
        "gauge",
        "seconds since the daemon started",
        num(&s["uptime_seconds"]),
    );
    // The local legs: one line per leg.
    let legs = s["legs"].as_array().cloned().unwrap_or_default();
    for (name, help, f) in [
        (
            "leg_healthy",
            "1 while the local leg is healthy (takes writes, serves reads)",
            (|l: &Value| (l["state"] == "healthy") as u8 as f64) as fn(&Value) -> f64,
        ),
        (
            "leg_lacking_bytes",
            "bytes the local leg lacks (written while it was out; its rebuild copies them)",
            |l: &Value| num(&l["lacks_bytes"]),
        ),
    ] {
        let _ = writeln!(o, "# HELP blkrep_{name} {help}");
        let _ = writeln!(o, "# TYPE blkrep_{name} gauge");
        for l in &legs {
            let _ = writeln!(
                o,
                "blkrep_{name}{{{labels},leg=\"{}\",path=\"{}\"}} {}",
                num(&l["index"]),
                l["path"]
                    .as_str()
                    .unwrap_or("")
                    .replace('\\', "\\\\")
                    .replace('"', "\\\""),
                f(l)
            );
        }
    }
    o
}
