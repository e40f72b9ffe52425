//! The simulated world: two nodes (engine + disk + metadata area), the network between
//! them, clients, an operator, and the faults — all driven by one seeded generator and a
//! virtual clock, one event at a time.

use crate::config::{Faults, SimConfig};
use crate::disk::{content, fill_sector, Content, SimDisk, SECTOR};
use crate::model::{violation, Ops, PrimaryModel, Stream, Violation};
use crate::rng::Rng;
use blkrep_engine::journal;
use blkrep_engine::meta::{Metadata, AREA_SIZE, SLOT_SIZE};
use blkrep_engine::msg::{ItemKind, Msg};
use blkrep_engine::{
    AdminCmd, ConnId, DiskKind, DiskState, Input, IoError, Mode, OpId, Output, Probe, ReqId, Role,
    Volume, VolumeConfig,
};
use blkrep_transport::codec::{self, Decoder};
use bytes::Bytes;
use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap};

mod clients;
mod faults;
mod net;
mod run;

const MS: u64 = 1_000_000;
const SEC: u64 = 1_000_000_000;
const NODES: [&str; 2] = ["alpha", "beta"];

/// Something that happens at a point of virtual time.
#[derive(Clone, Debug)]
enum Ev {
    Tick(usize),
    DiskDone {
        node: usize,
        inc: u64,
        op: OpId,
    },
    Deliver {
        conn: ConnId,
        to: usize,
        frame: Vec<u8>,
    },
    PeerClosed {
        conn: ConnId,
        to: usize,
    },
    Connect,
    Client(usize),
    Operator,
    Crash(usize),
    Restart(usize),
    /// Lose the primary site during node `i`'s protected catch-up.
    CatchupTakeover(usize),
    /// The operator forces node `i` to take over.
    ForcePromote(usize),
    Partition,
    Heal,
    Reset,
    Stall,
}

/// A disk operation in flight.
struct DiskPending {
    kind: DiskKind,
    marker: u64,
    fail: bool,
}

/// A client request in flight.
#[derive(Clone, Debug)]
struct ClientReq {
    op: u64,
    kind: ReqKind,
    first: usize,
    n: usize,
    fua: bool,
    /// Reads: the floor each sector had when the read was issued (primary only).
    floors: Option<Vec<u64>>,
    /// The node was primary when it issued the request.
    on_primary: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ReqKind {
    Read,
    Write,
    Zeroes,
    Trim,
    Flush,
}

struct Node {
    vol: Option<Volume>,
    inc: u64,
    disk: SimDisk,
    meta: Vec<u8>,
    meta_slot: usize,
    ops: BTreeMap<OpId, DiskPending>,
    reqs: BTreeMap<ReqId, ClientReq>,
    last_tick: u64,
    role: Role,
    model: Option<PrimaryModel>,
    /// Restarted after a crash as primary: its image holds writes nobody else saw until a
    /// full sync replaces it.
    suspect: bool,
    /// Restarted after a crash: prefix checks wait until it re-applied this far.
    horizon: u64,
    /// Highest stream sequence delivered to it.
    received: u64,
    stopping: bool,
    /// Full syncs of the stream this node has seen start (it received their start message,
    /// or it started them as primary): a node that missed one may hold numbers the stream
    /// has since redefined.
    resets_seen: u64,
    /// The node got a resync start and has not yet recorded (durably) that it is its
    /// target: after a crash now it holds its old image, which the checker's rebased
    /// model no longer describes.
    rebase_pending: bool,
    /// The primary's journal device (page cache semantics: what a kill of the daemon
    /// leaves, a power loss may lose).
    journal: Option<SimDisk>,
    /// Boots of the node's machine (a power loss starts a new one).
    boot: u64,
    /// The image this node held when its metadata first recorded a protected catch-up
    /// (session id, sector contents): a takeover's rollback must restore exactly this.
    undo_image: Option<(u64, Vec<Content>)>,
}

struct Conn {
    id: ConnId,
    open: [bool; 2],
    dec: [Decoder; 2],
    last: [u64; 2],
    /// What TCP keeps retransmitting while the network is partitioned, per receiver, in
    /// order: frames, and a close (FIN/RST) as `None`. Delivered when the partition heals,
    /// unless the connection is given up first.
    held: [Vec<Option<Vec<u8>>>; 2],
}

/// Counters for the coverage report.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Stats {
    pub steps: u64,
    pub sim_seconds: f64,
    pub client_writes_ok: u64,
    pub client_reads_ok: u64,
    pub client_errors: u64,
    pub flushes_ok: u64,
    pub crashes: u64,
    pub clean_restarts: u64,
    pub partitions: u64,
    pub resets: u64,
    pub stalls: u64,
    pub garbage_frames: u64,
    pub disk_errors: u64,
    pub connects: u64,
    pub promotes_ok: u64,
    pub promotes_refused: u64,
    pub demotes_ok: u64,
    pub full_syncs: u64,
    pub forced_takeovers: u64,
    pub verifies_completed: u64,
    pub split_brains_resolved: u64,
    pub stream_items: u64,
    pub prefix_checks: u64,
    pub read_checks: u64,
    pub sync_loss_checks: u64,
    pub durability_checks: u64,
    pub kills: u64,
    pub journal_replays: u64,
    /// Protected catch-ups begun (their metadata written), and takeovers that rolled one
    /// back (each checked against the image recorded at its start).
    pub undo_sessions: u64,
    pub undo_rollbacks: u64,
    /// Primaries that went on diskless after their disk failed.
    pub diskless: u64,
    pub liveness_seconds: f64,
    pub liveness_connects: u64,
}

/// One simulation run.
pub struct World {
    cfg: SimConfig,
    faults: Faults,
    rng: Rng,
    now: u64,
    queue: BinaryHeap<Reverse<(u64, u64)>>,
    events: BTreeMap<u64, Ev>,
    next_ev: u64,
    nodes: [Node; 2],
    conn: Option<Conn>,
    next_conn: ConnId,
    partitioned: bool,
    next_op: u64,
    next_req: ReqId,
    ops: Ops,
    stream: Stream,
    /// Newest version per sector acknowledged while sync mode protected it.
    protected: Vec<u64>,
    /// A node crashed and the primary has not noticed yet: acknowledgements still arriving
    /// from before the crash describe writes that were lost with the crashed node's cache,
    /// so completions now do not count as protected (two failures, not one).
    protection_gap: bool,
    stats: Stats,
    trace: Option<Vec<String>>,
    liveness: bool,
    out: Vec<Output>,
    failure: Option<Violation>,
}

fn slot_area(meta: &Metadata) -> Vec<u8> {
    let mut a = meta.encode_slot().expect("metadata encodes");
    a.resize(AREA_SIZE, 0);
    a
}

impl World {
    /// A world for `cfg`; `trace` collects a readable line per event.
    pub fn new(cfg: SimConfig, trace: bool) -> World {
        let mut rng = Rng::new(cfg.seed);
        let faults = Faults::draw(&mut rng, &cfg);
        let sectors = (cfg.volume_size / SECTOR) as usize;
        let mk = |i: usize| {
            let meta = Metadata::new("sim", NODES[i], cfg.volume_size, 100 + i as u64);
            Node {
                vol: None,
                inc: 0,
                disk: SimDisk::new(cfg.volume_size),
                meta: slot_area(&meta),
                meta_slot: 0,
                ops: BTreeMap::new(),
                reqs: BTreeMap::new(),
                last_tick: 0,
                role: Role::Secondary,
                model: None,
                suspect: false,
                horizon: 0,
                received: 0,
                stopping: false,
                resets_seen: 0,
                rebase_pending: false,
                undo_image: None,
                journal: (cfg.journal_size > 0).then(|| SimDisk::new(cfg.journal_size)),
                boot: 1,
            }
        };
        let mut w = World {
            faults,
            rng,
            now: 0,
            queue: BinaryHeap::new(),
            events: BTreeMap::new(),
            next_ev: 0,
            nodes: [mk(0), mk(1)],
            conn: None,
            next_conn: 1,
            partitioned: false,
            next_op: 1,
            next_req: 1,
            ops: Ops::new(sectors),
            stream: Stream::new(sectors),
            protected: vec![0; sectors],
            protection_gap: false,
            stats: Stats::default(),
            trace: trace.then(Vec::new),
            liveness: false,
            out: Vec::new(),
            failure: None,
            cfg,
        };
        for i in 0..2 {
            w.start_node(i);
            let d = w.rng.range(0, 100) * MS;
            w.at(d, Ev::Tick(i));
            let d = w.rng.range(0, 5) * MS;
            w.at(d, Ev::Client(i));
        }
        let d = w.rng.range(1, 50) * MS;
        w.at(d, Ev::Connect);
        let d = w.rng.range(50, 500) * MS;
        w.at(d, Ev::Operator);
        w.schedule_faults();
        w
    }

    fn log(&mut self, f: impl FnOnce() -> String) {
        if let Some(t) = &mut self.trace {
            t.push(format!("{:>10.6}s {}", self.now as f64 / 1e9, f()));
        }
    }

    /// The trace collected so far.
    pub fn trace(&self) -> &[String] {
        self.trace.as_deref().unwrap_or(&[])
    }

    /// Coverage counters.
    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    fn at(&mut self, delay: u64, ev: Ev) {
        let id = self.next_ev;
        self.next_ev += 1;
        self.events.insert(id, ev);
        self.queue.push(Reverse((self.now + delay, id)));
    }

    fn schedule_faults(&mut self) {
        let f = self.faults.clone();
        if f.crash_every_ms > 0 {
            for i in 0..2 {
                let d = self
                    .rng
                    .range(f.crash_every_ms / 2, f.crash_every_ms * 3 / 2)
                    * MS;
                self.at(d, Ev::Crash(i));
            }
        }
        if f.partition_every_ms > 0 {
            let d = self.rng.range(1, f.partition_every_ms) * MS;
            self.at(d, Ev::Partition);
        }
        if f.reset_every_ms > 0 {
            let d = self.rng.range(1, f.reset_every_ms) * MS;
            self.at(d, Ev::Reset);
        }
        if f.stall_every_ms > 0 {
            let d = self.rng.range(1, f.stall_every_ms) * MS;
            self.at(d, Ev::Stall);
        }
    }

    // ------------------------------------------------------------------ node life cycle

    fn volume_config(&self, i: usize) -> VolumeConfig {
        let mut v = VolumeConfig::new(NODES[i], "sim", self.cfg.volume_size, self.cfg.mode);
        v.queue_limit = self.faults.queue_limit;
        v.resync_chunk = self.cfg.resync_chunk;
        v.resync_depth = 4;
        v.checkpoint_bytes = self.faults.checkpoint_bytes;
        v.checkpoint_interval_ns = 200 * MS;
        // Small activity-log extents, so that resyncs of part of the volume happen.
        v.al_extent = 16 << 10;
        v.checksum_full_sync = self.cfg.seed.is_multiple_of(2);
        // A quarter of the seeds: a primary whose disk fails goes on diskless when it can.
        v.diskless_on_failure = self.cfg.seed % 4 == 3;
        // Bandwidth limits on a third of the seeds: items wait in the queue for budget.
        if self.cfg.seed % 3 == 1 {
            v.replication_rate = 16 << 20;
            v.resync_rate = 8 << 20;
        }
        if let Some(j) = self.journal_config(i) {
            // As the daemon does: the queue holds what the journal holds.
            v.queue_limit = v.queue_limit.max(j.capacity());
        }
        v
    }

    fn journal_config(&self, i: usize) -> Option<journal::JournalConfig> {
        (self.cfg.journal_size > 0).then(|| journal::JournalConfig {
            size: self.cfg.journal_size,
            boot_id: (self.nodes[i].boot as u128).to_le_bytes(),
        })
    }

    fn start_node(&mut self, i: usize) {
        let (mut meta, mut slot) = match Metadata::decode_area(&self.nodes[i].meta) {
            Ok(x) => x,
            Err(e) => panic!("unreachable: metadata undecodable is checked at restart: {e}"),
        };
        // The journal is scanned (and a trusted one redone on the disk) first, as the
        // daemon does.
        let mut attach = None;
        if let (Some(jcfg), Some(jd)) = (self.journal_config(i), self.nodes[i].journal.as_ref()) {
            let img = jd.image();
            let sb = journal::Superblock::pick(&img[..journal::DATA_START as usize])
                .ok()
                .filter(|(sb, _)| sb.check_identity("sim", self.cfg.volume_size).is_ok())
                .map(|(sb, _)| sb);
            let opening = journal::open(
                sb.as_ref(),
                img.len() as u64,
                &mut |at, len| {
                    let at = at as usize;
                    Ok(img[at.min(img.len())..(at + len).min(img.len())].to_vec())
                },
                &mut meta,
                &jcfg,
            );
            let report = opening.report.clone();
            self.log(|| format!("{} journal: {report}", NODES[i]));
            if opening.meta_changed {
                // The metadata names the records' blocks before they are redone.
                meta.counter += 1;
                slot = 1 - slot;
                let bytes = meta.encode_slot().expect("metadata encodes");
                self.nodes[i].meta[slot * SLOT_SIZE..(slot + 1) * SLOT_SIZE]
                    .copy_from_slice(&bytes);
            }
            let d = &mut self.nodes[i].disk;
            for it in &opening.redo {
                match &it.kind {
                    ItemKind::Write { offset, data, .. } => {
                        d.write(*offset, data.len() as u64, Some(data), false)
                    }
                    ItemKind::WriteZeroes { offset, len, .. } | ItemKind::Trim { offset, len } => {
                        d.write(*offset, *len, None, false)
                    }
                    _ => {}
                }
            }
            if !opening.redo.is_empty() {
                let m = d.flush_marker();
                d.flush(m);
                self.stats.journal_replays += 1;
            }
            attach = Some((jcfg, opening.start));
        }
        let mut vol = Volume::new(self.volume_config(i), meta);
        if let Some((jcfg, start)) = attach {
            vol.attach_journal(jcfg, start);
        }
        let n = &mut self.nodes[i];
        n.meta_slot = slot;
        n.vol = Some(vol);
        n.inc += 1;
        n.role = Role::Secondary;
        n.model = None;
        n.stopping = false;
        n.last_tick = 0;
        self.input(i, Input::Tick { now_ns: self.now });
    }

    fn alive(&self, i: usize) -> bool {
        self.nodes[i].vol.is_some()
    }

    // ------------------------------------------------------------------ engine plumbing

    fn input(&mut self, i: usize, input: Input) {
        let Some(vol) = self.nodes[i].vol.as_mut() else {
            return;
        };
        if self.now.saturating_sub(self.nodes[i].last_tick) >= MS
            && !matches!(input, Input::Tick { .. })
        {
            self.nodes[i].last_tick = self.now;
            vol.handle(Input::Tick { now_ns: self.now }, &mut self.out);
        }
        if let Input::Tick { .. } = input {
            self.nodes[i].last_tick = self.now;
        }
        vol.handle(input, &mut self.out);
        let outs = std::mem::take(&mut self.out);
        for o in outs {
            self.output(i, o);
        }
        self.after_input(i);
    }

    fn after_input(&mut self, i: usize) {
        let Some(vol) = self.nodes[i].vol.as_ref() else {
            return;
        };
        let (role, probe, stopped) = (vol.role(), vol.probe(), vol.is_stopped());
        if role != self.nodes[i].role {
            self.nodes[i].role = role;
            if role == Role::Primary {
                // Its image defines the data from now on.
                self.nodes[i].suspect = false;
                self.nodes[i].resets_seen = self.stream.resets;
                self.nodes[i].horizon = 0;
                // Baseline: what the node holds now is what its clients will see.
                let versions = self.contents(i).into_iter().map(Ops::version_of).collect();
                self.nodes[i].model = Some(PrimaryModel::baseline(versions));
            } else {
                self.nodes[i].model = None;
                self.left_primary(i, probe);
            }
        }
        if stopped {
            if role == Role::Primary {
                self.left_primary(i, probe);
            }
            self.log(|| format!("{} stopped cleanly", NODES[i]));
            self.nodes[i].vol = None;
            self.nodes[i].ops.clear();
            self.drop_requests(i);
            self.node_gone(i, true);
            self.stats.clean_restarts += 1;
            let d = self.rng.range(10, 2000) * MS;
            self.at(d, Ev::Restart(i));
        }
    }

    /// Node `i` stops being primary. Unless its peer had applied every sequence it issued,
    /// its image holds data the observed stream does not explain (the truth, which its peer
    /// gets by a full sync), so the replica checks leave it alone until it is resynced.
    fn left_primary(&mut self, i: usize, p: Probe) {
        if p.peer_applied < p.last_seq || p.peer_needs_full_sync || p.last_seq > self.stream.max_seq
        {
            self.nodes[i].suspect = true;
        }
    }

    fn output(&mut self, i: usize, o: Output) {
        match o {
            Output::Disk(d) => {
                let n = &mut self.nodes[i];
                let marker = match (&d.kind, n.journal.as_ref()) {
                    (DiskKind::JournalSync, Some(j)) => j.flush_marker(),
                    _ => n.disk.flush_marker(),
                };

                let mut lat = self.rng.range(20, 400) * 1000;
                if self.rng.chance(self.faults.slow_disk) {
                    lat += self.rng.range(10, 800) * MS;
                }
                let inc = n.inc;
                self.log(|| format!("{} disk op {} {:?}", NODES[i], d.op, brief(&d.kind)));
                self.nodes[i].ops.insert(
                    d.op,
                    DiskPending {
                        kind: d.kind,
                        marker,
                        fail: false,
                    },
                );
                self.at(
                    lat,
                    Ev::DiskDone {
                        node: i,
                        inc,
                        op: d.op,
                    },
                );
            }
            Output::Send { conn, msg } => self.send(i, conn, msg),
            Output::Close { conn, reason } => {
                self.log(|| format!("{} closes conn {conn}: {reason}", NODES[i]));
                self.close_side(i, conn);
            }
            Output::Complete { req, result } => self.complete(i, req, result),
            Output::AdminDone { token, result } => {
                let _ = token;
                match &result {
                    Ok(m) => {
                        self.log(|| format!("{} admin ok: {m}", NODES[i]));
                        if m.starts_with("forced") {
                            self.stats.forced_takeovers += 1;
                        }
                        if m.contains("after rolling back the catch-up") {
                            self.stats.undo_rollbacks += 1;
                        }
                        if m.starts_with("promoted") || m.starts_with("forced") {
                            self.stats.promotes_ok += 1;
                        } else if m.starts_with("demoted") {
                            self.stats.demotes_ok += 1;
                        }
                    }
                    Err(e) => {
                        if e.code != "shutting_down" {
                            self.stats.promotes_refused += 1;
                        }
                        self.log(|| {
                            format!("{} admin refused: {} {}", NODES[i], e.code, e.message)
                        });
                    }
                }
            }
            Output::Event(e) => {
                if e.kind == "verify" && e.message.starts_with("verify complete") {
                    self.stats.verifies_completed += 1;
                    // The simulated disks corrupt nothing silently: a verify of a pair in
                    // sync, ordered in the stream, must find every block equal.
                    if !e.message.contains("all") {
                        self.fail(violation("verify-difference", e.message.clone()));
                    }
                }
                if e.kind == "takeover" && e.message.starts_with("rolled back") {
                    self.check_rollback(i);
                    // Its image is the one from before the catch-up, which the checker's
                    // rebased stream no longer describes: checked just now, left alone by
                    // the replica checks until it is primary (baseline) or resynced.
                    self.nodes[i].suspect = true;
                }
                if e.kind == "resolve" {
                    self.stats.split_brains_resolved += 1;
                }
                if e.kind == "failure" && e.message.contains("goes on diskless") {
                    self.stats.diskless += 1;
                }
                if e.kind == "resync" && e.message.starts_with("resync to the peer started") {
                    self.stats.full_syncs += 1;
                }
                self.log(|| format!("{} event {}: {}", NODES[i], e.kind, e.message));
            }
            Output::Stopped => {}
        }
    }

    // ------------------------------------------------------------------ disks

    /// Whether the disk operation completing now on node `i` fails. One failure at a
    /// time: a disk fails only while the other node holds an up-to-date copy and this one
    /// owes it nothing (two lost copies need an operator to choose the data).
    fn disk_fails(&mut self, i: usize) -> bool {
        let other_ok = self.nodes[1 - i]
            .vol
            .as_ref()
            .is_some_and(|v| v.probe().disk_state == DiskState::UpToDate)
            && !self.nodes[1 - i].suspect
            && !self.nodes[i]
                .vol
                .as_ref()
                .is_some_and(|v| v.probe().resync_running || v.probe().peer_needs_full_sync);
        !self.liveness
            && i == self.faults.disk_error_node
            && other_ok
            && self.rng.chance(self.faults.disk_error)
    }

    fn disk_done(&mut self, i: usize, inc: u64, op: OpId) {
        if self.nodes[i].inc != inc {
            return; // the node crashed meanwhile
        }
        let Some(mut p) = self.nodes[i].ops.remove(&op) else {
            return;
        };
        p.fail = self.disk_fails(i);
        if p.fail {
            self.log(|| format!("{} disk op {op} fails", NODES[i]));
        }
        let mut capture = None;
        let n = &mut self.nodes[i];
        let result: Result<Option<Bytes>, IoError> = match p.kind {
            DiskKind::Read { offset, len } => {
                if p.fail {
                    Err(IoError::Io)
                } else {
                    Ok(Some(Bytes::from(n.disk.read(offset, len))))
                }
            }
            DiskKind::Write { offset, data, fua } => {
                if p.fail {
                    // A failed write may have landed in part.
                    let k = self.rng.below(data.len() as u64 / SECTOR + 1) * SECTOR;
                    if k > 0 {
                        n.disk.write(offset, k, Some(&data[..k as usize]), false);
                    }
                    Err(IoError::Io)
                } else {
                    n.disk.write(offset, data.len() as u64, Some(&data), fua);
                    Ok(None)
                }
            }
            DiskKind::WriteZeroes { offset, len, fua } => {
                if p.fail {
                    Err(IoError::Io)
                } else {
                    n.disk.write(offset, len, None, fua);
                    Ok(None)
                }
            }
            DiskKind::Trim { offset, len } => {
                if p.fail {
                    Err(IoError::Io)
                } else {
                    n.disk.write(offset, len, None, false);
                    Ok(None)
                }
            }
            DiskKind::Flush => {
                if p.fail {
                    Err(IoError::Io)
                } else {
                    n.disk.flush(p.marker);
                    Ok(None)
                }
            }
            DiskKind::WriteMeta(m) => {
                if p.fail {
                    Err(IoError::Io)
                } else {
                    let slot = 1 - n.meta_slot;
                    if m.disk_state == DiskState::Inconsistent {
                        n.rebase_pending = false;
                    }
                    let bytes = m.encode_slot().expect("metadata encodes");
                    n.meta[slot * SLOT_SIZE..(slot + 1) * SLOT_SIZE].copy_from_slice(&bytes);
                    n.meta_slot = slot;
                    if let Some(u) = m.undo {
                        if n.undo_image.as_ref().map(|x| x.0) != Some(u.id) {
                            // The session is on disk from now on; nothing was overwritten
                            // yet (the applier waits for this write).
                            capture = Some(u.id);
                        }
                    }
                    Ok(None)
                }
            }
            DiskKind::JournalWrite { pos, parts } => {
                if p.fail {
                    Err(IoError::Io)
                } else {
                    let data = parts.concat();
                    let j = n.journal.as_mut().expect("journal configured");
                    j.write(pos, data.len() as u64, Some(&data), false);
                    Ok(None)
                }
            }
            DiskKind::JournalRead { pos, len } => {
                if p.fail {
                    Err(IoError::Io)
                } else {
                    let j = n.journal.as_ref().expect("journal configured");
                    Ok(Some(Bytes::from(j.read(pos, len))))
                }
            }
            DiskKind::JournalSync => {
                if p.fail {
                    Err(IoError::Io)
                } else {
                    n.journal
                        .as_mut()
                        .expect("journal configured")
                        .flush(p.marker);
                    Ok(None)
                }
            }
        };
        if p.fail {
            self.stats.disk_errors += 1;
        }
        if let Some(id) = capture {
            self.stats.undo_sessions += 1;
            let image = self.contents(i);
            self.nodes[i].undo_image = Some((id, image));
            if !self.liveness && self.rng.chance(0.4) {
                // At a random moment of the catch-up (it may be over by then).
                let d = self.rng.range(1, 800) * MS;
                self.at(d, Ev::CatchupTakeover(i));
            }
        }
        self.input(i, Input::DiskDone { op, result });
    }

    /// A forced takeover rolled node `i` back: its image must be the one it held when the
    /// catch-up's session was recorded, sector for sector.
    fn check_rollback(&mut self, i: usize) {
        let now = self.contents(i);
        let Some((id, before)) = self.nodes[i].undo_image.as_ref() else {
            self.fail(violation(
                "rollback-image",
                format!(
                    "{} rolled back a catch-up whose start was never seen",
                    NODES[i]
                ),
            ));
            return;
        };
        if let Some(s) = (0..now.len()).find(|&s| now[s] != before[s]) {
            let msg = format!(
                "{} rolled back catch-up {id}, but sector {s} holds {:?} where the image at \
                 its start held {:?}",
                NODES[i], now[s], before[s]
            );
            self.fail(violation("rollback-image", msg));
        }
    }

    fn contents(&self, i: usize) -> Vec<Content> {
        self.nodes[i]
            .disk
            .image()
            .chunks(SECTOR as usize)
            .enumerate()
            .map(|(s, b)| content(b, s as u64))
            .collect()
    }

    fn durable_contents(&self, i: usize) -> Vec<Content> {
        self.nodes[i]
            .disk
            .durable_image()
            .chunks(SECTOR as usize)
            .enumerate()
            .map(|(s, b)| content(b, s as u64))
            .collect()
    }

    // ------------------------------------------------------------------ checks

    fn check_replica(&mut self) {
        // Exactly one primary: without a forced takeover (not implemented yet) two nodes
        // must never both accept writes.
        if self
            .nodes
            .iter()
            .all(|n| n.vol.as_ref().is_some_and(|v| v.role() == Role::Primary))
        {
            return self.fail(violation(
                "two-primaries",
                "both nodes are primary at the same time (split brain)".into(),
            ));
        }
        for (i, name) in NODES.iter().enumerate() {
            let Some(vol) = self.nodes[i].vol.as_ref() else {
                continue;
            };
            let p = vol.probe();
            let n = &self.nodes[i];
            if p.role != Role::Secondary
                || !matches!(p.disk_state, DiskState::UpToDate | DiskState::Consistent)
                || n.suspect
                || p.applied < n.horizon
                || self.stream.items == 0
            {
                continue;
            }
            self.stats.prefix_checks += 1;
            let cs = self.contents(i);
            if let Err(mut v) = self.stream.check_prefix(&cs, p.applied) {
                v.detail = format!("{name}: {}", v.detail);
                return self.fail(v);
            }
        }
    }

    fn fail(&mut self, v: Violation) {
        self.log(|| format!("VIOLATION {v}"));
        if self.failure.is_none() {
            self.failure = Some(v);
        }
    }
}

fn fnv(b: &[u8]) -> u64 {
    b.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &x| {
        (h ^ x as u64).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

fn brief(k: &DiskKind) -> String {
    match k {
        DiskKind::Read { offset, len } => format!("read {}+{}", offset / SECTOR, len / SECTOR),
        DiskKind::Write { offset, data, fua } => format!(
            "write {}+{}{}",
            offset / SECTOR,
            data.len() as u64 / SECTOR,
            if *fua { " fua" } else { "" }
        ),
        DiskKind::WriteZeroes { offset, len, .. } => {
            format!("zeroes {}+{}", offset / SECTOR, len / SECTOR)
        }
        DiskKind::Trim { offset, len } => format!("trim {}+{}", offset / SECTOR, len / SECTOR),
        DiskKind::Flush => "flush".into(),
        DiskKind::WriteMeta(m) => format!(
            "meta applied {} role {:?} {:?} flags {} dirty {:?}",
            m.applied_seq,
            m.role,
            m.disk_state,
            m.flags,
            m.dirty
                .iter()
                .map(|(s, e)| format!("{}+{}", s / SECTOR, (e - s) / SECTOR))
                .collect::<Vec<_>>()
        ),
        DiskKind::JournalWrite { pos, parts } => {
            format!(
                "journal {pos}+{}",
                parts.iter().map(|p| p.len()).sum::<usize>()
            )
        }
        DiskKind::JournalRead { pos, len } => format!("journal read {pos}+{len}"),
        DiskKind::JournalSync => "journal sync".into(),
    }
}

fn brief_msg(m: &Msg) -> String {
    match m {
        Msg::Item(it) => {
            let what = match &it.kind {
                ItemKind::Write { offset, data, .. } => {
                    format!("write {}+{}", offset / SECTOR, data.len() as u64 / SECTOR)
                }
                ItemKind::WriteZeroes { offset, len, .. } => {
                    format!("zeroes {}+{}", offset / SECTOR, len / SECTOR)
                }
                ItemKind::Trim { offset, len } => {
                    format!("trim {}+{}", offset / SECTOR, len / SECTOR)
                }
                ItemKind::Flush => "flush".into(),
                ItemKind::Verify { offset, len, .. } => {
                    format!("verify {}+{}", offset / SECTOR, len / SECTOR)
                }
            };
            format!(
                "item {} dep {}{} {what}",
                it.seq,
                it.dep,
                if it.resync { " resync" } else { "" }
            )
        }
        Msg::Hello(h) => format!(
            "hello {:?} {:?} applied {} gen {:x} full {} dirty {:?}",
            h.role,
            h.disk_state,
            h.applied_seq,
            h.generation,
            h.needs_full_sync,
            h.dirty
                .iter()
                .map(|(s, e)| format!("{}+{}", s / SECTOR, (e - s) / SECTOR))
                .collect::<Vec<_>>()
        ),
        other => format!("{other:?}"),
    }
}
