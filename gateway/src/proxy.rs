//! One call through the gateway, as a story: who is calling, whether its certificate still
//! holds, whether it is within its member's rate and budgets, where the call goes, whether the
//! caller may make it, what deadline it gets; then the call is forwarded frame by frame,
//! messages never decoded (only their lengths read, to count them), with the verified caller
//! and the trace context added to its metadata.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderMap, HeaderValue, Request, Response};
use hyper::body::Incoming;
use onestop_platform::caller::{CALLER_HEADER, PERSON_HEADER};
use onestop_platform::identity::{Member, Principal};
use onestop_platform::reload::Reloading;
use onestop_platform::status::{self as platform_status, echo};
use onestop_platform::streams::{self, EndsWhen, Later};
use onestop_platform::telemetry::{self, TRACE_ID_HEADER};
use onestop_platform::tls::{PeerCert, PeerIdentity, ServerTls};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::Code;
use tonic::body::Body;
use tonic::service::Routes;
use tower::ServiceExt;
use tracing::Instrument;

use crate::DOMAIN;
use crate::body::{Activity, CallLog, Guarded, Metered};
use crate::limits::{self, Budget, Exhausted, MemberRates, MemberSlots};
use crate::people::PersonRefusal;
use crate::policy::{Policy, PolicyError};
use crate::upstream::Upstream;

/// Services the gateway answers itself, for every identified member.
const LOCAL_SERVICES: &[&str] = &[
    "grpc.health.v1.Health",
    "grpc.reflection.v1.ServerReflection",
    "grpc.reflection.v1alpha.ServerReflection",
];

/// The largest message sent to the gateway's own services (health, reflection): they take
/// names, not documents.
const MAX_LOCAL_MESSAGE: usize = 4 * 1024;

/// The longest method path looked at; no method of the contract comes near it.
const MAX_PATH: usize = 256;

/// What every call through the gateway shares.
pub struct Gateway {
    /// Service name → upstream.
    pub upstreams: HashMap<String, Arc<Upstream>>,
    /// Access rights, read again when the file changes.
    pub policy: Arc<Reloading<Policy, PolicyError>>,
    /// People's tokens and rates.
    pub people: Arc<crate::people::People>,
    /// Per-member rates of calls and stream messages.
    pub rates: Arc<MemberRates>,
    /// Calls in flight.
    pub calls: Budget,
    /// Long-lived streams in flight (methods that stream responses or requests).
    pub streams: Budget,
    /// Connections open per member institution.
    pub connections: MemberSlots,
    /// New connections per member institution and second.
    pub reconnections: MemberRates,
    /// Paths of the methods that are streams.
    pub streaming: HashSet<String>,
    /// The longest deadline a call may have.
    pub max_deadline: Duration,
    /// Methods with their own deadline cap; `None`: no cap (long-lived streams such as an
    /// inbox, which stay open as long as the caller wants).
    pub method_deadlines: HashMap<String, Option<Duration>>,
    /// The largest header block forwarded to a service.
    pub max_header_bytes: usize,
    /// The external TLS configuration, which knows the revoked certificates.
    pub tls: Arc<ServerTls>,
    /// Health and reflection, answered locally.
    pub local: Routes,
    /// Cancelled on shutdown: streams still open end then.
    pub shutdown: tokio_util::sync::CancellationToken,
}

/// Who is on the other end of one connection, worked out once when it is accepted.
pub struct Caller {
    admitted: Result<Admitted, Refusal>,
    cert: Option<Arc<PeerCert>>,
}

struct Admitted {
    member: Member,
    /// The member system, for logs.
    name: Arc<str>,
    /// The member institution, the key of its rate.
    institution: Arc<str>,
    /// The verified identity, as the `x-onestop-caller` value services receive.
    header: HeaderValue,
    /// The institution's places for calls and for streams.
    calls: Arc<Semaphore>,
    streams: Arc<Semaphore>,
    /// This connection's place among the institution's connections.
    _connection: OwnedSemaphorePermit,
    /// When the institution's connections may be read again (held while over its rate).
    pace: Arc<limits::Pace>,
}

impl Caller {
    /// Whether the connection may make calls (its certificate names a member that has a
    /// connection place); a connection that may not is closed after its first refusal.
    pub fn is_admitted(&self) -> bool {
        self.admitted.is_ok()
    }

    /// The member institution for metrics (`CLASS/CODE`, a bounded set), `none` for a peer
    /// that names none.
    pub fn label(&self) -> Arc<str> {
        match &self.admitted {
            Ok(admitted) => admitted.institution.clone(),
            Err(_) => Arc::from("none"),
        }
    }

    /// The member system for logs (`CLASS/CODE/SUBSYSTEM`), `none` for a peer that names none.
    pub fn name(&self) -> Arc<str> {
        match &self.admitted {
            Ok(admitted) => admitted.name.clone(),
            Err(_) => Arc::from("none"),
        }
    }

    /// Whether the connection was refused because its member opens connections too often.
    pub fn reconnects_too_often(&self) -> bool {
        matches!(&self.admitted, Err((_, "RECONNECTING_TOO_OFTEN", _)))
    }

    /// The pace of the member's connections, for a connection that may call.
    pub fn pace(&self) -> Option<Arc<limits::Pace>> {
        self.admitted.as_ref().ok().map(|a| a.pace.clone())
    }

    /// The connection's certificate.
    pub fn cert(&self) -> Option<&Arc<PeerCert>> {
        self.cert.as_ref()
    }

    /// Reads the member from a connection's certificate and takes its connection place.
    pub fn new(identity: &PeerIdentity, cert: Option<Arc<PeerCert>>, gateway: &Gateway) -> Self {
        let admitted = member_of(identity).and_then(|member| {
            let uri = match identity {
                PeerIdentity::Spiffe(id) => id.to_string(),
                _ => String::new(),
            };
            let header = HeaderValue::from_str(&uri).map_err(|_| {
                (
                    Code::Unauthenticated,
                    "UNAUTHENTICATED",
                    format!("`{}` cannot be passed on", echo(&uri)),
                )
            })?;
            let institution: Arc<str> = member.institution().to_string().into();
            if gateway.reconnections.check(&institution).is_err() {
                return Err((
                    Code::ResourceExhausted,
                    "RECONNECTING_TOO_OFTEN",
                    format!(
                        "member {institution} opens more than {} connections a second; keep \
                         connections open and make many calls on each",
                        gateway.reconnections.per_second()
                    ),
                ));
            }
            let connection = gateway
                .connections
                .of(&institution)
                .try_acquire_owned()
                .map_err(|_| {
                    (
                        Code::ResourceExhausted,
                        "TOO_MANY_CONNECTIONS",
                        format!(
                            "member {institution} has {} connections open, the most it may; \
                             make calls on those",
                            gateway.connections.per_member()
                        ),
                    )
                })?;
            Ok(Admitted {
                pace: gateway.rates.pace(&institution),
                name: member.to_string().into(),
                calls: gateway.calls.of(&institution),
                streams: gateway.streams.of(&institution),
                institution,
                member,
                header,
                _connection: connection,
            })
        });
        Self { admitted, cert }
    }
}

fn refuse(
    code: Code,
    reason: &str,
    metadata: Vec<(String, String)>,
    message: String,
) -> Response<Body> {
    let status = platform_status::with_info(code, DOMAIN, reason, metadata, message, Vec::new());
    let mut response = status.into_http();
    response
        .extensions_mut()
        .insert(crate::logs::Refused(reason.into()));
    response
}

/// The size of a header block as HTTP/2 counts it against `SETTINGS_MAX_HEADER_LIST_SIZE`.
fn header_list_size(headers: &HeaderMap) -> usize {
    headers
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len() + 32)
        .sum()
}

impl Gateway {
    /// Handles one call from a connection whose calls are counted in `activity`.
    pub async fn handle(
        self: Arc<Self>,
        caller: Arc<Caller>,
        activity: Arc<Activity>,
        request: Request<Incoming>,
    ) -> Response<Body> {
        let call = activity.begin();
        let path = request.uri().path();
        let method = echo(path.trim_start_matches('/')).into_owned();
        let mut record = crate::metrics::gateway().calls.start(path);
        let known = self.knows(path);
        let span = if telemetry::untraced(path) {
            tracing::Span::none()
        } else {
            telemetry::server_span(request.headers(), &method, "gateway")
        };
        let trace_id = telemetry::trace_id_header(&span);
        // Boxed: the routing future is large, and hyper moves the call's future into place.
        let (response, permit) = Box::pin(
            self.route(&caller, &method, request)
                .instrument(span.clone()),
        )
        .await;
        record.code_from(response.headers());
        if !known {
            // The caller's own words: not a label.
            record.unknown_method();
        }
        let member = caller.name();
        let trace = trace_id.clone();
        let deadline = response
            .extensions()
            .get::<crate::body::CallDeadline>()
            .map(|d| d.0);
        let refused = response
            .extensions()
            .get::<crate::logs::Refused>()
            .map(|r| r.0.clone());
        let mut response = response.map(|body| {
            let log = CallLog {
                member,
                trace_id: trace,
                span,
                refused,
            };
            let guarded = Guarded::new(body, call, permit, record, log);
            let gateway = self.clone();
            let ends = Later::new(move || gateway.ends_early(caller, method, deadline));
            Body::new(EndsWhen::new(guarded, ends))
        });
        if let Some(trace_id) = trace_id {
            response.headers_mut().insert(TRACE_ID_HEADER, trace_id);
        }
        response
    }

    /// Waits for what ends a call's answer before the service ends it, and gives the trailers
    /// that say why: the gateway's shutdown; the call's deadline (services do not cut their own
    /// streams at the deadline, only the wait for the first answer); the caller's certificate
    /// revoked or expired; the caller's right to the method withdrawn from the access policy.
    /// Made only when the answer first waits, so most unary answers never pay for it.
    async fn ends_early(
        self: Arc<Self>,
        caller: Arc<Caller>,
        method: String,
        deadline: Option<tokio::time::Instant>,
    ) -> HeaderMap {
        let deadline = async {
            match deadline {
                Some(deadline) => tokio::time::sleep_until(deadline).await,
                None => std::future::pending().await,
            }
        };
        let revoked = async {
            match caller.cert() {
                Some(cert) => streams::certificate_unusable(self.tls.clone(), cert.clone()).await,
                None => std::future::pending().await,
            }
        };
        let denied = async {
            // The gateway's own health and reflection are every member's, not the policy's.
            let local = method
                .split_once('/')
                .is_some_and(|(service, _)| LOCAL_SERVICES.contains(&service));
            let Ok(admitted) = &caller.admitted else {
                return std::future::pending().await;
            };
            if local {
                return std::future::pending().await;
            }
            let mut changes = self.policy.changes();
            loop {
                if changes.changed().await.is_err() {
                    return std::future::pending().await;
                }
                if !self.policy.current().allows(&admitted.member, &method) {
                    return &admitted.member;
                }
            }
        };
        let status = |code, reason: &str, message: String| {
            streams::trailers_of(&platform_status::with_info(
                code,
                DOMAIN,
                reason,
                Vec::new(),
                message,
                Vec::new(),
            ))
        };
        tokio::select! {
            () = self.shutdown.cancelled() => streams::shutting_down(),
            () = deadline => status(
                Code::DeadlineExceeded,
                "DEADLINE_EXCEEDED",
                "the call reached its deadline".into(),
            ),
            why = revoked => status(Code::Unauthenticated, "CERTIFICATE_UNUSABLE", why.into()),
            member = denied => {
                tracing::info!(%member, %method, "stream ended: the access policy no longer allows it");
                status(
                    Code::PermissionDenied,
                    "ACCESS_DENIED",
                    format!("member {member} may no longer call {method}"),
                )
            }
        }
    }

    /// Whether a path names a service the gateway serves or routes (so that it may be a label).
    fn knows(&self, path: &str) -> bool {
        let service = path
            .trim_start_matches('/')
            .split_once('/')
            .map_or("", |(service, _)| service);
        path.len() <= MAX_PATH
            && (LOCAL_SERVICES.contains(&service) || self.upstreams.contains_key(service))
    }

    async fn route(
        &self,
        caller: &Caller,
        method: &str,
        mut request: Request<Incoming>,
    ) -> (Response<Body>, Option<limits::BudgetPermit>) {
        let refused_with = |code, reason: &str, metadata, message| {
            crate::metrics::gateway()
                .refusals
                .get_or_create(&crate::metrics::Refusal {
                    reason: reason.to_owned(),
                    member: caller.label().to_string(),
                })
                .inc();
            (refuse(code, reason, metadata, message), None)
        };
        let refused = |code, reason: &str, message| refused_with(code, reason, Vec::new(), message);
        // 1. Who is calling: a member named by a valid certificate of this trust domain, that
        //    is still valid and not revoked (a session outlives neither).
        let admitted = match &caller.admitted {
            Ok(admitted) => admitted,
            Err((code, reason, message)) => return refused(*code, reason, message.clone()),
        };
        if let Some(why) = caller
            .cert
            .as_ref()
            .and_then(|cert| cert.unusable(&self.tls))
        {
            return refused(Code::Unauthenticated, "CERTIFICATE_UNUSABLE", why.into());
        }
        let member = &admitted.member;
        tracing::Span::current().record("member", tracing::field::display(member));
        let path = request.uri().path().trim_start_matches('/');
        let service = match path.split_once('/') {
            Some((service, _)) if path.len() <= MAX_PATH => service.to_owned(),
            _ => {
                return refused(
                    Code::Unimplemented,
                    "UNKNOWN_METHOD",
                    format!("`/{method}` is not a method of this gateway"),
                );
            }
        };
        // A token too large to be one is the person's problem, not the metadata's: say so
        // before the metadata's size is judged.
        let bearer_limit = "Bearer ".len() + onestop_platform::tokens::MAX_TOKEN_BYTES;
        if request
            .headers()
            .get(http::header::AUTHORIZATION)
            .is_some_and(|value| value.len() > bearer_limit)
        {
            return refused(
                Code::Unauthenticated,
                "TOKEN_TOO_LARGE",
                format!(
                    "the authorization header is over {bearer_limit} bytes; a platform access \
                     token is never that large"
                ),
            );
        }
        if header_list_size(request.headers()) > self.max_header_bytes {
            return refused(
                Code::ResourceExhausted,
                "HEADERS_TOO_LARGE",
                format!(
                    "the call's metadata is over {} bytes; send less metadata",
                    self.max_header_bytes
                ),
            );
        }

        // 2. Whether it is within the member's rate and budgets; this holds for every call,
        //    the gateway's own services included. Streams have a budget of their own, so that
        //    long-lived watches cannot crowd out calls.
        if let Err(wait) = self.rates.check(&admitted.institution) {
            // Until a token is free, and at least a moment longer, the member's connections
            // are not read: a flood of calls that would only be refused waits in the member's
            // own TCP buffers instead of being refused one by one (each connection read once
            // per hold brings a batch of them).
            admitted.pace.hold(wait.max(limits::MIN_HOLD));
            return refused(
                Code::ResourceExhausted,
                "RATE_LIMITED",
                format!(
                    "member {} exceeded {} calls and stream messages per second; retry in {} ms",
                    admitted.institution,
                    self.rates.per_second(),
                    wait.as_millis().max(1)
                ),
            );
        }
        let (budget, own) = if self.streaming.contains(path) {
            (&self.streams, &admitted.streams)
        } else {
            (&self.calls, &admitted.calls)
        };
        let permit = match budget.admit(own) {
            Ok(permit) => permit,
            Err(Exhausted::Member) => {
                return refused(
                    Code::ResourceExhausted,
                    "TOO_MANY_CALLS",
                    format!(
                        "member {} has {} {} in flight, the most it may; retry when one ends",
                        admitted.institution,
                        budget.per_member(),
                        budget.what
                    ),
                );
            }
            Err(Exhausted::Gateway) => {
                return refused(
                    Code::ResourceExhausted,
                    "OVERLOADED",
                    format!(
                        "the gateway is at capacity for {}; retry shortly",
                        budget.what
                    ),
                );
            }
        };
        let metered = |request: Request<Incoming>, max| {
            let rates = self.rates.clone();
            let institution = admitted.institution.clone();
            request.map(|body| Body::new(Metered::new(body, rates, institution, max)))
        };

        // 3. The gateway's own health and reflection, for every identified member.
        if LOCAL_SERVICES.contains(&service.as_str()) {
            let request = metered(request, MAX_LOCAL_MESSAGE);
            return match self.local.clone().oneshot(request).await {
                Ok(response) => (response, Some(permit)),
                Err(never) => match never {},
            };
        }

        // 4. Where the call goes.
        let Some(upstream) = self.upstreams.get(&service) else {
            return refused(
                Code::Unimplemented,
                "UNKNOWN_SERVICE",
                format!(
                    "no service `{}` is reachable through this gateway",
                    echo(&service)
                ),
            );
        };

        // 5. Whether this member may make it.
        let policy = self.policy.current();
        if !policy.allows(member, path) {
            return refused(
                Code::PermissionDenied,
                "ACCESS_DENIED",
                format!("member {member} may not call {method}"),
            );
        }

        // 6. The person the call speaks for, when it carries a platform token: verified here, so
        //    that a forged or expired token reaches no service. Some methods require one, at a
        //    level of assurance; below it the refusal names the level to log in with again.
        let presenter = admitted.header.to_str().unwrap_or_default();
        let person = match self.people.person(request.headers(), presenter).await {
            Ok(person) => person,
            Err(refusal) => {
                let (reason, message) = match refusal {
                    PersonRefusal::Token(error) => (error.reason(), error.to_string()),
                    PersonRefusal::NotBearer => (
                        "TOKEN_MALFORMED",
                        "the authorization header must be `Bearer <platform access token>`"
                            .to_owned(),
                    ),
                    PersonRefusal::NoIdentityService => (
                        "TOKEN_UNVERIFIABLE",
                        "this gateway routes no identity service, so it cannot accept tokens"
                            .to_owned(),
                    ),
                };
                return refused(Code::Unauthenticated, reason, message);
            }
        };
        if let Some(required) = policy.person_required(path) {
            let level = [("required_level".to_owned(), required.as_str().to_owned())];
            match &person {
                None => {
                    return refused_with(
                        Code::Unauthenticated,
                        "PERSON_TOKEN_REQUIRED",
                        level.to_vec(),
                        format!(
                            "{method} acts for a person: send their platform token (level {required} at least)"
                        ),
                    );
                }
                Some(person) if person.claims.auth.level < required => {
                    return refused_with(
                        Code::Unauthenticated,
                        "LEVEL_OF_ASSURANCE_TOO_LOW",
                        level.to_vec(),
                        format!(
                            "{method} requires level {required}; the person logged in at {}: log in again asking for {required}",
                            person.claims.auth.level
                        ),
                    );
                }
                Some(_) => {}
            }
        }
        if let Some(person) = &person
            && let Err(wait) = self.people.rates.check(&person.subject)
        {
            return refused(
                Code::ResourceExhausted,
                "PERSON_RATE_LIMITED",
                format!(
                    "this person exceeded {} calls per second; retry in {} ms",
                    self.people.rates.per_second(),
                    wait.as_millis().max(1)
                ),
            );
        }

        // 7. The deadline, never longer than the cap, enforced here while waiting for the
        //    answer and by the service.
        let started = tokio::time::Instant::now();
        let deadline = match self.method_deadlines.get(path) {
            Some(None) => limits::requested_deadline(request.headers()),
            Some(Some(cap)) => Some(limits::cap_deadline(request.headers_mut(), *cap)),
            None => Some(limits::cap_deadline(
                request.headers_mut(),
                self.max_deadline,
            )),
        };

        // 8. Forward, naming the verified caller and person; a caller's own claims are dropped
        //    first, and so is the token itself: services believe the gateway, and a token
        //    that reaches no service cannot leak from one.
        let headers = request.headers_mut();
        headers.remove(CALLER_HEADER);
        headers.remove(PERSON_HEADER);
        headers.remove(http::header::AUTHORIZATION);
        headers.insert(CALLER_HEADER, admitted.header.clone());
        if let Some(person) = &person {
            headers.insert(PERSON_HEADER, person.header.clone());
        }
        telemetry::inject_context(&tracing::Span::current(), headers);
        *request.uri_mut() = upstream.uri_for(request.uri());
        // The services hold messages to their own size limit and say so in a status.
        let request = metered(request, usize::MAX);
        let answer = match deadline {
            Some(deadline) => tokio::time::timeout(deadline, upstream.send(request)).await,
            None => Ok(upstream.send(request).await),
        };
        match answer {
            // A status a service's transport made on its own (overload, a deadline) gets the
            // platform's shape on the way out, like the services' own errors.
            Ok(Ok(response)) => {
                let mut response = platform_status::reshape_response(response.map(Body::new));
                if let Some(deadline) = deadline {
                    response
                        .extensions_mut()
                        .insert(crate::body::CallDeadline(started + deadline));
                }
                (response, Some(permit))
            }
            Ok(Err(error)) => {
                tracing::warn!(service = %upstream.service, %error, "upstream unreachable");
                refused(
                    Code::Unavailable,
                    "UPSTREAM_UNAVAILABLE",
                    format!("{service} is not reachable right now; retry later"),
                )
            }
            Err(_) => refused(
                Code::DeadlineExceeded,
                "DEADLINE_EXCEEDED",
                format!(
                    "{service} did not answer within {} ms",
                    deadline.unwrap_or_default().as_millis()
                ),
            ),
        }
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
