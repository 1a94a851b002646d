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
use deltalake::arrow::compute::{concat_batches, take_record_batch};
use deltalake::arrow::datatypes::{DataType, Date32Type, SchemaRef};
use deltalake::kernel::scalars::ScalarExt;
use deltalake::kernel::transaction::CommitBuilder;
use deltalake::kernel::Action;
use deltalake::parquet::file::properties::WriterProperties;
use deltalake::protocol::{DeltaOperation, SaveMode};
use deltalake::writer::{DeltaWriter, RecordBatchWriter, WriteMode};
use deltalake::DeltaTable;

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
            .all(|(a, b)| a.name() == b.name() && a.data_type() == b.data_type())
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

/// Replaces the content of `table` (which [`fits`] the rows) with `batches` in one commit and
/// returns the new version's handle: all of it, or with `dates` only the files of those
/// partition values (days since 1970-01-01; every row of `batches` must be on one of them),
/// recorded with the same `IN` predicate a delta-rs replace-where records.
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
    let replaced = match (&partition, dates) {
        (Some(col), Some(days)) => Some((
            crate::dates_predicate(col, days),
            days.iter()
                .map(|d| crate::date_string(*d))
                .collect::<HashSet<_>>(),
        )),
        (None, Some(_)) => {
            return Err(crate::Error::Path(
                "a date-scoped rewrite needs a date partition column".into(),
            ))
        }
        _ => None,
    };
    let parts = parts(&schema, &batches, partition.as_deref(), streams)?;
    drop(batches);
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
    let mut tasks = tokio::task::JoinSet::new();
    for (_, share) in shares.into_iter().filter(|s| !s.1.is_empty()) {
        let mut writer =
            RecordBatchWriter::for_table(&table)?.with_writer_properties(props.clone());
        let partition = partition.clone();
        tasks.spawn(async move {
            let mut adds = Vec::new();
            for batch in share {
                match &partition {
                    Some(col) => {
                        let dates = batch.column_by_name(col).expect("checked by fits");
                        let value = ScalarExt::from_array(dates.as_ref(), 0)
                            .expect("a Date32 value or null");
                        let values = [(col.clone(), value)].into_iter().collect();
                        writer
                            .write_partition(batch, &values, WriteMode::Default)
                            .await?;
                    }
                    None => writer.write(batch).await?,
                }
                // One file open at a time: close this date's file before the next.
                adds.extend(writer.flush().await?);
            }
            Ok::<_, deltalake::DeltaTableError>(adds)
        });
    }
    let mut actions: Vec<Action> = Vec::new();
    while let Some(done) = tasks.join_next().await {
        let adds = done.map_err(|e| crate::Error::Io(std::io::Error::other(e)))??;
        actions.extend(adds.into_iter().map(Action::Add));
    }
    let state = table.snapshot()?;
    let in_scope = |values: &HashMap<String, Option<String>>| match (&replaced, &partition) {
        (Some((_, days)), Some(col)) => values
            .get(col)
            .and_then(|v| v.as_ref())
            .is_some_and(|v| days.contains(v)),
        _ => true,
    };
    actions.extend(
        state
            .log_data()
            .into_iter()
            .filter(|f| in_scope(&f.partition_values_map()))
            .map(|f| Action::Remove(f.remove_action(true))),
    );
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
