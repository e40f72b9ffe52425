//! NBD protocol constants and small encoders, from the NBD protocol specification
//! (NetworkBlockDevice/nbd `doc/proto.md`). Shared by the client and by tests that speak
//! raw protocol to a server.

/// `NBDMAGIC`, the first 8 bytes a server sends.
pub const NBD_MAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: the newstyle magic sent by the server, and the prefix of every client option.
pub const NBD_IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Second magic of the (unsupported) oldstyle handshake.
pub const NBD_OLDSTYLE_MAGIC: u64 = 0x0000_4202_8186_1253;
/// Magic of every fixed-newstyle option reply.
pub const NBD_REP_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Magic of a transmission request.
pub const NBD_REQUEST_MAGIC: u32 = 0x2560_9513;
/// Magic of a simple reply.
pub const NBD_SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Magic of a structured reply chunk (only legal after `NBD_OPT_STRUCTURED_REPLY`).
pub const NBD_STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

/// Handshake flag: the server supports fixed newstyle.
pub const NBD_FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
/// Handshake flag: the server can omit the 124 zero bytes after `NBD_OPT_EXPORT_NAME`.
pub const NBD_FLAG_NO_ZEROES: u16 = 1 << 1;
/// Client flag: the client speaks fixed newstyle.
pub const NBD_FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
/// Client flag: the server must not send the 124 zero bytes.
pub const NBD_FLAG_C_NO_ZEROES: u32 = 1 << 1;

/// Transmission flag bit 0: always set.
pub const NBD_FLAG_HAS_FLAGS: u16 = 1 << 0;
/// The export is read-only: writes must fail.
pub const NBD_FLAG_READ_ONLY: u16 = 1 << 1;
/// The server accepts `NBD_CMD_FLUSH`.
pub const NBD_FLAG_SEND_FLUSH: u16 = 1 << 2;
/// The server accepts `NBD_CMD_FLAG_FUA`.
pub const NBD_FLAG_SEND_FUA: u16 = 1 << 3;
/// The export behaves like a rotational medium (a hint).
pub const NBD_FLAG_ROTATIONAL: u16 = 1 << 4;
/// The server accepts `NBD_CMD_TRIM`.
pub const NBD_FLAG_SEND_TRIM: u16 = 1 << 5;
/// The server accepts `NBD_CMD_WRITE_ZEROES`.
pub const NBD_FLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
/// "Don't fragment" for structured reads; must be clear without structured replies.
pub const NBD_FLAG_SEND_DF: u16 = 1 << 7;
/// Flush/FUA are visible across connections.
pub const NBD_FLAG_CAN_MULTI_CONN: u16 = 1 << 8;
/// Experimental RESIZE extension.
pub const NBD_FLAG_SEND_RESIZE: u16 = 1 << 9;
/// The server understands `NBD_CMD_CACHE`.
pub const NBD_FLAG_SEND_CACHE: u16 = 1 << 10;
/// The server accepts `NBD_CMD_FLAG_FAST_ZERO`; requires `NBD_FLAG_SEND_WRITE_ZEROES`.
pub const NBD_FLAG_SEND_FAST_ZERO: u16 = 1 << 11;
/// Experimental EXTENDED_HEADERS extension; illegal unless extended headers were negotiated.
pub const NBD_FLAG_BLOCK_STATUS_PAYLOAD: u16 = 1 << 12;

/// Option: choose an export and enter transmission (no error reply possible).
pub const NBD_OPT_EXPORT_NAME: u32 = 1;
/// Option: abort the negotiation (soft disconnect).
pub const NBD_OPT_ABORT: u32 = 2;
/// Option: list the exports.
pub const NBD_OPT_LIST: u32 = 3;
/// Option: upgrade to TLS.
pub const NBD_OPT_STARTTLS: u32 = 5;
/// Option: query an export.
pub const NBD_OPT_INFO: u32 = 6;
/// Option: query an export and enter transmission.
pub const NBD_OPT_GO: u32 = 7;
/// Option: negotiate structured replies.
pub const NBD_OPT_STRUCTURED_REPLY: u32 = 8;
/// Option: list metadata contexts.
pub const NBD_OPT_LIST_META_CONTEXT: u32 = 9;
/// Option: select metadata contexts.
pub const NBD_OPT_SET_META_CONTEXT: u32 = 10;
/// Option: extended headers (experimental extension).
pub const NBD_OPT_EXTENDED_HEADERS: u32 = 11;

/// Option reply: success / end of a list.
pub const NBD_REP_ACK: u32 = 1;
/// Option reply: one export of `NBD_OPT_LIST`.
pub const NBD_REP_SERVER: u32 = 2;
/// Option reply: one information item of `NBD_OPT_INFO` / `NBD_OPT_GO`.
pub const NBD_REP_INFO: u32 = 3;
/// Option reply: one metadata context.
pub const NBD_REP_META_CONTEXT: u32 = 4;
/// Bit 31 marks an error reply.
pub const NBD_REP_FLAG_ERROR: u32 = 1 << 31;
/// The option is unknown to the server.
pub const NBD_REP_ERR_UNSUP: u32 = NBD_REP_FLAG_ERROR | 1;
/// The server's policy forbids the option.
pub const NBD_REP_ERR_POLICY: u32 = NBD_REP_FLAG_ERROR | 2;
/// The option was syntactically or semantically invalid.
pub const NBD_REP_ERR_INVALID: u32 = NBD_REP_FLAG_ERROR | 3;
/// The option is not supported on the server's platform.
pub const NBD_REP_ERR_PLATFORM: u32 = NBD_REP_FLAG_ERROR | 4;
/// TLS is required first.
pub const NBD_REP_ERR_TLS_REQD: u32 = NBD_REP_FLAG_ERROR | 5;
/// The export does not exist.
pub const NBD_REP_ERR_UNKNOWN: u32 = NBD_REP_FLAG_ERROR | 6;
/// The server is shutting down.
pub const NBD_REP_ERR_SHUTDOWN: u32 = NBD_REP_FLAG_ERROR | 7;
/// The client must request `NBD_INFO_BLOCK_SIZE`.
pub const NBD_REP_ERR_BLOCK_SIZE_REQD: u32 = NBD_REP_FLAG_ERROR | 8;
/// The request or reply is too large.
pub const NBD_REP_ERR_TOO_BIG: u32 = NBD_REP_FLAG_ERROR | 9;
/// Extended headers are required (experimental extension).
pub const NBD_REP_ERR_EXT_HEADER_REQD: u32 = NBD_REP_FLAG_ERROR | 10;

/// Information item: export size and transmission flags (mandatory before a successful ACK).
pub const NBD_INFO_EXPORT: u16 = 0;
/// Information item: canonical export name.
pub const NBD_INFO_NAME: u16 = 1;
/// Information item: export description.
pub const NBD_INFO_DESCRIPTION: u16 = 2;
/// Information item: minimum, preferred and maximum block sizes.
pub const NBD_INFO_BLOCK_SIZE: u16 = 3;

/// Command: read.
pub const NBD_CMD_READ: u16 = 0;
/// Command: write (payload follows the header).
pub const NBD_CMD_WRITE: u16 = 1;
/// Command: disconnect (no reply).
pub const NBD_CMD_DISC: u16 = 2;
/// Command: flush.
pub const NBD_CMD_FLUSH: u16 = 3;
/// Command: trim (discard hint).
pub const NBD_CMD_TRIM: u16 = 4;
/// Command: cache hint.
pub const NBD_CMD_CACHE: u16 = 5;
/// Command: write zeroes.
pub const NBD_CMD_WRITE_ZEROES: u16 = 6;
/// Command: block status (structured replies only).
pub const NBD_CMD_BLOCK_STATUS: u16 = 7;

/// Command flag: force unit access.
pub const NBD_CMD_FLAG_FUA: u16 = 1 << 0;
/// Command flag: write zeroes must not punch a hole.
pub const NBD_CMD_FLAG_NO_HOLE: u16 = 1 << 1;

/// Transmission error: operation not permitted.
pub const NBD_EPERM: u32 = 1;
/// Transmission error: input/output error.
pub const NBD_EIO: u32 = 5;
/// Transmission error: cannot allocate memory.
pub const NBD_ENOMEM: u32 = 12;
/// Transmission error: invalid argument.
pub const NBD_EINVAL: u32 = 22;
/// Transmission error: no space left on device.
pub const NBD_ENOSPC: u32 = 28;
/// Transmission error: value too large.
pub const NBD_EOVERFLOW: u32 = 75;
/// Transmission error: operation not supported.
pub const NBD_ENOTSUP: u32 = 95;
/// Transmission error: the server is shutting down.
pub const NBD_ESHUTDOWN: u32 = 108;

/// Size of a request header on the wire.
pub const REQUEST_HEADER_LEN: usize = 28;
/// Size of a simple reply header on the wire.
pub const SIMPLE_REPLY_LEN: usize = 16;

/// Encodes a request header (without the write payload).
pub fn encode_request(
    flags: u16,
    command: u16,
    handle: u64,
    offset: u64,
    len: u32,
) -> [u8; REQUEST_HEADER_LEN] {
    let mut b = [0u8; REQUEST_HEADER_LEN];
    b[0..4].copy_from_slice(&NBD_REQUEST_MAGIC.to_be_bytes());
    b[4..6].copy_from_slice(&flags.to_be_bytes());
    b[6..8].copy_from_slice(&command.to_be_bytes());
    b[8..16].copy_from_slice(&handle.to_be_bytes());
    b[16..24].copy_from_slice(&offset.to_be_bytes());
    b[24..28].copy_from_slice(&len.to_be_bytes());
    b
}

/// Decodes a simple reply header into (magic, error, handle); the magic is not checked here.
pub fn decode_simple_reply(b: &[u8; SIMPLE_REPLY_LEN]) -> (u32, u32, u64) {
    let magic = u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
    let error = u32::from_be_bytes([b[4], b[5], b[6], b[7]]);
    let mut h = [0u8; 8];
    h.copy_from_slice(&b[8..16]);
    (magic, error, u64::from_be_bytes(h))
}

/// The name of an option, for messages.
pub fn option_name(option: u32) -> String {
    let name = match option {
        NBD_OPT_EXPORT_NAME => "NBD_OPT_EXPORT_NAME",
        NBD_OPT_ABORT => "NBD_OPT_ABORT",
        NBD_OPT_LIST => "NBD_OPT_LIST",
        NBD_OPT_STARTTLS => "NBD_OPT_STARTTLS",
        NBD_OPT_INFO => "NBD_OPT_INFO",
        NBD_OPT_GO => "NBD_OPT_GO",
        NBD_OPT_STRUCTURED_REPLY => "NBD_OPT_STRUCTURED_REPLY",
        NBD_OPT_LIST_META_CONTEXT => "NBD_OPT_LIST_META_CONTEXT",
        NBD_OPT_SET_META_CONTEXT => "NBD_OPT_SET_META_CONTEXT",
        NBD_OPT_EXTENDED_HEADERS => "NBD_OPT_EXTENDED_HEADERS",
        other => return format!("option {other}"),
    };
    name.to_string()
}

/// The name of an option reply type, for messages.
pub fn reply_type_name(reply: u32) -> String {
    let name = match reply {
        NBD_REP_ACK => "NBD_REP_ACK",
        NBD_REP_SERVER => "NBD_REP_SERVER",
        NBD_REP_INFO => "NBD_REP_INFO",
        NBD_REP_META_CONTEXT => "NBD_REP_META_CONTEXT",
        NBD_REP_ERR_UNSUP => "NBD_REP_ERR_UNSUP",
        NBD_REP_ERR_POLICY => "NBD_REP_ERR_POLICY",
        NBD_REP_ERR_INVALID => "NBD_REP_ERR_INVALID",
        NBD_REP_ERR_PLATFORM => "NBD_REP_ERR_PLATFORM",
        NBD_REP_ERR_TLS_REQD => "NBD_REP_ERR_TLS_REQD",
        NBD_REP_ERR_UNKNOWN => "NBD_REP_ERR_UNKNOWN",
        NBD_REP_ERR_SHUTDOWN => "NBD_REP_ERR_SHUTDOWN",
        NBD_REP_ERR_BLOCK_SIZE_REQD => "NBD_REP_ERR_BLOCK_SIZE_REQD",
        NBD_REP_ERR_TOO_BIG => "NBD_REP_ERR_TOO_BIG",
        NBD_REP_ERR_EXT_HEADER_REQD => "NBD_REP_ERR_EXT_HEADER_REQD",
        other if other & NBD_REP_FLAG_ERROR != 0 => {
            return format!("NBD_REP_ERR_? (2^31 + {})", other & !NBD_REP_FLAG_ERROR)
        }
        other => return format!("reply type {other}"),
    };
    name.to_string()
}

/// The name of a command, for messages.
pub fn command_name(command: u16) -> String {
    let name = match command {
        NBD_CMD_READ => "NBD_CMD_READ",
        NBD_CMD_WRITE => "NBD_CMD_WRITE",
        NBD_CMD_DISC => "NBD_CMD_DISC",
        NBD_CMD_FLUSH => "NBD_CMD_FLUSH",
        NBD_CMD_TRIM => "NBD_CMD_TRIM",
        NBD_CMD_CACHE => "NBD_CMD_CACHE",
        NBD_CMD_WRITE_ZEROES => "NBD_CMD_WRITE_ZEROES",
        NBD_CMD_BLOCK_STATUS => "NBD_CMD_BLOCK_STATUS",
        other => return format!("command {other}"),
    };
    name.to_string()
}

/// The name of a transmission error value, for messages. Values outside the set the
/// specification defines are shown as numbers.
pub fn errno_name(errno: u32) -> String {
    let name = match errno {
        NBD_EPERM => "NBD_EPERM",
        NBD_EIO => "NBD_EIO",
        NBD_ENOMEM => "NBD_ENOMEM",
        NBD_EINVAL => "NBD_EINVAL",
        NBD_ENOSPC => "NBD_ENOSPC",
        NBD_EOVERFLOW => "NBD_EOVERFLOW",
        NBD_ENOTSUP => "NBD_ENOTSUP",
        NBD_ESHUTDOWN => "NBD_ESHUTDOWN",
        other => return format!("undefined error value {other}"),
    };
    name.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_header_layout() {
        let b = encode_request(
            NBD_CMD_FLAG_FUA,
            NBD_CMD_WRITE,
            0x0102030405060708,
            4096,
            512,
        );
        assert_eq!(&b[0..4], &[0x25, 0x60, 0x95, 0x13]);
        assert_eq!(&b[4..8], &[0, 1, 0, 1]);
        assert_eq!(&b[8..16], &[1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(&b[16..24], &[0, 0, 0, 0, 0, 0, 0x10, 0]);
        assert_eq!(&b[24..28], &[0, 0, 2, 0]);
    }

    #[test]
    fn magics_spell_ascii() {
        assert_eq!(&NBD_MAGIC.to_be_bytes(), b"NBDMAGIC");
        assert_eq!(&NBD_IHAVEOPT.to_be_bytes(), b"IHAVEOPT");
    }

    #[test]
    fn names() {
        assert_eq!(reply_type_name(NBD_REP_ERR_UNKNOWN), "NBD_REP_ERR_UNKNOWN");
        assert_eq!(
            reply_type_name(NBD_REP_FLAG_ERROR | 77),
            "NBD_REP_ERR_? (2^31 + 77)"
        );
        assert_eq!(errno_name(5), "NBD_EIO");
        assert_eq!(option_name(99), "option 99");
    }
}
