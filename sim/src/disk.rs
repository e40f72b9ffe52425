//! A simulated disk with a volatile write cache.
//!
//! A completed write is visible to reads at once but survives a power loss only once a
//! flush that was issued after its completion has completed, or when it was written with
//! FUA. On a crash each sector independently keeps some prefix of its unflushed versions
//! (in write order): unflushed writes are lost, or torn at sector granularity, and a sector
//! always ends up holding one whole version of itself, never an older one over a newer one.

use crate::rng::Rng;
use std::collections::BTreeSet;

/// Sector size of the simulated disk (the engine's alignment unit).
pub const SECTOR: u64 = 512;
const S: usize = SECTOR as usize;

/// One version of one sector waiting in the volatile cache.
#[derive(Clone, Debug)]
struct Version {
    /// Completion number of the write (for flush markers).
    n: u64,
    /// The bytes; `None` for zeroes.
    data: Option<Box<[u8]>>,
}

/// The disk.
pub struct SimDisk {
    current: Vec<u8>,
    durable: Vec<u8>,
    pending: Vec<Vec<Version>>,
    dirty: BTreeSet<usize>,
    completed: u64,
}

impl SimDisk {
    /// A zeroed disk of `size` bytes (a multiple of [`SECTOR`]).
    pub fn new(size: u64) -> SimDisk {
        let n = (size / SECTOR) as usize;
        SimDisk {
            current: vec![0; size as usize],
            durable: vec![0; size as usize],
            pending: vec![Vec::new(); n],
            dirty: BTreeSet::new(),
            completed: 0,
        }
    }

    /// What a read sees.
    pub fn image(&self) -> &[u8] {
        &self.current
    }

    /// What survives a power loss for sure.
    pub fn durable_image(&self) -> &[u8] {
        &self.durable
    }

    /// Read `len` bytes at `offset`.
    pub fn read(&self, offset: u64, len: u64) -> Vec<u8> {
        self.current[offset as usize..(offset + len) as usize].to_vec()
    }

    /// A write (or zeroes when `data` is `None`) completed.
    pub fn write(&mut self, offset: u64, len: u64, data: Option<&[u8]>, fua: bool) {
        self.completed += 1;
        let first = (offset / SECTOR) as usize;
        for i in 0..(len / SECTOR) as usize {
            let sec = first + i;
            let src = data.map(|d| &d[i * S..(i + 1) * S]);
            let cur = &mut self.current[sec * S..(sec + 1) * S];
            match src {
                Some(b) => cur.copy_from_slice(b),
                None => cur.fill(0),
            }
            if fua {
                // Durable now; the older cached versions of this sector can never
                // resurface (a disk does not write back an older version over a newer one).
                self.durable[sec * S..(sec + 1) * S].copy_from_slice(cur);
                self.pending[sec].clear();
                self.dirty.remove(&sec);
            } else {
                self.pending[sec].push(Version {
                    n: self.completed,
                    data: src.map(|b| b.to_vec().into_boxed_slice()),
                });
                self.dirty.insert(sec);
            }
        }
    }

    /// A flush is issued: the marker it must honour (writes completed so far).
    pub fn flush_marker(&self) -> u64 {
        self.completed
    }

    /// A flush issued with `marker` completed: every write completed before it is durable.
    pub fn flush(&mut self, marker: u64) {
        let secs: Vec<usize> = self.dirty.iter().copied().collect();
        for sec in secs {
            let p = &mut self.pending[sec];
            let k = p.iter().take_while(|v| v.n <= marker).count();
            if k == 0 {
                continue;
            }
            let last = &p[k - 1];
            let d = &mut self.durable[sec * S..(sec + 1) * S];
            match &last.data {
                Some(b) => d.copy_from_slice(b),
                None => d.fill(0),
            }
            p.drain(..k);
            if p.is_empty() {
                self.dirty.remove(&sec);
            }
        }
    }

    /// Power loss. `in_flight` are writes issued and not completed (offset, len, data);
    /// each may land partially. Every sector keeps a random prefix of its versions.
    pub fn crash(&mut self, rng: &mut Rng, in_flight: &[(u64, u64, Option<Vec<u8>>)]) {
        for (offset, len, data) in in_flight {
            let first = (offset / SECTOR) as usize;
            for i in 0..(len / SECTOR) as usize {
                let sec = first + i;
                self.pending[sec].push(Version {
                    n: u64::MAX,
                    data: data
                        .as_ref()
                        .map(|d| d[i * S..(i + 1) * S].to_vec().into_boxed_slice()),
                });
                self.dirty.insert(sec);
            }
        }
        let secs: Vec<usize> = self.dirty.iter().copied().collect();
        for sec in secs {
            let p = std::mem::take(&mut self.pending[sec]);
            let keep = rng.below(p.len() as u64 + 1) as usize;
            if keep > 0 {
                let d = &mut self.durable[sec * S..(sec + 1) * S];
                match &p[keep - 1].data {
                    Some(b) => d.copy_from_slice(b),
                    None => d.fill(0),
                }
            }
        }
        self.dirty.clear();
        self.current.copy_from_slice(&self.durable);
    }

    /// Number of sectors.
    pub fn sectors(&self) -> usize {
        self.pending.len()
    }
}

/// What a sector holds, as the workload wrote it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Content {
    /// All zeroes (never written, zeroed or trimmed).
    Zero,
    /// Written by client operation `op`.
    Op(u64),
    /// Bytes no operation wrote there: corruption or a misdirected write.
    Garbage,
}

/// Fill one sector for client operation `op` at sector index `sector`.
pub fn fill_sector(op: u64, sector: u64, out: &mut [u8]) {
    out[..8].copy_from_slice(&op.to_le_bytes());
    out[8..16].copy_from_slice(&sector.to_le_bytes());
    let f = (op as u8) ^ 0xa5 | 1;
    out[16..].fill(f);
}

/// Identify the content of sector `sector` (its bytes in `b`).
pub fn content(b: &[u8], sector: u64) -> Content {
    let op = u64::from_le_bytes(b[..8].try_into().expect("8 bytes"));
    if op == 0 {
        return if b.iter().all(|&x| x == 0) {
            Content::Zero
        } else {
            Content::Garbage
        };
    }
    let sec = u64::from_le_bytes(b[8..16].try_into().expect("8 bytes"));
    let f = (op as u8) ^ 0xa5 | 1;
    if sec == sector && b[16..].iter().all(|&x| x == f) {
        Content::Op(op)
    } else {
        Content::Garbage
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(op: u64, first: u64, n: u64) -> Vec<u8> {
        let mut v = vec![0u8; (n * SECTOR) as usize];
        for i in 0..n {
            fill_sector(
                op,
                first + i,
                &mut v[(i * SECTOR) as usize..((i + 1) * SECTOR) as usize],
            );
        }
        v
    }

    #[test]
    fn flush_fua_and_crash() {
        let mut d = SimDisk::new(8 * SECTOR);
        d.write(0, 2 * SECTOR, Some(&data(1, 0, 2)), false);
        let m = d.flush_marker();
        d.write(2 * SECTOR, SECTOR, Some(&data(2, 2, 1)), false);
        d.flush(m);
        assert_eq!(content(&d.durable_image()[..S], 0), Content::Op(1));
        assert_eq!(content(&d.durable_image()[2 * S..3 * S], 2), Content::Zero);
        d.write(3 * SECTOR, SECTOR, Some(&data(3, 3, 1)), true);
        assert_eq!(content(&d.durable_image()[3 * S..4 * S], 3), Content::Op(3));
        let mut rng = Rng::new(1);
        d.crash(&mut rng, &[]);
        assert_eq!(content(&d.image()[..S], 0), Content::Op(1));
        assert_eq!(content(&d.image()[3 * S..4 * S], 3), Content::Op(3));
        let c = content(&d.image()[2 * S..3 * S], 2);
        assert!(c == Content::Zero || c == Content::Op(2));
        assert_eq!(content(&data(5, 1, 1), 2), Content::Garbage, "misdirected");
    }

    #[test]
    fn crash_keeps_sector_versions_in_order() {
        // Versions 1, 2, 3 of sector 0: a crash leaves 0 (durable), 1, 2 or 3, each seen.
        let mut seen = BTreeSet::new();
        for seed in 0..200 {
            let mut d = SimDisk::new(SECTOR);
            for op in 1..=3 {
                d.write(0, SECTOR, Some(&data(op, 0, 1)), false);
            }
            d.crash(&mut Rng::new(seed), &[]);
            seen.insert(match content(d.image(), 0) {
                Content::Op(o) => o,
                _ => 0,
            });
        }
        assert_eq!(seen.into_iter().collect::<Vec<_>>(), vec![0, 1, 2, 3]);
    }
}
