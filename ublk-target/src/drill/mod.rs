//! Drills: a copy-on-write clone of the replica at a consistent cut, served as a separate
//! device while replication goes on into the real replica.
//!
//! - The cut: the event loop holds new writes to the backing until the ones in flight have
//!   completed. Every write the secondary issues has its dependencies completed first (the
//!   engine's ordering contract), so the set of completed writes at that instant is an
//!   image a crash of the primary could have left: crash-consistent.
//! - [`Cow`]: from the cut on, before the loop submits a write to the backing, the blocks it
//!   would overwrite and that the clone still reads from the backing are copied into a
//!   sparse store file. The clone reads a block from the store once it is there, else from
//!   the backing; its own writes (a mount's journal replay, a probe) go to the store too,
//!   so neither side ever sees the other's changes.
//! - The clone is served over NBD always ([`nbd`]) and as a ublk block device where the
//!   kernel has ublk ([`ublk`]), each on threads of its own: the event loop only pays for
//!   the copies, once per block.
//! - A failing store (full disk) breaks the clone, never replication: the clone answers
//!   EIO from then on and the drill's verdict says why.
//!
//! Written by hand: the copy-before-write must sit exactly between the engine's decision to
//! write and the submission, inside our own event loop; no crate does that.

pub mod nbd;
pub mod ublk;

use blkrep_engine::buf::AlignedBuf;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// The store's unit: a block is saved whole the first time anything overwrites it.
pub const BLOCK: u64 = 4096;

/// Copies moved at once.
const CHUNK_BLOCKS: u64 = 256;

struct Inner {
    backing: File,
    store: File,
    /// One bit per block: set when the clone's content of the block is in the store.
    map: Vec<u64>,
    preserved: u64,
    written: u64,
    broken: Option<String>,
    closed: bool,
}

impl Inner {
    fn saved(&self, b: u64) -> bool {
        self.map[(b / 64) as usize] & (1 << (b % 64)) != 0
    }

    fn mark(&mut self, b: u64) {
        self.map[(b / 64) as usize] |= 1 << (b % 64);
    }

    /// Runs of blocks in `[first, end)` with the same saved state.
    fn runs(&self, first: u64, end: u64) -> Vec<(u64, u64, bool)> {
        let mut out: Vec<(u64, u64, bool)> = Vec::new();
        for b in first..end {
            let s = self.saved(b);
            match out.last_mut() {
                Some((a, e, st)) if *st == s && *e - *a < CHUNK_BLOCKS => *e = b + 1,
                _ => out.push((b, b + 1, s)),
            }
        }
        out
    }

    /// The clone's content of blocks `[first, end)`, into an aligned buffer.
    fn read_blocks(&self, first: u64, end: u64) -> std::io::Result<AlignedBuf> {
        let mut buf = AlignedBuf::zeroed(((end - first) * BLOCK) as usize);
        for (a, b, saved) in self.runs(first, end) {
            let at = ((a - first) * BLOCK) as usize;
            let part = &mut buf.as_mut_slice()[at..at + ((b - a) * BLOCK) as usize];
            let src = if saved { &self.store } else { &self.backing };
            src.read_exact_at(part, a * BLOCK)?;
        }
        Ok(buf)
    }
}

/// The clone's store and map, shared by the event loop and the clone's servers.
pub struct Cow {
    inner: Mutex<Inner>,
    size: u64,
    store_path: PathBuf,
}

/// Why the clone cannot answer.
fn unusable(i: &Inner) -> Option<std::io::Error> {
    if i.closed {
        return Some(std::io::Error::other("the drill is ending"));
    }
    i.broken.as_ref().map(|b| std::io::Error::other(b.clone()))
}

impl Cow {
    /// A clone of `size` bytes over `backing` (the replica, read through its own open
    /// file description), with its store at `store_path` (created empty, sparse).
    pub fn create(backing: File, size: u64, store_path: &Path) -> std::io::Result<Cow> {
        if let Some(dir) = store_path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let store = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(store_path)?;
        store.set_len(size)?;
        let blocks = size.div_ceil(BLOCK);
        Ok(Cow {
            inner: Mutex::new(Inner {
                backing,
                store,
                map: vec![0; blocks.div_ceil(64) as usize],
                preserved: 0,
                written: 0,
                broken: None,
                closed: false,
            }),
            size,
            store_path: store_path.to_path_buf(),
        })
    }

    /// Volume size.
    pub fn size(&self) -> u64 {
        self.size
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn blocks(&self, offset: u64, len: u64) -> (u64, u64) {
        let end = (offset + len).min(self.size);
        (offset / BLOCK, end.div_ceil(BLOCK))
    }

    /// Save the cut's content of `[offset, offset+len)` before the backing is overwritten
    /// there. Called by the event loop before it submits the write. A failure breaks the
    /// clone (and is returned once, for the log); the write goes ahead regardless.
    pub fn preserve(&self, offset: u64, len: u64) -> Result<(), String> {
        let mut i = self.lock();
        if i.broken.is_some() || i.closed {
            return Ok(());
        }
        let (first, end) = self.blocks(offset, len);
        let todo: Vec<(u64, u64)> = i
            .runs(first, end)
            .into_iter()
            .filter(|r| !r.2)
            .map(|(a, b, _)| (a, b))
            .collect();
        for (a, b) in todo {
            let copied = i.read_blocks(a, b).and_then(|buf| {
                let data: &[u8] = buf.as_ref();
                i.store.write_all_at(data, a * BLOCK)
            });
            if let Err(e) = copied {
                let why = format!("the drill's store failed: {e}");
                i.broken = Some(why.clone());
                return Err(why);
            }
            for blk in a..b {
                i.mark(blk);
            }
            i.preserved += b - a;
        }
        Ok(())
    }

    /// Read the clone.
    pub fn read(&self, offset: u64, out: &mut [u8]) -> std::io::Result<()> {
        let i = self.lock();
        if let Some(e) = unusable(&i) {
            return Err(e);
        }
        let (first, end) = self.blocks(offset, out.len() as u64);
        let buf = i.read_blocks(first, end)?;
        let skip = (offset - first * BLOCK) as usize;
        let data: &[u8] = buf.as_ref();
        out.copy_from_slice(&data[skip..skip + out.len()]);
        Ok(())
    }

    /// Write the clone (`None`: zeroes of `len` bytes).
    pub fn write(&self, offset: u64, data: Option<&[u8]>, len: u64) -> std::io::Result<()> {
        let mut i = self.lock();
        if let Some(e) = unusable(&i) {
            return Err(e);
        }
        let (first, end) = self.blocks(offset, len);
        // Whole blocks (partial ones merged with the clone's current content), a chunk at
        // a time so that a large write-zeroes needs no large buffer.
        let mut b = first;
        while b < end {
            let e = (b + CHUNK_BLOCKS).min(end);
            let mut buf = i.read_blocks(b, e)?;
            let lo = offset.max(b * BLOCK);
            let hi = (offset + len).min(e * BLOCK);
            let dst = &mut buf.as_mut_slice()[(lo - b * BLOCK) as usize..(hi - b * BLOCK) as usize];
            match data {
                Some(d) => dst.copy_from_slice(&d[(lo - offset) as usize..(hi - offset) as usize]),
                None => dst.fill(0),
            }
            let whole: &[u8] = buf.as_ref();
            i.store.write_all_at(whole, b * BLOCK)?;
            for blk in b..e {
                if !i.saved(blk) {
                    i.mark(blk);
                }
            }
            i.written += e - b;
            b = e;
        }
        Ok(())
    }

    /// Stop answering the clone's users (the drill is ending).
    pub fn close(&self) {
        self.lock().closed = true;
    }

    /// Bytes of the cut saved so far, bytes the clone's users wrote, and why it broke.
    pub fn stats(&self) -> (u64, u64, Option<String>) {
        let i = self.lock();
        (i.preserved * BLOCK, i.written * BLOCK, i.broken.clone())
    }

    /// Remove the store file.
    pub fn remove_store(&self) {
        if let Err(e) = std::fs::remove_file(&self.store_path) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(
                    "cannot remove the drill store {}: {e}",
                    self.store_path.display()
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Dir(PathBuf);
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn setup(size: u64) -> (Dir, Cow, File) {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = Dir(std::env::temp_dir().join(format!("blkrep-cow-{}-{n}", std::process::id())));
        std::fs::create_dir_all(&dir.0).unwrap();
        let path = dir.0.join("backing");
        let f = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        let content: Vec<u8> = (0..size).map(|i| (i / 512) as u8).collect();
        f.write_all_at(&content, 0).unwrap();
        let cow = Cow::create(f.try_clone().unwrap(), size, &dir.0.join("store")).unwrap();
        (dir, cow, f)
    }

    fn read(c: &Cow, off: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0; len];
        c.read(off, &mut v).unwrap();
        v
    }

    #[test]
    fn the_clone_keeps_the_cut_while_the_replica_moves_on() {
        let size = 64 * BLOCK;
        let (_d, cow, backing) = setup(size);
        let cut = read(&cow, 0, size as usize);
        // Replication overwrites blocks 3..5 and a partial range in block 9.
        cow.preserve(3 * BLOCK + 100, 2 * BLOCK).unwrap();
        backing
            .write_all_at(&vec![0xee; 2 * BLOCK as usize], 3 * BLOCK + 100)
            .unwrap();
        cow.preserve(9 * BLOCK + 512, 512).unwrap();
        backing.write_all_at(&[0xdd; 512], 9 * BLOCK + 512).unwrap();
        assert_eq!(read(&cow, 0, size as usize), cut);
        // Saved once: a second overwrite copies nothing more.
        cow.preserve(3 * BLOCK, BLOCK).unwrap();
        backing
            .write_all_at(&vec![0x11; BLOCK as usize], 3 * BLOCK)
            .unwrap();
        assert_eq!(read(&cow, 0, size as usize), cut);
        assert_eq!(cow.stats().0, 4 * BLOCK);
    }

    #[test]
    fn the_clone_writes_stay_in_the_clone() {
        let size = 32 * BLOCK;
        let (_d, cow, backing) = setup(size);
        let before: Vec<u8> = {
            let mut v = vec![0; size as usize];
            backing.read_exact_at(&mut v, 0).unwrap();
            v
        };
        let mut expect = read(&cow, 0, size as usize);
        cow.write(BLOCK + 512, Some(&[0xab; 1024]), 1024).unwrap();
        expect[(BLOCK + 512) as usize..(BLOCK + 1536) as usize].fill(0xab);
        cow.write(5 * BLOCK - 512, None, 3 * BLOCK).unwrap();
        expect[(5 * BLOCK - 512) as usize..(8 * BLOCK - 512) as usize].fill(0);
        assert_eq!(read(&cow, 0, size as usize), expect);
        let mut after = vec![0; size as usize];
        backing.read_exact_at(&mut after, 0).unwrap();
        assert_eq!(after, before, "the replica never sees the clone's writes");
        // A replication write after a clone write leaves the clone's version.
        cow.preserve(BLOCK, BLOCK).unwrap();
        backing
            .write_all_at(&vec![0x77; BLOCK as usize], BLOCK)
            .unwrap();
        assert_eq!(read(&cow, 0, size as usize), expect);
    }

    #[test]
    fn a_closed_clone_answers_errors_and_preserve_never_fails_the_write() {
        let (_d, cow, _b) = setup(8 * BLOCK);
        cow.close();
        assert!(cow.read(0, &mut [0; 512]).is_err());
        assert!(cow.write(0, Some(&[1; 512]), 512).is_err());
        assert!(cow.preserve(0, BLOCK).is_ok());
    }
}
