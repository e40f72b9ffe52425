//! Opening the primary's journal at start-up: read the superblocks, scan the ring, decide
//! whether the journal is trusted, and redo a trusted journal's records on the backing
//! before anything else touches it. The format and the rules are in
//! `blkrep_engine::journal`; the engine drives all later I/O.

use anyhow::Context;
use blkrep_engine::journal::{self, JournalConfig, JournalError, Superblock};
use blkrep_engine::meta::{Metadata, FLAG_CLEAN, FLAG_CRASHED_PRIMARY, FLAG_PEER_NEEDS_FULL_SYNC};
use blkrep_engine::msg::ItemKind;
use blkrep_engine::{JournalStart, Role};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::Path;

/// An opened journal.
pub struct Opened {
    pub file: File,
    pub cfg: JournalConfig,
    pub start: JournalStart,
    /// What the scan found, for the log.
    pub report: String,
}

/// The kernel's boot id as 16 bytes (all zero when unreadable: never equal to a real one
/// written before, so a journal is then never trusted).
pub fn boot_id() -> [u8; 16] {
    let mut id = [0u8; 16];
    if let Ok(s) = std::fs::read_to_string("/proc/sys/kernel/random/boot_id") {
        let hex: Vec<u8> = s
            .bytes()
            .filter(|b| b.is_ascii_hexdigit())
            .map(|b| (b as char).to_digit(16).unwrap_or(0) as u8)
            .collect();
        for (i, pair) in hex.chunks(2).take(16).enumerate() {
            id[i] = pair[0] << 4 | pair.get(1).copied().unwrap_or(0);
        }
    }
    id
}

/// Open (creating a file if needed) and scan the journal at `path` for a volume whose
/// metadata is `meta`. A trusted journal's records are written to `backing` and synced;
/// an untrusted one's ranges join `meta.dirty` (they are resynced).
pub fn open(
    path: &Path,
    size: u64,
    resource: &str,
    meta: &mut Metadata,
    backing: &Path,
) -> anyhow::Result<Opened> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .with_context(|| format!("journal {}", path.display()))?;
    let file_len = crate::backend::device_size(&file)
        .with_context(|| format!("journal {}", path.display()))?;
    let is_dev = {
        use std::os::unix::fs::FileTypeExt;
        file.metadata()?.file_type().is_block_device()
    };
    if is_dev && file_len < size {
        anyhow::bail!(
            "journal {}: the device holds {file_len} bytes, node.journal_size asks for {size}",
            path.display()
        );
    }
    let cfg = JournalConfig {
        size,
        boot_id: boot_id(),
    };
    let cap = cfg.capacity();
    let mut area = vec![0u8; journal::DATA_START as usize];
    let n = file.read_at(&mut area, 0).unwrap_or(0);
    area.truncate(n);
    let sb = match Superblock::pick(&area) {
        Ok((sb, _)) => {
            sb.check_identity(resource, meta.volume_size)
                .with_context(|| {
                    format!(
                        "journal {}: not this volume's (move it away, or point node.journal \
                         at another file)",
                        path.display()
                    )
                })?;
            Some(sb)
        }
        Err(JournalError::NoSuperblock) => None,
        Err(e) => return Err(e).with_context(|| format!("journal {}", path.display())),
    };
    if !is_dev && file_len < size {
        file.set_len(size)
            .with_context(|| format!("journal {}: extending to {size} bytes", path.display()))?;
    }
    let Some(sb) = sb else {
        return Ok(Opened {
            file,
            cfg,
            start: JournalStart::default(),
            report: format!("journal {}: new ({cap} bytes of ring)", path.display()),
        });
    };
    let scan = journal::scan(&sb, file_len, &mut |at, len| {
        let mut b = vec![0u8; len];
        let mut got = 0;
        while got < len {
            match file.read_at(&mut b[got..], at + got as u64)? {
                0 => break,
                k => got += k,
            }
        }
        b.truncate(got);
        Ok(b)
    });
    let crashed =
        meta.has(FLAG_CRASHED_PRIMARY) || meta.role == Role::Primary && !meta.has(FLAG_CLEAN);
    let same_boot = sb.boot_id == cfg.boot_id;
    let trusted = sb.active
        && same_boot
        && crashed
        && !meta.has(FLAG_PEER_NEEDS_FULL_SYNC)
        && scan.torn.is_none()
        && sb.capacity == cap;
    let bytes: u64 = scan.items.iter().map(|i| i.payload_len()).sum();
    let mut report = format!(
        "journal {}: {} records ({bytes} bytes of data) after sequence {}",
        path.display(),
        scan.items.len(),
        sb.head_prev
    );
    if let Some(t) = &scan.torn {
        report += &format!("; torn tail: {t} (cut at the last whole record)");
    }
    if trusted && !scan.items.is_empty() {
        redo(backing, &scan.items).context("redoing the journal on the backing")?;
        report += &format!(
            "; redone on the backing, shipped again at the next promote (sequences {} to {})",
            sb.head_prev + 1,
            scan.last_seq
        );
        let start = JournalStart {
            sb_counter: sb.counter,
            disk_active: true,
            head: sb.head,
            head_prev: sb.head_prev,
            tail: scan.tail,
            last_seq: scan.last_seq,
            replay: Some((scan.items, scan.records)),
        };
        return Ok(Opened {
            file,
            cfg,
            start,
            report,
        });
    }
    if crashed && !scan.items.is_empty() {
        // Not trusted: the blocks it names are resynced, with the activity log's.
        for it in &scan.items {
            if let Some((s, e)) = it.range() {
                if !matches!(it.kind, ItemKind::Verify { .. }) {
                    meta.dirty.insert(s, e.min(meta.volume_size));
                }
            }
        }
        report += &format!(
            "; not replayed ({}): its blocks and the activity log's are resynced",
            if !sb.active {
                "it was in bitmap mode".to_string()
            } else if !same_boot {
                "written before the last reboot: the page cache it relied on is gone".into()
            } else if scan.torn.is_some() {
                "torn tail".into()
            } else if sb.capacity != cap {
                "its size changed".into()
            } else {
                "the metadata asks for a full sync".into()
            }
        );
    }
    // Start a new line of positions beyond every record on disk, so that none of them
    // can ever pass for a new one.
    let fresh = (sb.head + 2 * sb.capacity.max(cap)).div_ceil(cap) * cap;
    Ok(Opened {
        file,
        cfg,
        start: JournalStart {
            sb_counter: sb.counter,
            disk_active: sb.active,
            head: sb.head,
            head_prev: sb.head_prev,
            tail: fresh,
            last_seq: 0,
            replay: None,
        },
        report,
    })
}

/// Write the journal's items to the backing in order, then sync it.
fn redo(backing: &Path, items: &[blkrep_engine::msg::StreamItem]) -> anyhow::Result<()> {
    let f = OpenOptions::new()
        .write(true)
        .open(backing)
        .with_context(|| format!("backing {}", backing.display()))?;
    let zeroes = vec![0u8; 1 << 20];
    for it in items {
        match &it.kind {
            ItemKind::Write { offset, data, .. } => f.write_all_at(data, *offset)?,
            ItemKind::WriteZeroes { offset, len, .. } | ItemKind::Trim { offset, len } => {
                let mut done = 0;
                while done < *len {
                    let n = (*len - done).min(zeroes.len() as u64) as usize;
                    f.write_all_at(&zeroes[..n], offset + done)?;
                    done += n as u64;
                }
            }
            ItemKind::Flush | ItemKind::Verify { .. } => {}
        }
    }
    f.sync_data()?;
    Ok(())
}
