//! Physical erasure in Delta tables: delete or rewrite rows, then remove every trace of the
//! old versions — the data files (vacuum with zero retention) and the commit files whose
//! add actions keep per-file min/max statistics in clear text (checkpoint at the latest
//! version, then delete all older log entries). Time travel before that point ends: that is
//! the point.
//!
//! ```text
//!  delete / update (rewrites the files holding the rows) ─▶ vacuum, retention 0
//!    ─▶ checkpoint at the latest version ─▶ delete _delta_log entries older than it
//! ```

use deltalake::parquet::file::properties::WriterProperties;
use deltalake::DeltaTable;

use crate::Result;

/// What one table's erasure step did.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct TableErasure {
    pub table: String,
    pub rows_removed: usize,
    pub rows_rewritten: usize,
    pub files_rewritten: usize,
    pub files_vacuumed: usize,
    pub log_entries_removed: usize,
}

/// Deletes the rows matching `predicate` (SQL over the table's columns); files that keep
/// rows are rewritten with `props` (the table's own settings, e.g.
/// [`crate::RawTable::rewrite_properties`]; delta-rs's defaults when `None`).
pub async fn delete_where(
    table: DeltaTable,
    predicate: &str,
    props: Option<WriterProperties>,
    report: &mut TableErasure,
) -> Result<DeltaTable> {
    let mut b = table.delete().with_predicate(predicate.to_string());
    if let Some(p) = props {
        b = b.with_writer_properties(p);
    }
    let (table, m) = b.await?;
    report.rows_removed += m.num_deleted_rows.unwrap_or(0);
    report.files_rewritten += m.num_removed_files;
    Ok(table)
}

/// Sets `columns` (name, SQL expression) on the rows matching `predicate`, rewriting their
/// files with `props` (as [`delete_where`]).
pub async fn update_where(
    table: DeltaTable,
    predicate: &str,
    columns: &[(&str, String)],
    props: Option<WriterProperties>,
    report: &mut TableErasure,
) -> Result<DeltaTable> {
    let mut b = table.update().with_predicate(predicate.to_string());
    if let Some(p) = props {
        b = b.with_writer_properties(p);
    }
    for (c, e) in columns {
        b = b.with_update(c.to_string(), e.clone());
    }
    let (table, m) = b.await?;
    report.rows_rewritten += m.num_updated_rows;
    report.files_rewritten += m.num_removed_files;
    Ok(table)
}

/// Removes every file and log entry of versions before the latest one, and every data file
/// the log does not reference.
pub async fn purge_history(table: DeltaTable, report: &mut TableErasure) -> Result<DeltaTable> {
    let (mut table, m) = table
        .vacuum()
        .with_retention_period(chrono::Duration::zero())
        .with_enforce_retention_duration(false)
        .with_dry_run(false)
        // Full: also files the log never knew, e.g. Parquet written by a commit that a crash
        // interrupted (they can hold exactly the rows being erased).
        .with_mode(deltalake::operations::vacuum::VacuumMode::Full)
        .await?;
    report.files_vacuumed += m.files_deleted.len();
    table.update_state().await?;
    deltalake::checkpoints::create_checkpoint(&table, None).await?;
    let version = table.version().unwrap_or(0);
    // Delta compares this with the log files' modification times, which are the machine's
    // wall clock (not the engine's injected clock).
    let cutoff = chrono::Utc::now().timestamp_millis() + 60_000;
    report.log_entries_removed += deltalake::checkpoints::cleanup_expired_logs_for(
        version,
        table.log_store().as_ref(),
        cutoff,
        None,
    )
    .await?;
    table.update_state().await?;
    Ok(table)
}
