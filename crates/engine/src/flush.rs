//! Flush: commits what is pending to Delta at an exact WAL cut, compacts small `events`
//! files, snapshots the feature store, and truncates the WAL (or acknowledges the shared log)
//! behind both.
//!
//! ```text
//!  rotate WAL → segment S (applier cut) ─▶ Delta commit of pending ≤ S (txn = S) ─▶ swap view
//!  ─▶ compaction ─▶ feature snapshot ─▶ delete WAL segments ≤ min(S, snapshot)
//! ```

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use reelhouse_lake::RawTable;
use tokio_util::sync::CancellationToken;

use crate::source::Source;
use crate::tasks::stop_within;
use crate::{Engine, Error};

/// The flusher component of the engine.
pub(crate) struct FlushState {
    /// Held by a flush, compaction, retention or erasure: one table writer at a time.
    pub(crate) lock: tokio::sync::Mutex<()>,
    /// WAL segments ≤ this are covered by the feature snapshot on disk (0 = no snapshot yet);
    /// segments above it are never deleted, so snapshot + WAL always restore the store.
    pub(crate) snapshot_segment: AtomicU64,
    pub(crate) last_snapshot: Mutex<Instant>,
    /// The feature store was left on disk ([`crate::EngineConfig::defer_features`]): it is
    /// empty here, so it is never applied to or snapshotted.
    pub(crate) features_deferred: bool,
}

impl FlushState {
    pub(crate) fn new(snapshot_segment: u64, features_deferred: bool) -> Self {
        FlushState {
            lock: tokio::sync::Mutex::new(()),
            snapshot_segment: AtomicU64::new(snapshot_segment),
            last_snapshot: Mutex::new(Instant::now()),
            features_deferred,
        }
    }
}

impl Engine {
    pub(crate) fn flush_due(&self) -> bool {
        let v = self.view.lock().unwrap_or_else(|p| p.into_inner());
        v.pending.rows >= self.config.flush_rows
            || v.pending
                .oldest
                .is_some_and(|t| t.elapsed() >= self.config.flush_interval)
    }

    /// Commits everything acknowledged so far to Delta and truncates the WAL behind it.
    /// Returns the number of rows committed.
    /// Also snapshots the feature store, so a restart replays little.
    pub async fn flush(&self) -> Result<usize, Error> {
        self.flush_with(true).await
    }

    /// Commits what is pending; snapshots the feature store when `force` or when the last
    /// snapshot is older than `snapshot_interval`.
    pub(crate) async fn flush_with(&self, force: bool) -> Result<usize, Error> {
        if !self.is_writer() {
            // An API replica commits nothing; the materializer does.
            return Ok(0);
        }
        self.require_lease()?;
        let _guard = self.flusher.lock.lock().await;
        let snapshot_due = !self.flusher.features_deferred
            && (force
                || self
                    .flusher
                    .last_snapshot
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .elapsed()
                    >= self.config.snapshot_interval);
        let (seg, snapshot) = if snapshot_due {
            let t = Instant::now();
            self.features.prune();
            let features = Arc::clone(&self.features);
            let (seg, bytes) = self.rotate_cut(move || features.encode())?;
            tracing::debug!(
                bytes = bytes.len(),
                elapsed_ms = t.elapsed().as_millis() as u64,
                "feature snapshot encoded (the applier waits meanwhile)"
            );
            (seg, Some(bytes))
        } else {
            (self.rotate_cut(|| ())?.0, None)
        };
        let mut committed_rows = 0;
        for t in RawTable::ALL {
            let (current, batches) = {
                let v = self.view.lock().unwrap_or_else(|p| p.into_inner());
                (v.tables.get(&t).cloned(), v.pending.batches(t, Some(seg)))
            };
            if batches.is_empty() {
                continue;
            }
            committed_rows += batches.iter().map(|b| b.num_rows()).sum::<usize>();
            if t == RawTable::Events {
                // Their ids go to disk first: every committed id is in a run.
                self.persist_ids(&batches).await?;
            }
            let table = self.lake.append(t, current, &batches, seg).await?;
            let mut v = self.view.lock().unwrap_or_else(|p| p.into_inner());
            v.tables.insert(t, table);
            v.committed.insert(t, seg);
            v.pending.remove_through(t, seg);
        }
        self.compact_events().await;
        if let Some(bytes) = snapshot {
            let root = self.lake.root().to_path_buf();
            tokio::task::spawn_blocking(move || {
                reelhouse_online::snapshot::save(&root, seg, &bytes)
            })
            .await
            .map_err(|_| Error::ShuttingDown)??;
            self.flusher.snapshot_segment.store(seg, Ordering::Relaxed);
            *self
                .flusher
                .last_snapshot
                .lock()
                .unwrap_or_else(|p| p.into_inner()) = Instant::now();
        }
        // Segments the feature snapshot does not cover yet stay for its replay.
        let covered = self.flusher.snapshot_segment.load(Ordering::Relaxed);
        let through = seg.min(covered);
        match &self.source {
            Source::Wal(wal) => wal.remove_through(through)?,
            Source::Log(ls) => {
                // The tables and the feature snapshot hold everything up to `through`: the
                // materializer's reader acknowledges it, and the log may drop it.
                ls.ack_target.fetch_max(through, Ordering::Relaxed);
                if let Err(e) = ls.log.truncate(through).await {
                    tracing::warn!(error = %e, "could not truncate the shared log; will retry");
                }
            }
        }
        let now = self.config.clock.now_ms();
        let window = self.config.dedup_window.as_millis() as i64;
        let keep_from = reelhouse_event::time::day_of(now - window) - 1;
        self.dedup
            .ids
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .expire(keep_from)?;
        self.merge_runs().await?;
        self.metrics.flushes.inc_by(1);
        Ok(committed_rows)
    }

    /// Bins the small files of the `events` dates that have collected
    /// [`reelhouse_lake::compact::MIN_SMALL_FILES`] small ones (one per flush, late events)
    /// into files of up to [`reelhouse_lake::compact::TARGET_FILE_BYTES`], in one commit.
    /// Called with the flush lock held, so no append races it. The rows do not change, so
    /// nothing is rebuilt; a failure is logged and the small files stay until the next flush
    /// tries again.
    pub(crate) async fn compact_events(&self) {
        use reelhouse_lake::compact::{compact, MIN_SMALL_FILES};
        let t = RawTable::Events;
        let Some(current) = ({
            let v = self.view.lock().unwrap_or_else(|p| p.into_inner());
            v.tables.get(&t).cloned()
        }) else {
            return;
        };
        let started = Instant::now();
        match compact(t, current, MIN_SMALL_FILES).await {
            Ok((_, c)) if c.partitions.is_empty() => {}
            Ok((table, c)) => {
                tracing::info!(
                    dates = c.partitions.len(),
                    files_removed = c.files_removed,
                    files_added = c.files_added,
                    elapsed_ms = started.elapsed().as_millis() as u64,
                    "compacted small events files"
                );
                self.view
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .tables
                    .insert(t, table);
                self.metrics.compactions.inc_by(1);
            }
            Err(e) => tracing::warn!(error = %e, "compaction of events failed; will retry"),
        }
    }

    /// Runs until `stop` resolves: flushes whenever enough rows or time have accumulated.
    pub async fn run_flusher(self: Arc<Self>, stop: CancellationToken) {
        loop {
            if stop_within(Duration::from_millis(200), &stop).await {
                return;
            }
            if self.flush_due() {
                match self.flush_with(false).await {
                    Ok(rows) => tracing::debug!(rows, "flushed to Delta"),
                    Err(e) => tracing::error!(error = %e, "flush to Delta failed; will retry"),
                }
            }
        }
    }
}
