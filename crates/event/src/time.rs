//! Server-side time rules (docs/ingest.md): clock-skew correction, the future clamp, `event_date` and
//! `lateness_ms`. Logic never reads the wall clock itself; a [`Clock`] is passed in so tests
//! can fix "now".

use crate::Event;

/// Events further in the future than this after skew correction are clamped to `received_at`.
pub const MAX_FUTURE_MS: i64 = 5 * 60 * 1000;

const MS_PER_DAY: i64 = 86_400_000;

/// Source of "now" in epoch milliseconds.
pub trait Clock: Send + Sync {
    fn now_ms(&self) -> i64;
}

/// The real wall clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> i64 {
        chrono::Utc::now().timestamp_millis()
    }
}

/// A clock stuck at one instant (tests, restatement).
#[derive(Debug, Clone, Copy)]
pub struct FixedClock(pub i64);

impl Clock for FixedClock {
    fn now_ms(&self) -> i64 {
        self.0
    }
}

/// An accepted event with the server-side fields of docs/ingest.md.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredEvent {
    pub event: Event,
    /// Corrected event time (epoch ms): the time every model uses.
    pub event_time_ms: i64,
    pub received_at_ms: i64,
    /// UTC date of the corrected event time, as days since 1970-01-01.
    pub event_date: i32,
    /// `received_at − corrected event time`; negative for (at most 5 min of) future events.
    pub lateness_ms: i64,
    /// True when the stored event time differs from the device's `event_time`.
    pub time_corrected: bool,
}

/// Applies the docs/ingest.md time rules to one event received at `received_at_ms`.
///
/// With `sent_at`, the device clock offset is `sent_at − received_at` and is subtracted from
/// `event_time`. Anything still more than [`MAX_FUTURE_MS`] ahead of `received_at` is clamped.
pub fn stamp(event: Event, received_at_ms: i64) -> StoredEvent {
    let device_time = event.event_time_ms;
    let mut corrected = match event.sent_at_ms {
        Some(sent_at) => device_time.saturating_sub(sent_at.saturating_sub(received_at_ms)),
        None => device_time,
    };
    if corrected > received_at_ms.saturating_add(MAX_FUTURE_MS) {
        corrected = received_at_ms;
    }
    StoredEvent {
        event_time_ms: corrected,
        received_at_ms,
        event_date: day_of(corrected),
        lateness_ms: received_at_ms.saturating_sub(corrected),
        time_corrected: corrected != device_time,
        event,
    }
}

/// Days since 1970-01-01 (UTC) of an epoch-millisecond instant.
pub fn day_of(ms: i64) -> i32 {
    ms.div_euclid(MS_PER_DAY) as i32
}

/// A UTC date as days since 1970-01-01: how Arrow's `Date32` and the tables' `event_date`
/// hold it. The one place that converts between that number and a calendar date.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Day(pub i32);

impl Day {
    /// The day of an epoch-millisecond instant.
    pub fn of_ms(ms: i64) -> Day {
        Day(day_of(ms))
    }

    /// The day of a calendar date.
    pub fn from_date(d: chrono::NaiveDate) -> Day {
        Day((d - chrono::NaiveDate::default()).num_days() as i32)
    }

    /// The calendar date (saturating at chrono's range for absurd numbers).
    pub fn date(self) -> chrono::NaiveDate {
        chrono::NaiveDate::default()
            .checked_add_signed(chrono::Duration::days(self.0.into()))
            .unwrap_or(if self.0 < 0 {
                chrono::NaiveDate::MIN
            } else {
                chrono::NaiveDate::MAX
            })
    }
}

/// `YYYY-MM-DD`, as in a date partition's directory name.
impl std::fmt::Display for Day {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.date().format("%Y-%m-%d").fmt(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::parse::parse_event;

    #[test]
    fn days_convert_both_ways() {
        let d = chrono::NaiveDate::from_ymd_opt(2026, 12, 7).unwrap();
        let day = Day::from_date(d);
        assert_eq!(day.date(), d);
        assert_eq!(day.to_string(), "2026-12-07");
        assert_eq!(Day(0).to_string(), "1970-01-01");
        assert_eq!(Day(-1).to_string(), "1969-12-31");
        assert_eq!(Day::of_ms(-1), Day(-1));
        assert_eq!(Day::of_ms(86_400_000 * 3 + 5), Day(3));
        // Arrow's Date32 epoch, as pg.rs once computed it from the CE day number.
        assert_eq!(
            Day(20_000).date(),
            chrono::NaiveDate::from_num_days_from_ce_opt(20_000 + 719_163).unwrap()
        );
    }

    fn ev(extra: &str) -> Event {
        let line = format!(
            r#"{{"event_id":"e1","event_type":"follow_creator","user_id":1,"creator_id":2,{extra}}}"#
        );
        parse_event(line.as_bytes()).unwrap()
    }

    #[test]
    fn skew_correction_uses_sent_at_offset() {
        // Device clock is 10 minutes fast: event_time and sent_at both carry the offset.
        let received = 1_700_000_000_000;
        let offset = 600_000;
        let e = ev(&format!(
            r#""event_time":{},"sent_at":{}"#,
            received - 60_000 + offset,
            received + offset
        ));
        let s = stamp(e, received);
        assert_eq!(s.event_time_ms, received - 60_000);
        assert_eq!(s.lateness_ms, 60_000);
        assert!(s.time_corrected);
    }

    #[test]
    fn future_events_are_clamped() {
        let received = 1_700_000_000_000;
        let e = ev(&format!(r#""event_time":{}"#, received + MAX_FUTURE_MS + 1));
        let s = stamp(e, received);
        assert_eq!(s.event_time_ms, received);
        assert!(s.time_corrected);
        let e = ev(&format!(r#""event_time":{}"#, received + MAX_FUTURE_MS));
        let s = stamp(e, received);
        assert_eq!(s.event_time_ms, received + MAX_FUTURE_MS);
        assert!(!s.time_corrected);
        assert_eq!(s.lateness_ms, -MAX_FUTURE_MS);
    }

    #[test]
    fn event_date_is_utc_day() {
        assert_eq!(day_of(0), 0);
        assert_eq!(day_of(MS_PER_DAY - 1), 0);
        assert_eq!(day_of(MS_PER_DAY), 1);
        assert_eq!(day_of(-1), -1);
    }
}
