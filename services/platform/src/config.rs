//! Typed configuration: a TOML file plus environment overrides.
//!
//! An override names the key's path with `__` between the levels, after the prefix `ONESTOP__`:
//! `ONESTOP__DATABASE__URL` sets `url` of `[database]`, and
//! `ONESTOP__SERVER__LIMITS__MAX_CONNECTIONS` sets `max_connections` of `[server.limits]`.
//! Single underscores stay within a name. The double underscore after the prefix keeps the
//! variables Kubernetes makes for Services (`ONESTOP_GATEWAY_SERVICE_HOST` for a Service named
//! `onestop-gateway`) apart from ours: variables that start with `ONESTOP_` but not `ONESTOP__`
//! are not overrides, and [`ignored`] lists them so that a process can say so in its log.
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
pub const ENV_PREFIX: &str = "ONESTOP__";

/// What separates the levels of a key's path in an override.
pub const ENV_SEPARATOR: &str = "__";

/// Loads a configuration from an optional TOML file and environment overrides (see the module
/// docs). A value is read as TOML (number, boolean, array) when it parses as such and as a
/// string otherwise.
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

/// Variables that look like ours but are not overrides (`ONESTOP_` without the second
/// underscore), such as Kubernetes service links, sorted: a process mentions them in its log.
pub fn ignored(env: &HashMap<String, String>) -> Vec<String> {
    let mut names: Vec<String> = env
        .keys()
        .filter(|name| name.starts_with("ONESTOP_") && !name.starts_with(ENV_PREFIX))
        .cloned()
        .collect();
    names.sort();
    names
}

fn apply_overrides(
    table: &mut toml::Table,
    env: &HashMap<String, String>,
) -> Result<(), ConfigError> {
    // Sorted, so that errors are reported in a stable order.
    let overrides: BTreeMap<_, _> = env
        .iter()
        .filter_map(|(name, value)| Some((name, (name.strip_prefix(ENV_PREFIX)?, value))))
        .collect();
    for (name, (rest, value)) in overrides {
        let path: Vec<String> = rest
            .split(ENV_SEPARATOR)
            .map(str::to_ascii_lowercase)
            .collect();
        if path.iter().any(String::is_empty) {
            return Err(ConfigError::Override {
                name: name.clone(),
                message: "expected ONESTOP__<SECTION>__<KEY>, levels separated by `__`".into(),
            });
        }
        let Some((key, sections)) = path.split_last() else {
            continue;
        };
        let mut current = &mut *table;
        for (depth, section) in sections.iter().enumerate() {
            let entry = current
                .entry(section.clone())
                .or_insert_with(|| toml::Value::Table(toml::Table::new()));
            current = entry.as_table_mut().ok_or_else(|| ConfigError::Override {
                name: name.clone(),
                message: format!("`{}` is not a section", sections[..=depth].join(".")),
            })?;
        }
        current.insert(key.clone(), parse_value(value));
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
    /// The share of new traces kept, 0.0-1.0 (1.0 when unset); a call that comes with a
    /// sampled caller's trace context is always kept, one whose caller chose not to sample it
    /// never is (parent based).
    #[serde(default)]
    pub sample_ratio: Option<f64>,
    /// Whether health checks and reflection are traced too (they are not by default: the
    /// gateway watches every service, and load balancers probe all day).
    #[serde(default)]
    pub trace_health: bool,
}

/// The `[admin]` section: the admin listener (`/metrics`, `/healthz`, `/readyz`, plain HTTP),
/// for the cluster's internal network only.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// Where it listens; none when unset.
    pub listen: Option<SocketAddr>,
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
    /// How long a change's request id is remembered, so that a retry finds the first result;
    /// a retry later than this is a new request.
    #[serde(default = "default_request_retention_hours")]
    pub request_retention_hours: u64,
}

impl DatabaseConfig {
    /// The database at `url` with the default settings.
    pub fn at(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            max_connections: default_max_connections(),
            request_retention_hours: default_request_retention_hours(),
        }
    }

    /// [`Self::request_retention_hours`] as a duration.
    pub fn request_retention(&self) -> Duration {
        Duration::from_secs(self.request_retention_hours.saturating_mul(3600))
    }
}

fn default_max_connections() -> u32 {
    8
}

fn default_request_retention_hours() -> u64 {
    // A week: longer than any client retries, short enough to keep the table small.
    7 * 24
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
        #[serde(default)]
        server: Option<Nested>,
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Nested {
        #[serde(default)]
        limits: Limits,
        #[serde(default)]
        trust_domain: Option<String>,
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
                ("ONESTOP__DATABASE__URL", "postgres://x/y"),
                ("ONESTOP__LIMITS__MAX_MESSAGE_BYTES", "1000"),
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

        // A section given a value.
        let error = load::<Sample>(Some(&path), &env(&[("ONESTOP__DATABASE", "x")])).unwrap_err();
        assert!(error.to_string().contains("DatabaseConfig"), "{error}");
        let error =
            load::<Sample>(Some(&path), &env(&[("ONESTOP__DATABASE____URL", "x")])).unwrap_err();
        assert!(
            error.to_string().contains("ONESTOP__DATABASE____URL"),
            "{error}"
        );
    }

    #[test]
    fn nested_keys_are_overridden_level_by_level() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(
            &path,
            "[database]\nurl = \"x\"\n[server]\ntrust_domain = \"a.lv\"\n[server.limits]\nmax_connections = 5\n",
        )
        .unwrap();
        let sample: Sample = load(
            Some(&path),
            &env(&[
                ("ONESTOP__SERVER__LIMITS__MAX_CONNECTIONS", "7"),
                ("ONESTOP__SERVER__LIMITS__IDLE_TIMEOUT_MS", "1500"),
                ("ONESTOP__SERVER__TRUST_DOMAIN", "b.lv"),
            ]),
        )
        .unwrap();
        let server = sample.server.unwrap();
        assert_eq!(server.limits.max_connections, 7);
        assert_eq!(server.limits.idle_timeout_ms, Duration::from_millis(1500));
        assert_eq!(server.trust_domain.as_deref(), Some("b.lv"));
        // A level that is a value, not a section, is named.
        let error =
            load::<Sample>(Some(&path), &env(&[("ONESTOP__DATABASE__URL__X", "1")])).unwrap_err();
        assert!(error.to_string().contains("database.url"), "{error}");
    }

    #[test]
    fn kubernetes_service_links_are_not_overrides() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "[database]\nurl = \"x\"\n").unwrap();
        let links = env(&[
            ("ONESTOP_GATEWAY_SERVICE_HOST", "10.0.0.1"),
            ("ONESTOP_GATEWAY_PORT", "tcp://10.0.0.1:7443"),
        ]);
        let sample: Sample = load(Some(&path), &links).unwrap();
        assert_eq!(sample.database.url, "x");
        assert_eq!(
            ignored(&links),
            ["ONESTOP_GATEWAY_PORT", "ONESTOP_GATEWAY_SERVICE_HOST"]
        );
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
