//! What erasure, anonymization and retention do to one table. Each step takes the table's
//! current version and returns the new one, adding what it did to a [`TableErasure`]; the
//! caller (the engine) holds the locks, orders the steps and publishes the new versions.
//!
//! ```text
//!  events         ─▶ erase_events      (DELETE, or UPDATE to a surrogate and null device fields)
//!  quarantine     ─▶ rewrite_quarantine (raw payloads naming the user go; they cannot be anonymized)
//!  dim_updates    ─▶ erase_dim_updates  (the user's upserts go, or move to the surrogate)
//!  every table    ─▶ purge_history      (vacuum, checkpoint, older log entries dropped)
//!  privacy_audit  ◀─ append_audit       (salted hash, never the clear id)
//!  raw tables     ─▶ expire_partitions  (retention: whole partitions before a date)
//! ```

use std::sync::Arc;

use reelhouse_lake::deltalake::arrow::array::{Array, AsArray, BooleanArray, RecordBatch};
use reelhouse_lake::deltalake::arrow::compute::filter_record_batch;
use reelhouse_lake::deltalake::DeltaTable;
use reelhouse_lake::erase::{delete_where, update_where, TableErasure};
use reelhouse_lake::{Lake, RawTable};
use serde_json::Value;

pub use reelhouse_lake::erase::purge_history;

use reelhouse_event::UserId;

use crate::{raw_names_user, Error, Mode, Result};

/// `events` without `user`'s rows (`surrogate`: with their id replaced and device fields
/// cleared instead).
pub async fn erase_events(
    t: DeltaTable,
    user: UserId,
    surrogate: Option<UserId>,
    r: &mut TableErasure,
) -> Result<DeltaTable> {
    let pred = format!("user_id = {user}");
    let props = Some(RawTable::Events.rewrite_properties(&t)?);
    Ok(match surrogate {
        None => delete_where(t, &pred, props, r).await?,
        Some(s) => {
            let null = "CAST(NULL AS STRING)".to_string();
            let cols = [
                ("user_id", s.to_string()),
                ("device_os", null.clone()),
                ("device_app_version", null.clone()),
                ("device_country", null),
            ];
            update_where(t, &pred, &cols, props, r).await?
        }
    })
}

/// The dimension upserts without `user`'s (`surrogate`: moved to the surrogate id).
pub async fn erase_dim_updates(
    t: DeltaTable,
    user: UserId,
    surrogate: Option<UserId>,
    r: &mut TableErasure,
) -> Result<DeltaTable> {
    let pred = format!("kind = 'users' AND id = {user}");
    let props = Some(reelhouse_lake::derived_rewrite_properties(&t)?);
    Ok(match surrogate {
        None => delete_where(t, &pred, props, r).await?,
        Some(s) => {
            let id = [("id", s.to_string())];
            update_where(t, &pred, &id, props, r).await?
        }
    })
}

/// `quarantine` without the raw payloads that name `user` (committed rows only: rows still
/// pending are flushed later as usual).
pub async fn rewrite_quarantine(
    lake: &Lake,
    t: DeltaTable,
    user: UserId,
    r: &mut TableErasure,
) -> Result<DeltaTable> {
    let catalog =
        reelhouse_lake::query::Catalog::new(vec![(RawTable::Quarantine, Some(t.clone()), vec![])])
            .await?;
    let batches = catalog.query("SELECT * FROM quarantine").await?;
    let mut keep = Vec::new();
    let mut removed = 0;
    for b in &batches {
        let raw = reelhouse_lake::deltalake::arrow::compute::cast(
            b.column_by_name("raw")
                .ok_or_else(|| Error::Malformed("quarantine has no raw column".into()))?,
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
        .map(|b| reelhouse_lake::query::conform(b, &schema))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(lake
        .overwrite_derived("quarantine", Some(t), schema, keep, &["received_date"])
        .await?)
}

/// Deletes the partitions of raw table `t` whose `col` is before `date` (`YYYY-MM-DD`) and
/// vacuums their files (retention).
pub async fn expire_partitions(
    t: RawTable,
    table: DeltaTable,
    col: &str,
    date: &str,
    rep: &mut TableErasure,
) -> Result<DeltaTable> {
    let pred = format!("{col} < '{date}'");
    let props = Some(t.rewrite_properties(&table)?);
    let table = delete_where(table, &pred, props, rep).await?;
    Ok(purge_history(table, rep).await?)
}

/// Appends one finished request to the `privacy_audit` table: its id, the user's salted hash
/// (never the clear id), the mode, when it was asked for and finished, and the receipt.
pub async fn append_audit(
    lake: &Lake,
    id: &str,
    user_hash: String,
    requested_at: String,
    mode: Mode,
    receipt: &Value,
) -> Result<()> {
    use reelhouse_lake::deltalake::arrow::array::StringArray;
    use reelhouse_lake::deltalake::arrow::datatypes::{DataType, Field, Schema};
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
            col(user_hash),
            col(mode),
            col(requested_at),
            col(receipt["finished_at"]
                .as_str()
                .unwrap_or_default()
                .to_string()),
            col(receipt.to_string()),
        ],
    )
    .map_err(reelhouse_lake::Error::from)?;
    let current = lake.load_derived("privacy_audit").await?;
    lake.append_table("privacy_audit", current, batch).await?;
    Ok(())
}
