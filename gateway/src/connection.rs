//! One member connection's life. HTTP/2 is served on it with explicit limits, and it is closed:
//! - when no call starts within `first_request_timeout` of the handshake (a client that never
//!   sends the HTTP/2 preface, or never calls, holds nothing for long);
//! - when no call has run for `idle_timeout` (GOAWAY, so that the client reconnects when it
//!   needs to);
//! - when its certificate expires or is revoked: its streams end with `UNAUTHENTICATED` and
//!   the connection is cut off a moment later (see `onestop_platform::accept`);
//! - after its first refusal, when its certificate names no member or the member has too many
//!   connections (GOAWAY; such a connection may carry one call, to be told why);
//! - on shutdown (GOAWAY; calls in flight run to the end of the drain).

use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use onestop_platform::accept::MtlsStream;
use onestop_platform::config::Limits;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::body::Activity;
use crate::limits::Paced;
use crate::proxy::{Caller, Gateway};

/// How long a refused connection may take to read its refusal before it is cut off.
const REFUSAL_GRACE: Duration = Duration::from_secs(5);

/// How connections are served: the HTTP/2 settings and the timeouts.
pub struct Connections {
    members: hyper::server::conn::http2::Builder<TokioExecutor>,
    strangers: hyper::server::conn::http2::Builder<TokioExecutor>,
    first_request_timeout: Duration,
    idle_timeout: Duration,
}

fn http2(limits: &Limits, streams: u32) -> hyper::server::conn::http2::Builder<TokioExecutor> {
    let mut http2 = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    http2
        .timer(TokioTimer::new())
        .max_concurrent_streams(streams)
        // Sixteen times what services accept (256 KiB by default), so that a caller over the
        // services' limit, or with a token far too large to be one, is told so in a gRPC status
        // (`HEADERS_TOO_LARGE`, `TOKEN_TOO_LARGE`) instead of a bare HTTP/2 refusal. Only one
        // header block per connection is being read at a time, so this bounds memory per
        // connection, not per stream; past it HTTP/2 answers 431 and the connection goes on.
        .max_header_list_size(limits.max_header_list_bytes.saturating_mul(16))
        .keep_alive_interval(Some(limits.keepalive_interval_ms))
        .keep_alive_timeout(limits.keepalive_timeout_ms)
        .initial_stream_window_size(onestop_platform::client::STREAM_WINDOW)
        .initial_connection_window_size(onestop_platform::client::CONNECTION_WINDOW)
        // The services date their answers; formatting a second date per call is waste.
        .auto_date_header(false);
    http2
}

impl Connections {
    /// Connections held to `limits`.
    pub fn new(limits: &Limits) -> Self {
        Self {
            members: http2(limits, limits.max_concurrent_streams),
            // One call, to hear why it is refused.
            strangers: http2(limits, 1),
            first_request_timeout: limits.first_request_timeout_ms,
            idle_timeout: limits.idle_timeout_ms,
        }
    }

    /// Serves one accepted connection until it ends or is closed (see the module docs).
    pub fn serve(
        &self,
        gateway: Arc<Gateway>,
        stream: MtlsStream,
        shutdown: CancellationToken,
    ) -> impl Future<Output = ()> + Send + 'static {
        let peer = stream.peer().clone();
        let caller = Arc::new(Caller::new(&peer.identity, peer.cert.clone(), &gateway));
        let admitted = caller.is_admitted();
        if caller.reconnects_too_often() {
            // The handshake is paid already; the next ones from this address are refused
            // before theirs, so that a member reconnecting in a loop costs little.
            stream.charge_source();
        }
        // A stranger's connection carries one call and is never held.
        let pace = caller.pace().unwrap_or_default();
        let activity = Activity::new();
        let service = {
            let activity = activity.clone();
            hyper::service::service_fn(move |request| {
                let gateway = gateway.clone();
                let caller = caller.clone();
                let activity = activity.clone();
                async move {
                    Ok::<_, std::convert::Infallible>(
                        gateway.handle(caller, activity, request).await,
                    )
                }
            })
        };
        let builder = if admitted {
            &self.members
        } else {
            &self.strangers
        };
        let connection = builder.serve_connection(TokioIo::new(Paced::new(stream, pace)), service);
        let (first_request_timeout, idle_timeout) = (self.first_request_timeout, self.idle_timeout);
        let accepted = Instant::now();
        async move {
            tokio::pin!(connection);
            let mut first_seen = false;
            let why = loop {
                // The next moment something may have to be closed.
                let idle_deadline = if !activity.any_call() {
                    accepted + first_request_timeout
                } else {
                    activity
                        .idle_since()
                        .map_or(Instant::now() + idle_timeout, |since| since + idle_timeout)
                };
                tokio::select! {
                    result = connection.as_mut() => {
                        if let Err(error) = result {
                            tracing::debug!(remote = %peer.remote_addr, %error, "connection ended with an error");
                        }
                        return;
                    }
                    () = shutdown.cancelled() => break "shutdown",
                    () = activity.first_call.notified(), if !first_seen => {
                        // From now on the idle timeout applies, not the first-call one.
                        first_seen = true;
                    }
                    // A refused connection is closed once its refusal has been sent in full.
                    () = activity.call_ended.notified(), if !admitted => break "refused",
                    () = tokio::time::sleep_until(idle_deadline) => {
                        if !activity.any_call() {
                            tracing::info!(remote = %peer.remote_addr, "no call within the first-request timeout; connection closed");
                            return;
                        }
                        if activity.idle_since().is_some_and(|since| since + idle_timeout <= Instant::now()) {
                            break "idle";
                        }
                    }
                }
            };
            tracing::debug!(remote = %peer.remote_addr, why, "closing connection");
            // GOAWAY: no new calls on this connection; the ones in flight run to the end (of
            // the drain, on shutdown; of a short grace, for a refused connection).
            connection.as_mut().graceful_shutdown();
            let grace = match why {
                "refused" => REFUSAL_GRACE,
                _ => Duration::MAX,
            };
            let _ = tokio::time::timeout(grace, connection).await;
        }
    }
}
