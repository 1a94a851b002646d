//! A full rebuild in user buckets, whose memory does not grow with the events stored
//! (docs/data-model.md, "A full rebuild in user buckets").
//!
//! ```text
//!  events ─scan─┬─▶ dimension facts (a few values per id) ────────────────────▶ dim_*
//!               ├─▶ event_id hashes (8 bytes per event: repeated ids?)
//!               └─▶ bucket = hash(user_id) mod B ─▶ _tmp/rebuild-…/bucket-b.arrow
//!  per bucket:  read ─▶ ev ─▶ per-user models ─┬─▶ fact_* and *_state: files of the streamed
//!                                              │   rewrite (one commit per table at the end)
//!                                              ├─▶ agg_creator_daily, agg_video_hourly,
//!                                              │   video_retention: counters summed
//!                                              └─▶ share events, share views (for cascades)
//!  end:         shares counted once over every share event; cascades; every commit
//! ```
//!
//! Every model but the share cascades and the dimensions is a function of groups that belong
//! to one user: a view (`view_id`), a session (`session_id`), a like or follow key (user and
//! target), and the views without a session (numbered as one group). The aggregates sum
//! counters over those groups, and unique viewers add up across buckets because a user is in
//! one. So the rows of a bucket are the rows a rebuild of every event gives for its users, and
//! the aggregates the same sums, as long as no group spans two buckets: no `view_id`,
//! `session_id` or `event_id` (a copy stored twice: which one counts is decided over all of
//! them) in events of users of two buckets, and views without a session in at most one. The
//! scan finds the ids that occur in more than one bucket (hashed, 8 bytes per distinct id per
//! bucket), and every event of the users that have one goes to one more bucket, processed
//! last: groups are whole in one bucket either way. Distinct shares are counted over every
//! share event at the end, since two users' events may name one `share_id`.

use std::fs::File;
use std::io::{BufReader, BufWriter};
use std::path::{Path, PathBuf};

use futures::StreamExt;
use reelhouse_lake::deltalake::arrow::array::{Array, RecordBatch, UInt32Array};
use reelhouse_lake::deltalake::arrow::compute::take_record_batch;
use reelhouse_lake::deltalake::arrow::datatypes::SchemaRef;
use reelhouse_lake::deltalake::arrow::ipc::reader::FileReader;
use reelhouse_lake::deltalake::arrow::ipc::writer::FileWriter;
use reelhouse_lake::Streamed;

use super::*;
use crate::creator::CreatorDaily;
use crate::hourly::VideoHourly;
use crate::retention::VideoRetention;

/// Events per bucket of a full rebuild, unless the caller says otherwise
/// ([`Inputs::bucket_events`]); a rebuild of fewer events runs in memory, as one bucket.
pub const DEFAULT_BUCKET_EVENTS: usize = 1 << 19;

/// The directory under the data directory where a rebuild in buckets keeps its bucket files
/// while it runs (the engine removes what a crash left behind when it opens).
pub const SCRATCH_DIR: &str = "_tmp";

/// The name a bucket's events are registered under, before the date closures.
const BUCKET_EVENTS: &str = "__bucket_events";

/// The per-user models a bucket computes, in an order that puts each after what it reads.
const PER_USER: [&str; 9] = [
    "ev",
    "fact_video_view",
    "fact_engagement",
    "fact_follow",
    "like_transitions",
    "follow_transitions",
    "like_state",
    "follow_state",
    "fact_session",
];

/// The columns of a share event that the cascades and the share counts read.
const SHARE_COLUMNS: [&str; 11] = [
    "event_id",
    "event_type",
    "event_time",
    "user_id",
    "video_id",
    "creator_id",
    "share_id",
    "parent_share_id",
    "channel",
    "received_at",
    "event_date",
];

/// The bucket of a user (`None`: events without one, all in bucket 0).
fn bucket_of(user: Option<i64>, buckets: usize) -> usize {
    user.map_or(0, |u| {
        ((u as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 32) as usize % buckets
    })
}

/// The scratch directory of one rebuild, removed with everything in it when dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn new(root: &Path) -> std::io::Result<Scratch> {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let dir = root
            .join(SCRATCH_DIR)
            .join(format!("rebuild-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        Ok(Scratch(dir))
    }

    fn bucket(&self, b: usize) -> PathBuf {
        self.0.join(format!("bucket-{b}.arrow"))
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn io_err(model: &'static str) -> impl Fn(std::io::Error) -> Error {
    move |e| Error::Model {
        model,
        source: DataFusionError::External(Box::new(e)),
    }
}

fn arrow_err(model: &'static str) -> impl Fn(ArrowError) -> Error {
    move |e| Error::Model {
        model,
        source: e.into(),
    }
}

/// What the scan of `events` leaves: the buckets' files, the dimensions' facts, and the
/// hashed ids that occur in more than one bucket.
struct Scanned {
    facts: dims::EventFacts,
    schema: Option<SchemaRef>,
    shared: foldhash::HashSet<u64>,
}

/// The hashes of one bucket's ids (see [`group_ids`]), kept sorted and deduplicated.
#[derive(Default)]
struct BucketIds {
    ids: Vec<u64>,
    /// The last hash pushed of each kind (events come sorted by user and session, so a
    /// session's or view's id repeats on consecutive rows).
    last: [u64; 4],
    /// The length at which the list is sorted and deduplicated again.
    compact_at: usize,
}

impl BucketIds {
    fn push(&mut self, kind: usize, h: u64) {
        if self.last[kind] != h || self.ids.is_empty() {
            self.last[kind] = h;
            self.ids.push(h);
            if self.ids.len() >= self.compact_at {
                self.compact();
                self.compact_at = (self.ids.len() * 2).max(1 << 16);
            }
        }
    }

    fn compact(&mut self) {
        self.ids.sort_unstable();
        self.ids.dedup();
    }
}

/// The hashed ids of an event that tie it to events of other users, if they share them: its
/// `event_id` (a copy stored twice), `view_id` and `session_id`, and, for a view event
/// without a session, the group of views without one (numbered together). Seeded by kind;
/// a 64-bit collision only moves more users to the shared bucket, which keeps the rows
/// exact.
fn group_ids(c: &GroupCols, i: usize, mut each: impl FnMut(usize, u64)) {
    use xxhash_rust::xxh3::xxh3_64_with_seed;
    fn text(
        a: &reelhouse_lake::deltalake::arrow::array::StringViewArray,
        i: usize,
    ) -> Option<&str> {
        a.is_valid(i).then(|| a.value(i))
    }
    each(
        0,
        text(&c.event, i).map_or(0, |e| xxh3_64_with_seed(e.as_bytes(), 1)),
    );
    let session = text(&c.session, i);
    if let Some(s) = session {
        each(1, xxh3_64_with_seed(s.as_bytes(), 2));
    }
    if let Some(v) = text(&c.view, i) {
        each(2, xxh3_64_with_seed(v.as_bytes(), 3));
        if session.is_none() {
            each(3, 1);
        }
    }
}

/// The id columns [`group_ids`] reads.
struct GroupCols {
    event: reelhouse_lake::deltalake::arrow::array::StringViewArray,
    session: reelhouse_lake::deltalake::arrow::array::StringViewArray,
    view: reelhouse_lake::deltalake::arrow::array::StringViewArray,
}

impl GroupCols {
    fn of(b: &RecordBatch) -> std::result::Result<GroupCols, ArrowError> {
        let s = |n: &str| batch::string_views(batch::column(b, n)?);
        Ok(GroupCols {
            event: s("event_id")?,
            session: s("session_id")?,
            view: s("view_id")?,
        })
    }
}

/// The values that occur in more than one of the sorted, deduplicated `lists`.
fn in_several(lists: &[Vec<u64>]) -> foldhash::HashSet<u64> {
    use std::cmp::Reverse;
    use std::collections::BinaryHeap;
    let mut heap: BinaryHeap<Reverse<(u64, usize, usize)>> = lists
        .iter()
        .enumerate()
        .filter_map(|(n, l)| l.first().map(|v| Reverse((*v, n, 0))))
        .collect();
    let mut out = foldhash::HashSet::default();
    let mut last: Option<u64> = None;
    while let Some(Reverse((v, n, at))) = heap.pop() {
        if last == Some(v) {
            out.insert(v);
        }
        last = Some(v);
        if let Some(next) = lists[n].get(at + 1) {
            heap.push(Reverse((*next, n, at + 1)));
        }
    }
    out
}

/// `b` with its string view columns as plain strings: a row taken out of a view array still
/// points into every data buffer of the batch, which the IPC writer would write whole for
/// each bucket.
fn compacted(b: &RecordBatch) -> std::result::Result<RecordBatch, ArrowError> {
    use reelhouse_lake::deltalake::arrow::datatypes::{DataType, Field, Schema};
    let fields: Vec<Field> = b
        .schema()
        .fields()
        .iter()
        .map(|f| match f.data_type() {
            DataType::Utf8View => f.as_ref().clone().with_data_type(DataType::Utf8),
            _ => f.as_ref().clone(),
        })
        .collect();
    let columns = b
        .columns()
        .iter()
        .zip(&fields)
        .map(|(c, f)| reelhouse_lake::deltalake::arrow::compute::cast(c, f.data_type()))
        .collect::<std::result::Result<Vec<_>, _>>()?;
    RecordBatch::try_new(Arc::new(Schema::new(fields)), columns)
}

/// Reads every stored event once: folds the dimensions' facts, hashes each event's ids by
/// bucket and writes its model columns to its user's bucket file.
async fn scan(ctx: &SessionContext, scratch: &Scratch, buckets: usize) -> Result<Scanned> {
    let ev_err = |source| Error::Model {
        model: "ev",
        source,
    };
    let sql = format!("SELECT {EV_COLUMNS}, {DIM_ONLY_COLUMNS} FROM events");
    let mut stream = ctx
        .sql(&sql)
        .await
        .map_err(ev_err)?
        .execute_stream()
        .await
        .map_err(ev_err)?;
    // The dimensions' facts fold beside the split (a channel of a few batches).
    let (to_facts, mut batches) = tokio::sync::mpsc::channel::<RecordBatch>(4);
    let folding = tokio::spawn(async move {
        let mut facts = dims::EventFacts::default();
        while let Some(b) = batches.recv().await {
            facts.add(&b)?;
        }
        Ok::<_, DataFusionError>(facts)
    });
    let mut ids: Vec<BucketIds> = (0..buckets).map(|_| BucketIds::default()).collect();
    let mut writers: Vec<Option<FileWriter<BufWriter<File>>>> =
        (0..buckets).map(|_| None).collect();
    let mut schema: Option<SchemaRef> = None;
    let mut pending: Vec<(Vec<RecordBatch>, usize)> =
        (0..buckets).map(|_| Default::default()).collect();
    while let Some(b) = stream.next().await {
        let b = b.map_err(ev_err)?;
        if to_facts.send(b.clone()).await.is_err() {
            break; // the fold failed: its error is returned below
        }
        let keep: Vec<usize> = (0..b.num_columns())
            .filter(|i| !DIM_ONLY_COLUMNS.contains(b.schema().field(*i).name().as_str()))
            .collect();
        let b = compacted(&b.project(&keep).map_err(arrow_err("ev"))?).map_err(arrow_err("ev"))?;
        let s = schema.get_or_insert_with(|| b.schema()).clone();
        let users = batch::int64s(batch::column(&b, "user_id").map_err(arrow_err("ev"))?)
            .map_err(arrow_err("ev"))?;
        let cols = GroupCols::of(&b).map_err(arrow_err("ev"))?;
        let mut rows: Vec<Vec<u32>> = vec![Vec::new(); buckets];
        for i in 0..b.num_rows() {
            let u = users.is_valid(i).then(|| users.value(i));
            let n = bucket_of(u, buckets);
            rows[n].push(i as u32);
            group_ids(&cols, i, |k, h| ids[n].push(k, h));
        }
        for (n, r) in rows.into_iter().enumerate().filter(|(_, r)| !r.is_empty()) {
            let part = take_record_batch(&b, &UInt32Array::from(r)).map_err(arrow_err("ev"))?;
            pending[n].1 += part.num_rows();
            pending[n].0.push(part);
            if pending[n].1 >= SPILL_ROWS {
                spill(&mut writers[n], &mut pending[n], scratch.bucket(n), &s)?;
            }
        }
    }
    if let Some(s) = &schema {
        for (n, p) in pending.iter_mut().enumerate() {
            if p.1 > 0 {
                spill(&mut writers[n], p, scratch.bucket(n), s)?;
            }
        }
    }
    for w in writers.into_iter().flatten() {
        close(w)?;
    }
    drop(to_facts);
    let facts = folding
        .await
        .map_err(|join| Error::Model {
            model: "dim_*",
            source: DataFusionError::External(Box::new(join)),
        })?
        .map_err(|source| Error::Model {
            model: "dim_*",
            source,
        })?;
    let lists: Vec<Vec<u64>> = ids
        .into_iter()
        .map(|mut b| {
            b.compact();
            b.ids
        })
        .collect();
    Ok(Scanned {
        facts,
        schema,
        shared: in_several(&lists),
    })
}

/// Flushes and closes a bucket file.
fn close(w: FileWriter<BufWriter<File>>) -> Result<()> {
    w.into_inner()
        .and_then(|mut f| {
            use std::io::Write;
            f.flush().map_err(Into::into)
        })
        .map_err(arrow_err("ev"))?;
    Ok(())
}

/// Splits a bucket's events into those that stay and those that go to the shared bucket:
/// every event of a user with an id in `shared` (see [`Scanned`]) goes, and so does every
/// event of a user who shares an id with a user who goes (and so on), so that no group is
/// split between the two.
fn split_shared(
    events: Vec<RecordBatch>,
    shared: &foldhash::HashSet<u64>,
) -> std::result::Result<(Vec<RecordBatch>, Vec<RecordBatch>), ArrowError> {
    type User = Option<i64>;
    if shared.is_empty() {
        return Ok((events, Vec::new()));
    }
    let mut moved: foldhash::HashSet<User> = Default::default();
    // The users of each id: the first one seen, and all of them for ids of several.
    let mut first: foldhash::HashMap<u64, User> = Default::default();
    let mut several: foldhash::HashMap<u64, Vec<User>> = Default::default();
    for b in &events {
        let users = batch::int64s(batch::column(b, "user_id")?)?;
        let cols = GroupCols::of(b)?;
        for i in 0..b.num_rows() {
            let u = users.is_valid(i).then(|| users.value(i));
            group_ids(&cols, i, |_, h| {
                if shared.contains(&h) {
                    moved.insert(u);
                }
                let f = *first.entry(h).or_insert(u);
                if f != u {
                    let all = several.entry(h).or_insert_with(|| vec![f]);
                    if !all.contains(&u) {
                        all.push(u);
                    }
                }
            });
        }
    }
    drop(first);
    if moved.is_empty() {
        return Ok((events, Vec::new()));
    }
    // Users who share an id with a user who goes go too.
    let mut ids_of: foldhash::HashMap<User, Vec<u64>> = Default::default();
    for (h, users) in &several {
        for u in users {
            ids_of.entry(*u).or_default().push(*h);
        }
    }
    let mut todo: Vec<User> = moved.iter().copied().collect();
    while let Some(u) = todo.pop() {
        for h in ids_of.get(&u).into_iter().flatten() {
            for v in &several[h] {
                if moved.insert(*v) {
                    todo.push(*v);
                }
            }
        }
    }
    let (mut stay, mut go) = (Vec::new(), Vec::new());
    for b in events {
        let users = batch::int64s(batch::column(&b, "user_id")?)?;
        let mask: reelhouse_lake::deltalake::arrow::array::BooleanArray = (0..b.num_rows())
            .map(|i| Some(moved.contains(&users.is_valid(i).then(|| users.value(i)))))
            .collect();
        go.push(reelhouse_lake::deltalake::arrow::compute::filter_record_batch(&b, &mask)?);
        let keep = reelhouse_lake::deltalake::arrow::compute::not(&mask)?;
        stay.push(reelhouse_lake::deltalake::arrow::compute::filter_record_batch(&b, &keep)?);
    }
    Ok((stay, go))
}

/// Rows a bucket gathers before they are written to its file as one batch (the scan's
/// batches split into many small parts; the models run faster on larger batches).
const SPILL_ROWS: usize = 16_384;

/// Writes the rows gathered for a bucket as one batch to its file (created on first use).
fn spill(
    writer: &mut Option<FileWriter<BufWriter<File>>>,
    pending: &mut (Vec<RecordBatch>, usize),
    path: PathBuf,
    schema: &SchemaRef,
) -> Result<()> {
    let rows = reelhouse_lake::deltalake::arrow::compute::concat_batches(schema, &pending.0)
        .map_err(arrow_err("ev"))?;
    *pending = Default::default();
    if writer.is_none() {
        let f = File::create(path).map_err(io_err("ev"))?;
        *writer = Some(
            FileWriter::try_new(BufWriter::with_capacity(1 << 20, f), schema)
                .map_err(arrow_err("ev"))?,
        );
    }
    if let Some(w) = writer.as_mut() {
        w.write(&rows).map_err(arrow_err("ev"))?;
    }
    Ok(())
}

/// The events of bucket `b` (none when no event fell in it).
fn read_bucket(scratch: &Scratch, b: usize) -> Result<Vec<RecordBatch>> {
    let path = scratch.bucket(b);
    if !path.exists() {
        return Ok(Vec::new());
    }
    let f = File::open(path).map_err(io_err("ev"))?;
    let r =
        FileReader::try_new(BufReader::with_capacity(1 << 20, f), None).map_err(arrow_err("ev"))?;
    r.collect::<std::result::Result<Vec<_>, _>>()
        .map_err(arrow_err("ev"))
}

/// A table written as its rows come (see [`Streamed`]), with what the report says of it.
struct Output {
    name: &'static str,
    partition_by: &'static [&'static str],
    writer: Option<Streamed>,
    rows: usize,
    write: std::time::Duration,
}

/// What the buckets leave for the end: summed aggregates, share inputs, ids to check.
#[derive(Default)]
struct Sums {
    creator: CreatorDaily,
    hourly: VideoHourly,
    retention: VideoRetention,
    share_events: Vec<RecordBatch>,
    share_views: Vec<(String, i64)>,
    took: std::time::Duration,
}

impl Sums {
    /// Adds one bucket's models.
    fn add(&mut self, prior: &Prior) -> std::result::Result<(), ArrowError> {
        let start = Instant::now();
        let (ev, fvv) = (prior.get("ev")?, prior.get("fact_video_view")?);
        let (likes, follows) = (
            prior.get("like_transitions")?,
            prior.get("follow_transitions")?,
        );
        self.creator.add(ev, fvv, likes, follows)?;
        self.hourly.add(fvv, likes, ev)?;
        self.retention.add(fvv)?;
        if !ev.is_empty() {
            self.share_events
                .push(batch::events_of_kinds(ev, &["share"], &SHARE_COLUMNS)?);
        }
        self.share_views.extend(cascade::share_views(fvv)?);
        self.took += start.elapsed();
        Ok(())
    }
}

/// The sums once the task adding a bucket to them is done (empty ones before the first).
async fn sums_after(task: Option<Computed<Sums>>) -> Result<Sums> {
    match task {
        Some(task) => Ok(joined(task, "agg_creator_daily").await?.0),
        None => Ok(Sums::default()),
    }
}

/// The outputs back from the task that wrote a bucket's rows into them.
async fn written(task: tokio::task::JoinHandle<Result<Vec<Output>>>) -> Result<Vec<Output>> {
    task.await.map_err(|join| Error::Model {
        model: "write",
        source: DataFusionError::External(Box::new(join)),
    })?
}

/// Rebuilds every model from `events` in `buckets` user buckets and writes each table as
/// one Delta commit, as [`materialize`] does in a full rebuild; `None` when the events do
/// not split by user (see the module's documentation), with nothing committed.
pub(crate) async fn materialize_in_buckets(
    catalog: &Catalog,
    lake: &Lake,
    current: &HashMap<String, DeltaTable>,
    inputs: &Inputs,
    buckets: usize,
) -> Result<Option<(Report, Vec<(String, DeltaTable)>)>> {
    let start = Instant::now();
    let ctx = catalog.context();
    let scratch = Scratch::new(lake.root()).map_err(io_err("ev"))?;
    let scanned = scan(ctx, &scratch, buckets).await?;
    let read_took = start.elapsed();
    let closed_at = inputs.closed_at_sql();
    let mut outputs: Vec<Output> = PER_USER
        .iter()
        .filter_map(|n| MODELS.iter().find(|m| m.name == *n && !m.internal))
        .map(|m| Output {
            name: m.name,
            partition_by: m.partition_by,
            writer: None,
            rows: 0,
            write: Default::default(),
        })
        .collect();
    let mut model_rows: HashMap<&'static str, usize> = HashMap::new();
    let mut model_took: HashMap<&'static str, std::time::Duration> = HashMap::new();
    let mut summing: Option<Computed<Sums>> = None;
    let models: Vec<&'static Model> = PER_USER
        .iter()
        .filter_map(|n| MODELS.iter().find(|m| m.name == *n))
        .collect();
    // The previous bucket's writes run while the next bucket computes.
    let mut writing: Option<tokio::task::JoinHandle<Result<Vec<Output>>>> = None;
    // Users with an id shared across buckets, gathered from every bucket into one more
    // bucket, processed last.
    let mut shared_writer: Option<FileWriter<BufWriter<File>>> = None;
    let mut processed = 0;
    for b in 0..=buckets {
        let events = if b < buckets {
            let (stay, go) = split_shared(read_bucket(&scratch, b)?, &scanned.shared)
                .map_err(arrow_err("ev"))?;
            let go: Vec<RecordBatch> = go.into_iter().filter(|g| g.num_rows() > 0).collect();
            if let (false, Some(s)) = (go.is_empty(), &scanned.schema) {
                let rows = go.iter().map(|g| g.num_rows()).sum();
                spill(
                    &mut shared_writer,
                    &mut (go, rows),
                    scratch.bucket(buckets),
                    s,
                )?;
            }
            stay
        } else {
            if let Some(w) = shared_writer.take() {
                close(w)?;
            }
            read_bucket(&scratch, buckets)?
        };
        if events.iter().all(|e| e.num_rows() == 0) {
            continue;
        }
        processed += 1;
        let bctx = SessionContext::new();
        let schema = scanned.schema.clone().expect("a bucket file has a schema");
        let t = MemTable::try_new(Arc::clone(&schema), vec![events]).map_err(|source| {
            Error::Model {
                model: "ev",
                source,
            }
        })?;
        bctx.register_table(BUCKET_EVENTS, Arc::new(t))
            .map_err(|source| Error::Model {
                model: "ev",
                source,
            })?;
        // The date closures, and the duplicates check, as a rebuild in memory applies them.
        let loaded = load_events(&bctx, &closed_at, BUCKET_EVENTS).await?;
        let ev = ev_sql(loaded.has_duplicates);
        drop(loaded);
        let mut prior = Prior::default();
        let mut ahead = Ahead::default();
        for m in &models {
            let took = Instant::now();
            ahead.start_ready(models.iter().copied(), &prior, inputs);
            let (_, batches) =
                run_model(&bctx, m, &ev, inputs, &closed_at, &mut prior, &mut ahead).await?;
            *model_rows.entry(m.name).or_default() +=
                batches.iter().map(|b| b.num_rows()).sum::<usize>();
            *model_took.entry(m.name).or_default() += took.elapsed();
        }
        // The aggregates add the bucket's counters beside the next bucket's models.
        let mut sums = sums_after(summing.take()).await?;
        let inputs_of = Prior(
            [
                "ev",
                "fact_video_view",
                "like_transitions",
                "follow_transitions",
            ]
            .into_iter()
            .filter_map(|n| prior.0.get_key_value(n))
            .map(|(k, v)| (*k, v.clone()))
            .collect(),
        );
        summing = Some(spawn_timed(async move {
            sums.add(&inputs_of).map_err(DataFusionError::from)?;
            Ok(sums)
        }));
        if let Some(task) = writing.take() {
            outputs = written(task).await?;
        }
        let batches: Vec<Vec<RecordBatch>> = outputs
            .iter()
            .map(|o| prior.0.remove(o.name).unwrap_or_default())
            .collect();
        let (lake, current) = (lake.clone(), current.clone());
        let mut outs = std::mem::take(&mut outputs);
        writing = Some(tokio::spawn(async move {
            for (o, batches) in outs.iter_mut().zip(batches) {
                let Some(first) = batches.first() else {
                    continue;
                };
                let schema = first.schema();
                let took = Instant::now();
                if o.writer.is_none() {
                    o.writer = Some(
                        lake.overwrite_streamed(
                            o.name,
                            current.get(o.name).cloned(),
                            Arc::clone(&schema),
                            o.partition_by,
                        )
                        .await?,
                    );
                }
                o.rows += batches.iter().map(|b| b.num_rows()).sum::<usize>();
                if let Some(w) = o.writer.as_mut() {
                    w.write(schema, batches).await?;
                }
                o.write += took.elapsed();
            }
            Ok(outs)
        }));
    }
    if let Some(task) = writing.take() {
        outputs = written(task).await?;
    }
    let Sums {
        mut creator,
        mut hourly,
        retention,
        share_events,
        share_views,
        took: sums_took,
    } = sums_after(summing.take()).await?;
    drop(scratch);

    let mut report = Report {
        mode: "full",
        buckets: Some(processed),
        ..Report::default()
    };
    let mut handles: Vec<(String, DeltaTable)> = Vec::new();
    let mut writes = Writes::default();
    for o in outputs {
        let entry = TableReport {
            table: o.name.to_string(),
            rows: o.rows,
            version: None,
            // Computing it, and encoding its rows into the files as the buckets came; the
            // commit's time is added as `write_ms`.
            elapsed_ms: (model_took.get(o.name).copied().unwrap_or_default() + o.write).as_millis()
                as u64,
            write_ms: 0,
        };
        match o.writer {
            Some(w) => writes.spawn(&mut report, entry, w.commit()),
            // No bucket had events: the caller rebuilds in memory.
            None => return Ok(None),
        }
    }
    for name in ["ev", "like_transitions", "follow_transitions"] {
        let elapsed = model_took.get(name).copied().unwrap_or_default()
            + if name == "ev" {
                read_took
            } else {
                Default::default()
            };
        report.tables.push(TableReport {
            table: name.to_string(),
            rows: model_rows.get(name).copied().unwrap_or(0),
            version: None,
            elapsed_ms: elapsed.as_millis() as u64,
            write_ms: 0,
        });
    }
    // The aggregates: shares counted over every share event, then written whole.
    let share_schema = share_events.first().map(|b| b.schema());
    let finish_start = Instant::now();
    creator
        .add_shares(&share_events)
        .map_err(arrow_err("agg_creator_daily"))?;
    hourly
        .add_shares(&share_events)
        .map_err(arrow_err("agg_video_hourly"))?;
    let aggregates = [
        (
            "agg_creator_daily",
            creator.finish().map_err(arrow_err("agg_creator_daily"))?,
        ),
        (
            "agg_video_hourly",
            hourly.finish().map_err(arrow_err("agg_video_hourly"))?,
        ),
        (
            "video_retention",
            retention.finish().map_err(arrow_err("video_retention"))?,
        ),
    ];
    let agg_took = sums_took + finish_start.elapsed();
    for (name, batch) in aggregates {
        let m = MODELS.iter().find(|m| m.name == name).expect("a model");
        write_whole(
            &mut writes,
            &mut report,
            lake,
            current,
            (name, m.partition_by, batch, agg_took),
        );
    }
    // The cascades, over every share event.
    let cascade_start = Instant::now();
    let shares = match share_schema {
        Some(s) => {
            let all = reelhouse_lake::deltalake::arrow::compute::concat_batches(&s, &share_events)
                .map_err(arrow_err("share_cascade"))?;
            cascade::shares_of(std::slice::from_ref(&all)).map_err(arrow_err("share_cascade"))?
        }
        None => Vec::new(),
    };
    drop(share_events);
    let (fact, tree, broken) =
        cascade::batches_of(shares, &share_views).map_err(|source| Error::Model {
            model: "share_cascade",
            source,
        })?;
    report.share_links_broken = broken;
    let took = cascade_start.elapsed();
    for ((name, partition_by), batch) in CASCADE_TABLES.into_iter().zip([fact, tree]) {
        write_whole(
            &mut writes,
            &mut report,
            lake,
            current,
            (name, partition_by, batch, took),
        );
    }
    // The dimensions, from the facts folded during the scan.
    let dims_start = Instant::now();
    let dims = dims::batches_with(ctx, "events", scanned.facts)
        .await
        .map_err(|source| Error::Model {
            model: "dim_*",
            source,
        })?;
    let took = dims_start.elapsed();
    for (name, batch) in dims {
        write_whole(
            &mut writes,
            &mut report,
            lake,
            current,
            (name, &[], batch, took),
        );
    }
    writes.finish(&mut report, &mut handles).await?;
    report.tables.sort_by_key(|t| table_rank(&t.table));
    report.elapsed_ms = start.elapsed().as_millis() as u64;
    Ok(Some((report, handles)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use reelhouse_lake::deltalake::arrow::array::{Int64Array, StringArray};

    fn events(rows: &[(i64, &str, Option<&str>, Option<&str>)]) -> RecordBatch {
        RecordBatch::try_from_iter([
            (
                "user_id",
                Arc::new(Int64Array::from_iter_values(rows.iter().map(|r| r.0))) as _,
            ),
            (
                "event_id",
                Arc::new(StringArray::from_iter_values(rows.iter().map(|r| r.1))) as _,
            ),
            (
                "session_id",
                Arc::new(StringArray::from_iter(rows.iter().map(|r| r.2))) as _,
            ),
            (
                "view_id",
                Arc::new(StringArray::from_iter(rows.iter().map(|r| r.3))) as _,
            ),
        ])
        .unwrap()
    }

    fn users(batches: &[RecordBatch]) -> Vec<i64> {
        let mut out: Vec<i64> = batches
            .iter()
            .flat_map(|b| batch::int64s(b.column(0)).unwrap().values().to_vec())
            .collect();
        out.sort_unstable();
        out.dedup();
        out
    }

    /// A user with an id shared with another bucket goes to the shared bucket with every
    /// event, and so do the users of this bucket who share an id with it (here user 2
    /// through view w, user 3 through user 2's session t), but not the others.
    #[test]
    fn users_tied_to_a_shared_id_go_together() {
        let b = events(&[
            (1, "e1", Some("s"), Some("v")),
            (1, "e2", Some("s"), Some("w")),
            (2, "e3", Some("t"), Some("w")),
            (3, "e4", Some("t"), None),
            (4, "e5", Some("u"), Some("x")),
            (5, "e6", None, Some("y")),
        ]);
        let cols = GroupCols::of(&b).unwrap();
        // Session `s` also occurs in another bucket.
        let mut s_hash = 0;
        group_ids(&cols, 0, |k, h| {
            if k == 1 {
                s_hash = h
            }
        });
        let shared = [s_hash].into_iter().collect();
        let (stay, go) = split_shared(vec![b.clone()], &shared).unwrap();
        assert_eq!(users(&go), vec![1, 2, 3]);
        assert_eq!(users(&stay), vec![4, 5]);
        // Views without a session are one group: a second bucket with one takes user 5.
        let mut none = 0;
        group_ids(&cols, 5, |k, h| {
            if k == 3 {
                none = h
            }
        });
        let (stay, go) = split_shared(vec![b], &[none].into_iter().collect()).unwrap();
        assert_eq!((users(&go), users(&stay)), (vec![5], vec![1, 2, 3, 4]));
    }

    /// Values in several sorted lists are found, and only those.
    #[test]
    fn values_in_several_lists() {
        let got = in_several(&[vec![1, 3, 5], vec![2, 3], vec![5, 9], vec![]]);
        let mut got: Vec<u64> = got.into_iter().collect();
        got.sort_unstable();
        assert_eq!(got, vec![3, 5]);
    }
}
