//! Diskless mode: a primary whose local disk failed (both legs) goes on through its peer
//! when `diskless_on_failure` is set and the peer holds every block (connected, streaming,
//! up to date, nothing in the dirty set). Writes are shipped as always and complete once
//! the peer has applied them (sync semantics whatever the mode); reads are sent to the
//! peer, which serves each once it has applied every item submitted before it. If the link
//! is lost, nothing holds the data here: waiting requests fail and the disk is `Failed`.

use crate::msg::Msg;
use crate::types::*;
use crate::volume::*;
use bytes::Bytes;

impl Volume {
    /// The local disk failed: may this node go on diskless?
    pub(crate) fn can_go_diskless(&self) -> bool {
        self.cfg.diskless_on_failure
            && self.role == Role::Primary
            && self.streaming
            && self.resync.is_none()
            && self.dirty.is_empty()
            && self.peer.as_ref().is_some_and(|p| {
                matches!(p.disk_state, DiskState::UpToDate | DiskState::Consistent)
            })
    }

    /// Go diskless after `what` failed on the backing.
    pub(crate) fn go_diskless(&mut self, what: &str, e: IoError) {
        self.disk_state = DiskState::Diskless;
        self.abort_verify("the local disk failed");
        self.event(
            "failure",
            format!(
                "{what} failed on the backing ({e}): no local disk is left; this primary goes \
                 on diskless, serving reads and writes through {} (on_io_error = \"diskless\")",
                self.peer.as_ref().map_or("the peer", |p| p.node.as_str())
            ),
        );
        // The metadata says Failed: after a restart the local disk has missed writes.
        self.persist_meta();
    }

    /// A client read on a diskless primary: ask the peer.
    pub(crate) fn remote_read(&mut self, req: ReqId, offset: u64, len: u64) {
        let id = self.next_remote_read;
        self.next_remote_read += 1;
        self.remote_reads.insert(id, req);
        self.send(Msg::ReadRequest {
            id,
            offset,
            len,
            after: self.last_seq,
        });
    }

    /// The peer's answer to a remote read.
    pub(crate) fn on_read_reply(&mut self, id: u64, data: Option<Bytes>) {
        let Some(req) = self.remote_reads.remove(&id) else {
            return;
        };
        match data {
            Some(d) => {
                self.client_reads += 1;
                self.bytes_read += d.len() as u64;
                self.emit(Output::Complete {
                    req,
                    result: Ok(Some(d)),
                });
            }
            None => self.emit(Output::Complete {
                req,
                result: Err(IoError::Io),
            }),
        }
    }

    /// The link is gone while diskless: nothing holds the data here any more.
    pub(crate) fn diskless_link_lost(&mut self) {
        if self.disk_state != DiskState::Diskless {
            return;
        }
        self.disk_state = DiskState::Failed;
        self.event(
            "failure",
            "the link to the peer is lost while diskless: no data is reachable; the volume \
             fails (requests waiting for the peer get I/O errors)"
                .into(),
        );
        for (_, req) in std::mem::take(&mut self.remote_reads) {
            self.emit(Output::Complete {
                req,
                result: Err(IoError::Io),
            });
        }
        let waiting: Vec<ReqId> = self.wait_peer.values().copied().collect();
        for req in waiting {
            if let Some(p) = self.pending.get_mut(&req) {
                p.error = Some(IoError::Io);
            }
        }
        self.persist_meta();
    }

    /// Secondary: the diskless primary wants a read.
    pub(crate) fn on_read_request(&mut self, id: u64, offset: u64, len: u64, after: Seq) {
        let usable = self.role == Role::Secondary
            && matches!(self.disk_state, DiskState::UpToDate | DiskState::Consistent)
            && offset
                .checked_add(len)
                .is_some_and(|end| end <= self.cfg.volume_size)
            && offset.is_multiple_of(self.cfg.sector)
            && len.is_multiple_of(self.cfg.sector)
            && len > 0
            && len <= 32 << 20;
        if !usable {
            self.send(Msg::ReadReply { id, data: None });
            return;
        }
        self.peer_reads.push((id, offset, len, after));
        self.issue_peer_reads();
    }

    /// Issue the peer's reads whose preceding items are applied.
    pub(crate) fn issue_peer_reads(&mut self) {
        if self.peer_reads.is_empty() {
            return;
        }
        let applied = self.applied;
        let (ready, wait): (Vec<_>, Vec<_>) = std::mem::take(&mut self.peer_reads)
            .into_iter()
            .partition(|r| r.3 <= applied);
        self.peer_reads = wait;
        for (id, offset, len, _) in ready {
            self.issue(Purpose::PeerRead { id }, DiskKind::Read { offset, len });
        }
    }

    /// A read for the diskless peer completed.
    pub(crate) fn peer_read_done(&mut self, id: u64, result: Result<Option<Bytes>, IoError>) {
        match result {
            Ok(data) => self.send(Msg::ReadReply { id, data }),
            Err(e) => {
                self.send(Msg::ReadReply { id, data: None });
                self.disk_failed("a read for the diskless peer", e);
            }
        }
    }
}
