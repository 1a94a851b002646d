//! Operations endpoints: `/metrics` counts what the ingest and the materializer did (checked
//! against the generator's manifest and the requests made), liveness and readiness answer,
//! and the probes need no token while `/metrics` does.

use std::collections::HashMap;

use reelhouse_workload::{generate, WorkloadConfig};

use crate::common::{get, post, start, url};

/// `name value` lines of a Prometheus text body (no labels).
fn values(body: &str) -> HashMap<String, f64> {
    body.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split_once(' '))
        .filter_map(|(k, v)| Some((k.to_string(), v.parse().ok()?)))
        .collect()
}

/// The `/metrics` body.
async fn metrics(u: &str) -> String {
    reqwest::get(format!("{u}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_what_happened_and_probes_answer() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), 5_000).await;
    let u = url(&server);
    let w = generate(&WorkloadConfig::new(
        6_000,
        61,
        chrono::Utc::now().timestamp_millis(),
    ));
    for body in w.bodies(2_000) {
        let (status, _) = post(&u, "/v1/events", body, "application/x-ndjson").await;
        assert_eq!(status, 200);
    }
    let lookups = 7;
    for id in 0..lookups {
        assert_eq!(get(&u, &format!("/v1/features/videos/{id}")).await.0, 200);
    }
    let (status, _) = post(&u, "/v1/admin/materialize", "", "application/json").await;
    assert_eq!(status, 200);

    let body = metrics(&u).await;
    let m = values(&body);
    let m = |k: &str| *m.get(k).unwrap_or_else(|| panic!("{k} missing in\n{body}"));
    let man = &w.manifest;
    assert_eq!(
        m("reelhouse_events_accepted_total"),
        man.valid_unique as f64
    );
    assert_eq!(m("reelhouse_events_duplicate_total"), man.duplicates as f64);
    assert_eq!(m("reelhouse_events_rejected_total"), man.malformed as f64);
    assert_eq!(m("reelhouse_feature_lookup_seconds_count"), lookups as f64);
    assert!(m("reelhouse_materializations_total") >= 1.0);
    assert_eq!(m("reelhouse_events_since_materialization"), 0.0);
    assert!(body.contains("reelhouse_feature_lookup_seconds_bucket{le=\"+Inf\"} 7"));

    assert_eq!(get(&u, "/v1/health/live").await.0, 200);
    let (status, v) = get(&u, "/v1/health/ready").await;
    assert_eq!((status, v["status"].as_str()), (200, Some("ready")));
    server.shutdown().await.unwrap();
}

/// A flush per small request leaves a file per date each time; once a date has 16 small files
/// the flush compacts it. Every event is still there exactly once (checked against the
/// generator's manifest and per type against a load flushed once), the compaction shows in
/// `/metrics`, and the warehouse built on the compacted files equals the other one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_flushes_are_compacted_and_nothing_is_lost() {
    use crate::common::{scalar, sql};
    // Events up to the last noon (UTC) passed, whatever the time of day: how many requests
    // hold events of a date depends on where the days fall in the generated range. In 40
    // requests, a full date gets a file from at least 16 of them.
    const DAY_MS: i64 = 86_400_000;
    let now = chrono::Utc::now().timestamp_millis();
    let noon = now - now.rem_euclid(DAY_MS) + DAY_MS / 2;
    let now = if now >= noon { noon } else { noon - DAY_MS };
    let w = generate(&WorkloadConfig::new(6_000, 67, now));
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), 1_000_000).await;
    let u = url(&server);
    let bodies = w.bodies(150);
    assert!(bodies.len() >= 34, "{} requests", bodies.len());
    for body in bodies {
        let (status, _) = post(&u, "/v1/events", body, "application/x-ndjson").await;
        assert_eq!(status, 200);
        server.engine.flush().await.unwrap();
    }
    let body = metrics(&u).await;
    let compactions = values(&body)["reelhouse_delta_compactions_total"];
    assert!(compactions >= 1.0, "no compaction in\n{body}");
    let man = &w.manifest;
    assert_eq!(
        scalar(&u, "SELECT count(*) FROM events").await,
        man.valid_unique as i64
    );
    assert_eq!(
        scalar(&u, "SELECT count(DISTINCT event_id) FROM events").await,
        man.valid_unique as i64
    );
    let (status, _) = post(&u, "/v1/admin/materialize", "", "application/json").await;
    assert_eq!(status, 200);
    let per_type = "SELECT event_type, count(*) FROM events GROUP BY 1 ORDER BY 1";
    let daily = "SELECT * FROM agg_creator_daily ORDER BY creator_id, date";
    let (a_types, a_daily) = (sql(&u, per_type).await, sql(&u, daily).await);
    server.shutdown().await.unwrap();

    // The same events in one flush: no compaction, the same rows and aggregates.
    let dir2 = tempfile::tempdir().unwrap();
    let server = start(dir2.path(), 1_000_000).await;
    let u = url(&server);
    for body in w.bodies(2_000) {
        assert_eq!(
            post(&u, "/v1/events", body, "application/x-ndjson").await.0,
            200
        );
    }
    server.engine.flush().await.unwrap();
    let (status, _) = post(&u, "/v1/admin/materialize", "", "application/json").await;
    assert_eq!(status, 200);
    assert_eq!(sql(&u, per_type).await, a_types);
    // Exactly: the averages are summed in an order-independent way, so another file layout
    // (one flush against 40 and a compaction) gives the same bits.
    assert_eq!(sql(&u, daily).await, a_daily);
    server.shutdown().await.unwrap();
}
