//! A set of disjoint in-flight byte ranges with O(log n) overlap queries.
//!
//! Both sides keep overlapping operations strictly ordered: an operation is only issued
//! when it overlaps nothing in flight, so the ranges held here never overlap each other.

use std::collections::BTreeMap;

/// Disjoint `[start, end)` ranges, each tagged with an id.
#[derive(Debug, Default)]
pub struct RangeSet {
    by_start: BTreeMap<u64, (u64, u64)>,
}

impl RangeSet {
    /// True when `[start, end)` overlaps a range in the set.
    pub fn overlaps(&self, start: u64, end: u64) -> bool {
        if start >= end {
            return false;
        }
        // Ranges are disjoint: only the last one starting before `end` can reach `start`.
        match self.by_start.range(..end).next_back() {
            Some((_, &(e, _))) => e > start,
            None => false,
        }
    }

    /// Insert a range; it must not overlap any held range.
    pub fn insert(&mut self, start: u64, end: u64, id: u64) {
        debug_assert!(!self.overlaps(start, end), "overlapping in-flight ranges");
        if start < end {
            self.by_start.insert(start, (end, id));
        }
    }

    /// Remove the range starting at `start` (no-op if absent or empty).
    pub fn remove(&mut self, start: u64) {
        self.by_start.remove(&start);
    }

    /// Number of ranges held.
    pub fn len(&self) -> usize {
        self.by_start.len()
    }

    /// True when no range is held.
    pub fn is_empty(&self) -> bool {
        self.by_start.is_empty()
    }
}

/// True when `[a0, a1)` and `[b0, b1)` overlap.
pub fn overlap(a0: u64, a1: u64, b0: u64, b1: u64) -> bool {
    a0 < b1 && b0 < a1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlap_queries() {
        let mut s = RangeSet::default();
        s.insert(100, 200, 1);
        s.insert(300, 400, 2);
        assert!(s.overlaps(150, 160));
        assert!(s.overlaps(0, 101));
        assert!(!s.overlaps(0, 100));
        assert!(!s.overlaps(200, 300));
        assert!(s.overlaps(199, 301));
        assert!(s.overlaps(250, 1000));
        assert!(!s.overlaps(400, 1000));
        s.remove(300);
        assert!(!s.overlaps(250, 1000));
        assert_eq!(s.len(), 1);
    }
}
