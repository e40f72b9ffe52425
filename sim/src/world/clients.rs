//! The clients: random reads, writes, flushes, FUA, trims and write-zeroes on both nodes,
//! and the checks their completions allow (reads not staler than acknowledged data).

use super::*;

impl World {
    // ------------------------------------------------------------------ clients

    pub(super) fn client(&mut self, i: usize) {
        let gap = self.rng.range(0, self.faults.client_gap_us) * 1000;
        if !self.liveness {
            self.at(gap.max(50_000), Ev::Client(i));
        }
        if !self.alive(i) || self.nodes[i].reqs.len() >= self.faults.queue_depth {
            return;
        }
        let sectors = (self.cfg.volume_size / SECTOR) as usize;
        let r = self.rng.below(100);
        let kind = match r {
            0..=54 => ReqKind::Write,
            55..=74 => ReqKind::Read,
            75..=86 => ReqKind::Flush,
            87..=93 => ReqKind::Zeroes,
            _ => ReqKind::Trim,
        };
        let n = if self.rng.chance(0.1) {
            self.rng.range(1, 32) as usize
        } else {
            self.rng.range(1, 8) as usize
        };
        let hot = sectors / 8;
        let first = if self.rng.chance(0.5) {
            self.rng.below((hot - n.min(hot - 1)) as u64) as usize
        } else {
            self.rng.below((sectors - n) as u64) as usize
        };
        let fua = matches!(kind, ReqKind::Write | ReqKind::Zeroes) && self.rng.chance(0.1);
        let op = self.next_op;
        self.next_op += 1;
        let req = self.next_req;
        self.next_req += 1;
        let offset = first as u64 * SECTOR;
        let len = n as u64 * SECTOR;
        let on_primary = self.nodes[i].role == Role::Primary;
        let floors = match (&self.nodes[i].model, kind) {
            (Some(m), ReqKind::Read) => Some(m.floor[first..first + n].to_vec()),
            _ => None,
        };
        let input = match kind {
            ReqKind::Read => Input::ClientRead { req, offset, len },
            ReqKind::Write => {
                let mut data = blkrep_engine::AlignedBuf::zeroed(len as usize);
                for (k, s) in data.as_mut_slice().chunks_mut(SECTOR as usize).enumerate() {
                    fill_sector(op, (first + k) as u64, s);
                }
                Input::ClientWrite {
                    req,
                    offset,
                    data: data.freeze(),
                    fua,
                }
            }
            ReqKind::Zeroes => Input::ClientWriteZeroes {
                req,
                offset,
                len,
                fua,
            },
            ReqKind::Trim => Input::ClientTrim { req, offset, len },
            ReqKind::Flush => Input::ClientFlush { req },
        };
        if kind == ReqKind::Flush {
            if let Some(m) = self.nodes[i].model.as_mut() {
                m.flushes.insert(req, m.floor.clone());
            }
        }
        self.nodes[i].reqs.insert(
            req,
            ClientReq {
                op,
                kind,
                first,
                n,
                fua,
                floors,
                on_primary,
            },
        );
        self.log(|| {
            format!(
                "{} client {req} op {op} {kind:?} sectors {first}+{n}{}",
                NODES[i],
                if fua { " fua" } else { "" }
            )
        });
        self.input(i, input);
        // Accepted (not refused on the spot): it has a place in the primary's order.
        if self.nodes[i].reqs.contains_key(&req)
            && on_primary
            && matches!(kind, ReqKind::Write | ReqKind::Zeroes | ReqKind::Trim)
        {
            self.ops.accepted(op, first, n, kind != ReqKind::Write);
        }
    }

    pub(super) fn complete(
        &mut self,
        i: usize,
        req: ReqId,
        result: Result<Option<Bytes>, IoError>,
    ) {
        let Some(r) = self.nodes[i].reqs.remove(&req) else {
            return;
        };
        self.log(|| {
            format!(
                "{} client {req} done: {}",
                NODES[i],
                match &result {
                    Ok(_) => "ok".to_string(),
                    Err(e) => format!("{e:?}"),
                }
            )
        });
        let Ok(data) = result else {
            self.stats.client_errors += 1;
            if r.kind == ReqKind::Flush {
                if let Some(m) = self.nodes[i].model.as_mut() {
                    m.flushes.remove(&req);
                }
            }
            return;
        };
        match r.kind {
            ReqKind::Read => {
                self.stats.client_reads_ok += 1;
                let data = data.unwrap_or_default();
                for k in 0..r.n {
                    let s = r.first + k;
                    let c = content(
                        &data[k * SECTOR as usize..(k + 1) * SECTOR as usize],
                        s as u64,
                    );
                    if c == Content::Garbage {
                        return self.fail(violation(
                            "read-garbage",
                            format!(
                                "read {req} on {} returned bytes no client wrote to sector {s}",
                                NODES[i]
                            ),
                        ));
                    }
                    if let (Some(f), true) = (
                        &r.floors,
                        r.on_primary && self.nodes[i].role == Role::Primary,
                    ) {
                        self.stats.read_checks += 1;
                        if !self.ops.at_least(s, c, f[k]) {
                            let floor = f[k];
                            return self.fail(violation(
                                "read-stale",
                                format!(
                                    "read {req} on primary {} returned {c:?} for sector {s}, but version {floor} had been acknowledged before the read was issued",
                                    NODES[i]
                                ),
                            ));
                        }
                    }
                }
            }
            ReqKind::Flush => {
                self.stats.flushes_ok += 1;
                if let Some(m) = self.nodes[i].model.as_mut() {
                    if let Some(snap) = m.flushes.remove(&req) {
                        for (d, f) in m.durable.iter_mut().zip(snap) {
                            *d = (*d).max(f);
                        }
                    }
                }
            }
            _ => {
                self.stats.client_writes_ok += 1;
                let p = self.nodes[i].vol.as_ref().map(|v| v.probe());
                if p.is_some_and(|p| !p.streaming) {
                    self.protection_gap = false;
                }
                let protected = self.cfg.mode == Mode::Sync
                    && !self.protection_gap
                    && p.is_some_and(|p| p.streaming);
                if let Some(m) = self.nodes[i].model.as_mut() {
                    for s in r.first..r.first + r.n {
                        m.floor[s] = m.floor[s].max(r.op);
                        if r.fua {
                            m.durable[s] = m.durable[s].max(r.op);
                        }
                        if protected {
                            self.protected[s] = self.protected[s].max(r.op);
                        }
                    }
                }
            }
        }
    }

    pub(super) fn drop_requests(&mut self, i: usize) {
        self.nodes[i].reqs.clear();
    }
}
