//! Running many seeds on a few threads.
#![allow(dead_code)]

use blkrep_sim::{run_seed, SimConfig, Violation};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// Run seeds `from..from+count` with `steps` each on `threads` threads. With `stop_at_first`
/// the run ends at the first violation. Returns (seeds run, steps, violations by seed).
pub fn run_seeds(
    from: u64,
    count: u64,
    steps: u64,
    threads: usize,
    stop_at_first: bool,
) -> (u64, u64, Vec<(u64, Violation)>) {
    let next = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let out = Arc::new(Mutex::new((0u64, 0u64, Vec::new())));
    let hs: Vec<_> = (0..threads)
        .map(|_| {
            let (next, stop, out) = (next.clone(), stop.clone(), out.clone());
            std::thread::spawn(move || loop {
                if stop.load(Ordering::Relaxed) {
                    return;
                }
                let k = next.fetch_add(1, Ordering::Relaxed);
                if k >= count {
                    return;
                }
                let o = run_seed(SimConfig::new(from + k, steps));
                let mut g = out.lock().unwrap();
                g.0 += 1;
                g.1 += o.stats.steps;
                if let Some(v) = o.violation {
                    g.2.push((o.seed, v));
                    if stop_at_first {
                        stop.store(true, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    for h in hs {
        h.join().unwrap();
    }
    let mut g = Arc::try_unwrap(out).ok().unwrap().into_inner().unwrap();
    g.2.sort_by_key(|x| x.0);
    g
}
