//! People at the gateway: the bearer tokens front ends send on behalf of the people they serve,
//! verified against the identity service's key set before any service is reached.
//!
//! The key set is fetched from the identity service (its `GetKeySet`, over the gateway's own
//! upstream connection to it) at start, every [`REFRESH_INTERVAL`], and when a token names a
//! key not yet known, at most once per [`MIN_FETCH_GAP`] so that made-up key ids cannot make
//! the gateway hammer the identity service. The sessions that ended (a logout, a refresh token
//! used twice) are asked for every [`ENDED_SESSIONS_INTERVAL`], so that their access tokens
//! are refused within seconds rather than when they expire.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hashlink::LruCache;
use http::{HeaderMap, HeaderValue};
use onestop_platform::tokens::{Claims, LEEWAY_SECONDS, TokenError, Verifier};
use onestop_proto::identity::v1::identity_service_client::IdentityServiceClient;
use onestop_proto::identity::v1::{GetKeySetRequest, ListEndedSessionsRequest};
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
/// more than the rest of the call at the gateway. When full, the least recently used is
/// forgotten: a flood of new tokens costs their own verification, not everyone else's.
pub const MAX_REMEMBERED: usize = 20_000;

/// How often the sessions ended since the last time are asked for: how long a logged-out
/// session's access token may still pass.
pub const ENDED_SESSIONS_INTERVAL: Duration = Duration::from_secs(2);

/// How long an ended session is remembered: longer than any access token lives (15 minutes at
/// most, with the clocks' leeway).
pub const ENDED_SESSION_MEMORY: Duration = Duration::from_secs(16 * 60);

/// The SHA-256 of a token: the key it is remembered under (a token is up to 16 KiB; a
/// digest keeps the memory per entry small and fixed).
type TokenDigest = [u8; 32];

fn digest(token: &str) -> TokenDigest {
    let mut key = [0u8; 32];
    key.copy_from_slice(ring::digest::digest(&ring::digest::SHA256, token.as_bytes()).as_ref());
    key
}

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
    /// Tokens verified already, by their digest: only a token that verified is here, and it is
    /// used again only while it has not expired and only by the system it was issued to.
    remembered: std::sync::Mutex<LruCache<TokenDigest, Arc<Person>>>,
    /// Sessions that ended, by id (`sid`), with when the gateway learnt of it.
    ended: std::sync::RwLock<HashMap<String, Instant>>,
    /// The identity service's `read_time` of the last answer about ended sessions.
    ended_since: Mutex<Option<prost_types::Timestamp>>,
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
            remembered: std::sync::Mutex::new(LruCache::new(MAX_REMEMBERED)),
            ended: std::sync::RwLock::new(HashMap::new()),
            ended_since: Mutex::new(None),
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

    /// Asks the identity service for the sessions ended since the last answer; returns how
    /// many sessions are known to have ended.
    pub async fn fetch_ended_sessions(&self) -> Result<usize, String> {
        let identity = self
            .identity
            .clone()
            .ok_or("no identity service is routed")?;
        let mut client = IdentityServiceClient::new(Client(identity));
        // One asker at a time, so that answers are applied in order.
        let mut since = self.ended_since.lock().await;
        let request = ListEndedSessionsRequest {
            // A little before the last answer's time: a replica whose clock is behind may have
            // recorded an end earlier than that.
            ended_since: since.map(|t| prost_types::Timestamp {
                seconds: t.seconds - LEEWAY_SECONDS as i64,
                nanos: t.nanos,
            }),
        };
        let answer = tokio::time::timeout(FETCH_TIMEOUT, client.list_ended_sessions(request))
            .await
            .map_err(|_| "the identity service did not answer in time".to_owned())?
            .map_err(|status| format!("ListEndedSessions: {status}"))?
            .into_inner();
        let learnt = Instant::now();
        let mut ended = self.ended.write().unwrap_or_else(|p| p.into_inner());
        ended.retain(|_, at| learnt.duration_since(*at) < ENDED_SESSION_MEMORY);
        for session in answer.session_ids {
            ended.entry(session).or_insert(learnt);
        }
        *since = answer.read_time;
        Ok(ended.len())
    }

    /// Whether the session `sid` is known to have ended.
    fn session_ended(&self, sid: Option<&str>) -> bool {
        sid.is_some_and(|sid| {
            self.ended
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .contains_key(sid)
        })
    }

    /// Fetches the key set now and every [`REFRESH_INTERVAL`], and the ended sessions every
    /// [`ENDED_SESSIONS_INTERVAL`], until `shutdown`.
    pub fn keep_fresh(self: &Arc<Self>, shutdown: CancellationToken) {
        if self.identity.is_none() {
            return;
        }
        let people = self.clone();
        let stop = shutdown.clone();
        tokio::spawn(async move {
            loop {
                if let Err(error) = people.fetch_ended_sessions().await {
                    tracing::warn!(%error, "fetching the ended sessions failed");
                }
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep(ENDED_SESSIONS_INTERVAL) => {}
                }
            }
        });
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
            return self.unless_ended(person).map(Some);
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
        self.unless_ended(person).map(Some)
    }

    /// The person, unless their session has ended.
    fn unless_ended(&self, person: Arc<Person>) -> Result<Arc<Person>, PersonRefusal> {
        if self.session_ended(person.claims.sid.as_deref()) {
            return Err(PersonRefusal::Token(TokenError::SessionEnded));
        }
        Ok(person)
    }

    /// A token verified before, if it is still good for `presenter`.
    fn recall(&self, token: &str, presenter: &str) -> Result<Option<Arc<Person>>, PersonRefusal> {
        let mut remembered = self.remembered.lock().unwrap_or_else(|p| p.into_inner());
        let Some(person) = remembered.get(&digest(token)) else {
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
        // At capacity the least recently used entry goes.
        remembered.insert(digest(token), person);
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

#[cfg(test)]
mod tests {
    use onestop_platform::person::Level;
    use onestop_platform::tokens::Authentication;

    use super::*;

    const PRESENTER: &str = "spiffe://onestop.lv/member/MUN/GULBENE/kac";

    fn person(n: usize) -> Arc<Person> {
        let at = now();
        Arc::new(Person {
            claims: Claims {
                iss: "https://onestop.lv/identity".into(),
                aud: "https://onestop.lv".into(),
                sub: format!("staff:MUN/GULBENE/clerk-{n}"),
                exp: at + 300,
                iat: at,
                nbf: at,
                jti: format!("jti-{n}"),
                cid: PRESENTER.into(),
                sid: Some(format!("session-{n}")),
                auth: Authentication {
                    provider: "staff".into(),
                    level: Level::High,
                    country: None,
                    time: at,
                },
                given_name: None,
                family_name: None,
                staff: None,
                act: None,
                mandate: None,
            },
            header: HeaderValue::from_static("claims"),
            subject: Arc::from(format!("clerk-{n}").as_str()),
        })
    }

    fn recalled(people: &People, token: &str) -> bool {
        people.recall(token, PRESENTER).unwrap().is_some()
    }

    #[test]
    fn a_full_cache_forgets_only_the_least_recently_used_token() {
        let people = People::new("onestop.lv", None, MemberRates::new(10, 30));
        for n in 0..MAX_REMEMBERED {
            people.remember(&format!("token-{n}"), person(n));
        }
        // The first token is used again: the second is now the least recently used.
        assert!(recalled(&people, "token-0"));
        people.remember("token-new", person(MAX_REMEMBERED));
        assert!(recalled(&people, "token-new"));
        assert!(recalled(&people, "token-0"), "a token in use stays");
        assert!(recalled(&people, &format!("token-{}", MAX_REMEMBERED - 1)));
        assert!(
            !recalled(&people, "token-1"),
            "the least recently used goes"
        );
    }
}
