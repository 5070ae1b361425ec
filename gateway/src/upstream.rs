//! The services behind the gateway: one pooled, multiplexed HTTP/2 connection per service over
//! internal mutual TLS (see `onestop_platform::client`), and a watcher that mirrors
//! each service's health into the gateway's own health service.

use std::sync::Arc;
use std::time::Duration;

use onestop_platform::client;
use rustls::ClientConfig;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;
use tonic_health::ServingStatus;
use tonic_health::pb::health_check_response::ServingStatus as WireStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::server::HealthReporter;

/// One service behind the gateway.
#[derive(Clone, Debug)]
pub struct Upstream {
    /// The gRPC service name, such as `onestop.forms.v1.FormsService`.
    pub service: String,
    /// Its address, `host:port`.
    pub address: String,
    /// The connection.
    pub channel: Channel,
}

/// Why an upstream is unusable.
#[derive(Debug, thiserror::Error)]
#[error("upstream {service} at {address}: {message}")]
pub struct UpstreamError {
    service: String,
    address: String,
    message: String,
}

impl Upstream {
    /// Prepares the connection to a service; it is made on first use and remade when lost.
    pub fn new(
        service: &str,
        address: &str,
        server_name: &str,
        tls: Arc<ClientConfig>,
        keepalive: Duration,
    ) -> Result<Self, UpstreamError> {
        let channel = client::channel(address, server_name, tls, keepalive).map_err(|e| {
            UpstreamError {
                service: service.to_owned(),
                address: address.to_owned(),
                message: e.to_string(),
            }
        })?;
        Ok(Self {
            service: service.to_owned(),
            address: address.to_owned(),
            channel,
        })
    }

    /// Mirrors the service's own health (`Health/Watch`) into `reporter` until `shutdown`,
    /// reporting NOT_SERVING while the service cannot be reached.
    pub fn watch_health(&self, reporter: HealthReporter, shutdown: CancellationToken) {
        let upstream = self.clone();
        tokio::spawn(async move {
            let mut backoff = Duration::from_millis(100);
            loop {
                let watched = upstream.mirror_health(&reporter);
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = watched => {}
                }
                reporter
                    .set_service_status(&upstream.service, ServingStatus::NotServing)
                    .await;
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        });
    }

    async fn mirror_health(&self, reporter: &HealthReporter) {
        let mut client = HealthClient::new(self.channel.clone());
        let request = tonic_health::pb::HealthCheckRequest {
            service: self.service.clone(),
        };
        let mut stream = match client.watch(request).await {
            Ok(response) => response.into_inner(),
            Err(status) => {
                tracing::debug!(service = %self.service, %status, "health watch failed");
                return;
            }
        };
        while let Ok(Some(update)) = stream.message().await {
            let status = match update.status() {
                WireStatus::Serving => ServingStatus::Serving,
                WireStatus::NotServing | WireStatus::ServiceUnknown => ServingStatus::NotServing,
                WireStatus::Unknown => ServingStatus::Unknown,
            };
            reporter.set_service_status(&self.service, status).await;
        }
    }
}
