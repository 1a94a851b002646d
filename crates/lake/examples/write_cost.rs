//! Measures where a derived table's Delta write spends its time: the delta-rs write
//! (`Lake::overwrite_derived`) against encoding the same rows with a bare `ArrowWriter`,
//! one file per date, on both cores.
//!
//! ```text
//! cargo run --release -p reelhouse-lake --example write_cost -- DATA_DIR fact_video_view
//! ```

use std::time::Instant;

use deltalake::arrow::array::{AsArray, RecordBatch};
use deltalake::arrow::compute::{concat_batches, take_record_batch};
use deltalake::arrow::datatypes::Date32Type;
use deltalake::datafusion::prelude::SessionContext;
use deltalake::parquet::arrow::ArrowWriter;
use deltalake::parquet::basic::{Compression, ZstdLevel};
use deltalake::parquet::file::properties::{EnabledStatistics, WriterProperties};
use reelhouse_lake::{deltalake, Lake};

fn zstd(level: i32) -> Compression {
    Compression::ZSTD(ZstdLevel::try_new(level).expect("level"))
}

fn props(codec: Compression, stats: EnabledStatistics) -> WriterProperties {
    WriterProperties::builder()
        .set_compression(codec)
        .set_dictionary_enabled(false)
        .set_statistics_enabled(stats)
        .build()
}

/// Rows of each date, as one batch each, without the date column (Delta keeps it in the path).
fn by_date(batch: &RecordBatch, col: &str) -> Vec<RecordBatch> {
    let dates = batch
        .column_by_name(col)
        .expect("date column")
        .as_primitive::<Date32Type>();
    let mut groups: std::collections::BTreeMap<i32, Vec<u32>> = Default::default();
    for i in 0..dates.len() {
        groups.entry(dates.value(i)).or_default().push(i as u32);
    }
    let idx = batch.schema().index_of(col).expect("col");
    let keep: Vec<usize> = (0..batch.num_columns()).filter(|c| *c != idx).collect();
    let projected = batch.project(&keep).expect("project");
    groups
        .into_values()
        .map(|rows| {
            take_record_batch(
                &projected,
                &deltalake::arrow::array::UInt32Array::from(rows),
            )
            .expect("take")
        })
        .collect()
}

fn encode_all(
    parts: &[RecordBatch],
    props: &WriterProperties,
    dir: Option<&std::path::Path>,
) -> usize {
    let next = std::sync::atomic::AtomicUsize::new(0);
    let bytes = std::sync::atomic::AtomicUsize::new(0);
    std::thread::scope(|s| {
        for _ in 0..2 {
            s.spawn(|| loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let Some(b) = parts.get(i) else { break };
                let mut out = Vec::new();
                let mut w = ArrowWriter::try_new(&mut out, b.schema(), Some(props.clone()))
                    .expect("writer");
                w.write(b).expect("write");
                w.close().expect("close");
                bytes.fetch_add(out.len(), std::sync::atomic::Ordering::Relaxed);
                if let Some(d) = dir {
                    let p = d.join(format!("d{i}"));
                    std::fs::create_dir_all(&p).expect("dir");
                    std::fs::write(p.join("part.parquet"), &out).expect("file");
                }
            });
        }
    });
    bytes.into_inner()
}

#[tokio::main]
async fn main() {
    let mut args = std::env::args().skip(1);
    let dir = args.next().expect("DATA_DIR");
    let name = args.next().unwrap_or_else(|| "fact_video_view".into());
    let lake = Lake::open(&dir).expect("lake");
    let table = lake
        .load_derived(&name)
        .await
        .expect("load")
        .expect("table");
    let ctx = SessionContext::new();
    ctx.register_table("t", table.table_provider().await.expect("provider"))
        .expect("register");
    let df = ctx.table("t").await.expect("table");
    let batches = df.collect().await.expect("collect");
    let batch = concat_batches(&batches[0].schema(), &batches).expect("concat");
    println!(
        "{name}: {} rows, {} columns",
        batch.num_rows(),
        batch.num_columns()
    );
    if args.next().as_deref() == Some("columns") {
        columns(&batch);
        return;
    }
    let out = tempfile::tempdir().expect("tmp");
    for round in 0..2 {
        let t = Instant::now();
        let split = by_date(&batch, "event_date");
        let split_ms = t.elapsed().as_millis();
        for (label, p) in [
            ("zstd3 page stats", props(zstd(3), EnabledStatistics::Page)),
            ("zstd1 page stats", props(zstd(1), EnabledStatistics::Page)),
            (
                "derived_properties (zstd1, plain)",
                reelhouse_lake::derived_properties().expect("props"),
            ),
            (
                "derived_properties_for (zstd1, delta encodings)",
                reelhouse_lake::derived_properties_for(&split[0].schema()).expect("props"),
            ),
            (
                "lz4_raw page stats",
                props(Compression::LZ4_RAW, EnabledStatistics::Page),
            ),
            (
                "snappy page stats",
                props(Compression::SNAPPY, EnabledStatistics::Page),
            ),
            (
                "uncompressed page stats",
                props(Compression::UNCOMPRESSED, EnabledStatistics::Page),
            ),
        ] {
            let t = Instant::now();
            let bytes = encode_all(&split, &p, None);
            println!(
                "round {round}: ArrowWriter {label}, {} files in memory: {} ms ({} bytes; split {split_ms} ms)",
                split.len(),
                t.elapsed().as_millis(),
                bytes
            );
        }
        let t = Instant::now();
        let d = out.path().join(format!("raw{round}"));
        encode_all(&split, &props(zstd(3), EnabledStatistics::Page), Some(&d));
        println!(
            "round {round}: ArrowWriter zstd3 to files: {} ms",
            t.elapsed().as_millis()
        );
        let lake2 = Lake::open(out.path().join(format!("lake{round}"))).expect("lake");
        let t = Instant::now();
        lake2
            .overwrite_derived(
                &name,
                None,
                batch.schema(),
                vec![batch.clone()],
                &["event_date"],
            )
            .await
            .expect("write");
        println!(
            "round {round}: delta-rs overwrite_derived: {} ms",
            t.elapsed().as_millis()
        );
    }
}

/// Each column of `batch` on its own, one file per date: zstd 1 against no compression, and
/// for integer columns DELTA_BINARY_PACKED under zstd 1 (best of three rounds each).
fn columns(batch: &RecordBatch) {
    use deltalake::parquet::basic::Encoding;
    let split = if batch.schema().index_of("event_date").is_ok() {
        by_date(batch, "event_date")
    } else {
        vec![batch.clone()]
    };
    let schema = split[0].schema();
    for (i, field) in schema.fields().iter().enumerate() {
        let parts: Vec<RecordBatch> = split
            .iter()
            .map(|b| b.project(&[i]).expect("project"))
            .collect();
        let mut variants = vec![
            ("zstd1", props(zstd(1), EnabledStatistics::Page)),
            (
                "none",
                props(Compression::UNCOMPRESSED, EnabledStatistics::Page),
            ),
        ];
        let with = |encoding: Option<Encoding>, dictionary: bool| {
            let b = WriterProperties::builder()
                .set_compression(zstd(1))
                .set_dictionary_enabled(dictionary);
            match encoding {
                Some(e) => b.set_encoding(e),
                None => b,
            }
            .build()
        };
        variants.push(("dict+zstd1", with(None, true)));
        let dt = field.data_type();
        if dt.is_integer() || dt.is_temporal() {
            variants.push((
                "delta+zstd1",
                with(Some(Encoding::DELTA_BINARY_PACKED), false),
            ));
        } else if dt.is_floating() {
            variants.push(("bss+zstd1", with(Some(Encoding::BYTE_STREAM_SPLIT), false)));
        } else if matches!(
            dt,
            deltalake::arrow::datatypes::DataType::Utf8View
                | deltalake::arrow::datatypes::DataType::Utf8
        ) {
            variants.push((
                "dlba+zstd1",
                with(Some(Encoding::DELTA_LENGTH_BYTE_ARRAY), false),
            ));
        }
        let mut line = format!(
            "{:<22} {:<28}",
            field.name(),
            format!("{}", field.data_type())
        );
        for (label, p) in variants {
            let mut best = u128::MAX;
            let mut bytes = 0;
            for _ in 0..3 {
                let t = Instant::now();
                bytes = encode_all(&parts, &p, None);
                best = best.min(t.elapsed().as_micros());
            }
            line += &format!(
                " | {label} {:>6.1} ms {:>6.2} MB",
                best as f64 / 1000.0,
                bytes as f64 / 1e6
            );
        }
        println!("{line}");
    }
}
