//! Ending calls at shutdown: every response still streaming ends at once with `UNAVAILABLE`
//! (the client reconnects to another replica) instead of holding the process for the whole
//! drain ([`UntilShutdown`]); a call whose answer has not even begun when the drain time is up
//! is answered `UNAVAILABLE` then ([`cut_at`]), so that a server's `serve` returns with no call
//! left running.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use http::{HeaderMap, HeaderValue};
use http_body::{Body as HttpBody, Frame, SizeHint};
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

/// A response body that ends with `UNAVAILABLE` trailers once `shutdown` is cancelled, at the
/// next moment it would otherwise wait.
pub struct UntilShutdown<B> {
    body: B,
    shutdown: CancellationToken,
    /// Made the first time the body waits: most answers never do, and pay nothing.
    waiting: Option<Pin<Box<WaitForCancellationFutureOwned>>>,
    ended: bool,
}

impl<B> UntilShutdown<B> {
    /// Wraps `body`.
    pub fn new(body: B, shutdown: CancellationToken) -> Self {
        Self {
            body,
            shutdown,
            waiting: None,
            ended: false,
        }
    }
}

fn shutting_down() -> HeaderMap {
    let mut trailers = HeaderMap::new();
    trailers.insert("grpc-status", HeaderValue::from_static("14"));
    trailers.insert(
        "grpc-message",
        HeaderValue::from_static("the%20server%20is%20shutting%20down%3B%20retry%20on%20another"),
    );
    trailers
}

impl<B> HttpBody for UntilShutdown<B>
where
    B: HttpBody + Unpin,
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
        let shutdown = &this.shutdown;
        let waiting = this
            .waiting
            .get_or_insert_with(|| Box::pin(shutdown.clone().cancelled_owned()));
        match waiting.as_mut().poll(cx) {
            Poll::Ready(()) => {
                this.ended = true;
                Poll::Ready(Some(Ok(Frame::trailers(shutting_down()))))
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

/// What a server applies to every answer: its body wrapped in [`UntilShutdown`].
pub fn end_on_shutdown(
    shutdown: CancellationToken,
) -> impl Fn(http::Response<tonic::body::Body>) -> http::Response<tonic::body::Body> + Clone {
    move |response| {
        let shutdown = shutdown.clone();
        response.map(|body| tonic::body::Body::new(UntilShutdown::new(body, shutdown)))
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
