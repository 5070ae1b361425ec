//! The errors of the e-address service, and the one place where they become gRPC statuses.

use onestop_platform::db::StoreError;
use onestop_platform::requests::RequestError;
use tonic::{Code, Status};
use tonic_types::FieldViolation;

/// The `ErrorInfo.domain` of this service.
pub const DOMAIN: &str = "eaddress.onestop.lv";

/// What can go wrong in the e-address service.
#[derive(Debug, thiserror::Error)]
pub enum EaddressError {
    /// Request fields are malformed: each field and why.
    #[error("{}", .0.iter().map(|(f, m)| format!("{f}: {m}")).collect::<Vec<_>>().join("; "))]
    Invalid(Vec<(String, String)>),
    /// No such mailbox, message or attachment (or not one the caller may see).
    #[error("{0}")]
    NotFound(String),
    /// The service does not accept this (a reply outside the caller's threads, an attachment
    /// not uploaded). The reason names which.
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
    /// Stored content no longer matches its digest.
    #[error("{0}")]
    DataLoss(String),
    /// More than a limit allows.
    #[error("{0}")]
    TooLarge(String),
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

impl EaddressError {
    /// One malformed field.
    pub fn invalid(field: &str, message: impl Into<String>) -> Self {
        EaddressError::Invalid(vec![(field.to_owned(), message.into())])
    }

    /// A refusal with a stable reason.
    pub fn refused(reason: &'static str, message: impl Into<String>) -> Self {
        EaddressError::Refused {
            reason,
            message: message.into(),
        }
    }

    /// A permission refusal with a stable reason.
    pub fn denied(reason: &'static str, message: impl Into<String>) -> Self {
        EaddressError::PermissionDenied {
            reason,
            message: message.into(),
        }
    }

    fn reason(&self) -> &'static str {
        match self {
            EaddressError::Invalid(_) => "INVALID_FIELD",
            EaddressError::NotFound(_) => "NOT_FOUND",
            EaddressError::Refused { reason, .. }
            | EaddressError::PermissionDenied { reason, .. } => reason,
            EaddressError::DataLoss(_) => "CONTENT_ALTERED",
            EaddressError::TooLarge(_) => "TOO_LARGE",
            EaddressError::Unavailable(_) => "DEPENDENCY_UNAVAILABLE",
            EaddressError::Request(_) => "REQUEST_ID_REUSED",
            EaddressError::Store(_) => "STORAGE_FAILURE",
            EaddressError::Internal(_) => "INTERNAL",
        }
    }

    fn code(&self) -> Code {
        match self {
            EaddressError::Invalid(_) | EaddressError::Request(_) => Code::InvalidArgument,
            EaddressError::NotFound(_) => Code::NotFound,
            EaddressError::Refused { .. } => Code::FailedPrecondition,
            EaddressError::PermissionDenied { .. } => Code::PermissionDenied,
            EaddressError::DataLoss(_) => Code::DataLoss,
            EaddressError::TooLarge(_) => Code::ResourceExhausted,
            EaddressError::Unavailable(_) | EaddressError::Store(StoreError::Unavailable(_)) => {
                Code::Unavailable
            }
            EaddressError::Store(_) | EaddressError::Internal(_) => Code::Internal,
        }
    }
}

impl From<RequestError> for EaddressError {
    fn from(error: RequestError) -> Self {
        match error {
            RequestError::Store(store) => EaddressError::Store(store),
            refused => EaddressError::Request(refused),
        }
    }
}

impl From<EaddressError> for Status {
    fn from(error: EaddressError) -> Status {
        let error = match error {
            EaddressError::Request(refused) => match refused.into_status() {
                Ok(status) => return status,
                Err(store) => EaddressError::Store(store),
            },
            other => other,
        };
        let message = match &error {
            EaddressError::Store(cause) => {
                tracing::error!(error = %cause, "e-address store failed");
                "the e-address store failed; the request may be retried".to_owned()
            }
            EaddressError::Internal(cause) => {
                tracing::error!(error = %cause, "e-address failed");
                "the e-address service failed on this request".to_owned()
            }
            other => other.to_string(),
        };
        let violations = match &error {
            EaddressError::Invalid(fields) => fields
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
