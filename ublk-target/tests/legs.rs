//! Local legs (issue 7): a primary with two legs (`backing` and `mirror`) under an
//! error-injecting layer (the daemon's test-only fault requests: fail or hang reads, writes
//! or flushes of a leg on a range). A failing or hung leg is taken out with no error to the
//! client; only what was written while it was out is rebuilt; legs and replica end equal;
//! with both legs gone the volume fails cleanly and nothing more is written anywhere; a
//! rebuild interrupted by a crash resumes. Clients: qemu-io over NBD.

mod common;
use common::*;
use serde_json::Value;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;
const SIZE: u64 = 64 * MIB;
/// The legs' granularity (what a leg lacks is rounded out to it).
const LEG_BLOCK: u64 = 64 << 10;

struct Legs {
    p: Pair,
}

impl Legs {
    /// A sync pair whose primary (alpha) has a mirror; `extra`: more lines for alpha.
    fn new(tag: &str, extra: &str) -> Legs {
        // The mirror's path must be in the config before the pair writes it: use a name
        // inside the pair's directory, created after.
        let p = Pair::with_node_extra(
            tag,
            "sync",
            SIZE,
            [
                &format!("mirror = \"MIRROR\"\nleg_timeout = 1.0\n{extra}"),
                "",
            ],
        );
        let mirror = p.dir.path().join("alpha-mirror.img");
        std::fs::File::create(&mirror)
            .unwrap()
            .set_len(SIZE)
            .unwrap();
        let text = std::fs::read_to_string(&p.config).unwrap();
        std::fs::write(
            &p.config,
            text.replace("MIRROR", &mirror.display().to_string()),
        )
        .unwrap();
        Legs { p }
    }

    fn mirror(&self) -> PathBuf {
        self.p.dir.path().join("alpha-mirror.img")
    }

    /// `blkrep up` of node `i` with fault injection allowed.
    fn up(&self, i: usize) {
        let out = Command::new(bin_dir().join("blkrep"))
            .arg("--config")
            .arg(&self.p.config)
            .arg("--node")
            .arg(self.p.names[i])
            .arg("up")
            .env("BLKREPD", bin_dir().join("blkrepd"))
            .env("BLKREP_FAULT_INJECTION", "1")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "up: {}{}",
            String::from_utf8_lossy(&out.stderr),
            self.p.log(i)
        );
    }

    fn start(&self) {
        for i in 0..2 {
            self.p.ok(i, &["create-md"]);
            self.up(i);
        }
        self.p.ok(0, &["promote", "--timeout", "20"]);
        self.p.wait_in_sync(0);
        // The new mirror is first rebuilt in full from the backing.
        self.wait_leg(1, "healthy");
    }

    fn leg(&self, i: usize) -> Value {
        self.p.status(0)["legs"][i].clone()
    }

    fn wait_leg(&self, i: usize, state: &str) -> Value {
        self.p.wait_for(0, &format!("leg {i} {state}"), |s| {
            s["legs"][i]["state"] == state
        })["legs"][i]
            .clone()
    }

    fn fault(&self, leg: &str, mode: &str, ops: &str, offset: u64, len: u64) {
        let (o, l) = (offset.to_string(), len.to_string());
        let mut args = vec!["leg", "fault", "--leg", leg, "--mode", mode];
        if !ops.is_empty() {
            args.extend(["--ops", ops]);
        }
        args.extend(["--offset", &o, "--len", &l]);
        self.p.ok(0, &args);
    }

    /// Legs, replica: byte-equal.
    fn assert_all_equal(&self) {
        self.p.wait_in_sync(0);
        let l0 = hash_file(&self.p.backing(0));
        assert_eq!(l0, hash_file(&self.mirror()), "the legs differ");
        assert_eq!(l0, hash_file(&self.p.backing(1)), "leg and replica differ");
    }

    fn events(&self) -> String {
        self.p.ok(0, &["events", "--kind", "leg"])
    }
}

impl Drop for Legs {
    fn drop(&mut self) {
        self.p.down();
    }
}

fn qio(l: &Legs, cmds: &[&str]) {
    l.p.qemu_io_ok(0, cmds);
}

#[test]
fn a_failing_leg_is_taken_out_without_a_client_error_and_rebuilt_with_only_what_it_missed() {
    if !require_qemu() {
        return;
    }
    let l = Legs::new("legs-fail", "");
    l.start();
    qio(&l, &["write -P 0x11 0 8M"]);
    // Leg 1 fails writes on [4M, 5M): the next write there loses the leg, not the client.
    l.fault("1", "error", "write", 4 * MIB, MIB);
    qio(&l, &["write -P 0x22 4M 64k"]);
    let s = l.p.status(0);
    assert_eq!(s["local"], "degraded", "{s:#}");
    assert_eq!(s["legs"][1]["state"], "failed");
    assert!(
        s["legs"][1]["reason"]
            .as_str()
            .unwrap()
            .contains("a write of 65536 bytes at 4194304 failed"),
        "{s:#}"
    );
    assert_eq!(s["engine"]["disk_state"], "up_to_date");
    // Written while degraded: 64 KiB above, 2 MiB + 4 KiB (unaligned to the leg block)
    // here; an overwrite of the same blocks adds nothing.
    qio(&l, &["write -P 0x33 20M 2M", "write -P 0x44 30M 4k"]);
    qio(&l, &["write -P 0x55 20M 1M"]);
    let written_while_out = 64 * 1024 + 2 * MIB + 4096;
    let lacks = l.leg(1)["lacks_bytes"].as_u64().unwrap();
    assert!(
        lacks >= written_while_out && lacks <= written_while_out + 3 * LEG_BLOCK,
        "leg 1 lacks {lacks}, {written_while_out} were written while it was out"
    );
    // The alert and the event.
    let s = l.p.wait_for(0, "degraded_leg alert", |s| {
        s["alerts"]
            .as_array()
            .is_some_and(|a| a.iter().any(|x| x["name"] == "degraded_leg"))
    });
    assert!(l.p.ok(0, &["status"]).contains("DEGRADED"), "{s:#}");
    assert!(l.events().contains("leg 1"), "{}", l.events());
    // Reads are correct from the healthy leg.
    qio(
        &l,
        &[
            "read -P 0x11 0 4M",
            "read -P 0x22 4M 64k",
            "read -P 0x55 20M 1M",
            "read -P 0x33 21M 1M",
            "read -P 0x44 30M 4k",
        ],
    );
    // The leg comes back: only what it missed is copied.
    l.fault("1", "clear", "", 0, 0);
    let out = l.p.ok(0, &["leg", "attach", "--leg", "1"]);
    assert!(out.contains("healthy"), "{out}");
    let leg = l.leg(1);
    assert_eq!(leg["state"], "healthy");
    let copied = leg["last_rebuild"]["copied_bytes"].as_u64().unwrap();
    assert!(
        copied >= written_while_out && copied <= written_while_out + 3 * LEG_BLOCK,
        "the rebuild copied {copied} bytes; {written_while_out} were written while the leg was out"
    );
    assert!(l.events().contains("rebuilt"), "{}", l.events());
    l.assert_all_equal();
    // The alert clears.
    l.p.wait_for(0, "alert cleared", |s| {
        s["alerts"]
            .as_array()
            .is_some_and(|a| !a.iter().any(|x| x["name"] == "degraded_leg"))
    });

    // Reads: leg 0 fails every read; they are served by leg 1, correctly.
    l.fault("0", "error", "read", 0, 0);
    qio(
        &l,
        &[
            "read -P 0x11 0 4M",
            "read -P 0x22 4M 64k",
            "read -P 0x55 20M 1M",
        ],
    );
    assert_eq!(l.leg(0)["state"], "failed");
    // A leg that failed a read and missed no write rebuilds nothing.
    l.fault("0", "clear", "", 0, 0);
    l.p.ok(0, &["leg", "attach", "--leg", "0"]);
    assert_eq!(l.leg(0)["last_rebuild"]["copied_bytes"], 0);

    // A flush error takes a leg out too; the client's flush succeeds.
    l.fault("1", "error", "flush", 0, 0);
    qio(&l, &["write -P 0x66 40M 64k", "flush"]);
    assert_eq!(l.leg(1)["state"], "failed");
    assert!(l.leg(1)["reason"].as_str().unwrap().contains("flush"));
    l.fault("1", "clear", "", 0, 0);
    l.p.ok(0, &["leg", "attach", "--leg", "1"]);
    l.assert_all_equal();
}

#[test]
fn a_hung_leg_times_out_and_is_attached_only_once_its_requests_are_back() {
    if !require_qemu() {
        return;
    }
    let l = Legs::new("legs-hang", "");
    l.start();
    l.fault("1", "hang", "write", 0, 0);
    let t0 = Instant::now();
    qio(&l, &["write -P 0x77 1M 128k"]);
    let took = t0.elapsed();
    let leg = l.leg(1);
    assert_eq!(leg["state"], "failed", "{leg:#}");
    assert!(
        leg["reason"].as_str().unwrap().contains("no answer"),
        "{leg:#}"
    );
    assert!(
        took >= Duration::from_millis(900),
        "completed before the timeout: {took:?}"
    );
    assert_eq!(leg["inflight"], 1, "the hung write is still in the kernel");
    // Not re-attached while its write may still land.
    let out = l.p.blkrep(0, &["leg", "attach", "--leg", "1"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("in the kernel"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The device answers late (the held write lands on the failed leg); then the leg is
    // rebuilt and everything matches.
    l.fault("1", "clear", "", 0, 0);
    l.p.wait_for(0, "hung write back", |s| s["legs"][1]["inflight"] == 0);
    qio(&l, &["write -P 0x78 1M 64k"]);
    l.p.ok(0, &["leg", "attach", "--leg", "1"]);
    qio(&l, &["read -P 0x78 1M 64k", "read -P 0x77 1088k 64k"]);
    l.assert_all_equal();
}

#[test]
fn with_both_legs_failed_the_volume_fails_cleanly_and_nothing_is_written() {
    if !require_qemu() {
        return;
    }
    let l = Legs::new("legs-both", "");
    l.start();
    qio(&l, &["write -P 0x12 0 1M"]);
    l.assert_all_equal();
    l.fault("0", "error", "read,write,flush", 0, 0);
    l.fault("1", "error", "read,write,flush", 0, 0);
    let before = [
        hash_file(&l.p.backing(0)),
        hash_file(&l.mirror()),
        hash_file(&l.p.backing(1)),
    ];
    // The read that finds both legs failing gets an error, not stale or zero data.
    let out = l.p.qemu_io(0, &["read -P 0x12 0 64k"]);
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() || text.contains("error") || text.contains("failed"),
        "a read with no healthy leg succeeded: {text}"
    );
    let s = l.p.wait_for(0, "volume failed", |s| {
        s["engine"]["disk_state"] == "failed"
    });
    assert_eq!(s["local"], "failed");
    // Writes now: clean errors; nothing reaches a leg or the peer.
    let out = l.p.qemu_io(0, &["write -P 0x99 2M 64k"]);
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(text.contains("error") || text.contains("failed"), "{text}");
    std::thread::sleep(Duration::from_millis(500));
    let after = [
        hash_file(&l.p.backing(0)),
        hash_file(&l.mirror()),
        hash_file(&l.p.backing(1)),
    ];
    assert_eq!(before, after, "a write reached a leg or the replica");
    assert!(l.p.status(1)["engine"]["applied_seq"] == l.p.status(0)["engine"]["acked_seq"]);
    l.p.wait_for(0, "disk_failed alert", |s| {
        s["alerts"]
            .as_array()
            .is_some_and(|a| a.iter().any(|x| x["name"] == "disk_failed"))
    });
    // No source to rebuild from.
    let out = l.p.blkrep(0, &["leg", "attach", "--leg", "1"]);
    assert_eq!(out.status.code(), Some(1));
}

#[test]
fn a_rebuild_interrupted_by_a_crash_resumes_where_it_was() {
    if !require_qemu() {
        return;
    }
    // 8 MiB/s: the 64 MiB full rebuild of a new device takes about 8 s.
    let l = Legs::new("legs-crash", "rebuild_rate = \"8M\"\n");
    for i in 0..2 {
        l.p.ok(i, &["create-md"]);
        l.up(i);
    }
    l.p.ok(0, &["promote", "--timeout", "20"]);
    qio(&l, &["write -P 0x5a 0 64M"]);
    // The client's writes are done (they re-added what was already copied): from here what
    // leg 1 lacks only shrinks. Wait for a quarter of it to be copied.
    let leg = l.p.wait_for(0, "rebuild under way", |s| {
        s["legs"][1]["lacks_bytes"].as_u64().unwrap_or(SIZE) <= SIZE - 16 * MIB
    })["legs"][1]
        .clone();
    assert_eq!(leg["state"], "rebuilding");
    assert_eq!(leg["rebuild"]["full"], true);
    let before = l.leg(1)["lacks_bytes"].as_u64().unwrap();
    std::thread::sleep(Duration::from_millis(300)); // progress is recorded every tick
    l.p.kill9(0);
    l.up(0);
    let leg = l.leg(1);
    assert_eq!(leg["state"], "rebuilding", "{leg:#}");
    let lacks = leg["lacks_bytes"].as_u64().unwrap();
    assert!(
        lacks <= before && before <= SIZE - 16 * MIB,
        "after the restart leg 1 lacks {lacks} bytes, {before} before the crash: the \
         rebuild started over"
    );
    l.p.ok(0, &["promote", "--timeout", "20"]);
    l.wait_leg(1, "healthy");
    qio(&l, &["read -P 0x5a 0 64M"]);
    l.assert_all_equal();
}

#[test]
fn a_leg_being_rebuilt_is_never_read() {
    if !require_qemu() {
        return;
    }
    // 1 MiB/s: the new mirror stays `rebuilding` for the whole test.
    let l = Legs::new("legs-stale", "rebuild_rate = \"1M\"\n");
    for i in 0..2 {
        l.p.ok(i, &["create-md"]);
        l.up(i);
    }
    l.p.ok(0, &["promote", "--timeout", "20"]);
    qio(&l, &["write -P 0x42 32M 1M"]);
    assert_eq!(l.leg(1)["state"], "rebuilding");
    // Leg 0 fails reads: the mirror (zeroes there) must not answer in its place.
    l.fault("0", "error", "read", 0, 0);
    let out = l.p.qemu_io(0, &["read -P 0x42 32M 64k"]);
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        text.contains("error") || text.contains("failed"),
        "a read was served while the only healthy leg failed: {text}"
    );
    let s = l.p.status(0);
    assert_eq!(s["local"], "failed", "{s:#}");
    assert_eq!(s["legs"][1]["state"], "rebuilding", "{s:#}");
    assert!(
        s["legs"][1]["rebuild"].is_null(),
        "no source to rebuild from: {s:#}"
    );
}

#[test]
fn leg_commands_refuse_what_would_lose_data_and_bad_requests() {
    let l = Legs::new("legs-refuse", "");
    l.start();
    // Detach leg 1, then the last healthy leg cannot go.
    l.p.ok(0, &["leg", "detach", "--leg", "mirror"]);
    let out = l.p.blkrep(0, &["leg", "detach", "--leg", "0"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("only healthy leg"));
    // A healthy leg is not attached; there is no leg 2; replace needs a path of its own.
    let out = l.p.blkrep(0, &["leg", "attach", "--leg", "0"]);
    assert_eq!(out.status.code(), Some(1));
    let out = l.p.blkrep(0, &["leg", "attach", "--leg", "2"]);
    assert_eq!(out.status.code(), Some(2));
    let b0 = l.p.backing(0).display().to_string();
    let out =
        l.p.blkrep(0, &["leg", "replace", "--leg", "1", "--path", &b0]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("other leg"));
    // A replacement too small for the volume.
    let small = l.p.dir.path().join("small.img");
    std::fs::File::create(&small).unwrap().set_len(MIB).unwrap();
    let out = l.p.blkrep(
        0,
        &[
            "leg",
            "replace",
            "--leg",
            "1",
            "--path",
            &small.display().to_string(),
        ],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("needs"));
    // A replacement that fits: rebuilt in full, then equal.
    let new = l.p.dir.path().join("new-mirror.img");
    std::fs::File::create(&new).unwrap().set_len(SIZE).unwrap();
    qio(&l, &["write -P 0x31 0 2M"]);
    let out = l.p.ok(
        0,
        &[
            "leg",
            "replace",
            "--leg",
            "1",
            "--path",
            &new.display().to_string(),
            "--json",
        ],
    );
    let v: Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["state"], "healthy");
    assert_eq!(v["last_rebuild"]["copied_bytes"], SIZE);
    assert_eq!(hash_file(&l.p.backing(0)), hash_file(&new));
    // The record names the new device across a restart.
    l.p.ok(0, &["down"]);
    let state = std::fs::read(l.p.dir.path().join("alpha.md.legs")).unwrap();
    assert!(
        String::from_utf8_lossy(&state).contains("new-mirror.img"),
        "the state file does not name the new device"
    );
    // Fault injection is refused by a daemon not started for it.
    l.p.ok(0, &["up"]);
    let out =
        l.p.blkrep(0, &["leg", "fault", "--leg", "1", "--mode", "error"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("fault injection is off"));
    // A new volume (create-md --force) forgets which leg held what: the mirror is copied
    // in full at the next start.
    l.p.ok(0, &["down"]);
    let out = l.p.ok(0, &["create-md", "--force"]);
    assert!(
        out.contains("old leg state") && out.contains("in full"),
        "{out}"
    );
    assert!(!l.p.dir.path().join("alpha.md.legs").exists());
}

#[test]
fn with_both_legs_failed_a_diskless_primary_serves_through_its_peer() {
    if !require_qemu() {
        return;
    }
    let l = Legs::new("legs-diskless", "on_io_error = \"diskless\"\n");
    l.start();
    qio(&l, &["write -P 0x21 0 4M", "write -P 0x22 8M 1M"]);
    l.assert_all_equal();
    let legs_before = [hash_file(&l.p.backing(0)), hash_file(&l.mirror())];
    l.fault("0", "error", "read,write,flush", 0, 0);
    l.fault("1", "error", "read,write,flush", 0, 0);
    // The read that finds both legs failing is served by the peer, as are the next ones.
    qio(
        &l,
        &[
            "read -P 0x21 0 4M",
            "read -P 0x22 8M 1M",
            "read -P 0 16M 1M",
        ],
    );
    let s = l.p.status(0);
    assert_eq!(s["engine"]["disk_state"], "diskless", "{s:#}");
    assert_eq!(s["local"], "failed");
    // Alerts are raised on the next tick.
    l.p.wait_for(0, "disk_failed alert", |s| {
        s["alerts"]
            .as_array()
            .is_some_and(|a| a.iter().any(|x| x["name"] == "disk_failed"))
    });
    // Writes complete once the peer has them, and read back from it.
    qio(
        &l,
        &["write -P 0x23 2M 128k", "flush", "write -P 0x24 20M 4k"],
    );
    qio(
        &l,
        &[
            "read -P 0x21 0 2M",
            "read -P 0x23 2M 128k",
            "read -P 0x24 20M 4k",
        ],
    );
    // The replica holds them (its own export, read-only), the legs do not.
    l.p.qemu_io_with_ok(1, &["-r"], &["read -P 0x23 2M 128k", "read -P 0x24 20M 4k"]);
    assert_eq!(
        [hash_file(&l.p.backing(0)), hash_file(&l.mirror())],
        legs_before,
        "a diskless primary wrote to a failed leg"
    );
    // The link goes: nothing holds the data here, the volume fails cleanly.
    l.p.ok(1, &["down"]);
    l.p.wait_for(0, "failed after the link loss", |s| {
        s["engine"]["disk_state"] == "failed"
    });
    let out = l.p.qemu_io(0, &["read -P 0x21 0 64k"]);
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(text.contains("error") || text.contains("failed"), "{text}");
}

#[test]
fn a_detached_leg_is_rebuilt_with_only_what_was_written_while_it_was_out() {
    if !require_qemu() {
        return;
    }
    let l = Legs::new("legs-detach", "");
    l.start();
    qio(&l, &["write -P 0x61 0 16M"]);
    l.p.ok(0, &["leg", "detach", "--leg", "1"]);
    assert_eq!(l.leg(1)["state"], "detached");
    // While it is out: 24 writes of 4 KiB spread 1 MiB apart (each its own 64 KiB unit),
    // one 3 MiB run, and overwrites of blocks already counted.
    let mut cmds: Vec<String> = (0..24)
        .map(|i| format!("write -P 0x62 {} 4k", (i * MIB) + 8192))
        .collect();
    cmds.push("write -P 0x63 40M 3M".into());
    cmds.push("write -P 0x64 40M 1M".into());
    cmds.push("write -P 0x65 8192 4k".into());
    let cmds: Vec<&str> = cmds.iter().map(|s| s.as_str()).collect();
    qio(&l, &cmds);
    let written = 24 * 4096 + 3 * MIB; // distinct bytes written while the leg was out
    let units = 24 * LEG_BLOCK + 3 * MIB; // the same, in 64 KiB units
    let out = l.p.ok(0, &["leg", "attach", "--leg", "1", "--json"]);
    let v: Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["state"], "healthy", "{v:#}");
    let copied = v["last_rebuild"]["copied_bytes"].as_u64().unwrap();
    assert!(
        copied >= written && copied <= units,
        "copied {copied} bytes for {written} written while detached ({units} in 64 KiB units)"
    );
    assert_eq!(v["last_rebuild"]["full"], false);
    qio(
        &l,
        &[
            "read -P 0x65 8192 4k",
            "read -P 0x62 1056768 4k",
            "read -P 0x64 40M 1M",
        ],
    );
    l.assert_all_equal();
}
