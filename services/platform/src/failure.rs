//! What a service's request can fail with, and the one place where that becomes a gRPC status
//! with a stable `ErrorInfo.reason` in the service's own domain and, for bad fields, a
//! `BadRequest` with each field's violation. The cause of the service's own failures is logged;
//! the caller reads about its request, never about our internals.
//!
//! A service names its domain once (`impl Domain for Routing { const NAME = ... }`) and uses
//! `Failure<ItsDomain>` as its error type.

use std::marker::PhantomData;

use tonic::{Code, Status};
use tonic_types::FieldViolation;

use crate::db::StoreError;
use crate::requests::RequestError;

/// A service's error domain, as `ErrorInfo.domain` carries it.
pub trait Domain: Send + Sync + 'static {
    /// Such as `routing.onestop.lv`.
    const NAME: &'static str;
}

/// What can go wrong in a service `D`.
#[derive(Debug, thiserror::Error)]
pub enum Failure<D: Domain> {
    /// Request fields are malformed: each field and why.
    #[error("{}", .0.iter().map(|(f, m)| format!("{f}: {m}")).collect::<Vec<_>>().join("; "))]
    Invalid(Vec<(String, String)>),
    /// No such resource (or not one the caller may see).
    #[error("{0}")]
    NotFound(String),
    /// The service does not accept this in the resource's present state; the reason says why.
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
    /// More than a limit allows.
    #[error("{0}")]
    TooLarge(String),
    /// Stored content no longer matches its digest.
    #[error("{0}")]
    DataLoss(String),
    /// Another platform service answered about the request: its status is passed on unchanged,
    /// field violations and all.
    #[error("{}", .0.message())]
    Upstream(Status),
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
    /// Never built: ties the error to its domain.
    #[doc(hidden)]
    #[error("")]
    _Domain(PhantomData<D>),
}

impl<D: Domain> Failure<D> {
    /// One malformed field.
    pub fn invalid(field: &str, message: impl Into<String>) -> Self {
        Failure::Invalid(vec![(field.to_owned(), message.into())])
    }

    /// A refusal with a stable reason.
    pub fn refused(reason: &'static str, message: impl Into<String>) -> Self {
        Failure::Refused {
            reason,
            message: message.into(),
        }
    }

    /// A permission refusal with a stable reason.
    pub fn denied(reason: &'static str, message: impl Into<String>) -> Self {
        Failure::PermissionDenied {
            reason,
            message: message.into(),
        }
    }

    fn reason(&self) -> &'static str {
        match self {
            Failure::Invalid(_) => "INVALID_FIELD",
            Failure::NotFound(_) => "NOT_FOUND",
            Failure::Refused { reason, .. } | Failure::PermissionDenied { reason, .. } => reason,
            Failure::TooLarge(_) => "TOO_LARGE",
            Failure::DataLoss(_) => "CONTENT_ALTERED",
            Failure::Upstream(_) => "UPSTREAM",
            Failure::Unavailable(_) => "DEPENDENCY_UNAVAILABLE",
            Failure::Request(_) => "REQUEST_ID_REUSED",
            Failure::Store(_) => "STORAGE_FAILURE",
            Failure::Internal(_) | Failure::_Domain(_) => "INTERNAL",
        }
    }

    fn code(&self) -> Code {
        match self {
            Failure::Invalid(_) | Failure::Request(_) => Code::InvalidArgument,
            Failure::NotFound(_) => Code::NotFound,
            Failure::Refused { .. } => Code::FailedPrecondition,
            Failure::PermissionDenied { .. } => Code::PermissionDenied,
            Failure::TooLarge(_) => Code::ResourceExhausted,
            Failure::DataLoss(_) => Code::DataLoss,
            Failure::Upstream(status) => status.code(),
            Failure::Unavailable(_) | Failure::Store(StoreError::Unavailable(_)) => {
                Code::Unavailable
            }
            Failure::Store(_) | Failure::Internal(_) | Failure::_Domain(_) => Code::Internal,
        }
    }
}

impl<D: Domain> From<RequestError> for Failure<D> {
    fn from(error: RequestError) -> Self {
        match error {
            RequestError::Store(store) => Failure::Store(store),
            refused => Failure::Request(refused),
        }
    }
}

impl<D: Domain> From<Failure<D>> for Status {
    fn from(error: Failure<D>) -> Status {
        let error = match error {
            Failure::Upstream(status) => return status,
            Failure::Request(refused) => match refused.into_status() {
                Ok(status) => return status,
                Err(store) => Failure::Store(store),
            },
            other => other,
        };
        let message = match &error {
            Failure::Store(cause) => {
                tracing::error!(error = %cause, domain = D::NAME, "a store failed");
                "the service's store failed; the request may be retried".to_owned()
            }
            Failure::Internal(cause) => {
                tracing::error!(error = %cause, domain = D::NAME, "a request failed");
                "the service failed on this request".to_owned()
            }
            other => other.to_string(),
        };
        let violations = match &error {
            Failure::Invalid(fields) => fields
                .iter()
                .map(|(field, why)| FieldViolation::new(field.clone(), why.clone()))
                .collect(),
            _ => Vec::new(),
        };
        crate::status::with_details(error.code(), D::NAME, error.reason(), message, violations)
    }
}
