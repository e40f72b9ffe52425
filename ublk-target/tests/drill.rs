//! `blkrep drill` on the host (NBD clone; the ublk clone, mount and e2fsck run in the VM
//! scenario `drill`): under a continuous write workload the clone keeps the cut while
//! replication goes on into the replica, the clone's own writes stay in the clone, the
//! workload never stops, the replica converges, and the evidence report carries RPO, the
//! steps' times and the verdict. Refusals: on the primary, a second drill, a failing
//! probe, a tampered report.

mod common;
use common::*;
use serde_json::Value;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

const MIB: u64 = 1 << 20;

fn drill(p: &Pair, i: usize, args: &[&str]) -> (i32, Value, String) {
    let mut a = vec!["drill", "--json"];
    a.extend_from_slice(args);
    let out = p.blkrep(i, &a);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let v = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    (out.status.code().unwrap_or(-1), v, text)
}

fn step<'a>(v: &'a Value, name: &str) -> &'a Value {
    v["steps"]
        .as_array()
        .and_then(|s| s.iter().find(|s| s["step"] == name))
        .unwrap_or_else(|| panic!("no step {name} in {v:#}"))
}

/// The shell-quoted path of a blkrep invocation for node `i` (for probe scripts).
fn blkrep_cmd(p: &Pair, i: usize) -> String {
    format!(
        "{} --config {} --node {}",
        bin_dir().join("blkrep").display(),
        p.config.display(),
        p.names[i]
    )
}

#[test]
fn a_drill_under_writes_keeps_the_cut_and_never_stops_replication() {
    if !require_qemu() {
        return;
    }
    let p = Pair::new("drill", "async", 64 * MIB);
    p.start(0);
    // The image at the cut: 0xaa over the first 4 MiB.
    p.qemu_io_ok(0, &["write -P 0xaa 0 4M"]);
    p.wait_in_sync(0);

    // A workload on the primary for the whole drill: 1 MiB writes in [8M, 40M).
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let uri = p.nbd_uri(0);
    let writer = {
        let (stop, done, failed) = (stop.clone(), done.clone(), failed.clone());
        std::thread::spawn(move || {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let mut c = Command::new("qemu-io");
                c.args(["-f", "raw", &uri]);
                for k in 0..8 {
                    let off = 8 * MIB + ((n + k) % 32) * MIB;
                    c.arg("-c")
                        .arg(format!("write -P {} {off} 1M", (n + k) % 200 + 1));
                }
                let out = c.output().unwrap();
                let text = String::from_utf8_lossy(&out.stdout).to_string()
                    + &String::from_utf8_lossy(&out.stderr);
                if out.status.success() && !text.contains("failed") {
                    done.fetch_add(8, Ordering::Relaxed);
                } else {
                    failed.fetch_add(1, Ordering::Relaxed);
                    eprintln!("workload: {text}");
                }
                n += 8;
            }
        })
    };
    std::thread::sleep(Duration::from_millis(500));
    assert!(done.load(Ordering::Relaxed) > 0, "the workload runs");

    // The probe, run during the drill after the cut: the primary overwrites the first
    // 4 MiB with 0xcc and the replica gets it, while the clone still reads 0xaa; the
    // clone's own write stays in the clone; a second drill is refused.
    let cc = p.dir.path().join("cc.bin");
    std::fs::write(&cc, vec![0xccu8; 4 * MIB as usize]).unwrap();
    let script = p.dir.path().join("probe.sh");
    std::fs::write(
        &script,
        format!(
            r#"set -u
fail() {{ echo "probe: $*"; exit 1; }}
test -n "$BLKREP_DRILL_NBD" || fail "no BLKREP_DRILL_NBD"
qemu-io -f raw '{alpha}' -c 'write -P 0xcc 0 4M' >/dev/null || fail "primary write"
i=0
until cmp -s -n 4194304 '{beta_img}' '{cc}'; do
  i=$((i+1)); [ $i -lt 200 ] || fail "the replica never got the primary's write"
  sleep 0.05
done
out=$(qemu-io -f raw "$BLKREP_DRILL_NBD" -c 'read -P 0xaa 0 4M' 2>&1)
case "$out" in *"read 4194304/4194304"*) ;; *) fail "clone read: $out";; esac
case "$out" in *failed*) fail "the clone lost the cut: $out";; esac
out=$(qemu-io -f raw "$BLKREP_DRILL_NBD" -c 'write -P 0xdd 0 64k' -c 'read -P 0xdd 0 64k' -c 'read -P 0xaa 64k 64k' 2>&1)
case "$out" in *failed*|*rror*) fail "clone write: $out";; esac
second=$({blkrep} drill --json 2>&1) && fail "a second drill started: $second"
case "$second" in *"already running"*) ;; *) fail "second drill: $second";; esac
echo "cut kept, replication went on"
"#,
            alpha = p.nbd_uri(0),
            beta_img = p.backing(1).display(),
            cc = cc.display(),
            blkrep = blkrep_cmd(&p, 1),
        ),
    )
    .unwrap();
    let probe = format!("sh {}", script.display());
    let before = done.load(Ordering::Relaxed);
    let (code, v, text) = drill(&p, 1, &["--checks", "probe", "--probe", &probe]);
    let during = done.load(Ordering::Relaxed) - before;
    stop.store(true, Ordering::Relaxed);
    writer.join().unwrap();
    assert_eq!(code, 0, "drill: {text}\nlog:\n{}", p.log(1));
    assert_eq!(failed.load(Ordering::Relaxed), 0, "the workload saw errors");
    assert!(during > 0, "the workload made progress during the drill");

    // The evidence.
    assert_eq!(v["verdict"], "pass", "{v:#}");
    assert_eq!(v["v"], 1);
    let rpo = v["rpo"]["seconds_max"].as_f64().expect("RPO measured");
    assert!((0.0..60.0).contains(&rpo), "{v:#}");
    assert!(v["rpo"]["primary_lag_seconds"].as_f64().is_some());
    assert_eq!(step(&v, "probe")["result"], "pass");
    assert!(step(&v, "probe")["detail"]
        .as_str()
        .unwrap()
        .contains("cut kept"));
    for s in ["preflight", "rpo probe", "cut", "teardown", "replication"] {
        assert_eq!(step(&v, s)["result"], "pass", "{s}: {v:#}");
        assert!(step(&v, s)["seconds"].as_f64().unwrap() >= 0.0);
    }
    assert!(v["clone"]["device"].is_null(), "no ublk on this host");
    assert!(v["clone"]["nbd"].as_str().unwrap().contains("drill.nbd"));
    assert!(
        v["teardown"]["applied_during"].as_u64().unwrap() > 0,
        "{v:#}"
    );
    assert!(v["teardown"]["preserved_bytes"].as_u64().unwrap() >= 4 * MIB);
    assert!(v["teardown"]["clone_written_bytes"].as_u64().unwrap() >= 64 << 10);
    assert!(v["rto_estimate_seconds"].as_f64().unwrap() > 0.0);
    let files: Vec<String> = serde_json::from_value(v["files"].clone()).unwrap();
    assert_eq!(files.len(), 3);
    let md = std::fs::read_to_string(files.iter().find(|f| f.ends_with(".md")).unwrap()).unwrap();
    assert!(md.contains("PASS") && md.contains("RPO at the cut") && md.contains("| probe |"));
    let html =
        std::fs::read_to_string(files.iter().find(|f| f.ends_with(".html")).unwrap()).unwrap();
    assert!(html.contains("<table>") && html.contains("estimated RTO"));

    // The clone is gone, and so is its store; the daemon logged the drill.
    assert!(p.status(1)["drill"].is_null());
    assert!(!p.dir.path().join("run/r0-beta.drill.nbd").exists());
    let stores: Vec<_> = std::fs::read_dir(p.dir.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().contains("drill-store"))
        .collect();
    assert!(stores.is_empty(), "store left behind");
    let ev = p.ok(1, &["events", "--kind", "drill"]);
    assert!(
        ev.contains("drill started") && ev.contains("drill ended: verdict pass"),
        "{ev}"
    );

    // The replica converged, with the primary's bytes (not the clone's 0xdd).
    p.wait_in_sync(0);
    p.down();
    assert!(
        qemu_img_same(&p.backing(0), &p.backing(1)),
        "replica differs"
    );
    let head = std::fs::read(p.backing(1)).unwrap();
    assert!(head[..4 * MIB as usize].iter().all(|b| *b == 0xcc));

    // History lists it; a tampered report is named.
    let h = p.ok(1, &["drill", "--history"]);
    assert!(
        h.contains(v["id"].as_str().unwrap()) && h.contains("PASS"),
        "{h}"
    );
    let json = files.iter().find(|f| f.ends_with(".json")).unwrap();
    let t = std::fs::read_to_string(json).unwrap();
    std::fs::write(json, t.replace("\"pass\"", "\"fail\"")).unwrap();
    let out = p.blkrep(1, &["drill", "--history"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("checksum mismatch"));
}

#[test]
fn drills_are_refused_where_they_cannot_prove_anything_and_failures_are_reported() {
    if !require_qemu() {
        return;
    }
    let p = Pair::new("drill-refuse", "sync", 16 * MIB);
    p.start(0);
    p.qemu_io_ok(0, &["write -P 0x5a 0 1M"]);
    p.wait_in_sync(0);

    // On the primary.
    let (code, _, text) = drill(&p, 0, &["--checks", "probe", "--probe", "true"]);
    assert_eq!(code, 1, "{text}");
    assert!(text.contains("runs on the secondary"), "{text}");

    // Nothing to abort.
    let out = p.blkrep(1, &["drill", "--abort"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no drill is running"));

    // Unknown check.
    let out = p.blkrep(1, &["drill", "--checks", "mount,smoke"]);
    assert_ne!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown check"));

    // A failing probe: verdict fail, exit 1, the report written, the clone removed; and
    // mount/fsck are skipped (no block device for the clone on this host), not passed.
    let (code, v, text) = drill(
        &p,
        1,
        &[
            "--checks",
            "mount,probe,fsck",
            "--probe",
            "echo database did not start >&2; exit 3",
        ],
    );
    assert_eq!(code, 1, "{text}");
    assert_eq!(v["verdict"], "fail");
    assert_eq!(step(&v, "probe")["result"], "fail");
    assert!(step(&v, "probe")["detail"]
        .as_str()
        .unwrap()
        .contains("database did not start"));
    assert_eq!(step(&v, "mount")["result"], "skip");
    assert_eq!(step(&v, "fsck")["result"], "skip");
    assert_eq!(step(&v, "teardown")["result"], "pass");
    assert!(p.status(1)["drill"].is_null());
    let h = p.ok(1, &["drill", "--history", "--json"]);
    let h: Value = serde_json::from_str(&h).unwrap();
    assert_eq!(h["drills"].as_array().unwrap().len(), 1);
    assert_eq!(h["drills"][0]["verdict"], "fail");

    // The replica is untouched by all this.
    p.wait_in_sync(0);
    p.down();
    assert!(qemu_img_same(&p.backing(0), &p.backing(1)));
}
