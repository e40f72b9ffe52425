//! What the `blkrep` command and the `blkrepd` daemon share: the resource configuration
//! (TOML, validated with errors that name the field) and the versioned JSON control API.

pub mod config;
pub mod control;
pub mod events;
pub mod latency;
