//! Ending calls early, with a status that says why ([`EndsWhen`]): at shutdown every response
//! still streaming ends at once with `UNAVAILABLE` (the client reconnects to another replica)
//! instead of holding the process for the whole drain; a stream whose caller's certificate is
//! revoked or expires ends with `UNAUTHENTICATED` ([`certificate_unusable`]); the gateway ends
//! streams at their deadline and when the caller loses its right to them. A call whose answer
//! has not even begun when the drain time is up is answered `UNAVAILABLE` then ([`cut_at`]), so
//! that a server's `serve` returns with no call left running.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::{HeaderMap, HeaderValue};
use http_body::{Body as HttpBody, Frame, SizeHint};
use tokio_util::sync::CancellationToken;

use crate::tls::{PeerCert, ServerTls};

/// What ends a response body early, with the trailers to end it with. It is looked at only
/// once the body has nothing to send, so an answer that never waits pays nothing for it.
pub trait Until: Unpin {
    /// Ready with the trailers once the body must end.
    fn poll_until(&mut self, cx: &mut Context<'_>) -> Poll<HeaderMap>;
}

/// A response body that ends with the trailers of its [`Until`] once that is ready, at the
/// next moment the body would otherwise wait.
pub struct EndsWhen<B, U> {
    body: B,
    until: U,
    ended: bool,
}

impl<B, U> EndsWhen<B, U> {
    /// Wraps `body`.
    pub fn new(body: B, until: U) -> Self {
        Self {
            body,
            until,
            ended: false,
        }
    }
}

impl<B, U> HttpBody for EndsWhen<B, U>
where
    B: HttpBody + Unpin,
    U: Until,
{
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = &mut *self;
        if this.ended {
            return Poll::Ready(None);
        }
        if let Poll::Ready(frame) = Pin::new(&mut this.body).poll_frame(cx) {
            return Poll::Ready(frame);
        }
        match this.until.poll_until(cx) {
            Poll::Ready(trailers) => {
                this.ended = true;
                Poll::Ready(Some(Ok(Frame::trailers(trailers))))
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.ended || self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// An [`Until`] made of a future that is made only the first time the body waits (most answers
/// never do, and pay nothing).
pub struct Later<F, Fut> {
    make: Option<F>,
    waiting: Option<Pin<Box<Fut>>>,
}

impl<F, Fut> Later<F, Fut>
where
    F: FnOnce() -> Fut + Unpin,
    Fut: Future<Output = HeaderMap>,
{
    /// `make` gives the future when the body first waits.
    pub fn new(make: F) -> Self {
        Self {
            make: Some(make),
            waiting: None,
        }
    }
}

impl<F, Fut> Until for Later<F, Fut>
where
    F: FnOnce() -> Fut + Unpin,
    Fut: Future<Output = HeaderMap>,
{
    fn poll_until(&mut self, cx: &mut Context<'_>) -> Poll<HeaderMap> {
        if self.waiting.is_none() {
            match self.make.take() {
                Some(make) => self.waiting = Some(Box::pin(make())),
                None => return Poll::Pending,
            }
        }
        match self.waiting.as_mut() {
            Some(waiting) => waiting.as_mut().poll(cx),
            None => Poll::Pending,
        }
    }
}

/// Ends a body with `UNAVAILABLE` once `shutdown` is cancelled: the client reconnects to another
/// replica.
pub fn until_shutdown(shutdown: CancellationToken) -> impl Until + Send + 'static {
    Later::new(move || async move {
        shutdown.cancelled_owned().await;
        shutting_down()
    })
}

/// The trailers of a call ended by the server's shutdown.
pub fn shutting_down() -> HeaderMap {
    let mut trailers = HeaderMap::new();
    trailers.insert("grpc-status", HeaderValue::from_static("14"));
    trailers.insert(
        "grpc-message",
        HeaderValue::from_static("the%20server%20is%20shutting%20down%3B%20retry%20on%20another"),
    );
    trailers
}

/// The trailers that end a call with `status`.
pub fn trailers_of(status: &tonic::Status) -> HeaderMap {
    let mut trailers = HeaderMap::new();
    if status.add_header(&mut trailers).is_err() {
        // Only a message that cannot be a header fails; the code alone still ends the call.
        trailers.insert("grpc-status", HeaderValue::from(status.code() as i32));
    }
    trailers
}

/// Waits until the peer's certificate can no longer be used (revoked, as the revocation list is
/// reloaded, or expired) and gives why.
pub async fn certificate_unusable(tls: Arc<ServerTls>, cert: Arc<PeerCert>) -> &'static str {
    let mut changes = tls.changes();
    loop {
        if let Some(why) = cert.unusable(&tls) {
            return why;
        }
        // Until a moment past the certificate's end (so that the check above then sees it
        // expired, whatever the timer's rounding), or until the revocation list is reloaded.
        let left = cert
            .not_after
            .duration_since(std::time::SystemTime::now())
            .unwrap_or_default()
            + std::time::Duration::from_millis(10);
        tokio::select! {
            () = tokio::time::sleep(left) => {}
            changed = changes.changed() => {
                if changed.is_err() {
                    // The list is no longer watched; only expiry can end the certificate now.
                    tokio::time::sleep(left).await;
                }
            }
        }
    }
}

/// What a server applies to every answer: it ends with `UNAVAILABLE` on shutdown.
pub fn end_on_shutdown(
    shutdown: CancellationToken,
) -> impl Fn(http::Response<tonic::body::Body>) -> http::Response<tonic::body::Body> + Clone {
    move |response| {
        let shutdown = shutdown.clone();
        response.map(|body| tonic::body::Body::new(EndsWhen::new(body, until_shutdown(shutdown))))
    }
}

/// A call's answer on its way.
pub type Answer<E> =
    Pin<Box<dyn Future<Output = Result<http::Response<tonic::body::Body>, E>> + Send>>;

/// What a server applies to every call's answer: if it has not come when `drained` is
/// cancelled (the drain time is up), the call is answered `UNAVAILABLE` and the service's work on
/// it is dropped.
pub fn cut_at<F, E>(drained: CancellationToken) -> impl Fn(F) -> Answer<E> + Clone
where
    F: Future<Output = Result<http::Response<tonic::body::Body>, E>> + Send + 'static,
{
    move |answer| {
        let drained = drained.clone();
        Box::pin(async move {
            tokio::select! {
                answer = answer => answer,
                () = drained.cancelled() => Ok(crate::status::error(
                    tonic::Code::Unavailable,
                    crate::status::Reason::Overloaded,
                    "the server shut down before the call finished; retry on another".into(),
                    Vec::new(),
                )
                .into_http()),
            }
        })
    }
}
