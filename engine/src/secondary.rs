//! The secondary's side: the ordered applier, checkpoints and acknowledgements.
//!
//! Items are issued strictly in stream order from the front of the pending queue. An item
//! waits while it overlaps an item still being applied, and while an item it depends on
//! (`dep`) has not completed; non-overlapping independent items are applied concurrently.
//! So a later write never lands before an earlier overlapping one, and a write that the
//! primary's client issued after seeing another complete never lands before that one.

use crate::bugs::{self, Bug};
use crate::msg::{ItemKind, Msg, StreamItem};
use crate::types::*;
use crate::volume::*;
use bytes::Bytes;

impl Volume {
    /// A stream item arrived.
    pub(crate) fn on_item(&mut self, item: StreamItem) {
        if self.role == Role::Primary {
            self.protocol_error(format!(
                "peer sent stream item {} while this node is primary",
                item.seq
            ));
            return;
        }
        if self.undo_refuses_stream("a stream item") {
            return;
        }
        if item.seq <= self.last_received {
            return; // a resend of something already here
        }
        if item.seq != self.last_received + 1 {
            self.protocol_error(format!(
                "stream gap: expected sequence {}, got {}",
                self.last_received + 1,
                item.seq
            ));
            return;
        }
        self.last_received = item.seq;
        if !item.resync {
            self.follow_generation();
        }
        self.applier.pending.push_back(item);
    }

    /// A primary on a newer generation streams to us by sequence (it sends a full sync's
    /// start first otherwise): this node's data is a prefix of that line, follow it.
    fn follow_generation(&mut self) {
        let Some(peer) = self.peer.as_ref() else {
            return;
        };
        if peer.generation == self.meta.generation
            || self.relation != Some(crate::generations::Relation::PeerAhead)
            || self.needs_full_sync()
        {
            return;
        }
        let (old, new, node) = (self.meta.generation, peer.generation, peer.node.clone());
        self.meta.new_generation(new);
        self.relation = Some(crate::generations::Relation::Same);
        self.persist_meta();
        self.event(
            "generation",
            format!("following primary {node}: generation {old:016x} -> {new:016x}"),
        );
    }

    /// Issue every pending item that may start now.
    pub(crate) fn pump_applier(&mut self) {
        // While stopping, apply nothing new: the final checkpoint must record everything on
        // the disk, or a restart would re-apply older items over newer ones.
        self.pump_undo();
        if self.disk_state == DiskState::Failed
            || self.applier.hold_for_meta
            || self.shutting_down.is_some()
            || self.undo_holds_applier()
        {
            return;
        }
        while let Some(front) = self.applier.pending.front() {
            if front.seq <= self.applied {
                self.applier.pending.pop_front();
                continue;
            }
            let range = front.range();
            let writes = !matches!(front.kind, ItemKind::Verify { .. });
            if !bugs::on(Bug::ApplyOutOfOrder) {
                if front.dep > self.applied {
                    break;
                }
                if let Some((s, e)) = range {
                    if self.applier.inflight.overlaps(s, e) {
                        break;
                    }
                } else if self.applier.issued > 0 {
                    break; // a flush waits for everything before it
                }
            }
            if let Some((s, e)) = range {
                // In a protected catch-up, a block's old content is saved before it is
                // overwritten (verify items only read).
                if writes && !self.undo_ready(s, e) {
                    break;
                }
            }
            let item = self.applier.pending.pop_front().expect("front");
            let seq = item.seq;
            self.applier.last_issued = self.applier.last_issued.max(seq);
            if let ItemKind::Verify {
                offset,
                len,
                block,
                hashes,
            } = item.kind
            {
                self.applier.inflight.insert(offset, offset + len, seq);
                self.applier.issued += 1;
                self.verify_items.insert(seq, (block, hashes));
                self.issue(
                    Purpose::VerifyApply { seq, start: offset },
                    DiskKind::Read { offset, len },
                );
                continue;
            }
            let kind = match item.kind {
                ItemKind::Write { offset, data, fua } => DiskKind::Write { offset, data, fua },
                ItemKind::WriteZeroes { offset, len, fua } => {
                    DiskKind::WriteZeroes { offset, len, fua }
                }
                ItemKind::Trim { offset, len } => DiskKind::Trim { offset, len },
                ItemKind::Flush => DiskKind::Flush,
                ItemKind::Verify { .. } => unreachable!("handled above"),
            };
            if let Some((s, e)) = range {
                self.applier.inflight.insert(s, e, seq);
            }
            self.applier.issued += 1;
            self.issue(
                Purpose::Apply {
                    seq,
                    start: range.map(|r| r.0),
                    bytes: range.map_or(0, |(s, e)| e - s),
                },
                kind,
            );
        }
        self.maybe_checkpoint();
    }

    pub(crate) fn apply_done(
        &mut self,
        seq: Seq,
        start: Option<u64>,
        bytes: u64,
        result: Result<Option<Bytes>, IoError>,
    ) {
        self.applier.issued -= 1;
        if let Some(s) = start {
            self.applier.inflight.remove(s);
        }
        if let Err(e) = result {
            // Fail-stop: this image can no longer be trusted as a prefix of the stream.
            self.disk_failed(&format!("applying sequence {seq}"), e);
            self.protocol_error(format!(
                "applying sequence {seq} failed on the backing ({e}); the replica needs a full sync"
            ));
            return;
        }
        if seq <= self.applied {
            return; // superseded by a full sync that started meanwhile
        }
        if start.is_none() {
            // A flush item: everything before it is durable now.
            self.flushed = self.flushed.max(seq - 1);
        }
        self.applier.unpersisted_bytes += bytes;
        self.applier.done_above.insert(seq, ());
        while self
            .applier
            .done_above
            .remove(&(self.applied + 1))
            .is_some()
        {
            self.applied += 1;
        }
        if start.is_none() && self.applied >= seq {
            self.flushed = self.flushed.max(seq);
            self.persist_meta();
        }
        self.issue_peer_reads();
        self.check_resync_target_done();
    }

    fn check_resync_target_done(&mut self) {
        if let Some(done) = self.applier.resync_done_seq {
            if self.applied >= done && !self.applier.checkpointing {
                self.checkpoint();
            }
        }
    }

    /// Fsync, then record the watermark in the metadata.
    pub(crate) fn checkpoint(&mut self) {
        if self.applier.checkpointing {
            return;
        }
        let upto = match self.role {
            Role::Primary => self.local_contig,
            Role::Secondary => self.applied,
        };
        self.applier.checkpointing = true;
        self.applier.unpersisted_bytes = 0;
        self.applier.last_checkpoint_ns = self.now;
        self.issue(Purpose::Checkpoint { upto }, DiskKind::Flush);
    }

    pub(crate) fn checkpoint_flush_done(
        &mut self,
        upto: Seq,
        result: Result<Option<Bytes>, IoError>,
    ) {
        self.applier.checkpointing = false;
        if let Err(e) = result {
            self.disk_failed("an fsync", e);
            return;
        }
        if self.role == Role::Primary && self.disk_state != DiskState::Failed {
            self.local_durable = self.local_durable.max(upto);
        }
        // A disk that failed while this fsync was in flight counts nothing it covered.
        if self.role == Role::Secondary && self.disk_state != DiskState::Failed {
            self.flushed = self.flushed.max(upto);
            if let Some(done) = self.applier.resync_done_seq {
                if upto >= done {
                    self.applier.resync_done_seq = None;
                    self.disk_state = DiskState::UpToDate;
                    // The generation of the data just received (not of whoever is
                    // connected now: the link may have dropped meanwhile).
                    // What this node lacked or held on its own is replaced now.
                    self.dirty = crate::dirty::BlockSet::new(self.dirty.block());
                    self.dirty_gen += 1;
                    self.hot.clear();
                    if self.meta.generation != self.applier.resync_generation {
                        self.meta.new_generation(self.applier.resync_generation);
                    }
                    self.recompute_relation();
                    if self.conn_state == ConnState::SyncTarget {
                        self.conn_state = ConnState::Connected;
                    }
                    self.event(
                        "resync",
                        "full sync received: this replica is UpToDate".into(),
                    );
                    self.send(Msg::Hello(self.hello()));
                    // Last: its metadata write records everything above.
                    self.undo_complete();
                }
            }
        }
        self.persist_meta();
        // The full sync may have become complete while this checkpoint was in flight.
        self.check_resync_target_done();
    }

    pub(crate) fn meta_written(&mut self, applied: Seq) {
        if self.role == Role::Secondary {
            self.durable = self.durable.max(applied);
        }
        if self.final_checkpoint_issued && !self.applier.checkpointing && !self.meta_dirty {
            self.final_checkpoint_done = true;
        }
    }

    fn maybe_checkpoint(&mut self) {
        if self.role == Role::Secondary
            && !self.applier.checkpointing
            && self.applied > self.flushed
            && (self.applier.unpersisted_bytes >= self.cfg.checkpoint_bytes
                || self.now.saturating_sub(self.applier.last_checkpoint_ns)
                    >= self.cfg.checkpoint_interval_ns)
        {
            self.checkpoint();
        }
    }

    pub(crate) fn secondary_tick(&mut self) {
        self.maybe_checkpoint();
    }

    /// Tell the primary how far we got, once per input at most.
    pub(crate) fn send_ack_if_moved(&mut self) {
        if self.role != Role::Secondary || self.conn.is_none() {
            return;
        }
        // Positions count along one stream: acknowledge only to a primary whose line this
        // node is on, or that is syncing it. An ack of positions from another line (sent
        // before the primary's full-sync start arrived) would release items never applied.
        let on_its_line = self.peer.as_ref().is_some_and(|p| p.role == Role::Primary)
            && (self.relation == Some(crate::generations::Relation::Same)
                || self.conn_state == ConnState::SyncTarget
                || self.disk_state == DiskState::Inconsistent);
        if !on_its_line {
            return;
        }
        let now = (self.applied, self.durable);
        if now != self.last_ack {
            self.last_ack = now;
            self.send(Msg::Ack {
                applied: now.0,
                durable: now.1,
            });
        }
    }

    /// The primary starts a full sync: everything up to `base` is covered by it.
    pub(crate) fn on_resync_start(&mut self, total: u64, base: Seq, generation: u64) {
        if self.role == Role::Primary {
            self.protocol_error("peer started a full sync towards this primary".into());
            return;
        }
        if self.undo_refuses_stream("a resync start") {
            return;
        }
        let protected = self.undo_on_resync_start();
        self.applier.pending.clear();
        self.applier.resync_generation = generation;
        self.note_peer_generation(generation);
        self.applier.done_above.clear();
        self.applier.resync_done_seq = None;
        self.applied = base;
        self.last_received = base;
        self.flushed = base;
        self.durable = base;
        self.disk_state = DiskState::Inconsistent;
        self.applier.hold_for_meta = true;
        // Whatever this node held (even writes of its own from before a crash) is replaced.
        self.crashed_primary = false;
        self.conn_state = ConnState::SyncTarget;
        self.last_ack = (Seq::MAX, Seq::MAX);
        self.persist_meta();
        self.event(
            "resync",
            if protected {
                format!(
                    "resync from the peer started ({total} bytes); this replica keeps its \
                     consistent image recoverable in the undo log until it ends"
                )
            } else {
                format!(
                    "{} from the peer started ({total} bytes); this replica is \
                     Inconsistent until it ends",
                    if total >= self.cfg.volume_size {
                        "full sync"
                    } else {
                        "resync of the changed blocks"
                    }
                )
            },
        );
    }

    /// The primary's generation as its resync messages give it: newer than its last hello
    /// when it started a generation between the hello and the resync (a write while
    /// disconnected). Without this, the relation computed after the resync would be
    /// against the stale one, and this node would stop acknowledging (sim seed 268).
    fn note_peer_generation(&mut self, generation: u64) {
        for p in [self.peer.as_mut(), self.last_peer.as_mut()]
            .into_iter()
            .flatten()
        {
            if p.generation != generation && generation != 0 {
                if p.generation != 0 {
                    let old = p.generation;
                    p.history.retain(|&g| g != old);
                    p.history.insert(0, old);
                    p.history.truncate(crate::meta::MAX_HISTORY);
                }
                p.generation = generation;
            }
        }
    }

    pub(crate) fn on_resync_done(&mut self, seq: Seq, generation: u64) {
        if self.role == Role::Primary || self.undo_refuses_stream("a resync end") {
            return;
        }
        self.note_peer_generation(generation);
        self.applier.resync_done_seq = Some(seq);
        self.applier.resync_generation = generation;
        // Answer even if the position did not move: an empty resync ends with this ack.
        self.last_ack = (Seq::MAX, Seq::MAX);
        self.check_resync_target_done();
    }
}
