//! Share cascade endpoints over the materialized `share_cascade` and `fact_share`:
//!
//! ```text
//!  GET /v1/videos/{id}/cascades?limit=N   ─▶ the video's largest cascades with their metrics
//!  GET /v1/cascades/{root_share_id}       ─▶ one cascade's metrics and its tree (for drawing)
//!  GET /v1/creators/{id}/cascades?limit=N ─▶ the creator's largest cascades with their trees
//! ```
//!
//! The creator endpoint is open to that creator's own token, so its nodes carry no user ids.
//!
//! Both read the warehouse as last materialized; before the first materialization they
//! answer as if there were no shares.

use axum::extract::{Path, Query, State};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Map, Value};

use crate::{ApiError, AppState};

/// Cascades listed per video at most.
const MAX_LIMIT: usize = 1000;
/// Nodes returned for one tree at most (a larger tree is cut and flagged `truncated`).
const MAX_NODES: usize = 100_000;

fn objects(r: reelhouse_lake::query::JsonResult) -> Vec<Value> {
    r.rows
        .into_iter()
        .map(|row| {
            Value::Object(
                r.columns
                    .iter()
                    .cloned()
                    .zip(row)
                    .collect::<Map<String, Value>>(),
            )
        })
        .collect()
}

/// The `limit` largest cascades whose `column` (`video_id` or `creator_id`) is `id`.
async fn largest(
    c: &reelhouse_lake::query::Catalog,
    column: &str,
    id: i64,
    limit: usize,
) -> Result<Vec<Value>, ApiError> {
    Ok(objects(
        c.query_json(
            &format!(
                "SELECT * FROM share_cascade WHERE {column} = {id} \
                 ORDER BY size DESC, structural_virality DESC, root_share_id LIMIT {limit}"
            ),
            limit,
        )
        .await?,
    ))
}

async fn has_cascades(s: &AppState) -> Result<Option<reelhouse_lake::query::Catalog>, ApiError> {
    let catalog = s.engine.catalog().await?;
    let ok = catalog
        .context()
        .table_exist("share_cascade")
        .unwrap_or(false);
    Ok(ok.then_some(catalog))
}

pub(crate) async fn get_video_cascades(
    State(s): State<AppState>,
    Path(id): Path<String>,
    Query(q): Query<std::collections::HashMap<String, String>>,
) -> Result<Response, ApiError> {
    let id = crate::features::parse_id("video", &id)?;
    let limit = crate::dashboard::limit_param(&q, 20, MAX_LIMIT)?;
    let cascades = match has_cascades(&s).await? {
        Some(c) => largest(&c, "video_id", id as i64, limit).await?,
        None => Vec::new(),
    };
    Ok(Json(json!({"video_id": id, "cascades": cascades})).into_response())
}

pub(crate) async fn get_cascade(
    State(s): State<AppState>,
    Path(root): Path<String>,
) -> Result<Response, ApiError> {
    if root.is_empty() || root.chars().count() > 64 || root.chars().any(char::is_control) {
        return Err(ApiError::BadRequest(
            "root_share_id must be a share id of 1 to 64 characters".into(),
        ));
    }
    let lit = root.replace('\'', "''");
    let Some(catalog) = has_cascades(&s).await? else {
        return Err(ApiError::NotFoundWhat(
            "no such cascade (is the warehouse materialized?)",
        ));
    };
    let mut head = objects(
        catalog
            .query_json(
                &format!("SELECT * FROM share_cascade WHERE root_share_id = '{lit}'"),
                1,
            )
            .await?,
    );
    let Some(Value::Object(mut out)) = head.pop() else {
        return Err(ApiError::NotFoundWhat("no cascade has this root_share_id"));
    };
    let nodes = catalog
        .query_json(
            &format!(
                "SELECT share_id, parent_share_id, user_id, depth, event_time, channel \
                 FROM fact_share WHERE root_share_id = '{lit}' ORDER BY depth, event_time, share_id"
            ),
            MAX_NODES,
        )
        .await?;
    let truncated = nodes.truncated;
    out.insert("nodes".into(), Value::Array(objects(nodes)));
    if truncated {
        out.insert("truncated".into(), Value::Bool(true));
    }
    Ok(Json(Value::Object(out)).into_response())
}

/// Nodes drawn per tree on the creator endpoint at most.
const MAX_DRAWN_NODES: usize = 500;

pub(crate) async fn get_creator_cascades(
    State(s): State<AppState>,
    Path(id): Path<String>,
    Query(q): Query<std::collections::HashMap<String, String>>,
) -> Result<Response, ApiError> {
    let id: i64 =
        id.parse().ok().filter(|c: &i64| *c >= 0).ok_or_else(|| {
            ApiError::BadRequest("creator id must be a non-negative integer".into())
        })?;
    let limit = crate::dashboard::limit_param(&q, 5, 50)?;
    let mut cascades = Vec::new();
    if let Some(c) = has_cascades(&s).await? {
        let heads = largest(&c, "creator_id", id, limit).await?;
        for mut head in heads {
            let root = head["root_share_id"]
                .as_str()
                .unwrap_or_default()
                .replace('\'', "''");
            let nodes = c
                .query_json(
                    &format!(
                        "SELECT share_id, parent_share_id, depth, event_time, channel \
                         FROM fact_share WHERE root_share_id = '{root}' \
                         ORDER BY depth, event_time, share_id"
                    ),
                    MAX_DRAWN_NODES,
                )
                .await?;
            if let Value::Object(m) = &mut head {
                m.insert("truncated".into(), Value::Bool(nodes.truncated));
                m.insert("nodes".into(), Value::Array(objects(nodes)));
            }
            cascades.push(head);
        }
    }
    Ok(Json(json!({"creator_id": id, "cascades": cascades})).into_response())
}
