//! Feature endpoints (docs/online-features.md) over the in-process
//! [`reelhouse_online::FeatureStore`], and `GET /v1/admin/check` (the comparison itself is
//! `reelhouse_engine::check`).
//!
//! ```text
//!  GET  /v1/features/videos/{id}      ─▶ one shard read lock ─▶ VideoFeatures
//!  POST /v1/features/videos:batch     ─▶ ≤ 1,000 ids, order kept, unknown → zeros
//!  GET  /v1/features/users/{id}       ─▶ UserFeatures
//!  GET  /v1/features/creators/{id}    ─▶ CreatorFeatures
//!  GET  /v1/admin/check               ─▶ online totals vs warehouse tables
//! ```
//!
//! Responses are JSON, or MessagePack when the request says `Accept: application/x-msgpack`.
//! An API replica started with `--online redis://…` answers the same endpoints from Redis
//! (one GET, or one MGET per batch) instead of a store of its own.

use axum::extract::{Path, Request, State};
use axum::http::{header, HeaderMap, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::Json;
use reelhouse_event::{CreatorId, UserId, VideoId};
use serde::Serialize;

use crate::{read_body, ApiError, AppState};

/// Most ids one batch request may ask for.
pub const MAX_BATCH: usize = 1000;

const MSGPACK: &str = "application/x-msgpack";

fn wants_msgpack(headers: &HeaderMap) -> bool {
    headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains(MSGPACK))
}

fn respond<T: Serialize>(headers: &HeaderMap, value: &T) -> Result<Response, ApiError> {
    if wants_msgpack(headers) {
        let bytes = rmp_serde::to_vec_named(value).map_err(|_| ApiError::Internal)?;
        let mut r = bytes.into_response();
        r.headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static(MSGPACK));
        return Ok(r);
    }
    Ok(Json(value).into_response())
}

/// Parses a path id: a decimal integer in 0…2^63−1.
pub(crate) fn parse_id(kind: &str, raw: &str) -> Result<u64, ApiError> {
    raw.parse::<u64>()
        .ok()
        .filter(|v| *v <= reelhouse_event::ids::MAX_ID)
        .ok_or_else(|| {
            ApiError::BadRequest(format!(
                "{kind} id must be a decimal integer between 0 and 9223372036854775807"
            ))
        })
}

pub(crate) async fn get_video(
    State(s): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let id = parse_id("video", &id)?;
    if let Some(r) = s.engine.online_reader() {
        return respond(&headers, &r.video(id, s.engine.now_ms()).await?);
    }
    respond(&headers, &s.engine.features().video(VideoId(id)))
}

pub(crate) async fn get_user(
    State(s): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let id = parse_id("user", &id)?;
    if let Some(r) = s.engine.online_reader() {
        return respond(&headers, &r.user(id, s.engine.now_ms()).await?);
    }
    respond(&headers, &s.engine.features().user(UserId(id)))
}

pub(crate) async fn get_creator(
    State(s): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let id = parse_id("creator", &id)?;
    if let Some(r) = s.engine.online_reader() {
        return respond(&headers, &r.creator(id, s.engine.now_ms()).await?);
    }
    respond(&headers, &s.engine.features().creator(CreatorId(id)))
}

#[derive(serde::Deserialize)]
struct BatchRequest {
    video_ids: Vec<serde_json::Value>,
}

pub(crate) async fn post_video_batch(
    State(s): State<AppState>,
    req: Request,
) -> Result<Response, ApiError> {
    let headers = req.headers().clone();
    let body = read_body(req.into_body(), 1 << 20).await?;
    let r: BatchRequest = serde_json::from_slice(&body).map_err(|_| {
        ApiError::BadRequest("body must be a JSON object {\"video_ids\": [id, …]}".into())
    })?;
    if r.video_ids.len() > MAX_BATCH {
        return Err(ApiError::BadRequest(format!(
            "at most {MAX_BATCH} video_ids per request, got {}",
            r.video_ids.len()
        )));
    }
    let ids = r
        .video_ids
        .iter()
        .enumerate()
        .map(|(i, v)| {
            let parsed = match v {
                serde_json::Value::Number(n) => n.as_u64(),
                serde_json::Value::String(s) => s.parse::<u64>().ok(),
                _ => None,
            };
            parsed
                .filter(|v| *v <= reelhouse_event::ids::MAX_ID)
                .map(VideoId)
                .ok_or_else(|| {
                    ApiError::BadRequest(format!(
                        "video_ids[{i}] must be an integer (number or decimal string) \
                         between 0 and 9223372036854775807"
                    ))
                })
        })
        .collect::<Result<Vec<_>, _>>()?;
    if let Some(r) = s.engine.online_reader() {
        let ids: Vec<u64> = ids.iter().map(|v| v.0).collect();
        return respond(&headers, &r.videos(&ids, s.engine.now_ms()).await?);
    }
    respond(&headers, &s.engine.features().videos(&ids))
}

pub(crate) async fn get_check(State(s): State<AppState>) -> Result<Response, ApiError> {
    Ok(Json(s.engine.check().await?).into_response())
}
