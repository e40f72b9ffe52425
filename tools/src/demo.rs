//! `blkrep-tools demo`: the main job on an embedded default. Two nodes on loopback with
//! sparse backing files in a temporary directory, a workload through the primary's NBD
//! export, checks of the replica, and a planned switchover — narrated step by step.
//!
//! It drives the real `blkrep` command (found next to this binary, or in `$BLKREP`), which
//! starts real `blkrepd` daemons; nothing here is simulated.

use anyhow::{bail, Context};
use blkrep_tools::compare::{compare_files, hash_file, DEFAULT_EXTENT};
use blkrep_tools::nbd_client::NbdClient;
use blkrep_tools::workload::{self, verify_image, WorkloadSpec, WriteLog};
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

/// What the demo needs to know.
pub struct DemoArgs {
    pub dir: Option<PathBuf>,
    pub size: u64,
    pub mode: String,
    pub ops: u64,
    pub keep: bool,
}

struct Demo {
    dir: PathBuf,
    config: PathBuf,
    blkrep: PathBuf,
    t0: Instant,
    checks: Vec<(String, bool)>,
}

const NODES: [&str; 2] = ["alpha", "beta"];

impl Demo {
    fn say(&self, msg: &str) {
        println!("[{:6.2}s] {msg}", self.t0.elapsed().as_secs_f64());
    }

    fn check(&mut self, what: &str, ok: bool) {
        println!("          {} {what}", if ok { "PASS" } else { "FAIL" });
        self.checks.push((what.to_string(), ok));
    }

    fn blkrep(&self, node: usize, args: &[&str]) -> anyhow::Result<String> {
        let out = Command::new(&self.blkrep)
            .arg("--config")
            .arg(&self.config)
            .arg("--node")
            .arg(NODES[node])
            .args(args)
            .output()
            .with_context(|| format!("running {}", self.blkrep.display()))?;
        if !out.status.success() {
            bail!(
                "blkrep --node {} {}: {}",
                NODES[node],
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn status(&self, node: usize) -> anyhow::Result<serde_json::Value> {
        Ok(serde_json::from_str(
            &self.blkrep(node, &["status", "--json"])?,
        )?)
    }

    fn socket(&self, node: usize) -> PathBuf {
        self.dir.join("run").join(format!("r0-{}.nbd", NODES[node]))
    }

    fn backing(&self, node: usize) -> PathBuf {
        self.dir.join(format!("{}.img", NODES[node]))
    }

    /// Wait until `primary`'s peer has applied everything; returns the seconds waited.
    fn wait_in_sync(&self, primary: usize) -> anyhow::Result<f64> {
        let t = Instant::now();
        loop {
            let s = self.status(primary)?;
            let e = &s["engine"];
            if e["conn"] == "connected"
                && e["lag_items"] == 0
                && e["resync"].is_null()
                && e["acked_seq"] == e["last_seq"]
            {
                return Ok(t.elapsed().as_secs_f64());
            }
            if t.elapsed() > Duration::from_secs(120) {
                bail!("the replica did not catch up within 120 s: {s:#}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn find_blkrep() -> anyhow::Result<PathBuf> {
    if let Ok(p) = std::env::var("BLKREP") {
        return Ok(p.into());
    }
    let p = std::env::current_exe()?.with_file_name("blkrep");
    if p.exists() {
        return Ok(p);
    }
    bail!("cannot find the blkrep binary next to blkrep-tools (set $BLKREP)")
}

/// Run the demo; Ok(true) when every check passed.
pub fn run(a: DemoArgs) -> anyhow::Result<bool> {
    let dir = match &a.dir {
        Some(d) => d.clone(),
        None => std::env::temp_dir().join(format!("blkrep-demo-{}", std::process::id())),
    };
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut d = Demo {
        config: dir.join("r0.toml"),
        dir,
        blkrep: find_blkrep()?,
        t0: Instant::now(),
        checks: Vec::new(),
    };
    let result = scenario(&mut d, &a);
    // Always stop the daemons, whatever happened.
    for n in 0..2 {
        let _ = d.blkrep(n, &["down", "--timeout", "30"]);
    }
    if let Err(e) = result {
        println!("demo stopped: {e:#}");
        println!("logs: {}", d.dir.join("run").display());
        return Ok(false);
    }
    let passed = d.checks.iter().filter(|c| c.1).count();
    println!();
    println!(
        "demo: {passed} of {} checks passed{}",
        d.checks.len(),
        if a.keep {
            format!(" (files kept in {})", d.dir.display())
        } else {
            String::new()
        }
    );
    let ok = passed == d.checks.len();
    if !a.keep && ok {
        let _ = std::fs::remove_dir_all(&d.dir);
    }
    Ok(ok)
}

fn scenario(d: &mut Demo, a: &DemoArgs) -> anyhow::Result<()> {
    let mut toml = format!(
        "[resource]\nname = \"r0\"\nsize = {}\nmode = \"{}\"\nrun_dir = \"{}\"\nfrontend = \"nbd\"\n",
        a.size,
        a.mode,
        d.dir.join("run").display()
    );
    for (i, n) in NODES.iter().enumerate() {
        let f = std::fs::File::create(d.backing(i))?;
        f.set_len(a.size)?;
        // The link is encrypted by default: each node gets a key and pins the other's.
        let out = Command::new(&d.blkrep)
            .args(["keygen", "--json", "--out"])
            .arg(d.dir.join(n))
            .output()
            .with_context(|| format!("running {} keygen", d.blkrep.display()))?;
        if !out.status.success() {
            bail!(
                "blkrep keygen: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        let k: serde_json::Value = serde_json::from_slice(&out.stdout)?;
        toml += &format!(
            "\n[[node]]\nname = \"{n}\"\naddress = \"127.0.0.1:{}\"\nbacking = \"{}\"\nmetadata = \"{}\"\nkey = {}\ncert = {}\nfingerprint = {}\n",
            free_port()?,
            d.backing(i).display(),
            d.dir.join(format!("{n}.md")).display(),
            k["key"],
            k["cert"],
            k["fingerprint"]
        );
    }
    std::fs::write(&d.config, &toml)?;
    d.say(&format!(
        "two nodes on loopback, {} MiB sparse backing files, {} mode, in {}",
        a.size >> 20,
        a.mode,
        d.dir.display()
    ));

    for n in 0..2 {
        d.blkrep(n, &["create-md"])?;
        let up = d.blkrep(n, &["up"])?;
        d.say(up.trim());
    }
    d.blkrep(0, &["promote", "--timeout", "30"])?;
    d.say("alpha promoted to primary; the new pair starts with a full sync to beta");
    let waited = d.wait_in_sync(0)?;
    d.say(&format!("initial full sync done in {waited:.2} s"));

    let spec = WorkloadSpec {
        seed: 2026,
        ops: a.ops,
        queue_depth: 16,
        size: 0,
        max_io: 256 << 10,
        flush_every: 200,
        fua_percent: 5,
        trim_percent: 5,
        zero_percent: 5,
        overlap_in_flight: false,
    };
    d.say(&format!(
        "running {} random writes/trims/zeroes/flushes (4K-256K, queue depth 16) on alpha's NBD export",
        a.ops
    ));
    let mut client = NbdClient::connect_unix(&d.socket(0), "r0")?;
    let mut log = WriteLog::new();
    let rep = workload::run(&mut client, &spec, Some(&mut log))?;
    client.disconnect()?;
    d.say(&format!(
        "workload: {} ops in {:.2} s ({:.0} IOPS, {:.1} MiB/s), {} errors",
        rep.ops, rep.seconds, rep.iops, rep.mib_per_sec, rep.errors
    ));
    d.check("every request of the workload succeeded", rep.errors == 0);
    println!("{}", indent(&d.blkrep(0, &["status"])?));

    let waited = d.wait_in_sync(0)?;
    d.say(&format!(
        "beta acknowledged every write {waited:.2} s after the workload ended"
    ));
    let cmp = compare_files(&d.backing(0), &d.backing(1), DEFAULT_EXTENT)?;
    d.say(&format!(
        "blake3 primary {}…, replica {}…",
        &cmp.hash_a[..16],
        &cmp.hash_b[..16]
    ));
    d.check(
        "replica is byte-identical to the primary (blake3)",
        cmp.equal,
    );
    let mut img = std::fs::File::open(d.backing(1))?;
    let v = verify_image(&mut img, &log, log.spec().unwrap_or(&spec))?;
    d.check(
        &format!(
            "replica matches the write-order log ({} blocks checked, {} mismatched)",
            v.checked, v.mismatched
        ),
        v.ok,
    );

    d.say("planned switchover: demote alpha, promote beta");
    d.blkrep(0, &["demote"])?;
    d.blkrep(1, &["promote", "--timeout", "30"])?;
    let mut c = NbdClient::connect_unix(&d.socket(1), "r0")?;
    let data = read_all(&mut c)?;
    let same = blake3::hash(&data).to_hex().to_string() == hash_file(&d.backing(0))?;
    d.check(
        "beta's export serves exactly the data alpha had (read back over NBD)",
        same,
    );
    let pattern = vec![0xd7u8; 1 << 20];
    let werr = c.write(0, &pattern, true)?.err();
    c.flush()?;
    c.disconnect()?;
    d.check("beta accepts writes as the new primary", werr.is_none());
    let waited = d.wait_in_sync(1)?;
    d.say(&format!("the write flowed back to alpha in {waited:.2} s"));
    let mut c = NbdClient::connect_unix(&d.socket(0), "r0")?;
    let back = c.read(0, 1 << 20)?;
    c.disconnect()?;
    d.check(
        "alpha (now secondary) holds beta's new write",
        back.as_deref().ok() == Some(&pattern[..]),
    );
    for n in 0..2 {
        d.blkrep(n, &["down"])?;
    }
    d.say("both daemons stopped cleanly");
    let cmp = compare_files(&d.backing(0), &d.backing(1), DEFAULT_EXTENT)?;
    d.check("after the switchover both images are identical", cmp.equal);
    Ok(())
}

fn read_all(c: &mut NbdClient) -> anyhow::Result<Vec<u8>> {
    let size = c.size();
    let mut out = Vec::with_capacity(size as usize);
    let chunk = 4u64 << 20;
    let mut off = 0;
    while off < size {
        let n = chunk.min(size - off) as u32;
        let b = c
            .read(off, n)?
            .map_err(|e| anyhow::anyhow!("read at {off} failed with errno {e}"))?;
        out.extend_from_slice(&b);
        off += u64::from(n);
    }
    Ok(out)
}

fn indent(s: &str) -> String {
    s.lines()
        .map(|l| format!("          {l}"))
        .collect::<Vec<_>>()
        .join("\n")
}
