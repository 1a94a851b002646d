//! Sends NDJSON bodies to `POST /v1/events` with several concurrent clients (demo, bench).
//! Honours `429 Retry-After` by waiting and resending the same body, so nothing is lost.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use bytes::Bytes;

/// Totals over all responses.
#[derive(Debug, Default, Clone)]
pub struct SendReport {
    pub accepted: u64,
    pub duplicates: u64,
    pub rejected: u64,
    pub requests: u64,
    pub retries_429: u64,
    /// Latency of each acknowledged request (send → 200), in microseconds.
    pub latencies_us: Vec<u64>,
    pub elapsed: Duration,
}

/// Posts every body once (retrying 429s) using `clients` concurrent connections.
/// `progress` is called with the number of lines acknowledged by each response.
pub async fn send_all(
    url: &str,
    bodies: Vec<(Bytes, usize)>,
    clients: usize,
    progress: Arc<dyn Fn(u64) + Send + Sync>,
) -> Result<SendReport> {
    send_all_to(&[url.to_string()], bodies, clients, progress).await
}

/// [`send_all`] over several servers (e.g. ingest nodes): client `k` talks to `urls[k % n]`.
pub async fn send_all_to(
    urls: &[String],
    bodies: Vec<(Bytes, usize)>,
    clients: usize,
    progress: Arc<dyn Fn(u64) + Send + Sync>,
) -> Result<SendReport> {
    anyhow::ensure!(!urls.is_empty(), "no server to send to");
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(clients)
        .timeout(Duration::from_secs(120))
        .build()?;
    let bodies = Arc::new(bodies);
    let next = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for k in 0..clients.max(1) {
        let endpoint = format!("{}/v1/events", urls[k % urls.len()]);
        let (http, bodies, next, progress) =
            (http.clone(), bodies.clone(), next.clone(), progress.clone());
        tasks.push(tokio::spawn(async move {
            let mut r = SendReport::default();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some((body, lines)) = bodies.get(i) else {
                    return Ok::<_, anyhow::Error>(r);
                };
                loop {
                    let t0 = Instant::now();
                    let resp = http
                        .post(&endpoint)
                        .header("content-type", "application/x-ndjson")
                        .body(body.clone())
                        .send()
                        .await
                        .context("sending a batch")?;
                    let status = resp.status();
                    if status.as_u16() == 429 {
                        r.retries_429 += 1;
                        let wait = resp
                            .headers()
                            .get("retry-after")
                            .and_then(|v| v.to_str().ok())
                            .and_then(|v| v.parse::<u64>().ok())
                            .unwrap_or(1);
                        // Retry-After is in seconds; back off less in a tight local loop.
                        tokio::time::sleep(Duration::from_millis(50 * wait.min(20))).await;
                        continue;
                    }
                    let text = resp.text().await?;
                    if !status.is_success() {
                        bail!("server answered {status}: {text}");
                    }
                    r.latencies_us.push(t0.elapsed().as_micros() as u64);
                    let v: serde_json::Value = serde_json::from_str(&text)?;
                    let n = |k: &str| v[k].as_u64().unwrap_or(0);
                    r.accepted += n("accepted");
                    r.duplicates += n("duplicates");
                    r.rejected += n("rejected");
                    r.requests += 1;
                    progress(*lines as u64);
                    break;
                }
            }
        }));
    }
    let mut total = SendReport::default();
    for t in tasks {
        let r = t.await??;
        total.accepted += r.accepted;
        total.duplicates += r.duplicates;
        total.rejected += r.rejected;
        total.requests += r.requests;
        total.retries_429 += r.retries_429;
        total.latencies_us.extend(r.latencies_us);
    }
    total.elapsed = start.elapsed();
    total.latencies_us.sort_unstable();
    Ok(total)
}

/// The `p`-th percentile (0–100) of sorted values.
pub fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((p / 100.0) * (sorted.len() as f64 - 1.0)).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

/// Renders a SQL result (`columns`, `rows` of JSON) as an aligned text table.
pub fn print_table(columns: &[String], rows: &[Vec<serde_json::Value>]) -> String {
    let cell = |v: &serde_json::Value| match v {
        serde_json::Value::Null => "NULL".to_string(),
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    let cells: Vec<Vec<String>> = rows.iter().map(|r| r.iter().map(cell).collect()).collect();
    let mut widths: Vec<usize> = columns.iter().map(|c| c.chars().count()).collect();
    for r in &cells {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |out: &mut String, vals: &[String]| {
        out.push('|');
        for (v, w) in vals.iter().zip(&widths) {
            out.push_str(&format!(" {v:<w$} |", w = *w));
        }
        out.push('\n');
    };
    let sep: String = format!(
        "+{}\n",
        widths
            .iter()
            .map(|w| "-".repeat(w + 2))
            .collect::<Vec<_>>()
            .join("+")
            + "+"
    );
    let mut out = sep.clone();
    line(&mut out, columns);
    out.push_str(&sep);
    for r in &cells {
        line(&mut out, r);
    }
    out.push_str(&sep);
    out.push_str(&format!("{} row(s)\n", rows.len()));
    out
}
