//! Local storage: the backing device (or file) and the metadata area, and the io_uring
//! submissions that carry the engine's disk operations out.
//!
//! Every operation is a [`DiskIo`]: it knows how to build its next submission and how to
//! digest a completion (short transfers are resubmitted for the rest; a discard the
//! backing cannot punch falls back to zeroing; a FUA zero-range is followed by an fdatasync).

use blkrep_engine::meta::{MetaError, Metadata, AREA_SIZE, SLOT_SIZE};
use blkrep_engine::{AlignedBuf, DiskKind, IoError};
use bytes::Bytes;
use io_uring::{opcode, squeue, types};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

/// Errors opening local storage.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// The backing or metadata path could not be opened.
    #[error("cannot open {path}: {source}")]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The backing is smaller than the volume.
    #[error("backing {path} is {have} bytes, the resource needs {need} bytes")]
    TooSmall { path: PathBuf, have: u64, need: u64 },
    /// Reading or writing the metadata failed.
    #[error("metadata {path}: {source}")]
    MetaIo {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The metadata is missing, corrupt, foreign or of another version.
    #[error("metadata {path}: {source}")]
    Meta { path: PathBuf, source: MetaError },
}

/// Size of a file or block device in bytes.
pub fn device_size(f: &File) -> std::io::Result<u64> {
    let md = f.metadata()?;
    if md.file_type().is_block_device() {
        let mut size: u64 = 0;
        // BLKGETSIZE64 = _IOR(0x12, 114, size_t)
        const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;
        // SAFETY: the fd is open for the call's duration and `size` is a valid u64 out
        // pointer, which is what BLKGETSIZE64 writes.
        let r = unsafe { libc::ioctl(f.as_raw_fd(), BLKGETSIZE64, &mut size as *mut u64) };
        if r != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(size)
    } else {
        Ok(md.len())
    }
}

/// The backing device of the volume.
pub struct Backing {
    pub file: File,
    /// True when opened with O_DIRECT (false on filesystems that refuse it, e.g. tmpfs).
    pub direct: bool,
}

impl Backing {
    /// Open `path` read-write, O_DIRECT where possible, and check it holds `need` bytes.
    pub fn open(path: &Path, need: u64) -> Result<Backing, BackendError> {
        let open = |direct: bool| {
            let mut o = OpenOptions::new();
            o.read(true).write(true);
            if direct {
                o.custom_flags(libc::O_DIRECT);
            }
            o.open(path)
        };
        let (file, direct) = match open(true) {
            Ok(f) => (f, true),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => (
                open(false).map_err(|source| BackendError::Open {
                    path: path.into(),
                    source,
                })?,
                false,
            ),
            Err(source) => {
                return Err(BackendError::Open {
                    path: path.into(),
                    source,
                })
            }
        };
        let have = device_size(&file).map_err(|source| BackendError::Open {
            path: path.into(),
            source,
        })?;
        if have < need {
            return Err(BackendError::TooSmall {
                path: path.into(),
                have,
                need,
            });
        }
        Ok(Backing { file, direct })
    }
}

/// The two-slot metadata area.
pub struct MetaArea {
    pub file: File,
    pub path: PathBuf,
    /// Slot holding the newest valid copy.
    pub slot: usize,
}

impl MetaArea {
    /// Open and read the metadata; it must belong to this resource, node and size.
    pub fn open(
        path: &Path,
        resource: &str,
        node: &str,
        size: u64,
    ) -> Result<(MetaArea, Metadata), BackendError> {
        use std::os::unix::fs::FileExt;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|source| BackendError::Open {
                path: path.into(),
                source,
            })?;
        let mut area = vec![0u8; AREA_SIZE];
        let n = file
            .read_at(&mut area, 0)
            .map_err(|source| BackendError::MetaIo {
                path: path.into(),
                source,
            })?;
        area.truncate(n);
        let meta_err = |source| BackendError::Meta {
            path: path.into(),
            source,
        };
        let (meta, slot) = Metadata::decode_area(&area).map_err(meta_err)?;
        meta.check_identity(resource, node, size)
            .map_err(meta_err)?;
        Ok((
            MetaArea {
                file,
                path: path.into(),
                slot,
            },
            meta,
        ))
    }
}

impl MetaArea {
    /// Write `meta` (its counter one higher) to the other slot, durably, at start-up.
    pub fn write_sync(&mut self, meta: &mut Metadata) -> Result<(), BackendError> {
        use std::os::unix::fs::FileExt;
        meta.counter += 1;
        let slot = Metadata::next_slot(self.slot);
        let io = |source| BackendError::MetaIo {
            path: self.path.clone(),
            source,
        };
        let bytes = meta.encode_slot().map_err(|source| BackendError::Meta {
            path: self.path.clone(),
            source,
        })?;
        self.file
            .write_all_at(&bytes, (slot * SLOT_SIZE) as u64)
            .map_err(io)?;
        self.file.sync_data().map_err(io)?;
        self.slot = slot;
        Ok(())
    }
}

/// One disk operation in flight.
pub enum DiskIo {
    /// A read of the backing, or of the journal device when `journal`.
    Read {
        buf: AlignedBuf,
        offset: u64,
        done: usize,
        journal: bool,
    },
    Write {
        data: Bytes,
        offset: u64,
        done: usize,
        fua: bool,
    },
    /// A journal record, written from its parts (no copy on the event loop: the kernel's
    /// worker copies them into the page cache).
    JournalV {
        parts: Vec<Bytes>,
        iov: Vec<libc::iovec>,
        offset: u64,
        done: usize,
    },
    /// fallocate; `mode` changes when falling back from punching to zeroing.
    Fallocate {
        offset: u64,
        len: u64,
        mode: i32,
        fua: bool,
    },
    /// fdatasync of the backing, or of the journal device when `journal`.
    Fsync { journal: bool },
    Meta {
        buf: AlignedBuf,
        offset: u64,
        slot: usize,
    },
    /// Zeroes written as data: the fallback where the backing cannot zero a range with
    /// fallocate (tmpfs, some filesystems and devices).
    ZeroFill {
        offset: u64,
        len: u64,
        done: u64,
        fua: bool,
    },
}

/// Largest single write of the zero-fill fallback.
const ZERO_CHUNK: usize = 1 << 20;

/// A shared, aligned chunk of zeroes (never written to).
fn zeroes() -> &'static Bytes {
    static Z: std::sync::OnceLock<Bytes> = std::sync::OnceLock::new();
    Z.get_or_init(|| AlignedBuf::zeroed(ZERO_CHUNK).freeze())
}

/// What a completion meant.
pub enum Step {
    /// The operation finished.
    Done(Result<Option<Bytes>, IoError>),
    /// Submit the operation's next step.
    Again,
}

const PUNCH: i32 = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
const ZERO: i32 = libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE;

impl DiskIo {
    /// The operation for an engine disk op (metadata ops get their slot from `meta`).
    pub fn new(kind: DiskKind, meta: &MetaArea) -> Result<DiskIo, MetaError> {
        Ok(match kind {
            DiskKind::Read { offset, len } => DiskIo::Read {
                buf: AlignedBuf::zeroed(len as usize),
                offset,
                done: 0,
                journal: false,
            },
            DiskKind::JournalRead { pos, len } => DiskIo::Read {
                buf: AlignedBuf::zeroed(len as usize),
                offset: pos,
                done: 0,
                journal: true,
            },
            DiskKind::JournalSync => DiskIo::Fsync { journal: true },
            DiskKind::Write { offset, data, fua } => {
                let data = if blkrep_engine::buf::is_aligned(&data) {
                    data
                } else {
                    AlignedBuf::copy_from(&data).freeze()
                };
                DiskIo::Write {
                    data,
                    offset,
                    done: 0,
                    fua,
                }
            }
            DiskKind::JournalWrite { pos, parts } => DiskIo::JournalV {
                parts,
                iov: Vec::new(),
                offset: pos,
                done: 0,
            },
            DiskKind::WriteZeroes { offset, len, fua } => DiskIo::Fallocate {
                offset,
                len,
                mode: ZERO,
                fua,
            },
            DiskKind::Trim { offset, len } => DiskIo::Fallocate {
                offset,
                len,
                mode: PUNCH,
                fua: false,
            },
            DiskKind::Flush => DiskIo::Fsync { journal: false },
            DiskKind::WriteMeta(m) => {
                let slot = Metadata::next_slot(meta.slot);
                DiskIo::Meta {
                    buf: AlignedBuf::copy_from(&m.encode_slot()?),
                    offset: (slot * SLOT_SIZE) as u64,
                    slot,
                }
            }
        })
    }

    /// The submission for the current step. The returned entry points into `self`, which
    /// must stay where it is (it lives boxed in the ring's op table) until completion.
    pub fn sqe(&mut self, backing: i32, meta: i32, journal_fd: i32) -> squeue::Entry {
        match self {
            DiskIo::Read {
                buf,
                offset,
                done,
                journal,
            } => {
                let fd = if *journal { journal_fd } else { backing };
                let len = buf.len() - *done;
                // SAFETY: `done <= len`, so the pointer stays inside `buf`, which outlives the
                // operation (see above).
                let ptr = unsafe { buf.as_mut_ptr().add(*done) };
                opcode::Read::new(types::Fd(fd), ptr, len as u32)
                    .offset(*offset + *done as u64)
                    .build()
            }
            DiskIo::Write {
                data,
                offset,
                done,
                fua,
            } => {
                let rest = &data[*done..];
                opcode::Write::new(types::Fd(backing), rest.as_ptr(), rest.len() as u32)
                    .offset(*offset + *done as u64)
                    .rw_flags(if *fua { libc::RWF_DSYNC } else { 0 })
                    .build()
            }
            DiskIo::JournalV {
                parts,
                iov,
                offset,
                done,
            } => {
                iov.clear();
                let mut skip = *done;
                for p in parts.iter() {
                    if skip >= p.len() {
                        skip -= p.len();
                        continue;
                    }
                    iov.push(libc::iovec {
                        iov_base: p[skip..].as_ptr() as *mut libc::c_void,
                        iov_len: p.len() - skip,
                    });
                    skip = 0;
                }
                opcode::Writev::new(types::Fd(journal_fd), iov.as_ptr(), iov.len() as u32)
                    .offset(*offset + *done as u64)
                    .build()
            }
            DiskIo::Fallocate {
                offset, len, mode, ..
            } => {
                if *mode == 0 {
                    // FUA step after zeroing.
                    opcode::Fsync::new(types::Fd(backing))
                        .flags(types::FsyncFlags::DATASYNC)
                        .build()
                } else {
                    opcode::Fallocate::new(types::Fd(backing), *len)
                        .offset(*offset)
                        .mode(*mode)
                        .build()
                }
            }
            DiskIo::Fsync { journal } => {
                opcode::Fsync::new(types::Fd(if *journal { journal_fd } else { backing }))
                    .flags(types::FsyncFlags::DATASYNC)
                    .build()
            }
            DiskIo::ZeroFill {
                offset,
                len,
                done,
                fua,
            } => {
                let n = (*len - *done).min(ZERO_CHUNK as u64) as u32;
                opcode::Write::new(types::Fd(backing), zeroes().as_ptr(), n)
                    .offset(*offset + *done)
                    .rw_flags(if *fua { libc::RWF_DSYNC } else { 0 })
                    .build()
            }
            DiskIo::Meta { buf, offset, .. } => {
                opcode::Write::new(types::Fd(meta), buf.as_mut_ptr(), buf.len() as u32)
                    .offset(*offset)
                    .rw_flags(libc::RWF_DSYNC)
                    .build()
            }
        }
    }

    /// Digest a completion result (`res` as the CQE reports it).
    pub fn complete(&mut self, res: i32, meta: &mut MetaArea) -> Step {
        let err = |res: i32| Step::Done(Err(IoError::from_errno(-res)));
        match self {
            DiskIo::Read { buf, done, .. } => {
                if res < 0 {
                    return err(res);
                }
                if res == 0 {
                    return Step::Done(Err(IoError::Io)); // unexpected end of the backing
                }
                *done += res as usize;
                if *done < buf.len() {
                    return Step::Again;
                }
                let b = std::mem::replace(buf, AlignedBuf::zeroed(0));
                Step::Done(Ok(Some(b.freeze())))
            }
            DiskIo::Write { data, done, .. } => {
                if res < 0 {
                    return err(res);
                }
                if res == 0 {
                    return Step::Done(Err(IoError::Io));
                }
                *done += res as usize;
                if *done < data.len() {
                    Step::Again
                } else {
                    Step::Done(Ok(None))
                }
            }
            DiskIo::JournalV { parts, done, .. } => {
                if res < 0 {
                    return err(res);
                }
                if res == 0 {
                    return Step::Done(Err(IoError::Io));
                }
                *done += res as usize;
                if *done < parts.iter().map(|p| p.len()).sum::<usize>() {
                    Step::Again
                } else {
                    Step::Done(Ok(None))
                }
            }
            DiskIo::Fallocate {
                offset,
                len,
                mode,
                fua,
            } => {
                let unsupported = res == -libc::EOPNOTSUPP || res == -libc::EINVAL;
                if unsupported && *mode == PUNCH {
                    *mode = ZERO;
                    return Step::Again;
                }
                if unsupported && *mode == ZERO {
                    *self = DiskIo::ZeroFill {
                        offset: *offset,
                        len: *len,
                        done: 0,
                        fua: *fua,
                    };
                    return Step::Again;
                }
                if res < 0 {
                    return err(res);
                }
                if *mode != 0 && *fua {
                    *mode = 0;
                    return Step::Again;
                }
                Step::Done(Ok(None))
            }
            DiskIo::ZeroFill { len, done, .. } => {
                if res < 0 {
                    return err(res);
                }
                if res == 0 {
                    return Step::Done(Err(IoError::Io));
                }
                *done += res as u64;
                if *done < *len {
                    Step::Again
                } else {
                    Step::Done(Ok(None))
                }
            }
            DiskIo::Fsync { .. } => {
                if res < 0 {
                    err(res)
                } else {
                    Step::Done(Ok(None))
                }
            }
            DiskIo::Meta { buf, slot, .. } => {
                if res < 0 {
                    return err(res);
                }
                if res as usize != buf.len() {
                    return Step::Done(Err(IoError::Io));
                }
                meta.slot = *slot;
                Step::Done(Ok(None))
            }
        }
    }
}
