//! The operator and the faults: promote/demote/stop at random moments, crashes (power loss:
//! unflushed writes lost, in-flight ones torn, metadata updates torn) and restarts.

use super::*;

impl World {
    // ------------------------------------------------------------------ operator and faults

    pub(super) fn operator(&mut self) {
        if !self.liveness {
            let d = self.rng.range(100, self.faults.operator_every_ms.max(101)) * MS;
            self.at(d, Ev::Operator);
        }
        let i = self.rng.below(2) as usize;
        if !self.alive(i) {
            return;
        }
        let r = self.rng.below(100);
        let cmd = match r {
            45..=49 => AdminCmd::Verify {
                repair: self.rng.chance(0.5),
            },
            0..=44 => AdminCmd::Promote {
                // A forced takeover only where it is one: the other node is not serving as
                // primary (crashed, stopped, or secondary). Two primaries at once — a split
                // brain — are tested on real daemons: the checker's model has one writer.
                force: self.rng.chance(0.1)
                    && !self.nodes[1 - i]
                        .vol
                        .as_ref()
                        .is_some_and(|v| v.role() == Role::Primary || v.probe().promote_pending),
                new_generation: self.rng.next_u64() | 1,
            },
            50..=89 => AdminCmd::Demote,
            _ => {
                if self.faults.clean_restarts {
                    self.nodes[i].stopping = true;
                    AdminCmd::Shutdown
                } else {
                    AdminCmd::Demote
                }
            }
        };
        self.log(|| format!("operator on {}: {cmd:?}", NODES[i]));
        self.input(i, Input::Admin { token: 1, cmd });
    }

    /// The primary site is lost while node `i` catches up: the primary crashes now and the
    /// operator forces `i` to take over a little later (its rollback is checked).
    pub(super) fn catchup_takeover(&mut self, i: usize) {
        let other = 1 - i;
        let in_session = self.nodes[i]
            .vol
            .as_ref()
            .is_some_and(|v| v.probe().undo_active);
        if self.liveness || !in_session || !self.alive(other) {
            return;
        }
        if self.nodes[other].role == Role::Primary {
            self.crash_now(other);
        }
        let d = self.rng.range(20, 600) * MS;
        self.at(d, Ev::ForcePromote(i));
    }

    pub(super) fn force_promote(&mut self, i: usize) {
        let other_primary = self.nodes[1 - i]
            .vol
            .as_ref()
            .is_some_and(|v| v.role() == Role::Primary || v.probe().promote_pending);
        if self.liveness || !self.alive(i) || other_primary {
            return;
        }
        let cmd = AdminCmd::Promote {
            force: true,
            new_generation: self.rng.next_u64() | 1,
        };
        self.log(|| format!("operator on {} (site lost): {cmd:?}", NODES[i]));
        self.input(i, Input::Admin { token: 1, cmd });
    }

    pub(super) fn crash(&mut self, i: usize) {
        if !self.liveness && self.faults.crash_every_ms > 0 {
            let f = self.faults.crash_every_ms;
            let d = self.rng.range(f / 2, f * 3 / 2) * MS;
            self.at(d, Ev::Crash(i));
        }
        self.crash_now(i);
    }

    fn crash_now(&mut self, i: usize) {
        if !self.alive(i) || self.liveness {
            return;
        }
        self.stats.crashes += 1;
        // With a journal, half the crashes are kills of the daemon: the machine (its page
        // cache) survives, and so does everything the node had written.
        let power_loss = self.cfg.journal_size == 0 || self.rng.chance(0.5);
        if !power_loss {
            self.stats.kills += 1;
        }
        let was_primary = self.nodes[i].role == Role::Primary;
        self.log(|| {
            format!(
                "{} {} (primary: {was_primary})",
                if power_loss { "CRASH" } else { "KILL" },
                NODES[i]
            )
        });
        let other = 1 - i;
        // Sync mode: the surviving site holds every write acknowledged under protection.
        if was_primary && self.alive(other) {
            let p = self.nodes[other].vol.as_ref().expect("alive").probe();
            if matches!(p.disk_state, DiskState::UpToDate | DiskState::Consistent)
                && !self.nodes[other].suspect
            {
                self.stats.sync_loss_checks += 1;
                let cs = self.contents(other);
                for (s, c) in cs.into_iter().enumerate() {
                    if !self.ops.at_least(s, c, self.protected[s]) {
                        let need = self.protected[s];
                        return self.fail(violation(
                            "sync-write-lost",
                            format!(
                                "primary {} lost; the survivor {} holds {c:?} at sector {s}, but version {need} was acknowledged in sync mode",
                                NODES[i], NODES[other]
                            ),
                        ));
                    }
                }
            }
        }
        self.protected.iter_mut().for_each(|p| *p = 0);
        self.protection_gap = true;
        // Power loss: in-flight writes may land in part, unflushed ones may be lost.
        let mut in_flight = Vec::new();
        let mut journal_in_flight = Vec::new();
        let mut meta_in_flight = None;
        for p in self.nodes[i].ops.values() {
            match &p.kind {
                DiskKind::Write { offset, data, .. } => {
                    in_flight.push((*offset, data.len() as u64, Some(data.to_vec())))
                }
                DiskKind::WriteZeroes { offset, len, .. } | DiskKind::Trim { offset, len } => {
                    in_flight.push((*offset, *len, None))
                }
                DiskKind::WriteMeta(m) => meta_in_flight = Some(m.clone()),
                DiskKind::JournalWrite { pos, parts } => {
                    let data = parts.concat();
                    journal_in_flight.push((*pos, data.len() as u64, Some(data)))
                }
                _ => {}
            }
        }
        let mut rng = self.rng.fork();
        let n = &mut self.nodes[i];
        if power_loss {
            n.disk.crash(&mut rng, &in_flight);
            if let Some(j) = n.journal.as_mut() {
                j.crash(&mut rng, &journal_in_flight);
            }
            n.boot += 1;
        } else {
            // A kill: a write in flight lands whole or not at all on the backing (the
            // device has it or not); a journal write, copied into the page cache in order,
            // may stop part way.
            for (offset, len, data) in &in_flight {
                if rng.chance(0.5) {
                    n.disk.write(*offset, *len, data.as_deref(), false);
                }
            }
            if let Some(j) = n.journal.as_mut() {
                for (pos, len, data) in &journal_in_flight {
                    let k = rng.below(len / SECTOR + 1) * SECTOR;
                    let d = data.as_ref().expect("journal data");
                    if k > 0 {
                        j.write(*pos, k, Some(&d[..k as usize]), false);
                    }
                }
            }
        }
        if let Some(m) = meta_in_flight {
            // A torn metadata update: each sector of the slot old or new (a kill: a prefix
            // of its sectors, the order the kernel copies them in).
            let slot = 1 - n.meta_slot;
            let new = m.encode_slot().expect("metadata encodes");
            let prefix = rng.below(new.len() as u64 / SECTOR + 1) as usize;
            for (k, sec) in new.chunks(SECTOR as usize).enumerate() {
                let lands = if power_loss {
                    rng.chance(0.5)
                } else {
                    k < prefix
                };
                if lands {
                    let at = slot * SLOT_SIZE + k * SECTOR as usize;
                    n.meta[at..at + SECTOR as usize].copy_from_slice(sec);
                }
            }
        }
        // What the client of a primary was promised durable must have survived, on its
        // disk, unless that disk failed: a failed disk is no copy anyone reads again (it is
        // resynced in full), and what a diskless primary acknowledged is on the peer (held
        // to the replica-prefix check there).
        let disk_gone = self.nodes[i].vol.as_ref().is_some_and(|v| {
            matches!(
                v.probe().disk_state,
                DiskState::Failed | DiskState::Diskless
            )
        });
        let model = self.nodes[i].model.take();
        if let Some(m) = model.filter(|_| !disk_gone) {
            self.stats.durability_checks += 1;
            let cs = self.durable_contents(i);
            for (s, c) in cs.into_iter().enumerate() {
                if !self.ops.at_least(s, c, m.durable[s]) {
                    let need = m.durable[s];
                    return self.fail(violation(
                        "flushed-write-lost",
                        format!(
                            "after the crash of primary {} sector {s} holds {c:?}, but version {need} had been made durable (flush or FUA acknowledged)",
                            NODES[i]
                        ),
                    ));
                }
            }
        }
        let n = &mut self.nodes[i];
        n.vol = None;
        n.ops.clear();
        n.inc += 1;
        n.horizon = n.received;
        n.suspect = n.suspect || was_primary;
        self.drop_requests(i);
        let reset = self.rng.chance(0.5);
        self.node_gone(i, reset);
        let d = self.rng.range(200, 5000) * MS;
        self.at(d, Ev::Restart(i));
    }

    pub(super) fn restart(&mut self, i: usize) {
        if self.alive(i) {
            return;
        }
        let (meta, _) = match Metadata::decode_area(&self.nodes[i].meta) {
            Ok(x) => x,
            Err(e) => {
                return self.fail(violation(
                    "metadata-lost",
                    format!("{}: metadata unreadable after a crash: {e}", NODES[i]),
                ))
            }
        };
        if self.nodes[i].rebase_pending {
            // It crashed before recording that a resync targets it: its image is its
            // old one, which the model (rebased on the resync's source) does not describe.
            self.nodes[i].rebase_pending = false;
            self.nodes[i].suspect = true;
        }
        if meta.role == Role::Secondary
            && matches!(meta.disk_state, DiskState::UpToDate | DiskState::Consistent)
            && !self.nodes[i].suspect
            && self.nodes[i].resets_seen == self.stream.resets
        {
            self.stats.durability_checks += 1;
            let cs = self.contents(i);
            if let Err(v) = self.stream.check_durable(&cs, meta.applied_seq) {
                return self.fail(v);
            }
        }
        self.log(|| {
            format!(
                "RESTART {} (metadata: {:?} {:?} applied {})",
                NODES[i], meta.role, meta.disk_state, meta.applied_seq
            )
        });
        self.start_node(i);
    }
}
