//! Two real daemons on loopback, driven by independent NBD clients (qemu-io, qemu-img) and
//! by our own Rust client; the replica must end byte-identical to the primary.

mod common;
use common::*;

const MIB: u64 = 1 << 20;

fn assert_images_equal(p: &Pair) {
    let (a, b) = (p.backing(0), p.backing(1));
    assert_eq!(
        hash_file(&a),
        hash_file(&b),
        "blake3 of primary and replica differ"
    );
    assert!(
        qemu_img_same(&a, &b),
        "qemu-img compare reports a difference"
    );
}

fn qemu_io_workload(mode: &str) {
    if !require_qemu() {
        return;
    }
    let p = Pair::new(&format!("qio-{mode}"), mode, 64 * MIB);
    p.start(0);
    p.qemu_io_ok(
        0,
        &[
            "write -P 0xab 0 64k",
            "write -P 0xcd 1M 1M",
            "write -P 0x11 -f 5M 4k", // FUA
            "write -P 0xee 63M 1M",
            "read -P 0xab 0 64k",
            "read -P 0xcd 1M 1M",
            "read -P 0x11 5M 4k",
            "discard 1M 512k",
            "read -P 0 1M 512k",
            "read -P 0xcd 1536k 512k",
            "write -z 32k 16k",
            "read -P 0 32k 16k",
            "read -P 0xab 0 32k",
            "flush",
        ],
    );
    // A wrong pattern must fail, or the checks above prove nothing.
    let out = p.qemu_io(0, &["read -P 0x55 0 4k"]);
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        text.contains("Pattern verification failed"),
        "qemu-io did not detect a wrong pattern: {text}"
    );
    p.wait_in_sync(0);
    p.down();
    assert_images_equal(&p);
}

#[test]
fn qemu_io_patterns_replicate_sync() {
    qemu_io_workload("sync");
}

#[test]
fn qemu_io_patterns_replicate_async() {
    qemu_io_workload("async");
}

fn rust_client_workload(mode: &str) {
    use blkrep_tools::nbd_client::NbdClient;
    let p = Pair::new(&format!("rust-{mode}"), mode, 32 * MIB);
    p.start(0);
    let mut c = NbdClient::connect_unix(&p.nbd_socket(0), "r0").expect("connect");
    assert_eq!(c.size(), 32 * MIB);
    // Pipelined overlapping writes: the replica must see them in the primary's order.
    let mut seed: u64 = 0x9e3779b97f4a7c15;
    let mut next = || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let mut inflight = 0;
    for i in 0..3000u64 {
        let blocks = 1 + next() % 8;
        let off = (next() % (32 * MIB / 4096 - blocks)) * 4096;
        let data = vec![(i % 251) as u8 + 1; (blocks * 4096) as usize];
        c.submit_write(off, &data, i % 97 == 0).expect("submit");
        inflight += 1;
        if inflight >= 32 {
            let (_, r) = c.wait_reply().expect("reply");
            r.expect("write ok");
            inflight -= 1;
        }
        if i % 500 == 0 {
            while inflight > 0 {
                c.wait_reply().expect("reply").1.expect("ok");
                inflight -= 1;
            }
            c.flush().expect("flush");
        }
    }
    while inflight > 0 {
        c.wait_reply().expect("reply").1.expect("ok");
        inflight -= 1;
    }
    c.flush().unwrap();
    c.disconnect().unwrap();
    p.wait_in_sync(0);
    p.down();
    assert_eq!(hash_file(&p.backing(0)), hash_file(&p.backing(1)));
}

#[test]
fn rust_client_pipelined_replicates_sync() {
    rust_client_workload("sync");
}

#[test]
fn rust_client_pipelined_replicates_async() {
    rust_client_workload("async");
}

#[test]
fn switchover_serves_same_data_and_replicates_back() {
    if !require_qemu() {
        return;
    }
    let p = Pair::new("switch", "sync", 32 * MIB);
    p.start(0);
    p.qemu_io_ok(0, &["write -P 0x5a 0 1M", "write -P 0x77 4M 64k", "flush"]);
    // A write on the secondary is refused.
    let out = p.qemu_io(1, &["write -P 0x01 0 4k"]);
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && text.contains("Permission denied"),
        "write on secondary not refused: {text}"
    );
    // Promote while the peer is primary is refused, with the reason.
    let out = p.blkrep(1, &["promote", "--timeout", "1"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("peer_is_primary"), "{err}");
    p.wait_in_sync(0);
    p.ok(0, &["demote"]);
    p.ok(1, &["promote", "--timeout", "20"]);
    p.qemu_io_ok(
        1,
        &[
            "read -P 0x5a 0 1M",
            "read -P 0x77 4M 64k",
            "write -P 0x99 8M 256k",
            "flush",
        ],
    );
    p.wait_in_sync(1);
    p.qemu_io_with_ok(0, &["-r"], &["read -P 0x99 8M 256k", "read -P 0x5a 0 1M"]);
    p.down();
    assert_images_equal(&p);
}
