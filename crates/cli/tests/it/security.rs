//! Access control (README.md, HTTP API) against the real server: every protected endpoint refuses a
//! missing token (401), a wrong role (403) and another creator's id (403); each role reaches
//! what it should; SQL stays read-only for analysts; oversized and malformed bodies are refused
//! cleanly; error bodies never echo the token or a user id.

use std::net::SocketAddr;
use std::sync::Arc;

use crate::common::write_tokens;
use reelhouse_engine::EngineConfig;
use reelhouse_event::SystemClock;
use reelhouse_server::ServerConfig;
use serde_json::{json, Value};

async fn call(u: &str, method: &str, path: &str, token: Option<&str>, body: &str) -> (u16, Value) {
    let c = reqwest::Client::new();
    let mut r = match method {
        "GET" => c.get(format!("{u}{path}")),
        "PUT" => c.put(format!("{u}{path}")),
        _ => c.post(format!("{u}{path}")),
    }
    .body(body.to_string());
    if let Some(t) = token {
        r = r.header("authorization", format!("Bearer {t}"));
    }
    let resp = r.send().await.unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_and_roles_gate_every_endpoint() {
    let dir = tempfile::tempdir().unwrap();
    let tokens = write_tokens(
        dir.path(),
        &[
            ("secret-a", "admin"),
            ("secret-i", "ingest"),
            ("secret-n", "analyst"),
            ("secret-c", "creator:9"),
        ],
    );
    let mut ingest = EngineConfig::new(dir.path().join("data"), Arc::new(SystemClock));
    ingest.flush_rows = 1_000_000;
    let mut config = ServerConfig::new(ingest, "127.0.0.1:0".parse::<SocketAddr>().unwrap());
    config.tokens = tokens;
    config.max_body_bytes = 4096;
    config.materialize_interval = None;
    let server = reelhouse_server::start(config).await.unwrap();
    let u = format!("http://{}", server.addr);
    let (admin, ingest_t, analyst, creator) = ("secret-a", "secret-i", "secret-n", "secret-c");

    let ev = json!({"event_id": "e1", "event_type": "follow_creator", "event_time": 1_764_000_000_000i64,
                    "user_id": 123456789, "creator_id": 9})
    .to_string();
    // Each endpoint: (method, path, body, roles that may call it).
    let endpoints: Vec<(&str, String, String, Vec<&str>)> = vec![
        (
            "POST",
            "/v1/events".into(),
            ev.clone(),
            vec![admin, ingest_t],
        ),
        (
            "POST",
            "/v1/sql".into(),
            json!({"sql": "SELECT 1"}).to_string(),
            vec![admin, analyst],
        ),
        (
            "GET",
            "/v1/features/videos/1".into(),
            String::new(),
            vec![admin, analyst],
        ),
        (
            "GET",
            "/v1/features/users/1".into(),
            String::new(),
            vec![admin, analyst],
        ),
        (
            "GET",
            "/v1/creators/9/dashboard?from=2025-01-01&to=2025-01-02".into(),
            String::new(),
            vec![admin, analyst, creator],
        ),
        (
            "GET",
            "/v1/creators/8/dashboard?from=2025-01-01&to=2025-01-02".into(),
            String::new(),
            vec![admin, analyst],
        ),
        (
            "GET",
            "/v1/creators/9/videos?from=2025-01-01&to=2025-01-02".into(),
            String::new(),
            vec![admin, analyst, creator],
        ),
        (
            "GET",
            "/v1/creators/8/videos?from=2025-01-01&to=2025-01-02".into(),
            String::new(),
            vec![admin, analyst],
        ),
        (
            "GET",
            "/v1/creators/9/cascades".into(),
            String::new(),
            vec![admin, analyst, creator],
        ),
        (
            "GET",
            "/v1/creators/8/cascades".into(),
            String::new(),
            vec![admin, analyst],
        ),
        (
            "GET",
            "/metrics".into(),
            String::new(),
            vec![admin, analyst],
        ),
        (
            "POST",
            "/v1/admin/materialize".into(),
            String::new(),
            vec![admin],
        ),
        (
            "PUT",
            "/v1/dims/users".into(),
            "{\"user_id\":1}".into(),
            vec![admin],
        ),
        (
            "GET",
            "/v1/ingest/lateness".into(),
            String::new(),
            vec![admin, analyst],
        ),
    ];
    for (method, path, body, may) in &endpoints {
        let (status, v) = call(&u, method, path, None, body).await;
        assert_eq!(status, 401, "{method} {path} without a token: {v}");
        assert_eq!(v["error"]["code"], "unauthorized");
        let (status, _) = call(&u, method, path, Some("wrong"), body).await;
        assert_eq!(status, 401, "{method} {path} with an unknown token");
        for t in [admin, ingest_t, analyst, creator] {
            let (status, v) = call(&u, method, path, Some(t), body).await;
            if may.contains(&t) {
                assert!(
                    status != 401 && status != 403,
                    "{method} {path} as {t}: {status} {v}"
                );
            } else {
                assert_eq!(status, 403, "{method} {path} as {t}: {v}");
                assert!(!v.to_string().contains(t) && !v.to_string().contains("123456789"));
            }
        }
    }
    // Analysts cannot write or read files through SQL.
    for q in [
        "DELETE FROM events",
        "COPY events TO '/tmp/x'",
        "CREATE TABLE t AS SELECT 1",
        "SELECT * FROM read_parquet('/etc/passwd')",
    ] {
        let (status, _) = call(
            &u,
            "POST",
            "/v1/sql",
            Some(analyst),
            &json!({"sql": q}).to_string(),
        )
        .await;
        assert_eq!(status, 400, "{q}");
    }
    // Oversized and malformed bodies.
    let big = "x".repeat(10_000);
    let (status, _) = call(&u, "POST", "/v1/events", Some(ingest_t), &big).await;
    assert_eq!(status, 413);
    let (status, _) = call(&u, "POST", "/v1/sql", Some(analyst), "{not json").await;
    assert_eq!(status, 400);
    let (status, _) = call(
        &u,
        "POST",
        "/v1/users/abc/forget",
        Some(admin),
        "{\"mode\":\"erase\"}",
    )
    .await;
    assert_eq!(status, 400);
    let (status, _) = call(
        &u,
        "POST",
        "/v1/users/5/forget",
        Some(admin),
        "{\"mode\":\"shred\"}",
    )
    .await;
    assert_eq!(status, 400);
    // The dashboard page is static: served without a token, and it holds no data.
    let r = reqwest::get(format!("{u}/")).await.unwrap();
    assert_eq!(r.status().as_u16(), 200);
    assert!(r.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/html"));
    let page = r.text().await.unwrap();
    assert!(page.contains("/v1/creators/") && page.contains("dashboard"));
    // Health is readable by every role; the probes need no token.
    let (status, _) = call(&u, "GET", "/v1/health", Some(creator), "").await;
    assert_eq!(status, 200);
    for probe in ["/v1/health/live", "/v1/health/ready"] {
        assert_eq!(call(&u, "GET", probe, None, "").await.0, 200, "{probe}");
    }
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn non_loopback_needs_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let ingest = EngineConfig::new(dir.path(), Arc::new(SystemClock));
    let config = ServerConfig::new(ingest, "0.0.0.0:0".parse::<SocketAddr>().unwrap());
    assert!(matches!(
        reelhouse_server::start(config).await,
        Err(reelhouse_server::StartError::NotLoopback(_))
    ));
}
