//! The event log and alerts: what happens to a node is appended (checksummed, who asked
//! included) and `blkrep events` reads it with the daemon up or down, follows it, and
//! skips a damaged line; an alert threshold crossed is raised and cleared as events, in
//! `status` and in the metrics.

mod common;
use common::*;
use serde_json::Value;
use std::io::BufRead;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn events(p: &Pair, i: usize) -> Vec<Value> {
    p.ok(i, &["events", "--json"])
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect()
}

fn find<'a>(ev: &'a [Value], kind: &str, text: &str) -> Option<&'a Value> {
    ev.iter()
        .find(|e| e["kind"] == kind && e["message"].as_str().unwrap().contains(text))
}

fn wait_event(p: &Pair, i: usize, kind: &str, text: &str) -> Value {
    let t0 = Instant::now();
    loop {
        if let Some(e) = find(&events(p, i), kind, text) {
            return e.clone();
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "no {kind} event with {text:?} on node {i}: {:?}",
            events(p, i)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn the_event_log_records_roles_operators_and_alerts() {
    let p = Pair::new("events", "async", 16 << 20);
    let mut text = std::fs::read_to_string(&p.config).unwrap();
    text += "\n[alerts]\nlink_down_seconds = 1\n";
    std::fs::write(&p.config, text).unwrap();
    p.start(0);

    let ev = events(&p, 0);
    let seqs: Vec<u64> = ev.iter().map(|e| e["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, (1..=seqs.len() as u64).collect::<Vec<_>>(), "{ev:?}");
    assert!(find(&ev, "daemon", "started (blkrepd").is_some(), "{ev:?}");
    assert!(
        find(&ev, "connect", "connected to peer beta").is_some(),
        "{ev:?}"
    );
    assert!(find(&ev, "role", "promoted to primary").is_some(), "{ev:?}");
    let op = find(&ev, "operator", "promote: done").expect("the operator's promote");
    let by = op["by"].as_str().unwrap();
    assert!(by.starts_with("uid 0 (blkrep, pid "), "{by}");
    for e in &ev {
        assert_eq!(
            (e["resource"].as_str(), e["node"].as_str()),
            (Some("r0"), Some("alpha"))
        );
        assert_eq!(e["sum"].as_str().map(str::len), Some(16));
    }

    // Follow: a new event shows up on the follower's output.
    let mut follower = Command::new(bin_dir().join("blkrep"))
        .args(["--config"])
        .arg(&p.config)
        .args([
            "--node", "beta", "events", "--follow", "--json", "--kind", "alert",
        ])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = follower.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for l in std::io::BufReader::new(stdout).lines() {
            if tx.send(l.unwrap()).is_err() {
                break;
            }
        }
    });

    // The link goes down for longer than link_down_seconds: both nodes raise the alert.
    p.ok(0, &["down"]);
    let raised = wait_event(&p, 1, "alert", "raised link_down");
    assert_eq!(raised["severity"], "warning");
    let line = rx
        .recv_timeout(Duration::from_secs(20))
        .expect("the follower saw the alert");
    assert!(line.contains("raised link_down"), "{line}");
    let s = p.status(1);
    assert_eq!(s["alerts"][0]["name"], "link_down", "{s}");
    // alpha is down: its log is still readable, and ends with its stop.
    let ev = events(&p, 0);
    let last = ev.last().unwrap();
    assert_eq!(
        (last["kind"].as_str(), last["message"].as_str()),
        (Some("daemon"), Some("stopped"))
    );
    assert!(find(&ev, "operator", "down: done").is_some(), "{ev:?}");

    // Back up: beta clears it.
    p.ok(0, &["up"]);
    wait_event(&p, 1, "alert", "cleared link_down");
    let line = rx
        .recv_timeout(Duration::from_secs(20))
        .expect("the follower saw the clear");
    assert!(line.contains("cleared link_down"), "{line}");
    assert_eq!(p.status(1)["alerts"], serde_json::json!([]));
    let _ = follower.kill();
    let _ = follower.wait();

    // A damaged line is reported and skipped; the others still read.
    let path = p.dir.path().join("beta.md.events");
    let mut lines: Vec<String> = std::fs::read_to_string(&path)
        .unwrap()
        .lines()
        .map(String::from)
        .collect();
    let n = lines.len();
    lines[1] = lines[1].replace("beta", "BETA");
    std::fs::write(&path, lines.join("\n") + "\n").unwrap();
    let out = p.blkrep(1, &["events", "--json"]);
    assert!(out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("line 2: checksum mismatch (skipped)"), "{err}");
    assert_eq!(String::from_utf8_lossy(&out.stdout).lines().count(), n - 1);
    // The human view.
    let human = p.ok(1, &["events", "--last", "2"]);
    assert_eq!(human.lines().count(), 2, "{human}");
    // --kind filters before --last counts: the last daemon event, even when later lines
    // are of other kinds.
    let out = p.ok(1, &["events", "--json", "--kind", "daemon", "--last", "1"]);
    let lines: Vec<Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 1, "{out}");
    assert_eq!(lines[0]["kind"], "daemon");
}

/// The rpo alert stays raised when the ship queue overflows into the dirty set (the lag
/// then reads 0, but the peer still lacks data), and clears once the resync has brought it.
#[test]
fn the_rpo_alert_survives_a_queue_overflow() {
    if !require_qemu() {
        return;
    }
    let p = Pair::new("rpo-alert", "async", 16 << 20);
    p.resource_line("queue_limit = \"1M\"");
    let mut text = std::fs::read_to_string(&p.config).unwrap();
    text += "\n[alerts]\nrpo_seconds = 1\nlink_down_seconds = 0\n";
    std::fs::write(&p.config, text).unwrap();
    p.start(0);
    p.ok(1, &["down"]);
    p.qemu_io_ok(0, &["write -P 0x33 0 4M"]);
    let s = p.wait_for(0, "the queue overflowed", |s| {
        s["engine"]["out_of_sync_bytes"].as_u64().unwrap_or(0) > 0
    });
    assert_eq!(s["engine"]["lag_items"], 0, "{s:#}");
    let raised = wait_event(&p, 0, "alert", "raised rpo");
    assert!(
        raised["message"]
            .as_str()
            .unwrap()
            .contains("only a resync brings"),
        "{raised}"
    );
    std::thread::sleep(Duration::from_millis(1500));
    let s = p.status(0);
    assert!(
        s["alerts"]
            .as_array()
            .unwrap()
            .iter()
            .any(|a| a["name"] == "rpo"),
        "the rpo alert cleared while the peer still lacks data: {s:#}"
    );
    p.ok(1, &["up"]);
    p.wait_in_sync(0);
    wait_event(&p, 0, "alert", "cleared rpo");
}
