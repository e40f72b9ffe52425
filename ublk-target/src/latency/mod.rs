//! Latency tracking: the kernel's view of the block devices (eBPF, [`bpf`]) and the
//! daemon's view of each stage of the replication path ([`Stages`]).
//!
//! The stages are timed in the event loop with `Instant` at the points where the loop
//! hands work to the engine and gets it back, so they cost a clock read and a table entry
//! per request, never a syscall:
//!
//! | stage            | from                                     | to                                   |
//! |------------------|------------------------------------------|--------------------------------------|
//! | `client_read`    | a client read reaches the daemon         | its reply is queued                  |
//! | `client_write`   | a client write (or zeroes/trim) arrives  | it is complete: locally durable as asked, and acknowledged by the peer in sync mode |
//! | `client_flush`   | a client flush arrives                   | it is complete                       |
//! | `queue_wait`     | a client modification arrives            | the engine issues it (it waits while the ship queue is full, a role change is written, or a resync read overlaps it) |
//! | `backing_write`  | a write is submitted to the backing      | it completes                         |
//! | `backing_read`   | a read is submitted to the backing       | it completes                         |
//! | `backing_flush`  | an fdatasync of the backing is submitted | it completes                         |
//! | `journal_append` | a journal record is handed to the kernel | it is written                        |
//! | `ship_ack`       | the primary sends a stream item          | the peer acknowledges it applied     |
//! | `remote_apply`   | the secondary receives a stream item     | it acknowledges it applied           |

pub mod bpf;

use blkrep_common::config::Ebpf;
use blkrep_common::latency::{EbpfState, Histogram, LatencyReport, StageLatency, SLOTS};
use blkrep_engine::{OpId, ReqId, Seq};
use bpf::{BlockTracker, TracedDevice};
use std::collections::{HashMap, VecDeque};
use std::time::Instant;

/// Stage indexes (see the module table).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage {
    ClientRead,
    ClientWrite,
    ClientFlush,
    QueueWait,
    BackingWrite,
    BackingRead,
    BackingFlush,
    JournalAppend,
    ShipAck,
    RemoteApply,
}

const STAGES: [(Stage, &str, &str); 10] = [
    (
        Stage::ClientRead,
        "client_read",
        "client read: arrival to reply",
    ),
    (
        Stage::ClientWrite,
        "client_write",
        "client write: arrival to complete (durable as asked; peer ack in sync mode)",
    ),
    (
        Stage::ClientFlush,
        "client_flush",
        "client flush: arrival to complete",
    ),
    (
        Stage::QueueWait,
        "queue_wait",
        "client modification: arrival to issue (backpressure)",
    ),
    (Stage::BackingWrite, "backing_write", "backing device write"),
    (Stage::BackingRead, "backing_read", "backing device read"),
    (
        Stage::BackingFlush,
        "backing_flush",
        "backing device fdatasync",
    ),
    (
        Stage::JournalAppend,
        "journal_append",
        "journal record write",
    ),
    (
        Stage::ShipAck,
        "ship_ack",
        "stream item sent to the peer's applied ack (round trip)",
    ),
    (
        Stage::RemoteApply,
        "remote_apply",
        "stream item received to applied ack (on the secondary)",
    ),
];

/// One HDR histogram per stage plus the start times of what is in flight.
pub struct Stages {
    hists: Vec<hdrhistogram::Histogram<u64>>,
    sums_ns: Vec<u64>,
    clients: HashMap<ReqId, (Instant, Stage)>,
    disks: HashMap<OpId, (Instant, Stage)>,
    waiting: VecDeque<Instant>,
    shipped: VecDeque<(Seq, Instant)>,
    received: VecDeque<(Seq, Instant)>,
}

impl Default for Stages {
    fn default() -> Self {
        Stages::new()
    }
}

/// Highest recordable latency: an hour, in nanoseconds (longer ones are clamped).
const MAX_NS: u64 = 3_600_000_000_000;

impl Stages {
    pub fn new() -> Stages {
        Stages {
            hists: STAGES
                .iter()
                .map(|_| {
                    hdrhistogram::Histogram::new_with_bounds(1, MAX_NS, 3)
                        .expect("valid histogram bounds")
                })
                .collect(),
            sums_ns: vec![0; STAGES.len()],
            clients: HashMap::new(),
            disks: HashMap::new(),
            waiting: VecDeque::new(),
            shipped: VecDeque::new(),
            received: VecDeque::new(),
        }
    }

    fn record(&mut self, stage: Stage, since: Instant, now: Instant) {
        let ns = (now.saturating_duration_since(since).as_nanos() as u64).clamp(1, MAX_NS);
        let i = stage as usize;
        self.hists[i].saturating_record(ns);
        self.sums_ns[i] = self.sums_ns[i].saturating_add(ns);
    }

    /// A client request arrived (`modifies`: a write, zeroes, trim or flush, which may
    /// wait in the engine's backpressure queue).
    pub fn client_start(&mut self, req: ReqId, stage: Stage, modifies: bool, now: Instant) {
        self.clients.insert(req, (now, stage));
        if modifies {
            self.waiting.push_back(now);
        }
    }

    /// The engine completed a client request.
    pub fn client_done(&mut self, req: ReqId, now: Instant) {
        if let Some((t, s)) = self.clients.remove(&req) {
            self.record(s, t, now);
        }
    }

    /// After the engine took an input: `stalled` modifications still wait in its queue, so
    /// the older ones (it admits in arrival order) have been issued.
    pub fn admitted(&mut self, stalled: usize, now: Instant) {
        while self.waiting.len() > stalled {
            let t = self.waiting.pop_front().expect("non-empty");
            self.record(Stage::QueueWait, t, now);
        }
    }

    pub fn disk_start(&mut self, op: OpId, stage: Stage, now: Instant) {
        self.disks.insert(op, (now, stage));
    }

    pub fn disk_done(&mut self, op: OpId, now: Instant) {
        if let Some((t, s)) = self.disks.remove(&op) {
            self.record(s, t, now);
        }
    }

    /// The primary sent stream item `seq` (a resend after a reconnect is not timed).
    pub fn shipped(&mut self, seq: Seq, now: Instant) {
        push_seq(&mut self.shipped, seq, now);
    }

    /// The peer acknowledged every item `<= applied`.
    pub fn acked(&mut self, applied: Seq, now: Instant) {
        while let Some(t) = pop_seq(&mut self.shipped, applied) {
            self.record(Stage::ShipAck, t, now);
        }
    }

    /// The secondary received stream item `seq`.
    pub fn received(&mut self, seq: Seq, now: Instant) {
        push_seq(&mut self.received, seq, now);
    }

    /// The secondary acknowledged every item `<= applied`.
    pub fn applied(&mut self, applied: Seq, now: Instant) {
        while let Some(t) = pop_seq(&mut self.received, applied) {
            self.record(Stage::RemoteApply, t, now);
        }
    }

    /// The link went down: items in flight are not timed (their round trip now includes
    /// the outage, which the lag and RPO figures report).
    pub fn link_lost(&mut self) {
        self.shipped.clear();
        self.received.clear();
    }

    /// The histograms, one per stage (empty ones included, so a reader sees every name).
    pub fn snapshot(&self) -> Vec<StageLatency> {
        STAGES
            .iter()
            .map(|&(s, name, what)| {
                let h = &self.hists[s as usize];
                let mut slots = [0u64; SLOTS];
                for v in h.iter_recorded() {
                    let us = v.value_iterated_to() / 1000;
                    slots[blkrep_common::latency::slot_of(us)] += v.count_at_value();
                }
                let mut hist = Histogram::from_slots(&slots, self.sums_ns[s as usize]);
                if !h.is_empty() {
                    let q = |p: f64| h.value_at_quantile(p) as f64 / 1000.0;
                    hist.p50_us = q(0.5);
                    hist.p99_us = q(0.99);
                    hist.p999_us = q(0.999);
                    hist.max_us = h.max() as f64 / 1000.0;
                }
                StageLatency {
                    stage: name.to_string(),
                    what: what.to_string(),
                    hist,
                }
            })
            .collect()
    }
}

/// Note when item `seq` left or arrived, unless it is not newer than the last one noted
/// (a resend after a reconnect).
fn push_seq(q: &mut VecDeque<(Seq, Instant)>, seq: Seq, now: Instant) {
    if q.back().is_none_or(|&(s, _)| seq > s) {
        q.push_back((seq, now));
    }
}

/// The time of the oldest noted item `<= upto`, taken off the queue.
fn pop_seq(q: &mut VecDeque<(Seq, Instant)>, upto: Seq) -> Option<Instant> {
    let &(s, t) = q.front()?;
    (s <= upto).then(|| {
        q.pop_front();
        t
    })
}

/// Everything the daemon tracks: the stages, and the kernel programs when they run.
pub struct Tracking {
    pub stages: Stages,
    block: Option<BlockTracker>,
    state: EbpfState,
    started: Instant,
}

impl Tracking {
    /// Start tracking; with `Ebpf::Require` a failure to attach the programs is the error,
    /// with `Auto` it is said once (a warning) and the stages are tracked alone.
    pub fn start(mode: Ebpf, devices: &[TracedDevice]) -> anyhow::Result<Tracking> {
        let (block, state) = match mode {
            Ebpf::Off => (
                None,
                unavailable("off", "ebpf = \"off\" in the configuration"),
            ),
            Ebpf::Auto | Ebpf::Require => match BlockTracker::start(devices) {
                Ok(b) => {
                    let state = EbpfState {
                        state: "active".into(),
                        attach: Some(b.attach_kind().into()),
                        reason: None,
                        devices: b.devices().iter().map(|d| d.describe()).collect(),
                        programs: Vec::new(),
                    };
                    tracing::info!(
                        "eBPF latency tracking active ({}) on {}",
                        b.attach_kind(),
                        state.devices.join(", ")
                    );
                    (Some(b), state)
                }
                Err(reason) if mode == Ebpf::Require => {
                    anyhow::bail!("eBPF latency tracking is required (ebpf = \"require\") but unavailable: {reason}")
                }
                Err(reason) => {
                    tracing::warn!(
                        "eBPF latency tracking unavailable: {reason}; serving the userspace \
                         stage latencies only"
                    );
                    (None, unavailable("unavailable", &reason))
                }
            },
        };
        Ok(Tracking {
            stages: Stages::new(),
            block,
            state,
            started: Instant::now(),
        })
    }

    /// The stages alone, the kernel side off for `reason`.
    pub fn stages_only(reason: &str) -> Tracking {
        Tracking {
            stages: Stages::new(),
            block: None,
            state: unavailable("off", reason),
            started: Instant::now(),
        }
    }

    /// Trace the frontend block device too (the ublk device, once it is live).
    pub fn add_frontend(&mut self, path: &std::path::Path) {
        let Some(b) = self.block.as_mut() else {
            return;
        };
        let Some(d) = bpf::device_of(path, "frontend") else {
            tracing::warn!("eBPF: cannot find the block device of {}", path.display());
            return;
        };
        let desc = d.describe();
        match b.add_device(d) {
            Ok(()) => {
                if !self.state.devices.contains(&desc) {
                    tracing::info!("eBPF: tracing {desc}");
                    self.state.devices.push(desc);
                }
            }
            Err(e) => tracing::warn!("eBPF: cannot trace {}: {e}", path.display()),
        }
    }

    /// The report `blkrep latency` shows.
    pub fn report(&self) -> LatencyReport {
        let mut ebpf = self.state.clone();
        if let Some(b) = &self.block {
            ebpf.programs = b.costs();
        }
        LatencyReport {
            ebpf,
            uptime_s: self.started.elapsed().as_secs_f64(),
            devices: self
                .block
                .as_ref()
                .map(|b| b.snapshot())
                .unwrap_or_default(),
            stages: self.stages.snapshot(),
        }
    }
}

fn unavailable(state: &str, reason: &str) -> EbpfState {
    EbpfState {
        state: state.into(),
        attach: None,
        reason: Some(reason.into()),
        devices: Vec::new(),
        programs: Vec::new(),
    }
}

/// The block devices under a node's backing, journal and metadata (each disk once, its
/// roles joined: `backing+journal`).
pub fn node_devices(paths: &[(&std::path::Path, &str)]) -> Vec<TracedDevice> {
    let mut out: Vec<TracedDevice> = Vec::new();
    for (p, role) in paths {
        if let Some(d) = bpf::device_of(p, role) {
            match out.iter_mut().find(|o| o.kdev() == d.kdev()) {
                Some(o) => {
                    if !o.role.split('+').any(|r| r == *role) {
                        o.role = format!("{}+{role}", o.role);
                    }
                }
                None => out.push(d),
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn stages_time_what_they_pair() {
        let mut s = Stages::new();
        let t0 = Instant::now();
        s.client_start(1, Stage::ClientWrite, true, t0);
        s.client_start(2, Stage::ClientWrite, true, t0);
        // One admitted, one still stalled.
        s.admitted(1, t0 + Duration::from_micros(10));
        s.client_done(1, t0 + Duration::from_micros(100));
        s.client_done(2, t0 + Duration::from_millis(5));
        s.client_done(3, t0); // unknown: ignored
        s.shipped(7, t0);
        s.shipped(8, t0);
        s.shipped(7, t0); // resend: not timed again
        s.acked(7, t0 + Duration::from_micros(300));
        let snap = s.snapshot();
        let get = |n: &str| snap.iter().find(|x| x.stage == n).unwrap().hist.clone();
        let w = get("client_write");
        assert_eq!(w.count, 2);
        assert!((99.0..=101.0).contains(&w.p50_us), "{}", w.p50_us);
        assert!((4990.0..=5010.0).contains(&w.max_us), "{}", w.max_us);
        assert_eq!(w.slots.iter().sum::<u64>(), 2);
        assert_eq!(get("queue_wait").count, 1);
        let a = get("ship_ack");
        assert_eq!(a.count, 1);
        assert!((299.0..=301.0).contains(&a.p99_us));
        s.link_lost();
        s.acked(8, t0);
        assert_eq!(s.snapshot().iter().map(|x| x.hist.count).sum::<u64>(), 4);
    }
}
