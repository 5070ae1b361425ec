//! Who the caller of a service is, decided once per request.
//!
//! A service sees either the platform's gateway, which names the verified external caller in
//! the `x-onestop-caller` header, or another platform component calling it directly with its own
//! certificate. The header is believed only on a connection authenticated with the gateway's
//! own certificate; anyone else who sends it is refused, so that no member can claim to be
//! another. A member that reaches a service directly is refused too: members come through the
//! gateway, where their access rights and limits apply. This holds for every method a server
//! offers, health and reflection included: [`AuthenticateLayer`] runs in front of all of them.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tonic::{Request, Status};

use crate::identity::SpiffeId;
use crate::status::{self, Reason};
use crate::streams::{self, EndsWhen, Later};
use crate::tls::{Peer, PeerIdentity, ServerTls};
use crate::tokens::Claims;

/// The metadata key in which the gateway passes the verified caller (a SPIFFE URI).
pub const CALLER_HEADER: &str = "x-onestop-caller";

/// The metadata key in which the gateway passes the person whose bearer token it verified (the
/// token's claims, see [`Claims::to_header`]). Believed, like the caller, only from the gateway.
pub const PERSON_HEADER: &str = "x-onestop-person";

/// The verified caller of one request, inserted into the request's extensions.
#[derive(Clone, Debug)]
pub struct Caller {
    /// Who is calling.
    pub identity: Arc<SpiffeId>,
    /// Whether the call came through the gateway.
    pub via_gateway: bool,
    /// The person the calling system acts for, when the call carried a platform token (verified
    /// by the gateway).
    pub person: Option<Arc<Claims>>,
}

impl Caller {
    /// Who a request is recorded for (see [`crate::requests`]): the system, and the person it
    /// acted for, so that two people calling through one front end cannot collide on a
    /// request id.
    pub fn request_key(&self) -> String {
        match &self.person {
            Some(person) => match &person.act {
                Some(actor) => format!("{}#{}#{}", self.identity, actor.sub, person.sub),
                None => format!("{}#{}", self.identity, person.sub),
            },
            None => self.identity.to_string(),
        }
    }

    /// The caller of a request that passed [`Authenticate`]; `Unauthenticated` otherwise (a
    /// service wired without the interceptor fails closed).
    pub fn of<T>(request: &Request<T>) -> Result<&Caller, Status> {
        request.extensions().get::<Caller>().ok_or_else(|| {
            status::error(
                tonic::Code::Unauthenticated,
                Reason::Unauthenticated,
                "the caller could not be authenticated".into(),
                Vec::new(),
            )
        })
    }
}

/// A tonic interceptor that authenticates the caller of every request.
#[derive(Clone, Debug)]
pub struct Authenticate {
    gateway: Arc<SpiffeId>,
}

impl Authenticate {
    /// Believes caller headers only from `gateway`.
    pub fn new(gateway: SpiffeId) -> Self {
        Self {
            gateway: Arc::new(gateway),
        }
    }

    /// Decides who calls, from the connection's peer and the request's metadata: the caller
    /// the gateway names (`claimed`) and the person it verified (`person`).
    pub fn caller(
        &self,
        peer: Option<&Peer>,
        claimed: Option<&[u8]>,
        person: Option<&[u8]>,
    ) -> Result<Caller, Status> {
        let unauthenticated = |message: String| {
            status::error(
                tonic::Code::Unauthenticated,
                Reason::Unauthenticated,
                message,
                Vec::new(),
            )
        };
        let identity = match peer.map(|peer| &peer.identity) {
            Some(PeerIdentity::Spiffe(identity)) => identity,
            Some(PeerIdentity::Unidentified(why)) => {
                return Err(unauthenticated(format!(
                    "the client certificate names no member: {why}"
                )));
            }
            Some(PeerIdentity::Anonymous) | None => {
                return Err(unauthenticated("a client certificate is required".into()));
            }
        };
        // A person named without a caller is still a claim, which only the gateway may make (and
        // the gateway always names the caller): it is judged as a claimed empty caller.
        let Some(claimed) = claimed.or(person.map(|_| &b""[..])) else {
            if let Some(member) = identity.as_member() {
                return Err(status::error(
                    tonic::Code::PermissionDenied,
                    Reason::NotThroughGateway,
                    format!("member {member} must call through the gateway, not directly"),
                    Vec::new(),
                ));
            }
            return Ok(Caller {
                identity: identity.clone(),
                via_gateway: false,
                person: None,
            });
        };
        if **identity != *self.gateway {
            return Err(status::error(
                tonic::Code::PermissionDenied,
                Reason::CallerClaimRefused,
                format!(
                    "{identity} may not name a caller in `{CALLER_HEADER}` or a person in \
                     `{PERSON_HEADER}`: only the gateway may"
                ),
                Vec::new(),
            ));
        }
        let claimed = std::str::from_utf8(claimed)
            .ok()
            .and_then(|text| SpiffeId::parse(text).ok())
            .filter(|id| id.trust_domain == self.gateway.trust_domain)
            .ok_or_else(|| {
                unauthenticated(format!("the gateway sent a malformed `{CALLER_HEADER}`"))
            })?;
        let person = person
            .map(|value| {
                std::str::from_utf8(value)
                    .map_err(|e| e.to_string())
                    .and_then(Claims::from_header)
                    .map(Arc::new)
                    .map_err(|e| {
                        unauthenticated(format!(
                            "the gateway sent a malformed `{PERSON_HEADER}`: {e}"
                        ))
                    })
            })
            .transpose()?;
        Ok(Caller {
            identity: Arc::new(claimed),
            via_gateway: true,
            person,
        })
    }
}

/// A tower layer that authenticates the caller of every request a server receives and puts the
/// [`Caller`] into its extensions, or answers with the refusal. A certificate that expired or was
/// revoked since its connection was opened is refused too.
#[derive(Clone, Debug)]
pub struct AuthenticateLayer {
    auth: Authenticate,
    tls: Arc<ServerTls>,
}

impl AuthenticateLayer {
    /// Believes caller headers only from `gateway`; checks certificates against `tls`.
    pub fn new(gateway: SpiffeId, tls: Arc<ServerTls>) -> Self {
        Self {
            auth: Authenticate::new(gateway),
            tls,
        }
    }
}

impl<S> tower::Layer<S> for AuthenticateLayer {
    type Service = AuthenticateService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        AuthenticateService {
            layer: self.clone(),
            inner,
        }
    }
}

/// The service of [`AuthenticateLayer`].
#[derive(Clone, Debug)]
pub struct AuthenticateService<S> {
    layer: AuthenticateLayer,
    inner: S,
}

impl<S, B> tower::Service<http::Request<B>> for AuthenticateService<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        let peer = request.extensions().get::<Peer>();
        let unusable = peer
            .and_then(|peer| peer.cert.as_ref())
            .and_then(|cert| cert.unusable(&self.layer.tls));
        let caller = match unusable {
            Some(why) => Err(status::error(
                tonic::Code::Unauthenticated,
                Reason::Unauthenticated,
                why.into(),
                Vec::new(),
            )),
            None => self.layer.auth.caller(
                peer,
                request
                    .headers()
                    .get(CALLER_HEADER)
                    .map(|value| value.as_bytes()),
                request
                    .headers()
                    .get(PERSON_HEADER)
                    .map(|value| value.as_bytes()),
            ),
        };
        let cert = peer.and_then(|peer| peer.cert.clone());
        match caller {
            Ok(caller) => {
                request.extensions_mut().insert(caller);
                let answer = self.inner.call(request);
                let Some(cert) = cert else {
                    return Box::pin(answer);
                };
                // A stream outlives neither its caller's certificate nor its revocation: it
                // ends with the reason, and the connection is cut soon after (`accept`).
                let tls = self.layer.tls.clone();
                Box::pin(async move {
                    let response = answer.await?;
                    Ok(response.map(|body| {
                        let until = Later::new(move || async move {
                            let why = streams::certificate_unusable(tls, cert).await;
                            streams::trailers_of(&status::error(
                                tonic::Code::Unauthenticated,
                                Reason::Unauthenticated,
                                why.into(),
                                Vec::new(),
                            ))
                        });
                        tonic::body::Body::new(EndsWhen::new(body, until))
                    }))
                })
            }
            Err(status) => Box::pin(std::future::ready(Ok(status.into_http()))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(identity: PeerIdentity) -> Peer {
        Peer {
            remote_addr: ([127, 0, 0, 1], 1).into(),
            identity,
            cert: None,
        }
    }

    fn spiffe(uri: &str) -> PeerIdentity {
        PeerIdentity::Spiffe(Arc::new(SpiffeId::parse(uri).unwrap()))
    }

    const GATEWAY: &str = "spiffe://onestop.lv/platform/gateway";
    const MEMBER: &str = "spiffe://onestop.lv/member/GOV/VSAA/pensions";

    #[test]
    fn the_gateway_may_name_the_caller() {
        let auth = Authenticate::new(SpiffeId::parse(GATEWAY).unwrap());
        let caller = auth
            .caller(Some(&peer(spiffe(GATEWAY))), Some(MEMBER.as_bytes()), None)
            .unwrap();
        assert_eq!(caller.identity.to_string(), MEMBER);
        assert!(caller.via_gateway);
    }

    #[test]
    fn nobody_else_may_name_the_caller() {
        let auth = Authenticate::new(SpiffeId::parse(GATEWAY).unwrap());
        let other = "spiffe://onestop.lv/member/GOV/VID/eds";
        let error = auth
            .caller(Some(&peer(spiffe(other))), Some(MEMBER.as_bytes()), None)
            .unwrap_err();
        assert_eq!(error.code(), tonic::Code::PermissionDenied);
        // Nor may a member call directly as itself; a platform component may.
        let error = auth
            .caller(Some(&peer(spiffe(other))), None, None)
            .unwrap_err();
        assert_eq!(error.code(), tonic::Code::PermissionDenied);
        // Nor name a person, even without naming a caller.
        let routing = "spiffe://onestop.lv/platform/routing";
        let error = auth
            .caller(Some(&peer(spiffe(routing))), None, Some(b"e30"))
            .unwrap_err();
        assert_eq!(error.code(), tonic::Code::PermissionDenied);
        let direct = auth
            .caller(Some(&peer(spiffe(routing))), None, None)
            .unwrap();
        assert_eq!(direct.identity.to_string(), routing);
        assert!(!direct.via_gateway);
    }

    #[test]
    fn callers_without_identity_are_unauthenticated() {
        let auth = Authenticate::new(SpiffeId::parse(GATEWAY).unwrap());
        for identity in [
            PeerIdentity::Anonymous,
            PeerIdentity::Unidentified("no SAN".into()),
        ] {
            let error = auth.caller(Some(&peer(identity)), None, None).unwrap_err();
            assert_eq!(error.code(), tonic::Code::Unauthenticated);
        }
        let error = auth
            .caller(Some(&peer(spiffe(GATEWAY))), Some(b"not a uri"), None)
            .unwrap_err();
        assert_eq!(error.code(), tonic::Code::Unauthenticated);
    }
}
