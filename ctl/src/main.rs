//! `blkrep`: the operator command, drbdadm-like.
//!
//! `blkrep [--config FILE] [--node NAME] VERB [RESOURCE]`. The config defaults to
//! `/etc/blkrep/RESOURCE.toml`, the node to `$BLKREP_NODE` or the host name. Exit codes:
//! 0 done, 1 refused or failed, 2 bad usage or configuration, 3 the daemon is not running
//! (`status`).

mod baseline;
mod check;
mod drill;
mod human;
mod leg;
mod md;
mod sealed;

use anyhow::{bail, Context};
use blkrep_common::config::{Config, DEFAULT_CONFIG_DIR};
use blkrep_common::control::{self, CallError, DaemonStatus, Request};
use clap::{Parser, Subcommand};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

#[derive(Parser)]
#[command(
    name = "blkrep",
    version,
    about = "blkrep: block replication for disaster recovery",
    after_help = "Exit codes: 0 done, 1 refused or failed, 2 bad usage or configuration, 3 daemon not running."
)]
struct Cli {
    /// Resource configuration (TOML). Default: /etc/blkrep/RESOURCE.toml.
    #[arg(long, short, global = true)]
    config: Option<PathBuf>,
    /// This node's name in the configuration. Default: $BLKREP_NODE, else the host name.
    #[arg(long, short, global = true)]
    node: Option<String>,
    #[command(subcommand)]
    verb: Verb,
}

#[derive(Subcommand)]
enum Verb {
    /// Make a TLS key and self-signed certificate for a node (PREFIX.key, PREFIX.crt) and
    /// print the lines for its [[node]] section. Needs no configuration.
    Keygen {
        /// Path prefix of the files, e.g. /etc/blkrep/alpha.
        #[arg(long)]
        out: PathBuf,
        /// Overwrite existing files (the old key stops working at the peer once the
        /// fingerprint in the configuration changes).
        #[arg(long)]
        force: bool,
        #[arg(long)]
        json: bool,
    },
    /// Initialise this node's metadata (refuses to overwrite valid metadata without --force).
    CreateMd {
        resource: Option<String>,
        /// Overwrite existing blkrep metadata (its replication state is lost).
        #[arg(long)]
        force: bool,
    },
    /// Print this node's metadata.
    DumpMd {
        resource: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Start the daemon for this node; returns once it serves.
    Up {
        resource: Option<String>,
        /// Seconds to wait for the daemon to answer.
        #[arg(long, default_value_t = 30)]
        timeout: u64,
    },
    /// Stop the daemon cleanly (a primary first drains its queue to the peer, briefly).
    Down {
        resource: Option<String>,
        /// Seconds to wait for the daemon to exit.
        #[arg(long, default_value_t = 30)]
        timeout: u64,
    },
    /// Show role, connection, disk state, replication lag and counters.
    Status {
        resource: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Make this node the primary (a planned switchover: the peer must be connected and
    /// secondary; waits until that holds or the timeout passes).
    Promote {
        resource: Option<String>,
        /// Take over without the peer (forced takeover when the primary site is lost):
        /// starts a new data generation; the peer is resynced from this node when it
        /// returns, and a peer that took writes meanwhile is reported as a split brain.
        #[arg(long)]
        force: bool,
        /// Seconds to keep retrying while the peer is not connected or still catching up.
        #[arg(long, default_value_t = 30)]
        timeout: u64,
        #[arg(long)]
        json: bool,
    },
    /// Make this node a secondary (its export turns read-only).
    Demote {
        resource: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Resolve a split brain: run on the node whose changes are given up.
    Resolve {
        resource: Option<String>,
        /// Discard this node's changes; it takes the peer's data by a full sync.
        #[arg(long, required = true)]
        discard_local: bool,
        #[arg(long)]
        json: bool,
    },
    /// Online verify (on the primary): compare every block with the peer's, at the same
    /// point of the replication stream; exit 4 when blocks differ (and were not repaired).
    Verify {
        resource: Option<String>,
        /// Resync the blocks that differ, in the same run.
        #[arg(long)]
        repair: bool,
        /// Start it and return; `status` shows progress and the result.
        #[arg(long)]
        no_wait: bool,
        #[arg(long)]
        json: bool,
    },
    /// Configuration baseline: record this node's configuration, state and content summary
    /// (blake3 per extent of the backing) before a change; show what changed since.
    Baseline {
        #[command(subcommand)]
        action: BaselineAction,
    },
    /// The node's event log: role changes, connects, resyncs, split brains, failures,
    /// operator commands and who asked, alerts. Read from the file: works with the daemon
    /// down.
    Events {
        resource: Option<String>,
        /// Keep printing new events as they come.
        #[arg(long, short)]
        follow: bool,
        /// Only the last N events (before following).
        #[arg(long)]
        last: Option<usize>,
        /// Only events of this kind (role, connect, resync, operator, alert, daemon, ...).
        #[arg(long)]
        kind: Option<String>,
        /// One JSON object per line (the log's own lines, verified).
        #[arg(long)]
        json: bool,
    },
    /// Preflight (read-only, either node): backing, metadata, journal room, the daemon, the
    /// peer reachable and authenticated, the configuration identical on both nodes, link
    /// round trip and bandwidth, clock offset, generations. Exit 1 when a check fails.
    Check {
        resource: Option<String>,
        /// Bytes to send to the peer to measure the bandwidth (0: skip).
        #[arg(long, default_value = "8M", value_parser = parse_size)]
        bandwidth_bytes: u64,
        #[arg(long)]
        json: bool,
    },
    /// Latency histograms: the volume's block devices as the kernel sees them (eBPF), and
    /// each stage of the replication path as the daemon times it; p50/p99/p99.9.
    Latency {
        resource: Option<String>,
        /// Redraw every INTERVAL seconds, showing what happened in the interval.
        #[arg(long)]
        watch: bool,
        /// Seconds between redraws with --watch.
        #[arg(long, default_value_t = 2.0)]
        interval: f64,
        /// Stop after this many intervals with --watch (default: until interrupted).
        #[arg(long)]
        count: Option<u64>,
        /// Show empty histograms too.
        #[arg(long)]
        all: bool,
        /// JSON (with --watch: one object per interval, a line each).
        #[arg(long)]
        json: bool,
    },
    /// DR drill on the secondary: a copy-on-write clone of the replica at a consistent
    /// cut, served as a separate device while replication goes on; the checks run on it
    /// (mount, probe command, e2fsck -fn); RPO at the cut and each step's time go into an
    /// evidence report (JSON, Markdown, HTML). Exit 1 when the verdict is fail.
    Drill {
        resource: Option<String>,
        /// Checks to run, comma-separated: mount, probe, fsck (default: drill.checks).
        #[arg(long, value_delimiter = ',')]
        checks: Option<Vec<String>>,
        /// A shell command run against the clone (default: drill.probe); it gets
        /// BLKREP_DRILL_DEVICE, BLKREP_DRILL_NBD and BLKREP_DRILL_MOUNT.
        #[arg(long)]
        probe: Option<String>,
        /// Seconds the probe may run.
        #[arg(long, default_value_t = 600)]
        probe_timeout: u64,
        /// List past drills and their verdicts.
        #[arg(long, conflicts_with_all = ["abort", "checks", "probe"])]
        history: bool,
        /// End a drill left running (its clone and store are removed).
        #[arg(long, conflicts_with_all = ["checks", "probe"])]
        abort: bool,
        #[arg(long)]
        json: bool,
    },
    /// Local legs (node.backing and node.mirror): detach, attach (rebuild what it
    /// missed), replace (a new device, rebuilt in full).
    Leg {
        #[command(subcommand)]
        action: leg::LegCmd,
    },
    /// Failback: show what the next connection moves (direction, method, bytes).
    Failback {
        resource: Option<String>,
        /// Print the plan; nothing moves.
        #[arg(long, required = true)]
        plan: bool,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum BaselineAction {
    /// Record a baseline now (reads the whole backing).
    Save {
        resource: Option<String>,
        /// Its name (default: the time, e.g. 20261125T165400Z).
        #[arg(long)]
        name: Option<String>,
        /// Extent size of the content summary.
        #[arg(long, default_value = "64M", value_parser = parse_size)]
        extent: u64,
        /// Replace a baseline of the same name.
        #[arg(long)]
        force: bool,
        #[arg(long)]
        json: bool,
    },
    /// What changed since a baseline (default: the newest): configuration lines, state,
    /// extents whose content differs.
    Diff {
        resource: Option<String>,
        /// The baseline's name.
        #[arg(long)]
        name: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// The saved baselines.
    List {
        resource: Option<String>,
        #[arg(long)]
        json: bool,
    },
}

impl Verb {
    fn resource(&self) -> Option<&str> {
        match self {
            Verb::CreateMd { resource, .. }
            | Verb::DumpMd { resource, .. }
            | Verb::Up { resource, .. }
            | Verb::Down { resource, .. }
            | Verb::Status { resource, .. }
            | Verb::Promote { resource, .. }
            | Verb::Demote { resource, .. }
            | Verb::Resolve { resource, .. }
            | Verb::Verify { resource, .. }
            | Verb::Failback { resource, .. }
            | Verb::Latency { resource, .. }
            | Verb::Check { resource, .. }
            | Verb::Drill { resource, .. }
            | Verb::Events { resource, .. } => resource.as_deref(),
            Verb::Baseline { action } => match action {
                BaselineAction::Save { resource, .. }
                | BaselineAction::Diff { resource, .. }
                | BaselineAction::List { resource, .. } => resource.as_deref(),
            },
            Verb::Leg { action } => action.resource(),
            Verb::Keygen { .. } => None,
        }
    }
}

/// An error with its exit code.
struct Fail(u8, anyhow::Error);

impl<E: Into<anyhow::Error>> From<E> for Fail {
    fn from(e: E) -> Fail {
        Fail(1, e.into())
    }
}

fn usage(e: impl Into<anyhow::Error>) -> Fail {
    Fail(2, e.into())
}

fn main() -> ExitCode {
    // Output piped into `head` ends quietly, as for other Unix tools.
    // SAFETY: resetting a signal disposition to its default, before any thread starts.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => ExitCode::from(code),
        Err(Fail(code, e)) => {
            eprintln!("blkrep: {e:#}");
            ExitCode::from(code)
        }
    }
}

fn keygen(out: &Path, force: bool, json: bool) -> Result<u8, Fail> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let name = out
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .filter(|n| !n.is_empty())
        .ok_or_else(|| {
            usage(anyhow::anyhow!(
                "--out needs a file name prefix, like /etc/blkrep/alpha"
            ))
        })?;
    let prefix = std::path::absolute(out).unwrap_or_else(|_| out.to_path_buf());
    let key_path = PathBuf::from(format!("{}.key", prefix.display()));
    let cert_path = PathBuf::from(format!("{}.crt", prefix.display()));
    if !force {
        for p in [&key_path, &cert_path] {
            if p.exists() {
                return Err(anyhow::anyhow!(
                    "{} exists; pass --force to replace the key (the peer then needs the new fingerprint)",
                    p.display()
                )
                .into());
            }
        }
    }
    let k = blkrep_transport::tls::keygen(&name)?;
    let write = |p: &Path, data: &str, mode: u32| -> anyhow::Result<()> {
        let _ = std::fs::remove_file(p);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(p)
            .with_context(|| format!("cannot create {}", p.display()))?;
        f.write_all(data.as_bytes())?;
        f.sync_all()?;
        Ok(())
    };
    write(&key_path, &k.key_pem, 0o600)?;
    write(&cert_path, &k.cert_pem, 0o644)?;
    if json {
        let v = serde_json::json!({
            "key": key_path,
            "cert": cert_path,
            "fingerprint": k.fingerprint.to_string(),
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(0);
    }
    println!(
        "wrote {} (private: keep it on this node only) and {}",
        key_path.display(),
        cert_path.display()
    );
    println!(
        "put these lines in this node's [[node]] section, in the configuration of both nodes:"
    );
    println!("key = \"{}\"", key_path.display());
    println!("cert = \"{}\"", cert_path.display());
    println!("fingerprint = \"{}\"", k.fingerprint);
    Ok(0)
}

/// `BLKREP_NODE=...` from `RESOURCE.env` beside the configuration (the file the systemd
/// unit reads), so that `blkrep` and the unit agree on the node without `--node`.
fn node_from_env_file(config: &Path, resource: &str) -> Option<String> {
    let env = config.parent()?.join(format!("{resource}.env"));
    let text = std::fs::read_to_string(env).ok()?;
    text.lines().find_map(|l| {
        let v = l.trim().strip_prefix("BLKREP_NODE=")?;
        let v = v.trim().trim_matches(|c| c == '"' || c == '\'');
        (!v.is_empty()).then(|| v.to_string())
    })
}

fn load(cli: &Cli) -> Result<(Config, String), Fail> {
    let path = match (&cli.config, cli.verb.resource()) {
        (Some(p), _) => p.clone(),
        (None, Some(r)) => Path::new(DEFAULT_CONFIG_DIR).join(format!("{r}.toml")),
        (None, None) => {
            return Err(usage(anyhow::anyhow!(
                "name a resource or pass --config FILE"
            )))
        }
    };
    let path = std::path::absolute(&path).unwrap_or(path);
    let cfg = Config::load(&path).map_err(usage)?;
    if let Some(r) = cli.verb.resource() {
        if r != cfg.resource.name {
            return Err(usage(anyhow::anyhow!(
                "{} describes resource {:?}, not {r:?}",
                path.display(),
                cfg.resource.name
            )));
        }
    }
    let node = match cli
        .node
        .clone()
        .or_else(|| std::env::var("BLKREP_NODE").ok())
        .or_else(|| node_from_env_file(&path, &cfg.resource.name))
    {
        Some(n) => n,
        None => {
            let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
                .unwrap_or_default()
                .trim()
                .to_string();
            if cfg.node(&host).is_err() {
                return Err(usage(anyhow::anyhow!(
                    "which node is this? pass --node (one of: {}); the host name {host:?} is not in the config",
                    cfg.node_names()
                )));
            }
            host
        }
    };
    cfg.node(&node).map_err(usage)?;
    Ok((cfg, node))
}

fn run(cli: Cli) -> Result<u8, Fail> {
    if let Verb::Keygen { out, force, json } = &cli.verb {
        return keygen(out, *force, *json);
    }
    let (cfg, node) = load(&cli)?;
    match cli.verb {
        Verb::Keygen { .. } => unreachable!("handled before loading the configuration"),
        Verb::CreateMd { force, .. } => {
            if daemon_pid(&cfg, &node).is_some() {
                return Err(anyhow::anyhow!(
                    "the daemon of {node} is running; run `blkrep down` first"
                )
                .into());
            }
            let msg = md::create(&cfg, &node, force)?;
            println!("{msg}");
            Ok(0)
        }
        Verb::DumpMd { json, .. } => {
            let m = md::read(&cfg, &node)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&md::to_json(&m))?);
            } else {
                print!("{}", human::metadata(&m));
            }
            Ok(0)
        }
        Verb::Up { timeout, .. } => up(&cfg, &node, Duration::from_secs(timeout)),
        Verb::Down { timeout, .. } => down(&cfg, &node, Duration::from_secs(timeout)),
        Verb::Status { json, .. } => status(&cfg, &node, json),
        Verb::Promote {
            force,
            timeout,
            json,
            ..
        } => {
            let deadline = Instant::now() + Duration::from_secs(timeout);
            let mut last_note = String::new();
            loop {
                match call(&cfg, &node, &Request::Promote { force }) {
                    Ok(v) => return Ok(done(&v, json)),
                    Err(CallError::Refused(e))
                        if matches!(e.code.as_str(), "peer_not_connected" | "busy")
                            && Instant::now() < deadline =>
                    {
                        if e.message != last_note && !json {
                            eprintln!("waiting: {}", e.message);
                            last_note = e.message.clone();
                        }
                        std::thread::sleep(Duration::from_millis(200));
                    }
                    Err(e) => return Err(e.into()),
                }
            }
        }
        Verb::Demote { json, .. } => {
            let v = call(&cfg, &node, &Request::Demote)?;
            Ok(done(&v, json))
        }
        Verb::Resolve {
            discard_local,
            json,
            ..
        } => {
            let v = call(&cfg, &node, &Request::Resolve { discard_local })?;
            Ok(done(&v, json))
        }
        Verb::Verify {
            repair,
            no_wait,
            json,
            ..
        } => verify(&cfg, &node, repair, no_wait, json),
        Verb::Baseline { action } => baseline_cmd(&cfg, &node, action),
        Verb::Events {
            follow,
            last,
            kind,
            json,
            ..
        } => events(&cfg, &node, follow, last, kind.as_deref(), json),
        Verb::Check {
            bandwidth_bytes,
            json,
            ..
        } => {
            let status = daemon_status(&cfg, &node);
            let items = check::run(&cfg, &node, status.as_ref(), bandwidth_bytes as usize);
            if json {
                let failed = items.iter().any(|i| i.result == check::Level::Fail);
                println!(
                    "{}",
                    serde_json::to_string_pretty(&serde_json::json!({
                        "node": node,
                        "resource": cfg.resource.name,
                        "ok": !failed,
                        "checks": items,
                    }))?
                );
            } else {
                print!("{}", check::render(&items));
            }
            Ok(items.iter().any(|i| i.result == check::Level::Fail) as u8)
        }
        Verb::Latency {
            watch,
            interval,
            count,
            all,
            json,
            ..
        } => latency(&cfg, &node, watch, interval, count, all, json),
        Verb::Drill {
            checks,
            probe,
            probe_timeout,
            history,
            abort,
            json,
            ..
        } => Ok(if history {
            drill::history(&cfg, &node, json)?
        } else if abort {
            drill::abort(&cfg, &node, json)?
        } else {
            drill::run(
                &cfg,
                &node,
                &drill::Opts {
                    checks,
                    probe,
                    probe_timeout: Duration::from_secs(probe_timeout),
                    json,
                },
            )?
        }),
        Verb::Leg { action } => leg::run(&cfg, &node, action),
        Verb::Failback { json, .. } => {
            let v = call(&cfg, &node, &Request::Plan)?;
            if json {
                println!("{v}");
            } else {
                print!("{}", human::plan(&v));
            }
            Ok(0)
        }
    }
}

/// `blkrep baseline ...`.
fn baseline_cmd(cfg: &Config, node: &str, action: BaselineAction) -> Result<u8, Fail> {
    use std::io::IsTerminal;
    let progress = std::io::stderr().is_terminal();
    match action {
        BaselineAction::Save {
            name,
            extent,
            force,
            json,
            ..
        } => {
            let name = name.unwrap_or_else(|| {
                blkrep_common::events::rfc3339(blkrep_common::events::now_ms())
                    .replace([':', '-'], "")
                    .split('.')
                    .next()
                    .unwrap_or("baseline")
                    .to_string()
                    + "Z"
            });
            baseline::check_name(&name).map_err(usage)?;
            let status = daemon_status(cfg, node);
            let b = baseline::take(cfg, node, &name, status.as_ref(), extent, progress && !json)?;
            let path = baseline::save(cfg, node, &b, force)?;
            if json {
                println!(
                    "{}",
                    serde_json::json!({"name": b.name, "path": path, "saved_at": b.saved_at,
                        "extents": b.content.extents.len(), "state": b.state})
                );
            } else {
                println!(
                    "baseline {:?} saved: {} ({} extents of {}; {} / {}, generation {}, sequence {})",
                    b.name,
                    path.display(),
                    b.content.extents.len(),
                    human::bytes(b.content.extent_bytes),
                    b.state.role,
                    b.state.disk_state,
                    b.state.generation,
                    b.state.seq
                );
            }
            Ok(0)
        }
        BaselineAction::Diff { name, json, .. } => {
            let then = baseline::load(cfg, node, name.as_deref())?;
            let status = daemon_status(cfg, node);
            let now = baseline::take(
                cfg,
                node,
                "now",
                status.as_ref(),
                then.content.extent_bytes,
                progress && !json,
            )?;
            let d = baseline::diff(&then, &now);
            if json {
                println!("{}", serde_json::to_string_pretty(&d)?);
            } else {
                print!("{}", baseline::render_diff(&d));
            }
            Ok(0)
        }
        BaselineAction::List { json, .. } => {
            let all = baseline::list(cfg, node)?;
            if json {
                let v: Vec<_> = all
                    .iter()
                    .map(|b| serde_json::json!({"name": b.name, "saved_at": b.saved_at, "state": b.state}))
                    .collect();
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else if all.is_empty() {
                println!("no baselines ({})", baseline::dir(cfg, node)?.display());
            } else {
                for b in &all {
                    println!(
                        "{:<24} {}  {} / {}, generation {}, sequence {}",
                        b.name,
                        b.saved_at,
                        b.state.role,
                        b.state.disk_state,
                        b.state.generation,
                        b.state.seq
                    );
                }
            }
            Ok(0)
        }
    }
}

/// `blkrep events`: print the log, then with `follow` what gets appended.
fn events(
    cfg: &Config,
    node: &str,
    follow: bool,
    last: Option<usize>,
    kind: Option<&str>,
    json: bool,
) -> Result<u8, Fail> {
    use blkrep_common::events::EventRecord;
    use std::io::BufRead;
    let path = cfg.node(node)?.events.clone();
    let show = |e: &EventRecord| {
        if json {
            println!("{}", e.to_line());
        } else {
            println!(
                "{}  {:<8} {:<10} {}{}",
                e.ts,
                e.severity,
                e.kind,
                e.message,
                e.by.as_deref()
                    .map(|b| format!("  [by {b}]"))
                    .unwrap_or_default()
            );
        }
    };
    let mut file = match std::fs::File::open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && follow => {
            eprintln!("waiting for {} to appear", path.display());
            loop {
                std::thread::sleep(Duration::from_millis(500));
                if let Ok(f) = std::fs::File::open(&path) {
                    break f;
                }
            }
        }
        Err(e) => {
            return Err(anyhow::anyhow!(
                "event log {}: {e} (the daemon creates it when it starts; node.events sets it)",
                path.display()
            )
            .into())
        }
    };
    // The lines there now are collected (for --last), then printed; with --follow the
    // lines appended later are printed as they come. A line without its newline is still
    // being written: it is read again later.
    let mut reader = std::io::BufReader::new(&mut file);
    let mut first: Option<Vec<EventRecord>> = Some(Vec::new());
    let mut line = String::new();
    let mut n = 0;
    loop {
        line.clear();
        let got = reader.read_line(&mut line)?;
        if got == 0 || !line.ends_with('\n') {
            if got > 0 {
                reader.seek_relative(-(got as i64))?;
            }
            if let Some(all) = first.take() {
                let skip = last.map_or(0, |l| all.len().saturating_sub(l));
                all[skip..].iter().for_each(&show);
                if !follow {
                    return Ok(0);
                }
            }
            std::thread::sleep(Duration::from_millis(200));
            continue;
        }
        n += 1;
        match EventRecord::from_line(line.trim_end()) {
            // --kind filters before --last counts.
            Ok(e) if kind.is_some_and(|k| k != e.kind) => {}
            Ok(e) => match first.as_mut() {
                Some(all) => all.push(e),
                None => show(&e),
            },
            Err(why) if !line.trim().is_empty() => {
                eprintln!("blkrep: {}: line {n}: {why} (skipped)", path.display())
            }
            Err(_) => {}
        }
    }
}

/// `8M`-style sizes for options.
fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mul) = match s.chars().last() {
        Some('K' | 'k') => (&s[..s.len() - 1], 1u64 << 10),
        Some('M' | 'm') => (&s[..s.len() - 1], 1 << 20),
        Some('G' | 'g') => (&s[..s.len() - 1], 1 << 30),
        _ => (s, 1),
    };
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mul))
        .ok_or_else(|| format!("{s:?} is not a size like 8M"))
}

/// `blkrep latency`: one report, or with `watch` one per interval (the interval's own).
fn latency(
    cfg: &Config,
    node: &str,
    watch: bool,
    interval: f64,
    count: Option<u64>,
    all: bool,
    json: bool,
) -> Result<u8, Fail> {
    use blkrep_common::latency::LatencyReport;
    use std::io::IsTerminal;
    let get = || -> Result<LatencyReport, Fail> {
        let v = call(cfg, node, &Request::Latency)?;
        serde_json::from_value(v)
            .map_err(|e| anyhow::anyhow!("the daemon's latency report: {e}").into())
    };
    let mut last = get()?;
    if !watch {
        if json {
            println!("{}", serde_json::to_string_pretty(&last)?);
        } else {
            print!("{}", human::latency(&last, all));
        }
        return Ok(0);
    }
    if !(interval > 0.0 && interval.is_finite()) {
        return Err(Fail(
            2,
            anyhow::anyhow!("--interval must be a positive number of seconds"),
        ));
    }
    let clear = std::io::stdout().is_terminal() && !json;
    let mut n = 0;
    while count.is_none_or(|c| n < c) {
        std::thread::sleep(Duration::from_secs_f64(interval));
        let now = get()?;
        let d = human::latency_delta(&now, &last);
        if json {
            println!("{}", serde_json::to_string(&d)?);
        } else {
            if clear {
                print!("\x1b[2J\x1b[H");
            }
            print!("{}", human::latency(&d, all));
        }
        last = now;
        n += 1;
    }
    Ok(0)
}

/// `blkrep verify`: start, follow the progress (a bar on a terminal), report.
fn verify(cfg: &Config, node: &str, repair: bool, no_wait: bool, json: bool) -> Result<u8, Fail> {
    use std::io::IsTerminal;
    let v = call(cfg, node, &Request::Verify { repair })?;
    if no_wait {
        return Ok(done(&v, json));
    }
    let tty = std::io::stderr().is_terminal() && !json;
    let result = loop {
        std::thread::sleep(Duration::from_millis(200));
        let s = call(cfg, node, &Request::Status)?;
        let r = s["engine"]["verify"].clone();
        let (checked, total) = (
            r["checked_bytes"].as_u64().unwrap_or(0),
            r["total_bytes"].as_u64().unwrap_or(1).max(1),
        );
        if tty {
            let pct = checked * 100 / total;
            let bar = "#".repeat((pct / 4) as usize);
            eprint!(
                "\rverify [{bar:<25}] {pct:>3}%  {} of {}, {} differ",
                human::bytes(checked),
                human::bytes(total),
                human::bytes(r["out_of_sync_bytes"].as_u64().unwrap_or(0))
            );
        }
        if r["done"].as_bool() == Some(true) {
            if tty {
                eprintln!();
            }
            break r;
        }
    };
    if let Some(why) = result["aborted"].as_str() {
        return Err(anyhow::anyhow!("verify aborted: {why}").into());
    }
    let bad = result["out_of_sync_bytes"].as_u64().unwrap_or(0);
    if repair && bad > 0 {
        // The repair is a resync of those blocks: wait for it.
        loop {
            let s = call(cfg, node, &Request::Status)?;
            let e = &s["engine"];
            if e["resync"].is_null() && e["peer_needs_full_sync"] == false {
                break;
            }
            if e["conn"] != "sync_source" && e["conn"] != "connected" {
                return Err(anyhow::anyhow!(
                    "the repair stopped: the connection is {}; it resumes when the peer returns",
                    e["conn"]
                )
                .into());
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    if json {
        println!("{result}");
    } else if bad == 0 {
        println!(
            "verify: all {} match the peer ({:.1} s)",
            human::bytes(result["total_bytes"].as_u64().unwrap_or(0)),
            result["seconds"].as_f64().unwrap_or(0.0)
        );
    } else {
        println!(
            "verify: {} differ from the peer{}",
            human::bytes(bad),
            if repair {
                "; repaired (resynced from this node)"
            } else {
                ""
            }
        );
        for r in result["out_of_sync"].as_array().into_iter().flatten() {
            let (s, e) = (r[0].as_u64().unwrap_or(0), r[1].as_u64().unwrap_or(0));
            println!("  {s:>14} .. {e:<14} ({})", human::bytes(e - s));
        }
    }
    Ok(if bad > 0 && !repair { 4 } else { 0 })
}

fn done(v: &serde_json::Value, json: bool) -> u8 {
    if json {
        println!("{v}");
    } else if let Some(m) = v["message"].as_str() {
        println!("{m}");
    }
    0
}

fn call(cfg: &Config, node: &str, req: &Request) -> Result<serde_json::Value, CallError> {
    control::call(&cfg.control_socket(node), req, Duration::from_secs(60))
}

/// The daemon's status, if one answers on the control socket.
fn daemon_status(cfg: &Config, node: &str) -> Option<serde_json::Value> {
    control::call(
        &cfg.control_socket(node),
        &Request::Status,
        Duration::from_secs(5),
    )
    .ok()
}

/// The daemon's pid, if one answers on the control socket.
fn daemon_pid(cfg: &Config, node: &str) -> Option<u32> {
    daemon_status(cfg, node)
        .and_then(|v| v["pid"].as_u64())
        .map(|p| p as u32)
}

/// How clients reach a serving daemon, for `up`; `None` while its ublk device is still
/// being created.
fn serving(v: &serde_json::Value) -> Option<String> {
    if v["frontend"] != "ublk" {
        return Some(format!("export {}", v["export"].as_str().unwrap_or("?")));
    }
    let dev = v["device"].as_str()?;
    Some(if v["device_state"] == "held" {
        format!("device {dev} (recovered after a crash: its I/O waits until this node is promoted)")
    } else {
        format!("device {dev}")
    })
}

fn find_daemon() -> anyhow::Result<PathBuf> {
    if let Ok(p) = std::env::var("BLKREPD") {
        return Ok(p.into());
    }
    let exe = std::env::current_exe().context("locating the blkrep binary")?;
    let sibling = exe.with_file_name("blkrepd");
    if sibling.exists() {
        return Ok(sibling);
    }
    for dir in std::env::var("PATH").unwrap_or_default().split(':') {
        let p = Path::new(dir).join("blkrepd");
        if p.exists() {
            return Ok(p);
        }
    }
    bail!("cannot find blkrepd (next to blkrep, on PATH, or in $BLKREPD)")
}

fn up(cfg: &Config, node: &str, timeout: Duration) -> Result<u8, Fail> {
    if let Some(pid) = daemon_pid(cfg, node) {
        println!("{}/{node}: already running (pid {pid})", cfg.resource.name);
        return Ok(0);
    }
    // Fail early, with the same checks the daemon makes, so the message lands here.
    md::read(cfg, node)?;
    let daemon = find_daemon()?;
    std::fs::create_dir_all(&cfg.resource.run_dir)
        .with_context(|| format!("creating run_dir {}", cfg.resource.run_dir.display()))?;
    let log_path = cfg.log_file(node);
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .with_context(|| format!("opening log {}", log_path.display()))?;
    let log_start = log.metadata().map(|m| m.len()).unwrap_or(0);
    use std::os::unix::process::CommandExt;
    let mut child = std::process::Command::new(&daemon)
        .arg("--config")
        .arg(&cfg.path)
        .arg("--node")
        .arg(node)
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        // Its own process group: a Ctrl-C meant for a later command does not reach it.
        .process_group(0)
        .spawn()
        .with_context(|| format!("starting {}", daemon.display()))?;
    let deadline = Instant::now() + timeout;
    loop {
        // Up means serving: with ublk, once the block device exists.
        if let Some(v) = daemon_status(cfg, node) {
            if let Some(how) = serving(&v) {
                println!(
                    "{}/{node}: up (pid {}), {how}, log {}",
                    cfg.resource.name,
                    v["pid"],
                    log_path.display()
                );
                return Ok(0);
            }
        }
        if let Some(st) = child.try_wait()? {
            let tail = read_from(&log_path, log_start);
            return Err(anyhow::anyhow!(
                "blkrepd exited ({st}) before serving:\n{}",
                tail.trim_end()
            )
            .into());
        }
        if Instant::now() > deadline {
            return Err(anyhow::anyhow!(
                "blkrepd (pid {}) did not answer within {}s; see {}",
                child.id(),
                timeout.as_secs(),
                log_path.display()
            )
            .into());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn read_from(path: &Path, offset: u64) -> String {
    let s = std::fs::read(path).unwrap_or_default();
    String::from_utf8_lossy(&s[(offset as usize).min(s.len())..]).into_owned()
}

fn pid_alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| {
                s.rsplit(')')
                    .next()
                    .unwrap_or("")
                    .trim_start()
                    .starts_with('Z')
            })
            .unwrap_or(true)
}

fn down(cfg: &Config, node: &str, timeout: Duration) -> Result<u8, Fail> {
    let Some(pid) = daemon_pid(cfg, node) else {
        println!("{}/{node}: not running", cfg.resource.name);
        return Ok(0);
    };
    // A daemon that stops at once may exit before its answer is written: what counts is
    // that the process goes away.
    let asked = call(cfg, node, &Request::Shutdown);
    if let Err(e) = asked {
        let grace = Instant::now() + Duration::from_secs(2);
        while pid_alive(pid) && Instant::now() < grace {
            std::thread::sleep(Duration::from_millis(20));
        }
        if pid_alive(pid) {
            return Err(e.into());
        }
    }
    let deadline = Instant::now() + timeout;
    while pid_alive(pid) {
        if Instant::now() > deadline {
            return Err(anyhow::anyhow!(
                "blkrepd (pid {pid}) is still running after {}s; see {}",
                timeout.as_secs(),
                cfg.log_file(node).display()
            )
            .into());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    println!("{}/{node}: down", cfg.resource.name);
    Ok(0)
}

fn status(cfg: &Config, node: &str, json: bool) -> Result<u8, Fail> {
    match call(cfg, node, &Request::Status) {
        Ok(mut v) => {
            if json {
                if let Some(o) = v.as_object_mut() {
                    o.insert("running".into(), true.into());
                }
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                let st: DaemonStatus =
                    serde_json::from_value(v).context("decoding the daemon's status")?;
                print!("{}", human::status(&st));
            }
            Ok(0)
        }
        Err(CallError::NotRunning { .. }) => {
            if json {
                println!(
                    "{}",
                    serde_json::json!({
                        "resource": cfg.resource.name,
                        "node": node,
                        "running": false,
                    })
                );
            } else {
                println!("{}/{node}: not running", cfg.resource.name);
            }
            Ok(3)
        }
        Err(e) => Err(e.into()),
    }
}
