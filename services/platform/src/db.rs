//! Databases: one sqlx pool per service, SQLite or PostgreSQL chosen by the URL, with the
//! service's embedded migrations applied at start.
//!
//! SQLite runs in WAL mode with `synchronous = FULL`, so that a committed transaction survives
//! a power cut, not only a killed process; PostgreSQL commits durably by default. Services write
//! portable SQL through the `Any` driver and keep one migration directory per backend.

use std::time::Duration;

use sqlx::any::{AnyConnectOptions, AnyPoolOptions};
use sqlx::migrate::Migrator;
use sqlx::{AnyPool, Executor};

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
    /// A migration failed.
    #[error("database migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
}

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
    migrator.run(&pool).await?;
    Ok(Database { pool, backend })
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
