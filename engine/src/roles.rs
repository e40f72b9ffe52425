//! Role changes. A planned promote is confirmed by the peer before it takes effect: the
//! node asks (`PromoteRequest`), the peer answers only while it is secondary and not being
//! promoted itself, and from its answer on counts the asker as primary. Two nodes that each
//! still believe the other secondary (a link broken but not yet detected) can therefore
//! never both become primary: neither gets an answer. Demote needs no confirmation.

use crate::generations::Relation;
use crate::handshake::has_data;
use crate::meta::FLAG_CLEAN;
use crate::msg::{Hello, Msg};
use crate::types::*;
use crate::volume::*;

/// A promote waiting for the peer's answer.
#[derive(Debug)]
pub(crate) struct PendingPromote {
    pub token: u64,
    pub nonce: u64,
    pub new_generation: u64,
    pub since: u64,
    /// The peer confirmed; the disk is being flushed before the role is taken.
    pub granted: bool,
    /// A forced takeover (no peer to ask): a new generation once the flush is done.
    pub forced: bool,
}

/// How far a forced takeover's stream starts above this node's last position.
const FORCED_SEQ_GAP: u64 = 1 << 32;

/// How long a promote waits for the peer's answer, nanoseconds.
const PROMOTE_TIMEOUT_NS: u64 = 10_000_000_000;

impl Volume {
    /// `None`: asked the peer; the answer comes with its reply.
    pub(crate) fn promote(
        &mut self,
        token: u64,
        force: bool,
        new_generation: u64,
    ) -> Option<Result<String, AdminError>> {
        if self.role == Role::Primary {
            return Some(Ok("already primary".into()));
        }
        if self.pending_promote.is_some() {
            return Some(Err(err(
                "busy",
                "a promote is already waiting for the peer's answer".into(),
            )));
        }
        let connected = self.peer.is_some()
            && !matches!(
                self.conn_state,
                ConnState::Connecting | ConnState::Refused | ConnState::Disconnected
            );
        if force && !connected {
            return self.forced_promote(token, new_generation);
        }
        let peer = match self.promote_check() {
            Ok(p) => p,
            Err(e) => return Some(Err(e)),
        };
        if crate::bugs::on(crate::bugs::Bug::PromoteUnconfirmed) {
            return Some(Ok(self.become_primary(peer, new_generation)));
        }
        self.promote_nonce += 1;
        let nonce = self.promote_nonce;
        self.pending_promote = Some(PendingPromote {
            token,
            nonce,
            new_generation,
            since: self.now,
            granted: false,
            forced: false,
        });
        self.send(Msg::PromoteRequest { nonce });
        None
    }

    /// Whether this node may become primary now; the peer's state as last heard.
    fn promote_check(&self) -> Result<Hello, AdminError> {
        if self.shutting_down.is_some() {
            return Err(err("shutting_down", "the daemon is shutting down".into()));
        }
        let Some(peer) = self
            .peer
            .clone()
            .filter(|_| self.conn_state != ConnState::Connecting)
        else {
            return Err(err(
                "peer_not_connected",
                "the peer is not connected; a planned promote needs it (wait, or use --force \
                 when the primary site is lost)"
                    .into(),
            ));
        };
        if self.conn_state == ConnState::Refused {
            return Err(err(
                "refused",
                format!(
                    "the connection to the peer was refused: {}",
                    self.refused_reason.clone().unwrap_or_default()
                ),
            ));
        }
        if peer.role == Role::Primary {
            return Err(err(
                "peer_is_primary",
                format!(
                    "peer {} is primary; demote it first (exactly one primary)",
                    peer.node
                ),
            ));
        }
        if self.relation == Some(Relation::PeerAhead) && has_data(peer.disk_state) {
            return Err(err(
                "not_up_to_date",
                format!(
                    "peer {} holds newer data (generation {:016x}, this node {:016x}); promote \
                     the peer, or discard its data first",
                    peer.node, peer.generation, self.meta.generation
                ),
            ));
        }
        let fresh_pair = self.meta.generation == 0 && peer.generation == 0;
        if !fresh_pair {
            // A peer that needs a full sync anyway has nothing this node lacks.
            // A crashed primary's own sequence is stale (a primary records it only now and
            // then) but its disk holds everything it acknowledged; the full sync it owes
            // its peer makes them identical.
            // Sequence numbers compare only along one generation: a node on a newer
            // generation is ahead whatever its numbers say.
            let behind = self.relation == Some(Relation::Same)
                && self.applied < peer.applied_seq
                && !peer.needs_full_sync
                && !self.crashed_primary;
            // Items received and not yet applied would collide with the sequence numbers
            // this node hands out as primary: drain them first.
            if behind || self.applier.issued > 0 || !self.applier.pending.is_empty() {
                return Err(err(
                    "busy",
                    format!(
                        "still catching up: applied {} of the peer's {}",
                        self.applied, peer.applied_seq
                    ),
                ));
            }
            // ...unless its disk failed: then it holds nothing (sim seed 495: a diskless
            // primary that lost its link and crashed was promoted on its failed disk).
            let crashed_with_data = self.crashed_primary && self.disk_state != DiskState::Failed;
            if self.needs_full_sync() && !crashed_with_data {
                return Err(err(
                    "not_up_to_date",
                    format!(
                        "this node's disk is {:?}; promote the peer, which holds the data",
                        self.disk_state
                    ),
                ));
            }
        }
        Ok(peer)
    }

    /// The peer wants to become primary.
    pub(crate) fn on_promote_request(&mut self, nonce: u64) {
        let deny = if self.role == Role::Primary {
            Some("this node is primary")
        } else if self.pending_promote.is_some() {
            Some("this node is being promoted itself")
        } else if self.shutting_down.is_some() {
            Some("this node is shutting down")
        } else {
            None
        };
        if let Some(reason) = deny {
            self.send(Msg::PromoteDeny {
                nonce,
                reason: reason.into(),
            });
            return;
        }
        // From this answer on the peer counts as primary here, so this node cannot be
        // promoted as well until the peer says otherwise or the link is lost.
        let name = match self.peer.as_mut() {
            Some(p) => {
                p.role = Role::Primary;
                p.node.clone()
            }
            None => return,
        };
        self.event(
            "role",
            format!("peer {name} is becoming primary (confirmed)"),
        );
        // The peer applied everything this node issued (its promote checks that) and makes
        // it durable before taking the role: nothing here is missing there any more.
        // (Not after a crash here: this node may have lost writes the peer holds.)
        let peer_has_all = self.relation == Some(Relation::Same)
            && !self.crashed_primary
            && self.disk_state == DiskState::UpToDate
            && self
                .peer
                .as_ref()
                .is_some_and(|p| p.applied_seq >= self.applied.max(self.last_seq));
        if peer_has_all && !(self.dirty.is_empty() && self.hot.is_empty()) {
            self.dirty = crate::dirty::BlockSet::new(self.dirty.block());
            self.dirty_gen += 1;
            self.hot.clear();
            self.persist_meta();
        }
        self.send(Msg::PromoteGrant { nonce });
    }

    /// The peer answered our promote request.
    pub(crate) fn on_promote_answer(&mut self, nonce: u64, answer: Result<(), String>) {
        if self
            .pending_promote
            .as_ref()
            .is_none_or(|p| p.nonce != nonce || p.granted)
        {
            return; // an answer to a request given up already
        }
        match answer {
            Ok(()) => {
                // What this node applied as a secondary may sit in its disk's cache. Make
                // it durable before serving as primary: a crash of the new primary must not
                // lose writes its old primary had flushed (its image would become the
                // truth its peer is resynced from).
                self.pending_promote.as_mut().expect("pending").granted = true;
                self.issue(Purpose::PromoteFlush, DiskKind::Flush);
            }
            Err(reason) => {
                let p = self.pending_promote.take().expect("pending promote");
                self.emit(Output::AdminDone {
                    token: p.token,
                    result: Err(err(
                        "peer_refused",
                        format!("the peer refused the promote: {reason}"),
                    )),
                });
            }
        }
    }

    /// The flush before taking the primary role completed.
    pub(crate) fn promote_flush_done(&mut self, result: Result<Option<bytes::Bytes>, IoError>) {
        if !self.pending_promote.as_ref().is_some_and(|p| p.granted) {
            return; // given up meanwhile (link lost, timeout, shutdown)
        }
        if let Err(e) = result {
            self.disk_failed("the flush before promotion", e);
            self.fail_pending_promote("disk_failed", "the disk failed while preparing the promote");
            return;
        }
        self.flushed = self.flushed.max(self.applied);
        let p = self.pending_promote.take().expect("pending promote");
        if p.forced {
            let msg = self.become_forced_primary(p.new_generation);
            self.emit(Output::AdminDone {
                token: p.token,
                result: Ok(msg),
            });
            return;
        }
        let result = match self.promote_check() {
            Ok(peer) => Ok(self.become_primary(peer, p.new_generation)),
            Err(e) => {
                // The peer counts us as primary now: correct that.
                self.send(Msg::Hello(self.hello()));
                Err(e)
            }
        };
        self.emit(Output::AdminDone {
            token: p.token,
            result,
        });
    }

    /// Give up a pending promote (link lost, timeout, shutdown).
    pub(crate) fn fail_pending_promote(&mut self, code: &'static str, why: &str) {
        if let Some(p) = self.pending_promote.take() {
            // If the peer had confirmed meanwhile, our hello tells it we are not primary.
            self.send(Msg::Hello(self.hello()));
            self.emit(Output::AdminDone {
                token: p.token,
                result: Err(err(code, why.into())),
            });
        }
    }

    /// Time out a promote whose answer does not come.
    pub(crate) fn promote_tick(&mut self) {
        if self
            .pending_promote
            .as_ref()
            .is_some_and(|p| !p.forced && self.now.saturating_sub(p.since) > PROMOTE_TIMEOUT_NS)
        {
            self.fail_pending_promote("timeout", "the peer did not answer the promote request");
        }
    }

    /// The peer confirmed: take the role.
    fn become_primary(&mut self, peer: Hello, new_generation: u64) -> String {
        let fresh_pair = self.meta.generation == 0 && peer.generation == 0;
        self.role = Role::Primary;
        self.disk_state = DiskState::UpToDate;
        self.last_seq = self
            .applied
            .max(self.last_received)
            .max(peer.applied_seq)
            .max(peer.received_seq);
        self.completed_max = self.last_seq;
        self.stream_base = self.last_seq;
        self.reset_local_watermarks();
        self.streaming = false;
        if fresh_pair {
            // The peer (generation 0) gets a full sync: a copy, or a checksum pass.
            self.meta.generation = new_generation;
        }
        // A crashed primary's possibly unshipped writes are in its dirty set (its activity
        // log's extents): the resync to the peer covers them. The numbers it handed out
        // before the crash are not reused: its new stream starts far above.
        let replayed = self.take_journal_replay(peer.applied_seq.max(peer.received_seq));
        if self.crashed_primary && !replayed {
            self.last_seq += FORCED_SEQ_GAP;
            self.completed_max = self.last_seq;
            self.stream_base = self.last_seq;
            self.reset_local_watermarks();
        }
        self.crashed_primary = false;
        self.gen_shared = true;
        self.bumped_from = None;
        if replayed {
            // The generation this node left by writing without the peer before its crash:
            // a peer still on it holds a prefix of the journal's stream.
            self.bumped_from = self.meta.history.first().copied().filter(|&g| g != 0);
        }
        self.announce_primary(format!(
            "promoted to primary by operator{}",
            if fresh_pair {
                " (first primary of a new pair: initial full sync to the peer)"
            } else {
                ""
            }
        ))
    }

    /// The last step of every promote: record the role (streaming and client writes wait
    /// for that metadata write, see `role_meta_after`), log it, tell the peer, stream.
    fn announce_primary(&mut self, msg: String) -> String {
        self.meta.set(FLAG_CLEAN, false);
        self.role_meta_after = Some(self.meta.counter);
        self.persist_meta();
        self.event("role", msg.clone());
        self.send(Msg::Hello(self.hello()));
        self.start_streaming();
        msg
    }

    /// Forced takeover: become primary without the peer (its site is lost). Checks, then
    /// the same flush as a planned promote, then [`Volume::become_forced_primary`].
    fn forced_promote(
        &mut self,
        token: u64,
        new_generation: u64,
    ) -> Option<Result<String, AdminError>> {
        if self.shutting_down.is_some() {
            return Some(Err(err(
                "shutting_down",
                "the daemon is shutting down".into(),
            )));
        }
        let roll_back = !has_data(self.disk_state) && self.undo_can_roll_back();
        if self.undo_meta_override().is_some() {
            return Some(Err(err(
                "busy",
                "a protected catch-up is starting (its image is being made durable); retry in \
                 a moment"
                    .into(),
            )));
        }
        if !has_data(self.disk_state) && !roll_back {
            return Some(Err(err(
                "no_usable_data",
                format!(
                    "this node's disk is {:?}: it holds no usable image to take over with",
                    self.disk_state
                ),
            )));
        }
        if self.applier.issued > 0 {
            return Some(Err(err(
                "busy",
                format!(
                    "{} replicated writes are still being applied; retry in a moment",
                    self.applier.issued
                ),
            )));
        }
        // Items received and not applied are beyond this node's consistent prefix: the
        // takeover happens at the prefix (they are what the lost site's RPO loses).
        let dropped = self.applier.pending.len();
        self.applier.pending.clear();
        self.applier.done_above.clear();
        if dropped > 0 {
            self.event(
                "takeover",
                format!("{dropped} received but unapplied writes are dropped by the takeover"),
            );
        }
        self.promote_nonce += 1;
        self.pending_promote = Some(PendingPromote {
            token,
            nonce: self.promote_nonce,
            new_generation,
            since: self.now,
            granted: true,
            forced: true,
        });
        if roll_back {
            // The catch-up under way is undone first; its last step issues the flush below.
            self.undo_start_rollback();
        } else {
            self.issue(Purpose::PromoteFlush, DiskKind::Flush);
        }
        None
    }

    /// Take the primary role on our own: a new generation, and the peer (whenever it comes
    /// back) is behind and is resynced from this node.
    fn become_forced_primary(&mut self, new_generation: u64) -> String {
        let old = self.meta.generation;
        // After this node's own crash (not a takeover) its journal continues its stream:
        // it keeps the generation, and its first write without the peer starts a new one
        // that the peer, still on this one, resumes from by sequence.
        let replayed = self.take_journal_replay(0);
        if !replayed {
            self.meta.new_generation(new_generation);
            self.recompute_relation();
            // The lost primary may have numbered items beyond anything this node received;
            // the new line starts far above, so no number means two things (the generations
            // already keep the lines apart; this keeps logs and positions unambiguous).
            self.last_seq = self.applied.max(self.last_received) + FORCED_SEQ_GAP;
            self.completed_max = self.last_seq;
            self.stream_base = self.last_seq;
            self.reset_local_watermarks();
            self.queue.clear();
            self.queue_bytes = 0;
            self.journal_release_all();
            self.crashed_primary = false;
        }
        self.role = Role::Primary;
        self.disk_state = DiskState::UpToDate;
        self.streaming = false;
        self.gen_shared = replayed;
        self.bumped_from = None;
        let rolled_back = if std::mem::take(&mut self.undo.just_rolled_back) {
            format!(
                " after rolling back the catch-up to sequence {}",
                self.applied
            )
        } else {
            String::new()
        };
        self.announce_primary(if replayed {
            format!(
                "promoted to primary without the peer after a crash of this node: its journal \
                 is replayed to the peer when it returns (generation {old:016x} kept)"
            )
        } else {
            format!(
                "forced takeover: promoted to primary without the peer; new generation {:016x} \
                 (was {old:016x}){}; the peer is resynced from this node when it returns",
                self.meta.generation, rolled_back
            )
        })
    }

    /// `blkrep resolve --discard-local`: this node gives up its own data line.
    pub(crate) fn resolve_discard_local(&mut self) -> Result<String, AdminError> {
        if self.role == Role::Primary {
            return Err(err(
                "wrong_role",
                "this node is primary; demote it first (its data is about to be discarded)".into(),
            ));
        }
        if self.pending_promote.is_some() {
            return Err(err("busy", "a promote is in progress".into()));
        }
        let old = self.meta.generation;
        let was_split = self.split_brain;
        // Step back to the newest generation both sides share: the peer is then ahead, and
        // resyncs the blocks either side changed since (both dirty sets). Without a shared
        // one, generation 0: behind anyone, a full sync.
        let peer_line: Vec<u64> = self
            .last_peer
            .as_ref()
            .map(|p| {
                std::iter::once(p.generation)
                    .chain(p.history.iter().copied())
                    .collect()
            })
            .unwrap_or_default();
        let common = self
            .meta
            .history
            .iter()
            .copied()
            .find(|g| *g != 0 && peer_line.contains(g))
            .unwrap_or(0);
        self.meta.new_generation(common);
        self.meta.history.retain(|&g| g != common);
        if self.disk_state != DiskState::Inconsistent {
            // A disk in the middle of a resync stays Inconsistent (its undo log, if any, can
            // still take it back to the image from before it).
            self.disk_state = DiskState::Outdated;
        }
        self.crashed_primary = false;
        self.split_brain = false;
        self.refused_reason = None;
        if self.conn_state == ConnState::Refused {
            self.conn_state = ConnState::Disconnected;
        }
        self.recompute_relation();
        self.persist_meta();
        let msg = format!(
            "local changes discarded by operator{}: generation {old:016x} given up (back to \
             {common:016x}); this node is Outdated and takes the peer's data by a resync on the \
             next connect ({})",
            if was_split {
                " (split brain resolved)"
            } else {
                ""
            },
            if common == 0 {
                "the whole volume"
            } else {
                "the blocks either side changed"
            }
        );
        self.event("resolve", msg.clone());
        self.send(Msg::Hello(self.hello()));
        Ok(msg)
    }

    pub(crate) fn demote(&mut self) -> Result<String, AdminError> {
        if self.role == Role::Secondary {
            return Ok("already secondary".into());
        }
        let busy = self.pending.len() + self.blocked.len() + self.stalled.len();
        if busy > 0 {
            return Err(err(
                "busy",
                format!("{busy} client writes still in flight; retry when they complete"),
            ));
        }
        self.role = Role::Secondary;
        self.role_meta_after = None;
        if self.disk_state == DiskState::Diskless {
            // Its local disk missed every write made diskless: it holds no usable image
            // (sim seed 479: a demoted diskless primary was resynced as if it had one).
            self.disk_state = DiskState::Failed;
            for (_, req) in std::mem::take(&mut self.remote_reads) {
                self.emit(Output::Complete {
                    req,
                    result: Err(IoError::Io),
                });
            }
        }
        // The blocks of an abandoned resync stay dirty until a new one moves them.
        self.resync_items.clear();
        // Shipping is a primary's job: what the peer lacks it gets from the next primary.
        self.streaming = false;
        if self.resync.take().is_some() {
            // A checksum full sync's comparison pass goes with it (sim seed 4864).
            self.abort_verify("the full sync was abandoned by a demote");
            self.event(
                "resync",
                "full sync abandoned by the demote: the peer stays Inconsistent until the next \
                 primary syncs it"
                    .into(),
            );
            if self.conn_state == ConnState::SyncSource {
                self.conn_state = ConnState::Connected;
            }
        }
        self.applied = self.last_seq;
        self.last_received = self.last_seq;
        // What the peer may not hold durably is kept as dirty blocks; the activity log's
        // job (tracking a primary's writes) ends here.
        self.fold_queue_into_dirty();
        self.hot.clear();
        self.meta.set(FLAG_CLEAN, true);
        self.checkpoint();
        self.event("role", "demoted to secondary by operator".into());
        self.send(Msg::Hello(self.hello()));
        Ok("demoted to secondary".into())
    }
}
