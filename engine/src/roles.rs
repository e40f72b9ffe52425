//! Role changes. A planned promote is confirmed by the peer before it takes effect: the
//! node asks (`PromoteRequest`), the peer answers only while it is secondary and not being
//! promoted itself, and from its answer on counts the asker as primary. Two nodes that each
//! still believe the other secondary (a link broken but not yet detected) can therefore
//! never both become primary: neither gets an answer. Demote needs no confirmation.

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
}

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
        let peer = match self.promote_check(force) {
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
        });
        self.send(Msg::PromoteRequest { nonce });
        None
    }

    /// Whether this node may become primary now; the peer's state as last heard.
    fn promote_check(&self, force: bool) -> Result<Hello, AdminError> {
        if self.shutting_down.is_some() {
            return Err(err("shutting_down", "the daemon is shutting down".into()));
        }
        let Some(peer) = self
            .peer
            .clone()
            .filter(|_| self.conn_state != ConnState::Connecting)
        else {
            if force {
                return Err(err(
                    "not_supported",
                    "promote --force without a connected peer is not implemented yet \
                     (forced takeover comes with generations and bitmaps)"
                        .into(),
                ));
            }
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
        let fresh_pair = self.meta.generation == 0 && peer.generation == 0;
        if !fresh_pair {
            // A peer that needs a full sync anyway has nothing this node lacks.
            // A crashed primary's own sequence is stale (a primary records it only now and
            // then) but its disk holds everything it acknowledged; the full sync it owes
            // its peer makes them identical.
            let behind =
                self.applied < peer.applied_seq && !peer.needs_full_sync && !self.crashed_primary;
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
            if self.needs_full_sync() && !self.crashed_primary {
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
        let result = match self.promote_check(false) {
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
            .is_some_and(|p| self.now.saturating_sub(p.since) > PROMOTE_TIMEOUT_NS)
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
        self.streaming = false;
        if fresh_pair {
            self.meta.generation = new_generation;
            self.peer_needs_full_sync = true;
        }
        if self.crashed_primary {
            self.peer_needs_full_sync = true;
            self.crashed_primary = false;
        }
        self.meta.set(FLAG_CLEAN, false);
        self.persist_meta();
        let msg = format!(
            "promoted to primary by operator{}",
            if fresh_pair {
                " (first primary of a new pair: initial full sync to the peer)"
            } else {
                ""
            }
        );
        self.event("role", msg.clone());
        self.send(Msg::Hello(self.hello()));
        self.start_streaming();
        msg
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
        // Shipping is a primary's job: what the peer lacks it gets from the next primary.
        self.streaming = false;
        if self.resync.take().is_some() {
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
        self.meta.set(FLAG_CLEAN, true);
        self.checkpoint();
        self.event("role", "demoted to secondary by operator".into());
        self.send(Msg::Hello(self.hello()));
        Ok("demoted to secondary".into())
    }
}
