//! Settings of the engine; the defaults suit one node.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use reelhouse_event::Clock;
use serde::Serialize;

/// Tuning of the pipeline; the defaults suit one node.
#[derive(Clone)]
pub struct EngineConfig {
    pub data_dir: PathBuf,
    /// Requests that may wait for the WAL writer before new ones get 429.
    pub wal_queue: usize,
    /// Rows durable in the WAL but not yet in Delta before new batches get 429.
    pub max_pending_rows: usize,
    /// Flush to Delta once this many rows are pending…
    pub flush_rows: usize,
    /// …or once the oldest pending row is this old.
    pub flush_interval: Duration,
    /// Event ids are remembered for dedup for at least this long (the allowed lateness).
    pub dedup_window: Duration,
    /// Retention policies (docs/privacy.md), in days.
    pub retention: Retention,
    /// The feature store is snapshotted at a flush once the last snapshot is this old; WAL
    /// segments are kept until a snapshot covers them.
    pub snapshot_interval: Duration,
    pub clock: Arc<dyn Clock>,
    /// Where the Delta tables live when not in `data_dir`: `s3://bucket/prefix` (then
    /// `data_dir` holds only this process's WAL, lock, feature snapshot and state files).
    pub tables: Option<String>,
    /// Redis as the online store of a deployment with several processes: the writer copies
    /// every changed record there, API replicas answer features from it (and hold no store).
    pub online: Option<Arc<reelhouse_online::redis::RedisStore>>,
    /// For a one-shot command that does not read the feature store (`materialize`) or a
    /// one-shot load of a few events: leave the store on disk (its snapshot is
    /// neither read at open nor written at close); the WAL keeps the load's records until a
    /// process that holds the store replays them at its start (docs/ingest.md). Ignored, and
    /// the store loaded, when the WAL already holds [`DEFER_FEATURES_MAX_WAL_BYTES`], when a
    /// privacy request is unfinished, with a shared log, or with Redis.
    pub defer_features: bool,
    /// A full rebuild of more events than this runs in user buckets of about this many
    /// events (0: `reelhouse_warehouse::DEFAULT_BUCKET_EVENTS`): its memory follows the
    /// bucket, not the events stored (docs/data-model.md).
    pub rebuild_bucket_events: usize,
}

/// The WAL bytes beyond which [`EngineConfig::defer_features`] is ignored: the next start
/// replays at most about this much into the feature store.
pub const DEFER_FEATURES_MAX_WAL_BYTES: u64 = 256 << 20;

impl EngineConfig {
    pub fn new(data_dir: impl Into<PathBuf>, clock: Arc<dyn Clock>) -> Self {
        EngineConfig {
            data_dir: data_dir.into(),
            wal_queue: 256,
            max_pending_rows: 8_000_000,
            flush_rows: 1_000_000,
            flush_interval: Duration::from_secs(10),
            dedup_window: Duration::from_secs(7 * 86_400),
            snapshot_interval: Duration::from_secs(30),
            retention: Retention::default(),
            clock,
            tables: None,
            online: None,
            defer_features: false,
            rebuild_bucket_events: 0,
        }
    }
}

/// How long each kind of table keeps its rows (docs/privacy.md defaults).
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Retention {
    /// Raw `events`, by `event_date`.
    pub events_days: u32,
    /// `quarantine`, by `received_date`.
    pub quarantine_days: u32,
    /// Facts (`fact_*`), by `event_date`; aggregates are kept without limit.
    pub facts_days: u32,
}

impl Default for Retention {
    fn default() -> Self {
        Retention {
            events_days: 90,
            quarantine_days: 14,
            facts_days: 730,
        }
    }
}
