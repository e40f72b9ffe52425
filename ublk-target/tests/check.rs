//! `blkrep check`: passes on a healthy pair and fails, naming the reason, on a backing
//! too small, corrupt metadata, an unreachable peer, a mismatched configuration and a
//! wrong key.

mod common;
use common::*;
use serde_json::Value;
use std::path::Path;

/// `blkrep check --json` on node `i` with `config`: (exit code, the checks by name).
fn check_with(p: &Pair, config: &Path, i: usize) -> (i32, Vec<(String, String, String)>) {
    let out = p.blkrep_with(config, i, &["check", "--json", "--bandwidth-bytes", "1M"]);
    let v: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "check --json: {e}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    let checks = v["checks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["check"].as_str().unwrap().to_string(),
                c["result"].as_str().unwrap().to_string(),
                c["detail"].as_str().unwrap().to_string(),
            )
        })
        .collect::<Vec<_>>();
    assert_eq!(v["ok"], out.status.code() == Some(0), "{v}");
    (out.status.code().unwrap_or(-1), checks)
}

fn check(p: &Pair, i: usize) -> (i32, Vec<(String, String, String)>) {
    check_with(p, &p.config, i)
}

/// The result and detail of one check, which must be there.
fn get<'a>(checks: &'a [(String, String, String)], name: &str) -> (&'a str, &'a str) {
    checks
        .iter()
        .find(|c| c.0 == name)
        .map(|c| (c.1.as_str(), c.2.as_str()))
        .unwrap_or_else(|| panic!("no check {name:?} in {checks:?}"))
}

/// Start beta with another configuration file, check alpha (which must fail), stop beta;
/// returns what failed.
fn check_against_beta_with(
    p: &Pair,
    config_text: &str,
    tag: &str,
) -> (String, String, Vec<(String, String, String)>) {
    let config = p.dir.path().join(format!("beta-{tag}.toml"));
    std::fs::write(&config, config_text).unwrap();
    let up = p.blkrep_with(&config, 1, &["up"]);
    assert!(
        up.status.success(),
        "{}",
        String::from_utf8_lossy(&up.stderr)
    );
    let (rc, c) = check(p, 0);
    assert_eq!(rc, 1, "{c:?}");
    let (name, why) = failed(&c);
    let (name, why) = (name.to_string(), why.to_string());
    let down = p.blkrep_with(&config, 1, &["down"]);
    assert!(down.status.success());
    (name, why, c)
}

/// The only failed check.
fn failed(checks: &[(String, String, String)]) -> (&str, &str) {
    let f: Vec<_> = checks.iter().filter(|c| c.1 == "fail").collect();
    assert_eq!(f.len(), 1, "{checks:?}");
    (f[0].0.as_str(), f[0].2.as_str())
}

#[test]
fn check_passes_on_a_healthy_pair_and_fails_on_local_problems() {
    let p = Pair::new("check-local", "sync", 16 << 20);
    p.start(0);
    p.qemu_io_ok(0, &["write -P 3 0 1M"]);
    p.wait_in_sync(0);
    for i in 0..2 {
        let (rc, c) = check(&p, i);
        assert_eq!(rc, 0, "{c:?}");
        assert!(c.iter().all(|c| c.1 == "pass"), "{c:?}");
        for name in [
            "configuration",
            "backing",
            "metadata",
            "journal",
            "daemon",
            "peer reachable",
            "peer authenticated",
            "configuration identical",
            "link round trip",
            "link bandwidth",
            "clock offset",
            "generations",
        ] {
            get(&c, name);
        }
        assert!(get(&c, "peer authenticated").1.contains("TLS 1.3"));
        assert!(get(&c, "generations").1.contains("same data line"));
    }
    // The human table says the same.
    let out = p.ok(0, &["check", "--bandwidth-bytes", "0"]);
    assert!(out.contains("OK: 11 checks, 0 failed"), "{out}");
    // The probe left the replication link alone.
    assert_eq!(p.status(0)["engine"]["connects"], 1, "{}", p.status(0));

    // A backing too small (alpha stopped: its files are changed under no daemon).
    p.ok(0, &["down"]);
    let backing = p.backing(0);
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&backing)
        .unwrap();
    f.set_len(8 << 20).unwrap();
    let (rc, c) = check(&p, 0);
    assert_eq!(rc, 1);
    let (name, why) = failed(&c);
    assert_eq!(name, "backing");
    assert!(
        why.contains("smaller than the volume (resource.size = 16777216)"),
        "{why}"
    );
    f.set_len(16 << 20).unwrap();

    // Corrupt metadata.
    let md = p.dir.path().join("alpha.md");
    let good = std::fs::read(&md).unwrap();
    std::fs::write(&md, vec![0x42u8; good.len()]).unwrap();
    let (rc, c) = check(&p, 0);
    assert_eq!(rc, 1);
    let (name, why) = failed(&c);
    assert_eq!(name, "metadata");
    assert!(why.contains("alpha.md"), "{why}");
    std::fs::write(&md, &good).unwrap();
    let (rc, c) = check(&p, 0);
    assert_eq!(rc, 0, "{c:?}");
    assert_eq!(get(&c, "daemon").0, "warn");
}

#[test]
fn check_fails_on_an_unreachable_peer_a_mismatched_config_and_a_wrong_key() {
    let p = Pair::new("check-peer", "async", 16 << 20);
    p.ok(0, &["create-md"]);
    p.ok(1, &["create-md"]);

    // Nothing listens at beta's address.
    let (rc, c) = check(&p, 0);
    assert_eq!(rc, 1);
    let (name, why) = failed(&c);
    assert_eq!(name, "peer reachable");
    assert!(why.contains(&format!("beta at {}", p.addrs[1])), "{why}");
    assert!(why.contains("refused"), "{why}");

    // beta runs with a configuration that differs in one line.
    let text = std::fs::read_to_string(&p.config).unwrap();
    let (name, why, _) = check_against_beta_with(
        &p,
        &text.replacen("[resource]\n", "[resource]\nresync_rate = \"10M\"\n", 1),
        "differs",
    );
    assert_eq!(name, "configuration identical");
    assert!(
        why.contains("only at beta: \"resync_rate = \\\"10M\\\"\"")
            && why.contains("only here: none"),
        "{why}"
    );

    // beta comes back with another key than the one alpha pins.
    let lines = keygen(&p.dir.path().join("beta2"));
    let mut other = String::new();
    let mut in_beta = false;
    for l in text.lines() {
        if l.starts_with("name = ") {
            in_beta = l.contains("\"beta\"");
        }
        if in_beta && (l.starts_with("key =") || l.starts_with("cert =")) {
            continue;
        }
        if in_beta && l.starts_with("fingerprint =") {
            other += &lines;
            continue;
        }
        other += l;
        other += "\n";
    }
    let (name, why, c) = check_against_beta_with(&p, &other, "rekeyed");
    assert_eq!(name, "peer authenticated");
    assert!(why.contains("TLS"), "{why}");
    assert_eq!(get(&c, "peer reachable").0, "pass");
}

#[test]
fn a_baseline_shows_what_changed_since() {
    let p = Pair::new("baseline", "async", 16 << 20);
    p.start(0);
    // The initial full sync is over (not only between two of its attempts, as a link
    // reset under load can make `wait_in_sync` see): the peer says it is up to date.
    p.wait_for(0, "peer up to date", |s| {
        s["engine"]["peer_disk_state"] == "up_to_date"
    });
    p.wait_in_sync(0);
    let out = p.ok(
        0,
        &[
            "baseline",
            "save",
            "--name",
            "before-change",
            "--extent",
            "1M",
        ],
    );
    assert!(out.contains("16 extents of 1.0 MiB"), "{out}");
    // The same name again is refused.
    let again = p.blkrep(
        0,
        &[
            "baseline",
            "save",
            "--name",
            "before-change",
            "--extent",
            "1M",
        ],
    );
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("exists"));
    let bad = p.blkrep(0, &["baseline", "save", "--name", "../x"]);
    assert_eq!(bad.status.code(), Some(2));

    // Nothing changed yet.
    let d: Value = serde_json::from_str(&p.ok(0, &["baseline", "diff", "--json"])).unwrap();
    assert_eq!(d["config_changed"], false, "{d}");
    assert_eq!(d["extents_changed"], serde_json::json!([]), "{d}");
    assert_eq!(d["state_changes"], serde_json::json!([]), "{d}");

    // A write in the sixth MiB and a changed configuration line.
    p.qemu_io_ok(0, &["write -P 9 5M 64k"]);
    p.wait_in_sync(0);
    let text = std::fs::read_to_string(&p.config).unwrap();
    std::fs::write(
        &p.config,
        text.replacen("mode = \"async\"", "mode = \"sync\"", 1),
    )
    .unwrap();
    let d: Value = serde_json::from_str(&p.ok(0, &["baseline", "diff", "--json"])).unwrap();
    assert_eq!(d["baseline"], "before-change");
    assert_eq!(d["extents_total"], 16);
    assert_eq!(
        d["extents_changed"],
        serde_json::json!([[5 << 20, 6 << 20]]),
        "{d}"
    );
    assert_eq!(d["config_changed"], true);
    assert_eq!(
        d["config_only_then"],
        serde_json::json!(["mode = \"async\""])
    );
    assert_eq!(d["config_only_now"], serde_json::json!(["mode = \"sync\""]));
    let seq = d["state_changes"].as_array().unwrap();
    assert!(
        seq.iter()
            .any(|c| c.as_str().unwrap().starts_with("sequence: ")),
        "{d}"
    );
    let human = p.ok(0, &["baseline", "diff"]);
    assert!(
        human.contains("content: 1 of 16 extents changed (1.0 MiB)"),
        "{human}"
    );
    assert!(human.contains("+ mode = \"sync\""), "{human}");
    std::fs::write(&p.config, text).unwrap();

    // A damaged baseline is refused, not trusted.
    let file = p
        .dir
        .path()
        .join("alpha.md.baselines")
        .join("before-change.json");
    let b = std::fs::read_to_string(&file).unwrap();
    std::fs::write(&file, b.replacen("\"primary\"", "\"secondary\"", 1)).unwrap();
    let out = p.blkrep(0, &["baseline", "diff", "--name", "before-change"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("checksum mismatch"));
}
