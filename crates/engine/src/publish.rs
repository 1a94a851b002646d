//! The publisher of an ingest node (`serve --role ingest --log …`): validates and stamps batches exactly as the
//! embedded pipeline does, drops the ids it has already seen, and appends them to the shared
//! log; the client's `200` means the log holds the batch durably. No data directory.
//!
//! ```text
//!  body ─▶ parse_batch (same code as one node) ─▶ local dedup window
//!       ─▶ chunks of ≤ 5,000 events ─▶ EventLog::append ─▶ answer
//! ```
//!
//! Each chunk's log id is derived from the request body, so a client that retries the same
//! body (to this node or another) inside the log's duplicate window is stored once; an event
//! sent to two nodes in different bodies is deduplicated by the materializer.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::registry::Registry;
use reelhouse_event::Clock;
use reelhouse_lake::{events_batch, quarantine_batch};
use reelhouse_log::EventLog;

use crate::admission::{parse_batch, settle};
use crate::dedup::Dedup;
use crate::follow::encode_log_record;
use crate::{BatchOutcome, Error, IngestPath};

/// Events per log record: with zstd, a record of this many stays well under 1 MB.
const CHUNK_EVENTS: usize = 5_000;

/// Counters since start.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct PublishStats {
    pub accepted: u64,
    pub duplicates: u64,
    pub rejected: u64,
    /// Records appended to the log.
    pub records: u64,
    /// Records the log already held (a retried body).
    pub log_duplicates: u64,
    pub append_failures: u64,
    pub last_position: u64,
}

/// Validates batches and appends them to the shared log.
pub struct Publisher {
    log: Arc<dyn EventLog>,
    clock: Arc<dyn Clock>,
    dedup: Mutex<Dedup>,
    dedup_window: Duration,
    accepted: Counter,
    duplicates: Counter,
    rejected: Counter,
    records: Counter,
    log_duplicates: Counter,
    append_failures: Counter,
    last_position: AtomicU64,
    registry: Registry,
}

impl Publisher {
    pub fn new(log: Arc<dyn EventLog>, clock: Arc<dyn Clock>, dedup_window: Duration) -> Self {
        let mut registry = Registry::default();
        let counter = |registry: &mut Registry, name: &str, help: &str| {
            let c = Counter::default();
            registry.register(name, help, c.clone());
            c
        };
        Publisher {
            log,
            clock,
            dedup: Mutex::new(Dedup::default()),
            dedup_window,
            accepted: counter(
                &mut registry,
                "reelhouse_events_accepted",
                "Valid events appended to the shared log.",
            ),
            duplicates: counter(
                &mut registry,
                "reelhouse_events_duplicate",
                "Events whose id this node had seen in its dedup window.",
            ),
            rejected: counter(
                &mut registry,
                "reelhouse_events_rejected",
                "Items rejected by validation (quarantined).",
            ),
            records: counter(
                &mut registry,
                "reelhouse_log_records_appended",
                "Records appended to the shared log.",
            ),
            log_duplicates: counter(
                &mut registry,
                "reelhouse_log_records_duplicate",
                "Records the log already held (a retried body).",
            ),
            append_failures: counter(
                &mut registry,
                "reelhouse_log_append_failures",
                "Batches answered with an error because the log did not take them.",
            ),
            last_position: AtomicU64::new(0),
            registry,
        }
    }

    /// Validates, dedups and appends one body; answers once the log holds all of it.
    pub async fn ingest(&self, body: &[u8], path: IngestPath) -> Result<BatchOutcome, Error> {
        let received_at = self.clock.now_ms();
        let (mut outcome, mut events, rejects) = parse_batch(body, received_at, path)?;
        let claimed = {
            let mut d = self.dedup.lock().unwrap_or_else(|p| p.into_inner());
            let window = self.dedup_window.as_millis() as i64;
            d.expire(reelhouse_event::time::day_of(received_at - window) - 1)?;
            d.claim(&mut events, received_at)?
        };
        outcome.accepted = events.len();
        outcome.duplicates -= outcome.accepted + outcome.rejected;
        let appended = self.append(body, &events, &rejects).await;
        if appended.is_err() {
            self.append_failures.inc();
        }
        settle(
            appended,
            outcome,
            claimed,
            &self.dedup,
            [&self.accepted, &self.duplicates, &self.rejected],
        )
    }

    async fn append(
        &self,
        body: &[u8],
        events: &[reelhouse_event::StoredEvent],
        rejects: &[reelhouse_lake::QuarantineRow],
    ) -> Result<(), Error> {
        if events.is_empty() && rejects.is_empty() {
            return Ok(());
        }
        let id = format!("{:032x}", xxhash_rust::xxh3::xxh3_128(body));
        let chunks: Vec<&[reelhouse_event::StoredEvent]> = if events.is_empty() {
            vec![&[]]
        } else {
            events.chunks(CHUNK_EVENTS).collect()
        };
        for (i, chunk) in chunks.into_iter().enumerate() {
            let e = (!chunk.is_empty())
                .then(|| events_batch(chunk))
                .transpose()?;
            // The rejections travel with the first record.
            let q = (i == 0 && !rejects.is_empty())
                .then(|| quarantine_batch(rejects))
                .transpose()?;
            let record = encode_log_record(e.as_ref(), q.as_ref())?;
            let a = self.log.append(record.into(), &format!("{id}-{i}")).await?;
            self.records.inc();
            if a.duplicate {
                self.log_duplicates.inc();
            }
            self.last_position.fetch_max(a.position, Ordering::Relaxed);
        }
        Ok(())
    }

    pub fn stats(&self) -> PublishStats {
        PublishStats {
            accepted: self.accepted.get(),
            duplicates: self.duplicates.get(),
            rejected: self.rejected.get(),
            records: self.records.get(),
            log_duplicates: self.log_duplicates.get(),
            append_failures: self.append_failures.get(),
            last_position: self.last_position.load(Ordering::Relaxed),
        }
    }

    /// The node's metrics in the Prometheus (OpenMetrics) text format.
    pub fn metrics_text(&self) -> String {
        let mut out = String::new();
        if encode(&mut out, &self.registry).is_err() {
            tracing::error!("could not encode the metrics");
        }
        out
    }

    /// The log this node appends to.
    pub fn log(&self) -> &dyn EventLog {
        self.log.as_ref()
    }
}
