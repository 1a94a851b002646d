//! Parsing and validation of contract v1.
//!
//! One pass of serde over the bytes builds a [`LooseEvent`]: every known field as a loosely
//! typed [`Scalar`] (so a wrong type becomes a specific reason, not a serde message that would
//! echo the payload), every unknown field as its raw JSON text. The `schema_version` then
//! selects the upcasters that bring the loose event to the current version, and [`validate`]
//! turns it into a typed [`Event`] or a [`Rejection`].

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt;

use serde::de::{self, Deserialize, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_json::value::RawValue;

use crate::ids::MAX_ID;
use crate::{
    CreatorId, Device, Event, EventType, Props, Source, UserId, VideoId, CURRENT_SCHEMA_VERSION,
    MAX_ID_LEN,
};

/// Why one event was refused. `reason` never contains payload values.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    /// The event's `event_id` when it could be read as a valid id.
    pub event_id: Option<String>,
    pub reason: String,
}

/// How a request body holds its events.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyFormat {
    /// One JSON object per line.
    Ndjson,
    /// One JSON array of objects.
    JsonArray,
}

impl BodyFormat {
    /// A body whose first non-blank byte is `[` is a JSON array; anything else is NDJSON
    /// (a single object is an NDJSON body of one line).
    pub fn detect(body: &[u8]) -> BodyFormat {
        match body.iter().find(|b| !b.is_ascii_whitespace()) {
            Some(b'[') => BodyFormat::JsonArray,
            _ => BodyFormat::Ndjson,
        }
    }
}

/// Splits a body into its event items, in order. Blank NDJSON lines are not events and are
/// skipped. A JSON array that is not valid JSON is an error for the whole body (there is no
/// way to tell where its elements begin); a bad NDJSON line is only that line's problem.
pub fn split_body(body: &[u8]) -> Result<Vec<&[u8]>, String> {
    match BodyFormat::detect(body) {
        BodyFormat::Ndjson => Ok(body
            .split(|b| *b == b'\n')
            .map(trim_ascii)
            .filter(|l| !l.is_empty())
            .collect()),
        BodyFormat::JsonArray => {
            let items: Vec<&RawValue> = serde_json::from_slice(body)
                .map_err(|e| format!("body is not a valid JSON array of events ({e})"))?;
            Ok(items.into_iter().map(|r| r.get().as_bytes()).collect())
        }
    }
}

fn trim_ascii(s: &[u8]) -> &[u8] {
    let start = s
        .iter()
        .position(|b| !b.is_ascii_whitespace())
        .unwrap_or(s.len());
    let end = s
        .iter()
        .rposition(|b| !b.is_ascii_whitespace())
        .map_or(start, |e| e + 1);
    &s[start..end]
}

/// A JSON value as seen by a known field: scalars typed, containers only noted.
#[derive(Debug, Clone, PartialEq)]
pub enum Scalar<'a> {
    Null,
    Bool(bool),
    U64(u64),
    I64(i64),
    F64(f64),
    Str(Cow<'a, str>),
    /// An object or array where a scalar was expected.
    Container,
}

impl<'de> Deserialize<'de> for Scalar<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Scalar<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON value")
            }
            fn visit_unit<E>(self) -> Result<Self::Value, E> {
                Ok(Scalar::Null)
            }
            fn visit_none<E>(self) -> Result<Self::Value, E> {
                Ok(Scalar::Null)
            }
            fn visit_bool<E>(self, v: bool) -> Result<Self::Value, E> {
                Ok(Scalar::Bool(v))
            }
            fn visit_u64<E>(self, v: u64) -> Result<Self::Value, E> {
                Ok(Scalar::U64(v))
            }
            fn visit_i64<E>(self, v: i64) -> Result<Self::Value, E> {
                Ok(Scalar::I64(v))
            }
            fn visit_f64<E>(self, v: f64) -> Result<Self::Value, E> {
                Ok(Scalar::F64(v))
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(Scalar::Str(Cow::Borrowed(v)))
            }
            fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
                Ok(Scalar::Str(Cow::Owned(v.to_owned())))
            }
            fn visit_string<E>(self, v: String) -> Result<Self::Value, E> {
                Ok(Scalar::Str(Cow::Owned(v)))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> Result<Self::Value, A::Error> {
                while m.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok(Scalar::Container)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut s: A) -> Result<Self::Value, A::Error> {
                while s.next_element::<IgnoredAny>()?.is_some() {}
                Ok(Scalar::Container)
            }
        }
        d.deserialize_any(V)
    }
}

/// A nested object field (`props`, `device`): known keys as scalars, unknown keys raw.
#[derive(Debug, Clone, Default)]
pub struct LooseObject<'a> {
    /// False when the field was present but not an object (and not null).
    pub is_object: bool,
    pub known: BTreeMap<&'static str, Scalar<'a>>,
    pub unknown: Vec<(Cow<'a, str>, &'a RawValue)>,
}

/// An event as parsed, before validation: what upcasters work on.
#[derive(Debug, Clone, Default)]
pub struct LooseEvent<'a> {
    /// Known top-level scalar fields by name.
    pub fields: BTreeMap<&'static str, Scalar<'a>>,
    pub props: Option<LooseObject<'a>>,
    pub device: Option<LooseObject<'a>>,
    /// Unknown top-level fields, raw.
    pub unknown: Vec<(Cow<'a, str>, &'a RawValue)>,
}

const TOP_FIELDS: [&str; 10] = [
    "event_id",
    "event_type",
    "event_time",
    "sent_at",
    "user_id",
    "session_id",
    "video_id",
    "creator_id",
    "view_id",
    "schema_version",
];
const PROP_FIELDS: [&str; 11] = [
    "source",
    "via_share_id",
    "position",
    "watch_ms",
    "video_duration_ms",
    "exit_reason",
    "comment_id",
    "length",
    "share_id",
    "parent_share_id",
    "channel",
];
const DEVICE_FIELDS: [&str; 3] = ["os", "app_version", "country"];
/// Prop keys that are never stored (PII minimisation: comment text).
const DROPPED_PROPS: [&str; 2] = ["text", "comment_text"];

fn known(list: &[&'static str], key: &str) -> Option<&'static str> {
    list.iter().copied().find(|k| *k == key)
}

struct ObjectVisitor {
    fields: &'static [&'static str],
    dropped: &'static [&'static str],
}

impl<'de> Visitor<'de> for ObjectVisitor {
    type Value = LooseObject<'de>;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON object")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> Result<Self::Value, A::Error> {
        let mut obj = LooseObject {
            is_object: true,
            ..Default::default()
        };
        while let Some(key) = m.next_key::<Cow<'de, str>>()? {
            if let Some(k) = known(self.fields, &key) {
                obj.known.insert(k, m.next_value()?);
            } else if self.dropped.contains(&key.as_ref()) {
                m.next_value::<IgnoredAny>()?;
            } else {
                obj.unknown.push((key, m.next_value()?));
            }
        }
        Ok(obj)
    }
    fn visit_unit<E>(self) -> Result<Self::Value, E> {
        Ok(LooseObject {
            is_object: true,
            ..Default::default()
        })
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut s: A) -> Result<Self::Value, A::Error> {
        while s.next_element::<IgnoredAny>()?.is_some() {}
        Ok(LooseObject::default())
    }
    fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
        Ok(LooseObject::default())
    }
    fn visit_i64<E>(self, _: i64) -> Result<Self::Value, E> {
        Ok(LooseObject::default())
    }
    fn visit_u64<E>(self, _: u64) -> Result<Self::Value, E> {
        Ok(LooseObject::default())
    }
    fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
        Ok(LooseObject::default())
    }
    fn visit_str<E>(self, _: &str) -> Result<Self::Value, E> {
        Ok(LooseObject::default())
    }
}

struct Nested(&'static [&'static str], &'static [&'static str]);

impl<'de> de::DeserializeSeed<'de> for Nested {
    type Value = LooseObject<'de>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_any(ObjectVisitor {
            fields: self.0,
            dropped: self.1,
        })
    }
}

/// Marker error text for "the top level is not an object"; mapped to a clear reason.
const NOT_OBJECT: &str = "reelhouse:not-an-object";

impl<'de> Deserialize<'de> for LooseEvent<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = LooseEvent<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str(NOT_OBJECT)
            }
            fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> Result<Self::Value, A::Error> {
                let mut ev = LooseEvent::default();
                while let Some(key) = m.next_key::<Cow<'de, str>>()? {
                    if let Some(k) = known(&TOP_FIELDS, &key) {
                        ev.fields.insert(k, m.next_value()?);
                    } else if key == "props" {
                        ev.props = Some(m.next_value_seed(Nested(&PROP_FIELDS, &DROPPED_PROPS))?);
                    } else if key == "device" {
                        ev.device = Some(m.next_value_seed(Nested(&DEVICE_FIELDS, &[]))?);
                    } else {
                        ev.unknown.push((key, m.next_value()?));
                    }
                }
                Ok(ev)
            }
        }
        d.deserialize_map(V)
    }
}

/// Brings a loose event of version `v` to version `v + 1`.
pub type Upcaster = fn(&mut LooseEvent<'_>) -> Result<(), String>;

/// Parses events, dispatching on `schema_version`. Versions below the current one need a
/// registered chain of upcasters (one per step); newer versions are refused.
#[derive(Debug, Clone, Default)]
pub struct Parser {
    upcasters: BTreeMap<u32, Upcaster>,
}

impl Parser {
    /// A parser for contract v1 with no upcasters (v1 is the first version).
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers the upcaster from `from_version` to `from_version + 1`.
    pub fn with_upcaster(mut self, from_version: u32, f: Upcaster) -> Self {
        self.upcasters.insert(from_version, f);
        self
    }

    /// Parses and validates one event.
    pub fn parse(&self, bytes: &[u8]) -> Result<Event, Rejection> {
        let mut de = serde_json::Deserializer::from_slice(bytes);
        let loose = match LooseEvent::deserialize(&mut de).and_then(|l| de.end().map(|_| l)) {
            Ok(l) => l,
            Err(e) => {
                let reason = if e.to_string().contains(NOT_OBJECT) {
                    "event must be a JSON object".to_string()
                } else {
                    format!("malformed JSON: {}", json_error_text(&e))
                };
                return Err(Rejection {
                    event_id: None,
                    reason,
                });
            }
        };
        self.upcast_and_validate(loose)
    }

    fn upcast_and_validate(&self, mut loose: LooseEvent<'_>) -> Result<Event, Rejection> {
        let event_id = id_string(loose.fields.get("event_id")).ok().flatten();
        let reject = |reason: String| Rejection {
            event_id: event_id.clone(),
            reason,
        };
        let version = match loose.fields.get("schema_version") {
            None | Some(Scalar::Null) => CURRENT_SCHEMA_VERSION,
            Some(Scalar::U64(v)) if *v <= u32::MAX as u64 => *v as u32,
            Some(_) => return Err(reject("schema_version must be a positive integer".into())),
        };
        if version > CURRENT_SCHEMA_VERSION {
            return Err(reject(format!(
                "schema_version {version} is newer than this server understands \
                 (up to {CURRENT_SCHEMA_VERSION}); upgrade the server"
            )));
        }
        let mut v = version;
        while v < CURRENT_SCHEMA_VERSION {
            let Some(up) = self.upcasters.get(&v) else {
                return Err(reject(format!("schema_version {v} is not supported")));
            };
            up(&mut loose)
                .map_err(|e| reject(format!("upcasting from schema_version {v}: {e}")))?;
            v += 1;
        }
        validate(&loose, version).map_err(reject)
    }
}

/// Parses and validates one event with the default [`Parser`].
pub fn parse_event(bytes: &[u8]) -> Result<Event, Rejection> {
    static PARSER: std::sync::OnceLock<Parser> = std::sync::OnceLock::new();
    PARSER.get_or_init(Parser::new).parse(bytes)
}

/// serde_json's message without anything quoted from the input (only positions).
fn json_error_text(e: &serde_json::Error) -> String {
    use serde_json::error::Category;
    let what = match e.classify() {
        Category::Eof => "unexpected end of input",
        Category::Syntax => "syntax error",
        Category::Data => "invalid value",
        Category::Io => "read error",
    };
    format!("{what} at line {} column {}", e.line(), e.column())
}

fn validate(l: &LooseEvent<'_>, version: u32) -> Result<Event, String> {
    let f = |name: &str| l.fields.get(name);
    let event_id = id_string(f("event_id"))
        .map_err(|_| "event_id must be a non-empty string of at most 64 characters".to_string())?
        .ok_or("missing event_id")?;
    let event_type = match f("event_type") {
        None | Some(Scalar::Null) => return Err("missing event_type".into()),
        Some(Scalar::Str(s)) => EventType::parse(s).ok_or_else(unknown_type)?,
        Some(_) => return Err(unknown_type()),
    };
    let t = event_type.as_str();
    let event_time_ms = time(f("event_time"), "event_time")?.ok_or("missing event_time")?;
    let sent_at_ms = time(f("sent_at"), "sent_at")?;
    let user_id = UserId(id_u64(f("user_id"), "user_id")?.ok_or("missing user_id")?);
    let session_id = opt_id_string(f("session_id"), "session_id")?;
    let video_id = id_u64(f("video_id"), "video_id")?.map(VideoId);
    let creator_id = id_u64(f("creator_id"), "creator_id")?.map(CreatorId);
    let view_id = opt_id_string(f("view_id"), "view_id")?;

    if !event_type.is_follow_event() && session_id.is_none() {
        return Err(format!("{t} requires session_id"));
    }
    if event_type.is_video_event() {
        if video_id.is_none() {
            return Err(format!("{t} requires video_id"));
        }
        if creator_id.is_none() {
            return Err(format!("{t} requires creator_id"));
        }
    }
    if event_type.is_follow_event() && creator_id.is_none() {
        return Err(format!("{t} requires creator_id"));
    }
    let is_view = matches!(
        event_type,
        EventType::VideoViewStart | EventType::VideoViewEnd
    );
    if is_view && view_id.is_none() {
        return Err(format!("{t} requires view_id"));
    }

    let empty = LooseObject {
        is_object: true,
        ..Default::default()
    };
    let p = l.props.as_ref().unwrap_or(&empty);
    if !p.is_object {
        return Err("props must be a JSON object".into());
    }
    let pf = |name: &str| p.known.get(name);
    let mut props = Props {
        source: match pf("source") {
            None | Some(Scalar::Null) => None,
            Some(Scalar::Str(s)) => Some(Source::parse(s).ok_or_else(bad_source)?),
            Some(_) => return Err(bad_source()),
        },
        via_share_id: opt_id_string(pf("via_share_id"), "props.via_share_id")?,
        position: non_negative(pf("position"), "props.position")?,
        watch_ms: non_negative(pf("watch_ms"), "props.watch_ms")?,
        video_duration_ms: non_negative(pf("video_duration_ms"), "props.video_duration_ms")?,
        exit_reason: opt_text(pf("exit_reason"), "props.exit_reason")?,
        comment_id: opt_id_string(pf("comment_id"), "props.comment_id")?,
        comment_length: non_negative(pf("length"), "props.length")?,
        share_id: opt_id_string(pf("share_id"), "props.share_id")?,
        parent_share_id: opt_id_string(pf("parent_share_id"), "props.parent_share_id")?,
        channel: opt_text(pf("channel"), "props.channel")?,
    };
    match event_type {
        EventType::VideoViewStart => {
            props.source.get_or_insert(Source::Other);
        }
        EventType::VideoViewEnd => {
            if props.watch_ms.is_none() {
                return Err("video_view_end requires props.watch_ms ≥ 0".into());
            }
            if !matches!(props.video_duration_ms, Some(d) if d > 0) {
                return Err("video_view_end requires props.video_duration_ms > 0".into());
            }
        }
        EventType::Comment if props.comment_id.is_none() => {
            return Err("comment requires props.comment_id".into());
        }
        EventType::Share if props.share_id.is_none() => {
            return Err("share requires props.share_id".into());
        }
        _ => {}
    }

    let d = l.device.as_ref().unwrap_or(&empty);
    if !d.is_object {
        return Err("device must be a JSON object {os, app_version, country}".into());
    }
    let device = Device {
        os: opt_text(d.known.get("os"), "device.os")?,
        app_version: opt_text(d.known.get("app_version"), "device.app_version")?,
        country: match d.known.get("country") {
            None | Some(Scalar::Null) => None,
            Some(Scalar::Str(s)) if s.len() == 2 && s.bytes().all(|b| b.is_ascii_alphabetic()) => {
                Some(s.to_ascii_uppercase())
            }
            Some(_) => {
                return Err(
                    "device.country must be an ISO 3166-1 alpha-2 code such as \"US\"".into(),
                )
            }
        },
    };

    Ok(Event {
        event_id,
        event_type,
        event_time_ms,
        sent_at_ms,
        user_id,
        session_id,
        video_id,
        creator_id,
        view_id,
        schema_version: version,
        device,
        props,
        extra: extra_json(l),
    })
}

fn unknown_type() -> String {
    let names: Vec<&str> = EventType::ALL.iter().map(|t| t.as_str()).collect();
    format!("unknown event_type; expected one of {}", names.join(", "))
}

fn bad_source() -> String {
    let names: Vec<&str> = Source::ALL.iter().map(|t| t.as_str()).collect();
    format!("props.source must be one of {}", names.join(", "))
}

/// A string id (≤ 64 chars). Integers are accepted and kept as their decimal text.
fn id_string(v: Option<&Scalar<'_>>) -> Result<Option<String>, ()> {
    match v {
        None | Some(Scalar::Null) => Ok(None),
        Some(Scalar::Str(s)) if !s.is_empty() && s.chars().count() <= MAX_ID_LEN => {
            Ok(Some(s.to_string()))
        }
        Some(Scalar::U64(n)) => Ok(Some(n.to_string())),
        Some(Scalar::I64(n)) => Ok(Some(n.to_string())),
        Some(_) => Err(()),
    }
}

fn opt_id_string(v: Option<&Scalar<'_>>, name: &str) -> Result<Option<String>, String> {
    id_string(v).map_err(|_| format!("{name} must be a non-empty string of at most 64 characters"))
}

/// Free-text-ish short fields (os, app version, channel, exit reason): ≤ 256 chars.
fn opt_text(v: Option<&Scalar<'_>>, name: &str) -> Result<Option<String>, String> {
    match v {
        None | Some(Scalar::Null) => Ok(None),
        Some(Scalar::Str(s)) if s.chars().count() <= 256 => Ok(Some(s.to_string())),
        Some(Scalar::U64(n)) => Ok(Some(n.to_string())),
        Some(Scalar::I64(n)) => Ok(Some(n.to_string())),
        Some(Scalar::F64(n)) => Ok(Some(n.to_string())),
        Some(_) => Err(format!("{name} must be a string of at most 256 characters")),
    }
}

/// A u64 id as a JSON number or decimal string, within Delta's `long` range.
fn id_u64(v: Option<&Scalar<'_>>, name: &str) -> Result<Option<u64>, String> {
    let bad = || {
        format!(
            "{name} must be a non-negative integer ≤ {MAX_ID}, as a JSON number or decimal string"
        )
    };
    let n = match v {
        None | Some(Scalar::Null) => return Ok(None),
        Some(Scalar::U64(n)) => *n,
        Some(Scalar::Str(s)) if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) => {
            s.parse::<u64>().map_err(|_| bad())?
        }
        Some(_) => return Err(bad()),
    };
    if n > MAX_ID {
        return Err(bad());
    }
    Ok(Some(n))
}

/// A non-negative integer; finite non-negative floats are rounded (JS clients send them).
fn non_negative(v: Option<&Scalar<'_>>, name: &str) -> Result<Option<i64>, String> {
    match v {
        None | Some(Scalar::Null) => Ok(None),
        Some(Scalar::U64(n)) if *n <= i64::MAX as u64 => Ok(Some(*n as i64)),
        Some(Scalar::F64(x)) if x.is_finite() && *x >= 0.0 && *x < 9.0e15 => {
            Ok(Some(x.round() as i64))
        }
        Some(_) => Err(format!("{name} must be an integer ≥ 0")),
    }
}

/// Earliest and latest accepted event times: 2000-01-01 and 2100-01-01 (UTC). A number far
/// below the lower bound is usually epoch *seconds* sent by mistake.
const MIN_TIME_MS: i64 = 946_684_800_000;
const MAX_TIME_MS: i64 = 4_102_444_800_000;

fn time(v: Option<&Scalar<'_>>, name: &str) -> Result<Option<i64>, String> {
    let ms = match v {
        None | Some(Scalar::Null) => return Ok(None),
        Some(Scalar::U64(n)) => i64::try_from(*n).unwrap_or(i64::MAX),
        Some(Scalar::I64(n)) => *n,
        Some(Scalar::Str(s)) => chrono::DateTime::parse_from_rfc3339(s)
            .map_err(|_| {
                format!("{name} must be an RFC 3339 string or integer epoch milliseconds")
            })?
            .timestamp_millis(),
        Some(_) => {
            return Err(format!(
                "{name} must be an RFC 3339 string or integer epoch milliseconds"
            ))
        }
    };
    if !(MIN_TIME_MS..MAX_TIME_MS).contains(&ms) {
        return Err(format!(
            "{name} must be between 2000-01-01 and 2100-01-01 (epoch milliseconds, not seconds)"
        ));
    }
    Ok(Some(ms))
}

/// Unknown fields as one JSON object text; values are kept byte for byte.
fn extra_json(l: &LooseEvent<'_>) -> Option<String> {
    let nested = |o: &Option<LooseObject<'_>>| o.as_ref().map_or(0, |o| o.unknown.len());
    if l.unknown.is_empty() && nested(&l.props) == 0 && nested(&l.device) == 0 {
        return None;
    }
    let mut out = String::from("{");
    let mut first = true;
    let mut push = |out: &mut String, k: &str, v: &str| {
        if !std::mem::take(&mut first) {
            out.push(',');
        }
        out.push_str(&serde_json::to_string(k).unwrap_or_default());
        out.push(':');
        out.push_str(v);
    };
    for (k, v) in &l.unknown {
        push(&mut out, k, v.get());
    }
    for (name, obj) in [("props", &l.props), ("device", &l.device)] {
        if let Some(o) = obj.as_ref().filter(|o| !o.unknown.is_empty()) {
            let mut inner = String::from("{");
            for (i, (k, v)) in o.unknown.iter().enumerate() {
                if i > 0 {
                    inner.push(',');
                }
                inner.push_str(&serde_json::to_string(k.as_ref()).unwrap_or_default());
                inner.push(':');
                inner.push_str(v.get());
            }
            inner.push('}');
            push(&mut out, name, &inner);
        }
    }
    out.push('}');
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const VIEW_END: &str = r#"{"event_id":"e-1","event_type":"video_view_end","event_time":"2026-11-20T10:00:00Z","user_id":"42","session_id":"s1","video_id":7,"creator_id":"9","view_id":"v1","props":{"watch_ms":1500,"video_duration_ms":3000,"mood":"happy"},"device":{"os":"ios","country":"se","model":"x"},"campaign":{"a":[1,2]}}"#;

    #[test]
    fn parses_mixed_encodings_and_keeps_unknown_fields() {
        let e = parse_event(VIEW_END.as_bytes()).unwrap();
        assert_eq!(e.user_id, UserId(42));
        assert_eq!(e.creator_id, Some(CreatorId(9)));
        assert_eq!(e.event_time_ms, 1_795_168_800_000); // 2026-11-20T10:00:00Z
        assert_eq!(e.props.watch_ms, Some(1500));
        assert_eq!(e.device.country.as_deref(), Some("SE"));
        let extra: serde_json::Value = serde_json::from_str(e.extra.as_deref().unwrap()).unwrap();
        assert_eq!(
            extra,
            serde_json::json!({"campaign":{"a":[1,2]},"props":{"mood":"happy"},"device":{"model":"x"}})
        );
    }

    fn reason(line: &str) -> String {
        parse_event(line.as_bytes()).unwrap_err().reason
    }

    #[test]
    fn specific_reasons() {
        let base = VIEW_END.replace(r#""watch_ms":1500"#, r#""watch_ms":-1"#);
        assert_eq!(reason(&base), "props.watch_ms must be an integer ≥ 0");
        let no_watch = VIEW_END.replace(r#""watch_ms":1500,"#, "");
        assert_eq!(
            reason(&no_watch),
            "video_view_end requires props.watch_ms ≥ 0"
        );
        let no_dur = VIEW_END.replace(r#""video_duration_ms":3000"#, r#""video_duration_ms":0"#);
        assert_eq!(
            reason(&no_dur),
            "video_view_end requires props.video_duration_ms > 0"
        );
        assert!(
            reason(&VIEW_END.replace("video_view_end", "poke")).starts_with("unknown event_type")
        );
        assert_eq!(
            reason(&VIEW_END.replace(r#""user_id":"42","#, "")),
            "missing user_id"
        );
        assert!(reason(&VIEW_END.replace(r#""42""#, r#""-4""#)).starts_with("user_id must be"));
        assert_eq!(
            reason(&VIEW_END.replace(r#""session_id":"s1","#, "")),
            "video_view_end requires session_id"
        );
        assert!(
            reason(&VIEW_END.replace("2026-11-20T10:00:00Z", "yesterday"))
                .starts_with("event_time must be an RFC 3339")
        );
        assert!(reason("[1,2]").contains("JSON object"));
        assert!(reason(r#"{"event_id":"#).starts_with("malformed JSON"));
        assert!(
            reason(&VIEW_END.replace(r#""country":"se""#, r#""country":"Sweden""#))
                .starts_with("device.country")
        );
        let newer = VIEW_END.replace(
            r#""event_id":"e-1","#,
            r#""event_id":"e-1","schema_version":2,"#,
        );
        assert!(reason(&newer).contains("newer"));
    }

    #[test]
    fn rejection_keeps_event_id_and_never_echoes_values() {
        let line = VIEW_END.replace(r#""42""#, r#""secret-user""#);
        let r = parse_event(line.as_bytes()).unwrap_err();
        assert_eq!(r.event_id.as_deref(), Some("e-1"));
        assert!(!r.reason.contains("secret"));
    }

    #[test]
    fn follow_needs_no_session_and_comment_text_is_dropped() {
        let f = r#"{"event_id":"f","event_type":"follow_creator","event_time":1763632800000,"user_id":1,"creator_id":2}"#;
        assert!(parse_event(f.as_bytes()).is_ok());
        let c = r#"{"event_id":"c","event_type":"comment","event_time":1763632800000,"user_id":1,"session_id":"s","video_id":3,"creator_id":2,"props":{"comment_id":"c1","text":"my phone is 555"}}"#;
        let e = parse_event(c.as_bytes()).unwrap();
        assert_eq!(e.extra, None);
    }

    #[test]
    fn upcaster_chain_runs_for_old_versions() {
        // A hypothetical v0 called the time field `ts`.
        fn v0_to_v1(l: &mut LooseEvent<'_>) -> Result<(), String> {
            let pos = l
                .unknown
                .iter()
                .position(|(k, _)| k == "ts")
                .ok_or("v0 requires ts")?;
            let (_, raw) = l.unknown.remove(pos);
            let ms: u64 = serde_json::from_str(raw.get()).map_err(|_| "ts must be epoch ms")?;
            l.fields.insert("event_time", Scalar::U64(ms));
            Ok(())
        }
        let line = r#"{"schema_version":0,"event_id":"x","event_type":"session_start","ts":1763632800000,"user_id":1,"session_id":"s"}"#;
        assert!(parse_event(line.as_bytes())
            .unwrap_err()
            .reason
            .contains("not supported"));
        let p = Parser::new().with_upcaster(0, v0_to_v1);
        let e = p.parse(line.as_bytes()).unwrap();
        assert_eq!(e.event_time_ms, 1_763_632_800_000);
        assert_eq!(e.schema_version, 0);
        assert_eq!(e.extra, None);
    }

    #[test]
    fn split_ndjson_and_arrays() {
        let body = b"{\"a\":1}\r\n\n  {bad\n{\"b\":2}\n";
        assert_eq!(split_body(body).unwrap().len(), 3);
        let arr = b" [ {\"a\":1}, 3, {\"b\":[1]} ]";
        let items = split_body(arr).unwrap();
        assert_eq!(items, vec![&b"{\"a\":1}"[..], b"3", b"{\"b\":[1]}"]);
        assert!(split_body(b"[{\"a\":1},").is_err());
    }

    proptest::proptest! {
        #[test]
        fn never_panics_on_arbitrary_bytes(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..512)) {
            let _ = parse_event(&bytes);
            if let Ok(items) = split_body(&bytes) {
                for i in items { let _ = parse_event(i); }
            }
        }

        #[test]
        fn never_panics_on_json_shaped_noise(s in r#"\{("[a-z_]{1,12}":(-?[0-9]{1,20}|"[^"\\]{0,20}"|null|\{\}|\[\]|true),?){0,12}\}"#) {
            let _ = parse_event(s.as_bytes());
        }
    }
}
