//! Telemetry: `tracing` logs, OpenTelemetry traces exported over OTLP when an endpoint is
//! configured, W3C trace context carried in gRPC metadata, and the trace id handed back to every
//! caller in the `x-trace-id` response header so that an operator can find any call.

use std::future::Future;
use std::pin::Pin;
use std::sync::OnceLock;
use std::task::{Context, Poll};

use http::{HeaderMap, HeaderName, HeaderValue, Request, Response};
use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
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

/// Installs logging and tracing for this process.
pub fn init(config: &TelemetryConfig, service_name: &str) -> Result<Telemetry, TelemetryError> {
    let mut builder = SdkTracerProvider::builder().with_resource(
        opentelemetry_sdk::Resource::builder()
            .with_service_name(service_name.to_owned())
            .build(),
    );
    if let Some(endpoint) = &config.otlp_endpoint {
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(endpoint.clone())
            .build()
            .map_err(|e| TelemetryError::Exporter(e.to_string()))?;
        builder = builder.with_batch_exporter(exporter);
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
                    .with_writer(std::io::stderr)
                    .with_filter(filter),
            )
            .try_init()
    } else {
        registry
            .with(
                tracing_subscriber::fmt::layer()
                    .with_ansi(terminal)
                    .with_writer(std::io::stderr)
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

/// Starts the server span of one call as a child of the caller's W3C trace context, if any.
pub fn server_span(headers: &HeaderMap, method: &str) -> tracing::Span {
    let parent = TraceContextPropagator::new().extract(&HeaderExtractor(headers));
    let span = tracing::info_span!(
        "grpc",
        otel.name = method,
        otel.kind = "server",
        rpc.system = "grpc",
        rpc.method = method,
        member = tracing::field::Empty,
    );
    // Fails only when no OpenTelemetry layer is installed; the span then simply has no parent.
    let _ = span.set_parent(parent);
    span
}

/// Writes the span's trace context into outgoing headers (`traceparent`, `tracestate`).
pub fn inject_context(span: &tracing::Span, headers: &mut HeaderMap) {
    TraceContextPropagator::new().inject_context(&span.context(), &mut HeaderInjector(headers));
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

/// A tower layer that runs each call inside its server span and returns its trace id.
#[derive(Clone, Copy, Debug, Default)]
pub struct TraceLayer;

impl<S> tower::Layer<S> for TraceLayer {
    type Service = Trace<S>;

    fn layer(&self, inner: S) -> Trace<S> {
        Trace { inner }
    }
}

/// The service of [`TraceLayer`].
#[derive(Clone, Debug)]
pub struct Trace<S> {
    inner: S,
}

impl<S, B, ResB> tower::Service<Request<B>> for Trace<S>
where
    S: tower::Service<Request<B>, Response = Response<ResB>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = Response<ResB>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Response<ResB>, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let span = server_span(request.headers(), request.uri().path());
        let trace_id = trace_id_header(&span);
        let future = {
            let _entered = span.enter();
            self.inner.call(request)
        };
        Box::pin(
            async move {
                let mut response = future.await?;
                if let Some(trace_id) = trace_id {
                    response.headers_mut().insert(TRACE_ID_HEADER, trace_id);
                }
                Ok(response)
            }
            .instrument(span),
        )
    }
}
