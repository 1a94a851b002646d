//! `reelhouse bench`: system figures, each beside DuckDB doing the same work on the same data
//! in the same run. Results go to `bench/results/*.json`; `docs/performance.md` summarises.
//!
//! `bench ingest`: HTTP ingest with durable acks from several concurrent clients on loopback
//! (events/s, ack latency percentiles), the Delta commit of what was sent, bytes per event
//! stored in `events`; then DuckDB `read_ndjson` loading the same NDJSON file (and writing
//! it as zstd Parquet, for a bytes-per-event reference).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result};
use bytes::Bytes;
use clap::{Args, Subcommand};
use reelhouse_server::ServerConfig;
use reelhouse_workload::WorkloadConfig;
use serde_json::json;

use crate::send::{percentile, send_all};
use crate::DataArgs;

#[derive(Args)]
pub struct BenchArgs {
    #[command(subcommand)]
    what: BenchCommand,
}

#[derive(Subcommand)]
enum BenchCommand {
    /// HTTP ingest throughput and ack latency with durable acks, beside DuckDB read_ndjson.
    Ingest(IngestBench),
    /// Warehouse rebuild rate and creator-dashboard latency, beside DuckDB computing
    /// agg_creator_daily from the same Parquet files.
    Materialize(MaterializeBench),
    /// Feature lookup latency (single and batch-500) while ingest runs, freshness, memory per
    /// video and user, beside redis-server HGETALL on the same features.
    Serve(crate::bench_serve::ServeBench),
    /// Share-cascade metrics (roots, depths, structural virality) for one 1M-node cascade and
    /// for 100k small cascades.
    Cascades(CascadeBench),
    /// Ingest rate, materializer catch-up and freshness through NATS JetStream with 1 and 2
    /// ingest processes, beside one embedded node (needs the nats-server package).
    Scaleout(crate::bench_scaleout::ScaleoutBench),
}

#[derive(Args)]
struct CascadeBench {
    /// Nodes of the one big cascade.
    #[arg(long, default_value_t = 1_000_000)]
    big: usize,
    /// Number of small cascades (5–20 nodes each).
    #[arg(long, default_value_t = 100_000)]
    small: usize,
    #[arg(long, default_value_t = 7)]
    seed: u64,
    #[arg(long, default_value = "bench/results/cascades.json")]
    out: PathBuf,
}

#[derive(Args)]
struct MaterializeBench {
    /// Events to generate.
    #[arg(long, default_value_t = 2_000_000)]
    events: usize,
    /// Days of event time they cover.
    #[arg(long, default_value_t = 90)]
    days: u32,
    /// Dashboard requests to time.
    #[arg(long, default_value_t = 2_000)]
    requests: usize,
    /// Full rebuilds that rewrite every date to time, and as many DuckDB runs of the same
    /// aggregation right after them (their medians are compared).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=20))]
    rounds: u32,
    #[arg(long, default_value_t = 7)]
    seed: u64,
    /// Where to write the JSON result.
    #[arg(long, default_value = "bench/results/materialize.json")]
    out: PathBuf,
}

#[derive(Args)]
struct IngestBench {
    /// Events to send.
    #[arg(long, default_value_t = 2_000_000)]
    events: usize,
    /// Concurrent HTTP clients.
    #[arg(long, default_value_t = 4)]
    clients: usize,
    /// Events per request.
    #[arg(long, default_value_t = 5_000)]
    batch: usize,
    #[arg(long, default_value_t = 7)]
    seed: u64,
    /// Where to write the JSON result.
    #[arg(long, default_value = "bench/results/ingest.json")]
    out: PathBuf,
    /// Skip the DuckDB comparison.
    #[arg(long)]
    no_duckdb: bool,
}

pub async fn run(a: BenchArgs) -> Result<()> {
    match a.what {
        BenchCommand::Ingest(b) => ingest(b).await,
        BenchCommand::Materialize(b) => materialize(b).await,
        BenchCommand::Serve(b) => crate::bench_serve::serve(b).await,
        BenchCommand::Cascades(b) => cascades(b),
        BenchCommand::Scaleout(b) => crate::bench_scaleout::scaleout(b).await,
    }
}

async fn ingest(b: IngestBench) -> Result<()> {
    warn_if_debug();
    let dir = tempfile::Builder::new()
        .prefix("reelhouse-bench-")
        .tempdir()?;
    let cfg = WorkloadConfig::new(b.events, b.seed, chrono::Utc::now().timestamp_millis());
    let w = reelhouse_workload::generate(&cfg);
    let ndjson = dir.path().join("events.ndjson");
    std::fs::write(&ndjson, w.lines.join("\n") + "\n")?;
    let ndjson_bytes = std::fs::metadata(&ndjson)?.len();
    let bodies = request_bodies(&w, b.batch);
    let m = w.manifest.clone();
    drop(w);
    eprintln!(
        "generated {} events ({:.0} MB NDJSON)",
        m.lines,
        ndjson_bytes as f64 / 1e6
    );

    let data = DataArgs::defaults(dir.path().join("data"));
    let listen: SocketAddr = "127.0.0.1:0".parse()?;
    let server = reelhouse_server::start(ServerConfig::new(data.ingest_config(), listen)).await?;
    let url = format!("http://{}", server.addr);
    let report = send_all(&url, bodies, b.clients, Arc::new(|_| {})).await?;
    let fsyncs = server.ingestor.stats().wal_fsyncs;
    let t = Instant::now();
    server.ingestor.flush().await?;
    let final_flush_s = t.elapsed().as_secs_f64();
    let table = reelhouse_lake::Lake::open(&data.data_dir)?
        .load(reelhouse_lake::RawTable::Events)
        .await?
        .context("events table missing after flush")?;
    let stored_bytes = reelhouse_lake::live_bytes(&table).await?;
    server.shutdown().await?;

    let secs = report.elapsed.as_secs_f64();
    let eps = m.lines as f64 / secs;
    let ms = |p| percentile(&report.latencies_us, p) as f64 / 1000.0;
    let bytes_per_event = stored_bytes as f64 / m.valid_unique.max(1) as f64;
    println!(
        "reelhouse HTTP ingest ({} clients × {} events/request, durable acks):",
        b.clients, b.batch
    );
    println!(
        "  {} events in {:.2}s = {:.0} events/s; ack latency p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms; {} fsyncs for {} requests; 429 retries {}",
        m.lines, secs, eps, ms(50.0), ms(99.0), ms(100.0), fsyncs, report.requests, report.retries_429
    );
    println!(
        "  final Delta commit {:.2}s; events table {:.1} MB = {:.1} bytes/event (NDJSON {:.0} bytes/event)",
        final_flush_s,
        stored_bytes as f64 / 1e6,
        bytes_per_event,
        ndjson_bytes as f64 / m.lines as f64
    );

    let duckdb = if b.no_duckdb {
        None
    } else {
        duckdb_load(&ndjson, dir.path())
    };
    if let Some(d) = &duckdb {
        println!(
            "DuckDB {} read_ndjson (2 threads, same file): {:.2}s = {:.0} events/s; zstd Parquet {:.1} bytes/event",
            d["version"].as_str().unwrap_or("?"),
            d["load_s"].as_f64().unwrap_or(0.0),
            d["events_per_s"].as_f64().unwrap_or(0.0),
            d["parquet_bytes_per_event"].as_f64().unwrap_or(0.0)
        );
    }
    let result = json!({
        "benchmark": "ingest",
        "events": m.lines,
        "valid_unique": m.valid_unique,
        "clients": b.clients,
        "events_per_request": b.batch,
        "reelhouse": {
            "elapsed_s": secs,
            "events_per_s": eps,
            "ack_ms": {"p50": ms(50.0), "p90": ms(90.0), "p99": ms(99.0), "max": ms(100.0)},
            "requests": report.requests,
            "wal_fsyncs": fsyncs,
            "retries_429": report.retries_429,
            "final_flush_s": final_flush_s,
            "events_table_bytes": stored_bytes,
            "bytes_per_event": bytes_per_event,
            "accepted": report.accepted,
            "duplicates": report.duplicates,
            "rejected": report.rejected,
        },
        "ndjson_bytes_per_event": ndjson_bytes as f64 / m.lines as f64,
        "duckdb": duckdb,
    });
    write_result(&b.out, result)
}

/// The workload as NDJSON request bodies of `batch` lines, each with its line count.
pub(crate) fn request_bodies(
    w: &reelhouse_workload::Workload,
    batch: usize,
) -> Vec<(Bytes, usize)> {
    w.bodies(batch)
        .into_iter()
        .zip(w.lines.chunks(batch.max(1)).map(|c| c.len()))
        .map(|(body, n)| (Bytes::from(body), n))
        .collect()
}

pub(crate) fn warn_if_debug() {
    if cfg!(debug_assertions) {
        eprintln!("warning: this is a debug build; benchmark figures need `cargo run --release`");
    }
}

/// Adds what every result records (build profile, cores, time) and writes it as JSON.
pub(crate) fn write_result(out: &std::path::Path, mut result: serde_json::Value) -> Result<()> {
    result["build"] = json!(if cfg!(debug_assertions) {
        "debug"
    } else {
        "release"
    });
    result["cores"] = json!(std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0));
    result["at"] = json!(chrono::Utc::now().to_rfc3339());
    if let Some(parent) = out.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(out, serde_json::to_string_pretty(&result)? + "\n")?;
    println!("wrote {}", out.display());
    Ok(())
}

/// The numeric fields of Linux `/proc/self/stat` after the command name (which is in
/// parentheses and may hold spaces) from field 4 on: field `n` of the line (1-based, as
/// `proc(5)` numbers them) is at index `n - 4`. `None` where it cannot be read.
fn proc_stat() -> Option<Vec<u64>> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    // The state (field 3) is a letter; every field this module reads comes after it. Fields
    // that can be negative (priority, nice) read as 0; none of them is read here.
    Some(
        rest.split_whitespace()
            .skip(1)
            .map(|f| f.parse().unwrap_or(0))
            .collect(),
    )
}

/// User plus system CPU time of this process so far (`utime` and `stime`, fields 14 and 15,
/// in clock ticks of USER_HZ = 100 per second); `None` where it cannot be read.
fn process_cpu_s() -> Option<f64> {
    let f = proc_stat()?;
    Some((*f.get(14 - 4)? + *f.get(15 - 4)?) as f64 / 100.0)
}

/// Minor page faults of this process so far (`minflt`, field 10): pages the kernel had to
/// map (and zero) when the process first touched them. A rebuild that allocates fresh
/// memory instead of reusing freed memory pays for each.
fn process_minor_faults() -> Option<u64> {
    proc_stat()?.get(10 - 4).copied()
}

/// CPU seconds since `start` (from [`process_cpu_s`]).
fn cpu_since(start: Option<f64>) -> Option<f64> {
    Some(process_cpu_s()? - start?)
}

/// Runs DuckDB (Python package) on the same NDJSON; `None` with a note when unavailable.
fn duckdb_load(ndjson: &std::path::Path, dir: &std::path::Path) -> Option<serde_json::Value> {
    // Same typing work as reelhouse: explicit columns, ids to BIGINT, both time forms to
    // timestamps, props and device flattened. DuckDB skips the malformed lines
    // (ignore_errors); it does not validate per event, dedup, or fsync.
    let script = r#"
import duckdb, json, os, sys, time
src, out = sys.argv[1], sys.argv[2]
con = duckdb.connect()
con.execute("SET threads=2")
con.execute("SET enable_progress_bar = false")
cols = """{'event_id':'VARCHAR','event_type':'VARCHAR','event_time':'VARCHAR','user_id':'VARCHAR',
'session_id':'VARCHAR','video_id':'VARCHAR','creator_id':'VARCHAR','view_id':'VARCHAR',
'device':'STRUCT(os VARCHAR, app_version VARCHAR, country VARCHAR)',
'props':'STRUCT(source VARCHAR, via_share_id VARCHAR, watch_ms BIGINT, video_duration_ms BIGINT, comment_id VARCHAR, length BIGINT, share_id VARCHAR, parent_share_id VARCHAR, channel VARCHAR)'}"""
q = f"""CREATE TABLE t AS SELECT event_id, event_type,
  CASE WHEN regexp_full_match(event_time, '[0-9]+') THEN epoch_ms(event_time::BIGINT)
       ELSE TRY_CAST(event_time AS TIMESTAMPTZ) END AS event_time,
  TRY_CAST(user_id AS BIGINT) AS user_id, session_id, TRY_CAST(video_id AS BIGINT) AS video_id,
  TRY_CAST(creator_id AS BIGINT) AS creator_id, view_id, props.*, device.os AS device_os,
  device.app_version AS device_app_version, device.country AS device_country
FROM read_ndjson('{src}', columns = {cols}, ignore_errors = true)"""
t = time.time()
con.execute(q)
load = time.time() - t
n = con.execute("SELECT count(*) FROM t").fetchone()[0]
con.execute(f"COPY (SELECT * FROM t ORDER BY user_id, session_id, event_time) TO '{out}' (FORMAT parquet, COMPRESSION zstd)")
print(json.dumps({"version": duckdb.__version__, "load_s": load, "rows": n,
                  "events_per_s": n / load, "parquet_bytes_per_event": os.path.getsize(out) / n}))
"#;
    let out = dir.join("duckdb.parquet");
    run_python(script, &[ndjson, &out])
}

/// Says on stderr that the DuckDB comparison is skipped, with the line of a failed Python
/// step's `stderr` that names the error (e.g. a missing `duckdb` module).
fn python_failed(stderr: &str) {
    eprintln!(
        "DuckDB comparison skipped: {} (install with `pip install duckdb`)",
        stderr
            .lines()
            .find(|l| l.contains("Error") || l.contains("No module"))
            .unwrap_or("python3 failed")
    );
}

/// Runs a Python script that prints one JSON object on its last stdout line; `None` (with a
/// note on stderr) when Python or its packages are missing or the script fails.
fn run_python(script: &str, args: &[&std::path::Path]) -> Option<serde_json::Value> {
    let run = std::process::Command::new("python3")
        .arg("-c")
        .arg(script)
        .args(args)
        .output();
    match run {
        Ok(o) if o.status.success() => {
            let text = String::from_utf8_lossy(&o.stdout);
            let parsed = text
                .lines()
                .last()
                .and_then(|l| serde_json::from_str(l).ok());
            if parsed.is_none() {
                eprintln!("DuckDB comparison skipped: unreadable output from the DuckDB step");
            }
            parsed
        }
        Ok(o) => {
            python_failed(&String::from_utf8_lossy(&o.stderr));
            None
        }
        Err(e) => {
            eprintln!("DuckDB comparison skipped: cannot run python3 ({e})");
            None
        }
    }
}

async fn materialize(b: MaterializeBench) -> Result<()> {
    warn_if_debug();
    let dir = tempfile::Builder::new()
        .prefix("reelhouse-bench-")
        .tempdir()?;
    let now = chrono::Utc::now().timestamp_millis();
    let mut cfg = WorkloadConfig::new(b.events, b.seed, now);
    cfg.days = b.days;
    let w = reelhouse_workload::generate(&cfg);
    let m = w.manifest.clone();
    let data = DataArgs::defaults(dir.path().join("data"));
    let mut config = ServerConfig::new(data.ingest_config(), "127.0.0.1:0".parse()?);
    config.materialize_interval = None;
    let server = reelhouse_server::start(config).await?;
    for body in w.bodies(20_000) {
        server
            .ingestor
            .ingest(&body, reelhouse_server::IngestPath::Bulk)
            .await?;
    }
    drop(w);
    server.ingestor.flush().await?;
    eprintln!("loaded {} events over {} days", m.valid_unique, b.days);

    // Full rebuilds: the first creates the tables (delta-rs's write, whose files carry no
    // row fingerprints). Then `rounds` full rebuilds that rewrite every date of every table
    // (files whose rows did not change are written too), and right after them `rounds` runs
    // of DuckDB's query in one DuckDB process (warm, as this server is): the medians are
    // compared. Each side runs back to back, as a user would run it: when the two alternated
    // run by run, each was slower than back to back (this side 7-10 % more CPU; see
    // docs/performance.md). Last, a full rebuild that finds every date's rows unchanged and
    // keeps their files (nothing is written or committed). CPU time of the whole process
    // beside each wall time: nothing else runs in it then, and CPU time varies less than
    // wall time when the machine is shared.
    let (t, cpu) = (Instant::now(), process_cpu_s());
    let report = server.ingestor.materialize().await?;
    let (first_s, first_cpu) = (t.elapsed().as_secs_f64(), cpu_since(cpu));
    let mut duck = DuckDaily::start(&data.data_dir);
    let (mut rewrites, mut rewrites_cpu, mut duck_runs) = (Vec::new(), Vec::new(), Vec::new());
    let mut rewrites_faults = Vec::new();
    let mut before = report.clone();
    for _ in 0..b.rounds {
        let (t, cpu, faults) = (Instant::now(), process_cpu_s(), process_minor_faults());
        let r = server.ingestor.materialize_full_rewriting().await?;
        rewrites.push(t.elapsed().as_secs_f64());
        rewrites_cpu.push(cpu_since(cpu));
        rewrites_faults.push(process_minor_faults().zip(faults).map(|(b, a)| b - a));
        let unwritten = unwritten_tables(&before, &r);
        if unwritten > 0 {
            eprintln!("warning: a rewriting full rebuild left {unwritten} tables unwritten");
        }
        before = r;
    }
    for _ in 0..b.rounds {
        let Some(d) = duck.as_mut() else { break };
        match d.run() {
            Some(run) => duck_runs.push(run),
            None => duck = None,
        }
    }
    let (t, cpu) = (Instant::now(), process_cpu_s());
    let r = server.ingestor.materialize_full().await?;
    let (unchanged_s, unchanged_cpu) = (t.elapsed().as_secs_f64(), cpu_since(cpu));
    let kept = unwritten_tables(&before, &r);
    let full_s = median(&rewrites);
    // The same aggregation as DuckDB's: agg_creator_daily from the events Parquet files, in
    // memory, with the models it needs (three runs; the median is reported).
    let mut same = Vec::new();
    for _ in 0..3 {
        let catalog = server.ingestor.catalog().await?;
        let inputs = reelhouse_warehouse::Inputs {
            now_ms: chrono::Utc::now().timestamp_millis(),
            ..Default::default()
        };
        let t = Instant::now();
        let rows = reelhouse_warehouse::creator_daily_in_memory(&catalog, &inputs).await?;
        same.push((
            t.elapsed().as_secs_f64(),
            rows.iter().map(|b| b.num_rows()).sum::<usize>(),
        ));
    }
    same.sort_by(|a, b| a.0.total_cmp(&b.0));
    let (same_s, same_rows) = same[1];
    let mut trickle = WorkloadConfig::new(3_000, b.seed + 1, now - 20 * 86_400_000);
    trickle.days = 3;
    trickle.duplicate_fraction = 0.0;
    trickle.malformed_fraction = 0.0;
    let tw = reelhouse_workload::generate(&trickle);
    for body in tw.bodies(3_000) {
        server
            .ingestor
            .ingest(&body, reelhouse_server::IngestPath::Bulk)
            .await?;
    }
    let t = Instant::now();
    let trickle_report = server.ingestor.materialize().await?;
    let trickle_s = t.elapsed().as_secs_f64();
    let trickle_dates = trickle_report.dates.as_ref().map_or(0, Vec::len);
    server.ingestor.flush().await?;
    // One whole day rebuilt on its own: restating a date makes it the only dirty one. The
    // busiest date (the earliest of equals), so the step rebuilds a full day whatever the
    // spread: with `--days 1` most dates hold only a few late events.
    let (day, day_events) = {
        let c = server.ingestor.catalog().await?;
        let r = c
            .query_json(
                "SELECT CAST(event_date AS INT), count(*) FROM events GROUP BY 1 \
                 ORDER BY 2 DESC, 1 LIMIT 1",
                1,
            )
            .await?;
        let int = |k: usize| r.rows.first().and_then(|row| row[k].as_i64()).unwrap_or(0);
        (int(0) as i32, int(1) as u64)
    };
    let t = Instant::now();
    let day_report = server.ingestor.restate(day, day).await?;
    let day_s = t.elapsed().as_secs_f64();
    let day_dates = day_report.dates.as_ref().map_or(0, Vec::len);
    let day_read = day_report
        .tables
        .iter()
        .find(|t| t.table == "ev")
        .map_or(0, |t| t.rows);
    let agg_rows = report
        .tables
        .iter()
        .find(|t| t.table == "agg_creator_daily")
        .map_or(0, |t| t.rows);

    // Dashboard over loopback: the busiest creator, the last 90 days.
    let catalog = server.ingestor.catalog().await?;
    let top = catalog
        .query_json(
            "SELECT creator_id FROM agg_creator_daily GROUP BY 1 ORDER BY sum(views) DESC LIMIT 1",
            1,
        )
        .await?;
    let creator = top
        .rows
        .first()
        .and_then(|r| r.first())
        .cloned()
        .unwrap_or_default();
    let to = chrono::Utc::now().date_naive();
    let from = to - chrono::Duration::days(89);
    let url = format!(
        "http://{}/v1/creators/{creator}/dashboard?from={from}&to={to}",
        server.addr
    );
    let http = reqwest::Client::new();
    let mut lat = Vec::with_capacity(b.requests);
    for i in 0..b.requests + 50 {
        let t = Instant::now();
        let resp = http.get(&url).send().await?;
        let ok = resp.status().is_success();
        let _ = resp.bytes().await?;
        if !ok {
            anyhow::bail!("dashboard request failed");
        }
        if i >= 50 {
            lat.push(t.elapsed().as_micros() as u64);
        }
    }
    lat.sort_unstable();
    server.shutdown().await?;
    let ms = |p| percentile(&lat, p) as f64 / 1000.0;
    let eps = m.valid_unique as f64 / full_s;
    println!(
        "reelhouse warehouse rebuild ({} events, {} days; per table: the first full rebuild):",
        m.valid_unique, b.days
    );
    for t in &report.tables {
        println!(
            "  {:<20} {:>9} rows {:>7} ms (write {:>5} ms)",
            t.table, t.rows, t.elapsed_ms, t.write_ms
        );
    }
    let secs = |v: &[f64]| {
        v.iter()
            .map(|s| format!("{s:.2}s"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let cpus: Vec<f64> = rewrites_cpu.iter().flatten().copied().collect();
    let faults: Vec<String> = rewrites_faults
        .iter()
        .map(|f| f.map_or("?".to_string(), |f| format!("{}k", f / 1000)))
        .collect();
    println!(
        "  full rebuild, every date of every table rewritten: median of {} {:.2}s = {:.0} events/s (runs {}; CPU time of the process {}; minor page faults {})",
        rewrites.len(),
        full_s,
        eps,
        secs(&rewrites),
        secs(&cpus),
        faults.join(", "),
    );
    let cpu = |c: Option<f64>| c.map_or("?".to_string(), |c| format!("{c:.2}s"));
    println!(
        "  full rebuild, the first, creating the tables: {first_s:.2}s (CPU {}); again with nothing changed, {kept} of {} tables kept: {unchanged_s:.2}s (CPU {})",
        cpu(first_cpu),
        report.tables.iter().filter(|t| t.version.is_some()).count(),
        cpu(unchanged_cpu),
    );
    println!(
        "  agg_creator_daily alone, in memory from the events Parquet files (DuckDB's work): {:.2}s = {:.0} events/s ({} rows; median of 3: {})",
        same_s,
        m.valid_unique as f64 / same_s,
        same_rows,
        same.iter().map(|(s, _)| format!("{s:.2}s")).collect::<Vec<_>>().join(", ")
    );
    println!(
        "  incremental, late trickle of {} events on 3 old dates: {:.2}s ({} dates recomputed, {}, planning {} ms)",
        tw.manifest.valid_unique, trickle_s, trickle_dates, trickle_report.mode,
        trickle_report.plan_ms.unwrap_or(0)
    );
    for t in &trickle_report.tables {
        println!(
            "    {:<20} {:>9} rows {:>7} ms (write {:>5} ms)",
            t.table, t.rows, t.elapsed_ms, t.write_ms
        );
    }
    println!("  incremental, one whole day ({} events) rebuilt: {:.2}s ({} dates recomputed from {} events read = {:.0} events/s, {}, planning {} ms)", day_events, day_s, day_dates, day_read, day_read as f64 / day_s, day_report.mode, day_report.plan_ms.unwrap_or(0));
    println!("  dashboard (90 days, {} requests over loopback): p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms", b.requests, ms(50.0), ms(99.0), ms(100.0));

    let duck = duck.map(|d| d.finish(&duck_runs));
    if let Some(d) = &duck {
        let s = d["agg_s"].as_f64().unwrap_or(0.0);
        println!(
            "DuckDB {} agg_creator_daily from the same Parquet files (2 threads), right after the rewriting rebuilds above: median of {} {:.2}s = {:.0} events/s ({} rows; runs {})",
            d["version"].as_str().unwrap_or("?"),
            duck_runs.len(),
            s,
            d["events"].as_f64().unwrap_or(0.0) / s.max(1e-9),
            d["rows"],
            secs(&duck_runs.iter().map(|r| r.0).collect::<Vec<_>>()),
        );
        println!(
            "  every-date full rebuild at {:.0} % of DuckDB's rate for agg_creator_daily (medians)",
            100.0 * s / full_s,
        );
        let duck_eps = d["events"].as_f64().unwrap_or(0.0) / s.max(1e-9);
        println!(
            "  one whole day restated on its own at {:.0} % of DuckDB's rate (events read per second)",
            100.0 * day_read as f64 / day_s / duck_eps.max(1e-9),
        );
    }
    let result = json!({
        "benchmark": "materialize",
        "events": m.valid_unique,
        "days": b.days,
        "reelhouse": {
            "full_rebuild_s": full_s,
            "full_rebuild_rewrite_runs_s": rewrites,
            "full_rebuild_rewrite_runs_cpu_s": rewrites_cpu,
            "full_rebuild_rewrite_runs_minor_faults": rewrites_faults,
            "full_rebuild_first_s": first_s,
            "full_rebuild_first_cpu_s": first_cpu,
            "full_rebuild_unchanged_s": unchanged_s,
            "full_rebuild_unchanged_cpu_s": unchanged_cpu,
            "full_rebuild_unchanged_tables_kept": kept,
            "full_rebuild_events_per_s": eps,
            "creator_daily_in_memory_s": same_s,
            "creator_daily_in_memory_runs_s": same.iter().map(|(s, _)| *s).collect::<Vec<_>>(),
            "creator_daily_in_memory_events_per_s": m.valid_unique as f64 / same_s,
            "creator_daily_in_memory_rows": same_rows,
            "models": report.tables.iter().filter(|t| t.version.is_some()).count(),
            "per_model_ms": report.tables.iter().map(|t| (t.table.clone(), t.elapsed_ms)).collect::<std::collections::BTreeMap<_, _>>(),
            "per_model_write_ms": report.tables.iter().map(|t| (t.table.clone(), t.write_ms)).collect::<std::collections::BTreeMap<_, _>>(),
            "agg_creator_daily_rows": agg_rows,
            "late_trickle_events": tw.manifest.valid_unique,
            "late_trickle_rebuild_s": trickle_s,
            "late_trickle_mode": trickle_report.mode,
            "late_trickle_dates_rewritten": trickle_dates,
            "late_trickle_plan_ms": trickle_report.plan_ms,
            "late_trickle_per_model_ms": trickle_report.tables.iter().map(|t| (t.table.clone(), t.elapsed_ms)).collect::<std::collections::BTreeMap<_, _>>(),
            "one_day_plan_ms": day_report.plan_ms,
            "one_day_events": day_events,
            "one_day_rebuild_s": day_s,
            "one_day_events_read": day_read,
            "one_day_events_read_per_s": day_read as f64 / day_s,
            "one_day_dates_rewritten": day_dates,
            "one_day_mode": day_report.mode,
            "dashboard_ms": {"p50": ms(50.0), "p90": ms(90.0), "p99": ms(99.0), "max": ms(100.0)},
            "dashboard_requests": b.requests,
        },
        "duckdb": duck,
    });
    write_result(&b.out, result)
}

/// The DuckDB script of [`DuckDaily`]: agg_creator_daily (same definitions) from the events
/// table's Parquet files, once per line read from stdin.
const DUCK_DAILY: &str = r#"
import duckdb, json, sys, time
src = sys.argv[1] + "/events/*/*.parquet"
con = duckdb.connect()
con.execute("SET threads=2")
con.execute("SET enable_progress_bar = false")
con.execute("SET TimeZone = 'UTC'")
q = f"""
WITH ev AS (SELECT * FROM read_parquet('{src}', hive_partitioning = true)
            QUALIFY row_number() OVER (PARTITION BY event_id ORDER BY received_at) = 1),
v AS (SELECT view_id,
    coalesce(min(CASE WHEN event_type = 'video_view_start' THEN creator_id END), min(creator_id)) AS creator_id,
    coalesce(min(CASE WHEN event_type = 'video_view_start' THEN user_id END), min(user_id)) AS user_id,
    min(CASE WHEN event_type = 'video_view_start' THEN event_time END) AS st,
    max(CASE WHEN event_type = 'video_view_end' THEN event_time END) AS et,
    max(CASE WHEN event_type = 'video_view_end' THEN watch_ms END) AS w,
    max(CASE WHEN event_type = 'video_view_end' THEN video_duration_ms END) AS d,
    coalesce(min(CASE WHEN event_type = 'video_view_start' THEN source END), 'other') AS src,
    bool_or(event_type = 'video_view_end') AS he
  FROM ev WHERE event_type IN ('video_view_start', 'video_view_end') GROUP BY view_id),
views AS (SELECT creator_id, CAST(coalesce(st, et) AS DATE) AS date, count(*) AS views,
    count(DISTINCT user_id) AS uv, count(*) FILTER (WHERE he AND w >= 3000) AS engaged,
    coalesce(sum(w), 0) AS watch, avg(w) FILTER (WHERE he) AS avgd,
    avg(least(w / d, 1.0)) FILTER (WHERE he) AS avgp, count(*) FILTER (WHERE he AND w >= 0.98 * d) AS comp,
    count(*) FILTER (WHERE src = 'feed') AS vf, count(*) FILTER (WHERE src = 'profile') AS vp,
    count(*) FILTER (WHERE src = 'share') AS vs, count(*) FILTER (WHERE src = 'search') AS vq,
    count(*) FILTER (WHERE src = 'hashtag') AS vh, count(*) FILTER (WHERE src = 'audio') AS va,
    count(*) FILTER (WHERE src = 'other') AS vo
  FROM v GROUP BY 1, 2),
lt AS (SELECT creator_id, CAST(event_time AS DATE) AS date,
    count(*) FILTER (WHERE event_type = 'like' AND (prev IS NULL OR prev = 'unlike')) AS la,
    count(*) FILTER (WHERE event_type = 'unlike' AND prev = 'like') AS lr
  FROM (SELECT *, lag(event_type) OVER (PARTITION BY user_id, video_id ORDER BY event_time, event_id) AS prev
        FROM ev WHERE event_type IN ('like', 'unlike')) GROUP BY 1, 2),
ft AS (SELECT creator_id, CAST(event_time AS DATE) AS date,
    count(*) FILTER (WHERE event_type = 'follow_creator' AND (prev IS NULL OR prev = 'unfollow_creator')) AS fg,
    count(*) FILTER (WHERE event_type = 'unfollow_creator' AND prev = 'follow_creator') AS fl
  FROM (SELECT *, lag(event_type) OVER (PARTITION BY user_id, creator_id ORDER BY event_time, event_id) AS prev
        FROM ev WHERE event_type IN ('follow_creator', 'unfollow_creator')) GROUP BY 1, 2),
eng AS (SELECT creator_id, CAST(event_time AS DATE) AS date,
    count(DISTINCT share_id) FILTER (WHERE event_type = 'share') AS sh,
    count(*) FILTER (WHERE event_type = 'comment') AS co
  FROM ev WHERE event_type IN ('share', 'comment') GROUP BY 1, 2),
act AS (SELECT DISTINCT creator_id, CAST(event_time AS DATE) AS date FROM ev WHERE creator_id IS NOT NULL
        UNION SELECT creator_id, date FROM views)
SELECT a.creator_id, a.date, coalesce(views, 0) AS views, coalesce(uv, 0), coalesce(engaged, 0),
  coalesce(watch, 0), avgd, avgp, coalesce(comp, 0), coalesce(la, 0), coalesce(lr, 0),
  coalesce(sh, 0), coalesce(co, 0), coalesce(fg, 0), coalesce(fl, 0),
  CASE WHEN coalesce(views, 0) > 0 THEN (coalesce(la, 0) - coalesce(lr, 0) + coalesce(co, 0) + coalesce(sh, 0)) / views END,
  vf, vp, vs, vq, vh, va, vo
FROM act a LEFT JOIN views USING (creator_id, date) LEFT JOIN lt USING (creator_id, date)
  LEFT JOIN ft USING (creator_id, date) LEFT JOIN eng USING (creator_id, date)
"""
n = con.execute(f"SELECT count(*) FROM read_parquet('{src}')").fetchone()[0]
print(json.dumps({"version": duckdb.__version__, "events": n}), flush=True)
for line in sys.stdin:
    con.execute("DROP TABLE IF EXISTS agg")
    t = time.time()
    con.execute(f"CREATE TABLE agg AS {q}").fetchall()
    s = time.time() - t
    r = con.execute("SELECT count(*), sum(views) FROM agg").fetchone()
    print(json.dumps({"s": s, "rows": r[0], "views": r[1]}), flush=True)
"#;

/// DuckDB (the Python package) in a process of its own, kept open between runs of
/// [`DUCK_DAILY`]'s query, so that they run right after reelhouse's rebuilds, on the same
/// events, while the server is still up.
struct DuckDaily {
    child: std::process::Child,
    stdin: std::process::ChildStdin,
    lines: std::io::Lines<std::io::BufReader<std::process::ChildStdout>>,
    /// The first line: DuckDB's version and the events it sees.
    about: serde_json::Value,
}

impl DuckDaily {
    /// Starts DuckDB on `data_dir`'s events; `None`, with a note on stderr, when Python or
    /// its `duckdb` package is missing or the script fails.
    fn start(data_dir: &std::path::Path) -> Option<DuckDaily> {
        use std::io::BufRead;
        use std::process::{Command, Stdio};
        let spawned = Command::new("python3")
            .arg("-c")
            .arg(DUCK_DAILY)
            .arg(data_dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn();
        let mut child = match spawned {
            Ok(c) => c,
            Err(e) => {
                eprintln!("DuckDB comparison skipped: cannot run python3 ({e})");
                return None;
            }
        };
        let stdin = child.stdin.take()?;
        let mut lines = std::io::BufReader::new(child.stdout.take()?).lines();
        let first = lines.next().and_then(|l| l.ok());
        match first.and_then(|l| serde_json::from_str(&l).ok()) {
            Some(about) => Some(DuckDaily {
                child,
                stdin,
                lines,
                about,
            }),
            None => {
                drop(stdin);
                let out = child.wait_with_output().ok();
                let err = out
                    .map(|o| String::from_utf8_lossy(&o.stderr).into_owned())
                    .unwrap_or_default();
                python_failed(&err);
                None
            }
        }
    }

    /// Runs the query once: (seconds, rows); `None` when DuckDB failed.
    fn run(&mut self) -> Option<(f64, u64)> {
        use std::io::Write;
        writeln!(self.stdin, "run").ok()?;
        self.stdin.flush().ok()?;
        let line = self.lines.next()?.ok()?;
        let v: serde_json::Value = serde_json::from_str(&line).ok()?;
        Some((v["s"].as_f64()?, v["rows"].as_u64()?))
    }

    /// Ends the process; the result for the JSON output, from `runs`.
    fn finish(self, runs: &[(f64, u64)]) -> serde_json::Value {
        let DuckDaily {
            mut child,
            stdin,
            about,
            ..
        } = self;
        drop(stdin);
        let _ = child.wait();
        let secs: Vec<f64> = runs.iter().map(|r| r.0).collect();
        json!({
            "version": about["version"],
            "events": about["events"],
            "agg_s": median(&secs),
            "runs_s": secs,
            "rows": runs.first().map(|r| r.1),
            "runs_follow_the_reelhouse_rewrites": true,
        })
    }
}

/// The median of `v` (the mean of the two middle values of an even count); 0 for none.
fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// How many tables of `after` have the same version as in `before`: not written.
fn unwritten_tables(
    before: &reelhouse_warehouse::Report,
    after: &reelhouse_warehouse::Report,
) -> usize {
    after
        .tables
        .iter()
        .filter(|t| t.version.is_some())
        .filter(|t| {
            let prev = before.tables.iter().find(|f| f.table == t.table);
            prev.and_then(|f| f.version) == t.version
        })
        .count()
}
/// Times `resolve` + `cascades` (the work of one rebuild after the shares are read) on
/// synthetic forests, shuffled so children often come before their parents.
fn cascades(b: CascadeBench) -> Result<()> {
    use rand::seq::SliceRandom;
    use rand::{Rng, SeedableRng};
    use reelhouse_warehouse::cascade::{cascades, resolve, Share};
    warn_if_debug();
    let mut rng = rand::rngs::StdRng::seed_from_u64(b.seed);
    let share = |id: usize, parent: Option<usize>, video: i64| Share {
        share_id: format!("sh-{id:08x}"),
        parent_share_id: parent.map(|p| format!("sh-{p:08x}")),
        user_id: id as i64,
        video_id: video,
        creator_id: 1,
        time_us: id as i64 * 1000,
        channel: None,
        event_date: 0,
    };
    let run = |name: &str, mut shares: Vec<Share>, seed: u64| -> Result<serde_json::Value> {
        shares.shuffle(&mut rand::rngs::StdRng::seed_from_u64(seed));
        let t = Instant::now();
        let forest = resolve(&shares);
        let trees = cascades(&shares, &forest, &[]);
        let s = t.elapsed().as_secs_f64();
        let deepest = trees.iter().map(|c| c.depth).max().unwrap_or(0);
        let v = trees
            .iter()
            .map(|c| c.structural_virality)
            .fold(0.0, f64::max);
        println!(
            "  {name:<28} {:>9} nodes, {:>7} cascades: {:>8.1} ms = {:>10.0} nodes/s (max depth {deepest}, max virality {v:.2})",
            shares.len(), trees.len(), s * 1000.0, shares.len() as f64 / s
        );
        Ok(
            json!({"nodes": shares.len(), "cascades": trees.len(), "seconds": s,
                  "nodes_per_s": shares.len() as f64 / s, "max_depth": deepest,
                  "max_structural_virality": v}),
        )
    };
    println!("share cascades: resolve parents + metrics incl. structural virality (one thread)");
    // One big tree: each node's parent is a random earlier node (expected depth ~ ln n), and a
    // preferential chain part so the tree is also deep.
    let big: Vec<Share> = (0..b.big)
        .map(|i| {
            let parent = (i > 0).then(|| {
                if rng.gen_bool(0.3) {
                    i - 1
                } else {
                    rng.gen_range(0..i)
                }
            });
            share(i, parent, 1)
        })
        .collect();
    let big = run("one big cascade", big, b.seed)?;
    let mut small = Vec::new();
    for c in 0..b.small {
        let n = rng.gen_range(5..=20);
        let base = small.len();
        for k in 0..n {
            let parent = (k > 0).then(|| base + rng.gen_range(0..k));
            small.push(share(base + k, parent, c as i64));
        }
    }
    let small = run("many small cascades", small, b.seed)?;
    write_result(
        &b.out,
        json!({"benchmark": "cascades", "big": big, "small": small}),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The fault counter is `minflt` (not another field): touching 64 MB of fresh memory
    /// raises it by about one fault per 4 kB page touched (far fewer with huge pages, so the
    /// bound is loose; `cminflt` and `majflt` stay put), and busy work advances the CPU time.
    #[test]
    fn proc_stat_counts_faults_and_cpu_time() {
        let (faults, cpu) = (process_minor_faults().unwrap(), process_cpu_s().unwrap());
        let mut v: Vec<u8> = Vec::with_capacity(64 << 20);
        for i in (0..v.capacity()).step_by(4096) {
            v.spare_capacity_mut()[i].write(1);
        }
        let touched = process_minor_faults().unwrap() - faults;
        assert!(touched >= 30, "{touched} faults for 16384 fresh pages");
        // 200M dependent multiply-adds: at least 0.2 s of CPU (about 2 s in the dev profile)
        // however loaded the machine is, since CPU time counts only while the thread runs;
        // the clock ticks every 10 ms.
        let mut x = 0u64;
        for _ in 0..200_000_000u64 {
            x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(7));
        }
        let spent = process_cpu_s().unwrap() - cpu;
        assert!(spent >= 0.03, "{spent} s of CPU for 200M multiply-adds");
        drop(v);
    }
}
