//! `blkrep baseline save|diff|list`: what a node looked like before a change —
//! configuration, replication state, and a content summary (blake3 of every extent of the
//! backing) — and what changed since.
//!
//! Baselines are JSON files in `EVENTS.baselines/` beside the node's event log, each
//! versioned and checksummed like every other file blkrep writes.

use crate::sealed::Sealed;
use crate::{human, md};
use anyhow::{bail, Context};
use blkrep_common::config::Config;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::io::Read;
use std::path::PathBuf;

const VERSION: u32 = 1;

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Baseline {
    pub v: u32,
    pub name: String,
    pub saved_at: String,
    pub resource: String,
    pub node: String,
    pub config_hash: String,
    pub config: String,
    /// Role, disk state, generation, applied sequence (from the daemon, else the metadata).
    pub state: State,
    pub content: Content,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sum: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct State {
    /// `daemon` or `metadata`.
    pub source: String,
    pub role: String,
    pub disk_state: String,
    pub generation: String,
    /// Stream position: the last sequence issued (primary) or applied (secondary).
    pub seq: u64,
    /// The link, when a daemon answered.
    #[serde(default)]
    pub conn: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Content {
    pub size: u64,
    pub extent_bytes: u64,
    /// blake3 (hex) of each extent of the volume on this node's backing.
    pub extents: Vec<String>,
}

impl Sealed for Baseline {
    const DIGITS: usize = 16;
    fn sum_mut(&mut self) -> &mut Option<String> {
        &mut self.sum
    }
}

/// Where `node`'s baselines live.
pub fn dir(cfg: &Config, node: &str) -> anyhow::Result<PathBuf> {
    Ok(cfg.node(node)?.events.with_extension("baselines"))
}

fn state(cfg: &Config, node: &str, status: Option<&Value>) -> anyhow::Result<State> {
    let word = |v: &Value| v.as_str().unwrap_or("?").to_string();
    Ok(match status {
        Some(s) => {
            let e = &s["engine"];
            State {
                source: "daemon".into(),
                role: word(&e["role"]),
                disk_state: word(&e["disk_state"]),
                generation: format!("{:016x}", e["generation"].as_u64().unwrap_or(0)),
                seq: if e["role"] == "primary" {
                    e["last_seq"].as_u64().unwrap_or(0)
                } else {
                    e["applied_seq"].as_u64().unwrap_or(0)
                },
                conn: Some(word(&e["conn"])),
            }
        }
        None => {
            let m = md::read(cfg, node)?;
            // The same words the daemon's status uses (the enums' serde names).
            let word_of = |v: serde_json::Result<Value>| v.map(|v| word(&v)).unwrap_or_default();
            State {
                source: "metadata".into(),
                role: word_of(serde_json::to_value(m.role)),
                disk_state: word_of(serde_json::to_value(m.disk_state)),
                generation: format!("{:016x}", m.generation),
                seq: m.applied_seq,
                conn: None,
            }
        }
    })
}

fn content(cfg: &Config, node: &str, extent: u64, progress: bool) -> anyhow::Result<Content> {
    let me = cfg.node(node)?;
    let size = cfg.resource.size;
    let mut f = std::fs::File::open(&me.backing)
        .with_context(|| format!("backing {}", me.backing.display()))?;
    let mut buf = vec![0u8; (1 << 20).min(extent as usize)];
    let mut extents = Vec::new();
    let mut at = 0u64;
    let t0 = std::time::Instant::now();
    while at < size {
        let end = (at + extent).min(size);
        let mut h = blake3::Hasher::new();
        let mut pos = at;
        while pos < end {
            let n = ((end - pos) as usize).min(buf.len());
            f.read_exact(&mut buf[..n])
                .with_context(|| format!("reading {} at {pos}", me.backing.display()))?;
            h.update(&buf[..n]);
            pos += n as u64;
        }
        extents.push(h.finalize().to_hex().to_string());
        at = end;
        if progress {
            let rate = at as f64 / t0.elapsed().as_secs_f64().max(1e-3);
            eprint!(
                "\rhashing {} of {} ({}/s)",
                human::bytes(at),
                human::bytes(size),
                human::bytes(rate as u64)
            );
        }
    }
    if progress {
        eprintln!();
    }
    Ok(Content {
        size,
        extent_bytes: extent,
        extents,
    })
}

/// Take a baseline of `node` now.
pub fn take(
    cfg: &Config,
    node: &str,
    name: &str,
    status: Option<&Value>,
    extent: u64,
    progress: bool,
) -> anyhow::Result<Baseline> {
    if extent == 0 || !extent.is_multiple_of(4096) {
        bail!("--extent must be a positive multiple of 4096 bytes");
    }
    let now = blkrep_common::events::now_ms();
    let mut b = Baseline {
        v: VERSION,
        name: name.to_string(),
        saved_at: blkrep_common::events::rfc3339(now),
        resource: cfg.resource.name.clone(),
        node: node.to_string(),
        config_hash: cfg.hash.clone(),
        config: cfg.text.clone(),
        state: state(cfg, node, status)?,
        content: content(cfg, node, extent, progress)?,
        sum: None,
    };
    b.seal();
    Ok(b)
}

/// A name that is safe as a file name.
pub fn check_name(name: &str) -> anyhow::Result<()> {
    if name.is_empty()
        || name.len() > 64
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        || name.starts_with('.')
    {
        bail!("baseline name {name:?}: use letters, digits, '-', '_' and '.' (at most 64)");
    }
    Ok(())
}

pub fn save(cfg: &Config, node: &str, b: &Baseline, force: bool) -> anyhow::Result<PathBuf> {
    let d = dir(cfg, node)?;
    std::fs::create_dir_all(&d).with_context(|| format!("{}", d.display()))?;
    let path = d.join(format!("{}.json", b.name));
    if path.exists() && !force {
        bail!(
            "baseline {:?} exists ({}); choose another name or --force",
            b.name,
            path.display()
        );
    }
    let tmp = d.join(format!(".{}.json.tmp", b.name));
    std::fs::write(&tmp, serde_json::to_vec_pretty(b)?)?;
    std::fs::File::open(&tmp)?.sync_all()?;
    std::fs::rename(&tmp, &path)?;
    Ok(path)
}

pub fn load(cfg: &Config, node: &str, name: Option<&str>) -> anyhow::Result<Baseline> {
    let d = dir(cfg, node)?;
    let name = match name {
        Some(n) => n.to_string(),
        None => list(cfg, node)?
            .last()
            .map(|b| b.name.clone())
            .ok_or_else(|| anyhow::anyhow!("no baseline saved yet (`blkrep baseline save`)"))?,
    };
    let path = d.join(format!("{name}.json"));
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("baseline {name:?} ({})", path.display()))?;
    let b: Baseline = serde_json::from_str(&text)
        .with_context(|| format!("baseline {}: not a baseline", path.display()))?;
    if b.v != VERSION {
        bail!(
            "baseline {}: format version {} (this is {VERSION})",
            path.display(),
            b.v
        );
    }
    if !b.intact() {
        bail!(
            "baseline {}: checksum mismatch (damaged or edited)",
            path.display()
        );
    }
    Ok(b)
}

/// Every readable baseline, oldest first.
pub fn list(cfg: &Config, node: &str) -> anyhow::Result<Vec<Baseline>> {
    let d = dir(cfg, node)?;
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir(&d) else {
        return Ok(out);
    };
    for e in rd.flatten() {
        let p = e.path();
        let Some(name) = p.file_stem().and_then(|s| s.to_str()) else {
            continue;
        };
        if name.starts_with('.') || p.extension().is_none_or(|x| x != "json") {
            continue;
        }
        match load(cfg, node, Some(name)) {
            Ok(b) => out.push(b),
            Err(e) => eprintln!("blkrep: {e:#} (skipped)"),
        }
    }
    out.sort_by(|a, b| a.saved_at.cmp(&b.saved_at).then(a.name.cmp(&b.name)));
    Ok(out)
}

/// What changed between a baseline and now.
#[derive(Debug, Serialize)]
pub struct Diff {
    pub baseline: String,
    pub saved_at: String,
    pub config_changed: bool,
    pub config_only_then: Vec<String>,
    pub config_only_now: Vec<String>,
    /// `field: then → now` for each state field that changed.
    pub state_changes: Vec<String>,
    pub extents_total: usize,
    /// Byte ranges `[start, end)` of the extents whose content changed.
    pub extents_changed: Vec<(u64, u64)>,
}

pub fn diff(then: &Baseline, now: &Baseline) -> Diff {
    let only = |a: &str, b: &str| -> Vec<String> {
        let bl: Vec<&str> = b.lines().collect();
        a.lines()
            .filter(|l| !bl.contains(l))
            .map(|l| l.trim().to_string())
            .collect()
    };
    let mut state_changes = Vec::new();
    let (a, b) = (&then.state, &now.state);
    for (f, x, y) in [
        ("role", &a.role, &b.role),
        ("disk state", &a.disk_state, &b.disk_state),
        ("generation", &a.generation, &b.generation),
    ] {
        if x != y {
            state_changes.push(format!("{f}: {x} → {y}"));
        }
    }
    if a.seq != b.seq {
        state_changes.push(format!(
            "sequence: {} → {} ({:+})",
            a.seq,
            b.seq,
            b.seq as i128 - a.seq as i128
        ));
    }
    let e = then.content.extent_bytes;
    let comparable = then.content.extent_bytes == now.content.extent_bytes
        && then.content.size == now.content.size;
    let extents_changed = if comparable {
        then.content
            .extents
            .iter()
            .zip(&now.content.extents)
            .enumerate()
            .filter(|(_, (x, y))| x != y)
            .map(|(i, _)| (i as u64 * e, ((i as u64 + 1) * e).min(then.content.size)))
            .collect()
    } else {
        vec![(0, now.content.size)]
    };
    Diff {
        baseline: then.name.clone(),
        saved_at: then.saved_at.clone(),
        config_changed: then.config_hash != now.config_hash,
        config_only_then: only(&then.config, &now.config),
        config_only_now: only(&now.config, &then.config),
        state_changes,
        extents_total: then.content.extents.len(),
        extents_changed,
    }
}

pub fn render_diff(d: &Diff) -> String {
    let mut s = format!("since baseline {:?} ({}):\n", d.baseline, d.saved_at);
    if d.config_changed {
        s += "  configuration: CHANGED\n";
        for l in &d.config_only_then {
            s += &format!("    - {l}\n");
        }
        for l in &d.config_only_now {
            s += &format!("    + {l}\n");
        }
    } else {
        s += "  configuration: unchanged\n";
    }
    if d.state_changes.is_empty() {
        s += "  state: unchanged\n";
    } else {
        s += "  state:\n";
        for c in &d.state_changes {
            s += &format!("    {c}\n");
        }
    }
    let bytes: u64 = d.extents_changed.iter().map(|(a, b)| b - a).sum();
    s += &format!(
        "  content: {} of {} extents changed ({})\n",
        d.extents_changed.len(),
        d.extents_total,
        human::bytes(bytes)
    );
    for (a, b) in d.extents_changed.iter().take(20) {
        s += &format!("    [{a}, {b})\n");
    }
    if d.extents_changed.len() > 20 {
        s += &format!("    ... and {} more\n", d.extents_changed.len() - 20);
    }
    s
}
