//! The drill clone as a ublk block device: one queue served by a thread of its own with a
//! small io_uring, answering from the [`Cow`] synchronously (a drill's checks — a mount,
//! e2fsck, a probe — need correctness, not queue depth).
//!
//! The device is created without user recovery, so it dies with the daemon; its record
//! (`RUN_DIR/RES-NODE.drill.ublk`) lets the next drill remove one a crash left behind.

use super::Cow;
use crate::ublk::ctrl::Control;
use crate::ublk::device::{self, Settings};
use crate::ublk::queue::{IoQueues, TagState};
use crate::ublk::request::Request;
use crate::ublk::sys::UBLK_IO_RES_OK;
use io_uring::IoUring;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

const DEPTH: u16 = 32;

/// A served clone device.
pub struct UblkClone {
    ctrl: Control,
    id: u32,
    record: PathBuf,
    queue: Option<JoinHandle<()>>,
}

impl UblkClone {
    /// Create `/dev/ublkbN` over `cow` (`owner`: the drill's owner tag).
    pub fn start(cow: Arc<Cow>, owner: u64, record: &Path) -> Result<UblkClone, String> {
        let mut ctrl = Control::open().map_err(|e| e.to_string())?;
        let s = Settings {
            queues: 1,
            depth: DEPTH,
            size: cow.size(),
            owner,
            record: record.to_path_buf(),
        };
        let a = device::create_ephemeral(&mut ctrl, &s).map_err(|e| e.to_string())?;
        let id = a.info.dev_id;
        let mut clone = UblkClone {
            ctrl,
            id,
            record: record.to_path_buf(),
            queue: None,
        };
        let started = (|| {
            let (depth, buf, encoding) = (
                a.info.queue_depth,
                a.info.max_io_buf_bytes as usize,
                clone.ctrl.encoding(),
            );
            let cdev = a.cdev;
            let (tx, rx) = crossbeam_channel::bounded(1);
            let size = cow.size();
            // The descriptor mapping is not Send: the queue thread maps it itself.
            clone.queue = Some(
                std::thread::Builder::new()
                    .name("drill-ublk".into())
                    .spawn(move || match IoQueues::new(cdev, 1, depth, buf, encoding) {
                        Ok(qs) => serve(qs, &cow, size, tx),
                        Err(e) => {
                            let _ = tx.send(Err(e.to_string()));
                        }
                    })
                    .map_err(|e| e.to_string())?,
            );
            rx.recv_timeout(Duration::from_secs(5))
                .map_err(|_| "the clone's queue thread did not start".to_string())??;
            // START_DEV waits for the fetches, then scans partitions through the queue.
            clone
                .ctrl
                .start_dev(id, std::process::id() as i32)
                .map_err(|e| e.to_string())?;
            let path = device::block_path(id);
            let deadline = Instant::now() + Duration::from_secs(5);
            while !Path::new(&path).exists() {
                if Instant::now() > deadline {
                    return Err(format!("{path} did not appear"));
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            Ok(())
        })();
        match started {
            Ok(()) => Ok(clone),
            Err(e) => {
                clone.stop();
                Err(e)
            }
        }
    }

    /// `/dev/ublkbN`.
    pub fn device(&self) -> String {
        device::block_path(self.id)
    }

    /// Stop and delete the device.
    pub fn stop(mut self) {
        if let Err(e) = self.ctrl.stop_dev(self.id) {
            tracing::warn!("drill clone: STOP_DEV: {e}");
        }
        if let Some(q) = self.queue.take() {
            let _ = q.join();
        }
        if let Err(e) = device::delete(&mut self.ctrl, self.id, &self.record) {
            tracing::warn!("drill clone: removing the device: {e}");
        }
    }
}

/// The queue thread: fetch every tag, then answer requests until the device stops.
fn serve(
    mut qs: IoQueues,
    cow: &Cow,
    size: u64,
    started: crossbeam_channel::Sender<Result<(), String>>,
) {
    let depth = qs.depth();
    let mut ring = match IoUring::new(u32::from(depth) * 2) {
        Ok(r) => r,
        Err(e) => {
            let _ = started.send(Err(format!("io_uring for the clone: {e}")));
            return;
        }
    };
    for tag in 0..depth {
        let e = qs.io_sqe(0, tag, None).user_data(u64::from(tag));
        // SAFETY: the entry points at the tag's buffer in `qs`, which outlives the ring.
        let _ = unsafe { ring.submission().push(&e) };
    }
    if let Err(e) = ring.submit() {
        let _ = started.send(Err(format!("fetching the clone's tags: {e}")));
        return;
    }
    let _ = started.send(Ok(()));
    let mut live = usize::from(depth);
    let mut cqes = Vec::new();
    while live > 0 {
        match ring.submit_and_wait(1) {
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
            Err(e) => {
                tracing::error!("drill clone queue: {e}");
                break;
            }
        }
        cqes.clear();
        cqes.extend(
            ring.completion()
                .map(|c| (c.user_data() as u16, c.result())),
        );
        for &(tag, res) in &cqes {
            if res != UBLK_IO_RES_OK {
                qs.set_state(0, tag, TagState::Dead);
                live -= 1;
                continue;
            }
            let iod = qs.descriptor(0, tag);
            let result = match Request::parse(&iod, size, qs.buf_len()) {
                Err(errno) => -errno,
                Ok(req) => {
                    let r = match req {
                        Request::Read { offset, len } => {
                            cow.read(offset, &mut qs.buf_mut(0, tag)[..len as usize])
                        }
                        Request::Write { offset, len, .. } => cow.write(
                            offset,
                            Some(&qs.buf(0, tag)[..len as usize]),
                            u64::from(len),
                        ),
                        Request::Flush => Ok(()),
                        Request::Discard { offset, len }
                        | Request::WriteZeroes { offset, len, .. } => cow.write(offset, None, len),
                    };
                    match r {
                        Ok(()) => req.done_result(),
                        Err(e) => {
                            tracing::warn!("drill clone: {e}");
                            -libc::EIO
                        }
                    }
                }
            };
            let e = qs.io_sqe(0, tag, Some(result)).user_data(u64::from(tag));
            // SAFETY: as above.
            let _ = unsafe { ring.submission().push(&e) };
        }
    }
    // The ring (and any command in it) goes before the buffers it names.
    drop(ring);
    drop(qs);
}
