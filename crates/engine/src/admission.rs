//! Admission: one request body becomes stamped events and quarantine rows, is deduplicated,
//! logged durably and settled into the answer the client gets.
//!
//! ```text
//!  body ─split─▶ items ─parse+validate─▶ events ─stamp(received_at)─▶ drop tombstoned users
//!                   └─▶ rejections ──────────────────┐                       │
//!                                                    ▼                       ▼ dedup.rs: claim
//!                        one WAL record = [events IPC][quarantine IPC] ─▶ source.rs (fsync)
//!                        ─▶ applier.rs (features, pending) ─▶ ack ─▶ settle: counts, or
//!                           release the claimed ids so a retry is not a duplicate
//! ```

use std::sync::Mutex;

use prometheus_client::metrics::counter::Counter;
use reelhouse_event::{parse_event, split_body, stamp, StoredEvent};
use reelhouse_lake::{events_batch, quarantine_batch, QuarantineRow};
use reelhouse_wal::SegmentId;
use serde::Serialize;
use tokio::sync::oneshot;

use crate::applier::Apply;
use crate::dedup::Dedup;
use crate::source::{encode_record, Source};
use crate::{Engine, Error};

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

/// The docs/ingest.md response of one batch.
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

pub(crate) fn is_zero(n: &usize) -> bool {
    *n == 0
}

/// Errors listed per response.
pub const MAX_ERRORS: usize = 100;

/// Splits, parses and validates one body: the outcome with `rejected` and `errors` filled
/// (and `duplicates` holding the item count, for the caller to finish), the valid events
/// stamped with `received_at`, and the quarantine rows of the rest.
pub(crate) fn parse_batch(
    body: &[u8],
    received_at: i64,
    path: IngestPath,
) -> Result<(BatchOutcome, Vec<StoredEvent>, Vec<QuarantineRow>), Error> {
    let items = split_body(body).map_err(Error::BadBody)?;
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
    logged: Result<(), Error>,
    outcome: BatchOutcome,
    claimed: Vec<u128>,
    dedup: &Mutex<Dedup>,
    [accepted, duplicates, rejected]: [&Counter; 3],
) -> Result<BatchOutcome, Error> {
    if let Err(e) = logged {
        dedup
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .release(claimed);
        return Err(e);
    }
    accepted.inc_by(outcome.accepted as u64);
    duplicates.inc_by(outcome.duplicates as u64);
    rejected.inc_by(outcome.rejected as u64);
    Ok(outcome)
}

impl Engine {
    /// Validates, dedups and durably logs one body of events (NDJSON or a JSON array).
    pub async fn ingest(&self, body: &[u8], path: IngestPath) -> Result<BatchOutcome, Error> {
        self.load_dedup().await?;
        let received_at = self.config.clock.now_ms();
        let (mut outcome, mut events, rejects) = parse_batch(body, received_at, path)?;
        if self.privacy.has_tombstones() {
            // Late events of an erased user: dropped before anything is written.
            let before = events.len();
            events.retain(|e| !self.privacy.is_tombstoned(e.event.user_id));
            let dropped = before - events.len();
            if dropped > 0 {
                self.metrics.erased_dropped.inc_by(dropped as u64);
            }
            outcome.erased_dropped = dropped;
        }
        let claimed = self
            .dedup
            .ids
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .claim(&mut events, received_at)?;
        outcome.accepted = events.len() + outcome.erased_dropped;
        outcome.duplicates -= outcome.accepted + outcome.rejected;

        let result = self.log(&events, &rejects).await;
        settle(
            result,
            outcome,
            claimed,
            &self.dedup.ids,
            [
                &self.metrics.accepted,
                &self.metrics.duplicates,
                &self.metrics.rejected,
            ],
        )
    }

    pub(crate) async fn log(
        &self,
        events: &[StoredEvent],
        rejects: &[QuarantineRow],
    ) -> Result<(), Error> {
        if events.is_empty() && rejects.is_empty() {
            return Ok(());
        }
        if self.pending_rows() >= self.config.max_pending_rows {
            return Err(Error::Overloaded);
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
        let deferred = self.flusher.features_deferred;
        let done = Box::new(move |r: reelhouse_wal::Result<SegmentId>| {
            // Runs on the WAL thread after fsync, before any later rotation is handled; the
            // applier receives records and cuts in log order.
            match r {
                Ok(seg) => {
                    let msg = Apply::Record {
                        seg,
                        features: e.clone().filter(|_| !deferred),
                        events: e,
                        quarantine: q,
                        ack: Some(tx),
                    };
                    if let Err(std::sync::mpsc::SendError(Apply::Record {
                        ack: Some(ack), ..
                    })) = applier.send(msg)
                    {
                        let _ = ack.send(Err(Error::ShuttingDown));
                    }
                }
                Err(err) => {
                    let _ = tx.send(Err(Error::Wal(err)));
                }
            }
        });
        let Source::Wal(wal) = &self.source else {
            return Err(Error::WrongRole(
                "this node reads events from the shared log; send them to an ingest node",
            ));
        };
        wal.try_append(payload, done).map_err(|e| match e {
            reelhouse_wal::Error::Full => Error::Overloaded,
            reelhouse_wal::Error::Closed => Error::ShuttingDown,
            other => Error::Wal(other),
        })?;
        rx.await.map_err(|_| Error::ShuttingDown)??;
        Ok(())
    }
}
