//! eBPF block-device latency: the programs attach, count every request of the traced
//! device into its histogram under the right device key, and a daemon without the
//! privileges falls back to the userspace stages and says why.
//!
//! The privileged tests need root and loop devices; without them they are skipped with the
//! reason, except under CI=true (or BLKREP_REQUIRE_EBPF=1), where a skip is a failure.

mod common;
use blkrep_target::latency::bpf::{device_of, BlockTracker};
use common::*;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

fn must_run() -> bool {
    std::env::var("CI").as_deref() == Ok("true")
        || std::env::var_os("BLKREP_REQUIRE_EBPF").is_some()
}

/// Why this machine cannot run the privileged tests, if it cannot.
fn privileged_missing() -> Option<String> {
    if !nix::unistd::Uid::effective().is_root() {
        return Some("not root".into());
    }
    if !Path::new("/dev/loop-control").exists() {
        return Some("no /dev/loop-control".into());
    }
    if !have("losetup") {
        return Some("no losetup".into());
    }
    None
}

fn skip_or_fail(test: &str, why: &str) {
    assert!(
        !must_run(),
        "{test}: cannot run here ({why}) and CI requires it"
    );
    eprintln!("SKIP {test}: {why}");
}

/// A loop device over a file, detached on drop.
struct Loop {
    dev: PathBuf,
}

impl Loop {
    fn new(file: &Path, size: u64) -> Loop {
        let f = std::fs::File::create(file).unwrap();
        f.set_len(size).unwrap();
        drop(f);
        let out = Command::new("losetup")
            .args(["--find", "--show", "--direct-io=on"])
            .arg(file)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "losetup: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Loop {
            dev: PathBuf::from(String::from_utf8(out.stdout).unwrap().trim()),
        }
    }

    fn name(&self) -> String {
        self.dev.file_name().unwrap().to_string_lossy().into_owned()
    }

    /// Reads and writes completed, from /sys/block/NAME/stat.
    fn completed(&self) -> (u64, u64) {
        let s = std::fs::read_to_string(format!("/sys/block/{}/stat", self.name())).unwrap();
        let f: Vec<u64> = s.split_whitespace().map(|x| x.parse().unwrap()).collect();
        (f[0], f[4])
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.dev).status();
    }
}

/// O_DIRECT 4 KiB writes and reads at scattered offsets, one at a time.
fn direct_io(dev: &Path, writes: u64, reads: u64) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(dev)
        .unwrap();
    let mut buf = blkrep_engine::AlignedBuf::zeroed(4096);
    for i in 0..writes {
        buf.as_mut_slice()[0] = i as u8;
        f.write_all_at(buf.as_ref(), (i * 7919 % 8192) * 4096)
            .unwrap();
    }
    for i in 0..reads {
        f.read_exact_at(buf.as_mut_slice(), (i * 104729 % 8192) * 4096)
            .unwrap();
    }
}

fn histogram_counts_every_completion(raw_only: bool) {
    let test = if raw_only { "raw_tp" } else { "tp_btf" };
    if let Some(why) = privileged_missing() {
        return skip_or_fail(test, &why);
    }
    let dir = tempdir::Dir::new(&format!("ebpf-{test}"));
    let lo = Loop::new(&dir.path().join("disk.img"), 32 << 20);
    let d = device_of(&lo.dev, "backing").expect("the loop device's numbers");
    // The device key: the loop driver's major and the device's own minor.
    let sys = std::fs::read_to_string(format!("/sys/block/{}/dev", lo.name())).unwrap();
    assert_eq!(format!("{}:{}", d.major, d.minor), sys.trim());
    assert_eq!(d.major, 7, "loop devices have major 7");
    assert_eq!(d.name, lo.name());
    let t = BlockTracker::start_with(std::slice::from_ref(&d), raw_only)
        .unwrap_or_else(|e| panic!("attach: {e}"));
    assert_eq!(t.attach_kind(), test);
    assert!(
        t.costs().is_empty()
            || std::fs::read_to_string("/proc/sys/kernel/bpf_stats_enabled")
                .is_ok_and(|v| v.trim() == "1")
    );
    // The kernel counts the programs' runs and time while this fd is open.
    let stats = aya::sys::enable_stats(aya::sys::Stats::RunTime).expect("BPF_ENABLE_STATS");
    let before = lo.completed();
    direct_io(&lo.dev, 300, 200);
    let after = lo.completed();
    let (reads, writes) = (after.0 - before.0, after.1 - before.1);
    assert!(
        reads >= 200 && writes >= 300,
        "{reads} reads, {writes} writes"
    );
    let snap = t.snapshot();
    let of = |op: &str| {
        snap.iter()
            .find(|h| h.op == op)
            .unwrap_or_else(|| panic!("no {op} histogram in {snap:?}"))
    };
    for (op, n) in [("read", reads), ("write", writes)] {
        let h = of(op);
        assert_eq!(h.dev, sys.trim(), "device key of {op}");
        assert_eq!(h.device, lo.name());
        assert_eq!(
            h.hist.count, n,
            "{op}: histogram total vs the kernel's completions"
        );
        assert_eq!(h.completed, n, "{op}: completion counter");
        assert_eq!(h.issued, n, "{op}: issue counter");
        assert_eq!(h.hist.slots.iter().sum::<u64>(), n);
        assert!(h.hist.sum_ns > 0 && h.hist.p50_us > 0.0 && h.hist.p99_us >= h.hist.p50_us);
    }
    // Nothing from other devices.
    assert!(snap.iter().all(|h| h.dev == sys.trim()), "{snap:?}");
    // Each program ran at least once per request (every device's requests run it).
    let costs = t.costs();
    assert_eq!(costs.len(), 2, "{costs:?}");
    for c in &costs {
        assert!(c.run_count >= reads + writes, "{c:?}");
        assert!(c.run_time_ns > 0, "{c:?}");
    }
    drop(stats);
    drop(t);
    // Detached: more I/O changes nothing we could read (the maps are gone with the object).
}

#[test]
fn block_histograms_count_every_completion_on_a_loop_device() {
    histogram_counts_every_completion(false);
}

#[test]
fn the_raw_tracepoint_fallback_counts_the_same() {
    histogram_counts_every_completion(true);
}

/// `blkrep ARGS` on node alpha as the user nobody (no capabilities at all).
fn as_nobody(p: &Pair, bin: &str, args: &[&str]) -> std::process::Output {
    Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
        ])
        .arg(bin_dir().join(bin))
        .arg("--config")
        .arg(&p.config)
        .arg("--node")
        .arg("alpha")
        .args(args)
        .env("BLKREPD", bin_dir().join("blkrepd"))
        .output()
        .expect("run setpriv")
}

#[test]
fn an_unprivileged_daemon_falls_back_and_says_why() {
    if !nix::unistd::Uid::effective().is_root() || !have("setpriv") {
        return skip_or_fail("unprivileged", "needs root (to drop to nobody) and setpriv");
    }
    let p = Pair::new("ebpf-nobody", "async", 16 << 20);
    let chown = Command::new("chown")
        .args(["-R", "65534:65534"])
        .arg(p.dir.path())
        .status()
        .unwrap();
    assert!(chown.success());
    // The directory must be reachable by nobody (temp dirs are).
    let out = as_nobody(&p, "blkrep", &["create-md"]);
    assert!(
        out.status.success(),
        "create-md: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    // `ebpf = "require"` (here the daemon's --require-ebpf switch) is fatal without it.
    let out = as_nobody(&p, "blkrepd", &["--require-ebpf"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("eBPF latency tracking is required") && err.contains("needs root"),
        "{err}"
    );

    // By default the daemon starts, says why once, and serves the stages.
    let out = as_nobody(&p, "blkrep", &["up"]);
    assert!(
        out.status.success(),
        "up: {}{}",
        String::from_utf8_lossy(&out.stderr),
        p.log(0)
    );
    p.wait_log(0, &["eBPF latency tracking unavailable"]);
    let log = p.log(0);
    assert_eq!(
        log.matches("eBPF latency tracking unavailable").count(),
        1,
        "{log}"
    );
    assert!(log.contains("Operation not permitted"), "{log}");
    // Its peer runs as root; alpha becomes primary and replicates to it.
    p.ok(1, &["create-md"]);
    p.ok(1, &["up"]);
    p.ok(0, &["promote", "--timeout", "20"]);
    p.wait_in_sync(0);
    p.qemu_io_ok(0, &["write -P 7 0 64k", "read -P 7 0 64k"]);
    let v: serde_json::Value =
        serde_json::from_str(&p.ok(0, &["latency", "--json"])).expect("latency JSON");
    assert_eq!(v["ebpf"]["state"], "unavailable", "{v}");
    let reason = v["ebpf"]["reason"].as_str().unwrap();
    assert!(
        reason.contains("needs root, or CAP_BPF and CAP_PERFMON"),
        "{reason}"
    );
    assert_eq!(v["devices"].as_array().unwrap().len(), 0);
    let stage = |n: &str| {
        v["stages"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["stage"] == n)
            .unwrap_or_else(|| panic!("no stage {n}: {v}"))
            .clone()
    };
    assert_eq!(stage("client_write")["hist"]["count"], 1, "{v}");
    assert_eq!(stage("client_read")["hist"]["count"], 1, "{v}");
    // The human rendering says the same.
    let text = p.ok(0, &["latency"]);
    assert!(text.contains("eBPF: unavailable:"), "{text}");
    assert!(text.contains("stage client_write"), "{text}");
    p.ok(0, &["down"]);
}
