//! The negotiation phase of the NBD client: the socket wrapper, the greeting, options and
//! their replies (every magic, option echo, length and information item is checked), and
//! the negotiation-only helpers `list_exports_unix` / `probe_option_unix`.

use std::io::{self, BufReader, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use crate::nbd_client::{NbdClientError, DEFAULT_TIMEOUT};
use crate::nbd_proto::*;

/// Largest option reply accepted during negotiation (strings are at most 4096 bytes).
const MAX_OPTION_REPLY: u32 = 1 << 20;

type Result<T> = std::result::Result<T, NbdClientError>;

/// The two socket kinds, behind one Read/Write type.
pub(crate) enum Conn {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Conn {
    pub(crate) fn try_clone(&self) -> io::Result<Conn> {
        Ok(match self {
            Conn::Unix(s) => Conn::Unix(s.try_clone()?),
            Conn::Tcp(s) => Conn::Tcp(s.try_clone()?),
        })
    }
    pub(crate) fn set_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Conn::Unix(s) => {
                s.set_read_timeout(t)?;
                s.set_write_timeout(t)
            }
            Conn::Tcp(s) => {
                s.set_read_timeout(t)?;
                s.set_write_timeout(t)
            }
        }
    }
    pub(crate) fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        match self {
            Conn::Unix(s) => s.shutdown(how),
            Conn::Tcp(s) => s.shutdown(how),
        }
    }
}

impl Read for Conn {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Conn::Unix(s) => s.read(buf),
            Conn::Tcp(s) => s.read(buf),
        }
    }
}

impl Write for Conn {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Conn::Unix(s) => s.write(buf),
            Conn::Tcp(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            Conn::Unix(s) => s.flush(),
            Conn::Tcp(s) => s.flush(),
        }
    }
}

/// Maps an I/O error to the client error, naming what we were doing.
pub(crate) fn io_err(e: io::Error, ctx: &str) -> NbdClientError {
    match e.kind() {
        io::ErrorKind::UnexpectedEof => NbdClientError::Closed(ctx.to_string()),
        io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe => {
            NbdClientError::Closed(format!("{ctx} ({e})"))
        }
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
            NbdClientError::Timeout(ctx.to_string())
        }
        _ => NbdClientError::Io(e),
    }
}

pub(crate) fn protocol<T>(msg: impl Into<String>) -> Result<T> {
    Err(NbdClientError::Protocol(msg.into()))
}

/// A connection: buffered reads, unbuffered writes (every write is a whole message).
pub(crate) struct Wire {
    pub(crate) r: BufReader<Conn>,
    pub(crate) w: Conn,
}

impl Wire {
    pub(crate) fn new(conn: Conn) -> Result<Wire> {
        conn.set_timeout(Some(DEFAULT_TIMEOUT))?;
        let w = conn.try_clone()?;
        Ok(Wire {
            r: BufReader::with_capacity(128 * 1024, conn),
            w,
        })
    }
    pub(crate) fn read_exact(&mut self, buf: &mut [u8], ctx: &str) -> Result<()> {
        self.r.read_exact(buf).map_err(|e| io_err(e, ctx))
    }
    fn read_u16(&mut self, ctx: &str) -> Result<u16> {
        let mut b = [0u8; 2];
        self.read_exact(&mut b, ctx)?;
        Ok(u16::from_be_bytes(b))
    }
    fn read_u32(&mut self, ctx: &str) -> Result<u32> {
        let mut b = [0u8; 4];
        self.read_exact(&mut b, ctx)?;
        Ok(u32::from_be_bytes(b))
    }
    fn read_u64(&mut self, ctx: &str) -> Result<u64> {
        let mut b = [0u8; 8];
        self.read_exact(&mut b, ctx)?;
        Ok(u64::from_be_bytes(b))
    }
    pub(crate) fn write_all(&mut self, buf: &[u8], ctx: &str) -> Result<()> {
        self.w.write_all(buf).map_err(|e| io_err(e, ctx))
    }

    /// The server's greeting and our client flags. Returns whether NO_ZEROES is in effect.
    pub(crate) fn handshake(&mut self) -> Result<bool> {
        let magic = self.read_u64("during the greeting")?;
        if magic != NBD_MAGIC {
            return protocol(format!(
                "bad greeting magic 0x{magic:016x} (expected NBDMAGIC)"
            ));
        }
        let magic = self.read_u64("during the greeting")?;
        if magic == NBD_OLDSTYLE_MAGIC {
            return protocol("the server speaks the oldstyle handshake (not supported)");
        }
        if magic != NBD_IHAVEOPT {
            return protocol(format!(
                "bad newstyle magic 0x{magic:016x} (expected IHAVEOPT)"
            ));
        }
        let hflags = self.read_u16("during the greeting")?;
        if hflags & NBD_FLAG_FIXED_NEWSTYLE == 0 {
            return protocol("the server did not set NBD_FLAG_FIXED_NEWSTYLE");
        }
        // Unknown handshake flags are ignored, as the spec asks of clients.
        let no_zeroes = hflags & NBD_FLAG_NO_ZEROES != 0;
        let mut cflags = NBD_FLAG_C_FIXED_NEWSTYLE;
        if no_zeroes {
            cflags |= NBD_FLAG_C_NO_ZEROES;
        }
        self.write_all(&cflags.to_be_bytes(), "sending client flags")?;
        Ok(no_zeroes)
    }

    fn send_option(&mut self, option: u32, data: &[u8]) -> Result<()> {
        let len = u32::try_from(data.len())
            .map_err(|_| NbdClientError::InvalidRequest("option data too long".into()))?;
        let mut msg = Vec::with_capacity(16 + data.len());
        msg.extend_from_slice(&NBD_IHAVEOPT.to_be_bytes());
        msg.extend_from_slice(&option.to_be_bytes());
        msg.extend_from_slice(&len.to_be_bytes());
        msg.extend_from_slice(data);
        self.write_all(&msg, &format!("sending {}", option_name(option)))
    }

    /// Reads one option reply to `option`: (reply type, data).
    fn read_option_reply(&mut self, option: u32) -> Result<(u32, Vec<u8>)> {
        let ctx = format!("while waiting for the reply to {}", option_name(option));
        let magic = self.read_u64(&ctx)?;
        if magic != NBD_REP_MAGIC {
            return protocol(format!(
                "bad option reply magic 0x{magic:016x} in reply to {}",
                option_name(option)
            ));
        }
        let echoed = self.read_u32(&ctx)?;
        if echoed != option {
            return protocol(format!(
                "option reply names {} but {} was sent",
                option_name(echoed),
                option_name(option)
            ));
        }
        let rtype = self.read_u32(&ctx)?;
        let len = self.read_u32(&ctx)?;
        if len > MAX_OPTION_REPLY {
            return protocol(format!(
                "option reply of {len} bytes (limit {MAX_OPTION_REPLY})"
            ));
        }
        let mut data = vec![0u8; len as usize];
        self.read_exact(&mut data, &ctx)?;
        Ok((rtype, data))
    }

    /// Soft disconnect during negotiation: `NBD_OPT_ABORT`, then wait for the ACK or the
    /// close. Best effort: we are leaving anyway.
    pub(crate) fn abort(mut self) {
        if self.send_option(NBD_OPT_ABORT, &[]).is_ok() {
            let _ = self.read_option_reply(NBD_OPT_ABORT);
        }
        let _ = self.w.shutdown(Shutdown::Both);
    }
}

/// What `NBD_INFO_*` / `NBD_OPT_EXPORT_NAME` told us about the export.
#[derive(Default)]
pub(crate) struct ExportInfo {
    pub(crate) export: Option<(u64, u16)>,
    pub(crate) block_size: Option<(u32, u32, u32)>,
}

fn check_string(what: &str, bytes: &[u8]) -> Result<String> {
    if bytes.len() > 4096 {
        return protocol(format!("{what} longer than 4096 bytes"));
    }
    match std::str::from_utf8(bytes) {
        Ok(s) if !s.contains('\0') => Ok(s.to_string()),
        _ => protocol(format!(
            "{what} is not a valid NBD string (UTF-8 without NUL)"
        )),
    }
}

fn check_transmission_flags(flags: u16) -> Result<()> {
    if flags & NBD_FLAG_HAS_FLAGS == 0 {
        return protocol(format!(
            "transmission flags 0x{flags:04x} lack NBD_FLAG_HAS_FLAGS"
        ));
    }
    if flags & NBD_FLAG_SEND_DF != 0 {
        return protocol("NBD_FLAG_SEND_DF set although structured replies were not negotiated");
    }
    if flags & NBD_FLAG_SEND_FAST_ZERO != 0 && flags & NBD_FLAG_SEND_WRITE_ZEROES == 0 {
        return protocol("NBD_FLAG_SEND_FAST_ZERO set without NBD_FLAG_SEND_WRITE_ZEROES");
    }
    if flags & NBD_FLAG_BLOCK_STATUS_PAYLOAD != 0 {
        return protocol("NBD_FLAG_BLOCK_STATUS_PAYLOAD set without extended headers");
    }
    // Bits 13-15 are undefined: ignored, as the spec asks of clients.
    Ok(())
}

fn check_block_size(min: u32, pref: u32, max: u32) -> Result<()> {
    let bad = |why: &str| protocol(format!("NBD_INFO_BLOCK_SIZE ({min}, {pref}, {max}): {why}"));
    if !min.is_power_of_two() || min > 65536 {
        return bad("minimum must be a power of 2 no larger than 65536");
    }
    if !pref.is_power_of_two() || pref < min.max(512) {
        return bad("preferred must be a power of 2 at least max(minimum, 512)");
    }
    if max < pref {
        return bad("maximum payload smaller than the preferred block size");
    }
    Ok(())
}

/// Applies one `NBD_REP_INFO` item.
fn apply_info(info: &mut ExportInfo, data: &[u8]) -> Result<()> {
    if data.len() < 2 {
        return protocol(format!("NBD_REP_INFO of {} bytes", data.len()));
    }
    let itype = u16::from_be_bytes([data[0], data[1]]);
    let body = &data[2..];
    match itype {
        NBD_INFO_EXPORT => {
            if data.len() != 12 {
                return protocol(format!(
                    "NBD_INFO_EXPORT of length {} (must be 12)",
                    data.len()
                ));
            }
            let mut s = [0u8; 8];
            s.copy_from_slice(&body[0..8]);
            let v = (
                u64::from_be_bytes(s),
                u16::from_be_bytes([body[8], body[9]]),
            );
            check_transmission_flags(v.1)?;
            if info.export.is_some_and(|old| old != v) {
                return protocol("two different NBD_INFO_EXPORT items");
            }
            info.export = Some(v);
        }
        NBD_INFO_NAME => {
            check_string("NBD_INFO_NAME", body)?;
        }
        NBD_INFO_DESCRIPTION => {
            check_string("NBD_INFO_DESCRIPTION", body)?;
        }
        NBD_INFO_BLOCK_SIZE => {
            if data.len() != 14 {
                return protocol(format!(
                    "NBD_INFO_BLOCK_SIZE of length {} (must be 14)",
                    data.len()
                ));
            }
            let w = |i: usize| u32::from_be_bytes([body[i], body[i + 1], body[i + 2], body[i + 3]]);
            let v = (w(0), w(4), w(8));
            check_block_size(v.0, v.1, v.2)?;
            if info.block_size.is_some_and(|old| old != v) {
                return protocol("two different NBD_INFO_BLOCK_SIZE items");
            }
            info.block_size = Some(v);
        }
        _ => {} // unknown information types must be ignored
    }
    Ok(())
}

fn name_data(export: &str) -> Result<Vec<u8>> {
    if export.len() > 4096 || export.contains('\0') {
        return Err(NbdClientError::InvalidRequest(format!(
            "export name {export:?} is not a valid NBD string"
        )));
    }
    Ok(export.as_bytes().to_vec())
}

/// `NBD_OPT_GO` with an `NBD_INFO_BLOCK_SIZE` request. `Ok(None)` means the server does not
/// know the option (fall back to `NBD_OPT_EXPORT_NAME`).
pub(crate) fn opt_go(wire: &mut Wire, export: &str) -> Result<Option<ExportInfo>> {
    let name = name_data(export)?;
    let mut data = Vec::with_capacity(name.len() + 8);
    data.extend_from_slice(&(name.len() as u32).to_be_bytes());
    data.extend_from_slice(&name);
    data.extend_from_slice(&1u16.to_be_bytes());
    data.extend_from_slice(&NBD_INFO_BLOCK_SIZE.to_be_bytes());
    wire.send_option(NBD_OPT_GO, &data)?;
    let mut info = ExportInfo::default();
    loop {
        let (rtype, data) = wire.read_option_reply(NBD_OPT_GO)?;
        match rtype {
            NBD_REP_INFO => apply_info(&mut info, &data)?,
            NBD_REP_ACK => {
                if !data.is_empty() {
                    return protocol("NBD_REP_ACK with data in reply to NBD_OPT_GO");
                }
                if info.export.is_none() {
                    return protocol("NBD_OPT_GO acknowledged without NBD_INFO_EXPORT");
                }
                return Ok(Some(info));
            }
            NBD_REP_ERR_UNSUP => return Ok(None),
            code if code & NBD_REP_FLAG_ERROR != 0 => {
                return Err(NbdClientError::OptionRefused {
                    option: NBD_OPT_GO,
                    code,
                    export: Some(export.to_string()),
                    message: String::from_utf8_lossy(&data).into_owned(),
                });
            }
            other => {
                return protocol(format!(
                    "unexpected {} in reply to NBD_OPT_GO",
                    reply_type_name(other)
                ))
            }
        }
    }
}

/// `NBD_OPT_EXPORT_NAME`: the server answers with size and flags, or closes the connection.
pub(crate) fn opt_export_name(
    wire: &mut Wire,
    export: &str,
    no_zeroes: bool,
) -> Result<ExportInfo> {
    wire.send_option(NBD_OPT_EXPORT_NAME, &name_data(export)?)?;
    let ctx = format!("after NBD_OPT_EXPORT_NAME {export:?} (the export may not exist)");
    let size = wire.read_u64(&ctx)?;
    let flags = wire.read_u16(&ctx)?;
    check_transmission_flags(flags)?;
    if !no_zeroes {
        let mut zeroes = [0u8; 124];
        wire.read_exact(&mut zeroes, &ctx)?;
        if zeroes.iter().any(|&b| b != 0) {
            return protocol("the 124 reserved bytes after NBD_OPT_EXPORT_NAME are not zero");
        }
    }
    Ok(ExportInfo {
        export: Some((size, flags)),
        block_size: None,
    })
}

/// Connects to a Unix socket and completes the greeting; returns the wire.
fn negotiation_wire(path: &Path) -> Result<Wire> {
    let mut wire = Wire::new(Conn::Unix(UnixStream::connect(path)?))?;
    wire.handshake()?;
    Ok(wire)
}

/// Lists the exports of the server at `path` with `NBD_OPT_LIST`, then aborts.
pub fn list_exports_unix(path: &Path) -> Result<Vec<String>> {
    let mut wire = negotiation_wire(path)?;
    wire.send_option(NBD_OPT_LIST, &[])?;
    let mut names = Vec::new();
    loop {
        let (rtype, data) = wire.read_option_reply(NBD_OPT_LIST)?;
        match rtype {
            NBD_REP_SERVER => {
                if data.len() < 4 {
                    return protocol(format!("NBD_REP_SERVER of {} bytes", data.len()));
                }
                let n = u32::from_be_bytes([data[0], data[1], data[2], data[3]]) as usize;
                if n > data.len() - 4 {
                    return protocol(format!("NBD_REP_SERVER name length {n} exceeds the reply"));
                }
                names.push(check_string("export name", &data[4..4 + n])?);
            }
            NBD_REP_ACK if data.is_empty() => break,
            NBD_REP_ACK => return protocol("NBD_REP_ACK with data"),
            code if code & NBD_REP_FLAG_ERROR != 0 => {
                wire.abort();
                return Err(NbdClientError::OptionRefused {
                    option: NBD_OPT_LIST,
                    code,
                    export: None,
                    message: String::from_utf8_lossy(&data).into_owned(),
                });
            }
            other => {
                return protocol(format!(
                    "unexpected {} in reply to NBD_OPT_LIST",
                    reply_type_name(other)
                ))
            }
        }
    }
    wire.abort();
    Ok(names)
}

/// Sends one arbitrary option with `payload` and returns the reply types received for it,
/// up to and including the final one (`NBD_REP_ACK` or an error). Then leaves cleanly:
/// `NBD_CMD_DISC` if an `NBD_OPT_GO` succeeded, nothing after `NBD_OPT_ABORT`, else
/// `NBD_OPT_ABORT`. `NBD_OPT_EXPORT_NAME` has no option reply and is refused here.
pub fn probe_option_unix(path: &Path, option: u32, payload: &[u8]) -> Result<Vec<u32>> {
    if option == NBD_OPT_EXPORT_NAME {
        return Err(NbdClientError::InvalidRequest(
            "NBD_OPT_EXPORT_NAME has no option reply; use NbdClient::connect_unix".into(),
        ));
    }
    let mut wire = negotiation_wire(path)?;
    wire.send_option(option, payload)?;
    let mut types = Vec::new();
    let last = loop {
        let (rtype, _) = match wire.read_option_reply(option) {
            // The spec lets a server close without replying to NBD_OPT_ABORT.
            Err(NbdClientError::Closed(_)) if option == NBD_OPT_ABORT && types.is_empty() => {
                return Ok(types)
            }
            r => r?,
        };
        types.push(rtype);
        if rtype == NBD_REP_ACK || rtype & NBD_REP_FLAG_ERROR != 0 {
            break rtype;
        }
    };
    match (option, last) {
        (NBD_OPT_ABORT, _) => {}
        (NBD_OPT_GO, NBD_REP_ACK) => {
            let _ = wire.write_all(
                &encode_request(0, NBD_CMD_DISC, 0, 0, 0),
                "sending NBD_CMD_DISC",
            );
        }
        // After a successful STARTTLS only TLS may follow: hard disconnect.
        (NBD_OPT_STARTTLS, NBD_REP_ACK) => {}
        _ => {
            wire.abort();
            return Ok(types);
        }
    }
    let _ = wire.w.shutdown(Shutdown::Both);
    Ok(types)
}
