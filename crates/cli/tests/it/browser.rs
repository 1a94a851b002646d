//! The web creator dashboard in a real browser (headless Chromium): with a `creator:<id>`
//! token in the page's URL fragment, the numbers it renders equal the API's, its top videos
//! and cascades are the API's, another creator's page is refused; a screenshot lands in
//! `docs/img/dashboard.png` (fixed clock and seed, so it only changes when the page does).

use std::net::SocketAddr;
use std::process::Command;
use std::sync::Arc;

use reelhouse_engine::EngineConfig;
use reelhouse_event::FixedClock;
use reelhouse_server::ServerConfig;
use reelhouse_workload::{generate, WorkloadConfig};
use serde_json::Value;

use crate::common::write_tokens;

/// 2026-11-20T12:00:00Z.
const NOW: i64 = 1_795_176_000_000;

/// Runs headless Chromium on `url` with extra flags; returns stdout.
fn chromium(profile: &std::path::Path, url: &str, extra: &[&str]) -> String {
    let out = Command::new("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
        ])
        .args(["--hide-scrollbars", "--virtual-time-budget=15000"])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(extra)
        .arg(url)
        .output()
        .expect("chromium runs (scripts/test.sh installs the Debian package when missing)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Every `data-k="key">value<` in the rendered DOM (before the page's own script), in order.
fn marked<'a>(dom: &'a str, key: &str) -> Vec<&'a str> {
    let dom = &dom[..dom.find("<script").unwrap_or(dom.len())];
    let pat = format!("data-k=\"{key}\">");
    dom.match_indices(&pat)
        .map(|(i, _)| {
            let rest = &dom[i + pat.len()..];
            &rest[..rest.find('<').unwrap_or(rest.len())]
        })
        .collect()
}

/// GETs an API path with the creator's token.
async fn api(http: &reqwest::Client, u: &str, path: String) -> Value {
    let r = http
        .get(format!("{u}{path}"))
        .bearer_auth("dash-creator")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{path}");
    r.json::<Value>().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_page_renders_the_api_numbers_for_its_creator_only() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = WorkloadConfig::new(30_000, 17, NOW);
    cfg.days = 90;
    let w = generate(&cfg);

    let mut ingest = EngineConfig::new(dir.path().join("data"), Arc::new(FixedClock(NOW)));
    ingest.flush_rows = 10_000;
    let mut config = ServerConfig::new(ingest, "127.0.0.1:0".parse::<SocketAddr>().unwrap());
    config.materialize_interval = None;
    // Tokens: an admin to load, and the busiest creator's own token (found below; the file is
    // rewritten before the server starts, so creator ids come from a first open server).
    let open = reelhouse_server::start(config.clone()).await.unwrap();
    let u = format!("http://{}", open.addr);
    crate::common::load_and_materialize(&u, None, w.bodies(5_000)).await;
    let busiest = crate::common::sql(
        &u,
        "SELECT creator_id FROM agg_creator_daily GROUP BY 1 ORDER BY sum(views) DESC, 1 LIMIT 1",
    )
    .await[0][0]
        .as_i64()
        .unwrap();
    open.shutdown().await.unwrap();

    config.tokens = write_tokens(
        dir.path(),
        &[
            ("dash-creator", &format!("creator:{busiest}")),
            ("dash-admin", "admin"),
        ],
    );
    let server = reelhouse_server::start(config).await.unwrap();
    let u = format!("http://{}", server.addr);
    let http = reqwest::Client::new();
    let range = "from=2026-08-23&to=2026-11-20";
    let dash = api(
        &http,
        &u,
        format!("/v1/creators/{busiest}/dashboard?{range}"),
    )
    .await;
    let videos = api(
        &http,
        &u,
        format!("/v1/creators/{busiest}/videos?{range}&limit=10"),
    )
    .await;
    let cascades = api(
        &http,
        &u,
        format!("/v1/creators/{busiest}/cascades?limit=6"),
    )
    .await;
    assert!(
        dash["days"].as_array().unwrap().len() > 60,
        "90 days of data: {}",
        dash["days"]
    );

    let profile = dir.path().join("chromium");
    let page = format!("{u}/?creator={busiest}&{range}#token=dash-creator");
    let dom = chromium(&profile, &page, &["--dump-dom"]);
    assert!(
        dom.contains("data-rendered=\"ok\""),
        "page did not render: {dom}"
    );
    let body = &dom[..dom.find("<script").unwrap_or(dom.len())];
    let t = &dash["totals"];
    for key in [
        "views",
        "unique_viewers",
        "followers_gained",
        "followers_lost",
    ] {
        assert_eq!(marked(&dom, key)[0], t[key].to_string(), "{key}");
    }
    assert_eq!(marked(&dom, "followers")[0], dash["followers"].to_string());
    let hours: f64 = marked(&dom, "watch_hours")[0].parse().unwrap();
    assert!((hours - t["watch_time_ms"].as_f64().unwrap() / 3.6e6).abs() <= 0.05 + 1e-9);
    let pct: f64 = marked(&dom, "avg_percent_viewed")[0].parse().unwrap();
    assert!((pct - 100.0 * t["avg_percent_viewed"].as_f64().unwrap()).abs() <= 0.05 + 1e-9);
    let eng: f64 = marked(&dom, "engagement_rate")[0].parse().unwrap();
    assert!((eng - 100.0 * t["engagement_rate"].as_f64().unwrap()).abs() <= 0.005 + 1e-9);
    // Top videos: the API's, in its order, with its view counts (cards come first).
    let want: Vec<String> = videos["videos"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["views"].to_string())
        .collect();
    assert!(!want.is_empty());
    assert_eq!(marked(&dom, "views")[1..].to_vec(), want);
    for v in videos["videos"].as_array().unwrap() {
        assert!(body.contains(&format!("data-video=\"{}\"", v["video_id"])));
        assert_eq!(v["retention"].as_array().unwrap().len(), 101);
    }
    // One tree per cascade of the API.
    let trees = body.matches("<figure data-root=").count();
    assert_eq!(trees, cascades["cascades"].as_array().unwrap().len());
    assert!(trees > 0, "the workload has shares");
    if let Some(ms) = dom.split("data-render-ms=\"").nth(1) {
        eprintln!(
            "dashboard rendered in {} ms (browser clock)",
            &ms[..ms.find('"').unwrap()]
        );
    }

    // Another creator's page: the API refuses the token and the page shows the error.
    let other = format!("{u}/?creator={}&{range}#token=dash-creator", busiest + 1);
    let dom = chromium(&profile, &other, &["--dump-dom"]);
    assert!(dom.contains("data-rendered=\"error\""));
    assert!(dom.contains("may not call this endpoint"));

    let shot = concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/img/dashboard.png");
    std::fs::create_dir_all(std::path::Path::new(shot).parent().unwrap()).unwrap();
    chromium(
        &profile,
        &page,
        &["--window-size=1240,2250", &format!("--screenshot={shot}")],
    );
    assert!(std::fs::metadata(shot).unwrap().len() > 10_000);
    server.shutdown().await.unwrap();
}
