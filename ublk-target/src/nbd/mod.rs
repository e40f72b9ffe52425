//! The NBD (Network Block Device) server protocol, as specified in the NBD project's
//! `doc/proto.md` (<https://github.com/NetworkBlockDevice/nbd/blob/master/doc/proto.md>).
//!
//! Two parts:
//! - [`handshake`]: the blocking fixed-newstyle negotiation, run on a short-lived thread
//!   per connection before the socket is handed to the event loop;
//! - [`transmission`]: request parsing, validation and reply encoding as pure functions
//!   over byte buffers, because the event loop does its own socket I/O with io_uring.
//!
//! Why hand-written rather than the `nbd` crate: `nbd` 0.3.1 only implements
//! `NBD_OPT_EXPORT_NAME` (no `NBD_OPT_GO`/`NBD_OPT_INFO`, so no error replies and no block
//! size advertisement), no `NBD_CMD_TRIM`/`NBD_CMD_WRITE_ZEROES`, no FUA, and it serves one
//! request at a time over blocking I/O, so no pipelining. Structured replies, metadata
//! contexts, extended headers and TLS are deliberately not implemented: the spec lets a
//! server refuse them, and the simple-reply subset is all that qemu, nbd-client (the Linux
//! kernel driver) and libnbd need.
//!
//! Wire integers are big-endian ("network byte order") throughout.

pub mod handshake;
pub mod transmission;

// ---------------------------------------------------------------- magics

/// `NBDMAGIC`, first 8 bytes of the server greeting.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: second word of the newstyle greeting and prefix of every client option.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Prefix of every fixed-newstyle option reply.
pub const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// `NBD_REQUEST_MAGIC`: prefix of every (compact-header) transmission request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// `NBD_SIMPLE_REPLY_MAGIC`: prefix of every simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;

// ---------------------------------------------------------------- handshake flags

/// Server handshake flag: fixed newstyle negotiation is supported.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
/// Server handshake flag: the client may ask to skip the 124 zero bytes.
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
/// Client flag: the client speaks fixed newstyle.
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
/// Client flag: do not send the 124 zero bytes after `NBD_OPT_EXPORT_NAME`.
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

// ---------------------------------------------------------------- transmission flags

/// Transmission flag: MUST always be set.
pub const FLAG_HAS_FLAGS: u16 = 1 << 0;
/// Transmission flag: the export is read-only.
pub const FLAG_READ_ONLY: u16 = 1 << 1;
/// Transmission flag: `NBD_CMD_FLUSH` is supported.
pub const FLAG_SEND_FLUSH: u16 = 1 << 2;
/// Transmission flag: `NBD_CMD_FLAG_FUA` is supported.
pub const FLAG_SEND_FUA: u16 = 1 << 3;
/// Transmission flag: the export behaves like a rotational medium.
pub const FLAG_ROTATIONAL: u16 = 1 << 4;
/// Transmission flag: `NBD_CMD_TRIM` is supported.
pub const FLAG_SEND_TRIM: u16 = 1 << 5;
/// Transmission flag: `NBD_CMD_WRITE_ZEROES` (and `NBD_CMD_FLAG_NO_HOLE`) are supported.
pub const FLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
/// Transmission flag: `NBD_CMD_FLAG_DF` is supported (structured replies only).
pub const FLAG_SEND_DF: u16 = 1 << 7;
/// Transmission flag: flush/FUA effects are visible across all connections.
pub const FLAG_CAN_MULTI_CONN: u16 = 1 << 8;

// ---------------------------------------------------------------- options

/// Choose an export and enter transmission (cannot return errors).
pub const OPT_EXPORT_NAME: u32 = 1;
/// Soft disconnect during negotiation.
pub const OPT_ABORT: u32 = 2;
/// List the exports.
pub const OPT_LIST: u32 = 3;
/// Withdrawn; never used.
pub const OPT_PEEK_EXPORT: u32 = 4;
/// Upgrade to TLS.
pub const OPT_STARTTLS: u32 = 5;
/// Describe an export without entering transmission.
pub const OPT_INFO: u32 = 6;
/// Describe an export and enter transmission.
pub const OPT_GO: u32 = 7;
/// Ask for structured replies.
pub const OPT_STRUCTURED_REPLY: u32 = 8;
/// List metadata contexts.
pub const OPT_LIST_META_CONTEXT: u32 = 9;
/// Select metadata contexts.
pub const OPT_SET_META_CONTEXT: u32 = 10;
/// Ask for 64-bit extended headers.
pub const OPT_EXTENDED_HEADERS: u32 = 11;

// ---------------------------------------------------------------- option replies

/// The option succeeded / a list is complete.
pub const REP_ACK: u32 = 1;
/// One export in the reply to `NBD_OPT_LIST`.
pub const REP_SERVER: u32 = 2;
/// One information item in the reply to `NBD_OPT_INFO` / `NBD_OPT_GO`.
pub const REP_INFO: u32 = 3;
/// One metadata context.
pub const REP_META_CONTEXT: u32 = 4;
/// Error replies have bit 31 set.
pub const REP_FLAG_ERROR: u32 = 1 << 31;
/// The option is not supported by this server.
pub const REP_ERR_UNSUP: u32 = REP_FLAG_ERROR | 1;
/// The option is known and valid, but refused by policy.
pub const REP_ERR_POLICY: u32 = REP_FLAG_ERROR | 2;
/// The option is malformed.
pub const REP_ERR_INVALID: u32 = REP_FLAG_ERROR | 3;
/// The option is not supported on this platform.
pub const REP_ERR_PLATFORM: u32 = REP_FLAG_ERROR | 4;
/// TLS must be negotiated first.
pub const REP_ERR_TLS_REQD: u32 = REP_FLAG_ERROR | 5;
/// The requested export does not exist.
pub const REP_ERR_UNKNOWN: u32 = REP_FLAG_ERROR | 6;
/// The server is shutting down.
pub const REP_ERR_SHUTDOWN: u32 = REP_FLAG_ERROR | 7;
/// The client must request `NBD_INFO_BLOCK_SIZE` before entering transmission.
pub const REP_ERR_BLOCK_SIZE_REQD: u32 = REP_FLAG_ERROR | 8;
/// The request or the reply is too large to process.
pub const REP_ERR_TOO_BIG: u32 = REP_FLAG_ERROR | 9;
/// Extended headers must be negotiated first.
pub const REP_ERR_EXT_HEADER_REQD: u32 = REP_FLAG_ERROR | 10;

// ---------------------------------------------------------------- information types

/// Export size and transmission flags.
pub const INFO_EXPORT: u16 = 0;
/// Canonical export name.
pub const INFO_NAME: u16 = 1;
/// Human-readable export description.
pub const INFO_DESCRIPTION: u16 = 2;
/// Minimum / preferred / maximum block sizes.
pub const INFO_BLOCK_SIZE: u16 = 3;

// ---------------------------------------------------------------- commands

/// Read `len` bytes at `offset`.
pub const CMD_READ: u16 = 0;
/// Write the `len`-byte payload that follows the header.
pub const CMD_WRITE: u16 = 1;
/// Soft disconnect; no reply.
pub const CMD_DISC: u16 = 2;
/// Make all completed writes durable.
pub const CMD_FLUSH: u16 = 3;
/// Discard a range (a hint).
pub const CMD_TRIM: u16 = 4;
/// Prefetch a range (not supported here).
pub const CMD_CACHE: u16 = 5;
/// Zero a range without a payload.
pub const CMD_WRITE_ZEROES: u16 = 6;
/// Query metadata contexts (needs structured replies; not supported here).
pub const CMD_BLOCK_STATUS: u16 = 7;
/// Resize the export (experimental; not supported here).
pub const CMD_RESIZE: u16 = 8;

// ---------------------------------------------------------------- command flags

/// Force unit access: reply only once the command's writes are durable.
pub const CMD_FLAG_FUA: u16 = 1 << 0;
/// `NBD_CMD_WRITE_ZEROES`: the range must end up allocated, not a hole.
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
/// `NBD_CMD_READ`: do not fragment the structured reply.
pub const CMD_FLAG_DF: u16 = 1 << 2;
/// `NBD_CMD_BLOCK_STATUS`: one extent only.
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
/// `NBD_CMD_WRITE_ZEROES`: fail fast unless zeroing is faster than writing.
pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;
/// Extended headers: the request carries a payload length.
pub const CMD_FLAG_PAYLOAD_LEN: u16 = 1 << 5;

// ---------------------------------------------------------------- error values
//
// The spec fixes these numbers on the wire ("Error values"); they coincide with Linux
// errno values but must not be taken from the host's libc.

/// Operation not permitted (writes to a read-only export).
pub const EPERM: u32 = 1;
/// Input/output error.
pub const EIO: u32 = 5;
/// Cannot allocate memory (the spec asks servers to avoid it).
pub const ENOMEM: u32 = 12;
/// Invalid argument.
pub const EINVAL: u32 = 22;
/// No space left on device (writes beyond the end of the export).
pub const ENOSPC: u32 = 28;
/// Value too large.
pub const EOVERFLOW: u32 = 75;
/// Operation not supported (fast-zero only).
pub const ENOTSUP: u32 = 95;
/// The server is shutting down.
pub const ESHUTDOWN: u32 = 108;

// ---------------------------------------------------------------- size constraints

/// Minimum block size advertised in `NBD_INFO_BLOCK_SIZE` and enforced by
/// [`transmission::validate`]: the backing device is opened with `O_DIRECT`.
pub const MIN_BLOCK: u32 = 512;
/// Preferred block size advertised in `NBD_INFO_BLOCK_SIZE`.
pub const PREFERRED_BLOCK: u32 = 4096;
/// Maximum payload of one read or write (2^25, the spec's interoperable default), also
/// advertised as the maximum block size.
pub const MAX_REQUEST: u32 = 32 << 20;

/// The spec's name for an option code, for logs and error messages.
pub fn option_name(opt: u32) -> &'static str {
    match opt {
        OPT_EXPORT_NAME => "NBD_OPT_EXPORT_NAME",
        OPT_ABORT => "NBD_OPT_ABORT",
        OPT_LIST => "NBD_OPT_LIST",
        OPT_PEEK_EXPORT => "NBD_OPT_PEEK_EXPORT",
        OPT_STARTTLS => "NBD_OPT_STARTTLS",
        OPT_INFO => "NBD_OPT_INFO",
        OPT_GO => "NBD_OPT_GO",
        OPT_STRUCTURED_REPLY => "NBD_OPT_STRUCTURED_REPLY",
        OPT_LIST_META_CONTEXT => "NBD_OPT_LIST_META_CONTEXT",
        OPT_SET_META_CONTEXT => "NBD_OPT_SET_META_CONTEXT",
        OPT_EXTENDED_HEADERS => "NBD_OPT_EXTENDED_HEADERS",
        _ => "unknown option",
    }
}

/// Why an NBD connection cannot continue. Every variant means the connection must be
/// closed; recoverable protocol errors are answered on the wire instead.
#[derive(Debug, thiserror::Error)]
pub enum NbdError {
    /// The socket failed, timed out, or the client closed it in the middle of a message.
    #[error("NBD socket error while {context}: {source}")]
    Io {
        /// What the server was doing.
        context: &'static str,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The client did not set `NBD_FLAG_C_FIXED_NEWSTYLE`; only fixed newstyle is served.
    #[error(
        "NBD client does not speak fixed newstyle negotiation (client flags {0:#x} lack \
         NBD_FLAG_C_FIXED_NEWSTYLE); old or non-fixed newstyle clients are not supported"
    )]
    NotFixedNewstyle(u32),
    /// The client set flags the server did not advertise (the spec says: drop it).
    #[error("NBD client set unknown client flags {0:#x}")]
    UnknownClientFlags(u32),
    /// An option did not start with `IHAVEOPT`.
    #[error("bad NBD option magic {0:#018x} (expected IHAVEOPT {IHAVEOPT:#018x})")]
    BadOptionMagic(u64),
    /// The client kept negotiating beyond the option budget.
    #[error("NBD client sent more than {0} options without entering transmission")]
    TooManyOptions(usize),
    /// An option's data exceeds what the server is willing to read or discard.
    #[error(
        "NBD client sent {len} bytes of data with {name} ({option}), over the {max}-byte limit"
    )]
    OptionTooLarge {
        /// The option code.
        option: u32,
        /// Its spec name.
        name: &'static str,
        /// The announced data length.
        len: u32,
        /// The limit that applied.
        max: u64,
    },
    /// `NBD_OPT_EXPORT_NAME` named an export that does not exist (it cannot be refused
    /// with an error reply, so the session ends).
    #[error("NBD client asked for unknown export {0:?} with NBD_OPT_EXPORT_NAME")]
    UnknownExport(String),
    /// `NBD_OPT_EXPORT_NAME` carried a name that is not UTF-8.
    #[error("NBD client sent an export name that is not valid UTF-8 with NBD_OPT_EXPORT_NAME")]
    BadExportName,
    /// A transmission request did not start with `NBD_REQUEST_MAGIC`.
    #[error("bad NBD request magic {0:#010x} (expected {REQUEST_MAGIC:#010x})")]
    BadRequestMagic(u32),
    /// A write announced a payload larger than [`MAX_REQUEST`].
    #[error("NBD write of {len} bytes exceeds the {MAX_REQUEST}-byte request limit")]
    WriteTooLarge {
        /// The announced payload length.
        len: u32,
    },
    /// [`transmission::RequestParser::parse`] was called again after a framing error.
    #[error("NBD request stream is out of sync after an earlier protocol error")]
    Desynchronized,
}
