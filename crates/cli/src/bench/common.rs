//! What the benchmarks share: request bodies, result files, the process's CPU time and page
//! faults, and DuckDB run through Python.

use anyhow::Result;
use bytes::Bytes;
use serde_json::json;

pub(crate) fn request_bodies(
    w: &reelhouse_workload::Workload,
    batch: usize,
) -> Vec<(Bytes, usize)> {
    w.bodies(batch)
        .into_iter()
        .zip(w.lines.chunks(batch.max(1)).map(|c| c.len()))
        .map(|(body, n)| (Bytes::from(body), n))
        .collect()
}

pub(crate) fn warn_if_debug() {
    if cfg!(debug_assertions) {
        eprintln!("warning: this is a debug build; benchmark figures need `cargo run --release`");
    }
}

/// Adds what every result records (build profile, cores, time) and writes it as JSON.
pub(crate) fn write_result(out: &std::path::Path, mut result: serde_json::Value) -> Result<()> {
    result["build"] = json!(if cfg!(debug_assertions) {
        "debug"
    } else {
        "release"
    });
    result["cores"] = json!(std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0));
    result["at"] = json!(chrono::Utc::now().to_rfc3339());
    if let Some(parent) = out.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(out, serde_json::to_string_pretty(&result)? + "\n")?;
    println!("wrote {}", out.display());
    Ok(())
}

/// The numeric fields of Linux `/proc/self/stat` after the command name (which is in
/// parentheses and may hold spaces) from field 4 on: field `n` of the line (1-based, as
/// `proc(5)` numbers them) is at index `n - 4`. `None` where it cannot be read.
pub(crate) fn proc_stat() -> Option<Vec<u64>> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    // The state (field 3) is a letter; every field this module reads comes after it. Fields
    // that can be negative (priority, nice) read as 0; none of them is read here.
    Some(
        rest.split_whitespace()
            .skip(1)
            .map(|f| f.parse().unwrap_or(0))
            .collect(),
    )
}

/// User plus system CPU time of this process so far (`utime` and `stime`, fields 14 and 15,
/// in clock ticks of USER_HZ = 100 per second); `None` where it cannot be read.
pub(crate) fn process_cpu_s() -> Option<f64> {
    let f = proc_stat()?;
    Some((*f.get(14 - 4)? + *f.get(15 - 4)?) as f64 / 100.0)
}

/// Minor page faults of this process so far (`minflt`, field 10): pages the kernel had to
/// map (and zero) when the process first touched them. A rebuild that allocates fresh
/// memory instead of reusing freed memory pays for each.
pub(crate) fn process_minor_faults() -> Option<u64> {
    proc_stat()?.get(10 - 4).copied()
}

/// CPU seconds since `start` (from [`process_cpu_s`]).
pub(crate) fn cpu_since(start: Option<f64>) -> Option<f64> {
    Some(process_cpu_s()? - start?)
}

/// Runs DuckDB (Python package) on the same NDJSON; `None` with a note when unavailable.
pub(crate) fn duckdb_load(
    ndjson: &std::path::Path,
    dir: &std::path::Path,
) -> Option<serde_json::Value> {
    // Same typing work as reelhouse: explicit columns, ids to BIGINT, both time forms to
    // timestamps, props and device flattened. DuckDB skips the malformed lines
    // (ignore_errors); it does not validate per event, dedup, or fsync.
    let script = r#"
import duckdb, json, os, sys, time
src, out = sys.argv[1], sys.argv[2]
con = duckdb.connect()
con.execute("SET threads=2")
con.execute("SET enable_progress_bar = false")
cols = """{'event_id':'VARCHAR','event_type':'VARCHAR','event_time':'VARCHAR','user_id':'VARCHAR',
'session_id':'VARCHAR','video_id':'VARCHAR','creator_id':'VARCHAR','view_id':'VARCHAR',
'device':'STRUCT(os VARCHAR, app_version VARCHAR, country VARCHAR)',
'props':'STRUCT(source VARCHAR, via_share_id VARCHAR, watch_ms BIGINT, video_duration_ms BIGINT, comment_id VARCHAR, length BIGINT, share_id VARCHAR, parent_share_id VARCHAR, channel VARCHAR)'}"""
q = f"""CREATE TABLE t AS SELECT event_id, event_type,
  CASE WHEN regexp_full_match(event_time, '[0-9]+') THEN epoch_ms(event_time::BIGINT)
       ELSE TRY_CAST(event_time AS TIMESTAMPTZ) END AS event_time,
  TRY_CAST(user_id AS BIGINT) AS user_id, session_id, TRY_CAST(video_id AS BIGINT) AS video_id,
  TRY_CAST(creator_id AS BIGINT) AS creator_id, view_id, props.*, device.os AS device_os,
  device.app_version AS device_app_version, device.country AS device_country
FROM read_ndjson('{src}', columns = {cols}, ignore_errors = true)"""
t = time.time()
con.execute(q)
load = time.time() - t
n = con.execute("SELECT count(*) FROM t").fetchone()[0]
con.execute(f"COPY (SELECT * FROM t ORDER BY user_id, session_id, event_time) TO '{out}' (FORMAT parquet, COMPRESSION zstd)")
print(json.dumps({"version": duckdb.__version__, "load_s": load, "rows": n,
                  "events_per_s": n / load, "parquet_bytes_per_event": os.path.getsize(out) / n}))
"#;
    let out = dir.join("duckdb.parquet");
    run_python(script, &[ndjson, &out])
}

/// Says on stderr that the DuckDB comparison is skipped, with the line of a failed Python
/// step's `stderr` that names the error (e.g. a missing `duckdb` module).
pub(crate) fn python_failed(stderr: &str) {
    eprintln!(
        "DuckDB comparison skipped: {} (install with `pip install duckdb`)",
        stderr
            .lines()
            .find(|l| l.contains("Error") || l.contains("No module"))
            .unwrap_or("python3 failed")
    );
}

/// Runs a Python script that prints one JSON object on its last stdout line; `None` (with a
/// note on stderr) when Python or its packages are missing or the script fails.
pub(crate) fn run_python(script: &str, args: &[&std::path::Path]) -> Option<serde_json::Value> {
    let run = std::process::Command::new("python3")
        .arg("-c")
        .arg(script)
        .args(args)
        .output();
    match run {
        Ok(o) if o.status.success() => {
            let text = String::from_utf8_lossy(&o.stdout);
            let parsed = text
                .lines()
                .last()
                .and_then(|l| serde_json::from_str(l).ok());
            if parsed.is_none() {
                eprintln!("DuckDB comparison skipped: unreadable output from the DuckDB step");
            }
            parsed
        }
        Ok(o) => {
            python_failed(&String::from_utf8_lossy(&o.stderr));
            None
        }
        Err(e) => {
            eprintln!("DuckDB comparison skipped: cannot run python3 ({e})");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The fault counter is `minflt` (not another field): touching 64 MB of fresh memory
    /// raises it by about one fault per 4 kB page touched (far fewer with huge pages, so the
    /// bound is loose; `cminflt` and `majflt` stay put), and busy work advances the CPU time.
    #[test]
    fn proc_stat_counts_faults_and_cpu_time() {
        let (faults, cpu) = (process_minor_faults().unwrap(), process_cpu_s().unwrap());
        let mut v: Vec<u8> = Vec::with_capacity(64 << 20);
        for i in (0..v.capacity()).step_by(4096) {
            v.spare_capacity_mut()[i].write(1);
        }
        let touched = process_minor_faults().unwrap() - faults;
        assert!(touched >= 30, "{touched} faults for 16384 fresh pages");
        // 200M dependent multiply-adds: at least 0.2 s of CPU (about 2 s in the dev profile)
        // however loaded the machine is, since CPU time counts only while the thread runs;
        // the clock ticks every 10 ms.
        let mut x = 0u64;
        for _ in 0..200_000_000u64 {
            x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(7));
        }
        let spent = process_cpu_s().unwrap() - cpu;
        assert!(spent >= 0.03, "{spent} s of CPU for 200M multiply-adds");
        drop(v);
    }
}
