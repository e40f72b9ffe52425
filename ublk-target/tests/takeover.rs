//! Takeover and failback on two real daemons: a forced takeover after kill -9 of the
//! primary, failback to the returning node, and a split brain that moves no data until an
//! operator resolves it.

mod common;
use common::*;
use serde_json::Value;
use std::process::Command;
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;

fn json(p: &Pair, i: usize, args: &[&str]) -> Value {
    let out = p.ok(i, args);
    serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{args:?}: {e}: {out}"))
}

fn generation(s: &Value) -> u64 {
    s["engine"]["generation"].as_u64().unwrap()
}

/// Bytes of every resync node `i` started towards its peer, from its log.
fn resync_bytes(p: &Pair, i: usize) -> Vec<u64> {
    p.log(i)
        .lines()
        .filter_map(|l| l.split("resync to the peer started: ").nth(1))
        .filter_map(|rest| rest.split(' ').next()?.parse().ok())
        .collect()
}

#[test]
fn forced_takeover_after_kill9_then_failback() {
    if !require_qemu() {
        return;
    }
    let p = Pair::new("takeover", "async", 64 * MIB);
    p.start(0);
    p.qemu_io_ok(0, &["write -P 0x11 0 4M", "flush"]);
    p.wait_in_sync(0);
    let gen_a = generation(&p.status(0));
    // Idle and in sync: the activity log cools (its extents leave the metadata).
    p.wait_for(0, "activity log cooled", |s| {
        s["engine"]["hot_extents"] == 0
    });
    std::thread::sleep(Duration::from_millis(800));

    // The primary site is lost.
    p.kill9(0);
    p.wait_for(1, "link down", |s| s["engine"]["conn"] != "connected");
    // A planned promote is refused without the peer; --force takes over.
    let out = p.blkrep(1, &["promote", "--timeout", "1"]);
    assert!(
        !out.status.success(),
        "planned promote without peer succeeded"
    );
    let msg = p.ok(1, &["promote", "--force"]);
    assert!(msg.contains("forced takeover"), "{msg}");
    let s = p.status(1);
    assert_eq!(s["engine"]["role"], "primary");
    let gen_b = generation(&s);
    assert_ne!(gen_b, gen_a, "a forced takeover starts a new generation");
    assert_eq!(s["engine"]["history"][0].as_u64(), Some(gen_a));

    // The takeover serves the replicated data and takes new writes: N = 6 MiB.
    const N: u64 = 6 * MIB;
    p.qemu_io_ok(
        1,
        &[
            "read -P 0x11 0 4M",
            "write -P 0x22 8M 2M",
            "write -P 0x23 20M 3M",
            "write -P 0x24 40M 1M",
            "flush",
        ],
    );

    // The plan, before the old primary returns: this node is the source, and only the
    // blocks written during the takeover move.
    let plan = json(&p, 1, &["failback", "--plan", "--json"]);
    assert_eq!(plan["direction"], "local_to_peer", "{plan:#}");
    assert_eq!(plan["relation"], "peer_behind", "{plan:#}");
    assert_eq!(plan["method"], "resync", "{plan:#}");
    let planned = plan["bytes"].as_u64().unwrap();
    assert!(
        (N..=N + 4 * MIB).contains(&planned),
        "plan moves {planned} bytes for {N} written"
    );

    // The old primary returns (as secondary) and is resynced from the new one.
    p.ok(0, &["up"]);
    let sa = p.status(0);
    assert_eq!(sa["engine"]["role"], "secondary");
    p.wait_in_sync(1);
    p.wait_for(0, "old primary follows the new generation", |s| {
        generation(s) == gen_b && s["engine"]["disk_state"] == "up_to_date"
    });
    p.qemu_io_with_ok(
        0,
        &["-r"],
        &[
            "read -P 0x22 8M 2M",
            "read -P 0x23 20M 3M",
            "read -P 0x24 40M 1M",
            "read -P 0x11 0 4M",
        ],
    );
    // What moved: the blocks written during the takeover, plus at most the returning
    // node's own activity-log extents (4 MiB each), never the whole volume.
    let moved = resync_bytes(&p, 1);
    assert_eq!(moved.len(), 1, "one resync expected: {moved:?}");
    assert!(
        (N..=N + 4 * MIB).contains(&moved[0]),
        "resync moved {} bytes for {N} written (volume {})",
        moved[0],
        64 * MIB
    );
    eprintln!(
        "failback resync: planned {planned} bytes, moved {} bytes, written {N}",
        moved[0]
    );

    // Failback: a planned switchover back to the original site.
    p.ok(1, &["demote"]);
    p.ok(0, &["promote", "--timeout", "20"]);
    p.qemu_io_ok(0, &["read -P 0x22 8M 2M", "write -P 0x33 16M 1M", "flush"]);
    p.wait_in_sync(0);
    p.down();
    assert_eq!(hash_file(&p.backing(0)), hash_file(&p.backing(1)));
    assert!(qemu_img_same(&p.backing(0), &p.backing(1)));
}

#[test]
fn split_brain_moves_nothing_until_resolved() {
    if !require_qemu() {
        return;
    }
    let p = Pair::new("splitbrain", "async", 16 * MIB);
    p.start(0);
    p.qemu_io_ok(0, &["write -P 0x11 0 1M", "flush"]);
    p.wait_in_sync(0);

    // The sites separate; alpha keeps writing on its own...
    p.ok(1, &["down"]);
    p.qemu_io_ok(0, &["write -P 0x33 1M 1M", "flush"]);
    p.ok(0, &["down"]);
    // ...and beta takes over on its own and writes too.
    p.ok(1, &["up"]);
    p.ok(1, &["promote", "--force"]);
    p.qemu_io_ok(1, &["write -P 0x44 2M 1M", "flush"]);

    // They meet again: both report the split brain, and no data moves.
    p.ok(0, &["up"]);
    for i in 0..2 {
        p.wait_for(i, "split brain reported", |s| {
            s["engine"]["split_brain"] == true
        });
    }
    let before = [hash_file(&p.backing(0)), hash_file(&p.backing(1))];
    std::thread::sleep(Duration::from_secs(3));
    for i in 0..2 {
        let s = p.status(i);
        assert_eq!(s["engine"]["split_brain"], true, "{s:#}");
        assert_ne!(s["engine"]["conn"], "connected", "{s:#}");
    }
    let after = [hash_file(&p.backing(0)), hash_file(&p.backing(1))];
    assert_eq!(before, after, "data moved during a split brain");
    let text = p.ok(0, &["status"]);
    assert!(text.contains("SPLIT BRAIN"), "{text}");
    for i in 0..2 {
        let plan = json(&p, i, &["failback", "--plan", "--json"]);
        assert_eq!(plan["direction"], "split_brain", "{plan:#}");
    }
    // The primary cannot discard its own data; the command is refused with the reason.
    let out = p.blkrep(1, &["resolve", "--discard-local"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("demote"));

    // The operator gives up alpha's changes.
    let msg = p.ok(0, &["resolve", "--discard-local"]);
    assert!(msg.contains("split brain resolved"), "{msg}");
    p.wait_in_sync(1);
    p.wait_for(0, "alpha up to date", |s| {
        s["engine"]["disk_state"] == "up_to_date" && s["engine"]["split_brain"] == false
    });
    // Alpha now equals beta: beta's write is there, alpha's own write is gone.
    p.qemu_io_with_ok(
        0,
        &["-r"],
        &[
            "read -P 0x11 0 1M",
            "read -P 0x00 1M 1M",
            "read -P 0x44 2M 1M",
        ],
    );
    let events = p.log(0);
    assert!(events.contains("resolve"), "resolve not in alpha's log");
    // Only the blocks either side wrote after the split moved (1 MiB each).
    let moved = resync_bytes(&p, 1);
    assert_eq!(moved.last().copied(), Some(2 * MIB), "resyncs: {moved:?}");
    p.down();
    assert_eq!(hash_file(&p.backing(0)), hash_file(&p.backing(1)));
}

/// Add `line` to the config's `[resource]` section.
/// Wait until node `i` has started more than `before` resyncs; the newest one's bytes.
fn wait_new_resync(p: &Pair, i: usize, before: usize) -> u64 {
    let t0 = Instant::now();
    loop {
        let all = resync_bytes(p, i);
        if all.len() > before {
            return *all.last().unwrap();
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "no new resync on {}: {all:?}\n{}",
            p.names[i],
            p.log(i)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Wait until node `i` runs a resync towards its peer that has moved `at_least` bytes.
fn wait_resync_progress(p: &Pair, i: usize, at_least: u64) -> (u64, u64) {
    let s = p.wait_for(i, "resync under way", |s| {
        let r = &s["engine"]["resync"];
        r["done_bytes"].as_u64().unwrap_or(0) >= at_least.max(1)
    });
    let r = &s["engine"]["resync"];
    (
        r["done_bytes"].as_u64().unwrap(),
        r["total_bytes"].as_u64().unwrap(),
    )
}

#[test]
fn interrupted_resync_resumes_where_it_was() {
    if !require_qemu() {
        return;
    }
    let p = Pair::new("resume", "async", 64 * MIB);
    p.start(0);
    p.qemu_io_ok(0, &["write -P 0x11 0 1M", "flush"]);
    p.wait_in_sync(0);
    p.wait_for(0, "activity log cooled", |s| {
        s["engine"]["hot_extents"] == 0
    });
    std::thread::sleep(Duration::from_millis(800));
    p.kill9(0);
    // 4 MiB/s from now on: the 24 MiB resync below takes six seconds, time to interrupt it
    // twice (the survivor restarts to read the setting).
    p.resource_line("resync_rate = \"4M\"");
    p.ok(1, &["down"]);
    p.ok(1, &["up"]);
    p.ok(1, &["promote", "--force"]);
    p.qemu_io_ok(
        1,
        &[
            "write -P 0x31 0 8M",
            "write -P 0x32 16M 8M",
            "write -P 0x33 40M 8M",
            "flush",
        ],
    );
    p.ok(0, &["up"]);
    // The target checkpoints (makes durable and acknowledges) every 8 MiB or second:
    // after 10 MiB some of the resync is durable there.
    let (done1, total1) = wait_resync_progress(&p, 1, 10 * MIB);
    assert!(
        (24 * MIB..64 * MIB).contains(&total1),
        "first resync {total1} bytes"
    );
    assert!(done1 < total1);
    // The rate limit holds (an upper bound: the budget never lets more through).
    let rate = p.status(1)["engine"]["resync"]["rate_bytes_per_sec"]
        .as_f64()
        .unwrap();
    assert!(
        rate <= 1.5 * 4.0 * MIB as f64,
        "resync ran at {rate} B/s, limit 4 MiB/s"
    );

    // The target dies mid-resync, and comes back.
    std::thread::sleep(Duration::from_millis(300));
    let started = resync_bytes(&p, 1).len();
    p.kill9(0);
    p.wait_for(1, "link down", |s| {
        s["engine"]["conn"] != "connected" && s["engine"]["conn"] != "sync_source"
    });
    p.ok(0, &["up"]);
    let total2 = wait_new_resync(&p, 1, started);
    assert!(
        total2 < total1,
        "the resync started over after the target's crash: {total2} of {total1} bytes"
    );

    // The source dies mid-resync, comes back, is promoted again and goes on. Its record
    // of what is left follows the target's durable acknowledgements (and reaches its
    // metadata within a fraction of a second).
    let t0 = Instant::now();
    let (_, _) = wait_resync_progress(&p, 1, 6 * MIB);
    std::thread::sleep(Duration::from_millis(1200).saturating_sub(t0.elapsed()));
    p.kill9(1);
    p.wait_for(0, "link down", |s| {
        s["engine"]["conn"] != "connected" && s["engine"]["conn"] != "sync_target"
    });
    // The log is appended to across restarts: count the resyncs so far.
    let log_before = resync_bytes(&p, 1).len();
    p.ok(1, &["up"]);
    p.ok(1, &["promote", "--timeout", "20"]);
    let total3 = wait_new_resync(&p, 1, log_before);
    assert!(
        total3 < total2,
        "the resync started over after the source's crash: {total3} of {total2} bytes"
    );
    p.wait_in_sync(1);
    p.qemu_io_with_ok(
        0,
        &["-r"],
        &[
            "read -P 0x31 0 8M",
            "read -P 0x32 16M 8M",
            "read -P 0x33 40M 8M",
        ],
    );
    eprintln!("resync totals: {total1} -> {total2} -> {total3} bytes");
    p.down();
    assert_eq!(hash_file(&p.backing(0)), hash_file(&p.backing(1)));
}

/// A planned switchover A -> B -> A while a client writes without pause: every write the
/// client saw acknowledged is in the final image, on both nodes.
#[test]
fn planned_switchover_under_load_loses_no_acknowledged_write() {
    use blkrep_tools::nbd_client::NbdClient;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    const BLOCKS: u64 = 256;
    const BS: usize = 4096;
    for mode in ["async", "sync"] {
        let p = Pair::new(&format!("switchload-{mode}"), mode, 16 * MIB);
        p.start(0);
        let stop = Arc::new(AtomicBool::new(false));
        let sockets = [p.nbd_socket(0), p.nbd_socket(1)];
        let writer = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut clients: Vec<NbdClient> = sockets
                    .iter()
                    .map(|s| NbdClient::connect_unix(s, "r0").expect("connect"))
                    .collect();
                let mut at = 0usize;
                // Newest acknowledged counter per block.
                let mut acked = vec![0u64; BLOCKS as usize];
                let (mut c, mut switches) = (1u64, 0u32);
                while !stop.load(Ordering::Relaxed) {
                    let block = c % BLOCKS;
                    let data: Vec<u8> = (0..BS / 8).flat_map(|_| c.to_le_bytes()).collect();
                    match clients[at]
                        .write(block * BS as u64, &data, false)
                        .expect("io")
                    {
                        Ok(()) => {
                            acked[block as usize] = c;
                            c += 1;
                        }
                        Err(_) => {
                            // Refused (EPERM): the other node is (about to be) primary.
                            at = 1 - at;
                            switches += 1;
                            std::thread::sleep(Duration::from_millis(5));
                        }
                    }
                }
                (acked, c, switches)
            })
        };
        std::thread::sleep(Duration::from_millis(700));
        for (from, to) in [(0, 1), (1, 0)] {
            // Demote waits for the writes in flight; retry while it says busy.
            let t0 = Instant::now();
            loop {
                let out = p.blkrep(from, &["demote"]);
                if out.status.success() {
                    break;
                }
                let err = String::from_utf8_lossy(&out.stderr).to_string();
                assert!(err.contains("busy"), "demote failed: {err}");
                assert!(t0.elapsed() < Duration::from_secs(20), "demote stays busy");
                std::thread::sleep(Duration::from_millis(10));
            }
            p.ok(to, &["promote", "--timeout", "20"]);
            std::thread::sleep(Duration::from_millis(700));
        }
        stop.store(true, Ordering::Relaxed);
        let (acked, written, switches) = writer.join().unwrap();
        assert!(switches >= 2, "the writer never moved: {switches}");
        p.wait_in_sync(0);
        p.down();
        for i in 0..2 {
            let img = std::fs::read(p.backing(i)).unwrap();
            for b in 0..BLOCKS as usize {
                let got = u64::from_le_bytes(img[b * BS..b * BS + 8].try_into().unwrap());
                assert!(
                    got >= acked[b],
                    "{mode}: block {b} on {} holds write {got}, but write {} was acknowledged",
                    p.names[i],
                    acked[b]
                );
            }
        }
        assert_eq!(hash_file(&p.backing(0)), hash_file(&p.backing(1)));
        eprintln!("{mode}: {written} writes, {switches} refusals followed, nothing lost");
    }
}

/// A block corrupted behind blkrep's back on the secondary: `verify` finds it (exit 4,
/// the range listed) while a client keeps writing elsewhere, `verify --repair` fixes it.
#[test]
fn verify_finds_and_repairs_a_corrupted_block() {
    if !require_qemu() {
        return;
    }
    use std::os::unix::fs::FileExt;
    let p = Pair::new("verify", "sync", 32 * MIB);
    p.start(0);
    p.qemu_io_ok(0, &["write -P 0x5c 0 16M", "flush"]);
    p.wait_in_sync(0);
    // A clean pair verifies clean.
    let out = p.blkrep(0, &["verify"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("match the peer"));

    // Corrupt 4 KiB at 5 MiB + 8 KiB on beta's backing, behind the daemon's back.
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(p.backing(1))
        .unwrap();
    f.write_all_at(&[0xee; 4096], 5 * MIB + 8192).unwrap();
    f.sync_all().unwrap();
    drop(f);

    let out = p.blkrep(0, &["verify", "--json"]);
    assert_eq!(
        out.status.code(),
        Some(4),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["out_of_sync_bytes"], 4096, "{r:#}");
    let range = &r["out_of_sync"][0];
    assert_eq!(range[0].as_u64(), Some(5 * MIB + 8192), "{r:#}");
    assert_eq!(range[1].as_u64(), Some(5 * MIB + 12288), "{r:#}");
    assert_ne!(hash_file(&p.backing(0)), hash_file(&p.backing(1)));

    // Repair; afterwards a verify under a concurrent client workload finds nothing (the
    // comparison is ordered in the stream, so writes in flight never look like damage).
    let out = p.blkrep(0, &["verify", "--repair"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let uri = p.nbd_uri(0);
    let writer = std::thread::spawn(move || {
        let mut cmd = Command::new("qemu-io");
        cmd.args(["-f", "raw", &uri]);
        for i in 0..64 {
            cmd.arg("-c").arg(format!(
                "write -P {} {}k 256k",
                0x40 + i % 16,
                (i % 32) * 256
            ));
        }
        cmd.output().unwrap()
    });
    let out = p.blkrep(0, &["verify"]);
    let w = writer.join().unwrap();
    assert!(w.status.success(), "{}", String::from_utf8_lossy(&w.stderr));
    assert!(
        out.status.success(),
        "verify under load reported differences: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    p.wait_in_sync(0);
    p.down();
    assert_eq!(hash_file(&p.backing(0)), hash_file(&p.backing(1)));
}

/// Checksum-based full sync of two 1 GiB volumes that already hold the same data but for
/// 1% of their 4 KiB blocks: the data moved and the hashes together stay under 2% of the
/// volume, and the images end equal.
#[test]
fn checksum_full_sync_moves_only_what_differs() {
    use std::io::Write;
    const SIZE: u64 = 1 << 30;
    let p = Pair::new("checksum", "async", SIZE);
    p.resource_line("full_sync = \"checksum\"");
    // Same pseudo-random content on both backings.
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut chunk = vec![0u8; MIB as usize];
    let mut files: Vec<_> = (0..2)
        .map(|i| std::io::BufWriter::new(std::fs::File::create(p.backing(i)).unwrap()))
        .collect();
    for _ in 0..SIZE / MIB {
        for w in chunk.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            w.copy_from_slice(&x.to_le_bytes());
        }
        for f in files.iter_mut() {
            f.write_all(&chunk).unwrap();
        }
    }
    drop(files);
    // Beta differs in every 100th block.
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(p.backing(1))
            .unwrap();
        for b in (0..SIZE / 4096).step_by(100) {
            f.write_all_at(&[0xd7; 4096], b * 4096).unwrap();
        }
        f.sync_all().unwrap();
    }
    let differing = SIZE / 4096 / 100 + 1;
    p.start(0);
    let line = p
        .log(0)
        .lines()
        .find(|l| l.contains("resync complete"))
        .map(str::to_string)
        .expect("resync complete in alpha's log");
    let moved: u64 = line
        .split("planned, ")
        .nth(1)
        .and_then(|r| r.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no byte count in {line:?}"));
    let hashes = SIZE / 4096 * 32;
    eprintln!(
        "checksum sync: {moved} bytes of data moved ({} blocks differ), {hashes} bytes of \
         hashes, volume {SIZE}: {:.2}%",
        differing,
        (moved + hashes) as f64 * 100.0 / SIZE as f64
    );
    assert!(
        moved >= differing * 4096,
        "moved {moved}, {differing} blocks differ"
    );
    assert!(
        (moved + hashes) * 50 <= SIZE,
        "data and hashes {} bytes exceed 2% of {SIZE}",
        moved + hashes
    );
    p.down();
    assert_eq!(hash_file(&p.backing(0)), hash_file(&p.backing(1)));
}
