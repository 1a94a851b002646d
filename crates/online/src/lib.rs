//! The online feature store (docs/online-features.md): per-video, per-user and per-creator features kept in
//! memory and updated by every accepted event before its ingest response returns.
//!
//! ```text
//!  WAL writer thread (after fsync, in log order)
//!      │ events RecordBatch
//!      ▼
//!  FeatureStore::apply ──▶ views     (view_id → pairing state: start/end, max watch)
//!                     ├──▶ videos    (totals, minute buckets, 24 h viewers)
//!                     ├──▶ users     (recent views, like/follow state, sessions)
//!                     └──▶ creators  (followers, minute buckets)
//!  HTTP readers ──read locks on one shard──▶ VideoFeatures / UserFeatures / CreatorFeatures
//!  flusher ──at a WAL rotation──▶ snapshot (segment S) ─▶ _state/online.snap
//!  start: snapshot + WAL records of segments > S  (or a rebuild from `events` if none)
//! ```
//!
//! Every feature is a function of the *set* of events (order never matters): view pairing keeps
//! the earliest start and the largest watch like `fact_video_view`, like and follow state is
//! last-writer-wins by `(event_time, event_id)` like the warehouse's state tables, and windows
//! are keyed by event time. That is what makes snapshot + replay restore identical features and
//! lets `reelhouse check` compare totals with the warehouse.
//!
//! Each map is split into [`SHARDS`] `RwLock`ed shards; the only writer is the WAL thread, so
//! readers contend only with it, on one shard at a time.
//!
//! With several processes, the materializer's store is the one that computes; it remembers
//! which videos, users and creators changed ([`FeatureStore::track_changes`]) and
//! [`redis`] copies their serving records ([`VideoRecord`], [`UserRecord`],
//! [`CreatorRecord`]) to Redis, where API replicas read them. The store answers its own
//! lookups through the same record types, so both give the same features.

pub mod redis;
pub mod rows;
pub mod snapshot;
mod upkeep;
pub mod window;

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};

use reelhouse_event::time::day_of;
use reelhouse_event::{Clock, CreatorId, UserId, VideoId};
use reelhouse_lake::deltalake::arrow::array::RecordBatch;
use serde::{Deserialize, Serialize};

use rows::{Columns, Row};
use window::{minute_of, Buckets, Counts, DAY_MINUTES};

/// Errors of the store.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("events batch lacks column {0}")]
    MissingColumn(&'static str),
    #[error("feature snapshot is unreadable (it will be rebuilt from the tables): {0}")]
    Snapshot(String),
    #[error("an online-store record is unreadable: {0}")]
    Record(String),
    #[error("redis: {0}")]
    Redis(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Shards per map.
pub const SHARDS: usize = 64;
/// Views and likes kept per user for the user features.
pub const RECENT: usize = 100;

fn hash64(s: &str) -> u64 {
    xxhash_rust::xxh3::xxh3_64(s.as_bytes())
}

fn shard_of(key: u64) -> usize {
    // Fibonacci hashing spreads sequential ids over the shards.
    (key.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 58) as usize % SHARDS
}

/// A map split into `RwLock`ed shards. With change tracking on (the writer of a deployment
/// that mirrors the store into Redis), every key taken for writing is remembered until
/// [`FeatureStore::take_changes`] collects it.
#[derive(Debug)]
struct Sharded<V> {
    maps: Vec<RwLock<HashMap<u64, V>>>,
    tracking: AtomicBool,
    changed: Vec<Mutex<HashSet<u64>>>,
}

impl<V> Default for Sharded<V> {
    fn default() -> Self {
        Sharded {
            maps: (0..SHARDS).map(|_| RwLock::default()).collect(),
            tracking: AtomicBool::new(false),
            changed: (0..SHARDS).map(|_| Mutex::default()).collect(),
        }
    }
}

impl<V> Sharded<V> {
    fn read(&self, key: u64) -> RwLockReadGuard<'_, HashMap<u64, V>> {
        self.maps[shard_of(key)]
            .read()
            .unwrap_or_else(|p| p.into_inner())
    }
    fn write(&self, key: u64) -> RwLockWriteGuard<'_, HashMap<u64, V>> {
        self.mark(key);
        self.maps[shard_of(key)]
            .write()
            .unwrap_or_else(|p| p.into_inner())
    }
    /// Remembers `key` as changed (when tracking).
    fn mark(&self, key: u64) {
        if self.tracking.load(Ordering::Relaxed) {
            self.changed[shard_of(key)]
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(key);
        }
    }
    /// Starts tracking, with every key present counted as changed.
    fn track(&self) {
        self.tracking.store(true, Ordering::Relaxed);
        for (map, changed) in self.maps.iter().zip(&self.changed) {
            let map = map.read().unwrap_or_else(|p| p.into_inner());
            changed
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .extend(map.keys().copied());
        }
    }
    fn take_changed(&self) -> Vec<u64> {
        let mut out = Vec::new();
        for c in &self.changed {
            out.extend(std::mem::take(
                &mut *c.lock().unwrap_or_else(|p| p.into_inner()),
            ));
        }
        out
    }
    fn shards(&self) -> impl Iterator<Item = RwLockReadGuard<'_, HashMap<u64, V>>> {
        self.maps
            .iter()
            .map(|s| s.read().unwrap_or_else(|p| p.into_inner()))
    }
    fn shards_mut(&self) -> impl Iterator<Item = RwLockWriteGuard<'_, HashMap<u64, V>>> {
        self.maps
            .iter()
            .map(|s| s.write().unwrap_or_else(|p| p.into_inner()))
    }
    fn len(&self) -> usize {
        self.shards().map(|s| s.len()).sum()
    }
}

impl<V: Serialize> Serialize for Sharded<V> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeSeq;
        let mut seq = s.serialize_seq(Some(self.len()))?;
        for shard in self.shards() {
            for kv in shard.iter() {
                seq.serialize_element(&kv)?;
            }
        }
        seq.end()
    }
}

impl<'de, V: Deserialize<'de>> Deserialize<'de> for Sharded<V> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let items: Vec<(u64, V)> = Vec::deserialize(d)?;
        let out = Sharded::default();
        for (k, v) in items {
            out.write(k).insert(k, v);
        }
        Ok(out)
    }
}

/// Last-writer-wins state of one (user, video) like or (user, creator) follow.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Lww {
    time_ms: i64,
    event_id: Box<str>,
    on: bool,
}

impl Lww {
    /// Applies an event; returns the change of "on" (−1, 0, +1).
    fn update(slot: &mut Option<Lww>, time_ms: i64, event_id: &str, on: bool) -> i64 {
        match slot {
            Some(cur) if (time_ms, event_id) <= (cur.time_ms, &*cur.event_id) => 0,
            _ => {
                let before = slot.as_ref().is_some_and(|c| c.on);
                *slot = Some(Lww {
                    time_ms,
                    event_id: event_id.into(),
                    on,
                });
                on as i64 - before as i64
            }
        }
    }
}

/// Pairing state of one `view_id`, as `fact_video_view` pairs it.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct ViewState {
    user_id: i64,
    video_id: i64,
    creator_id: i64,
    has_start: bool,
    /// Earliest start.
    start_ms: Option<i64>,
    /// Latest end.
    end_ms: Option<i64>,
    /// Largest watch_ms and largest duration over the ends (duplicate ends keep the max).
    watch_ms: Option<i64>,
    duration_ms: Option<i64>,
}

/// What one view contributes to its video, creator and user.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Contribution {
    user_id: i64,
    video_id: i64,
    creator_id: i64,
    /// Start time, or the end's when the start is missing (SPEC attribution rule).
    at_ms: i64,
    counts: Counts,
    percent: Option<f64>,
}

impl ViewState {
    fn contribution(&self) -> Contribution {
        let percent = match (self.watch_ms, self.duration_ms) {
            (Some(w), Some(d)) if d > 0 => Some((w as f64 / d as f64).min(1.0)),
            _ => None,
        };
        let completed = match (self.watch_ms, self.duration_ms) {
            (Some(w), Some(d)) => w as f64 >= 0.98 * d as f64,
            _ => false,
        };
        Contribution {
            user_id: self.user_id,
            video_id: self.video_id,
            creator_id: self.creator_id,
            at_ms: self.start_ms.or(self.end_ms).unwrap_or(0),
            counts: Counts {
                views: 1,
                ended: percent.is_some() as u32,
                completions: completed as u32,
                pct_sum: percent.unwrap_or(0.0),
            },
            percent,
        }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct VideoState {
    creator_id: Option<i64>,
    views_total: u64,
    likes: i64,
    shares: u64,
    comments: u64,
    buckets: Buckets,
    /// Viewer → minute of their latest view event (start or end) of this video.
    viewers: HashMap<i64, u32>,
    /// Viewers counted at the minute of their latest view event, so the distinct viewers of
    /// the last 24 h are a sum over at most 1,440 buckets instead of a scan of `viewers`.
    viewers_by_minute: Buckets,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct RecentView {
    video_id: i64,
    at_ms: i64,
    percent: Option<f64>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
struct SessionSeen {
    start_ms: Option<i64>,
    first_ms: i64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct UserState {
    /// The user's views still in the pairing window, by view_id hash (the newest 100 are the
    /// feature; keeping all of them keeps the answer independent of arrival order).
    recent: HashMap<u64, RecentView>,
    likes: HashMap<i64, Lww>,
    follows: HashMap<i64, Lww>,
    sessions: HashMap<u64, SessionSeen>,
    /// (video, share_id hash) and (video, comment event hash) of the user's shares and
    /// comments, so erasure can take them out of the video counts.
    #[serde(default)]
    shares: Vec<(i64, u64)>,
    #[serde(default)]
    comments: Vec<(i64, u64)>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct CreatorState {
    followers: i64,
    buckets: Buckets,
}

/// docs/online-features.md video features.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct VideoFeatures {
    pub video_id: u64,
    /// 0 when the video is unknown.
    pub creator_id: u64,
    pub views_total: u64,
    pub views_1h: u64,
    pub views_24h: u64,
    /// Exact distinct users with a view attributed to the last 24 h.
    pub unique_viewers_24h: u64,
    /// Net likes (users whose last like/unlike is a like).
    pub likes: i64,
    /// Distinct `share_id`s.
    pub shares: u64,
    pub comments: u64,
    /// Mean percent viewed (0…1) over views with an end in the last 24 h; 0 when none.
    pub avg_percent_viewed_24h: f64,
    /// Completed views / views with an end, last 24 h; 0 when none.
    pub completion_rate_24h: f64,
}

/// One of a user's recent views.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ViewedVideo {
    pub video_id: u64,
    /// min(watch / duration, 1), null while the view has no end.
    pub percent_viewed: Option<f64>,
    /// Start of the view (its end when the start is missing), RFC 3339.
    pub viewed_at: String,
}

/// docs/online-features.md user features.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct UserFeatures {
    pub user_id: u64,
    /// Up to 100, most recent first.
    pub last_viewed: Vec<ViewedVideo>,
    /// Up to 100 video ids currently liked, most recently liked first.
    pub last_liked: Vec<u64>,
    /// Creators currently followed, most recently followed first.
    pub followed_creators: Vec<u64>,
    /// Sessions that started today (UTC).
    pub sessions_today: u64,
}

/// docs/online-features.md creator features.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CreatorFeatures {
    pub creator_id: u64,
    /// Net followers.
    pub followers: i64,
    pub views_24h: u64,
}

/// Which entity a serving record belongs to (a key of an external online store).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Key {
    Video(u64),
    User(u64),
    Creator(u64),
}

/// What a reader needs to answer a video's features at any later time: totals plus the
/// minute buckets of the last 24 h, so windows slide with the reader's clock and a quiet
/// video's record never needs rewriting. The in-process store answers through the same type
/// (borrowing its buckets), so both give the same features by construction.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VideoRecord<'a> {
    creator_id: Option<i64>,
    views_total: u64,
    likes: i64,
    shares: u64,
    comments: u64,
    buckets: Cow<'a, Buckets>,
    viewers_by_minute: Cow<'a, Buckets>,
}

impl<'a> VideoRecord<'a> {
    fn of(v: &'a VideoState) -> Self {
        VideoRecord {
            creator_id: v.creator_id,
            views_total: v.views_total,
            likes: v.likes,
            shares: v.shares,
            comments: v.comments,
            buckets: Cow::Borrowed(&v.buckets),
            viewers_by_minute: Cow::Borrowed(&v.viewers_by_minute),
        }
    }

    /// The features at `now_ms`.
    pub fn features(&self, id: u64, now_ms: i64) -> VideoFeatures {
        self.features_at(id, minute_of(now_ms))
    }

    fn features_at(&self, id: u64, now_minute: u32) -> VideoFeatures {
        let day = self.buckets.sum(now_minute, DAY_MINUTES);
        let mut f = VideoFeatures {
            video_id: id,
            creator_id: to_u64(self.creator_id.unwrap_or(0)),
            views_total: self.views_total,
            views_1h: self.buckets.sum(now_minute, 60).views as u64,
            views_24h: day.views as u64,
            unique_viewers_24h: self.viewers_by_minute.sum(now_minute, DAY_MINUTES).views as u64,
            likes: self.likes,
            shares: self.shares,
            comments: self.comments,
            ..VideoFeatures::default()
        };
        if day.ended > 0 {
            f.avg_percent_viewed_24h = day.pct_sum / day.ended as f64;
            f.completion_rate_24h = day.completions as f64 / day.ended as f64;
        }
        f
    }
}

/// A user's serving record: the lists as they stand, and the days their current sessions
/// started on (so "sessions today" follows the reader's clock).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct UserRecord {
    /// (video, attribution time, percent viewed), most recent first, at most [`RECENT`].
    viewed: Vec<(i64, i64, Option<f64>)>,
    liked: Vec<u64>,
    followed: Vec<u64>,
    session_days: Vec<i32>,
}

impl UserRecord {
    fn of(u: &UserState) -> Self {
        let mut recent: Vec<(&u64, &RecentView)> = u.recent.iter().collect();
        let key = |(k, e): &(&u64, &RecentView)| std::cmp::Reverse((e.at_ms, **k));
        if recent.len() > RECENT {
            recent.select_nth_unstable_by_key(RECENT - 1, key);
            recent.truncate(RECENT);
        }
        recent.sort_by_key(key);
        UserRecord {
            viewed: recent
                .into_iter()
                .map(|(_, e)| (e.video_id, e.at_ms, e.percent))
                .collect(),
            liked: latest_on(&u.likes, RECENT),
            followed: latest_on(&u.follows, usize::MAX),
            session_days: u
                .sessions
                .values()
                .map(|s| day_of(s.start_ms.unwrap_or(s.first_ms)))
                .collect(),
        }
    }

    /// The features at `now_ms`.
    pub fn features(&self, id: u64, now_ms: i64) -> UserFeatures {
        let today = day_of(now_ms);
        UserFeatures {
            user_id: id,
            last_viewed: self
                .viewed
                .iter()
                .map(|(video, at, percent)| ViewedVideo {
                    video_id: to_u64(*video),
                    percent_viewed: *percent,
                    viewed_at: rfc3339(*at),
                })
                .collect(),
            last_liked: self.liked.clone(),
            followed_creators: self.followed.clone(),
            sessions_today: self.session_days.iter().filter(|d| **d == today).count() as u64,
        }
    }
}

/// A creator's serving record.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CreatorRecord<'a> {
    followers: i64,
    buckets: Cow<'a, Buckets>,
}

impl<'a> CreatorRecord<'a> {
    fn of(c: &'a CreatorState) -> Self {
        CreatorRecord {
            followers: c.followers,
            buckets: Cow::Borrowed(&c.buckets),
        }
    }

    /// The features at `now_ms`.
    pub fn features(&self, id: u64, now_ms: i64) -> CreatorFeatures {
        CreatorFeatures {
            creator_id: id,
            followers: self.followers,
            views_24h: self.buckets.sum(minute_of(now_ms), DAY_MINUTES).views as u64,
        }
    }
}

/// MessagePack of a record (serializing plain numbers and lists cannot fail).
fn encode_record<T: Serialize>(r: &T) -> Vec<u8> {
    rmp_serde::to_vec(r).unwrap_or_default()
}

/// Reads a record written by [`FeatureStore::take_changes`].
fn decode_record<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T> {
    rmp_serde::from_slice(bytes).map_err(|e| Error::Record(e.to_string()))
}

impl VideoRecord<'_> {
    /// Reads a record written by [`FeatureStore::take_changes`].
    pub fn decode(bytes: &[u8]) -> Result<VideoRecord<'static>> {
        decode_record(bytes)
    }
}

impl UserRecord {
    /// Reads a record written by [`FeatureStore::take_changes`].
    pub fn decode(bytes: &[u8]) -> Result<UserRecord> {
        decode_record(bytes)
    }
}

impl CreatorRecord<'_> {
    /// Reads a record written by [`FeatureStore::take_changes`].
    pub fn decode(bytes: &[u8]) -> Result<CreatorRecord<'static>> {
        decode_record(bytes)
    }
}

/// Totals compared by `reelhouse check`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Totals {
    /// video → (views, likes net, shares, comments)
    pub videos: HashMap<i64, (i64, i64, i64, i64)>,
    /// creator → followers net
    pub creators: HashMap<i64, i64>,
}

/// What [`FeatureStore::forget_user`] removed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ForgetReport {
    pub views: usize,
    pub likes: usize,
    pub follows: usize,
    pub shares: usize,
    pub comments: usize,
    pub sessions: usize,
    pub viewer_entries: usize,
}

/// Entry counts and an estimate of heap bytes, for health and the serve benchmark.
#[derive(Debug, Clone, Default, Serialize)]
pub struct StoreStats {
    pub videos: usize,
    pub users: usize,
    pub creators: usize,
    pub views: usize,
    pub applied_events: u64,
}

/// Heap bytes held by each part of the store, counted from map capacities and entry sizes
/// (hashbrown keeps one control byte per slot). The serve benchmark prints it beside the
/// process's measured RSS growth, which it should approach from below.
#[derive(Debug, Clone, Default, Serialize)]
pub struct MemoryEstimate {
    pub views_bytes: usize,
    pub videos_bytes: usize,
    pub users_bytes: usize,
    pub creators_bytes: usize,
    pub id_sets_bytes: usize,
}

impl MemoryEstimate {
    pub fn total(&self) -> usize {
        self.views_bytes
            + self.videos_bytes
            + self.users_bytes
            + self.creators_bytes
            + self.id_sets_bytes
    }
}

fn map_bytes<K, V>(m: &HashMap<K, V>) -> usize {
    m.capacity() * (std::mem::size_of::<(K, V)>() + 1)
}

/// The store. One writer (the WAL thread), many readers.
pub struct FeatureStore {
    clock: Arc<dyn Clock>,
    /// Pairing state of views (by view_id hash) kept this long by attribution time; a start or
    /// end arriving later than that for a pruned view counts as a new view.
    keep_views_ms: i64,
    inner: Inner,
}

#[derive(Default, Serialize, Deserialize)]
struct Inner {
    views: Sharded<ViewState>,
    videos: Sharded<VideoState>,
    users: Sharded<UserState>,
    creators: Sharded<CreatorState>,
    shares: Sharded<()>,
    /// Comment event ids (hashed), so an event stored twice beyond the dedup window counts once.
    comments: Sharded<()>,
    applied: std::sync::atomic::AtomicU64,
}

fn to_u64(id: i64) -> u64 {
    id.max(0) as u64
}

impl FeatureStore {
    /// An empty store. `keep_views_ms` should be the allowed lateness plus a day.
    pub fn new(clock: Arc<dyn Clock>, keep_views_ms: i64) -> FeatureStore {
        FeatureStore {
            clock,
            keep_views_ms,
            inner: Inner::default(),
        }
    }

    /// Applies every event of an `events` batch (ingest path or rebuild from the table).
    pub fn apply(&self, batch: &RecordBatch) -> Result<()> {
        let cols = Columns::new(batch)?;
        let now_minute = minute_of(self.clock.now_ms());
        for i in 0..cols.len() {
            self.apply_row(&cols.row(i), now_minute);
        }
        self.inner
            .applied
            .fetch_add(cols.len() as u64, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    fn apply_row(&self, r: &Row<'_>, now_minute: u32) {
        let is_view = matches!(r.event_type, "video_view_start" | "video_view_end");
        if let (Some(v), Some(c), false) = (r.video_id, r.creator_id, is_view) {
            // View events set it under the lock they take anyway (see `update_video`).
            let mut videos = self.inner.videos.write(v as u64);
            videos.entry(v as u64).or_default().creator_id = Some(c);
        }
        if let Some(s) = r.session_id {
            let key = hash64(s);
            let mut users = self.inner.users.write(r.user_id as u64);
            let u = users.entry(r.user_id as u64).or_default();
            let seen = u.sessions.entry(key).or_insert(SessionSeen {
                start_ms: None,
                first_ms: r.time_ms,
            });
            seen.first_ms = seen.first_ms.min(r.time_ms);
            if r.event_type == "session_start" {
                seen.start_ms = Some(seen.start_ms.map_or(r.time_ms, |t| t.min(r.time_ms)));
            }
        }
        match r.event_type {
            "video_view_start" | "video_view_end" => self.apply_view(r, now_minute),
            "like" | "unlike" => {
                let Some(video) = r.video_id else { return };
                let delta = {
                    let mut users = self.inner.users.write(r.user_id as u64);
                    let u = users.entry(r.user_id as u64).or_default();
                    let mut slot = u.likes.remove(&video);
                    let d = Lww::update(&mut slot, r.time_ms, r.event_id, r.event_type == "like");
                    if let Some(s) = slot {
                        u.likes.insert(video, s);
                    }
                    d
                };
                if delta != 0 {
                    let mut videos = self.inner.videos.write(video as u64);
                    videos.entry(video as u64).or_default().likes += delta;
                }
            }
            "follow_creator" | "unfollow_creator" => {
                let Some(creator) = r.creator_id else { return };
                let delta = {
                    let mut users = self.inner.users.write(r.user_id as u64);
                    let u = users.entry(r.user_id as u64).or_default();
                    let mut slot = u.follows.remove(&creator);
                    let on = r.event_type == "follow_creator";
                    let d = Lww::update(&mut slot, r.time_ms, r.event_id, on);
                    if let Some(s) = slot {
                        u.follows.insert(creator, s);
                    }
                    d
                };
                if delta != 0 {
                    let mut creators = self.inner.creators.write(creator as u64);
                    creators.entry(creator as u64).or_default().followers += delta;
                }
            }
            // A share counts once per share_id, a comment once per event.
            "share" => {
                if let (Some(video), Some(share)) = (r.video_id, r.share_id) {
                    self.count_once(r.user_id, video, hash64(share), true);
                }
            }
            "comment" => {
                if let Some(video) = r.video_id {
                    self.count_once(r.user_id, video, hash64(r.event_id), false);
                }
            }
            _ => {}
        }
    }

    /// Counts a share (`is_share`) or comment keyed `key` on `video` the first time the key is
    /// seen, and remembers it under the user for erasure.
    fn count_once(&self, user: i64, video: i64, key: u64, is_share: bool) {
        let set = if is_share {
            &self.inner.shares
        } else {
            &self.inner.comments
        };
        if set.write(key).insert(key, ()).is_some() {
            return;
        }
        {
            let mut users = self.inner.users.write(user as u64);
            let u = users.entry(user as u64).or_default();
            let list = if is_share {
                &mut u.shares
            } else {
                &mut u.comments
            };
            list.push((video, key));
        }
        let mut videos = self.inner.videos.write(video as u64);
        let v = videos.entry(video as u64).or_default();
        *(if is_share {
            &mut v.shares
        } else {
            &mut v.comments
        }) += 1;
    }

    fn apply_view(&self, r: &Row<'_>, now_minute: u32) {
        let (Some(view_id), Some(video)) = (r.view_id, r.video_id) else {
            return;
        };
        let creator = r.creator_id.unwrap_or(0);
        let key = hash64(view_id);
        let is_start = r.event_type == "video_view_start";
        let (before, after) = {
            let mut views = self.inner.views.write(key);
            let mut fresh = false;
            let v = views.entry(key).or_insert_with(|| {
                fresh = true;
                ViewState {
                    user_id: r.user_id,
                    video_id: video,
                    creator_id: creator,
                    has_start: is_start,
                    start_ms: None,
                    end_ms: None,
                    watch_ms: None,
                    duration_ms: None,
                }
            });
            let before = (!fresh).then(|| v.contribution());
            // Who/what the view is about: from the start when there is one, else the least
            // value over the ends (as `fact_video_view` picks them).
            if is_start && !v.has_start {
                v.has_start = true;
                (v.user_id, v.video_id, v.creator_id) = (r.user_id, video, creator);
            } else if is_start || !v.has_start {
                v.user_id = v.user_id.min(r.user_id);
                v.video_id = v.video_id.min(video);
                v.creator_id = v.creator_id.min(creator);
            }
            let min = |a: Option<i64>, b: i64| Some(a.map_or(b, |a| a.min(b)));
            let max = |a: Option<i64>, b: Option<i64>| match (a, b) {
                (Some(a), Some(b)) => Some(a.max(b)),
                (a, b) => a.or(b),
            };
            if is_start {
                v.start_ms = min(v.start_ms, r.time_ms);
            } else {
                v.end_ms = max(v.end_ms, Some(r.time_ms));
                v.watch_ms = max(v.watch_ms, r.watch_ms);
                v.duration_ms = max(v.duration_ms, r.duration_ms);
            }
            (before, v.contribution())
        };
        self.update_video(r, video, before.as_ref(), &after, now_minute);
        if before == Some(after) {
            return;
        }
        self.note_recent_view(key, &after);
    }

    /// One lock of the event's video for the common case (the view stays on that video):
    /// creator id, viewer, total and buckets; the creator's buckets only when the view's
    /// minute or creator changed.
    fn update_video(
        &self,
        r: &Row<'_>,
        video: i64,
        before: Option<&Contribution>,
        after: &Contribution,
        now_minute: u32,
    ) {
        let same_video = before.is_none_or(|b| b.video_id == after.video_id);
        {
            let mut videos = self.inner.videos.write(video as u64);
            let v = videos.entry(video as u64).or_default();
            if let Some(c) = r.creator_id {
                v.creator_id = Some(c);
            }
            note_viewer(v, r.user_id, minute_of(r.time_ms), now_minute);
            if same_video && after.video_id == video && before != Some(after) {
                if let Some(b) = before {
                    v.buckets
                        .apply(minute_of(b.at_ms), &b.counts, -1, now_minute);
                } else {
                    v.views_total += 1;
                }
                v.buckets
                    .apply(minute_of(after.at_ms), &after.counts, 1, now_minute);
            }
        }
        if before == Some(after) {
            return;
        }
        if !(same_video && after.video_id == video) {
            if let Some(b) = before {
                self.contribute(b, -1, now_minute);
            }
            self.contribute(after, 1, now_minute);
            return;
        }
        let moved = before.is_none_or(|b| {
            b.creator_id != after.creator_id || minute_of(b.at_ms) != minute_of(after.at_ms)
        });
        if moved {
            if let Some(b) = before {
                self.creator_views(b, -1, now_minute);
            }
            self.creator_views(after, 1, now_minute);
        }
    }

    fn creator_views(&self, c: &Contribution, sign: i64, now_minute: u32) {
        let views = Counts {
            views: 1,
            ..Counts::default()
        };
        self.inner
            .creators
            .write(c.creator_id as u64)
            .entry(c.creator_id as u64)
            .or_default()
            .buckets
            .apply(minute_of(c.at_ms), &views, sign, now_minute);
    }

    fn contribute(&self, c: &Contribution, sign: i64, now_minute: u32) {
        let minute = minute_of(c.at_ms);
        {
            let mut videos = self.inner.videos.write(c.video_id as u64);
            let v = videos.entry(c.video_id as u64).or_default();
            v.views_total = (v.views_total as i64 + sign).max(0) as u64;
            v.buckets.apply(minute, &c.counts, sign, now_minute);
        }
        self.creator_views(c, sign, now_minute);
    }

    fn note_recent_view(&self, key: u64, c: &Contribution) {
        let mut users = self.inner.users.write(c.user_id as u64);
        let u = users.entry(c.user_id as u64).or_default();
        u.recent.insert(
            key,
            RecentView {
                video_id: c.video_id,
                at_ms: c.at_ms,
                percent: c.percent,
            },
        );
    }

    /// Features of one video; zeros when unknown.
    pub fn video(&self, id: VideoId) -> VideoFeatures {
        let now_minute = minute_of(self.clock.now_ms());
        self.video_at(id.0, now_minute)
    }

    /// Features of many videos, in the order asked.
    pub fn videos(&self, ids: &[VideoId]) -> Vec<VideoFeatures> {
        let now_minute = minute_of(self.clock.now_ms());
        ids.iter()
            .map(|id| self.video_at(id.0, now_minute))
            .collect()
    }

    fn video_at(&self, id: u64, now_minute: u32) -> VideoFeatures {
        let videos = self.inner.videos.read(id);
        match videos.get(&id) {
            Some(v) => VideoRecord::of(v).features_at(id, now_minute),
            None => VideoFeatures {
                video_id: id,
                ..VideoFeatures::default()
            },
        }
    }

    /// Features of one user; empty when unknown.
    pub fn user(&self, id: UserId) -> UserFeatures {
        let now = self.clock.now_ms();
        let users = self.inner.users.read(id.0);
        match users.get(&id.0) {
            Some(u) => UserRecord::of(u).features(id.0, now),
            None => UserFeatures {
                user_id: id.0,
                ..UserFeatures::default()
            },
        }
    }

    /// Features of one creator; zeros when unknown.
    pub fn creator(&self, id: CreatorId) -> CreatorFeatures {
        let now = self.clock.now_ms();
        let creators = self.inner.creators.read(id.0);
        match creators.get(&id.0) {
            Some(c) => CreatorRecord::of(c).features(id.0, now),
            None => CreatorFeatures {
                creator_id: id.0,
                ..CreatorFeatures::default()
            },
        }
    }
}

/// Moves the viewer's latest minute forward (it only ever grows, so one bucket move).
fn note_viewer(v: &mut VideoState, user: i64, minute: u32, now_minute: u32) {
    let one = Counts {
        views: 1,
        ..Counts::default()
    };
    match v.viewers.get(&user).copied() {
        Some(m) if m >= minute => {}
        old => {
            if let Some(m) = old {
                v.viewers_by_minute.apply(m, &one, -1, now_minute);
            }
            v.viewers.insert(user, minute);
            v.viewers_by_minute.apply(minute, &one, 1, now_minute);
        }
    }
}

/// Keys whose state is on, latest first, at most `n`.
fn latest_on(m: &HashMap<i64, Lww>, n: usize) -> Vec<u64> {
    let mut on: Vec<(i64, &str, i64)> = m
        .iter()
        .filter(|(_, s)| s.on)
        .map(|(k, s)| (s.time_ms, &*s.event_id, *k))
        .collect();
    on.sort_by(|a, b| b.cmp(a));
    on.into_iter().take(n).map(|(_, _, k)| to_u64(k)).collect()
}

fn rfc3339(ms: i64) -> String {
    use reelhouse_lake::deltalake::arrow::temporal_conversions::timestamp_ms_to_datetime;
    timestamp_ms_to_datetime(ms)
        .map(|dt| dt.format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests;
