//! The bodies of a forwarded call. Requests pass through [`Metered`], which counts the gRPC
//! messages a caller sends on a stream against its member's rate (slowing the stream down, not
//! failing it, when the rate is used up) and bounds their size; responses pass through
//! [`Guarded`], which holds the call's places under the limits until the response has ended.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use http::HeaderValue;
use http_body::{Body as HttpBody, Frame, SizeHint};
use hyper::body::{Bytes, Incoming};
use onestop_platform::metrics::{CallRecord, Recorded};
use tokio::sync::Notify;
use tokio::time::{Instant, Sleep};

use crate::limits::{BudgetPermit, MemberRates};

/// The calls of one connection: how many were started, how many are running, and when the
/// last one ended, for the connection's idle and first-call timeouts.
pub struct Activity {
    started: AtomicU64,
    running: AtomicUsize,
    /// Milliseconds since `epoch` at which the connection last had no call running.
    quiet_since_ms: AtomicU64,
    epoch: Instant,
    /// Woken when the first call starts.
    pub first_call: Notify,
    /// Woken when a call ends.
    pub call_ended: Notify,
}

impl Activity {
    /// A connection that has just been accepted.
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            started: AtomicU64::new(0),
            running: AtomicUsize::new(0),
            quiet_since_ms: AtomicU64::new(0),
            epoch: Instant::now(),
            first_call: Notify::new(),
            call_ended: Notify::new(),
        })
    }

    /// Marks a call as started; it runs until the guard is dropped.
    pub fn begin(self: &Arc<Self>) -> CallGuard {
        self.running.fetch_add(1, Ordering::AcqRel);
        if self.started.fetch_add(1, Ordering::AcqRel) == 0 {
            self.first_call.notify_one();
        }
        CallGuard {
            activity: self.clone(),
        }
    }

    /// Whether any call has been started.
    pub fn any_call(&self) -> bool {
        self.started.load(Ordering::Acquire) > 0
    }

    /// When the connection became idle, or `None` while a call runs.
    pub fn idle_since(&self) -> Option<Instant> {
        if self.running.load(Ordering::Acquire) > 0 {
            return None;
        }
        let ms = self.quiet_since_ms.load(Ordering::Acquire);
        Some(self.epoch + Duration::from_millis(ms))
    }
}

/// A running call of a connection.
pub struct CallGuard {
    activity: Arc<Activity>,
}

impl Drop for CallGuard {
    fn drop(&mut self) {
        let now = u64::try_from(self.activity.epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.activity.quiet_since_ms.store(now, Ordering::Release);
        self.activity.running.fetch_sub(1, Ordering::AcqRel);
        self.activity.call_ended.notify_one();
    }
}

/// A response body that holds the call's places (in the connection's activity and in the
/// member's and the gateway's budgets) until the call has finished, notes its status from the
/// trailers, and when it ends counts it and writes the call's one log line.
pub struct Guarded<B> {
    body: Recorded<B>,
    _call: CallGuard,
    _permit: Option<BudgetPermit>,
    log: CallLog,
}

/// What a call's log line and span need at its end.
pub struct CallLog {
    /// The member system.
    pub member: Arc<str>,
    /// The call's trace id, as the caller got it.
    pub trace_id: Option<HeaderValue>,
    /// The call's span, open until the answer ends (a stream's lasts as long as the stream).
    pub span: tracing::Span,
    /// Why the gateway refused the call, if it did.
    pub refused: Option<Arc<str>>,
}

impl<B> Guarded<B> {
    /// Wraps `body`, holding `call`, `permit` and the call's span for as long as it lives.
    pub fn new(
        body: B,
        call: CallGuard,
        permit: Option<BudgetPermit>,
        record: CallRecord,
        log: CallLog,
    ) -> Self {
        Self {
            body: Recorded::new(body, record),
            _call: call,
            _permit: permit,
            log,
        }
    }
}

/// A duration in milliseconds, to whole microseconds: a log line shows `1234.567`, not fifteen
/// digits of floating-point noise.
fn millis(took: Duration) -> f64 {
    took.as_micros() as f64 / 1000.0
}

impl<B> Drop for Guarded<B> {
    fn drop(&mut self) {
        // The call's one line; its metrics are recorded as the body drops, right after.
        if let Some(code) = self.body.record().code() {
            onestop_platform::telemetry::record_status(&self.log.span, code);
        }
        let log = &self.log;
        if let Some(reason) = &log.refused
            && !crate::logs::refusals().admit(&log.member, reason)
        {
            // Counted into the second's summary line instead.
            return;
        }
        let (service, method, code, took) = self.body.record().describe();
        let trace_id = log
            .trace_id
            .as_ref()
            .and_then(|value| value.to_str().ok())
            .unwrap_or("");
        tracing::info!(
            target: "onestop_gateway::call",
            member = %log.member,
            method = %format_args!("{service}/{method}"),
            status = code,
            reason = log.refused.as_deref().unwrap_or(""),
            duration_ms = millis(took),
            trace_id,
            "call"
        );
    }
}

impl<B: HttpBody + Unpin> HttpBody for Guarded<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// Why a request body was cut off.
#[derive(Debug, thiserror::Error)]
pub enum MeterError {
    /// The caller's connection failed.
    #[error(transparent)]
    Body(#[from] hyper::Error),
    /// A message was larger than allowed.
    #[error("a message of {0} bytes is over the limit of {1} bytes")]
    TooLarge(usize, usize),
}

/// Where a reader of gRPC's length-prefixed messages is in the byte stream.
#[derive(Default)]
struct Framing {
    /// Bytes of the current message's 5-byte prefix seen so far.
    prefix: [u8; 5],
    prefix_len: usize,
    /// Bytes of the current message's payload still to come.
    remaining: usize,
}

impl Framing {
    /// Reads one chunk: returns how many messages start in it, or the declared length of the
    /// first message longer than `max`.
    fn scan(&mut self, mut data: &[u8], max: usize) -> Result<u64, usize> {
        let mut started = 0;
        while !data.is_empty() {
            if self.remaining > 0 {
                let take = self.remaining.min(data.len());
                self.remaining -= take;
                data = &data[take..];
                continue;
            }
            let take = (5 - self.prefix_len).min(data.len());
            self.prefix[self.prefix_len..self.prefix_len + take].copy_from_slice(&data[..take]);
            self.prefix_len += take;
            data = &data[take..];
            if self.prefix_len == 5 {
                self.prefix_len = 0;
                let [_, a, b, c, d] = self.prefix;
                let length = u32::from_be_bytes([a, b, c, d]) as usize;
                if length > max {
                    return Err(length);
                }
                self.remaining = length;
                started += 1;
            }
        }
        Ok(started)
    }
}

/// A request body whose gRPC messages are counted (every message after the first takes a token
/// from the member's rate; the first was paid for by the call) and bounded in size.
pub struct Metered {
    body: Incoming,
    rates: Arc<MemberRates>,
    institution: Arc<str>,
    max_message: usize,
    framing: Framing,
    messages: u64,
    /// Tokens owed for messages in `held`, and the frame held until they are paid.
    owed: u64,
    held: Option<Frame<Bytes>>,
    wait: Option<Pin<Box<Sleep>>>,
}

impl Metered {
    /// Meters `body` against the rate of `institution`.
    pub fn new(
        body: Incoming,
        rates: Arc<MemberRates>,
        institution: Arc<str>,
        max_message: usize,
    ) -> Self {
        Self {
            body,
            rates,
            institution,
            max_message,
            framing: Framing::default(),
            messages: 0,
            owed: 0,
            held: None,
            wait: None,
        }
    }

    /// Counts the messages that start in a chunk; all but the call's first are owed.
    fn count(&mut self, data: &[u8]) -> Result<(), MeterError> {
        let started = self
            .framing
            .scan(data, self.max_message)
            .map_err(|length| MeterError::TooLarge(length, self.max_message))?;
        let paid = u64::from(self.messages == 0 && started > 0);
        self.messages += started;
        self.owed += started - paid;
        Ok(())
    }
}

impl HttpBody for Metered {
    type Data = Bytes;
    type Error = MeterError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, MeterError>>> {
        let this = &mut *self;
        loop {
            if let Some(wait) = &mut this.wait {
                ready!(wait.as_mut().poll(cx));
                this.wait = None;
            }
            if this.held.is_some() {
                // Pay for the messages of the held frame before passing it on; a caller over
                // its rate waits, and with it the flow control of its stream.
                while this.owed > 0 {
                    match this.rates.check(&this.institution) {
                        Ok(()) => this.owed -= 1,
                        Err(wait) => {
                            crate::metrics::gateway()
                                .delayed_messages
                                .get_or_create(&crate::metrics::Member {
                                    member: this.institution.to_string(),
                                })
                                .inc();
                            this.wait = Some(Box::pin(tokio::time::sleep(wait)));
                            break;
                        }
                    }
                }
                if this.owed > 0 {
                    continue;
                }
                return Poll::Ready(this.held.take().map(Ok));
            }
            match ready!(Pin::new(&mut this.body).poll_frame(cx)) {
                Some(Ok(frame)) => {
                    if let Some(data) = frame.data_ref() {
                        this.count(data)?;
                    }
                    this.held = Some(frame);
                }
                Some(Err(error)) => return Poll::Ready(Some(Err(error.into()))),
                None => return Poll::Ready(None),
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.held.is_none() && self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::Framing;

    fn message(length: usize) -> Vec<u8> {
        let mut bytes = vec![0u8];
        bytes.extend_from_slice(&u32::try_from(length).unwrap().to_be_bytes());
        bytes.extend(std::iter::repeat_n(7u8, length));
        bytes
    }

    #[test]
    fn messages_are_counted_across_any_split_into_frames() {
        let stream: Vec<u8> = [message(3), message(0), message(300), message(1)].concat();
        for chunk in [1, 2, 4, 5, 6, 7, 64, stream.len()] {
            let mut framing = Framing::default();
            let started: u64 = stream
                .chunks(chunk)
                .map(|part| framing.scan(part, 1000).unwrap())
                .sum();
            assert_eq!(started, 4, "in chunks of {chunk}");
        }
    }

    #[test]
    fn durations_are_logged_to_the_microsecond() {
        let took = std::time::Duration::from_nanos(1_234_567_891);
        assert_eq!(super::millis(took).to_string(), "1234.567");
        let took = std::time::Duration::from_nanos(100_001);
        assert_eq!(super::millis(took).to_string(), "0.1");
    }

    #[test]
    fn a_message_over_the_limit_is_caught_by_its_prefix() {
        let mut framing = Framing::default();
        assert_eq!(framing.scan(&message(10)[..5], 9), Err(10));
        let mut framing = Framing::default();
        assert_eq!(framing.scan(&message(9), 9), Ok(1));
    }
}

/// When a call's deadline passes: the gateway ends its response there.
#[derive(Clone, Copy, Debug)]
pub struct CallDeadline(pub Instant);
