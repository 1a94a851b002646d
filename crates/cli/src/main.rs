//! The `reelhouse` binary: clap commands over the library crates.
//!
//! `serve` runs the HTTP API; `demo` generates traffic, sends it over HTTP to an in-process
//! server and shows what landed; `generate`, `ingest` and `sql` are the building blocks;
//! `bench` measures. Every flag also reads a `REELHOUSE_…` environment variable.

mod bench;
mod demo;
mod send;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use reelhouse_engine::{Engine, EngineConfig, Error as EngineError, IngestPath};
use reelhouse_event::SystemClock;
use reelhouse_server::ServerConfig;
use reelhouse_workload::WorkloadConfig;

#[derive(Parser)]
#[command(
    name = "reelhouse",
    version,
    about = "Analytics warehouse and real-time feature store for short-video events"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the HTTP API (ingest, SQL, health) on a data directory.
    Serve(ServeArgs),
    /// Generate ≥ 1M realistic events, send them over HTTP to an in-process server, show results.
    Demo(demo::DemoArgs),
    /// Write a seeded synthetic workload as NDJSON (plus FILE.manifest.json).
    Generate(GenerateArgs),
    /// Bulk-load NDJSON files (optionally .gz/.zst) through validation, dedup and quarantine.
    Ingest(IngestArgs),
    /// Run one read-only SQL statement and print the result as a table.
    Sql(SqlArgs),
    /// Rebuild the warehouse tables (facts, state, aggregates) from the events.
    Materialize(MaterializeArgs),
    /// Include events beyond the allowed lateness for dates FROM..=TO and rebuild.
    Restate(RestateArgs),
    /// Apply the retention policies now (the server also does it daily).
    Retention(RetentionArgs),
    /// Manage API tokens (README.md, HTTP API).
    Token(TokenArgs),
    /// Erase or anonymize one user everywhere (docs/privacy.md) and print the receipt.
    Forget(ForgetArgs),
    /// Compare the online feature store's totals with the warehouse; exit 1 on any difference.
    Check(CheckArgs),
    /// Measure system figures and write them to bench/results/.
    Bench(bench::BenchArgs),
}

/// Settings shared by everything that opens a data directory for writing.
#[derive(Args, Clone)]
pub struct DataArgs {
    /// Data directory holding the Delta tables and the write-ahead log; or s3://BUCKET/PREFIX
    /// for the tables on an S3-compatible store (credentials, region and endpoint from the
    /// usual AWS_* variables, e.g. AWS_ENDPOINT_URL and AWS_ALLOW_HTTP=true for MinIO).
    #[arg(long, env = "REELHOUSE_DATA_DIR", default_value = "./reelhouse-data")]
    pub data_dir: PathBuf,
    /// With --data-dir s3://…: the local directory for this process's write-ahead log, lock,
    /// feature snapshot and state files (the shared state files are mirrored next to the
    /// tables). Keep it on a persistent disk.
    #[arg(long, env = "REELHOUSE_STATE_DIR", default_value = "./reelhouse-state")]
    pub state_dir: PathBuf,
    /// Flush to Delta when this many acknowledged rows are waiting.
    #[arg(long, env = "REELHOUSE_FLUSH_ROWS", default_value_t = 1_000_000)]
    pub flush_rows: usize,
    /// Flush to Delta at least this often (milliseconds) while rows are waiting.
    #[arg(long, env = "REELHOUSE_FLUSH_INTERVAL_MS", default_value_t = 10_000)]
    pub flush_interval_ms: u64,
    /// Allowed lateness in days; event ids are deduplicated for at least this long.
    #[arg(long, env = "REELHOUSE_ALLOWED_LATENESS_DAYS", default_value_t = 7)]
    pub allowed_lateness_days: u64,
    /// Snapshot the online feature store at a flush once the last snapshot is this old
    /// (milliseconds); a restart replays the WAL written since.
    #[arg(long, env = "REELHOUSE_SNAPSHOT_INTERVAL_MS", default_value_t = 30_000)]
    pub snapshot_interval_ms: u64,
    /// Days of raw events kept (by event date).
    #[arg(long, env = "REELHOUSE_RETENTION_EVENTS_DAYS", default_value_t = 90)]
    pub retention_events_days: u32,
    /// Days of quarantined payloads kept (by received date).
    #[arg(
        long,
        env = "REELHOUSE_RETENTION_QUARANTINE_DAYS",
        default_value_t = 14
    )]
    pub retention_quarantine_days: u32,
    /// Days of facts kept (aggregates are kept without limit).
    #[arg(long, env = "REELHOUSE_RETENTION_FACTS_DAYS", default_value_t = 730)]
    pub retention_facts_days: u32,
    /// A full warehouse rebuild of more events than this runs in user buckets of about this
    /// many events each: its peak memory follows the bucket, not the events stored.
    #[arg(
        long,
        env = "REELHOUSE_REBUILD_BUCKET_EVENTS",
        default_value_t = reelhouse_warehouse::DEFAULT_BUCKET_EVENTS
    )]
    pub rebuild_bucket_events: usize,
}

impl DataArgs {
    /// The defaults of every flag, on `data_dir` (for in-process servers of demo and benches).
    pub fn defaults(data_dir: PathBuf) -> DataArgs {
        DataArgs {
            data_dir,
            state_dir: PathBuf::from("./reelhouse-state"),
            flush_rows: 1_000_000,
            flush_interval_ms: 10_000,
            allowed_lateness_days: 7,
            snapshot_interval_ms: 30_000,
            retention_events_days: 90,
            retention_quarantine_days: 14,
            retention_facts_days: 730,
            rebuild_bucket_events: reelhouse_warehouse::DEFAULT_BUCKET_EVENTS,
        }
    }

    pub fn engine_config(&self) -> EngineConfig {
        let (local, tables) = split_location(&self.data_dir, &self.state_dir);
        let mut c = EngineConfig::new(local, Arc::new(SystemClock));
        c.tables = tables;
        c.flush_rows = self.flush_rows;
        c.flush_interval = Duration::from_millis(self.flush_interval_ms);
        c.dedup_window = Duration::from_secs(self.allowed_lateness_days * 86_400);
        c.snapshot_interval = Duration::from_millis(self.snapshot_interval_ms);
        c.retention = reelhouse_engine::Retention {
            events_days: self.retention_events_days,
            quarantine_days: self.retention_quarantine_days,
            facts_days: self.retention_facts_days,
        };
        c.rebuild_bucket_events = self.rebuild_bucket_events;
        c
    }
}

#[derive(Args)]
struct ServeArgs {
    #[command(flatten)]
    data: DataArgs,
    /// Address to listen on (loopback only until API tokens are configured).
    #[arg(long, env = "REELHOUSE_LISTEN", default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// Largest request body in bytes (larger → 413).
    #[arg(long, env = "REELHOUSE_MAX_BODY_BYTES", default_value_t = 16 << 20)]
    max_body_bytes: usize,
    /// API tokens file (see `reelhouse token add`); without it the server is open and binds
    /// only to loopback.
    #[arg(long, env = "REELHOUSE_TOKENS")]
    tokens: Option<PathBuf>,
    /// Also serve read-only SQL over the Postgres wire protocol here (e.g. 127.0.0.1:5433),
    /// for psql and BI tools; the password is an admin or analyst API token.
    #[arg(long, env = "REELHOUSE_PG_LISTEN")]
    pg_listen: Option<SocketAddr>,
    /// What this process does: `all` (one node: local WAL, everything in-process), or one
    /// part of a deployment with a shared --log: `ingest` (validate, dedup, append to the
    /// log; no data directory), `materialize` (the one process that reads the log into the
    /// Delta tables, runs the warehouse, features and privacy requests), `serve` (a read-only
    /// API replica of the tables and features; run as many as needed). See docs/deploy.md.
    #[arg(long, env = "REELHOUSE_ROLE", value_enum, default_value_t = Role::All)]
    role: Role,
    /// The shared log for --role ingest|materialize|serve: nats://HOST:PORT[/STREAM]
    /// (NATS JetStream; the stream is created if missing, default name "reelhouse").
    #[arg(long, env = "REELHOUSE_LOG")]
    log: Option<String>,
    /// Redis as the online feature store: redis://[[USER]:PASSWORD@]HOST:PORT[/DB]. The
    /// materializer (or a one-node `all`) copies every changed feature record there; an API
    /// replica (`serve`) answers the feature endpoints from it and keeps no store of its own.
    #[arg(long, env = "REELHOUSE_ONLINE")]
    online: Option<String>,
}

/// `serve --role`.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Role {
    All,
    Ingest,
    Materialize,
    Serve,
}

#[derive(Args)]
struct GenerateArgs {
    /// Total lines to write (duplicates and malformed lines included).
    #[arg(long, env = "REELHOUSE_EVENTS", default_value_t = 1_000_000)]
    events: usize,
    /// Random seed; the same seed and --end give the same file.
    #[arg(long, env = "REELHOUSE_SEED", default_value_t = 42)]
    seed: u64,
    /// Output file (`.gz` or `.zst` compresses).
    #[arg(long, short)]
    out: PathBuf,
    /// Days of event time covered.
    #[arg(long, default_value_t = 3)]
    days: u32,
    /// Latest event time, RFC 3339 (default: now).
    #[arg(long)]
    end: Option<String>,
    /// Share of valid events that arrive 1 h – 3 d late.
    #[arg(long, default_value_t = 0.02)]
    late_fraction: f64,
    /// Share of lines that re-send an earlier event (same event_id).
    #[arg(long, default_value_t = 0.01)]
    duplicate_fraction: f64,
    /// Share of views whose end arrives before their start.
    #[arg(long, default_value_t = 0.02)]
    out_of_order_fraction: f64,
    /// Share of lines that break the contract.
    #[arg(long, default_value_t = 0.005)]
    malformed_fraction: f64,
}

#[derive(Args)]
struct IngestArgs {
    /// NDJSON files (plain, .gz or .zst). A load under 64 MiB leaves the online feature store
    /// untouched on disk: `serve` replays the load's WAL records into it at its next start.
    #[arg(required = true)]
    files: Vec<PathBuf>,
    #[command(flatten)]
    data: DataArgs,
    /// Lines per internal batch.
    #[arg(long, default_value_t = 10_000)]
    batch_lines: usize,
}

#[derive(Args)]
struct MaterializeArgs {
    #[command(flatten)]
    data: DataArgs,
    /// Recompute every date instead of only the dates that received events since the last
    /// rebuild (and the dates those affect).
    #[arg(long)]
    full: bool,
}

#[derive(Args)]
struct RetentionArgs {
    #[command(subcommand)]
    what: RetentionCommand,
}

#[derive(Subcommand)]
enum RetentionCommand {
    /// Drop expired partitions of events and quarantine, vacuum them, rebuild the warehouse.
    Apply {
        #[command(flatten)]
        data: DataArgs,
    },
}

async fn retention(a: RetentionArgs) -> Result<()> {
    let RetentionCommand::Apply { data } = a.what;
    let engine = Engine::open(data.engine_config()).await?;
    let spinner = ProgressBar::new_spinner().with_message("applying retention…");
    spinner.enable_steady_tick(Duration::from_millis(120));
    let r = engine.apply_retention().await?;
    engine.close().await;
    spinner.finish_and_clear();
    println!("{}", serde_json::to_string_pretty(&r)?);
    Ok(())
}

#[derive(Args)]
struct TokenArgs {
    #[command(subcommand)]
    what: TokenCommand,
}

#[derive(Subcommand)]
enum TokenCommand {
    /// Create a token with a role, store its SHA-256 in FILE and print the token once.
    Add {
        /// Tokens file (created if missing).
        #[arg(long, env = "REELHOUSE_TOKENS")]
        file: PathBuf,
        /// admin, ingest, analyst or creator:<id>.
        #[arg(long)]
        role: String,
        /// A label for the token (no secret).
        #[arg(long)]
        name: String,
    },
}

fn token(a: TokenArgs) -> Result<()> {
    use reelhouse_server::auth::{hash_token, Role, TokenEntry, TokenFile};
    let TokenCommand::Add { file, role, name } = a.what;
    if Role::parse(&role).is_none() {
        bail!("role must be admin, ingest, analyst or creator:<id>");
    }
    let mut tf: TokenFile = match std::fs::read(&file) {
        Ok(b) => serde_json::from_slice(&b).context("the tokens file is not valid JSON")?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => TokenFile::default(),
        Err(e) => return Err(e.into()),
    };
    let secret: [u8; 24] = rand::random();
    let token: String = format!(
        "rh_{}",
        secret
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    );
    tf.tokens.push(TokenEntry {
        name,
        sha256: hash_token(&token),
        role,
    });
    std::fs::write(&file, serde_json::to_vec_pretty(&tf)?)?;
    println!("{token}");
    eprintln!(
        "stored its SHA-256 in {}; the token is not shown again",
        file.display()
    );
    Ok(())
}

#[derive(Args)]
struct ForgetArgs {
    /// The user id.
    user: u64,
    /// `erase` removes every row and byte; `anonymize` swaps the id for a random surrogate.
    #[arg(long, value_parser = ["erase", "anonymize"])]
    mode: String,
    /// Ask a running server (e.g. http://127.0.0.1:8080) instead of opening --data-dir.
    #[arg(long, env = "REELHOUSE_URL")]
    url: Option<String>,
    #[command(flatten)]
    data: DataArgs,
}

#[derive(Args)]
struct CheckArgs {
    /// Ask a running server (e.g. http://127.0.0.1:8080) instead of opening --data-dir.
    #[arg(long, env = "REELHOUSE_URL")]
    url: Option<String>,
    #[command(flatten)]
    data: DataArgs,
}

#[derive(Args)]
struct RestateArgs {
    /// First date to restate, YYYY-MM-DD.
    #[arg(long)]
    from: String,
    /// Last date to restate (inclusive), YYYY-MM-DD.
    #[arg(long)]
    to: String,
    #[command(flatten)]
    data: DataArgs,
}

/// `--data-dir` as (local directory, tables URL): an `s3://` data dir keeps its tables there
/// and local files in `state_dir`.
fn split_location(data_dir: &Path, state_dir: &Path) -> (PathBuf, Option<String>) {
    let raw = data_dir.to_string_lossy();
    if raw.starts_with("s3://") || raw.starts_with("s3a://") {
        (state_dir.to_path_buf(), Some(raw.into_owned()))
    } else {
        (data_dir.to_path_buf(), None)
    }
}

#[derive(Args)]
struct SqlArgs {
    /// The statement (SELECT, WITH, EXPLAIN or SHOW).
    sql: String,
    /// Data directory to read, or s3://BUCKET/PREFIX (ignored with --url).
    #[arg(long, env = "REELHOUSE_DATA_DIR", default_value = "./reelhouse-data")]
    data_dir: PathBuf,
    /// With --data-dir s3://…: the local state directory (its WAL rows are read too).
    #[arg(long, env = "REELHOUSE_STATE_DIR", default_value = "./reelhouse-state")]
    state_dir: PathBuf,
    /// Query a running server instead, e.g. http://127.0.0.1:8080.
    #[arg(long, env = "REELHOUSE_URL")]
    url: Option<String>,
    /// Output as JSON instead of a table.
    #[arg(long)]
    json: bool,
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    // Our own events at info for the server; the Delta kernel's per-snapshot chatter only
    // when asked for with RUST_LOG.
    let default_filter = if matches!(cli.command, Command::Serve(_)) {
        "info,buoyant_kernel=warn,deltalake_core=warn,datafusion=warn"
    } else {
        "warn"
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter)),
        )
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(async move {
        match cli.command {
            Command::Serve(a) => serve(a).await,
            Command::Demo(a) => demo::run(a).await,
            Command::Generate(a) => generate(a),
            Command::Ingest(a) => ingest(a).await,
            Command::Sql(a) => sql(a).await,
            Command::Materialize(a) => materialize(a.data, None, a.full).await,
            Command::Restate(a) => {
                let range = reelhouse_server::parse_range(&a.from, &a.to)
                    .map_err(|e| anyhow::anyhow!(e.to_string()))?;
                materialize(a.data, Some(range), false).await
            }
            Command::Check(a) => check(a).await,
            Command::Forget(a) => forget(a).await,
            Command::Token(a) => token(a),
            Command::Retention(a) => retention(a).await,
            Command::Bench(a) => bench::run(a).await,
        }
    });
    if let Some(path) = std::env::var_os("REELHOUSE_PEAK_RSS_FILE") {
        // For `bench scale`, which runs each step as its own process.
        if let Some(bytes) = bench::peak_rss_bytes() {
            let _ = std::fs::write(path, bytes.to_string());
        }
    }
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn serve(a: ServeArgs) -> Result<()> {
    let mut config = ServerConfig::new(a.data.engine_config(), a.listen);
    config.max_body_bytes = a.max_body_bytes;
    config.pg_listen = a.pg_listen;
    if let Some(f) = &a.tokens {
        config.tokens =
            Arc::new(reelhouse_server::auth::Tokens::load(f).map_err(anyhow::Error::msg)?);
    }
    let log = match (a.role, &a.log) {
        (Role::All, None) => None,
        (Role::All, Some(_)) => bail!(
            "--log needs --role ingest, materialize or serve (--role all keeps its log in \
             the data directory)"
        ),
        (_, None) => bail!("--role ingest, materialize and serve need --log nats://HOST:PORT"),
        (_, Some(url)) => Some(Arc::<dyn reelhouse_log::EventLog>::from(
            reelhouse_log::open(url).await?,
        )),
    };
    if let Some(url) = &a.online {
        if a.role == Role::Ingest {
            bail!(
                "--online is for --role materialize, serve or all; ingest nodes hold no features"
            );
        }
        let redis = reelhouse_online::redis::RedisStore::connect(url)
            .await
            .context("--online: the online store is unreachable")?;
        config.engine.online = Some(Arc::new(redis));
    }
    if let (Role::Ingest, Some(log)) = (a.role, &log) {
        if a.pg_listen.is_some() {
            bail!("--pg-listen is served by --role serve or materialize, not by ingest nodes");
        }
        let node = reelhouse_server::start_ingest_node(config, Arc::clone(log)).await?;
        println!(
            "reelhouse ingest node on http://{} appending to {}",
            node.addr,
            log.describe()
        );
        wait_for_signal().await;
        eprintln!("shutting down: finishing in-flight batches…");
        node.shutdown().await;
        return Ok(());
    }
    config.follow = log.map(|log| reelhouse_server::Follow {
        log,
        writer: a.role == Role::Materialize,
        refresh_interval: Duration::from_secs(1),
    });
    let server = reelhouse_server::start(config).await?;
    let role = match a.role {
        Role::All => "one node",
        Role::Materialize => "materializer",
        Role::Serve => "API replica",
        Role::Ingest => "ingest node",
    };
    println!(
        "reelhouse serving http://{} as {role} (data dir {})",
        server.addr,
        a.data.data_dir.display()
    );
    if a.online.is_some() {
        println!("online features: {}", server.engine.online_backend());
    }
    if let Some(pg) = server.pg_addr {
        println!(
            "postgres wire protocol on {pg} (e.g. psql -h {} -p {} -U reelhouse)",
            pg.ip(),
            pg.port()
        );
    }
    if a.tokens.is_none() {
        println!("open mode: no API tokens configured; listening on loopback only");
    } else {
        println!("API tokens required (Authorization: Bearer <token>)");
    }
    wait_for_signal().await;
    eprintln!("shutting down: flushing acknowledged events to Delta…");
    let rows = server.shutdown().await?;
    eprintln!("flushed {rows} rows; bye");
    Ok(())
}

/// Resolves on SIGINT or SIGTERM.
pub async fn wait_for_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term => {}
    }
}

fn parse_end(end: Option<&str>) -> Result<i64> {
    match end {
        None => Ok(chrono::Utc::now().timestamp_millis()),
        Some(s) => Ok(chrono::DateTime::parse_from_rfc3339(s)
            .with_context(|| "--end must be an RFC 3339 time such as 2026-11-25T00:00:00Z")?
            .timestamp_millis()),
    }
}

fn generate(a: GenerateArgs) -> Result<()> {
    for (name, v) in [
        ("--late-fraction", a.late_fraction),
        ("--duplicate-fraction", a.duplicate_fraction),
        ("--out-of-order-fraction", a.out_of_order_fraction),
        ("--malformed-fraction", a.malformed_fraction),
    ] {
        if !(0.0..=1.0).contains(&v) {
            bail!("{name} must be between 0 and 1");
        }
    }
    let mut cfg = WorkloadConfig::new(a.events, a.seed, parse_end(a.end.as_deref())?);
    cfg.days = a.days;
    cfg.late_fraction = a.late_fraction;
    cfg.duplicate_fraction = a.duplicate_fraction;
    cfg.out_of_order_fraction = a.out_of_order_fraction;
    cfg.malformed_fraction = a.malformed_fraction;
    let spinner =
        ProgressBar::new_spinner().with_message(format!("generating {} events…", a.events));
    spinner.enable_steady_tick(Duration::from_millis(120));
    let w = reelhouse_workload::generate(&cfg);
    spinner.set_message(format!("writing {}…", a.out.display()));
    let file =
        std::fs::File::create(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
    let mut out = writer_for(&a.out, file)?;
    for l in &w.lines {
        out.write_all(l.as_bytes())?;
        out.write_all(b"\n")?;
    }
    out.flush()?;
    drop(out);
    let manifest_path = PathBuf::from(format!("{}.manifest.json", a.out.display()));
    std::fs::write(&manifest_path, serde_json::to_string_pretty(&w.manifest)?)?;
    spinner.finish_and_clear();
    let m = &w.manifest;
    println!(
        "wrote {} lines to {}: {} valid events, {} duplicates, {} malformed ({} late, {} out of order)",
        m.lines,
        a.out.display(),
        m.valid_unique,
        m.duplicates,
        m.malformed,
        m.late,
        m.out_of_order
    );
    println!("manifest: {}", manifest_path.display());
    Ok(())
}

fn writer_for(path: &Path, file: std::fs::File) -> Result<Box<dyn Write>> {
    let buf = std::io::BufWriter::with_capacity(1 << 20, file);
    Ok(match path.extension().and_then(|e| e.to_str()) {
        Some("gz") => Box::new(flate2::write::GzEncoder::new(
            buf,
            flate2::Compression::fast(),
        )),
        Some("zst") => Box::new(zstd::Encoder::new(buf, 3)?.auto_finish()),
        _ => Box::new(buf),
    })
}

fn reader_for(path: &Path) -> Result<Box<dyn BufRead>> {
    let file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let inner: Box<dyn Read> = match path.extension().and_then(|e| e.to_str()) {
        Some("gz") => Box::new(flate2::read::MultiGzDecoder::new(BufReader::new(file))),
        Some("zst") => Box::new(zstd::Decoder::new(file)?),
        _ => Box::new(file),
    };
    Ok(Box::new(BufReader::with_capacity(1 << 20, inner)))
}

/// Inputs below this many bytes (compressed files counted at 10×, about 200,000 events) are
/// loaded without opening the feature store (`EngineConfig::defer_features`).
const DEFER_FEATURES_INPUT_BYTES: u64 = 64 << 20;

async fn ingest(a: IngestArgs) -> Result<()> {
    let total_bytes: u64 = a
        .files
        .iter()
        .map(|f| {
            std::fs::metadata(f)
                .map(|m| m.len())
                .with_context(|| format!("reading {}", f.display()))
        })
        .collect::<Result<Vec<_>>>()?
        .into_iter()
        .sum();
    // A small load leaves the feature store on disk for the next start to replay (its
    // records stay in the WAL): opening and closing it would cost more than the load.
    let compressed_bytes: u64 = a
        .files
        .iter()
        .filter(|f| matches!(f.extension().and_then(|e| e.to_str()), Some("gz" | "zst")))
        .filter_map(|f| std::fs::metadata(f).ok())
        .map(|m| m.len())
        .sum();
    let mut config = a.data.engine_config();
    config.defer_features = total_bytes + 9 * compressed_bytes < DEFER_FEATURES_INPUT_BYTES;
    let engine = Engine::open(config).await?;
    engine.start_flusher()?;
    let bar = ProgressBar::new(total_bytes).with_style(
        ProgressStyle::with_template("{bar:40} {bytes}/{total_bytes} {msg} ({eta})")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let start = Instant::now();
    let (mut accepted, mut duplicates, mut rejected) = (0u64, 0u64, 0u64);
    for path in &a.files {
        let compressed = matches!(
            path.extension().and_then(|e| e.to_str()),
            Some("gz" | "zst")
        );
        let file_len = std::fs::metadata(path)?.len();
        let mut reader = reader_for(path)?;
        let mut body = Vec::with_capacity(4 << 20);
        let mut lines = 0;
        let mut read_in_file = 0u64;
        loop {
            let n = reader.read_until(b'\n', &mut body)?;
            if n > 0 {
                lines += 1;
                if body.last() != Some(&b'\n') {
                    body.push(b'\n');
                }
            }
            if (n == 0 && !body.is_empty()) || lines >= a.batch_lines {
                let out = ingest_retrying(&engine, &body).await?;
                accepted += out.accepted as u64;
                duplicates += out.duplicates as u64;
                rejected += out.rejected as u64;
                if !compressed {
                    read_in_file += body.len() as u64;
                    bar.set_position(bar.position() + body.len() as u64);
                }
                bar.set_message(format!("{accepted} accepted"));
                body.clear();
                lines = 0;
            }
            if n == 0 {
                break;
            }
        }
        if compressed {
            bar.inc(file_len);
        } else {
            bar.inc(file_len.saturating_sub(read_in_file));
        }
    }
    bar.set_message("committing to Delta…");
    engine.shutdown().await?;
    bar.finish_and_clear();
    let secs = start.elapsed().as_secs_f64();
    let lines = accepted + duplicates + rejected;
    println!(
        "ingested {} lines in {:.1}s ({:.0} lines/s): {} accepted, {} duplicates, {} rejected (see the quarantine table)",
        lines,
        secs,
        lines as f64 / secs.max(1e-9),
        accepted,
        duplicates,
        rejected
    );
    Ok(())
}

async fn ingest_retrying(engine: &Engine, body: &[u8]) -> Result<reelhouse_engine::BatchOutcome> {
    loop {
        match engine.ingest(body, IngestPath::Bulk).await {
            Err(EngineError::Overloaded) => {
                // The flusher is behind: let it catch up rather than queue without bound.
                if engine.pending_rows() > 0 {
                    engine.flush().await?;
                } else {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
            other => return Ok(other?),
        }
    }
}

/// Runs a forget request to the end, through a running server or on the data directory.
async fn forget(a: ForgetArgs) -> Result<()> {
    let user = i64::try_from(a.user).context("user id must be at most 9223372036854775807")?;
    let spinner = ProgressBar::new_spinner().with_message(format!("{}…", a.mode));
    spinner.enable_steady_tick(Duration::from_millis(120));
    let status: serde_json::Value = match &a.url {
        Some(url) => {
            let base = url.trim_end_matches('/');
            let http = reqwest::Client::new();
            let resp = http
                .post(format!("{base}/v1/users/{user}/forget"))
                .json(&serde_json::json!({ "mode": a.mode }))
                .send()
                .await?;
            let code = resp.status();
            let body: serde_json::Value = resp.json().await?;
            if !code.is_success() {
                bail!("server answered {code}: {}", body["error"]["message"]);
            }
            let id = body["request_id"].as_str().unwrap_or_default().to_string();
            loop {
                let s: serde_json::Value = http
                    .get(format!("{base}/v1/privacy/requests/{id}"))
                    .send()
                    .await?
                    .json()
                    .await?;
                if s["status"] == "done" || s["status"] == "failed" {
                    break s;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
        None => {
            let engine = Engine::open(a.data.engine_config()).await?;
            let mode = if a.mode == "erase" {
                reelhouse_engine::ForgetMode::Erase
            } else {
                reelhouse_engine::ForgetMode::Anonymize
            };
            let id = engine
                .forget(reelhouse_event::UserId(user as u64), mode)
                .await?;
            engine.run_request(&id).await;
            let s = engine.privacy_request(&id).unwrap_or_default();
            engine.shutdown().await?;
            s
        }
    };
    spinner.finish_and_clear();
    println!("{}", serde_json::to_string_pretty(&status)?);
    if status["status"] != "done" {
        bail!("the forget request did not complete");
    }
    Ok(())
}

/// Compares online totals with the warehouse: through a running server's
/// `GET /v1/admin/check`, or by opening the data directory, materializing, and comparing.
async fn check(a: CheckArgs) -> Result<()> {
    let report: serde_json::Value = match &a.url {
        Some(url) => {
            let url = format!("{}/v1/admin/check", url.trim_end_matches('/'));
            let resp = reqwest::Client::new().get(&url).send().await?;
            let status = resp.status();
            let body: serde_json::Value = resp.json().await?;
            if !status.is_success() {
                anyhow::bail!("server answered {status}: {}", body["error"]["message"]);
            }
            body
        }
        None => {
            let engine = Engine::open(a.data.engine_config()).await?;
            let spinner = ProgressBar::new_spinner().with_message("materializing…");
            spinner.enable_steady_tick(Duration::from_millis(120));
            engine.flush().await?;
            engine.materialize().await?;
            spinner.set_message("comparing…");
            let r = engine
                .check()
                .await
                .map_err(|e| anyhow::anyhow!(e.to_string()))?;
            engine.close().await;
            spinner.finish_and_clear();
            serde_json::to_value(r)?
        }
    };
    let diffs = report["differences"].as_u64().unwrap_or(0);
    println!(
        "compared {} videos and {} creators: {} difference(s)",
        report["videos_compared"], report["creators_compared"], diffs
    );
    if diffs > 0 {
        let cols = ["entity", "id", "field", "online", "warehouse"].map(String::from);
        let rows: Vec<Vec<serde_json::Value>> = report["examples"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|d| cols.iter().map(|c| d[c].clone()).collect())
            .collect();
        print!("{}", send::print_table(&cols, &rows));
        std::process::exit(1);
    }
    Ok(())
}

async fn materialize(data: DataArgs, restate: Option<(i32, i32)>, full: bool) -> Result<()> {
    // The warehouse never reads the feature store: leave it on disk (EngineConfig docs).
    let mut config = data.engine_config();
    config.defer_features = true;
    let engine = Engine::open(config).await?;
    let spinner = ProgressBar::new_spinner().with_message("committing pending events…");
    spinner.enable_steady_tick(Duration::from_millis(120));
    engine.flush().await?;
    spinner.set_message("rebuilding the warehouse…");
    let report = match restate {
        Some((from, to)) => engine.restate(from, to).await?,
        None if full => engine.materialize_full().await?,
        None => engine.materialize().await?,
    };
    engine.close().await;
    spinner.finish_and_clear();
    let rows: Vec<Vec<serde_json::Value>> = report
        .tables
        .iter()
        .map(|t| {
            vec![
                t.table.clone().into(),
                t.rows.into(),
                t.version.into(),
                t.elapsed_ms.into(),
                t.write_ms.into(),
            ]
        })
        .collect();
    let cols = [
        "table".to_string(),
        "rows".into(),
        "delta_version".into(),
        "ms".into(),
        "write_ms".into(),
    ];
    print!("{}", send::print_table(&cols, &rows));
    match &report.dates {
        Some(d) if d.is_empty() => println!("incremental: no date needed rebuilding"),
        Some(d) => println!("incremental: rebuilt {} date(s): {}", d.len(), d.join(", ")),
        None => match report.buckets {
            Some(b) => println!("full rebuild of every date, in {b} user buckets"),
            None => println!("full rebuild of every date"),
        },
    }
    println!("materialized in {:.1}s", report.elapsed_ms as f64 / 1000.0);
    Ok(())
}

async fn sql(a: SqlArgs) -> Result<()> {
    let result: serde_json::Value = match &a.url {
        Some(url) => {
            let resp = reqwest::Client::new()
                .post(format!("{}/v1/sql", url.trim_end_matches('/')))
                .json(&serde_json::json!({"sql": a.sql}))
                .send()
                .await
                .with_context(|| format!("connecting to {url}"))?;
            let status = resp.status();
            let v: serde_json::Value = resp.json().await?;
            if !status.is_success() {
                bail!(
                    "{}",
                    v["error"]["message"].as_str().unwrap_or("query failed")
                );
            }
            v
        }
        None => {
            let (local, tables) = split_location(&a.data_dir, &a.state_dir);
            if tables.is_none() && !local.exists() {
                bail!(
                    "data directory {} does not exist (set --data-dir)",
                    a.data_dir.display()
                );
            }
            let catalog = reelhouse_engine::read_only_view(&local, tables.as_deref()).await?;
            let r = catalog
                .query_json(&a.sql, usize::MAX)
                .await
                .map_err(|e| match e {
                    reelhouse_lake::Error::ReadOnly(m) => anyhow::anyhow!(m),
                    other => anyhow::anyhow!(other),
                })?;
            serde_json::to_value(r)?
        }
    };
    if a.json {
        println!("{}", serde_json::to_string_pretty(&result)?);
        return Ok(());
    }
    let columns: Vec<String> = serde_json::from_value(result["columns"].clone())?;
    let rows: Vec<Vec<serde_json::Value>> = serde_json::from_value(result["rows"].clone())?;
    print!("{}", send::print_table(&columns, &rows));
    Ok(())
}
