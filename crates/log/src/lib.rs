//! The shared ingest log, behind one small trait, for running reelhouse as several processes.
//!
//! A single node keeps its write-ahead log in its data directory (`reelhouse-wal`), where the
//! group-commit thread hands each fsynced record straight to the feature store in log order.
//! Past one machine the log is an existing system: ingest nodes [`EventLog::append`] records
//! and answer the client once the log has them durably; one materializer reads them in order
//! with a durable [`LogReader`], commits them to Delta, and only then acknowledges them
//! ([`LogReader::ack_through`]) and lets the log drop them ([`EventLog::truncate`]); API
//! replicas tail the same records with an ephemeral reader.
//!
//! ```text
//!  ingest node ─append(record, id)─▶ log (NATS JetStream stream, file storage)
//!                 ◀── position ──────┘   dedup of ids inside the stream's duplicate window
//!  materializer ◀─reader(after = position committed in Delta, durable)── log
//!       │ Delta commit (txn = position) ─▶ ack_through(position) ─▶ truncate(position)
//!  API replica  ◀─reader(after = snapshot position, ephemeral)── log
//! ```
//!
//! A position is a strictly increasing `u64` given by the log (JetStream's stream sequence),
//! so "everything up to position P" is exact on every reader. The trait is what a Kafka
//! backend would implement too: append with a key, read a partition from an offset, commit an
//! offset, delete records before an offset.

pub mod nats;

use std::time::Duration;

use bytes::Bytes;

/// Errors of a log backend. Messages name the log and what to do, never record contents.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot reach the log at {url}: {reason}")]
    Connect { url: String, reason: String },
    #[error("the log refused the operation ({op}): {reason}")]
    Backend { op: &'static str, reason: String },
    #[error(
        "the log no longer holds records {from}..{to} that the tables do not have yet \
         (dropped by its retention or a purge); the tables cannot be completed from it"
    )]
    Gap { from: u64, to: u64 },
    #[error("unsupported log URL {0}: use nats://HOST:PORT[/STREAM]")]
    Url(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// One record read back, at its position.
#[derive(Debug, Clone)]
pub struct Entry {
    pub position: u64,
    pub payload: Bytes,
}

/// What [`EventLog::append`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Appended {
    pub position: u64,
    /// The log had already stored a record with this id (a retried publish); `position` is
    /// the earlier one and nothing was added.
    pub duplicate: bool,
}

/// Counters of the log, for `/metrics` and health.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct LogStats {
    /// Position of the oldest record still held (0: none).
    pub first_position: u64,
    /// Position of the newest record appended (0: none).
    pub last_position: u64,
    pub records: u64,
    pub bytes: u64,
}

/// A durable, ordered log of opaque records shared by several processes.
#[async_trait::async_trait]
pub trait EventLog: Send + Sync {
    /// Appends `record` and resolves once the log holds it durably. `id` is an idempotency
    /// key: a record whose id the log saw recently is not stored again.
    async fn append(&self, record: Bytes, id: &str) -> Result<Appended>;

    /// Opens a reader of the records after position `after`, in order. With `durable`, the
    /// log remembers the reader by that name and redelivers what it has not acknowledged
    /// (the materializer); without, the reader is forgotten when dropped (API replicas).
    async fn reader(&self, after: u64, durable: Option<&str>) -> Result<Box<dyn LogReader>>;

    /// Lets the log drop every record up to and including `through` (they are committed
    /// downstream). Also how an erasure removes the erased user's records from the log.
    async fn truncate(&self, through: u64) -> Result<()>;

    async fn stats(&self) -> Result<LogStats>;

    /// A description without credentials, for logs and health.
    fn describe(&self) -> String;
}

/// Reads records in log order.
#[async_trait::async_trait]
pub trait LogReader: Send {
    /// Up to `max` records, waiting at most `wait` for the first one; empty when none came.
    /// Never returns a record at or below a position returned before.
    async fn next_batch(&mut self, max: usize, wait: Duration) -> Result<Vec<Entry>>;

    /// Acknowledges every record up to `through` (a durable reader's progress).
    async fn ack_through(&mut self, through: u64) -> Result<()>;
}

/// Opens the log a URL names (`nats://HOST:PORT[/STREAM]`).
pub async fn open(url: &str) -> Result<Box<dyn EventLog>> {
    if url.starts_with("nats://") {
        Ok(Box::new(nats::NatsLog::connect(url).await?))
    } else {
        Err(Error::Url(url.to_string()))
    }
}
