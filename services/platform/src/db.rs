//! Databases: one sqlx pool per service, SQLite or PostgreSQL chosen by the URL, with the
//! service's embedded migrations applied at start.
//!
//! SQLite runs in WAL mode with `synchronous = FULL`, so that a committed transaction survives
//! a power cut, not only a killed process; PostgreSQL commits durably by default. Services write
//! portable SQL through the `Any` driver and keep one migration directory per backend.

use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use sqlx::any::{AnyConnectOptions, AnyPoolOptions};
use sqlx::migrate::Migrator;
use sqlx::{AnyPool, Executor};
use time::OffsetDateTime;

use crate::config::DatabaseConfig;

/// Which database a pool talks to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// An embedded SQLite file.
    Sqlite,
    /// A PostgreSQL server.
    Postgres,
}

/// Why a database could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    /// The URL names no supported database.
    #[error("database URL must start with sqlite:// or postgres://, not `{0}`")]
    UnsupportedUrl(String),
    /// Connecting failed.
    #[error("cannot connect to the database: {0}")]
    Connect(#[source] sqlx::Error),
    /// A service migration uses a version kept for the platform's own.
    #[error(
        "service migration {0} uses a version kept for the platform's own tables (from {PLATFORM_MIGRATIONS_FROM})"
    )]
    ReservedVersion(i64),
    /// A migration failed.
    #[error("database migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
}

/// What a store can fail with, the same for every service.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A row with the same key exists, or another writer changed the row first.
    #[error("conflicting write")]
    Conflict,
    /// A stored row does not decode (a bug or a hand-edited database).
    #[error("corrupt row: {0}")]
    Corrupt(String),
    /// The database cannot be reached or is overloaded for now; retrying may succeed.
    #[error("database unavailable: {0}")]
    Unavailable(#[source] sqlx::Error),
    /// The database failed.
    #[error(transparent)]
    Database(sqlx::Error),
}

impl From<sqlx::Error> for StoreError {
    fn from(error: sqlx::Error) -> Self {
        match error {
            sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed | sqlx::Error::Io(_) => {
                StoreError::Unavailable(error)
            }
            // SQLite still busy after its busy timeout.
            sqlx::Error::Database(ref e) if e.code().as_deref() == Some("5") => {
                StoreError::Unavailable(error)
            }
            other => StoreError::Database(other),
        }
    }
}

/// The result of an insert, with a unique-key violation as [`StoreError::Conflict`].
pub fn conflict_on_duplicate<T>(result: Result<T, sqlx::Error>) -> Result<(), StoreError> {
    match result {
        Ok(_) => Ok(()),
        Err(sqlx::Error::Database(e)) if e.is_unique_violation() => Err(StoreError::Conflict),
        Err(e) => Err(e.into()),
    }
}

/// A time as stored: milliseconds since the Unix epoch.
pub fn millis(time: OffsetDateTime) -> i64 {
    i64::try_from(time.unix_timestamp_nanos() / 1_000_000).unwrap_or(i64::MAX)
}

/// A stored time.
pub fn from_millis(ms: i64) -> Result<OffsetDateTime, StoreError> {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .map_err(|e| StoreError::Corrupt(format!("time {ms}: {e}")))
}

/// The platform's own tables, kept in every service's database (the record of requests made,
/// see [`crate::requests`], and shared secrets). Their versions start at [`PLATFORM_MIGRATIONS_FROM`]; a service
/// numbers its own migrations below that, and both are applied as one history.
static PLATFORM: Migrator = sqlx::migrate!("./migrations");

/// The first version of the platform's own migrations.
pub const PLATFORM_MIGRATIONS_FROM: i64 = 900_000;

/// A service's embedded migrations, one set per backend.
#[derive(Debug)]
pub struct Migrations {
    /// For SQLite.
    pub sqlite: &'static Migrator,
    /// For PostgreSQL.
    pub postgres: &'static Migrator,
}

/// A connection pool and the backend it talks to.
#[derive(Clone, Debug)]
pub struct Database {
    /// The pool.
    pub pool: AnyPool,
    /// The backend.
    pub backend: Backend,
    /// The database's name in metrics: the SQLite file's stem or the PostgreSQL database.
    name: Arc<str>,
}

/// The labels of a pool's figures.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PoolLabels {
    database: String,
}

/// The labels of a pool's connections.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ConnectionLabels {
    database: String,
    /// `in_use` or `idle`.
    state: &'static str,
}

/// What the pools of the process tell, sampled at every health probe (every 5 s): how long the
/// probe waited for a connection (what a call would have waited then) and how many
/// connections are open, busy or idle, next to the most allowed. Sampling costs nothing on the
/// calls' path, and a pool that is exhausted shows in both.
struct PoolFigures {
    acquire_seconds: Family<PoolLabels, Histogram, fn() -> Histogram>,
    connections: Family<ConnectionLabels, Gauge>,
    max_connections: Family<PoolLabels, Gauge>,
}

fn acquire_buckets() -> Histogram {
    // 100 µs to about 13 s: the acquire timeout is 10 s.
    Histogram::new(exponential_buckets(0.0001, 2.0, 18))
}

fn pool_figures() -> &'static PoolFigures {
    static FIGURES: OnceLock<PoolFigures> = OnceLock::new();
    FIGURES.get_or_init(|| {
        let figures = PoolFigures {
            acquire_seconds: Family::new_with_constructor(acquire_buckets as fn() -> Histogram),
            connections: Family::default(),
            max_connections: Family::default(),
        };
        crate::metrics::register(
            "db_pool_acquire_duration_seconds",
            "How long the health probe waited for a database connection from the pool",
            figures.acquire_seconds.clone(),
        );
        crate::metrics::register(
            "db_pool_connections",
            "Connections open in the pool, in use or idle, at the last health probe",
            figures.connections.clone(),
        );
        crate::metrics::register(
            "db_pool_max_connections",
            "The most connections the pool opens",
            figures.max_connections.clone(),
        );
        figures
    })
}

/// The name of the database a URL names, for metrics: the file's stem for SQLite, the
/// database for PostgreSQL; never the user, password or host.
fn database_name(url: &str) -> String {
    let (scheme, rest) = url.split_once("://").unwrap_or(("", url));
    let rest = rest.split('?').next().unwrap_or_default();
    let last = if scheme == "sqlite" {
        rest.rsplit('/').next().unwrap_or_default()
    } else {
        // After the user, password, host and port: `user:password@host:port/database`.
        rest.split_once('/').map_or("", |(_, database)| database)
    };
    let stem = last.strip_suffix(".db").unwrap_or(last);
    if stem.is_empty() {
        "default".to_owned()
    } else {
        stem.to_owned()
    }
}

/// Opens the database named by the configuration and brings its schema up to date.
pub async fn open(config: &DatabaseConfig, migrations: &Migrations) -> Result<Database, DbError> {
    sqlx::any::install_default_drivers();
    let (backend, url) = if let Some(rest) = config.url.strip_prefix("sqlite://") {
        // Create the file on first start.
        let url = if rest.contains('?') {
            config.url.clone()
        } else {
            format!("sqlite://{rest}?mode=rwc")
        };
        (Backend::Sqlite, url)
    } else if config.url.starts_with("postgres://") || config.url.starts_with("postgresql://") {
        (Backend::Postgres, config.url.clone())
    } else {
        return Err(DbError::UnsupportedUrl(redact(&config.url)));
    };
    let options: AnyConnectOptions = url.parse().map_err(DbError::Connect)?;
    let pool = AnyPoolOptions::new()
        .max_connections(config.max_connections.max(1))
        .acquire_timeout(Duration::from_secs(10))
        .after_connect(move |connection, _| {
            Box::pin(async move {
                if backend == Backend::Sqlite {
                    connection
                        .execute(
                            "PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL; \
                             PRAGMA busy_timeout = 10000; PRAGMA foreign_keys = ON;",
                        )
                        .await?;
                }
                Ok(())
            })
        })
        .connect_with(options)
        .await
        .map_err(DbError::Connect)?;
    let migrator = match backend {
        Backend::Sqlite => migrations.sqlite,
        Backend::Postgres => migrations.postgres,
    };
    with_platform(migrator)?.run(&pool).await?;
    let name: Arc<str> = database_name(&config.url).into();
    pool_figures()
        .max_connections
        .get_or_create(&PoolLabels {
            database: name.to_string(),
        })
        .set(i64::from(config.max_connections.max(1)));
    Ok(Database {
        pool,
        backend,
        name,
    })
}

impl Database {
    /// The secret named `name`: the one kept already, or else `fresh`, which is kept from now
    /// on. When replicas start together, every one gets the secret the first of them kept.
    pub async fn shared_secret(&self, name: &str, fresh: &str) -> Result<String, StoreError> {
        sqlx::query(
            "INSERT INTO service_secrets (name, value) VALUES ($1, $2) \
             ON CONFLICT (name) DO NOTHING",
        )
        .bind(name)
        .bind(fresh)
        .execute(&self.pool)
        .await?;
        let row = sqlx::query("SELECT value FROM service_secrets WHERE name = $1")
            .bind(name)
            .fetch_one(&self.pool)
            .await?;
        Ok(sqlx::Row::try_get(&row, "value")?)
    }

    /// Checks that the database answers, noting how long a connection took to come from the
    /// pool and how many are in use.
    pub async fn probe(&self) -> Result<(), StoreError> {
        let figures = pool_figures();
        let database = self.name.to_string();
        let started = Instant::now();
        let acquired = self.pool.acquire().await;
        figures
            .acquire_seconds
            .get_or_create(&PoolLabels {
                database: database.clone(),
            })
            .observe(started.elapsed().as_secs_f64());
        let mut connection = acquired?;
        sqlx::query("SELECT 1").execute(&mut *connection).await?;
        drop(connection);
        let open = i64::from(self.pool.size());
        let idle = i64::try_from(self.pool.num_idle()).unwrap_or(i64::MAX);
        for (state, count) in [("in_use", (open - idle).max(0)), ("idle", idle)] {
            figures
                .connections
                .get_or_create(&ConnectionLabels {
                    database: database.clone(),
                    state,
                })
                .set(count);
        }
        Ok(())
    }
}

/// A service's migrations with the platform's own, in version order.
fn with_platform(service: &Migrator) -> Result<Migrator, DbError> {
    if let Some(clash) = service
        .iter()
        .find(|m| m.version >= PLATFORM_MIGRATIONS_FROM)
    {
        return Err(DbError::ReservedVersion(clash.version));
    }
    let all = service.iter().chain(PLATFORM.iter()).cloned().collect();
    Ok(Migrator::with_migrations(all))
}

/// The URL without a password, for messages.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            format!("{}://***{}", &url[..scheme], &url[at..])
        }
        _ => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_database_is_named_without_user_password_or_host() {
        assert_eq!(database_name("sqlite:///var/lib/onestop/forms.db"), "forms");
        assert_eq!(
            database_name("sqlite://data/routing.db?mode=rwc"),
            "routing"
        );
        assert_eq!(
            database_name("postgres://routing:secret@db.internal:5432/routing?sslmode=require"),
            "routing"
        );
        assert_eq!(database_name("postgres://db.internal"), "default");
        assert_eq!(database_name("sqlite://forms.db"), "forms");
    }
}
