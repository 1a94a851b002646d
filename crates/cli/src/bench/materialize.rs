//! `bench materialize`: warehouse rebuild rate, `agg_creator_daily` alone in memory, a late
//! trickle, a one-day restatement and dashboard latency, beside DuckDB computing
//! `agg_creator_daily` from the same Parquet files in the same run.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Result;
use clap::Args;
use reelhouse_server::ServerConfig;
use reelhouse_workload::WorkloadConfig;
use serde_json::json;

use crate::send::percentile;
use crate::DataArgs;

use super::common::*;

#[derive(Args)]
pub(crate) struct MaterializeBench {
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

pub(crate) async fn materialize(b: MaterializeBench) -> Result<()> {
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
    let mut config = ServerConfig::new(data.engine_config(), "127.0.0.1:0".parse()?);
    config.materialize_interval = None;
    let server = reelhouse_server::start(config).await?;
    for body in w.bodies(20_000) {
        server
            .engine
            .ingest(&body, reelhouse_engine::IngestPath::Bulk)
            .await?;
    }
    drop(w);
    server.engine.flush().await?;
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
    let report = server.engine.materialize().await?;
    let (first_s, first_cpu) = (t.elapsed().as_secs_f64(), cpu_since(cpu));
    let mut duck = DuckDaily::start(&data.data_dir);
    let (mut rewrites, mut rewrites_cpu, mut duck_runs) = (Vec::new(), Vec::new(), Vec::new());
    let mut rewrites_faults = Vec::new();
    let mut before = report.clone();
    for _ in 0..b.rounds {
        let (t, cpu, faults) = (Instant::now(), process_cpu_s(), process_minor_faults());
        let r = server.engine.materialize_full_rewriting().await?;
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
    let r = server.engine.materialize_full().await?;
    let (unchanged_s, unchanged_cpu) = (t.elapsed().as_secs_f64(), cpu_since(cpu));
    let kept = unwritten_tables(&before, &r);
    let full_s = median(&rewrites);
    // The same aggregation as DuckDB's: agg_creator_daily from the events Parquet files, in
    // memory, with the models it needs (three runs; the median is reported).
    let mut same = Vec::new();
    for _ in 0..3 {
        let catalog = server.engine.catalog().await?;
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
            .engine
            .ingest(&body, reelhouse_engine::IngestPath::Bulk)
            .await?;
    }
    let t = Instant::now();
    let trickle_report = server.engine.materialize().await?;
    let trickle_s = t.elapsed().as_secs_f64();
    let trickle_dates = trickle_report.dates.as_ref().map_or(0, Vec::len);
    server.engine.flush().await?;
    // One whole day rebuilt on its own: restating a date makes it the only dirty one. The
    // busiest date (the earliest of equals), so the step rebuilds a full day whatever the
    // spread: with `--days 1` most dates hold only a few late events.
    let (day, day_events) = {
        let c = server.engine.catalog().await?;
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
    let day_report = server.engine.restate(day, day).await?;
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
    let catalog = server.engine.catalog().await?;
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
pub(crate) const DUCK_DAILY: &str = r#"
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
pub(crate) struct DuckDaily {
    child: std::process::Child,
    stdin: std::process::ChildStdin,
    lines: std::io::Lines<std::io::BufReader<std::process::ChildStdout>>,
    /// The first line: DuckDB's version and the events it sees.
    about: serde_json::Value,
}

impl DuckDaily {
    /// Starts DuckDB on `data_dir`'s events; `None`, with a note on stderr, when Python or
    /// its `duckdb` package is missing or the script fails.
    pub(crate) fn start(data_dir: &std::path::Path) -> Option<DuckDaily> {
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
    pub(crate) fn run(&mut self) -> Option<(f64, u64)> {
        use std::io::Write;
        writeln!(self.stdin, "run").ok()?;
        self.stdin.flush().ok()?;
        let line = self.lines.next()?.ok()?;
        let v: serde_json::Value = serde_json::from_str(&line).ok()?;
        Some((v["s"].as_f64()?, v["rows"].as_u64()?))
    }

    /// Ends the process; the result for the JSON output, from `runs`.
    pub(crate) fn finish(self, runs: &[(f64, u64)]) -> serde_json::Value {
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
pub(crate) fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// How many tables of `after` have the same version as in `before`: not written.
pub(crate) fn unwritten_tables(
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
