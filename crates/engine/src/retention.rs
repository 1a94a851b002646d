//! Retention (see docs/privacy.md): expired partitions of the raw tables go, with their
//! files; the warehouse keeps its rows of those dates (facts until `facts_days`).

use std::sync::Arc;
use std::time::Duration;

use reelhouse_lake::erase::TableErasure;
use reelhouse_lake::RawTable;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::tasks::stop_within;
use crate::{Engine, Error};

/// What one retention run removed.
#[derive(Debug, Clone, Serialize)]
pub struct RetentionReport {
    pub events_before: String,
    pub quarantine_before: String,
    pub facts_before: String,
    pub tables: Vec<reelhouse_lake::erase::TableErasure>,
}

impl Engine {
    /// Applies the retention policies: whole expired partitions of `events` and `quarantine`
    /// are deleted and their files vacuumed; date-keyed facts and aggregates keep their rows for
    /// those dates (facts until `facts_days`) at every later rebuild.
    pub async fn apply_retention(&self) -> Result<RetentionReport, Error> {
        self.require_writer()?;
        let r = self.config.retention;
        let today = reelhouse_event::time::day_of(self.config.clock.now_ms());
        let date = |d: i32| reelhouse_event::Day(d).to_string();
        let (ev, q, f) = (
            today - r.events_days as i32,
            today - r.quarantine_days as i32,
            today - r.facts_days as i32,
        );
        self.flush().await?;
        let _flush = self.flusher.lock.lock().await;
        let _mat = self.materializer.lock.lock().await;
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
            let table =
                reelhouse_privacy::steps::expire_partitions(t, table, col, &date(before), &mut rep)
                    .await?;
            self.set_raw_table(t, table);
            tables.push(rep);
        }
        {
            let mut late = self
                .materializer
                .late
                .lock()
                .unwrap_or_else(|p| p.into_inner());
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

    /// Runs [`Engine::apply_retention`] once a day until `stop` changes.
    pub async fn run_retention(self: Arc<Self>, stop: CancellationToken) {
        loop {
            if stop_within(Duration::from_secs(86_400), &stop).await {
                return;
            }
            match self.apply_retention().await {
                Ok(r) => tracing::info!(tables = r.tables.len(), "applied retention"),
                Err(e) => tracing::error!(error = %e, "retention failed; will retry tomorrow"),
            }
        }
    }
}
