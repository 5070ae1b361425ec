//! Stream cancellation: on shutdown, every response still streaming ends at once with
//! `UNAVAILABLE` (the client reconnects to another replica) instead of holding the process for the
//! whole drain. Unary answers in flight are not cut; they are between frames only when waiting
//! for the service, and then they end too.

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

/// A tower layer that wraps every response body of a server in [`UntilShutdown`].
#[derive(Clone, Debug)]
pub struct UntilShutdownLayer {
    shutdown: CancellationToken,
}

impl UntilShutdownLayer {
    /// Streams end when `shutdown` is cancelled.
    pub fn new(shutdown: CancellationToken) -> Self {
        Self { shutdown }
    }
}

impl<S> tower::Layer<S> for UntilShutdownLayer {
    type Service = EndStreams<S>;

    fn layer(&self, inner: S) -> EndStreams<S> {
        EndStreams {
            inner,
            shutdown: self.shutdown.clone(),
        }
    }
}

/// The service of [`UntilShutdownLayer`].
#[derive(Clone, Debug)]
pub struct EndStreams<S> {
    inner: S,
    shutdown: CancellationToken,
}

impl<S, Req> tower::Service<Req> for EndStreams<S>
where
    S: tower::Service<Req, Response = http::Response<tonic::body::Body>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Req) -> Self::Future {
        let answer = self.inner.call(request);
        let shutdown = self.shutdown.clone();
        Box::pin(async move {
            let response = answer.await?;
            Ok(response.map(|body| tonic::body::Body::new(UntilShutdown::new(body, shutdown))))
        })
    }
}
