//! People at the gateway: the bearer tokens front ends send on behalf of the people they serve,
//! verified against the identity service's key set before any service is reached.
//!
//! The key set is fetched from the identity service (its `GetKeySet`, over the gateway's own
//! upstream connection to it) at start, every [`REFRESH_INTERVAL`], and when a token names a
//! key not yet known, at most once per [`MIN_FETCH_GAP`] so that made-up key ids cannot make
//! the gateway hammer the identity service.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::{HeaderMap, HeaderValue};
use onestop_platform::tokens::{Claims, LEEWAY_SECONDS, TokenError, Verifier};
use onestop_proto::identity::v1::GetKeySetRequest;
use onestop_proto::identity::v1::identity_service_client::IdentityServiceClient;
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;

use crate::limits::MemberRates;
use crate::upstream::{Client, Upstream};

/// The identity service, whose key set signs people's tokens.
pub const IDENTITY_SERVICE: &str =
    onestop_proto::identity::v1::identity_service_server::SERVICE_NAME;

/// How often the key set is fetched anyway.
pub const REFRESH_INTERVAL: Duration = Duration::from_secs(60);

/// The least time between two fetches caused by unknown key ids.
pub const MIN_FETCH_GAP: Duration = Duration::from_secs(1);

/// How long one fetch may take.
pub const FETCH_TIMEOUT: Duration = Duration::from_secs(5);

/// The most verified tokens remembered. A front end sends the same token with every call of
/// its person for minutes; verifying its signature each time (some 80 µs of ES256) would cost
/// more than the rest of the call at the gateway.
pub const MAX_REMEMBERED: usize = 20_000;

/// A verified person, with the header that names them to services.
#[derive(Debug)]
pub struct Person {
    /// The token's claims.
    pub claims: Claims,
    /// The claims as services receive them (`x-onestop-person`).
    pub header: HeaderValue,
    /// The subject, the key of the person's rate.
    pub subject: Arc<str>,
}

/// Why a call's person is refused: the token's error, or why none could be checked.
#[derive(Debug)]
pub enum PersonRefusal {
    /// The token is not valid.
    Token(TokenError),
    /// The `authorization` header is not `Bearer <token>`.
    NotBearer,
    /// No identity service is routed, so no token can be checked.
    NoIdentityService,
}

/// Verifies people's tokens and limits each person's rate.
pub struct People {
    verifier: Verifier,
    identity: Option<Arc<Upstream>>,
    /// When an unknown key id last caused a fetch (the periodic fetches do not count: a key
    /// that appeared just after one must be learnt at once).
    last_fetch: Mutex<Option<Instant>>,
    /// Tokens verified already, by the token itself: only a token that verified is here, and
    /// it is used again only while it has not expired and only by the system it was issued to.
    remembered: std::sync::Mutex<HashMap<String, Arc<Person>>>,
    /// Calls a second per person, keyed by subject: one portal carries many people, and one
    /// person must not use up the portal's rate.
    pub rates: MemberRates,
}

impl People {
    /// People of `trust_domain`, their keys from `identity` (when it is routed).
    pub fn new(trust_domain: &str, identity: Option<Arc<Upstream>>, rates: MemberRates) -> Self {
        Self {
            verifier: Verifier::new(trust_domain),
            identity,
            last_fetch: Mutex::new(None),
            remembered: std::sync::Mutex::new(HashMap::new()),
            rates,
        }
    }

    /// The verifier (for benchmarks and tests).
    pub fn verifier(&self) -> &Verifier {
        &self.verifier
    }

    /// Fetches the key set now; returns how many keys it holds.
    pub async fn fetch(&self) -> Result<usize, String> {
        let identity = self
            .identity
            .clone()
            .ok_or("no identity service is routed")?;
        let mut client = IdentityServiceClient::new(Client(identity));
        let answer = tokio::time::timeout(FETCH_TIMEOUT, client.get_key_set(GetKeySetRequest {}))
            .await
            .map_err(|_| "the identity service did not answer in time".to_owned())?
            .map_err(|status| format!("GetKeySet: {status}"))?;
        self.verifier.set_keys(&answer.into_inner().jwks_json)
    }

    /// Fetches the key set now and every [`REFRESH_INTERVAL`] until `shutdown`.
    pub fn keep_fresh(self: &Arc<Self>, shutdown: CancellationToken) {
        if self.identity.is_none() {
            return;
        }
        let people = self.clone();
        tokio::spawn(async move {
            loop {
                if let Err(error) = people.fetch().await {
                    tracing::warn!(%error, "fetching the token key set failed");
                }
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = tokio::time::sleep(REFRESH_INTERVAL) => {}
                }
            }
        });
    }

    /// The person a call speaks for: `None` when it carries no `authorization` header, the
    /// verified claims when it carries a valid token presented by the system it was issued to
    /// (`presenter`, a SPIFFE id), a refusal otherwise.
    pub async fn person(
        &self,
        headers: &HeaderMap,
        presenter: &str,
    ) -> Result<Option<Arc<Person>>, PersonRefusal> {
        let Some(value) = headers.get(http::header::AUTHORIZATION) else {
            return Ok(None);
        };
        let token = value
            .to_str()
            .ok()
            // The scheme is case-insensitive (RFC 9110).
            .and_then(|v| v.split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, token)| token.trim())
            .filter(|t| !t.is_empty())
            .ok_or(PersonRefusal::NotBearer)?;
        if self.identity.is_none() {
            return Err(PersonRefusal::NoIdentityService);
        }
        if let Some(person) = self.recall(token, presenter)? {
            return Ok(Some(person));
        }
        let claims = match self.verifier.verify(token, presenter) {
            Err(TokenError::UnknownKey(_)) if self.may_fetch().await => {
                if let Err(error) = self.fetch().await {
                    tracing::warn!(%error, "fetching the token key set failed");
                }
                self.verifier.verify(token, presenter)
            }
            verified => verified,
        }
        .map_err(PersonRefusal::Token)?;
        let header = HeaderValue::from_str(&claims.to_header()).map_err(|_| {
            PersonRefusal::Token(TokenError::Malformed(
                "claims that cannot be passed on".into(),
            ))
        })?;
        let subject = Arc::from(claims.sub.as_str());
        let person = Arc::new(Person {
            claims,
            header,
            subject,
        });
        self.remember(token, person.clone());
        Ok(Some(person))
    }

    /// A token verified before, if it is still good for `presenter`.
    fn recall(&self, token: &str, presenter: &str) -> Result<Option<Arc<Person>>, PersonRefusal> {
        let remembered = self.remembered.lock().unwrap_or_else(|p| p.into_inner());
        let Some(person) = remembered.get(token) else {
            return Ok(None);
        };
        if person.claims.exp + LEEWAY_SECONDS as i64 <= now() {
            return Err(PersonRefusal::Token(TokenError::Expired));
        }
        if person.claims.cid != presenter {
            return Err(PersonRefusal::Token(TokenError::OtherSystem));
        }
        Ok(Some(person.clone()))
    }

    fn remember(&self, token: &str, person: Arc<Person>) {
        let mut remembered = self.remembered.lock().unwrap_or_else(|p| p.into_inner());
        if remembered.len() >= MAX_REMEMBERED {
            let now = now();
            remembered.retain(|_, p| p.claims.exp + LEEWAY_SECONDS as i64 > now);
            if remembered.len() >= MAX_REMEMBERED {
                // Still full of live tokens: start again rather than grow.
                remembered.clear();
            }
        }
        remembered.insert(token.to_owned(), person);
    }

    /// Whether an unknown key id may cause a fetch now; if so, it is counted.
    async fn may_fetch(&self) -> bool {
        let mut last = self.last_fetch.lock().await;
        if last.is_some_and(|last| last.elapsed() < MIN_FETCH_GAP) {
            return false;
        }
        *last = Some(Instant::now());
        true
    }
}

fn now() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}
