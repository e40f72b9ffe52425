//! An ordered queue of outgoing bytes for one socket, sent with `sendmsg` scatter/gather.
//!
//! Small pieces (NBD reply headers, encoded frame headers) are coalesced into owned
//! buffers; payloads (`Bytes`) are referenced, never copied. While a send is in flight the
//! segments it covers are frozen: their heap memory is what the kernel reads.

use bytes::Bytes;
use std::collections::VecDeque;

enum Seg {
    Owned(Vec<u8>),
    Shared(Bytes),
}

impl Seg {
    fn bytes(&self) -> &[u8] {
        match self {
            Seg::Owned(v) => v,
            Seg::Shared(b) => b,
        }
    }
}

/// Outgoing bytes of one connection.
#[derive(Default)]
pub struct SendQueue {
    segs: VecDeque<Seg>,
    /// Bytes of the front segment already sent.
    front_off: usize,
    /// Segments covered by the send in flight (frozen).
    in_flight: usize,
    queued: usize,
}

/// At most this many segments go into one sendmsg.
const MAX_IOV: usize = 64;

impl SendQueue {
    /// Queue a copy of small bytes.
    pub fn push_copy(&mut self, data: &[u8]) {
        if data.is_empty() {
            return;
        }
        self.queued += data.len();
        if self.segs.len() > self.in_flight {
            if let Some(Seg::Owned(v)) = self.segs.back_mut() {
                if v.len() + data.len() <= 64 << 10 {
                    v.extend_from_slice(data);
                    return;
                }
            }
        }
        self.segs.push_back(Seg::Owned(data.to_vec()));
    }

    /// Queue a shared payload without copying it.
    pub fn push_shared(&mut self, data: Bytes) {
        if data.is_empty() {
            return;
        }
        self.queued += data.len();
        if data.len() <= 512 {
            self.queued -= data.len();
            return self.push_copy(&data);
        }
        self.segs.push_back(Seg::Shared(data));
    }

    /// Bytes waiting to be sent (including those in flight).
    pub fn len(&self) -> usize {
        self.queued
    }

    /// True when nothing waits.
    pub fn is_empty(&self) -> bool {
        self.queued == 0
    }

    /// True while a send is in flight.
    pub fn busy(&self) -> bool {
        self.in_flight > 0
    }

    /// Drop everything queued (after the socket failed; nothing may be in flight).
    pub fn clear(&mut self) {
        debug_assert_eq!(self.in_flight, 0);
        self.segs.clear();
        self.front_off = 0;
        self.queued = 0;
    }

    /// Drop what is queued behind the send in flight (a connection being torn down).
    pub fn clear_unsent(&mut self) {
        if self.in_flight == 0 {
            return self.clear();
        }
        while self.segs.len() > self.in_flight {
            let s = self.segs.pop_back().expect("segment");
            self.queued -= s.bytes().len();
        }
    }

    /// Fill `iov` for the next send and freeze the segments it covers. Returns false when
    /// there is nothing to send or a send is already in flight.
    pub fn prepare(&mut self, iov: &mut Vec<libc::iovec>) -> bool {
        iov.clear();
        if self.in_flight > 0 || self.segs.is_empty() {
            return false;
        }
        for (i, s) in self.segs.iter().take(MAX_IOV).enumerate() {
            let b = s.bytes();
            let b = if i == 0 { &b[self.front_off..] } else { b };
            iov.push(libc::iovec {
                iov_base: b.as_ptr() as *mut libc::c_void,
                iov_len: b.len(),
            });
        }
        self.in_flight = iov.len();
        true
    }

    /// The send in flight completed having sent `n` bytes.
    pub fn complete(&mut self, mut n: usize) {
        self.in_flight = 0;
        self.queued -= n;
        while n > 0 {
            let front_len = self
                .segs
                .front()
                .expect("sent more than queued")
                .bytes()
                .len();
            let rest = front_len - self.front_off;
            if n >= rest {
                n -= rest;
                self.segs.pop_front();
                self.front_off = 0;
            } else {
                self.front_off += n;
                n = 0;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drain(q: &mut SendQueue, step: usize) -> Vec<u8> {
        let mut out = vec![];
        let mut iov = vec![];
        while q.prepare(&mut iov) {
            let mut budget = step;
            let mut sent = 0;
            for v in &iov {
                // SAFETY: the iovecs point into segments frozen until complete().
                let s = unsafe { std::slice::from_raw_parts(v.iov_base as *const u8, v.iov_len) };
                let k = s.len().min(budget);
                out.extend_from_slice(&s[..k]);
                budget -= k;
                sent += k;
                if budget == 0 {
                    break;
                }
            }
            q.complete(sent);
        }
        out
    }

    #[test]
    fn partial_sends_keep_order() {
        let mut q = SendQueue::default();
        let mut want = vec![];
        for i in 0..50u8 {
            let small = vec![i; 16];
            let big = vec![i.wrapping_mul(3); 1000 + i as usize];
            q.push_copy(&small);
            q.push_shared(Bytes::from(big.clone()));
            want.extend(small);
            want.extend(big);
        }
        assert_eq!(q.len(), want.len());
        assert_eq!(drain(&mut q, 777), want);
        assert!(q.is_empty());
    }
}
