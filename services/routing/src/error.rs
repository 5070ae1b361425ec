//! The errors of the routing service, and the one place where they become gRPC statuses.

use onestop_platform::db::StoreError;
use onestop_platform::requests::RequestError;
use tonic::{Code, Status};
use tonic_types::FieldViolation;

/// The `ErrorInfo.domain` of this service.
pub const DOMAIN: &str = "routing.onestop.lv";

/// What can go wrong in the routing service.
#[derive(Debug, thiserror::Error)]
pub enum RoutingError {
    /// Request fields are malformed: each field and why.
    #[error("{}", .0.iter().map(|(f, m)| format!("{f}: {m}")).collect::<Vec<_>>().join("; "))]
    Invalid(Vec<(String, String)>),
    /// No such service, application or entry (or not one the caller may see).
    #[error("{0}")]
    NotFound(String),
    /// The service does not accept this: a form version, a channel, a level, a mandate, a
    /// status step. The reason names which.
    #[error("{message}")]
    Refused {
        /// The stable reason.
        reason: &'static str,
        /// Why.
        message: String,
    },
    /// The caller may not do this.
    #[error("{message}")]
    PermissionDenied {
        /// The stable reason.
        reason: &'static str,
        /// Why.
        message: String,
    },
    /// The forms service answered about the data: its status is passed on unchanged.
    #[error("{}", .0.message())]
    Forms(Status),
    /// A dependency cannot be reached; a later try may succeed.
    #[error("{0}")]
    Unavailable(String),
    /// A request id is malformed or was used before for another request.
    #[error(transparent)]
    Request(RequestError),
    /// The store failed.
    #[error("storage failure: {0}")]
    Store(#[from] StoreError),
    /// A bug.
    #[error("internal failure: {0}")]
    Internal(String),
}

impl RoutingError {
    /// One malformed field.
    pub fn invalid(field: &str, message: impl Into<String>) -> Self {
        RoutingError::Invalid(vec![(field.to_owned(), message.into())])
    }

    /// A refusal with a stable reason.
    pub fn refused(reason: &'static str, message: impl Into<String>) -> Self {
        RoutingError::Refused {
            reason,
            message: message.into(),
        }
    }

    /// A permission refusal with a stable reason.
    pub fn denied(reason: &'static str, message: impl Into<String>) -> Self {
        RoutingError::PermissionDenied {
            reason,
            message: message.into(),
        }
    }

    fn reason(&self) -> &'static str {
        match self {
            RoutingError::Invalid(_) => "INVALID_FIELD",
            RoutingError::NotFound(_) => "NOT_FOUND",
            RoutingError::Refused { reason, .. }
            | RoutingError::PermissionDenied { reason, .. } => reason,
            RoutingError::Forms(_) => "FORMS",
            RoutingError::Unavailable(_) => "DEPENDENCY_UNAVAILABLE",
            RoutingError::Request(_) => "REQUEST_ID_REUSED",
            RoutingError::Store(_) => "STORAGE_FAILURE",
            RoutingError::Internal(_) => "INTERNAL",
        }
    }

    fn code(&self) -> Code {
        match self {
            RoutingError::Invalid(_) | RoutingError::Request(_) => Code::InvalidArgument,
            RoutingError::NotFound(_) => Code::NotFound,
            RoutingError::Refused { .. } => Code::FailedPrecondition,
            RoutingError::PermissionDenied { .. } => Code::PermissionDenied,
            RoutingError::Forms(status) => status.code(),
            RoutingError::Unavailable(_) | RoutingError::Store(StoreError::Unavailable(_)) => {
                Code::Unavailable
            }
            RoutingError::Store(_) | RoutingError::Internal(_) => Code::Internal,
        }
    }
}

impl From<RequestError> for RoutingError {
    fn from(error: RequestError) -> Self {
        match error {
            RequestError::Store(store) => RoutingError::Store(store),
            refused => RoutingError::Request(refused),
        }
    }
}

impl From<RoutingError> for Status {
    fn from(error: RoutingError) -> Status {
        let error = match error {
            // The forms service's answer, field violations and all.
            RoutingError::Forms(status) => return status,
            RoutingError::Request(refused) => match refused.into_status() {
                Ok(status) => return status,
                Err(store) => RoutingError::Store(store),
            },
            other => other,
        };
        let message = match &error {
            RoutingError::Store(cause) => {
                tracing::error!(error = %cause, "routing store failed");
                "the routing store failed; the request may be retried".to_owned()
            }
            RoutingError::Internal(cause) => {
                tracing::error!(error = %cause, "routing failed");
                "the routing service failed on this request".to_owned()
            }
            other => other.to_string(),
        };
        let violations = match &error {
            RoutingError::Invalid(fields) => fields
                .iter()
                .map(|(field, why)| FieldViolation::new(field.clone(), why.clone()))
                .collect(),
            _ => Vec::new(),
        };
        onestop_platform::status::with_details(
            error.code(),
            DOMAIN,
            error.reason(),
            message,
            violations,
        )
    }
}
