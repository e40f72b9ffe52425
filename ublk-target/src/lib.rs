//! blkrepd: the blkrep daemon.
//!
//! A frontend (a kernel block device through ublk, or an NBD export) feeds client requests
//! into the replication engine (`blkrep-engine`); an io_uring event loop performs the
//! engine's disk operations on the backing device and carries its messages over the
//! replication link (`blkrep-transport`).

pub mod backend;
pub mod control;
pub mod daemon;
pub mod drill;
pub mod events;
pub mod journal_file;
pub mod latency;
pub mod legs;
pub mod link;
pub mod metrics;
pub mod nbd;
pub mod sendq;
pub mod serve;
pub mod ublk;
pub mod wake;
