//! `reelhouse bench serve`: feature lookups over loopback HTTP while ingest runs at a steady
//! rate, freshness from ack to visible, memory per video and per user, and redis-server doing
//! the equivalent HGETALL lookups (single, and 500 pipelined) on the same features.
//!
//! ```text
//!  workload ─▶ in-process server (4 clients, durable acks) ─▶ feature store filled
//!  steady ingest task (N events/s) ┐
//!  single GET / batch-500 POST ────┴─▶ latency percentiles; probes: ack → visible
//!  redis-server (loopback, no persistence) ◀─ same features as hashes ─▶ HGETALL percentiles
//!  a separate FeatureStore fed the same events ─▶ RSS growth and per-part estimate
//! ```

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use clap::Args;
use rand::{Rng, SeedableRng};
use reelhouse_server::ServerConfig;
use reelhouse_workload::WorkloadConfig;
use serde_json::{json, Value};

use super::common::{warn_if_debug, write_result};
use crate::send::{percentile, send_all};
use crate::DataArgs;

#[derive(Args, Clone)]
pub struct ServeBench {
    /// Events loaded before measuring.
    #[arg(long, default_value_t = 1_000_000)]
    events: usize,
    /// Single-video lookups to time (each configuration).
    #[arg(long, default_value_t = 20_000)]
    lookups: usize,
    /// Batch requests to time (each configuration).
    #[arg(long, default_value_t = 1_000)]
    batches: usize,
    /// Videos per batch request.
    #[arg(long, default_value_t = 500)]
    batch_size: usize,
    /// Steady ingest rate (events/s) while lookups are timed.
    #[arg(long, default_value_t = 20_000)]
    ingest_rate: u64,
    /// Freshness probes (one event each, then a lookup).
    #[arg(long, default_value_t = 1_000)]
    probes: usize,
    #[arg(long, default_value_t = 7)]
    seed: u64,
    /// Where to write the JSON result.
    #[arg(long, default_value = "bench/results/serve.json")]
    out: PathBuf,
    /// Skip the redis-server comparison.
    #[arg(long)]
    no_redis: bool,
}

fn rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map_or(0, |pages| pages * 4096)
}

pub(crate) fn summary(mut us: Vec<u64>) -> Value {
    us.sort_unstable();
    let ms = |p| percentile(&us, p) as f64 / 1000.0;
    json!({"n": us.len(), "p50_ms": ms(50.0), "p90_ms": ms(90.0), "p99_ms": ms(99.0),
           "max_ms": ms(100.0)})
}

/// Feeds the workload's events to a fresh store in this process and measures RSS growth.
/// The batches are built on another thread, so the memory freed while parsing sits in that
/// thread's malloc arena and the store cannot reuse it (which would hide part of its growth).
fn measure_memory(lines: &[String], now: i64) -> Result<Value> {
    let batches = std::thread::scope(|s| {
        s.spawn(|| {
            let mut batches = Vec::new();
            for chunk in lines.chunks(50_000) {
                let evs: Vec<_> = chunk
                    .iter()
                    .filter_map(|l| reelhouse_event::parse_event(l.as_bytes()).ok())
                    .map(|e| reelhouse_event::stamp(e, now))
                    .collect();
                batches.push(reelhouse_lake::events_batch(&evs)?);
            }
            Ok::<_, anyhow::Error>(batches)
        })
        .join()
        .map_err(|_| anyhow::anyhow!("batch builder panicked"))?
    })?;
    let store = reelhouse_online::FeatureStore::new(
        Arc::new(reelhouse_event::FixedClock(now)),
        8 * 86_400_000,
    );
    let before = rss_bytes();
    let t = Instant::now();
    for b in &batches {
        store.apply(b)?;
    }
    let apply_s = t.elapsed().as_secs_f64();
    let after = rss_bytes();
    let est = store.memory();
    let stats = store.stats();
    let per = |bytes: usize, n: usize| bytes as f64 / n.max(1) as f64;
    Ok(json!({
        "events": stats.applied_events,
        "apply_events_per_s_one_thread": stats.applied_events as f64 / apply_s,
        "videos": stats.videos, "users": stats.users, "creators": stats.creators,
        "views": stats.views,
        "rss_growth_bytes": after.saturating_sub(before),
        "estimate_bytes": est.total(),
        "rss_bytes_per_event": per(after.saturating_sub(before) as usize, stats.applied_events as usize),
        "bytes_per_video": per(est.videos_bytes, stats.videos),
        "bytes_per_user": per(est.users_bytes, stats.users),
        "bytes_per_view_pairing": per(est.views_bytes, stats.views),
        "breakdown": est,
    }))
}

/// How many lookups [`time_lookups`] times.
pub(crate) struct LookupPlan {
    pub lookups: usize,
    pub batches: usize,
    pub batch_size: usize,
}

/// Times single lookups and batch lookups (JSON and MessagePack, decoded like a client would)
/// of random `ids` against the server; the summaries of each.
pub(crate) async fn time_lookups(
    http: &reqwest::Client,
    url: &str,
    ids: &[i64],
    b: &LookupPlan,
    rng: &mut rand::rngs::StdRng,
) -> Result<(Value, Value, Value)> {
    let mut single = Vec::with_capacity(b.lookups);
    for _ in 0..b.lookups {
        let id = ids[rng.gen_range(0..ids.len())];
        let t = Instant::now();
        let r = http
            .get(format!("{url}/v1/features/videos/{id}"))
            .send()
            .await?;
        if !r.status().is_success() {
            bail!("lookup answered {}", r.status());
        }
        r.bytes().await?;
        single.push(t.elapsed().as_micros() as u64);
    }
    let mut batch_json = Vec::with_capacity(b.batches);
    let mut batch_msgpack = Vec::with_capacity(b.batches);
    for i in 0..b.batches * 2 {
        let pick: Vec<i64> = (0..b.batch_size)
            .map(|_| ids[rng.gen_range(0..ids.len())])
            .collect();
        let body = json!({ "video_ids": pick }).to_string();
        let msgpack = i % 2 == 1;
        let t = Instant::now();
        let mut req = http
            .post(format!("{url}/v1/features/videos:batch"))
            .header("content-type", "application/json")
            .body(body);
        if msgpack {
            req = req.header("accept", "application/x-msgpack");
        }
        let r = req.send().await?;
        if !r.status().is_success() {
            bail!("batch lookup answered {}", r.status());
        }
        let bytes = r.bytes().await?;
        // Decode like a client would, so both encodings are timed end to end.
        let n = if msgpack {
            rmp_serde::from_slice::<Vec<reelhouse_online::VideoFeatures>>(&bytes)?.len()
        } else {
            serde_json::from_slice::<Vec<reelhouse_online::VideoFeatures>>(&bytes)?.len()
        };
        if n != b.batch_size {
            bail!("batch answered {n} items for {}", b.batch_size);
        }
        let us = t.elapsed().as_micros() as u64;
        if msgpack {
            batch_msgpack.push(us)
        } else {
            batch_json.push(us)
        }
    }
    Ok((summary(single), summary(batch_json), summary(batch_msgpack)))
}

/// Sends pre-built bodies at a steady rate until `stop`; counts events acknowledged.
fn steady_ingest(
    url: String,
    bodies: Vec<Bytes>,
    per_body: usize,
    rate: u64,
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicU64>,
) -> tokio::task::JoinHandle<Result<()>> {
    tokio::spawn(async move {
        let http = reqwest::Client::new();
        let interval = Duration::from_secs_f64(per_body as f64 / rate.max(1) as f64);
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        for body in bodies {
            if stop.load(Ordering::Relaxed) {
                break;
            }
            tick.tick().await;
            let r = http
                .post(format!("{url}/v1/events"))
                .header("content-type", "application/x-ndjson")
                .body(body)
                .send()
                .await?;
            if r.status().is_success() {
                sent.fetch_add(per_body as u64, Ordering::Relaxed);
            }
            r.bytes().await?;
        }
        Ok(())
    })
}

/// Ack → visible: post one view event for a new video, then look it up until it counts.
async fn freshness(http: &reqwest::Client, url: &str, probes: usize, now: i64) -> Result<Value> {
    let mut lat = Vec::with_capacity(probes);
    let mut first_lookup_hits = 0;
    for i in 0..probes {
        let video = 8_000_000_000_000_000_000i64 + i as i64;
        let ev = json!({"event_id": format!("bench-fresh-{now}-{i}"), "event_type": "video_view_start",
            "event_time": now, "user_id": 1, "session_id": "bench", "video_id": video,
            "creator_id": 1, "view_id": format!("bench-fresh-{now}-{i}")});
        let r = http
            .post(format!("{url}/v1/events"))
            .header("content-type", "application/x-ndjson")
            .body(ev.to_string())
            .send()
            .await?;
        r.bytes().await?;
        let acked = Instant::now();
        for attempt in 0.. {
            let f: Value = http
                .get(format!("{url}/v1/features/videos/{video}"))
                .send()
                .await?
                .json()
                .await?;
            if f["views_total"].as_u64() == Some(1) {
                first_lookup_hits += (attempt == 0) as usize;
                break;
            }
            if acked.elapsed() > Duration::from_secs(5) {
                bail!("probe event not visible 5 s after its ack");
            }
        }
        lat.push(acked.elapsed().as_micros() as u64);
    }
    let mut s = summary(lat);
    s["visible_at_first_lookup"] = json!(first_lookup_hits);
    Ok(s)
}

/// A minimal RESP client for the redis-server comparison.
struct Redis {
    w: TcpStream,
    r: BufReader<TcpStream>,
}

enum Reply {
    Simple,
    Int,
    Bulk(Option<Vec<u8>>),
    Array(Vec<Reply>),
}

impl Redis {
    fn connect(addr: SocketAddr) -> Result<Redis> {
        let w = TcpStream::connect(addr)?;
        w.set_nodelay(true)?;
        Ok(Redis {
            r: BufReader::new(w.try_clone()?),
            w,
        })
    }

    fn encode(out: &mut Vec<u8>, args: &[&[u8]]) {
        out.extend_from_slice(format!("*{}\r\n", args.len()).as_bytes());
        for a in args {
            out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
            out.extend_from_slice(a);
            out.extend_from_slice(b"\r\n");
        }
    }

    fn read(&mut self) -> Result<Reply> {
        let mut line = Vec::new();
        self.r.read_until(b'\n', &mut line)?;
        if line.len() < 3 {
            bail!("redis closed the connection");
        }
        let body = std::str::from_utf8(&line[1..line.len() - 2])?;
        Ok(match line[0] {
            b'+' => Reply::Simple,
            b'-' => bail!("redis error: {body}"),
            b':' => Reply::Int,
            b'$' => {
                let n: i64 = body.parse()?;
                if n < 0 {
                    Reply::Bulk(None)
                } else {
                    let mut buf = vec![0; n as usize + 2];
                    std::io::Read::read_exact(&mut self.r, &mut buf)?;
                    buf.truncate(n as usize);
                    Reply::Bulk(Some(buf))
                }
            }
            b'*' => {
                let n: i64 = body.parse()?;
                let mut items = Vec::new();
                for _ in 0..n.max(0) {
                    items.push(self.read()?);
                }
                Reply::Array(items)
            }
            _ => bail!("unexpected redis reply"),
        })
    }

    /// Sends commands in one write and reads every reply.
    fn pipeline(&mut self, cmds: &[Vec<Vec<u8>>]) -> Result<Vec<Reply>> {
        let mut out = Vec::new();
        for c in cmds {
            let args: Vec<&[u8]> = c.iter().map(|a| a.as_slice()).collect();
            Self::encode(&mut out, &args);
        }
        self.w.write_all(&out)?;
        cmds.iter().map(|_| self.read()).collect()
    }
}

fn hgetall(id: i64) -> Vec<Vec<u8>> {
    vec![b"HGETALL".to_vec(), format!("video:{id}").into_bytes()]
}

/// Loads the same video features into redis-server and times HGETALL lookups.
fn redis_compare(
    features: &[reelhouse_online::VideoFeatures],
    b: &ServeBench,
    seed: u64,
) -> Result<Value> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let mut child = std::process::Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args(["--save", "", "--appendonly", "no"])
        .stdout(std::process::Stdio::null())
        .spawn()
        .context("redis-server not found (apt-get install redis-server)")?;
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse()?;
    let result = (|| {
        let mut conn = None;
        for _ in 0..100 {
            if let Ok(c) = Redis::connect(addr) {
                conn = Some(c);
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let mut redis = conn.context("redis-server did not start")?;
        let version = match redis
            .pipeline(&[vec![b"INFO".to_vec(), b"server".to_vec()]])?
            .pop()
        {
            Some(Reply::Bulk(Some(text))) => String::from_utf8_lossy(&text)
                .lines()
                .find_map(|l| l.strip_prefix("redis_version:").map(String::from))
                .unwrap_or_default(),
            _ => String::new(),
        };
        for chunk in features.chunks(1000) {
            let cmds: Vec<Vec<Vec<u8>>> = chunk
                .iter()
                .map(|f| {
                    let v = serde_json::to_value(f).unwrap_or_default();
                    let mut c = vec![
                        b"HSET".to_vec(),
                        format!("video:{}", f.video_id).into_bytes(),
                    ];
                    for (k, val) in v.as_object().into_iter().flatten() {
                        c.push(k.clone().into_bytes());
                        c.push(val.to_string().into_bytes());
                    }
                    c
                })
                .collect();
            redis.pipeline(&cmds)?;
        }
        let ids: Vec<i64> = features.iter().map(|f| f.video_id as i64).collect();
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut single = Vec::new();
        for _ in 0..b.lookups {
            let id = ids[rng.gen_range(0..ids.len())];
            let t = Instant::now();
            match redis.pipeline(&[hgetall(id)])?.pop() {
                Some(Reply::Array(a)) if a.len() == 22 => {}
                _ => bail!("HGETALL returned an unexpected reply"),
            }
            single.push(t.elapsed().as_micros() as u64);
        }
        let mut batch = Vec::new();
        for _ in 0..b.batches {
            let cmds: Vec<_> = (0..b.batch_size)
                .map(|_| hgetall(ids[rng.gen_range(0..ids.len())]))
                .collect();
            let t = Instant::now();
            let replies = redis.pipeline(&cmds)?;
            if replies.len() != b.batch_size {
                bail!("pipeline returned {} replies", replies.len());
            }
            batch.push(t.elapsed().as_micros() as u64);
        }
        Ok(
            json!({"version": version, "single_hgetall": summary(single),
                  "pipelined_hgetall": summary(batch)}),
        )
    })();
    let _ = child.kill();
    let _ = child.wait();
    result
}

pub async fn serve(b: ServeBench) -> Result<()> {
    warn_if_debug();
    let dir = tempfile::Builder::new()
        .prefix("reelhouse-bench-")
        .tempdir()?;
    let now = chrono::Utc::now().timestamp_millis();
    // Sessions start up to 3 h before a workload's end; ending it 2 h 40 min ahead fills the
    // 1 h window too (the few future events are clamped by ingest).
    let w =
        reelhouse_workload::generate(&WorkloadConfig::new(b.events, b.seed, now + 160 * 60_000));
    eprintln!("measuring the store's memory on {} events…", w.lines.len());
    let memory = measure_memory(&w.lines, now)?;

    let data = DataArgs::defaults(dir.path().join("data"));
    let listen: SocketAddr = "127.0.0.1:0".parse()?;
    let mut config = ServerConfig::new(data.engine_config(), listen);
    config.materialize_interval = None;
    let server = reelhouse_server::start(config).await?;
    let url = format!("http://{}", server.addr);
    let bodies: Vec<(Bytes, usize)> = w
        .bodies(5_000)
        .into_iter()
        .zip(w.lines.chunks(5_000).map(|c| c.len()))
        .map(|(body, n)| (Bytes::from(body), n))
        .collect();
    eprintln!("loading {} events over HTTP…", w.lines.len());
    let load = send_all(&url, bodies, 4, Arc::new(|_| {})).await?;
    drop(w);
    let mut ids: Vec<i64> = server
        .engine
        .features()
        .totals()
        .videos
        .into_keys()
        .collect();
    ids.sort_unstable();
    let mut rng = rand::rngs::StdRng::seed_from_u64(b.seed);
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(4)
        .build()?;

    let plan = LookupPlan {
        lookups: b.lookups,
        batches: b.batches,
        batch_size: b.batch_size,
    };
    eprintln!("timing lookups with no ingest…");
    let idle = time_lookups(&http, &url, &ids, &plan, &mut rng).await?;

    // Steady ingest of a second workload (other users and events) while timing again.
    let per_body = 1_000;
    let steady_events = (b.ingest_rate as usize * 120).min(4_000_000);
    let w2 = reelhouse_workload::generate(&WorkloadConfig::new(steady_events, b.seed + 1, now));
    let steady_bodies: Vec<Bytes> = w2.bodies(per_body).into_iter().map(Bytes::from).collect();
    drop(w2);
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let steady = steady_ingest(
        url.clone(),
        steady_bodies,
        per_body,
        b.ingest_rate,
        Arc::clone(&stop),
        Arc::clone(&sent),
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    eprintln!("timing lookups under {} events/s of ingest…", b.ingest_rate);
    let t = Instant::now();
    let sent_before = sent.load(Ordering::Relaxed);
    let loaded = time_lookups(&http, &url, &ids, &plan, &mut rng).await?;
    let fresh = freshness(&http, &url, b.probes, now).await?;
    let achieved = (sent.load(Ordering::Relaxed) - sent_before) as f64 / t.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    steady.await??;
    let features = server.engine.features().videos(
        &ids.iter()
            .map(|i| reelhouse_event::VideoId(*i as u64))
            .collect::<Vec<_>>(),
    );
    server.shutdown().await?;

    let redis = if b.no_redis {
        None
    } else {
        eprintln!("timing redis-server HGETALL on the same features…");
        let bb = b.clone();
        let r = tokio::task::spawn_blocking(move || redis_compare(&features, &bb, bb.seed)).await?;
        match r {
            Ok(v) => Some(v),
            Err(e) => {
                eprintln!("redis comparison skipped: {e:#}");
                None
            }
        }
    };

    let row = |name: &str, v: &Value| {
        println!(
            "  {name:<38} p50 {:>7.3} ms  p99 {:>7.3} ms  (n = {})",
            v["p50_ms"].as_f64().unwrap_or(0.0),
            v["p99_ms"].as_f64().unwrap_or(0.0),
            v["n"]
        )
    };
    println!(
        "reelhouse feature lookups over loopback HTTP ({} videos, {} events loaded at {:.0} events/s):",
        ids.len(),
        load.accepted,
        load.accepted as f64 / load.elapsed.as_secs_f64()
    );
    row("single GET, idle", &idle.0);
    row("batch-500 POST (JSON), idle", &idle.1);
    row("batch-500 POST (msgpack), idle", &idle.2);
    row(&format!("single GET, ingest {achieved:.0} ev/s"), &loaded.0);
    row("batch-500 POST (JSON), under ingest", &loaded.1);
    row("batch-500 POST (msgpack), under ingest", &loaded.2);
    row("freshness ack → visible, under ingest", &fresh);
    println!(
        "  store update on one thread: {:.0} events/s",
        memory["apply_events_per_s_one_thread"]
            .as_f64()
            .unwrap_or(0.0)
    );
    println!(
        "  memory: {:.0} B/video, {:.0} B/user, {:.0} B/view pairing; RSS growth {:.1} MB for {} events (estimate {:.1} MB)",
        memory["bytes_per_video"].as_f64().unwrap_or(0.0),
        memory["bytes_per_user"].as_f64().unwrap_or(0.0),
        memory["bytes_per_view_pairing"].as_f64().unwrap_or(0.0),
        memory["rss_growth_bytes"].as_f64().unwrap_or(0.0) / 1e6,
        memory["events"],
        memory["estimate_bytes"].as_f64().unwrap_or(0.0) / 1e6,
    );
    if let Some(r) = &redis {
        println!(
            "redis-server {} on the same features (raw RESP client, idle):",
            r["version"]
        );
        row("single HGETALL", &r["single_hgetall"]);
        row("500 pipelined HGETALL", &r["pipelined_hgetall"]);
    }
    let result = json!({
        "benchmark": "serve",
        "events_loaded": load.accepted,
        "videos": ids.len(),
        "batch_size": b.batch_size,
        "idle": {"single": idle.0, "batch_json": idle.1, "batch_msgpack": idle.2},
        "under_ingest": {"target_events_per_s": b.ingest_rate, "achieved_events_per_s": achieved,
                          "single": loaded.0, "batch_json": loaded.1, "batch_msgpack": loaded.2,
                          "freshness_ack_to_visible": fresh},
        "memory": memory,
        "redis": redis,
    });
    write_result(&b.out, result)
}
