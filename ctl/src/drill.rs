//! `blkrep drill`: a non-disruptive takeover test on the secondary, and its evidence.
//!
//! 1. preflight: the local daemon is a secondary with a consistent replica;
//! 2. RPO probe: the primary's lag, asked over the replication port just before the cut;
//! 3. cut: the daemon holds writes to the replica until those in flight complete, then
//!    exposes a copy-on-write clone of that image (ublk device where the kernel has ublk,
//!    NBD export always) while replication goes on into the replica;
//! 4. checks on the clone, as a takeover would need them: `mount` (the filesystem's
//!    journal replays into the clone), `probe` (the operator's command, e.g. start the
//!    database read-only), `fsck` (`e2fsck -fn`, after the replay);
//! 5. teardown, and the replication figures during the drill;
//! 6. the evidence: JSON (versioned, checksummed), Markdown and HTML, in the node's drill
//!    directory, listed by `blkrep drill --history`.
//!
//! RPO at the cut is an upper bound: the primary's lag when probed (the age of its oldest
//! write the replica had not acknowledged, so not in the clone), plus the time from the
//! probe to the cut. Each step's time is measured; the estimated RTO is what a takeover
//! would take the same way: the cut and clone (as a promotion), the mount, the probe.

use crate::check::{link_identity, peer_tls};
use crate::sealed::Sealed;
use anyhow::{bail, Context};
use blkrep_common::config::{Config, DRILL_CHECKS};
use blkrep_common::control::{self, CallError, DrillStarted, DrillStopped, Request};
use blkrep_common::events::{now_ms, rfc3339};
use blkrep_transport::probe::probe;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const VERSION: u32 = 1;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    Pass,
    Warn,
    Fail,
    Skip,
}

impl Outcome {
    fn word(self) -> &'static str {
        match self {
            Outcome::Pass => "pass",
            Outcome::Warn => "warn",
            Outcome::Fail => "FAIL",
            Outcome::Skip => "skip",
        }
    }
}

/// One step of the timeline.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Step {
    pub step: String,
    pub started_at: String,
    pub seconds: f64,
    pub result: Outcome,
    pub detail: String,
}

/// The recovery point at the cut.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Rpo {
    /// Upper bound of the data the clone lacks, in seconds of the primary's writes (None:
    /// not measured, see `note`).
    pub seconds_max: Option<f64>,
    /// The primary's lag when probed.
    pub primary_lag_seconds: Option<f64>,
    /// The primary's last issued sequence when probed.
    pub primary_last_seq: Option<u64>,
    /// Every item up to this sequence is in the clone.
    pub cut_applied_seq: u64,
    pub note: String,
}

/// The evidence report.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Report {
    pub v: u32,
    pub id: String,
    pub resource: String,
    pub node: String,
    pub peer: String,
    pub started_at: String,
    pub ended_at: String,
    pub verdict: Outcome,
    pub rpo: Rpo,
    /// Cut, mount and probe: what a takeover done the same way would take.
    pub rto_estimate_seconds: f64,
    pub total_seconds: f64,
    pub clone: Option<DrillStarted>,
    pub teardown: Option<DrillStopped>,
    pub steps: Vec<Step>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sum: Option<String>,
}

impl Sealed for Report {
    fn sum_mut(&mut self) -> &mut Option<String> {
        &mut self.sum
    }
}

/// What the operator asked for.
pub struct Opts {
    /// Checks to run (None: the configuration's).
    pub checks: Option<Vec<String>>,
    /// The probe command (None: the configuration's).
    pub probe: Option<String>,
    pub probe_timeout: Duration,
    pub json: bool,
}

struct Run {
    steps: Vec<Step>,
    quiet: bool,
}

impl Run {
    fn record(&mut self, step: &str, t: Instant, at: u64, result: Outcome, detail: String) {
        let s = Step {
            step: step.into(),
            started_at: rfc3339(at),
            seconds: t.elapsed().as_secs_f64(),
            result,
            detail,
        };
        if !self.quiet {
            println!(
                "  {:<10} {:<5} {:>8.3}s  {}",
                s.step,
                s.result.word(),
                s.seconds,
                s.detail
            );
            let _ = std::io::stdout().flush();
        }
        self.steps.push(s);
    }
}

fn call(cfg: &Config, node: &str, req: &Request) -> Result<Value, CallError> {
    control::call(&cfg.control_socket(node), req, Duration::from_secs(60))
}

/// `blkrep drill --abort`: end a drill left running.
pub fn abort(cfg: &Config, node: &str, json: bool) -> anyhow::Result<u8> {
    let v = call(
        cfg,
        node,
        &Request::DrillStop {
            outcome: Some("aborted by the operator".into()),
        },
    )
    .map_err(anyhow::Error::from)?;
    if json {
        println!("{v}");
    } else {
        println!("drill ended; its clone and store are removed");
    }
    Ok(0)
}

/// `blkrep drill`.
pub fn run(cfg: &Config, node: &str, opts: &Opts) -> anyhow::Result<u8> {
    let me = cfg.node(node)?;
    let peer = cfg.peer_of(node)?;
    let checks: Vec<String> = opts
        .checks
        .clone()
        .unwrap_or_else(|| cfg.drill.checks.clone());
    for c in &checks {
        if !DRILL_CHECKS.contains(&c.as_str()) {
            bail!("unknown check {c:?} (known: {})", DRILL_CHECKS.join(", "));
        }
    }
    let probe_cmd = opts.probe.clone().or_else(|| cfg.drill.probe.clone());
    let started_ms = now_ms();
    let t0 = Instant::now();
    let id = format!("drill-{}", compact_time(started_ms));
    let mut run = Run {
        steps: Vec::new(),
        quiet: opts.json,
    };
    if !opts.json {
        println!(
            "drill {id} of {} on {node} (secondary; primary {})",
            cfg.resource.name, peer.name
        );
    }

    // 1. preflight.
    let (t, at) = (Instant::now(), now_ms());
    let status = call(cfg, node, &Request::Status).map_err(|e| match e {
        CallError::NotRunning { .. } => anyhow::anyhow!(
            "the daemon of {node} is not running (`blkrep up`); a drill needs the live replica"
        ),
        e => e.into(),
    })?;
    let engine = &status["engine"];
    let conn_before = engine["conn"].as_str().unwrap_or("?").to_string();
    let applied_before = engine["applied_seq"].as_u64().unwrap_or(0);
    run.record(
        "preflight",
        t,
        at,
        Outcome::Pass,
        format!(
            "{} / {}, link {}, applied sequence {}",
            engine["role"].as_str().unwrap_or("?"),
            engine["disk_state"].as_str().unwrap_or("?"),
            conn_before,
            applied_before
        ),
    );

    // 2. the primary's lag, just before the cut.
    let (t, at) = (Instant::now(), now_ms());
    let probe_started = Instant::now();
    let mut rpo = Rpo::default();
    let primary = match peer_tls(me, peer) {
        Err(e) => Err(e),
        Ok(tls) => probe(
            &peer.address,
            &link_identity(cfg, me, peer),
            tls.as_ref(),
            Duration::from_secs(5),
            0,
        )
        .map_err(|e| e.to_string()),
    };
    let primary_state = primary.and_then(|r| {
        let v: Value = serde_json::from_str(&r.state).map_err(|e| e.to_string())?;
        // How old the published state was when the probe got it.
        let peer_now_ns = (now_ms() as i128) * 1_000_000 + i128::from(r.clock_offset_ns);
        let age = v["published_ns"]
            .as_u64()
            .map(|p| ((peer_now_ns - p as i128).max(0) as f64) / 1e9)
            .unwrap_or(0.1);
        Ok((v, age))
    });
    let (probe_outcome, probe_detail) = match &primary_state {
        Ok((v, age)) if v["role"] == "primary" => {
            let lag = v["lag_seconds"].as_f64().unwrap_or(0.0);
            rpo.primary_lag_seconds = Some(lag + age);
            rpo.primary_last_seq = v["last_seq"].as_u64();
            (
                Outcome::Pass,
                format!(
                    "{} is primary: lag {:.3}s, last sequence {}",
                    peer.name, lag, v["last_seq"]
                ),
            )
        }
        Ok((v, _)) => {
            rpo.primary_lag_seconds = Some(0.0);
            (
                Outcome::Pass,
                format!(
                    "{} is {} (no primary writes to lose)",
                    peer.name,
                    v["role"].as_str().unwrap_or("?")
                ),
            )
        }
        Err(e) => (
            Outcome::Warn,
            format!("{} did not answer ({e}): RPO not measured", peer.name),
        ),
    };
    run.record("rpo probe", t, at, probe_outcome, probe_detail);

    // 3. the cut and the clone.
    let (t, at) = (Instant::now(), now_ms());
    let clone: DrillStarted = match call(cfg, node, &Request::DrillStart) {
        Ok(v) => serde_json::from_value(v).context("the daemon's drill answer")?,
        // Refused (wrong role, no consistent image, a drill already running): no cut was
        // taken and nothing was tested, so there is no evidence to keep.
        Err(CallError::Refused(r)) if r.code != "drill_export" => {
            bail!("drill refused: {}", r.message)
        }
        Err(e) => {
            let why = e.to_string();
            run.record("cut", t, at, Outcome::Fail, why.clone());
            let _ = call(
                cfg,
                node,
                &Request::DrillStop {
                    outcome: Some(format!("failed: {why}")),
                },
            );
            return finish(
                cfg, node, opts, id, started_ms, t0, run, rpo, None, None, 0.0,
            );
        }
    };
    // From the probe to the cut, at most: the cut came before the clone's servers were
    // started, which took the answer's `seconds - hold_seconds`.
    let probe_to_cut =
        probe_started.elapsed().as_secs_f64() - (clone.seconds - clone.hold_seconds).max(0.0);
    rpo.cut_applied_seq = clone.cut_applied_seq;
    match rpo.primary_lag_seconds {
        Some(lag) => {
            let bound = lag + probe_to_cut.max(0.0);
            rpo.seconds_max = Some(bound);
            rpo.note = format!(
                "at most {bound:.3}s of the primary's writes are missing from the clone (its lag \
                 when probed, plus the time from the probe to the cut)"
            );
        }
        None => {
            rpo.note = "not measured: the primary did not answer the probe".into();
        }
    }
    let target = clone.device.clone().unwrap_or_else(|| clone.nbd.clone());
    run.record(
        "cut",
        t,
        at,
        Outcome::Pass,
        format!(
            "applied sequence {} ({}); writes held {:.1} ms ({} waited); clone on {}{}",
            clone.cut_applied_seq,
            clone.disk_state,
            clone.hold_seconds * 1e3,
            clone.held_writes,
            target,
            if clone.device.is_some() {
                format!(" and {}", clone.nbd)
            } else {
                String::new()
            }
        ),
    );
    let mut rto = run.steps.last().map_or(0.0, |s| s.seconds);

    // 4. checks.
    let device = clone.device.clone();
    let no_device = || {
        format!(
            "needs the clone as a block device: {}",
            clone.device_error.clone().unwrap_or_else(|| "none".into())
        )
    };
    let mut mounted: Option<PathBuf> = None;
    if checks.iter().any(|c| c == "mount") {
        let (t, at) = (Instant::now(), now_ms());
        match &device {
            None => run.record("mount", t, at, Outcome::Skip, no_device()),
            Some(dev) => match mount(cfg, node, dev) {
                Ok((dir, detail)) => {
                    run.record("mount", t, at, Outcome::Pass, detail);
                    rto += run.steps.last().map_or(0.0, |s| s.seconds);
                    mounted = Some(dir);
                }
                Err(e) => run.record("mount", t, at, Outcome::Fail, format!("{e:#}")),
            },
        }
    }
    if checks.iter().any(|c| c == "probe") {
        let (t, at) = (Instant::now(), now_ms());
        match &probe_cmd {
            None => run.record(
                "probe",
                t,
                at,
                Outcome::Skip,
                "no probe command (`--probe CMD` or drill.probe)".into(),
            ),
            Some(cmd) => {
                let r = run_probe(cmd, &clone, mounted.as_deref(), opts.probe_timeout);
                let ok = r.is_ok();
                run.record(
                    "probe",
                    t,
                    at,
                    if ok { Outcome::Pass } else { Outcome::Fail },
                    r.unwrap_or_else(|e| e),
                );
                if ok {
                    rto += run.steps.last().map_or(0.0, |s| s.seconds);
                }
            }
        }
    }
    if let Some(dir) = mounted.take() {
        let (t, at) = (Instant::now(), now_ms());
        match umount(&dir) {
            Ok(()) => run.record("umount", t, at, Outcome::Pass, dir.display().to_string()),
            Err(e) => run.record("umount", t, at, Outcome::Fail, format!("{e:#}")),
        }
    }
    if checks.iter().any(|c| c == "fsck") {
        let (t, at) = (Instant::now(), now_ms());
        match &device {
            None => run.record("fsck", t, at, Outcome::Skip, no_device()),
            Some(dev) => {
                let (o, d) = fsck(dev);
                run.record("fsck", t, at, o, d);
            }
        }
    }

    // 5. teardown.
    let (t, at) = (Instant::now(), now_ms());
    let failed = run.steps.iter().any(|s| s.result == Outcome::Fail);
    let outcome = format!(
        "verdict {}, RPO {}, estimated RTO {rto:.3}s",
        if failed { "FAIL" } else { "pass" },
        rpo.seconds_max
            .map_or("not measured".to_string(), |s| format!("<= {s:.3}s"))
    );
    let stopped: Option<DrillStopped> = match call(
        cfg,
        node,
        &Request::DrillStop {
            outcome: Some(outcome),
        },
    ) {
        Ok(v) => {
            let s: DrillStopped = serde_json::from_value(v).context("the daemon's answer")?;
            let (o, why) = match &s.broken {
                Some(b) => (
                    Outcome::Fail,
                    format!("the clone broke during the drill: {b}"),
                ),
                None => (Outcome::Pass, "clone removed".to_string()),
            };
            run.record(
                "teardown",
                t,
                at,
                o,
                format!(
                    "{why}; {} of the cut preserved, {} written by the checks",
                    crate::human::bytes(s.preserved_bytes),
                    crate::human::bytes(s.clone_written_bytes)
                ),
            );
            Some(s)
        }
        Err(e) => {
            run.record("teardown", t, at, Outcome::Fail, e.to_string());
            None
        }
    };

    // Replication went on.
    let (t, at) = (Instant::now(), now_ms());
    if let Ok(after) = call(cfg, node, &Request::Status) {
        let conn_after = after["engine"]["conn"].as_str().unwrap_or("?").to_string();
        let applied = stopped.as_ref().map_or(0, |s| s.applied_during);
        let o = if conn_before == "connected" && conn_after != "connected" {
            Outcome::Warn
        } else {
            Outcome::Pass
        };
        run.record(
            "replication",
            t,
            at,
            o,
            format!(
                "link {conn_before} before, {conn_after} after; {applied} items applied to the \
                 replica during the drill"
            ),
        );
    }
    finish(
        cfg,
        node,
        opts,
        id,
        started_ms,
        t0,
        run,
        rpo,
        Some(clone),
        stopped,
        rto,
    )
}

#[allow(clippy::too_many_arguments)]
fn finish(
    cfg: &Config,
    node: &str,
    opts: &Opts,
    id: String,
    started_ms: u64,
    t0: Instant,
    run: Run,
    rpo: Rpo,
    clone: Option<DrillStarted>,
    teardown: Option<DrillStopped>,
    rto: f64,
) -> anyhow::Result<u8> {
    let me = cfg.node(node)?;
    let peer = cfg.peer_of(node)?;
    let failed = run.steps.iter().any(|s| s.result == Outcome::Fail);
    let mut report = Report {
        v: VERSION,
        id,
        resource: cfg.resource.name.clone(),
        node: node.into(),
        peer: peer.name.clone(),
        started_at: rfc3339(started_ms),
        ended_at: rfc3339(now_ms()),
        verdict: if failed { Outcome::Fail } else { Outcome::Pass },
        rpo,
        rto_estimate_seconds: rto,
        total_seconds: t0.elapsed().as_secs_f64(),
        clone,
        teardown,
        steps: run.steps,
        sum: None,
    };
    report.seal();
    let dir = cfg.drill_reports(me);
    let written = save(&dir, &report);
    if opts.json {
        let mut v = serde_json::to_value(&report)?;
        v["files"] = match &written {
            Ok(f) => serde_json::json!(f),
            Err(e) => serde_json::json!({ "error": format!("{e:#}") }),
        };
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!(
            "verdict: {}   RPO: {}   estimated RTO: {:.3}s   total {:.1}s",
            report.verdict.word().to_uppercase(),
            report
                .rpo
                .seconds_max
                .map_or("not measured".to_string(), |s| format!("<= {s:.3}s")),
            report.rto_estimate_seconds,
            report.total_seconds
        );
        match &written {
            Ok(files) => println!("evidence: {}", files.join(", ")),
            Err(e) => eprintln!("blkrep: cannot write the evidence report: {e:#}"),
        }
    }
    written?;
    Ok(failed as u8)
}

fn compact_time(ms: u64) -> String {
    // 2026-11-25T16:54:09.904Z → 20261125T165409Z
    let s = rfc3339(ms);
    let digits: String = s[..19].chars().filter(|c| *c != '-' && *c != ':').collect();
    format!("{digits}Z")
}

fn save(dir: &Path, r: &Report) -> anyhow::Result<Vec<String>> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut files = Vec::new();
    for (ext, text) in [
        ("json", serde_json::to_string_pretty(r)? + "\n"),
        ("md", markdown(r)),
        ("html", html(r)),
    ] {
        let path = dir.join(format!("{}.{ext}", r.id));
        let tmp = path.with_extension(format!("{ext}.tmp"));
        let mut f =
            std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, &path)?;
        files.push(path.display().to_string());
    }
    Ok(files)
}

fn rpo_line(r: &Report) -> String {
    match r.rpo.seconds_max {
        Some(s) => format!("≤ {s:.3} s"),
        None => "not measured".into(),
    }
}

/// The human-readable report.
pub fn markdown(r: &Report) -> String {
    let mut o = String::new();
    o += &format!(
        "# DR drill {} — {}\n\n",
        r.id,
        r.verdict.word().to_uppercase()
    );
    o += &format!(
        "Resource **{}**, replica on **{}** (primary **{}**), {} to {}.\n\n",
        r.resource, r.node, r.peer, r.started_at, r.ended_at
    );
    o += "| figure | value |\n|---|---|\n";
    o += &format!("| verdict | **{}** |\n", r.verdict.word().to_uppercase());
    o += &format!("| RPO at the cut | {} |\n", rpo_line(r));
    o += &format!(
        "| estimated RTO (cut + mount + probe) | {:.3} s |\n",
        r.rto_estimate_seconds
    );
    o += &format!("| drill duration | {:.1} s |\n", r.total_seconds);
    if let Some(c) = &r.clone {
        o += &format!(
            "| cut | applied sequence {}, generation {:016x}, {} |\n",
            c.cut_applied_seq, c.generation, c.disk_state
        );
        o += &format!(
            "| writes held for the cut | {:.1} ms ({} writes) |\n",
            c.hold_seconds * 1e3,
            c.held_writes
        );
        o += &format!(
            "| clone | {} |\n",
            c.device.clone().unwrap_or_else(|| c.nbd.clone())
        );
    }
    if let Some(t) = &r.teardown {
        o += &format!(
            "| replication during the drill | {} items applied to the replica |\n",
            t.applied_during
        );
    }
    o += &format!("\nRPO: {}\n\n## Timeline\n\n", r.rpo.note);
    o += "| started | step | result | seconds | detail |\n|---|---|---|---:|---|\n";
    for s in &r.steps {
        o += &format!(
            "| {} | {} | {} | {:.3} | {} |\n",
            s.started_at,
            s.step,
            s.result.word(),
            s.seconds,
            s.detail.replace('|', "\\|").replace('\n', " ")
        );
    }
    o += &format!(
        "\nReport checksum (blake3 of the JSON without `sum`): `{}`\n",
        r.sum.clone().unwrap_or_default()
    );
    o
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// The same report as a self-contained HTML page.
pub fn html(r: &Report) -> String {
    let mut o = String::from("<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>");
    o += &esc(&format!("DR drill {} {}", r.id, r.verdict.word()));
    o += "</title><style>body{font-family:sans-serif;max-width:70em;margin:2em auto}\
          table{border-collapse:collapse}td,th{border:1px solid #999;padding:.3em .6em;\
          text-align:left}.pass{color:#060}.fail,.FAIL{color:#a00;font-weight:bold}\
          .warn,.skip{color:#a60}</style></head><body>\n";
    o += &format!(
        "<h1>DR drill {} — <span class=\"{}\">{}</span></h1>\n",
        esc(&r.id),
        r.verdict.word(),
        r.verdict.word().to_uppercase()
    );
    o += &format!(
        "<p>Resource <b>{}</b>, replica on <b>{}</b> (primary <b>{}</b>), {} to {}.</p>\n",
        esc(&r.resource),
        esc(&r.node),
        esc(&r.peer),
        esc(&r.started_at),
        esc(&r.ended_at)
    );
    o += "<table>\n";
    o += &format!(
        "<tr><th>RPO at the cut</th><td>{}</td></tr>\n",
        esc(&rpo_line(r))
    );
    o += &format!(
        "<tr><th>estimated RTO</th><td>{:.3} s</td></tr>\n<tr><th>drill duration</th><td>{:.1} s</td></tr>\n",
        r.rto_estimate_seconds, r.total_seconds
    );
    o += "</table>\n";
    o += &format!(
        "<p>RPO: {}</p>\n<h2>Timeline</h2>\n<table>\n",
        esc(&r.rpo.note)
    );
    o += "<tr><th>started</th><th>step</th><th>result</th><th>seconds</th><th>detail</th></tr>\n";
    for s in &r.steps {
        o += &format!(
            "<tr><td>{}</td><td>{}</td><td class=\"{}\">{}</td><td>{:.3}</td><td>{}</td></tr>\n",
            esc(&s.started_at),
            esc(&s.step),
            s.result.word(),
            s.result.word(),
            s.seconds,
            esc(&s.detail)
        );
    }
    o += &format!(
        "</table>\n<p><small>checksum {}</small></p>\n</body></html>\n",
        esc(&r.sum.clone().unwrap_or_default())
    );
    o
}

/// Tail of a command's output, for a step's detail.
fn tail(out: &[u8]) -> String {
    let s = String::from_utf8_lossy(out);
    let lines: Vec<&str> = s.lines().filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(4)..].join(" / ")
}

fn mount(cfg: &Config, node: &str, dev: &str) -> anyhow::Result<(PathBuf, String)> {
    let dir = cfg
        .resource
        .run_dir
        .join(format!("{}-{node}.drill-mnt", cfg.resource.name));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let out = Command::new("mount")
        .arg(dev)
        .arg(&dir)
        .stdin(Stdio::null())
        .output()
        .context("running mount")?;
    if !out.status.success() {
        let _ = std::fs::remove_dir(&dir);
        bail!(
            "mount {dev} failed ({}): {}",
            out.status,
            tail(&[out.stdout, out.stderr].concat())
        );
    }
    let entries = std::fs::read_dir(&dir)
        .map(|d| d.count())
        .with_context(|| format!("listing {}", dir.display()));
    match entries {
        Ok(n) => Ok((
            dir.clone(),
            format!("{dev} on {}: {n} entries in its root", dir.display()),
        )),
        Err(e) => {
            let _ = umount(&dir);
            Err(e)
        }
    }
}

fn umount(dir: &Path) -> anyhow::Result<()> {
    let out = Command::new("umount")
        .arg(dir)
        .stdin(Stdio::null())
        .output()
        .context("running umount")?;
    if !out.status.success() {
        bail!(
            "umount failed: {}",
            tail(&[out.stdout, out.stderr].concat())
        );
    }
    let _ = std::fs::remove_dir(dir);
    Ok(())
}

fn fsck(dev: &str) -> (Outcome, String) {
    match Command::new("e2fsck")
        .args(["-f", "-n", dev])
        .stdin(Stdio::null())
        .output()
    {
        Err(e) => (
            Outcome::Fail,
            format!("cannot run e2fsck ({e}); install e2fsprogs or leave fsck out of the checks"),
        ),
        Ok(out) if out.status.success() => (
            Outcome::Pass,
            format!("e2fsck -fn {dev}: clean ({})", tail(&out.stdout)),
        ),
        Ok(out) => (
            Outcome::Fail,
            format!(
                "e2fsck -fn {dev}: {} — {}",
                out.status,
                tail(&[out.stdout, out.stderr].concat())
            ),
        ),
    }
}

fn run_probe(
    cmd: &str,
    clone: &DrillStarted,
    mounted: Option<&Path>,
    timeout: Duration,
) -> Result<String, String> {
    let mut c = Command::new("sh");
    c.arg("-c")
        .arg(cmd)
        .env("BLKREP_DRILL_NBD", &clone.nbd)
        .env("BLKREP_DRILL_DEVICE", clone.device.as_deref().unwrap_or(""))
        .env(
            "BLKREP_DRILL_MOUNT",
            mounted.map(|m| m.display().to_string()).unwrap_or_default(),
        )
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = c.spawn().map_err(|e| format!("cannot run sh: {e}"))?;
    let t = Instant::now();
    loop {
        match child.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) if t.elapsed() > timeout => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "`{cmd}` did not finish within {}s (killed)",
                    timeout.as_secs()
                ));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => return Err(format!("waiting for `{cmd}`: {e}")),
        }
    }
    let out = child
        .wait_with_output()
        .map_err(|e| format!("`{cmd}`: {e}"))?;
    let text = tail(&[out.stdout, out.stderr].concat());
    if out.status.success() {
        Ok(format!(
            "`{cmd}`: exit 0{}",
            if text.is_empty() {
                String::new()
            } else {
                format!(" — {text}")
            }
        ))
    } else {
        Err(format!("`{cmd}`: {} — {text}", out.status))
    }
}

/// `blkrep drill --history`.
pub fn history(cfg: &Config, node: &str, json: bool) -> anyhow::Result<u8> {
    let me = cfg.node(node)?;
    let dir = cfg.drill_reports(me);
    let mut reports = Vec::new();
    let mut bad = Vec::new();
    if let Ok(rd) = std::fs::read_dir(&dir) {
        let mut paths: Vec<PathBuf> = rd
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "json"))
            .collect();
        paths.sort();
        for p in paths {
            let parsed = std::fs::read_to_string(&p)
                .map_err(|e| e.to_string())
                .and_then(|t| serde_json::from_str::<Report>(&t).map_err(|e| e.to_string()))
                .and_then(|r| {
                    if r.v != VERSION {
                        Err(format!(
                            "report version {} (this blkrep reads {VERSION})",
                            r.v
                        ))
                    } else if !r.intact() {
                        Err("checksum mismatch: the report was altered or damaged".into())
                    } else {
                        Ok(r)
                    }
                });
            match parsed {
                Ok(r) => reports.push((p, r)),
                Err(e) => bad.push(format!("{}: {e}", p.display())),
            }
        }
    }
    if json {
        let list: Vec<Value> = reports
            .iter()
            .map(|(p, r)| {
                serde_json::json!({
                    "id": r.id,
                    "file": p.display().to_string(),
                    "started_at": r.started_at,
                    "verdict": r.verdict,
                    "rpo_seconds_max": r.rpo.seconds_max,
                    "rto_estimate_seconds": r.rto_estimate_seconds,
                    "total_seconds": r.total_seconds,
                    "steps": r.steps.iter().map(|s| (s.step.clone(), s.result)).collect::<Vec<_>>(),
                })
            })
            .collect();
        println!(
            "{}",
            serde_json::to_string_pretty(
                &serde_json::json!({ "drills": list, "unreadable": bad })
            )?
        );
    } else {
        if reports.is_empty() {
            println!("no drills recorded in {}", dir.display());
        } else {
            println!(
                "{:<24} {:<24} {:<7} {:>12} {:>10}  checks",
                "drill", "started", "verdict", "RPO", "RTO est."
            );
            for (_, r) in &reports {
                let checks: Vec<String> = r
                    .steps
                    .iter()
                    .filter(|s| matches!(s.step.as_str(), "mount" | "probe" | "fsck"))
                    .map(|s| format!("{} {}", s.step, s.result.word()))
                    .collect();
                println!(
                    "{:<24} {:<24} {:<7} {:>12} {:>9.3}s  {}",
                    r.id,
                    r.started_at,
                    r.verdict.word().to_uppercase(),
                    r.rpo
                        .seconds_max
                        .map_or("-".to_string(), |s| format!("<={s:.3}s")),
                    r.rto_estimate_seconds,
                    checks.join(", ")
                );
            }
        }
        for b in &bad {
            eprintln!("blkrep: skipped {b}");
        }
    }
    Ok(if bad.is_empty() { 0 } else { 1 })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compact_ids_sort_by_time() {
        assert_eq!(compact_time(0), "19700101T000000Z");
        assert!(compact_time(1_000) < compact_time(61_000));
    }
}
