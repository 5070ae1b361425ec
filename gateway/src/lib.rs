//! The one external entry point of the federation. It terminates mutual TLS for every member's
//! system, maps the client certificate to a member, checks the member's access rights for the
//! called method, holds it to its rate, budgets and a deadline cap, and forwards the call (unary
//! or any kind of stream) to the owning service over internal mutual TLS, frame by frame.
//!
//! Layout: [`connection`] (one connection's life: timeouts, closing) hands each call to
//! [`proxy`] (one call, as a story), which uses [`policy`] (access rights), [`limits`] (rates,
//! budgets, deadlines), [`body`] (metering and guarding bodies) and [`upstream`] (pools of
//! connections to services); this file holds the configuration and the accept loop.

pub mod body;
pub mod connection;
pub mod limits;
pub mod logs;
pub mod metrics;
pub mod people;
pub mod policy;
pub mod proxy;
pub mod upstream;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use onestop_platform::accept::{self, AcceptLimits};
use onestop_platform::config::{AdminConfig, ServerConfig, TelemetryConfig};
use onestop_platform::identity::SpiffeId;
use onestop_platform::reload::Reloading;
use onestop_platform::tls::{self, ClientAuth, ServerTls, TlsFiles, TlsMaterial};
use prost::Message;
use serde::Deserialize;
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_stream::StreamExt;
use tokio_util::sync::CancellationToken;

use crate::connection::Connections;
use crate::limits::{Budget, MemberRates, MemberSlots};
use crate::people::People;
use crate::policy::Policy;
use crate::proxy::Gateway;
use crate::upstream::{Upstream, UpstreamSettings};

/// The `ErrorInfo.domain` of the gateway's own statuses.
pub const DOMAIN: &str = "gateway.onestop.lv";

/// The configuration of the gateway process.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatewayConfig {
    /// The external listener: its certificate, the CA that members' certificates chain to, and
    /// its limits.
    pub server: ServerConfig,
    /// The gateway's own client identity towards the services.
    pub upstream: UpstreamConfig,
    /// gRPC service name → where the service runs.
    pub routes: BTreeMap<String, Route>,
    /// Access rights and per-member limits.
    pub gateway: GatewaySettings,
    /// Logs and traces.
    #[serde(default)]
    pub telemetry: TelemetryConfig,
    /// Metrics, liveness and readiness.
    #[serde(default)]
    pub admin: AdminConfig,
}

/// One route: where a gRPC service runs, and who must answer there.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Route {
    /// `host:port` of its replicas; each name is resolved to all its addresses, and again every
    /// `[upstream] resolve_interval_ms`.
    pub addresses: Vec<String>,
    /// The platform component that serves it: the certificate found there must name
    /// `spiffe://<trust domain>/platform/<component>`.
    pub component: String,
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
    /// HTTP/2 connections kept to each address of a route.
    #[serde(default = "default_connections_per_address")]
    pub connections_per_address: usize,
    /// How often the routes' names are resolved again.
    #[serde(default = "default_resolve_interval")]
    pub resolve_interval_ms: u64,
}

fn default_server_name() -> String {
    "localhost".to_owned()
}
fn default_connections_per_address() -> usize {
    4
}
fn default_resolve_interval() -> u64 {
    30_000
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
    /// Deadline caps of single methods (`package.Service/Method`) in milliseconds, instead of
    /// `max_deadline_ms`; `0` means no cap, for streams meant to stay open (an inbox).
    #[serde(default)]
    pub method_deadlines_ms: BTreeMap<String, u64>,
    /// Calls in flight at once across all connections (streams not counted).
    #[serde(default = "default_max_in_flight")]
    pub max_in_flight: usize,
    /// Calls one member institution may have in flight at once.
    #[serde(default = "default_max_in_flight_per_member")]
    pub max_in_flight_per_member: usize,
    /// Long-lived streams (methods that stream, such as `Health/Watch`) open at once across all
    /// connections.
    #[serde(default = "default_max_streams")]
    pub max_streams: usize,
    /// Long-lived streams one member institution may have open at once.
    #[serde(default = "default_max_streams_per_member")]
    pub max_streams_per_member: usize,
    /// Connections one member institution may have open at once.
    #[serde(default = "default_max_connections_per_member")]
    pub max_connections_per_member: usize,
    /// New connections a second each member institution may open on average (bursts of
    /// `max_connections_per_member`); a member reconnecting faster is refused, and what it
    /// does beyond counts against its source address (see `docs/gateway.md`).
    #[serde(default = "default_connections_per_second_per_member")]
    pub connections_per_second_per_member: u32,
    /// Calls a second each person (by their token's subject) may make on average.
    #[serde(default = "default_person_rate")]
    pub person_rate_per_second: u32,
    /// Calls a person may make at once above their rate.
    #[serde(default = "default_person_burst")]
    pub person_burst: u32,
}

fn default_person_rate() -> u32 {
    10
}
fn default_person_burst() -> u32 {
    30
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
fn default_max_streams() -> usize {
    1024
}
fn default_max_streams_per_member() -> usize {
    32
}
fn default_max_connections_per_member() -> usize {
    64
}
fn default_connections_per_second_per_member() -> u32 {
    10
}

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
    /// A setting is unusable.
    #[error("configuration: {0}")]
    Config(String),
}

/// The paths (`package.Service/Method`) of the methods in the contract that stream requests or
/// responses: they get the streams budget, not the calls budget.
fn streaming_methods() -> HashSet<String> {
    let sets = [
        onestop_proto::FILE_DESCRIPTOR_SET,
        tonic_health::pb::FILE_DESCRIPTOR_SET,
        tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET,
        tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
    ];
    let mut methods = HashSet::new();
    for set in sets {
        let Ok(set) = prost_types::FileDescriptorSet::decode(set) else {
            continue;
        };
        for file in set.file {
            for service in &file.service {
                for method in &service.method {
                    if method.client_streaming() || method.server_streaming() {
                        methods.insert(format!(
                            "{}.{}/{}",
                            file.package(),
                            service.name(),
                            method.name()
                        ));
                    }
                }
            }
        }
    }
    methods
}

/// Runs the gateway on a bound listener until `shutdown` is cancelled, then stops accepting and
/// lets calls in flight finish for at most the drain timeout.
pub async fn serve(
    config: &GatewayConfig,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<(), GatewayError> {
    let limits = config.server.limits;
    // Registered now, so that `/metrics` shows the gateway's families before the first call.
    metrics::gateway();
    let policy_file = config.gateway.policy.clone();
    let policy = Arc::new(Reloading::new(
        "access policy",
        Some(policy_file.clone()),
        move || Policy::load(&policy_file),
    )?);
    policy.watch(config.server.reload_interval_ms, shutdown.clone());
    let tls = ServerTls::load(&config.server.tls, ClientAuth::Optional)?;
    tls.watch(config.server.reload_interval_ms, shutdown.clone());
    let client_material = TlsMaterial::load(&config.upstream.tls)?;

    let mut upstreams = HashMap::new();
    for (service, route) in &config.routes {
        let identity = SpiffeId::parse(&format!(
            "spiffe://{}/platform/{}",
            config.server.trust_domain, route.component
        ))
        .map_err(|e| GatewayError::Config(format!("routes.\"{service}\".component: {e}")))?;
        let upstream = Upstream::new(
            service,
            UpstreamSettings {
                addresses: route.addresses.clone(),
                server_name: config.upstream.server_name.clone(),
                tls: tls::client_config(&client_material, Some(&identity))?,
                connections_per_address: config.upstream.connections_per_address,
                keepalive: limits.keepalive_interval_ms,
            },
        )?;
        let upstream = Arc::new(upstream);
        upstream.resolve().await;
        upstream.keep_resolving(
            Duration::from_millis(config.upstream.resolve_interval_ms),
            shutdown.clone(),
        );
        upstreams.insert(service.clone(), upstream);
    }
    let served: Vec<&str> = config.routes.keys().map(String::as_str).collect();
    // Health: the gateway itself, and each service as the service reports it (mirrored below).
    // Reflection describes the routed services, which the gateway does not serve itself.
    let mut local = tonic::service::RoutesBuilder::default();
    let reporter = onestop_platform::server::standard_services(&mut local, &served)?;
    for upstream in upstreams.values() {
        // Not serving until the service itself says otherwise.
        reporter
            .set_service_status(&upstream.service, tonic_health::ServingStatus::NotServing)
            .await;
        upstream.watch_health(reporter.clone(), shutdown.clone());
    }

    let settings = &config.gateway;
    let people = Arc::new(People::new(
        &config.server.trust_domain,
        upstreams.get(people::IDENTITY_SERVICE).cloned(),
        MemberRates::new(settings.person_rate_per_second, settings.person_burst),
    ));
    people.keep_fresh(shutdown.clone());
    let gateway = Arc::new(Gateway {
        upstreams,
        policy,
        people: people.clone(),
        rates: Arc::new(MemberRates::new(settings.rate_per_second, settings.burst)),
        calls: Budget::new(
            "calls",
            settings.max_in_flight,
            settings.max_in_flight_per_member,
        ),
        streams: Budget::new(
            "streams",
            settings.max_streams,
            settings.max_streams_per_member,
        ),
        connections: MemberSlots::new(settings.max_connections_per_member),
        reconnections: MemberRates::new(
            settings.connections_per_second_per_member,
            u32::try_from(settings.max_connections_per_member).unwrap_or(u32::MAX),
        ),
        streaming: streaming_methods(),
        max_deadline: Duration::from_millis(settings.max_deadline_ms),
        method_deadlines: settings
            .method_deadlines_ms
            .iter()
            .map(|(method, ms)| {
                let cap = (*ms > 0).then(|| Duration::from_millis(*ms));
                (method.clone(), cap)
            })
            .collect(),
        max_header_bytes: limits.max_header_list_bytes as usize,
        tls: tls.clone(),
        local: local.routes(),
        shutdown: shutdown.clone(),
    });
    forget_idle_members(gateway.clone(), shutdown.clone());
    logs::refusals().keep_summarizing(shutdown.clone());

    let accepting = shutdown.child_token();
    let mut incoming = accept::accept(
        listener,
        tls,
        config.server.trust_domain.clone(),
        AcceptLimits::from(&limits),
        accepting.clone(),
    );
    let connections = Connections::new(&limits);
    let ready = onestop_platform::metrics::Readiness::process().part("gateway");
    ready.set(true);
    let mut running = JoinSet::new();
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
        while running.try_join_next().is_some() {}
        running.spawn(connections.serve(gateway.clone(), stream, shutdown.clone()));
    }
    accepting.cancel();
    ready.set(false);
    reporter
        .set_service_status("", tonic_health::ServingStatus::NotServing)
        .await;
    let drained = async { while running.join_next().await.is_some() {} };
    if tokio::time::timeout(config.server.drain_timeout_ms, drained)
        .await
        .is_err()
    {
        tracing::warn!("calls still running after the drain timeout were cut off");
        running.abort_all();
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
                    gateway.people.rates.forget_idle();
                    gateway.calls.forget_idle();
                    gateway.streams.forget_idle();
                    gateway.connections.forget_idle();
                    gateway.reconnections.forget_idle();
                }
            }
        }
    });
}
