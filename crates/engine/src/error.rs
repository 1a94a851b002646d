//! The engine's errors. Each says what went wrong without payloads or user ids; the HTTP
//! layer maps each to one status code (in the server's one `IntoResponse`).

use std::path::PathBuf;

/// Errors of the pipeline; the HTTP layer maps each to one status.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    BadBody(String),
    #[error("ingest is at capacity; retry after a short wait")]
    Overloaded,
    #[error("the write-ahead log could not persist the batch")]
    Wal(#[from] reelhouse_wal::Error),
    // No `#[from]` (which would also make it the `source`): the message already holds the
    // inner error, and a `{:#}` chain would print it twice.
    #[error("table storage error: {0}")]
    Lake(reelhouse_lake::Error),
    #[error("the server is shutting down")]
    ShuttingDown,
    #[error(
        "data directory {0} is in use by another reelhouse process (serve or ingest); \
         stop it, send the data over HTTP instead, or use another --data-dir (with tables \
         on S3: another --state-dir)"
    )]
    Locked(PathBuf),
    #[error("cannot open data directory: {0}")]
    Io(#[from] std::io::Error),
    #[error("materialization failed: {0}")]
    Warehouse(#[from] reelhouse_warehouse::Error),
    #[error("feature store: {0}")]
    Online(#[from] reelhouse_online::Error),
    #[error("shared log: {0}")]
    Log(#[from] reelhouse_log::Error),
    #[error("{0}")]
    WrongRole(&'static str),
    #[error("internal error: {0}")]
    Internal(&'static str),
    /// The data asked about does not exist yet (e.g. no materialized warehouse).
    #[error("{0}")]
    NotReady(String),
    #[error("privacy request: {0}")]
    Privacy(reelhouse_privacy::Error),
}

impl From<reelhouse_privacy::Error> for Error {
    fn from(e: reelhouse_privacy::Error) -> Self {
        match e {
            reelhouse_privacy::Error::Lake(l) => Error::Lake(l),
            reelhouse_privacy::Error::Io(i) => Error::Io(i),
            other => Error::Privacy(other),
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl From<reelhouse_lake::Error> for Error {
    fn from(e: reelhouse_lake::Error) -> Self {
        Error::Lake(e)
    }
}
