//! What a run simulates: fixed parameters, and the fault mix each seed draws for itself
//! ("swarm testing": some seeds crash often and never partition, others the reverse).

use crate::rng::Rng;
use blkrep_engine::Mode;

/// Parameters of one run.
#[derive(Clone, Debug)]
pub struct SimConfig {
    /// The seed: the whole run follows from it.
    pub seed: u64,
    /// Events in the safety phase (faults on).
    pub steps: u64,
    /// Volume size in bytes.
    pub volume_size: u64,
    /// Full-sync chunk size.
    pub resync_chunk: u64,
    /// Replication mode.
    pub mode: Mode,
    /// Simulated time the liveness phase may take to converge.
    pub liveness_ns: u64,
    /// Connections the liveness phase may need before it counts as a livelock.
    pub max_liveness_connects: u64,
    /// Size of each node's journal (0: none). A quarter of the seeds run with one, small
    /// enough to overflow and wrap; their crashes are half power losses, half kills of
    /// the daemon (the page cache survives and the journal is replayed).
    pub journal_size: u64,
}

impl SimConfig {
    /// Defaults for `seed`; the mode alternates with the seed's lowest bit.
    pub fn new(seed: u64, steps: u64) -> SimConfig {
        SimConfig {
            seed,
            steps,
            volume_size: 256 << 10,
            resync_chunk: 16 << 10,
            mode: if seed & 1 == 0 {
                Mode::Sync
            } else {
                Mode::Async
            },
            liveness_ns: 300_000_000_000,
            max_liveness_connects: 8,
            journal_size: match seed % 8 {
                3 => 8192 + (64 << 10),
                7 => 8192 + (512 << 10),
                _ => 0,
            },
        }
    }
}

/// The fault mix of one run, drawn from its seed.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Faults {
    /// Probability that a disk operation fails.
    pub disk_error: f64,
    /// The node whose disk has the errors (both at once would be a double failure that no
    /// replication survives without an operator choosing which data to keep).
    pub disk_error_node: usize,
    /// Probability that a disk operation is slow (10–800 ms).
    pub slow_disk: f64,
    /// Probability that a frame is corrupted on the wire.
    pub garbage: f64,
    /// Mean time between crashes of each node (0 = none), ms.
    pub crash_every_ms: u64,
    /// Mean time between partitions (0 = none), ms.
    pub partition_every_ms: u64,
    /// Longest partition, ms.
    pub partition_len_ms: u64,
    /// Mean time between connection resets (0 = none), ms.
    pub reset_every_ms: u64,
    /// Mean time between stalls of one direction (0 = none), ms.
    pub stall_every_ms: u64,
    /// Mean time between operator commands, ms.
    pub operator_every_ms: u64,
    /// The operator also stops daemons cleanly (they restart later).
    pub clean_restarts: bool,
    /// Ship queue bound (small values force overflows and full syncs).
    pub queue_limit: u64,
    /// The secondary checkpoints after this many bytes.
    pub checkpoint_bytes: u64,
    /// Client requests in flight per node.
    pub queue_depth: usize,
    /// Longest gap between client requests, µs.
    pub client_gap_us: u64,
}

impl Faults {
    /// Draw a mix.
    pub fn draw(rng: &mut Rng, _cfg: &SimConfig) -> Faults {
        Faults {
            disk_error: rng.pick(&[0.0, 0.0, 0.0005, 0.002]),
            disk_error_node: rng.below(2) as usize,
            slow_disk: rng.pick(&[0.0, 0.01, 0.05]),
            garbage: rng.pick(&[0.0, 0.0, 0.0005, 0.002]),
            crash_every_ms: rng.pick(&[0, 2_000, 5_000, 15_000]),
            partition_every_ms: rng.pick(&[0, 3_000, 10_000]),
            partition_len_ms: rng.pick(&[500, 3_000, 10_000]),
            reset_every_ms: rng.pick(&[0, 2_000, 8_000]),
            stall_every_ms: rng.pick(&[0, 0, 5_000]),
            operator_every_ms: rng.pick(&[300, 1_000, 3_000]),
            clean_restarts: rng.chance(0.5),
            queue_limit: rng.pick(&[64 << 10, 256 << 10, 16 << 20]),
            checkpoint_bytes: rng.pick(&[16 << 10, 1 << 20]),
            queue_depth: rng.pick(&[1, 4, 16]),
            client_gap_us: rng.pick(&[200, 2_000, 20_000]),
        }
    }
}
