//! The snapshot file `_state/online.snap`: the encoded store and the last WAL segment it
//! covers. On start the server loads it and replays the WAL records of later segments.
//!
//! Layout: `RHOS` magic, u32 format version, u64 segment, u32 CRC-32 of the payload, payload.
//! Written to a temp file, fsynced, renamed, and the directory fsynced, so a crash leaves
//! either the old snapshot or the new one.

use std::io::Write;
use std::path::{Path, PathBuf};

use crate::{Error, Result};

const MAGIC: &[u8; 4] = b"RHOS";
const VERSION: u32 = 1;
const HEADER: usize = 4 + 4 + 8 + 4;

/// Where the snapshot of a data directory lives.
pub fn path(data_dir: &Path) -> PathBuf {
    data_dir.join("_state").join("online.snap")
}

/// Durably replaces the snapshot with `payload`, covering WAL segments ≤ `segment`.
pub fn save(data_dir: &Path, segment: u64, payload: &[u8]) -> std::io::Result<()> {
    let path = path(data_dir);
    let dir = path.parent().unwrap_or(data_dir);
    std::fs::create_dir_all(dir)?;
    let tmp = dir.join("online.snap.tmp");
    let mut f = std::io::BufWriter::new(std::fs::File::create(&tmp)?);
    f.write_all(MAGIC)?;
    f.write_all(&VERSION.to_le_bytes())?;
    f.write_all(&segment.to_le_bytes())?;
    f.write_all(&crc32fast::hash(payload).to_le_bytes())?;
    f.write_all(payload)?;
    let f = f.into_inner().map_err(|e| e.into_error())?;
    f.sync_all()?;
    std::fs::rename(&tmp, &path)?;
    std::fs::File::open(dir)?.sync_all()?;
    Ok(())
}

/// The header's segment and payload CRC, once its magic and format version are checked.
fn header(h: &[u8]) -> Result<(u64, u32)> {
    let bad = |what: &str| Error::Snapshot(what.to_string());
    if h.len() < HEADER || &h[..4] != MAGIC {
        return Err(bad("not a reelhouse feature snapshot"));
    }
    let u32_at = |i: usize| u32::from_le_bytes(h[i..i + 4].try_into().expect("4 bytes"));
    if u32_at(4) != VERSION {
        return Err(bad("snapshot format version is not supported"));
    }
    let seg = u64::from_le_bytes(h[8..16].try_into().expect("8 bytes"));
    Ok((seg, u32_at(16)))
}

/// The last WAL segment the snapshot covers, from its header alone (`Ok(None)` when there is
/// no snapshot); the payload is not read or checked.
pub fn segment(data_dir: &Path) -> Result<Option<u64>> {
    use std::io::Read;
    let f = match std::fs::File::open(path(data_dir)) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::Snapshot(e.to_string())),
    };
    let mut h = Vec::with_capacity(HEADER);
    f.take(HEADER as u64)
        .read_to_end(&mut h)
        .map_err(|e| Error::Snapshot(e.to_string()))?;
    Ok(Some(header(&h)?.0))
}

/// Reads the snapshot: `Ok(None)` when there is none; an error when it is damaged (the caller
/// rebuilds from the tables instead).
pub fn load(data_dir: &Path) -> Result<Option<(u64, Vec<u8>)>> {
    let mut bytes = match std::fs::read(path(data_dir)) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::Snapshot(e.to_string())),
    };
    let (seg, crc) = header(&bytes)?;
    let payload = bytes.split_off(HEADER);
    if crc32fast::hash(&payload) != crc {
        return Err(Error::Snapshot("snapshot checksum does not match".into()));
    }
    Ok(Some((seg, payload)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_damage() {
        let dir = tempfile::tempdir().unwrap();
        assert!(load(dir.path()).unwrap().is_none());
        save(dir.path(), 7, b"payload").unwrap();
        assert_eq!(load(dir.path()).unwrap(), Some((7, b"payload".to_vec())));
        assert_eq!(segment(dir.path()).unwrap(), Some(7));
        let p = path(dir.path());
        let mut b = std::fs::read(&p).unwrap();
        let last = b.len() - 1;
        b[last] ^= 1;
        std::fs::write(&p, b).unwrap();
        assert!(load(dir.path()).is_err());
    }
}
