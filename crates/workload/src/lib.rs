//! Seeded generator of realistic short-video traffic (used by `generate`, the demo, tests and
//! benchmarks).
//!
//! ```text
//!  sessions (Zipf users) ─▶ views (Zipf videos, sources, watch times vs durations)
//!        ├─▶ likes / repeated likes / unlikes (some without a like), comments
//!        ├─▶ shares: views arriving through a share may re-share it (multi-level chains)
//!        └─▶ follows / unfollows
//!  events ─▶ arrival order: jitter, late (1 h – 3 d), out-of-order pairs
//!         ─▶ + exact duplicates (retries) + malformed lines ─▶ NDJSON lines + Manifest
//! ```
//!
//! Everything is a pure function of [`WorkloadConfig`] (seed and end time included), so a
//! test can regenerate the same traffic. The [`Manifest`] says what was produced: the demo and
//! tests check the server's accepted/duplicate/rejected counts against it.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, Zipf};

/// What to generate.
#[derive(Debug, Clone)]
pub struct WorkloadConfig {
    /// Total lines, duplicates and malformed ones included.
    pub events: usize,
    pub seed: u64,
    /// Days of event time covered, ending at `end_ms`.
    pub days: u32,
    /// Latest event time (epoch ms); nothing is generated after it.
    pub end_ms: i64,
    pub late_fraction: f64,
    pub duplicate_fraction: f64,
    pub out_of_order_fraction: f64,
    pub malformed_fraction: f64,
}

impl WorkloadConfig {
    pub fn new(events: usize, seed: u64, end_ms: i64) -> Self {
        WorkloadConfig {
            events,
            seed,
            days: 3,
            end_ms,
            late_fraction: 0.02,
            duplicate_fraction: 0.01,
            out_of_order_fraction: 0.02,
            malformed_fraction: 0.005,
        }
    }

    /// Users, videos and creators for this size: a long tail of each.
    pub fn population(&self) -> (usize, usize, usize) {
        let n = self.events.max(1);
        ((n / 40).max(200), (n / 500).max(100), (n / 5000).max(20))
    }
}

/// What a workload contains, by construction.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Manifest {
    pub seed: u64,
    pub lines: usize,
    /// Distinct valid events: what the server must accept.
    pub valid_unique: usize,
    /// Exact re-sends of valid events (same `event_id`): what it must count as duplicates.
    pub duplicates: usize,
    /// Lines that break the contract: what it must reject.
    pub malformed: usize,
    /// Valid events that arrive 1 h – 3 d after they happened.
    pub late: usize,
    /// Pairs whose second event arrives first (view end before start, unlike before like).
    pub out_of_order: usize,
    pub by_type: BTreeMap<String, usize>,
    pub first_event_ms: i64,
    pub last_event_ms: i64,
    pub users: usize,
    pub videos: usize,
    pub creators: usize,
}

/// A generated workload: NDJSON lines in arrival order, and what they contain.
#[derive(Debug, Clone)]
pub struct Workload {
    pub lines: Vec<String>,
    pub manifest: Manifest,
}

impl Workload {
    /// The lines cut into NDJSON bodies of at most `per_body` lines.
    pub fn bodies(&self, per_body: usize) -> Vec<Vec<u8>> {
        self.lines
            .chunks(per_body.max(1))
            .map(|c| {
                let mut b = Vec::with_capacity(c.iter().map(|l| l.len() + 1).sum());
                for l in c {
                    b.extend_from_slice(l.as_bytes());
                    b.push(b'\n');
                }
                b
            })
            .collect()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ty {
    ViewStart,
    ViewEnd,
    Like,
    Unlike,
    Comment,
    Share,
    SessionStart,
    SessionEnd,
    Follow,
    Unfollow,
}

impl Ty {
    fn name(self) -> &'static str {
        match self {
            Ty::ViewStart => "video_view_start",
            Ty::ViewEnd => "video_view_end",
            Ty::Like => "like",
            Ty::Unlike => "unlike",
            Ty::Comment => "comment",
            Ty::Share => "share",
            Ty::SessionStart => "session_start",
            Ty::SessionEnd => "session_end",
            Ty::Follow => "follow_creator",
            Ty::Unfollow => "unfollow_creator",
        }
    }
}

const SOURCES: [(&str, f64); 6] = [
    ("feed", 0.62),
    ("profile", 0.1),
    ("search", 0.08),
    ("hashtag", 0.08),
    ("audio", 0.06),
    ("other", 0.06),
];
const COUNTRIES: [&str; 8] = ["US", "BR", "IN", "ID", "DE", "GB", "MX", "JP"];
const OS: [&str; 3] = ["ios", "android", "web"];
const CHANNELS: [&str; 4] = ["whatsapp", "messenger", "copy_link", "sms"];

/// One generated event before it is written.
#[derive(Debug, Clone)]
struct G {
    ty: Ty,
    t: i64,
    arrival: i64,
    event_id: u128,
    user: u64,
    session: u64,
    video: u64,
    creator: u64,
    view: u64,
    source: &'static str,
    via_share: u64,
    watch_ms: i64,
    duration_ms: i64,
    comment: u64,
    share: u64,
    parent_share: u64,
    /// Encoding variety: bit 0 ids as strings, bit 1 RFC 3339 times, bit 2 has device.
    enc: u8,
}

struct Sim {
    rng: StdRng,
    users: Zipf<f64>,
    videos: Zipf<f64>,
    video_creator: Vec<u64>,
    video_duration: Vec<i64>,
    /// Recent shares (share id, video index) that later views can arrive through.
    share_pool: Vec<(u64, usize)>,
    next_id: u64,
    /// Share of complete views whose end arrives before their start.
    ooo: f64,
}

const USER_BASE: u64 = 1_000_000;
const VIDEO_BASE: u64 = 50_000_000;
const CREATOR_BASE: u64 = 7_000;

impl Sim {
    fn id(&mut self) -> u64 {
        self.next_id += 1;
        // Spread ids so they look like real opaque ids but stay unique.
        self.next_id.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 4
    }

    fn base(&mut self, ty: Ty, t: i64, user: u64, session: u64, enc: u8) -> G {
        G {
            ty,
            t,
            arrival: 0,
            event_id: self.rng.gen(),
            user,
            session,
            video: 0,
            creator: 0,
            view: 0,
            source: "",
            via_share: 0,
            watch_ms: 0,
            duration_ms: 0,
            comment: 0,
            share: 0,
            parent_share: 0,
            enc,
        }
    }

    /// One session of one user, times relative to 0. Returns (events, out-of-order pairs).
    fn session(&mut self, out: &mut Vec<G>) -> usize {
        let user = USER_BASE + self.users.sample(&mut self.rng) as u64;
        let enc = (user % 8) as u8 | if self.rng.gen_bool(0.3) { 1 } else { 0 };
        let session = self.id();
        let mut ooo = 0;
        let mut t = 0i64;
        if self.rng.gen_bool(0.95) {
            out.push(self.base(Ty::SessionStart, t, user, session, enc));
        }
        let views = 1 + (-(self.rng.gen::<f64>().max(1e-9)).ln() * 6.0) as usize;
        for _ in 0..views.min(60) {
            t += self.rng.gen_range(300..2500);
            let (vidx, source, via) = if !self.share_pool.is_empty() && self.rng.gen_bool(0.1) {
                let (s, v) = self.share_pool[self.rng.gen_range(0..self.share_pool.len())];
                (v, "share", s)
            } else {
                let v = self.videos.sample(&mut self.rng) as usize - 1;
                let mut x = self.rng.gen::<f64>();
                let mut src = "other";
                for (name, p) in SOURCES {
                    if x < p {
                        src = name;
                        break;
                    }
                    x -= p;
                }
                (v, src, 0)
            };
            let video = VIDEO_BASE + vidx as u64;
            let creator = self.video_creator[vidx];
            let duration = self.video_duration[vidx];
            let frac = match self.rng.gen_range(0..100) {
                0..=29 => self.rng.gen_range(0.02..0.2),
                30..=69 => self.rng.gen_range(0.2..0.95),
                70..=89 => self.rng.gen_range(0.98..1.0),
                _ => self.rng.gen_range(1.0..3.0),
            };
            let watch = (duration as f64 * frac) as i64;
            let view = self.id();
            let mk = |s: &mut Sim, ty: Ty, at: i64| {
                let mut g = s.base(ty, at, user, session, enc);
                g.video = video;
                g.creator = creator;
                g.view = view;
                g
            };
            let mut start = mk(self, Ty::ViewStart, t);
            start.source = source;
            start.via_share = via;
            let has_start = self.rng.gen_bool(0.97);
            let has_end = self.rng.gen_bool(0.95);
            let mut end = mk(self, Ty::ViewEnd, t + watch);
            end.watch_ms = watch;
            end.duration_ms = duration;
            if has_start && has_end && self.rng.gen_bool(self.ooo) {
                // The end reaches us first: mark its arrival before the start's time.
                end.arrival = -1;
                ooo += 1;
            }
            if has_start {
                out.push(start);
            }
            if has_end {
                out.push(end.clone());
                if self.rng.gen_bool(0.01) {
                    // A second end for the same view (app resumed): max watch_ms wins.
                    let mut again = mk(self, Ty::ViewEnd, t + watch + 500);
                    again.watch_ms = watch + self.rng.gen_range(0..duration);
                    again.duration_ms = duration;
                    out.push(again);
                }
            }
            let mid = t + watch / 2;
            if self.rng.gen_bool(0.08) {
                out.push(mk(self, Ty::Like, mid));
                if self.rng.gen_bool(0.03) {
                    out.push(mk(self, Ty::Like, mid + 300)); // repeated like
                }
                if self.rng.gen_bool(0.1) {
                    let mut unlike = mk(self, Ty::Unlike, mid + 2000);
                    if self.rng.gen_bool(0.3) {
                        unlike.arrival = -1; // unlike arrives before the like
                        ooo += 1;
                    }
                    out.push(unlike);
                }
            } else if self.rng.gen_bool(0.004) {
                out.push(mk(self, Ty::Unlike, mid)); // unlike with no like
            }
            if self.rng.gen_bool(0.02) {
                let mut c = mk(self, Ty::Comment, mid + 1000);
                c.comment = self.id();
                out.push(c);
            }
            if self.rng.gen_bool(if via != 0 { 0.12 } else { 0.03 }) {
                let mut s = mk(self, Ty::Share, mid + 1500);
                s.share = self.id();
                s.parent_share = via;
                if self.share_pool.len() >= 2000 {
                    let i = self.rng.gen_range(0..self.share_pool.len());
                    self.share_pool[i] = (s.share, vidx);
                } else {
                    self.share_pool.push((s.share, vidx));
                }
                out.push(s);
            }
            if self.rng.gen_bool(0.015) {
                let mut f = mk(self, Ty::Follow, mid + 800);
                f.session = 0;
                f.video = 0;
                f.view = 0;
                out.push(f);
                if self.rng.gen_bool(0.1) {
                    let mut u = f_clone_as(&out[out.len() - 1], Ty::Unfollow, mid + 60_000);
                    u.event_id = self.rng.gen();
                    out.push(u);
                }
            }
            t += watch;
        }
        if self.rng.gen_bool(0.85) {
            t += self.rng.gen_range(200..3000);
            out.push(self.base(Ty::SessionEnd, t, user, session, enc));
        }
        ooo
    }
}

fn f_clone_as(g: &G, ty: Ty, t: i64) -> G {
    let mut u = g.clone();
    u.ty = ty;
    u.t = t;
    u
}

/// Generates the workload described by `cfg`.
pub fn generate(cfg: &WorkloadConfig) -> Workload {
    let mut rng = StdRng::seed_from_u64(cfg.seed);
    let (n_users, n_videos, n_creators) = cfg.population();
    let creators = Zipf::new(n_creators as u64, 1.1).expect("valid zipf");
    let video_creator = (0..n_videos)
        .map(|_| CREATOR_BASE + creators.sample(&mut rng) as u64)
        .collect();
    let video_duration = (0..n_videos)
        .map(|_| 5_000 + (rng.gen::<f64>().powi(2) * 175_000.0) as i64)
        .collect();
    let n_dup = (cfg.events as f64 * cfg.duplicate_fraction).round() as usize;
    let n_bad = (cfg.events as f64 * cfg.malformed_fraction).round() as usize;
    let n_valid = cfg.events.saturating_sub(n_dup + n_bad);
    let mut sim = Sim {
        rng,
        users: Zipf::new(n_users as u64, 0.9).expect("valid zipf"),
        videos: Zipf::new(n_videos as u64, 1.05).expect("valid zipf"),
        video_creator,
        video_duration,
        share_pool: Vec::new(),
        // Each seed numbers from its own range (2^40 ids apart), so that files generated with
        // different seeds (a day and its late trickle) share no event, view or session id.
        next_id: cfg.seed.wrapping_shl(40),
        ooo: cfg.out_of_order_fraction.clamp(0.0, 1.0),
    };

    // Sessions in order; each remembers where its events start.
    let mut events: Vec<G> = Vec::with_capacity(n_valid + 64);
    let mut session_starts = Vec::new();
    let mut out_of_order = 0;
    while events.len() < n_valid {
        session_starts.push(events.len());
        out_of_order += sim.session(&mut events);
    }
    events.truncate(n_valid);
    session_starts.retain(|s| *s < n_valid);
    let mut rng = sim.rng;

    // Spread session starts over the span, in order, leaving room for the last sessions.
    let span = cfg.days.max(1) as i64 * 86_400_000;
    let start_ms = cfg.end_ms - span;
    let room = 3 * 3_600_000;
    let mut starts: Vec<i64> = (0..session_starts.len())
        .map(|_| start_ms + rng.gen_range(0..(span - room).max(1)))
        .collect();
    starts.sort_unstable();
    for (i, &from) in session_starts.iter().enumerate() {
        let to = session_starts.get(i + 1).copied().unwrap_or(events.len());
        for g in &mut events[from..to] {
            g.t = (starts[i] + g.t).min(cfg.end_ms);
        }
    }

    // Arrival order: small jitter, some late, out-of-order pairs just before their partner.
    let mut late = 0;
    for g in events.iter_mut() {
        if g.arrival == -1 {
            g.arrival = g.t - 3_000 - rng.gen_range(0..1000);
            continue;
        }
        g.arrival = g.t + rng.gen_range(0..5_000);
        if rng.gen_bool(cfg.late_fraction.clamp(0.0, 1.0)) {
            let hours = (rng.gen::<f64>() * (72f64).ln()).exp(); // 1 h – 3 d, log-uniform
            g.arrival = g.t + (hours * 3_600_000.0) as i64;
            late += 1;
        }
    }

    let mut manifest = Manifest {
        seed: cfg.seed,
        valid_unique: events.len(),
        late,
        out_of_order,
        users: n_users,
        videos: n_videos,
        creators: n_creators,
        first_event_ms: events.iter().map(|g| g.t).min().unwrap_or(0),
        last_event_ms: events.iter().map(|g| g.t).max().unwrap_or(0),
        ..Manifest::default()
    };
    for g in &events {
        *manifest.by_type.entry(g.ty.name().to_string()).or_default() += 1;
    }

    let mut lines: Vec<(i64, String)> = events
        .iter()
        .map(|g| (g.arrival, format_event(g)))
        .collect();
    for _ in 0..n_dup.min(lines.len()) {
        let i = rng.gen_range(0..events.len());
        let at = lines[i].0 + rng.gen_range(1..3_600_000);
        lines.push((at, lines[i].1.clone()));
    }
    manifest.duplicates = n_dup.min(events.len());
    let span_end = cfg.end_ms;
    for k in 0..n_bad {
        let at = start_ms + rng.gen_range(0..span.max(1));
        let donor = &events[rng
            .gen_range(0..events.len().max(1))
            .min(events.len().saturating_sub(1))];
        lines.push((at, malformed(k, donor, &mut rng, span_end)));
    }
    manifest.malformed = n_bad;
    lines.sort_by_key(|(a, _)| *a);
    manifest.lines = lines.len();
    Workload {
        lines: lines.into_iter().map(|(_, l)| l).collect(),
        manifest,
    }
}

fn uuid(x: u128) -> String {
    let h = format!("{x:032x}");
    format!(
        "{}-{}-4{}-a{}-{}",
        &h[0..8],
        &h[8..12],
        &h[13..16],
        &h[17..20],
        &h[20..32]
    )
}

fn time(out: &mut String, ms: i64, rfc: bool) {
    if rfc {
        let dt = chrono::DateTime::from_timestamp_millis(ms).unwrap_or_default();
        let _ = write!(out, "\"{}\"", dt.format("%Y-%m-%dT%H:%M:%S%.3fZ"));
    } else {
        let _ = write!(out, "{ms}");
    }
}

fn id(out: &mut String, v: u64, as_string: bool) {
    if as_string {
        let _ = write!(out, "\"{v}\"");
    } else {
        let _ = write!(out, "{v}");
    }
}

fn format_event(g: &G) -> String {
    let mut o = String::with_capacity(320);
    let strs = g.enc & 1 == 1;
    let _ = write!(
        o,
        "{{\"event_id\":\"{}\",\"event_type\":\"{}\",\"event_time\":",
        uuid(g.event_id),
        g.ty.name()
    );
    time(&mut o, g.t, g.enc & 2 == 2);
    o.push_str(",\"user_id\":");
    id(&mut o, g.user, strs);
    if g.session != 0 {
        let _ = write!(o, ",\"session_id\":\"s-{:x}\"", g.session);
    }
    if g.video != 0 {
        o.push_str(",\"video_id\":");
        id(&mut o, g.video, strs);
    }
    if g.creator != 0 {
        o.push_str(",\"creator_id\":");
        id(&mut o, g.creator, strs);
    }
    if g.view != 0 {
        let _ = write!(o, ",\"view_id\":\"v-{:x}\"", g.view);
    }
    if g.enc & 4 == 4 {
        let u = g.user as usize;
        let _ = write!(
            o,
            ",\"device\":{{\"os\":\"{}\",\"app_version\":\"3.{}.0\",\"country\":\"{}\"}}",
            OS[u % 3],
            u % 7,
            COUNTRIES[u % COUNTRIES.len()]
        );
    }
    let mut props = String::new();
    match g.ty {
        Ty::ViewStart => {
            let _ = write!(props, "\"source\":\"{}\"", g.source);
            if g.via_share != 0 {
                let _ = write!(props, ",\"via_share_id\":\"sh-{:x}\"", g.via_share);
            }
        }
        Ty::ViewEnd => {
            let _ = write!(
                props,
                "\"watch_ms\":{},\"video_duration_ms\":{}",
                g.watch_ms, g.duration_ms
            );
        }
        Ty::Comment => {
            let _ = write!(
                props,
                "\"comment_id\":\"c-{:x}\",\"length\":{}",
                g.comment,
                g.comment % 200
            );
        }
        Ty::Share => {
            let _ = write!(
                props,
                "\"share_id\":\"sh-{:x}\",\"channel\":\"{}\"",
                g.share,
                CHANNELS[(g.share % 4) as usize]
            );
            if g.parent_share != 0 {
                let _ = write!(props, ",\"parent_share_id\":\"sh-{:x}\"", g.parent_share);
            }
        }
        _ => {}
    }
    if !props.is_empty() {
        let _ = write!(o, ",\"props\":{{{props}}}");
    }
    o.push('}');
    o
}

/// A line that breaks the contract in one of several ways (cycling through them).
fn malformed(k: usize, donor: &G, rng: &mut StdRng, end_ms: i64) -> String {
    let id = format!("bad-{k}-{:x}", rng.gen::<u32>());
    let ok = format_event(&G {
        event_id: 0,
        ..donor.clone()
    });
    let ok = ok.replacen(&uuid(0), &id, 1);
    match k % 8 {
        0 => ok[..ok.len() / 2].to_string(),
        1 => format!(
            r#"{{"event_id":"{id}","event_type":"like","event_time":{end_ms},"session_id":"s","video_id":1,"creator_id":2}}"#
        ),
        2 => format!(
            r#"{{"event_id":"{id}","event_type":"video_view_end","event_time":{end_ms},"user_id":1,"session_id":"s","video_id":1,"creator_id":2,"view_id":"v","props":{{"watch_ms":-5,"video_duration_ms":1000}}}}"#
        ),
        3 => format!(
            r#"{{"event_id":"{id}","event_type":"video_teleport","event_time":{end_ms},"user_id":1,"session_id":"s"}}"#
        ),
        4 => format!(
            r#"{{"event_id":"{id}","event_type":"session_start","event_time":"yesterday","user_id":1,"session_id":"s"}}"#
        ),
        5 => format!(
            r#"{{"event_id":"{id}","event_type":"session_start","event_time":{end_ms},"user_id":"abc","session_id":"s"}}"#
        ),
        6 => "42".to_string(),
        _ => format!(
            r#"{{"event_id":"{id}","event_type":"like","event_time":{end_ms},"user_id":1,"session_id":"s","video_id":1}}"#
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deterministic_and_counts_add_up() {
        let cfg = WorkloadConfig::new(20_000, 7, 1_764_000_000_000);
        let a = generate(&cfg);
        let b = generate(&cfg);
        assert_eq!(a.lines, b.lines);
        let m = &a.manifest;
        assert_eq!(m.lines, 20_000);
        assert_eq!(m.valid_unique + m.duplicates + m.malformed, m.lines);
        assert_eq!(m.by_type.values().sum::<usize>(), m.valid_unique);
        assert!(m.late > 0 && m.out_of_order > 0);
        for t in [
            "video_view_start",
            "video_view_end",
            "like",
            "unlike",
            "comment",
            "share",
            "session_start",
            "session_end",
            "follow_creator",
            "unfollow_creator",
        ] {
            assert!(m.by_type.get(t).copied().unwrap_or(0) > 0, "no {t}");
        }
        assert!(m.last_event_ms <= cfg.end_ms);
        assert!(
            a.lines.iter().any(|l| l.contains("parent_share_id")),
            "share chains"
        );
    }
}
