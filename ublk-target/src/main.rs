//! `blkrepd --config FILE --node NAME`: serve one node of one resource.

use clap::Parser;
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    name = "blkrepd",
    version,
    about = "blkrep daemon: serves one node of a replicated volume"
)]
struct Args {
    /// Resource configuration (TOML).
    #[arg(long, short)]
    config: PathBuf,
    /// This node's name in the configuration.
    #[arg(long, short)]
    node: String,
    /// Refuse to start unless the eBPF latency programs attach (overrides `ebpf` in the
    /// node's configuration).
    #[arg(long)]
    require_ebpf: bool,
}

/// Keep request buffers (up to 32 MiB each) on the heap and the heap untrimmed: glibc
/// would otherwise mmap and munmap every large buffer, and the page faults of fresh
/// mappings cost more than the copy itself on 1 MiB writes.
fn tune_allocator() {
    // SAFETY: mallopt only changes allocator parameters; called before any thread starts.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 64 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 512 << 20);
    }
}

fn main() {
    tune_allocator();
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("BLKREP_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_target(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let mut cfg = match blkrep_common::config::Config::load(&args.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("blkrepd: {e}");
            std::process::exit(2);
        }
    };
    if args.require_ebpf {
        for n in cfg.nodes.iter_mut().filter(|n| n.name == args.node) {
            n.ebpf = blkrep_common::config::Ebpf::Require;
        }
    }
    if let Err(e) = blkrep_target::serve::run(&cfg, &args.node) {
        tracing::error!("{e:#}");
        eprintln!("blkrepd: {e:#}");
        std::process::exit(1);
    }
}
