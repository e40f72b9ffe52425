//! The network between the nodes: one TCP-like connection at a time, ordered delivery with
//! delays, stalls, resets, partitions (bytes held back, not lost) and corrupted frames.

use super::*;

impl World {
    // ------------------------------------------------------------------ network

    pub(super) fn peer(i: usize) -> usize {
        1 - i
    }

    pub(super) fn send(&mut self, i: usize, conn: ConnId, msg: Msg) {
        let Some(c) = self.conn.as_ref() else { return };
        if c.id != conn || !c.open[i] {
            return;
        }
        if let Err(v) = self.observe(i, &msg) {
            self.fail(v);
        }
        let mut frame = codec::encode_to_vec(&msg);
        let garbage = !self.liveness && self.rng.chance(self.faults.garbage);
        if garbage {
            let k = self.rng.below(frame.len() as u64) as usize;
            frame[k] ^= 1 << self.rng.below(8);
            self.stats.garbage_frames += 1;
        }
        self.log(|| {
            format!(
                "{} -> {} {}{}",
                NODES[i],
                NODES[Self::peer(i)],
                brief_msg(&msg),
                if garbage { " (corrupted)" } else { "" }
            )
        });
        let lat = self.rng.range(30, 1500) * 1000;
        let c = self.conn.as_mut().expect("conn");
        let t = (self.now + lat).max(c.last[i]);
        c.last[i] = t;
        let delay = t - self.now;
        self.at(
            delay,
            Ev::Deliver {
                conn,
                to: Self::peer(i),
                frame,
            },
        );
    }

    /// What each sector of node `i` may hold once its in-flight local writes land: its
    /// current content, or that of any write still in flight over it.
    fn baseline(&self, i: usize) -> Vec<Vec<Content>> {
        let mut v: Vec<Vec<Content>> = self.contents(i).into_iter().map(|c| vec![c]).collect();
        for p in self.nodes[i].ops.values() {
            match &p.kind {
                DiskKind::Write { offset, data, .. } => {
                    for (k, chunk) in data.chunks(SECTOR as usize).enumerate() {
                        let s = (offset / SECTOR) as usize + k;
                        v[s].push(content(chunk, s as u64));
                    }
                }
                DiskKind::WriteZeroes { offset, len, .. } | DiskKind::Trim { offset, len } => {
                    for s in offset / SECTOR..(offset + len) / SECTOR {
                        v[s as usize].push(Content::Zero);
                    }
                }
                _ => {}
            }
        }
        // Client writes accepted but not yet issued to the disk (waiting behind an
        // overlapping write or for the activity log) land later too.
        for r in self.nodes[i].reqs.values() {
            let c = match r.kind {
                ReqKind::Write => None,
                ReqKind::Zeroes | ReqKind::Trim => Some(Content::Zero),
                _ => continue,
            };
            for alts in &mut v[r.first..r.first + r.n] {
                alts.push(c.unwrap_or(Content::Op(r.op)));
            }
        }
        v
    }

    /// Record what the primary ships, for the replica checks.
    pub(super) fn observe(&mut self, i: usize, msg: &Msg) -> Result<(), Violation> {
        match msg {
            Msg::ResyncStart { base_seq, .. } => {
                let baseline = self.baseline(i);
                self.stream.rebase(*base_seq, &baseline);
                // Until the target gets this message its image still follows the old
                // definition of everything up to the base: leave it alone till then.
                self.nodes[1 - i].suspect = true;
                self.nodes[i].resets_seen = self.stream.resets;
                Ok(())
            }
            Msg::Item(it) => {
                if self.nodes[i].role != Role::Primary {
                    return Ok(());
                }
                self.stats.stream_items += 1;
                // A resend is byte-identical to the first transmission.
                let fingerprint = fnv(&codec::encode_to_vec(msg));
                let (first, contents) = match &it.kind {
                    ItemKind::Write { offset, data, .. } => {
                        let first = (offset / SECTOR) as usize;
                        let cs = data
                            .chunks(SECTOR as usize)
                            .enumerate()
                            .map(|(k, b)| content(b, (first + k) as u64))
                            .collect::<Vec<_>>();
                        (first, cs)
                    }
                    ItemKind::WriteZeroes { offset, len, .. } | ItemKind::Trim { offset, len } => (
                        (offset / SECTOR) as usize,
                        vec![Content::Zero; (len / SECTOR) as usize],
                    ),
                    ItemKind::Flush | ItemKind::Verify { .. } => (0, vec![]),
                };
                self.stream
                    .item(it.seq, it.dep, first, &contents, fingerprint)
            }
            _ => Ok(()),
        }
    }

    pub(super) fn close_side(&mut self, i: usize, conn: ConnId) {
        let Some(c) = self.conn.as_mut() else { return };
        if c.id != conn {
            return;
        }
        c.open[i] = false;
        let other = Self::peer(i);
        let other_open = c.open[other];
        if other_open {
            if self.partitioned {
                c.held[other].push(None);
            } else {
                // The peer's TCP stack sees the close (FIN/RST) after the network's delay.
                let d = self.rng.range(50, 2000) * 1000;
                self.at(d, Ev::PeerClosed { conn, to: other });
            }
        }
        if !other_open {
            self.conn = None;
        }
    }

    pub(super) fn deliver(&mut self, conn: ConnId, to: usize, frame: Vec<u8>) {
        let Some(c) = self.conn.as_mut() else { return };
        if c.id != conn || !c.open[to] {
            return;
        }
        if self.partitioned {
            c.held[to].push(Some(frame));
            return;
        }
        let d = &mut c.dec[to];
        let spare = d.spare(frame.len());
        spare[..frame.len()].copy_from_slice(&frame);
        d.filled(frame.len());
        loop {
            let Some(c) = self.conn.as_mut() else { return };
            if c.id != conn || !c.open[to] {
                return;
            }
            match c.dec[to].next() {
                Ok(Some(msg)) => {
                    if let Msg::Item(it) = &msg {
                        self.nodes[to].received = self.nodes[to].received.max(it.seq);
                    }
                    if let Msg::ResyncStart { .. } = &msg {
                        // A full sync replaces whatever the node held.
                        self.nodes[to].suspect = false;
                        self.nodes[to].horizon = 0;
                        self.nodes[to].received = 0;
                        self.nodes[to].resets_seen = self.stream.resets;
                        self.nodes[to].rebase_pending = true;
                    }
                    self.log(|| format!("{} <- {}", NODES[to], brief_msg(&msg)));
                    self.input(to, Input::PeerMsg { conn, msg });
                }
                Ok(None) => return,
                Err(e) => {
                    // What the daemon does: log, close the link, tell the engine.
                    self.log(|| format!("{} bad frame: {e}", NODES[to]));
                    self.close_side(to, conn);
                    self.input(to, Input::PeerClosed { conn });
                    return;
                }
            }
        }
    }

    pub(super) fn try_connect(&mut self) {
        let again = self.rng.range(100, 1000) * MS;
        if self.conn.is_none() && !self.partitioned && self.alive(0) && self.alive(1) {
            let id = self.next_conn;
            self.next_conn += 1;
            self.conn = Some(Conn {
                id,
                open: [true, true],
                dec: [Decoder::new(), Decoder::new()],
                last: [0, 0],
                held: [Vec::new(), Vec::new()],
            });
            self.stats.connects += 1;
            // A new connection carries only acknowledgements of what the peer holds now.
            self.protection_gap = false;
            if self.liveness {
                self.stats.liveness_connects += 1;
            }
            self.log(|| format!("connection {id} established"));
            let first = self.rng.below(2) as usize;
            self.input(first, Input::PeerConnected { conn: id });
            self.input(1 - first, Input::PeerConnected { conn: id });
        }
        self.at(again, Ev::Connect);
    }

    /// The partition ends: what TCP held back is delivered, in order.
    pub(super) fn heal(&mut self) {
        if !self.partitioned {
            return;
        }
        self.partitioned = false;
        self.log(|| "HEAL".into());
        let Some(c) = self.conn.as_mut() else { return };
        let id = c.id;
        let held = std::mem::take(&mut c.held);
        for (to, items) in held.into_iter().enumerate() {
            for item in items {
                let lat = self.rng.range(30, 1500) * 1000;
                let c = self.conn.as_mut().expect("conn");
                let t = (self.now + lat).max(c.last[1 - to]);
                c.last[1 - to] = t;
                let ev = match item {
                    Some(frame) => Ev::Deliver {
                        conn: id,
                        to,
                        frame,
                    },
                    None => Ev::PeerClosed { conn: id, to },
                };
                self.at(t - self.now, ev);
            }
        }
    }

    /// Node `i` is gone; `reset` = its TCP stack resets the connection (a killed process)
    /// rather than falling silent (a power loss).
    pub(super) fn node_gone(&mut self, i: usize, reset: bool) {
        let Some(c) = self.conn.as_mut() else { return };
        let id = c.id;
        c.open[i] = false;
        let other = 1 - i;
        let other_open = c.open[other];
        if other_open && reset {
            if self.partitioned {
                c.held[other].push(None);
            } else {
                let d = self.rng.range(50, 2000) * 1000;
                self.at(
                    d,
                    Ev::PeerClosed {
                        conn: id,
                        to: other,
                    },
                );
            }
        }
        if !other_open {
            self.conn = None;
        }
    }
}
