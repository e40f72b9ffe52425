//! The client, the workload and the checkers against a real NBD server: qemu-nbd.
//! Skipped (with a printed reason) when qemu-nbd is not installed, unless `CI` is set.

use std::collections::HashMap;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use blkrep_tools::nbd_proto::*;
use blkrep_tools::workload::{run, verify_image, WorkloadSpec, WriteLog};
use blkrep_tools::{
    compare_files, hash_file, list_exports_unix, probe_option_unix, NbdClient, NbdClientError,
};

const SIZE: u64 = 64 << 20;

struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        let p = std::env::temp_dir().join(format!("blkrep-tools-it-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A qemu-nbd process, killed on drop.
struct QemuNbd(Child);

impl Drop for QemuNbd {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn qemu_nbd_available() -> bool {
    match Command::new("qemu-nbd")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
    {
        Ok(s) if s.success() => true,
        _ if std::env::var_os("CI").is_some() => {
            panic!("qemu-nbd is required in CI (install qemu-utils)")
        }
        _ => {
            eprintln!("SKIPPED: qemu-nbd not found (install qemu-utils to run this test)");
            false
        }
    }
}

/// Starts qemu-nbd with `args` and waits (bounded) until `ready` succeeds.
fn start<T>(args: &[&str], mut ready: impl FnMut() -> Result<T>) -> Result<(QemuNbd, T)> {
    let child = Command::new("qemu-nbd")
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .context("spawning qemu-nbd")?;
    let mut q = QemuNbd(child);
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if let Some(status) = q.0.try_wait()? {
            bail!("qemu-nbd exited early: {status}");
        }
        match ready() {
            Ok(t) => return Ok((q, t)),
            Err(e) if Instant::now() > deadline => {
                return Err(e.context("qemu-nbd did not become ready in 15 s"))
            }
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

fn pattern(tag: u64, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (tag as u8).wrapping_add((i as u8).wrapping_mul(13)) ^ (i >> 12) as u8)
        .collect()
}

/// Reads the whole export into `out` with 1 MiB reads, four in flight.
fn copy_export(c: &mut NbdClient, out: &Path) -> Result<Vec<u8>> {
    let mut image = vec![0u8; c.size() as usize];
    let chunk = 1u64 << 20;
    let mut offsets = HashMap::new();
    let mut next = 0u64;
    while next < c.size() || c.in_flight() > 0 {
        while next < c.size() && c.in_flight() < 4 {
            offsets.insert(c.submit_read(next, chunk as u32)?, next);
            next += chunk;
        }
        let (h, r) = c.wait_reply()?;
        let off = offsets.remove(&h).context("reply for a handle not sent")? as usize;
        let data = r
            .map_err(|e| anyhow::anyhow!("read failed with {}", errno_name(e)))?
            .context("no data")?;
        image[off..off + data.len()].copy_from_slice(&data);
    }
    std::fs::write(out, &image)?;
    Ok(image)
}

fn tools(args: &[&str]) -> Result<(i32, String)> {
    let out = Command::new(env!("CARGO_BIN_EXE_blkrep-tools"))
        .args(args)
        .output()?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    ensure!(out.status.code().is_some(), "blkrep-tools was killed");
    Ok((
        out.status.code().unwrap_or(-1),
        stdout + &String::from_utf8_lossy(&out.stderr),
    ))
}

#[test]
fn against_qemu_nbd() -> Result<()> {
    if !qemu_nbd_available() {
        return Ok(());
    }
    let dir = TempDir::new("qemu");
    let (file, sock) = (dir.path("disk.img"), dir.path("nbd.sock"));
    std::fs::File::create(&file)?.set_len(SIZE)?;
    let (file_s, sock_s) = (file.to_str().unwrap(), sock.to_str().unwrap());
    let (_server, exports) = start(
        &[
            "-t",
            "-f",
            "raw",
            "-x",
            "vol",
            "--discard=unmap",
            "-k",
            sock_s,
            file_s,
        ],
        || Ok(list_exports_unix(&sock)?),
    )?;
    assert_eq!(exports, ["vol"]);
    assert_eq!(probe_option_unix(&sock, 0x4242, b"x")?, [NBD_REP_ERR_UNSUP]);

    let e = NbdClient::connect_unix(&sock, "nope")
        .err()
        .context("unknown export accepted")?;
    assert!(
        matches!(
            e,
            NbdClientError::OptionRefused {
                code: NBD_REP_ERR_UNKNOWN,
                ..
            }
        ),
        "{e}"
    );
    assert!(
        e.to_string()
            .contains("export \"nope\" unknown (NBD_REP_ERR_UNKNOWN)"),
        "{e}"
    );

    let mut c = NbdClient::connect_unix(&sock, "vol")?;
    assert_eq!(c.size(), SIZE);
    let (min, pref, max) = c
        .block_size()
        .context("qemu-nbd sends NBD_INFO_BLOCK_SIZE")?;
    assert!(
        min <= 4096 && pref >= 512 && max >= 1 << 20,
        "{min} {pref} {max}"
    );
    let flags = c.transmission_flags();
    for f in [
        NBD_FLAG_SEND_FLUSH,
        NBD_FLAG_SEND_FUA,
        NBD_FLAG_SEND_TRIM,
        NBD_FLAG_SEND_WRITE_ZEROES,
    ] {
        assert_ne!(flags & f, 0, "flags 0x{flags:04x} lack 0x{f:04x}");
    }
    assert!(!c.read_only());

    // Pipelined writes, then pipelined reads matched by handle.
    let mut pending = HashMap::new();
    for i in 0..16u64 {
        pending.insert(
            c.submit_write(i * 65536, &pattern(i, 65536), i % 3 == 0)?,
            i,
        );
    }
    while let Some((h, r)) = (!pending.is_empty()).then(|| c.wait_reply()).transpose()? {
        assert_eq!(r, Ok(None));
        pending
            .remove(&h)
            .context("write acknowledged twice or never sent")?;
    }
    for i in 0..16u64 {
        pending.insert(c.submit_read(i * 65536, 65536)?, i);
    }
    while let Some((h, r)) = (!pending.is_empty()).then(|| c.wait_reply()).transpose()? {
        let i = pending.remove(&h).context("unknown read")?;
        assert_eq!(r, Ok(Some(pattern(i, 65536))), "read {i}");
    }
    assert_eq!(c.trim(0, 65536)?, Ok(()));
    assert_eq!(c.write_zeroes(65536, 65536, true)?, Ok(()));
    c.flush()?;
    assert_eq!(c.read(65536, 65536)?, Ok(vec![0u8; 65536]));
    let trimmed = c
        .read(0, 65536)?
        .map_err(|e| anyhow::anyhow!("read errno {e}"))?;
    assert!(
        trimmed == pattern(0, 65536) || trimmed == vec![0u8; 65536],
        "a trim leaves old data or zeroes"
    );
    c.disconnect()?;

    // The workload and its checker, on the file behind the server.
    let spec = WorkloadSpec {
        seed: 5,
        ops: 3000,
        queue_depth: 16,
        size: 0,
        max_io: 256 << 10,
        flush_every: 100,
        fua_percent: 5,
        trim_percent: 5,
        zero_percent: 5,
        overlap_in_flight: false,
    };
    let mut c = NbdClient::connect_unix(&sock, "vol")?;
    let mut log = WriteLog::new();
    let report = run(&mut c, &spec, Some(&mut log))?;
    assert_eq!((report.ops, report.errors), (3000, 0));
    let copy = dir.path("copy.img");
    let image = copy_export(&mut c, &copy)?;
    c.disconnect()?;
    let r = verify_image(&mut std::fs::File::open(&file)?, &log, &spec)?;
    assert!(r.ok && r.checked > 1000, "{r:?}");
    let cmp = compare_files(&file, &copy, 1 << 20)?;
    assert!(cmp.equal, "{cmp:?}");
    assert_eq!(hash_file(&file)?, blake3::hash(&image).to_hex().to_string());

    // The binary: verify, compare, hash; then a corrupted copy.
    let logf = dir.path("w.log");
    log.save(&logf)?;
    let (code, out) = tools(&["verify", "--image", file_s, "--log", logf.to_str().unwrap()])?;
    assert_eq!(code, 0, "{out}");
    let copy_s = copy.to_str().unwrap();
    assert_eq!(tools(&["compare", file_s, copy_s])?.0, 0);
    let blk = (0..image.len() / 4096)
        .find(|&b| &image[b * 4096..b * 4096 + 8] == b"BLKRWL01")
        .context("no written block")?;
    let mut bad = image.clone();
    bad[blk * 4096 + 777] ^= 0x10;
    std::fs::write(&copy, &bad)?;
    let (code, out) = tools(&["compare", file_s, copy_s, "--json"])?;
    assert_eq!(code, 1, "{out}");
    let json: serde_json::Value = serde_json::from_str(&out)?;
    let ext = (blk as u64 * 4096) >> 20 << 20;
    assert_eq!(
        json["differing_extents"],
        serde_json::json!([[ext, 1 << 20]])
    );
    let (code, out) = tools(&[
        "verify",
        "--image",
        copy_s,
        "--log",
        logf.to_str().unwrap(),
        "--json",
    ])?;
    assert_eq!(code, 1, "{out}");
    let json: serde_json::Value = serde_json::from_str(&out)?;
    assert_eq!(json["mismatched"], 1);
    assert_eq!(json["mismatches"][0]["offset"], blk as u64 * 4096);
    let (code, out) = tools(&["hash", file_s])?;
    assert_eq!(
        (code, out.split_whitespace().next()),
        (0, Some(hash_file(&file)?.as_str()))
    );

    // The binary's workload over the Unix URI.
    let uri = format!("nbd+unix:///vol?socket={sock_s}");
    let log2 = dir.path("w2.log");
    let (code, out) = tools(&[
        "workload",
        "--uri",
        &uri,
        "--seed",
        "9",
        "--ops",
        "500",
        "--qd",
        "4",
        "--size",
        "16M",
        "--log",
        log2.to_str().unwrap(),
        "--json",
    ])?;
    assert_eq!(code, 0, "{out}");
    assert_eq!(serde_json::from_str::<serde_json::Value>(&out)?["ops"], 500);
    let (code, out) = tools(&["verify", "--image", file_s, "--log", log2.to_str().unwrap()])?;
    assert_eq!(code, 0, "{out}");
    Ok(())
}

#[test]
fn read_only_export_over_tcp() -> Result<()> {
    if !qemu_nbd_available() {
        return Ok(());
    }
    let dir = TempDir::new("tcp");
    let file = dir.path("ro.img");
    let data = pattern(3, 4 << 20);
    std::fs::write(&file, &data)?;
    // A free port: bind port 0, note it, release it for qemu-nbd.
    let port = TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port()
        .to_string();
    let addr = format!("127.0.0.1:{port}");
    let (_server, mut c) = start(
        &[
            "-t",
            "-r",
            "-f",
            "raw",
            "-x",
            "ro",
            "-b",
            "127.0.0.1",
            "-p",
            &port,
            file.to_str().unwrap(),
        ],
        || Ok(NbdClient::connect_tcp(&addr, "ro")?),
    )?;
    assert!(c.read_only());
    assert_eq!(c.size(), 4 << 20);
    assert_eq!(c.read(4096, 8192)?, Ok(data[4096..12288].to_vec()));
    // The server must fail writes to a read-only export (the client still sends them). The
    // spec says it SHOULD use EPERM; qemu-nbd answers EINVAL.
    let r = c.write(0, &[1u8; 4096], false)?;
    assert!(r == Err(NBD_EPERM) || r == Err(NBD_EINVAL), "{r:?}");
    let e = run(&mut c, &WorkloadSpec::default(), None).unwrap_err();
    assert!(e.to_string().contains("read-only"), "{e}");
    c.disconnect()?;
    assert_eq!(std::fs::read(&file)?, data);
    Ok(())
}
