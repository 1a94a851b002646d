//! Per-event results of mixed batches, limits, and the read-only SQL gate.

use serde_json::{json, Value};

use crate::common::{post, scalar, sql, start, url};

fn ev(id: &str, ty: &str, extra: Value) -> Value {
    let mut e = json!({
        "event_id": id, "event_type": ty, "event_time": "2026-11-20T10:00:00.000Z",
        "user_id": 42, "session_id": "s1", "video_id": "7", "creator_id": 9, "view_id": "v1",
    });
    for (k, v) in extra.as_object().unwrap() {
        if v.is_null() {
            e.as_object_mut().unwrap().remove(k);
        } else {
            e[k] = v.clone();
        }
    }
    e
}

fn ndjson(items: &[String]) -> String {
    items.join("\n") + "\n"
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mixed_batch_gets_exact_per_event_results() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), 1_000_000).await;
    let url = url(&server);

    let lines: Vec<String> = vec![
        ev("a1", "video_view_start", json!({"props": {"source": "feed"}})).to_string(),
        ev("a2", "video_view_end", json!({"props": {"watch_ms": 1500, "video_duration_ms": 3000}})).to_string(),
        ev("bad-watch", "video_view_end", json!({"props": {"watch_ms": -1, "video_duration_ms": 3000}})).to_string(),
        ev("bad-nowatch", "video_view_end", json!({"props": {"video_duration_ms": 3000}})).to_string(),
        "{\"event_id\": \"trunc\", \"event_type\":".to_string(),
        ev("a1", "video_view_start", json!({})).to_string(), // duplicate inside the batch
        ev("bad-type", "teleport", json!({})).to_string(),
        ev("bad-user", "like", json!({"user_id": "abc"})).to_string(),
        ev("bad-time", "like", json!({"event_time": "yesterday"})).to_string(),
        ev("bad-session", "like", json!({"session_id": null})).to_string(),
        ev("a3", "follow_creator", json!({"session_id": null, "video_id": null, "view_id": null, "event_time": 1763632800000u64})).to_string(),
        ev("a4", "comment", json!({"props": {"comment_id": "c1", "length": 12, "text": "no PII please"}, "campaign": "x"})).to_string(),
        "42".to_string(),
        ev("bad-share", "share", json!({})).to_string(),
    ];
    let (status, body) = post(&url, "/v1/events", ndjson(&lines), "application/x-ndjson").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["accepted"], 4);
    assert_eq!(body["duplicates"], 1);
    assert_eq!(body["rejected"], 9);
    let errors: Vec<(u64, Value, String)> = body["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["index"].as_u64().unwrap(),
                e["event_id"].clone(),
                e["reason"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let expect = vec![
        (2, json!("bad-watch"), "props.watch_ms must be an integer ≥ 0"),
        (3, json!("bad-nowatch"), "video_view_end requires props.watch_ms ≥ 0"),
        (4, Value::Null, "malformed JSON: unexpected end of input at line 1 column 35"),
        (6, json!("bad-type"), "unknown event_type; expected one of video_view_start, video_view_end, like, unlike, comment, share, session_start, session_end, follow_creator, unfollow_creator"),
        (7, json!("bad-user"), "user_id must be a non-negative integer ≤ 9223372036854775807, as a JSON number or decimal string"),
        (8, json!("bad-time"), "event_time must be an RFC 3339 string or integer epoch milliseconds"),
        (9, json!("bad-session"), "like requires session_id"),
        (12, Value::Null, "event must be a JSON object"),
        (13, json!("bad-share"), "share requires props.share_id"),
    ];
    let expect: Vec<(u64, Value, String)> = expect
        .into_iter()
        .map(|(i, id, r)| (i, id, r.to_string()))
        .collect();
    assert_eq!(errors, expect);

    // The same events again as a JSON array: all duplicates or rejected, nothing new stored.
    let arr = format!(
        "[{}]",
        lines
            .iter()
            .filter(|l| l.starts_with('{') && l.ends_with('}'))
            .cloned()
            .collect::<Vec<_>>()
            .join(",")
    );
    let (status, body) = post(&url, "/v1/events", arr, "application/json").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        (
            body["accepted"].as_u64(),
            body["duplicates"].as_u64(),
            body["rejected"].as_u64()
        ),
        (Some(0), Some(5), Some(7))
    );

    // What SQL sees equals what was acknowledged, before and after the Delta commit.
    for round in 0..2 {
        assert_eq!(
            scalar(&url, "SELECT count(*) FROM events").await,
            4,
            "round {round}"
        );
        assert_eq!(
            scalar(&url, "SELECT count(*) FROM quarantine").await,
            16,
            "round {round}"
        );
        server.engine.flush().await.unwrap();
    }
    let rows = sql(&url, "SELECT event_id, user_id, video_id, event_date, source, watch_ms, time_corrected, extra FROM events ORDER BY event_id").await;
    assert_eq!(
        rows[0],
        json!(["a1", 42, 7, "2026-11-20", "feed", null, false, null])
            .as_array()
            .unwrap()
            .clone()
    );
    assert_eq!(rows[1][5], json!(1500));
    assert_eq!(rows[3][7], json!("{\"campaign\":\"x\"}"));
    let all = sql(&url, "SELECT * FROM events").await;
    assert!(
        !serde_json::to_string(&all).unwrap().contains("no PII"),
        "comment text must never be stored"
    );
    let q = sql(
        &url,
        "SELECT raw FROM quarantine WHERE event_id = 'bad-time' LIMIT 1",
    )
    .await;
    assert_eq!(
        q[0][0].as_str().unwrap(),
        lines[8],
        "quarantine keeps the raw line unmodified"
    );
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_and_bad_bodies_are_refused_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), 1_000_000).await;
    let url = url(&server);

    let big = "x".repeat((1 << 20) + 1);
    let (status, body) = post(&url, "/v1/events", big, "application/x-ndjson").await;
    assert_eq!(status, 413);
    assert_eq!(body["error"]["code"], "payload_too_large");

    let (status, body) = post(&url, "/v1/events", "[{\"a\":1},", "application/json").await;
    assert_eq!(status, 400);
    assert_eq!(body["error"]["code"], "bad_request");

    let (status, body) = post(&url, "/v1/sql", "not json", "application/json").await;
    assert_eq!(status, 400, "{body}");
    let (status, _) = post(&url, "/v1/nothing", "", "application/json").await;
    assert_eq!(status, 404);

    for q in [
        "INSERT INTO events SELECT * FROM events",
        "DROP TABLE events",
        "CREATE EXTERNAL TABLE p STORED AS CSV LOCATION '/etc/passwd'",
        "COPY (SELECT 1) TO '/tmp/reelhouse-sql-escape.csv'",
        "SELECT * FROM '/etc/passwd'",
        "SELECT * FROM read_csv('/etc/passwd')",
        "CREATE TABLE t AS SELECT 1",
        "SELECT 1; SELECT 2",
    ] {
        let (status, body) = post(
            &url,
            "/v1/sql",
            json!({ "sql": q }).to_string(),
            "application/json",
        )
        .await;
        assert_eq!(status, 400, "{q} must be refused: {body}");
        assert_eq!(body["error"]["code"], "invalid_sql", "{q}");
        assert!(!body["error"]["message"].as_str().unwrap().is_empty());
    }
    assert!(!std::path::Path::new("/tmp/reelhouse-sql-escape.csv").exists());
    let (status, body) = post(
        &url,
        "/v1/sql",
        json!({"sql": "SHOW TABLES"}).to_string(),
        "application/json",
    )
    .await;
    assert_eq!(status, 200, "{body}");
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stored_times_follow_the_skew_and_future_rules() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), 1_000_000).await;
    let url = url(&server);
    let now = chrono::Utc::now().timestamp_millis();
    // Device clock 10 minutes fast: it says the event happened 1 minute before it sent.
    let skewed = ev(
        "skew",
        "like",
        json!({"event_time": now + 600_000 - 60_000, "sent_at": now + 600_000}),
    );
    // Device clock an hour fast, no sent_at: clamped to received_at.
    let future = ev("future", "like", json!({"event_time": now + 3_600_000}));
    let plain = ev("plain", "like", json!({"event_time": now - 5_000}));
    let body = ndjson(&[skewed.to_string(), future.to_string(), plain.to_string()]);
    let (status, v) = post(&url, "/v1/events", body, "application/x-ndjson").await;
    assert_eq!((status, v["accepted"].as_u64()), (200, Some(3)), "{v}");
    let rows = sql(
        &url,
        "SELECT event_id, lateness_ms, time_corrected, \
         (CAST(received_at AS BIGINT) - CAST(event_time AS BIGINT)) / 1000, \
         CAST(client_event_time AS BIGINT) / 1000, \
         event_date = CAST(event_time AS DATE) \
         FROM events ORDER BY event_id",
    )
    .await;
    // future: clamped to received_at, flagged, device time kept.
    assert_eq!(rows[0][0], "future");
    assert_eq!(rows[0][1], 0);
    assert_eq!(rows[0][2], true);
    assert_eq!(rows[0][4].as_i64(), Some(now + 3_600_000));
    // plain: untouched, lateness = received_at − event_time ≥ 5 s.
    assert_eq!(rows[1][0], "plain");
    assert_eq!(rows[1][2], false);
    assert!(rows[1][4].is_null());
    assert!(rows[1][1].as_i64().unwrap() >= 5_000);
    // skew: exactly one minute before received_at.
    assert_eq!(rows[2][0], "skew");
    assert_eq!(rows[2][1], 60_000);
    assert_eq!(rows[2][3], 60_000);
    assert_eq!(rows[2][2], true);
    for r in &rows {
        assert_eq!(
            r[5], true,
            "event_date is the UTC date of the stored event_time"
        );
        assert_eq!(r[1], r[3], "lateness_ms = received_at − event_time");
    }
    server.shutdown().await.unwrap();
}
