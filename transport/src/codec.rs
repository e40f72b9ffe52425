//! The replication stream's frames: every engine [`Msg`] travels as one frame.
//!
//! ```text
//!  0  magic        4  "BRFM"
//!  4  version      2  WIRE_VERSION
//!  6  kind         1  message kind (KIND_*)
//!  7  flags        1  FLAG_LINK_AUTHENTICATED | FLAG_LZ4, or 0
//!  8  body_len     4  bytes of body (<= MAX_BODY)
//! 12  payload_len  4  bytes of payload (<= MAX_PAYLOAD; write items only)
//! 16  body         body_len bytes, little endian fields per kind
//!  .  checksum     16  first 16 bytes of blake3(header || body)
//!  .  payload      payload_len bytes
//! ```
//!
//! A write item's body carries the blake3 of its data, so the checksum protects the
//! payload too: the decoder recomputes the data hash and refuses the frame on a mismatch.
//! On a TLS link the record layer authenticates every byte already (AEAD), so the sender
//! may leave the data hash out (zeros) and set `FLAG_LINK_AUTHENTICATED`; a decoder for a
//! plaintext link refuses such frames. The header and body checksum stays on both.
//! With `FLAG_LZ4` a write item's payload is an LZ4 block (lz4_flex) that decompresses to
//! the item's length; the data hash, when present, is of the decompressed data. Senders
//! compress only when their configuration asks for it and it saves at least an eighth;
//! any decoder accepts it.
//! Payloads are referenced, not copied, on the send side ([`encode`] returns them apart
//! from the header so the event loop can hand both to one `sendmsg`).

use crate::wire::{Reader, WireError, Writer};
use blkrep_engine::meta::{MAX_DIRTY_RANGES, MAX_HISTORY};
use blkrep_engine::msg::{Hello, ItemKind, Msg, StreamItem};
use blkrep_engine::{AlignedBuf, DiskState, Role};
use bytes::Bytes;

/// Frame magic.
pub const FRAME_MAGIC: [u8; 4] = *b"BRFM";
/// Version of the frame format; the link handshake makes sure both sides speak it.
pub const WIRE_VERSION: u16 = 2;
/// Frame flag: the payload's integrity rests on the link's authenticated encryption (the
/// data hash in the body is zero and not checked).
pub const FLAG_LINK_AUTHENTICATED: u8 = 1;
/// Frame flag: the write item's payload is LZ4-compressed.
pub const FLAG_LZ4: u8 = 2;

/// How to encode frames for a link.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EncodeOpts {
    /// The link authenticates its records (TLS): leave write items' data hash out.
    pub link_authenticated: bool,
    /// Compress write payloads with LZ4 when that saves at least an eighth.
    pub compress: bool,
}
/// Frame header size.
pub const HEADER: usize = 16;
/// Frame checksum size.
pub const SUM: usize = 16;
/// Largest body accepted.
pub const MAX_BODY: usize = 64 << 10;
/// Largest payload accepted (the largest client request).
pub const MAX_PAYLOAD: usize = 32 << 20;

const KIND_HELLO: u8 = 1;
const KIND_ITEM: u8 = 2;
const KIND_ACK: u8 = 3;
const KIND_RESYNC_START: u8 = 4;
const KIND_RESYNC_DONE: u8 = 5;
const KIND_PING: u8 = 6;
const KIND_PONG: u8 = 7;
const KIND_GOODBYE: u8 = 8;
const KIND_PROMOTE_REQUEST: u8 = 9;
const KIND_PROMOTE_GRANT: u8 = 10;
const KIND_PROMOTE_DENY: u8 = 11;
const KIND_VERIFY_REPORT: u8 = 12;
const KIND_READ_REQUEST: u8 = 13;
const KIND_READ_REPLY: u8 = 14;

const OP_WRITE: u8 = 1;
const OP_ZEROES: u8 = 2;
const OP_TRIM: u8 = 3;
const OP_FLUSH: u8 = 4;
const OP_VERIFY: u8 = 5;
/// Hashes one verify item may carry (and ranges one report may list).
const MAX_VERIFY_ENTRIES: usize = 1024;

/// Append the frame for `msg` (header, body, checksum) to `out`; returns the payload to
/// send right after it, if any.
pub fn encode(msg: &Msg, out: &mut Vec<u8>) -> Option<Bytes> {
    encode_with(msg, out, EncodeOpts::default())
}

/// [`encode`] with the link's options: on a link whose records are authenticated (TLS)
/// write items carry no data hash, saving a blake3 pass over the data on each side.
pub fn encode_with(msg: &Msg, out: &mut Vec<u8>, opts: EncodeOpts) -> Option<Bytes> {
    let link_authenticated = opts.link_authenticated;
    let mut flags = 0;
    let start = out.len();
    out.extend_from_slice(&[0u8; HEADER]);
    let mut w = Writer(out);
    let (kind, payload) = match msg {
        Msg::Hello(h) => {
            w.u32(h.version);
            w.str(&h.node);
            w.str(&h.resource);
            w.u64(h.volume_size);
            w.u8(h.role.code());
            w.u8(h.disk_state.code());
            w.u64(h.applied_seq);
            w.u64(h.received_seq);
            w.u64(h.generation);
            w.u8(h.needs_full_sync as u8);
            let n = h.history.len().min(MAX_HISTORY);
            w.u8(n as u8);
            for g in &h.history[..n] {
                w.u64(*g);
            }
            let n = h.dirty.len().min(MAX_DIRTY_RANGES);
            w.u32(n as u32);
            for (s, e) in &h.dirty[..n] {
                w.u64(*s);
                w.u64(*e);
            }
            (KIND_HELLO, None)
        }
        Msg::Item(it) => {
            w.u64(it.seq);
            w.u64(it.dep);
            w.u8(it.resync as u8);
            let payload = match &it.kind {
                ItemKind::Write { offset, data, fua } => {
                    w.u8(OP_WRITE);
                    w.u8(*fua as u8);
                    w.u64(*offset);
                    w.u64(data.len() as u64);
                    data_hash(&mut w, data, link_authenticated, &mut flags);
                    if opts.compress && data.len() >= 512 {
                        let c = lz4_flex::block::compress(data);
                        if c.len() + c.len() / 8 < data.len() {
                            flags |= FLAG_LZ4;
                            Some(Bytes::from(c))
                        } else {
                            Some(data.clone())
                        }
                    } else {
                        Some(data.clone())
                    }
                }
                ItemKind::WriteZeroes { offset, len, fua } => {
                    w.u8(OP_ZEROES);
                    w.u8(*fua as u8);
                    w.u64(*offset);
                    w.u64(*len);
                    None
                }
                ItemKind::Trim { offset, len } => {
                    w.u8(OP_TRIM);
                    w.u8(0);
                    w.u64(*offset);
                    w.u64(*len);
                    None
                }
                ItemKind::Flush => {
                    w.u8(OP_FLUSH);
                    w.u8(0);
                    w.u64(0);
                    w.u64(0);
                    None
                }
                ItemKind::Verify {
                    offset,
                    len,
                    block,
                    hashes,
                } => {
                    w.u8(OP_VERIFY);
                    w.u8(0);
                    w.u64(*offset);
                    w.u64(*len);
                    w.u32(*block);
                    w.u32(hashes.len() as u32);
                    for h in hashes {
                        w.bytes(h);
                    }
                    None
                }
            };
            (KIND_ITEM, payload)
        }
        Msg::Ack { applied, durable } => {
            w.u64(*applied);
            w.u64(*durable);
            (KIND_ACK, None)
        }
        Msg::ResyncStart {
            total_bytes,
            base_seq,
            generation,
        } => {
            w.u64(*total_bytes);
            w.u64(*base_seq);
            w.u64(*generation);
            (KIND_RESYNC_START, None)
        }
        Msg::ResyncDone { seq, generation } => {
            w.u64(*seq);
            w.u64(*generation);
            (KIND_RESYNC_DONE, None)
        }
        Msg::Ping { nonce } => {
            w.u64(*nonce);
            (KIND_PING, None)
        }
        Msg::Pong { nonce } => {
            w.u64(*nonce);
            (KIND_PONG, None)
        }
        Msg::Goodbye { reason } => {
            w.str(reason);
            (KIND_GOODBYE, None)
        }
        Msg::PromoteRequest { nonce } => {
            w.u64(*nonce);
            (KIND_PROMOTE_REQUEST, None)
        }
        Msg::PromoteGrant { nonce } => {
            w.u64(*nonce);
            (KIND_PROMOTE_GRANT, None)
        }
        Msg::PromoteDeny { nonce, reason } => {
            w.u64(*nonce);
            w.str(reason);
            (KIND_PROMOTE_DENY, None)
        }
        Msg::VerifyReport { seq, bad } => {
            w.u64(*seq);
            let n = bad.len().min(MAX_VERIFY_ENTRIES);
            w.u32(n as u32);
            for (s, e) in &bad[..n] {
                w.u64(*s);
                w.u64(*e);
            }
            (KIND_VERIFY_REPORT, None)
        }
        Msg::ReadRequest {
            id,
            offset,
            len,
            after,
        } => {
            w.u64(*id);
            w.u64(*offset);
            w.u64(*len);
            w.u64(*after);
            (KIND_READ_REQUEST, None)
        }
        Msg::ReadReply { id, data } => {
            w.u64(*id);
            match data {
                None => {
                    w.u8(0);
                    (KIND_READ_REPLY, None)
                }
                Some(data) => {
                    w.u8(1);
                    w.u64(data.len() as u64);
                    data_hash(&mut w, data, link_authenticated, &mut flags);
                    (KIND_READ_REPLY, Some(data.clone()))
                }
            }
        }
    };
    let body_len = out.len() - start - HEADER;
    let payload_len = payload.as_ref().map_or(0, |p| p.len());
    let h = &mut out[start..start + HEADER];
    h[0..4].copy_from_slice(&FRAME_MAGIC);
    h[4..6].copy_from_slice(&WIRE_VERSION.to_le_bytes());
    h[6] = kind;
    h[7] = flags;
    h[8..12].copy_from_slice(&(body_len as u32).to_le_bytes());
    h[12..16].copy_from_slice(&(payload_len as u32).to_le_bytes());
    let sum = blake3::hash(&out[start..]);
    out.extend_from_slice(&sum.as_bytes()[..SUM]);
    payload
}

/// The data hash of a payload-carrying body: blake3 of the data, or zeros (and the flag
/// set) on a link whose record layer authenticates every byte.
fn data_hash(w: &mut Writer, data: &[u8], link_authenticated: bool, flags: &mut u8) {
    if link_authenticated {
        *flags |= FLAG_LINK_AUTHENTICATED;
        w.bytes(&[0u8; 32]);
    } else {
        w.bytes(blake3::hash(data).as_bytes());
    }
}

/// Encode a whole frame into one buffer (tests, blocking senders).
pub fn encode_to_vec(msg: &Msg) -> Vec<u8> {
    let mut v = Vec::new();
    if let Some(p) = encode(msg, &mut v) {
        v.extend_from_slice(&p);
    }
    v
}

/// Why a frame was refused. Any of these ends the connection.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    /// The bytes do not start with the frame magic: not our protocol, or a lost frame boundary.
    #[error("bad frame magic {0:02x?}")]
    Magic([u8; 4]),
    /// The peer speaks another frame version.
    #[error("frame version {0}, this node speaks {WIRE_VERSION}")]
    Version(u16),
    /// Body or payload length out of bounds.
    #[error("frame too large: body {body} bytes, payload {payload} bytes")]
    TooLarge { body: usize, payload: usize },
    /// Header and body do not match their checksum.
    #[error("frame checksum mismatch (corrupted or tampered)")]
    Checksum,
    /// A write item's data does not match the blake3 in its body.
    #[error("data checksum mismatch in write item {seq}")]
    DataChecksum { seq: u64 },
    /// A frame without its data hash on a link that does not authenticate its records.
    #[error("frame flags {0:#04x} not allowed on this link (no data hash on a plaintext link?)")]
    Flags(u8),
    /// Unknown message kind.
    #[error("unknown message kind {0}")]
    Kind(u8),
    /// The body is malformed for its kind.
    #[error("malformed {kind} message: {source}")]
    Body {
        kind: &'static str,
        source: WireError,
    },
}

/// Decodes frames from a byte stream. Feed it with [`Decoder::spare`] + [`Decoder::filled`],
/// then take messages with [`Decoder::next`] until it returns `Ok(None)`.
#[derive(Debug, Default)]
pub struct Decoder {
    buf: Vec<u8>,
    start: usize,
    end: usize,
    link_authenticated: bool,
}

impl Decoder {
    /// An empty decoder for a plaintext link (every data hash is checked).
    pub fn new() -> Decoder {
        Decoder::default()
    }

    /// An empty decoder for a link whose records are authenticated (TLS): it accepts
    /// frames without a data hash.
    pub fn for_authenticated_link() -> Decoder {
        Decoder {
            link_authenticated: true,
            ..Decoder::default()
        }
    }

    /// At least `min` writable bytes at the end of the buffer, for the next receive. The
    /// buffer grows to hold a whole frame whose header has arrived.
    pub fn spare(&mut self, min: usize) -> &mut [u8] {
        let need_frame = self.pending_frame_len().unwrap_or(0);
        let want = min.max(need_frame.saturating_sub(self.end - self.start));
        if self.buf.len() - self.end < want {
            // Compact first; grow only if that is not enough.
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
            if self.buf.len() - self.end < want {
                self.buf.resize(self.end + want, 0);
            }
        }
        &mut self.buf[self.end..]
    }

    /// `n` bytes were received into the slice [`Decoder::spare`] returned.
    pub fn filled(&mut self, n: usize) {
        self.end = (self.end + n).min(self.buf.len());
    }

    /// Bytes buffered and not yet decoded.
    pub fn buffered(&self) -> usize {
        self.end - self.start
    }

    fn pending_frame_len(&self) -> Option<usize> {
        let b = &self.buf[self.start..self.end];
        if b.len() < HEADER {
            return None;
        }
        let body = u32::from_le_bytes(b[8..12].try_into().expect("4 bytes")) as usize;
        let payload = u32::from_le_bytes(b[12..16].try_into().expect("4 bytes")) as usize;
        if body > MAX_BODY || payload > MAX_PAYLOAD {
            return None;
        }
        Some(HEADER + body + SUM + payload)
    }

    /// The next whole message, `Ok(None)` when more bytes are needed.
    #[allow(clippy::should_implement_trait)]
    pub fn next(&mut self) -> Result<Option<Msg>, FrameError> {
        let b = &self.buf[self.start..self.end];
        if b.len() < HEADER {
            // Refuse garbage early rather than waiting for a whole header.
            let n = b.len().min(4);
            if b[..n] != FRAME_MAGIC[..n] {
                let mut m = [0u8; 4];
                m[..n].copy_from_slice(&b[..n]);
                return Err(FrameError::Magic(m));
            }
            return Ok(None);
        }
        let (msg, used) = match decode_frame_for(b, self.link_authenticated)? {
            Some(x) => x,
            None => return Ok(None),
        };
        self.start += used;
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
        Ok(Some(msg))
    }
}

/// Decode one frame from the front of `b`: the message and the bytes it used, or `None`
/// when `b` does not hold the whole frame yet.
pub fn decode_frame(b: &[u8]) -> Result<Option<(Msg, usize)>, FrameError> {
    decode_frame_for(b, false)
}

/// [`decode_frame`], accepting frames without a data hash when `link_authenticated`.
pub fn decode_frame_for(
    b: &[u8],
    link_authenticated: bool,
) -> Result<Option<(Msg, usize)>, FrameError> {
    if b.len() < HEADER {
        return Ok(None);
    }
    let magic: [u8; 4] = b[0..4].try_into().expect("4 bytes");
    if magic != FRAME_MAGIC {
        return Err(FrameError::Magic(magic));
    }
    let version = u16::from_le_bytes([b[4], b[5]]);
    if version != WIRE_VERSION {
        return Err(FrameError::Version(version));
    }
    let kind = b[6];
    let flags = b[7];
    let allowed = if link_authenticated {
        FLAG_LINK_AUTHENTICATED | FLAG_LZ4
    } else {
        FLAG_LZ4
    };
    if flags & !allowed != 0 {
        return Err(FrameError::Flags(flags));
    }
    let body_len = u32::from_le_bytes(b[8..12].try_into().expect("4 bytes")) as usize;
    let payload_len = u32::from_le_bytes(b[12..16].try_into().expect("4 bytes")) as usize;
    if body_len > MAX_BODY || payload_len > MAX_PAYLOAD {
        return Err(FrameError::TooLarge {
            body: body_len,
            payload: payload_len,
        });
    }
    let total = HEADER + body_len + SUM + payload_len;
    if b.len() < total {
        return Ok(None);
    }
    let sum_at = HEADER + body_len;
    if blake3::hash(&b[..sum_at]).as_bytes()[..SUM] != b[sum_at..sum_at + SUM] {
        return Err(FrameError::Checksum);
    }
    let body = &b[HEADER..sum_at];
    let payload = &b[sum_at + SUM..total];
    let msg = decode_body(kind, body, payload, flags)?;
    Ok(Some((msg, total)))
}

fn decode_body(kind: u8, body: &[u8], payload: &[u8], flags: u8) -> Result<Msg, FrameError> {
    let unhashed = flags & FLAG_LINK_AUTHENTICATED != 0;
    let lz4 = flags & FLAG_LZ4 != 0;
    let name = match kind {
        KIND_HELLO => "hello",
        KIND_ITEM => "item",
        KIND_ACK => "ack",
        KIND_RESYNC_START => "resync-start",
        KIND_RESYNC_DONE => "resync-done",
        KIND_PING => "ping",
        KIND_PONG => "pong",
        KIND_GOODBYE => "goodbye",
        KIND_PROMOTE_REQUEST => "promote-request",
        KIND_PROMOTE_GRANT => "promote-grant",
        KIND_PROMOTE_DENY => "promote-deny",
        KIND_VERIFY_REPORT => "verify-report",
        KIND_READ_REQUEST => "read-request",
        KIND_READ_REPLY => "read-reply",
        k => return Err(FrameError::Kind(k)),
    };
    let bad = |source| FrameError::Body { kind: name, source };
    let mut r = Reader::new(body);
    let msg = (|| -> Result<Result<Msg, FrameError>, WireError> {
        if kind != KIND_ITEM && kind != KIND_READ_REPLY && !payload.is_empty() {
            return Err(WireError::Invalid("payload on a message that has none"));
        }
        Ok(Ok(match kind {
            KIND_HELLO => Msg::Hello(Hello {
                version: r.u32()?,
                node: r.str()?,
                resource: r.str()?,
                volume_size: r.u64()?,
                role: Role::from_code(r.u8()?).ok_or(WireError::Invalid("unknown role"))?,
                disk_state: DiskState::from_code(r.u8()?)
                    .ok_or(WireError::Invalid("unknown disk state"))?,
                applied_seq: r.u64()?,
                received_seq: r.u64()?,
                generation: r.u64()?,
                needs_full_sync: r.bool()?,
                history: {
                    let n = r.u8()? as usize;
                    if n > MAX_HISTORY {
                        return Err(WireError::Invalid("generation history too long"));
                    }
                    (0..n).map(|_| r.u64()).collect::<Result<_, _>>()?
                },
                dirty: {
                    let n = r.u32()? as usize;
                    if n > MAX_DIRTY_RANGES {
                        return Err(WireError::Invalid("dirty set too long"));
                    }
                    let mut v = Vec::with_capacity(n);
                    for _ in 0..n {
                        let (s, e) = (r.u64()?, r.u64()?);
                        if s >= e {
                            return Err(WireError::Invalid("empty dirty range"));
                        }
                        v.push((s, e));
                    }
                    v
                },
            }),
            KIND_ITEM => {
                let seq = r.u64()?;
                let dep = r.u64()?;
                let resync = r.bool()?;
                let op = r.u8()?;
                let fua = r.bool()?;
                let offset = r.u64()?;
                let len = r.u64()?;
                let kind = match op {
                    OP_WRITE => {
                        let hash: [u8; 32] = r.array()?;
                        // Into aligned memory: the applier writes it with O_DIRECT.
                        let mut data = if lz4 {
                            if len > MAX_PAYLOAD as u64 {
                                return Err(WireError::Invalid("compressed write too large"));
                            }
                            let mut buf = AlignedBuf::zeroed(len as usize);
                            match lz4_flex::block::decompress_into(payload, buf.as_mut_slice()) {
                                Ok(n) if n as u64 == len => buf,
                                _ => {
                                    return Err(WireError::Invalid(
                                        "compressed write does not decompress to its length",
                                    ))
                                }
                            }
                        } else {
                            if payload.len() as u64 != len {
                                return Err(WireError::Invalid(
                                    "write length differs from payload",
                                ));
                            }
                            AlignedBuf::copy_from(payload)
                        };
                        if !unhashed && blake3::hash(data.as_mut_slice()).as_bytes() != &hash {
                            return Ok(Err(FrameError::DataChecksum { seq }));
                        }
                        ItemKind::Write {
                            offset,
                            data: data.freeze(),
                            fua,
                        }
                    }
                    _ if !payload.is_empty() => {
                        return Err(WireError::Invalid("payload on a non-write item"))
                    }
                    OP_ZEROES => ItemKind::WriteZeroes { offset, len, fua },
                    OP_TRIM => ItemKind::Trim { offset, len },
                    OP_FLUSH => ItemKind::Flush,
                    OP_VERIFY => {
                        let block = r.u32()?;
                        let n = r.u32()? as usize;
                        if n > MAX_VERIFY_ENTRIES || block == 0 {
                            return Err(WireError::Invalid("malformed verify item"));
                        }
                        let mut hashes = Vec::with_capacity(n);
                        for _ in 0..n {
                            hashes.push(r.array()?);
                        }
                        ItemKind::Verify {
                            offset,
                            len,
                            block,
                            hashes,
                        }
                    }
                    _ => return Err(WireError::Invalid("unknown item operation")),
                };
                Msg::Item(StreamItem {
                    seq,
                    dep,
                    resync,
                    kind,
                })
            }
            KIND_ACK => Msg::Ack {
                applied: r.u64()?,
                durable: r.u64()?,
            },
            KIND_RESYNC_START => Msg::ResyncStart {
                total_bytes: r.u64()?,
                base_seq: r.u64()?,
                generation: r.u64()?,
            },
            KIND_RESYNC_DONE => Msg::ResyncDone {
                seq: r.u64()?,
                generation: r.u64()?,
            },
            KIND_PING => Msg::Ping { nonce: r.u64()? },
            KIND_PONG => Msg::Pong { nonce: r.u64()? },
            KIND_PROMOTE_REQUEST => Msg::PromoteRequest { nonce: r.u64()? },
            KIND_PROMOTE_GRANT => Msg::PromoteGrant { nonce: r.u64()? },
            KIND_PROMOTE_DENY => Msg::PromoteDeny {
                nonce: r.u64()?,
                reason: r.str()?,
            },
            KIND_VERIFY_REPORT => {
                let seq = r.u64()?;
                let n = r.u32()? as usize;
                if n > MAX_VERIFY_ENTRIES {
                    return Err(WireError::Invalid("verify report too long"));
                }
                let mut bad = Vec::with_capacity(n);
                for _ in 0..n {
                    let (s, e) = (r.u64()?, r.u64()?);
                    if s >= e {
                        return Err(WireError::Invalid("empty range in a verify report"));
                    }
                    bad.push((s, e));
                }
                Msg::VerifyReport { seq, bad }
            }
            KIND_READ_REQUEST => Msg::ReadRequest {
                id: r.u64()?,
                offset: r.u64()?,
                len: r.u64()?,
                after: r.u64()?,
            },
            KIND_READ_REPLY => {
                let id = r.u64()?;
                if !r.bool()? {
                    if !payload.is_empty() {
                        return Err(WireError::Invalid("payload on a failed read reply"));
                    }
                    Msg::ReadReply { id, data: None }
                } else {
                    let len = r.u64()?;
                    let hash: [u8; 32] = r.array()?;
                    if payload.len() as u64 != len {
                        return Err(WireError::Invalid("read reply length differs from payload"));
                    }
                    if lz4 {
                        return Err(WireError::Invalid("compressed read reply"));
                    }
                    let data = AlignedBuf::copy_from(payload).freeze();
                    if !unhashed && blake3::hash(&data).as_bytes() != &hash {
                        return Ok(Err(FrameError::DataChecksum { seq: id }));
                    }
                    Msg::ReadReply {
                        id,
                        data: Some(data),
                    }
                }
            }
            _ => Msg::Goodbye { reason: r.str()? },
        }))
    })()
    .map_err(bad)??;
    r.finish().map_err(bad)?;
    Ok(msg)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn samples() -> Vec<Msg> {
        vec![
            Msg::Hello(Hello {
                version: 1,
                node: "alpha".into(),
                resource: "r0".into(),
                volume_size: 1 << 30,
                role: Role::Primary,
                disk_state: DiskState::UpToDate,
                applied_seq: 42,
                received_seq: 43,
                generation: 0xdead_beef,
                needs_full_sync: true,
                history: vec![7, 3],
                dirty: vec![(0, 4096), (1 << 20, 2 << 20)],
            }),
            Msg::Item(StreamItem {
                seq: 7,
                dep: 5,
                resync: false,
                kind: ItemKind::Write {
                    offset: 4096,
                    data: Bytes::from(vec![0xab; 8192]),
                    fua: true,
                },
            }),
            Msg::Item(StreamItem {
                seq: 8,
                dep: 7,
                resync: true,
                kind: ItemKind::WriteZeroes {
                    offset: 0,
                    len: 1 << 20,
                    fua: false,
                },
            }),
            Msg::Item(StreamItem {
                seq: 9,
                dep: 8,
                resync: false,
                kind: ItemKind::Trim {
                    offset: 512,
                    len: 512,
                },
            }),
            Msg::Item(StreamItem {
                seq: 10,
                dep: 9,
                resync: false,
                kind: ItemKind::Flush,
            }),
            Msg::Ack {
                applied: 10,
                durable: 9,
            },
            Msg::ResyncStart {
                total_bytes: 99,
                base_seq: 3,
                generation: 0xabc,
            },
            Msg::ResyncDone {
                seq: 77,
                generation: 0xabc,
            },
            Msg::Ping { nonce: 1 },
            Msg::Pong { nonce: 2 },
            Msg::Goodbye {
                reason: "bye".into(),
            },
            Msg::PromoteRequest { nonce: 5 },
            Msg::PromoteGrant { nonce: 5 },
            Msg::PromoteDeny {
                nonce: 6,
                reason: "no".into(),
            },
            Msg::ReadRequest {
                id: 7,
                offset: 4096,
                len: 8192,
                after: 41,
            },
            Msg::ReadReply {
                id: 7,
                data: Some(Bytes::from(vec![0x5a; 8192])),
            },
            Msg::ReadReply { id: 8, data: None },
        ]
    }

    #[test]
    fn a_read_reply_with_corrupted_data_is_refused() {
        let mut f = encode_to_vec(&Msg::ReadReply {
            id: 9,
            data: Some(Bytes::from(vec![1u8; 4096])),
        });
        let n = f.len();
        f[n - 1] ^= 1; // in the payload: the frame checksum covers header and body only
        assert!(matches!(
            decode_frame(&f),
            Err(FrameError::DataChecksum { seq: 9 })
        ));
    }

    #[test]
    fn roundtrip_byte_by_byte() {
        let msgs = samples();
        let mut stream = Vec::new();
        for m in &msgs {
            stream.extend(encode_to_vec(m));
        }
        let mut d = Decoder::new();
        let mut got = Vec::new();
        for b in stream {
            d.spare(1)[0] = b;
            d.filled(1);
            while let Some(m) = d.next().unwrap() {
                got.push(m);
            }
        }
        assert_eq!(got, msgs);
        assert_eq!(d.buffered(), 0);
        // Decoded write payloads are aligned for O_DIRECT.
        if let Msg::Item(StreamItem {
            kind: ItemKind::Write { data, .. },
            ..
        }) = &got[1]
        {
            assert!(blkrep_engine::buf::is_aligned(data));
        }
    }

    #[test]
    fn big_chunks() {
        let msgs = samples();
        let mut stream = Vec::new();
        for m in &msgs {
            stream.extend(encode_to_vec(m));
        }
        let mut d = Decoder::new();
        let s = d.spare(stream.len());
        s[..stream.len()].copy_from_slice(&stream);
        d.filled(stream.len());
        let mut n = 0;
        while d.next().unwrap().is_some() {
            n += 1;
        }
        assert_eq!(n, msgs.len());
    }

    #[test]
    fn every_corruption_is_refused() {
        for m in samples() {
            let good = encode_to_vec(&m);
            for i in 0..good.len() {
                let mut bad = good.clone();
                bad[i] ^= 0x10;
                let r = decode_frame(&bad);
                assert!(
                    !matches!(r, Ok(Some((ref got, _))) if *got == m),
                    "flipping byte {i} of {m:?} went unnoticed"
                );
                // A length field flipped upwards just waits for more bytes; anything
                // else must be an error.
                if let Ok(Some(_)) = r {
                    panic!("corrupt frame decoded: byte {i} of {m:?}");
                }
            }
        }
    }

    #[test]
    fn garbage_and_other_versions() {
        let mut d = Decoder::new();
        d.spare(3)[..3].copy_from_slice(b"GET");
        d.filled(3);
        assert!(matches!(d.next(), Err(FrameError::Magic(_))));
        let mut f = encode_to_vec(&Msg::Ping { nonce: 1 });
        f[4] = 9;
        assert_eq!(decode_frame(&f).unwrap_err(), FrameError::Version(9));
        let mut f = encode_to_vec(&Msg::Ping { nonce: 1 });
        f[12..16].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            decode_frame(&f).unwrap_err(),
            FrameError::TooLarge { .. }
        ));
    }

    #[test]
    fn unhashed_frames_only_on_an_authenticated_link() {
        let msg = Msg::Item(StreamItem {
            seq: 3,
            dep: 2,
            resync: false,
            kind: ItemKind::Write {
                offset: 0,
                data: Bytes::from(vec![0x5c; 4096]),
                fua: false,
            },
        });
        let mut f = Vec::new();
        let opts = EncodeOpts {
            link_authenticated: true,
            compress: false,
        };
        let data = encode_with(&msg, &mut f, opts).unwrap();
        assert_eq!(f[7], FLAG_LINK_AUTHENTICATED);
        f.extend_from_slice(&data);
        // A TLS link's decoder takes it, with the data intact.
        let (got, used) = decode_frame_for(&f, true).unwrap().unwrap();
        assert_eq!(used, f.len());
        assert_eq!(got, msg);
        // A plaintext link's decoder refuses it: there the hash is the only protection.
        assert_eq!(decode_frame(&f).unwrap_err(), FrameError::Flags(1));
        let mut d = Decoder::new();
        d.spare(f.len())[..f.len()].copy_from_slice(&f);
        d.filled(f.len());
        assert_eq!(d.next().unwrap_err(), FrameError::Flags(1));
        // Unknown flags are refused on either link.
        let mut g = encode_to_vec(&Msg::Ping { nonce: 1 });
        g[7] = 0x80;
        assert_eq!(
            decode_frame_for(&g, true).unwrap_err(),
            FrameError::Flags(0x80)
        );
        // A hashed frame is good on both.
        let h = encode_to_vec(&msg);
        assert_eq!(decode_frame_for(&h, true).unwrap().unwrap().0, msg);
    }

    #[test]
    fn lz4_payloads_round_trip_and_are_checked() {
        let item = |data: Vec<u8>| {
            Msg::Item(StreamItem {
                seq: 9,
                dep: 8,
                resync: false,
                kind: ItemKind::Write {
                    offset: 8192,
                    data: Bytes::from(data),
                    fua: false,
                },
            })
        };
        let compressible: Vec<u8> = (0..65536u32).map(|i| (i / 1024) as u8).collect();
        let msg = item(compressible);
        for tls in [false, true] {
            let opts = EncodeOpts {
                link_authenticated: tls,
                compress: true,
            };
            let mut f = Vec::new();
            let p = encode_with(&msg, &mut f, opts).unwrap();
            assert_ne!(f[7] & FLAG_LZ4, 0);
            assert!(p.len() < 65536 / 8, "{} bytes", p.len());
            f.extend_from_slice(&p);
            assert_eq!(decode_frame_for(&f, tls).unwrap().unwrap().0, msg);
            // A damaged compressed payload: refused on a plaintext link (the data hash);
            // on a TLS link the record's authentication is what refuses it, before this
            // decoder sees it, so here it only must not panic.
            let last = f.len() - 3;
            f[last] ^= 0xff;
            let r = decode_frame_for(&f, tls);
            if !tls {
                assert!(r.is_err(), "a damaged payload was accepted");
            }
        }
        // Random data does not shrink: sent as it is.
        let mut x = 0x1234_5678_9abc_def0u64;
        let random: Vec<u8> = (0..65536)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        let mut f = Vec::new();
        let opts = EncodeOpts {
            link_authenticated: false,
            compress: true,
        };
        let p = encode_with(&item(random), &mut f, opts).unwrap();
        assert_eq!(f[7] & FLAG_LZ4, 0);
        assert_eq!(p.len(), 65536);
    }
}
