//! Every planted bug is caught within a bounded number of seeds. (Its own test binary: the
//! bug switch is process-wide.) Ignored by default; scripts/test.sh runs it in release.

mod common;
use blkrep_engine::bugs::Bug;
use common::run_seeds;

const BOUND: u64 = 1000;

#[test]
#[ignore = "run in release (scripts/test.sh does)"]
fn every_planted_bug_is_caught() {
    let mut missed = Vec::new();
    for bug in Bug::ALL {
        blkrep_sim::plant(&[bug]);
        let (n, _, bad) = run_seeds(1, BOUND, 20_000, 2, true);
        match bad.first() {
            Some((seed, v)) => println!(
                "{:<28} caught by seed {seed} ({n} seeds run): {v}",
                bug.name()
            ),
            None => {
                println!("{:<28} NOT caught in {BOUND} seeds", bug.name());
                missed.push(bug.name());
            }
        }
    }
    blkrep_sim::plant(&[]);
    assert!(
        missed.is_empty(),
        "planted bugs the simulator missed: {missed:?}"
    );
}
