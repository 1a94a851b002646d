//! Materialize scheduling and late data: which dates the next warehouse rebuild recomputes
//! (dirty dates, restatements, closed dates), the periodic loop, and the state that survives
//! a restart (`_state/late_data.json`). The models themselves are `reelhouse_warehouse`'s.
//!
//! ```text
//!  applier: event_date of each visible event ─▶ view.dirty
//!  rebuild: take dirty dates with a catalog snapshot ─▶ Inputs (closures, restatements,
//!           retention horizon) ─▶ reelhouse_warehouse::materialize ─▶ new table versions
//!           ─▶ view.derived, dashboard index dropped, late_data.json saved
//! ```

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use reelhouse_lake::query::Catalog;
use reelhouse_lake::store::write_atomically;
use tokio_util::sync::CancellationToken;

use crate::tasks::stop_within;
use crate::{Engine, Error};

/// The materializer component of the engine.
pub(crate) struct MaterializeState {
    /// Held by a rebuild (and by erasure and retention around theirs).
    pub(crate) lock: tokio::sync::Mutex<()>,
    /// Change count at the start of the last materialization (dirty check).
    pub(crate) materialized_at: AtomicU64,
    /// The materializer's record for `/metrics`.
    pub(crate) stats: Mutex<MaterializerStats>,
    /// Date closures and restatements (see `reelhouse_warehouse::Inputs`), persisted in
    /// `_state/late_data.json`.
    pub(crate) late: Mutex<LateState>,
    /// The dimension-upsert writer's lock.
    pub(crate) dims_lock: tokio::sync::Mutex<()>,
    /// The dashboard's in-memory index of the current warehouse version (built lazily).
    pub(crate) dashboard: tokio::sync::Mutex<Option<Arc<crate::dashboard::DashboardIndex>>>,
}

impl MaterializeState {
    pub(crate) fn new(late: LateState) -> Self {
        MaterializeState {
            lock: tokio::sync::Mutex::new(()),
            materialized_at: AtomicU64::new(0),
            stats: Mutex::new(MaterializerStats::default()),
            late: Mutex::new(late),
            dims_lock: tokio::sync::Mutex::new(()),
            dashboard: tokio::sync::Mutex::new(None),
        }
    }
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

/// The `event_date`s of events received at or after `t` minus [`RESTART_DIRTY_MARGIN_MS`].
pub(crate) async fn days_received_since(catalog: &Catalog, t: i64) -> Result<Vec<i32>, Error> {
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
pub(crate) const RESTART_DIRTY_MARGIN_MS: i64 = 10 * 60 * 1000;

/// Date closures and restatements, durable in `_state/late_data.json`.
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
pub(crate) struct LateState {
    pub(crate) closures: Vec<(i32, i64)>,
    pub(crate) restatements: Vec<(i32, i32, i64)>,
    /// Raw events of dates before this day were dropped by retention.
    #[serde(default)]
    pub(crate) frozen_before: Option<i32>,
    /// The clock when the last successful rebuild took its snapshot of the events (`None`:
    /// unknown, or a change that needs a full rebuild is under way).
    #[serde(default)]
    pub(crate) materialized_at_ms: Option<i64>,
}

impl LateState {
    pub(crate) fn path(root: &Path) -> PathBuf {
        root.join("_state").join("late_data.json")
    }

    pub(crate) fn load(root: &Path) -> Result<LateState, Error> {
        match std::fs::read(Self::path(root)) {
            Ok(b) => serde_json::from_slice(&b)
                .map_err(|_| Error::BadBody("_state/late_data.json is unreadable".into())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(LateState::default()),
            Err(e) => Err(e.into()),
        }
    }

    pub(crate) fn save(&self, root: &Path) -> Result<(), Error> {
        let bytes = serde_json::to_vec(self).unwrap_or_default();
        Ok(write_atomically(&Self::path(root), &bytes)?)
    }
}

impl Engine {
    /// The materializer's record and the current lag, for `/metrics`.
    pub fn materializer_stats(&self) -> MaterializerStats {
        let mut m = self
            .materializer
            .stats
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        m.events_behind = self
            .change_count()
            .saturating_sub(self.materializer.materialized_at.load(Ordering::Relaxed));
        m.dirty_dates = self
            .view
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .dirty
            .as_ref()
            .map_or(-1, |d| d.len() as i64);
        m
    }

    /// The next rebuild recomputes `days` (and the dates they affect) besides the dates already
    /// dirty: rows were deleted there (erasure, anonymization). Until that rebuild has run the
    /// durable state says "full", so a crash before it leads to a full rebuild.
    pub(crate) async fn dirty_after_deletion(&self, days: &[i32]) -> Result<(), Error> {
        let since = self
            .materializer
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
        self.forget_last_rebuild()?;
        self.extend_dirty(extra);
        Ok(())
    }

    /// Adds `days` to the dates the next rebuild recomputes, where those are kept in memory
    /// (not right after a start: see [`Engine::materialize_with`]).
    pub(crate) fn extend_dirty(&self, days: impl IntoIterator<Item = i32>) {
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
    pub(crate) fn force_full_rebuild(&self) -> Result<(), Error> {
        self.view.lock().unwrap_or_else(|p| p.into_inner()).dirty = None;
        self.forget_last_rebuild()
    }

    /// Durably forgets when the last rebuild took its snapshot, so that until the next one
    /// succeeds a restart cannot take the events received since as the only dirty dates.
    fn forget_last_rebuild(&self) -> Result<(), Error> {
        let mut late = self
            .materializer
            .late
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        late.materialized_at_ms = None;
        late.save(self.lake.root())
    }

    /// True when events were accepted since the last materialization started.
    pub fn materialization_due(&self) -> bool {
        self.change_count() != self.materializer.materialized_at.load(Ordering::Relaxed)
    }

    /// Grows with every accepted event and dimension upsert.
    pub(crate) fn change_count(&self) -> u64 {
        self.metrics.accepted.get() + self.metrics.replayed + self.metrics.dim_upserts.get()
    }

    /// Brings the warehouse tables up to every acknowledged event: recomputes the dates that
    /// received events since the last rebuild and the dates they affect (all of them when
    /// that is unknown), and publishes the new versions to SQL at once.
    pub async fn materialize(&self) -> Result<reelhouse_warehouse::Report, Error> {
        self.require_writer()?;
        let _guard = self.materializer.lock.lock().await;
        self.materialize_locked().await
    }

    /// [`Engine::materialize`] recomputing every date.
    pub async fn materialize_full(&self) -> Result<reelhouse_warehouse::Report, Error> {
        self.materialize_full_on(&self.lake).await
    }

    /// [`Engine::materialize_full`] that also writes every date's file whose rows did not
    /// change (normally kept as they are; see `Lake::rewriting_unchanged`), so that each run
    /// does the whole write: for `reelhouse bench materialize`.
    pub async fn materialize_full_rewriting(&self) -> Result<reelhouse_warehouse::Report, Error> {
        let lake = self.lake.clone().rewriting_unchanged(true);
        self.materialize_full_on(&lake).await
    }

    /// [`Engine::materialize_full`] writing through `lake`.
    pub(crate) async fn materialize_full_on(
        &self,
        lake: &reelhouse_lake::Lake,
    ) -> Result<reelhouse_warehouse::Report, Error> {
        self.require_writer()?;
        let _guard = self.materializer.lock.lock().await;
        self.force_full_rebuild()?;
        self.materialize_locked_on(lake).await
    }

    /// [`Engine::materialize`] for a caller that holds `materialize_lock`.
    pub(crate) async fn materialize_locked(&self) -> Result<reelhouse_warehouse::Report, Error> {
        self.materialize_locked_on(&self.lake).await
    }

    /// [`Engine::materialize_locked`] writing through `lake` (this ingestor's, or a copy
    /// with other write settings).
    pub(crate) async fn materialize_locked_on(
        &self,
        lake: &reelhouse_lake::Lake,
    ) -> Result<reelhouse_warehouse::Report, Error> {
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
            let mut r = self
                .materializer
                .stats
                .lock()
                .unwrap_or_else(|p| p.into_inner());
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
        self.materializer
            .materialized_at
            .store(seen, Ordering::Relaxed);
        Ok(report)
    }

    pub(crate) async fn materialize_with(
        &self,
        catalog: Catalog,
        dirty: Option<Vec<i32>>,
        now: i64,
        lake: &reelhouse_lake::Lake,
    ) -> Result<reelhouse_warehouse::Report, Error> {
        // After a start the dirty dates are not known in memory: the events received since
        // the last rebuild's snapshot (with a margin) name them.
        // The dates of restatements made since then count too.
        let (since, restated) = {
            let late = self
                .materializer
                .late
                .lock()
                .unwrap_or_else(|p| p.into_inner());
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
            let mut late = self
                .materializer
                .late
                .lock()
                .unwrap_or_else(|p| p.into_inner());
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
                bucket_events: self.config.rebuild_bucket_events,
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
        *self.materializer.dashboard.lock().await = None;
        {
            let mut late = self
                .materializer
                .late
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            late.materialized_at_ms = Some(now);
            late.save(self.lake.root())?;
        }
        Ok(report)
    }

    /// Allowed lateness: events later than this count in the warehouse only once their date
    /// is restated.
    pub fn allowed_lateness(&self) -> Duration {
        self.config.dedup_window
    }

    /// Counts every event stored so far for dates `from..=to` (days since epoch), however
    /// late, and rebuilds the warehouse.
    pub async fn restate(&self, from: i32, to: i32) -> Result<reelhouse_warehouse::Report, Error> {
        self.require_writer()?;
        {
            let mut late = self
                .materializer
                .late
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            late.restatements
                .push((from, to, self.config.clock.now_ms()));
            late.save(self.lake.root())?;
        }
        let _guard = self.materializer.lock.lock().await;
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
    pub async fn run_materializer(self: Arc<Self>, interval: Duration, stop: CancellationToken) {
        let mut wait = interval;
        loop {
            if stop_within(wait, &stop).await {
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
}
