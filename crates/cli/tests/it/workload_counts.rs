//! A generated workload over HTTP: the server's counts equal the generator's manifest, SQL
//! per-type counts equal it too, and dedup survives a restart.

use std::collections::BTreeMap;

use reelhouse_workload::{generate, WorkloadConfig};

use crate::common::{post, scalar, sql, start, url};

async fn send(url: &str, bodies: &[Vec<u8>]) -> (u64, u64, u64) {
    let mut tasks = Vec::new();
    for chunk in bodies.chunks(bodies.len().div_ceil(3)) {
        let chunk = chunk.to_vec();
        let url = url.to_string();
        tasks.push(tokio::spawn(async move {
            let mut t = (0, 0, 0);
            for b in chunk {
                let (status, v) = post(&url, "/v1/events", b, "application/x-ndjson").await;
                assert_eq!(status, 200, "{v}");
                t.0 += v["accepted"].as_u64().unwrap();
                t.1 += v["duplicates"].as_u64().unwrap();
                t.2 += v["rejected"].as_u64().unwrap();
            }
            t
        }));
    }
    let mut total = (0, 0, 0);
    for t in tasks {
        let t = t.await.unwrap();
        total = (total.0 + t.0, total.1 + t.1, total.2 + t.2);
    }
    total
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generated_counts_match_manifest_and_dedup_survives_restart() {
    let dir = tempfile::tempdir().unwrap();
    let w = generate(&WorkloadConfig::new(30_000, 11, 1_764_000_000_000));
    let m = &w.manifest;
    let bodies = w.bodies(1_000);

    // A small flush threshold so several Delta commits happen while clients are sending.
    let server = start(dir.path(), 7_000).await;
    let url = url(&server);
    let got = send(&url, &bodies).await;
    assert_eq!(
        got,
        (
            m.valid_unique as u64,
            m.duplicates as u64,
            m.malformed as u64
        )
    );
    let per_type: BTreeMap<String, usize> =
        sql(&url, "SELECT event_type, count(*) FROM events GROUP BY 1")
            .await
            .into_iter()
            .map(|r| {
                (
                    r[0].as_str().unwrap().to_string(),
                    r[1].as_u64().unwrap() as usize,
                )
            })
            .collect();
    assert_eq!(per_type, m.by_type);
    assert_eq!(
        scalar(&url, "SELECT count(*) FROM quarantine").await,
        m.malformed as i64
    );
    assert_eq!(
        scalar(&url, "SELECT count(DISTINCT event_id) FROM events").await,
        m.valid_unique as i64
    );
    server.shutdown().await.unwrap();

    // Restart on the same directory: every re-sent valid event is a duplicate now.
    let server = start(dir.path(), 7_000).await;
    let url = crate::common::url(&server);
    let again = send(&url, &bodies).await;
    assert_eq!(
        again,
        (
            0,
            (m.valid_unique + m.duplicates) as u64,
            m.malformed as u64
        )
    );
    assert_eq!(
        scalar(&url, "SELECT count(*) FROM events").await,
        m.valid_unique as i64
    );
    server.shutdown().await.unwrap();

    // A one-shot open (as `reelhouse ingest` and the maintenance commands do) reads the
    // stored ids only at its first ingest: the re-sent events are still duplicates, an event
    // with a new id is accepted, and its flush stores exactly that one event more.
    let config = reelhouse_engine::EngineConfig::new(
        dir.path(),
        std::sync::Arc::new(reelhouse_event::SystemClock),
    );
    let ing = reelhouse_engine::Engine::open(config).await.unwrap();
    let (mut accepted, mut duplicates) = (0, 0);
    for b in bodies.iter().take(5) {
        let out = ing
            .ingest(b, reelhouse_engine::IngestPath::Bulk)
            .await
            .unwrap();
        accepted += out.accepted;
        duplicates += out.duplicates;
    }
    assert_eq!(accepted, 0);
    assert!(duplicates > 0);
    let fresh = serde_json::json!({
        "event_id": "a-new-id-after-restart", "event_type": "like",
        "event_time": chrono::Utc::now().timestamp_millis(), "user_id": 1,
        "session_id": "s", "video_id": 1, "creator_id": 1,
    })
    .to_string();
    let out = ing
        .ingest(fresh.as_bytes(), reelhouse_engine::IngestPath::Bulk)
        .await
        .unwrap();
    assert_eq!((out.accepted, out.duplicates), (1, 0));
    ing.flush().await.unwrap();
    ing.close().await;
    drop(ing);
    let server = start(dir.path(), 7_000).await;
    let url = crate::common::url(&server);
    assert_eq!(
        scalar(&url, "SELECT count(*) FROM events").await,
        m.valid_unique as i64 + 1
    );
    server.shutdown().await.unwrap();
}
