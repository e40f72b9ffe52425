//! Messages between the two engines of a pair.
//!
//! These are semantic messages; `blkrep-transport` owns their wire encoding (versioned,
//! checksummed frames). Every item of the replication stream carries a sequence number:
//! the secondary applies items so that a later item never lands before an earlier
//! overlapping one, and never before the items it depends on (`dep`, see [`StreamItem`]).

use crate::types::{DiskState, Role, Seq};
use bytes::Bytes;

/// Version of the engine-level protocol carried in [`Hello`] (the transport has its own).
pub const ENGINE_PROTOCOL_VERSION: u32 = 2;

/// Engine-level state exchanged right after a transport connection is established and
/// again after every role or disk-state change.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hello {
    /// [`ENGINE_PROTOCOL_VERSION`] of the sender.
    pub version: u32,
    /// Sender's node name.
    pub node: String,
    /// Resource (volume) name.
    pub resource: String,
    /// Volume size in bytes; both sides must agree.
    pub volume_size: u64,
    /// Sender's role.
    pub role: Role,
    /// Sender's disk state.
    pub disk_state: DiskState,
    /// Highest sequence number the sender has issued as primary or applied as secondary,
    /// with everything before it present on its backing.
    pub applied_seq: Seq,
    /// Highest sequence number the sender has received or issued (`>= applied_seq`): a new
    /// primary numbers its stream above both sides' values, so no number is ever reused
    /// for other content while an old item with that number may still be applied.
    pub received_seq: Seq,
    /// Sender's current data generation (changes when a primary diverges from its peer).
    pub generation: u64,
    /// The generations the sender's data held before, newest first (see
    /// [`crate::generations`]).
    pub history: Vec<u64>,
    /// The sender's dirty set (blocks its peer may lack, activity log included) as byte
    /// ranges: a primary resyncing this sender adds them to its own.
    pub dirty: Vec<(u64, u64)>,
    /// True when the sender needs a full sync from its peer (fresh or interrupted sync).
    pub needs_full_sync: bool,
}

/// What a stream item does at the secondary.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ItemKind {
    /// Write `data` at `offset`.
    Write { offset: u64, data: Bytes, fua: bool },
    /// Write zeroes over `len` bytes at `offset`.
    WriteZeroes { offset: u64, len: u64, fua: bool },
    /// Discard `len` bytes at `offset` (the region reads back as zeroes afterwards).
    Trim { offset: u64, len: u64 },
    /// Make every earlier item durable (fsync) before this item counts as applied.
    Flush,
    /// Online verify: read `len` bytes at `offset`, compare blake3 of every `block` bytes
    /// with `hashes` (the primary's, taken at the same stream position) and report the
    /// blocks that differ ([`Msg::VerifyReport`]). Changes no data.
    Verify {
        offset: u64,
        len: u64,
        block: u32,
        hashes: Vec<[u8; 32]>,
    },
}

/// One item of the replication stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StreamItem {
    /// Position in the stream (dense: every item gets the next number).
    pub seq: Seq,
    /// The secondary must not issue this item before every item `<= dep` has completed.
    /// The primary sets it to the highest sequence it had completed to a client when
    /// this item was submitted, so causally dependent writes keep their order.
    pub dep: Seq,
    /// True for data sent by a resync rather than by a client write.
    pub resync: bool,
    /// The operation.
    pub kind: ItemKind,
}

impl StreamItem {
    /// Byte range `[start, end)` this item touches; `None` for a flush.
    pub fn range(&self) -> Option<(u64, u64)> {
        match &self.kind {
            ItemKind::Write { offset, data, .. } => Some((*offset, *offset + data.len() as u64)),
            ItemKind::WriteZeroes { offset, len, .. }
            | ItemKind::Trim { offset, len }
            | ItemKind::Verify { offset, len, .. } => Some((*offset, *offset + *len)),
            ItemKind::Flush => None,
        }
    }

    /// Payload bytes carried (for accounting).
    pub fn payload_len(&self) -> u64 {
        match &self.kind {
            ItemKind::Write { data, .. } => data.len() as u64,
            _ => 0,
        }
    }
}

/// A message between peers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Msg {
    /// State exchange (see [`Hello`]).
    Hello(Hello),
    /// One replication stream item, primary to secondary.
    Item(StreamItem),
    /// Secondary to primary: every item `<= applied` has been applied (a flush item counts
    /// as applied once everything before it is durable), and every item `<= durable` is
    /// durable and recorded in the secondary's metadata (the primary may release those).
    Ack { applied: Seq, durable: Seq },
    /// Primary to secondary: a full sync of `total_bytes` starts; the secondary is
    /// Inconsistent until the matching [`Msg::ResyncDone`] is applied. Every stream item
    /// `<= base_seq` is covered by the resync: the secondary sets its applied sequence to
    /// `base_seq` and the stream continues at `base_seq + 1`.
    ResyncStart {
        total_bytes: u64,
        base_seq: Seq,
        /// The data generation the target holds once the sync completes.
        generation: u64,
    },
    /// Primary to secondary: the full sync is complete once every item `<= seq` is applied.
    ResyncDone {
        seq: Seq,
        /// The data generation the target holds once it has applied everything `<= seq`
        /// (repeated here: the target may have restarted since the sync began).
        generation: u64,
    },
    /// Liveness probe; answered with [`Msg::Pong`] carrying the same nonce.
    Ping { nonce: u64 },
    /// Answer to [`Msg::Ping`].
    Pong { nonce: u64 },
    /// The sender is about to close the connection, and why.
    Goodbye { reason: String },
    /// The sender wants to become primary; answered by [`Msg::PromoteGrant`] or
    /// [`Msg::PromoteDeny`] with the same nonce.
    PromoteRequest { nonce: u64 },
    /// The receiver is secondary and counts the asker as primary from now on.
    PromoteGrant { nonce: u64 },
    /// The receiver refuses the promote, and why.
    PromoteDeny { nonce: u64, reason: String },
    /// Secondary to primary: the result of verify item `seq`: the byte ranges whose
    /// blocks differ (empty when all match).
    VerifyReport { seq: Seq, bad: Vec<(u64, u64)> },
    /// Diskless primary to secondary: read `len` bytes at `offset` once every stream item
    /// `<= after` is applied; answered by [`Msg::ReadReply`] with the same `id`.
    ReadRequest {
        id: u64,
        offset: u64,
        len: u64,
        after: Seq,
    },
    /// Secondary to a diskless primary: the data of read `id`, or `None` when the read
    /// could not be served (no usable image, a disk error).
    ReadReply { id: u64, data: Option<Bytes> },
}
