//! The systemd unit parses cleanly (`systemd-analyze verify`, with the binary paths
//! pointed at this build) and starts what the README says.

mod common;
use common::*;
use std::process::Command;

#[test]
fn the_systemd_unit_verifies() {
    if !have("systemd-analyze") {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "systemd-analyze is missing (Debian's systemd package)"
        );
        eprintln!("SKIP: no systemd-analyze");
        return;
    }
    let unit = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../packaging/systemd/blkrep@.service"),
    )
    .unwrap();
    assert!(unit.contains(
        "ExecStart=/usr/local/sbin/blkrepd --config /etc/blkrep/%i.toml --node ${BLKREP_NODE}"
    ));
    assert!(unit.contains(
        "ExecStop=/usr/local/bin/blkrep --config /etc/blkrep/%i.toml --node ${BLKREP_NODE} down"
    ));
    let dir = tempdir::Dir::new("unit");
    let bin = bin_dir();
    let local = unit
        .replace(
            "/usr/local/sbin/blkrepd",
            &bin.join("blkrepd").display().to_string(),
        )
        .replace(
            "/usr/local/bin/blkrep ",
            &format!("{} ", bin.join("blkrep").display()),
        );
    let path = dir.path().join("blkrep@.service");
    std::fs::write(&path, local).unwrap();
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(&path)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success() && text.trim().is_empty(), "{text}");
    // blkrepd takes the arguments the unit gives it.
    let help = Command::new(bin.join("blkrepd"))
        .arg("--help")
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    assert!(
        help.contains("--config") && help.contains("--node"),
        "{help}"
    );
}

/// Without --node and BLKREP_NODE, `blkrep` takes the node from `RESOURCE.env` beside the
/// configuration, the file the unit reads, so both agree on it.
#[test]
fn blkrep_reads_the_node_from_the_env_file_beside_the_config() {
    let p = Pair::new("envfile", "async", 1 << 20);
    let run = || {
        Command::new(bin_dir().join("blkrep"))
            .arg("--config")
            .arg(&p.config)
            .arg("status")
            .env_remove("BLKREP_NODE")
            .output()
            .unwrap()
    };
    // The host name is neither node: refused, naming the nodes.
    let out = run();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("which node is this?"));
    std::fs::write(p.dir.path().join("r0.env"), "# blkrep\nBLKREP_NODE=beta\n").unwrap();
    let out = run();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{text}");
    assert!(text.contains("r0/beta: not running"), "{text}");
}
