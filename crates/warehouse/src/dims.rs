//! Dimensions (docs/data-model.md): `dim_user`, `dim_video`, `dim_creator` as SCD type 2, and `dim_date`.
//!
//! ```text
//!  PUT /v1/dims/{users|videos|creators} (NDJSON) ─▶ parse_upserts ─▶ dim_updates (Delta, append)
//!  events ─▶ per id: first/last seen, latest device, creator, duration, videos ─┐
//!  dim_updates ─▶ per id, by valid_from: merged attributes (an upsert changes only the fields
//!                 it names) ─▶ versions [valid_from, valid_to), is_current ───────┴─▶ dim_*
//! ```
//!
//! An entity seen in events before its first upsert gets an initial version from its first
//! event; one never upserted has one version. A column filled from events (say a user's
//! `country`) takes the upserted value when the version's attributes name it. Like every model
//! this is a pure function of its inputs, rebuilt by each materialization.

use foldhash::{HashMap, HashMapExt};
use std::collections::BTreeMap;
use std::sync::Arc;

use reelhouse_lake::deltalake::arrow::array::{
    Array, ArrayRef, AsArray, BooleanArray, Date32Array, Int32Array, Int64Array, RecordBatch,
    StringArray, StringViewArray, TimestampMicrosecondArray,
};
use reelhouse_lake::deltalake::arrow::compute::cast;
use reelhouse_lake::deltalake::arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use reelhouse_lake::deltalake::datafusion::error::DataFusionError;
use reelhouse_lake::deltalake::datafusion::prelude::SessionContext;
use serde_json::{Map, Value};

/// The Delta table holding every accepted upsert.
pub const UPDATES_TABLE: &str = "dim_updates";

/// Which dimension an upsert is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DimKind {
    Users,
    Videos,
    Creators,
}

impl DimKind {
    /// From the path segment of `PUT /v1/dims/{kind}`.
    pub fn parse(s: &str) -> Option<DimKind> {
        match s {
            "users" => Some(DimKind::Users),
            "videos" => Some(DimKind::Videos),
            "creators" => Some(DimKind::Creators),
            _ => None,
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            DimKind::Users => "users",
            DimKind::Videos => "videos",
            DimKind::Creators => "creators",
        }
    }
    /// The id field of an upsert line and of the dimension table.
    pub fn id_field(self) -> &'static str {
        match self {
            DimKind::Users => "user_id",
            DimKind::Videos => "video_id",
            DimKind::Creators => "creator_id",
        }
    }
    fn table(self) -> &'static str {
        match self {
            DimKind::Users => "dim_user",
            DimKind::Videos => "dim_video",
            DimKind::Creators => "dim_creator",
        }
    }
    /// Columns filled from events (name, type), after the id.
    fn event_columns(self) -> &'static [(&'static str, bool)] {
        // bool: true = Int64, false = Utf8
        match self {
            DimKind::Users => &[("country", false), ("os", false), ("app_version", false)],
            DimKind::Videos => &[("creator_id", true), ("duration_ms", true)],
            DimKind::Creators => &[("videos", true)],
        }
    }
}

/// Schema of [`UPDATES_TABLE`].
pub fn updates_schema() -> SchemaRef {
    let ts = DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()));
    Arc::new(Schema::new(vec![
        Field::new("kind", DataType::Utf8, false),
        Field::new("id", DataType::Int64, false),
        Field::new("valid_from", ts.clone(), false),
        Field::new("received_at", ts, false),
        Field::new("seq", DataType::Int64, false),
        Field::new("attributes", DataType::Utf8, false),
    ]))
}

/// One rejected line of an upsert body.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct UpsertError {
    pub index: usize,
    pub reason: String,
}

fn parse_time_ms(v: &Value) -> Option<i64> {
    match v {
        Value::Number(n) => n.as_i64(),
        Value::String(s) => chrono::DateTime::parse_from_rfc3339(s)
            .ok()
            .map(|t| t.timestamp_millis()),
        _ => None,
    }
}

/// Parses an NDJSON body of upserts: one object per line with the kind's id field, an optional
/// `valid_from` (RFC 3339 or epoch ms; default: now) and any scalar attributes. Returns the
/// rows to append (none when nothing is valid) and the rejected lines.
pub fn parse_upserts(
    kind: DimKind,
    body: &[u8],
    received_at_ms: i64,
) -> (Option<RecordBatch>, usize, Vec<UpsertError>) {
    let mut ids = Vec::new();
    let mut valid_from = Vec::new();
    let mut attrs = Vec::new();
    let mut errors = Vec::new();
    let lines = body
        .split(|b| *b == b'\n')
        .filter(|l| !l.iter().all(u8::is_ascii_whitespace));
    for (index, line) in lines.enumerate() {
        let reject = |reason: String| UpsertError { index, reason };
        let obj = match serde_json::from_slice::<Value>(line) {
            Ok(Value::Object(o)) => o,
            Ok(_) => {
                errors.push(reject("each line must be a JSON object".into()));
                continue;
            }
            Err(_) => {
                errors.push(reject("line is not valid JSON".into()));
                continue;
            }
        };
        let id_field = kind.id_field();
        let id = match obj.get(id_field) {
            Some(Value::Number(n)) => n.as_i64().filter(|v| *v >= 0),
            Some(Value::String(s)) => s.parse::<i64>().ok().filter(|v| *v >= 0),
            _ => None,
        };
        let Some(id) = id else {
            errors.push(reject(format!(
                "{id_field} is required: an integer between 0 and 9223372036854775807"
            )));
            continue;
        };
        let from = match obj.get("valid_from") {
            None | Some(Value::Null) => Some(received_at_ms),
            Some(v) => parse_time_ms(v),
        };
        let Some(from) = from else {
            errors.push(reject(
                "valid_from must be an RFC 3339 time or epoch milliseconds".into(),
            ));
            continue;
        };
        let mut a = Map::new();
        let mut bad = None;
        for (k, v) in obj {
            if k == id_field || k == "valid_from" {
                continue;
            }
            if k == "valid_to" || k == "is_current" {
                bad = Some(format!("{k} is computed by reelhouse and cannot be set"));
                break;
            }
            if v.is_object() || v.is_array() {
                bad = Some(format!(
                    "attribute {k} must be a string, number, boolean or null"
                ));
                break;
            }
            a.insert(k, v);
        }
        if let Some(reason) = bad {
            errors.push(reject(reason));
            continue;
        }
        ids.push(id);
        valid_from.push(from * 1000);
        attrs.push(Value::Object(a).to_string());
    }
    let n = ids.len();
    if n == 0 {
        return (None, 0, errors);
    }
    let batch = RecordBatch::try_new(
        updates_schema(),
        vec![
            Arc::new(StringArray::from_iter_values(std::iter::repeat_n(
                kind.as_str(),
                n,
            ))),
            Arc::new(Int64Array::from(ids)),
            Arc::new(TimestampMicrosecondArray::from(valid_from).with_timezone("UTC")),
            Arc::new(
                TimestampMicrosecondArray::from(vec![received_at_ms * 1000; n])
                    .with_timezone("UTC"),
            ),
            Arc::new(Int64Array::from_iter_values(0..n as i64)),
            Arc::new(StringArray::from(attrs)),
        ],
    )
    .ok();
    (batch, n, errors)
}

/// (valid_from µs, received_at µs, seq, attributes JSON) of one stored upsert; sorts in the
/// order upserts apply.
type Upsert = (i64, i64, i64, String);

/// What events say about one id.
struct Facts {
    first_us: i64,
    last_us: i64,
    cols: Vec<Value>,
}

/// One SCD2 version.
struct Version {
    id: i64,
    from_us: i64,
    to_us: Option<i64>,
    attrs: Map<String, Value>,
}

fn ints(a: &ArrayRef) -> Result<Int64Array, DataFusionError> {
    Ok(crate::batch::int64s(a)?)
}

async fn rows(ctx: &SessionContext, sql: &str) -> Result<Vec<RecordBatch>, DataFusionError> {
    ctx.sql(sql).await?.collect().await
}

/// The latest of several rows by (event_time, event_id): the row that last-writer-wins picks.
struct Latest<T> {
    at: (i64, String),
    value: T,
}

/// Keeps `value` in `slot` when `at` is later than what it holds; `set` replaces the held
/// value (reusing its allocations where it can).
fn keep_latest<T, V>(
    slot: &mut Option<Latest<T>>,
    (t, id): (i64, &str),
    value: V,
    make: impl FnOnce(V) -> T,
    set: impl FnOnce(&mut T, V),
) {
    match slot {
        Some(l) if (t, id) > (l.at.0, l.at.1.as_str()) => {
            l.at.0 = t;
            l.at.1.clear();
            l.at.1.push_str(id);
            set(&mut l.value, value);
        }
        Some(_) => {}
        None => {
            *slot = Some(Latest {
                at: (t, id.to_string()),
                value: make(value),
            })
        }
    }
}

/// A user's device fields (country, os, app version).
type Device = [Option<Box<str>>; 3];

/// Per kind (`users`, `videos`, `creators`) and id, what events say, folded batch by batch
/// over `events` ([`EventFacts::add`]; a rebuild in user buckets folds the batches as it
/// reads them): first and last seen, and the event columns of [`DimKind::event_columns`]:
/// - users: country, os and app version of the latest event carrying any of them;
/// - videos: the creator of the latest event naming one, the largest duration seen;
/// - creators: the number of distinct videos seen.
///
/// It holds a few values per id, never the events.
#[derive(Default)]
pub(crate) struct EventFacts {
    user_span: HashMap<i64, (i64, i64)>,
    video_span: HashMap<i64, (i64, i64)>,
    creator_span: HashMap<i64, (i64, i64)>,
    device: HashMap<i64, Option<Latest<Device>>>,
    video: HashMap<i64, (Option<Latest<i64>>, Option<i64>)>,
    videos_of: HashMap<i64, foldhash::HashSet<i64>>,
}

/// The columns [`EventFacts::add`] reads.
pub(crate) const FACT_COLUMNS: &str = "user_id, video_id, creator_id, event_time, event_id, \
  device_country, device_os, device_app_version, video_duration_ms";

impl EventFacts {
    /// Folds the events of `b` (with [`FACT_COLUMNS`], any integer and string encodings).
    pub(crate) fn add(&mut self, b: &RecordBatch) -> Result<(), DataFusionError> {
        fn opt_s(a: &StringViewArray, i: usize) -> Option<&str> {
            a.is_valid(i).then(|| a.value(i))
        }
        let col =
            |n: &str| -> Result<&ArrayRef, DataFusionError> { Ok(crate::batch::column(b, n)?) };
        let strs = |n: &str| -> Result<StringViewArray, DataFusionError> {
            Ok(crate::batch::string_views(col(n)?)?)
        };
        let [user, vid, creator, time] = [
            ints(col("user_id")?)?,
            ints(col("video_id")?)?,
            ints(col("creator_id")?)?,
            ints(col("event_time")?)?,
        ];
        let [event_id, country, os, app] = [
            strs("event_id")?,
            strs("device_country")?,
            strs("device_os")?,
            strs("device_app_version")?,
        ];
        let duration = ints(col("video_duration_ms")?)?;
        let span = |m: &mut HashMap<i64, (i64, i64)>, id: i64, t: i64| {
            let e = m.entry(id).or_insert((t, t));
            e.0 = e.0.min(t);
            e.1 = e.1.max(t);
        };
        let opt_i = |a: &Int64Array, i: usize| a.is_valid(i).then(|| a.value(i));
        for i in 0..user.len() {
            let t = time.value(i);
            let at = (t, event_id.value(i));
            let (v, c) = (opt_i(&vid, i), opt_i(&creator, i));
            if let Some(u) = opt_i(&user, i) {
                span(&mut self.user_span, u, t);
                let d = [opt_s(&country, i), opt_s(&os, i), opt_s(&app, i)];
                let slot = self.device.entry(u).or_default();
                if d.iter().any(Option::is_some) {
                    keep_latest(
                        slot,
                        at,
                        d,
                        |d| d.map(|s| s.map(Box::from)),
                        |held, d| {
                            for (h, s) in held.iter_mut().zip(d) {
                                if h.as_deref() != s {
                                    *h = s.map(Box::from);
                                }
                            }
                        },
                    );
                }
            }
            if let Some(v) = v {
                span(&mut self.video_span, v, t);
                let e = self.video.entry(v).or_default();
                if let Some(c) = c {
                    keep_latest(&mut e.0, at, c, |c| c, |held, c| *held = c);
                }
                if let Some(d) = opt_i(&duration, i) {
                    e.1 = Some(e.1.map_or(d, |x: i64| x.max(d)));
                }
            }
            if let Some(c) = c {
                span(&mut self.creator_span, c, t);
                let set = self.videos_of.entry(c).or_default();
                if let Some(v) = v {
                    set.insert(v);
                }
            }
        }
        Ok(())
    }

    /// Folds every row of the table `events` registered in `ctx`, batch by batch.
    async fn of_table(ctx: &SessionContext, events: &str) -> Result<EventFacts, DataFusionError> {
        use futures::StreamExt;
        let mut facts = EventFacts::default();
        let mut stream = ctx
            .sql(&format!("SELECT {FACT_COLUMNS} FROM {events}"))
            .await?
            .execute_stream()
            .await?;
        while let Some(b) = stream.next().await {
            facts.add(&b?)?;
        }
        Ok(facts)
    }

    /// The facts of each id, by kind.
    fn finish(self) -> HashMap<&'static str, BTreeMap<i64, Facts>> {
        let EventFacts {
            user_span,
            video_span,
            creator_span,
            device,
            video,
            videos_of,
        } = self;
        let text = |s: Option<&str>| s.map_or(Value::Null, Value::from);
        let int = |x: Option<i64>| x.map_or(Value::Null, Value::from);
        let facts = |span: HashMap<i64, (i64, i64)>, cols: &dyn Fn(i64) -> Vec<Value>| {
            span.into_iter()
                .map(|(id, (f, l))| {
                    let facts = Facts {
                        first_us: f,
                        last_us: l,
                        cols: cols(id),
                    };
                    (id, facts)
                })
                .collect::<BTreeMap<_, _>>()
        };
        let mut out = HashMap::new();
        out.insert(
            "users",
            facts(user_span, &|id| match device.get(&id) {
                Some(Some(l)) => l.value.iter().map(|s| text(s.as_deref())).collect(),
                _ => vec![Value::Null; 3],
            }),
        );
        out.insert(
            "videos",
            facts(video_span, &|id| {
                let (c, d) = video
                    .get(&id)
                    .map_or((None, None), |(c, d)| (c.as_ref().map(|l| l.value), *d));
                vec![int(c), int(d)]
            }),
        );
        out.insert(
            "creators",
            facts(creator_span, &|id| {
                vec![Value::from(videos_of.get(&id).map_or(0, |s| s.len()) as i64)]
            }),
        );
        out
    }
}

/// Builds `dim_user`, `dim_video`, `dim_creator` and `dim_date` from the table `events`
/// (every stored event: `events` itself, or the same rows in memory) and, when it exists,
/// `dim_updates` (both registered in `ctx`).
pub(crate) async fn batches(
    ctx: &SessionContext,
    events: &str,
) -> Result<Vec<(&'static str, RecordBatch)>, DataFusionError> {
    let facts = EventFacts::of_table(ctx, events).await?;
    batches_with(ctx, events, facts).await
}

/// [`batches`] with what events say already folded (`facts`, over every row of `events`).
pub(crate) async fn batches_with(
    ctx: &SessionContext,
    events: &str,
    facts: EventFacts,
) -> Result<Vec<(&'static str, RecordBatch)>, DataFusionError> {
    let mut updates: HashMap<&'static str, BTreeMap<i64, Vec<Upsert>>> = HashMap::new();
    if ctx.table_exist(UPDATES_TABLE)? {
        for b in rows(
            ctx,
            "SELECT kind, id, valid_from, received_at, seq, attributes FROM dim_updates",
        )
        .await?
        {
            let kind = cast(b.column(0), &DataType::Utf8)?;
            let kind = kind.as_string::<i32>();
            let attrs = cast(b.column(5), &DataType::Utf8)?;
            let attrs = attrs.as_string::<i32>();
            let (id, from, recv, seq) = (
                ints(b.column(1))?,
                ints(b.column(2))?,
                ints(b.column(3))?,
                ints(b.column(4))?,
            );
            for i in 0..b.num_rows() {
                let Some(k) = DimKind::parse(kind.value(i)) else {
                    continue;
                };
                updates
                    .entry(k.as_str())
                    .or_default()
                    .entry(id.value(i))
                    .or_default()
                    .push((
                        from.value(i),
                        recv.value(i),
                        seq.value(i),
                        attrs.value(i).to_string(),
                    ));
            }
        }
    }
    let mut facts_of = facts.finish();
    let mut out = Vec::new();
    for kind in [DimKind::Users, DimKind::Videos, DimKind::Creators] {
        let facts = facts_of.remove(&kind.as_str()).unwrap_or_default();
        let ups = updates.remove(kind.as_str()).unwrap_or_default();
        let mut versions = Vec::new();
        let ids: std::collections::BTreeSet<i64> =
            facts.keys().chain(ups.keys()).copied().collect();
        for id in ids {
            let mut list = ups.get(&id).cloned().unwrap_or_default();
            list.sort();
            let mut mine: Vec<Version> = Vec::new();
            if let Some(f) = facts.get(&id) {
                if list.first().is_none_or(|u| u.0 > f.first_us) {
                    mine.push(Version {
                        id,
                        from_us: f.first_us,
                        to_us: None,
                        attrs: Map::new(),
                    });
                }
            }
            for (from, _, _, a) in list {
                let mut attrs = mine.last().map(|v| v.attrs.clone()).unwrap_or_default();
                if let Ok(Value::Object(new)) = serde_json::from_str::<Value>(&a) {
                    attrs.extend(new);
                }
                match mine.last_mut() {
                    Some(v) if v.from_us == from => v.attrs = attrs,
                    _ => mine.push(Version {
                        id,
                        from_us: from,
                        to_us: None,
                        attrs,
                    }),
                }
            }
            for i in 1..mine.len() {
                mine[i - 1].to_us = Some(mine[i].from_us);
            }
            versions.extend(mine);
        }
        out.push((kind.table(), dim_batch(kind, &versions, &facts)?));
    }
    out.push(("dim_date", date_batch(ctx, events).await?));
    Ok(out)
}

fn dim_batch(
    kind: DimKind,
    versions: &[Version],
    facts: &BTreeMap<i64, Facts>,
) -> Result<RecordBatch, DataFusionError> {
    let ts = || DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()));
    let cols = kind.event_columns();
    let mut fields = vec![Field::new(kind.id_field(), DataType::Int64, false)];
    let mut arrays: Vec<ArrayRef> = vec![Arc::new(Int64Array::from_iter_values(
        versions.iter().map(|v| v.id),
    ))];
    for (c, (name, is_int)) in cols.iter().enumerate() {
        // The upserted attribute of the same name wins over what events say.
        let value = |v: &Version| -> Value {
            v.attrs
                .get(*name)
                .cloned()
                .or_else(|| facts.get(&v.id).map(|f| f.cols[c].clone()))
                .unwrap_or(Value::Null)
        };
        if *is_int {
            fields.push(Field::new(*name, DataType::Int64, true));
            arrays.push(Arc::new(Int64Array::from_iter(versions.iter().map(
                |v| match value(v) {
                    Value::Number(n) => n.as_i64(),
                    Value::String(s) => s.parse().ok(),
                    _ => None,
                },
            ))));
        } else {
            fields.push(Field::new(*name, DataType::Utf8, true));
            arrays.push(Arc::new(StringArray::from_iter(versions.iter().map(
                |v| match value(v) {
                    Value::String(s) => Some(s),
                    Value::Null => None,
                    other => Some(other.to_string()),
                },
            ))));
        }
    }
    fields.extend([
        Field::new("attributes", DataType::Utf8, false),
        Field::new("first_seen", ts(), true),
        Field::new("last_seen", ts(), true),
        Field::new("valid_from", ts(), false),
        Field::new("valid_to", ts(), true),
        Field::new("is_current", DataType::Boolean, false),
    ]);
    let seen = |first: bool| {
        TimestampMicrosecondArray::from_iter(versions.iter().map(|v| {
            facts
                .get(&v.id)
                .map(|f| if first { f.first_us } else { f.last_us })
        }))
        .with_timezone("UTC")
    };
    arrays.extend([
        Arc::new(StringArray::from_iter_values(
            versions
                .iter()
                .map(|v| Value::Object(v.attrs.clone()).to_string()),
        )) as ArrayRef,
        Arc::new(seen(true)),
        Arc::new(seen(false)),
        Arc::new(
            TimestampMicrosecondArray::from_iter_values(versions.iter().map(|v| v.from_us))
                .with_timezone("UTC"),
        ),
        Arc::new(
            TimestampMicrosecondArray::from_iter(versions.iter().map(|v| v.to_us))
                .with_timezone("UTC"),
        ),
        Arc::new(BooleanArray::from_iter(
            versions.iter().map(|v| Some(v.to_us.is_none())),
        )),
    ]);
    Ok(RecordBatch::try_new(Arc::new(Schema::new(fields)), arrays)?)
}

/// One row per date between the first and the last `event_date` in `events`.
async fn date_batch(ctx: &SessionContext, events: &str) -> Result<RecordBatch, DataFusionError> {
    use chrono::Datelike;
    let mut range: Option<(i32, i32)> = None;
    for b in rows(
        ctx,
        &format!("SELECT CAST(min(event_date) AS INT), CAST(max(event_date) AS INT) FROM {events}"),
    )
    .await?
    {
        let a = cast(b.column(0), &DataType::Int32)?;
        let z = cast(b.column(1), &DataType::Int32)?;
        let (a, z) = (
            a.as_primitive::<reelhouse_lake::deltalake::arrow::datatypes::Int32Type>(),
            z.as_primitive::<reelhouse_lake::deltalake::arrow::datatypes::Int32Type>(),
        );
        if b.num_rows() > 0 && a.is_valid(0) && z.is_valid(0) {
            range = Some((a.value(0), z.value(0)));
        }
    }
    let days: Vec<i32> = range.map_or(Vec::new(), |(a, z)| (a..=z).collect());
    let dates: Vec<chrono::NaiveDate> = days
        .iter()
        .map(|d| reelhouse_event::Day(*d).date())
        .collect();
    let int = |f: &dyn Fn(&chrono::NaiveDate) -> i32| {
        Arc::new(Int32Array::from_iter_values(dates.iter().map(f))) as ArrayRef
    };
    let schema = Schema::new(vec![
        Field::new("date", DataType::Date32, false),
        Field::new("year", DataType::Int32, false),
        Field::new("quarter", DataType::Int32, false),
        Field::new("month", DataType::Int32, false),
        Field::new("day", DataType::Int32, false),
        Field::new("day_of_week", DataType::Int32, false),
        Field::new("iso_week", DataType::Int32, false),
        Field::new("is_weekend", DataType::Boolean, false),
    ]);
    Ok(RecordBatch::try_new(
        Arc::new(schema),
        vec![
            Arc::new(Date32Array::from(days.clone())),
            int(&|d| d.year()),
            int(&|d| (d.month0() / 3 + 1) as i32),
            int(&|d| d.month() as i32),
            int(&|d| d.day() as i32),
            int(&|d| d.weekday().number_from_monday() as i32),
            int(&|d| d.iso_week().week() as i32),
            Arc::new(BooleanArray::from_iter(
                dates
                    .iter()
                    .map(|d| Some(d.weekday().number_from_monday() >= 6)),
            )),
        ],
    )?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upserts_parse_with_specific_errors() {
        let body = br#"{"user_id": 5, "country": "FR"}

{"user_id": "x"}
[1]
{"user_id":1,"valid_to":1}
{"user_id":2,"tags":[1]}
{"user_id":3,"valid_from":"2026-01-02T00:00:00Z"}"#;
        let (batch, n, errors) = parse_upserts(DimKind::Users, body, 1_000);
        assert_eq!(n, 2);
        let b = batch.unwrap();
        assert_eq!(b.num_rows(), 2);
        let idx: Vec<usize> = errors.iter().map(|e| e.index).collect();
        assert_eq!(idx, vec![1, 2, 3, 4]);
        assert!(errors[0].reason.contains("user_id"));
        assert!(errors[2].reason.contains("valid_to"));
    }

    proptest::proptest! {
        /// Any bytes: no panic, and every non-blank line is accepted or rejected exactly once.
        #[test]
        fn upsert_parser_never_panics(body in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..400),
                                      json_ish in "[{}\\[\\]\":,0-9a-z_ \n]{0,200}") {
            for b in [body.as_slice(), json_ish.as_bytes()] {
                let lines = b.split(|c| *c == b'\n').filter(|l| !l.iter().all(u8::is_ascii_whitespace)).count();
                let (_, n, errors) = parse_upserts(DimKind::Videos, b, 0);
                proptest::prop_assert_eq!(n + errors.len(), lines);
            }
        }
    }
}
