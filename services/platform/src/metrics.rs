//! Metrics in the Prometheus text format, one registry per process, and the admin listener that
//! serves them with liveness and readiness (`/metrics`, `/healthz`, `/readyz`) on the cluster's
//! internal network.
//!
//! Every server counts its calls by gRPC service, method and status code, times them in
//! seconds and gauges the calls in flight ([`Calls`]); the gateway adds its own families
//! through [`register`]. Label values come from bounded sets only (the contract's services and
//! methods, status codes, member institutions): a method no one serves is counted as `unknown`.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};
use std::time::Instant;

use http::{Request, Response, StatusCode};
use http_body::{Body as HttpBody, Frame, SizeHint};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Metric, Registry};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// The process's registry.
fn registry() -> &'static Mutex<Registry> {
    static REGISTRY: OnceLock<Mutex<Registry>> = OnceLock::new();
    REGISTRY.get_or_init(|| Mutex::new(Registry::with_prefix("onestop")))
}

/// Adds a metric to the process's registry (its name gets the `onestop_` prefix).
pub fn register(name: &str, help: &str, metric: impl Metric) {
    registry()
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .register(name, help, metric);
}

/// Everything registered, in the Prometheus text format.
pub fn encode() -> String {
    let ready = ReadyGauge::get();
    let mut text = String::new();
    let registry = registry()
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    // Under the registry's lock, so that two scrapes at once never see it half refreshed.
    ready.refresh(Readiness::process());
    // Writing into a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut text, &registry);
    text
}

/// The labels of a finished call.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CallLabels {
    /// The gRPC service, such as `onestop.forms.v1.FormsService`.
    pub service: String,
    /// The method, such as `GetForm`.
    pub method: String,
    /// The status code, such as `OK` or `INVALID_ARGUMENT`.
    pub code: String,
}

/// The labels of a call's duration.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MethodLabels {
    /// The gRPC service.
    pub service: String,
    /// The method.
    pub method: String,
}

type Durations = Family<MethodLabels, Histogram, fn() -> Histogram>;

fn durations() -> Histogram {
    // 100 µs to about 3.3 s.
    Histogram::new(exponential_buckets(0.0001, 2.0, 16))
}

/// The path of the health watch, which `calls_in_flight` leaves out.
const HEALTH_WATCH: &str = "/grpc.health.v1.Health/Watch";

/// Calls counted, timed and gauged under one name prefix.
pub struct Calls {
    total: Family<CallLabels, Counter>,
    seconds: Durations,
    in_flight: Gauge,
}

impl Calls {
    /// Registers `<prefix>_calls_total`, `<prefix>_call_duration_seconds` and
    /// `<prefix>_calls_in_flight`.
    pub fn register(prefix: &str, whose: &str) -> Self {
        let calls = Self {
            total: Family::default(),
            seconds: Family::new_with_constructor(durations as fn() -> Histogram),
            in_flight: Gauge::default(),
        };
        register(
            &format!("{prefix}_calls"),
            &format!("Calls {whose} finished, by service, method and status code"),
            calls.total.clone(),
        );
        register(
            &format!("{prefix}_call_duration_seconds"),
            &format!("How long calls {whose} took, from their headers to their last frame"),
            calls.seconds.clone(),
        );
        register(
            &format!("{prefix}_calls_in_flight"),
            &format!("Calls {whose} running now"),
            calls.in_flight.clone(),
        );
        calls
    }

    /// Starts counting a call to `path` (`/package.Service/Method`).
    pub fn start(&'static self, path: &str) -> CallRecord {
        let (service, method) = path
            .trim_start_matches('/')
            .split_once('/')
            .unwrap_or(("unknown", "unknown"));
        // A health watch is held open for as long as its watcher runs (the gateway holds one on
        // every service): it is not work in flight, and would keep the gauge above zero.
        let in_flight = path != HEALTH_WATCH;
        if in_flight {
            self.in_flight.inc();
        }
        CallRecord {
            in_flight,
            calls: self,
            service: service.to_owned(),
            method: method.to_owned(),
            started: Instant::now(),
            code: None,
        }
    }

    /// The server-side calls of this process (every service's).
    pub fn server() -> &'static Calls {
        static CALLS: OnceLock<Calls> = OnceLock::new();
        CALLS.get_or_init(|| Calls::register("server", "served"))
    }
}

/// One call being counted; recorded when dropped, with the code seen (`CANCELLED` if none
/// was: the call was cut off).
pub struct CallRecord {
    calls: &'static Calls,
    /// Whether the call counts in `calls_in_flight`.
    in_flight: bool,
    service: String,
    method: String,
    started: Instant,
    code: Option<tonic::Code>,
}

impl CallRecord {
    /// Notes the status code of a header block, if it carries one.
    pub fn code_from(&mut self, headers: &http::HeaderMap) {
        if let Some(code) = headers
            .get("grpc-status")
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.parse::<i32>().ok())
        {
            self.code = Some(tonic::Code::from(code));
        }
    }

    /// The status code seen so far, if any.
    pub fn code(&self) -> Option<tonic::Code> {
        self.code
    }

    /// The call's service, method, code so far (`CANCELLED` if none was seen) and time taken.
    pub fn describe(&self) -> (&str, &str, &'static str, std::time::Duration) {
        (
            &self.service,
            &self.method,
            code_name(self.code.unwrap_or(tonic::Code::Cancelled)),
            self.started.elapsed(),
        )
    }

    /// Counts the method as `unknown` (no one serves it): its name is the caller's, unbounded.
    pub fn unknown_method(&mut self) {
        self.service = "unknown".into();
        self.method = "unknown".into();
    }
}

/// The `SCREAMING_SNAKE_CASE` name of a code, as gRPC documents it.
pub fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "OK",
        Cancelled => "CANCELLED",
        Unknown => "UNKNOWN",
        InvalidArgument => "INVALID_ARGUMENT",
        DeadlineExceeded => "DEADLINE_EXCEEDED",
        NotFound => "NOT_FOUND",
        AlreadyExists => "ALREADY_EXISTS",
        PermissionDenied => "PERMISSION_DENIED",
        ResourceExhausted => "RESOURCE_EXHAUSTED",
        FailedPrecondition => "FAILED_PRECONDITION",
        Aborted => "ABORTED",
        OutOfRange => "OUT_OF_RANGE",
        Unimplemented => "UNIMPLEMENTED",
        Internal => "INTERNAL",
        Unavailable => "UNAVAILABLE",
        DataLoss => "DATA_LOSS",
        Unauthenticated => "UNAUTHENTICATED",
    }
}

impl Drop for CallRecord {
    fn drop(&mut self) {
        let calls = self.calls;
        if self.in_flight {
            calls.in_flight.dec();
        }
        let code = self.code.unwrap_or(tonic::Code::Cancelled);
        if code == tonic::Code::Unimplemented {
            self.unknown_method();
        }
        let method = MethodLabels {
            service: std::mem::take(&mut self.service),
            method: std::mem::take(&mut self.method),
        };
        calls
            .seconds
            .get_or_create(&method)
            .observe(self.started.elapsed().as_secs_f64());
        calls
            .total
            .get_or_create(&CallLabels {
                service: method.service,
                method: method.method,
                code: code_name(code).to_owned(),
            })
            .inc();
    }
}

/// A response body that notes the call's status from its trailers and records the call when it
/// ends.
pub struct Recorded<B> {
    body: B,
    record: CallRecord,
}

impl<B> Recorded<B> {
    /// Wraps `body`; a trailers-only response has its code noted from its headers already.
    pub fn new(body: B, record: CallRecord) -> Self {
        Self { body, record }
    }

    /// The call as recorded so far.
    pub fn record(&self) -> &CallRecord {
        &self.record
    }
}

impl<B> HttpBody for Recorded<B>
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
        let polled = Pin::new(&mut this.body).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled
            && let Some(trailers) = frame.trailers_ref()
        {
            this.record.code_from(trailers);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// A tower layer that records every call of a server in [`Calls::server`].
#[derive(Clone, Copy, Debug, Default)]
pub struct RecordCallsLayer;

impl<S> tower::Layer<S> for RecordCallsLayer {
    type Service = RecordCalls<S>;

    fn layer(&self, inner: S) -> RecordCalls<S> {
        RecordCalls { inner }
    }
}

/// The service of [`RecordCallsLayer`].
#[derive(Clone, Debug)]
pub struct RecordCalls<S> {
    inner: S,
}

impl<S, B> tower::Service<Request<B>> for RecordCalls<S>
where
    S: tower::Service<Request<B>, Response = Response<tonic::body::Body>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let mut record = Calls::server().start(request.uri().path());
        let answer = self.inner.call(request);
        Box::pin(async move {
            let response = answer.await?;
            record.code_from(response.headers());
            Ok(response.map(|body| tonic::body::Body::new(Recorded::new(body, record))))
        })
    }
}

/// Whether each part of the process (each server running in it) is ready for calls, for
/// `/readyz`.
#[derive(Clone, Debug, Default)]
pub struct Readiness {
    parts: Arc<Mutex<BTreeMap<(String, u64), bool>>>,
    next: Arc<std::sync::atomic::AtomicU64>,
}

/// One part's place in the process's readiness; the part leaves it when this is dropped (its
/// server has stopped).
#[derive(Debug)]
pub struct ReadyPart {
    readiness: Readiness,
    key: (String, u64),
}

impl ReadyPart {
    /// Says whether the part is ready for calls.
    pub fn set(&self, ready: bool) {
        self.readiness
            .parts
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .insert(self.key.clone(), ready);
    }
}

impl Drop for ReadyPart {
    fn drop(&mut self) {
        self.readiness
            .parts
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .remove(&self.key);
    }
}

impl Readiness {
    /// The process's readiness.
    pub fn process() -> &'static Readiness {
        static READINESS: OnceLock<Readiness> = OnceLock::new();
        READINESS.get_or_init(Readiness::default)
    }

    /// A new part named `name`, not ready until it says so.
    pub fn part(&self, name: &str) -> ReadyPart {
        let key = (name.to_owned(), self.next.fetch_add(1, Ordering::Relaxed));
        let part = ReadyPart {
            readiness: self.clone(),
            key,
        };
        part.set(false);
        part
    }

    /// The parts that are not ready; none when all are (and there is at least one).
    pub fn not_ready(&self) -> Vec<String> {
        let parts = self
            .parts
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if parts.is_empty() {
            return vec!["nothing is running yet".to_owned()];
        }
        parts
            .iter()
            .filter(|(_, ready)| !**ready)
            .map(|((name, _), _)| name.clone())
            .collect()
    }
}

/// The labels of a part of the process.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PartLabels {
    /// The part: the first gRPC service its server serves, or `gateway`.
    part: String,
}

/// `onestop_ready{part}`: 1 while every server of that name in the process accepts calls, 0
/// otherwise; what `/readyz` answers, for alerts. Set from [`Readiness`] at every scrape (a
/// lock and a walk over a handful of parts), so that it never disagrees with `/readyz`.
struct ReadyGauge {
    parts: Family<PartLabels, Gauge>,
}

impl ReadyGauge {
    fn get() -> &'static ReadyGauge {
        static GAUGE: OnceLock<ReadyGauge> = OnceLock::new();
        GAUGE.get_or_init(|| {
            let gauge = ReadyGauge {
                parts: Family::default(),
            };
            register(
                "ready",
                "Whether the part of the process accepts calls (1) or not (0), as /readyz says",
                gauge.parts.clone(),
            );
            gauge
        })
    }

    fn refresh(&self, readiness: &Readiness) {
        let mut by_name: BTreeMap<String, bool> = BTreeMap::new();
        for ((name, _), ready) in readiness
            .parts
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .iter()
        {
            *by_name.entry(name.clone()).or_insert(true) &= *ready;
        }
        // A part that has stopped leaves the gauge rather than staying at its last value.
        self.parts.clear();
        for (part, ready) in by_name {
            self.parts
                .get_or_create(&PartLabels { part })
                .set(i64::from(ready));
        }
    }
}

fn answer(status: StatusCode, content_type: &'static str, body: String) -> Response<String> {
    let mut response = Response::new(body);
    *response.status_mut() = status;
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static(content_type),
    );
    response
}

/// Serves `/metrics`, `/healthz` and `/readyz` over plain HTTP/1.1 on `listener` until
/// `shutdown`. It is meant for the cluster's internal network (a Prometheus scraper, the
/// kubelet's probes): it tells nothing about callers and changes nothing.
pub async fn serve_admin(listener: TcpListener, shutdown: CancellationToken) {
    let address: Option<SocketAddr> = listener.local_addr().ok();
    tracing::info!(?address, "admin listener (metrics, liveness, readiness)");
    loop {
        let (stream, _) = tokio::select! {
            () = shutdown.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    tracing::warn!(%error, "admin accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let service =
            hyper::service::service_fn(|request: Request<hyper::body::Incoming>| async move {
                let response = match request.uri().path() {
                    "/metrics" => answer(
                        StatusCode::OK,
                        "text/plain; version=0.0.4; charset=utf-8",
                        encode(),
                    ),
                    "/healthz" => answer(StatusCode::OK, "text/plain", "ok\n".into()),
                    "/readyz" => {
                        let not_ready = Readiness::process().not_ready();
                        if not_ready.is_empty() {
                            answer(StatusCode::OK, "text/plain", "ready\n".into())
                        } else {
                            answer(
                                StatusCode::SERVICE_UNAVAILABLE,
                                "text/plain",
                                format!("not ready: {}\n", not_ready.join(", ")),
                            )
                        }
                    }
                    _ => answer(
                        StatusCode::NOT_FOUND,
                        "text/plain",
                        "/metrics, /healthz or /readyz\n".into(),
                    ),
                };
                Ok::<_, Infallible>(response)
            });
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(std::time::Duration::from_secs(10))
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            tokio::pin!(connection);
            tokio::select! {
                _ = connection.as_mut() => {}
                () = shutdown.cancelled() => {}
            }
        });
    }
}
