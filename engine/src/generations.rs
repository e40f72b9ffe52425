//! Data generations: how two nodes tell, on every connect, whose data is newer.
//!
//! A generation is a random id naming a line of history of the volume's data. A node
//! starts a new one when its data may diverge from its peer's: a forced takeover, the first
//! primary of a fresh pair, and a primary's first write while its peer is not receiving
//! the stream. The generation it leaves goes to the front of its history. A secondary that
//! follows a primary adopts the primary's generation (its data is a prefix of that line).
//!
//! Comparing two nodes' (current, history) pairs gives exactly one answer:
//! - the same current generation: the same line; the stream position decides the rest;
//! - the peer's current generation is in this node's history: the peer stopped on a line
//!   this node continued — the peer is behind and is resynced from this node;
//! - the reverse: this node is behind;
//! - neither: both continued a common line separately (both took writes on their own) —
//!   split brain, which only an operator resolves (`blkrep resolve --discard-local`).
//!
//! A node that never held data (generation 0) is behind anyone.

use serde::{Deserialize, Serialize};

/// How the peer's data relates to this node's.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Relation {
    /// Same generation.
    Same,
    /// The peer's data is an older state of this node's line: resync peer from here.
    PeerBehind,
    /// This node's data is an older state of the peer's line: resync from the peer.
    PeerAhead,
    /// Both took writes separately since a common ancestor (or share no history at all).
    Diverged,
}

/// Compare this node's generation and history with the peer's.
pub fn relate(mine: u64, my_history: &[u64], theirs: u64, their_history: &[u64]) -> Relation {
    if mine == theirs {
        Relation::Same
    } else if theirs == 0 || my_history.contains(&theirs) {
        Relation::PeerBehind
    } else if mine == 0 || their_history.contains(&mine) {
        Relation::PeerAhead
    } else {
        Relation::Diverged
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_four_answers() {
        assert_eq!(relate(0, &[], 0, &[]), Relation::Same);
        assert_eq!(relate(5, &[1], 5, &[1]), Relation::Same);
        assert_eq!(relate(5, &[1], 0, &[]), Relation::PeerBehind);
        assert_eq!(relate(0, &[], 5, &[]), Relation::PeerAhead);
        // Forced takeover at B (1 -> 2) while A stayed on 1.
        assert_eq!(relate(2, &[1], 1, &[]), Relation::PeerBehind);
        assert_eq!(relate(1, &[], 2, &[1]), Relation::PeerAhead);
        // Both wrote separately after 1.
        assert_eq!(relate(2, &[1], 3, &[1]), Relation::Diverged);
        assert_eq!(relate(3, &[1], 2, &[1]), Relation::Diverged);
        // Unrelated histories.
        assert_eq!(relate(7, &[], 9, &[]), Relation::Diverged);
    }
}
