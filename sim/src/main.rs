//! `blkrep-sim`: run the deterministic simulator.
//!
//! ```text
//! blkrep-sim --seed 42                 one seed; on a violation print it and the trace
//! blkrep-sim --seeds 2000 --threads 2  a budget of seeds (from --from, default 1)
//! blkrep-sim --long 3600               random seeds for an hour
//! blkrep-sim --bug apply-out-of-order --seeds 1000   with a planted bug
//! ```
//! Exit status: 0 no violation, 1 a violation, 2 bad usage.

use blkrep_engine::bugs::Bug;
use blkrep_sim::{plant, run_seed, trace_seed, Outcome, SimConfig, Stats};
use clap::Parser;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Parser)]
#[command(
    name = "blkrep-sim",
    version,
    about = "Deterministic simulation of blkrep's replication engine"
)]
struct Args {
    /// Run exactly this seed and print its trace on a violation.
    #[arg(long)]
    seed: Option<u64>,
    /// Run this many seeds.
    #[arg(long)]
    seeds: Option<u64>,
    /// First seed of --seeds.
    #[arg(long, default_value_t = 1)]
    from: u64,
    /// Run random seeds for this many seconds.
    #[arg(long)]
    long: Option<u64>,
    /// Events in each run's safety phase.
    #[arg(long, default_value_t = 20_000)]
    steps: u64,
    /// Worker threads.
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Switch on a planted bug (see --list-bugs).
    #[arg(long)]
    bug: Option<String>,
    /// List the planted bugs.
    #[arg(long)]
    list_bugs: bool,
    /// With --seed: print the whole trace, not only its end.
    #[arg(long)]
    trace: bool,
    /// Stop at the first violation.
    #[arg(long)]
    fail_fast: bool,
    /// Print the summary as JSON.
    #[arg(long)]
    json: bool,
}

fn main() -> ExitCode {
    let a = Args::parse();
    if a.list_bugs {
        for b in Bug::ALL {
            println!("{}", b.name());
        }
        return ExitCode::SUCCESS;
    }
    if let Some(name) = &a.bug {
        match Bug::from_name(name) {
            Some(b) => plant(&[b]),
            None => {
                eprintln!("blkrep-sim: unknown bug {name:?} (see --list-bugs)");
                return ExitCode::from(2);
            }
        }
    }
    if let Some(seed) = a.seed {
        return one(seed, &a);
    }
    let (from, count, deadline) = match (a.seeds, a.long) {
        (Some(n), None) => (a.from, n, None),
        (None, Some(secs)) => {
            let from = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs() << 20)
                .unwrap_or(1);
            (
                from,
                u64::MAX,
                Some(Instant::now() + Duration::from_secs(secs)),
            )
        }
        _ => {
            eprintln!("blkrep-sim: give --seed S, --seeds N or --long SECONDS");
            return ExitCode::from(2);
        }
    };
    many(from, count, deadline, &a)
}

fn one(seed: u64, a: &Args) -> ExitCode {
    let t = Instant::now();
    let o = run_seed(SimConfig::new(seed, a.steps));
    match &o.violation {
        None => {
            println!(
                "seed {seed}: ok ({} steps, {:.1} s simulated, {:.2} s)",
                o.stats.steps,
                o.stats.sim_seconds,
                t.elapsed().as_secs_f64()
            );
            if a.json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&o.stats).unwrap_or_default()
                );
            }
            ExitCode::SUCCESS
        }
        Some(v) => {
            // Replay with the trace on; the same seed must fail the same way.
            let (again, trace) = trace_seed(SimConfig::new(seed, a.steps));
            let skip = if a.trace {
                0
            } else {
                trace.len().saturating_sub(300)
            };
            if skip > 0 {
                println!("... {skip} earlier trace lines (--trace shows all)");
            }
            for l in &trace[skip..] {
                println!("{l}");
            }
            println!();
            println!("seed {seed}: VIOLATION at step {}: {v}", o.stats.steps);
            match again {
                Some(w) if w.to_string() == v.to_string() => {}
                other => println!(
                    "NONDETERMINISM: the replay ended with {:?}",
                    other.map(|x| x.to_string())
                ),
            }
            ExitCode::from(1)
        }
    }
}

#[derive(Default, serde::Serialize)]
struct Summary {
    seeds: u64,
    failures: Vec<(u64, String)>,
    steps: u64,
    wall_seconds: f64,
    steps_per_second: f64,
    seeds_per_minute: f64,
    totals: Stats,
}

fn add(t: &mut Stats, s: &Stats) {
    t.steps += s.steps;
    t.sim_seconds += s.sim_seconds;
    t.client_writes_ok += s.client_writes_ok;
    t.client_reads_ok += s.client_reads_ok;
    t.client_errors += s.client_errors;
    t.flushes_ok += s.flushes_ok;
    t.crashes += s.crashes;
    t.clean_restarts += s.clean_restarts;
    t.partitions += s.partitions;
    t.resets += s.resets;
    t.stalls += s.stalls;
    t.garbage_frames += s.garbage_frames;
    t.disk_errors += s.disk_errors;
    t.connects += s.connects;
    t.promotes_ok += s.promotes_ok;
    t.promotes_refused += s.promotes_refused;
    t.demotes_ok += s.demotes_ok;
    t.full_syncs += s.full_syncs;
    t.forced_takeovers += s.forced_takeovers;
    t.verifies_completed += s.verifies_completed;
    t.split_brains_resolved += s.split_brains_resolved;
    t.stream_items += s.stream_items;
    t.prefix_checks += s.prefix_checks;
    t.read_checks += s.read_checks;
    t.sync_loss_checks += s.sync_loss_checks;
    t.durability_checks += s.durability_checks;
    t.kills += s.kills;
    t.journal_replays += s.journal_replays;
    t.undo_sessions += s.undo_sessions;
    t.undo_rollbacks += s.undo_rollbacks;
    t.diskless += s.diskless;
    t.liveness_seconds += s.liveness_seconds;
    t.liveness_connects += s.liveness_connects;
}

fn many(from: u64, count: u64, deadline: Option<Instant>, a: &Args) -> ExitCode {
    let next = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let summary = Arc::new(Mutex::new(Summary::default()));
    let t0 = Instant::now();
    let steps = a.steps;
    let fail_fast = a.fail_fast;
    let workers: Vec<_> = (0..a.threads.max(1))
        .map(|_| {
            let (next, stop, summary) = (next.clone(), stop.clone(), summary.clone());
            std::thread::spawn(move || loop {
                if stop.load(Ordering::Relaxed) || deadline.is_some_and(|d| Instant::now() > d) {
                    return;
                }
                let k = next.fetch_add(1, Ordering::Relaxed);
                if k >= count {
                    return;
                }
                let o: Outcome = run_seed(SimConfig::new(from + k, steps));
                let mut s = summary.lock().expect("summary");
                s.seeds += 1;
                s.steps += o.stats.steps;
                add(&mut s.totals, &o.stats);
                if let Some(v) = o.violation {
                    eprintln!("seed {}: VIOLATION {v}", o.seed);
                    s.failures.push((o.seed, v.to_string()));
                    if fail_fast {
                        stop.store(true, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    for w in workers {
        let _ = w.join();
    }
    let mut s = Arc::try_unwrap(summary)
        .ok()
        .expect("workers joined")
        .into_inner()
        .expect("summary");
    s.failures.sort();
    s.wall_seconds = t0.elapsed().as_secs_f64();
    s.steps_per_second = s.steps as f64 / s.wall_seconds.max(1e-9);
    s.seeds_per_minute = s.seeds as f64 * 60.0 / s.wall_seconds.max(1e-9);
    if a.json {
        println!("{}", serde_json::to_string_pretty(&s).unwrap_or_default());
    } else {
        println!(
            "{} seeds ({}..), {} steps in {:.1} s: {:.0} steps/s, {:.0} seeds/min, {} violations",
            s.seeds,
            from,
            s.steps,
            s.wall_seconds,
            s.steps_per_second,
            s.seeds_per_minute,
            s.failures.len()
        );
        let t = &s.totals;
        println!(
            "  covered: {} writes, {} reads, {} flushes, {} crashes, {} clean restarts, {} partitions, {} resets, {} stalls, {} corrupted frames, {} disk errors, {} connects, {} promotes ({} refused), {} demotes, {} resyncs, {} forced takeovers, {} split brains resolved, {} verifies, {} daemon kills, {} journal replays, {} protected catch-ups, {} rolled back by a takeover, {} diskless primaries",
            t.client_writes_ok, t.client_reads_ok, t.flushes_ok, t.crashes, t.clean_restarts, t.partitions, t.resets, t.stalls, t.garbage_frames, t.disk_errors, t.connects, t.promotes_ok, t.promotes_refused, t.demotes_ok, t.full_syncs, t.forced_takeovers, t.split_brains_resolved, t.verifies_completed, t.kills, t.journal_replays, t.undo_sessions, t.undo_rollbacks, t.diskless
        );
        println!(
            "  checks: {} replica prefix, {} primary reads, {} sync-loss, {} durability; liveness {:.1} s simulated in all",
            t.prefix_checks, t.read_checks, t.sync_loss_checks, t.durability_checks, t.liveness_seconds
        );
        for (seed, v) in s.failures.iter().take(20) {
            println!("  seed {seed}: {v}");
        }
    }
    if s.failures.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}
