//! What the checker knows: every client operation (by global id, in the order the primary
//! accepted it), and the replication stream as it left the primary (by sequence number).
//! Sector contents name the operation that wrote them (see `disk::fill_sector`), so an image
//! can be read back as "which operation's version does each sector hold".

use crate::disk::Content;
use std::collections::BTreeMap;

/// A violation of an invariant, with what the checker saw.
#[derive(Clone, Debug)]
pub struct Violation {
    /// Short name of the invariant.
    pub invariant: &'static str,
    /// What was wrong.
    pub detail: String,
}

impl std::fmt::Display for Violation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.invariant, self.detail)
    }
}

/// Shorthand for a failed check.
pub fn violation(invariant: &'static str, detail: String) -> Violation {
    Violation { invariant, detail }
}

/// A version of a sector in the client-operation order: `(op id, writes zeroes)`.
type OpVersion = (u64, bool);

/// Every modifying client operation a primary accepted, per sector, in acceptance order.
/// Operation ids grow with time and only one node accepts writes at a time, so along one
/// sector the ids are in the order the versions were created.
pub struct Ops {
    per_sector: Vec<Vec<OpVersion>>,
}

impl Ops {
    /// For a volume of `sectors` sectors.
    pub fn new(sectors: usize) -> Ops {
        Ops {
            per_sector: vec![Vec::new(); sectors],
        }
    }

    /// A primary accepted operation `op` over `first..first+n`.
    pub fn accepted(&mut self, op: u64, first: usize, n: usize, zero: bool) {
        for s in first..first + n {
            self.per_sector[s].push((op, zero));
        }
    }

    /// True when sector `s` holding `c` is no older than version `floor` (0 = no floor).
    pub fn at_least(&self, s: usize, c: Content, floor: u64) -> bool {
        match c {
            Content::Garbage => false,
            Content::Op(v) => v >= floor && self.per_sector[s].iter().any(|&(o, _)| o == v),
            Content::Zero => {
                floor == 0
                    || self.per_sector[s]
                        .iter()
                        .any(|&(o, zero)| zero && o >= floor)
            }
        }
    }

    /// The version a sector with content `c` holds, for baselines (0 for zeroes).
    pub fn version_of(c: Content) -> u64 {
        match c {
            Content::Op(v) => v,
            _ => 0,
        }
    }
}

/// What the checker tracks for the node that is (or was) primary: per sector the newest
/// version a client saw acknowledged (`floor`) and the newest one a completed flush or a
/// FUA write made durable.
#[derive(Clone)]
pub struct PrimaryModel {
    /// Newest version acknowledged per sector.
    pub floor: Vec<u64>,
    /// Newest version known durable per sector.
    pub durable: Vec<u64>,
    /// Client flushes in flight: the floors they will make durable.
    pub flushes: BTreeMap<u64, Vec<u64>>,
}

impl PrimaryModel {
    /// A baseline: the node holds `versions` now (it just became primary).
    pub fn baseline(versions: Vec<u64>) -> PrimaryModel {
        PrimaryModel {
            durable: versions.clone(),
            floor: versions,
            flushes: BTreeMap::new(),
        }
    }
}

/// An item of the replication stream as the checker records it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct StreamVersion {
    seq: u64,
    content: Content,
}

/// The replication stream as it left the primary, per sector, since the last full sync
/// started (a full sync redefines everything before its base).
pub struct Stream {
    per_sector: Vec<Vec<StreamVersion>>,
    deps: BTreeMap<u64, u64>,
    fingerprints: BTreeMap<u64, u64>,
    /// Items seen since the last reset.
    pub items: u64,
    /// Highest sequence seen (a full sync's base counts as seen).
    pub max_seq: u64,
    /// Full syncs started so far (each may redefine sequences above its base).
    pub resets: u64,
}

impl Stream {
    /// For a volume of `sectors` sectors.
    pub fn new(sectors: usize) -> Stream {
        Stream {
            per_sector: vec![Vec::new(); sectors],
            deps: BTreeMap::new(),
            fingerprints: BTreeMap::new(),
            items: 0,
            max_seq: 0,
            resets: 0,
        }
    }

    /// A full sync starts after `base`: sequences above it are (re)defined from now on (a
    /// primary that crashed may reuse numbers it had sent before; its full sync makes the
    /// receiver forget them). What came up to `base` stays: the start message may be lost
    /// with its link and the sync then resumes as ordinary items.
    pub fn reset(&mut self, base: u64) {
        self.max_seq = base;
        self.resets += 1;
        for v in &mut self.per_sector {
            v.retain(|x| x.seq <= base);
        }
        self.deps.retain(|&s, _| s <= base);
        self.fingerprints.retain(|&s, _| s <= base);
    }

    /// A resync starts after `base` from a source whose sectors may hold any of
    /// `baseline[s]` (its image, or a local write still in flight there). The target ends
    /// up with those contents wherever the resync does not rewrite a sector, so everything
    /// up to `base` is redefined as that baseline: a resync that leaves out a sector where
    /// the two differ is then caught by the prefix check.
    pub fn rebase(&mut self, base: u64, baseline: &[Vec<Content>]) {
        self.reset(base);
        for (s, alts) in baseline.iter().enumerate() {
            let h = &mut self.per_sector[s];
            h.clear();
            for &c in alts {
                h.push(StreamVersion {
                    seq: base,
                    content: c,
                });
            }
        }
        self.deps.retain(|&s, _| s > base);
    }

    /// An item left the primary. `contents` gives the content of each sector it covers
    /// (empty for a flush). A resend must be identical; a sequence number used again for
    /// something else (without a full sync in between) is a violation.
    pub fn item(
        &mut self,
        seq: u64,
        dep: u64,
        first: usize,
        contents: &[Content],
        fingerprint: u64,
    ) -> Result<(), Violation> {
        if let Some(&fp) = self.fingerprints.get(&seq) {
            if fp != fingerprint {
                return Err(violation(
                    "stream-seq-reused",
                    format!("sequence {seq} was sent again with different content"),
                ));
            }
            return Ok(());
        }
        self.fingerprints.insert(seq, fingerprint);
        self.deps.insert(seq, dep);
        self.max_seq = self.max_seq.max(seq);
        self.items += 1;
        for (i, &c) in contents.iter().enumerate() {
            let h = &mut self.per_sector[first + i];
            if h.last().is_some_and(|l| l.seq > seq) {
                return Err(violation(
                    "stream-order",
                    format!(
                        "sequence {seq} for sector {} sent after a later one",
                        first + i
                    ),
                ));
            }
            h.push(StreamVersion { seq, content: c });
        }
        Ok(())
    }

    /// The recorded versions of sector `s`, for messages.
    fn describe(&self, s: usize) -> String {
        let v: Vec<String> = self.per_sector[s]
            .iter()
            .map(|v| format!("{}={:?}", v.seq, v.content))
            .collect();
        v.join(" ")
    }

    /// Newest item for sector `s` with a sequence `<= upto`.
    fn latest(&self, s: usize, upto: u64) -> Option<u64> {
        self.per_sector[s]
            .iter()
            .rev()
            .find(|v| v.seq <= upto)
            .map(|v| v.seq)
    }

    /// Sequences whose content sector `s` may be holding: `(lowest, highest)`; `(0, 0)` when
    /// it holds nothing sent since the reset (its content from before).
    fn interpret(&self, s: usize, c: Content) -> (u64, u64) {
        let mut lo = None;
        let mut hi = 0;
        for v in &self.per_sector[s] {
            if v.content == c {
                lo.get_or_insert(v.seq);
                hi = v.seq;
            }
        }
        (lo.unwrap_or(0), hi)
    }

    /// The secondary holds `image` (sector contents) and reports everything `<= applied`
    /// applied. Its image must be explainable as the stream applied in order: every item
    /// `<= applied`, and every item that a visible item depends on, must be visible unless
    /// overwritten by a later one.
    pub fn check_prefix(&self, contents: &[Content], applied: u64) -> Result<(), Violation> {
        let mut horizon = applied;
        let mut why = String::from("the applied watermark");
        let mut why_sector = None;
        let mut hi = Vec::with_capacity(contents.len());
        for (s, &c) in contents.iter().enumerate() {
            if c == Content::Garbage {
                return Err(violation(
                    "replica-garbage",
                    format!("sector {s} of the replica holds bytes no client wrote there"),
                ));
            }
            let (lo, h) = self.interpret(s, c);
            if lo > 0 {
                let dep = self.deps.get(&lo).copied().unwrap_or(0);
                if dep > horizon {
                    horizon = dep;
                    why = format!("sector {s} holding sequence {lo} (which depends on {dep})");
                    why_sector = Some(s);
                }
            }
            hi.push(h);
        }
        for (s, &h) in hi.iter().enumerate() {
            if let Some(need) = self.latest(s, horizon) {
                if need > h {
                    return Err(violation(
                        "replica-prefix",
                        format!(
                            "sector {s} holds {:?} (newest matching sequence {h}) but sequence \
                             {need} must be visible: required by {why}, horizon {horizon}; \
                             history of sector {s}: {}{}",
                            contents[s],
                            self.describe(s),
                            why_sector
                                .map(|w| format!("; history of sector {w}: {}", self.describe(w)))
                                .unwrap_or_default()
                        ),
                    ));
                }
            }
        }
        Ok(())
    }

    /// After a crash the replica must still hold everything `<= durable` (what it recorded
    /// as durable in its metadata).
    pub fn check_durable(&self, contents: &[Content], durable: u64) -> Result<(), Violation> {
        for (s, &c) in contents.iter().enumerate() {
            if let Some(need) = self.latest(s, durable) {
                let (_, h) = self.interpret(s, c);
                if need > h {
                    return Err(violation(
                        "replica-durability",
                        format!(
                            "after a crash sector {s} holds {c:?} (sequence {h}) but the \
                             replica had recorded everything up to {durable} as durable, \
                             including sequence {need}"
                        ),
                    ));
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_check_catches_a_missing_dependency() {
        let mut st = Stream::new(2);
        st.item(1, 0, 0, &[Content::Op(10)], 1).unwrap();
        st.item(2, 1, 1, &[Content::Op(11)], 2).unwrap();
        // Both applied: fine. Only the first: fine. Only the second: its dependency is missing.
        st.check_prefix(&[Content::Op(10), Content::Op(11)], 2)
            .unwrap();
        st.check_prefix(&[Content::Op(10), Content::Zero], 1)
            .unwrap();
        assert!(st
            .check_prefix(&[Content::Zero, Content::Op(11)], 0)
            .is_err());
        // The watermark says 2 is applied, but sector 1 does not show it.
        assert!(st
            .check_prefix(&[Content::Op(10), Content::Zero], 2)
            .is_err());
        // Reuse of a sequence for other content.
        assert!(st.item(2, 1, 1, &[Content::Op(12)], 3).is_err());
        st.item(2, 1, 1, &[Content::Op(11)], 2).unwrap();
    }

    #[test]
    fn op_floors() {
        let mut ops = Ops::new(1);
        ops.accepted(5, 0, 1, false);
        ops.accepted(7, 0, 1, true);
        assert!(ops.at_least(0, Content::Op(5), 5));
        assert!(!ops.at_least(0, Content::Op(5), 7));
        assert!(ops.at_least(0, Content::Zero, 7));
        assert!(!ops.at_least(0, Content::Op(6), 0), "never written there");
        assert!(!ops.at_least(0, Content::Garbage, 0));
    }
}
