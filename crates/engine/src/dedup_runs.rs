//! The dedup window on disk: the 128-bit hashes of the stored events' ids, in sorted immutable
//! *runs*, one or more per received day, so that opening a data directory reads no events and
//! holds about 2 bytes per id in memory instead of a hash set of every id (docs/storage.md).
//!
//! ```text
//!  flush of events ─▶ one run per received day (ids sorted) ─▶ Delta commit
//!  four runs of one day and size tier ─▶ merged into one (size-tiered, like an LSM tree)
//!  lookup: split-block Bloom filter (memory) ─▶ fence (memory) ─▶ one 4 KiB read ─▶ search
//! ```
//!
//! A run is written *before* the Delta commit of its events, so every committed id is in a
//! run; a crash between the two leaves ids of events that are still in the WAL (committed at
//! the next flush). The runs are complete once [`MARKER`] exists: it is written after a
//! data directory's first scan of its stored events ([`crate::Engine::load_dedup`]); until
//! then flushes write no runs (that scan covers them). Ids of events erased later stay until
//! their day leaves the window: a re-sent erased event is still a duplicate.
//!
//! File layout (little-endian): the sorted ids (`u128`), every [`BLOCK`]th id (the fences),
//! the Bloom filter's words, then a footer: [`MAGIC`], day (`i32`), padding (`u32`), ids,
//! fences and filter words (`u64` each).

use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The runs' directory, under the data directory.
pub(crate) const DIR: &str = "_dedup";
/// Written once the runs hold every stored id of the window.
pub(crate) const MARKER: &str = "complete";
const MAGIC: &[u8; 8] = b"RHDEDUP1";
const FOOTER: usize = 8 + 4 + 4 + 8 * 3;
/// Ids per fence: one 4 KiB read per lookup that passes the filter.
const BLOCK: usize = 256;
/// Filter bits per id: about 0.2 % false positives for a split-block filter.
const BLOOM_BITS_PER_ID: usize = 16;
/// Runs of one day and size tier merged at once; tier = ⌊log4(ids)⌋.
const FANOUT: usize = 4;

/// A split-block Bloom filter (as Parquet's): each id sets one bit in each of the 8 words of
/// one 512-bit block, chosen from the id hash's bits (the ids are already uniform hashes).
struct Bloom {
    words: Vec<u64>,
}

impl Bloom {
    fn with_capacity(ids: usize) -> Bloom {
        let blocks = (ids * BLOOM_BITS_PER_ID).div_ceil(512).max(1);
        Bloom {
            words: vec![0; blocks * 8],
        }
    }

    fn slots(&self, h: u128) -> (usize, [u64; 8]) {
        let blocks = (self.words.len() / 8) as u128;
        let block = (((h as u64) as u128 * blocks) >> 64) as usize;
        let high = (h >> 64) as u64;
        let mut masks = [0u64; 8];
        for (i, m) in masks.iter_mut().enumerate() {
            *m = 1u64 << ((high >> (i * 6)) & 63);
        }
        (block * 8, masks)
    }

    fn insert(&mut self, h: u128) {
        let (at, masks) = self.slots(h);
        for (w, m) in self.words[at..at + 8].iter_mut().zip(masks) {
            *w |= m;
        }
    }

    fn may_contain(&self, h: u128) -> bool {
        let (at, masks) = self.slots(h);
        self.words[at..at + 8]
            .iter()
            .zip(masks)
            .all(|(w, m)| w & m != 0)
    }
}

/// One immutable run: its filter and fences in memory, its ids on disk.
pub(crate) struct Run {
    pub(crate) day: i32,
    pub(crate) len: u64,
    seq: u64,
    path: PathBuf,
    file: File,
    bloom: Bloom,
    fences: Vec<u128>,
}

impl Run {
    fn tier(&self) -> u32 {
        self.len.max(1).ilog(FANOUT as u64)
    }

    /// Whether `h` is one of the run's ids.
    fn contains(&self, h: u128) -> std::io::Result<bool> {
        if !self.bloom.may_contain(h) {
            return Ok(false);
        }
        let b = self.fences.partition_point(|f| *f <= h);
        if b == 0 {
            return Ok(false);
        }
        let first = (b - 1) * BLOCK;
        let n = BLOCK.min(self.len as usize - first);
        let mut buf = vec![0u8; n * 16];
        self.file.read_exact_at(&mut buf, first as u64 * 16)?;
        let ids: Vec<u128> = buf
            .chunks_exact(16)
            .map(|c| u128::from_le_bytes(c.try_into().expect("16 bytes")))
            .collect();
        Ok(ids.binary_search(&h).is_ok())
    }

    /// Opens a run file: reads its footer, fences and filter.
    fn open(path: PathBuf, seq: u64) -> std::io::Result<Run> {
        let bad = |what: &str| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("dedup run {}: {what}", path.display()),
            )
        };
        let file = File::open(&path)?;
        let size = file.metadata()?.len();
        if size < FOOTER as u64 {
            return Err(bad("shorter than its footer"));
        }
        let mut footer = [0u8; FOOTER];
        file.read_exact_at(&mut footer, size - FOOTER as u64)?;
        if &footer[..8] != MAGIC {
            return Err(bad("not a dedup run"));
        }
        let u64_at = |i: usize| u64::from_le_bytes(footer[i..i + 8].try_into().expect("8"));
        let day = i32::from_le_bytes(footer[8..12].try_into().expect("4"));
        let (len, n_fences, n_words) = (u64_at(16), u64_at(24), u64_at(32));
        if len * 16 + n_fences * 16 + n_words * 8 + FOOTER as u64 != size
            || n_fences != len.div_ceil(BLOCK as u64)
            || n_words == 0
            || n_words % 8 != 0
        {
            return Err(bad("sizes do not match its footer"));
        }
        let mut buf = vec![0u8; (n_fences * 16 + n_words * 8) as usize];
        file.read_exact_at(&mut buf, len * 16)?;
        let (f, w) = buf.split_at(n_fences as usize * 16);
        let fences = f
            .chunks_exact(16)
            .map(|c| u128::from_le_bytes(c.try_into().expect("16")))
            .collect();
        let words = w
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().expect("8")))
            .collect();
        Ok(Run {
            day,
            len,
            seq,
            path,
            file,
            bloom: Bloom { words },
            fences,
        })
    }

    /// Reads every id in order (for a merge).
    fn ids(&self) -> std::io::Result<impl Iterator<Item = std::io::Result<u128>>> {
        let mut r = BufReader::with_capacity(1 << 16, File::open(&self.path)?);
        let mut left = self.len;
        Ok(std::iter::from_fn(move || {
            if left == 0 {
                return None;
            }
            left -= 1;
            let mut b = [0u8; 16];
            Some(r.read_exact(&mut b).map(|_| u128::from_le_bytes(b)))
        }))
    }
}

/// Writes a run from ascending ids (repeats skipped), at most `capacity` of them, without
/// holding them in memory; renamed into place once synced.
fn write_run(
    dir: &Path,
    day: i32,
    seq: u64,
    capacity: usize,
    ids: impl Iterator<Item = std::io::Result<u128>>,
) -> std::io::Result<Run> {
    let path = dir.join(format!("{day}-{seq:012}.run"));
    let tmp = path.with_extension("tmp");
    let mut w = BufWriter::with_capacity(1 << 16, File::create(&tmp)?);
    let mut bloom = Bloom::with_capacity(capacity);
    let mut fences = Vec::with_capacity(capacity.div_ceil(BLOCK));
    let mut len = 0u64;
    let mut last = None;
    for id in ids {
        let id = id?;
        if last.is_some_and(|l| l >= id) {
            if last == Some(id) {
                continue;
            }
            return Err(std::io::Error::other("dedup run ids out of order"));
        }
        last = Some(id);
        if len.is_multiple_of(BLOCK as u64) {
            fences.push(id);
        }
        bloom.insert(id);
        w.write_all(&id.to_le_bytes())?;
        len += 1;
    }
    for f in &fences {
        w.write_all(&f.to_le_bytes())?;
    }
    for word in &bloom.words {
        w.write_all(&word.to_le_bytes())?;
    }
    w.write_all(MAGIC)?;
    w.write_all(&day.to_le_bytes())?;
    w.write_all(&[0u8; 4])?;
    for n in [len, fences.len() as u64, bloom.words.len() as u64] {
        w.write_all(&n.to_le_bytes())?;
    }
    let f = w.into_inner().map_err(|e| e.into_error())?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, &path)?;
    File::open(dir)?.sync_all()?;
    Run::open(path, seq)
}

/// The runs of a data directory.
pub(crate) struct RunSet {
    dir: PathBuf,
    runs: Vec<Arc<Run>>,
    next_seq: u64,
}

/// A merge to do: the runs of one day and tier.
pub(crate) struct Merge {
    pub(crate) dir: PathBuf,
    pub(crate) seq: u64,
    pub(crate) inputs: Vec<Arc<Run>>,
}

impl RunSet {
    /// Opens the runs under `data_dir` (creating the directory; removing files a crash left
    /// half written).
    pub(crate) fn open(data_dir: &Path) -> std::io::Result<RunSet> {
        let dir = data_dir.join(DIR);
        std::fs::create_dir_all(&dir)?;
        let mut runs = Vec::new();
        let mut next_seq = 1;
        for entry in std::fs::read_dir(&dir)? {
            let path = entry?.path();
            match path.extension().and_then(|e| e.to_str()) {
                Some("tmp") => std::fs::remove_file(&path)?,
                Some("run") => {
                    let seq = path
                        .file_stem()
                        .and_then(|s| s.to_str())
                        .and_then(|s| s.rsplit('-').next())
                        .and_then(|s| s.parse::<u64>().ok())
                        .ok_or_else(|| std::io::Error::other("dedup run with a bad name"))?;
                    next_seq = next_seq.max(seq + 1);
                    runs.push(Arc::new(Run::open(path, seq)?));
                }
                _ => {}
            }
        }
        runs.sort_by_key(|r| r.seq);
        Ok(RunSet {
            dir,
            runs,
            next_seq,
        })
    }

    pub(crate) fn is_complete(&self) -> bool {
        self.dir.join(MARKER).exists()
    }

    pub(crate) fn mark_complete(&self) -> std::io::Result<()> {
        reelhouse_lake::store::write_atomically(&self.dir.join(MARKER), b"")
    }

    /// Whether any run holds `h`.
    pub(crate) fn contains(&self, h: u128) -> std::io::Result<bool> {
        for r in self.runs.iter().rev() {
            if r.contains(h)? {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Where new runs go and the sequence numbers to name `n` of them.
    pub(crate) fn reserve(&mut self, n: usize) -> (PathBuf, u64) {
        let first = self.next_seq;
        self.next_seq += n as u64;
        (self.dir.clone(), first)
    }

    pub(crate) fn add(&mut self, run: Run) {
        self.runs.push(Arc::new(run));
    }

    /// The next merge due: [`FANOUT`] runs of one day in one size tier.
    pub(crate) fn due_merge(&mut self) -> Option<Merge> {
        let mut groups: std::collections::BTreeMap<(i32, u32), Vec<Arc<Run>>> = Default::default();
        for r in &self.runs {
            groups
                .entry((r.day, r.tier()))
                .or_default()
                .push(Arc::clone(r));
        }
        let inputs = groups.into_values().find(|g| g.len() >= FANOUT)?;
        let (dir, seq) = self.reserve(1);
        Some(Merge { dir, seq, inputs })
    }

    /// Puts a merged run in place of its inputs and deletes their files.
    pub(crate) fn replace(&mut self, inputs: &[Arc<Run>], merged: Run) -> std::io::Result<()> {
        self.runs.retain(|r| !inputs.iter().any(|i| i.seq == r.seq));
        self.runs.push(Arc::new(merged));
        for i in inputs {
            std::fs::remove_file(&i.path)?;
        }
        Ok(())
    }

    /// Deletes every run (before a data directory's first full scan writes them anew).
    pub(crate) fn clear(&mut self) -> std::io::Result<()> {
        for r in self.runs.drain(..) {
            std::fs::remove_file(&r.path)?;
        }
        Ok(())
    }

    /// Deletes the runs of received days before `oldest_kept_day`.
    pub(crate) fn expire(&mut self, oldest_kept_day: i32) -> std::io::Result<()> {
        let (old, kept) = self.runs.drain(..).partition(|r| r.day < oldest_kept_day);
        self.runs = kept;
        for r in old {
            std::fs::remove_file(&r.path)?;
        }
        Ok(())
    }

    /// Ids held, and the bytes of memory their filters and fences take.
    #[cfg(test)]
    pub(crate) fn stats(&self) -> (u64, u64) {
        self.runs.iter().fold((0, 0), |(n, b), r| {
            (
                n + r.len,
                b + (r.bloom.words.len() * 8 + r.fences.len() * 16) as u64,
            )
        })
    }
}

/// Writes one run per day of `by_day` (ids in any order), named from `first_seq` on.
pub(crate) fn write_runs(
    dir: &Path,
    first_seq: u64,
    by_day: std::collections::BTreeMap<i32, Vec<u128>>,
) -> std::io::Result<Vec<Run>> {
    by_day
        .into_iter()
        .enumerate()
        .map(|(i, (day, mut ids))| {
            ids.sort_unstable();
            let n = ids.len();
            write_run(dir, day, first_seq + i as u64, n, ids.into_iter().map(Ok))
        })
        .collect()
}

/// Merges the runs of `m` into one, streaming (memory: one buffer per input).
pub(crate) fn merge(m: &Merge) -> std::io::Result<Run> {
    let mut heads = Vec::with_capacity(m.inputs.len());
    for r in &m.inputs {
        let mut it = r.ids()?;
        let first = it.next().transpose()?;
        heads.push((first, it));
    }
    let capacity = m.inputs.iter().map(|r| r.len as usize).sum();
    let day = m.inputs[0].day;
    let merged = std::iter::from_fn(|| {
        let (i, _) = heads
            .iter()
            .enumerate()
            .filter_map(|(i, (h, _))| h.map(|h| (i, h)))
            .min_by_key(|(_, h)| *h)?;
        let (head, it) = &mut heads[i];
        let out = head.take().expect("checked above");
        match it.next().transpose() {
            Ok(next) => *head = next,
            Err(e) => return Some(Err(e)),
        }
        Some(Ok(out))
    });
    write_run(&m.dir, day, m.seq, capacity, merged)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::{BTreeMap, HashSet};

    fn hashes(range: std::ops::Range<u64>) -> Vec<u128> {
        range
            .map(|i| xxhash_rust::xxh3::xxh3_128(&i.to_le_bytes()))
            .collect()
    }

    #[test]
    fn runs_find_every_id_and_no_other_across_merges_and_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let mut set = RunSet::open(dir.path()).unwrap();
        let mut stored = HashSet::new();
        // Runs of 1..1,000 ids (one spans several blocks), two days.
        for (k, n) in [3u64, 700, 1, 256, 257, 1000, 40, 40, 40, 40, 5]
            .into_iter()
            .enumerate()
        {
            let start = k as u64 * 10_000;
            let ids = hashes(start..start + n);
            stored.extend(ids.iter().copied());
            let (d, seq) = set.reserve(1);
            // The four runs of 40 share a day and a tier: they merge.
            let day = 20_000 + (k < 6 && k % 2 == 1) as i32;
            for run in write_runs(&d, seq, BTreeMap::from([(day, ids)])).unwrap() {
                set.add(run);
            }
            while let Some(m) = set.due_merge() {
                let merged = merge(&m).unwrap();
                set.replace(&m.inputs, merged).unwrap();
            }
        }
        let check = |set: &RunSet| {
            for h in &stored {
                assert!(set.contains(*h).unwrap());
            }
            let absent = hashes(1_000_000..1_020_000);
            let false_hits = absent.iter().filter(|h| set.contains(**h).unwrap()).count();
            assert_eq!(false_hits, 0, "a hash not stored was found");
        };
        check(&set);
        assert_eq!(set.runs.len(), 8, "the four runs of 40 merged into one");
        assert_eq!(set.stats().0, stored.len() as u64);
        let reopened = RunSet::open(dir.path()).unwrap();
        assert_eq!(reopened.runs.len(), set.runs.len());
        check(&reopened);
        let mut reopened = reopened;
        reopened.expire(20_001).unwrap();
        assert!(reopened.runs.iter().all(|r| r.day == 20_001));
        assert_eq!(
            RunSet::open(dir.path()).unwrap().runs.len(),
            reopened.runs.len()
        );
    }

    #[test]
    fn a_damaged_run_is_an_error_not_an_empty_set() {
        let dir = tempfile::tempdir().unwrap();
        let mut set = RunSet::open(dir.path()).unwrap();
        let (d, seq) = set.reserve(1);
        let runs = write_runs(&d, seq, BTreeMap::from([(1, hashes(0..10))])).unwrap();
        let path = runs[0].path.clone();
        let len = std::fs::metadata(&path).unwrap().len();
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(len - 1)
            .unwrap();
        assert!(RunSet::open(dir.path()).is_err());
    }

    #[test]
    fn bloom_filter_false_positives_are_rare() {
        let mut b = Bloom::with_capacity(100_000);
        for h in hashes(0..100_000) {
            b.insert(h);
        }
        let fp = hashes(200_000..300_000)
            .into_iter()
            .filter(|h| b.may_contain(*h))
            .count();
        // 16 bits per id: about 0.1-0.2 %.
        assert!(fp < 500, "{fp} false positives in 100,000");
    }
}
