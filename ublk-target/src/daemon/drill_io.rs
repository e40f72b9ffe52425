//! Drills inside the event loop (see `crate::drill`): the cut (hold new writes to the
//! backing until those in flight complete), the copy-before-write of every later write,
//! and the clone's servers, started and stopped on threads of their own.

use super::Loop;
use crate::control::ControlCall;
use crate::drill::nbd::NbdServer;
use crate::drill::ublk::UblkClone;
use crate::drill::Cow;
use blkrep_common::control::{ControlError, DrillStarted, DrillStatus, DrillStopped};
use blkrep_engine::{DiskKind, DiskOp, DiskState, Output, Role};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

/// Longest a cut may hold writes waiting for those in flight.
const HOLD_LIMIT: Duration = Duration::from_secs(10);

type Reply = crossbeam_channel::Sender<Result<serde_json::Value, ControlError>>;

/// Where a node's drill lives.
#[derive(Clone, Debug)]
pub struct DrillSetup {
    /// The copy-on-write store file.
    pub store: PathBuf,
    /// The clone's NBD socket.
    pub socket: PathBuf,
    /// The clone's ublk record (ublk is tried only when `ublk`).
    pub record: PathBuf,
    pub owner: u64,
    pub ublk: bool,
}

/// The clone's servers, once started.
pub(super) struct Servers {
    nbd: Option<NbdServer>,
    ublk: Option<UblkClone>,
}

pub(super) enum Drill {
    /// Waiting for in-flight backing writes; new ones wait in `held`.
    Holding {
        reply: Reply,
        who: Option<String>,
        asked: Instant,
        held: Vec<Output>,
    },
    Active {
        cow: Arc<Cow>,
        since: SystemTime,
        applied_at_cut: u64,
        device: Arc<Mutex<Option<String>>>,
        setup: Option<JoinHandle<Servers>>,
    },
}

impl Loop {
    /// `Request::DrillStart`.
    pub(super) fn drill_start(&mut self, c: ControlCall) {
        let refuse = |code: &str, msg: String| Err(ControlError::new(code, &msg));
        let st = self.vol.status();
        let answer = if self.drill_setup.is_none() {
            refuse(
                "unsupported",
                "this daemon was started without drill support".into(),
            )
        } else if self.drill.is_some() {
            refuse(
                "busy",
                "a drill is already running on this node (`blkrep drill --abort` ends it)".into(),
            )
        } else if st.role != Role::Secondary {
            refuse(
                "wrong_role",
                "a drill runs on the secondary (it tests the replica); this node is primary".into(),
            )
        } else if !matches!(
            st.disk_state,
            DiskState::UpToDate | DiskState::Consistent | DiskState::Outdated
        ) {
            refuse(
                "not_consistent",
                format!(
                    "the replica is {:?}: it holds no consistent image to test (a resync is \
                     under way or it failed); run the drill when it is UpToDate",
                    st.disk_state
                ),
            )
        } else if st.undo.as_ref().is_some_and(|u| {
            matches!(
                u.state.as_str(),
                "starting" | "active" | "releasing" | "rolling-back"
            )
        }) {
            refuse(
                "not_consistent",
                "a catch-up resync is rewriting the replica out of order; run the drill when \
                 it has ended"
                    .into(),
            )
        } else {
            Ok(())
        };
        if let Err(e) = answer {
            let _ = c.reply.send(Err(e));
            return;
        }
        self.drill = Some(Drill::Holding {
            reply: c.reply,
            who: c.who,
            asked: Instant::now(),
            held: Vec::new(),
        });
        self.drill_try_cut();
    }

    /// Route a backing write through the drill: held during the cut, preserved after it.
    /// Returns the output to submit now, if any.
    pub(super) fn drill_gate(&mut self, o: Output) -> Option<Output> {
        let range = match &o {
            Output::Disk(DiskOp {
                kind: DiskKind::Write { offset, data, .. },
                ..
            }) => (*offset, data.len() as u64),
            Output::Disk(DiskOp {
                kind: DiskKind::WriteZeroes { offset, len, .. } | DiskKind::Trim { offset, len, .. },
                ..
            }) => (*offset, *len),
            _ => return Some(o),
        };
        match &mut self.drill {
            Some(Drill::Holding { held, .. }) => {
                held.push(o);
                return None;
            }
            Some(Drill::Active { cow, .. }) => {
                if let Err(e) = cow.preserve(range.0, range.1) {
                    tracing::error!("{e}; replication goes on, the drill's clone is broken");
                    self.shared.events.log(
                        "drill",
                        "warning",
                        format!("{e}: the clone is broken"),
                        None,
                    );
                }
            }
            None => {}
        }
        self.backing_writes += 1;
        Some(o)
    }

    /// A backing write completed.
    pub(super) fn drill_write_done(&mut self) {
        self.backing_writes = self.backing_writes.saturating_sub(1);
        if self.backing_writes == 0 && matches!(self.drill, Some(Drill::Holding { .. })) {
            self.drill_try_cut();
        }
    }

    /// Every tick: give up a cut that waits too long.
    pub(super) fn drill_tick(&mut self) {
        if let Some(Drill::Holding { asked, .. }) = &self.drill {
            if asked.elapsed() > HOLD_LIMIT {
                if let Some(Drill::Holding { reply, held, .. }) = self.drill.take() {
                    let _ = reply.send(Err(ControlError::new(
                        "timeout",
                        &format!(
                            "writes to the backing did not complete within {}s; no cut was \
                             taken (is the backing device hung?)",
                            HOLD_LIMIT.as_secs()
                        ),
                    )));
                    for o in held {
                        self.output(o);
                    }
                }
            }
        }
    }

    /// Take the cut if nothing is in flight: start copy-on-write, release the held writes,
    /// start the clone's servers on a thread (it answers the request).
    fn drill_try_cut(&mut self) {
        if self.backing_writes > 0 {
            return;
        }
        let Some(Drill::Holding {
            reply,
            who,
            asked,
            held,
        }) = self.drill.take()
        else {
            return;
        };
        let setup = self.drill_setup.clone().expect("checked at start");
        let st = self.vol.status();
        let hold_seconds = asked.elapsed().as_secs_f64();
        let held_writes = held.len() as u64;
        // The clone reads the cut from a healthy leg (all healthy legs hold the same data).
        let leg = self
            .legs
            .healthy()
            .next()
            .and_then(|i| self.legs.legs[i].file.as_ref());
        let cow = match leg {
            Some(f) => f.try_clone(),
            None => Err(std::io::Error::other(
                "no healthy local leg to read the cut from",
            )),
        }
        .and_then(|f| Cow::create(f, self.vol.volume_size(), &setup.store));
        let cow = match cow {
            Ok(c) => Arc::new(c),
            Err(e) => {
                let _ = reply.send(Err(ControlError::new(
                    "drill_store",
                    &format!(
                        "cannot create the drill's store {}: {e}",
                        setup.store.display()
                    ),
                )));
                for o in held {
                    self.output(o);
                }
                return;
            }
        };
        let since = SystemTime::now();
        let device = Arc::new(Mutex::new(None));
        let cut_at = blkrep_common::events::rfc3339(
            since
                .duration_since(SystemTime::UNIX_EPOCH)
                .unwrap_or_default()
                .as_millis() as u64,
        );
        let started = DrillStarted {
            device: None,
            device_error: None,
            nbd: crate::drill::nbd::uri(&setup.socket),
            size: self.vol.volume_size(),
            cut_applied_seq: st.applied_seq,
            cut_received_seq: st.last_seq,
            generation: st.generation,
            disk_state: format!("{:?}", st.disk_state),
            cut_at,
            hold_seconds,
            held_writes,
            seconds: 0.0,
        };
        let events = self.shared.events.clone();
        let (c2, d2) = (cow.clone(), device.clone());
        let handle = std::thread::Builder::new()
            .name("drill-setup".into())
            .spawn(move || start_servers(setup, c2, d2, started, asked, reply, events, who))
            .expect("spawn drill setup");
        self.drill = Some(Drill::Active {
            cow,
            since,
            applied_at_cut: st.applied_seq,
            device,
            setup: Some(handle),
        });
        for o in held {
            self.output(o);
        }
    }

    /// `Request::DrillStop`.
    pub(super) fn drill_stop(&mut self, c: ControlCall, outcome: Option<String>) {
        match self.drill.take() {
            None => {
                let _ = c.reply.send(Err(ControlError::new(
                    "no_drill",
                    "no drill is running on this node",
                )));
            }
            Some(Drill::Holding { reply, held, .. }) => {
                let _ = reply.send(Err(ControlError::new("aborted", "the drill was aborted")));
                for o in held {
                    self.output(o);
                }
                let _ = c.reply.send(Ok(serde_json::to_value(DrillStopped {
                    preserved_bytes: 0,
                    clone_written_bytes: 0,
                    applied_during: 0,
                    broken: None,
                    seconds: 0.0,
                })
                .unwrap_or_default()));
            }
            Some(Drill::Active {
                cow,
                applied_at_cut,
                setup,
                ..
            }) => {
                let applied_during = self.vol.status().applied_seq.saturating_sub(applied_at_cut);
                let events = self.shared.events.clone();
                let who = c.who;
                let reply = c.reply;
                let _ = std::thread::Builder::new()
                    .name("drill-teardown".into())
                    .spawn(move || {
                        let t = Instant::now();
                        teardown(&cow, setup);
                        let (preserved_bytes, clone_written_bytes, broken) = cow.stats();
                        let stopped = DrillStopped {
                            preserved_bytes,
                            clone_written_bytes,
                            applied_during,
                            broken,
                            seconds: t.elapsed().as_secs_f64(),
                        };
                        events.log(
                            "drill",
                            "info",
                            format!(
                                "drill ended: {}; {} items applied to the replica meanwhile, \
                                 {} KiB of the cut preserved, {} KiB written by the clone's \
                                 users",
                                outcome.as_deref().unwrap_or("no verdict given"),
                                applied_during,
                                preserved_bytes >> 10,
                                clone_written_bytes >> 10
                            ),
                            who,
                        );
                        let _ = reply.send(Ok(serde_json::to_value(stopped).unwrap_or_default()));
                    });
            }
        }
    }

    /// The drill for `status`.
    pub(super) fn drill_status(&self) -> Option<DrillStatus> {
        let Some(Drill::Active {
            cow, since, device, ..
        }) = &self.drill
        else {
            return None;
        };
        let (preserved_bytes, clone_written_bytes, broken) = cow.stats();
        Some(DrillStatus {
            since: blkrep_common::events::rfc3339(
                since
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .unwrap_or_default()
                    .as_millis() as u64,
            ),
            device: device.lock().ok().and_then(|d| d.clone()),
            nbd: self
                .drill_setup
                .as_ref()
                .map(|s| crate::drill::nbd::uri(&s.socket))
                .unwrap_or_default(),
            preserved_bytes,
            clone_written_bytes,
            broken,
        })
    }

    /// The daemon stops: end a drill still running.
    pub(super) fn drill_shutdown(&mut self) {
        match self.drill.take() {
            Some(Drill::Active { cow, setup, .. }) => {
                teardown(&cow, setup);
                self.shared.events.log(
                    "drill",
                    "warning",
                    "drill ended by the daemon's stop".into(),
                    None,
                );
            }
            Some(Drill::Holding { reply, .. }) => {
                let _ = reply.send(Err(ControlError::new(
                    "shutting_down",
                    "the daemon is stopping",
                )));
            }
            None => {}
        }
    }
}

fn teardown(cow: &Cow, setup: Option<JoinHandle<Servers>>) {
    cow.close();
    if let Some(Ok(s)) = setup.map(|h| h.join()) {
        if let Some(u) = s.ublk {
            u.stop();
        }
        if let Some(n) = s.nbd {
            n.stop();
        }
    }
    cow.remove_store();
}

#[allow(clippy::too_many_arguments)]
fn start_servers(
    setup: DrillSetup,
    cow: Arc<Cow>,
    device: Arc<Mutex<Option<String>>>,
    mut started: DrillStarted,
    asked: Instant,
    reply: Reply,
    events: crate::events::EventLog,
    who: Option<String>,
) -> Servers {
    let nbd = match NbdServer::start(&setup.socket, cow.clone()) {
        Ok(n) => Some(n),
        Err(e) => {
            let _ = reply.send(Err(ControlError::new(
                "drill_export",
                &format!(
                    "cannot serve the clone at {}: {e} (end the drill with `blkrep drill --abort`)",
                    setup.socket.display()
                ),
            )));
            return Servers {
                nbd: None,
                ublk: None,
            };
        }
    };
    let ublk = if setup.ublk {
        match UblkClone::start(cow, setup.owner, &setup.record) {
            Ok(u) => {
                started.device = Some(u.device());
                if let Ok(mut d) = device.lock() {
                    *d = Some(u.device());
                }
                Some(u)
            }
            Err(e) => {
                started.device_error = Some(format!("no ublk device for the clone: {e}"));
                None
            }
        }
    } else {
        started.device_error = Some("ublk is not available on this host".into());
        None
    };
    started.seconds = asked.elapsed().as_secs_f64();
    events.log(
        "drill",
        "info",
        format!(
            "drill started: cut at applied sequence {} (generation {:016x}, {}), clone on {}",
            started.cut_applied_seq,
            started.generation,
            started.disk_state,
            started.device.as_deref().unwrap_or(&started.nbd)
        ),
        who,
    );
    let _ = reply.send(Ok(serde_json::to_value(&started).unwrap_or_default()));
    Servers { nbd, ublk }
}
