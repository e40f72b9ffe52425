//! The unmutated engine under the simulator: zero violations.
//!
//! `quick_seeds` runs in every `cargo test`; `ci_budget` (ignored by default, run in release
//! by scripts/test.sh) runs the CI budget: `BLKREP_SIM_SEEDS` seeds (default 2000).

mod common;
use blkrep_sim::{run_seed, trace_seed, SimConfig};
use common::run_seeds;
use std::time::Instant;

#[test]
fn quick_seeds() {
    let (n, _, bad) = run_seeds(1, 12, 4000, 2, false);
    assert_eq!(n, 12);
    assert!(bad.is_empty(), "violations: {bad:?}");
}

#[test]
fn same_seed_same_run() {
    // Determinism: two runs of one seed take the same steps and end the same way, and the
    // traced run is the same run.
    for seed in [3, 8, 21] {
        let a = run_seed(SimConfig::new(seed, 3000));
        let b = run_seed(SimConfig::new(seed, 3000));
        assert_eq!(a.stats.steps, b.stats.steps);
        assert_eq!(a.stats.client_writes_ok, b.stats.client_writes_ok);
        assert_eq!(a.stats.sim_seconds, b.stats.sim_seconds);
        let (v, trace) = trace_seed(SimConfig::new(seed, 3000));
        assert_eq!(v.map(|v| v.to_string()), a.violation.map(|v| v.to_string()));
        assert!(trace.len() as u64 >= a.stats.steps / 2, "trace too short");
    }
}

#[test]
fn regression_seeds_stay_fixed() {
    // Seeds that once found a bug (see seeds/regressions.txt) must pass forever.
    let text = include_str!("../seeds/regressions.txt");
    let mut n = 0;
    for line in text.lines() {
        let line = line.split('#').next().unwrap().trim();
        if line.is_empty() {
            continue;
        }
        let mut f = line.split_whitespace();
        let seed: u64 = f.next().unwrap().parse().unwrap();
        let steps: u64 = f.next().map_or(20_000, |s| s.parse().unwrap());
        let o = run_seed(SimConfig::new(seed, steps));
        assert!(
            o.violation.is_none(),
            "regression seed {seed}: {:?}",
            o.violation
        );
        n += 1;
    }
    assert!(n > 0);
}

#[test]
#[ignore = "the CI budget: run in release (scripts/test.sh does)"]
fn ci_budget() {
    let seeds: u64 = std::env::var("BLKREP_SIM_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2000);
    let t = Instant::now();
    let (n, steps, bad) = run_seeds(1, seeds, 20_000, 2, false);
    let secs = t.elapsed().as_secs_f64();
    println!(
        "simulator budget: {n} seeds, {steps} steps in {secs:.1} s ({:.0} steps/s, {:.0} seeds/min), {} violations",
        steps as f64 / secs,
        n as f64 * 60.0 / secs,
        bad.len()
    );
    for (seed, v) in &bad {
        println!("  seed {seed}: {v}  (reproduce: blkrep-sim --seed {seed})");
    }
    assert!(bad.is_empty(), "{} seeds found violations", bad.len());
}
