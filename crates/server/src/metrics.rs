//! Operations endpoints (issue 8, item 5): Prometheus metrics, liveness and readiness.
//!
//! ```text
//!  GET /metrics           ─▶ Prometheus text format 0.0.4 (admin, analyst; open without tokens)
//!  GET /v1/health/live    ─▶ 200 while the process serves HTTP (no token needed)
//!  GET /v1/health/ready   ─▶ 200 when the WAL writer runs and the pending buffer has room,
//!                            else 503 (no token needed): route ingest elsewhere meanwhile
//! ```
//!
//! Counters come from the ingest pipeline and the materializer; feature-lookup latency is a
//! fixed-bucket histogram filled by a middleware around the feature routes.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

use crate::AppState;

/// Upper bounds of the lookup-latency buckets, in seconds.
const BUCKETS: [f64; 12] = [
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 1.0,
];

/// A latency histogram with fixed buckets (lock-free).
#[derive(Default)]
pub struct Histogram {
    buckets: [AtomicU64; BUCKETS.len()],
    count: AtomicU64,
    sum_ns: AtomicU64,
}

impl Histogram {
    pub fn observe(&self, seconds: f64) {
        for (b, le) in self.buckets.iter().zip(BUCKETS) {
            if seconds <= le {
                b.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_ns
            .fetch_add((seconds * 1e9) as u64, Ordering::Relaxed);
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        for (b, le) in self.buckets.iter().zip(BUCKETS) {
            let _ = writeln!(
                out,
                "{name}_bucket{{le=\"{le}\"}} {}",
                b.load(Ordering::Relaxed)
            );
        }
        let count = self.count.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {count}");
        let _ = writeln!(
            out,
            "{name}_sum {}",
            self.sum_ns.load(Ordering::Relaxed) as f64 / 1e9
        );
        let _ = writeln!(out, "{name}_count {count}");
    }
}

/// Times every request of the routes it wraps (the feature lookups).
pub async fn time_lookups(State(s): State<AppState>, req: Request, next: Next) -> Response {
    let start = Instant::now();
    let resp = next.run(req).await;
    s.lookups.observe(start.elapsed().as_secs_f64());
    resp
}

fn metric(out: &mut String, name: &str, kind: &str, help: &str, value: impl std::fmt::Display) {
    let _ = writeln!(
        out,
        "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
    );
}

/// `GET /metrics`.
pub async fn get_metrics(State(s): State<AppState>) -> Response {
    let i = &s.ingestor;
    let st = i.stats();
    let m = i.materializer_stats();
    let f = i.features().stats();
    let mut out = String::with_capacity(4096);
    let counters = [
        (
            "reelhouse_events_accepted_total",
            "Events accepted (durable in the WAL) since start.",
            st.accepted,
        ),
        (
            "reelhouse_events_duplicate_total",
            "Events dropped as duplicates of an event_id since start.",
            st.duplicates,
        ),
        (
            "reelhouse_events_rejected_total",
            "Events rejected (quarantined) since start.",
            st.rejected,
        ),
        (
            "reelhouse_events_erased_dropped_total",
            "Events of erased users dropped at ingest since start.",
            st.erased_dropped,
        ),
        (
            "reelhouse_delta_flushes_total",
            "Delta commits of pending events since start.",
            st.flushes,
        ),
        (
            "reelhouse_delta_compactions_total",
            "Compactions of small events files (one Delta commit each) since start.",
            st.compactions,
        ),
        (
            "reelhouse_wal_fsyncs_total",
            "WAL fsyncs (group commits) since start.",
            st.wal_fsyncs,
        ),
        (
            "reelhouse_materializations_total",
            "Warehouse rebuilds completed since start.",
            m.runs,
        ),
        (
            "reelhouse_materialization_failures_total",
            "Warehouse rebuilds that failed since start.",
            m.failures,
        ),
    ];
    for (name, help, v) in counters {
        metric(&mut out, name, "counter", help, v);
    }
    let gauges: [(&str, &str, String); 8] = [
        (
            "reelhouse_pending_rows",
            "Rows durable in the WAL but not yet committed to Delta (log lag).",
            st.pending_rows.to_string(),
        ),
        (
            "reelhouse_wal_segment",
            "Current WAL segment number.",
            st.wal_segment.to_string(),
        ),
        (
            "reelhouse_events_since_materialization",
            "Events accepted since the last warehouse rebuild started (materialization lag).",
            m.events_behind.to_string(),
        ),
        (
            "reelhouse_dirty_dates",
            "Event dates waiting for the next rebuild (-1: unknown, the next one is full).",
            m.dirty_dates.to_string(),
        ),
        (
            "reelhouse_last_materialization_seconds",
            "Duration of the last warehouse rebuild.",
            (m.last_ms as f64 / 1000.0).to_string(),
        ),
        (
            "reelhouse_last_materialization_dates",
            "Dates rewritten by the last rebuild (-1: full).",
            m.last_dates.to_string(),
        ),
        (
            "reelhouse_last_materialization_timestamp_seconds",
            "When the last rebuild finished (Unix time; 0: none yet).",
            (m.last_at_ms as f64 / 1000.0).to_string(),
        ),
        (
            "reelhouse_online_videos",
            "Videos held by the online feature store.",
            f.videos.to_string(),
        ),
    ];
    for (name, help, v) in gauges {
        metric(&mut out, name, "gauge", help, v);
    }
    if let Some((_, position, lag)) = i.log_status() {
        metric(
            &mut out,
            "reelhouse_log_position",
            "gauge",
            "Position (stream sequence) of the last shared-log record read.",
            position,
        );
        metric(
            &mut out,
            "reelhouse_log_consumer_lag",
            "gauge",
            "Records in the shared log after the last one read (checked every second).",
            lag,
        );
    }
    if i.config.online.is_some() && i.is_writer() {
        let (written, errors) = i.online_copy_stats();
        metric(
            &mut out,
            "reelhouse_online_redis_keys_written_total",
            "counter",
            "Feature records set or deleted in Redis by this writer.",
            written,
        );
        metric(
            &mut out,
            "reelhouse_online_redis_copy_errors_total",
            "counter",
            "Copies to Redis that failed (their keys are retried by the next copy).",
            errors,
        );
    }
    s.lookups.render(
        &mut out,
        "reelhouse_feature_lookup_seconds",
        "Time to answer a feature lookup (single or batch), in the server.",
    );
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out).into_response()
}

/// `GET /v1/health/live`.
pub async fn live() -> Response {
    Json(json!({"status": "live"})).into_response()
}

/// `GET /v1/health/ready`.
pub async fn ready(State(s): State<AppState>) -> Response {
    match s.ingestor.readiness() {
        Ok(()) => Json(json!({"status": "ready"})).into_response(),
        Err(reason) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "not_ready", "reason": reason})),
        )
            .into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_counts_into_cumulative_buckets() {
        let h = Histogram::default();
        h.observe(0.000_2);
        h.observe(0.003);
        h.observe(2.0);
        let mut out = String::new();
        h.render(&mut out, "x", "help");
        assert!(out.contains("x_bucket{le=\"0.0001\"} 0"));
        assert!(out.contains("x_bucket{le=\"0.00025\"} 1"));
        assert!(out.contains("x_bucket{le=\"0.005\"} 2"));
        assert!(out.contains("x_bucket{le=\"1\"} 2"));
        assert!(out.contains("x_bucket{le=\"+Inf\"} 3"));
        assert!(out.contains("x_count 3"));
    }
}
