//! Typed configuration: a TOML file plus `ONESTOP_<SECTION>_<KEY>` environment overrides.
//!
//! Every configuration struct denies unknown fields, so a misspelt key is an error that names
//! the key, not a silently ignored setting. The environment is passed in as a map so that tests
//! never touch the process environment.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use serde::de::DeserializeOwned;

use crate::tls::TlsFiles;

/// Why a configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not valid TOML.
    #[error("{path} is not valid TOML: {message}")]
    Syntax {
        /// The file.
        path: PathBuf,
        /// The parser's message, with line and column.
        message: String,
    },
    /// An environment override does not fit the structure.
    #[error("environment variable {name}: {message}")]
    Override {
        /// The variable.
        name: String,
        /// Why it does not fit.
        message: String,
    },
    /// The values do not fit the typed configuration (unknown key, wrong type, missing key).
    #[error("{source_name}: {message}")]
    Invalid {
        /// The file, or `defaults` when there was none.
        source_name: String,
        /// What is wrong, naming the key.
        message: String,
    },
}

/// The prefix of environment overrides.
pub const ENV_PREFIX: &str = "ONESTOP_";

/// Loads a configuration from an optional TOML file and environment overrides.
///
/// `ONESTOP_DATABASE_URL=...` sets key `url` of section `[database]`; the section is the first
/// word after the prefix and the key the rest, lower-cased. A value is read as TOML (number,
/// boolean, array) when it parses as such and as a string otherwise.
pub fn load<T: DeserializeOwned>(
    path: Option<&Path>,
    env: &HashMap<String, String>,
) -> Result<T, ConfigError> {
    let (mut table, source_name) = match path {
        Some(path) => {
            let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                path: path.to_owned(),
                source,
            })?;
            let table: toml::Table =
                text.parse()
                    .map_err(|e: toml::de::Error| ConfigError::Syntax {
                        path: path.to_owned(),
                        message: e.to_string(),
                    })?;
            (table, path.display().to_string())
        }
        None => (toml::Table::new(), "defaults".to_owned()),
    };
    apply_overrides(&mut table, env)?;
    toml::Value::Table(table)
        .try_into()
        .map_err(|e: toml::de::Error| ConfigError::Invalid {
            source_name,
            message: e.message().to_owned(),
        })
}

/// The process environment as a map, for binaries.
pub fn process_env() -> HashMap<String, String> {
    std::env::vars().collect()
}

fn apply_overrides(
    table: &mut toml::Table,
    env: &HashMap<String, String>,
) -> Result<(), ConfigError> {
    // Sorted, so that errors are reported in a stable order.
    let overrides: BTreeMap<_, _> = env
        .iter()
        .filter_map(|(name, value)| Some((name, name.strip_prefix(ENV_PREFIX)?, value)))
        .map(|(name, rest, value)| (name.clone(), (rest.to_ascii_lowercase(), value)))
        .collect();
    for (name, (rest, value)) in overrides {
        let Some((section, key)) = rest.split_once('_') else {
            return Err(ConfigError::Override {
                name,
                message: "expected ONESTOP_<SECTION>_<KEY>".into(),
            });
        };
        let entry = table
            .entry(section.to_owned())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        let Some(section_table) = entry.as_table_mut() else {
            return Err(ConfigError::Override {
                name,
                message: format!("`{section}` is not a section"),
            });
        };
        section_table.insert(key.to_owned(), parse_value(value));
    }
    Ok(())
}

fn parse_value(text: &str) -> toml::Value {
    format!("v = {text}")
        .parse::<toml::Table>()
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(text.to_owned()))
}

/// The `[server]` section every server has: where it listens, its TLS files, its identity and
/// its limits.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// The address to listen on.
    pub listen: SocketAddr,
    /// The trust domain of the SPIFFE identities this server accepts.
    #[serde(default = "default_trust_domain")]
    pub trust_domain: String,
    /// This server's TLS files.
    pub tls: TlsFiles,
    /// The limits every request is held to.
    #[serde(default)]
    pub limits: Limits,
    /// How long in-flight calls may take to finish after a shutdown signal.
    #[serde(default = "default_drain_timeout", with = "duration_ms")]
    pub drain_timeout_ms: Duration,
    /// How often the revocation list (`[server.tls] crl`) is checked for changes.
    #[serde(default = "default_reload_interval", with = "duration_ms")]
    pub reload_interval_ms: Duration,
    /// The SPIFFE identity of the gateway, the only peer believed when it names a caller;
    /// defaults to `spiffe://<trust domain>/platform/gateway`.
    #[serde(default)]
    pub gateway_identity: Option<String>,
}

fn default_reload_interval() -> Duration {
    Duration::from_secs(10)
}

impl ServerConfig {
    /// A server on `listen` with these TLS files and every other setting at its default.
    pub fn new(listen: SocketAddr, tls: TlsFiles) -> Self {
        Self {
            listen,
            trust_domain: default_trust_domain(),
            tls,
            limits: Limits::default(),
            drain_timeout_ms: default_drain_timeout(),
            reload_interval_ms: default_reload_interval(),
            gateway_identity: None,
        }
    }
}

/// The default trust domain.
pub fn default_trust_domain() -> String {
    "onestop.lv".to_owned()
}

fn default_drain_timeout() -> Duration {
    Duration::from_secs(10)
}

/// Explicit server limits; tonic's and hyper's defaults are not ours.
#[derive(Clone, Copy, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// The longest a unary call may take (a client's shorter `grpc-timeout` wins).
    #[serde(with = "duration_ms")]
    pub request_timeout_ms: Duration,
    /// Requests served at once on one connection; more are refused with `RESOURCE_EXHAUSTED`
    /// rather than queued.
    pub max_concurrent_requests: usize,
    /// The largest message a server decodes, in bytes.
    pub max_message_bytes: usize,
    /// HTTP/2 streams one connection may open at once.
    pub max_concurrent_streams: u32,
    /// How often an idle connection is pinged.
    #[serde(with = "duration_ms")]
    pub keepalive_interval_ms: Duration,
    /// How long a ping may go unanswered before the connection is closed.
    #[serde(with = "duration_ms")]
    pub keepalive_timeout_ms: Duration,
    /// The longest a TLS handshake may take.
    #[serde(with = "duration_ms")]
    pub handshake_timeout_ms: Duration,
    /// TLS handshakes in progress at once.
    pub max_pending_handshakes: usize,
    /// The largest header block a client may send, in bytes.
    pub max_header_list_bytes: u32,
    /// Connections open at once, handshaking or not; keep it below the process's file
    /// descriptor limit.
    pub max_connections: usize,
    /// Connections from one source address whose peer is not identified (still handshaking, or
    /// without a usable certificate).
    pub max_unidentified_per_source: usize,
    /// New connections a second from one source address; bursts of twice as many.
    pub handshakes_per_source_per_second: u32,
    /// How long after its handshake a connection may take to send its first call.
    #[serde(with = "duration_ms")]
    pub first_request_timeout_ms: Duration,
    /// How long a connection may stay open with no call in flight.
    #[serde(with = "duration_ms")]
    pub idle_timeout_ms: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            request_timeout_ms: Duration::from_secs(30),
            max_concurrent_requests: 1024,
            max_message_bytes: 4 * 1024 * 1024,
            max_concurrent_streams: 1024,
            keepalive_interval_ms: Duration::from_secs(30),
            keepalive_timeout_ms: Duration::from_secs(10),
            handshake_timeout_ms: Duration::from_secs(10),
            max_pending_handshakes: 256,
            max_header_list_bytes: 16 * 1024,
            max_connections: 10_000,
            max_unidentified_per_source: 16,
            handshakes_per_source_per_second: 50,
            first_request_timeout_ms: Duration::from_secs(10),
            idle_timeout_ms: Duration::from_secs(300),
        }
    }
}

/// The `[telemetry]` section.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TelemetryConfig {
    /// An OTLP/gRPC collector endpoint such as `http://127.0.0.1:4317`; traces are exported
    /// only when it is set.
    pub otlp_endpoint: Option<String>,
    /// A `tracing` filter such as `info,onestop_gateway=debug`; `RUST_LOG` wins when set.
    pub log_filter: Option<String>,
    /// Log as JSON lines instead of text.
    #[serde(default)]
    pub log_json: bool,
}

/// The `[database]` section.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatabaseConfig {
    /// `sqlite://path/to/file.db` or `postgres://user@host/db`.
    pub url: String,
    /// Connections in the pool.
    #[serde(default = "default_max_connections")]
    pub max_connections: u32,
}

fn default_max_connections() -> u32 {
    8
}

/// Durations are written in milliseconds in files and overrides.
mod duration_ms {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer};

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        u64::deserialize(d).map(Duration::from_millis)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Sample {
        database: DatabaseConfig,
        #[serde(default)]
        limits: Limits,
    }

    fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn environment_overrides_file_values_and_types() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "[database]\nurl = \"sqlite://a.db\"\n").unwrap();
        let sample: Sample = load(
            Some(&path),
            &env(&[
                ("ONESTOP_DATABASE_URL", "postgres://x/y"),
                ("ONESTOP_LIMITS_MAX_MESSAGE_BYTES", "1000"),
                ("OTHER", "ignored"),
            ]),
        )
        .unwrap();
        assert_eq!(sample.database.url, "postgres://x/y");
        assert_eq!(sample.limits.max_message_bytes, 1000);
        assert_eq!(sample.limits.max_concurrent_streams, 1024);
    }

    #[test]
    fn unknown_keys_are_named_in_the_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "[database]\nurl = \"x\"\nulr = \"y\"\n").unwrap();
        let error = load::<Sample>(Some(&path), &HashMap::new()).unwrap_err();
        assert!(error.to_string().contains("ulr"), "{error}");

        let error = load::<Sample>(Some(&path), &env(&[("ONESTOP_DATABASE", "x")])).unwrap_err();
        assert!(error.to_string().contains("ONESTOP_DATABASE"), "{error}");
    }

    #[test]
    fn a_syntax_error_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("broken.toml");
        std::fs::write(&path, "[database\n").unwrap();
        let error = load::<Sample>(Some(&path), &HashMap::new()).unwrap_err();
        assert!(error.to_string().contains("broken.toml"), "{error}");
    }
}
