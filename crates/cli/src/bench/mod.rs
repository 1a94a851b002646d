//! `reelhouse bench`: system figures, each beside DuckDB doing the same work on the same data
//! in the same run. Results go to `bench/results/*.json`; `docs/performance.md` summarises.
//! One file per benchmark; `common.rs` holds what they share (result files, process CPU and
//! faults, DuckDB through Python).

mod cascades;
mod common;
mod ingest;
mod materialize;
mod scale;
mod scaleout;
mod serve;

use anyhow::Result;
use clap::{Args, Subcommand};

#[derive(Args)]
pub struct BenchArgs {
    #[command(subcommand)]
    what: BenchCommand,
}

#[derive(Subcommand)]
enum BenchCommand {
    /// HTTP ingest throughput and ack latency with durable acks, beside DuckDB read_ndjson.
    Ingest(ingest::IngestBench),
    /// Warehouse rebuild rate and creator-dashboard latency, beside DuckDB computing
    /// agg_creator_daily from the same Parquet files.
    Materialize(materialize::MaterializeBench),
    /// Feature lookup latency (single and batch-500) while ingest runs, freshness, memory per
    /// video and user, beside redis-server HGETALL on the same features.
    Serve(serve::ServeBench),
    /// Share-cascade metrics (roots, depths, structural virality) for one 1M-node cascade and
    /// for 100k small cascades.
    Cascades(cascades::CascadeBench),
    /// Ingest rate, materializer catch-up and freshness through NATS JetStream with 1 and 2
    /// ingest processes, beside one embedded node (needs the nats-server package).
    Scaleout(scaleout::ScaleoutBench),
    /// Cost of each step against the size of a day (1M, 4M, 16M events): bulk ingest, full
    /// and incremental rebuilds after a live and a late trickle, peak RSS, bytes per event,
    /// dashboard latency, beside DuckDB's agg_creator_daily on the same files.
    Scale(scale::ScaleBench),
}

pub async fn run(a: BenchArgs) -> Result<()> {
    match a.what {
        BenchCommand::Ingest(b) => ingest::ingest(b).await,
        BenchCommand::Materialize(b) => materialize::materialize(b).await,
        BenchCommand::Serve(b) => serve::serve(b).await,
        BenchCommand::Cascades(b) => cascades::cascades(b),
        BenchCommand::Scaleout(b) => scaleout::scaleout(b).await,
        BenchCommand::Scale(b) => scale::scale(b).await,
    }
}

/// This process's peak resident set (`VmHWM` of `/proc/self/status`), in bytes.
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}
