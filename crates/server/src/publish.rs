//! An ingest node (`serve --role ingest --log …`): validates and stamps batches exactly as the
//! embedded pipeline does, drops the ids it has already seen, and appends them to the shared
//! log; the client's `200` means the log holds the batch durably. No data directory.
//!
//! ```text
//!  POST /v1/events ─▶ body limit (413) ─▶ in-flight limit (429) ─▶ parse_batch (same code as
//!    one node) ─▶ local dedup window ─▶ chunks of ≤ 5,000 events ─▶ EventLog::append ─▶ 200
//! ```
//!
//! Each chunk's log id is derived from the request body, so a client that retries the same
//! body (to this node or another) inside the log's duplicate window is stored once; an event
//! sent to two nodes in different bodies is deduplicated by the materializer.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use reelhouse_event::Clock;
use reelhouse_lake::{events_batch, quarantine_batch};
use reelhouse_log::EventLog;
use serde_json::json;
use tokio::sync::Semaphore;

use crate::ingest::{
    encode_log_record, parse_batch, settle, BatchOutcome, Dedup, IngestError, IngestPath,
};
use crate::ApiError;

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
    accepted: AtomicU64,
    duplicates: AtomicU64,
    rejected: AtomicU64,
    records: AtomicU64,
    log_duplicates: AtomicU64,
    append_failures: AtomicU64,
    last_position: AtomicU64,
}

impl Publisher {
    pub fn new(log: Arc<dyn EventLog>, clock: Arc<dyn Clock>, dedup_window: Duration) -> Self {
        Publisher {
            log,
            clock,
            dedup: Mutex::new(Dedup::default()),
            dedup_window,
            accepted: AtomicU64::new(0),
            duplicates: AtomicU64::new(0),
            rejected: AtomicU64::new(0),
            records: AtomicU64::new(0),
            log_duplicates: AtomicU64::new(0),
            append_failures: AtomicU64::new(0),
            last_position: AtomicU64::new(0),
        }
    }

    /// Validates, dedups and appends one body; answers once the log holds all of it.
    pub async fn ingest(&self, body: &[u8], path: IngestPath) -> Result<BatchOutcome, IngestError> {
        let received_at = self.clock.now_ms();
        let (mut outcome, mut events, rejects) = parse_batch(body, received_at, path)?;
        let claimed = {
            let mut d = self.dedup.lock().unwrap_or_else(|p| p.into_inner());
            let window = self.dedup_window.as_millis() as i64;
            d.expire(reelhouse_event::time::day_of(received_at - window) - 1);
            d.claim(&mut events, received_at)
        };
        outcome.accepted = events.len();
        outcome.duplicates -= outcome.accepted + outcome.rejected;
        let appended = self.append(body, &events, &rejects).await;
        if appended.is_err() {
            self.append_failures.fetch_add(1, Ordering::Relaxed);
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
    ) -> Result<(), IngestError> {
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
            self.records.fetch_add(1, Ordering::Relaxed);
            if a.duplicate {
                self.log_duplicates.fetch_add(1, Ordering::Relaxed);
            }
            self.last_position.fetch_max(a.position, Ordering::Relaxed);
        }
        Ok(())
    }

    pub fn stats(&self) -> PublishStats {
        PublishStats {
            accepted: self.accepted.load(Ordering::Relaxed),
            duplicates: self.duplicates.load(Ordering::Relaxed),
            rejected: self.rejected.load(Ordering::Relaxed),
            records: self.records.load(Ordering::Relaxed),
            log_duplicates: self.log_duplicates.load(Ordering::Relaxed),
            append_failures: self.append_failures.load(Ordering::Relaxed),
            last_position: self.last_position.load(Ordering::Relaxed),
        }
    }

    /// The log this node appends to.
    pub fn log(&self) -> &dyn EventLog {
        self.log.as_ref()
    }
}

/// Shared state of the ingest node's handlers.
#[derive(Clone)]
pub struct NodeState {
    pub publisher: Arc<Publisher>,
    pub inflight: Arc<Semaphore>,
    pub max_body_bytes: usize,
}

/// The ingest node's routes: events, health, probes, metrics; anything else is answered
/// with where to send it.
pub fn router(state: NodeState) -> Router {
    Router::new()
        .route("/v1/events", post(post_events))
        .route("/v1/health", get(health))
        .route("/v1/health/live", get(crate::metrics::live))
        .route("/v1/health/ready", get(ready))
        .route("/metrics", get(metrics))
        .fallback(|| async {
            ApiError::NotFoundWhat(
                "this is an ingest node: it takes POST /v1/events only; \
                 queries, features and admin requests go to the API or materialize nodes",
            )
        })
        .layer(axum::extract::DefaultBodyLimit::disable())
        .with_state(state)
}

async fn post_events(State(s): State<NodeState>, req: Request) -> Result<Response, ApiError> {
    crate::check_content_length(&req, s.max_body_bytes)?;
    let _permit = s.inflight.try_acquire().map_err(|_| ApiError::Overloaded)?;
    let body = crate::read_body(req.into_body(), s.max_body_bytes).await?;
    let outcome = s.publisher.ingest(&body, IngestPath::Http).await?;
    Ok(Json(outcome).into_response())
}

async fn health(State(s): State<NodeState>) -> Response {
    Json(json!({
        "status": "ok",
        "version": env!("CARGO_PKG_VERSION"),
        "role": "ingest",
        "log": s.publisher.log().describe(),
        "ingest": s.publisher.stats(),
    }))
    .into_response()
}

async fn ready(State(s): State<NodeState>) -> Response {
    match s.publisher.log().stats().await {
        Ok(_) => Json(json!({"status": "ready"})).into_response(),
        Err(_) => (
            axum::http::StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "not_ready", "reason": "the shared log is unreachable"})),
        )
            .into_response(),
    }
}

async fn metrics(State(s): State<NodeState>) -> Response {
    let p = s.publisher.stats();
    let mut out = String::new();
    for (name, help, v) in [
        (
            "reelhouse_events_accepted_total",
            "Valid events appended to the shared log.",
            p.accepted,
        ),
        (
            "reelhouse_events_duplicate_total",
            "Events whose id this node had seen in its dedup window.",
            p.duplicates,
        ),
        (
            "reelhouse_events_rejected_total",
            "Items rejected by validation (quarantined).",
            p.rejected,
        ),
        (
            "reelhouse_log_records_appended_total",
            "Records appended to the shared log.",
            p.records,
        ),
        (
            "reelhouse_log_append_failures_total",
            "Batches answered with an error because the log did not take them.",
            p.append_failures,
        ),
    ] {
        out.push_str(&format!(
            "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}\n"
        ));
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out).into_response()
}
