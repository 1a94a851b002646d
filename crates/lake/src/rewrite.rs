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
//! before the next (its `Add` action carries the same statistics delta-rs writes; a date of
//! many rows is cut into a few files, [`files_for`], so that every task has a share), and one
//! commit adds the new files and removes every current one (or those of the replaced dates),
//! with the same operation (`WRITE`, mode `Overwrite`, the replace-where predicate) the
//! delta-rs write records. Readers see the old version or the new one. Tables that are new,
//! or whose columns changed, still go through delta-rs's write, which creates the table or
//! replaces its schema; so do date-scoped rewrites of tables not partitioned by the date.

use std::collections::{BTreeMap, HashMap, HashSet};

use deltalake::arrow::array::{Array, ArrayRef, AsArray, RecordBatch, UInt32Array};
use deltalake::arrow::buffer::NullBuffer;
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

use xxhash_rust::xxh3::{xxh3_128, xxh3_64};

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
/// unpartitioned table, as up to `n` slices of about equal size. Rows already sorted by
/// date are sliced, others copied out by date.
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
    if dates.null_count() == 0 && dates.values().is_sorted() {
        // Rows already in date order (the aggregates by hour and by day): one slice per
        // date, no copy.
        let v = dates.values();
        let mut out = Vec::new();
        let mut start = 0;
        while start < v.len() {
            let end = start + v[start..].partition_point(|d| *d == v[start]);
            out.push(all.slice(start, end - start));
            start = end;
        }
        return Ok(out);
    }
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

/// Rows to write as one file, with the fingerprint of their date when the date was cut into
/// several files (see [`files_for`]; `None`: the file holds its whole date, fingerprinted by
/// the task that writes it).
type Piece = (RecordBatch, Option<String>);

/// Rows above which a date is written as more than one file.
pub(crate) const SPLIT_ROWS: usize = 131_072;

/// The most rows [`files_for`] puts in one file of a cut date.
const FILE_ROWS: usize = 1 << 20;

/// How many files a date of `rows` rows is written as, with `streams` files encoded at once:
/// one up to [`SPLIT_ROWS`] rows (small files cost readers more than they save the writer);
/// above, a multiple of `streams` of at most [`FILE_ROWS`] rows each, so that a day that
/// dominates a rewrite (a day of 2M events has 600k views) is encoded on every core rather
/// than on one while the others wait. Dates of the same rows always get the same count on
/// the same machine, which keeps their fingerprints (and unchanged files) stable.
pub(crate) fn files_for(rows: usize, streams: usize) -> usize {
    let streams = streams.max(1);
    if rows <= SPLIT_ROWS {
        1
    } else {
        streams * rows.div_ceil(streams * FILE_ROWS)
    }
}

/// The tag on every file written here that records its rows' [`fingerprint`].
pub const ROWS_TAG: &str = "reelhouse.rows";

/// What a file's (or, unpartitioned, the table's: all of `batches`) rows are, independent of
/// their order and of how they are split into batches: the version of this scheme, the files
/// written for them, the row count and the wrapping sum of a 128-bit hash of each row. Two
/// equal fingerprints mean the same rows, barring a hash collision. A change to the hashing
/// or to the writer's settings must bump [`FINGERPRINT_VERSION`], so that files written
/// before are rewritten once.
///
/// A row's hash is two 64-bit lanes, seeded by the column names and types, into which each
/// column's value is folded in column order (a multiply and a shift per lane, a bijection of
/// the lane for each value, so two values of a column never fold the same way; nulls fold
/// another way), then finished with murmur3's `fmix64`. Fixed-width values fold their bytes,
/// strings and binaries their xxh3 hash; other types (lists, structs) the xxh3 hash of
/// arrow's row format of the value. Rows are hashed column by column in chunks of
/// [`FINGERPRINT_CHUNK`] rows, whose lanes stay in the L1 cache: hashing each row in arrow's
/// row format (`v1`) cost 3.5 % of a full rebuild's samples in `perf`, mostly converting.
fn fingerprint(batches: &[RecordBatch], files: usize) -> Result<String> {
    let Some(first) = batches.first() else {
        return Ok(format!("{FINGERPRINT_VERSION}:{files}:0:{:032x}", 0));
    };
    let seed = {
        let names: Vec<String> = first
            .schema()
            .fields()
            .iter()
            .map(|f| format!("{}:{}", f.name(), f.data_type()))
            .collect();
        let h = xxh3_128(names.join("\n").as_bytes());
        [h as u64, (h >> 64) as u64]
    };
    let (mut sum, mut rows): (u128, usize) = (0, 0);
    let mut lanes: Vec<[u64; 2]> = Vec::with_capacity(FINGERPRINT_CHUNK);
    for batch in batches {
        rows += batch.num_rows();
        for at in (0..batch.num_rows()).step_by(FINGERPRINT_CHUNK) {
            let len = FINGERPRINT_CHUNK.min(batch.num_rows() - at);
            lanes.clear();
            lanes.resize(len, seed);
            for column in batch.columns() {
                fold_column(&column.slice(at, len), &mut lanes)?;
            }
            for [a, b] in &lanes {
                sum = sum.wrapping_add((u128::from(fmix64(*a)) << 64) | u128::from(fmix64(*b)));
            }
        }
    }
    Ok(format!("{FINGERPRINT_VERSION}:{files}:{rows}:{sum:032x}"))
}

/// The version of the [`fingerprint`] scheme and of the writer settings its files were
/// written with (`v2`: column-wise hashing, delta encodings).
const FINGERPRINT_VERSION: &str = "v2";

/// Rows per chunk in [`fingerprint`]: 16 bytes of lanes each, 64 KB in all.
const FINGERPRINT_CHUNK: usize = 4096;

/// Folds a value (or a 64-bit word of one) into a row's lanes.
#[inline]
fn fold(lanes: &mut [u64; 2], v: u64) {
    let a = (lanes[0] ^ v).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    let b = (lanes[1] ^ v.rotate_left(29)).wrapping_mul(0xC2B2_AE3D_27D4_EB4F);
    lanes[0] = a ^ (a >> 32);
    lanes[1] = b ^ (b >> 29);
}

/// Folds a null into a row's lanes (not the fold of any value).
#[inline]
fn fold_null(lanes: &mut [u64; 2]) {
    let a = lanes[0].wrapping_mul(0xFF51_AFD7_ED55_8CCD);
    let b = lanes[1].wrapping_mul(0xC4CE_B9FE_1A85_EC53);
    lanes[0] = (a ^ (a >> 31)).wrapping_add(0x5BD1_E995);
    lanes[1] = (b ^ (b >> 33)).wrapping_add(0x1B87_3593);
}

/// murmur3's 64-bit finalizer.
#[inline]
fn fmix64(mut k: u64) -> u64 {
    k ^= k >> 33;
    k = k.wrapping_mul(0xFF51_AFD7_ED55_8CCD);
    k ^= k >> 33;
    k = k.wrapping_mul(0xC4CE_B9FE_1A85_EC53);
    k ^ (k >> 33)
}

/// Calls `value` for each row of `lanes` whose value is not null, and folds a null into
/// the others.
#[inline]
fn each(
    lanes: &mut [[u64; 2]],
    nulls: Option<&NullBuffer>,
    mut value: impl FnMut(usize, &mut [u64; 2]),
) {
    match nulls {
        None => lanes.iter_mut().enumerate().for_each(|(i, l)| value(i, l)),
        Some(n) => {
            for (i, l) in lanes.iter_mut().enumerate() {
                if n.is_null(i) {
                    fold_null(l);
                } else {
                    value(i, l);
                }
            }
        }
    }
}

/// Folds each value of `column` into the lanes of its row (see [`fingerprint`]).
fn fold_column(column: &ArrayRef, lanes: &mut [[u64; 2]]) -> Result<()> {
    let nulls = column.logical_nulls();
    let nulls = nulls.as_ref();
    match column.data_type() {
        DataType::Boolean => {
            let a = column.as_boolean();
            each(lanes, nulls, |i, l| fold(l, u64::from(a.value(i))));
        }
        DataType::Utf8 => {
            let a = column.as_string::<i32>();
            each(lanes, nulls, |i, l| fold(l, xxh3_64(a.value(i).as_bytes())));
        }
        DataType::LargeUtf8 => {
            let a = column.as_string::<i64>();
            each(lanes, nulls, |i, l| fold(l, xxh3_64(a.value(i).as_bytes())));
        }
        DataType::Utf8View => {
            let a = column.as_string_view();
            each(lanes, nulls, |i, l| fold(l, xxh3_64(a.value(i).as_bytes())));
        }
        DataType::Binary => {
            let a = column.as_binary::<i32>();
            each(lanes, nulls, |i, l| fold(l, xxh3_64(a.value(i))));
        }
        DataType::LargeBinary => {
            let a = column.as_binary::<i64>();
            each(lanes, nulls, |i, l| fold(l, xxh3_64(a.value(i))));
        }
        DataType::BinaryView => {
            let a = column.as_binary_view();
            each(lanes, nulls, |i, l| fold(l, xxh3_64(a.value(i))));
        }
        t => match t.primitive_width() {
            Some(8) => {
                let data = column.to_data();
                let values = &data.buffer::<u64>(0)[..lanes.len()];
                each(lanes, nulls, |i, l| fold(l, values[i]));
            }
            Some(4) => {
                let data = column.to_data();
                let values = &data.buffer::<u32>(0)[..lanes.len()];
                each(lanes, nulls, |i, l| fold(l, u64::from(values[i])));
            }
            Some(width) => {
                let data = column.to_data();
                let values = &data.buffers()[0].as_slice()[data.offset() * width..];
                each(lanes, nulls, |i, l| {
                    for word in values[i * width..(i + 1) * width].chunks(8) {
                        let mut w = [0u8; 8];
                        w[..word.len()].copy_from_slice(word);
                        fold(l, u64::from_le_bytes(w));
                    }
                });
            }
            None => {
                let converter = RowConverter::new(vec![SortField::new(t.clone())])?;
                let converted = converter.convert_columns(std::slice::from_ref(column))?;
                // The row format encodes nulls too: every row folds its encoding.
                for (l, row) in lanes.iter_mut().zip(converted.iter()) {
                    fold(l, xxh3_64(row.as_ref()));
                }
            }
        },
    }
    Ok(())
}

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

/// How [`overwrite`] writes.
pub(crate) struct Settings {
    /// The Parquet settings of the files.
    pub props: WriterProperties,
    /// How many files are encoded at once.
    pub streams: usize,
    /// Whether a date (or an unpartitioned table) whose current file holds its new rows is
    /// kept instead of rewritten: always, but for benchmarks of the whole write.
    pub keep_unchanged: bool,
}

/// Replaces the content of `table` (which [`fits`] the rows) with `batches` in one commit and
/// returns the new version's handle: all of it, or with `dates` only the files of those
/// partition values (days since 1970-01-01; every row of `batches` must be on one of them),
/// recorded with the same `IN` predicate a delta-rs replace-where records.
///
/// Files whose rows do not change are kept: each file written here is tagged ([`ROWS_TAG`])
/// with the [`fingerprint`] of its date's rows (of the whole table's, unpartitioned), and a
/// date whose current files all carry the fingerprint of its new rows (which records how many
/// files they are) is neither written nor removed (unless `settings` say otherwise). When
/// nothing changes, nothing is committed and `table` is returned as it is.
pub(crate) async fn overwrite(
    table: DeltaTable,
    schema: SchemaRef,
    batches: Vec<RecordBatch>,
    partition_columns: &[&str],
    dates: Option<&[i32]>,
    settings: Settings,
) -> Result<DeltaTable> {
    let Settings {
        props,
        streams,
        keep_unchanged,
    } = settings;
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
            if keep_unchanged && current.get(&None).is_some_and(|c| c.holds(&fp)) {
                return Ok(table);
            }
            Some(fp)
        }
    };
    // A date with many rows is cut into several files (see [`files_for`]), so that one big
    // day is encoded on every core; its fingerprint, over all of its files, is taken here and
    // tagged on each. The other dates are fingerprinted in the tasks.
    let current = std::sync::Arc::new(current);
    let mut kept = HashSet::new();
    let mut pieces: Vec<Piece> = Vec::with_capacity(parts.len());
    for part in parts {
        let (Some(col), n) = (&partition, part.num_rows()) else {
            pieces.push((part, None));
            continue;
        };
        let per = n.div_ceil(files_for(n, streams));
        if per >= n {
            pieces.push((part, None));
            continue;
        }
        let fp = fingerprint(std::slice::from_ref(&part), n.div_ceil(per))?;
        let key = partition_value(&part, col);
        if keep_unchanged && current.get(&key).is_some_and(|c| c.holds(&fp)) {
            kept.insert(key);
            continue;
        }
        for at in (0..n).step_by(per) {
            pieces.push((part.slice(at, per.min(n - at)), Some(fp.clone())));
        }
    }
    // Largest pieces first, each to the stream with the fewest rows so far.
    pieces.sort_by_key(|p| std::cmp::Reverse(p.0.num_rows()));
    let mut shares: Vec<(usize, Vec<Piece>)> = vec![(0, Vec::new()); streams.max(1)];
    for piece in pieces {
        let share = shares.iter_mut().min_by_key(|s| s.0).expect("one stream");
        share.0 += piece.0.num_rows();
        share.1.push(piece);
    }
    let mut tasks = tokio::task::JoinSet::new();
    for (_, share) in shares.into_iter().filter(|s| !s.1.is_empty()) {
        let mut writer =
            RecordBatchWriter::for_table(&table)?.with_writer_properties(props.clone());
        let (partition, current, whole) = (partition.clone(), current.clone(), whole.clone());
        tasks.spawn(async move {
            let mut adds = Vec::new();
            let mut kept = Vec::new();
            for (batch, cut) in share {
                let fp = match &partition {
                    Some(col) => {
                        let key = partition_value(&batch, col);
                        let fp = match cut {
                            Some(fp) => fp,
                            None => {
                                let fp = fingerprint(std::slice::from_ref(&batch), 1)?;
                                if keep_unchanged && current.get(&key).is_some_and(|c| c.holds(&fp))
                                {
                                    kept.push(key);
                                    continue;
                                }
                                fp
                            }
                        };
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
                // One file open at a time: close this piece's file before the next.
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

/// A rewrite of a whole table whose rows arrive in parts (a rebuild that computes a day in
/// user buckets, see `reelhouse_warehouse`): each part is encoded into the open files as it
/// comes (one per partition value), which are closed whenever [`FILE_ROWS`] rows are open,
/// so memory holds at most about one file's encoded rows per partition value being written;
/// [`Streamed::commit`] adds every file written and removes every current one in one commit
/// (operation `WRITE`, mode `Overwrite`, as [`overwrite`] records). Nothing is visible to
/// readers before that commit; files of a rewrite that is dropped stay unreferenced until
/// vacuum. The files carry no [`ROWS_TAG`]: the next rewrite of their dates writes them.
pub struct Streamed {
    table: DeltaTable,
    partition: Option<String>,
    writer: RecordBatchWriter,
    open_rows: usize,
    actions: Vec<Action>,
}

impl Streamed {
    /// Starts a rewrite of `table`, which must [`fits`] the rows to come.
    pub(crate) fn start(
        table: DeltaTable,
        partition_columns: &[&str],
        props: WriterProperties,
    ) -> Result<Streamed> {
        let writer = RecordBatchWriter::for_table(&table)?.with_writer_properties(props);
        Ok(Streamed {
            table,
            partition: partition_columns.first().map(|c| c.to_string()),
            writer,
            open_rows: 0,
            actions: Vec::new(),
        })
    }

    /// Encodes `batches` (rows of the table's columns) into the open files.
    pub async fn write(&mut self, schema: SchemaRef, batches: Vec<RecordBatch>) -> Result<()> {
        let (schema, batches) = to_table_types(&self.table, schema, batches)?;
        for part in parts(&schema, &batches, self.partition.as_deref(), 1)? {
            let n = part.num_rows();
            match &self.partition {
                Some(col) => {
                    let dates = part.column_by_name(col).expect("checked by fits");
                    let value =
                        ScalarExt::from_array(dates.as_ref(), 0).expect("a Date32 value or null");
                    let values = [(col.clone(), value)].into_iter().collect();
                    self.writer
                        .write_partition(part, &values, WriteMode::Default)
                        .await?;
                }
                None => self.writer.write(part).await?,
            }
            self.open_rows += n;
        }
        if self.open_rows >= FILE_ROWS {
            self.close_files().await?;
        }
        Ok(())
    }

    async fn close_files(&mut self) -> Result<()> {
        let adds = self.writer.flush().await?;
        self.actions.extend(adds.into_iter().map(Action::Add));
        self.open_rows = 0;
        Ok(())
    }

    /// Closes the open files and commits: the table holds exactly the rows written.
    pub async fn commit(mut self) -> Result<DeltaTable> {
        self.close_files().await?;
        let state = self.table.snapshot()?;
        let mut actions = std::mem::take(&mut self.actions);
        actions.extend(
            state
                .log_data()
                .into_iter()
                .map(|f| Action::Remove(f.remove_action(true))),
        );
        let operation = DeltaOperation::Write {
            mode: SaveMode::Overwrite,
            partition_by: self.partition.clone().map(|c| vec![c]),
            predicate: None,
        };
        let version = CommitBuilder::default()
            .with_actions(actions)
            .build(Some(state), self.table.log_store(), operation)
            .await?
            .version();
        let mut table = self.table;
        table.update_incremental(Some(version)).await?;
        Ok(table)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use deltalake::arrow::array::{
        BooleanArray, Date32Array, Decimal128Array, Float64Array, Int64Array, ListArray,
        StringArray, StringViewArray, TimestampMicrosecondArray,
    };
    use deltalake::arrow::compute::take_record_batch;
    use deltalake::arrow::datatypes::Int32Type;
    use std::sync::Arc;

    /// Rows of every kind of column the fingerprint hashes its own way: fixed widths of 1-8
    /// and 16 bytes, booleans, strings and string views, and a list (arrow's row format),
    /// each with nulls.
    fn rows(n: i64, change: Option<(usize, i64)>) -> RecordBatch {
        let at = |col: usize, r: i64| match change {
            Some((c, row)) if c == col && row == r => r + 1_000_001,
            _ => r,
        };
        // A changed null becomes a value.
        let null = |col: usize, r: i64| r % 5 == 3 && change != Some((col, r));
        let columns: Vec<ArrayRef> = vec![
            Arc::new(Int64Array::from_iter(
                (0..n).map(|r| (!null(0, r)).then(|| at(0, r) * 7)),
            )),
            Arc::new(StringArray::from_iter(
                (0..n).map(|r| (!null(1, r)).then(|| format!("s{}", at(1, r)))),
            )),
            Arc::new(StringViewArray::from_iter(
                (0..n).map(|r| Some(format!("a longer string value {}", at(2, r)))),
            )),
            Arc::new(BooleanArray::from_iter(
                (0..n).map(|r| (!null(3, r)).then(|| at(3, r) % 2 == 0)),
            )),
            Arc::new(
                TimestampMicrosecondArray::from_iter_values((0..n).map(|r| at(4, r) * 1_000))
                    .with_timezone("UTC"),
            ),
            Arc::new(Float64Array::from_iter(
                (0..n).map(|r| (!null(5, r)).then(|| at(5, r) as f64 / 3.0)),
            )),
            Arc::new(Date32Array::from_iter_values(
                (0..n).map(|r| 20_000 + at(6, r) as i32),
            )),
            Arc::new(
                Decimal128Array::from_iter(
                    (0..n).map(|r| (!null(7, r)).then(|| i128::from(at(7, r)) << 70)),
                )
                .with_precision_and_scale(38, 2)
                .unwrap(),
            ),
            Arc::new(ListArray::from_iter_primitive::<Int32Type, _, _>(
                (0..n).map(|r| (!null(8, r)).then(|| vec![Some(at(8, r) as i32), None])),
            )),
        ];
        let fields: Vec<Field> = ["i", "s", "v", "b", "t", "f", "d", "dec", "l"]
            .iter()
            .zip(&columns)
            .map(|(name, c)| Field::new(*name, c.data_type().clone(), true))
            .collect();
        RecordBatch::try_new(Arc::new(Schema::new(fields)), columns).unwrap()
    }

    fn fp(batches: &[RecordBatch]) -> String {
        fingerprint(batches, 1).unwrap()
    }

    /// The same rows give the same fingerprint in any order, split and slicing; any change
    /// of one value (to another value or to null) or of which row holds it gives another.
    #[test]
    fn fingerprints_depend_on_the_rows_not_their_order() {
        let n = 10_000; // more than two chunks
        let all = rows(n, None);
        let want = fp(std::slice::from_ref(&all));
        assert!(want.starts_with(&format!("{FINGERPRINT_VERSION}:1:{n}:")));
        let reversed =
            take_record_batch(&all, &UInt32Array::from_iter_values((0..n as u32).rev())).unwrap();
        let split = [
            reversed.slice(0, 17),
            reversed.slice(17, 5_000),
            reversed.slice(5_017, n as usize - 5_017),
        ];
        assert_eq!(fp(&split), want, "order, split and offsets do not matter");
        assert_ne!(
            fingerprint(&split, 3).unwrap(),
            want,
            "the file count is part of it"
        );
        assert_ne!(fp(&[all.slice(1, n as usize - 1)]), want, "a row fewer");
        for col in 0..all.num_columns() {
            for row in [0, 3, 4_097, n - 1] {
                let changed = rows(n, Some((col, row)));
                assert_ne!(
                    fp(&[changed]),
                    want,
                    "column {col}, row {row} changed (row 3 from null to a value)"
                );
            }
            // The values of rows 1 and 2 of this column swapped, the other columns not.
            let swapped = {
                let mut columns = all.columns().to_vec();
                let idx =
                    UInt32Array::from_iter_values([0u32, 2, 1].into_iter().chain(3..n as u32));
                columns[col] = deltalake::arrow::compute::take(&columns[col], &idx, None).unwrap();
                RecordBatch::try_new(all.schema(), columns).unwrap()
            };
            assert_ne!(fp(&[swapped]), want, "column {col}: rows 1 and 2 swapped");
        }
        let renamed = {
            let fields: Vec<Field> = all
                .schema()
                .fields()
                .iter()
                .map(|f| f.as_ref().clone().with_name(format!("{}_", f.name())))
                .collect();
            RecordBatch::try_new(Arc::new(Schema::new(fields)), all.columns().to_vec()).unwrap()
        };
        assert_ne!(fp(&[renamed]), want, "column names are part of it");
    }

    /// Each date's rows, in their order, whether the rows come sorted by date (sliced) or
    /// not (copied out), from one batch or several; the expectation is grouped here by hand.
    #[test]
    fn parts_hold_each_dates_rows_in_order() {
        let schema: SchemaRef = Arc::new(Schema::new(vec![
            Field::new("n", DataType::Int64, false),
            Field::new("d", DataType::Date32, true),
        ]));
        let batch = |rows: &[(i64, Option<i32>)]| {
            RecordBatch::try_new(
                Arc::clone(&schema),
                vec![
                    Arc::new(Int64Array::from_iter_values(rows.iter().map(|r| r.0))),
                    Arc::new(Date32Array::from_iter(rows.iter().map(|r| r.1))),
                ],
            )
            .unwrap()
        };
        // (value, date): a pseudo-random mix of 7 dates and, in one case, nulls.
        let gen = |n: i64, sorted: bool, nulls: bool| {
            let mut rows: Vec<(i64, Option<i32>)> = (0..n)
                .map(|i| {
                    let d = ((i * 7919) % 13 % 7) as i32 + 19_000;
                    (i, (!(nulls && i % 11 == 4)).then_some(d))
                })
                .collect();
            if sorted {
                rows.sort_by_key(|r| r.1);
            }
            rows
        };
        for (sorted, nulls, split) in [
            (true, false, false),
            (true, false, true),
            (false, false, false),
            (false, true, true),
            (true, true, false),
        ] {
            let rows = gen(500, sorted, nulls);
            let batches = if split {
                vec![batch(&rows[..123]), batch(&rows[123..])]
            } else {
                vec![batch(&rows)]
            };
            let got = parts(&schema, &batches, Some("d"), 2).unwrap();
            let mut want: BTreeMap<Option<i32>, Vec<i64>> = BTreeMap::new();
            for (n, d) in &rows {
                want.entry(*d).or_default().push(*n);
            }
            let got: Vec<(Option<i32>, Vec<i64>)> = got
                .iter()
                .map(|b| {
                    let d = b.column(1).as_primitive::<Date32Type>();
                    let first = d.is_valid(0).then(|| d.value(0));
                    assert!(
                        (0..b.num_rows()).all(|i| d.is_valid(i).then(|| d.value(i)) == first),
                        "one date per part"
                    );
                    let n = b
                        .column(0)
                        .as_primitive::<deltalake::arrow::datatypes::Int64Type>();
                    (first, n.values().to_vec())
                })
                .collect();
            assert_eq!(
                got,
                want.into_iter().collect::<Vec<_>>(),
                "sorted {sorted}, nulls {nulls}, split {split}"
            );
        }
    }
}
