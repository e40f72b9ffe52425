//! The kernel side of latency tracking: loads `ebpf/blklat.bpf.c` (compiled by build.rs)
//! with aya, attaches it to `block_rq_issue`/`block_rq_complete` (BTF tracepoints, or raw
//! tracepoints where those are refused), tells it which devices to trace and reads its
//! histograms back.

use blkrep_common::latency::{DeviceLatency, Histogram, SLOTS};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/blklat.bpf.o"));
static BUILD_MISSING: &str = include_str!(concat!(env!("OUT_DIR"), "/blklat.bpf.missing"));

/// Key of the `hists` map (`struct hkey` in blklat.bpf.c).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct HKey {
    dev: u32,
    op: u32,
}

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
unsafe impl aya::Pod for HKey {}
// SAFETY: as above.
unsafe impl aya::Pod for HVal {}

const OPS: [&str; 5] = ["read", "write", "flush", "discard", "other"];

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
        {
            let mut devs: aya::maps::HashMap<_, u32, u8> = aya::maps::HashMap::try_from(
                bpf.map_mut("devs")
                    .ok_or("the BPF object has no `devs` map")?,
            )
            .map_err(|e| explain("opening the `devs` map", &e))?;
            for d in devices {
                devs.insert(d.kdev(), 1, 0)
                    .map_err(|e| explain("filling the `devs` map", &e))?;
            }
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
        let mut devs: aya::maps::HashMap<_, u32, u8> = aya::maps::HashMap::try_from(
            self.bpf
                .map_mut("devs")
                .ok_or("the BPF object has no `devs` map")?,
        )
        .map_err(|e| explain("opening the `devs` map", &e))?;
        devs.insert(d.kdev(), 1, 0)
            .map_err(|e| explain("filling the `devs` map", &e))?;
        self.devices.push(d);
        Ok(())
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
        let Ok(hists) = aya::maps::HashMap::<_, HKey, HVal>::try_from(map) else {
            return Vec::new();
        };
        let mut out: Vec<DeviceLatency> = hists
            .iter()
            .filter_map(|r| r.ok())
            .filter_map(|(k, v)| {
                let d = self.devices.iter().find(|d| d.kdev() == k.dev)?;
                Some(DeviceLatency {
                    device: d.name.clone(),
                    dev: format!("{}:{}", d.major, d.minor),
                    role: d.role.clone(),
                    op: OPS.get(k.op as usize).unwrap_or(&"other").to_string(),
                    issued: v.issued,
                    completed: v.completed,
                    hist: Histogram::from_slots(&v.slots, v.total_ns),
                })
            })
            .collect();
        out.sort_by(|a, b| {
            (a.role != "frontend", &a.device, op_rank(&a.op)).cmp(&(
                b.role != "frontend",
                &b.device,
                op_rank(&b.op),
            ))
        });
        out
    }
}

fn op_rank(op: &str) -> usize {
    OPS.iter().position(|o| *o == op).unwrap_or(OPS.len())
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
