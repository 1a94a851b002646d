//! Compaction of the small files that frequent flushes and late events leave in a raw table.
//!
//! Every flush writes one file per date it touched, so a server taking a steady trickle of
//! events adds a file to today's partition every flush interval (8,640 a day at 10 s), and late
//! events add small files to old dates. Every scan (the materializer reads `events` on each
//! rebuild, SQL, erasure lookups) then opens and decodes the footers of all of them. Once a
//! partition holds [`MIN_SMALL_FILES`] files under [`SMALL_FILE_BYTES`], Delta's `OPTIMIZE`
//! (delta-rs) bins its files under [`TARGET_FILE_BYTES`] into files of up to that size, in one
//! commit; the rows do not change, so nothing derived from them has to be rebuilt.
//!
//! ```text
//!  date=D: f1 f2 … f16 (small) ──optimize (bins ≤ target)──▶ date=D: F
//!          (one commit: add F, remove f1 … f16)
//! ```

use deltalake::kernel::schema::partitions::{FilterOp, FilterValue};
use deltalake::DeltaTable;
use std::collections::BTreeMap;
use std::num::NonZeroU64;

use crate::{RawTable, Result};

/// Files smaller than this are compaction candidates, and compaction writes files up to it.
/// One day of the reference load (1M events) is a ~37 MB file, so a day's flushes end up in
/// one file.
pub const TARGET_FILE_BYTES: u64 = 64 << 20;

/// A file under this size counts towards [`MIN_SMALL_FILES`]: half the target, so the files a
/// compaction writes (full bins, near the target) never trigger another one by themselves.
pub const SMALL_FILE_BYTES: u64 = TARGET_FILE_BYTES / 2;

/// A partition is compacted once it holds this many files under [`SMALL_FILE_BYTES`]: at a
/// 10 s flush interval today's partition is rewritten about every 160 s, and one file per
/// date is left alone.
pub const MIN_SMALL_FILES: usize = 16;

/// What one compaction did.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Compaction {
    pub table: String,
    /// The partition values (dates) compacted.
    pub partitions: Vec<String>,
    pub files_removed: u64,
    pub files_added: u64,
}

/// The partitions of `table` (values of `t`'s partition column) that hold at least
/// `min_files` files under [`SMALL_FILE_BYTES`].
pub fn partitions_to_compact(
    t: RawTable,
    table: &DeltaTable,
    min_files: usize,
) -> Result<Vec<String>> {
    let mut small: BTreeMap<String, usize> = BTreeMap::new();
    for f in table.snapshot()?.log_data() {
        if (f.size() as u64) < SMALL_FILE_BYTES {
            let value = f
                .partition_values_map()
                .get(t.partition_column())
                .cloned()
                .flatten()
                .unwrap_or_default();
            *small.entry(value).or_default() += 1;
        }
    }
    Ok(small
        .into_iter()
        .filter(|(_, n)| *n >= min_files)
        .map(|(p, _)| p)
        .collect())
}

/// Compacts the files under [`TARGET_FILE_BYTES`] of the partitions of `table` that hold at
/// least `min_files` files under [`SMALL_FILE_BYTES`] (see [`partitions_to_compact`]),
/// writing with `t`'s own Parquet settings (bloom filters included) in one Delta commit.
/// Returns the table unchanged when no partition qualifies. The caller keeps other writers of
/// `t` out meanwhile (the flush lock): the rewrite must not race an append's commit.
pub async fn compact(
    t: RawTable,
    table: DeltaTable,
    min_files: usize,
) -> Result<(DeltaTable, Compaction)> {
    let mut report = Compaction {
        table: t.name().to_string(),
        ..Compaction::default()
    };
    let parts = partitions_to_compact(t, &table, min_files)?;
    if parts.is_empty() {
        return Ok((table, report));
    }
    let props = t.rewrite_properties(&table)?;
    let values: Vec<&str> = parts.iter().map(String::as_str).collect();
    let filters = [(t.partition_column(), FilterOp::In, FilterValue::Set(values))];
    let target = NonZeroU64::new(TARGET_FILE_BYTES).expect("non-zero target");
    let (table, m) = table
        .optimize()
        .with_filters(&filters)
        .with_target_size(target)
        .with_writer_properties(props)
        .await?;
    report.files_removed = m.num_files_removed;
    report.files_added = m.num_files_added;
    report.partitions = parts;
    Ok((table, report))
}
