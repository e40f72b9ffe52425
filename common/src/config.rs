//! The resource configuration: one TOML file describes one replicated volume and its two
//! nodes. Both nodes use the same file (`blkrep check` will compare them by hash).
//!
//! ```toml
//! [resource]
//! name = "r0"
//! size = "10G"            # bytes, or a string with K/M/G/T (binary) suffix
//! mode = "sync"           # or "async"
//! queue_limit = "64M"     # async ship queue bound (in memory for now)
//! resync_rate = "100M"    # resync bandwidth limit, bytes per second (default: none)
//! replication_rate = "50M" # write-stream bandwidth limit, bytes per second (default: none)
//! compression = "lz4"     # compress shipped writes ("none", the default, or "lz4")
//! full_sync = "copy"      # or "checksum": compare blake3 per 4 KiB block, copy what differs
//! run_dir = "/run/blkrep" # control sockets, NBD sockets, logs
//! frontend = "auto"       # "ublk", "nbd", or "auto": ublk when /dev/ublk-control exists
//! ublk_queues = 1         # ublk hardware queues (a node may override both)
//! ublk_depth = 64         # ublk tags per queue (1-4096)
//! insecure = false        # true: plaintext replication link (trusted networks only)
//!
//! [[node]]
//! name = "alpha"
//! address = "10.0.0.1:7789"        # replication address: the peer dials it
//! listen = "0.0.0.0:7789"          # optional: where this node listens (default: address)
//! key = "/etc/blkrep/alpha.key"    # TLS private key (only alpha needs the file)
//! cert = "/etc/blkrep/alpha.crt"   # TLS certificate
//! fingerprint = "sha256:…"         # the certificate's fingerprint: the peer pins it
//! backing = "/dev/vg0/r0"          # file or block device
//! metadata = "/var/lib/blkrep/r0.md"
//! nbd = "unix:/run/blkrep/r0.nbd"  # optional: "unix:PATH" or "tcp:127.0.0.1:10809"
//! metrics = "127.0.0.1:9707"       # optional: Prometheus text-format endpoint
//! ebpf = "auto"                    # block-device latency by eBPF: auto (default), require, off
//! journal = "/var/lib/blkrep/r0.journal" # optional: the primary's persistent write journal
//! journal_size = "1G"              # its size (default 256M, at least 8M)
//! mirror = "/dev/vg1/r0"           # optional second local leg (writes go to both)
//! read_policy = "balanced"         # reads: "balanced", "first" or "second" leg
//! leg_timeout = 5.0                # seconds before a hung leg request fails the leg
//! rebuild_rate = "200M"            # leg rebuild bandwidth, bytes/s (default: none)
//! on_io_error = "fail"             # no healthy leg left: fail the volume, or "diskless":
//!                                  # a primary goes on through its up-to-date peer
//!
//! [[node]]
//! name = "beta"
//! ...
//! ```
//!
//! Every problem is reported with the field it concerns (`node[1].backing: ...`).

use blkrep_engine::Mode;
pub use blkrep_transport::tls::Fingerprint;
use serde::Deserialize;
use std::path::{Path, PathBuf};

/// Default directory for sockets and logs.
pub const DEFAULT_RUN_DIR: &str = "/run/blkrep";
/// Default directory holding `RESOURCE.toml` files.
pub const DEFAULT_CONFIG_DIR: &str = "/etc/blkrep";
/// Volume sizes and request offsets are multiples of this (O_DIRECT on 4K-sector disks).
pub const SIZE_ALIGN: u64 = 4096;
const DEFAULT_QUEUE_LIMIT: u64 = 64 << 20;
/// Journal size when `journal_size` is not given.
pub const DEFAULT_JOURNAL_SIZE: u64 = 256 << 20;
/// Smallest journal accepted.
pub const MIN_JOURNAL_SIZE: u64 = 8 << 20;
const MIN_QUEUE_LIMIT: u64 = 1 << 20;
const MAX_NAME: usize = 64;
/// Default ublk hardware queues: one (the single event loop serves every queue).
pub const DEFAULT_UBLK_QUEUES: u16 = 1;
/// Default ublk tags per queue.
pub const DEFAULT_UBLK_DEPTH: u16 = 64;
/// The kernel's limit on tags per queue (`UBLK_MAX_QUEUE_DEPTH`).
pub const UBLK_MAX_DEPTH: u16 = 4096;
/// At most this many queues.
pub const UBLK_MAX_QUEUES: u16 = 64;
/// At most this many tags in all (each holds a 512 KiB buffer).
pub const UBLK_MAX_TAGS: u32 = 4096;
/// The ublk control device; its presence makes `frontend = "auto"` choose ublk.
pub const UBLK_CONTROL: &str = "/dev/ublk-control";

/// A configuration problem: which file, which field, what is wrong.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The file is not valid TOML or does not have the expected shape.
    #[error("config {path}: {message}")]
    Parse { path: PathBuf, message: String },
    /// A field has an invalid value.
    #[error("config {path}: {field}: {problem}")]
    Invalid {
        path: PathBuf,
        field: String,
        problem: String,
    },
    /// The requested node is not in the configuration.
    #[error("node {node:?} is not in config {path} (it has: {known})")]
    UnknownNode {
        path: PathBuf,
        node: String,
        known: String,
    },
}

/// A size in bytes, written as an integer or as a string like `"64M"`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Size(pub u64);

impl<'de> Deserialize<'de> for Size {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Size, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Int(i64),
            Str(String),
        }
        match Raw::deserialize(d)? {
            Raw::Int(i) if i >= 0 => Ok(Size(i as u64)),
            Raw::Int(i) => Err(serde::de::Error::custom(format!("size {i} is negative"))),
            Raw::Str(s) => parse_size(&s).map(Size).map_err(serde::de::Error::custom),
        }
    }
}

/// Parse `"4096"`, `"64K"`, `"10G"`, `"1.5T"`... (binary multiples; `B`/`iB` suffixes allowed).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let t = t
        .strip_suffix("iB")
        .or_else(|| t.strip_suffix('B'))
        .unwrap_or(t);
    let (num, mult) = match t.chars().last() {
        Some(c @ ('k' | 'K' | 'm' | 'M' | 'g' | 'G' | 't' | 'T')) => {
            let shift = match c.to_ascii_uppercase() {
                'K' => 10,
                'M' => 20,
                'G' => 30,
                _ => 40,
            };
            (&t[..t.len() - 1], 1u64 << shift)
        }
        _ => (t, 1),
    };
    let bad = || format!("{s:?} is not a size (examples: 4096, \"64M\", \"10G\")");
    if num.contains('.') {
        let f: f64 = num.trim().parse().map_err(|_| bad())?;
        if !(f.is_finite() && f >= 0.0) {
            return Err(bad());
        }
        let v = f * mult as f64;
        if v > u64::MAX as f64 {
            return Err(format!("{s:?} is too large"));
        }
        Ok(v as u64)
    } else {
        let n: u64 = num.trim().parse().map_err(|_| bad())?;
        n.checked_mul(mult)
            .ok_or_else(|| format!("{s:?} is too large"))
    }
}

/// Where a node exports its NBD frontend.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NbdListen {
    /// A Unix socket path.
    Unix(PathBuf),
    /// A TCP address (`host:port`); loopback only unless `nbd_allow_remote`.
    Tcp(String),
}

/// How clients reach the volume.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Frontend {
    /// ublk when the kernel offers it (`/dev/ublk-control` exists), else NBD.
    Auto,
    /// A kernel block device, `/dev/ublkbN`, through the ublk driver.
    Ublk,
    /// An NBD export on a Unix socket or a loopback TCP port.
    Nbd,
}

impl Frontend {
    /// The frontend to use, given whether the ublk control device exists.
    pub fn resolve(self, ublk_available: bool) -> Frontend {
        match self {
            Frontend::Auto if ublk_available => Frontend::Ublk,
            Frontend::Auto => Frontend::Nbd,
            f => f,
        }
    }

    /// `"ublk"`, `"nbd"` or `"auto"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Frontend::Auto => "auto",
            Frontend::Ublk => "ublk",
            Frontend::Nbd => "nbd",
        }
    }
}

/// Queues and depth of a node's ublk device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UblkShape {
    /// Hardware queues.
    pub queues: u16,
    /// Tags per queue.
    pub depth: u16,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    resource: RawResource,
    #[serde(default)]
    node: Vec<RawNode>,
    alerts: Option<RawAlerts>,
    drill: Option<RawDrill>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDrill {
    checks: Option<Vec<String>>,
    probe: Option<String>,
    reports: Option<PathBuf>,
    store: Option<PathBuf>,
}

/// The checks a drill can run on its clone, in the order they run.
pub const DRILL_CHECKS: [&str; 3] = ["mount", "probe", "fsck"];

/// `blkrep drill` settings (`[drill]`).
#[derive(Clone, Debug, PartialEq)]
pub struct Drill {
    /// Checks to run on the clone: `mount` (mount it, list the root, unmount; the
    /// journal replay goes to the clone), `probe` (the probe command), `fsck`
    /// (`e2fsck -fn`). Default: all three (`probe` only when a probe command is set).
    pub checks: Vec<String>,
    /// A shell command run against the clone (`BLKREP_DRILL_DEVICE`, `BLKREP_DRILL_NBD`
    /// and, while mounted, `BLKREP_DRILL_MOUNT` in its environment); exit 0 passes.
    pub probe: Option<String>,
    /// Where evidence reports go (default: beside the node's event log, `NAME.drills/`).
    pub reports: Option<PathBuf>,
    /// Where the clone's copy-on-write store lives (default: beside the event log).
    pub store: Option<PathBuf>,
}

impl Default for Drill {
    fn default() -> Self {
        Drill {
            checks: DRILL_CHECKS.iter().map(|c| c.to_string()).collect(),
            probe: None,
            reports: None,
            store: None,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAlerts {
    rpo_seconds: Option<f64>,
    journal_fill_percent: Option<f64>,
    link_down_seconds: Option<f64>,
}

/// Alert thresholds (`[alerts]`); 0 turns one off. Crossing one raises an `alert` event
/// and sets `blkrep_alert{alert="..."}`; going back under it clears it.
#[derive(Clone, Debug, PartialEq)]
pub struct Alerts {
    /// The primary's lag (age of the oldest write the peer has not applied), seconds.
    pub rpo_seconds: f64,
    /// The primary's journal fill, percent.
    pub journal_fill_percent: f64,
    /// The replication link down (neither connected nor syncing), seconds.
    pub link_down_seconds: f64,
}

impl Default for Alerts {
    fn default() -> Self {
        Alerts {
            rpo_seconds: 60.0,
            journal_fill_percent: 80.0,
            link_down_seconds: 30.0,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawResource {
    name: String,
    size: Size,
    mode: String,
    queue_limit: Option<Size>,
    resync_rate: Option<Size>,
    replication_rate: Option<Size>,
    compression: Option<String>,
    full_sync: Option<String>,
    run_dir: Option<PathBuf>,
    frontend: Option<String>,
    ublk_queues: Option<i64>,
    ublk_depth: Option<i64>,
    insecure: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNode {
    name: String,
    address: String,
    listen: Option<String>,
    key: Option<PathBuf>,
    cert: Option<PathBuf>,
    fingerprint: Option<String>,
    backing: PathBuf,
    metadata: PathBuf,
    nbd: Option<String>,
    metrics: Option<String>,
    ublk_queues: Option<i64>,
    ublk_depth: Option<i64>,
    journal: Option<PathBuf>,
    journal_size: Option<Size>,
    ebpf: Option<String>,
    events: Option<PathBuf>,
    mirror: Option<PathBuf>,
    read_policy: Option<String>,
    leg_timeout: Option<f64>,
    rebuild_rate: Option<Size>,
    on_io_error: Option<String>,
}

/// The resource section, validated.
#[derive(Clone, Debug)]
pub struct Resource {
    /// Resource (volume) name; also the NBD export name.
    pub name: String,
    /// Volume size in bytes (a multiple of 4096).
    pub size: u64,
    /// Replication mode.
    pub mode: Mode,
    /// Bound of the in-memory ship queue in bytes.
    pub queue_limit: u64,
    /// Resync bandwidth limit, bytes per second; 0 for none.
    pub resync_rate: u64,
    /// Replication (write stream) bandwidth limit, bytes per second; 0 for none.
    pub replication_rate: u64,
    /// Compress shipped write payloads with LZ4 (`compression = "lz4"`).
    pub compress: bool,
    /// A full sync compares checksums and copies only what differs (for two volumes that
    /// already hold mostly the same data) instead of copying everything.
    pub checksum_full_sync: bool,
    /// Directory for control sockets, NBD sockets and logs.
    pub run_dir: PathBuf,
    /// How clients reach the volume.
    pub frontend: Frontend,
    /// ublk queues and depth (nodes may override them).
    pub ublk: UblkShape,
    /// The replication link runs in plaintext, unauthenticated (`insecure = true`).
    pub insecure: bool,
}

/// A node's TLS identity: its key and certificate files and the certificate's fingerprint,
/// which its peer pins.
#[derive(Clone, Debug)]
pub struct NodeTls {
    /// Private key (PEM); only this node reads it.
    pub key: PathBuf,
    /// Certificate (PEM).
    pub cert: PathBuf,
    /// SHA-256 fingerprint of the certificate.
    pub fingerprint: Fingerprint,
}

/// One node, validated.
#[derive(Clone, Debug)]
pub struct NodeConfig {
    /// Node name (unique in the resource).
    pub name: String,
    /// Replication address `host:port`: its peer dials it (and this node listens on it
    /// unless `listen` says otherwise).
    pub address: String,
    /// Where this node listens for its peer, when not on `address` (NAT, a proxy, 0.0.0.0).
    pub listen: Option<String>,
    /// TLS identity; `None` only when the resource is `insecure`.
    pub tls: Option<NodeTls>,
    /// Backing file or block device.
    pub backing: PathBuf,
    /// Metadata file or device.
    pub metadata: PathBuf,
    /// NBD frontend, if configured explicitly.
    pub nbd: Option<NbdListen>,
    /// ublk queues and depth for this node, when it overrides the resource's.
    pub ublk: UblkShape,
    /// Prometheus text-format endpoint (`host:port`), if configured.
    pub metrics: Option<std::net::SocketAddr>,
    /// The persistent write journal (file or block device) and its size, if configured.
    pub journal: Option<(PathBuf, u64)>,
    /// Block-device latency tracking by eBPF.
    pub ebpf: Ebpf,
    /// The node's event log (default: beside the metadata, `METADATA.events`, or
    /// `/var/lib/blkrep/RESOURCE-NODE.events` when the metadata is a device).
    pub events: PathBuf,
    /// The local legs: the second one (`mirror`) and how both are used.
    pub legs: Legs,
}

/// Local high availability: a second leg beside the backing, and how the two are used.
#[derive(Clone, Debug, PartialEq)]
pub struct Legs {
    /// The second leg (file or block device), if any; `backing` is the first.
    pub mirror: Option<PathBuf>,
    /// Which leg serves reads.
    pub read_policy: ReadPolicy,
    /// A leg request not answered in this many seconds fails the leg.
    pub timeout: f64,
    /// Rebuild bandwidth limit, bytes per second; 0 for none.
    pub rebuild_rate: u64,
    /// What happens when no healthy leg is left.
    pub on_io_error: OnIoError,
}

/// Default `leg_timeout`, seconds.
pub const DEFAULT_LEG_TIMEOUT: f64 = 5.0;

impl Default for Legs {
    fn default() -> Legs {
        Legs {
            mirror: None,
            read_policy: ReadPolicy::Balanced,
            timeout: DEFAULT_LEG_TIMEOUT,
            rebuild_rate: 0,
            on_io_error: OnIoError::Fail,
        }
    }
}

/// Which healthy leg serves a read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReadPolicy {
    /// Alternate by 1 MiB stripe of the offset (both legs busy, sequential runs stay on one).
    Balanced,
    /// The first leg (the backing) while it is healthy.
    First,
    /// The second leg (the mirror) while it is healthy.
    Second,
}

/// What a primary does when no healthy local leg is left.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnIoError {
    /// Fail the volume: clients get I/O errors, nothing more is written or shipped.
    Fail,
    /// A primary whose peer is connected and up to date goes on through it: reads are
    /// served by the peer, writes complete once the peer has applied them. Losing the link
    /// then fails the volume.
    Diskless,
}

/// Whether the daemon traces its block devices with eBPF (`[[node]] ebpf = ...`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Ebpf {
    /// Try; without the privileges or kernel support, say why once and go on without.
    #[default]
    Auto,
    /// Refuse to start without it.
    Require,
    /// Do not load the programs.
    Off,
}

/// A validated resource configuration.
#[derive(Clone, Debug)]
pub struct Config {
    /// Where it was loaded from.
    pub path: PathBuf,
    /// The resource.
    pub resource: Resource,
    /// Exactly two nodes.
    pub nodes: Vec<NodeConfig>,
    /// blake3 of the file's bytes (to compare the two sites' copies).
    pub hash: String,
    /// The file's text (`blkrep check` compares it with the peer's).
    pub text: String,
    /// Alert thresholds.
    pub alerts: Alerts,
    /// Drill settings.
    pub drill: Drill,
}

impl Config {
    /// Read and validate a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.into(),
            source,
        })?;
        Self::parse(&text, path)
    }

    /// Validate config text; `path` is used in messages and to resolve nothing else.
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.into(),
            message: e.to_string().trim_end().replace('\n', " "),
        })?;
        let invalid = |field: String, problem: String| ConfigError::Invalid {
            path: path.into(),
            field,
            problem,
        };
        let r = raw.resource;
        check_name(&r.name).map_err(|p| invalid("resource.name".into(), p))?;
        let mut alerts = Alerts::default();
        if let Some(a) = raw.alerts {
            for (field, v, slot, max) in [
                (
                    "rpo_seconds",
                    a.rpo_seconds,
                    &mut alerts.rpo_seconds,
                    f64::MAX,
                ),
                (
                    "journal_fill_percent",
                    a.journal_fill_percent,
                    &mut alerts.journal_fill_percent,
                    100.0,
                ),
                (
                    "link_down_seconds",
                    a.link_down_seconds,
                    &mut alerts.link_down_seconds,
                    f64::MAX,
                ),
            ] {
                if let Some(v) = v {
                    if !(v.is_finite() && (0.0..=max).contains(&v)) {
                        return Err(invalid(
                            format!("alerts.{field}"),
                            format!("{v} is out of range (0 turns the alert off)"),
                        ));
                    }
                    *slot = v;
                }
            }
        }
        let mut drill = Drill::default();
        if let Some(d) = raw.drill {
            if let Some(checks) = d.checks {
                for c in &checks {
                    if !DRILL_CHECKS.contains(&c.as_str()) {
                        return Err(invalid(
                            "drill.checks".into(),
                            format!("unknown check {c:?} (known: {})", DRILL_CHECKS.join(", ")),
                        ));
                    }
                }
                drill.checks = checks;
            }
            drill.probe = d.probe.filter(|p| !p.trim().is_empty());
            drill.reports = d.reports;
            drill.store = d.store;
        }
        let size = r.size.0;
        if size == 0 {
            return Err(invalid(
                "resource.size".into(),
                "must be greater than 0".into(),
            ));
        }
        if !size.is_multiple_of(SIZE_ALIGN) {
            return Err(invalid(
                "resource.size".into(),
                format!("{size} is not a multiple of {SIZE_ALIGN} bytes"),
            ));
        }
        let mode = match r.mode.as_str() {
            "sync" => Mode::Sync,
            "async" => Mode::Async,
            other => {
                return Err(invalid(
                    "resource.mode".into(),
                    format!("{other:?} is not a mode (use \"sync\" or \"async\")"),
                ))
            }
        };
        let queue_limit = r.queue_limit.map_or(DEFAULT_QUEUE_LIMIT, |s| s.0);
        if queue_limit < MIN_QUEUE_LIMIT {
            return Err(invalid(
                "resource.queue_limit".into(),
                format!("{queue_limit} bytes is below the minimum of {MIN_QUEUE_LIMIT}"),
            ));
        }
        let rate = |v: Option<Size>, field: &str| match v.map_or(0, |s| s.0) {
            r if r != 0 && r < 1 << 20 => Err(invalid(
                format!("resource.{field}"),
                format!("{r} bytes per second is below the minimum of 1M"),
            )),
            r => Ok(r),
        };
        let resync_rate = rate(r.resync_rate, "resync_rate")?;
        let replication_rate = rate(r.replication_rate, "replication_rate")?;
        let compress = match r.compression.as_deref() {
            None | Some("none") => false,
            Some("lz4") => true,
            Some(other) => {
                return Err(invalid(
                    "resource.compression".into(),
                    format!("{other:?} is not a compression (use \"none\" or \"lz4\")"),
                ))
            }
        };
        let checksum_full_sync = match r.full_sync.as_deref() {
            None | Some("copy") => false,
            Some("checksum") => true,
            Some(other) => {
                return Err(invalid(
                    "resource.full_sync".into(),
                    format!("{other:?} is not a full-sync method (use \"copy\" or \"checksum\")"),
                ))
            }
        };
        let run_dir = r.run_dir.unwrap_or_else(|| DEFAULT_RUN_DIR.into());
        let insecure = r.insecure.unwrap_or(false);
        let frontend = match r.frontend.as_deref() {
            None | Some("auto") => Frontend::Auto,
            Some("ublk") => Frontend::Ublk,
            Some("nbd") => Frontend::Nbd,
            Some(other) => {
                return Err(invalid(
                    "resource.frontend".into(),
                    format!("{other:?} is not a frontend (use \"ublk\", \"nbd\" or \"auto\")"),
                ))
            }
        };
        let default_shape = UblkShape {
            queues: DEFAULT_UBLK_QUEUES,
            depth: DEFAULT_UBLK_DEPTH,
        };
        let ublk = ublk_shape(r.ublk_queues, r.ublk_depth, default_shape, "resource")
            .map_err(|(f, p)| invalid(f, p))?;
        if raw.node.len() != 2 {
            return Err(invalid(
                "node".into(),
                format!(
                    "a resource needs exactly two [[node]] sections, found {}",
                    raw.node.len()
                ),
            ));
        }
        let mut nodes = Vec::new();
        for (i, n) in raw.node.into_iter().enumerate() {
            let f = |field: &str| format!("node[{i}].{field}");
            check_name(&n.name).map_err(|p| invalid(f("name"), p))?;
            check_address(&n.address).map_err(|p| invalid(f("address"), p))?;
            for (field, p) in [("backing", &n.backing), ("metadata", &n.metadata)] {
                if p.as_os_str().is_empty() {
                    return Err(invalid(f(field), "must not be empty".into()));
                }
            }
            if n.backing == n.metadata {
                return Err(invalid(
                    f("metadata"),
                    "must not be the backing device itself".into(),
                ));
            }
            let nbd = match n.nbd {
                None => None,
                Some(s) => Some(parse_nbd(&s).map_err(|p| invalid(f("nbd"), p))?),
            };
            let node_ublk = ublk_shape(n.ublk_queues, n.ublk_depth, ublk, &format!("node[{i}]"))
                .map_err(|(f, p)| invalid(f, p))?;
            let metrics = match n.metrics {
                None => None,
                Some(s) => Some(s.parse::<std::net::SocketAddr>().map_err(|e| {
                    invalid(
                        f("metrics"),
                        format!("{s:?} is not an address like 127.0.0.1:9707 ({e})"),
                    )
                })?),
            };
            let ebpf = match n.ebpf.as_deref() {
                None | Some("auto") => Ebpf::Auto,
                Some("require") => Ebpf::Require,
                Some("off") => Ebpf::Off,
                Some(other) => {
                    return Err(invalid(
                        f("ebpf"),
                        format!("{other:?} is not one of \"auto\", \"require\", \"off\""),
                    ))
                }
            };
            if let Some(l) = &n.listen {
                check_address(l).map_err(|p| invalid(f("listen"), p))?;
            }
            let journal = match (n.journal, n.journal_size) {
                (None, None) => None,
                (None, Some(_)) => {
                    return Err(invalid(
                        f("journal_size"),
                        "set without node.journal (the journal's path)".into(),
                    ))
                }
                (Some(p), size) => {
                    if p.as_os_str().is_empty() {
                        return Err(invalid(f("journal"), "must not be empty".into()));
                    }
                    if p == n.backing || p == n.metadata {
                        return Err(invalid(
                            f("journal"),
                            "must be a file or device of its own (not the backing or the \
                             metadata)"
                                .into(),
                        ));
                    }
                    let size = size.map_or(DEFAULT_JOURNAL_SIZE, |s| s.0);
                    if size < MIN_JOURNAL_SIZE || size % SIZE_ALIGN != 0 {
                        return Err(invalid(
                            f("journal_size"),
                            format!(
                                "{size} bytes: must be at least {MIN_JOURNAL_SIZE} and a \
                                 multiple of {SIZE_ALIGN}"
                            ),
                        ));
                    }
                    Some((p, size))
                }
            };
            let tls = match (n.key, n.cert, n.fingerprint) {
                (None, None, None) if insecure => None,
                // insecure = true wins: the link is plaintext, keys or not.
                (Some(_), Some(_), Some(fp)) if insecure => {
                    Fingerprint::parse(&fp)
                        .map_err(|e| invalid(f("fingerprint"), e.to_string()))?;
                    None
                }
                (Some(key), Some(cert), Some(fp)) => Some(NodeTls {
                    key,
                    cert,
                    fingerprint: Fingerprint::parse(&fp)
                        .map_err(|e| invalid(f("fingerprint"), e.to_string()))?,
                }),
                (key, cert, fp) => {
                    let missing = [
                        ("key", key.is_none()),
                        ("cert", cert.is_none()),
                        ("fingerprint", fp.is_none()),
                    ]
                    .iter()
                    .filter(|(_, m)| *m)
                    .map(|(n, _)| *n)
                    .collect::<Vec<_>>();
                    let field = missing.first().copied().unwrap_or("key");
                    return Err(invalid(
                        f(field),
                        if insecure {
                            format!(
                                "set key, cert and fingerprint together, or none of them (missing: {})",
                                missing.join(", ")
                            )
                        } else {
                            format!(
                                "missing ({} missing): the replication link is encrypted and \
                                 authenticated by default; run `blkrep keygen --out DIR/{}` \
                                 and paste the lines it prints, or set resource.insecure = true \
                                 on a trusted network",
                                missing.join(", "),
                                n.name
                            )
                        },
                    ));
                }
            };
            let events = match n.events {
                Some(p) if p.is_absolute() => p,
                Some(p) => {
                    return Err(invalid(
                        f("events"),
                        format!("{} is not an absolute path", p.display()),
                    ))
                }
                None if n.metadata.starts_with("/dev") => {
                    PathBuf::from(format!("/var/lib/blkrep/{}-{}.events", r.name, n.name))
                }
                None => PathBuf::from(format!("{}.events", n.metadata.display())),
            };
            let legs = parse_legs(
                n.mirror,
                n.read_policy,
                n.leg_timeout,
                n.rebuild_rate,
                n.on_io_error,
                [
                    Some(&n.backing),
                    Some(&n.metadata),
                    journal.as_ref().map(|j| &j.0),
                ],
            )
            .map_err(|(field, p)| invalid(f(field), p))?;
            nodes.push(NodeConfig {
                name: n.name,
                address: n.address,
                listen: n.listen,
                tls,
                backing: n.backing,
                metadata: n.metadata,
                nbd,
                ublk: node_ublk,
                metrics,
                journal,
                ebpf,
                events,
                legs,
            });
        }
        if nodes[0].name == nodes[1].name {
            return Err(invalid(
                "node[1].name".into(),
                format!("both nodes are named {:?}", nodes[0].name),
            ));
        }
        if nodes[0].address == nodes[1].address {
            return Err(invalid(
                "node[1].address".into(),
                format!("both nodes use address {}", nodes[0].address),
            ));
        }
        Ok(Config {
            path: path.into(),
            resource: Resource {
                name: r.name,
                size,
                mode,
                queue_limit,
                resync_rate,
                replication_rate,
                compress,
                checksum_full_sync,
                run_dir,
                frontend,
                ublk,
                insecure,
            },
            nodes,
            hash: blake3::hash(text.as_bytes()).to_hex().to_string(),
            text: text.to_string(),
            alerts,
            drill,
        })
    }

    /// Where `node` listens for its peer.
    pub fn listen_address(&self, node: &NodeConfig) -> String {
        node.listen.clone().unwrap_or_else(|| node.address.clone())
    }

    /// The node called `name`.
    pub fn node(&self, name: &str) -> Result<&NodeConfig, ConfigError> {
        self.nodes
            .iter()
            .find(|n| n.name == name)
            .ok_or_else(|| ConfigError::UnknownNode {
                path: self.path.clone(),
                node: name.into(),
                known: self.node_names(),
            })
    }

    /// The other node of `name`.
    pub fn peer_of(&self, name: &str) -> Result<&NodeConfig, ConfigError> {
        self.node(name)?;
        Ok(self
            .nodes
            .iter()
            .find(|n| n.name != name)
            .expect("two nodes"))
    }

    /// Names of the nodes, for messages.
    pub fn node_names(&self) -> String {
        self.nodes
            .iter()
            .map(|n| n.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    }

    fn run_file(&self, node: &str, ext: &str) -> PathBuf {
        self.resource
            .run_dir
            .join(format!("{}-{node}.{ext}", self.resource.name))
    }

    /// The daemon's control socket.
    pub fn control_socket(&self, node: &str) -> PathBuf {
        self.run_file(node, "ctl")
    }

    /// The daemon's log file (written when started by `blkrep up`).
    pub fn log_file(&self, node: &str) -> PathBuf {
        self.run_file(node, "log")
    }

    /// Where the daemon records its ublk device id, for recovery after a crash.
    pub fn ublk_record(&self, node: &str) -> PathBuf {
        self.run_file(node, "ublk")
    }

    /// The leg state file of `node` (leg health and what each leg lacks), beside the
    /// event log: `METADATA.legs`.
    pub fn legs_state(&self, node: &NodeConfig) -> PathBuf {
        node.events.with_extension("legs")
    }

    /// The drill clone's copy-on-write store file of `node`.
    pub fn drill_store(&self, node: &NodeConfig) -> PathBuf {
        match &self.drill.store {
            Some(dir) => dir.join(format!("{}-{}.drill-store", self.resource.name, node.name)),
            None => node.events.with_extension("drill-store"),
        }
    }

    /// The directory of `node`'s drill evidence reports.
    pub fn drill_reports(&self, node: &NodeConfig) -> PathBuf {
        self.drill
            .reports
            .clone()
            .unwrap_or_else(|| node.events.with_extension("drills"))
    }

    /// The drill clone's ublk device record (for removal after a crash).
    pub fn drill_record(&self, node: &str) -> PathBuf {
        self.run_file(node, "drill.ublk")
    }

    /// The drill clone's NBD socket (export `drill`).
    pub fn drill_socket(&self, node: &str) -> PathBuf {
        self.run_file(node, "drill.nbd")
    }

    /// Queues and depth of `node`'s ublk device.
    pub fn ublk_shape(&self, node: &str) -> UblkShape {
        self.node(node).map_or(self.resource.ublk, |n| n.ublk)
    }

    /// Where the node's NBD export listens (default: a Unix socket in the run dir).
    pub fn nbd_listen(&self, node: &str) -> NbdListen {
        self.node(node)
            .ok()
            .and_then(|n| n.nbd.clone())
            .unwrap_or_else(|| NbdListen::Unix(self.run_file(node, "nbd")))
    }

    /// The NBD URI a client uses to reach `node`'s export.
    pub fn nbd_uri(&self, node: &str) -> String {
        match self.nbd_listen(node) {
            NbdListen::Unix(p) => {
                format!("nbd+unix:///{}?socket={}", self.resource.name, p.display())
            }
            NbdListen::Tcp(a) => format!("nbd://{a}/{}", self.resource.name),
        }
    }
}

/// Validate `ublk_queues` / `ublk_depth` of `section` over `base`; errors name the field.
fn ublk_shape(
    queues: Option<i64>,
    depth: Option<i64>,
    base: UblkShape,
    section: &str,
) -> Result<UblkShape, (String, String)> {
    let field = |f: &str| format!("{section}.{f}");
    let queues = match queues {
        None => base.queues,
        Some(q) if (1..=UBLK_MAX_QUEUES as i64).contains(&q) => q as u16,
        Some(q) => {
            return Err((
                field("ublk_queues"),
                format!("{q} is not between 1 and {UBLK_MAX_QUEUES}"),
            ))
        }
    };
    let depth = match depth {
        None => base.depth,
        Some(d) if (1..=UBLK_MAX_DEPTH as i64).contains(&d) => d as u16,
        Some(d) => {
            return Err((
                field("ublk_depth"),
                format!("{d} is not between 1 and {UBLK_MAX_DEPTH} (the kernel's limit)"),
            ))
        }
    };
    let tags = queues as u32 * depth as u32;
    if tags > UBLK_MAX_TAGS {
        return Err((
            field("ublk_depth"),
            format!(
                "{queues} queues x {depth} tags = {tags} tags, more than {UBLK_MAX_TAGS} \
                 (each tag holds a 512 KiB buffer)"
            ),
        ));
    }
    Ok(UblkShape { queues, depth })
}

/// Validate the leg settings of a node (`others`: the node's other files, which the
/// mirror must not be).
fn parse_legs(
    mirror: Option<PathBuf>,
    read_policy: Option<String>,
    timeout: Option<f64>,
    rebuild_rate: Option<Size>,
    on_io_error: Option<String>,
    others: [Option<&PathBuf>; 3],
) -> Result<Legs, (&'static str, String)> {
    let mut legs = Legs::default();
    if let Some(m) = mirror {
        if m.as_os_str().is_empty() {
            return Err(("mirror", "must not be empty".into()));
        }
        if others.iter().flatten().any(|o| **o == m) {
            return Err((
                "mirror",
                format!(
                    "{} is already the backing, the metadata or the journal: the second leg \
                     must be a file or device of its own",
                    m.display()
                ),
            ));
        }
        legs.mirror = Some(m);
    }
    legs.read_policy = match read_policy.as_deref() {
        None | Some("balanced") => ReadPolicy::Balanced,
        Some("first") => ReadPolicy::First,
        Some("second") => ReadPolicy::Second,
        Some(other) => {
            return Err((
                "read_policy",
                format!("{other:?} is not one of \"balanced\", \"first\", \"second\""),
            ))
        }
    };
    if legs.mirror.is_none() && legs.read_policy == ReadPolicy::Second {
        return Err((
            "read_policy",
            "\"second\" needs a second leg (node.mirror)".into(),
        ));
    }
    if let Some(t) = timeout {
        if !(t.is_finite() && (0.05..=3600.0).contains(&t)) {
            return Err((
                "leg_timeout",
                format!("{t} is out of range (0.05 to 3600 seconds)"),
            ));
        }
        legs.timeout = t;
    }
    legs.rebuild_rate = rebuild_rate.map_or(0, |s| s.0);
    legs.on_io_error = match on_io_error.as_deref() {
        None | Some("fail") => OnIoError::Fail,
        Some("diskless") => OnIoError::Diskless,
        Some(other) => {
            return Err((
                "on_io_error",
                format!("{other:?} is not a policy (use \"fail\" or \"diskless\")"),
            ))
        }
    };
    Ok(legs)
}

fn check_name(s: &str) -> Result<(), String> {
    if s.is_empty() {
        return Err("must not be empty".into());
    }
    if s.len() > MAX_NAME {
        return Err(format!("{s:?} is longer than {MAX_NAME} characters"));
    }
    if !s
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    {
        return Err(format!(
            "{s:?} may only contain letters, digits, '-', '_' and '.'"
        ));
    }
    Ok(())
}

fn check_address(s: &str) -> Result<(), String> {
    let Some((host, port)) = s.rsplit_once(':') else {
        return Err(format!("{s:?} is not host:port"));
    };
    if host.is_empty() {
        return Err(format!("{s:?} has no host"));
    }
    match port.parse::<u16>() {
        Ok(p) if p > 0 => Ok(()),
        _ => Err(format!("{s:?} has no valid port (1-65535)")),
    }
}

fn parse_nbd(s: &str) -> Result<NbdListen, String> {
    if let Some(p) = s.strip_prefix("unix:") {
        if p.is_empty() {
            return Err("unix: needs a socket path".into());
        }
        return Ok(NbdListen::Unix(p.into()));
    }
    let addr = s.strip_prefix("tcp:").unwrap_or(s);
    check_address(addr)?;
    let host = addr.rsplit_once(':').map(|h| h.0).unwrap_or_default();
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let loopback = host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .map(|ip| ip.is_loopback())
            .unwrap_or(false);
    if !loopback {
        // NBD has no authentication here: exporting a volume beyond the host would hand
        // it to anyone on the network.
        return Err(format!(
            "{addr:?} is not a loopback address; the NBD export is only served on loopback or a Unix socket"
        ));
    }
    Ok(NbdListen::Tcp(addr.into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[resource]
name = "r0"
size = "64M"
mode = "async"

[[node]]
name = "alpha"
address = "127.0.0.1:7001"
backing = "/tmp/a.img"
metadata = "/tmp/a.md"
key = "/etc/blkrep/alpha.key"
cert = "/etc/blkrep/alpha.crt"
fingerprint = "sha256:abababababababababababababababababababababababababababababababab"

[[node]]
name = "beta"
address = "127.0.0.1:7002"
backing = "/tmp/b.img"
metadata = "/tmp/b.md"
nbd = "tcp:127.0.0.1:10809"
key = "/etc/blkrep/beta.key"
cert = "/etc/blkrep/beta.crt"
fingerprint = "sha256:cdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcd"
"#;

    fn parse(t: &str) -> Result<Config, ConfigError> {
        Config::parse(t, Path::new("r0.toml"))
    }

    fn err(t: &str) -> String {
        parse(t).unwrap_err().to_string()
    }

    #[test]
    fn tls_is_required_unless_insecure() {
        let c = parse(GOOD).unwrap();
        assert!(!c.resource.insecure);
        let t = c.node("beta").unwrap().tls.clone().unwrap();
        assert_eq!(
            t.fingerprint.to_string(),
            format!("sha256:{}", "cd".repeat(32))
        );
        assert_eq!(c.listen_address(c.node("beta").unwrap()), "127.0.0.1:7002");
        let no_fp = GOOD.replace(
            &format!("fingerprint = \"sha256:{}\"\n", "ab".repeat(32)),
            "",
        );
        let e = err(&no_fp);
        assert!(
            e.contains("node[0].fingerprint") && e.contains("blkrep keygen"),
            "{e}"
        );
        let no_tls: String = GOOD
            .lines()
            .filter(|l| {
                !l.starts_with("key") && !l.starts_with("cert") && !l.starts_with("fingerprint")
            })
            .map(|l| format!("{l}\n"))
            .collect();
        assert!(err(&no_tls).contains("insecure = true"));
        let c = parse(&no_tls.replace("mode = \"async\"", "mode = \"async\"\ninsecure = true"))
            .unwrap();
        assert!(c.resource.insecure && c.nodes.iter().all(|n| n.tls.is_none()));
        let bad = GOOD.replace(&"cd".repeat(32), "cd");
        assert!(err(&bad).contains("node[1].fingerprint"), "{}", err(&bad));
        let listen = GOOD.replace(
            "address = \"127.0.0.1:7002\"",
            "address = \"127.0.0.1:7002\"\nlisten = \"nowhere\"",
        );
        assert!(err(&listen).contains("node[1].listen"), "{}", err(&listen));
        let listen = GOOD.replace(
            "address = \"127.0.0.1:7002\"",
            "address = \"127.0.0.1:7002\"\nlisten = \"0.0.0.0:7002\"",
        );
        let c = parse(&listen).unwrap();
        assert_eq!(c.listen_address(c.node("beta").unwrap()), "0.0.0.0:7002");
    }

    #[test]
    fn compression_values() {
        let with = |v: &str| {
            GOOD.replace(
                "mode = \"async\"",
                &format!("mode = \"async\"\ncompression = \"{v}\""),
            )
        };
        let e = err(&with("zstd"));
        assert!(e.contains("resource.compression"), "{e}");
        assert!(parse(&with("lz4")).unwrap().resource.compress);
        assert!(!parse(&with("none")).unwrap().resource.compress);
        assert!(!parse(GOOD).unwrap().resource.compress);
    }

    #[test]
    fn leg_settings() {
        let with = |lines: &str| {
            GOOD.replace(
                "backing = \"/tmp/a.img\"\n",
                &format!("backing = \"/tmp/a.img\"\n{lines}\n"),
            )
        };
        let c = parse(&with(
            "mirror = \"/tmp/a2.img\"\nread_policy = \"second\"\nleg_timeout = 2.5\nrebuild_rate = \"100M\"",
        ))
        .unwrap();
        let l = &c.node("alpha").unwrap().legs;
        assert_eq!(l.mirror.as_deref(), Some(Path::new("/tmp/a2.img")));
        assert_eq!(l.read_policy, ReadPolicy::Second);
        assert_eq!(l.timeout, 2.5);
        assert_eq!(l.rebuild_rate, 100 << 20);
        assert_eq!(l.on_io_error, OnIoError::Fail);
        assert_eq!(c.node("beta").unwrap().legs, Legs::default());
        let d = parse(&with("on_io_error = \"diskless\"")).unwrap();
        assert_eq!(
            d.node("alpha").unwrap().legs.on_io_error,
            OnIoError::Diskless
        );
        assert_eq!(
            c.legs_state(c.node("alpha").unwrap()),
            Path::new("/tmp/a.md.legs")
        );
        for (lines, field, says) in [
            (
                "mirror = \"/tmp/a.img\"",
                "node[0].mirror",
                "already the backing",
            ),
            (
                "mirror = \"/tmp/a.md\"",
                "node[0].mirror",
                "already the backing",
            ),
            ("mirror = \"\"", "node[0].mirror", "empty"),
            (
                "read_policy = \"fastest\"",
                "node[0].read_policy",
                "balanced",
            ),
            (
                "read_policy = \"second\"",
                "node[0].read_policy",
                "second leg",
            ),
            (
                "mirror = \"/m\"\nleg_timeout = 0.0",
                "node[0].leg_timeout",
                "out of range",
            ),
            (
                "mirror = \"/m\"\nleg_timeout = -1.0",
                "node[0].leg_timeout",
                "out of range",
            ),
            (
                "on_io_error = \"ignore\"",
                "node[0].on_io_error",
                "not a policy",
            ),
            ("rebuild_rate = \"fast\"", "rebuild_rate", "not a size"),
        ] {
            let e = err(&with(lines));
            assert!(e.contains(field) && e.contains(says), "{lines}: {e}");
        }
    }

    #[test]
    fn good_config() {
        let c = parse(GOOD).unwrap();
        assert_eq!(c.resource.size, 64 << 20);
        assert_eq!(c.resource.mode, Mode::Async);
        assert_eq!(c.resource.queue_limit, DEFAULT_QUEUE_LIMIT);
        assert_eq!(c.peer_of("alpha").unwrap().name, "beta");
        assert_eq!(
            c.nbd_listen("beta"),
            NbdListen::Tcp("127.0.0.1:10809".into())
        );
        assert_eq!(
            c.nbd_listen("alpha"),
            NbdListen::Unix("/run/blkrep/r0-alpha.nbd".into())
        );
        assert_eq!(c.nbd_uri("beta"), "nbd://127.0.0.1:10809/r0");
        assert_eq!(c.resource.frontend, Frontend::Auto);
        assert_eq!(
            c.ublk_shape("alpha"),
            UblkShape {
                queues: DEFAULT_UBLK_QUEUES,
                depth: DEFAULT_UBLK_DEPTH
            }
        );
        assert_eq!(
            c.ublk_record("alpha"),
            Path::new("/run/blkrep/r0-alpha.ublk")
        );
        assert!(c
            .node("gamma")
            .unwrap_err()
            .to_string()
            .contains("alpha, beta"));
    }

    #[test]
    fn frontends() {
        // auto keeps NBD where the kernel has no ublk (as on hosts without ublk_drv).
        assert_eq!(Frontend::Auto.resolve(false), Frontend::Nbd);
        assert_eq!(Frontend::Auto.resolve(true), Frontend::Ublk);
        assert_eq!(Frontend::Nbd.resolve(true), Frontend::Nbd);
        assert_eq!(Frontend::Ublk.resolve(false), Frontend::Ublk);
        let with =
            |extra: &str| GOOD.replace("mode = \"async\"", &format!("mode = \"async\"\n{extra}"));
        let c = parse(&with(
            "frontend = \"ublk\"\nublk_queues = 2\nublk_depth = 128",
        ))
        .unwrap();
        assert_eq!(c.resource.frontend, Frontend::Ublk);
        assert_eq!(
            c.ublk_shape("alpha"),
            UblkShape {
                queues: 2,
                depth: 128
            }
        );
        assert_eq!(
            parse(&with("frontend = \"nbd\""))
                .unwrap()
                .resource
                .frontend,
            Frontend::Nbd
        );
        // A node overrides the resource's shape, field by field.
        let t = with("ublk_depth = 32").replace(
            "nbd = \"tcp:127.0.0.1:10809\"",
            "nbd = \"tcp:127.0.0.1:10809\"\nublk_queues = 4",
        );
        let c = parse(&t).unwrap();
        assert_eq!(
            c.ublk_shape("alpha"),
            UblkShape {
                queues: 1,
                depth: 32
            }
        );
        assert_eq!(
            c.ublk_shape("beta"),
            UblkShape {
                queues: 4,
                depth: 32
            }
        );
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("64K"), Ok(65536));
        assert_eq!(parse_size("10G"), Ok(10 << 30));
        assert_eq!(parse_size("1.5M"), Ok(3 << 19));
        assert_eq!(parse_size("2MiB"), Ok(2 << 20));
        assert!(parse_size("ten").is_err());
        assert!(parse_size("99999999999T").is_err());
        assert!(parse_size("-1M").is_err());
    }

    #[test]
    fn errors_name_the_field() {
        let cases = [
            (
                GOOD.replace("mode = \"async\"", "mode = \"fast\""),
                "resource.mode",
            ),
            (
                GOOD.replace("size = \"64M\"", "size = 1000"),
                "resource.size",
            ),
            (GOOD.replace("size = \"64M\"", "size = \"lots\""), "size"),
            (GOOD.replace("size = \"64M\"", "size = 0"), "resource.size"),
            (
                GOOD.replace("name = \"r0\"", "name = \"r 0\""),
                "resource.name",
            ),
            (
                GOOD.replace("127.0.0.1:7002", "127.0.0.1"),
                "node[1].address",
            ),
            (
                GOOD.replace("127.0.0.1:7002", "127.0.0.1:7001"),
                "node[1].address",
            ),
            (
                GOOD.replace("name = \"beta\"", "name = \"alpha\""),
                "node[1].name",
            ),
            (
                GOOD.replace("tcp:127.0.0.1:10809", "tcp:10.1.1.1:10809"),
                "node[1].nbd",
            ),
            (GOOD.replace("/tmp/b.md", "/tmp/b.img"), "node[1].metadata"),
            (GOOD.replace("backing = \"/tmp/b.img\"\n", ""), "backing"),
            (
                GOOD.replace("mode = \"async\"", "mode = \"async\"\ncolour = 1"),
                "colour",
            ),
            (GOOD.replace("[resource]", "[resource"), "TOML parse error"),
            (
                GOOD.replace("mode = \"async\"", "mode = \"async\"\nfrontend = \"iscsi\""),
                "resource.frontend",
            ),
            (
                GOOD.replace("mode = \"async\"", "mode = \"async\"\nublk_depth = 0"),
                "resource.ublk_depth",
            ),
            (
                GOOD.replace("mode = \"async\"", "mode = \"async\"\nublk_depth = 5000"),
                "resource.ublk_depth",
            ),
            (
                GOOD.replace("mode = \"async\"", "mode = \"async\"\nublk_queues = 0"),
                "resource.ublk_queues",
            ),
            (
                GOOD.replace("mode = \"async\"", "mode = \"async\"\nublk_queues = -1"),
                "resource.ublk_queues",
            ),
            (
                GOOD.replace(
                    "mode = \"async\"",
                    "mode = \"async\"\nublk_queues = 8\nublk_depth = 1024",
                ),
                "resource.ublk_depth",
            ),
            (
                GOOD.replace("nbd = \"tcp:", "ublk_depth = 4097\nnbd = \"tcp:"),
                "node[1].ublk_depth",
            ),
            (
                GOOD.replace(
                    "mode = \"async\"",
                    "mode = \"async\"\nublk_depth = \"deep\"",
                ),
                "ublk_depth",
            ),
        ];
        for (text, field) in cases {
            let e = err(&text);
            assert!(e.contains(field), "error {e:?} does not name {field:?}");
        }
        let one_node: String = GOOD
            .split("[[node]]")
            .take(2)
            .collect::<Vec<_>>()
            .join("[[node]]");
        assert!(err(&one_node).contains("exactly two"));
        assert!(err("").contains("resource"));
    }
}
