//! `blkrep failback --plan`: what the next connection will move, in which direction, and
//! how much — computed from this node's state and the peer's last hello, before anything
//! moves.

use crate::generations::Relation;
use crate::handshake::has_data;
use crate::types::Role;
use crate::volume::Volume;
use serde::{Deserialize, Serialize};

/// Which way data will flow.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    /// This node is the source; the peer is overwritten where it differs.
    LocalToPeer,
    /// The peer is the source; this node is overwritten where it differs.
    PeerToLocal,
    /// Nothing to move (in sync, or no primary to move from).
    None,
    /// Both sides took writes separately: an operator must choose (`resolve`).
    SplitBrain,
    /// The peer has not been heard from since this daemon started.
    Unknown,
}

/// How the data will move.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Method {
    /// Nothing to move.
    InSync,
    /// The replication stream resumes where the target stopped.
    Stream,
    /// The whole volume is copied.
    FullSync,
    /// Only the blocks either side changed (both dirty sets) are copied.
    Resync,
    /// Waits for `blkrep resolve`.
    OperatorDecision,
    /// Not known until the peer is heard from.
    Unknown,
}

/// The plan.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    /// The peer's node name, when it was heard from.
    pub peer: Option<String>,
    /// True while the peer is connected.
    pub peer_connected: bool,
    /// This node's role.
    pub role: Role,
    /// This node's generation.
    pub local_generation: u64,
    /// The peer's generation, as last heard.
    pub peer_generation: Option<u64>,
    /// How the two relate.
    pub relation: Option<Relation>,
    /// Which way data flows.
    pub direction: Direction,
    /// How.
    pub method: Method,
    /// Bytes to move (an upper bound; 0 when unknown or nothing).
    pub bytes: u64,
    /// The same in blocks of `block_size`.
    pub blocks: u64,
    /// Block size of the count.
    pub block_size: u64,
    /// The peer was last heard as primary: the blocks it changed on its own (its
    /// activity log) are not counted yet; they are added when it reconnects.
    pub peer_dirty_unknown: bool,
    /// One sentence for a person.
    pub summary: String,
}

/// Block size plans count in.
pub const PLAN_BLOCK: u64 = 4096;

impl Volume {
    /// What the next connection moves (see the module documentation).
    pub fn plan(&self) -> Plan {
        let mut p = Plan {
            peer: self.last_peer.as_ref().map(|h| h.node.clone()),
            peer_connected: self.peer.is_some(),
            role: self.role,
            local_generation: self.meta.generation,
            peer_generation: self.last_peer.as_ref().map(|h| h.generation),
            relation: self.relation,
            direction: Direction::Unknown,
            method: Method::Unknown,
            bytes: 0,
            blocks: 0,
            block_size: PLAN_BLOCK,
            peer_dirty_unknown: false,
            summary: String::new(),
        };
        let Some(peer) = self.last_peer.as_ref() else {
            p.summary = "the peer has not been heard from since this daemon started; the \
                         plan is known once it connects"
                .into();
            return p;
        };
        let size = self.cfg.volume_size;
        let rel = self.relation.unwrap_or(Relation::Same);
        if rel == Relation::Diverged && has_data(peer.disk_state) && has_data(self.disk_state) {
            p.direction = Direction::SplitBrain;
            p.method = Method::OperatorDecision;
            p.bytes = size;
            p.summary = format!(
                "split brain: this node (generation {:016x}) and {} (generation {:016x}) both \
                 took writes after they separated. Nothing moves until `blkrep resolve \
                 --discard-local` runs on the node whose changes are given up; that node then \
                 receives a full sync of {size} bytes",
                self.meta.generation, peer.node, peer.generation
            );
            return p;
        }
        let local_source = match rel {
            Relation::PeerBehind => true,
            Relation::PeerAhead => false,
            _ if self.role == Role::Primary => true,
            _ if peer.role == Role::Primary => false,
            _ => {
                p.direction = Direction::None;
                p.method = Method::InSync;
                p.summary = format!(
                    "both nodes are secondary on the same generation; whichever is promoted \
                     becomes the source (this node's position {}, {}'s {})",
                    self.applied, peer.node, peer.applied_seq
                );
                return p;
            }
        };
        let (target_needs_full, target_name) = if local_source {
            (
                peer.needs_full_sync || !self.dirty.is_empty() || !peer.dirty.is_empty(),
                peer.node.clone(),
            )
        } else {
            (self.needs_full_sync(), self.cfg.node.clone())
        };
        p.direction = if local_source {
            Direction::LocalToPeer
        } else {
            Direction::PeerToLocal
        };
        let same_line = rel == Relation::Same
            || local_source && Some(peer.generation) == self.bumped_from && peer.generation != 0;
        let whole = peer.generation == 0
            || self.meta.generation == 0
            || peer.disk_state == crate::types::DiskState::Failed
            || self.disk_state == crate::types::DiskState::Failed;
        if target_needs_full || !same_line {
            // Both dirty sets, as the resync will take them (the source adds its queue).
            let mut set = self.dirty.clone();
            // A peer last heard as secondary reported its own dirty set; one last heard as
            // primary reports it only when it returns (its activity log: at most a few
            // extents of what it wrote last).
            if peer.role == Role::Secondary {
                for &(s, e) in &peer.dirty {
                    set.insert(s, e.min(size));
                }
            } else {
                p.peer_dirty_unknown = true;
            }
            if local_source {
                for q in self.queue.iter().filter(|q| q.item.seq > self.peer_durable) {
                    if let Some((s, e)) = q.item.range() {
                        set.insert(s, e);
                    }
                }
            }
            p.bytes = if whole { size } else { set.bytes().min(size) };
            p.method = if p.bytes >= size {
                Method::FullSync
            } else {
                Method::Resync
            };
        } else if local_source {
            let (_, lag_bytes, _) = self.lag();
            p.method = if lag_bytes == 0 && self.peer_applied >= self.last_seq {
                Method::InSync
            } else {
                Method::Stream
            };
            p.bytes = lag_bytes;
        } else {
            p.method = Method::Stream;
        }
        p.blocks = p.bytes.div_ceil(PLAN_BLOCK);
        let from = if local_source {
            self.cfg.node.clone()
        } else {
            peer.node.clone()
        };
        let extra = if p.peer_dirty_unknown {
            " (plus the blocks the peer reports as possibly changed on its side when it \
             reconnects: at most its activity log's extents)"
        } else {
            ""
        };
        p.summary = match p.method {
            Method::Resync => format!(
                "{from} -> {target_name}: resync of the changed blocks only, {} bytes ({} \
                 blocks of {PLAN_BLOCK}){extra}; {target_name} is Inconsistent until it completes",
                p.bytes, p.blocks
            ),
            Method::FullSync => format!(
                "{from} -> {target_name}: full sync of {} bytes ({} blocks of {PLAN_BLOCK}); \
                 {target_name} is Inconsistent until it completes",
                p.bytes, p.blocks
            ),
            Method::Stream if local_source => format!(
                "{from} -> {target_name}: the stream resumes; {} bytes queued for the peer",
                p.bytes
            ),
            Method::Stream => format!(
                "{from} -> {target_name}: the stream resumes from this node's position {}",
                self.applied
            ),
            _ => format!("{from} -> {target_name}: in sync, nothing to move"),
        };
        p
    }
}
