//! Share cascades (docs/data-model.md `fact_share`, `share_cascade`): share trees from `share_id` /
//! `parent_share_id`, their roots and depths, and per-tree metrics including structural
//! virality (Goel et al. 2016) in O(n) per tree.
//!
//! ```text
//!  share events ─dedup by share_id─▶ parent links ─break self-parents, cross-video links,
//!                                                  cycles (deterministically)─▶ forest
//!  forest ─BFS from each root─▶ depth, root ─▶ fact_share rows
//!         └─per tree: size, depth, max breadth, subtree sizes ─▶ Wiener index ─▶ virality
//!  views with source = share and via_share_id in a tree ─▶ views, unique viewers
//! ```
//!
//! The result is a function of the set of shares only: a child that arrived before its parent
//! is a root until the parent is stored, then the next rebuild re-roots it under the parent.
//!
//! Structural virality is the mean shortest-path distance over all pairs of distinct nodes.
//! In a tree the sum of distances over all unordered pairs is Σ over edges of s·(n − s), where
//! s is the size of the subtree below the edge (each edge lies on exactly the paths between its
//! two sides), so ν = 2·Σ s(n − s) / (n(n − 1)), one pass over subtree sizes.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use reelhouse_lake::deltalake::arrow::array::{
    Array, ArrayRef, AsArray, Date32Array, Float64Array, Int64Array, RecordBatch, StringArray,
    StringViewArray, TimestampMicrosecondArray,
};
use reelhouse_lake::deltalake::arrow::compute::cast;
use reelhouse_lake::deltalake::arrow::datatypes::{DataType, Field, Int32Type, Schema, TimeUnit};
use reelhouse_lake::deltalake::arrow::error::ArrowError;
use reelhouse_lake::deltalake::datafusion::error::DataFusionError;

/// One share, as read from the events (first event per `share_id`).
#[derive(Debug, Clone, PartialEq)]
pub struct Share {
    pub share_id: String,
    pub parent_share_id: Option<String>,
    pub user_id: i64,
    pub video_id: i64,
    pub creator_id: i64,
    /// Event time, epoch µs.
    pub time_us: i64,
    pub channel: Option<String>,
    /// Days since epoch.
    pub event_date: i32,
}

/// The forest: for each share (same order as the input), its parent, root and depth.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Forest {
    pub parent: Vec<Option<usize>>,
    pub root: Vec<usize>,
    pub depth: Vec<u32>,
    /// Links dropped: self-parents, parents of another video, one link per cycle.
    pub broken_links: usize,
}

/// Metrics of one cascade (tree).
#[derive(Debug, Clone, PartialEq)]
pub struct Cascade {
    /// Index of the root share.
    pub root: usize,
    pub size: u64,
    /// Edges on the longest root-to-leaf path (a one-node cascade has depth 0).
    pub depth: u32,
    /// Most nodes at one depth.
    pub max_breadth: u64,
    pub structural_virality: f64,
    /// Earliest share time of the tree, epoch µs.
    pub started_us: i64,
    /// From the earliest share to the share that made the tree half its final size (⌈n/2⌉-th
    /// by time), in ms.
    pub time_to_half_ms: i64,
    /// Views with `source = share` through any share of the tree.
    pub views: u64,
    pub unique_viewers: u64,
}

/// Resolves parent links into a forest.
pub fn resolve(shares: &[Share]) -> Forest {
    let n = shares.len();
    let index: HashMap<&str, usize> = shares
        .iter()
        .enumerate()
        .map(|(i, s)| (s.share_id.as_str(), i))
        .collect();
    let mut broken = 0;
    let mut parent: Vec<Option<usize>> = shares
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let p = s
                .parent_share_id
                .as_deref()
                .and_then(|p| index.get(p).copied());
            match p {
                Some(j) if j == i || shares[j].video_id != s.video_id => {
                    broken += 1;
                    None
                }
                other => other,
            }
        })
        .collect();
    // Cycles: walk up from each unvisited node; meeting a node of the current walk closes a
    // cycle, which is broken at its smallest share_id (that node becomes a root).
    let mut state = vec![0u8; n]; // 0 new, 1 on the current walk, 2 done
    let mut walk = Vec::new();
    for start in 0..n {
        if state[start] != 0 {
            continue;
        }
        walk.clear();
        let mut cur = Some(start);
        while let Some(i) = cur {
            match state[i] {
                0 => {
                    state[i] = 1;
                    walk.push(i);
                    cur = parent[i];
                }
                1 => {
                    let from = walk.iter().position(|&w| w == i).unwrap_or(0);
                    if let Some(&cut) = walk[from..]
                        .iter()
                        .min_by(|a, b| shares[**a].share_id.cmp(&shares[**b].share_id))
                    {
                        parent[cut] = None;
                        broken += 1;
                    }
                    cur = None;
                }
                _ => cur = None,
            }
        }
        for &w in &walk {
            state[w] = 2;
        }
    }
    let mut children: Vec<Vec<usize>> = vec![Vec::new(); n];
    for (i, p) in parent.iter().enumerate() {
        if let Some(p) = p {
            children[*p].push(i);
        }
    }
    let mut root = vec![usize::MAX; n];
    let mut depth = vec![0u32; n];
    let mut queue = std::collections::VecDeque::new();
    for r in (0..n).filter(|i| parent[*i].is_none()) {
        root[r] = r;
        queue.push_back(r);
        while let Some(i) = queue.pop_front() {
            for &c in &children[i] {
                root[c] = r;
                depth[c] = depth[i] + 1;
                queue.push_back(c);
            }
        }
    }
    Forest {
        parent,
        root,
        depth,
        broken_links: broken,
    }
}

/// Metrics of every tree of `forest`; `views` are `(via_share_id, user_id)` of share views.
pub fn cascades(shares: &[Share], forest: &Forest, views: &[(String, i64)]) -> Vec<Cascade> {
    let n = shares.len();
    let mut members: HashMap<usize, Vec<usize>> = HashMap::new();
    for i in 0..n {
        members.entry(forest.root[i]).or_default().push(i);
    }
    let index: HashMap<&str, usize> = shares
        .iter()
        .enumerate()
        .map(|(i, s)| (s.share_id.as_str(), i))
        .collect();
    let mut view_counts: HashMap<usize, (u64, HashSet<i64>)> = HashMap::new();
    for (via, user) in views {
        if let Some(&i) = index.get(via.as_str()) {
            let e = view_counts.entry(forest.root[i]).or_default();
            e.0 += 1;
            e.1.insert(*user);
        }
    }
    let mut out: Vec<Cascade> = members
        .into_iter()
        .map(|(root, mut nodes)| {
            // Deepest first, so each node's subtree size is final before its parent reads it.
            nodes.sort_by_key(|i| std::cmp::Reverse(forest.depth[*i]));
            let size = nodes.len() as u64;
            let mut sub: HashMap<usize, u64> = nodes.iter().map(|i| (*i, 1)).collect();
            let mut wiener: f64 = 0.0;
            let mut per_depth: HashMap<u32, u64> = HashMap::new();
            for &i in &nodes {
                *per_depth.entry(forest.depth[i]).or_default() += 1;
                let s = sub[&i];
                if let Some(p) = forest.parent[i] {
                    wiener += (s * (size - s)) as f64;
                    *sub.entry(p).or_default() += s;
                }
            }
            let virality = if size > 1 {
                2.0 * wiener / (size as f64 * (size as f64 - 1.0))
            } else {
                0.0
            };
            let mut times: Vec<i64> = nodes.iter().map(|i| shares[*i].time_us).collect();
            times.sort_unstable();
            let half = times[(size as usize).div_ceil(2) - 1];
            let (views, viewers) = view_counts
                .remove(&root)
                .map_or((0, 0), |(v, u)| (v, u.len() as u64));
            Cascade {
                root,
                size,
                depth: nodes.iter().map(|i| forest.depth[*i]).max().unwrap_or(0),
                max_breadth: per_depth.values().copied().max().unwrap_or(1),
                structural_virality: virality,
                started_us: times[0],
                time_to_half_ms: (half - times[0]) / 1000,
                views,
                unique_viewers: viewers,
            }
        })
        .collect();
    out.sort_by(|a, b| shares[a.root].share_id.cmp(&shares[b.root].share_id));
    out
}

/// The shares of the events `ev` (any string and integer encodings): the first event of
/// each `share_id` by (`event_time`, `event_id`), nulls last, ordered by `share_id`. One sort
/// of the share events; the SQL it replaced (a `row_number()` window over them, kept as the
/// reference in the tests) took 0.2 s of CPU in a rebuild of 2M events (`perf`), most of it
/// filtering and repartitioning every event.
pub(crate) fn shares_of(ev: &[RecordBatch]) -> Result<Vec<Share>, ArrowError> {
    use crate::batch::column;
    use crate::batch::{int64s, string_views};
    struct Cols {
        kind: StringViewArray,
        id: StringViewArray,
        parent: StringViewArray,
        channel: StringViewArray,
        event_id: StringViewArray,
        user: Int64Array,
        video: Int64Array,
        creator: Int64Array,
        time: Int64Array,
        date: ArrayRef,
    }
    let cols = ev
        .iter()
        .map(|b| {
            let s = |n: &str| string_views(column(b, n)?);
            let n = |c: &str| int64s(column(b, c)?);
            Ok(Cols {
                kind: s("event_type")?,
                id: s("share_id")?,
                parent: s("parent_share_id")?,
                channel: s("channel")?,
                event_id: s("event_id")?,
                user: n("user_id")?,
                video: n("video_id")?,
                creator: n("creator_id")?,
                time: n("event_time")?,
                date: cast(column(b, "event_date")?, &DataType::Int32)?,
            })
        })
        .collect::<Result<Vec<_>, ArrowError>>()?;
    fn text(a: &StringViewArray, i: usize) -> Option<&str> {
        a.is_valid(i).then(|| a.value(i))
    }
    // (share_id, (time missing, time), (event_id missing, event_id), batch, row)
    type Found<'a> = (
        &'a str,
        (bool, Option<i64>),
        (bool, Option<&'a str>),
        usize,
        usize,
    );
    let mut found: Vec<Found> = Vec::new();
    for (b, c) in cols.iter().enumerate() {
        for i in 0..c.kind.len() {
            if text(&c.kind, i) != Some("share") {
                continue;
            }
            let Some(id) = text(&c.id, i) else {
                continue;
            };
            let time = c.time.is_valid(i).then(|| c.time.value(i));
            let event = text(&c.event_id, i);
            found.push((id, (time.is_none(), time), (event.is_none(), event), b, i));
        }
    }
    found.sort_unstable();
    found.dedup_by(|later, first| later.0 == first.0);
    Ok(found
        .into_iter()
        .map(|(id, _, _, b, i)| {
            let c = &cols[b];
            Share {
                share_id: id.to_string(),
                parent_share_id: text(&c.parent, i).map(str::to_string),
                user_id: c.user.value(i),
                video_id: c.video.value(i),
                creator_id: c.creator.value(i),
                time_us: c.time.value(i),
                channel: text(&c.channel, i).map(str::to_string),
                event_date: c.date.as_primitive::<Int32Type>().value(i),
            }
        })
        .collect())
}

/// Arrow glue: the shares of `ev` (see [`shares_of`]) and the share views of the
/// `fact_video_view` registered in `ctx`; returns the `fact_share` and `share_cascade`
/// batches and the number of links broken.
pub(crate) async fn batches(
    ctx: &reelhouse_lake::deltalake::datafusion::prelude::SessionContext,
    ev: &[RecordBatch],
) -> Result<(RecordBatch, RecordBatch, usize), DataFusionError> {
    let shares = shares_of(ev)?;
    let view_rows = ctx
        .sql(
            "SELECT source, via_share_id, user_id FROM fact_video_view \
             WHERE source = 'share' AND via_share_id IS NOT NULL",
        )
        .await?
        .collect()
        .await?;
    let views = share_views(&view_rows)?;
    batches_of(shares, &views)
}

/// The `(via_share_id, user_id)` of the share views among `views` (batches of
/// `fact_video_view`, or of its columns `source`, `via_share_id` and `user_id`).
pub(crate) fn share_views(views: &[RecordBatch]) -> Result<Vec<(String, i64)>, ArrowError> {
    use crate::batch::{column, int64s, string_views};
    let mut out = Vec::new();
    for b in views {
        let (source, via) = (
            string_views(column(b, "source")?)?,
            string_views(column(b, "via_share_id")?)?,
        );
        let user = int64s(column(b, "user_id")?)?;
        for i in 0..b.num_rows() {
            if source.is_valid(i) && source.value(i) == "share" && via.is_valid(i) {
                out.push((via.value(i).to_string(), user.value(i)));
            }
        }
    }
    Ok(out)
}

/// The `fact_share` and `share_cascade` batches and the number of links broken, from the
/// shares ([`shares_of`]) and the share views ([`share_views`]).
pub(crate) fn batches_of(
    shares: Vec<Share>,
    views: &[(String, i64)],
) -> Result<(RecordBatch, RecordBatch, usize), DataFusionError> {
    let forest = resolve(&shares);
    let trees = cascades(&shares, &forest, views);

    let ts = || DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()));
    let fact_schema = Arc::new(Schema::new(vec![
        Field::new("share_id", DataType::Utf8, false),
        Field::new("user_id", DataType::Int64, false),
        Field::new("video_id", DataType::Int64, false),
        Field::new("creator_id", DataType::Int64, false),
        Field::new("parent_share_id", DataType::Utf8, true),
        Field::new("root_share_id", DataType::Utf8, false),
        Field::new("depth", DataType::Int64, false),
        Field::new("event_time", ts(), false),
        Field::new("channel", DataType::Utf8, true),
        Field::new("event_date", DataType::Date32, false),
    ]));
    let col = |v: Vec<ArrayRef>| RecordBatch::try_new(Arc::clone(&fact_schema), v);
    let fact = col(vec![
        Arc::new(StringArray::from_iter_values(
            shares.iter().map(|s| &s.share_id),
        )),
        Arc::new(Int64Array::from_iter_values(
            shares.iter().map(|s| s.user_id),
        )),
        Arc::new(Int64Array::from_iter_values(
            shares.iter().map(|s| s.video_id),
        )),
        Arc::new(Int64Array::from_iter_values(
            shares.iter().map(|s| s.creator_id),
        )),
        Arc::new(StringArray::from_iter(
            shares.iter().map(|s| s.parent_share_id.as_deref()),
        )),
        Arc::new(StringArray::from_iter_values(
            forest.root.iter().map(|r| &shares[*r].share_id),
        )),
        Arc::new(Int64Array::from_iter_values(
            forest.depth.iter().map(|d| *d as i64),
        )),
        Arc::new(
            TimestampMicrosecondArray::from_iter_values(shares.iter().map(|s| s.time_us))
                .with_timezone("UTC"),
        ),
        Arc::new(StringArray::from_iter(
            shares.iter().map(|s| s.channel.as_deref()),
        )),
        Arc::new(Date32Array::from_iter_values(
            shares.iter().map(|s| s.event_date),
        )),
    ])?;

    let cascade_schema = Arc::new(Schema::new(vec![
        Field::new("root_share_id", DataType::Utf8, false),
        Field::new("video_id", DataType::Int64, false),
        Field::new("creator_id", DataType::Int64, false),
        Field::new("size", DataType::Int64, false),
        Field::new("depth", DataType::Int64, false),
        Field::new("max_breadth", DataType::Int64, false),
        Field::new("views", DataType::Int64, false),
        Field::new("unique_viewers", DataType::Int64, false),
        Field::new("structural_virality", DataType::Float64, false),
        Field::new("started_at", ts(), false),
        Field::new("time_to_half_ms", DataType::Int64, false),
        Field::new("event_date", DataType::Date32, false),
    ]));
    let root = |c: &Cascade| &shares[c.root];
    let cascade = RecordBatch::try_new(
        cascade_schema,
        vec![
            Arc::new(StringArray::from_iter_values(
                trees.iter().map(|c| &root(c).share_id),
            )),
            Arc::new(Int64Array::from_iter_values(
                trees.iter().map(|c| root(c).video_id),
            )),
            Arc::new(Int64Array::from_iter_values(
                trees.iter().map(|c| root(c).creator_id),
            )),
            Arc::new(Int64Array::from_iter_values(
                trees.iter().map(|c| c.size as i64),
            )),
            Arc::new(Int64Array::from_iter_values(
                trees.iter().map(|c| c.depth as i64),
            )),
            Arc::new(Int64Array::from_iter_values(
                trees.iter().map(|c| c.max_breadth as i64),
            )),
            Arc::new(Int64Array::from_iter_values(
                trees.iter().map(|c| c.views as i64),
            )),
            Arc::new(Int64Array::from_iter_values(
                trees.iter().map(|c| c.unique_viewers as i64),
            )),
            Arc::new(Float64Array::from_iter_values(
                trees.iter().map(|c| c.structural_virality),
            )),
            Arc::new(
                TimestampMicrosecondArray::from_iter_values(trees.iter().map(|c| c.started_us))
                    .with_timezone("UTC"),
            ),
            Arc::new(Int64Array::from_iter_values(
                trees.iter().map(|c| c.time_to_half_ms),
            )),
            Arc::new(Date32Array::from_iter_values(
                trees.iter().map(|c| root(c).event_date),
            )),
        ],
    )?;
    Ok((fact, cascade, forest.broken_links))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use reelhouse_lake::deltalake::arrow::datatypes::Int64Type;

    fn share(id: usize, parent: Option<usize>, t: i64) -> Share {
        Share {
            share_id: format!("s{id:05}"),
            parent_share_id: parent.map(|p| format!("s{p:05}")),
            user_id: id as i64,
            video_id: 1,
            creator_id: 2,
            time_us: t,
            channel: None,
            event_date: 0,
        }
    }

    /// All-pairs BFS distances, O(n²): the independent reference.
    fn brute(shares: &[Share], f: &Forest, root: usize) -> (u64, u32, u64, f64) {
        let nodes: Vec<usize> = (0..shares.len()).filter(|i| f.root[*i] == root).collect();
        let mut adj: HashMap<usize, Vec<usize>> = HashMap::new();
        for &i in &nodes {
            if let Some(p) = f.parent[i] {
                adj.entry(i).or_default().push(p);
                adj.entry(p).or_default().push(i);
            }
        }
        let mut total = 0u64;
        let mut depth = 0;
        for &a in &nodes {
            let mut dist: HashMap<usize, u32> = HashMap::from([(a, 0)]);
            let mut q = std::collections::VecDeque::from([a]);
            while let Some(x) = q.pop_front() {
                for &y in adj.get(&x).into_iter().flatten() {
                    if !dist.contains_key(&y) {
                        dist.insert(y, dist[&x] + 1);
                        q.push_back(y);
                    }
                }
            }
            total += dist.values().map(|d| *d as u64).sum::<u64>();
            if a == root {
                depth = dist.values().copied().max().unwrap_or(0);
            }
        }
        let n = nodes.len() as f64;
        let mut levels: HashMap<u32, u64> = HashMap::new();
        for &i in &nodes {
            *levels.entry(f.depth[i]).or_default() += 1;
        }
        let v = if nodes.len() > 1 {
            total as f64 / (n * (n - 1.0))
        } else {
            0.0
        };
        (
            nodes.len() as u64,
            depth,
            *levels.values().max().unwrap(),
            v,
        )
    }

    fn check(shares: &[Share]) {
        let f = resolve(shares);
        for c in cascades(shares, &f, &[]) {
            let (size, depth, breadth, v) = brute(shares, &f, c.root);
            assert_eq!((c.size, c.depth, c.max_breadth), (size, depth, breadth));
            assert!(
                (c.structural_virality - v).abs() < 1e-9,
                "{} vs {v}",
                c.structural_virality
            );
        }
    }

    #[test]
    fn chain_star_and_known_values() {
        // A chain of 4: distances 1,1,1,2,2,3 → mean 10/6.
        let chain: Vec<Share> = (0..4)
            .map(|i| share(i, i.checked_sub(1), i as i64))
            .collect();
        let f = resolve(&chain);
        let c = cascades(&chain, &f, &[]);
        assert_eq!(c.len(), 1);
        assert!((c[0].structural_virality - 10.0 / 6.0).abs() < 1e-12);
        assert_eq!((c[0].depth, c[0].max_breadth), (3, 1));
        // A star of 5 (root + 4 leaves): 4 pairs at 1, 6 pairs at 2 → 16/10.
        let star: Vec<Share> = (0..5)
            .map(|i| share(i, (i > 0).then_some(0), i as i64))
            .collect();
        let c = cascades(&star, &resolve(&star), &[]);
        assert!((c[0].structural_virality - 1.6).abs() < 1e-12);
        assert_eq!((c[0].depth, c[0].max_breadth), (1, 4));
        // One node: virality 0.
        let one = vec![share(0, None, 0)];
        assert_eq!(
            cascades(&one, &resolve(&one), &[])[0].structural_virality,
            0.0
        );
    }

    #[test]
    fn child_before_parent_and_missing_parent() {
        // The parent is missing: the child is its own root; once it is there, one tree.
        let child = share(1, Some(0), 5);
        let f = resolve(std::slice::from_ref(&child));
        assert_eq!(f.root, vec![0]);
        let both = vec![child, share(0, None, 1)];
        let f = resolve(&both);
        assert_eq!(f.root, vec![1, 1]);
        assert_eq!(f.depth, vec![1, 0]);
    }

    #[test]
    fn cycles_and_self_parents_are_broken_deterministically() {
        let mut s = vec![
            share(0, Some(2), 0),
            share(1, Some(0), 1),
            share(2, Some(1), 2),
        ];
        s.push(share(3, Some(3), 3));
        let f = resolve(&s);
        // The cycle 0→2→1→0 is cut at its smallest id (s00000), the self-parent dropped.
        assert_eq!(f.parent[0], None);
        assert_eq!(f.root, vec![0, 0, 0, 3]);
        assert_eq!(f.broken_links, 2);
        let mut reversed = s.clone();
        reversed.reverse();
        let g = resolve(&reversed);
        assert_eq!(g.parent[3], None, "same cut whatever the order");
        check(&s);
    }

    #[test]
    fn views_are_attributed_to_the_tree() {
        let s = vec![share(0, None, 0), share(1, Some(0), 1), share(2, None, 2)];
        let f = resolve(&s);
        let views = vec![
            ("s00001".to_string(), 7),
            ("s00000".to_string(), 7),
            ("s00000".to_string(), 8),
            ("nope".to_string(), 9),
        ];
        let c = cascades(&s, &f, &views);
        assert_eq!((c[0].views, c[0].unique_viewers), (3, 2));
        assert_eq!((c[1].views, c[1].unique_viewers), (0, 0));
        assert_eq!(c[0].time_to_half_ms, 0);
    }

    proptest! {
        /// Random forests (each node's parent is any earlier node or none), in a random
        /// arrival order: metrics equal the all-pairs computation.
        #[test]
        fn random_trees_match_all_pairs(
            parents in proptest::collection::vec(proptest::option::weighted(0.85, any::<prop::sample::Index>()), 1..120),
            order in any::<prop::sample::Index>(),
        ) {
            let mut shares: Vec<Share> = parents
                .iter()
                .enumerate()
                .map(|(i, p)| share(i, p.filter(|_| i > 0).map(|ix| ix.index(i)), i as i64))
                .collect();
            let k = order.index(shares.len());
            shares.rotate_left(k);
            check(&shares);
        }
    }

    /// The SQL [`shares_of`] replaced: its reference.
    const SHARES_SQL: &str = "SELECT share_id, parent_share_id, user_id, video_id, creator_id, \
        event_time, channel, CAST(event_date AS INT) FROM (SELECT *, row_number() OVER \
        (PARTITION BY share_id ORDER BY event_time, event_id) AS r FROM ev \
        WHERE event_type = 'share' AND share_id IS NOT NULL) WHERE r = 1 ORDER BY share_id";

    /// One generated event: (kind, share, parent, user, minute, event id, channel). Few
    /// shares and minutes, so a share repeats with equal times and the ids decide.
    type Gen = (u8, Option<u8>, Option<u8>, u8, u8, u8, Option<u8>);

    fn events(gen: &[Gen]) -> RecordBatch {
        use crate::batch::testing::batch_of;
        let s = |v: Vec<Option<String>>| Arc::new(StringArray::from(v)) as ArrayRef;
        let i = |v: Vec<i64>| Arc::new(Int64Array::from(v)) as ArrayRef;
        let kinds = ["share", "comment", "like"];
        let minute = |g: &Gen| i64::from(g.4 % 5) * 60_000_000 + 86_000_000_000;
        let time = cast(
            &Int64Array::from(gen.iter().map(minute).collect::<Vec<_>>()),
            &DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
        )
        .unwrap();
        let date = Date32Array::from(
            gen.iter()
                .map(|g| minute(g).div_euclid(86_400_000_000) as i32)
                .collect::<Vec<_>>(),
        );
        batch_of(vec![
            (
                "event_id",
                // Unique (a tie on time and id would leave SQL's pick open), in an order
                // unrelated to the rows'.
                s(gen
                    .iter()
                    .enumerate()
                    .map(|(n, g)| Some(format!("e{}-{n}", g.5 % 7)))
                    .collect()),
            ),
            (
                "event_type",
                s(gen
                    .iter()
                    .map(|g| Some(kinds[g.0 as usize % 3].to_string()))
                    .collect()),
            ),
            ("event_time", time),
            ("user_id", i(gen.iter().map(|g| i64::from(g.3)).collect())),
            (
                "video_id",
                i(gen.iter().map(|g| i64::from(g.3 % 3)).collect()),
            ),
            (
                "creator_id",
                i(gen.iter().map(|g| i64::from(g.3 % 2)).collect()),
            ),
            (
                "share_id",
                s(gen
                    .iter()
                    .map(|g| g.1.map(|x| format!("sh{}", x % 4)))
                    .collect()),
            ),
            (
                "parent_share_id",
                s(gen
                    .iter()
                    .map(|g| g.2.map(|x| format!("sh{}", x % 4)))
                    .collect()),
            ),
            (
                "channel",
                s(gen
                    .iter()
                    .map(|g| g.6.map(|x| format!("c{}", x % 2)))
                    .collect()),
            ),
            ("event_date", Arc::new(date)),
        ])
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn shares_equal_the_sql(gen in proptest::collection::vec(any::<Gen>(), 1..60), split in 0usize..60) {
            let rt = tokio::runtime::Runtime::new().unwrap();
            rt.block_on(async {
                let (ev, ctx) = crate::batch::testing::ev_session(&events(&gen), split);
                let rows = ctx.sql(SHARES_SQL).await.unwrap().collect().await.unwrap();
                let mut want = Vec::new();
                for b in &rows {
                    let t = |c: usize| b.column(c).as_string::<i32>().clone();
                    let n = |c: usize| cast(b.column(c), &DataType::Int64).unwrap().as_primitive::<Int64Type>().clone();
                    let (id, parent, channel) = (t(0), t(1), t(6));
                    let (user, video, creator, time) = (n(2), n(3), n(4), n(5));
                    let date = b.column(7).as_primitive::<Int32Type>().clone();
                    for r in 0..b.num_rows() {
                        let o = |a: &StringArray| a.is_valid(r).then(|| a.value(r).to_string());
                        want.push(Share {
                            share_id: id.value(r).to_string(),
                            parent_share_id: o(&parent),
                            user_id: user.value(r),
                            video_id: video.value(r),
                            creator_id: creator.value(r),
                            time_us: time.value(r),
                            channel: o(&channel),
                            event_date: date.value(r),
                        });
                    }
                }
                prop_assert_eq!(shares_of(&ev).unwrap(), want);
                Ok(())
            })?;
        }
    }
}
