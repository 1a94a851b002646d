//! Differential tests of the warehouse: `agg_creator_daily` and session counts per user equal
//! an independent reference written here in plain Rust from the docs/data-model.md definitions, for
//! several random arrival orders of the same workload (late, duplicated, out-of-order and
//! malformed events included), for an incremental ingest in two phases, and the dashboard
//! equals the aggregates.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use rand::seq::SliceRandom;
use rand::SeedableRng;
use reelhouse_event::{parse_event, Event, EventType};
use reelhouse_workload::{generate, WorkloadConfig};
use serde_json::Value;

use crate::common::{post, post_sql, scalar, sql, start, url};

const DAY: i64 = 86_400_000;

/// One `agg_creator_daily` row as the reference computes it.
#[derive(Debug, Default, Clone, PartialEq)]
struct Daily {
    views: i64,
    viewers: BTreeSet<u64>,
    engaged: i64,
    watch: i64,
    ended: i64,
    pct_sum: f64,
    completions: i64,
    likes_added: i64,
    likes_removed: i64,
    shares: BTreeSet<String>,
    comments: i64,
    gained: i64,
    lost: i64,
    sources: BTreeMap<&'static str, i64>,
}

fn day(ms: i64) -> i64 {
    ms.div_euclid(DAY)
}

/// Valid, deduplicated events of a workload (first copy of each event_id).
fn events(lines: &[String]) -> Vec<Event> {
    let mut seen = HashSet::new();
    lines
        .iter()
        .filter_map(|l| parse_event(l.as_bytes()).ok())
        .filter(|e| seen.insert(e.event_id.clone()))
        .collect()
}

fn reference(evs: &[Event]) -> (BTreeMap<(u64, i64), Daily>, BTreeMap<u64, usize>) {
    let mut out: BTreeMap<(u64, i64), Daily> = BTreeMap::new();
    // Every (creator, date) with any event.
    for e in evs {
        if let Some(c) = e.creator_id {
            out.entry((c.0, day(e.event_time_ms))).or_default();
        }
    }
    // Views by view_id.
    #[derive(Default)]
    struct V {
        start: Option<(i64, u64, u64, &'static str)>,
        end: Option<(i64, u64, u64)>,
        watch: i64,
        duration: i64,
    }
    let mut views: HashMap<&str, V> = HashMap::new();
    for e in evs {
        let (Some(view), Some(c)) = (e.view_id.as_deref(), e.creator_id) else {
            continue;
        };
        let v = views.entry(view).or_default();
        match e.event_type {
            EventType::VideoViewStart => {
                let src = e.props.source.map_or("other", |s| s.as_str());
                if v.start.is_none_or(|s| e.event_time_ms < s.0) {
                    v.start = Some((e.event_time_ms, e.user_id.0, c.0, src));
                }
            }
            EventType::VideoViewEnd => {
                v.end = Some((e.event_time_ms, e.user_id.0, c.0));
                v.watch = v.watch.max(e.props.watch_ms.unwrap_or(0));
                v.duration = v.duration.max(e.props.video_duration_ms.unwrap_or(0));
            }
            _ => {}
        }
    }
    for v in views.values() {
        let (t, user, creator, source) = match (v.start, v.end) {
            (Some(s), _) => s,
            (None, Some(e)) => (e.0, e.1, e.2, "other"),
            (None, None) => continue,
        };
        let d = out.entry((creator, day(t))).or_default();
        d.views += 1;
        d.viewers.insert(user);
        *d.sources.entry(source).or_default() += 1;
        if v.end.is_some() {
            d.ended += 1;
            d.watch += v.watch;
            d.pct_sum += (v.watch as f64 / v.duration as f64).min(1.0);
            d.engaged += (v.watch >= 3000) as i64;
            d.completions += (v.watch as f64 >= 0.98 * v.duration as f64) as i64;
        }
    }
    // Like and follow state machines in (event_time, event_id) order.
    let mut likes: HashMap<(u64, u64), Vec<&Event>> = HashMap::new();
    let mut follows: HashMap<(u64, u64), Vec<&Event>> = HashMap::new();
    for e in evs {
        match e.event_type {
            EventType::Like | EventType::Unlike => likes
                .entry((e.user_id.0, e.video_id.unwrap().0))
                .or_default()
                .push(e),
            EventType::FollowCreator | EventType::UnfollowCreator => follows
                .entry((e.user_id.0, e.creator_id.unwrap().0))
                .or_default()
                .push(e),
            EventType::Share => {
                let d = out
                    .entry((e.creator_id.unwrap().0, day(e.event_time_ms)))
                    .or_default();
                d.shares.insert(e.props.share_id.clone().unwrap());
            }
            EventType::Comment => {
                out.entry((e.creator_id.unwrap().0, day(e.event_time_ms)))
                    .or_default()
                    .comments += 1
            }
            _ => {}
        }
    }
    for (list, positive) in [
        (likes, EventType::Like),
        (follows, EventType::FollowCreator),
    ] {
        for mut l in list.into_values() {
            l.sort_by(|a, b| (a.event_time_ms, &a.event_id).cmp(&(b.event_time_ms, &b.event_id)));
            let mut on = false;
            for e in l {
                let d = out
                    .entry((e.creator_id.unwrap().0, day(e.event_time_ms)))
                    .or_default();
                let is_pos = e.event_type == positive;
                match (is_pos, on, positive) {
                    (true, false, EventType::Like) => d.likes_added += 1,
                    (false, true, EventType::Like) => d.likes_removed += 1,
                    (true, false, _) => d.gained += 1,
                    (false, true, _) => d.lost += 1,
                    _ => {}
                }
                on = is_pos;
            }
        }
    }
    // Sessions per user: one per session_id, owned by the user of its earliest event.
    let mut sessions: HashMap<&str, (i64, &str, u64)> = HashMap::new();
    for e in evs {
        if let Some(s) = e.session_id.as_deref() {
            let key = (e.event_time_ms, e.event_id.as_str(), e.user_id.0);
            let cur = sessions.entry(s).or_insert(key);
            if (key.0, key.1) < (cur.0, cur.1) {
                *cur = key;
            }
        }
    }
    let mut per_user = BTreeMap::new();
    for (_, _, u) in sessions.into_values() {
        *per_user.entry(u).or_default() += 1;
    }
    (out, per_user)
}

fn date_days(s: &str) -> i64 {
    let d = chrono::NaiveDate::parse_from_str(s, "%Y-%m-%d").unwrap();
    d.signed_duration_since(chrono::NaiveDate::from_ymd_opt(1970, 1, 1).unwrap())
        .num_days()
}

fn close(a: &Value, b: Option<f64>, what: &str) {
    match (a.as_f64(), b) {
        (None, None) => {}
        (Some(x), Some(y)) => assert!(
            (x - y).abs() <= 1e-9 * y.abs().max(1.0),
            "{what}: {x} vs {y}"
        ),
        other => panic!("{what}: {other:?}"),
    }
}

/// Compares every cell of agg_creator_daily and the session counts with the reference.
async fn check(url: &str, evs: &[Event]) {
    let (want, sessions) = reference(evs);
    let rows = sql(
        url,
        "SELECT * FROM agg_creator_daily ORDER BY creator_id, date",
    )
    .await;
    let cols: Vec<String> = {
        let (_, v) = post(
            url,
            "/v1/sql",
            r#"{"sql":"SELECT * FROM agg_creator_daily LIMIT 0"}"#,
            "application/json",
        )
        .await;
        serde_json::from_value(v["columns"].clone()).unwrap()
    };
    assert_eq!(
        rows.len(),
        want.len(),
        "one row per (creator, date) with activity"
    );
    for (row, ((creator, d), w)) in rows.iter().zip(&want) {
        let get = |c: &str| &row[cols.iter().position(|x| x == c).unwrap()];
        assert_eq!(get("creator_id").as_u64(), Some(*creator));
        assert_eq!(date_days(get("date").as_str().unwrap()), *d);
        let what = format!("creator {creator} day {d}");
        let ints = [
            ("views", w.views),
            ("unique_viewers", w.viewers.len() as i64),
            ("engaged_views", w.engaged),
            ("watch_time_ms", w.watch),
            ("completions", w.completions),
            ("likes_added", w.likes_added),
            ("likes_removed", w.likes_removed),
            ("shares", w.shares.len() as i64),
            ("comments", w.comments),
            ("followers_gained", w.gained),
            ("followers_lost", w.lost),
        ];
        for (c, v) in ints {
            assert_eq!(get(c).as_i64(), Some(v), "{what} {c}");
        }
        for s in [
            "feed", "profile", "share", "search", "hashtag", "audio", "other",
        ] {
            let v = w.sources.get(s).copied().unwrap_or(0);
            assert_eq!(
                get(&format!("views_{s}")).as_i64(),
                Some(v),
                "{what} views_{s}"
            );
        }
        let avg = |sum: f64| (w.ended > 0).then(|| sum / w.ended as f64);
        close(
            get("avg_view_duration_ms"),
            avg(w.watch as f64),
            &format!("{what} avg_view_duration_ms"),
        );
        close(
            get("avg_percent_viewed"),
            avg(w.pct_sum),
            &format!("{what} avg_percent_viewed"),
        );
        let rate = (w.views > 0).then(|| {
            (w.likes_added - w.likes_removed + w.comments + w.shares.len() as i64) as f64
                / w.views as f64
        });
        close(
            get("engagement_rate"),
            rate,
            &format!("{what} engagement_rate"),
        );
    }
    let got: BTreeMap<u64, usize> = sql(
        url,
        "SELECT user_id, count(*) FROM fact_session GROUP BY user_id",
    )
    .await
    .into_iter()
    .map(|r| (r[0].as_u64().unwrap(), r[1].as_u64().unwrap() as usize))
    .collect();
    assert_eq!(got, sessions, "sessions per user");
}

/// The creator dashboard for `from`..=`to` (asserting it answers 200).
async fn dashboard(url: &str, creator: i64, from: &str, to: &str) -> Value {
    let resp = reqwest::get(format!(
        "{url}/v1/creators/{creator}/dashboard?from={from}&to={to}"
    ))
    .await
    .unwrap();
    assert_eq!(resp.status(), 200, "{from}..{to}");
    resp.json().await.unwrap()
}

async fn ingest(url: &str, lines: &[String]) {
    for chunk in lines.chunks(2_000) {
        let body = chunk.join("\n") + "\n";
        let (status, v) = post(url, "/v1/events", body, "application/x-ndjson").await;
        assert_eq!(status, 200, "{v}");
    }
}

async fn materialize(url: &str) {
    let (status, v) = post(url, "/v1/admin/materialize", "", "application/json").await;
    assert_eq!(status, 200, "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aggregates_equal_reference_for_any_arrival_order() {
    let now = chrono::Utc::now().timestamp_millis();
    let w = generate(&WorkloadConfig::new(12_000, 21, now));
    let evs = events(&w.lines);
    for seed in [1u64, 2, 3] {
        let mut lines = w.lines.clone();
        lines.shuffle(&mut rand::rngs::StdRng::seed_from_u64(seed));
        let dir = tempfile::tempdir().unwrap();
        let server = start(dir.path(), 5_000).await;
        let url = url(&server);
        if seed == 3 {
            // Incremental: half, materialize, the rest (late for dates already built), again.
            let (a, b) = lines.split_at(lines.len() / 2);
            ingest(&url, a).await;
            materialize(&url).await;
            check(&url, &events(a)).await;
            ingest(&url, b).await;
        } else {
            ingest(&url, &lines).await;
        }
        materialize(&url).await;
        check(&url, &evs).await;
        server.shutdown().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_equals_the_aggregates() {
    let now = chrono::Utc::now().timestamp_millis();
    let w = generate(&WorkloadConfig::new(8_000, 5, now));
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), 1_000_000).await;
    let url = url(&server);
    ingest(&url, &w.lines).await;
    materialize(&url).await;
    let top = sql(&url, "SELECT creator_id, min(date), max(date), sum(views), sum(likes_added) - sum(likes_removed) FROM agg_creator_daily GROUP BY 1 ORDER BY 4 DESC LIMIT 1").await;
    let (creator, from, to) = (
        top[0][0].as_i64().unwrap(),
        top[0][1].as_str().unwrap(),
        top[0][2].as_str().unwrap(),
    );
    let d = dashboard(&url, creator, from, to).await;
    assert_eq!(d["creator_id"].as_i64(), Some(creator));
    // Each day is its `agg_creator_daily` row, every column of it (README.md, HTTP API), and nothing else.
    let (status, all) = post_sql(
        &url,
        &format!("SELECT * FROM agg_creator_daily WHERE creator_id = {creator} ORDER BY date"),
    )
    .await;
    assert_eq!(status, 200, "{all}");
    let columns: Vec<String> = serde_json::from_value(all["columns"].clone()).unwrap();
    let days: Vec<Vec<Value>> = serde_json::from_value(all["rows"].clone()).unwrap();
    assert!(columns.len() >= 23, "{columns:?}");
    assert_eq!(d["days"].as_array().unwrap().len(), days.len());
    for (got, want) in d["days"].as_array().unwrap().iter().zip(&days) {
        let got = got.as_object().unwrap();
        assert_eq!(got.len(), columns.len(), "{got:?}");
        for (c, v) in columns.iter().zip(want) {
            assert_eq!(got.get(c), Some(v), "{c}");
        }
    }
    assert_eq!(d["totals"]["views"], top[0][3]);
    let uniq = sql(
        &url,
        &format!(
            "SELECT count(DISTINCT user_id) FROM fact_video_view WHERE creator_id = {creator}"
        ),
    )
    .await;
    assert_eq!(d["totals"]["unique_viewers"], uniq[0][0]);
    let followers = sql(
        &url,
        &format!("SELECT count(*) FROM follow_state WHERE creator_id = {creator} AND following"),
    )
    .await;
    assert_eq!(d["followers"], followers[0][0]);
    // A one-day range's averages are that day's row, to the bit: both sum the same integers
    // (watch_ms, and percent_viewed in fixed point), whatever order the views were read in.
    for day in d["days"].as_array().unwrap().iter().take(5) {
        let date = day["date"].as_str().unwrap();
        let one = dashboard(&url, creator, date, date).await;
        for k in ["avg_percent_viewed", "avg_view_duration_ms", "views"] {
            assert_eq!(one["totals"][k], day[k], "{date} {k}");
        }
    }
    // A sub-range: exact unique viewers and averages over just those days.
    let sub_from = (chrono::NaiveDate::parse_from_str(from, "%Y-%m-%d").unwrap()
        + chrono::Duration::days(1))
    .to_string();
    let d = dashboard(&url, creator, &sub_from, to).await;
    let want = sql(&url, &format!(
        "SELECT count(DISTINCT user_id), avg(CAST(watch_ms AS DOUBLE)) FILTER (WHERE has_end), \
         avg(percent_viewed) FILTER (WHERE has_end), count(*) FROM fact_video_view \
         WHERE creator_id = {creator} AND event_date >= DATE '{sub_from}' AND event_date <= DATE '{to}'")).await;
    assert_eq!(d["totals"]["unique_viewers"], want[0][0]);
    close(
        &d["totals"]["avg_view_duration_ms"],
        want[0][1].as_f64(),
        "avg_view_duration_ms",
    );
    close(
        &d["totals"]["avg_percent_viewed"],
        want[0][2].as_f64(),
        "avg_percent_viewed",
    );
    assert_eq!(d["totals"]["views"], want[0][3]);
    assert_eq!(d["days"].as_array().unwrap().len(), days.len() - 1);
    // Without `from` or `to` the answer covers all of the creator's days and says which;
    // with `from` alone, from there to the creator's last day.
    let base = format!("{url}/v1/creators/{creator}/dashboard");
    let base = base.as_str();
    let get = |q: String| async move {
        let r = reqwest::get(format!("{base}{q}")).await.unwrap();
        assert_eq!(r.status(), 200, "{q}");
        r.json::<Value>().await.unwrap()
    };
    let whole = get(String::new()).await;
    assert_eq!(
        (whole["from"].as_str(), whole["to"].as_str()),
        (Some(from), Some(to))
    );
    assert_eq!(whole["totals"]["views"], top[0][3]);
    assert_eq!(whole["totals"]["unique_viewers"], uniq[0][0]);
    assert_eq!(whole["days"].as_array().unwrap().len(), days.len());
    let tail = get(format!("?from={sub_from}")).await;
    assert_eq!(tail["to"].as_str(), Some(to));
    assert_eq!(tail["totals"], d["totals"]);
    // The creator's videos take the same defaults: all of its days.
    let videos: Value = reqwest::get(format!("{url}/v1/creators/{creator}/videos?limit=1"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        (videos["from"].as_str(), videos["to"].as_str()),
        (Some(from), Some(to))
    );
    let top_video = &videos["videos"][0];
    let want = sql(
        &url,
        &format!(
            "SELECT count(*) FROM fact_video_view WHERE video_id = {} AND creator_id = {creator}",
            top_video["video_id"]
        ),
    )
    .await;
    assert_eq!(top_video["views"], want[0][0], "{videos}");
    // Bad ranges are refused with a clear 400.
    for q in [
        "from=2026-01-02&to=2026-01-01",
        "from=x&to=2026-01-01",
        "to=2026-13-01",
    ] {
        let r = reqwest::get(format!("{url}/v1/creators/{creator}/dashboard?{q}"))
            .await
            .unwrap();
        assert_eq!(r.status(), 400, "{q}");
    }
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_beyond_allowed_lateness_count_only_after_restate() {
    let now = chrono::Utc::now().timestamp_millis();
    // Recent traffic (within the default 7-day allowed lateness)…
    let recent = generate(&WorkloadConfig::new(5_000, 31, now - 60_000));
    // …and one day of traffic that arrives 10–11 days after it happened.
    let mut cfg = WorkloadConfig::new(3_000, 32, now - 10 * DAY);
    cfg.days = 1;
    let old = generate(&cfg);
    let (recent_evs, old_evs) = (events(&recent.lines), events(&old.lines));
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), 1_000_000).await;
    let url = url(&server);
    ingest(&url, &recent.lines).await;
    materialize(&url).await;
    check(&url, &recent_evs).await;

    ingest(&url, &old.lines).await;
    materialize(&url).await;
    // Stored and counted as too late, but the closed dates are unchanged.
    let stored = sql(&url, "SELECT count(*) FROM events").await[0][0]
        .as_u64()
        .unwrap();
    assert_eq!(stored as usize, recent_evs.len() + old_evs.len());
    check(&url, &recent_evs).await;
    let lat: Value = reqwest::get(format!("{url}/v1/ingest/lateness"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let beyond = lat["beyond_allowed"].as_u64().unwrap() as usize;
    assert!(beyond >= old_evs.len(), "{lat}");
    let total: u64 = lat["histogram"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["events"].as_u64().unwrap())
        .sum();
    assert_eq!(total, stored);

    // Restating the old dates brings them in.
    let first = chrono::DateTime::from_timestamp_millis(old.manifest.first_event_ms)
        .unwrap()
        .date_naive();
    let last = chrono::DateTime::from_timestamp_millis(old.manifest.last_event_ms)
        .unwrap()
        .date_naive();
    // The range as query parameters (the first date alone), then as a JSON body (all).
    let (status, v) = post(
        &url,
        &format!("/v1/admin/restate?from={first}&to={first}"),
        String::new(),
        "application/json",
    )
    .await;
    assert_eq!(status, 200, "{v}");
    let rebuilt: Vec<String> = serde_json::from_value(v["dates"].clone()).unwrap();
    assert!(rebuilt.contains(&first.to_string()), "{v}");
    let mut bad_ranges = vec!["?from=2026-13-01&to=x".to_string(), String::new()];
    if first != last {
        bad_ranges.push(format!("?from={last}&to={first}"));
    }
    for bad in bad_ranges {
        let (status, v) = post(
            &url,
            &format!("/v1/admin/restate{bad}"),
            String::new(),
            "application/json",
        )
        .await;
        assert_eq!(status, 400, "{bad}: {v}");
        assert_eq!(v["error"]["code"], "bad_request", "{v}");
    }
    server.shutdown().await.unwrap();

    // Right after a restart (no dirty dates in memory, as in a one-shot `reelhouse
    // restate`) a restatement still rebuilds only the dates it names and what they affect.
    let server = start(dir.path(), 1_000_000).await;
    let url = crate::common::url(&server);
    let body = serde_json::json!({"from": first.to_string(), "to": last.to_string()}).to_string();
    let (status, v) = post(&url, "/v1/admin/restate", body, "application/json").await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["mode"], "incremental", "{v}");
    let rebuilt: Vec<String> = serde_json::from_value(v["dates"].clone()).unwrap();
    assert!(rebuilt.contains(&last.to_string()), "{v}");
    let all: Vec<Event> = recent_evs.iter().chain(&old_evs).cloned().collect();
    check(&url, &all).await;
    server.shutdown().await.unwrap();

    // The restatement is durable: a restart and a rebuild keep the old dates in.
    let server = start(dir.path(), 1_000_000).await;
    let url = crate::common::url(&server);
    materialize(&url).await;
    check(&url, &all).await;
    server.shutdown().await.unwrap();
}

/// Loading history (all of it far beyond the allowed lateness) into a fresh directory: its
/// dates were never closed, so the first materialization counts all of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn historical_load_counts_at_first_materialization() {
    let w = generate(&WorkloadConfig::new(4_000, 41, 1_764_000_000_000));
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), 1_000_000).await;
    let url = url(&server);
    ingest(&url, &w.lines).await;
    materialize(&url).await;
    check(&url, &events(&w.lines)).await;
    server.shutdown().await.unwrap();
}

/// A warehouse with no events yet materializes every table, empty, and is then filled
/// like any other by the first events.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn materialization_of_no_events_makes_empty_tables() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), 1_000_000).await;
    let url = url(&server);
    materialize(&url).await;
    for t in reelhouse_warehouse::table_names() {
        assert_eq!(
            scalar(&url, &format!("SELECT count(*) FROM {t}")).await,
            0,
            "{t}"
        );
    }
    // Recent events: older dates closed at the first materialization (docs/data-model.md).
    let now = chrono::Utc::now().timestamp_millis();
    let w = generate(&WorkloadConfig::new(2_000, 61, now));
    ingest(&url, &w.lines).await;
    materialize(&url).await;
    check(&url, &events(&w.lines)).await;
    server.shutdown().await.unwrap();
}

/// Events stored twice (re-sent after the ingest dedup window) are counted once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn materialization_dedups_again() {
    use std::sync::Arc;
    let now = chrono::Utc::now().timestamp_millis();
    let w = generate(&WorkloadConfig::new(4_000, 51, now));
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), 1_000_000).await;
    ingest(&url(&server), &w.lines).await;
    server.shutdown().await.unwrap();
    // Restart with a zero-day dedup window and without the dedup runs (as for a directory
    // written before they existed): the scan that rebuilds them remembers nothing received
    // before now, so the re-send is stored.
    std::fs::remove_dir_all(dir.path().join("_dedup")).unwrap();
    let mut ingest_cfg =
        reelhouse_engine::EngineConfig::new(dir.path(), Arc::new(reelhouse_event::SystemClock));
    ingest_cfg.dedup_window = std::time::Duration::ZERO;
    let mut config =
        reelhouse_server::ServerConfig::new(ingest_cfg, "127.0.0.1:0".parse().unwrap());
    config.materialize_interval = None;
    let server = reelhouse_server::start(config).await.unwrap();
    let url = crate::common::url(&server);
    ingest(&url, &w.lines).await;
    let evs = events(&w.lines);
    let stored = sql(&url, "SELECT count(*) FROM events").await[0][0]
        .as_u64()
        .unwrap() as usize;
    assert_eq!(stored, 2 * evs.len(), "the re-send was stored");
    materialize(&url).await;
    check(&url, &evs).await;
    server.shutdown().await.unwrap();
}

/// video_retention against a direct count over the views, at several points.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_curve_equals_direct_counts() {
    let now = chrono::Utc::now().timestamp_millis();
    let w = generate(&WorkloadConfig::new(6_000, 61, now));
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), 1_000_000).await;
    let url = url(&server);
    ingest(&url, &w.lines).await;
    materialize(&url).await;
    let curve = sql(
        &url,
        "SELECT video_id, p, share_retained FROM video_retention ORDER BY video_id, p",
    )
    .await;
    let videos = sql(
        &url,
        "SELECT count(DISTINCT video_id) FROM fact_video_view WHERE has_end",
    )
    .await;
    assert_eq!(curve.len() as u64, 101 * videos[0][0].as_u64().unwrap());
    for p in [0i64, 1, 37, 50, 98, 100] {
        let want = sql(&url, &format!(
            "SELECT video_id, CAST(count(*) FILTER (WHERE watch_ms * 100 >= {p} * video_duration_ms) AS DOUBLE) / count(*) \
             FROM fact_video_view WHERE has_end GROUP BY 1 ORDER BY 1")).await;
        let got: Vec<&Vec<Value>> = curve.iter().filter(|r| r[1].as_i64() == Some(p)).collect();
        assert_eq!(got.len(), want.len());
        for (g, w) in got.iter().zip(&want) {
            assert_eq!(g[0], w[0]);
            close(&g[2], w[1].as_f64(), &format!("video {} p {p}", w[0]));
        }
    }
    server.shutdown().await.unwrap();
}

/// agg_video_hourly against its definition written plainly (a distinct count per group and
/// outer joins of the three inputs), over `fact_video_view` and the raw `events`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn video_hourly_equals_direct_counts() {
    let now = chrono::Utc::now().timestamp_millis();
    let w = generate(&WorkloadConfig::new(6_000, 62, now));
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), 1_000_000).await;
    let url = url(&server);
    ingest(&url, &w.lines).await;
    materialize(&url).await;
    let got = sql(
        &url,
        "SELECT video_id, hour, views, unique_viewers, watch_time_ms, completions, likes_net, \
         shares, comments FROM agg_video_hourly ORDER BY 1, 2",
    )
    .await;
    let want = sql(
        &url,
        "WITH v AS (SELECT video_id, date_trunc('hour', coalesce(start_time, end_time)) AS hour, \
           count(*) AS views, count(DISTINCT user_id) AS uv, coalesce(sum(watch_ms), 0) AS watch, \
           count(*) FILTER (WHERE completed) AS comp FROM fact_video_view GROUP BY 1, 2), \
         l AS (SELECT video_id, date_trunc('hour', event_time) AS hour, \
           sum(CASE WHEN event_type = 'like' AND (prev IS NULL OR prev = 'unlike') THEN 1 \
                    WHEN event_type = 'unlike' AND prev = 'like' THEN -1 ELSE 0 END) AS net \
           FROM (SELECT *, lag(event_type) OVER (PARTITION BY user_id, video_id \
                 ORDER BY event_time, event_id) AS prev \
                 FROM events WHERE event_type IN ('like', 'unlike')) GROUP BY 1, 2), \
         e AS (SELECT video_id, date_trunc('hour', event_time) AS hour, \
           count(DISTINCT share_id) FILTER (WHERE event_type = 'share') AS sh, \
           count(*) FILTER (WHERE event_type = 'comment') AS co \
           FROM events WHERE event_type IN ('share', 'comment') GROUP BY 1, 2), \
         k AS (SELECT video_id, hour FROM v UNION SELECT video_id, hour FROM l \
           UNION SELECT video_id, hour FROM e) \
         SELECT k.video_id, k.hour, coalesce(views, 0), coalesce(uv, 0), coalesce(watch, 0), \
           coalesce(comp, 0), coalesce(net, 0), coalesce(sh, 0), coalesce(co, 0) \
         FROM k LEFT JOIN v ON k.video_id = v.video_id AND k.hour = v.hour \
           LEFT JOIN l ON k.video_id = l.video_id AND k.hour = l.hour \
           LEFT JOIN e ON k.video_id = e.video_id AND k.hour = e.hour ORDER BY 1, 2",
    )
    .await;
    assert!(got.len() > 1_000, "{} video-hours", got.len());
    assert_eq!(got, want);
    server.shutdown().await.unwrap();
}

/// The dimensions' event-derived columns (no upserts here, so one version per id) against
/// their definition written as SQL windows over the raw `events`: the latest device of each
/// user and the latest creator of each video by (event_time, event_id), first and last seen,
/// the largest duration, the distinct videos of each creator.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dimensions_equal_direct_queries() {
    let now = chrono::Utc::now().timestamp_millis();
    let mut lines = generate(&WorkloadConfig::new(6_000, 63, now)).lines;
    // The generator keeps each user's device and each video's creator fixed; these change
    // them, arrive out of order and tie on time, so "latest" differs from "first" or "any".
    let t0 = now - 2 * 86_400_000;
    let ev = |id: &str, dt: i64, video: i64, creator: i64, country: Option<&str>| {
        let mut e = serde_json::json!({"event_id": id, "event_type": "like", "event_time": t0 + dt,
            "user_id": 990_001, "session_id": "dim-s", "video_id": video, "creator_id": creator});
        if let Some(c) = country {
            e["device"] = serde_json::json!({"os": "ios", "country": c});
        }
        e.to_string()
    };
    lines.extend([
        ev("dim-3", 3_000, 990_002, 7, Some("CC")),
        ev("dim-1", 1_000, 990_002, 5, Some("AA")),
        ev("dim-4", 4_000, 990_002, 8, None),
        ev("dim-2b", 2_000, 990_003, 9, Some("BB")),
        ev("dim-2a", 2_000, 990_003, 6, Some("AB")),
    ]);
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), 1_000_000).await;
    let url = url(&server);
    ingest(&url, &lines).await;
    materialize(&url).await;
    let latest = sql(
        &url,
        "SELECT country FROM dim_user WHERE user_id = 990001 UNION ALL \
         SELECT CAST(creator_id AS VARCHAR) FROM dim_video WHERE video_id IN (990002, 990003) \
         ORDER BY 1",
    )
    .await;
    // CC: the latest event with a device (dim-4 has none); video 990002: creator 8 of dim-4;
    // video 990003: both at one time, event_id dim-2b wins over dim-2a (creator 9).
    let want: Vec<Vec<Value>> = [["8"], ["9"], ["CC"]]
        .map(|r| vec![Value::from(r[0])])
        .into();
    assert_eq!(latest, want);
    let pairs = [
        (
            "SELECT user_id, country, os, app_version, first_seen, last_seen FROM dim_user \
             ORDER BY 1",
            "WITH s AS (SELECT user_id, min(event_time) AS f, max(event_time) AS l FROM events \
               GROUP BY 1), \
             d AS (SELECT * FROM (SELECT user_id, device_country, device_os, device_app_version, \
               row_number() OVER (PARTITION BY user_id ORDER BY event_time DESC, event_id DESC) AS r \
               FROM events WHERE device_country IS NOT NULL OR device_os IS NOT NULL \
               OR device_app_version IS NOT NULL) WHERE r = 1) \
             SELECT s.user_id, d.device_country, d.device_os, d.device_app_version, s.f, s.l \
             FROM s LEFT JOIN d ON s.user_id = d.user_id ORDER BY 1",
        ),
        (
            "SELECT video_id, creator_id, duration_ms, first_seen, last_seen FROM dim_video \
             ORDER BY 1",
            "WITH s AS (SELECT video_id, min(event_time) AS f, max(event_time) AS l, \
               max(video_duration_ms) AS d FROM events WHERE video_id IS NOT NULL GROUP BY 1), \
             c AS (SELECT * FROM (SELECT video_id, creator_id, row_number() OVER \
               (PARTITION BY video_id ORDER BY event_time DESC, event_id DESC) AS r FROM events \
               WHERE video_id IS NOT NULL AND creator_id IS NOT NULL) WHERE r = 1) \
             SELECT s.video_id, c.creator_id, s.d, s.f, s.l \
             FROM s LEFT JOIN c ON s.video_id = c.video_id ORDER BY 1",
        ),
        (
            "SELECT creator_id, videos, first_seen, last_seen FROM dim_creator ORDER BY 1",
            "SELECT creator_id, count(DISTINCT video_id), min(event_time), max(event_time) \
             FROM events WHERE creator_id IS NOT NULL GROUP BY 1 ORDER BY 1",
        ),
    ];
    for (got, want) in pairs {
        let (got, want) = (sql(&url, got).await, sql(&url, want).await);
        assert!(got.len() > 10, "{} rows", got.len());
        assert_eq!(got, want);
    }
    server.shutdown().await.unwrap();
}

/// Every warehouse table as sorted rendered rows (floats to 12 significant digits: sums and
/// averages may add in another order when fewer dates are recomputed).
async fn snapshot(url: &str) -> BTreeMap<String, Vec<String>> {
    let tables = [
        "fact_video_view",
        "fact_session",
        "fact_engagement",
        "fact_follow",
        "like_state",
        "follow_state",
        "agg_creator_daily",
        "agg_video_hourly",
        "video_retention",
        "fact_share",
        "share_cascade",
        "dim_user",
        "dim_video",
        "dim_creator",
        "dim_date",
    ];
    let mut out = BTreeMap::new();
    for t in tables {
        let mut rows: Vec<String> = sql(url, &format!("SELECT * FROM {t}"))
            .await
            .into_iter()
            .map(|r| {
                r.iter()
                    .map(|v| match v {
                        Value::Number(n) if n.is_f64() => format!("{:.11e}", n.as_f64().unwrap()),
                        other => other.to_string(),
                    })
                    .collect::<Vec<_>>()
                    .join("|")
            })
            .collect();
        rows.sort();
        out.insert(t.to_string(), rows);
    }
    out
}

/// How many events a materialization's models read (its `ev` table's rows).
fn rows_read(report: &Value) -> u64 {
    report["tables"]
        .as_array()
        .and_then(|t| t.iter().find(|t| t["table"] == "ev"))
        .and_then(|t| t["rows"].as_u64())
        .expect("the report lists `ev`")
}

/// POSTs a materialization (`?full=true` when `full`); returns its report.
async fn rebuild(url: &str, full: bool) -> Value {
    let path = if full {
        "/v1/admin/materialize?full=true"
    } else {
        "/v1/admin/materialize"
    };
    let (status, v) = post(url, path, "", "application/json").await;
    assert_eq!(status, 200, "{v}");
    v
}

/// Incremental materialization (only the dates that received events, closed over views,
/// sessions, like and follow keys) leaves every warehouse table exactly as a full rebuild does,
/// for several arrival orders of a workload with late, duplicated, out-of-order and malformed
/// events ingested in five rounds; the aggregates equal the reference; a late trickle for one
/// old date rebuilds only the dates it affects.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn incremental_rebuilds_equal_a_full_rebuild() {
    // 2026-11-20T12:00:00Z; the clock stands still so sessions cannot time out between runs.
    let now = 1_795_176_000_000;
    let mut cfg = WorkloadConfig::new(9_000, 33, now);
    cfg.days = 12;
    let w = generate(&cfg);
    let evs = events(&w.lines);
    for seed in [4u64, 5, 6] {
        let mut lines = w.lines.clone();
        lines.shuffle(&mut rand::rngs::StdRng::seed_from_u64(seed));
        let dir = tempfile::tempdir().unwrap();
        let server = crate::common::start_at(dir.path(), now).await;
        let u = url(&server);
        for (i, chunk) in lines.chunks(lines.len().div_ceil(5)).enumerate() {
            ingest(&u, chunk).await;
            let r = rebuild(&u, false).await;
            let want = if i == 0 { "full" } else { "incremental" };
            assert_eq!(r["mode"], want, "round {i}: {r}");
        }
        check(&u, &evs).await;
        let incremental = snapshot(&u).await;

        // A late trickle: one unlike, a day after the oldest like of the same (user, video),
        // in a session of its own (so only the like key links it to the like's date)…
        let liked = sql(
            &u,
            "SELECT user_id, video_id, creator_id, CAST(event_time AS BIGINT) / 1000 \
             FROM fact_engagement WHERE event_type = 'like' ORDER BY event_time LIMIT 1",
        )
        .await;
        let (user, video, creator, t) = (&liked[0][0], &liked[0][1], &liked[0][2], &liked[0][3]);
        let late = format!(
            "{{\"event_id\":\"late-{seed}\",\"event_type\":\"unlike\",\"event_time\":{},\
             \"user_id\":{user},\"video_id\":{video},\"creator_id\":{creator},\"session_id\":\"late-s-{seed}\"}}",
            t.as_i64().unwrap() + DAY
        );
        // And a comment three days after the start of a session that began four days after
        // that like: only a search beyond the dates near the new events finds its start.
        let oldest = sql(
            &u,
            &format!(
                "SELECT session_id, user_id, CAST(start_time AS BIGINT) / 1000 \
                 FROM fact_session WHERE CAST(start_time AS BIGINT) / 1000 >= {} \
                 ORDER BY start_time, session_id LIMIT 1",
                t.as_i64().unwrap() + 4 * DAY
            ),
        )
        .await;
        let (session, s_user, s_start) = (&oldest[0][0], &oldest[0][1], &oldest[0][2]);
        let far = format!(
            "{{\"event_id\":\"far-{seed}\",\"event_type\":\"comment\",\"event_time\":{},\
             \"user_id\":{s_user},\"video_id\":{video},\"creator_id\":{creator},\
             \"session_id\":{session},\"props\":{{\"comment_id\":\"far-c-{seed}\"}}}}",
            s_start.as_i64().unwrap() + 3 * DAY
        );
        let body = format!("{late}\n{far}\n");
        let (status, v) = post(&u, "/v1/events", body, "application/x-ndjson").await;
        assert_eq!((status, &v["accepted"]), (200, &Value::from(2)), "{v}");
        let r = rebuild(&u, false).await;
        assert_eq!(r["mode"], "incremental", "{r}");
        let dates = r["dates"].as_array().unwrap().len();
        let all = sql(&u, "SELECT count(DISTINCT event_date) FROM events").await[0][0]
            .as_u64()
            .unwrap() as usize;
        assert!(
            (1..all).contains(&dates),
            "a one-event trickle rebuilt {dates} of {all} dates"
        );
        // It read only some events: the models ran one after another, switching to every
        // event after the date-keyed ones (the path a rebuild reading every event skips).
        let stored = sql(&u, "SELECT count(*) FROM events").await[0][0]
            .as_u64()
            .unwrap();
        assert!(
            rows_read(&r) < stored,
            "{} of {stored} events read",
            rows_read(&r)
        );
        let mut with_late = evs.clone();
        with_late.push(parse_event(late.as_bytes()).unwrap());
        with_late.push(parse_event(far.as_bytes()).unwrap());
        check(&u, &with_late).await;
        let after_trickle = snapshot(&u).await;
        assert_ne!(after_trickle, incremental, "the unlike changed something");

        let r = rebuild(&u, true).await;
        assert_eq!(r["mode"], "full", "{r}");
        let full = snapshot(&u).await;
        for (t, rows) in &full {
            assert_eq!(
                after_trickle[t].len(),
                rows.len(),
                "seed {seed}: {t}: row count incremental vs full"
            );
            for (a, b) in after_trickle[t].iter().zip(rows) {
                assert_eq!(a, b, "seed {seed}: {t}: incremental vs full");
            }
        }
        if seed == 4 {
            // A full rebuild that rewrites unchanged files too (`bench materialize`): every
            // table gets a new version, with the same rows.
            let again = server.engine.materialize_full_rewriting().await.unwrap();
            let written = again.tables.iter().filter(|t| t.version.is_some());
            assert_eq!(written.clone().count(), full.len());
            for t in written {
                let before = r["tables"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .find(|b| b["table"] == t.table.as_str())
                    .and_then(|b| b["version"].as_u64());
                assert_eq!(t.version, before.map(|v| v + 1), "{}", t.table);
            }
            assert_eq!(snapshot(&u).await, full);
        }
        server.shutdown().await.unwrap();
    }
}

/// A session's new event days after its start (nothing else links the two dates): the
/// incremental rebuild must find the session's start beyond the neighbouring dates and
/// rewrite its row, as a full rebuild does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn incremental_rebuild_finds_a_session_days_away() {
    let now = 1_795_176_000_000; // 2026-11-20T12:00:00Z
    let day0 = now - 10 * DAY;
    let ev = |id: &str, ty: &str, t: i64, user: u64, session: &str, extra: &str| {
        format!(
            "{{\"event_id\":\"{id}\",\"event_type\":\"{ty}\",\"event_time\":{t},\"user_id\":{user},\
             \"session_id\":\"{session}\",\"video_id\":50,\"creator_id\":7{extra}}}"
        )
    };
    let view = ",\"view_id\":\"v1\",\"props\":{\"watch_ms\":4000,\"video_duration_ms\":8000}";
    let first = [
        ev("a1", "session_start", day0, 1, "s1", ""),
        ev("a2", "video_view_start", day0 + 60_000, 1, "s1", view),
        ev("a3", "video_view_end", day0 + 120_000, 1, "s1", view),
        ev("b1", "session_start", day0 + 5 * DAY, 2, "s2", ""),
        ev("b2", "like", day0 + 5 * DAY + 60_000, 2, "s2", ""),
    ];
    let dir = tempfile::tempdir().unwrap();
    let server = crate::common::start_at(dir.path(), now).await;
    let u = url(&server);
    ingest(&u, &first).await;
    assert_eq!(rebuild(&u, false).await["mode"], "full");
    let far = ev(
        "a4",
        "comment",
        day0 + 5 * DAY + 120_000,
        1,
        "s1",
        ",\"props\":{\"comment_id\":\"c1\"}",
    );
    ingest(&u, &[far]).await;
    let r = rebuild(&u, false).await;
    assert_eq!(r["mode"], "incremental", "{r}");
    // The session ties its two dates, which hold every event: the models read all six, as
    // in a full rebuild, and only the two dates are written.
    assert_eq!(r["dates"].as_array().map(Vec::len), Some(2), "{r}");
    assert_eq!(rows_read(&r), 6, "{r}");
    let rows = sql(
        &u,
        "SELECT comments, CAST(event_date AS VARCHAR) FROM fact_session WHERE session_id = 's1'",
    )
    .await;
    assert_eq!(rows.len(), 1, "one row for the session: {rows:?}");
    assert_eq!(rows[0][0], 1, "the late comment counts in its session");
    let incremental = snapshot(&u).await;
    assert_eq!(rebuild(&u, true).await["mode"], "full");
    assert_eq!(incremental, snapshot(&u).await);
    server.shutdown().await.unwrap();
}

/// A full rebuild in user buckets (forced here with buckets of 400 events) writes every
/// warehouse table exactly as the rebuild in memory does, and its aggregates equal the
/// reference, for a workload with late, duplicated, out-of-order and malformed events over
/// twelve days; also when two users' events share a `session_id` (their events then go to
/// one more bucket, so that the session stays whole).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebuild_in_user_buckets_equals_one_in_memory() {
    let now = 1_795_176_000_000; // 2026-11-20T12:00:00Z
    let mut cfg = WorkloadConfig::new(9_000, 34, now);
    cfg.days = 12;
    let w = generate(&cfg);
    let evs = events(&w.lines);
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let in_memory = crate::common::start_at(dir_a.path(), now).await;
    let bucketed = crate::common::start_at_with(dir_b.path(), now, 400).await;
    let (a, b) = (url(&in_memory), url(&bucketed));
    for u in [&a, &b] {
        ingest(u, &w.lines).await;
    }
    let ra = rebuild(&a, true).await;
    let rb = rebuild(&b, true).await;
    assert!(ra.get("buckets").is_none(), "{ra}");
    let buckets = rb["buckets"].as_u64().unwrap_or(0);
    assert!(buckets > 10, "{rb}");
    assert_eq!(rows_read(&ra), rows_read(&rb));
    check(&b, &evs).await;
    let (sa, sb) = (snapshot(&a).await, snapshot(&b).await);
    for (t, rows) in &sa {
        assert_eq!(sb[t].len(), rows.len(), "{t}: rows in buckets vs in memory");
        assert!(!rows.is_empty() || t == "dim_date", "{t} has rows");
        for (x, y) in sb[t].iter().zip(rows) {
            assert_eq!(x, y, "{t}: in buckets vs in memory");
        }
    }
    let sa_before = sa["fact_session"].clone();
    // A later event of another user in an existing session: the session's events fall in
    // two buckets.
    let s = sql(
        &b,
        "SELECT session_id, user_id, CAST(start_time AS BIGINT) / 1000 FROM fact_session \
         ORDER BY views DESC, session_id LIMIT 1",
    )
    .await;
    let (session, user, t) = (&s[0][0], s[0][1].as_i64().unwrap(), &s[0][2]);
    // Three other users (with over 20 buckets, some surely in another bucket).
    let shared: Vec<String> = (1..=3)
        .map(|k| {
            format!(
                "{{\"event_id\":\"shared-{k}\",\"event_type\":\"comment\",\"event_time\":{},\
                 \"user_id\":{},\"video_id\":1,\"creator_id\":1,\"session_id\":{session},\
                 \"props\":{{\"comment_id\":\"shared-c{k}\"}}}}",
                t.as_i64().unwrap() + 1_000 * k,
                user + k
            )
        })
        .collect();
    for u in [&a, &b] {
        ingest(u, &shared).await;
    }
    rebuild(&a, true).await;
    let rb = rebuild(&b, true).await;
    // The users of the shared session (those in other buckets) went to one more bucket.
    assert_eq!(rb["buckets"].as_u64(), Some(buckets + 1), "{rb}");
    let (sa, sb) = (snapshot(&a).await, snapshot(&b).await);
    assert_ne!(sa["fact_session"], sa_before, "the shared session changed");
    assert_eq!(sa, sb);
    in_memory.shutdown().await.unwrap();
    bucketed.shutdown().await.unwrap();
}
