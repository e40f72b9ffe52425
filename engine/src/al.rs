//! The dirty set and the activity log (the primary's bookkeeping of what its peer lacks).
//!
//! - The **dirty set** (`Volume::dirty`, block granularity) holds blocks the peer lacks that
//!   the stream will not bring: writes made while the peer was away and the queue could not
//!   keep them, queue contents dropped at a resync start or a clean shutdown, a full sync's
//!   whole volume, and the peer's own dirty set received in its hello. A resync reads and
//!   ships exactly these blocks; each leaves the set once the peer holds it durably.
//! - The **activity log** (`Volume::hot`, extents of `al_extent` bytes) makes that crash
//!   safe. Before the first write into an extent, the extent is written to the metadata
//!   (the write waits for it); after a crash the metadata's set — dirty set plus hot
//!   extents — is what the peer may lack. An extent cools (leaves the log, lazily, with the
//!   next metadata write) once every stream write into it is durable at the peer and every
//!   write recorded in the dirty set has reached the metadata.

use crate::types::*;
use crate::volume::*;

/// Cool extents and write the metadata at most this often, nanoseconds.
const AL_TICK_NS: u64 = 200_000_000;

impl Volume {
    fn extent_range(&self, start: u64, end: u64) -> std::ops::RangeInclusive<u64> {
        let x = self.cfg.al_extent;
        (start / x)..=((end.max(start + 1) - 1) / x)
    }

    /// Add `[start, end)` to the dirty set.
    pub(crate) fn mark_dirty(&mut self, start: u64, end: u64) {
        if start < end {
            self.dirty.insert(start, end.min(self.cfg.volume_size));
            self.dirty_gen += 1;
            // A resync item over these blocks no longer covers them: its durable ack must
            // not take them out of the dirty set again (sim seed 375).
            if !self.resync_items.is_empty() {
                self.resync_items
                    .retain(|_, (s, e)| !(*s < end && start < *e));
            }
        }
    }

    /// A write of sequence `seq` over `[start, end)` is submitted: keep its extents hot.
    pub(crate) fn al_note(&mut self, start: u64, end: u64, seq: Seq, in_dirty: bool) {
        for e in self.extent_range(start, end) {
            let h = self.hot.entry(e).or_default();
            if in_dirty {
                h.dirty_seq = h.dirty_seq.max(seq);
            } else {
                h.stream_seq = h.stream_seq.max(seq);
            }
        }
    }

    /// True when every extent of `[start, end)` is recorded on disk (and stays recorded by
    /// the metadata write in flight, if any): a write there may be issued.
    pub(crate) fn al_covered(&self, start: u64, end: u64) -> bool {
        if self.role != Role::Primary
            || matches!(self.disk_state, DiskState::Failed | DiskState::Diskless)
            || crate::bugs::on(crate::bugs::Bug::SkipActivityLog)
        {
            return true;
        }
        self.extent_range(start, end).all(|e| {
            self.hot_persisted.contains(&e)
                && self
                    .meta_snapshot
                    .as_ref()
                    .is_none_or(|(s, _, _)| s.contains(&e))
        })
    }

    /// Sequence `seq` completed on the local disk (or has no local write).
    pub(crate) fn local_seq_done(&mut self, seq: Seq) {
        if seq <= self.local_contig {
            return;
        }
        self.local_done_above.insert(seq);
        while self.local_done_above.remove(&(self.local_contig + 1)) {
            self.local_contig += 1;
        }
    }

    /// A new primary: everything up to `last_seq` counts as locally durable (it flushed).
    pub(crate) fn reset_local_watermarks(&mut self) {
        self.local_contig = self.last_seq;
        self.local_durable = self.last_seq;
        self.local_done_above.clear();
    }

    /// A blocked write waits for `[start, end)` to be recorded: make sure it will be.
    pub(crate) fn al_request(&mut self, start: u64, end: u64) {
        for e in self.extent_range(start, end) {
            self.hot.entry(e).or_default();
        }
        self.persist_meta();
    }

    /// Queue items the peer may not hold durably go to the dirty set (the queue is about
    /// to be dropped).
    pub(crate) fn fold_queue_into_dirty(&mut self) {
        let durable = self.peer_durable;
        let ranges: Vec<(Seq, u64, u64)> = self
            .queue
            .iter()
            .filter(|q| q.item.seq > durable)
            .filter(|q| !matches!(q.item.kind, crate::msg::ItemKind::Verify { .. }))
            .filter_map(|q| q.item.range().map(|(s, e)| (q.item.seq, s, e)))
            .collect();
        for (seq, s, e) in ranges {
            self.mark_dirty(s, e);
            self.al_note(s, e, seq, true);
        }
        self.queue.clear();
        self.queue_bytes = 0;
        self.journal_release_all();
    }

    /// Cool extents whose writes the peer holds (or the metadata records), and write the
    /// metadata when the on-disk set can shrink or the dirty set changed.
    pub(crate) fn al_tick(&mut self) {
        if self.now.saturating_sub(self.last_cool_ns) < AL_TICK_NS {
            return;
        }
        self.last_cool_ns = self.now;
        // A write leaves the log once durable on both sides: the peer's copy (its ack) and
        // this node's own (a crash loses what sits in the disk cache, and the peer must
        // then resync it back).
        let (durable, recorded, local) = (
            self.peer_durable,
            self.dirty_persisted_seq,
            self.local_durable,
        );
        // Extents that blocked writes wait for stay (the peer may hold such a write
        // already, while it has not even reached the local disk).
        let needed: std::collections::BTreeSet<u64> = self
            .blocked
            .iter()
            .flat_map(|b| self.extent_range(b.start, b.end))
            .collect();
        self.hot.retain(|e, h| {
            needed.contains(e)
                || !(h.stream_seq <= durable
                    && h.dirty_seq <= recorded
                    && h.stream_seq.max(h.dirty_seq) <= local)
        });
        let needs_local_flush = self
            .hot
            .values()
            .any(|h| h.stream_seq.max(h.dirty_seq) > self.local_durable);
        if needs_local_flush && self.role == Role::Primary && self.shutting_down.is_none() {
            self.checkpoint();
        }
        let shrinkable = self.hot_persisted.iter().any(|e| !self.hot.contains_key(e));
        let dirty_changed = self.dirty_gen != self.dirty_persisted_gen;
        if (shrinkable || dirty_changed)
            && !self.meta_in_flight
            && self.now.saturating_sub(self.last_meta_ns) >= AL_TICK_NS
            && self.disk_state != DiskState::Failed
            && self.shutting_down.is_none()
        {
            self.persist_meta();
        }
    }
}
