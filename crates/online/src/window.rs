//! Time-bucketed sliding windows: one bucket per minute of event time that holds anything,
//! sorted, kept for the longest window (24 h) and dropped as it passes.
//!
//! Buckets are keyed by event time, not arrival, so a late event lands in its own minute (or
//! in none, when it is older than the longest window). A window of `w` minutes at minute `now`
//! sums buckets with `minute > now − w`; quiet videos hold a handful of buckets, not 1,440.

use serde::{Deserialize, Serialize};

/// Minutes in the longest window (24 h).
pub const DAY_MINUTES: u32 = 24 * 60;

/// Minute of an epoch-ms time (saturating at 0 before 1970).
pub fn minute_of(ms: i64) -> u32 {
    (ms.max(0) / 60_000).min(u32::MAX as i64) as u32
}

/// What a view adds to the bucket of its attribution minute.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Counts {
    pub views: u32,
    pub ended: u32,
    pub completions: u32,
    pub pct_sum: f64,
}

impl Counts {
    fn add(&mut self, o: &Counts, sign: i64) {
        let f = |a: u32, b: u32| (a as i64 + sign * b as i64).max(0) as u32;
        self.views = f(self.views, o.views);
        self.ended = f(self.ended, o.ended);
        self.completions = f(self.completions, o.completions);
        self.pct_sum += sign as f64 * o.pct_sum;
        if self.ended == 0 {
            // Removes the drift that float subtraction leaves behind.
            self.pct_sum = 0.0;
        }
    }
}

/// Sorted minute buckets covering at most the last 24 h (by the `now` of each write).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Buckets(Vec<(u32, Counts)>);

impl Buckets {
    /// Adds (`sign` = 1) or removes (−1) `c` at `minute`; ignored when the minute is older
    /// than 24 h before `now_minute` (windows never see it).
    pub fn apply(&mut self, minute: u32, c: &Counts, sign: i64, now_minute: u32) {
        let oldest = now_minute.saturating_sub(DAY_MINUTES - 1);
        if minute < oldest {
            return;
        }
        if self.0.first().is_some_and(|(m, _)| *m < oldest) {
            self.0.retain(|(m, _)| *m >= oldest);
        }
        match self.0.binary_search_by_key(&minute, |(m, _)| *m) {
            Ok(i) => self.0[i].1.add(c, sign),
            Err(i) if sign > 0 => {
                let mut b = Counts::default();
                b.add(c, 1);
                self.0.insert(i, (minute, b));
            }
            Err(_) => {}
        }
    }

    /// Sums the buckets of the last `minutes` minutes up to `now_minute`.
    pub fn sum(&self, now_minute: u32, minutes: u32) -> Counts {
        let from = now_minute.saturating_sub(minutes - 1);
        let mut total = Counts::default();
        for (m, c) in &self.0 {
            if *m >= from && *m <= now_minute {
                total.add(c, 1);
            }
        }
        total
    }

    pub fn heap_bytes(&self) -> usize {
        self.0.capacity() * std::mem::size_of::<(u32, Counts)>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one() -> Counts {
        Counts {
            views: 1,
            ..Counts::default()
        }
    }

    #[test]
    fn windows_by_event_minute() {
        let now = 100_000;
        let mut b = Buckets::default();
        b.apply(now, &one(), 1, now);
        b.apply(now - 59, &one(), 1, now);
        b.apply(now - 60, &one(), 1, now);
        b.apply(now - DAY_MINUTES + 1, &one(), 1, now);
        b.apply(now - DAY_MINUTES, &one(), 1, now); // too old: ignored
        assert_eq!(b.sum(now, 60).views, 2);
        assert_eq!(b.sum(now, DAY_MINUTES).views, 4);
        b.apply(now - 59, &one(), -1, now);
        assert_eq!(b.sum(now, 60).views, 1);
        // Removing from a bucket that was never there changes nothing.
        b.apply(now - 5, &one(), -1, now);
        assert_eq!(b.sum(now, DAY_MINUTES).views, 3);
    }
}
