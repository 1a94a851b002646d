//! Event contract v1 (docs/event-contract.md): the typed shape of one short-video event, how it is parsed
//! from JSON, validated and upcast, and how the server stamps it (docs/ingest.md time rules).
//!
//! This crate does no I/O. Bytes enter through [`parse::parse_event`] (one JSON object) or
//! [`parse::split_body`] (an NDJSON body or a JSON array) and leave as [`Event`] values or as a
//! [`Rejection`] with a specific, payload-free reason:
//!
//! ```text
//!  body bytes ──split_body──▶ items ──parse_event──▶ LooseEvent ──upcast──▶ validate ──▶ Event
//!                                  │                                            │
//!                                  └──────────── Rejection{reason} ◀────────────┘
//!  Event + received_at ──stamp──▶ StoredEvent (corrected time, event_date, lateness_ms)
//! ```

pub mod ids;
pub mod parse;
pub mod time;

pub use ids::{CreatorId, UserId, VideoId};
pub use parse::{parse_event, split_body, BodyFormat, Rejection};
pub use time::{stamp, Clock, Day, FixedClock, StoredEvent, SystemClock};

/// The schema version this build understands natively; older versions are upcast to it.
pub const CURRENT_SCHEMA_VERSION: u32 = 1;

/// Maximum length of every string identifier (event, session, view, share, comment ids).
pub const MAX_ID_LEN: usize = 64;

/// The ten event types of contract v1.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum EventType {
    VideoViewStart,
    VideoViewEnd,
    Like,
    Unlike,
    Comment,
    Share,
    SessionStart,
    SessionEnd,
    FollowCreator,
    UnfollowCreator,
}

impl EventType {
    /// All types, in contract order.
    pub const ALL: [EventType; 10] = [
        EventType::VideoViewStart,
        EventType::VideoViewEnd,
        EventType::Like,
        EventType::Unlike,
        EventType::Comment,
        EventType::Share,
        EventType::SessionStart,
        EventType::SessionEnd,
        EventType::FollowCreator,
        EventType::UnfollowCreator,
    ];

    /// The wire name, e.g. `video_view_start`.
    pub fn as_str(self) -> &'static str {
        match self {
            EventType::VideoViewStart => "video_view_start",
            EventType::VideoViewEnd => "video_view_end",
            EventType::Like => "like",
            EventType::Unlike => "unlike",
            EventType::Comment => "comment",
            EventType::Share => "share",
            EventType::SessionStart => "session_start",
            EventType::SessionEnd => "session_end",
            EventType::FollowCreator => "follow_creator",
            EventType::UnfollowCreator => "unfollow_creator",
        }
    }

    /// Parses a wire name; `None` for anything not in the contract.
    pub fn parse(s: &str) -> Option<EventType> {
        EventType::ALL.into_iter().find(|t| t.as_str() == s)
    }

    /// Types about one video: they carry `video_id` and `creator_id`.
    pub fn is_video_event(self) -> bool {
        matches!(
            self,
            EventType::VideoViewStart
                | EventType::VideoViewEnd
                | EventType::Like
                | EventType::Unlike
                | EventType::Comment
                | EventType::Share
        )
    }

    /// Follow and unfollow: the only types without a session.
    pub fn is_follow_event(self) -> bool {
        matches!(self, EventType::FollowCreator | EventType::UnfollowCreator)
    }
}

/// Where a view came from (`props.source`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Source {
    Feed,
    Profile,
    Share,
    Search,
    Hashtag,
    Audio,
    Other,
}

impl Source {
    pub const ALL: [Source; 7] = [
        Source::Feed,
        Source::Profile,
        Source::Share,
        Source::Search,
        Source::Hashtag,
        Source::Audio,
        Source::Other,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Source::Feed => "feed",
            Source::Profile => "profile",
            Source::Share => "share",
            Source::Search => "search",
            Source::Hashtag => "hashtag",
            Source::Audio => "audio",
            Source::Other => "other",
        }
    }

    pub fn parse(s: &str) -> Option<Source> {
        Source::ALL.into_iter().find(|t| t.as_str() == s)
    }
}

/// Optional device description; `country` is normalised to upper-case ISO 3166-1 alpha-2.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Device {
    pub os: Option<String>,
    pub app_version: Option<String>,
    pub country: Option<String>,
}

/// Type-specific properties, flattened and typed. Unknown keys go to [`Event::extra`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Props {
    pub source: Option<Source>,
    pub via_share_id: Option<String>,
    pub position: Option<i64>,
    pub watch_ms: Option<i64>,
    pub video_duration_ms: Option<i64>,
    pub exit_reason: Option<String>,
    pub comment_id: Option<String>,
    pub comment_length: Option<i64>,
    pub share_id: Option<String>,
    pub parent_share_id: Option<String>,
    pub channel: Option<String>,
}

/// One valid event of the current contract version, as the device sent it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub event_id: String,
    pub event_type: EventType,
    /// Device-clock event time, epoch milliseconds.
    pub event_time_ms: i64,
    /// Device-clock send time, epoch milliseconds.
    pub sent_at_ms: Option<i64>,
    pub user_id: UserId,
    pub session_id: Option<String>,
    pub video_id: Option<VideoId>,
    pub creator_id: Option<CreatorId>,
    pub view_id: Option<String>,
    /// The version the client sent (the event itself has been upcast to the current one).
    pub schema_version: u32,
    pub device: Device,
    pub props: Props,
    /// Unknown fields as a JSON object text: top-level keys as they came, unknown `props` keys
    /// under `"props"`, unknown `device` keys under `"device"`. `None` when there were none.
    pub extra: Option<String>,
}
