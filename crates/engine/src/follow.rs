//! Following a shared log (`reelhouse_log`): how the materializer and the API replicas of a
//! deployment with several processes take the records that ingest nodes appended.
//!
//! ```text
//!  LogReader::next_batch ─▶ decode (zstd, Arrow IPC) ─▶ drop erased users ─▶ dedup event_id
//!     ─▶ Apply::Record, in log order, into the same applier the embedded WAL feeds:
//!          feature store   if the position is after the feature snapshot,
//!          pending (SQL)   if it is after the position the Delta table holds
//!  materializer: flush = Delta commit (txn = position) ─▶ feature snapshot ─▶ ack_through
//!                ─▶ truncate the log up to there
//!  API replica:  refresh = newer Delta versions ─▶ drop the pending rows they hold
//! ```
//!
//! Ingest nodes dedup only what each saw itself; the materializer's dedup window (restored
//! from `events` at start, like the embedded node's) is what makes an event sent to two ingest
//! nodes count once. Feature updates are a function of the set of events, so records read
//! again after a restart change nothing.

use std::time::Duration;

use reelhouse_lake::deltalake::arrow::array::{Array, AsArray, BooleanArray};
use reelhouse_lake::deltalake::arrow::compute::filter_record_batch;
use reelhouse_lake::deltalake::arrow::datatypes::Int64Type;
use reelhouse_log::Entry;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use reelhouse_lake::deltalake::arrow::array::RecordBatch;
use reelhouse_lake::deltalake::DeltaTable;
use reelhouse_lake::{committed_segment, RawTable};
use tokio_util::sync::CancellationToken;

use reelhouse_event::UserId;

use crate::applier::Apply;
use crate::dedup::id_hash;
use crate::source::{decode_record, encode_record, LogSource, Parts, Source};
use crate::tasks::stop_within;
use crate::{Engine, Error};

/// Records asked for per read.
const READ_BATCH: usize = 64;
/// Longest wait for a record before checking for acknowledgements and shutdown.
const READ_WAIT: Duration = Duration::from_millis(200);

/// Encodes one record for a shared log: the WAL record, zstd-compressed (a 5,000-event batch
/// shrinks about 6×, which keeps records under NATS's default 1 MB message limit).
pub fn encode_log_record(
    events: Option<&RecordBatch>,
    quarantine: Option<&RecordBatch>,
) -> Result<Vec<u8>, Error> {
    let raw = encode_record(events, quarantine)?;
    Ok(zstd::bulk::compress(&raw, 1)?)
}

fn decode_log_record(bytes: &[u8]) -> Result<Parts, Error> {
    let raw = zstd::stream::decode_all(bytes)
        .map_err(|_| Error::BadBody("a shared-log record is not zstd".into()))?;
    decode_record(&raw)
}

impl Engine {
    /// Reads the shared log until `stop` changes (a no-op for the embedded WAL). Retries on
    /// log errors; acknowledges what flushes have committed.
    pub async fn follow(self: Arc<Self>, stop: CancellationToken) {
        let Source::Log(ls) = &self.source else {
            return;
        };
        // Records are deduplicated against the stored ids (see the module doc): read them
        // before the first record.
        while let Err(e) = self.load_dedup().await {
            tracing::error!(error = %e, "cannot read the stored event ids for dedup; retrying");
            if stop_within(Duration::from_secs(1), &stop).await {
                return;
            }
        }
        let after = {
            let v = self.view.lock().unwrap_or_else(|p| p.into_inner());
            RawTable::ALL
                .iter()
                .map(|t| v.committed.get(t).copied().unwrap_or(0))
                .fold(ls.features_at, u64::min)
        };
        let durable = ls.writer.then_some("reelhouse-materializer");
        let mut reader = loop {
            match ls.log.reader(after, durable).await {
                Ok(r) => break r,
                Err(e) => {
                    tracing::error!(error = %e, "cannot read the shared log; retrying");
                    if stop_within(Duration::from_secs(1), &stop).await {
                        return;
                    }
                }
            }
        };
        tracing::info!(log = %ls.log.describe(), after, "following the shared log");
        let mut acked = 0;
        let mut last_lag_check = Instant::now();
        loop {
            if stop.is_cancelled() {
                return;
            }
            if self.pending_rows() >= self.config.max_pending_rows {
                // The log holds the backlog; the flusher drains `pending`.
                if stop_within(Duration::from_millis(50), &stop).await {
                    return;
                }
                continue;
            }
            let read = tokio::select! {
                r = reader.next_batch(READ_BATCH, READ_WAIT) => r,
                _ = stop.cancelled() => return,
            };
            match read {
                Ok(entries) => {
                    for e in entries {
                        let position = e.position;
                        if let Err(err) = self.feed(ls, e) {
                            tracing::error!(error = %err, position, "skipped a shared-log record");
                        }
                    }
                }
                Err(e) => {
                    tracing::error!(error = %e, "reading the shared log failed; retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
            let target = ls.ack_target.load(Ordering::Relaxed);
            if target > acked {
                match reader.ack_through(target).await {
                    Ok(()) => acked = target,
                    Err(e) => tracing::warn!(error = %e, "acknowledgement failed; will retry"),
                }
            }
            if last_lag_check.elapsed() >= Duration::from_secs(1) {
                last_lag_check = Instant::now();
                if let Ok(s) = ls.log.stats().await {
                    let fed = *ls.fed.lock().unwrap_or_else(|p| p.into_inner());
                    ls.lag
                        .store(s.last_position.saturating_sub(fed), Ordering::Relaxed);
                }
            }
        }
    }

    /// Hands one record of the shared log to the applier.
    fn feed(&self, ls: &LogSource, e: Entry) -> Result<(), Error> {
        let (events, quarantine) = decode_log_record(&e.payload)?;
        let events = match events {
            Some(b) => self.drop_erased(b)?,
            None => None,
        };
        let (committed_events, committed_quarantine) = {
            let v = self.view.lock().unwrap_or_else(|p| p.into_inner());
            (
                v.committed.get(&RawTable::Events).copied().unwrap_or(0),
                v.committed.get(&RawTable::Quarantine).copied().unwrap_or(0),
            )
        };
        let for_features = events.clone().filter(|_| e.position > ls.features_at);
        let events = match events {
            Some(b) if e.position > committed_events => {
                let (kept, dups) = self.dedup_batch(&b)?;
                self.metrics.duplicates.inc_by(dups as u64);
                self.metrics
                    .accepted
                    .inc_by(kept.as_ref().map_or(0, |k| k.num_rows()) as u64);
                kept
            }
            _ => None,
        };
        let quarantine = quarantine.filter(|_| e.position > committed_quarantine);
        if let Some(q) = &quarantine {
            self.metrics.rejected.inc_by(q.num_rows() as u64);
        }
        let mut fed = ls.fed.lock().unwrap_or_else(|p| p.into_inner());
        self.applier
            .send(Apply::Record {
                seg: e.position,
                events,
                quarantine,
                features: for_features,
                ack: None,
            })
            .map_err(|_| Error::ShuttingDown)?;
        *fed = e.position;
        Ok(())
    }

    /// The rows of users erased since the ingest node took them (`None` when none is left).
    fn drop_erased(&self, b: RecordBatch) -> Result<Option<RecordBatch>, Error> {
        if !self.privacy.has_tombstones() {
            return Ok(Some(b));
        }
        let users = b
            .column_by_name("user_id")
            .and_then(|c| c.as_primitive_opt::<Int64Type>())
            .ok_or_else(|| Error::BadBody("a shared-log record lacks user_id".into()))?;
        let keep: BooleanArray = (0..users.len())
            .map(|i| Some(!self.privacy.is_tombstoned(UserId(users.value(i) as u64))))
            .collect();
        let kept = filter_record_batch(&b, &keep).map_err(reelhouse_lake::Error::from)?;
        let dropped = b.num_rows() - kept.num_rows();
        self.metrics.erased_dropped.inc_by(dropped as u64);
        Ok((kept.num_rows() > 0).then_some(kept))
    }

    /// Claims each event id in the dedup window; returns the first-seen rows and how many
    /// were already seen (sent twice, possibly to two ingest nodes).
    fn dedup_batch(&self, b: &RecordBatch) -> Result<(Option<RecordBatch>, usize), Error> {
        let ids = b
            .column_by_name("event_id")
            .and_then(|c| c.as_string_opt::<i32>())
            .ok_or_else(|| Error::BadBody("a shared-log record lacks event_id".into()))?;
        let today = reelhouse_event::time::day_of(self.config.clock.now_ms());
        let keep: BooleanArray = {
            let mut dedup = self.dedup.ids.lock().unwrap_or_else(|p| p.into_inner());
            (0..ids.len())
                .map(|i| dedup.insert(today, id_hash(ids.value(i))).map(Some))
                .collect::<std::io::Result<_>>()?
        };
        let kept = filter_record_batch(b, &keep).map_err(reelhouse_lake::Error::from)?;
        let dups = b.num_rows() - kept.num_rows();
        Ok(((kept.num_rows() > 0).then_some(kept), dups))
    }

    /// An API replica: every `interval`, picks up the table versions the materializer has
    /// committed since, and drops the pending rows they hold.
    pub async fn run_refresher(self: Arc<Self>, interval: Duration, stop: CancellationToken) {
        loop {
            if stop_within(interval, &stop).await {
                return;
            }
            if let Err(e) = self.refresh().await {
                tracing::warn!(error = %e, "could not load newer table versions; will retry");
            }
        }
    }

    /// Loads newer versions of every table; true when any changed.
    pub async fn refresh(&self) -> Result<bool, Error> {
        let mut changed = false;
        for t in RawTable::ALL {
            let current = self.raw_table(t);
            let Some(newer) = newer_version(current, self.lake.load(t)).await? else {
                continue;
            };
            let at = committed_segment(&newer).await?.unwrap_or(0);
            let mut v = self.view.lock().unwrap_or_else(|p| p.into_inner());
            v.tables.insert(t, newer);
            v.committed.insert(t, at);
            v.pending.remove_through(t, at);
            changed = true;
        }
        let mut derived_changed = false;
        for name in
            reelhouse_warehouse::table_names().chain([reelhouse_warehouse::dims::UPDATES_TABLE])
        {
            let current = self.derived_table(name);
            if let Some(newer) = newer_version(current, self.lake.load_derived(name)).await? {
                self.set_derived_table(name, newer);
                derived_changed = true;
            }
        }
        if derived_changed {
            *self.materializer.dashboard.lock().await = None;
        }
        self.forget_newly_erased().await?;
        Ok(changed || derived_changed)
    }

    /// An API replica: users the materializer erased or anonymized since the last look leave
    /// this replica's feature store too (later events of erased users are dropped on read).
    async fn forget_newly_erased(&self) -> Result<(), Error> {
        let new = if self.lake.tables().is_remote() {
            let shared = self
                .lake
                .tables()
                .get_state(reelhouse_privacy::STATE_FILE)
                .await?;
            self.privacy.reload_from(shared.as_deref())?
        } else {
            self.privacy.reload()?
        };
        if new.is_empty() {
            return Ok(());
        }
        if self.online_reader().is_some() {
            // No store here: the materializer deleted the users' Redis keys.
            return Ok(());
        }
        let new: std::collections::HashSet<String> = new.into_iter().collect();
        let erased: Vec<i64> = self
            .features
            .user_ids()
            .into_iter()
            .filter(|u| new.contains(&self.privacy.user_hash(UserId(*u as u64))))
            .collect();
        for user in erased {
            let features = Arc::clone(&self.features);
            self.rotate_cut(move || features.forget_user(user))?;
        }
        Ok(())
    }
}

/// A newer version of a table than `current`: `current` brought up to date, or the table
/// loaded when there was none yet; `None` when nothing changed.
async fn newer_version(
    current: Option<DeltaTable>,
    load: impl std::future::Future<Output = reelhouse_lake::Result<Option<DeltaTable>>>,
) -> Result<Option<DeltaTable>, Error> {
    match current {
        Some(cur) => {
            let before = cur.version();
            let mut t = cur;
            t.update_state()
                .await
                .map_err(reelhouse_lake::Error::from)?;
            Ok((t.version() != before).then_some(t))
        }
        None => Ok(load.await?),
    }
}
