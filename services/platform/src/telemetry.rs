//! Telemetry: `tracing` logs, OpenTelemetry traces exported over OTLP when an endpoint is
//! configured, W3C trace context carried in gRPC metadata, and the trace id handed back to every
//! caller in the `x-trace-id` response header so that an operator can find any call.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use http::{HeaderMap, HeaderName, HeaderValue, Request, Response};
use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{
    BatchSpanProcessor, Sampler, SdkTracerProvider, SpanData, SpanProcessor,
};
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::Layer as _;
use tracing_subscriber::filter::LevelFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

use crate::config::TelemetryConfig;

/// The response header that carries the trace id of a call.
pub const TRACE_ID_HEADER: HeaderName = HeaderName::from_static("x-trace-id");

/// Why telemetry could not start.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    /// The OTLP exporter could not be built.
    #[error("OTLP exporter: {0}")]
    Exporter(String),
    /// The log filter does not parse.
    #[error("log filter: {0}")]
    Filter(String),
    /// A global subscriber was already installed.
    #[error("telemetry was already initialised in this process")]
    AlreadyInitialised,
}

/// The span attribute naming the platform component a span belongs to; it picks the
/// `service.name` the span is exported under (`onestop-<component>`), so that the components of
/// one process (`onestop up`) show as the separate services they are.
pub const COMPONENT: &str = "onestop.component";

/// Whether health checks and reflection are traced ([`TelemetryConfig::trace_health`]).
static TRACE_HEALTH: AtomicBool = AtomicBool::new(false);

/// Keeps the tracer provider alive; [`Telemetry::shutdown`] flushes it. Flush it last, after
/// the servers have drained.
pub struct Telemetry {
    provider: SdkTracerProvider,
}

impl Telemetry {
    /// Exports what is buffered and stops the exporter.
    pub fn shutdown(self) {
        if let Err(error) = self.provider.shutdown() {
            tracing::warn!(%error, "flushing traces at shutdown failed");
        }
    }
}

/// Hands each finished span to the exporter of its component ([`COMPONENT`]; `fallback` for a
/// span that names none), each exporter with its own `service.name`. An exporter is made the
/// first time its component ends a span.
struct ByComponent {
    endpoint: String,
    fallback: String,
    runtime: tokio::runtime::Handle,
    exporters: std::sync::Mutex<std::collections::HashMap<String, Arc<BatchSpanProcessor>>>,
}

impl std::fmt::Debug for ByComponent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ByComponent")
            .field("endpoint", &self.endpoint)
            .finish_non_exhaustive()
    }
}

impl ByComponent {
    fn processor(&self, component: &str) -> Option<Arc<BatchSpanProcessor>> {
        let mut exporters = self.exporters.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(processor) = exporters.get(component) {
            return Some(processor.clone());
        }
        // Bounded: components are the platform's own few, named in code.
        if exporters.len() >= 16 {
            return exporters.get(&self.fallback).cloned();
        }
        // The OTLP client needs the runtime to connect on.
        let _entered = self.runtime.enter();
        let exporter = match opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(self.endpoint.clone())
            .build()
        {
            Ok(exporter) => exporter,
            Err(error) => {
                tracing::warn!(%error, component, "no OTLP exporter; its spans are dropped");
                return None;
            }
        };
        let mut processor = BatchSpanProcessor::builder(exporter).build();
        processor.set_resource(
            &opentelemetry_sdk::Resource::builder()
                .with_service_name(format!("onestop-{component}"))
                .build(),
        );
        let processor = Arc::new(processor);
        exporters.insert(component.to_owned(), processor.clone());
        Some(processor)
    }

    fn each(&self) -> Vec<Arc<BatchSpanProcessor>> {
        let exporters = self.exporters.lock().unwrap_or_else(|p| p.into_inner());
        exporters.values().cloned().collect()
    }
}

impl SpanProcessor for ByComponent {
    fn on_start(&self, _span: &mut opentelemetry_sdk::trace::Span, _cx: &opentelemetry::Context) {}

    fn on_end(&self, span: SpanData) {
        let component = span
            .attributes
            .iter()
            .find(|kv| kv.key.as_str() == COMPONENT)
            .map(|kv| kv.value.as_str().into_owned())
            .unwrap_or_else(|| self.fallback.clone());
        if let Some(processor) = self.processor(&component) {
            processor.on_end(span);
        }
    }

    fn force_flush(&self) -> OTelSdkResult {
        for processor in self.each() {
            processor.force_flush()?;
        }
        Ok(())
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        for processor in self.each() {
            processor.shutdown_with_timeout(timeout)?;
        }
        Ok(())
    }
}

/// Installs logging and tracing for this process, whose spans are exported as `component`'s
/// unless they name their own ([`COMPONENT`]). Call it inside the tokio runtime.
pub fn init(config: &TelemetryConfig, component: &str) -> Result<Telemetry, TelemetryError> {
    let ratio = config.sample_ratio.unwrap_or(1.0);
    if !(0.0..=1.0).contains(&ratio) {
        return Err(TelemetryError::Exporter(format!(
            "telemetry.sample_ratio must be between 0.0 and 1.0, not {ratio}"
        )));
    }
    TRACE_HEALTH.store(config.trace_health, Ordering::Relaxed);
    let mut builder = SdkTracerProvider::builder().with_sampler(Sampler::ParentBased(Box::new(
        Sampler::TraceIdRatioBased(ratio),
    )));
    if let Some(endpoint) = &config.otlp_endpoint {
        let runtime = tokio::runtime::Handle::try_current()
            .map_err(|e| TelemetryError::Exporter(format!("no runtime to export on: {e}")))?;
        let by_component = ByComponent {
            endpoint: endpoint.clone(),
            fallback: component.to_owned(),
            runtime,
            exporters: std::sync::Mutex::new(std::collections::HashMap::new()),
        };
        // Made now, so that a bad endpoint is reported at start.
        if by_component.processor(component).is_none() {
            return Err(TelemetryError::Exporter(format!(
                "cannot export to {endpoint}"
            )));
        }
        builder = builder.with_span_processor(by_component);
    }
    let provider = builder.build();
    let tracer = provider.tracer("onestop");
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());

    let filter = match std::env::var("RUST_LOG") {
        Ok(filter) => filter,
        Err(_) => config.log_filter.clone().unwrap_or_else(|| "info".into()),
    };
    let filter = EnvFilter::try_new(filter).map_err(|e| TelemetryError::Filter(e.to_string()))?;
    // The filter applies to logs only: every call's span reaches OpenTelemetry, so that trace
    // ids exist whatever the log level.
    let otel = tracing_opentelemetry::layer()
        .with_tracer(tracer)
        .with_filter(LevelFilter::INFO);
    let registry = tracing_subscriber::registry().with(otel);
    // Logs go to standard error, so that what a command prints for people (standard output)
    // stays apart; colour codes only when a person is watching.
    let terminal = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let installed = if config.log_json {
        registry
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .with_writer(crate::redact::stderr)
                    .with_filter(filter),
            )
            .try_init()
    } else {
        registry
            .with(
                tracing_subscriber::fmt::layer()
                    .with_ansi(terminal)
                    .with_writer(crate::redact::stderr)
                    .with_filter(filter),
            )
            .try_init()
    };
    installed.map_err(|_| TelemetryError::AlreadyInitialised)?;
    Ok(Telemetry { provider })
}

/// Installs tracing once for a test process (no exporter; logs to the test writer at the level
/// of `RUST_LOG`, `warn` by default), so that trace ids are real in tests too.
pub fn init_for_tests() {
    static ONCE: OnceLock<()> = OnceLock::new();
    ONCE.get_or_init(|| {
        let provider = SdkTracerProvider::builder().build();
        let tracer = provider.tracer("onestop-tests");
        opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
        let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn"));
        let _ = tracing_subscriber::registry()
            .with(
                tracing_opentelemetry::layer()
                    .with_tracer(tracer)
                    .with_filter(LevelFilter::INFO),
            )
            .with(
                tracing_subscriber::fmt::layer()
                    .with_test_writer()
                    .with_filter(filter),
            )
            .try_init();
        // The provider lives as long as the process.
        std::mem::forget(provider);
    });
}

struct HeaderExtractor<'a>(&'a HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(HeaderName::as_str).collect()
    }
}

struct HeaderInjector<'a>(&'a mut HeaderMap);

impl Injector for HeaderInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(key.as_bytes()),
            HeaderValue::from_str(&value),
        ) {
            self.0.insert(name, value);
        }
    }
}

/// The path of a call (`/package.Service/Method`) as span names and `rpc.*` attributes give it:
/// the method (`package.Service/Method`), the service and the method's own name.
fn rpc_names(path: &str) -> (&str, &str, &str) {
    let method = path.trim_start_matches('/');
    let (service, name) = method.split_once('/').unwrap_or((method, ""));
    (method, service, name)
}

/// Starts the server span of one call to `path` at `component`, as a child of the caller's W3C
/// trace context, if any. It follows OpenTelemetry's RPC conventions; its status code is
/// recorded with [`record_status`].
pub fn server_span(headers: &HeaderMap, path: &str, component: &str) -> tracing::Span {
    let parent = TraceContextPropagator::new().extract(&HeaderExtractor(headers));
    let (method, service, name) = rpc_names(path);
    let span = tracing::info_span!(
        "grpc",
        otel.name = method,
        otel.kind = "server",
        otel.status_code = tracing::field::Empty,
        rpc.system = "grpc",
        rpc.service = service,
        rpc.method = name,
        rpc.grpc.status_code = tracing::field::Empty,
        onestop.component = component,
        member = tracing::field::Empty,
    );
    // Fails only when no OpenTelemetry layer is installed; the span then simply has no parent.
    let _ = span.set_parent(parent);
    span
}

/// Starts the client span of a call `component` makes to `path` (another service), as a child
/// of the current span, and writes its trace context into the request's metadata, so that the
/// service's span continues the trace. Run the call inside it and record its status with
/// [`record_status`].
pub fn client_span<T>(
    request: &mut tonic::Request<T>,
    path: &str,
    component: &str,
) -> tracing::Span {
    let (method, service, name) = rpc_names(path);
    let span = tracing::info_span!(
        "grpc.client",
        otel.name = method,
        otel.kind = "client",
        otel.status_code = tracing::field::Empty,
        rpc.system = "grpc",
        rpc.service = service,
        rpc.method = name,
        rpc.grpc.status_code = tracing::field::Empty,
        onestop.component = component,
    );
    let mut headers = HeaderMap::new();
    inject_context(&span, &mut headers);
    for (name, value) in &headers {
        if let (Ok(key), Ok(value)) = (
            tonic::metadata::MetadataKey::from_bytes(name.as_str().as_bytes()),
            tonic::metadata::MetadataValue::try_from(value.as_bytes()),
        ) {
            request.metadata_mut().insert(key, value);
        }
    }
    span
}

/// Records a call's gRPC status code on its span; the codes that mean the server failed
/// (OpenTelemetry's RPC conventions) also mark the span as an error.
pub fn record_status(span: &tracing::Span, code: tonic::Code) {
    span.record("rpc.grpc.status_code", code as i64);
    use tonic::Code::*;
    if matches!(
        code,
        Unknown | DeadlineExceeded | Unimplemented | Internal | Unavailable | DataLoss
    ) {
        span.record("otel.status_code", "error");
    }
}

/// Records the outcome of a client call on its span: the status code of its answer.
pub fn record_outcome<T>(span: &tracing::Span, outcome: &Result<T, tonic::Status>) {
    let code = match outcome {
        Ok(_) => tonic::Code::Ok,
        Err(status) => status.code(),
    };
    record_status(span, code);
}

/// Whether a call to `path` goes untraced: health checks and reflection, unless
/// [`TelemetryConfig::trace_health`] asks for them.
pub fn untraced(path: &str) -> bool {
    let local =
        path.starts_with("/grpc.health.v1.Health/") || path.starts_with("/grpc.reflection.");
    local && !TRACE_HEALTH.load(Ordering::Relaxed)
}

/// Writes the span's trace context into outgoing headers (`traceparent`, `tracestate`).
pub fn inject_context(span: &tracing::Span, headers: &mut HeaderMap) {
    TraceContextPropagator::new().inject_context(&span.context(), &mut HeaderInjector(headers));
}

/// The current span's W3C trace context (`traceparent`), to keep with work done later for the
/// call (see [`linked_to`]); `None` when the call is not traced.
pub fn current_traceparent() -> Option<String> {
    let mut headers = HeaderMap::new();
    inject_context(&tracing::Span::current(), &mut headers);
    headers
        .get("traceparent")
        .and_then(|value| value.to_str().ok())
        .map(str::to_owned)
}

/// Links `span` to the trace of the call whose `traceparent` was kept ([`current_traceparent`]):
/// work done later for a call (an inbox delivery) is found from that call's trace.
pub fn linked_to(span: &tracing::Span, traceparent: Option<&str>) {
    let Some(traceparent) = traceparent else {
        return;
    };
    let Ok(value) = HeaderValue::from_str(traceparent) else {
        return;
    };
    let mut headers = HeaderMap::new();
    headers.insert("traceparent", value);
    let cause = TraceContextPropagator::new().extract(&HeaderExtractor(&headers));
    let cause = cause.span().span_context().clone();
    if cause.is_valid() {
        span.add_link(cause);
    }
}

/// The span's trace id as a response header value; `None` when tracing is not installed.
pub fn trace_id_header(span: &tracing::Span) -> Option<HeaderValue> {
    let context = span.context();
    let span_context = context.span().span_context().clone();
    span_context
        .is_valid()
        .then(|| HeaderValue::from_str(&span_context.trace_id().to_string()).ok())
        .flatten()
}

/// The trace id of the current call (its span's), for records that must point at their trace
/// (audit events); empty when tracing is not installed.
pub fn current_trace_id() -> String {
    let context = tracing::Span::current().context();
    let span_context = context.span().span_context().clone();
    if span_context.is_valid() {
        span_context.trace_id().to_string()
    } else {
        String::new()
    }
}

/// A tower layer that runs each call inside its server span, returns its trace id, and keeps
/// the span open until the answer's last frame (a stream's span lasts as long as the stream),
/// with the call's status code on it.
#[derive(Clone, Debug)]
pub struct TraceLayer {
    component: Arc<str>,
}

impl TraceLayer {
    /// Spans of the server of `component`.
    pub fn new(component: &str) -> Self {
        Self {
            component: component.into(),
        }
    }
}

impl<S> tower::Layer<S> for TraceLayer {
    type Service = Trace<S>;

    fn layer(&self, inner: S) -> Trace<S> {
        Trace {
            inner,
            component: self.component.clone(),
        }
    }
}

/// The service of [`TraceLayer`].
#[derive(Clone, Debug)]
pub struct Trace<S> {
    inner: S,
    component: Arc<str>,
}

impl<S, B, ResB> tower::Service<Request<B>> for Trace<S>
where
    S: tower::Service<Request<B>, Response = Response<ResB>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ResB: http_body::Body<Data = tonic::codegen::Bytes> + Send + Unpin + 'static,
    ResB::Error: Into<tonic::codegen::StdError>,
{
    type Response = Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        if untraced(request.uri().path()) {
            let future = self.inner.call(request);
            return Box::pin(async move { Ok(future.await?.map(tonic::body::Body::new)) });
        }
        let span = server_span(request.headers(), request.uri().path(), &self.component);
        let trace_id = trace_id_header(&span);
        let future = {
            let _entered = span.enter();
            self.inner.call(request)
        };
        let held = span.clone();
        Box::pin(
            async move {
                let mut response = future.await?;
                if let Some(trace_id) = trace_id {
                    response.headers_mut().insert(TRACE_ID_HEADER, trace_id);
                }
                // A trailers-only answer carries its status in the headers.
                if let Some(code) = status_of(response.headers()) {
                    record_status(&held, code);
                }
                Ok(response.map(|body| tonic::body::Body::new(Traced { body, span: held })))
            }
            .instrument(span),
        )
    }
}

fn status_of(headers: &HeaderMap) -> Option<tonic::Code> {
    headers
        .get("grpc-status")
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.parse::<i32>().ok())
        .map(tonic::Code::from)
}

/// A response body that holds its call's span open until it is dropped and records the status
/// its trailers carry.
struct Traced<B> {
    body: B,
    span: tracing::Span,
}

impl<B> http_body::Body for Traced<B>
where
    B: http_body::Body + Unpin,
{
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let this = &mut *self;
        let frame = std::task::ready!(Pin::new(&mut this.body).poll_frame(cx));
        if let Some(Ok(frame)) = &frame
            && let Some(code) = frame.trailers_ref().and_then(status_of)
        {
            record_status(&this.span, code);
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}
