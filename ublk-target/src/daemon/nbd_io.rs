//! NBD clients inside the event loop: receive requests into the connection's buffer, parse
//! them into engine inputs, queue the replies (sent by `Loop::flush_sends`).

use super::{Loop, NbdConn, NbdHandoff, Op, ReqInfo, NBD_MAX_INFLIGHT, NBD_RBUF};
use crate::nbd::transmission::{self as nbdt, Command, RequestParser};
use crate::sendq::SendQueue;
use blkrep_engine::{AlignedBuf, Input, IoError, ReqId};
use bytes::Bytes;
use io_uring::{opcode, types};
use std::os::fd::AsRawFd;

impl Loop {
    /// The live connection in slot `key`, if it is still generation `gen`.
    fn nbd_conn(&mut self, key: usize, gen: u64) -> Option<&mut NbdConn> {
        self.nbd
            .get_mut(key)
            .and_then(|c| c.as_mut())
            .filter(|c| c.gen == gen)
    }

    pub(super) fn add_nbd(&mut self, h: NbdHandoff) {
        let gen = self.next_gen;
        self.next_gen += 1;
        let c = NbdConn {
            fd: h.fd,
            gen,
            size: h.export.size,
            read_only: h.export.read_only,
            rbuf: vec![0; NBD_RBUF],
            rstart: 0,
            rend: 0,
            parser: RequestParser::default(),
            recv_posted: false,
            sendq: SendQueue::default(),
            inflight: 0,
            closing: false,
            ring_ops: 0,
        };
        let key = match self.nbd.iter().position(|s| s.is_none()) {
            Some(k) => {
                self.nbd[k] = Some(c);
                k
            }
            None => {
                self.nbd.push(Some(c));
                self.nbd.len() - 1
            }
        };
        self.nbd_post_recv(key);
    }

    pub(super) fn nbd_post_recv(&mut self, key: usize) {
        let Some(c) = self.nbd.get_mut(key).and_then(|c| c.as_mut()) else {
            return;
        };
        if c.recv_posted || c.closing || c.inflight >= NBD_MAX_INFLIGHT || c.sendq.len() > 64 << 20
        {
            return;
        }
        if c.rstart == c.rend {
            c.rstart = 0;
            c.rend = 0;
        }
        // Make room: compact, and grow for a write bigger than the buffer.
        let need = nbdt::bytes_needed(&c.rbuf[c.rstart..c.rend]).max(NBD_RBUF);
        if c.rbuf.len() - c.rstart < need || c.rend == c.rbuf.len() {
            c.rbuf.copy_within(c.rstart..c.rend, 0);
            c.rend -= c.rstart;
            c.rstart = 0;
            if c.rbuf.len() < need {
                c.rbuf.resize(need, 0);
            }
        }
        let ptr = c.rbuf[c.rend..].as_mut_ptr();
        let len = (c.rbuf.len() - c.rend) as u32;
        c.recv_posted = true;
        c.ring_ops += 1;
        let (fd, gen) = (c.fd.as_raw_fd(), c.gen);
        let op = self.alloc_op(Op::NbdRecv { key, gen });
        self.push(
            opcode::Recv::new(types::Fd(fd), ptr, len)
                .build()
                .user_data(op as u64),
        );
    }

    pub(super) fn nbd_recv_done(&mut self, key: usize, gen: u64, res: i32) {
        let Some(c) = self.nbd_conn(key, gen) else {
            return;
        };
        c.recv_posted = false;
        c.ring_ops -= 1;
        if res <= 0 {
            if res < 0 && res != -libc::ECONNRESET {
                tracing::debug!(
                    "NBD client: recv failed: {}",
                    std::io::Error::from_raw_os_error(-res)
                );
            }
            c.closing = true;
            self.nbd_maybe_free(key);
            return;
        }
        c.rend += res as usize;
        self.nbd_parse(key);
        self.nbd_post_recv(key);
        self.nbd_maybe_free(key);
    }

    fn nbd_parse(&mut self, key: usize) {
        loop {
            let Some(c) = self.nbd.get_mut(key).and_then(|c| c.as_mut()) else {
                return;
            };
            if c.closing {
                return;
            }
            let buf = &c.rbuf[c.rstart..c.rend];
            let (req, used) = match c.parser.parse(buf) {
                Ok(Some(r)) => r,
                Ok(None) => return,
                Err(e) => {
                    tracing::warn!("NBD client: protocol error, closing: {e}");
                    c.closing = true;
                    // SAFETY: shutting down our own open socket; wakes the pending recv.
                    unsafe { libc::shutdown(c.fd.as_raw_fd(), libc::SHUT_RDWR) };
                    return;
                }
            };
            let data_range = req.data.clone();
            let start = c.rstart;
            c.rstart += used;
            if req.cmd == Command::Disc {
                c.closing = true;
                // SAFETY: as above.
                unsafe { libc::shutdown(c.fd.as_raw_fd(), libc::SHUT_RD) };
                return;
            }
            if let Err(errno) = nbdt::validate(&req, c.size, c.read_only) {
                nbdt::encode_simple_reply(req.handle, errno, self.scratch_reply());
                let c = self.nbd[key].as_mut().expect("conn");
                c.sendq.push_copy(&self.scratch);
                continue;
            }
            let data = data_range
                .map(|r| AlignedBuf::copy_from(&c.rbuf[start + r.start..start + r.end]).freeze());
            let fua = req.flags & nbdt::CMD_FLAG_FUA != 0;
            let rid = self.next_req;
            self.next_req += 1;
            c.inflight += 1;
            self.reqs.insert(
                rid,
                ReqInfo {
                    key,
                    gen: c.gen,
                    handle: req.handle,
                },
            );
            let (offset, len) = (req.offset, req.len as u64);
            let input = match req.cmd {
                Command::Read => Input::ClientRead {
                    req: rid,
                    offset,
                    len,
                },
                Command::Write => Input::ClientWrite {
                    req: rid,
                    offset,
                    data: data.unwrap_or_default(),
                    fua,
                },
                Command::Flush => Input::ClientFlush { req: rid },
                Command::Trim => Input::ClientTrim {
                    req: rid,
                    offset,
                    len,
                },
                Command::WriteZeroes => Input::ClientWriteZeroes {
                    req: rid,
                    offset,
                    len,
                    fua,
                },
                Command::Disc | Command::Unknown(_) => {
                    // validate() rejects unknown commands; Disc was handled above.
                    self.reqs.remove(&rid);
                    let c = self.nbd[key].as_mut().expect("conn");
                    c.inflight -= 1;
                    continue;
                }
            };
            self.feed(input);
        }
    }

    fn scratch_reply(&mut self) -> &mut Vec<u8> {
        self.scratch.clear();
        &mut self.scratch
    }

    /// The engine completed NBD request `req`: queue the reply.
    pub(super) fn nbd_complete(&mut self, req: ReqId, result: Result<Option<Bytes>, IoError>) {
        let Some(info) = self.reqs.remove(&req) else {
            return;
        };
        let (errno, data) = match result {
            Ok(d) => (0, d),
            Err(e) => (e.errno() as u32, None),
        };
        nbdt::encode_simple_reply(info.handle, errno, self.scratch_reply());
        let Some(c) = self
            .nbd
            .get_mut(info.key)
            .and_then(|c| c.as_mut())
            .filter(|c| c.gen == info.gen)
        else {
            return; // the client went away meanwhile
        };
        c.inflight -= 1;
        c.sendq.push_copy(&self.scratch);
        if let Some(d) = data {
            c.sendq.push_shared(d);
        }
        let key = info.key;
        self.nbd_post_recv(key);
        self.nbd_maybe_free(key);
    }

    pub(super) fn nbd_send_done(&mut self, key: usize, gen: u64, res: i32) {
        let Some(c) = self.nbd_conn(key, gen) else {
            return;
        };
        c.ring_ops -= 1;
        if res < 0 {
            c.sendq.complete(0);
            c.closing = true;
            // SAFETY: shutting down our own open socket.
            unsafe { libc::shutdown(c.fd.as_raw_fd(), libc::SHUT_RDWR) };
        } else {
            c.sendq.complete(res as usize);
        }
        self.nbd_post_recv(key);
        self.nbd_maybe_free(key);
    }

    fn nbd_maybe_free(&mut self, key: usize) {
        if let Some(c) = self.nbd.get(key).and_then(|c| c.as_ref()) {
            if c.closing && c.ring_ops == 0 && (c.inflight == 0) && !c.sendq.busy() {
                if !c.sendq.is_empty() {
                    return; // flush_sends will post the rest
                }
                self.nbd[key] = None;
            }
        }
    }
}
