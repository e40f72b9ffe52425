//! Opening the primary's journal at start-up: read the superblocks, scan the ring, decide
//! whether the journal is trusted, and redo a trusted journal's records on the backing
//! before anything else touches it. The format and the rules are in
//! `blkrep_engine::journal`; the engine drives all later I/O.

use anyhow::Context;
use blkrep_engine::journal::{self, JournalConfig, JournalError, Superblock};
use blkrep_engine::meta::Metadata;
use blkrep_engine::msg::ItemKind;
use blkrep_engine::JournalStart;
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
    /// The ranges the journal's records were redone on (legs that were out lack them).
    pub redone: Vec<(u64, u64)>,
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
/// metadata is `meta`. A trusted journal's records are written to every leg of `legs` and
/// synced;
/// an untrusted one's ranges join `meta.dirty` (they are resynced).
pub fn open(
    path: &Path,
    size: u64,
    resource: &str,
    meta: &mut Metadata,
    meta_area: &mut crate::backend::MetaArea,
    legs: &[&Path],
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
    let opening = journal::open(
        sb.as_ref(),
        file_len,
        &mut |at, len| {
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
        },
        meta,
        &cfg,
    );
    if !opening.redo.is_empty() {
        // The metadata names the records' blocks first (see `journal::Opening::redo`).
        meta_area
            .write_sync(meta)
            .context("recording the journal's blocks in the metadata")?;
        for backing in legs {
            redo(backing, &opening.redo).context("redoing the journal on the backing")?;
        }
    }
    let redone = opening.redo.iter().filter_map(|it| it.range()).collect();
    Ok(Opened {
        file,
        cfg,
        start: opening.start,
        report: format!("journal {}: {}", path.display(), opening.report),
        redone,
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
