//! `reelhouse demo`: the README's first command. Generates a realistic workload, starts the
//! server in this process on loopback, sends the traffic over HTTP with several clients,
//! checks the server's counts against what the generator produced, commits to Delta and
//! prints a few SQL results.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use bytes::Bytes;
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use reelhouse_server::ServerConfig;
use reelhouse_workload::WorkloadConfig;

use crate::send::{percentile, print_table, send_all};
use crate::DataArgs;

#[derive(Args)]
pub struct DemoArgs {
    /// Data directory (default: a new directory under the system temp dir, kept afterwards).
    #[arg(long, env = "REELHOUSE_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Events to generate (duplicates and malformed lines included).
    #[arg(long, env = "REELHOUSE_EVENTS", default_value_t = 1_000_000)]
    events: usize,
    /// Random seed of the workload.
    #[arg(long, env = "REELHOUSE_SEED", default_value_t = 42)]
    seed: u64,
    /// Concurrent HTTP clients.
    #[arg(long, default_value_t = 4)]
    clients: usize,
    /// Events per HTTP request.
    #[arg(long, default_value_t = 5_000)]
    batch: usize,
    /// Address of the in-process server.
    #[arg(long, env = "REELHOUSE_LISTEN", default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// Keep serving after the demo until Ctrl-C.
    #[arg(long)]
    serve: bool,
}

pub async fn run(a: DemoArgs) -> Result<()> {
    let data_dir = match a.data_dir.clone() {
        Some(d) => {
            if d.exists() && std::fs::read_dir(&d)?.next().is_some() {
                eprintln!(
                    "note: {} is not empty; events from earlier runs count as duplicates",
                    d.display()
                );
            }
            d
        }
        None => tempfile::Builder::new()
            .prefix("reelhouse-demo-")
            .tempdir()?
            .keep(),
    };
    println!("reelhouse demo — data dir {}", data_dir.display());

    let t0 = Instant::now();
    let spinner =
        ProgressBar::new_spinner().with_message(format!("generating {} events…", a.events));
    spinner.enable_steady_tick(Duration::from_millis(120));
    let cfg = WorkloadConfig::new(a.events, a.seed, chrono::Utc::now().timestamp_millis());
    let workload = reelhouse_workload::generate(&cfg);
    spinner.finish_and_clear();
    let m = workload.manifest.clone();
    println!(
        "generated {} lines in {:.1}s: {} valid events, {} duplicates, {} malformed; {} late, {} out of order; {} users, {} videos, {} creators",
        m.lines,
        t0.elapsed().as_secs_f64(),
        m.valid_unique,
        m.duplicates,
        m.malformed,
        m.late,
        m.out_of_order,
        m.users,
        m.videos,
        m.creators
    );

    let data = DataArgs::defaults(data_dir.clone());
    let server = reelhouse_server::start(ServerConfig::new(data.engine_config(), a.listen)).await?;
    let url = format!("http://{}", server.addr);
    println!("server listening on {url}");

    let bodies: Vec<(Bytes, usize)> = workload
        .lines
        .chunks(a.batch.max(1))
        .map(|c| {
            let mut b = Vec::with_capacity(c.iter().map(|l| l.len() + 1).sum());
            for l in c {
                b.extend_from_slice(l.as_bytes());
                b.push(b'\n');
            }
            (Bytes::from(b), c.len())
        })
        .collect();
    drop(workload);
    let bar = ProgressBar::new(m.lines as u64).with_style(
        ProgressStyle::with_template("sending {bar:40} {pos}/{len} events {per_sec} ({eta})")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let b2 = bar.clone();
    let report = send_all(&url, bodies, a.clients, Arc::new(move |n| b2.inc(n))).await?;
    bar.finish_and_clear();
    let secs = report.elapsed.as_secs_f64();
    println!(
        "sent {} events in {} requests with {} clients in {:.1}s: {:.0} events/s, ack p50 {:.1} ms, p99 {:.1} ms (durable: fsynced before each 200)",
        m.lines,
        report.requests,
        a.clients,
        secs,
        m.lines as f64 / secs.max(1e-9),
        percentile(&report.latencies_us, 50.0) as f64 / 1000.0,
        percentile(&report.latencies_us, 99.0) as f64 / 1000.0,
    );
    println!();
    println!("            accepted  duplicates  rejected");
    println!(
        "server    {:>10}  {:>10}  {:>8}",
        report.accepted, report.duplicates, report.rejected
    );
    println!(
        "generator {:>10}  {:>10}  {:>8}",
        m.valid_unique, m.duplicates, m.malformed
    );
    let matches = report.accepted == m.valid_unique as u64
        && report.duplicates == m.duplicates as u64
        && report.rejected == m.malformed as u64;
    println!(
        "{}",
        if matches {
            "counts match ✓"
        } else {
            "COUNTS DIFFER ✗"
        }
    );
    println!();

    let t1 = Instant::now();
    let rows = server.engine.flush().await?;
    println!(
        "committed {rows} rows to Delta in {:.1}s",
        t1.elapsed().as_secs_f64()
    );

    let t2 = Instant::now();
    let report = server.engine.materialize().await?;
    let written: Vec<_> = report
        .tables
        .iter()
        .filter(|t| t.version.is_some())
        .collect();
    let rows: usize = written.iter().map(|t| t.rows).sum();
    println!(
        "materialized {} warehouse tables ({rows} rows) in {:.1}s",
        written.len(),
        t2.elapsed().as_secs_f64()
    );
    let catalog = server.engine.catalog().await?;
    for (title, q) in [
        ("rows per table", "SELECT 'events' AS table_name, count(*) AS rows FROM events UNION ALL SELECT 'quarantine', count(*) FROM quarantine ORDER BY 1"),
        ("events per type per day", "SELECT event_date, event_type, count(*) AS events FROM events GROUP BY event_date, event_type ORDER BY event_date, event_type"),
        ("top videos by views", "SELECT video_id, creator_id, count(DISTINCT view_id) AS views, round(avg(CASE WHEN watch_ms IS NOT NULL THEN least(watch_ms * 1.0 / video_duration_ms, 1.0) END) * 100, 1) AS avg_pct_viewed FROM events WHERE event_type IN ('video_view_start', 'video_view_end') GROUP BY video_id, creator_id ORDER BY views DESC LIMIT 10"),
        ("why events were rejected", "SELECT regexp_replace(reason, ' at line [0-9]+ column [0-9]+', '') AS reason, count(*) AS n FROM quarantine GROUP BY 1 ORDER BY n DESC, reason"),
    ] {
        let r = catalog.query_json(q, 1000).await?;
        println!("{title}:\n{}", print_table(&r.columns, &r.rows));
    }
    let top = catalog
        .query_json("SELECT creator_id, min(date), max(date) FROM agg_creator_daily GROUP BY 1 ORDER BY sum(views) DESC LIMIT 1", 1)
        .await?;
    if let Some(r) = top.rows.first() {
        let (creator, from, to) = (
            &r[0],
            r[1].as_str().unwrap_or(""),
            r[2].as_str().unwrap_or(""),
        );
        let path = format!("/v1/creators/{creator}/dashboard?from={from}&to={to}");
        let d: serde_json::Value = reqwest::get(format!("{url}{path}")).await?.json().await?;
        println!("creator dashboard (GET {path}):");
        let cols: Vec<String> = [
            "date",
            "views",
            "unique_viewers",
            "watch_time_ms",
            "avg_percent_viewed",
            "likes_added",
            "followers_gained",
            "engagement_rate",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let mut rows: Vec<Vec<serde_json::Value>> = d["days"]
            .as_array()
            .map(|days| {
                days.iter()
                    .map(|day| cols.iter().map(|c| day[c].clone()).collect())
                    .collect()
            })
            .unwrap_or_default();
        let mut total: Vec<serde_json::Value> =
            cols.iter().map(|c| d["totals"][c].clone()).collect();
        total[0] = "total".into();
        rows.push(total);
        print!("{}", print_table(&cols, &rows));
        println!("followers now: {}\n", d["followers"]);
    }
    if let Some(c) = top.rows.first().map(|r| r[0].clone()) {
        println!("web dashboard: {url}/?creator={c}");
    }
    println!("query it yourself:");
    println!("  curl -s {url}/v1/sql -d '{{\"sql\":\"SELECT count(*) FROM events\"}}'");
    println!("  curl -s {url}/v1/ingest/lateness");
    println!(
        "  reelhouse sql --data-dir {} \"SELECT event_type, count(*) FROM events GROUP BY 1\"",
        data_dir.display()
    );
    println!("demo finished in {:.1}s", t0.elapsed().as_secs_f64());

    if a.serve {
        println!("serving {url} until Ctrl-C");
        crate::wait_for_signal().await;
    }
    server.shutdown().await?;
    if !matches {
        bail!("the server's counts differ from the generator's manifest");
    }
    Ok(())
}
