//! The NBD handshake phase: fixed newstyle negotiation over a blocking stream.
//!
//! Runs on its own thread per connection (the socket carries a read timeout), so a slow
//! or hostile client never stalls the event loop; on success the caller hands the socket
//! to the loop for the transmission phase.
//!
//! Limits against hostile input: option data is capped at [`MAX_OPTION_LEN`] (larger
//! options are discarded, up to [`MAX_DISCARD`] bytes per session, and refused with
//! `NBD_REP_ERR_TOO_BIG`), and at most [`MAX_OPTIONS`] options are accepted before the
//! connection is dropped, which the spec allows for a client behaving as a denial of
//! service.

use super::*;
use std::io::{self, Read, Write};

/// Largest option payload read into memory. Every option this server understands needs
/// at most a 4096-byte string plus a few words.
pub const MAX_OPTION_LEN: u32 = 64 << 10;
/// Options accepted per connection before it is dropped.
pub const MAX_OPTIONS: usize = 256;
/// Oversized option data discarded per connection before it is dropped.
pub const MAX_DISCARD: u64 = 4 << 20;
/// The spec's hard limit on any string (export names, descriptions).
const MAX_STRING: usize = 4096;

/// One export offered to clients.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExportInfo {
    /// Name clients select it by (`NBD_OPT_GO`, `NBD_OPT_EXPORT_NAME`).
    pub name: String,
    /// Human-readable description (`NBD_OPT_LIST`, `NBD_INFO_DESCRIPTION`).
    pub description: String,
    /// Size in bytes.
    pub size: u64,
    /// Advertise `NBD_FLAG_READ_ONLY`.
    pub read_only: bool,
    /// Advertise `NBD_FLAG_CAN_MULTI_CONN`.
    pub multi_conn: bool,
}

/// How a negotiation ended without error.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Negotiated {
    /// The client selected `export`; the stream is now in the transmission phase.
    Transmission {
        /// The selected export, as offered.
        export: ExportInfo,
        /// The transmission flags sent to the client.
        flags: u16,
        /// The client set `NBD_FLAG_C_NO_ZEROES` (informational: it only changes the
        /// reply to `NBD_OPT_EXPORT_NAME`, which has already been sent).
        no_zeroes: bool,
    },
    /// The client aborted (`NBD_OPT_ABORT`) or closed the connection between messages.
    Ended,
}

/// The transmission flags advertised for `export`.
pub fn transmission_flags(export: &ExportInfo) -> u16 {
    let mut f =
        FLAG_HAS_FLAGS | FLAG_SEND_FLUSH | FLAG_SEND_FUA | FLAG_SEND_TRIM | FLAG_SEND_WRITE_ZEROES;
    if export.read_only {
        f |= FLAG_READ_ONLY;
    }
    if export.multi_conn {
        f |= FLAG_CAN_MULTI_CONN;
    }
    f
}

/// Run the server side of the handshake on `s` (greeting, client flags, option haggling)
/// until the client enters transmission, aborts, disconnects, or breaks the protocol.
///
/// An empty export name selects the first of `exports`. On
/// [`Negotiated::Transmission`] nothing beyond the final reply has been written or read.
pub fn negotiate<S: Read + Write + ?Sized>(
    s: &mut S,
    exports: &[ExportInfo],
) -> Result<Negotiated, NbdError> {
    let mut greeting = Vec::with_capacity(18);
    greeting.extend_from_slice(&NBDMAGIC.to_be_bytes());
    greeting.extend_from_slice(&IHAVEOPT.to_be_bytes());
    greeting.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    s.write_all(&greeting)
        .and_then(|()| s.flush())
        .map_err(io_err("sending the greeting"))?;

    let mut cf = [0u8; 4];
    if !read_or_eof(s, &mut cf).map_err(io_err("reading the client flags"))? {
        // A port probe or health check: nothing was negotiated, nothing went wrong.
        return Ok(Negotiated::Ended);
    }
    let cflags = u32::from_be_bytes(cf);
    // The spec: the server MUST drop a client that sets flags it did not advertise.
    if cflags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
        return Err(NbdError::UnknownClientFlags(cflags));
    }
    if cflags & FLAG_C_FIXED_NEWSTYLE == 0 {
        return Err(NbdError::NotFixedNewstyle(cflags));
    }

    let mut n = Negotiation {
        s,
        exports,
        no_zeroes: cflags & FLAG_C_NO_ZEROES != 0,
        out: Vec::new(),
        discarded: 0,
    };
    for count in 1.. {
        let mut hdr = [0u8; 16];
        if !read_or_eof(n.s, &mut hdr).map_err(io_err("reading an option header"))? {
            return Ok(Negotiated::Ended);
        }
        if count > MAX_OPTIONS {
            break;
        }
        let magic = u64::from_be_bytes(hdr[0..8].try_into().expect("8 bytes"));
        if magic != IHAVEOPT {
            return Err(NbdError::BadOptionMagic(magic));
        }
        let opt = u32::from_be_bytes(hdr[8..12].try_into().expect("4 bytes"));
        let len = u32::from_be_bytes(hdr[12..16].try_into().expect("4 bytes"));
        tracing::debug!("NBD handshake: {} ({opt}), {len} bytes", option_name(opt));
        if let Some(done) = n.option(opt, len)? {
            return Ok(done);
        }
    }
    Err(NbdError::TooManyOptions(MAX_OPTIONS))
}

/// State of one negotiation.
struct Negotiation<'a, S: ?Sized> {
    s: &'a mut S,
    exports: &'a [ExportInfo],
    no_zeroes: bool,
    /// Replies to the current option, sent in one write.
    out: Vec<u8>,
    /// Oversized option bytes thrown away so far.
    discarded: u64,
}

impl<S: Read + Write + ?Sized> Negotiation<'_, S> {
    /// Handle one option whose header has been read; `Some` ends the negotiation.
    fn option(&mut self, opt: u32, len: u32) -> Result<Option<Negotiated>, NbdError> {
        if len > MAX_OPTION_LEN {
            return self.oversized(opt, len);
        }
        let mut data = vec![0u8; len as usize];
        self.s
            .read_exact(&mut data)
            .map_err(io_err("reading option data"))?;
        match opt {
            OPT_EXPORT_NAME => return self.export_name(data).map(Some),
            OPT_ABORT => {
                // Data is ignored, as the spec asks. The client may already have closed
                // without waiting for the ACK, which the spec says to handle gracefully.
                self.reply(opt, REP_ACK, &[]);
                if let Err(e) = self.send() {
                    tracing::debug!("NBD handshake: ACK to NBD_OPT_ABORT not delivered: {e}");
                }
                return Ok(Some(Negotiated::Ended));
            }
            OPT_LIST => self.list(&data),
            OPT_INFO | OPT_GO => {
                if let Some(done) = self.info_or_go(opt, &data) {
                    self.send()?;
                    return Ok(Some(done));
                }
            }
            // No TLS support exists at all (not merely disabled by policy), so UNSUP as the
            // NOTLS-mode section permits; never TLS_REQD, which NOTLS servers must not send.
            OPT_STARTTLS => self.reply_err(opt, REP_ERR_UNSUP, "TLS is not supported"),
            // Not implemented: the spec tells clients to expect ERR_UNSUP here and fall
            // back to simple replies.
            OPT_STRUCTURED_REPLY => {
                self.reply_err(opt, REP_ERR_UNSUP, "structured replies are not supported")
            }
            // "followed by ... an error (for instance NBD_REP_ERR_UNSUP if the option is not
            // supported)".
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                self.reply_err(opt, REP_ERR_UNSUP, "metadata contexts are not supported")
            }
            OPT_EXTENDED_HEADERS => {
                self.reply_err(opt, REP_ERR_UNSUP, "extended headers are not supported")
            }
            _ => {
                let msg = format!("option {opt} is not supported");
                self.reply_err(opt, REP_ERR_UNSUP, &msg)
            }
        }
        self.send()?;
        Ok(None)
    }

    /// An option whose data exceeds [`MAX_OPTION_LEN`].
    fn oversized(&mut self, opt: u32, len: u32) -> Result<Option<Negotiated>, NbdError> {
        match opt {
            // Ending anyway: no need to swallow the data first.
            OPT_ABORT => return Ok(Some(Negotiated::Ended)),
            // Cannot be answered with an error reply; the spec requires ending the session.
            OPT_EXPORT_NAME => {
                return Err(NbdError::OptionTooLarge {
                    option: opt,
                    name: option_name(opt),
                    len,
                    max: MAX_OPTION_LEN.into(),
                })
            }
            _ => {}
        }
        if self.discarded + u64::from(len) > MAX_DISCARD {
            return Err(NbdError::OptionTooLarge {
                option: opt,
                name: option_name(opt),
                len,
                max: MAX_DISCARD - self.discarded,
            });
        }
        // Skip the data so that the stream stays in sync, then refuse the option.
        let got = io::copy(&mut (&mut *self.s).take(len.into()), &mut io::sink())
            .map_err(io_err("discarding oversized option data"))?;
        if got < u64::from(len) {
            return Err(NbdError::Io {
                context: "discarding oversized option data",
                source: io::ErrorKind::UnexpectedEof.into(),
            });
        }
        self.discarded += got;
        let msg = format!("option data of {len} bytes exceeds the {MAX_OPTION_LEN}-byte limit");
        self.reply_err(opt, REP_ERR_TOO_BIG, &msg);
        self.send()?;
        Ok(None)
    }

    /// `NBD_OPT_EXPORT_NAME`: enter transmission or end the session.
    fn export_name(&mut self, data: Vec<u8>) -> Result<Negotiated, NbdError> {
        let name = String::from_utf8(data).map_err(|_| NbdError::BadExportName)?;
        let Some(export) = find(self.exports, &name) else {
            return Err(NbdError::UnknownExport(name));
        };
        let flags = transmission_flags(export);
        self.out.extend_from_slice(&export.size.to_be_bytes());
        self.out.extend_from_slice(&flags.to_be_bytes());
        if !self.no_zeroes {
            self.out.extend_from_slice(&[0u8; 124]);
        }
        self.send()?;
        Ok(Negotiated::Transmission {
            export: export.clone(),
            flags,
            no_zeroes: self.no_zeroes,
        })
    }

    /// `NBD_OPT_LIST`: one `NBD_REP_SERVER` per export, then `NBD_REP_ACK`.
    fn list(&mut self, data: &[u8]) {
        if !data.is_empty() {
            // "the server SHOULD reject a request that includes data with NBD_REP_ERR_INVALID"
            self.reply_err(OPT_LIST, REP_ERR_INVALID, "NBD_OPT_LIST takes no data");
            return;
        }
        for e in self.exports {
            // Name length, name, then the optional free-form description.
            let name_len = (e.name.len() as u32).to_be_bytes();
            self.reply_parts(
                OPT_LIST,
                REP_SERVER,
                &[&name_len, e.name.as_bytes(), e.description.as_bytes()],
            );
        }
        self.reply(OPT_LIST, REP_ACK, &[]);
    }

    /// `NBD_OPT_INFO` / `NBD_OPT_GO`: queue the replies; `Some` when GO succeeded.
    fn info_or_go(&mut self, opt: u32, data: &[u8]) -> Option<Negotiated> {
        let (name, requests) = match parse_info_request(data) {
            Ok(r) => r,
            Err(msg) => {
                self.reply_err(opt, REP_ERR_INVALID, msg);
                return None;
            }
        };
        let Some(export) = find(self.exports, name) else {
            let msg = format!("export {name:?} does not exist");
            self.reply_err(opt, REP_ERR_UNKNOWN, &msg);
            return None;
        };
        let flags = transmission_flags(export);
        let size = export.size.to_be_bytes();
        self.info(opt, INFO_EXPORT, &[&size, &flags.to_be_bytes()]);
        // Unrequested items are allowed ("The server MAY send information requests back
        // which are not explicitly requested"); the canonical name matters when the client
        // asked for the default export, and block sizes because we enforce 512-byte
        // alignment, which is stricter than the default minimum of 1.
        self.info(opt, INFO_NAME, &[export.name.as_bytes()]);
        if !export.description.is_empty() || requests.contains(&INFO_DESCRIPTION) {
            self.info(opt, INFO_DESCRIPTION, &[export.description.as_bytes()]);
        }
        let sizes = [MIN_BLOCK, PREFERRED_BLOCK, MAX_REQUEST].map(u32::to_be_bytes);
        self.info(opt, INFO_BLOCK_SIZE, &[&sizes[0], &sizes[1], &sizes[2]]);
        self.reply(opt, REP_ACK, &[]);
        (opt == OPT_GO).then(|| Negotiated::Transmission {
            export: export.clone(),
            flags,
            no_zeroes: self.no_zeroes,
        })
    }

    fn info(&mut self, opt: u32, kind: u16, payload: &[&[u8]]) {
        let kind = kind.to_be_bytes();
        let mut parts: Vec<&[u8]> = Vec::with_capacity(payload.len() + 1);
        parts.push(&kind);
        parts.extend_from_slice(payload);
        self.reply_parts(opt, REP_INFO, &parts);
    }

    fn reply(&mut self, opt: u32, rep: u32, data: &[u8]) {
        self.reply_parts(opt, rep, &[data]);
    }

    /// Error replies carry a message "suitable for display to the user".
    fn reply_err(&mut self, opt: u32, rep: u32, msg: &str) {
        tracing::debug!("NBD handshake: refusing {}: {msg}", option_name(opt));
        self.reply(opt, rep, msg.as_bytes());
    }

    /// Queue one option reply whose data is the concatenation of `parts`.
    fn reply_parts(&mut self, opt: u32, rep: u32, parts: &[&[u8]]) {
        let len: usize = parts.iter().map(|p| p.len()).sum();
        self.out.extend_from_slice(&OPT_REPLY_MAGIC.to_be_bytes());
        self.out.extend_from_slice(&opt.to_be_bytes());
        self.out.extend_from_slice(&rep.to_be_bytes());
        self.out.extend_from_slice(&(len as u32).to_be_bytes());
        for p in parts {
            self.out.extend_from_slice(p);
        }
    }

    fn send(&mut self) -> Result<(), NbdError> {
        let r = self.s.write_all(&self.out).and_then(|()| self.s.flush());
        self.out.clear();
        r.map_err(io_err("sending an option reply"))
    }
}

/// Split `NBD_OPT_INFO` / `NBD_OPT_GO` data into the export name and the information
/// requests; `Err` is the message for `NBD_REP_ERR_INVALID`.
fn parse_info_request(data: &[u8]) -> Result<(&str, Vec<u16>), &'static str> {
    if data.len() < 6 {
        return Err("option data shorter than 6 bytes");
    }
    let name_len = u32::from_be_bytes(data[0..4].try_into().expect("4 bytes")) as usize;
    // "length of name ... MUST be no larger than the option data length - 6"
    if name_len > data.len() - 6 {
        return Err("export name length exceeds the option data");
    }
    if name_len > MAX_STRING {
        return Err("export name longer than 4096 bytes");
    }
    let name = std::str::from_utf8(&data[4..4 + name_len])
        .map_err(|_| "export name is not valid UTF-8")?;
    let rest = &data[4 + name_len..];
    let count = u16::from_be_bytes([rest[0], rest[1]]) as usize;
    let list = &rest[2..];
    if list.len() != 2 * count {
        return Err("information request count does not match the option length");
    }
    let requests = list
        .chunks_exact(2)
        .map(|c| u16::from_be_bytes([c[0], c[1]]))
        .collect();
    Ok((name, requests))
}

/// The export called `name`; the empty name is the default (first) export.
fn find<'e>(exports: &'e [ExportInfo], name: &str) -> Option<&'e ExportInfo> {
    if name.is_empty() {
        exports.first()
    } else {
        exports.iter().find(|e| e.name == name)
    }
}

/// Fill `buf`; `Ok(false)` if the peer closed before sending its first byte (a clean end
/// between messages), an `UnexpectedEof` error if it closed part-way.
fn read_or_eof<S: Read + ?Sized>(s: &mut S, buf: &mut [u8]) -> io::Result<bool> {
    let mut got = 0;
    while got < buf.len() {
        match s.read(&mut buf[got..]) {
            Ok(0) if got == 0 => return Ok(false),
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}

fn io_err(context: &'static str) -> impl FnOnce(io::Error) -> NbdError {
    move |source| NbdError::Io { context, source }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;
    use std::thread::JoinHandle;
    use std::time::Duration;

    const MIB32: u32 = 32 << 20;

    fn export(name: &str, size: u64, read_only: bool, multi_conn: bool) -> ExportInfo {
        ExportInfo {
            name: name.into(),
            description: format!("test volume {name}"),
            size,
            read_only,
            multi_conn,
        }
    }

    fn two_exports() -> Vec<ExportInfo> {
        vec![
            export("vol", 1 << 30, false, false),
            export("vol2", 8 << 20, true, true),
        ]
    }

    /// A raw-bytes client in the test thread; the server runs `negotiate` in another.
    struct Client {
        s: UnixStream,
        server: Option<JoinHandle<Result<Negotiated, NbdError>>>,
    }

    impl Client {
        /// Connect, check the greeting byte for byte, send `cflags`.
        fn start(exports: Vec<ExportInfo>, cflags: u32) -> Client {
            let mut c = Client::connect(exports);
            let mut g = [0u8; 18];
            c.s.read_exact(&mut g).unwrap();
            assert_eq!(&g[0..8], b"NBDMAGIC");
            assert_eq!(&g[8..16], b"IHAVEOPT");
            assert_eq!(&g[16..18], &[0, 3], "FIXED_NEWSTYLE | NO_ZEROES");
            c.s.write_all(&cflags.to_be_bytes()).unwrap();
            c
        }

        fn connect(exports: Vec<ExportInfo>) -> Client {
            let (a, mut b) = UnixStream::pair().unwrap();
            a.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            b.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            let server = std::thread::spawn(move || negotiate(&mut b, &exports));
            Client {
                s: a,
                server: Some(server),
            }
        }

        fn send_opt(&mut self, opt: u32, data: &[u8]) {
            let mut m = Vec::new();
            m.extend_from_slice(b"IHAVEOPT");
            m.extend_from_slice(&opt.to_be_bytes());
            m.extend_from_slice(&(data.len() as u32).to_be_bytes());
            m.extend_from_slice(data);
            self.s.write_all(&m).unwrap();
        }

        /// Read one option reply, checking magic and echoed option: (type, data).
        fn reply(&mut self, opt: u32) -> (u32, Vec<u8>) {
            let mut h = [0u8; 20];
            self.s.read_exact(&mut h).unwrap();
            assert_eq!(&h[0..8], &[0, 3, 0xe8, 0x89, 0x04, 0x55, 0x65, 0xa9]);
            assert_eq!(u32::from_be_bytes(h[8..12].try_into().unwrap()), opt);
            let rep = u32::from_be_bytes(h[12..16].try_into().unwrap());
            let len = u32::from_be_bytes(h[16..20].try_into().unwrap());
            let mut d = vec![0u8; len as usize];
            self.s.read_exact(&mut d).unwrap();
            (rep, d)
        }

        /// Collect `NBD_REP_INFO` items (type, payload) up to the final reply.
        fn infos(&mut self, opt: u32) -> (Vec<(u16, Vec<u8>)>, u32) {
            let mut v = Vec::new();
            loop {
                let (rep, d) = self.reply(opt);
                if rep != REP_INFO {
                    return (v, rep);
                }
                v.push((u16::from_be_bytes([d[0], d[1]]), d[2..].to_vec()));
            }
        }

        /// Everything the server sends until it closes.
        fn rest(&mut self) -> Vec<u8> {
            let mut v = Vec::new();
            self.s.read_to_end(&mut v).unwrap();
            v
        }

        fn finish(&mut self) -> Result<Negotiated, NbdError> {
            self.server.take().unwrap().join().unwrap()
        }
    }

    fn info_data(name: &str, reqs: &[u16]) -> Vec<u8> {
        let mut d = (name.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(name.as_bytes());
        d.extend_from_slice(&(reqs.len() as u16).to_be_bytes());
        for r in reqs {
            d.extend_from_slice(&r.to_be_bytes());
        }
        d
    }

    fn block_sizes(p: &[u8]) -> [u32; 3] {
        assert_eq!(p.len(), 12);
        [0, 4, 8].map(|i| u32::from_be_bytes(p[i..i + 4].try_into().unwrap()))
    }

    fn expect_transmission(r: Result<Negotiated, NbdError>, name: &str) -> (u16, bool) {
        match r.unwrap() {
            Negotiated::Transmission {
                export,
                flags,
                no_zeroes,
            } => {
                assert_eq!(export.name, name);
                (flags, no_zeroes)
            }
            other => panic!("expected transmission, got {other:?}"),
        }
    }

    #[test]
    fn go_default_export() {
        let mut c = Client::start(two_exports(), FLAG_C_FIXED_NEWSTYLE);
        c.send_opt(OPT_GO, &info_data("", &[]));
        let (infos, last) = c.infos(OPT_GO);
        assert_eq!(last, REP_ACK);
        let kinds: Vec<u16> = infos.iter().map(|i| i.0).collect();
        assert_eq!(
            kinds,
            [INFO_EXPORT, INFO_NAME, INFO_DESCRIPTION, INFO_BLOCK_SIZE]
        );
        // size 1 GiB, flags HAS_FLAGS|SEND_FLUSH|SEND_FUA|SEND_TRIM|SEND_WRITE_ZEROES
        assert_eq!(infos[0].1, [0, 0, 0, 0, 0x40, 0, 0, 0, 0, 0x6d]);
        assert_eq!(infos[1].1, b"vol");
        assert_eq!(infos[2].1, b"test volume vol");
        assert_eq!(block_sizes(&infos[3].1), [512, 4096, MIB32]);
        // No zero padding after a GO, whatever the client flags.
        assert!(c.rest().is_empty());
        let (flags, no_zeroes) = expect_transmission(c.finish(), "vol");
        assert_eq!(flags, 0x6d);
        assert!(!no_zeroes);
    }

    #[test]
    fn info_then_go_read_only_multi_conn() {
        let mut c = Client::start(two_exports(), FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES);
        c.send_opt(
            OPT_INFO,
            &info_data("vol2", &[INFO_BLOCK_SIZE, INFO_NAME, 77]),
        );
        let (infos, last) = c.infos(OPT_INFO);
        assert_eq!(last, REP_ACK);
        let export = infos.iter().find(|i| i.0 == INFO_EXPORT).unwrap();
        // 8 MiB; flags 0x6d | READ_ONLY (0x02) | CAN_MULTI_CONN (0x100)
        assert_eq!(export.1, [0, 0, 0, 0, 0, 0x80, 0, 0, 0x01, 0x6f]);
        let bs = infos.iter().find(|i| i.0 == INFO_BLOCK_SIZE).unwrap();
        assert_eq!(block_sizes(&bs.1), [512, 4096, MIB32]);
        assert!(infos.iter().all(|i| i.0 != 77), "unknown request ignored");

        c.send_opt(
            OPT_GO,
            &info_data("vol2", &[INFO_BLOCK_SIZE, INFO_NAME, 77]),
        );
        let (go_infos, last) = c.infos(OPT_GO);
        assert_eq!(last, REP_ACK);
        assert_eq!(go_infos, infos, "same parameters, same information");
        assert!(c.rest().is_empty());
        let (flags, no_zeroes) = expect_transmission(c.finish(), "vol2");
        assert_eq!(flags, 0x16f);
        assert!(no_zeroes);
    }

    #[test]
    fn list_then_abort() {
        let mut c = Client::start(two_exports(), FLAG_C_FIXED_NEWSTYLE);
        c.send_opt(OPT_LIST, &[]);
        for name in ["vol", "vol2"] {
            let (rep, d) = c.reply(OPT_LIST);
            assert_eq!(rep, REP_SERVER);
            assert_eq!(&d[0..4], &(name.len() as u32).to_be_bytes());
            assert_eq!(&d[4..4 + name.len()], name.as_bytes());
            assert_eq!(
                &d[4 + name.len()..],
                format!("test volume {name}").as_bytes()
            );
        }
        assert_eq!(c.reply(OPT_LIST), (REP_ACK, vec![]));
        // LIST with data is malformed; negotiation continues.
        c.send_opt(OPT_LIST, b"x");
        assert_eq!(c.reply(OPT_LIST).0, REP_ERR_INVALID);
        c.send_opt(OPT_ABORT, &[]);
        assert_eq!(c.reply(OPT_ABORT), (REP_ACK, vec![]));
        assert!(c.rest().is_empty());
        assert_eq!(c.finish().unwrap(), Negotiated::Ended);
    }

    #[test]
    fn abort_with_client_gone() {
        let mut c = Client::start(two_exports(), FLAG_C_FIXED_NEWSTYLE);
        c.send_opt(OPT_ABORT, b"ignored");
        c.s.shutdown(std::net::Shutdown::Both).unwrap();
        assert_eq!(c.finish().unwrap(), Negotiated::Ended);
    }

    #[test]
    fn export_name_with_no_zeroes() {
        let mut c = Client::start(two_exports(), FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES);
        c.send_opt(OPT_EXPORT_NAME, b"vol2");
        let r = c.rest();
        assert_eq!(r, [0, 0, 0, 0, 0, 0x80, 0, 0, 0x01, 0x6f]);
        let (flags, no_zeroes) = expect_transmission(c.finish(), "vol2");
        assert_eq!(flags, 0x16f);
        assert!(no_zeroes);
    }

    #[test]
    fn export_name_with_zeroes_default_export() {
        let mut c = Client::start(two_exports(), FLAG_C_FIXED_NEWSTYLE);
        c.send_opt(OPT_EXPORT_NAME, b"");
        let r = c.rest();
        assert_eq!(r.len(), 8 + 2 + 124);
        assert_eq!(&r[..10], &[0, 0, 0, 0, 0x40, 0, 0, 0, 0, 0x6d]);
        assert!(r[10..].iter().all(|&b| b == 0));
        expect_transmission(c.finish(), "vol");
    }

    #[test]
    fn export_name_unknown_closes() {
        let mut c = Client::start(two_exports(), FLAG_C_FIXED_NEWSTYLE);
        c.send_opt(OPT_EXPORT_NAME, b"nope");
        assert!(c.rest().is_empty());
        match c.finish() {
            Err(NbdError::UnknownExport(n)) => assert_eq!(n, "nope"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn unsupported_options_then_go() {
        let mut c = Client::start(two_exports(), FLAG_C_FIXED_NEWSTYLE);
        for opt in [
            99,
            OPT_PEEK_EXPORT,
            OPT_STARTTLS,
            OPT_STRUCTURED_REPLY,
            OPT_LIST_META_CONTEXT,
            OPT_SET_META_CONTEXT,
            OPT_EXTENDED_HEADERS,
        ] {
            c.send_opt(opt, &[]);
            let (rep, msg) = c.reply(opt);
            assert_eq!(rep, REP_ERR_UNSUP, "option {opt}");
            assert!(!msg.is_empty(), "error replies carry a message");
        }
        c.send_opt(OPT_GO, &info_data("vol", &[]));
        assert_eq!(c.infos(OPT_GO).1, REP_ACK);
        expect_transmission(c.finish(), "vol");
    }

    #[test]
    fn go_unknown_export_then_retry() {
        let mut c = Client::start(two_exports(), FLAG_C_FIXED_NEWSTYLE);
        c.send_opt(OPT_GO, &info_data("nope", &[INFO_BLOCK_SIZE]));
        let (infos, last) = c.infos(OPT_GO);
        assert!(infos.is_empty());
        assert_eq!(last, REP_ERR_UNKNOWN);
        c.send_opt(OPT_INFO, &info_data("nope", &[]));
        assert_eq!(c.infos(OPT_INFO), (vec![], REP_ERR_UNKNOWN));
        c.send_opt(OPT_GO, &info_data("vol2", &[]));
        assert_eq!(c.infos(OPT_GO).1, REP_ACK);
        expect_transmission(c.finish(), "vol2");
    }

    #[test]
    fn malformed_info_requests() {
        let mut c = Client::start(two_exports(), FLAG_C_FIXED_NEWSTYLE);
        let mut bad_count = info_data("vol", &[INFO_NAME]);
        bad_count.pop(); // odd-length request list
        let mut name_too_long = info_data("vol", &[]);
        name_too_long[3] = 200;
        let cases: [&[u8]; 4] = [&[], &[0, 0, 0, 0, 0], &bad_count, &name_too_long];
        for d in cases {
            c.send_opt(OPT_GO, d);
            assert_eq!(c.infos(OPT_GO), (vec![], REP_ERR_INVALID));
        }
        let mut not_utf8 = info_data("vo", &[]);
        not_utf8[5] = 0xff;
        c.send_opt(OPT_INFO, &not_utf8);
        assert_eq!(c.infos(OPT_INFO).1, REP_ERR_INVALID);
        c.send_opt(OPT_ABORT, &[]);
        assert_eq!(c.reply(OPT_ABORT).0, REP_ACK);
        assert_eq!(c.finish().unwrap(), Negotiated::Ended);
    }

    #[test]
    fn client_without_fixed_newstyle_is_refused() {
        let mut c = Client::start(two_exports(), 0);
        assert!(c.rest().is_empty());
        let e = c.finish().unwrap_err();
        assert!(matches!(e, NbdError::NotFixedNewstyle(0)), "{e:?}");
        assert!(e.to_string().contains("NBD_FLAG_C_FIXED_NEWSTYLE"));

        let mut c = Client::start(two_exports(), FLAG_C_FIXED_NEWSTYLE | 4);
        assert!(c.rest().is_empty());
        assert!(matches!(c.finish(), Err(NbdError::UnknownClientFlags(5))));
    }

    #[test]
    fn oversized_option_is_discarded_and_refused() {
        let mut c = Client::start(two_exports(), FLAG_C_FIXED_NEWSTYLE);
        let big = vec![0xa5u8; MAX_OPTION_LEN as usize + 1];
        // Write from another thread: the server only answers once all of it is read.
        let mut w = c.s.try_clone().unwrap();
        let writer = std::thread::spawn(move || {
            let mut m = b"IHAVEOPT".to_vec();
            m.extend_from_slice(&OPT_INFO.to_be_bytes());
            m.extend_from_slice(&(big.len() as u32).to_be_bytes());
            m.extend_from_slice(&big);
            w.write_all(&m).unwrap();
        });
        assert_eq!(c.reply(OPT_INFO).0, REP_ERR_TOO_BIG);
        writer.join().unwrap();
        // The stream is still in sync.
        c.send_opt(OPT_GO, &info_data("vol", &[]));
        assert_eq!(c.infos(OPT_GO).1, REP_ACK);
        expect_transmission(c.finish(), "vol");
    }

    #[test]
    fn oversized_export_name_or_discard_budget_closes() {
        let mut c = Client::start(two_exports(), FLAG_C_FIXED_NEWSTYLE);
        let mut m = b"IHAVEOPT".to_vec();
        m.extend_from_slice(&OPT_EXPORT_NAME.to_be_bytes());
        m.extend_from_slice(&(MAX_OPTION_LEN + 1).to_be_bytes());
        c.s.write_all(&m).unwrap();
        assert!(c.rest().is_empty());
        assert!(matches!(
            c.finish(),
            Err(NbdError::OptionTooLarge {
                option: OPT_EXPORT_NAME,
                ..
            })
        ));

        let mut c = Client::start(two_exports(), FLAG_C_FIXED_NEWSTYLE);
        let mut m = b"IHAVEOPT".to_vec();
        m.extend_from_slice(&OPT_GO.to_be_bytes());
        m.extend_from_slice(&u32::MAX.to_be_bytes());
        c.s.write_all(&m).unwrap();
        assert!(c.rest().is_empty());
        match c.finish() {
            Err(NbdError::OptionTooLarge { option, len, .. }) => {
                assert_eq!((option, len), (OPT_GO, u32::MAX));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn too_many_options() {
        let mut c = Client::start(two_exports(), FLAG_C_FIXED_NEWSTYLE);
        for _ in 0..MAX_OPTIONS {
            c.send_opt(1000, &[]);
            assert_eq!(c.reply(1000).0, REP_ERR_UNSUP);
        }
        c.send_opt(1000, &[]);
        assert!(c.rest().is_empty());
        assert!(matches!(
            c.finish(),
            Err(NbdError::TooManyOptions(MAX_OPTIONS))
        ));
    }

    #[test]
    fn disconnects() {
        // Right after the greeting: a probe, not an error.
        let mut c = Client::connect(two_exports());
        c.s.shutdown(std::net::Shutdown::Write).unwrap();
        assert_eq!(c.finish().unwrap(), Negotiated::Ended);

        // Between options.
        let mut c = Client::start(two_exports(), FLAG_C_FIXED_NEWSTYLE);
        c.send_opt(OPT_LIST, &[]);
        assert_eq!(c.infos(OPT_LIST).1, REP_SERVER);
        c.s.shutdown(std::net::Shutdown::Write).unwrap();
        assert_eq!(c.finish().unwrap(), Negotiated::Ended);

        // In the middle of an option: an error.
        let mut c = Client::start(two_exports(), FLAG_C_FIXED_NEWSTYLE);
        c.s.write_all(b"IHAVEOPT\0\0\0\x07\0\0\0\x20vol").unwrap();
        c.s.shutdown(std::net::Shutdown::Write).unwrap();
        match c.finish() {
            Err(NbdError::Io { source, .. }) => {
                assert_eq!(source.kind(), io::ErrorKind::UnexpectedEof)
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn bad_option_magic() {
        let mut c = Client::start(two_exports(), FLAG_C_FIXED_NEWSTYLE);
        c.s.write_all(b"IHAVEOPX\0\0\0\x03\0\0\0\0").unwrap();
        assert!(c.rest().is_empty());
        assert!(matches!(
            c.finish(),
            Err(NbdError::BadOptionMagic(0x4948_4156_454f_5058))
        ));
    }

    #[test]
    fn works_through_a_boxed_trait_object() {
        // The shape serve.rs uses.
        trait ReadWrite: Read + Write + Send {}
        impl<T: Read + Write + Send> ReadWrite for T {}
        let (mut a, b) = UnixStream::pair().unwrap();
        let server = std::thread::spawn(move || {
            let mut stream: Box<dyn ReadWrite> = Box::new(b);
            negotiate(&mut stream, &two_exports())
        });
        let mut g = [0u8; 18];
        a.read_exact(&mut g).unwrap();
        a.write_all(&3u32.to_be_bytes()).unwrap();
        a.write_all(b"IHAVEOPT\0\0\0\x01\0\0\0\x03vol").unwrap();
        let mut r = Vec::new();
        a.read_to_end(&mut r).unwrap();
        assert_eq!(r.len(), 10);
        expect_transmission(server.join().unwrap(), "vol");
    }
}
