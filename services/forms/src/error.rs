//! The errors of the e-forms service, and the one place where they become gRPC statuses.

use tonic::{Code, Status};
use tonic_types::{FieldViolation, LocalizedMessage};

use crate::compat::Narrowing;
use crate::schema::{JsonError, Violation};
use crate::store::StoreError;
use onestop_platform::requests::RequestError;

/// The `ErrorInfo.domain` of this service.
pub const DOMAIN: &str = "forms.onestop.lv";

/// What can go wrong in the e-forms service.
#[derive(Debug, thiserror::Error)]
pub enum FormsError {
    /// A request field is malformed.
    #[error("{field}: {message}")]
    InvalidField {
        /// The request field.
        field: String,
        /// What is wrong.
        message: String,
    },
    /// A submitted schema is not usable.
    #[error("the schema is not usable: {}", .0.en)]
    InvalidSchema(Violation),
    /// JSON text could not be read at all.
    #[error("{field}: {error}")]
    InvalidJson {
        /// The request field holding it.
        field: &'static str,
        /// Why.
        error: JsonError,
    },
    /// The data does not satisfy the form.
    #[error("the data does not satisfy {version}: {} problem(s)", .violations.len())]
    InvalidData {
        /// The version validated against.
        version: String,
        /// One per problem.
        violations: Vec<Violation>,
    },
    /// No such form or version.
    #[error("{0} does not exist")]
    NotFound(String),
    /// The form exists already.
    #[error("{0} exists already")]
    AlreadyExists(String),
    /// The caller may not do this.
    #[error("{0}")]
    PermissionDenied(String),
    /// The new version narrows the previous one and was not declared breaking.
    #[error(
        "the new version would reject data that version {previous} accepts; publish it with `breaking` set if that is intended"
    )]
    Breaking {
        /// The previous version number.
        previous: u32,
        /// Where and how.
        narrowings: Vec<Narrowing>,
    },
    /// The version accepts no new data.
    #[error("{version} is deprecated ({reason}){}", latest_hint(*.latest))]
    Deprecated {
        /// The version.
        version: String,
        /// Why.
        reason: String,
        /// The newest active version, if there is one.
        latest: Option<u32>,
    },
    /// A request id is malformed or was used before for another request.
    #[error(transparent)]
    Request(RequestError),
    /// Another change to the same form won the race.
    #[error("{0} was changed at the same time by another request; read it again and retry")]
    Concurrent(String),
    /// The breaking-change check failed on a schema (a bug in the check, such as a panic).
    #[error("the breaking-change check failed: {0}")]
    CompatibilityCheck(String),
    /// The store failed.
    #[error("storage failure: {0}")]
    Store(#[from] StoreError),
    /// A bug: work that should not fail did.
    #[error("internal failure: {0}")]
    Internal(String),
}

impl From<RequestError> for FormsError {
    fn from(error: RequestError) -> Self {
        match error {
            RequestError::Store(store) => FormsError::Store(store),
            refused => FormsError::Request(refused),
        }
    }
}

fn latest_hint(latest: Option<u32>) -> String {
    latest.map_or_else(String::new, |n| format!("; use version {n}"))
}

impl FormsError {
    fn reason(&self) -> &'static str {
        match self {
            FormsError::InvalidField { .. } => "INVALID_FIELD",
            FormsError::InvalidSchema(_) => "INVALID_SCHEMA",
            FormsError::InvalidJson { .. } => "INVALID_JSON",
            FormsError::InvalidData { .. } => "INVALID_FORM_DATA",
            FormsError::NotFound(_) => "NOT_FOUND",
            FormsError::AlreadyExists(_) => "FORM_EXISTS",
            FormsError::PermissionDenied(_) => "NOT_FORM_OWNER",
            FormsError::Breaking { .. } => "BREAKING_VERSION",
            FormsError::Deprecated { .. } => "FORM_VERSION_DEPRECATED",
            // Answered by the platform's status (see `From<FormsError> for Status`).
            FormsError::Request(_) => "REQUEST_ID_REUSED",
            FormsError::Concurrent(_) => "CONCURRENT_CHANGE",
            FormsError::CompatibilityCheck(_) => "COMPATIBILITY_CHECK_FAILED",
            FormsError::Store(_) => "STORAGE_FAILURE",
            FormsError::Internal(_) => "INTERNAL",
        }
    }

    fn code(&self) -> Code {
        match self {
            FormsError::InvalidField { .. }
            | FormsError::InvalidSchema(_)
            | FormsError::InvalidJson { .. }
            | FormsError::InvalidData { .. }
            | FormsError::Request(_) => Code::InvalidArgument,
            FormsError::NotFound(_) => Code::NotFound,
            FormsError::AlreadyExists(_) => Code::AlreadyExists,
            FormsError::PermissionDenied(_) => Code::PermissionDenied,
            FormsError::Breaking { .. } | FormsError::Deprecated { .. } => Code::FailedPrecondition,
            FormsError::Concurrent(_) => Code::Aborted,
            FormsError::Store(StoreError::Unavailable(_)) => Code::Unavailable,
            FormsError::CompatibilityCheck(_) | FormsError::Store(_) | FormsError::Internal(_) => {
                Code::Internal
            }
        }
    }

    fn violations(&self) -> Vec<FieldViolation> {
        let bilingual = |pointer: &str, reason: &str, en: &str, lv: &str| FieldViolation {
            field: pointer.to_owned(),
            description: en.to_owned(),
            reason: reason.to_owned(),
            localized_message: Some(LocalizedMessage {
                locale: "lv-LV".to_owned(),
                message: lv.to_owned(),
            }),
        };
        match self {
            FormsError::InvalidField { field, message } => {
                vec![FieldViolation::new(field.clone(), message.clone())]
            }
            FormsError::InvalidSchema(v) => vec![bilingual(
                &format!("schema_json{}", v.pointer),
                v.reason,
                &v.en,
                &v.lv,
            )],
            FormsError::InvalidJson { field, error } => {
                vec![FieldViolation::new(*field, error.to_string())]
            }
            FormsError::InvalidData { violations, .. } => violations
                .iter()
                .map(|v| bilingual(&v.pointer, v.reason, &v.en, &v.lv))
                .collect(),
            FormsError::Breaking { narrowings, .. } => narrowings
                .iter()
                .map(|n| FieldViolation {
                    field: n.pointer.clone(),
                    description: n.change.clone(),
                    reason: "NARROWED".to_owned(),
                    localized_message: None,
                })
                .collect(),
            _ => Vec::new(),
        }
    }
}

impl From<FormsError> for Status {
    fn from(error: FormsError) -> Status {
        if let FormsError::Request(refused) = error {
            return match refused.into_status() {
                Ok(status) => status,
                Err(store) => FormsError::Store(store).into(),
            };
        }
        let code = error.code();
        let message = match &error {
            // The cause is logged; the caller hears only that it was ours, not theirs.
            FormsError::Store(cause) => {
                tracing::error!(error = %cause, "forms store failed");
                "the form store failed; the request may be retried".to_owned()
            }
            // Retrying cannot help: the same schemas fail the same way. Declaring the version
            // breaking skips the check, which the publisher may do knowingly.
            FormsError::CompatibilityCheck(cause) => {
                tracing::error!(error = %cause, "the breaking-change check failed");
                "the check for breaking changes failed on this schema (a fault of the forms \
                 service, which is logged); publish with `breaking` set to skip the check"
                    .to_owned()
            }
            FormsError::Internal(cause) => {
                tracing::error!(error = %cause, "forms failed");
                "the forms service failed on this request; it may be retried".to_owned()
            }
            other => other.to_string(),
        };
        onestop_platform::status::with_details(
            code,
            DOMAIN,
            error.reason(),
            message,
            error.violations(),
        )
    }
}
