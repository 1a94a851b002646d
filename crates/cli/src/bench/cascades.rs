//! `bench cascades`: share-cascade metrics for one 1M-node cascade and 100k small ones.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Result;
use clap::Args;
use serde_json::json;

use super::common::*;

#[derive(Args)]
pub(crate) struct CascadeBench {
    /// Nodes of the one big cascade.
    #[arg(long, default_value_t = 1_000_000)]
    big: usize,
    /// Number of small cascades (5–20 nodes each).
    #[arg(long, default_value_t = 100_000)]
    small: usize,
    #[arg(long, default_value_t = 7)]
    seed: u64,
    #[arg(long, default_value = "bench/results/cascades.json")]
    out: PathBuf,
}

pub(crate) fn cascades(b: CascadeBench) -> Result<()> {
    use rand::seq::SliceRandom;
    use rand::{Rng, SeedableRng};
    use reelhouse_warehouse::cascade::{cascades, resolve, Share};
    warn_if_debug();
    let mut rng = rand::rngs::StdRng::seed_from_u64(b.seed);
    let share = |id: usize, parent: Option<usize>, video: i64| Share {
        share_id: format!("sh-{id:08x}"),
        parent_share_id: parent.map(|p| format!("sh-{p:08x}")),
        user_id: id as i64,
        video_id: video,
        creator_id: 1,
        time_us: id as i64 * 1000,
        channel: None,
        event_date: 0,
    };
    let run = |name: &str, mut shares: Vec<Share>, seed: u64| -> Result<serde_json::Value> {
        shares.shuffle(&mut rand::rngs::StdRng::seed_from_u64(seed));
        let t = Instant::now();
        let forest = resolve(&shares);
        let trees = cascades(&shares, &forest, &[]);
        let s = t.elapsed().as_secs_f64();
        let deepest = trees.iter().map(|c| c.depth).max().unwrap_or(0);
        let v = trees
            .iter()
            .map(|c| c.structural_virality)
            .fold(0.0, f64::max);
        println!(
            "  {name:<28} {:>9} nodes, {:>7} cascades: {:>8.1} ms = {:>10.0} nodes/s (max depth {deepest}, max virality {v:.2})",
            shares.len(), trees.len(), s * 1000.0, shares.len() as f64 / s
        );
        Ok(
            json!({"nodes": shares.len(), "cascades": trees.len(), "seconds": s,
                  "nodes_per_s": shares.len() as f64 / s, "max_depth": deepest,
                  "max_structural_virality": v}),
        )
    };
    println!("share cascades: resolve parents + metrics incl. structural virality (one thread)");
    // One big tree: each node's parent is a random earlier node (expected depth ~ ln n), and a
    // preferential chain part so the tree is also deep.
    let big: Vec<Share> = (0..b.big)
        .map(|i| {
            let parent = (i > 0).then(|| {
                if rng.gen_bool(0.3) {
                    i - 1
                } else {
                    rng.gen_range(0..i)
                }
            });
            share(i, parent, 1)
        })
        .collect();
    let big = run("one big cascade", big, b.seed)?;
    let mut small = Vec::new();
    for c in 0..b.small {
        let n = rng.gen_range(5..=20);
        let base = small.len();
        for k in 0..n {
            let parent = (k > 0).then(|| base + rng.gen_range(0..k));
            small.push(share(base + k, parent, c as i64));
        }
    }
    let small = run("many small cascades", small, b.seed)?;
    write_result(
        &b.out,
        json!({"benchmark": "cascades", "big": big, "small": small}),
    )
}
