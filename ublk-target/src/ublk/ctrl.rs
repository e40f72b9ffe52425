//! Control commands on `/dev/ublk-control`: io_uring `URING_CMD` with 128-byte SQEs, on a
//! small ring of their own, one command at a time.
//!
//! Control commands may block in the kernel for long (START_DEV waits until every tag is
//! fetched and then scans partitions, which needs the server to answer I/O; DEL_DEV waits
//! until the char device is released), so they never run on the event loop's thread:
//! `serve` uses a [`Control`] before the loop starts and hands it to the `ublk-ctl` helper
//! thread while the loop runs.

use super::sys::{
    CtrlOp, Encoding, UblkParams, UblksrvCtrlCmd, UblksrvCtrlDevInfo, UBLK_F_CMD_IOCTL_ENCODE,
};
use super::UblkError;
use io_uring::{cqueue, opcode, squeue, types, IoUring};
use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// Path of the ublk control device.
pub const UBLK_CONTROL: &str = "/dev/ublk-control";

/// An open `/dev/ublk-control` and its ring.
pub struct Control {
    fd: File,
    ring: IoUring<squeue::Entry128, cqueue::Entry>,
    encoding: Encoding,
    features: Option<u64>,
    broken: bool,
}

impl Control {
    /// Open the control device and probe the command encoding: a kernel that answers
    /// GET_FEATURES (6.5+) speaks the ioctl encoding; an older one gets the legacy numbers
    /// (and [`Control::add_dev`] retries with the ioctl encoding if those are refused).
    pub fn open() -> Result<Control, UblkError> {
        Self::open_path(Path::new(UBLK_CONTROL))
    }

    fn open_path(path: &Path) -> Result<Control, UblkError> {
        let fd = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(path)
            .map_err(|err| UblkError::NotAvailable {
                path: path.into(),
                err,
            })?;
        let ring = IoUring::<squeue::Entry128, cqueue::Entry>::builder()
            .build(4)
            .map_err(UblkError::ControlRing)?;
        let mut c = Control {
            fd,
            ring,
            encoding: Encoding::Ioctl,
            features: None,
            broken: false,
        };
        let mut features = 0u64;
        match c.command(
            CtrlOp::GetFeatures,
            u32::MAX,
            0,
            (&mut features as *mut u64).cast(),
            8,
        ) {
            Ok(_) => c.features = Some(features),
            Err(e) => {
                tracing::debug!("ublk GET_FEATURES unavailable ({e}): using the legacy opcodes");
                c.encoding = Encoding::Legacy;
            }
        }
        Ok(c)
    }

    /// What GET_FEATURES reported (`None` before 6.5).
    pub fn features(&self) -> Option<u64> {
        self.features
    }

    /// The encoding in use for control commands.
    pub fn encoding(&self) -> Encoding {
        self.encoding
    }

    /// Run one command and wait for it; `buf`/`len` is the command's buffer (or null/0).
    fn command(
        &mut self,
        op: CtrlOp,
        dev_id: u32,
        data: u64,
        buf: *mut u8,
        len: u16,
    ) -> Result<i32, std::io::Error> {
        if self.broken {
            return Err(std::io::Error::other(
                "the ublk control ring failed earlier and is not used any more",
            ));
        }
        let Some(cmd_op) = op.opcode(self.encoding) else {
            return Err(std::io::Error::from_raw_os_error(libc::EOPNOTSUPP));
        };
        let cmd = UblksrvCtrlCmd {
            dev_id,
            queue_id: u16::MAX,
            len,
            addr: buf as u64,
            data: [data],
            ..Default::default()
        };
        let mut area = [0u8; 80];
        area[..32].copy_from_slice(&cmd.to_bytes());
        let sqe = opcode::UringCmd80::new(types::Fd(self.fd.as_raw_fd()), cmd_op)
            .cmd(area)
            .build()
            .user_data(1);
        // SAFETY: the SQE references `buf` (and nothing else); every caller passes a buffer
        // that lives on its stack frame or is borrowed for this call, and this function
        // does not return before the command's completion has been reaped below.
        unsafe { self.ring.submission().push(&sqe) }
            .map_err(|_| std::io::Error::other("ublk control ring is full"))?;
        loop {
            match self.ring.submit() {
                Ok(_) => break,
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Err(e) => {
                    // The SQE may still sit in the ring pointing at the caller's buffer:
                    // never submit anything on this ring again.
                    self.broken = true;
                    return Err(e);
                }
            }
        }
        loop {
            if let Some(cqe) = self.ring.completion().next() {
                let res = cqe.result();
                return if res < 0 {
                    Err(std::io::Error::from_raw_os_error(-res))
                } else {
                    Ok(res)
                };
            }
            match self.ring.submitter().submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                Err(e) => {
                    self.broken = true;
                    return Err(e);
                }
            }
        }
    }

    fn dev_cmd(&mut self, op: CtrlOp, dev_id: u32, data: u64) -> Result<(), UblkError> {
        self.command(op, dev_id, data, std::ptr::null_mut(), 0)
            .map(|_| ())
            .map_err(|err| UblkError::Command {
                op: op.name(),
                dev_id,
                err,
            })
    }

    /// ADD_DEV: create `/dev/ublkcN` with the queues, depth, buffer size, flags and owner
    /// tag in `info` (`dev_id` `u32::MAX` for any free id). On success `info` holds what the
    /// kernel granted: the id, the negotiated flags, the queue count (capped at the CPUs).
    pub fn add_dev(&mut self, info: &mut UblksrvCtrlDevInfo) -> Result<(), UblkError> {
        if self.encoding == Encoding::Ioctl {
            info.flags |= UBLK_F_CMD_IOCTL_ENCODE;
        }
        let asked = *info;
        let len = std::mem::size_of::<UblksrvCtrlDevInfo>() as u16;
        let mut r = self.command(
            CtrlOp::AddDev,
            info.dev_id,
            0,
            (info as *mut UblksrvCtrlDevInfo).cast(),
            len,
        );
        if self.encoding == Encoding::Legacy
            && matches!(&r, Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP))
        {
            // A 6.4 kernel built without CONFIG_BLKDEV_UBLK_LEGACY_OPCODES.
            self.encoding = Encoding::Ioctl;
            *info = asked;
            info.flags |= UBLK_F_CMD_IOCTL_ENCODE;
            r = self.command(
                CtrlOp::AddDev,
                info.dev_id,
                0,
                (info as *mut UblksrvCtrlDevInfo).cast(),
                len,
            );
        }
        r.map(|_| ()).map_err(|err| UblkError::AddDev {
            queues: asked.nr_hw_queues,
            depth: asked.queue_depth,
            max_io: asked.max_io_buf_bytes,
            err,
        })
    }

    /// SET_PARAMS (before START_DEV only).
    pub fn set_params(&mut self, dev_id: u32, params: &UblkParams) -> Result<(), UblkError> {
        let mut p = *params;
        p.len = std::mem::size_of::<UblkParams>() as u32;
        let len = p.len as u16;
        self.command(
            CtrlOp::SetParams,
            dev_id,
            0,
            (&mut p as *mut UblkParams).cast(),
            len,
        )
        .map(|_| ())
        .map_err(|err| UblkError::Command {
            op: CtrlOp::SetParams.name(),
            dev_id,
            err,
        })
    }

    /// GET_DEV_INFO.
    pub fn get_dev_info(&mut self, dev_id: u32) -> Result<UblksrvCtrlDevInfo, UblkError> {
        let mut info = UblksrvCtrlDevInfo::default();
        let len = std::mem::size_of::<UblksrvCtrlDevInfo>() as u16;
        self.command(
            CtrlOp::GetDevInfo,
            dev_id,
            0,
            (&mut info as *mut UblksrvCtrlDevInfo).cast(),
            len,
        )
        .map_err(|err| UblkError::Command {
            op: CtrlOp::GetDevInfo.name(),
            dev_id,
            err,
        })?;
        Ok(info)
    }

    /// START_DEV: blocks until every tag of every queue was fetched, then adds
    /// `/dev/ublkbN` (whose partition scan needs the server to answer reads).
    pub fn start_dev(&mut self, dev_id: u32, pid: i32) -> Result<(), UblkError> {
        self.dev_cmd(CtrlOp::StartDev, dev_id, pid as u64)
    }

    /// STOP_DEV: removes `/dev/ublkbN` (waiting for requests the server holds) and
    /// completes every pending fetch with `UBLK_IO_RES_ABORT`.
    pub fn stop_dev(&mut self, dev_id: u32) -> Result<(), UblkError> {
        self.dev_cmd(CtrlOp::StopDev, dev_id, 0)
    }

    /// DEL_DEV: removes the device; waits until `/dev/ublkcN` is closed and unmapped.
    pub fn del_dev(&mut self, dev_id: u32) -> Result<(), UblkError> {
        self.dev_cmd(CtrlOp::DelDev, dev_id, 0)
    }

    /// START_USER_RECOVERY: needs the device QUIESCED and its old server gone (EBUSY
    /// otherwise); afterwards the tags may be fetched by a new server.
    pub fn start_user_recovery(&mut self, dev_id: u32) -> Result<(), UblkError> {
        self.dev_cmd(CtrlOp::StartUserRecovery, dev_id, 0)
    }

    /// END_USER_RECOVERY: blocks until every tag was fetched again, then lets the queued
    /// and re-issued requests go to the new server `pid`.
    pub fn end_user_recovery(&mut self, dev_id: u32, pid: i32) -> Result<(), UblkError> {
        self.dev_cmd(CtrlOp::EndUserRecovery, dev_id, pid as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_control_device_is_a_clear_error() {
        let e = match Control::open_path(Path::new("/nonexistent/ublk-control")) {
            Err(e) => e.to_string(),
            Ok(_) => panic!("opened a nonexistent control device"),
        };
        assert!(e.contains("/nonexistent/ublk-control"), "{e}");
        assert!(e.contains("ublk_drv"), "{e}");
    }
}
