//! gRPC errors in one shape for every service: the right code, a message about the caller's
//! request, `google.rpc.ErrorInfo` with a stable reason, and for bad fields
//! `google.rpc.BadRequest` violations.

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, FieldViolation, StatusExt};

/// The domain named in every `ErrorInfo` the platform's own layers return.
pub const PLATFORM_DOMAIN: &str = "onestop.lv";

/// Stable reasons of the platform's own errors (services add their own).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    /// No usable client identity.
    Unauthenticated,
    /// Someone other than the gateway claimed a caller.
    CallerClaimRefused,
    /// A member called a service directly instead of through the gateway.
    NotThroughGateway,
    /// A request field is malformed.
    InvalidField,
}

impl Reason {
    /// The `ErrorInfo.reason` string.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Unauthenticated => "UNAUTHENTICATED",
            Reason::CallerClaimRefused => "CALLER_CLAIM_REFUSED",
            Reason::NotThroughGateway => "NOT_THROUGH_GATEWAY",
            Reason::InvalidField => "INVALID_FIELD",
        }
    }
}

/// A platform error.
pub fn error(
    code: Code,
    reason: Reason,
    message: String,
    violations: Vec<FieldViolation>,
) -> Status {
    with_details(code, PLATFORM_DOMAIN, reason.as_str(), message, violations)
}

/// An error of any domain with its details.
pub fn with_details(
    code: Code,
    domain: &str,
    reason: &str,
    message: String,
    violations: Vec<FieldViolation>,
) -> Status {
    let mut details = ErrorDetails::with_error_info(reason, domain, []);
    if !violations.is_empty() {
        details.set_bad_request(violations);
    }
    Status::with_error_details(code, message, details)
}
