//! GDPR forget requests (SPEC §7): `erase` and `anonymize`, durable and resumable, with a
//! receipt, salted-hash tombstones and an audit table that never holds the clear id.
//!
//! ```text
//!  POST /v1/users/{id}/forget ─▶ request saved (+ tombstone for erase) ─▶ 202 {request_id}
//!  worker (one at a time; resumed after a restart):
//!    online store: forget at a WAL cut ─▶ flush (everything acked reaches Delta, snapshot
//!    rewritten, WAL segments deleted) ─▶ events: DELETE / UPDATE ─▶ quarantine: rewrite
//!    without the user's payloads ─▶ dim_updates ─▶ rebuild the warehouse ─▶ for every table:
//!    vacuum (retention 0) + checkpoint + drop older log entries ─▶ receipt, audit row
//!  ingest: an event whose user's salted hash is tombstoned is dropped and counted
//! ```
//!
//! The state lives in `_state/privacy/state.json`: the salt, the tombstones and the requests.
//! A request keeps the clear id only while it is pending or running (needed to resume it);
//! once done, only the salted hash remains.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

use reelhouse_lake::deltalake::arrow::array::{Array, AsArray, BooleanArray, RecordBatch};
use reelhouse_lake::deltalake::arrow::compute::filter_record_batch;
use reelhouse_lake::erase::{delete_where, purge_history, update_where, TableErasure};
use reelhouse_lake::RawTable;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use sha2::Digest;

use crate::ingest::{IngestError, Ingestor};

/// `erase` removes the user; `anonymize` replaces their id by a random surrogate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    Erase,
    Anonymize,
}

/// One forget request as stored.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Request {
    request_id: String,
    mode: Mode,
    user_hash: String,
    status: String,
    requested_at: String,
    finished_at: Option<String>,
    receipt: Option<Value>,
    error: Option<String>,
    /// Only while pending or running.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    user_id: Option<i64>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct State {
    salt: String,
    tombstones: Vec<String>,
    requests: Vec<Request>,
}

/// Privacy state of one data directory.
pub struct Privacy {
    dir: PathBuf,
    /// Empty only on a read-only replica that started before the materializer made one.
    salt: RwLock<String>,
    state: Mutex<State>,
    tombstones: RwLock<HashSet<String>>,
    worker: tokio::sync::Mutex<()>,
}

fn now_rfc3339() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

impl Privacy {
    pub fn open(data_dir: &Path) -> std::io::Result<Privacy> {
        let dir = data_dir.join("_state").join("privacy");
        let mut state = read_state(&dir)?;
        if state.salt.is_empty() {
            let salt: [u8; 32] = rand::random();
            state.salt = hex::encode(salt);
        }
        let p = Privacy {
            dir,
            salt: RwLock::new(state.salt.clone()),
            tombstones: RwLock::new(state.tombstones.iter().cloned().collect()),
            state: Mutex::new(state),
            worker: tokio::sync::Mutex::new(()),
        };
        p.save()?;
        Ok(p)
    }

    /// The state as the writer (the materializer) keeps it, never written from here: for a
    /// read-only API replica, which picks up new tombstones with [`Privacy::reload`].
    pub fn open_read_only(data_dir: &Path) -> std::io::Result<Privacy> {
        let dir = data_dir.join("_state").join("privacy");
        let state = read_state(&dir)?;
        Self::read_only(dir, state)
    }

    /// [`Privacy::open_read_only`] from the bytes of the writer's state file as mirrored
    /// next to tables on an object store (`None`: none yet).
    pub fn read_only_from(data_dir: &Path, shared: Option<&[u8]>) -> std::io::Result<Privacy> {
        let dir = data_dir.join("_state").join("privacy");
        Self::read_only(dir, parse_state(shared)?)
    }

    fn read_only(dir: PathBuf, state: State) -> std::io::Result<Privacy> {
        Ok(Privacy {
            dir,
            salt: RwLock::new(state.salt.clone()),
            tombstones: RwLock::new(state.tombstones.iter().cloned().collect()),
            state: Mutex::new(state),
            worker: tokio::sync::Mutex::new(()),
        })
    }

    /// Re-reads the writer's state; returns the salted hashes of the users whose forget
    /// request (erase or anonymize) finished since the last read.
    pub fn reload(&self) -> std::io::Result<Vec<String>> {
        self.reload_with(read_state(&self.dir)?)
    }

    /// [`Privacy::reload`] from the bytes of the mirrored state file (`None`: none yet).
    pub fn reload_from(&self, shared: Option<&[u8]>) -> std::io::Result<Vec<String>> {
        self.reload_with(parse_state(shared)?)
    }

    fn reload_with(&self, state: State) -> std::io::Result<Vec<String>> {
        *self.salt.write().unwrap_or_else(|p| p.into_inner()) = state.salt.clone();
        *self.tombstones.write().unwrap_or_else(|p| p.into_inner()) =
            state.tombstones.iter().cloned().collect();
        let mut old = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let done_before: HashSet<&str> = old
            .requests
            .iter()
            .filter(|r| r.status == "done")
            .map(|r| r.request_id.as_str())
            .collect();
        let new: Vec<String> = state
            .requests
            .iter()
            .filter(|r| r.status == "done" && !done_before.contains(r.request_id.as_str()))
            .map(|r| r.user_hash.clone())
            .collect();
        *old = state;
        Ok(new)
    }

    /// Salted SHA-256 of a user id (hex): what tombstones and the audit table hold.
    pub fn user_hash(&self, user: i64) -> String {
        let mut h = sha2::Sha256::new();
        h.update(
            self.salt
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .as_bytes(),
        );
        h.update(user.to_string().as_bytes());
        hex::encode(h.finalize())
    }

    /// True when events of this user must be dropped (an erased user).
    pub fn is_tombstoned(&self, user: i64) -> bool {
        let t = self.tombstones.read().unwrap_or_else(|p| p.into_inner());
        !t.is_empty() && t.contains(&self.user_hash(user))
    }

    pub fn has_tombstones(&self) -> bool {
        !self
            .tombstones
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .is_empty()
    }
}

/// The privacy state file, relative to `_state/`.
pub const STATE_FILE: &str = "privacy/state.json";

fn read_state(dir: &Path) -> std::io::Result<State> {
    match std::fs::read(dir.join("state.json")) {
        Ok(b) => parse_state(Some(&b)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(State::default()),
        Err(e) => Err(e),
    }
}

fn parse_state(bytes: Option<&[u8]>) -> std::io::Result<State> {
    match bytes {
        Some(b) => serde_json::from_slice(b)
            .map_err(|_| std::io::Error::other("_state/privacy/state.json is unreadable")),
        None => Ok(State::default()),
    }
}

impl Privacy {
    fn save(&self) -> std::io::Result<()> {
        let bytes = {
            let s = self.state.lock().unwrap_or_else(|p| p.into_inner());
            serde_json::to_vec_pretty(&*s).unwrap_or_default()
        };
        crate::ingest::write_atomically(&self.dir.join("state.json"), &bytes)
    }

    fn update(&self, id: &str, f: impl FnOnce(&mut Request)) -> std::io::Result<()> {
        {
            let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(r) = s.requests.iter_mut().find(|r| r.request_id == id) {
                f(r);
            }
        }
        self.save()
    }

    /// The public view of a request (never the clear id).
    pub fn request(&self, id: &str) -> Option<Value> {
        let s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        s.requests.iter().find(|r| r.request_id == id).map(|r| {
            json!({"request_id": r.request_id, "mode": r.mode, "status": r.status,
                   "user_hash": r.user_hash, "requested_at": r.requested_at,
                   "finished_at": r.finished_at, "receipt": r.receipt, "error": r.error})
        })
    }

    fn unfinished(&self) -> Vec<String> {
        let s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        s.requests
            .iter()
            .filter(|r| r.status == "pending" || r.status == "running")
            .map(|r| r.request_id.clone())
            .collect()
    }
}

/// Does a raw quarantined payload name this user (as `"user_id": 5` or `"user_id": "5"`)?
fn raw_names_user(raw: &str, user: i64) -> bool {
    if let Ok(Value::Object(o)) = serde_json::from_str::<Value>(raw) {
        return match o.get("user_id") {
            Some(Value::Number(n)) => n.as_i64() == Some(user),
            Some(Value::String(s)) => s.trim() == user.to_string(),
            _ => false,
        };
    }
    // Not JSON: look for the field textually.
    let id = user.to_string();
    let mut rest = raw;
    while let Some(i) = rest.find("\"user_id\"") {
        let after = rest[i + 9..].trim_start();
        if let Some(v) = after.strip_prefix(':') {
            let v = v.trim_start().trim_start_matches('"');
            if let Some(tail) = v.strip_prefix(id.as_str()) {
                if !tail.starts_with(|c: char| c.is_ascii_digit()) {
                    return true;
                }
            }
        }
        rest = &rest[i + 9..];
    }
    false
}

impl Ingestor {
    /// Records a forget request (and, for `erase`, the tombstone) durably and starts it.
    pub async fn forget(self: &Arc<Self>, user: i64, mode: Mode) -> Result<String, IngestError> {
        self.require_writer()?;
        let p = &self.privacy;
        let request_id = format!("fr-{}", hex::encode(rand::random::<[u8; 12]>()));
        let hash = p.user_hash(user);
        {
            let mut s = p.state.lock().unwrap_or_else(|e| e.into_inner());
            if mode == Mode::Erase && !s.tombstones.contains(&hash) {
                s.tombstones.push(hash.clone());
            }
            s.requests.push(Request {
                request_id: request_id.clone(),
                mode,
                user_hash: hash.clone(),
                status: "pending".into(),
                requested_at: now_rfc3339(),
                finished_at: None,
                receipt: None,
                error: None,
                user_id: Some(user),
            });
        }
        if mode == Mode::Erase {
            p.tombstones
                .write()
                .unwrap_or_else(|e| e.into_inner())
                .insert(hash);
        }
        p.save()?;
        let me = Arc::clone(self);
        let id = request_id.clone();
        tokio::spawn(async move { me.run_request(&id).await });
        Ok(request_id)
    }

    /// Restarts requests a crash interrupted.
    pub(crate) fn resume_privacy(self: &Arc<Self>) {
        for id in self.privacy.unfinished() {
            let me = Arc::clone(self);
            tokio::spawn(async move { me.run_request(&id).await });
        }
    }

    /// The public status of a request.
    pub fn privacy_request(&self, id: &str) -> Option<Value> {
        self.privacy.request(id)
    }

    /// Runs one request to the end (requests run one at a time) and waits for it.
    pub async fn run_request(&self, id: &str) {
        let _one = self.privacy.worker.lock().await;
        let (user, mode) = {
            let s = self.privacy.state.lock().unwrap_or_else(|e| e.into_inner());
            match s.requests.iter().find(|r| r.request_id == id) {
                Some(r) if r.status == "pending" || r.status == "running" => match r.user_id {
                    Some(u) => (u, r.mode),
                    None => return,
                },
                _ => return,
            }
        };
        let _ = self.privacy.update(id, |r| r.status = "running".into());
        let started = std::time::Instant::now();
        let result = match mode {
            Mode::Erase => self.erase_user(user, None).await,
            Mode::Anonymize => {
                let surrogate =
                    rand::Rng::gen_range(&mut rand::thread_rng(), (1i64 << 62)..i64::MAX);
                self.erase_user(user, Some(surrogate)).await
            }
        };
        let finished = now_rfc3339();
        let outcome = match result {
            Ok(mut receipt) => {
                receipt["elapsed_ms"] = json!(started.elapsed().as_millis() as u64);
                receipt["finished_at"] = json!(finished);
                let _ = self.audit(id, mode, &receipt).await;
                self.privacy.update(id, |r| {
                    r.status = "done".into();
                    r.finished_at = Some(finished.clone());
                    r.receipt = Some(receipt);
                    r.user_id = None;
                })
            }
            Err(e) => {
                tracing::error!(error = %e, request_id = id, "forget request failed");
                self.privacy.update(id, |r| {
                    r.status = "failed".into();
                    r.finished_at = Some(finished.clone());
                    r.error = Some("the request failed; see the server log".into());
                    r.user_id = None;
                })
            }
        };
        if let Err(e) = outcome {
            tracing::error!(error = %e, "could not save privacy state");
        }
    }

    /// Appends the finished request to the `privacy_audit` table (salted hash, no clear id).
    async fn audit(&self, id: &str, mode: Mode, receipt: &Value) -> Result<(), IngestError> {
        use reelhouse_lake::deltalake::arrow::array::StringArray;
        use reelhouse_lake::deltalake::arrow::datatypes::{DataType, Field, Schema};
        let (hash, requested) = {
            let s = self.privacy.state.lock().unwrap_or_else(|e| e.into_inner());
            let r = s.requests.iter().find(|r| r.request_id == id);
            (
                r.map(|r| r.user_hash.clone()).unwrap_or_default(),
                r.map(|r| r.requested_at.clone()).unwrap_or_default(),
            )
        };
        let schema = Arc::new(Schema::new(
            [
                "request_id",
                "user_hash",
                "mode",
                "requested_at",
                "finished_at",
                "receipt",
            ]
            .map(|n| Field::new(n, DataType::Utf8, false))
            .to_vec(),
        ));
        let mode = serde_json::to_value(mode)
            .ok()
            .and_then(|v| v.as_str().map(String::from))
            .unwrap_or_default();
        let col = |v: String| Arc::new(StringArray::from(vec![v])) as _;
        let batch = RecordBatch::try_new(
            schema,
            vec![
                col(id.to_string()),
                col(hash),
                col(mode),
                col(requested),
                col(receipt["finished_at"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string()),
                col(receipt.to_string()),
            ],
        )
        .map_err(reelhouse_lake::Error::from)?;
        let current = self.lake.load_derived("privacy_audit").await?;
        self.lake
            .append_table("privacy_audit", current, batch)
            .await?;
        Ok(())
    }

    /// Erases `user` (or, with a surrogate, anonymizes them) everywhere; returns the receipt.
    async fn erase_user(&self, user: i64, surrogate: Option<i64>) -> Result<Value, IngestError> {
        let mut tables: Vec<TableErasure> = Vec::new();
        // 1. Online store, at an exact point of the log.
        let features = self.features_arc();
        let (_, online) = self.rotate_cut(move || features.forget_user(user))?;
        // With Redis, the user's key goes (and the records whose counts they were in are
        // rewritten) now; the periodic copy may have done part of it already, so the receipt
        // also says whether the key is gone.
        let online_redis = match self.copy_online().await? {
            Some(w) => Some(json!({
                "keys_set": w.keys_set,
                "keys_deleted": w.keys_deleted,
                "user_key_left": self.online_has_user(user).await?,
            })),
            None => None,
        };
        // 2. Everything acknowledged into Delta; snapshot rewritten; WAL segments deleted.
        self.flush().await?;
        let wal_segments_left = reelhouse_wal::list_segments(&self.data_dir().join("_wal"))
            .map(|s| s.len())
            .unwrap_or(0);
        // With a shared log, the flush truncated it through the records it committed: the
        // user's earlier records are gone from the log too (later ones are dropped on read).
        let shared_log = self
            .log_status()
            .map(|(log, through, _)| json!({"log": log, "truncated_through": through}));
        // The rebuild below recomputes the user's dates (and what they affect); until it has
        // run, a crash and resume leads to a full one.
        let days: Vec<i32> = {
            let catalog = self.catalog().await?;
            let b = catalog
                .query(&format!(
                    "SELECT DISTINCT CAST(event_date AS INT) FROM events WHERE user_id = {user}"
                ))
                .await?;
            reelhouse_warehouse::ints_of(&b).into_iter().collect()
        };
        self.dirty_after_deletion(&days).await?;
        // Nothing else writes these tables meanwhile (vacuum removes unreferenced files).
        let _flush = self.flush_lock.lock().await;
        let _mat = self.materialize_lock.lock().await;
        let _dims = self.dims_lock.lock().await;
        // 3. events.
        let current = self.raw_table(RawTable::Events);
        if let Some(t) = current {
            let mut r = TableErasure {
                table: "events".into(),
                ..TableErasure::default()
            };
            let pred = format!("user_id = {user}");
            let props = Some(RawTable::Events.rewrite_properties(&t)?);
            let t = match surrogate {
                None => delete_where(t, &pred, props, &mut r).await?,
                Some(s) => {
                    let null = "CAST(NULL AS STRING)".to_string();
                    let cols = [
                        ("user_id", s.to_string()),
                        ("device_os", null.clone()),
                        ("device_app_version", null.clone()),
                        ("device_country", null),
                    ];
                    update_where(t, &pred, &cols, props, &mut r).await?
                }
            };
            let t = purge_history(t, &mut r).await?;
            self.set_raw_table(RawTable::Events, t);
            tables.push(r);
        }
        // 4. quarantine: raw payloads name the user; they cannot be anonymized, so they go.
        if let Some(t) = self.raw_table(RawTable::Quarantine) {
            let mut r = TableErasure {
                table: "quarantine".into(),
                ..TableErasure::default()
            };
            let t = self.rewrite_quarantine(t, user, &mut r).await?;
            let t = purge_history(t, &mut r).await?;
            self.set_raw_table(RawTable::Quarantine, t);
            tables.push(r);
        }
        // 5. dimension upserts.
        let name = reelhouse_warehouse::dims::UPDATES_TABLE;
        if let Some(t) = self.derived_table(name) {
            let mut r = TableErasure {
                table: name.into(),
                ..TableErasure::default()
            };
            let pred = format!("kind = 'users' AND id = {user}");
            let props = Some(reelhouse_lake::derived_rewrite_properties(&t)?);
            let t = match surrogate {
                None => delete_where(t, &pred, props, &mut r).await?,
                Some(s) => {
                    let id = [("id", s.to_string())];
                    update_where(t, &pred, &id, props, &mut r).await?
                }
            };
            let t = purge_history(t, &mut r).await?;
            self.set_derived_table(name, t);
            tables.push(r);
        }
        // 6. An anonymized user's events come back under the surrogate in the store.
        if let Some(s) = surrogate {
            let catalog = self.catalog().await?;
            let sql = format!(
                "SELECT {} FROM events WHERE user_id = {s}",
                reelhouse_online::rows::COLUMNS
            );
            let batches = catalog.query(&sql).await?;
            let features = self.features_arc();
            self.rotate_cut(move || {
                for b in &batches {
                    let _ = features.apply(b);
                }
            })?;
        }
        // 7. The warehouse from the remaining events, then every old version of it goes.
        let report = self.materialize_locked().await?;
        let mut names: Vec<String> = report.tables.iter().map(|t| t.table.clone()).collect();
        names.retain(|n| self.derived_table(n).is_some());
        for n in names {
            if let Some(t) = self.derived_table(&n) {
                let mut r = TableErasure {
                    table: n.clone(),
                    ..TableErasure::default()
                };
                let t = purge_history(t, &mut r).await?;
                self.set_derived_table(&n, t);
                tables.push(r);
            }
        }
        let files_vacuumed: usize = tables.iter().map(|t| t.files_vacuumed).sum();
        Ok(json!({
            "mode": if surrogate.is_some() { "anonymize" } else { "erase" },
            "tables_touched": tables.iter().filter(|t| t.rows_removed + t.rows_rewritten > 0)
                .map(|t| t.table.clone()).collect::<Vec<_>>(),
            "rows_removed": tables.iter().map(|t| t.rows_removed).sum::<usize>(),
            "rows_rewritten": tables.iter().map(|t| t.rows_rewritten).sum::<usize>(),
            "files_rewritten": tables.iter().map(|t| t.files_rewritten).sum::<usize>(),
            "files_vacuumed": files_vacuumed,
            "versions_vacuumed": tables.iter().map(|t| t.log_entries_removed).sum::<usize>(),
            "tables": tables,
            "online_store": online,
            "online_redis": online_redis,
            "wal_segments_after": wal_segments_left,
            "shared_log": shared_log,
            "warehouse_rebuilt_ms": report.elapsed_ms,
            "warehouse_rebuild": report.mode,
            "warehouse_dates_rebuilt": report.dates.as_ref().map(Vec::len),
        }))
    }

    async fn rewrite_quarantine(
        &self,
        t: reelhouse_lake::deltalake::DeltaTable,
        user: i64,
        r: &mut TableErasure,
    ) -> Result<reelhouse_lake::deltalake::DeltaTable, IngestError> {
        // Only what is committed: rows still pending are flushed later as usual.
        let catalog = reelhouse_lake::query::Catalog::new(vec![(
            RawTable::Quarantine,
            Some(t.clone()),
            vec![],
        )])
        .await?;
        let batches = catalog.query("SELECT * FROM quarantine").await?;
        let mut keep = Vec::new();
        let mut removed = 0;
        for b in &batches {
            let raw = reelhouse_lake::deltalake::arrow::compute::cast(
                b.column_by_name("raw").ok_or(IngestError::ShuttingDown)?,
                &reelhouse_lake::deltalake::arrow::datatypes::DataType::Utf8,
            )
            .map_err(reelhouse_lake::Error::from)?;
            let raw = raw.as_string::<i32>();
            let mask: BooleanArray = (0..raw.len())
                .map(|i| Some(raw.is_null(i) || !raw_names_user(raw.value(i), user)))
                .collect();
            removed += mask.iter().filter(|m| *m == Some(false)).count();
            keep.push(filter_record_batch(b, &mask).map_err(reelhouse_lake::Error::from)?);
        }
        if removed == 0 {
            return Ok(t);
        }
        r.rows_removed += removed;
        r.files_rewritten += t.snapshot().map(|s| s.log_data().num_files()).unwrap_or(0);
        let schema = RawTable::Quarantine.schema();
        let keep = keep
            .iter()
            .map(|b| conform(b, &schema))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(self
            .lake
            .overwrite_derived("quarantine", Some(t), schema, keep, &["received_date"])
            .await?)
    }
}

/// Casts a query result's columns to a table's schema (DataFusion may hand out view types).
fn conform(
    b: &RecordBatch,
    schema: &reelhouse_lake::deltalake::arrow::datatypes::SchemaRef,
) -> Result<RecordBatch, IngestError> {
    let cols = schema
        .fields()
        .iter()
        .map(|f| {
            let c = b
                .column_by_name(f.name())
                .ok_or_else(|| IngestError::BadBody(format!("column {} missing", f.name())))?;
            reelhouse_lake::deltalake::arrow::compute::cast(c, f.data_type())
                .map_err(|e| IngestError::from(reelhouse_lake::Error::from(e)))
        })
        .collect::<Result<Vec<_>, _>>()?;
    RecordBatch::try_new(schema.clone(), cols)
        .map_err(|e| IngestError::from(reelhouse_lake::Error::from(e)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raw_payloads_are_matched_by_user_field() {
        assert!(raw_names_user(r#"{"user_id":5,"x":1}"#, 5));
        assert!(raw_names_user(r#"{"user_id":"5"}"#, 5));
        assert!(!raw_names_user(r#"{"user_id":55}"#, 5));
        assert!(!raw_names_user(r#"{"video_id":5}"#, 5));
        assert!(raw_names_user(r#"{"user_id": 5, "event_time": "#, 5));
        assert!(!raw_names_user(r#"{"user_id": 51, "#, 5));
    }
}
