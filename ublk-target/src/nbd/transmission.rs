//! The NBD transmission phase as pure functions over byte buffers.
//!
//! The event loop receives into its own buffer with io_uring, then calls
//! [`RequestParser::parse`] until it returns `Ok(None)`, replying to each request once it
//! completes with [`encode_simple_reply`] (plus the data, for a successful read). Requests
//! may be pipelined and are answered in completion order, matched by handle. Only simple
//! replies are used: structured replies are never negotiated.

use super::{
    NbdError, CMD_DISC, CMD_FLUSH, CMD_READ, CMD_TRIM, CMD_WRITE, CMD_WRITE_ZEROES, EINVAL, ENOSPC,
    EPERM, REQUEST_MAGIC, SIMPLE_REPLY_MAGIC,
};
pub use super::{CMD_FLAG_FUA, CMD_FLAG_NO_HOLE, MAX_REQUEST, MIN_BLOCK};
use std::ops::Range;

/// Size of a (compact) request header: magic, flags, type, handle, offset, length.
pub const REQUEST_HEADER_LEN: usize = 28;
/// Size of a simple reply header: magic, error, handle.
pub const SIMPLE_REPLY_LEN: usize = 16;

/// A request type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    /// `NBD_CMD_READ`.
    Read,
    /// `NBD_CMD_WRITE` (followed by a payload).
    Write,
    /// `NBD_CMD_FLUSH`.
    Flush,
    /// `NBD_CMD_TRIM`.
    Trim,
    /// `NBD_CMD_WRITE_ZEROES`.
    WriteZeroes,
    /// `NBD_CMD_DISC`: the client is leaving; no reply.
    Disc,
    /// Any other type (`NBD_CMD_CACHE`, `NBD_CMD_BLOCK_STATUS`, ...): answered `EINVAL`.
    Unknown(u16),
}

impl Command {
    /// The wire type code.
    pub fn code(self) -> u16 {
        match self {
            Command::Read => CMD_READ,
            Command::Write => CMD_WRITE,
            Command::Flush => CMD_FLUSH,
            Command::Trim => CMD_TRIM,
            Command::WriteZeroes => CMD_WRITE_ZEROES,
            Command::Disc => CMD_DISC,
            Command::Unknown(c) => c,
        }
    }
}

impl From<u16> for Command {
    fn from(code: u16) -> Self {
        match code {
            CMD_READ => Command::Read,
            CMD_WRITE => Command::Write,
            CMD_FLUSH => Command::Flush,
            CMD_TRIM => Command::Trim,
            CMD_WRITE_ZEROES => Command::WriteZeroes,
            CMD_DISC => Command::Disc,
            c => Command::Unknown(c),
        }
    }
}

/// One parsed request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    /// Opaque client cookie, echoed in the reply.
    pub handle: u64,
    /// Command flags (`CMD_FLAG_*`).
    pub flags: u16,
    /// Request type.
    pub cmd: Command,
    /// Byte offset into the export.
    pub offset: u64,
    /// Byte length.
    pub len: u32,
    /// For writes: the payload's byte range within the buffer passed to parse().
    pub data: Option<Range<usize>>,
}

/// Splits the client's byte stream into requests.
///
/// Stateless between requests except for one thing: after a framing error the stream
/// cannot be resynchronised, so every later call fails too.
#[derive(Debug, Default)]
pub struct RequestParser {
    desynced: bool,
}

impl RequestParser {
    /// Parse the request at the start of `buf`.
    ///
    /// Returns `Ok(None)` until `buf` holds a whole request (for a write, header and
    /// payload), else the request and the number of bytes it occupies. The payload is not
    /// copied: [`Request::data`] locates it in `buf`. `Err` (bad magic, or a write larger
    /// than [`MAX_REQUEST`]) means the connection must be closed.
    pub fn parse(&mut self, buf: &[u8]) -> Result<Option<(Request, usize)>, NbdError> {
        if self.desynced {
            return Err(NbdError::Desynchronized);
        }
        let Some(h) = Header::read(buf) else {
            return Ok(None);
        };
        if h.magic != REQUEST_MAGIC {
            self.desynced = true;
            return Err(NbdError::BadRequestMagic(h.magic));
        }
        let cmd = Command::from(h.cmd);
        let (data, used) = if cmd == Command::Write {
            // The spec allows a hard disconnect for payloads deemed a denial of service,
            // and asks that nothing up to 2^25 = MAX_REQUEST be treated so.
            if h.len > MAX_REQUEST {
                self.desynced = true;
                return Err(NbdError::WriteTooLarge { len: h.len });
            }
            let end = REQUEST_HEADER_LEN + h.len as usize;
            if buf.len() < end {
                return Ok(None);
            }
            (Some(REQUEST_HEADER_LEN..end), end)
        } else {
            (None, REQUEST_HEADER_LEN)
        };
        let req = Request {
            handle: h.handle,
            flags: h.flags,
            cmd,
            offset: h.offset,
            len: h.len,
            data,
        };
        Ok(Some((req, used)))
    }
}

/// How many bytes the buffer must hold before the next request can be parsed (28 for a
/// header, 28+len for a write whose header is present).
///
/// A header that [`RequestParser::parse`] will reject (bad magic, oversized write)
/// needs nothing more, so a hostile length never makes the caller grow its buffer.
pub fn bytes_needed(buf: &[u8]) -> usize {
    match Header::read(buf) {
        Some(h) if h.magic == REQUEST_MAGIC && h.cmd == CMD_WRITE && h.len <= MAX_REQUEST => {
            REQUEST_HEADER_LEN + h.len as usize
        }
        _ => REQUEST_HEADER_LEN,
    }
}

/// Check a request against the export: Ok or the NBD errno to reply with.
///
/// The spec's "Error values" section sets the choices: `EINVAL` for unknown commands and
/// flags not documented for the command, for reads and trims beyond the end, and for
/// requests not aligned to the advertised minimum block size; `ENOSPC` for writes (and,
/// per `NBD_CMD_WRITE_ZEROES`, write-zeroes) beyond the end; `EPERM` for write, trim and
/// write-zeroes on a read-only export.
pub fn validate(req: &Request, size: u64, read_only: bool) -> Result<(), u32> {
    // FUA: "valid for all commands, provided NBD_FLAG_SEND_FUA has been negotiated, in
    // which case the server MUST accept all commands with this bit set". NO_HOLE is
    // documented for write-zeroes only; DF and FAST_ZERO belong to features this server
    // does not advertise, so they are unknown here ("SHOULD fail with NBD_EINVAL if the
    // NBD_CMD_FLAG_FAST_ZERO flag was set" without NBD_FLAG_SEND_FAST_ZERO).
    let allowed_flags = match req.cmd {
        Command::Unknown(_) => return Err(EINVAL),
        // No reply is ever sent to DISC; its fields do not matter.
        Command::Disc => return Ok(()),
        Command::WriteZeroes => CMD_FLAG_FUA | CMD_FLAG_NO_HOLE,
        Command::Read | Command::Write | Command::Flush | Command::Trim => CMD_FLAG_FUA,
    };
    if req.flags & !allowed_flags != 0 {
        return Err(EINVAL);
    }
    if req.cmd == Command::Flush {
        // Offset and length are reserved for flush (MUST be zero); nothing depends on
        // them, so tolerate clients that set them.
        return Ok(());
    }
    let writes = matches!(
        req.cmd,
        Command::Write | Command::Trim | Command::WriteZeroes
    );
    if writes && read_only {
        return Err(EPERM);
    }
    // Zero-length requests: the spec leaves their behaviour unspecified (the server
    // SHOULD NOT disconnect); refusing them keeps empty ranges away from the engine.
    if req.len == 0 {
        return Err(EINVAL);
    }
    let block = u64::from(MIN_BLOCK);
    if !req.offset.is_multiple_of(block) || u64::from(req.len) % block != 0 {
        return Err(EINVAL);
    }
    // Payload-carrying commands are bounded by the advertised maximum payload; EOVERFLOW
    // is reserved for DF reads and payload-less commands, so EINVAL. (Writes above the
    // limit never get here: parse() rejects them.) Trim and write-zeroes may exceed it.
    if matches!(req.cmd, Command::Read | Command::Write) && req.len > MAX_REQUEST {
        return Err(EINVAL);
    }
    let in_bounds = req
        .offset
        .checked_add(u64::from(req.len))
        .is_some_and(|end| end <= size);
    if !in_bounds {
        return Err(match req.cmd {
            Command::Write | Command::WriteZeroes => ENOSPC,
            _ => EINVAL,
        });
    }
    Ok(())
}

/// Append a simple reply header (magic 0x67446698, error, handle) to `out`.
pub fn encode_simple_reply(handle: u64, errno: u32, out: &mut Vec<u8>) {
    out.reserve(SIMPLE_REPLY_LEN);
    out.extend_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&errno.to_be_bytes());
    out.extend_from_slice(&handle.to_be_bytes());
}

/// The fixed fields of a request header.
struct Header {
    magic: u32,
    flags: u16,
    cmd: u16,
    handle: u64,
    offset: u64,
    len: u32,
}

impl Header {
    /// Decode the header at the start of `buf`, if it is all there.
    fn read(buf: &[u8]) -> Option<Header> {
        let b: &[u8; REQUEST_HEADER_LEN] = buf.get(..REQUEST_HEADER_LEN)?.try_into().ok()?;
        Some(Header {
            magic: u32::from_be_bytes([b[0], b[1], b[2], b[3]]),
            flags: u16::from_be_bytes([b[4], b[5]]),
            cmd: u16::from_be_bytes([b[6], b[7]]),
            handle: u64::from_be_bytes(b[8..16].try_into().ok()?),
            offset: u64::from_be_bytes(b[16..24].try_into().ok()?),
            len: u32::from_be_bytes([b[24], b[25], b[26], b[27]]),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::super::{CMD_CACHE, CMD_FLAG_DF, CMD_FLAG_FAST_ZERO};
    use super::*;

    fn header(flags: u16, cmd: u16, handle: u64, offset: u64, len: u32) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(&[0x25, 0x60, 0x95, 0x13]);
        v.extend_from_slice(&flags.to_be_bytes());
        v.extend_from_slice(&cmd.to_be_bytes());
        v.extend_from_slice(&handle.to_be_bytes());
        v.extend_from_slice(&offset.to_be_bytes());
        v.extend_from_slice(&len.to_be_bytes());
        v
    }

    fn req(cmd: Command, flags: u16, offset: u64, len: u32) -> Request {
        Request {
            handle: 1,
            flags,
            cmd,
            offset,
            len,
            data: None,
        }
    }

    #[test]
    fn header_arriving_byte_by_byte() {
        let buf = header(0, CMD_READ, 0x0102_0304_0506_0708, 4096, 8192);
        assert_eq!(buf.len(), REQUEST_HEADER_LEN);
        let mut p = RequestParser::default();
        for n in 0..REQUEST_HEADER_LEN {
            assert_eq!(p.parse(&buf[..n]).unwrap(), None, "{n} bytes");
            assert_eq!(bytes_needed(&buf[..n]), 28);
        }
        let (r, used) = p.parse(&buf).unwrap().unwrap();
        assert_eq!(used, 28);
        assert_eq!(
            r,
            Request {
                handle: 0x0102_0304_0506_0708,
                flags: 0,
                cmd: Command::Read,
                offset: 4096,
                len: 8192,
                data: None,
            }
        );
    }

    #[test]
    fn write_payload_range_and_partial_payload() {
        let mut buf = header(CMD_FLAG_FUA, CMD_WRITE, 7, 512, 1024);
        let payload: Vec<u8> = (0..1024u32).map(|i| i as u8).collect();
        buf.extend_from_slice(&payload);
        let mut p = RequestParser::default();
        for n in [28, 29, 28 + 1023] {
            assert_eq!(p.parse(&buf[..n]).unwrap(), None, "{n} bytes");
            assert_eq!(bytes_needed(&buf[..n]), 28 + 1024);
        }
        let (r, used) = p.parse(&buf).unwrap().unwrap();
        assert_eq!(used, 28 + 1024);
        assert_eq!(r.cmd, Command::Write);
        assert_eq!(r.flags & CMD_FLAG_FUA, CMD_FLAG_FUA);
        assert_eq!((r.handle, r.offset, r.len), (7, 512, 1024));
        assert_eq!(r.data, Some(28..28 + 1024));
        assert_eq!(&buf[r.data.unwrap()], &payload[..]);
    }

    #[test]
    fn pipelined_requests_in_one_buffer() {
        let mut buf = header(0, CMD_READ, 1, 0, 4096);
        buf.extend(header(0, CMD_WRITE, 2, 4096, 512));
        buf.extend(std::iter::repeat_n(0xab, 512));
        buf.extend(header(0, CMD_FLUSH, 3, 0, 0));
        buf.extend(header(CMD_FLAG_NO_HOLE, CMD_WRITE_ZEROES, 4, 0, 1 << 20));
        buf.extend(header(0, CMD_DISC, 5, 0, 0));
        buf.extend(&header(0, CMD_READ, 6, 0, 512)[..10]); // a partial sixth

        let mut p = RequestParser::default();
        let mut at = 0;
        let mut got = Vec::new();
        while let Some((r, used)) = p.parse(&buf[at..]).unwrap() {
            if let Some(d) = &r.data {
                assert!(buf[at + d.start..at + d.end].iter().all(|&b| b == 0xab));
                assert_eq!(
                    d.clone(),
                    28..28 + 512,
                    "range relative to the slice passed"
                );
            }
            got.push((r.handle, r.cmd, r.flags, used));
            at += used;
        }
        assert_eq!(
            got,
            [
                (1, Command::Read, 0, 28),
                (2, Command::Write, 0, 28 + 512),
                (3, Command::Flush, 0, 28),
                (4, Command::WriteZeroes, CMD_FLAG_NO_HOLE, 28),
                (5, Command::Disc, 0, 28),
            ]
        );
        assert_eq!(buf.len() - at, 10);
        assert_eq!(bytes_needed(&buf[at..]), 28);
    }

    #[test]
    fn bad_magic_is_fatal() {
        let mut buf = header(0, CMD_READ, 1, 0, 512);
        buf[3] = 0x14;
        let mut p = RequestParser::default();
        match p.parse(&buf) {
            Err(NbdError::BadRequestMagic(m)) => assert_eq!(m, 0x2560_9514),
            other => panic!("{other:?}"),
        }
        assert_eq!(bytes_needed(&buf), 28);
        // Even a good request afterwards: the stream has lost framing.
        let good = header(0, CMD_READ, 1, 0, 512);
        assert!(matches!(p.parse(&good), Err(NbdError::Desynchronized)));
    }

    #[test]
    fn oversized_write_is_fatal_without_waiting_for_payload() {
        let buf = header(0, CMD_WRITE, 1, 0, MAX_REQUEST + 1);
        assert_eq!(
            bytes_needed(&buf),
            28,
            "no buffer growth for a hostile length"
        );
        let mut p = RequestParser::default();
        match p.parse(&buf) {
            Err(NbdError::WriteTooLarge { len }) => assert_eq!(len, MAX_REQUEST + 1),
            other => panic!("{other:?}"),
        }
        // Exactly the limit is fine.
        let buf = header(0, CMD_WRITE, 1, 0, MAX_REQUEST);
        assert_eq!(bytes_needed(&buf), 28 + MAX_REQUEST as usize);
        assert_eq!(RequestParser::default().parse(&buf).unwrap(), None);
    }

    #[test]
    fn command_codes() {
        for c in 0..10u16 {
            assert_eq!(Command::from(c).code(), c);
        }
        assert_eq!(Command::from(6), Command::WriteZeroes);
        assert_eq!(Command::from(CMD_CACHE), Command::Unknown(5));
    }

    #[test]
    fn validate_cases() {
        use Command::*;
        const SIZE: u64 = 1 << 20;
        let cases: &[(Request, bool, Result<(), u32>)] = &[
            (req(Read, 0, 0, 4096), false, Ok(())),
            (req(Read, 0, SIZE - 512, 512), true, Ok(())),
            (req(Write, CMD_FLAG_FUA, 0, 512), false, Ok(())),
            (req(Trim, CMD_FLAG_FUA, 0, 4096), false, Ok(())),
            (
                req(WriteZeroes, CMD_FLAG_FUA | CMD_FLAG_NO_HOLE, 0, 4096),
                false,
                Ok(()),
            ),
            // FUA must be accepted on every command once SEND_FUA is advertised.
            (req(Read, CMD_FLAG_FUA, 0, 512), false, Ok(())),
            (req(Flush, CMD_FLAG_FUA, 0, 0), false, Ok(())),
            // Flush ignores its reserved offset/length, and is allowed read-only.
            (req(Flush, 0, 12345, 7), true, Ok(())),
            (req(Disc, 0, 0, 0), true, Ok(())),
            // Unknown commands and flags.
            (req(Unknown(CMD_CACHE), 0, 0, 512), false, Err(EINVAL)),
            (req(Unknown(99), 0, 0, 512), false, Err(EINVAL)),
            (req(Write, CMD_FLAG_NO_HOLE, 0, 512), false, Err(EINVAL)),
            (req(Read, CMD_FLAG_DF, 0, 512), false, Err(EINVAL)),
            (
                req(WriteZeroes, CMD_FLAG_FAST_ZERO, 0, 512),
                false,
                Err(EINVAL),
            ),
            (req(Read, 0x8000, 0, 512), false, Err(EINVAL)),
            // Read-only export.
            (req(Write, 0, 0, 512), true, Err(EPERM)),
            (req(Trim, 0, 0, 512), true, Err(EPERM)),
            (req(WriteZeroes, 0, 0, 512), true, Err(EPERM)),
            // Alignment and empty ranges.
            (req(Read, 0, 100, 512), false, Err(EINVAL)),
            (req(Write, 0, 0, 100), false, Err(EINVAL)),
            (req(Trim, 0, 512, 1000), false, Err(EINVAL)),
            (req(Read, 0, 0, 0), false, Err(EINVAL)),
            // Beyond the end: EINVAL for read/trim, ENOSPC for write/write-zeroes.
            (req(Read, 0, SIZE, 512), false, Err(EINVAL)),
            (req(Trim, 0, SIZE - 512, 1024), false, Err(EINVAL)),
            (req(Write, 0, SIZE - 512, 1024), false, Err(ENOSPC)),
            (req(WriteZeroes, 0, SIZE, 512), false, Err(ENOSPC)),
            // offset + len overflowing u64.
            (req(Read, 0, u64::MAX - 511, 1024), false, Err(EINVAL)),
            (req(Write, 0, u64::MAX - 511, 1024), false, Err(ENOSPC)),
        ];
        for (i, (r, ro, want)) in cases.iter().enumerate() {
            assert_eq!(
                validate(r, SIZE, *ro),
                *want,
                "case {i}: {r:?} read_only={ro}"
            );
        }
        // Reads are capped at the maximum payload; trim and write-zeroes are not.
        let big = 1u64 << 33;
        assert_eq!(validate(&req(Read, 0, 0, MAX_REQUEST), big, false), Ok(()));
        assert_eq!(
            validate(&req(Read, 0, 0, MAX_REQUEST + 512), big, false),
            Err(EINVAL)
        );
        let huge = u32::MAX - 511;
        assert_eq!(validate(&req(Trim, 0, 0, huge), big, false), Ok(()));
        assert_eq!(validate(&req(WriteZeroes, 0, 0, huge), big, false), Ok(()));
    }

    #[test]
    fn simple_reply_bytes() {
        let mut out = vec![0xee];
        encode_simple_reply(0x1122_3344_5566_7788, ENOSPC, &mut out);
        assert_eq!(
            out,
            [
                0xee, 0x67, 0x44, 0x66, 0x98, 0, 0, 0, 28, 0x11, 0x22, 0x33, 0x44, 0x55, 0x66,
                0x77, 0x88
            ]
        );
        out.clear();
        encode_simple_reply(1, 0, &mut out);
        assert_eq!(out.len(), SIMPLE_REPLY_LEN);
        assert_eq!(&out[4..8], &[0, 0, 0, 0]);
    }
}
