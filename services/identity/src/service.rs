//! The use cases of the identity service: logins, sessions and their tokens, and mandates.
//! Who may do what is decided here; the providers speak to upstream OpenID providers, the
//! store keeps, the keys sign.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use onestop_platform::identity::{Member, SpiffeId};
use onestop_platform::paging::{PageTokens, Query};
use onestop_platform::person::Level;
use onestop_platform::requests::{Request, Requests};
use onestop_platform::telemetry::current_trace_id;
use onestop_platform::tokens::{self, Actor, Claims, MandateScope, Staff, Subject};
use time::OffsetDateTime;

use crate::catalogue::Catalogue;
use crate::error::IdentityError;
use crate::keys::Keys;
use crate::providers::{Identified, Provider};
use crate::store::{
    AuditEvent, Mandate, MandateCursor, PendingLogin, Profile, Refreshed, Revocation, Session,
    Store,
};

/// The longest redirect URI.
pub const MAX_REDIRECT_URI_BYTES: usize = 2048;
/// The longest `state`, `code` or refresh token accepted.
pub const MAX_OPAQUE_BYTES: usize = 2048;
/// The most services one mandate covers.
pub const MAX_MANDATE_SERVICES: usize = 50;
/// The longest a mandate may run.
pub const MAX_MANDATE_DAYS: i64 = 366;
/// The most ended sessions one answer of [`Identity::ended_sessions`] lists.
pub const MAX_ENDED_SESSIONS: u32 = 10_000;
/// The longest `error` a provider may send back.
pub const MAX_PROVIDER_ERROR_BYTES: usize = 64;
/// The role a staff member needs to register and use mandates.
pub const CLERK_ROLE: &str = "clerk";

/// Lifetimes.
#[derive(Clone, Copy, Debug)]
pub struct Lifetimes {
    /// Of an access token.
    pub access_token: Duration,
    /// Of a session (its refresh tokens stop working after it).
    pub session: Duration,
    /// Of a token acting under a mandate.
    pub acting_token: Duration,
    /// Of a started login.
    pub login: Duration,
}

/// Platform tokens issued.
#[derive(Clone, Debug)]
pub struct Tokens {
    /// The access token.
    pub access_token: String,
    /// When it expires.
    pub access_expire_time: OffsetDateTime,
    /// The refresh token.
    pub refresh_token: String,
    /// When the session ends.
    pub session_expire_time: OffsetDateTime,
}

/// A mandate to register.
#[derive(Clone, Debug)]
pub struct NewMandate {
    /// The resident (`lv:...` or `eidas:...`).
    pub principal: Subject,
    /// Catalogue service codes.
    pub services: Vec<String>,
    /// From when (now when unset).
    pub valid_from: Option<OffsetDateTime>,
    /// Until when.
    pub valid_until: OffsetDateTime,
    /// SHA-256 of the signed authorisation.
    pub document_sha256: String,
    /// `passport`, `id_card` or `residence_permit`.
    pub identity_document: &'static str,
}

/// The identity service's use cases.
pub struct Identity {
    store: Store,
    requests: Requests,
    keys: Arc<Keys>,
    providers: BTreeMap<String, Provider>,
    /// Redirect URIs by member system (`CLASS/CODE/subsystem`).
    front_ends: HashMap<String, Vec<String>>,
    trust_domain: String,
    lifetimes: Lifetimes,
    pages: PageTokens,
    /// Where a mandate's services are checked.
    catalogue: Catalogue,
}

fn sha256_hex(text: &str) -> String {
    ring::digest::digest(&ring::digest::SHA256, text.as_bytes())
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn opaque(field: &str, value: &str) -> Result<(), IdentityError> {
    if value.is_empty() || value.len() > MAX_OPAQUE_BYTES {
        return Err(IdentityError::invalid(
            field,
            format!("must be 1-{MAX_OPAQUE_BYTES} bytes"),
        ));
    }
    Ok(())
}

/// A provider's `error` code, as RFC 6749 allows it (printable ASCII but `"` and `\\`).
fn provider_error_code(error: &str) -> Result<&str, IdentityError> {
    let allowed = |b: u8| matches!(b, 0x20..=0x21 | 0x23..=0x5b | 0x5d..=0x7e);
    if error.len() > MAX_PROVIDER_ERROR_BYTES || !error.bytes().all(allowed) {
        return Err(IdentityError::invalid(
            "error",
            format!(
                "the provider's `error` parameter: at most {MAX_PROVIDER_ERROR_BYTES} printable ASCII characters"
            ),
        ));
    }
    Ok(error)
}

/// The member system a caller is, for binding logins and tokens to it.
fn client_of(caller: &SpiffeId) -> Result<(&Member, String), IdentityError> {
    match caller.as_member() {
        Some(member) => Ok((member, caller.to_string())),
        None => Err(IdentityError::PermissionDenied(
            "logins and tokens are for member systems (front ends), not platform components".into(),
        )),
    }
}

fn page_query(principal: &str, centre: &str) -> Query {
    Query::new("ListMandates")
        .with("principal", principal)
        .with("centre", centre)
}

impl Identity {
    /// The use cases over their parts.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        store: Store,
        requests: Requests,
        keys: Arc<Keys>,
        providers: Vec<Provider>,
        front_ends: HashMap<String, Vec<String>>,
        trust_domain: &str,
        lifetimes: Lifetimes,
        pages: PageTokens,
        catalogue: Catalogue,
    ) -> Self {
        Self {
            store,
            requests,
            keys,
            providers: providers
                .into_iter()
                .map(|p| (p.config.id.clone(), p))
                .collect(),
            front_ends,
            trust_domain: trust_domain.to_owned(),
            lifetimes,
            pages,
            catalogue,
        }
    }

    /// The store.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The record of requests.
    pub fn requests(&self) -> &Requests {
        &self.requests
    }

    /// The configured providers.
    pub fn providers(&self) -> impl Iterator<Item = &Provider> {
        self.providers.values()
    }

    /// The published key set.
    pub fn jwks(&self) -> String {
        self.keys.jwks()
    }

    /// Starts a login for the calling front end.
    pub async fn start_login(
        &self,
        caller: &SpiffeId,
        provider_id: &str,
        redirect_uri: &str,
        minimum: Option<Level>,
        now: OffsetDateTime,
    ) -> Result<(String, String, OffsetDateTime), IdentityError> {
        let (member, client) = client_of(caller)?;
        if redirect_uri.len() > MAX_REDIRECT_URI_BYTES {
            return Err(IdentityError::invalid(
                "redirect_uri",
                format!("at most {MAX_REDIRECT_URI_BYTES} bytes"),
            ));
        }
        let registered = self
            .front_ends
            .get(&member.to_string())
            .is_some_and(|uris| uris.iter().any(|uri| uri == redirect_uri));
        if !registered {
            return Err(IdentityError::RedirectNotRegistered(member.to_string()));
        }
        let provider = self.providers.get(provider_id).ok_or_else(|| {
            IdentityError::UnknownProvider(onestop_platform::status::echo(provider_id).into())
        })?;
        let lowest = provider.levels().first().copied().unwrap_or(Level::Low);
        let minimum = minimum.unwrap_or(lowest);
        if provider.levels().last().is_none_or(|top| *top < minimum) {
            return Err(IdentityError::invalid(
                "minimum_level",
                format!("provider {provider_id} does not reach level {minimum}"),
            ));
        }
        let pending = provider.start(redirect_uri, minimum).await?;
        let expire_time = now + self.lifetimes.login;
        let login = PendingLogin {
            state_hash: sha256_hex(&pending.state),
            provider_id: provider_id.to_owned(),
            client,
            redirect_uri: redirect_uri.to_owned(),
            nonce: pending.nonce,
            verifier: pending.verifier,
            minimum_level: minimum,
            expire_time,
        };
        self.store.insert_login(&login).await?;
        Ok((pending.url, pending.state, expire_time))
    }

    /// Completes a login and starts a session; or, when the provider sent the browser back with
    /// an error (`provider_error`: its `error` and `error_description`), ends it.
    pub async fn complete_login(
        &self,
        caller: &SpiffeId,
        state: &str,
        code: &str,
        provider_error: Option<(&str, &str)>,
        now: OffsetDateTime,
    ) -> Result<(Tokens, Profile), IdentityError> {
        let (_, client) = client_of(caller)?;
        opaque("state", state)?;
        let state_hash = sha256_hex(state);
        // Only the front end that started the login finds it: another system presenting a
        // stolen (state, code) pair is refused without using the login up.
        let pending = self
            .store
            .login(&state_hash, &client, now)
            .await?
            .ok_or(IdentityError::UnknownLogin)?;
        if let Some((error, description)) = provider_error {
            let error = provider_error_code(error)?;
            tracing::info!(
                provider = %pending.provider_id,
                error,
                description = %onestop_platform::status::echo(description),
                "the provider ended a login with an error"
            );
            self.store.end_login(&state_hash).await?;
            return Err(IdentityError::DeniedAtProvider {
                provider: pending.provider_id,
                error: error.to_owned(),
            });
        }
        opaque("code", code)?;
        let provider = self
            .providers
            .get(&pending.provider_id)
            .ok_or_else(|| IdentityError::UnknownProvider(pending.provider_id.clone()))?;
        let completed = provider
            .complete(
                code,
                &pending.redirect_uri,
                &pending.nonce,
                &pending.verifier,
                pending.minimum_level,
            )
            .await;
        let login = match completed {
            Ok(login) => login,
            // A refusal is final: the code is spent at the provider, the login is over.
            Err(
                refused @ (IdentityError::LoginRefused(_)
                | IdentityError::IdTokenMalformed(_)
                | IdentityError::LevelTooLow { .. }),
            ) => {
                self.store.end_login(&state_hash).await?;
                return Err(refused);
            }
            // An unavailable or misconfigured provider leaves the login to be completed again,
            // as does a call abandoned on the way (its deadline passed): nothing was spent.
            Err(other) => return Err(other),
        };
        let (sub, staff) = match login.who {
            Identified::Resident { personal_code } => (Subject::Resident(personal_code), None),
            Identified::Foreign(id) => (Subject::Foreign(id), None),
            Identified::Staff {
                staff_id,
                institution,
                centre,
                roles,
            } => {
                let staff = Staff {
                    institution: institution.to_string(),
                    centre,
                    roles,
                };
                (
                    Subject::Staff {
                        institution,
                        staff_id,
                    },
                    Some(staff),
                )
            }
        };
        let profile = Profile {
            sub: sub.to_string(),
            auth: tokens::Authentication {
                provider: provider.config.id.clone(),
                level: login.level,
                country: login.country,
                time: login.auth_time,
            },
            given_name: login.given_name,
            family_name: login.family_name,
            staff,
        };
        let session = Session {
            session_id: crate::random_id()?,
            client: client.clone(),
            profile: profile.clone(),
            expire_time: now + self.lifetimes.session,
        };
        let refresh_token = crate::random_secret()?;
        let refresh_hash = sha256_hex(&refresh_token);
        if !self
            .store
            .create_session(&session, &refresh_hash, &state_hash, now)
            .await?
        {
            // Another completion of the same login came first.
            return Err(IdentityError::UnknownLogin);
        }
        let (access_token, access_expire_time) = self.access_token(&session, now)?;
        Ok((
            Tokens {
                access_token,
                access_expire_time,
                refresh_token,
                session_expire_time: session.expire_time,
            },
            profile,
        ))
    }

    fn access_token(
        &self,
        session: &Session,
        now: OffsetDateTime,
    ) -> Result<(String, OffsetDateTime), IdentityError> {
        // Never past the session's end.
        let expire_time = (now + self.lifetimes.access_token).min(session.expire_time);
        let claims = self.claims(&session.client, &session.profile, now, expire_time)?;
        let claims = Claims {
            sid: Some(session.session_id.clone()),
            ..claims
        };
        let token = self.keys.sign(&claims).map_err(IdentityError::Internal)?;
        Ok((token, expire_time))
    }

    fn claims(
        &self,
        client: &str,
        profile: &Profile,
        now: OffsetDateTime,
        expire_time: OffsetDateTime,
    ) -> Result<Claims, IdentityError> {
        let jti = crate::random_id()?;
        Ok(Claims {
            iss: tokens::issuer(&self.trust_domain),
            aud: tokens::audience(&self.trust_domain),
            sub: profile.sub.clone(),
            exp: expire_time.unix_timestamp(),
            iat: now.unix_timestamp(),
            nbf: now.unix_timestamp(),
            jti,
            cid: client.to_owned(),
            sid: None,
            auth: profile.auth.clone(),
            given_name: profile.given_name.clone(),
            family_name: profile.family_name.clone(),
            staff: profile.staff.clone(),
            act: None,
            mandate: None,
        })
    }

    /// The sessions that ended since `since` (all whose access tokens may still be valid when
    /// unset), and the time up to which the answer is complete. For the platform's components
    /// only: the gateway refuses those sessions' access tokens.
    pub async fn ended_sessions(
        &self,
        caller: &SpiffeId,
        via_gateway: bool,
        since: Option<OffsetDateTime>,
        now: OffsetDateTime,
    ) -> Result<(Vec<String>, OffsetDateTime), IdentityError> {
        if via_gateway || caller.as_member().is_some() {
            return Err(IdentityError::PermissionDenied(
                "ended sessions are for the platform's gateways".into(),
            ));
        }
        // Older ends concern only expired tokens.
        let oldest =
            now - self.lifetimes.access_token - Duration::from_secs(tokens::LEEWAY_SECONDS);
        let since = since.map_or(oldest, |since| since.max(oldest));
        let ended = self.store.ended_sessions(since, MAX_ENDED_SESSIONS).await?;
        // A full page is complete only up to its last end; otherwise up to now.
        let read_time = match ended.last() {
            Some((_, last)) if ended.len() == MAX_ENDED_SESSIONS as usize => *last,
            _ => now,
        };
        Ok((ended.into_iter().map(|(id, _)| id).collect(), read_time))
    }

    /// Renews a session's tokens.
    pub async fn refresh(
        &self,
        caller: &SpiffeId,
        refresh_token: &str,
        now: OffsetDateTime,
    ) -> Result<Tokens, IdentityError> {
        let (_, client) = client_of(caller)?;
        opaque("refresh_token", refresh_token)?;
        let next = crate::random_secret()?;
        let (hash, next_hash) = (sha256_hex(refresh_token), sha256_hex(&next));
        match self.store.refresh(&hash, &next_hash, &client, now).await? {
            Refreshed::Renewed(session) => {
                let (access_token, access_expire_time) = self.access_token(&session, now)?;
                Ok(Tokens {
                    access_token,
                    access_expire_time,
                    refresh_token: next,
                    session_expire_time: session.expire_time,
                })
            }
            Refreshed::NotActive => Err(IdentityError::SessionEnded),
            Refreshed::Reused => {
                tracing::warn!(
                    client,
                    "a refresh token was used twice; its session is ended"
                );
                Err(IdentityError::RefreshReused)
            }
        }
    }

    /// Ends a session.
    pub async fn logout(
        &self,
        caller: &SpiffeId,
        refresh_token: &str,
        now: OffsetDateTime,
    ) -> Result<(), IdentityError> {
        let (_, client) = client_of(caller)?;
        opaque("refresh_token", refresh_token)?;
        let hash = sha256_hex(refresh_token);
        if self.store.logout(&hash, &client, now).await? {
            Ok(())
        } else {
            Err(IdentityError::SessionEnded)
        }
    }

    /// Registers a mandate, by a clerk at a centre.
    pub async fn register_mandate(
        &self,
        caller: &SpiffeId,
        person: Option<&Claims>,
        request: &Request,
        new: NewMandate,
        now: OffsetDateTime,
    ) -> Result<Mandate, IdentityError> {
        let (_, client) = client_of(caller)?;
        let clerk = clerk_of(person)?;
        if let Some(id) = self.requests.earlier(request).await? {
            // A retry sees the mandate only if this clerk may (another clerk of the same front
            // end may have made the first request).
            return self.visible_mandate(|m| clerk.serves(m), &id).await;
        }
        let valid_from = new.valid_from.unwrap_or(now);
        check_services(&new.services)?;
        self.catalogue.check(&new.services).await?;
        if new.valid_until <= valid_from {
            return Err(IdentityError::invalid(
                "valid_until",
                "must be after valid_from",
            ));
        }
        if new.valid_until - valid_from > time::Duration::days(MAX_MANDATE_DAYS) {
            return Err(IdentityError::invalid(
                "valid_until",
                format!("a mandate runs at most {MAX_MANDATE_DAYS} days"),
            ));
        }
        if new.valid_until <= now {
            return Err(IdentityError::invalid(
                "valid_until",
                "must be in the future",
            ));
        }
        if new.document_sha256.len() != 64
            || !new
                .document_sha256
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            return Err(IdentityError::invalid(
                "document_sha256",
                "64 lower-case hex digits, the SHA-256 of the scanned authorisation",
            ));
        }
        let mandate = Mandate {
            id: crate::random_id()?,
            principal: new.principal.to_string(),
            services: new.services,
            valid_from,
            valid_until: new.valid_until,
            document_sha256: new.document_sha256,
            identity_document: new.identity_document.to_owned(),
            centre: clerk.centre.clone(),
            clerk: clerk.sub.clone(),
            clerk_staff: clerk.staff.clone(),
            create_time: now,
            revoked: None,
        };
        let event = AuditEvent {
            kind: "mandate.registered",
            actor: clerk.sub.clone(),
            subject: mandate.principal.clone(),
            mandate_id: Some(mandate.id.clone()),
            client,
            trace_id: current_trace_id(),
            details: serde_json::json!({
                "centre": clerk.centre,
                "services": mandate.services,
                "identity_document": mandate.identity_document,
            })
            .to_string(),
            time: now,
        };
        match self.store.insert_mandate(&mandate, request, &event).await {
            Ok(()) => Ok(mandate),
            Err(onestop_platform::db::StoreError::Conflict) => {
                // A retry that raced the first attempt.
                let id = self
                    .requests
                    .earlier(request)
                    .await?
                    .ok_or_else(|| IdentityError::Internal("mandate id collision".into()))?;
                self.visible_mandate(|m| clerk.serves(m), &id).await
            }
            Err(e) => Err(e.into()),
        }
    }

    async fn stored_mandate(&self, id: &str) -> Result<Mandate, IdentityError> {
        self.store
            .mandate(id)
            .await?
            .ok_or_else(|| IdentityError::NotFound(format!("mandates/{id}")))
    }

    /// A mandate the person may see: the principal's own, or one of the clerk's centre.
    pub async fn mandate(
        &self,
        person: Option<&Claims>,
        id: &str,
    ) -> Result<Mandate, IdentityError> {
        let viewer = viewer_of(person)?;
        self.visible_mandate(|m| viewer.may_see(m), id).await
    }

    /// A mandate, if `may_see` it.
    async fn visible_mandate(
        &self,
        may_see: impl Fn(&Mandate) -> bool,
        id: &str,
    ) -> Result<Mandate, IdentityError> {
        let mandate = self.stored_mandate(id).await?;
        if may_see(&mandate) {
            Ok(mandate)
        } else {
            // Not told apart from a missing one: ids of others' mandates reveal nothing.
            Err(IdentityError::NotFound(format!("mandates/{id}")))
        }
    }

    /// A page of mandates: the resident's own, or those of the clerk's centre (optionally of
    /// one principal).
    pub async fn mandates(
        &self,
        person: Option<&Claims>,
        principal: Option<Subject>,
        page_token: &str,
        size: u32,
    ) -> Result<(Vec<Mandate>, Option<String>), IdentityError> {
        let viewer = viewer_of(person)?;
        let (principal, centre) = match &viewer {
            Viewer::Principal(sub) => (sub.clone(), String::new()),
            Viewer::Clerk(clerk) => (
                principal.map(|p| p.to_string()).unwrap_or_default(),
                clerk.centre.clone(),
            ),
        };
        let query = page_query(&principal, &centre);
        let after = self
            .pages
            .resume(&query, page_token)
            .map_err(|m| IdentityError::invalid("page_token", m))?
            .map(|key| parse_cursor(&key))
            .transpose()?;
        let mut found = self
            .store
            .mandates(
                Some(principal.as_str()).filter(|p| !p.is_empty()),
                Some(centre.as_str()).filter(|c| !c.is_empty()),
                after.as_ref(),
                size.saturating_add(1),
            )
            .await?;
        let more = found.len() > size as usize;
        found.truncate(size as usize);
        let next = more.then(|| found.last()).flatten().map(|last| {
            self.pages.issue(
                &query,
                &format!(
                    "{}:{}",
                    onestop_platform::db::millis(last.create_time),
                    last.id
                ),
            )
        });
        Ok((found, next))
    }

    /// Revokes a mandate: its principal or a clerk of its centre.
    pub async fn revoke(
        &self,
        caller: &SpiffeId,
        person: Option<&Claims>,
        id: &str,
        reason: &str,
        now: OffsetDateTime,
    ) -> Result<Mandate, IdentityError> {
        let (_, client) = client_of(caller)?;
        if reason.trim().is_empty() || reason.chars().count() > 500 {
            return Err(IdentityError::invalid(
                "reason",
                "say why, in 1-500 characters",
            ));
        }
        let viewer = viewer_of(person)?;
        let mandate = self.visible_mandate(|m| viewer.may_see(m), id).await?;
        let by = viewer.subject().to_owned();
        let revocation = Revocation {
            time: now,
            reason: reason.to_owned(),
            by: by.clone(),
        };
        let event = AuditEvent {
            kind: "mandate.revoked",
            actor: by,
            subject: mandate.principal.clone(),
            mandate_id: Some(mandate.id.clone()),
            client,
            trace_id: current_trace_id(),
            details: serde_json::json!({ "reason": reason }).to_string(),
            time: now,
        };
        self.store.revoke_mandate(id, &revocation, &event).await?;
        self.stored_mandate(id).await
    }

    /// Exchanges a mandate for a token acting on the resident's behalf (RFC 8693 in spirit):
    /// only a clerk of the mandate's centre, only while it is valid and not revoked, only for
    /// services it covers.
    pub async fn exchange(
        &self,
        caller: &SpiffeId,
        person: Option<&Claims>,
        id: &str,
        services: Vec<String>,
        now: OffsetDateTime,
    ) -> Result<(String, OffsetDateTime), IdentityError> {
        let (_, client) = client_of(caller)?;
        let clerk = clerk_of(person)?;
        // How surely the clerk was identified (clerk_of found a person).
        let auth = person
            .map(|p| p.auth.clone())
            .ok_or_else(|| IdentityError::PersonRequired("a clerk's token is required".into()))?;
        // Only the clerks of its centre see it at all: to others it does not exist.
        let mandate = self.visible_mandate(|m| clerk.serves(m), id).await?;
        if let Some(revoked) = &mandate.revoked {
            return Err(IdentityError::MandateUnusable(format!(
                "mandates/{id} was revoked ({})",
                onestop_platform::status::echo(&revoked.reason)
            )));
        }
        if now < mandate.valid_from || now >= mandate.valid_until {
            return Err(IdentityError::MandateUnusable(format!(
                "mandates/{id} is not valid now (from {} until {})",
                mandate.valid_from, mandate.valid_until
            )));
        }
        let services = if services.is_empty() {
            mandate.services.clone()
        } else {
            check_services(&services)?;
            if let Some(wider) = services.iter().find(|s| !mandate.services.contains(s)) {
                return Err(IdentityError::PermissionDenied(format!(
                    "mandates/{id} does not cover `{}`: a mandate cannot be widened",
                    onestop_platform::status::echo(wider)
                )));
            }
            services
        };
        let expire_time = (now + self.lifetimes.acting_token).min(mandate.valid_until);
        let principal = Profile {
            sub: mandate.principal.clone(),
            // How surely the actor was identified: the resident was identified at the desk,
            // by a document, under the clerk's login.
            auth,
            given_name: None,
            family_name: None,
            staff: None,
        };
        let claims = Claims {
            act: Some(Actor {
                sub: clerk.sub.clone(),
                staff: clerk.staff.clone(),
            }),
            mandate: Some(MandateScope {
                id: mandate.id.clone(),
                services: services.clone(),
                authorisation_sha256: mandate.document_sha256.clone(),
            }),
            ..self.claims(&client, &principal, now, expire_time)?
        };
        let token = self.keys.sign(&claims).map_err(IdentityError::Internal)?;
        self.store
            .audit(&AuditEvent {
                kind: "mandate.exchanged",
                actor: clerk.sub,
                subject: mandate.principal.clone(),
                mandate_id: Some(mandate.id.clone()),
                client,
                trace_id: current_trace_id(),
                details: serde_json::json!({ "services": services, "jti": claims.jti }).to_string(),
                time: now,
            })
            .await?;
        Ok((token, expire_time))
    }
}

/// A clerk at a centre, as their token names them.
struct Clerk {
    /// Their subject.
    sub: String,
    /// Where they work (institution, centre, roles).
    staff: Staff,
    /// Their centre.
    centre: String,
}

impl Clerk {
    /// Whether the mandate was given at this clerk's centre of this clerk's institution.
    fn serves(&self, mandate: &Mandate) -> bool {
        self.centre == mandate.centre && self.staff.institution == mandate.clerk_staff.institution
    }
}

/// Who looks at mandates.
enum Viewer {
    /// A resident (their own subject).
    Principal(String),
    /// A clerk at a centre.
    Clerk(Clerk),
}

impl Viewer {
    fn may_see(&self, mandate: &Mandate) -> bool {
        match self {
            Viewer::Principal(sub) => *sub == mandate.principal,
            Viewer::Clerk(clerk) => clerk.serves(mandate),
        }
    }

    fn subject(&self) -> &str {
        match self {
            Viewer::Principal(sub) => sub,
            Viewer::Clerk(clerk) => &clerk.sub,
        }
    }
}

fn viewer_of(person: Option<&Claims>) -> Result<Viewer, IdentityError> {
    let person = person.ok_or_else(|| {
        IdentityError::PersonRequired("mandates are seen with a person's token".into())
    })?;
    if person.act.is_some() {
        return Err(IdentityError::PermissionDenied(
            "a token acting under a mandate cannot manage mandates".into(),
        ));
    }
    match (&person.staff, person.subject()) {
        (Some(staff), Ok(Subject::Staff { .. })) if staff.has_role(CLERK_ROLE) => {
            let centre = staff.centre.clone().ok_or_else(|| {
                IdentityError::PermissionDenied("only clerks at a centre handle mandates".into())
            })?;
            Ok(Viewer::Clerk(Clerk {
                sub: person.sub.clone(),
                staff: staff.clone(),
                centre,
            }))
        }
        (None, Ok(Subject::Resident(_) | Subject::Foreign(_))) => {
            Ok(Viewer::Principal(person.sub.clone()))
        }
        _ => Err(IdentityError::PermissionDenied(
            "only the resident or a clerk at the centre handles mandates".into(),
        )),
    }
}

/// The clerk a token names.
fn clerk_of(person: Option<&Claims>) -> Result<Clerk, IdentityError> {
    match viewer_of(person)? {
        Viewer::Clerk(clerk) => Ok(clerk),
        Viewer::Principal(_) => Err(IdentityError::PermissionDenied(format!(
            "only a clerk (role `{CLERK_ROLE}`) at a centre may do this"
        ))),
    }
}

fn check_services(services: &[String]) -> Result<(), IdentityError> {
    if services.is_empty() || services.len() > MAX_MANDATE_SERVICES {
        return Err(IdentityError::invalid(
            "services",
            format!("name 1-{MAX_MANDATE_SERVICES} catalogue services"),
        ));
    }
    for service in services {
        let ok = (3..=63).contains(&service.len())
            && service
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
        if !ok {
            return Err(IdentityError::invalid(
                "services",
                format!(
                    "`{}` is not a catalogue service code (3-63 lower-case letters, digits, `-`)",
                    onestop_platform::status::echo(service)
                ),
            ));
        }
    }
    Ok(())
}

fn parse_cursor(key: &str) -> Result<MandateCursor, IdentityError> {
    key.split_once(':')
        .and_then(|(time, id)| Some((time.parse().ok()?, id.to_owned())))
        .ok_or_else(|| IdentityError::invalid("page_token", "not a page token of this listing"))
}
