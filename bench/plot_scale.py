#!/usr/bin/env python3
"""Draws `reelhouse bench scale`'s result (bench/results/scale.json) as a PNG: seconds and
peak memory of each step against the events of the day, on log-log axes, so a step whose
cost follows what arrives stays flat and one that follows the day's size rises with it.

usage: python3 bench/plot_scale.py [bench/results/scale.json] [docs/img/scale.png]
"""
import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

src = sys.argv[1] if len(sys.argv) > 1 else "bench/results/scale.json"
out = sys.argv[2] if len(sys.argv) > 2 else "docs/img/scale.png"
r = json.load(open(src))["results"]
n = [x["events"] for x in r]


def get(x, *path):
    for p in path:
        x = x.get(p) if isinstance(x, dict) else None
    return x


fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
for label, path in [
    ("bulk ingest", ("ingest", "seconds")),
    ("full rebuild (user buckets)", ("materialize_full", "seconds")),
    ("full rebuild in memory", ("materialize_full_in_memory", "seconds")),
    ("DuckDB agg_creator_daily", ("duckdb_agg_creator_daily", "agg_s")),
    ("rebuild after 5,000-event trickle", ("materialize_trickle", "seconds")),
    ("rebuild after 1 % late trickle", ("materialize_late", "seconds")),
    ("ingest of the trickle (open + load)", ("ingest_trickle", "seconds")),
]:
    pts = [(m, get(x, *path)) for m, x in zip(n, r)]
    pts = [(m, y) for m, y in pts if y]
    if pts:
        a.plot([m for m, _ in pts], [y for _, y in pts], marker="o", label=label)
a.set(xscale="log", yscale="log", xlabel="events in the day", ylabel="seconds",
      title="time per step")
a.legend(fontsize=7)
a.grid(True, which="both", alpha=0.3)
for label, path in [
    ("bulk ingest", ("ingest", "peak_rss_bytes")),
    ("full rebuild (user buckets)", ("materialize_full", "peak_rss_bytes")),
    ("full rebuild in memory", ("materialize_full_in_memory", "peak_rss_bytes")),
    ("rebuild after trickle", ("materialize_trickle", "peak_rss_bytes")),
    ("ingest of the trickle", ("ingest_trickle", "peak_rss_bytes")),
]:
    ys = [get(x, *path) for x in r]
    if all(y is not None for y in ys):
        b.plot(n, [y / 1e9 for y in ys], marker="o", label=label)
b.set(xscale="log", yscale="log", xlabel="events in the day", ylabel="peak RSS, GB",
      title="peak memory per step")
b.legend(fontsize=7)
b.grid(True, which="both", alpha=0.3)
fig.suptitle("reelhouse bench scale (release build, 2 cores)")
fig.tight_layout()
fig.savefig(out, dpi=110)
print("wrote", out)
