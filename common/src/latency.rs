//! Latency reports: what `blkrep latency` shows and the metrics endpoint exports.
//!
//! Every histogram has the same shape, whether the kernel filled it (eBPF, per block
//! device and operation) or the daemon did (per stage of the replication path): counts in
//! power-of-two microsecond slots (slot 0: below 2 µs; slot i > 0: `[2^i, 2^(i+1))` µs),
//! the number of samples, their sum, and the p50/p99/p99.9 quantiles. Stage quantiles come
//! from an HDR histogram (3 significant digits); block-device quantiles are interpolated
//! inside their log2 slot (the kernel side keeps only the slots), so they are accurate to
//! the slot's width.

use serde::{Deserialize, Serialize};

/// Number of log2 slots (the last one reaches past an hour).
pub const SLOTS: usize = 32;

/// One latency histogram.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Histogram {
    /// Samples in the histogram.
    pub count: u64,
    /// Sum of the samples, in nanoseconds.
    pub sum_ns: u64,
    /// Counts per log2 microsecond slot (trailing empty slots left out).
    pub slots: Vec<u64>,
    pub p50_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub max_us: f64,
}

impl Histogram {
    /// A histogram from log2 slot counts (quantiles interpolated inside the slot).
    pub fn from_slots(slots: &[u64], sum_ns: u64) -> Histogram {
        let count: u64 = slots.iter().sum();
        let last = slots.iter().rposition(|&c| c > 0).map_or(0, |i| i + 1);
        let q = |p: f64| slot_quantile(slots, count, p);
        Histogram {
            count,
            sum_ns,
            slots: slots[..last].to_vec(),
            p50_us: q(0.50),
            p99_us: q(0.99),
            p999_us: q(0.999),
            max_us: if last == 0 {
                0.0
            } else {
                slot_bounds(last - 1).1
            },
        }
    }

    /// Mean latency in microseconds (0 when empty).
    pub fn mean_us(&self) -> f64 {
        if self.count == 0 {
            0.0
        } else {
            self.sum_ns as f64 / self.count as f64 / 1000.0
        }
    }
}

/// The microsecond range `[lo, hi)` of log2 slot `i`.
pub fn slot_bounds(i: usize) -> (f64, f64) {
    if i == 0 {
        (0.0, 2.0)
    } else {
        ((1u64 << i) as f64, (1u64 << (i + 1)) as f64)
    }
}

/// The log2 slot of a latency in microseconds.
pub fn slot_of(us: u64) -> usize {
    if us < 2 {
        0
    } else {
        (63 - us.leading_zeros() as usize).min(SLOTS - 1)
    }
}

fn slot_quantile(slots: &[u64], count: u64, p: f64) -> f64 {
    if count == 0 {
        return 0.0;
    }
    let rank = (p * count as f64).ceil().max(1.0);
    let mut seen = 0.0;
    for (i, &c) in slots.iter().enumerate() {
        if c == 0 {
            continue;
        }
        let next = seen + c as f64;
        if next >= rank {
            let (lo, hi) = slot_bounds(i);
            return lo + (hi - lo) * ((rank - seen) / c as f64);
        }
        seen = next;
    }
    slot_bounds(slots.len().saturating_sub(1)).1
}

/// Requests of one operation on one block device, as the kernel saw them.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DeviceLatency {
    /// Kernel name (`ublkb0`, `loop3`, `vdb`).
    pub device: String,
    /// `major:minor`.
    pub dev: String,
    /// What the device is to the volume: `frontend` (the ublk device) or `backing`.
    pub role: String,
    /// `read`, `write`, `flush`, `discard` or `other`.
    pub op: String,
    /// Requests issued to the device's driver since tracking started.
    pub issued: u64,
    /// Requests the driver completed (those issued before tracking started included).
    pub completed: u64,
    pub hist: Histogram,
}

/// One stage of the replication path, timed by the daemon.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StageLatency {
    /// `client_write`, `queue_wait`, `journal_append`, `ship_ack`, `remote_apply`, ...
    pub stage: String,
    /// What the stage measures, for a person.
    pub what: String,
    pub hist: Histogram,
}

/// Whether the kernel side runs, and why not.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EbpfState {
    /// `active`, `unavailable` or `off` (configured off).
    pub state: String,
    /// `tp_btf` or `raw_tp` when active.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attach: Option<String>,
    /// Why it is not active.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The devices traced (`name (major:minor, role)`).
    #[serde(default)]
    pub devices: Vec<String>,
    /// What the programs cost, when the kernel keeps BPF run-time statistics
    /// (`sysctl kernel.bpf_stats_enabled=1`; off by default, as it costs two clock reads
    /// per run).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub programs: Vec<ProgramCost>,
}

/// One attached BPF program's runs and CPU time (from `/proc/self/fdinfo` of its fd).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ProgramCost {
    pub name: String,
    pub run_count: u64,
    pub run_time_ns: u64,
}

/// The answer to `Request::Latency`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LatencyReport {
    pub ebpf: EbpfState,
    /// Seconds since the histograms started (the daemon's start).
    pub uptime_s: f64,
    pub devices: Vec<DeviceLatency>,
    pub stages: Vec<StageLatency>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_and_quantiles() {
        assert_eq!(slot_of(0), 0);
        assert_eq!(slot_of(1), 0);
        assert_eq!(slot_of(2), 1);
        assert_eq!(slot_of(3), 1);
        assert_eq!(slot_of(1024), 10);
        assert_eq!(slot_of(u64::MAX), SLOTS - 1);
        // 100 samples: 90 in [8,16) µs, 10 in [1024,2048) µs.
        let mut slots = [0u64; SLOTS];
        slots[3] = 90;
        slots[10] = 10;
        let h = Histogram::from_slots(&slots, 0);
        assert_eq!(h.count, 100);
        assert_eq!(h.slots.len(), 11);
        assert!((8.0..16.0).contains(&h.p50_us), "{}", h.p50_us);
        assert!((1024.0..=2048.0).contains(&h.p99_us), "{}", h.p99_us);
        assert_eq!(h.max_us, 2048.0);
        let empty = Histogram::from_slots(&[0; SLOTS], 0);
        assert_eq!((empty.count, empty.p99_us, empty.slots.len()), (0, 0.0, 0));
    }
}
