//! Writing the node's event log (format: `blkrep_common::events`). A thread appends and
//! fdatasyncs each line, so the event loop never waits for the disk; `close` drains it.

use blkrep_common::events::{now_ms, parse, rfc3339, EventRecord, EVENT_VERSION};
use std::io::Write;
use std::path::{Path, PathBuf};

struct Pending {
    kind: String,
    severity: &'static str,
    message: String,
    by: Option<String>,
}

/// A handle to the log (cheap to clone; every clone feeds the same writer).
#[derive(Clone)]
pub struct EventLog {
    tx: Option<crossbeam_channel::Sender<Pending>>,
    path: PathBuf,
}

/// The writer thread, to join at the end.
pub struct EventWriter(std::thread::JoinHandle<()>);

impl EventLog {
    /// Open (create) the log and start its writer; the sequence continues from the last
    /// valid line.
    pub fn open(
        path: &Path,
        resource: &str,
        node: &str,
    ) -> anyhow::Result<(EventLog, EventWriter)> {
        use anyhow::Context;
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("event log directory {} (node.events)", dir.display()))?;
        }
        let shown = path.display().to_string();
        let text = match std::fs::read(path) {
            Ok(b) => String::from_utf8_lossy(&b).into_owned(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(e).with_context(|| format!("event log {shown} (node.events)")),
        };
        let (events, bad) = parse(&text, &shown);
        for b in bad {
            tracing::warn!("event log: skipping {b}");
        }
        let mut seq = events.last().map_or(0, |e| e.seq);
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .with_context(|| format!("event log {shown} (node.events)"))?;
        // A torn last line (a crash in the middle of a write) must not glue onto the next.
        if !text.is_empty() && !text.ends_with('\n') {
            file.write_all(b"\n")
                .with_context(|| format!("event log {shown} (node.events)"))?;
        }
        let (tx, rx) = crossbeam_channel::unbounded::<Pending>();
        let (resource, node) = (resource.to_string(), node.to_string());
        let handle = std::thread::Builder::new()
            .name("events".into())
            .spawn(move || {
                let mut failed = false;
                for p in rx {
                    seq += 1;
                    let unix_ms = now_ms();
                    let rec = EventRecord {
                        v: EVENT_VERSION,
                        seq,
                        ts: rfc3339(unix_ms),
                        unix_ms,
                        resource: resource.clone(),
                        node: node.clone(),
                        kind: p.kind,
                        severity: p.severity.to_string(),
                        message: p.message,
                        by: p.by,
                        sum: None,
                    };
                    let mut line = rec.to_line();
                    line.push('\n');
                    let r = file
                        .write_all(line.as_bytes())
                        .and_then(|_| file.sync_data());
                    match r {
                        Err(e) if !failed => {
                            tracing::error!("event log {shown}: {e} (events are logged here only)");
                            failed = true;
                        }
                        Ok(()) => failed = false,
                        Err(_) => {}
                    }
                }
            })
            .context("spawn the event log writer")?;
        Ok((
            EventLog {
                tx: Some(tx),
                path: path.to_path_buf(),
            },
            EventWriter(handle),
        ))
    }

    /// A log that goes nowhere (tests of the loop without one).
    pub fn none() -> EventLog {
        EventLog {
            tx: None,
            path: PathBuf::new(),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Record an event (also in the daemon's log).
    pub fn log(&self, kind: &str, severity: &'static str, message: String, by: Option<String>) {
        match severity {
            "critical" => tracing::error!(kind, "{message}"),
            "warning" => tracing::warn!(kind, "{message}"),
            _ => tracing::info!(kind, "{message}"),
        }
        if let Some(tx) = &self.tx {
            let _ = tx.send(Pending {
                kind: kind.to_string(),
                severity,
                message,
                by,
            });
        }
    }

    /// Stop feeding the writer (the writer ends once every clone is gone).
    pub fn close(&mut self) {
        self.tx = None;
    }
}

impl EventWriter {
    /// Wait until everything sent has been written.
    pub fn join(self) {
        let _ = self.0.join();
    }
}

/// How serious an engine event is.
pub fn severity_of(kind: &str) -> &'static str {
    match kind {
        "failure" | "bug" | "protocol" => "critical",
        "refused" | "overflow" | "disconnect" | "takeover" | "generation" => "warning",
        _ => "info",
    }
}

/// Who is at the other end of a control connection: `uid 0 (blkrep, pid 1234)`.
pub fn peer_of(stream: &std::os::unix::net::UnixStream) -> Option<String> {
    let c =
        nix::sys::socket::getsockopt(stream, nix::sys::socket::sockopt::PeerCredentials).ok()?;
    let comm = std::fs::read_to_string(format!("/proc/{}/comm", c.pid()))
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "?".into());
    Some(format!("uid {} ({comm}, pid {})", c.uid(), c.pid()))
}
