//! Online verify: the primary reads the volume chunk by chunk, hashes every block (blake3)
//! and ships the hashes as a stream item; the secondary reads the same range at the same
//! stream position (after every earlier overlapping write, before every later one), so a
//! concurrent workload never shows up as a difference, and reports the blocks that differ.
//! With `repair` those blocks go to the dirty set and a resync moves them.

use crate::dirty::BlockSet;
use crate::msg::{ItemKind, Msg, StreamItem};
use crate::status::VerifyStatus;
use crate::types::*;
use crate::volume::*;
use bytes::Bytes;
use std::collections::BTreeMap;

/// Bytes read and compared per verify item.
pub const VERIFY_CHUNK: u64 = 1 << 20;
/// Granularity of the comparison (one blake3 per block).
pub const VERIFY_BLOCK: u32 = 4 << 10;
/// Reads in flight at once.
const VERIFY_DEPTH: usize = 4;

/// A verify under way, or the last one's result.
#[derive(Debug)]
pub struct VerifyRun {
    run: u64,
    repair: bool,
    cursor: u64,
    reads_in_flight: usize,
    total: u64,
    checked: u64,
    bad: BlockSet,
    reports: BTreeMap<Seq, u64>,
    started_ns: u64,
    finished_ns: Option<u64>,
    aborted: Option<String>,
}

impl VerifyRun {
    fn done(&self) -> bool {
        self.finished_ns.is_some()
    }

    /// True while blocks are still being compared.
    pub(crate) fn running(&self) -> bool {
        !self.done()
    }

    pub(crate) fn status(&self, now: u64) -> VerifyStatus {
        VerifyStatus {
            done: self.done(),
            repair: self.repair,
            total_bytes: self.total,
            checked_bytes: self.checked,
            out_of_sync_bytes: self.bad.bytes(),
            out_of_sync: self.bad.iter().take(1000).collect(),
            seconds: self
                .finished_ns
                .unwrap_or(now)
                .saturating_sub(self.started_ns) as f64
                / 1e9,
            aborted: self.aborted.clone(),
        }
    }
}

/// Blake3 of every `block` bytes of `data`.
fn block_hashes(data: &[u8], block: u32) -> Vec<[u8; 32]> {
    data.chunks(block as usize)
        .map(|c| *blake3::hash(c).as_bytes())
        .collect()
}

impl Volume {
    pub(crate) fn start_verify(&mut self, repair: bool) -> Result<String, AdminError> {
        if self.role != Role::Primary {
            return Err(err(
                "wrong_role",
                "verify runs on the primary (it compares the primary's data with the peer's)"
                    .into(),
            ));
        }
        if self.disk_state != DiskState::UpToDate {
            return Err(err(
                "not_up_to_date",
                format!(
                    "this node's disk is {:?}: nothing to verify against",
                    self.disk_state
                ),
            ));
        }
        if !self.streaming || self.conn_state != ConnState::Connected {
            return Err(err(
                "peer_not_connected",
                format!(
                    "verify needs the peer connected and in sync (connection: {:?})",
                    self.conn_state
                ),
            ));
        }
        if self.resync.is_some() {
            return Err(err("busy", "a resync is running; verify after it".into()));
        }
        if self.verify.as_ref().is_some_and(|v| !v.done()) {
            return Err(err("busy", "a verify is already running".into()));
        }
        self.new_verify_run(repair);
        let msg = format!(
            "verify started: {} bytes in blocks of {VERIFY_BLOCK}{}",
            self.cfg.volume_size,
            if repair { ", repairing" } else { "" }
        );
        self.event("verify", msg.clone());
        Ok(msg)
    }

    /// The checksum pass of a full sync: a verify with repair, run inside the resync.
    pub(crate) fn start_checksum_pass(&mut self) {
        self.new_verify_run(true);
        self.event(
            "verify",
            format!(
                "checksum full sync: comparing {} bytes in blocks of {VERIFY_BLOCK}; only the \
                 blocks that differ are copied",
                self.cfg.volume_size
            ),
        );
    }

    /// A fresh verify over the whole volume (the previous result is replaced).
    fn new_verify_run(&mut self, repair: bool) {
        let run = self.verify.as_ref().map_or(1, |v| v.run + 1);
        self.verify = Some(VerifyRun {
            run,
            repair,
            cursor: 0,
            reads_in_flight: 0,
            total: self.cfg.volume_size,
            checked: 0,
            bad: BlockSet::new(VERIFY_BLOCK as u64),
            reports: BTreeMap::new(),
            started_ns: self.now,
            finished_ns: None,
            aborted: None,
        });
    }

    /// Issue verify reads (primary housekeeping).
    pub(crate) fn pump_verify(&mut self) {
        let in_checksum_sync = self.resync.as_ref().is_some_and(|r| r.checksum);
        if !self.streaming
            || self.shutting_down.is_some()
            || self.resync.is_some() && !in_checksum_sync
        {
            return;
        }
        let size = self.cfg.volume_size;
        loop {
            let Some(v) = self.verify.as_ref().filter(|v| !v.done()) else {
                return;
            };
            if v.cursor >= size {
                break;
            }
            if v.reads_in_flight >= VERIFY_DEPTH || self.queue_full() {
                return;
            }
            let (start, run) = (v.cursor, v.run);
            let len = VERIFY_CHUNK.min(size - start);
            let end = start + len;
            if self.local_busy(start, end) {
                return; // retried once the overlapping write completes
            }
            self.reserve_background_read(start, end);
            let v = self.verify.as_mut().expect("verify");
            v.cursor = end;
            v.reads_in_flight += 1;
            self.issue(
                Purpose::VerifyRead { start, len, run },
                DiskKind::Read { offset: start, len },
            );
        }
        self.maybe_finish_verify();
    }

    pub(crate) fn verify_read_done(
        &mut self,
        start: u64,
        len: u64,
        run: u64,
        result: Result<Option<Bytes>, IoError>,
    ) {
        self.release_background_read(start);
        let current = self
            .verify
            .as_mut()
            .filter(|v| v.run == run && !v.done())
            .map(|v| v.reads_in_flight -= 1)
            .is_some();
        match result {
            Ok(Some(data)) if current => {
                if !self.streaming {
                    self.abort_verify("the link to the peer was lost");
                } else {
                    self.last_seq += 1;
                    let seq = self.last_seq;
                    self.local_seq_done(seq);
                    let hashes = block_hashes(&data, VERIFY_BLOCK);
                    self.verify
                        .as_mut()
                        .expect("verify")
                        .reports
                        .insert(seq, len);
                    self.enqueue_verify(StreamItem {
                        seq,
                        dep: 0,
                        resync: false,
                        kind: ItemKind::Verify {
                            offset: start,
                            len,
                            block: VERIFY_BLOCK,
                            hashes,
                        },
                    });
                }
            }
            Ok(_) => {}
            Err(e) => {
                self.disk_failed("a verify read", e);
                self.abort_verify("the local disk failed");
            }
        }
        self.unblock();
    }

    /// The peer's answer to verify item `seq`.
    pub(crate) fn on_verify_report(&mut self, seq: Seq, bad: Vec<(u64, u64)>) {
        let Some(v) = self.verify.as_mut().filter(|v| !v.done()) else {
            return;
        };
        let Some(len) = v.reports.remove(&seq) else {
            return;
        };
        v.checked += len;
        let repair = v.repair;
        for &(s, e) in &bad {
            v.bad.insert(s, e);
        }
        if repair {
            let n: u64 = bad.iter().map(|(s, e)| e - s).sum();
            let lowest = bad.iter().map(|r| r.0).min();
            for (s, e) in bad {
                self.mark_dirty(s, e);
            }
            if let Some(r) = self.resync.as_mut().filter(|r| r.checksum) {
                r.total += n;
                // The copy pass may be past these blocks already: go back for them.
                if let Some(l) = lowest {
                    r.cursor = r.cursor.min(l);
                }
            }
        }
        self.maybe_finish_verify();
    }

    fn maybe_finish_verify(&mut self) {
        let size = self.cfg.volume_size;
        let Some(v) = self.verify.as_mut().filter(|v| !v.done()) else {
            return;
        };
        if v.cursor < size || v.reads_in_flight > 0 || !v.reports.is_empty() {
            return;
        }
        v.finished_ns = Some(self.now);
        let (bad, repair) = (v.bad.bytes(), v.repair);
        let n = v.bad.ranges();
        let checksum = self.resync.as_ref().is_some_and(|r| r.checksum);
        let msg = if checksum {
            format!("checksum pass complete: {bad} bytes in {n} ranges differ and are copied")
        } else if bad == 0 {
            format!("verify complete: all {size} bytes match the peer")
        } else if repair {
            format!("verify complete: {bad} bytes in {n} ranges differ; resyncing them")
        } else {
            format!(
                "verify complete: {bad} bytes in {n} ranges differ from the peer (run verify \\
                 --repair to resync them)"
            )
        };
        self.event("verify", msg);
        if repair && bad > 0 && self.streaming && self.resync.is_none() {
            self.begin_resync(false);
        }
        // A checksum full sync goes on copying what the pass found (see pump_resync).
        self.pump_primary();
    }

    pub(crate) fn abort_verify(&mut self, why: &str) {
        let now = self.now;
        if let Some(v) = self.verify.as_mut().filter(|v| !v.done()) {
            v.finished_ns = Some(now);
            v.aborted = Some(why.into());
            self.event("verify", format!("verify aborted: {why}"));
        }
    }

    /// Put a verify item into the ship queue (it changes no data: never into the dirty
    /// set; without a receiving peer the verify is over).
    fn enqueue_verify(&mut self, item: StreamItem) {
        self.queue.push_back(Queued {
            item,
            sent: false,
            at_ns: self.now,
        });
    }

    // ---------------------------------------------------------------- secondary side

    /// Secondary: the read of verify item `seq` completed: compare and report.
    pub(crate) fn verify_apply_done(
        &mut self,
        seq: Seq,
        start: u64,
        result: Result<Option<Bytes>, IoError>,
    ) {
        let expected = self.verify_items.remove(&seq);
        if let (Ok(Some(data)), Some((block, hashes))) = (&result, expected) {
            let mut bad = BlockSet::new(block as u64);
            for (i, h) in block_hashes(data, block).iter().enumerate() {
                if hashes.get(i) != Some(h) {
                    let s = start + i as u64 * block as u64;
                    bad.insert(s, (s + block as u64).min(start + data.len() as u64));
                }
            }
            self.send(Msg::VerifyReport {
                seq,
                bad: bad.iter().collect(),
            });
        }
        let bytes = 0;
        self.apply_done(seq, Some(start), bytes, result.map(|_| None));
    }
}
