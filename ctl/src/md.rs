//! `create-md` and `dump-md`: the metadata area, read and written directly (the daemon is
//! not running when these run).

use anyhow::{bail, Context};
use blkrep_common::config::Config;
use blkrep_engine::meta::{MetaError, Metadata, AREA_SIZE, SLOT_SIZE};
use std::io::{Read, Write};
use std::os::unix::fs::FileTypeExt;

fn random_u64() -> anyhow::Result<u64> {
    let mut b = [0u8; 8];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .context("reading /dev/urandom")?;
    Ok(u64::from_ne_bytes(b))
}

fn size_of(path: &std::path::Path) -> anyhow::Result<u64> {
    let f = std::fs::File::open(path)?;
    let md = f.metadata()?;
    if md.file_type().is_block_device() {
        use std::io::Seek;
        let mut f = f;
        Ok(f.seek(std::io::SeekFrom::End(0))?)
    } else {
        Ok(md.len())
    }
}

/// Write fresh metadata for `node`.
pub fn create(cfg: &Config, node: &str, force: bool) -> anyhow::Result<String> {
    let n = cfg.node(node)?;
    let size = cfg.resource.size;
    let have = size_of(&n.backing)
        .with_context(|| format!("backing {} (node.backing)", n.backing.display()))?;
    if have < size {
        bail!(
            "backing {} is {have} bytes, the resource needs {size} bytes (resource.size)",
            n.backing.display()
        );
    }
    if let Some(m) = &n.legs.mirror {
        let have = size_of(m).with_context(|| format!("mirror {} (node.mirror)", m.display()))?;
        if have < size {
            bail!(
                "mirror {} is {have} bytes, the resource needs {size} bytes (resource.size)",
                m.display()
            );
        }
    }
    match read_area(&n.metadata) {
        Ok(Some(area)) => match Metadata::decode_area(&area) {
            Ok((m, _)) if !force => bail!(
                "{} already holds blkrep metadata (resource {:?}, node {:?}, generation {:016x}); \
                 use --force to overwrite it and lose its replication state",
                n.metadata.display(),
                m.resource,
                m.node,
                m.generation
            ),
            _ => {}
        },
        Ok(None) => {}
        Err(e) => return Err(e),
    }
    let meta = Metadata::new(&cfg.resource.name, node, size, random_u64()?);
    let mut area = meta.encode_slot()?;
    area.resize(AREA_SIZE, 0);
    if let Some(dir) = n.metadata.parent() {
        std::fs::create_dir_all(dir).ok();
    }
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&n.metadata)
        .with_context(|| format!("metadata {} (node.metadata)", n.metadata.display()))?;
    f.write_all(&area)?;
    f.sync_all()?;
    // A new volume: the legs' old record (which leg holds what) does not describe it. Without
    // it the next start copies the backing onto the mirror in full.
    let legs = cfg.legs_state(n);
    let legs_note = match std::fs::remove_file(&legs) {
        Ok(()) => format!("; the old leg state {} was removed", legs.display()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(e).with_context(|| format!("removing {}", legs.display())),
    };
    let mirror_note = if n.legs.mirror.is_some() {
        "; the mirror is copied from the backing in full when the daemon starts"
    } else {
        ""
    };
    Ok(format!(
        "{}/{node}: metadata created in {} ({} bytes volume, slot size {SLOT_SIZE}){legs_note}{mirror_note}",
        cfg.resource.name,
        n.metadata.display(),
        size
    ))
}

/// The raw area, or None when the file does not exist.
fn read_area(path: &std::path::Path) -> anyhow::Result<Option<Vec<u8>>> {
    let mut f = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("metadata {}", path.display())),
    };
    let mut area = Vec::with_capacity(AREA_SIZE);
    (&mut f)
        .take(AREA_SIZE as u64)
        .read_to_end(&mut area)
        .with_context(|| format!("reading metadata {}", path.display()))?;
    Ok(Some(area))
}

/// Read and check `node`'s metadata.
pub fn read(cfg: &Config, node: &str) -> anyhow::Result<Metadata> {
    let n = cfg.node(node)?;
    let path = &n.metadata;
    let Some(area) = read_area(path)? else {
        bail!(
            "metadata {} does not exist: run `blkrep create-md` first",
            path.display()
        );
    };
    let (m, _) = Metadata::decode_area(&area)
        .map_err(|e: MetaError| anyhow::anyhow!("metadata {}: {e}", path.display()))?;
    m.check_identity(&cfg.resource.name, node, cfg.resource.size)
        .map_err(|e| anyhow::anyhow!("metadata {}: {e}", path.display()))?;
    Ok(m)
}

/// The metadata as JSON.
pub fn to_json(m: &Metadata) -> serde_json::Value {
    use blkrep_engine::meta::{FLAG_CLEAN, FLAG_PEER_NEEDS_FULL_SYNC};
    serde_json::json!({
        "resource": m.resource,
        "node": m.node,
        "volume_size": m.volume_size,
        "node_uuid": format!("{:016x}", m.node_uuid),
        "generation": format!("{:016x}", m.generation),
        "history": m.history.iter().map(|g| format!("{g:016x}")).collect::<Vec<_>>(),
        "applied_seq": m.applied_seq,
        "role": m.role,
        "disk_state": m.disk_state,
        "clean_shutdown": m.has(FLAG_CLEAN),
        "peer_needs_full_sync": m.has(FLAG_PEER_NEEDS_FULL_SYNC),
        "crashed_primary": m.has(blkrep_engine::meta::FLAG_CRASHED_PRIMARY),
        "dirty_block_size": m.dirty.block(),
        "dirty_bytes": m.dirty.bytes(),
        "dirty_ranges": m.dirty.iter().collect::<Vec<_>>(),
        "update_counter": m.counter,
    })
}
