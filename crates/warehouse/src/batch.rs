//! Helpers shared by the models computed in Rust ([`crate::sessions`], [`crate::hourly`],
//! [`crate::creator`]): typed columns of a batch by name, and rows of counters found by key.
//! Errors name the column; the caller's `Error::Model` names the model.

use std::hash::Hash;

use foldhash::HashMap;
use reelhouse_lake::deltalake::arrow::array::{
    Array, ArrayRef, AsArray, BooleanArray, Int64Array, RecordBatch, StringViewArray,
};
use reelhouse_lake::deltalake::arrow::compute::{cast, concat_batches, filter_record_batch};
use reelhouse_lake::deltalake::arrow::datatypes::{DataType, Int64Type};
use reelhouse_lake::deltalake::arrow::error::ArrowError;
use std::sync::Arc;

/// A column as string views, whatever string type it has (no copy when it is views already).
pub(crate) fn string_views(a: &ArrayRef) -> Result<StringViewArray, ArrowError> {
    Ok(cast(a, &DataType::Utf8View)?.as_string_view().clone())
}

/// A column as Int64 values, whatever integer type it has (timestamps as their raw µs).
pub(crate) fn int64s(a: &ArrayRef) -> Result<Int64Array, ArrowError> {
    Ok(cast(a, &DataType::Int64)?
        .as_primitive::<Int64Type>()
        .clone())
}

/// `items` sorted (as `sort_unstable` sorts them), first by `bucket` with a counting sort,
/// then each bucket on its own. `bucket` must agree with the order: a smaller bucket for a
/// smaller item, never more than `buckets - 1`. Distributing by a dense first key (a
/// session number, an hour) and sorting the small buckets in cache took the place of one
/// comparison sort of all the items, the largest sorts of a full rebuild.
pub(crate) fn bucket_sort<T: Copy + Ord>(
    items: Vec<T>,
    buckets: usize,
    bucket: impl Fn(&T) -> usize,
) -> Vec<T> {
    let Some(&first) = items.first() else {
        return items;
    };
    let mut starts = vec![0usize; buckets + 1];
    for item in &items {
        starts[bucket(item) + 1] += 1;
    }
    for b in 0..buckets {
        starts[b + 1] += starts[b];
    }
    let mut next = starts.clone();
    let mut sorted = vec![first; items.len()];
    for item in items {
        let b = bucket(&item);
        sorted[next[b]] = item;
        next[b] += 1;
    }
    for w in starts.windows(2) {
        sorted[w[0]..w[1]].sort_unstable();
    }
    sorted
}

/// The column `name` of `b`.
pub(crate) fn column<'a>(b: &'a RecordBatch, name: &str) -> Result<&'a ArrayRef, ArrowError> {
    b.column_by_name(name)
        .ok_or_else(|| ArrowError::SchemaError(format!("no column {name}")))
}

/// The column `name` as Int64 values, whatever integer type it has.
pub(crate) fn ints(b: &RecordBatch, name: &str) -> Result<Int64Array, ArrowError> {
    int64s(column(b, name)?)
}

/// The Boolean column `name`.
pub(crate) fn bools(b: &RecordBatch, name: &str) -> Result<BooleanArray, ArrowError> {
    column(b, name)?
        .as_boolean_opt()
        .cloned()
        .ok_or_else(|| ArrowError::SchemaError(format!("column {name} is not Boolean")))
}

pub(crate) fn opt(a: &Int64Array, i: usize) -> Option<i64> {
    a.is_valid(i).then(|| a.value(i))
}

/// Whether row `i` is true (null counts as false, as in a SQL `FILTER (WHERE …)`).
pub(crate) fn is_true(a: &BooleanArray, i: usize) -> bool {
    a.is_valid(i) && a.value(i)
}

/// The rows of a grouped model found so far, in the order first seen: their keys and counters.
pub(crate) struct Rows<K, C> {
    index: HashMap<K, usize>,
    /// The last key asked for and its row: consecutive input rows often share a key (events
    /// are stored sorted by user, session and time), and then the lookup is skipped.
    last: Option<(K, usize)>,
    pub(crate) keys: Vec<K>,
    pub(crate) counts: Vec<C>,
}

impl<K, C> Default for Rows<K, C> {
    fn default() -> Self {
        Rows {
            index: HashMap::default(),
            last: None,
            keys: Vec::new(),
            counts: Vec::new(),
        }
    }
}

impl<K: Hash + Eq + Copy, C: Default> Rows<K, C> {
    /// The row of `key` (added when new) and its counters.
    pub(crate) fn of(&mut self, key: K) -> (usize, &mut C) {
        let n = match self.last {
            Some((k, n)) if k == key => n,
            _ => {
                let n = *self.index.entry(key).or_insert_with(|| {
                    self.keys.push(key);
                    self.counts.push(C::default());
                    self.keys.len() - 1
                });
                self.last = Some((key, n));
                n
            }
        };
        (n, &mut self.counts[n])
    }
}

/// The rows of `ev` whose `event_type` is one of `kinds`, with `columns` in that order, as
/// one batch: `SELECT columns FROM ev WHERE event_type IN (kinds)` without planning a query
/// (that SQL, for `fact_engagement` and `fact_follow`, is the reference in the tests).
pub(crate) fn events_of_kinds(
    ev: &[RecordBatch],
    kinds: &[&str],
    columns: &[&str],
) -> Result<RecordBatch, ArrowError> {
    let schema = ev
        .first()
        .ok_or_else(|| ArrowError::SchemaError("no batch of events".into()))?
        .schema();
    let keep: Vec<usize> = columns
        .iter()
        .map(|c| schema.index_of(c))
        .collect::<Result<_, _>>()?;
    let mut out = Vec::with_capacity(ev.len());
    for b in ev {
        let kind = string_views(column(b, "event_type")?)?;
        let mask: BooleanArray = (0..kind.len())
            .map(|i| Some(kind.is_valid(i) && kinds.contains(&kind.value(i))))
            .collect();
        out.push(filter_record_batch(&b.project(&keep)?, &mask)?);
    }
    concat_batches(&Arc::new(schema.project(&keep)?), &out)
}

/// Scaffolding shared by the property tests that compare a Rust model with its SQL.
#[cfg(test)]
pub(crate) mod testing {
    use std::sync::Arc;

    use reelhouse_lake::deltalake::arrow::array::{ArrayRef, RecordBatch};
    use reelhouse_lake::deltalake::arrow::datatypes::{Field, Schema};
    use reelhouse_lake::deltalake::arrow::util::pretty::pretty_format_batches;
    use reelhouse_lake::deltalake::datafusion::datasource::MemTable;
    use reelhouse_lake::deltalake::datafusion::prelude::SessionContext;

    /// Every event type of docs/event-contract.md, the view start and end first.
    pub(crate) const EVENT_TYPES: [&str; 10] = [
        "video_view_start",
        "video_view_end",
        "like",
        "unlike",
        "share",
        "comment",
        "follow_creator",
        "unfollow_creator",
        "session_start",
        "session_end",
    ];

    /// A batch of the named columns, every field nullable.
    pub(crate) fn batch_of(cols: Vec<(&str, ArrayRef)>) -> RecordBatch {
        let fields: Vec<Field> = cols
            .iter()
            .map(|(n, c)| Field::new(*n, c.data_type().clone(), true))
            .collect();
        let columns = cols.into_iter().map(|(_, c)| c).collect();
        RecordBatch::try_new(Arc::new(Schema::new(fields)), columns).unwrap()
    }

    /// Registers `b` (at least one batch) as the in-memory table `name`.
    pub(crate) fn register(ctx: &SessionContext, name: &str, b: Vec<RecordBatch>) {
        let t = MemTable::try_new(b[0].schema(), vec![b]).unwrap();
        ctx.register_table(name, Arc::new(t)).unwrap();
    }

    /// `b` as two batches split at `at` (see [`two_batches`]), and a session holding them as
    /// the table `ev`: where every property test of a model over the events starts.
    pub(crate) fn ev_session(b: &RecordBatch, at: usize) -> (Vec<RecordBatch>, SessionContext) {
        let ev = two_batches(b, at);
        let ctx = SessionContext::new();
        register(&ctx, "ev", ev.clone());
        (ev, ctx)
    }

    /// `b` as two batches split at `at` (clamped), as DataFusion hands a table out in parts.
    pub(crate) fn two_batches(b: &RecordBatch, at: usize) -> Vec<RecordBatch> {
        let at = at.min(b.num_rows());
        vec![b.slice(0, at), b.slice(at, b.num_rows() - at)]
    }

    /// The rows of `b`, registered as `name`, printed by `SELECT {select} FROM name ORDER BY
    /// {order}`: a model's output and its SQL's compare equal when these strings do.
    pub(crate) async fn printed(
        ctx: &SessionContext,
        name: &str,
        b: Vec<RecordBatch>,
        select: &str,
        order: &str,
    ) -> String {
        if b.iter().all(|b| b.num_rows() == 0) {
            return "no rows".into();
        }
        register(ctx, name, b);
        let sql = format!("SELECT {select} FROM {name} ORDER BY {order}");
        let out = ctx.sql(&sql).await.unwrap().collect().await.unwrap();
        pretty_format_batches(&out).unwrap().to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::bucket_sort;
    use proptest::prelude::*;

    proptest! {
        /// A bucket sort by a key that agrees with the order equals a comparison sort,
        /// including an empty input, one bucket, and buckets left empty.
        #[test]
        fn bucket_sort_equals_sort_unstable(
            items in proptest::collection::vec((0u8..20, any::<u16>(), any::<bool>()), 0..300),
        ) {
            let mut want = items.clone();
            want.sort_unstable();
            prop_assert_eq!(bucket_sort(items.clone(), 20, |i| i.0 as usize), want.clone());
            prop_assert_eq!(bucket_sort(items, 1, |_| 0), want);
        }
    }
}
