//! The upstream OpenID providers people log in with: the national eID broker (residents,
//! foreign eIDAS identities) and the identity providers of municipalities and institutions
//! (staff).
//!
//! Each is configured once (issuer, client and how it authenticates, scopes, how its `acr`
//! values map to levels of assurance, which claims hold what, the CA of a provider on a
//! private PKI). The HTTP client follows no redirects, talks only to the provider's own origin
//! (discovery, keys and token endpoint alike) and reads at most [`MAX_RESPONSE_BYTES`] of an
//! answer. An ID token naming a key the service has not seen makes it fetch the provider's key
//! set again at once (at most every [`MIN_KEY_REFETCH_GAP`]): providers rotate their keys.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use onestop_platform::identity::Member;
use onestop_platform::person::{self, EidasId, Level};
use openidconnect::core::{
    CoreAuthenticationFlow, CoreClient, CoreClientAuthMethod, CoreJwsSigningAlgorithm,
    CoreProviderMetadata,
};
use openidconnect::{
    AuthType, AuthenticationContextClass, AuthorizationCode, ClaimsVerificationError, ClientId,
    ClientSecret, CsrfToken, DiscoveryError, EndpointMaybeSet, EndpointNotSet, EndpointSet,
    IssuerUrl, JsonWebKeySet, Nonce, PkceCodeChallenge, PkceCodeVerifier, RedirectUrl, Scope,
    TokenResponse,
};
use serde::Deserialize;
use tokio::sync::Mutex;

use crate::error::{IdentityError, Misconfiguration};

/// The most bytes read of any answer of a provider.
pub const MAX_RESPONSE_BYTES: usize = 1024 * 1024;
/// How long a provider may take to answer one request.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// How long an idle connection to a provider is kept for reuse: below the idle timeouts
/// servers commonly use (Node.js 5 s, nginx 75 s).
pub const IDLE_CONNECTION_REUSE: Duration = Duration::from_secs(2);
/// How long discovered metadata (endpoints, keys) is used before it is fetched again.
pub const METADATA_LIFETIME: Duration = Duration::from_secs(600);
/// The least time between two fetches of a provider's key set caused by ID tokens naming a key
/// not yet known: a new key is learnt at once, and a provider sending unknown key ids cannot
/// make the service fetch its keys at every login.
pub const MIN_KEY_REFETCH_GAP: Duration = Duration::from_secs(10);
/// The ID token signature algorithms accepted: asymmetric ones only, since a token "signed"
/// with the client secret (HS256) could have been made by anyone who knows the secret.
pub const ID_TOKEN_ALGORITHMS: [CoreJwsSigningAlgorithm; 10] = [
    CoreJwsSigningAlgorithm::RsaSsaPkcs1V15Sha256,
    CoreJwsSigningAlgorithm::RsaSsaPkcs1V15Sha384,
    CoreJwsSigningAlgorithm::RsaSsaPkcs1V15Sha512,
    CoreJwsSigningAlgorithm::RsaSsaPssSha256,
    CoreJwsSigningAlgorithm::RsaSsaPssSha384,
    CoreJwsSigningAlgorithm::RsaSsaPssSha512,
    CoreJwsSigningAlgorithm::EcdsaP256Sha256,
    CoreJwsSigningAlgorithm::EcdsaP384Sha384,
    CoreJwsSigningAlgorithm::EcdsaP521Sha512,
    CoreJwsSigningAlgorithm::EdDsa,
];
/// The most clock difference allowed when checking an ID token's expiry.
pub const MAX_LEEWAY: Duration = Duration::from_secs(60);
/// The longest name kept from a provider's claims.
pub const MAX_NAME_CHARS: usize = 200;
/// The most roles kept of a staff member.
pub const MAX_ROLES: usize = 32;

/// A short code: 1-63 lower-case letters, digits and `-` (centres, roles).
fn is_code(text: &str) -> bool {
    (1..=63).contains(&text.len())
        && text
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

/// Whom a provider identifies.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Audience {
    /// Residents and foreign eIDAS users.
    Residents,
    /// Staff of institutions and centres.
    Staff,
}

/// How the service authenticates itself at a provider's token endpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ClientAuth {
    /// The client id and secret in an HTTP Basic `authorization` header (RFC 6749 2.3.1).
    ClientSecretBasic,
    /// The client id and secret in the form body of the token request.
    ClientSecretPost,
}

impl ClientAuth {
    fn name(self) -> &'static str {
        match self {
            ClientAuth::ClientSecretBasic => "client_secret_basic",
            ClientAuth::ClientSecretPost => "client_secret_post",
        }
    }

    /// The method to use with a provider whose discovery lists `supported` (absent: only
    /// `client_secret_basic`, as OpenID Connect Discovery says), `configured` if set.
    fn choose(
        configured: Option<ClientAuth>,
        supported: Option<&Vec<CoreClientAuthMethod>>,
    ) -> Result<ClientAuth, String> {
        let offers = |auth: ClientAuth| match supported {
            None => auth == ClientAuth::ClientSecretBasic,
            Some(methods) => methods.iter().any(|m| {
                matches!(
                    (auth, m),
                    (
                        ClientAuth::ClientSecretBasic,
                        CoreClientAuthMethod::ClientSecretBasic
                    ) | (
                        ClientAuth::ClientSecretPost,
                        CoreClientAuthMethod::ClientSecretPost
                    )
                )
            }),
        };
        let listed = || match supported {
            None => "none (so only client_secret_basic)".to_owned(),
            Some(methods) => methods
                .iter()
                .map(|m| serde_json::to_string(m).unwrap_or_default())
                .collect::<Vec<_>>()
                .join(", "),
        };
        match configured {
            Some(auth) if offers(auth) => Ok(auth),
            Some(auth) => Err(format!(
                "client_auth = \"{}\" is configured, but its discovery lists {}",
                auth.name(),
                listed()
            )),
            None => [ClientAuth::ClientSecretBasic, ClientAuth::ClientSecretPost]
                .into_iter()
                .find(|auth| offers(*auth))
                .ok_or_else(|| {
                    format!(
                        "its discovery lists {} as token endpoint authentication, none of \
                         client_secret_basic and client_secret_post",
                        listed()
                    )
                }),
        }
    }
}

/// Which claims of the provider's ID tokens hold what.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClaimNames {
    /// A Latvian personal code.
    pub personal_code: String,
    /// An eIDAS identifier (`CC/DD/id`), for persons without a Latvian code.
    pub eidas_id: String,
    /// The country whose eID means were used.
    pub country: String,
    /// Given name.
    pub given_name: String,
    /// Family name.
    pub family_name: String,
    /// The staff member's id.
    pub staff_id: String,
    /// The staff member's institution (`CLASS/CODE`).
    pub institution: String,
    /// The staff member's centre.
    pub centre: String,
    /// The staff member's roles (an array of strings, or one string of roles separated by
    /// spaces).
    pub roles: String,
}

impl Default for ClaimNames {
    fn default() -> Self {
        Self {
            personal_code: "personal_code".into(),
            eidas_id: "eidas_id".into(),
            country: "country".into(),
            given_name: "given_name".into(),
            family_name: "family_name".into(),
            staff_id: "staff_id".into(),
            institution: "institution".into(),
            centre: "centre".into(),
            roles: "roles".into(),
        }
    }
}

/// One `[[identity.providers]]` entry.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProviderConfig {
    /// Its id, as front ends name it (`latvija`).
    pub id: String,
    /// The issuer URL; discovery is read from `<issuer>/.well-known/openid-configuration`.
    /// `https://`, or `http://` on a loopback address for development.
    pub issuer: String,
    /// The platform's client id at the provider.
    pub client_id: String,
    /// A file holding the client secret (the secret itself is never in the configuration):
    /// the secret as it is, UTF-8, surrounding white space (a final newline) ignored.
    pub client_secret_file: PathBuf,
    /// How to authenticate at the token endpoint; unset picks from the provider's discovery
    /// (`client_secret_basic` when offered, else `client_secret_post`).
    #[serde(default)]
    pub client_auth: Option<ClientAuth>,
    /// A PEM file of the CA certificates that vouch for the provider's HTTPS certificate, for a
    /// provider on a private PKI (a state's or a municipality's own CA). When set only these
    /// are trusted for this provider; unset, the public web roots are.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// Scopes to ask for besides `openid`.
    #[serde(default)]
    pub scopes: Vec<String>,
    /// Whom it identifies.
    pub audience: Audience,
    /// The provider's `acr` values and the level each means. An ID token whose `acr` is not
    /// here is refused.
    pub acr: BTreeMap<String, Level>,
    /// Claim names, when the provider's differ from the defaults.
    #[serde(default)]
    pub claims: ClaimNames,
    /// For a staff provider: the institutions (`CLASS/CODE`) whose staff it may vouch for. A
    /// token naming any other is refused, so that one municipality's provider cannot speak for
    /// another's clerks.
    #[serde(default)]
    pub institutions: Vec<String>,
    /// Allowed clock difference when checking expiry, in seconds (at most 60).
    #[serde(default = "default_leeway")]
    pub leeway_s: u64,
}

fn default_leeway() -> u64 {
    30
}

/// Who a provider identified.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Identified {
    /// A person with a Latvian personal code.
    Resident {
        /// `DDMMYY-NNNNN`.
        personal_code: String,
    },
    /// A person identified by another country.
    Foreign(EidasId),
    /// A member of staff.
    Staff {
        /// Their id.
        staff_id: String,
        /// Their institution.
        institution: Member,
        /// Their centre.
        centre: Option<String>,
        /// Their roles.
        roles: Vec<String>,
    },
}

/// A completed login as the provider vouched for it.
#[derive(Clone, Debug)]
pub struct Login {
    /// Who.
    pub who: Identified,
    /// At which level.
    pub level: Level,
    /// Country of the eID means, when known.
    pub country: Option<String>,
    /// Given name.
    pub given_name: Option<String>,
    /// Family name.
    pub family_name: Option<String>,
    /// When they authenticated (seconds since the epoch).
    pub auth_time: i64,
}

/// What a login keeps between its start and its completion.
#[derive(Clone, Debug)]
pub struct Pending {
    /// Where to send the browser.
    pub url: String,
    /// The `state` sent.
    pub state: String,
    /// The nonce the ID token must carry.
    pub nonce: String,
    /// The PKCE verifier.
    pub verifier: String,
}

type Client = CoreClient<
    EndpointSet,
    EndpointNotSet,
    EndpointNotSet,
    EndpointNotSet,
    EndpointMaybeSet,
    EndpointMaybeSet,
>;

struct Discovered {
    client: Client,
    /// Kept to make the client again with a key set fetched anew.
    metadata: CoreProviderMetadata,
    auth: ClientAuth,
    at: Instant,
}

/// A configured provider, its metadata discovered on first use.
pub struct Provider {
    /// Its configuration.
    pub config: ProviderConfig,
    issuer: IssuerUrl,
    secret: ClientSecret,
    http: Fetcher,
    discovered: Mutex<Option<Arc<Discovered>>>,
    /// When an unknown signing key last made the key set be fetched again.
    last_key_refetch: Mutex<Option<Instant>>,
}

impl std::fmt::Debug for Provider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Provider")
            .field("id", &self.config.id)
            .field("issuer", &self.config.issuer)
            .finish_non_exhaustive()
    }
}

/// Why the HTTP client refused or failed a request.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    /// The request went somewhere other than the provider's origin.
    #[error("refusing to call {0}: not the provider's own origin")]
    ForeignOrigin(String),
    /// The answer was too large.
    #[error("the answer is larger than {MAX_RESPONSE_BYTES} bytes")]
    TooLarge,
    /// The transport failed.
    #[error(transparent)]
    Transport(#[from] reqwest::Error),
    /// The request could not be built.
    #[error("{0}")]
    Other(String),
}

impl Provider {
    /// A provider from its configuration, reading its client secret.
    pub fn new(config: ProviderConfig) -> Result<Self, String> {
        let id = &config.id;
        if id.is_empty()
            || id.len() > 63
            || !id
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        {
            return Err(format!(
                "provider id `{id}`: 1-63 lower-case letters, digits and `-`"
            ));
        }
        let url = url::Url::parse(&config.issuer)
            .map_err(|e| format!("provider {id}: issuer `{}`: {e}", config.issuer))?;
        let loopback = matches!(url.host_str(), Some("127.0.0.1" | "localhost" | "[::1]"));
        if url.scheme() != "https" && !(url.scheme() == "http" && loopback) {
            return Err(format!(
                "provider {id}: the issuer must be https:// (http:// only on a loopback address)"
            ));
        }
        if config.acr.is_empty() {
            return Err(format!(
                "provider {id}: map at least one `acr` value to a level ([identity.providers.acr])"
            ));
        }
        for institution in &config.institutions {
            let member = Member::parse(institution)
                .map_err(|e| format!("provider {id}: institutions: {e}"))?;
            if !member.subsystem.is_empty() {
                return Err(format!(
                    "provider {id}: institutions are CLASS/CODE, not `{institution}`"
                ));
            }
        }
        if config.audience == Audience::Staff && config.institutions.is_empty() {
            return Err(format!(
                "provider {id}: a staff provider names the institutions it vouches for (institutions = [\"MUN/GULBENE\"])"
            ));
        }
        if config.leeway_s > MAX_LEEWAY.as_secs() {
            return Err(format!(
                "provider {id}: leeway_s is at most {}",
                MAX_LEEWAY.as_secs()
            ));
        }
        let secret = std::fs::read_to_string(&config.client_secret_file)
            .map_err(|e| {
                format!(
                    "provider {id}: client secret {}: {e}",
                    config.client_secret_file.display()
                )
            })?
            .trim()
            .to_owned();
        if secret.is_empty() {
            return Err(format!("provider {id}: the client secret file is empty"));
        }
        let mut http = reqwest::Client::builder();
        if let Some(file) = &config.ca_file {
            let pem = std::fs::read(file)
                .map_err(|e| format!("provider {id}: ca_file {}: {e}", file.display()))?;
            let roots = reqwest::Certificate::from_pem_bundle(&pem)
                .map_err(|e| format!("provider {id}: ca_file {}: {e}", file.display()))?;
            if roots.is_empty() {
                return Err(format!(
                    "provider {id}: ca_file {} holds no PEM certificate",
                    file.display()
                ));
            }
            // Only the provider's own CA: the public roots vouch for no private PKI's names.
            http = http.tls_built_in_root_certs(false);
            for root in roots {
                http = http.add_root_certificate(root);
            }
        }
        let http = http
            // Following redirects would let a provider (or whoever answers for it) send us
            // anywhere.
            .redirect(reqwest::redirect::Policy::none())
            .timeout(REQUEST_TIMEOUT)
            // An idle connection is not reused after this: a provider whose server closes idle
            // connections (Node.js after 5 s, for one) could close it just as a request is
            // written on it, and that request would fail. A login's few requests come within
            // moments of each other and still share one connection.
            .pool_idle_timeout(IDLE_CONNECTION_REUSE)
            .build()
            .map_err(|e| format!("provider {id}: HTTP client: {e}"))?;
        Ok(Self {
            issuer: IssuerUrl::new(config.issuer.clone()).map_err(|e| e.to_string())?,
            secret: ClientSecret::new(secret),
            http: Fetcher {
                client: http,
                origin: url.origin(),
            },
            discovered: Mutex::new(None),
            last_key_refetch: Mutex::new(None),
            config,
        })
    }

    /// The levels the provider can reach, lowest first.
    pub fn levels(&self) -> Vec<Level> {
        let mut levels: Vec<Level> = self.config.acr.values().copied().collect();
        levels.sort();
        levels.dedup();
        levels
    }

    /// The provider's `acr` values that reach at least `minimum`, lowest first.
    fn acr_values(&self, minimum: Level) -> Vec<&str> {
        let mut values: Vec<(&Level, &String)> = self
            .config
            .acr
            .iter()
            .filter(|(_, level)| **level >= minimum)
            .map(|(acr, level)| (level, acr))
            .collect();
        values.sort();
        values.into_iter().map(|(_, acr)| acr.as_str()).collect()
    }

    /// The discovered client, fetching the metadata when it is missing or old.
    async fn client(&self) -> Result<Arc<Discovered>, IdentityError> {
        let mut discovered = self.discovered.lock().await;
        if let Some(current) = discovered.as_ref()
            && current.at.elapsed() < METADATA_LIFETIME
        {
            return Ok(current.clone());
        }
        let metadata = CoreProviderMetadata::discover_async(self.issuer.clone(), &self.http)
            .await
            .map_err(|e| self.discovery_failed(e))?;
        // Checked before any login depends on it: the token endpoint is called later.
        if let Some(token) = metadata.token_endpoint() {
            self.on_own_origin("token_endpoint", token.url())?;
        }
        let auth = ClientAuth::choose(
            self.config.client_auth,
            metadata.token_endpoint_auth_methods_supported(),
        )
        .map_err(|detail| self.misconfigured(Misconfiguration::ClientAuthUnsupported, detail))?;
        let fresh = Arc::new(self.discovered(metadata, auth, Instant::now()));
        *discovered = Some(fresh.clone());
        Ok(fresh)
    }

    fn discovered(
        &self,
        metadata: CoreProviderMetadata,
        auth: ClientAuth,
        at: Instant,
    ) -> Discovered {
        let client = CoreClient::from_provider_metadata(
            metadata.clone(),
            ClientId::new(self.config.client_id.clone()),
            Some(self.secret.clone()),
        )
        .set_auth_type(match auth {
            ClientAuth::ClientSecretBasic => AuthType::BasicAuth,
            ClientAuth::ClientSecretPost => AuthType::RequestBody,
        });
        Discovered {
            client,
            metadata,
            auth,
            at,
        }
    }

    /// Fetches the provider's key set again, unless that was done less than
    /// [`MIN_KEY_REFETCH_GAP`] ago: `None` then.
    async fn refetch_keys(&self) -> Result<Option<Arc<Discovered>>, IdentityError> {
        {
            let mut last = self.last_key_refetch.lock().await;
            if !may_refetch(*last, Instant::now()) {
                return Ok(None);
            }
            *last = Some(Instant::now());
        }
        let current = self.client().await?;
        let jwks = JsonWebKeySet::fetch_async(current.metadata.jwks_uri(), &self.http)
            .await
            .map_err(|e| self.discovery_failed(e))?;
        tracing::info!(provider = %self.config.id, "fetched the provider's key set again for an unknown key");
        let metadata = current.metadata.clone().set_jwks(jwks);
        let fresh = Arc::new(self.discovered(metadata, current.auth, current.at));
        *self.discovered.lock().await = Some(fresh.clone());
        Ok(Some(fresh))
    }

    /// Why discovery or a key set fetch failed, as the operator must hear it.
    fn discovery_failed(&self, error: DiscoveryError<HttpError>) -> IdentityError {
        match error {
            // openidconnect validates one thing of the document: that it names our issuer.
            DiscoveryError::Validation(why) => self.misconfigured(
                Misconfiguration::IssuerMismatch,
                format!(
                    "its discovery document does not name the configured issuer ({why}); \
                     `issuer` must be exactly the provider's, trailing slash and all"
                ),
            ),
            DiscoveryError::Request(HttpError::ForeignOrigin(url)) => self.foreign(&url),
            other => self.unavailable(format!("discovery: {}", chain(&other))),
        }
    }

    fn on_own_origin(&self, endpoint: &str, url: &url::Url) -> Result<(), IdentityError> {
        if url.origin() == self.http.origin {
            Ok(())
        } else {
            tracing::debug!(endpoint, %url, "an endpoint on another origin");
            Err(self.foreign(url.as_str()))
        }
    }

    fn foreign(&self, url: &str) -> IdentityError {
        self.misconfigured(
            Misconfiguration::EndpointOnAnotherOrigin,
            format!(
                "its metadata points to {url}, not on the issuer's origin {}: the service calls \
                 a provider only on its issuer's origin",
                self.http.origin.ascii_serialization()
            ),
        )
    }

    fn misconfigured(&self, reason: Misconfiguration, detail: String) -> IdentityError {
        IdentityError::ProviderMisconfigured {
            provider: self.config.id.clone(),
            reason,
            detail,
        }
    }

    fn unavailable(&self, why: String) -> IdentityError {
        tracing::warn!(provider = %self.config.id, %why, "login provider failed");
        IdentityError::ProviderUnavailable(self.config.id.clone())
    }

    /// Starts a login: the authorization URL (code flow, PKCE S256, state, nonce, the `acr`
    /// values reaching `minimum`) and what must be kept to complete it.
    pub async fn start(
        &self,
        redirect_uri: &str,
        minimum: Level,
    ) -> Result<Pending, IdentityError> {
        let discovered = self.client().await?;
        let redirect = RedirectUrl::new(redirect_uri.to_owned())
            .map_err(|e| IdentityError::invalid("redirect_uri", e.to_string()))?;
        let (challenge, verifier) = PkceCodeChallenge::new_random_sha256();
        let mut request = discovered
            .client
            .authorize_url(
                CoreAuthenticationFlow::AuthorizationCode,
                CsrfToken::new_random,
                Nonce::new_random,
            )
            .set_redirect_uri(std::borrow::Cow::Owned(redirect))
            .set_pkce_challenge(challenge);
        for scope in &self.config.scopes {
            request = request.add_scope(Scope::new(scope.clone()));
        }
        for acr in self.acr_values(minimum) {
            request = request.add_auth_context_value(AuthenticationContextClass::new(acr.into()));
        }
        let (url, state, nonce) = request.url();
        Ok(Pending {
            url: url.to_string(),
            state: state.secret().clone(),
            nonce: nonce.secret().clone(),
            verifier: verifier.secret().clone(),
        })
    }

    /// Completes a login: exchanges the code, checks the ID token (signature from the
    /// provider's key set, issuer, audience, expiry and issue time with the configured leeway,
    /// `nbf`, nonce) and its `acr` against `minimum`, and reads who it names.
    pub async fn complete(
        &self,
        code: &str,
        redirect_uri: &str,
        pending_nonce: &str,
        verifier: &str,
        minimum: Level,
    ) -> Result<Login, IdentityError> {
        let discovered = self.client().await?;
        let redirect = RedirectUrl::new(redirect_uri.to_owned())
            .map_err(|e| IdentityError::invalid("redirect_uri", e.to_string()))?;
        let response = discovered
            .client
            .exchange_code(AuthorizationCode::new(code.to_owned()))
            .map_err(|e| self.unavailable(format!("no token endpoint: {e}")))?
            .set_redirect_uri(std::borrow::Cow::Owned(redirect))
            .set_pkce_verifier(PkceCodeVerifier::new(verifier.to_owned()))
            .request_async(&self.http)
            .await
            .map_err(|e| match e {
                // The provider refused the code (used, expired, not ours): the login fails.
                openidconnect::RequestTokenError::ServerResponse(refusal) => {
                    IdentityError::LoginRefused(format!(
                        "the provider refused the code: {}{}",
                        refusal.error(),
                        refusal
                            .error_description()
                            .map(|d| format!(" ({})", onestop_platform::status::echo(d)))
                            .unwrap_or_default()
                    ))
                }
                // The answer came, but its ID token (or the rest) does not read: a claim of the
                // wrong type, a required one missing. Asking again gives the same.
                openidconnect::RequestTokenError::Parse(error, _) => {
                    IdentityError::IdTokenMalformed(format!(
                        "the token response does not read at `{}`: {}",
                        error.path(),
                        error.inner()
                    ))
                }
                openidconnect::RequestTokenError::Request(HttpError::ForeignOrigin(url)) => {
                    self.foreign(&url)
                }
                other => self.unavailable(format!("token endpoint: {}", chain(&other))),
            })?;
        let id_token = response.id_token().ok_or_else(|| {
            IdentityError::LoginRefused("the provider returned no ID token".into())
        })?;
        let nonce = Nonce::new(pending_nonce.to_owned());
        let leeway = chrono::Duration::seconds(
            i64::try_from(self.config.leeway_s.min(MAX_LEEWAY.as_secs())).unwrap_or(0),
        );
        let verify = |client: &Client| {
            let verifier = client
                .id_token_verifier()
                .set_allowed_algs(ID_TOKEN_ALGORITHMS)
                // Expiry is checked against a clock set back by the leeway.
                .set_time_fn(move || chrono::Utc::now() - leeway)
                // A token issued in the future was not issued by a provider with a true clock.
                .set_issue_time_verifier_fn(move |iat| {
                    if iat > chrono::Utc::now() + leeway {
                        Err(format!("issued in the future ({iat})"))
                    } else {
                        Ok(())
                    }
                });
            id_token.claims(&verifier, &nonce).map(|claims| {
                (
                    claims.auth_context_ref().map(|acr| acr.as_str().to_owned()),
                    claims.auth_time().map(|t| t.timestamp()),
                    claims.issue_time().timestamp(),
                )
            })
        };
        let checked = match verify(&discovered.client) {
            // Signed with a key not in the set kept: the provider may have rotated its keys.
            // Fetch them again at once (rate-limited) and check again.
            Err(ClaimsVerificationError::SignatureVerification(_)) => {
                match self.refetch_keys().await? {
                    Some(renewed) => verify(&renewed.client),
                    None => verify(&discovered.client),
                }
            }
            checked => checked,
        };
        let (acr, auth_time, issued) = checked.map_err(|e| {
            IdentityError::LoginRefused(format!("the ID token fails a check: {}", chain(&e)))
        })?;
        let level = match acr.as_deref() {
            None => {
                return Err(IdentityError::LoginRefused(
                    "the ID token carries no `acr`: the provider must name the level it reached \
                     with one of the configured values"
                        .into(),
                ));
            }
            Some(acr) => self.config.acr.get(acr).copied().ok_or_else(|| {
                IdentityError::LoginRefused(format!(
                    "the ID token's acr `{}` is not one provider {} is configured with \
                     ([identity.providers.acr])",
                    onestop_platform::status::echo(acr),
                    self.config.id
                ))
            })?,
        };
        if level < minimum {
            return Err(IdentityError::LevelTooLow {
                got: level,
                required: minimum,
            });
        }
        // The signature, issuer, audience, expiry and nonce are checked: the payload is the
        // provider's. Its own claims are read from it.
        let payload = payload_of(&id_token.to_string())
            .map_err(|e| IdentityError::IdTokenMalformed(format!("its payload: {e}")))?;
        // `nbf` is JWT's, not OpenID's: openidconnect leaves it to us.
        if let Some(nbf) = payload.get("nbf") {
            let nbf = nbf.as_i64().ok_or_else(|| {
                IdentityError::IdTokenMalformed("`nbf` is not a number of seconds".into())
            })?;
            if nbf > (chrono::Utc::now() + leeway).timestamp() {
                return Err(IdentityError::LoginRefused(format!(
                    "the ID token is not valid before {nbf} (seconds since the epoch)"
                )));
            }
        }
        let who = self.identified(&payload)?;
        // Names are cut to a bounded length; a country is two capital letters or nothing.
        let text = |name: &str| {
            payload
                .get(name)
                .and_then(|v| v.as_str())
                .filter(|s| !s.is_empty())
                .map(|s| s.chars().take(MAX_NAME_CHARS).collect::<String>())
        };
        let country = text(&self.config.claims.country)
            .filter(|c| c.len() == 2 && c.bytes().all(|b| b.is_ascii_uppercase()));
        Ok(Login {
            who,
            level,
            country,
            given_name: text(&self.config.claims.given_name),
            family_name: text(&self.config.claims.family_name),
            auth_time: auth_time.unwrap_or(issued),
        })
    }

    /// Who the claims name, by the provider's claim mapping.
    fn identified(
        &self,
        payload: &serde_json::Map<String, serde_json::Value>,
    ) -> Result<Identified, IdentityError> {
        let names = &self.config.claims;
        let text = |name: &str| payload.get(name).and_then(|v| v.as_str()).unwrap_or("");
        let refused = |why: String| IdentityError::LoginRefused(why);
        match self.config.audience {
            Audience::Residents => {
                let code = text(&names.personal_code);
                if !code.is_empty() {
                    let personal_code = person::normalize_personal_code(code).map_err(refused)?;
                    return Ok(Identified::Resident { personal_code });
                }
                let eidas = text(&names.eidas_id);
                if !eidas.is_empty() {
                    // The platform's one parser accepts only another country's identification
                    // for Latvia: a Latvian identity comes as a personal code, so that one
                    // person has one subject.
                    let id = EidasId::parse(eidas).map_err(refused)?;
                    return Ok(Identified::Foreign(id));
                }
                Err(refused(format!(
                    "the ID token names no person: neither `{}` nor `{}`",
                    names.personal_code, names.eidas_id
                )))
            }
            Audience::Staff => {
                let staff_id = text(&names.staff_id);
                if staff_id.is_empty() || staff_id.len() > 128 || staff_id.contains('/') {
                    return Err(refused(format!(
                        "the ID token's `{}` is missing or malformed",
                        names.staff_id
                    )));
                }
                let institution = Member::parse(text(&names.institution))
                    .map(|m| m.institution())
                    .map_err(|e| refused(format!("`{}`: {e}", names.institution)))?;
                if !self
                    .config
                    .institutions
                    .iter()
                    .any(|i| *i == institution.to_string())
                {
                    return Err(refused(format!(
                        "provider {} may not vouch for staff of {institution}",
                        self.config.id
                    )));
                }
                let centre = Some(text(&names.centre).to_owned()).filter(|c| !c.is_empty());
                if let Some(centre) = &centre
                    && !is_code(centre)
                {
                    return Err(refused(format!(
                        "`{}` is not a centre code (1-63 lower-case letters, digits, `-`)",
                        names.centre
                    )));
                }
                let roles = roles_of(payload.get(&names.roles)).ok_or_else(|| {
                    IdentityError::IdTokenMalformed(format!(
                        "`{}` must be an array of strings or one string of roles separated by spaces",
                        names.roles
                    ))
                })?;
                Ok(Identified::Staff {
                    staff_id: staff_id.to_owned(),
                    institution,
                    centre,
                    roles,
                })
            }
        }
    }
}

/// A staff member's roles from the claim: an array of strings, or one string of roles
/// separated by spaces (as some directories send them); absent is none. `None` for anything
/// else. Roles the platform acts on are short codes; others are left out.
fn roles_of(claim: Option<&serde_json::Value>) -> Option<Vec<String>> {
    let named: Vec<&str> = match claim {
        None | Some(serde_json::Value::Null) => Vec::new(),
        Some(serde_json::Value::String(roles)) => roles.split_whitespace().collect(),
        Some(serde_json::Value::Array(roles)) => roles
            .iter()
            .map(|r| r.as_str())
            .collect::<Option<Vec<&str>>>()?,
        Some(_) => return None,
    };
    Some(
        named
            .into_iter()
            .filter(|r| is_code(r))
            .map(str::to_owned)
            .take(MAX_ROLES)
            .collect(),
    )
}

/// Whether an unknown key may make the key set be fetched again now, the last such fetch
/// having been at `last`.
fn may_refetch(last: Option<Instant>, now: Instant) -> bool {
    last.is_none_or(|last| now.saturating_duration_since(last) >= MIN_KEY_REFETCH_GAP)
}

/// An error with its causes, `: `-separated (openidconnect's messages name only the outermost).
fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut cause = error.source();
    while let Some(inner) = cause {
        text.push_str(": ");
        text.push_str(&inner.to_string());
        cause = inner.source();
    }
    text
}

/// The HTTP client of one provider: only its own origin, answers of bounded size, no redirects.
struct Fetcher {
    client: reqwest::Client,
    origin: url::Origin,
}

impl Fetcher {
    /// One HTTP exchange with the provider.
    async fn fetch(
        &self,
        request: openidconnect::HttpRequest,
    ) -> Result<openidconnect::HttpResponse, HttpError> {
        let url = url::Url::parse(&request.uri().to_string())
            .map_err(|e| HttpError::Other(e.to_string()))?;
        if url.origin() != self.origin {
            return Err(HttpError::ForeignOrigin(url.to_string()));
        }
        let (parts, body) = request.into_parts();
        let mut response = self
            .client
            .request(parts.method, url)
            .headers(parts.headers)
            .body(body)
            .send()
            .await
            .map_err(|e| {
                if e.is_timeout() {
                    HttpError::Other(format!("no answer within {} s", REQUEST_TIMEOUT.as_secs()))
                } else {
                    HttpError::Transport(e)
                }
            })?;
        let mut answer = http::Response::builder().status(response.status());
        for (name, value) in response.headers() {
            answer = answer.header(name, value);
        }
        let mut body = Vec::new();
        while let Some(chunk) = response.chunk().await? {
            if body.len() + chunk.len() > MAX_RESPONSE_BYTES {
                return Err(HttpError::TooLarge);
            }
            body.extend_from_slice(&chunk);
        }
        answer
            .body(body)
            .map_err(|e| HttpError::Other(e.to_string()))
    }
}

// A named client whose futures are boxed and `Send`: a closure's future would carry a
// higher-ranked lifetime that the compiler cannot prove `Send` across the service's calls.
impl<'c> openidconnect::AsyncHttpClient<'c> for Fetcher {
    type Error = HttpError;
    type Future = std::pin::Pin<
        Box<dyn Future<Output = Result<openidconnect::HttpResponse, HttpError>> + Send + 'c>,
    >;

    fn call(&'c self, request: openidconnect::HttpRequest) -> Self::Future {
        Box::pin(self.fetch(request))
    }
}

/// The payload of a JWT, decoded (not verified: call only after verification).
fn payload_of(jwt: &str) -> Result<serde_json::Map<String, serde_json::Value>, String> {
    use base64::Engine;
    let part = jwt.split('.').nth(1).ok_or("not a JWT")?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(part.trim_end_matches('='))
        .map_err(|e| e.to_string())?;
    serde_json::from_slice(&bytes).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unknown_key_refetches_the_key_set_at_most_every_gap() {
        let start = Instant::now();
        assert!(
            may_refetch(None, start),
            "the first unknown key fetches at once"
        );
        assert!(!may_refetch(Some(start), start + Duration::from_secs(1)));
        assert!(may_refetch(Some(start), start + MIN_KEY_REFETCH_GAP));
    }

    #[test]
    fn roles_come_as_an_array_or_one_string() {
        let roles = |json: serde_json::Value| roles_of(Some(&json));
        assert_eq!(
            roles(serde_json::json!(["clerk", "specialist"])),
            Some(vec!["clerk".into(), "specialist".into()])
        );
        assert_eq!(
            roles(serde_json::json!("clerk  specialist")),
            Some(vec!["clerk".into(), "specialist".into()])
        );
        assert_eq!(
            roles(serde_json::json!("clerk")),
            Some(vec!["clerk".into()])
        );
        assert_eq!(roles_of(None), Some(Vec::new()));
        // Not codes: left out, as before.
        assert_eq!(
            roles(serde_json::json!(["Clerk!", "clerk"])),
            Some(vec!["clerk".into()])
        );
        assert_eq!(roles(serde_json::json!({"clerk": true})), None);
        assert_eq!(roles(serde_json::json!(["clerk", 7])), None);
    }

    #[test]
    fn client_authentication_follows_discovery() {
        use CoreClientAuthMethod as M;
        let basic = ClientAuth::ClientSecretBasic;
        let post = ClientAuth::ClientSecretPost;
        assert_eq!(ClientAuth::choose(None, None), Ok(basic));
        assert_eq!(
            ClientAuth::choose(None, Some(&vec![M::ClientSecretPost, M::PrivateKeyJwt])),
            Ok(post)
        );
        assert_eq!(
            ClientAuth::choose(None, Some(&vec![M::ClientSecretPost, M::ClientSecretBasic])),
            Ok(basic)
        );
        assert_eq!(
            ClientAuth::choose(
                Some(post),
                Some(&vec![M::ClientSecretPost, M::ClientSecretBasic])
            ),
            Ok(post)
        );
        let refused = ClientAuth::choose(Some(post), None).unwrap_err();
        assert!(refused.contains("client_secret_post"), "{refused}");
        let refused = ClientAuth::choose(None, Some(&vec![M::PrivateKeyJwt])).unwrap_err();
        assert!(refused.contains("private_key_jwt"), "{refused}");
    }
}
