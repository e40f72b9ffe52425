//! The volume state machine: inputs, outputs and the dispatch between the roles.
//!
//! `Volume::handle` is the only entry point. It never blocks, never reads a clock and never
//! draws a random number: time arrives as [`Input::Tick`], randomness inside the inputs that
//! need it. Whatever the engine wants done comes out as [`Output`]s, in order.
//!
//! The primary side (client writes, the ship queue, full sync) lives in `primary.rs`, the
//! secondary side (the ordered applier and its checkpoints) in `secondary.rs`, and the
//! connection handshake in `handshake.rs`; they are all `impl Volume` blocks over the state
//! declared here.

use crate::dirty::BlockSet;
use crate::generations::Relation;
use crate::meta::{
    Metadata, FLAG_CLEAN, FLAG_CRASHED_PRIMARY, FLAG_PEER_NEEDS_FULL_SYNC, MAX_DIRTY_RANGES,
};
use crate::msg::{Hello, Msg, StreamItem, ENGINE_PROTOCOL_VERSION};
use crate::ranges::RangeSet;
use crate::rate::TokenBucket;
use crate::roles::PendingPromote;
use crate::status::{EngineStatus, ResyncStatus};
use crate::types::*;
use bytes::Bytes;
use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};

/// Static parameters of a volume.
#[derive(Clone, Debug)]
pub struct VolumeConfig {
    /// This node's name.
    pub node: String,
    /// Resource name.
    pub resource: String,
    /// Volume size in bytes.
    pub volume_size: u64,
    /// Replication mode.
    pub mode: Mode,
    /// Bound of the in-memory ship queue, bytes of payload.
    pub queue_limit: u64,
    /// Alignment of client requests (the backing is opened with O_DIRECT).
    pub sector: u64,
    /// Size of one full-sync read.
    pub resync_chunk: u64,
    /// Full-sync reads in flight at once.
    pub resync_depth: usize,
    /// Resync bandwidth limit, bytes per second (0: none).
    pub resync_rate: u64,
    /// Replication bandwidth limit for the write stream, bytes per second (0: none).
    /// Async mode buffers the excess in the ship queue (then the dirty set); sync-mode
    /// writes wait for it.
    pub replication_rate: u64,
    /// A full sync compares blake3 per block first and copies only the blocks that differ.
    pub checksum_full_sync: bool,
    /// The secondary checkpoints (fsync + metadata) after this many unpersisted bytes...
    pub checkpoint_bytes: u64,
    /// ...or after this long, nanoseconds.
    pub checkpoint_interval_ns: u64,
    /// Send a ping when nothing was sent for this long, nanoseconds.
    pub ping_interval_ns: u64,
    /// Close the connection when nothing was received for this long, nanoseconds.
    pub peer_timeout_ns: u64,
    /// On shutdown, a primary waits this long for the peer to acknowledge its queue.
    pub shutdown_drain_ns: u64,
    /// Activity-log extent, bytes: a primary records an extent in its metadata before
    /// the first write into it, so a crash never loses track of writes its peer lacks.
    pub al_extent: u64,
    /// When the local disk fails on a primary whose peer is connected and up to date, go
    /// on diskless (reads and writes served through the peer) instead of failing.
    pub diskless_on_failure: bool,
}

impl VolumeConfig {
    /// Defaults for everything but identity, size and mode.
    pub fn new(node: &str, resource: &str, volume_size: u64, mode: Mode) -> Self {
        VolumeConfig {
            node: node.into(),
            resource: resource.into(),
            volume_size,
            mode,
            queue_limit: 64 << 20,
            sector: 512,
            resync_chunk: 256 << 10,
            resync_depth: 8,
            resync_rate: 0,
            replication_rate: 0,
            checksum_full_sync: false,
            checkpoint_bytes: 8 << 20,
            checkpoint_interval_ns: 1_000_000_000,
            ping_interval_ns: 1_000_000_000,
            peer_timeout_ns: 6_000_000_000,
            shutdown_drain_ns: 5_000_000_000,
            al_extent: 4 << 20,
            diskless_on_failure: false,
        }
    }
}

/// An operation on local storage.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DiskKind {
    /// Read `len` bytes at `offset`; the completion carries the data.
    Read { offset: u64, len: u64 },
    /// Write `data` at `offset`, durable on completion when `fua`.
    Write { offset: u64, data: Bytes, fua: bool },
    /// Zero `len` bytes at `offset`.
    WriteZeroes { offset: u64, len: u64, fua: bool },
    /// Discard `len` bytes at `offset`; the range must read back as zeroes.
    Trim { offset: u64, len: u64 },
    /// Make every completed write durable.
    Flush,
    /// Write the metadata durably (the driver alternates the slots).
    WriteMeta(Metadata),
    /// Write `parts`, back to back, at byte `pos` of the journal (a record or a superblock
    /// slot; see [`crate::journal`]). Completion means written (page cache suffices).
    JournalWrite { pos: u64, parts: Vec<Bytes> },
    /// Read `len` bytes at byte `pos` of the journal device; the completion carries them.
    JournalRead { pos: u64, len: u64 },
    /// Make every completed write to the journal device durable (the undo log's records
    /// must be, before the blocks they save are overwritten; see [`crate::undo`]).
    JournalSync,
}

/// A disk operation for the driver to perform; answer with [`Input::DiskDone`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskOp {
    /// Identifies the completion.
    pub op: OpId,
    /// What to do.
    pub kind: DiskKind,
}

/// An operator command.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AdminCmd {
    /// Become primary. `new_generation` is a random id the driver draws, used when the
    /// promotion starts a new data generation.
    Promote { force: bool, new_generation: u64 },
    /// Become secondary.
    Demote,
    /// Discard this node's own changes: its data is replaced by a full sync from the peer
    /// on the next connect (resolves a split brain on the losing side). Secondary only.
    ResolveDiscardLocal,
    /// Online verify (primary, peer connected): compare every block with the peer's;
    /// `repair` resyncs the blocks that differ.
    Verify { repair: bool },
    /// Stop: finish in-flight work, persist a clean state, then emit [`Output::Stopped`].
    Shutdown,
}

/// Why an operator command was refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AdminError {
    /// Stable machine-readable code (`peer_not_connected`, `busy`, `peer_is_primary`, ...).
    pub code: &'static str,
    /// What happened and what to do, for a person.
    pub message: String,
}

/// Something the driver hands to the engine.
#[derive(Clone, Debug)]
pub enum Input {
    /// A client read.
    ClientRead { req: ReqId, offset: u64, len: u64 },
    /// A client write.
    ClientWrite {
        req: ReqId,
        offset: u64,
        data: Bytes,
        fua: bool,
    },
    /// A client write-zeroes.
    ClientWriteZeroes {
        req: ReqId,
        offset: u64,
        len: u64,
        fua: bool,
    },
    /// A client discard.
    ClientTrim { req: ReqId, offset: u64, len: u64 },
    /// A client flush.
    ClientFlush { req: ReqId },
    /// A disk operation finished (reads carry their data).
    DiskDone {
        op: OpId,
        result: Result<Option<Bytes>, IoError>,
    },
    /// A transport connection to the peer is established (link handshake done).
    PeerConnected { conn: ConnId },
    /// A message arrived on a connection.
    PeerMsg { conn: ConnId, msg: Msg },
    /// A connection closed (by the peer, an error, or after [`Output::Close`]).
    PeerClosed { conn: ConnId },
    /// The clock, nanoseconds since an arbitrary origin; monotonic.
    Tick { now_ns: u64 },
    /// An operator command; answered by [`Output::AdminDone`] with the same token.
    Admin { token: u64, cmd: AdminCmd },
}

/// A record for the event log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Event {
    /// Short machine-readable kind (`role`, `connect`, `disconnect`, `refused`, `resync`...).
    pub kind: &'static str,
    /// What happened, for a person.
    pub message: String,
}

/// Something the engine wants done.
#[derive(Clone, Debug)]
pub enum Output {
    /// Perform a disk operation.
    Disk(DiskOp),
    /// Send a message on a connection.
    Send { conn: ConnId, msg: Msg },
    /// Close a connection (the driver answers with [`Input::PeerClosed`]).
    Close { conn: ConnId, reason: String },
    /// Complete a client request.
    Complete {
        req: ReqId,
        result: Result<Option<Bytes>, IoError>,
    },
    /// Answer an operator command.
    AdminDone {
        token: u64,
        result: Result<String, AdminError>,
    },
    /// Record an event.
    Event(Event),
    /// The volume has stopped after [`AdminCmd::Shutdown`]; the driver may exit.
    Stopped,
}

/// See [`Volume::probe`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Probe {
    /// This node's role.
    pub role: Role,
    /// This node's disk state.
    pub disk_state: DiskState,
    /// Connection state.
    pub conn: ConnState,
    /// Primary: the peer receives the stream (sync-mode writes wait for it).
    pub streaming: bool,
    /// Primary: a full sync is running.
    pub resync_running: bool,
    /// Last sequence issued (primary).
    pub last_seq: Seq,
    /// Highest sequence the peer applied (primary).
    pub peer_applied: Seq,
    /// Contiguous applied watermark (secondary).
    pub applied: Seq,
    /// Items in the ship queue (primary).
    pub queued: usize,
    /// Primary: the peer lacks blocks only a resync brings (the dirty set is not empty).
    pub peer_needs_full_sync: bool,
    /// Bytes in the dirty set.
    pub dirty_bytes: u64,
    /// A promote is under way (waiting for the peer or for the flush before the role).
    pub promote_pending: bool,
    /// Secondary: a protected catch-up's session is recorded (a takeover rolls back).
    pub undo_active: bool,
}

/// Why a disk operation was issued.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Purpose {
    ClientRead {
        req: ReqId,
        offset: u64,
        len: u64,
    },
    /// A local write/zeroes/trim of a client request, holding `[start, end)` in flight.
    ClientWrite {
        req: ReqId,
        start: u64,
    },
    ClientFlush {
        req: ReqId,
    },
    ResyncRead {
        start: u64,
        len: u64,
        /// The full sync the read belongs to (a later one may have replaced it).
        epoch: u64,
    },
    /// Secondary: applying stream item `seq` (range start if it has one).
    Apply {
        seq: Seq,
        start: Option<u64>,
        bytes: u64,
    },
    /// Secondary: a read for the diskless primary's request `id`.
    PeerRead {
        id: u64,
    },
    /// An fsync taken so that everything `<= upto` is durable.
    Checkpoint {
        upto: Seq,
    },
    Meta {
        applied: Seq,
        disk_state: DiskState,
        /// The write records that the journal failed.
        journal_failed: bool,
        /// The metadata's update counter in this write.
        counter: u64,
    },
    /// The flush a node makes before it takes the primary role.
    PromoteFlush,
    /// A journal record (`None`: a pad record).
    JournalAppend {
        seq: Option<Seq>,
    },
    /// A journal superblock.
    JournalSuper,
    /// Primary: an online-verify read.
    VerifyRead {
        start: u64,
        len: u64,
        run: u64,
    },
    /// Secondary: the read of verify item `seq`.
    VerifyApply {
        seq: Seq,
        start: u64,
    },
    /// The fsync that makes the image durable before a protected catch-up begins.
    UndoFlush,
    /// Reading old content to save in the undo log (range `idx` of batch `epoch`).
    UndoRead {
        idx: usize,
        epoch: u64,
    },
    UndoWrite {
        epoch: u64,
    },
    UndoSync {
        epoch: u64,
    },
    /// Rollback: reading undo record `idx`, writing it back, the final fsync.
    UndoRollbackRead {
        idx: usize,
        epoch: u64,
    },
    UndoRollbackWrite {
        epoch: u64,
    },
    UndoRollbackFlush {
        epoch: u64,
    },
}

/// A client write or flush waiting for its completion conditions.
#[derive(Debug)]
pub(crate) struct PendingClient {
    pub seq: Seq,
    pub local_done: bool,
    pub error: Option<IoError>,
    pub bytes: u64,
    pub flush: bool,
}

/// A client write that overlaps an earlier one still in flight.
#[derive(Debug)]
pub(crate) struct Blocked {
    pub req: ReqId,
    pub start: u64,
    pub end: u64,
    pub kind: DiskKind,
}

/// A stream item kept until the peer has it durable.
#[derive(Debug)]
pub(crate) struct Queued {
    pub item: StreamItem,
    pub sent: bool,
    pub at_ns: u64,
}

/// An activity-log extent: the newest write into it that went to the stream, and the
/// newest one recorded in the dirty set instead.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Hot {
    pub stream_seq: Seq,
    pub dirty_seq: Seq,
}

/// State of a full sync run by the primary.
#[derive(Debug, Default)]
pub(crate) struct Resync {
    /// Distinguishes this full sync from earlier ones whose reads may still complete.
    pub epoch: u64,
    pub cursor: u64,
    pub reads_in_flight: usize,
    pub total: u64,
    pub started_ns: u64,
    /// Sequence of the last resync item, once every chunk has been read.
    pub done_seq: Option<Seq>,
    /// True once ResyncDone was sent on the current connection.
    pub done_sent: bool,
    /// A checksum pass (an internal verify with repair) feeds this resync's dirty set;
    /// the resync is complete only once the pass is.
    pub checksum: bool,
    /// Rate limit of the resync reads.
    pub(crate) bucket: TokenBucket,
}

/// What the secondary's applier is doing.
#[derive(Debug, Default)]
pub(crate) struct Applier {
    /// Received items not yet issued, in stream order.
    pub pending: VecDeque<StreamItem>,
    /// Byte ranges of issued items.
    pub inflight: RangeSet,
    /// Items issued and not completed.
    pub issued: usize,
    /// Completed items above the contiguous `applied` watermark.
    pub done_above: BTreeMap<Seq, ()>,
    /// Bytes applied since the last checkpoint.
    pub unpersisted_bytes: u64,
    /// Time of the last checkpoint.
    pub last_checkpoint_ns: u64,
    /// A checkpoint fsync or metadata write is in flight.
    pub checkpointing: bool,
    /// Once `applied` reaches this, a full sync is complete.
    pub resync_done_seq: Option<Seq>,
    /// The generation the full sync under way delivers.
    pub resync_generation: u64,
    /// Apply nothing until the metadata saying Inconsistent is durable: a full sync
    /// overwrites a consistent image, and a crash in between must not leave a half-synced
    /// disk whose metadata still calls it consistent.
    pub hold_for_meta: bool,
    /// The highest sequence issued to the disk (items are issued in order).
    pub last_issued: Seq,
}

/// The replication engine of one node for one volume.
pub struct Volume {
    pub(crate) cfg: VolumeConfig,
    pub(crate) meta: Metadata,
    pub(crate) role: Role,
    pub(crate) disk_state: DiskState,
    pub(crate) now: u64,
    pub(crate) next_op: OpId,
    pub(crate) ops: HashMap<OpId, Purpose>,
    pub(crate) out: Vec<Output>,

    // ---- connection ----
    pub(crate) conn: Option<ConnId>,
    pub(crate) conn_state: ConnState,
    pub(crate) peer: Option<Hello>,
    pub(crate) refused_reason: Option<String>,
    /// The last hello of the peer, kept after the connection ends (plans, status).
    pub(crate) last_peer: Option<Hello>,
    /// How the peer's data relates to ours, from its last hello.
    pub(crate) relation: Option<Relation>,
    /// The last refusal was a split brain.
    pub(crate) split_brain: bool,
    pub(crate) connects: u64,
    pub(crate) last_recv_ns: u64,
    pub(crate) last_send_ns: u64,
    pub(crate) ping_nonce: u64,

    // ---- primary ----
    /// Last sequence issued (primary) — also the node's position in the stream.
    pub(crate) last_seq: Seq,
    /// Highest sequence completed to a client (for `dep`).
    pub(crate) completed_max: Seq,
    /// Items `<= stream_base` are covered by a full sync and need no ack.
    pub(crate) stream_base: Seq,
    pub(crate) pending: HashMap<ReqId, PendingClient>,
    pub(crate) wait_peer: BTreeMap<Seq, ReqId>,
    pub(crate) local_inflight: RangeSet,
    /// Full-sync reads in flight (also in `local_inflight`).
    pub(crate) resync_reads: RangeSet,
    pub(crate) blocked: VecDeque<Blocked>,
    pub(crate) stalled: VecDeque<Input>,
    pub(crate) queue: VecDeque<Queued>,
    pub(crate) queue_bytes: u64,
    /// Primary: the next queue item to send on the current connection.
    pub(crate) ship_cursor: Seq,
    pub(crate) streaming: bool,
    pub(crate) peer_applied: Seq,
    pub(crate) peer_durable: Seq,
    /// Blocks the peer lacks that the stream will not bring (exact, in memory; persisted
    /// with every metadata write together with the hot extents).
    pub(crate) dirty: BlockSet,
    /// Bumped on every change of `dirty`; compared with `dirty_persisted_gen`.
    pub(crate) dirty_gen: u64,
    pub(crate) dirty_persisted_gen: u64,
    /// Activity log: extents written whose data the peer may lack, by extent index.
    pub(crate) hot: BTreeMap<u64, Hot>,
    /// Hot extents recorded by the last completed metadata write.
    pub(crate) hot_persisted: BTreeSet<u64>,
    /// Hot extents (and `last_seq`, `dirty_gen`) of the metadata write in flight.
    pub(crate) meta_snapshot: Option<(BTreeSet<u64>, Seq, u64)>,
    /// Writes recorded in `dirty` up to this sequence are on disk in the metadata.
    pub(crate) dirty_persisted_seq: Seq,
    /// Resync items not yet durable at the peer: their blocks leave `dirty` once they are.
    pub(crate) resync_items: BTreeMap<Seq, (u64, u64)>,
    pub(crate) last_meta_ns: u64,
    pub(crate) last_cool_ns: u64,
    /// Primary: every sequence `<= local_contig` has completed on the local disk...
    pub(crate) local_contig: Seq,
    pub(crate) local_done_above: BTreeSet<Seq>,
    /// ...and every one `<= local_durable` is durable there (a flush completed after).
    pub(crate) local_durable: Seq,
    pub(crate) resync: Option<Resync>,
    /// Primary: the online verify under way, or the last one's result.
    pub(crate) verify: Option<crate::verify::VerifyRun>,
    /// Secondary: verify items being read (hashes to compare against).
    pub(crate) verify_items: HashMap<Seq, (u32, Vec<[u8; 32]>)>,
    /// Diskless primary: client reads sent to the peer, by request id.
    pub(crate) remote_reads: BTreeMap<u64, ReqId>,
    pub(crate) next_remote_read: u64,
    /// Secondary: the peer's reads (id, offset, len), each waiting until everything up to
    /// its sequence is applied.
    pub(crate) peer_reads: Vec<(u64, u64, u64, Seq)>,
    pub(crate) resync_bytes_done: u64,
    pub(crate) resync_epoch: u64,
    /// This node crashed while primary: its data may hold writes its peer never saw.
    pub(crate) crashed_primary: bool,
    /// The peer may hold the current generation (a write without a receiving peer then
    /// starts a new one, so that a takeover at the peer is seen as a split brain).
    pub(crate) gen_shared: bool,
    /// The generation this primary left by its own divergence bump: a peer still on it
    /// holds a prefix of this node's stream and may resume by sequence.
    pub(crate) bumped_from: Option<u64>,

    // ---- secondary ----
    pub(crate) applier: Applier,
    /// Contiguous applied watermark (secondary) — items `<= applied` are on the backing.
    pub(crate) applied: Seq,
    /// Watermark made durable by an fsync (items `<= flushed` survive a power loss).
    pub(crate) flushed: Seq,
    /// Watermark recorded in the metadata (what a restart resumes from).
    pub(crate) durable: Seq,
    /// Last acknowledgement sent: (applied, durable).
    pub(crate) last_ack: (Seq, Seq),
    /// Highest stream sequence received (secondary).
    pub(crate) last_received: Seq,

    // ---- role changes ----
    pub(crate) pending_promote: Option<PendingPromote>,
    pub(crate) promote_nonce: u64,

    // ---- metadata writes (serialised: the driver alternates slots) ----
    pub(crate) meta_in_flight: bool,
    pub(crate) meta_dirty: bool,

    // ---- shutdown ----
    pub(crate) shutting_down: Option<u64>,
    pub(crate) final_checkpoint_issued: bool,
    pub(crate) final_checkpoint_done: bool,
    pub(crate) stopped: bool,

    // ---- counters ----
    pub(crate) client_writes: u64,
    /// Stream items sent to the peer (resends included) and their payload bytes.
    pub(crate) shipped_items: u64,
    pub(crate) shipped_bytes: u64,
    /// The replication rate limit.
    pub(crate) ship_bucket: TokenBucket,
    pub(crate) client_reads: u64,
    pub(crate) bytes_written: u64,
    pub(crate) bytes_read: u64,
    pub(crate) flushes: u64,
    /// The primary's persistent journal, when configured ([`Volume::attach_journal`]).
    pub(crate) journal: Option<crate::journaling::Journal>,
    /// Secondary: the undo log of a protected catch-up (see [`crate::undo`]).
    pub(crate) undo: crate::undo::Undo,
    /// A new primary waits for a metadata write with a counter above this one (the one
    /// recording its role and disk state) before it streams to its peer: a resync must
    /// never make the peer Inconsistent while this node's own claim to the data could
    /// still be lost with a crash (sim seed 5394).
    pub(crate) role_meta_after: Option<u64>,
}

impl Volume {
    /// A volume starting from its persisted metadata. It always starts as Secondary; an
    /// operator (or a later auto-promote policy) promotes it.
    pub fn new(cfg: VolumeConfig, meta: Metadata) -> Volume {
        let ship_bucket = TokenBucket::new(
            cfg.replication_rate,
            (cfg.replication_rate / 10).max(1 << 20),
            0,
        );
        let crashed_primary =
            meta.has(FLAG_CRASHED_PRIMARY) || meta.role == Role::Primary && !meta.has(FLAG_CLEAN);
        let mut disk_state = meta.disk_state;
        if crashed_primary && disk_state == DiskState::UpToDate {
            // Its image is crash-consistent but may hold writes the peer never received.
            disk_state = DiskState::Consistent;
        }
        let mut dirty = meta.dirty.clone();
        if meta.has(FLAG_PEER_NEEDS_FULL_SYNC) {
            dirty.insert(0, cfg.volume_size);
        }
        let applied = meta.applied_seq;
        let cfg_sector = cfg.sector.max(512);
        Volume {
            cfg,
            role: Role::Secondary,
            disk_state,
            now: 0,
            next_op: 1,
            ops: HashMap::new(),
            out: Vec::new(),
            conn: None,
            conn_state: ConnState::Disconnected,
            peer: None,
            refused_reason: None,
            last_peer: None,
            relation: None,
            split_brain: false,
            connects: 0,
            last_recv_ns: 0,
            last_send_ns: 0,
            ping_nonce: 0,
            last_seq: applied,
            completed_max: applied,
            stream_base: applied,
            pending: HashMap::new(),
            wait_peer: BTreeMap::new(),
            local_inflight: RangeSet::default(),
            resync_reads: RangeSet::default(),
            blocked: VecDeque::new(),
            stalled: VecDeque::new(),
            queue: VecDeque::new(),
            queue_bytes: 0,
            ship_cursor: 0,
            streaming: false,
            peer_applied: 0,
            peer_durable: 0,
            dirty,
            dirty_gen: 0,
            dirty_persisted_gen: 0,
            hot: BTreeMap::new(),
            hot_persisted: BTreeSet::new(),
            meta_snapshot: None,
            dirty_persisted_seq: applied,
            resync_items: BTreeMap::new(),
            last_meta_ns: 0,
            last_cool_ns: 0,
            local_contig: applied,
            local_done_above: BTreeSet::new(),
            local_durable: applied,
            resync: None,
            verify: None,
            verify_items: HashMap::new(),
            remote_reads: BTreeMap::new(),
            next_remote_read: 1,
            peer_reads: Vec::new(),
            resync_bytes_done: 0,
            resync_epoch: 0,
            crashed_primary,
            gen_shared: true,
            bumped_from: None,
            applier: Applier::default(),
            applied,
            flushed: applied,
            durable: applied,
            last_ack: (applied, applied),
            last_received: applied,
            pending_promote: None,
            promote_nonce: 0,
            meta_in_flight: false,
            meta_dirty: false,
            shutting_down: None,
            final_checkpoint_issued: false,
            final_checkpoint_done: false,
            stopped: false,
            client_writes: 0,
            shipped_items: 0,
            shipped_bytes: 0,
            ship_bucket,
            client_reads: 0,
            bytes_written: 0,
            bytes_read: 0,
            flushes: 0,
            journal: None,
            undo: crate::undo::Undo::new(meta.undo, cfg_sector),
            role_meta_after: None,
            meta,
        }
    }

    /// Feed one input; the resulting outputs are appended to `out`.
    pub fn handle(&mut self, input: Input, out: &mut Vec<Output>) {
        match input {
            Input::ClientRead { req, offset, len } => self.client_read(req, offset, len),
            i @ (Input::ClientWrite { .. }
            | Input::ClientWriteZeroes { .. }
            | Input::ClientTrim { .. }
            | Input::ClientFlush { .. }) => self.client_modify(i),
            Input::DiskDone { op, result } => self.disk_done(op, result),
            Input::PeerConnected { conn } => self.peer_connected(conn),
            Input::PeerMsg { conn, msg } => self.peer_msg(conn, msg),
            Input::PeerClosed { conn } => self.peer_closed(conn),
            Input::Tick { now_ns } => self.tick(now_ns),
            Input::Admin { token, cmd } => self.admin(token, cmd),
        }
        self.after_input();
        out.append(&mut self.out);
    }

    /// This node's role.
    /// Client modifications waiting in the backpressure queue (admitted in arrival order).
    pub fn stalled_requests(&self) -> usize {
        self.stalled.len()
    }

    pub fn role(&self) -> Role {
        self.role
    }

    /// A cheap snapshot of the state a driver or checker looks at often.
    pub fn probe(&self) -> Probe {
        Probe {
            role: self.role,
            disk_state: self.disk_state,
            conn: self.conn_state,
            streaming: self.streaming,
            resync_running: self.resync.is_some(),
            last_seq: self.last_seq,
            peer_applied: self.peer_applied,
            applied: self.applied,
            queued: self.queue.len(),
            peer_needs_full_sync: !self.dirty.is_empty(),
            dirty_bytes: self.dirty.bytes(),
            promote_pending: self.pending_promote.is_some(),
            undo_active: self.undo.session.is_some(),
        }
    }

    /// True once the volume stopped after a shutdown.
    pub fn is_stopped(&self) -> bool {
        self.stopped
    }

    /// The volume size.
    pub fn volume_size(&self) -> u64 {
        self.cfg.volume_size
    }

    /// The metadata as last written (or about to be written).
    pub fn metadata(&self) -> &Metadata {
        &self.meta
    }

    /// A status snapshot.
    pub fn status(&self) -> EngineStatus {
        let (lag_items, lag_bytes, oldest) = self.lag();
        let resync = self.resync.as_ref().map(|r| {
            let secs = (self.now.saturating_sub(r.started_ns)) as f64 / 1e9;
            ResyncStatus {
                total_bytes: r.total,
                done_bytes: self.resync_bytes_done.min(r.total),
                rate_bytes_per_sec: if secs > 0.0 {
                    self.resync_bytes_done as f64 / secs
                } else {
                    0.0
                },
            }
        });
        EngineStatus {
            role: self.role,
            mode: self.cfg.mode,
            disk_state: self.disk_state,
            generation: self.meta.generation,
            history: self.meta.history.clone(),
            peer_generation: self.last_peer.as_ref().map(|p| p.generation),
            relation: self.relation,
            split_brain: self.split_brain,
            conn: self.conn_state,
            peer_role: self.peer.as_ref().map(|p| p.role),
            peer_disk_state: self.peer.as_ref().map(|p| p.disk_state),
            refused_reason: self.refused_reason.clone(),
            connects: self.connects,
            last_seq: self.last_seq,
            acked_seq: self.peer_applied,
            applied_seq: self.applied,
            writes_in_flight: self.pending.len() as u64,
            bytes_in_flight: self.pending.values().map(|p| p.bytes).sum(),
            lag_items,
            lag_bytes,
            lag_seconds: oldest
                .map(|t| self.now.saturating_sub(t) as f64 / 1e9)
                .unwrap_or(0.0),
            peer_needs_full_sync: !self.dirty.is_empty(),
            out_of_sync_bytes: self.dirty.bytes(),
            hot_extents: self.hot.len() as u64,
            resync,
            verify: self.verify.as_ref().map(|v| v.status(self.now)),
            client_writes: self.client_writes,
            shipped_items: self.shipped_items,
            shipped_bytes: self.shipped_bytes,
            client_reads: self.client_reads,
            bytes_written: self.bytes_written,
            bytes_read: self.bytes_read,
            flushes: self.flushes,
            journal: self.journal_status(),
            undo: self.undo_status(),
        }
    }

    /// Items not yet applied by the peer: count, payload bytes, time of the oldest.
    pub(crate) fn lag(&self) -> (u64, u64, Option<u64>) {
        let mut n = 0;
        let mut bytes = 0;
        let mut oldest = None;
        for q in self.queue.iter().filter(|q| q.item.seq > self.peer_applied) {
            n += 1;
            bytes += q.item.payload_len();
            oldest.get_or_insert(q.at_ns);
        }
        (n, bytes, oldest)
    }

    // ------------------------------------------------------------------ helpers

    /// The backing failed an I/O: fail-stop. The disk is detached (`Failed`): this node
    /// serves no data from it and needs a full sync once it is repaired. The peer is told.
    pub(crate) fn disk_failed(&mut self, what: &str, e: IoError) {
        if matches!(self.disk_state, DiskState::Failed | DiskState::Diskless) {
            return;
        }
        if self.can_go_diskless() {
            return self.go_diskless(what, e);
        }
        self.disk_state = DiskState::Failed;
        if self.resync.take().is_some() {
            self.event(
                "resync",
                "full sync abandoned: the source disk failed".into(),
            );
        }
        self.abort_verify("the local disk failed");
        self.undo_forget("the disk failed");
        self.event(
            "failure",
            format!(
                "{what} failed on the backing ({e}): the disk is detached (Failed); this node \
                 serves no data until the disk is repaired and resynced"
            ),
        );
        self.persist_meta();
        self.send(Msg::Hello(self.hello()));
    }

    pub(crate) fn emit(&mut self, o: Output) {
        self.out.push(o);
    }

    pub(crate) fn event(&mut self, kind: &'static str, message: String) {
        self.out.push(Output::Event(Event { kind, message }));
    }

    pub(crate) fn issue(&mut self, purpose: Purpose, kind: DiskKind) -> OpId {
        let op = self.next_op;
        self.next_op += 1;
        self.ops.insert(op, purpose);
        self.out.push(Output::Disk(DiskOp { op, kind }));
        op
    }

    pub(crate) fn send(&mut self, msg: Msg) {
        if let Some(conn) = self.conn {
            self.last_send_ns = self.now;
            self.out.push(Output::Send { conn, msg });
        }
    }

    pub(crate) fn hello(&self) -> Hello {
        Hello {
            version: ENGINE_PROTOCOL_VERSION,
            node: self.cfg.node.clone(),
            resource: self.cfg.resource.clone(),
            volume_size: self.cfg.volume_size,
            role: self.role,
            disk_state: self.disk_state,
            applied_seq: match self.role {
                Role::Primary => self.last_seq,
                Role::Secondary => self.applied,
            },
            received_seq: match self.role {
                Role::Primary => self.last_seq,
                Role::Secondary => self.applied.max(self.last_received),
            },
            generation: self.meta.generation,
            history: self.meta.history.clone(),
            dirty: self
                .dirty_on_disk()
                .coarsened(MAX_DIRTY_RANGES)
                .iter()
                .collect(),
            needs_full_sync: self.needs_full_sync(),
        }
    }

    /// True when this node, as a secondary, can only be brought up to date by a full sync.
    pub(crate) fn needs_full_sync(&self) -> bool {
        matches!(
            self.disk_state,
            DiskState::Inconsistent | DiskState::Outdated | DiskState::Failed | DiskState::Diskless
        ) || self.crashed_primary
    }

    /// The dirty set plus every hot extent: what the metadata records (after a crash,
    /// all of it counts as possibly lacking at the peer).
    pub(crate) fn dirty_on_disk(&self) -> BlockSet {
        let mut set = self.dirty.clone();
        for &e in self.hot.keys() {
            let start = e * self.cfg.al_extent;
            set.insert(
                start,
                (start + self.cfg.al_extent).min(self.cfg.volume_size),
            );
        }
        set
    }

    /// Record the current state in the metadata and write it (serialised).
    pub(crate) fn persist_meta(&mut self) {
        let recorded = self.meta.applied_seq;
        self.meta.role = self.role;
        // Diskless is a state of this run: the local disk has missed writes.
        self.meta.disk_state = match self.disk_state {
            DiskState::Diskless => DiskState::Failed,
            d => d,
        };
        self.meta.applied_seq = match self.role {
            Role::Primary => self.last_seq,
            Role::Secondary => self.flushed,
        };
        self.meta.set(FLAG_PEER_NEEDS_FULL_SYNC, false);
        self.meta.set(FLAG_CRASHED_PRIMARY, self.crashed_primary);
        self.meta.undo = self.undo.session;
        if let Some(state) = self.undo_meta_override() {
            // A protected catch-up is beginning: until its session is recorded the image is
            // untouched, and the metadata keeps describing it as it was written last.
            self.meta.disk_state = state;
            self.meta.applied_seq = recorded;
        }
        if self.meta_in_flight {
            self.meta_dirty = true;
            return;
        }
        self.meta.dirty = self.dirty_on_disk();
        self.meta_snapshot = Some((
            self.hot.keys().copied().collect(),
            self.last_seq,
            self.dirty_gen,
        ));
        self.meta.counter += 1;
        self.meta_in_flight = true;
        let applied = self.meta.applied_seq;
        let disk_state = self.meta.disk_state;
        let journal_failed = self.meta.has(crate::meta::FLAG_JOURNAL_FAILED);
        self.issue(
            Purpose::Meta {
                applied,
                disk_state,
                journal_failed,
                counter: self.meta.counter,
            },
            DiskKind::WriteMeta(self.meta.clone()),
        );
    }

    fn disk_done(&mut self, op: OpId, result: Result<Option<Bytes>, IoError>) {
        let Some(purpose) = self.ops.remove(&op) else {
            self.event("bug", format!("completion for unknown disk op {op}"));
            return;
        };
        match purpose {
            Purpose::ClientRead { req, offset, len } => {
                if let Err(e) = result {
                    self.disk_failed("a client read", e);
                    if self.disk_state == DiskState::Diskless {
                        return self.remote_read(req, offset, len);
                    }
                }
                if result.is_ok() {
                    self.client_reads += 1;
                }
                if let Ok(Some(b)) = &result {
                    self.bytes_read += b.len() as u64;
                }
                self.emit(Output::Complete { req, result });
            }
            Purpose::ClientWrite { req, start } => self.local_write_done(req, Some(start), result),
            Purpose::ClientFlush { req } => self.local_flush_done(req, result),
            Purpose::ResyncRead { start, len, epoch } => {
                self.resync_read_done(start, len, epoch, result)
            }
            Purpose::Apply { seq, start, bytes } => self.apply_done(seq, start, bytes, result),
            Purpose::PeerRead { id } => self.peer_read_done(id, result),
            Purpose::Checkpoint { upto } => self.checkpoint_flush_done(upto, result),
            Purpose::PromoteFlush => self.promote_flush_done(result),
            Purpose::JournalAppend { seq } => self.journal_append_done(seq, result.map(|_| ())),
            Purpose::JournalSuper => self.journal_super_done(result.map(|_| ())),
            Purpose::VerifyRead { start, len, run } => {
                self.verify_read_done(start, len, run, result)
            }
            Purpose::VerifyApply { seq, start } => self.verify_apply_done(seq, start, result),
            Purpose::UndoFlush => self.undo_flush_done(false, result),
            Purpose::UndoRead { idx, epoch } => self.undo_read_done(idx, epoch, result),
            Purpose::UndoWrite { epoch } => self.undo_write_done(epoch, result),
            Purpose::UndoSync { epoch } => self.undo_sync_done(epoch, result),
            Purpose::UndoRollbackRead { idx, epoch } => {
                self.undo_rollback_read_done(idx, epoch, result)
            }
            Purpose::UndoRollbackWrite { epoch } => self.undo_rollback_write_done(epoch, result),
            Purpose::UndoRollbackFlush { epoch } => self.undo_rollback_flush_done(epoch, result),
            Purpose::Meta {
                applied,
                disk_state,
                journal_failed,
                counter,
            } => {
                self.meta_in_flight = false;
                let snapshot = self.meta_snapshot.take();
                match result {
                    Ok(_) => {
                        if self.role_meta_after.is_some_and(|c| counter > c) {
                            // The new role is on disk: the peer may be streamed to (and
                            // resynced) now.
                            self.role_meta_after = None;
                            self.start_streaming();
                        }
                        if journal_failed {
                            self.journal_failure_recorded();
                        }
                        self.undo_meta_written(counter);
                        if let Some((hot, seq, gen)) = snapshot {
                            self.hot_persisted = hot;
                            self.dirty_persisted_seq = self.dirty_persisted_seq.max(seq);
                            self.dirty_persisted_gen = gen;
                        }
                        self.last_meta_ns = self.now;
                        if disk_state == DiskState::Inconsistent
                            || self.disk_state != DiskState::Inconsistent
                        {
                            // The data may be overwritten now (see `on_resync_start`). A
                            // resync that ended before its Inconsistent state reached the
                            // metadata applied nothing: any later write releases the hold
                            // (without this the applier waited forever; sim seed 358).
                            self.applier.hold_for_meta = false;
                        }
                        self.meta_written(applied)
                    }
                    Err(e) => self.disk_failed("a metadata write", e),
                }
                if self.meta_dirty {
                    self.meta_dirty = false;
                    self.persist_meta();
                }
                // Writes waiting for their activity-log extent may go now.
                self.unblock();
            }
        }
    }

    fn tick(&mut self, now_ns: u64) {
        self.now = self.now.max(now_ns);
        if let Some(conn) = self.conn {
            if self.now.saturating_sub(self.last_recv_ns) > self.cfg.peer_timeout_ns {
                self.emit(Output::Close {
                    conn,
                    reason: "peer timed out (nothing received)".into(),
                });
                self.peer_closed(conn);
            } else if self.now.saturating_sub(self.last_send_ns) > self.cfg.ping_interval_ns
                && self.conn_state != ConnState::Connecting
            {
                self.ping_nonce += 1;
                let nonce = self.ping_nonce;
                self.send(Msg::Ping { nonce });
            }
        }
        self.secondary_tick();
        self.promote_tick();
        self.al_tick();
    }

    /// Work that may have become possible after any input.
    fn after_input(&mut self) {
        self.pump_primary();
        self.pump_journal();
        self.ship_pending();
        self.pump_applier();
        self.send_ack_if_moved();
        self.check_shutdown();
    }

    fn admin(&mut self, token: u64, cmd: AdminCmd) {
        let result = match cmd {
            AdminCmd::Promote {
                force,
                new_generation,
            } => match self.promote(token, force, new_generation) {
                Some(r) => r,
                None => return, // answered once the peer confirms
            },
            AdminCmd::Demote => self.demote(),
            AdminCmd::ResolveDiscardLocal => self.resolve_discard_local(),
            AdminCmd::Verify { repair } => self.start_verify(repair),
            AdminCmd::Shutdown => {
                if self.shutting_down.is_none() {
                    self.fail_pending_promote("shutting_down", "the daemon is shutting down");
                    self.shutting_down = Some(self.now);
                    self.event("shutdown", "shutdown requested by operator".into());
                }
                Ok("shutting down".into())
            }
        };
        self.emit(Output::AdminDone { token, result });
    }

    fn check_shutdown(&mut self) {
        let Some(since) = self.shutting_down else {
            return;
        };
        if self.stopped {
            return;
        }
        // Fail what cannot start any more.
        while let Some(i) = self.stalled.pop_front() {
            if let Some(req) = input_req(&i) {
                self.emit(Output::Complete {
                    req,
                    result: Err(IoError::Shutdown),
                });
            }
        }
        let draining = self.role == Role::Primary
            && self.streaming
            && self.peer_applied < self.last_seq
            && self.now.saturating_sub(since) < self.cfg.shutdown_drain_ns;
        let busy = !self.ops.is_empty()
            || !self.pending.is_empty()
            || !self.blocked.is_empty()
            || self.meta_in_flight
            || self.applier.issued > 0;
        if busy || draining {
            return;
        }
        if self.final_checkpoint_issued && !self.final_checkpoint_done {
            return;
        }
        if self.final_checkpoint_done {
            self.stopped = true;
            if let Some(conn) = self.conn {
                self.emit(Output::Send {
                    conn,
                    msg: Msg::Goodbye {
                        reason: "shutting down".into(),
                    },
                });
            }
            self.event("shutdown", "stopped cleanly".into());
            self.emit(Output::Stopped);
            return;
        }
        if self.role == Role::Primary {
            // The ship queue lives in memory only: what the peer does not hold durably
            // goes to the dirty set (recorded by the final checkpoint's metadata).
            self.fold_queue_into_dirty();
            self.hot.clear();
        }
        self.meta.set(FLAG_CLEAN, true);
        self.final_checkpoint_issued = true;
        self.checkpoint();
    }
}

pub(crate) fn err(code: &'static str, message: String) -> AdminError {
    AdminError { code, message }
}

pub(crate) fn input_req(i: &Input) -> Option<ReqId> {
    match i {
        Input::ClientRead { req, .. }
        | Input::ClientWrite { req, .. }
        | Input::ClientWriteZeroes { req, .. }
        | Input::ClientTrim { req, .. }
        | Input::ClientFlush { req } => Some(*req),
        _ => None,
    }
}
