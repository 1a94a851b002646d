//! Opening a data directory: the writer's lock (and lease, for tables on an object store),
//! the tables, the feature store from its snapshot (or rebuilt from the tables), the WAL
//! replay, and the components of the [`Engine`].

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};

use reelhouse_lake::query::Catalog;
use reelhouse_lake::{Lake, RawTable};
use reelhouse_log::EventLog;
use reelhouse_online::FeatureStore;
use reelhouse_wal::Wal;

use crate::applier::{raw_parts, spawn_applier, Pending, View};
use crate::dedup::DedupState;
use crate::flush::FlushState;
use crate::materialize::{LateState, MaterializeState};
use crate::metrics::Metrics;
use crate::replication::{restore_state_files, writer_id, Replication, LEASE_TTL};
use crate::source::{check_log_binding, committed_positions, replay, wal_dir, LogSource, Source};
use crate::tasks::Tasks;
use crate::{Engine, EngineConfig, Error};

/// Reads the committed tables plus the WAL records not yet in them, without taking the data
/// directory over (for read-only tools such as `reelhouse sql`).
pub async fn read_only_view(data_dir: &Path, tables: Option<&str>) -> Result<Catalog, Error> {
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
pub(crate) fn derived_names() -> impl Iterator<Item = &'static str> {
    reelhouse_warehouse::table_names()
        .chain([reelhouse_warehouse::dims::UPDATES_TABLE, "privacy_audit"])
}

/// Fills an empty feature store from every stored event (committed or pending): the path when
/// there is no usable snapshot.
pub(crate) async fn rebuild_features(features: &FeatureStore, view: &View) -> Result<(), Error> {
    let catalog = Catalog::new(raw_parts(&view.tables, &view.pending)).await?;
    let sql = format!("SELECT {} FROM events", reelhouse_online::rows::COLUMNS);
    for b in catalog.query(&sql).await? {
        features.apply(&b)?;
    }
    Ok(())
}

impl Engine {
    /// Opens the data directory: loads the tables, replays the WAL and opens a new WAL
    /// segment. The dedup set of the last `dedup_window` of received events is read at the
    /// first ingest ([`Engine::load_dedup`]).
    pub async fn open(config: EngineConfig) -> Result<Arc<Engine>, Error> {
        Self::open_with(config, None).await
    }

    /// Opens the data directory as a process of a deployment with a shared log (see
    /// `reelhouse_log`): `writer` for the one materializer (takes the directory's lock, commits
    /// to Delta, runs the warehouse, acknowledges and truncates the log), else a read-only API
    /// replica. Records come from [`Engine::follow`], not from HTTP.
    pub async fn open_following(
        config: EngineConfig,
        log: Arc<dyn EventLog>,
        writer: bool,
    ) -> Result<Arc<Engine>, Error> {
        Self::open_with(config, Some((log, writer))).await
    }

    pub(crate) async fn open_with(
        config: EngineConfig,
        log: Option<(Arc<dyn EventLog>, bool)>,
    ) -> Result<Arc<Engine>, Error> {
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
                return Err(Error::Locked(lake.root().to_path_buf()));
            }
            // A rebuild that did not end (a crash) leaves its scratch files of events: they
            // must not outlive an erasure (docs/privacy.md).
            let scratch = lake.root().join(reelhouse_warehouse::SCRATCH_DIR);
            if scratch.exists() {
                std::fs::remove_dir_all(&scratch)?;
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
        let lake_root = lake.root().to_path_buf();
        let privacy = if writer {
            reelhouse_privacy::Privacy::open(&lake_root)?
        } else if lake.tables().is_remote() {
            let shared = lake
                .tables()
                .get_state(reelhouse_privacy::STATE_FILE)
                .await?;
            reelhouse_privacy::Privacy::read_only_from(&lake_root, shared.as_deref())?
        } else {
            reelhouse_privacy::Privacy::open_read_only(&lake_root)?
        };
        // A one-shot load of a few events leaves the store on disk: the WAL segments after
        // its snapshot are kept (flush truncates only what a snapshot covers) and replayed
        // into the store by the next process that loads it.
        let deferred = config.defer_features
            && writer
            && log.is_none()
            && config.online.is_none()
            && privacy.unfinished().is_empty()
            && wal_bytes(&dir)? < crate::config::DEFER_FEATURES_MAX_WAL_BYTES;
        // (Not even read when the store is not wanted: it is ~50 bytes per event kept.)
        let read = if no_store || deferred {
            Ok(None)
        } else {
            reelhouse_online::snapshot::load(lake.root())
        };
        let snapshot = match read {
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
        let snapshot_segment = match deferred {
            // Its segment alone (a damaged snapshot is rebuilt by the next full open).
            true => reelhouse_online::snapshot::segment(lake.root()).unwrap_or(None),
            false => snapshot_segment,
        };
        let (pending, wal_events) = match log {
            None if deferred => replay(&committed, &dir, true, None).await?,
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
            _ if deferred => 0,
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
        if replayed > 0 {
            tracing::info!(rows = replayed, "replayed write-ahead log");
        }
        let shared_log = matches!(source, Source::Log(_));
        let redis = config.online.is_some();
        let features = Arc::new(features);
        let view = Arc::new(Mutex::new(view));
        let applier = spawn_applier(Arc::clone(&features), Arc::clone(&view))?;
        let engine = Arc::new(Engine {
            lake,
            source,
            features,
            applier,
            view,
            dedup: DedupState::default(),
            flusher: FlushState::new(snapshot_segment.unwrap_or(0), deferred),
            materializer: MaterializeState::new(LateState::load(&lake_root)?),
            replication: Replication::new(lease),
            privacy,
            metrics: Metrics::new(replayed, shared_log, writer && redis),
            tasks: Tasks::default(),
            config,
            _lock: lock,
        });
        if writer {
            engine.resume_privacy();
        }
        Ok(engine)
    }
}

/// Bytes of the WAL segment files in `dir` (0 when there is none yet).
fn wal_bytes(dir: &Path) -> std::io::Result<u64> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e),
    };
    let mut n = 0;
    for e in entries {
        n += e?.metadata()?.len();
    }
    Ok(n)
}
