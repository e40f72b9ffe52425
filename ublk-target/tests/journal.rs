//! The primary's persistent journal on two real daemons: writes made while the link is cut
//! sit in the journal; kill -9 of the primary; its restart redoes the journal on its disk
//! and, once promoted, ships it again (no resync). A torn or truncated journal tail is
//! detected and falls back to a resync, and no acknowledged write is lost either way.
//! A takeover during the bitmap catch-up after a journal overflow rolls the secondary back
//! to its image from before the catch-up (its undo log on its own journal device).

mod common;
use blkrep_tools::nbd_client::NbdClient;
use common::*;
use std::collections::HashMap;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;

const MIB: u64 = 1 << 20;
const SIZE: u64 = 64 * MIB;
const BLOCK: u64 = 64 << 10;

fn content(block: u64, id: u64) -> Vec<u8> {
    let mut v = vec![0u8; BLOCK as usize];
    for (i, c) in v.chunks_mut(16).enumerate() {
        c[..8].copy_from_slice(&block.to_le_bytes());
        c[8..].copy_from_slice(&(id ^ i as u64).to_le_bytes());
    }
    v
}

/// `n` tagged 64 KiB writes through alpha's NBD export (a flush every 16, none at the
/// end); the last acknowledged id of every block.
fn write_tagged(p: &Pair, n: u64, first_id: u64, acked: &mut HashMap<u64, u64>) {
    let mut c = NbdClient::connect_unix(&p.nbd_socket(0), "r0").expect("connect");
    let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ first_id;
    for id in first_id..first_id + n {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let block = x % (SIZE / BLOCK);
        c.write(block * BLOCK, &content(block, id), false)
            .expect("transport")
            .expect("write acknowledged with an error");
        acked.insert(block, id);
        if id % 16 == 0 {
            c.flush().expect("flush");
        }
    }
    // No disconnect: the daemon is killed with the connection open.
    std::mem::forget(c);
}

fn journal_path(p: &Pair) -> PathBuf {
    p.backing(0).with_file_name("alpha.journal")
}

fn pair(tag: &str) -> Pair {
    pair_with(
        tag,
        [
            "journal = \"@DIR@/alpha.journal\"\njournal_size = \"32M\"",
            "",
        ],
    )
}

fn pair_with(tag: &str, extra: [&str; 2]) -> Pair {
    let p = Pair::with_node_extra(tag, "async", SIZE, extra);
    // The node section needs the pair's directory: fill it in.
    let cfg = std::fs::read_to_string(&p.config).unwrap();
    let dir = p.backing(0).parent().unwrap().display().to_string();
    std::fs::write(&p.config, cfg.replace("@DIR@", &dir)).unwrap();
    p
}

/// Offsets of the journal's records, newest (highest sequence) last.
fn records(path: &PathBuf) -> Vec<(u64, u64)> {
    let f = std::fs::File::open(path).unwrap();
    let len = f.metadata().unwrap().len();
    let mut out = vec![];
    let mut at = 8192;
    let mut h = [0u8; 32];
    while at + 32 <= len {
        f.read_exact_at(&mut h, at).unwrap();
        if &h[0..8] == b"BLKRJREC" {
            out.push((u64::from_le_bytes(h[24..32].try_into().unwrap()), at));
        }
        at += 512;
    }
    out.sort();
    out
}

/// Every acknowledged write is on both sides, and the sides are equal.
fn check(p: &Pair, acked: &HashMap<u64, u64>) {
    let a = std::fs::read(p.backing(0)).unwrap();
    let b = std::fs::read(p.backing(1)).unwrap();
    for (block, id) in acked {
        let at = (block * BLOCK) as usize;
        let want = content(*block, *id);
        assert!(
            a[at..at + BLOCK as usize] == want[..],
            "alpha lost write {id} to block {block}"
        );
        assert!(
            b[at..at + BLOCK as usize] == want[..],
            "beta lacks write {id} to block {block}"
        );
    }
    assert!(a == b, "the secondary differs from the primary");
}

/// Start the pair, cut the link, write into the journal, kill -9 alpha.
fn crash_with_a_full_journal(p: &Pair) -> (HashMap<u64, u64>, proxy::Proxy) {
    let px = p.insert_proxy();
    p.start(0);
    let mut acked = HashMap::new();
    write_tagged(p, 64, 1, &mut acked);
    p.wait_in_sync(0);
    px.cut();
    p.wait_for(0, "the link to drop", |s| {
        s["engine"]["conn"] != "connected" && s["engine"]["conn"] != "sync_source"
    });
    write_tagged(p, 160, 1000, &mut acked);
    let s = p.status(0);
    let j = &s["engine"]["journal"];
    eprintln!("journal before the crash: {j}");
    assert_eq!(j["state"], "active", "{s:#}");
    assert!(j["records"].as_u64().unwrap() >= 160, "{j}");
    assert!(j["used"].as_u64().unwrap() >= 160 * BLOCK, "{j}");
    p.kill9(0);
    (acked, px)
}

#[test]
fn kill9_with_a_full_journal_replays_it_without_a_resync() {
    let p = pair("journal-replay");
    let (acked, px) = crash_with_a_full_journal(&p);
    px.heal();
    p.ok(0, &["up"]);
    p.wait_log(0, &["redone on the backing"]);
    let before = p.log(0).matches("resync to the peer started").count();
    p.ok(0, &["promote", "--timeout", "20"]);
    p.wait_in_sync(0);
    let log = p.log(0);
    assert!(log.contains("journal replay: "), "{log}");
    assert_eq!(
        log.matches("resync to the peer started").count(),
        before,
        "the replay caused a resync:\n{log}"
    );
    // Records are released once the peer holds them durably (its next checkpoint).
    p.wait_for(0, "the journal to drain", |s| {
        s["engine"]["journal"]["used"] == 0
    });
    p.down();
    check(&p, &acked);
}

#[test]
fn a_torn_or_truncated_journal_tail_falls_back_to_a_resync_and_loses_nothing() {
    for damage in ["corrupt", "truncate"] {
        let p = pair(&format!("journal-{damage}"));
        let (acked, px) = crash_with_a_full_journal(&p);
        let path = journal_path(&p);
        let recs = records(&path);
        let &(seq, at) = recs.last().expect("records");
        let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        match damage {
            "corrupt" => f.write_all_at(&[0xa5; 16], at + 1000).unwrap(),
            _ => f.set_len(at + 3000).unwrap(),
        }
        eprintln!("{damage}: the record of sequence {seq} at {at}");
        px.heal();
        p.ok(0, &["up"]);
        p.wait_log(0, &["torn tail", "not replayed"]);
        p.ok(0, &["promote", "--timeout", "20"]);
        p.wait_in_sync(0);
        let log = p.log(0);
        assert!(log.contains("resync to the peer started"), "{log}");
        assert!(!log.contains("journal replay: "), "{log}");
        p.down();
        check(&p, &acked);
    }
}

#[test]
fn journal_config_errors_name_the_field() {
    let p = Pair::with_node_extra("journal-bad", "async", SIZE, ["journal_size = \"32M\"", ""]);
    let out = p.blkrep(0, &["create-md"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("node[0].journal_size"), "{err}");
    let p = Pair::with_node_extra(
        "journal-small",
        "async",
        SIZE,
        ["journal = \"/tmp/x.journal\"\njournal_size = \"1M\"", ""],
    );
    let out = p.blkrep(0, &["create-md"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("node[0].journal_size") && err.contains("at least"),
        "{err}"
    );
}

#[test]
fn a_takeover_during_the_catch_up_finds_the_image_from_before_it() {
    // alpha's journal (8 MiB) overflows during the outage; beta's (64 MiB) holds the undo
    // log of the catch-up; the resync runs at 4 MiB/s so the takeover hits it mid-way.
    let p = pair_with(
        "journal-catchup",
        [
            "journal = \"@DIR@/alpha.journal\"\njournal_size = \"8M\"",
            "journal = \"@DIR@/beta.journal\"\njournal_size = \"64M\"",
        ],
    );
    p.resource_line("resync_rate = \"4M\"");
    let px = p.insert_proxy();
    p.start(0);
    let mut acked = HashMap::new();
    write_tagged(&p, 64, 1, &mut acked);
    p.wait_in_sync(0);
    // What beta holds at the cut: the write log up to here.
    let at_cut = acked.clone();
    px.cut();
    p.wait_for(0, "the link to drop", |s| {
        s["engine"]["conn"] != "connected" && s["engine"]["conn"] != "sync_source"
    });
    write_tagged(&p, 240, 1000, &mut acked);
    let s = p.status(0);
    assert_eq!(s["engine"]["journal"]["state"], "bitmap", "{s:#}");
    px.heal();
    let s = p.wait_for(1, "the protected catch-up to save blocks", |s| {
        s["engine"]["undo"]["state"] == "active"
            && s["engine"]["undo"]["saved_bytes"].as_u64().unwrap_or(0) >= 2 * MIB
    });
    eprintln!("beta during the catch-up: {}", s["engine"]["undo"]);
    assert_eq!(s["engine"]["disk_state"], "inconsistent", "{s:#}");
    // The primary site is lost in the middle of the catch-up.
    p.kill9(0);
    p.wait_for(1, "the link to drop", |s| {
        s["engine"]["conn"] != "sync_target"
    });
    let msg = p.ok(1, &["promote", "--force"]);
    assert!(msg.contains("after rolling back the catch-up"), "{msg}");
    p.wait_log(1, &["rolled back", "saved ranges"]);
    let s = p.status(1);
    assert_eq!(s["engine"]["role"], "primary", "{s:#}");
    assert_eq!(s["engine"]["disk_state"], "up_to_date", "{s:#}");
    p.down();
    // beta's image is exactly the volume at the cut: every block of the write log up to
    // there, and nothing written during the outage (its catch-up was undone).
    let b = std::fs::read(p.backing(1)).unwrap();
    for block in 0..SIZE / BLOCK {
        let at = (block * BLOCK) as usize;
        let got = &b[at..at + BLOCK as usize];
        match at_cut.get(&block) {
            Some(id) => assert!(
                got == &content(block, *id)[..],
                "block {block}: not write {id} of the log up to the cut"
            ),
            None => assert!(
                got.iter().all(|&x| x == 0),
                "block {block}: written during the outage, yet in the rolled-back image"
            ),
        }
    }
}
