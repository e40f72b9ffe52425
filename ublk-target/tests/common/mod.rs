//! A pair of real daemons on loopback, driven through the real `blkrep` command.
#![allow(dead_code)]

pub mod proxy;

use serde_json::Value;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

/// Directory holding the workspace's built binaries (target/debug or target/release).
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test exe");
    let dir = exe
        .parent()
        .expect("deps")
        .parent()
        .expect("profile dir")
        .to_path_buf();
    for b in ["blkrep", "blkrepd"] {
        assert!(
            dir.join(b).exists(),
            "{} missing: build the workspace binaries first (cargo build --workspace --bins)",
            dir.join(b).display()
        );
    }
    dir
}

/// A free loopback port (bound and released; good enough for tests).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// qemu-io and qemu-img are there; without them a test is skipped, except in CI where
/// their absence is a failure (the install step is missing).
pub fn require_qemu() -> bool {
    if !have("qemu-io") || !have("qemu-img") {
        if std::env::var("CI").is_ok() {
            panic!("qemu-io/qemu-img missing in CI (install qemu-utils)");
        }
        eprintln!("skipping: qemu-io/qemu-img not installed (apt-get install qemu-utils)");
        return false;
    }
    true
}

pub fn have(tool: &str) -> bool {
    Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool} >/dev/null"))
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

pub struct Pair {
    pub dir: tempdir::Dir,
    pub config: PathBuf,
    pub size: u64,
    pub names: [&'static str; 2],
    pub addrs: [String; 2],
}

pub mod tempdir {
    use std::path::{Path, PathBuf};
    /// A temporary directory removed on drop.
    pub struct Dir(PathBuf);
    impl Dir {
        pub fn new(tag: &str) -> Dir {
            let p = std::env::temp_dir().join(format!(
                "blkrep-test-{tag}-{}-{}",
                std::process::id(),
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_nanos()
            ));
            std::fs::create_dir_all(&p).unwrap();
            Dir(p)
        }
        pub fn path(&self) -> &Path {
            &self.0
        }
    }
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// `blkrep keygen --out PREFIX`: the TOML lines it prints for the node's section.
pub fn keygen(prefix: &Path) -> String {
    let out = Command::new(bin_dir().join("blkrep"))
        .arg("keygen")
        .arg("--out")
        .arg(prefix)
        .output()
        .expect("run blkrep keygen");
    assert!(
        out.status.success(),
        "keygen: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = text
        .lines()
        .filter(|l| {
            ["key =", "cert =", "fingerprint ="]
                .iter()
                .any(|k| l.starts_with(k))
        })
        .collect();
    assert_eq!(lines.len(), 3, "keygen printed: {text}");
    lines.join("\n") + "\n"
}

impl Pair {
    /// Write a config for two nodes with sparse backing files of `size` bytes.
    pub fn new(tag: &str, mode: &str, size: u64) -> Pair {
        Self::with_node_extra(tag, mode, size, ["", ""])
    }

    /// Like [`Pair::new`], with extra TOML lines for each node's section.
    pub fn with_node_extra(tag: &str, mode: &str, size: u64, extra: [&str; 2]) -> Pair {
        let dir = tempdir::Dir::new(tag);
        let d = dir.path();
        let names = ["alpha", "beta"];
        let addrs = [
            format!("127.0.0.1:{}", free_port()),
            format!("127.0.0.1:{}", free_port()),
        ];
        let mut toml = format!(
            "[resource]\nname = \"r0\"\nsize = {size}\nmode = \"{mode}\"\nrun_dir = \"{}\"\nfrontend = \"nbd\"\n",
            d.join("run").display()
        );
        for (i, n) in names.iter().enumerate() {
            let backing = d.join(format!("{n}.img"));
            std::fs::File::create(&backing)
                .unwrap()
                .set_len(size)
                .unwrap();
            toml += &format!(
                "\n[[node]]\nname = \"{n}\"\naddress = \"{}\"\nbacking = \"{}\"\nmetadata = \"{}\"\n{}{}\n",
                addrs[i],
                backing.display(),
                d.join(format!("{n}.md")).display(),
                keygen(&d.join(n)),
                extra[i]
            );
        }
        let config = d.join("r0.toml");
        std::fs::write(&config, toml).unwrap();
        Pair {
            dir,
            config,
            size,
            names,
            addrs,
        }
    }

    /// Route alpha's dialing through a fault-injecting proxy: beta listens on its own
    /// port, and its configured address (the one alpha dials) becomes the proxy's.
    pub fn insert_proxy(&self) -> proxy::Proxy {
        let px = proxy::Proxy::start(&self.addrs[1]);
        let text = std::fs::read_to_string(&self.config).unwrap();
        let old = format!("address = \"{}\"\n", self.addrs[1]);
        assert!(text.contains(&old));
        let text = text.replacen(
            &old,
            &format!(
                "address = \"{}\"\nlisten = \"{}\"\n",
                px.addr, self.addrs[1]
            ),
            1,
        );
        std::fs::write(&self.config, text).unwrap();
        px
    }

    /// Add a line to the `[resource]` section of the configuration.
    pub fn resource_line(&self, line: &str) {
        let text = std::fs::read_to_string(&self.config).unwrap();
        let text = text.replacen("[resource]\n", &format!("[resource]\n{line}\n"), 1);
        std::fs::write(&self.config, text).unwrap();
    }

    pub fn backing(&self, i: usize) -> PathBuf {
        self.dir.path().join(format!("{}.img", self.names[i]))
    }

    pub fn nbd_socket(&self, i: usize) -> PathBuf {
        self.dir
            .path()
            .join("run")
            .join(format!("r0-{}.nbd", self.names[i]))
    }

    pub fn nbd_uri(&self, i: usize) -> String {
        format!("nbd+unix:///r0?socket={}", self.nbd_socket(i).display())
    }

    /// Run `blkrep --config C --node N ARGS...`.
    pub fn blkrep(&self, i: usize, args: &[&str]) -> Output {
        self.blkrep_with(&self.config, i, args)
    }

    /// [`Pair::blkrep`] with another configuration file (one node's differing copy).
    pub fn blkrep_with(&self, config: &Path, i: usize, args: &[&str]) -> Output {
        let out = Command::new(bin_dir().join("blkrep"))
            .arg("--config")
            .arg(config)
            .arg("--node")
            .arg(self.names[i])
            .args(args)
            .env("BLKREPD", bin_dir().join("blkrepd"))
            .output()
            .expect("run blkrep");
        out
    }

    pub fn ok(&self, i: usize, args: &[&str]) -> String {
        let out = self.blkrep(i, args);
        assert!(
            out.status.success(),
            "blkrep {} {:?} failed: {}{}\nlog:\n{}",
            self.names[i],
            args,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            self.log(i)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn log(&self, i: usize) -> String {
        std::fs::read_to_string(
            self.dir
                .path()
                .join("run")
                .join(format!("r0-{}.log", self.names[i])),
        )
        .unwrap_or_default()
    }

    /// Wait until node `i`'s log contains every one of `what`.
    pub fn wait_log(&self, i: usize, what: &[&str]) {
        let t0 = Instant::now();
        loop {
            let log = self.log(i);
            if what.iter().all(|w| log.contains(w)) {
                return;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(30),
                "{what:?} never logged on {}:\n{log}",
                self.names[i]
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn status(&self, i: usize) -> Value {
        let out = self.blkrep(i, &["status", "--json"]);
        serde_json::from_slice(&out.stdout).unwrap_or(Value::Null)
    }

    /// create-md and up on both nodes, then promote `primary`.
    pub fn start(&self, primary: usize) {
        for i in 0..2 {
            self.ok(i, &["create-md"]);
            self.ok(i, &["up"]);
        }
        self.ok(primary, &["promote", "--timeout", "20"]);
        self.wait_in_sync(primary);
    }

    /// Wait until the primary's peer has applied everything (no lag, no resync).
    pub fn wait_in_sync(&self, primary: usize) {
        self.wait_for(primary, "peer in sync", |s| {
            let e = &s["engine"];
            e["conn"] == "connected"
                && e["lag_items"] == 0
                && e["resync"].is_null()
                && e["acked_seq"] == e["last_seq"]
        });
    }

    pub fn wait_for(&self, i: usize, what: &str, f: impl Fn(&Value) -> bool) -> Value {
        let t0 = Instant::now();
        loop {
            let s = self.status(i);
            if f(&s) {
                return s;
            }
            if t0.elapsed() > Duration::from_secs(60) {
                panic!(
                    "timed out waiting for {what} on {}: {s:#}\nlog:\n{}",
                    self.names[i],
                    self.log(i)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// kill -9 node `i`'s daemon and wait until it is gone.
    pub fn kill9(&self, i: usize) {
        let pid = self.status(i)["pid"].as_u64().expect("daemon running");
        let st = Command::new("kill")
            .args(["-9", &pid.to_string()])
            .status()
            .unwrap();
        assert!(st.success());
        let t0 = Instant::now();
        while Command::new("kill")
            .args(["-0", &pid.to_string()])
            .stderr(std::process::Stdio::null())
            .status()
            .unwrap()
            .success()
        {
            assert!(t0.elapsed() < Duration::from_secs(10), "pid {pid} lives on");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn down(&self) {
        for i in 0..2 {
            let _ = self.blkrep(i, &["down"]);
        }
    }

    pub fn qemu_io(&self, i: usize, cmds: &[&str]) -> Output {
        self.qemu_io_with(i, &[], cmds)
    }

    /// qemu-io with extra options (`-r` opens read-only, as a secondary's export needs).
    pub fn qemu_io_with(&self, i: usize, opts: &[&str], cmds: &[&str]) -> Output {
        let mut c = Command::new("qemu-io");
        c.args(opts).arg("-f").arg("raw").arg(self.nbd_uri(i));
        for cmd in cmds {
            c.arg("-c").arg(cmd);
        }
        c.output().expect("run qemu-io")
    }

    pub fn qemu_io_ok(&self, i: usize, cmds: &[&str]) {
        self.qemu_io_with_ok(i, &[], cmds)
    }

    pub fn qemu_io_with_ok(&self, i: usize, opts: &[&str], cmds: &[&str]) {
        let out = self.qemu_io_with(i, opts, cmds);
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            out.status.success()
                && !text.contains("Pattern verification failed")
                && !text.contains("failed"),
            "qemu-io on {} {:?}: {text}\nlog:\n{}",
            self.names[i],
            cmds,
            self.log(i)
        );
    }
}

impl Drop for Pair {
    fn drop(&mut self) {
        // Stop both daemons even when a test failed half-way.
        for i in 0..2 {
            let s = self.status(i);
            if let Some(pid) = s["pid"].as_u64() {
                let down = self.blkrep(i, &["down", "--timeout", "10"]);
                if !down.status.success() {
                    let _ = Command::new("kill").arg("-9").arg(pid.to_string()).status();
                }
            }
        }
    }
}

/// blake3 of a whole file.
pub fn hash_file(p: &Path) -> String {
    let data = std::fs::read(p).unwrap();
    blake3::hash(&data).to_hex().to_string()
}

/// `qemu-img compare` of two raw images: true when identical.
pub fn qemu_img_same(a: &Path, b: &Path) -> bool {
    let out = Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "raw"])
        .arg(a)
        .arg(b)
        .output()
        .unwrap();
    out.status.success()
}
