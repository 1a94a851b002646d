//! Retention (docs/privacy.md): expired partitions of `events` go (files vacuumed), while facts and
//! aggregates of those dates keep their values through later rebuilds.

use std::net::SocketAddr;
use std::sync::Arc;

use reelhouse_engine::EngineConfig;
use reelhouse_event::FixedClock;
use reelhouse_server::ServerConfig;
use reelhouse_workload::{generate, WorkloadConfig};

use crate::common::{post, scalar, sql};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_events_go_and_aggregates_stay() {
    let now = 1_764_000_000_000i64;
    let mut cfg = WorkloadConfig::new(6_000, 97, now);
    cfg.days = 120;
    let w = generate(&cfg);
    let dir = tempfile::tempdir().unwrap();
    let mut ingest = EngineConfig::new(dir.path(), Arc::new(FixedClock(now)));
    ingest.flush_rows = 1_000_000;
    let mut config = ServerConfig::new(ingest, "127.0.0.1:0".parse::<SocketAddr>().unwrap());
    config.materialize_interval = None;
    let server = reelhouse_server::start(config).await.unwrap();
    let u = format!("http://{}", server.addr);
    for chunk in w.lines.chunks(2_000) {
        post(&u, "/v1/events", chunk.join("\n"), "application/x-ndjson").await;
    }
    post(&u, "/v1/admin/materialize", "", "application/json").await;
    let horizon = "DATE '2025-11-24' - INTERVAL '90 days'";
    let old_events = scalar(
        &u,
        &format!("SELECT count(*) FROM events WHERE event_date < {horizon}"),
    )
    .await;
    assert!(old_events > 100);
    let agg = "SELECT * FROM agg_creator_daily ORDER BY creator_id, date";
    let before = sql(&u, agg).await;
    let old_views = scalar(
        &u,
        &format!("SELECT count(*) FROM fact_video_view WHERE event_date < {horizon}"),
    )
    .await;

    let r = server.engine.apply_retention().await.unwrap();
    assert!(r
        .tables
        .iter()
        .any(|t| t.table == "events" && t.rows_removed as i64 >= old_events));
    assert_eq!(
        scalar(
            &u,
            &format!("SELECT count(*) FROM events WHERE event_date < {horizon}")
        )
        .await,
        0
    );
    assert!(scalar(&u, "SELECT count(*) FROM events").await > 0);
    // A later rebuild keeps the old dates' facts and aggregates.
    post(&u, "/v1/admin/materialize", "", "application/json").await;
    let after = sql(&u, agg).await;
    let old = |r: &Vec<serde_json::Value>| r[1].as_str().unwrap() < "2025-08-26";
    let (b_old, a_old): (Vec<_>, Vec<_>) = (
        before.iter().filter(|r| old(r)).collect(),
        after.iter().filter(|r| old(r)).collect(),
    );
    assert!(b_old.len() > 10);
    assert_eq!(a_old, b_old, "aggregates of expired dates are kept exactly");
    let close = |a: &Vec<serde_json::Value>, b: &Vec<serde_json::Value>| {
        a.iter()
            .zip(b)
            .all(|(x, y)| match (x.as_f64(), y.as_f64()) {
                (Some(p), Some(q)) => (p - q).abs() < 1e-9,
                _ => x == y,
            })
    };
    let diff: Vec<_> = after
        .iter()
        .filter(|r| !before.iter().any(|b| close(b, r)))
        .collect();
    // Later dates are recomputed from what remains: only transitions whose earlier like or
    // follow expired can change (an unlike with no like left counts nothing).
    assert!(
        diff.len() * 20 < after.len(),
        "{} of {} rows changed",
        diff.len(),
        after.len()
    );
    assert_eq!(
        scalar(
            &u,
            &format!("SELECT count(*) FROM fact_video_view WHERE event_date < {horizon}")
        )
        .await,
        old_views
    );
    // No Parquet file of events holds an expired date any more.
    let mut old_dirs = 0;
    for e in std::fs::read_dir(dir.path().join("events"))
        .unwrap()
        .flatten()
    {
        let name = e.file_name().to_string_lossy().to_string();
        if let Some(d) = name.strip_prefix("event_date=") {
            let has_files = std::fs::read_dir(e.path()).unwrap().flatten().count() > 0;
            if d < "2025-08-26" && has_files {
                old_dirs += 1;
            }
        }
    }
    assert_eq!(old_dirs, 0, "expired partitions are physically gone");
    server.shutdown().await.unwrap();
}
