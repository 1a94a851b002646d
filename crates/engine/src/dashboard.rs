//! The creator dashboard's read model: an in-memory index of the current warehouse version
//! (`agg_creator_daily` rows serialized once, per-viewer days for exact unique viewers over any
//! range, followers), built on first use after each rebuild, and the dashboard's answer for a
//! range of days.
//!
//! Totals of counts are sums of the days; `unique_viewers` and the two averages are computed
//! exactly over the range's views (a sum of daily uniques would count a returning viewer twice);
//! `engagement_rate` is the range's (likes_added − likes_removed + comments + shares) / views.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use serde::Serialize;
use serde_json::value::RawValue;
use serde_json::{json, Map, Value};

use crate::{Engine, Error};

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
    /// `agg_creator_daily` rows by day (days since epoch), every column of the row (README.md, HTTP API:
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
    pub async fn build(catalog: &reelhouse_lake::query::Catalog) -> Result<DashboardIndex, Error> {
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

/// The answer of [`DashboardIndex::answer`], its fields in the order `json!` gave them before (sorted).
#[derive(Serialize)]
struct Answer<'a> {
    creator_id: i64,
    days: Vec<&'a RawValue>,
    followers: i64,
    from: String,
    to: String,
    totals: Map<String, Value>,
}

impl DashboardIndex {
    /// The first and last day (days since epoch) `creator_id` has an `agg_creator_daily` row
    /// on (`None`: no rows).
    pub fn span(&self, creator_id: i64) -> Option<(i32, i32)> {
        self.creators.get(&creator_id).and_then(CreatorIndex::span)
    }

    /// The dashboard of `creator_id` for days `a..=b` (days since epoch; `from` and `to` are
    /// the same range as dates, echoed in the answer), serialized as JSON.
    ///
    /// The days are the index's rows as they were serialized when it was built, and the
    /// summed columns add up in fixed arrays: a 90-day answer copies no per-day map.
    pub fn answer(
        &self,
        creator_id: i64,
        (a, b): (i32, i32),
        (from, to): (chrono::NaiveDate, chrono::NaiveDate),
    ) -> Result<Vec<u8>, Error> {
        let empty = CreatorIndex::default();
        let c = self.creators.get(&creator_id).unwrap_or(&empty);
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
}

/// A failed serialization of the dashboard: logged (the error names no value).
fn internal(e: serde_json::Error) -> Error {
    tracing::error!(error = %e, "dashboard serialization failed");
    Error::Internal("the dashboard could not be serialized")
}

impl Engine {
    /// The dashboard index of the current warehouse version, built on first use.
    pub async fn dashboard_index(&self) -> Result<Arc<DashboardIndex>, Error> {
        let mut slot = self.materializer.dashboard.lock().await;
        if let Some(idx) = slot.as_ref() {
            return Ok(Arc::clone(idx));
        }
        let catalog = self.catalog().await?;
        let idx = Arc::new(DashboardIndex::build(&catalog).await?);
        *slot = Some(Arc::clone(&idx));
        Ok(idx)
    }
}
