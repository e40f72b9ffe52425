//! `blkrep-tools`: NBD workload with a write-order log, image verification, comparison and
//! hashing. Exit status: 0 success, 1 a difference or mismatch was found, 2 an error.

mod demo;

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use serde::Serialize;

use blkrep_tools::compare::{compare_files, hash_file, DEFAULT_EXTENT};
use blkrep_tools::uri::NbdUri;
use blkrep_tools::workload::{self, verify_image, WorkloadSpec, WriteLog};

#[derive(Parser)]
#[command(
    name = "blkrep-tools",
    version,
    about = "blkrep test and benchmark tools"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run a seeded random write workload through NBD, optionally logging the write order.
    Workload(WorkloadArgs),
    /// Verify an image against a write-order log.
    Verify(VerifyArgs),
    /// Compare two images (files or block devices) with blake3, whole and per extent.
    Compare(CompareArgs),
    /// Print the blake3 hash of a file or block device.
    Hash(HashArgs),
    /// The demo: two nodes on loopback, a workload, replica checks, a switchover.
    Demo(DemoCli),
}

#[derive(Args)]
struct DemoCli {
    /// Directory for the backing files, config and logs (default: a new one under /tmp).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Volume size.
    #[arg(long, value_parser = parse_size, default_value = "256M")]
    size: u64,
    /// Replication mode.
    #[arg(long, default_value = "async", value_parser = ["sync", "async"])]
    mode: String,
    /// Number of workload ops.
    #[arg(long, default_value_t = 20_000)]
    ops: u64,
    /// Keep the directory afterwards.
    #[arg(long)]
    keep: bool,
}

#[derive(Args)]
struct WorkloadArgs {
    /// nbd+unix:///EXPORT?socket=PATH or nbd://HOST[:PORT]/EXPORT
    #[arg(long)]
    uri: NbdUri,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    #[arg(long, default_value_t = 10_000)]
    ops: u64,
    /// Queue depth.
    #[arg(long, default_value_t = 8)]
    qd: usize,
    /// Bytes of the device to use from offset 0 (K/M/G/T suffixes); default: all of it.
    #[arg(long, value_parser = parse_size)]
    size: Option<u64>,
    /// Largest op (a multiple of 4K).
    #[arg(long, value_parser = parse_size, default_value = "256K")]
    max_io: u64,
    /// Every N-th op is a flush (0 = never).
    #[arg(long, default_value_t = 100)]
    flush_every: u64,
    #[arg(long, default_value_t = 5)]
    fua_percent: u8,
    #[arg(long, default_value_t = 5)]
    trim_percent: u8,
    #[arg(long, default_value_t = 5)]
    zero_percent: u8,
    /// Allow overlapping writes in flight together (the expected image becomes a set).
    #[arg(long)]
    overlap_in_flight: bool,
    /// Write the write-order log (JSON lines) here.
    #[arg(long)]
    log: Option<PathBuf>,
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct VerifyArgs {
    #[arg(long)]
    image: PathBuf,
    #[arg(long)]
    log: PathBuf,
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct CompareArgs {
    a: PathBuf,
    b: PathBuf,
    /// Extent size (K/M/G suffixes).
    #[arg(long, value_parser = parse_size, default_value_t = DEFAULT_EXTENT)]
    extent: u64,
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct HashArgs {
    file: PathBuf,
    #[arg(long)]
    json: bool,
}

/// Sizes as the config accepts them: 4096, 64K, 1M, 2G, 1.5T.
fn parse_size(s: &str) -> Result<u64, String> {
    blkrep_common::config::parse_size(s)
}

fn print_json(v: &impl Serialize) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    serde_json::to_writer_pretty(&mut out, v)?;
    writeln!(out)?;
    Ok(())
}

fn cmd_workload(a: WorkloadArgs) -> anyhow::Result<ExitCode> {
    let spec = WorkloadSpec {
        seed: a.seed,
        ops: a.ops,
        queue_depth: a.qd,
        size: a.size.unwrap_or(0),
        max_io: u32::try_from(a.max_io).context("--max-io too large")?,
        flush_every: a.flush_every,
        fua_percent: a.fua_percent,
        trim_percent: a.trim_percent,
        zero_percent: a.zero_percent,
        overlap_in_flight: a.overlap_in_flight,
    };
    let mut client = a
        .uri
        .connect()
        .with_context(|| format!("connecting to {}", a.uri))?;
    let mut log = WriteLog::new();
    let report = workload::run(&mut client, &spec, Some(&mut log))?;
    client.disconnect()?;
    if let Some(p) = &a.log {
        log.save(p)
            .with_context(|| format!("writing {}", p.display()))?;
    }
    if a.json {
        print_json(&report)?;
    } else {
        println!(
            "workload: {} ops in {:.2} s: {:.0} IOPS, {:.1} MiB/s written, {} errors",
            report.ops, report.seconds, report.iops, report.mib_per_sec, report.errors
        );
        if let Some(p) = &a.log {
            println!("write-order log: {}", p.display());
        }
    }
    Ok(if report.errors == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

fn cmd_verify(a: VerifyArgs) -> anyhow::Result<ExitCode> {
    let log = WriteLog::load(&a.log).with_context(|| format!("reading {}", a.log.display()))?;
    let spec = log
        .spec()
        .cloned()
        .context("the log has no header (spec)")?;
    let mut image =
        std::fs::File::open(&a.image).with_context(|| format!("opening {}", a.image.display()))?;
    let r = verify_image(&mut image, &log, &spec)?;
    if a.json {
        print_json(&r)?;
    } else if r.ok {
        println!(
            "verify: OK: {} blocks checked ({} ambiguous), {} never written",
            r.checked, r.ambiguous, r.unconstrained
        );
    } else {
        println!(
            "verify: MISMATCH: {} of {} checked blocks differ",
            r.mismatched, r.checked
        );
        for m in r.mismatches.iter().take(20) {
            println!(
                "  offset {}: expected {:?}, found {}",
                m.offset, m.expected, m.found
            );
        }
    }
    Ok(if r.ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

fn cmd_compare(a: CompareArgs) -> anyhow::Result<ExitCode> {
    let r = compare_files(&a.a, &a.b, a.extent)?;
    if a.json {
        print_json(&r)?;
    } else if r.equal {
        println!("equal: {} bytes, blake3 {}", r.size_a, r.hash_a);
    } else {
        println!("DIFFERENT:");
        println!(
            "  {}: {} bytes, blake3 {}",
            a.a.display(),
            r.size_a,
            r.hash_a
        );
        println!(
            "  {}: {} bytes, blake3 {}",
            a.b.display(),
            r.size_b,
            r.hash_b
        );
        for (off, len) in &r.differing_extents {
            println!("  differs at {off}..{} ({len} bytes)", off + len);
        }
    }
    Ok(if r.equal {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

fn cmd_hash(a: HashArgs) -> anyhow::Result<ExitCode> {
    let h = hash_file(&a.file)?;
    if a.json {
        print_json(&serde_json::json!({ "file": a.file, "blake3": h }))?;
    } else {
        println!("{h}  {}", a.file.display());
    }
    Ok(ExitCode::SUCCESS)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let r = match cli.cmd {
        Cmd::Workload(a) => cmd_workload(a),
        Cmd::Verify(a) => cmd_verify(a),
        Cmd::Compare(a) => cmd_compare(a),
        Cmd::Hash(a) => cmd_hash(a),
        Cmd::Demo(a) => demo::run(demo::DemoArgs {
            dir: a.dir,
            size: a.size,
            mode: a.mode,
            ops: a.ops,
            keep: a.keep,
        })
        .map(|ok| {
            if ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }),
    };
    r.unwrap_or_else(|e| {
        eprintln!("blkrep-tools: error: {e:#}");
        ExitCode::from(2)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("4K"), Ok(4096));
        assert_eq!(parse_size("256KiB"), Ok(256 << 10));
        assert_eq!(parse_size("1m"), Ok(1 << 20));
        assert_eq!(parse_size("2G"), Ok(2 << 30));
        assert_eq!(parse_size("1T"), Ok(1 << 40));
        assert!(parse_size("4X").is_err());
        assert!(parse_size("K").is_err());
        assert!(parse_size("99999999999T").is_err());
    }

    #[test]
    fn cli_parses() {
        Cli::command().debug_assert();
        let cli = Cli::try_parse_from([
            "blkrep-tools",
            "workload",
            "--uri",
            "nbd+unix:///vol?socket=/tmp/s",
            "--qd",
            "4",
            "--size",
            "64M",
            "--log",
            "/tmp/l",
        ])
        .unwrap();
        let Cmd::Workload(w) = cli.cmd else {
            panic!("workload expected")
        };
        assert_eq!((w.qd, w.size, w.max_io), (4, Some(64 << 20), 256 << 10));
        assert!(Cli::try_parse_from(["blkrep-tools", "workload", "--uri", "http://x"]).is_err());
        let cli = Cli::try_parse_from([
            "blkrep-tools",
            "compare",
            "a",
            "b",
            "--extent",
            "64K",
            "--json",
        ])
        .unwrap();
        let Cmd::Compare(c) = cli.cmd else {
            panic!("compare expected")
        };
        assert_eq!((c.extent, c.json), (64 << 10, true));
    }
}
