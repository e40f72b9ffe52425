//! An independent, strict NBD client, written from the NBD protocol specification
//! (NetworkBlockDevice/nbd `doc/proto.md`).
//!
//! Integration tests use it next to qemu-io as a second client, so it checks everything the
//! server sends: every magic, every option-reply echo and length, every information item,
//! the transmission flags' mandatory relations, and every reply handle (a reply for a handle
//! that is not in flight is an error). It negotiates fixed newstyle with `NBD_OPT_GO`
//! (falling back to `NBD_OPT_EXPORT_NAME` on `NBD_REP_ERR_UNSUP`) and never negotiates
//! structured replies, so every transmission reply must be a simple reply.
//!
//! After a protocol violation or an I/O error in the transmission phase the connection is
//! unusable (the byte stream can no longer be trusted) and every later call fails.
//!
//! The negotiation phase (greeting, options, `list_exports_unix`, `probe_option_unix`)
//! lives in `nbd_negotiate.rs`; this file is the transmission phase.
//!
//! Requests are sent with blocking writes: a server must keep reading requests while it has
//! replies pending (every real server does; a request is at most 32 MiB).

use std::collections::{HashMap, VecDeque};
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream, ToSocketAddrs};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use crate::nbd_negotiate::{io_err, opt_export_name, opt_go, protocol, Conn, Wire};
use crate::nbd_proto::*;

pub use crate::nbd_negotiate::{list_exports_unix, probe_option_unix};

/// The default socket timeout: long enough for a flush on a slow disk, short enough that a
/// hung server fails a test instead of hanging it.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(120);

/// The maximum payload the spec says every server supports, used when none is advertised.
const DEFAULT_MAX_PAYLOAD: u32 = 1 << 25;
/// Multiplier turning the handle counter into handles that use all 64 bits (odd, so the map
/// is a bijection and handles never repeat): a server that truncates or byte-swaps handles
/// is caught as "unknown handle".
const HANDLE_MULT: u64 = 0x9e37_79b9_7f4a_7c15;

/// Errors of the NBD client.
#[derive(Debug, thiserror::Error)]
pub enum NbdClientError {
    /// A socket error other than end-of-file or a timeout.
    #[error("I/O error talking to the NBD server: {0}")]
    Io(#[from] io::Error),
    /// The server did not answer within the socket timeout.
    #[error("timed out waiting for the NBD server ({0})")]
    Timeout(String),
    /// The server closed the connection unexpectedly.
    #[error("the NBD server closed the connection {0}")]
    Closed(String),
    /// The server violated the protocol (bad magic, unknown handle, bad lengths, ...).
    #[error("NBD protocol violation by the server: {0}")]
    Protocol(String),
    /// The server answered an option with an error reply (`code` is the `NBD_REP_ERR_*`).
    #[error("{}", refusal_text(.option, .code, .export, .message))]
    OptionRefused {
        /// The option that was refused.
        option: u32,
        /// The `NBD_REP_ERR_*` reply type.
        code: u32,
        /// The export the option named, if any.
        export: Option<String>,
        /// The server's message (may be empty).
        message: String,
    },
    /// The request needs a feature the server did not advertise.
    #[error("the server did not advertise {0}")]
    Unsupported(&'static str),
    /// The caller asked for something the protocol forbids (checked before sending).
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    /// A command that has no error channel in its signature (flush) failed on the server.
    #[error("{command} failed on the server with {}", errno_name(*.errno))]
    Command {
        /// The command's name.
        command: String,
        /// The NBD error value.
        errno: u32,
    },
    /// An earlier error left the connection in an unknown state.
    #[error("the NBD connection is unusable after an earlier error")]
    Poisoned,
}

fn refusal_text(option: &u32, code: &u32, export: &Option<String>, message: &str) -> String {
    let mut s = match (export, *code) {
        (Some(e), NBD_REP_ERR_UNKNOWN) => format!("export {e:?} unknown (NBD_REP_ERR_UNKNOWN)"),
        (Some(e), c) => format!(
            "{} for export {e:?} refused ({})",
            option_name(*option),
            reply_type_name(c)
        ),
        (None, c) => format!("{} refused ({})", option_name(*option), reply_type_name(c)),
    };
    if !message.is_empty() {
        s.push_str(&format!(": server says {message:?}"));
    }
    s
}

type Result<T> = std::result::Result<T, NbdClientError>;

/// A reply as returned by [`NbdClient::wait_reply`]: the handle, then the data of a
/// successful read, `None` for other successful commands, or the server's NBD error value.
pub type Reply = (u64, std::result::Result<Option<Vec<u8>>, u32>);

/// A request in flight: what the reply must look like.
#[derive(Clone, Copy)]
struct Pending {
    command: u16,
    len: u32,
}

/// A connected NBD client in the transmission phase. See the module documentation.
pub struct NbdClient {
    wire: Wire,
    size: u64,
    flags: u16,
    block_size: Option<(u32, u32, u32)>,
    counter: u64,
    in_flight: HashMap<u64, Pending>,
    early: VecDeque<Reply>,
    check_requests: bool,
    poisoned: bool,
    sendbuf: Vec<u8>,
}

impl NbdClient {
    /// Connects to a Unix socket and negotiates `export`.
    pub fn connect_unix(path: &Path, export: &str) -> Result<NbdClient> {
        let s = UnixStream::connect(path)?;
        Self::negotiate(Conn::Unix(s), export)
    }

    /// Connects to `HOST:PORT` over TCP (with `TCP_NODELAY`) and negotiates `export`.
    pub fn connect_tcp(addr: &str, export: &str) -> Result<NbdClient> {
        let mut last = None;
        for a in addr.to_socket_addrs()? {
            match TcpStream::connect_timeout(&a, DEFAULT_TIMEOUT) {
                Ok(s) => {
                    // Requests are small and latency-bound: never wait for Nagle.
                    s.set_nodelay(true)?;
                    return Self::negotiate(Conn::Tcp(s), export);
                }
                Err(e) => last = Some(e),
            }
        }
        Err(last.map(NbdClientError::Io).unwrap_or_else(|| {
            NbdClientError::InvalidRequest(format!("{addr:?} resolves to no address"))
        }))
    }

    fn negotiate(conn: Conn, export: &str) -> Result<NbdClient> {
        let mut wire = Wire::new(conn)?;
        let no_zeroes = wire.handshake()?;
        let info = match opt_go(&mut wire, export) {
            Ok(Some(info)) => info,
            Ok(None) => opt_export_name(&mut wire, export, no_zeroes)?,
            Err(e @ NbdClientError::OptionRefused { .. }) => {
                wire.abort();
                return Err(e);
            }
            Err(e) => return Err(e),
        };
        let (size, flags) = info.export.unwrap_or_default();
        Ok(NbdClient {
            wire,
            size,
            flags,
            block_size: info.block_size,
            counter: 0,
            in_flight: HashMap::new(),
            early: VecDeque::new(),
            check_requests: true,
            poisoned: false,
            sendbuf: Vec::new(),
        })
    }

    /// The export size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The transmission flags (`NBD_FLAG_*`).
    pub fn transmission_flags(&self) -> u16 {
        self.flags
    }

    /// Whether the server marked the export read-only.
    pub fn read_only(&self) -> bool {
        self.flags & NBD_FLAG_READ_ONLY != 0
    }

    /// (minimum, preferred, maximum payload) from `NBD_INFO_BLOCK_SIZE`, if the server sent it.
    pub fn block_size(&self) -> Option<(u32, u32, u32)> {
        self.block_size
    }

    /// Number of requests sent whose replies have not been read yet.
    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// Sets the socket timeout for every later send and receive (`None`: wait forever).
    pub fn set_timeout(&mut self, timeout: Option<Duration>) -> Result<()> {
        Ok(self.wire.w.set_timeout(timeout)?)
    }

    /// Turns the client-side request checks on (the default) or off. The checks refuse what
    /// the protocol forbids a client to send: commands and FUA the server did not advertise,
    /// zero lengths, ranges beyond the export, misalignment to the advertised minimum block
    /// size, payloads above the maximum. Off, such requests are sent as asked, so tests can
    /// check how a server handles them; replies are still checked strictly.
    pub fn set_check_requests(&mut self, on: bool) {
        self.check_requests = on;
    }

    fn need_flag(&self, flag: u16, what: &'static str) -> Result<()> {
        if self.check_requests && self.flags & flag == 0 {
            return Err(NbdClientError::Unsupported(what));
        }
        Ok(())
    }

    fn check_range(&self, what: &str, offset: u64, len: u32, payload: bool) -> Result<()> {
        if !self.check_requests {
            return Ok(());
        }
        let bad = |why: String| {
            Err(NbdClientError::InvalidRequest(format!(
                "{what} {offset}+{len}: {why}"
            )))
        };
        if len == 0 {
            return bad("zero length".into());
        }
        if offset
            .checked_add(u64::from(len))
            .is_none_or(|end| end > self.size)
        {
            return bad(format!("beyond the export size {}", self.size));
        }
        let (min, max) = self
            .block_size
            .map_or((1, DEFAULT_MAX_PAYLOAD), |(a, _, c)| (a, c));
        if !offset.is_multiple_of(u64::from(min)) || !len.is_multiple_of(min) {
            return bad(format!("not aligned to the minimum block size {min}"));
        }
        if payload && len > max {
            return bad(format!("longer than the maximum payload {max}"));
        }
        Ok(())
    }

    fn usable(&self) -> Result<()> {
        if self.poisoned {
            return Err(NbdClientError::Poisoned);
        }
        Ok(())
    }

    /// Marks the connection unusable when `r` is an error that desynchronised the stream.
    fn poison_on<T>(&mut self, r: Result<T>) -> Result<T> {
        if let Err(e) = &r {
            if !matches!(
                e,
                NbdClientError::InvalidRequest(_) | NbdClientError::Unsupported(_)
            ) {
                self.poisoned = true;
            }
        }
        r
    }

    fn submit(
        &mut self,
        flags: u16,
        command: u16,
        offset: u64,
        len: u32,
        data: &[u8],
    ) -> Result<u64> {
        self.usable()?;
        self.counter += 1;
        let handle = self.counter.wrapping_mul(HANDLE_MULT);
        self.sendbuf.clear();
        self.sendbuf
            .extend_from_slice(&encode_request(flags, command, handle, offset, len));
        self.sendbuf.extend_from_slice(data);
        let ctx = format!("sending {}", command_name(command));
        let r = self
            .wire
            .w
            .write_all(&self.sendbuf)
            .map_err(|e| io_err(e, &ctx));
        self.poison_on(r)?;
        self.in_flight.insert(handle, Pending { command, len });
        Ok(handle)
    }

    /// Sends a read; the reply carries `len` bytes.
    pub fn submit_read(&mut self, offset: u64, len: u32) -> Result<u64> {
        self.check_range("read", offset, len, true)?;
        self.submit(0, NBD_CMD_READ, offset, len, &[])
    }

    /// Sends a write of `data` at `offset`, with FUA if asked.
    pub fn submit_write(&mut self, offset: u64, data: &[u8], fua: bool) -> Result<u64> {
        let len = u32::try_from(data.len())
            .map_err(|_| NbdClientError::InvalidRequest("write longer than 4 GiB".into()))?;
        self.check_range("write", offset, len, true)?;
        let flags = self.fua_flag(fua)?;
        self.submit(flags, NBD_CMD_WRITE, offset, len, data)
    }

    fn fua_flag(&self, fua: bool) -> Result<u16> {
        if !fua {
            return Ok(0);
        }
        self.need_flag(NBD_FLAG_SEND_FUA, "NBD_FLAG_SEND_FUA")?;
        Ok(NBD_CMD_FLAG_FUA)
    }

    /// Sends a flush.
    pub fn submit_flush(&mut self) -> Result<u64> {
        self.need_flag(NBD_FLAG_SEND_FLUSH, "NBD_FLAG_SEND_FLUSH")?;
        self.submit(0, NBD_CMD_FLUSH, 0, 0, &[])
    }

    /// Sends a trim.
    pub fn submit_trim(&mut self, offset: u64, len: u32) -> Result<u64> {
        self.need_flag(NBD_FLAG_SEND_TRIM, "NBD_FLAG_SEND_TRIM")?;
        self.check_range("trim", offset, len, false)?;
        self.submit(0, NBD_CMD_TRIM, offset, len, &[])
    }

    /// Sends a write-zeroes (the server may punch a hole: `NBD_CMD_FLAG_NO_HOLE` is not set).
    pub fn submit_write_zeroes(&mut self, offset: u64, len: u32, fua: bool) -> Result<u64> {
        self.need_flag(NBD_FLAG_SEND_WRITE_ZEROES, "NBD_FLAG_SEND_WRITE_ZEROES")?;
        self.check_range("write-zeroes", offset, len, false)?;
        let flags = self.fua_flag(fua)?;
        self.submit(flags, NBD_CMD_WRITE_ZEROES, offset, len, &[])
    }

    /// Reads the next reply off the socket, checking magic and handle.
    fn read_reply(&mut self) -> Result<Reply> {
        self.usable()?;
        if self.in_flight.is_empty() {
            return Err(NbdClientError::InvalidRequest(
                "waiting for a reply with nothing in flight".into(),
            ));
        }
        let r = self.read_reply_inner();
        self.poison_on(r)
    }

    fn read_reply_inner(&mut self) -> Result<Reply> {
        let ctx = format!(
            "while waiting for a reply ({} in flight)",
            self.in_flight.len()
        );
        let mut hdr = [0u8; SIMPLE_REPLY_LEN];
        self.wire.read_exact(&mut hdr, &ctx)?;
        let (magic, error, handle) = decode_simple_reply(&hdr);
        if magic == NBD_STRUCTURED_REPLY_MAGIC {
            return protocol("structured reply chunk, but structured replies were not negotiated");
        }
        if magic != NBD_SIMPLE_REPLY_MAGIC {
            return protocol(format!(
                "bad reply magic 0x{magic:08x} (expected 0x{NBD_SIMPLE_REPLY_MAGIC:08x})"
            ));
        }
        let Some(p) = self.in_flight.remove(&handle) else {
            return protocol(format!(
                "reply for unknown handle 0x{handle:016x} ({} in flight)",
                self.in_flight.len()
            ));
        };
        if error != 0 {
            // A simple reply with an error carries no payload, even for a read.
            return Ok((handle, Err(error)));
        }
        if p.command != NBD_CMD_READ {
            return Ok((handle, Ok(None)));
        }
        let mut data = vec![0u8; p.len as usize];
        self.wire.read_exact(
            &mut data,
            &format!("while reading {} bytes of read data", p.len),
        )?;
        Ok((handle, Ok(Some(data))))
    }

    /// The next reply, in the order the server sent it (replies that a synchronous call read
    /// while waiting for its own come first).
    pub fn wait_reply(&mut self) -> Result<Reply> {
        if let Some(r) = self.early.pop_front() {
            return Ok(r);
        }
        self.read_reply()
    }

    /// Waits for the reply to `handle`, keeping other replies for `wait_reply`.
    fn wait_for(&mut self, handle: u64) -> Result<std::result::Result<Option<Vec<u8>>, u32>> {
        loop {
            let (h, r) = self.read_reply()?;
            if h == handle {
                return Ok(r);
            }
            self.early.push_back((h, r));
        }
    }

    /// Reads `len` bytes at `offset`; the inner error is the server's NBD error value.
    pub fn read(&mut self, offset: u64, len: u32) -> Result<std::result::Result<Vec<u8>, u32>> {
        let h = self.submit_read(offset, len)?;
        Ok(self.wait_for(h)?.map(Option::unwrap_or_default))
    }

    /// Writes `data` at `offset`; the inner error is the server's NBD error value.
    pub fn write(
        &mut self,
        offset: u64,
        data: &[u8],
        fua: bool,
    ) -> Result<std::result::Result<(), u32>> {
        let h = self.submit_write(offset, data, fua)?;
        Ok(self.wait_for(h)?.map(drop))
    }

    /// Flushes; a server error becomes [`NbdClientError::Command`].
    pub fn flush(&mut self) -> Result<()> {
        let h = self.submit_flush()?;
        self.wait_for(h)?
            .map(drop)
            .map_err(|errno| NbdClientError::Command {
                command: "NBD_CMD_FLUSH".into(),
                errno,
            })
    }

    /// Trims; the inner error is the server's NBD error value.
    pub fn trim(&mut self, offset: u64, len: u32) -> Result<std::result::Result<(), u32>> {
        let h = self.submit_trim(offset, len)?;
        Ok(self.wait_for(h)?.map(drop))
    }

    /// Writes zeroes; the inner error is the server's NBD error value.
    pub fn write_zeroes(
        &mut self,
        offset: u64,
        len: u32,
        fua: bool,
    ) -> Result<std::result::Result<(), u32>> {
        let h = self.submit_write_zeroes(offset, len, fua)?;
        Ok(self.wait_for(h)?.map(drop))
    }

    /// Soft disconnect: reads (and checks) the replies still in flight, sends `NBD_CMD_DISC`,
    /// and waits for the server to close the connection without sending anything more (a
    /// server that keeps it open fails this with a timeout after the socket timeout). On a
    /// connection already unusable after an error, just closes it.
    pub fn disconnect(mut self) -> Result<()> {
        if self.poisoned {
            let _ = self.wire.w.shutdown(Shutdown::Both);
            return Ok(());
        }
        while !self.in_flight.is_empty() {
            // Checked like any reply; the caller chose not to look at the results.
            let (_handle, _result) = self.read_reply()?;
        }
        let disc = encode_request(0, NBD_CMD_DISC, 0, 0, 0);
        self.wire.write_all(&disc, "sending NBD_CMD_DISC")?;
        let _ = self.wire.w.shutdown(Shutdown::Write);
        let mut buf = [0u8; 512];
        match self.wire.r.read(&mut buf) {
            Ok(0) => Ok(()),
            Ok(n) => protocol(format!("{n} bytes received after NBD_CMD_DISC")),
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => Ok(()),
            Err(e) => Err(io_err(
                e,
                "waiting for the server to close after NBD_CMD_DISC",
            )),
        }
    }

    /// Sends `bytes` as they are (protocol-abuse tests). The client does not track what they
    /// contain: read the answer with [`NbdClient::recv_raw`], or register a well-formed raw
    /// request with [`NbdClient::track_raw_request`] so `wait_reply` accepts its reply.
    pub fn send_raw(&mut self, bytes: &[u8]) -> Result<()> {
        self.usable()?;
        let r = self.wire.write_all(bytes, "sending raw bytes");
        self.poison_on(r)
    }

    /// Reads raw bytes until `max` bytes arrived or the server closed the connection (an
    /// empty or short result means it closed). Times out with the socket timeout.
    pub fn recv_raw(&mut self, max: usize) -> Result<Vec<u8>> {
        let mut out = Vec::with_capacity(max);
        let r = (&mut self.wire.r).take(max as u64).read_to_end(&mut out);
        match r {
            Ok(_) => Ok(out),
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => Ok(out),
            Err(e) => Err(io_err(e, "while receiving raw bytes")),
        }
    }

    /// Declares that a request with `handle` was sent with `send_raw`, so that
    /// `wait_reply` accepts (and checks) its reply; `len` is the read length for reads.
    pub fn track_raw_request(&mut self, handle: u64, command: u16, len: u32) {
        self.in_flight.insert(handle, Pending { command, len });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_server::{Config, Fault, ReplyOrder, TestServer};

    fn start(cfg: Config) -> (TestServer, NbdClient) {
        let srv = TestServer::start(cfg);
        let mut c = NbdClient::connect_unix(srv.path(), "vol").unwrap();
        c.set_timeout(Some(Duration::from_secs(10))).unwrap();
        (srv, c)
    }

    fn pattern(tag: u8, len: usize) -> Vec<u8> {
        (0..len).map(|i| tag ^ (i as u8).wrapping_mul(31)).collect()
    }

    #[test]
    fn go_reports_size_flags_and_block_size() {
        let (_srv, c) = start(Config::default());
        assert_eq!(c.size(), 16 << 20);
        assert_eq!(c.block_size(), Some((512, 4096, 1 << 20)));
        assert!(!c.read_only());
        assert_ne!(c.transmission_flags() & NBD_FLAG_SEND_TRIM, 0);
        c.disconnect().unwrap();
    }

    #[test]
    fn unknown_export_is_named() {
        let srv = TestServer::start(Config::default());
        let e = NbdClient::connect_unix(srv.path(), "nope").err().unwrap();
        assert!(
            matches!(
                e,
                NbdClientError::OptionRefused {
                    code: NBD_REP_ERR_UNKNOWN,
                    ..
                }
            ),
            "{e:?}"
        );
        let msg = e.to_string();
        assert!(
            msg.contains("export \"nope\" unknown (NBD_REP_ERR_UNKNOWN)"),
            "{msg}"
        );
        assert!(msg.contains("no such export"), "{msg}");
    }

    #[test]
    fn falls_back_to_export_name_with_and_without_zeroes() {
        for hflags in [
            NBD_FLAG_FIXED_NEWSTYLE,
            NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES,
        ] {
            let (srv, mut c) = start(Config {
                go_supported: false,
                hflags,
                ..Config::default()
            });
            assert_eq!(c.size(), 16 << 20);
            assert_eq!(c.block_size(), None);
            let data = pattern(7, 8192);
            assert_eq!(c.write(4096, &data, false).unwrap(), Ok(()));
            assert_eq!(c.read(4096, 8192).unwrap(), Ok(data));
            c.disconnect().unwrap();
            // EXPORT_NAME cannot report errors: the server hangs up.
            let e = NbdClient::connect_unix(srv.path(), "nope").err().unwrap();
            assert!(matches!(e, NbdClientError::Closed(_)), "{e:?}");
        }
    }

    #[test]
    fn pipelined_writes_then_reads() {
        let (srv, mut c) = start(Config {
            order: ReplyOrder::ReverseAvailable,
            ..Config::default()
        });
        let mut writes = HashMap::new();
        for i in 0..8u64 {
            let h = c
                .submit_write(i * 65536, &pattern(i as u8, 65536), i % 2 == 0)
                .unwrap();
            writes.insert(h, i);
        }
        while !writes.is_empty() {
            let (h, r) = c.wait_reply().unwrap();
            assert_eq!(r, Ok(None));
            writes.remove(&h).expect("each write acknowledged once");
        }
        let mut reads = HashMap::new();
        for i in 0..8u64 {
            reads.insert(c.submit_read(i * 65536, 65536).unwrap(), i);
        }
        assert_eq!(c.in_flight(), 8);
        for _ in 0..8 {
            let (h, r) = c.wait_reply().unwrap();
            let i = reads.remove(&h).unwrap();
            assert_eq!(r, Ok(Some(pattern(i as u8, 65536))));
        }
        let fua: Vec<bool> = srv
            .seen
            .lock()
            .unwrap()
            .iter()
            .filter(|s| s.command == NBD_CMD_WRITE)
            .map(|s| s.flags & NBD_CMD_FLAG_FUA != 0)
            .collect();
        assert_eq!(fua, [true, false, true, false, true, false, true, false]);
        c.disconnect().unwrap();
    }

    #[test]
    fn out_of_order_replies_are_matched_by_handle() {
        let (srv, mut c) = start(Config {
            order: ReplyOrder::ReverseBatch(8),
            ..Config::default()
        });
        for i in 0..8usize {
            srv.disk.lock().unwrap()[i * 4096..(i + 1) * 4096]
                .copy_from_slice(&pattern(i as u8, 4096));
        }
        let handles: Vec<u64> = (0..8u64)
            .map(|i| c.submit_read(i * 4096, 4096).unwrap())
            .collect();
        for i in (0..8usize).rev() {
            let (h, r) = c.wait_reply().unwrap();
            assert_eq!(h, handles[i], "the server answers newest first");
            assert_eq!(r, Ok(Some(pattern(i as u8, 4096))));
        }
    }

    #[test]
    fn synchronous_calls_keep_other_replies_for_wait_reply() {
        // In order: the two writes' replies arrive before the read's.
        let (_srv, mut c) = start(Config::default());
        let a = c.submit_write(0, &pattern(1, 4096), false).unwrap();
        let b = c.submit_write(4096, &pattern(2, 4096), false).unwrap();
        assert_eq!(
            c.read(0, 8192).unwrap().unwrap()[4096..],
            pattern(2, 4096)[..]
        );
        assert_eq!(c.wait_reply().unwrap(), (a, Ok(None)));
        assert_eq!(c.wait_reply().unwrap(), (b, Ok(None)));
        // Reversed: the read's reply comes first, the others after it.
        let (_srv, mut c) = start(Config {
            order: ReplyOrder::ReverseBatch(3),
            ..Config::default()
        });
        let a = c.submit_write(0, &pattern(3, 4096), false).unwrap();
        let b = c.submit_write(4096, &pattern(4, 4096), false).unwrap();
        assert_eq!(c.read(8192, 4096).unwrap(), Ok(vec![0u8; 4096]));
        assert_eq!(c.wait_reply().unwrap(), (b, Ok(None)));
        assert_eq!(c.wait_reply().unwrap(), (a, Ok(None)));
        let e = c.wait_reply().unwrap_err();
        assert!(matches!(e, NbdClientError::InvalidRequest(_)), "{e:?}");
    }

    #[test]
    fn bad_reply_magic_is_an_error_and_poisons() {
        let (_srv, mut c) = start(Config {
            fault: Fault::BadMagic(1),
            ..Config::default()
        });
        assert_eq!(c.write(0, &pattern(1, 4096), false).unwrap(), Ok(()));
        let e = c.write(0, &pattern(1, 4096), false).unwrap_err();
        assert!(e.to_string().contains("bad reply magic 0x27446698"), "{e}");
        assert!(matches!(c.read(0, 4096), Err(NbdClientError::Poisoned)));
    }

    #[test]
    fn unknown_handle_is_an_error() {
        let (_srv, mut c) = start(Config {
            fault: Fault::UnknownHandle(0),
            ..Config::default()
        });
        let e = c.flush().unwrap_err();
        assert!(e.to_string().contains("unknown handle"), "{e}");
    }

    #[test]
    fn structured_reply_without_negotiation_is_an_error() {
        let (_srv, mut c) = start(Config {
            fault: Fault::Structured(0),
            ..Config::default()
        });
        let e = c.read(0, 4096).unwrap_err();
        assert!(
            e.to_string()
                .contains("structured replies were not negotiated"),
            "{e}"
        );
    }

    #[test]
    fn bytes_after_a_reply_are_caught_as_bad_magic() {
        let (_srv, mut c) = start(Config {
            fault: Fault::TrailingGarbage(0),
            ..Config::default()
        });
        assert_eq!(c.trim(0, 4096).unwrap(), Ok(()));
        let e = c.read(0, 4096).unwrap_err();
        assert!(e.to_string().contains("bad reply magic 0xeeeeeeee"), "{e}");
    }

    #[test]
    fn read_error_has_no_payload_and_keeps_the_stream() {
        let (_srv, mut c) = start(Config {
            read_error_at: Some(8192),
            ..Config::default()
        });
        assert_eq!(c.write(0, &pattern(9, 4096), false).unwrap(), Ok(()));
        assert_eq!(c.read(8192, 65536).unwrap(), Err(NBD_EIO));
        assert_eq!(c.read(0, 4096).unwrap(), Ok(pattern(9, 4096)));
    }

    #[test]
    fn trim_and_write_zeroes() {
        let (srv, mut c) = start(Config::default());
        assert_eq!(c.write(0, &pattern(5, 16384), true).unwrap(), Ok(()));
        assert_eq!(c.trim(0, 4096).unwrap(), Ok(()));
        assert_eq!(c.write_zeroes(8192, 4096, true).unwrap(), Ok(()));
        c.flush().unwrap();
        let got = c.read(0, 16384).unwrap().unwrap();
        assert_eq!(got[..4096], [0u8; 4096]);
        assert_eq!(got[4096..8192], pattern(5, 16384)[4096..8192]);
        assert_eq!(got[8192..12288], [0u8; 4096]);
        let seen = srv.seen.lock().unwrap().clone();
        let wz = seen
            .iter()
            .find(|s| s.command == NBD_CMD_WRITE_ZEROES)
            .unwrap();
        assert_eq!(
            (wz.flags, wz.offset, wz.len),
            (NBD_CMD_FLAG_FUA, 8192, 4096)
        );
        let fl = seen.iter().find(|s| s.command == NBD_CMD_FLUSH).unwrap();
        assert_eq!((fl.flags, fl.offset, fl.len), (0, 0, 0));
    }

    #[test]
    fn requests_are_checked_before_sending() {
        let (_srv, mut c) = start(Config::default());
        let invalid = |r: Result<u64>| matches!(r, Err(NbdClientError::InvalidRequest(_)));
        assert!(invalid(c.submit_read(100, 512)), "misaligned offset");
        assert!(invalid(c.submit_read(0, 100)), "misaligned length");
        assert!(invalid(c.submit_read(0, 0)), "zero length");
        assert!(
            invalid(c.submit_read((16 << 20) - 512, 1024)),
            "beyond the end"
        );
        assert!(
            invalid(c.submit_read(u64::MAX - 511, 512)),
            "offset overflow"
        );
        assert!(
            invalid(c.submit_write(0, &vec![0; (1 << 20) + 512], false)),
            "above max payload"
        );
        assert!(
            !invalid(c.submit_trim(0, 2 << 20)),
            "trims may exceed the max payload"
        );
        assert_eq!(c.wait_reply().unwrap().1, Ok(None));
        // Unchecked, the server's answer is what the test sees.
        c.set_check_requests(false);
        assert_eq!(c.read(16 << 20, 4096).unwrap(), Err(NBD_EINVAL));

        let flags = NBD_FLAG_HAS_FLAGS | NBD_FLAG_READ_ONLY;
        let (_srv, mut c) = start(Config {
            tflags: flags,
            ..Config::default()
        });
        assert!(c.read_only());
        assert!(matches!(
            c.submit_flush(),
            Err(NbdClientError::Unsupported("NBD_FLAG_SEND_FLUSH"))
        ));
        assert!(matches!(
            c.submit_write(0, &[0; 512], true),
            Err(NbdClientError::Unsupported("NBD_FLAG_SEND_FUA"))
        ));
        assert!(matches!(
            c.submit_trim(0, 512),
            Err(NbdClientError::Unsupported(_))
        ));
        assert!(matches!(
            c.submit_write_zeroes(0, 512, false),
            Err(NbdClientError::Unsupported(_))
        ));
    }

    #[test]
    fn disconnect_drains_in_flight_requests() {
        let (srv, mut c) = start(Config {
            order: ReplyOrder::ReverseAvailable,
            ..Config::default()
        });
        c.submit_write(0, &pattern(1, 4096), false).unwrap();
        c.submit_write(4096, &pattern(2, 4096), false).unwrap();
        c.disconnect().unwrap();
        assert_eq!(srv.disk.lock().unwrap()[4096..8192], pattern(2, 4096)[..]);
        assert_eq!(
            srv.seen.lock().unwrap().last().unwrap().command,
            NBD_CMD_DISC
        );
    }

    #[test]
    fn negotiation_checks_what_the_server_sends() {
        let cases = [
            (
                Config {
                    hflags: 0,
                    ..Config::default()
                },
                "NBD_FLAG_FIXED_NEWSTYLE",
            ),
            (
                Config {
                    tflags: NBD_FLAG_SEND_FLUSH,
                    ..Config::default()
                },
                "NBD_FLAG_HAS_FLAGS",
            ),
            (
                Config {
                    tflags: NBD_FLAG_HAS_FLAGS | NBD_FLAG_SEND_DF,
                    ..Config::default()
                },
                "SEND_DF",
            ),
            (
                Config {
                    tflags: NBD_FLAG_HAS_FLAGS | NBD_FLAG_SEND_FAST_ZERO,
                    ..Config::default()
                },
                "FAST_ZERO",
            ),
            (
                Config {
                    block_size: Some((3, 4096, 1 << 20)),
                    ..Config::default()
                },
                "minimum",
            ),
            (
                Config {
                    block_size: Some((512, 256, 1 << 20)),
                    ..Config::default()
                },
                "preferred",
            ),
            (
                Config {
                    block_size: Some((512, 4096, 2048)),
                    ..Config::default()
                },
                "maximum",
            ),
            (
                Config {
                    go_supported: false,
                    tflags: 0,
                    ..Config::default()
                },
                "NBD_FLAG_HAS_FLAGS",
            ),
        ];
        for (cfg, want) in cases {
            let srv = TestServer::start(cfg);
            let e = NbdClient::connect_unix(srv.path(), "vol").err().unwrap();
            assert!(
                matches!(e, NbdClientError::Protocol(_)) && e.to_string().contains(want),
                "{want}: {e}"
            );
        }
    }

    #[test]
    fn list_and_probe_options() {
        let srv = TestServer::start(Config {
            exports: vec!["vol".into(), "other".into()],
            ..Config::default()
        });
        assert_eq!(list_exports_unix(srv.path()).unwrap(), ["vol", "other"]);
        assert_eq!(
            probe_option_unix(srv.path(), NBD_OPT_LIST, &[]).unwrap(),
            [NBD_REP_SERVER, NBD_REP_SERVER, NBD_REP_ACK]
        );
        assert_eq!(
            probe_option_unix(srv.path(), 99, b"junk").unwrap(),
            [NBD_REP_ERR_UNSUP]
        );
        assert_eq!(
            probe_option_unix(srv.path(), NBD_OPT_ABORT, &[]).unwrap(),
            [NBD_REP_ACK]
        );
        let mut go = 3u32.to_be_bytes().to_vec();
        go.extend_from_slice(b"vol");
        go.extend_from_slice(&0u16.to_be_bytes());
        assert_eq!(
            probe_option_unix(srv.path(), NBD_OPT_GO, &go).unwrap(),
            [NBD_REP_INFO, NBD_REP_INFO, NBD_REP_ACK]
        );
        assert!(
            srv.saw_command(NBD_CMD_DISC),
            "a successful GO probe disconnects cleanly"
        );
        let mut info = 4u32.to_be_bytes().to_vec();
        info.extend_from_slice(b"nope");
        info.extend_from_slice(&0u16.to_be_bytes());
        assert_eq!(
            probe_option_unix(srv.path(), NBD_OPT_INFO, &info).unwrap(),
            [NBD_REP_ERR_UNKNOWN]
        );
        assert!(probe_option_unix(srv.path(), NBD_OPT_EXPORT_NAME, b"vol").is_err());
    }

    #[test]
    fn raw_requests() {
        let (srv, mut c) = start(Config::default());
        srv.disk.lock().unwrap()[..512].copy_from_slice(&pattern(4, 512));
        c.send_raw(&encode_request(0, NBD_CMD_READ, 0x1234, 0, 512))
            .unwrap();
        let raw = c.recv_raw(16 + 512).unwrap();
        let (magic, error, handle) = decode_simple_reply(raw[..16].try_into().unwrap());
        assert_eq!((magic, error, handle), (NBD_SIMPLE_REPLY_MAGIC, 0, 0x1234));
        assert_eq!(raw[16..], pattern(4, 512)[..]);
        // A tracked raw request is checked by wait_reply like any other.
        c.send_raw(&encode_request(0, NBD_CMD_READ, 0x5678, 0, 512))
            .unwrap();
        c.track_raw_request(0x5678, NBD_CMD_READ, 512);
        assert_eq!(c.wait_reply().unwrap(), (0x5678, Ok(Some(pattern(4, 512)))));
        // Garbage: this server hangs up, which recv_raw reports as a short (empty) read.
        c.send_raw(&[0xff; 28]).unwrap();
        assert_eq!(c.recv_raw(16).unwrap(), Vec::<u8>::new());
    }
}
