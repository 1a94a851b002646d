//! Replication for a deployment with several processes: the writer's copy of changed feature
//! records to Redis, its lease on tables on an object store, and the mirror of the shared
//! state files next to those tables.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use reelhouse_lake::store::write_atomically;
use reelhouse_lake::Lake;
use tokio_util::sync::CancellationToken;

use crate::tasks::stop_within;
use crate::{Engine, Error};

/// How often the writer copies changed feature records to Redis (`--online redis://`): a
/// bound on how much later a replica sees a change than the writer's own store.
pub const ONLINE_COPY_INTERVAL: Duration = Duration::from_millis(5);

/// The replication component of the engine.
pub(crate) struct Replication {
    /// Copies of changed feature records to Redis go one at a time (a copy taken before an
    /// erasure must not land after the erasure's delete).
    pub(crate) online_copy: tokio::sync::Mutex<()>,
    /// Content hashes of the state files last copied next to tables on an object store.
    pub(crate) mirrored: Mutex<HashMap<&'static str, u64>>,
    /// The writer's lease on tables on an object store (see `reelhouse_lake::store`).
    pub(crate) lease: tokio::sync::Mutex<Option<reelhouse_lake::store::WriterLease>>,
    /// Another process took the lease over: this one commits nothing more.
    pub(crate) lease_lost: AtomicBool,
}

impl Replication {
    pub(crate) fn new(lease: Option<reelhouse_lake::store::WriterLease>) -> Self {
        Replication {
            online_copy: tokio::sync::Mutex::new(()),
            mirrored: Mutex::new(HashMap::new()),
            lease: tokio::sync::Mutex::new(lease),
            lease_lost: AtomicBool::new(false),
        }
    }
}

/// State files under `_state/` that every process of a deployment shares; with tables on an
/// object store they are mirrored next to the tables (see `reelhouse_lake::store`).
pub(crate) const SHARED_STATE: [&str; 3] = ["log.json", "late_data.json", "privacy/state.json"];

/// How long a writer's lease on object-store tables lasts without renewal (renewed every
/// third of it): how long a replacement on another machine waits after a crash.
pub const LEASE_TTL: Duration = Duration::from_secs(30);

/// This state directory's writer identity (random, made once): a restart on the same
/// directory takes its own lease back at once.
pub(crate) fn writer_id(root: &Path) -> Result<String, Error> {
    let path = root.join("_state").join("writer_id");
    match std::fs::read_to_string(&path) {
        Ok(id) if !id.trim().is_empty() => Ok(id.trim().to_string()),
        _ => {
            let id = hex::encode(rand::random::<[u8; 16]>());
            write_atomically(&path, id.as_bytes())?;
            Ok(id)
        }
    }
}

/// A writer starting on tables on an object store takes the mirrored shared state files
/// when it has no local copy (a new machine) or when another writer held the tables since
/// (`theirs`: its copies are newer). A restart of the last writer keeps its local files, which
/// may be up to a second newer than the mirror.
pub(crate) async fn restore_state_files(lake: &Lake, theirs: bool) -> Result<(), Error> {
    for rel in SHARED_STATE {
        let local = lake.root().join("_state").join(rel);
        if local.exists() && !theirs {
            continue;
        }
        if let Some(bytes) = lake.tables().get_state(rel).await? {
            tracing::info!(file = rel, "restored a state file from the object store");
            write_atomically(&local, &bytes)?;
        }
    }
    Ok(())
}

impl Engine {
    /// Redis, when this process answers features from it (an API replica configured with
    /// `--online redis://`); `None`: answer from the in-process store.
    pub fn online_reader(&self) -> Option<&reelhouse_online::redis::RedisStore> {
        self.config.online.as_deref().filter(|_| !self.is_writer())
    }

    /// Where features live, for health: `in-process` or the Redis address.
    pub fn online_backend(&self) -> String {
        match &self.config.online {
            Some(r) if self.is_writer() => format!("in-process, copied to {}", r.describe()),
            Some(r) => r.describe(),
            None => "in-process".into(),
        }
    }

    /// Keys written to Redis and failed copies since start (0, 0 without Redis).
    pub fn online_copy_stats(&self) -> (u64, u64) {
        (
            self.metrics.online_keys_written.get(),
            self.metrics.online_copy_errors.get(),
        )
    }

    /// Copies every feature record changed since the last copy to Redis (the writer of a
    /// deployment with `--online redis://`; `None` otherwise). A failed copy is retried by
    /// the next one.
    pub async fn copy_online(&self) -> Result<Option<reelhouse_online::redis::WriteReport>, Error> {
        let Some(redis) = self.config.online.as_deref().filter(|_| self.is_writer()) else {
            return Ok(None);
        };
        let _one = self.replication.online_copy.lock().await;
        let changes = self.features.take_changes();
        if changes.is_empty() {
            return Ok(Some(Default::default()));
        }
        match redis.write(&changes).await {
            Ok(r) => {
                self.metrics
                    .online_keys_written
                    .inc_by(changes.len() as u64);
                Ok(Some(r))
            }
            Err(e) => {
                self.metrics.online_copy_errors.inc_by(1);
                self.features
                    .retry_changes(changes.into_iter().map(|(k, _)| k));
                Err(e.into())
            }
        }
    }

    /// Whether Redis still holds a record of `user` (false without Redis).
    pub(crate) async fn online_has_user(
        &self,
        user: reelhouse_event::UserId,
    ) -> Result<bool, Error> {
        match self.config.online.as_deref() {
            Some(r) => Ok(r.get(reelhouse_online::Key::User(user.0)).await?.is_some()),
            None => Ok(false),
        }
    }

    /// The writer with Redis: copies changed feature records every [`ONLINE_COPY_INTERVAL`]
    /// until `stop`.
    pub async fn run_online_copier(self: Arc<Self>, stop: CancellationToken) {
        let interval = ONLINE_COPY_INTERVAL;
        let mut failing = false;
        loop {
            let wait = if failing {
                Duration::from_secs(1)
            } else {
                interval
            };
            let stopping = stop_within(wait, &stop).await;
            if stopping {
                // What the last records changed, before the process goes.
                if let Err(e) = self.copy_online().await {
                    tracing::warn!(error = %e, "last copy to redis failed; the next start copies everything");
                }
                return;
            }
            match self.copy_online().await {
                Ok(_) => failing = false,
                Err(e) => {
                    if !failing {
                        tracing::error!(error = %e, "copying features to redis failed; retrying");
                    }
                    failing = true;
                }
            }
        }
    }

    /// The writer with tables on an object store: copies the shared state files that changed
    /// since the last copy next to the tables (a no-op for a local data directory).
    pub async fn mirror_state(&self) -> Result<usize, Error> {
        if !self.lake.tables().is_remote() || !self.is_writer() {
            return Ok(0);
        }
        let mut copied = 0;
        for rel in SHARED_STATE {
            let Ok(bytes) = std::fs::read(self.lake.root().join("_state").join(rel)) else {
                continue;
            };
            let hash = xxhash_rust::xxh3::xxh3_64(&bytes);
            let last = self
                .replication
                .mirrored
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(rel)
                .copied();
            if last == Some(hash) {
                continue;
            }
            self.lake.tables().put_state(rel, bytes).await?;
            self.replication
                .mirrored
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(rel, hash);
            copied += 1;
        }
        Ok(copied)
    }

    /// Renews the writer lease every third of [`LEASE_TTL`] until `stop`, then gives it up.
    /// Losing it (another process took over) stops this process's commits.
    pub async fn run_lease_renewal(self: Arc<Self>, stop: CancellationToken) {
        loop {
            let stopping = stop_within(LEASE_TTL / 3, &stop).await;
            let mut lease = self.replication.lease.lock().await;
            let Some(cur) = lease.as_ref() else { return };
            if stopping {
                // After the final flush has committed; the next writer need not wait.
                return;
            }
            match self.lake.tables().renew_writer(cur, self.now_ms()).await {
                Ok(next) => *lease = Some(next),
                Err(e @ reelhouse_lake::Error::LeaseLost(_)) => {
                    tracing::error!(error = %e, "lost the writer lease");
                    self.replication.lease_lost.store(true, Ordering::Relaxed);
                    return;
                }
                Err(e) => tracing::warn!(error = %e, "could not renew the writer lease; retrying"),
            }
        }
    }

    /// Ends the engine without a last flush: waits for its background work (a privacy
    /// request resumed at open runs to its end), then, for a writer with tables on an object
    /// store, copies the shared state files there and gives the writer lease up. One-shot
    /// commands end with it; [`Engine::shutdown`] flushes first.
    pub async fn close(&self) {
        self.tasks.stop_and_wait().await;
        if let Err(e) = self.mirror_state().await {
            tracing::warn!(error = %e, "could not copy state files to the object store");
        }
        self.release_lease().await;
    }

    /// Gives the writer lease up (at shutdown, after the last commit).
    pub(crate) async fn release_lease(&self) {
        if let Some(l) = self.replication.lease.lock().await.take() {
            if let Err(e) = self.lake.tables().release_writer(&l).await {
                tracing::warn!(error = %e, "could not release the writer lease; it expires by itself");
            }
        }
    }

    /// Mirrors the shared state every `interval` (and once more at `stop`).
    pub async fn run_state_mirror(self: Arc<Self>, interval: Duration, stop: CancellationToken) {
        loop {
            let stopping = stop_within(interval, &stop).await;
            if let Err(e) = self.mirror_state().await {
                tracing::warn!(error = %e, "could not copy state files to the object store; retrying");
            }
            if stopping {
                return;
            }
        }
    }
}
