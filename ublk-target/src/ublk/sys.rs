//! The ublk kernel interface, from the UAPI header `include/uapi/linux/ublk_cmd.h`.
//!
//! Thin `#[repr(C)]` mirrors of the kernel structs, with their sizes and field offsets
//! asserted at compile time, the command numbers in both encodings, and the flags this
//! daemon uses. Names follow the header's. The structs passed by pointer (device info,
//! parameters) are used in place; the two that travel inside an SQE (the control and I/O
//! commands) are encoded to bytes by `to_bytes`, which the tests check against the
//! asserted offsets.

use std::mem::{offset_of, size_of};

// ------------------------------------------------------------------ command numbers

/// `UBLK_CMD_GET_DEV_INFO`.
pub const UBLK_CMD_GET_DEV_INFO: u8 = 0x02;
/// `UBLK_CMD_ADD_DEV`.
pub const UBLK_CMD_ADD_DEV: u8 = 0x04;
/// `UBLK_CMD_DEL_DEV`.
pub const UBLK_CMD_DEL_DEV: u8 = 0x05;
/// `UBLK_CMD_START_DEV`.
pub const UBLK_CMD_START_DEV: u8 = 0x06;
/// `UBLK_CMD_STOP_DEV`.
pub const UBLK_CMD_STOP_DEV: u8 = 0x07;
/// `UBLK_CMD_SET_PARAMS`.
pub const UBLK_CMD_SET_PARAMS: u8 = 0x08;
/// `UBLK_CMD_GET_PARAMS`.
pub const UBLK_CMD_GET_PARAMS: u8 = 0x09;
/// `UBLK_CMD_START_USER_RECOVERY` (6.0).
pub const UBLK_CMD_START_USER_RECOVERY: u8 = 0x10;
/// `UBLK_CMD_END_USER_RECOVERY` (6.0).
pub const UBLK_CMD_END_USER_RECOVERY: u8 = 0x11;
/// Number of `UBLK_U_CMD_GET_FEATURES` (6.5); it exists only in the ioctl encoding.
pub const UBLK_CMD_GET_FEATURES: u8 = 0x13;

/// `UBLK_IO_FETCH_REQ`.
pub const UBLK_IO_FETCH_REQ: u8 = 0x20;
/// `UBLK_IO_COMMIT_AND_FETCH_REQ`.
pub const UBLK_IO_COMMIT_AND_FETCH_REQ: u8 = 0x21;

const IOC_WRITE: u32 = 1;
const IOC_READ: u32 = 2;
/// The ioctl type of every ublk command: `'u'`.
pub const UBLK_IOC_TYPE: u8 = b'u';

/// `_IOC(dir, type, nr, size)` as `asm-generic/ioctl.h` defines it.
pub const fn ioc(dir: u32, ty: u8, nr: u8, size: usize) -> u32 {
    (dir << 30) | ((size as u32) << 16) | ((ty as u32) << 8) | nr as u32
}

/// `_IOR('u', nr, struct ublksrv_ctrl_cmd)`.
pub const fn ublk_u_cmd_r(nr: u8) -> u32 {
    ioc(IOC_READ, UBLK_IOC_TYPE, nr, size_of::<UblksrvCtrlCmd>())
}

/// `_IOWR('u', nr, struct ublksrv_ctrl_cmd)`.
pub const fn ublk_u_cmd_rw(nr: u8) -> u32 {
    ioc(
        IOC_READ | IOC_WRITE,
        UBLK_IOC_TYPE,
        nr,
        size_of::<UblksrvCtrlCmd>(),
    )
}

/// `_IOWR('u', nr, struct ublksrv_io_cmd)`.
pub const fn ublk_u_io(nr: u8) -> u32 {
    ioc(
        IOC_READ | IOC_WRITE,
        UBLK_IOC_TYPE,
        nr,
        size_of::<UblksrvIoCmd>(),
    )
}

/// `UBLK_U_CMD_GET_FEATURES`.
pub const UBLK_U_CMD_GET_FEATURES: u32 = ublk_u_cmd_r(UBLK_CMD_GET_FEATURES);
/// `UBLK_U_CMD_ADD_DEV`.
pub const UBLK_U_CMD_ADD_DEV: u32 = ublk_u_cmd_rw(UBLK_CMD_ADD_DEV);
/// `UBLK_U_IO_FETCH_REQ`.
pub const UBLK_U_IO_FETCH_REQ: u32 = ublk_u_io(UBLK_IO_FETCH_REQ);
/// `UBLK_U_IO_COMMIT_AND_FETCH_REQ`.
pub const UBLK_U_IO_COMMIT_AND_FETCH_REQ: u32 = ublk_u_io(UBLK_IO_COMMIT_AND_FETCH_REQ);

// ------------------------------------------------------------------ results and limits

/// A fetched request is ready in its descriptor.
pub const UBLK_IO_RES_OK: i32 = 0;
/// The command was aborted (device stopping, or the server going away): no re-fetch.
pub const UBLK_IO_RES_ABORT: i32 = -libc::ENODEV;

/// `UBLK_MAX_QUEUE_DEPTH`: tags per queue.
pub const UBLK_MAX_QUEUE_DEPTH: u16 = 4096;
/// `UBLK_MAX_NR_QUEUES`.
pub const UBLK_MAX_NR_QUEUES: u16 = 4096;
/// One I/O buffer is at most `1 << UBLK_IO_BUF_BITS` bytes (32 MiB).
pub const UBLK_IO_BUF_BITS: u32 = 25;
/// Offset of queue 0's descriptors in the char device's mmap space.
pub const UBLKSRV_CMD_BUF_OFFSET: u64 = 0;

// ------------------------------------------------------------------ feature flags

/// `UBLK_F_USER_RECOVERY`: the device survives its server; I/O waits for a new one.
pub const UBLK_F_USER_RECOVERY: u64 = 1 << 3;
/// `UBLK_F_USER_RECOVERY_REISSUE`: requests in flight at the crash are issued again.
pub const UBLK_F_USER_RECOVERY_REISSUE: u64 = 1 << 4;
/// `UBLK_F_UNPRIVILEGED_DEV`.
pub const UBLK_F_UNPRIVILEGED_DEV: u64 = 1 << 5;
/// `UBLK_F_CMD_IOCTL_ENCODE`: I/O commands use the `UBLK_U_IO_*` numbers (6.4).
pub const UBLK_F_CMD_IOCTL_ENCODE: u64 = 1 << 6;

/// `UBLK_S_DEV_DEAD`: added but not started, or stopped.
pub const UBLK_S_DEV_DEAD: u16 = 0;
/// `UBLK_S_DEV_LIVE`.
pub const UBLK_S_DEV_LIVE: u16 = 1;
/// `UBLK_S_DEV_QUIESCED`: its server went away; I/O waits for recovery.
pub const UBLK_S_DEV_QUIESCED: u16 = 2;
/// `UBLK_S_DEV_FAIL_IO`.
pub const UBLK_S_DEV_FAIL_IO: u16 = 3;

// ------------------------------------------------------------------ I/O operations

/// `UBLK_IO_OP_READ`.
pub const UBLK_IO_OP_READ: u8 = 0;
/// `UBLK_IO_OP_WRITE`.
pub const UBLK_IO_OP_WRITE: u8 = 1;
/// `UBLK_IO_OP_FLUSH`.
pub const UBLK_IO_OP_FLUSH: u8 = 2;
/// `UBLK_IO_OP_DISCARD`.
pub const UBLK_IO_OP_DISCARD: u8 = 3;
/// `UBLK_IO_OP_WRITE_SAME`.
pub const UBLK_IO_OP_WRITE_SAME: u8 = 4;
/// `UBLK_IO_OP_WRITE_ZEROES`.
pub const UBLK_IO_OP_WRITE_ZEROES: u8 = 5;
/// `UBLK_IO_F_FUA`, in `op_flags`.
pub const UBLK_IO_F_FUA: u32 = 1 << 13;
/// `UBLK_IO_F_NOUNMAP`, in `op_flags`.
pub const UBLK_IO_F_NOUNMAP: u32 = 1 << 15;

// ------------------------------------------------------------------ parameters

/// `UBLK_ATTR_READ_ONLY`.
pub const UBLK_ATTR_READ_ONLY: u32 = 1 << 0;
/// `UBLK_ATTR_VOLATILE_CACHE`: the device has a write cache (it gets FLUSH).
pub const UBLK_ATTR_VOLATILE_CACHE: u32 = 1 << 2;
/// `UBLK_ATTR_FUA`: the device honours FUA writes.
pub const UBLK_ATTR_FUA: u32 = 1 << 3;
/// `UBLK_PARAM_TYPE_BASIC`.
pub const UBLK_PARAM_TYPE_BASIC: u32 = 1 << 0;
/// `UBLK_PARAM_TYPE_DISCARD`.
pub const UBLK_PARAM_TYPE_DISCARD: u32 = 1 << 1;

// ------------------------------------------------------------------ structs

/// `struct ublksrv_ctrl_cmd`: the payload of a control command (in the 80-byte SQE area).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UblksrvCtrlCmd {
    /// Target device; `u32::MAX` asks ADD_DEV for any free id.
    pub dev_id: u32,
    /// Target queue, `u16::MAX` when the command is not for a queue.
    pub queue_id: u16,
    /// Length of the buffer at `addr`.
    pub len: u16,
    /// A command-specific buffer (in or out).
    pub addr: u64,
    /// Inline data (the server pid for START_DEV and END_USER_RECOVERY).
    pub data: [u64; 1],
    /// Unprivileged devices and GET_DEV_INFO2 only.
    pub dev_path_len: u16,
    /// Padding.
    pub pad: u16,
    /// Reserved.
    pub reserved: u32,
}

/// `struct ublksrv_ctrl_dev_info`: what ADD_DEV asks for and GET_DEV_INFO reports.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UblksrvCtrlDevInfo {
    /// Hardware queues (the kernel caps this at the number of CPUs).
    pub nr_hw_queues: u16,
    /// Tags per queue.
    pub queue_depth: u16,
    /// `UBLK_S_DEV_*`.
    pub state: u16,
    /// Padding.
    pub pad0: u16,
    /// Largest single I/O, bytes (rounded down to the page size by the kernel).
    pub max_io_buf_bytes: u32,
    /// Device id: N in `/dev/ublkbN` and `/dev/ublkcN`.
    pub dev_id: u32,
    /// The serving process (set by START_DEV / END_USER_RECOVERY).
    pub ublksrv_pid: i32,
    /// Padding.
    pub pad1: u32,
    /// `UBLK_F_*`: asked for by ADD_DEV, the negotiated set afterwards.
    pub flags: u64,
    /// Opaque to the kernel, kept for the server: blkrep stores its owner tag here.
    pub ublksrv_flags: u64,
    /// Stored by the kernel.
    pub owner_uid: u32,
    /// Stored by the kernel.
    pub owner_gid: u32,
    /// Reserved.
    pub reserved1: u64,
    /// Reserved.
    pub reserved2: u64,
}

/// `struct ublksrv_io_desc`: one request, in the read-only descriptor array of a queue.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UblksrvIoDesc {
    /// Operation in bits 0-7 (`UBLK_IO_OP_*`), flags above (`UBLK_IO_F_*`).
    pub op_flags: u32,
    /// Length in 512-byte sectors.
    pub nr_sectors: u32,
    /// Start, in 512-byte sectors.
    pub start_sector: u64,
    /// The server's buffer for this tag.
    pub addr: u64,
}

impl UblksrvIoDesc {
    /// `ublksrv_get_op`.
    pub fn op(&self) -> u8 {
        (self.op_flags & 0xff) as u8
    }
}

/// `struct ublksrv_io_cmd`: the payload of FETCH_REQ / COMMIT_AND_FETCH_REQ (16 bytes, so
/// it fits a normal 64-byte SQE).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UblksrvIoCmd {
    /// Queue.
    pub q_id: u16,
    /// Tag within the queue.
    pub tag: u16,
    /// COMMIT: bytes transferred, or `-errno`.
    pub result: i32,
    /// The buffer the kernel copies write data into, and read data from.
    pub addr: u64,
}

/// `struct ublk_param_basic`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UblkParamBasic {
    /// `UBLK_ATTR_*`.
    pub attrs: u32,
    /// log2 of the logical block size (9..=page shift).
    pub logical_bs_shift: u8,
    /// log2 of the physical block size.
    pub physical_bs_shift: u8,
    /// log2 of the optimal I/O size.
    pub io_opt_shift: u8,
    /// log2 of the minimal I/O size.
    pub io_min_shift: u8,
    /// Largest request in sectors (at most `max_io_buf_bytes >> 9`).
    pub max_sectors: u32,
    /// Chunk size in sectors, 0 for none.
    pub chunk_sectors: u32,
    /// Device size in sectors.
    pub dev_sectors: u64,
    /// Virtual boundary mask, 0 for none.
    pub virt_boundary_mask: u64,
}

/// `struct ublk_param_discard`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UblkParamDiscard {
    /// Discard alignment, bytes.
    pub discard_alignment: u32,
    /// Discard granularity, bytes (must not be 0).
    pub discard_granularity: u32,
    /// Largest discard, sectors.
    pub max_discard_sectors: u32,
    /// Largest write-zeroes, sectors.
    pub max_write_zeroes_sectors: u32,
    /// Must be 1 when discards are enabled.
    pub max_discard_segments: u16,
    /// Reserved.
    pub reserved0: u16,
}

/// `struct ublk_param_devt` (read-only; filled in by GET_PARAMS).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UblkParamDevt {
    /// Char device major.
    pub char_major: u32,
    /// Char device minor.
    pub char_minor: u32,
    /// Block device major.
    pub disk_major: u32,
    /// Block device minor.
    pub disk_minor: u32,
}

/// `struct ublk_param_zoned`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UblkParamZoned {
    /// Max open zones.
    pub max_open_zones: u32,
    /// Max active zones.
    pub max_active_zones: u32,
    /// Max zone append size, sectors.
    pub max_zone_append_sectors: u32,
    /// Reserved.
    pub reserved: [u8; 20],
}

/// `struct ublk_params` as of 6.12 (newer kernels append parameter types; `len` tells the
/// kernel how much of the struct this program knows).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UblkParams {
    /// Bytes of this struct that are meaningful.
    pub len: u32,
    /// `UBLK_PARAM_TYPE_*` present.
    pub types: u32,
    /// Basic parameters.
    pub basic: UblkParamBasic,
    /// Discard parameters.
    pub discard: UblkParamDiscard,
    /// Device numbers.
    pub devt: UblkParamDevt,
    /// Zoned parameters.
    pub zoned: UblkParamZoned,
}

// Layouts as in ublk_cmd.h (x86_64 / every 64-bit Linux ABI).
const _: () = {
    assert!(size_of::<UblksrvCtrlCmd>() == 32);
    assert!(offset_of!(UblksrvCtrlCmd, queue_id) == 4);
    assert!(offset_of!(UblksrvCtrlCmd, len) == 6);
    assert!(offset_of!(UblksrvCtrlCmd, addr) == 8);
    assert!(offset_of!(UblksrvCtrlCmd, data) == 16);
    assert!(offset_of!(UblksrvCtrlCmd, dev_path_len) == 24);
    assert!(offset_of!(UblksrvCtrlCmd, reserved) == 28);

    assert!(size_of::<UblksrvCtrlDevInfo>() == 64);
    assert!(offset_of!(UblksrvCtrlDevInfo, state) == 4);
    assert!(offset_of!(UblksrvCtrlDevInfo, max_io_buf_bytes) == 8);
    assert!(offset_of!(UblksrvCtrlDevInfo, dev_id) == 12);
    assert!(offset_of!(UblksrvCtrlDevInfo, ublksrv_pid) == 16);
    assert!(offset_of!(UblksrvCtrlDevInfo, flags) == 24);
    assert!(offset_of!(UblksrvCtrlDevInfo, ublksrv_flags) == 32);
    assert!(offset_of!(UblksrvCtrlDevInfo, owner_uid) == 40);
    assert!(offset_of!(UblksrvCtrlDevInfo, reserved1) == 48);

    assert!(size_of::<UblksrvIoDesc>() == 24);
    assert!(offset_of!(UblksrvIoDesc, nr_sectors) == 4);
    assert!(offset_of!(UblksrvIoDesc, start_sector) == 8);
    assert!(offset_of!(UblksrvIoDesc, addr) == 16);

    assert!(size_of::<UblksrvIoCmd>() == 16);
    assert!(offset_of!(UblksrvIoCmd, tag) == 2);
    assert!(offset_of!(UblksrvIoCmd, result) == 4);
    assert!(offset_of!(UblksrvIoCmd, addr) == 8);

    assert!(size_of::<UblkParamBasic>() == 32);
    assert!(offset_of!(UblkParamBasic, logical_bs_shift) == 4);
    assert!(offset_of!(UblkParamBasic, max_sectors) == 8);
    assert!(offset_of!(UblkParamBasic, dev_sectors) == 16);
    assert!(size_of::<UblkParamDiscard>() == 20);
    assert!(offset_of!(UblkParamDiscard, max_discard_segments) == 16);
    assert!(size_of::<UblkParamDevt>() == 16);
    assert!(size_of::<UblkParamZoned>() == 32);
    assert!(size_of::<UblkParams>() == 112);
    assert!(offset_of!(UblkParams, basic) == 8);
    assert!(offset_of!(UblkParams, discard) == 40);
    assert!(offset_of!(UblkParams, devt) == 60);
    assert!(offset_of!(UblkParams, zoned) == 76);
};

impl UblksrvCtrlCmd {
    /// The bytes the kernel reads from the SQE's command area.
    pub fn to_bytes(&self) -> [u8; 32] {
        let mut b = [0u8; 32];
        b[0..4].copy_from_slice(&self.dev_id.to_ne_bytes());
        b[4..6].copy_from_slice(&self.queue_id.to_ne_bytes());
        b[6..8].copy_from_slice(&self.len.to_ne_bytes());
        b[8..16].copy_from_slice(&self.addr.to_ne_bytes());
        b[16..24].copy_from_slice(&self.data[0].to_ne_bytes());
        b[24..26].copy_from_slice(&self.dev_path_len.to_ne_bytes());
        b[26..28].copy_from_slice(&self.pad.to_ne_bytes());
        b[28..32].copy_from_slice(&self.reserved.to_ne_bytes());
        b
    }
}

impl UblksrvIoCmd {
    /// The bytes the kernel reads from the SQE's command area.
    pub fn to_bytes(&self) -> [u8; 16] {
        let mut b = [0u8; 16];
        b[0..2].copy_from_slice(&self.q_id.to_ne_bytes());
        b[2..4].copy_from_slice(&self.tag.to_ne_bytes());
        b[4..8].copy_from_slice(&self.result.to_ne_bytes());
        b[8..16].copy_from_slice(&self.addr.to_ne_bytes());
        b
    }
}

/// Bytes of one queue's descriptor array (`round_up(depth * 24, PAGE_SIZE)`).
pub fn queue_cmd_buf_size(depth: u16, page: usize) -> usize {
    (depth as usize * size_of::<UblksrvIoDesc>()).div_ceil(page) * page
}

/// Offset of queue `q`'s descriptor array in the char device's mmap space: every queue
/// gets room for the largest depth (`ublk_max_cmd_buf_size`).
pub fn queue_cmd_buf_offset(q: u16, page: usize) -> u64 {
    UBLKSRV_CMD_BUF_OFFSET + q as u64 * queue_cmd_buf_size(UBLK_MAX_QUEUE_DEPTH, page) as u64
}

/// Which command numbers a kernel understands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Encoding {
    /// `_IOWR('u', nr, ...)` numbers (6.4+, `UBLK_F_CMD_IOCTL_ENCODE`).
    Ioctl,
    /// The bare numbers of 6.0-6.3 (kept by newer kernels behind
    /// `CONFIG_BLKDEV_UBLK_LEGACY_OPCODES`).
    Legacy,
}

/// A control command on `/dev/ublk-control`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CtrlOp {
    /// `GET_FEATURES` (6.5, ioctl encoding only).
    GetFeatures,
    /// `ADD_DEV`.
    AddDev,
    /// `SET_PARAMS`.
    SetParams,
    /// `START_DEV`.
    StartDev,
    /// `STOP_DEV`.
    StopDev,
    /// `DEL_DEV`.
    DelDev,
    /// `GET_DEV_INFO`.
    GetDevInfo,
    /// `START_USER_RECOVERY`.
    StartUserRecovery,
    /// `END_USER_RECOVERY`.
    EndUserRecovery,
}

impl CtrlOp {
    /// The kernel's name, for messages.
    pub fn name(self) -> &'static str {
        match self {
            CtrlOp::GetFeatures => "GET_FEATURES",
            CtrlOp::AddDev => "ADD_DEV",
            CtrlOp::SetParams => "SET_PARAMS",
            CtrlOp::StartDev => "START_DEV",
            CtrlOp::StopDev => "STOP_DEV",
            CtrlOp::DelDev => "DEL_DEV",
            CtrlOp::GetDevInfo => "GET_DEV_INFO",
            CtrlOp::StartUserRecovery => "START_USER_RECOVERY",
            CtrlOp::EndUserRecovery => "END_USER_RECOVERY",
        }
    }

    fn nr(self) -> u8 {
        match self {
            CtrlOp::GetFeatures => UBLK_CMD_GET_FEATURES,
            CtrlOp::AddDev => UBLK_CMD_ADD_DEV,
            CtrlOp::SetParams => UBLK_CMD_SET_PARAMS,
            CtrlOp::StartDev => UBLK_CMD_START_DEV,
            CtrlOp::StopDev => UBLK_CMD_STOP_DEV,
            CtrlOp::DelDev => UBLK_CMD_DEL_DEV,
            CtrlOp::GetDevInfo => UBLK_CMD_GET_DEV_INFO,
            CtrlOp::StartUserRecovery => UBLK_CMD_START_USER_RECOVERY,
            CtrlOp::EndUserRecovery => UBLK_CMD_END_USER_RECOVERY,
        }
    }

    /// The `cmd_op` in `encoding`; `None` for GET_FEATURES in the legacy encoding.
    pub fn opcode(self, encoding: Encoding) -> Option<u32> {
        match (encoding, self) {
            (Encoding::Legacy, CtrlOp::GetFeatures) => None,
            (Encoding::Legacy, op) => Some(op.nr() as u32),
            // The getters are _IOR, everything else _IOWR.
            (Encoding::Ioctl, CtrlOp::GetFeatures | CtrlOp::GetDevInfo) => {
                Some(ublk_u_cmd_r(self.nr()))
            }
            (Encoding::Ioctl, op) => Some(ublk_u_cmd_rw(op.nr())),
        }
    }
}

/// The `cmd_op` of FETCH_REQ (`commit == false`) or COMMIT_AND_FETCH_REQ.
pub fn io_opcode(encoding: Encoding, commit: bool) -> u32 {
    let nr = if commit {
        UBLK_IO_COMMIT_AND_FETCH_REQ
    } else {
        UBLK_IO_FETCH_REQ
    };
    match encoding {
        Encoding::Ioctl => ublk_u_io(nr),
        Encoding::Legacy => nr as u32,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_numbers_match_the_header() {
        // Values of the UBLK_U_* macros as the C preprocessor expands them.
        let cases = [
            (CtrlOp::GetFeatures, 0x8020_7513),
            (CtrlOp::GetDevInfo, 0x8020_7502),
            (CtrlOp::AddDev, 0xc020_7504),
            (CtrlOp::DelDev, 0xc020_7505),
            (CtrlOp::StartDev, 0xc020_7506),
            (CtrlOp::StopDev, 0xc020_7507),
            (CtrlOp::SetParams, 0xc020_7508),
            (CtrlOp::StartUserRecovery, 0xc020_7510),
            (CtrlOp::EndUserRecovery, 0xc020_7511),
        ];
        for (op, want) in cases {
            assert_eq!(op.opcode(Encoding::Ioctl), Some(want), "{}", op.name());
        }
        assert_eq!(UBLK_U_CMD_GET_FEATURES, 0x8020_7513);
        assert_eq!(UBLK_U_CMD_ADD_DEV, 0xc020_7504);
        assert_eq!(ublk_u_cmd_r(UBLK_CMD_GET_PARAMS), 0x8020_7509);
        assert_eq!(UBLK_U_IO_FETCH_REQ, 0xc010_7520);
        assert_eq!(UBLK_U_IO_COMMIT_AND_FETCH_REQ, 0xc010_7521);
        assert_eq!(io_opcode(Encoding::Ioctl, false), 0xc010_7520);
        assert_eq!(io_opcode(Encoding::Ioctl, true), 0xc010_7521);
    }

    #[test]
    fn legacy_numbers() {
        assert_eq!(CtrlOp::AddDev.opcode(Encoding::Legacy), Some(0x04));
        assert_eq!(CtrlOp::GetDevInfo.opcode(Encoding::Legacy), Some(0x02));
        assert_eq!(
            CtrlOp::StartUserRecovery.opcode(Encoding::Legacy),
            Some(0x10)
        );
        assert_eq!(CtrlOp::EndUserRecovery.opcode(Encoding::Legacy), Some(0x11));
        assert_eq!(CtrlOp::GetFeatures.opcode(Encoding::Legacy), None);
        assert_eq!(io_opcode(Encoding::Legacy, false), 0x20);
        assert_eq!(io_opcode(Encoding::Legacy, true), 0x21);
    }

    #[test]
    fn command_bytes_follow_the_struct_layout() {
        let c = UblksrvCtrlCmd {
            dev_id: 0x0102_0304,
            queue_id: 0xffff,
            len: 64,
            addr: 0x1122_3344_5566_7788,
            data: [4242],
            dev_path_len: 7,
            pad: 0,
            reserved: 9,
        };
        let b = c.to_bytes();
        let at = |off: usize, n: usize| b[off..off + n].to_vec();
        assert_eq!(
            at(offset_of!(UblksrvCtrlCmd, dev_id), 4),
            0x0102_0304u32.to_ne_bytes()
        );
        assert_eq!(at(offset_of!(UblksrvCtrlCmd, queue_id), 2), [0xff, 0xff]);
        assert_eq!(at(offset_of!(UblksrvCtrlCmd, len), 2), 64u16.to_ne_bytes());
        assert_eq!(
            at(offset_of!(UblksrvCtrlCmd, addr), 8),
            0x1122_3344_5566_7788u64.to_ne_bytes()
        );
        assert_eq!(
            at(offset_of!(UblksrvCtrlCmd, data), 8),
            4242u64.to_ne_bytes()
        );
        assert_eq!(
            at(offset_of!(UblksrvCtrlCmd, dev_path_len), 2),
            7u16.to_ne_bytes()
        );
        assert_eq!(
            at(offset_of!(UblksrvCtrlCmd, reserved), 4),
            9u32.to_ne_bytes()
        );

        let io = UblksrvIoCmd {
            q_id: 3,
            tag: 77,
            result: -5,
            addr: 0xdead_beef_0000_1000,
        };
        let b = io.to_bytes();
        assert_eq!(b[offset_of!(UblksrvIoCmd, q_id)..][..2], 3u16.to_ne_bytes());
        assert_eq!(b[offset_of!(UblksrvIoCmd, tag)..][..2], 77u16.to_ne_bytes());
        assert_eq!(
            b[offset_of!(UblksrvIoCmd, result)..][..4],
            (-5i32).to_ne_bytes()
        );
        assert_eq!(
            b[offset_of!(UblksrvIoCmd, addr)..][..8],
            0xdead_beef_0000_1000u64.to_ne_bytes()
        );
    }

    #[test]
    fn descriptor_areas() {
        // ublk_queue_cmd_buf_size / ublk_max_cmd_buf_size with 4 KiB pages.
        assert_eq!(queue_cmd_buf_size(1, 4096), 4096);
        assert_eq!(queue_cmd_buf_size(128, 4096), 4096);
        assert_eq!(queue_cmd_buf_size(171, 4096), 8192);
        assert_eq!(queue_cmd_buf_size(4096, 4096), 98304);
        assert_eq!(queue_cmd_buf_offset(0, 4096), 0);
        assert_eq!(queue_cmd_buf_offset(2, 4096), 2 * 98304);
        let d = UblksrvIoDesc {
            op_flags: UBLK_IO_OP_WRITE as u32 | UBLK_IO_F_FUA,
            ..Default::default()
        };
        assert_eq!(d.op(), UBLK_IO_OP_WRITE);
    }
}
