//! A seeded random write workload with a write-order log, and the checker that verifies an
//! image against the log.
//!
//! The op stream (kinds, offsets, lengths, FUA) depends only on the spec, never on timing:
//! it comes from `StdRng::seed_from_u64(seed)`. Every 4 KiB block a write carries is
//! regenerated from (seed, op index, device offset): a 32-byte header (`BLKRWL01`, seed,
//! index, offset) and a splitmix64 body, so the checker can both verify a block and say
//! whose block it found instead.
//!
//! **Overlap rule (the default).** An op that modifies the device (write, write-zeroes,
//! trim) is not issued while another modifying op overlapping it is still in flight; the
//! workload waits for replies first. Overlapping ops are therefore ordered by their
//! acknowledgements, and the expected image is exact. With `overlap_in_flight = true`
//! overlapping ops may be in flight together; the server may apply them in either order, so
//! the checker accepts the content of any of them (whole 4 KiB blocks; a server that mixes
//! two writes inside one block would be reported).
//!
//! **What the checker accepts.** A block never written may hold anything. After a trim a
//! block reads either as before or as zeroes (the spec allows any content; every real server
//! either ignores the hint or discards to zeroes, so anything else is reported). An op the
//! server failed may or may not have happened.

use std::fs::File;
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::path::Path;
use std::time::Instant;

use anyhow::{ensure, Context};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::nbd_client::NbdClient;
use crate::nbd_proto::*;

pub use crate::verify::{
    verify_image, BlockContent, Mismatch, VerifyReport, MAX_LISTED_MISMATCHES,
};

/// The workload's block size: offsets and lengths are multiples of it.
pub const BLOCK: u64 = 4096;
/// The first 8 bytes of every block the workload writes.
pub(crate) const MAGIC: &[u8; 8] = b"BLKRWL01";
const LOG_VERSION: u32 = 1;

/// What to run. `Default` gives a small mixed workload over the whole device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkloadSpec {
    /// Seed of the op stream and of the data.
    pub seed: u64,
    /// Number of ops (flushes included).
    pub ops: u64,
    /// Maximum number of requests in flight.
    pub queue_depth: usize,
    /// Bytes of the device to use, from offset 0; 0 = the whole device (rounded down to
    /// 4 KiB). The log records the resolved value.
    pub size: u64,
    /// Largest op in bytes (a multiple of 4 KiB; clamped to the server's maximum payload).
    pub max_io: u32,
    /// Every `flush_every`-th op is a flush (0 = never).
    pub flush_every: u64,
    /// Percentage of writes and write-zeroes sent with FUA.
    pub fua_percent: u8,
    /// Percentage of ops that are trims.
    pub trim_percent: u8,
    /// Percentage of ops that are write-zeroes.
    pub zero_percent: u8,
    /// Allow overlapping modifying ops in flight together (see the module documentation).
    #[serde(default)]
    pub overlap_in_flight: bool,
}

impl Default for WorkloadSpec {
    fn default() -> Self {
        WorkloadSpec {
            seed: 1,
            ops: 1000,
            queue_depth: 8,
            size: 0,
            max_io: 256 * 1024,
            flush_every: 100,
            fua_percent: 5,
            trim_percent: 5,
            zero_percent: 5,
            overlap_in_flight: false,
        }
    }
}

/// The outcome of [`run`].
#[derive(Debug, Clone, Serialize)]
pub struct WorkloadReport {
    /// Ops completed (flushes included).
    pub ops: u64,
    /// Payload bytes of successful writes (write-zeroes and trims not counted).
    pub bytes_written: u64,
    /// Wall-clock duration.
    pub seconds: f64,
    /// Ops per second.
    pub iops: f64,
    /// `bytes_written` in MiB per second.
    pub mib_per_sec: f64,
    /// Ops the server answered with an error.
    pub errors: u64,
}

/// Kind of a logged op.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OpKind {
    /// `NBD_CMD_WRITE` with generated data.
    Write,
    /// `NBD_CMD_WRITE_ZEROES`.
    WriteZeroes,
    /// `NBD_CMD_TRIM`.
    Trim,
    /// `NBD_CMD_FLUSH` (offset and len 0).
    Flush,
}

/// One acknowledged op. Entries are stored in acknowledgement order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogEntry {
    /// Position in the op stream (ops are issued in index order).
    pub index: u64,
    /// What it was.
    pub kind: OpKind,
    /// Byte offset.
    pub offset: u64,
    /// Byte length.
    pub len: u32,
    /// Sent with FUA.
    pub fua: bool,
    /// Number of acknowledgements received before it was issued: it is ordered after
    /// every op whose `completion` is lower.
    pub issued_after: u64,
    /// Its rank in acknowledgement order (0-based).
    pub completion: u64,
    /// The server's NBD error value, if it failed.
    pub error: Option<u32>,
}

/// The write-order log: the resolved spec and the acknowledged ops, saved as JSON lines
/// (a header line, then one line per op).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct WriteLog {
    spec: Option<WorkloadSpec>,
    entries: Vec<LogEntry>,
}

/// Errors loading or saving a [`WriteLog`].
#[derive(Debug, thiserror::Error)]
pub enum WriteLogError {
    /// Reading or writing the file failed.
    #[error("write log I/O: {0}")]
    Io(#[from] std::io::Error),
    /// A line is not valid JSON for the log.
    #[error("write log line {line}: {source}")]
    Parse {
        /// 1-based line number.
        line: usize,
        /// The JSON error.
        source: serde_json::Error,
    },
    /// The lines parse but do not form a log.
    #[error("write log: {0}")]
    Format(String),
}

#[derive(Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum Line {
    Header { version: u32, spec: WorkloadSpec },
    Op(LogEntry),
}

impl WriteLog {
    /// An empty log.
    pub fn new() -> WriteLog {
        WriteLog::default()
    }
    /// The resolved spec of the run that filled it.
    pub fn spec(&self) -> Option<&WorkloadSpec> {
        self.spec.as_ref()
    }
    /// The acknowledged ops, in acknowledgement order.
    pub fn entries(&self) -> &[LogEntry] {
        &self.entries
    }

    /// Writes the log as JSON lines.
    pub fn write_to(&self, mut w: impl Write) -> Result<(), WriteLogError> {
        let json =
            |l: &Line| serde_json::to_string(l).map_err(|e| WriteLogError::Format(e.to_string()));
        if let Some(spec) = &self.spec {
            writeln!(
                w,
                "{}",
                json(&Line::Header {
                    version: LOG_VERSION,
                    spec: spec.clone()
                })?
            )?;
        }
        for e in &self.entries {
            writeln!(w, "{}", json(&Line::Op(e.clone()))?)?;
        }
        w.flush()?;
        Ok(())
    }

    /// Reads a log written by [`WriteLog::write_to`].
    pub fn read_from(r: impl BufRead) -> Result<WriteLog, WriteLogError> {
        let mut log = WriteLog::new();
        for (i, line) in r.lines().enumerate() {
            let line = line?;
            if line.trim().is_empty() {
                continue;
            }
            let parsed = serde_json::from_str(&line).map_err(|source| WriteLogError::Parse {
                line: i + 1,
                source,
            })?;
            match parsed {
                Line::Header { version, spec } => {
                    if version != LOG_VERSION {
                        return Err(WriteLogError::Format(format!(
                            "unsupported version {version}"
                        )));
                    }
                    if log.spec.replace(spec).is_some() || !log.entries.is_empty() {
                        return Err(WriteLogError::Format(format!(
                            "unexpected header at line {}",
                            i + 1
                        )));
                    }
                }
                Line::Op(e) => log.entries.push(e),
            }
        }
        Ok(log)
    }

    /// Saves the log to `path`.
    pub fn save(&self, path: &Path) -> Result<(), WriteLogError> {
        self.write_to(BufWriter::new(File::create(path)?))
    }

    /// Loads a log from `path`.
    pub fn load(path: &Path) -> Result<WriteLog, WriteLogError> {
        WriteLog::read_from(BufReader::new(File::open(path)?))
    }
}

fn splitmix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Fills `out` (4 KiB) with the content op `index` of the run seeded `seed` writes at
/// device offset `offset`.
pub fn block_content(seed: u64, index: u64, offset: u64, out: &mut [u8]) {
    assert_eq!(
        out.len() as u64,
        BLOCK,
        "block_content fills one 4 KiB block"
    );
    out[0..8].copy_from_slice(MAGIC);
    out[8..16].copy_from_slice(&seed.to_le_bytes());
    out[16..24].copy_from_slice(&index.to_le_bytes());
    out[24..32].copy_from_slice(&offset.to_le_bytes());
    let mut st = seed ^ index.rotate_left(24) ^ offset.rotate_left(47) ^ 0x5bd1_e995_c3a5_c85c;
    for w in out[32..].chunks_exact_mut(8) {
        w.copy_from_slice(&splitmix(&mut st).to_le_bytes());
    }
}

/// An op of the stream.
#[derive(Debug, Clone, Copy)]
struct Op {
    index: u64,
    kind: OpKind,
    offset: u64,
    len: u32,
    fua: bool,
}

impl Op {
    fn modifies(&self) -> bool {
        self.kind != OpKind::Flush
    }
    fn overlaps(&self, o: &Op) -> bool {
        self.offset < o.offset + u64::from(o.len) && o.offset < self.offset + u64::from(self.len)
    }
}

/// The deterministic op stream.
struct OpGen {
    rng: StdRng,
    spec: WorkloadSpec,
    blocks: u64,
    max_blocks: u64,
    recent: Vec<u64>,
}

impl OpGen {
    fn new(spec: &WorkloadSpec) -> OpGen {
        OpGen {
            rng: StdRng::seed_from_u64(spec.seed),
            spec: spec.clone(),
            blocks: spec.size / BLOCK,
            max_blocks: (u64::from(spec.max_io) / BLOCK).min(spec.size / BLOCK),
            recent: Vec::with_capacity(16),
        }
    }

    fn next(&mut self, index: u64) -> Op {
        let s = &self.spec;
        if s.flush_every > 0 && (index + 1).is_multiple_of(s.flush_every) {
            return Op {
                index,
                kind: OpKind::Flush,
                offset: 0,
                len: 0,
                fua: false,
            };
        }
        let roll = self.rng.gen_range(0..100u8);
        let kind = if roll < s.trim_percent {
            OpKind::Trim
        } else if roll < s.trim_percent + s.zero_percent {
            OpKind::WriteZeroes
        } else {
            OpKind::Write
        };
        let fua = kind != OpKind::Trim && self.rng.gen_range(0..100u8) < s.fua_percent;
        // Half the ops are small (up to 16 KiB): they dominate real workloads.
        let nblocks = if self.rng.gen_bool(0.5) {
            self.rng.gen_range(1..=self.max_blocks.min(4))
        } else {
            self.rng.gen_range(1..=self.max_blocks)
        };
        // A quarter of the ops land on or next to a recent op, so overlaps are common even
        // on a large device.
        let last_start = self.blocks - nblocks;
        let start = if !self.recent.is_empty() && self.rng.gen_bool(0.25) {
            let base = self.recent[self.rng.gen_range(0..self.recent.len())];
            let shift = self.rng.gen_range(0..=2 * nblocks) as i64 - nblocks as i64;
            base.saturating_add_signed(shift).min(last_start)
        } else {
            self.rng.gen_range(0..=last_start)
        };
        if self.recent.len() == 16 {
            self.recent.remove(0);
        }
        self.recent.push(start);
        Op {
            index,
            kind,
            offset: start * BLOCK,
            len: (nblocks * BLOCK) as u32,
            fua,
        }
    }
}

/// Checks the spec against the server and resolves `size` and `max_io`.
fn resolve(client: &NbdClient, spec: &WorkloadSpec) -> anyhow::Result<WorkloadSpec> {
    let mut s = spec.clone();
    ensure!(!client.read_only(), "the export is read-only");
    ensure!(client.in_flight() == 0, "the client has requests in flight");
    ensure!(s.queue_depth >= 1, "queue depth must be at least 1");
    ensure!(s.fua_percent <= 100, "fua_percent above 100");
    ensure!(
        u16::from(s.trim_percent) + u16::from(s.zero_percent) <= 100,
        "trim_percent + zero_percent above 100"
    );
    if s.size == 0 {
        s.size = client.size() / BLOCK * BLOCK;
    }
    ensure!(
        s.size >= BLOCK && s.size.is_multiple_of(BLOCK),
        "size {} is not a positive multiple of 4 KiB",
        s.size
    );
    ensure!(
        s.size <= client.size(),
        "size {} exceeds the export size {}",
        s.size,
        client.size()
    );
    let (min, max) = client.block_size().map_or((1, 1 << 25), |(a, _, c)| (a, c));
    ensure!(
        u64::from(min) <= BLOCK,
        "the server's minimum block size {min} exceeds 4 KiB"
    );
    s.max_io = s.max_io.min(max) / BLOCK as u32 * BLOCK as u32;
    ensure!(
        s.max_io >= BLOCK as u32,
        "max_io must be at least 4 KiB (and the server's maximum payload allows it)"
    );
    let f = client.transmission_flags();
    for (wanted, flag, what) in [
        (
            s.flush_every > 0,
            NBD_FLAG_SEND_FLUSH,
            "flushes (flush_every)",
        ),
        (s.fua_percent > 0, NBD_FLAG_SEND_FUA, "FUA (fua_percent)"),
        (
            s.trim_percent > 0,
            NBD_FLAG_SEND_TRIM,
            "trims (trim_percent)",
        ),
        (
            s.zero_percent > 0,
            NBD_FLAG_SEND_WRITE_ZEROES,
            "write-zeroes (zero_percent)",
        ),
    ] {
        ensure!(
            !wanted || f & flag != 0,
            "the server does not support {what}; set it to 0"
        );
    }
    Ok(s)
}

struct Flight {
    handle: u64,
    op: Op,
    issued_after: u64,
}

/// The in-flight set and the counters of a run.
struct Runner<'a> {
    flights: Vec<Flight>,
    completions: u64,
    errors: u64,
    bytes: u64,
    log: Option<&'a mut WriteLog>,
}

impl Runner<'_> {
    /// Waits for one reply and logs it.
    fn complete_one(&mut self, client: &mut NbdClient) -> anyhow::Result<()> {
        let (handle, result) = client.wait_reply()?;
        let pos = self
            .flights
            .iter()
            .position(|f| f.handle == handle)
            .context("reply for a request the workload did not send")?;
        let f = self.flights.swap_remove(pos);
        let error = result.err();
        if error.is_some() {
            self.errors += 1;
        } else if f.op.kind == OpKind::Write {
            self.bytes += u64::from(f.op.len);
        }
        if let Some(l) = self.log.as_deref_mut() {
            l.entries.push(LogEntry {
                index: f.op.index,
                kind: f.op.kind,
                offset: f.op.offset,
                len: f.op.len,
                fua: f.op.fua,
                issued_after: f.issued_after,
                completion: self.completions,
                error,
            });
        }
        self.completions += 1;
        Ok(())
    }
}

/// Runs the workload described by `spec` through `client` (which must have nothing in
/// flight); fills `log` (replacing its content) with the resolved spec and every
/// acknowledged op. A server error on an op is counted and logged, not fatal; a protocol or
/// connection error is.
pub fn run(
    client: &mut NbdClient,
    spec: &WorkloadSpec,
    mut log: Option<&mut WriteLog>,
) -> anyhow::Result<WorkloadReport> {
    let spec = resolve(client, spec)?;
    if let Some(l) = log.as_deref_mut() {
        *l = WriteLog {
            spec: Some(spec.clone()),
            entries: Vec::new(),
        };
    }
    let mut gen = OpGen::new(&spec);
    let mut r = Runner {
        flights: Vec::with_capacity(spec.queue_depth),
        completions: 0,
        errors: 0,
        bytes: 0,
        log,
    };
    let mut data = Vec::new();
    let start = Instant::now();
    for index in 0..spec.ops {
        let op = gen.next(index);
        while r.flights.len() >= spec.queue_depth {
            r.complete_one(client)?;
        }
        if op.modifies() && !spec.overlap_in_flight {
            while r
                .flights
                .iter()
                .any(|f| f.op.modifies() && f.op.overlaps(&op))
            {
                r.complete_one(client)?;
            }
        }
        let handle = match op.kind {
            OpKind::Write => {
                data.resize(op.len as usize, 0);
                for (i, blk) in data.chunks_exact_mut(BLOCK as usize).enumerate() {
                    block_content(spec.seed, index, op.offset + i as u64 * BLOCK, blk);
                }
                client.submit_write(op.offset, &data, op.fua)?
            }
            OpKind::WriteZeroes => client.submit_write_zeroes(op.offset, op.len, op.fua)?,
            OpKind::Trim => client.submit_trim(op.offset, op.len)?,
            OpKind::Flush => client.submit_flush()?,
        };
        // Every op acknowledged so far (completion rank below this) is ordered before it.
        r.flights.push(Flight {
            handle,
            op,
            issued_after: r.completions,
        });
    }
    while !r.flights.is_empty() {
        r.complete_one(client)?;
    }
    let seconds = start.elapsed().as_secs_f64().max(1e-9);
    Ok(WorkloadReport {
        ops: r.completions,
        bytes_written: r.bytes,
        seconds,
        iops: r.completions as f64 / seconds,
        mib_per_sec: r.bytes as f64 / (1024.0 * 1024.0) / seconds,
        errors: r.errors,
    })
}
