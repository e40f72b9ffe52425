//! The kernel side of latency tracking: loads `ebpf/blklat.bpf.c` (compiled by build.rs)
//! with aya, attaches it to `block_rq_issue`/`block_rq_complete` (BTF tracepoints, or raw
//! tracepoints where those are refused), tells it which devices to trace and reads its
//! histograms back.

use blkrep_common::latency::{DeviceLatency, Histogram, ProgramCost, SLOTS};
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/blklat.bpf.o"));
static BUILD_MISSING: &str = include_str!(concat!(env!("OUT_DIR"), "/blklat.bpf.missing"));

/// Value of the `hists` map (`struct hval` in blklat.bpf.c).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
struct HVal {
    slots: [u64; SLOTS],
    total_ns: u64,
    issued: u64,
    completed: u64,
}

// SAFETY: plain #[repr(C)] integers without padding, valid for any bit pattern.
unsafe impl aya::Pod for HVal {}

/// The operations, in the order of the program's `OP_*` (its `NR_OPS` is their number).
const OPS: [&str; 5] = ["read", "write", "flush", "discard", "other"];
/// The program's `MAX_DEVS`.
const MAX_DEVS: usize = 64;

/// A block device to trace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TracedDevice {
    /// Kernel name (`loop3`).
    pub name: String,
    pub major: u32,
    pub minor: u32,
    /// `frontend` or `backing`.
    pub role: String,
}

impl TracedDevice {
    /// The kernel's `dev_t` encoding (`MKDEV`), as the BPF program computes it.
    pub fn kdev(&self) -> u32 {
        (self.major << 20) | self.minor
    }

    /// `name (major:minor, role)`.
    pub fn describe(&self) -> String {
        format!(
            "{} ({}:{}, {})",
            self.name, self.major, self.minor, self.role
        )
    }
}

/// The whole disk under `path`: the device itself for a block device node, the disk
/// holding the file system for a regular file (a partition is traced as its disk, since
/// the block layer's request queue belongs to the disk). `None` where there is no block
/// device (tmpfs, overlay without one).
pub fn device_of(path: &Path, role: &str) -> Option<TracedDevice> {
    let md = std::fs::metadata(path).ok()?;
    let rdev = if md.file_type().is_block_device() {
        md.rdev()
    } else {
        md.dev()
    };
    let (mut major, mut minor) = (libc::major(rdev), libc::minor(rdev));
    let mut sys = std::path::PathBuf::from(format!("/sys/dev/block/{major}:{minor}"));
    if !sys.exists() {
        return None;
    }
    if sys.join("partition").exists() {
        // .../block/sda/sda1 → the parent directory is the disk.
        let real = std::fs::canonicalize(&sys).ok()?;
        let disk = real.parent()?;
        let dev = std::fs::read_to_string(disk.join("dev")).ok()?;
        let (a, b) = dev.trim().split_once(':')?;
        major = a.parse().ok()?;
        minor = b.parse().ok()?;
        sys = disk.to_path_buf();
    }
    let name = std::fs::canonicalize(&sys)
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_else(|| format!("{major}:{minor}"));
    Some(TracedDevice {
        name,
        major,
        minor,
        role: role.to_string(),
    })
}

/// The programs, attached; dropping it detaches them.
pub struct BlockTracker {
    bpf: aya::Ebpf,
    attach: &'static str,
    devices: Vec<TracedDevice>,
}

impl std::fmt::Debug for BlockTracker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlockTracker")
            .field("attach", &self.attach)
            .field("devices", &self.devices)
            .finish()
    }
}

impl BlockTracker {
    /// Load and attach the programs, tracing `devices`. The error is the reason, for a
    /// person (missing privileges, no BTF, a verifier rejection, built without clang).
    pub fn start(devices: &[TracedDevice]) -> Result<BlockTracker, String> {
        Self::start_with(devices, false)
    }

    /// As [`BlockTracker::start`]; `raw_only` skips the BTF tracepoints (to test the
    /// fallback where they are available).
    pub fn start_with(devices: &[TracedDevice], raw_only: bool) -> Result<BlockTracker, String> {
        if OBJECT.is_empty() {
            return Err(format!(
                "blkrepd was built without its eBPF programs ({})",
                BUILD_MISSING.trim()
            ));
        }
        if devices.is_empty() {
            return Err("no block device to trace (the backing is not on a block device)".into());
        }
        let mut bpf = aya::EbpfLoader::new()
            .load(OBJECT)
            .map_err(|e| explain("loading the BPF object", &e))?;
        for (i, d) in devices.iter().enumerate() {
            add_dev(&mut bpf, d, i)?;
        }
        let btf = if raw_only {
            Err("skipped".to_string())
        } else {
            attach_btf(&mut bpf)
        };
        let attach = match btf {
            Ok(()) => "tp_btf",
            Err(btf_err) => {
                attach_raw(&mut bpf).map_err(|raw_err| {
                    format!("BTF tracepoints: {btf_err}; raw tracepoints: {raw_err}")
                })?;
                tracing::info!("eBPF: BTF tracepoints refused ({btf_err}); using raw tracepoints");
                "raw_tp"
            }
        };
        Ok(BlockTracker {
            bpf,
            attach,
            devices: devices.to_vec(),
        })
    }

    /// Trace one more device (the ublk device, once it exists).
    pub fn add_device(&mut self, d: TracedDevice) -> Result<(), String> {
        if self.devices.contains(&d) {
            return Ok(());
        }
        add_dev(&mut self.bpf, &d, self.devices.len())?;
        self.devices.push(d);
        Ok(())
    }

    /// Runs and CPU time of the attached programs, when the kernel counts them
    /// (`kernel.bpf_stats_enabled`); empty otherwise.
    pub fn costs(&self) -> Vec<ProgramCost> {
        let names: &[&str] = if self.attach == "tp_btf" {
            &["blk_issue_btf", "blk_complete_btf"]
        } else {
            &["blk_issue_raw", "blk_complete_raw"]
        };
        let mut out = Vec::new();
        for name in names {
            let Some(fd) = self
                .bpf
                .program(name)
                .and_then(|p| p.fd().ok())
                .map(|fd| fd.as_fd().as_raw_fd())
            else {
                continue;
            };
            let Ok(info) = std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}")) else {
                continue;
            };
            let field = |k: &str| {
                info.lines()
                    .find_map(|l| l.strip_prefix(k))
                    .and_then(|v| v.trim().parse::<u64>().ok())
            };
            if let (Some(run_count), Some(run_time_ns)) = (field("run_cnt:"), field("run_time_ns:"))
            {
                if run_count > 0 {
                    out.push(ProgramCost {
                        name: name.to_string(),
                        run_count,
                        run_time_ns,
                    });
                }
            }
        }
        out
    }

    /// `tp_btf` or `raw_tp`.
    pub fn attach_kind(&self) -> &'static str {
        self.attach
    }

    pub fn devices(&self) -> &[TracedDevice] {
        &self.devices
    }

    /// The histograms so far, one per device and operation seen.
    pub fn snapshot(&self) -> Vec<DeviceLatency> {
        let Some(map) = self.bpf.map("hists") else {
            return Vec::new();
        };
        let Ok(hists) = aya::maps::Array::<_, HVal>::try_from(map) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for (i, d) in self.devices.iter().enumerate() {
            for (o, op) in OPS.iter().enumerate() {
                let Ok(v) = hists.get(&((i * OPS.len() + o) as u32), 0) else {
                    continue;
                };
                if v.issued == 0 && v.completed == 0 {
                    continue;
                }
                out.push(DeviceLatency {
                    device: d.name.clone(),
                    dev: format!("{}:{}", d.major, d.minor),
                    role: d.role.clone(),
                    op: op.to_string(),
                    issued: v.issued,
                    completed: v.completed,
                    hist: Histogram::from_slots(&v.slots, v.total_ns),
                });
            }
        }
        out.sort_by_key(|a| (a.role != "frontend", a.device.clone()));
        out
    }
}

/// Trace device `d` under index `i` (its histograms are entries `i * NR_OPS + op`).
fn add_dev(bpf: &mut aya::Ebpf, d: &TracedDevice, i: usize) -> Result<(), String> {
    if i >= MAX_DEVS {
        return Err(format!("more than {MAX_DEVS} devices to trace"));
    }
    let mut devs: aya::maps::HashMap<_, u32, u32> = aya::maps::HashMap::try_from(
        bpf.map_mut("devs")
            .ok_or("the BPF object has no `devs` map")?,
    )
    .map_err(|e| explain("opening the `devs` map", &e))?;
    devs.insert(d.kdev(), i as u32, 0)
        .map_err(|e| explain("filling the `devs` map", &e))
}

fn attach_btf(bpf: &mut aya::Ebpf) -> Result<(), String> {
    let btf = aya::Btf::from_sys_fs().map_err(|e| format!("no kernel BTF ({e})"))?;
    for (prog, tp) in [
        ("blk_issue_btf", "block_rq_issue"),
        ("blk_complete_btf", "block_rq_complete"),
    ] {
        let p: &mut aya::programs::BtfTracePoint = bpf
            .program_mut(prog)
            .ok_or_else(|| format!("no program {prog}"))?
            .try_into()
            .map_err(|e| format!("{prog}: {e}"))?;
        p.load(tp, &btf).map_err(|e| explain(prog, &e))?;
        p.attach().map_err(|e| explain(prog, &e))?;
    }
    Ok(())
}

fn attach_raw(bpf: &mut aya::Ebpf) -> Result<(), String> {
    for (prog, tp) in [
        ("blk_issue_raw", "block_rq_issue"),
        ("blk_complete_raw", "block_rq_complete"),
    ] {
        let p: &mut aya::programs::RawTracePoint = bpf
            .program_mut(prog)
            .ok_or_else(|| format!("no program {prog}"))?
            .try_into()
            .map_err(|e| format!("{prog}: {e}"))?;
        p.load().map_err(|e| explain(prog, &e))?;
        p.attach(tp).map_err(|e| explain(prog, &e))?;
    }
    Ok(())
}

/// An error with its whole chain, and the likely cause when it is a permission error.
fn explain(what: &str, e: &dyn std::error::Error) -> String {
    let mut s = format!("{what}: {e}");
    let mut src = e.source();
    while let Some(c) = src {
        s.push_str(&format!(": {c}"));
        src = c.source();
    }
    if s.contains("Operation not permitted") || s.contains("EPERM") {
        s.push_str(" (needs root, or CAP_BPF and CAP_PERFMON)");
    }
    s
}
