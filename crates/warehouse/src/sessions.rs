//! `fact_session` (docs/data-model.md): one row per client `session_id`, from its events and its views.
//!
//! As a DataFusion plan this was a grouped aggregate over the session id strings (with an
//! ordered `first_value` for the user), a second one over `fact_video_view` with a distinct
//! count, and a join: about 1.5 s of a 2M-event rebuild on the 2-core test machine. Here it
//! is one pass over the events into a row per session (events are stored sorted by user,
//! session and time, so the hash lookup is skipped while the session stays the same) and one
//! over the views. The rules are the SQL rules it replaced, value for value (the tests
//! compare it with that SQL):
//! - `user_id` is the user of the session's first event by (`event_time`, `event_id`);
//! - `start_time` is the earliest `session_start`, or the earliest event without one;
//!   the end is the latest `session_end`, or the latest event without one, capped at
//!   `start_time` + 24 h; `duration_ms` is the difference;
//! - `views`, `distinct_creators` and `total_watch_ms` come from the session's rows in
//!   `fact_video_view`; `likes`, `shares` and `comments` count its events of those types;
//! - `ended_by` is `session_end` when it has one, `timeout` when its last event is at least
//!   30 minutes before `now`, else `open`; `event_date` is the UTC date of `start_time`.

use std::sync::Arc;

use foldhash::{HashMap, HashMapExt};
use reelhouse_lake::deltalake::arrow::array::{
    Array, ArrayRef, BooleanArray, Date32Array, Int64Array, RecordBatch, StringArray,
    StringViewArray, TimestampMicrosecondArray,
};
use reelhouse_lake::deltalake::arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use reelhouse_lake::deltalake::arrow::error::ArrowError;

use crate::batch::{column, opt};
use crate::batch::{int64s, string_views};
use crate::{SESSION_CAP_MS, SESSION_TIMEOUT_MS};

const DAY_US: i64 = 86_400_000_000;

/// One session's row while its events are read.
struct Session<'a> {
    id: &'a str,
    /// (`event_time`, `event_id`) of the first event so far, nulls last, and its user.
    first: (Option<i64>, Option<&'a str>),
    user: Option<i64>,
    has_start: bool,
    has_end: bool,
    first_start: Option<i64>,
    first_event: Option<i64>,
    last_end: Option<i64>,
    last_event: Option<i64>,
    likes: i64,
    shares: i64,
    comments: i64,
    views: i64,
    creators: i64,
    watch_ms: i64,
}

impl<'a> Session<'a> {
    fn new(id: &'a str) -> Self {
        Session {
            id,
            first: (None, None),
            user: None,
            has_start: false,
            has_end: false,
            first_start: None,
            first_event: None,
            last_end: None,
            last_event: None,
            likes: 0,
            shares: 0,
            comments: 0,
            views: 0,
            creators: 0,
            watch_ms: 0,
        }
    }
}

fn min(a: Option<i64>, b: Option<i64>) -> Option<i64> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        _ => a.or(b),
    }
}

fn max(a: Option<i64>, b: Option<i64>) -> Option<i64> {
    a.max(b)
}

/// Sort key of `ORDER BY event_time, event_id` (ascending, nulls last).
fn order_key((time, id): (Option<i64>, Option<&str>)) -> (bool, Option<i64>, bool, Option<&str>) {
    (time.is_none(), time, id.is_none(), id)
}

/// The schema of `fact_session` (types and nullability as the SQL model wrote it).
pub fn schema() -> SchemaRef {
    let ts = DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()));
    let f = |n: &str, t: DataType| Field::new(n, t, true);
    let count = |n: &str| Field::new(n, DataType::Int64, false);
    Arc::new(Schema::new(vec![
        f("session_id", DataType::Utf8),
        f("user_id", DataType::Int64),
        f("start_time", ts.clone()),
        f("end_time", ts),
        f("duration_ms", DataType::Int64),
        count("views"),
        count("distinct_creators"),
        count("total_watch_ms"),
        count("likes"),
        count("shares"),
        count("comments"),
        Field::new("ended_by", DataType::Utf8, false),
        f("has_start", DataType::Boolean),
        f("has_end", DataType::Boolean),
        f("event_date", DataType::Date32),
    ]))
}

fn text(a: &StringViewArray, i: usize) -> Option<&str> {
    a.is_valid(i).then(|| a.value(i))
}

/// The columns of one batch of events that sessions read.
struct Events {
    event_type: StringViewArray,
    session: StringViewArray,
    event_id: StringViewArray,
    user: Int64Array,
    time: Int64Array,
}

/// The columns of one batch of views that sessions read.
struct Views {
    session: StringViewArray,
    creator: Int64Array,
    watch: Int64Array,
}

/// `fact_session` from the deduplicated events (`ev`) and `fact_video_view`, as the batches
/// of those models; `now_ms` decides which sessions have timed out.
pub fn fact_session(
    ev: &[RecordBatch],
    views: &[RecordBatch],
    now_ms: i64,
) -> Result<RecordBatch, ArrowError> {
    let events = ev
        .iter()
        .map(|b| {
            Ok(Events {
                event_type: string_views(column(b, "event_type")?)?,
                session: string_views(column(b, "session_id")?)?,
                event_id: string_views(column(b, "event_id")?)?,
                user: int64s(column(b, "user_id")?)?,
                time: int64s(column(b, "event_time")?)?,
            })
        })
        .collect::<Result<Vec<_>, ArrowError>>()?;
    let views = views
        .iter()
        .map(|b| {
            Ok(Views {
                session: string_views(column(b, "session_id")?)?,
                creator: int64s(column(b, "creator_id")?)?,
                watch: int64s(column(b, "watch_ms")?)?,
            })
        })
        .collect::<Result<Vec<_>, ArrowError>>()?;
    let mut index: HashMap<&str, usize> = HashMap::new();
    let mut sessions: Vec<Session> = Vec::new();
    let mut last: Option<(&str, usize)> = None;
    for e in &events {
        for i in 0..e.session.len() {
            let Some(id) = text(&e.session, i) else {
                continue;
            };
            let n = match last {
                Some((prev, n)) if prev == id => n,
                _ => *index.entry(id).or_insert_with(|| {
                    sessions.push(Session::new(id));
                    sessions.len() - 1
                }),
            };
            last = Some((id, n));
            let s = &mut sessions[n];
            let time = opt(&e.time, i);
            let at = (time, text(&e.event_id, i));
            if s.first == (None, None) || order_key(at) < order_key(s.first) {
                s.first = at;
                s.user = opt(&e.user, i);
            }
            s.first_event = min(s.first_event, time);
            s.last_event = max(s.last_event, time);
            match text(&e.event_type, i) {
                Some("session_start") => {
                    s.has_start = true;
                    s.first_start = min(s.first_start, time);
                }
                Some("session_end") => {
                    s.has_end = true;
                    s.last_end = max(s.last_end, time);
                }
                Some("like") => s.likes += 1,
                Some("share") => s.shares += 1,
                Some("comment") => s.comments += 1,
                _ => {}
            }
        }
    }
    // (session, creator) of every view with a creator, sorted and deduplicated after the pass
    // (in memory order; a hash set of them took twice the time). Views come grouped by
    // session, so the lookup is skipped while the session stays the same.
    let mut creators: Vec<(u32, i64)> =
        Vec::with_capacity(views.iter().map(|v| v.session.len()).sum());
    let mut last: Option<(&str, usize)> = None;
    for v in &views {
        for i in 0..v.session.len() {
            let Some(id) = text(&v.session, i) else {
                continue;
            };
            let n = match last {
                Some((prev, n)) if prev == id => n,
                _ => match index.get(id) {
                    Some(n) => *n,
                    None => continue,
                },
            };
            last = Some((id, n));
            let s = &mut sessions[n];
            s.views += 1;
            s.watch_ms = s.watch_ms.wrapping_add(opt(&v.watch, i).unwrap_or(0));
            if let Some(c) = opt(&v.creator, i) {
                creators.push((n as u32, c));
            }
        }
    }
    creators.sort_unstable();
    creators.dedup();
    for (n, _) in creators {
        sessions[n as usize].creators += 1;
    }
    let cap = SESSION_CAP_MS * 1000;
    let (mut start, mut end, mut duration) = (Vec::new(), Vec::new(), Vec::new());
    let (mut ended_by, mut date) = (Vec::new(), Vec::new());
    for s in &sessions {
        let from = if s.has_start {
            s.first_start
        } else {
            s.first_event
        };
        let raw_end = if s.has_end { s.last_end } else { s.last_event };
        let to = match (from, raw_end) {
            (Some(f), Some(r)) if r > f + cap => Some(f + cap),
            _ => raw_end,
        };
        start.push(from);
        end.push(to);
        duration.push(from.zip(to).map(|(f, t)| (t - f) / 1000));
        ended_by.push(if s.has_end {
            "session_end"
        } else if s
            .last_event
            .is_some_and(|t| t / 1000 + SESSION_TIMEOUT_MS <= now_ms)
        {
            "timeout"
        } else {
            "open"
        });
        date.push(from.map(|f| f.div_euclid(DAY_US) as i32));
    }
    let count = |f: fn(&Session) -> i64| -> ArrayRef {
        Arc::new(Int64Array::from_iter_values(sessions.iter().map(f)))
    };
    let flag = |f: fn(&Session) -> bool| -> ArrayRef {
        Arc::new(
            sessions
                .iter()
                .map(|s| Some(f(s)))
                .collect::<BooleanArray>(),
        )
    };
    RecordBatch::try_new(
        schema(),
        vec![
            Arc::new(StringArray::from_iter_values(sessions.iter().map(|s| s.id))),
            Arc::new(sessions.iter().map(|s| s.user).collect::<Int64Array>()),
            Arc::new(TimestampMicrosecondArray::from(start).with_timezone("UTC")),
            Arc::new(TimestampMicrosecondArray::from(end).with_timezone("UTC")),
            Arc::new(Int64Array::from(duration)),
            count(|s| s.views),
            count(|s| s.creators),
            count(|s| s.watch_ms),
            count(|s| s.likes),
            count(|s| s.shares),
            count(|s| s.comments),
            Arc::new(StringArray::from(ended_by)),
            flag(|s| s.has_start),
            flag(|s| s.has_end),
            Arc::new(Date32Array::from(date)),
        ],
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::batch::testing::{batch_of, ev_session, printed, register};
    use proptest::prelude::*;
    use reelhouse_lake::deltalake::arrow::compute::cast;

    /// The SQL model this module replaced: the reference it must equal row for row.
    const FACT_SESSION_SQL: &str = "
    WITH s AS (
      SELECT session_id,
        first_value(user_id ORDER BY event_time, event_id) AS user_id,
        bool_or(event_type = 'session_start') AS has_start,
        bool_or(event_type = 'session_end') AS has_end,
        coalesce(min(CASE WHEN event_type = 'session_start' THEN event_time END), min(event_time)) AS start_time,
        coalesce(max(CASE WHEN event_type = 'session_end' THEN event_time END), max(event_time)) AS raw_end,
        max(event_time) AS last_event_time,
        count(*) FILTER (WHERE event_type = 'like') AS likes,
        count(*) FILTER (WHERE event_type = 'share') AS shares,
        count(*) FILTER (WHERE event_type = 'comment') AS comments
      FROM ev
      WHERE session_id IS NOT NULL
      GROUP BY session_id),
    w AS (
      SELECT session_id, count(*) AS views, count(DISTINCT creator_id) AS distinct_creators,
        coalesce(sum(watch_ms), 0) AS total_watch_ms
      FROM fact_video_view WHERE session_id IS NOT NULL GROUP BY session_id)
    SELECT s.session_id, s.user_id, s.start_time,
      CASE WHEN s.raw_end > s.start_time + INTERVAL '24 hours' THEN s.start_time + INTERVAL '24 hours'
           ELSE s.raw_end END AS end_time,
      CAST((CAST(CASE WHEN s.raw_end > s.start_time + INTERVAL '24 hours' THEN s.start_time + INTERVAL '24 hours'
           ELSE s.raw_end END AS BIGINT) - CAST(s.start_time AS BIGINT)) / 1000 AS BIGINT) AS duration_ms,
      coalesce(w.views, 0) AS views,
      coalesce(w.distinct_creators, 0) AS distinct_creators,
      coalesce(w.total_watch_ms, 0) AS total_watch_ms,
      s.likes, s.shares, s.comments,
      CASE WHEN s.has_end THEN 'session_end'
           WHEN CAST(s.last_event_time AS BIGINT) / 1000 + 1800000 <= $now_ms THEN 'timeout'
           ELSE 'open' END AS ended_by,
      s.has_start, s.has_end,
      CAST(s.start_time AS DATE) AS event_date
    FROM s LEFT JOIN w ON s.session_id = w.session_id";

    const KINDS: [&str; 8] = [
        "session_start",
        "session_end",
        "video_view_start",
        "video_view_end",
        "like",
        "share",
        "comment",
        "follow_creator",
    ];

    /// One generated event: (kind, session, user, creator, view, hour, id, watch). Small
    /// ranges: sessions repeat, ties in time are broken by the id, sessions last past 24 h,
    /// users, creators and sessions are sometimes missing.
    type Gen = (u8, Option<u8>, Option<u8>, Option<u8>, u8, u8, u8, u16);

    fn events(gen: &[Gen]) -> RecordBatch {
        let s = |v: Vec<Option<String>>| Arc::new(StringArray::from(v)) as ArrayRef;
        let i = |v: Vec<Option<i64>>| Arc::new(Int64Array::from(v)) as ArrayRef;
        let kind = |g: &Gen| KINDS[g.0 as usize % KINDS.len()];
        let n = gen.len();
        let time = cast(
            &Int64Array::from(
                gen.iter()
                    .map(|g| i64::from(g.5 % 60) * 1_800_000_000)
                    .collect::<Vec<_>>(),
            ),
            &DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
        )
        .unwrap();
        let is_end = |g: &Gen| kind(g) == "video_view_end";
        let cols: Vec<(&str, ArrayRef)> = vec![
            (
                "event_id",
                s(gen
                    .iter()
                    .enumerate()
                    .map(|(n, g)| Some(format!("{:02}-{n}", g.6 % 40)))
                    .collect()),
            ),
            (
                "event_type",
                s(gen.iter().map(|g| Some(kind(g).into())).collect()),
            ),
            ("event_time", time),
            (
                "user_id",
                i(gen.iter().map(|g| g.2.map(|u| i64::from(u % 3))).collect()),
            ),
            (
                "session_id",
                s(gen
                    .iter()
                    .map(|g| g.1.map(|x| format!("s{}", x % 5)))
                    .collect()),
            ),
            ("video_id", i(vec![Some(1); n])),
            (
                "creator_id",
                i(gen.iter().map(|g| g.3.map(|c| i64::from(c % 3))).collect()),
            ),
            (
                "view_id",
                s(gen
                    .iter()
                    .map(|g| {
                        kind(g)
                            .starts_with("video")
                            .then(|| format!("v{}", g.4 % 8))
                    })
                    .collect()),
            ),
            ("source", s(vec![None; n])),
            ("via_share_id", s(vec![None; n])),
            (
                "watch_ms",
                i(gen
                    .iter()
                    .map(|g| is_end(g).then_some(i64::from(g.7)))
                    .collect()),
            ),
            (
                "video_duration_ms",
                i(gen.iter().map(|g| is_end(g).then_some(5000)).collect()),
            ),
        ];
        batch_of(cols)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn equals_the_sql_model(
            gen in proptest::collection::vec(any::<Gen>(), 1..80),
            split in 0usize..80,
            now_hours in 0i64..40,
        ) {
            let rt = tokio::runtime::Runtime::new().unwrap();
            rt.block_on(async {
                // Two input batches, as DataFusion hands them out.
                let (ev, ctx) = ev_session(&events(&gen), split);
                let views = vec![crate::views::fact_video_view(&ev).unwrap()];
                register(&ctx, "fact_video_view", views.clone());
                let now_ms = now_hours * 3_600_000;
                let sql = FACT_SESSION_SQL.replace("$now_ms", &now_ms.to_string());
                let want = ctx.sql(&sql).await.unwrap().collect().await.unwrap();
                let got = fact_session(&ev, &views, now_ms).unwrap();
                for w in &want {
                    prop_assert_eq!(w.schema(), got.schema());
                }
                let want = printed(&ctx, "want", want, "*", "session_id").await;
                let got = printed(&ctx, "got", vec![got], "*", "session_id").await;
                prop_assert_eq!(got, want);
                Ok(())
            })?;
        }
    }
}
