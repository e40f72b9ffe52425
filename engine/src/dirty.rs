//! Sets of blocks: what a node's peer lacks (the dirty set) and, on disk, that set plus the
//! activity log's hot extents.
//!
//! A [`BlockSet`] holds disjoint, merged `[start, end)` byte ranges. Inserting rounds out to
//! the set's block size, so a set is always block aligned. On disk a set is a list of
//! ranges; when it has more ranges than fit, neighbouring ranges are merged across the
//! smallest gaps first ([`BlockSet::coarsened`]) — a superset, so nothing is ever lost,
//! only some clean blocks resynced.

use std::collections::BTreeMap;

/// Disjoint, merged, block-aligned byte ranges.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BlockSet {
    block: u64,
    map: BTreeMap<u64, u64>,
    bytes: u64,
}

impl BlockSet {
    /// An empty set with `block`-byte granularity (a power of two).
    pub fn new(block: u64) -> BlockSet {
        assert!(block.is_power_of_two(), "block size must be a power of two");
        BlockSet {
            block,
            map: BTreeMap::new(),
            bytes: 0,
        }
    }

    /// The granularity.
    pub fn block(&self) -> u64 {
        self.block
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Bytes covered.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Number of ranges.
    pub fn ranges(&self) -> usize {
        self.map.len()
    }

    /// The ranges in order.
    pub fn iter(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.map.iter().map(|(&s, &e)| (s, e))
    }

    /// Add `[start, end)`, rounded out to whole blocks.
    pub fn insert(&mut self, start: u64, end: u64) {
        if start >= end {
            return;
        }
        let mut s = start & !(self.block - 1);
        let mut e = end.div_ceil(self.block) * self.block;
        // Absorb every range that touches [s, e).
        let touching: Vec<(u64, u64)> = self
            .map
            .range(..=e)
            .rev()
            .take_while(|&(_, &re)| re >= s)
            .map(|(&rs, &re)| (rs, re))
            .collect();
        for (rs, re) in touching {
            self.map.remove(&rs);
            self.bytes -= re - rs;
            s = s.min(rs);
            e = e.max(re);
        }
        self.map.insert(s, e);
        self.bytes += e - s;
    }

    /// Remove `[start, end)` (exact bytes; callers pass block-aligned ranges).
    pub fn remove(&mut self, start: u64, end: u64) {
        if start >= end {
            return;
        }
        let hit: Vec<(u64, u64)> = self
            .map
            .range(..end)
            .rev()
            .take_while(|&(_, &re)| re > start)
            .map(|(&rs, &re)| (rs, re))
            .collect();
        for (rs, re) in hit {
            self.map.remove(&rs);
            self.bytes -= re - rs;
            if rs < start {
                self.map.insert(rs, start);
                self.bytes += start - rs;
            }
            if re > end {
                self.map.insert(end, re);
                self.bytes += re - end;
            }
        }
    }

    /// True when every byte of `[start, end)` is in the set.
    pub fn contains(&self, start: u64, end: u64) -> bool {
        start >= end
            || self
                .map
                .range(..=start)
                .next_back()
                .is_some_and(|(_, &e)| e >= end)
    }

    /// Add every range of `other`.
    pub fn union(&mut self, other: &BlockSet) {
        for (s, e) in other.iter() {
            self.insert(s, e);
        }
    }

    /// The first piece of the set at or after `from`, at most `max` bytes, not crossing
    /// the end of its range.
    pub fn next_chunk(&self, from: u64, max: u64) -> Option<(u64, u64)> {
        if let Some((_, &e)) = self.map.range(..=from).next_back() {
            if e > from {
                return Some((from, e.min(from + max)));
            }
        }
        self.map
            .range(from..)
            .next()
            .map(|(&s, &e)| (s, e.min(s + max)))
    }

    /// A superset with at most `max_ranges` ranges: the smallest gaps are filled first.
    pub fn coarsened(&self, max_ranges: usize) -> BlockSet {
        if self.map.len() <= max_ranges.max(1) {
            return self.clone();
        }
        let v: Vec<(u64, u64)> = self.iter().collect();
        let mut gaps: Vec<u64> = v.windows(2).map(|w| w[1].0 - w[0].1).collect();
        gaps.sort_unstable();
        // Filling every gap <= limit leaves at most max_ranges ranges.
        let limit = gaps[v.len() - max_ranges.max(1) - 1];
        let mut out = BlockSet::new(self.block);
        let (mut cs, mut ce) = v[0];
        for &(s, e) in &v[1..] {
            if s - ce <= limit {
                ce = e;
            } else {
                out.insert(cs, ce);
                (cs, ce) = (s, e);
            }
        }
        out.insert(cs, ce);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(ranges: &[(u64, u64)]) -> BlockSet {
        let mut b = BlockSet::new(4096);
        for &(s, e) in ranges {
            b.insert(s, e);
        }
        b
    }

    #[test]
    fn insert_rounds_and_merges() {
        let mut b = set(&[(100, 200)]);
        assert_eq!(b.iter().collect::<Vec<_>>(), vec![(0, 4096)]);
        b.insert(8192, 12288);
        b.insert(4096, 8192); // touches both: one range
        assert_eq!(b.iter().collect::<Vec<_>>(), vec![(0, 12288)]);
        assert_eq!(b.bytes(), 12288);
        b.insert(40960, 40961);
        assert_eq!(b.ranges(), 2);
        assert!(b.contains(4096, 8192));
        assert!(!b.contains(8192, 16384));
    }

    #[test]
    fn remove_splits() {
        let mut b = set(&[(0, 16 * 4096)]);
        b.remove(4096, 8192);
        assert_eq!(
            b.iter().collect::<Vec<_>>(),
            vec![(0, 4096), (8192, 16 * 4096)]
        );
        assert_eq!(b.bytes(), 15 * 4096);
        b.remove(0, 1 << 30);
        assert!(b.is_empty());
        assert_eq!(b.bytes(), 0);
    }

    #[test]
    fn chunks_walk_the_set() {
        let b = set(&[(0, 3 * 4096), (10 * 4096, 11 * 4096)]);
        assert_eq!(b.next_chunk(0, 8192), Some((0, 8192)));
        assert_eq!(b.next_chunk(8192, 8192), Some((8192, 12288)));
        assert_eq!(b.next_chunk(12288, 8192), Some((40960, 45056)));
        assert_eq!(b.next_chunk(45056, 8192), None);
    }

    #[test]
    fn coarsening_is_a_superset_within_the_bound() {
        let mut b = BlockSet::new(4096);
        let mut x = 7u64;
        for _ in 0..500 {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let s = (x >> 20) % (1 << 30);
            b.insert(s, s + 4096);
        }
        let c = b.coarsened(50);
        assert!(c.ranges() <= 50, "{}", c.ranges());
        for (s, e) in b.iter() {
            assert!(c.contains(s, e));
        }
    }
}
