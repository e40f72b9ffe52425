//! The drill clone as an NBD export (`drill`) on a Unix socket: blocking threads, one per
//! client, answering from the [`Cow`]. It is always there, next to the ublk device where
//! the kernel has one, so that NBD clients (qemu-io, nbdinfo, a probe) reach the clone on
//! any host. The negotiation and request parsing are the frontend's own.

use super::Cow;
use crate::nbd::handshake::{negotiate, ExportInfo, Negotiated};
use crate::nbd::transmission::{
    bytes_needed, encode_simple_reply, validate, Command, RequestParser, REQUEST_HEADER_LEN,
};
use crate::nbd::EIO;
use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

/// The export name clients ask for.
pub const EXPORT: &str = "drill";

/// The NBD URI of the export at `socket`.
pub fn uri(socket: &Path) -> String {
    format!("nbd+unix:///{EXPORT}?socket={}", socket.display())
}

/// A running export.
pub struct NbdServer {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<UnixStream>>>,
    accept: Option<JoinHandle<()>>,
}

impl NbdServer {
    /// Serve `cow` at `path` (a stale socket there is replaced).
    pub fn start(path: &Path, cow: Arc<Cow>) -> std::io::Result<NbdServer> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let _ = std::fs::remove_file(path);
        let listener = UnixListener::bind(path)?;
        let stop = Arc::new(AtomicBool::new(false));
        let conns: Arc<Mutex<Vec<UnixStream>>> = Arc::default();
        let (s, c) = (stop.clone(), conns.clone());
        let accept = std::thread::Builder::new()
            .name("drill-nbd".into())
            .spawn(move || {
                for stream in listener.incoming() {
                    if s.load(Ordering::Acquire) {
                        break;
                    }
                    let Ok(stream) = stream else { continue };
                    if let (Ok(mut l), Ok(clone)) = (c.lock(), stream.try_clone()) {
                        l.push(clone);
                    }
                    let cow = cow.clone();
                    let _ = std::thread::Builder::new()
                        .name("drill-nbd-conn".into())
                        .spawn(move || {
                            if let Err(e) = serve(stream, &cow) {
                                tracing::info!("drill clone NBD client: {e}");
                            }
                        });
                }
            })?;
        Ok(NbdServer {
            path: path.to_path_buf(),
            stop,
            conns,
            accept: Some(accept),
        })
    }

    /// Disconnect every client and remove the socket.
    pub fn stop(mut self) {
        self.stop.store(true, Ordering::Release);
        // Wake the acceptor with a connection of our own.
        let _ = UnixStream::connect(&self.path);
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
        if let Ok(l) = self.conns.lock() {
            for c in l.iter() {
                let _ = c.shutdown(std::net::Shutdown::Both);
            }
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

fn serve(mut s: UnixStream, cow: &Cow) -> Result<(), String> {
    let export = ExportInfo {
        name: EXPORT.into(),
        description: "blkrep drill clone (copy-on-write, discarded when the drill ends)".into(),
        size: cow.size(),
        read_only: false,
        multi_conn: false,
    };
    match negotiate(&mut s, &[export]).map_err(|e| e.to_string())? {
        Negotiated::Ended => return Ok(()),
        Negotiated::Transmission { .. } => {}
    }
    let mut parser = RequestParser::default();
    let mut buf = vec![0u8; REQUEST_HEADER_LEN];
    let mut out = Vec::new();
    loop {
        buf.resize(REQUEST_HEADER_LEN, 0);
        if s.read_exact(&mut buf).is_err() {
            return Ok(());
        }
        let need = bytes_needed(&buf);
        if need > buf.len() {
            let have = buf.len();
            buf.resize(need, 0);
            s.read_exact(&mut buf[have..]).map_err(|e| e.to_string())?;
        }
        let (req, _) = match parser.parse(&buf).map_err(|e| e.to_string())? {
            Some(r) => r,
            None => return Err("truncated request".into()),
        };
        if req.cmd == Command::Disc {
            return Ok(());
        }
        out.clear();
        if let Err(errno) = validate(&req, cow.size(), false) {
            encode_simple_reply(req.handle, errno, &mut out);
            s.write_all(&out).map_err(|e| e.to_string())?;
            continue;
        }
        let len = u64::from(req.len);
        let result = match req.cmd {
            Command::Read => {
                let mut data = vec![0u8; req.len as usize];
                cow.read(req.offset, &mut data).map(|()| Some(data))
            }
            Command::Write => {
                let d = &buf[req.data.clone().unwrap_or(0..0)];
                cow.write(req.offset, Some(d), len).map(|()| None)
            }
            Command::Trim | Command::WriteZeroes => cow.write(req.offset, None, len).map(|()| None),
            _ => Ok(None),
        };
        match result {
            Ok(data) => {
                encode_simple_reply(req.handle, 0, &mut out);
                if let Some(d) = data {
                    out.extend_from_slice(&d);
                }
            }
            Err(e) => {
                tracing::warn!("drill clone: {e}");
                encode_simple_reply(req.handle, EIO, &mut out);
            }
        }
        s.write_all(&out).map_err(|e| e.to_string())?;
    }
}
