//! blkrep's replication transport: the wire format of the replication stream and the link
//! handshake that admits a peer before the engine sees a byte from it.
//!
//! * [`handshake`]: the first bytes on a new connection: magic, wire version, resource and
//!   node identities. Strangers, garbage and other versions are refused here with a reason
//!   the daemon logs.
//! * [`codec`]: versioned, checksummed frames for the engine's messages, and a streaming
//!   decoder for the io_uring event loop.
//!
//! Authentication and encryption (TLS 1.3, pinned peer keys) come with the link-resilience
//! work; until then the link must run on a trusted network (see the README).

pub mod codec;
pub mod handshake;
pub mod wire;
