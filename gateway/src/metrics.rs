//! The gateway's metrics, beside the calls every server counts: its own calls (by service,
//! method and code, with durations), refusals by reason and member, live upstream connections,
//! and stream messages held back by a member's rate.

use std::sync::OnceLock;

use onestop_platform::metrics::{self, Calls};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;

/// A refusal's labels.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Refusal {
    /// The stable reason, as in the status's `ErrorInfo`.
    pub reason: String,
    /// The member institution (`CLASS/CODE`), or `none` for a peer that names none.
    pub member: String,
}

/// A member's label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Member {
    /// The member institution (`CLASS/CODE`).
    pub member: String,
}

/// An upstream's label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Upstream {
    /// The gRPC service routed.
    pub service: String,
}

/// The gateway's metrics.
pub struct GatewayMetrics {
    /// Calls through the gateway.
    pub calls: Calls,
    /// Calls refused by the gateway itself.
    pub refusals: Family<Refusal, Counter>,
    /// HTTP/2 connections open to services.
    pub upstream_connections: Family<Upstream, Gauge>,
    /// Stream messages held back until the member's rate allowed them.
    pub delayed_messages: Family<Member, Counter>,
}

/// The gateway's metrics, registered on first use.
pub fn gateway() -> &'static GatewayMetrics {
    static METRICS: OnceLock<GatewayMetrics> = OnceLock::new();
    METRICS.get_or_init(|| {
        let gateway = GatewayMetrics {
            calls: Calls::register("gateway", "through the gateway"),
            refusals: Family::default(),
            upstream_connections: Family::default(),
            delayed_messages: Family::default(),
        };
        metrics::register(
            "gateway_refusals",
            "Calls the gateway refused itself, by reason and member",
            gateway.refusals.clone(),
        );
        metrics::register(
            "gateway_upstream_connections",
            "HTTP/2 connections open to each routed service",
            gateway.upstream_connections.clone(),
        );
        metrics::register(
            "gateway_delayed_stream_messages",
            "Stream messages held back until the member's rate allowed them",
            gateway.delayed_messages.clone(),
        );
        gateway
    })
}
