//! A fault-injecting TCP proxy for the replication link: it sits between the dialing node
//! and the listening one and can cut, stall, delay, reset, truncate or corrupt the stream.
//!
//! "Client to server" is the dialer's direction (alpha → beta in the tests: the primary's
//! replication stream when alpha is primary).

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

#[derive(Default)]
struct State {
    /// Connections are dropped and new ones refused.
    cut: AtomicBool,
    /// Bytes are held (connections stay open).
    stalled: AtomicBool,
    /// Added to every forwarded chunk, milliseconds.
    delay_ms: AtomicU64,
    /// Flip the byte at this client→server offset (counted over all connections).
    corrupt_at: Mutex<Option<u64>>,
    /// Forward client→server bytes up to this offset, then close both ends.
    truncate_at: Mutex<Option<u64>>,
    /// Client→server and server→client bytes forwarded, over all connections.
    up: AtomicU64,
    down: AtomicU64,
    /// Connections accepted (and passed on).
    accepted: AtomicU64,
    /// Open connections: (client side, server side), for cuts and resets.
    conns: Mutex<Vec<(TcpStream, TcpStream)>>,
}

/// See the module documentation.
pub struct Proxy {
    /// Where the proxy listens (the address the dialer is configured with).
    pub addr: String,
    state: Arc<State>,
}

impl Proxy {
    /// Listen on a free loopback port and forward to `target`.
    pub fn start(target: &str) -> Proxy {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let state = Arc::new(State::default());
        let st = state.clone();
        let target = target.to_string();
        std::thread::spawn(move || {
            for c in l.incoming() {
                let Ok(client) = c else { continue };
                if st.cut.load(Ordering::SeqCst) {
                    drop(client);
                    continue;
                }
                let Ok(server) = TcpStream::connect(&target) else {
                    continue;
                };
                let _ = client.set_nodelay(true);
                let _ = server.set_nodelay(true);
                st.accepted.fetch_add(1, Ordering::SeqCst);
                st.conns
                    .lock()
                    .unwrap()
                    .push((client.try_clone().unwrap(), server.try_clone().unwrap()));
                let (c2, s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
                let a = st.clone();
                std::thread::spawn(move || pump(client, server, &a, true));
                let b = st.clone();
                std::thread::spawn(move || pump(s2, c2, &b, false));
            }
        });
        Proxy { addr, state }
    }

    /// Link down: drop every connection now and refuse new ones until [`Proxy::heal`].
    pub fn cut(&self) {
        self.state.cut.store(true, Ordering::SeqCst);
        self.drop_all(false);
    }

    /// Link up again.
    pub fn heal(&self) {
        self.state.cut.store(false, Ordering::SeqCst);
    }

    /// Hold every byte (connections stay open) until called with false.
    pub fn stall(&self, on: bool) {
        self.state.stalled.store(on, Ordering::SeqCst);
    }

    /// Delay every forwarded chunk by `ms`.
    pub fn delay(&self, ms: u64) {
        self.state.delay_ms.store(ms, Ordering::SeqCst);
    }

    /// Reset every open connection (RST, not FIN); new ones are accepted.
    pub fn reset(&self) {
        self.drop_all(true);
    }

    /// Flip one byte `after` bytes from now in the client→server stream.
    pub fn corrupt_after(&self, after: u64) {
        let at = self.state.up.load(Ordering::SeqCst) + after;
        *self.state.corrupt_at.lock().unwrap() = Some(at);
    }

    /// Close the connection `after` bytes from now in the client→server stream (mid-frame,
    /// most likely).
    pub fn truncate_after(&self, after: u64) {
        let at = self.state.up.load(Ordering::SeqCst) + after;
        *self.state.truncate_at.lock().unwrap() = Some(at);
    }

    /// True once a planned corruption or truncation has happened.
    pub fn fault_done(&self) -> bool {
        self.state.corrupt_at.lock().unwrap().is_none()
            && self.state.truncate_at.lock().unwrap().is_none()
    }

    /// Client→server bytes forwarded so far.
    pub fn bytes_up(&self) -> u64 {
        self.state.up.load(Ordering::SeqCst)
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> u64 {
        self.state.accepted.load(Ordering::SeqCst)
    }

    fn drop_all(&self, rst: bool) {
        for (c, s) in self.state.conns.lock().unwrap().drain(..) {
            for sock in [&c, &s] {
                if rst {
                    let _ = set_linger_zero(sock);
                }
                let _ = sock.shutdown(Shutdown::Both);
            }
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.cut();
    }
}

fn set_linger_zero(s: &TcpStream) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let l = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: setsockopt on our own open socket with a valid, correctly sized struct.
    let r = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            &l as *const libc::linger as *const libc::c_void,
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

fn pump(mut from: TcpStream, mut to: TcpStream, st: &State, up: bool) {
    let mut buf = vec![0u8; 64 << 10];
    let counter = if up { &st.up } else { &st.down };
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        while st.stalled.load(Ordering::SeqCst) && !st.cut.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(5));
        }
        if st.cut.load(Ordering::SeqCst) {
            break;
        }
        let d = st.delay_ms.load(Ordering::SeqCst);
        if d > 0 {
            std::thread::sleep(Duration::from_millis(d));
        }
        let start = counter.fetch_add(n as u64, Ordering::SeqCst);
        let mut len = n;
        let mut close = false;
        if up {
            let mut c = st.corrupt_at.lock().unwrap();
            if let Some(at) = *c {
                if at >= start && at < start + n as u64 {
                    buf[(at - start) as usize] ^= 0x5a;
                    *c = None;
                } else if at < start {
                    *c = None;
                }
            }
            let mut t = st.truncate_at.lock().unwrap();
            if let Some(at) = *t {
                if at < start + n as u64 {
                    len = at.saturating_sub(start) as usize;
                    close = true;
                    *t = None;
                }
            }
        }
        if to.write_all(&buf[..len]).is_err() || close {
            break;
        }
    }
    let _ = from.shutdown(Shutdown::Both);
    let _ = to.shutdown(Shutdown::Both);
}
