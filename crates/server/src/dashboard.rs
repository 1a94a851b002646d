//! `GET /v1/creators/{id}/dashboard?from=YYYY-MM-DD&to=YYYY-MM-DD` (SPEC §6): the creator's
//! `agg_creator_daily` rows for the range, totals over it, and current followers.
//!
//! Totals of counts are sums of the days; `unique_viewers` and the two averages are computed
//! exactly over the range's views (a sum of daily uniques would count a returning viewer twice);
//! `engagement_rate` is the range's (likes_added − likes_removed + comments + shares) / views.

use chrono::NaiveDate;
use serde_json::{json, Map, Value};

use crate::{ApiError, Ingestor};

/// Count columns of `agg_creator_daily` that add up over days.
const SUMMED: [&str; 18] = [
    "views",
    "engaged_views",
    "watch_time_ms",
    "completions",
    "likes_added",
    "likes_removed",
    "shares",
    "comments",
    "followers_gained",
    "followers_lost",
    "views_feed",
    "views_profile",
    "views_share",
    "views_search",
    "views_hashtag",
    "views_audio",
    "views_other",
    "unique_viewers",
];

/// Longest range one request may ask for.
const MAX_DAYS: i64 = 3660;

fn parse_date(name: &str, v: Option<&String>) -> Result<NaiveDate, ApiError> {
    let v = v.ok_or_else(|| {
        ApiError::BadRequest(format!("missing query parameter {name}=YYYY-MM-DD"))
    })?;
    NaiveDate::parse_from_str(v, "%Y-%m-%d")
        .map_err(|_| ApiError::BadRequest(format!("{name} must be a date as YYYY-MM-DD")))
}

/// Builds the dashboard of `creator_id` for `[from, to]` (inclusive).
pub async fn dashboard(
    ingestor: &Ingestor,
    creator: &str,
    params: &std::collections::HashMap<String, String>,
) -> Result<Value, ApiError> {
    let creator_id: i64 = creator
        .parse()
        .ok()
        .filter(|c: &i64| *c >= 0)
        .ok_or_else(|| ApiError::BadRequest("creator id must be a non-negative integer".into()))?;
    let from = parse_date("from", params.get("from"))?;
    let to = parse_date("to", params.get("to"))?;
    if to < from {
        return Err(ApiError::BadRequest("from must not be after to".into()));
    }
    if (to - from).num_days() >= MAX_DAYS {
        return Err(ApiError::BadRequest(format!(
            "a range may cover at most {MAX_DAYS} days"
        )));
    }
    let catalog = ingestor.catalog().await?;
    let has = |t: &str| catalog.context().table_exist(t).unwrap_or(false);
    if !has("agg_creator_daily") {
        return Ok(
            json!({"creator_id": creator_id, "days": [], "totals": Value::Object(Map::new()), "followers": 0}),
        );
    }
    let range = format!("BETWEEN DATE '{from}' AND DATE '{to}'");
    let days = catalog
        .query_json(
            &format!("SELECT * FROM agg_creator_daily WHERE creator_id = {creator_id} AND date {range} ORDER BY date"),
            usize::MAX,
        )
        .await?;
    let mut out_days = Vec::with_capacity(days.rows.len());
    let mut totals = Map::new();
    for name in SUMMED {
        totals.insert(name.to_string(), json!(0));
    }
    for row in &days.rows {
        let mut day = Map::new();
        for (c, v) in days.columns.iter().zip(row) {
            if c == "creator_id" {
                continue;
            }
            if SUMMED.contains(&c.as_str()) && c != "unique_viewers" {
                let t = totals.get(c).and_then(Value::as_i64).unwrap_or(0);
                totals.insert(c.clone(), json!(t + v.as_i64().unwrap_or(0)));
            }
            day.insert(c.clone(), v.clone());
        }
        out_days.push(Value::Object(day));
    }
    let exact = catalog
        .query_json(
            &format!(
                "SELECT count(DISTINCT user_id), avg(CAST(watch_ms AS DOUBLE)) FILTER (WHERE has_end), \
                 avg(percent_viewed) FILTER (WHERE has_end) \
                 FROM fact_video_view WHERE creator_id = {creator_id} AND event_date {range}"
            ),
            1,
        )
        .await?;
    let r = exact.rows.first().cloned().unwrap_or_default();
    totals.insert(
        "unique_viewers".into(),
        r.first().cloned().unwrap_or(json!(0)),
    );
    totals.insert(
        "avg_view_duration_ms".into(),
        r.get(1).cloned().unwrap_or(Value::Null),
    );
    totals.insert(
        "avg_percent_viewed".into(),
        r.get(2).cloned().unwrap_or(Value::Null),
    );
    let n = |k: &str| totals.get(k).and_then(Value::as_i64).unwrap_or(0);
    let views = n("views");
    let rate = if views > 0 {
        json!(
            (n("likes_added") - n("likes_removed") + n("comments") + n("shares")) as f64
                / views as f64
        )
    } else {
        Value::Null
    };
    totals.insert("engagement_rate".into(), rate);
    let followers = if has("follow_state") {
        let f = catalog
            .query_json(
                &format!("SELECT count(*) FROM follow_state WHERE creator_id = {creator_id} AND following"),
                1,
            )
            .await?;
        f.rows
            .first()
            .and_then(|r| r.first())
            .cloned()
            .unwrap_or(json!(0))
    } else {
        json!(0)
    };
    Ok(json!({
        "creator_id": creator_id,
        "from": from.to_string(),
        "to": to.to_string(),
        "days": out_days,
        "totals": totals,
        "followers": followers,
    }))
}
