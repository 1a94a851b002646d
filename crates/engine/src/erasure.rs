//! Erasure orchestration: runs one forget request across every place the user's data went,
//! in an order that leaves nothing behind and survives a crash (a request is resumed at the
//! next start). The table-level steps and the request state are `reelhouse_privacy`'s.
//!
//! ```text
//!  forget ─▶ request saved (+ tombstone for erase) ─▶ 202 {request_id}
//!  run_request (one at a time; resumed after a restart):
//!    online store: forget at a WAL cut ─▶ copy to Redis ─▶ flush (everything acked reaches
//!    Delta, snapshot rewritten, WAL segments deleted) ─▶ events ─▶ quarantine ─▶ dim_updates
//!    ─▶ rebuild the warehouse ─▶ every table: vacuum + checkpoint + drop older log entries
//!    ─▶ receipt, audit row
//!  admission: an event whose user's salted hash is tombstoned is dropped and counted
//! ```

use std::sync::Arc;

use reelhouse_event::UserId;
use reelhouse_lake::erase::TableErasure;
use reelhouse_lake::RawTable;
use reelhouse_privacy::steps::{self, purge_history};
use reelhouse_privacy::{rfc3339, Mode};
use serde_json::{json, Value};

use crate::{Engine, Error};

impl Engine {
    /// Records a forget request (and, for `erase`, the tombstone) durably and starts it.
    pub async fn forget(self: &Arc<Self>, user: UserId, mode: Mode) -> Result<String, Error> {
        self.require_writer()?;
        let request_id = self.privacy.add_request(user, mode, self.now_ms())?;
        let me = Arc::clone(self);
        let id = request_id.clone();
        self.tasks.spawn(async move { me.run_request(&id).await });
        Ok(request_id)
    }

    /// Restarts requests a crash interrupted.
    pub(crate) fn resume_privacy(self: &Arc<Self>) {
        for id in self.privacy.unfinished() {
            let me = Arc::clone(self);
            self.tasks.spawn(async move { me.run_request(&id).await });
        }
    }

    /// The public status of a request.
    pub fn privacy_request(&self, id: &str) -> Option<Value> {
        self.privacy.request(id)
    }

    /// Runs one request to the end (requests run one at a time) and waits for it.
    pub async fn run_request(&self, id: &str) {
        let _one = self.privacy.one_at_a_time().await;
        let Some((user, mode)) = self.privacy.to_run(id) else {
            return;
        };
        let _ = self.privacy.update(id, |r| r.status = "running".into());
        let started = std::time::Instant::now();
        let result = match mode {
            Mode::Erase => self.erase_user(user, None).await,
            Mode::Anonymize => {
                let surrogate = UserId(rand::Rng::gen_range(
                    &mut rand::thread_rng(),
                    (1u64 << 62)..i64::MAX as u64,
                ));
                self.erase_user(user, Some(surrogate)).await
            }
        };
        let finished = rfc3339(self.now_ms());
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
    async fn audit(&self, id: &str, mode: Mode, receipt: &Value) -> Result<(), Error> {
        let (hash, requested) = self.privacy.hash_and_time(id);
        steps::append_audit(&self.lake, id, hash, requested, mode, receipt).await?;
        Ok(())
    }

    /// Erases `user` (or, with a surrogate, anonymizes them) everywhere; returns the receipt.
    async fn erase_user(&self, user: UserId, surrogate: Option<UserId>) -> Result<Value, Error> {
        let mut tables: Vec<TableErasure> = Vec::new();
        // 1. Online store, at an exact point of the log.
        let features = self.features_arc();
        let (_, online) = self.rotate_cut(move || features.forget_user(user.as_i64()))?;
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
        let _flush = self.flusher.lock.lock().await;
        let _mat = self.materializer.lock.lock().await;
        let _dims = self.materializer.dims_lock.lock().await;
        // 3. events.
        let current = self.raw_table(RawTable::Events);
        if let Some(t) = current {
            let mut r = TableErasure {
                table: "events".into(),
                ..TableErasure::default()
            };
            let t = steps::erase_events(t, user, surrogate, &mut r).await?;
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
            let t = steps::rewrite_quarantine(&self.lake, t, user, &mut r).await?;
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
            let t = steps::erase_dim_updates(t, user, surrogate, &mut r).await?;
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
}
