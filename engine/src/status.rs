//! A snapshot of the engine's state for `blkrep status`.

use crate::generations::Relation;
use crate::types::{ConnState, DiskState, Mode, Role, Seq};
use serde::{Deserialize, Serialize};

/// Progress of a running resync.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ResyncStatus {
    /// Bytes the resync has to move in all.
    pub total_bytes: u64,
    /// Bytes moved so far (acknowledged by the target).
    pub done_bytes: u64,
    /// Average rate so far, bytes per second.
    pub rate_bytes_per_sec: f64,
}

/// An online verify: progress and what differs.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct VerifyStatus {
    /// True once every block has been compared.
    pub done: bool,
    /// Resync the blocks that differ.
    pub repair: bool,
    /// Bytes to compare.
    pub total_bytes: u64,
    /// Bytes compared (the peer reported on them).
    pub checked_bytes: u64,
    /// Bytes in blocks that differ.
    pub out_of_sync_bytes: u64,
    /// The ranges that differ (the first 1000), `[start, end)` in bytes.
    pub out_of_sync: Vec<(u64, u64)>,
    /// Seconds since the verify started.
    pub seconds: f64,
    /// Why it stopped early, if it did.
    pub aborted: Option<String>,
}

/// The engine's view of itself and its peer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EngineStatus {
    /// This node's role.
    pub role: Role,
    /// Replication mode.
    pub mode: Mode,
    /// This node's disk state.
    pub disk_state: DiskState,
    /// Current data generation.
    pub generation: u64,
    /// Earlier generations of this node's data, newest first.
    pub history: Vec<u64>,
    /// The peer's generation as last heard (kept while disconnected).
    pub peer_generation: Option<u64>,
    /// How the peer's data relates to this node's, as last heard.
    pub relation: Option<Relation>,
    /// The peer was refused because both sides took writes separately (split brain).
    pub split_brain: bool,
    /// Connection state.
    pub conn: ConnState,
    /// Peer's role, when connected.
    pub peer_role: Option<Role>,
    /// Peer's disk state, when connected.
    pub peer_disk_state: Option<DiskState>,
    /// Why the last handshake was refused, if it was.
    pub refused_reason: Option<String>,
    /// Number of successful handshakes since start.
    pub connects: u64,
    /// Highest sequence issued (primary) or received (secondary).
    pub last_seq: Seq,
    /// Highest sequence the peer acknowledged as applied (primary).
    pub acked_seq: Seq,
    /// Highest sequence applied locally, everything before it too (secondary).
    pub applied_seq: Seq,
    /// Client writes submitted and not yet completed.
    pub writes_in_flight: u64,
    /// Bytes of those writes.
    pub bytes_in_flight: u64,
    /// Stream items shipped or queued but not yet acknowledged by the peer.
    pub lag_items: u64,
    /// Payload bytes of those items.
    pub lag_bytes: u64,
    /// Age of the oldest unacknowledged item, seconds (0 when none): the current RPO.
    pub lag_seconds: f64,
    /// True when the peer lacks blocks that only a resync brings.
    pub peer_needs_full_sync: bool,
    /// Bytes the peer lacks that only a resync brings (the dirty set; a primary's view).
    pub out_of_sync_bytes: u64,
    /// Activity-log extents currently hot.
    pub hot_extents: u64,
    /// Resync progress, when one runs.
    pub resync: Option<ResyncStatus>,
    /// The online verify under way, or the last one's result.
    #[serde(default)]
    pub verify: Option<VerifyStatus>,
    /// Client writes completed since start.
    pub client_writes: u64,
    /// Stream items sent to the peer, resends and resync data included.
    #[serde(default)]
    pub shipped_items: u64,
    /// Their payload bytes (what a link cut costs to resend shows here).
    #[serde(default)]
    pub shipped_bytes: u64,
    /// Client reads completed since start.
    pub client_reads: u64,
    /// Bytes written by clients since start.
    pub bytes_written: u64,
    /// Bytes read by clients since start.
    pub bytes_read: u64,
    /// Client flushes completed since start.
    pub flushes: u64,
    /// The primary's journal, when one is configured.
    #[serde(default)]
    pub journal: Option<crate::journaling::JournalStatus>,
    /// The undo log of a protected catch-up (secondary), once one has run.
    #[serde(default)]
    pub undo: Option<crate::undo::UndoStatus>,
}
