//! Wiring: open local storage, bind every socket, start the helper threads, run the loop.

use crate::backend::{Backing, MetaArea};
use crate::control;
use crate::daemon::{Identity, Loop, NbdHandoff, Shared};
use crate::link;
use crate::nbd::handshake::{negotiate, ExportInfo, Negotiated};
use crate::wake::Waker;
use anyhow::Context;
use blkrep_common::config::{Config, NbdListen};
use blkrep_engine::{Volume, VolumeConfig};
use blkrep_transport::handshake::LinkIdentity;
use std::io::{Read, Write};
use std::net::TcpListener;
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixListener;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Run the daemon for `node` of `cfg` until it is shut down.
pub fn run(cfg: &Config, node: &str) -> anyhow::Result<()> {
    let me = cfg.node(node)?;
    let peer = cfg.peer_of(node)?;
    let size = cfg.resource.size;
    let name = &cfg.resource.name;

    let backing = Backing::open(&me.backing, size)?;
    if !backing.direct {
        tracing::warn!(
            "backing {} does not support O_DIRECT; using buffered I/O",
            me.backing.display()
        );
    }
    let (meta_area, meta) = MetaArea::open(&me.metadata, name, node, size)?;

    // Bind everything before serving, so that a port in use is a clear startup error.
    let ctl_path = cfg.control_socket(node);
    let ctl = control::bind(&ctl_path)
        .with_context(|| format!("control socket {}", ctl_path.display()))?;
    let link_listener = TcpListener::bind(&me.address)
        .with_context(|| format!("replication address {} (node.address)", me.address))?;
    let nbd = cfg.nbd_listen(node);
    let (nbd_listener, export_uri) = bind_nbd(&nbd, name)?;

    let waker = Waker::new()?;
    let (nbd_tx, nbd_rx) = crossbeam_channel::unbounded();
    let (link_tx, link_rx) = crossbeam_channel::unbounded();
    let (ctl_tx, ctl_rx) = crossbeam_channel::unbounded();
    let linked = Arc::new(AtomicBool::new(false));
    let read_only = Arc::new(AtomicBool::new(true));
    let stop = Arc::new(AtomicBool::new(false));

    spawn_signal_thread(ctl_tx.clone(), waker.clone());
    control::spawn(ctl, ctl_path.clone(), ctl_tx, waker.clone());
    let id = LinkIdentity {
        resource: name.clone(),
        local_node: node.to_string(),
        peer_node: peer.name.clone(),
    };
    link::spawn_listener(link_listener, id.clone(), link_tx.clone(), waker.clone());
    if node < peer.name.as_str() {
        link::spawn_connector(
            peer.address.clone(),
            id,
            linked.clone(),
            stop.clone(),
            link_tx,
            waker.clone(),
        );
    }
    spawn_nbd_acceptor(
        nbd_listener,
        name.clone(),
        size,
        read_only.clone(),
        nbd_tx,
        waker.clone(),
    );

    let mut vcfg = VolumeConfig::new(node, name, size, cfg.resource.mode);
    vcfg.queue_limit = cfg.resource.queue_limit;
    let vol = Volume::new(vcfg, meta);
    tracing::info!(
        "serving {name}/{node}: {size} bytes, {:?} mode, export {export_uri}, replication on {} (peer {} at {})",
        cfg.resource.mode,
        me.address,
        peer.name,
        peer.address
    );
    let shared = Shared {
        waker,
        nbd_rx,
        link_rx,
        ctl_rx,
        linked,
        read_only,
    };
    let ident = Identity {
        resource: name.clone(),
        node: node.to_string(),
        peer: peer.name.clone(),
        peer_address: peer.address.clone(),
        export: export_uri,
    };
    let r = Loop::new(vol, backing, meta_area, shared, ident)?.run();
    stop.store(true, Ordering::Relaxed);
    let _ = std::fs::remove_file(&ctl_path);
    if let NbdListen::Unix(p) = &nbd {
        let _ = std::fs::remove_file(p);
    }
    r
}

enum NbdListener {
    Unix(UnixListener),
    Tcp(TcpListener),
}

fn bind_nbd(l: &NbdListen, export: &str) -> anyhow::Result<(NbdListener, String)> {
    Ok(match l {
        NbdListen::Unix(p) => {
            if let Some(d) = p.parent() {
                std::fs::create_dir_all(d)?;
            }
            if p.exists() {
                if std::os::unix::net::UnixStream::connect(p).is_ok() {
                    anyhow::bail!("NBD socket {} is in use by another process", p.display());
                }
                std::fs::remove_file(p)?;
            }
            let lis = UnixListener::bind(p)
                .with_context(|| format!("NBD socket {} (node.nbd)", p.display()))?;
            (
                NbdListener::Unix(lis),
                format!("nbd+unix:///{export}?socket={}", p.display()),
            )
        }
        NbdListen::Tcp(a) => {
            let lis =
                TcpListener::bind(a).with_context(|| format!("NBD address {a} (node.nbd)"))?;
            (NbdListener::Tcp(lis), format!("nbd://{a}/{export}"))
        }
    })
}

fn spawn_nbd_acceptor(
    l: NbdListener,
    export: String,
    size: u64,
    read_only: Arc<AtomicBool>,
    tx: crossbeam_channel::Sender<NbdHandoff>,
    waker: Waker,
) {
    std::thread::Builder::new()
        .name("nbd-accept".into())
        .spawn(move || loop {
            let accepted: std::io::Result<(OwnedFd, Box<dyn ReadWrite>)> = match &l {
                NbdListener::Unix(u) => u.accept().and_then(|(s, _)| {
                    s.set_read_timeout(Some(Duration::from_secs(10)))?;
                    Ok((
                        OwnedFd::from(s.try_clone()?),
                        Box::new(s) as Box<dyn ReadWrite>,
                    ))
                }),
                NbdListener::Tcp(t) => t.accept().and_then(|(s, _)| {
                    s.set_nodelay(true)?;
                    s.set_read_timeout(Some(Duration::from_secs(10)))?;
                    Ok((
                        OwnedFd::from(s.try_clone()?),
                        Box::new(s) as Box<dyn ReadWrite>,
                    ))
                }),
            };
            let (fd, mut stream) = match accepted {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!("NBD accept failed: {e}");
                    std::thread::sleep(Duration::from_millis(50));
                    continue;
                }
            };
            let info = ExportInfo {
                name: export.clone(),
                description: format!("blkrep volume {export}"),
                size,
                read_only: read_only.load(Ordering::Relaxed),
                multi_conn: false,
            };
            let tx = tx.clone();
            let waker = waker.clone();
            let _ = std::thread::Builder::new()
                .name("nbd-negotiate".into())
                .spawn(move || match negotiate(&mut stream, &[info]) {
                    Ok(Negotiated::Transmission { export, .. }) => {
                        // The loop reads with io_uring; no timeouts apply there.
                        clear_timeouts(&fd);
                        drop(stream);
                        if tx.send(NbdHandoff { fd, export }).is_ok() {
                            waker.wake();
                        }
                    }
                    Ok(Negotiated::Ended) => {}
                    Err(e) => tracing::warn!("NBD negotiation failed: {e}"),
                });
        })
        .expect("spawn nbd acceptor");
}

trait ReadWrite: Read + Write + Send {}
impl<T: Read + Write + Send> ReadWrite for T {}

fn clear_timeouts(fd: &OwnedFd) {
    use std::os::fd::AsRawFd;
    let tv = libc::timeval {
        tv_sec: 0,
        tv_usec: 0,
    };
    for opt in [libc::SO_RCVTIMEO, libc::SO_SNDTIMEO] {
        // SAFETY: setsockopt reads a valid timeval for the call's duration on our socket.
        unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                opt,
                &tv as *const libc::timeval as *const libc::c_void,
                std::mem::size_of::<libc::timeval>() as u32,
            )
        };
    }
}

/// SIGTERM / SIGINT request a clean shutdown through the control path.
fn spawn_signal_thread(tx: crossbeam_channel::Sender<control::ControlCall>, waker: Waker) {
    use nix::sys::signal::{SigSet, Signal};
    let mut set = SigSet::empty();
    set.add(Signal::SIGTERM);
    set.add(Signal::SIGINT);
    // Block in this thread before any other starts, so every thread inherits the mask
    // and only the waiter below receives them.
    if set.thread_block().is_err() {
        return;
    }
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || loop {
            if let Ok(sig) = set.wait() {
                tracing::info!("{sig:?} received: shutting down");
                let (rtx, _rrx) = crossbeam_channel::bounded(1);
                let _ = tx.send(control::ControlCall {
                    req: blkrep_common::control::Request::Shutdown,
                    reply: rtx,
                });
                waker.wake();
            }
        })
        .expect("spawn signal thread");
}
