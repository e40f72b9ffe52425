//! Connection life cycle: the engine-level hello exchange and what each side decides.

use crate::generations::{relate, Relation};
use crate::msg::{Hello, Msg, ENGINE_PROTOCOL_VERSION};
use crate::types::*;
use crate::volume::*;

impl Volume {
    pub(crate) fn peer_connected(&mut self, conn: ConnId) {
        if let Some(old) = self.conn {
            self.emit(Output::Close {
                conn: old,
                reason: "replaced by a newer connection".into(),
            });
            self.peer_closed(old);
        }
        self.conn = Some(conn);
        self.conn_state = ConnState::Connecting;
        self.peer = None;
        self.last_recv_ns = self.now;
        self.last_ack = (0, 0);
        self.send(Msg::Hello(self.hello()));
    }

    pub(crate) fn peer_msg(&mut self, conn: ConnId, msg: Msg) {
        if self.conn != Some(conn) {
            return; // a message from a connection already given up
        }
        self.last_recv_ns = self.now;
        if self.conn_state == ConnState::Connecting
            && !matches!(msg, Msg::Hello(_) | Msg::Goodbye { .. })
        {
            self.protocol_error("peer sent data before its hello".into());
            return;
        }
        match msg {
            Msg::Hello(h) => self.on_hello(h),
            Msg::Item(item) => self.on_item(item),
            Msg::Ack { applied, durable } => self.on_ack(applied, durable),
            Msg::ResyncStart {
                total_bytes,
                base_seq,
                generation,
            } => self.on_resync_start(total_bytes, base_seq, generation),
            Msg::ResyncDone { seq, generation } => self.on_resync_done(seq, generation),
            Msg::Ping { nonce } => self.send(Msg::Pong { nonce }),
            Msg::Pong { .. } => {}
            Msg::Goodbye { reason } => {
                self.event("disconnect", format!("peer says goodbye: {reason}"))
            }
            Msg::PromoteRequest { nonce } => self.on_promote_request(nonce),
            Msg::PromoteGrant { nonce } => self.on_promote_answer(nonce, Ok(())),
            Msg::PromoteDeny { nonce, reason } => self.on_promote_answer(nonce, Err(reason)),
            Msg::VerifyReport { seq, bad } => self.on_verify_report(seq, bad),
            Msg::ReadRequest {
                id,
                offset,
                len,
                after,
            } => self.on_read_request(id, offset, len, after),
            Msg::ReadReply { id, data } => self.on_read_reply(id, data),
        }
    }

    fn on_hello(&mut self, h: Hello) {
        if h.version != ENGINE_PROTOCOL_VERSION {
            return self.refuse(format!(
                "peer {} speaks engine protocol {}, this node {}",
                h.node, h.version, ENGINE_PROTOCOL_VERSION
            ));
        }
        if h.resource != self.cfg.resource {
            return self.refuse(format!(
                "peer serves resource {:?}, this node {:?}",
                h.resource, self.cfg.resource
            ));
        }
        if h.node == self.cfg.node {
            return self.refuse(format!("peer claims this node's own name {:?}", h.node));
        }
        if h.volume_size != self.cfg.volume_size {
            return self.refuse(format!(
                "volume size differs: peer {} has {} bytes, this node {}",
                h.node, h.volume_size, self.cfg.volume_size
            ));
        }
        let first = self.conn_state == ConnState::Connecting;
        let peer_role = h.role;
        let peer_needs_full_sync = h.needs_full_sync;
        let peer_failed = h.disk_state == DiskState::Failed;
        let node = h.node.clone();
        let rel = relate(
            self.meta.generation,
            &self.meta.history,
            h.generation,
            &h.history,
        );
        let peer_gen = h.generation;
        let peer_has_data = has_data(h.disk_state);
        self.relation = Some(rel);
        self.last_peer = Some(h.clone());
        if rel == Relation::Diverged && peer_has_data && has_data(self.disk_state) {
            self.split_brain = true;
            return self.refuse(format!(
                "split brain: this node (generation {:016x}) and peer {node} (generation \
                 {peer_gen:016x}) both took writes after they separated; no data moves until \
                 an operator chooses: run `blkrep resolve --discard-local` on the node whose \
                 changes are to be discarded (`blkrep failback --plan` shows both sides)",
                self.meta.generation
            ));
        }
        self.split_brain = false;
        if peer_role == Role::Primary {
            // Tell a primary where this node stands on every hello from it, even if that
            // did not move: a new primary releases what it resends from its journal on
            // this ack (an ack sent while it was still being promoted went unheard; sim
            // seed 1787).
            self.last_ack = (Seq::MAX, Seq::MAX);
        }
        self.peer = Some(h);
        if first {
            self.connects += 1;
            self.conn_state = ConnState::Connected;
            self.refused_reason = None;
            self.event(
                "connect",
                format!("connected to peer {node} ({peer_role:?})"),
            );
        }
        match (self.role, peer_role) {
            (Role::Primary, Role::Primary) => self.refuse(format!(
                "split brain: both this node and peer {node} are primary; demote one of them \
                 (its writes since they split will have to be discarded)"
            )),
            (Role::Primary, Role::Secondary) if rel == Relation::PeerAhead && peer_has_data => self
                .refuse(format!(
                    "peer {node} holds newer data (generation {peer_gen:016x}) than this \
                     primary ({:016x}): demote this node and promote the peer, or discard the \
                     peer's data with `blkrep resolve --discard-local` on it",
                    self.meta.generation
                )),
            (Role::Secondary, Role::Primary)
                if rel == Relation::PeerBehind && has_data(self.disk_state) =>
            {
                self.refuse(format!(
                    "this node holds newer data (generation {:016x}) than primary {node} \
                     ({peer_gen:016x}): demote the peer and promote this node, or run \
                     `blkrep resolve --discard-local` here to take the peer's data",
                    self.meta.generation
                ))
            }
            (Role::Primary, Role::Secondary) => {
                let restart = peer_failed || (self.resync.is_none() && peer_needs_full_sync);
                if self.streaming && restart {
                    // The peer lost its data mid-stream (its disk failed): start over.
                    self.event(
                        "resync",
                        format!("peer {node} reports it needs a full sync"),
                    );
                    self.begin_resync(peer_failed);
                } else {
                    self.start_streaming();
                }
            }
            (Role::Secondary, Role::Primary) => {
                // Our own outgoing queue (left over from before a demote) is obsolete now:
                // the peer only promoted after applying all of it.
                self.streaming = false;
                self.queue.clear();
                self.queue_bytes = 0;
                self.journal_release_all();
            }
            (Role::Secondary, Role::Secondary) => {}
        }
    }

    /// Compare generations with the peer again (after this node's generation changed).
    pub(crate) fn recompute_relation(&mut self) {
        if let Some(p) = self.last_peer.as_ref() {
            self.relation = Some(relate(
                self.meta.generation,
                &self.meta.history,
                p.generation,
                &p.history,
            ));
        }
    }

    /// Refuse the peer: record why, tell it, close.
    pub(crate) fn refuse(&mut self, reason: String) {
        let Some(conn) = self.conn else { return };
        // The link retries every few seconds: log a refusal once, not at every retry.
        if self.refused_reason.as_ref() != Some(&reason) {
            self.event("refused", format!("connection refused: {reason}"));
        }
        self.send(Msg::Goodbye {
            reason: reason.clone(),
        });
        self.emit(Output::Close {
            conn,
            reason: reason.clone(),
        });
        self.peer_closed(conn);
        self.conn_state = ConnState::Refused;
        self.refused_reason = Some(reason);
    }

    /// The peer broke the protocol: log and close (the link will be re-established).
    pub(crate) fn protocol_error(&mut self, reason: String) {
        let Some(conn) = self.conn else { return };
        self.event("protocol", reason.clone());
        self.emit(Output::Close { conn, reason });
        self.peer_closed(conn);
    }

    pub(crate) fn peer_closed(&mut self, conn: ConnId) {
        if self.conn != Some(conn) {
            return;
        }
        self.conn = None;
        self.peer = None;
        self.streaming = false;
        if self.conn_state != ConnState::Refused {
            self.conn_state = ConnState::Disconnected;
            self.event("disconnect", "peer disconnected".into());
        }
        for q in self.queue.iter_mut() {
            q.sent = false;
        }
        if let Some(r) = self.resync.as_mut() {
            r.done_sent = false;
        }
        // A forced promote does not need the peer (it may be rolling back a catch-up).
        if !self.pending_promote.as_ref().is_some_and(|p| p.forced) {
            self.fail_pending_promote(
                "peer_not_connected",
                "the link to the peer was lost during the promote",
            );
        }
        self.abort_verify("the link to the peer was lost");
        self.verify_items.clear();
        self.peer_reads.clear();
        self.diskless_link_lost();
        // Sync mode degrades: writes waiting for the peer complete on the local leg alone,
        // their items stay queued for the next connection.
        self.release_waiters();
    }
}

/// A disk state whose data a node would defend against being overwritten.
pub(crate) fn has_data(d: DiskState) -> bool {
    matches!(d, DiskState::UpToDate | DiskState::Consistent)
}
