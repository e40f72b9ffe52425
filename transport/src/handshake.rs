//! The link handshake: the first exchange on every replication connection, run on a
//! blocking socket before the connection is handed to the event loop.
//!
//! ```text
//!  dialer → listener   HELLO  {resource, from node, to node}
//!  listener → dialer   ACCEPT {resource, node}  or  REFUSE {reason}
//! ```
//! or, from `blkrep check` (a probe: the connection never reaches the event loop and the
//! link that may be up meanwhile is not touched):
//! ```text
//!  dialer → listener   PROBE  {resource, from node, to node}
//!  listener → dialer   PROBE_ANSWER {resource, node, config text, wall clock ns}  or  REFUSE
//!  dialer → listener   ECHO {bytes}      (any number: RTT with small ones, bandwidth with
//!  listener → dialer   ECHO {first 8}     a burst of large ones)
//!  dialer closes
//! ```
//! Every message is one frame:
//! ```text
//!  0  magic     8  "BLKRPLNK"
//!  8  version   2  LINK_VERSION
//! 10  kind      1  1 hello, 2 accept, 3 refuse, 4 probe, 5 probe answer, 6 echo
//! 11  reserved  1  0
//! 12  body_len  4  <= MAX_BODY
//! 16  body         strings (u16 length + UTF-8)
//!  .  checksum 16  first 16 bytes of blake3(header || body)
//! ```
//! A listener answers a peer of another version with a REFUSE in its own version that
//! names both versions, so the operator on either side reads the same reason. Bytes that
//! do not start with the magic are refused without an answer (a stranger, a port scan).

use crate::wire::{Reader, WireError, Writer};
use std::io::{Read, Write};

/// Handshake magic.
pub const LINK_MAGIC: [u8; 8] = *b"BLKRPLNK";
/// Version of the link protocol (handshake and frames move together).
pub const LINK_VERSION: u16 = crate::codec::WIRE_VERSION;
const HEADER: usize = 16;
const SUM: usize = 16;
const MAX_BODY: usize = 4096;
/// Bodies of probe answers (a configuration file) and echoes.
const MAX_PROBE_BODY: usize = 64 << 10;
/// A probe session ends after this many echoes (a probe uses a few hundred).
const MAX_ECHOES: usize = 4096;
const KIND_HELLO: u8 = 1;
const KIND_ACCEPT: u8 = 2;
const KIND_REFUSE: u8 = 3;
const KIND_PROBE: u8 = 4;
const KIND_PROBE_ANSWER: u8 = 5;
const KIND_ECHO: u8 = 6;

/// What a listener accepted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Accepted {
    /// A replication link: hand the connection to the event loop.
    Link,
    /// A probe from `blkrep check`, answered and finished: drop the connection.
    Probe,
}

/// The peer's answer to a probe.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProbeAnswer {
    /// The peer's node name.
    pub node: String,
    /// The text of the peer's configuration file.
    pub config: String,
    /// The peer's replication state as JSON (role, disk state, generation, history), as
    /// its event loop last published it; empty when it has not yet.
    pub state: String,
    /// The peer's wall clock when it answered, nanoseconds since the Unix epoch.
    pub wall_ns: u64,
}

/// Who this end is, and whom it expects at the other end.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LinkIdentity {
    /// The resource both ends serve.
    pub resource: String,
    /// This node's name.
    pub local_node: String,
    /// The peer's name, from the configuration.
    pub peer_node: String,
}

/// Why a handshake failed.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    /// Socket error or timeout.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// The other end does not speak the blkrep link protocol.
    #[error("not a blkrep peer (first bytes {0:02x?})")]
    Stranger(Vec<u8>),
    /// The other end speaks another version of the link protocol.
    #[error("peer speaks link protocol version {peer}, this node speaks {ours}")]
    Version { peer: u16, ours: u16 },
    /// The other end refused us, and why.
    #[error("peer refused the connection: {0}")]
    Refused(String),
    /// The other end is not the configured peer or serves another resource.
    #[error("{0}")]
    Identity(String),
    /// A frame was corrupt or malformed.
    #[error("malformed handshake: {0}")]
    Malformed(String),
}

fn frame(kind: u8, body: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(HEADER + body.len() + SUM);
    f.extend_from_slice(&LINK_MAGIC);
    f.extend_from_slice(&LINK_VERSION.to_le_bytes());
    f.push(kind);
    f.push(0);
    f.extend_from_slice(&(body.len() as u32).to_le_bytes());
    f.extend_from_slice(body);
    let sum = blake3::hash(&f);
    f.extend_from_slice(&sum.as_bytes()[..SUM]);
    f
}

fn strings(parts: &[&str]) -> Vec<u8> {
    let mut b = Vec::new();
    let mut w = Writer(&mut b);
    for p in parts {
        w.str(p);
    }
    b
}

/// Read one handshake frame: (kind, body). On a version mismatch the header is still
/// returned as an error so the listener can answer it.
fn read_frame<S: Read + ?Sized>(s: &mut S) -> Result<(u8, Vec<u8>), HandshakeError> {
    read_frame_max(s, MAX_BODY)
}

fn read_frame_max<S: Read + ?Sized>(
    s: &mut S,
    max_body: usize,
) -> Result<(u8, Vec<u8>), HandshakeError> {
    let mut h = [0u8; HEADER];
    // Read the magic first: a stranger that sends a few bytes and waits is refused at once.
    s.read_exact(&mut h[..LINK_MAGIC.len()])?;
    if h[..LINK_MAGIC.len()] != LINK_MAGIC {
        return Err(HandshakeError::Stranger(h[..LINK_MAGIC.len()].to_vec()));
    }
    s.read_exact(&mut h[LINK_MAGIC.len()..])?;
    let version = u16::from_le_bytes([h[8], h[9]]);
    if version != LINK_VERSION {
        return Err(HandshakeError::Version {
            peer: version,
            ours: LINK_VERSION,
        });
    }
    let kind = h[10];
    let len = u32::from_le_bytes(h[12..16].try_into().expect("4 bytes")) as usize;
    if len > max_body {
        return Err(HandshakeError::Malformed(format!(
            "body of {len} bytes (at most {max_body})"
        )));
    }
    let mut rest = vec![0u8; len + SUM];
    s.read_exact(&mut rest)?;
    let mut whole = h.to_vec();
    whole.extend_from_slice(&rest[..len]);
    if blake3::hash(&whole).as_bytes()[..SUM] != rest[len..] {
        return Err(HandshakeError::Malformed("checksum mismatch".into()));
    }
    rest.truncate(len);
    Ok((kind, rest))
}

fn malformed(e: WireError) -> HandshakeError {
    HandshakeError::Malformed(e.to_string())
}

fn refuse<S: Write + ?Sized>(s: &mut S, reason: &str) {
    // Best effort: the connection is dropped right after.
    let _ = s.write_all(&frame(KIND_REFUSE, &strings(&[reason])));
    let _ = s.flush();
}

/// Dialer side: introduce ourselves and wait for the listener's verdict.
pub fn client_handshake<S: Read + Write + ?Sized>(
    s: &mut S,
    id: &LinkIdentity,
) -> Result<(), HandshakeError> {
    s.write_all(&frame(
        KIND_HELLO,
        &strings(&[&id.resource, &id.local_node, &id.peer_node]),
    ))?;
    s.flush()?;
    let (kind, body) = read_frame(s)?;
    let mut r = Reader::new(&body);
    match kind {
        KIND_ACCEPT => {
            let resource = r.str().map_err(malformed)?;
            let node = r.str().map_err(malformed)?;
            r.finish().map_err(malformed)?;
            if resource != id.resource || node != id.peer_node {
                return Err(HandshakeError::Identity(format!(
                    "the listener is node {node:?} of resource {resource:?}, expected node {:?} of {:?}",
                    id.peer_node, id.resource
                )));
            }
            Ok(())
        }
        KIND_REFUSE => Err(HandshakeError::Refused(r.str().map_err(malformed)?)),
        k => Err(HandshakeError::Malformed(format!(
            "unexpected message kind {k}"
        ))),
    }
}

/// Listener side: check the dialer's introduction and accept or refuse it. Every refusal
/// is an error that names the reason (the caller logs it). Probes are refused.
pub fn server_handshake<S: Read + Write + ?Sized>(
    s: &mut S,
    id: &LinkIdentity,
) -> Result<(), HandshakeError> {
    server_accept(s, id, None).map(|_| ())
}

/// Listener side, answering probes too when `config` (this node's configuration text and
/// its state as JSON) is given: a probe is answered and its echoes served until the dialer closes.
pub fn server_accept<S: Read + Write + ?Sized>(
    s: &mut S,
    id: &LinkIdentity,
    config: Option<(&str, &str)>,
) -> Result<Accepted, HandshakeError> {
    let (kind, body) = match read_frame(s) {
        Ok(x) => x,
        Err(e @ HandshakeError::Version { .. }) => {
            refuse(s, &e.to_string());
            return Err(e);
        }
        Err(e) => return Err(e),
    };
    let probe = kind == KIND_PROBE && config.is_some();
    if kind != KIND_HELLO && !probe {
        refuse(s, "expected a hello");
        return Err(HandshakeError::Malformed(format!(
            "unexpected message kind {kind}"
        )));
    }
    let mut r = Reader::new(&body);
    let (resource, from, to) = (|| Ok((r.str()?, r.str()?, r.str()?)))().map_err(malformed)?;
    r.finish().map_err(malformed)?;
    let problem = if resource != id.resource {
        Some(format!(
            "resource {resource:?} is not served here (this node serves {:?})",
            id.resource
        ))
    } else if from != id.peer_node {
        Some(format!(
            "node {from:?} is not this node's configured peer ({:?})",
            id.peer_node
        ))
    } else if to != id.local_node {
        Some(format!(
            "the dialer expected node {to:?}, this is {:?}",
            id.local_node
        ))
    } else {
        None
    };
    if let Some(p) = problem {
        refuse(s, &p);
        return Err(HandshakeError::Identity(p));
    }
    if probe {
        let (text, state) = config.unwrap_or_default();
        serve_probe(s, id, text, state)?;
        return Ok(Accepted::Probe);
    }
    s.write_all(&frame(
        KIND_ACCEPT,
        &strings(&[&id.resource, &id.local_node]),
    ))?;
    s.flush()?;
    Ok(Accepted::Link)
}

/// Wall clock, nanoseconds since the Unix epoch.
pub fn wall_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

fn serve_probe<S: Read + Write + ?Sized>(
    s: &mut S,
    id: &LinkIdentity,
    config: &str,
    state: &str,
) -> Result<(), HandshakeError> {
    let mut body = strings(&[&id.resource, &id.local_node, config, state]);
    if body.len() > MAX_PROBE_BODY - 8 {
        refuse(
            s,
            "this node's configuration is too large to send in a probe",
        );
        return Err(HandshakeError::Malformed("configuration too large".into()));
    }
    body.extend_from_slice(&wall_ns().to_le_bytes());
    s.write_all(&frame(KIND_PROBE_ANSWER, &body))?;
    s.flush()?;
    for _ in 0..MAX_ECHOES {
        let (kind, body) = match read_frame_max(s, MAX_PROBE_BODY) {
            Ok(x) => x,
            // The dialer closed: the probe is over.
            Err(HandshakeError::Io(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                return Ok(())
            }
            Err(e) => return Err(e),
        };
        if kind != KIND_ECHO {
            return Err(HandshakeError::Malformed(format!(
                "unexpected message kind {kind} in a probe"
            )));
        }
        s.write_all(&frame(KIND_ECHO, &body[..body.len().min(8)]))?;
        s.flush()?;
    }
    Ok(())
}

/// Dialer side of a probe: introduce ourselves as for a link, get the peer's answer. The
/// connection then serves [`probe_echo`]es until it is dropped.
pub fn client_probe<S: Read + Write + ?Sized>(
    s: &mut S,
    id: &LinkIdentity,
) -> Result<ProbeAnswer, HandshakeError> {
    s.write_all(&frame(
        KIND_PROBE,
        &strings(&[&id.resource, &id.local_node, &id.peer_node]),
    ))?;
    s.flush()?;
    let (kind, body) = read_frame_max(s, MAX_PROBE_BODY)?;
    match kind {
        KIND_PROBE_ANSWER => {
            if body.len() < 8 {
                return Err(HandshakeError::Malformed("short probe answer".into()));
            }
            let (text, clock) = body.split_at(body.len() - 8);
            let mut r = Reader::new(text);
            let resource = r.str().map_err(malformed)?;
            let node = r.str().map_err(malformed)?;
            let config = r.str().map_err(malformed)?;
            let state = r.str().map_err(malformed)?;
            r.finish().map_err(malformed)?;
            if resource != id.resource || node != id.peer_node {
                return Err(HandshakeError::Identity(format!(
                    "the listener is node {node:?} of resource {resource:?}, expected node {:?} of {:?}",
                    id.peer_node, id.resource
                )));
            }
            Ok(ProbeAnswer {
                node,
                config,
                state,
                wall_ns: u64::from_le_bytes(clock.try_into().expect("8 bytes")),
            })
        }
        KIND_REFUSE => Err(HandshakeError::Refused(
            Reader::new(&body).str().map_err(malformed)?,
        )),
        k => Err(HandshakeError::Malformed(format!(
            "unexpected message kind {k}"
        ))),
    }
}

/// Send `count` echoes of `size` bytes back to back (at most 64 KiB each), then wait for
/// every answer; returns the time from the first send to the last answer.
pub fn probe_echo<S: Read + Write + ?Sized>(
    s: &mut S,
    count: usize,
    size: usize,
) -> Result<std::time::Duration, HandshakeError> {
    let body = vec![0x5au8; size.clamp(8, MAX_PROBE_BODY)];
    let t0 = std::time::Instant::now();
    for _ in 0..count {
        s.write_all(&frame(KIND_ECHO, &body))?;
    }
    s.flush()?;
    for _ in 0..count {
        let (kind, _) = read_frame_max(s, MAX_PROBE_BODY)?;
        if kind != KIND_ECHO {
            return Err(HandshakeError::Malformed(format!(
                "unexpected message kind {kind} in a probe"
            )));
        }
    }
    Ok(t0.elapsed())
}

/// A hello of an arbitrary version (for tests of version refusal).
pub fn hello_frame_with_version(id: &LinkIdentity, version: u16) -> Vec<u8> {
    let mut f = frame(
        KIND_HELLO,
        &strings(&[&id.resource, &id.local_node, &id.peer_node]),
    );
    f[8..10].copy_from_slice(&version.to_le_bytes());
    let n = f.len() - SUM;
    let sum = blake3::hash(&f[..n]);
    f[n..].copy_from_slice(&sum.as_bytes()[..SUM]);
    f
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;

    fn ids() -> (LinkIdentity, LinkIdentity) {
        let a = LinkIdentity {
            resource: "r0".into(),
            local_node: "alpha".into(),
            peer_node: "beta".into(),
        };
        let b = LinkIdentity {
            resource: "r0".into(),
            local_node: "beta".into(),
            peer_node: "alpha".into(),
        };
        (a, b)
    }

    #[test]
    fn a_probe_is_answered_with_the_config_and_echoes() {
        let (a, b) = ids();
        let (mut c, mut s) = UnixStream::pair().unwrap();
        let t = std::thread::spawn(move || {
            server_accept(&mut s, &b, Some(("[resource]\nname = \"r0\"\n", "{}")))
        });
        let ans = client_probe(&mut c, &a).unwrap();
        assert_eq!(ans.node, "beta");
        assert!(ans.config.contains("name = \"r0\""));
        assert!(ans.wall_ns > 0);
        assert_eq!(ans.state, "{}");
        probe_echo(&mut c, 3, 8).unwrap();
        probe_echo(&mut c, 4, 64 << 10).unwrap();
        drop(c);
        assert_eq!(t.join().unwrap().unwrap(), Accepted::Probe);
        // A listener that does not answer probes refuses them.
        let (a, b) = ids();
        let (mut c, mut s) = UnixStream::pair().unwrap();
        let t = std::thread::spawn(move || server_handshake(&mut s, &b));
        assert!(matches!(
            client_probe(&mut c, &a),
            Err(HandshakeError::Refused(_))
        ));
        assert!(t.join().unwrap().is_err());
        // A probe from the wrong node is refused with the reason.
        let (mut a, b) = ids();
        a.local_node = "gamma".into();
        let (mut c, mut s) = UnixStream::pair().unwrap();
        let t = std::thread::spawn(move || server_accept(&mut s, &b, Some(("x", ""))));
        match client_probe(&mut c, &a) {
            Err(HandshakeError::Refused(r)) => assert!(r.contains("gamma"), "{r}"),
            other => panic!("{other:?}"),
        }
        assert!(t.join().unwrap().is_err());
    }

    fn run(
        client: LinkIdentity,
        server: LinkIdentity,
    ) -> (Result<(), HandshakeError>, Result<(), HandshakeError>) {
        let (mut c, mut s) = UnixStream::pair().unwrap();
        let t = std::thread::spawn(move || server_handshake(&mut s, &server));
        let rc = client_handshake(&mut c, &client);
        (rc, t.join().unwrap())
    }

    #[test]
    fn peers_accept_each_other() {
        let (a, b) = ids();
        let (c, s) = run(a, b);
        c.unwrap();
        s.unwrap();
    }

    #[test]
    fn wrong_identity_refused_on_both_sides() {
        let (mut a, b) = ids();
        a.local_node = "mallory".into();
        let (c, s) = run(a, b.clone());
        assert!(matches!(c, Err(HandshakeError::Refused(ref r)) if r.contains("mallory")));
        assert!(matches!(s, Err(HandshakeError::Identity(_))));
        let (mut a, _) = ids();
        a.resource = "r9".into();
        let (c, s) = run(a, b);
        assert!(matches!(c, Err(HandshakeError::Refused(ref r)) if r.contains("r9")));
        assert!(s.is_err());
    }

    #[test]
    fn stranger_and_other_version() {
        let (a, b) = ids();
        let (mut c, mut s) = UnixStream::pair().unwrap();
        c.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
        let e = server_handshake(&mut s, &b).unwrap_err();
        assert!(matches!(e, HandshakeError::Stranger(_)), "{e}");

        let (mut c, mut s) = UnixStream::pair().unwrap();
        c.write_all(&hello_frame_with_version(&a, 99)).unwrap();
        let e = server_handshake(&mut s, &b).unwrap_err();
        assert!(matches!(e, HandshakeError::Version { peer: 99, .. }), "{e}");
        // The old/new peer is told why.
        let (kind, body) = read_frame(&mut c).unwrap();
        assert_eq!(kind, KIND_REFUSE);
        assert!(Reader::new(&body).str().unwrap().contains("99"));

        let (mut c, mut s) = UnixStream::pair().unwrap();
        let mut f = frame(KIND_HELLO, &strings(&["r0", "beta", "alpha"]));
        let last = f.len() - 1;
        f[last] ^= 1;
        c.write_all(&f).unwrap();
        assert!(matches!(
            server_handshake(&mut s, &b).unwrap_err(),
            HandshakeError::Malformed(_)
        ));
    }
}
