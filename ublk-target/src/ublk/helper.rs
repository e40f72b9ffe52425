//! The `ublk-ctl` helper thread: runs the control commands that block while the event
//! loop must keep serving I/O (START_DEV scans partitions through the device;
//! END_USER_RECOVERY waits for the re-fetched tags; STOP_DEV waits for the requests the
//! server holds), and the in-use check that opens the block device.
//!
//! Jobs come from the loop over a channel and are done one at a time, in order; each
//! answer goes back over a channel with a wake-up of the loop. When the loop drops its end
//! of the job channel, the thread returns the [`Control`] (for DEL_DEV, once the char
//! device is closed) and whether it stopped the device.

use super::ctrl::Control;
use super::device;
use crate::wake::Waker;
use crossbeam_channel::{Receiver, Sender};

/// Work for the helper.
#[derive(Debug)]
pub enum Job {
    /// Every tag has been submitted for fetching: START_DEV (`recovery` false) or
    /// END_USER_RECOVERY (`recovery` true).
    Start { recovery: bool },
    /// Is the block device in use? (Before a demote or a stop.)
    CheckIdle { token: u64 },
    /// STOP_DEV.
    Stop,
}

/// The helper's answers.
#[derive(Debug)]
pub enum Done {
    /// START_DEV / END_USER_RECOVERY finished.
    Started(Result<(), String>),
    /// The in-use check of `token`: why the device is busy, or `None`.
    Idle { token: u64, busy: Option<String> },
    /// STOP_DEV finished.
    Stopped(Result<(), String>),
}

/// What the thread hands back when it ends.
pub struct Finished {
    /// The control device, for DEL_DEV.
    pub ctrl: Control,
    /// True when STOP_DEV succeeded (the device may be deleted); false when the device is
    /// still there for a future daemon to recover.
    pub stopped: bool,
    /// True when START_DEV or END_USER_RECOVERY succeeded.
    pub started: bool,
}

/// The loop's ends of the helper's channels.
pub struct HelperLink {
    /// Jobs to the helper.
    pub jobs: Sender<Job>,
    /// Answers from the helper.
    pub done: Receiver<Done>,
}

/// Start the helper for device `dev_id`.
pub fn spawn(
    mut ctrl: Control,
    dev_id: u32,
    waker: Waker,
) -> (HelperLink, std::thread::JoinHandle<Finished>) {
    let (jobs_tx, jobs_rx) = crossbeam_channel::unbounded::<Job>();
    let (done_tx, done_rx) = crossbeam_channel::unbounded();
    let handle = std::thread::Builder::new()
        .name("ublk-ctl".into())
        .spawn(move || {
            let pid = std::process::id() as i32;
            let (mut stopped, mut started) = (false, false);
            for job in jobs_rx.iter() {
                let done = match job {
                    Job::Start { recovery } => {
                        let r = if recovery {
                            ctrl.end_user_recovery(dev_id, pid)
                        } else {
                            ctrl.start_dev(dev_id, pid)
                        };
                        started |= r.is_ok();
                        Done::Started(r.map_err(|e| e.to_string()))
                    }
                    Job::CheckIdle { token } => Done::Idle {
                        token,
                        busy: device::in_use(dev_id),
                    },
                    Job::Stop => {
                        let r = ctrl.stop_dev(dev_id).map_err(|e| e.to_string());
                        stopped = r.is_ok();
                        Done::Stopped(r)
                    }
                };
                if done_tx.send(done).is_err() {
                    break;
                }
                waker.wake();
            }
            Finished {
                ctrl,
                stopped,
                started,
            }
        })
        .expect("spawn ublk-ctl thread");
    (
        HelperLink {
            jobs: jobs_tx,
            done: done_rx,
        },
        handle,
    )
}
