//! Where durable records come from: this process's WAL (one node) or a shared log (several
//! processes; see `follow.rs`). The WAL record format, replay at start, the binding of a data
//! directory to one log, and the exact cut the flusher and erasure take.
//!
//! A batch is acknowledged only after its record is fsynced. On start, records of segments
//! newer than the segment recorded in each Delta table are replayed into `pending`, so an
//! acknowledged event is never lost nor stored twice, even if the process died between the
//! Delta commit and the WAL truncation.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};

use reelhouse_lake::committed_segment;
use reelhouse_lake::deltalake::arrow::array::RecordBatch;
use reelhouse_lake::deltalake::DeltaTable;
use reelhouse_lake::schema::{decode_ipc, encode_ipc};
use reelhouse_lake::store::write_atomically;
use reelhouse_lake::RawTable;
use reelhouse_log::EventLog;
use reelhouse_wal::{SegmentId, Wal};

use crate::applier::{Apply, Pending};
use crate::{Engine, Error};

/// Where the durable records of this process come from.
pub(crate) enum Source {
    /// One node: HTTP batches are appended to this process's WAL, whose writer thread hands
    /// each fsynced record to the applier in log order.
    Wal(Wal),
    /// Several processes: ingest nodes append to a shared log and [`Engine::follow`] reads
    /// it here in order.
    Log(LogSource),
}

pub(crate) struct LogSource {
    pub(crate) log: Arc<dyn EventLog>,
    /// The materializer (commits to Delta, acknowledges and truncates the log); else an API
    /// replica that only reads.
    pub(crate) writer: bool,
    /// Position of the last record handed to the applier; held while one is handed over, so
    /// a cut taken under it is exact.
    pub(crate) fed: Mutex<u64>,
    /// Records up to here are in Delta and in a feature snapshot: the reader may acknowledge.
    pub(crate) ack_target: AtomicU64,
    /// The feature store held every event up to this position when the process started.
    pub(crate) features_at: u64,
    /// Records in the log after the last one read (consumer lag), for `/metrics`.
    pub(crate) lag: AtomicU64,
}

/// Positions each raw table holds every record up to (0 before its first commit).
pub(crate) async fn committed_positions(
    tables: &HashMap<RawTable, DeltaTable>,
) -> Result<HashMap<RawTable, u64>, Error> {
    let mut committed = HashMap::new();
    for t in RawTable::ALL {
        let c = match tables.get(&t) {
            Some(table) => committed_segment(table).await?,
            None => None,
        };
        committed.insert(t, c.unwrap_or(0));
    }
    Ok(committed)
}

/// The stream part of a log's description (`nats://host:port/STREAM`).
pub(crate) fn stream_of(described: &str) -> &str {
    described.rsplit('/').next().unwrap_or(described)
}

/// A data directory holds positions of one log only: its own WAL's segments, or one shared
/// log's sequence numbers (recorded in `_state/log.json` by the materializer's first start).
pub(crate) fn check_log_binding(root: &Path, log: Option<(String, bool)>) -> Result<(), Error> {
    let path = root.join("_state").join("log.json");
    let bound: Option<String> = std::fs::read(&path)
        .ok()
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .and_then(|v| v["log"].as_str().map(String::from));
    let has_wal = reelhouse_wal::list_segments(&wal_dir(root)).is_ok_and(|s| !s.is_empty());
    match (log, bound) {
        (None, Some(_)) => Err(Error::WrongRole(
            "this data directory is written from a shared log (serve --role materialize \
             --log …); start that instead of an embedded server",
        )),
        (Some(_), None) if has_wal => Err(Error::WrongRole(
            "this data directory has a local write-ahead log from an embedded server; \
             use a new --data-dir for a deployment with a shared log",
        )),
        // Positions are the stream's: the server may be named differently by each process.
        (Some((url, _)), Some(b)) if stream_of(&url) != stream_of(&b) => Err(Error::WrongRole(
            "this data directory is bound to another shared-log stream (see \
                 _state/log.json)",
        )),
        (Some((url, true)), None) => {
            let body = serde_json::json!({ "log": url }).to_string();
            Ok(write_atomically(&path, body.as_bytes())?)
        }
        _ => Ok(()),
    }
}

pub(crate) fn wal_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("_wal")
}

/// Encodes one WAL record: `[u32 len][events IPC][u32 len][quarantine IPC]` (len 0 = none).
pub(crate) fn encode_record(
    events: Option<&RecordBatch>,
    quarantine: Option<&RecordBatch>,
) -> Result<Vec<u8>, Error> {
    let mut out = Vec::new();
    for b in [events, quarantine] {
        let bytes = match b {
            Some(b) => encode_ipc(b)?,
            None => Vec::new(),
        };
        out.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
        out.extend_from_slice(&bytes);
    }
    Ok(out)
}

pub(crate) type Parts = (Option<RecordBatch>, Option<RecordBatch>);

pub(crate) fn decode_record(mut bytes: &[u8]) -> Result<Parts, Error> {
    let mut parts = Vec::with_capacity(2);
    for _ in 0..2 {
        let corrupt = || Error::BadBody("write-ahead log record is malformed".into());
        if bytes.len() < 4 {
            return Err(corrupt());
        }
        let len = u32::from_le_bytes(bytes[..4].try_into().map_err(|_| corrupt())?) as usize;
        let body = bytes.get(4..4 + len).ok_or_else(corrupt)?;
        parts.push(if len == 0 {
            None
        } else {
            decode_ipc(body)?.into_iter().next()
        });
        bytes = &bytes[4 + len..];
    }
    let q = parts.pop().flatten();
    let e = parts.pop().flatten();
    Ok((e, q))
}

/// Reads the WAL back: the records not yet in Delta become `pending`; the events of records
/// in segments after `features_after` (if given) are returned for the feature store.
pub(crate) async fn replay(
    committed: &HashMap<RawTable, u64>,
    dir: &Path,
    repair: bool,
    features_after: Option<SegmentId>,
) -> Result<(Pending, Vec<RecordBatch>), Error> {
    let mut pending = Pending::default();
    let mut for_features = Vec::new();
    for rec in reelhouse_wal::read_dir(dir, repair)? {
        let wanted_by_features = features_after.is_some_and(|s| rec.segment > s);
        let in_delta = rec.segment <= committed[&RawTable::Events]
            && rec.segment <= committed[&RawTable::Quarantine];
        if in_delta && !wanted_by_features {
            continue;
        }
        let (e, q) = decode_record(&rec.payload)?;
        if let (Some(e), true) = (&e, wanted_by_features) {
            for_features.push(e.clone());
        }
        let e = e.filter(|_| rec.segment > committed[&RawTable::Events]);
        let q = q.filter(|_| rec.segment > committed[&RawTable::Quarantine]);
        pending.push(rec.segment, e, q);
    }
    Ok((pending, for_features))
}

impl Engine {
    /// Rotates the WAL and runs `f` on the applier thread at that exact point of the log:
    /// after every record of the sealed segment is applied and visible in `pending`, before
    /// any record of the next. With a shared log, the point is the last record read.
    pub(crate) fn rotate_cut<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<(SegmentId, T), Error> {
        let applier = self.applier.clone();
        let (tx, rx) = std::sync::mpsc::channel();
        let wal = match &self.source {
            Source::Wal(wal) => wal,
            Source::Log(ls) => {
                let fed = ls.fed.lock().unwrap_or_else(|p| p.into_inner());
                let cut = Apply::Cut(Box::new(move || {
                    let _ = tx.send(f());
                }));
                applier.send(cut).map_err(|_| Error::ShuttingDown)?;
                let at = *fed;
                drop(fed);
                let out = rx.recv().map_err(|_| Error::ShuttingDown)?;
                return Ok((at, out));
            }
        };
        let (seg, sent) = wal.rotate_then(move |_| {
            applier
                .send(Apply::Cut(Box::new(move || {
                    let _ = tx.send(f());
                })))
                .is_ok()
        })?;
        if !sent {
            return Err(Error::ShuttingDown);
        }
        let out = rx.recv().map_err(|_| Error::ShuttingDown)?;
        Ok((seg, out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use reelhouse_lake::{quarantine_batch, QuarantineRow};

    #[test]
    fn a_data_directory_stays_with_one_log() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let nats = |host: &str, stream: &str| Some((format!("nats://{host}/{stream}"), true));
        // The materializer's first start binds the directory to its stream.
        check_log_binding(root, nats("127.0.0.1:4222", "events")).unwrap();
        // Another name for the same server is the same stream; a replica never writes.
        check_log_binding(root, nats("localhost:4222", "events")).unwrap();
        check_log_binding(root, Some(("nats://h/events".into(), false))).unwrap();
        assert!(check_log_binding(root, nats("127.0.0.1:4222", "other")).is_err());
        assert!(
            check_log_binding(root, None).is_err(),
            "embedded on a log's directory"
        );

        let embedded = tempfile::tempdir().unwrap();
        let wal = Wal::open(wal_dir(embedded.path()), 4).unwrap();
        wal.close();
        check_log_binding(embedded.path(), None).unwrap();
        assert!(
            check_log_binding(embedded.path(), nats("h", "events")).is_err(),
            "a shared log on an embedded node's directory"
        );
    }

    #[test]
    fn record_round_trip() {
        let rows = vec![QuarantineRow {
            received_at_ms: 1_700_000_000_000,
            event_id: None,
            reason: "r".into(),
            raw: "{".into(),
            ingest_path: "http",
        }];
        let q = quarantine_batch(&rows).unwrap();
        let bytes = encode_record(None, Some(&q)).unwrap();
        let (e, q2) = decode_record(&bytes).unwrap();
        assert!(e.is_none());
        assert_eq!(q2.unwrap(), q);
    }
}
