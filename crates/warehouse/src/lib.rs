//! The star schema: facts, state and aggregates derived from `events` (docs/data-model.md).
//!
//! The events are read once and deduplicated again by `event_id` (DataFusion SQL, `ev`); every
//! model is a Rust function of those Arrow batches ([`views`], [`sessions`], [`transitions`],
//! [`hourly`], [`creator`], [`retention`], the event filters of `fact_engagement` and
//! `fact_follow`; [`cascade`] and [`dims`] beside the others; each module's tests keep the SQL
//! it replaced as the reference), so each table is a pure function of `events` and a rebuild
//! gives the same results (averages up to the last bit: a sum of fractions follows the order
//! the events are read in). Models run in dependency order (in a full rebuild each starts as
//! soon as the models it reads are done, beside the others: see `Ahead`); each result is
//! registered in the session for the models after it and written as one Delta commit
//! (readers see the old or the new version):
//!
//! ```text
//!  events ─dedup─▶ ev ─┬─▶ fact_video_view ─┬─▶ fact_session
//!                      ├─▶ fact_engagement   ├─▶ agg_creator_daily ◀─ like/follow transitions
//!                      ├─▶ fact_follow       ├─▶ agg_video_hourly
//!                      ├─▶ like_state        └─▶ video_retention
//!                      └─▶ follow_state
//! ```
//!
//! The only input besides events is "now" (from the caller's clock), which decides whether a
//! session without `session_end` is `timeout` (30 minutes idle) or still `open`.

use std::collections::HashMap;

mod batch;
mod bucketed;
pub mod cascade;
pub mod creator;
pub mod dims;
pub mod hourly;
mod parallel;
mod plan;
pub mod retention;
pub mod sessions;
pub mod transitions;
pub mod views;

pub use bucketed::{DEFAULT_BUCKET_EVENTS, SCRATCH_DIR};
use parallel::{joined, spawn_cascades, spawn_timed, Ahead, CascadeBatches, Computed, Writes};
use std::time::Instant;

use reelhouse_lake::deltalake::arrow::array::RecordBatch;
use reelhouse_lake::deltalake::arrow::error::ArrowError;
use reelhouse_lake::deltalake::datafusion::datasource::MemTable;
use reelhouse_lake::deltalake::datafusion::error::DataFusionError;
use reelhouse_lake::deltalake::datafusion::prelude::SessionContext;
use reelhouse_lake::deltalake::DeltaTable;
use reelhouse_lake::query::Catalog;
use reelhouse_lake::Lake;
use std::sync::Arc;

/// Errors of materialization.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Lake(#[from] reelhouse_lake::Error),
    #[error("query error in model {model}: {source}")]
    Model {
        model: &'static str,
        source: reelhouse_lake::deltalake::datafusion::error::DataFusionError,
    },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Inactivity that closes a session without `session_end` (docs/data-model.md).
pub const SESSION_TIMEOUT_MS: i64 = 30 * 60 * 1000;
/// Longest session (docs/data-model.md).
pub const SESSION_CAP_MS: i64 = 24 * 3600 * 1000;

/// One model: its table name, partition columns and SQL.
struct Model {
    name: &'static str,
    partition_by: &'static [&'static str],
    /// Registered for later models but not written (helpers).
    internal: bool,
    compute: Compute,
}

/// How a model is computed.
enum Compute {
    /// A DataFusion SQL statement over the models before it.
    Sql(&'static str),
    /// A function of the batches of the models before it (see [`views`], [`hourly`]). In an
    /// incremental rebuild the date-keyed models see the rows of the dates being rewritten;
    /// the models after them every event and (of `fact_video_view`) the columns
    /// [`retention`] reads, from its new version.
    Rust(
        fn(&Prior, &Inputs) -> std::result::Result<RecordBatch, ArrowError>,
        /// The models it reads (a test checks that it needs no other): in a full rebuild it
        /// starts as soon as these are computed, beside the models before it.
        &'static [&'static str],
    ),
}

/// The batches each model computed so far in a rebuild, by name.
#[derive(Default)]
struct Prior(HashMap<&'static str, Vec<RecordBatch>>);

impl Prior {
    fn get(&self, model: &str) -> std::result::Result<&[RecordBatch], ArrowError> {
        self.0
            .get(model)
            .map(Vec::as_slice)
            .ok_or_else(|| ArrowError::SchemaError(format!("model {model} not computed yet")))
    }
}

fn fact_video_view(p: &Prior, _: &Inputs) -> std::result::Result<RecordBatch, ArrowError> {
    views::fact_video_view(p.get("ev")?)
}

fn fact_session(p: &Prior, inputs: &Inputs) -> std::result::Result<RecordBatch, ArrowError> {
    sessions::fact_session(p.get("ev")?, p.get("fact_video_view")?, inputs.now_ms)
}

fn agg_creator_daily(p: &Prior, _: &Inputs) -> std::result::Result<RecordBatch, ArrowError> {
    creator::agg_creator_daily(
        p.get("ev")?,
        p.get("fact_video_view")?,
        p.get("like_transitions")?,
        p.get("follow_transitions")?,
    )
}

fn agg_video_hourly(p: &Prior, _: &Inputs) -> std::result::Result<RecordBatch, ArrowError> {
    hourly::agg_video_hourly(
        p.get("fact_video_view")?,
        p.get("like_transitions")?,
        p.get("ev")?,
    )
}

fn like_transitions(p: &Prior, _: &Inputs) -> std::result::Result<RecordBatch, ArrowError> {
    transitions::transitions(p.get("ev")?, &transitions::LIKES)
}

fn follow_transitions(p: &Prior, _: &Inputs) -> std::result::Result<RecordBatch, ArrowError> {
    transitions::transitions(p.get("ev")?, &transitions::FOLLOWS)
}

fn like_state(p: &Prior, _: &Inputs) -> std::result::Result<RecordBatch, ArrowError> {
    transitions::state(p.get("ev")?, &transitions::LIKES)
}

fn follow_state(p: &Prior, _: &Inputs) -> std::result::Result<RecordBatch, ArrowError> {
    transitions::state(p.get("ev")?, &transitions::FOLLOWS)
}

fn video_retention(p: &Prior, _: &Inputs) -> std::result::Result<RecordBatch, ArrowError> {
    retention::video_retention(p.get("fact_video_view")?)
}

/// The columns the models read, from events not left out by a date closure (see [`Inputs`]).
const EV_COLUMNS: &str = "event_id, event_type, event_time, user_id, session_id, video_id, \
  creator_id, view_id, source, via_share_id, watch_ms, video_duration_ms, comment_id, share_id, \
  parent_share_id, channel, received_at, event_date";
const EV_FILTER: &str = "$closed_at IS NULL OR CAST(received_at AS BIGINT) <= $closed_at * 1000";

/// Events, deduplicated by `event_id` when needed (the earliest received copy wins), out of
/// [`REBUILD_EVENTS`]: every event the models read (see [`load_events`]), or, in an
/// incremental rebuild, the ones [`incremental_dates`] chose (it never has duplicates).
fn ev_sql(has_duplicates: bool) -> String {
    if has_duplicates {
        format!(
            "SELECT {EV_COLUMNS} FROM (SELECT {EV_COLUMNS}, row_number() OVER \
             (PARTITION BY event_id ORDER BY received_at, event_time) AS __rn \
             FROM {REBUILD_EVENTS}) WHERE __rn = 1"
        )
    } else {
        format!("SELECT {EV_COLUMNS} FROM {REBUILD_EVENTS}")
    }
}

/// The events the models read, registered by [`load_events`] (and by [`incremental_dates`]).
const REBUILD_EVENTS: &str = "__rebuild_events";

/// The columns only the dimensions read, loaded with the models' (see [`read_all_events`]).
const DIM_ONLY_COLUMNS: &str = "device_country, device_os, device_app_version";

/// Every stored event in memory, for the dimensions and the models (see [`read_all_events`]).
const ALL_EVENTS: &str = "__all_events";

/// The events a rebuild reads, in memory.
struct Loaded {
    schema: reelhouse_lake::deltalake::arrow::datatypes::SchemaRef,
    batches: Vec<RecordBatch>,
    /// Whether an `event_id` is stored twice (or is null) among them.
    has_duplicates: bool,
}

/// Reads every stored event once, with the columns of the models and of the dimensions
/// ([`DIM_ONLY_COLUMNS`]), and registers them in memory as [`ALL_EVENTS`]: the dimensions
/// read them there and [`load_events`] takes the models' rows out of them, so the Parquet
/// files are scanned once instead of twice (`examples/read_cost.rs`: 1.0–1.1 s of CPU for
/// both column sets at once against 0.9–1.1 s and 0.55–0.59 s apart, on 2M events).
async fn read_all_events(ctx: &SessionContext) -> Result<()> {
    let ev_err = |source| Error::Model {
        model: "ev",
        source,
    };
    let _ = ctx.deregister_table(ALL_EVENTS);
    let sql = format!("SELECT {EV_COLUMNS}, {DIM_ONLY_COLUMNS} FROM events");
    let df = ctx.sql(&sql).await.map_err(ev_err)?;
    let schema = Arc::new(df.schema().as_arrow().clone());
    let all = df.collect().await.map_err(ev_err)?;
    let t = MemTable::try_new(schema, vec![all]).map_err(ev_err)?;
    ctx.register_table(ALL_EVENTS, Arc::new(t))
        .map_err(ev_err)?;
    Ok(())
}

/// Reads every event the models read (those not left out by a date closure, see [`Inputs`])
/// from the table `from` (`events`, or [`ALL_EVENTS`] in memory, where a closure filter that
/// keeps every row copies nothing), checks them for repeated `event_id`s and registers them
/// as [`REBUILD_EVENTS`].
///
/// Ingest dedups within the allowed lateness, so repeats are rare; checking the ids already
/// in memory ([`duplicate_ids`]) costs a fraction of the `count(DISTINCT event_id)` scan it
/// replaced (1.2 s of a 10 s rebuild of 2M events; see docs/performance.md).
async fn load_events(ctx: &SessionContext, closed_at: &str, from: &str) -> Result<Loaded> {
    let ev_err = |source| Error::Model {
        model: "ev",
        source,
    };
    let sql = format!("SELECT {EV_COLUMNS} FROM {from} WHERE {EV_FILTER}")
        .replace("$closed_at", closed_at);
    let df = ctx.sql(&sql).await.map_err(ev_err)?;
    let schema = Arc::new(df.schema().as_arrow().clone());
    let batches = with_schema(Arc::clone(&schema), df.collect().await.map_err(ev_err)?);
    let has_duplicates = duplicate_ids(&batches).map_err(|e| ev_err(e.into()))?;
    let _ = ctx.deregister_table(REBUILD_EVENTS);
    let t = MemTable::try_new(Arc::clone(&schema), vec![batches.clone()]).map_err(ev_err)?;
    ctx.register_table(REBUILD_EVENTS, Arc::new(t))
        .map_err(ev_err)?;
    Ok(Loaded {
        schema,
        batches,
        has_duplicates,
    })
}

/// `batches`, or one empty batch of `schema` when there are none (a query over no rows may
/// return no batch): the Rust models read their input's schema from its batches.
fn with_schema(
    schema: reelhouse_lake::deltalake::arrow::datatypes::SchemaRef,
    batches: Vec<RecordBatch>,
) -> Vec<RecordBatch> {
    if batches.is_empty() {
        vec![RecordBatch::new_empty(schema)]
    } else {
        batches
    }
}

/// Whether any `event_id` of `batches` occurs twice or is null (what `count(*) -
/// count(DISTINCT event_id) > 0` tells), or two ids share a 64-bit hash (about one chance in
/// 10^7 for 2M ids): then the rebuild deduplicates in SQL, which is correct either way.
/// Sorting the hashes touches memory in order; a hash set of the strings took 3-4 % of a
/// rebuild's CPU time in `perf`.
fn duplicate_ids(batches: &[RecordBatch]) -> std::result::Result<bool, ArrowError> {
    use reelhouse_lake::deltalake::arrow::array::Array;
    let mut hashes = Vec::with_capacity(batches.iter().map(|b| b.num_rows()).sum());
    for b in batches {
        let ids = batch::string_views(batch::column(b, "event_id")?)?;
        if ids.null_count() > 0 {
            return Ok(true);
        }
        hashes.extend(
            ids.iter()
                .flatten()
                .map(|id| xxhash_rust::xxh3::xxh3_64(id.as_bytes())),
        );
    }
    // Sorted by their top 16 bits first (a counting sort), then each bucket on its own.
    let hashes = batch::bucket_sort(hashes, 1 << 16, |h| (h >> 48) as usize);
    Ok(hashes.windows(2).any(|w| w[0] == w[1]))
}

/// Integers from the first column of `batches` (cast; e.g. days since epoch), nulls skipped.
pub fn ints_of(batches: &[RecordBatch]) -> std::collections::BTreeSet<i32> {
    use reelhouse_lake::deltalake::arrow::array::{Array, AsArray};
    use reelhouse_lake::deltalake::arrow::datatypes::{DataType, Int32Type};
    let mut out = std::collections::BTreeSet::new();
    for b in batches {
        if let Ok(c) =
            reelhouse_lake::deltalake::arrow::compute::cast(b.column(0), &DataType::Int32)
        {
            let c = c.as_primitive::<Int32Type>();
            out.extend((0..c.len()).filter(|i| !c.is_null(*i)).map(|i| c.value(i)));
        }
    }
    out
}

/// Plans an incremental rebuild from the dates that received events (`seeds`); returns the
/// dates to rewrite, and registers the events to read, out of `events` (every event the
/// models read: [`ev_sql`] without deduplication), as [`REBUILD_EVENTS`].
///
/// Every date-keyed row (a view, a session and the positions of its views, a like or follow
/// transition, a creator-day, a video-hour) is a function of the events of its groups, and
/// sits on the date of one of those events. So:
/// 1. the rows that can change are those of the groups of the seed dates' events (and of the
///    views of their sessions), and the like/follow transitions right after a seed date's
///    event (a transition depends only on the previous event of its key): the dates to
///    rewrite, `W`, are the dates of [`plan::Events::expand`] of the seed dates' events. A
///    session that crosses midnight brings the next date into `W`, but not that date's other
///    sessions, so `W` does not snowball across the calendar;
/// 2. the rows of `W` are recomputed from [`plan::Events::expand`] of all events on `W`:
///    every group with a row on `W` has an event on `W`, so it is read whole. Groups read only in part (reached
///    through a like key, say) have rows only on dates outside `W`, which are dropped; they
///    did not change.
///
/// Dates with sessions still `open` are seeds too (they may have timed out since). Both
/// expansions run in memory over the key columns of `events` (see [`plan`]); when the seeds
/// hold every date of `events`, there is nothing to expand: every date is rewritten from
/// every event, without the index.
///
/// Also returns whether every event is read (then the models can run as in a full rebuild,
/// see [`materialize`]).
pub(crate) async fn incremental_dates(
    catalog: &Catalog,
    seeds: &[i32],
    schema: &reelhouse_lake::deltalake::arrow::datatypes::SchemaRef,
    events: &[RecordBatch],
) -> Result<(Vec<i32>, bool)> {
    use reelhouse_lake::deltalake::arrow::array::BooleanArray;
    use reelhouse_lake::deltalake::arrow::compute::filter_record_batch;
    use std::collections::BTreeSet;
    let mut seeds: BTreeSet<i32> = seeds.iter().copied().collect();
    if catalog
        .context()
        .table_exist("fact_session")
        .unwrap_or(false)
    {
        let open = catalog
            .query("SELECT DISTINCT event_date FROM fact_session WHERE ended_by = 'open'")
            .await?;
        seeds.extend(ints_of(&open));
    }
    let model_err = |source| Error::Model {
        model: "incremental closure",
        source,
    };
    let err = |e: ArrowError| model_err(e.into());
    let stored = plan::dates_of(schema, events).map_err(err)?;
    let (write, read) = if stored.is_subset(&seeds) {
        (seeds, None)
    } else {
        let index = plan::Events::of(schema, events).map_err(err)?;
        let mut write = index.expand(&seeds, true).dates;
        write.extend(seeds);
        if stored.is_subset(&write) {
            // Every date is rewritten: every event is read.
            (write, None)
        } else {
            let read = index.expand(&write, false).read;
            (write, Some(read).filter(|read| !read.iter().all(|r| *r)))
        }
    };
    let every_event = read.is_none();
    // The rows read, batch by batch (the index numbers the rows of `events` in order); all
    // of them as they are when every row is read (one day that holds most events), instead
    // of a copy.
    let read: Vec<RecordBatch> = if let Some(read) = read {
        let mut keep = read.into_iter();
        events
            .iter()
            .map(|b| {
                let mask: BooleanArray = keep.by_ref().take(b.num_rows()).map(Some).collect();
                filter_record_batch(b, &mask)
            })
            .collect::<std::result::Result<_, _>>()
            .map_err(err)?
    } else {
        events.to_vec()
    };
    let ctx = catalog.context();
    let _ = ctx.deregister_table(REBUILD_EVENTS);
    let t = MemTable::try_new(Arc::clone(schema), vec![read]).map_err(model_err)?;
    ctx.register_table(REBUILD_EVENTS, Arc::new(t))
        .map_err(model_err)?;
    Ok((write.into_iter().collect(), every_event))
}

/// `fact_engagement`: the like, unlike, share and comment events, with these columns.
const ENGAGEMENT: (&[&str], &[&str]) = (
    &["like", "unlike", "share", "comment"],
    &[
        "event_id",
        "event_type",
        "user_id",
        "video_id",
        "creator_id",
        "session_id",
        "event_time",
        "comment_id",
        "share_id",
        "parent_share_id",
        "channel",
        "event_date",
    ],
);

/// `fact_follow`: the follow and unfollow events, with these columns.
const FOLLOW: (&[&str], &[&str]) = (
    &["follow_creator", "unfollow_creator"],
    &[
        "event_id",
        "event_type",
        "user_id",
        "creator_id",
        "event_time",
        "event_date",
    ],
);

fn fact_engagement(p: &Prior, _: &Inputs) -> std::result::Result<RecordBatch, ArrowError> {
    batch::events_of_kinds(p.get("ev")?, ENGAGEMENT.0, ENGAGEMENT.1)
}

fn fact_follow(p: &Prior, _: &Inputs) -> std::result::Result<RecordBatch, ArrowError> {
    batch::events_of_kinds(p.get("ev")?, FOLLOW.0, FOLLOW.1)
}

const MODELS: &[Model] = &[
    Model {
        name: "ev",
        partition_by: &[],
        internal: true,
        compute: Compute::Sql("$ev"),
    },
    Model {
        name: "fact_video_view",
        partition_by: &["event_date"],
        internal: false,
        compute: Compute::Rust(fact_video_view, &["ev"]),
    },
    Model {
        name: "fact_session",
        partition_by: &["event_date"],
        internal: false,
        compute: Compute::Rust(fact_session, &["ev", "fact_video_view"]),
    },
    Model {
        name: "fact_engagement",
        partition_by: &["event_date"],
        internal: false,
        compute: Compute::Rust(fact_engagement, &["ev"]),
    },
    Model {
        name: "fact_follow",
        partition_by: &["event_date"],
        internal: false,
        compute: Compute::Rust(fact_follow, &["ev"]),
    },
    Model {
        name: "like_transitions",
        partition_by: &[],
        internal: true,
        compute: Compute::Rust(like_transitions, &["ev"]),
    },
    Model {
        name: "follow_transitions",
        partition_by: &[],
        internal: true,
        compute: Compute::Rust(follow_transitions, &["ev"]),
    },
    Model {
        name: "agg_creator_daily",
        partition_by: &[],
        internal: false,
        compute: Compute::Rust(
            agg_creator_daily,
            &[
                "ev",
                "fact_video_view",
                "like_transitions",
                "follow_transitions",
            ],
        ),
    },
    Model {
        name: "agg_video_hourly",
        partition_by: &["event_date"],
        internal: false,
        compute: Compute::Rust(
            agg_video_hourly,
            &["fact_video_view", "like_transitions", "ev"],
        ),
    },
    Model {
        name: "like_state",
        partition_by: &[],
        internal: false,
        compute: Compute::Rust(like_state, &["ev"]),
    },
    Model {
        name: "follow_state",
        partition_by: &[],
        internal: false,
        compute: Compute::Rust(follow_state, &["ev"]),
    },
    Model {
        name: "video_retention",
        partition_by: &[],
        internal: false,
        compute: Compute::Rust(video_retention, &["fact_video_view"]),
    },
];

/// Names of the tables materialization writes.
pub fn table_names() -> impl Iterator<Item = &'static str> {
    MODELS
        .iter()
        .filter(|m| !m.internal)
        .map(|m| m.name)
        .chain(CASCADE_TABLES.iter().map(|(n, _)| *n))
        .chain(DIM_TABLES)
}

/// Dimension tables, computed in Rust by [`dims`] (not partitioned: one row per version).
const DIM_TABLES: [&str; 4] = ["dim_user", "dim_video", "dim_creator", "dim_date"];

/// Tables computed in Rust by [`cascade`] after the SQL models, with their partition columns.
const CASCADE_TABLES: [(&str, &[&str]); 2] =
    [("fact_share", &["event_date"]), ("share_cascade", &[])];

/// What one materialization did.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Report {
    /// `full` (every date) or `incremental` (only `dates`).
    pub mode: &'static str,
    /// The user buckets a full rebuild ran in (see [`bucketed`]: with one more for the
    /// users whose ids were found in several buckets, when there are such); absent when it
    /// ran in memory.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub buckets: Option<usize>,
    /// The dates whose rows were recomputed in an incremental rebuild (`YYYY-MM-DD`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dates: Option<Vec<String>>,
    /// Time spent finding those dates and the events to read, after reading the events
    /// (incremental only; the read is counted in the `ev` table's time).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub plan_ms: Option<u64>,
    pub tables: Vec<TableReport>,
    pub elapsed_ms: u64,
    /// Share parent links ignored as invalid: self-parents, parents of another video, and one
    /// link per cycle (see [`cascade`]).
    pub share_links_broken: usize,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct TableReport {
    pub table: String,
    pub rows: usize,
    /// Delta version written (`None` for helper models kept in memory only).
    pub version: Option<u64>,
    /// Time to compute and write it (tables computed together, the cascade tables and the
    /// dimensions, each count their group's compute time).
    pub elapsed_ms: u64,
    /// Of which writing the Delta commit (with the rows kept from the previous version).
    pub write_ms: u64,
}

/// What the models read besides `events`.
///
/// Late data (docs/data-model.md): a date *closes* at the first materialization after its end plus the
/// allowed lateness. Events received before their date closed count; events received after
/// it (necessarily later than the allowed lateness) are stored but left out until a
/// restatement of the date, which counts everything received up to the restatement. So the
/// models stay a pure function of (events, closures, restatements).
#[derive(Debug, Clone, Default)]
pub struct Inputs {
    /// "Now", for open vs timed-out sessions.
    pub now_ms: i64,
    /// `(horizon, at_ms)`: at `at_ms`, every date ≤ `horizon` (days since epoch) closed.
    /// Ascending in both.
    pub closures: Vec<(i32, i64)>,
    /// `(from, to, at_ms)`: dates `from..=to` restated at `at_ms`.
    pub restatements: Vec<(i32, i32, i64)>,
    /// Retention (docs/privacy.md): raw events of dates before this day (days since epoch) have been
    /// dropped, so date-keyed facts and aggregates keep their rows for those dates from the
    /// previous version instead of recomputing them from nothing.
    pub frozen_before: Option<i32>,
    /// Facts of dates before this day are dropped (facts retention); aggregates are kept.
    pub facts_before: Option<i32>,
    /// Dates (days since epoch) that received events since the last rebuild: rebuild only the
    /// dates they affect (see [`incremental_dates`]). `None`: rebuild everything.
    pub dirty: Option<Vec<i32>>,
    /// A full rebuild of more events than this runs in user buckets of about this many
    /// events each, so that its memory does not grow with the events stored (0: the default,
    /// [`DEFAULT_BUCKET_EVENTS`]; see [`bucketed`]).
    pub bucket_events: usize,
}

/// The date column of a model whose rows carry over across raw-event retention, and whether it
/// is a fact (subject to facts retention) rather than an aggregate.
fn frozen_column(name: &str) -> Option<(&'static str, bool)> {
    match name {
        "fact_video_view" | "fact_session" | "fact_engagement" | "fact_follow" => {
            Some(("event_date", true))
        }
        "agg_video_hourly" => Some(("event_date", false)),
        "agg_creator_daily" => Some(("date", false)),
        _ => None,
    }
}

/// Rebuilt rows of dates ≥ `frozen_before`, plus the previous version's rows of earlier dates
/// (minus facts older than `facts_before`).
async fn carry_over(
    name: &str,
    current: Option<&DeltaTable>,
    schema: &reelhouse_lake::deltalake::arrow::datatypes::SchemaRef,
    batches: Vec<RecordBatch>,
    inputs: &Inputs,
) -> std::result::Result<
    Vec<RecordBatch>,
    reelhouse_lake::deltalake::datafusion::error::DataFusionError,
> {
    use reelhouse_lake::deltalake::datafusion::prelude::SessionContext;
    let (Some(frozen), Some((col, is_fact))) = (inputs.frozen_before, frozen_column(name)) else {
        return Ok(batches);
    };
    let ctx = SessionContext::new();
    ctx.register_table(
        "new_rows",
        Arc::new(MemTable::try_new(Arc::clone(schema), vec![batches])?),
    )?;
    let day = |d: i32| format!("CAST(DATE '1970-01-01' + INTERVAL '{d} days' AS DATE)");
    let mut sql = format!("SELECT * FROM new_rows WHERE {col} >= {}", day(frozen));
    if let Some(t) = current {
        ctx.register_table("old_rows", t.table_provider().await?)?;
        let mut keep = format!("{col} < {}", day(frozen));
        if let (true, Some(f)) = (is_fact, inputs.facts_before) {
            keep = format!("{keep} AND {col} >= {}", day(f));
        }
        let cols: Vec<String> = schema
            .fields()
            .iter()
            .map(|f| format!("\"{}\"", f.name()))
            .collect();
        sql = format!(
            "{sql} UNION ALL SELECT {} FROM old_rows WHERE {keep}",
            cols.join(", ")
        );
    }
    let out = ctx.sql(&sql).await?.collect().await?;
    // Same column types as the model (the Delta scan may hand out other physical types).
    out.iter()
        .map(|b| {
            let cols = schema
                .fields()
                .iter()
                .zip(b.columns())
                .map(|(f, c)| reelhouse_lake::deltalake::arrow::compute::cast(c, f.data_type()))
                .collect::<std::result::Result<Vec<_>, _>>()?;
            Ok(RecordBatch::try_new(Arc::clone(schema), cols)?)
        })
        .collect()
}

/// The rows of `batches` whose `col` is one of `days` (an incremental rebuild writes only
/// those; rows of dates left out for retention keep their previous version).
async fn keep_dates(
    schema: &reelhouse_lake::deltalake::arrow::datatypes::SchemaRef,
    batches: Vec<RecordBatch>,
    col: &str,
    days: &[i32],
) -> std::result::Result<
    Vec<RecordBatch>,
    reelhouse_lake::deltalake::datafusion::error::DataFusionError,
> {
    use reelhouse_lake::deltalake::datafusion::prelude::SessionContext;
    let ctx = SessionContext::new();
    ctx.register_table(
        "new_rows",
        Arc::new(MemTable::try_new(Arc::clone(schema), vec![batches])?),
    )?;
    let pred = reelhouse_lake::dates_predicate(col, days);
    ctx.sql(&format!("SELECT * FROM new_rows WHERE {pred}"))
        .await?
        .collect()
        .await
}

impl Inputs {
    /// SQL for the epoch-ms instant the row's `event_date` closed (NULL while open).
    fn closed_at_sql(&self) -> String {
        if self.closures.is_empty() {
            return "CAST(NULL AS BIGINT)".into();
        }
        let d = "CAST(event_date AS INT)";
        let base: String = self
            .closures
            .iter()
            .map(|(h, at)| format!("WHEN {d} <= {h} THEN {at} "))
            .collect();
        let base = format!("(CASE {base}END)");
        if self.restatements.is_empty() {
            return base;
        }
        let restated: Vec<String> = self
            .restatements
            .iter()
            .map(|(a, b, at)| format!("CASE WHEN {d} BETWEEN {a} AND {b} THEN {at} END"))
            .collect();
        format!(
            "(CASE WHEN {base} IS NULL THEN NULL ELSE greatest({base}, {}) END)",
            restated.join(", ")
        )
    }
}

/// Computes one model over the models before it (registered in `ctx`; the Rust models read
/// `prior`), or takes its result from `ahead` when it was started there, and registers the
/// result in `ctx`, in memory, and in `prior` for the models after it.
async fn run_model(
    ctx: &reelhouse_lake::deltalake::datafusion::prelude::SessionContext,
    m: &Model,
    ev: &str,
    inputs: &Inputs,
    closed_at: &str,
    prior: &mut Prior,
    ahead: &mut Ahead,
) -> Result<(
    reelhouse_lake::deltalake::arrow::datatypes::SchemaRef,
    Vec<RecordBatch>,
)> {
    let model_err = |source| Error::Model {
        model: m.name,
        source,
    };
    let (schema, batches) = match (&m.compute, ahead.0.remove(m.name)) {
        (_, Some(task)) => {
            let (batch, _) = joined(task, m.name).await?;
            (batch.schema(), vec![batch])
        }
        (Compute::Sql(sql), None) => {
            let sql = sql
                .replace("$ev", ev)
                .replace("$now_ms", &inputs.now_ms.to_string())
                .replace("$closed_at", closed_at);
            let df = ctx.sql(&sql).await.map_err(model_err)?;
            let schema = Arc::new(df.schema().as_arrow().clone());
            let batches = df.collect().await.map_err(model_err)?;
            (Arc::clone(&schema), with_schema(schema, batches))
        }
        (Compute::Rust(f, _), None) => {
            let batch = f(prior, inputs).map_err(|e| model_err(e.into()))?;
            (batch.schema(), vec![batch])
        }
    };
    prior.0.insert(m.name, batches.clone());
    let _ = ctx.deregister_table(m.name);
    let mem = MemTable::try_new(Arc::clone(&schema), vec![batches.clone()]).map_err(model_err)?;
    ctx.register_table(m.name, Arc::new(mem))
        .map_err(model_err)?;
    Ok((schema, batches))
}

/// The models `agg_creator_daily` is computed from, in order.
const CREATOR_DAILY_CHAIN: [&str; 5] = [
    "ev",
    "fact_video_view",
    "like_transitions",
    "follow_transitions",
    "agg_creator_daily",
];

/// `agg_creator_daily` alone, computed from `events` in memory with the models it needs and
/// written nowhere: the same work as one aggregation query over the raw Parquet files, for
/// `reelhouse bench materialize` to compare with DuckDB running that query.
pub async fn creator_daily_in_memory(
    catalog: &Catalog,
    inputs: &Inputs,
) -> Result<Vec<RecordBatch>> {
    let closed_at = inputs.closed_at_sql();
    let ev = ev_sql(
        load_events(catalog.context(), &closed_at, "events")
            .await?
            .has_duplicates,
    );
    let mut prior = Prior::default();
    let mut ahead = Ahead::default();
    let mut out = Vec::new();
    for name in CREATOR_DAILY_CHAIN {
        let Some(m) = MODELS.iter().find(|m| m.name == name) else {
            continue;
        };
        ahead.start_ready(
            MODELS
                .iter()
                .filter(|m| CREATOR_DAILY_CHAIN.contains(&m.name)),
            &prior,
            inputs,
        );
        out = run_model(
            catalog.context(),
            m,
            &ev,
            inputs,
            &closed_at,
            &mut prior,
            &mut ahead,
        )
        .await?
        .1;
    }
    Ok(out)
}

/// Rebuilds every model from `events` as seen by `catalog` and writes each as one Delta
/// commit. `current` gives the derived tables' present handles (to write new versions of);
/// returns the new handles with the report.
pub async fn materialize(
    catalog: &Catalog,
    lake: &Lake,
    current: &HashMap<String, DeltaTable>,
    inputs: &Inputs,
) -> Result<(Report, Vec<(String, DeltaTable)>)> {
    if let Some(buckets) = full_rebuild_buckets(catalog, inputs).await? {
        if let Some(done) =
            bucketed::materialize_in_buckets(catalog, lake, current, inputs, buckets).await?
        {
            return Ok(done);
        }
    }
    let start = Instant::now();
    let ctx = catalog.context();
    let mut report = Report::default();
    let mut handles: Vec<(String, DeltaTable)> = Vec::new();
    let closed_at = inputs.closed_at_sql();
    // The dimensions read every stored event and nothing else: they start on the events
    // read for the models as soon as those are in memory, and run beside the models.
    read_all_events(ctx).await?;
    let dims_task = {
        let ctx = ctx.clone();
        spawn_timed(async move { dims::batches(&ctx, ALL_EVENTS).await })
    };
    let loaded = load_events(ctx, &closed_at, ALL_EVENTS).await?;
    let read_took = start.elapsed();
    let has_duplicates = loaded.has_duplicates;
    // An incremental rebuild plans over the events read and feeds the models after the
    // date-keyed ones with them. Not when an `event_id` is stored twice: its copies may sit
    // on any date, and which one counts is decided over all of them.
    let all_ev = match &inputs.dirty {
        Some(_) if !has_duplicates && table_names().all(|t| current.contains_key(t)) => {
            Some((loaded.schema, loaded.batches))
        }
        _ => None,
    };
    // Whether the models read every event: in a full rebuild, and in an incremental one
    // whose dates reach every event (one day that holds most of them, or every date). Then
    // they run as in a full rebuild, each as soon as its inputs are done; an incremental
    // one still writes only its dates.
    let (scope, reads_all) = match (&inputs.dirty, &all_ev) {
        (Some(seeds), Some((schema, events))) => {
            let (dates, all) = incremental_dates(catalog, seeds, schema, events).await?;
            (Some(dates), all)
        }
        _ => (None, true),
    };
    report.plan_ms = scope
        .is_some()
        .then(|| (start.elapsed() - read_took).as_millis() as u64);
    report.mode = if scope.is_some() {
        "incremental"
    } else {
        "full"
    };
    report.dates = scope.as_ref().map(|d| {
        d.iter()
            .map(|d| reelhouse_event::Day(*d).to_string())
            .collect()
    });
    // Retention: expired dates keep their rows (their events are gone).
    let scope = scope.map(|mut d| {
        d.retain(|d| inputs.frozen_before.is_none_or(|f| *d >= f));
        d
    });
    let ev = ev_sql(has_duplicates);
    // Writes run as tasks beside the models after them (encoding Parquet is most of a
    // write's time, and a model's SQL leaves a core idle part of the time); the cascades
    // are computed beside the models from when `ev` and `fact_video_view` are complete.
    let mut writes = Writes::default();
    let mut cascade_task: Option<Computed<CascadeBatches>> = None;
    let mut switched = false;
    let mut prior = Prior::default();
    let mut ahead = Ahead::default();
    let mut dims_task = Some(dims_task);
    let mut cascades_written = false;
    let order = if reads_all {
        full_rebuild_order()
    } else {
        MODELS.iter().collect()
    };
    for m in order {
        let model_start = Instant::now();
        if reads_all {
            // Every model reads every event, so a model may start as soon as its inputs
            // are done. (An incremental one that reads only some switches inputs part way.)
            ahead.start_ready(MODELS, &prior, inputs);
            // The tables computed beside the models are written as soon as they are done,
            // on the core the models before `fact_video_view` leave idle while it runs.
            if dims_task.as_ref().is_some_and(|t| t.is_finished()) {
                let task = dims_task.take().expect("checked above");
                write_dims(task, &mut writes, &mut report, lake, current).await?;
            }
            if cascade_task.as_ref().is_some_and(|t| t.is_finished()) {
                let task = cascade_task.take().expect("checked above");
                write_cascades(task, &mut writes, &mut report, lake, current).await?;
                cascades_written = true;
            }
        }
        let dated = frozen_column(m.name).map(|(col, _)| col);
        if let (Some(_), None, false, false) = (&scope, dated, m.internal, reads_all) {
            if !switched {
                // The models after the date-keyed ones (state, retention curves, cascades)
                // read every event and every view: the dates just rebuilt plus the rest.
                switched = true;
                if let Some((schema, events)) = &all_ev {
                    let ev_err = |source| Error::Model {
                        model: "ev",
                        source,
                    };
                    let all = MemTable::try_new(Arc::clone(schema), vec![events.clone()])
                        .map_err(ev_err)?;
                    let _ = ctx.deregister_table("ev");
                    ctx.register_table("ev", Arc::new(all)).map_err(ev_err)?;
                    prior.0.insert("ev", events.clone());
                }
                // The new version of `fact_video_view` must be committed to be read whole.
                writes.finish(&mut report, &mut handles).await?;
                let fvv = handles
                    .iter()
                    .find(|(n, _)| n == "fact_video_view")
                    .map(|(_, t)| t)
                    .or_else(|| current.get("fact_video_view"));
                if let Some(t) = fvv {
                    let provider = t.table_provider().await.map_err(|e| Error::Model {
                        model: "fact_video_view",
                        source: e,
                    })?;
                    let fvv_err = |source| Error::Model {
                        model: "fact_video_view",
                        source,
                    };
                    let _ = ctx.deregister_table("fact_video_view");
                    ctx.register_table("fact_video_view", provider)
                        .map_err(fvv_err)?;
                    // The columns the Rust models after this point read (retention curves).
                    let whole = ctx
                        .sql(
                            "SELECT video_id, watch_ms, video_duration_ms, has_end \
                             FROM fact_video_view",
                        )
                        .await
                        .map_err(fvv_err)?
                        .collect()
                        .await
                        .map_err(fvv_err)?;
                    prior.0.insert("fact_video_view", whole);
                }
                cascade_task = Some(spawn_cascades(ctx, &prior));
            }
        }
        let model_err = |source| Error::Model {
            model: m.name,
            source,
        };
        let (schema, batches) =
            run_model(ctx, m, &ev, inputs, &closed_at, &mut prior, &mut ahead).await?;
        if reads_all && m.name == "fact_video_view" {
            cascade_task = Some(spawn_cascades(ctx, &prior));
        }
        let rows = batches.iter().map(|b| b.num_rows()).sum();
        let mut entry = TableReport {
            table: m.name.to_string(),
            rows,
            version: None,
            // `ev`'s time includes reading the events (before planning, if any).
            elapsed_ms: (model_start.elapsed()
                + if m.name == "ev" {
                    read_took
                } else {
                    std::time::Duration::ZERO
                })
            .as_millis() as u64,
            write_ms: 0,
        };
        if m.internal {
            report.tables.push(entry);
            continue;
        }
        let lake = lake.clone();
        let cur = current.get(m.name).cloned();
        match (&scope, dated) {
            (Some(dates), Some(_)) if dates.is_empty() && cur.is_some() => {
                // Nothing to recompute for date-keyed tables: their version stays.
                entry.rows = 0;
                report.tables.push(entry);
            }
            (Some(dates), Some(col)) if cur.is_some() => {
                let batches = keep_dates(&schema, batches, col, dates)
                    .await
                    .map_err(model_err)?;
                let dates = dates.clone();
                writes.spawn(&mut report, entry, async move {
                    let cur = cur.expect("checked above");
                    lake.replace_dates(m.name, cur, schema, batches, col, &dates)
                        .await
                });
            }
            _ => {
                let batches = carry_over(m.name, cur.as_ref(), &schema, batches, inputs)
                    .await
                    .map_err(model_err)?;
                let batches = with_schema(Arc::clone(&schema), batches);
                writes.spawn(&mut report, entry, async move {
                    lake.overwrite_derived(m.name, cur, schema, batches, m.partition_by)
                        .await
                });
            }
        }
    }
    if !cascades_written {
        let task = cascade_task.unwrap_or_else(|| spawn_cascades(ctx, &prior));
        write_cascades(task, &mut writes, &mut report, lake, current).await?;
    }
    if let Some(task) = dims_task {
        write_dims(task, &mut writes, &mut report, lake, current).await?;
    }
    let _ = ctx.deregister_table(ALL_EVENTS);
    writes.finish(&mut report, &mut handles).await?;
    // Written in the order they were done; reported in the tables' order.
    report.tables.sort_by_key(|t| table_rank(&t.table));
    report.elapsed_ms = start.elapsed().as_millis() as u64;
    Ok((report, handles))
}

/// How many user buckets a rebuild runs in ([`bucketed`]), or `None` to run in memory: an
/// incremental rebuild, one after raw-event retention (its expired dates keep their rows),
/// or one of at most [`Inputs::bucket_events`] events.
async fn full_rebuild_buckets(catalog: &Catalog, inputs: &Inputs) -> Result<Option<usize>> {
    if inputs.dirty.is_some() || inputs.frozen_before.is_some() {
        return Ok(None);
    }
    let per = match inputs.bucket_events {
        0 => DEFAULT_BUCKET_EVENTS,
        n => n,
    };
    let n = catalog.query("SELECT count(*) FROM events").await?;
    let events = first_count(&n);
    Ok(Some(events.div_ceil(per as u64) as usize).filter(|b| *b > 1))
}

/// The first value of the first column of `batches` as a count (0 when none).
fn first_count(batches: &[RecordBatch]) -> u64 {
    use reelhouse_lake::deltalake::arrow::array::{Array, AsArray};
    use reelhouse_lake::deltalake::arrow::datatypes::{DataType, UInt64Type};
    batches
        .iter()
        .find(|b| b.num_rows() > 0)
        .and_then(|b| {
            reelhouse_lake::deltalake::arrow::compute::cast(b.column(0), &DataType::UInt64).ok()
        })
        .map_or(0, |c| {
            let c = c.as_primitive::<UInt64Type>();
            if c.is_valid(0) {
                c.value(0)
            } else {
                0
            }
        })
}

/// The order a full rebuild takes the models in: first those that do not read
/// `fact_video_view` (directly or through another model), then the rest, each group in
/// [`MODELS`]' order. The models run ahead as soon as their inputs are done (see [`Ahead`]),
/// but each is written when the loop takes it: in [`MODELS`]' order the event filters and the
/// state tables waited behind `fact_video_view` (about 0.5 s of one core on 2M events, the
/// other core idle for part of it) and were written at the end.
fn full_rebuild_order() -> Vec<&'static Model> {
    fn reads_views(m: &Model) -> bool {
        match m.compute {
            Compute::Sql(_) => false,
            Compute::Rust(_, reads) => reads.iter().any(|r| {
                *r == "fact_video_view"
                    || MODELS
                        .iter()
                        .find(|x| x.name == *r)
                        .is_some_and(reads_views)
            }),
        }
    }
    let (mut order, rest): (Vec<_>, Vec<_>) = MODELS
        .iter()
        .partition(|m| m.name != "fact_video_view" && !reads_views(m));
    order.extend(rest);
    order
}

/// Where `table` comes in a [`Report`]: the models' order, then the cascade tables, then the
/// dimensions.
fn table_rank(table: &str) -> usize {
    MODELS
        .iter()
        .map(|m| m.name)
        .chain(CASCADE_TABLES.iter().map(|(n, _)| *n))
        .chain(DIM_TABLES)
        .position(|n| n == table)
        .unwrap_or(usize::MAX)
}

/// Starts the writes of the share cascade tables once their task is done.
async fn write_cascades(
    task: Computed<CascadeBatches>,
    writes: &mut Writes,
    report: &mut Report,
    lake: &Lake,
    current: &HashMap<String, DeltaTable>,
) -> Result<()> {
    let ((fact, tree, broken), took) = joined(task, "share_cascade").await?;
    report.share_links_broken = broken;
    let tables = CASCADE_TABLES.into_iter().zip([fact, tree]);
    for ((name, partition_by), batch) in tables {
        write_whole(
            writes,
            report,
            lake,
            current,
            (name, partition_by, batch, took),
        );
    }
    Ok(())
}

/// Starts the writes of the dimension tables once their task is done.
async fn write_dims(
    task: Computed<Vec<(&'static str, RecordBatch)>>,
    writes: &mut Writes,
    report: &mut Report,
    lake: &Lake,
    current: &HashMap<String, DeltaTable>,
) -> Result<()> {
    let (dims, took) = joined(task, "dim_*").await?;
    for (name, batch) in dims {
        write_whole(writes, report, lake, current, (name, &[], batch, took));
    }
    Ok(())
}

/// Starts the write of a table computed outside the models' loop, `(name, partition
/// columns, rows, time to compute)`, over its current version.
fn write_whole(
    writes: &mut Writes,
    report: &mut Report,
    lake: &Lake,
    current: &HashMap<String, DeltaTable>,
    (name, partition_by, batch, compute): (
        &'static str,
        &'static [&'static str],
        RecordBatch,
        std::time::Duration,
    ),
) {
    let entry = TableReport {
        table: name.to_string(),
        rows: batch.num_rows(),
        version: None,
        elapsed_ms: compute.as_millis() as u64,
        write_ms: 0,
    };
    let (lake, cur) = (lake.clone(), current.get(name).cloned());
    writes.spawn(report, entry, async move {
        lake.overwrite_derived(name, cur, batch.schema(), vec![batch], partition_by)
            .await
    });
}

#[cfg(test)]
mod tests;
