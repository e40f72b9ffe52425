//! The daemon's event loop: one thread, one io_uring, driving the engine.
//!
//! Everything that moves bytes in the data path goes through the ring: NBD client sockets
//! (recv of requests, sendmsg of replies), the backing device and metadata (O_DIRECT
//! reads/writes, fallocate, fdatasync), and the replication link (recv into the frame
//! decoder, sendmsg of encoded frames with payloads referenced, not copied). Helper threads
//! only accept connections and run handshakes; they hand finished sockets over through
//! channels and wake the ring through an eventfd.
//!
//! The loop decides nothing about replication: it turns ring completions and socket input
//! into engine inputs and carries the engine's outputs out. The ublk frontend's I/O
//! commands live in the same ring (`ublk_io.rs`).

mod drill_io;
mod legs_io;
mod nbd_io;
mod ublk_io;
pub use drill_io::DrillSetup;
pub use ublk_io::UblkFrontend;

use crate::backend::{DiskIo, MetaArea, Step};
use crate::control::ControlCall;
use crate::link::LinkConn;
use crate::nbd::handshake::ExportInfo;
use crate::nbd::transmission::RequestParser;
use crate::sendq::SendQueue;
use crate::wake::Waker;
use blkrep_common::control::{ControlError, DaemonStatus, LinkError, Request};
use blkrep_engine::{
    AdminCmd, ConnId, DiskKind, DiskOp, Input, IoError, OpId, Output, ReqId, Role, Volume,
};
use blkrep_transport::codec::{self, Decoder};
use io_uring::{opcode, types, IoUring};
use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

/// An NBD client connection after negotiation, handed over by an accept thread.
pub struct NbdHandoff {
    pub fd: OwnedFd,
    pub export: ExportInfo,
}

/// Channels and flags shared with the helper threads.
pub struct Shared {
    pub waker: Waker,
    pub nbd_rx: crossbeam_channel::Receiver<NbdHandoff>,
    pub link_rx: crossbeam_channel::Receiver<LinkConn>,
    pub ctl_rx: crossbeam_channel::Receiver<ControlCall>,
    /// True while a replication link is up (the connector dials only when false).
    pub linked: Arc<AtomicBool>,
    /// True while this node is not primary (new NBD exports are read-only).
    pub read_only: Arc<AtomicBool>,
    /// The last failed link attempt (refused or unreachable).
    pub last_link_error: crate::link::LastLinkError,
    /// This node's state for probes from the peer's `blkrep check` (refreshed every tick).
    pub published: crate::link::PublishedState,
    /// The node's event log.
    pub events: crate::events::EventLog,
    /// Alert thresholds.
    pub alerts: blkrep_common::config::Alerts,
}

/// Static facts for `status`.
pub struct Identity {
    pub resource: String,
    pub node: String,
    pub peer: String,
    pub peer_address: String,
    pub export: String,
    /// `"tls (...)"` or `"insecure"`.
    pub link_security: String,
    /// Compress shipped write payloads (LZ4).
    pub compress: bool,
}

const RING_ENTRIES: u32 = 1024;
/// Journal records smaller than this are written inline at the end of a loop iteration;
/// larger ones go through the ring (an io-wq worker copies them).
const INLINE_JOURNAL: usize = 64 << 10;
const TICK_NS: u32 = 100_000_000;
/// The engine's clock is refreshed at least this often while the loop is busy.
const CLOCK_RESOLUTION_NS: u64 = 1_000_000;
/// Receive buffer of an NBD connection (grown for larger writes).
const NBD_RBUF: usize = 256 << 10;
/// Requests one NBD connection may have in the engine before we stop reading from it.
const NBD_MAX_INFLIGHT: usize = 256;
const LINK_RECV: usize = 256 << 10;
/// How long a closing link may still send what is queued (a goodbye with the reason).
const LINK_LINGER: std::time::Duration = std::time::Duration::from_secs(1);

enum Op {
    Disk {
        op: OpId,
        io: Box<DiskIo>,
    },
    NbdRecv {
        key: usize,
        gen: u64,
    },
    NbdSend {
        key: usize,
        gen: u64,
        _iov: Box<Iov>,
    },
    LinkRecv {
        gen: u64,
    },
    LinkSend {
        gen: u64,
        _iov: Box<Iov>,
    },
    /// A request on a local leg (`inject`: the result an injected fault gives it).
    Leg {
        tag: legs_io::LegTag,
        leg: u8,
        io: Box<DiskIo>,
        inject: Option<i32>,
    },
    /// A ublk FETCH_REQ / COMMIT_AND_FETCH_REQ of one tag.
    Ublk {
        q: u16,
        tag: u16,
    },
    Wake,
    Timer,
}

/// iovecs and the msghdr pointing at them, kept alive until the send completes.
struct Iov {
    iov: Vec<libc::iovec>,
    hdr: libc::msghdr,
}

struct NbdConn {
    fd: OwnedFd,
    gen: u64,
    size: u64,
    read_only: bool,
    rbuf: Vec<u8>,
    rstart: usize,
    rend: usize,
    parser: RequestParser,
    recv_posted: bool,
    sendq: SendQueue,
    inflight: usize,
    closing: bool,
    ring_ops: usize,
}

struct Link {
    fd: OwnedFd,
    gen: ConnId,
    decoder: Decoder,
    /// TLS session and its receive buffer for ciphertext (None: an insecure link).
    tls: Option<Box<rustls::Connection>>,
    cipher: Vec<u8>,
    /// TLS: frames waiting to be encrypted. They are encrypted only as the socket takes
    /// the ciphertext (see `tls_fill`), so a backlog resent after an outage does not
    /// stall the loop while all of it is encrypted at once.
    plain: std::collections::VecDeque<bytes::Bytes>,
    recv_posted: bool,
    sendq: SendQueue,
    /// Closing: no more input is taken; what is queued (a goodbye) is still sent, until
    /// `LINK_LINGER` has passed.
    closing: Option<Instant>,
    /// The socket was shut down for writing too.
    shut: bool,
    ring_ops: usize,
}

struct ReqInfo {
    key: usize,
    gen: u64,
    handle: u64,
}

/// The event loop.
pub struct Loop {
    // Dropped first: no command may still reference the buffers of the fields below.
    ring: IoUring,
    ublk: Option<UblkFrontend>,
    vol: Volume,
    /// The local legs (the volume's storage) and their requests.
    legs: crate::legs::Legs,
    legio: legs_io::LegIo,
    meta: MetaArea,
    _journal: Option<std::fs::File>,
    journal_fd: RawFd,
    /// Small journal records waiting for the end of the loop iteration.
    journal_pending: Vec<(OpId, u64, Vec<bytes::Bytes>)>,
    ops: Vec<Option<Op>>,
    free_ops: Vec<usize>,
    nbd: Vec<Option<NbdConn>>,
    links: Vec<Link>,
    next_gen: u64,
    reqs: HashMap<ReqId, ReqInfo>,
    next_req: ReqId,
    admin: HashMap<u64, crossbeam_channel::Sender<Result<serde_json::Value, ControlError>>>,
    /// Operator commands in the engine: what was asked and by whom (for the event log).
    asked: HashMap<u64, (String, Option<String>)>,
    /// Alerts raised: name → (since, message).
    alerts: std::collections::BTreeMap<&'static str, (u64, String)>,
    /// Since when the link has been down (for the link_down alert).
    link_down_since: Option<Instant>,
    /// Since when the peer has lacked data (the oldest unacknowledged write, carried over
    /// when the ship queue overflows into the dirty set, which keeps no write times).
    unsynced_since: Option<Instant>,
    next_token: u64,
    shared: Shared,
    id: Identity,
    evbuf: Box<u64>,
    timer: Box<types::Timespec>,
    started: Instant,
    /// Bytes sent on replication links (after compression and encryption).
    link_bytes_sent: u64,
    last_tick_ns: u64,
    outs: Vec<Output>,
    scratch: Vec<u8>,
    iov_scratch: Vec<libc::iovec>,
    /// Stage latencies and the eBPF block-device histograms.
    tracking: crate::latency::Tracking,
    /// Where drills live (None: drills refused).
    drill_setup: Option<DrillSetup>,
    /// The drill under way.
    drill: Option<drill_io::Drill>,
    /// Writes, zeroings and discards of the backing in the ring (a drill's cut waits for
    /// none to be).
    backing_writes: usize,
}

impl Loop {
    /// A loop over an opened volume, with the ublk device to serve if the frontend is ublk.
    pub fn new(
        vol: Volume,
        legs: crate::legs::Legs,
        meta: MetaArea,
        journal: Option<std::fs::File>,
        shared: Shared,
        id: Identity,
        ublk: Option<UblkFrontend>,
    ) -> anyhow::Result<Loop> {
        let ring = build_ring()?;
        Ok(Loop {
            ring,
            ublk,
            vol,
            legs,
            legio: legs_io::LegIo::new(
                std::env::var("BLKREP_FAULT_INJECTION").as_deref() == Ok("1"),
            ),
            meta,
            journal_fd: journal.as_ref().map_or(-1, |f| f.as_raw_fd()),
            _journal: journal,
            journal_pending: Vec::new(),
            ops: Vec::new(),
            free_ops: Vec::new(),
            nbd: Vec::new(),
            links: Vec::new(),
            next_gen: 1,
            reqs: HashMap::new(),
            next_req: 1,
            admin: HashMap::new(),
            asked: HashMap::new(),
            alerts: Default::default(),
            link_down_since: Some(Instant::now()),
            unsynced_since: None,
            next_token: 1,
            shared,
            id,
            evbuf: Box::new(0),
            timer: Box::new(types::Timespec::new().nsec(TICK_NS)),
            started: Instant::now(),
            link_bytes_sent: 0,
            last_tick_ns: 0,
            outs: Vec::new(),
            scratch: Vec::new(),
            iov_scratch: Vec::new(),
            tracking: crate::latency::Tracking::stages_only("not started by this daemon"),
            drill_setup: None,
            drill: None,
            backing_writes: 0,
        })
    }

    /// Allow drills, with the clone's files at `setup`.
    pub fn with_drill(mut self, setup: DrillSetup) -> Loop {
        self.drill_setup = Some(setup);
        self
    }

    /// Track latency with `t` (the eBPF programs, if it attached them).
    pub fn with_tracking(mut self, t: crate::latency::Tracking) -> Loop {
        self.tracking = t;
        self
    }

    /// Run until the engine stops.
    pub fn run(mut self) -> anyhow::Result<()> {
        self.post_wake();
        self.post_timer();
        self.ublk_start();
        self.feed(Input::Tick { now_ns: 0 });
        let mut cqes: Vec<(u64, i32)> = Vec::with_capacity(RING_ENTRIES as usize);
        let mut stopped_at: Option<Instant> = None;
        loop {
            self.flush_journal();
            self.flush_sends();
            if self.vol.is_stopped() {
                // Give the goodbye a moment to leave, but never hang on a stalled peer.
                let t = *stopped_at.get_or_insert_with(Instant::now);
                let quiet = self
                    .links
                    .iter()
                    .all(|l| l.sendq.is_empty() && l.plain.is_empty())
                    && self.ublk.as_ref().is_none_or(|u| u.quiet());
                if quiet || t.elapsed() > LINK_LINGER {
                    break;
                }
            }
            match self.ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {}
                Err(e) => return Err(e.into()),
            }
            cqes.clear();
            cqes.extend(self.ring.completion().map(|c| (c.user_data(), c.result())));
            // Keep the engine's clock fresh (lag and RPO figures), not only every timer tick.
            let now = self.now_ns();
            if now.saturating_sub(self.last_tick_ns) >= CLOCK_RESOLUTION_NS {
                self.last_tick_ns = now;
                self.feed(Input::Tick { now_ns: now });
            }
            for &(ud, res) in &cqes {
                self.completion(ud as usize, res);
            }
        }
        self.drill_shutdown();
        self.legs_shutdown();
        tracing::info!("stopped");
        if let Some(f) = self.ublk.as_ref().and_then(|u| u.failure()) {
            anyhow::bail!("ublk: {f}");
        }
        Ok(())
    }

    // ------------------------------------------------------------ ring plumbing

    fn alloc_op(&mut self, op: Op) -> usize {
        if let Some(i) = self.free_ops.pop() {
            self.ops[i] = Some(op);
            i
        } else {
            self.ops.push(Some(op));
            self.ops.len() - 1
        }
    }

    fn push(&mut self, entry: io_uring::squeue::Entry) {
        loop {
            // SAFETY: every entry built in this file points only into memory owned by the
            // op table entry named by its user_data (boxed DiskIo, Iov, connection buffers
            // that are neither moved nor freed while `ring_ops` counts the op), or into
            // `evbuf`/`timer`, which live as long as the loop.
            let r = unsafe { self.ring.submission().push(&entry) };
            if r.is_ok() {
                return;
            }
            let _ = self.ring.submit();
        }
    }

    fn post_wake(&mut self) {
        let key = self.alloc_op(Op::Wake);
        let ptr = &mut *self.evbuf as *mut u64 as *mut u8;
        let e = opcode::Read::new(types::Fd(self.shared.waker.fd()), ptr, 8)
            .build()
            .user_data(key as u64);
        self.push(e);
    }

    fn post_timer(&mut self) {
        let key = self.alloc_op(Op::Timer);
        let e = opcode::Timeout::new(&*self.timer as *const types::Timespec)
            .build()
            .user_data(key as u64);
        self.push(e);
    }

    fn now_ns(&self) -> u64 {
        self.started.elapsed().as_nanos() as u64
    }

    fn completion(&mut self, key: usize, res: i32) {
        let Some(op) = self.ops.get_mut(key).and_then(|o| o.take()) else {
            return;
        };
        self.free_ops.push(key);
        match op {
            Op::Disk { op, mut io } => match io.complete(res, &mut self.meta) {
                Step::Again => {
                    let e = io.sqe(-1, self.meta.file.as_raw_fd(), self.journal_fd);
                    self.free_ops.pop();
                    self.ops[key] = Some(Op::Disk { op, io });
                    self.push(e.user_data(key as u64));
                }
                // Metadata and journal only: the volume's writes are leg groups (their
                // completion tells the drill gate).
                Step::Done(result) => self.feed(Input::DiskDone { op, result }),
            },
            Op::Leg {
                tag,
                leg,
                io,
                inject,
            } => self.leg_io_done(key, tag, leg, io, inject, res),
            Op::NbdRecv { key: c, gen } => self.nbd_recv_done(c, gen, res),
            Op::NbdSend { key: c, gen, .. } => self.nbd_send_done(c, gen, res),
            Op::LinkRecv { gen } => self.link_recv_done(gen, res),
            Op::LinkSend { gen, .. } => self.link_send_done(gen, res),
            Op::Ublk { q, tag } => self.ublk_io_done(q, tag, res),
            Op::Wake => {
                self.post_wake();
                self.drain_channels();
            }
            Op::Timer => {
                self.post_timer();
                let now = self.now_ns();
                self.feed(Input::Tick { now_ns: now });
                let st = self.vol.status();
                self.publish_state(&st);
                self.check_alerts(&st);
                self.reap_lingering_links();
                self.drill_tick();
                self.legs_tick();
            }
        }
    }

    /// Publish the summary a probe from the peer's `blkrep check` gets.
    fn publish_state(&mut self, st: &blkrep_engine::status::EngineStatus) {
        let v = serde_json::json!({
            "role": st.role,
            "disk_state": st.disk_state,
            "generation": st.generation,
            "history": st.history,
            "conn": st.conn,
            "applied_seq": st.applied_seq,
            "last_seq": st.last_seq,
            "acked_seq": st.acked_seq,
            "lag_seconds": st.lag_seconds,
            "published_ns": blkrep_transport::handshake::wall_ns(),
        });
        if let Ok(mut p) = self.shared.published.lock() {
            *p = v.to_string();
        }
    }

    // ------------------------------------------------------------ engine

    /// Hand one input to the engine and carry out what it says.
    /// Write the small journal records of this loop iteration: contiguous ones in one
    /// pwritev each (to the page cache: the journal is trusted after a crash of the
    /// daemon, not a power loss; a syscall here costs less than a trip through the ring
    /// and the io-wq worker a buffered write is punted to). Their completions may bring
    /// more records; those are written too before the ring is entered again.
    fn flush_journal(&mut self) {
        while !self.journal_pending.is_empty() {
            let batch = std::mem::take(&mut self.journal_pending);
            let mut done = Vec::with_capacity(batch.len());
            let mut i = 0;
            while i < batch.len() {
                let mut j = i + 1;
                let mut end = batch[i].1 + batch[i].2.iter().map(|p| p.len() as u64).sum::<u64>();
                while j < batch.len() && batch[j].1 == end && j - i < 256 {
                    end += batch[j].2.iter().map(|p| p.len() as u64).sum::<u64>();
                    j += 1;
                }
                let parts: Vec<&bytes::Bytes> = batch[i..j].iter().flat_map(|b| &b.2).collect();
                let result = pwritev_all(self.journal_fd, &parts, batch[i].1).map_err(|e| {
                    tracing::error!("journal write at {}: {e}", batch[i].1);
                    IoError::from_errno(e.raw_os_error().unwrap_or(libc::EIO))
                });
                for b in &batch[i..j] {
                    done.push((b.0, result.map(|_| None)));
                }
                i = j;
            }
            for (op, result) in done {
                self.feed(Input::DiskDone { op, result });
            }
        }
    }

    fn feed(&mut self, input: Input) {
        self.time_input(&input);
        let mut outs = std::mem::take(&mut self.outs);
        self.vol.handle(input, &mut outs);
        self.tracking
            .stages
            .admitted(self.vol.stalled_requests(), Instant::now());
        for o in outs.drain(..) {
            self.output(o);
        }
        self.outs = outs;
        self.shared
            .read_only
            .store(self.vol.role() != Role::Primary, Ordering::Relaxed);
        self.ublk_after_feed();
    }

    /// Start or end the stage timings an engine input concerns.
    fn time_input(&mut self, input: &Input) {
        use crate::latency::Stage;
        let now = Instant::now();
        let st = &mut self.tracking.stages;
        match input {
            Input::ClientRead { req, .. } => st.client_start(*req, Stage::ClientRead, false, now),
            Input::ClientWrite { req, .. }
            | Input::ClientWriteZeroes { req, .. }
            | Input::ClientTrim { req, .. } => st.client_start(*req, Stage::ClientWrite, true, now),
            Input::ClientFlush { req } => st.client_start(*req, Stage::ClientFlush, true, now),
            Input::DiskDone { op, .. } => st.disk_done(*op, now),
            Input::PeerMsg {
                msg: blkrep_engine::msg::Msg::Item(it),
                ..
            } if !it.resync => st.received(it.seq, now),
            Input::PeerMsg {
                msg: blkrep_engine::msg::Msg::Ack { applied, .. },
                ..
            } => st.acked(*applied, now),
            Input::PeerClosed { .. } => st.link_lost(),
            _ => {}
        }
    }

    /// Start or end the stage timings an engine output concerns.
    fn time_output(&mut self, o: &Output) {
        use crate::latency::Stage;
        let now = Instant::now();
        let st = &mut self.tracking.stages;
        match o {
            Output::Disk(d) => {
                let stage = match d.kind {
                    DiskKind::Read { .. } => Stage::BackingRead,
                    DiskKind::Write { .. }
                    | DiskKind::WriteZeroes { .. }
                    | DiskKind::Trim { .. } => Stage::BackingWrite,
                    DiskKind::Flush => Stage::BackingFlush,
                    DiskKind::JournalWrite { .. } => Stage::JournalAppend,
                    _ => return,
                };
                st.disk_start(d.op, stage, now);
            }
            Output::Send {
                msg: blkrep_engine::msg::Msg::Item(it),
                ..
            } if !it.resync => st.shipped(it.seq, now),
            Output::Send {
                msg: blkrep_engine::msg::Msg::Ack { applied, .. },
                ..
            } => st.applied(*applied, now),
            Output::Complete { req, .. } => st.client_done(*req, now),
            _ => {}
        }
    }

    fn output(&mut self, o: Output) {
        let Some(o) = self.drill_gate(o) else {
            return;
        };
        self.time_output(&o);
        match o {
            Output::Disk(DiskOp {
                op,
                kind: DiskKind::JournalWrite { pos, parts },
            }) if parts.iter().map(|p| p.len()).sum::<usize>() < INLINE_JOURNAL => {
                // A small journal record: written with the others of this loop iteration
                // in one pwritev at its end (see `flush_journal`).
                self.journal_pending.push((op, pos, parts));
            }
            Output::Disk(d) if legs_io::is_volume_op(&d.kind) => self.legs_submit(d.op, d.kind),
            Output::Disk(d) => self.disk_submit(d.op, d.kind),
            Output::Send { conn, msg } => {
                if let Some(l) = open_link(&mut self.links, conn) {
                    self.scratch.clear();
                    let opts = codec::EncodeOpts {
                        link_authenticated: l.tls.is_some(),
                        compress: self.id.compress,
                    };
                    let data = codec::encode_with(&msg, &mut self.scratch, opts);
                    match l.tls.as_deref_mut() {
                        None => {
                            l.sendq.push_copy(&self.scratch);
                            if let Some(d) = data {
                                l.sendq.push_shared(d);
                            }
                        }
                        Some(_) => {
                            l.plain
                                .push_back(bytes::Bytes::copy_from_slice(&self.scratch));
                            if let Some(d) = data {
                                l.plain.push_back(d);
                            }
                        }
                    }
                }
            }
            Output::Close { conn, reason } => {
                tracing::info!("closing replication link: {reason}");
                self.close_link(conn);
            }
            Output::Complete { req, result } => self.complete_client(req, result),
            Output::AdminDone { token, result } => {
                if let Some((what, who)) = self.asked.remove(&token) {
                    let outcome = match &result {
                        Ok(m) => Some(("info", format!("done: {m}"))),
                        // `blkrep promote` retries these while it waits: not worth a line each.
                        Err(e) if matches!(e.code, "peer_not_connected" | "busy") => None,
                        Err(e) => Some(("warning", format!("refused: {} ({})", e.message, e.code))),
                    };
                    if let Some((severity, outcome)) = outcome {
                        self.shared.events.log(
                            "operator",
                            severity,
                            format!("{what}: {outcome}"),
                            who,
                        );
                    }
                }
                if let Some(tx) = self.admin.remove(&token) {
                    let _ = tx.send(
                        result
                            .map(|m| serde_json::json!({ "message": m }))
                            .map_err(|e| ControlError::new(e.code, &e.message)),
                    );
                }
            }
            Output::Event(e) => {
                self.shared
                    .events
                    .log(e.kind, crate::events::severity_of(e.kind), e.message, None)
            }
            Output::Stopped => {}
        }
    }

    /// Submit a metadata or journal operation.
    fn disk_submit(&mut self, op: OpId, kind: DiskKind) {
        match DiskIo::new(kind, &self.meta) {
            Ok(io) => {
                let mut io = Box::new(io);
                let e = io.sqe(-1, self.meta.file.as_raw_fd(), self.journal_fd);
                let key = self.alloc_op(Op::Disk { op, io });
                self.push(e.user_data(key as u64));
            }
            Err(e) => {
                tracing::error!("cannot encode metadata: {e}");
                self.feed(Input::DiskDone {
                    op,
                    result: Err(IoError::Io),
                });
            }
        }
    }

    // ------------------------------------------------------------ helper threads

    fn drain_channels(&mut self) {
        while let Ok(h) = self.shared.nbd_rx.try_recv() {
            self.add_nbd(h);
        }
        while let Ok(l) = self.shared.link_rx.try_recv() {
            self.add_link(l);
        }
        while let Ok(c) = self.shared.ctl_rx.try_recv() {
            self.control(c);
        }
        self.ublk_drain();
    }

    fn control(&mut self, c: ControlCall) {
        if c.req == Request::Status {
            let _ = c.reply.send(Ok(self.status_json()));
            return;
        }
        if matches!(c.req, Request::Plan | Request::Latency) {
            self.admin_call(c);
            return;
        }
        match c.req {
            Request::Leg { .. } | Request::LegFault { .. } => return self.leg_control(c),
            Request::DrillStart => return self.drill_start(c),
            Request::DrillStop { ref outcome } => {
                let outcome = outcome.clone();
                return self.drill_stop(c, outcome);
            }
            _ => {}
        }
        if let Some(c) = self.ublk_gate(c) {
            self.admin_call(c);
        }
    }

    /// Hand an operator command to the engine; it answers through `c.reply`.
    fn admin_call(&mut self, c: ControlCall) {
        let cmd = match c.req {
            Request::Status => {
                let _ = c.reply.send(Ok(self.status_json()));
                return;
            }
            Request::Promote { force } => AdminCmd::Promote {
                force,
                new_generation: random_u64(),
            },
            Request::Demote => AdminCmd::Demote,
            Request::Shutdown => AdminCmd::Shutdown,
            Request::Resolve { discard_local } => {
                if !discard_local {
                    let _ = c.reply.send(Err(ControlError::new(
                        "bad_request",
                        "resolve needs --discard-local, run on the node whose changes are \
                         given up",
                    )));
                    return;
                }
                AdminCmd::ResolveDiscardLocal
            }
            Request::Plan => {
                let _ = c
                    .reply
                    .send(Ok(serde_json::to_value(self.vol.plan()).unwrap_or_default()));
                return;
            }
            Request::Latency => {
                let _ = c.reply.send(Ok(
                    serde_json::to_value(self.tracking.report()).unwrap_or_default()
                ));
                return;
            }
            Request::Verify { repair } => AdminCmd::Verify { repair },
            Request::DrillStart
            | Request::DrillStop { .. }
            | Request::Leg { .. }
            | Request::LegFault { .. } => {
                let _ = c.reply.send(Err(ControlError::new(
                    "bad_request",
                    "not an engine command",
                )));
                return;
            }
        };
        let token = self.next_token;
        self.next_token += 1;
        self.admin.insert(token, c.reply);
        let what = match &cmd {
            AdminCmd::Promote { force: true, .. } => "promote --force",
            AdminCmd::Promote { .. } => "promote",
            AdminCmd::Demote => "demote",
            AdminCmd::ResolveDiscardLocal => "resolve --discard-local",
            AdminCmd::Verify { repair: true } => "verify --repair",
            AdminCmd::Verify { .. } => "verify",
            AdminCmd::Shutdown => "down",
        };
        self.asked.insert(token, (what.to_string(), c.who));
        self.feed(Input::Admin { token, cmd });
    }

    /// Raise and clear the alerts of `[alerts]` (every tick).
    fn check_alerts(&mut self, st: &blkrep_engine::status::EngineStatus) {
        use blkrep_engine::{ConnState, DiskState};
        let a = self.shared.alerts.clone();
        let up = matches!(
            st.conn,
            ConnState::Connected | ConnState::SyncSource | ConnState::SyncTarget
        );
        if up {
            self.link_down_since = None;
        } else if self.link_down_since.is_none() {
            self.link_down_since = Some(Instant::now());
        }
        let down_for = self
            .link_down_since
            .map_or(0.0, |t| t.elapsed().as_secs_f64());
        // The RPO: the primary's lag, or, while the peer lacks blocks only a resync brings,
        // the time since it first lacked anything (the lag reads 0 once the queue has
        // overflowed into the dirty set).
        let rpo = if st.role == Role::Primary && (st.lag_seconds > 0.0 || st.out_of_sync_bytes > 0)
        {
            let oldest = Instant::now()
                .checked_sub(std::time::Duration::from_secs_f64(st.lag_seconds))
                .unwrap_or_else(Instant::now);
            let since = self.unsynced_since.get_or_insert(oldest);
            if oldest < *since {
                *since = oldest;
            }
            if st.out_of_sync_bytes > 0 {
                st.lag_seconds.max(since.elapsed().as_secs_f64())
            } else {
                st.lag_seconds
            }
        } else {
            self.unsynced_since = None;
            0.0
        };
        let journal_pct = st
            .journal
            .as_ref()
            .filter(|j| j.capacity > 0)
            .map_or(0.0, |j| j.used as f64 * 100.0 / j.capacity as f64);
        let degraded = self.degraded_message();
        let now: [(&'static str, bool, &'static str, String); 6] = [
            (
                "link_down",
                a.link_down_seconds > 0.0 && down_for >= a.link_down_seconds,
                "warning",
                format!(
                    "the replication link to {} ({}) has been down for {down_for:.0} s (alert at {} s)",
                    self.id.peer, self.id.peer_address, a.link_down_seconds
                ),
            ),
            (
                "rpo",
                a.rpo_seconds > 0.0 && st.role == Role::Primary && rpo >= a.rpo_seconds,
                "warning",
                if st.out_of_sync_bytes > 0 {
                    format!(
                        "RPO {rpo:.1} s: {} lacks {} KiB that only a resync brings, for {rpo:.0} s (alert at {} s)",
                        self.id.peer,
                        st.out_of_sync_bytes >> 10,
                        a.rpo_seconds
                    )
                } else {
                    format!(
                        "RPO {rpo:.1} s: the oldest write {} lacks is older than {} s",
                        self.id.peer, a.rpo_seconds
                    )
                },
            ),
            (
                "journal_fill",
                a.journal_fill_percent > 0.0 && journal_pct >= a.journal_fill_percent,
                "warning",
                format!(
                    "the journal is {journal_pct:.1}% full (alert at {}%): when it fills, the blocks go to the dirty set and need a resync",
                    a.journal_fill_percent
                ),
            ),
            (
                "disk_failed",
                matches!(st.disk_state, DiskState::Failed | DiskState::Diskless),
                "critical",
                if st.disk_state == DiskState::Diskless {
                    format!(
                        "this node's local disk failed: it serves reads and writes through {} \
                         (diskless); losing the link fails the volume",
                        self.id.peer
                    )
                } else {
                    "this node's backing device failed: it serves no data from it".to_string()
                },
            ),
            (
                "degraded_leg",
                degraded.is_some(),
                "warning",
                degraded.unwrap_or_default(),
            ),
            (
                "split_brain",
                st.split_brain,
                "critical",
                format!("split brain with {}: see `blkrep resolve`", self.id.peer),
            ),
        ];
        for (name, active, severity, message) in now {
            match (active, self.alerts.contains_key(name)) {
                (true, false) => {
                    self.shared.events.log(
                        "alert",
                        severity,
                        format!("raised {name}: {message}"),
                        None,
                    );
                    self.alerts
                        .insert(name, (blkrep_common::events::now_ms(), message));
                }
                (false, true) => {
                    let (since, _) = self.alerts.remove(name).unwrap_or_default();
                    let secs = blkrep_common::events::now_ms().saturating_sub(since) / 1000;
                    self.shared.events.log(
                        "alert",
                        "info",
                        format!("cleared {name} (raised for {secs} s)"),
                        None,
                    );
                }
                (true, true) => {
                    if let Some(a) = self.alerts.get_mut(name) {
                        a.1 = message;
                    }
                }
                (false, false) => {}
            }
        }
    }

    fn status_json(&self) -> serde_json::Value {
        let st = DaemonStatus {
            resource: self.id.resource.clone(),
            node: self.id.node.clone(),
            pid: std::process::id(),
            peer: self.id.peer.clone(),
            peer_address: self.id.peer_address.clone(),
            export: self.id.export.clone(),
            export_read_only: self.vol.role() != Role::Primary,
            frontend: if self.ublk.is_some() { "ublk" } else { "nbd" }.into(),
            device: self.ublk.as_ref().and_then(|u| u.device()),
            device_state: self.ublk.as_ref().map(|u| u.state().to_string()),
            uptime_seconds: self.started.elapsed().as_secs_f64(),
            link_security: self.id.link_security.clone(),
            link_bytes_sent: self.link_bytes_sent,
            link_last_error: self
                .shared
                .last_link_error
                .lock()
                .ok()
                .and_then(|e| e.clone())
                .map(|(at, why)| LinkError {
                    seconds_ago: at.elapsed().as_secs_f64(),
                    message: why,
                }),
            alerts: self
                .alerts
                .iter()
                .map(
                    |(name, (since, message))| blkrep_common::control::ActiveAlert {
                        name: name.to_string(),
                        since: blkrep_common::events::rfc3339(*since),
                        message: message.clone(),
                    },
                )
                .collect(),
            event_log: self.shared.events.path().display().to_string(),
            engine: self.vol.status(),
            drill: self.drill_status(),
            local: self.legs.summary().into(),
            legs: self.legs.status(),
        };
        serde_json::to_value(st).unwrap_or_default()
    }

    // ------------------------------------------------------------ clients

    fn complete_client(&mut self, req: ReqId, result: Result<Option<bytes::Bytes>, IoError>) {
        if req & ublk_io::UBLK_REQ != 0 {
            self.ublk_complete(req, result)
        } else {
            self.nbd_complete(req, result)
        }
    }

    // ------------------------------------------------------------ replication link

    fn add_link(&mut self, l: LinkConn) {
        let gen = self.next_gen;
        self.next_gen += 1;
        tracing::info!("replication link up ({})", l.peer_addr);
        let has_tls = l.tls.is_some();
        self.links.push(Link {
            fd: OwnedFd::from(l.stream),
            gen,
            decoder: if has_tls {
                Decoder::for_authenticated_link()
            } else {
                Decoder::new()
            },
            tls: l.tls.map(Box::new),
            plain: Default::default(),
            cipher: if has_tls {
                vec![0; LINK_RECV]
            } else {
                Vec::new()
            },
            recv_posted: false,
            sendq: SendQueue::default(),
            closing: None,
            shut: false,
            ring_ops: 0,
        });
        self.shared.linked.store(true, Ordering::Relaxed);
        self.feed(Input::PeerConnected { conn: gen });
        if has_tls {
            // The TLS session may hold records read along with the link handshake.
            self.link_input(gen, 0);
        } else {
            self.link_post_recv(gen);
        }
    }

    fn link_post_recv(&mut self, gen: ConnId) {
        let Some(l) = self.links.iter_mut().find(|l| l.gen == gen) else {
            return;
        };
        if l.recv_posted || l.closing.is_some() {
            return;
        }
        let (ptr, len) = if l.tls.is_some() {
            (l.cipher.as_mut_ptr(), l.cipher.len() as u32)
        } else {
            let spare = l.decoder.spare(LINK_RECV);
            (spare.as_mut_ptr(), spare.len() as u32)
        };
        l.recv_posted = true;
        l.ring_ops += 1;
        let fd = l.fd.as_raw_fd();
        let op = self.alloc_op(Op::LinkRecv { gen });
        self.push(
            opcode::Recv::new(types::Fd(fd), ptr, len)
                .build()
                .user_data(op as u64),
        );
    }

    fn link_recv_done(&mut self, gen: ConnId, res: i32) {
        let Some(l) = self.links.iter_mut().find(|l| l.gen == gen) else {
            return;
        };
        l.recv_posted = false;
        l.ring_ops -= 1;
        if l.closing.is_some() {
            self.link_maybe_free(gen);
            return;
        }
        if res <= 0 {
            let why = if res == 0 {
                "peer closed the connection".to_string()
            } else {
                std::io::Error::from_raw_os_error(-res).to_string()
            };
            tracing::warn!("replication link lost: {why}");
            self.close_link(gen);
            self.feed(Input::PeerClosed { conn: gen });
            return;
        }
        if l.tls.is_some() {
            return self.link_input(gen, res as usize);
        }
        l.decoder.filled(res as usize);
        self.link_decode(gen);
    }

    /// Feed received ciphertext through the link's TLS session into its decoder, then
    /// decode. A record that fails authentication (tampered, replayed, truncated, not
    /// TLS at all) closes the link; nothing of it reaches the engine. `n`: bytes received
    /// into the link's ciphertext buffer.
    fn link_input(&mut self, gen: ConnId, n: usize) {
        let Some(l) = open_link(&mut self.links, gen) else {
            return;
        };
        let Link {
            tls,
            cipher,
            decoder,
            sendq,
            ..
        } = l;
        let Some(conn) = tls.as_deref_mut() else {
            return;
        };
        let mut data = &cipher[..n];
        let mut failure = None;
        let mut peer_closed = false;
        'feed: loop {
            if !data.is_empty() {
                if let Err(e) = conn.read_tls(&mut data) {
                    failure = Some(format!("TLS input: {e}"));
                    break;
                }
            }
            if let Err(e) = conn.process_new_packets() {
                failure = Some(format!(
                    "TLS error: {e} (corrupt, tampered or replayed data; none of it was applied)"
                ));
                break;
            }
            loop {
                let spare = decoder.spare(64 << 10);
                match conn.reader().read(spare) {
                    Ok(0) => {
                        peer_closed = true;
                        break 'feed;
                    }
                    Ok(k) => decoder.filled(k),
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(e) => {
                        failure = Some(format!("TLS: {e}"));
                        break 'feed;
                    }
                }
            }
            if data.is_empty() {
                break;
            }
        }
        // Alerts, key updates.
        tls_out(conn, sendq);
        // Messages decrypted before a failure were authenticated: deliver them first.
        self.link_decode(gen);
        if !self
            .links
            .iter()
            .any(|l| l.gen == gen && l.closing.is_none())
        {
            return;
        }
        if let Some(why) = failure {
            tracing::warn!("replication link: {why}; closing");
            self.close_link(gen);
            self.feed(Input::PeerClosed { conn: gen });
        } else if peer_closed {
            tracing::warn!("replication link lost: peer closed the TLS session");
            self.close_link(gen);
            self.feed(Input::PeerClosed { conn: gen });
        } else {
            self.link_post_recv(gen);
        }
    }

    /// Hand every complete frame in the link's decoder to the engine.
    fn link_decode(&mut self, gen: ConnId) {
        loop {
            let Some(l) = open_link(&mut self.links, gen) else {
                return;
            };
            match l.decoder.next() {
                Ok(Some(msg)) => self.feed(Input::PeerMsg { conn: gen, msg }),
                Ok(None) => break,
                Err(e) => {
                    tracing::warn!("replication link: bad frame from peer, closing: {e}");
                    self.close_link(gen);
                    self.feed(Input::PeerClosed { conn: gen });
                    return;
                }
            }
        }
        if self.links.iter().any(|l| l.gen == gen && l.tls.is_none()) {
            self.link_post_recv(gen);
        }
    }

    fn link_send_done(&mut self, gen: ConnId, res: i32) {
        let Some(l) = self.links.iter_mut().find(|l| l.gen == gen) else {
            return;
        };
        l.ring_ops -= 1;
        if res < 0 {
            l.sendq.complete(0);
            l.sendq.clear();
            let closing = l.closing.is_some();
            if !closing {
                tracing::warn!(
                    "replication link: send failed: {}",
                    std::io::Error::from_raw_os_error(-res)
                );
                self.close_link(gen);
                self.feed(Input::PeerClosed { conn: gen });
            }
        } else {
            l.sendq.complete(res as usize);
            self.link_bytes_sent += res as u64;
        }
        self.link_maybe_free(gen);
    }

    /// Stop taking input from a link; let what is queued (a goodbye) leave, then shut it.
    fn close_link(&mut self, gen: ConnId) {
        if let Some(l) = self.links.iter_mut().find(|l| l.gen == gen) {
            if l.closing.is_none() {
                l.closing = Some(Instant::now());
                if let Some(conn) = l.tls.as_deref_mut() {
                    // What is queued (a goodbye with the reason) goes before the close.
                    for d in l.plain.drain(..) {
                        let _ = conn.writer().write_all(&d);
                    }
                    conn.send_close_notify();
                    tls_out(conn, &mut l.sendq);
                }
                // SAFETY: shutting down our own open socket; completes its pending recv.
                unsafe { libc::shutdown(l.fd.as_raw_fd(), libc::SHUT_RD) };
            }
        }
        if !self.links.iter().any(|l| l.closing.is_none()) {
            self.shared.linked.store(false, Ordering::Relaxed);
        }
        self.link_maybe_free(gen);
    }

    /// Shut down closing links whose queue drained or whose linger time passed.
    fn reap_lingering_links(&mut self) {
        let gens: Vec<ConnId> = self
            .links
            .iter()
            .filter(|l| l.closing.is_some_and(|t| t.elapsed() > LINK_LINGER))
            .map(|l| l.gen)
            .collect();
        for gen in gens {
            if let Some(l) = self.links.iter_mut().find(|l| l.gen == gen) {
                l.sendq.clear_unsent();
                if !l.shut {
                    l.shut = true;
                    // SAFETY: shutting down our own open socket; fails any pending send.
                    unsafe { libc::shutdown(l.fd.as_raw_fd(), libc::SHUT_RDWR) };
                }
            }
            self.link_maybe_free(gen);
        }
    }

    fn link_maybe_free(&mut self, gen: ConnId) {
        if let Some(l) = self.links.iter_mut().find(|l| l.gen == gen) {
            if l.closing.is_some() && !l.shut && l.sendq.is_empty() && !l.sendq.busy() {
                l.shut = true;
                // SAFETY: shutting down our own open socket.
                unsafe { libc::shutdown(l.fd.as_raw_fd(), libc::SHUT_RDWR) };
            }
        }
        self.links.retain(|l| {
            !(l.gen == gen && l.closing.is_some() && l.ring_ops == 0 && l.sendq.is_empty())
        });
    }

    // ------------------------------------------------------------ sending

    fn flush_sends(&mut self) {
        for key in 0..self.nbd.len() {
            let Some(c) = self.nbd[key].as_mut() else {
                continue;
            };
            if c.sendq.busy() || c.sendq.is_empty() {
                continue;
            }
            let mut iov = Box::new(Iov {
                iov: Vec::new(),
                // SAFETY: msghdr is plain old data; all-zero is a valid empty header.
                hdr: unsafe { std::mem::zeroed() },
            });
            if !c.sendq.prepare(&mut self.iov_scratch) {
                continue;
            }
            iov.iov = std::mem::take(&mut self.iov_scratch);
            iov.hdr.msg_iov = iov.iov.as_mut_ptr();
            iov.hdr.msg_iovlen = iov.iov.len();
            let hdr = &iov.hdr as *const libc::msghdr;
            c.ring_ops += 1;
            let (fd, gen) = (c.fd.as_raw_fd(), c.gen);
            let op = self.alloc_op(Op::NbdSend {
                key,
                gen,
                _iov: iov,
            });
            self.push(
                opcode::SendMsg::new(types::Fd(fd), hdr)
                    .flags(libc::MSG_NOSIGNAL as u32)
                    .build()
                    .user_data(op as u64),
            );
        }
        for i in 0..self.links.len() {
            let l = &mut self.links[i];
            if !l.sendq.busy() && !l.shut && l.closing.is_none() {
                tls_fill(l);
            }
            if l.sendq.busy() || l.sendq.is_empty() || l.shut {
                continue;
            }
            let mut iov = Box::new(Iov {
                iov: Vec::new(),
                // SAFETY: msghdr is plain old data; all-zero is a valid empty header.
                hdr: unsafe { std::mem::zeroed() },
            });
            if !l.sendq.prepare(&mut self.iov_scratch) {
                continue;
            }
            iov.iov = std::mem::take(&mut self.iov_scratch);
            iov.hdr.msg_iov = iov.iov.as_mut_ptr();
            iov.hdr.msg_iovlen = iov.iov.len();
            let hdr = &iov.hdr as *const libc::msghdr;
            l.ring_ops += 1;
            let (fd, gen) = (l.fd.as_raw_fd(), l.gen);
            let op = self.alloc_op(Op::LinkSend { gen, _iov: iov });
            self.push(
                opcode::SendMsg::new(types::Fd(fd), hdr)
                    .flags(libc::MSG_NOSIGNAL as u32)
                    .build()
                    .user_data(op as u64),
            );
        }
    }
}

/// The link `gen`, unless it is closing (a closing link takes no input and no new output).
fn open_link(links: &mut [Link], gen: ConnId) -> Option<&mut Link> {
    links
        .iter_mut()
        .find(|l| l.gen == gen && l.closing.is_none())
}

/// Ciphertext kept ready ahead of the socket on a TLS link.
const TLS_AHEAD: usize = 1 << 20;

/// Encrypt queued frames until about `TLS_AHEAD` bytes of ciphertext wait to be sent.
fn tls_fill(l: &mut Link) {
    let Some(conn) = l.tls.as_deref_mut() else {
        return;
    };
    let mut n = 0;
    while l.sendq.len() + n < TLS_AHEAD {
        let Some(d) = l.plain.pop_front() else { break };
        // Buffers are unlimited (set after the handshake): the write takes everything.
        let _ = conn.writer().write_all(&d);
        n += d.len();
    }
    tls_out(conn, &mut l.sendq);
}

/// Move the TLS session's pending ciphertext into the link's send queue.
fn tls_out(conn: &mut rustls::Connection, sendq: &mut SendQueue) {
    if !conn.wants_write() {
        return;
    }
    let mut out = Vec::new();
    while conn.wants_write() {
        // Writing into a Vec cannot fail.
        let _ = conn.write_tls(&mut out);
    }
    sendq.push_shared(bytes::Bytes::from(out));
}

/// The loop's ring. Only this thread submits and completions are reaped only in
/// `submit_and_wait`, so task work can be deferred to that point (fewer interrupts and
/// context switches: DEFER_TASKRUN, 6.1). Older kernels refuse the flags: fall back.
fn build_ring() -> std::io::Result<IoUring> {
    let cq = RING_ENTRIES * 4;
    match IoUring::builder()
        .setup_cqsize(cq)
        .setup_single_issuer()
        .setup_defer_taskrun()
        .build(RING_ENTRIES)
    {
        Ok(r) => Ok(r),
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
            tracing::debug!("io_uring without DEFER_TASKRUN: {e}");
            match IoUring::builder()
                .setup_cqsize(cq)
                .setup_coop_taskrun()
                .build(RING_ENTRIES)
            {
                Ok(r) => Ok(r),
                Err(_) => IoUring::builder().build(RING_ENTRIES),
            }
        }
        Err(e) => Err(e),
    }
}

/// 64 random bits from the kernel.
pub fn random_u64() -> u64 {
    let mut v = [0u8; 8];
    // SAFETY: getrandom writes at most 8 bytes into the valid 8-byte buffer.
    let n = unsafe { libc::getrandom(v.as_mut_ptr() as *mut libc::c_void, 8, 0) };
    if n != 8 {
        return std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1)
            ^ (std::process::id() as u64) << 32;
    }
    u64::from_ne_bytes(v)
}

/// Write `parts` back to back at `pos` of `fd`, resuming after short writes.
fn pwritev_all(fd: RawFd, parts: &[&bytes::Bytes], mut pos: u64) -> std::io::Result<()> {
    let mut skip = 0usize; // bytes of the parts already written
    loop {
        let mut iov: Vec<libc::iovec> = Vec::with_capacity(parts.len());
        let mut left = skip;
        for p in parts {
            if left >= p.len() {
                left -= p.len();
                continue;
            }
            iov.push(libc::iovec {
                iov_base: p[left..].as_ptr() as *mut libc::c_void,
                iov_len: p.len() - left,
            });
            left = 0;
        }
        if iov.is_empty() {
            return Ok(());
        }
        // SAFETY: every iovec points into a part that outlives the call; pwritev only
        // reads them.
        let n = unsafe { libc::pwritev(fd, iov.as_ptr(), iov.len() as i32, pos as libc::off_t) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            return Err(std::io::Error::from(std::io::ErrorKind::WriteZero));
        }
        skip += n as usize;
        pos += n as u64;
    }
}
