//! Tests of the lake: writers, rewrites, compaction, encodings, bloom filters.

use super::*;
use deltalake::arrow::array::{Date32Array, Int64Array};
use deltalake::arrow::datatypes::{DataType, Field, Schema};
use deltalake::datafusion::prelude::SessionContext;

fn batch(schema: &SchemaRef, rows: &[(i32, i64)]) -> RecordBatch {
    RecordBatch::try_new(
        schema.clone(),
        vec![
            Arc::new(Date32Array::from(
                rows.iter().map(|r| r.0).collect::<Vec<_>>(),
            )),
            Arc::new(Int64Array::from(
                rows.iter().map(|r| r.1).collect::<Vec<_>>(),
            )),
        ],
    )
    .unwrap()
}

/// `sql` over `table`, registered as `name` in a fresh session.
async fn query(table: &DeltaTable, name: &str, sql: &str) -> Vec<RecordBatch> {
    let ctx = SessionContext::new();
    ctx.register_table(name, table.table_provider().await.unwrap())
        .unwrap();
    ctx.sql(sql).await.unwrap().collect().await.unwrap()
}

/// `sql` over `batch` registered as `t` in memory.
async fn query_batch(batch: &RecordBatch, sql: &str) -> Vec<RecordBatch> {
    use deltalake::datafusion::datasource::MemTable;
    let ctx = SessionContext::new();
    let t = MemTable::try_new(batch.schema(), vec![vec![batch.clone()]]).unwrap();
    ctx.register_table("t", Arc::new(t)).unwrap();
    ctx.sql(sql).await.unwrap().collect().await.unwrap()
}

async fn rows(table: &DeltaTable) -> Vec<(i32, i64)> {
    let out = query(table, "t", "SELECT CAST(d AS INT), v FROM t ORDER BY 1, 2").await;
    use deltalake::arrow::array::AsArray;
    use deltalake::arrow::datatypes::{Int32Type, Int64Type};
    out.iter()
        .flat_map(|b| {
            let d = b.column(0).as_primitive::<Int32Type>().clone();
            let v = b.column(1).as_primitive::<Int64Type>().clone();
            (0..b.num_rows()).map(move |i| (d.value(i), v.value(i)))
        })
        .collect()
}

#[tokio::test]
async fn replace_dates_swaps_only_the_named_dates() {
    let dir = tempfile::tempdir().unwrap();
    let lake = Lake::open(dir.path()).unwrap();
    let schema: SchemaRef = Arc::new(Schema::new(vec![
        Field::new("d", DataType::Date32, false),
        Field::new("v", DataType::Int64, false),
    ]));
    for parts in [&["d"][..], &[][..]] {
        let name = format!("t{}", parts.len());
        let t = lake
            .overwrite_derived(
                &name,
                None,
                schema.clone(),
                vec![batch(&schema, &[(20_000, 1), (20_001, 2), (20_002, 3)])],
                parts,
            )
            .await
            .unwrap();
        let files = |t: &DeltaTable| -> Vec<String> {
            let mut f: Vec<String> = t.get_file_uris().unwrap().collect();
            f.sort();
            f
        };
        let before = files(&t);
        let t = lake
            .replace_dates(
                &name,
                t,
                schema.clone(),
                vec![batch(&schema, &[(20_001, 20), (20_001, 21), (20_003, 4)])],
                "d",
                &[20_001, 20_003],
            )
            .await
            .unwrap();
        if !parts.is_empty() {
            // The other dates' files stay; the named ones are replaced.
            let after = files(&t);
            let kept = |f: &String| f.contains("d=2024-10-04") || f.contains("d=2024-10-06");
            assert_eq!(
                before.iter().filter(|f| kept(f)).collect::<Vec<_>>(),
                after.iter().filter(|f| kept(f)).collect::<Vec<_>>()
            );
            assert_eq!(after.len(), 4);
            assert!(!after
                .iter()
                .any(|f| before.contains(f) && f.contains("d=2024-10-05")));
        }
        assert_eq!(
            rows(&t).await,
            vec![
                (20_000, 1),
                (20_001, 20),
                (20_001, 21),
                (20_002, 3),
                (20_003, 4)
            ],
            "partitioned by {parts:?}"
        );
        // A date with no new rows is emptied.
        let t = lake
            .replace_dates(&name, t, schema.clone(), vec![], "d", &[20_000])
            .await
            .unwrap();
        assert_eq!(rows(&t).await[0], (20_001, 20));
    }
}

#[tokio::test]
async fn overwrite_of_an_existing_table_replaces_every_file_in_one_commit() {
    use futures::StreamExt;
    let dir = tempfile::tempdir().unwrap();
    let lake = Lake::open(dir.path()).unwrap();
    let schema: SchemaRef = Arc::new(Schema::new(vec![
        Field::new("d", DataType::Date32, false),
        Field::new("v", DataType::Int64, false),
    ]));
    let old = [(20_000, 1), (20_001, 2), (20_002, 3)];
    // Dates out of order and split over batches; values that differ per date, so a
    // file's min/max statistics decide which files a filter on `v` reads.
    let new_a = [(20_005, 500), (20_001, 100), (20_005, 501)];
    let new_b = [(20_001, 101), (20_003, 300), (20_001, 102)];
    for parts in [&["d"][..], &[][..]] {
        let name = format!("o{}", parts.len());
        let created = lake
            .overwrite_derived(
                &name,
                None,
                schema.clone(),
                vec![batch(&schema, &old)],
                parts,
            )
            .await
            .unwrap();
        assert!(rewrite::fits(&created, &schema, parts));
        let t = lake
            .overwrite_derived(
                &name,
                Some(created),
                schema.clone(),
                vec![batch(&schema, &new_a), batch(&schema, &new_b)],
                parts,
            )
            .await
            .unwrap();
        let mut want: Vec<(i32, i64)> = new_a.iter().chain(&new_b).copied().collect();
        want.sort();
        assert_eq!(rows(&t).await, want, "partitioned by {parts:?}");
        assert_eq!(t.version(), Some(1), "one commit");
        let files: Vec<_> = t.snapshot().unwrap().log_data().into_iter().collect();
        let records: usize = files.iter().map(|f| f.num_records().unwrap()).sum();
        assert_eq!(records, want.len(), "every file carries numRecords");
        if parts.is_empty() {
            assert!(files.len() <= write_streams());
        } else {
            // One file per date, under its partition directory.
            assert_eq!(files.len(), 3);
            for f in &files {
                assert!(f.path().starts_with("d="), "{}", f.path());
            }
        }
        // A filter on `v` prunes by the statistics; it must still find every row.
        let hits = query(&t, "t", "SELECT count(*) FROM t WHERE v >= 300 AND v < 501").await;
        use deltalake::arrow::array::AsArray;
        let n = hits[0]
            .column(0)
            .as_primitive::<deltalake::arrow::datatypes::Int64Type>()
            .value(0);
        assert_eq!(n, 2);
        let info = t.history(Some(1)).next().await.unwrap().unwrap();
        assert_eq!(info.operation.as_deref(), Some("WRITE"));
        let mode = &info.operation_parameters.unwrap()["mode"];
        assert_eq!(mode, "Overwrite");
        // The old version is still readable until a vacuum.
        let mut v0 = lake.load_derived(&name).await.unwrap().unwrap();
        v0.load_version(0).await.unwrap();
        assert_eq!(rows(&v0).await, old.to_vec());
        // No rows: every file is removed.
        let t = lake
            .overwrite_derived(&name, Some(t), schema.clone(), vec![], parts)
            .await
            .unwrap();
        assert_eq!(rows(&t).await, vec![]);
        assert_eq!(t.snapshot().unwrap().log_data().num_files(), 0);
    }
    // New columns do not fit; delta-rs's write replaces the schema.
    let wider: SchemaRef = Arc::new(Schema::new(vec![
        Field::new("d", DataType::Date32, false),
        Field::new("v", DataType::Int64, false),
        Field::new("w", DataType::Int64, false),
    ]));
    let t = lake.load_derived("o1").await.unwrap().unwrap();
    assert!(!rewrite::fits(&t, &wider, &["d"]));
    let b = RecordBatch::try_new(
        wider.clone(),
        vec![
            Arc::new(Date32Array::from(vec![20_000])),
            Arc::new(Int64Array::from(vec![7])),
            Arc::new(Int64Array::from(vec![8])),
        ],
    )
    .unwrap();
    let t = lake
        .overwrite_derived("o1", Some(t), wider, vec![b], &["d"])
        .await
        .unwrap();
    let out = query(&t, "t", "SELECT v, w FROM t").await;
    assert_eq!(out[0].num_columns(), 2);
    assert_eq!(out[0].num_rows(), 1);
}

#[tokio::test]
async fn rewrites_keep_the_files_of_dates_whose_rows_did_not_change() {
    let dir = tempfile::tempdir().unwrap();
    let lake = Lake::open(dir.path()).unwrap();
    let schema: SchemaRef = Arc::new(Schema::new(vec![
        Field::new("d", DataType::Date32, false),
        Field::new("v", DataType::Int64, false),
    ]));
    let paths = |t: &DeltaTable| -> std::collections::BTreeMap<String, String> {
        t.snapshot()
            .unwrap()
            .log_data()
            .into_iter()
            .map(|f| {
                (
                    f.path().split('/').next().unwrap().to_string(),
                    f.path().to_string(),
                )
            })
            .collect()
    };
    let rows0 = [(20_000, 1), (20_000, 2), (20_001, 3), (20_002, 4)];
    // The same rows in another order and split: nothing to write.
    let shuffled = [[(20_002, 4), (20_000, 2)], [(20_001, 3), (20_000, 1)]];
    for parts in [&["d"][..], &[][..]] {
        let name = format!("k{}", parts.len());
        // Writes one batch of `rows` over version `t` of the table, with `lake`'s settings.
        let write = async |lake: &Lake, t: Option<DeltaTable>, rows: &[(i32, i64)]| {
            let batches = vec![batch(&schema, rows)];
            lake.overwrite_derived(&name, t, schema.clone(), batches, parts)
                .await
                .unwrap()
        };
        let created = write(&lake, None, &rows0).await;
        // Written by delta-rs without fingerprints: the first rewrite writes every date.
        let t = write(&lake, Some(created), &rows0).await;
        assert_eq!(t.version(), Some(1));
        let tagged = paths(&t);
        // A fresh handle after a checkpoint: the tags are read back from it.
        deltalake::checkpoints::create_checkpoint(&t, None)
            .await
            .unwrap();
        let t = lake.load_derived(&name).await.unwrap().unwrap();
        let t = lake
            .overwrite_derived(
                &name,
                Some(t),
                schema.clone(),
                shuffled.iter().map(|r| batch(&schema, r)).collect(),
                parts,
            )
            .await
            .unwrap();
        assert_eq!(
            t.version(),
            Some(1),
            "no commit when no row changed ({parts:?})"
        );
        assert_eq!(paths(&t), tagged);
        // One value changed (same row count), one date gone, one new.
        let rows1 = [(20_000, 1), (20_000, 2), (20_001, 30), (20_003, 5)];
        let t = write(&lake, Some(t), &rows1).await;
        assert_eq!(t.version(), Some(2));
        assert_eq!(rows(&t).await, rows1.to_vec(), "{parts:?}");
        let now = paths(&t);
        let t = if parts.is_empty() {
            assert!(now.values().all(|p| !tagged.values().any(|q| q == p)));
            t
        } else {
            assert_eq!(now["d=2024-10-04"], tagged["d=2024-10-04"], "kept");
            assert_ne!(now["d=2024-10-05"], tagged["d=2024-10-05"], "rewritten");
            assert!(!now.contains_key("d=2024-10-06"), "removed");
            // Replacing dates: an unchanged one is kept, a changed one rewritten.
            let t = lake
                .replace_dates(
                    &name,
                    t,
                    schema.clone(),
                    vec![batch(&schema, &rows1[..2])],
                    "d",
                    &[20_000],
                )
                .await
                .unwrap();
            assert_eq!(t.version(), Some(2), "no commit");
            let t = lake
                .replace_dates(
                    &name,
                    t,
                    schema.clone(),
                    vec![batch(&schema, &[(20_000, 1), (20_000, 2), (20_001, 31)])],
                    "d",
                    &[20_000, 20_001],
                )
                .await
                .unwrap();
            assert_eq!(t.version(), Some(3));
            let after = paths(&t);
            assert_eq!(after["d=2024-10-04"], now["d=2024-10-04"]);
            assert_ne!(after["d=2024-10-05"], now["d=2024-10-05"]);
            assert_eq!(after["d=2024-10-07"], now["d=2024-10-07"]);
            assert_eq!(
                rows(&t).await,
                vec![(20_000, 1), (20_000, 2), (20_001, 31), (20_003, 5)]
            );
            t
        };
        // A file rewritten by someone else (an erasure's delete) carries no fingerprint:
        // the next rewrite of the same rows as before writes its date again.
        let full = rows(&t).await;
        let (t, _) = t.delete().with_predicate("v = 2").await.unwrap();
        let v = t.version();
        let t = write(&lake, Some(t), &full).await;
        assert_eq!(t.version(), v.map(|v| v + 1));
        assert_eq!(rows(&t).await, full, "{parts:?}");
        // Rewriting unchanged files (benchmarks): the same rows, every file new.
        let before = paths(&t);
        let v = t.version();
        let t = write(&lake.clone().rewriting_unchanged(true), Some(t), &full).await;
        assert_eq!(t.version(), v.map(|v| v + 1), "{parts:?}");
        assert_eq!(rows(&t).await, full, "{parts:?}");
        let after = paths(&t);
        assert_eq!(after.len(), before.len());
        assert!(after.values().all(|p| !before.values().any(|q| q == p)));
    }
}

/// A date above [`rewrite::SPLIT_ROWS`] rows is written as several files (a multiple of
/// the write streams), all tagged with the fingerprint of the whole date: the same rows
/// again keep them, one changed row rewrites all of them, and no row is lost or doubled.
#[tokio::test]
async fn a_big_date_is_cut_into_files_that_are_kept_or_rewritten_together() {
    let dir = tempfile::tempdir().unwrap();
    let lake = Lake::open(dir.path()).unwrap();
    let schema: SchemaRef = Arc::new(Schema::new(vec![
        Field::new("d", DataType::Date32, false),
        Field::new("v", DataType::Int64, false),
    ]));
    let n = rewrite::SPLIT_ROWS as i64 + 1_000;
    let mut rows0: Vec<(i32, i64)> = (0..n).map(|v| (20_000, v)).collect();
    rows0.extend((0..10).map(|v| (20_001, v)));
    let files = |t: &DeltaTable, date: &str| -> Vec<String> {
        let mut f: Vec<String> = t
            .snapshot()
            .unwrap()
            .log_data()
            .into_iter()
            .map(|f| f.path().to_string())
            .filter(|p| p.starts_with(&format!("d={date}/")))
            .collect();
        f.sort();
        f
    };
    let write = async |lake: &Lake, t: Option<DeltaTable>, rows: &[(i32, i64)]| {
        // Two batches, the big date's rows split across them and out of order.
        let (a, b) = rows.split_at(rows.len() / 3);
        let batches = vec![batch(&schema, b), batch(&schema, a)];
        lake.overwrite_derived("big", t, schema.clone(), batches, &["d"])
            .await
            .unwrap()
    };
    let created = write(&lake, None, &rows0).await;
    let t = write(&lake, Some(created), &rows0).await;
    let want = rewrite::files_for(n as usize, write_streams());
    if write_streams() > 1 {
        assert!(want > 1, "{want}");
    }
    let big = files(&t, "2024-10-04");
    assert_eq!(big.len(), want, "{big:?}");
    assert_eq!(files(&t, "2024-10-05").len(), 1);
    assert_eq!(rows(&t).await, rows0);
    // The same rows: every file kept, no commit.
    let v = t.version();
    let t = write(&lake, Some(t), &rows0).await;
    assert_eq!(t.version(), v);
    assert_eq!(files(&t, "2024-10-04"), big);
    // One row of the big date changed: all of its files are replaced, the small date's
    // file is kept.
    let small = files(&t, "2024-10-05");
    let mut rows1 = rows0.clone();
    rows1[7].1 = -7;
    let t = write(&lake, Some(t), &rows1).await;
    assert_eq!(t.version(), v.map(|v| v + 1));
    let big1 = files(&t, "2024-10-04");
    assert_eq!(big1.len(), want);
    assert!(big1.iter().all(|p| !big.contains(p)), "{big1:?}");
    assert_eq!(files(&t, "2024-10-05"), small);
    rows1.sort();
    assert_eq!(rows(&t).await, rows1);
}

/// Derived files encode integers, dates and timestamps as `DELTA_BINARY_PACKED` and
/// strings as `DELTA_LENGTH_BYTE_ARRAY` ([`derived_properties_for`]), whether delta-rs
/// (a new table) or the rewrite path wrote them, and their rows read back unchanged.
#[tokio::test]
async fn derived_files_use_the_encodings_of_their_column_types() {
    use deltalake::arrow::array::{
        BooleanArray, Float64Array, StringArray, TimestampMicrosecondArray,
    };
    use deltalake::arrow::datatypes::TimeUnit;
    use deltalake::parquet::basic::Encoding;
    use deltalake::parquet::file::reader::{FileReader, SerializedFileReader};
    let dir = tempfile::tempdir().unwrap();
    let lake = Lake::open(dir.path()).unwrap();
    let ts = DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()));
    let schema: SchemaRef = Arc::new(Schema::new(vec![
        Field::new("d", DataType::Date32, false),
        Field::new("i", DataType::Int64, true),
        Field::new("t", ts.clone(), false),
        Field::new("s", DataType::Utf8, true),
        Field::new("f", DataType::Float64, false),
        Field::new("b", DataType::Boolean, false),
    ]));
    let n = 5_000i64;
    let batch = |shift: i64| {
        RecordBatch::try_new(
            Arc::clone(&schema),
            vec![
                Arc::new(Date32Array::from_iter_values(
                    (0..n).map(|r| 20_000 + (r % 3) as i32),
                )),
                Arc::new(Int64Array::from_iter(
                    (0..n).map(|r| (r % 7 != 0).then_some(r * 37 - 9_000 + shift)),
                )),
                Arc::new(
                    TimestampMicrosecondArray::from_iter_values(
                        (0..n).map(|r| 1_700_000_000_000_000 + r * 1_000_003),
                    )
                    .with_timezone("UTC"),
                ),
                Arc::new(StringArray::from_iter((0..n).map(|r| {
                    (r % 11 != 0).then(|| {
                        format!("{:x}-{}", r * 2_654_435_761, "é".repeat((r % 4) as usize))
                    })
                }))),
                Arc::new(Float64Array::from_iter_values(
                    (0..n).map(|r| r as f64 / 7.0),
                )),
                Arc::new(BooleanArray::from_iter((0..n).map(|r| Some(r % 3 == 0)))),
            ],
        )
        .unwrap()
    };
    let sql = "SELECT CAST(d AS INT) AS d, i, CAST(t AS BIGINT) AS t, s, f, b FROM t \
               ORDER BY t";
    let mut table = None;
    for shift in [0, 1] {
        let t = lake
            .overwrite_derived(
                "enc",
                table.take(),
                Arc::clone(&schema),
                vec![batch(shift)],
                &["d"],
            )
            .await
            .unwrap();
        let printed = |b: &[RecordBatch]| {
            deltalake::arrow::util::pretty::pretty_format_batches(b)
                .unwrap()
                .to_string()
        };
        let want = printed(&query_batch(&batch(shift), sql).await);
        assert_eq!(want.lines().count(), n as usize + 4, "header, rows, rules");
        let got = printed(&query(&t, "t", sql).await);
        assert_eq!(got, want, "rows read back, shift {shift}");
        let mut files = 0;
        for uri in t.get_file_uris().unwrap() {
            files += 1;
            let path = url::Url::parse(&uri)
                .ok()
                .and_then(|u| u.to_file_path().ok())
                .unwrap_or_else(|| PathBuf::from(&uri));
            let reader = SerializedFileReader::new(std::fs::File::open(&path).unwrap()).unwrap();
            let rg = reader.metadata().row_group(0);
            for c in rg.columns() {
                let name = c.column_descr().name().to_string();
                let expected = match name.as_str() {
                    "i" | "t" => Some(Encoding::DELTA_BINARY_PACKED),
                    "s" => Some(Encoding::DELTA_LENGTH_BYTE_ARRAY),
                    "f" | "b" => None,
                    other => panic!("unexpected column {other}"),
                };
                let encodings = c.encodings().collect::<Vec<_>>();
                match expected {
                    Some(e) => assert!(encodings.contains(&e), "{name}: {encodings:?}"),
                    None => assert!(
                        encodings.contains(&Encoding::PLAIN),
                        "{name}: {encodings:?}"
                    ),
                }
            }
        }
        assert_eq!(files, 3, "one file per date");
        table = Some(t);
    }
}

#[tokio::test]
async fn string_views_are_rewritten_in_the_tables_string_type() {
    use deltalake::arrow::array::{Array, ArrayRef, StringArray, StringViewArray};
    let dir = tempfile::tempdir().unwrap();
    let lake = Lake::open(dir.path()).unwrap();
    let schema = |t: DataType| -> SchemaRef {
        Arc::new(Schema::new(vec![
            Field::new("d", DataType::Date32, false),
            Field::new("s", t, true),
        ]))
    };
    let (plain, view) = (schema(DataType::Utf8), schema(DataType::Utf8View));
    let b = |rows: &[(i32, Option<&str>)], views: bool| {
        let d = Arc::new(Date32Array::from(
            rows.iter().map(|r| r.0).collect::<Vec<_>>(),
        ));
        let s: ArrayRef = if views {
            Arc::new(StringViewArray::from(
                rows.iter().map(|r| r.1).collect::<Vec<_>>(),
            ))
        } else {
            Arc::new(StringArray::from(
                rows.iter().map(|r| r.1).collect::<Vec<_>>(),
            ))
        };
        RecordBatch::try_new(if views { view.clone() } else { plain.clone() }, vec![d, s]).unwrap()
    };
    let rows = [
        (20_000, Some("a")),
        (20_001, None),
        (20_001, Some("a longer string value")),
    ];
    let t = lake
        .overwrite_derived("sv", None, plain.clone(), vec![b(&rows, false)], &["d"])
        .await
        .unwrap();
    assert!(rewrite::fits(&t, &view, &["d"]));
    let t = lake
        .overwrite_derived("sv", Some(t), view.clone(), vec![b(&rows, true)], &["d"])
        .await
        .unwrap();
    let tags = |t: &DeltaTable| -> Vec<bool> {
        #[allow(deprecated)]
        t.snapshot()
            .unwrap()
            .log_data()
            .into_iter()
            .map(|f| {
                f.add_action()
                    .tags
                    .is_some_and(|t| t.contains_key(rewrite::ROWS_TAG))
            })
            .collect()
    };
    assert_eq!(tags(&t), vec![true, true], "written by the rewrite path");
    let out = query(
        &t,
        "t",
        "SELECT CAST(d AS INT) AS d, s FROM t ORDER BY d, s",
    )
    .await;
    let mut got: Vec<(i32, Option<String>)> = out
        .iter()
        .flat_map(|r| {
            use deltalake::arrow::array::AsArray;
            use deltalake::arrow::datatypes::Int32Type;
            let d = r.column(0).as_primitive::<Int32Type>().clone();
            let s = deltalake::arrow::compute::cast(r.column(1), &DataType::Utf8).unwrap();
            let s = s.as_string::<i32>().clone();
            (0..r.num_rows())
                .map(move |i| (d.value(i), s.is_valid(i).then(|| s.value(i).to_string())))
        })
        .collect();
    let mut want: Vec<_> = rows.iter().map(|r| (r.0, r.1.map(String::from))).collect();
    want.sort();
    got.sort();
    assert_eq!(got, want);
    // The same rows again, as views: nothing to write.
    let t = lake
        .overwrite_derived("sv", Some(t), view.clone(), vec![b(&rows, true)], &["d"])
        .await
        .unwrap();
    assert_eq!(t.version(), Some(1));
}

/// The valid events of a generated workload of `n` lines over `days` days, as stored.
fn stored_events(n: usize, seed: u64, days: u32) -> Vec<reelhouse_event::StoredEvent> {
    use reelhouse_event::{parse_event, stamp};
    let mut cfg = reelhouse_workload::WorkloadConfig::new(n, seed, 1_764_000_000_000);
    cfg.days = days;
    reelhouse_workload::generate(&cfg)
        .lines
        .iter()
        .filter_map(|l| parse_event(l.as_bytes()).ok())
        .map(|e| stamp(e, cfg.end_ms))
        .collect()
}

/// The bloom filter of `user_id` in each live `events` file (`None` when it has none)
/// and the users the file holds.
fn user_filters(
    table: &DeltaTable,
) -> Vec<(
    Option<deltalake::parquet::bloom_filter::Sbbf>,
    std::collections::BTreeSet<i64>,
)> {
    use deltalake::arrow::array::AsArray;
    use deltalake::arrow::datatypes::Int64Type;
    use deltalake::parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
    use deltalake::parquet::arrow::ProjectionMask;
    use deltalake::parquet::file::properties::ReaderProperties;
    use deltalake::parquet::file::reader::{FileReader, SerializedFileReader};
    use deltalake::parquet::file::serialized_reader::ReadOptionsBuilder;
    let mut out = Vec::new();
    for uri in table.get_file_uris().unwrap() {
        let path = url::Url::parse(&uri)
            .ok()
            .and_then(|u| u.to_file_path().ok())
            .unwrap_or_else(|| PathBuf::from(&uri));
        let opts = ReadOptionsBuilder::new()
            .with_reader_properties(
                ReaderProperties::builder()
                    .set_read_bloom_filter(true)
                    .build(),
            )
            .build();
        let reader =
            SerializedFileReader::new_with_options(std::fs::File::open(&path).unwrap(), opts)
                .unwrap();
        let meta = reader.metadata();
        assert_eq!(meta.num_row_groups(), 1, "one row group per file");
        let col = meta
            .file_metadata()
            .schema_descr()
            .columns()
            .iter()
            .position(|c| c.name() == "user_id")
            .unwrap();
        let filter = reader
            .get_row_group(0)
            .unwrap()
            .get_column_bloom_filter(col)
            .cloned();
        let b =
            ParquetRecordBatchReaderBuilder::try_new(std::fs::File::open(&path).unwrap()).unwrap();
        let mask = ProjectionMask::leaves(b.parquet_schema(), [col]);
        let mut users = std::collections::BTreeSet::new();
        for batch in b.with_projection(mask).build().unwrap() {
            let batch = batch.unwrap();
            users.extend(batch.column(0).as_primitive::<Int64Type>().iter().flatten());
        }
        out.push((filter, users));
    }
    out
}

/// Every `events` file carries a `user_id` bloom filter that holds each of its users and
/// rules out most others, also after an erasure rewrote the files; DataFusion then skips
/// the files of a user who is not in them.
#[tokio::test]
async fn events_files_carry_a_user_bloom_filter() {
    let dir = tempfile::tempdir().unwrap();
    let lake = Lake::open(dir.path()).unwrap();
    let rows = stored_events(20_000, 3, 4);
    let batch = events_batch(&rows).unwrap();
    let table = lake
        .append(RawTable::Events, None, &[batch], 1)
        .await
        .unwrap();
    let check = |table: &DeltaTable, erased: Option<i64>| {
        let files = user_filters(table);
        assert!(files.len() >= 4, "one file per date: {}", files.len());
        let all: std::collections::BTreeSet<i64> =
            files.iter().flat_map(|f| f.1.iter().copied()).collect();
        let (mut absent, mut passed) = (0usize, 0usize);
        for (filter, users) in &files {
            let filter = filter.as_ref().expect("a user_id bloom filter");
            for u in users {
                assert!(filter.check(u), "a file's own user must pass its filter");
            }
            // Users of other files, and ids of no one.
            for u in all.iter().copied().chain(9_000_000..9_002_000) {
                if !users.contains(&u) {
                    absent += 1;
                    passed += filter.check(&u) as usize;
                }
            }
        }
        if let Some(u) = erased {
            assert!(!all.contains(&u), "the erased user's rows are gone");
        }
        let rate = passed as f64 / absent as f64;
        assert!(
            absent > 1000 && rate < 0.03,
            "false positives {passed} of {absent}"
        );
        all
    };
    let users = check(&table, None);
    // A user on few dates: the filters rule out the files of the other dates.
    let per_user = query(
        &table,
        "events",
        "SELECT user_id, count(DISTINCT event_date) AS d FROM events \
         GROUP BY user_id ORDER BY d, user_id LIMIT 1",
    )
    .await;
    use deltalake::arrow::array::AsArray;
    use deltalake::arrow::datatypes::Int64Type;
    let rare = per_user[0].column(0).as_primitive::<Int64Type>().value(0);
    let plan = query(
        &table,
        "events",
        &format!("EXPLAIN ANALYZE SELECT count(*) FROM events WHERE user_id = {rare}"),
    )
    .await;
    let text = deltalake::arrow::util::pretty::pretty_format_batches(&plan)
        .unwrap()
        .to_string();
    let pruned = text
        .split("row_groups_pruned_bloom_filter=")
        .nth(1)
        .and_then(|t| t.split(" matched").next())
        .unwrap_or_else(|| panic!("no bloom filter metric in {text}"));
    let (total, matched) = pruned.split_once(" total → ").unwrap();
    let (total, matched): (usize, usize) = (
        total.trim().parse().unwrap(),
        matched.trim().parse().unwrap(),
    );
    assert!(matched < total, "bloom filters pruned nothing: {pruned}");
    // An erasure rewrites the files that held the user, with the same filters.
    let gone = *users.iter().nth(users.len() / 2).unwrap();
    let props = RawTable::Events.rewrite_properties(&table).unwrap();
    let mut report = erase::TableErasure::default();
    let table = erase::delete_where(
        table,
        &format!("user_id = {gone}"),
        Some(props),
        &mut report,
    )
    .await
    .unwrap();
    assert!(report.rows_removed > 0 && report.files_rewritten > 0);
    check(&table, Some(gone));
}

/// Many small appends to the same dates are binned into one file per date by
/// [`compact::compact`]: the rows, the WAL segment recorded in the table and the bloom
/// filters stay; dates with few files are left alone; a second run does nothing.
#[tokio::test]
async fn compaction_bins_small_files_and_keeps_every_row() {
    let dir = tempfile::tempdir().unwrap();
    let lake = Lake::open(dir.path()).unwrap();
    let rows = stored_events(6_000, 5, 3);
    // 20 flushes, each with events of every date, except the first date, whose events
    // come in 5 of them.
    let first = rows.iter().map(|r| r.event_date).min().unwrap();
    let mut flushes = vec![Vec::new(); 20];
    for (i, r) in rows.into_iter().enumerate() {
        let k = if r.event_date == first { i % 5 } else { i % 20 };
        flushes[k].push(r);
    }
    let mut table = None;
    for (i, f) in flushes.iter().enumerate() {
        let batch = events_batch(f).unwrap();
        table = Some(
            lake.append(RawTable::Events, table, &[batch], i as u64 + 1)
                .await
                .unwrap(),
        );
    }
    let table = table.unwrap();
    let files_per_date = |t: &DeltaTable| {
        let mut m: std::collections::BTreeMap<String, usize> = Default::default();
        for f in t.snapshot().unwrap().log_data() {
            let d = f.partition_values_map()["event_date"].clone().unwrap();
            *m.entry(d).or_default() += 1;
        }
        m
    };
    let before = files_per_date(&table);
    let busy: Vec<String> = before
        .iter()
        .filter(|(_, n)| **n >= 16)
        .map(|(d, _)| d.clone())
        .collect();
    assert!(busy.len() >= 2, "dates with 16+ files: {before:?}");
    assert!(before.values().any(|n| *n < 16), "a quiet date: {before:?}");
    let content = |t: DeltaTable| async move {
        let b = query(&t, "events", "SELECT * FROM events ORDER BY event_id").await;
        deltalake::arrow::util::pretty::pretty_format_batches(&b)
            .unwrap()
            .to_string()
    };
    let rows_before = content(table.clone()).await;
    let (table, c) = compact::compact(RawTable::Events, table, 16).await.unwrap();
    assert_eq!(c.partitions, busy);
    let after = files_per_date(&table);
    for (d, n) in &before {
        let expect = if busy.contains(d) { 1 } else { *n };
        assert_eq!(after[d], expect, "files of {d}");
    }
    assert_eq!(
        c.files_removed as usize,
        busy.iter().map(|d| before[d]).sum::<usize>()
    );
    assert_eq!(c.files_added as usize, busy.len());
    assert_eq!(content(table.clone()).await, rows_before);
    assert_eq!(committed_segment(&table).await.unwrap(), Some(20));
    for (filter, users) in user_filters(&table) {
        let filter = filter.expect("a compacted file keeps its user_id bloom filter");
        assert!(users.iter().all(|u| filter.check(u)));
    }
    let (_, again) = compact::compact(RawTable::Events, table, 16).await.unwrap();
    assert!(again.partitions.is_empty() && again.files_removed == 0);
}
