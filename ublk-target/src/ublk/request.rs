//! ublk requests → engine inputs, and engine completions → COMMIT results.
//!
//! The mapping is the NBD frontend's (`Loop::nbd_parse`): read, write (FUA), flush, discard
//! (trim) and write-zeroes (FUA) become `Input::Client*`; the engine's completion comes
//! back as the byte count the kernel expects, or `-errno`.

use super::sys::{
    UblksrvIoDesc, UBLK_IO_F_FUA, UBLK_IO_OP_DISCARD, UBLK_IO_OP_FLUSH, UBLK_IO_OP_READ,
    UBLK_IO_OP_WRITE, UBLK_IO_OP_WRITE_ZEROES,
};
use blkrep_engine::{Input, IoError, ReqId};
use bytes::Bytes;

/// Bytes in one ublk sector (`start_sector`, `nr_sectors` are always in 512-byte units).
pub const SECTOR: u64 = 512;

/// One request from a descriptor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Request {
    /// Read `len` bytes at `offset` into the tag's buffer.
    Read { offset: u64, len: u32 },
    /// Write `len` bytes at `offset` from the tag's buffer.
    Write { offset: u64, len: u32, fua: bool },
    /// Flush the volatile cache.
    Flush,
    /// Discard.
    Discard { offset: u64, len: u64 },
    /// Write zeroes.
    WriteZeroes { offset: u64, len: u64, fua: bool },
}

impl Request {
    /// Parse and check a descriptor against the volume size and the tag buffer size;
    /// `Err` holds the positive errno to commit (`EOPNOTSUPP` for operations this device
    /// does not advertise, `EINVAL` for ranges the kernel should never have sent).
    pub fn parse(iod: &UblksrvIoDesc, volume_size: u64, buf_len: usize) -> Result<Request, i32> {
        if iod.op() == UBLK_IO_OP_FLUSH {
            // A flush has no range (its start sector is -1).
            return Ok(Request::Flush);
        }
        let offset = iod.start_sector.checked_mul(SECTOR).ok_or(libc::EINVAL)?;
        let len = iod.nr_sectors as u64 * SECTOR;
        let fua = iod.op_flags & UBLK_IO_F_FUA != 0;
        let req = match iod.op() {
            UBLK_IO_OP_READ | UBLK_IO_OP_WRITE => {
                if len > buf_len as u64 {
                    return Err(libc::EINVAL);
                }
                if iod.op() == UBLK_IO_OP_READ {
                    Request::Read {
                        offset,
                        len: len as u32,
                    }
                } else {
                    Request::Write {
                        offset,
                        len: len as u32,
                        fua,
                    }
                }
            }
            UBLK_IO_OP_DISCARD => Request::Discard { offset, len },
            UBLK_IO_OP_WRITE_ZEROES => Request::WriteZeroes { offset, len, fua },
            _ => return Err(libc::EOPNOTSUPP),
        };
        if len == 0 || offset.checked_add(len).is_none_or(|end| end > volume_size) {
            return Err(libc::EINVAL);
        }
        Ok(req)
    }

    /// The engine input; `write_data` copies a write's payload out of the tag buffer.
    pub fn input(self, req: ReqId, write_data: impl FnOnce(usize) -> Bytes) -> Input {
        match self {
            Request::Read { offset, len } => Input::ClientRead {
                req,
                offset,
                len: len as u64,
            },
            Request::Write { offset, len, fua } => Input::ClientWrite {
                req,
                offset,
                data: write_data(len as usize),
                fua,
            },
            Request::Flush => Input::ClientFlush { req },
            Request::Discard { offset, len } => Input::ClientTrim { req, offset, len },
            Request::WriteZeroes { offset, len, fua } => Input::ClientWriteZeroes {
                req,
                offset,
                len,
                fua,
            },
        }
    }

    /// The COMMIT result for a successful completion: reads and writes report every byte
    /// (a short count makes the kernel re-issue the rest); the others report 0.
    pub fn done_result(self) -> i32 {
        match self {
            Request::Read { len, .. } | Request::Write { len, .. } => len as i32,
            Request::Flush | Request::Discard { .. } | Request::WriteZeroes { .. } => 0,
        }
    }
}

/// The COMMIT result for an engine error.
pub fn error_result(e: IoError) -> i32 {
    -e.errno()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ublk::sys::{UBLK_IO_F_NOUNMAP, UBLK_IO_OP_WRITE_SAME};

    const SIZE: u64 = 64 << 20;
    const BUF: usize = 512 << 10;

    fn iod(op: u8, flags: u32, start: u64, sectors: u32) -> UblksrvIoDesc {
        UblksrvIoDesc {
            op_flags: op as u32 | flags,
            nr_sectors: sectors,
            start_sector: start,
            addr: 0x1000,
        }
    }

    fn input(d: UblksrvIoDesc) -> Result<Input, i32> {
        Request::parse(&d, SIZE, BUF).map(|r| r.input(7, |n| Bytes::from(vec![0xab; n])))
    }

    #[test]
    fn each_operation_maps_like_nbd() {
        match input(iod(UBLK_IO_OP_READ, 0, 8, 8)).unwrap() {
            Input::ClientRead { req, offset, len } => {
                assert_eq!((req, offset, len), (7, 4096, 4096))
            }
            other => panic!("{other:?}"),
        }
        match input(iod(UBLK_IO_OP_WRITE, UBLK_IO_F_FUA, 16, 1)).unwrap() {
            Input::ClientWrite {
                req,
                offset,
                data,
                fua,
            } => {
                assert_eq!((req, offset, data.len(), fua), (7, 8192, 512, true));
                assert!(data.iter().all(|&b| b == 0xab));
            }
            other => panic!("{other:?}"),
        }
        match input(iod(UBLK_IO_OP_WRITE, 0, 0, 8)).unwrap() {
            Input::ClientWrite { fua, .. } => assert!(!fua),
            other => panic!("{other:?}"),
        }
        // The kernel sends flushes with start sector -1 and no length.
        assert!(matches!(
            input(iod(UBLK_IO_OP_FLUSH, 0, u64::MAX, 0)).unwrap(),
            Input::ClientFlush { req: 7 }
        ));
        match input(iod(UBLK_IO_OP_DISCARD, 0, 2048, 2048)).unwrap() {
            Input::ClientTrim { offset, len, .. } => assert_eq!((offset, len), (1 << 20, 1 << 20)),
            other => panic!("{other:?}"),
        }
        match input(iod(
            UBLK_IO_OP_WRITE_ZEROES,
            UBLK_IO_F_FUA | UBLK_IO_F_NOUNMAP,
            0,
            4096,
        ))
        .unwrap()
        {
            Input::ClientWriteZeroes {
                offset, len, fua, ..
            } => assert_eq!((offset, len, fua), (0, 2 << 20, true)),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn refusals() {
        assert_eq!(
            input(iod(UBLK_IO_OP_WRITE_SAME, 0, 0, 8)).unwrap_err(),
            libc::EOPNOTSUPP
        );
        assert_eq!(input(iod(42, 0, 0, 8)).unwrap_err(), libc::EOPNOTSUPP);
        // Beyond the end, straddling the end, bigger than the tag buffer, empty.
        assert_eq!(
            input(iod(UBLK_IO_OP_READ, 0, SIZE / 512, 8)).unwrap_err(),
            libc::EINVAL
        );
        assert_eq!(
            input(iod(UBLK_IO_OP_DISCARD, 0, SIZE / 512 - 8, 16)).unwrap_err(),
            libc::EINVAL
        );
        assert_eq!(
            input(iod(UBLK_IO_OP_WRITE, 0, 0, (BUF / 512) as u32 + 8)).unwrap_err(),
            libc::EINVAL
        );
        assert_eq!(
            input(iod(UBLK_IO_OP_READ, 0, 0, 0)).unwrap_err(),
            libc::EINVAL
        );
        assert_eq!(
            input(iod(UBLK_IO_OP_READ, 0, u64::MAX / 256, 8)).unwrap_err(),
            libc::EINVAL
        );
        // The largest request that fits the buffer, ending exactly at the end.
        let last = (SIZE - BUF as u64) / 512;
        assert!(input(iod(UBLK_IO_OP_WRITE, 0, last, (BUF / 512) as u32)).is_ok());
    }

    #[test]
    fn commit_results() {
        let r = Request::parse(&iod(UBLK_IO_OP_READ, 0, 0, 8), SIZE, BUF).unwrap();
        assert_eq!(r.done_result(), 4096);
        let w = Request::parse(&iod(UBLK_IO_OP_WRITE, 0, 0, 16), SIZE, BUF).unwrap();
        assert_eq!(w.done_result(), 8192);
        assert_eq!(Request::Flush.done_result(), 0);
        let z = Request::parse(&iod(UBLK_IO_OP_WRITE_ZEROES, 0, 0, 16), SIZE, BUF).unwrap();
        assert_eq!(z.done_result(), 0);
        assert_eq!(error_result(IoError::ReadOnly), -libc::EPERM);
        assert_eq!(error_result(IoError::Io), -libc::EIO);
        assert_eq!(error_result(IoError::Shutdown), -libc::ESHUTDOWN);
    }
}
