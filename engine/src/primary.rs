//! The primary's side: client requests, local ordering, the ship queue and full sync.
//!
//! Every modifying client request gets the next sequence number at submission and enters
//! the ship queue at once, so the stream order is the submission order. Locally, a request
//! that overlaps one still in flight waits (in sequence order) until it has completed: the
//! local image and the replica then see overlapping writes in the same order.

use crate::bugs::{self, Bug};
use crate::generations::Relation;
use crate::msg::{ItemKind, Msg, StreamItem};
use crate::ranges::overlap;
use crate::rate::TokenBucket;
use crate::types::*;
use crate::volume::*;
use bytes::Bytes;

impl Volume {
    fn check_range(&self, offset: u64, len: u64) -> Result<(), IoError> {
        let end = offset.checked_add(len).ok_or(IoError::Invalid)?;
        if end > self.cfg.volume_size
            || !offset.is_multiple_of(self.cfg.sector)
            || !len.is_multiple_of(self.cfg.sector)
        {
            return Err(IoError::Invalid);
        }
        Ok(())
    }

    pub(crate) fn client_read(&mut self, req: ReqId, offset: u64, len: u64) {
        let result = if self.shutting_down.is_some() {
            Err(IoError::Shutdown)
        } else if self.disk_state == DiskState::Diskless
            && self.role == Role::Primary
            && self.streaming
        {
            // Served by the peer (see diskless.rs).
            match self.check_range(offset, len) {
                Ok(()) if len > 0 => return self.remote_read(req, offset, len),
                r => r,
            }
        } else if matches!(
            self.disk_state,
            DiskState::Inconsistent | DiskState::Failed | DiskState::Diskless
        ) {
            // Never serve data that is known not to be a usable image.
            Err(IoError::Io)
        } else {
            self.check_range(offset, len)
        };
        match result {
            Err(e) => self.emit(Output::Complete {
                req,
                result: Err(e),
            }),
            Ok(()) if len == 0 => self.emit(Output::Complete {
                req,
                result: Ok(Some(Bytes::new())),
            }),
            Ok(()) => {
                self.issue(
                    Purpose::ClientRead { req, offset, len },
                    DiskKind::Read { offset, len },
                );
            }
        }
    }

    pub(crate) fn client_modify(&mut self, input: Input) {
        let req = input_req(&input).expect("client input");
        let check = if self.shutting_down.is_some() {
            Err(IoError::Shutdown)
        } else if self.role != Role::Primary {
            Err(IoError::ReadOnly)
        } else if self.disk_state == DiskState::Failed
            || (self.disk_state == DiskState::Diskless && !self.streaming)
        {
            Err(IoError::Io)
        } else {
            match &input {
                Input::ClientWrite { offset, data, .. } => {
                    self.check_range(*offset, data.len() as u64)
                }
                Input::ClientWriteZeroes { offset, len, .. }
                | Input::ClientTrim { offset, len, .. } => self.check_range(*offset, *len),
                _ => Ok(()),
            }
        };
        if let Err(e) = check {
            self.emit(Output::Complete {
                req,
                result: Err(e),
            });
            return;
        }
        if !self.stalled.is_empty()
            || self.queue_full()
            || self.role_meta_after.is_some()
            || self.behind_resync_read(&input)
        {
            self.stalled.push_back(input);
            return;
        }
        self.submit(input);
    }

    /// A modification overlapping a full-sync read in flight must wait for the read: the
    /// read's item takes its place in the stream when the read completes, and it carries
    /// the data from before the modification, so the modification must come after it.
    fn behind_resync_read(&self, input: &Input) -> bool {
        match input {
            Input::ClientWrite { offset, data, .. } => self
                .resync_reads
                .overlaps(*offset, *offset + data.len() as u64),
            Input::ClientWriteZeroes { offset, len, .. }
            | Input::ClientTrim { offset, len, .. } => {
                self.resync_reads.overlaps(*offset, *offset + *len)
            }
            _ => false,
        }
    }

    /// Backpressure: the peer is connected and the queue holds `queue_limit` bytes.
    pub(crate) fn queue_full(&self) -> bool {
        self.streaming && (self.queue_bytes >= self.cfg.queue_limit || self.journal_tight())
    }

    fn submit(&mut self, input: Input) {
        if !self.streaming && self.gen_shared && !matches!(input, Input::ClientFlush { .. }) {
            self.diverge();
        }
        self.last_seq += 1;
        let seq = self.last_seq;
        let dep = self.completed_max;
        let (req, local, item, bytes) = match input {
            Input::ClientWrite {
                req,
                offset,
                data,
                fua,
            } => {
                let n = data.len() as u64;
                (
                    req,
                    Some((
                        offset,
                        n,
                        DiskKind::Write {
                            offset,
                            data: data.clone(),
                            fua,
                        },
                    )),
                    ItemKind::Write { offset, data, fua },
                    n,
                )
            }
            Input::ClientWriteZeroes {
                req,
                offset,
                len,
                fua,
            } => (
                req,
                Some((offset, len, DiskKind::WriteZeroes { offset, len, fua })),
                ItemKind::WriteZeroes { offset, len, fua },
                0,
            ),
            Input::ClientTrim { req, offset, len } => (
                req,
                Some((offset, len, DiskKind::Trim { offset, len })),
                ItemKind::Trim { offset, len },
                0,
            ),
            Input::ClientFlush { req } => (req, None, ItemKind::Flush, 0),
            _ => unreachable!("submit takes client modifications only"),
        };
        self.pending.insert(
            req,
            PendingClient {
                seq,
                local_done: false,
                error: None,
                bytes,
                flush: matches!(item, ItemKind::Flush),
            },
        );
        let dep = if matches!(item, ItemKind::Flush) {
            seq - 1
        } else {
            dep
        };
        let in_dirty = self.enqueue(StreamItem {
            seq,
            dep,
            resync: false,
            kind: item,
        });
        if self.disk_state == DiskState::Diskless {
            // No local disk: the write is done here once queued; it completes when the peer
            // has applied it (`needs_peer`). One the stream cannot carry (it went to the
            // dirty set, which only a resync from a local disk brings) is lost: an error.
            if in_dirty {
                if let Some(p) = self.pending.get_mut(&req) {
                    p.error = Some(IoError::Io);
                }
            }
            self.local_write_done(req, None, Ok(None));
            return;
        }
        if let Some((start, len, _)) = &local {
            if *len > 0 {
                self.al_note(*start, start + len, seq, in_dirty);
            }
        }
        match local {
            None if bugs::on(Bug::FlushAckBeforeDurable) => {
                self.local_write_done(req, None, Ok(None));
            }
            None => {
                self.issue(Purpose::ClientFlush { req }, DiskKind::Flush);
            }
            Some((_, 0, _)) => {
                // Zero-length write: nothing to do locally.
                self.local_write_done(req, None, Ok(None));
            }
            Some((start, len, kind)) => {
                let end = start + len;
                let covered = self.al_covered(start, end);
                if !covered {
                    // The activity log records the extent first (see al.rs).
                    self.persist_meta();
                }
                if !covered || self.local_busy(start, end) || !self.journal_gate(seq) {
                    self.blocked.push_back(Blocked {
                        req,
                        start,
                        end,
                        kind,
                    });
                } else {
                    self.issue_local(req, start, end, kind);
                }
            }
        }
    }

    /// The first write the peer does not receive as it happens: start a new generation, so
    /// that a takeover at the peer meanwhile shows as a split brain instead of silently
    /// discarding this write. A peer still on the old generation holds a prefix of this
    /// node's stream and resumes by sequence (`bumped_from`).
    fn diverge(&mut self) {
        let old = self.meta.generation;
        let mut x = old ^ self.last_seq.rotate_left(17) ^ self.now.rotate_left(41);
        for b in self.cfg.node.bytes() {
            x = (x ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3);
        }
        // splitmix64 finaliser: a well-spread id (the engine draws no random numbers).
        x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        x ^= x >> 31;
        let new = if x == 0 || x == old {
            x.wrapping_add(1) | 1
        } else {
            x
        };
        self.meta.new_generation(new);
        self.recompute_relation();
        self.bumped_from = Some(old);
        self.gen_shared = false;
        self.persist_meta();
        self.event(
            "generation",
            format!("writing without the peer: new generation {new:016x} (was {old:016x})"),
        );
    }

    /// True when `[start, end)` overlaps a local write in flight or waiting to be issued.
    pub(crate) fn local_busy(&self, start: u64, end: u64) -> bool {
        self.local_inflight.overlaps(start, end)
            || self
                .blocked
                .iter()
                .any(|b| overlap(b.start, b.end, start, end))
    }

    /// A resync or verify read holds `[start, end)`: client writes over it wait for it (its
    /// item must take its place in the stream before theirs).
    pub(crate) fn reserve_background_read(&mut self, start: u64, end: u64) {
        self.local_inflight.insert(start, end, u64::MAX);
        self.resync_reads.insert(start, end, 0);
    }

    /// The background read at `start` completed.
    pub(crate) fn release_background_read(&mut self, start: u64) {
        self.local_inflight.remove(start);
        self.resync_reads.remove(start);
    }

    fn issue_local(&mut self, req: ReqId, start: u64, end: u64, kind: DiskKind) {
        self.local_inflight.insert(start, end, req);
        self.issue(Purpose::ClientWrite { req, start }, kind);
    }

    /// Put an item into the ship queue (and on the wire when streaming), or, when the peer
    /// is away and will need a resync anyway, into the dirty set. True for the latter.
    fn enqueue(&mut self, item: StreamItem) -> bool {
        if !self.streaming && bugs::on(Bug::DropWhileDisconnected) {
            return false;
        }
        if !self.streaming && (!self.dirty.is_empty() || self.resync.is_some()) {
            // A resync follows on reconnect: it brings this block too.
            if let Some((s, e)) = item.range() {
                self.mark_dirty(s, e);
            }
            return true;
        }
        let len = item.payload_len();
        if !self.streaming && !self.journal_has_room(&item) {
            // The journal is full: bitmap mode (the queue's items go to the dirty set).
            if let Some((s, e)) = item.range() {
                self.mark_dirty(s, e);
            }
            self.journal_overflow();
            return true;
        }
        if !self.streaming && self.queue_bytes + len > self.cfg.queue_limit {
            self.event(
                "overflow",
                format!(
                    "ship queue full ({} bytes) while the peer is away: from now on the blocks \
                     written are tracked in the dirty set and resynced on reconnect",
                    self.queue_bytes
                ),
            );
            self.fold_queue_into_dirty();
            if let Some((s, e)) = item.range() {
                self.mark_dirty(s, e);
            }
            self.persist_meta();
            return true;
        }
        self.queue_bytes += len;
        self.journal_append(&item);
        self.queue.push_back(Queued {
            item,
            sent: false,
            at_ns: self.now,
        });
        false
    }

    /// Send queued items in order, from `ship_cursor` on, while the peer is streaming and
    /// each item's activity-log extents are on disk: an item must never reach the peer
    /// before this node could tell, after a crash, that the block may differ (the peer
    /// would hold a write this node lost with its cache, and nobody would know).
    pub(crate) fn ship_pending(&mut self) {
        if !self.streaming || self.role != Role::Primary {
            return;
        }
        let cursor = self.ship_cursor;
        let mut i = self.queue.partition_point(|q| q.item.seq < cursor);
        while i < self.queue.len() {
            let q = &self.queue[i];
            // Resync and verify items change nothing on this node: no log entry needed.
            let covered = q.item.resync
                || matches!(q.item.kind, ItemKind::Verify { .. })
                || q.item.range().is_none_or(|(s, e)| self.al_covered(s, e));
            if !covered || !self.journal_ship_gate(q.item.seq) {
                break;
            }
            // The replication rate limit applies to the write stream; resync reads have
            // their own, verify hashes are small.
            let limited = !q.item.resync && !matches!(q.item.kind, ItemKind::Verify { .. });
            if limited && !self.ship_bucket.take(self.now, q.item.payload_len()) {
                break;
            }
            let item = q.item.clone();
            self.ship_cursor = item.seq + 1;
            self.queue[i].sent = true;
            self.shipped_items += 1;
            self.shipped_bytes += item.payload_len();
            self.send(Msg::Item(item));
            i += 1;
        }
    }

    pub(crate) fn local_write_done(
        &mut self,
        req: ReqId,
        start: Option<u64>,
        result: Result<Option<Bytes>, IoError>,
    ) {
        if let Some(s) = start {
            self.local_inflight.remove(s);
        }
        if let Some(seq) = self.pending.get(&req).map(|p| p.seq) {
            self.local_seq_done(seq);
        }
        if let Err(e) = result {
            self.disk_failed("a local write", e);
        }
        // Gone diskless: the write is in the stream and completes once the peer has it.
        let diskless = self.disk_state == DiskState::Diskless;
        if let Some(p) = self.pending.get_mut(&req) {
            p.local_done = true;
            if let (Err(e), false) = (result, diskless) {
                p.error = Some(e);
            }
        }
        self.try_complete(req);
        self.unblock();
    }

    pub(crate) fn local_flush_done(&mut self, req: ReqId, result: Result<Option<Bytes>, IoError>) {
        self.local_write_done(req, None, result);
    }

    /// Complete a client write/flush when its local leg is done and, in sync mode with a
    /// streaming peer, the peer has applied it.
    pub(crate) fn try_complete(&mut self, req: ReqId) {
        let Some(p) = self.pending.get(&req) else {
            return;
        };
        if !p.local_done {
            return;
        }
        let seq = p.seq;
        if p.error.is_none() && self.needs_peer(seq) {
            self.wait_peer.insert(seq, req);
            return;
        }
        let p = self.pending.remove(&req).expect("pending");
        self.wait_peer.remove(&seq);
        match p.error {
            Some(e) => self.emit(Output::Complete {
                req,
                result: Err(e),
            }),
            None => {
                self.completed_max = self.completed_max.max(seq);
                if p.flush {
                    self.flushes += 1;
                } else {
                    self.client_writes += 1;
                }
                self.bytes_written += p.bytes;
                self.emit(Output::Complete {
                    req,
                    result: Ok(None),
                });
            }
        }
    }

    fn needs_peer(&self, seq: Seq) -> bool {
        !bugs::on(Bug::SyncAckBeforePeer)
            && (self.cfg.mode == Mode::Sync || self.disk_state == DiskState::Diskless)
            && self.streaming
            && seq > self.stream_base
            && self.peer_applied < seq
    }

    /// Complete everything waiting for the peer that no longer has to (ack or disconnect).
    pub(crate) fn release_waiters(&mut self) {
        let ready: Vec<ReqId> = if self.streaming {
            self.wait_peer
                .range(..=self.peer_applied)
                .map(|(_, r)| *r)
                .collect()
        } else {
            self.wait_peer.values().copied().collect()
        };
        for req in ready {
            self.try_complete(req);
        }
    }

    /// Issue blocked writes that no longer overlap anything earlier.
    pub(crate) fn unblock(&mut self) {
        let mut i = 0;
        while i < self.blocked.len() {
            let b = &self.blocked[i];
            let (start, end, req) = (b.start, b.end, b.req);
            let covered = self.al_covered(start, end);
            if !covered && !self.meta_in_flight {
                self.al_request(start, end);
            }
            let journaled = self
                .pending
                .get(&req)
                .is_none_or(|p| self.journal_gate(p.seq));
            let clear = !self.local_inflight.overlaps(start, end)
                && covered
                && journaled
                && !self
                    .blocked
                    .iter()
                    .take(i)
                    .any(|e| overlap(e.start, e.end, start, end));
            if clear {
                let b = self.blocked.remove(i).expect("index");
                self.issue_local(b.req, b.start, b.end, b.kind);
            } else {
                i += 1;
            }
        }
    }

    /// Primary housekeeping after every input: admit stalled writes, drive the full sync.
    pub(crate) fn pump_primary(&mut self) {
        if self.role != Role::Primary {
            return;
        }
        while let Some(front) = self.stalled.front() {
            // A new primary takes writes once its role is on disk (see `role_meta_after`).
            if self.queue_full() || self.role_meta_after.is_some() || self.behind_resync_read(front)
            {
                break;
            }
            let i = self.stalled.pop_front().expect("non-empty");
            self.submit(i);
        }
        self.pump_resync();
        self.pump_verify();
    }

    fn pump_resync(&mut self) {
        if !self.streaming || self.shutting_down.is_some() {
            return;
        }
        let size = self.cfg.volume_size;
        let chunk = self.cfg.resync_chunk;
        loop {
            let Some(r) = self.resync.as_ref() else {
                return;
            };
            let Some((start, end)) = self.dirty.next_chunk(r.cursor, chunk) else {
                break;
            };
            let end = end.min(size);
            if start >= end {
                break;
            }
            if r.reads_in_flight >= self.cfg.resync_depth || self.queue_full() {
                return;
            }
            let len = end - start;
            if self.local_busy(start, end) {
                return; // retried after the overlapping client write completes
            }
            if !self.resync_budget(len) {
                return; // the rate limit: the next tick tries again
            }
            self.reserve_background_read(start, end);
            let r = self.resync.as_mut().expect("resync");
            r.cursor = end;
            r.reads_in_flight += 1;
            let epoch = r.epoch;
            self.issue(
                Purpose::ResyncRead { start, len, epoch },
                DiskKind::Read { offset: start, len },
            );
        }
        let last_seq = self.last_seq;
        let checksum_running = self.verify.as_ref().is_some_and(|v| v.running());
        let r = self.resync.as_mut().expect("resync");
        if r.checksum && checksum_running {
            return; // the checksum pass may still find blocks to copy
        }
        if r.reads_in_flight == 0 {
            let seq = *r.done_seq.get_or_insert(last_seq);
            if !r.done_sent {
                r.done_sent = true;
                let generation = self.meta.generation;
                self.send(Msg::ResyncDone { seq, generation });
            }
        }
    }

    /// Take `len` bytes from the resync rate limit (a bucket holding at most a tenth of
    /// a second's worth, or one chunk).
    fn resync_budget(&mut self, len: u64) -> bool {
        let now = self.now;
        self.resync
            .as_mut()
            .is_some_and(|r| r.bucket.take(now, len))
    }

    pub(crate) fn resync_read_done(
        &mut self,
        start: u64,
        len: u64,
        epoch: u64,
        result: Result<Option<Bytes>, IoError>,
    ) {
        self.release_background_read(start);
        let Some(r) = self.resync.as_mut().filter(|r| r.epoch == epoch) else {
            self.unblock();
            return; // the full sync was abandoned or restarted meanwhile
        };
        r.reads_in_flight -= 1;
        match result {
            Ok(Some(data)) => {
                let kind = if data.iter().all(|&b| b == 0) {
                    ItemKind::WriteZeroes {
                        offset: start,
                        len,
                        fua: false,
                    }
                } else {
                    ItemKind::Write {
                        offset: start,
                        data,
                        fua: false,
                    }
                };
                self.last_seq += 1;
                let seq = self.last_seq;
                self.local_seq_done(seq);
                self.resync_items.insert(seq, (start, start + len));
                self.enqueue(StreamItem {
                    seq,
                    dep: 0,
                    resync: true,
                    kind,
                });
            }
            Ok(None) => self.disk_failed("a full-sync read", IoError::Io),
            Err(e) => self.disk_failed("a full-sync read", e),
        }
        self.unblock();
    }

    /// Begin or resume shipping to a secondary peer whose `Hello` we hold.
    pub(crate) fn start_streaming(&mut self) {
        if self.streaming || self.role != Role::Primary || self.role_meta_after.is_some() {
            return;
        }
        let Some(peer) = self.peer.clone() else {
            return;
        };
        if peer.role != Role::Secondary || self.conn_state == ConnState::Refused {
            return;
        }
        // The handshake refused a peer with newer or diverged data already. A peer on this
        // generation, or on the one this primary left by its own divergence, holds a prefix
        // of this node's stream; one behind on an older generation lacks the blocks of both
        // dirty sets; one that never held data (generation 0) or lost its disk lacks all.
        let same_line = peer.generation == self.meta.generation
            || Some(peer.generation) == self.bumped_from && peer.generation != 0;
        // An Inconsistent peer under checksum full sync: the blocks still to compare were
        // known only to the interrupted pass (this node may have restarted since), so the
        // comparison starts again — it reads, it does not copy (sim seed 1902).
        let full = peer.disk_state == DiskState::Failed
            || peer.generation == 0
            || !same_line && self.relation != Some(Relation::PeerBehind)
            || peer.disk_state == DiskState::Inconsistent && self.cfg.checksum_full_sync;
        self.gen_shared = true;
        if !full && same_line && !peer.needs_full_sync && peer.applied_seq > self.last_seq {
            self.refuse(format!(
                "peer {} has applied sequence {} beyond this primary's {}: it holds writes this \
                 node never made",
                peer.node, peer.applied_seq, self.last_seq
            ));
            return;
        }
        let from = peer.applied_seq;
        // The queue covers the peer's gap only if it holds every item after its position.
        let covered = bugs::on(Bug::DropWhileDisconnected)
            || from >= self.stream_base
                && from <= self.last_seq
                && self.queue.front().is_none_or(|q| q.item.seq <= from + 1)
                && (self.queue.back().map_or(from, |q| q.item.seq) == self.last_seq
                    || from == self.last_seq);
        let resume = !full
            && same_line
            && covered
            && !peer.needs_full_sync
            && peer.dirty.is_empty()
            && self.dirty.is_empty()
            && self.resync.is_none();
        self.streaming = true;
        self.peer_applied = from;
        if !resume {
            self.begin_resync(full);
            return;
        }
        // Resume: resend whatever the peer has not applied.
        for q in self.queue.iter_mut() {
            q.sent = false;
        }
        let n = self.queue.iter().filter(|q| q.item.seq > from).count();
        self.ship_cursor = from + 1;
        self.ship_pending();
        self.event(
            "stream",
            format!(
                "shipping to {} resumed at sequence {} ({n} items resent)",
                peer.node,
                from + 1
            ),
        );
        self.release_waiters();
    }

    /// Start (or restart) a resync of the dirty set — plus the peer's own dirty set, and
    /// the whole volume when `full` — to a connected secondary. A restart after an
    /// interruption moves only what the peer does not yet hold durably.
    pub(crate) fn begin_resync(&mut self, full: bool) {
        if self.disk_state == DiskState::Failed {
            // Never read a failed disk to overwrite a peer with it.
            self.refuse(
                "the peer needs a resync, but this node's disk failed: promote the peer \
                 (demote this node first)"
                    .into(),
            );
            return;
        }
        let base = self.last_seq;
        self.abort_verify("a resync started");
        self.fold_queue_into_dirty();
        let checksum = full && self.cfg.checksum_full_sync;
        if full && !checksum {
            self.mark_dirty(0, self.cfg.volume_size);
        }
        let peer_dirty = self
            .peer
            .as_ref()
            .map(|p| p.dirty.clone())
            .unwrap_or_default();
        for (s, e) in peer_dirty {
            self.mark_dirty(s, e);
        }
        self.resync_items.clear();
        self.ship_cursor = base + 1;
        self.stream_base = base;
        self.peer_applied = base;
        self.peer_durable = base;
        self.resync_epoch += 1;
        let total = self.dirty.bytes();
        self.resync = Some(Resync {
            epoch: self.resync_epoch,
            cursor: 0,
            reads_in_flight: 0,
            total,
            started_ns: self.now,
            done_seq: None,
            done_sent: false,
            checksum,
            bucket: TokenBucket::new(
                self.cfg.resync_rate,
                (self.cfg.resync_rate / 10).max(self.cfg.resync_chunk),
                self.now,
            ),
        });
        self.resync_bytes_done = 0;
        self.conn_state = ConnState::SyncSource;
        if checksum {
            self.start_checksum_pass();
        }
        self.send(Msg::ResyncStart {
            total_bytes: total,
            base_seq: base,
            generation: self.meta.generation,
        });
        self.persist_meta();
        let size = self.cfg.volume_size;
        self.event(
            "resync",
            format!(
                "resync to the peer started: {total} of {size} bytes{} (stream continues \
                 after sequence {base})",
                if total >= size {
                    ", full"
                } else {
                    ", changed blocks only"
                }
            ),
        );
        self.release_waiters();
    }

    /// The peer acknowledged: complete sync-mode writes, release the queue.
    pub(crate) fn on_ack(&mut self, applied: Seq, durable: Seq) {
        if self.role != Role::Primary && self.queue.is_empty() {
            return;
        }
        if applied > self.last_seq {
            // Positions of another stream line (sent before the peer learnt of a full
            // sync): nothing of ours.
            return;
        }
        if applied > self.peer_applied {
            let lo = self.peer_applied;
            let first = self.queue.partition_point(|q| q.item.seq <= lo);
            let done: u64 = self
                .queue
                .range(first..)
                .take_while(|q| q.item.seq <= applied)
                .filter(|q| q.item.resync)
                .map(|q| q.item.range().map_or(0, |(s, e)| e - s))
                .sum();
            self.resync_bytes_done += done;
            self.peer_applied = applied;
        }
        if durable > self.peer_durable {
            self.peer_durable = durable;
        }
        // Resynced blocks the peer holds durably leave the dirty set.
        while let Some((&seq, &(s, e))) = self.resync_items.first_key_value() {
            if seq > self.peer_durable {
                break;
            }
            self.resync_items.pop_first();
            self.dirty.remove(s, e);
            self.dirty_gen += 1;
        }
        while let Some(q) = self.queue.front() {
            if q.item.seq > self.peer_durable.min(self.peer_applied) {
                break;
            }
            self.queue_bytes -= q.item.payload_len();
            self.queue.pop_front();
        }
        self.release_waiters();
        let confirmed = self
            .resync
            .as_ref()
            .and_then(|r| r.done_seq)
            .is_some_and(|s| r_done(s, self.peer_applied));
        if confirmed {
            let total = self.resync.as_ref().map_or(0, |r| r.total);
            self.resync = None;
            self.conn_state = ConnState::Connected;
            self.persist_meta();
            let moved = self.resync_bytes_done;
            self.event(
                "resync",
                format!("resync complete ({total} bytes planned, {moved} bytes of data moved)"),
            );
        }
    }
}

fn r_done(done_seq: Seq, peer_applied: Seq) -> bool {
    peer_applied >= done_seq
}
