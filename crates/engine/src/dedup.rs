//! Exact dedup by `event_id`: the 128-bit hashes of the ids received within the dedup window,
//! by received day, so whole days expire at once. The ids of events not yet committed to
//! Delta are held in memory; a flush moves those it commits into sorted runs on disk
//! ([`crate::dedup_runs`]), so memory holds only what is pending. A data directory written
//! before the runs existed is scanned once, at its first ingest (or before following a
//! shared log).

use std::collections::{BTreeMap, HashSet};
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::Mutex;

use reelhouse_event::StoredEvent;
use reelhouse_lake::deltalake;
use reelhouse_lake::deltalake::arrow::array::RecordBatch;
use reelhouse_lake::deltalake::DeltaTable;
use reelhouse_lake::query::Catalog;
use reelhouse_lake::RawTable;

use futures::StreamExt;

use crate::applier::raw_parts;
use crate::dedup_runs::{merge, write_runs, RunSet};
use crate::{Engine, Error};

/// The dedup component of the engine.
#[derive(Default)]
pub(crate) struct DedupState {
    /// The ids of the stored events received within the dedup window, once
    /// [`Engine::load_dedup`] has read them (empty before).
    pub(crate) ids: Mutex<Dedup>,
    /// Set when `ids` holds the stored ids: loaded at the first ingest, by the server's
    /// start, or before following a shared log, so that one-shot commands that never ingest
    /// (materialize, restate, forget, retention, check) do not scan the events for them.
    pub(crate) loaded: tokio::sync::OnceCell<()>,
}

/// The u128 is already a good hash; use its low bits directly.
#[derive(Default)]
pub(crate) struct IdHasher(u64);
impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0 << 8) | *b as u64;
        }
    }
    fn write_u128(&mut self, n: u128) {
        self.0 = n as u64;
    }
}
pub(crate) type IdSet = HashSet<u128, BuildHasherDefault<IdHasher>>;

/// Event-id hashes by the UTC day they were received; whole days expire at once.
#[derive(Default)]
pub(crate) struct Dedup {
    /// Ids not in a run yet (claimed, not yet committed to Delta).
    pub(crate) days: Vec<(i32, IdSet)>,
    /// The committed ids, on disk; `None` for an ingest node's window, which is in memory.
    pub(crate) runs: Option<RunSet>,
}

impl Dedup {
    pub(crate) fn contains(&self, h: u128) -> std::io::Result<bool> {
        if self.days.iter().any(|(_, s)| s.contains(&h)) {
            return Ok(true);
        }
        match &self.runs {
            Some(r) => r.contains(h),
            None => Ok(false),
        }
    }

    pub(crate) fn insert(&mut self, day: i32, h: u128) -> std::io::Result<bool> {
        if self.contains(h)? {
            return Ok(false);
        }
        Ok(match self.days.iter_mut().find(|(d, _)| *d == day) {
            Some((_, s)) => s.insert(h),
            None => {
                let mut s = IdSet::default();
                s.insert(h);
                self.days.push((day, s));
                true
            }
        })
    }

    pub(crate) fn remove(&mut self, h: u128) {
        for (_, s) in &mut self.days {
            s.remove(&h);
        }
    }

    pub(crate) fn expire(&mut self, oldest_kept_day: i32) -> std::io::Result<()> {
        self.days.retain(|(d, _)| *d >= oldest_kept_day);
        match &mut self.runs {
            Some(r) => r.expire(oldest_kept_day),
            None => Ok(()),
        }
    }
}

impl Dedup {
    /// Claims each event's id (received on `received_at`'s day) before it is logged, so
    /// concurrent batches cannot both store it; keeps only first-seen events and returns the
    /// claimed hashes (to release if logging fails).
    pub(crate) fn claim(
        &mut self,
        events: &mut Vec<StoredEvent>,
        received_at: i64,
    ) -> std::io::Result<Vec<u128>> {
        let today = reelhouse_event::time::day_of(received_at);
        let mut claimed = Vec::with_capacity(events.len());
        let mut failed = None;
        events.retain(|e| {
            let h = id_hash(&e.event.event_id);
            match self.insert(today, h) {
                Ok(fresh) => {
                    if fresh {
                        claimed.push(h);
                    }
                    fresh
                }
                Err(e) => {
                    failed.get_or_insert(e);
                    false
                }
            }
        });
        match failed {
            Some(e) => {
                self.release(claimed);
                Err(e)
            }
            None => Ok(claimed),
        }
    }

    pub(crate) fn release(&mut self, claimed: Vec<u128>) {
        for h in claimed {
            self.remove(h);
        }
    }
}

pub(crate) fn id_hash(event_id: &str) -> u128 {
    xxhash_rust::xxh3::xxh3_128(event_id.as_bytes())
}

/// Hashes of the `event_id`s of `batches` (events with their `received_at`), by the UTC day
/// they were received.
pub(crate) fn ids_by_day(batches: &[RecordBatch]) -> Result<BTreeMap<i32, Vec<u128>>, Error> {
    use deltalake::arrow::array::{Array, AsArray};
    use deltalake::arrow::datatypes::{DataType, Int64Type, TimeUnit};
    let mut out: BTreeMap<i32, Vec<u128>> = BTreeMap::new();
    for b in batches {
        let (Some(ids), Some(at)) = (
            b.column_by_name("event_id"),
            b.column_by_name("received_at"),
        ) else {
            return Err(Error::Internal(
                "an events batch lacks event_id or received_at",
            ));
        };
        let cast = |c, t: &DataType| {
            deltalake::arrow::compute::cast(c, t).map_err(reelhouse_lake::Error::from)
        };
        let ids = cast(ids, &DataType::Utf8)?;
        let at = cast(at, &DataType::Timestamp(TimeUnit::Millisecond, None))?;
        let at = cast(&at, &DataType::Int64)?;
        let (ids, at) = (ids.as_string::<i32>(), at.as_primitive::<Int64Type>());
        for i in 0..ids.len() {
            if ids.is_valid(i) && at.is_valid(i) {
                let day = reelhouse_event::time::day_of(at.value(i));
                out.entry(day).or_default().push(id_hash(ids.value(i)));
            }
        }
    }
    Ok(out)
}

/// Ids per run written by a data directory's first scan: the scan holds this many at most.
const SCAN_RUN_IDS: usize = 1 << 20;

impl Engine {
    /// Runs `f` on the dedup runs, opening them first if need be.
    fn with_runs<T>(&self, f: impl FnOnce(&mut RunSet) -> T) -> Result<T, Error> {
        let mut d = self.dedup.ids.lock().unwrap_or_else(|p| p.into_inner());
        if d.runs.is_none() {
            d.runs = Some(RunSet::open(self.lake.root())?);
        }
        Ok(f(d.runs.as_mut().expect("opened above")))
    }

    /// Writes the ids of events about to be committed as runs (one per received day), then
    /// drops them from memory. Called by a flush, with the flush lock held, before the Delta
    /// commit; nothing before a data directory's first scan (which covers them).
    pub(crate) async fn persist_ids(&self, batches: &[RecordBatch]) -> Result<(), Error> {
        let (complete, dir, seq, by_day) = {
            let by_day = ids_by_day(batches)?;
            let n = by_day.len();
            let (complete, (dir, seq)) = self.with_runs(|r| (r.is_complete(), r.reserve(n)))?;
            (complete, dir, seq, by_day)
        };
        if !complete || by_day.is_empty() {
            return Ok(());
        }
        let hashes: Vec<u128> = by_day.values().flatten().copied().collect();
        let runs = tokio::task::spawn_blocking(move || write_runs(&dir, seq, by_day))
            .await
            .map_err(|_| Error::ShuttingDown)??;
        let mut d = self.dedup.ids.lock().unwrap_or_else(|p| p.into_inner());
        for run in runs {
            d.runs.as_mut().expect("opened above").add(run);
        }
        for h in hashes {
            d.remove(h);
        }
        Ok(())
    }

    /// Merges runs while a day has [`crate::dedup_runs`]' fan-out of one size; with the flush
    /// lock held. Lookups go on meanwhile (they see the inputs until the swap).
    pub(crate) async fn merge_runs(&self) -> Result<(), Error> {
        while let Some(m) = self.with_runs(|r| r.due_merge())? {
            let m = std::sync::Arc::new(m);
            let merged = {
                let m = std::sync::Arc::clone(&m);
                tokio::task::spawn_blocking(move || merge(&m))
                    .await
                    .map_err(|_| Error::ShuttingDown)??
            };
            self.with_runs(|r| r.replace(&m.inputs, merged))??;
        }
        Ok(())
    }

    /// Reads the ids of the stored events received within the dedup window, once (later
    /// calls return at once; concurrent ones wait for the first). Every ingest calls it
    /// first, and so does [`Engine::follow`]; `start` calls it before serving. Committed ids
    /// are in the runs on disk; a data directory without them (written before they existed)
    /// is scanned once to write them. The pending ids (replayed from the WAL) go to memory.
    /// Holds the flush lock meanwhile, so no flush, compaction, retention or erasure removes
    /// a file the scan reads.
    pub async fn load_dedup(&self) -> Result<(), Error> {
        self.dedup
            .loaded
            .get_or_try_init(|| async {
                let _flush = self.flusher.lock.lock().await;
                let (committed, pending) = {
                    let v = self.view.lock().unwrap_or_else(|p| p.into_inner());
                    (
                        raw_parts(&v.tables, &Default::default()),
                        v.pending.batches(RawTable::Events, None),
                    )
                };
                let since =
                    self.config.clock.now_ms() - self.config.dedup_window.as_millis() as i64;
                let oldest = reelhouse_event::time::day_of(since) - 1;
                if !self.with_runs(|r| r.is_complete())? {
                    self.with_runs(|r| r.clear())??;
                    self.scan_into_runs(committed, since).await?;
                    self.merge_runs().await?;
                    self.with_runs(|r| r.mark_complete())??;
                }
                let mut d = self.dedup.ids.lock().unwrap_or_else(|p| p.into_inner());
                d.expire(oldest)?;
                for (day, ids) in ids_by_day(&pending)? {
                    for h in ids {
                        d.insert(day, h)?;
                    }
                }
                Ok::<(), Error>(())
            })
            .await
            .map(|_| ())
    }

    /// A data directory's first scan: the committed ids received since `since_ms` into runs
    /// of at most [`SCAN_RUN_IDS`] each.
    async fn scan_into_runs(
        &self,
        parts: Vec<(RawTable, Option<DeltaTable>, Vec<RecordBatch>)>,
        since_ms: i64,
    ) -> Result<(), Error> {
        let catalog = Catalog::new(parts).await?;
        let sql = format!(
            "SELECT event_id, received_at FROM events \
             WHERE received_at >= to_timestamp_millis({since_ms})"
        );
        let mut held: BTreeMap<i32, Vec<u128>> = BTreeMap::new();
        let mut stream = catalog
            .plan(&sql)
            .await?
            .execute_stream()
            .await
            .map_err(reelhouse_lake::Error::from)?;
        loop {
            let next = stream.next().await;
            let full: Vec<i32> = held
                .iter()
                .filter(|(_, ids)| next.is_none() || ids.len() >= SCAN_RUN_IDS)
                .map(|(d, _)| *d)
                .collect();
            for day in full {
                let ids = held.remove(&day).unwrap_or_default();
                let (dir, seq) = self.with_runs(|r| r.reserve(1))?;
                let runs = tokio::task::spawn_blocking(move || {
                    write_runs(&dir, seq, BTreeMap::from([(day, ids)]))
                })
                .await
                .map_err(|_| Error::ShuttingDown)??;
                self.with_runs(|r| runs.into_iter().for_each(|run| r.add(run)))?;
            }
            let Some(b) = next else { break };
            let b = b.map_err(reelhouse_lake::Error::from)?;
            for (day, ids) in ids_by_day(&[b])? {
                held.entry(day).or_default().extend(ids);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dedup_days_expire_whole() {
        let mut d = Dedup::default();
        assert!(d.insert(10, 1).unwrap());
        assert!(!d.insert(11, 1).unwrap());
        assert!(d.insert(11, 2).unwrap());
        d.expire(11).unwrap();
        assert!(!d.contains(1).unwrap());
        assert!(d.contains(2).unwrap());
        d.remove(2);
        assert!(d.insert(12, 2).unwrap());
    }
}
