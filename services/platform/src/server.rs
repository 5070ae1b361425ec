//! Serving gRPC: the one function every server calls to run its services behind mutual TLS
//! with explicit limits, health checking, reflection and a bounded graceful shutdown.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use onestop_proto::MessageLimits;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::server::NamedService;
use tonic::service::RoutesBuilder;
use tonic_health::ServingStatus;

use crate::accept::{self, AcceptLimits};
use crate::caller::AuthenticateLayer;
use crate::config::ServerConfig;
use crate::db::Database;
use crate::identity::SpiffeId;
use crate::metrics::{Readiness, ReadyPart, RecordCallsLayer};
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

/// The most bytes of a message to the standard services (health, reflection): their requests
/// are a name or two.
pub const STANDARD_MAX_MESSAGE_BYTES: usize = 4 * 1024;

/// The gRPC services one server runs, handed to [`serve`]. Each is added with the server's
/// message size limits; health and reflection describing them are added by [`serve`].
pub struct Services {
    routes: RoutesBuilder,
    names: Vec<&'static str>,
    max_message_bytes: usize,
    health: Health,
}

impl Services {
    /// No services yet, for a server configured by `config`.
    pub fn new(config: &ServerConfig) -> Self {
        let (reporter, server) = tonic_health::server::health_reporter();
        let mut routes = RoutesBuilder::default();
        routes.add_service(server.max_decoding_message_size(STANDARD_MAX_MESSAGE_BYTES));
        Self {
            routes,
            names: Vec::new(),
            max_message_bytes: config.limits.max_message_bytes,
            health: Health::new(reporter),
        }
    }

    /// Adds a service, refusing messages over `[server.limits] max_message_bytes` either way.
    pub fn add<S>(&mut self, service: S) -> &mut Self
    where
        S: MessageLimits
            + NamedService
            + tower::Service<
                http::Request<tonic::body::Body>,
                Response = http::Response<tonic::body::Body>,
                Error = std::convert::Infallible,
            > + Clone
            + Send
            + Sync
            + 'static,
        S::Future: Send + 'static,
    {
        self.names.push(S::NAME);
        self.routes
            .add_service(service.with_message_limits(self.max_message_bytes));
        self
    }

    /// The health the server reports, for the service to say when a dependency fails.
    pub fn health(&self) -> Health {
        self.health.clone()
    }
}

/// What a server reports to health checks (`grpc.health.v1`) and to the process's `/readyz`:
/// SERVING while it runs and every dependency it follows works, NOT_SERVING otherwise.
#[derive(Clone)]
pub struct Health {
    reporter: tonic_health::server::HealthReporter,
    state: Arc<tokio::sync::Mutex<HealthState>>,
}

struct HealthState {
    /// The names reported: the whole server (`""`) and each service.
    names: Vec<String>,
    running: bool,
    /// Dependencies that do not work now.
    failing: BTreeSet<String>,
    ready: Option<ReadyPart>,
}

/// How often a followed database is probed, and how long a probe may take.
pub const PROBE_INTERVAL: Duration = Duration::from_secs(5);
/// How long a probe may take before the database counts as failing.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

impl Health {
    fn new(reporter: tonic_health::server::HealthReporter) -> Self {
        Self {
            reporter,
            state: Arc::new(tokio::sync::Mutex::new(HealthState {
                names: vec![String::new()],
                running: false,
                failing: BTreeSet::new(),
                ready: None,
            })),
        }
    }

    /// Says whether a dependency (`database`, an upstream) works; while one does not, the
    /// server reports NOT_SERVING and the process is not ready, so that traffic goes elsewhere.
    pub async fn dependency(&self, name: &str, works: bool) {
        let mut state = self.state.lock().await;
        let changed = if works {
            state.failing.remove(name)
        } else {
            state.failing.insert(name.to_owned())
        };
        if changed {
            if works {
                tracing::info!(dependency = name, "dependency works again");
            } else {
                tracing::warn!(dependency = name, "dependency fails: reporting NOT_SERVING");
            }
            self.publish(&state).await;
        }
    }

    /// Probes `database` every [`PROBE_INTERVAL`] until `shutdown`, as the dependency
    /// `database`.
    pub fn follow_database(&self, database: Database, shutdown: CancellationToken) {
        let health = self.clone();
        tokio::spawn(async move {
            loop {
                let works = matches!(
                    tokio::time::timeout(PROBE_TIMEOUT, database.probe()).await,
                    Ok(Ok(()))
                );
                health.dependency("database", works).await;
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = tokio::time::sleep(PROBE_INTERVAL) => {}
                }
            }
        });
    }

    /// Starts or stops reporting the server as running, under `names`.
    async fn running(&self, names: &[&str], running: bool) {
        let mut state = self.state.lock().await;
        state.running = running;
        if running {
            state.names.extend(names.iter().map(|n| (*n).to_owned()));
            let part = Readiness::process().part(names.first().copied().unwrap_or("server"));
            state.ready = Some(part);
        }
        self.publish(&state).await;
    }

    async fn publish(&self, state: &HealthState) {
        let serving = state.running && state.failing.is_empty();
        if let Some(ready) = &state.ready {
            ready.set(serving);
        }
        let status = if serving {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        };
        for name in &state.names {
            self.reporter.set_service_status(name, status).await;
        }
    }
}

/// Adds reflection describing the `described` services (and health) to a router.
fn add_reflection(routes: &mut RoutesBuilder, described: &[&str]) -> Result<(), ServeError> {
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
        .add_service(
            reflection()
                .build_v1()?
                .max_decoding_message_size(STANDARD_MAX_MESSAGE_BYTES),
        )
        .add_service(
            reflection()
                .build_v1alpha()?
                .max_decoding_message_size(STANDARD_MAX_MESSAGE_BYTES),
        );
    Ok(())
}

/// Health for the whole server (reported SERVING) and reflection describing the `described`
/// services, added to a router that is not served by [`serve`] (the gateway's). Returns the
/// health reporter, so that the caller can report each service.
pub fn standard_services(
    routes: &mut RoutesBuilder,
    described: &[&str],
) -> Result<tonic_health::server::HealthReporter, ServeError> {
    let (reporter, health) = tonic_health::server::health_reporter();
    routes.add_service(health.max_decoding_message_size(STANDARD_MAX_MESSAGE_BYTES));
    add_reflection(routes, described)?;
    Ok(reporter)
}

/// Runs gRPC services on an already bound listener until `shutdown` is cancelled, then marks
/// them NOT_SERVING, stops accepting, and lets in-flight calls finish for at most the drain
/// timeout.
///
/// Health reports each service and the whole server (the empty name) SERVING from the start
/// until shutdown, while every dependency the service follows through [`Services::health`]
/// works.
pub async fn serve(
    config: &ServerConfig,
    services: Services,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<(), ServeError> {
    let Services {
        mut routes,
        names,
        health,
        ..
    } = services;
    let limits = config.limits;
    let gateway = gateway_identity(config)?;
    // Registered now, so that `/metrics` shows the call families (at zero) before the first call.
    crate::metrics::Calls::server();
    // Cancelled when the drain time is up: calls still running are answered then.
    let drained = CancellationToken::new();
    let tls = ServerTls::load(&config.tls, ClientAuth::Required)?;
    tls.watch(config.reload_interval_ms, shutdown.clone());
    let component = own_component(config);
    add_reflection(&mut routes, &names)?;

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
        .layer(TraceLayer::new(&component))
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

    // Ready for calls from now until shutdown (health, and the process's `/readyz`).
    health.running(&names, true).await;
    let stopping = {
        let shutdown = shutdown.clone();
        async move {
            shutdown.cancelled().await;
            health.running(&[], false).await;
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

/// The platform component this server is, as its own certificate names it
/// (`spiffe://<domain>/platform/<component>`): what its spans are exported as.
fn own_component(config: &ServerConfig) -> String {
    let named = tls::TlsMaterial::load(&config.tls)
        .ok()
        .map(|material| tls::inspect(Some(material.chain()), &config.trust_domain).0);
    match named {
        Some(tls::PeerIdentity::Spiffe(id)) => match &id.principal {
            crate::identity::Principal::Platform(component) => component.clone(),
            crate::identity::Principal::Member(member) => member.to_string(),
        },
        _ => "onestop".to_owned(),
    }
}

/// How long connections may take to close once their calls were cut off at the drain timeout.
const CLOSE_AFTER_CUT: Duration = Duration::from_secs(2);
