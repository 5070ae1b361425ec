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
            IdentityError::ProviderUnavailable(_) => "PROVIDER_UNAVAILABLE",
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
            | IdentityError::LevelTooLow { .. }
            | IdentityError::SessionEnded
            | IdentityError::RefreshReused
            | IdentityError::PersonRequired(_) => Code::Unauthenticated,
            IdentityError::PermissionDenied(_) => Code::PermissionDenied,
            IdentityError::MandateUnusable(_) => Code::FailedPrecondition,
            IdentityError::ProviderUnavailable(_)
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
            IdentityError::LoginRefused(cause) => {
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
