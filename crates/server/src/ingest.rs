//! The ingest pipeline shared by `POST /v1/events` and `reelhouse ingest`.
//!
//! ```text
//!  body ─split─▶ items ─parse+validate─▶ events ─stamp(received_at)─▶ dedup (event_id hash)
//!                   └─▶ rejections ───────────────────────────────┐        │
//!                                                                 ▼        ▼
//!             one WAL record = [events IPC][quarantine IPC] ─▶ group commit + fdatasync
//!                                                                 │ callback (writer thread)
//!                                                                 ▼ applier thread, log order
//!             feature store ─▶ view.pending (visible to SQL at once) ─▶ ack to the client
//!  flusher: rotate WAL → segment S ─▶ Delta commit of pending ≤ S (txn = S) ─▶ swap view
//!           ─▶ delete WAL segments ≤ S
//! ```
//!
//! A batch is acknowledged only after its record is fsynced. On start, records of segments
//! newer than the segment recorded in each Delta table are replayed into `pending`, so an
//! acknowledged event is never lost nor stored twice, even if the process died between the
//! Delta commit and the WAL truncation.

use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasherDefault, Hasher};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use deltalake::arrow::array::RecordBatch;
use deltalake::DeltaTable;
use reelhouse_event::{parse_event, split_body, stamp, Clock, StoredEvent};
use reelhouse_lake::deltalake;
use reelhouse_lake::query::Catalog;
use reelhouse_lake::schema::{decode_ipc, encode_ipc};
use reelhouse_lake::{
    committed_segment, events_batch, quarantine_batch, Lake, QuarantineRow, RawTable,
};
use reelhouse_log::EventLog;
use reelhouse_online::FeatureStore;
use reelhouse_wal::{SegmentId, Wal};
use serde::Serialize;
use tokio::sync::oneshot;

mod follow;
pub(crate) use follow::encode_log_record;

/// Tuning of the pipeline; the defaults suit one node.
#[derive(Clone)]
pub struct IngestConfig {
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
    /// Retention policies (SPEC §7), in days.
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
}

impl IngestConfig {
    pub fn new(data_dir: impl Into<PathBuf>, clock: Arc<dyn Clock>) -> Self {
        IngestConfig {
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
        }
    }
}

/// How long each kind of table keeps its rows (SPEC §7 defaults).
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

/// What one retention run removed.
#[derive(Debug, Clone, Serialize)]
pub struct RetentionReport {
    pub events_before: String,
    pub quarantine_before: String,
    pub facts_before: String,
    pub tables: Vec<reelhouse_lake::erase::TableErasure>,
}

/// Errors of the pipeline; the HTTP layer maps each to one status.
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error("{0}")]
    BadBody(String),
    #[error("ingest is at capacity; retry after a short wait")]
    Overloaded,
    #[error("the write-ahead log could not persist the batch")]
    Wal(#[from] reelhouse_wal::Error),
    // No `#[from]` (which would also make it the `source`): the message already holds the
    // inner error, and a `{:#}` chain would print it twice.
    #[error("table storage error: {0}")]
    Lake(reelhouse_lake::Error),
    #[error("the server is shutting down")]
    ShuttingDown,
    #[error(
        "data directory {0} is in use by another reelhouse process (serve or ingest); \
         stop it, send the data over HTTP instead, or use another --data-dir (with tables \
         on S3: another --state-dir)"
    )]
    Locked(PathBuf),
    #[error("cannot open data directory: {0}")]
    Io(#[from] std::io::Error),
    #[error("materialization failed: {0}")]
    Warehouse(#[from] reelhouse_warehouse::Error),
    #[error("feature store: {0}")]
    Online(#[from] reelhouse_online::Error),
    #[error("shared log: {0}")]
    Log(#[from] reelhouse_log::Error),
    #[error("{0}")]
    WrongRole(&'static str),
}

impl From<reelhouse_lake::Error> for IngestError {
    fn from(e: reelhouse_lake::Error) -> Self {
        IngestError::Lake(e)
    }
}

/// Where a batch came from (stored in `quarantine.ingest_path`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IngestPath {
    Http,
    Bulk,
}

impl IngestPath {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            IngestPath::Http => "http",
            IngestPath::Bulk => "bulk",
        }
    }
}

/// One rejected item of a batch, as reported to the client.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct ItemError {
    pub index: usize,
    pub event_id: Option<String>,
    pub reason: String,
}

/// The SPEC §2 response of one batch.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct BatchOutcome {
    pub accepted: usize,
    pub duplicates: usize,
    pub rejected: usize,
    /// At most the first [`MAX_ERRORS`] rejections.
    pub errors: Vec<ItemError>,
    /// Valid events of erased users, counted in `accepted` but not stored (omitted when 0).
    #[serde(skip_serializing_if = "is_zero")]
    pub erased_dropped: usize,
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

/// The answer to `PUT /v1/dims/{kind}`.
#[derive(Debug, Clone, Serialize)]
pub struct DimsOutcome {
    pub accepted: usize,
    pub rejected: usize,
    pub errors: Vec<reelhouse_warehouse::dims::UpsertError>,
}

/// Errors listed per response.
pub const MAX_ERRORS: usize = 100;

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

/// What the materializer has done, for `/metrics`.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct MaterializerStats {
    pub runs: u64,
    pub failures: u64,
    /// Duration of the last successful rebuild.
    pub last_ms: u64,
    /// Dates it rewrote; -1 for a full rebuild.
    pub last_dates: i64,
    /// When it finished (clock ms; 0: none yet).
    pub last_at_ms: i64,
    /// Events accepted since the last rebuild started.
    pub events_behind: u64,
    /// Dates waiting for the next rebuild; -1 when unknown (the next one is full).
    pub dirty_dates: i64,
}

/// The u128 is already a good hash; use its low bits directly.
#[derive(Default)]
struct IdHasher(u64);
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
type IdSet = HashSet<u128, BuildHasherDefault<IdHasher>>;

/// Event-id hashes by the UTC day they were received; whole days expire at once.
#[derive(Default)]
pub(crate) struct Dedup {
    days: Vec<(i32, IdSet)>,
}

impl Dedup {
    fn contains(&self, h: u128) -> bool {
        self.days.iter().any(|(_, s)| s.contains(&h))
    }

    fn insert(&mut self, day: i32, h: u128) -> bool {
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

    fn remove(&mut self, h: u128) {
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

/// Splits, parses and validates one body: the outcome with `rejected` and `errors` filled
/// (and `duplicates` holding the item count, for the caller to finish), the valid events
/// stamped with `received_at`, and the quarantine rows of the rest.
pub(crate) fn parse_batch(
    body: &[u8],
    received_at: i64,
    path: IngestPath,
) -> Result<(BatchOutcome, Vec<StoredEvent>, Vec<QuarantineRow>), IngestError> {
    let items = split_body(body).map_err(IngestError::BadBody)?;
    let mut outcome = BatchOutcome {
        duplicates: items.len(),
        ..BatchOutcome::default()
    };
    let mut events: Vec<StoredEvent> = Vec::with_capacity(items.len());
    let mut rejects: Vec<QuarantineRow> = Vec::new();
    for (index, item) in items.iter().enumerate() {
        match parse_event(item) {
            Ok(e) => events.push(stamp(e, received_at)),
            Err(r) => {
                if outcome.errors.len() < MAX_ERRORS {
                    outcome.errors.push(ItemError {
                        index,
                        event_id: r.event_id.clone(),
                        reason: r.reason.clone(),
                    });
                }
                rejects.push(QuarantineRow {
                    received_at_ms: received_at,
                    event_id: r.event_id,
                    reason: r.reason,
                    raw: String::from_utf8_lossy(item).into_owned(),
                    ingest_path: path.as_str(),
                });
            }
        }
    }
    outcome.rejected = rejects.len();
    Ok((outcome, events, rejects))
}

/// Ends one batch once it was logged (or not): counts its accepted, duplicate and rejected
/// items, or releases the ids it claimed so a retry is not taken for a duplicate.
pub(crate) fn settle(
    logged: Result<(), IngestError>,
    outcome: BatchOutcome,
    claimed: Vec<u128>,
    dedup: &Mutex<Dedup>,
    [accepted, duplicates, rejected]: [&AtomicU64; 3],
) -> Result<BatchOutcome, IngestError> {
    if let Err(e) = logged {
        dedup
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .release(claimed);
        return Err(e);
    }
    accepted.fetch_add(outcome.accepted as u64, Ordering::Relaxed);
    duplicates.fetch_add(outcome.duplicates as u64, Ordering::Relaxed);
    rejected.fetch_add(outcome.rejected as u64, Ordering::Relaxed);
    Ok(outcome)
}

pub(crate) fn id_hash(event_id: &str) -> u128 {
    xxhash_rust::xxh3::xxh3_128(event_id.as_bytes())
}

/// Batches durable in the WAL, not yet committed to Delta.
#[derive(Default)]
struct Pending {
    events: Vec<(SegmentId, RecordBatch)>,
    quarantine: Vec<(SegmentId, RecordBatch)>,
    rows: usize,
    oldest: Option<Instant>,
}

impl Pending {
    fn push(
        &mut self,
        seg: SegmentId,
        events: Option<RecordBatch>,
        quarantine: Option<RecordBatch>,
    ) {
        if events.is_none() && quarantine.is_none() {
            return;
        }
        for (list, b) in [
            (&mut self.events, events),
            (&mut self.quarantine, quarantine),
        ] {
            if let Some(b) = b {
                self.rows += b.num_rows();
                list.push((seg, b));
            }
        }
        self.oldest.get_or_insert_with(Instant::now);
    }

    fn batches(&self, t: RawTable, through: Option<SegmentId>) -> Vec<RecordBatch> {
        let list = match t {
            RawTable::Events => &self.events,
            RawTable::Quarantine => &self.quarantine,
        };
        list.iter()
            .filter(|(s, _)| through.is_none_or(|t| *s <= t))
            .map(|(_, b)| b.clone())
            .collect()
    }

    fn remove_through(&mut self, t: RawTable, through: SegmentId) {
        let list = match t {
            RawTable::Events => &mut self.events,
            RawTable::Quarantine => &mut self.quarantine,
        };
        list.retain(|(s, _)| *s > through);
        self.rows = self
            .events
            .iter()
            .chain(&self.quarantine)
            .map(|(_, b)| b.num_rows())
            .sum();
        if self.rows == 0 {
            self.oldest = None;
        }
    }
}

/// What SQL sees: committed table versions plus pending batches, swapped together.
pub(crate) struct View {
    pub(crate) tables: HashMap<RawTable, DeltaTable>,
    /// The log position (WAL segment or shared-log sequence) each raw table's Delta version
    /// holds everything up to; a record at or below it is never added to `pending` again.
    committed: HashMap<RawTable, u64>,
    pending: Pending,
    /// Warehouse tables by name (latest materialized version).
    pub(crate) derived: HashMap<String, DeltaTable>,
    /// `event_date`s (days since epoch) of the events made visible since the last rebuild took
    /// its snapshot; `None` when unknown (after a start, or after a change that needs a full
    /// rebuild). Updated under the same lock as `pending`, so a rebuild that takes it together
    /// with its snapshot misses nothing.
    dirty: Option<std::collections::BTreeSet<i32>>,
}

/// One step for the applier thread.
enum Apply {
    /// A durable WAL record: update the features, make it visible to SQL, then ack.
    Record {
        seg: SegmentId,
        events: Option<RecordBatch>,
        quarantine: Option<RecordBatch>,
        /// Events for the feature store (`None`: it has them already, from its snapshot).
        features: Option<RecordBatch>,
        ack: Option<oneshot::Sender<Result<(), IngestError>>>,
    },
    /// A WAL rotation: everything before it has been applied, nothing after.
    Cut(Box<dyn FnOnce() + Send>),
}

/// The thread that applies durable records after the WAL writer has fsynced them.
///
/// The WAL thread only forwards each record here, so its next write and fsync overlap with
/// the feature update of the previous group; the ack still waits for both. Rotations are
/// forwarded as [`Apply::Cut`] in the same queue, so a cut seen here is exact: the snapshot
/// and the flusher's view of `pending` match one WAL segment boundary.
fn spawn_applier(
    features: Arc<FeatureStore>,
    view: Arc<Mutex<View>>,
) -> std::io::Result<std::sync::mpsc::Sender<Apply>> {
    let (tx, rx) = std::sync::mpsc::channel::<Apply>();
    std::thread::Builder::new()
        .name("reelhouse-apply".into())
        .spawn(move || {
            for msg in rx {
                match msg {
                    Apply::Record {
                        seg,
                        events,
                        quarantine,
                        features: for_features,
                        ack,
                    } => {
                        if let Some(e) = &for_features {
                            if let Err(err) = features.apply(e) {
                                tracing::error!(error = %err, "feature store skipped a batch");
                            }
                        }
                        let mut v = view.lock().unwrap_or_else(|p| p.into_inner());
                        // A record a Delta version already holds (a shared log's replay) is
                        // visible through that version.
                        let fresh = |t| seg > v.committed.get(&t).copied().unwrap_or(0);
                        let events = events.filter(|_| fresh(RawTable::Events));
                        let quarantine = quarantine.filter(|_| fresh(RawTable::Quarantine));
                        if let (Some(dirty), Some(e)) = (v.dirty.as_mut(), events.as_ref()) {
                            note_dates(dirty, e);
                        }
                        v.pending.push(seg, events, quarantine);
                        if let Some(ack) = ack {
                            let _ = ack.send(Ok(()));
                        }
                    }
                    Apply::Cut(f) => f(),
                }
            }
        })?;
    Ok(tx)
}

/// Adds the `event_date`s of an events batch to `dirty`.
fn note_dates(dirty: &mut std::collections::BTreeSet<i32>, events: &RecordBatch) {
    use reelhouse_lake::deltalake::arrow::array::{Array, AsArray};
    use reelhouse_lake::deltalake::arrow::datatypes::Date32Type;
    if let Some(c) = events
        .column_by_name("event_date")
        .and_then(|c| c.as_primitive_opt::<Date32Type>())
    {
        // Batches are small and mostly one date: skip repeats cheaply.
        let mut last = None;
        for i in 0..c.len() {
            let d = c.value(i);
            if !c.is_null(i) && last != Some(d) {
                dirty.insert(d);
                last = Some(d);
            }
        }
    }
}

/// The `event_date`s of events received at or after `t` minus [`RESTART_DIRTY_MARGIN_MS`].
async fn days_received_since(catalog: &Catalog, t: i64) -> Result<Vec<i32>, IngestError> {
    let from = t - RESTART_DIRTY_MARGIN_MS;
    let b = catalog
        .query(&format!(
            "SELECT DISTINCT CAST(event_date AS INT) FROM events \
             WHERE CAST(received_at AS BIGINT) >= {from} * 1000"
        ))
        .await?;
    Ok(reelhouse_warehouse::ints_of(&b).into_iter().collect())
}

/// How far back from the last rebuild's snapshot the events' `received_at` is searched for
/// dirty dates after a restart (an event gets `received_at` when parsed and becomes visible
/// a little later).
const RESTART_DIRTY_MARGIN_MS: i64 = 10 * 60 * 1000;

/// The running pipeline. Cheap to share (`Arc`).
pub struct Ingestor {
    pub(crate) config: IngestConfig,
    pub(crate) lake: Lake,
    /// Where durable records come from: this process's WAL or a shared log.
    source: Source,
    /// The online feature store, updated by the applier thread as each record becomes durable.
    features: Arc<FeatureStore>,
    /// Copies of changed feature records to Redis go one at a time (a copy taken before an
    /// erasure must not land after the erasure's delete).
    online_copy: tokio::sync::Mutex<()>,
    online_keys_written: AtomicU64,
    online_copy_errors: AtomicU64,
    /// Work for the applier thread, in WAL order (see [`Applier`]).
    applier: std::sync::mpsc::Sender<Apply>,
    /// WAL segments ≤ this are covered by the feature snapshot on disk (0 = no snapshot yet);
    /// segments above it are never deleted, so snapshot + WAL always restore the store.
    snapshot_segment: AtomicU64,
    last_snapshot: Mutex<Instant>,
    /// The ids of the stored events received within the dedup window, once
    /// [`Ingestor::load_dedup`] has read them (empty before).
    dedup: Mutex<Dedup>,
    /// Set when `dedup` holds the stored ids: loaded at the first ingest, by `start`, or
    /// before following a shared log, so that one-shot commands that never ingest
    /// (materialize, restate, forget, retention, check) do not scan the events for them.
    dedup_loaded: tokio::sync::OnceCell<()>,
    pub(crate) view: Arc<Mutex<View>>,
    pub(crate) flush_lock: tokio::sync::Mutex<()>,
    accepted: AtomicU64,
    duplicates: AtomicU64,
    rejected: AtomicU64,
    flushes: AtomicU64,
    compactions: AtomicU64,
    replayed: u64,
    /// Accepted-event count at the start of the last materialization (dirty check).
    materialized_at: AtomicU64,
    /// The materializer's record for `/metrics`.
    rebuilds: Mutex<MaterializerStats>,
    pub(crate) materialize_lock: tokio::sync::Mutex<()>,
    /// Forget requests, tombstones and their state file.
    pub(crate) privacy: crate::privacy::Privacy,
    /// Events dropped because their user was erased.
    erased_dropped: AtomicU64,
    /// Dimension upserts accepted since start (part of the dirty check) and their writer lock.
    dim_upserts: AtomicU64,
    pub(crate) dims_lock: tokio::sync::Mutex<()>,
    /// Date closures and restatements (see `reelhouse_warehouse::Inputs`), persisted in
    /// `_state/late_data.json`.
    late: Mutex<LateState>,
    /// The dashboard's in-memory index of the current warehouse version (built lazily).
    dashboard: tokio::sync::Mutex<Option<Arc<crate::dashboard::DashboardIndex>>>,
    /// Content hashes of the state files last copied next to tables on an object store.
    mirrored: Mutex<HashMap<&'static str, u64>>,
    /// The writer's lease on tables on an object store (see `reelhouse_lake::store`).
    lease: tokio::sync::Mutex<Option<reelhouse_lake::store::WriterLease>>,
    /// Another process took the lease over: this one commits nothing more.
    lease_lost: std::sync::atomic::AtomicBool,
    /// Held for the life of the ingestor: one writer per data directory (`None`: a read-only
    /// API replica).
    _lock: Option<std::fs::File>,
}

/// Where the durable records of this process come from.
enum Source {
    /// One node: HTTP batches are appended to this process's WAL, whose writer thread hands
    /// each fsynced record to the applier in log order.
    Wal(Wal),
    /// Several processes: ingest nodes append to a shared log and [`Ingestor::follow`] reads
    /// it here in order.
    Log(LogSource),
}

struct LogSource {
    log: Arc<dyn EventLog>,
    /// The materializer (commits to Delta, acknowledges and truncates the log); else an API
    /// replica that only reads.
    writer: bool,
    /// Position of the last record handed to the applier; held while one is handed over, so
    /// a cut taken under it is exact.
    fed: Mutex<u64>,
    /// Records up to here are in Delta and in a feature snapshot: the reader may acknowledge.
    ack_target: AtomicU64,
    /// The feature store held every event up to this position when the process started.
    features_at: u64,
    /// Records in the log after the last one read (consumer lag), for `/metrics`.
    lag: AtomicU64,
}

/// Positions each raw table holds every record up to (0 before its first commit).
async fn committed_positions(
    tables: &HashMap<RawTable, DeltaTable>,
) -> Result<HashMap<RawTable, u64>, IngestError> {
    let mut committed = HashMap::new();
    for t in RawTable::ALL {
        let c = match tables.get(&t) {
            Some(table) => committed_segment(table).await?,
            None => None,
        };
        committed.insert(t, c.unwrap_or(0));
    }
    Ok(committed)
}

/// The stream part of a log's description (`nats://host:port/STREAM`).
fn stream_of(described: &str) -> &str {
    described.rsplit('/').next().unwrap_or(described)
}

/// A data directory holds positions of one log only: its own WAL's segments, or one shared
/// log's sequence numbers (recorded in `_state/log.json` by the materializer's first start).
fn check_log_binding(root: &Path, log: Option<(String, bool)>) -> Result<(), IngestError> {
    let path = root.join("_state").join("log.json");
    let bound: Option<String> = std::fs::read(&path)
        .ok()
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .and_then(|v| v["log"].as_str().map(String::from));
    let has_wal = reelhouse_wal::list_segments(&wal_dir(root)).is_ok_and(|s| !s.is_empty());
    match (log, bound) {
        (None, Some(_)) => Err(IngestError::WrongRole(
            "this data directory is written from a shared log (serve --role materialize \
             --log …); start that instead of an embedded server",
        )),
        (Some(_), None) if has_wal => Err(IngestError::WrongRole(
            "this data directory has a local write-ahead log from an embedded server; \
             use a new --data-dir for a deployment with a shared log",
        )),
        // Positions are the stream's: the server may be named differently by each process.
        (Some((url, _)), Some(b)) if stream_of(&url) != stream_of(&b) => {
            Err(IngestError::WrongRole(
                "this data directory is bound to another shared-log stream (see \
                 _state/log.json)",
            ))
        }
        (Some((url, true)), None) => {
            let body = serde_json::json!({ "log": url }).to_string();
            Ok(write_atomically(&path, body.as_bytes())?)
        }
        _ => Ok(()),
    }
}

fn wal_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("_wal")
}

/// Encodes one WAL record: `[u32 len][events IPC][u32 len][quarantine IPC]` (len 0 = none).
fn encode_record(
    events: Option<&RecordBatch>,
    quarantine: Option<&RecordBatch>,
) -> Result<Vec<u8>, IngestError> {
    let mut out = Vec::new();
    for b in [events, quarantine] {
        let bytes = match b {
            Some(b) => encode_ipc(b)?,
            None => Vec::new(),
        };
        out.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
        out.extend_from_slice(&bytes);
    }
    Ok(out)
}

type Parts = (Option<RecordBatch>, Option<RecordBatch>);

fn decode_record(mut bytes: &[u8]) -> Result<Parts, IngestError> {
    let mut parts = Vec::with_capacity(2);
    for _ in 0..2 {
        let corrupt = || IngestError::BadBody("write-ahead log record is malformed".into());
        if bytes.len() < 4 {
            return Err(corrupt());
        }
        let len = u32::from_le_bytes(bytes[..4].try_into().map_err(|_| corrupt())?) as usize;
        let body = bytes.get(4..4 + len).ok_or_else(corrupt)?;
        parts.push(if len == 0 {
            None
        } else {
            decode_ipc(body)?.into_iter().next()
        });
        bytes = &bytes[4 + len..];
    }
    let q = parts.pop().flatten();
    let e = parts.pop().flatten();
    Ok((e, q))
}

/// The raw tables as a catalog sees them: each committed version with its pending batches.
fn raw_parts(
    tables: &HashMap<RawTable, DeltaTable>,
    pending: &Pending,
) -> Vec<(RawTable, Option<DeltaTable>, Vec<RecordBatch>)> {
    RawTable::ALL
        .iter()
        .map(|t| (*t, tables.get(t).cloned(), pending.batches(*t, None)))
        .collect()
}

/// Reads the committed tables plus the WAL records not yet in them, without taking the data
/// directory over (for read-only tools such as `reelhouse sql`).
pub async fn read_only_view(data_dir: &Path, tables: Option<&str>) -> Result<Catalog, IngestError> {
    let lake = Lake::open_at(data_dir, tables)?;
    let tables = lake.load_all().await?;
    let committed = committed_positions(&tables).await?;
    let (pending, _) = replay(&committed, &wal_dir(data_dir), false, None).await?;
    let mut derived = Vec::new();
    for name in derived_names() {
        if let Some(t) = lake.load_derived(name).await? {
            derived.push((name.to_string(), t));
        }
    }
    Ok(Catalog::with_derived(raw_parts(&tables, &pending), derived).await?)
}

/// Every table under the data directory besides the raw ones.
fn derived_names() -> impl Iterator<Item = &'static str> {
    reelhouse_warehouse::table_names()
        .chain([reelhouse_warehouse::dims::UPDATES_TABLE, "privacy_audit"])
}

/// Reads the WAL back: the records not yet in Delta become `pending`; the events of records
/// in segments after `features_after` (if given) are returned for the feature store.
async fn replay(
    committed: &HashMap<RawTable, u64>,
    dir: &Path,
    repair: bool,
    features_after: Option<SegmentId>,
) -> Result<(Pending, Vec<RecordBatch>), IngestError> {
    let mut pending = Pending::default();
    let mut for_features = Vec::new();
    for rec in reelhouse_wal::read_dir(dir, repair)? {
        let wanted_by_features = features_after.is_some_and(|s| rec.segment > s);
        let in_delta = rec.segment <= committed[&RawTable::Events]
            && rec.segment <= committed[&RawTable::Quarantine];
        if in_delta && !wanted_by_features {
            continue;
        }
        let (e, q) = decode_record(&rec.payload)?;
        if let (Some(e), true) = (&e, wanted_by_features) {
            for_features.push(e.clone());
        }
        let e = e.filter(|_| rec.segment > committed[&RawTable::Events]);
        let q = q.filter(|_| rec.segment > committed[&RawTable::Quarantine]);
        pending.push(rec.segment, e, q);
    }
    Ok((pending, for_features))
}

impl Ingestor {
    /// Opens the data directory: loads the tables, replays the WAL and opens a new WAL
    /// segment. The dedup set of the last `dedup_window` of received events is read at the
    /// first ingest ([`Ingestor::load_dedup`]).
    pub async fn open(config: IngestConfig) -> Result<Arc<Ingestor>, IngestError> {
        Self::open_with(config, None).await
    }

    /// Opens the data directory as a process of a deployment with a shared log (see
    /// `reelhouse_log`): `writer` for the one materializer (takes the directory's lock, commits
    /// to Delta, runs the warehouse, acknowledges and truncates the log), else a read-only API
    /// replica. Records come from [`Ingestor::follow`], not from HTTP.
    pub async fn open_following(
        config: IngestConfig,
        log: Arc<dyn EventLog>,
        writer: bool,
    ) -> Result<Arc<Ingestor>, IngestError> {
        Self::open_with(config, Some((log, writer))).await
    }

    async fn open_with(
        config: IngestConfig,
        log: Option<(Arc<dyn EventLog>, bool)>,
    ) -> Result<Arc<Ingestor>, IngestError> {
        let lake = Lake::open_at(&config.data_dir, config.tables.as_deref())?;
        let dir = wal_dir(lake.root());
        let writer = log.as_ref().is_none_or(|(_, w)| *w);
        let lock = if writer {
            let lock = std::fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(lake.root().join(".lock"))?;
            if lock.try_lock().is_err() {
                return Err(IngestError::Locked(lake.root().to_path_buf()));
            }
            Some(lock)
        } else {
            None
        };
        // After the local lock: a second process refused by it must not touch the lease the
        // first one holds under the same writer id.
        let lease = if writer && lake.tables().is_remote() {
            let holder = writer_id(lake.root())?;
            let now = config.clock.now_ms();
            let lease = lake
                .tables()
                .acquire_writer(&holder, now, LEASE_TTL.as_millis() as i64)
                .await?;
            // Another writer held the tables last: its mirrored state is newer than ours.
            let theirs = lease.previous.as_ref().is_some_and(|p| *p != holder);
            restore_state_files(&lake, theirs).await?;
            Some(lease)
        } else {
            None
        };
        check_log_binding(lake.root(), log.as_ref().map(|(l, w)| (l.describe(), *w)))?;
        let tables = lake.load_all().await?;
        let committed = committed_positions(&tables).await?;
        let keep_views_ms = config.dedup_window.as_millis() as i64 + 86_400_000;
        let mut features = FeatureStore::new(Arc::clone(&config.clock), keep_views_ms);
        // An API replica with Redis answers features from there and holds no store.
        let no_store = !writer && config.online.is_some();
        let snapshot = match reelhouse_online::snapshot::load(lake.root()) {
            _ if no_store => None,
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "rebuilding the feature store from the tables");
                None
            }
        };
        let snapshot_segment = match snapshot {
            Some((seg, bytes)) => match features.decode(&bytes) {
                Ok(()) => Some(seg),
                Err(e) => {
                    tracing::warn!(error = %e, "rebuilding the feature store from the tables");
                    features = FeatureStore::new(Arc::clone(&config.clock), keep_views_ms);
                    None
                }
            },
            None => None,
        };
        let (pending, wal_events) = match log {
            None => replay(&committed, &dir, true, snapshot_segment).await?,
            // The shared log redelivers what the tables lack; nothing is local.
            Some(_) => (Pending::default(), Vec::new()),
        };
        let replayed = pending.rows as u64;
        let mut derived = HashMap::new();
        for name in
            reelhouse_warehouse::table_names().chain([reelhouse_warehouse::dims::UPDATES_TABLE])
        {
            if let Some(t) = lake.load_derived(name).await? {
                derived.insert(name.to_string(), t);
            }
        }
        let view = View {
            tables,
            committed,
            pending,
            derived,
            dirty: None,
        };
        // The log position up to which the feature store holds every event.
        let features_at = match snapshot_segment {
            Some(s) => {
                for b in &wal_events {
                    features.apply(b)?;
                }
                s
            }
            None if no_store => u64::MAX,
            None => {
                rebuild_features(&features, &view).await?;
                view.committed.get(&RawTable::Events).copied().unwrap_or(0)
            }
        };
        if writer && config.online.is_some() {
            // The first copy to Redis holds everything; later ones what changed.
            features.track_changes();
        }
        let source = match log {
            None => Source::Wal(Wal::open(&dir, config.wal_queue)?),
            Some((log, writer)) => Source::Log(LogSource {
                log,
                writer,
                fed: Mutex::new(0),
                ack_target: AtomicU64::new(0),
                features_at,
                lag: AtomicU64::new(0),
            }),
        };
        let lake_root = lake.root().to_path_buf();
        if replayed > 0 {
            tracing::info!(rows = replayed, "replayed write-ahead log");
        }
        let privacy = if writer {
            crate::privacy::Privacy::open(&lake_root)?
        } else if lake.tables().is_remote() {
            let shared = lake.tables().get_state(crate::privacy::STATE_FILE).await?;
            crate::privacy::Privacy::read_only_from(&lake_root, shared.as_deref())?
        } else {
            crate::privacy::Privacy::open_read_only(&lake_root)?
        };
        let features = Arc::new(features);
        let view = Arc::new(Mutex::new(view));
        let applier = spawn_applier(Arc::clone(&features), Arc::clone(&view))?;
        let ingestor = Arc::new(Ingestor {
            config,
            lake,
            source,
            features,
            online_copy: tokio::sync::Mutex::new(()),
            online_keys_written: AtomicU64::new(0),
            online_copy_errors: AtomicU64::new(0),
            applier,
            snapshot_segment: AtomicU64::new(snapshot_segment.unwrap_or(0)),
            last_snapshot: Mutex::new(Instant::now()),
            dedup: Mutex::new(Dedup::default()),
            dedup_loaded: tokio::sync::OnceCell::new(),
            view,
            flush_lock: tokio::sync::Mutex::new(()),
            accepted: AtomicU64::new(0),
            duplicates: AtomicU64::new(0),
            rejected: AtomicU64::new(0),
            flushes: AtomicU64::new(0),
            compactions: AtomicU64::new(0),
            replayed,
            materialized_at: AtomicU64::new(0),
            rebuilds: Mutex::new(MaterializerStats::default()),
            materialize_lock: tokio::sync::Mutex::new(()),
            dim_upserts: AtomicU64::new(0),
            privacy,
            mirrored: Mutex::new(HashMap::new()),
            lease: tokio::sync::Mutex::new(lease),
            lease_lost: std::sync::atomic::AtomicBool::new(false),
            erased_dropped: AtomicU64::new(0),
            dims_lock: tokio::sync::Mutex::new(()),
            late: Mutex::new(LateState::load(&lake_root)?),
            dashboard: tokio::sync::Mutex::new(None),
            _lock: lock,
        });
        if writer {
            ingestor.resume_privacy();
        }
        Ok(ingestor)
    }

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
    pub(crate) fn require_writer(&self) -> Result<(), IngestError> {
        if self.is_writer() {
            self.require_lease()
        } else {
            Err(IngestError::WrongRole(
                "this node is a read-only API replica; send admin, dimension and privacy \
                 requests to the materialize node",
            ))
        }
    }

    /// Fails once another process took over the writer lease of tables on an object store:
    /// this one changes no table any more.
    fn require_lease(&self) -> Result<(), IngestError> {
        if self.lease_lost.load(Ordering::Relaxed) {
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

    /// Redis, when this process answers features from it (an API replica configured with
    /// `--online redis://`); `None`: answer from the in-process store.
    pub fn online_reader(&self) -> Option<&reelhouse_online::redis::RedisStore> {
        self.config.online.as_deref().filter(|_| !self.is_writer())
    }

    /// Where features live, for health: `in-process` or the Redis address.
    pub fn online_backend(&self) -> String {
        match &self.config.online {
            Some(r) if self.is_writer() => format!("in-process, copied to {}", r.describe()),
            Some(r) => r.describe(),
            None => "in-process".into(),
        }
    }

    /// Keys written to Redis and failed copies since start (0, 0 without Redis).
    pub fn online_copy_stats(&self) -> (u64, u64) {
        (
            self.online_keys_written.load(Ordering::Relaxed),
            self.online_copy_errors.load(Ordering::Relaxed),
        )
    }

    /// Copies every feature record changed since the last copy to Redis (the writer of a
    /// deployment with `--online redis://`; `None` otherwise). A failed copy is retried by
    /// the next one.
    pub async fn copy_online(
        &self,
    ) -> Result<Option<reelhouse_online::redis::WriteReport>, IngestError> {
        let Some(redis) = self.config.online.as_deref().filter(|_| self.is_writer()) else {
            return Ok(None);
        };
        let _one = self.online_copy.lock().await;
        let changes = self.features.take_changes();
        if changes.is_empty() {
            return Ok(Some(Default::default()));
        }
        match redis.write(&changes).await {
            Ok(r) => {
                self.online_keys_written
                    .fetch_add(changes.len() as u64, Ordering::Relaxed);
                Ok(Some(r))
            }
            Err(e) => {
                self.online_copy_errors.fetch_add(1, Ordering::Relaxed);
                self.features
                    .retry_changes(changes.into_iter().map(|(k, _)| k));
                Err(e.into())
            }
        }
    }

    /// Whether Redis still holds a record of `user` (false without Redis).
    pub(crate) async fn online_has_user(&self, user: i64) -> Result<bool, IngestError> {
        match self.config.online.as_deref() {
            Some(r) => Ok(r
                .get(reelhouse_online::Key::User(user.max(0) as u64))
                .await?
                .is_some()),
            None => Ok(false),
        }
    }

    /// The writer with Redis: copies changed feature records every `interval` until `stop`.
    pub async fn run_online_copier(
        self: Arc<Self>,
        interval: Duration,
        mut stop: tokio::sync::watch::Receiver<bool>,
    ) {
        let mut failing = false;
        loop {
            let wait = if failing {
                Duration::from_secs(1)
            } else {
                interval
            };
            let stopping = stop_within(wait, &mut stop).await;
            if stopping {
                // What the last records changed, before the process goes.
                if let Err(e) = self.copy_online().await {
                    tracing::warn!(error = %e, "last copy to redis failed; the next start copies everything");
                }
                return;
            }
            match self.copy_online().await {
                Ok(_) => failing = false,
                Err(e) => {
                    if !failing {
                        tracing::error!(error = %e, "copying features to redis failed; retrying");
                    }
                    failing = true;
                }
            }
        }
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

    /// Reads the ids of the stored events received within the dedup window into the dedup
    /// set, once (later calls return at once; concurrent ones wait for the first). Every
    /// ingest calls it first, and so does [`Ingestor::follow`]; `start` calls it before
    /// serving. Holds the flush lock meanwhile, so no flush, compaction, retention or
    /// erasure removes a file the scan reads.
    pub async fn load_dedup(&self) -> Result<(), IngestError> {
        self.dedup_loaded
            .get_or_try_init(|| async {
                let _flush = self.flush_lock.lock().await;
                let parts = {
                    let v = self.view.lock().unwrap_or_else(|p| p.into_inner());
                    raw_parts(&v.tables, &v.pending)
                };
                let now = self.config.clock.now_ms();
                let since = now - self.config.dedup_window.as_millis() as i64;
                let restored =
                    restore_dedup(parts, since, reelhouse_event::time::day_of(now)).await?;
                // Nothing was claimed before: ingest waits for this.
                *self.dedup.lock().unwrap_or_else(|p| p.into_inner()) = restored;
                Ok::<(), IngestError>(())
            })
            .await
            .map(|_| ())
    }

    /// Validates, dedups and durably logs one body of events (NDJSON or a JSON array).
    pub async fn ingest(&self, body: &[u8], path: IngestPath) -> Result<BatchOutcome, IngestError> {
        self.load_dedup().await?;
        let received_at = self.config.clock.now_ms();
        let (mut outcome, mut events, rejects) = parse_batch(body, received_at, path)?;
        if self.privacy.has_tombstones() {
            // Late events of an erased user: dropped before anything is written.
            let before = events.len();
            events.retain(|e| !self.privacy.is_tombstoned(e.event.user_id.as_i64()));
            let dropped = before - events.len();
            if dropped > 0 {
                self.erased_dropped
                    .fetch_add(dropped as u64, Ordering::Relaxed);
            }
            outcome.erased_dropped = dropped;
        }
        let claimed = self
            .dedup
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .claim(&mut events, received_at);
        outcome.accepted = events.len() + outcome.erased_dropped;
        outcome.duplicates -= outcome.accepted + outcome.rejected;

        let result = self.log(&events, &rejects).await;
        settle(
            result,
            outcome,
            claimed,
            &self.dedup,
            [&self.accepted, &self.duplicates, &self.rejected],
        )
    }

    async fn log(
        &self,
        events: &[StoredEvent],
        rejects: &[QuarantineRow],
    ) -> Result<(), IngestError> {
        if events.is_empty() && rejects.is_empty() {
            return Ok(());
        }
        if self.pending_rows() >= self.config.max_pending_rows {
            return Err(IngestError::Overloaded);
        }
        let e = (!events.is_empty())
            .then(|| events_batch(events))
            .transpose()?;
        let q = (!rejects.is_empty())
            .then(|| quarantine_batch(rejects))
            .transpose()?;
        let payload = encode_record(e.as_ref(), q.as_ref())?;
        let (tx, rx) = oneshot::channel();
        let applier = self.applier.clone();
        let done = Box::new(move |r: reelhouse_wal::Result<SegmentId>| {
            // Runs on the WAL thread after fsync, before any later rotation is handled; the
            // applier receives records and cuts in log order.
            match r {
                Ok(seg) => {
                    let msg = Apply::Record {
                        seg,
                        features: e.clone(),
                        events: e,
                        quarantine: q,
                        ack: Some(tx),
                    };
                    if let Err(std::sync::mpsc::SendError(Apply::Record {
                        ack: Some(ack), ..
                    })) = applier.send(msg)
                    {
                        let _ = ack.send(Err(IngestError::ShuttingDown));
                    }
                }
                Err(err) => {
                    let _ = tx.send(Err(IngestError::Wal(err)));
                }
            }
        });
        let Source::Wal(wal) = &self.source else {
            return Err(IngestError::WrongRole(
                "this node reads events from the shared log; send them to an ingest node",
            ));
        };
        wal.try_append(payload, done).map_err(|e| match e {
            reelhouse_wal::Error::Full => IngestError::Overloaded,
            reelhouse_wal::Error::Closed => IngestError::ShuttingDown,
            other => IngestError::Wal(other),
        })?;
        rx.await.map_err(|_| IngestError::ShuttingDown)??;
        Ok(())
    }

    /// Rotates the WAL and runs `f` on the applier thread at that exact point of the log:
    /// after every record of the sealed segment is applied and visible in `pending`, before
    /// any record of the next. With a shared log, the point is the last record read.
    pub(crate) fn rotate_cut<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<(SegmentId, T), IngestError> {
        let applier = self.applier.clone();
        let (tx, rx) = std::sync::mpsc::channel();
        let wal = match &self.source {
            Source::Wal(wal) => wal,
            Source::Log(ls) => {
                let fed = ls.fed.lock().unwrap_or_else(|p| p.into_inner());
                let cut = Apply::Cut(Box::new(move || {
                    let _ = tx.send(f());
                }));
                applier.send(cut).map_err(|_| IngestError::ShuttingDown)?;
                let at = *fed;
                drop(fed);
                let out = rx.recv().map_err(|_| IngestError::ShuttingDown)?;
                return Ok((at, out));
            }
        };
        let (seg, sent) = wal.rotate_then(move |_| {
            applier
                .send(Apply::Cut(Box::new(move || {
                    let _ = tx.send(f());
                })))
                .is_ok()
        })?;
        if !sent {
            return Err(IngestError::ShuttingDown);
        }
        let out = rx.recv().map_err(|_| IngestError::ShuttingDown)?;
        Ok((seg, out))
    }

    /// The materializer's record and the current lag, for `/metrics`.
    pub fn materializer_stats(&self) -> MaterializerStats {
        let mut m = self
            .rebuilds
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        m.events_behind = self
            .change_count()
            .saturating_sub(self.materialized_at.load(Ordering::Relaxed));
        m.dirty_dates = self
            .view
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .dirty
            .as_ref()
            .map_or(-1, |d| d.len() as i64);
        m
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

    fn flush_due(&self) -> bool {
        let v = self.view.lock().unwrap_or_else(|p| p.into_inner());
        v.pending.rows >= self.config.flush_rows
            || v.pending
                .oldest
                .is_some_and(|t| t.elapsed() >= self.config.flush_interval)
    }

    /// Commits everything acknowledged so far to Delta and truncates the WAL behind it.
    /// Returns the number of rows committed.
    /// Also snapshots the feature store, so a restart replays little.
    pub async fn flush(&self) -> Result<usize, IngestError> {
        self.flush_with(true).await
    }

    /// Commits what is pending; snapshots the feature store when `force` or when the last
    /// snapshot is older than `snapshot_interval`.
    pub(crate) async fn flush_with(&self, force: bool) -> Result<usize, IngestError> {
        if !self.is_writer() {
            // An API replica commits nothing; the materializer does.
            return Ok(0);
        }
        self.require_lease()?;
        let _guard = self.flush_lock.lock().await;
        let snapshot_due = force
            || self
                .last_snapshot
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .elapsed()
                >= self.config.snapshot_interval;
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
            .map_err(|_| IngestError::ShuttingDown)??;
            self.snapshot_segment.store(seg, Ordering::Relaxed);
            *self.last_snapshot.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
        }
        // Segments the feature snapshot does not cover yet stay for its replay.
        let covered = self.snapshot_segment.load(Ordering::Relaxed);
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
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .expire(keep_from);
        self.flushes.fetch_add(1, Ordering::Relaxed);
        Ok(committed_rows)
    }

    /// Bins the small files of the `events` dates that have collected
    /// [`reelhouse_lake::compact::MIN_SMALL_FILES`] small ones (one per flush, late events)
    /// into files of up to [`reelhouse_lake::compact::TARGET_FILE_BYTES`], in one commit.
    /// Called with the flush lock held, so no append races it. The rows do not change, so
    /// nothing is rebuilt; a failure is logged and the small files stay until the next flush
    /// tries again.
    async fn compact_events(&self) {
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
                self.compactions.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => tracing::warn!(error = %e, "compaction of events failed; will retry"),
        }
    }

    /// Runs until `stop` resolves: flushes whenever enough rows or time have accumulated.
    pub async fn run_flusher(self: Arc<Self>, mut stop: tokio::sync::watch::Receiver<bool>) {
        loop {
            if stop_within(Duration::from_millis(200), &mut stop).await {
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

    /// A SQL catalog over exactly what has been acknowledged so far, plus the latest
    /// materialized warehouse tables.
    pub async fn catalog(&self) -> Result<Catalog, IngestError> {
        Ok(self.catalog_taking_dirty(false).await?.0)
    }

    /// [`Ingestor::catalog`]; with `take`, also takes the dirty dates (atomically with the
    /// snapshot) and starts a new set.
    async fn catalog_taking_dirty(
        &self,
        take: bool,
    ) -> Result<(Catalog, Option<Vec<i32>>), IngestError> {
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

    /// The next rebuild recomputes `days` (and the dates they affect) besides the dates already
    /// dirty: rows were deleted there (erasure, anonymization). Until that rebuild has run the
    /// durable state says "full", so a crash before it leads to a full rebuild.
    pub(crate) async fn dirty_after_deletion(&self, days: &[i32]) -> Result<(), IngestError> {
        let since = self
            .late
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .materialized_at_ms;
        // Just started (no dirty set in memory) but the last rebuild is known: start noting
        // dates now, then add those received since that rebuild, so nothing falls between.
        let restore = {
            let mut v = self.view.lock().unwrap_or_else(|p| p.into_inner());
            match (&v.dirty, since) {
                (None, Some(_)) => {
                    v.dirty = Some(Default::default());
                    since
                }
                _ => None,
            }
        };
        let mut extra = days.to_vec();
        if let Some(t) = restore {
            let catalog = self.catalog().await?;
            extra.extend(days_received_since(&catalog, t).await?);
        }
        {
            let mut late = self.late.lock().unwrap_or_else(|p| p.into_inner());
            late.materialized_at_ms = None;
            late.save(self.lake.root())?;
        }
        self.extend_dirty(extra);
        Ok(())
    }

    /// Adds `days` to the dates the next rebuild recomputes, where those are kept in memory
    /// (not right after a start: see [`Ingestor::materialize_with`]).
    fn extend_dirty(&self, days: impl IntoIterator<Item = i32>) {
        if let Some(d) = self
            .view
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .dirty
            .as_mut()
        {
            d.extend(days);
        }
    }

    /// The next rebuild recomputes every date (after deletions: retention, erasure). Durable,
    /// so a crash before that rebuild still leads to a full one.
    pub(crate) fn force_full_rebuild(&self) -> Result<(), IngestError> {
        self.view.lock().unwrap_or_else(|p| p.into_inner()).dirty = None;
        let mut late = self.late.lock().unwrap_or_else(|p| p.into_inner());
        late.materialized_at_ms = None;
        late.save(self.lake.root())
    }

    /// True when events were accepted since the last materialization started.
    pub fn materialization_due(&self) -> bool {
        self.change_count() != self.materialized_at.load(Ordering::Relaxed)
    }

    /// Grows with every accepted event and dimension upsert.
    fn change_count(&self) -> u64 {
        self.accepted.load(Ordering::Relaxed)
            + self.replayed
            + self.dim_upserts.load(Ordering::Relaxed)
    }

    /// Appends SCD2 upserts for one dimension (`PUT /v1/dims/{kind}`), durably, in one Delta
    /// commit; the next materialization rebuilds the dimension tables.
    pub async fn upsert_dims(
        &self,
        kind: reelhouse_warehouse::dims::DimKind,
        body: &[u8],
    ) -> Result<DimsOutcome, IngestError> {
        self.require_writer()?;
        let now = self.config.clock.now_ms();
        let (batch, accepted, errors) = reelhouse_warehouse::dims::parse_upserts(kind, body, now);
        let rejected = errors.len();
        if let Some(batch) = batch {
            let _guard = self.dims_lock.lock().await;
            let name = reelhouse_warehouse::dims::UPDATES_TABLE;
            let current = {
                let v = self.view.lock().unwrap_or_else(|p| p.into_inner());
                v.derived.get(name).cloned()
            };
            let table = self.lake.append_table(name, current, batch).await?;
            self.view
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .derived
                .insert(name.to_string(), table);
            self.dim_upserts
                .fetch_add(accepted as u64, Ordering::Relaxed);
        }
        Ok(DimsOutcome {
            accepted,
            rejected,
            errors: errors.into_iter().take(MAX_ERRORS).collect(),
        })
    }

    /// Brings the warehouse tables up to every acknowledged event: recomputes the dates that
    /// received events since the last rebuild and the dates they affect (all of them when
    /// that is unknown), and publishes the new versions to SQL at once.
    pub async fn materialize(&self) -> Result<reelhouse_warehouse::Report, IngestError> {
        self.require_writer()?;
        let _guard = self.materialize_lock.lock().await;
        self.materialize_locked().await
    }

    /// [`Ingestor::materialize`] recomputing every date.
    pub async fn materialize_full(&self) -> Result<reelhouse_warehouse::Report, IngestError> {
        self.materialize_full_on(&self.lake).await
    }

    /// [`Ingestor::materialize_full`] that also writes every date's file whose rows did not
    /// change (normally kept as they are; see `Lake::rewriting_unchanged`), so that each run
    /// does the whole write: for `reelhouse bench materialize`.
    pub async fn materialize_full_rewriting(
        &self,
    ) -> Result<reelhouse_warehouse::Report, IngestError> {
        let lake = self.lake.clone().rewriting_unchanged(true);
        self.materialize_full_on(&lake).await
    }

    /// [`Ingestor::materialize_full`] writing through `lake`.
    async fn materialize_full_on(
        &self,
        lake: &reelhouse_lake::Lake,
    ) -> Result<reelhouse_warehouse::Report, IngestError> {
        self.require_writer()?;
        let _guard = self.materialize_lock.lock().await;
        self.force_full_rebuild()?;
        self.materialize_locked_on(lake).await
    }

    /// [`Ingestor::materialize`] for a caller that holds `materialize_lock`.
    pub(crate) async fn materialize_locked(
        &self,
    ) -> Result<reelhouse_warehouse::Report, IngestError> {
        self.materialize_locked_on(&self.lake).await
    }

    /// [`Ingestor::materialize_locked`] writing through `lake` (this ingestor's, or a copy
    /// with other write settings).
    async fn materialize_locked_on(
        &self,
        lake: &reelhouse_lake::Lake,
    ) -> Result<reelhouse_warehouse::Report, IngestError> {
        let seen = self.change_count();
        let now = self.config.clock.now_ms();
        let (catalog, dirty) = match self.catalog_taking_dirty(true).await {
            Ok(c) => c,
            Err(e) => {
                self.view.lock().unwrap_or_else(|p| p.into_inner()).dirty = None;
                return Err(e);
            }
        };
        let result = self.materialize_with(catalog, dirty, now, lake).await;
        {
            let mut r = self.rebuilds.lock().unwrap_or_else(|p| p.into_inner());
            match &result {
                Ok(rep) => {
                    r.runs += 1;
                    r.last_ms = rep.elapsed_ms;
                    r.last_dates = rep.dates.as_ref().map_or(-1, |d| d.len() as i64);
                    r.last_at_ms = self.config.clock.now_ms();
                }
                Err(_) => r.failures += 1,
            }
        }
        if result.is_err() {
            // The taken dates were not rebuilt: rebuild everything next time.
            self.view.lock().unwrap_or_else(|p| p.into_inner()).dirty = None;
        }
        let report = result?;
        self.materialized_at.store(seen, Ordering::Relaxed);
        Ok(report)
    }

    async fn materialize_with(
        &self,
        catalog: Catalog,
        dirty: Option<Vec<i32>>,
        now: i64,
        lake: &reelhouse_lake::Lake,
    ) -> Result<reelhouse_warehouse::Report, IngestError> {
        // After a start the dirty dates are not known in memory: the events received since
        // the last rebuild's snapshot (with a margin) name them.
        // The dates of restatements made since then count too.
        let (since, restated) = {
            let late = self.late.lock().unwrap_or_else(|p| p.into_inner());
            let since = late.materialized_at_ms;
            let restated: Vec<i32> = late
                .restatements
                .iter()
                .filter(|(_, _, at)| since.is_some_and(|t| *at >= t))
                .flat_map(|(from, to, _)| *from..=*to)
                .collect();
            (since, restated)
        };
        let dirty = match (dirty, since) {
            (Some(d), _) => Some(d),
            (None, Some(t)) => {
                let mut d = days_received_since(&catalog, t).await?;
                d.extend(restated);
                Some(d)
            }
            (None, None) => None,
        };
        let current = {
            let v = self.view.lock().unwrap_or_else(|p| p.into_inner());
            v.derived.clone()
        };
        let inputs = {
            let mut late = self.late.lock().unwrap_or_else(|p| p.into_inner());
            // Dates whose end plus the allowed lateness has passed close now.
            let window = self.config.dedup_window.as_millis() as i64;
            let horizon = reelhouse_event::time::day_of(now - window) - 1;
            if late.closures.last().is_none_or(|(h, _)| *h < horizon) {
                late.closures.push((horizon, now));
                late.save(self.lake.root())?;
            }
            reelhouse_warehouse::Inputs {
                now_ms: now,
                closures: late.closures.clone(),
                restatements: late.restatements.clone(),
                frozen_before: late.frozen_before,
                facts_before: late.frozen_before.map(|_| {
                    reelhouse_event::time::day_of(now) - self.config.retention.facts_days as i32
                }),
                dirty,
            }
        };
        let (report, handles) =
            reelhouse_warehouse::materialize(&catalog, lake, &current, &inputs).await?;
        {
            let mut v = self.view.lock().unwrap_or_else(|p| p.into_inner());
            for (name, table) in handles {
                v.derived.insert(name, table);
            }
        }
        *self.dashboard.lock().await = None;
        {
            let mut late = self.late.lock().unwrap_or_else(|p| p.into_inner());
            late.materialized_at_ms = Some(now);
            late.save(self.lake.root())?;
        }
        Ok(report)
    }

    /// The dashboard index of the current warehouse version, built on first use.
    pub async fn dashboard_index(
        &self,
    ) -> Result<Arc<crate::dashboard::DashboardIndex>, crate::ApiError> {
        let mut slot = self.dashboard.lock().await;
        if let Some(idx) = slot.as_ref() {
            return Ok(Arc::clone(idx));
        }
        let catalog = self.catalog().await?;
        let idx = Arc::new(crate::dashboard::DashboardIndex::build(&catalog).await?);
        *slot = Some(Arc::clone(&idx));
        Ok(idx)
    }

    /// Applies the retention policies: whole expired partitions of `events` and `quarantine`
    /// are deleted and their files vacuumed; date-keyed facts and aggregates keep their rows for
    /// those dates (facts until `facts_days`) at every later rebuild.
    pub async fn apply_retention(&self) -> Result<RetentionReport, IngestError> {
        self.require_writer()?;
        use reelhouse_lake::erase::{delete_where, purge_history, TableErasure};
        let r = self.config.retention;
        let today = reelhouse_event::time::day_of(self.config.clock.now_ms());
        let date = |d: i32| {
            (chrono::NaiveDate::default() + chrono::Duration::days(d as i64))
                .format("%Y-%m-%d")
                .to_string()
        };
        let (ev, q, f) = (
            today - r.events_days as i32,
            today - r.quarantine_days as i32,
            today - r.facts_days as i32,
        );
        self.flush().await?;
        let _flush = self.flush_lock.lock().await;
        let _mat = self.materialize_lock.lock().await;
        let mut tables = Vec::new();
        for (t, col, before) in [
            (RawTable::Events, "event_date", ev),
            (RawTable::Quarantine, "received_date", q),
        ] {
            let Some(table) = self.raw_table(t) else {
                continue;
            };
            let mut rep = TableErasure {
                table: t.name().to_string(),
                ..TableErasure::default()
            };
            let pred = format!("{col} < '{}'", date(before));
            let props = Some(t.rewrite_properties(&table)?);
            let table = delete_where(table, &pred, props, &mut rep).await?;
            let table = purge_history(table, &mut rep).await?;
            self.set_raw_table(t, table);
            tables.push(rep);
        }
        {
            let mut late = self.late.lock().unwrap_or_else(|p| p.into_inner());
            late.frozen_before = Some(late.frozen_before.map_or(ev, |x| x.max(ev)));
            late.save(self.lake.root())?;
        }
        self.force_full_rebuild()?;
        self.materialize_locked().await?;
        Ok(RetentionReport {
            events_before: date(ev),
            quarantine_before: date(q),
            facts_before: date(f),
            tables,
        })
    }

    /// Runs [`Ingestor::apply_retention`] once a day until `stop` changes.
    pub async fn run_retention(self: Arc<Self>, mut stop: tokio::sync::watch::Receiver<bool>) {
        loop {
            if stop_within(Duration::from_secs(86_400), &mut stop).await {
                return;
            }
            match self.apply_retention().await {
                Ok(r) => tracing::info!(tables = r.tables.len(), "applied retention"),
                Err(e) => tracing::error!(error = %e, "retention failed; will retry tomorrow"),
            }
        }
    }

    /// Allowed lateness: events later than this count in the warehouse only once their date
    /// is restated.
    pub fn allowed_lateness(&self) -> Duration {
        self.config.dedup_window
    }

    /// Counts every event stored so far for dates `from..=to` (days since epoch), however
    /// late, and rebuilds the warehouse.
    pub async fn restate(
        &self,
        from: i32,
        to: i32,
    ) -> Result<reelhouse_warehouse::Report, IngestError> {
        self.require_writer()?;
        {
            let mut late = self.late.lock().unwrap_or_else(|p| p.into_inner());
            late.restatements
                .push((from, to, self.config.clock.now_ms()));
            late.save(self.lake.root())?;
        }
        let _guard = self.materialize_lock.lock().await;
        // The restated dates count more events now: rebuild them (and what they affect). With
        // no dirty set in memory (just started, or a one-shot `reelhouse restate`), the
        // rebuild finds them among the restatements made since the last rebuild (saved above,
        // so a crash before the rebuild still leads to it).
        self.extend_dirty(from..=to);
        self.materialize_locked().await
    }

    /// Runs until `stop` changes: materializes while new events arrive, waiting `interval`
    /// and at least twice the last rebuild's duration between runs, so full rebuilds of a
    /// large directory take at most about a third of the time and ingest keeps the rest.
    pub async fn run_materializer(
        self: Arc<Self>,
        interval: Duration,
        mut stop: tokio::sync::watch::Receiver<bool>,
    ) {
        let mut wait = interval;
        loop {
            if stop_within(wait, &mut stop).await {
                return;
            }
            if self.materialization_due() {
                let started = Instant::now();
                match self.materialize().await {
                    Ok(r) => tracing::info!(elapsed_ms = r.elapsed_ms, "materialized warehouse"),
                    Err(e) => tracing::error!(error = %e, "materialization failed; will retry"),
                }
                wait = interval.max(started.elapsed() * 2);
            }
        }
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
            accepted: self.accepted.load(Ordering::Relaxed),
            duplicates: self.duplicates.load(Ordering::Relaxed),
            rejected: self.rejected.load(Ordering::Relaxed),
            pending_rows: self.pending_rows() as u64,
            flushes: self.flushes.load(Ordering::Relaxed),
            compactions: self.compactions.load(Ordering::Relaxed),
            replayed_rows: self.replayed,
            wal_segment: wal.current_segment,
            wal_fsyncs: wal.fsyncs,
            erased_dropped: self.erased_dropped.load(Ordering::Relaxed),
        }
    }
}

/// Waits `wait`, or less when `stop` changes first: then true (time to stop). The pause of
/// every background loop.
pub(crate) async fn stop_within(
    wait: Duration,
    stop: &mut tokio::sync::watch::Receiver<bool>,
) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(wait) => false,
        _ = stop.changed() => true,
    }
}

/// State files under `_state/` that every process of a deployment shares; with tables on an
/// object store they are mirrored next to the tables (see `reelhouse_lake::store`).
pub(crate) const SHARED_STATE: [&str; 3] = ["log.json", "late_data.json", "privacy/state.json"];

/// How long a writer's lease on object-store tables lasts without renewal (renewed every
/// third of it): how long a replacement on another machine waits after a crash.
pub const LEASE_TTL: Duration = Duration::from_secs(30);

/// This state directory's writer identity (random, made once): a restart on the same
/// directory takes its own lease back at once.
fn writer_id(root: &Path) -> Result<String, IngestError> {
    let path = root.join("_state").join("writer_id");
    match std::fs::read_to_string(&path) {
        Ok(id) if !id.trim().is_empty() => Ok(id.trim().to_string()),
        _ => {
            let id = hex::encode(rand::random::<[u8; 16]>());
            write_atomically(&path, id.as_bytes())?;
            Ok(id)
        }
    }
}

/// A writer starting on tables on an object store takes the mirrored shared state files
/// when it has no local copy (a new machine) or when another writer held the tables since
/// (`theirs`: its copies are newer). A restart of the last writer keeps its local files, which
/// may be up to a second newer than the mirror.
async fn restore_state_files(lake: &Lake, theirs: bool) -> Result<(), IngestError> {
    for rel in SHARED_STATE {
        let local = lake.root().join("_state").join(rel);
        if local.exists() && !theirs {
            continue;
        }
        if let Some(bytes) = lake.tables().get_state(rel).await? {
            tracing::info!(file = rel, "restored a state file from the object store");
            write_atomically(&local, &bytes)?;
        }
    }
    Ok(())
}

impl Ingestor {
    /// The writer with tables on an object store: copies the shared state files that changed
    /// since the last copy next to the tables (a no-op for a local data directory).
    pub async fn mirror_state(&self) -> Result<usize, IngestError> {
        if !self.lake.tables().is_remote() || !self.is_writer() {
            return Ok(0);
        }
        let mut copied = 0;
        for rel in SHARED_STATE {
            let Ok(bytes) = std::fs::read(self.lake.root().join("_state").join(rel)) else {
                continue;
            };
            let hash = xxhash_rust::xxh3::xxh3_64(&bytes);
            let last = self
                .mirrored
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(rel)
                .copied();
            if last == Some(hash) {
                continue;
            }
            self.lake.tables().put_state(rel, bytes).await?;
            self.mirrored
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(rel, hash);
            copied += 1;
        }
        Ok(copied)
    }

    /// Renews the writer lease every third of [`LEASE_TTL`] until `stop`, then gives it up.
    /// Losing it (another process took over) stops this process's commits.
    pub async fn run_lease_renewal(self: Arc<Self>, mut stop: tokio::sync::watch::Receiver<bool>) {
        loop {
            let stopping = stop_within(LEASE_TTL / 3, &mut stop).await;
            let mut lease = self.lease.lock().await;
            let Some(cur) = lease.as_ref() else { return };
            if stopping {
                // After the final flush has committed; the next writer need not wait.
                return;
            }
            match self.lake.tables().renew_writer(cur, self.now_ms()).await {
                Ok(next) => *lease = Some(next),
                Err(e @ reelhouse_lake::Error::LeaseLost(_)) => {
                    tracing::error!(error = %e, "lost the writer lease");
                    self.lease_lost.store(true, Ordering::Relaxed);
                    return;
                }
                Err(e) => tracing::warn!(error = %e, "could not renew the writer lease; retrying"),
            }
        }
    }

    /// For a writer with tables on an object store, after its last commit: copies the shared
    /// state files there and gives the writer lease up (a no-op otherwise). One-shot commands
    /// and server shutdown end with it.
    pub async fn close(&self) {
        if let Err(e) = self.mirror_state().await {
            tracing::warn!(error = %e, "could not copy state files to the object store");
        }
        self.release_lease().await;
    }

    /// Gives the writer lease up (at shutdown, after the last commit).
    async fn release_lease(&self) {
        if let Some(l) = self.lease.lock().await.take() {
            if let Err(e) = self.lake.tables().release_writer(&l).await {
                tracing::warn!(error = %e, "could not release the writer lease; it expires by itself");
            }
        }
    }

    /// Mirrors the shared state every `interval` (and once more at `stop`).
    pub async fn run_state_mirror(
        self: Arc<Self>,
        interval: Duration,
        mut stop: tokio::sync::watch::Receiver<bool>,
    ) {
        loop {
            let stopping = stop_within(interval, &mut stop).await;
            if let Err(e) = self.mirror_state().await {
                tracing::warn!(error = %e, "could not copy state files to the object store; retrying");
            }
            if stopping {
                return;
            }
        }
    }
}

/// Writes a small state file atomically: temp file, fsync, rename, fsync the directory.
pub(crate) fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".tmp");
    let tmp = dir.join(name);
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    std::fs::File::open(dir)?.sync_all()?;
    Ok(())
}

/// Date closures and restatements, durable in `_state/late_data.json`.
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
struct LateState {
    closures: Vec<(i32, i64)>,
    restatements: Vec<(i32, i32, i64)>,
    /// Raw events of dates before this day were dropped by retention.
    #[serde(default)]
    frozen_before: Option<i32>,
    /// The clock when the last successful rebuild took its snapshot of the events (`None`:
    /// unknown, or a change that needs a full rebuild is under way).
    #[serde(default)]
    materialized_at_ms: Option<i64>,
}

impl LateState {
    fn path(root: &Path) -> PathBuf {
        root.join("_state").join("late_data.json")
    }

    fn load(root: &Path) -> Result<LateState, IngestError> {
        match std::fs::read(Self::path(root)) {
            Ok(b) => serde_json::from_slice(&b)
                .map_err(|_| IngestError::BadBody("_state/late_data.json is unreadable".into())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(LateState::default()),
            Err(e) => Err(e.into()),
        }
    }

    fn save(&self, root: &Path) -> Result<(), IngestError> {
        let bytes = serde_json::to_vec(self).unwrap_or_default();
        Ok(write_atomically(&Self::path(root), &bytes)?)
    }
}

/// Fills an empty feature store from every stored event (committed or pending): the path when
/// there is no usable snapshot.
async fn rebuild_features(features: &FeatureStore, view: &View) -> Result<(), IngestError> {
    let catalog = Catalog::new(raw_parts(&view.tables, &view.pending)).await?;
    let sql = format!("SELECT {} FROM events", reelhouse_online::rows::COLUMNS);
    for b in catalog.query(&sql).await? {
        features.apply(&b)?;
    }
    Ok(())
}

/// Rebuilds the dedup set from events received since `since_ms` (committed or pending).
async fn restore_dedup(
    parts: Vec<(RawTable, Option<DeltaTable>, Vec<RecordBatch>)>,
    since_ms: i64,
    today: i32,
) -> Result<Dedup, IngestError> {
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

    #[test]
    fn a_data_directory_stays_with_one_log() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let nats = |host: &str, stream: &str| Some((format!("nats://{host}/{stream}"), true));
        // The materializer's first start binds the directory to its stream.
        check_log_binding(root, nats("127.0.0.1:4222", "events")).unwrap();
        // Another name for the same server is the same stream; a replica never writes.
        check_log_binding(root, nats("localhost:4222", "events")).unwrap();
        check_log_binding(root, Some(("nats://h/events".into(), false))).unwrap();
        assert!(check_log_binding(root, nats("127.0.0.1:4222", "other")).is_err());
        assert!(
            check_log_binding(root, None).is_err(),
            "embedded on a log's directory"
        );

        let embedded = tempfile::tempdir().unwrap();
        let wal = Wal::open(wal_dir(embedded.path()), 4).unwrap();
        wal.close();
        check_log_binding(embedded.path(), None).unwrap();
        assert!(
            check_log_binding(embedded.path(), nats("h", "events")).is_err(),
            "a shared log on an embedded node's directory"
        );
    }

    #[test]
    fn record_round_trip() {
        let rows = vec![QuarantineRow {
            received_at_ms: 1_700_000_000_000,
            event_id: None,
            reason: "r".into(),
            raw: "{".into(),
            ingest_path: "http",
        }];
        let q = quarantine_batch(&rows).unwrap();
        let bytes = encode_record(None, Some(&q)).unwrap();
        let (e, q2) = decode_record(&bytes).unwrap();
        assert!(e.is_none());
        assert_eq!(q2.unwrap(), q);
    }
}
