//! `GET /v1/ingest/lateness` (docs/data-model.md): how late events arrive, as a histogram of
//! `lateness_ms`, and how many arrived beyond the allowed lateness per event date (the dates
//! that `reelhouse restate` would change).

use serde_json::{json, Value};

use crate::{Engine, Error};

/// Bucket upper bounds (exclusive) in milliseconds, with their labels.
const BUCKETS: [(&str, i64); 6] = [
    ("future", 0),
    ("under_1m", 60_000),
    ("1m_to_1h", 3_600_000),
    ("1h_to_1d", 86_400_000),
    ("1d_to_3d", 3 * 86_400_000),
    ("3d_to_7d", 7 * 86_400_000),
];

impl Engine {
    /// The lateness report.
    pub async fn lateness(&self) -> Result<Value, Error> {
        let allowed = self.allowed_lateness().as_millis() as i64;
        let mut cases = Vec::new();
        let mut lower = i64::MIN;
        for (label, upper) in BUCKETS {
            cases.push(format!(
            "count(*) FILTER (WHERE lateness_ms >= {lower} AND lateness_ms < {upper}) AS \"{label}\""
        ));
            lower = upper;
        }
        cases.push(format!(
            "count(*) FILTER (WHERE lateness_ms >= {lower}) AS \"7d_or_more\""
        ));
        let catalog = self.catalog().await?;
        let h = catalog
            .query_json(
                &format!(
                    "SELECT count(*) AS events, {}, \
                 count(*) FILTER (WHERE lateness_ms > {allowed}) AS beyond_allowed, \
                 approx_percentile_cont(lateness_ms, 0.5) AS p50_ms, \
                 approx_percentile_cont(lateness_ms, 0.99) AS p99_ms, max(lateness_ms) AS max_ms \
                 FROM events",
                    cases.join(", ")
                ),
                1,
            )
            .await?;
        let mut summary = serde_json::Map::new();
        if let Some(row) = h.rows.first() {
            for (c, v) in h.columns.iter().zip(row) {
                summary.insert(c.clone(), v.clone());
            }
        }
        let per_date = catalog
            .query_json(
                &format!(
                "SELECT event_date, count(*) AS events FROM events WHERE lateness_ms > {allowed} \
                 GROUP BY event_date ORDER BY event_date"
            ),
                10_000,
            )
            .await?;
        let beyond: Vec<Value> = per_date
            .rows
            .iter()
            .map(|r| json!({"event_date": r[0], "events": r[1]}))
            .collect();
        let histogram: Vec<Value> = BUCKETS
            .iter()
            .map(|(l, _)| *l)
            .chain(["7d_or_more"])
            .map(|l| json!({"bucket": l, "events": summary.get(l).cloned().unwrap_or(json!(0))}))
            .collect();
        Ok(json!({
            "allowed_lateness_ms": allowed,
            "events": summary.get("events").cloned().unwrap_or(json!(0)),
            "histogram": histogram,
            "p50_ms": summary.get("p50_ms").cloned().unwrap_or(Value::Null),
            "p99_ms": summary.get("p99_ms").cloned().unwrap_or(Value::Null),
            "max_ms": summary.get("max_ms").cloned().unwrap_or(Value::Null),
            "beyond_allowed": summary.get("beyond_allowed").cloned().unwrap_or(json!(0)),
            "beyond_allowed_by_date": beyond,
        }))
    }
}
