//! The one external entry point of the federation. It terminates mutual TLS for every member's
//! system, maps the client certificate to a member, checks the member's access rights for the
//! called method, holds it to a rate and a deadline cap, and forwards the call (unary or any
//! kind of stream) to the owning service over internal mutual TLS, frame by frame.
//!
//! Layout: [`proxy`] (one call, as a story) uses [`policy`] (access rights), [`limits`] (rates,
//! deadlines) and [`upstream`] (connections to services); this file holds the configuration
//! and the connection loop.

pub mod limits;
pub mod policy;
pub mod proxy;
pub mod upstream;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use onestop_platform::config::{ServerConfig, TelemetryConfig};
use onestop_platform::tls::{self, AcceptLimits, ClientAuth, TlsFiles, TlsMaterial};
use serde::Deserialize;
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_stream::StreamExt;
use tokio_util::sync::CancellationToken;

use crate::limits::{MemberRates, MemberSlots};
use crate::policy::Policy;
use crate::proxy::Gateway;
use crate::upstream::Upstream;

/// The configuration of the gateway process.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatewayConfig {
    /// The external listener: its certificate, the CA that members' certificates chain to, and
    /// its limits.
    pub server: ServerConfig,
    /// The gateway's own client identity towards the services.
    pub upstream: UpstreamConfig,
    /// gRPC service name → `host:port` of the service.
    pub routes: BTreeMap<String, String>,
    /// Access rights and per-member limits.
    pub gateway: GatewaySettings,
    /// Logs and traces.
    #[serde(default)]
    pub telemetry: TelemetryConfig,
}

/// The `[upstream]` section.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    /// The gateway's client certificate (identity `spiffe://<domain>/platform/gateway`), its
    /// key and the CA of the services' certificates.
    pub tls: TlsFiles,
    /// The name the services' certificates are checked against.
    #[serde(default = "default_server_name")]
    pub server_name: String,
}

fn default_server_name() -> String {
    "localhost".to_owned()
}

/// The `[gateway]` section.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatewaySettings {
    /// The access policy file (see [`policy`]).
    pub policy: PathBuf,
    /// Calls a second each member institution may make on average.
    #[serde(default = "default_rate")]
    pub rate_per_second: u32,
    /// Calls a member may make at once above its rate.
    #[serde(default = "default_burst")]
    pub burst: u32,
    /// The longest deadline a call may have, in milliseconds.
    #[serde(default = "default_max_deadline")]
    pub max_deadline_ms: u64,
    /// Calls in flight at once across all connections.
    #[serde(default = "default_max_in_flight")]
    pub max_in_flight: usize,
    /// Calls one member institution may have in flight at once.
    #[serde(default = "default_max_in_flight_per_member")]
    pub max_in_flight_per_member: usize,
}

fn default_rate() -> u32 {
    500
}
fn default_burst() -> u32 {
    1000
}
fn default_max_deadline() -> u64 {
    30_000
}
fn default_max_in_flight() -> usize {
    4096
}
fn default_max_in_flight_per_member() -> usize {
    256
}

/// How long a connection that names no member stays open after it was accepted.
const STRANGER_GRACE: Duration = Duration::from_secs(5);

/// Why the gateway could not run.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    /// TLS could not be set up.
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    /// The policy file is unusable.
    #[error(transparent)]
    Policy(#[from] policy::PolicyError),
    /// A route is unusable.
    #[error(transparent)]
    Upstream(#[from] upstream::UpstreamError),
    /// Health or reflection could not be built.
    #[error(transparent)]
    Serve(#[from] onestop_platform::server::ServeError),
}

/// Runs the gateway on a bound listener until `shutdown` is cancelled, then stops accepting and
/// lets calls in flight finish for at most the drain timeout.
pub async fn serve(
    config: &GatewayConfig,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<(), GatewayError> {
    let limits = config.server.limits;
    let policy = Policy::load(&config.gateway.policy)?;
    let server_tls = tls::server_config(
        &TlsMaterial::load(&config.server.tls)?,
        ClientAuth::Optional,
    )?;
    let client_tls = tls::client_config(&TlsMaterial::load(&config.upstream.tls)?)?;

    let mut upstreams = HashMap::new();
    for (service, address) in &config.routes {
        let upstream = Upstream::new(
            service,
            address,
            &config.upstream.server_name,
            client_tls.clone(),
            limits.keepalive_interval_ms,
        )?;
        upstreams.insert(service.clone(), Arc::new(upstream));
    }
    let served: Vec<&str> = config.routes.keys().map(String::as_str).collect();
    // Health: the gateway itself, and each service as the service reports it (mirrored below).
    // Reflection describes the routed services, which the gateway does not serve itself.
    let mut local = tonic::service::RoutesBuilder::default();
    let reporter = onestop_platform::server::standard_services(&mut local, &[""], &served).await?;
    for upstream in upstreams.values() {
        // Not serving until the service itself says otherwise.
        reporter
            .set_service_status(&upstream.service, tonic_health::ServingStatus::NotServing)
            .await;
        upstream.watch_health(reporter.clone(), shutdown.clone());
    }

    let gateway = Arc::new(Gateway {
        upstreams,
        policy,
        rates: MemberRates::new(config.gateway.rate_per_second, config.gateway.burst),
        slots: MemberSlots::new(config.gateway.max_in_flight_per_member),
        max_deadline: Duration::from_millis(config.gateway.max_deadline_ms),
        in_flight: Arc::new(tokio::sync::Semaphore::new(config.gateway.max_in_flight)),
        local: local.routes(),
    });
    forget_idle_members(gateway.clone(), shutdown.clone());

    let accepting = shutdown.child_token();
    let mut incoming = tls::accept(
        listener,
        server_tls,
        config.server.trust_domain.clone(),
        AcceptLimits {
            handshake_timeout: limits.handshake_timeout_ms,
            max_pending_handshakes: limits.max_pending_handshakes,
        },
        accepting.clone(),
    );
    let mut connections = JoinSet::new();
    let mut http2 = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    http2
        .timer(TokioTimer::new())
        .max_concurrent_streams(limits.max_concurrent_streams)
        .max_header_list_size(limits.max_header_list_bytes)
        .keep_alive_interval(Some(limits.keepalive_interval_ms))
        .keep_alive_timeout(limits.keepalive_timeout_ms)
        .initial_stream_window_size(onestop_platform::client::STREAM_WINDOW)
        .initial_connection_window_size(onestop_platform::client::CONNECTION_WINDOW)
        // The services date their answers; formatting a second date per call is waste.
        .auto_date_header(false);

    loop {
        let stream = tokio::select! {
            () = shutdown.cancelled() => break,
            next = incoming.next() => match next {
                Some(Ok(stream)) => stream,
                Some(Err(_)) => continue,
                None => break,
            },
        };
        // Finished connections leave a result behind; collect them as we go.
        while connections.try_join_next().is_some() {}
        let caller = Arc::new(proxy::Caller::new(&stream.peer().identity, &gateway.slots));
        // A peer that names no member gets its refusal on the first call, then the connection
        // is closed: it has nothing to wait for here.
        let stranger = !caller.is_member();
        let gateway = gateway.clone();
        let service = hyper::service::service_fn(move |request| {
            let gateway = gateway.clone();
            let caller = caller.clone();
            async move { Ok::<_, std::convert::Infallible>(gateway.handle(caller, request).await) }
        });
        let connection = http2.serve_connection(TokioIo::new(stream), service);
        let shutdown = shutdown.clone();
        connections.spawn(async move {
            tokio::pin!(connection);
            let closing = async {
                if stranger {
                    // Long enough for the refusal to be written; then GOAWAY.
                    tokio::select! {
                        () = tokio::time::sleep(STRANGER_GRACE) => {}
                        () = shutdown.cancelled() => {}
                    }
                } else {
                    shutdown.cancelled().await;
                }
            };
            tokio::select! {
                result = connection.as_mut() => {
                    if let Err(error) = result {
                        tracing::debug!(%error, "connection ended with an error");
                    }
                    return;
                }
                () = closing => {}
            }
            // GOAWAY: no new calls on this connection; the ones in flight run to the end.
            connection.as_mut().graceful_shutdown();
            let _ = connection.await;
        });
    }
    accepting.cancel();
    reporter
        .set_service_status("", tonic_health::ServingStatus::NotServing)
        .await;
    let drained = async { while connections.join_next().await.is_some() {} };
    if tokio::time::timeout(config.server.drain_timeout_ms, drained)
        .await
        .is_err()
    {
        tracing::warn!("calls still running after the drain timeout were cut off");
        connections.abort_all();
    }
    Ok(())
}

/// Drops the rate buckets of members that have been idle long enough to be full again, and
/// the slots of members without connections.
fn forget_idle_members(gateway: Arc<Gateway>, shutdown: CancellationToken) {
    tokio::spawn(async move {
        let mut every = tokio::time::interval(Duration::from_secs(60));
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                _ = every.tick() => {
                    gateway.rates.forget_idle();
                    gateway.slots.forget_idle();
                }
            }
        }
    });
}
