//! `blkrep check`: a read-only preflight of one node and its link to the peer, before any
//! change. Every item ends as pass, warn or fail with the reason; any fail makes the
//! command exit 1.

use crate::md;
use blkrep_common::config::{Config, NodeConfig};
use blkrep_engine::generations::{relate, Relation};
use blkrep_transport::handshake::LinkIdentity;
use blkrep_transport::probe::{probe, ProbeError, ProbeReport};
use blkrep_transport::tls::{TlsFiles, TlsSetup};
use serde::Serialize;
use serde_json::Value;
use std::io::{Read, Seek, SeekFrom};
use std::time::Duration;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    Pass,
    Warn,
    Fail,
}

#[derive(Clone, Debug, Serialize)]
pub struct Item {
    pub check: &'static str,
    pub result: Level,
    pub detail: String,
}

fn item(check: &'static str, result: Level, detail: impl Into<String>) -> Item {
    Item {
        check,
        result,
        detail: detail.into(),
    }
}

/// This node's TLS setup for talking to `peer` (None: an insecure pair).
pub fn peer_tls(me: &NodeConfig, peer: &NodeConfig) -> Result<Option<TlsSetup>, String> {
    match (&me.tls, &peer.tls) {
        (Some(mine), Some(theirs)) => TlsSetup::load(&TlsFiles {
            cert: &mine.cert,
            key: &mine.key,
            own: mine.fingerprint,
            peer: theirs.fingerprint,
        })
        .map(Some)
        .map_err(|e| format!("this node's TLS identity: {e}")),
        _ => Ok(None),
    }
}

/// Who this node is on the link to `peer`.
pub fn link_identity(cfg: &Config, me: &NodeConfig, peer: &NodeConfig) -> LinkIdentity {
    LinkIdentity {
        resource: cfg.resource.name.clone(),
        local_node: me.name.clone(),
        peer_node: peer.name.clone(),
    }
}

/// Run every check of `node`; `status` is its daemon's answer, when one runs.
pub fn run(cfg: &Config, node: &str, status: Option<&Value>, bandwidth_bytes: usize) -> Vec<Item> {
    let mut out = Vec::new();
    let (me, peer) = match (cfg.node(node), cfg.peer_of(node)) {
        (Ok(m), Ok(p)) => (m, p),
        (Err(e), _) | (_, Err(e)) => {
            out.push(item("configuration", Level::Fail, e.to_string()));
            return out;
        }
    };
    out.push(item(
        "configuration",
        Level::Pass,
        format!("{} (blake3 {})", cfg.path.display(), &cfg.hash[..16]),
    ));
    out.push(backing(cfg, me));
    let meta = md::read(cfg, node);
    out.push(match &meta {
        Ok(m) => item(
            "metadata",
            Level::Pass,
            format!(
                "{}: generation {:016x}, {:?}, {:?}, applied sequence {}",
                me.metadata.display(),
                m.generation,
                m.role,
                m.disk_state,
                m.applied_seq
            ),
        ),
        Err(e) => item("metadata", Level::Fail, format!("{e:#}")),
    });
    out.push(journal(me, status));
    out.push(match status {
        Some(s) => item(
            "daemon",
            Level::Pass,
            format!(
                "running (pid {}), {} / {}, link {}",
                s["pid"],
                s["engine"]["role"].as_str().unwrap_or("?"),
                s["engine"]["disk_state"].as_str().unwrap_or("?"),
                s["engine"]["conn"].as_str().unwrap_or("?")
            ),
        ),
        None => item(
            "daemon",
            Level::Warn,
            "not running (`blkrep up`); the peer is probed all the same",
        ),
    });

    // The peer, over its replication port, authenticated as the link is.
    let tls = match peer_tls(me, peer) {
        Ok(t) => t,
        Err(e) => {
            out.push(item("peer authenticated", Level::Fail, e));
            return out;
        }
    };
    let report = probe(
        &peer.address,
        &link_identity(cfg, me, peer),
        tls.as_ref(),
        Duration::from_secs(5),
        bandwidth_bytes,
    );
    // Only an unreachable peer or a broken exchange fails "peer reachable"; an
    // authentication failure means it answered.
    let at = format!("{} at {}", peer.name, peer.address);
    let (reach, detail) = match &report {
        Err(ProbeError::Unreachable(e)) => (Level::Fail, format!("{at}: {e}")),
        Err(ProbeError::Exchange(e)) => (Level::Fail, format!("{at}: the probe broke off: {e}")),
        Err(ProbeError::Auth(_)) | Ok(_) => (Level::Pass, at),
    };
    out.push(item("peer reachable", reach, detail));
    let r = match report {
        Ok(r) => r,
        Err(ProbeError::Auth(e)) => {
            out.push(item(
                "peer authenticated",
                Level::Fail,
                format!("{}: {e}", peer.name),
            ));
            return out;
        }
        Err(_) => return out,
    };
    out.push(item(
        "peer authenticated",
        if tls.is_some() {
            Level::Pass
        } else {
            Level::Warn
        },
        if tls.is_some() {
            format!("{}: {}", peer.name, r.security)
        } else {
            format!(
                "{}: PLAINTEXT, unauthenticated (resource.insecure = true)",
                peer.name
            )
        },
    ));
    out.push(config_match(cfg, &peer.name, &r));
    out.extend(link_figures(cfg, &r));
    out.push(generations(meta.ok().as_ref(), status, &peer.name, &r));
    out
}

fn backing(cfg: &Config, me: &NodeConfig) -> Item {
    let path = &me.backing;
    let want = cfg.resource.size;
    let mut f = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) => return item("backing", Level::Fail, format!("{}: {e}", path.display())),
    };
    let size = match f.seek(SeekFrom::End(0)) {
        Ok(s) => s,
        Err(e) => {
            return item(
                "backing",
                Level::Fail,
                format!("{}: size: {e}", path.display()),
            )
        }
    };
    if size < want {
        return item(
            "backing",
            Level::Fail,
            format!(
                "{} is {size} bytes, smaller than the volume (resource.size = {want})",
                path.display()
            ),
        );
    }
    let mut buf = vec![0u8; 4096];
    for at in [0, want - 4096] {
        if let Err(e) = f
            .seek(SeekFrom::Start(at))
            .and_then(|_| f.read_exact(&mut buf))
        {
            return item(
                "backing",
                Level::Fail,
                format!("{}: reading at {at}: {e}", path.display()),
            );
        }
    }
    item(
        "backing",
        Level::Pass,
        format!(
            "{}: {size} bytes (volume {want}), first and last block readable",
            path.display()
        ),
    )
}

fn journal(me: &NodeConfig, status: Option<&Value>) -> Item {
    let Some((path, size)) = &me.journal else {
        return item(
            "journal",
            Level::Pass,
            "none configured (an outage longer than the ship queue holds ends in a resync)",
        );
    };
    let j = status.map(|s| &s["engine"]["journal"]);
    match j.filter(|j| !j.is_null()) {
        Some(j) => {
            let (used, cap) = (
                j["used"].as_u64().unwrap_or(0),
                j["capacity"].as_u64().unwrap_or(1).max(1),
            );
            let pct = used as f64 * 100.0 / cap as f64;
            item(
                "journal",
                if pct >= 80.0 {
                    Level::Warn
                } else {
                    Level::Pass
                },
                format!(
                    "{}: {pct:.1}% full ({used} of {cap} bytes), {}",
                    path.display(),
                    j["state"].as_str().unwrap_or("?")
                ),
            )
        }
        None => match std::fs::metadata(path) {
            Ok(m) if m.file_type().is_file() && m.len() < *size => item(
                "journal",
                Level::Warn,
                format!(
                    "{}: {} bytes, journal_size is {size} (the daemon grows it)",
                    path.display(),
                    m.len()
                ),
            ),
            Ok(_) => item(
                "journal",
                Level::Pass,
                format!("{}: present", path.display()),
            ),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => item(
                "journal",
                Level::Pass,
                format!(
                    "{}: not created yet (the daemon creates it)",
                    path.display()
                ),
            ),
            Err(e) => item("journal", Level::Fail, format!("{}: {e}", path.display())),
        },
    }
}

fn config_match(cfg: &Config, peer: &str, r: &ProbeReport) -> Item {
    let theirs = blake3::hash(r.config.as_bytes()).to_hex().to_string();
    if theirs == cfg.hash {
        return item(
            "configuration identical",
            Level::Pass,
            format!("same file on both nodes (blake3 {})", &cfg.hash[..16]),
        );
    }
    let mine: Vec<&str> = cfg.text.lines().collect();
    let other: Vec<&str> = r.config.lines().collect();
    let only = |a: &[&str], b: &[&str]| -> Vec<String> {
        a.iter()
            .filter(|l| !b.contains(l))
            .map(|l| format!("{:?}", l.trim()))
            .collect()
    };
    let (here, there) = (only(&mine, &other), only(&other, &mine));
    let list = |v: &[String]| {
        if v.is_empty() {
            "none (the same lines in another order)".to_string()
        } else {
            let mut s = v.iter().take(10).cloned().collect::<Vec<_>>().join(", ");
            if v.len() > 10 {
                s += &format!(" and {} more", v.len() - 10);
            }
            s
        }
    };
    item(
        "configuration identical",
        Level::Fail,
        format!(
            "differs from {peer}'s (blake3 {} here, {} there): only here: {}; only at {peer}: {}",
            &cfg.hash[..16],
            &theirs[..16],
            list(&here),
            list(&there)
        ),
    )
}

fn link_figures(cfg: &Config, r: &ProbeReport) -> Vec<Item> {
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let median = r.rtts[r.rtts.len() / 2];
    let sync = cfg.resource.mode == blkrep_engine::Mode::Sync;
    let mut v = vec![item(
        "link round trip",
        if sync && ms(median) > 10.0 {
            Level::Warn
        } else {
            Level::Pass
        },
        format!(
            "median {:.3} ms, min {:.3} ms over {} echoes{}",
            ms(median),
            ms(r.rtts[0]),
            r.rtts.len(),
            if sync && ms(median) > 10.0 {
                " (sync mode: every write waits for it)"
            } else {
                ""
            }
        ),
    )];
    if let Some(bw) = r.bandwidth {
        let limit = cfg.resource.replication_rate;
        v.push(item(
            "link bandwidth",
            if limit > 0 && bw < limit as f64 {
                Level::Warn
            } else {
                Level::Pass
            },
            format!(
                "{:.1} MiB/s to the peer{}",
                bw / (1 << 20) as f64,
                if limit > 0 && bw < limit as f64 {
                    format!(
                        " (below replication_rate {:.1} MiB/s)",
                        limit as f64 / (1 << 20) as f64
                    )
                } else {
                    String::new()
                }
            ),
        ));
    }
    let off = r.clock_offset_ns as f64 / 1e6;
    v.push(item(
        "clock offset",
        if off.abs() > 1000.0 {
            Level::Warn
        } else {
            Level::Pass
        },
        format!(
            "the peer's clock is {off:+.1} ms from this node's{}",
            if off.abs() > 1000.0 {
                " (over 1 s: RPO figures and event times compared across sites are off; run NTP)"
            } else {
                ""
            }
        ),
    ));
    v
}

fn generations(
    meta: Option<&blkrep_engine::meta::Metadata>,
    status: Option<&Value>,
    peer: &str,
    r: &ProbeReport,
) -> Item {
    let theirs: Value = serde_json::from_str(&r.state).unwrap_or(Value::Null);
    if theirs.is_null() {
        return item(
            "generations",
            Level::Warn,
            format!("{peer} has not published its state yet (its daemon just started?)"),
        );
    }
    let (mine_gen, mine_hist, mine_role): (u64, Vec<u64>, String) = match status {
        Some(s) => (
            s["engine"]["generation"].as_u64().unwrap_or(0),
            serde_json::from_value(s["engine"]["history"].clone()).unwrap_or_default(),
            s["engine"]["role"].as_str().unwrap_or("?").to_string(),
        ),
        None => match meta {
            Some(m) => (
                m.generation,
                m.history.clone(),
                serde_json::to_value(m.role)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_string))
                    .unwrap_or_default(),
            ),
            None => {
                return item(
                    "generations",
                    Level::Warn,
                    "not compared: this node's metadata is unreadable (see metadata)",
                )
            }
        },
    };
    let their_gen = theirs["generation"].as_u64().unwrap_or(0);
    let their_hist: Vec<u64> =
        serde_json::from_value(theirs["history"].clone()).unwrap_or_default();
    let their_role = theirs["role"].as_str().unwrap_or("?");
    if mine_role == "primary" && their_role == "primary" {
        return item(
            "generations",
            Level::Fail,
            format!("both this node and {peer} are primary"),
        );
    }
    let rel = relate(mine_gen, &mine_hist, their_gen, &their_hist);
    let what =
        format!("here {mine_gen:016x} ({mine_role}), {peer} {their_gen:016x} ({their_role})");
    match rel {
        Relation::Same => item(
            "generations",
            Level::Pass,
            format!("same data line: {what}"),
        ),
        Relation::PeerBehind => item(
            "generations",
            Level::Warn,
            format!("{peer} is behind and resyncs from here when connected: {what}"),
        ),
        Relation::PeerAhead => item(
            "generations",
            Level::Warn,
            format!("this node is behind and resyncs from {peer} when connected: {what}"),
        ),
        Relation::Diverged => item(
            "generations",
            Level::Fail,
            format!("split brain: both took writes separately ({what}); see `blkrep resolve`"),
        ),
    }
}

/// The table for a person.
pub fn render(items: &[Item]) -> String {
    let w = items.iter().map(|i| i.check.len()).max().unwrap_or(5);
    let mut s = String::new();
    for i in items {
        let tag = match i.result {
            Level::Pass => "pass",
            Level::Warn => "WARN",
            Level::Fail => "FAIL",
        };
        s += &format!("{tag}  {:<w$}  {}\n", i.check, i.detail);
    }
    let fails = items.iter().filter(|i| i.result == Level::Fail).count();
    let warns = items.iter().filter(|i| i.result == Level::Warn).count();
    s += &format!(
        "\n{}: {} checks, {fails} failed, {warns} warnings\n",
        if fails > 0 { "FAIL" } else { "OK" },
        items.len()
    );
    s
}
