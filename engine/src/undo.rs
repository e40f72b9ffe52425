//! Crash-consistent catch-up on a secondary: an undo log of the blocks a resync overwrites.
//!
//! A resync (a catch-up after the journal overflowed, or any bitmap resync) writes blocks out
//! of stream order, so while it runs the secondary's image is not a prefix of any stream:
//! DRBD calls such a disk Inconsistent and a takeover cannot use it. blkrep keeps the image
//! recoverable instead. When a resync starts on a secondary whose image is consistent and
//! that has a journal device (idle on a secondary), a **protected catch-up** begins:
//!
//! 1. In-flight applies finish, an fsync makes the image durable, and the metadata records
//!    the session ([`crate::meta::UndoMeta`]: id, the stream position and generation of
//!    that image). Nothing is overwritten before that metadata write is durable.
//! 2. Before any block is first overwritten during the session, its current content is read
//!    and appended to the undo log on the journal device, and the log is fsynced. Only then
//!    is the write applied. Each block is saved once per session, so records never overlap.
//! 3. When the resync completes, the metadata write that makes the replica UpToDate drops
//!    the session (the log is garbage from then on).
//! 4. `promote --force` during the session rolls back: every record's content is written
//!    back, the disk is fsynced, and the node takes over with the pre-catch-up image
//!    (Consistent, at the recorded position and generation). A crash during the rollback
//!    repeats it at the next start (writing saved content again is idempotent).
//!
//! When the log would overflow, or the journal device fails, protection is dropped: the
//! metadata is rewritten without the session *before* any unsaved block is overwritten, and
//! the catch-up goes on unprotected (Inconsistent until it ends, as before), with an event.
//!
//! Written by hand: it is part of the engine's ordering contract (nothing overwritten before
//! its old content is durable elsewhere), which no crate models.
//!
//! ## Undo record (in the journal device's ring, from [`journal::DATA_START`], linear)
//! ```text
//!   0  magic "BLKRUNDO"   8  version u16 (1)   10 reserved (zero) 6
//!  16  session id u64    24  index u64 (0, 1, 2, ... within the session)
//!  32  offset u64        40  len u64 (payload bytes: the old content of [offset, offset+len))
//!  48  blake3(payload) 32 bytes               80  reserved (zero) 40
//! 120  blake3(header bytes 0..120), first 8 bytes
//! ```
//! then the payload, padded to 512 bytes. A scan at start-up follows the indexes from 0 and
//! stops at the first header that is not the next record of this session or fails a check:
//! a record whose fsync did not complete was never followed by an overwrite.

use crate::dirty::BlockSet;
use crate::journal;
use crate::meta::UndoMeta;
use crate::types::*;
use crate::volume::*;
use bytes::Bytes;

const MAGIC: &[u8; 8] = b"BLKRUNDO";
const VERSION: u16 = 1;
/// Record header size.
pub const HEADER: usize = 128;
/// Largest payload of one record.
pub const MAX_RECORD: u64 = 1 << 20;
/// Most bytes saved in one batch (reads, appends, one fsync).
const MAX_BATCH: u64 = 8 << 20;
/// Items looked at ahead of the applier's front when a batch is gathered.
const LOOKAHEAD: usize = 64;
/// Rollback records read at once.
const ROLLBACK_DEPTH: usize = 8;

/// Bytes a record with `len` payload bytes takes in the log.
pub fn record_size(len: u64) -> u64 {
    (HEADER as u64 + len).div_ceil(journal::ALIGN) * journal::ALIGN
}

fn hash8(b: &[u8]) -> [u8; 8] {
    blake3::hash(b).as_bytes()[..8].try_into().unwrap()
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

/// A record's parts, back to back: header, payload, padding.
pub fn encode_record(id: u64, index: u64, offset: u64, payload: Bytes) -> Vec<Bytes> {
    let mut h = vec![0u8; HEADER];
    h[..8].copy_from_slice(MAGIC);
    h[8..10].copy_from_slice(&VERSION.to_le_bytes());
    h[16..24].copy_from_slice(&id.to_le_bytes());
    h[24..32].copy_from_slice(&index.to_le_bytes());
    h[32..40].copy_from_slice(&offset.to_le_bytes());
    h[40..48].copy_from_slice(&(payload.len() as u64).to_le_bytes());
    h[48..80].copy_from_slice(blake3::hash(&payload).as_bytes());
    let sum = hash8(&h[..120]);
    h[120..128].copy_from_slice(&sum);
    let pad = record_size(payload.len() as u64) as usize - HEADER - payload.len();
    let mut parts = vec![Bytes::from(h), payload];
    if pad > 0 {
        parts.push(Bytes::from(vec![0u8; pad]));
    }
    parts
}

/// Header fields: (offset, len, payload hash), when `h` is record `index` of session `id`.
fn parse_header(h: &[u8], id: u64, index: u64) -> Option<(u64, u64, [u8; 32])> {
    if h.len() < HEADER
        || &h[..8] != MAGIC
        || u16::from_le_bytes([h[8], h[9]]) != VERSION
        || hash8(&h[..120]) != h[120..128]
        || u64_at(h, 16) != id
        || u64_at(h, 24) != index
    {
        return None;
    }
    let len = u64_at(h, 40);
    // Record 0 is the session's marker (no payload); every other one saves something.
    if (len == 0) != (index == 0) || len > MAX_RECORD {
        return None;
    }
    Some((u64_at(h, 32), len, h[48..80].try_into().unwrap()))
}

/// Check a whole record read back for a rollback; its payload when intact.
pub fn decode_record(buf: &[u8], id: u64, index: u64, offset: u64) -> Result<Bytes, String> {
    let (off, len, sum) = parse_header(buf, id, index)
        .ok_or_else(|| format!("undo record {index}: header missing or damaged"))?;
    if off != offset || buf.len() < HEADER + len as usize {
        return Err(format!("undo record {index}: not the record indexed"));
    }
    let payload = &buf[HEADER..HEADER + len as usize];
    if blake3::hash(payload).as_bytes() != &sum {
        return Err(format!("undo record {index}: payload checksum mismatch"));
    }
    Ok(Bytes::copy_from_slice(payload))
}

/// One saved range: where its record is (bytes from the start of the ring) and what it holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UndoRecord {
    pub pos: u64,
    pub offset: u64,
    pub len: u64,
}

/// The undo log of a session as found by [`scan`] (or built up while running).
#[derive(Clone, Debug, Default)]
pub struct UndoLog {
    pub records: Vec<UndoRecord>,
    /// Bytes of the ring in use.
    pub tail: u64,
}

impl UndoLog {
    fn saved(&self, block: u64) -> BlockSet {
        let mut s = BlockSet::new(block);
        for r in &self.records {
            s.insert(r.offset, r.offset + r.len);
        }
        s
    }
}

/// Read a session's records back at start-up. `cap` is the ring's capacity, `read(pos,
/// len)` reads the journal device at an absolute position. Returns the log (`None` when
/// the session's marker record is not there: the log is lost) and a line for the log file.
pub fn scan(
    session: &UndoMeta,
    cap: u64,
    read: &mut dyn FnMut(u64, usize) -> std::io::Result<Vec<u8>>,
) -> (Option<UndoLog>, String) {
    let mut log = UndoLog::default();
    let mut why = "end of the log".to_string();
    let marker = read(journal::DATA_START, HEADER)
        .ok()
        .and_then(|h| parse_header(&h, session.id, 0));
    if marker.is_none() {
        return (
            None,
            format!(
                "the undo log of the catch-up in progress is missing (journal device replaced \
                 or damaged): the image cannot be rolled back (rollback point was sequence {})",
                session.seq
            ),
        );
    }
    log.tail = record_size(0);
    loop {
        let index = log.records.len() as u64 + 1;
        if log.tail + HEADER as u64 > cap {
            break;
        }
        let h = match read(journal::DATA_START + log.tail, HEADER) {
            Ok(h) => h,
            Err(e) => {
                why = format!("read error at {}: {e}", log.tail);
                break;
            }
        };
        let Some((offset, len, sum)) = parse_header(&h, session.id, index) else {
            break;
        };
        let size = record_size(len);
        if log.tail + size > cap {
            why = format!("record {index} runs past the ring");
            break;
        }
        match read(journal::DATA_START + log.tail + HEADER as u64, len as usize) {
            Ok(p) if blake3::hash(&p).as_bytes() == &sum => {}
            Ok(_) => {
                why = format!("record {index}: payload checksum mismatch (torn, never used)");
                break;
            }
            Err(e) => {
                why = format!("record {index}: read error: {e}");
                break;
            }
        }
        log.records.push(UndoRecord {
            pos: log.tail,
            offset,
            len,
        });
        log.tail += size;
    }
    let bytes: u64 = log.records.iter().map(|r| r.len).sum();
    let report = format!(
        "protected catch-up in progress (rollback point: sequence {}): undo log holds {} \
         records, {bytes} bytes ({why})",
        session.seq,
        log.records.len()
    );
    (Some(log), report)
}

/// Where the undo machinery stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Phase {
    /// No session.
    Off,
    /// A session (`pre`: its id is drawn later) is to begin once in-flight applies finish
    /// (then the fsync); `state` is the image's disk state, which the metadata keeps
    /// saying until the session is recorded.
    Starting { pre: UndoMeta, state: DiskState },
    /// The fsync of the pre-catch-up image and the session's marker record (written, then
    /// synced) are in flight; `left` counts the two.
    Flushing {
        pre: UndoMeta,
        state: DiskState,
        left: u8,
    },
    /// A session is recorded (or being recorded: `hold_for_meta` covers that).
    Active,
    /// The session ended (completed, or protection dropped): nothing is applied until
    /// metadata without it (update counter `after` or later) is durable.
    Dropping { after: u64 },
    /// A forced promote rolls the image back.
    RollingBack,
}

/// A batch of blocks being saved.
#[derive(Debug, Default)]
pub(crate) struct Batch {
    /// (offset, len, old content once read)
    pub ranges: Vec<(u64, u64, Option<Bytes>)>,
    pub reads_left: usize,
    pub writes_left: usize,
    /// Record positions, parallel to `ranges`, once appended.
    pub positions: Vec<u64>,
}

/// Rollback progress.
#[derive(Debug, Default)]
pub(crate) struct Rollback {
    pub next: usize,
    pub inflight: usize,
    pub done: usize,
    pub flushing: bool,
}

#[derive(Debug)]
pub(crate) struct Undo {
    pub phase: Phase,
    pub session: Option<UndoMeta>,
    pub log: UndoLog,
    pub saved: BlockSet,
    pub next_index: u64,
    pub batch: Option<Batch>,
    pub rollback: Option<Rollback>,
    /// Sessions completed, rolled back and dropped since start (status).
    pub completed: u64,
    pub rollbacks: u64,
    pub dropped: u64,
    /// Tags each batch and rollback: completions of an abandoned one are ignored.
    pub epoch: u64,
    /// The forced promote under way follows a rollback (its message says so).
    pub just_rolled_back: bool,
}

impl Undo {
    pub fn new(session: Option<UndoMeta>, block: u64) -> Undo {
        Undo {
            phase: if session.is_some() {
                Phase::Active
            } else {
                Phase::Off
            },
            session,
            log: UndoLog::default(),
            saved: BlockSet::new(block),
            next_index: 0,
            batch: None,
            rollback: None,
            completed: 0,
            rollbacks: 0,
            dropped: 0,
            epoch: 0,
            just_rolled_back: false,
        }
    }
}

/// Undo status for `status`.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct UndoStatus {
    /// `starting`, `active` (the image can be rolled back), `releasing` (the session's end
    /// is being recorded), `rolling-back`, `off`.
    pub state: String,
    /// The stream position a takeover now rolls back to.
    pub rollback_seq: Option<Seq>,
    /// Bytes of old content saved in this session.
    pub saved_bytes: u64,
    /// Bytes of the undo log in use, and its capacity (the journal's ring).
    pub used: u64,
    pub capacity: u64,
    /// Sessions since start: completed, rolled back, dropped (log full or failed).
    pub completed: u64,
    pub rollbacks: u64,
    pub dropped: u64,
}

impl Volume {
    /// Hand over the undo log found at start-up (call after [`Volume::attach_journal`]).
    pub fn attach_undo(&mut self, log: UndoLog) {
        self.undo.saved = log.saved(self.undo.saved.block());
        self.undo.next_index = log.records.len() as u64 + 1;
        self.undo.log = log;
    }

    /// The journal device may hold an undo log now: a journal that is attached, working,
    /// and holds no records of a primary.
    fn undo_room(&self) -> Option<u64> {
        self.journal
            .as_ref()
            .filter(|j| !j.failed && j.records.is_empty() && j.replay.is_none())
            .map(|j| j.cap)
    }

    /// A resync starts on this secondary (called by `on_resync_start` before it resets the
    /// applier). Returns true when a protected session is beginning or continuing.
    pub(crate) fn undo_on_resync_start(&mut self) -> bool {
        match self.undo.phase {
            Phase::Active | Phase::Starting { .. } | Phase::Flushing { .. } => return true,
            Phase::Dropping { .. } | Phase::RollingBack => return false,
            Phase::Off => {}
        }
        if !crate::handshake::has_data(self.disk_state) || self.undo_room().is_none() {
            return false;
        }
        // Items are issued strictly in order: once the issued ones finish, the image holds
        // everything up to the last one issued.
        // Taken now: `on_resync_start` clears the crashed-primary mark next.
        self.undo.phase = Phase::Starting {
            pre: UndoMeta {
                id: 0,
                seq: self.applied.max(self.applier.last_issued),
                generation: self.meta.generation,
                crashed_primary: self.crashed_primary,
            },
            state: self.disk_state,
        };
        self.undo.session = None;
        true
    }

    /// What the metadata says while a session begins: the untouched image (its state, and
    /// the position last recorded), until the session itself is recorded.
    pub(crate) fn undo_meta_override(&self) -> Option<DiskState> {
        match self.undo.phase {
            Phase::Starting { state, .. } | Phase::Flushing { state, .. } => Some(state),
            _ => None,
        }
    }

    /// Whether the applier must wait for the undo machinery.
    pub(crate) fn undo_holds_applier(&self) -> bool {
        !matches!(self.undo.phase, Phase::Off | Phase::Active) || self.undo.batch.is_some()
    }

    /// Drive the session's start and the rollback.
    pub(crate) fn pump_undo(&mut self) {
        match self.undo.phase {
            Phase::Starting { mut pre, state } if self.applier.issued == 0 => {
                pre.id = self.meta.counter + 1;
                let id = pre.id;
                self.undo.phase = Phase::Flushing {
                    pre,
                    state,
                    left: 2,
                };
                self.undo.epoch += 1;
                let epoch = self.undo.epoch;
                self.issue(Purpose::UndoFlush, DiskKind::Flush);
                self.issue(
                    Purpose::UndoWrite { epoch },
                    DiskKind::JournalWrite {
                        pos: journal::DATA_START,
                        parts: encode_record(id, 0, 0, Bytes::new()),
                    },
                );
            }
            Phase::Active if self.undo.session.is_some() && self.undo_room().is_none() => {
                self.undo_drop("the journal device is not available to hold the undo log");
            }
            Phase::RollingBack => self.pump_rollback(),
            _ => {}
        }
    }

    /// The fsync of the image (`journal` false) or of the marker record completed.
    pub(crate) fn undo_flush_done(
        &mut self,
        journal: bool,
        result: Result<Option<Bytes>, IoError>,
    ) {
        let Phase::Flushing { pre, state, left } = self.undo.phase else {
            return;
        };
        if let Err(e) = result {
            if journal {
                // No protection (the journal device failed): the catch-up goes on as before.
                self.undo.phase = Phase::Off;
                self.applier.hold_for_meta = true;
                self.persist_meta();
                self.event(
                    "catchup",
                    format!(
                        "catch-up protection unavailable: the undo log's marker cannot be \
                         written ({e}); this replica is Inconsistent until the resync ends"
                    ),
                );
            } else {
                self.undo.phase = Phase::Off;
                self.disk_failed("the fsync before a protected catch-up", e);
            }
            return;
        }
        if left > 1 {
            self.undo.phase = Phase::Flushing {
                pre,
                state,
                left: left - 1,
            };
            return;
        }
        self.undo.session = Some(pre);
        self.undo.phase = Phase::Active;
        self.undo.log = UndoLog {
            records: Vec::new(),
            tail: record_size(0),
        };
        self.undo.saved = BlockSet::new(self.undo.saved.block());
        self.undo.next_index = 1;
        // `hold_for_meta` keeps the applier waiting until this (Inconsistent, with the
        // session) is durable.
        self.applier.hold_for_meta = true;
        self.persist_meta();
        self.event(
            "catchup",
            format!(
                "protected catch-up: blocks are saved to the undo log before they are \
                 overwritten; a takeover now rolls back to sequence {}",
                pre.seq
            ),
        );
    }

    /// Give up protection (log full, journal device failed).
    fn undo_drop(&mut self, why: &str) {
        self.undo.session = None;
        self.undo.batch = None;
        self.undo.dropped += 1;
        self.undo_release();
        self.event(
            "catchup",
            format!(
                "catch-up protection dropped: {why}; this replica is Inconsistent until the \
                 resync ends (a takeover before then is refused)"
            ),
        );
    }

    /// The session is gone from memory: write metadata without it, and apply nothing until
    /// that write is durable. (Blocks overwritten unsaved while the metadata on disk still
    /// names the session would be missing from a rollback after a crash: sim seed 823.)
    fn undo_release(&mut self) {
        self.persist_meta();
        // A write asked for while another is in flight goes after it, one counter higher.
        let after = self.meta.counter + u64::from(self.meta_dirty);
        self.undo.phase = Phase::Dropping { after };
    }

    /// The disk failed: its image is nothing to roll back to (a replaced disk would get a
    /// mix of old saved blocks and whatever it holds). The caller persists the metadata.
    pub(crate) fn undo_forget(&mut self, why: &str) {
        if self.undo.session.take().is_some() {
            self.undo.dropped += 1;
            self.event(
                "catchup",
                format!("catch-up protection dropped: {why}; the undo log is discarded"),
            );
        }
        self.undo.phase = Phase::Off;
        self.undo.batch = None;
        self.undo.rollback = None;
        self.undo.epoch += 1;
        self.undo.log = UndoLog::default();
    }

    /// A metadata write with update counter `counter` is durable.
    pub(crate) fn undo_meta_written(&mut self, counter: u64) {
        if let Phase::Dropping { after } = self.undo.phase {
            if counter >= after {
                self.undo.phase = Phase::Off;
            }
        }
    }

    /// The resync completed: the session's image is not needed any more. Called once the
    /// replica's new state is set in memory: the metadata write it asks for records both.
    pub(crate) fn undo_complete(&mut self) {
        if let Some(s) = self.undo.session.take() {
            self.undo.completed += 1;
            let bytes: u64 = self.undo.log.records.iter().map(|r| r.len).sum();
            self.event(
                "catchup",
                format!(
                    "catch-up complete: the undo log ({} records, {bytes} bytes; rollback \
                     point {}) is discarded",
                    self.undo.log.records.len(),
                    s.seq
                ),
            );
            self.undo.batch = None;
            self.undo.log = UndoLog::default();
            self.undo_release();
        }
    }

    /// `[start, end)` rounded out to whole sectors (the undo log's granularity).
    fn undo_span(&self, s: u64, e: u64) -> (u64, u64) {
        let b = self.undo.saved.block();
        (s / b * b, (e.div_ceil(b) * b).min(self.cfg.volume_size))
    }

    /// Whether the applier's front item (range `[s, e)`) may be applied now; when not, a
    /// batch saving its blocks (and those of the items behind it) is started.
    pub(crate) fn undo_ready(&mut self, s: u64, e: u64) -> bool {
        if self.undo.phase != Phase::Active
            || self.undo.session.is_none()
            || crate::bugs::on(crate::bugs::Bug::UndoNoSave)
        {
            return true;
        }
        let (s, e) = self.undo_span(s, e);
        if self.undo.saved.contains(s, e) {
            return true;
        }
        if self.undo.batch.is_some() {
            return false;
        }
        // Gather the unsaved blocks of the front and the items after it.
        let mut need = BlockSet::new(self.undo.saved.block());
        need.insert(s, e);
        for (a, b) in self
            .applier
            .pending
            .iter()
            .take(LOOKAHEAD)
            .filter_map(|it| it.range())
        {
            if need.bytes() >= MAX_BATCH {
                break;
            }
            let (a, b) = self.undo_span(a, b);
            need.insert(a, b);
        }
        let (lo, hi) = (
            need.iter().next().map_or(0, |r| r.0),
            need.iter().last().map_or(0, |r| r.1),
        );
        let saved: Vec<(u64, u64)> = self
            .undo
            .saved
            .iter()
            .filter(|&(x, y)| y > lo && x < hi)
            .collect();
        for (x, y) in saved {
            need.remove(x, y);
        }
        let mut ranges = Vec::new();
        let mut size = 0;
        for (a, b) in need.iter() {
            let mut x = a;
            while x < b {
                let y = (x + MAX_RECORD).min(b);
                ranges.push((x, y - x, None));
                size += record_size(y - x);
                x = y;
            }
        }
        let cap = self.undo_room().unwrap_or(0);
        if self.undo.log.tail + size > cap {
            let used = self.undo.log.tail;
            self.undo_drop(&format!(
                "the undo log is full ({used} of {cap} bytes used, {size} more needed; make the \
                 journal larger to protect longer catch-ups)"
            ));
            return false;
        }
        let n = ranges.len();
        let reads: Vec<(u64, u64)> = ranges.iter().map(|r| (r.0, r.1)).collect();
        self.undo.epoch += 1;
        let epoch = self.undo.epoch;
        self.undo.batch = Some(Batch {
            ranges,
            reads_left: n,
            writes_left: 0,
            positions: Vec::new(),
        });
        for (i, (offset, len)) in reads.into_iter().enumerate() {
            self.issue(
                Purpose::UndoRead { idx: i, epoch },
                DiskKind::Read { offset, len },
            );
        }
        false
    }

    pub(crate) fn undo_read_done(
        &mut self,
        idx: usize,
        epoch: u64,
        result: Result<Option<Bytes>, IoError>,
    ) {
        if epoch != self.undo.epoch {
            return;
        }
        let data = match result {
            Ok(Some(d)) => d,
            Ok(None) => Bytes::new(),
            Err(e) => {
                self.undo.batch = None;
                self.disk_failed("reading blocks to save in the undo log", e);
                return;
            }
        };
        let Some(b) = self.undo.batch.as_mut() else {
            return;
        };
        if let Some(r) = b.ranges.get_mut(idx) {
            r.2 = Some(data);
        }
        b.reads_left -= 1;
        if b.reads_left > 0 {
            return;
        }
        let Some(id) = self.undo.session.map(|s| s.id) else {
            return;
        };
        // Append every record, then one fsync.
        let mut writes = Vec::new();
        let mut positions = Vec::new();
        for (offset, _, data) in b.ranges.iter() {
            let payload = data.clone().unwrap_or_default();
            let pos = self.undo.log.tail;
            self.undo.log.tail += record_size(payload.len() as u64);
            let index = self.undo.next_index;
            self.undo.next_index += 1;
            positions.push(pos);
            writes.push((
                journal::DATA_START + pos,
                encode_record(id, index, *offset, payload),
            ));
        }
        b.positions = positions;
        b.writes_left = writes.len();
        for (pos, parts) in writes {
            self.issue(
                Purpose::UndoWrite { epoch },
                DiskKind::JournalWrite { pos, parts },
            );
        }
    }

    pub(crate) fn undo_write_done(&mut self, epoch: u64, result: Result<Option<Bytes>, IoError>) {
        if epoch != self.undo.epoch {
            return;
        }
        if matches!(self.undo.phase, Phase::Flushing { .. }) {
            // The session's marker record: sync it.
            match result {
                Ok(_) => {
                    self.issue(Purpose::UndoSync { epoch }, DiskKind::JournalSync);
                }
                Err(e) => self.undo_flush_done(true, Err(e)),
            }
            return;
        }
        if let Err(e) = result {
            if self.undo.batch.is_some() {
                self.undo_drop(&format!("writing the undo log failed ({e})"));
            }
            return;
        }
        let Some(b) = self.undo.batch.as_mut() else {
            return;
        };
        b.writes_left -= 1;
        if b.writes_left == 0 {
            self.issue(Purpose::UndoSync { epoch }, DiskKind::JournalSync);
        }
    }

    pub(crate) fn undo_sync_done(&mut self, epoch: u64, result: Result<Option<Bytes>, IoError>) {
        if epoch != self.undo.epoch {
            return;
        }
        if matches!(self.undo.phase, Phase::Flushing { .. }) {
            self.undo_flush_done(true, result);
            return;
        }
        if let Err(e) = result {
            if self.undo.batch.is_some() {
                self.undo_drop(&format!("syncing the undo log failed ({e})"));
            }
            return;
        }
        let Some(b) = self.undo.batch.take() else {
            return;
        };
        for ((offset, len, _), pos) in b.ranges.iter().zip(b.positions.iter()) {
            self.undo.saved.insert(*offset, offset + len);
            self.undo.log.records.push(UndoRecord {
                pos: *pos,
                offset: *offset,
                len: *len,
            });
        }
    }

    /// While a takeover rolls the image back, this node takes no stream: true (and the
    /// link is closed) when `what` arrived then.
    pub(crate) fn undo_refuses_stream(&mut self, what: &str) -> bool {
        if self.undo.phase != Phase::RollingBack {
            return false;
        }
        self.protocol_error(format!(
            "peer sent {what} while this node is taking over (rolling back its catch-up)"
        ));
        true
    }

    /// Whether a forced promote can roll this node back to a consistent image.
    pub(crate) fn undo_can_roll_back(&self) -> bool {
        self.disk_state == DiskState::Inconsistent
            && self.undo.phase == Phase::Active
            && self.undo.session.is_some()
            && self.undo_room().is_some()
    }

    /// Start the rollback of a forced promote (the caller checked
    /// [`Volume::undo_can_roll_back`] and set up the pending promote).
    pub(crate) fn undo_start_rollback(&mut self) {
        self.undo.phase = Phase::RollingBack;
        self.undo.epoch += 1;
        self.undo.batch = None;
        self.undo.rollback = Some(Rollback::default());
        let n = self.undo.log.records.len();
        self.event(
            "takeover",
            format!(
                "takeover during a catch-up: rolling back {n} saved ranges to the image at \
                 sequence {}",
                self.undo.session.map_or(0, |s| s.seq)
            ),
        );
        self.pump_rollback();
    }

    fn pump_rollback(&mut self) {
        let Some(rb) = self.undo.rollback.as_mut() else {
            return;
        };
        let n = self.undo.log.records.len();
        let mut reads = Vec::new();
        while rb.inflight < ROLLBACK_DEPTH && rb.next < n {
            let r = self.undo.log.records[rb.next];
            reads.push((rb.next, r));
            rb.next += 1;
            rb.inflight += 1;
        }
        let all_done = rb.done == n && rb.inflight == 0 && !rb.flushing;
        if all_done {
            rb.flushing = true;
        }
        let epoch = self.undo.epoch;
        for (idx, r) in reads {
            self.issue(
                Purpose::UndoRollbackRead { idx, epoch },
                DiskKind::JournalRead {
                    pos: journal::DATA_START + r.pos,
                    len: record_size(r.len),
                },
            );
        }
        if all_done {
            self.issue(Purpose::UndoRollbackFlush { epoch }, DiskKind::Flush);
        }
    }

    pub(crate) fn undo_rollback_read_done(
        &mut self,
        idx: usize,
        epoch: u64,
        result: Result<Option<Bytes>, IoError>,
    ) {
        if self.undo.rollback.is_none() || epoch != self.undo.epoch {
            return;
        }
        let Some(&r) = self.undo.log.records.get(idx) else {
            return;
        };
        let id = self.undo.session.map_or(0, |s| s.id);
        let payload = match result {
            Ok(Some(buf)) => decode_record(&buf, id, idx as u64 + 1, r.offset),
            Ok(None) => Err("empty read".into()),
            Err(e) => Err(format!("read error: {e}")),
        };
        match payload {
            Ok(data) => {
                self.issue(
                    Purpose::UndoRollbackWrite { epoch },
                    DiskKind::Write {
                        offset: r.offset,
                        data,
                        fua: false,
                    },
                );
            }
            Err(why) => self.rollback_failed(&why),
        }
    }

    pub(crate) fn undo_rollback_write_done(
        &mut self,
        epoch: u64,
        result: Result<Option<Bytes>, IoError>,
    ) {
        if self.undo.rollback.is_none() || epoch != self.undo.epoch {
            return;
        }
        if let Err(e) = result {
            self.undo.rollback = None;
            self.undo.phase = Phase::Active;
            self.disk_failed("writing saved blocks back during a rollback", e);
            self.fail_pending_promote(
                "rollback_failed",
                "the disk failed while rolling back the catch-up",
            );
            return;
        }
        let Some(rb) = self.undo.rollback.as_mut() else {
            return;
        };
        rb.inflight -= 1;
        rb.done += 1;
        self.pump_rollback();
    }

    fn rollback_failed(&mut self, why: &str) {
        // Reads still in flight complete into nothing. The image stays Inconsistent with
        // its session: what was written back is the saved content, so a later rollback
        // (or the resync's completion) is still correct.
        self.undo.rollback = None;
        self.undo.phase = Phase::Active;
        self.event("takeover", format!("rollback failed: {why}"));
        self.fail_pending_promote(
            "rollback_failed",
            &format!(
                "the undo log cannot be read back ({why}); this replica stays Inconsistent: \
                 let the catch-up finish, or recover the primary site"
            ),
        );
    }

    pub(crate) fn undo_rollback_flush_done(
        &mut self,
        epoch: u64,
        result: Result<Option<Bytes>, IoError>,
    ) {
        if epoch != self.undo.epoch {
            return;
        }
        let Some(rb) = self.undo.rollback.take() else {
            return;
        };
        if let Err(e) = result {
            self.undo.phase = Phase::Active;
            self.disk_failed("the fsync after a rollback", e);
            self.fail_pending_promote("rollback_failed", "the disk failed after the rollback");
            return;
        }
        let s = self.undo.session.take().expect("session");
        // The peer counted these blocks as delivered (it may have dropped them from its
        // dirty set); they hold older content again: whichever side is resynced later, they
        // must be among the blocks compared (sim seed 375).
        let ranges: Vec<(u64, u64)> = self
            .undo
            .log
            .records
            .iter()
            .map(|r| (r.offset, r.offset + r.len))
            .collect();
        for (a, b) in ranges {
            self.mark_dirty(a, b);
        }
        self.undo.phase = Phase::Off;
        self.undo.rollbacks += 1;
        self.undo.log = UndoLog::default();
        self.applied = s.seq;
        self.last_received = s.seq;
        self.flushed = s.seq;
        self.durable = s.seq;
        self.applier.resync_done_seq = None;
        self.applier.last_issued = s.seq;
        if self.meta.generation != s.generation {
            self.meta.generation = s.generation;
        }
        self.crashed_primary = s.crashed_primary;
        self.disk_state = DiskState::Consistent;
        if self.conn_state == ConnState::SyncTarget {
            self.conn_state = ConnState::Disconnected;
        }
        self.recompute_relation();
        self.event(
            "takeover",
            format!(
                "rolled back {} saved ranges: this node holds the image at sequence {} \
                 (generation {:016x}) again",
                rb.done, s.seq, s.generation
            ),
        );
        self.undo.just_rolled_back = true;
        // The pending forced promote goes on exactly as without a catch-up.
        self.issue(Purpose::PromoteFlush, DiskKind::Flush);
    }

    pub(crate) fn undo_status(&self) -> Option<UndoStatus> {
        let u = &self.undo;
        let state = match u.phase {
            Phase::Off => {
                if u.completed + u.rollbacks + u.dropped == 0 {
                    return None;
                }
                "off"
            }
            Phase::Starting { .. } | Phase::Flushing { .. } => "starting",
            Phase::Active => "active",
            Phase::Dropping { .. } => "releasing",
            Phase::RollingBack => "rolling-back",
        };
        Some(UndoStatus {
            state: state.into(),
            rollback_seq: u.session.map(|s| s.seq),
            saved_bytes: u.log.records.iter().map(|r| r.len).sum(),
            used: u.log.tail,
            capacity: self.undo_room().unwrap_or(0),
            completed: u.completed,
            rollbacks: u.rollbacks,
            dropped: u.dropped,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_roundtrip_and_scan_stops_at_damage() {
        let session = UndoMeta {
            id: 7,
            seq: 42,
            generation: 9,
            crashed_primary: false,
        };
        let cap = 64 * 1024;
        let mut dev = vec![0u8; (journal::DATA_START + cap) as usize];
        let put = |dev: &mut Vec<u8>, pos: u64, rec: &[u8]| {
            let at = (journal::DATA_START + pos) as usize;
            dev[at..at + rec.len()].copy_from_slice(rec);
        };
        let read_of = |dev: &Vec<u8>| {
            let d = dev.clone();
            move |p: u64, n: usize| Ok(d[p as usize..p as usize + n].to_vec())
        };
        // No marker: the log is lost, never an empty log.
        assert!(scan(&session, cap, &mut read_of(&dev)).0.is_none());
        put(&mut dev, 0, &encode_record(7, 0, 0, Bytes::new()).concat());
        let mut pos = record_size(0);
        for (i, off) in [0u64, 8192, 65536].iter().enumerate() {
            let payload = Bytes::from(vec![i as u8 + 1; 4096]);
            let rec = encode_record(7, i as u64 + 1, *off, payload).concat();
            put(&mut dev, pos, &rec);
            let back = decode_record(&rec, 7, i as u64 + 1, *off).unwrap();
            assert_eq!(back, vec![i as u8 + 1; 4096]);
            assert!(
                decode_record(&rec, 8, i as u64 + 1, *off).is_err(),
                "other session"
            );
            assert!(
                decode_record(&rec, 7, i as u64 + 1, *off + 512).is_err(),
                "other place"
            );
            pos += rec.len() as u64;
        }
        let (log, _) = scan(&session, cap, &mut read_of(&dev));
        let log = log.unwrap();
        assert_eq!(log.records.len(), 3);
        assert_eq!(log.tail, pos);
        assert_eq!(log.records[1].offset, 8192);
        // A torn payload in the last record: the scan keeps the first two.
        let last = log.records[2].pos as usize + journal::DATA_START as usize + HEADER + 10;
        dev[last] ^= 0xff;
        let (log, report) = scan(&session, cap, &mut read_of(&dev));
        assert_eq!(log.unwrap().records.len(), 2, "{report}");
        // Records of another session are not this one's.
        let other = UndoMeta { id: 8, ..session };
        assert!(scan(&other, cap, &mut read_of(&dev)).0.is_none());
    }
}
