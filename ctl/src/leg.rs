//! `blkrep leg`: the local legs of a volume (the backing and its mirror).

use crate::{call, human, Fail};
use blkrep_common::config::Config;
use blkrep_common::control::{LegAction, Request};
use clap::Subcommand;
use std::time::Duration;

/// What `blkrep leg` does.
#[derive(Subcommand)]
pub enum LegCmd {
    /// Take a leg out (writes go on to the other one and are tracked for its return).
    Detach {
        resource: Option<String>,
        /// The leg: 0 or `backing`, 1 or `mirror`.
        #[arg(long, value_parser = parse_leg)]
        leg: u8,
        #[arg(long)]
        json: bool,
    },
    /// Bring a failed or detached leg back: it is rebuilt online from the healthy leg,
    /// only the blocks written while it was away (all of it with --full); it serves no
    /// read until the rebuild is done. Waits and shows progress unless --no-wait.
    Attach {
        resource: Option<String>,
        #[arg(long, value_parser = parse_leg)]
        leg: u8,
        /// Copy all of it (the device's content is not trusted).
        #[arg(long)]
        full: bool,
        #[arg(long)]
        no_wait: bool,
        #[arg(long)]
        json: bool,
    },
    /// Put a new device in place of a leg: it is rebuilt in full, online. Set node.mirror
    /// (or node.backing) to the new path in the configuration too, on both sites.
    Replace {
        resource: Option<String>,
        #[arg(long, value_parser = parse_leg)]
        leg: u8,
        /// The new device or file (at least the volume's size).
        #[arg(long)]
        path: String,
        #[arg(long)]
        no_wait: bool,
        #[arg(long)]
        json: bool,
    },
    /// Testing only (the daemon needs BLKREP_FAULT_INJECTION=1): make a leg fail or hang
    /// the requests that touch a range.
    #[command(hide = true)]
    Fault {
        resource: Option<String>,
        #[arg(long, value_parser = parse_leg)]
        leg: u8,
        /// error, hang or clear.
        #[arg(long)]
        mode: String,
        /// read, write, flush (comma-separated).
        #[arg(long, value_delimiter = ',')]
        ops: Vec<String>,
        #[arg(long, default_value_t = 0)]
        offset: u64,
        /// 0: to the end.
        #[arg(long, default_value_t = 0)]
        len: u64,
        #[arg(long)]
        json: bool,
    },
}

impl LegCmd {
    pub fn resource(&self) -> Option<&str> {
        match self {
            LegCmd::Detach { resource, .. }
            | LegCmd::Attach { resource, .. }
            | LegCmd::Replace { resource, .. }
            | LegCmd::Fault { resource, .. } => resource.as_deref(),
        }
    }
}

fn parse_leg(s: &str) -> Result<u8, String> {
    match s {
        "0" | "backing" => Ok(0),
        "1" | "mirror" => Ok(1),
        _ => Err(format!("{s:?}: a leg is 0 (backing) or 1 (mirror)")),
    }
}

/// Run `blkrep leg ...`.
pub fn run(cfg: &Config, node: &str, cmd: LegCmd) -> Result<u8, Fail> {
    let (req, wait, json) = match cmd {
        LegCmd::Detach { leg, json, .. } => (
            Request::Leg {
                action: LegAction::Detach,
                leg,
                path: None,
                full: false,
            },
            None,
            json,
        ),
        LegCmd::Attach {
            leg,
            full,
            no_wait,
            json,
            ..
        } => (
            Request::Leg {
                action: LegAction::Attach,
                leg,
                path: None,
                full,
            },
            (!no_wait).then_some(leg),
            json,
        ),
        LegCmd::Replace {
            leg,
            path,
            no_wait,
            json,
            ..
        } => {
            let path = std::path::absolute(&path)
                .map(|p| p.display().to_string())
                .unwrap_or(path);
            (
                Request::Leg {
                    action: LegAction::Replace,
                    leg,
                    path: Some(path),
                    full: true,
                },
                (!no_wait).then_some(leg),
                json,
            )
        }
        LegCmd::Fault {
            leg,
            mode,
            ops,
            offset,
            len,
            json,
            ..
        } => (
            Request::LegFault {
                leg,
                mode,
                ops,
                offset,
                len,
            },
            None,
            json,
        ),
    };
    let v = call(cfg, node, &req)?;
    let Some(leg) = wait else {
        return Ok(crate::done(&v, json));
    };
    if !json {
        if let Some(m) = v["message"].as_str() {
            println!("{m}");
        }
    }
    let last = follow(cfg, node, leg, json)?;
    if json {
        println!("{last}");
    }
    if last["state"] == "healthy" {
        if !json {
            println!("leg {leg} is healthy");
        }
        Ok(0)
    } else {
        Err(anyhow::anyhow!(
            "leg {leg} is {}: {}",
            last["state"].as_str().unwrap_or("?"),
            last["reason"].as_str().unwrap_or("")
        )
        .into())
    }
}

/// Follow a rebuild (a bar on a terminal) until the leg is healthy or out again; returns
/// the leg's last status.
fn follow(cfg: &Config, node: &str, leg: u8, json: bool) -> Result<serde_json::Value, Fail> {
    use std::io::IsTerminal;
    let tty = std::io::stderr().is_terminal() && !json;
    let mut stalled_since: Option<std::time::Instant> = None;
    loop {
        let s = call(cfg, node, &Request::Status)?;
        let l = s["legs"][leg as usize].clone();
        if l.is_null() {
            return Err(anyhow::anyhow!("the daemon reports no leg {leg}").into());
        }
        if l["state"] != "rebuilding" {
            if tty {
                eprintln!();
            }
            return Ok(l);
        }
        if l["rebuild"].is_null() {
            // Rebuilding with no copy under way: no healthy leg to copy from.
            let t = *stalled_since.get_or_insert_with(std::time::Instant::now);
            if t.elapsed() > Duration::from_secs(5) {
                return Err(anyhow::anyhow!(
                    "the rebuild of leg {leg} does not progress: no healthy leg to copy from \
                     (see `blkrep status`)"
                )
                .into());
            }
        } else {
            stalled_since = None;
        }
        if tty {
            let r = &l["rebuild"];
            let (done, total) = (
                r["copied_bytes"].as_u64().unwrap_or(0),
                r["total_bytes"].as_u64().unwrap_or(0).max(1),
            );
            let secs = r["seconds"].as_f64().unwrap_or(0.0).max(0.001);
            let pct = done * 100 / total;
            eprint!(
                "\rrebuild leg {leg} [{:<25}] {pct:>3}%  {} of {}, {}/s   ",
                "#".repeat((pct / 4) as usize),
                human::bytes(done),
                human::bytes(total),
                human::bytes((done as f64 / secs) as u64)
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}
