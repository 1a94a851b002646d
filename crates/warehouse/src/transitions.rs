//! Like and follow transitions and state (docs/data-model.md), from the deduplicated events (`ev`).
//!
//! Both replay each key, (user, video) for likes and (user, creator) for follows, in
//! (`event_time`, `event_id`) order (ascending, nulls last):
//! - a *transition* row per like/unlike (follow/unfollow) event: `added` (`gained`) when it is
//!   a like after nothing or after an unlike; `removed` (`lost`) when it is an unlike after a
//!   like, NULL when an unlike comes first (as SQL's `prev = 'like'` with no previous event);
//! - the *state* is the key's last event (last writer wins by (`event_time`, `event_id`)).
//!
//! As DataFusion window plans (`lag` and `row_number` over the key) these took about 0.8 s of
//! a 2M-event rebuild on the 2-core test machine; here they are one sort of the matching
//! rows' positions each. The rules are the SQL rules they replaced, value for value (the
//! tests compare them with that SQL); the columns passed through keep `ev`'s types.

use std::cmp::Ordering;
use std::sync::Arc;

use reelhouse_lake::deltalake::arrow::array::{
    Array, ArrayRef, BooleanArray, Int64Array, RecordBatch, StringViewArray,
};
use reelhouse_lake::deltalake::arrow::compute::interleave;
use reelhouse_lake::deltalake::arrow::datatypes::{DataType, Field, Schema};
use reelhouse_lake::deltalake::arrow::error::ArrowError;

use crate::batch::{column, opt};
use crate::batch::{int64s, string_views};

/// One kind of relation: its event types and the key column beside `user_id`.
pub struct Relation {
    /// The event that sets it (`like`) and the one that clears it (`unlike`).
    pub on: &'static str,
    pub off: &'static str,
    /// The key besides the user: `video_id` or `creator_id`.
    pub target: &'static str,
    /// Names of the transition flags (`added`, `removed`) and of the state flag (`liked`).
    pub up: &'static str,
    pub down: &'static str,
    pub state: &'static str,
    /// Columns of `ev` each transition row carries, and each state row, before the flags.
    pub transition_columns: &'static [&'static str],
    pub state_columns: &'static [&'static str],
}

pub const LIKES: Relation = Relation {
    on: "like",
    off: "unlike",
    target: "video_id",
    up: "added",
    down: "removed",
    state: "liked",
    transition_columns: &[
        "user_id",
        "video_id",
        "creator_id",
        "event_time",
        "event_date",
        "event_type",
    ],
    state_columns: &["user_id", "video_id", "creator_id"],
};

pub const FOLLOWS: Relation = Relation {
    on: "follow_creator",
    off: "unfollow_creator",
    target: "creator_id",
    up: "gained",
    down: "lost",
    state: "following",
    transition_columns: &[
        "user_id",
        "creator_id",
        "event_time",
        "event_date",
        "event_type",
    ],
    state_columns: &["user_id", "creator_id"],
};

/// One event of the relation: its position in `ev` (batch, row), key, order and type.
struct Event<'a> {
    at: (usize, usize),
    key: (Option<i64>, Option<i64>),
    time: Option<i64>,
    id: Option<&'a str>,
    on: bool,
}

impl Event<'_> {
    /// Key, then (`event_time`, `event_id`) ascending with nulls last.
    fn cmp(&self, o: &Self) -> Ordering {
        self.key
            .cmp(&o.key)
            .then_with(|| nulls_last(self.time, o.time))
            .then_with(|| nulls_last(self.id, o.id))
    }
}

fn nulls_last<T: Ord>(a: Option<T>, b: Option<T>) -> Ordering {
    (a.is_none(), a).cmp(&(b.is_none(), b))
}

/// The columns of `ev` one relation reads.
struct Cols {
    event_type: StringViewArray,
    event_id: StringViewArray,
    user: Int64Array,
    target: Int64Array,
    time: Int64Array,
}

/// The relation's events of `ev` in replay order, with the columns they point into.
fn replay<'a>(r: &Relation, cols: &'a [Cols]) -> Vec<Event<'a>> {
    let mut out = Vec::new();
    for (b, c) in cols.iter().enumerate() {
        for i in 0..c.event_type.len() {
            if c.event_type.is_null(i) {
                continue;
            }
            let t = c.event_type.value(i);
            let on = t == r.on;
            if !on && t != r.off {
                continue;
            }
            out.push(Event {
                at: (b, i),
                key: (opt(&c.user, i), opt(&c.target, i)),
                time: opt(&c.time, i),
                id: c.event_id.is_valid(i).then(|| c.event_id.value(i)),
                on,
            });
        }
    }
    out.sort_unstable_by(Event::cmp);
    out
}

fn read(ev: &[RecordBatch], r: &Relation) -> Result<Vec<Cols>, ArrowError> {
    ev.iter()
        .map(|b| {
            Ok(Cols {
                event_type: string_views(column(b, "event_type")?)?,
                event_id: string_views(column(b, "event_id")?)?,
                user: int64s(column(b, "user_id")?)?,
                target: int64s(column(b, r.target)?)?,
                time: int64s(column(b, "event_time")?)?,
            })
        })
        .collect()
}

/// The named columns of `ev` at `rows` (batch, row), with their fields.
fn gather(
    ev: &[RecordBatch],
    names: &[&str],
    rows: &[(usize, usize)],
) -> Result<(Vec<Field>, Vec<ArrayRef>), ArrowError> {
    let mut fields = Vec::with_capacity(names.len());
    let mut arrays = Vec::with_capacity(names.len());
    for name in names {
        let field = match ev.first() {
            Some(b) => b.schema().field_with_name(name)?.clone(),
            None => return Err(ArrowError::SchemaError("no batches of ev".into())),
        };
        let parts = ev
            .iter()
            .map(|b| column(b, name).map(|c| c.as_ref()))
            .collect::<Result<Vec<&dyn Array>, _>>()?;
        arrays.push(interleave(&parts, rows)?);
        fields.push(field);
    }
    Ok((fields, arrays))
}

/// Whether `event_type = '…'` can be NULL: when `ev`'s `event_type` is nullable.
fn type_nullable(ev: &[RecordBatch]) -> bool {
    ev.first()
        .and_then(|b| b.schema().field_with_name("event_type").ok().cloned())
        .is_none_or(|f| f.is_nullable())
}

/// The relation's transitions: one row per event of its two types.
pub fn transitions(ev: &[RecordBatch], r: &Relation) -> Result<RecordBatch, ArrowError> {
    let cols = read(ev, r)?;
    let events = replay(r, &cols);
    let mut up = Vec::with_capacity(events.len());
    let mut down = Vec::with_capacity(events.len());
    for (n, e) in events.iter().enumerate() {
        let prev = n
            .checked_sub(1)
            .map(|p| &events[p])
            .filter(|p| p.key == e.key)
            .map(|p| p.on);
        // `type = on AND (prev IS NULL OR prev = off)`; `type = off AND prev = on`.
        up.push(Some(e.on && prev != Some(true)));
        down.push(if e.on { Some(false) } else { prev });
    }
    let rows: Vec<(usize, usize)> = events.iter().map(|e| e.at).collect();
    let (mut fields, mut arrays) = gather(ev, r.transition_columns, &rows)?;
    fields.push(Field::new(r.up, DataType::Boolean, true));
    fields.push(Field::new(r.down, DataType::Boolean, true));
    arrays.push(Arc::new(BooleanArray::from(up)));
    arrays.push(Arc::new(BooleanArray::from(down)));
    RecordBatch::try_new(Arc::new(Schema::new(fields)), arrays)
}

/// The relation's state: per key, its last event's type (`on` or not) and time.
pub fn state(ev: &[RecordBatch], r: &Relation) -> Result<RecordBatch, ArrowError> {
    let cols = read(ev, r)?;
    let events = replay(r, &cols);
    let last: Vec<&Event> = events
        .iter()
        .enumerate()
        .filter(|(n, e)| events.get(n + 1).is_none_or(|next| next.key != e.key))
        .map(|(_, e)| e)
        .collect();
    let rows: Vec<(usize, usize)> = last.iter().map(|e| e.at).collect();
    let (mut fields, mut arrays) = gather(ev, r.state_columns, &rows)?;
    fields.push(Field::new(r.state, DataType::Boolean, type_nullable(ev)));
    arrays.push(Arc::new(BooleanArray::from(
        last.iter().map(|e| e.on).collect::<Vec<_>>(),
    )));
    let (time_field, time) = gather(ev, &["event_time"], &rows)?;
    fields.push(time_field[0].clone().with_name("updated_at"));
    arrays.extend(time);
    RecordBatch::try_new(Arc::new(Schema::new(fields)), arrays)
}

/// The SQL these functions replaced: the reference of their tests (and of the tests of the
/// models that read transitions).
#[cfg(test)]
pub(crate) mod sql {
    /// Like transitions: replaying each (user, video) in (event_time, event_id) order from "not
    /// liked", a like adds when not liked, an unlike removes when liked; the rest change nothing.
    pub(crate) const LIKE_TRANSITIONS: &str = "
    SELECT user_id, video_id, creator_id, event_time, event_date, event_type,
      event_type = 'like' AND (prev IS NULL OR prev = 'unlike') AS added,
      event_type = 'unlike' AND prev = 'like' AS removed
    FROM (
      SELECT *, lag(event_type) OVER (PARTITION BY user_id, video_id ORDER BY event_time, event_id) AS prev
      FROM ev WHERE event_type IN ('like', 'unlike'))";

    pub(crate) const FOLLOW_TRANSITIONS: &str = "
    SELECT user_id, creator_id, event_time, event_date, event_type,
      event_type = 'follow_creator' AND (prev IS NULL OR prev = 'unfollow_creator') AS gained,
      event_type = 'unfollow_creator' AND prev = 'follow_creator' AS lost
    FROM (
      SELECT *, lag(event_type) OVER (PARTITION BY user_id, creator_id ORDER BY event_time, event_id) AS prev
      FROM ev WHERE event_type IN ('follow_creator', 'unfollow_creator'))";

    /// Last writer wins by (event_time, event_id).
    pub(crate) const LIKE_STATE: &str = "
    SELECT user_id, video_id, creator_id, event_type = 'like' AS liked, event_time AS updated_at
    FROM (
      SELECT *, row_number() OVER (PARTITION BY user_id, video_id ORDER BY event_time DESC, event_id DESC) AS r
      FROM ev WHERE event_type IN ('like', 'unlike'))
    WHERE r = 1";

    pub(crate) const FOLLOW_STATE: &str = "
    SELECT user_id, creator_id, event_type = 'follow_creator' AS following, event_time AS updated_at
    FROM (
      SELECT *, row_number() OVER (PARTITION BY user_id, creator_id ORDER BY event_time DESC, event_id DESC) AS r
      FROM ev WHERE event_type IN ('follow_creator', 'unfollow_creator'))
    WHERE r = 1";
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use reelhouse_lake::deltalake::arrow::array::StringArray;
    use reelhouse_lake::deltalake::arrow::compute::cast;
    use reelhouse_lake::deltalake::arrow::datatypes::TimeUnit;

    use crate::batch::testing::{batch_of, ev_session, printed};

    const KINDS: [&str; 6] = [
        "like",
        "unlike",
        "follow_creator",
        "unfollow_creator",
        "comment",
        "session_start",
    ];

    /// One generated event: (kind, user, target, time, id). Small ranges, so keys repeat,
    /// times tie (the id decides) and users or targets are sometimes missing.
    type Gen = (u8, Option<u8>, Option<u8>, u8, u8);

    fn events(gen: &[Gen]) -> RecordBatch {
        let s = |v: Vec<Option<String>>| Arc::new(StringArray::from(v)) as ArrayRef;
        let i = |v: Vec<Option<i64>>| Arc::new(Int64Array::from(v)) as ArrayRef;
        let time = cast(
            &Int64Array::from(
                gen.iter()
                    .map(|g| i64::from(g.3 % 6) * 7_200_000_000)
                    .collect::<Vec<_>>(),
            ),
            &DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
        )
        .unwrap();
        let date = cast(&time, &DataType::Date32).unwrap();
        let target = |g: &Gen| g.2.map(|t| i64::from(t % 3));
        batch_of(vec![
            (
                "event_id",
                s(gen
                    .iter()
                    .enumerate()
                    .map(|(n, g)| Some(format!("{:02}-{n}", g.4 % 30)))
                    .collect()),
            ),
            (
                "event_type",
                s(gen
                    .iter()
                    .map(|g| Some(KINDS[g.0 as usize % KINDS.len()].into()))
                    .collect()),
            ),
            ("event_time", time),
            (
                "user_id",
                i(gen.iter().map(|g| g.1.map(|u| i64::from(u % 3))).collect()),
            ),
            ("video_id", i(gen.iter().map(target).collect())),
            (
                "creator_id",
                i(gen.iter().map(|g| target(g).map(|t| t + 10)).collect()),
            ),
            ("event_date", date),
        ])
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn equals_the_sql_models(
            gen in proptest::collection::vec(any::<Gen>(), 1..80),
            split in 0usize..80,
        ) {
            let rt = tokio::runtime::Runtime::new().unwrap();
            rt.block_on(async {
                // Two input batches, as DataFusion hands them out.
                let (ev, ctx) = ev_session(&events(&gen), split);
                for (sql, r, is_state) in [
                    (sql::LIKE_TRANSITIONS, &LIKES, false),
                    (sql::FOLLOW_TRANSITIONS, &FOLLOWS, false),
                    (sql::LIKE_STATE, &LIKES, true),
                    (sql::FOLLOW_STATE, &FOLLOWS, true),
                ] {
                    let want = ctx.sql(sql).await.unwrap().collect().await.unwrap();
                    let got = if is_state { state(&ev, r) } else { transitions(&ev, r) }.unwrap();
                    for w in &want {
                        prop_assert_eq!(w.schema(), got.schema());
                    }
                    // Every column, in order: rows that tie on the key still sort alike.
                    let all: Vec<String> =
                        (1..=got.num_columns()).map(|n| n.to_string()).collect();
                    let all = all.join(", ");
                    let want = printed(&ctx, "want", want, "*", &all).await;
                    let got = printed(&ctx, "got", vec![got], "*", &all).await;
                    let _ = ctx.deregister_table("want");
                    let _ = ctx.deregister_table("got");
                    prop_assert_eq!(got, want, "{}", sql);
                }
                Ok(())
            })?;
        }
    }
}
