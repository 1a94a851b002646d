//! The HTTP face of an ingest node (`serve --role ingest --log …`): the publisher itself is
//! `reelhouse_engine::publish`.
//!
//! ```text
//!  POST /v1/events ─▶ body limit (413) ─▶ in-flight limit (429) ─▶ Publisher::ingest ─▶ 200
//! ```

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use reelhouse_engine::publish::Publisher;
use reelhouse_engine::IngestPath;
use serde_json::json;
use tokio::sync::Semaphore;

use crate::ApiError;

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
    (
        [(header::CONTENT_TYPE, crate::metrics::CONTENT_TYPE)],
        s.publisher.metrics_text(),
    )
        .into_response()
}
