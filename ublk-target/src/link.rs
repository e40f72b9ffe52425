//! Establishing the replication link: a listener that runs the link handshake on every
//! incoming connection (strangers and garbage are refused and logged, nothing reaches the
//! engine), and — on the node whose name sorts first, so that exactly one side dials — a
//! connector that keeps trying to reach the peer while no link is up.
//!
//! Both run on plain threads with blocking sockets and timeouts; an established, verified
//! connection is handed to the event loop, which owns it from then on.

use crate::wake::Waker;
use blkrep_transport::handshake::{client_handshake, server_handshake, LinkIdentity};
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// How long a handshake may take before the connection is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// A verified connection to the peer.
pub struct LinkConn {
    pub stream: TcpStream,
    pub peer_addr: String,
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

/// Accept replication connections on `listener` forever.
pub fn spawn_listener(
    listener: TcpListener,
    id: LinkIdentity,
    tx: crossbeam_channel::Sender<LinkConn>,
    waker: Waker,
) {
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
                let id = id.clone();
                let tx = tx.clone();
                let waker = waker.clone();
                // One thread per handshake, so a silent stranger cannot block the port.
                let _ = std::thread::Builder::new()
                    .name("link-handshake".into())
                    .spawn(move || {
                        let peer_addr = stream
                            .peer_addr()
                            .map(|a| a.to_string())
                            .unwrap_or_else(|_| "?".into());
                        let mut stream = stream;
                        let r = prepare(&stream)
                            .map_err(|e| e.to_string())
                            .and_then(|_| {
                                server_handshake(&mut stream, &id).map_err(|e| e.to_string())
                            })
                            .and_then(|_| finish(stream).map_err(|e| e.to_string()));
                        match r {
                            Ok(stream) => {
                                tracing::info!("replication link from {peer_addr} accepted");
                                if tx.send(LinkConn { stream, peer_addr }).is_ok() {
                                    waker.wake();
                                }
                            }
                            Err(e) => tracing::warn!(
                                "replication port: refused connection from {peer_addr}: {e}"
                            ),
                        }
                    });
            }
        })
        .expect("spawn link listener");
}

/// Keep dialling `peer` while `linked` is false.
pub fn spawn_connector(
    peer: String,
    id: LinkIdentity,
    linked: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    tx: crossbeam_channel::Sender<LinkConn>,
    waker: Waker,
) {
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
                match dial(&peer, &id) {
                    Ok(stream) => {
                        tracing::info!("replication link to {peer} established");
                        linked.store(true, Ordering::Relaxed);
                        if tx
                            .send(LinkConn {
                                stream,
                                peer_addr: peer.clone(),
                            })
                            .is_err()
                        {
                            return;
                        }
                        waker.wake();
                        last_err.clear();
                    }
                    Err(e) => {
                        if e != last_err {
                            tracing::warn!("cannot reach peer at {peer}: {e} (retrying)");
                            last_err = e;
                        }
                        std::thread::sleep(backoff);
                        backoff = (backoff * 2).min(Duration::from_secs(2));
                    }
                }
            }
        })
        .expect("spawn link connector");
}

fn dial(peer: &str, id: &LinkIdentity) -> Result<TcpStream, String> {
    let addr = peer
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve: {e}"))?
        .next()
        .ok_or_else(|| "address resolves to nothing".to_string())?;
    let mut stream =
        TcpStream::connect_timeout(&addr, HANDSHAKE_TIMEOUT).map_err(|e| e.to_string())?;
    prepare(&stream).map_err(|e| e.to_string())?;
    client_handshake(&mut stream, id).map_err(|e| e.to_string())?;
    finish(stream).map_err(|e| e.to_string())
}
