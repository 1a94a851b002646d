//! Exact dedup by `event_id`: the hashes of the ids received within the dedup window, by
//! received day, so whole days expire at once. Restored from the stored events at the first
//! ingest (or before following a shared log).

use std::collections::HashSet;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::Mutex;

use reelhouse_event::StoredEvent;
use reelhouse_lake::deltalake;
use reelhouse_lake::deltalake::arrow::array::RecordBatch;
use reelhouse_lake::deltalake::DeltaTable;
use reelhouse_lake::query::Catalog;
use reelhouse_lake::RawTable;

use crate::applier::raw_parts;
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
    pub(crate) days: Vec<(i32, IdSet)>,
}

impl Dedup {
    pub(crate) fn contains(&self, h: u128) -> bool {
        self.days.iter().any(|(_, s)| s.contains(&h))
    }

    pub(crate) fn insert(&mut self, day: i32, h: u128) -> bool {
        if self.contains(h) {
            return false;
        }
        match self.days.iter_mut().find(|(d, _)| *d == day) {
            Some((_, s)) => s.insert(h),
            None => {
                let mut s = IdSet::default();
                s.insert(h);
                self.days.push((day, s));
                true
            }
        }
    }

    pub(crate) fn remove(&mut self, h: u128) {
        for (_, s) in &mut self.days {
            s.remove(&h);
        }
    }

    pub(crate) fn expire(&mut self, oldest_kept_day: i32) {
        self.days.retain(|(d, _)| *d >= oldest_kept_day);
    }
}

impl Dedup {
    /// Claims each event's id (received on `received_at`'s day) before it is logged, so
    /// concurrent batches cannot both store it; keeps only first-seen events and returns the
    /// claimed hashes (to release if logging fails).
    pub(crate) fn claim(&mut self, events: &mut Vec<StoredEvent>, received_at: i64) -> Vec<u128> {
        let today = reelhouse_event::time::day_of(received_at);
        let mut claimed = Vec::with_capacity(events.len());
        events.retain(|e| {
            let h = id_hash(&e.event.event_id);
            let fresh = self.insert(today, h);
            if fresh {
                claimed.push(h);
            }
            fresh
        });
        claimed
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

/// Rebuilds the dedup set from events received since `since_ms` (committed or pending).
pub(crate) async fn restore_dedup(
    parts: Vec<(RawTable, Option<DeltaTable>, Vec<RecordBatch>)>,
    since_ms: i64,
    today: i32,
) -> Result<Dedup, Error> {
    let mut dedup = Dedup::default();
    let catalog = Catalog::new(parts).await?;
    let sql =
        format!("SELECT event_id FROM events WHERE received_at >= to_timestamp_millis({since_ms})");
    use deltalake::arrow::array::AsArray;
    for b in catalog.query(&sql).await? {
        let col = b.column(0);
        let ids =
            deltalake::arrow::compute::cast(col, &deltalake::arrow::datatypes::DataType::Utf8)
                .map_err(reelhouse_lake::Error::from)?;
        for id in ids.as_string::<i32>().iter().flatten() {
            dedup.insert(today, id_hash(id));
        }
    }
    Ok(dedup)
}
impl Engine {
    /// Reads the ids of the stored events received within the dedup window into the dedup
    /// set, once (later calls return at once; concurrent ones wait for the first). Every
    /// ingest calls it first, and so does [`Engine::follow`]; `start` calls it before
    /// serving. Holds the flush lock meanwhile, so no flush, compaction, retention or
    /// erasure removes a file the scan reads.
    pub async fn load_dedup(&self) -> Result<(), Error> {
        self.dedup
            .loaded
            .get_or_try_init(|| async {
                let _flush = self.flusher.lock.lock().await;
                let parts = {
                    let v = self.view.lock().unwrap_or_else(|p| p.into_inner());
                    raw_parts(&v.tables, &v.pending)
                };
                let now = self.config.clock.now_ms();
                let since = now - self.config.dedup_window.as_millis() as i64;
                let restored =
                    restore_dedup(parts, since, reelhouse_event::time::day_of(now)).await?;
                // Nothing was claimed before: ingest waits for this.
                *self.dedup.ids.lock().unwrap_or_else(|p| p.into_inner()) = restored;
                Ok::<(), Error>(())
            })
            .await
            .map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dedup_days_expire_whole() {
        let mut d = Dedup::default();
        assert!(d.insert(10, 1));
        assert!(!d.insert(11, 1));
        assert!(d.insert(11, 2));
        d.expire(11);
        assert!(!d.contains(1));
        assert!(d.contains(2));
        d.remove(2);
        assert!(d.insert(12, 2));
    }
}
