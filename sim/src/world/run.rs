//! The run: the event loop of the safety phase, then the liveness phase (faults healed, the
//! replicas must converge).

use super::*;

impl World {
    // ------------------------------------------------------------------ the run

    /// Run the safety phase (faults on) for the configured number of steps, then the
    /// liveness phase (faults healed) until the replicas converge. Returns the first
    /// violation.
    pub fn run(&mut self) -> Result<(), Violation> {
        while self.stats.steps < self.cfg.steps {
            self.step();
            if let Some(v) = self.failure.take() {
                return Err(v);
            }
        }
        self.liveness_phase()
    }

    pub(super) fn step(&mut self) {
        let Some(Reverse((t, id))) = self.queue.pop() else {
            return;
        };
        let ev = self.events.remove(&id).expect("scheduled event");
        self.now = t;
        self.stats.steps += 1;
        self.stats.sim_seconds = self.now as f64 / 1e9;
        match ev {
            Ev::Tick(i) => {
                self.input(i, Input::Tick { now_ns: self.now });
                self.at(100 * MS, Ev::Tick(i));
            }
            Ev::DiskDone { node, inc, op } => self.disk_done(node, inc, op),
            Ev::Deliver { conn, to, frame } => self.deliver(conn, to, frame),
            Ev::PeerClosed { conn, to } => {
                let open = self
                    .conn
                    .as_ref()
                    .is_some_and(|c| c.id == conn && c.open[to]);
                if open {
                    self.log(|| format!("{} sees conn {conn} closed", NODES[to]));
                    self.close_side(to, conn);
                    self.input(to, Input::PeerClosed { conn });
                }
            }
            Ev::Connect => self.try_connect(),
            Ev::Client(i) => self.client(i),
            Ev::Operator => {
                if !self.liveness {
                    self.operator()
                }
            }
            Ev::Crash(i) => self.crash(i),
            Ev::CatchupTakeover(i) => self.catchup_takeover(i),
            Ev::ForcePromote(i) => self.force_promote(i),
            Ev::Restart(i) => self.restart(i),
            Ev::Partition => {
                if !self.liveness {
                    self.stats.partitions += 1;
                    self.partitioned = true;
                    self.log(|| "PARTITION".into());
                    let d = self.rng.range(100, self.faults.partition_len_ms.max(101)) * MS;
                    self.at(d, Ev::Heal);
                }
            }
            Ev::Heal => {
                self.heal();
                if !self.liveness && self.faults.partition_every_ms > 0 {
                    let d = self.rng.range(1, self.faults.partition_every_ms) * MS;
                    self.at(d, Ev::Partition);
                }
            }
            Ev::Reset => {
                if !self.liveness {
                    if let Some(c) = self.conn.take() {
                        self.stats.resets += 1;
                        self.log(|| format!("RESET conn {}", c.id));
                        for i in 0..2 {
                            if c.open[i] {
                                self.input(i, Input::PeerClosed { conn: c.id });
                            }
                        }
                    }
                    let d = self.rng.range(1, self.faults.reset_every_ms.max(2)) * MS;
                    self.at(d, Ev::Reset);
                }
            }
            Ev::Stall => {
                if !self.liveness {
                    let d = self.rng.range(200, 8000) * MS;
                    let dir = self.rng.below(2) as usize;
                    if let Some(c) = self.conn.as_mut() {
                        self.stats.stalls += 1;
                        c.last[dir] = c.last[dir].max(self.now + d);
                    }
                    self.log(|| format!("STALL {} -> for {} ms", NODES[dir], d / MS));
                    let again = self.rng.range(1, self.faults.stall_every_ms.max(2)) * MS;
                    self.at(again, Ev::Stall);
                }
            }
        }
        if self.stats.steps.is_multiple_of(8) {
            self.check_replica();
        }
    }

    pub(super) fn primary(&self) -> Option<usize> {
        (0..2).find(|&i| {
            self.nodes[i]
                .vol
                .as_ref()
                .is_some_and(|v| v.role() == Role::Primary)
        })
    }

    pub(super) fn converged(&self) -> bool {
        let Some(p) = self.primary() else {
            return false;
        };
        let s = 1 - p;
        let (Some(pv), Some(sv)) = (self.nodes[p].vol.as_ref(), self.nodes[s].vol.as_ref()) else {
            return false;
        };
        let (pp, sp) = (pv.probe(), sv.probe());
        pp.streaming
            && pp.disk_state == DiskState::UpToDate
            && !pp.resync_running
            && pp.peer_applied == pp.last_seq
            && sp.applied == pp.last_seq
            && sp.disk_state == DiskState::UpToDate
            && self.nodes[p].reqs.is_empty()
            && self.nodes[p].ops.is_empty()
            && self.nodes[s].ops.is_empty()
    }

    pub(super) fn liveness_phase(&mut self) -> Result<(), Violation> {
        self.liveness = true;
        self.heal();
        self.log(|| "LIVENESS PHASE: faults healed".into());
        for i in 0..2 {
            if !self.alive(i) {
                self.restart(i);
            }
        }
        let start = self.now;
        let mut next_promote = self.now + SEC;
        let mut who = 0;
        while !self.converged() {
            if self.now - start > self.cfg.liveness_ns {
                let probes: Vec<String> = (0..2)
                    .map(|i| match &self.nodes[i].vol {
                        Some(v) => format!("{}: {:?}", NODES[i], v.probe()),
                        None => format!("{}: down", NODES[i]),
                    })
                    .collect();
                return Err(violation(
                    "no-convergence",
                    format!(
                        "replicas did not converge within {} s after the faults healed: {}",
                        self.cfg.liveness_ns / SEC,
                        probes.join("; ")
                    ),
                ));
            }
            // A primary whose disk failed (or that runs diskless on its peer) is demoted, so
            // that the peer can take over.
            if let Some(p) = self.primary() {
                let failed = self.nodes[p].vol.as_ref().is_some_and(|v| {
                    matches!(
                        v.probe().disk_state,
                        DiskState::Failed | DiskState::Diskless
                    )
                });
                if failed && self.now >= next_promote {
                    self.log(|| format!("liveness: operator demotes {} (disk failed)", NODES[p]));
                    self.input(
                        p,
                        Input::Admin {
                            token: 3,
                            cmd: AdminCmd::Demote,
                        },
                    );
                    next_promote = self.now + SEC;
                }
            }
            // A split brain (a forced takeover while the other node had written on its
            // own) needs the operator: the node that is not primary discards its changes.
            let split: Vec<usize> = (0..2)
                .filter(|&i| {
                    self.nodes[i]
                        .vol
                        .as_ref()
                        .is_some_and(|v| v.status().split_brain && v.role() == Role::Secondary)
                })
                .collect();
            if let Some(&loser) = split.first() {
                if self.now >= next_promote {
                    self.log(|| {
                        format!(
                            "liveness: operator resolves the split brain on {}",
                            NODES[loser]
                        )
                    });
                    self.nodes[loser].suspect = true;
                    self.input(
                        loser,
                        Input::Admin {
                            token: 4,
                            cmd: AdminCmd::ResolveDiscardLocal,
                        },
                    );
                    next_promote = self.now + SEC;
                }
            }
            if self.primary().is_none() && self.now >= next_promote {
                if self.alive(who) {
                    self.log(|| format!("liveness: operator promotes {}", NODES[who]));
                    let g = self.rng.next_u64() | 1;
                    self.input(
                        who,
                        Input::Admin {
                            token: 2,
                            cmd: AdminCmd::Promote {
                                force: false,
                                new_generation: g,
                            },
                        },
                    );
                }
                who = 1 - who;
                next_promote = self.now + SEC;
            }
            self.step();
            if let Some(v) = self.failure.take() {
                return Err(v);
            }
        }
        self.stats.liveness_seconds = (self.now - start) as f64 / 1e9;
        if self.stats.liveness_connects > self.cfg.max_liveness_connects {
            return Err(violation(
                "livelock",
                format!(
                    "{} connections were needed to converge after the faults healed (bound {})",
                    self.stats.liveness_connects, self.cfg.max_liveness_connects
                ),
            ));
        }
        let p = self.primary().expect("converged");
        if self.nodes[0].disk.image() != self.nodes[1].disk.image() {
            let a = self.contents(0);
            let b = self.contents(1);
            let s = (0..a.len()).find(|&s| a[s] != b[s]).unwrap_or(0);
            return Err(violation(
                "diverged",
                format!(
                    "converged by every status figure, but the images differ: sector {s} is {:?} on {} and {:?} on {} (primary {})",
                    a[s], NODES[0], b[s], NODES[1], NODES[p]
                ),
            ));
        }
        Ok(())
    }
}
