//! The gateway's per-member limits: a rate of calls and stream messages, budgets of calls and of
//! long-lived streams in flight (each with a share of the gateway's capacity that no one member
//! can take), and a cap on deadlines.

use std::collections::HashMap;
use std::future::Future;
use std::num::NonZeroU32;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use http::{HeaderMap, HeaderValue};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

/// The gRPC deadline header.
pub const GRPC_TIMEOUT: &str = "grpc-timeout";

/// A token bucket per member institution (its subsystems share it), keyed by `CLASS/CODE`. A
/// call takes one token, and so does every further message a caller sends on a stream.
pub struct MemberRates {
    limiter: DefaultKeyedRateLimiter<Arc<str>>,
    per_second: u32,
    paces: Mutex<HashMap<Arc<str>, Arc<Pace>>>,
}

impl MemberRates {
    /// `per_second` calls a second on average, bursts of up to `burst`.
    pub fn new(per_second: u32, burst: u32) -> Self {
        let rate = NonZeroU32::new(per_second.max(1)).unwrap_or(NonZeroU32::MIN);
        let burst = NonZeroU32::new(burst.max(1)).unwrap_or(NonZeroU32::MIN);
        Self {
            limiter: RateLimiter::keyed(Quota::per_second(rate).allow_burst(burst)),
            per_second,
            paces: Mutex::new(HashMap::new()),
        }
    }

    /// Takes one call from the institution's bucket, or says how long until one is free.
    pub fn check(&self, institution: &Arc<str>) -> Result<(), Duration> {
        self.limiter.check_key(institution).map_err(|not_until| {
            not_until.wait_time_from(governor::clock::Clock::now(
                &governor::clock::DefaultClock::default(),
            ))
        })
    }

    /// The configured average rate.
    pub fn per_second(&self) -> u32 {
        self.per_second
    }

    /// The pace of an institution's connections, shared by all of them.
    pub fn pace(&self, institution: &Arc<str>) -> Arc<Pace> {
        let mut paces = self.paces.lock().unwrap_or_else(|p| p.into_inner());
        paces.entry(institution.clone()).or_default().clone()
    }

    /// Forgets buckets that are full again, and paces no connection holds, so that memory
    /// follows the active members.
    pub fn forget_idle(&self) {
        self.limiter.retain_recent();
        let mut paces = self.paces.lock().unwrap_or_else(|p| p.into_inner());
        paces.retain(|_, pace| Arc::strong_count(pace) > 1);
    }
}

/// The shortest time a member over its rate has its connections left unread.
pub const MIN_HOLD: Duration = Duration::from_millis(25);

/// When a member institution's connections may be read again: set when the member is over its
/// rate, so that a member flooding the gateway with calls it will only be refused is held back
/// by TCP itself (its connections are not read until its bucket has a token again) instead of
/// costing the gateway a refusal per call, which other members would pay for in latency.
#[derive(Default)]
pub struct Pace {
    /// Nanoseconds after [`Pace::epoch`]; 0: not held.
    until: AtomicU64,
}

impl Pace {
    fn epoch() -> Instant {
        static EPOCH: OnceLock<Instant> = OnceLock::new();
        *EPOCH.get_or_init(Instant::now)
    }

    /// Holds the member's connections for `wait` from now (or longer, if already held longer).
    pub fn hold(&self, wait: Duration) {
        let until = (Instant::now() + wait).duration_since(Self::epoch());
        let nanos = u64::try_from(until.as_nanos()).unwrap_or(u64::MAX);
        self.until.fetch_max(nanos, Ordering::Relaxed);
    }

    /// Until when the member's connections are held, if they are now.
    pub fn held_until(&self) -> Option<Instant> {
        let nanos = self.until.load(Ordering::Relaxed);
        if nanos == 0 {
            return None;
        }
        let until = Self::epoch() + Duration::from_nanos(nanos);
        (until > Instant::now()).then_some(until)
    }
}

/// A connection read only when its member is not held by its [`Pace`].
pub struct Paced<S> {
    inner: S,
    pace: Arc<Pace>,
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<S> Paced<S> {
    /// Wraps a connection of the member whose pace is `pace`.
    pub fn new(inner: S, pace: Arc<Pace>) -> Self {
        Self {
            inner,
            pace,
            sleep: None,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Paced<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        while let Some(until) = this.pace.held_until() {
            let sleep = this
                .sleep
                .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(until)));
            if sleep.deadline() != until {
                sleep.as_mut().reset(until);
            }
            ready!(sleep.as_mut().poll(cx));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Paced<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// A cap on the calls each member institution has in flight at once, so that one member's
/// streams cannot take the whole gateway's capacity.
pub struct MemberSlots {
    per_member: usize,
    slots: Mutex<HashMap<Arc<str>, Arc<Semaphore>>>,
}

impl MemberSlots {
    /// `per_member` calls at once for each institution.
    pub fn new(per_member: usize) -> Self {
        Self {
            per_member: per_member.max(1),
            slots: Mutex::new(HashMap::new()),
        }
    }

    /// The slots of one institution, shared by all its connections.
    pub fn of(&self, institution: &Arc<str>) -> Arc<Semaphore> {
        let mut slots = self
            .slots
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        slots
            .entry(institution.clone())
            .or_insert_with(|| Arc::new(Semaphore::new(self.per_member)))
            .clone()
    }

    /// The cap.
    pub fn per_member(&self) -> usize {
        self.per_member
    }

    /// Forgets institutions no connection refers to any more.
    pub fn forget_idle(&self) {
        let mut slots = self
            .slots
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        slots.retain(|_, slot| Arc::strong_count(slot) > 1);
    }
}

/// A kind of capacity in flight (calls, or long-lived streams): a cap per member institution and
/// one across the gateway.
///
/// The last quarter of the gateway's capacity is kept for light users: a member that already
/// holds an eighth of its own cap gets no more once three quarters are taken. So a few heavy
/// members (or many members each at its cap) cannot exhaust it, and a member making a handful
/// of calls still gets in.
pub struct Budget {
    /// What is counted, for messages: "calls" or "streams".
    pub what: &'static str,
    global: Arc<Semaphore>,
    reserve: usize,
    light: usize,
    members: MemberSlots,
}

/// The places a call holds in a budget until it ends.
pub struct BudgetPermit {
    _member: OwnedSemaphorePermit,
    _global: OwnedSemaphorePermit,
}

/// Why a budget refused a call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exhausted {
    /// The member holds its own cap.
    Member,
    /// The gateway is at capacity (for this member).
    Gateway,
}

impl Budget {
    /// `global` in flight across the gateway, `per_member` for each institution.
    pub fn new(what: &'static str, global: usize, per_member: usize) -> Self {
        let global = global.max(1);
        let members = MemberSlots::new(per_member);
        Self {
            what,
            global: Arc::new(Semaphore::new(global)),
            reserve: global / 4,
            light: (members.per_member() / 8).max(1),
            members,
        }
    }

    /// The places of one institution, shared by all its connections.
    pub fn of(&self, institution: &Arc<str>) -> Arc<Semaphore> {
        self.members.of(institution)
    }

    /// The cap of one member.
    pub fn per_member(&self) -> usize {
        self.members.per_member()
    }

    /// Takes a place for one call of the member whose places are `member`.
    pub fn admit(&self, member: &Arc<Semaphore>) -> Result<BudgetPermit, Exhausted> {
        let held = self.members.per_member() - member.available_permits();
        if self.global.available_permits() <= self.reserve && held >= self.light {
            return Err(Exhausted::Gateway);
        }
        let own = member
            .clone()
            .try_acquire_owned()
            .map_err(|_| Exhausted::Member)?;
        let global = self
            .global
            .clone()
            .try_acquire_owned()
            .map_err(|_| Exhausted::Gateway)?;
        Ok(BudgetPermit {
            _member: own,
            _global: global,
        })
    }

    /// Forgets institutions no connection refers to any more.
    pub fn forget_idle(&self) {
        self.members.forget_idle();
    }
}

/// Parses a `grpc-timeout` value: up to 8 digits and a unit (H, M, S, m, u, n).
pub fn parse_timeout(value: &str) -> Option<Duration> {
    if value.len() < 2 || value.len() > 9 {
        return None;
    }
    let (digits, unit) = value.split_at(value.len() - 1);
    let amount: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(amount.checked_mul(3600)?),
        "M" => Duration::from_secs(amount.checked_mul(60)?),
        "S" => Duration::from_secs(amount),
        "m" => Duration::from_millis(amount),
        "u" => Duration::from_micros(amount),
        "n" => Duration::from_nanos(amount),
        _ => return None,
    })
}

/// Formats a duration as a `grpc-timeout` value in milliseconds.
fn format_timeout(duration: Duration) -> HeaderValue {
    let millis = duration.as_millis().clamp(1, 99_999_999);
    HeaderValue::from_str(&format!("{millis}m")).unwrap_or(HeaderValue::from_static("1000m"))
}

/// The caller's own deadline, if it sent a valid one.
pub fn requested_deadline(headers: &HeaderMap) -> Option<Duration> {
    headers
        .get(GRPC_TIMEOUT)
        .and_then(|v| v.to_str().ok())
        .and_then(parse_timeout)
}

/// Holds the caller's deadline to at most `cap`, writing the effective one into the headers,
/// and returns it. A missing or malformed deadline becomes the cap.
pub fn cap_deadline(headers: &mut HeaderMap, cap: Duration) -> Duration {
    match requested_deadline(headers) {
        Some(requested) if requested <= cap => requested,
        _ => {
            headers.insert(GRPC_TIMEOUT, format_timeout(cap));
            cap
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deadlines_are_capped() {
        let cap = Duration::from_secs(30);
        let mut headers = HeaderMap::new();
        assert_eq!(cap_deadline(&mut headers, cap), cap);
        assert_eq!(headers[GRPC_TIMEOUT], "30000m");

        headers.insert(GRPC_TIMEOUT, HeaderValue::from_static("5S"));
        assert_eq!(cap_deadline(&mut headers, cap), Duration::from_secs(5));
        assert_eq!(headers[GRPC_TIMEOUT], "5S");

        headers.insert(GRPC_TIMEOUT, HeaderValue::from_static("2H"));
        assert_eq!(cap_deadline(&mut headers, cap), cap);
        assert_eq!(headers[GRPC_TIMEOUT], "30000m");

        headers.insert(GRPC_TIMEOUT, HeaderValue::from_static("garbage"));
        assert_eq!(cap_deadline(&mut headers, cap), cap);
        assert_eq!(headers[GRPC_TIMEOUT], "30000m");
    }

    #[test]
    fn timeouts_parse_by_the_grpc_rules() {
        assert_eq!(parse_timeout("100m"), Some(Duration::from_millis(100)));
        assert_eq!(parse_timeout("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_timeout("123456789S"), None);
        assert_eq!(parse_timeout("10x"), None);
        assert_eq!(parse_timeout("m"), None);
    }

    #[test]
    fn members_have_slots_of_their_own() {
        let slots = MemberSlots::new(1);
        let vsaa: Arc<str> = "GOV/VSAA".into();
        let held = slots.of(&vsaa).try_acquire_owned().unwrap();
        assert!(
            slots.of(&vsaa).try_acquire_owned().is_err(),
            "one call at a time"
        );
        assert!(slots.of(&"GOV/VID".into()).try_acquire_owned().is_ok());
        drop(held);
        assert!(slots.of(&vsaa).try_acquire_owned().is_ok());
        slots.forget_idle();
        assert!(slots.slots.lock().unwrap().is_empty());
    }

    #[test]
    fn no_member_takes_the_reserve() {
        let budget = Budget::new("calls", 8, 4);
        let heavy: Vec<_> = (0..3)
            .map(|i| budget.of(&format!("GOV/H{i}").into()))
            .collect();
        let mut held = Vec::new();
        // Heavy members fill three quarters and are then refused, though their own caps are
        // not reached.
        for member in heavy.iter().cycle().take(6) {
            held.push(budget.admit(member).unwrap());
        }
        assert_eq!(budget.admit(&heavy[0]).err(), Some(Exhausted::Gateway));
        // A member with nothing in flight still gets in.
        let light = budget.of(&"GOV/L".into());
        held.push(budget.admit(&light).unwrap());
        assert_eq!(budget.admit(&light).err(), Some(Exhausted::Gateway));
        let own = Budget::new("streams", 100, 2);
        let member = own.of(&"GOV/X".into());
        let _a = own.admit(&member).unwrap();
        let _b = own.admit(&member).unwrap();
        assert_eq!(own.admit(&member).err(), Some(Exhausted::Member));
    }

    #[test]
    fn a_member_past_its_burst_waits() {
        let rates = MemberRates::new(1, 2);
        let vsaa: Arc<str> = "GOV/VSAA".into();
        let vid: Arc<str> = "GOV/VID".into();
        assert!(rates.check(&vsaa).is_ok());
        assert!(rates.check(&vsaa).is_ok());
        assert!(rates.check(&vsaa).is_err(), "past the burst");
        assert!(rates.check(&vid).is_ok(), "other members are not affected");
    }
}
