//! What the `blkrep` command and the `blkrepd` daemon share: the resource configuration
//! (TOML, validated with errors that name the field) and the versioned JSON control API.

pub mod config;
pub mod control;
pub mod events;
pub mod latency;

/// `1.5 MiB`-style sizes (binary units), for messages and `status`.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}
