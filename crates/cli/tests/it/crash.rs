//! SIGKILL right after acknowledged batches (and while Delta commits are happening): after a
//! restart on the same data dir, every acknowledged event is there exactly once.

use std::collections::HashSet;
use std::process::{Child, Command, Stdio};

use reelhouse_workload::{generate, WorkloadConfig};

use crate::common::{free_port, post, stored_once, wait_healthy};

fn spawn_server(dir: &std::path::Path, port: u16) -> Child {
    Command::new(env!("CARGO_BIN_EXE_reelhouse"))
        .args([
            "serve",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--flush-rows",
            "3000",
            "--flush-interval-ms",
            "300",
        ])
        .arg("--data-dir")
        .arg(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn reelhouse serve")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_loses_no_acknowledged_event() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}");
    let mut child = spawn_server(dir.path(), port);
    wait_healthy(&url).await;

    let mut cfg = WorkloadConfig::new(20_000, 5, 1_764_000_000_000);
    cfg.duplicate_fraction = 0.0;
    cfg.malformed_fraction = 0.0;
    let w = generate(&cfg);
    let ids: Vec<String> = w
        .lines
        .iter()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["event_id"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    let mut acked: HashSet<String> = HashSet::new();
    // Send in bodies of 500; flushes (3,000 rows) and WAL truncations happen in between.
    for (i, body) in w.bodies(500).into_iter().enumerate() {
        let (status, v) = post(&url, "/v1/events", body, "application/x-ndjson").await;
        assert_eq!(status, 200, "{v}");
        assert_eq!(v["accepted"].as_u64().unwrap(), 500);
        acked.extend(ids[i * 500..(i + 1) * 500].iter().cloned());
        if i == 25 {
            break;
        }
    }
    child.kill().expect("SIGKILL");
    child.wait().unwrap();

    let mut child = spawn_server(dir.path(), port);
    wait_healthy(&url).await;
    let stored = stored_once(&url).await;
    assert_eq!(stored, acked, "exactly the acknowledged events survive");
    // Re-sending every acknowledged batch after the crash stores nothing new: the ids of
    // the committed ones are in the dedup runs on disk, the rest were replayed from the WAL.
    assert!(dir.path().join("_dedup/complete").exists());
    let resend = |n: usize| w.bodies(500).into_iter().take(n);
    for body in resend(26) {
        let (status, v) = post(&url, "/v1/events", body, "application/x-ndjson").await;
        assert_eq!(status, 200);
        assert_eq!(v["duplicates"].as_u64(), Some(500), "{v}");
    }

    // SIGTERM flushes: after it, the WAL holds nothing that is not in Delta.
    Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status()
        .unwrap();
    assert!(child.wait().unwrap().success());
    let table = reelhouse_lake::Lake::open(dir.path())
        .unwrap()
        .load(reelhouse_lake::RawTable::Events)
        .await
        .unwrap()
        .unwrap();
    let committed = reelhouse_lake::committed_segment(&table)
        .await
        .unwrap()
        .unwrap();
    let left: Vec<_> = reelhouse_wal::read_dir(dir.path().join("_wal"), false)
        .unwrap()
        .into_iter()
        .filter(|r| r.segment > committed)
        .collect();
    assert!(
        left.is_empty(),
        "{} WAL records not committed after SIGTERM",
        left.len()
    );

    // A data directory without dedup runs (written before they existed) is scanned once at
    // start: the stored ids are duplicates still.
    std::fs::remove_dir_all(dir.path().join("_dedup")).unwrap();
    let mut child = spawn_server(dir.path(), port);
    wait_healthy(&url).await;
    for body in resend(2) {
        let (status, v) = post(&url, "/v1/events", body, "application/x-ndjson").await;
        assert_eq!(status, 200);
        assert_eq!(v["duplicates"].as_u64(), Some(500), "{v}");
    }
    assert!(dir.path().join("_dedup/complete").exists());
    child.kill().unwrap();
    child.wait().unwrap();
}

/// The crash window between the Delta commit and the WAL truncation: the old segments are
/// still on disk at restart. The Delta transaction version tells replay to skip them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_between_delta_commit_and_wal_truncation_stores_nothing_twice() {
    use std::sync::Arc;

    use reelhouse_engine::{Engine, EngineConfig, IngestPath};

    let dir = tempfile::tempdir().unwrap();
    let wal = dir.path().join("_wal");
    let saved = tempfile::tempdir().unwrap();
    let w = generate(&WorkloadConfig::new(4_000, 9, 1_764_000_000_000));
    let config = EngineConfig::new(dir.path(), Arc::new(reelhouse_event::SystemClock));
    let accepted = {
        let ing = Engine::open(config.clone()).await.unwrap();
        let mut accepted = 0;
        for b in w.bodies(1_000) {
            accepted += ing.ingest(&b, IngestPath::Bulk).await.unwrap().accepted;
        }
        // Keep a copy of the segments as they were before the flush deletes them.
        for e in std::fs::read_dir(&wal).unwrap() {
            let e = e.unwrap();
            std::fs::copy(e.path(), saved.path().join(e.file_name())).unwrap();
        }
        assert_eq!(ing.flush().await.unwrap(), accepted + w.manifest.malformed);
        accepted
    };
    for e in std::fs::read_dir(saved.path()).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), wal.join(e.file_name())).unwrap();
    }
    let ing = Engine::open(config).await.unwrap();
    assert_eq!(
        ing.stats().replayed_rows,
        0,
        "segments already in Delta are skipped"
    );
    let catalog = ing.catalog().await.unwrap();
    let r = catalog
        .query_json("SELECT count(*), count(DISTINCT event_id) FROM events", 1)
        .await
        .unwrap();
    assert_eq!(r.rows[0][0].as_u64(), Some(accepted as u64));
    assert_eq!(r.rows[0][1].as_u64(), Some(accepted as u64));
    let r = catalog
        .query_json("SELECT count(*) FROM quarantine", 1)
        .await
        .unwrap();
    assert_eq!(r.rows[0][0].as_u64(), Some(w.manifest.malformed as u64));
}
