//! Measures what reading `events` costs a rebuild: the columns the models read, the ones the
//! dimensions read, both at once, and single columns, each collected in memory through the
//! same catalog the warehouse uses (two rounds, CPU time of the process beside wall time).
//!
//! ```text
//! cargo run --release -p reelhouse-lake --example read_cost -- DATA_DIR
//! ```

use std::time::Instant;

use reelhouse_lake::query::Catalog;
use reelhouse_lake::{Lake, RawTable};

/// User + system CPU seconds of this process so far.
fn cpu() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").expect("stat");
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .expect("comm")
        .1
        .split_whitespace()
        .collect();
    let ticks = |i: usize| fields[i].parse::<f64>().expect("ticks");
    (ticks(11) + ticks(12)) / 100.0
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let dir = std::env::args().nth(1).expect("DATA_DIR");
    let lake = Lake::open(&dir).expect("lake");
    let events = lake.load(RawTable::Events).await.expect("load");
    let catalog = Catalog::new(vec![(RawTable::Events, events, Vec::new())])
        .await
        .expect("catalog");
    let models = "event_id, event_type, event_time, user_id, session_id, video_id, \
      creator_id, view_id, source, via_share_id, watch_ms, video_duration_ms, comment_id, \
      share_id, parent_share_id, channel, received_at, event_date";
    let dims = "user_id, video_id, creator_id, event_time, event_id, device_country, \
      device_os, device_app_version, video_duration_ms";
    let both = format!("{models}, device_country, device_os, device_app_version");
    for round in 0..2 {
        for (label, cols) in [
            ("models' columns", models.to_string()),
            ("dimensions' columns", dims.to_string()),
            ("both", both.clone()),
            ("event_id", "event_id".into()),
            ("view_id", "view_id".into()),
            ("session_id", "session_id".into()),
            ("event_type", "event_type".into()),
            ("user_id, event_time", "user_id, event_time".into()),
        ] {
            let (t, c) = (Instant::now(), cpu());
            let rows: usize = catalog
                .context()
                .sql(&format!("SELECT {cols} FROM events"))
                .await
                .expect("sql")
                .collect()
                .await
                .expect("collect")
                .iter()
                .map(|b| b.num_rows())
                .sum();
            println!(
                "round {round}: {label}: {rows} rows, {} ms wall, {:.2} s CPU",
                t.elapsed().as_millis(),
                cpu() - c
            );
        }
    }
}
