//! Erasure reaches every byte: after `erase`, no Parquet file under the data directory holds
//! the user's id in an id column or any of their event ids, no other file (Delta log, WAL,
//! snapshots, state) holds their event ids or their id as a statistic, SQL finds nothing in
//! any table, the online store has nothing, and the aggregates equal a from-scratch load
//! without the user. Later events of the user are dropped. `anonymize` keeps aggregates.

use std::collections::HashSet;
use std::path::Path;
use std::time::Duration;

use reelhouse_lake::deltalake::arrow::array::{Array, AsArray};
use reelhouse_lake::deltalake::arrow::datatypes::{DataType, Int64Type};
use reelhouse_workload::{generate, WorkloadConfig};
use serde_json::{json, Value};

use crate::common::{free_port, get, post, scalar, spawn_serve, sql, start, url, wait_healthy};

async fn ingest(u: &str, lines: &[String]) {
    for chunk in lines.chunks(2_000) {
        let (status, v) = post(u, "/v1/events", chunk.join("\n"), "application/x-ndjson").await;
        assert_eq!(status, 200, "{v}");
    }
}

async fn forget_and_wait(u: &str, user: i64, mode: &str) -> Value {
    let (status, v) = post(
        u,
        &format!("/v1/users/{user}/forget"),
        json!({ "mode": mode }).to_string(),
        "application/json",
    )
    .await;
    assert_eq!(status, 202, "{v}");
    let id = v["request_id"].as_str().unwrap().to_string();
    for _ in 0..600 {
        let (status, r) = get(u, &format!("/v1/privacy/requests/{id}")).await;
        assert_eq!(status, 200);
        match r["status"].as_str() {
            Some("done") => return r,
            Some("failed") => panic!("request failed: {r}"),
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    panic!("forget request did not finish");
}

/// Every file under `dir`, recursively.
fn files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    // A directory removed since it was listed (a temporary) has nothing left to check.
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            files(&p, out);
        } else {
            out.push(p);
        }
    }
}

/// Reads every Parquet file's columns: no id column equals `user`, no string holds any of
/// `ids` or a `"user_id":user` statistic. Other files: the same on their raw bytes. Returns
/// the number of Parquet files read.
///
/// The server keeps running meanwhile (its timer, snapshots), so a file listed may be gone
/// (a temporary renamed or removed) when it is read: then the whole scan starts over, so that
/// the scan that passes read every file it listed.
fn assert_no_trace(dir: &Path, user: i64, ids: &HashSet<String>) -> usize {
    for _ in 0..20 {
        if let Some(n) = scan_for_trace(dir, user, ids) {
            return n;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("files kept vanishing while the data directory was scanned");
}

/// One scan of [`assert_no_trace`]; `None` when a listed file was gone before it was opened.
fn scan_for_trace(dir: &Path, user: i64, ids: &HashSet<String>) -> Option<usize> {
    use reelhouse_lake::deltalake::parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
    let gone = |e: &std::io::Error| e.kind() == std::io::ErrorKind::NotFound;
    let stat = format!("\"user_id\":{user}");
    let stat_hit = |s: &str| {
        s.match_indices(&stat)
            .any(|(i, m)| !s[i + m.len()..].starts_with(|c: char| c.is_ascii_digit()))
    };
    let mut all = Vec::new();
    files(dir, &mut all);
    let mut parquet_files = 0;
    for f in &all {
        let name = f.display().to_string();
        if name.ends_with(".parquet") {
            parquet_files += 1;
            let file = match std::fs::File::open(f) {
                Err(e) if gone(&e) => {
                    eprintln!("{name} vanished during the scan; scanning again");
                    return None;
                }
                file => file.unwrap(),
            };
            let reader = ParquetRecordBatchReaderBuilder::try_new(file)
                .unwrap()
                .build()
                .unwrap();
            for b in reader {
                let b = b.unwrap();
                for (field, col) in b.schema().fields().iter().zip(b.columns()) {
                    let n = field.name();
                    if (n == "user_id" || n == "id") && col.data_type() == &DataType::Int64 {
                        let a = col.as_primitive::<Int64Type>();
                        assert!(
                            !a.iter().any(|v| v == Some(user)),
                            "{name}: {n} holds the user"
                        );
                    }
                    if let Ok(s) =
                        reelhouse_lake::deltalake::arrow::compute::cast(col, &DataType::Utf8)
                    {
                        for v in s.as_string::<i32>().iter().flatten() {
                            assert!(
                                !ids.contains(v),
                                "{name}: {n} holds an event id of the user"
                            );
                            assert!(!stat_hit(v), "{name}: {n} holds a user_id statistic");
                            if v.len() > 30 {
                                for id in ids {
                                    assert!(
                                        !v.contains(id.as_str()),
                                        "{name}: {n} embeds an event id"
                                    );
                                }
                            }
                        }
                    }
                }
            }
        } else {
            let bytes = match std::fs::read(f) {
                Err(e) if gone(&e) => {
                    eprintln!("{name} vanished during the scan; scanning again");
                    return None;
                }
                bytes => bytes.unwrap(),
            };
            let text = String::from_utf8_lossy(&bytes);
            for id in ids {
                assert!(
                    !text.contains(id.as_str()),
                    "{name} holds an event id of the user"
                );
            }
            assert!(
                !stat_hit(&text),
                "{name} holds the user's id as a statistic"
            );
        }
    }
    Some(parquet_files)
}

/// The user with the most stored events (ties: the smallest id), and that count.
async fn most_active_user(u: &str) -> (i64, i64) {
    let top = sql(
        u,
        "SELECT user_id, count(*) FROM events GROUP BY 1 ORDER BY 2 DESC, 1 LIMIT 1",
    )
    .await;
    (top[0][0].as_i64().unwrap(), top[0][1].as_i64().unwrap())
}

/// The event ids stored for `user`.
async fn event_ids_of(u: &str, user: i64) -> HashSet<String> {
    sql(
        u,
        &format!("SELECT event_id FROM events WHERE user_id = {user}"),
    )
    .await
    .into_iter()
    .map(|r| r[0].as_str().unwrap().to_string())
    .collect()
}

/// Equal rows, floats to 1e-9 (sums in another order differ in the last digit).
fn assert_rows_equal(a: &[Vec<Value>], b: &[Vec<Value>]) {
    assert_eq!(a.len(), b.len(), "row counts");
    for (ra, rb) in a.iter().zip(b) {
        for (x, y) in ra.iter().zip(rb) {
            let same = match (x.as_f64(), y.as_f64()) {
                (Some(p), Some(q)) => (p - q).abs() < 1e-9,
                _ => x == y,
            };
            assert!(same, "{ra:?} vs {rb:?}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn erase_removes_every_trace_and_aggregates_equal_a_load_without_the_user() {
    let now = chrono::Utc::now().timestamp_millis();
    let w = generate(&WorkloadConfig::new(8_000, 91, now));
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), 3_000).await;
    let u = url(&server);
    ingest(&u, &w.lines).await;
    let (user, _) = most_active_user(&u).await;
    // A rejected payload naming the user, and a dimension upsert for them.
    let bad = json!({"event_id": "bad-1", "event_type": "like", "user_id": user}).to_string();
    post(&u, "/v1/events", bad, "application/x-ndjson").await;
    reqwest::Client::new()
        .put(format!("{u}/v1/dims/users"))
        .body(format!("{{\"user_id\":{user},\"tier\":\"gold\"}}"))
        .send()
        .await
        .unwrap();
    let ids = event_ids_of(&u, user).await;
    assert!(ids.len() > 10);
    let (status, v) = post(&u, "/v1/admin/materialize", "", "application/json").await;
    assert_eq!(status, 200, "{v}");
    server.engine.flush().await.unwrap();
    let (_, f) = get(&u, &format!("/v1/features/users/{user}")).await;
    assert!(!f["last_viewed"].as_array().unwrap().is_empty());

    let r = forget_and_wait(&u, user, "erase").await;
    assert!(
        r["receipt"]["rows_removed"].as_u64().unwrap() >= ids.len() as u64,
        "{r}"
    );
    assert!(r["receipt"]["files_vacuumed"].as_u64().unwrap() > 0, "{r}");
    // Only the user's dates (and what they affect) were rebuilt; the checks below hold the
    // result to a load without the user.
    assert_eq!(r["receipt"]["warehouse_rebuild"], "incremental", "{r}");
    assert!(r.get("user_id").is_none() && !r.to_string().contains(&format!(":{user},")));

    for t in [
        "events",
        "fact_video_view",
        "fact_session",
        "fact_engagement",
        "fact_follow",
        "like_state",
        "follow_state",
        "dim_user",
        "fact_share",
    ] {
        assert_eq!(
            scalar(
                &u,
                &format!("SELECT count(*) FROM {t} WHERE user_id = {user}")
            )
            .await,
            0,
            "{t}"
        );
    }
    assert_eq!(
        scalar(
            &u,
            "SELECT count(*) FROM quarantine WHERE event_id = 'bad-1'"
        )
        .await,
        0
    );
    let (_, f) = get(&u, &format!("/v1/features/users/{user}")).await;
    assert_eq!(f["last_viewed"], json!([]));
    assert_eq!(f["sessions_today"], 0);

    let files = assert_no_trace(dir.path(), user, &ids);
    assert!(files > 5);

    // Later events of the user are dropped and counted.
    let late = json!({"event_id": "late-1", "event_type": "follow_creator", "event_time": now,
                      "user_id": user.to_string(), "creator_id": 1});
    let (_, v) = post(&u, "/v1/events", late.to_string(), "application/x-ndjson").await;
    assert_eq!(v["erased_dropped"], 1, "{v}");
    assert_eq!(
        scalar(
            &u,
            &format!("SELECT count(*) FROM events WHERE user_id = {user}")
        )
        .await,
        0
    );
    let (_, h) = get(&u, "/v1/health").await;
    assert!(h["ingest"]["erased_dropped"].as_u64() >= Some(1), "{h}");

    // The aggregates equal a fresh load of the same workload without the user.
    let after = sql(
        &u,
        "SELECT * FROM agg_creator_daily ORDER BY creator_id, date",
    )
    .await;
    server.shutdown().await.unwrap();
    let user_re = [
        format!("\"user_id\":{user},"),
        format!("\"user_id\":\"{user}\""),
    ];
    let without: Vec<String> = w
        .lines
        .iter()
        .filter(|l| !user_re.iter().any(|p| l.contains(p.as_str())))
        .cloned()
        .collect();
    let dir2 = tempfile::tempdir().unwrap();
    let fresh = start(dir2.path(), 1_000_000).await;
    let u2 = url(&fresh);
    ingest(&u2, &without).await;
    post(&u2, "/v1/admin/materialize", "", "application/json").await;
    let want = sql(
        &u2,
        "SELECT * FROM agg_creator_daily ORDER BY creator_id, date",
    )
    .await;
    assert_rows_equal(&after, &want);
    fresh.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anonymize_keeps_aggregates_and_unlinks_the_user() {
    let now = chrono::Utc::now().timestamp_millis();
    let w = generate(&WorkloadConfig::new(5_000, 93, now));
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), 1_000_000).await;
    let u = url(&server);
    ingest(&u, &w.lines).await;
    post(&u, "/v1/admin/materialize", "", "application/json").await;
    let (user, n) = most_active_user(&u).await;
    let total = scalar(&u, "SELECT count(*) FROM events").await;
    let before = sql(
        &u,
        "SELECT * FROM agg_creator_daily ORDER BY creator_id, date",
    )
    .await;
    let (_, vf) = get(&u, "/v1/features/creators/1").await;

    forget_and_wait(&u, user, "anonymize").await;
    assert_eq!(
        scalar(
            &u,
            &format!("SELECT count(*) FROM events WHERE user_id = {user}")
        )
        .await,
        0
    );
    assert_eq!(scalar(&u, "SELECT count(*) FROM events").await, total);
    // One surrogate now holds exactly the user's events, with no device fields.
    let s = sql(&u, &format!("SELECT user_id, count(*), count(device_os) FROM events GROUP BY 1 HAVING count(*) = {n} AND count(device_os) = 0")).await;
    assert!(!s.is_empty());
    let after = sql(
        &u,
        "SELECT * FROM agg_creator_daily ORDER BY creator_id, date",
    )
    .await;
    assert_rows_equal(&before, &after);
    let (_, vf2) = get(&u, "/v1/features/creators/1").await;
    assert_eq!(vf, vf2);
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_during_erasure_then_the_request_completes_after_restart() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let u = format!("http://127.0.0.1:{port}");
    let mut child = spawn_serve(dir.path(), port, &[]);
    wait_healthy(&u).await;
    let w = generate(&WorkloadConfig::new(
        6_000,
        95,
        chrono::Utc::now().timestamp_millis(),
    ));
    ingest(&u, &w.lines).await;
    post(&u, "/v1/admin/materialize", "", "application/json").await;
    let (user, _) = most_active_user(&u).await;
    let ids = event_ids_of(&u, user).await;
    let (status, v) = post(
        &u,
        &format!("/v1/users/{user}/forget"),
        json!({"mode": "erase"}).to_string(),
        "application/json",
    )
    .await;
    assert_eq!(status, 202);
    let id = v["request_id"].as_str().unwrap().to_string();
    tokio::time::sleep(Duration::from_millis(30)).await;
    child.kill().expect("SIGKILL");
    child.wait().unwrap();

    let mut child = spawn_serve(dir.path(), port, &[]);
    wait_healthy(&u).await;
    let mut done = false;
    for _ in 0..600 {
        let (_, r) = get(&u, &format!("/v1/privacy/requests/{id}")).await;
        if r["status"] == "done" {
            done = true;
            break;
        }
        assert_ne!(r["status"], "failed", "{r}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(done, "the request completes after the restart");
    assert_eq!(
        scalar(
            &u,
            &format!("SELECT count(*) FROM events WHERE user_id = {user}")
        )
        .await,
        0
    );
    child.kill().unwrap();
    child.wait().unwrap();
    assert_no_trace(dir.path(), user, &ids);
}

/// Shutdown waits for the engine's background work: a forget request accepted just before it
/// has run to the end by the time `shutdown` returns (its receipt says `done` when the data
/// directory is opened again, before anything could resume it), and the final flush left no
/// WAL record behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_waits_for_a_forget_request_accepted_before_it() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), 1_000_000).await;
    let u = url(&server);
    let w = generate(&WorkloadConfig::new(
        3_000,
        71,
        chrono::Utc::now().timestamp_millis(),
    ));
    ingest(&u, &w.lines).await;
    let (user, events) = most_active_user(&u).await;
    assert!(events > 0);
    let (status, v) = post(
        &u,
        &format!("/v1/users/{user}/forget"),
        json!({ "mode": "erase" }).to_string(),
        "application/json",
    )
    .await;
    assert_eq!(status, 202, "{v}");
    let id = v["request_id"].as_str().unwrap().to_string();
    server.shutdown().await.unwrap();

    // Opened without starting anything: no resume can have run the request since.
    let mut config = reelhouse_engine::EngineConfig::new(
        dir.path(),
        std::sync::Arc::new(reelhouse_event::SystemClock),
    );
    config.flush_rows = 1_000_000;
    let engine = reelhouse_engine::Engine::open(config).await.unwrap();
    let receipt = engine.privacy_request(&id).expect("the request is stored");
    assert_eq!(receipt["status"], "done", "{receipt}");
    assert_eq!(
        engine.pending_rows(),
        0,
        "the final flush committed everything"
    );
    let catalog = engine.catalog().await.unwrap();
    let left = catalog
        .query(&format!(
            "SELECT count(*) FROM events WHERE user_id = {user}"
        ))
        .await
        .unwrap();
    let left = left[0].column(0).as_primitive::<Int64Type>().value(0);
    assert_eq!(left, 0);
    engine.shutdown().await.unwrap();
}
