//! gRPC errors in one shape for every service: the right code, a message about the caller's
//! request, `google.rpc.ErrorInfo` with a stable reason, and for bad fields
//! `google.rpc.BadRequest` violations.
//!
//! This is also the one place that bounds what an error echoes back. Messages and violations
//! often quote the caller's own input (a form id, a pointer into a document); a caller that
//! sends megabytes must not get megabytes of trailers back, nor be able to push a status past
//! the HTTP/2 header limits of the peers that forward it.

use std::borrow::Cow;

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, FieldViolation, StatusExt};

/// The domain named in every `ErrorInfo` the platform's own layers return.
pub const PLATFORM_DOMAIN: &str = "onestop.lv";

/// The most characters of caller input quoted anywhere (messages, violations, logs).
pub const MAX_ECHO_CHARS: usize = 128;
/// The most characters of a status message.
pub const MAX_MESSAGE_CHARS: usize = 1024;
/// The most field violations one error carries; the rest are summed up in one more.
pub const MAX_VIOLATIONS: usize = 50;
/// The most bytes of field violations (paths, descriptions and localized texts together).
pub const MAX_VIOLATION_BYTES: usize = 8 * 1024;

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
    /// A request id was used before for another request.
    RequestIdReused,
    /// A request message is not valid protobuf for its method.
    MalformedMessage,
    /// A message is larger than the server accepts.
    MessageTooLarge,
    /// The server has no such method.
    UnknownMethod,
    /// The server is at capacity.
    Overloaded,
    /// The call took longer than its deadline.
    DeadlineExceeded,
    /// An error of the transport, not of the service's own making.
    Transport,
}

impl Reason {
    /// The `ErrorInfo.reason` string.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Unauthenticated => "UNAUTHENTICATED",
            Reason::CallerClaimRefused => "CALLER_CLAIM_REFUSED",
            Reason::NotThroughGateway => "NOT_THROUGH_GATEWAY",
            Reason::InvalidField => "INVALID_FIELD",
            Reason::RequestIdReused => "REQUEST_ID_REUSED",
            Reason::MalformedMessage => "MALFORMED_MESSAGE",
            Reason::MessageTooLarge => "MESSAGE_TOO_LARGE",
            Reason::UnknownMethod => "UNKNOWN_METHOD",
            Reason::Overloaded => "OVERLOADED",
            Reason::DeadlineExceeded => "DEADLINE_EXCEEDED",
            Reason::Transport => "TRANSPORT",
        }
    }
}

/// Caller input as it may be quoted: at most [`MAX_ECHO_CHARS`] characters, control characters
/// replaced, and a note of how much was left out.
pub fn echo(input: &str) -> Cow<'_, str> {
    bounded(input, MAX_ECHO_CHARS)
}

/// `text` cut to at most `max` characters (plus a note of what was cut), with control
/// characters replaced so that a quote cannot forge log lines.
pub fn bounded(text: &str, max: usize) -> Cow<'_, str> {
    let clean = !text.chars().any(char::is_control);
    let count = text.chars().count();
    if clean && count <= max {
        return Cow::Borrowed(text);
    }
    let mut out: String = text
        .chars()
        .take(max)
        .map(|c| if c.is_control() { '\u{FFFD}' } else { c })
        .collect();
    if count > max {
        out.push_str(&format!("… ({} more characters)", count - max));
    }
    Cow::Owned(out)
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

/// An error of any domain with its details, bounded in size (see the module docs).
pub fn with_details(
    code: Code,
    domain: &str,
    reason: &str,
    message: String,
    violations: Vec<FieldViolation>,
) -> Status {
    with_info(code, domain, reason, Vec::new(), message, violations)
}

/// An error whose `ErrorInfo` also carries metadata a client acts on (such as the level of
/// assurance to log in with again), with its details bounded in size.
pub fn with_info(
    code: Code,
    domain: &str,
    reason: &str,
    metadata: Vec<(String, String)>,
    message: String,
    violations: Vec<FieldViolation>,
) -> Status {
    let metadata = metadata
        .into_iter()
        .take(8)
        .map(|(key, value)| (key, bounded(&value, MAX_ECHO_CHARS).into_owned()));
    let metadata: std::collections::HashMap<String, String> = metadata.collect();
    let mut details = ErrorDetails::with_error_info(bounded(reason, 64), domain, metadata);
    let violations = bound_violations(violations);
    if !violations.is_empty() {
        details.set_bad_request(violations);
    }
    let message = bounded(&message, MAX_MESSAGE_CHARS).into_owned();
    Status::with_error_details(code, message, details)
}

/// A status the transport made (tonic's codec, router, limits) rather than a service, reshaped
/// as the platform's: a malformed message is the caller's mistake (`INVALID_ARGUMENT`, not
/// `INTERNAL`), and every status carries `ErrorInfo` with a stable reason. A status that already
/// has details is a service's own and is left as it is.
pub fn reshape(status: &Status) -> Option<Status> {
    if status.code() == Code::Ok || !status.details().is_empty() {
        return None;
    }
    let message = status.message();
    let (code, reason, message) = match status.code() {
        Code::Internal if message.contains("decode") => (
            Code::InvalidArgument,
            Reason::MalformedMessage,
            format!("the request is not a valid message for this method: {message}"),
        ),
        Code::OutOfRange => (
            Code::OutOfRange,
            Reason::MessageTooLarge,
            message.to_owned(),
        ),
        Code::Unimplemented => (
            Code::Unimplemented,
            Reason::UnknownMethod,
            "this server has no such method".to_owned(),
        ),
        Code::ResourceExhausted | Code::Unavailable => (
            status.code(),
            Reason::Overloaded,
            "the server is at capacity; retry shortly".to_owned(),
        ),
        Code::DeadlineExceeded | Code::Cancelled => (
            status.code(),
            Reason::DeadlineExceeded,
            "the call did not finish within its deadline".to_owned(),
        ),
        code => (code, Reason::Transport, message.to_owned()),
    };
    Some(error(code, reason, message, Vec::new()))
}

/// A response with its status [`reshape`]d when the transport made it (a trailers-only answer
/// without details); any other response as it is. Servers apply it to every answer, and the
/// gateway to every answer of a service.
pub fn reshape_response(
    response: http::Response<tonic::body::Body>,
) -> http::Response<tonic::body::Body> {
    // Only a trailers-only answer has its status in the headers; a streamed answer's status
    // comes at the end and is the service's own.
    let Some(status) = Status::from_header_map(response.headers())
        .as_ref()
        .and_then(reshape)
    else {
        return response;
    };
    let mut shaped = status.into_http::<tonic::body::Body>();
    // Keep what the server said besides the status (the trace id, for instance).
    for (name, value) in response.headers() {
        if !name.as_str().starts_with("grpc-") {
            shaped.headers_mut().insert(name.clone(), value.clone());
        }
    }
    shaped
}

/// Keeps at most [`MAX_VIOLATIONS`] violations within [`MAX_VIOLATION_BYTES`], each part cut to
/// a sensible length; what does not fit is counted in one last violation.
fn bound_violations(violations: Vec<FieldViolation>) -> Vec<FieldViolation> {
    let total = violations.len();
    let mut kept = Vec::new();
    let mut bytes = 0;
    for mut violation in violations {
        violation.field = bounded(&violation.field, 256).into_owned();
        violation.description = bounded(&violation.description, 512).into_owned();
        violation.reason = bounded(&violation.reason, 64).into_owned();
        if let Some(localized) = &mut violation.localized_message {
            localized.message = bounded(&localized.message, 512).into_owned();
            localized.locale = bounded(&localized.locale, 16).into_owned();
        }
        let size = violation.field.len()
            + violation.description.len()
            + violation.reason.len()
            + violation
                .localized_message
                .as_ref()
                .map_or(0, |l| l.message.len() + l.locale.len());
        if kept.len() == MAX_VIOLATIONS || bytes + size > MAX_VIOLATION_BYTES {
            break;
        }
        bytes += size;
        kept.push(violation);
    }
    if kept.len() < total {
        let left = total - kept.len();
        kept.push(FieldViolation::new(
            "",
            format!("{left} more problems are not listed; correct these and try again"),
        ));
    }
    kept
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn echoes_are_bounded_and_cannot_forge_lines() {
        assert_eq!(echo("forms/x"), "forms/x");
        let long = "a".repeat(20_000);
        let quoted = echo(&long);
        assert!(quoted.len() < 200, "{}", quoted.len());
        assert!(quoted.ends_with("(19872 more characters)"), "{quoted}");
        assert_eq!(echo("a\nb"), "a\u{FFFD}b");
    }

    #[test]
    fn transport_statuses_get_the_platform_shape() {
        let decode = Status::internal("failed to decode Protobuf message: invalid wire type");
        let shaped = reshape(&decode).unwrap();
        assert_eq!(shaped.code(), Code::InvalidArgument);
        assert_eq!(
            shaped.get_details_error_info().unwrap().reason,
            "MALFORMED_MESSAGE"
        );
        let unknown = reshape(&Status::unimplemented("")).unwrap();
        assert_eq!(
            unknown.get_details_error_info().unwrap().reason,
            "UNKNOWN_METHOD"
        );
        // A service's own status, with its details, is left alone.
        let own = error(Code::NotFound, Reason::InvalidField, "x".into(), Vec::new());
        assert!(reshape(&own).is_none());
        assert!(reshape(&Status::ok("")).is_none());
    }

    #[test]
    fn error_details_stay_small_whatever_the_input() {
        let violations = (0..1000)
            .map(|i| FieldViolation::new(format!("/{}/{i}", "x".repeat(5000)), "y".repeat(5000)))
            .collect();
        let status = with_details(
            Code::InvalidArgument,
            "forms.onestop.lv",
            "INVALID",
            "z".repeat(100_000),
            violations,
        );
        assert!(status.message().len() < 1200);
        let details = status.get_details_bad_request().unwrap();
        assert!(details.field_violations.len() <= MAX_VIOLATIONS + 1);
        assert!(
            details
                .field_violations
                .last()
                .unwrap()
                .description
                .contains("more problems")
        );
        assert!(
            status.details().len() < MAX_VIOLATION_BYTES + 2048,
            "{}",
            status.details().len()
        );
    }
}
