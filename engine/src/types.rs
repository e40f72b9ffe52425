//! Small shared vocabulary: roles, disk and connection states, identifiers, errors.

use serde::{Deserialize, Serialize};

/// A node's role for the volume. Exactly one node of a pair is Primary.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Serves client reads and writes and ships writes to the peer.
    Primary,
    /// Applies the primary's writes in order; serves no client writes.
    Secondary,
}

/// What a node knows about the data on its backing device.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DiskState {
    /// Holds the newest data of the pair (a primary, or a secondary that caught up).
    UpToDate,
    /// Holds a consistent image, possibly older than the primary's (replication lagging).
    Consistent,
    /// Content not usable: created and never synced, or a full sync is under way.
    Inconsistent,
    /// Consistent but known to be older than the peer's (set by a peer that moved on).
    Outdated,
    /// No local backing device attached.
    Diskless,
    /// The backing device failed an I/O (fail-stop): this node serves no data and needs a
    /// full sync once the device is replaced or repaired.
    Failed,
}

impl Role {
    /// The byte that stands for this role in metadata and on the wire (stable forever).
    pub fn code(self) -> u8 {
        match self {
            Role::Primary => 1,
            Role::Secondary => 2,
        }
    }

    /// The role a stored or received byte stands for.
    pub fn from_code(c: u8) -> Option<Role> {
        match c {
            1 => Some(Role::Primary),
            2 => Some(Role::Secondary),
            _ => None,
        }
    }
}

impl DiskState {
    /// The byte that stands for this state in metadata and on the wire (stable forever).
    pub fn code(self) -> u8 {
        match self {
            DiskState::UpToDate => 1,
            DiskState::Consistent => 2,
            DiskState::Inconsistent => 3,
            DiskState::Outdated => 4,
            DiskState::Diskless => 5,
            DiskState::Failed => 6,
        }
    }

    /// The state a stored or received byte stands for.
    pub fn from_code(c: u8) -> Option<DiskState> {
        Some(match c {
            1 => DiskState::UpToDate,
            2 => DiskState::Consistent,
            3 => DiskState::Inconsistent,
            4 => DiskState::Outdated,
            5 => DiskState::Diskless,
            6 => DiskState::Failed,
            _ => return None,
        })
    }
}

/// State of the replication connection as seen from one node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ConnState {
    /// No connection to the peer; the daemon keeps trying (active side) or listening.
    Disconnected,
    /// A transport connection is up; the volume handshake is in progress.
    Connecting,
    /// Handshake done; the replication stream flows.
    Connected,
    /// Handshake done; a full or partial resync is moving data to the peer.
    SyncSource,
    /// Handshake done; the peer is sending resync data to this node.
    SyncTarget,
    /// The handshake refused the peer (split brain, size or role conflict); see the reason.
    Refused,
}

/// Replication mode of a resource.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// A client write completes once the local leg and the peer have it.
    Sync,
    /// A client write completes once the local leg has it and it is queued for shipping.
    Async,
}

/// Client request id (chosen by the driver; unique among its in-flight requests).
pub type ReqId = u64;
/// Disk operation id (chosen by the engine; unique among in-flight operations).
pub type OpId = u64;
/// Connection id (chosen by the driver; a new one for every transport connection).
pub type ConnId = u64;
/// Position in the replication stream; 0 means "nothing".
pub type Seq = u64;

/// The error a client request completes with; mapped to NBD/ublk errno by the frontend.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum IoError {
    /// The backing device failed the operation (EIO).
    #[error("I/O error on the backing device")]
    Io,
    /// Request outside the volume or misaligned (EINVAL).
    #[error("request outside the volume or not aligned")]
    Invalid,
    /// This node is not the primary (EPERM on writes).
    #[error("volume is read-only on a secondary")]
    ReadOnly,
    /// The volume is shutting down or not serving (ESHUTDOWN).
    #[error("volume is shutting down")]
    Shutdown,
    /// The backing device is out of space (ENOSPC).
    #[error("no space left on the backing device")]
    NoSpace,
}

impl IoError {
    /// The errno that frontends report for this error.
    pub fn errno(self) -> i32 {
        match self {
            IoError::Io => 5,         // EIO
            IoError::Invalid => 22,   // EINVAL
            IoError::ReadOnly => 1,   // EPERM
            IoError::Shutdown => 108, // ESHUTDOWN
            IoError::NoSpace => 28,   // ENOSPC
        }
    }

    /// Map a positive errno from a disk completion.
    pub fn from_errno(e: i32) -> Self {
        match e {
            22 => IoError::Invalid,
            28 => IoError::NoSpace,
            _ => IoError::Io,
        }
    }
}
