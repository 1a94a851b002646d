//! Feature endpoints (SPEC §5) over the in-process [`reelhouse_online::FeatureStore`], and the
//! online-vs-warehouse comparison behind `reelhouse check`.
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

use std::collections::{BTreeSet, HashMap};

use axum::extract::{Path, Request, State};
use axum::http::{header, HeaderMap, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::Json;
use reelhouse_event::{CreatorId, UserId, VideoId};
use reelhouse_lake::deltalake::arrow::array::{Array, AsArray};
use reelhouse_lake::deltalake::arrow::datatypes::{DataType, Int64Type};
use serde::Serialize;

use crate::{read_body, ApiError, AppState, Ingestor};

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
    if let Some(r) = s.ingestor.online_reader() {
        return respond(&headers, &r.video(id, s.ingestor.now_ms()).await?);
    }
    respond(&headers, &s.ingestor.features().video(VideoId(id)))
}

pub(crate) async fn get_user(
    State(s): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let id = parse_id("user", &id)?;
    if let Some(r) = s.ingestor.online_reader() {
        return respond(&headers, &r.user(id, s.ingestor.now_ms()).await?);
    }
    respond(&headers, &s.ingestor.features().user(UserId(id)))
}

pub(crate) async fn get_creator(
    State(s): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let id = parse_id("creator", &id)?;
    if let Some(r) = s.ingestor.online_reader() {
        return respond(&headers, &r.creator(id, s.ingestor.now_ms()).await?);
    }
    respond(&headers, &s.ingestor.features().creator(CreatorId(id)))
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
    if let Some(r) = s.ingestor.online_reader() {
        let ids: Vec<u64> = ids.iter().map(|v| v.0).collect();
        return respond(&headers, &r.videos(&ids, s.ingestor.now_ms()).await?);
    }
    respond(&headers, &s.ingestor.features().videos(&ids))
}

/// One disagreement between the online store and the warehouse.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Difference {
    pub entity: &'static str,
    pub id: i64,
    pub field: &'static str,
    pub online: i64,
    pub warehouse: i64,
}

/// What `reelhouse check` reports.
#[derive(Debug, Clone, Serialize)]
pub struct CheckReport {
    pub videos_compared: usize,
    pub creators_compared: usize,
    pub differences: usize,
    /// At most the first 1,000 differences.
    pub examples: Vec<Difference>,
}

/// Per-video warehouse totals in the order of [`reelhouse_online::Totals`].
const WAREHOUSE_VIDEOS: &str = "
WITH v AS (SELECT video_id, count(*) AS n FROM fact_video_view GROUP BY video_id),
l AS (SELECT video_id, count(*) FILTER (WHERE liked) AS n FROM like_state GROUP BY video_id),
s AS (SELECT video_id, count(DISTINCT share_id) AS n FROM fact_engagement
      WHERE event_type = 'share' GROUP BY video_id),
c AS (SELECT video_id, count(*) AS n FROM fact_engagement
      WHERE event_type = 'comment' GROUP BY video_id),
k AS (SELECT video_id FROM v UNION SELECT video_id FROM l UNION SELECT video_id FROM s
      UNION SELECT video_id FROM c)
SELECT k.video_id, coalesce(v.n, 0), coalesce(l.n, 0), coalesce(s.n, 0), coalesce(c.n, 0)
FROM k LEFT JOIN v ON k.video_id = v.video_id LEFT JOIN l ON k.video_id = l.video_id
LEFT JOIN s ON k.video_id = s.video_id LEFT JOIN c ON k.video_id = c.video_id
WHERE k.video_id IS NOT NULL";

const WAREHOUSE_CREATORS: &str = "
SELECT creator_id, count(*) FILTER (WHERE following) FROM follow_state GROUP BY creator_id";

async fn int_rows(
    catalog: &reelhouse_lake::query::Catalog,
    sql: &str,
) -> Result<Vec<Vec<i64>>, ApiError> {
    let mut out = Vec::new();
    for b in catalog.query(sql).await? {
        let cols = b
            .columns()
            .iter()
            .map(|c| {
                reelhouse_lake::deltalake::arrow::compute::cast(c, &DataType::Int64)
                    .map(|a| a.as_primitive::<Int64Type>().clone())
                    .map_err(|_| ApiError::Internal)
            })
            .collect::<Result<Vec<_>, _>>()?;
        for i in 0..b.num_rows() {
            out.push(
                cols.iter()
                    .map(|c| if c.is_valid(i) { c.value(i) } else { 0 })
                    .collect(),
            );
        }
    }
    Ok(out)
}

/// Compares the online totals (views, likes, shares, comments per video; followers per
/// creator) with the latest materialized warehouse tables.
pub async fn check(ingestor: &Ingestor) -> Result<CheckReport, ApiError> {
    let catalog = ingestor.catalog().await?;
    // Without a materialized warehouse there is nothing to compare with.
    for t in [
        "fact_video_view",
        "like_state",
        "fact_engagement",
        "follow_state",
    ] {
        if !catalog.context().table_exist(t).unwrap_or(false) {
            return Err(ApiError::BadRequest(format!(
                "the warehouse has no {t} table yet; run `reelhouse materialize` first"
            )));
        }
    }
    let online = ingestor.features().totals();
    let mut wh_videos: HashMap<i64, (i64, i64, i64, i64)> = HashMap::new();
    for r in int_rows(&catalog, WAREHOUSE_VIDEOS).await? {
        wh_videos.insert(r[0], (r[1], r[2], r[3], r[4]));
    }
    let mut wh_creators: HashMap<i64, i64> = HashMap::new();
    for r in int_rows(&catalog, WAREHOUSE_CREATORS).await? {
        wh_creators.insert(r[0], r[1]);
    }
    let mut diffs = Vec::new();
    let video_ids: BTreeSet<i64> = online
        .videos
        .keys()
        .chain(wh_videos.keys())
        .copied()
        .collect();
    for id in &video_ids {
        let a = online.videos.get(id).copied().unwrap_or_default();
        let b = wh_videos.get(id).copied().unwrap_or_default();
        for (field, x, y) in [
            ("views_total", a.0, b.0),
            ("likes", a.1, b.1),
            ("shares", a.2, b.2),
            ("comments", a.3, b.3),
        ] {
            if x != y {
                diffs.push(Difference {
                    entity: "video",
                    id: *id,
                    field,
                    online: x,
                    warehouse: y,
                });
            }
        }
    }
    let creator_ids: BTreeSet<i64> = online
        .creators
        .keys()
        .chain(wh_creators.keys())
        .copied()
        .collect();
    for id in &creator_ids {
        let x = online.creators.get(id).copied().unwrap_or_default();
        let y = wh_creators.get(id).copied().unwrap_or_default();
        if x != y {
            diffs.push(Difference {
                entity: "creator",
                id: *id,
                field: "followers",
                online: x,
                warehouse: y,
            });
        }
    }
    Ok(CheckReport {
        videos_compared: video_ids.len(),
        creators_compared: creator_ids.len(),
        differences: diffs.len(),
        examples: diffs.into_iter().take(1000).collect(),
    })
}

pub(crate) async fn get_check(State(s): State<AppState>) -> Result<Response, ApiError> {
    Ok(Json(check(&s.ingestor).await?).into_response())
}
