//! The service catalogue, asked of the routing service directly over internal mutual TLS with
//! this process's own certificate (routing knows it as the platform component `identity`): a
//! mandate may name only services a resident can apply for.

use std::collections::HashSet;
use std::time::Duration;

use onestop_platform::config::ServerConfig;
use onestop_platform::telemetry;
use onestop_proto::routing::v1::GetCatalogueRequest;
use onestop_proto::routing::v1::catalogue_service_client::CatalogueServiceClient;
use tonic::transport::Channel;
use tracing::Instrument;

use crate::error::IdentityError;

/// How long asking the catalogue may take.
const DEADLINE: Duration = Duration::from_secs(10);

/// The routing service's catalogue, as identity asks it.
#[derive(Clone, Debug)]
pub struct Catalogue {
    client: CatalogueServiceClient<Channel>,
}

impl Catalogue {
    /// A lazily connecting client to the routing service at `address`, which must present the
    /// `routing` component's certificate for `server_name`.
    pub fn connect(
        server: &ServerConfig,
        address: &str,
        server_name: &str,
    ) -> Result<Self, String> {
        let channel =
            onestop_platform::client::to_component(server, address, server_name, "routing")
                .map_err(|e| e.to_string())?;
        Ok(Self {
            client: CatalogueServiceClient::new(channel),
        })
    }

    /// Refuses the first of `services` that the catalogue does not have, as a field violation
    /// at `services[i]`. The catalogue is asked each time: mandates are registered by hand, a
    /// few a day at a centre, and a service added to the catalogue is usable at once.
    pub async fn check(&self, services: &[String]) -> Result<(), IdentityError> {
        let mut request = tonic::Request::new(GetCatalogueRequest {});
        request.set_timeout(DEADLINE);
        let span = telemetry::client_span(
            &mut request,
            "/onestop.routing.v1.CatalogueService/GetCatalogue",
            "identity",
        );
        let answer = self
            .client
            .clone()
            .get_catalogue(request)
            .instrument(span.clone())
            .await;
        telemetry::record_outcome(&span, &answer);
        let catalogue = answer
            .map_err(|status| {
                IdentityError::CatalogueUnavailable(format!(
                    "the service catalogue cannot be read now ({}); retry later",
                    status.message()
                ))
            })?
            .into_inner();
        let known: HashSet<&str> = catalogue
            .services
            .iter()
            .map(|s| s.service_id.as_str())
            .collect();
        match services
            .iter()
            .enumerate()
            .find(|(_, id)| !known.contains(id.as_str()))
        {
            Some((at, id)) => Err(IdentityError::invalid(
                &format!("services[{at}]"),
                format!(
                    "`{}` is not a service of the catalogue; a mandate names services a \
                     resident can apply for",
                    onestop_platform::status::echo(id)
                ),
            )),
            None => Ok(()),
        }
    }
}
