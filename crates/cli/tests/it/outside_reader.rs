//! The `events` table is a plain Delta table: Python's `deltalake` reads it without reelhouse.
//! `scripts/test.sh` installs the package; set REELHOUSE_SKIP_PYTHON=1 to skip on machines
//! without Python.

use std::process::Command;

use reelhouse_workload::{generate, WorkloadConfig};

use crate::common::{post, start, url};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_deltalake_reads_the_events_table() {
    if std::env::var("REELHOUSE_SKIP_PYTHON").is_ok_and(|v| v == "1") {
        eprintln!("skipped: REELHOUSE_SKIP_PYTHON=1");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), 1_000_000).await;
    let url = url(&server);
    let w = generate(&WorkloadConfig::new(5_000, 3, 1_764_000_000_000));
    for b in w.bodies(2_500) {
        let (status, _) = post(&url, "/v1/events", b, "application/x-ndjson").await;
        assert_eq!(status, 200);
    }
    server.shutdown().await.unwrap();
    let script = r#"
import os, sys, deltalake
t = deltalake.DeltaTable(sys.argv[1] + "/events").to_pyarrow_table()
views = sum(1 for x in t.column("event_type").to_pylist() if x == "video_view_start")
print(t.num_rows, views, len(set(t.column("event_date").to_pylist())), flush=True)
# pyarrow + deltalake sometimes abort in C++ teardown at interpreter exit ("terminate called
# without an active exception"), after the work is done; skip the teardown.
os._exit(0)
"#;
    let out = Command::new("python3")
        .arg("-c")
        .arg(script)
        .arg(dir.path())
        .output()
        .expect("python3 runs");
    assert!(
        out.status.success(),
        "python deltalake failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let nums: Vec<usize> = text
        .split_whitespace()
        .map(|n| n.parse().unwrap())
        .collect();
    let m = &w.manifest;
    assert_eq!(nums[0], m.valid_unique);
    assert_eq!(nums[1], m.by_type["video_view_start"]);
    assert!(
        nums[2] >= 3,
        "events spread over several event_date partitions"
    );
}
