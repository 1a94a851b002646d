//! `GET /v1/creators/{id}/dashboard?from=YYYY-MM-DD&to=YYYY-MM-DD` (README.md, HTTP API): the creator's
//! `agg_creator_daily` rows for the range, totals over it, and current followers.
//!
//! Totals of counts are sums of the days; `unique_viewers` and the two averages are computed
//! exactly over the range's views (a sum of daily uniques would count a returning viewer twice);
//! `engagement_rate` is the range's (likes_added − likes_removed + comments + shares) / views.
//!
//! `from` and `to` may be left out (see [`CreatorRange::resolve`]): without either the
//! answer covers every day the creator has a row on; the answer's `from` and `to` say which
//! range was used. The same holds for `GET /v1/creators/{id}/videos`.

use std::collections::HashMap;

use serde_json::{json, Map, Value};

use reelhouse_engine::Engine;

use crate::{day_number, parse_date, parse_dates, ApiError};

/// Longest range one request may ask for.
const MAX_DAYS: i64 = 3660;

/// A creator endpoint's request: the creator id and the `from` and `to` it gave, if any.
struct CreatorRange {
    creator_id: i64,
    from: Option<chrono::NaiveDate>,
    to: Option<chrono::NaiveDate>,
}

/// Parses the creator id and the optional `from` and `to` (`YYYY-MM-DD`) of a creator
/// endpoint. Given both, `from` must not be after `to` and the range may cover at most
/// [`MAX_DAYS`] days.
fn creator_range(
    creator: &str,
    params: &HashMap<String, String>,
) -> Result<CreatorRange, ApiError> {
    let creator_id: i64 = creator
        .parse()
        .ok()
        .filter(|c: &i64| *c >= 0)
        .ok_or_else(|| ApiError::BadRequest("creator id must be a non-negative integer".into()))?;
    let get = |name: &str| params.get(name).map(String::as_str);
    let (from, to) = match (get("from"), get("to")) {
        (Some(from), Some(to)) => {
            let (from, to) = parse_dates(Some(from), Some(to))?;
            if (to - from).num_days() >= MAX_DAYS {
                return Err(ApiError::BadRequest(format!(
                    "a range may cover at most {MAX_DAYS} days"
                )));
            }
            (Some(from), Some(to))
        }
        (from, to) => (
            from.map(|v| parse_date("from", v)).transpose()?,
            to.map(|v| parse_date("to", v)).transpose()?,
        ),
    };
    Ok(CreatorRange {
        creator_id,
        from,
        to,
    })
}

impl CreatorRange {
    /// The inclusive range to answer for, given the first and last day (days since epoch)
    /// the creator has an `agg_creator_daily` row on (`None`: no rows). An omitted `to` is the
    /// creator's last day, an omitted `from` its first day, so a request without either
    /// covers all of the creator's days; with no rows, an omitted `to` is `today` and
    /// an omitted `from` is `to`. A bound filled in never crosses the one given: `from`
    /// after the creator's last day gives an empty range starting there.
    fn resolve(
        &self,
        span: Option<(i32, i32)>,
        today: chrono::NaiveDate,
    ) -> (chrono::NaiveDate, chrono::NaiveDate) {
        let date = |d: i32| reelhouse_event::Day(d).date();
        let to = self.to.unwrap_or_else(|| {
            let last = span.map_or(today, |s| date(s.1));
            self.from.map_or(last, |from| last.max(from))
        });
        let from = self
            .from
            .unwrap_or_else(|| span.map_or(to, |s| date(s.0)).min(to));
        (from, to)
    }
}

/// Today (UTC) by the engine's clock.
fn today(engine: &Engine) -> chrono::NaiveDate {
    reelhouse_event::Day::of_ms(engine.now_ms()).date()
}

/// The `limit` query parameter: 1..=`max`, `default` when absent.
pub(crate) fn limit_param(
    params: &HashMap<String, String>,
    default: usize,
    max: usize,
) -> Result<usize, ApiError> {
    match params.get("limit") {
        Some(l) => l
            .parse::<usize>()
            .ok()
            .filter(|l| (1..=max).contains(l))
            .ok_or_else(|| ApiError::BadRequest(format!("limit must be an integer in 1..={max}"))),
        None => Ok(default),
    }
}

/// `GET /v1/creators/{id}/videos?from&to&limit=N`: the creator's most viewed videos in the
/// range (views, unique viewers, watch time, average percent viewed, completions, as in
/// `agg_creator_daily` but per video) with each video's 101-point retention curve from
/// `video_retention` (over all its ended views).
pub async fn top_videos(
    engine: &Engine,
    creator: &str,
    params: &HashMap<String, String>,
) -> Result<Value, ApiError> {
    let range = creator_range(creator, params)?;
    let limit = limit_param(params, 10, 100)?;
    let creator_id = range.creator_id;
    // The creator's days (from the dashboard's index) are needed only for a bound left out.
    let (from, to) = match (range.from, range.to) {
        (Some(from), Some(to)) => (from, to),
        _ => {
            let idx = engine.dashboard_index().await?;
            range.resolve(idx.span(creator_id), today(engine))
        }
    };
    let catalog = engine.catalog().await?;
    let has = |t: &str| catalog.context().table_exist(t).unwrap_or(false);
    let mut videos = Vec::new();
    if has("fact_video_view") && has("video_retention") {
        let top = catalog
            .query_json(
                &format!(
                    "SELECT video_id, count(*) AS views, count(DISTINCT user_id) AS unique_viewers, \
                     coalesce(sum(watch_ms), 0) AS watch_time_ms, \
                     avg(percent_viewed) FILTER (WHERE has_end) AS avg_percent_viewed, \
                     count(*) FILTER (WHERE completed) AS completions \
                     FROM fact_video_view WHERE creator_id = {creator_id} \
                     AND event_date BETWEEN DATE '{from}' AND DATE '{to}' \
                     GROUP BY video_id ORDER BY views DESC, video_id LIMIT {limit}"
                ),
                limit,
            )
            .await?;
        let ids: Vec<String> = top
            .rows
            .iter()
            .filter_map(|r| r.first().and_then(Value::as_i64).map(|v| v.to_string()))
            .collect();
        let mut curves: HashMap<i64, Vec<Value>> = HashMap::new();
        if !ids.is_empty() {
            let r = catalog
                .query_json(
                    &format!(
                        "SELECT video_id, share_retained FROM video_retention \
                         WHERE video_id IN ({}) ORDER BY video_id, p",
                        ids.join(", ")
                    ),
                    usize::MAX,
                )
                .await?;
            for row in r.rows {
                let id = row[0].as_i64().unwrap_or(0);
                curves.entry(id).or_default().push(row[1].clone());
            }
        }
        for row in top.rows {
            let mut m: Map<String, Value> = top.columns.iter().cloned().zip(row).collect();
            let id = m.get("video_id").and_then(Value::as_i64).unwrap_or(0);
            m.insert(
                "retention".into(),
                Value::Array(curves.remove(&id).unwrap_or_default()),
            );
            videos.push(Value::Object(m));
        }
    }
    Ok(json!({
        "creator_id": creator_id,
        "from": from.to_string(),
        "to": to.to_string(),
        "videos": videos,
    }))
}

/// Builds the dashboard of `creator_id` for the range asked for, serialized as JSON (see
/// `reelhouse_engine::dashboard`).
pub async fn dashboard(
    engine: &Engine,
    creator: &str,
    params: &HashMap<String, String>,
) -> Result<Vec<u8>, ApiError> {
    let range = creator_range(creator, params)?;
    let idx = engine.dashboard_index().await?;
    let (from, to) = range.resolve(idx.span(range.creator_id), today(engine));
    Ok(idx.answer(
        range.creator_id,
        (day_number(from), day_number(to)),
        (from, to),
    )?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn range(from: Option<&str>, to: Option<&str>) -> Result<CreatorRange, ApiError> {
        let mut params = HashMap::new();
        for (k, v) in [("from", from), ("to", to)] {
            if let Some(v) = v {
                params.insert(k.to_string(), v.to_string());
            }
        }
        creator_range("7", &params)
    }

    fn d(s: &str) -> chrono::NaiveDate {
        chrono::NaiveDate::parse_from_str(s, "%Y-%m-%d").unwrap()
    }

    /// Omitted bounds come from the creator's days and never cross a bound given; bad or
    /// reversed bounds are refused.
    #[test]
    fn omitted_bounds_cover_the_creators_days() {
        let span = Some((day_number(d("2026-11-01")), day_number(d("2026-11-30"))));
        let today = d("2026-12-07");
        let resolve = |from, to, span| range(from, to).unwrap().resolve(span, today);
        assert_eq!(
            resolve(None, None, span),
            (d("2026-11-01"), d("2026-11-30"))
        );
        assert_eq!(
            resolve(Some("2026-11-10"), None, span),
            (d("2026-11-10"), d("2026-11-30"))
        );
        assert_eq!(
            resolve(None, Some("2026-11-10"), span),
            (d("2026-11-01"), d("2026-11-10"))
        );
        // Past either end of the data: an empty range at the bound given.
        assert_eq!(
            resolve(Some("2026-12-05"), None, span),
            (d("2026-12-05"), d("2026-12-05"))
        );
        assert_eq!(
            resolve(None, Some("2026-10-01"), span),
            (d("2026-10-01"), d("2026-10-01"))
        );
        assert_eq!(
            resolve(Some("2026-10-01"), Some("2026-10-03"), span),
            (d("2026-10-01"), d("2026-10-03"))
        );
        // No rows: today (by the engine's clock), or the bound given.
        assert_eq!(resolve(None, None, None), (today, today));
        assert_eq!(
            resolve(None, Some("2026-10-01"), None),
            (d("2026-10-01"), d("2026-10-01"))
        );
        for (from, to) in [
            (Some("2026-11-02"), Some("2026-11-01")),
            (Some("x"), None),
            (None, Some("2026-13-01")),
            (Some("2000-01-01"), Some("2026-01-01")),
        ] {
            assert!(
                matches!(range(from, to), Err(ApiError::BadRequest(_))),
                "{from:?} {to:?}"
            );
        }
    }
}
