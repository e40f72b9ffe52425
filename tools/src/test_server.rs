//! A minimal NBD server for the unit tests: fixed newstyle, `NBD_OPT_GO`/`INFO`/`LIST`/
//! `EXPORT_NAME`/`ABORT`, simple replies, an in-memory disk, configurable reply order and
//! injectable faults. Hand-written from the spec, independent of the client's code paths
//! except the shared constants.

use std::io::{self, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use crate::nbd_proto::*;

/// A temporary directory removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static N: AtomicU64 = AtomicU64::new(0);
        let p = std::env::temp_dir().join(format!(
            "blkrep-tools-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The order in which the server sends replies.
#[derive(Clone, Copy, Debug)]
pub enum ReplyOrder {
    /// Reply to each request as soon as it is read.
    InOrder,
    /// Collect exactly this many requests, then reply to them newest first.
    ReverseBatch(usize),
    /// Collect requests while more are immediately readable, then reply newest first.
    ReverseAvailable,
}

/// A deliberate protocol violation, on the n-th reply (0-based).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Fault {
    None,
    BadMagic(usize),
    UnknownHandle(usize),
    Structured(usize),
    /// Some bytes after the 16-byte header of a (non-read) reply.
    TrailingGarbage(usize),
}

#[derive(Clone, Debug)]
pub struct Config {
    pub exports: Vec<String>,
    pub size: u64,
    pub hflags: u16,
    pub tflags: u16,
    pub block_size: Option<(u32, u32, u32)>,
    pub go_supported: bool,
    pub order: ReplyOrder,
    pub fault: Fault,
    /// Reads starting at this offset fail with NBD_EIO.
    pub read_error_at: Option<u64>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            exports: vec!["vol".into()],
            size: 16 << 20,
            hflags: NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES,
            tflags: NBD_FLAG_HAS_FLAGS
                | NBD_FLAG_SEND_FLUSH
                | NBD_FLAG_SEND_FUA
                | NBD_FLAG_SEND_TRIM
                | NBD_FLAG_SEND_WRITE_ZEROES,
            block_size: Some((512, 4096, 1 << 20)),
            go_supported: true,
            order: ReplyOrder::InOrder,
            fault: Fault::None,
            read_error_at: None,
        }
    }
}

/// A request as the server saw it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Seen {
    pub flags: u16,
    pub command: u16,
    pub offset: u64,
    pub len: u32,
}

pub struct TestServer {
    /// Holds the socket; removed on drop.
    _dir: TempDir,
    pub sock: PathBuf,
    pub disk: Arc<Mutex<Vec<u8>>>,
    pub seen: Arc<Mutex<Vec<Seen>>>,
}

impl TestServer {
    /// Listens on a socket in a fresh temp dir and serves every connection on a thread.
    pub fn start(cfg: Config) -> TestServer {
        let dir = TempDir::new("srv");
        let sock = dir.path("nbd.sock");
        let listener = UnixListener::bind(&sock).unwrap();
        let disk = Arc::new(Mutex::new(vec![0u8; cfg.size as usize]));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (d, s) = (disk.clone(), seen.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { return };
                let (cfg, d, s) = (cfg.clone(), d.clone(), s.clone());
                std::thread::spawn(move || {
                    let _ = serve(conn, &cfg, &d, &s);
                });
            }
        });
        TestServer {
            _dir: dir,
            sock,
            disk,
            seen,
        }
    }

    pub fn path(&self) -> &Path {
        &self.sock
    }

    /// Waits (up to 5 s) until the server has seen a request with `command`.
    pub fn saw_command(&self, command: u16) -> bool {
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while std::time::Instant::now() < deadline {
            if self
                .seen
                .lock()
                .unwrap()
                .iter()
                .any(|s| s.command == command)
            {
                return true;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        false
    }
}

fn rd<const N: usize>(s: &mut UnixStream) -> io::Result<[u8; N]> {
    let mut b = [0u8; N];
    s.read_exact(&mut b)?;
    Ok(b)
}

fn opt_reply(s: &mut UnixStream, opt: u32, rtype: u32, data: &[u8]) -> io::Result<()> {
    let mut m = Vec::new();
    m.extend_from_slice(&NBD_REP_MAGIC.to_be_bytes());
    m.extend_from_slice(&opt.to_be_bytes());
    m.extend_from_slice(&rtype.to_be_bytes());
    m.extend_from_slice(&(data.len() as u32).to_be_bytes());
    m.extend_from_slice(data);
    s.write_all(&m)
}

fn serve(
    mut s: UnixStream,
    cfg: &Config,
    disk: &Mutex<Vec<u8>>,
    seen: &Mutex<Vec<Seen>>,
) -> io::Result<()> {
    let mut greet = Vec::new();
    greet.extend_from_slice(&NBD_MAGIC.to_be_bytes());
    greet.extend_from_slice(&NBD_IHAVEOPT.to_be_bytes());
    greet.extend_from_slice(&cfg.hflags.to_be_bytes());
    s.write_all(&greet)?;
    let cflags = u32::from_be_bytes(rd::<4>(&mut s)?);
    let no_zeroes = cflags & NBD_FLAG_C_NO_ZEROES != 0;
    loop {
        let magic = u64::from_be_bytes(rd::<8>(&mut s)?);
        assert_eq!(magic, NBD_IHAVEOPT, "client option magic");
        let opt = u32::from_be_bytes(rd::<4>(&mut s)?);
        let len = u32::from_be_bytes(rd::<4>(&mut s)?);
        let mut data = vec![0u8; len as usize];
        s.read_exact(&mut data)?;
        match opt {
            NBD_OPT_EXPORT_NAME => {
                if !cfg
                    .exports
                    .contains(&String::from_utf8_lossy(&data).into_owned())
                {
                    return Ok(()); // the only way to refuse EXPORT_NAME: hang up
                }
                let mut m = cfg.size.to_be_bytes().to_vec();
                m.extend_from_slice(&cfg.tflags.to_be_bytes());
                if !no_zeroes {
                    m.extend_from_slice(&[0u8; 124]);
                }
                s.write_all(&m)?;
                break;
            }
            NBD_OPT_GO | NBD_OPT_INFO if cfg.go_supported => {
                let n = u32::from_be_bytes(data[0..4].try_into().unwrap()) as usize;
                let name = String::from_utf8_lossy(&data[4..4 + n]).into_owned();
                if !cfg.exports.contains(&name) {
                    opt_reply(&mut s, opt, NBD_REP_ERR_UNKNOWN, b"no such export")?;
                    continue;
                }
                let mut info = NBD_INFO_EXPORT.to_be_bytes().to_vec();
                info.extend_from_slice(&cfg.size.to_be_bytes());
                info.extend_from_slice(&cfg.tflags.to_be_bytes());
                opt_reply(&mut s, opt, NBD_REP_INFO, &info)?;
                if let Some((a, b, c)) = cfg.block_size {
                    let mut info = NBD_INFO_BLOCK_SIZE.to_be_bytes().to_vec();
                    for v in [a, b, c] {
                        info.extend_from_slice(&v.to_be_bytes());
                    }
                    opt_reply(&mut s, opt, NBD_REP_INFO, &info)?;
                }
                opt_reply(&mut s, opt, NBD_REP_ACK, &[])?;
                if opt == NBD_OPT_GO {
                    break;
                }
            }
            NBD_OPT_LIST => {
                for e in &cfg.exports {
                    let mut d = (e.len() as u32).to_be_bytes().to_vec();
                    d.extend_from_slice(e.as_bytes());
                    opt_reply(&mut s, opt, NBD_REP_SERVER, &d)?;
                }
                opt_reply(&mut s, opt, NBD_REP_ACK, &[])?;
            }
            NBD_OPT_ABORT => {
                opt_reply(&mut s, opt, NBD_REP_ACK, &[])?;
                return Ok(());
            }
            _ => opt_reply(&mut s, opt, NBD_REP_ERR_UNSUP, b"unsupported")?,
        }
    }
    transmission(s, cfg, disk, seen)
}

/// A request read off the socket by the reader thread.
struct Req {
    flags: u16,
    command: u16,
    handle: u64,
    offset: u64,
    len: u32,
    data: Vec<u8>,
}

/// Reads requests until EOF, garbage (hard disconnect) or `NBD_CMD_DISC`.
fn reader(mut s: UnixStream, tx: mpsc::Sender<Req>) -> io::Result<()> {
    loop {
        let h = rd::<28>(&mut s)?;
        if u32::from_be_bytes(h[0..4].try_into().unwrap()) != NBD_REQUEST_MAGIC {
            return Ok(());
        }
        let mut r = Req {
            flags: u16::from_be_bytes(h[4..6].try_into().unwrap()),
            command: u16::from_be_bytes(h[6..8].try_into().unwrap()),
            handle: u64::from_be_bytes(h[8..16].try_into().unwrap()),
            offset: u64::from_be_bytes(h[16..24].try_into().unwrap()),
            len: u32::from_be_bytes(h[24..28].try_into().unwrap()),
            data: Vec::new(),
        };
        if r.command == NBD_CMD_WRITE {
            r.data = vec![0u8; r.len as usize];
            s.read_exact(&mut r.data)?;
        }
        let disc = r.command == NBD_CMD_DISC;
        if tx.send(r).is_err() || disc {
            return Ok(());
        }
    }
}

fn transmission(
    mut s: UnixStream,
    cfg: &Config,
    disk: &Mutex<Vec<u8>>,
    seen: &Mutex<Vec<Seen>>,
) -> io::Result<()> {
    let (tx, rx) = mpsc::channel();
    let rs = s.try_clone()?;
    std::thread::spawn(move || reader(rs, tx));
    let mut pending: Vec<Vec<u8>> = Vec::new();
    let mut sent = 0usize;
    let mut lookahead = None;
    let reverse = !matches!(cfg.order, ReplyOrder::InOrder);
    loop {
        let req = match lookahead.take() {
            Some(r) => r,
            None => match rx.recv() {
                Ok(r) => r,
                Err(_) => break, // the client hung up or sent garbage
            },
        };
        let Req {
            flags,
            command,
            handle,
            offset,
            len,
            data,
        } = req;
        seen.lock().unwrap().push(Seen {
            flags,
            command,
            offset,
            len,
        });
        let end = offset + u64::from(len);
        let in_range = end <= cfg.size;
        let (mut error, mut payload) = (0u32, Vec::new());
        match command {
            NBD_CMD_DISC => break,
            NBD_CMD_READ if !in_range => error = NBD_EINVAL,
            NBD_CMD_READ if cfg.read_error_at == Some(offset) => error = NBD_EIO,
            NBD_CMD_READ => payload = disk.lock().unwrap()[offset as usize..end as usize].to_vec(),
            NBD_CMD_WRITE if in_range => {
                disk.lock().unwrap()[offset as usize..end as usize].copy_from_slice(&data)
            }
            NBD_CMD_WRITE => error = NBD_ENOSPC,
            NBD_CMD_TRIM | NBD_CMD_WRITE_ZEROES if in_range => {
                disk.lock().unwrap()[offset as usize..end as usize].fill(0)
            }
            NBD_CMD_FLUSH => {}
            _ => error = NBD_EINVAL,
        }
        let mut reply = NBD_SIMPLE_REPLY_MAGIC.to_be_bytes().to_vec();
        reply.extend_from_slice(&error.to_be_bytes());
        reply.extend_from_slice(&handle.to_be_bytes());
        reply.extend_from_slice(&payload);
        pending.push(reply);
        let now = match cfg.order {
            ReplyOrder::InOrder => true,
            ReplyOrder::ReverseBatch(k) => pending.len() >= k,
            // Keep collecting while the client has more requests on the way.
            ReplyOrder::ReverseAvailable => match rx.recv_timeout(Duration::from_millis(2)) {
                Ok(r) => {
                    lookahead = Some(r);
                    false
                }
                Err(_) => true,
            },
        };
        if now {
            flush_replies(&mut s, &mut pending, &mut sent, cfg, reverse)?;
        }
    }
    flush_replies(&mut s, &mut pending, &mut sent, cfg, reverse)?;
    s.shutdown(std::net::Shutdown::Both)
}

fn flush_replies(
    s: &mut UnixStream,
    pending: &mut Vec<Vec<u8>>,
    sent: &mut usize,
    cfg: &Config,
    reverse: bool,
) -> io::Result<()> {
    if reverse {
        pending.reverse();
    }
    for mut r in pending.drain(..) {
        match cfg.fault {
            Fault::BadMagic(n) if n == *sent => r[0] ^= 0x40,
            Fault::UnknownHandle(n) if n == *sent => r[15] ^= 1,
            Fault::Structured(n) if n == *sent => {
                r[0..4].copy_from_slice(&NBD_STRUCTURED_REPLY_MAGIC.to_be_bytes())
            }
            Fault::TrailingGarbage(n) if n == *sent => r.extend_from_slice(&[0xee; 16]),
            _ => {}
        }
        s.write_all(&r)?;
        *sent += 1;
    }
    Ok(())
}
