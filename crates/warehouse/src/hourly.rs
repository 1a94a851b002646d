//! `agg_video_hourly` (docs/data-model.md): per video and UTC hour, the views, unique viewers, watch
//! time and completions of `fact_video_view` (a view counts in the hour of its start, or of
//! its end when the start is lost), the net likes of the like transitions and the shares
//! (distinct `share_id`) and comments of the events.
//!
//! As a DataFusion plan this was three grouped aggregates (one of them two-level, for the
//! unique viewers), a union and a final aggregate: about 1.6 s of a 2M-event rebuild on the
//! 2-core test machine. Here it is two sorts and one merged pass (see
//! [`agg_video_hourly`]); a hash map of rows with hash sets for the distinct counts, its
//! first Rust version, spent most of its 0.8 s in cache misses. The tests compare it with
//! that SQL, value for value.

use std::sync::Arc;

use reelhouse_lake::deltalake::arrow::array::{
    Array, ArrayRef, Date32Array, Int64Array, RecordBatch, TimestampMicrosecondArray,
};
use reelhouse_lake::deltalake::arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use reelhouse_lake::deltalake::arrow::error::ArrowError;

use crate::batch::string_views;
use crate::batch::{bools, column, ints, is_true, opt};

const HOUR_US: i64 = 3_600_000_000;
const DAY_US: i64 = 86_400_000_000;

/// A row of the table: (start of the hour in µs, video_id), in the table's order.
type Key = (Option<i64>, Option<i64>);

/// The counters of one row.
#[derive(Default)]
struct Counts {
    views: i64,
    unique_viewers: i64,
    watch_time_ms: i64,
    completions: i64,
    likes_net: i64,
    shares: i64,
    comments: i64,
}

/// The schema of `agg_video_hourly` (types and nullability as the SQL model wrote it).
pub fn schema() -> SchemaRef {
    let f = |n: &str, t: DataType| Field::new(n, t, true);
    let count = |n: &str| f(n, DataType::Int64);
    Arc::new(Schema::new(vec![
        f("video_id", DataType::Int64),
        f(
            "hour",
            DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
        ),
        count("views"),
        count("unique_viewers"),
        count("watch_time_ms"),
        count("completions"),
        count("likes_net"),
        count("shares"),
        count("comments"),
        f("event_date", DataType::Date32),
    ]))
}

/// The start of the UTC hour of `t` (µs since the epoch).
fn hour(t: Option<i64>) -> Option<i64> {
    t.map(|t| t - t.rem_euclid(HOUR_US))
}

/// What one input row adds to its (video, hour) row, besides a view (see [`agg_video_hourly`]).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Other<'a> {
    /// A like transition: +1 added, -1 removed, 0 neither (the row exists all the same).
    Like(i8),
    Comment,
    /// A share and its `share_id` (counted once per row).
    Share(Option<&'a str>),
}

/// `items` sorted (`key`, their first field, first), with a counting sort by hour first (no
/// hour first) when their hours span no more hours than there are items, so that the
/// comparisons stay within an hour (see [`crate::batch::bucket_sort`]).
fn sort_by_hour<T: Copy + Ord>(mut items: Vec<T>, key: impl Fn(&T) -> &Key) -> Vec<T> {
    let (lo, hi) = items
        .iter()
        .filter_map(|t| key(t).0)
        .fold((i64::MAX, i64::MIN), |(lo, hi), h| (lo.min(h), hi.max(h)));
    // In i128: the span of two arbitrary times may not fit an i64.
    let span = (i128::from(hi) - i128::from(lo)) / i128::from(HOUR_US);
    if lo > hi || span > items.len() as i128 + 1024 {
        items.sort_unstable();
        return items;
    }
    // The span is small, so `h - lo` fits an i64 for every hour h.
    let bucket = |t: &T| key(t).0.map_or(0, |h| ((h - lo) / HOUR_US) as usize + 1);
    crate::batch::bucket_sort(items, span as usize + 2, bucket)
}

/// `agg_video_hourly` from `fact_video_view`, the like transitions and the deduplicated
/// events (`ev`), each as the batches of its model. Rows are sorted by hour, then video.
///
/// The views are sorted by (hour, video, user) and the other inputs by (hour, video, kind,
/// share); one merged pass over both writes the rows in order, counting a user or a share
/// once where it repeats. Sorting keeps the memory access in order: the hash map of rows and
/// the hash sets of (row, user) and (row, share) it replaced took 0.8 s of CPU for 2M events
/// (`perf`), most of it cache misses.
pub fn agg_video_hourly(
    views: &[RecordBatch],
    like_transitions: &[RecordBatch],
    ev: &[RecordBatch],
) -> Result<RecordBatch, ArrowError> {
    let (keys, counts) = rows(views, like_transitions, ev)?;
    batch(&keys, &counts)
}

impl Counts {
    /// Adds the counters of `o` (the row of the same key from another part of the input).
    fn add(&mut self, o: &Counts) {
        self.views += o.views;
        self.unique_viewers += o.unique_viewers;
        self.watch_time_ms = self.watch_time_ms.wrapping_add(o.watch_time_ms);
        self.completions += o.completions;
        self.likes_net += o.likes_net;
        self.shares += o.shares;
        self.comments += o.comments;
    }
}

/// `agg_video_hourly` summed over parts of the input that share no user (see
/// [`crate::creator::CreatorDaily`], which this follows: shares are counted over every
/// share event at once, by [`VideoHourly::add_shares`]).
#[derive(Default)]
pub(crate) struct VideoHourly {
    rows: foldhash::HashMap<Key, Counts>,
}

impl VideoHourly {
    /// Adds one part: its views, like transitions and events (shares left out).
    pub(crate) fn add(
        &mut self,
        views: &[RecordBatch],
        like_transitions: &[RecordBatch],
        ev: &[RecordBatch],
    ) -> Result<(), ArrowError> {
        let (keys, counts) = rows(views, like_transitions, ev)?;
        for (key, mut c) in keys.into_iter().zip(counts) {
            c.shares = 0;
            self.rows.entry(key).or_default().add(&c);
        }
        Ok(())
    }

    /// Counts the shares of every share event of the input (`ev` rows).
    pub(crate) fn add_shares(&mut self, shares: &[RecordBatch]) -> Result<(), ArrowError> {
        let (keys, counts) = rows(&[], &[], shares)?;
        for (key, c) in keys.into_iter().zip(counts) {
            self.rows.entry(key).or_default().shares += c.shares;
        }
        Ok(())
    }

    /// The table's rows, sorted by hour, then video.
    pub(crate) fn finish(self) -> Result<RecordBatch, ArrowError> {
        let mut rows: Vec<(Key, Counts)> = self.rows.into_iter().collect();
        rows.sort_unstable_by_key(|r| r.0);
        let (keys, counts): (Vec<Key>, Vec<Counts>) = rows.into_iter().unzip();
        batch(&keys, &counts)
    }
}

/// The rows of `agg_video_hourly` as keys and counters, sorted by key.
fn rows(
    views: &[RecordBatch],
    like_transitions: &[RecordBatch],
    ev: &[RecordBatch],
) -> Result<(Vec<Key>, Vec<Counts>), ArrowError> {
    // (key, user, watch, completed) per view.
    let capacity = views.iter().map(|b| b.num_rows()).sum::<usize>();
    let mut seen: Vec<(Key, Option<i64>, i64, bool)> = Vec::with_capacity(capacity);
    for b in views {
        let (video, user, watch) = (
            ints(b, "video_id")?,
            ints(b, "user_id")?,
            ints(b, "watch_ms")?,
        );
        let (start, end) = (ints(b, "start_time")?, ints(b, "end_time")?);
        let completed = bools(b, "completed")?;
        seen.extend((0..b.num_rows()).map(|i| {
            let at = hour(opt(&start, i).or_else(|| opt(&end, i)));
            (
                (at, opt(&video, i)),
                opt(&user, i),
                opt(&watch, i).unwrap_or(0),
                is_true(&completed, i),
            )
        }));
    }
    let seen = sort_by_hour(seen, |v| &v.0);
    let mut other: Vec<(Key, Other)> = Vec::new();
    for b in like_transitions {
        let (video, time) = (ints(b, "video_id")?, ints(b, "event_time")?);
        let (added, removed) = (bools(b, "added")?, bools(b, "removed")?);
        other.extend((0..b.num_rows()).map(|i| {
            let net = i8::from(is_true(&added, i)) - i8::from(is_true(&removed, i));
            ((hour(opt(&time, i)), opt(&video, i)), Other::Like(net))
        }));
    }
    let mut events = Vec::with_capacity(ev.len());
    for b in ev {
        events.push((
            string_views(column(b, "event_type")?)?,
            ints(b, "video_id")?,
            ints(b, "event_time")?,
            string_views(column(b, "share_id")?)?,
        ));
    }
    for (kind, video, time, share) in &events {
        for i in 0..kind.len() {
            let o = match kind.is_valid(i).then(|| kind.value(i)) {
                Some("share") => Other::Share(share.is_valid(i).then(|| share.value(i))),
                Some("comment") => Other::Comment,
                _ => continue,
            };
            other.push(((hour(opt(time, i)), opt(video, i)), o));
        }
    }
    let other = sort_by_hour(other, |v| &v.0);

    // Both lists are sorted by key: each output row takes the run of its key from each.
    let mut keys: Vec<Key> = Vec::new();
    let mut counts: Vec<Counts> = Vec::new();
    let (mut v, mut o) = (seen.iter().peekable(), other.iter().peekable());
    loop {
        let key = match (v.peek(), o.peek()) {
            (Some(a), Some(b)) => a.0.min(b.0),
            (Some(a), None) => a.0,
            (None, Some(b)) => b.0,
            (None, None) => break,
        };
        let mut c = Counts::default();
        let mut last_user = None;
        while let Some((_, user, watch, completed)) = v.next_if(|x| x.0 == key) {
            c.views += 1;
            c.watch_time_ms = c.watch_time_ms.wrapping_add(*watch);
            c.completions += i64::from(*completed);
            if user.is_some() && *user != last_user {
                c.unique_viewers += 1;
                last_user = *user;
            }
        }
        let mut last_share = None;
        while let Some((_, x)) = o.next_if(|x| x.0 == key) {
            match x {
                Other::Like(net) => c.likes_net += i64::from(*net),
                Other::Comment => c.comments += 1,
                Other::Share(s) => {
                    if s.is_some() && *s != last_share {
                        c.shares += 1;
                        last_share = *s;
                    }
                }
            }
        }
        keys.push(key);
        counts.push(c);
    }
    Ok((keys, counts))
}

/// The table's batch from its rows.
fn batch(keys: &[Key], counts: &[Counts]) -> Result<RecordBatch, ArrowError> {
    let key = |f: fn(&Key) -> Option<i64>| keys.iter().map(f).collect::<Vec<_>>();
    let count = |f: fn(&Counts) -> i64| -> ArrayRef {
        Arc::new(counts.iter().map(f).collect::<Int64Array>())
    };
    let video = Int64Array::from(key(|k| k.1));
    let hours = TimestampMicrosecondArray::from(key(|k| k.0));
    let dates: Date32Array = keys
        .iter()
        .map(|k| k.0.map(|h| h.div_euclid(DAY_US) as i32))
        .collect();
    RecordBatch::try_new(
        schema(),
        vec![
            Arc::new(video),
            Arc::new(hours.with_timezone("UTC")),
            count(|c| c.views),
            count(|c| c.unique_viewers),
            count(|c| c.watch_time_ms),
            count(|c| c.completions),
            count(|c| c.likes_net),
            count(|c| c.shares),
            count(|c| c.comments),
            Arc::new(dates),
        ],
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::batch::testing::{batch_of, ev_session, printed, register};
    use proptest::prelude::*;
    use reelhouse_lake::deltalake::arrow::array::StringArray;
    use reelhouse_lake::deltalake::arrow::compute::cast;

    /// The SQL model this module replaced: the reference it must equal row for row. Each
    /// input is grouped once and the three are stacked and summed per (video, hour); unique
    /// viewers are the number of (video, hour, user) groups.
    const AGG_VIDEO_HOURLY_SQL: &str = "
    WITH per_user AS (
      SELECT video_id, date_trunc('hour', coalesce(start_time, end_time)) AS hour, user_id,
        count(*) AS views, coalesce(sum(watch_ms), 0) AS watch_time_ms,
        count(*) FILTER (WHERE completed) AS completions
      FROM fact_video_view GROUP BY 1, 2, 3),
    views AS (
      SELECT video_id, hour, sum(views) AS views, count(user_id) AS unique_viewers,
        sum(watch_time_ms) AS watch_time_ms, sum(completions) AS completions
      FROM per_user GROUP BY 1, 2),
    likes AS (
      SELECT video_id, date_trunc('hour', event_time) AS hour,
        count(*) FILTER (WHERE added) - count(*) FILTER (WHERE removed) AS likes_net
      FROM like_transitions GROUP BY 1, 2),
    eng AS (
      SELECT video_id, date_trunc('hour', event_time) AS hour,
        count(DISTINCT share_id) FILTER (WHERE event_type = 'share') AS shares,
        count(*) FILTER (WHERE event_type = 'comment') AS comments
      FROM ev WHERE event_type IN ('share', 'comment') GROUP BY 1, 2),
    k AS (
      SELECT video_id, hour, views, unique_viewers, watch_time_ms, completions,
        CAST(0 AS BIGINT) AS likes_net, CAST(0 AS BIGINT) AS shares, CAST(0 AS BIGINT) AS comments
      FROM views
      UNION ALL SELECT video_id, hour, 0, 0, 0, 0, likes_net, 0, 0 FROM likes
      UNION ALL SELECT video_id, hour, 0, 0, 0, 0, 0, shares, comments FROM eng)
    SELECT video_id, hour,
      CAST(sum(views) AS BIGINT) AS views, CAST(sum(unique_viewers) AS BIGINT) AS unique_viewers,
      CAST(sum(watch_time_ms) AS BIGINT) AS watch_time_ms,
      CAST(sum(completions) AS BIGINT) AS completions,
      CAST(sum(likes_net) AS BIGINT) AS likes_net, CAST(sum(shares) AS BIGINT) AS shares,
      CAST(sum(comments) AS BIGINT) AS comments,
      CAST(hour AS DATE) AS event_date
    FROM k GROUP BY video_id, hour";

    /// The view, like and engagement types: the first six event types.
    const KINDS: &[&str] = crate::batch::testing::EVENT_TYPES.split_at(6).0;

    /// One generated event: (kind, view, user, video, minute, watch, duration, share). Small
    /// ranges, so keys repeat, views cross hours and dates, and users, videos and shares
    /// are sometimes missing.
    type Gen = (u8, u8, Option<u8>, Option<u8>, u16, u16, u16, Option<u8>);

    fn events(gen: &[Gen]) -> RecordBatch {
        let s = |v: Vec<Option<String>>| Arc::new(StringArray::from(v)) as ArrayRef;
        let i = |v: Vec<Option<i64>>| Arc::new(Int64Array::from(v)) as ArrayRef;
        let n = gen.len();
        let kind: Vec<_> = gen
            .iter()
            .map(|g| KINDS[g.0 as usize % KINDS.len()].to_string())
            .collect();
        let view = |g: &Gen| g.0 % 6 < 2;
        // Seven hours around the first midnight: a (video, hour) holds several events.
        let minute = |g: &Gen| i64::from(1240 + g.4 % 420) * 60_000_000;
        let time = cast(
            &Int64Array::from(gen.iter().map(minute).collect::<Vec<_>>()),
            &DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
        )
        .unwrap();
        let date = cast(
            &Date32Array::from(
                gen.iter()
                    .map(|g| (minute(g).div_euclid(DAY_US)) as i32)
                    .collect::<Vec<_>>(),
            ),
            &DataType::Date32,
        )
        .unwrap();
        let cols: Vec<(&str, ArrayRef)> = vec![
            (
                "event_id",
                s((0..n).map(|e| Some(format!("e{e:04}"))).collect()),
            ),
            ("event_type", s(kind.into_iter().map(Some).collect())),
            ("event_time", time),
            (
                "user_id",
                i(gen.iter().map(|g| g.2.map(|u| i64::from(u % 4))).collect()),
            ),
            ("session_id", s(vec![None; n])),
            (
                "video_id",
                i(gen.iter().map(|g| g.3.map(|v| i64::from(v % 3))).collect()),
            ),
            ("creator_id", i(vec![Some(7); n])),
            (
                "view_id",
                s(gen
                    .iter()
                    .map(|g| view(g).then(|| format!("v{}", g.1 % 10)))
                    .collect()),
            ),
            ("source", s(vec![None; n])),
            ("via_share_id", s(vec![None; n])),
            (
                "watch_ms",
                i(gen
                    .iter()
                    .map(|g| (g.0 % 6 == 1).then_some(i64::from(g.5)))
                    .collect()),
            ),
            (
                "video_duration_ms",
                i(gen
                    .iter()
                    .map(|g| (g.0 % 6 == 1).then_some(i64::from(g.6) + 1))
                    .collect()),
            ),
            (
                "share_id",
                s(gen
                    .iter()
                    .map(|g| {
                        (g.0 % 6 == 4)
                            .then_some(g.7)
                            .flatten()
                            .map(|x| format!("sh{}", x % 5))
                    })
                    .collect()),
            ),
            ("event_date", date),
        ];
        batch_of(cols)
    }

    proptest! {
        /// Sorting by hour equals a comparison sort, whether the hours span few hours
        /// (a counting sort by hour) or years (the comparison sort itself), with and
        /// without items that have no hour.
        #[test]
        fn sort_by_hour_equals_sort_unstable(
            items in proptest::collection::vec(
                (proptest::option::of(0i64..50), proptest::option::of(0i64..4), any::<u8>()),
                0..200,
            ),
            spread in prop_oneof![Just(1i64), Just(24 * 3_650)],
        ) {
            let items: Vec<(Key, u8)> = items
                .into_iter()
                .map(|(h, v, x)| ((h.map(|h| (h * spread - 100) * HOUR_US), v), x))
                .collect();
            let mut want = items.clone();
            want.sort_unstable();
            prop_assert_eq!(sort_by_hour(items, |t| &t.0), want);
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn equals_the_sql_model(gen in proptest::collection::vec(any::<Gen>(), 1..80), split in 0usize..80) {
            let rt = tokio::runtime::Runtime::new().unwrap();
            rt.block_on(async {
                // Two input batches, as DataFusion hands them out.
                let (ev, ctx) = ev_session(&events(&gen), split);
                let views = vec![crate::views::fact_video_view(&ev).unwrap()];
                register(&ctx, "fact_video_view", views.clone());
                let df = ctx.sql(crate::transitions::sql::LIKE_TRANSITIONS).await.unwrap();
                let like_schema = Arc::new(df.schema().as_arrow().clone());
                let mut likes = df.collect().await.unwrap();
                likes.insert(0, RecordBatch::new_empty(like_schema));
                register(&ctx, "like_transitions", likes.clone());
                let want = ctx.sql(AGG_VIDEO_HOURLY_SQL).await.unwrap().collect().await.unwrap();
                let got = agg_video_hourly(&views, &likes, &ev).unwrap();
                for w in &want {
                    prop_assert_eq!(w.schema(), got.schema());
                }
                let want = printed(&ctx, "want", want, "*", "hour, video_id NULLS FIRST").await;
                let got = printed(&ctx, "got", vec![got], "*", "hour, video_id NULLS FIRST").await;
                prop_assert_eq!(got, want);
                Ok(())
            })?;
        }
    }
}
