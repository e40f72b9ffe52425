//! The ublk frontend: the volume as a kernel block device, `/dev/ublkbN`, served by this
//! daemon through the `ublk_drv` driver (Linux 6.0+), written directly on io_uring.
//!
//! - [`sys`]: the kernel UAPI (`ublk_cmd.h`): structs, command numbers, flags.
//! - [`ctrl`]: control commands on `/dev/ublk-control` (128-byte SQEs, own small ring).
//! - [`device`]: create or take over a device, remember it, remove it.
//! - [`queue`]: the char device, descriptor mmaps, tag buffers, FETCH/COMMIT submissions.
//! - [`request`]: descriptors → engine inputs, completions → commit results.
//! - [`helper`]: the thread that runs the blocking control commands while the loop serves.
//!
//! The event loop side (tags in the loop's ring, engine requests, teardown) is
//! `daemon/ublk_io.rs`. Why not libublk: the daemon's single event loop must own ordering,
//! the local-plus-remote completion and backpressure, so the I/O commands live in that
//! loop's ring next to the disk and socket operations.

pub mod ctrl;
pub mod device;
pub mod helper;
pub mod queue;
pub mod request;
pub mod sys;

use std::path::PathBuf;

/// Errors of the ublk frontend; messages name the device, command and cause (the cause is
/// part of the message, not a separate `source`, so that error chains do not repeat it).
#[derive(Debug, thiserror::Error)]
pub enum UblkError {
    /// `/dev/ublk-control` cannot be opened.
    #[error(
        "ublk is not available: cannot open {path} ({err}); load the ublk_drv module \
         (modprobe ublk_drv) or set frontend = \"nbd\""
    )]
    NotAvailable { path: PathBuf, err: std::io::Error },
    /// The control ring could not be created (the kernel lacks 128-byte SQEs, < 5.19).
    #[error("cannot create the io_uring for ublk control commands: {0}")]
    ControlRing(std::io::Error),
    /// ADD_DEV was refused.
    #[error(
        "ublk ADD_DEV refused ({queues} queues x {depth} tags, {max_io} byte requests): \
         {err}{}",
        add_dev_hint(err)
    )]
    AddDev {
        queues: u16,
        depth: u16,
        max_io: u32,
        err: std::io::Error,
    },
    /// Another control command failed.
    #[error("ublk {op} on device {dev_id} failed: {err}")]
    Command {
        op: &'static str,
        dev_id: u32,
        err: std::io::Error,
    },
    /// `/dev/ublkcN` could not be opened.
    #[error("cannot open {path}: {err}")]
    CharDevice { path: String, err: std::io::Error },
    /// A queue's descriptors could not be mapped.
    #[error("cannot map the I/O descriptors of ublk queue {queue}: {err}")]
    Mmap { queue: u16, err: std::io::Error },
    /// The device record in the run directory is unreadable or unwritable.
    #[error("ublk device record {path}: {err}")]
    Record { path: PathBuf, err: std::io::Error },
    /// The device of a previous daemon did not become recoverable.
    #[error(
        "{device} is still served by process {pid} (state {}); stop that daemon first",
        if *live { "live" } else { "not quiesced" }
    )]
    StillServed {
        device: String,
        pid: i32,
        live: bool,
    },
}

fn add_dev_hint(e: &std::io::Error) -> &'static str {
    match e.raw_os_error() {
        Some(libc::EPERM) | Some(libc::EACCES) => " (blkrepd needs CAP_SYS_ADMIN for ublk)",
        Some(libc::EINVAL) => " (queue depth 1-4096, queues 1-4096)",
        _ => "",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_name_the_command_and_the_cause() {
        let e = UblkError::AddDev {
            queues: 1,
            depth: 64,
            max_io: 512 << 10,
            err: std::io::Error::from_raw_os_error(libc::EPERM),
        }
        .to_string();
        assert!(e.contains("ADD_DEV") && e.contains("CAP_SYS_ADMIN"), "{e}");
        let e = UblkError::Command {
            op: "START_DEV",
            dev_id: 3,
            err: std::io::Error::from_raw_os_error(libc::EINTR),
        }
        .to_string();
        assert!(e.contains("START_DEV") && e.contains("device 3"), "{e}");
        let e = UblkError::StillServed {
            device: "/dev/ublkb0".into(),
            pid: 42,
            live: true,
        }
        .to_string();
        assert!(e.contains("/dev/ublkb0") && e.contains("42"), "{e}");
    }
}
