//! Establishing the replication link: a listener that runs the link handshake on every
//! incoming connection (strangers and garbage are refused and logged, nothing reaches the
//! engine), and — on the node whose name sorts first, so that exactly one side dials — a
//! connector that keeps trying to reach the peer while no link is up.
//!
//! Both run on plain threads with blocking sockets and timeouts; an established, verified
//! connection is handed to the event loop, which owns it from then on.
//!
//! With TLS (the default), the TLS 1.3 handshake with the pinned peer certificate comes
//! first and the link handshake travels inside it; the TLS state goes to the event loop
//! with the socket.

use crate::wake::Waker;
use blkrep_transport::handshake::{
    client_handshake, server_accept, Accepted, HandshakeError, LinkIdentity,
};
use blkrep_transport::tls::{TlsSetup, TlsStream};
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How long a handshake may take before the connection is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// A verified connection to the peer.
pub struct LinkConn {
    pub stream: TcpStream,
    pub peer_addr: String,
    /// The TLS session (None on an insecure link).
    pub tls: Option<rustls::Connection>,
}

/// TLS first (when configured), then the link handshake inside it. A listener (`config`:
/// its configuration text) also answers probes from `blkrep check`.
fn establish(
    stream: &mut TcpStream,
    id: &LinkIdentity,
    tls: Option<&TlsSetup>,
    dialer: bool,
    config: Option<(&str, &str)>,
) -> Result<(Option<rustls::Connection>, Accepted), String> {
    prepare(stream).map_err(|e| e.to_string())?;
    let Some(tls) = tls else {
        let r = if dialer {
            client_handshake(stream, id).map(|_| Accepted::Link)
        } else {
            server_accept(stream, id, config)
        };
        return r.map(|a| (None, a)).map_err(|e| match e {
            // 0x16: a TLS handshake record.
            HandshakeError::Stranger(b) if b.first() == Some(&0x16) => {
                "the peer speaks TLS (its configuration requires it) and this node has \
                 resource.insecure = true: use the same configuration on both nodes"
                    .into()
            }
            e => e.to_string(),
        });
    };
    let mut conn = if dialer {
        tls.connect(stream)
    } else {
        tls.accept(stream)
    }
    .map_err(|e| e.to_string())?;
    let mut s = TlsStream {
        conn: &mut conn,
        sock: stream,
    };
    let r = if dialer {
        client_handshake(&mut s, id).map(|_| Accepted::Link)
    } else {
        server_accept(&mut s, id, config)
    };
    let accepted = r.map_err(|e| e.to_string())?;
    Ok((Some(conn), accepted))
}

fn prepare(stream: &TcpStream) -> std::io::Result<()> {
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(HANDSHAKE_TIMEOUT))?;
    stream.set_write_timeout(Some(HANDSHAKE_TIMEOUT))
}

fn finish(stream: TcpStream) -> std::io::Result<TcpStream> {
    stream.set_read_timeout(None)?;
    stream.set_write_timeout(None)?;
    Ok(stream)
}

/// The last failed connection attempt, for `status`: when, and why.
pub type LastLinkError = Arc<Mutex<Option<(Instant, String)>>>;

/// What the link threads share: who we are, the TLS setup, where established links go.
#[derive(Clone)]
pub struct LinkCtx {
    pub id: LinkIdentity,
    pub tls: Option<Arc<TlsSetup>>,
    pub tx: crossbeam_channel::Sender<LinkConn>,
    pub waker: Waker,
    pub last_error: LastLinkError,
    /// This node's configuration text (probes get it).
    pub config_text: Arc<str>,
    /// This node's state as JSON, published by the event loop (probes get it).
    pub state: PublishedState,
}

/// The event loop's latest summary of this node (role, disk state, generations), for
/// answers given outside the loop.
pub type PublishedState = Arc<Mutex<String>>;

impl LinkCtx {
    fn failed(&self, why: String) {
        if let Ok(mut e) = self.last_error.lock() {
            *e = Some((Instant::now(), why));
        }
    }

    /// Hand an established link to the event loop; false when the loop is gone.
    fn hand_over(&self, conn: LinkConn) -> bool {
        if self.tx.send(conn).is_err() {
            return false;
        }
        self.waker.wake();
        true
    }
}

fn security(tls: &Option<rustls::Connection>) -> &'static str {
    if tls.is_some() {
        "TLS 1.3, peer certificate pinned"
    } else {
        "PLAINTEXT"
    }
}

/// Accept replication connections on `listener` forever.
pub fn spawn_listener(listener: TcpListener, ctx: LinkCtx) {
    std::thread::Builder::new()
        .name("link-accept".into())
        .spawn(move || {
            for stream in listener.incoming() {
                let stream = match stream {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::warn!("replication port: accept failed: {e}");
                        std::thread::sleep(Duration::from_millis(100));
                        continue;
                    }
                };
                let ctx = ctx.clone();
                // One thread per handshake, so a silent stranger cannot block the port.
                let _ = std::thread::Builder::new()
                    .name("link-handshake".into())
                    .spawn(move || accept_one(stream, &ctx));
            }
        })
        .expect("spawn link listener");
}

fn accept_one(mut stream: TcpStream, ctx: &LinkCtx) {
    let peer_addr = stream
        .peer_addr()
        .map(|a| a.to_string())
        .unwrap_or_else(|_| "?".into());
    let state = ctx.state.lock().map(|s| s.clone()).unwrap_or_default();
    let r = establish(
        &mut stream,
        &ctx.id,
        ctx.tls.as_deref(),
        false,
        Some((&ctx.config_text, &state)),
    );
    let r = match r {
        Ok((_, Accepted::Probe)) => {
            tracing::info!("answered a probe (blkrep check) from {peer_addr}");
            return;
        }
        Ok((tls, Accepted::Link)) => finish(stream).map(|s| (s, tls)).map_err(|e| e.to_string()),
        Err(e) => Err(e),
    };
    match r {
        Ok((stream, tls)) => {
            tracing::info!(
                "replication link from {peer_addr} accepted ({})",
                security(&tls)
            );
            ctx.hand_over(LinkConn {
                stream,
                peer_addr,
                tls,
            });
        }
        Err(e) => {
            tracing::warn!("replication port: refused connection from {peer_addr}: {e}");
            ctx.failed(format!("refused a connection from {peer_addr}: {e}"));
        }
    }
}

/// Keep dialling `peer` while `linked` is false.
pub fn spawn_connector(peer: String, ctx: LinkCtx, linked: Arc<AtomicBool>, stop: Arc<AtomicBool>) {
    std::thread::Builder::new()
        .name("link-connect".into())
        .spawn(move || {
            let mut backoff = Duration::from_millis(100);
            let mut last_err = String::new();
            while !stop.load(Ordering::Relaxed) {
                if linked.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(100));
                    backoff = Duration::from_millis(100);
                    continue;
                }
                match dial(&peer, &ctx.id, ctx.tls.as_deref()) {
                    Ok((stream, tls)) => {
                        tracing::info!(
                            "replication link to {peer} established ({})",
                            security(&tls)
                        );
                        linked.store(true, Ordering::Relaxed);
                        let conn = LinkConn {
                            stream,
                            peer_addr: peer.clone(),
                            tls,
                        };
                        if !ctx.hand_over(conn) {
                            return;
                        }
                        last_err.clear();
                    }
                    Err(e) => {
                        if e != last_err {
                            tracing::warn!("cannot reach peer at {peer}: {e} (retrying)");
                            last_err = e.clone();
                        }
                        ctx.failed(format!("cannot reach {peer}: {e}"));
                        std::thread::sleep(backoff);
                        backoff = (backoff * 2).min(Duration::from_secs(2));
                    }
                }
            }
        })
        .expect("spawn link connector");
}

fn dial(
    peer: &str,
    id: &LinkIdentity,
    tls: Option<&TlsSetup>,
) -> Result<(TcpStream, Option<rustls::Connection>), String> {
    let addr = peer
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve: {e}"))?
        .next()
        .ok_or_else(|| "address resolves to nothing".to_string())?;
    let mut stream =
        TcpStream::connect_timeout(&addr, HANDSHAKE_TIMEOUT).map_err(|e| e.to_string())?;
    let (tls, _) = establish(&mut stream, id, tls, true, None)?;
    finish(stream).map(|s| (s, tls)).map_err(|e| e.to_string())
}
