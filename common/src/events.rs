//! The event log: an append-only file per node of what happened to the replica — role
//! changes, connects, resyncs, split brains, failures, operator commands and who asked,
//! alerts — one JSON object per line (JSON Lines), so `jq` and log shippers read it as it
//! is. The daemon writes it (each line fdatasynced); `blkrep events` reads the file
//! directly, so it works with the daemon down.
//!
//! Every line is versioned (`v`) and checksummed (`sum`: the first 16 hex digits of blake3
//! of the line serialized without `sum`); a line that fails its checksum (a torn write at
//! a crash, an edit) is reported and skipped, never trusted.

use serde::{Deserialize, Serialize};
use std::path::Path;

/// Version of the line format.
pub const EVENT_VERSION: u32 = 1;

/// One event.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventRecord {
    /// Line format version ([`EVENT_VERSION`]).
    pub v: u32,
    /// Position in this node's log (1, 2, ...; continues across daemon restarts).
    pub seq: u64,
    /// Wall clock, RFC 3339 UTC with milliseconds.
    pub ts: String,
    /// The same instant, milliseconds since the Unix epoch.
    pub unix_ms: u64,
    pub resource: String,
    pub node: String,
    /// `role`, `connect`, `resync`, `operator`, `alert`, `daemon`, ...
    pub kind: String,
    /// `info`, `warning` or `critical`.
    pub severity: String,
    pub message: String,
    /// Who asked, for operator commands (`uid 0 (blkrep, pid 1234)`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub by: Option<String>,
    /// Checksum of the line without this field.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sum: Option<String>,
}

fn sum_of(e: &EventRecord) -> String {
    let mut bare = e.clone();
    bare.sum = None;
    let text = serde_json::to_string(&bare).expect("serializable");
    blake3::hash(text.as_bytes()).to_hex()[..16].to_string()
}

impl EventRecord {
    /// The line to append (with its checksum, without the newline).
    pub fn to_line(&self) -> String {
        let mut e = self.clone();
        e.sum = Some(sum_of(self));
        serde_json::to_string(&e).expect("serializable")
    }

    /// Parse and verify one line.
    pub fn from_line(line: &str) -> Result<EventRecord, String> {
        let e: EventRecord =
            serde_json::from_str(line).map_err(|err| format!("not an event: {err}"))?;
        if e.v != EVENT_VERSION {
            return Err(format!(
                "event format version {} (this is {EVENT_VERSION})",
                e.v
            ));
        }
        match &e.sum {
            Some(s) if *s == sum_of(&e) => Ok(e),
            Some(_) => Err("checksum mismatch".into()),
            None => Err("no checksum".into()),
        }
    }
}

/// Read a log: the valid events, and a description of every line that was not one.
pub fn read(path: &Path) -> std::io::Result<(Vec<EventRecord>, Vec<String>)> {
    Ok(parse(
        &std::fs::read_to_string(path)?,
        &path.display().to_string(),
    ))
}

/// The valid events of a log's text, and a description of every line (of file `shown`)
/// that was not one.
pub fn parse(text: &str, shown: &str) -> (Vec<EventRecord>, Vec<String>) {
    let mut events = Vec::new();
    let mut bad = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        match EventRecord::from_line(line) {
            Ok(e) => events.push(e),
            Err(why) => bad.push(format!("{shown}: line {}: {why}", i + 1)),
        }
    }
    (events, bad)
}

/// `2026-11-25T16:54:09.904Z` for milliseconds since the epoch.
pub fn rfc3339(unix_ms: u64) -> String {
    let secs = unix_ms / 1000;
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + (m <= 2) as i64;
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        unix_ms % 1000
    )
}

/// Milliseconds since the epoch, now.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev() -> EventRecord {
        EventRecord {
            v: EVENT_VERSION,
            seq: 7,
            ts: rfc3339(1_795_624_449_904),
            unix_ms: 1_795_624_449_904,
            resource: "r0".into(),
            node: "alpha".into(),
            kind: "role".into(),
            severity: "info".into(),
            message: "promoted".into(),
            by: Some("uid 0 (blkrep, pid 12)".into()),
            sum: None,
        }
    }

    #[test]
    fn lines_round_trip_and_tampering_is_caught() {
        let e = ev();
        let line = e.to_line();
        let back = EventRecord::from_line(&line).unwrap();
        assert_eq!(back.sum.as_deref().map(str::len), Some(16));
        assert_eq!(EventRecord { sum: None, ..back }, e);
        let tampered = line.replace("promoted", "demoted!");
        assert_eq!(
            EventRecord::from_line(&tampered).unwrap_err(),
            "checksum mismatch"
        );
        assert!(EventRecord::from_line(&line[..line.len() / 2]).is_err());
        let other = line.replace("\"v\":1", "\"v\":9");
        assert!(EventRecord::from_line(&other)
            .unwrap_err()
            .contains("version 9"));
    }

    #[test]
    fn timestamps() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(951_782_400_000), "2000-02-29T00:00:00.000Z");
        assert_eq!(rfc3339(1_795_624_449_904), "2026-11-25T16:34:09.904Z");
    }
}
