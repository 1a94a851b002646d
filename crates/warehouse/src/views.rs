//! `fact_video_view`: view pairing and position in session, computed over the Arrow columns
//! of the deduplicated events (docs/data-model.md).
//!
//! This is the largest model of a rebuild (about 80 % of the events are view starts and ends,
//! and nearly every view is a group of one or two events). As a DataFusion plan it was a
//! two-phase hash aggregate over string keys with thirteen accumulators, then a sort and a
//! window for `position_in_session` (EXPLAIN ANALYZE: about 5.5 s of operator time for 2M
//! events on the 2-core test machine; this code: 0.9–1.5 s). Here it is one pass that
//! keeps, per `view_id`, the row of its start and of its end (a view with a second start or
//! end gets a full accumulator), one pass that writes the columns and numbers the sessions,
//! and one sort by (session number, time) for the positions. The rules are the SQL rules it
//! replaced, value for value (the tests compare it with that SQL):
//! - user, video, creator, session, source and via-share come from the view's start (the
//!   smallest value when a view has several starts); user, video, creator and session fall back
//!   to the smallest value over all its events when it has no start (start lost);
//! - `start_time` is the earliest start, `end_time` the latest end; `watch_ms` and
//!   `video_duration_ms` are the largest over its ends (duplicate ends keep the max);
//! - `percent_viewed` = min(watch / duration, 1), `completed` = watch ≥ 0.98 × duration and
//!   `engaged` = watch ≥ 3000, for views with an end (false without one); `source` is `other`
//!   without a start;
//! - `position_in_session` numbers a session's views from 1 by (start, or end when the start
//!   is lost; then `view_id`); views without a session are numbered as one group, as the SQL
//!   window did;
//! - `event_date` is the UTC date of the start, or of the end when the start is lost.

use crate::batch::{int64s, string_views};
use foldhash::{HashMap, HashMapExt};
use std::sync::Arc;

use reelhouse_lake::deltalake::arrow::array::{
    Array, ArrayRef, BooleanBuilder, Date32Builder, Float64Builder, Int64Array, Int64Builder,
    RecordBatch, StringBuilder, StringViewArray,
};
use reelhouse_lake::deltalake::arrow::compute::cast;
use reelhouse_lake::deltalake::arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use reelhouse_lake::deltalake::arrow::error::ArrowError;

const START: &str = "video_view_start";
const END: &str = "video_view_end";
const DAY_US: i64 = 86_400_000_000;

/// The columns of one input batch that pairing reads.
struct Cols {
    event_type: StringViewArray,
    view_id: StringViewArray,
    session_id: StringViewArray,
    source: StringViewArray,
    via_share_id: StringViewArray,
    user_id: Int64Array,
    video_id: Int64Array,
    creator_id: Int64Array,
    event_time: Int64Array,
    watch_ms: Int64Array,
    video_duration_ms: Int64Array,
}

fn column(b: &RecordBatch, name: &str) -> Result<ArrayRef, ArrowError> {
    b.column_by_name(name)
        .cloned()
        .ok_or_else(|| ArrowError::SchemaError(format!("fact_video_view: no column {name}")))
}

impl Cols {
    fn of(b: &RecordBatch) -> Result<Cols, ArrowError> {
        Ok(Cols {
            event_type: string_views(&column(b, "event_type")?)?,
            view_id: string_views(&column(b, "view_id")?)?,
            session_id: string_views(&column(b, "session_id")?)?,
            source: string_views(&column(b, "source")?)?,
            via_share_id: string_views(&column(b, "via_share_id")?)?,
            user_id: int64s(&column(b, "user_id")?)?,
            video_id: int64s(&column(b, "video_id")?)?,
            creator_id: int64s(&column(b, "creator_id")?)?,
            event_time: int64s(&column(b, "event_time")?)?,
            watch_ms: int64s(&column(b, "watch_ms")?)?,
            video_duration_ms: int64s(&column(b, "video_duration_ms")?)?,
        })
    }
}

fn opt<T>(valid: bool, v: T) -> Option<T> {
    valid.then_some(v)
}

fn int(a: &Int64Array, i: usize) -> Option<i64> {
    opt(a.is_valid(i), a.value(i))
}

fn text(a: &StringViewArray, i: usize) -> Option<&str> {
    opt(a.is_valid(i), a.value(i))
}

/// `min` that ignores missing values, as SQL's `min` does.
fn min_of<T: Ord>(acc: &mut Option<T>, v: Option<T>) {
    if let Some(v) = v {
        if acc.as_ref().is_none_or(|a| v < *a) {
            *acc = Some(v);
        }
    }
}

/// `max` that ignores missing values.
fn max_of<T: Ord>(acc: &mut Option<T>, v: Option<T>) {
    if let Some(v) = v {
        if acc.as_ref().is_none_or(|a| v > *a) {
            *acc = Some(v);
        }
    }
}

/// One view's accumulated values: built for a view with several starts or ends while they
/// are read, and for the others from their one start and one end when written out.
#[derive(Default, Clone, Copy)]
struct View<'a> {
    view_id: Option<&'a str>,
    has_start: bool,
    has_end: bool,
    /// From the starts.
    user: Option<i64>,
    video: Option<i64>,
    creator: Option<i64>,
    session: Option<&'a str>,
    source: Option<&'a str>,
    via_share: Option<&'a str>,
    /// From every event, for a view without a start.
    any_user: Option<i64>,
    any_video: Option<i64>,
    any_creator: Option<i64>,
    any_session: Option<&'a str>,
    start_time: Option<i64>,
    end_time: Option<i64>,
    watch_ms: Option<i64>,
    duration_ms: Option<i64>,
}

impl<'a> View<'a> {
    /// Folds in event `i` of `c` (a start or an end).
    fn apply(&mut self, c: &'a Cols, i: usize, start: bool) {
        let (user, video, creator) = (
            int(&c.user_id, i),
            int(&c.video_id, i),
            int(&c.creator_id, i),
        );
        let session = text(&c.session_id, i);
        let time = int(&c.event_time, i);
        self.view_id = self.view_id.or(text(&c.view_id, i));
        min_of(&mut self.any_user, user);
        min_of(&mut self.any_video, video);
        min_of(&mut self.any_creator, creator);
        min_of(&mut self.any_session, session);
        if start {
            self.has_start = true;
            min_of(&mut self.user, user);
            min_of(&mut self.video, video);
            min_of(&mut self.creator, creator);
            min_of(&mut self.session, session);
            min_of(&mut self.source, text(&c.source, i));
            min_of(&mut self.via_share, text(&c.via_share_id, i));
            min_of(&mut self.start_time, time);
        } else {
            self.has_end = true;
            max_of(&mut self.end_time, time);
            max_of(&mut self.watch_ms, int(&c.watch_ms, i));
            max_of(&mut self.duration_ms, int(&c.video_duration_ms, i));
        }
    }
    fn user(&self) -> Option<i64> {
        self.user.or(self.any_user)
    }
    fn session(&self) -> Option<&'a str> {
        self.session.or(self.any_session)
    }
    /// The time that dates and orders the view.
    fn time(&self) -> Option<i64> {
        self.start_time.or(self.end_time)
    }
}

/// Where a view's events are: its start and its end row (`pack`ed batch and row), or
/// [`Slot::NONE`]; `end == MULTI` when it had a second start or end (see `multi`).
#[derive(Clone, Copy)]
struct Slot {
    start: u64,
    end: u64,
}

impl Slot {
    const NONE: u64 = u64::MAX;
    const MULTI: u64 = u64::MAX - 1;
    const EMPTY: Slot = Slot {
        start: Slot::NONE,
        end: Slot::NONE,
    };
    fn pack(batch: usize, row: usize) -> u64 {
        ((batch as u64) << 32) | row as u64
    }
    /// The (batch, row) that [`Slot::pack`] packed.
    fn unpack(row: u64) -> (usize, usize) {
        ((row >> 32) as usize, (row & 0xffff_ffff) as usize)
    }
    /// The time that dates and orders the view ([`View::time`]) of a slot that is not
    /// [`Slot::MULTI`], read from its rows alone.
    fn time(&self, cols: &[Cols]) -> Option<i64> {
        let at = |row: u64| {
            (row < Slot::MULTI)
                .then(|| {
                    let (b, i) = Slot::unpack(row);
                    int(&cols[b].event_time, i)
                })
                .flatten()
        };
        at(self.start).or_else(|| at(self.end))
    }
    /// The view's values from its (at most one) start and (at most one) end.
    fn view<'a>(&self, cols: &'a [Cols]) -> View<'a> {
        let mut v = View::default();
        for (row, start) in [(self.start, true), (self.end, false)] {
            if row < Slot::MULTI {
                let (b, i) = Slot::unpack(row);
                v.apply(&cols[b], i, start);
            }
        }
        v
    }
}

/// The schema of `fact_video_view` (nullability as the SQL model wrote it).
pub fn schema() -> SchemaRef {
    let ts = DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()));
    let f = |n: &str, t: DataType| Field::new(n, t, true);
    Arc::new(Schema::new(vec![
        f("view_id", DataType::Utf8),
        f("user_id", DataType::Int64),
        f("video_id", DataType::Int64),
        f("creator_id", DataType::Int64),
        f("session_id", DataType::Utf8),
        f("start_time", ts.clone()),
        f("end_time", ts),
        f("watch_ms", DataType::Int64),
        f("video_duration_ms", DataType::Int64),
        f("percent_viewed", DataType::Float64),
        f("completed", DataType::Boolean),
        f("engaged", DataType::Boolean),
        Field::new("source", DataType::Utf8, false),
        f("via_share_id", DataType::Utf8),
        Field::new("position_in_session", DataType::Int64, false),
        f("has_start", DataType::Boolean),
        f("has_end", DataType::Boolean),
        f("event_date", DataType::Date32),
    ]))
}

/// `fact_video_view` from the deduplicated events `ev` (any string and integer encodings).
pub fn fact_video_view(ev: &[RecordBatch]) -> Result<RecordBatch, ArrowError> {
    let cols: Vec<Cols> = ev.iter().map(Cols::of).collect::<Result<_, _>>()?;
    // Most views have a start and an end: about half as many views as view events.
    let view_events: usize = cols
        .iter()
        .map(|c| {
            c.event_type
                .iter()
                .filter(|t| matches!(t, Some(START | END)))
                .count()
        })
        .sum();
    let capacity = view_events / 2 + view_events / 16;
    let mut index: HashMap<Option<&str>, usize> = HashMap::with_capacity(capacity);
    // Per view its start and its end row, 16 bytes (a full accumulator is 280): this pass and
    // the ones after it touch far less memory. A view with a second start or end moves to a
    // full accumulator in `multi` (its slot's end says so).
    let mut slots: Vec<Slot> = Vec::with_capacity(capacity);
    let mut multi: HashMap<usize, View> = HashMap::new();
    let mut last: Option<(Option<&str>, usize)> = None;
    for (b, c) in cols.iter().enumerate() {
        for i in 0..c.event_type.len() {
            let t = c.event_type.value(i);
            let (start, end) = (t == START, t == END);
            if !start && !end {
                continue;
            }
            let id = text(&c.view_id, i);
            // Events are stored sorted by user, session and time, so a view's start and end
            // are usually next to each other: skip the hash lookup then.
            let k = match last {
                Some((prev, k)) if prev == id => k,
                _ => *index.entry(id).or_insert_with(|| {
                    slots.push(Slot::EMPTY);
                    slots.len() - 1
                }),
            };
            last = Some((id, k));
            let slot = &mut slots[k];
            let row = Slot::pack(b, i);
            if slot.end == Slot::MULTI {
                if let Some(v) = multi.get_mut(&k) {
                    v.apply(c, i, start);
                }
            } else if start && slot.start == Slot::NONE {
                slot.start = row;
            } else if end && slot.end == Slot::NONE {
                slot.end = row;
            } else {
                let mut v = slot.view(&cols);
                v.apply(c, i, start);
                multi.insert(k, v);
                *slot = Slot {
                    start: Slot::NONE,
                    end: Slot::MULTI,
                };
            }
        }
    }
    drop(index);
    let view = |k: usize| -> View {
        match slots[k].end {
            Slot::MULTI => multi.get(&k).copied().unwrap_or_default(),
            _ => slots[k].view(&cols),
        }
    };

    // One pass over the views writes their columns and their ranks for the position in
    // session: numbering within each session by (time, view_id), nulls last. Sessions are
    // numbered first (a hash lookup only when a view's session differs from the previous
    // view's: views arrive grouped by session), so the sort compares integers and compares
    // `view_id`s only on equal times; comparing the session strings was a third of this
    // model's time. Views without a session form one group, as in the SQL window.
    // (session number, (time missing, time), (view_id missing, view_id), output row).
    type Rank<'a> = (u32, (bool, Option<i64>), (bool, Option<&'a str>), usize);
    let n = slots.len();
    let written = date_order(n, |k| match slots[k].end {
        Slot::MULTI => multi.get(&k).and_then(View::time),
        _ => slots[k].time(&cols),
    });
    let mut order: Vec<Rank> = Vec::with_capacity(n);
    let mut numbers: HashMap<&str, u32> = HashMap::new();
    let mut prev: Option<(&str, u32)> = None;
    let mut view_id = StringBuilder::with_capacity(n, n * 24);
    let mut session = StringBuilder::with_capacity(n, n * 24);
    let mut source = StringBuilder::with_capacity(n, n * 8);
    let mut via_share = StringBuilder::with_capacity(n, n * 4);
    let [mut user, mut video, mut creator, mut start_time, mut end_time, mut watch, mut duration] =
        std::array::from_fn(|_| Int64Builder::with_capacity(n));
    let mut percent = Float64Builder::with_capacity(n);
    let [mut completed, mut engaged, mut has_start, mut has_end] =
        std::array::from_fn(|_| BooleanBuilder::with_capacity(n));
    let mut date = Date32Builder::with_capacity(n);
    for (row, &k) in written.iter().enumerate() {
        let v = &view(k as usize);
        let group = match v.session() {
            None => u32::MAX,
            Some(s) => match prev {
                Some((p, g)) if p == s => g,
                _ => {
                    let next = numbers.len() as u32;
                    let g = *numbers.entry(s).or_insert(next);
                    prev = Some((s, g));
                    g
                }
            },
        };
        let t = v.time();
        order.push((
            group,
            (t.is_none(), t),
            (v.view_id.is_none(), v.view_id),
            row,
        ));
        view_id.append_option(v.view_id);
        user.append_option(v.user());
        video.append_option(v.video.or(v.any_video));
        creator.append_option(v.creator.or(v.any_creator));
        session.append_option(v.session());
        start_time.append_option(v.start_time);
        end_time.append_option(v.end_time);
        watch.append_option(v.watch_ms);
        duration.append_option(v.duration_ms);
        // With an end, watch and duration are set (validation requires both on every end).
        let ended = match (v.has_end, v.watch_ms, v.duration_ms) {
            (false, _, _) => Some(None),
            (true, Some(w), Some(d)) => Some(Some((w, d))),
            (true, _, _) => None,
        };
        percent.append_option(ended.flatten().map(|(w, d)| (w as f64 / d as f64).min(1.0)));
        completed.append_option(ended.map(|e| e.is_some_and(|(w, d)| w as f64 >= 0.98 * d as f64)));
        engaged.append_option(ended.map(|e| e.is_some_and(|(w, _)| w >= 3000)));
        source.append_value(v.source.unwrap_or("other"));
        via_share.append_option(v.via_share);
        has_start.append_value(v.has_start);
        has_end.append_value(v.has_end);
        date.append_option(t.map(|t| t.div_euclid(DAY_US) as i32));
    }
    // Sessions are numbered 0.. in order, views without one are u32::MAX (last).
    let sessions = numbers.len();
    drop(numbers);
    let order = crate::batch::bucket_sort(order, sessions + 1, |r| (r.0 as usize).min(sessions));
    let mut position = vec![0i64; n];
    let mut run: Option<(u32, i64)> = None;
    for (session, _, _, k) in &order {
        let p = match run {
            Some((s, p)) if s == *session => p + 1,
            _ => 1,
        };
        run = Some((*session, p));
        position[*k] = p;
    }
    drop(order);
    drop(written);
    let ts = |mut b: Int64Builder| -> Result<ArrayRef, ArrowError> {
        cast(
            &b.finish(),
            &DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
        )
    };
    let columns: Vec<ArrayRef> = vec![
        Arc::new(view_id.finish()),
        Arc::new(user.finish()),
        Arc::new(video.finish()),
        Arc::new(creator.finish()),
        Arc::new(session.finish()),
        ts(start_time)?,
        ts(end_time)?,
        Arc::new(watch.finish()),
        Arc::new(duration.finish()),
        Arc::new(percent.finish()),
        Arc::new(completed.finish()),
        Arc::new(engaged.finish()),
        Arc::new(source.finish()),
        Arc::new(via_share.finish()),
        Arc::new(Int64Array::from(position)),
        Arc::new(has_start.finish()),
        Arc::new(has_end.finish()),
        Arc::new(date.finish()),
    ];
    RecordBatch::try_new(schema(), columns)
}

/// The order in which to write `n` views: by the date of `time(k)` (views without a time
/// last), and in the order found (`k`) within a date. The output then holds each date's rows
/// side by side, and the writer slices it by date instead of copying each date's rows out
/// (`rewrite::parts` in the lake crate). Events are read date by date, so the views usually
/// come in date order already and nothing moves.
fn date_order(n: usize, time: impl Fn(usize) -> Option<i64>) -> Vec<u32> {
    let days: Vec<Option<i32>> = (0..n)
        .map(|k| time(k).map(|t| t.div_euclid(DAY_US) as i32))
        .collect();
    let key = |d: Option<i32>| (d.is_none(), d);
    if days.windows(2).all(|w| key(w[0]) <= key(w[1])) {
        return (0..n as u32).collect();
    }
    let first = days.iter().flatten().min().copied().unwrap_or(0);
    let last = days.iter().flatten().max().copied().unwrap_or(0);
    // Days since the first, views without a time after the last day.
    let span = (last as i64 - first as i64 + 1) as usize;
    let bucket = |d: Option<i32>| d.map_or(span, |d| (d as i64 - first as i64) as usize);
    let items: Vec<(usize, u32)> = days
        .iter()
        .enumerate()
        .map(|(k, d)| (bucket(*d), k as u32))
        .collect();
    let items = if span <= 1 << 20 {
        crate::batch::bucket_sort(items, span + 1, |i| i.0)
    } else {
        // Times millennia apart (possible only in hand-made input): a comparison sort.
        let mut items = items;
        items.sort_unstable();
        items
    };
    items.into_iter().map(|(_, k)| k).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use reelhouse_lake::deltalake::arrow::array::{AsArray, StringArray};
    use reelhouse_lake::deltalake::arrow::datatypes::Date32Type;
    use reelhouse_lake::deltalake::datafusion::prelude::SessionContext;

    use crate::batch::testing::{printed, register, two_batches};

    /// The SQL model this module replaced: the reference it must equal row for row.
    const FACT_VIDEO_VIEW_SQL: &str = "
    WITH v AS (
      SELECT view_id,
        coalesce(min(CASE WHEN event_type = 'video_view_start' THEN user_id END), min(user_id)) AS user_id,
        coalesce(min(CASE WHEN event_type = 'video_view_start' THEN video_id END), min(video_id)) AS video_id,
        coalesce(min(CASE WHEN event_type = 'video_view_start' THEN creator_id END), min(creator_id)) AS creator_id,
        coalesce(min(CASE WHEN event_type = 'video_view_start' THEN session_id END), min(session_id)) AS session_id,
        min(CASE WHEN event_type = 'video_view_start' THEN event_time END) AS start_time,
        max(CASE WHEN event_type = 'video_view_end' THEN event_time END) AS end_time,
        max(CASE WHEN event_type = 'video_view_end' THEN watch_ms END) AS watch_ms,
        max(CASE WHEN event_type = 'video_view_end' THEN video_duration_ms END) AS video_duration_ms,
        min(CASE WHEN event_type = 'video_view_start' THEN source END) AS source,
        min(CASE WHEN event_type = 'video_view_start' THEN via_share_id END) AS via_share_id,
        bool_or(event_type = 'video_view_start') AS has_start,
        bool_or(event_type = 'video_view_end') AS has_end
      FROM ev
      WHERE event_type IN ('video_view_start', 'video_view_end')
      GROUP BY view_id)
    SELECT view_id, user_id, video_id, creator_id, session_id, start_time, end_time,
      watch_ms, video_duration_ms,
      CASE WHEN has_end THEN least(CAST(watch_ms AS DOUBLE) / CAST(video_duration_ms AS DOUBLE), 1.0) END
        AS percent_viewed,
      has_end AND watch_ms >= 0.98 * video_duration_ms AS completed,
      has_end AND watch_ms >= 3000 AS engaged,
      coalesce(source, 'other') AS source,
      via_share_id,
      CAST(row_number() OVER (PARTITION BY session_id
           ORDER BY coalesce(start_time, end_time), view_id) AS BIGINT) AS position_in_session,
      has_start, has_end,
      CAST(coalesce(start_time, end_time) AS DATE) AS event_date
    FROM v";

    /// One generated view event: (is start, view, session, user, video, creator, time, watch,
    /// duration, source, via share). Small ranges, so views get several starts or ends, ties in
    /// time, sessions shared and missing.
    type Gen = (
        (bool, Option<u8>, Option<u8>, u8, u8, u8),
        (u8, u16, u16, Option<u8>, Option<u8>),
    );

    fn batch(events: &[Gen]) -> RecordBatch {
        let s = |v: Vec<Option<String>>| Arc::new(StringArray::from(v)) as ArrayRef;
        let i = |v: Vec<Option<i64>>| Arc::new(Int64Array::from(v)) as ArrayRef;
        let sources = ["feed", "profile", "share"];
        let mut types = vec![Some("like".to_string())];
        let mut view = vec![None];
        let mut session = vec![Some("s0".to_string())];
        let (mut user, mut video, mut creator) = (vec![Some(1)], vec![Some(1)], vec![Some(1)]);
        let mut time = vec![Some(0)];
        let (mut watch, mut dur, mut source, mut via) =
            (vec![None], vec![None], vec![None], vec![None]);
        for ((a0, a1, a2, a3, a4, a5), (b6, b7, b8, b9, b10)) in events {
            let e = (*a0, *a1, *a2, *a3, *a4, *a5, *b6, *b7, *b8, *b9, *b10);
            types.push(Some(if e.0 { START } else { END }.to_string()));
            view.push(e.1.map(|v| format!("v{v}")));
            session.push(e.2.map(|v| format!("s{v}")));
            user.push(Some(e.3 as i64));
            video.push(Some(e.4 as i64));
            creator.push(Some(e.5 as i64));
            // Seven hours apart: six times over two days, so views land on either date.
            time.push(Some(e.6 as i64 * 7 * 3_600_000_000));
            // Steps of 100 ms, so the boundaries are hit: engaged at 3,000 ms, completed at
            // 98 % (4,900 of 5,000), more watched than the duration.
            watch.push((!e.0).then_some((e.7 % 64) as i64 * 100));
            dur.push((!e.0).then_some((e.8 % 64) as i64 * 100 + 100));
            source.push(
                e.9.filter(|_| e.0)
                    .map(|x| sources[x as usize % 3].to_string()),
            );
            via.push(e.10.filter(|_| e.0).map(|x| format!("sh{x}")));
        }
        let ts = cast(
            &Int64Array::from(time),
            &DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
        )
        .unwrap();
        let f = |n: &str, t: &ArrayRef| Field::new(n, t.data_type().clone(), true);
        let cols: Vec<(&str, ArrayRef)> = vec![
            ("event_type", s(types)),
            ("view_id", s(view)),
            ("session_id", s(session)),
            ("source", s(source)),
            ("via_share_id", s(via)),
            ("user_id", i(user)),
            ("video_id", i(video)),
            ("creator_id", i(creator)),
            ("event_time", ts),
            ("watch_ms", i(watch)),
            ("video_duration_ms", i(dur)),
        ];
        let schema = Arc::new(Schema::new(
            cols.iter().map(|(n, c)| f(n, c)).collect::<Vec<_>>(),
        ));
        RecordBatch::try_new(schema, cols.into_iter().map(|(_, c)| c).collect()).unwrap()
    }

    /// `date_order` sorts by day, views without a time last, keeping the found order within
    /// a day, with dates close together (counting sort) and millennia apart (comparison sort).
    #[test]
    fn date_order_keeps_the_found_order_within_a_day() {
        for spread in [1i64, 400_000] {
            // (view, time): a pseudo-random mix of 9 days, some views without a time.
            let times: Vec<Option<i64>> = (0..400i64)
                .map(|k| (k % 17 != 5).then(|| (k * 7919 % 9) * spread * DAY_US + k % 3))
                .collect();
            let got = date_order(times.len(), |k| times[k]);
            let mut want: Vec<u32> = (0..times.len() as u32).collect();
            want.sort_by_key(|&k| {
                let d = times[k as usize].map(|t| t.div_euclid(DAY_US));
                (d.is_none(), d)
            });
            assert_eq!(got, want, "spread {spread}");
        }
        // In order already: nothing moves.
        let times: Vec<Option<i64>> = (0..50).map(|k| Some(k / 10 * DAY_US)).collect();
        assert_eq!(date_order(50, |k| times[k]), (0..50).collect::<Vec<u32>>());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn equals_the_sql_model(events in proptest::collection::vec(any::<Gen>().prop_map(|mut g| {
            g.0.1 = g.0.1.map(|v| v % 12);
            g.0.2 = g.0.2.map(|v| v % 4);
            g.0.3 %= 3;
            g.1.0 %= 6;
            g
        }), 0..60), split in 0usize..60) {
            let rt = tokio::runtime::Runtime::new().unwrap();
            rt.block_on(async {
                let b = batch(&events);
                // Two input batches, as DataFusion hands them out.
                let parts = two_batches(&b, split);
                let ctx = SessionContext::new();
                register(&ctx, "ev", parts.clone());
                let order = "view_id NULLS FIRST";
                let want = ctx.sql(FACT_VIDEO_VIEW_SQL).await.unwrap().collect().await.unwrap();
                let want = printed(&ctx, "want", want, "*", order).await;
                let got = fact_video_view(&parts).unwrap();
                // Rows in date order, views without a date last.
                let dates = got.column_by_name("event_date").unwrap().as_primitive::<Date32Type>();
                let dates: Vec<_> = dates.iter().map(|d| (d.is_none(), d)).collect();
                prop_assert!(dates.is_sorted(), "rows not in date order: {:?}", dates);
                let got = printed(&ctx, "got", vec![got], "*", order).await;
                prop_assert_eq!(got, want);
                Ok(())
            })?;
        }
    }
}
