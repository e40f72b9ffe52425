//! blake3 comparison of two images (regular files or block devices), whole and per extent.
//!
//! Both images are read in 4 MiB chunks, each on its own thread, hashing the whole image
//! and every extent; the extent hashes are then compared. Hashes rather than bytes are
//! compared so the same report can later be produced for images on different hosts.

use std::fs::File;
use std::io::{self, Read};
use std::path::Path;

use serde::Serialize;

/// Read size.
pub const CHUNK: usize = 4 << 20;
/// Default extent size of [`compare_files`] callers.
pub const DEFAULT_EXTENT: u64 = 1 << 20;

/// The outcome of [`compare_files`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CompareReport {
    /// Same size and same content.
    pub equal: bool,
    /// Size of the first image in bytes.
    pub size_a: u64,
    /// Size of the second image in bytes.
    pub size_b: u64,
    /// blake3 of the whole first image (hex).
    pub hash_a: String,
    /// blake3 of the whole second image (hex).
    pub hash_b: String,
    /// Differing (offset, length) ranges, extent-aligned, adjacent extents merged. Past the
    /// end of the shorter image everything counts as different.
    pub differing_extents: Vec<(u64, u64)>,
}

struct Digest {
    size: u64,
    whole: String,
    extents: Vec<[u8; 32]>,
}

/// Fills `buf` as far as the file allows; returns the bytes read (short only at the end).
fn read_full(f: &mut File, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

fn open(p: &Path) -> io::Result<File> {
    File::open(p).map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", p.display())))
}

/// Hashes `p` whole and per `extent` bytes (the last extent may be short).
fn digest(p: &Path, extent: u64) -> io::Result<Digest> {
    let mut f = open(p)?;
    let mut buf = vec![0u8; CHUNK];
    let mut whole = blake3::Hasher::new();
    let mut ext = blake3::Hasher::new();
    let (mut in_ext, mut size) = (0u64, 0u64);
    let mut extents = Vec::new();
    loop {
        let n = read_full(&mut f, &mut buf)?;
        if n == 0 {
            break;
        }
        whole.update(&buf[..n]);
        size += n as u64;
        let mut rest = &buf[..n];
        while !rest.is_empty() {
            let take = (extent - in_ext).min(rest.len() as u64) as usize;
            ext.update(&rest[..take]);
            in_ext += take as u64;
            rest = &rest[take..];
            if in_ext == extent {
                extents.push(*ext.finalize().as_bytes());
                ext.reset();
                in_ext = 0;
            }
        }
    }
    if in_ext > 0 {
        extents.push(*ext.finalize().as_bytes());
    }
    Ok(Digest {
        size,
        whole: whole.finalize().to_hex().to_string(),
        extents,
    })
}

/// Compares two images whole and per `extent` bytes; the two are read in parallel.
pub fn compare_files(a: &Path, b: &Path, extent: u64) -> io::Result<CompareReport> {
    if extent == 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "extent size must be positive",
        ));
    }
    let (da, db) = std::thread::scope(|s| {
        let ta = s.spawn(|| digest(a, extent));
        let db = digest(b, extent);
        let da = ta
            .join()
            .unwrap_or_else(|_| Err(io::Error::other("hashing thread panicked")));
        (da, db)
    });
    let (da, db) = (da?, db?);
    let max = da.size.max(db.size);
    let mut differing: Vec<(u64, u64)> = Vec::new();
    for i in 0..da.extents.len().max(db.extents.len()) {
        if da.extents.get(i).is_some() && da.extents.get(i) == db.extents.get(i) {
            continue;
        }
        let off = i as u64 * extent;
        let len = extent.min(max - off);
        match differing.last_mut() {
            Some((o, l)) if *o + *l == off => *l += len,
            _ => differing.push((off, len)),
        }
    }
    Ok(CompareReport {
        equal: da.size == db.size && da.whole == db.whole,
        size_a: da.size,
        size_b: db.size,
        hash_a: da.whole,
        hash_b: db.whole,
        differing_extents: differing,
    })
}

/// blake3 of a whole file or block device, in hex.
pub fn hash_file(p: &Path) -> io::Result<String> {
    let mut f = open(p)?;
    let mut buf = vec![0u8; CHUNK];
    let mut h = blake3::Hasher::new();
    loop {
        let n = read_full(&mut f, &mut buf)?;
        if n == 0 {
            return Ok(h.finalize().to_hex().to_string());
        }
        h.update(&buf[..n]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_server::TempDir;

    fn pattern(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 + i / 4096) as u8).collect()
    }

    #[test]
    fn equal_files() {
        let d = TempDir::new("cmp-eq");
        let data = pattern(9 << 20 | 123);
        std::fs::write(d.path("a"), &data).unwrap();
        std::fs::write(d.path("b"), &data).unwrap();
        let r = compare_files(&d.path("a"), &d.path("b"), DEFAULT_EXTENT).unwrap();
        assert!(r.equal);
        assert_eq!(r.size_a, data.len() as u64);
        assert_eq!(r.hash_a, r.hash_b);
        assert_eq!(r.hash_a, blake3::hash(&data).to_hex().to_string());
        assert_eq!(hash_file(&d.path("a")).unwrap(), r.hash_a);
        assert!(r.differing_extents.is_empty());
    }

    #[test]
    fn flipped_bytes_name_their_extents() {
        let d = TempDir::new("cmp-diff");
        let a = pattern(8 << 20);
        let mut b = a.clone();
        b[(3 << 20) + 5] ^= 1; // extent 3
        b[(5 << 20) + 7] ^= 0x80; // extent 5
        b[(6 << 20) + 9] ^= 0x80; // extent 6: merged with 5
        std::fs::write(d.path("a"), &a).unwrap();
        std::fs::write(d.path("b"), &b).unwrap();
        let r = compare_files(&d.path("a"), &d.path("b"), DEFAULT_EXTENT).unwrap();
        assert!(!r.equal);
        assert_ne!(r.hash_a, r.hash_b);
        assert_eq!(
            r.differing_extents,
            vec![(3 << 20, 1 << 20), (5 << 20, 2 << 20)]
        );
        // An extent size that does not divide the read chunk.
        let r = compare_files(&d.path("a"), &d.path("b"), 1000).unwrap();
        assert_eq!(
            r.differing_extents,
            vec![
                ((3 << 20) + 5) / 1000 * 1000,
                ((5 << 20) + 7) / 1000 * 1000,
                ((6 << 20) + 9) / 1000 * 1000
            ]
            .into_iter()
            .map(|o| (o, 1000))
            .collect::<Vec<_>>()
        );
    }

    #[test]
    fn different_sizes() {
        let d = TempDir::new("cmp-size");
        let a = pattern(3 << 20);
        std::fs::write(d.path("a"), &a).unwrap();
        std::fs::write(d.path("b"), &a[..(1 << 20) + 10]).unwrap();
        let r = compare_files(&d.path("a"), &d.path("b"), DEFAULT_EXTENT).unwrap();
        assert!(!r.equal);
        assert_eq!((r.size_a, r.size_b), (3 << 20, (1 << 20) + 10));
        assert_eq!(r.differing_extents, vec![(1 << 20, 2 << 20)]);
        assert!(compare_files(&d.path("a"), &d.path("b"), 0).is_err());
        let e = compare_files(&d.path("a"), &d.path("missing"), 4096).unwrap_err();
        assert!(e.to_string().contains("missing"), "{e}");
    }
}
