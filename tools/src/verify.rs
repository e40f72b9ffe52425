//! The checker of the workload: verifies an image against a [`WriteLog`] (see the
//! [`crate::workload`] module documentation for what is accepted where).

use std::io::{Read, Seek, SeekFrom};

use anyhow::{ensure, Context};
use serde::Serialize;

use crate::workload::{block_content, OpKind, WorkloadSpec, WriteLog, BLOCK, MAGIC};

/// At most this many mismatches are listed in a [`VerifyReport`] (all are counted).
pub const MAX_LISTED_MISMATCHES: usize = 100;

/// An acceptable content of a 4 KiB block.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BlockContent {
    /// Never written by the workload: anything is acceptable.
    Any,
    /// Zeroes (write-zeroes, or a trim that discarded).
    Zero,
    /// The data op `index` wrote there.
    Op(u64),
}

impl std::fmt::Display for BlockContent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BlockContent::Any => write!(f, "anything"),
            BlockContent::Zero => write!(f, "zeroes"),
            BlockContent::Op(i) => write!(f, "op {i}"),
        }
    }
}

/// One block that matches none of its acceptable contents.
#[derive(Debug, Clone, Serialize)]
pub struct Mismatch {
    /// Byte offset of the block.
    pub offset: u64,
    /// The acceptable contents.
    pub expected: Vec<BlockContent>,
    /// What the block holds instead.
    pub found: String,
}

/// The outcome of [`verify_image`].
#[derive(Debug, Clone, Serialize)]
pub struct VerifyReport {
    /// Whether every block matched.
    pub ok: bool,
    /// Blocks in the verified range.
    pub blocks: u64,
    /// Blocks compared against expected content.
    pub checked: u64,
    /// Blocks the workload never wrote (not checked).
    pub unconstrained: u64,
    /// Checked blocks with more than one acceptable content.
    pub ambiguous: u64,
    /// Blocks that matched none of their acceptable contents.
    pub mismatched: u64,
    /// The first [`MAX_LISTED_MISMATCHES`] mismatches.
    pub mismatches: Vec<Mismatch>,
}

/// An acceptable content and the completion rank (+1; 0 = before the run) of its op.
#[derive(Debug, Clone, Copy)]
struct Cand {
    content: BlockContent,
    rank: u64,
}

/// Applies an op's effect on one block's set of acceptable contents. A `definite` op (a
/// successful write or write-zeroes) replaces every content that was acknowledged before
/// it was issued; contents of ops still in flight when it was issued stay acceptable
/// (either order is possible). Trims and failed ops only add a possibility.
fn apply(cands: &mut Vec<Cand>, new: Cand, definite: bool, issued_after: u64) {
    if definite {
        cands.retain(|c| c.rank > issued_after);
    }
    match cands.iter_mut().find(|c| c.content == new.content) {
        Some(c) => c.rank = c.rank.max(new.rank),
        None => cands.push(new),
    }
}

/// Describes what a block holds, for a mismatch report.
fn describe(block: &[u8], scratch: &mut [u8]) -> String {
    if block.iter().all(|&b| b == 0) {
        return "zeroes".into();
    }
    if &block[0..8] == MAGIC {
        let w = |i: usize| u64::from_le_bytes(block[i..i + 8].try_into().unwrap_or_default());
        let (seed, index, offset) = (w(8), w(16), w(24));
        block_content(seed, index, offset, scratch);
        return match block.iter().zip(scratch.iter()).position(|(a, b)| a != b) {
            None => format!("the block op {index} (seed {seed}) wrote at offset {offset}"),
            Some(p) => format!("the block op {index} (seed {seed}) wrote at offset {offset}, corrupted from byte {p}"),
        };
    }
    let first = block.iter().position(|&b| b != 0).unwrap_or(0);
    let nonzero = block.iter().filter(|&&b| b != 0).count();
    let head: Vec<String> = block[first..(first + 8).min(block.len())]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!(
        "unrecognised data: {nonzero} non-zero bytes, from byte {first}: {}",
        head.join(" ")
    )
}

/// Verifies `image` (from offset 0) against the log: expected content after every
/// acknowledged op, per 4 KiB block (see the module documentation for what is accepted).
/// `spec.seed` must match the log's; `spec.size` 0 takes the size from the log.
pub fn verify_image(
    image: &mut (impl Read + Seek),
    log: &WriteLog,
    spec: &WorkloadSpec,
) -> anyhow::Result<VerifyReport> {
    let mut size = spec.size;
    if let Some(h) = log.spec() {
        ensure!(
            h.seed == spec.seed,
            "the log was written with seed {}, not {}",
            h.seed,
            spec.seed
        );
        if size == 0 {
            size = h.size;
        }
    }
    ensure!(
        size > 0 && size.is_multiple_of(BLOCK),
        "size {size} is not a positive multiple of 4 KiB"
    );
    let nblocks = size / BLOCK;
    let any = Cand {
        content: BlockContent::Any,
        rank: 0,
    };
    let mut state: Vec<Vec<Cand>> = vec![Vec::new(); nblocks as usize];
    for (i, e) in log.entries().iter().enumerate() {
        ensure!(
            e.completion == i as u64,
            "log entry {i} has completion rank {} (log out of order)",
            e.completion
        );
        ensure!(
            e.issued_after <= e.completion,
            "log entry {i} was issued after its own completion"
        );
        let content = match e.kind {
            OpKind::Flush => continue,
            OpKind::Write => BlockContent::Op(e.index),
            OpKind::WriteZeroes | OpKind::Trim => BlockContent::Zero,
        };
        let end = e.offset + u64::from(e.len);
        ensure!(
            e.offset % BLOCK == 0 && end % BLOCK == 0 && end <= size,
            "log entry {i} ({}+{}) is outside the 4 KiB grid of the {size}-byte range",
            e.offset,
            e.len
        );
        let definite = e.error.is_none() && e.kind != OpKind::Trim;
        let new = Cand {
            content,
            rank: e.completion + 1,
        };
        for b in e.offset / BLOCK..end / BLOCK {
            let cands = &mut state[b as usize];
            if cands.is_empty() {
                cands.push(any);
            }
            apply(cands, new, definite, e.issued_after);
        }
    }

    image.seek(SeekFrom::Start(0))?;
    let mut report = VerifyReport {
        ok: true,
        blocks: nblocks,
        checked: 0,
        unconstrained: 0,
        ambiguous: 0,
        mismatched: 0,
        mismatches: Vec::new(),
    };
    let chunk_blocks = 256u64; // 1 MiB reads
    let mut buf = vec![0u8; (chunk_blocks * BLOCK) as usize];
    let mut expect = vec![0u8; BLOCK as usize];
    let mut b = 0u64;
    while b < nblocks {
        let n = chunk_blocks.min(nblocks - b);
        let chunk = &mut buf[..(n * BLOCK) as usize];
        image.read_exact(chunk).with_context(|| {
            format!(
                "reading the image at offset {} (shorter than {size} bytes?)",
                b * BLOCK
            )
        })?;
        for (j, block) in chunk.chunks_exact(BLOCK as usize).enumerate() {
            let blk = b + j as u64;
            let cands = &state[blk as usize];
            if cands.is_empty() || cands.iter().any(|c| c.content == BlockContent::Any) {
                report.unconstrained += 1;
                continue;
            }
            report.checked += 1;
            if cands.len() > 1 {
                report.ambiguous += 1;
            }
            let matches = |c: &Cand, expect: &mut [u8]| match c.content {
                BlockContent::Any => true,
                BlockContent::Zero => block.iter().all(|&x| x == 0),
                BlockContent::Op(i) => {
                    block_content(spec.seed, i, blk * BLOCK, expect);
                    block == expect
                }
            };
            if !cands.iter().any(|c| matches(c, &mut expect)) {
                report.ok = false;
                report.mismatched += 1;
                if report.mismatches.len() < MAX_LISTED_MISMATCHES {
                    report.mismatches.push(Mismatch {
                        offset: blk * BLOCK,
                        expected: cands.iter().map(|c| c.content).collect(),
                        found: describe(block, &mut expect),
                    });
                }
            }
        }
        b += n;
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nbd_client::NbdClient;
    use crate::nbd_proto::*;
    use crate::test_server::{Config, ReplyOrder, TempDir, TestServer};
    use crate::workload::{run, WorkloadSpec};
    use std::io::Cursor;

    fn spec(seed: u64) -> WorkloadSpec {
        WorkloadSpec {
            seed,
            ops: 600,
            queue_depth: 8,
            size: 0,
            max_io: 256 * 1024,
            flush_every: 50,
            fua_percent: 10,
            trim_percent: 5,
            zero_percent: 5,
            overlap_in_flight: false,
        }
    }

    /// Runs `spec` against a fresh test server; returns the final image and the log.
    fn run_on_server(spec: &WorkloadSpec, order: ReplyOrder) -> (Vec<u8>, WriteLog) {
        let srv = TestServer::start(Config {
            size: 8 << 20,
            order,
            ..Config::default()
        });
        let mut c = NbdClient::connect_unix(srv.path(), "vol").unwrap();
        let mut log = WriteLog::new();
        let report = run(&mut c, spec, Some(&mut log)).unwrap();
        assert_eq!(report.ops, spec.ops);
        assert_eq!(report.errors, 0);
        assert!(report.bytes_written > 0 && report.iops > 0.0);
        c.disconnect().unwrap();
        let image = srv.disk.lock().unwrap().clone();
        (image, log)
    }

    #[test]
    fn round_trip_then_a_flipped_byte_is_found() {
        let spec = spec(42);
        let (mut image, log) = run_on_server(&spec, ReplyOrder::ReverseAvailable);
        assert_eq!(log.entries().len() as u64, spec.ops);
        assert_eq!(
            log.spec().unwrap().size,
            8 << 20,
            "the log records the resolved size"
        );
        let kinds = |k| log.entries().iter().filter(|e| e.kind == k).count();
        assert_eq!(kinds(OpKind::Flush), 12);
        assert!(kinds(OpKind::Trim) > 0 && kinds(OpKind::WriteZeroes) > 0);
        assert!(log.entries().iter().any(|e| e.fua));
        // Replies came back out of order: acknowledgement order differs from issue order.
        assert!(log.entries().windows(2).any(|w| w[0].index > w[1].index));

        // Through a file, as the CLI does.
        let d = TempDir::new("wl");
        log.save(&d.path("log")).unwrap();
        let log = WriteLog::load(&d.path("log")).unwrap();
        let first = std::fs::read_to_string(d.path("log")).unwrap();
        assert!(first
            .lines()
            .next()
            .unwrap()
            .contains("\"type\":\"header\""));

        let r = verify_image(&mut Cursor::new(&image), &log, &spec).unwrap();
        assert!(r.ok, "{:?}", r.mismatches);
        assert_eq!(r.ambiguous, r.ambiguous.min(r.checked));
        assert!(r.checked > 100 && r.unconstrained > 0, "{r:?}");

        // Flip one byte in the last block the workload wrote data to.
        let blk = (0..image.len() / 4096)
            .rev()
            .find(|&b| &image[b * 4096..b * 4096 + 8] == MAGIC)
            .unwrap();
        let index = u64::from_le_bytes(image[blk * 4096 + 16..blk * 4096 + 24].try_into().unwrap());
        image[blk * 4096 + 1000] ^= 0x01;
        let r = verify_image(&mut Cursor::new(&image), &log, &spec).unwrap();
        assert!(!r.ok);
        assert_eq!(r.mismatched, 1);
        let m = &r.mismatches[0];
        assert_eq!(m.offset, blk as u64 * 4096);
        assert_eq!(m.expected, [BlockContent::Op(index)]);
        assert!(
            m.found.contains(&format!("op {index}"))
                && m.found.contains("corrupted from byte 1000"),
            "{}",
            m.found
        );

        // A lost write (the block reads as zeroes) and a misplaced one.
        image[blk * 4096 + 1000] ^= 0x01;
        image[blk * 4096..(blk + 1) * 4096].fill(0);
        let r = verify_image(&mut Cursor::new(&image), &log, &spec).unwrap();
        assert_eq!(
            (r.mismatched, r.mismatches[0].found.as_str()),
            (1, "zeroes")
        );
        block_content(42, index, 0, &mut image[blk * 4096..(blk + 1) * 4096]);
        let r = verify_image(&mut Cursor::new(&image), &log, &spec).unwrap();
        assert!(
            r.mismatches[0].found.contains("at offset 0"),
            "{}",
            r.mismatches[0].found
        );
    }

    #[test]
    fn same_seed_same_image_regardless_of_reply_order() {
        let (a, _) = run_on_server(&spec(7), ReplyOrder::InOrder);
        let (b, _) = run_on_server(&spec(7), ReplyOrder::ReverseAvailable);
        assert!(
            a == b,
            "the non-overlapping rule makes the final image deterministic"
        );
        let (c, _) = run_on_server(&spec(8), ReplyOrder::InOrder);
        assert!(a != c);
    }

    #[test]
    fn overlapping_in_flight_mode_accepts_either_order() {
        let s = WorkloadSpec {
            overlap_in_flight: true,
            queue_depth: 16,
            ..spec(9)
        };
        let (image, log) = run_on_server(&s, ReplyOrder::ReverseAvailable);
        let r = verify_image(&mut Cursor::new(&image), &log, &s).unwrap();
        assert!(r.ok, "{:?}", r.mismatches);
        assert!(
            r.ambiguous > 0,
            "overlapping ops were in flight together: {r:?}"
        );
    }

    #[test]
    fn candidate_sets() {
        let c = |content, rank| Cand { content, rank };
        let mut s = vec![c(BlockContent::Any, 0)];
        // A (completion 0) and B (completion 1) both issued before any ack: either may win.
        apply(&mut s, c(BlockContent::Op(1), 1), true, 0);
        apply(&mut s, c(BlockContent::Op(2), 2), true, 0);
        assert_eq!(
            s.iter().map(|c| c.content).collect::<Vec<_>>(),
            [BlockContent::Op(1), BlockContent::Op(2)]
        );
        // A trim issued after both: old data or zeroes.
        apply(&mut s, c(BlockContent::Zero, 3), false, 2);
        assert_eq!(s.len(), 3);
        // A write issued after everything was acknowledged decides.
        apply(&mut s, c(BlockContent::Op(4), 4), true, 3);
        assert_eq!(
            s.iter().map(|c| c.content).collect::<Vec<_>>(),
            [BlockContent::Op(4)]
        );
    }

    #[test]
    fn found_summaries() {
        let mut scratch = vec![0u8; 4096];
        let mut b = vec![0u8; 4096];
        assert_eq!(describe(&b, &mut scratch), "zeroes");
        b[100] = 0x55;
        assert_eq!(
            describe(&b, &mut scratch),
            "unrecognised data: 1 non-zero bytes, from byte 100: 55 00 00 00 00 00 00 00"
        );
        block_content(3, 17, 8192, &mut b);
        assert_eq!(
            describe(&b, &mut scratch),
            "the block op 17 (seed 3) wrote at offset 8192"
        );
        assert_eq!(BlockContent::Op(17).to_string(), "op 17");
    }

    #[test]
    fn spec_and_log_are_checked() {
        let srv = TestServer::start(Config {
            tflags: NBD_FLAG_HAS_FLAGS | NBD_FLAG_SEND_FLUSH,
            ..Config::default()
        });
        let mut c = NbdClient::connect_unix(srv.path(), "vol").unwrap();
        let e = run(&mut c, &spec(1), None).unwrap_err();
        assert!(e.to_string().contains("does not support FUA"), "{e}");
        let plain = WorkloadSpec {
            fua_percent: 0,
            trim_percent: 0,
            zero_percent: 0,
            ops: 50,
            ..spec(1)
        };
        let mut log = WriteLog::new();
        run(&mut c, &plain, Some(&mut log)).unwrap();
        let e = verify_image(&mut Cursor::new(vec![0u8; 16 << 20]), &log, &spec(2)).unwrap_err();
        assert!(e.to_string().contains("seed 1"), "{e}");
        let e = verify_image(&mut Cursor::new(vec![0u8; 4096]), &log, &plain).unwrap_err();
        assert!(format!("{e:#}").contains("shorter"), "{e:#}");
        for bad in [
            WorkloadSpec {
                size: 5000,
                ..plain.clone()
            },
            WorkloadSpec {
                size: 32 << 20,
                ..plain.clone()
            },
            WorkloadSpec {
                queue_depth: 0,
                ..plain.clone()
            },
            WorkloadSpec {
                trim_percent: 60,
                zero_percent: 50,
                ..plain.clone()
            },
        ] {
            assert!(run(&mut c, &bad, None).is_err(), "{bad:?}");
        }
        assert!(WriteLog::read_from(&b"{\"type\":\"op\"}\n"[..]).is_err());
    }
}
