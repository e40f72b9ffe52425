//! The control API between `blkrep` and `blkrepd`: one JSON request line per Unix-socket
//! connection, answered by one JSON response line. Both carry `"version"`; a daemon
//! refuses requests of another version with a clear error instead of guessing.
//!
//! ```text
//! → {"version":1,"request":"promote","force":false}
//! ← {"version":1,"ok":true,"result":{"message":"promoted to primary by operator"}}
//! ← {"version":1,"ok":false,"error":{"code":"peer_is_primary","message":"..."}}
//! ```

use blkrep_engine::status::EngineStatus;
use serde::{Deserialize, Serialize};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

/// Version of the control protocol.
pub const CONTROL_VERSION: u32 = 1;

/// A request to the daemon.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "request", rename_all = "snake_case")]
pub enum Request {
    /// A [`DaemonStatus`].
    Status,
    /// Become primary (`force`: without a connected peer — forced takeover).
    Promote {
        #[serde(default)]
        force: bool,
    },
    /// Become secondary.
    Demote,
    /// Resolve a split brain on this node: `discard_local` gives up this node's changes.
    Resolve {
        #[serde(default)]
        discard_local: bool,
    },
    /// What the next connection moves (`blkrep failback --plan`).
    Plan,
    /// Start an online verify (primary); `repair` resyncs the blocks that differ.
    Verify {
        #[serde(default)]
        repair: bool,
    },
    /// Latency histograms (a [`crate::latency::LatencyReport`]).
    Latency,
    /// Start a drill on a secondary: take a consistent cut and expose a copy-on-write
    /// clone of it (a [`DrillStarted`]) while replication goes on into the replica.
    DrillStart,
    /// End the drill: remove the clone and its store (a [`DrillStopped`]); `outcome` is
    /// the verdict line for the event log.
    DrillStop {
        #[serde(default)]
        outcome: Option<String>,
    },
    /// Operate on a local leg: `action` is `attach` (rebuild what it missed; `full`: all
    /// of it), `detach`, or `replace` (a new device at `path`, rebuilt in full).
    Leg {
        action: LegAction,
        leg: u8,
        #[serde(default)]
        path: Option<String>,
        #[serde(default)]
        full: bool,
    },
    /// Testing only (the daemon must run with `BLKREP_FAULT_INJECTION=1`): make leg `leg`
    /// fail (`mode` `error`) or hang (`hang`) the `ops` (`read`, `write`, `flush`) that touch
    /// `[offset, offset + len)`; `clear` removes the leg's faults (hung requests go on).
    LegFault {
        leg: u8,
        mode: String,
        #[serde(default)]
        ops: Vec<String>,
        #[serde(default)]
        offset: u64,
        #[serde(default)]
        len: u64,
    },
    /// Stop cleanly.
    Shutdown,
}

/// What `blkrep leg` does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LegAction {
    Attach,
    Detach,
    Replace,
}

/// One local leg (in `status`).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct LegStatus {
    /// 0: the backing, 1: the mirror.
    pub index: u8,
    /// Its file or device.
    pub path: String,
    /// `healthy`, `failed`, `detached` or `rebuilding`.
    pub state: String,
    /// Why it is not healthy.
    pub reason: String,
    /// When the state last changed (RFC 3339 UTC).
    pub since: String,
    /// Bytes the leg lacks (written while it was out; copied by its rebuild).
    pub lacks_bytes: u64,
    /// Its requests in the kernel.
    pub inflight: u64,
    /// The rebuild under way into this leg.
    pub rebuild: Option<RebuildStatus>,
    /// The last rebuild of this leg that completed, since the daemon started.
    #[serde(default)]
    pub last_rebuild: Option<RebuildStatus>,
}

/// A leg rebuild under way.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct RebuildStatus {
    /// The leg read from.
    pub source: u8,
    /// Bytes copied so far, and in all (grows while writes land in what is lacking).
    pub copied_bytes: u64,
    pub total_bytes: u64,
    /// Seconds since it started (or resumed).
    pub seconds: f64,
    /// A full rebuild (a new device).
    pub full: bool,
}

#[derive(Serialize, Deserialize)]
struct RequestEnvelope {
    version: u32,
    #[serde(flatten)]
    request: serde_json::Value,
}

/// An alert that is raised.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ActiveAlert {
    /// `link_down`, `rpo`, `journal_fill`, `disk_failed`, `degraded_leg` or `split_brain`.
    pub name: String,
    /// When it was raised (RFC 3339 UTC).
    pub since: String,
    pub message: String,
}

/// The names of every alert (each is a `blkrep_alert{alert="..."}` metric, 0 or 1).
pub const ALERT_NAMES: [&str; 6] = [
    "link_down",
    "rpo",
    "journal_fill",
    "disk_failed",
    "degraded_leg",
    "split_brain",
];

/// An error answer: a stable code for scripts and a message for people.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{message} ({code})")]
pub struct ControlError {
    /// Stable machine-readable code.
    pub code: String,
    /// What happened and what to do.
    pub message: String,
}

impl ControlError {
    /// An error with `code` and `message`.
    pub fn new(code: &str, message: &str) -> ControlError {
        ControlError {
            code: code.into(),
            message: message.into(),
        }
    }
}

#[derive(Serialize, Deserialize)]
struct ResponseEnvelope {
    version: u32,
    ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    result: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    error: Option<ControlError>,
}

/// What `status` returns.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DaemonStatus {
    /// Resource name.
    pub resource: String,
    /// This node.
    pub node: String,
    /// Daemon process id.
    pub pid: u32,
    /// Peer node name.
    pub peer: String,
    /// Peer replication address.
    pub peer_address: String,
    /// Where clients reach the volume: the NBD export URI, or the ublk block device.
    pub export: String,
    /// True while the export refuses writes (this node is not primary).
    pub export_read_only: bool,
    /// The frontend serving the volume: `"nbd"` or `"ublk"`.
    #[serde(default)]
    pub frontend: String,
    /// The ublk block device (`/dev/ublkbN`) while it exists and serves (or holds) I/O;
    /// null when there is none (NBD frontend, or a ublk device still starting).
    #[serde(default)]
    pub device: Option<String>,
    /// What the ublk device is doing: `"starting"`, `"live"`, `"held"` (taken over after a
    /// crash of a primary's daemon: I/O waits in the kernel until this node is promoted),
    /// `"stopping"`; absent for NBD.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_state: Option<String>,
    /// Seconds since the daemon started.
    pub uptime_seconds: f64,
    /// `"tls (TLS 1.3, peer pinned to sha256:...)"`, or `"insecure"` (plaintext,
    /// unauthenticated: `resource.insecure = true`).
    #[serde(default)]
    pub link_security: String,
    /// Bytes this node sent on replication links, as they left (compressed, encrypted).
    #[serde(default)]
    pub link_bytes_sent: u64,
    /// The last failed link attempt (a refused connection, an unreachable peer).
    #[serde(default)]
    pub link_last_error: Option<LinkError>,
    /// Alerts raised now (thresholds in `[alerts]`).
    #[serde(default)]
    pub alerts: Vec<ActiveAlert>,
    /// The node's event log file.
    #[serde(default)]
    pub event_log: String,
    /// The replication engine's state.
    pub engine: EngineStatus,
    /// The drill under way on this node, if one is.
    #[serde(default)]
    pub drill: Option<DrillStatus>,
    /// Local storage: `healthy`, `degraded` (a leg is out) or `failed` (none left).
    #[serde(default)]
    pub local: String,
    /// The local legs (one, or two with a mirror).
    #[serde(default)]
    pub legs: Vec<LegStatus>,
}

/// A drill under way (in `status`).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct DrillStatus {
    /// When its cut was taken (RFC 3339 UTC).
    pub since: String,
    /// The clone's ublk device, if it has one.
    pub device: Option<String>,
    /// The clone's NBD export.
    pub nbd: String,
    /// Bytes of the cut saved in the store before replication overwrote them.
    pub preserved_bytes: u64,
    /// Bytes the clone's own users wrote (a mount's journal replay, a probe).
    pub clone_written_bytes: u64,
    /// Why the clone stopped being usable, if it did (replication goes on regardless).
    pub broken: Option<String>,
}

/// The answer to [`Request::DrillStart`].
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct DrillStarted {
    /// The clone's ublk block device (`/dev/ublkbN`), where ublk is available.
    pub device: Option<String>,
    /// Why there is no ublk device, when there is none.
    pub device_error: Option<String>,
    /// The clone's NBD export (`nbd+unix:///drill?socket=...`), always.
    pub nbd: String,
    /// Volume size, bytes.
    pub size: u64,
    /// The cut: every stream item up to this sequence is in the clone.
    pub cut_applied_seq: u64,
    /// The highest sequence the secondary had received at the cut.
    pub cut_received_seq: u64,
    /// The replica's generation at the cut.
    pub generation: u64,
    /// The replica's disk state at the cut.
    pub disk_state: String,
    /// When the cut was taken (RFC 3339 UTC).
    pub cut_at: String,
    /// How long applies were held to take the cut, seconds.
    pub hold_seconds: f64,
    /// Writes that waited during the hold.
    pub held_writes: u64,
    /// From the request's arrival to the clone's devices being served, seconds.
    pub seconds: f64,
}

/// The answer to [`Request::DrillStop`].
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct DrillStopped {
    /// Bytes of the cut saved before replication overwrote them.
    pub preserved_bytes: u64,
    /// Bytes the clone's users wrote.
    pub clone_written_bytes: u64,
    /// Stream items the replica applied while the drill ran.
    pub applied_during: u64,
    /// Why the clone stopped being usable, if it did.
    pub broken: Option<String>,
    /// Time to tear the clone down, seconds.
    pub seconds: f64,
}

/// A failed link attempt.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct LinkError {
    /// How long ago.
    pub seconds_ago: f64,
    /// What happened.
    pub message: String,
}

/// Encode a request line (without the newline).
pub fn encode_request(req: &Request) -> String {
    let env = RequestEnvelope {
        version: CONTROL_VERSION,
        request: serde_json::to_value(req).expect("requests serialize"),
    };
    serde_json::to_string(&env).expect("requests serialize")
}

/// Decode a request line; wrong versions and unknown requests get a clear error.
pub fn parse_request(line: &str) -> Result<Request, ControlError> {
    let env: RequestEnvelope = serde_json::from_str(line)
        .map_err(|e| ControlError::new("bad_request", &format!("not a control request: {e}")))?;
    if env.version != CONTROL_VERSION {
        return Err(ControlError::new(
            "version",
            &format!(
                "control protocol version {} is not supported by this daemon (it speaks {CONTROL_VERSION}); use the blkrep command of the same release",
                env.version
            ),
        ));
    }
    serde_json::from_value(env.request).map_err(|e| {
        ControlError::new("bad_request", &format!("unknown or malformed request: {e}"))
    })
}

/// Encode a response line (without the newline).
pub fn encode_response(result: Result<serde_json::Value, ControlError>) -> String {
    let env = match result {
        Ok(v) => ResponseEnvelope {
            version: CONTROL_VERSION,
            ok: true,
            result: Some(v),
            error: None,
        },
        Err(e) => ResponseEnvelope {
            version: CONTROL_VERSION,
            ok: false,
            result: None,
            error: Some(e),
        },
    };
    serde_json::to_string(&env).expect("responses serialize")
}

/// Decode a response line.
pub fn parse_response(line: &str) -> Result<serde_json::Value, ControlError> {
    let env: ResponseEnvelope = serde_json::from_str(line).map_err(|e| {
        ControlError::new(
            "bad_response",
            &format!("daemon sent a malformed answer: {e}"),
        )
    })?;
    if env.version != CONTROL_VERSION {
        return Err(ControlError::new(
            "version",
            &format!(
                "the daemon speaks control protocol {}, this command {CONTROL_VERSION}",
                env.version
            ),
        ));
    }
    match (env.ok, env.result, env.error) {
        (true, Some(v), _) => Ok(v),
        (false, _, Some(e)) => Err(e),
        _ => Err(ControlError::new(
            "bad_response",
            "daemon answer has neither result nor error",
        )),
    }
}

/// Why a control call did not get an answer.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// No daemon listens on the socket.
    #[error("the daemon is not running (no answer on {path}: {source})")]
    NotRunning {
        path: String,
        source: std::io::Error,
    },
    /// The connection broke or timed out.
    #[error("talking to the daemon on {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    /// The daemon answered with an error.
    #[error(transparent)]
    Refused(#[from] ControlError),
}

/// Send one request to the daemon at `socket` and wait up to `timeout` for its answer.
pub fn call(
    socket: &Path,
    req: &Request,
    timeout: Duration,
) -> Result<serde_json::Value, CallError> {
    let path = socket.display().to_string();
    let stream = UnixStream::connect(socket).map_err(|source| CallError::NotRunning {
        path: path.clone(),
        source,
    })?;
    let io = |source| CallError::Io {
        path: path.clone(),
        source,
    };
    stream.set_read_timeout(Some(timeout)).map_err(io)?;
    stream.set_write_timeout(Some(timeout)).map_err(io)?;
    let mut line = encode_request(req);
    line.push('\n');
    (&stream).write_all(line.as_bytes()).map_err(io)?;
    let mut answer = String::new();
    BufReader::new(&stream).read_line(&mut answer).map_err(io)?;
    if answer.is_empty() {
        return Err(io(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "the daemon closed the connection without answering",
        )));
    }
    Ok(parse_response(answer.trim_end())?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_and_refusals() {
        for r in [
            Request::Status,
            Request::Promote { force: true },
            Request::Demote,
            Request::Resolve {
                discard_local: true,
            },
            Request::Plan,
            Request::Verify { repair: true },
            Request::Shutdown,
        ] {
            assert_eq!(parse_request(&encode_request(&r)).unwrap(), r);
        }
        assert_eq!(
            parse_request(r#"{"version":2,"request":"status"}"#)
                .unwrap_err()
                .code,
            "version"
        );
        assert_eq!(
            parse_request(r#"{"version":1,"request":"explode"}"#)
                .unwrap_err()
                .code,
            "bad_request"
        );
        assert_eq!(parse_request("garbage").unwrap_err().code, "bad_request");
        let ok = encode_response(Ok(serde_json::json!({"a": 1})));
        assert_eq!(parse_response(&ok).unwrap()["a"], 1);
        let e = encode_response(Err(ControlError::new("busy", "wait")));
        assert_eq!(parse_response(&e).unwrap_err().code, "busy");
    }
}
