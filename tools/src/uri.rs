//! NBD URIs (NetworkBlockDevice/nbd `doc/uri.md`), the forms the tools accept:
//! `nbd+unix:///EXPORT?socket=PATH` and `nbd://HOST[:PORT]/EXPORT` (port 10809 by default,
//! IPv6 hosts in brackets). Percent-encoding is decoded in the export and the socket path.
//! TLS schemes, user info, abstract sockets and unknown query parameters are refused with
//! an error rather than ignored, as the URI document asks of parsers.

use std::fmt;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::PathBuf;
use std::str::FromStr;

use crate::nbd_client::{NbdClient, NbdClientError};

/// The IANA port of NBD.
pub const NBD_DEFAULT_PORT: u16 = 10809;

/// A parsed NBD URI.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NbdUri {
    /// `nbd+unix:///EXPORT?socket=PATH`
    Unix {
        /// The Unix socket path.
        socket: PathBuf,
        /// The export name (may be empty: the default export).
        export: String,
    },
    /// `nbd://HOST[:PORT]/EXPORT`
    Tcp {
        /// Host name or IP address (IPv6 without brackets).
        host: String,
        /// TCP port.
        port: u16,
        /// The export name (may be empty: the default export).
        export: String,
    },
}

/// Why a string is not an NBD URI this tool can use.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid NBD URI {uri:?}: {reason}")]
pub struct UriError {
    /// The URI as given.
    pub uri: String,
    /// What is wrong with it.
    pub reason: String,
}

fn percent_decode(s: &str) -> Result<Vec<u8>, String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = b
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok());
            match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                Some(v) => out.push(v),
                None => return Err(format!("bad percent-encoding at {:?}", &s[i..])),
            }
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    Ok(out)
}

fn percent_encode(bytes: &[u8], keep_slash: bool) -> String {
    let mut s = String::new();
    for &c in bytes {
        if c.is_ascii_alphanumeric() || b"-._~".contains(&c) || (keep_slash && c == b'/') {
            s.push(c as char);
        } else {
            s.push_str(&format!("%{c:02X}"));
        }
    }
    s
}

impl NbdUri {
    /// Parses an NBD URI.
    pub fn parse(uri: &str) -> Result<NbdUri, UriError> {
        Self::parse_inner(uri).map_err(|reason| UriError {
            uri: uri.to_string(),
            reason,
        })
    }

    fn parse_inner(uri: &str) -> Result<NbdUri, String> {
        let (scheme, rest) = uri.split_once("://").ok_or("missing \"scheme://\"")?;
        let scheme = scheme.to_ascii_lowercase();
        match scheme.as_str() {
            "nbd" | "nbd+unix" => {}
            "nbds" | "nbds+unix" => return Err("TLS (nbds) is not supported".into()),
            other => {
                return Err(format!(
                    "unknown scheme {other:?} (expected nbd or nbd+unix)"
                ))
            }
        }
        if rest.contains('#') {
            return Err("fragments (#) are not allowed".into());
        }
        let (before_query, query) = match rest.split_once('?') {
            Some((a, q)) => (a, Some(q)),
            None => (rest, None),
        };
        let (authority, path) = match before_query.find('/') {
            Some(i) => (&before_query[..i], &before_query[i + 1..]),
            None => (before_query, ""),
        };
        let export = String::from_utf8(percent_decode(path)?)
            .map_err(|_| "the export name is not UTF-8".to_string())?;
        if export.contains('\0') {
            return Err("the export name contains NUL".into());
        }
        let mut socket: Option<Vec<u8>> = None;
        for param in query
            .into_iter()
            .flat_map(|q| q.split('&'))
            .filter(|p| !p.is_empty())
        {
            let (key, value) = param.split_once('=').unwrap_or((param, ""));
            match key {
                "socket" if scheme == "nbd+unix" => {
                    if socket.replace(percent_decode(value)?).is_some() {
                        return Err("\"socket\" given twice".into());
                    }
                }
                k if k.starts_with("tls") => {
                    return Err(format!("TLS parameter {k:?} is not supported"))
                }
                k => return Err(format!("unknown query parameter {k:?}")),
            }
        }
        if scheme == "nbd+unix" {
            if !authority.is_empty() {
                return Err(
                    "nbd+unix URIs take no host (use nbd+unix:///EXPORT?socket=PATH)".into(),
                );
            }
            let socket = socket.ok_or("nbd+unix needs ?socket=PATH")?;
            if socket.is_empty() {
                return Err("empty socket path".into());
            }
            if socket[0] == 0 {
                return Err("abstract sockets are not supported".into());
            }
            return Ok(NbdUri::Unix {
                socket: PathBuf::from(std::ffi::OsString::from_vec(socket)),
                export,
            });
        }
        if authority.contains('@') {
            return Err("user info is not supported (it is only used for TLS)".into());
        }
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let (h, after) = v6.split_once(']').ok_or("unterminated [IPv6] host")?;
            match after {
                "" => (h, None),
                p => (h, Some(p.strip_prefix(':').ok_or("junk after ]")?)),
            }
        } else {
            match authority.split_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (authority, None),
            }
        };
        if host.is_empty() {
            return Err("nbd:// needs a host".into());
        }
        let port = match port {
            None => NBD_DEFAULT_PORT,
            Some(p) => p.parse::<u16>().map_err(|_| format!("bad port {p:?}"))?,
        };
        Ok(NbdUri::Tcp {
            host: host.to_string(),
            port,
            export,
        })
    }

    /// The export name.
    pub fn export(&self) -> &str {
        match self {
            NbdUri::Unix { export, .. } | NbdUri::Tcp { export, .. } => export,
        }
    }

    /// `HOST:PORT` for a TCP URI (IPv6 hosts in brackets), `None` for a Unix socket.
    pub fn tcp_addr(&self) -> Option<String> {
        match self {
            NbdUri::Tcp { host, port, .. } if host.contains(':') => {
                Some(format!("[{host}]:{port}"))
            }
            NbdUri::Tcp { host, port, .. } => Some(format!("{host}:{port}")),
            NbdUri::Unix { .. } => None,
        }
    }

    /// Connects an [`NbdClient`] to the export.
    pub fn connect(&self) -> Result<NbdClient, NbdClientError> {
        match self {
            NbdUri::Unix { socket, export } => NbdClient::connect_unix(socket, export),
            NbdUri::Tcp { export, .. } => {
                NbdClient::connect_tcp(&self.tcp_addr().unwrap_or_default(), export)
            }
        }
    }
}

impl FromStr for NbdUri {
    type Err = UriError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        NbdUri::parse(s)
    }
}

impl fmt::Display for NbdUri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NbdUri::Unix { socket, export } => write!(
                f,
                "nbd+unix:///{}?socket={}",
                percent_encode(export.as_bytes(), false),
                percent_encode(socket.as_os_str().as_bytes(), true)
            ),
            NbdUri::Tcp { export, .. } => write!(
                f,
                "nbd://{}/{}",
                self.tcp_addr().unwrap_or_default(),
                percent_encode(export.as_bytes(), false)
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unix(socket: &str, export: &str) -> NbdUri {
        NbdUri::Unix {
            socket: socket.into(),
            export: export.into(),
        }
    }
    fn tcp(host: &str, port: u16, export: &str) -> NbdUri {
        NbdUri::Tcp {
            host: host.into(),
            port,
            export: export.into(),
        }
    }

    #[test]
    fn unix_forms() {
        assert_eq!(
            NbdUri::parse("nbd+unix:///vol?socket=/run/b.sock").unwrap(),
            unix("/run/b.sock", "vol")
        );
        assert_eq!(
            NbdUri::parse("nbd+unix:///?socket=rel.sock").unwrap(),
            unix("rel.sock", "")
        );
        assert_eq!(
            NbdUri::parse("NBD+UNIX:///my%20vol?socket=/tmp/a%20b.sock").unwrap(),
            unix("/tmp/a b.sock", "my vol")
        );
        assert_eq!(
            NbdUri::parse("nbd+unix:////abs?socket=s").unwrap().export(),
            "/abs"
        );
    }

    #[test]
    fn tcp_forms() {
        assert_eq!(
            NbdUri::parse("nbd://example.com:10810/disk").unwrap(),
            tcp("example.com", 10810, "disk")
        );
        assert_eq!(
            NbdUri::parse("nbd://127.0.0.1/disk").unwrap(),
            tcp("127.0.0.1", 10809, "disk")
        );
        assert_eq!(NbdUri::parse("nbd://host").unwrap(), tcp("host", 10809, ""));
        assert_eq!(
            NbdUri::parse("nbd://host/").unwrap(),
            tcp("host", 10809, "")
        );
        assert_eq!(
            NbdUri::parse("nbd://host//disk").unwrap(),
            tcp("host", 10809, "/disk")
        );
        assert_eq!(
            NbdUri::parse("nbd://host/hello%20world").unwrap(),
            tcp("host", 10809, "hello world")
        );
        let v6 = NbdUri::parse("nbd://[::1]:2000/vol").unwrap();
        assert_eq!(v6, tcp("::1", 2000, "vol"));
        assert_eq!(v6.tcp_addr().unwrap(), "[::1]:2000");
        assert_eq!(
            NbdUri::parse("nbd://[fe80::1]/v").unwrap(),
            tcp("fe80::1", 10809, "v")
        );
    }

    #[test]
    fn round_trip_display() {
        for s in [
            "nbd+unix:///vol?socket=/run/b.sock",
            "nbd://h:1/a%20b",
            "nbd://[::1]:5/x",
        ] {
            let u = NbdUri::parse(s).unwrap();
            assert_eq!(u.to_string(), s);
            assert_eq!(NbdUri::parse(&u.to_string()).unwrap(), u);
        }
    }

    #[test]
    fn rejects() {
        let bad = [
            ("vol", "scheme"),
            ("http://h/vol", "unknown scheme"),
            ("nbds://h/vol", "TLS"),
            ("nbds+unix:///v?socket=s", "TLS"),
            ("nbd+unix:///vol", "socket=PATH"),
            ("nbd+unix://host/vol?socket=s", "no host"),
            ("nbd+unix:///v?socket=a&socket=b", "twice"),
            ("nbd+unix:///v?socket=s&x=1", "unknown query parameter"),
            ("nbd+unix:///v?socket=%00abs", "abstract"),
            ("nbd+unix:///v?socket=", "empty socket"),
            ("nbd://h/v?socket=s", "unknown query parameter"),
            ("nbd://h/v?tls-type=x509", "TLS parameter"),
            ("nbd:///vol", "needs a host"),
            ("nbd://h:99999/v", "bad port"),
            ("nbd://h:/v", "bad port"),
            ("nbd://user@h/v", "user info"),
            ("nbd://[::1/v", "unterminated"),
            ("nbd://h/%zz", "percent"),
            ("nbd://h/%ff", "UTF-8"),
            ("nbd://h/a%00b", "NUL"),
            ("nbd://h/v#frag", "fragment"),
        ];
        for (uri, want) in bad {
            let e = NbdUri::parse(uri).expect_err(uri);
            assert!(e.to_string().contains(want), "{uri}: {e}");
        }
    }
}
