//! Rewrites of derived tables (whole, or some dates of a date-partitioned one), written file
//! by file and committed by hand.
//!
//! A full rebuild replaces every derived table, an incremental one some dates of each. delta-rs's `write` with `SaveMode::Overwrite`
//! does this through a DataFusion plan: the input is hash-repartitioned by its partition
//! values over the writers, each writer sorts and copies its rows again by partition, keeps a
//! Parquet writer open for every date until its input ends, and checks every batch against
//! the table's invariants. For a table that already exists with the same columns, this module
//! does the same job with less: the rows are grouped by date once (one `take` per date), each
//! date is encoded by a delta-rs [`RecordBatchWriter`] on one of [`streams`] tasks and closed
//! before the next (its `Add` action carries the same statistics delta-rs writes), and one
//! commit adds the new files and removes every current one (or those of the replaced dates),
//! with the same operation (`WRITE`, mode `Overwrite`, the replace-where predicate) the
//! delta-rs write records. Readers see the old version or the new one. Tables that are new,
//! or whose columns changed, still go through delta-rs's write, which creates the table or
//! replaces its schema; so do date-scoped rewrites of tables not partitioned by the date.

use std::collections::{BTreeMap, HashMap, HashSet};

use deltalake::arrow::array::{Array, AsArray, RecordBatch, UInt32Array};
use deltalake::arrow::compute::{cast, concat_batches, take_record_batch};
use deltalake::arrow::datatypes::{DataType, Date32Type, Field, Schema, SchemaRef};
use deltalake::arrow::row::{RowConverter, SortField};
use deltalake::kernel::scalars::ScalarExt;
use deltalake::kernel::transaction::CommitBuilder;
use deltalake::kernel::Action;
use deltalake::parquet::file::properties::WriterProperties;
use deltalake::protocol::{DeltaOperation, SaveMode};
use deltalake::writer::{DeltaWriter, RecordBatchWriter, WriteMode};
use deltalake::DeltaTable;

use xxhash_rust::xxh3::xxh3_128;

use crate::Result;

/// Whether `table` can take rows of `schema` as they are: the same column names and types
/// in the same order, and the same partition columns (a single `Date32` column or none).
pub(crate) fn fits(table: &DeltaTable, schema: &SchemaRef, partition_columns: &[&str]) -> bool {
    let Ok(state) = table.snapshot() else {
        return false;
    };
    let current = state.metadata().partition_columns();
    if current.len() != partition_columns.len()
        || current.iter().zip(partition_columns).any(|(a, b)| a != b)
        || partition_columns.len() > 1
    {
        return false;
    }
    if let Some(col) = partition_columns.first() {
        match schema.field_with_name(col) {
            Ok(f) if f.data_type() == &DataType::Date32 => {}
            _ => return false,
        }
    }
    let theirs = state.snapshot().arrow_schema();
    theirs.fields().len() == schema.fields().len()
        && theirs
            .fields()
            .iter()
            .zip(schema.fields())
            .all(|(a, b)| a.name() == b.name() && same_type(a.data_type(), b.data_type()))
}

/// Whether a column of type `ours` is stored as `theirs` without a schema change: the same
/// type, or strings in another Arrow layout (Delta has one string type; models that pass
/// event columns through carry DataFusion's `Utf8View`), which [`to_table_types`] casts.
fn same_type(theirs: &DataType, ours: &DataType) -> bool {
    let string =
        |t: &DataType| matches!(t, DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View);
    theirs == ours || (string(theirs) && string(ours))
}

/// `batches` with every column cast to the type `table` stores it as (see [`same_type`]).
fn to_table_types(
    table: &DeltaTable,
    schema: SchemaRef,
    batches: Vec<RecordBatch>,
) -> Result<(SchemaRef, Vec<RecordBatch>)> {
    let theirs = table.snapshot()?.snapshot().arrow_schema();
    if theirs
        .fields()
        .iter()
        .zip(schema.fields())
        .all(|(a, b)| a.data_type() == b.data_type())
    {
        return Ok((schema, batches));
    }
    let fields: Vec<Field> = theirs
        .fields()
        .iter()
        .zip(schema.fields())
        .map(|(a, b)| b.as_ref().clone().with_data_type(a.data_type().clone()))
        .collect();
    let cast_schema: SchemaRef = std::sync::Arc::new(Schema::new(fields));
    let batches = batches
        .into_iter()
        .map(|b| {
            let columns = b
                .columns()
                .iter()
                .zip(cast_schema.fields())
                .map(|(c, f)| cast(c, f.data_type()))
                .collect::<std::result::Result<Vec<_>, _>>()?;
            Ok(RecordBatch::try_new(cast_schema.clone(), columns)?)
        })
        .collect::<Result<Vec<_>>>()?;
    Ok((cast_schema, batches))
}

/// The rows of `batches` as one batch per partition value (ascending dates), or, for an
/// unpartitioned table, as up to `n` slices of about equal size.
fn parts(
    schema: &SchemaRef,
    batches: &[RecordBatch],
    partition: Option<&str>,
    n: usize,
) -> Result<Vec<RecordBatch>> {
    let all = concat_batches(schema, batches)?;
    if all.num_rows() == 0 {
        return Ok(Vec::new());
    }
    let Some(col) = partition else {
        let per = all.num_rows().div_ceil(n.max(1));
        return Ok((0..all.num_rows())
            .step_by(per)
            .map(|at| all.slice(at, per.min(all.num_rows() - at)))
            .collect());
    };
    let dates = all
        .column_by_name(col)
        .expect("checked by fits")
        .as_primitive::<Date32Type>();
    let mut rows: BTreeMap<Option<i32>, Vec<u32>> = BTreeMap::new();
    for i in 0..dates.len() {
        let key = dates.is_valid(i).then(|| dates.value(i));
        rows.entry(key).or_default().push(i as u32);
    }
    if rows.len() == 1 {
        return Ok(vec![all]);
    }
    rows.into_values()
        .map(|r| Ok(take_record_batch(&all, &UInt32Array::from(r))?))
        .collect()
}

/// The tag on every file written here that records its rows' [`fingerprint`].
pub const ROWS_TAG: &str = "reelhouse.rows";

/// What a file's (or, unpartitioned, the table's: all of `batches`) rows are, independent of
/// their order and of how they are split into batches: the version of this scheme, the files
/// written for them, the row count and the wrapping sum of each row's 128-bit xxh3 hash in
/// arrow's row format (which encodes every type, null or not, the same way each time). Two equal fingerprints mean the same rows, barring a 128-bit
/// collision. A change to the row format or to the writer's settings must bump the version
/// (`v1`), so that files written before are rewritten once.
fn fingerprint(batches: &[RecordBatch], files: usize) -> Result<String> {
    let Some(first) = batches.first() else {
        return Ok(format!("v1:{files}:0:{:032x}", 0));
    };
    let fields = first
        .schema()
        .fields()
        .iter()
        .map(|f| SortField::new(f.data_type().clone()))
        .collect();
    let converter = RowConverter::new(fields)?;
    let (mut sum, mut rows): (u128, usize) = (0, 0);
    for batch in batches {
        rows += batch.num_rows();
        // Slices bound the row-format copy's memory.
        for at in (0..batch.num_rows()).step_by(FINGERPRINT_SLICE) {
            let slice = batch.slice(at, FINGERPRINT_SLICE.min(batch.num_rows() - at));
            for row in converter.convert_columns(slice.columns())?.iter() {
                sum = sum.wrapping_add(xxh3_128(row.as_ref()));
            }
        }
    }
    Ok(format!("v1:{files}:{rows}:{sum:032x}"))
}

/// Rows per row-format conversion in [`fingerprint`].
const FINGERPRINT_SLICE: usize = 1 << 16;

/// The row count a [`fingerprint`] records.
fn fingerprint_rows(tag: &str) -> Option<usize> {
    tag.split(':').nth(2)?.parse().ok()
}

/// The partition value (`YYYY-MM-DD`, or `None` for null) of a part's rows.
fn partition_value(part: &RecordBatch, col: &str) -> Option<String> {
    let dates = part
        .column_by_name(col)
        .expect("checked by fits")
        .as_primitive::<Date32Type>();
    dates
        .is_valid(0)
        .then(|| crate::date_string(dates.value(0)))
}

/// The current files of a rewrite's scope, by partition value (one key, `None`, for an
/// unpartitioned table): how many there are, their rows, and the fingerprint they all carry
/// (`None` when one has none, or a deletion vector).
#[derive(Default)]
struct Current {
    files: usize,
    rows: usize,
    tag: Option<Option<String>>,
}

impl Current {
    /// Whether these files hold exactly the rows of `fingerprint` as written by one rewrite.
    fn holds(&self, fingerprint: &str) -> bool {
        matches!(&self.tag, Some(Some(t)) if t == fingerprint)
            && fingerprint.split(':').nth(1) == Some(&self.files.to_string())
            && fingerprint_rows(fingerprint) == Some(self.rows)
    }
}

/// Replaces the content of `table` (which [`fits`] the rows) with `batches` in one commit and
/// returns the new version's handle: all of it, or with `dates` only the files of those
/// partition values (days since 1970-01-01; every row of `batches` must be on one of them),
/// recorded with the same `IN` predicate a delta-rs replace-where records.
///
/// Files whose rows do not change are kept: each file written here is tagged ([`ROWS_TAG`])
/// with the [`fingerprint`] of its date's rows (of the whole table's, unpartitioned), and a
/// date whose one current file carries the fingerprint of its new rows is neither written nor
/// removed. When nothing changes, nothing is committed and `table` is returned as it is.
pub(crate) async fn overwrite(
    table: DeltaTable,
    schema: SchemaRef,
    batches: Vec<RecordBatch>,
    partition_columns: &[&str],
    dates: Option<&[i32]>,
    props: WriterProperties,
    streams: usize,
) -> Result<DeltaTable> {
    let partition = partition_columns.first().map(|c| c.to_string());
    let replaced = dates.map(|days| {
        let col = partition
            .as_ref()
            .expect("replace_dates rewrites only tables partitioned by the date");
        (
            crate::dates_predicate(col, days),
            days.iter()
                .map(|d| crate::date_string(*d))
                .collect::<HashSet<_>>(),
        )
    });
    let (schema, batches) = to_table_types(&table, schema, batches)?;
    let state = table.snapshot()?;
    let in_scope = |values: &HashMap<String, Option<String>>| match (&replaced, &partition) {
        (Some((_, days)), Some(col)) => values
            .get(col)
            .and_then(|v| v.as_ref())
            .is_some_and(|v| days.contains(v)),
        _ => true,
    };
    // The files in scope, by partition value.
    let mut current: HashMap<Option<String>, Current> = HashMap::new();
    let mut in_scope_files = Vec::new();
    for f in state.log_data().into_iter() {
        let values = f.partition_values_map();
        if !in_scope(&values) {
            continue;
        }
        let key = partition
            .as_ref()
            .and_then(|col| values.get(col).cloned().flatten());
        #[allow(deprecated)] // the only public way to a file's tags in deltalake 1.1
        let tag = (f.deletion_vector_descriptor().is_none())
            .then(|| {
                f.add_action()
                    .tags
                    .and_then(|t| t.get(ROWS_TAG).cloned().flatten())
            })
            .flatten();
        let c = current.entry(key.clone()).or_default();
        c.files += 1;
        c.rows += f.num_records().unwrap_or(0);
        c.tag = match c.tag.take() {
            None => Some(tag),
            Some(t) if t == tag => Some(t),
            Some(_) => Some(None),
        };
        in_scope_files.push((key, f.remove_action(true)));
    }
    let parts = parts(&schema, &batches, partition.as_deref(), streams)?;
    drop(batches);
    // Unpartitioned: one fingerprint for the whole table, kept or written as a whole.
    let whole = match &partition {
        Some(_) => None,
        None => {
            let fp = fingerprint(&parts, parts.len())?;
            if current.get(&None).is_some_and(|c| c.holds(&fp)) {
                return Ok(table);
            }
            Some(fp)
        }
    };
    // Largest parts first, each to the stream with the fewest rows so far.
    let mut order: Vec<usize> = (0..parts.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(parts[i].num_rows()));
    let mut shares: Vec<(usize, Vec<RecordBatch>)> = vec![(0, Vec::new()); streams.max(1)];
    let mut parts: Vec<Option<RecordBatch>> = parts.into_iter().map(Some).collect();
    for i in order {
        let share = shares.iter_mut().min_by_key(|s| s.0).expect("one stream");
        let part = parts[i].take().expect("each part once");
        share.0 += part.num_rows();
        share.1.push(part);
    }
    let current = std::sync::Arc::new(current);
    let mut tasks = tokio::task::JoinSet::new();
    for (_, share) in shares.into_iter().filter(|s| !s.1.is_empty()) {
        let mut writer =
            RecordBatchWriter::for_table(&table)?.with_writer_properties(props.clone());
        let (partition, current, whole) = (partition.clone(), current.clone(), whole.clone());
        tasks.spawn(async move {
            let mut adds = Vec::new();
            let mut kept = Vec::new();
            for batch in share {
                let fp = match &partition {
                    Some(col) => {
                        let key = partition_value(&batch, col);
                        let fp = fingerprint(std::slice::from_ref(&batch), 1)?;
                        if current.get(&key).is_some_and(|c| c.holds(&fp)) {
                            kept.push(key);
                            continue;
                        }
                        let dates = batch.column_by_name(col).expect("checked by fits");
                        let value = ScalarExt::from_array(dates.as_ref(), 0)
                            .expect("a Date32 value or null");
                        let values = [(col.clone(), value)].into_iter().collect();
                        writer
                            .write_partition(batch, &values, WriteMode::Default)
                            .await?;
                        fp
                    }
                    None => {
                        writer.write(batch).await?;
                        whole.clone().expect("computed for an unpartitioned table")
                    }
                };
                // One file open at a time: close this date's file before the next.
                for mut add in writer.flush().await? {
                    add.tags
                        .get_or_insert_with(HashMap::new)
                        .insert(ROWS_TAG.to_string(), Some(fp.clone()));
                    adds.push(add);
                }
            }
            Ok::<_, crate::Error>((adds, kept))
        });
    }
    let mut actions: Vec<Action> = Vec::new();
    let mut kept = HashSet::new();
    while let Some(done) = tasks.join_next().await {
        let (adds, k) = done.map_err(|e| crate::Error::Io(std::io::Error::other(e)))??;
        actions.extend(adds.into_iter().map(Action::Add));
        kept.extend(k);
    }
    actions.extend(
        in_scope_files
            .into_iter()
            .filter(|(key, _)| !kept.contains(key))
            .map(|(_, remove)| Action::Remove(remove)),
    );
    if actions.is_empty() {
        return Ok(table);
    }
    let operation = DeltaOperation::Write {
        mode: SaveMode::Overwrite,
        partition_by: partition.map(|c| vec![c]),
        predicate: replaced.map(|(predicate, _)| predicate),
    };
    let version = CommitBuilder::default()
        .with_actions(actions)
        .build(Some(state), table.log_store(), operation)
        .await?
        .version();
    let mut table = table;
    table.update_incremental(Some(version)).await?;
    Ok(table)
}
