//! blkrep's replication engine.
//!
//! The engine decides; drivers move bytes. [`volume::Volume`] is a single-threaded, sans-IO
//! state machine: it consumes [`volume::Input`]s (client requests, disk completions, peer
//! messages, timer ticks, operator commands) and produces [`volume::Output`]s (disk
//! operations, messages, client completions, events). The daemon drives it with io_uring,
//! sockets and the real clock; the simulator drives the same code with simulated ones.

mod al;
pub mod buf;
pub mod bugs;
pub mod dirty;
mod diskless;
pub mod generations;
pub mod msg;
pub mod types;
pub mod undo;

pub use buf::AlignedBuf;
pub use types::*;
mod handshake;
pub mod journal;
mod journaling;
pub mod meta;
pub mod plan;
mod primary;
pub mod ranges;
mod rate;
mod roles;
mod secondary;
pub mod status;
pub mod verify;
pub mod volume;

pub use journaling::{JournalStart, JournalStatus};
pub use volume::{
    AdminCmd, AdminError, DiskKind, DiskOp, Event, Input, Output, Probe, Volume, VolumeConfig,
};
