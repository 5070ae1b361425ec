//! Serving gRPC: the one function every server calls to run its services behind mutual TLS
//! with explicit limits, health checking, reflection and a bounded graceful shutdown.

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::service::RoutesBuilder;
use tonic_health::ServingStatus;

use crate::accept::{self, AcceptLimits};
use crate::caller::AuthenticateLayer;
use crate::config::ServerConfig;
use crate::identity::SpiffeId;
use crate::metrics::{Readiness, RecordCallsLayer};
use tower::util::{MapFutureLayer, MapResponseLayer};

use crate::status;
use crate::streams;
use crate::telemetry::TraceLayer;
use crate::tls::{self, ClientAuth, ServerTls};

/// Why a server stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// TLS could not be set up.
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    /// Reflection could not be built from the descriptors.
    #[error("reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    /// The transport failed.
    #[error("transport: {0}")]
    Transport(#[from] tonic::transport::Error),
    /// The configuration is unusable.
    #[error("configuration: {0}")]
    Config(String),
}

/// The identity whose caller headers a server believes: `[server] gateway_identity`, or
/// `spiffe://<trust domain>/platform/gateway`.
pub fn gateway_identity(config: &ServerConfig) -> Result<SpiffeId, ServeError> {
    match &config.gateway_identity {
        Some(id) => SpiffeId::parse(id)
            .map_err(|e| ServeError::Config(format!("server.gateway_identity: {e}"))),
        None => Ok(SpiffeId::platform(&config.trust_domain, "gateway")),
    }
}

/// Health for the `healthy` services and reflection describing the `described` ones, added to
/// a router. Returns the health reporter, so that the caller can change what it reports.
pub async fn standard_services(
    routes: &mut RoutesBuilder,
    healthy: &[&str],
    described: &[&str],
) -> Result<tonic_health::server::HealthReporter, ServeError> {
    let (reporter, health) = tonic_health::server::health_reporter();
    for name in healthy {
        reporter
            .set_service_status(*name, ServingStatus::Serving)
            .await;
    }
    let mut names: Vec<String> = described.iter().map(|name| (*name).to_owned()).collect();
    names.push("grpc.health.v1.Health".to_owned());
    let reflection = || {
        names.iter().fold(
            tonic_reflection::server::Builder::configure()
                .register_encoded_file_descriptor_set(onestop_proto::FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
                // So that clients can decode error details (google.rpc.BadRequest, ...).
                .register_encoded_file_descriptor_set(tonic_types::pb::FILE_DESCRIPTOR_SET),
            |builder, name| builder.with_service_name(name.clone()),
        )
    };
    routes
        .add_service(health)
        .add_service(reflection().build_v1()?)
        .add_service(reflection().build_v1alpha()?);
    Ok(reporter)
}

/// Runs gRPC services on an already bound listener until `shutdown` is cancelled, then marks
/// them NOT_SERVING, stops accepting, and lets in-flight calls finish for at most the drain
/// timeout.
///
/// `served` names the services for health and reflection (the empty name, the whole server, is
/// always reported).
pub async fn serve(
    config: &ServerConfig,
    mut routes: RoutesBuilder,
    served: &[&str],
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<(), ServeError> {
    let limits = config.limits;
    let gateway = gateway_identity(config)?;
    // Cancelled when the drain time is up: calls still running are answered then.
    let drained = CancellationToken::new();
    let tls = ServerTls::load(&config.tls, ClientAuth::Required)?;
    tls.watch(config.reload_interval_ms, shutdown.clone());
    let mut with_whole = served.to_vec();
    with_whole.push("");
    let reporter = standard_services(&mut routes, &with_whole, served).await?;

    // The accept loop stops on its own token, cancelled by the shutdown below, so that no new
    // connection is taken while the old ones drain.
    let accepting = shutdown.child_token();
    let incoming = accept::accept(
        listener,
        tls.clone(),
        config.trust_domain.clone(),
        AcceptLimits::from(&limits),
        accepting.clone(),
    );

    let server = tonic::transport::Server::builder()
        // A call may not hold a connection slot forever; the client's shorter deadline wins.
        .timeout(limits.request_timeout_ms)
        // Refuse work beyond this at once (RESOURCE_EXHAUSTED) instead of queueing it: a queue
        // only turns overload into latency for everyone.
        .concurrency_limit_per_connection(limits.max_concurrent_requests)
        .load_shed(true)
        // HTTP/2 limits: streams per connection, header size, and pings that find dead peers.
        .max_concurrent_streams(limits.max_concurrent_streams)
        .http2_max_header_list_size(limits.max_header_list_bytes)
        .http2_keepalive_interval(Some(limits.keepalive_interval_ms))
        .http2_keepalive_timeout(Some(limits.keepalive_timeout_ms))
        .initial_stream_window_size(crate::client::STREAM_WINDOW)
        .initial_connection_window_size(crate::client::CONNECTION_WINDOW)
        // Every call in its own span, a child of the caller's trace; the trace id goes back.
        .layer(TraceLayer)
        // Every call counted and timed, by service, method and code.
        .layer(RecordCallsLayer)
        // On shutdown, streams still open (a health watch, an inbox) end at once, and calls
        // still waiting for their answer when the drain time is up are answered then.
        .layer(MapResponseLayer::new(streams::end_on_shutdown(
            shutdown.clone(),
        )))
        .layer(MapFutureLayer::new(streams::cut_at(drained.clone())))
        // What the transport answers on its own (a message that does not decode, no such
        // method, overload) in the same shape as the services' errors.
        .layer(MapResponseLayer::new(status::reshape_response))
        // Who calls, for every method (health and reflection too): only platform components
        // and the gateway, speaking for a member, get through.
        .layer(AuthenticateLayer::new(gateway, tls))
        .add_routes(routes.routes());

    // Ready for calls from now until shutdown (the process's `/readyz`).
    let ready = Readiness::process().part(served.first().copied().unwrap_or("server"));
    ready.set(true);
    let stopping = {
        let reporter = reporter.clone();
        let served: Vec<String> = with_whole.iter().map(|s| (*s).to_owned()).collect();
        let shutdown = shutdown.clone();
        async move {
            shutdown.cancelled().await;
            ready.set(false);
            for name in &served {
                reporter
                    .set_service_status(name, ServingStatus::NotServing)
                    .await;
            }
            accepting.cancel();
        }
    };
    let drain_timeout = config.drain_timeout_ms;
    let run = server.serve_with_incoming_shutdown(incoming, stopping);
    tokio::pin!(run);
    tokio::select! {
        result = &mut run => result?,
        () = async { shutdown.cancelled().await; tokio::time::sleep(drain_timeout).await } => {
            tracing::warn!(?drain_timeout, "calls still running after the drain timeout are cut off");
            drained.cancel();
            // Every call now answers at once, and the connections close after their answers.
            if tokio::time::timeout(CLOSE_AFTER_CUT, &mut run).await.is_err() {
                tracing::warn!("connections still open after the drain were dropped");
            }
        }
    }
    Ok(())
}

/// How long connections may take to close once their calls were cut off at the drain timeout.
const CLOSE_AFTER_CUT: std::time::Duration = std::time::Duration::from_secs(2);
