//! The event loop's side of the local legs (see [`crate::legs`]): the engine's disk
//! operations on the volume fanned out to the healthy legs, failover on errors and
//! timeouts, the rebuild's copies, `blkrep leg`, and fault injection for tests.

use super::{Loop, Op};
use crate::backend::{DiskIo, Step};
use crate::control::ControlCall;
use crate::legs::LegState;
use blkrep_common::control::{ControlError, LegAction};
use blkrep_common::human_bytes;
use blkrep_engine::{AlignedBuf, DiskKind, Input, IoError, OpId};
use bytes::Bytes;
use io_uring::{opcode, squeue};
use std::os::fd::AsRawFd;
use std::time::Instant;

/// What a leg request belongs to.
#[derive(Clone, Copy, Debug)]
pub(super) enum LegTag {
    /// A member of the fan-out of an engine operation.
    Group(u64),
    /// A rebuild copy (the read from the source, the write to the target) of copy `gen`.
    Copy { gen: u64, write: bool },
}

/// An engine operation on the volume, carried out on the legs.
pub(super) struct Group {
    op: OpId,
    what: What,
    /// Legs with a request outstanding, legs that answered well, legs a read was tried on
    /// (a bit per leg).
    pending: u8,
    ok: u8,
    tried: u8,
    err: Option<IoError>,
    data: Option<Bytes>,
    started: Instant,
}

#[derive(Clone, Copy)]
enum What {
    Read {
        offset: u64,
        len: u64,
    },
    /// A write, zeroing or discard (`kind` rebuilt per leg from `op_kind`).
    Modify {
        start: u64,
        end: u64,
    },
    Flush,
}

/// A fault injected into a leg (tests).
#[derive(Clone, Debug)]
pub(super) struct Fault {
    leg: usize,
    read: bool,
    write: bool,
    flush: bool,
    start: u64,
    end: u64,
    hang: bool,
}

/// The leg state of the loop.
#[derive(Default)]
pub(super) struct LegIo {
    groups: std::collections::HashMap<u64, Group>,
    next_group: u64,
    /// The copy in flight (its generation; older completions are stale) and when it began.
    copy_gen: u64,
    copy_started: Option<(Instant, usize)>,
    faults: Vec<Fault>,
    /// Requests a `hang` fault holds back: (leg, op key, submission).
    hung: Vec<(usize, usize, squeue::Entry)>,
    /// `BLKREP_FAULT_INJECTION=1`.
    injection: bool,
}

impl LegIo {
    /// `injection`: accept fault requests (tests).
    pub(super) fn new(injection: bool) -> LegIo {
        LegIo {
            injection,
            ..Default::default()
        }
    }
}

/// True for the operations on the volume's data (carried out on the legs); the metadata
/// and the journal are not on the legs.
pub(super) fn is_volume_op(kind: &DiskKind) -> bool {
    matches!(
        kind,
        DiskKind::Read { .. }
            | DiskKind::Write { .. }
            | DiskKind::WriteZeroes { .. }
            | DiskKind::Trim { .. }
            | DiskKind::Flush
    )
}

impl Loop {
    /// Carry an engine operation on the volume's data out on the legs.
    pub(super) fn legs_submit(&mut self, op: OpId, kind: DiskKind) {
        let g = self.legio.next_group;
        self.legio.next_group += 1;
        let what = match &kind {
            DiskKind::Read { offset, len } => What::Read {
                offset: *offset,
                len: *len,
            },
            DiskKind::Write { offset, data, .. } => What::Modify {
                start: *offset,
                end: offset + data.len() as u64,
            },
            DiskKind::WriteZeroes { offset, len, .. } | DiskKind::Trim { offset, len } => {
                What::Modify {
                    start: *offset,
                    end: offset + len,
                }
            }
            _ => What::Flush,
        };
        self.legio.groups.insert(
            g,
            Group {
                op,
                what,
                pending: 0,
                ok: 0,
                tried: 0,
                err: None,
                data: None,
                started: Instant::now(),
            },
        );
        match what {
            What::Read { .. } => self.group_next(g),
            What::Modify { .. } | What::Flush => {
                if let What::Modify { start, end } = what {
                    // Legs that are out lack this range: recorded before the write completes.
                    self.legs.note_write(start, end);
                }
                let targets: Vec<usize> = self.legs.healthy().collect();
                for &l in &targets {
                    self.legio.groups.get_mut(&g).expect("new").pending |= 1 << l;
                }
                for l in targets {
                    let io = match what {
                        What::Flush => DiskIo::Fsync { journal: false },
                        _ => DiskIo::new(kind.clone(), &self.meta).expect("not metadata"),
                    };
                    self.leg_issue(LegTag::Group(g), l, io);
                }
                self.group_next(g);
            }
        }
    }

    /// Submit `io` on leg `leg` (or hold or fail it, as an injected fault says).
    fn leg_issue(&mut self, tag: LegTag, leg: usize, mut io: DiskIo) {
        let fd = self.legs.legs[leg].fd();
        self.legs.legs[leg].inflight += 1;
        let fault = self.fault_for(leg, &io);
        let e = io.sqe(fd, self.meta.file.as_raw_fd(), self.journal_fd);
        let inject = match &fault {
            Some(f) if !f.hang => Some(-libc::EIO),
            _ => None,
        };
        let key = self.alloc_op(Op::Leg {
            tag,
            leg: leg as u8,
            io: Box::new(io),
            inject,
        });
        match fault {
            Some(f) if f.hang => self.legio.hung.push((leg, key, e.user_data(key as u64))),
            Some(_) => self.push(opcode::Nop::new().build().user_data(key as u64)),
            None => self.push(e.user_data(key as u64)),
        }
    }

    fn fault_for(&self, leg: usize, io: &DiskIo) -> Option<Fault> {
        if self.legio.faults.is_empty() {
            return None;
        }
        let (range, read, write, flush) = match io {
            DiskIo::Read { buf, offset, .. } => (
                Some((*offset, offset + buf.len() as u64)),
                true,
                false,
                false,
            ),
            DiskIo::Write { data, offset, .. } => (
                Some((*offset, offset + data.len() as u64)),
                false,
                true,
                false,
            ),
            DiskIo::Fallocate { offset, len, .. } | DiskIo::ZeroFill { offset, len, .. } => {
                (Some((*offset, offset + len)), false, true, false)
            }
            DiskIo::Fsync { .. } => (None, false, false, true),
            _ => return None,
        };
        self.legio
            .faults
            .iter()
            .find(|f| {
                f.leg == leg
                    && ((read && f.read) || (write && f.write) || (flush && f.flush))
                    && range.is_none_or(|(s, e)| s < f.end && f.start < e)
            })
            .cloned()
    }

    /// A leg request's completion.
    pub(super) fn leg_io_done(
        &mut self,
        key: usize,
        tag: LegTag,
        leg: u8,
        mut io: Box<DiskIo>,
        inject: Option<i32>,
        res: i32,
    ) {
        let res = inject.unwrap_or(res);
        match io.complete(res, &mut self.meta) {
            Step::Again => {
                let fd = self.legs.legs[leg as usize].fd();
                let e = io.sqe(fd, self.meta.file.as_raw_fd(), self.journal_fd);
                self.free_ops.pop();
                self.ops[key] = Some(Op::Leg {
                    tag,
                    leg,
                    io,
                    inject: None,
                });
                self.push(e.user_data(key as u64));
            }
            Step::Done(r) => {
                let leg = leg as usize;
                let l = &mut self.legs.legs[leg];
                l.inflight = l.inflight.saturating_sub(1);
                match tag {
                    LegTag::Group(g) => self.member_done(g, leg, r),
                    LegTag::Copy { gen, write } => self.copy_done(gen, write, leg, r),
                }
            }
        }
    }

    fn member_done(&mut self, g: u64, leg: usize, r: Result<Option<Bytes>, IoError>) {
        let bit = 1u8 << leg;
        let Some(grp) = self.legio.groups.get_mut(&g) else {
            return; // answered after the group was done (a leg that timed out)
        };
        if grp.pending & bit == 0 {
            return;
        }
        grp.pending &= !bit;
        match r {
            Ok(d) => {
                grp.ok |= bit;
                if d.is_some() {
                    grp.data = d;
                }
                self.group_next(g);
            }
            Err(e) => {
                grp.err = Some(e);
                let what = match grp.what {
                    What::Read { offset, len } => format!("a read of {len} bytes at {offset}"),
                    What::Modify { start, end } => {
                        format!("a write of {} bytes at {start}", end - start)
                    }
                    What::Flush => "a flush".into(),
                };
                let range = match grp.what {
                    What::Modify { start, end } => Some((start, end)),
                    _ => None,
                };
                self.leg_failed(leg, format!("{what} failed: {e}"));
                if let Some((start, end)) = range {
                    // The leg may hold part of it: it lacks the range.
                    self.legs.note_write(start, end);
                }
                self.group_next(g);
            }
        }
    }

    /// Go on with group `g`: retry a read on another leg, or complete it.
    fn group_next(&mut self, g: u64) {
        let Some(grp) = self.legio.groups.get_mut(&g) else {
            return;
        };
        if grp.pending != 0 {
            return;
        }
        match grp.what {
            What::Read { offset, len } => {
                if grp.ok != 0 {
                    let data = grp.data.take();
                    return self.group_finish(g, Ok(data));
                }
                match self.legs.read_leg(offset, grp.tried) {
                    Some(l) => {
                        grp.tried |= 1 << l;
                        grp.pending |= 1 << l;
                        grp.started = Instant::now();
                        let io = DiskIo::Read {
                            buf: AlignedBuf::zeroed(len as usize),
                            offset,
                            done: 0,
                            journal: false,
                        };
                        self.leg_issue(LegTag::Group(g), l, io);
                    }
                    None => {
                        let e = grp.err.unwrap_or(IoError::Io);
                        self.group_finish(g, Err(e));
                    }
                }
            }
            What::Modify { .. } | What::Flush => {
                let r = if grp.ok != 0 {
                    Ok(None)
                } else {
                    Err(grp.err.unwrap_or(IoError::Io))
                };
                self.group_finish(g, r);
            }
        }
    }

    fn group_finish(&mut self, g: u64, mut result: Result<Option<Bytes>, IoError>) {
        let Some(grp) = self.legio.groups.remove(&g) else {
            return;
        };
        if matches!(grp.what, What::Modify { .. }) {
            self.drill_write_done();
        }
        if self.legs.unsaved {
            if let Err(e) = self.legs.save() {
                // Without the record, a restart could read a leg that missed this write:
                // fail-stop rather than complete it.
                tracing::error!("{e}");
                self.shared.events.log(
                    "leg",
                    "critical",
                    format!("cannot record the legs' state ({e}): the request fails"),
                    None,
                );
                result = Err(IoError::Io);
            }
        }
        self.feed(Input::DiskDone { op: grp.op, result });
    }

    /// Take leg `leg` out; its outstanding requests count as failed.
    fn leg_failed(&mut self, leg: usize, why: String) {
        let was = self.legs.legs[leg].state;
        if !self.legs.fail(leg, why.clone()) {
            return;
        }
        self.stop_copy();
        let path = self.legs.legs[leg].path.display().to_string();
        let left = self.legs.healthy_count();
        let (severity, tail) = if left > 0 {
            (
                "warning",
                format!(
                    "the volume goes on on {left} leg(s); writes are tracked for its rebuild \
                     (`blkrep leg attach` or `replace`)"
                ),
            )
        } else {
            (
                "critical",
                match self.legs.cfg.on_io_error {
                    blkrep_common::config::OnIoError::Fail => {
                        "no healthy leg is left: the volume fails (on_io_error = \"fail\")"
                    }
                    blkrep_common::config::OnIoError::Diskless => {
                        "no healthy leg is left: a primary with an up-to-date peer goes on \
                         diskless, otherwise the volume fails (on_io_error = \"diskless\")"
                    }
                }
                .to_string(),
            )
        };
        let was = if was == LegState::Rebuilding {
            " while rebuilding"
        } else {
            ""
        };
        tracing::warn!("leg {leg} ({path}) failed{was}: {why}");
        self.shared.events.log(
            "leg",
            severity,
            format!("leg {leg} ({path}) failed{was}: {why}; {tail}"),
            None,
        );
        // Requests still outstanding on the leg: given up (a write's range is lacking).
        let bit = 1u8 << leg;
        let mut hit: Vec<u64> = self
            .legio
            .groups
            .iter()
            .filter(|(_, grp)| grp.pending & bit != 0)
            .map(|(g, _)| *g)
            .collect();
        hit.sort_unstable();
        for g in &hit {
            if let Some(grp) = self.legio.groups.get_mut(g) {
                grp.pending &= !bit;
                if let What::Modify { start, end } = grp.what {
                    self.legs.note_write(start, end);
                }
            }
        }
        for g in hit {
            self.group_next(g);
        }
    }

    /// Forget the rebuild copy in flight (its completions are then ignored as stale).
    fn stop_copy(&mut self) {
        self.legio.copy_gen += 1;
        self.legio.copy_started = None;
    }

    /// Every tick: time out legs that do not answer, pace the rebuild, record progress.
    pub(super) fn legs_tick(&mut self) {
        let limit = std::time::Duration::from_secs_f64(self.legs.cfg.timeout);
        let mut late: Vec<usize> = Vec::new();
        for grp in self.legio.groups.values() {
            if grp.pending != 0 && grp.started.elapsed() > limit {
                for l in 0..self.legs.legs.len() {
                    if grp.pending & (1 << l) != 0 && !late.contains(&l) {
                        late.push(l);
                    }
                }
            }
        }
        if let Some((t, l)) = self.legio.copy_started {
            if t.elapsed() > limit && !late.contains(&l) {
                late.push(l);
            }
        }
        for l in late {
            self.leg_failed(
                l,
                format!("a request got no answer in {} s", self.legs.cfg.timeout),
            );
        }
        self.rebuild_pump();
        if self.legs.unsaved && self.legio.groups.is_empty() {
            if let Err(e) = self.legs.save() {
                tracing::error!("{e}");
            }
        }
    }

    /// Start the next rebuild copy, if one is due and allowed.
    fn rebuild_pump(&mut self) {
        if self.legio.copy_started.is_some() {
            return;
        }
        self.legs.start_rebuild_if_due();
        let Some((src, _dst, s, e)) = self.legs.next_copy() else {
            // Nothing (left) to copy: the leg is rebuilt.
            if self.legs.rebuild_complete() {
                self.rebuild_finished();
            }
            return;
        };
        // A client write to the piece still in flight may land on the source after the
        // copy reads it: then the copy is stale, and the piece is copied again later.
        let racing = self
            .legio
            .groups
            .values()
            .any(|g| matches!(g.what, What::Modify { start, end } if start < e && s < end));
        if racing {
            if let Some((_, _, redo)) = self.legs.rebuild.as_mut().and_then(|r| r.copying.as_mut())
            {
                *redo = true;
            }
        }
        self.legio.copy_gen += 1;
        self.legio.copy_started = Some((Instant::now(), src));
        let io = DiskIo::Read {
            buf: AlignedBuf::zeroed((e - s) as usize),
            offset: s,
            done: 0,
            journal: false,
        };
        let gen = self.legio.copy_gen;
        self.leg_issue(LegTag::Copy { gen, write: false }, src, io);
    }

    fn copy_done(&mut self, gen: u64, write: bool, leg: usize, r: Result<Option<Bytes>, IoError>) {
        if gen != self.legio.copy_gen {
            return; // a copy of a rebuild that was stopped
        }
        let Some((_, _, s, e)) = self
            .legs
            .rebuild
            .as_ref()
            .and_then(|rb| rb.copying.map(|(s, e, _)| (rb.source, rb.target, s, e)))
        else {
            return;
        };
        let target = self.legs.rebuild.as_ref().map_or(0, |rb| rb.target);
        match (write, r) {
            (false, Ok(Some(data))) => {
                self.legio.copy_started = Some((Instant::now(), target));
                let io = DiskIo::Write {
                    data,
                    offset: s,
                    done: 0,
                    // Durable before the state file drops the piece from what it lacks.
                    fua: true,
                };
                self.leg_issue(LegTag::Copy { gen, write: true }, target, io);
            }
            (false, Ok(None)) => self.leg_failed(leg, format!("a rebuild read at {s} got no data")),
            (false, Err(err)) => self.leg_failed(
                leg,
                format!("a rebuild read of {} bytes at {s} failed: {err}", e - s),
            ),
            (true, Err(err)) => self.leg_failed(
                leg,
                format!("a rebuild write of {} bytes at {s} failed: {err}", e - s),
            ),
            (true, Ok(_)) => {
                self.legio.copy_started = None;
                if self.legs.copied() {
                    self.rebuild_finished();
                } else if self
                    .legs
                    .rebuild
                    .as_ref()
                    .is_some_and(|r| r.unrecorded >= 64 << 20)
                {
                    if let Err(e) = self.legs.save() {
                        tracing::error!("{e}");
                    }
                }
                self.rebuild_pump();
            }
        }
    }

    /// The target lacks nothing: it is healthy.
    fn rebuild_finished(&mut self) {
        if let Some(i) = self.legs.finish_rebuild() {
            let l = &self.legs.legs[i];
            let (copied, secs) = l
                .last_rebuild
                .as_ref()
                .map_or((0, 0.0), |r| (r.copied_bytes, r.seconds));
            let msg = format!(
                "leg {i} ({}) rebuilt: {} copied in {secs:.1} s; it is healthy",
                l.path.display(),
                human_bytes(copied)
            );
            if let Err(e) = self.legs.save() {
                tracing::error!("{e}");
            }
            self.shared.events.log("leg", "info", msg, None);
        }
    }

    /// `blkrep leg ...` and the test-only fault requests.
    pub(super) fn leg_control(&mut self, c: ControlCall) {
        use blkrep_common::control::Request;
        let answer = match c.req.clone() {
            Request::Leg {
                action,
                leg,
                path,
                full,
            } => self.leg_command(action, leg as usize, path, full, c.who.clone()),
            Request::LegFault {
                leg,
                mode,
                ops,
                offset,
                len,
            } => self.leg_fault(leg as usize, &mode, &ops, offset, len),
            _ => Err(ControlError::new("bad_request", "not a leg request")),
        };
        let _ = c
            .reply
            .send(answer.map(|m| serde_json::json!({ "message": m })));
    }

    fn leg_command(
        &mut self,
        action: LegAction,
        leg: usize,
        path: Option<String>,
        full: bool,
        who: Option<String>,
    ) -> Result<String, ControlError> {
        let refuse = |m: String| ControlError::new("refused", &m);
        if leg >= self.legs.legs.len() {
            return Err(ControlError::new(
                "bad_request",
                &format!(
                    "there is no leg {leg}: this node has {} (0: node.backing{})",
                    self.legs.legs.len(),
                    if self.legs.legs.len() > 1 {
                        ", 1: node.mirror"
                    } else {
                        "; set node.mirror for a second"
                    }
                ),
            ));
        }
        let size = self.legs.size;
        let mut open = |p: &std::path::Path| {
            crate::backend::Backing::open(p, size)
                .map(|b| b.file)
                .map_err(|e| e.to_string())
        };
        let msg = match action {
            LegAction::Detach => {
                self.legs.detach(leg).map_err(refuse)?;
                format!(
                    "leg {leg} ({}) detached: writes are tracked for its return (`blkrep leg \
                     attach`)",
                    self.legs.legs[leg].path.display()
                )
            }
            LegAction::Attach => {
                if path.is_some() {
                    return Err(ControlError::new(
                        "bad_request",
                        "attach takes the leg's own device; use `replace --path` for a new one",
                    ));
                }
                self.legs
                    .attach(leg, None, full, &mut open)
                    .map_err(refuse)?
            }
            LegAction::Replace => {
                let Some(p) = path else {
                    return Err(ControlError::new(
                        "bad_request",
                        "replace needs --path, the new device",
                    ));
                };
                let p = std::path::PathBuf::from(p);
                if self
                    .legs
                    .legs
                    .iter()
                    .enumerate()
                    .any(|(i, l)| i != leg && l.path == p)
                {
                    return Err(refuse(format!(
                        "{} is the other leg: a replacement must be a device of its own",
                        p.display()
                    )));
                }
                self.legs
                    .attach(leg, Some(p), true, &mut open)
                    .map_err(refuse)?
            }
        };
        // The rebuild the command ended or restarted: its copy in flight is stale.
        self.stop_copy();
        self.legs
            .save()
            .map_err(|e| ControlError::new("io", &format!("cannot record the legs' state: {e}")))?;
        self.shared.events.log("leg", "info", msg.clone(), who);
        self.rebuild_pump();
        Ok(msg)
    }

    fn leg_fault(
        &mut self,
        leg: usize,
        mode: &str,
        ops: &[String],
        offset: u64,
        len: u64,
    ) -> Result<String, ControlError> {
        if !self.legio.injection {
            return Err(ControlError::new(
                "refused",
                "fault injection is off (testing only: start blkrepd with \
                 BLKREP_FAULT_INJECTION=1)",
            ));
        }
        if leg >= self.legs.legs.len() {
            return Err(ControlError::new("bad_request", &format!("no leg {leg}")));
        }
        if mode == "clear" {
            self.legio.faults.retain(|f| f.leg != leg);
            let (release, keep): (Vec<_>, Vec<_>) = std::mem::take(&mut self.legio.hung)
                .into_iter()
                .partition(|h| h.0 == leg);
            self.legio.hung = keep;
            let n = release.len();
            for (_, _, e) in release {
                self.push(e);
            }
            return Ok(format!(
                "leg {leg}: faults cleared, {n} held request(s) released"
            ));
        }
        let hang = match mode {
            "error" => false,
            "hang" => true,
            m => {
                return Err(ControlError::new(
                    "bad_request",
                    &format!("mode {m:?}: use error, hang or clear"),
                ))
            }
        };
        let mut f = Fault {
            leg,
            read: false,
            write: false,
            flush: false,
            start: offset,
            end: if len == 0 { u64::MAX } else { offset + len },
            hang,
        };
        for o in ops {
            match o.as_str() {
                "read" => f.read = true,
                "write" => f.write = true,
                "flush" => f.flush = true,
                o => {
                    return Err(ControlError::new(
                        "bad_request",
                        &format!("op {o:?}: use read, write or flush"),
                    ))
                }
            }
        }
        let m = format!(
            "leg {leg}: injected {mode} on {ops:?} at [{}, {})",
            f.start, f.end
        );
        self.legio.faults.push(f);
        Ok(m)
    }

    /// The clean stop: record it (a start after a crash reconciles the legs).
    pub(super) fn legs_shutdown(&mut self) {
        if !self.legio.groups.is_empty() {
            return; // requests never answered: not a clean stop
        }
        if let Err(e) = self.legs.save_stopped() {
            tracing::error!("{e}");
        }
    }

    /// The `degraded_leg` alert's message, when it is due.
    pub(super) fn degraded_message(&self) -> Option<String> {
        // With no healthy leg, `disk_failed` says it.
        if self.legs.legs.len() < 2 || self.legs.summary() != "degraded" {
            return None;
        }
        let out: Vec<String> = self
            .legs
            .legs
            .iter()
            .enumerate()
            .filter(|(_, l)| l.state != LegState::Healthy)
            .map(|(i, l)| {
                format!(
                    "leg {i} ({}) is {}{}{}",
                    l.path.display(),
                    l.state.name(),
                    if l.reason.is_empty() { "" } else { ": " },
                    l.reason
                )
            })
            .collect();
        let lacking: u64 = self.legs.legs.iter().map(|l| l.lacks.bytes()).sum();
        Some(format!(
            "{}; {} to rebuild",
            out.join("; "),
            human_bytes(lacking)
        ))
    }
}
