//! Privacy state and the table-level steps of erasure, anonymization and retention.
//!
//! This crate holds what a forget request *is* (its durable state, the salted-hash
//! tombstones, the audit row) and what it does to one table (see [`steps`]). The order of the
//! steps across the online store, the log, the tables and the warehouse is the engine's
//! (`reelhouse_engine::erasure`), which calls this crate; this crate never calls the engine.
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

pub mod steps;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, RwLock};

use reelhouse_event::UserId;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use sha2::Digest;

/// Errors of the privacy steps.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("privacy state: {0}")]
    Io(#[from] std::io::Error),
    // No `#[from]` source: the message holds the inner error already.
    #[error("table storage error: {0}")]
    Lake(reelhouse_lake::Error),
    #[error("{0}")]
    Malformed(String),
}

impl From<reelhouse_lake::Error> for Error {
    fn from(e: reelhouse_lake::Error) -> Self {
        Error::Lake(e)
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// `erase` removes the user; `anonymize` replaces their id by a random surrogate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    Erase,
    Anonymize,
}

/// One forget request as stored.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Request {
    pub request_id: String,
    pub mode: Mode,
    pub user_hash: String,
    pub status: String,
    pub requested_at: String,
    pub finished_at: Option<String>,
    pub receipt: Option<Value>,
    pub error: Option<String>,
    /// Only while pending or running.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_id: Option<i64>,
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

/// An epoch-millisecond instant (from the engine's clock) as RFC 3339 with milliseconds, as
/// the receipts write times.
pub fn rfc3339(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .unwrap_or_default()
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
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
    pub fn user_hash(&self, user: UserId) -> String {
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
    pub fn is_tombstoned(&self, user: UserId) -> bool {
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
        reelhouse_lake::store::write_atomically(&self.dir.join("state.json"), &bytes)
    }

    /// Changes one stored request and saves the state.
    pub fn update(&self, id: &str, f: impl FnOnce(&mut Request)) -> std::io::Result<()> {
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

    /// Requests a crash interrupted (pending or running).
    pub fn unfinished(&self) -> Vec<String> {
        let s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        s.requests
            .iter()
            .filter(|r| r.status == "pending" || r.status == "running")
            .map(|r| r.request_id.clone())
            .collect()
    }
}

impl Privacy {
    /// Records a forget request (and, for `erase`, the tombstone) durably; returns its id.
    /// From here on, events of an erased user are dropped at ingest.
    pub fn add_request(&self, user: UserId, mode: Mode, now_ms: i64) -> std::io::Result<String> {
        let request_id = format!("fr-{}", hex::encode(rand::random::<[u8; 12]>()));
        let hash = self.user_hash(user);
        {
            let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
            if mode == Mode::Erase && !s.tombstones.contains(&hash) {
                s.tombstones.push(hash.clone());
            }
            s.requests.push(Request {
                request_id: request_id.clone(),
                mode,
                user_hash: hash.clone(),
                status: "pending".into(),
                requested_at: rfc3339(now_ms),
                finished_at: None,
                receipt: None,
                error: None,
                user_id: Some(user.as_i64()),
            });
        }
        if mode == Mode::Erase {
            self.tombstones
                .write()
                .unwrap_or_else(|e| e.into_inner())
                .insert(hash);
        }
        self.save()?;
        Ok(request_id)
    }

    /// The user and mode of a request still to run (`None`: done, failed or unknown).
    pub fn to_run(&self, id: &str) -> Option<(UserId, Mode)> {
        let s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        s.requests
            .iter()
            .find(|r| r.request_id == id)
            .filter(|r| r.status == "pending" || r.status == "running")
            .and_then(|r| Some((UserId(u64::try_from(r.user_id?).ok()?), r.mode)))
    }

    /// The salted hash and request time of a request (for its audit row).
    pub fn hash_and_time(&self, id: &str) -> (String, String) {
        let s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let r = s.requests.iter().find(|r| r.request_id == id);
        (
            r.map(|r| r.user_hash.clone()).unwrap_or_default(),
            r.map(|r| r.requested_at.clone()).unwrap_or_default(),
        )
    }

    /// Held while one request runs: requests run one at a time.
    pub async fn one_at_a_time(&self) -> tokio::sync::MutexGuard<'_, ()> {
        self.worker.lock().await
    }
}

/// Does a raw quarantined payload name this user (as `"user_id": 5` or `"user_id": "5"`)?
pub fn raw_names_user(raw: &str, user: UserId) -> bool {
    if let Ok(Value::Object(o)) = serde_json::from_str::<Value>(raw) {
        return match o.get("user_id") {
            Some(Value::Number(n)) => n.as_u64() == Some(user.0),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raw_payloads_are_matched_by_user_field() {
        assert!(raw_names_user(r#"{"user_id":5,"x":1}"#, UserId(5)));
        assert!(raw_names_user(r#"{"user_id":"5"}"#, UserId(5)));
        assert!(!raw_names_user(r#"{"user_id":55}"#, UserId(5)));
        assert!(!raw_names_user(r#"{"video_id":5}"#, UserId(5)));
        assert!(raw_names_user(
            r#"{"user_id": 5, "event_time": "#,
            UserId(5)
        ));
        assert!(!raw_names_user(r#"{"user_id": 51, "#, UserId(5)));
    }
}
