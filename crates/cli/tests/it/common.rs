//! Helpers shared by the end-to-end tests.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use reelhouse_engine::EngineConfig;
use reelhouse_event::SystemClock;
use reelhouse_server::{RunningServer, ServerConfig};
use serde_json::Value;

/// Starts an in-process server on an ephemeral loopback port.
pub async fn start(dir: &Path, flush_rows: usize) -> RunningServer {
    let mut ingest = EngineConfig::new(dir, Arc::new(SystemClock));
    ingest.flush_rows = flush_rows;
    ingest.flush_interval = Duration::from_millis(500);
    let mut config = ServerConfig::new(ingest, "127.0.0.1:0".parse::<SocketAddr>().unwrap());
    config.max_body_bytes = 1 << 20;
    reelhouse_server::start(config)
        .await
        .expect("server starts")
}

/// Starts an in-process server whose clock stands still at `now` (no background rebuilds).
pub async fn start_at(dir: &Path, now: i64) -> RunningServer {
    start_at_with(dir, now, 0).await
}

/// [`start_at`] whose full rebuilds of more than `bucket_events` events run in user buckets
/// (0: the default size).
pub async fn start_at_with(dir: &Path, now: i64, bucket_events: usize) -> RunningServer {
    let mut ingest = EngineConfig::new(dir, Arc::new(reelhouse_event::FixedClock(now)));
    ingest.flush_rows = 4_000;
    ingest.rebuild_bucket_events = bucket_events;
    let mut config = ServerConfig::new(ingest, "127.0.0.1:0".parse::<SocketAddr>().unwrap());
    config.materialize_interval = None;
    reelhouse_server::start(config)
        .await
        .expect("server starts")
}

pub fn url(s: &RunningServer) -> String {
    format!("http://{}", s.addr)
}

/// POSTs a body; returns (status, JSON body).
pub async fn post(
    url: &str,
    path: &str,
    body: impl Into<reqwest::Body>,
    ctype: &str,
) -> (u16, Value) {
    let resp = reqwest::Client::new()
        .post(format!("{url}{path}"))
        .header("content-type", ctype)
        .body(body)
        .send()
        .await
        .expect("request sent");
    let status = resp.status().as_u16();
    let text = resp.text().await.unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

/// Runs SQL over HTTP: (status, JSON answer).
pub async fn post_sql(url: &str, q: &str) -> (u16, Value) {
    post(
        url,
        "/v1/sql",
        serde_json::json!({ "sql": q }).to_string(),
        "application/json",
    )
    .await
}

/// Runs SQL over HTTP and returns the rows.
pub async fn sql(url: &str, q: &str) -> Vec<Vec<Value>> {
    let (status, v) = post_sql(url, q).await;
    assert_eq!(status, 200, "{q}: {v}");
    serde_json::from_value(v["rows"].clone()).unwrap()
}

/// The event ids in `events`, asserting that each is stored exactly once.
pub async fn stored_once(url: &str) -> std::collections::HashSet<String> {
    let rows = sql(
        url,
        "SELECT event_id, count(*) FROM events GROUP BY event_id",
    )
    .await;
    let mut stored = std::collections::HashSet::new();
    for r in &rows {
        assert_eq!(r[1].as_i64(), Some(1), "an event stored more than once");
        stored.insert(r[0].as_str().unwrap().to_string());
    }
    stored
}

/// A single integer from a one-cell query.
pub async fn scalar(url: &str, q: &str) -> i64 {
    sql(url, q).await[0][0].as_i64().expect("integer cell")
}

/// GETs a path; returns (status, JSON body or null).
pub async fn get(url: &str, path: &str) -> (u16, Value) {
    let r = reqwest::get(format!("{url}{path}")).await.unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

/// A free loopback port.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Where [`spawn_serve`] appends the server's stderr for `port` (outside the data directory,
/// which some tests scan for traces of a user).
fn serve_log(port: u16) -> std::path::PathBuf {
    std::env::temp_dir().join(format!("reelhouse-it-serve-{port}.log"))
}

/// Starts the real binary (`reelhouse serve`) on `port` with extra flags; its stderr is
/// appended to [`serve_log`], which [`wait_healthy`] prints when the server does not come up.
pub fn spawn_serve(dir: &Path, port: u16, extra: &[&str]) -> std::process::Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(serve_log(port))
        .expect("open the server's log");
    std::process::Command::new(env!("CARGO_BIN_EXE_reelhouse"))
        .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
        .args(extra)
        .arg("--data-dir")
        .arg(dir)
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .spawn()
        .expect("spawn reelhouse serve")
}

/// Waits (at most a minute) until `/v1/health` answers; panics with the end of the server's
/// log (see [`spawn_serve`]) when it does not.
pub async fn wait_healthy(url: &str) {
    for _ in 0..600 {
        if let Ok(r) = reqwest::get(format!("{url}/v1/health")).await {
            if r.status().is_success() {
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let log = url
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .and_then(|port| std::fs::read_to_string(serve_log(port)).ok())
        .unwrap_or_default();
    let lines: Vec<&str> = log.lines().collect();
    let tail = &lines[lines.len().saturating_sub(40)..];
    panic!(
        "server at {url} did not become healthy; its log ends with:\n{}",
        tail.join("\n")
    );
}

/// Writes a tokens file under `dir` with `(token, role)` pairs and loads it.
pub fn write_tokens(dir: &Path, roles: &[(&str, &str)]) -> Arc<reelhouse_server::auth::Tokens> {
    use reelhouse_server::auth::{hash_token, TokenEntry, TokenFile, Tokens};
    let file = TokenFile {
        tokens: roles
            .iter()
            .map(|(t, r)| TokenEntry {
                name: r.to_string(),
                sha256: hash_token(t),
                role: r.to_string(),
            })
            .collect(),
    };
    let path = dir.join("tokens.json");
    std::fs::write(&path, serde_json::to_vec(&file).unwrap()).unwrap();
    Arc::new(Tokens::load(&path).unwrap())
}

/// POSTs every body as NDJSON events and then a materialization, with `token` when given;
/// each must answer 200.
pub async fn load_and_materialize(u: &str, token: Option<&str>, bodies: Vec<Vec<u8>>) {
    let http = reqwest::Client::new();
    let auth = |r: reqwest::RequestBuilder| match token {
        Some(t) => r.bearer_auth(t),
        None => r,
    };
    for body in bodies {
        let r = auth(http.post(format!("{u}/v1/events")))
            .header("content-type", "application/x-ndjson")
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    let r = auth(http.post(format!("{u}/v1/admin/materialize")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}
