//! Dimension upserts (`PUT /v1/dims/{kind}`): SCD2 rows appended durably in one commit; the
//! next rebuild recomputes the dimension tables.

use serde::Serialize;

use crate::{Engine, Error, MAX_ERRORS};

/// The answer to `PUT /v1/dims/{kind}`.
#[derive(Debug, Clone, Serialize)]
pub struct DimsOutcome {
    pub accepted: usize,
    pub rejected: usize,
    pub errors: Vec<reelhouse_warehouse::dims::UpsertError>,
}

impl Engine {
    /// Appends SCD2 upserts for one dimension (`PUT /v1/dims/{kind}`), durably, in one Delta
    /// commit; the next materialization rebuilds the dimension tables.
    pub async fn upsert_dims(
        &self,
        kind: reelhouse_warehouse::dims::DimKind,
        body: &[u8],
    ) -> Result<DimsOutcome, Error> {
        self.require_writer()?;
        let now = self.config.clock.now_ms();
        let (batch, accepted, errors) = reelhouse_warehouse::dims::parse_upserts(kind, body, now);
        let rejected = errors.len();
        if let Some(batch) = batch {
            let _guard = self.materializer.dims_lock.lock().await;
            let name = reelhouse_warehouse::dims::UPDATES_TABLE;
            let current = {
                let v = self.view.lock().unwrap_or_else(|p| p.into_inner());
                v.derived.get(name).cloned()
            };
            let table = self.lake.append_table(name, current, batch).await?;
            self.view
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .derived
                .insert(name.to_string(), table);
            self.metrics.dim_upserts.inc_by(accepted as u64);
        }
        Ok(DimsOutcome {
            accepted,
            rejected,
            errors: errors.into_iter().take(MAX_ERRORS).collect(),
        })
    }
}
