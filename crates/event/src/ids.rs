//! Newtype ids, so a user id can never be passed where a video id is expected.
//!
//! The contract says ids are u64; Delta Lake has no unsigned integer type, so ids are stored as
//! `long` and the accepted range is `0..=i64::MAX` (see `docs/event-contract.md`).

use std::fmt;

macro_rules! id_type {
    ($(#[$m:meta])* $name:ident) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(pub u64);

        impl $name {
            /// The value as stored in Delta (`long`); always non-negative.
            pub fn as_i64(self) -> i64 {
                self.0 as i64
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.fmt(f)
            }
        }
    };
}

id_type!(
    /// The acting user.
    UserId
);
id_type!(
    /// A video.
    VideoId
);
id_type!(
    /// A creator (owner of videos, target of follows).
    CreatorId
);

/// Largest id accepted (Delta `long`).
pub const MAX_ID: u64 = i64::MAX as u64;
