//! Local legs: the volume's local storage kept on one or two devices (`backing` and the
//! optional `mirror`), each a full copy.
//!
//! This module holds the legs' state and its persistent record; the event loop
//! (`daemon/legs_io.rs`) carries the I/O out. The engine sees one disk: a write it issues
//! goes to every healthy leg and completes when they have all answered, successfully if
//! one of them took it; a read goes to one healthy leg and, if that leg fails or does not
//! answer within `leg_timeout`, again to the other. A leg that fails is taken out
//! (`Failed`), recorded in the state file before the request that found the failure
//! completes, and from then on every range written is added to what the leg **lacks**
//! (a [`BlockSet`] of `LEG_BLOCK` granularity, the same structure the replication's dirty
//! set uses). Bringing the leg back (`blkrep leg attach`) copies exactly those ranges from
//! a healthy leg; a new device (`blkrep leg replace`) lacks everything. A leg is read only
//! while `Healthy`: a leg that comes back with old data serves nothing until its rebuild
//! has copied every range it lacks.
//!
//! Only when no healthy leg is left does an error reach the engine, which then fails the
//! volume (fail-stop: never stale data).
//!
//! The state file (`METADATA.legs`) has two slots, written alternately with a counter;
//! each holds a versioned header, a blake3 checksum and a JSON body. A write that adds to
//! what a leg lacks waits until the file records it, so after a crash the record covers
//! every write the leg missed. A crash while both legs are healthy may leave the blocks
//! being written different on the two legs: the next start marks the blocks the activity
//! log names (the metadata's dirty set) as lacking on the second leg, which is rebuilt
//! from the first before it is read again.

use blkrep_common::config::{Legs as LegConfig, ReadPolicy};
use blkrep_common::human_bytes;
use blkrep_engine::dirty::BlockSet;
use serde::{Deserialize, Serialize};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// Granularity of what a leg lacks.
pub const LEG_BLOCK: u64 = 64 << 10;
/// Largest piece a rebuild copies at once.
pub const REBUILD_CHUNK: u64 = 1 << 20;
const MAGIC: [u8; 8] = *b"BLKRPLG\0";
const VERSION: u32 = 1;
const SLOT: usize = 128 << 10;
const HEADER: usize = 8 + 4 + 4 + 32;
/// Ranges kept per leg on disk (a coarser superset when there are more).
const MAX_RANGES: usize = 2000;

/// The state of one leg.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LegState {
    /// Holds the volume's data; takes writes and serves reads.
    Healthy,
    /// Failed an I/O or timed out; takes nothing until `blkrep leg attach` or `replace`.
    Failed,
    /// Taken out by the operator (`blkrep leg detach`).
    Detached,
    /// Being rebuilt from the healthy leg; not read until the rebuild completes.
    Rebuilding,
}

impl LegState {
    /// The state's name in status and events.
    pub fn name(self) -> &'static str {
        match self {
            LegState::Healthy => "healthy",
            LegState::Failed => "failed",
            LegState::Detached => "detached",
            LegState::Rebuilding => "rebuilding",
        }
    }
}

/// Errors of the state file.
#[derive(Debug, thiserror::Error)]
pub enum LegsError {
    #[error("leg state {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("leg state {path}: {problem}")]
    Bad { path: PathBuf, problem: String },
}

/// One leg as the state file records it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LegRecord {
    pub path: PathBuf,
    pub state: LegState,
    /// Why it is not healthy.
    #[serde(default)]
    pub reason: String,
    /// When the state last changed (ms since the epoch).
    #[serde(default)]
    pub since_ms: u64,
    /// `[start, end)` byte ranges the leg lacks.
    #[serde(default)]
    pub lacks: Vec<(u64, u64)>,
    /// The rebuild copies everything (a new device).
    #[serde(default)]
    pub full: bool,
}

/// The state file's body.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StateRecord {
    pub counter: u64,
    pub resource: String,
    pub node: String,
    pub volume_size: u64,
    /// True while a daemon runs on the legs (false after a clean stop).
    pub running: bool,
    pub legs: Vec<LegRecord>,
}

impl StateRecord {
    /// One slot's bytes: magic, version, body length, blake3 of the body, the body.
    pub fn encode_slot(&self) -> Vec<u8> {
        let body = serde_json::to_vec(self).expect("plain data");
        let mut out = Vec::with_capacity(SLOT);
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.extend_from_slice(&(body.len() as u32).to_le_bytes());
        out.extend_from_slice(blake3::hash(&body).as_bytes());
        out.extend_from_slice(&body);
        out.resize(SLOT.max(out.len()), 0);
        out
    }

    /// Decode one slot; `Ok(None)` for an empty (all-zero) slot.
    pub fn decode_slot(b: &[u8]) -> Result<Option<StateRecord>, String> {
        if b.len() < HEADER || b.iter().all(|&x| x == 0) {
            return Ok(None);
        }
        if b[..8] != MAGIC {
            return Err("not a blkrep leg state file (bad magic)".into());
        }
        let version = u32::from_le_bytes(b[8..12].try_into().expect("4 bytes"));
        if version != VERSION {
            return Err(format!(
                "format version {version}, this blkrepd reads version {VERSION}"
            ));
        }
        let len = u32::from_le_bytes(b[12..16].try_into().expect("4 bytes")) as usize;
        let body = b
            .get(HEADER..HEADER + len)
            .ok_or_else(|| "truncated slot".to_string())?;
        if blake3::hash(body).as_bytes() != &b[16..48] {
            return Err("checksum mismatch (torn or corrupted slot)".into());
        }
        serde_json::from_slice(body)
            .map(Some)
            .map_err(|e| format!("unreadable body: {e}"))
    }
}

/// The state file: two slots, the newer valid one wins.
pub struct StateFile {
    file: File,
    path: PathBuf,
    slot: usize,
    counter: u64,
}

impl StateFile {
    /// Open (creating it if missing) and read the newest valid record, if any. A file
    /// whose slots are both unreadable is an error (never silently forgotten).
    pub fn open(path: &Path) -> Result<(StateFile, Option<StateRecord>), LegsError> {
        let io = |source| LegsError::Io {
            path: path.into(),
            source,
        };
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(io)?;
        let mut best: Option<(usize, StateRecord)> = None;
        let mut problems = Vec::new();
        let mut any = false;
        for slot in 0..2 {
            let mut b = vec![0u8; SLOT];
            let n = read_full(&file, &mut b, (slot * SLOT) as u64).map_err(io)?;
            b.truncate(n);
            match StateRecord::decode_slot(&b) {
                Ok(Some(r)) => {
                    any = true;
                    if best.as_ref().is_none_or(|(_, b)| r.counter > b.counter) {
                        best = Some((slot, r));
                    }
                }
                Ok(None) => {}
                Err(p) => {
                    any = true;
                    problems.push(format!("slot {slot}: {p}"));
                }
            }
        }
        if any && best.is_none() {
            return Err(LegsError::Bad {
                path: path.into(),
                problem: problems.join("; "),
            });
        }
        let (slot, counter) = best.as_ref().map_or((1, 0), |(s, r)| (*s, r.counter));
        Ok((
            StateFile {
                file,
                path: path.into(),
                slot,
                counter,
            },
            best.map(|(_, r)| r),
        ))
    }

    /// Write `rec` (its counter set one higher) to the other slot, durably.
    pub fn write(&mut self, rec: &mut StateRecord) -> Result<(), LegsError> {
        rec.counter = self.counter + 1;
        let slot = 1 - self.slot;
        let io = |source| LegsError::Io {
            path: self.path.clone(),
            source,
        };
        self.file
            .write_all_at(&rec.encode_slot(), (slot * SLOT) as u64)
            .map_err(io)?;
        self.file.sync_data().map_err(io)?;
        self.slot = slot;
        self.counter = rec.counter;
        Ok(())
    }
}

fn read_full(f: &File, b: &mut [u8], at: u64) -> std::io::Result<usize> {
    let mut got = 0;
    while got < b.len() {
        match f.read_at(&mut b[got..], at + got as u64)? {
            0 => break,
            k => got += k,
        }
    }
    Ok(got)
}

/// One leg at run time.
pub struct Leg {
    pub path: PathBuf,
    /// Open while the leg may take I/O (None when it could not be opened).
    pub file: Option<File>,
    pub state: LegState,
    pub reason: String,
    pub since_ms: u64,
    /// What the leg lacks.
    pub lacks: BlockSet,
    /// The rebuild copies everything (a new device).
    pub full: bool,
    /// Requests of this leg in the kernel (a leg is re-attached only with none left).
    pub inflight: usize,
    /// The last rebuild that completed (since the daemon started).
    pub last_rebuild: Option<blkrep_common::control::RebuildStatus>,
}

impl Leg {
    /// The leg's fd (-1 when closed).
    pub fn fd(&self) -> i32 {
        use std::os::fd::AsRawFd;
        self.file.as_ref().map_or(-1, |f| f.as_raw_fd())
    }
}

/// A rebuild under way.
#[derive(Debug)]
pub struct Rebuild {
    /// The leg being rebuilt and the leg read from.
    pub target: usize,
    pub source: usize,
    /// The piece being copied, and whether a client write touched it meanwhile (then it
    /// stays lacking and is copied again).
    pub copying: Option<(u64, u64, bool)>,
    /// Where the next piece is looked for.
    pub cursor: u64,
    /// Bytes copied by this rebuild, and what it had to copy when it started (grows as
    /// writes add to it).
    pub copied: u64,
    pub total: u64,
    pub started: std::time::Instant,
    /// Bytes that may still be copied now (rate limit), refilled every tick.
    pub budget: f64,
    pub last_refill: std::time::Instant,
    /// Copied since the state file last recorded the progress.
    pub unrecorded: u64,
}

/// The legs of a volume.
pub struct Legs {
    pub legs: Vec<Leg>,
    store: StateFile,
    pub cfg: LegConfig,
    resource: String,
    node: String,
    pub size: u64,
    pub rebuild: Option<Rebuild>,
    /// The in-memory state differs from the file.
    pub unsaved: bool,
}

/// Milliseconds since the epoch.
pub fn now_ms() -> u64 {
    blkrep_common::events::now_ms()
}

/// What starting on the legs found, for the event log.
#[derive(Debug, Default)]
pub struct Opening {
    pub notes: Vec<String>,
}

impl Legs {
    /// Open the state file and the legs' devices. `configured`: the backing and, if set,
    /// the mirror. `in_doubt`: ranges that may differ between the legs after a crash (the
    /// metadata's dirty set, which holds the activity log's hot extents).
    #[allow(clippy::too_many_arguments)]
    pub fn open(
        state_path: &Path,
        configured: &[PathBuf],
        cfg: LegConfig,
        resource: &str,
        node: &str,
        size: u64,
        in_doubt: &BlockSet,
        open_dev: &mut dyn FnMut(&Path) -> Result<File, String>,
    ) -> Result<(Legs, Opening), LegsError> {
        let (store, rec) = StateFile::open(state_path)?;
        let mut notes = Vec::new();
        let bad = |problem: String| LegsError::Bad {
            path: state_path.into(),
            problem,
        };
        if let Some(r) = &rec {
            if r.resource != resource || r.node != node || r.volume_size != size {
                return Err(bad(format!(
                    "it belongs to resource {} node {} of {} bytes, not {resource} node {node} \
                     of {size} bytes (move it away to start over)",
                    r.resource, r.node, r.volume_size
                )));
            }
        }
        let crashed = rec.as_ref().is_some_and(|r| r.running);
        let mut legs = Vec::new();
        for (i, path) in configured.iter().enumerate() {
            let old = rec.as_ref().and_then(|r| r.legs.get(i));
            let mut leg = Leg {
                path: path.clone(),
                file: None,
                state: LegState::Healthy,
                reason: String::new(),
                since_ms: now_ms(),
                lacks: BlockSet::new(LEG_BLOCK),
                full: false,
                inflight: 0,
                last_rebuild: None,
            };
            match old {
                Some(o) if o.path == *path => {
                    leg.state = o.state;
                    leg.reason = o.reason.clone();
                    leg.since_ms = o.since_ms;
                    leg.full = o.full;
                    for &(s, e) in &o.lacks {
                        leg.lacks.insert(s, e.min(size));
                    }
                }
                Some(o) => {
                    // Another device than recorded: it holds nothing of this volume.
                    leg.state = LegState::Rebuilding;
                    leg.full = true;
                    leg.lacks.insert(0, size);
                    leg.reason = format!("configured in place of {}", o.path.display());
                    notes.push(format!(
                        "leg {i} is now {} (was {}): it is rebuilt in full",
                        path.display(),
                        o.path.display()
                    ));
                }
                None if i > 0 => {
                    // A mirror added to the configuration: a new, empty copy.
                    leg.state = LegState::Rebuilding;
                    leg.full = true;
                    leg.lacks.insert(0, size);
                    leg.reason = "new leg".into();
                    notes.push(format!(
                        "leg {i} ({}) is new: it is rebuilt in full from leg 0",
                        path.display()
                    ));
                }
                None => {}
            }
            legs.push(leg);
        }
        if let Some(r) = &rec {
            if r.legs.len() > configured.len() {
                notes.push(format!(
                    "leg {} ({}) is no longer configured: forgotten",
                    configured.len(),
                    r.legs[configured.len()].path.display()
                ));
            }
        }
        // A crash with both legs healthy: writes in flight may have reached one leg only.
        if crashed
            && legs.len() == 2
            && legs.iter().all(|l| l.state == LegState::Healthy)
            && !in_doubt.is_empty()
        {
            {
                legs[1].lacks.union(in_doubt);
                legs[1].state = LegState::Rebuilding;
                legs[1].reason = "reconciling the blocks in flight at a crash".into();
                notes.push(format!(
                    "unclean stop: {} KiB that were being written are copied from leg 0 to \
                     leg 1 before leg 1 is read",
                    in_doubt.bytes() >> 10
                ));
            }
        }
        // A rebuild interrupted by a stop goes on; with no healthy source it cannot.
        for leg in &mut legs {
            if leg.state == LegState::Healthy || leg.state == LegState::Rebuilding {
                match open_dev(&leg.path) {
                    Ok(f) => leg.file = Some(f),
                    Err(e) => {
                        notes.push(format!("leg {}: {e}: failed", leg.path.display()));
                        if leg.state == LegState::Healthy {
                            leg.since_ms = now_ms();
                        }
                        leg.state = LegState::Failed;
                        leg.reason = format!("cannot open: {e}");
                    }
                }
            }
        }
        // No healthy leg (they all failed, or the only one did): take back the one that
        // failed last. It holds every write acknowledged before it failed; the engine's
        // metadata, which says Failed when that failure reached it, decides whether it may
        // serve before a full sync from the peer.
        if !legs
            .iter()
            .any(|l| matches!(l.state, LegState::Healthy | LegState::Rebuilding))
        {
            let mut order: Vec<usize> = (0..legs.len()).collect();
            order.sort_by_key(|&i| std::cmp::Reverse(legs[i].since_ms));
            for i in order {
                if legs[i].state == LegState::Detached {
                    continue;
                }
                if let Ok(f) = open_dev(&legs[i].path) {
                    let l = &mut legs[i];
                    notes.push(format!(
                        "no healthy leg: leg {i} ({}), the last to fail ({}), is taken back",
                        l.path.display(),
                        l.reason
                    ));
                    l.file = Some(f);
                    l.state = LegState::Healthy;
                    l.lacks = BlockSet::new(LEG_BLOCK);
                    l.reason.clear();
                    l.since_ms = now_ms();
                    break;
                }
            }
        }
        let mut me = Legs {
            legs,
            store,
            cfg,
            resource: resource.into(),
            node: node.into(),
            size,
            rebuild: None,
            unsaved: true,
        };
        me.save()?;
        me.start_rebuild_if_due();
        Ok((me, Opening { notes }))
    }

    /// The record of the current state.
    fn record(&self, running: bool) -> StateRecord {
        StateRecord {
            counter: 0,
            resource: self.resource.clone(),
            node: self.node.clone(),
            volume_size: self.size,
            running,
            legs: self
                .legs
                .iter()
                .map(|l| LegRecord {
                    path: l.path.clone(),
                    state: l.state,
                    reason: l.reason.clone(),
                    since_ms: l.since_ms,
                    lacks: l.lacks.coarsened(MAX_RANGES).iter().collect(),
                    full: l.full,
                })
                .collect(),
        }
    }

    /// Record the state durably (a daemon runs on it).
    pub fn save(&mut self) -> Result<(), LegsError> {
        let mut rec = self.record(true);
        self.store.write(&mut rec)?;
        self.unsaved = false;
        if let Some(r) = &mut self.rebuild {
            r.unrecorded = 0;
        }
        Ok(())
    }

    /// Record a clean stop.
    pub fn save_stopped(&mut self) -> Result<(), LegsError> {
        let mut rec = self.record(false);
        self.store.write(&mut rec)
    }

    /// Legs that take writes and serve reads.
    pub fn healthy(&self) -> impl Iterator<Item = usize> + '_ {
        self.legs
            .iter()
            .enumerate()
            .filter(|(_, l)| l.state == LegState::Healthy)
            .map(|(i, _)| i)
    }

    /// Number of healthy legs.
    pub fn healthy_count(&self) -> usize {
        self.healthy().count()
    }

    /// The leg to read `offset` from, not one of `tried` (a bit per leg).
    pub fn read_leg(&self, offset: u64, tried: u8) -> Option<usize> {
        let ok = |i: usize| {
            self.legs
                .get(i)
                .is_some_and(|l| l.state == LegState::Healthy)
                && tried & (1 << i) == 0
        };
        let first = match self.cfg.read_policy {
            ReadPolicy::First => 0,
            ReadPolicy::Second => 1,
            ReadPolicy::Balanced => ((offset >> 20) & 1) as usize,
        };
        [first, 1 - first].into_iter().find(|&i| ok(i))
    }

    /// A write over `[start, end)` is issued to the healthy legs: every other leg lacks
    /// it. True when that added to what some leg lacks (the state file must record it
    /// before the write completes).
    pub fn note_write(&mut self, start: u64, end: u64) -> bool {
        let mut added = false;
        for (i, l) in self.legs.iter_mut().enumerate() {
            if l.state == LegState::Healthy {
                continue;
            }
            if let Some(r) = &mut self.rebuild {
                if r.target == i {
                    if let Some((s, e, redo)) = &mut r.copying {
                        if *s < end && start < *e {
                            *redo = true;
                        }
                    }
                }
            }
            if !l.lacks.contains(start, end) {
                let before = l.lacks.bytes();
                l.lacks.insert(start, end.min(self.size));
                if let Some(r) = &mut self.rebuild {
                    if r.target == i {
                        r.total += l.lacks.bytes() - before;
                    }
                }
                added = true;
            }
        }
        if added {
            self.unsaved = true;
        }
        added
    }

    /// Take leg `i` out after an error or a timeout. True when it was healthy (or
    /// rebuilding) before.
    pub fn fail(&mut self, i: usize, why: String) -> bool {
        let l = &mut self.legs[i];
        if matches!(l.state, LegState::Failed | LegState::Detached) {
            return false;
        }
        l.state = LegState::Failed;
        l.reason = why;
        l.since_ms = now_ms();
        self.unsaved = true;
        if self
            .rebuild
            .as_ref()
            .is_some_and(|r| r.target == i || r.source == i)
        {
            self.rebuild = None;
        }
        true
    }

    /// Take leg `i` out on the operator's word.
    pub fn detach(&mut self, i: usize) -> Result<(), String> {
        let others = self.healthy().filter(|&h| h != i).count();
        let l = self
            .legs
            .get(i)
            .ok_or_else(|| format!("there is no leg {i}"))?;
        if l.state == LegState::Detached {
            return Err(format!("leg {i} is already detached"));
        }
        if others == 0 {
            return Err(format!(
                "leg {i} is the only healthy leg: detaching it would take the volume's \
                 local data away"
            ));
        }
        if self.rebuild.as_ref().is_some_and(|r| r.target == i) {
            self.rebuild = None;
        }
        let l = &mut self.legs[i];
        l.state = LegState::Detached;
        l.reason = "detached by the operator".into();
        l.since_ms = now_ms();
        l.file = None;
        self.unsaved = true;
        Ok(())
    }

    /// Bring leg `i` back (`path`: a new device for it, rebuilt in full; `full`: rebuild
    /// all of it even on the same device).
    pub fn attach(
        &mut self,
        i: usize,
        path: Option<PathBuf>,
        full: bool,
        open_dev: &mut dyn FnMut(&Path) -> Result<File, String>,
    ) -> Result<String, String> {
        if self.healthy().filter(|&h| h != i).count() == 0 {
            return Err(
                if self
                    .legs
                    .get(i)
                    .is_some_and(|l| l.state == LegState::Healthy)
                {
                    format!("leg {i} is the only healthy leg: there is nothing to rebuild a new device from")
                } else {
                    "no healthy leg to rebuild from".into()
                },
            );
        }
        let size = self.size;
        let l = self
            .legs
            .get_mut(i)
            .ok_or_else(|| format!("there is no leg {i}"))?;
        if l.state == LegState::Healthy && path.is_none() {
            return Err(format!(
                "leg {i} is healthy already (`blkrep leg replace` puts a new device in its place)"
            ));
        }
        if l.state == LegState::Rebuilding && path.is_none() && !full {
            return Err(format!("leg {i} is rebuilding already"));
        }
        if l.inflight > 0 && path.as_ref().is_none_or(|p| *p == l.path) {
            return Err(format!(
                "leg {i} still has {} request(s) in the kernel that never completed; \
                 wait for the device to answer or fail them (e.g. remove it), then retry",
                l.inflight
            ));
        }
        let new_path = path.unwrap_or_else(|| l.path.clone());
        let f = open_dev(&new_path)?;
        let replaced = new_path != l.path;
        l.file = Some(f);
        if replaced || full {
            l.lacks.insert(0, size);
            l.full = true;
        }
        l.path = new_path;
        l.state = LegState::Rebuilding;
        l.reason = if l.full {
            "rebuilding in full".into()
        } else {
            "rebuilding what it missed".into()
        };
        l.since_ms = now_ms();
        let lacks = l.lacks.bytes();
        self.rebuild = None;
        self.unsaved = true;
        self.start_rebuild_if_due();
        Ok(format!(
            "leg {i} ({}) attached: {} to copy{}",
            self.legs[i].path.display(),
            human_bytes(lacks),
            if replaced { " (new device)" } else { "" }
        ))
    }

    /// Start rebuilding a leg in `Rebuilding` when there is a healthy source.
    pub fn start_rebuild_if_due(&mut self) {
        if self.rebuild.is_some() {
            return;
        }
        let Some(target) = self
            .legs
            .iter()
            .position(|l| l.state == LegState::Rebuilding && l.file.is_some())
        else {
            return;
        };
        let Some(source) = self.healthy().next() else {
            return;
        };
        let now = std::time::Instant::now();
        self.rebuild = Some(Rebuild {
            target,
            source,
            copying: None,
            cursor: 0,
            copied: 0,
            total: self.legs[target].lacks.bytes(),
            started: now,
            budget: REBUILD_CHUNK as f64,
            last_refill: now,
            unrecorded: 0,
        });
    }

    /// The next piece to copy, if the rate allows one now.
    pub fn next_copy(&mut self) -> Option<(usize, usize, u64, u64)> {
        let rate = self.cfg.rebuild_rate;
        let r = self.rebuild.as_mut()?;
        if r.copying.is_some() {
            return None;
        }
        let lacks = &self.legs[r.target].lacks;
        let (s, e) = lacks
            .next_chunk(r.cursor, REBUILD_CHUNK)
            .or_else(|| lacks.next_chunk(0, REBUILD_CHUNK))?;
        if rate > 0 {
            let now = std::time::Instant::now();
            let dt = now.duration_since(r.last_refill).as_secs_f64();
            r.last_refill = now;
            r.budget = (r.budget + dt * rate as f64).min(rate.max(REBUILD_CHUNK) as f64);
            if r.budget < (e - s) as f64 {
                return None;
            }
            r.budget -= (e - s) as f64;
        }
        r.copying = Some((s, e, false));
        Some((r.source, r.target, s, e))
    }

    /// The piece in copy is written to the target leg. True when the rebuild is complete
    /// (the target lacks nothing; the caller flushes it and calls [`Legs::finish_rebuild`]).
    pub fn copied(&mut self) -> bool {
        let Some(r) = self.rebuild.as_mut() else {
            return false;
        };
        let Some((s, e, redo)) = r.copying.take() else {
            return false;
        };
        if !redo {
            self.legs[r.target].lacks.remove(s, e);
            r.copied += e - s;
            r.unrecorded += e - s;
            self.unsaved = true;
        }
        r.cursor = e;
        self.legs[r.target].lacks.is_empty()
    }

    /// A rebuild is under way, with no copy in flight, and its target lacks nothing.
    pub fn rebuild_complete(&self) -> bool {
        self.rebuild
            .as_ref()
            .is_some_and(|r| r.copying.is_none() && self.legs[r.target].lacks.is_empty())
    }

    /// The rebuilt leg is flushed: it is healthy. Returns its index.
    pub fn finish_rebuild(&mut self) -> Option<usize> {
        let r = self.rebuild.take()?;
        let l = &mut self.legs[r.target];
        if !l.lacks.is_empty() || l.state != LegState::Rebuilding {
            return None;
        }
        l.state = LegState::Healthy;
        l.reason.clear();
        l.last_rebuild = Some(blkrep_common::control::RebuildStatus {
            source: r.source as u8,
            copied_bytes: r.copied,
            total_bytes: r.copied,
            seconds: r.started.elapsed().as_secs_f64(),
            full: l.full,
        });
        l.full = false;
        l.since_ms = now_ms();
        self.unsaved = true;
        Some(r.target)
    }

    /// `healthy`, `degraded` (some leg out) or `failed` (none healthy).
    pub fn summary(&self) -> &'static str {
        match self.healthy_count() {
            0 => "failed",
            n if n == self.legs.len() => "healthy",
            _ => "degraded",
        }
    }

    /// The legs for `status`.
    pub fn status(&self) -> Vec<blkrep_common::control::LegStatus> {
        self.legs
            .iter()
            .enumerate()
            .map(|(i, l)| {
                let rebuild = self.rebuild.as_ref().filter(|r| r.target == i).map(|r| {
                    blkrep_common::control::RebuildStatus {
                        source: r.source as u8,
                        copied_bytes: r.copied,
                        total_bytes: r.total.max(r.copied),
                        seconds: r.started.elapsed().as_secs_f64(),
                        full: l.full,
                    }
                });
                blkrep_common::control::LegStatus {
                    index: i as u8,
                    path: l.path.display().to_string(),
                    state: l.state.name().into(),
                    reason: l.reason.clone(),
                    since: blkrep_common::events::rfc3339(l.since_ms),
                    lacks_bytes: l.lacks.bytes(),
                    inflight: l.inflight as u64,
                    rebuild,
                    last_rebuild: l.last_rebuild.clone(),
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> LegConfig {
        LegConfig {
            mirror: Some("/m".into()),
            ..Default::default()
        }
    }

    fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("blkrep-legs-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn open_ok(p: &Path) -> Result<File, String> {
        OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(p)
            .map_err(|e| e.to_string())
    }

    fn two(dir: &Path) -> Vec<PathBuf> {
        vec![dir.join("a"), dir.join("b")]
    }

    const SIZE: u64 = 64 << 20;

    /// Open two legs in `d` for resource r0, node a.
    fn open_two(d: &Path, doubt: &BlockSet) -> (Legs, Opening) {
        Legs::open(
            &d.join("state"),
            &two(d),
            cfg(),
            "r0",
            "a",
            SIZE,
            doubt,
            &mut open_ok,
        )
        .unwrap()
    }

    #[test]
    fn slot_roundtrip_and_corruption_is_refused() {
        let rec = StateRecord {
            counter: 7,
            resource: "r0".into(),
            node: "a".into(),
            volume_size: SIZE,
            running: true,
            legs: vec![LegRecord {
                path: "/x".into(),
                state: LegState::Failed,
                reason: "EIO".into(),
                since_ms: 1,
                lacks: vec![(0, 65536)],
                full: false,
            }],
        };
        let b = rec.encode_slot();
        assert_eq!(StateRecord::decode_slot(&b).unwrap(), Some(rec.clone()));
        let mut bad = b.clone();
        bad[HEADER + 3] ^= 1;
        assert!(StateRecord::decode_slot(&bad)
            .unwrap_err()
            .contains("checksum"));
        let mut v2 = b.clone();
        v2[8] = 2;
        assert!(StateRecord::decode_slot(&v2)
            .unwrap_err()
            .contains("version"));
        let mut foreign = b;
        foreign[0] = b'X';
        assert!(StateRecord::decode_slot(&foreign)
            .unwrap_err()
            .contains("magic"));
        assert_eq!(StateRecord::decode_slot(&vec![0; SLOT]).unwrap(), None);
    }

    #[test]
    fn newest_slot_wins_and_a_torn_write_falls_back() {
        let d = tmp("slots");
        let p = d.join("state");
        let (mut f, rec) = StateFile::open(&p).unwrap();
        assert!(rec.is_none());
        let mut r = StateRecord {
            counter: 0,
            resource: "r0".into(),
            node: "a".into(),
            volume_size: SIZE,
            running: true,
            legs: vec![],
        };
        f.write(&mut r).unwrap();
        r.running = false;
        f.write(&mut r).unwrap();
        let (_, got) = StateFile::open(&p).unwrap();
        assert!(!got.unwrap().running);
        // Tear the newer slot (counter 2, in slot 1: a new file starts in slot 0): the
        // older one is read.
        let file = OpenOptions::new().write(true).open(&p).unwrap();
        file.write_all_at(b"garbage", (SLOT + HEADER) as u64)
            .unwrap();
        let (_, got) = StateFile::open(&p).unwrap();
        let got = got.unwrap();
        assert_eq!(got.counter, 1);
        assert!(got.running);
        // Both torn: refused, not forgotten.
        file.write_all_at(b"garbage", HEADER as u64).unwrap();
        assert!(StateFile::open(&p).is_err());
    }

    #[test]
    fn a_failed_leg_lacks_what_is_written_after_and_rebuilds_only_that() {
        let d = tmp("fail");
        let (mut legs, _) = open_two(&d, &BlockSet::new(4096));
        // A new mirror is rebuilt in full first.
        assert_eq!(legs.legs[1].state, LegState::Rebuilding);
        assert_eq!(legs.legs[1].lacks.bytes(), SIZE);
        legs.legs[1].lacks = BlockSet::new(LEG_BLOCK);
        legs.legs[1].state = LegState::Healthy;
        legs.rebuild = None;
        assert!(
            !legs.note_write(0, 4096),
            "both healthy: nobody lacks anything"
        );
        assert_eq!(legs.read_leg(0, 0), Some(0));
        assert_eq!(legs.read_leg(1 << 20, 0), Some(1));
        assert_eq!(legs.read_leg(0, 1), Some(1));
        assert!(legs.fail(1, "EIO".into()));
        assert!(!legs.fail(1, "again".into()));
        assert_eq!(legs.summary(), "degraded");
        assert_eq!(
            legs.read_leg(1 << 20, 0),
            Some(0),
            "never read a failed leg"
        );
        assert_eq!(legs.read_leg(0, 1), None);
        assert!(legs.note_write(8192, 12288));
        assert!(!legs.note_write(8192, 12288), "already lacking");
        assert!(legs.note_write(10 << 20, (10 << 20) + 100 * 1024));
        // 4 KiB rounds out to one block, 100 KiB from an aligned start to two.
        assert_eq!(legs.legs[1].lacks.bytes(), 3 * LEG_BLOCK);
        legs.save().unwrap();
        // The record survives a restart.
        let (again, _) = open_two(&d, &BlockSet::new(4096));
        assert_eq!(again.legs[1].state, LegState::Failed);
        assert_eq!(again.legs[1].lacks, legs.legs[1].lacks);
        assert!(
            again.rebuild.is_none(),
            "a failed leg is not rebuilt unasked"
        );
        drop(again);
        legs.attach(1, None, false, &mut open_ok).unwrap();
        assert_eq!(legs.legs[1].state, LegState::Rebuilding);
        assert_eq!(
            legs.read_leg(1 << 20, 0),
            Some(0),
            "not read while rebuilding"
        );
        let mut copied = 0;
        while let Some((src, dst, s, e)) = legs.next_copy() {
            assert_eq!((src, dst), (0, 1));
            copied += e - s;
            if legs.copied() {
                break;
            }
        }
        assert_eq!(copied, 3 * LEG_BLOCK, "only what it missed");
        assert_eq!(legs.finish_rebuild(), Some(1));
        assert_eq!(legs.summary(), "healthy");
    }

    #[test]
    fn a_write_into_the_piece_being_copied_copies_it_again() {
        let d = tmp("redo");
        let (mut legs, _) = open_two(&d, &BlockSet::new(4096));
        let (_, _, s, e) = legs.next_copy().unwrap();
        // Already lacking (nothing new to record), but the piece in copy is stale now.
        assert!(!legs.note_write(s, s + 4096));
        assert!(!legs.copied());
        assert!(legs.legs[1].lacks.contains(s, e), "copied again later");
        legs.fail(0, "gone".into());
        assert!(legs.rebuild.is_none(), "no source: the rebuild stops");
        assert_eq!(legs.summary(), "failed");
        assert!(legs.attach(1, None, false, &mut open_ok).is_err());
    }

    #[test]
    fn a_crash_with_both_legs_healthy_reconciles_the_blocks_in_doubt() {
        let d = tmp("crash");
        let (mut legs, _) = open_two(&d, &BlockSet::new(4096));
        legs.legs[1].lacks = BlockSet::new(LEG_BLOCK);
        legs.legs[1].state = LegState::Healthy;
        legs.save().unwrap(); // running = true: a crash now
        drop(legs);
        let mut doubt = BlockSet::new(4096);
        doubt.insert(4 << 20, 8 << 20);
        let (legs, o) = open_two(&d, &doubt);
        assert_eq!(legs.legs[1].state, LegState::Rebuilding);
        assert_eq!(legs.legs[1].lacks.bytes(), 4 << 20);
        assert!(legs.rebuild.is_some());
        assert!(o.notes.iter().any(|n| n.contains("unclean")));
        // Another resource's file is refused.
        assert!(Legs::open(
            &d.join("state"),
            &two(&d),
            cfg(),
            "r1",
            "a",
            SIZE,
            &doubt,
            &mut open_ok,
        )
        .is_err());
    }

    #[test]
    fn detach_refuses_the_last_healthy_leg() {
        let d = tmp("detach");
        let (mut legs, _) = open_two(&d, &BlockSet::new(4096));
        assert!(legs.detach(0).unwrap_err().contains("only healthy"));
        assert!(legs.detach(1).is_ok());
        assert!(legs.detach(1).is_err());
        assert!(legs.detach(5).is_err());
    }
}
