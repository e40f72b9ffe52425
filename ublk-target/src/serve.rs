//! Wiring: open local storage, bind every socket, start the helper threads, run the loop.

use crate::backend::{Backing, MetaArea};
use crate::control;
use crate::daemon::{Identity, Loop, NbdHandoff, Shared, UblkFrontend};
use crate::link;
use crate::nbd::handshake::{negotiate, ExportInfo, Negotiated};
use crate::ublk::ctrl::Control;
use crate::ublk::device::{self, Settings};
use crate::ublk::helper::{self, Finished};
use crate::ublk::queue::IoQueues;
use crate::ublk::sys::{Encoding, UBLK_F_CMD_IOCTL_ENCODE};
use crate::wake::Waker;
use anyhow::Context;
use blkrep_common::config::{Config, Frontend, NbdListen, UBLK_CONTROL};
use blkrep_engine::{Role, Volume, VolumeConfig};
use blkrep_transport::handshake::LinkIdentity;
use blkrep_transport::tls::{TlsFiles, TlsSetup};
use std::io::{Read, Write};
use std::net::TcpListener;
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Run the daemon for `node` of `cfg` until it is shut down. Its start, its stop and a
/// failure to start go to the node's event log too.
pub fn run(cfg: &Config, node: &str) -> anyhow::Result<()> {
    let me = cfg.node(node)?;
    let (mut events, writer) = crate::events::EventLog::open(&me.events, &cfg.resource.name, node)?;
    let r = run_with(cfg, node, events.clone());
    match &r {
        Ok(()) => events.log("daemon", "info", "stopped".into(), None),
        Err(e) => events.log(
            "daemon",
            "critical",
            format!("stopped on an error: {e:#}"),
            None,
        ),
    }
    events.close();
    writer.join();
    r
}

fn run_with(cfg: &Config, node: &str, events: crate::events::EventLog) -> anyhow::Result<()> {
    let me = cfg.node(node)?;
    let peer = cfg.peer_of(node)?;
    let size = cfg.resource.size;
    let name = &cfg.resource.name;

    let (mut meta_area, mut meta) = MetaArea::open(&me.metadata, name, node, size)?;
    // The local legs: the backing and the mirror, as the state file says they are.
    let mut configured = vec![me.backing.clone()];
    configured.extend(me.legs.mirror.clone());
    let mut open_leg = |p: &Path| {
        let b = Backing::open(p, size).map_err(|e| e.to_string())?;
        if !b.direct {
            tracing::warn!(
                "leg {} does not support O_DIRECT; using buffered I/O",
                p.display()
            );
        }
        Ok(b.file)
    };
    let (mut legs, opening) = crate::legs::Legs::open(
        &cfg.legs_state(me),
        &configured,
        me.legs.clone(),
        name,
        node,
        size,
        &meta.dirty,
        &mut open_leg,
    )?;
    for n in &opening.notes {
        tracing::warn!("{n}");
        events.log("leg", "warning", n.clone(), None);
    }
    if legs.healthy_count() == 0 {
        // As before legs: a backing that cannot be opened is a start-up error.
        Backing::open(&me.backing, size)?;
        anyhow::bail!("no local leg can be opened");
    }
    // The journal is scanned (and a trusted one redone on the healthy legs) before
    // anything else reads or writes the volume.
    let journal = match &me.journal {
        Some((path, jsize)) => {
            let healthy: Vec<PathBuf> = legs.healthy().map(|i| legs.legs[i].path.clone()).collect();
            let paths: Vec<&Path> = healthy.iter().map(|p| p.as_path()).collect();
            let j =
                crate::journal_file::open(path, *jsize, name, &mut meta, &mut meta_area, &paths)?;
            tracing::info!("{}", j.report);
            for &(s, e) in &j.redone {
                legs.note_write(s, e);
            }
            legs.save()?;
            Some(j)
        }
        None => None,
    };
    let was_primary = meta.role == Role::Primary;
    events.log(
        "daemon",
        "info",
        format!(
            "started (blkrepd {}, pid {}) as secondary; its metadata says {:?}, {:?}, generation {:016x}, applied sequence {}",
            env!("CARGO_PKG_VERSION"),
            std::process::id(),
            meta.role,
            meta.disk_state,
            meta.generation,
            meta.applied_seq
        ),
        None,
    );
    let frontend = cfg
        .resource
        .frontend
        .resolve(Path::new(UBLK_CONTROL).exists());

    // Bind everything before serving, so that a port in use is a clear startup error.
    let ctl_path = cfg.control_socket(node);
    let ctl = control::bind(&ctl_path)
        .with_context(|| format!("control socket {}", ctl_path.display()))?;
    let listen = cfg.listen_address(me);
    let link_listener = TcpListener::bind(&listen).with_context(|| {
        format!(
            "replication address {listen} (node.{})",
            if me.listen.is_some() {
                "listen"
            } else {
                "address"
            }
        )
    })?;
    let tls = match (&me.tls, &peer.tls) {
        (Some(mine), Some(theirs)) => Some(Arc::new(
            TlsSetup::load(&TlsFiles {
                cert: &mine.cert,
                key: &mine.key,
                own: mine.fingerprint,
                peer: theirs.fingerprint,
            })
            .context("TLS identity of this node (node.key, node.cert, node.fingerprint)")?,
        )),
        _ => {
            tracing::warn!(
                "INSECURE: the replication link is plaintext and unauthenticated \
                 (resource.insecure = true); anyone who can reach {listen} can feed this node"
            );
            None
        }
    };
    let metrics_listener = match me.metrics {
        Some(a) => Some(
            crate::metrics::bind(a)
                .with_context(|| format!("metrics address {a} (node.metrics)"))?,
        ),
        None => None,
    };
    let mut traced = vec![(me.backing.as_path(), "backing")];
    if let Some(m) = &me.legs.mirror {
        traced.push((m.as_path(), "mirror"));
    }
    if let Some((j, _)) = &me.journal {
        traced.push((j.as_path(), "journal"));
    }
    traced.push((me.metadata.as_path(), "metadata"));
    let tracking =
        crate::latency::Tracking::start(me.ebpf, &crate::latency::node_devices(&traced))?;
    let nbd = cfg.nbd_listen(node);
    let nbd_bound = match frontend {
        Frontend::Ublk => None,
        _ => Some(bind_nbd(&nbd, name)?),
    };

    let waker = Waker::new()?;
    let (nbd_tx, nbd_rx) = crossbeam_channel::unbounded();
    let (link_tx, link_rx) = crossbeam_channel::unbounded();
    let (ctl_tx, ctl_rx) = crossbeam_channel::unbounded();
    let linked = Arc::new(AtomicBool::new(false));
    let read_only = Arc::new(AtomicBool::new(true));
    let stop = Arc::new(AtomicBool::new(false));

    spawn_signal_thread(ctl_tx.clone(), waker.clone());
    let (ublk, ublk_setup) = match frontend {
        Frontend::Ublk => {
            let (f, s) = attach_ublk(cfg, node, was_primary, waker.clone())?;
            (Some(f), Some(s))
        }
        _ => (None, None),
    };
    control::spawn(ctl, ctl_path.clone(), ctl_tx, waker.clone());
    if let Some(l) = metrics_listener {
        crate::metrics::spawn(l, ctl_path.clone());
    }
    let id = LinkIdentity {
        resource: name.clone(),
        local_node: node.to_string(),
        peer_node: peer.name.clone(),
    };
    let last_link_error: link::LastLinkError = Default::default();
    let published: link::PublishedState = Default::default();
    let ctx = link::LinkCtx {
        id,
        tls: tls.clone(),
        tx: link_tx,
        waker: waker.clone(),
        last_error: last_link_error.clone(),
        config_text: Arc::from(cfg.text.as_str()),
        state: published.clone(),
    };
    link::spawn_listener(link_listener, ctx.clone());
    if node < peer.name.as_str() {
        link::spawn_connector(peer.address.clone(), ctx, linked.clone(), stop.clone());
    }
    let export_uri = match (&nbd_bound, &ublk_setup) {
        (Some((_, uri)), _) => uri.clone(),
        (None, Some(u)) => device::block_path(u.dev_id),
        (None, None) => String::new(),
    };
    if let Some((listener, _)) = nbd_bound {
        spawn_nbd_acceptor(
            listener,
            name.clone(),
            size,
            read_only.clone(),
            nbd_tx,
            waker.clone(),
        );
    }

    let mut vcfg = VolumeConfig::new(node, name, size, cfg.resource.mode);
    vcfg.diskless_on_failure = me.legs.on_io_error == blkrep_common::config::OnIoError::Diskless;
    vcfg.queue_limit = cfg.resource.queue_limit;
    vcfg.resync_rate = cfg.resource.resync_rate;
    vcfg.replication_rate = cfg.resource.replication_rate;
    vcfg.checksum_full_sync = cfg.resource.checksum_full_sync;
    if let Some(j) = &journal {
        // The ship queue holds what the journal holds (in memory as well, for now).
        vcfg.queue_limit = vcfg.queue_limit.max(j.cfg.capacity());
    }
    let mut vol = Volume::new(vcfg, meta);
    let journal_file = journal.map(|j| {
        vol.attach_journal(j.cfg, j.start);
        j.file
    });
    tracing::info!(
        "serving {name}/{node}: {size} bytes, {:?} mode, export {export_uri}, replication on {listen} (peer {} at {}, {})",
        cfg.resource.mode,
        peer.name,
        peer.address,
        match &tls {
            Some(t) => format!("TLS 1.3, peer pinned to {}", t.peer),
            None => "PLAINTEXT".into(),
        }
    );
    let shared = Shared {
        waker,
        nbd_rx,
        link_rx,
        ctl_rx,
        linked,
        read_only,
        last_link_error,
        published,
        events,
        alerts: cfg.alerts.clone(),
    };
    let ident = Identity {
        resource: name.clone(),
        node: node.to_string(),
        peer: peer.name.clone(),
        peer_address: peer.address.clone(),
        export: export_uri,
        compress: cfg.resource.compress,
        link_security: match &tls {
            Some(t) => format!("tls (TLS 1.3, peer pinned to {})", t.peer),
            None => "insecure".into(),
        },
    };
    // The loop (its ring, the tag buffers, the char device) is gone once this returns.
    let drill = crate::daemon::DrillSetup {
        store: cfg.drill_store(me),
        socket: cfg.drill_socket(node),
        record: cfg.drill_record(node),
        owner: device::owner_tag(name, &format!("{node} drill")),
        ublk: Path::new(UBLK_CONTROL).exists(),
    };
    let r = Loop::new(vol, legs, meta_area, journal_file, shared, ident, ublk)
        .and_then(|l| l.with_tracking(tracking).with_drill(drill).run());
    stop.store(true, Ordering::Relaxed);
    if let Some(u) = ublk_setup {
        u.finish();
    }
    let _ = std::fs::remove_file(&ctl_path);
    if let (NbdListen::Unix(p), Frontend::Nbd) = (&nbd, frontend) {
        let _ = std::fs::remove_file(p);
    }
    r
}

/// What `run` keeps of a ublk device to clean up after the loop.
struct UblkSetup {
    dev_id: u32,
    record: PathBuf,
    recovered: bool,
    helper: std::thread::JoinHandle<Finished>,
}

/// Create this node's ublk device, or take over the one a crashed daemon left; map its
/// queues and start the `ublk-ctl` helper. Nothing is left behind on failure (a device
/// being recovered stays as it was, for the next attempt).
fn attach_ublk(
    cfg: &Config,
    node: &str,
    was_primary: bool,
    waker: Waker,
) -> anyhow::Result<(UblkFrontend, UblkSetup)> {
    let shape = cfg.ublk_shape(node);
    let record = cfg.ublk_record(node);
    let mut ctrl = Control::open()?;
    let settings = Settings {
        queues: shape.queues,
        depth: shape.depth,
        size: cfg.resource.size,
        owner: device::owner_tag(&cfg.resource.name, node),
        record: record.clone(),
    };
    let a = device::attach(&mut ctrl, &settings)?;
    let info = a.info;
    let encoding = if info.flags & UBLK_F_CMD_IOCTL_ENCODE != 0 {
        Encoding::Ioctl
    } else {
        Encoding::Legacy
    };
    let queues = match IoQueues::new(
        a.cdev,
        info.nr_hw_queues,
        info.queue_depth,
        info.max_io_buf_bytes as usize,
        encoding,
    ) {
        Ok(q) => q,
        Err(e) => {
            if !a.recovered {
                if let Err(d) = device::delete(&mut ctrl, info.dev_id, &record) {
                    tracing::error!("{d}");
                }
            }
            return Err(e.into());
        }
    };
    let (link, helper) = helper::spawn(ctrl, info.dev_id, waker);
    let hold = a.recovered && was_primary;
    Ok((
        UblkFrontend::new(queues, info.dev_id, a.recovered, hold, link),
        UblkSetup {
            dev_id: info.dev_id,
            record,
            recovered: a.recovered,
            helper,
        },
    ))
}

impl UblkSetup {
    /// After the loop (the char device is closed): delete the device if the loop stopped
    /// it or never started a new one; leave a device that still holds I/O for a restarted
    /// daemon to recover.
    fn finish(self) {
        let path = device::block_path(self.dev_id);
        match self.helper.join() {
            Ok(Finished {
                mut ctrl,
                stopped,
                started,
            }) if stopped || (!started && !self.recovered) => {
                match device::delete(&mut ctrl, self.dev_id, &self.record) {
                    Ok(()) => tracing::info!("ublk: removed {path}"),
                    Err(e) => tracing::error!("ublk: removing {path}: {e}"),
                }
            }
            Ok(_) => tracing::warn!(
                "ublk: leaving {path} for a restarted daemon to recover (record {})",
                self.record.display()
            ),
            Err(_) => tracing::error!("ublk: the ublk-ctl thread panicked; {path} is left as is"),
        }
    }
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
                    who: Some(format!("signal {sig:?}")),
                });
                waker.wake();
            }
        })
        .expect("spawn signal thread");
}
