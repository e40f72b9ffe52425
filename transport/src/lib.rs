//! blkrep's replication transport: the wire format of the replication stream and the link
//! handshake that admits a peer before the engine sees a byte from it.
//!
//! * [`handshake`]: the first bytes on a new connection: magic, wire version, resource and
//!   node identities. Strangers, garbage and other versions are refused here with a reason
//!   the daemon logs.
//! * [`codec`]: versioned, checksummed frames for the engine's messages, and a streaming
//!   decoder for the io_uring event loop.
//!
//! * [`tls`]: TLS 1.3 with pinned peer certificates, mutual: the link is encrypted and
//!   authenticated unless the configuration says `insecure = true`.

pub mod codec;
pub mod handshake;
pub mod probe;
pub mod tls;
pub mod wire;
