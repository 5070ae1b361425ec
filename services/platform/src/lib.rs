//! What every onestop server links: typed configuration, mutual TLS and the development PKI,
//! caller identity, telemetry, databases, paging, error details, and the function that serves
//! gRPC with explicit limits and a bounded graceful shutdown.
//!
//! Layout, from the bottom up: [`identity`] (SPIFFE identities) → [`pki`] and [`tls`]
//! (certificates, rustls) → [`accept`] (admitting connections) → [`caller`] (who calls a service) → [`server`]
//! (serving) and [`client`] (calling) with [`config`], [`telemetry`], [`metrics`], [`db`], [`requests`], [`paging`], [`status`], [`failure`] (a service's errors as statuses), [`streams`] and [`inbox`] (consumer streams of
//! deliveries), [`person`] (the one parser of people's identifiers) and [`text`] (what text
//! fields may hold) beside them.

pub mod accept;
pub mod caller;
pub mod client;
pub mod clock;
pub mod config;
pub mod contract;
pub mod db;
pub mod failure;
pub mod identity;
pub mod inbox;
pub mod metrics;
pub mod paging;
pub mod person;
pub mod pki;
pub mod redact;
pub mod reload;
pub mod requests;
pub mod server;
pub mod status;
pub mod streams;
pub mod telemetry;
pub mod text;
pub mod tls;
pub mod tokens;

/// Resolves when the process is asked to stop (SIGTERM or SIGINT).
pub async fn shutdown_signal() {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(error) => {
                tracing::error!(%error, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = terminate => {}
    }
}
