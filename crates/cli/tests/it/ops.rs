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

    let body = reqwest::get(format!("{u}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
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
