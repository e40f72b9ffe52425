//! Bad input gets a clear error and loses nothing: malformed configs, short backings,
//! out-of-range and unknown NBD requests, writes on a secondary, strangers and other
//! versions on the replication port — each against real daemons.

mod common;
use blkrep_tools::nbd_client::{probe_option_unix, NbdClient};
use common::*;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

const MIB: u64 = 1 << 20;
const EPERM: u32 = 1;
const EINVAL: u32 = 22;
const ENOSPC: u32 = 28;

fn resize(path: &std::path::Path, size: u64) {
    std::fs::File::options()
        .write(true)
        .open(path)
        .unwrap()
        .set_len(size)
        .unwrap();
}

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn malformed_and_incomplete_configs_name_the_field() {
    let p = Pair::new("badcfg", "sync", 8 * MIB);
    let good = std::fs::read_to_string(&p.config).unwrap();
    let cases = [
        (
            good.replace("mode = \"sync\"", "mode = \"fast\""),
            "resource.mode",
        ),
        (
            good.replace("size = 8388608", "size = 1000"),
            "resource.size",
        ),
        (good.replacen("address = ", "adress = ", 1), "adress"),
        (
            good.replacen(&format!("address = \"{}\"\n", p.addrs[0]), "", 1),
            "address",
        ),
        (good.replace("[resource]", "[resource"), "TOML parse error"),
    ];
    for (text, field) in cases {
        std::fs::write(&p.config, &text).unwrap();
        let out = p.blkrep(0, &["status"]);
        assert_eq!(out.status.code(), Some(2), "exit code for {field}");
        assert!(
            stderr(&out).contains(field),
            "error does not name {field}: {}",
            stderr(&out)
        );
    }
    std::fs::write(&p.config, &good).unwrap();
    let out = std::process::Command::new(bin_dir().join("blkrep"))
        .arg("--config")
        .arg(&p.config)
        .args(["--node", "gamma", "status"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("alpha, beta"), "{}", stderr(&out));
    // The daemon itself refuses a bad config the same way.
    std::fs::write(&p.config, good.replace("mode = \"sync\"", "mode = 3")).unwrap();
    let out = std::process::Command::new(bin_dir().join("blkrepd"))
        .arg("--config")
        .arg(&p.config)
        .args(["--node", "alpha"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("mode"), "{}", stderr(&out));
}

#[test]
fn short_backing_and_missing_or_foreign_metadata_are_refused() {
    let p = Pair::new("short", "sync", 16 * MIB);
    // Not created yet.
    let out = p.blkrep(0, &["up"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("create-md"), "{}", stderr(&out));
    // Backing smaller than the resource: create-md refuses.
    resize(&p.backing(0), 8 * MIB);
    let out = p.blkrep(0, &["create-md"]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("8388608") && stderr(&out).contains("16777216"),
        "{}",
        stderr(&out)
    );
    // The daemon refuses too, when the backing shrank after create-md.
    resize(&p.backing(0), 16 * MIB);
    p.ok(0, &["create-md"]);
    resize(&p.backing(0), 4 * MIB);
    let out = p.blkrep(0, &["up"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("needs 16777216"), "{}", stderr(&out));
    resize(&p.backing(0), 16 * MIB);
    // create-md does not overwrite valid metadata without --force.
    let out = p.blkrep(0, &["create-md"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("--force"), "{}", stderr(&out));
    // Metadata of another node is refused.
    let md0 = p.dir.path().join("alpha.md");
    p.ok(1, &["create-md"]);
    std::fs::copy(p.dir.path().join("beta.md"), &md0).unwrap();
    let out = p.blkrep(0, &["dump-md"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("beta"), "{}", stderr(&out));
    // Corrupt metadata is refused, never trusted.
    let mut m = std::fs::read(&md0).unwrap();
    m[40] ^= 0xff;
    std::fs::write(&md0, &m).unwrap();
    let out = p.blkrep(0, &["dump-md"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("corrupt"), "{}", stderr(&out));
    // Status of a stopped daemon: exit 3, running=false.
    let out = p.blkrep(0, &["status", "--json"]);
    assert_eq!(out.status.code(), Some(3));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["running"], false);
}

fn raw_request(cmd: u16, flags: u16, handle: u64, offset: u64, len: u32) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(&0x2560_9513u32.to_be_bytes());
    b.extend_from_slice(&flags.to_be_bytes());
    b.extend_from_slice(&cmd.to_be_bytes());
    b.extend_from_slice(&handle.to_be_bytes());
    b.extend_from_slice(&offset.to_be_bytes());
    b.extend_from_slice(&len.to_be_bytes());
    b
}

#[test]
fn nbd_out_of_range_unknown_and_secondary_writes() {
    let size = 16 * MIB;
    let p = Pair::new("nbdbad", "sync", size);
    p.start(0);
    let mut c = NbdClient::connect_unix(&p.nbd_socket(0), "r0").unwrap();
    // Send what a careful client would not, and see the server refuse it.
    c.set_check_requests(false);
    assert_eq!(c.size(), size);
    c.write(0, &[0x5a; 8192], false).unwrap().unwrap();
    // Beyond the end, and straddling it.
    assert_eq!(c.read(size, 4096).unwrap().unwrap_err(), EINVAL);
    assert_eq!(c.read(size - 4096, 8192).unwrap().unwrap_err(), EINVAL);
    let e = c
        .write(size - 4096, &[1; 8192], false)
        .unwrap()
        .unwrap_err();
    assert!(e == ENOSPC || e == EINVAL, "write beyond end: errno {e}");
    let e = c.write_zeroes(size, 4096, false).unwrap().unwrap_err();
    assert!(
        e == ENOSPC || e == EINVAL,
        "write-zeroes beyond end: errno {e}"
    );
    assert_eq!(c.trim(u64::MAX - 4095, 4096).unwrap().unwrap_err(), EINVAL);
    // Misaligned for O_DIRECT.
    assert_eq!(c.write(100, &[1; 512], false).unwrap().unwrap_err(), EINVAL);
    // An unknown command gets EINVAL and the connection keeps working.
    c.send_raw(&raw_request(77, 0, 0xabcdef, 0, 4096)).unwrap();
    c.track_raw_request(0xabcdef, 77, 0);
    let (h, r) = c.wait_reply().unwrap();
    assert_eq!((h, r.unwrap_err()), (0xabcdef, EINVAL));
    assert_eq!(c.read(0, 8192).unwrap().unwrap(), vec![0x5a; 8192]);
    c.disconnect().unwrap();
    // Unknown options are refused and negotiation goes on.
    let replies = probe_option_unix(&p.nbd_socket(0), 0x4242, b"").unwrap();
    assert_eq!(
        replies,
        vec![(1u32 << 31) + 1],
        "NBD_REP_ERR_UNSUP expected"
    );
    // An unknown export name is refused.
    let e = NbdClient::connect_unix(&p.nbd_socket(0), "nope")
        .err()
        .unwrap();
    assert!(e.to_string().contains("nope"), "{e}");
    // Nothing written beyond the rejected requests.
    p.wait_in_sync(0);
    let mut c = NbdClient::connect_unix(&p.nbd_socket(1), "r0").unwrap();
    assert!(c.read_only(), "the secondary's export must be read-only");
    c.set_check_requests(false);
    assert_eq!(c.write(0, &[1; 4096], false).unwrap().unwrap_err(), EPERM);
    assert_eq!(c.read(0, 8192).unwrap().unwrap(), vec![0x5a; 8192]);
    c.disconnect().unwrap();
    p.down();
    let a = std::fs::read(p.backing(0)).unwrap();
    assert_eq!(a, std::fs::read(p.backing(1)).unwrap());
    assert!(
        a[8192..].iter().all(|&b| b == 0),
        "a refused request wrote data"
    );
}

#[test]
fn strangers_and_other_versions_on_the_replication_port() {
    if !have("qemu-io") {
        assert!(std::env::var("CI").is_err(), "qemu-io missing in CI");
        eprintln!("skipping: qemu-io missing");
        return;
    }
    // The plaintext link's own handshake checks; security.rs has the TLS side.
    let p = Pair::new("stranger", "async", 16 * MIB);
    p.resource_line("insecure = true");
    p.start(0);
    for i in 0..2 {
        // Garbage: the connection is dropped.
        let mut s = TcpStream::connect(&p.addrs[i]).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(b"GET / HTTP/1.0\r\n\r\nhello there, this is not blkrep")
            .unwrap();
        let mut buf = [0u8; 64];
        assert_eq!(s.read(&mut buf).unwrap_or(0), 0, "garbage got an answer");
        // Another version: refused with a reason naming both versions.
        let id = blkrep_transport::handshake::LinkIdentity {
            resource: "r0".into(),
            local_node: p.names[1 - i].into(),
            peer_node: p.names[i].into(),
        };
        let mut s = TcpStream::connect(&p.addrs[i]).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(&blkrep_transport::handshake::hello_frame_with_version(
            &id, 99,
        ))
        .unwrap();
        let mut answer = Vec::new();
        let _ = s.read_to_end(&mut answer);
        assert!(
            String::from_utf8_lossy(&answer).contains("version 99"),
            "no reason given to the other version: {answer:?}"
        );
        // A stranger that connects and stays silent does not block anything.
        let _silent = TcpStream::connect(&p.addrs[i]).unwrap();
        // Logged with the reason.
        p.wait_log(i, &["not a blkrep peer", "version 99"]);
    }
    // The pair kept serving and replicating.
    let s = p.status(0);
    assert_eq!(s["engine"]["conn"], "connected", "{s:#}");
    p.qemu_io_ok(0, &["write -P 0x3c 0 1M", "flush", "read -P 0x3c 0 1M"]);
    p.wait_in_sync(0);
    p.down();
    assert_eq!(hash_file(&p.backing(0)), hash_file(&p.backing(1)));
}
