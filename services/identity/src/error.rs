//! The errors of the identity service, and the one place where they become gRPC statuses.

use onestop_platform::db::StoreError;
use onestop_platform::person::Level;
use onestop_platform::requests::RequestError;
use tonic::{Code, Status};
use tonic_types::FieldViolation;

/// The `ErrorInfo.domain` of this service.
pub const DOMAIN: &str = "identity.onestop.lv";

/// What can go wrong in the identity service.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// A request field is malformed.
    #[error("{field}: {message}")]
    InvalidField {
        /// The request field.
        field: String,
        /// What is wrong.
        message: String,
    },
    /// The service catalogue, which a mandate's services are checked against, cannot be read.
    #[error("{0}")]
    CatalogueUnavailable(String),
    /// No provider of that id.
    #[error("no login provider `{0}`; ListProviders names them")]
    UnknownProvider(String),
    /// The redirect URI is not one registered for the calling system.
    #[error("redirect_uri is not registered for {0}")]
    RedirectNotRegistered(String),
    /// The login's state is unknown, used, expired or another system's.
    #[error("no pending login has this state (it is unknown, used, expired, or another system's)")]
    UnknownLogin,
    /// The provider's answer does not prove a login.
    #[error("the login failed: {0}")]
    LoginRefused(String),
    /// The provider vouched for a lower level than asked.
    #[error("the login reached level {got}, but {required} was required")]
    LevelTooLow {
        /// What the provider vouched for.
        got: Level,
        /// What was asked.
        required: Level,
    },
    /// The provider's ID token (or token response) cannot be read: a claim of the wrong type,
    /// a required claim missing. The login is refused; trying again will not help until the
    /// provider sends well-formed tokens.
    #[error("the login failed: the provider's ID token is malformed: {0}")]
    IdTokenMalformed(String),
    /// The provider sent the browser back with an `error` instead of a code.
    #[error(
        "the login provider `{provider}` ended the login with `{error}` (the person declined, or the provider refused them); start a new login to try again"
    )]
    DeniedAtProvider {
        /// The provider.
        provider: String,
        /// Its `error` code, such as `access_denied`.
        error: String,
    },
    /// The provider's metadata does not fit its configuration: no login can work until an
    /// operator corrects one or the other.
    #[error("the login provider `{provider}` is misconfigured: {detail}")]
    ProviderMisconfigured {
        /// The provider.
        provider: String,
        /// Which mismatch, as the stable reason.
        reason: Misconfiguration,
        /// What an operator has to correct.
        detail: String,
    },
    /// The provider cannot be reached or answered nonsense; a later try may succeed.
    #[error("the login provider `{0}` is unavailable; try again later")]
    ProviderUnavailable(String),
    /// The refresh token is unknown, expired, or its session ended.
    #[error("the session is not active (refresh token unknown, expired, used, or logged out)")]
    SessionEnded,
    /// A refresh token was used a second time: the session is ended.
    #[error("this refresh token was used before; the session is ended as a precaution")]
    RefreshReused,
    /// The call carries no person, or the wrong kind.
    #[error("{0}")]
    PersonRequired(String),
    /// The person may not do this.
    #[error("{0}")]
    PermissionDenied(String),
    /// No such mandate (or not one the caller may see).
    #[error("{0} does not exist")]
    NotFound(String),
    /// The mandate cannot be used: revoked, expired, not yet valid.
    #[error("{0}")]
    MandateUnusable(String),
    /// A request id is malformed or was used before for another request.
    #[error(transparent)]
    Request(RequestError),
    /// The store failed.
    #[error("storage failure: {0}")]
    Store(#[from] StoreError),
    /// A bug, or the keys failed.
    #[error("internal failure: {0}")]
    Internal(String),
}

/// How a provider's metadata contradicts its configuration.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Misconfiguration {
    /// Its discovery document names another issuer than the configured one.
    IssuerMismatch,
    /// An endpoint the service calls (keys, token) is on another origin than the issuer.
    EndpointOnAnotherOrigin,
    /// It supports none of the client authentication methods the service can use, or not the
    /// configured one.
    ClientAuthUnsupported,
}

impl Misconfiguration {
    fn reason(self) -> &'static str {
        match self {
            Misconfiguration::IssuerMismatch => "PROVIDER_ISSUER_MISMATCH",
            Misconfiguration::EndpointOnAnotherOrigin => "PROVIDER_ENDPOINT_ON_ANOTHER_ORIGIN",
            Misconfiguration::ClientAuthUnsupported => "PROVIDER_CLIENT_AUTH_UNSUPPORTED",
        }
    }
}

impl IdentityError {
    /// A malformed request field.
    pub fn invalid(field: &str, message: impl Into<String>) -> Self {
        IdentityError::InvalidField {
            field: field.to_owned(),
            message: message.into(),
        }
    }

    fn reason(&self) -> &'static str {
        match self {
            IdentityError::InvalidField { .. } => "INVALID_FIELD",
            IdentityError::UnknownProvider(_) => "UNKNOWN_PROVIDER",
            IdentityError::RedirectNotRegistered(_) => "REDIRECT_URI_NOT_REGISTERED",
            IdentityError::UnknownLogin => "UNKNOWN_LOGIN",
            IdentityError::LoginRefused(_) => "LOGIN_REFUSED",
            IdentityError::LevelTooLow { .. } => "LEVEL_OF_ASSURANCE_TOO_LOW",
            IdentityError::IdTokenMalformed(_) => "ID_TOKEN_MALFORMED",
            IdentityError::DeniedAtProvider { .. } => "LOGIN_DENIED_AT_PROVIDER",
            IdentityError::ProviderMisconfigured { reason, .. } => reason.reason(),
            IdentityError::ProviderUnavailable(_) => "PROVIDER_UNAVAILABLE",
            IdentityError::CatalogueUnavailable(_) => "CATALOGUE_UNAVAILABLE",
            IdentityError::SessionEnded => "SESSION_ENDED",
            IdentityError::RefreshReused => "REFRESH_TOKEN_REUSED",
            IdentityError::PersonRequired(_) => "PERSON_TOKEN_REQUIRED",
            IdentityError::PermissionDenied(_) => "NOT_PERMITTED",
            IdentityError::NotFound(_) => "NOT_FOUND",
            IdentityError::MandateUnusable(_) => "MANDATE_NOT_USABLE",
            IdentityError::Request(_) => "REQUEST_ID_REUSED",
            IdentityError::Store(_) => "STORAGE_FAILURE",
            IdentityError::Internal(_) => "INTERNAL",
        }
    }

    fn code(&self) -> Code {
        match self {
            IdentityError::InvalidField { .. }
            | IdentityError::RedirectNotRegistered(_)
            | IdentityError::Request(_) => Code::InvalidArgument,
            IdentityError::UnknownProvider(_) | IdentityError::NotFound(_) => Code::NotFound,
            IdentityError::UnknownLogin
            | IdentityError::LoginRefused(_)
            | IdentityError::IdTokenMalformed(_)
            | IdentityError::DeniedAtProvider { .. }
            | IdentityError::LevelTooLow { .. }
            | IdentityError::SessionEnded
            | IdentityError::RefreshReused
            | IdentityError::PersonRequired(_) => Code::Unauthenticated,
            IdentityError::PermissionDenied(_) => Code::PermissionDenied,
            IdentityError::MandateUnusable(_) | IdentityError::ProviderMisconfigured { .. } => {
                Code::FailedPrecondition
            }
            IdentityError::ProviderUnavailable(_)
            | IdentityError::CatalogueUnavailable(_)
            | IdentityError::Store(StoreError::Unavailable(_)) => Code::Unavailable,
            IdentityError::Store(_) | IdentityError::Internal(_) => Code::Internal,
        }
    }
}

impl From<RequestError> for IdentityError {
    fn from(error: RequestError) -> Self {
        match error {
            RequestError::Store(store) => IdentityError::Store(store),
            refused => IdentityError::Request(refused),
        }
    }
}

impl From<IdentityError> for Status {
    fn from(error: IdentityError) -> Status {
        if let IdentityError::Request(refused) = error {
            return match refused.into_status() {
                Ok(status) => status,
                Err(store) => IdentityError::Store(store).into(),
            };
        }
        let code = error.code();
        let message = match &error {
            IdentityError::Store(cause) => {
                tracing::error!(error = %cause, "identity store failed");
                "the identity store failed; the request may be retried".to_owned()
            }
            IdentityError::Internal(cause) => {
                tracing::error!(error = %cause, "identity failed");
                "the identity service failed on this request".to_owned()
            }
            IdentityError::ProviderMisconfigured {
                provider, detail, ..
            } => {
                tracing::error!(provider, detail, "a login provider is misconfigured");
                error.to_string()
            }
            IdentityError::LoginRefused(cause) | IdentityError::IdTokenMalformed(cause) => {
                // The detail helps operators; the caller hears that the login failed and why in
                // general terms.
                tracing::info!(%cause, "login refused");
                error.to_string()
            }
            other => other.to_string(),
        };
        let violations = match &error {
            IdentityError::InvalidField { field, message } => {
                vec![FieldViolation::new(field.clone(), message.clone())]
            }
            _ => Vec::new(),
        };
        let metadata = match &error {
            // The level to log in with again (step-up), machine-readable.
            IdentityError::LevelTooLow { required, .. } => {
                vec![("required_level".to_owned(), required.as_str().to_owned())]
            }
            // What the provider said, for a front end that tells a declined login apart.
            IdentityError::DeniedAtProvider { error, .. } => {
                vec![("provider_error".to_owned(), error.clone())]
            }
            _ => Vec::new(),
        };
        onestop_platform::status::with_info(
            code,
            DOMAIN,
            error.reason(),
            metadata,
            message,
            violations,
        )
    }
}
