//! The I/O side of a ublk device: `/dev/ublkcN`, each queue's descriptor array mapped
//! read-only, one aligned buffer per tag, and the FETCH_REQ / COMMIT_AND_FETCH_REQ
//! submissions (16-byte commands: they fit the event loop's normal 64-byte SQEs).
//!
//! Without zero copy (6.12 has neither `UBLK_F_SUPPORT_ZERO_COPY` nor `AUTO_BUF_REG`), the
//! server names a buffer per tag in every FETCH/COMMIT command: the kernel copies a write's
//! data into it before the fetch completes, and copies a read's data out of it when the
//! commit is issued. The buffers are [`AlignedBuf`]s (the backing is opened `O_DIRECT`)
//! sized to the device's largest I/O.

use super::request::Request;
use super::sys::{
    io_opcode, queue_cmd_buf_offset, queue_cmd_buf_size, Encoding, UblksrvIoCmd, UblksrvIoDesc,
};
use super::UblkError;
use blkrep_engine::AlignedBuf;
use io_uring::{opcode, squeue, types};
use std::fs::File;
use std::os::fd::AsRawFd;

/// One queue's descriptor array, mapped read-only from the char device.
struct Descriptors {
    ptr: *const UblksrvIoDesc,
    map_len: usize,
    depth: u16,
}

impl Descriptors {
    fn map(cdev: &File, q: u16, depth: u16, page: usize) -> Result<Descriptors, UblkError> {
        let map_len = queue_cmd_buf_size(depth, page);
        let offset = queue_cmd_buf_offset(q, page);
        // SAFETY: a fresh shared read-only mapping of the char device (the kernel refuses
        // writable ones); it does not alias any Rust object and is unmapped in Drop.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                map_len,
                libc::PROT_READ,
                libc::MAP_SHARED,
                cdev.as_raw_fd(),
                offset as libc::off_t,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(UblkError::Mmap {
                queue: q,
                err: std::io::Error::last_os_error(),
            });
        }
        Ok(Descriptors {
            ptr: p as *const UblksrvIoDesc,
            map_len,
            depth,
        })
    }

    fn get(&self, tag: u16) -> UblksrvIoDesc {
        assert!(
            tag < self.depth,
            "tag {tag} beyond queue depth {}",
            self.depth
        );
        // SAFETY: `tag < depth` and the mapping holds `depth` descriptors (it is at least
        // `depth * 24` bytes, page aligned); the kernel wrote this descriptor before it
        // completed the tag's fetch, which the caller has reaped. A volatile read, since
        // the kernel changes the memory behind our back.
        unsafe { std::ptr::read_volatile(self.ptr.add(tag as usize)) }
    }
}

impl Drop for Descriptors {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly the region mapped in `map`; nothing refers to it once
        // the descriptors are dropped.
        unsafe { libc::munmap(self.ptr as *mut libc::c_void, self.map_len) };
    }
}

/// Where one tag is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TagState {
    /// Not fetched yet.
    Idle,
    /// A FETCH or COMMIT_AND_FETCH is in the kernel, waiting for a request.
    Fetching,
    /// A request is being served (by the engine, or answered at once).
    Serving(Request),
    /// The kernel aborted the tag (device stopped) or the command failed: never reused.
    Dead,
}

/// One hardware queue.
struct Queue {
    iods: Descriptors,
    bufs: Vec<AlignedBuf>,
    tags: Vec<TagState>,
}

/// The I/O side of one device.
pub struct IoQueues {
    // Field order matters for Drop: unmap the descriptors before closing the device.
    queues: Vec<Queue>,
    cdev: File,
    encoding: Encoding,
    buf_len: usize,
}

impl IoQueues {
    /// Map the descriptors of `queues` queues of `depth` tags and allocate a buffer of
    /// `buf_len` bytes per tag.
    pub fn new(
        cdev: File,
        queues: u16,
        depth: u16,
        buf_len: usize,
        encoding: Encoding,
    ) -> Result<IoQueues, UblkError> {
        // SAFETY: sysconf has no memory-safety preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(4096) as usize;
        let mut qs = Vec::with_capacity(queues as usize);
        for q in 0..queues {
            qs.push(Queue {
                iods: Descriptors::map(&cdev, q, depth, page)?,
                bufs: (0..depth).map(|_| AlignedBuf::zeroed(buf_len)).collect(),
                tags: vec![TagState::Idle; depth as usize],
            });
        }
        Ok(IoQueues {
            queues: qs,
            cdev,
            encoding,
            buf_len,
        })
    }

    /// Number of queues.
    pub fn queues(&self) -> u16 {
        self.queues.len() as u16
    }

    /// Tags per queue.
    pub fn depth(&self) -> u16 {
        self.queues.first().map_or(0, |q| q.tags.len() as u16)
    }

    /// Size of every tag buffer (the largest request).
    pub fn buf_len(&self) -> usize {
        self.buf_len
    }

    /// The descriptor of a tag whose fetch just completed.
    pub fn descriptor(&self, q: u16, tag: u16) -> UblksrvIoDesc {
        self.queues[q as usize].iods.get(tag)
    }

    /// A tag's buffer.
    pub fn buf(&self, q: u16, tag: u16) -> &[u8] {
        self.queues[q as usize].bufs[tag as usize].as_ref()
    }

    /// A tag's buffer, to put read data in before the commit.
    pub fn buf_mut(&mut self, q: u16, tag: u16) -> &mut [u8] {
        self.queues[q as usize].bufs[tag as usize].as_mut_slice()
    }

    /// A tag's state.
    pub fn state(&self, q: u16, tag: u16) -> TagState {
        self.queues[q as usize].tags[tag as usize]
    }

    /// Set a tag's state.
    pub fn set_state(&mut self, q: u16, tag: u16, s: TagState) {
        self.queues[q as usize].tags[tag as usize] = s;
    }

    /// Tags not dead yet (their commands may still complete).
    pub fn live_tags(&self) -> usize {
        self.queues
            .iter()
            .flat_map(|q| q.tags.iter())
            .filter(|t| **t != TagState::Dead)
            .count()
    }

    /// The FETCH_REQ of a tag (`result` None), or its COMMIT_AND_FETCH_REQ with `result`.
    /// The tag becomes `Fetching`.
    ///
    /// The entry names the tag's buffer, which lives as long as `self`: the caller must
    /// keep `self` alive until the command completes or the ring is gone.
    pub fn io_sqe(&mut self, q: u16, tag: u16, result: Option<i32>) -> squeue::Entry {
        let addr = self.queues[q as usize].bufs[tag as usize].as_mut_ptr() as u64;
        self.set_state(q, tag, TagState::Fetching);
        let cmd = UblksrvIoCmd {
            q_id: q,
            tag,
            result: result.unwrap_or(0),
            addr,
        };
        opcode::UringCmd16::new(
            types::Fd(self.cdev.as_raw_fd()),
            io_opcode(self.encoding, result.is_some()),
        )
        .cmd(cmd.to_bytes())
        .build()
    }
}
