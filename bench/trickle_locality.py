#!/usr/bin/env python3
"""What a 5,000-event trickle touches in the day stored before it (docs/data-model.md,
"Incremental rebuilds").

Usage: bench/trickle_locality.py FILE.ndjson [--trickle 5000] [--at 0.9] [--out JSON]

FILE is a `reelhouse generate --days 1` file (lines in arrival order). Two trickles are cut
from it:
  tail  the last TRICKLE lines (what `reelhouse bench scale` ingests as its trickle): after
        the day's last event time, so mostly late arrivals;
  live  the TRICKLE lines after the first AT share of the lines: the stream's next events at
        that point of the day, the day being the lines before them.
For each: the users, sessions and views the trickle has; the share of the stored day's events
that belong to its sessions and views (what a key-level rebuild re-reads), to its users (a
user-bucketed one), and to the time slots of its sessions (a time-clustered one); and the
share of user buckets (hash of user_id) it touches. Needs DuckDB's Python package.
"""
import argparse
import json
import os
import tempfile

import duckdb

COLS = (
    "{'event_id':'VARCHAR','event_type':'VARCHAR','event_time':'BIGINT',"
    "'user_id':'VARCHAR','session_id':'VARCHAR','view_id':'VARCHAR'}"
)


def measure(con, day, trickle):
    con.execute("DROP TABLE IF EXISTS d; DROP TABLE IF EXISTS t")
    for name, path in (("d", day), ("t", trickle)):
        con.execute(
            f"CREATE TABLE {name} AS SELECT * FROM read_ndjson('{path}', columns={COLS}, "
            "ignore_errors=true) WHERE event_id IS NOT NULL"
        )
    q = lambda s: con.execute(s).fetchall()[0]
    total, users = q("SELECT count(*), count(DISTINCT user_id) FROM d")
    t_users, t_sessions, t_views, now = q(
        "SELECT count(DISTINCT user_id), count(DISTINCT session_id), "
        "count(DISTINCT view_id), median(event_time) FROM t"
    )
    (groups,) = q(
        "SELECT count(*) FROM d WHERE session_id IN (SELECT session_id FROM t) "
        "OR view_id IN (SELECT view_id FROM t)"
    )
    (of_users,) = q("SELECT count(*) FROM d WHERE user_id IN (SELECT user_id FROM t)")
    open_sessions, old_sessions = q(
        f"""WITH g AS (SELECT session_id k, min(event_time) s FROM d GROUP BY 1)
        SELECT count(*), count(*) FILTER (WHERE s < {now} - 6 * 3600000)
        FROM g WHERE k IN (SELECT session_id FROM t)"""
    )
    (slots,) = q(
        """WITH g AS (SELECT session_id k, min(event_time) // 3600000 h FROM d GROUP BY 1)
        SELECT count(DISTINCT h) FROM g WHERE k IN (SELECT session_id FROM t)"""
    )
    (in_slots,) = q(
        """WITH g AS (SELECT session_id k, min(event_time) // 3600000 h FROM d GROUP BY 1),
        hs AS (SELECT DISTINCT h FROM g WHERE k IN (SELECT session_id FROM t))
        SELECT count(*) FROM d WHERE event_time // 3600000 IN (SELECT h FROM hs)"""
    )
    buckets = {}
    for b in (256, 1024, 4096):
        (n,) = q(f"SELECT count(DISTINCT hash(user_id) % {b}) FROM t")
        buckets[str(b)] = round(n / b, 4)
    return {
        "day_events": total,
        "day_users": users,
        "trickle_users": t_users,
        "trickle_sessions": t_sessions,
        "trickle_views": t_views,
        "sessions_already_open": open_sessions,
        "of_which_started_over_6h_before": old_sessions,
        "share_of_day_in_its_sessions_and_views": round(groups / total, 4),
        "share_of_day_in_its_users": round(of_users / total, 4),
        "hour_slots_of_its_sessions": slots,
        "share_of_day_in_those_hours": round(in_slots / total, 4),
        "share_of_user_buckets_touched": buckets,
    }


def main():
    p = argparse.ArgumentParser()
    p.add_argument("file")
    p.add_argument("--trickle", type=int, default=5000)
    p.add_argument("--at", type=float, default=0.9)
    p.add_argument("--out")
    a = p.parse_args()
    with open(a.file) as f:
        lines = f.readlines()
    n = len(lines)
    cut = int(n * a.at)
    con = duckdb.connect()
    con.execute("SET threads=2")
    out = {"file": os.path.basename(a.file), "lines": n, "trickle": a.trickle, "at": a.at}
    with tempfile.TemporaryDirectory() as tmp:
        shapes = {
            "tail": (lines[: n - a.trickle], lines[n - a.trickle :]),
            "live": (lines[:cut], lines[cut : cut + a.trickle]),
        }
        for name, (day, trickle) in shapes.items():
            dp, tp = os.path.join(tmp, "d.ndjson"), os.path.join(tmp, "t.ndjson")
            open(dp, "w").writelines(day)
            open(tp, "w").writelines(trickle)
            out[name] = measure(con, dp, tp)
    text = json.dumps(out, indent=2)
    print(text)
    if a.out:
        open(a.out, "w").write(text + "\n")


if __name__ == "__main__":
    main()
