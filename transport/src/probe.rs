//! `blkrep check`'s look at the peer: dial its replication port, authenticate exactly as
//! the link does (TLS with the pinned certificates, then the link handshake's identity
//! check), get its configuration and clock, and measure the round trip and the bandwidth
//! with echoes. The peer answers from its handshake thread; its replication link, if up,
//! is not touched.

use crate::handshake::{client_probe, probe_echo, wall_ns, LinkIdentity};
use crate::tls::{TlsSetup, TlsStream};
use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

/// What a probe found.
#[derive(Clone, Debug)]
pub struct ProbeReport {
    /// The peer's configuration file text.
    pub config: String,
    /// The peer's state as JSON (see [`crate::handshake::ProbeAnswer::state`]).
    pub state: String,
    /// Round trips of a small echo (sorted, fastest first).
    pub rtts: Vec<Duration>,
    /// Bytes per second moved to the peer by a burst of echoes (None when not measured).
    pub bandwidth: Option<f64>,
    /// The peer's clock minus ours, in nanoseconds (estimated at the middle of the first
    /// round trip).
    pub clock_offset_ns: i64,
    /// `TLS 1.3, peer certificate pinned` or `PLAINTEXT`.
    pub security: &'static str,
}

/// Why a probe failed, by stage (the check names the stage in its verdict).
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// No TCP connection (nothing listens, a firewall, a wrong address).
    #[error("{0}")]
    Unreachable(String),
    /// TLS or the link handshake failed: wrong key, unpinned certificate, wrong identity,
    /// plaintext against TLS, a refusal with its reason.
    #[error("{0}")]
    Auth(String),
    /// Authenticated, but the exchange after it failed.
    #[error("{0}")]
    Exchange(String),
}

/// Probe the peer at `addr`; with `bandwidth_bytes` > 0, also send that many bytes.
pub fn probe(
    addr: &str,
    id: &LinkIdentity,
    tls: Option<&TlsSetup>,
    timeout: Duration,
    bandwidth_bytes: usize,
) -> Result<ProbeReport, ProbeError> {
    let sa = addr
        .to_socket_addrs()
        .map_err(|e| ProbeError::Unreachable(format!("cannot resolve {addr}: {e}")))?
        .next()
        .ok_or_else(|| ProbeError::Unreachable(format!("{addr} resolves to nothing")))?;
    let mut sock = TcpStream::connect_timeout(&sa, timeout)
        .map_err(|e| ProbeError::Unreachable(format!("cannot connect to {addr}: {e}")))?;
    let _ = sock.set_nodelay(true);
    let _ = sock.set_read_timeout(Some(timeout));
    let _ = sock.set_write_timeout(Some(timeout));
    match tls {
        None => run(&mut sock, id, bandwidth_bytes, "PLAINTEXT"),
        Some(t) => {
            let mut conn = t
                .connect(&mut sock)
                .map_err(|e| ProbeError::Auth(format!("TLS: {e}")))?;
            let mut s = TlsStream {
                conn: &mut conn,
                sock: &mut sock,
            };
            run(
                &mut s,
                id,
                bandwidth_bytes,
                "TLS 1.3, peer certificate pinned",
            )
        }
    }
}

fn run<S: Read + Write + ?Sized>(
    s: &mut S,
    id: &LinkIdentity,
    bandwidth_bytes: usize,
    security: &'static str,
) -> Result<ProbeReport, ProbeError> {
    let t0 = Instant::now();
    let sent_ns = wall_ns();
    let answer = client_probe(s, id).map_err(|e| ProbeError::Auth(e.to_string()))?;
    let first_rtt = t0.elapsed();
    let clock_offset_ns =
        answer.wall_ns as i64 - (sent_ns as i64 + first_rtt.as_nanos() as i64 / 2);
    let ex = |e: crate::handshake::HandshakeError| ProbeError::Exchange(e.to_string());
    let mut rtts = Vec::new();
    for _ in 0..5 {
        rtts.push(probe_echo(s, 1, 8).map_err(ex)?);
    }
    rtts.sort();
    let bandwidth = if bandwidth_bytes > 0 {
        const CHUNK: usize = 64 << 10;
        let n = bandwidth_bytes.div_ceil(CHUNK).max(1);
        let t = probe_echo(s, n, CHUNK).map_err(ex)?;
        let net = t.saturating_sub(rtts[0]).max(Duration::from_micros(1));
        Some((n * CHUNK) as f64 / net.as_secs_f64())
    } else {
        None
    };
    Ok(ProbeReport {
        config: answer.config,
        state: answer.state,
        rtts,
        bandwidth,
        clock_offset_ns,
        security,
    })
}
