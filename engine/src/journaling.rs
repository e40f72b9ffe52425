//! The journal's state machine inside the volume (the format is in [`crate::journal`]).

use crate::journal::{self, JournalConfig};
use crate::msg::StreamItem;
use crate::types::*;
use crate::volume::*;
use std::collections::{BTreeSet, VecDeque};

/// A trusted journal's live items and each record's (seq, logical end).
pub type Replay = (Vec<StreamItem>, Vec<(Seq, u64)>);

/// Where a journal starts when the daemon attaches it (from its scan at start-up).
#[derive(Clone, Debug, Default)]
pub struct JournalStart {
    /// Counter of the newest superblock on disk (0: none).
    pub sb_counter: u64,
    /// Whether the superblock on disk says active.
    pub disk_active: bool,
    /// Logical position of the oldest live record.
    pub head: u64,
    /// Sequence before it.
    pub head_prev: Seq,
    /// Logical position where appends continue.
    pub tail: u64,
    /// Sequence of the last record (`head_prev` when none).
    pub last_seq: Seq,
    /// A trusted journal's live items (already redone on the local disk), with each
    /// record's (seq, logical end): shipped again if this node becomes primary.
    pub replay: Option<Replay>,
    /// A secondary's undo log of a protected catch-up in progress (see [`crate::undo`]).
    pub undo: Option<crate::undo::UndoLog>,
}

/// Journal status for `status`.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct JournalStatus {
    /// Ring capacity, bytes.
    pub capacity: u64,
    /// Bytes held by live records.
    pub used: u64,
    /// Live records.
    pub records: usize,
    /// `active` (holds everything the peer lacks), `bitmap` (a dirty set does that),
    /// `idle` (secondary), or `failed`.
    pub state: String,
    /// Records written since start.
    pub appended: u64,
    /// Times the journal overflowed into the dirty set.
    pub overflows: u64,
    /// Items waiting to be replayed at the next promote (after a crash).
    pub replay_pending: usize,
}

#[derive(Debug)]
pub(crate) struct Journal {
    pub cfg: JournalConfig,
    pub cap: u64,
    pub head: u64,
    pub head_prev: Seq,
    pub tail: u64,
    pub prev_seq: Seq,
    /// Records written or being written: (seq, logical end).
    pub records: VecDeque<(Seq, u64)>,
    /// Items whose record is not written yet (in flight or waiting for room).
    pub pending: BTreeSet<Seq>,
    /// Items waiting for room (the superblock must move the head first).
    pub waiting: VecDeque<StreamItem>,
    pub sb_counter: u64,
    /// Superblock write in flight: (head, head_prev, active).
    pub sb_inflight: Option<(u64, Seq, bool)>,
    pub disk_head: u64,
    pub disk_active: bool,
    pub failed: bool,
    /// The metadata records the failure (writes without a record may go on).
    pub failure_recorded: bool,
    pub replay: Option<Vec<StreamItem>>,
    pub appended: u64,
    pub overflows: u64,
}

impl Volume {
    /// Attach the primary's journal (call once, right after [`Volume::new`]).
    pub fn attach_journal(&mut self, cfg: JournalConfig, start: JournalStart) {
        let cap = cfg.capacity();
        let (replay, records) = match start.replay {
            Some((items, recs)) if !items.is_empty() => (Some(items), recs.into()),
            _ => (None, VecDeque::new()),
        };
        let head = if replay.is_some() {
            start.head
        } else {
            start.tail
        };
        let head_prev = if replay.is_some() {
            start.head_prev
        } else {
            start.last_seq
        };
        self.journal = Some(Journal {
            cfg,
            cap,
            head,
            head_prev,
            tail: start.tail,
            prev_seq: start.last_seq,
            records,
            pending: BTreeSet::new(),
            waiting: VecDeque::new(),
            sb_counter: start.sb_counter,
            sb_inflight: None,
            disk_head: start.head,
            disk_active: start.disk_active,
            failed: false,
            failure_recorded: false,
            replay,
            appended: 0,
            overflows: 0,
        });
        if let Some(log) = start.undo {
            self.attach_undo(log);
        }
        // Record the current boot and state at once.
        self.journal_super(true);
    }

    /// True when `item` gets a journal record (every stream item but resync data).
    fn journaled_kind(&self, item: &StreamItem) -> bool {
        self.journal.as_ref().is_some_and(|j| !j.failed) && !item.resync
    }

    /// Room for a record of `item` once the head as known in memory is on disk.
    pub(crate) fn journal_has_room(&self, item: &StreamItem) -> bool {
        let Some(j) = self.journal.as_ref().filter(|_| self.journaled_kind(item)) else {
            return true;
        };
        let size = journal::record_size(item);
        let need = size + journal::pad_before(j.cap, j.tail, size);
        j.tail - j.head + need <= j.cap
    }

    /// Fewer than a quarter of the ring free: a streaming primary holds new writes back
    /// (like a full queue) until the peer's acknowledgements free records.
    pub(crate) fn journal_tight(&self) -> bool {
        self.journal
            .as_ref()
            .is_some_and(|j| !j.failed && (j.tail - j.head) * 4 > j.cap * 3)
    }

    /// Append `item`'s record (the item just entered the ship queue).
    pub(crate) fn journal_append(&mut self, item: &StreamItem) {
        if !self.journaled_kind(item) {
            return;
        }
        let j = self.journal.as_mut().expect("journal");
        j.pending.insert(item.seq);
        if !j.waiting.is_empty() || !self.journal_write_record(item) {
            self.journal
                .as_mut()
                .expect("journal")
                .waiting
                .push_back(item.clone());
            self.journal_super(false);
        }
    }

    /// Write the record of `item` at the tail if the ring has room behind the head on
    /// disk; false otherwise.
    fn journal_write_record(&mut self, item: &StreamItem) -> bool {
        let j = self.journal.as_mut().expect("journal");
        let size = journal::record_size(item);
        let pad = journal::pad_before(j.cap, j.tail, size);
        if j.tail - j.disk_head + pad + size > j.cap {
            return false;
        }
        let mut writes = Vec::new();
        if pad > 0 {
            writes.push((
                journal::phys(j.cap, j.tail),
                journal::encode_pad(j.tail, j.prev_seq, pad),
                None,
            ));
            j.tail += pad;
        }
        writes.push((
            journal::phys(j.cap, j.tail),
            journal::encode_record(j.tail, j.prev_seq, item),
            Some(item.seq),
        ));
        j.tail += size;
        j.prev_seq = item.seq;
        j.records.push_back((item.seq, j.tail));
        j.appended += 1;
        for (pos, data, seq) in writes {
            self.issue(
                Purpose::JournalAppend { seq },
                DiskKind::JournalWrite { pos, parts: data },
            );
        }
        true
    }

    /// A record write completed.
    pub(crate) fn journal_append_done(&mut self, seq: Option<Seq>, result: Result<(), IoError>) {
        let Some(j) = self.journal.as_mut() else {
            return;
        };
        if let Some(seq) = seq {
            j.pending.remove(&seq);
        }
        if let Err(e) = result {
            self.journal_failed(e);
        }
        self.unblock();
    }

    /// The journal device failed: from now on the dirty set tracks what the peer lacks.
    fn journal_failed(&mut self, e: IoError) {
        let Some(j) = self.journal.as_mut() else {
            return;
        };
        if j.failed {
            return;
        }
        j.failed = true;
        j.pending.clear();
        j.waiting.clear();
        j.replay = None;
        // The device may not take a superblock any more: the metadata records that the
        // journal is not to be trusted, and writes without a record wait for that.
        self.meta.set(crate::meta::FLAG_JOURNAL_FAILED, true);
        self.persist_meta();
        self.event(
            "journal",
            format!(
                "journal write failed ({e:?}): replication continues without it; after a \
                 crash the activity log's extents are resynced"
            ),
        );
        if !self.streaming {
            self.fold_queue_into_dirty();
            self.persist_meta();
        }
    }

    /// A metadata write recording the journal's failure completed.
    pub(crate) fn journal_failure_recorded(&mut self) {
        if let Some(j) = self.journal.as_mut().filter(|j| j.failed) {
            j.failure_recorded = true;
            self.unblock();
        }
    }

    /// May the local write of client item `seq` be issued? Its record and every earlier
    /// one must be written; a write without a record needs an inactive journal on disk.
    pub(crate) fn journal_gate(&self, seq: Seq) -> bool {
        let Some(j) = self.journal.as_ref() else {
            return true;
        };
        if j.failed {
            return j.failure_recorded;
        }
        if j.pending.range(..=seq).next().is_some() {
            return false;
        }
        if j.records.binary_search_by_key(&seq, |r| r.0).is_ok() {
            return true;
        }
        !j.disk_active && j.sb_inflight.is_none_or(|(_, _, a)| !a)
    }

    /// May queue item `seq` be shipped? Every record up to it must be written.
    pub(crate) fn journal_ship_gate(&self, seq: Seq) -> bool {
        self.journal.as_ref().is_none_or(|j| {
            j.failed && j.failure_recorded || !j.failed && j.pending.range(..=seq).next().is_none()
        })
    }

    /// Release records the peer holds durably and the local disk has: the head moves.
    pub(crate) fn journal_release(&mut self) {
        let upto = self
            .peer_durable
            .min(self.peer_applied)
            .min(self.local_contig);
        let Some(j) = self.journal.as_mut() else {
            return;
        };
        if j.replay.is_some() {
            return; // kept until the promote decides
        }
        while let Some(&(seq, end)) = j.records.front() {
            if seq > upto || j.pending.contains(&seq) {
                break;
            }
            j.records.pop_front();
            j.head = end;
            j.head_prev = seq;
        }
        if j.records.is_empty() && j.pending.is_empty() && j.waiting.is_empty() {
            // Nothing live: pads and all, the ring is empty up to the tail.
            j.head = j.tail;
            j.head_prev = j.prev_seq;
        }
    }

    /// Everything in the journal is dropped (the queue went into the dirty set).
    pub(crate) fn journal_release_all(&mut self) {
        let Some(j) = self.journal.as_mut() else {
            return;
        };
        j.records.clear();
        for it in j.waiting.drain(..) {
            j.pending.remove(&it.seq);
        }
        j.replay = None;
        j.head = j.tail;
        j.head_prev = j.prev_seq;
    }

    fn journal_want_active(&self) -> bool {
        self.role == Role::Primary
            && self.dirty.is_empty()
            && self.resync.is_none()
            && self.journal.as_ref().is_some_and(|j| !j.failed)
    }

    /// Write the superblock when its state or head should change (`force`: now, to
    /// record this boot). One write at a time.
    pub(crate) fn journal_super(&mut self, force: bool) {
        let active = self.journal_want_active();
        let Some(j) = self.journal.as_mut() else {
            return;
        };
        if j.sb_inflight.is_some() || j.failed {
            return;
        }
        let active = active || j.replay.is_some() && j.disk_active;
        let head_lag = j.head - j.disk_head;
        let want = force
            || active != j.disk_active
            || (!j.waiting.is_empty() && head_lag > 0)
            || head_lag * 4 >= j.cap;
        if !want {
            return;
        }
        j.sb_counter += 1;
        j.sb_inflight = Some((j.head, j.head_prev, active));
        let sb = journal::Superblock {
            counter: j.sb_counter,
            resource: self.cfg.resource.clone(),
            volume_size: self.cfg.volume_size,
            capacity: j.cap,
            head: j.head,
            head_prev: j.head_prev,
            active,
            boot_id: j.cfg.boot_id,
        };
        let pos = (j.sb_counter % 2) * journal::SB_SLOT;
        self.issue(
            Purpose::JournalSuper,
            DiskKind::JournalWrite {
                pos,
                parts: vec![sb.encode()],
            },
        );
    }

    pub(crate) fn journal_super_done(&mut self, result: Result<(), IoError>) {
        let Some(j) = self.journal.as_mut() else {
            return;
        };
        let Some((head, _, active)) = j.sb_inflight.take() else {
            return;
        };
        if let Err(e) = result {
            self.journal_failed(e);
            self.unblock();
            return;
        }
        j.disk_head = head;
        j.disk_active = active;
        if !j.failed && self.meta.has(crate::meta::FLAG_JOURNAL_FAILED) {
            // This run's superblock is on the device: the old contents can no longer pass
            // for trusted, the failure flag has done its job.
            self.meta.set(crate::meta::FLAG_JOURNAL_FAILED, false);
            self.persist_meta();
        }
        // Room may have appeared for the items waiting.
        while let Some(item) = self
            .journal
            .as_ref()
            .and_then(|j| j.waiting.front().cloned())
        {
            if !self.journal_write_record(&item) {
                break;
            }
            self.journal.as_mut().expect("journal").waiting.pop_front();
        }
        self.unblock();
    }

    /// Housekeeping after every input.
    pub(crate) fn pump_journal(&mut self) {
        if self.journal.is_none() {
            return;
        }
        if self
            .journal
            .as_ref()
            .is_some_and(|j| j.replay.is_some() && !self.crashed_primary)
        {
            // This node was synced from its peer meanwhile: the replay is stale.
            self.journal_release_all();
        }
        // Records live only on a primary (or as a crash's replay): a node that is not
        // primary has nothing of its own to ship.
        if self.role != Role::Primary
            && self
                .journal
                .as_ref()
                .is_some_and(|j| j.replay.is_none() && (!j.records.is_empty() || j.head != j.tail))
        {
            self.journal_release_all();
        }
        self.journal_release();
        // Items waiting for room while the peer is away never get it: bitmap mode.
        let stuck = self.journal.as_ref().is_some_and(|j| {
            !j.waiting.is_empty()
                && j.sb_inflight.is_none()
                && j.head == j.disk_head
                && !self.streaming
        });
        if stuck && self.role == Role::Primary {
            self.journal_overflow();
        }
        self.journal_super(false);
    }

    /// The journal is full while the peer is away: bitmap mode.
    pub(crate) fn journal_overflow(&mut self) {
        if let Some(j) = self.journal.as_mut() {
            j.overflows += 1;
        }
        let used = self.journal.as_ref().map_or(0, |j| j.tail - j.head);
        self.event(
            "overflow",
            format!(
                "journal full ({used} bytes) while the peer is away: from now on the blocks \
                 written are tracked in the dirty set and resynced on reconnect"
            ),
        );
        self.fold_queue_into_dirty();
        self.persist_meta();
    }

    /// At a promote: use the replayed items if this node's crash left a trusted journal
    /// and nothing since made it stale. True when used.
    pub(crate) fn take_journal_replay(&mut self, peer_seq: Seq) -> bool {
        let Some(items) = self.journal.as_mut().and_then(|j| j.replay.take()) else {
            return false;
        };
        let last = items.last().map_or(0, |i| i.seq);
        if !self.crashed_primary || peer_seq > last {
            self.event(
                "journal",
                format!(
                    "the journal's {} items after the crash are not replayed (the peer holds \
                     sequence {peer_seq}, the journal ends at {last}): the activity log's \
                     extents are resynced instead",
                    items.len()
                ),
            );
            self.journal_release_all();
            return false;
        }
        let head_prev = self.journal.as_ref().map_or(0, |j| j.head_prev);
        let n = items.len();
        let bytes: u64 = items.iter().map(|i| i.payload_len()).sum();
        self.dirty = crate::dirty::BlockSet::new(self.dirty.block());
        self.dirty_gen += 1;
        self.queue.clear();
        self.queue_bytes = 0;
        for item in items {
            if let Some((s, e)) = item.range() {
                self.al_note(s, e, item.seq, false);
            }
            self.queue_bytes += item.payload_len();
            self.queue.push_back(Queued {
                item,
                sent: false,
                at_ns: self.now,
            });
        }
        self.last_seq = last;
        self.completed_max = last;
        self.stream_base = head_prev;
        self.reset_local_watermarks();
        self.crashed_primary = false;
        self.event(
            "journal",
            format!(
                "journal replay: {n} items ({bytes} bytes of data, sequences {} to {last}) \
                 are shipped again; no resync",
                head_prev + 1
            ),
        );
        true
    }

    pub(crate) fn journal_status(&self) -> Option<JournalStatus> {
        let j = self.journal.as_ref()?;
        Some(JournalStatus {
            capacity: j.cap,
            used: j.tail - j.head,
            records: j.records.len() + j.waiting.len(),
            state: if j.failed {
                "failed"
            } else if self.role != Role::Primary {
                "idle"
            } else if self.journal_want_active() {
                "active"
            } else {
                "bitmap"
            }
            .into(),
            appended: j.appended,
            overflows: j.overflows,
            replay_pending: j.replay.as_ref().map_or(0, |r| r.len()),
        })
    }
}
