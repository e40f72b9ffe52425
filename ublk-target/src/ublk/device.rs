//! A device's lifetime: create it (ADD_DEV, SET_PARAMS) or take over the one a crashed
//! daemon left behind (START_USER_RECOVERY), remember its id in the run directory, and
//! remove it (STOP_DEV, DEL_DEV).
//!
//! The record (`RUN_DIR/RESOURCE-NODE.ublk`, the device id) is written right after ADD_DEV,
//! so a daemon that dies at any later point leaves a device its successor can find. The
//! device itself carries an owner tag (in `ublksrv_flags`, which the kernel keeps for the
//! server) so that a stale record never makes blkrep take over somebody else's device.

use super::ctrl::Control;
use super::sys::{
    UblkParamBasic, UblkParamDiscard, UblkParams, UblksrvCtrlDevInfo, UBLK_ATTR_FUA,
    UBLK_ATTR_VOLATILE_CACHE, UBLK_F_USER_RECOVERY, UBLK_F_USER_RECOVERY_REISSUE,
    UBLK_PARAM_TYPE_BASIC, UBLK_PARAM_TYPE_DISCARD, UBLK_S_DEV_DEAD, UBLK_S_DEV_LIVE,
    UBLK_S_DEV_QUIESCED,
};
use super::UblkError;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Largest single request, bytes (`max_io_buf_bytes`): the size of every tag buffer.
pub const MAX_IO: u32 = 512 << 10;
/// Largest discard / write-zeroes request, bytes.
const MAX_DISCARD: u64 = 1 << 30;
/// How long a new daemon waits for the kernel to quiesce a crashed daemon's device.
const RECOVERY_WAIT: Duration = Duration::from_secs(15);

/// What the daemon wants.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Hardware queues to ask for.
    pub queues: u16,
    /// Tags per queue.
    pub depth: u16,
    /// Volume size, bytes.
    pub size: u64,
    /// Owner tag: which resource and node the device belongs to.
    pub owner: u64,
    /// The record file.
    pub record: PathBuf,
}

/// The owner tag of `resource`/`node` (never 0, so an untagged device never matches).
pub fn owner_tag(resource: &str, node: &str) -> u64 {
    let h = blake3::hash(format!("blkrep ublk owner\0{resource}\0{node}").as_bytes());
    u64::from_le_bytes(h.as_bytes()[..8].try_into().expect("8 bytes")) | 1
}

/// `/dev/ublkbN`.
pub fn block_path(dev_id: u32) -> String {
    format!("/dev/ublkb{dev_id}")
}

/// `/dev/ublkcN`.
pub fn char_path(dev_id: u32) -> String {
    format!("/dev/ublkc{dev_id}")
}

/// A device this daemon now serves (its tags not fetched yet).
pub struct Attached {
    /// What the kernel granted (id, queues, depth, buffer size, negotiated flags).
    pub info: UblksrvCtrlDevInfo,
    /// The open char device.
    pub cdev: File,
    /// True when taken over from a crashed daemon (finish with END_USER_RECOVERY);
    /// false for a new device (finish with START_DEV).
    pub recovered: bool,
}

/// Take over this node's device if a crashed daemon left one, else create a new one.
pub fn attach(ctrl: &mut Control, s: &Settings) -> Result<Attached, UblkError> {
    if let Some(id) = read_record(&s.record)? {
        if let Some(a) = recover(ctrl, id, s)? {
            return Ok(a);
        }
        remove_record(&s.record)?;
    }
    create(ctrl, s, UBLK_F_USER_RECOVERY | UBLK_F_USER_RECOVERY_REISSUE)
}

/// Create a new device that dies with its server (no user recovery): a drill's clone.
/// A device left by an earlier server under the same record is removed first.
pub fn create_ephemeral(ctrl: &mut Control, s: &Settings) -> Result<Attached, UblkError> {
    if let Some(id) = read_record(&s.record)? {
        match ctrl.get_dev_info(id) {
            Ok(info) if info.ublksrv_flags == s.owner => {
                tracing::info!("ublk: removing {} left by an earlier drill", char_path(id));
                ctrl.del_dev(id)?;
            }
            _ => {}
        }
        remove_record(&s.record)?;
    }
    create(ctrl, s, 0)
}

/// The parameters of a new device: 512-byte logical blocks (as the NBD export), 4 KiB
/// physical blocks, a volatile cache with FUA (the engine implements flush and FUA), and
/// discard / write-zeroes.
pub fn params(size: u64, max_io: u32) -> UblkParams {
    let max_discard_sectors = (MAX_DISCARD.min(size) >> 9) as u32;
    UblkParams {
        len: std::mem::size_of::<UblkParams>() as u32,
        types: UBLK_PARAM_TYPE_BASIC | UBLK_PARAM_TYPE_DISCARD,
        basic: UblkParamBasic {
            attrs: UBLK_ATTR_VOLATILE_CACHE | UBLK_ATTR_FUA,
            logical_bs_shift: 9,
            physical_bs_shift: 12,
            io_opt_shift: 12,
            io_min_shift: 12,
            max_sectors: max_io >> 9,
            chunk_sectors: 0,
            dev_sectors: size >> 9,
            virt_boundary_mask: 0,
        },
        discard: UblkParamDiscard {
            discard_alignment: 0,
            discard_granularity: 4096,
            max_discard_sectors,
            max_write_zeroes_sectors: max_discard_sectors,
            max_discard_segments: 1,
            reserved0: 0,
        },
        ..Default::default()
    }
}

fn create(ctrl: &mut Control, s: &Settings, flags: u64) -> Result<Attached, UblkError> {
    let mut info = UblksrvCtrlDevInfo {
        nr_hw_queues: s.queues,
        queue_depth: s.depth,
        max_io_buf_bytes: MAX_IO,
        dev_id: u32::MAX,
        flags,
        ublksrv_flags: s.owner,
        ..Default::default()
    };
    ctrl.add_dev(&mut info)?;
    let id = info.dev_id;
    // From here on a failure removes the device again: nothing is left half-created.
    let finish = |ctrl: &mut Control| -> Result<File, UblkError> {
        write_record(&s.record, id)?;
        ctrl.set_params(id, &params(s.size, info.max_io_buf_bytes))?;
        open_char(id)
    };
    match finish(ctrl) {
        Ok(cdev) => {
            if flags & UBLK_F_USER_RECOVERY != 0 && info.flags & UBLK_F_USER_RECOVERY == 0 {
                tracing::warn!(
                    "the kernel did not grant UBLK_F_USER_RECOVERY: a daemon crash will fail I/O on {}",
                    block_path(id)
                );
            }
            if info.nr_hw_queues < s.queues {
                tracing::info!(
                    "ublk: the kernel granted {} of {} queues (one per CPU at most)",
                    info.nr_hw_queues,
                    s.queues
                );
            }
            tracing::info!(
                "ublk: added {} ({} queues x {} tags, {} KiB requests, flags {:#x})",
                char_path(id),
                info.nr_hw_queues,
                info.queue_depth,
                info.max_io_buf_bytes >> 10,
                info.flags
            );
            Ok(Attached {
                info,
                cdev,
                recovered: false,
            })
        }
        Err(e) => {
            if let Err(d) = ctrl.del_dev(id) {
                tracing::error!("removing the half-created {}: {d}", char_path(id));
            }
            let _ = std::fs::remove_file(&s.record);
            Err(e)
        }
    }
}

/// Take over device `id` from a crashed daemon; `None` when the record is stale (no such
/// device, another owner, or a device that was never started or already stopped — those
/// are removed).
fn recover(ctrl: &mut Control, id: u32, s: &Settings) -> Result<Option<Attached>, UblkError> {
    let mut info = match ctrl.get_dev_info(id) {
        Ok(i) => i,
        Err(UblkError::Command { err, .. }) if err.raw_os_error() == Some(libc::ENODEV) => {
            tracing::info!("ublk: {} is gone; creating a new device", char_path(id));
            return Ok(None);
        }
        Err(e) => return Err(e),
    };
    if info.ublksrv_flags != s.owner {
        tracing::warn!(
            "ublk: {} is not this node's device (stale record {}); creating a new one",
            char_path(id),
            s.record.display()
        );
        return Ok(None);
    }
    if info.state == UBLK_S_DEV_DEAD || info.flags & UBLK_F_USER_RECOVERY == 0 {
        tracing::info!(
            "ublk: removing {} left unstarted or stopped by a previous daemon",
            char_path(id)
        );
        ctrl.del_dev(id)?;
        return Ok(None);
    }
    // The old server's ring and char device must be released and the device quiesced
    // (the kernel does that shortly after the process died): EBUSY until then.
    let deadline = Instant::now() + RECOVERY_WAIT;
    loop {
        match ctrl.start_user_recovery(id) {
            Ok(()) => break,
            Err(UblkError::Command { err, .. })
                if err.raw_os_error() == Some(libc::EINVAL)
                    && info.state == UBLK_S_DEV_QUIESCED =>
            {
                // A daemon died after START_USER_RECOVERY and before fetching its tags:
                // recovery is already started.
                break;
            }
            Err(UblkError::Command { err, .. })
                if err.raw_os_error() == Some(libc::EBUSY) && Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(100));
                info = ctrl.get_dev_info(id)?;
            }
            Err(UblkError::Command { err, .. }) if err.raw_os_error() == Some(libc::EBUSY) => {
                return Err(UblkError::StillServed {
                    device: block_path(id),
                    pid: info.ublksrv_pid,
                    live: info.state == UBLK_S_DEV_LIVE,
                });
            }
            Err(e) => return Err(e),
        }
    }
    let cdev = open_char(id)?;
    tracing::info!(
        "ublk: recovering {} after a daemon crash ({} queues x {} tags)",
        block_path(id),
        info.nr_hw_queues,
        info.queue_depth
    );
    Ok(Some(Attached {
        info,
        cdev,
        recovered: true,
    }))
}

/// Delete device `id` (DEL_DEV stops it first if needed) and forget its record. The char
/// device must be closed and unmapped: DEL_DEV waits for that.
pub fn delete(ctrl: &mut Control, id: u32, record: &Path) -> Result<(), UblkError> {
    ctrl.del_dev(id)?;
    remove_record(record)
}

/// Why `/dev/ublkbN` must not go away or turn read-only now: `Some` while it is mounted
/// or otherwise held open exclusively (`O_EXCL` open fails with EBUSY).
pub fn in_use(dev_id: u32) -> Option<String> {
    let path = block_path(dev_id);
    match OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_EXCL | libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(&path)
    {
        Err(e) if e.raw_os_error() == Some(libc::EBUSY) => Some(format!(
            "{path} is in use (mounted, or held open exclusively); unmount it first"
        )),
        Err(e) => {
            tracing::debug!("checking whether {path} is in use: {e}");
            None
        }
        Ok(_) => None,
    }
}

fn open_char(id: u32) -> Result<File, UblkError> {
    let path = char_path(id);
    // devtmpfs creates the node during ADD_DEV; give a udev-managed /dev a moment.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(&path)
        {
            Ok(f) => return Ok(f),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(err) => return Err(UblkError::CharDevice { path, err }),
        }
    }
}

fn read_record(path: &Path) -> Result<Option<u32>, UblkError> {
    match std::fs::read_to_string(path) {
        Ok(s) => parse_record(&s).map(Some).ok_or_else(|| UblkError::Record {
            path: path.into(),
            err: std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("{:?} is not a ublk device id; remove the file", s.trim()),
            ),
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(err) => Err(UblkError::Record {
            path: path.into(),
            err,
        }),
    }
}

fn parse_record(s: &str) -> Option<u32> {
    s.trim().parse::<u32>().ok().filter(|&id| id < u32::MAX)
}

fn write_record(path: &Path, id: u32) -> Result<(), UblkError> {
    let err = |err| UblkError::Record {
        path: path.into(),
        err,
    };
    if let Some(d) = path.parent() {
        std::fs::create_dir_all(d).map_err(err)?;
    }
    let tmp = path.with_extension("ublk.tmp");
    std::fs::write(&tmp, format!("{id}\n")).map_err(err)?;
    std::fs::rename(&tmp, path).map_err(err)
}

fn remove_record(path: &Path) -> Result<(), UblkError> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(UblkError::Record {
            path: path.into(),
            err: e,
        }),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records() {
        assert_eq!(parse_record("3\n"), Some(3));
        assert_eq!(parse_record(" 12 "), Some(12));
        assert_eq!(parse_record("4294967295"), None);
        assert_eq!(parse_record("ublkb0"), None);
        assert_eq!(parse_record(""), None);
        let dir = std::env::temp_dir().join(format!("blkrep-ublk-record-{}", std::process::id()));
        let p = dir.join("r0-a.ublk");
        assert_eq!(read_record(&p).unwrap(), None);
        write_record(&p, 7).unwrap();
        assert_eq!(read_record(&p).unwrap(), Some(7));
        std::fs::write(&p, "junk").unwrap();
        let e = read_record(&p).unwrap_err().to_string();
        assert!(e.contains("r0-a.ublk") && e.contains("junk"), "{e}");
        remove_record(&p).unwrap();
        remove_record(&p).unwrap();
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn owner_tags_differ_per_node() {
        let a = owner_tag("r0", "alpha");
        assert_eq!(a, owner_tag("r0", "alpha"));
        assert_ne!(a, owner_tag("r0", "beta"));
        assert_ne!(a, owner_tag("r1", "alpha"));
        assert_ne!(owner_tag("r", "0alpha"), owner_tag("r0", "alpha"));
        assert_ne!(a, 0);
    }

    #[test]
    fn device_parameters() {
        let p = params(64 << 20, MAX_IO);
        assert_eq!(p.len, 112);
        assert_eq!(p.types, UBLK_PARAM_TYPE_BASIC | UBLK_PARAM_TYPE_DISCARD);
        assert_eq!(p.basic.dev_sectors, (64 << 20) / 512);
        assert_eq!(p.basic.max_sectors, 1024);
        assert_eq!(p.basic.logical_bs_shift, 9);
        assert!(p.basic.physical_bs_shift >= p.basic.logical_bs_shift);
        assert_eq!(
            p.basic.attrs,
            UBLK_ATTR_VOLATILE_CACHE | UBLK_ATTR_FUA,
            "the engine implements flush and FUA"
        );
        // The kernel's checks in ublk_validate_params.
        assert_eq!(p.discard.max_discard_segments, 1);
        assert_ne!(p.discard.discard_granularity, 0);
        assert_eq!(p.discard.max_discard_sectors, (64 << 20) / 512);
        assert_eq!(
            params(16 << 30, MAX_IO).discard.max_discard_sectors,
            1 << 21
        );
    }

    #[test]
    fn paths() {
        assert_eq!(block_path(0), "/dev/ublkb0");
        assert_eq!(char_path(12), "/dev/ublkc12");
        assert_eq!(in_use(u32::MAX - 1), None, "a missing device is not in use");
    }
}
