//! SQL over the Postgres wire protocol with a stock client (`psql`): the README's example
//! queries give the same rows as `POST /v1/sql`; writes, unknown tokens and roles that may
//! not run SQL are refused with Postgres error codes.

use std::net::SocketAddr;
use std::process::Command;
use std::sync::Arc;

use reelhouse_engine::EngineConfig;
use reelhouse_event::SystemClock;
use reelhouse_server::ServerConfig;
use reelhouse_workload::{generate, WorkloadConfig};
use serde_json::{json, Value};

use crate::common::write_tokens;

/// The lines of the README's `pg-examples` SQL block.
fn readme_queries() -> Vec<String> {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../README.md"))
        .expect("README.md");
    let block = readme
        .split("<!-- pg-examples")
        .nth(1)
        .and_then(|s| s.split("```sql\n").nth(1))
        .and_then(|s| s.split("```").next())
        .expect("README has a pg-examples SQL block");
    block
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(|l| l.trim_end_matches(';').to_string())
        .collect()
}

struct Psql {
    port: u16,
}

impl Psql {
    /// Runs one statement; returns (success, stdout, stderr).
    fn run(&self, password: &str, sql: &str) -> (bool, String, String) {
        let out = Command::new("psql")
            .args(["-X", "-A", "-t", "-F", "\u{1f}", "-v", "ON_ERROR_STOP=1"])
            .args(["-v", "VERBOSITY=verbose", "-h", "127.0.0.1", "-U", "bi"])
            .args(["-d", "reelhouse", "-p", &self.port.to_string(), "-c", sql])
            .env("PGPASSWORD", password)
            .env("PGCONNECT_TIMEOUT", "10")
            .output()
            .expect("psql runs (scripts/test.sh installs postgresql-client when missing)");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }
}

/// Does a psql text cell equal the JSON cell of `/v1/sql`?
fn same_cell(pg: &str, json: &Value) -> bool {
    match json {
        Value::Null => pg.is_empty(),
        Value::Bool(b) => pg == if *b { "t" } else { "f" },
        // serde_json's default float parser may land one ULP away from Rust's.
        Value::Number(n) => match (pg.parse::<f64>(), n.as_f64()) {
            (Ok(a), Some(b)) => a == b || (a - b).abs() <= 1e-14 * a.abs().max(b.abs()),
            _ => false,
        },
        Value::String(s) => {
            if let Ok(t) = chrono::DateTime::parse_from_rfc3339(s) {
                // psql prints timestamptz as `2026-11-22 13:44:51.651+00`.
                chrono::DateTime::parse_from_str(&format!("{pg}00"), "%Y-%m-%d %H:%M:%S%.f%z")
                    .is_ok_and(|p| p == t)
            } else {
                pg == s
            }
        }
        other => *pg == *other.to_string(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psql_gets_the_same_rows_as_http_and_writes_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let tokens = write_tokens(
        dir.path(),
        &[
            ("pg-admin", "admin"),
            ("pg-analyst", "analyst"),
            ("pg-ingest", "ingest"),
            ("pg-creator", "creator:1"),
        ],
    );
    let mut ingest = EngineConfig::new(dir.path().join("data"), Arc::new(SystemClock));
    ingest.flush_rows = 5_000;
    let mut config = ServerConfig::new(ingest, "127.0.0.1:0".parse::<SocketAddr>().unwrap());
    config.tokens = tokens;
    config.materialize_interval = None;
    config.pg_listen = Some("127.0.0.1:0".parse().unwrap());
    let server = reelhouse_server::start(config).await.unwrap();
    let u = format!("http://{}", server.addr);
    let psql = Psql {
        port: server.pg_addr.expect("pg listener").port(),
    };
    let http = reqwest::Client::new();

    let now = chrono::Utc::now().timestamp_millis();
    let w = generate(&WorkloadConfig::new(15_000, 91, now));
    crate::common::load_and_materialize(&u, Some("pg-admin"), w.bodies(5_000)).await;

    let queries = readme_queries();
    assert!(queries.len() >= 5, "README examples: {queries:?}");
    for q in &queries {
        let v: Value = http
            .post(format!("{u}/v1/sql"))
            .bearer_auth("pg-analyst")
            .json(&json!({ "sql": q }))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let want: Vec<Vec<Value>> = serde_json::from_value(v["rows"].clone()).expect("rows");
        assert!(!want.is_empty(), "{q}: no rows over HTTP");
        let (ok, out, err) = psql.run("pg-analyst", q);
        assert!(ok, "{q}: psql failed: {err}");
        let got: Vec<Vec<&str>> = out.lines().map(|l| l.split('\u{1f}').collect()).collect();
        assert_eq!(got.len(), want.len(), "{q}: row count");
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert_eq!(g.len(), w.len(), "{q}: columns of row {i}");
            for (pg, js) in g.iter().zip(w) {
                assert!(same_cell(pg, js), "{q}: row {i}: psql {pg:?} vs HTTP {js}");
            }
        }
    }

    // The admin token works too; the count is the stored events.
    let (ok, out, _) = psql.run("pg-admin", "SELECT count(*) FROM events");
    assert!(ok);
    assert_eq!(
        out.trim().parse::<usize>().unwrap(),
        w.manifest.valid_unique
    );

    // What drivers ask on connect (SQLAlchemy, hence Superset) gets an answer.
    let (ok, out, err) = psql.run("pg-analyst", "select pg_catalog.version()");
    assert!(ok && out.contains("reelhouse"), "{err}");
    let (ok, out, err) = psql.run("pg-analyst", "show transaction isolation level");
    assert!(ok && out.trim() == "read committed", "{err}");
    let (ok, out, _) = psql.run(
        "pg-analyst",
        "SELECT t.oid, typarray FROM pg_type t JOIN pg_namespace ns ON typnamespace = ns.oid \
         WHERE typname = 'hstore'",
    );
    assert!(ok && out.trim().is_empty());

    // Writes and DDL: SQLSTATE 25006, and nothing changed.
    for q in [
        "DELETE FROM events",
        "INSERT INTO events (event_id) VALUES ('x')",
        "CREATE TABLE t AS SELECT 1",
        "COPY events TO '/tmp/out.csv'",
    ] {
        let (ok, _, err) = psql.run("pg-analyst", q);
        assert!(!ok && err.contains("25006"), "{q}: {err}");
    }
    let (_, out, _) = psql.run("pg-analyst", "SELECT count(*) FROM events");
    assert_eq!(
        out.trim().parse::<usize>().unwrap(),
        w.manifest.valid_unique
    );
    // Bad SQL: a syntax error code, not a crash.
    let (ok, _, err) = psql.run("pg-analyst", "SELEC 1");
    assert!(!ok && err.contains("42601"), "{err}");
    // Unknown token, and roles that may not run SQL (psql prints no SQLSTATE for errors at
    // connection time, so the messages are checked).
    let (ok, _, err) = psql.run("wrong", "SELECT 1");
    assert!(
        !ok && err.contains("password authentication failed"),
        "{err}"
    );
    for t in ["pg-ingest", "pg-creator"] {
        let (ok, _, err) = psql.run(t, "SELECT 1");
        assert!(!ok && err.contains("may not run SQL"), "{t}: {err}");
    }
    server.shutdown().await.unwrap();
}
