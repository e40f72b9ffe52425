//! Two engines wired together in memory: a small deterministic harness that checks the
//! replication logic end to end without a kernel (the full simulator builds on this idea).

use blkrep_engine::meta::Metadata;
use blkrep_engine::msg::Msg;
use blkrep_engine::*;
use bytes::Bytes;
use std::collections::VecDeque;

const SIZE: u64 = 1 << 20;

struct Node {
    vol: Volume,
    disk: Vec<u8>,
    ops: Vec<DiskOp>,
    inbox: VecDeque<Msg>,
    done: Vec<(ReqId, Result<Option<Bytes>, IoError>)>,
    admin: Vec<Result<String, AdminError>>,
    events: Vec<Event>,
    meta_writes: u64,
    cfg: VolumeConfig,
    /// The last metadata written (what a restart reads).
    meta: Metadata,
    /// The journal's bytes (completed writes only: a crash of the process, same boot).
    journal: Option<Vec<u8>>,
}

struct Pair {
    n: [Node; 2],
    connected: bool,
    conn: ConnId,
    rng: u64,
    now: u64,
}

impl Pair {
    fn new(mode: Mode, seed: u64) -> Pair {
        let mk = |name: &str| {
            let mut cfg = VolumeConfig::new(name, "r0", SIZE, mode);
            cfg.resync_chunk = 64 << 10;
            cfg.queue_limit = 256 << 10;
            let meta = Metadata::new("r0", name, SIZE, 1);
            Node {
                vol: Volume::new(cfg.clone(), meta.clone()),
                disk: vec![0; SIZE as usize],
                ops: vec![],
                inbox: VecDeque::new(),
                done: vec![],
                admin: vec![],
                events: vec![],
                meta_writes: 0,
                cfg,
                meta,
                journal: None,
            }
        };
        Pair {
            n: [mk("a"), mk("b")],
            connected: false,
            conn: 0,
            rng: seed | 1,
            now: 0,
        }
    }

    fn rand(&mut self, n: u64) -> u64 {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        self.rng % n
    }

    fn input(&mut self, i: usize, input: Input) {
        let mut out = vec![];
        self.n[i].vol.handle(input, &mut out);
        for o in out {
            match o {
                Output::Disk(op) => self.n[i].ops.push(op),
                Output::Send { conn, msg } => {
                    if self.connected && conn == self.conn {
                        self.n[1 - i].inbox.push_back(msg)
                    }
                }
                Output::Close { conn, .. } => {
                    if self.connected && conn == self.conn {
                        self.disconnect();
                    }
                }
                Output::Complete { req, result } => self.n[i].done.push((req, result)),
                Output::AdminDone { result, .. } => self.n[i].admin.push(result),
                Output::Event(e) => self.n[i].events.push(e),
                Output::Stopped => {}
            }
        }
    }

    fn connect(&mut self) {
        self.conn += 1;
        self.connected = true;
        let c = self.conn;
        self.input(0, Input::PeerConnected { conn: c });
        self.input(1, Input::PeerConnected { conn: c });
    }

    fn disconnect(&mut self) {
        if !self.connected {
            return;
        }
        self.connected = false;
        let c = self.conn;
        self.n[0].inbox.clear();
        self.n[1].inbox.clear();
        self.input(0, Input::PeerClosed { conn: c });
        self.input(1, Input::PeerClosed { conn: c });
    }

    /// Complete one random disk op or deliver one message; false when idle.
    fn step(&mut self) -> bool {
        let mut choices = vec![];
        for i in 0..2 {
            if !self.n[i].ops.is_empty() {
                choices.push((i, true));
            }
            if !self.n[i].inbox.is_empty() {
                choices.push((i, false));
            }
        }
        if choices.is_empty() {
            return false;
        }
        let (i, disk) = choices[self.rand(choices.len() as u64) as usize];
        if disk {
            let k = self.rand(self.n[i].ops.len() as u64) as usize;
            let op = self.n[i].ops.remove(k);
            let d = &mut self.n[i].disk;
            let result = match op.kind {
                DiskKind::Read { offset, len } => Ok(Some(Bytes::copy_from_slice(
                    &d[offset as usize..(offset + len) as usize],
                ))),
                DiskKind::Write { offset, data, .. } => {
                    d[offset as usize..offset as usize + data.len()].copy_from_slice(&data);
                    Ok(None)
                }
                DiskKind::WriteZeroes { offset, len, .. } | DiskKind::Trim { offset, len } => {
                    d[offset as usize..(offset + len) as usize].fill(0);
                    Ok(None)
                }
                DiskKind::Flush => Ok(None),
                DiskKind::WriteMeta(m) => {
                    self.n[i].meta_writes += 1;
                    self.n[i].meta = m;
                    Ok(None)
                }
                DiskKind::JournalWrite { pos, parts } => {
                    let j = self.n[i].journal.as_mut().expect("journal configured");
                    let data = parts.concat();
                    j[pos as usize..pos as usize + data.len()].copy_from_slice(&data);
                    Ok(None)
                }
                DiskKind::JournalRead { pos, len } => {
                    let j = self.n[i].journal.as_ref().expect("journal configured");
                    Ok(Some(Bytes::copy_from_slice(
                        &j[pos as usize..(pos + len) as usize],
                    )))
                }
                DiskKind::JournalSync => Ok(None),
            };
            self.input(i, Input::DiskDone { op: op.op, result });
        } else {
            let msg = self.n[i].inbox.pop_front().unwrap();
            let c = self.conn;
            self.input(i, Input::PeerMsg { conn: c, msg });
        }
        true
    }

    fn run(&mut self) {
        let mut n = 0;
        while self.step() {
            n += 1;
            if n % 64 == 0 {
                self.now += 10_000_000;
                let now = self.now;
                self.input(0, Input::Tick { now_ns: now });
                self.input(1, Input::Tick { now_ns: now });
            }
            assert!(n < 10_000_000, "no progress");
        }
        // Let periodic checkpoints and acks settle.
        for _ in 0..3 {
            self.now += 2_000_000_000;
            let now = self.now;
            self.input(0, Input::Tick { now_ns: now });
            self.input(1, Input::Tick { now_ns: now });
            while self.step() {}
        }
    }

    fn admin(&mut self, i: usize, cmd: AdminCmd) -> Result<String, AdminError> {
        self.input(i, Input::Admin { token: 1, cmd });
        self.run();
        self.n[i].admin.pop().expect("admin answered")
    }

    fn write(&mut self, i: usize, req: ReqId, offset: u64, len: usize, byte: u8) {
        let data = Bytes::from(vec![byte; len]);
        self.input(
            i,
            Input::ClientWrite {
                req,
                offset,
                data,
                fua: false,
            },
        );
    }
}

fn promote() -> AdminCmd {
    AdminCmd::Promote {
        force: false,
        new_generation: 0xfeed,
    }
}

fn random_writes(p: &mut Pair, i: usize, n: u64, base_req: u64) {
    for r in 0..n {
        let off = p.rand(SIZE / 4096 - 4) * 4096;
        let len = (1 + p.rand(4) as usize) * 4096;
        let byte = (p.rand(255) + 1) as u8;
        p.write(i, base_req + r, off, len, byte);
        if p.rand(8) == 0 {
            p.input(
                i,
                Input::ClientFlush {
                    req: base_req + 100_000 + r,
                },
            );
        }
        // Interleave progress so requests overlap in flight.
        for _ in 0..p.rand(6) {
            p.step();
        }
    }
    p.run();
}

#[test]
fn replicate_both_modes_and_swap_roles() {
    for mode in [Mode::Sync, Mode::Async] {
        for seed in 1..40u64 {
            let mut p = Pair::new(mode, seed * 7919);
            p.connect();
            p.run();
            assert!(p.admin(0, promote()).is_ok());
            random_writes(&mut p, 0, 200, 1);
            assert_eq!(
                p.n[0].disk, p.n[1].disk,
                "seed {seed} {mode:?}: replica differs"
            );
            assert!(p.n[0].done.iter().all(|(_, r)| r.is_ok()));
            assert_eq!(p.n[1].vol.status().disk_state, DiskState::UpToDate);
            // A write on the secondary is refused.
            p.write(1, 9, 0, 4096, 1);
            assert_eq!(p.n[1].done.pop().unwrap().1, Err(IoError::ReadOnly));
            // Planned switchover.
            assert_eq!(p.admin(1, promote()).unwrap_err().code, "peer_is_primary");
            p.admin(0, AdminCmd::Demote).unwrap();
            p.admin(1, promote()).unwrap();
            random_writes(&mut p, 1, 100, 1_000_000);
            assert_eq!(
                p.n[0].disk, p.n[1].disk,
                "seed {seed} {mode:?}: after switchover"
            );
        }
    }
}

#[test]
fn outage_resumes_from_queue_and_overflow_falls_back_to_full_sync() {
    for seed in 1..20u64 {
        let mut p = Pair::new(Mode::Async, seed);
        p.connect();
        p.run();
        p.admin(0, promote()).unwrap();
        random_writes(&mut p, 0, 50, 1);
        p.disconnect();
        // Small outage: fits in the queue.
        random_writes(&mut p, 0, 10, 1000);
        assert!(
            p.n[0].done.iter().all(|(_, r)| r.is_ok()),
            "writes continue while away"
        );
        p.connect();
        p.run();
        assert_eq!(p.n[0].disk, p.n[1].disk, "seed {seed}: resume");
        assert!(p.n[0].events.iter().any(|e| e.kind == "stream"));
        // Long outage: overflows the 256 KiB queue.
        p.disconnect();
        random_writes(&mut p, 0, 200, 5000);
        assert!(p.n[0].vol.status().peer_needs_full_sync);
        p.connect();
        p.run();
        assert_eq!(p.n[0].disk, p.n[1].disk, "seed {seed}: full sync");
        assert!(!p.n[0].vol.status().peer_needs_full_sync);
    }
}

#[test]
fn sync_mode_waits_for_peer_and_degrades_on_disconnect() {
    let mut p = Pair::new(Mode::Sync, 5);
    p.connect();
    p.run();
    p.admin(0, promote()).unwrap();
    p.write(0, 77, 0, 4096, 9);
    // Complete only the local disk op: the client must not see completion yet.
    while !p.n[0].ops.is_empty() {
        let op = p.n[0].ops.remove(0);
        p.input(
            0,
            Input::DiskDone {
                op: op.op,
                result: Ok(None),
            },
        );
    }
    assert!(
        p.n[0].done.iter().all(|(r, _)| *r != 77),
        "sync write completed before the peer had it"
    );
    p.disconnect();
    assert!(
        p.n[0].done.iter().any(|(r, res)| *r == 77 && res.is_ok()),
        "degraded completion"
    );
}

#[test]
fn both_primary_is_refused() {
    let mut p = Pair::new(Mode::Sync, 3);
    p.connect();
    p.run();
    p.admin(0, promote()).unwrap();
    random_writes(&mut p, 0, 20, 1);
    p.disconnect();
    // b cannot be promoted without its peer (forced takeover comes later).
    assert_eq!(
        p.admin(1, promote()).unwrap_err().code,
        "peer_not_connected"
    );
}

#[test]
fn bad_requests_get_errors() {
    let mut p = Pair::new(Mode::Async, 3);
    p.connect();
    p.run();
    p.admin(0, promote()).unwrap();
    p.write(0, 1, SIZE - 4096, 8192, 1);
    p.write(0, 2, 100, 512, 1);
    p.input(
        0,
        Input::ClientRead {
            req: 3,
            offset: SIZE,
            len: 512,
        },
    );
    let errs: Vec<_> = p.n[0]
        .done
        .iter()
        .map(|(_, r)| r.clone().unwrap_err())
        .collect();
    assert_eq!(errs, vec![IoError::Invalid; 3]);
    p.run();
    assert_eq!(p.n[0].disk, p.n[1].disk);
}

// ---- the primary's journal ----------------------------------------------------------

const BOOT: [u8; 16] = [9; 16];

impl Pair {
    /// Give node `i` a journal of `size` bytes (a fresh one).
    fn add_journal(&mut self, i: usize, size: u64) {
        self.n[i].journal = Some(vec![0; size as usize]);
        let cfg = journal::JournalConfig {
            size,
            boot_id: BOOT,
        };
        // As the daemon does: the queue holds what the journal holds.
        self.n[i].cfg.queue_limit = cfg.capacity();
        self.n[i].vol = Volume::new(self.n[i].cfg.clone(), self.n[i].meta.clone());
        self.n[i].vol.attach_journal(cfg, JournalStart::default());
        // attach_journal's superblock write goes out with the next input's outputs.
        self.input(i, Input::Tick { now_ns: self.now });
    }

    /// kill -9 of node `i`'s daemon: operations in flight are lost, completed ones (page
    /// cache) stay. The restart scans the journal as the daemon does: a trusted journal is
    /// redone on the disk and replayed, an untrusted one's ranges join the dirty set.
    /// Returns the scan's torn-tail report.
    fn crash_and_restart(&mut self, i: usize, damage: impl FnOnce(&mut Vec<u8>)) -> Option<String> {
        self.disconnect();
        let n = &mut self.n[i];
        n.ops.clear();
        let mut meta = n.meta.clone();
        let cfg = n.cfg.clone();
        let mut jbytes = n.journal.clone().expect("journal");
        damage(&mut jbytes);
        let size = jbytes.len() as u64;
        let jcfg = journal::JournalConfig {
            size,
            boot_id: BOOT,
        };
        let (sb, _) =
            journal::Superblock::pick(&jbytes[..journal::DATA_START as usize]).expect("superblock");
        let opening = journal::open(
            Some(&sb),
            size,
            &mut |at, len| {
                let at = at as usize;
                Ok(jbytes[at.min(jbytes.len())..(at + len).min(jbytes.len())].to_vec())
            },
            &mut meta,
            &jcfg,
        );
        let torn = opening
            .report
            .contains("torn")
            .then(|| opening.report.clone());
        for it in &opening.redo {
            match &it.kind {
                msg::ItemKind::Write { offset, data, .. } => {
                    n.disk[*offset as usize..*offset as usize + data.len()].copy_from_slice(data)
                }
                msg::ItemKind::WriteZeroes { offset, len, .. }
                | msg::ItemKind::Trim { offset, len } => {
                    n.disk[*offset as usize..(*offset + *len) as usize].fill(0)
                }
                _ => {}
            }
        }
        let start = opening.start;
        n.journal = Some(jbytes);
        n.vol = Volume::new(cfg, meta);
        n.vol.attach_journal(jcfg, start);
        n.events.clear();
        n.done.clear();
        let now = self.now;
        self.input(i, Input::Tick { now_ns: now });
        torn
    }
}

/// Every block holds the last acknowledged write into it or a later write (submitted
/// after it, acknowledged or not): nothing acknowledged was lost or rolled back.
fn check_acked(disk: &[u8], log: &[(ReqId, u64, usize, u8)], acked_reqs: &[ReqId]) {
    for blk in 0..(SIZE / 4096) {
        let at = blk * 4096;
        let writes: Vec<&(ReqId, u64, usize, u8)> = log
            .iter()
            .filter(|(_, o, l, _)| *o <= at && at < o + *l as u64)
            .collect();
        let Some(last_acked) = writes.iter().rposition(|w| acked_reqs.contains(&w.0)) else {
            continue;
        };
        let got = disk[at as usize];
        assert!(
            writes[last_acked..].iter().any(|w| w.3 == got),
            "block {blk}: holds {got}, but write {:?} was acknowledged",
            writes[last_acked]
        );
    }
}

fn logged_writes(
    p: &mut Pair,
    i: usize,
    n: u64,
    base_req: u64,
    log: &mut Vec<(ReqId, u64, usize, u8)>,
) {
    for r in 0..n {
        let off = p.rand(SIZE / 4096 - 4) * 4096;
        let len = (1 + p.rand(4) as usize) * 4096;
        let byte = (p.rand(255) + 1) as u8;
        let req = base_req + r;
        log.push((req, off, len, byte));
        p.write(i, req, off, len, byte);
        for _ in 0..p.rand(6) {
            p.step();
        }
    }
}

/// A pair whose node 0 has a journal of `ring` bytes (plus superblocks) and is primary.
fn journaled_pair(seed: u64, ring: u64) -> Pair {
    let mut p = Pair::new(Mode::Async, seed);
    p.add_journal(0, journal::DATA_START + ring);
    p.connect();
    p.run();
    p.admin(0, promote()).unwrap();
    p
}

#[test]
fn journal_streams_and_empties_as_the_peer_acknowledges() {
    for seed in 1..10u64 {
        let mut p = journaled_pair(seed, 1 << 20);
        random_writes(&mut p, 0, 150, 1);
        assert_eq!(p.n[0].disk, p.n[1].disk, "seed {seed}");
        let j = p.n[0].vol.status().journal.expect("journal status");
        assert_eq!(j.state, "active");
        assert_eq!(j.used, 0, "seed {seed}: every record released: {j:?}");
        assert!(j.appended >= 150);
    }
}

#[test]
fn journal_replays_after_a_crash_without_resync() {
    for seed in 1..25u64 {
        let mut p = journaled_pair(seed, 2 << 20);
        let mut log = vec![];
        logged_writes(&mut p, 0, 40, 1, &mut log);
        p.run();
        p.disconnect();
        // The outage: writes go to the journal; the crash hits with some in flight.
        logged_writes(&mut p, 0, 30, 1000, &mut log);
        let acked_reqs: Vec<ReqId> = p.n[0]
            .done
            .iter()
            .filter(|d| d.1.is_ok())
            .map(|d| d.0)
            .collect();
        let torn = p.crash_and_restart(0, |_| {});
        assert_eq!(torn, None, "seed {seed}");
        p.connect();
        p.run();
        let r = p.admin(0, promote());
        assert!(r.is_ok(), "seed {seed}: {r:?}");
        p.run();
        let ev = |k: &str| p.n[0].events.iter().any(|e| e.kind == k);
        assert!(
            p.n[0]
                .events
                .iter()
                .any(|e| e.message.contains("journal replay")),
            "seed {seed}: {:?}",
            p.n[0].events
        );
        assert!(
            !ev("resync"),
            "seed {seed}: no resync after a replay: {:?}",
            p.n[0].events
        );
        assert_eq!(p.n[0].disk, p.n[1].disk, "seed {seed}: replica");
        check_acked(&p.n[1].disk, &log, &acked_reqs);
    }
}

#[test]
fn a_torn_journal_tail_falls_back_to_a_resync_and_loses_nothing() {
    for seed in 1..25u64 {
        let mut p = journaled_pair(seed, 2 << 20);
        let mut log = vec![];
        logged_writes(&mut p, 0, 20, 1, &mut log);
        p.run();
        p.disconnect();
        logged_writes(&mut p, 0, 20, 1000, &mut log);
        p.run();
        let acked_reqs: Vec<ReqId> = p.n[0]
            .done
            .iter()
            .filter(|d| d.1.is_ok())
            .map(|d| d.0)
            .collect();
        let tail = p.n[0].vol.status().journal.unwrap();
        assert!(tail.records > 0);
        // Damage the newest record: flip a byte in the last written 4 KiB of the ring.
        let torn = p.crash_and_restart(0, |j| {
            let last = (journal::DATA_START as usize..j.len())
                .step_by(512)
                .rfind(|&at| &j[at..at + 8] == b"BLKRJREC")
                .expect("a record");
            j[last + 200] ^= 0xff;
        });
        assert!(torn.is_some(), "seed {seed}: the damage is seen");
        p.connect();
        p.run();
        p.admin(0, promote()).unwrap();
        p.run();
        assert!(
            p.n[0].events.iter().any(|e| e.kind == "resync"),
            "seed {seed}"
        );
        assert_eq!(p.n[0].disk, p.n[1].disk, "seed {seed}: replica");
        check_acked(&p.n[1].disk, &log, &acked_reqs);
    }
}

#[test]
fn journal_overflow_switches_to_the_dirty_set_and_catches_up() {
    for seed in 1..10u64 {
        let mut p = journaled_pair(seed, 256 << 10);
        random_writes(&mut p, 0, 20, 1);
        p.disconnect();
        random_writes(&mut p, 0, 200, 1000);
        assert!(
            p.n[0].done.iter().all(|(_, r)| r.is_ok()),
            "seed {seed}: writes never fail"
        );
        let j = p.n[0].vol.status().journal.unwrap();
        assert!(j.overflows >= 1, "seed {seed}: {j:?}");
        assert_eq!(j.state, "bitmap");
        p.connect();
        p.run();
        assert_eq!(p.n[0].disk, p.n[1].disk, "seed {seed}");
        let j = p.n[0].vol.status().journal.unwrap();
        assert_eq!(
            j.state, "active",
            "seed {seed}: back to the journal after the catch-up"
        );
    }
}

/// The images a replica may hold: the volume after each prefix of the write log (writes
/// take their stream positions in submission order, and overlapping ones complete in it).
fn prefix_images(log: &[(ReqId, u64, usize, u8)]) -> Vec<Vec<u8>> {
    let mut img = vec![0u8; SIZE as usize];
    let mut out = vec![img.clone()];
    for &(_, off, len, byte) in log {
        img[off as usize..off as usize + len].fill(byte);
        out.push(img.clone());
    }
    out
}

#[test]
fn a_takeover_during_a_catch_up_rolls_back_to_a_consistent_image() {
    let mut rolled_back = 0;
    let mut restarted = 0;
    for seed in 1..41u64 {
        let mut p = journaled_pair(seed, 128 << 10);
        // The secondary's journal device holds the undo log during a catch-up.
        p.add_journal(1, journal::DATA_START + (4 << 20));
        p.connect();
        p.run();
        let mut log = vec![];
        logged_writes(&mut p, 0, 30, 1, &mut log);
        p.run();
        p.disconnect();
        // A long outage: the journal overflows, the primary falls back to its dirty set.
        logged_writes(&mut p, 0, 150, 1000, &mut log);
        p.run();
        assert_eq!(p.n[0].vol.status().journal.unwrap().state, "bitmap");
        p.connect();
        // The catch-up runs for a random while (new writes keep coming), then the primary
        // site is lost.
        let k = p.rand(300);
        for r in 0..k {
            if !p.step() {
                break;
            }
            if r % 25 == 0 {
                let req = 5000 + r;
                let off = p.rand(SIZE / 4096 - 4) * 4096;
                let byte = (p.rand(255) + 1) as u8;
                log.push((req, off, 4096, byte));
                p.write(0, req, off, 4096, byte);
            }
        }
        p.disconnect();
        let session = p.n[1].vol.probe().undo_active;
        if seed % 3 == 0 {
            // ...and the secondary's daemon is killed too before the operator acts: the
            // restart finds the undo log by scanning the journal device.
            p.crash_and_restart(1, |_| {});
            restarted += 1;
        }
        // The operator acts a moment later (applies in flight finish meanwhile).
        p.run();
        let r = p.admin(
            1,
            AdminCmd::Promote {
                force: true,
                new_generation: 0xbeef + seed,
            },
        );
        let msg = r.unwrap_or_else(|e| panic!("seed {seed}: takeover refused: {e:?}"));
        if session {
            assert!(msg.contains("after rolling back"), "seed {seed}: {msg}");
            rolled_back += 1;
        }
        // Whatever moment it was, the image is the volume after some prefix of the writes.
        let images = prefix_images(&log);
        let m = images.iter().rposition(|img| *img == p.n[1].disk);
        assert!(
            m.is_some(),
            "seed {seed}: after the takeover ({msg}) the image is no prefix of the write log"
        );
        // Failback: the old primary gives up what the new one lacks; both end equal.
        logged_writes(&mut p, 1, 10, 9000, &mut log);
        p.run();
        let _ = p.admin(0, AdminCmd::Demote);
        p.admin(0, AdminCmd::ResolveDiscardLocal)
            .unwrap_or_else(|e| panic!("seed {seed}: {e:?}"));
        p.connect();
        p.run();
        assert_eq!(
            p.n[0].disk, p.n[1].disk,
            "seed {seed}: failback after the rolled-back catch-up"
        );
    }
    // The moments cover both sides: some takeovers hit a catch-up in progress.
    eprintln!("rolled back {rolled_back}, restarted {restarted}");
    assert!(
        rolled_back >= 8,
        "only {rolled_back} of 40 takeovers rolled back"
    );
    assert!(restarted > 0);
}
