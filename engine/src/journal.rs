//! The primary's persistent write journal: an ordered ring of stream items on a file or
//! block device of its own, so that a link outage is buffered on disk and a crash of the
//! primary's daemon does not turn the items its peer still lacks into a resync.
//!
//! Written by hand: it is part of the replication engine's ordering contract (which item
//! may reach the local disk or the peer when), which no journaling crate models.
//!
//! ## Layout
//! - bytes `0..4096` and `4096..8192`: two superblock slots, written alternately; the valid
//!   one with the higher counter wins. A superblock names the resource, the volume size and
//!   the ring's capacity, the logical position of the oldest live record (`head`), the
//!   sequence before it (`head_prev`), the boot the journal was written under, and whether
//!   the journal is **active**: holds every write the peer may lack. It is inactive while a
//!   dirty set exists (bitmap mode: overflow, resync) and on a secondary.
//! - from byte 8192 on: the ring, `capacity` bytes. Records start on 512-byte boundaries and
//!   never wrap: one that does not fit before the end is preceded by a pad record covering
//!   the rest. Positions are logical (`lpos`, growing forever); the physical offset is
//!   `8192 + lpos % capacity`.
//!
//! ## Record (128-byte header, then the payload, padded to 512 bytes)
//! ```text
//!   0  magic "BLKRJREC"          8  version u16 (1)      10 kind u8    11 flags u8 (1: fua)
//!  12  payload_len u32          16  lpos u64             24 seq u64    32 prev_seq u64
//!  40  dep u64                  48  offset u64           56 len u64    64 block u32
//!  68  reserved (zero)          72  blake3(payload) 32 bytes
//! 104  reserved (zero)         120  blake3(header bytes 0..120), first 8 bytes
//! ```
//! A scan starts at the superblock's head and follows the chain: each record's `lpos` is
//! the expected position and its `prev_seq` the previous record's `seq`. A header that is
//! not ours (wrong magic, or a record of an earlier lap: another `lpos`) ends the journal
//! cleanly. A header or payload that fails its checksum, a broken chain or a file shorter
//! than the ring is a **torn tail**: the scan cuts at the last whole record and reports it.
//!
//! ## Ordering contract (see `docs/architecture.md`)
//! An item's local write and its shipping both wait until its record and every earlier
//! record have been written (page cache suffices: the journal is trusted only after a
//! crash of the daemon within the same boot, or never). A record is released once the peer
//! holds it durably and its local write has completed. A write that is not journaled (bitmap
//! mode) waits until the superblock on disk says inactive. After a daemon crash with an
//! active journal of this boot and no torn tail, the records are redone locally and
//! shipped again: no resync. Otherwise their ranges join the dirty set.

use crate::msg::{ItemKind, StreamItem};
use crate::types::Seq;
use bytes::Bytes;

/// Size of one superblock slot.
pub const SB_SLOT: u64 = 4096;
/// Where the ring starts.
pub const DATA_START: u64 = 2 * SB_SLOT;
/// Record alignment (the journal is written through the page cache: sector alignment keeps
/// a 4 KiB write's record at 4.5 KiB).
pub const ALIGN: u64 = 512;
/// Record header size.
pub const HEADER: usize = 128;
/// Smallest journal (file size) accepted.
pub const MIN_SIZE: u64 = DATA_START + (4 << 20);
const RECORD_MAGIC: &[u8; 8] = b"BLKRJREC";
const SB_MAGIC: &[u8; 8] = b"BLKRJSB1";
const VERSION: u16 = 1;

const KIND_WRITE: u8 = 1;
const KIND_ZEROES: u8 = 2;
const KIND_TRIM: u8 = 3;
const KIND_FLUSH: u8 = 4;
const KIND_VERIFY: u8 = 5;
const KIND_PAD: u8 = 6;
const FLAG_FUA: u8 = 1;

/// The journal of a primary, as configured.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JournalConfig {
    /// Size of the journal file or device, bytes (superblocks included).
    pub size: u64,
    /// The kernel's boot id (`/proc/sys/kernel/random/boot_id`): the journal is trusted only
    /// after a crash within the boot that wrote it (the page cache survived).
    pub boot_id: [u8; 16],
}

impl JournalConfig {
    /// Bytes of the ring.
    pub fn capacity(&self) -> u64 {
        (self.size - DATA_START) / ALIGN * ALIGN
    }
}

/// One superblock.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Superblock {
    /// Bumped on every write; the higher valid slot wins.
    pub counter: u64,
    /// Resource name.
    pub resource: String,
    /// Volume size.
    pub volume_size: u64,
    /// Bytes of the ring.
    pub capacity: u64,
    /// Logical position of the oldest live record.
    pub head: u64,
    /// Sequence of the record before `head` (0: none).
    pub head_prev: Seq,
    /// The journal holds every write the peer may lack.
    pub active: bool,
    /// The boot the superblock was written under.
    pub boot_id: [u8; 16],
}

/// Why a superblock is not usable.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum JournalError {
    /// No valid superblock in either slot (a new or foreign journal).
    #[error("no valid journal superblock")]
    NoSuperblock,
    /// A superblock of a format this build does not know.
    #[error("journal format version {0} (this build knows {VERSION})")]
    Version(u16),
    /// The journal belongs to another resource or volume size.
    #[error("the journal belongs to resource {resource:?} of {volume_size} bytes")]
    Foreign { resource: String, volume_size: u64 },
}

fn hash8(b: &[u8]) -> [u8; 8] {
    let mut o = [0u8; 8];
    o.copy_from_slice(&blake3::hash(b).as_bytes()[..8]);
    o
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

impl Superblock {
    /// The 4 KiB slot image.
    pub fn encode(&self) -> Bytes {
        let mut b = vec![0u8; SB_SLOT as usize];
        b[0..8].copy_from_slice(SB_MAGIC);
        b[8..10].copy_from_slice(&VERSION.to_le_bytes());
        b[10] = self.active as u8;
        b[16..24].copy_from_slice(&self.counter.to_le_bytes());
        b[24..32].copy_from_slice(&self.volume_size.to_le_bytes());
        b[32..40].copy_from_slice(&self.capacity.to_le_bytes());
        b[40..48].copy_from_slice(&self.head.to_le_bytes());
        b[48..56].copy_from_slice(&self.head_prev.to_le_bytes());
        b[56..72].copy_from_slice(&self.boot_id);
        let name = self.resource.as_bytes();
        let n = name.len().min(255);
        b[72] = n as u8;
        b[73..73 + n].copy_from_slice(&name[..n]);
        let end = SB_SLOT as usize - 32;
        let sum = blake3::hash(&b[..end]);
        b[end..].copy_from_slice(sum.as_bytes());
        Bytes::from(b)
    }

    /// Decode one slot; `None` when it is not a valid superblock of any version.
    fn decode(b: &[u8]) -> Option<Result<Superblock, JournalError>> {
        if b.len() < SB_SLOT as usize || &b[0..8] != SB_MAGIC {
            return None;
        }
        let end = SB_SLOT as usize - 32;
        if blake3::hash(&b[..end]).as_bytes() != &b[end..SB_SLOT as usize] {
            return None;
        }
        let version = u16::from_le_bytes([b[8], b[9]]);
        if version != VERSION {
            return Some(Err(JournalError::Version(version)));
        }
        let n = b[72] as usize;
        let mut boot_id = [0u8; 16];
        boot_id.copy_from_slice(&b[56..72]);
        Some(Ok(Superblock {
            counter: u64_at(b, 16),
            resource: String::from_utf8_lossy(&b[73..73 + n]).into_owned(),
            volume_size: u64_at(b, 24),
            capacity: u64_at(b, 32),
            head: u64_at(b, 40),
            head_prev: u64_at(b, 48),
            active: b[10] != 0,
            boot_id,
        }))
    }

    /// The newest valid superblock of the two slots (`area` holds both), and its slot.
    pub fn pick(area: &[u8]) -> Result<(Superblock, usize), JournalError> {
        let mut best: Option<(Superblock, usize)> = None;
        let mut version_err = None;
        for slot in 0..2 {
            let at = slot * SB_SLOT as usize;
            let Some(b) = area.get(at..at + SB_SLOT as usize) else {
                continue;
            };
            match Superblock::decode(b) {
                Some(Ok(sb)) if best.as_ref().is_none_or(|(o, _)| sb.counter > o.counter) => {
                    best = Some((sb, slot))
                }
                Some(Err(e)) => version_err = Some(e),
                _ => {}
            }
        }
        match (best, version_err) {
            (Some(b), _) => Ok(b),
            (None, Some(e)) => Err(e),
            (None, None) => Err(JournalError::NoSuperblock),
        }
    }

    /// Check that the superblock belongs to this resource and volume size.
    pub fn check_identity(&self, resource: &str, volume_size: u64) -> Result<(), JournalError> {
        if self.resource != resource || self.volume_size != volume_size {
            return Err(JournalError::Foreign {
                resource: self.resource.clone(),
                volume_size: self.volume_size,
            });
        }
        Ok(())
    }
}

/// Bytes a record of `item` takes in the ring.
pub fn record_size(item: &StreamItem) -> u64 {
    (HEADER as u64 + payload(item).len() as u64).div_ceil(ALIGN) * ALIGN
}

fn payload(item: &StreamItem) -> Bytes {
    match &item.kind {
        ItemKind::Write { data, .. } => data.clone(),
        ItemKind::Verify { hashes, .. } => {
            let mut v = Vec::with_capacity(hashes.len() * 32);
            for h in hashes {
                v.extend_from_slice(h);
            }
            Bytes::from(v)
        }
        _ => Bytes::new(),
    }
}

#[allow(clippy::too_many_arguments)]
fn header(
    kind: u8,
    flags: u8,
    payload: &[u8],
    lpos: u64,
    seq: Seq,
    prev_seq: Seq,
    dep: Seq,
    offset: u64,
    len: u64,
    block: u32,
) -> [u8; HEADER] {
    let mut h = [0u8; HEADER];
    h[0..8].copy_from_slice(RECORD_MAGIC);
    h[8..10].copy_from_slice(&VERSION.to_le_bytes());
    h[10] = kind;
    h[11] = flags;
    h[12..16].copy_from_slice(&(payload.len() as u32).to_le_bytes());
    h[16..24].copy_from_slice(&lpos.to_le_bytes());
    h[24..32].copy_from_slice(&seq.to_le_bytes());
    h[32..40].copy_from_slice(&prev_seq.to_le_bytes());
    h[40..48].copy_from_slice(&dep.to_le_bytes());
    h[48..56].copy_from_slice(&offset.to_le_bytes());
    h[56..64].copy_from_slice(&len.to_le_bytes());
    h[64..68].copy_from_slice(&block.to_le_bytes());
    h[72..104].copy_from_slice(blake3::hash(payload).as_bytes());
    let sum = hash8(&h[..120]);
    h[120..128].copy_from_slice(&sum);
    h
}

/// The record of `item` at logical position `lpos`, following the record of `prev_seq`, as
/// parts to write back to back: the header, the payload (shared with the item, not
/// copied) and the zero padding.
pub fn encode_record(lpos: u64, prev_seq: Seq, item: &StreamItem) -> Vec<Bytes> {
    let payload = payload(item);
    let (kind, flags, offset, len, block) = match &item.kind {
        ItemKind::Write { offset, data, fua } => {
            (KIND_WRITE, *fua as u8, *offset, data.len() as u64, 0)
        }
        ItemKind::WriteZeroes { offset, len, fua } => (KIND_ZEROES, *fua as u8, *offset, *len, 0),
        ItemKind::Trim { offset, len } => (KIND_TRIM, 0, *offset, *len, 0),
        ItemKind::Flush => (KIND_FLUSH, 0, 0, 0, 0),
        ItemKind::Verify {
            offset, len, block, ..
        } => (KIND_VERIFY, 0, *offset, *len, *block),
    };
    let h = header(
        kind, flags, &payload, lpos, item.seq, prev_seq, item.dep, offset, len, block,
    );
    let pad = record_size(item) as usize - HEADER - payload.len();
    let mut parts = vec![Bytes::copy_from_slice(&h)];
    if !payload.is_empty() {
        parts.push(payload);
    }
    if pad > 0 {
        parts.push(Bytes::from_static(&ZEROES[..pad]));
    }
    parts
}

static ZEROES: [u8; ALIGN as usize] = [0; ALIGN as usize];

/// A pad record at `lpos` covering `len` bytes (to the end of the ring).
pub fn encode_pad(lpos: u64, prev_seq: Seq, len: u64) -> Vec<Bytes> {
    let h = header(KIND_PAD, 0, &[], lpos, prev_seq, prev_seq, 0, 0, len, 0);
    vec![
        Bytes::copy_from_slice(&h),
        Bytes::from_static(&ZEROES[..ALIGN as usize - HEADER]),
    ]
}

/// Physical offset of logical position `lpos`.
pub fn phys(capacity: u64, lpos: u64) -> u64 {
    DATA_START + lpos % capacity
}

/// A pad needed before a record of `size` bytes appended at `tail`, bytes (0: none).
pub fn pad_before(capacity: u64, tail: u64, size: u64) -> u64 {
    let room = capacity - tail % capacity;
    if size > room {
        room
    } else {
        0
    }
}

fn note(torn: &mut Option<String>, why: String) {
    match torn {
        Some(t) => {
            t.push_str("; ");
            t.push_str(&why);
        }
        None => *torn = Some(why),
    }
}

/// What a scan found.
#[derive(Debug, Default)]
pub struct Scan {
    /// The live items, in order.
    pub items: Vec<StreamItem>,
    /// Each item's record: (seq, logical end).
    pub records: Vec<(Seq, u64)>,
    /// Logical position after the last whole record (where appends continue).
    pub tail: u64,
    /// Sequence of the last whole record (`head_prev` when none).
    pub last_seq: Seq,
    /// Why the scan stopped at a damaged record, if it did.
    pub torn: Option<String>,
}

/// Read the records from the superblock's head on. `read(phys, len)` returns the bytes
/// there (fewer when the file ends); `file_len` is the journal's size.
pub fn scan(
    sb: &Superblock,
    file_len: u64,
    read: &mut dyn FnMut(u64, usize) -> std::io::Result<Vec<u8>>,
) -> Scan {
    let cap = sb.capacity;
    let mut s = Scan {
        tail: sb.head,
        last_seq: sb.head_prev,
        ..Scan::default()
    };
    if cap == 0 || !cap.is_multiple_of(ALIGN) {
        note(
            &mut s.torn,
            format!("superblock capacity {cap} is not a multiple of {ALIGN}"),
        );
        return s;
    }
    if file_len < DATA_START + cap {
        note(
            &mut s.torn,
            format!(
                "the journal is {file_len} bytes, its ring needs {} (truncated)",
                DATA_START + cap
            ),
        );
    }
    let mut lpos = sb.head;
    let mut prev = sb.head_prev;
    while lpos - sb.head < cap {
        let at = phys(cap, lpos);
        let h = match read(at, HEADER) {
            Ok(h) => h,
            Err(e) => {
                note(&mut s.torn, format!("reading the record at {lpos}: {e}"));
                break;
            }
        };
        if h.len() < HEADER || &h[0..8] != RECORD_MAGIC {
            break; // not a record: the end
        }
        if hash8(&h[..120]) != h[120..128] {
            note(
                &mut s.torn,
                format!("record header at position {lpos} fails its checksum"),
            );
            break;
        }
        let version = u16::from_le_bytes([h[8], h[9]]);
        if u64_at(&h, 16) != lpos {
            break; // a record of an earlier lap: the end
        }
        if version != VERSION {
            note(
                &mut s.torn,
                format!("record at {lpos} has format version {version}"),
            );
            break;
        }
        let (kind, flags) = (h[10], h[11]);
        let (seq, prev_seq, dep) = (u64_at(&h, 24), u64_at(&h, 32), u64_at(&h, 40));
        let (offset, len, block) = (u64_at(&h, 48), u64_at(&h, 56), u32_at(&h, 64));
        let plen = u32_at(&h, 12) as usize;
        if prev_seq != prev || (kind != KIND_PAD && seq <= prev) {
            note(
                &mut s.torn,
                format!(
                    "record at {lpos} follows sequence {prev_seq}, expected {prev} (broken chain)"
                ),
            );
            break;
        }
        if kind == KIND_PAD {
            if len == 0 || (at - DATA_START) + len != cap {
                note(
                    &mut s.torn,
                    format!("pad record at {lpos} has length {len}"),
                );
                break;
            }
            lpos += len;
            s.tail = lpos;
            continue;
        }
        let size = (HEADER + plen).div_ceil(ALIGN as usize) as u64 * ALIGN;
        if (at - DATA_START) + size > cap {
            note(
                &mut s.torn,
                format!("record at {lpos} runs past the end of the ring"),
            );
            break;
        }
        let data = if plen > 0 {
            match read(at + HEADER as u64, plen) {
                Ok(d) if d.len() == plen => d,
                Ok(_) => {
                    note(
                        &mut s.torn,
                        format!("record at {lpos} is cut short (file ends)"),
                    );
                    break;
                }
                Err(e) => {
                    note(&mut s.torn, format!("reading the record at {lpos}: {e}"));
                    break;
                }
            }
        } else {
            Vec::new()
        };
        if blake3::hash(&data).as_bytes() != &h[72..104] {
            note(
                &mut s.torn,
                format!("record at {lpos} (sequence {seq}) fails its data checksum"),
            );
            break;
        }
        let fua = flags & FLAG_FUA != 0;
        let kind = match kind {
            KIND_WRITE if data.len() as u64 == len => ItemKind::Write {
                offset,
                data: Bytes::from(data),
                fua,
            },
            KIND_ZEROES => ItemKind::WriteZeroes { offset, len, fua },
            KIND_TRIM => ItemKind::Trim { offset, len },
            KIND_FLUSH => ItemKind::Flush,
            KIND_VERIFY if data.len().is_multiple_of(32) => ItemKind::Verify {
                offset,
                len,
                block,
                hashes: data
                    .chunks(32)
                    .map(|c| c.try_into().expect("32 bytes"))
                    .collect(),
            },
            k => {
                note(
                    &mut s.torn,
                    format!("record at {lpos} has unknown kind {k}"),
                );
                break;
            }
        };
        lpos += size;
        prev = seq;
        s.items.push(StreamItem {
            seq,
            dep,
            resync: false,
            kind,
        });
        s.records.push((seq, lpos));
        s.tail = lpos;
        s.last_seq = seq;
    }
    s
}

/// What to do with a journal found at start-up ([`open`]).
#[derive(Debug)]
pub struct Opening {
    /// Hand to [`crate::Volume::attach_journal`].
    pub start: crate::journaling::JournalStart,
    /// Items to write to the backing, in order, then sync, before anything else touches
    /// it (a trusted journal's live records) — after the metadata, whose dirty set now
    /// names their blocks, is written.
    pub redo: Vec<StreamItem>,
    /// One line for the log: what was found and what is done with it.
    pub report: String,
    /// `meta` was changed: write it before anything else (and before the redo).
    pub meta_changed: bool,
}

/// Decide at start-up what a journal is worth. `sb` is its newest superblock (`None`: a
/// new journal), `file_len` its size, `read` reads it; `meta` is the node's metadata, whose
/// dirty set gets the ranges of an untrusted journal's records (they are resynced with the
/// activity log's extents). Trusted: the superblock says active, it was written in this
/// boot, this node crashed as primary, and the scan ends cleanly.
///
/// A secondary's metadata may name a protected catch-up in progress: its undo log (kept in
/// the same ring, see [`crate::undo`]) is read back too and handed over in
/// `start.undo`. When that log is gone, the session is dropped from `meta` (the image
/// cannot be rolled back) and `meta_changed` asks the caller to write the metadata.
pub fn open(
    sb: Option<&Superblock>,
    file_len: u64,
    read: &mut dyn FnMut(u64, usize) -> std::io::Result<Vec<u8>>,
    meta: &mut crate::meta::Metadata,
    cfg: &JournalConfig,
) -> Opening {
    let mut undo = None;
    let mut undo_report = None;
    let mut dropped = false;
    if let Some(session) = meta.undo {
        let (log, report) = crate::undo::scan(&session, cfg.capacity(), read);
        if log.is_none() {
            meta.undo = None;
            dropped = true;
        }
        undo = log;
        undo_report = Some(report);
    }
    let mut o = open_primary(sb, file_len, read, meta, cfg);
    o.start.undo = undo;
    o.meta_changed = !o.redo.is_empty() || dropped;
    if let Some(r) = undo_report {
        o.report += &format!("; {r}");
    }
    o
}

fn open_primary(
    sb: Option<&Superblock>,
    file_len: u64,
    read: &mut dyn FnMut(u64, usize) -> std::io::Result<Vec<u8>>,
    meta: &mut crate::meta::Metadata,
    cfg: &JournalConfig,
) -> Opening {
    use crate::meta::{
        FLAG_CLEAN, FLAG_CRASHED_PRIMARY, FLAG_JOURNAL_FAILED, FLAG_PEER_NEEDS_FULL_SYNC,
    };
    let cap = cfg.capacity();
    let Some(sb) = sb else {
        return Opening {
            start: Default::default(),
            redo: Vec::new(),
            report: format!("new ({cap} bytes of ring)"),
            meta_changed: false,
        };
    };
    let scan = scan(sb, file_len, read);
    let crashed = meta.has(FLAG_CRASHED_PRIMARY)
        || meta.role == crate::types::Role::Primary && !meta.has(FLAG_CLEAN);
    let same_boot = sb.boot_id == cfg.boot_id;
    let trusted = sb.active
        && same_boot
        && crashed
        && !meta.has(FLAG_PEER_NEEDS_FULL_SYNC)
        && !meta.has(FLAG_JOURNAL_FAILED)
        && scan.torn.is_none()
        && sb.capacity == cap;
    let bytes: u64 = scan.items.iter().map(|i| i.payload_len()).sum();
    let mut report = format!(
        "{} records ({bytes} bytes of data) after sequence {}",
        scan.items.len(),
        sb.head_prev
    );
    if let Some(t) = &scan.torn {
        report += &format!("; torn tail: {t} (cut at the last whole record)");
    }
    if crashed && !scan.items.is_empty() {
        // The records' blocks join the dirty set in every case: a trusted journal is redone
        // on the backing at once, but replayed only if this node becomes primary again; if
        // its peer takes over instead, these blocks are what it must send back. (A record
        // may precede its activity-log extent; sim seed 2515.) The caller persists the
        // metadata before it redoes anything.
        for it in &scan.items {
            if let Some((s, e)) = it.range() {
                if !matches!(it.kind, ItemKind::Verify { .. }) {
                    meta.dirty.insert(s, e.min(meta.volume_size));
                }
            }
        }
    }
    if trusted && !scan.items.is_empty() {
        report += &format!(
            "; redone on the backing, shipped again at the next promote (sequences {} to {})",
            sb.head_prev + 1,
            scan.last_seq
        );
        return Opening {
            start: crate::journaling::JournalStart {
                sb_counter: sb.counter,
                disk_active: true,
                head: sb.head,
                head_prev: sb.head_prev,
                tail: scan.tail,
                last_seq: scan.last_seq,
                replay: Some((scan.items.clone(), scan.records)),
                undo: None,
            },
            redo: if crate::bugs::on(crate::bugs::Bug::JournalNoRedo) {
                Vec::new()
            } else {
                scan.items
            },
            report,
            meta_changed: false,
        };
    }
    if crashed && !scan.items.is_empty() {
        report += &format!(
            "; not replayed ({}): its blocks and the activity log's are resynced",
            if meta.has(FLAG_JOURNAL_FAILED) {
                "the journal failed before the crash"
            } else if !sb.active {
                "it was in bitmap mode"
            } else if !same_boot {
                "written before the last reboot: the page cache it relied on is gone"
            } else if scan.torn.is_some() {
                "torn tail"
            } else if sb.capacity != cap {
                "its size changed"
            } else {
                "the metadata asks for a full sync"
            }
        );
    }
    // A new line of positions beyond every record on disk, so that none of them can ever
    // pass for a new one.
    let fresh = (sb.head + 2 * sb.capacity.max(cap)).div_ceil(cap) * cap;
    Opening {
        start: crate::journaling::JournalStart {
            sb_counter: sb.counter,
            disk_active: sb.active,
            head: sb.head,
            head_prev: sb.head_prev,
            tail: fresh,
            last_seq: 0,
            replay: None,
            undo: None,
        },
        redo: Vec::new(),
        report,
        meta_changed: false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CAP: u64 = 64 << 10;

    fn sb(head: u64, head_prev: Seq) -> Superblock {
        Superblock {
            counter: 3,
            resource: "r0".into(),
            volume_size: 1 << 20,
            capacity: CAP,
            head,
            head_prev,
            active: true,
            boot_id: [7; 16],
        }
    }

    fn write(seq: Seq, fill: u8, len: usize) -> StreamItem {
        StreamItem {
            seq,
            dep: seq - 1,
            resync: false,
            kind: ItemKind::Write {
                offset: seq * 4096,
                data: Bytes::from(vec![fill; len]),
                fua: seq.is_multiple_of(2),
            },
        }
    }

    /// A ring image with `items` appended from `head` (pads where needed).
    fn build(head: u64, head_prev: Seq, items: &[StreamItem]) -> (Vec<u8>, u64) {
        let mut ring = vec![0u8; (DATA_START + CAP) as usize];
        let (mut tail, mut prev) = (head, head_prev);
        for it in items {
            let size = record_size(it);
            let pad = pad_before(CAP, tail, size);
            if pad > 0 {
                let p = encode_pad(tail, prev, pad).concat();
                let at = phys(CAP, tail) as usize;
                ring[at..at + p.len()].copy_from_slice(&p);
                tail += pad;
            }
            let r = encode_record(tail, prev, it).concat();
            assert_eq!(r.len() as u64, size);
            let at = phys(CAP, tail) as usize;
            ring[at..at + r.len()].copy_from_slice(&r);
            tail += size;
            prev = it.seq;
        }
        (ring, tail)
    }

    fn run(ring: &[u8], sb: &Superblock) -> Scan {
        scan(sb, ring.len() as u64, &mut |at, len| {
            let at = at as usize;
            Ok(ring[at.min(ring.len())..(at + len).min(ring.len())].to_vec())
        })
    }

    #[test]
    fn superblock_round_trip_and_slot_choice() {
        let a = sb(4096, 9);
        let mut b = a.clone();
        b.counter = 4;
        b.active = false;
        let mut area = a.encode().to_vec();
        area.extend_from_slice(&b.encode());
        assert_eq!(Superblock::pick(&area), Ok((b.clone(), 1)));
        area[SB_SLOT as usize + 100] ^= 1; // the newer slot is torn: the older one wins
        assert_eq!(Superblock::pick(&area), Ok((a.clone(), 0)));
        assert_eq!(
            Superblock::pick(&[0u8; 8192]),
            Err(JournalError::NoSuperblock)
        );
        assert!(a.check_identity("r0", 1 << 20).is_ok());
        assert!(a.check_identity("r1", 1 << 20).is_err());
    }

    #[test]
    fn scan_returns_every_record_across_the_wrap() {
        // Start near the end of the ring so that records wrap (with a pad).
        let head = 10 * CAP + CAP - 8192;
        let items: Vec<StreamItem> = (5..12).map(|s| write(s, s as u8, 5000)).collect();
        let (ring, tail) = build(head, 4, &items);
        let s = run(&ring, &sb(head, 4));
        assert_eq!(s.torn, None);
        assert_eq!(s.items, items);
        assert_eq!(s.tail, tail);
        assert_eq!(s.last_seq, 11);
        assert_eq!(s.records.last(), Some(&(11, tail)));
    }

    #[test]
    fn all_kinds_round_trip() {
        let items = vec![
            write(1, 1, 512),
            StreamItem {
                seq: 2,
                dep: 1,
                resync: false,
                kind: ItemKind::WriteZeroes {
                    offset: 0,
                    len: 1 << 20,
                    fua: true,
                },
            },
            StreamItem {
                seq: 3,
                dep: 1,
                resync: false,
                kind: ItemKind::Trim {
                    offset: 8192,
                    len: 4096,
                },
            },
            StreamItem {
                seq: 4,
                dep: 3,
                resync: false,
                kind: ItemKind::Flush,
            },
            StreamItem {
                seq: 5,
                dep: 4,
                resync: false,
                kind: ItemKind::Verify {
                    offset: 0,
                    len: 8192,
                    block: 4096,
                    hashes: vec![[1; 32], [2; 32]],
                },
            },
        ];
        let (ring, _) = build(0, 0, &items);
        let s = run(&ring, &sb(0, 0));
        assert_eq!(s.torn, None);
        assert_eq!(s.items, items);
    }

    #[test]
    fn stale_records_of_an_earlier_lap_end_the_scan_cleanly() {
        let old: Vec<StreamItem> = (1..10).map(|s| write(s, 1, 3000)).collect();
        let (mut ring, _) = build(0, 0, &old);
        // A new lap writes two records over the start; the rest is the old lap's.
        let new = [write(20, 9, 3000), write(21, 9, 3000)];
        let (lap, _) = build(CAP, 19, &new);
        let end = (DATA_START + 2 * record_size(&new[0])) as usize;
        ring[DATA_START as usize..end].copy_from_slice(&lap[DATA_START as usize..end]);
        let s = run(&ring, &sb(CAP, 19));
        assert_eq!(s.torn, None);
        assert_eq!(s.items, new);
    }

    #[test]
    fn torn_tails_are_cut_at_the_last_whole_record() {
        let items: Vec<StreamItem> = (1..6).map(|s| write(s, s as u8, 6000)).collect();
        let (ring, _) = build(0, 0, &items);
        let size = record_size(&items[0]);
        let last = (DATA_START + 4 * size) as usize; // record 5
                                                     // Payload damage, header damage, a truncated file.
        for (name, damage) in [("payload", last + 200), ("header", last + 30)] {
            let mut r = ring.clone();
            r[damage] ^= 0x40;
            let s = run(&r, &sb(0, 0));
            assert_eq!(s.items, items[..4], "{name}");
            assert!(s.torn.is_some(), "{name}");
            assert_eq!(s.tail, 4 * size, "{name}");
        }
        let s = run(&ring[..last + 1000], &sb(0, 0));
        assert_eq!(s.items, items[..4]);
        assert!(s.torn.unwrap().contains("truncated"));
    }

    #[test]
    fn a_broken_chain_is_torn() {
        let (mut ring, _) = build(0, 0, &[write(1, 1, 100), write(2, 2, 100)]);
        let size = record_size(&write(1, 1, 100));
        let (other, _) = build(size, 7, &[write(8, 8, 100)]);
        let at = (DATA_START + size) as usize;
        ring[at..at + size as usize].copy_from_slice(&other[at..at + size as usize]);
        let s = run(&ring, &sb(0, 0));
        assert_eq!(s.items.len(), 1);
        assert!(s.torn.unwrap().contains("chain"));
    }
}
