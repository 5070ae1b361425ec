//! One call through the gateway, as a story: who is calling, where the call goes, whether the
//! caller may make it, whether it is within its rate, what deadline it gets; then the call is
//! forwarded frame by frame, messages never decoded, with the verified caller and the trace
//! context added to its metadata.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::{HeaderValue, Request, Response};
use http_body::{Body as HttpBody, Frame, SizeHint};
use hyper::body::Incoming;
use onestop_platform::caller::CALLER_HEADER;
use onestop_platform::identity::{Member, Principal};
use onestop_platform::status as platform_status;
use onestop_platform::telemetry::{self, TRACE_ID_HEADER};
use onestop_platform::tls::PeerIdentity;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::Code;
use tonic::body::Body;
use tonic::service::Routes;
use tower::ServiceExt;
use tracing::Instrument;

use crate::limits::{self, MemberRates, MemberSlots};
use crate::policy::Policy;
use crate::upstream::Upstream;

/// Services the gateway answers itself, for every identified member.
const LOCAL_SERVICES: &[&str] = &[
    "grpc.health.v1.Health",
    "grpc.reflection.v1.ServerReflection",
    "grpc.reflection.v1alpha.ServerReflection",
];

/// The `ErrorInfo.domain` of the gateway's own refusals.
const DOMAIN: &str = "gateway.onestop.lv";

/// What every call through the gateway shares.
pub struct Gateway {
    /// Service name → upstream.
    pub upstreams: HashMap<String, Arc<Upstream>>,
    /// Access rights.
    pub policy: Policy,
    /// Per-member rates.
    pub rates: MemberRates,
    /// Per-member calls in flight.
    pub slots: MemberSlots,
    /// The longest deadline a call may have.
    pub max_deadline: Duration,
    /// Calls in flight across all connections; a call that finds none free is refused.
    pub in_flight: Arc<Semaphore>,
    /// Health and reflection, answered locally.
    pub local: Routes,
}

/// Who is on the other end of one connection, worked out once when it is accepted.
pub struct Caller {
    admitted: Result<Admitted, Refusal>,
}

struct Admitted {
    member: Member,
    /// The member institution, the key of its rate.
    institution: Arc<str>,
    /// The verified identity, as the `x-onestop-caller` value services receive.
    header: HeaderValue,
    /// The institution's calls in flight.
    slots: Arc<Semaphore>,
}

impl Caller {
    /// Whether the certificate names a member.
    pub fn is_member(&self) -> bool {
        self.admitted.is_ok()
    }

    /// Reads the member from a connection's certificate.
    pub fn new(identity: &PeerIdentity, slots: &MemberSlots) -> Self {
        let admitted = member_of(identity).and_then(|member| {
            let uri = match identity {
                PeerIdentity::Spiffe(id) => id.to_string(),
                _ => String::new(),
            };
            let header = HeaderValue::from_str(&uri).map_err(|_| {
                (
                    Code::Unauthenticated,
                    "UNAUTHENTICATED",
                    format!("`{uri}` cannot be passed on"),
                )
            })?;
            let institution: Arc<str> = member.institution().to_string().into();
            Ok(Admitted {
                slots: slots.of(&institution),
                institution,
                member,
                header,
            })
        });
        Self { admitted }
    }
}

fn refuse(code: Code, reason: &str, message: String) -> Response<Body> {
    let status = platform_status::with_details(code, DOMAIN, reason, message, Vec::new());
    status.into_http()
}

impl Gateway {
    /// Handles one call from a connection whose peer is `identity`.
    pub async fn handle(
        self: Arc<Self>,
        caller: Arc<Caller>,
        mut request: Request<Incoming>,
    ) -> Response<Body> {
        let method = request.uri().path().trim_start_matches('/').to_owned();
        let span = telemetry::server_span(request.headers(), &method);
        let trace_id = telemetry::trace_id_header(&span);
        let mut response = async {
            // 1. Who is calling: a member named by a valid certificate of this trust domain.
            let admitted = match &caller.admitted {
                Ok(admitted) => admitted,
                Err((code, reason, message)) => return refuse(*code, reason, message.clone()),
            };
            let member = &admitted.member;
            tracing::Span::current().record("member", tracing::field::display(member));
            let Some((service, _)) = method.split_once('/') else {
                return refuse(Code::Unimplemented, "UNKNOWN_METHOD", format!("`/{method}` is not a gRPC method path"));
            };

            // 2. Whether it is within the member's rate and the gateway's capacity; this holds
            //    for every call, the gateway's own services included.
            if let Err(wait) = self.rates.check(&admitted.institution) {
                return refuse(Code::ResourceExhausted, "RATE_LIMITED", format!(
                    "member {} exceeded {} calls per second; retry in {} ms",
                    admitted.institution, self.rates.per_second(), wait.as_millis().max(1)
                ));
            }
            let Ok(own) = admitted.slots.clone().try_acquire_owned() else {
                return refuse(Code::ResourceExhausted, "TOO_MANY_CALLS", format!(
                    "member {} has {} calls in flight, the most it may; retry when one ends",
                    admitted.institution, self.slots.per_member()
                ));
            };
            let Ok(shared) = self.in_flight.clone().try_acquire_owned() else {
                return refuse(Code::ResourceExhausted, "OVERLOADED", "the gateway is at capacity; retry shortly".into());
            };
            let permit = (own, shared);

            // 3. The gateway's own health and reflection, for every identified member.
            if LOCAL_SERVICES.contains(&service) {
                let request = request.map(Body::new);
                return match self.local.clone().oneshot(request).await {
                    Ok(response) => response.map(|body| Body::new(Guarded { body, _permit: permit })),
                    Err(never) => match never {},
                };
            }

            // 4. Where the call goes.
            let Some(upstream) = self.upstreams.get(service) else {
                return refuse(Code::Unimplemented, "UNKNOWN_SERVICE", format!("no service `{service}` is reachable through this gateway"));
            };

            // 5. Whether this member may make it.
            if !self.policy.allows(member, &method) {
                tracing::info!(%member, %method, "call denied by the access policy");
                return refuse(Code::PermissionDenied, "ACCESS_DENIED", format!("member {member} may not call {method}"));
            }

            // 6. The deadline, never longer than the cap, enforced here while waiting for the
            //    answer and by the service.
            let deadline = limits::cap_deadline(request.headers_mut(), self.max_deadline);

            // 7. Forward, naming the verified caller; a caller's own claim is dropped first.
            let headers = request.headers_mut();
            headers.remove(CALLER_HEADER);
            headers.insert(CALLER_HEADER, admitted.header.clone());
            telemetry::inject_context(&tracing::Span::current(), headers);
            *request.uri_mut() = upstream.uri_for(request.uri());
            let request = request.map(Body::new);
            match tokio::time::timeout(deadline, upstream.send(request)).await {
                Ok(Ok(response)) => response.map(|body| Body::new(Guarded { body, _permit: permit })),
                Ok(Err(error)) => {
                    tracing::warn!(service = %upstream.service, address = %upstream.address, %error, "upstream unreachable");
                    refuse(Code::Unavailable, "UPSTREAM_UNAVAILABLE", format!("{service} is not reachable right now; retry later"))
                }
                Err(_) => refuse(Code::DeadlineExceeded, "DEADLINE_EXCEEDED", format!("{service} did not answer within {} ms", deadline.as_millis())),
            }
        }
        .instrument(span)
        .await;
        if let Some(trace_id) = trace_id {
            response.headers_mut().insert(TRACE_ID_HEADER, trace_id);
        }
        response
    }
}

/// Why a connection's certificate does not let it call: code, reason and message.
type Refusal = (Code, &'static str, String);

/// The member named by a connection's certificate, or why it may not call.
fn member_of(identity: &PeerIdentity) -> Result<Member, Refusal> {
    match identity {
        PeerIdentity::Spiffe(id) => match &id.principal {
            Principal::Member(member) => Ok(member.clone()),
            Principal::Platform(component) => Err((
                Code::PermissionDenied,
                "NOT_A_MEMBER",
                format!(
                    "platform component `{component}` may not call through the external gateway"
                ),
            )),
        },
        PeerIdentity::Unidentified(why) => Err((
            Code::Unauthenticated,
            "UNAUTHENTICATED",
            format!("the client certificate names no member: {why}"),
        )),
        PeerIdentity::Anonymous => Err((
            Code::Unauthenticated,
            "UNAUTHENTICATED",
            "a client certificate issued to a member is required".into(),
        )),
    }
}

/// A response body that holds the call's capacity permits (the member's and the gateway's)
/// until the call has finished.
struct Guarded<B> {
    body: B,
    _permit: (OwnedSemaphorePermit, OwnedSemaphorePermit),
}

impl<B: HttpBody + Unpin> HttpBody for Guarded<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use onestop_platform::identity::SpiffeId;
    use onestop_platform::tls::PeerIdentity;

    use super::Caller;
    use crate::limits::MemberSlots;

    fn caller(uri: &str) -> Caller {
        let identity = PeerIdentity::Spiffe(Arc::new(SpiffeId::parse(uri).unwrap()));
        Caller::new(&identity, &MemberSlots::new(1))
    }

    #[test]
    fn subsystems_share_their_institution_and_platform_components_are_refused() {
        let pensions = caller("spiffe://onestop.lv/member/GOV/VSAA/pensions");
        let benefits = caller("spiffe://onestop.lv/member/GOV/VSAA/benefits");
        let (a, b) = (pensions.admitted.unwrap(), benefits.admitted.unwrap());
        assert_eq!(a.institution, b.institution);
        assert_eq!(&*a.institution, "GOV/VSAA");
        assert_eq!(a.header, "spiffe://onestop.lv/member/GOV/VSAA/pensions");

        let forms = caller("spiffe://onestop.lv/platform/forms");
        assert_eq!(forms.admitted.err().unwrap().1, "NOT_A_MEMBER");
        let anonymous = Caller::new(&PeerIdentity::Anonymous, &MemberSlots::new(1));
        assert_eq!(
            anonymous.admitted.err().unwrap().0,
            tonic::Code::Unauthenticated
        );
    }
}
