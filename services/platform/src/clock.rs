//! Time as services keep it and as the contract carries it.

use time::OffsetDateTime;

/// The current time, to the millisecond: what stores keep, so that a first answer and a
/// repeated one (a retry answered from the store) agree.
pub fn now() -> OffsetDateTime {
    let now = OffsetDateTime::now_utc();
    now.replace_nanosecond(now.nanosecond() / 1_000_000 * 1_000_000)
        .unwrap_or(now)
}

/// A time as the contract carries it.
pub fn timestamp(time: OffsetDateTime) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: time.unix_timestamp(),
        nanos: i32::try_from(time.nanosecond()).unwrap_or(0),
    }
}

/// A time the contract carried; `None` when it is out of range.
pub fn from_timestamp(t: &prost_types::Timestamp) -> Option<OffsetDateTime> {
    OffsetDateTime::from_unix_timestamp(t.seconds)
        .ok()
        .and_then(|time| time.replace_nanosecond(u32::try_from(t.nanos).ok()?).ok())
}
