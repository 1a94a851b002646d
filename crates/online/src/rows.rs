//! Typed, borrowed access to the columns of an `events` batch that the store reads.
//!
//! Batches come from two places with slightly different physical types: the ingest path builds
//! them with `events_batch` (Utf8, Int64, Timestamp µs) and the rebuild path reads them back from
//! Delta through DataFusion (which may hand out Utf8View). Each column is cast once to the
//! canonical type, then rows are read by index without copying strings.

use reelhouse_lake::deltalake::arrow::array::{
    Array, ArrayRef, AsArray, Int64Array, RecordBatch, StringArray, TimestampMicrosecondArray,
};
use reelhouse_lake::deltalake::arrow::compute::cast;
use reelhouse_lake::deltalake::arrow::datatypes::{DataType, TimeUnit};

use crate::{Error, Result};

/// The columns of `events` the store needs, in a form `SELECT`able by the rebuild path.
pub const COLUMNS: &str = "event_id, event_type, event_time, user_id, session_id, video_id, \
                           creator_id, view_id, watch_ms, video_duration_ms, share_id";

/// One event, borrowed from a batch.
#[derive(Debug, Clone, Copy)]
pub struct Row<'a> {
    pub event_id: &'a str,
    pub event_type: &'a str,
    /// Corrected event time, epoch ms.
    pub time_ms: i64,
    pub user_id: i64,
    pub session_id: Option<&'a str>,
    pub video_id: Option<i64>,
    pub creator_id: Option<i64>,
    pub view_id: Option<&'a str>,
    pub watch_ms: Option<i64>,
    pub duration_ms: Option<i64>,
    pub share_id: Option<&'a str>,
}

/// The needed columns of one batch, cast to canonical types.
pub struct Columns {
    event_id: StringArray,
    event_type: StringArray,
    event_time: TimestampMicrosecondArray,
    user_id: Int64Array,
    session_id: StringArray,
    video_id: Int64Array,
    creator_id: Int64Array,
    view_id: StringArray,
    watch_ms: Int64Array,
    duration_ms: Int64Array,
    share_id: StringArray,
}

fn column(batch: &RecordBatch, name: &'static str, to: &DataType) -> Result<ArrayRef> {
    let col = batch
        .column_by_name(name)
        .ok_or(Error::MissingColumn(name))?;
    if col.data_type() == to {
        return Ok(col.clone());
    }
    cast(col, to).map_err(|_| Error::MissingColumn(name))
}

fn strings(batch: &RecordBatch, name: &'static str) -> Result<StringArray> {
    Ok(column(batch, name, &DataType::Utf8)?
        .as_string::<i32>()
        .clone())
}

fn ints(batch: &RecordBatch, name: &'static str) -> Result<Int64Array> {
    use reelhouse_lake::deltalake::arrow::datatypes::Int64Type;
    Ok(column(batch, name, &DataType::Int64)?
        .as_primitive::<Int64Type>()
        .clone())
}

impl Columns {
    pub fn new(batch: &RecordBatch) -> Result<Columns> {
        use reelhouse_lake::deltalake::arrow::datatypes::TimestampMicrosecondType;
        let ts = DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()));
        Ok(Columns {
            event_id: strings(batch, "event_id")?,
            event_type: strings(batch, "event_type")?,
            event_time: column(batch, "event_time", &ts)?
                .as_primitive::<TimestampMicrosecondType>()
                .clone(),
            user_id: ints(batch, "user_id")?,
            session_id: strings(batch, "session_id")?,
            video_id: ints(batch, "video_id")?,
            creator_id: ints(batch, "creator_id")?,
            view_id: strings(batch, "view_id")?,
            watch_ms: ints(batch, "watch_ms")?,
            duration_ms: ints(batch, "video_duration_ms")?,
            share_id: strings(batch, "share_id")?,
        })
    }

    pub fn len(&self) -> usize {
        self.event_id.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn row(&self, i: usize) -> Row<'_> {
        fn s(a: &StringArray, i: usize) -> Option<&str> {
            a.is_valid(i).then(|| a.value(i))
        }
        let n = |a: &Int64Array| a.is_valid(i).then(|| a.value(i));
        Row {
            event_id: self.event_id.value(i),
            event_type: self.event_type.value(i),
            time_ms: self.event_time.value(i).div_euclid(1000),
            user_id: self.user_id.value(i),
            session_id: s(&self.session_id, i),
            video_id: n(&self.video_id),
            creator_id: n(&self.creator_id),
            view_id: s(&self.view_id, i),
            watch_ms: n(&self.watch_ms),
            duration_ms: n(&self.duration_ms),
            share_id: s(&self.share_id, i),
        }
    }
}
