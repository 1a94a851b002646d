//! `agg_creator_daily` (docs/data-model.md): per creator and event date, the views of
//! `fact_video_view`, the like and follow transitions and the shares (distinct `share_id`)
//! and comments of the events.
//!
//! As a DataFusion plan this was five grouped aggregates (two with distinct counts), a union
//! for the creator-days with any activity and four joins: about 1.3 s of a 2M-event rebuild
//! on the 2-core test machine. Here it is one hash map from (creator, date) to a row of
//! counters, a sorted list of (row, user) for the unique viewers and a hash set of (row,
//! share) for the shares. The rules are the SQL rules it replaced (the tests compare it with that SQL;
//! `avg_percent_viewed` may differ from the SQL's float sum in the last bits: it is summed in
//! fixed point, so it does not depend on the order of the rows):
//! - a creator-day has a row when any event or view of the creator falls on it;
//! - `views` … `views_other` count the creator's views of the date (`engaged`, `completed`,
//!   `source`); the averages are over views with an end (null when none);
//! - likes and follows count the transitions that added or removed one;
//! - `engagement_rate` = (likes added − removed + comments + shares) / views, null without
//!   views.

use std::sync::Arc;

use foldhash::{HashSet, HashSetExt};
use reelhouse_lake::deltalake::arrow::array::{
    Array, ArrayRef, AsArray, Date32Array, Float64Array, Int64Array, RecordBatch, StringViewArray,
};
use reelhouse_lake::deltalake::arrow::compute::cast;
use reelhouse_lake::deltalake::arrow::datatypes::{
    DataType, Field, Float64Type, Schema, SchemaRef,
};
use reelhouse_lake::deltalake::arrow::error::ArrowError;

use crate::batch::string_views;
use crate::batch::{bools, column, ints, is_true, opt, Rows};

/// The view sources counted in their own columns, in column order.
const SOURCES: [&str; 7] = [
    "feed", "profile", "share", "search", "hashtag", "audio", "other",
];

/// A row of the table: (creator_id, event date as days since the epoch).
type Key = (i64, Option<i32>);

/// 1.0 in the fixed point that `avg_percent_viewed` is summed in: 2^64. Integer sums do not
/// depend on the order of the views, so the average is the same to the last bit however the
/// events were flushed, compacted or read in parallel (an `f64` sum differed in the last
/// bits between two loads of the same events); a percent keeps every bit above 2^-64, which
/// for a percent viewed (0, or at least 1 ms over a video's duration) is a relative error
/// under 10^-11.
const PERCENT_ONE: f64 = 18_446_744_073_709_551_616.0;

/// `p` in the fixed point of [`PERCENT_ONE`] (scaling by a power of two is exact; the
/// conversion truncates what lies below 2^-64).
fn fixed_percent(p: f64) -> i128 {
    (p * PERCENT_ONE) as i128
}

/// The counters of one row.
#[derive(Default)]
struct Counts {
    views: i64,
    unique_viewers: i64,
    engaged_views: i64,
    watch_time_ms: i64,
    /// Views with an end and a watch time: their number and total watch time.
    ended_watch: (i64, i64),
    /// Views with an end and a percent viewed: their number and summed percent, in fixed
    /// point (see [`PERCENT_ONE`]).
    ended_percent: (i64, i128),
    completions: i64,
    likes_added: i64,
    likes_removed: i64,
    shares: i64,
    comments: i64,
    followers_gained: i64,
    followers_lost: i64,
    by_source: [i64; 7],
}

/// The schema of `agg_creator_daily` (types and nullability as the SQL model wrote it).
pub fn schema() -> SchemaRef {
    let count = |n: &str| Field::new(n, DataType::Int64, false);
    let ratio = |n: &str| Field::new(n, DataType::Float64, true);
    let mut fields = vec![
        Field::new("creator_id", DataType::Int64, true),
        Field::new("date", DataType::Date32, true),
        count("views"),
        count("unique_viewers"),
        count("engaged_views"),
        count("watch_time_ms"),
        ratio("avg_view_duration_ms"),
        ratio("avg_percent_viewed"),
        count("completions"),
        count("likes_added"),
        count("likes_removed"),
        count("shares"),
        count("comments"),
        count("followers_gained"),
        count("followers_lost"),
        ratio("engagement_rate"),
    ];
    fields.extend(SOURCES.iter().map(|s| count(&format!("views_{s}"))));
    Arc::new(Schema::new(fields))
}

fn dates(b: &RecordBatch, name: &str) -> Result<Date32Array, ArrowError> {
    Ok(cast(column(b, name)?, &DataType::Date32)?
        .as_primitive()
        .clone())
}

fn day(a: &Date32Array, i: usize) -> Option<i32> {
    a.is_valid(i).then(|| a.value(i))
}

/// Counts `kind` ("like" or "follow") transitions (`added`/`removed` or `gained`/`lost`).
fn transitions(
    rows: &mut Rows<Key, Counts>,
    batches: &[RecordBatch],
    (plus, minus): (&str, &str),
    count: fn(&mut Counts, bool, bool),
) -> Result<(), ArrowError> {
    for b in batches {
        let (creator, date) = (ints(b, "creator_id")?, dates(b, "event_date")?);
        let (up, down) = (bools(b, plus)?, bools(b, minus)?);
        for i in 0..b.num_rows() {
            let (Some(c), Some(d)) = (opt(&creator, i), day(&date, i)) else {
                continue;
            };
            let (_, row) = rows.of((c, Some(d)));
            count(row, is_true(&up, i), is_true(&down, i));
        }
    }
    Ok(())
}

/// `agg_creator_daily` from the deduplicated events (`ev`), `fact_video_view` and the like
/// and follow transitions, each as the batches of its model. Rows are sorted by date, then
/// creator.
pub fn agg_creator_daily(
    ev: &[RecordBatch],
    views: &[RecordBatch],
    like_transitions: &[RecordBatch],
    follow_transitions: &[RecordBatch],
) -> Result<RecordBatch, ArrowError> {
    batch(counts(ev, views, like_transitions, follow_transitions)?)
}

impl Counts {
    /// Adds the counters of `o` (rows of the same key from another part of the input).
    fn add(&mut self, o: &Counts) {
        self.views += o.views;
        self.unique_viewers += o.unique_viewers;
        self.engaged_views += o.engaged_views;
        self.watch_time_ms = self.watch_time_ms.wrapping_add(o.watch_time_ms);
        self.ended_watch.0 += o.ended_watch.0;
        self.ended_watch.1 = self.ended_watch.1.wrapping_add(o.ended_watch.1);
        self.ended_percent.0 += o.ended_percent.0;
        self.ended_percent.1 += o.ended_percent.1;
        self.completions += o.completions;
        self.likes_added += o.likes_added;
        self.likes_removed += o.likes_removed;
        self.shares += o.shares;
        self.comments += o.comments;
        self.followers_gained += o.followers_gained;
        self.followers_lost += o.followers_lost;
        for (a, b) in self.by_source.iter_mut().zip(o.by_source) {
            *a += b;
        }
    }
}

/// `agg_creator_daily` summed over parts of the input that share no user (the user buckets
/// of a rebuild, see `crate::bucketed`): every counter adds up, unique viewers too (a user's
/// views are all in one part). Distinct shares do not (two users' events may name one
/// `share_id`): the parts' shares are left out, and [`CreatorDaily::add_shares`] counts
/// them over every share event at once.
#[derive(Default)]
pub(crate) struct CreatorDaily {
    rows: Rows<Key, Counts>,
}

impl CreatorDaily {
    /// Adds one part: its events, views and transitions (shares left out).
    pub(crate) fn add(
        &mut self,
        ev: &[RecordBatch],
        views: &[RecordBatch],
        like_transitions: &[RecordBatch],
        follow_transitions: &[RecordBatch],
    ) -> Result<(), ArrowError> {
        let part = counts(ev, views, like_transitions, follow_transitions)?;
        for (key, mut c) in part.keys.into_iter().zip(part.counts) {
            c.shares = 0;
            self.rows.of(key).1.add(&c);
        }
        Ok(())
    }

    /// Counts the shares of every share event of the input (`ev` rows).
    pub(crate) fn add_shares(&mut self, shares: &[RecordBatch]) -> Result<(), ArrowError> {
        let part = counts(shares, &[], &[], &[])?;
        for (key, c) in part.keys.into_iter().zip(part.counts) {
            self.rows.of(key).1.shares += c.shares;
        }
        Ok(())
    }

    /// The table's rows.
    pub(crate) fn finish(self) -> Result<RecordBatch, ArrowError> {
        batch(self.rows)
    }
}

/// The rows of `agg_creator_daily` as counters (see [`agg_creator_daily`]).
fn counts(
    ev: &[RecordBatch],
    views: &[RecordBatch],
    like_transitions: &[RecordBatch],
    follow_transitions: &[RecordBatch],
) -> Result<Rows<Key, Counts>, ArrowError> {
    let mut rows: Rows<Key, Counts> = Rows::default();
    let mut events = Vec::with_capacity(ev.len());
    for b in ev {
        events.push((
            string_views(column(b, "event_type")?)?,
            ints(b, "creator_id")?,
            dates(b, "event_date")?,
            string_views(column(b, "share_id")?)?,
        ));
    }
    let mut shares: HashSet<(usize, &str)> = HashSet::new();
    for (kind, creator, date, share) in &events {
        let kind: &StringViewArray = kind;
        for i in 0..kind.len() {
            let Some(c) = opt(creator, i) else {
                continue;
            };
            let (n, row) = rows.of((c, day(date, i)));
            if day(date, i).is_none() {
                continue; // a creator-day with a null date joins with nothing
            }
            match kind.is_valid(i).then(|| kind.value(i)) {
                Some("comment") => row.comments += 1,
                Some("share") if share.is_valid(i) && shares.insert((n, share.value(i))) => {
                    row.shares += 1
                }
                _ => {}
            }
        }
    }
    // (row, user) of every view with a user: sorted and deduplicated after the pass, which
    // keeps the memory access in order (a hash set of them cost twice the time in `perf`).
    let mut viewers: Vec<(u32, i64)> = Vec::with_capacity(views.iter().map(|b| b.num_rows()).sum());
    for b in views {
        let (creator, user, date) = (
            ints(b, "creator_id")?,
            ints(b, "user_id")?,
            dates(b, "event_date")?,
        );
        let (watch, percent) = (
            ints(b, "watch_ms")?,
            column(b, "percent_viewed")?
                .as_primitive_opt::<Float64Type>()
                .cloned()
                .ok_or_else(|| ArrowError::SchemaError("percent_viewed not Float64".into()))?,
        );
        let (engaged, completed, has_end) = (
            bools(b, "engaged")?,
            bools(b, "completed")?,
            bools(b, "has_end")?,
        );
        let source = string_views(column(b, "source")?)?;
        for i in 0..b.num_rows() {
            let Some(c) = opt(&creator, i) else {
                continue;
            };
            let (n, row) = rows.of((c, day(&date, i)));
            if day(&date, i).is_none() {
                continue;
            }
            row.views += 1;
            row.engaged_views += i64::from(is_true(&engaged, i));
            row.completions += i64::from(is_true(&completed, i));
            let w = opt(&watch, i);
            row.watch_time_ms = row.watch_time_ms.wrapping_add(w.unwrap_or(0));
            if is_true(&has_end, i) {
                if let Some(w) = w {
                    row.ended_watch.0 += 1;
                    row.ended_watch.1 = row.ended_watch.1.wrapping_add(w);
                }
                if percent.is_valid(i) {
                    row.ended_percent.0 += 1;
                    row.ended_percent.1 += fixed_percent(percent.value(i));
                }
            }
            if source.is_valid(i) {
                if let Some(s) = SOURCES.iter().position(|s| *s == source.value(i)) {
                    row.by_source[s] += 1;
                }
            }
            if let Some(u) = opt(&user, i) {
                viewers.push((n as u32, u));
            }
        }
    }
    viewers.sort_unstable();
    viewers.dedup();
    for (n, _) in viewers {
        rows.counts[n as usize].unique_viewers += 1;
    }
    transitions(
        &mut rows,
        like_transitions,
        ("added", "removed"),
        |c, up, down| {
            c.likes_added += i64::from(up);
            c.likes_removed += i64::from(down);
        },
    )?;
    transitions(
        &mut rows,
        follow_transitions,
        ("gained", "lost"),
        |c, up, down| {
            c.followers_gained += i64::from(up);
            c.followers_lost += i64::from(down);
        },
    )?;
    Ok(rows)
}

/// The table's rows from their counters, sorted by date, then creator.
fn batch(rows: Rows<Key, Counts>) -> Result<RecordBatch, ArrowError> {
    let Rows { keys, counts, .. } = rows;
    let mut order: Vec<usize> = (0..keys.len()).collect();
    order.sort_unstable_by_key(|&n| (keys[n].1, keys[n].0));
    let count = |f: &dyn Fn(&Counts) -> i64| -> ArrayRef {
        Arc::new(Int64Array::from_iter_values(
            order.iter().map(|&n| f(&counts[n])),
        ))
    };
    let ratio = |f: fn(&Counts) -> Option<f64>| -> ArrayRef {
        Arc::new(
            order
                .iter()
                .map(|&n| f(&counts[n]))
                .collect::<Float64Array>(),
        )
    };
    let mut columns: Vec<ArrayRef> = vec![
        Arc::new(Int64Array::from_iter_values(
            order.iter().map(|&n| keys[n].0),
        )),
        Arc::new(order.iter().map(|&n| keys[n].1).collect::<Date32Array>()),
        count(&|c| c.views),
        count(&|c| c.unique_viewers),
        count(&|c| c.engaged_views),
        count(&|c| c.watch_time_ms),
        ratio(|c| (c.ended_watch.0 > 0).then(|| c.ended_watch.1 as f64 / c.ended_watch.0 as f64)),
        ratio(|c| {
            (c.ended_percent.0 > 0)
                .then(|| c.ended_percent.1 as f64 / PERCENT_ONE / c.ended_percent.0 as f64)
        }),
        count(&|c| c.completions),
        count(&|c| c.likes_added),
        count(&|c| c.likes_removed),
        count(&|c| c.shares),
        count(&|c| c.comments),
        count(&|c| c.followers_gained),
        count(&|c| c.followers_lost),
        ratio(|c| {
            (c.views > 0).then(|| {
                (c.likes_added - c.likes_removed + c.comments + c.shares) as f64 / c.views as f64
            })
        }),
    ];
    for s in 0..SOURCES.len() {
        columns.push(count(&|c| c.by_source[s]));
    }
    RecordBatch::try_new(schema(), columns)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::batch::testing::{batch_of, ev_session, printed, register};
    use proptest::prelude::*;
    use reelhouse_lake::deltalake::arrow::array::{StringArray, UInt32Array};
    use reelhouse_lake::deltalake::arrow::compute::take_record_batch;
    use reelhouse_lake::deltalake::arrow::datatypes::TimeUnit;
    use reelhouse_lake::deltalake::datafusion::prelude::SessionContext;

    /// The SQL model this module replaced: the reference it must equal row for row.
    const AGG_CREATOR_DAILY_SQL: &str = "
    WITH activity AS (
      SELECT DISTINCT creator_id, event_date AS date FROM ev WHERE creator_id IS NOT NULL
      UNION SELECT DISTINCT creator_id, event_date FROM fact_video_view WHERE creator_id IS NOT NULL),
    views AS (
      SELECT creator_id, event_date AS date,
        count(*) AS views,
        count(DISTINCT user_id) AS unique_viewers,
        count(*) FILTER (WHERE engaged) AS engaged_views,
        coalesce(sum(watch_ms), 0) AS watch_time_ms,
        avg(CAST(watch_ms AS DOUBLE)) FILTER (WHERE has_end) AS avg_view_duration_ms,
        avg(percent_viewed) FILTER (WHERE has_end) AS avg_percent_viewed,
        count(*) FILTER (WHERE completed) AS completions,
        count(*) FILTER (WHERE source = 'feed') AS views_feed,
        count(*) FILTER (WHERE source = 'profile') AS views_profile,
        count(*) FILTER (WHERE source = 'share') AS views_share,
        count(*) FILTER (WHERE source = 'search') AS views_search,
        count(*) FILTER (WHERE source = 'hashtag') AS views_hashtag,
        count(*) FILTER (WHERE source = 'audio') AS views_audio,
        count(*) FILTER (WHERE source = 'other') AS views_other
      FROM fact_video_view GROUP BY creator_id, event_date),
    likes AS (
      SELECT creator_id, event_date AS date,
        count(*) FILTER (WHERE added) AS likes_added, count(*) FILTER (WHERE removed) AS likes_removed
      FROM like_transitions GROUP BY creator_id, event_date),
    eng AS (
      SELECT creator_id, event_date AS date,
        count(DISTINCT share_id) FILTER (WHERE event_type = 'share') AS shares,
        count(*) FILTER (WHERE event_type = 'comment') AS comments
      FROM ev WHERE event_type IN ('share', 'comment') GROUP BY creator_id, event_date),
    follows AS (
      SELECT creator_id, event_date AS date,
        count(*) FILTER (WHERE gained) AS followers_gained, count(*) FILTER (WHERE lost) AS followers_lost
      FROM follow_transitions GROUP BY creator_id, event_date)
    SELECT a.creator_id, a.date,
      coalesce(v.views, 0) AS views,
      coalesce(v.unique_viewers, 0) AS unique_viewers,
      coalesce(v.engaged_views, 0) AS engaged_views,
      coalesce(v.watch_time_ms, 0) AS watch_time_ms,
      v.avg_view_duration_ms,
      v.avg_percent_viewed,
      coalesce(v.completions, 0) AS completions,
      coalesce(l.likes_added, 0) AS likes_added,
      coalesce(l.likes_removed, 0) AS likes_removed,
      coalesce(e.shares, 0) AS shares,
      coalesce(e.comments, 0) AS comments,
      coalesce(f.followers_gained, 0) AS followers_gained,
      coalesce(f.followers_lost, 0) AS followers_lost,
      CASE WHEN coalesce(v.views, 0) > 0 THEN
        CAST(coalesce(l.likes_added, 0) - coalesce(l.likes_removed, 0) + coalesce(e.comments, 0)
             + coalesce(e.shares, 0) AS DOUBLE) / CAST(v.views AS DOUBLE) END AS engagement_rate,
      coalesce(v.views_feed, 0) AS views_feed,
      coalesce(v.views_profile, 0) AS views_profile,
      coalesce(v.views_share, 0) AS views_share,
      coalesce(v.views_search, 0) AS views_search,
      coalesce(v.views_hashtag, 0) AS views_hashtag,
      coalesce(v.views_audio, 0) AS views_audio,
      coalesce(v.views_other, 0) AS views_other
    FROM activity a
    LEFT JOIN views v ON a.creator_id = v.creator_id AND a.date = v.date
    LEFT JOIN likes l ON a.creator_id = l.creator_id AND a.date = l.date
    LEFT JOIN eng e ON a.creator_id = e.creator_id AND a.date = e.date
    LEFT JOIN follows f ON a.creator_id = f.creator_id AND a.date = f.date";

    const KINDS: [&str; 10] = crate::batch::testing::EVENT_TYPES;

    /// One generated event: (kind, view, user, creator, hour, watch, source, share). Small
    /// ranges: keys repeat, views cross dates, users, creators, sources and shares are
    /// sometimes missing.
    type Gen = (
        u8,
        u8,
        Option<u8>,
        Option<u8>,
        u8,
        u16,
        Option<u8>,
        Option<u8>,
    );

    fn events(gen: &[Gen]) -> RecordBatch {
        let s = |v: Vec<Option<String>>| Arc::new(StringArray::from(v)) as ArrayRef;
        let i = |v: Vec<Option<i64>>| Arc::new(Int64Array::from(v)) as ArrayRef;
        let kind = |g: &Gen| KINDS[g.0 as usize % KINDS.len()];
        let n = gen.len();
        let micros = |g: &Gen| i64::from(g.4 % 96) * 3_600_000_000;
        let time = cast(
            &Int64Array::from(gen.iter().map(micros).collect::<Vec<_>>()),
            &DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
        )
        .unwrap();
        let date: Date32Array = gen
            .iter()
            .map(|g| Some((micros(g) / 86_400_000_000) as i32))
            .collect();
        let sources = [
            "feed", "profile", "share", "search", "hashtag", "audio", "other", "x",
        ];
        let (start, end) = (|g: &Gen| kind(g) == KINDS[0], |g: &Gen| kind(g) == KINDS[1]);
        let cols: Vec<(&str, ArrayRef)> = vec![
            (
                "event_id",
                s((0..n).map(|e| Some(format!("e{e:04}"))).collect()),
            ),
            (
                "event_type",
                s(gen.iter().map(|g| Some(kind(g).into())).collect()),
            ),
            ("event_time", time),
            (
                "user_id",
                i(gen.iter().map(|g| g.2.map(|u| i64::from(u % 4))).collect()),
            ),
            ("session_id", s(vec![None; n])),
            ("video_id", i(vec![Some(1); n])),
            (
                "creator_id",
                i(gen.iter().map(|g| g.3.map(|c| i64::from(c % 3))).collect()),
            ),
            (
                "view_id",
                s(gen
                    .iter()
                    .map(|g| (start(g) || end(g)).then(|| format!("v{}", g.1 % 10)))
                    .collect()),
            ),
            (
                "source",
                s(gen
                    .iter()
                    .map(|g| {
                        g.6.filter(|_| start(g))
                            .map(|x| sources[x as usize % 8].into())
                    })
                    .collect()),
            ),
            ("via_share_id", s(vec![None; n])),
            (
                "watch_ms",
                i(gen
                    .iter()
                    .map(|g| end(g).then_some(i64::from(g.5)))
                    .collect()),
            ),
            (
                "video_duration_ms",
                i(gen.iter().map(|g| end(g).then_some(20_000)).collect()),
            ),
            (
                "share_id",
                s(gen
                    .iter()
                    .map(|g| {
                        g.7.filter(|_| kind(g) == "share")
                            .map(|x| format!("sh{}", x % 4))
                    })
                    .collect()),
            ),
            ("event_date", Arc::new(date)),
        ];
        batch_of(cols)
    }

    async fn collect(ctx: &SessionContext, sql: &str) -> Vec<RecordBatch> {
        let df = ctx.sql(sql).await.unwrap();
        let schema = Arc::new(df.schema().as_arrow().clone());
        let mut out = df.collect().await.unwrap();
        out.insert(0, RecordBatch::new_empty(schema));
        out
    }

    /// Every column, the averages rounded (a sum of fractions in another order may differ in
    /// the last bit).
    const ROUNDED: &str = "* EXCEPT (avg_percent_viewed, engagement_rate, avg_view_duration_ms), \
        round(avg_percent_viewed, 9) AS p, round(engagement_rate, 9) AS e, \
        round(avg_view_duration_ms, 6) AS d";

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
                let likes = collect(&ctx, crate::transitions::sql::LIKE_TRANSITIONS).await;
                register(&ctx, "like_transitions", likes.clone());
                let follows = collect(&ctx, crate::transitions::sql::FOLLOW_TRANSITIONS).await;
                register(&ctx, "follow_transitions", follows.clone());
                let want = collect(&ctx, AGG_CREATOR_DAILY_SQL).await;
                let got = agg_creator_daily(&ev, &views, &likes, &follows).unwrap();
                // The views in the opposite order, in two batches: the same rows to the bit
                // (the averages do not depend on the order they are summed in).
                let v = &views[0];
                let back = UInt32Array::from((0..v.num_rows() as u32).rev().collect::<Vec<_>>());
                let back = take_record_batch(v, &back).unwrap();
                let half = back.num_rows() / 2;
                let reversed = [back.slice(0, half), back.slice(half, back.num_rows() - half)];
                let again = agg_creator_daily(&ev, &reversed, &likes, &follows).unwrap();
                prop_assert_eq!(&again, &got);
                for w in &want {
                    prop_assert_eq!(w.schema(), got.schema());
                }
                let want = printed(&ctx, "want", want, ROUNDED, "creator_id, date").await;
                let got = printed(&ctx, "got", vec![got], ROUNDED, "creator_id, date").await;
                prop_assert_eq!(got, want);
                Ok(())
            })?;
        }
    }
}
