//! Arrow schemas of the raw tables and the builders that turn parsed events into
//! `RecordBatch`es (the unit that moves between stages from here on).
//!
//! Delta has no unsigned integers and stores timestamps in microseconds, so ids are `Int64`
//! and times `Timestamp(µs, UTC)`. Partition columns come last, as Delta returns them.

use std::sync::Arc;

use deltalake::arrow::array::{
    ArrayRef, BooleanBuilder, Date32Builder, Int32Builder, Int64Builder, RecordBatch,
    StringBuilder, TimestampMicrosecondBuilder,
};
use deltalake::arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use reelhouse_event::StoredEvent;

use crate::Result;

fn ts() -> DataType {
    DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()))
}

/// Schema of the `events` table.
pub fn events_schema() -> SchemaRef {
    let s = |n: &str| Field::new(n, DataType::Utf8, true);
    let i = |n: &str| Field::new(n, DataType::Int64, true);
    Arc::new(Schema::new(vec![
        Field::new("event_id", DataType::Utf8, false),
        Field::new("event_type", DataType::Utf8, false),
        Field::new("event_time", ts(), false),
        Field::new("user_id", DataType::Int64, false),
        s("session_id"),
        i("video_id"),
        i("creator_id"),
        s("view_id"),
        s("source"),
        s("via_share_id"),
        i("position"),
        i("watch_ms"),
        i("video_duration_ms"),
        s("exit_reason"),
        s("comment_id"),
        i("comment_length"),
        s("share_id"),
        s("parent_share_id"),
        s("channel"),
        s("device_os"),
        s("device_app_version"),
        s("device_country"),
        Field::new("schema_version", DataType::Int32, false),
        Field::new("sent_at", ts(), true),
        Field::new("client_event_time", ts(), true),
        s("extra"),
        Field::new("received_at", ts(), false),
        Field::new("lateness_ms", DataType::Int64, false),
        Field::new("time_corrected", DataType::Boolean, false),
        Field::new("event_date", DataType::Date32, false),
    ]))
}

/// Schema of the `quarantine` table.
pub fn quarantine_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("received_at", ts(), false),
        Field::new("event_id", DataType::Utf8, true),
        Field::new("reason", DataType::Utf8, false),
        Field::new("raw", DataType::Utf8, false),
        Field::new("ingest_path", DataType::Utf8, false),
        Field::new("received_date", DataType::Date32, false),
    ]))
}

/// Builds an `events` batch from stamped events, column by column.
pub fn events_batch(rows: &[StoredEvent]) -> Result<RecordBatch> {
    let n = rows.len();
    let strs = || StringBuilder::with_capacity(n, n * 16);
    let ints = || Int64Builder::with_capacity(n);
    let tss = || TimestampMicrosecondBuilder::with_capacity(n).with_timezone("UTC");
    let (mut event_id, mut event_type, mut event_time, mut user_id) =
        (strs(), strs(), tss(), ints());
    let (mut session_id, mut video_id, mut creator_id, mut view_id) =
        (strs(), ints(), ints(), strs());
    let (mut source, mut via_share_id, mut position, mut watch_ms) =
        (strs(), strs(), ints(), ints());
    let (mut duration, mut exit_reason, mut comment_id, mut comment_len) =
        (ints(), strs(), strs(), ints());
    let (mut share_id, mut parent_share_id, mut channel) = (strs(), strs(), strs());
    let (mut os, mut app_version, mut country) = (strs(), strs(), strs());
    let mut schema_version = Int32Builder::with_capacity(n);
    let (mut sent_at, mut client_time, mut extra) = (tss(), tss(), strs());
    let (mut received_at, mut lateness, mut corrected) =
        (tss(), ints(), BooleanBuilder::with_capacity(n));
    let mut event_date = Date32Builder::with_capacity(n);
    for r in rows {
        let e = &r.event;
        let p = &e.props;
        event_id.append_value(&e.event_id);
        event_type.append_value(e.event_type.as_str());
        event_time.append_value(r.event_time_ms * 1000);
        user_id.append_value(e.user_id.as_i64());
        session_id.append_option(e.session_id.as_deref());
        video_id.append_option(e.video_id.map(|v| v.as_i64()));
        creator_id.append_option(e.creator_id.map(|v| v.as_i64()));
        view_id.append_option(e.view_id.as_deref());
        source.append_option(p.source.map(|s| s.as_str()));
        via_share_id.append_option(p.via_share_id.as_deref());
        position.append_option(p.position);
        watch_ms.append_option(p.watch_ms);
        duration.append_option(p.video_duration_ms);
        exit_reason.append_option(p.exit_reason.as_deref());
        comment_id.append_option(p.comment_id.as_deref());
        comment_len.append_option(p.comment_length);
        share_id.append_option(p.share_id.as_deref());
        parent_share_id.append_option(p.parent_share_id.as_deref());
        channel.append_option(p.channel.as_deref());
        os.append_option(e.device.os.as_deref());
        app_version.append_option(e.device.app_version.as_deref());
        country.append_option(e.device.country.as_deref());
        schema_version.append_value(e.schema_version as i32);
        sent_at.append_option(e.sent_at_ms.map(|t| t * 1000));
        // The device's own time is kept only where it differs from the stored one.
        client_time.append_option(r.time_corrected.then_some(e.event_time_ms * 1000));
        extra.append_option(e.extra.as_deref());
        received_at.append_value(r.received_at_ms * 1000);
        lateness.append_value(r.lateness_ms);
        corrected.append_value(r.time_corrected);
        event_date.append_value(r.event_date);
    }
    let cols: Vec<ArrayRef> = vec![
        Arc::new(event_id.finish()),
        Arc::new(event_type.finish()),
        Arc::new(event_time.finish()),
        Arc::new(user_id.finish()),
        Arc::new(session_id.finish()),
        Arc::new(video_id.finish()),
        Arc::new(creator_id.finish()),
        Arc::new(view_id.finish()),
        Arc::new(source.finish()),
        Arc::new(via_share_id.finish()),
        Arc::new(position.finish()),
        Arc::new(watch_ms.finish()),
        Arc::new(duration.finish()),
        Arc::new(exit_reason.finish()),
        Arc::new(comment_id.finish()),
        Arc::new(comment_len.finish()),
        Arc::new(share_id.finish()),
        Arc::new(parent_share_id.finish()),
        Arc::new(channel.finish()),
        Arc::new(os.finish()),
        Arc::new(app_version.finish()),
        Arc::new(country.finish()),
        Arc::new(schema_version.finish()),
        Arc::new(sent_at.finish()),
        Arc::new(client_time.finish()),
        Arc::new(extra.finish()),
        Arc::new(received_at.finish()),
        Arc::new(lateness.finish()),
        Arc::new(corrected.finish()),
        Arc::new(event_date.finish()),
    ];
    Ok(RecordBatch::try_new(events_schema(), cols)?)
}

/// One rejected item on its way to `quarantine`.
#[derive(Debug, Clone)]
pub struct QuarantineRow {
    pub received_at_ms: i64,
    pub event_id: Option<String>,
    pub reason: String,
    /// The item as received (invalid UTF-8 replaced by U+FFFD).
    pub raw: String,
    /// `http` or `bulk`.
    pub ingest_path: &'static str,
}

/// Builds a `quarantine` batch.
pub fn quarantine_batch(rows: &[QuarantineRow]) -> Result<RecordBatch> {
    let n = rows.len();
    let mut received_at = TimestampMicrosecondBuilder::with_capacity(n).with_timezone("UTC");
    let mut event_id = StringBuilder::new();
    let mut reason = StringBuilder::new();
    let mut raw = StringBuilder::new();
    let mut path = StringBuilder::new();
    let mut date = Date32Builder::with_capacity(n);
    for r in rows {
        received_at.append_value(r.received_at_ms * 1000);
        event_id.append_option(r.event_id.as_deref());
        reason.append_value(&r.reason);
        raw.append_value(&r.raw);
        path.append_value(r.ingest_path);
        date.append_value(reelhouse_event::time::day_of(r.received_at_ms));
    }
    let cols: Vec<ArrayRef> = vec![
        Arc::new(received_at.finish()),
        Arc::new(event_id.finish()),
        Arc::new(reason.finish()),
        Arc::new(raw.finish()),
        Arc::new(path.finish()),
        Arc::new(date.finish()),
    ];
    Ok(RecordBatch::try_new(quarantine_schema(), cols)?)
}

/// Arrow IPC stream bytes of one batch (the write-ahead log's payload format).
pub fn encode_ipc(batch: &RecordBatch) -> Result<Vec<u8>> {
    let mut out = Vec::with_capacity(batch.get_array_memory_size() + 1024);
    let mut w = deltalake::arrow::ipc::writer::StreamWriter::try_new(&mut out, batch.schema_ref())?;
    w.write(batch)?;
    w.finish()?;
    drop(w);
    Ok(out)
}

/// Batches from Arrow IPC stream bytes.
pub fn decode_ipc(bytes: &[u8]) -> Result<Vec<RecordBatch>> {
    let r = deltalake::arrow::ipc::reader::StreamReader::try_new(bytes, None)?;
    Ok(r.collect::<Result<Vec<_>, _>>()?)
}
