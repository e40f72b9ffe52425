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
