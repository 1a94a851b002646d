//! `reelhouse bench scaleout`: the same events sent to one embedded node (local WAL), then
//! through NATS JetStream to 1 and to 2 ingest processes (each run with its own materializer
//! and two API replicas, all processes of this binary on this machine): ingest rate and ack
//! latency, how long the materializer takes to have everything in Delta, end-to-end
//! freshness (ack by an ingest node → the view visible in a replica's features) and feature
//! lookup latency, for a replica with its own in-process store and one reading Redis (which
//! the materializer fills, `--online redis://`).
//!
//! ```text
//!  clients ─▶ ingest node ×n ─append─▶ nats-server (JetStream, file storage)
//!                                          ├─▶ materializer ─▶ Delta (drain time)
//!                                          │        └─ changed records ─▶ redis-server
//!                                          ├─▶ replica (own store) ─▶ GET /v1/features
//!                                          └─▶ replica (--online) ─▶ GET/MGET redis
//! ```
//!
//! Every process shares the machine's cores with the clients and nats-server, so on a small
//! machine a second ingest process adds parallel parsing but competes for the same cores.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use reelhouse_server::ServerConfig;
use reelhouse_workload::WorkloadConfig;
use serde_json::{json, Value};

use super::common::{request_bodies, warn_if_debug, write_result};
use super::serve::{summary, time_lookups, LookupPlan};
use crate::send::{percentile, send_all, send_all_to};
use crate::DataArgs;

#[derive(Args)]
pub struct ScaleoutBench {
    /// Events to send in each configuration.
    #[arg(long, default_value_t = 1_000_000)]
    events: usize,
    /// Concurrent HTTP clients (spread over the ingest nodes).
    #[arg(long, default_value_t = 4)]
    clients: usize,
    /// Events per request.
    #[arg(long, default_value_t = 5_000)]
    batch: usize,
    /// Freshness probes (one new view each) per configuration.
    #[arg(long, default_value_t = 200)]
    probes: usize,
    #[arg(long, default_value_t = 7)]
    seed: u64,
    /// Where to write the JSON result.
    #[arg(long, default_value = "bench/results/scaleout.json")]
    out: PathBuf,
    /// Keep each process's log (RUST_LOG=reelhouse_engine=debug) in this directory, and
    /// print the probes slower than 50 ms with their time, to line them up.
    #[arg(long)]
    logs: Option<PathBuf>,
}

/// Child processes, killed when dropped (the bench stops by itself, whatever fails).
struct Procs(Vec<Child>);

impl Drop for Procs {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn nats_binary() -> Result<&'static str> {
    ["/usr/sbin/nats-server", "/usr/bin/nats-server"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .context("nats-server not found: install the Debian package nats-server")
}

/// Starts `reelhouse serve ARGS` on `port`; its log goes to `logs/<name>.log` when asked.
fn spawn_node(args: &[String], port: u16, logs: Option<(&Path, &str)>) -> Result<Child> {
    let mut c = Command::new(std::env::current_exe()?);
    c.arg("serve")
        .args(args)
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    if let Some((dir, name)) = logs {
        std::fs::create_dir_all(dir)?;
        c.env(
            "RUST_LOG",
            "info,reelhouse_engine=debug,reelhouse_server=debug",
        )
        .stderr(std::fs::File::create(dir.join(format!("{name}.log")))?);
    }
    Ok(c.spawn()?)
}

async fn wait_healthy(http: &reqwest::Client, url: &str) -> Result<()> {
    for _ in 0..600 {
        if let Ok(r) = http.get(format!("{url}/v1/health")).send().await {
            if r.status().is_success() {
                return Ok(());
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!("{url} did not become healthy")
}

async fn count_events(http: &reqwest::Client, url: &str) -> Option<u64> {
    let r = http
        .post(format!("{url}/v1/sql"))
        .json(&json!({"sql": "SELECT count(*) FROM events"}))
        .send()
        .await
        .ok()?;
    let v: Value = r.json().await.ok()?;
    v["rows"][0][0].as_u64()
}

/// Every video id in `events` (the lookup benchmark's keys).
async fn video_ids(http: &reqwest::Client, url: &str) -> Result<Vec<i64>> {
    let v: Value = http
        .post(format!("{url}/v1/sql"))
        .json(&json!({"sql": "SELECT DISTINCT video_id FROM events WHERE video_id IS NOT NULL ORDER BY 1"}))
        .send()
        .await?
        .json()
        .await?;
    let ids: Vec<i64> = v["rows"]
        .as_array()
        .map(|rows| rows.iter().filter_map(|r| r[0].as_i64()).collect())
        .unwrap_or_default();
    if ids.is_empty() {
        bail!("no video ids to look up");
    }
    Ok(ids)
}

/// One new view per probe, sent to an ingest node; the time from its `200` until the replica
/// counts it, in microseconds, sorted.
async fn freshness(
    http: &reqwest::Client,
    ingest: &[String],
    replica: &str,
    probes: usize,
    base_id: u64,
) -> Result<Vec<u64>> {
    let mut lat = Vec::with_capacity(probes);
    for i in 0..probes {
        let video = base_id + i as u64;
        let now = chrono::Utc::now().timestamp_millis();
        let e = json!({
            "event_id": format!("probe-{video}"), "event_type": "video_view_start",
            "event_time": now, "user_id": 42, "session_id": format!("probe-s-{video}"),
            "video_id": video, "creator_id": 7, "view_id": format!("probe-v-{video}"),
        });
        let r = http
            .post(format!("{}/v1/events", ingest[i % ingest.len()]))
            .header("content-type", "application/x-ndjson")
            .body(e.to_string())
            .send()
            .await?;
        if !r.status().is_success() {
            bail!("probe refused: {}", r.status());
        }
        let t = Instant::now();
        loop {
            let f: Value = http
                .get(format!("{replica}/v1/features/videos/{video}"))
                .send()
                .await?
                .json()
                .await?;
            if f["views_total"].as_u64() == Some(1) {
                break;
            }
            if t.elapsed() > Duration::from_secs(30) {
                bail!("probe {i} not visible after 30 s");
            }
            tokio::time::sleep(Duration::from_micros(200)).await;
        }
        let took = t.elapsed();
        if took > Duration::from_millis(50) {
            eprintln!(
                "  slow probe {i} to {replica}: {:.1} ms, acked at {}",
                took.as_secs_f64() * 1000.0,
                chrono::Utc::now() - chrono::Duration::from_std(took).unwrap_or_default()
            );
        }
        lat.push(took.as_micros() as u64);
    }
    lat.sort_unstable();
    Ok(lat)
}

/// A redis-server on a free loopback port without persistence.
async fn start_redis() -> Result<(Procs, String)> {
    let port = free_port()?;
    let child = Command::new("redis-server")
        .args(["--bind", "127.0.0.1", "--port", &port.to_string()])
        .args(["--save", "", "--appendonly", "no"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("redis-server not found: install the Debian package redis-server")?;
    let procs = Procs(vec![child]);
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if Instant::now() > deadline {
            bail!("redis-server did not start");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok((procs, format!("redis://127.0.0.1:{port}")))
}

pub async fn scaleout(b: ScaleoutBench) -> Result<()> {
    warn_if_debug();
    let nats_bin = nats_binary()?;
    let dir = tempfile::Builder::new()
        .prefix("reelhouse-bench-")
        .tempdir()?;
    let cfg = WorkloadConfig::new(b.events, b.seed, chrono::Utc::now().timestamp_millis());
    let w = reelhouse_workload::generate(&cfg);
    let bodies = request_bodies(&w, b.batch);
    let m = w.manifest.clone();
    drop(w);
    let http = reqwest::Client::new();
    let mut runs = Vec::new();

    // Baseline: one embedded node, local WAL, same events.
    {
        let data = DataArgs::defaults(dir.path().join("embedded"));
        let server = reelhouse_server::start(ServerConfig::new(
            data.engine_config(),
            "127.0.0.1:0".parse()?,
        ))
        .await?;
        let url = format!("http://{}", server.addr);
        let r = send_all(&url, bodies.clone(), b.clients, Arc::new(|_| {})).await?;
        let eps = m.lines as f64 / r.elapsed.as_secs_f64();
        let fresh = freshness(
            &http,
            std::slice::from_ref(&url),
            &url,
            b.probes,
            8_000_000_000,
        )
        .await?;
        println!(
            "embedded node (local WAL): {:.0} events/s, ack p50 {:.1} ms p99 {:.1} ms; freshness p50 {:.3} ms p99 {:.3} ms",
            eps,
            percentile(&r.latencies_us, 50.0) as f64 / 1000.0,
            percentile(&r.latencies_us, 99.0) as f64 / 1000.0,
            percentile(&fresh, 50.0) as f64 / 1000.0,
            percentile(&fresh, 99.0) as f64 / 1000.0,
        );
        runs.push(json!({
            "config": "embedded", "ingest_processes": 1, "events_per_s": eps,
            "ack_ms": summary(r.latencies_us.clone()), "freshness_ms": summary(fresh.clone()),
        }));
        server.shutdown().await?;
    }

    let nats_port = free_port()?;
    let nats_dir = dir.path().join("nats");
    std::fs::create_dir_all(&nats_dir)?;
    let _nats = Procs(vec![Command::new(nats_bin)
        .args([
            "-js",
            "-a",
            "127.0.0.1",
            "-p",
            &nats_port.to_string(),
            "-sd",
        ])
        .arg(&nats_dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?]);
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", nats_port)).is_err() {
        if Instant::now() > deadline {
            bail!("nats-server did not start");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let (_redis, redis_url) = start_redis().await?;
    for n in [1usize, 2] {
        let log = format!("nats://127.0.0.1:{nats_port}/bench{n}");
        // Each run its own key space in the one redis-server.
        let online = format!("{redis_url}/{n}");
        let data = dir.path().join(format!("shared{n}"));
        let data_args = |role: &str| -> Vec<String> {
            vec![
                "--role".into(),
                role.into(),
                "--log".into(),
                log.clone(),
                "--data-dir".into(),
                data.display().to_string(),
            ]
        };
        let with_online = |mut a: Vec<String>| {
            a.extend(["--online".to_string(), online.clone()]);
            a
        };
        let (mp, rp, op) = (free_port()?, free_port()?, free_port()?);
        let logs = |name: &str| b.logs.as_deref().map(|d| (d, format!("{name}{n}")));
        let spawn = |args: &[String], port: u16, name: &str| {
            let l = logs(name);
            spawn_node(args, port, l.as_ref().map(|(d, n)| (*d, n.as_str())))
        };
        let mut procs = Procs(vec![spawn(
            &with_online(data_args("materialize")),
            mp,
            "materializer",
        )?]);
        let materializer = format!("http://127.0.0.1:{mp}");
        wait_healthy(&http, &materializer).await?;
        procs.0.push(spawn(&data_args("serve"), rp, "replica")?);
        let replica = format!("http://127.0.0.1:{rp}");
        procs.0.push(spawn(
            &with_online(data_args("serve")),
            op,
            "redis-replica",
        )?);
        let redis_replica = format!("http://127.0.0.1:{op}");
        let mut ingest = Vec::new();
        for _ in 0..n {
            let p = free_port()?;
            let args = vec![
                "--role".into(),
                "ingest".into(),
                "--log".into(),
                log.clone(),
            ];
            procs
                .0
                .push(spawn(&args, p, &format!("ingest{}-", ingest.len()))?);
            ingest.push(format!("http://127.0.0.1:{p}"));
        }
        for u in ingest.iter().chain([&replica, &redis_replica]) {
            wait_healthy(&http, u).await?;
        }
        let r = send_all_to(&ingest, bodies.clone(), b.clients, Arc::new(|_| {})).await?;
        let sent_s = r.elapsed.as_secs_f64();
        let eps = m.lines as f64 / sent_s;
        // Until the materializer's SQL (Delta ∪ pending) has every event, then its commit.
        let t = Instant::now();
        loop {
            if count_events(&http, &materializer).await == Some(m.valid_unique as u64) {
                break;
            }
            if t.elapsed() > Duration::from_secs(600) {
                bail!("the materializer did not catch up within 10 minutes");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let drain_s = t.elapsed().as_secs_f64();
        let video_ids = video_ids(&http, &materializer).await?;
        let fresh = freshness(&http, &ingest, &replica, b.probes, 9_000_000_000).await?;
        let fresh_redis =
            freshness(&http, &ingest, &redis_replica, b.probes, 9_500_000_000).await?;
        println!(
            "{n} ingest process(es) through JetStream: {:.0} events/s, ack p50 {:.1} ms p99 {:.1} ms; materializer caught up {:.2} s after the last ack; freshness (ack → replica features) p50 {:.3} ms p99 {:.3} ms, through Redis p50 {:.3} ms p99 {:.3} ms",
            eps,
            percentile(&r.latencies_us, 50.0) as f64 / 1000.0,
            percentile(&r.latencies_us, 99.0) as f64 / 1000.0,
            drain_s,
            percentile(&fresh, 50.0) as f64 / 1000.0,
            percentile(&fresh, 99.0) as f64 / 1000.0,
            percentile(&fresh_redis, 50.0) as f64 / 1000.0,
            percentile(&fresh_redis, 99.0) as f64 / 1000.0,
        );
        // Lookups on the idle replicas, the same random ids on both (as `bench serve` times
        // them: 2,000 single, 100 batches of 500 in JSON and 100 in MessagePack).
        let plan = LookupPlan {
            lookups: 2_000,
            batches: 100,
            batch_size: 500,
        };
        let mut lookup = serde_json::Map::new();
        for (name, url) in [("in_process", &replica), ("redis", &redis_replica)] {
            let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(b.seed);
            let (one, json_batch, msgpack_batch) =
                time_lookups(&http, url, &video_ids, &plan, &mut rng).await?;
            println!(
                "  lookups on the {name} replica: single p50 {} ms p99 {} ms; batch-500 p50 {} ms p99 {} ms (MessagePack p50 {} ms p99 {} ms)",
                one["p50_ms"], one["p99_ms"], json_batch["p50_ms"], json_batch["p99_ms"],
                msgpack_batch["p50_ms"], msgpack_batch["p99_ms"],
            );
            lookup.insert(
                name.into(),
                json!({"single": one, "batch500_json": json_batch,
                       "batch500_msgpack": msgpack_batch}),
            );
        }
        runs.push(json!({
            "config": "jetstream", "ingest_processes": n, "events_per_s": eps,
            "ack_ms": summary(r.latencies_us.clone()), "materializer_catch_up_s": drain_s,
            "freshness_ms": summary(fresh.clone()), "freshness_through_redis_ms": summary(fresh_redis.clone()),
            "lookups": lookup, "accepted": r.accepted,
            "duplicates": r.duplicates, "rejected": r.rejected,
        }));
        drop(procs);
    }
    write_result(
        &b.out,
        json!({
            "benchmark": "scaleout",
            "events": m.lines,
            "valid_unique": m.valid_unique,
            "clients": b.clients,
            "events_per_request": b.batch,
            "probes": b.probes,
            "nats_server": Command::new(nats_bin).arg("--version").output().ok()
                .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string()),
            "runs": runs,
        }),
    )
}
