//! The identity service: people log in through upstream OpenID providers (residents with
//! national eID or a foreign eIDAS identity, staff through their institution's provider) and
//! get short-lived platform tokens, bound to the front end (member system) that logged them
//! in; clerks register residents' mandates and exchange them for tokens that act on the
//! resident's behalf.
//!
//! Layout, each layer calling only downward: [`api`] (tonic handlers) → [`service`] (use cases
//! and who may do what) → [`providers`] (upstream OpenID providers), [`keys`] (signing keys),
//! [`catalogue`] (the routing service's catalogue, which mandates' services must be in) and
//! [`store`] (sqlx). [`error`] is where errors become gRPC statuses.

pub mod api;
pub mod catalogue;
pub mod error;
pub mod keys;
pub mod providers;
pub mod service;
pub mod store;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use onestop_platform::config::{AdminConfig, DatabaseConfig, ServerConfig, TelemetryConfig};
use onestop_platform::identity::Member;
use onestop_platform::paging::PageTokens;
use onestop_platform::requests::Requests;
use onestop_platform::server::Services;
use onestop_proto::identity::v1::identity_service_server::IdentityServiceServer;
use serde::Deserialize;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::catalogue::Catalogue;
use crate::keys::Keys;
use crate::providers::{Provider, ProviderConfig};
use crate::service::{Identity, Lifetimes};

/// The configuration of one identity process.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdentityConfig {
    /// Listener, TLS and limits.
    pub server: ServerConfig,
    /// The identity database.
    pub database: DatabaseConfig,
    /// Logs and traces.
    #[serde(default)]
    pub telemetry: TelemetryConfig,
    /// Metrics, liveness and readiness.
    #[serde(default)]
    pub admin: AdminConfig,
    /// Service settings.
    pub identity: IdentitySettings,
}

/// A front end (member system) that logs people in, and where providers may send its users
/// back.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FrontEnd {
    /// The member system, `CLASS/CODE/subsystem`.
    pub member: String,
    /// Its redirect URIs, exactly as it will send them.
    pub redirect_uris: Vec<String>,
}

/// The `[identity]` section.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdentitySettings {
    /// The directory of the token signing keys (private; shared by replicas).
    pub key_dir: PathBuf,
    /// The upstream providers.
    #[serde(default)]
    pub providers: Vec<ProviderConfig>,
    /// The front ends and their redirect URIs.
    #[serde(default)]
    pub front_ends: Vec<FrontEnd>,
    /// Lifetime of access tokens, seconds (at most [`MAX_ACCESS_TOKEN_TTL_S`]).
    #[serde(default = "default_access_token_ttl")]
    pub access_token_ttl_s: u64,
    /// Lifetime of sessions and so of their refresh tokens, seconds (at most
    /// [`MAX_SESSION_TTL_S`]).
    #[serde(default = "default_session_ttl")]
    pub session_ttl_s: u64,
    /// Lifetime of tokens acting under a mandate, seconds.
    #[serde(default = "default_access_token_ttl")]
    pub acting_token_ttl_s: u64,
    /// How long a started login may take, seconds.
    #[serde(default = "default_login_ttl")]
    pub login_ttl_s: u64,
    /// How often the signing key is replaced, hours.
    #[serde(default = "default_key_rotation")]
    pub key_rotation_hours: u64,
    /// How often the key directory is read again (for keys other replicas made), seconds.
    #[serde(default = "default_key_rescan")]
    pub key_rescan_s: u64,
    /// How long a new key is published before it signs, seconds: longer than `key_rescan_s`
    /// plus the gateway's key set refresh (60 s), so that every replica publishes it and every
    /// gateway knows it first.
    #[serde(default = "default_key_publish_lead")]
    pub key_publish_lead_s: u64,
    /// `host:port` of the routing service, whose catalogue a mandate's services must be in
    /// (required; `onestop up` fills it in).
    #[serde(default)]
    pub catalogue_address: String,
    /// The name the routing service's certificate is checked against.
    #[serde(default = "default_catalogue_server_name")]
    pub catalogue_server_name: String,
}

fn default_catalogue_server_name() -> String {
    "localhost".to_owned()
}

fn default_access_token_ttl() -> u64 {
    300
}
fn default_session_ttl() -> u64 {
    8 * 3600
}
fn default_login_ttl() -> u64 {
    600
}
fn default_key_rotation() -> u64 {
    24
}
fn default_key_rescan() -> u64 {
    60
}
fn default_key_publish_lead() -> u64 {
    180
}

/// The longest an access token may live: fifteen minutes. A stolen token works until it
/// expires (a logout reaches the gateway within seconds, a theft noticed by no one does not).
pub const MAX_ACCESS_TOKEN_TTL_S: u64 = 15 * 60;
/// The longest a token acting under a mandate may live: five minutes.
pub const MAX_ACTING_TTL_S: u64 = 300;
/// The longest a session, and so its refresh tokens, may last: twelve hours, a working day
/// with room to spare.
pub const MAX_SESSION_TTL_S: u64 = 12 * 3600;
/// The most seconds of the other periods (a started login, key rescans, publication lead).
pub const MAX_PERIOD_S: u64 = 3600;

/// Why the service could not run.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The configuration is unusable.
    #[error("configuration: {0}")]
    Config(String),
    /// The database could not be opened.
    #[error(transparent)]
    Database(#[from] onestop_platform::db::DbError),
    /// The store failed at start.
    #[error(transparent)]
    Store(#[from] onestop_platform::db::StoreError),
    /// The keys could not be used.
    #[error(transparent)]
    Keys(#[from] keys::KeyError),
    /// Serving failed.
    #[error(transparent)]
    Serve(#[from] onestop_platform::server::ServeError),
}

/// `n` random bytes, base64url.
fn random(n: usize) -> Result<String, String> {
    let mut bytes = vec![0u8; n];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes)
        .map_err(|_| "the system's random generator failed".to_owned())?;
    Ok(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes))
}

/// A random id (128 bits).
fn random_id() -> Result<String, error::IdentityError> {
    random(16).map_err(error::IdentityError::Internal)
}

/// A random secret (256 bits): refresh tokens.
fn random_secret() -> Result<String, error::IdentityError> {
    random(32).map_err(error::IdentityError::Internal)
}

impl IdentitySettings {
    fn lifetimes(&self) -> Result<Lifetimes, ServeError> {
        for (name, value, most) in [
            (
                "access_token_ttl_s",
                self.access_token_ttl_s,
                MAX_ACCESS_TOKEN_TTL_S,
            ),
            // A revoked mandate's token lives on until it expires: keep that short.
            (
                "acting_token_ttl_s",
                self.acting_token_ttl_s,
                MAX_ACTING_TTL_S,
            ),
            ("session_ttl_s", self.session_ttl_s, MAX_SESSION_TTL_S),
            ("login_ttl_s", self.login_ttl_s, MAX_PERIOD_S),
            ("key_rotation_hours", self.key_rotation_hours, 24 * 366),
            ("key_rescan_s", self.key_rescan_s, MAX_PERIOD_S),
            ("key_publish_lead_s", self.key_publish_lead_s, MAX_PERIOD_S),
        ] {
            if value == 0 || value > most {
                return Err(ServeError::Config(format!(
                    "identity.{name} must be 1-{most}"
                )));
            }
        }
        if self.session_ttl_s < self.access_token_ttl_s || self.login_ttl_s == 0 {
            return Err(ServeError::Config(
                "identity.session_ttl_s must be at least the access token's, and login_ttl_s above 0"
                    .into(),
            ));
        }
        if self.key_rotation_hours == 0 {
            return Err(ServeError::Config(
                "identity.key_rotation_hours must be above 0".into(),
            ));
        }
        Ok(Lifetimes {
            access_token: Duration::from_secs(self.access_token_ttl_s),
            session: Duration::from_secs(self.session_ttl_s),
            acting_token: Duration::from_secs(self.acting_token_ttl_s),
            login: Duration::from_secs(self.login_ttl_s),
        })
    }

    fn front_ends(&self) -> Result<HashMap<String, Vec<String>>, ServeError> {
        let mut front_ends = HashMap::new();
        for front_end in &self.front_ends {
            let member = Member::parse(&front_end.member)
                .map_err(|e| ServeError::Config(format!("identity.front_ends: {e}")))?;
            if member.subsystem.is_empty() {
                return Err(ServeError::Config(format!(
                    "identity.front_ends: `{}` must name the subsystem (CLASS/CODE/subsystem)",
                    front_end.member
                )));
            }
            for uri in &front_end.redirect_uris {
                let url = url::Url::parse(uri).map_err(|e| {
                    ServeError::Config(format!("identity.front_ends {member}: `{uri}`: {e}"))
                })?;
                if url.scheme() != "https" || url.fragment().is_some() {
                    return Err(ServeError::Config(format!(
                        "identity.front_ends {member}: `{uri}` must be https:// without a fragment"
                    )));
                }
            }
            if front_ends
                .insert(member.to_string(), front_end.redirect_uris.clone())
                .is_some()
            {
                return Err(ServeError::Config(format!(
                    "identity.front_ends: {member} is listed twice"
                )));
            }
        }
        Ok(front_ends)
    }
}

/// Opens the store, the keys and the providers.
pub async fn open(config: &IdentityConfig) -> Result<(Arc<Identity>, Arc<Keys>), ServeError> {
    let settings = &config.identity;
    let lifetimes = settings.lifetimes()?;
    let front_ends = settings.front_ends()?;
    let mut providers = Vec::new();
    let mut ids = std::collections::HashSet::new();
    for provider in &settings.providers {
        if !ids.insert(provider.id.as_str()) {
            return Err(ServeError::Config(format!(
                "identity.providers: `{}` is configured twice",
                provider.id
            )));
        }
        providers.push(Provider::new(provider.clone()).map_err(ServeError::Config)?);
    }
    if settings.catalogue_address.is_empty() {
        return Err(ServeError::Config(
            "identity.catalogue_address: the routing service's address (host:port), whose \
             catalogue a mandate's services are checked against"
                .into(),
        ));
    }
    let catalogue = Catalogue::connect(
        &config.server,
        &settings.catalogue_address,
        &settings.catalogue_server_name,
    )
    .map_err(|e| ServeError::Config(format!("identity.catalogue_address: {e}")))?;
    let db = onestop_platform::db::open(&config.database, &store::MIGRATIONS).await?;
    let keys = Arc::new(Keys::open(
        &settings.key_dir,
        Duration::from_secs(settings.key_rotation_hours * 3600),
        lifetimes.access_token.max(lifetimes.acting_token),
        Duration::from_secs(settings.key_publish_lead_s),
    )?);
    let requests = Requests::new(&db, config.database.request_retention());
    let pages = PageTokens::open(&db).await?;
    let identity = Identity::new(
        store::Store::new(db),
        requests,
        keys.clone(),
        providers,
        front_ends,
        &config.server.trust_domain,
        lifetimes,
        pages,
        catalogue,
    );
    Ok((Arc::new(identity), keys))
}

/// Serves an opened identity service on a bound listener until `shutdown` is cancelled.
pub async fn serve(
    config: &IdentityConfig,
    identity: Arc<Identity>,
    keys: Arc<Keys>,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<(), ServeError> {
    tokio::spawn(identity.requests().clone().keep_pruned(shutdown.clone()));
    let rescan = Duration::from_secs(config.identity.key_rescan_s.max(1));
    tokio::spawn(keys.keep_fresh(rescan, shutdown.clone()));
    tokio::spawn(prune_periodically(identity.clone(), shutdown.clone()));
    let mut services = Services::new(&config.server);
    services
        .health()
        .follow_database(identity.store().database().clone(), shutdown.clone());
    services.add(IdentityServiceServer::new(api::IdentityApi::new(identity)));
    onestop_platform::server::serve(&config.server, services, listener, shutdown).await?;
    Ok(())
}

/// Removes expired logins and old sessions every ten minutes.
async fn prune_periodically(identity: Arc<Identity>, shutdown: CancellationToken) {
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(Duration::from_secs(600)) => {}
        }
        if let Err(error) = identity
            .store()
            .prune(time::OffsetDateTime::now_utc())
            .await
        {
            tracing::warn!(%error, "pruning logins and sessions failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(toml: &str) -> IdentitySettings {
        toml::from_str(&format!("key_dir = \"keys\"\n{toml}")).unwrap()
    }

    #[test]
    fn token_lifetimes_are_capped() {
        assert!(settings("").lifetimes().is_ok(), "the defaults");
        let at_caps = settings("access_token_ttl_s = 900\nsession_ttl_s = 43200\n");
        assert!(at_caps.lifetimes().is_ok());
        for (toml, named) in [
            ("access_token_ttl_s = 901", "access_token_ttl_s"),
            ("access_token_ttl_s = 86400", "access_token_ttl_s"),
            ("session_ttl_s = 43201", "session_ttl_s"),
            ("session_ttl_s = 86400", "session_ttl_s"),
            ("acting_token_ttl_s = 301", "acting_token_ttl_s"),
        ] {
            let Err(ServeError::Config(refused)) = settings(toml).lifetimes() else {
                panic!("{toml} is accepted");
            };
            assert!(refused.contains(named), "{toml}: {refused}");
        }
    }
}
