//! blkrep test and benchmark tools.
//!
//! * [`nbd_client`]: an independent, strict NBD client (the second client integration tests
//!   use next to qemu-io), with negotiation-phase probes for protocol tests.
//! * [`uri`]: the NBD URI forms the tools accept.
//! * [`workload`]: a seeded random write workload with a write-order log, and the checker
//!   that verifies an image against the log.
//! * [`compare`]: blake3 comparison of two images, whole and per extent.

pub mod compare;
pub mod nbd_client;
mod nbd_negotiate;
pub mod nbd_proto;
pub mod uri;
mod verify;
pub mod workload;

#[cfg(test)]
mod test_server;

pub use compare::{compare_files, hash_file, CompareReport};
pub use nbd_client::{list_exports_unix, probe_option_unix, NbdClient, NbdClientError};
pub use uri::NbdUri;
pub use workload::{verify_image, VerifyReport, WorkloadReport, WorkloadSpec, WriteLog};
