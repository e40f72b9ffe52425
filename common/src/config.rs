//! The resource configuration: one TOML file describes one replicated volume and its two
//! nodes. Both nodes use the same file (`blkrep check` will compare them by hash).
//!
//! ```toml
//! [resource]
//! name = "r0"
//! size = "10G"            # bytes, or a string with K/M/G/T (binary) suffix
//! mode = "sync"           # or "async"
//! queue_limit = "64M"     # async ship queue bound (in memory for now)
//! run_dir = "/run/blkrep" # control sockets, NBD sockets, logs
//!
//! [[node]]
//! name = "alpha"
//! address = "10.0.0.1:7789"        # replication listen/dial address
//! backing = "/dev/vg0/r0"          # file or block device
//! metadata = "/var/lib/blkrep/r0.md"
//! nbd = "unix:/run/blkrep/r0.nbd"  # optional: "unix:PATH" or "tcp:127.0.0.1:10809"
//!
//! [[node]]
//! name = "beta"
//! ...
//! ```
//!
//! Every problem is reported with the field it concerns (`node[1].backing: ...`).

use blkrep_engine::Mode;
use serde::Deserialize;
use std::path::{Path, PathBuf};

/// Default directory for sockets and logs.
pub const DEFAULT_RUN_DIR: &str = "/run/blkrep";
/// Default directory holding `RESOURCE.toml` files.
pub const DEFAULT_CONFIG_DIR: &str = "/etc/blkrep";
/// Volume sizes and request offsets are multiples of this (O_DIRECT on 4K-sector disks).
pub const SIZE_ALIGN: u64 = 4096;
const DEFAULT_QUEUE_LIMIT: u64 = 64 << 20;
const MIN_QUEUE_LIMIT: u64 = 1 << 20;
const MAX_NAME: usize = 64;

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

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    resource: RawResource,
    #[serde(default)]
    node: Vec<RawNode>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawResource {
    name: String,
    size: Size,
    mode: String,
    queue_limit: Option<Size>,
    run_dir: Option<PathBuf>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNode {
    name: String,
    address: String,
    backing: PathBuf,
    metadata: PathBuf,
    nbd: Option<String>,
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
    /// Directory for control sockets, NBD sockets and logs.
    pub run_dir: PathBuf,
}

/// One node, validated.
#[derive(Clone, Debug)]
pub struct NodeConfig {
    /// Node name (unique in the resource).
    pub name: String,
    /// Replication address `host:port`: this node listens on it, its peer dials it.
    pub address: String,
    /// Backing file or block device.
    pub backing: PathBuf,
    /// Metadata file or device.
    pub metadata: PathBuf,
    /// NBD frontend, if configured explicitly.
    pub nbd: Option<NbdListen>,
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
        let run_dir = r.run_dir.unwrap_or_else(|| DEFAULT_RUN_DIR.into());
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
            nodes.push(NodeConfig {
                name: n.name,
                address: n.address,
                backing: n.backing,
                metadata: n.metadata,
                nbd,
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
                run_dir,
            },
            nodes,
            hash: blake3::hash(text.as_bytes()).to_hex().to_string(),
        })
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

[[node]]
name = "beta"
address = "127.0.0.1:7002"
backing = "/tmp/b.img"
metadata = "/tmp/b.md"
nbd = "tcp:127.0.0.1:10809"
"#;

    fn parse(t: &str) -> Result<Config, ConfigError> {
        Config::parse(t, Path::new("r0.toml"))
    }

    fn err(t: &str) -> String {
        parse(t).unwrap_err().to_string()
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
        assert!(c
            .node("gamma")
            .unwrap_err()
            .to_string()
            .contains("alpha, beta"));
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
