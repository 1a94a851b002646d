//! Measures bytes per event of the `events` Parquet layout under several sort orders and
//! writer settings, on a generated workload. The numbers behind the choice in
//! `docs/storage.md`:
//!
//! ```text
//! cargo run --release -p reelhouse-lake --example layout -- 1000000
//! ```

use std::sync::Arc;

use deltalake::arrow::array::RecordBatch;
use deltalake::arrow::compute::{lexsort_to_indices, take_record_batch, SortColumn};
use deltalake::parquet::arrow::ArrowWriter;
use deltalake::parquet::basic::{Compression, Encoding, ZstdLevel};
use deltalake::parquet::file::properties::WriterProperties;
use deltalake::parquet::file::reader::{FileReader, SerializedFileReader};
use deltalake::parquet::schema::types::ColumnPath;
use reelhouse_event::{parse_event, stamp};
use reelhouse_lake::deltalake;
use reelhouse_lake::events_batch;
use reelhouse_workload::{generate, WorkloadConfig};

fn sorted(batch: &RecordBatch, keys: &[&str]) -> RecordBatch {
    let cols: Vec<SortColumn> = keys
        .iter()
        .map(|k| SortColumn {
            values: Arc::clone(batch.column_by_name(k).expect("sort key")),
            options: None,
        })
        .collect();
    let idx = lexsort_to_indices(&cols, None).expect("sort");
    take_record_batch(batch, &idx).expect("take")
}

fn write(batch: &RecordBatch, props: WriterProperties) -> Vec<u8> {
    let mut out = Vec::new();
    let mut w = ArrowWriter::try_new(&mut out, batch.schema(), Some(props)).expect("writer");
    w.write(batch).expect("write");
    w.close().expect("close");
    out
}

/// Writer settings: 0 = defaults; 1 = delta-packed times, no dictionary for event ids;
/// 2 = 1 + DELTA_LENGTH_BYTE_ARRAY for the high-entropy id strings; 3 = 2 with
/// BYTE_STREAM_SPLIT instead of delta packing for times; 4 = only the id strings of 2.
fn props(level: i32, tuning: u8) -> WriterProperties {
    let mut b = WriterProperties::builder()
        .set_compression(Compression::ZSTD(ZstdLevel::try_new(level).expect("level")));
    if (1..=3).contains(&tuning) {
        let enc = if tuning == 3 {
            Encoding::BYTE_STREAM_SPLIT
        } else {
            Encoding::DELTA_BINARY_PACKED
        };
        for c in ["event_time", "received_at", "lateness_ms"] {
            b = b
                .set_column_dictionary_enabled(ColumnPath::from(c), false)
                .set_column_encoding(ColumnPath::from(c), enc);
        }
        b = b.set_column_dictionary_enabled(ColumnPath::from("event_id"), false);
    }
    if tuning >= 2 {
        b = b.set_column_dictionary_enabled(ColumnPath::from("event_id"), false);
        for c in ["event_id", "view_id"] {
            b = b
                .set_column_dictionary_enabled(ColumnPath::from(c), false)
                .set_column_encoding(ColumnPath::from(c), Encoding::DELTA_LENGTH_BYTE_ARRAY);
        }
    }
    b.build()
}

fn main() {
    let n: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(1_000_000);
    let mut cfg = WorkloadConfig::new(n, 1, 1_764_000_000_000);
    cfg.days = 1;
    let w = generate(&cfg);
    // Received in a few minutes' worth of batches, as a flush would see them.
    let rows: Vec<_> = w
        .lines
        .iter()
        .enumerate()
        .filter_map(|(i, l)| {
            parse_event(l.as_bytes())
                .ok()
                .map(|e| stamp(e, cfg.end_ms + (i as i64 / 5000) * 20))
        })
        .collect();
    let batch = events_batch(&rows).expect("batch");
    let per = |b: &[u8]| b.len() as f64 / batch.num_rows() as f64;
    println!("{} events (one day), bytes per event:", batch.num_rows());
    let orders: [(&str, &[&str]); 4] = [
        ("arrival order", &[]),
        (
            "event_type, video_id",
            &["event_type", "video_id", "event_time"],
        ),
        (
            "event_type, user_id, session_id, event_time",
            &["event_type", "user_id", "session_id", "event_time"],
        ),
        (
            "user_id, session_id, event_time",
            &["user_id", "session_id", "event_time"],
        ),
    ];
    let mut best = (f64::MAX, Vec::new());
    for (name, keys) in orders {
        let b = if keys.is_empty() {
            batch.clone()
        } else {
            sorted(&batch, keys)
        };
        for (level, tuned) in [(3, 0u8), (3, 1), (3, 2), (3, 3), (3, 4), (9, 4)] {
            let bytes = write(&b, props(level, tuned));
            println!(
                "  {:<46} zstd {level} {:<11} {:>6.2}",
                name,
                ["default", "tuned", "tuned+dlba", "tuned+bss", "dlba only"][tuned as usize],
                per(&bytes)
            );
            if per(&bytes) < best.0 {
                best = (per(&bytes), bytes);
            }
        }
    }
    println!("per column of the smallest layout (bytes per event):");
    let reader = SerializedFileReader::new(bytes::Bytes::from(best.1)).expect("read back");
    let md = reader.metadata();
    let mut cols: Vec<(String, i64)> = Vec::new();
    for rg in md.row_groups() {
        for c in rg.columns() {
            let name = c.column_path().string();
            match cols.iter_mut().find(|(n, _)| *n == name) {
                Some((_, s)) => *s += c.compressed_size(),
                None => cols.push((name, c.compressed_size())),
            }
        }
    }
    cols.sort_by_key(|(_, s)| -s);
    for (name, size) in cols {
        println!(
            "  {:<20} {:>6.2}",
            name,
            size as f64 / batch.num_rows() as f64
        );
    }
}
