//! The ublk frontend inside the event loop.
//!
//! Every tag's FETCH_REQ / COMMIT_AND_FETCH_REQ lives in the loop's own ring, so this
//! thread is the daemon task of every queue (6.12 binds a queue to the task that fetched
//! its tags; one task may serve several queues). A fetched request becomes an engine input
//! exactly as an NBD request does; the engine's completion goes back as the next
//! COMMIT_AND_FETCH_REQ of the tag. Control commands that block (START_DEV,
//! END_USER_RECOVERY, STOP_DEV) run on the `ublk-ctl` helper while this loop keeps serving.
//!
//! Stopping: a demote or a stop first checks that the device is not in use (mounted);
//! a stop then runs STOP_DEV (the loop answers the requests it holds meanwhile; the
//! kernel then aborts every fetch) and only afterwards shuts the engine down.

use super::{Loop, Op};
use crate::control::ControlCall;
use crate::ublk::device;
use crate::ublk::helper::{Done, HelperLink, Job};
use crate::ublk::queue::{IoQueues, TagState};
use crate::ublk::request::{self, Request};
use crate::ublk::sys::{UBLK_IO_RES_ABORT, UBLK_IO_RES_OK};
use blkrep_common::control::{ControlError, Request as CtlRequest};
use blkrep_engine::{AlignedBuf, IoError, ReqId, Role};
use bytes::Bytes;
use std::collections::HashMap;

/// Engine request ids of ublk requests have this bit set; the low bits are
/// `queue << 16 | tag` (a tag has at most one request in flight).
pub(super) const UBLK_REQ: ReqId = 1 << 63;

/// Where the device is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// Tags fetched; START_DEV / END_USER_RECOVERY running.
    Starting,
    /// Taken over after a crash of a primary's daemon: the kernel holds the I/O (queued
    /// and re-issued requests) until this node is primary again, so that no write fails
    /// with EPERM meanwhile.
    Held,
    /// Serving.
    Live,
    /// STOP_DEV running.
    Stopping,
    /// Stopped (or never started): no more requests.
    Stopped,
}

/// The ublk device as the loop sees it.
pub struct UblkFrontend {
    queues: IoQueues,
    dev_id: u32,
    recovered: bool,
    phase: Phase,
    link: HelperLink,
    /// Demotes and stops waiting for the in-use check, by token.
    gated: HashMap<u64, ControlCall>,
    next_token: u64,
    /// The stop request to hand to the engine once STOP_DEV is done.
    shutdown: Option<ControlCall>,
    /// Why the device could not be started: the daemon stops and exits with it.
    failure: Option<String>,
}

impl UblkFrontend {
    /// A device whose tags are about to be fetched; `hold` keeps a recovered device's
    /// I/O in the kernel until this node is primary.
    pub fn new(
        queues: IoQueues,
        dev_id: u32,
        recovered: bool,
        hold: bool,
        link: HelperLink,
    ) -> Self {
        UblkFrontend {
            queues,
            dev_id,
            recovered,
            phase: if hold { Phase::Held } else { Phase::Starting },
            link,
            gated: HashMap::new(),
            next_token: 1,
            shutdown: None,
            failure: None,
        }
    }

    /// `/dev/ublkbN` while it exists and serves or holds I/O.
    pub fn device(&self) -> Option<String> {
        matches!(self.phase, Phase::Held | Phase::Live | Phase::Stopping)
            .then(|| device::block_path(self.dev_id))
    }

    /// The phase, for `status`.
    pub fn state(&self) -> &'static str {
        match self.phase {
            Phase::Starting => "starting",
            Phase::Held => "held",
            Phase::Live => "live",
            Phase::Stopping => "stopping",
            Phase::Stopped => "stopped",
        }
    }

    /// Why the device could not be started, if it could not.
    pub fn failure(&self) -> Option<&str> {
        self.failure.as_deref()
    }

    /// No command of any tag is left in the kernel.
    pub fn quiet(&self) -> bool {
        self.queues.live_tags() == 0
    }

    fn send(&self, job: Job) {
        if self.link.jobs.send(job).is_err() {
            tracing::error!("ublk: the ublk-ctl helper thread is gone");
        }
    }
}

fn verb(r: &CtlRequest) -> &'static str {
    match r {
        CtlRequest::Demote => "demote",
        _ => "stop",
    }
}

fn req_id(q: u16, tag: u16) -> ReqId {
    UBLK_REQ | (q as u64) << 16 | tag as u64
}

impl Loop {
    /// Fetch every tag from this thread, then let the helper start (or finish recovering)
    /// the device — unless its I/O is held until this node is primary.
    pub(super) fn ublk_start(&mut self) {
        let Some(u) = self.ublk.as_mut() else {
            return;
        };
        let mut sqes = Vec::new();
        for q in 0..u.queues.queues() {
            for tag in 0..u.queues.depth() {
                sqes.push((q, tag, u.queues.io_sqe(q, tag, None)));
            }
        }
        for (q, tag, e) in sqes {
            let key = self.alloc_op(Op::Ublk { q, tag });
            self.push(e.user_data(key as u64));
        }
        // Issue the fetches now, from this thread: it becomes every queue's daemon task.
        if let Err(e) = self.ring.submit() {
            tracing::error!("ublk: submitting the fetches: {e}");
        }
        let u = self.ublk.as_mut().expect("ublk");
        let path = device::block_path(u.dev_id);
        if u.phase == Phase::Held {
            tracing::warn!(
                "ublk: {path} recovered after a crash of this primary's daemon: its I/O waits \
                 in the kernel until this node is promoted again (blkrep promote)"
            );
        } else {
            u.send(Job::Start {
                recovery: u.recovered,
            });
        }
    }

    /// After every engine input: release a held device once this node is primary.
    pub(super) fn ublk_after_feed(&mut self) {
        if let Some(u) = self.ublk.as_mut() {
            if u.phase == Phase::Held && self.vol.role() == Role::Primary {
                tracing::info!(
                    "ublk: primary again: releasing the held I/O of {}",
                    device::block_path(u.dev_id)
                );
                u.phase = Phase::Starting;
                u.send(Job::Start { recovery: true });
            }
        }
    }

    /// A FETCH / COMMIT_AND_FETCH of tag `tag` of queue `q` completed.
    pub(super) fn ublk_io_done(&mut self, q: u16, tag: u16, res: i32) {
        let size = self.vol.volume_size();
        let stopped = self.vol.is_stopped();
        let Some(u) = self.ublk.as_mut() else {
            return;
        };
        if res != UBLK_IO_RES_OK {
            if res != UBLK_IO_RES_ABORT {
                tracing::error!(
                    "ublk: command of queue {q} tag {tag} failed: {}",
                    std::io::Error::from_raw_os_error(-res)
                );
            }
            u.queues.set_state(q, tag, TagState::Dead);
            return;
        }
        let iod = u.queues.descriptor(q, tag);
        let r = match Request::parse(&iod, size, u.queues.buf_len()) {
            Ok(r) => r,
            Err(errno) => {
                tracing::warn!("ublk: refusing request {iod:?}: errno {errno}");
                return self.ublk_commit(q, tag, -errno);
            }
        };
        u.queues.set_state(q, tag, TagState::Serving(r));
        if stopped {
            return self.ublk_commit(q, tag, -libc::ESHUTDOWN);
        }
        let queues = &u.queues;
        let input = r.input(req_id(q, tag), |n| {
            AlignedBuf::copy_from(&queues.buf(q, tag)[..n]).freeze()
        });
        self.feed(input);
    }

    /// The engine completed ublk request `req`: commit it and fetch the tag's next one.
    pub(super) fn ublk_complete(&mut self, req: ReqId, result: Result<Option<Bytes>, IoError>) {
        let (q, tag) = ((req >> 16) as u16, req as u16);
        let Some(u) = self.ublk.as_mut() else {
            return;
        };
        let TagState::Serving(r) = u.queues.state(q, tag) else {
            tracing::error!("ublk: completion for queue {q} tag {tag}, which serves nothing");
            return;
        };
        let res = match (r, result) {
            (Request::Read { len, .. }, Ok(Some(data))) if data.len() == len as usize => {
                u.queues.buf_mut(q, tag)[..data.len()].copy_from_slice(&data);
                r.done_result()
            }
            (Request::Read { .. }, Ok(_)) => -libc::EIO,
            (_, Ok(_)) => r.done_result(),
            (_, Err(e)) => request::error_result(e),
        };
        self.ublk_commit(q, tag, res);
    }

    fn ublk_commit(&mut self, q: u16, tag: u16, res: i32) {
        let Some(u) = self.ublk.as_mut() else {
            return;
        };
        let e = u.queues.io_sqe(q, tag, Some(res));
        let key = self.alloc_op(Op::Ublk { q, tag });
        self.push(e.user_data(key as u64));
    }

    /// Answers from the helper thread.
    pub(super) fn ublk_drain(&mut self) {
        while let Some(done) = self.ublk.as_ref().and_then(|u| u.link.done.try_recv().ok()) {
            let u = self.ublk.as_mut().expect("ublk");
            let path = device::block_path(u.dev_id);
            match done {
                Done::Started(Ok(())) => {
                    u.phase = Phase::Live;
                    tracing::info!("ublk: serving {path}");
                    self.tracking.add_frontend(std::path::Path::new(&path));
                }
                Done::Started(Err(e)) => {
                    tracing::error!("ublk: cannot start {path}: {e}");
                    u.failure = Some(format!("cannot start {path}: {e}"));
                    self.ublk_stop(None);
                }
                Done::Idle { token, busy } => {
                    let Some(call) = u.gated.remove(&token) else {
                        continue;
                    };
                    if let Some(why) = busy {
                        tracing::warn!("ublk: refusing to {}: {why}", verb(&call.req));
                        let _ = call.reply.send(Err(ControlError::new("device_busy", &why)));
                    } else if call.req == CtlRequest::Shutdown {
                        self.ublk_stop(Some(call));
                    } else {
                        self.admin_call(call);
                    }
                }
                Done::Stopped(r) => {
                    match r {
                        Ok(()) => tracing::info!("ublk: stopped {path}"),
                        Err(e) => tracing::error!("ublk: {e}"),
                    }
                    u.phase = Phase::Stopped;
                    let call = u.shutdown.take().unwrap_or_else(|| {
                        let (reply, _) = crossbeam_channel::bounded(1);
                        ControlCall {
                            req: CtlRequest::Shutdown,
                            reply,
                            who: Some("the ublk device's removal".into()),
                        }
                    });
                    self.admin_call(call);
                }
            }
        }
    }

    /// STOP_DEV, then hand `call` (a stop) to the engine.
    fn ublk_stop(&mut self, call: Option<ControlCall>) {
        let Some(u) = self.ublk.as_mut() else {
            return;
        };
        u.phase = Phase::Stopping;
        u.shutdown = call;
        u.send(Job::Stop);
    }

    /// Demotes and stops of a primary wait for the in-use check; a stop then waits for
    /// STOP_DEV. Returns the call when it may go to the engine now.
    pub(super) fn ublk_gate(&mut self, c: ControlCall) -> Option<ControlCall> {
        let primary = self.vol.role() == Role::Primary;
        let Some(u) = self.ublk.as_mut() else {
            return Some(c);
        };
        let gate = match (&c.req, u.phase) {
            (_, Phase::Stopped) => false,
            (CtlRequest::Shutdown, Phase::Stopping) => {
                let _ = c
                    .reply
                    .send(Ok(serde_json::json!({ "message": "shutting down" })));
                return None;
            }
            (CtlRequest::Shutdown, _) => true,
            (CtlRequest::Demote, _) => primary,
            _ => false,
        };
        if !gate {
            return Some(c);
        }
        let token = u.next_token;
        u.next_token += 1;
        u.gated.insert(token, c);
        u.send(Job::CheckIdle { token });
        None
    }
}
