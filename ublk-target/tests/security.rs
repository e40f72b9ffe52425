//! The encrypted, authenticated link on two real daemons: strangers, plaintext peers and
//! unpinned keys are refused and logged; tampered, truncated and reset streams are dropped
//! without applying anything, and the pair recovers; `insecure = true` is flagged.

mod common;
use blkrep_transport::handshake::{client_handshake, LinkIdentity};
use blkrep_transport::tls::{keygen, Fingerprint, TlsFiles, TlsSetup};
use common::*;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::time::Duration;

const MIB: u64 = 1 << 20;

fn cert_fp(p: &Pair, i: usize) -> Fingerprint {
    let der = blkrep_transport::tls::load_cert(&p.dir.path().join(format!("{}.crt", p.names[i])))
        .unwrap();
    Fingerprint::of(&der)
}

/// A TLS setup with a fresh key that nobody pins, pinning `peer`.
fn stranger_tls(dir: &Path, peer: Fingerprint) -> TlsSetup {
    let k = keygen("mallory").unwrap();
    std::fs::write(dir.join("mallory.crt"), &k.cert_pem).unwrap();
    std::fs::write(dir.join("mallory.key"), &k.key_pem).unwrap();
    TlsSetup::load(&TlsFiles {
        cert: &dir.join("mallory.crt"),
        key: &dir.join("mallory.key"),
        own: k.fingerprint,
        peer,
    })
    .unwrap()
}

fn zeroes(path: &Path, len: usize) -> bool {
    let data = std::fs::read(path).unwrap();
    data[..len].iter().all(|b| *b == 0)
}

#[test]
fn strangers_plaintext_peers_and_unpinned_keys_are_refused() {
    if !require_qemu() {
        return;
    }
    let p = Pair::new("tls-strangers", "async", 16 * MIB);
    p.start(0);
    for i in 0..2 {
        let id = LinkIdentity {
            resource: "r0".into(),
            local_node: p.names[1 - i].into(),
            peer_node: p.names[i].into(),
        };
        // Garbage: dropped, at most a TLS alert comes back, never a blkrep answer.
        let mut s = TcpStream::connect(&p.addrs[i]).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(b"GET / HTTP/1.0\r\n\r\nhello there, this is not blkrep")
            .unwrap();
        let mut answer = Vec::new();
        let _ = s.read_to_end(&mut answer);
        assert!(!answer.windows(8).any(|w| w == b"BLKRPLNK"), "{answer:?}");
        // A plaintext blkrep peer with the right names: refused, and told why in the log.
        let mut s = TcpStream::connect(&p.addrs[i]).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        assert!(client_handshake(&mut s, &id).is_err());
        // A TLS peer with a key nobody pinned: refused by the pin.
        let t = stranger_tls(p.dir.path(), cert_fp(&p, i));
        let mut s = TcpStream::connect(&p.addrs[i]).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let accepted = t.connect(&mut s).and_then(|mut c| {
            // TLS 1.3: the listener checks the client certificate after the client
            // finished, so the refusal shows on the first read.
            let mut st = blkrep_transport::tls::TlsStream {
                conn: &mut c,
                sock: &mut s,
            };
            client_handshake(&mut st, &id)
                .map_err(|e| blkrep_transport::tls::TlsError::Handshake(e.to_string()))
        });
        assert!(accepted.is_err(), "an unpinned key got through");
        p.wait_log(
            i,
            &[
                "does not speak TLS",
                "speaks plaintext",
                "the configuration pins",
            ],
        );
    }
    // Nothing of that disturbed the pair.
    let s = p.status(0);
    assert_eq!(s["engine"]["conn"], "connected", "{s:#}");
    assert!(s["link_security"].as_str().unwrap().starts_with("tls"));
    p.qemu_io_ok(0, &["write -P 0x3c 0 1M", "flush", "read -P 0x3c 0 1M"]);
    p.wait_in_sync(0);
    p.down();
    assert_eq!(hash_file(&p.backing(0)), hash_file(&p.backing(1)));
}

/// Replace node `i`'s key lines in a copy of the configuration with a new key's.
fn config_with_new_key(p: &Pair, i: usize) -> std::path::PathBuf {
    let text = std::fs::read_to_string(&p.config).unwrap();
    let lines = common::keygen(&p.dir.path().join(format!("{}-new", p.names[i])));
    // Node sections follow the resource; node i's is the (i+1)-th "[[node]]".
    let mut parts: Vec<String> = text.split("[[node]]").map(String::from).collect();
    let sec = &mut parts[i + 1];
    let kept: Vec<&str> = sec
        .lines()
        .filter(|l| {
            !["key =", "cert =", "fingerprint ="]
                .iter()
                .any(|k| l.starts_with(k))
        })
        .collect();
    *sec = kept.join("\n") + "\n" + &lines;
    let path = p.dir.path().join(format!("r0-{}-newkey.toml", p.names[i]));
    std::fs::write(&path, parts.join("[[node]]")).unwrap();
    path
}

fn blkrep_cfg(p: &Pair, cfg: &Path, i: usize, args: &[&str]) {
    let out = p.blkrep_with(cfg, i, args);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_peer_with_the_wrong_key_gets_nothing() {
    if !require_qemu() {
        return;
    }
    let p = Pair::new("tls-wrongkey", "async", 16 * MIB);
    p.start(0);
    p.down();
    // beta comes back with a new key that alpha's configuration does not pin.
    let beta_cfg = config_with_new_key(&p, 1);
    blkrep_cfg(&p, &beta_cfg, 1, &["up"]);
    p.ok(0, &["up"]);
    p.ok(0, &["promote", "--force"]);
    p.qemu_io_ok(0, &["write -P 0x77 0 2M", "flush"]);
    // alpha dials, sees an unpinned certificate and refuses; status says why.
    let s = p.wait_for(0, "a refused link in status", |s| {
        s["link_last_error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("pins"))
    });
    assert_ne!(s["engine"]["conn"], "connected", "{s:#}");
    let human = p.ok(0, &["status"]);
    assert!(human.contains("last link failure"), "{human}");
    std::thread::sleep(Duration::from_secs(2));
    assert_ne!(p.status(0)["engine"]["conn"], "connected");
    assert_ne!(p.status(1)["engine"]["conn"], "connected");
    // Nothing reached beta.
    p.ok(1, &["down"]);
    assert!(zeroes(&p.backing(1), 2 << 20), "data reached the wrong key");
    // With the right key it converges.
    p.ok(1, &["up"]);
    p.wait_in_sync(0);
    p.down();
    assert_eq!(hash_file(&p.backing(0)), hash_file(&p.backing(1)));
}

#[test]
fn tampered_truncated_and_reset_streams_are_dropped_and_the_pair_recovers() {
    if !require_qemu() {
        return;
    }
    let p = Pair::new("tls-tamper", "async", 32 * MIB);
    let px = p.insert_proxy();
    p.start(0);
    let connects = |p: &Pair| p.status(0)["engine"]["connects"].as_u64().unwrap();
    let c0 = connects(&p);
    // One flipped bit in the middle of the replication stream.
    px.corrupt_after(300_000);
    p.qemu_io_ok(0, &["write -P 0x11 0 8M", "flush"]);
    assert!(
        px.fault_done(),
        "the stream never reached the corrupted offset"
    );
    p.wait_log(1, &["TLS error", "none of it was applied"]);
    p.wait_in_sync(0);
    assert!(connects(&p) > c0, "the link was not re-established");
    // The stream cut in the middle of a record.
    let c1 = connects(&p);
    px.truncate_after(200_003);
    p.qemu_io_ok(0, &["write -P 0x22 4M 8M", "flush"]);
    assert!(px.fault_done());
    p.wait_in_sync(0);
    assert!(connects(&p) > c1);
    // A reset.
    let c2 = connects(&p);
    px.reset();
    p.qemu_io_ok(0, &["write -P 0x33 16M 4M", "flush"]);
    p.wait_in_sync(0);
    assert!(connects(&p) > c2);
    // The replica holds exactly the primary's data, and verify agrees.
    let out = p.blkrep(0, &["verify", "--json"]);
    assert!(
        out.status.success(),
        "verify: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    p.down();
    assert_eq!(hash_file(&p.backing(0)), hash_file(&p.backing(1)));
}

#[test]
fn insecure_is_flagged_and_mixed_configurations_refuse() {
    if !require_qemu() {
        return;
    }
    let p = Pair::new("insecure", "sync", 16 * MIB);
    let tls_cfg = p.dir.path().join("tls.toml");
    std::fs::copy(&p.config, &tls_cfg).unwrap();
    p.resource_line("insecure = true");
    p.start(0);
    let s = p.status(0);
    assert_eq!(s["link_security"], "insecure", "{s:#}");
    assert!(p.ok(0, &["status"]).contains("LINK INSECURE"));
    p.qemu_io_ok(0, &["write -P 0x5e 0 1M", "flush"]);
    p.wait_in_sync(0);
    p.down();
    assert_eq!(hash_file(&p.backing(0)), hash_file(&p.backing(1)));
    // beta requires TLS, alpha speaks plaintext: beta refuses.
    blkrep_cfg(&p, &tls_cfg, 1, &["up"]);
    p.ok(0, &["up"]);
    p.wait_log(1, &["speaks plaintext"]);
    assert_ne!(p.status(0)["engine"]["conn"], "connected");
    p.down();
    // The other way round: beta plaintext, alpha TLS.
    p.ok(1, &["up"]);
    blkrep_cfg(&p, &tls_cfg, 0, &["up"]);
    p.wait_log(1, &["the peer speaks TLS"]);
    assert_ne!(p.status(0)["engine"]["conn"], "connected");
    p.down();
}
