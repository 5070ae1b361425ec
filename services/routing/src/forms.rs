//! Validation of application data by the forms service, called directly over internal mutual
//! TLS with this process's own certificate (the forms service knows it as a platform
//! component, not a member).

use std::time::Duration;

use onestop_platform::config::ServerConfig;
use onestop_platform::telemetry;
use onestop_proto::forms::v1::ValidateFormDataRequest;
use onestop_proto::forms::v1::forms_service_client::FormsServiceClient;
use tonic::Code;
use tonic::transport::Channel;
use tracing::Instrument;

use crate::RoutingSettings;
use crate::error::RoutingError;

/// How long one validation may take.
const VALIDATION_DEADLINE: Duration = Duration::from_secs(10);

/// The forms service, as routing calls it.
#[derive(Clone, Debug)]
pub struct Forms {
    client: FormsServiceClient<Channel>,
}

impl Forms {
    /// A lazily connecting client to the configured forms service, which must present the
    /// `forms` component's certificate.
    pub fn connect(server: &ServerConfig, settings: &RoutingSettings) -> Result<Self, String> {
        let channel = onestop_platform::client::to_component(
            server,
            &settings.forms_address,
            &settings.forms_server_name,
            "forms",
        )
        .map_err(|e| e.to_string())?;
        Ok(Self {
            client: FormsServiceClient::new(channel),
        })
    }

    /// Validates `data_json` against a form version and returns the version's subject fields
    /// (the JSON Pointers where the data names the person it is about). Invalid data is the
    /// forms service's `INVALID_ARGUMENT` with its field violations, passed on unchanged.
    pub async fn validate(
        &self,
        form_id: &str,
        version: &str,
        data_json: &str,
    ) -> Result<Vec<String>, RoutingError> {
        let mut request = tonic::Request::new(ValidateFormDataRequest {
            name: format!("forms/{form_id}/versions/{version}"),
            data_json: data_json.to_owned(),
        });
        request.set_timeout(VALIDATION_DEADLINE);
        // The caller's trace goes on into the forms service.
        let span = telemetry::client_span(
            &mut request,
            "/onestop.forms.v1.FormsService/ValidateFormData",
            "routing",
        );
        let answer = self
            .client
            .clone()
            .validate_form_data(request)
            .instrument(span.clone())
            .await;
        telemetry::record_outcome(&span, &answer);
        match answer {
            Ok(response) => Ok(response.into_inner().subject_fields),
            Err(status) => match status.code() {
                // About the data or the form version: the caller's to fix.
                Code::InvalidArgument | Code::NotFound | Code::FailedPrecondition => {
                    Err(RoutingError::Upstream(status))
                }
                Code::Unavailable | Code::DeadlineExceeded | Code::ResourceExhausted => {
                    Err(RoutingError::Unavailable(format!(
                        "the forms service cannot validate now ({}); retry later",
                        status.message()
                    )))
                }
                _ => Err(RoutingError::Internal(format!(
                    "forms validation failed: {:?} {}",
                    status.code(),
                    status.message()
                ))),
            },
        }
    }
}
