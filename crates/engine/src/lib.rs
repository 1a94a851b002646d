//! The pipeline engine of reelhouse: everything between a request body and the warehouse
//! tables, with no HTTP in it. The server (`reelhouse-server`) and the CLI's one-shot commands
//! both drive an [`Engine`].
//!
//! One event's path, by file:
//!
//! ```text
//!  body ─▶ admission.rs   split, parse, validate, stamp received_at; rejects → quarantine
//!       ─▶ dedup.rs       claim event_id (per received day, exact; committed ids in
//!                         dedup_runs.rs: sorted runs on disk)
//!       ─▶ source.rs      one WAL record = [events IPC][quarantine IPC]; group commit + fsync
//!                         (or follow.rs: read from a shared log; publish.rs: an ingest node)
//!       ─▶ applier.rs     in log order: feature store update, visible to SQL in `pending`, ack
//!       ─▶ flush.rs       Delta commit of pending ≤ segment S (txn = S), compaction, feature
//!                         snapshot, WAL truncation
//!       ─▶ materialize.rs dirty dates and late data ─▶ reelhouse_warehouse::materialize
//!       ─▶ dashboard.rs   in-memory index of the new warehouse version
//!  erasure.rs    forget requests across store, log, tables and warehouse (reelhouse_privacy)
//!  retention.rs  expired partitions
//!  replication.rs Redis copy, writer lease and state mirror for tables on an object store
//!  tasks.rs      every background loop, registered and awaited at shutdown
//! ```
//!
//! The [`Engine`] is a thin facade over these components; each file adds the methods of one
//! component to it.

mod admission;
mod applier;
pub mod check;
mod config;
pub mod dashboard;
mod dedup;
mod dedup_runs;
mod dims;
mod erasure;
mod error;
mod flush;
mod follow;
pub mod lateness;
mod materialize;
pub mod metrics;
mod open;
pub mod publish;
mod replication;
mod retention;
mod source;
mod tasks;

use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use reelhouse_lake::deltalake::DeltaTable;
use reelhouse_lake::query::Catalog;
use reelhouse_lake::{Lake, RawTable};
use reelhouse_online::FeatureStore;
use serde::Serialize;

pub use admission::{BatchOutcome, IngestPath, ItemError, MAX_ERRORS};
pub use config::{EngineConfig, Retention, DEFER_FEATURES_MAX_WAL_BYTES};
pub use dims::DimsOutcome;
pub use error::{Error, Result};
pub use materialize::MaterializerStats;
pub use open::read_only_view;
pub use reelhouse_privacy::Mode as ForgetMode;
pub use replication::{LEASE_TTL, ONLINE_COPY_INTERVAL};
pub use retention::RetentionReport;
pub use tasks::{Background, Tasks};

use applier::{raw_parts, Apply, View};
use dedup::DedupState;
use flush::FlushState;
use materialize::MaterializeState;
use replication::Replication;
use source::Source;

/// Counters since start.
#[derive(Debug, Default, Serialize, Clone)]
pub struct IngestStats {
    pub accepted: u64,
    pub duplicates: u64,
    pub rejected: u64,
    pub pending_rows: u64,
    pub flushes: u64,
    /// Compactions of small `events` files (see `compact_events`).
    pub compactions: u64,
    pub replayed_rows: u64,
    pub wal_segment: u64,
    pub wal_fsyncs: u64,
    pub erased_dropped: u64,
}

/// The running pipeline: a facade over its components, cheap to share (`Arc`).
///
/// Locks, when more than one is taken, are taken in this order: `flusher.lock`,
/// `materializer.lock`, `materializer.dims_lock`; `view` (a plain mutex) only briefly and
/// never across an `.await`.
pub struct Engine {
    pub(crate) config: EngineConfig,
    pub(crate) lake: Lake,
    /// Where durable records come from: this process's WAL or a shared log.
    pub(crate) source: Source,
    /// The online feature store, updated by the applier thread as each record becomes durable.
    pub(crate) features: Arc<FeatureStore>,
    /// Work for the applier thread, in log order (see [`applier`]).
    pub(crate) applier: std::sync::mpsc::Sender<Apply>,
    /// What SQL sees: committed table versions plus pending batches.
    pub(crate) view: Arc<Mutex<View>>,
    pub(crate) dedup: DedupState,
    pub(crate) flusher: FlushState,
    pub(crate) materializer: MaterializeState,
    pub(crate) replication: Replication,
    /// Forget requests, tombstones and their state file.
    pub(crate) privacy: reelhouse_privacy::Privacy,
    pub(crate) metrics: metrics::Metrics,
    /// Background work that shutdown waits for (privacy requests, loops).
    pub(crate) tasks: Tasks,
    /// Held for the life of the engine: one writer per data directory (`None`: a read-only
    /// API replica).
    pub(crate) _lock: Option<std::fs::File>,
}

impl Engine {
    /// The data directory.
    pub fn data_dir(&self) -> &Path {
        self.lake.root()
    }

    /// False for a read-only API replica of a deployment with a shared log.
    pub fn is_writer(&self) -> bool {
        match &self.source {
            Source::Wal(_) => true,
            Source::Log(ls) => ls.writer,
        }
    }

    /// Fails on a read-only API replica: only the materializer changes tables.
    pub(crate) fn require_writer(&self) -> Result<(), Error> {
        if self.is_writer() {
            self.require_lease()
        } else {
            Err(Error::WrongRole(
                "this node is a read-only API replica; send admin, dimension and privacy \
                 requests to the materialize node",
            ))
        }
    }

    /// Fails once another process took over the writer lease of tables on an object store:
    /// this one changes no table any more.
    pub(crate) fn require_lease(&self) -> Result<(), Error> {
        if self.replication.lease_lost.load(Ordering::Relaxed) {
            return Err(reelhouse_lake::Error::LeaseLost(
                "another process took over the writer lease; this one changes no table any more"
                    .into(),
            )
            .into());
        }
        Ok(())
    }

    /// The shared log this process follows, with its consumer lag (`None`: embedded WAL).
    pub fn log_status(&self) -> Option<(String, u64, u64)> {
        match &self.source {
            Source::Wal(_) => None,
            Source::Log(ls) => Some((
                ls.log.describe(),
                *ls.fed.lock().unwrap_or_else(|p| p.into_inner()),
                ls.lag.load(Ordering::Relaxed),
            )),
        }
    }

    /// Now, by the injected clock.
    pub fn now_ms(&self) -> i64 {
        self.config.clock.now_ms()
    }

    /// The online feature store.
    pub fn features(&self) -> &FeatureStore {
        &self.features
    }

    pub(crate) fn features_arc(&self) -> Arc<FeatureStore> {
        Arc::clone(&self.features)
    }

    pub(crate) fn raw_table(&self, t: RawTable) -> Option<DeltaTable> {
        let v = self.view.lock().unwrap_or_else(|p| p.into_inner());
        v.tables.get(&t).cloned()
    }

    pub(crate) fn set_raw_table(&self, t: RawTable, table: DeltaTable) {
        let mut v = self.view.lock().unwrap_or_else(|p| p.into_inner());
        v.tables.insert(t, table);
    }

    pub(crate) fn derived_table(&self, name: &str) -> Option<DeltaTable> {
        let v = self.view.lock().unwrap_or_else(|p| p.into_inner());
        v.derived.get(name).cloned()
    }

    pub(crate) fn set_derived_table(&self, name: &str, table: DeltaTable) {
        let mut v = self.view.lock().unwrap_or_else(|p| p.into_inner());
        v.derived.insert(name.to_string(), table);
    }

    /// `Ok` when this process can take events: the WAL writer runs and the buffer of rows not
    /// yet in Delta has room; otherwise why not.
    pub fn readiness(&self) -> Result<(), &'static str> {
        if let Source::Wal(wal) = &self.source {
            if wal.stats().is_err() {
                return Err("the write-ahead log is closed");
            }
        }
        if self.pending_rows() >= self.config.max_pending_rows {
            return Err("the buffer of rows not yet committed to Delta is full");
        }
        Ok(())
    }

    /// Rows durable in the WAL but not yet in Delta.
    pub fn pending_rows(&self) -> usize {
        self.view
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .pending
            .rows
    }

    /// A SQL catalog over exactly what has been acknowledged so far, plus the latest
    /// materialized warehouse tables.
    pub async fn catalog(&self) -> Result<Catalog, Error> {
        Ok(self.catalog_taking_dirty(false).await?.0)
    }

    /// [`Engine::catalog`]; with `take`, also takes the dirty dates (atomically with the
    /// snapshot) and starts a new set.
    pub(crate) async fn catalog_taking_dirty(
        &self,
        take: bool,
    ) -> Result<(Catalog, Option<Vec<i32>>), Error> {
        let (parts, derived, dirty) = {
            let mut v = self.view.lock().unwrap_or_else(|p| p.into_inner());
            let parts = raw_parts(&v.tables, &v.pending);
            let derived = v
                .derived
                .iter()
                .map(|(n, t)| (n.clone(), t.clone()))
                .collect();
            let dirty = if take {
                v.dirty
                    .replace(Default::default())
                    .map(|d| d.into_iter().collect())
            } else {
                None
            };
            (parts, derived, dirty)
        };
        Ok((Catalog::with_derived(parts, derived).await?, dirty))
    }

    /// Counters for health and the demo.
    pub fn stats(&self) -> IngestStats {
        let wal = match &self.source {
            Source::Wal(wal) => wal.stats().unwrap_or_default(),
            Source::Log(ls) => reelhouse_wal::Stats {
                current_segment: *ls.fed.lock().unwrap_or_else(|p| p.into_inner()),
                ..Default::default()
            },
        };
        IngestStats {
            accepted: self.metrics.accepted.get(),
            duplicates: self.metrics.duplicates.get(),
            rejected: self.metrics.rejected.get(),
            pending_rows: self.pending_rows() as u64,
            flushes: self.metrics.flushes.get(),
            compactions: self.metrics.compactions.get(),
            replayed_rows: self.metrics.replayed,
            wal_segment: wal.current_segment,
            wal_fsyncs: wal.fsyncs,
            erased_dropped: self.metrics.erased_dropped.get(),
        }
    }
}
