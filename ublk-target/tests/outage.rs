//! Link outages under a continuous write workload, through the fault-injecting proxy:
//! cuts of 1 s and 30 s and a stall. Nothing acknowledged is lost, the secondary
//! converges, shipping resumes where the secondary stopped (no resync), and the bytes
//! shipped from the cut until caught up are at most 1.01 × the bytes written meanwhile.

mod common;
use blkrep_tools::nbd_client::NbdClient;
use common::*;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;
const SIZE: u64 = 256 * MIB;
const BLOCK: u64 = 64 << 10;
/// Client write rate, bytes per second.
const RATE: u64 = 8 * MIB;

/// Writes 64 KiB blocks at RATE, one at a time, each tagged with its block and write id;
/// records the last acknowledged id of every block.
struct Writer {
    stop: Arc<AtomicBool>,
    written: Arc<AtomicU64>,
    handle: std::thread::JoinHandle<HashMap<u64, u64>>,
}

fn content(block: u64, id: u64) -> Vec<u8> {
    let mut v = vec![0u8; BLOCK as usize];
    for (i, c) in v.chunks_mut(16).enumerate() {
        c[..8].copy_from_slice(&block.to_le_bytes());
        c[8..].copy_from_slice(&(id ^ i as u64).to_le_bytes());
    }
    v
}

impl Writer {
    fn start(p: &Pair) -> Writer {
        let stop = Arc::new(AtomicBool::new(false));
        let written = Arc::new(AtomicU64::new(0));
        let mut c = NbdClient::connect_unix(&p.nbd_socket(0), "r0").expect("connect");
        let (st, wr) = (stop.clone(), written.clone());
        let handle = std::thread::spawn(move || {
            let mut acked = HashMap::new();
            let mut x: u64 = 0x2545f4914f6cdd1d;
            let t0 = Instant::now();
            let mut id = 0u64;
            while !st.load(Ordering::Relaxed) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let block = x % (SIZE / BLOCK);
                id += 1;
                c.write(block * BLOCK, &content(block, id), false)
                    .expect("transport")
                    .expect("write acknowledged with an error");
                acked.insert(block, id);
                let done = wr.fetch_add(BLOCK, Ordering::SeqCst) + BLOCK;
                if id.is_multiple_of(32) {
                    c.flush().expect("flush");
                }
                // Pace to RATE.
                let due = Duration::from_secs_f64(done as f64 / RATE as f64);
                if let Some(wait) = due.checked_sub(t0.elapsed()) {
                    std::thread::sleep(wait);
                }
            }
            c.flush().expect("flush");
            c.disconnect().unwrap();
            acked
        });
        Writer {
            stop,
            written,
            handle,
        }
    }

    fn written(&self) -> u64 {
        self.written.load(Ordering::SeqCst)
    }

    fn finish(self) -> HashMap<u64, u64> {
        self.stop.store(true, Ordering::SeqCst);
        self.handle.join().expect("writer")
    }
}

fn shipped(p: &Pair) -> u64 {
    p.status(0)["engine"]["shipped_bytes"].as_u64().unwrap()
}

fn resyncs_started(p: &Pair) -> usize {
    p.log(0).matches("resync to the peer started").count()
}

/// Wait until the secondary caught up with everything written so far (the writer keeps
/// writing: caught up means it has applied what was issued when we looked).
fn caught_up(p: &Pair, w: &Writer) -> (u64, u64) {
    let t0 = Instant::now();
    loop {
        let before = w.written();
        let s = p.status(0);
        let e = &s["engine"];
        if e["conn"] == "connected" && e["resync"].is_null() && e["lag_bytes"].as_u64() == Some(0) {
            return (e["shipped_bytes"].as_u64().unwrap(), before);
        }
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "never caught up: {s:#}\nlog:\n{}",
            p.log(0)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn link_cuts_and_stalls_under_writes_lose_nothing_and_resume_without_resync() {
    let p = Pair::new("outage", "async", SIZE);
    // 30 s at RATE must fit the ship queue: this test is about resuming, not overflow.
    p.resource_line("queue_limit = \"512M\"");
    let px = p.insert_proxy();
    p.start(0);
    let resyncs = resyncs_started(&p);
    let w = Writer::start(&p);
    std::thread::sleep(Duration::from_secs(2));
    for cut in [1u64, 30] {
        let _ = caught_up(&p, &w);
        let (s0, w0) = (shipped(&p), w.written());
        let connects = p.status(0)["engine"]["connects"].as_u64().unwrap();
        px.cut();
        std::thread::sleep(Duration::from_secs(cut));
        let during = w.written() - w0;
        px.heal();
        let (s1, w1) = caught_up(&p, &w);
        let (shipped_after, written) = (s1 - s0, w1 - w0);
        eprintln!(
            "cut {cut} s: {during} bytes written during the cut, {written} until caught up, \
             {shipped_after} shipped ({:.4}×)",
            shipped_after as f64 / written as f64
        );
        assert!(
            during >= cut * RATE / 2,
            "the writer stalled during the cut"
        );
        assert!(
            shipped_after as f64 <= 1.01 * written as f64,
            "cut {cut} s: shipped {shipped_after} bytes for {written} written"
        );
        assert!(
            p.status(0)["engine"]["connects"].as_u64().unwrap() > connects,
            "no reconnect after the cut"
        );
        assert_eq!(resyncs_started(&p), resyncs, "a cut caused a resync");
        assert!(p.log(0).contains("resumed at sequence"));
    }
    // A 2 s stall: nothing is lost, the link need not even drop.
    px.stall(true);
    std::thread::sleep(Duration::from_secs(2));
    px.stall(false);
    let _ = caught_up(&p, &w);
    // Slow link: 20 ms per chunk.
    px.delay(20);
    std::thread::sleep(Duration::from_secs(2));
    px.delay(0);
    let acked = w.finish();
    p.wait_in_sync(0);
    assert_eq!(resyncs_started(&p), resyncs, "an outage caused a resync");
    p.down();
    // Every acknowledged write is on both sides.
    let a = std::fs::read(p.backing(0)).unwrap();
    let b = std::fs::read(p.backing(1)).unwrap();
    for (block, id) in &acked {
        let at = (block * BLOCK) as usize;
        let want = content(*block, *id);
        assert!(
            a[at..at + BLOCK as usize] == want[..],
            "primary lost write {id} to block {block}"
        );
    }
    assert!(a == b, "the secondary differs from the primary");
    eprintln!("{} blocks checked", acked.len());
}

#[test]
fn replication_rate_limits_the_stream_and_buffers_the_rest() {
    if !require_qemu() {
        return;
    }
    let p = Pair::new("rate", "async", 32 * MIB);
    p.resource_line("replication_rate = \"2M\"");
    p.start(0);
    let s0 = shipped(&p);
    let t0 = Instant::now();
    // 8 MiB written at local speed: the async writes complete long before they ship.
    p.qemu_io_ok(0, &["write -P 0x6d 0 8M", "flush"]);
    let s = p.status(0);
    assert!(
        s["engine"]["lag_bytes"].as_u64().unwrap() > 2 * MIB,
        "the stream was not held back: {s:#}"
    );
    p.wait_in_sync(0);
    let took = t0.elapsed();
    let moved = shipped(&p) - s0;
    assert!(moved >= 8 * MIB, "{moved}");
    // 2 MiB/s with a burst of 1 MiB: at least (8 - 1) / 2 s. (A lower bound only: a slow
    // machine makes it longer, never shorter.)
    assert!(
        took >= Duration::from_millis(3400),
        "8 MiB shipped in {took:?} under a 2 MiB/s limit"
    );
    p.down();
    assert_eq!(hash_file(&p.backing(0)), hash_file(&p.backing(1)));
}

#[test]
fn compression_ships_fewer_bytes_and_the_same_data() {
    if !require_qemu() {
        return;
    }
    let link_sent = |p: &Pair| p.status(0)["link_bytes_sent"].as_u64().unwrap();
    let mut sent = vec![];
    for compression in ["none", "lz4"] {
        let p = Pair::new(&format!("lz4-{compression}"), "async", 32 * MIB);
        p.resource_line(&format!("compression = \"{compression}\""));
        p.start(0);
        let (s0, l0) = (shipped(&p), link_sent(&p));
        // qemu-io's pattern fill: one byte value per request, very compressible.
        p.qemu_io_ok(0, &["write -P 0x4c 0 8M", "write -P 0x4d 8M 8M", "flush"]);
        p.wait_in_sync(0);
        let (payload, wire) = (shipped(&p) - s0, link_sent(&p) - l0);
        eprintln!("compression {compression}: {payload} payload bytes, {wire} bytes on the wire");
        assert!(payload >= 16 * MIB);
        sent.push((payload, wire));
        p.down();
        assert_eq!(hash_file(&p.backing(0)), hash_file(&p.backing(1)));
    }
    assert!(
        sent[0].1 >= sent[0].0,
        "uncompressed: less on the wire than the payload?"
    );
    assert!(
        sent[1].1 * 10 < sent[1].0,
        "lz4 on patterned data: {} bytes on the wire for {}",
        sent[1].1,
        sent[1].0
    );
}
