//! A deterministic simulator for blkrep's replication engine.
//!
//! The real engine (`blkrep_engine::Volume`, the same code the daemon runs) is driven by a
//! simulated world: two nodes with disks that lose unflushed writes and tear in-flight ones
//! on a crash, a two-slot metadata area, a network with delays, stalls, resets, partitions
//! and corrupted frames (decoded by the real transport codec), clients, and an operator who
//! promotes and demotes at random moments. One seed fixes everything. Invariants are checked
//! as the run goes (see `model.rs` and `World::run`); after the safety phase the faults heal
//! and the replicas must converge.

pub mod config;
pub mod disk;
pub mod model;
pub mod rng;
pub mod world;

pub use config::SimConfig;
pub use model::Violation;
pub use world::{Stats, World};

use blkrep_engine::bugs::{self, Bug};

/// The outcome of one seed.
#[derive(Debug)]
pub struct Outcome {
    /// The seed.
    pub seed: u64,
    /// Coverage counters.
    pub stats: Stats,
    /// The first violation, if any.
    pub violation: Option<Violation>,
}

/// Run one seed.
pub fn run_seed(cfg: SimConfig) -> Outcome {
    let seed = cfg.seed;
    let mut w = World::new(cfg, false);
    let r = w.run();
    Outcome {
        seed,
        stats: w.stats().clone(),
        violation: r.err(),
    }
}

/// Run one seed collecting a trace: (violation, trace lines).
pub fn trace_seed(cfg: SimConfig) -> (Option<Violation>, Vec<String>) {
    let mut w = World::new(cfg, true);
    let r = w.run();
    (r.err(), w.trace().to_vec())
}

/// Switch planted bugs on for this process (all others off).
pub fn plant(set: &[Bug]) {
    bugs::set_active(set);
}
