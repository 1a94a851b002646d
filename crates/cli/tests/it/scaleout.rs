//! Scale-out on a shared log: a real `nats-server` (JetStream), a real `redis-server` and an
//! S3 server on loopback and five processes of the real binary (2 ingest nodes, 1 materializer copying
//! features to Redis, 1 API replica answering features from Redis, 1 API replica with its own
//! store). One ingest node and the materializer are SIGKILLed mid-stream and restarted;
//! afterwards every acknowledged event is in `events` exactly once, `agg_creator_daily`
//! equals a single node's for the same input, the features from Redis and from the replica's
//! own store equal the single node's in-process ones, and an erasure truncates the log and
//! deletes the user's Redis key.
//!
//! The tables live on an S3-compatible store (moto's server); every process has a local state
//! directory of its own, as on separate machines. `scripts/test.sh` installs `nats-server` and
//! `redis-server` (Debian packages) and `moto[server]` (PyPI) when missing.

use std::collections::HashSet;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use reelhouse_workload::{generate, WorkloadConfig};
use serde_json::Value;

use reelhouse_lake::deltalake::logstore::object_store;
use reelhouse_lake::store::testing::Moto;

use crate::common::{self, free_port, get, post, sql, wait_healthy};

/// A nats-server with JetStream on a free loopback port; killed on drop.
struct Nats {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Drop for Nats {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits until something accepts connections on the loopback `port` (at most 20 s).
fn wait_for_port(port: u16, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "{what} did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn start_nats() -> Nats {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    // Debian installs it in /usr/sbin, which a non-login PATH may lack.
    let bin = ["/usr/sbin/nats-server", "/usr/bin/nats-server"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .unwrap_or("nats-server");
    let child = Command::new(bin)
        .args(["-js", "-a", "127.0.0.1", "-p", &port.to_string(), "-sd"])
        .arg(dir.path())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("nats-server is missing: run scripts/test.sh, which installs it");
    wait_for_port(port, "nats-server");
    Nats {
        child,
        port,
        _dir: dir,
    }
}

/// A redis-server on a free loopback port, without persistence; killed on drop.
struct Redis {
    child: Child,
    port: u16,
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_redis() -> Redis {
    let port = free_port();
    let child = Command::new("redis-server")
        .args(["--bind", "127.0.0.1", "--port", &port.to_string()])
        .args(["--save", "", "--appendonly", "no"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("redis-server is missing: run scripts/test.sh, which installs it");
    wait_for_port(port, "redis-server");
    Redis { child, port }
}

const BUCKET: &str = "reelhouse-it";

/// Reads the test bucket from the test process (explicit settings: it has no AWS_* env).
struct S3(Moto);

impl S3 {
    /// A client of the test bucket (explicit settings: the test process has no AWS_* env).
    fn client(&self) -> impl object_store::ObjectStore {
        object_store::aws::AmazonS3Builder::new()
            .with_endpoint(&self.0.endpoint)
            .with_allow_http(true)
            .with_bucket_name(BUCKET)
            .with_region("us-east-1")
            .with_access_key_id("test")
            .with_secret_access_key("test")
            .build()
            .unwrap()
    }

    /// The keys under `prefix`.
    async fn keys(&self, prefix: &str) -> Vec<String> {
        use futures::TryStreamExt;
        use object_store::ObjectStore;
        self.client()
            .list(Some(&object_store::path::Path::from(prefix)))
            .map_ok(|m| m.location.to_string())
            .try_collect()
            .await
            .unwrap()
    }

    /// User ids of every row of a Parquet object.
    async fn parquet_users(&self, key: &str) -> Vec<i64> {
        use object_store::ObjectStoreExt;
        use reelhouse_lake::deltalake::arrow::array::AsArray;
        use reelhouse_lake::deltalake::arrow::datatypes::Int64Type;
        use reelhouse_lake::deltalake::parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
        let bytes = self
            .client()
            .get(&object_store::path::Path::from(key))
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap();
        let reader = ParquetRecordBatchReaderBuilder::try_new(bytes)
            .unwrap()
            .build()
            .unwrap();
        let mut users = Vec::new();
        for b in reader {
            let b = b.unwrap();
            let col = b.column_by_name("user_id").expect("user_id column");
            users.extend(col.as_primitive::<Int64Type>().iter().flatten());
        }
        users
    }
}

/// One process of the deployment; SIGKILLed on drop if still running.
struct Node {
    child: Child,
    url: String,
    port: u16,
    args: Vec<String>,
    env: Vec<(&'static str, String)>,
}

impl Node {
    fn spawn(port: u16, args: Vec<String>, env: &[(&'static str, String)]) -> Node {
        let child = Command::new(env!("CARGO_BIN_EXE_reelhouse"))
            .arg("serve")
            .args(&args)
            .envs(env.iter().map(|(k, v)| (k, v.as_str())))
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn reelhouse serve");
        Node {
            child,
            url: format!("http://127.0.0.1:{port}"),
            port,
            args,
            env: env.to_vec(),
        }
    }

    fn kill(&mut self) {
        self.child.kill().expect("SIGKILL");
        self.child.wait().unwrap();
    }

    fn restart(&mut self) {
        *self = Node::spawn(self.port, self.args.clone(), &self.env.clone());
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `--data-dir` on the S3 bucket, with a state directory of the process's own (as on
/// machines of their own).
fn role_args(role: &str, log: &str, tables: Option<(&str, &Path)>) -> Vec<String> {
    let mut a: Vec<String> = ["--role", role, "--log", log]
        .iter()
        .map(|s| s.to_string())
        .collect();
    if let Some((url, state)) = tables {
        a.extend(["--data-dir".into(), url.to_string()]);
        a.extend(["--state-dir".into(), state.display().to_string()]);
        // Small flushes and snapshots, so the kill lands between Delta commits and acks.
        for f in [
            "--flush-rows=3000",
            "--flush-interval-ms=300",
            "--snapshot-interval-ms=300",
        ] {
            a.push(f.into());
        }
    }
    a
}

/// The ids of the valid items of an acknowledged body (every line but the rejected ones).
fn valid_ids(body: &[u8], answer: &Value) -> Vec<String> {
    let rejected: HashSet<u64> = answer["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["index"].as_u64().unwrap())
        .collect();
    assert_eq!(
        rejected.len() as u64,
        answer["rejected"].as_u64().unwrap(),
        "every rejection is listed"
    );
    body.split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
        .enumerate()
        .filter(|(i, _)| !rejected.contains(&(*i as u64)))
        .map(|(_, l)| {
            serde_json::from_slice::<Value>(l).unwrap()["event_id"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect()
}

/// Polls `f` every 200 ms for at most `secs` seconds until it returns true.
async fn eventually<F, Fut>(secs: u64, what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !f().await {
        assert!(Instant::now() < deadline, "timed out waiting: {what}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The value of a gauge in a node's `/metrics` (`None` when it is missing).
async fn gauge(url: &str, name: &str) -> Option<u64> {
    let text = reqwest::get(format!("{url}/metrics"))
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .and_then(|v| v.trim().parse().ok())
}

/// A one-cell integer answer, or `None` while the query fails (e.g. no table yet).
async fn count(url: &str, q: &str) -> Option<i64> {
    let (status, v) = common::post_sql(url, q).await;
    (status == 200).then(|| v["rows"][0][0].as_i64()).flatten()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_ingest_nodes_one_materializer_two_replicas_survive_sigkill() {
    let nats = start_nats();
    let log = format!("nats://127.0.0.1:{}/scaleout", nats.port);
    let redis = start_redis();
    let online = format!("redis://127.0.0.1:{}", redis.port);
    let with_redis = |mut a: Vec<String>| {
        a.extend(["--online".to_string(), online.clone()]);
        a
    };
    let s3 = S3(Moto::start(BUCKET));
    // Every process gets the usual AWS_* variables, pointed at the loopback server.
    let env = s3.0.env();
    let tables = format!("s3://{BUCKET}/scaleout");
    let dir = tempfile::tempdir().unwrap();
    let state = |name: &str| dir.path().join(name);

    let mut materializer = Node::spawn(
        free_port(),
        with_redis(role_args(
            "materialize",
            &log,
            Some((&tables, &state("materializer"))),
        )),
        &env,
    );
    wait_healthy(&materializer.url).await;
    let replica = Node::spawn(
        free_port(),
        with_redis(role_args("serve", &log, Some((&tables, &state("replica"))))),
        &env,
    );
    let local_replica = Node::spawn(
        free_port(),
        role_args("serve", &log, Some((&tables, &state("local-replica")))),
        &env,
    );
    let mut ingest1 = Node::spawn(free_port(), role_args("ingest", &log, None), &env);
    let ingest2 = Node::spawn(free_port(), role_args("ingest", &log, None), &env);
    for n in [&replica, &local_replica, &ingest1, &ingest2] {
        wait_healthy(&n.url).await;
    }
    let (_, h) = get(&replica.url, "/v1/health").await;
    assert_eq!(
        h["online_store"],
        format!("redis://127.0.0.1:{}/0", redis.port)
    );
    // A second materializer on the same tables (another state directory: another machine)
    // is refused while the first holds the writer lease.
    let second = Command::new(env!("CARGO_BIN_EXE_reelhouse"))
        .arg("serve")
        .args(role_args(
            "materialize",
            &log,
            Some((&tables, &state("second-materializer"))),
        ))
        .args(["--listen", &format!("127.0.0.1:{}", free_port())])
        .envs(env.iter().map(|(k, v)| (k, v.as_str())))
        .output()
        .unwrap();
    assert!(!second.status.success());
    let why = String::from_utf8_lossy(&second.stderr);
    assert!(why.contains("written by another process"), "{why}");
    // An ingest node holds no features, so --online is refused there.
    let refused = Command::new(env!("CARGO_BIN_EXE_reelhouse"))
        .args([
            "serve", "--role", "ingest", "--log", &log, "--online", &online,
        ])
        .output()
        .unwrap();
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("ingest nodes hold no features"));
    // Wrong-role requests are told where to go.
    let (status, v) = post(&ingest1.url, "/v1/sql", "{}", "application/json").await;
    assert_eq!(status, 404, "{v}");
    let (status, v) = post(&replica.url, "/v1/events", "{}", "application/x-ndjson").await;
    assert_eq!(status, 421, "{v}");
    assert_eq!(v["error"]["code"], "wrong_role");

    let now = chrono::Utc::now().timestamp_millis();
    let w = generate(&WorkloadConfig::new(30_000, 17, now));
    let bodies = w.bodies(500);
    let mut acked: HashSet<String> = HashSet::new();
    let (mut killed, mut restarted) = (false, false);
    for (i, body) in bodies.iter().enumerate() {
        if i == 20 {
            ingest1.kill();
            materializer.kill();
            killed = true;
        }
        if i == 34 {
            ingest1.restart();
            materializer.restart();
            wait_healthy(&ingest1.url).await;
            restarted = true;
        }
        // Alternate nodes; a client whose node is down (or errs) sends the body to the other.
        let (first, second) = if i % 2 == 0 {
            (&ingest1, &ingest2)
        } else {
            (&ingest2, &ingest1)
        };
        let mut answer = None;
        for node in [first, second] {
            let sent = reqwest::Client::new()
                .post(format!("{}/v1/events", node.url))
                .header("content-type", "application/x-ndjson")
                .body(body.clone())
                .send()
                .await;
            if let Ok(r) = sent {
                if r.status() == 200 {
                    answer = Some(r.json::<Value>().await.unwrap());
                    break;
                }
            }
        }
        let answer = answer.expect("one ingest node answers 200");
        acked.extend(valid_ids(body, &answer));
    }
    assert!(killed && restarted);
    wait_healthy(&materializer.url).await;

    // The materializer catches up from the log and commits everything to Delta.
    let expected = acked.len() as i64;
    eventually(
        120,
        "the materializer commits every acknowledged event",
        || async {
            let (_, h) = get(&materializer.url, "/v1/health").await;
            h["ingest"]["pending_rows"] == 0
                && count(&materializer.url, "SELECT count(*) FROM events").await == Some(expected)
        },
    )
    .await;
    let (status, _) = post(&materializer.url, "/v1/admin/materialize", "", "text/plain").await;
    assert_eq!(status, 200);
    assert!(gauge(&materializer.url, "reelhouse_log_position")
        .await
        .is_some_and(|p| p > 0));
    eventually(10, "the consumer lag reads 0 once caught up", || async {
        gauge(&materializer.url, "reelhouse_log_consumer_lag").await == Some(0)
    })
    .await;

    // The replica sees the committed tables: every acknowledged event exactly once.
    eventually(60, "the replica loads the committed tables", || async {
        count(&replica.url, "SELECT count(*) FROM events").await == Some(expected)
            && count(&replica.url, "SELECT count(*) FROM agg_creator_daily")
                .await
                .is_some_and(|n| n > 0)
    })
    .await;
    let stored = common::stored_once(&replica.url).await;
    assert_eq!(stored, acked, "exactly the acknowledged events are stored");

    // The same input on one embedded node.
    let single_dir = tempfile::tempdir().unwrap();
    let single = common::start(single_dir.path(), 1_000_000).await;
    let single_url = common::url(&single);
    common::load_and_materialize(&single_url, None, bodies.clone()).await;
    let q = "SELECT * FROM agg_creator_daily ORDER BY creator_id, date";
    let (a, b) = (sql(&replica.url, q).await, sql(&single_url, q).await);
    assert_eq!(a.len(), b.len(), "agg_creator_daily row count");
    assert!(!a.is_empty());
    for (ra, rb) in a.iter().zip(&b) {
        for (x, y) in ra.iter().zip(rb) {
            match (x.as_f64(), y.as_f64()) {
                (Some(x), Some(y)) if x.fract() != 0.0 || y.fract() != 0.0 => {
                    assert!((x - y).abs() <= 1e-9 * x.abs().max(1.0), "{ra:?} vs {rb:?}")
                }
                _ => assert_eq!(x, y, "{ra:?} vs {rb:?}"),
            }
        }
    }

    // Features from Redis (copied by the materializer) and from the other replica's own
    // store (fed by the log) equal the single node's in-process ones, every field. Windows
    // slide with the clock, so a pair read across a minute boundary may differ once: each
    // comparison gets three tries.
    let videos = sql(
        &single_url,
        "SELECT video_id, creator_id FROM events WHERE video_id IS NOT NULL \
         GROUP BY video_id, creator_id ORDER BY count(*) DESC LIMIT 25",
    )
    .await;
    let users = sql(
        &single_url,
        "SELECT user_id FROM events GROUP BY user_id ORDER BY count(*) DESC LIMIT 10",
    )
    .await;
    let mut paths: Vec<String> = Vec::new();
    for v in &videos {
        paths.push(format!("/v1/features/videos/{}", v[0].as_i64().unwrap()));
        paths.push(format!("/v1/features/creators/{}", v[1].as_i64().unwrap()));
    }
    for u in &users {
        paths.push(format!("/v1/features/users/{}", u[0].as_i64().unwrap()));
    }
    let mut compared = 0;
    for node in [&replica, &local_replica] {
        for path in &paths {
            let mut same = false;
            for _ in 0..3 {
                let (sa, fa) = get(&node.url, path).await;
                let (_, fb) = get(&single_url, path).await;
                assert_eq!(sa, 200, "{path}: {fa}");
                if fa == fb {
                    same = true;
                    break;
                }
                eprintln!("{path}: {fa} vs {fb}");
            }
            assert!(same, "{} {path} differs from the single node", node.url);
            compared += 1;
        }
        // A batch is one MGET from Redis; order and unknown ids as the single node.
        let mut ids: Vec<i64> = videos.iter().map(|v| v[0].as_i64().unwrap()).collect();
        ids.insert(3, 987_654_321);
        let body = serde_json::json!({ "video_ids": ids }).to_string();
        let path = "/v1/features/videos:batch";
        let mut same = false;
        for _ in 0..3 {
            let (_, fa) = post(&node.url, path, body.clone(), "application/json").await;
            let (_, fb) = post(&single_url, path, body.clone(), "application/json").await;
            if fa == fb && fa.as_array().is_some_and(|a| a.len() == ids.len()) {
                same = true;
                break;
            }
        }
        assert!(same, "{} batch differs from the single node", node.url);
    }
    assert_eq!(compared, 2 * (50 + 10));
    // The Redis replica answered all that without a store of its own.
    let (_, h) = get(&replica.url, "/v1/health").await;
    assert_eq!(h["features"]["videos"], 0, "{h}");
    assert_eq!(h["features"]["users"], 0, "{h}");
    assert!(gauge(
        &materializer.url,
        "reelhouse_online_redis_keys_written_total"
    )
    .await
    .is_some_and(|n| n > 0));

    // Erasure on the materializer: the user leaves the tables, and the log is truncated
    // through everything committed (the user's records with it).
    let user = sql(
        &replica.url,
        "SELECT user_id FROM events GROUP BY user_id ORDER BY count(*) DESC LIMIT 1",
    )
    .await[0][0]
        .as_i64()
        .unwrap();
    let (_, before) = get(&replica.url, &format!("/v1/features/users/{user}")).await;
    assert!(
        !before["last_viewed"].as_array().unwrap().is_empty(),
        "the busiest user had views"
    );
    let (status, v) = post(
        &materializer.url,
        &format!("/v1/users/{user}/forget"),
        r#"{"mode":"erase"}"#,
        "application/json",
    )
    .await;
    assert_eq!(status, 202, "{v}");
    let request = v["request_id"].as_str().unwrap().to_string();
    let deadline = Instant::now() + Duration::from_secs(120);
    let receipt = loop {
        let (_, s) = get(
            &materializer.url,
            &format!("/v1/privacy/requests/{request}"),
        )
        .await;
        if s["status"] == "done" {
            break s;
        }
        assert_ne!(s["status"], "failed", "{s}");
        assert!(Instant::now() < deadline, "the erasure did not finish");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let left = &receipt["receipt"]["online_redis"]["user_key_left"];
    assert_eq!(
        left, false,
        "the receipt says the user's Redis key is gone: {receipt}"
    );
    let store = reelhouse_online::redis::RedisStore::connect(&online)
        .await
        .unwrap();
    let key = reelhouse_online::Key::User(user as u64);
    assert_eq!(
        store.get(key).await.unwrap(),
        None,
        "the user's key is gone"
    );
    let through = receipt["receipt"]["shared_log"]["truncated_through"]
        .as_u64()
        .expect("the receipt names the log truncation");
    let stats = reelhouse_log::open(&log)
        .await
        .unwrap()
        .stats()
        .await
        .unwrap();
    assert!(
        stats.records == 0 || stats.first_position > through,
        "the log still holds records up to {through}: {stats:?}"
    );
    for node in [&replica, &local_replica] {
        eventually(60, "the replicas no longer have the user", || async {
            let (_, f) = get(&node.url, &format!("/v1/features/users/{user}")).await;
            count(
                &node.url,
                &format!("SELECT count(*) FROM events WHERE user_id = {user}"),
            )
            .await
                == Some(0)
                && f["last_viewed"].as_array().is_some_and(|v| v.is_empty())
                && f["sessions_today"] == 0
        })
        .await;
    }
    // The video counts the user contributed to are rewritten in Redis too.
    let video = videos[0][0].as_i64().unwrap();
    let path = format!("/v1/features/videos/{video}");
    let (_, from_redis) = get(&replica.url, &path).await;
    let (_, from_store) = get(&materializer.url, &path).await;
    assert_eq!(from_redis["views_total"], from_store["views_total"]);
    // On the object store, no Parquet file of `events` holds the user any more (old versions
    // included: vacuum removed them), and the shared state went next to the tables.
    let keys = s3.keys("scaleout/events").await;
    let files: Vec<&String> = keys
        .iter()
        .filter(|k| k.ends_with(".parquet") && !k.contains("_delta_log"))
        .collect();
    assert!(!files.is_empty());
    for key in &files {
        let users = s3.parquet_users(key).await;
        assert!(!users.contains(&user), "{key} still holds the erased user");
    }
    let state_keys = s3.keys("scaleout/_state").await;
    for f in ["log.json", "privacy/state.json"] {
        assert!(
            state_keys.contains(&format!("scaleout/_state/{f}")),
            "{f} is not mirrored: {state_keys:?}"
        );
    }
    let remaining = count(&materializer.url, "SELECT count(*) FROM events").await;
    assert!(remaining.is_some_and(|n| n > 0 && n < expected));
    single.shutdown().await.unwrap();
}
