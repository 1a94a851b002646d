//! The applier: the one thread that applies durable records, in log order, after the WAL
//! writer (or the shared-log reader) has handed them over; and the [`View`] it fills, which is
//! what SQL sees.
//!
//! ```text
//!  WAL thread (after fsync) ─▶ Apply::Record ─▶ feature store ─▶ view.pending ─▶ ack
//!  rotation                 ─▶ Apply::Cut     ─▶ f() at that exact point of the log
//! ```

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use reelhouse_lake::deltalake::arrow::array::RecordBatch;
use reelhouse_lake::deltalake::DeltaTable;
use reelhouse_lake::RawTable;
use reelhouse_online::FeatureStore;
use reelhouse_wal::SegmentId;
use tokio::sync::oneshot;

use crate::Error;

/// Batches durable in the WAL, not yet committed to Delta.
#[derive(Default)]
pub(crate) struct Pending {
    pub(crate) events: Vec<(SegmentId, RecordBatch)>,
    pub(crate) quarantine: Vec<(SegmentId, RecordBatch)>,
    pub(crate) rows: usize,
    pub(crate) oldest: Option<Instant>,
}

impl Pending {
    pub(crate) fn push(
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

    pub(crate) fn batches(&self, t: RawTable, through: Option<SegmentId>) -> Vec<RecordBatch> {
        let list = match t {
            RawTable::Events => &self.events,
            RawTable::Quarantine => &self.quarantine,
        };
        list.iter()
            .filter(|(s, _)| through.is_none_or(|t| *s <= t))
            .map(|(_, b)| b.clone())
            .collect()
    }

    pub(crate) fn remove_through(&mut self, t: RawTable, through: SegmentId) {
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
    pub(crate) committed: HashMap<RawTable, u64>,
    pub(crate) pending: Pending,
    /// Warehouse tables by name (latest materialized version).
    pub(crate) derived: HashMap<String, DeltaTable>,
    /// `event_date`s (days since epoch) of the events made visible since the last rebuild took
    /// its snapshot; `None` when unknown (after a start, or after a change that needs a full
    /// rebuild). Updated under the same lock as `pending`, so a rebuild that takes it together
    /// with its snapshot misses nothing.
    pub(crate) dirty: Option<std::collections::BTreeSet<i32>>,
}

/// One step for the applier thread.
pub(crate) enum Apply {
    /// A durable WAL record: update the features, make it visible to SQL, then ack.
    Record {
        seg: SegmentId,
        events: Option<RecordBatch>,
        quarantine: Option<RecordBatch>,
        /// Events for the feature store (`None`: it has them already, from its snapshot).
        features: Option<RecordBatch>,
        ack: Option<oneshot::Sender<Result<(), Error>>>,
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
pub(crate) fn spawn_applier(
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
pub(crate) fn note_dates(dirty: &mut std::collections::BTreeSet<i32>, events: &RecordBatch) {
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

/// The raw tables as a catalog sees them: each committed version with its pending batches.
pub(crate) fn raw_parts(
    tables: &HashMap<RawTable, DeltaTable>,
    pending: &Pending,
) -> Vec<(RawTable, Option<DeltaTable>, Vec<RecordBatch>)> {
    RawTable::ALL
        .iter()
        .map(|t| (*t, tables.get(t).cloned(), pending.batches(*t, None)))
        .collect()
}
