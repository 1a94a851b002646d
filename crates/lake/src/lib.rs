//! Delta Lake tables under one data directory: schemas, writers and the read-only SQL catalog.
//!
//! Batches enter through [`Lake::append`] (one Delta commit per call, tagged with the
//! write-ahead-log segment it covers, so a replay after a crash can tell what is already in the
//! table) and leave through [`query::Catalog`], which serves SQL over the Delta tables plus the
//! batches that are durable in the log but not yet committed:
//!
//! ```text
//!  RecordBatch ─▶ sort (partition, sort keys) ─▶ Delta write (zstd Parquet, one commit,
//!                                                 txn "reelhouse-wal" = segment)
//!  SQL ─▶ Catalog: events = Delta scan ∪ in-memory buffered batches ─▶ DataFusion
//! ```

pub mod compact;
pub mod erase;
pub mod query;
mod rewrite;
pub use rewrite::Streamed;

pub mod schema;
pub mod store;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use deltalake::arrow::array::RecordBatch;
use deltalake::arrow::compute::{
    concat_batches, lexsort_to_indices, take_record_batch, SortColumn,
};
use deltalake::arrow::datatypes::SchemaRef;
use deltalake::kernel::transaction::CommitProperties;
use deltalake::kernel::Transaction;
use deltalake::parquet::basic::{Compression, Encoding, ZstdLevel};
use deltalake::parquet::file::properties::WriterProperties;
use deltalake::parquet::schema::types::ColumnPath;
use deltalake::protocol::SaveMode;
use deltalake::DeltaTable;

pub use deltalake;
pub use schema::{events_batch, quarantine_batch, QuarantineRow};

/// Errors of the lake.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Delta table error: {0}")]
    Delta(#[from] deltalake::DeltaTableError),
    #[error("Arrow error: {0}")]
    Arrow(#[from] deltalake::arrow::error::ArrowError),
    #[error("query error: {0}")]
    DataFusion(#[from] deltalake::datafusion::error::DataFusionError),
    #[error("{0}")]
    ReadOnly(String),
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
    #[error("invalid data directory: {0}")]
    Path(String),
    #[error("{0}")]
    WriterLease(String),
    #[error("{0}")]
    LeaseLost(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Application id of the Delta transaction that records the last WAL segment in a table.
pub const WAL_APP_ID: &str = "reelhouse-wal";

/// The raw tables this crate writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RawTable {
    Events,
    Quarantine,
}

impl RawTable {
    pub const ALL: [RawTable; 2] = [RawTable::Events, RawTable::Quarantine];

    pub fn name(self) -> &'static str {
        match self {
            RawTable::Events => "events",
            RawTable::Quarantine => "quarantine",
        }
    }

    pub fn schema(self) -> SchemaRef {
        match self {
            RawTable::Events => schema::events_schema(),
            RawTable::Quarantine => schema::quarantine_schema(),
        }
    }

    fn partition_column(self) -> &'static str {
        match self {
            RawTable::Events => "event_date",
            RawTable::Quarantine => "received_date",
        }
    }

    /// Sort keys inside a partition. Clustering by user and session puts the repeating ids
    /// (user, session, view) and the close-together times of one session next to each other,
    /// which is what makes the pages small (measured in `examples/layout.rs`, see
    /// docs/storage.md). Each date's file still spans nearly every `user_id`, so erasure
    /// lookups rely on the `user_id` bloom filters (see [`RawTable::writer_properties`]).
    fn sort_columns(self) -> &'static [&'static str] {
        match self {
            RawTable::Events => &["user_id", "session_id", "event_time"],
            RawTable::Quarantine => &["received_at"],
        }
    }

    /// Parquet settings: zstd everywhere; for `events`, plain length-delta strings without a
    /// dictionary for the random ids (a dictionary never pays off for unique values). Times
    /// keep the default encoding: delta-packing them measured larger once sessions are
    /// clustered. DELTA_LENGTH_BYTE_ARRAY is a Parquet 2.0 encoding that Spark, Trino, DuckDB
    /// and pyarrow read.
    ///
    /// `events` files also carry a split-block bloom filter on `user_id`, allocated for at most
    /// `user_ndv` distinct users per file and folded by the writer to the smallest size that
    /// keeps a 1 % false-positive rate for the users it got: each date's file holds
    /// most users, so its `user_id` min/max cannot rule a user out, while the filter lets an
    /// erasure lookup (`WHERE user_id = …`) skip the dates the user has no events on without
    /// reading their pages (docs/data-model.md, docs/performance.md).
    pub fn writer_properties(self, user_ndv: u64) -> Result<WriterProperties> {
        let zstd = ZstdLevel::try_new(3).map_err(Error::from_parquet)?;
        let mut b = WriterProperties::builder()
            .set_compression(Compression::ZSTD(zstd))
            .set_max_row_group_row_count(Some(1 << 20));
        if self == RawTable::Events {
            for c in ["event_id", "view_id"] {
                b = b
                    .set_column_dictionary_enabled(ColumnPath::from(c), false)
                    .set_column_encoding(ColumnPath::from(c), Encoding::DELTA_LENGTH_BYTE_ARRAY);
            }
            let user = ColumnPath::from("user_id");
            b = b
                .set_column_bloom_filter_enabled(user.clone(), true)
                .set_column_bloom_filter_fpp(user.clone(), USER_BLOOM_FPP)
                .set_column_bloom_filter_max_ndv(user, user_ndv.max(1));
        }
        Ok(b.build())
    }

    /// The writer settings for rewriting files of this table in place (an erasure's delete or
    /// update, retention): a rewritten file holds rows of one partition, so the most rows any
    /// partition has bounds its distinct users.
    pub fn rewrite_properties(self, table: &DeltaTable) -> Result<WriterProperties> {
        let mut per_partition: HashMap<Vec<(String, Option<String>)>, u64> = HashMap::new();
        for f in table.snapshot()?.log_data() {
            let mut key: Vec<_> = f.partition_values_map().into_iter().collect();
            key.sort();
            *per_partition.entry(key).or_default() += f.num_records().unwrap_or(0) as u64;
        }
        let ndv = per_partition.values().copied().max().unwrap_or(1);
        self.writer_properties(ndv)
    }
}

/// False-positive rate of the `user_id` bloom filters of `events` (see
/// [`RawTable::writer_properties`]): about 1.2 bytes per distinct user, in a power of two.
pub const USER_BLOOM_FPP: f64 = 0.01;

/// The most distinct `user_id`s of any one `event_date` in `batch`, sorted by
/// (`event_date`, `user_id`) as [`sort_batch`] leaves it: the number of values each date's
/// file will hold, which sizes its bloom filter.
fn users_per_date(batch: &RecordBatch) -> u64 {
    use deltalake::arrow::array::{Array, AsArray};
    use deltalake::arrow::datatypes::{Date32Type, Int64Type};
    let (Some(dates), Some(users)) = (
        batch.column_by_name("event_date"),
        batch.column_by_name("user_id"),
    ) else {
        return 1;
    };
    let (Some(dates), Some(users)) = (
        dates.as_primitive_opt::<Date32Type>(),
        users.as_primitive_opt::<Int64Type>(),
    ) else {
        return batch.num_rows() as u64;
    };
    let (mut best, mut here) = (0u64, 0u64);
    for i in 0..batch.num_rows() {
        let new_date = i == 0
            || dates.is_null(i) != dates.is_null(i - 1)
            || dates.value(i) != dates.value(i - 1);
        if new_date {
            best = best.max(here);
            here = 0;
        }
        let new_user = new_date
            || users.is_null(i) != users.is_null(i - 1)
            || users.value(i) != users.value(i - 1);
        if new_user && !users.is_null(i) {
            here += 1;
        }
    }
    best.max(here).max(1)
}

/// The data directory's Delta tables. Stateless apart from where things are: callers own the
/// table handles (snapshots), so they can swap a new version in atomically with whatever else
/// their view of the data holds.
#[derive(Debug, Clone)]
pub struct Lake {
    /// The local directory of this process's state (WAL, lock, snapshot, `_state/`); also
    /// where the tables are unless they live on an object store.
    root: PathBuf,
    tables: store::Location,
    /// Whether rewrites write every date's file even when its rows did not change (see
    /// [`Lake::rewriting_unchanged`]).
    rewrite_unchanged: bool,
}

impl Lake {
    /// Opens the data directory, creating it if missing. Tables are created on first write.
    pub fn open(root: impl AsRef<Path>) -> Result<Lake> {
        Self::open_at(root, None)
    }

    /// Like [`Lake::open`], with the tables at `tables` (`s3://bucket/prefix`) when given.
    pub fn open_at(root: impl AsRef<Path>, tables: Option<&str>) -> Result<Lake> {
        let root = root.as_ref();
        std::fs::create_dir_all(root)?;
        let root = root.canonicalize()?;
        let tables = match tables {
            Some(url) => store::Location::remote(url)?,
            None => store::Location::local(&root)?,
        };
        Ok(Lake {
            root,
            tables,
            rewrite_unchanged: false,
        })
    }

    /// This lake, with rewrites of derived tables writing every date's file even when its
    /// rows did not change (by default such a file is kept; see [`rewrite::overwrite`]).
    /// For benchmarks of the whole write: `reelhouse bench materialize` rewrites every
    /// date of every table several times this way.
    pub fn rewriting_unchanged(mut self, on: bool) -> Lake {
        self.rewrite_unchanged = on;
        self
    }

    /// How [`rewrite::overwrite`] writes a derived table of `schema`.
    fn rewrite_settings(&self, schema: &SchemaRef) -> Result<rewrite::Settings> {
        Ok(rewrite::Settings {
            props: derived_properties_for(schema)?,
            streams: write_streams(),
            keep_unchanged: !self.rewrite_unchanged,
        })
    }

    /// The local data (or state) directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where the tables live.
    pub fn tables(&self) -> &store::Location {
        &self.tables
    }

    /// URL of one table.
    pub fn table_url(&self, t: RawTable) -> Result<url::Url> {
        self.tables.table(t.name())
    }

    /// The latest version of a table, or `None` if it has never been written.
    pub async fn load(&self, t: RawTable) -> Result<Option<DeltaTable>> {
        self.open_url(&self.table_url(t)?).await
    }

    /// Handles of every raw table (for read-only use, e.g. the `sql` command).
    pub async fn load_all(&self) -> Result<HashMap<RawTable, DeltaTable>> {
        let mut out = HashMap::new();
        for t in RawTable::ALL {
            if let Some(table) = self.load(t).await? {
                out.insert(t, table);
            }
        }
        Ok(out)
    }

    /// Appends `batches` to `t` (whose current handle is `current`) in one Delta commit that
    /// records `segment` as the WAL segment it covers. Rows are sorted by partition and sort
    /// keys first. Returns the new table version's handle; nothing is published anywhere.
    pub async fn append(
        &self,
        t: RawTable,
        current: Option<DeltaTable>,
        batches: &[RecordBatch],
        segment: u64,
    ) -> Result<DeltaTable> {
        let batch = concat_batches(&t.schema(), batches)?;
        let batch = sort_batch(&batch, t)?;
        let table = match current {
            Some(t) => t,
            None => handle_for_writing(&self.table_url(t)?)?,
        };
        let props = t.writer_properties(users_per_date(&batch))?;
        let commit = CommitProperties::default()
            .with_application_transaction(Transaction::new(WAL_APP_ID, segment as i64));
        Ok(table
            .write(vec![batch])
            .with_save_mode(SaveMode::Append)
            .with_partition_columns(vec![t.partition_column().to_string()])
            .with_writer_properties(props)
            .with_commit_properties(commit)
            .with_table_name(t.name())
            .await?)
    }
}

impl Lake {
    /// The latest version of a derived table, or `None` if it has never been written.
    pub async fn load_derived(&self, name: &str) -> Result<Option<DeltaTable>> {
        self.open_url(&self.tables.table(name)?).await
    }

    /// The latest version of the Delta table at `url`, or `None` if none was ever written.
    async fn open_url(&self, url: &url::Url) -> Result<Option<DeltaTable>> {
        if !self.tables.has_table(url).await? {
            return Ok(None);
        }
        Ok(Some(deltalake::open_table(url.clone()).await?))
    }

    /// The handle to write `name` with (created at the first write) and its zstd properties.
    fn derived_writer(
        &self,
        name: &str,
        current: Option<DeltaTable>,
        schema: &deltalake::arrow::datatypes::Schema,
    ) -> Result<(DeltaTable, WriterProperties)> {
        let table = match current {
            Some(t) => t,
            None => handle_for_writing(&self.tables.table(name)?)?,
        };
        Ok((table, derived_properties_for(schema)?))
    }

    /// Appends rows to a table under the data directory (created by the first append), in one
    /// Delta commit; used for inputs that do not come through the WAL (dimension upserts).
    pub async fn append_table(
        &self,
        name: &str,
        current: Option<DeltaTable>,
        batch: RecordBatch,
    ) -> Result<DeltaTable> {
        let (table, props) = self.derived_writer(name, current, &batch.schema())?;
        Ok(table
            .write(vec![batch])
            .with_save_mode(SaveMode::Append)
            .with_writer_properties(props)
            .with_table_name(name)
            .await?)
    }

    /// Replaces the whole content of a derived table in one Delta commit (readers see the old
    /// or the new version, never a mix). Old files stay until vacuum. A table that exists with
    /// the same columns is rewritten by [`rewrite::overwrite`] (one file open at a time).
    pub async fn overwrite_derived(
        &self,
        name: &str,
        current: Option<DeltaTable>,
        schema: SchemaRef,
        batches: Vec<RecordBatch>,
        partition_columns: &[&str],
    ) -> Result<DeltaTable> {
        if let Some(table) = current.as_ref() {
            if rewrite::fits(table, &schema, partition_columns) {
                let settings = self.rewrite_settings(&schema)?;
                return rewrite::overwrite(
                    table.clone(),
                    schema,
                    batches,
                    partition_columns,
                    None,
                    settings,
                )
                .await;
            }
        }
        // A new table, or new columns: delta-rs creates the table or replaces its schema.
        let (table, props) = self.derived_writer(name, current, &schema)?;
        let input = write_input(schema, batches)?;
        Ok(table
            .write(Vec::new())
            .with_input_plan(input)
            .with_save_mode(SaveMode::Overwrite)
            .with_schema_mode(deltalake::operations::write::SchemaMode::Overwrite)
            .with_partition_columns(partition_columns.iter().map(|c| c.to_string()))
            .with_writer_properties(props)
            .with_table_name(name)
            .await?)
    }
}

impl Lake {
    /// Starts a rewrite of the whole derived table `name` whose rows arrive in parts
    /// ([`rewrite::Streamed`]). A table that does not exist yet, or whose columns or
    /// partitioning differ, is first replaced by an empty one of `schema` (one commit that
    /// readers see as an empty table until the rewrite commits).
    pub async fn overwrite_streamed(
        &self,
        name: &str,
        current: Option<DeltaTable>,
        schema: SchemaRef,
        partition_columns: &[&str],
    ) -> Result<rewrite::Streamed> {
        let table = match current {
            Some(t) if rewrite::fits(&t, &schema, partition_columns) => t,
            other => {
                let empty = RecordBatch::new_empty(Arc::clone(&schema));
                self.overwrite_derived(
                    name,
                    other,
                    Arc::clone(&schema),
                    vec![empty],
                    partition_columns,
                )
                .await?
            }
        };
        rewrite::Streamed::start(table, partition_columns, derived_properties_for(&schema)?)
    }
}

impl Lake {
    /// Replaces the rows of the given dates (`date_column` IN `days`, days since 1970-01-01) of
    /// a derived table with `batches`, in one Delta commit (replace-where): readers see every
    /// date either before or after, never half-written. Every row of `batches` must belong to
    /// one of the dates. A table partitioned by `date_column` is rewritten by
    /// [`rewrite::overwrite`] (only those dates' files are replaced).
    pub async fn replace_dates(
        &self,
        name: &str,
        current: DeltaTable,
        schema: SchemaRef,
        batches: Vec<RecordBatch>,
        date_column: &str,
        days: &[i32],
    ) -> Result<DeltaTable> {
        if rewrite::fits(&current, &schema, &[date_column]) {
            let settings = self.rewrite_settings(&schema)?;
            return rewrite::overwrite(
                current,
                schema,
                batches,
                &[date_column],
                Some(days),
                settings,
            )
            .await;
        }
        // Not partitioned by the date: delta-rs rewrites the files holding those dates.
        let (table, props) = self.derived_writer(name, Some(current), &schema)?;
        let input = write_input(schema, batches)?;
        Ok(table
            .write(Vec::new())
            .with_input_plan(input)
            .with_save_mode(SaveMode::Overwrite)
            .with_replace_where(dates_predicate(date_column, days))
            .with_writer_properties(props)
            .with_table_name(name)
            .await?)
    }
}

/// [`derived_properties`] with the encoding of each column of `schema` chosen by its type:
/// `DELTA_BINARY_PACKED` for integers, dates and timestamps, `DELTA_LENGTH_BYTE_ARRAY` for
/// strings and binaries, plain for floats and booleans. Encoding each column of
/// `fact_video_view` on its own under zstd 1 (`examples/write_cost.rs ... columns`, 828k
/// rows, 91 date files, two threads) took 198 ms this way against 266 ms plain, for 1 MB less
/// (delta-encoded timestamps are 20 % smaller; `view_id` 12 % larger): zstd has less to
/// compress, and zstd is the largest single cost of a full rebuild (docs/performance.md).
/// Both encodings are in the Parquet format since 2013 and read by DuckDB, Spark ≥ 3.3,
/// Trino, DataFusion and pyarrow.
pub fn derived_properties_for(
    schema: &deltalake::arrow::datatypes::Schema,
) -> Result<WriterProperties> {
    use deltalake::arrow::datatypes::DataType;
    let mut b = derived_properties()?.into_builder();
    for field in schema.fields() {
        let dt = field.data_type();
        let encoding = if dt.is_integer()
            || matches!(
                dt,
                DataType::Date32 | DataType::Date64 | DataType::Timestamp(..)
            ) {
            Encoding::DELTA_BINARY_PACKED
        } else if matches!(
            dt,
            DataType::Utf8
                | DataType::LargeUtf8
                | DataType::Utf8View
                | DataType::Binary
                | DataType::LargeBinary
                | DataType::BinaryView
        ) {
            Encoding::DELTA_LENGTH_BYTE_ARRAY
        } else {
            continue;
        };
        b = b.set_column_encoding(ColumnPath::from(field.name().as_str()), encoding);
    }
    Ok(b.build())
}

/// [`derived_properties_for`] the columns of `table`: for rewrites of a derived table's files
/// that do not go through [`Lake`] (an erasure's delete or update), so they are encoded as
/// its rebuilds encode them.
pub fn derived_rewrite_properties(table: &DeltaTable) -> Result<WriterProperties> {
    derived_properties_for(&table.snapshot()?.snapshot().arrow_schema())
}

/// The Parquet settings of the derived tables (and of rewrites of their files) whose columns
/// are not known; [`derived_properties_for`] adds each column's encoding.
pub fn derived_properties() -> Result<WriterProperties> {
    // zstd 1: encoding `fact_video_view` (828k rows, 91 date files) took 351-355 ms
    // against 541-596 ms at level 3, for files 2 % larger (32.3 MB against 31.7 MB;
    // `examples/write_cost.rs`, docs/performance.md). A rebuild is CPU-bound, and the
    // derived tables are rewritten by every rebuild; `events` keeps level 3.
    let zstd = ZstdLevel::try_new(1).map_err(Error::from_parquet)?;
    // No dictionary pages: most derived columns are ids with few repeats per file (view,
    // session, user ids), where a dictionary page saves little and costs a hash per value.
    // Without it the full rebuild's `fact_video_view` write took 1.0–1.4 s instead of
    // 2.7–3.7 s and its files were 32 MB instead of 37 MB (zstd does the work;
    // docs/performance.md).
    Ok(WriterProperties::builder()
        .set_compression(Compression::ZSTD(zstd))
        .set_dictionary_enabled(false)
        .build())
}

/// Writers that encode a derived table's rows at once: the core count, as delta-rs caps it.
fn write_streams() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// The rows to write as a plan of [`write_streams`] input partitions of about equal size.
/// delta-rs hash-partitions the input of a partitioned table by its partition values over
/// that many writers, so each date is still written by one writer (one file per date, as
/// before) while the dates are encoded in parallel; a single input partition would run the
/// whole Parquet encoding on one core.
fn write_input(
    schema: SchemaRef,
    batches: Vec<RecordBatch>,
) -> Result<deltalake::datafusion::logical_expr::LogicalPlan> {
    use deltalake::datafusion::datasource::{provider_as_source, MemTable};
    use deltalake::datafusion::logical_expr::LogicalPlanBuilder;
    let rows: usize = batches.iter().map(RecordBatch::num_rows).sum();
    let n = write_streams();
    let per = rows.div_ceil(n).max(1);
    let mut parts: Vec<Vec<RecordBatch>> = vec![Vec::new(); n];
    let (mut part, mut filled) = (0, 0);
    for b in batches {
        let mut offset = 0;
        while offset < b.num_rows() {
            let take = (b.num_rows() - offset).min(per - filled);
            parts[part].push(b.slice(offset, take));
            offset += take;
            filled += take;
            if filled == per && part + 1 < n {
                part += 1;
                filled = 0;
            }
        }
    }
    parts.retain(|p| !p.is_empty());
    if parts.is_empty() {
        parts.push(vec![RecordBatch::new_empty(Arc::clone(&schema))]);
    }
    let table = MemTable::try_new(schema, parts)?;
    Ok(LogicalPlanBuilder::scan("input", provider_as_source(Arc::new(table)), None)?.build()?)
}

/// `YYYY-MM-DD` for days since 1970-01-01 (as in a date partition's directory name).
fn date_string(day: i32) -> String {
    reelhouse_event::Day(day).to_string()
}

/// `col IN ('YYYY-MM-DD', …)` for days since 1970-01-01.
pub fn dates_predicate(col: &str, days: &[i32]) -> String {
    let list: Vec<String> = days
        .iter()
        .map(|d| format!("'{}'", date_string(*d)))
        .collect();
    if list.is_empty() {
        return "false".into();
    }
    format!("{col} IN ({})", list.join(", "))
}

/// A handle to a table location that has no table yet; the first write creates it.
fn handle_for_writing(url: &url::Url) -> Result<DeltaTable> {
    if let Ok(dir) = url.to_file_path() {
        std::fs::create_dir_all(dir)?;
    }
    Ok(deltalake::DeltaTableBuilder::from_url(url.clone())?.build()?)
}

/// The last WAL segment committed into a table (`None` before the first commit).
pub async fn committed_segment(table: &DeltaTable) -> Result<Option<u64>> {
    let v = table
        .snapshot()?
        .transaction_version(table.log_store().as_ref(), WAL_APP_ID)
        .await?;
    Ok(v.map(|v| v as u64))
}

impl Error {
    fn from_parquet(e: deltalake::parquet::errors::ParquetError) -> Error {
        Error::Arrow(deltalake::arrow::error::ArrowError::ExternalError(
            Box::new(e),
        ))
    }
}

fn sort_batch(batch: &RecordBatch, t: RawTable) -> Result<RecordBatch> {
    if batch.num_rows() < 2 {
        return Ok(batch.clone());
    }
    let mut keys = vec![t.partition_column()];
    keys.extend_from_slice(t.sort_columns());
    let cols: Vec<SortColumn> = keys
        .iter()
        .filter_map(|k| batch.column_by_name(k))
        .map(|c| SortColumn {
            values: Arc::clone(c),
            options: None,
        })
        .collect();
    let idx = lexsort_to_indices(&cols, None)?;
    Ok(take_record_batch(batch, &idx)?)
}

/// Sum of the sizes of a table's live Parquet files, in bytes.
pub async fn live_bytes(table: &DeltaTable) -> Result<u64> {
    let snapshot = table.snapshot()?;
    let mut total = 0u64;
    for f in snapshot.log_data() {
        total += f.size() as u64;
    }
    Ok(total)
}

#[cfg(test)]
mod tests;
