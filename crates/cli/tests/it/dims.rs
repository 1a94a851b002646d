//! Dimensions end to end: `PUT /v1/dims/users` upserts become SCD2 versions of `dim_user`
//! (partial upserts carry the other attributes over), events fill the rest, bad lines are
//! rejected one by one, and `dim_date` covers the event dates.

use serde_json::{json, Value};

use crate::common::{scalar, sql, start, url};

async fn put(u: &str, path: &str, body: &str) -> (u16, Value) {
    let r = reqwest::Client::new()
        .put(format!("{u}{path}"))
        .header("content-type", "application/x-ndjson")
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upserts_become_scd2_versions_and_events_fill_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), 1_000_000).await;
    let u = url(&server);
    let t0 = chrono::Utc::now().timestamp_millis() - 3 * 86_400_000;
    let ev = |id: &str, user: i64, video: i64, creator: i64, dt: i64, country: &str| {
        json!({"event_id": id, "event_type": "like", "event_time": t0 + dt, "user_id": user,
               "session_id": "s", "video_id": video, "creator_id": creator,
               "device": {"os": "ios", "app_version": "1.2", "country": country}})
        .to_string()
    };
    let body = [
        ev("a", 5, 70, 9, 0, "US"),
        ev("b", 5, 71, 9, 3_600_000, "CA"),
        ev("c", 6, 70, 8, 2 * 86_400_000, "GB"),
    ]
    .join("\n");
    crate::common::post(&u, "/v1/events", body, "application/x-ndjson").await;

    let t1 = t0 + 86_400_000;
    let t2 = t0 + 2 * 86_400_000;
    let upserts = format!(
        "{{\"user_id\":5,\"valid_from\":{t1},\"country\":\"FR\",\"tier\":\"silver\"}}\n\
         {{\"user_id\":\"5\",\"valid_from\":{t2},\"tier\":\"gold\"}}\n\
         {{\"user_id\":-1}}\n\
         {{\"user_id\":77,\"name\":\"only upserted\"}}"
    );
    let (status, v) = put(&u, "/v1/dims/users", &upserts).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(
        (v["accepted"].as_u64(), v["rejected"].as_u64()),
        (Some(3), Some(1))
    );
    assert_eq!(v["errors"][0]["index"], 2);
    let (status, _) = put(&u, "/v1/dims/planets", "{}").await;
    assert_eq!(status, 404);
    let (status, v) =
        crate::common::post(&u, "/v1/admin/materialize", "", "application/json").await;
    assert_eq!(status, 200, "{v}");

    let rows = sql(
        &u,
        "SELECT country, attributes, CAST(valid_from AS BIGINT) / 1000, \
         CAST(valid_to AS BIGINT) / 1000, is_current, os FROM dim_user WHERE user_id = 5 \
         ORDER BY valid_from",
    )
    .await;
    assert_eq!(rows.len(), 3, "{rows:?}");
    // From the first event: the latest device country seen in events.
    assert_eq!(rows[0][0], json!("CA"));
    assert_eq!(rows[0][2].as_i64(), Some(t0));
    assert_eq!(rows[0][3].as_i64(), Some(t1));
    // The upsert overrides country; the partial second one keeps it and changes the tier.
    assert_eq!(rows[1][0], json!("FR"));
    assert_eq!(rows[2][0], json!("FR"));
    let attrs: Value = serde_json::from_str(rows[2][1].as_str().unwrap()).unwrap();
    assert_eq!(attrs, json!({"country": "FR", "tier": "gold"}));
    assert_eq!(rows[1][3].as_i64(), Some(t2));
    assert_eq!(rows[2][3], Value::Null);
    assert_eq!(
        rows.iter()
            .map(|r| r[4].as_bool().unwrap())
            .collect::<Vec<_>>(),
        vec![false, false, true]
    );
    assert_eq!(
        rows[2][5],
        json!("ios"),
        "event-filled columns stay on every version"
    );
    // Every user has exactly one current version; an upserted-only user exists too.
    assert_eq!(
        scalar(&u, "SELECT count(*) FROM dim_user WHERE is_current").await,
        3
    );
    assert_eq!(
        scalar(
            &u,
            "SELECT count(*) FROM dim_user WHERE user_id = 77 AND first_seen IS NULL"
        )
        .await,
        1
    );
    // Videos take their latest creator from events; dates cover the event range.
    assert_eq!(
        scalar(
            &u,
            "SELECT creator_id FROM dim_video WHERE video_id = 70 AND is_current"
        )
        .await,
        8
    );
    assert_eq!(scalar(&u, "SELECT count(*) FROM dim_date").await, 3);
    assert_eq!(
        scalar(&u, "SELECT videos FROM dim_creator WHERE creator_id = 9").await,
        2
    );
    server.shutdown().await.unwrap();
}
