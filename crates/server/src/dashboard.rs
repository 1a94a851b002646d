//! `GET /v1/creators/{id}/dashboard?from=YYYY-MM-DD&to=YYYY-MM-DD` (SPEC §6): the creator's
//! `agg_creator_daily` rows for the range, totals over it, and current followers.
//!
//! Totals of counts are sums of the days; `unique_viewers` and the two averages are computed
//! exactly over the range's views (a sum of daily uniques would count a returning viewer twice);
//! `engagement_rate` is the range's (likes_added − likes_removed + comments + shares) / views.
//!
//! `from` and `to` may be left out (see [`CreatorRange::resolve`]): without either the
//! answer covers every day the creator has a row on; the answer's `from` and `to` say which
//! range was used. The same holds for `GET /v1/creators/{id}/videos`.

use std::collections::{BTreeMap, HashMap};

use serde::Serialize;
use serde_json::value::RawValue;
use serde_json::{json, Map, Value};

use crate::{day_number, parse_date, parse_dates, ApiError, Ingestor};

/// Count columns of `agg_creator_daily` that add up over days (`unique_viewers` does not: its
/// total is counted over the range's views).
const SUMMED: [&str; 17] = [
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
];

/// The fixed point `percent_viewed` is summed in (2^64, as `agg_creator_daily` sums it), so
/// the totals do not depend on the order the views are read in and a one-day range gives that
/// day's `avg_percent_viewed` exactly. SQL sums each percent as two 32-bit halves, `floor(p ·
/// 2^32)` and `floor(frac(p · 2^32) · 2^32)` (scaling by powers of two is exact), which
/// together are `floor(p · 2^64)`.
const PERCENT_ONE: f64 = 18_446_744_073_709_551_616.0;

/// Longest range one request may ask for.
const MAX_DAYS: i64 = 3660;

/// Everything the dashboard reads, in memory, built once per materialization.
#[derive(Default)]
pub struct DashboardIndex {
    creators: HashMap<i64, CreatorIndex>,
}

/// A day's sums over the views with an end (see [`CreatorIndex::ended`]).
#[derive(Default, Clone, Copy)]
struct Ended {
    watched: i64,
    watch_ms: i64,
    percented: i64,
    percent: i128,
}

/// One `agg_creator_daily` row, serialized once when the index is built, with its summed
/// columns (those of [`SUMMED`], in that order) beside it, so a request
/// copies neither its keys nor its values.
struct Day {
    row: Box<RawValue>,
    sums: [i64; SUMMED.len()],
}

#[derive(Default)]
struct CreatorIndex {
    /// `agg_creator_daily` rows by day (days since epoch), every column of the row (SPEC §6:
    /// each day of the dashboard is `{"date", <agg_creator_daily fields>}`).
    days: BTreeMap<i32, Day>,
    /// Per day, over the views with an end (as SQL `avg` counts, non-null values only): the
    /// number with a `watch_ms` and its sum, the number with a `percent_viewed` and its sum in
    /// the fixed point of [`PERCENT_ONE`].
    ended: BTreeMap<i32, Ended>,
    /// For each viewer, the sorted days they viewed (exact unique viewers over any range).
    viewer_days: Vec<Vec<i32>>,
    followers: i64,
}

impl CreatorIndex {
    /// The first and last day the creator has an `agg_creator_daily` row on.
    fn span(&self) -> Option<(i32, i32)> {
        Some((
            *self.days.first_key_value()?.0,
            *self.days.last_key_value()?.0,
        ))
    }
}

impl DashboardIndex {
    /// Reads the warehouse tables through `catalog`.
    pub async fn build(
        catalog: &reelhouse_lake::query::Catalog,
    ) -> Result<DashboardIndex, ApiError> {
        let mut idx = DashboardIndex::default();
        let has = |t: &str| catalog.context().table_exist(t).unwrap_or(false);
        if !has("agg_creator_daily") || !has("fact_video_view") || !has("follow_state") {
            return Ok(idx);
        }
        let days = catalog
            .query_json(
                "SELECT *, CAST(date AS INT) AS __day FROM agg_creator_daily",
                usize::MAX,
            )
            .await?;
        for row in days.rows {
            let mut m = Map::new();
            let (mut creator, mut day) = (0, 0);
            for (c, v) in days.columns.iter().zip(row) {
                match c.as_str() {
                    "__day" => day = v.as_i64().unwrap_or(0) as i32,
                    _ => {
                        if c == "creator_id" {
                            creator = v.as_i64().unwrap_or(0);
                        }
                        m.insert(c.clone(), v);
                    }
                }
            }
            let mut sums = [0; SUMMED.len()];
            for (s, name) in sums.iter_mut().zip(SUMMED) {
                *s = m.get(name).and_then(Value::as_i64).unwrap_or(0);
            }
            let row = serde_json::value::to_raw_value(&m).map_err(internal)?;
            let day_row = Day { row, sums };
            idx.creators
                .entry(creator)
                .or_default()
                .days
                .insert(day, day_row);
        }
        let viewers = catalog
            .query_json(
                "SELECT creator_id, user_id, CAST(event_date AS INT) AS day, \
                 count(watch_ms) FILTER (WHERE has_end), \
                 coalesce(sum(watch_ms) FILTER (WHERE has_end), 0), \
                 count(percent_viewed) FILTER (WHERE has_end), \
                 coalesce(sum(CAST(floor(percent_viewed * 4294967296.0) AS BIGINT)) \
                   FILTER (WHERE has_end), 0), \
                 coalesce(sum(CAST(floor((percent_viewed * 4294967296.0 \
                   - floor(percent_viewed * 4294967296.0)) * 4294967296.0) AS BIGINT)) \
                   FILTER (WHERE has_end), 0) \
                 FROM fact_video_view WHERE creator_id IS NOT NULL GROUP BY 1, 2, 3 ORDER BY 1, 2, 3",
                usize::MAX,
            )
            .await?;
        let mut last: Option<(i64, i64)> = None;
        for r in viewers.rows {
            let (creator, user, day) = (
                r[0].as_i64().unwrap_or(0),
                r[1].as_i64().unwrap_or(0),
                r[2].as_i64().unwrap_or(0) as i32,
            );
            let c = idx.creators.entry(creator).or_default();
            if last != Some((creator, user)) {
                c.viewer_days.push(Vec::new());
                last = Some((creator, user));
            }
            if let Some(v) = c.viewer_days.last_mut() {
                v.push(day);
            }
            let e = c.ended.entry(day).or_default();
            let int = |k: usize| r[k].as_i64().unwrap_or(0);
            e.watched += int(3);
            e.watch_ms += int(4);
            e.percented += int(5);
            e.percent += ((int(6) as i128) << 32) + int(7) as i128;
        }
        let f = catalog
            .query_json(
                "SELECT creator_id, count(*) FROM follow_state WHERE following GROUP BY 1",
                usize::MAX,
            )
            .await?;
        for r in f.rows {
            idx.creators
                .entry(r[0].as_i64().unwrap_or(0))
                .or_default()
                .followers = r[1].as_i64().unwrap_or(0);
        }
        Ok(idx)
    }
}

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
    /// covers all of the creator's days; with no rows, an omitted `to` is today (UTC) and
    /// an omitted `from` is `to`. A bound filled in never crosses the one given: `from`
    /// after the creator's last day gives an empty range starting there.
    fn resolve(&self, span: Option<(i32, i32)>) -> (chrono::NaiveDate, chrono::NaiveDate) {
        let date = |d: i32| chrono::NaiveDate::default() + chrono::Duration::days(d.into());
        let to = self.to.unwrap_or_else(|| {
            let last = span.map_or_else(|| chrono::Utc::now().date_naive(), |s| date(s.1));
            self.from.map_or(last, |from| last.max(from))
        });
        let from = self
            .from
            .unwrap_or_else(|| span.map_or(to, |s| date(s.0)).min(to));
        (from, to)
    }
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
    ingestor: &Ingestor,
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
            let idx = ingestor.dashboard_index().await?;
            range.resolve(idx.creators.get(&creator_id).and_then(CreatorIndex::span))
        }
    };
    let catalog = ingestor.catalog().await?;
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

/// The answer of [`dashboard`], its fields in the order `json!` gave them before (sorted).
#[derive(Serialize)]
struct Answer<'a> {
    creator_id: i64,
    days: Vec<&'a RawValue>,
    followers: i64,
    from: String,
    to: String,
    totals: Map<String, Value>,
}

/// Builds the dashboard of `creator_id` for `[from, to]` (inclusive), serialized as JSON.
///
/// The days are the index's rows as they were serialized when it was built, and the summed
/// columns add up in fixed arrays: a 90-day answer copies no per-day map.
pub async fn dashboard(
    ingestor: &Ingestor,
    creator: &str,
    params: &HashMap<String, String>,
) -> Result<Vec<u8>, ApiError> {
    let range = creator_range(creator, params)?;
    let creator_id = range.creator_id;
    let idx = ingestor.dashboard_index().await?;
    let empty = CreatorIndex::default();
    let c = idx.creators.get(&creator_id).unwrap_or(&empty);
    let (from, to) = range.resolve(c.span());
    let (a, b) = (day_number(from), day_number(to));
    let mut sums = [0i64; SUMMED.len()];
    let mut out_days = Vec::new();
    for day in c.days.range(a..=b).map(|(_, d)| d) {
        for (t, v) in sums.iter_mut().zip(day.sums) {
            *t += v;
        }
        out_days.push(&*day.row);
    }
    let mut totals = Map::new();
    for (name, t) in SUMMED.iter().zip(sums) {
        totals.insert((*name).to_string(), json!(t));
    }
    let uniques = c
        .viewer_days
        .iter()
        .filter(|days| {
            let i = days.partition_point(|d| *d < a);
            i < days.len() && days[i] <= b
        })
        .count();
    totals.insert("unique_viewers".into(), json!(uniques));
    let e = c
        .ended
        .range(a..=b)
        .fold(Ended::default(), |s, (_, e)| Ended {
            watched: s.watched + e.watched,
            watch_ms: s.watch_ms + e.watch_ms,
            percented: s.percented + e.percented,
            percent: s.percent + e.percent,
        });
    let avg = |sum: f64, n: i64| {
        if n > 0 {
            json!(sum / n as f64)
        } else {
            Value::Null
        }
    };
    totals.insert(
        "avg_view_duration_ms".into(),
        avg(e.watch_ms as f64, e.watched),
    );
    totals.insert(
        "avg_percent_viewed".into(),
        avg(e.percent as f64 / PERCENT_ONE, e.percented),
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
    serde_json::to_vec(&Answer {
        creator_id,
        days: out_days,
        followers: c.followers,
        from: from.to_string(),
        to: to.to_string(),
        totals,
    })
    .map_err(internal)
}

/// A failed serialization of the dashboard: logged (the error names no value), answered 500.
fn internal(e: serde_json::Error) -> ApiError {
    tracing::error!(error = %e, "dashboard serialization failed");
    ApiError::Internal
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
        let resolve = |from, to, span| range(from, to).unwrap().resolve(span);
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
        // No rows: today, or the bound given.
        let today = chrono::Utc::now().date_naive();
        let (from, to) = resolve(None, None, None);
        assert_eq!(from, to);
        assert!((to - today).num_days().abs() <= 1, "{to}");
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
