//! Share cascades end to end: `fact_share` and `share_cascade` after a shuffled ingest equal an
//! independent all-pairs computation over the stored share events; a child share that arrives
//! before its parent is re-rooted once the parent is stored; the cascade endpoints answer.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};

use rand::seq::SliceRandom;
use rand::SeedableRng;
use reelhouse_workload::{generate, WorkloadConfig};
use serde_json::json;

use crate::common::{get, post, sql, start, url};

async fn materialize(u: &str) {
    let (status, v) = post(u, "/v1/admin/materialize", "", "application/json").await;
    assert_eq!(status, 200, "{v}");
}

/// (size, depth, max breadth, structural virality) per root, by BFS over all pairs.
fn reference(
    shares: &BTreeMap<String, (Option<String>, i64)>,
) -> HashMap<String, (i64, i64, i64, f64)> {
    // Parent links that point at a stored share of the same video (the generator makes no
    // cycles; the unit tests cover those).
    let parent = |s: &str| -> Option<String> {
        let (p, video) = &shares[s];
        p.as_ref()
            .filter(|p| shares.get(*p).is_some_and(|x| x.1 == *video && *p != s))
            .cloned()
    };
    let mut adj: HashMap<String, Vec<String>> = HashMap::new();
    let mut root_of: HashMap<String, String> = HashMap::new();
    for s in shares.keys() {
        let mut r = s.clone();
        while let Some(p) = parent(&r) {
            r = p;
        }
        root_of.insert(s.clone(), r);
        if let Some(p) = parent(s) {
            adj.entry(s.clone()).or_default().push(p.clone());
            adj.entry(p).or_default().push(s.clone());
        }
    }
    let mut trees: HashMap<String, Vec<String>> = HashMap::new();
    for (s, r) in &root_of {
        trees.entry(r.clone()).or_default().push(s.clone());
    }
    let bfs = |from: &String| -> HashMap<String, i64> {
        let mut d = HashMap::from([(from.clone(), 0)]);
        let mut q = VecDeque::from([from.clone()]);
        while let Some(x) = q.pop_front() {
            for y in adj.get(&x).into_iter().flatten() {
                if !d.contains_key(y) {
                    d.insert(y.clone(), d[&x] + 1);
                    q.push_back(y.clone());
                }
            }
        }
        d
    };
    trees
        .into_iter()
        .map(|(root, nodes)| {
            let n = nodes.len() as f64;
            let total: i64 = nodes.iter().map(|a| bfs(a).values().sum::<i64>()).sum();
            let from_root = bfs(&root);
            let mut levels: HashMap<i64, i64> = HashMap::new();
            for d in from_root.values() {
                *levels.entry(*d).or_default() += 1;
            }
            let v = if nodes.len() > 1 {
                total as f64 / (n * (n - 1.0))
            } else {
                0.0
            };
            let depth = *from_root.values().max().unwrap();
            (
                root,
                (
                    nodes.len() as i64,
                    depth,
                    *levels.values().max().unwrap(),
                    v,
                ),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cascades_equal_all_pairs_reference_after_shuffled_ingest() {
    let now = chrono::Utc::now().timestamp_millis();
    let w = generate(&WorkloadConfig::new(20_000, 81, now));
    let mut lines = w.lines.clone();
    lines.shuffle(&mut rand::rngs::StdRng::seed_from_u64(3));
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), 1_000_000).await;
    let u = url(&server);
    for chunk in lines.chunks(2_000) {
        let (status, v) = post(&u, "/v1/events", chunk.join("\n"), "application/x-ndjson").await;
        assert_eq!(status, 200, "{v}");
    }
    materialize(&u).await;

    // The stored share events (first per share_id by time, then event id).
    let rows = sql(
        &u,
        "SELECT share_id, parent_share_id, video_id FROM (SELECT *, row_number() OVER \
         (PARTITION BY share_id ORDER BY event_time, event_id) AS r FROM events \
         WHERE event_type = 'share') WHERE r = 1",
    )
    .await;
    let shares: BTreeMap<String, (Option<String>, i64)> = rows
        .iter()
        .map(|r| {
            (
                r[0].as_str().unwrap().to_string(),
                (r[1].as_str().map(String::from), r[2].as_i64().unwrap()),
            )
        })
        .collect();
    let want = reference(&shares);
    assert!(
        want.values().any(|c| c.0 > 2),
        "the workload has multi-level cascades"
    );
    let got = sql(
        &u,
        "SELECT root_share_id, size, depth, max_breadth, structural_virality FROM share_cascade",
    )
    .await;
    assert_eq!(got.len(), want.len(), "one cascade per root");
    for r in &got {
        let w = want[r[0].as_str().unwrap()];
        assert_eq!(
            (
                r[1].as_i64().unwrap(),
                r[2].as_i64().unwrap(),
                r[3].as_i64().unwrap()
            ),
            (w.0, w.1, w.2),
            "cascade {}",
            r[0]
        );
        assert!((r[4].as_f64().unwrap() - w.3).abs() < 1e-9);
    }
    let n_fact = sql(&u, "SELECT count(*) FROM fact_share").await[0][0]
        .as_i64()
        .unwrap();
    assert_eq!(n_fact as usize, shares.len());

    // Attributed views: views that started from a share of the tree.
    let views = sql(
        &u,
        "SELECT c.root_share_id, count(DISTINCT e.view_id) FROM events e \
         JOIN fact_share f ON e.via_share_id = f.share_id \
         JOIN share_cascade c ON f.root_share_id = c.root_share_id \
         WHERE e.event_type = 'video_view_start' AND e.source = 'share' GROUP BY 1",
    )
    .await;
    let by_root: HashMap<String, i64> = views
        .iter()
        .map(|r| (r[0].as_str().unwrap().to_string(), r[1].as_i64().unwrap()))
        .collect();
    let got_views = sql(&u, "SELECT root_share_id, views FROM share_cascade").await;
    assert!(by_root.values().sum::<i64>() > 0);
    for r in &got_views {
        let root = r[0].as_str().unwrap();
        assert_eq!(
            r[1].as_i64().unwrap(),
            by_root.get(root).copied().unwrap_or(0),
            "{root}"
        );
    }

    // Endpoints: the biggest cascade of a video, and its tree.
    let big = sql(&u, "SELECT video_id, root_share_id, size FROM share_cascade ORDER BY size DESC, root_share_id LIMIT 1").await;
    let (video, root, size) = (
        big[0][0].as_i64().unwrap(),
        big[0][1].as_str().unwrap(),
        big[0][2].as_i64().unwrap(),
    );
    let (status, v) = get(&u, &format!("/v1/videos/{video}/cascades?limit=5")).await;
    assert_eq!(status, 200);
    assert_eq!(v["cascades"][0]["size"].as_i64(), Some(size), "{v}");
    let (status, t) = get(&u, &format!("/v1/cascades/{root}")).await;
    assert_eq!(status, 200);
    assert_eq!(t["nodes"].as_array().unwrap().len() as i64, size);
    let ids: HashSet<&str> = t["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["share_id"].as_str().unwrap())
        .collect();
    assert!(ids.contains(root));
    let (status, _) = get(&u, "/v1/cascades/no-such-share").await;
    assert_eq!(status, 404);
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn child_before_parent_is_rerooted_when_the_parent_arrives() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), 1_000_000).await;
    let u = url(&server);
    let t = chrono::Utc::now().timestamp_millis() - 3_600_000;
    let share = |id: &str, parent: Option<&str>, user: i64, dt: i64| {
        let mut props = json!({"share_id": id});
        if let Some(p) = parent {
            props["parent_share_id"] = json!(p);
        }
        json!({"event_id": format!("e-{id}"), "event_type": "share", "event_time": t + dt,
               "user_id": user, "session_id": format!("s{user}"), "video_id": 7, "creator_id": 9,
               "props": props})
        .to_string()
    };
    // The grandchild and child arrive first; their parent is missing.
    let first = [
        share("c2", Some("c1"), 3, 20),
        share("c1", Some("r"), 2, 10),
        share("loop", Some("loop"), 4, 5),
    ];
    post(&u, "/v1/events", first.join("\n"), "application/x-ndjson").await;
    materialize(&u).await;
    let got = sql(
        &u,
        "SELECT root_share_id, size, depth FROM share_cascade ORDER BY root_share_id",
    )
    .await;
    assert_eq!(
        got,
        vec![
            vec![json!("c1"), json!(2), json!(1)],
            vec![json!("loop"), json!(1), json!(0)]
        ]
    );
    post(
        &u,
        "/v1/events",
        share("r", None, 1, 0),
        "application/x-ndjson",
    )
    .await;
    materialize(&u).await;
    let got = sql(&u, "SELECT root_share_id, size, depth, max_breadth, structural_virality FROM share_cascade ORDER BY root_share_id").await;
    // r → c1 → c2: distances 1, 1, 2 → mean 4/3.
    assert_eq!(got[1][0], json!("r"));
    assert_eq!(
        (got[1][1].as_i64(), got[1][2].as_i64(), got[1][3].as_i64()),
        (Some(3), Some(2), Some(1))
    );
    assert!((got[1][4].as_f64().unwrap() - 4.0 / 3.0).abs() < 1e-12);
    let depths = sql(
        &u,
        "SELECT share_id, root_share_id, depth FROM fact_share ORDER BY share_id",
    )
    .await;
    assert_eq!(depths[0], vec![json!("c1"), json!("r"), json!(1)]);
    assert_eq!(depths[1], vec![json!("c2"), json!("r"), json!(2)]);
    server.shutdown().await.unwrap();
}
