//! Persistent per-node metadata: format only (encode, decode, validate).
//!
//! The metadata area is two 64 KiB slots at offsets 0 and 65536 of the metadata file or
//! device. Every update writes the slot *not* holding the newest copy, with a counter one
//! higher, and makes it durable; a reader takes the valid slot with the highest counter.
//! A torn update therefore leaves the previous copy intact. Each slot carries a magic, a
//! format version and a blake3 checksum; a foreign, torn or corrupt slot is never trusted.
//!
//! Slot layout (little endian):
//! ```text
//!   0  magic     8  b"BLKRPMD\0"
//!   8  version   4  FORMAT_VERSION
//!  12  body_len  4  bytes of body that follow
//!  16  body      body_len bytes (see Metadata::encode_slot; optional tagged sections
//!                 at its end, e.g. the undo session: absent in older metadata)
//!  16+body_len   blake3(bytes 0 .. 16+body_len), 32 bytes
//! ```

use crate::dirty::BlockSet;
use crate::types::{DiskState, Role, Seq};

/// Magic at the start of every metadata slot.
pub const MAGIC: [u8; 8] = *b"BLKRPMD\0";
/// Current metadata format version (2 added the generation history, 3 the dirty set and
/// 64 KiB slots; older areas are refused with a hint to recreate them).
pub const FORMAT_VERSION: u32 = 3;
/// Ranges of the dirty set that fit a slot; a larger set is stored coarsened (a superset).
pub const MAX_DIRTY_RANGES: usize = 3000;
/// Default granularity of the dirty set, bytes.
pub const DEFAULT_BLOCK: u32 = 4096;
/// Generations kept in the history (newest first); older ones fall off.
pub const MAX_HISTORY: usize = 16;
/// Size of one slot.
pub const SLOT_SIZE: usize = 64 << 10;
/// Size of the whole metadata area (two slots).
pub const AREA_SIZE: usize = 2 * SLOT_SIZE;
const HEADER: usize = 16;
/// Tag of the optional undo section of the body.
const SECTION_UNDO: u8 = 1;
const SUM: usize = 32;
const MAX_NAME: usize = 255;

/// Flag: the daemon stopped cleanly (every write it acknowledged was shipped or is
/// accounted for). Cleared while a primary serves; an unclean start forces a full sync.
pub const FLAG_CLEAN: u32 = 1 << 0;
/// Flag: the peer is known to need a full sync from this node.
pub const FLAG_PEER_NEEDS_FULL_SYNC: u32 = 1 << 1;
/// Flag: this node crashed while primary and has not been resynced or promoted since: its
/// image may hold writes its peer never received (it must not be resumed by sequence).
pub const FLAG_CRASHED_PRIMARY: u32 = 1 << 2;
/// Flag: the journal device failed during the last run: whatever it holds is stale and
/// never trusted. Cleared once this run's first journal superblock is written.
pub const FLAG_JOURNAL_FAILED: u32 = 1 << 3;

/// Errors reading a metadata area.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MetaError {
    /// Neither slot starts with the blkrep magic: not (or no longer) blkrep metadata.
    #[error("no blkrep metadata found (bad magic in both slots): run `blkrep create-md` first, or check the metadata path")]
    NoMetadata,
    /// A slot has the magic but a version this build cannot read.
    #[error(
        "metadata format version {found} is not supported (this build reads {FORMAT_VERSION}); \
         metadata of an older blkrep is recreated with `blkrep create-md --force` (the node is \
         then resynced from its peer)"
    )]
    Version { found: u32 },
    /// The slots carry the magic but none passes its checksum.
    #[error("metadata is corrupt: no slot passes its checksum")]
    Corrupt,
    /// The area is shorter than two slots.
    #[error(
        "metadata area too small: {len} bytes, need {AREA_SIZE} (an older blkrep's area is \
         recreated with `blkrep create-md --force`)"
    )]
    TooSmall { len: usize },
    /// The metadata belongs to another resource, node or size.
    #[error("metadata belongs to {what} {found:?}, config says {expected:?}")]
    Foreign {
        what: &'static str,
        found: String,
        expected: String,
    },
    /// A field does not fit the format (name too long).
    #[error("{0}")]
    Field(String),
}

/// The persistent state of one node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Metadata {
    /// Update counter; the slot with the highest valid counter wins.
    pub counter: u64,
    /// Resource name this metadata was created for.
    pub resource: String,
    /// Node name this metadata was created for.
    pub node: String,
    /// Volume size in bytes.
    pub volume_size: u64,
    /// Random id of this node's metadata instance (changes with every create-md).
    pub node_uuid: u64,
    /// Current data generation.
    pub generation: u64,
    /// Generations this node's data held before the current one, newest first (at most
    /// [`MAX_HISTORY`]). The handshake compares them to tell which side is behind.
    pub history: Vec<u64>,
    /// Highest stream sequence known present (and durable) on the backing.
    pub applied_seq: Seq,
    /// The role this node held when the metadata was last written.
    pub role: Role,
    /// What the node knows about its data.
    pub disk_state: DiskState,
    /// `FLAG_*` bits.
    pub flags: u32,
    /// Blocks the peer may lack: the dirty set plus the activity log's hot extents (see
    /// `engine/src/dirty.rs`); its granularity is the dirty-set block size.
    pub dirty: BlockSet,
    /// A protected catch-up is under way on this secondary: the blocks it overwrites are
    /// saved first in the undo log, and a takeover rolls back to the image described here
    /// (see `engine/src/undo.rs`). Encoded as an optional trailing section of the body.
    pub undo: Option<UndoMeta>,
}

/// The image a protected catch-up rolls back to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UndoMeta {
    /// Session id (the metadata counter when the session began): the undo log's records
    /// carry it, so records of an earlier session are never taken for this one's.
    pub id: u64,
    /// The stream position the pre-catch-up image holds (everything `<= seq` applied).
    pub seq: Seq,
    /// The data generation of that image.
    pub generation: u64,
    /// That image was a crashed primary's (its `FLAG_CRASHED_PRIMARY`).
    pub crashed_primary: bool,
}

impl Metadata {
    /// Fresh metadata as `create-md` writes it: secondary, inconsistent, nothing applied.
    pub fn new(resource: &str, node: &str, volume_size: u64, node_uuid: u64) -> Self {
        Metadata {
            counter: 1,
            resource: resource.to_string(),
            node: node.to_string(),
            volume_size,
            node_uuid,
            generation: 0,
            history: Vec::new(),
            applied_seq: 0,
            role: Role::Secondary,
            disk_state: DiskState::Inconsistent,
            flags: FLAG_CLEAN,
            dirty: BlockSet::new(DEFAULT_BLOCK as u64),
            undo: None,
        }
    }

    /// Start a new data generation: the current one moves to the front of the history.
    pub fn new_generation(&mut self, generation: u64) {
        if self.generation != 0 {
            self.history.retain(|&g| g != self.generation);
            self.history.insert(0, self.generation);
            self.history.truncate(MAX_HISTORY);
        }
        self.generation = generation;
    }

    /// True when `flag` is set.
    pub fn has(&self, flag: u32) -> bool {
        self.flags & flag != 0
    }

    /// Set or clear `flag`.
    pub fn set(&mut self, flag: u32, on: bool) {
        if on {
            self.flags |= flag
        } else {
            self.flags &= !flag
        }
    }

    /// Encode into one slot image (exactly [`SLOT_SIZE`] bytes).
    pub fn encode_slot(&self) -> Result<Vec<u8>, MetaError> {
        let mut body = Vec::with_capacity(256);
        body.extend_from_slice(&self.counter.to_le_bytes());
        put_str(&mut body, "resource", &self.resource)?;
        put_str(&mut body, "node", &self.node)?;
        body.extend_from_slice(&self.volume_size.to_le_bytes());
        body.extend_from_slice(&self.node_uuid.to_le_bytes());
        body.extend_from_slice(&self.generation.to_le_bytes());
        body.extend_from_slice(&self.applied_seq.to_le_bytes());
        body.push(self.role.code());
        body.push(self.disk_state.code());
        body.extend_from_slice(&self.flags.to_le_bytes());
        if self.history.len() > MAX_HISTORY {
            return Err(MetaError::Field(format!(
                "generation history holds {} entries, at most {MAX_HISTORY} fit",
                self.history.len()
            )));
        }
        body.push(self.history.len() as u8);
        for g in &self.history {
            body.extend_from_slice(&g.to_le_bytes());
        }
        let dirty = self.dirty.coarsened(MAX_DIRTY_RANGES);
        body.extend_from_slice(&(dirty.block() as u32).to_le_bytes());
        body.extend_from_slice(&(dirty.ranges() as u32).to_le_bytes());
        for (s, e) in dirty.iter() {
            body.extend_from_slice(&s.to_le_bytes());
            body.extend_from_slice(&e.to_le_bytes());
        }
        // Optional sections follow; a reader stops at the end of the body, so metadata
        // written before a section existed reads as "absent".
        if let Some(u) = &self.undo {
            body.push(SECTION_UNDO);
            body.extend_from_slice(&u.id.to_le_bytes());
            body.extend_from_slice(&u.seq.to_le_bytes());
            body.extend_from_slice(&u.generation.to_le_bytes());
            body.push(u.crashed_primary as u8);
        }
        let mut slot = Vec::with_capacity(SLOT_SIZE);
        slot.extend_from_slice(&MAGIC);
        slot.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        slot.extend_from_slice(&(body.len() as u32).to_le_bytes());
        slot.extend_from_slice(&body);
        let sum = blake3::hash(&slot);
        slot.extend_from_slice(sum.as_bytes());
        slot.resize(SLOT_SIZE, 0);
        Ok(slot)
    }

    /// Decode one slot.
    pub fn decode_slot(slot: &[u8]) -> Result<Metadata, MetaError> {
        if slot.len() < HEADER + SUM || slot[..8] != MAGIC {
            return Err(MetaError::NoMetadata);
        }
        let version = u32::from_le_bytes(slot[8..12].try_into().unwrap());
        if version != FORMAT_VERSION {
            return Err(MetaError::Version { found: version });
        }
        let body_len = u32::from_le_bytes(slot[12..16].try_into().unwrap()) as usize;
        if HEADER + body_len + SUM > slot.len().min(SLOT_SIZE) {
            return Err(MetaError::Corrupt);
        }
        let end = HEADER + body_len;
        if blake3::hash(&slot[..end]).as_bytes() != &slot[end..end + SUM] {
            return Err(MetaError::Corrupt);
        }
        let mut r = Reader(&slot[HEADER..end]);
        let m = Metadata {
            counter: r.u64()?,
            resource: r.string()?,
            node: r.string()?,
            volume_size: r.u64()?,
            node_uuid: r.u64()?,
            generation: r.u64()?,
            applied_seq: r.u64()?,
            role: Role::from_code(r.u8()?).ok_or(MetaError::Corrupt)?,
            disk_state: DiskState::from_code(r.u8()?).ok_or(MetaError::Corrupt)?,
            flags: r.u32()?,
            history: Vec::new(),
            dirty: BlockSet::new(DEFAULT_BLOCK as u64),
            undo: None,
        };
        let mut m = m;
        let n = r.u8()? as usize;
        if n > MAX_HISTORY {
            return Err(MetaError::Corrupt);
        }
        for _ in 0..n {
            m.history.push(r.u64()?);
        }
        let block = r.u32()? as u64;
        if !block.is_power_of_two() || !(512..=(1 << 30)).contains(&block) {
            return Err(MetaError::Corrupt);
        }
        m.dirty = BlockSet::new(block);
        let n = r.u32()? as usize;
        if n > MAX_DIRTY_RANGES {
            return Err(MetaError::Corrupt);
        }
        for _ in 0..n {
            let (s, e) = (r.u64()?, r.u64()?);
            if s >= e || e > m.volume_size.div_ceil(block) * block {
                return Err(MetaError::Corrupt);
            }
            m.dirty.insert(s, e);
        }
        while !r.0.is_empty() {
            match r.u8()? {
                SECTION_UNDO => {
                    m.undo = Some(UndoMeta {
                        id: r.u64()?,
                        seq: r.u64()?,
                        generation: r.u64()?,
                        crashed_primary: r.u8()? != 0,
                    })
                }
                _ => return Err(MetaError::Corrupt),
            }
        }
        Ok(m)
    }

    /// Pick the newest valid copy from a whole metadata area (both slots). Returns the
    /// metadata and the index of the slot it came from.
    pub fn decode_area(area: &[u8]) -> Result<(Metadata, usize), MetaError> {
        if area.len() < AREA_SIZE {
            return Err(MetaError::TooSmall { len: area.len() });
        }
        let a = Self::decode_slot(&area[..SLOT_SIZE]);
        let b = Self::decode_slot(&area[SLOT_SIZE..AREA_SIZE]);
        match (a, b) {
            (Ok(a), Ok(b)) => Ok(if b.counter > a.counter {
                (b, 1)
            } else {
                (a, 0)
            }),
            (Ok(a), Err(_)) => Ok((a, 0)),
            (Err(_), Ok(b)) => Ok((b, 1)),
            (Err(ea), Err(eb)) => Err(match (ea, eb) {
                (MetaError::Version { found }, _) | (_, MetaError::Version { found }) => {
                    MetaError::Version { found }
                }
                (MetaError::NoMetadata, MetaError::NoMetadata) => MetaError::NoMetadata,
                _ => MetaError::Corrupt,
            }),
        }
    }

    /// The slot index the next update must go to, given the slot the current copy is in.
    pub fn next_slot(current_slot: usize) -> usize {
        1 - current_slot
    }

    /// Check that this metadata belongs to the configured resource, node and size.
    pub fn check_identity(&self, resource: &str, node: &str, size: u64) -> Result<(), MetaError> {
        if self.resource != resource {
            return Err(MetaError::Foreign {
                what: "resource",
                found: self.resource.clone(),
                expected: resource.into(),
            });
        }
        if self.node != node {
            return Err(MetaError::Foreign {
                what: "node",
                found: self.node.clone(),
                expected: node.into(),
            });
        }
        if self.volume_size != size {
            return Err(MetaError::Foreign {
                what: "volume size",
                found: self.volume_size.to_string(),
                expected: size.to_string(),
            });
        }
        Ok(())
    }
}

fn put_str(out: &mut Vec<u8>, what: &str, s: &str) -> Result<(), MetaError> {
    if s.len() > MAX_NAME {
        return Err(MetaError::Field(format!(
            "{what} name is {} bytes, at most {MAX_NAME} fit in the metadata",
            s.len()
        )));
    }
    out.push(s.len() as u8);
    out.extend_from_slice(s.as_bytes());
    Ok(())
}

struct Reader<'a>(&'a [u8]);
impl Reader<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8], MetaError> {
        if self.0.len() < n {
            return Err(MetaError::Corrupt);
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }
    fn u8(&mut self) -> Result<u8, MetaError> {
        Ok(self.take(1)?[0])
    }
    fn u32(&mut self) -> Result<u32, MetaError> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().unwrap()))
    }
    fn u64(&mut self) -> Result<u64, MetaError> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().unwrap()))
    }
    fn string(&mut self) -> Result<String, MetaError> {
        let n = self.u8()? as usize;
        String::from_utf8(self.take(n)?.to_vec()).map_err(|_| MetaError::Corrupt)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Metadata {
        let mut m = Metadata::new("r0", "alpha", 1 << 30, 42);
        m.applied_seq = 77;
        m.generation = 9;
        m.new_generation(11);
        m
    }

    #[test]
    fn undo_section_roundtrips_and_is_optional() {
        let mut m = sample();
        let plain = m.encode_slot().unwrap();
        assert_eq!(Metadata::decode_slot(&plain).unwrap().undo, None);
        m.undo = Some(UndoMeta {
            id: 5,
            seq: 1234,
            generation: 0xabc,
            crashed_primary: true,
        });
        let slot = m.encode_slot().unwrap();
        assert_eq!(Metadata::decode_slot(&slot).unwrap(), m);
        // An unknown section is corruption, not something to skip silently.
        let mut bad = plain.clone();
        let body_len = u32::from_le_bytes(bad[12..16].try_into().unwrap()) as usize;
        bad[12..16].copy_from_slice(&(body_len as u32 + 1).to_le_bytes());
        bad[HEADER + body_len] = 99;
        let end = HEADER + body_len + 1;
        let sum = blake3::hash(&bad[..end]);
        bad[end..end + SUM].copy_from_slice(sum.as_bytes());
        assert_eq!(Metadata::decode_slot(&bad), Err(MetaError::Corrupt));
    }

    #[test]
    fn history_keeps_the_newest() {
        let mut m = sample();
        for g in 100..140 {
            m.new_generation(g);
        }
        assert_eq!(m.generation, 139);
        assert_eq!(m.history.len(), MAX_HISTORY);
        assert_eq!(m.history[0], 138);
        let area = [m.encode_slot().unwrap(), vec![0; SLOT_SIZE]].concat();
        assert_eq!(Metadata::decode_area(&area).unwrap().0, m);
    }

    #[test]
    fn dirty_set_roundtrips_and_coarsens_when_large() {
        let mut m = sample();
        m.dirty.insert(0, 8192);
        m.dirty.insert(1 << 20, (1 << 20) + 4096);
        let area = [m.encode_slot().unwrap(), vec![0; SLOT_SIZE]].concat();
        assert_eq!(Metadata::decode_area(&area).unwrap().0, m);
        let mut big = sample();
        for i in 0..(MAX_DIRTY_RANGES as u64 * 2) {
            big.dirty.insert(i * 8192, i * 8192 + 4096);
        }
        let area = [big.encode_slot().unwrap(), vec![0; SLOT_SIZE]].concat();
        let back = Metadata::decode_area(&area).unwrap().0;
        assert!(back.dirty.ranges() <= MAX_DIRTY_RANGES);
        for (s, e) in big.dirty.iter() {
            assert!(back.dirty.contains(s, e), "coarsening lost {s}..{e}");
        }
    }

    #[test]
    fn roundtrip_and_newest_slot_wins() {
        let a = sample();
        let mut b = a.clone();
        b.counter = 2;
        b.applied_seq = 100;
        let mut area = a.encode_slot().unwrap();
        area.extend(b.encode_slot().unwrap());
        let (m, slot) = Metadata::decode_area(&area).unwrap();
        assert_eq!((m, slot), (b, 1));
    }

    #[test]
    fn torn_newest_slot_falls_back_to_previous() {
        let a = sample();
        let mut b = a.clone();
        b.counter = 2;
        let mut area = a.encode_slot().unwrap();
        let mut bs = b.encode_slot().unwrap();
        bs[40] ^= 0xff; // torn / corrupt
        area.extend(bs);
        assert_eq!(Metadata::decode_area(&area).unwrap(), (a, 0));
    }

    #[test]
    fn foreign_and_corrupt_refused() {
        assert_eq!(
            Metadata::decode_area(&[0u8; AREA_SIZE]).unwrap_err(),
            MetaError::NoMetadata
        );
        let mut s = sample().encode_slot().unwrap();
        s[20] ^= 1;
        let mut area = s.clone();
        area.extend(s);
        assert_eq!(
            Metadata::decode_area(&area).unwrap_err(),
            MetaError::Corrupt
        );
        let mut v = sample().encode_slot().unwrap();
        v[8] = 99;
        let mut area = v.clone();
        area.extend(v);
        assert!(matches!(
            Metadata::decode_area(&area).unwrap_err(),
            MetaError::Version { found: 99 }
        ));
        assert!(sample().check_identity("r0", "beta", 1 << 30).is_err());
        assert!(sample().check_identity("r0", "alpha", 1 << 20).is_err());
        assert!(sample().check_identity("r0", "alpha", 1 << 30).is_ok());
    }
}
