//! `bench ingest`: HTTP ingest with durable acks from several concurrent clients on loopback
//! (events/s, ack latency percentiles), the Delta commit of what was sent, bytes per event
//! stored in `events`; then DuckDB `read_ndjson` loading the same NDJSON file (and writing
//! it as zstd Parquet, for a bytes-per-event reference).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::Args;
use reelhouse_server::ServerConfig;
use reelhouse_workload::WorkloadConfig;
use serde_json::json;

use crate::send::{percentile, send_all};
use crate::DataArgs;

use super::common::*;

#[derive(Args)]
pub(crate) struct IngestBench {
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

pub(crate) async fn ingest(b: IngestBench) -> Result<()> {
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
    let server = reelhouse_server::start(ServerConfig::new(data.engine_config(), listen)).await?;
    let url = format!("http://{}", server.addr);
    let report = send_all(&url, bodies, b.clients, Arc::new(|_| {})).await?;
    let fsyncs = server.engine.stats().wal_fsyncs;
    let t = Instant::now();
    server.engine.flush().await?;
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
