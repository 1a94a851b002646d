//! Operations endpoints: Prometheus metrics, liveness and readiness.
//!
//! ```text
//!  GET /metrics           ─▶ OpenMetrics text (admin, analyst; open without tokens)
//!  GET /v1/health/live    ─▶ 200 while the process serves HTTP (no token needed)
//!  GET /v1/health/ready   ─▶ 200 when the WAL writer runs and the pending buffer has room,
//!                            else 503 (no token needed): route ingest elsewhere meanwhile
//! ```
//!
//! The metrics themselves are the engine's (`reelhouse_engine::metrics`, through
//! `prometheus-client`); this module only times feature lookups and serves the text.

use std::time::Instant;

use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

use crate::AppState;

/// The content type of the OpenMetrics text format.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Times every request of the routes it wraps (the feature lookups).
pub async fn time_lookups(State(s): State<AppState>, req: Request, next: Next) -> Response {
    let start = Instant::now();
    let resp = next.run(req).await;
    s.engine
        .metrics()
        .observe_lookup(start.elapsed().as_secs_f64());
    resp
}

/// `GET /metrics`.
pub async fn get_metrics(State(s): State<AppState>) -> Response {
    (
        [(header::CONTENT_TYPE, CONTENT_TYPE)],
        s.engine.metrics_text(),
    )
        .into_response()
}

/// `GET /v1/health/live`.
pub async fn live() -> Response {
    Json(json!({"status": "live"})).into_response()
}

/// `GET /v1/health/ready`.
pub async fn ready(State(s): State<AppState>) -> Response {
    match s.engine.readiness() {
        Ok(()) => Json(json!({"status": "ready"})).into_response(),
        Err(reason) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "not_ready", "reason": reason})),
        )
            .into_response(),
    }
}
