//! Independent clients against a replicated pair: fio's nbd engine with verification,
//! nbdinfo, and the export on a loopback TCP port instead of a Unix socket.

mod common;
use common::*;
use std::process::Command;

const MIB: u64 = 1 << 20;

fn need(tool: &str) -> bool {
    if have(tool) {
        return true;
    }
    assert!(
        std::env::var("CI").is_err(),
        "{tool} missing in CI (scripts/install-deps.sh installs it)"
    );
    eprintln!("skipping: {tool} not installed");
    false
}

#[test]
fn fio_verify_workload_replicates() {
    if !need("fio") {
        return;
    }
    for mode in ["sync", "async"] {
        let p = Pair::new(&format!("fio-{mode}"), mode, 32 * MIB);
        p.start(0);
        let json = p.dir.path().join("fio.json");
        let out = Command::new("fio")
            .args([
                "--name=verify",
                "--ioengine=nbd",
                &format!("--uri={}", p.nbd_uri(0)),
                "--rw=randwrite",
                "--bsrange=4k-128k",
                "--iodepth=16",
                "--size=24M",
                "--verify=crc32c",
                "--verify_fatal=1",
                "--do_verify=1",
                "--verify_state_save=0",
                "--output-format=json",
            ])
            .arg(format!("--output={}", json.display()))
            .output()
            .unwrap();
        let report = std::fs::read_to_string(&json).unwrap_or_default();
        assert!(
            out.status.success(),
            "fio failed: {}\n{report}\nlog:\n{}",
            String::from_utf8_lossy(&out.stderr),
            p.log(0)
        );
        let v: serde_json::Value = serde_json::from_str(&report).expect("fio json");
        let job = &v["jobs"][0];
        assert_eq!(job["error"], 0, "{report}");
        assert!(job["write"]["io_bytes"].as_u64().unwrap() >= 24 * MIB);
        assert!(
            job["read"]["io_bytes"].as_u64().unwrap() >= 24 * MIB,
            "verify read"
        );
        p.wait_in_sync(0);
        p.down();
        assert_eq!(
            hash_file(&p.backing(0)),
            hash_file(&p.backing(1)),
            "{mode}: replica differs after fio"
        );
        assert!(qemu_img_same(&p.backing(0), &p.backing(1)));
    }
}

#[test]
fn nbdinfo_and_tcp_export() {
    if !need("nbdinfo") || !need("qemu-io") {
        return;
    }
    let port = free_port();
    let tcp = format!("nbd = \"tcp:127.0.0.1:{port}\"");
    let p = Pair::with_node_extra("tcp", "async", 16 * MIB, [&tcp, ""]);
    p.start(0);
    let uri = format!("nbd://127.0.0.1:{port}/r0");
    let out = Command::new("nbdinfo")
        .arg("--json")
        .arg(&uri)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let e = &v["exports"][0];
    assert_eq!(e["export-size"], 16 * MIB, "{v:#}");
    assert_eq!(e["is_read_only"], false, "{v:#}");
    assert_eq!(e["can_flush"], true, "{v:#}");
    assert_eq!(e["can_fua"], true, "{v:#}");
    assert_eq!(e["can_trim"], true, "{v:#}");
    assert_eq!(e["can_zero"], true, "{v:#}");
    assert_eq!(e["block_size_minimum"], 512, "{v:#}");
    let out = Command::new("nbdinfo")
        .arg("--list")
        .arg(&uri)
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("r0"));
    // The secondary's export (Unix socket) is read-only.
    let out = Command::new("nbdinfo")
        .arg("--json")
        .arg(p.nbd_uri(1))
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["exports"][0]["is_read_only"], true, "{v:#}");
    // qemu-io over TCP.
    let out = Command::new("qemu-io")
        .args([
            "-f",
            "raw",
            &uri,
            "-c",
            "write -P 0x42 64k 128k",
            "-c",
            "read -P 0x42 64k 128k",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    p.wait_in_sync(0);
    p.down();
    assert_eq!(hash_file(&p.backing(0)), hash_file(&p.backing(1)));
}
