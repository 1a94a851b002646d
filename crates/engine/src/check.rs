//! `reelhouse check`: the online store's totals (views, likes, shares, comments per video;
//! followers per creator) compared with the latest materialized warehouse tables.

use std::collections::{BTreeSet, HashMap};

use reelhouse_lake::deltalake::arrow::array::{Array, AsArray};
use reelhouse_lake::deltalake::arrow::datatypes::{DataType, Int64Type};
use serde::Serialize;

use crate::{Engine, Error};

/// One disagreement between the online store and the warehouse.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Difference {
    pub entity: &'static str,
    pub id: i64,
    pub field: &'static str,
    pub online: i64,
    pub warehouse: i64,
}

/// What `reelhouse check` reports.
#[derive(Debug, Clone, Serialize)]
pub struct CheckReport {
    pub videos_compared: usize,
    pub creators_compared: usize,
    pub differences: usize,
    /// At most the first 1,000 differences.
    pub examples: Vec<Difference>,
}

/// Per-video warehouse totals in the order of [`reelhouse_online::Totals`].
const WAREHOUSE_VIDEOS: &str = "
WITH v AS (SELECT video_id, count(*) AS n FROM fact_video_view GROUP BY video_id),
l AS (SELECT video_id, count(*) FILTER (WHERE liked) AS n FROM like_state GROUP BY video_id),
s AS (SELECT video_id, count(DISTINCT share_id) AS n FROM fact_engagement
      WHERE event_type = 'share' GROUP BY video_id),
c AS (SELECT video_id, count(*) AS n FROM fact_engagement
      WHERE event_type = 'comment' GROUP BY video_id),
k AS (SELECT video_id FROM v UNION SELECT video_id FROM l UNION SELECT video_id FROM s
      UNION SELECT video_id FROM c)
SELECT k.video_id, coalesce(v.n, 0), coalesce(l.n, 0), coalesce(s.n, 0), coalesce(c.n, 0)
FROM k LEFT JOIN v ON k.video_id = v.video_id LEFT JOIN l ON k.video_id = l.video_id
LEFT JOIN s ON k.video_id = s.video_id LEFT JOIN c ON k.video_id = c.video_id
WHERE k.video_id IS NOT NULL";

const WAREHOUSE_CREATORS: &str = "
SELECT creator_id, count(*) FILTER (WHERE following) FROM follow_state GROUP BY creator_id";

async fn int_rows(
    catalog: &reelhouse_lake::query::Catalog,
    sql: &str,
) -> Result<Vec<Vec<i64>>, Error> {
    let mut out = Vec::new();
    for b in catalog.query(sql).await? {
        let cols = b
            .columns()
            .iter()
            .map(|c| {
                reelhouse_lake::deltalake::arrow::compute::cast(c, &DataType::Int64)
                    .map(|a| a.as_primitive::<Int64Type>().clone())
                    .map_err(|_| Error::Internal("a warehouse count could not be read"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        for i in 0..b.num_rows() {
            out.push(
                cols.iter()
                    .map(|c| if c.is_valid(i) { c.value(i) } else { 0 })
                    .collect(),
            );
        }
    }
    Ok(out)
}

/// Compares the online totals (views, likes, shares, comments per video; followers per
/// creator) with the latest materialized warehouse tables.
pub async fn check(engine: &Engine) -> Result<CheckReport, Error> {
    let catalog = engine.catalog().await?;
    // Without a materialized warehouse there is nothing to compare with.
    for t in [
        "fact_video_view",
        "like_state",
        "fact_engagement",
        "follow_state",
    ] {
        if !catalog.context().table_exist(t).unwrap_or(false) {
            return Err(Error::NotReady(format!(
                "the warehouse has no {t} table yet; run `reelhouse materialize` first"
            )));
        }
    }
    let online = engine.features().totals();
    let mut wh_videos: HashMap<i64, (i64, i64, i64, i64)> = HashMap::new();
    for r in int_rows(&catalog, WAREHOUSE_VIDEOS).await? {
        wh_videos.insert(r[0], (r[1], r[2], r[3], r[4]));
    }
    let mut wh_creators: HashMap<i64, i64> = HashMap::new();
    for r in int_rows(&catalog, WAREHOUSE_CREATORS).await? {
        wh_creators.insert(r[0], r[1]);
    }
    let mut diffs = Vec::new();
    let video_ids: BTreeSet<i64> = online
        .videos
        .keys()
        .chain(wh_videos.keys())
        .copied()
        .collect();
    for id in &video_ids {
        let a = online.videos.get(id).copied().unwrap_or_default();
        let b = wh_videos.get(id).copied().unwrap_or_default();
        for (field, x, y) in [
            ("views_total", a.0, b.0),
            ("likes", a.1, b.1),
            ("shares", a.2, b.2),
            ("comments", a.3, b.3),
        ] {
            if x != y {
                diffs.push(Difference {
                    entity: "video",
                    id: *id,
                    field,
                    online: x,
                    warehouse: y,
                });
            }
        }
    }
    let creator_ids: BTreeSet<i64> = online
        .creators
        .keys()
        .chain(wh_creators.keys())
        .copied()
        .collect();
    for id in &creator_ids {
        let x = online.creators.get(id).copied().unwrap_or_default();
        let y = wh_creators.get(id).copied().unwrap_or_default();
        if x != y {
            diffs.push(Difference {
                entity: "creator",
                id: *id,
                field: "followers",
                online: x,
                warehouse: y,
            });
        }
    }
    Ok(CheckReport {
        videos_compared: video_ids.len(),
        creators_compared: creator_ids.len(),
        differences: diffs.len(),
        examples: diffs.into_iter().take(1000).collect(),
    })
}

impl Engine {
    /// See [`check`].
    pub async fn check(&self) -> Result<CheckReport, Error> {
        check(self).await
    }
}
