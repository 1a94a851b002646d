//! Online features (docs/online-features.md) against an independent computation written here from the stored
//! events: every video, user and creator of a workload with duplicates, unlikes, unfollows,
//! out-of-order and late events, ingested in a shuffled order over HTTP with a fixed clock.
//! Then: identical features after a restart, `reelhouse check` finds no difference, and a
//! SIGKILL of the real binary restores identical features.

use std::collections::{BTreeSet, HashMap};

use rand::seq::SliceRandom;
use rand::SeedableRng;
use reelhouse_workload::{generate, WorkloadConfig};
use serde_json::{json, Value};

use crate::common::{free_port, get, post, spawn_serve, sql, start_at, url, wait_healthy};

const NOW: i64 = 1_764_000_000_000 + 12 * 3_600_000 + 17 * 60_000 + 5_123;
const MINUTE: i64 = 60_000;

/// One stored event, as the reference reads it back through SQL.
#[derive(Debug, Clone)]
struct Ev {
    id: String,
    kind: String,
    t: i64,
    user: i64,
    session: Option<String>,
    video: Option<i64>,
    creator: Option<i64>,
    view: Option<String>,
    watch: Option<i64>,
    duration: Option<i64>,
    share: Option<String>,
}

async fn stored_events(url: &str) -> Vec<Ev> {
    let rows = sql(
        url,
        "SELECT event_id, event_type, CAST(event_time AS BIGINT) / 1000, user_id, session_id, \
         video_id, creator_id, view_id, watch_ms, video_duration_ms, share_id FROM events",
    )
    .await;
    let s = |v: &Value| v.as_str().map(String::from);
    rows.iter()
        .map(|r| Ev {
            id: s(&r[0]).unwrap(),
            kind: s(&r[1]).unwrap(),
            t: r[2].as_i64().unwrap(),
            user: r[3].as_i64().unwrap(),
            session: s(&r[4]),
            video: r[5].as_i64(),
            creator: r[6].as_i64(),
            view: s(&r[7]),
            watch: r[8].as_i64(),
            duration: r[9].as_i64(),
            share: s(&r[10]),
        })
        .collect()
}

/// (viewed_at, video, percent) most recent first; liked videos; followed creators; sessions today.
type UserRef = (Vec<(i64, i64, Option<f64>)>, Vec<i64>, BTreeSet<i64>, u64);

#[derive(Debug, Default)]
struct Reference {
    videos: HashMap<i64, Value>,
    users: HashMap<i64, UserRef>,
    creators: HashMap<i64, (i64, u64)>,
}

/// docs/online-features.md features computed directly: views paired by view_id as in `fact_video_view`,
/// like/follow state by the last (event_time, event_id), windows over whole minutes.
fn reference(evs: &[Ev], now: i64) -> Reference {
    let now_min = now / MINUTE;
    let in_window = |t: i64, minutes: i64| t / MINUTE > now_min - minutes && t / MINUTE <= now_min;
    // Views.
    #[derive(Default)]
    struct V {
        start: Option<(i64, i64, i64, i64)>, // time, user, video, creator
        ends: Vec<(i64, i64, i64, i64, i64, i64)>, // time, user, video, creator, watch, duration
    }
    let mut views: HashMap<&str, V> = HashMap::new();
    let is_view = |e: &&Ev| e.kind == "video_view_start" || e.kind == "video_view_end";
    for e in evs.iter().filter(is_view) {
        let v = views.entry(e.view.as_deref().unwrap()).or_default();
        let (video, creator) = (e.video.unwrap(), e.creator.unwrap());
        if e.kind == "video_view_start" {
            if v.start.is_none_or(|s| e.t < s.0) {
                v.start = Some((e.t, e.user, video, creator));
            }
        } else {
            v.ends.push((
                e.t,
                e.user,
                video,
                creator,
                e.watch.unwrap(),
                e.duration.unwrap(),
            ));
        }
    }
    #[derive(Default)]
    struct Vid {
        total: i64,
        h1: i64,
        h24: i64,
        ended: i64,
        pct: f64,
        completions: i64,
        viewers: BTreeSet<i64>,
        likes: i64,
        shares: BTreeSet<String>,
        comments: i64,
        creator: i64,
    }
    let mut vids: HashMap<i64, Vid> = HashMap::new();
    let mut r = Reference::default();
    let mut user_views: HashMap<i64, Vec<(i64, i64, Option<f64>)>> = HashMap::new();
    let mut creator_views: HashMap<i64, u64> = HashMap::new();
    for v in views.values() {
        let (at, user, video, creator) = match v.start {
            Some(s) => s,
            None => {
                let (mut t, mut u, mut vi, mut c) = (i64::MIN, i64::MAX, i64::MAX, i64::MAX);
                for e in &v.ends {
                    (t, u, vi, c) = (t.max(e.0), u.min(e.1), vi.min(e.2), c.min(e.3));
                }
                (t, u, vi, c)
            }
        };
        let ended = !v.ends.is_empty();
        let watch = v.ends.iter().map(|e| e.4).max().unwrap_or(0);
        let duration = v.ends.iter().map(|e| e.5).max().unwrap_or(1);
        let pct = ended.then(|| (watch as f64 / duration as f64).min(1.0));
        let d = vids.entry(video).or_default();
        d.total += 1;
        if in_window(at, 60) {
            d.h1 += 1;
        }
        if in_window(at, 1440) {
            d.h24 += 1;
            *creator_views.entry(creator).or_default() += 1;
            if let Some(p) = pct {
                d.ended += 1;
                d.pct += p;
                d.completions += (watch as f64 >= 0.98 * duration as f64) as i64;
            }
        }
        user_views.entry(user).or_default().push((at, video, pct));
    }
    // Unique viewers: users with a view event of the video in the last 24 h.
    for e in evs.iter().filter(is_view) {
        if in_window(e.t, 1440) {
            vids.entry(e.video.unwrap())
                .or_default()
                .viewers
                .insert(e.user);
        }
    }
    // Last-writer-wins state.
    let mut likes: HashMap<(i64, i64), (i64, String, bool)> = HashMap::new();
    let mut follows: HashMap<(i64, i64), (i64, String, bool)> = HashMap::new();
    for e in evs {
        let slot = match e.kind.as_str() {
            "like" | "unlike" => likes.entry((e.user, e.video.unwrap())),
            "follow_creator" | "unfollow_creator" => follows.entry((e.user, e.creator.unwrap())),
            _ => continue,
        };
        let on = e.kind == "like" || e.kind == "follow_creator";
        let new = (e.t, e.id.clone(), on);
        slot.and_modify(|cur| {
            if (new.0, &new.1) > (cur.0, &cur.1) {
                *cur = new.clone();
            }
        })
        .or_insert(new);
    }
    for ((_, video), (_, _, on)) in &likes {
        vids.entry(*video).or_default().likes += *on as i64;
    }
    for e in evs {
        if let (Some(v), Some(c)) = (e.video, e.creator) {
            vids.entry(v).or_default().creator = c;
        }
        match e.kind.as_str() {
            "share" => {
                vids.entry(e.video.unwrap())
                    .or_default()
                    .shares
                    .insert(e.share.clone().unwrap());
            }
            "comment" => vids.entry(e.video.unwrap()).or_default().comments += 1,
            _ => {}
        }
    }
    for (id, d) in &vids {
        let rate = |n: f64| if d.ended > 0 { n / d.ended as f64 } else { 0.0 };
        r.videos.insert(
            *id,
            json!({
                "video_id": id, "creator_id": d.creator, "views_total": d.total,
                "views_1h": d.h1, "views_24h": d.h24, "unique_viewers_24h": d.viewers.len(),
                "likes": d.likes, "shares": d.shares.len(), "comments": d.comments,
                "avg_percent_viewed_24h": rate(d.pct),
                "completion_rate_24h": rate(d.completions as f64),
            }),
        );
    }
    // Users.
    let mut users: BTreeSet<i64> = evs.iter().map(|e| e.user).collect();
    users.extend(user_views.keys());
    let today = now.div_euclid(86_400_000);
    let mut session_start: HashMap<&str, (i64, Option<i64>, i64)> = HashMap::new();
    for e in evs {
        if let Some(s) = e.session.as_deref() {
            let x = session_start.entry(s).or_insert((i64::MAX, None, e.user));
            x.0 = x.0.min(e.t);
            if e.kind == "session_start" {
                x.1 = Some(x.1.map_or(e.t, |t| t.min(e.t)));
            }
        }
    }
    let mut sessions_today: HashMap<i64, u64> = HashMap::new();
    for (first, start, user) in session_start.values() {
        if start.unwrap_or(*first).div_euclid(86_400_000) == today {
            *sessions_today.entry(*user).or_default() += 1;
        }
    }
    for u in users {
        let mut viewed = user_views.remove(&u).unwrap_or_default();
        viewed.sort_by_key(|v| std::cmp::Reverse(v.0));
        viewed.truncate(100);
        let mut liked: Vec<(i64, &String, i64)> = likes
            .iter()
            .filter(|((user, _), s)| *user == u && s.2)
            .map(|((_, v), s)| (s.0, &s.1, *v))
            .collect();
        liked.sort_by(|a, b| b.cmp(a));
        let liked: Vec<i64> = liked.into_iter().take(100).map(|x| x.2).collect();
        let followed: BTreeSet<i64> = follows
            .iter()
            .filter(|((user, _), s)| *user == u && s.2)
            .map(|((_, c), _)| *c)
            .collect();
        let st = sessions_today.get(&u).copied().unwrap_or(0);
        r.users.insert(u, (viewed, liked, followed, st));
    }
    // Creators.
    let mut followers: HashMap<i64, i64> = HashMap::new();
    for ((_, c), s) in &follows {
        *followers.entry(*c).or_default() += s.2 as i64;
    }
    let creators: BTreeSet<i64> = evs.iter().filter_map(|e| e.creator).collect();
    for c in creators {
        r.creators.insert(
            c,
            (
                followers.get(&c).copied().unwrap_or(0),
                creator_views.get(&c).copied().unwrap_or(0),
            ),
        );
    }
    r
}

/// Every video's features through the batch endpoint (order kept), by id.
async fn all_videos(url: &str, ids: &[i64]) -> HashMap<i64, Value> {
    let mut out = HashMap::new();
    for chunk in ids.chunks(1000) {
        let (status, v) = post(
            url,
            "/v1/features/videos:batch",
            json!({ "video_ids": chunk }).to_string(),
            "application/json",
        )
        .await;
        assert_eq!(status, 200, "{v}");
        let list = v.as_array().unwrap();
        assert_eq!(list.len(), chunk.len());
        for (id, f) in chunk.iter().zip(list) {
            assert_eq!(f["video_id"].as_i64(), Some(*id), "order kept");
            out.insert(*id, f.clone());
        }
    }
    out
}

/// Everything the store answers for the given ids, for before/after comparisons.
async fn everything(url: &str, r: &Reference) -> Value {
    let mut vids: Vec<i64> = r.videos.keys().copied().collect();
    vids.sort();
    let videos = all_videos(url, &vids).await;
    let mut users = serde_json::Map::new();
    for u in r.users.keys() {
        let (status, v) = get(url, &format!("/v1/features/users/{u}")).await;
        assert_eq!(status, 200);
        users.insert(u.to_string(), v);
    }
    let mut creators = serde_json::Map::new();
    for c in r.creators.keys() {
        let (status, v) = get(url, &format!("/v1/features/creators/{c}")).await;
        assert_eq!(status, 200);
        creators.insert(c.to_string(), v);
    }
    let videos: serde_json::Map<String, Value> = videos
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
    json!({"videos": videos, "users": users, "creators": creators})
}

fn close(a: &Value, b: &Value) -> bool {
    match (a.as_f64(), b.as_f64()) {
        (Some(x), Some(y)) => (x - y).abs() < 1e-9,
        _ => a == b,
    }
}

async fn assert_matches_reference(url: &str, r: &Reference) {
    let mut vids: Vec<i64> = r.videos.keys().copied().collect();
    vids.sort();
    let got = all_videos(url, &vids).await;
    let mut windowed = 0;
    for (id, want) in &r.videos {
        let g = &got[id];
        for (k, w) in want.as_object().unwrap() {
            assert!(close(&g[k], w), "video {id} {k}: got {} want {w}", g[k]);
        }
        windowed += want["views_1h"].as_i64().unwrap();
    }
    assert!(windowed > 0, "the workload puts views in the last hour");
    for (u, (viewed, liked, followed, st)) in &r.users {
        let (_, g) = get(url, &format!("/v1/features/users/{u}")).await;
        let gv = g["last_viewed"].as_array().unwrap();
        assert_eq!(gv.len(), viewed.len(), "user {u} last_viewed length");
        for (x, (_, video, pct)) in gv.iter().zip(viewed) {
            assert_eq!(
                x["video_id"].as_i64(),
                Some(*video),
                "user {u} viewed order"
            );
            match pct {
                Some(p) => assert!((x["percent_viewed"].as_f64().unwrap() - p).abs() < 1e-9),
                None => assert!(x["percent_viewed"].is_null()),
            }
        }
        let gl: Vec<i64> = serde_json::from_value(g["last_liked"].clone()).unwrap();
        assert_eq!(&gl, liked, "user {u} last_liked");
        let gf: BTreeSet<i64> = serde_json::from_value(g["followed_creators"].clone()).unwrap();
        assert_eq!(&gf, followed, "user {u} followed_creators");
        assert_eq!(
            g["sessions_today"].as_u64(),
            Some(*st),
            "user {u} sessions_today"
        );
    }
    for (c, (followers, views)) in &r.creators {
        let (_, g) = get(url, &format!("/v1/features/creators/{c}")).await;
        assert_eq!(g["followers"].as_i64(), Some(*followers), "creator {c}");
        assert_eq!(g["views_24h"].as_u64(), Some(*views), "creator {c}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn features_equal_reference_survive_restart_and_agree_with_warehouse() {
    // Sessions start up to 3 h before the workload's end: ending it 2 h 40 min after "now"
    // puts views in the last hour (and a few in the future, which ingest clamps).
    let w = generate(&WorkloadConfig::new(15_000, 71, NOW + 160 * MINUTE));
    let mut lines = w.lines.clone();
    lines.shuffle(&mut rand::rngs::StdRng::seed_from_u64(9));
    let dir = tempfile::tempdir().unwrap();
    let server = start_at(dir.path(), NOW).await;
    let u = url(&server);
    // Half, a flush (snapshot), the rest: the restart below replays a snapshot plus WAL.
    let half = lines.len() / 2;
    for part in [&lines[..half], &lines[half..]] {
        for chunk in part.chunks(1_500) {
            let body = chunk.join("\n") + "\n";
            let (status, v) = post(&u, "/v1/events", body, "application/x-ndjson").await;
            assert_eq!(status, 200, "{v}");
        }
        if part.len() == half {
            server.engine.flush().await.unwrap();
        }
    }
    // Resending everything changes nothing (dedup before the store).
    let body = lines[..3000].join("\n");
    post(&u, "/v1/events", body, "application/x-ndjson").await;

    let evs = stored_events(&u).await;
    let r = reference(&evs, NOW);
    assert!(r.videos.values().any(|v| v["likes"].as_i64() > Some(0)));
    assert_matches_reference(&u, &r).await;

    // Unknown ids are zeros; bad input gets a clear 400.
    let unknown = all_videos(&u, &[999_999_999]).await;
    assert_eq!(unknown[&999_999_999]["views_total"], 0);
    let (status, _) = get(&u, "/v1/features/videos/abc").await;
    assert_eq!(status, 400);
    let too_many: Vec<i64> = (0..1001).collect();
    let (status, v) = post(
        &u,
        "/v1/features/videos:batch",
        json!({ "video_ids": too_many }).to_string(),
        "application/json",
    )
    .await;
    assert_eq!(status, 400, "{v}");

    // The warehouse agrees once it has seen the same events.
    let (status, v) = post(&u, "/v1/admin/materialize", "", "application/json").await;
    assert_eq!(status, 200, "{v}");
    let (status, report) = get(&u, "/v1/admin/check").await;
    assert_eq!(status, 200);
    assert_eq!(report["differences"], 0, "{report}");
    assert!(
        report["videos_compared"].as_u64().unwrap() >= 90,
        "{report}"
    );

    // Part of the second half is only in the WAL, not in the snapshot... until shutdown.
    let before = everything(&u, &r).await;
    server.shutdown().await.unwrap();
    let server = start_at(dir.path(), NOW).await;
    let after = everything(&url(&server), &r).await;
    assert_eq!(before, after, "identical features after a restart");
    server.shutdown().await.unwrap();

    // The CLI check opens the data directory itself.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_reelhouse"))
        .args(["check", "--data-dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(stdout.contains(" 0 difference(s)"), "{stdout}");
    // `reelhouse sql --data-dir` reads the warehouse tables too.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_reelhouse"))
        .args(["sql", "--json", "--data-dir"])
        .arg(dir.path())
        .arg("SELECT count(*) FROM fact_video_view")
        .output()
        .unwrap();
    let v: Value = serde_json::from_slice(&out.stdout).expect("sql --json output");
    assert_eq!(
        v["rows"][0][0].as_u64(),
        Some(
            r.videos
                .values()
                .map(|v| v["views_total"].as_u64().unwrap())
                .sum()
        )
    );
}

/// Frequent flushes and snapshots, so a SIGKILL finds both a snapshot and WAL after it.
const FLAGS: [&str; 6] = [
    "--flush-rows",
    "2000",
    "--flush-interval-ms",
    "200",
    "--snapshot-interval-ms",
    "300",
];

fn wall_minute() -> i64 {
    chrono::Utc::now().timestamp_millis() / MINUTE
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_restores_identical_features() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let u = format!("http://127.0.0.1:{port}");
    let mut child = spawn_serve(dir.path(), port, &FLAGS);
    wait_healthy(&u).await;
    let now = chrono::Utc::now().timestamp_millis();
    let w = generate(&WorkloadConfig::new(12_000, 73, now + 160 * MINUTE));
    let bodies = w.bodies(400);
    let n = bodies.len();
    for (i, body) in bodies.into_iter().enumerate() {
        let (status, v) = post(&u, "/v1/events", body, "application/x-ndjson").await;
        assert_eq!(status, 200, "{v}");
        if i == n / 2 {
            // Let a few flushes and snapshots happen; the rest stays in the WAL only.
            tokio::time::sleep(std::time::Duration::from_millis(1_500)).await;
        }
    }
    let r = reference(&stored_events(&u).await, now);
    // Windows move with the wall clock: compare within one minute, retrying if it turned.
    for attempt in 0.. {
        while chrono::Utc::now().timestamp_millis() % MINUTE > 20_000 {
            tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        }
        let minute = wall_minute();
        let before = everything(&u, &r).await;
        child.kill().expect("SIGKILL");
        child.wait().unwrap();
        child = spawn_serve(dir.path(), port, &FLAGS);
        wait_healthy(&u).await;
        let after = everything(&u, &r).await;
        if wall_minute() != minute && attempt < 3 {
            continue;
        }
        assert_eq!(before, after, "identical features after SIGKILL");
        break;
    }
    child.kill().unwrap();
    child.wait().unwrap();
}

/// A small one-shot `reelhouse ingest` leaves the feature store on disk: the snapshot is not
/// rewritten, the load's records stay in the WAL, and the next `serve` replays them. Its
/// features then equal those of a server that received every event over HTTP.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_small_one_shot_load_reaches_the_features_at_the_next_start() {
    use std::process::Command;
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let now = chrono::Utc::now().timestamp_millis();
    let w = generate(&WorkloadConfig::new(6_000, 75, now + 160 * MINUTE));
    let split = w.lines.len() * 2 / 3;
    let (pa, pb) = (free_port(), free_port());
    let (ua, ub) = (
        format!("http://127.0.0.1:{pa}"),
        format!("http://127.0.0.1:{pb}"),
    );
    let send = |u: String, lines: Vec<String>| async move {
        for chunk in lines.chunks(500) {
            let body = chunk.join("\n") + "\n";
            let (status, v) = post(&u, "/v1/events", body, "application/x-ndjson").await;
            assert_eq!(status, 200, "{v}");
        }
    };
    // a: two thirds over HTTP, then SIGTERM (which writes the feature snapshot).
    let child = spawn_serve(a.path(), pa, &[]);
    wait_healthy(&ua).await;
    send(ua.clone(), w.lines[..split].to_vec()).await;
    Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status()
        .unwrap();
    let mut child = child;
    assert!(child.wait().unwrap().success());
    let snapshot = a.path().join("_state/online.snap");
    let before = std::fs::read(&snapshot).unwrap();
    // The rest with the one-shot command.
    let input = tempfile::tempdir().unwrap();
    let file = input.path().join("rest.ndjson");
    std::fs::write(&file, w.lines[split..].join("\n") + "\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_reelhouse"))
        .arg("ingest")
        .arg(&file)
        .arg("--data-dir")
        .arg(a.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        std::fs::read(&snapshot).unwrap() == before,
        "the one-shot load rewrote the feature snapshot"
    );
    // b: every line over HTTP.
    let mut cb = spawn_serve(b.path(), pb, &[]);
    wait_healthy(&ub).await;
    send(ub.clone(), w.lines.clone()).await;
    let mut ca = spawn_serve(a.path(), pa, &[]);
    wait_healthy(&ua).await;
    assert_eq!(
        crate::common::stored_once(&ua).await,
        crate::common::stored_once(&ub).await
    );
    let r = reference(&stored_events(&ub).await, now);
    for attempt in 0.. {
        while chrono::Utc::now().timestamp_millis() % MINUTE > 40_000 {
            tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        }
        let minute = wall_minute();
        let (x, y) = (everything(&ua, &r).await, everything(&ub, &r).await);
        if wall_minute() != minute && attempt < 3 {
            continue;
        }
        assert!(x.to_string().contains("\"views_total\":"), "{x}");
        assert_eq!(x, y, "features after a deferred load and its replay");
        break;
    }
    for c in [&mut ca, &mut cb] {
        c.kill().unwrap();
        c.wait().unwrap();
    }
}
