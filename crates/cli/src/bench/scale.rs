//! `bench scale`: what each step costs as one day grows (1M, 4M, 16M events by default), so
//! that "proportional to what arrives" can be read off a curve instead of one point.
//!
//! ```text
//!  per size N:  generate N / 0.9 + trickle lines of one day in arrival order; the first N
//!               are the day so far, the trickle the stream's next lines (the file's last
//!               lines would be late arrivals); N × late-share late events over the past week
//!    ingest N ─▶ materialize --full ─▶ DuckDB agg_creator_daily over the same files (peer)
//!    ingest trickle ─▶ materialize        (the live trickle: what arrives next)
//!    ingest late    ─▶ materialize        (a late trickle spread over the past week)
//!    serve ─▶ dashboard p50 / p99 (busiest creator, all its days)
//! ```
//!
//! Every step runs as its own `reelhouse` process (the one running this bench), as a user
//! runs it, so each step's wall time includes opening the data directory; its peak RSS is
//! the process's `VmHWM`, which the process writes at exit to the file named by
//! `REELHOUSE_PEAK_RSS_FILE`. Bytes per event are the live `events` files over the rows.
//! `bench/plot_scale.py` draws the committed result as a PNG.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use serde_json::{json, Value};

use super::common::{warn_if_debug, write_result};
use super::materialize::{median, DuckDaily};
use crate::send::percentile;

#[derive(Args)]
pub(crate) struct ScaleBench {
    /// Events of each one-day data set, comma-separated.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "1000000,4000000,16000000"
    )]
    sizes: Vec<usize>,
    /// Events of the live trickle: the stream's next events of the same day.
    #[arg(long, default_value_t = 5_000)]
    trickle: usize,
    /// Late events, as a share of the day's, spread over the past week.
    #[arg(long, default_value_t = 0.01)]
    late_share: f64,
    /// Dashboard requests per size.
    #[arg(long, default_value_t = 500)]
    dashboard_requests: usize,
    /// Where the data sets are made (default: a temporary directory); each size's is removed
    /// after it is measured unless --keep.
    #[arg(long)]
    work_dir: Option<PathBuf>,
    /// Keep each size's files and data directory.
    #[arg(long)]
    keep: bool,
    /// Skip DuckDB's run of agg_creator_daily on each size's events.
    #[arg(long)]
    no_duckdb: bool,
    #[arg(long, default_value = "bench/results/scale.json")]
    out: PathBuf,
}

/// One step run as a child process: wall time and the child's peak RSS.
struct Step {
    seconds: f64,
    peak_rss_bytes: Option<u64>,
    stdout: String,
}

/// Runs `reelhouse ARGS` (this executable) and measures it.
fn run_step(work: &Path, name: &str, args: &[&str]) -> Result<Step> {
    let exe = std::env::current_exe().context("finding the reelhouse executable")?;
    let rss_file = work.join(format!("{name}.peak_rss"));
    let _ = std::fs::remove_file(&rss_file);
    let started = Instant::now();
    let out = std::process::Command::new(exe)
        .args(args)
        .env("REELHOUSE_PEAK_RSS_FILE", &rss_file)
        .env_remove("REELHOUSE_DATA_DIR")
        .stdin(std::process::Stdio::null())
        .output()
        .with_context(|| format!("running {name}"))?;
    let seconds = started.elapsed().as_secs_f64();
    if !out.status.success() {
        bail!(
            "step {name} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let peak_rss_bytes = std::fs::read_to_string(&rss_file)
        .ok()
        .and_then(|s| s.trim().parse().ok());
    Ok(Step {
        seconds,
        peak_rss_bytes,
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
    })
}

fn step_json(s: &Step) -> Value {
    json!({"seconds": s.seconds, "peak_rss_bytes": s.peak_rss_bytes})
}

/// Where in a generated day the live trickle is cut: after this share of its lines.
const LIVE_AT: f64 = 0.9;

/// Writes the first `head` lines of `from` to `a` and the `next` lines after them to `b`.
fn split_lines(from: &Path, head: usize, next: usize, a: &Path, b: &Path) -> Result<()> {
    use std::io::{BufRead, Write};
    let input = std::io::BufReader::new(std::fs::File::open(from)?);
    let mut first = std::io::BufWriter::new(std::fs::File::create(a)?);
    let mut rest = std::io::BufWriter::new(std::fs::File::create(b)?);
    for (i, line) in input.split(b'\n').enumerate().take(head + next) {
        let line = line?;
        let out = if i < head { &mut first } else { &mut rest };
        out.write_all(&line)?;
        out.write_all(b"\n")?;
    }
    first.flush()?;
    rest.flush()?;
    Ok(())
}

/// Rows and live bytes of `events` in `data_dir`.
async fn events_size(data_dir: &Path) -> Result<(u64, u64)> {
    let lake = reelhouse_lake::Lake::open(data_dir)?;
    let Some(t) = lake.load(reelhouse_lake::RawTable::Events).await? else {
        return Ok((0, 0));
    };
    let bytes = reelhouse_lake::live_bytes(&t).await?;
    let catalog = reelhouse_engine::read_only_view(data_dir, None).await?;
    let rows = catalog.query("SELECT count(*) FROM events").await?;
    let rows = reelhouse_warehouse::ints_of(&rows);
    Ok((rows.first().copied().unwrap_or(0) as u64, bytes))
}

/// The creator with the most views, and the dashboard's p50 / p99 over `n` requests of all
/// their days, from a `reelhouse serve` of `data_dir`.
async fn dashboard_latency(work: &Path, data_dir: &Path, n: usize) -> Result<Value> {
    let catalog = reelhouse_engine::read_only_view(data_dir, None).await?;
    let top = catalog
        .query(
            "SELECT CAST(creator_id AS INT) AS c FROM agg_creator_daily GROUP BY creator_id \
             ORDER BY sum(views) DESC, c LIMIT 1",
        )
        .await?;
    let Some(creator) = reelhouse_warehouse::ints_of(&top).first().copied() else {
        return Ok(Value::Null);
    };
    drop(catalog);
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let exe = std::env::current_exe()?;
    let mut child = std::process::Command::new(exe)
        .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
        .arg("--data-dir")
        .arg(data_dir)
        .env("REELHOUSE_PEAK_RSS_FILE", work.join("serve.peak_rss"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()?;
    let base = format!("http://127.0.0.1:{port}");
    let client = reqwest::Client::new();
    let started = Instant::now();
    let deadline = started + Duration::from_secs(600);
    let result = async {
        loop {
            if client
                .get(format!("{base}/v1/health/live"))
                .send()
                .await
                .is_ok()
            {
                break;
            }
            if Instant::now() > deadline {
                bail!("the server did not start within 10 minutes");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let start_s = started.elapsed().as_secs_f64();
        let url = format!("{base}/v1/creators/{creator}/dashboard");
        let mut us = Vec::with_capacity(n);
        for _ in 0..n {
            let t = Instant::now();
            let r = client.get(&url).send().await?;
            if !r.status().is_success() {
                bail!("dashboard answered {}", r.status());
            }
            r.bytes().await?;
            us.push(t.elapsed().as_micros() as u64);
        }
        us.sort_unstable();
        Ok(json!({
            "creator_id": creator,
            "server_start_s": start_s,
            "requests": n,
            "p50_ms": percentile(&us, 50.0) as f64 / 1000.0,
            "p99_ms": percentile(&us, 99.0) as f64 / 1000.0,
        }))
    }
    .await;
    let _ = child.kill();
    let _ = child.wait();
    result
}

pub(crate) async fn scale(b: ScaleBench) -> Result<()> {
    warn_if_debug();
    if !(0.0..=1.0).contains(&b.late_share) {
        bail!("--late-share must be between 0 and 1");
    }
    let tmp;
    let root = match &b.work_dir {
        Some(d) => {
            std::fs::create_dir_all(d)?;
            d.clone()
        }
        None => {
            tmp = tempfile::tempdir()?;
            tmp.path().to_path_buf()
        }
    };
    let mut results = Vec::new();
    let mut table = vec![format!(
        "{:>10} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>8} {:>8} {:>8} {:>7}",
        "events",
        "ingest/s",
        "full s",
        "mem s",
        "duck s",
        "trickle s",
        "late s",
        "open s",
        "full GB",
        "mem GB",
        "trick GB",
        "B/event"
    )];
    for &n in &b.sizes {
        let work = root.join(format!("day-{n}"));
        std::fs::create_dir_all(&work)?;
        let data = work.join("data");
        let data_s = data.to_string_lossy().into_owned();
        let (all, day, trickle, late) = (
            work.join("all.ndjson"),
            work.join("day.ndjson"),
            work.join("trickle.ndjson"),
            work.join("late.ndjson"),
        );
        eprintln!("[{n} events] generating…");
        // The day is the first `n` lines of a file of n / LIVE_AT + trickle lines (in
        // arrival order): the day so far; the trickle is the stream's next lines. (A file's
        // last lines arrive after its last event time: mostly late events.)
        let total = ((n as f64 / LIVE_AT).ceil() as usize + b.trickle).to_string();
        run_step(
            &work,
            "generate",
            &[
                "generate",
                "--events",
                &total,
                "--days",
                "1",
                "--seed",
                "7",
                "--out",
                &all.to_string_lossy(),
            ],
        )?;
        split_lines(&all, n, b.trickle, &day, &trickle)?;
        std::fs::remove_file(&all)?;
        let late_n = ((n as f64) * b.late_share).round().max(1.0) as usize;
        let late_end = (chrono::Utc::now() - chrono::Duration::days(1)).to_rfc3339();
        run_step(
            &work,
            "generate-late",
            &[
                "generate",
                "--events",
                &late_n.to_string(),
                "--days",
                "7",
                "--seed",
                "8",
                "--end",
                &late_end,
                "--out",
                &late.to_string_lossy(),
            ],
        )?;
        let ingest = |name: &'static str, file: &Path| {
            let file = file.to_string_lossy().into_owned();
            let data_s = data_s.clone();
            let work = work.clone();
            move || run_step(&work, name, &["ingest", &file, "--data-dir", &data_s])
        };
        let mat = |name: &'static str, full: bool| {
            let data_s = data_s.clone();
            let work = work.clone();
            move || {
                let mut args = vec!["materialize", "--data-dir", data_s.as_str()];
                if full {
                    args.push("--full");
                }
                run_step(&work, name, &args)
            }
        };
        eprintln!("[{n} events] bulk ingest…");
        let s_ingest = ingest("ingest", &day)()?;
        eprintln!("[{n} events] full rebuild…");
        let s_full = mat("materialize-full", true)()?;
        // The same full rebuild in memory (one bucket), beside it: the rate and memory the
        // buckets trade.
        eprintln!("[{n} events] full rebuild in memory…");
        let s_full_memory = run_step(
            &work,
            "materialize-full-in-memory",
            &[
                "materialize",
                "--data-dir",
                data_s.as_str(),
                "--full",
                "--rebuild-bucket-events",
                "1000000000000",
            ],
        )?;
        let duck = if b.no_duckdb {
            None
        } else {
            DuckDaily::start(&data).map(|mut d| {
                let runs: Vec<(f64, u64)> = (0..3).filter_map(|_| d.run()).collect();
                d.finish(&runs)
            })
        };
        let (rows, bytes) = events_size(&data).await?;
        eprintln!("[{n} events] trickle of {}…", b.trickle);
        let s_trickle_ingest = ingest("ingest-trickle", &trickle)()?;
        let s_trickle = mat("materialize-trickle", false)()?;
        eprintln!("[{n} events] late trickle of {late_n}…");
        let s_late_ingest = ingest("ingest-late", &late)()?;
        let s_late = mat("materialize-late", false)()?;
        eprintln!("[{n} events] dashboard…");
        let dash = dashboard_latency(&work, &data, b.dashboard_requests).await?;
        let gb = |s: &Step| s.peak_rss_bytes.map_or(f64::NAN, |b| b as f64 / 1e9);
        let duck_s = duck
            .as_ref()
            .and_then(|d| d["agg_s"].as_f64())
            .unwrap_or(f64::NAN);
        table.push(format!(
            "{:>10} {:>9.0} {:>9.2} {:>9.2} {:>9.2} {:>9.2} {:>9.2} {:>9.2} {:>8.2} {:>8.2} {:>8.2} {:>7.1}",
            n,
            n as f64 / s_ingest.seconds,
            s_full.seconds,
            s_full_memory.seconds,
            duck_s,
            s_trickle.seconds,
            s_late.seconds,
            s_trickle_ingest.seconds,
            gb(&s_full),
            gb(&s_full_memory),
            gb(&s_trickle),
            bytes as f64 / rows.max(1) as f64,
        ));
        eprintln!("{}", table.last().map(String::as_str).unwrap_or(""));
        results.push(json!({
            "events": n,
            "events_stored": rows,
            "events_bytes": bytes,
            "bytes_per_event": bytes as f64 / rows.max(1) as f64,
            "ingest": step_json(&s_ingest),
            "ingest_events_per_s": n as f64 / s_ingest.seconds,
            "materialize_full": step_json(&s_full),
            "materialize_full_output": s_full.stdout.trim(),
            "materialize_full_in_memory": step_json(&s_full_memory),
            "materialize_full_in_memory_output": s_full_memory.stdout.trim(),
            "duckdb_agg_creator_daily": duck,
            "trickle_events": b.trickle,
            "ingest_trickle": step_json(&s_trickle_ingest),
            "materialize_trickle": step_json(&s_trickle),
            "materialize_trickle_output": s_trickle.stdout.trim(),
            "trickle_share_of_full": s_trickle.seconds / s_full.seconds,
            "late_events": late_n,
            "ingest_late": step_json(&s_late_ingest),
            "materialize_late": step_json(&s_late),
            "materialize_late_output": s_late.stdout.trim(),
            "dashboard": dash,
        }));
        if !b.keep {
            std::fs::remove_dir_all(&work)?;
        }
    }
    println!("{}", table.join("\n"));
    let first = results.first().cloned().unwrap_or(Value::Null);
    let last = results.last().cloned().unwrap_or(Value::Null);
    let ratio = |k: &str, f: &dyn Fn(&Value) -> Option<f64>| {
        json!({k: match (f(&first), f(&last)) {
            (Some(a), Some(z)) if a > 0.0 => Some(z / a),
            _ => None,
        }})
    };
    let growth = [
        ratio("materialize_trickle_s", &|v| {
            v["materialize_trickle"]["seconds"].as_f64()
        }),
        ratio("materialize_full_peak_rss", &|v| {
            v["materialize_full"]["peak_rss_bytes"].as_f64()
        }),
        ratio("ingest_trickle_s", &|v| {
            v["ingest_trickle"]["seconds"].as_f64()
        }),
    ];
    let medians: Vec<f64> = results
        .iter()
        .filter_map(|r| r["trickle_share_of_full"].as_f64())
        .collect();
    write_result(
        &b.out,
        json!({
            "benchmark": "scale",
            "sizes": b.sizes,
            "results": results,
            "growth_largest_over_smallest": growth,
            "trickle_share_of_full_median": (!medians.is_empty()).then(|| median(&medians)),
            "table": table,
        }),
    )
}
