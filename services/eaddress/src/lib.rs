//! The official e-address: mailboxes of persons, companies and institutions; official messages
//! with attachments streamed to and from disk; a signed, append-only evidence log (a Merkle
//! tree in the manner of Certificate Transparency) that anyone can verify offline; legal
//! delivery rules by working days; content-free notices by e-mail.
//!
//! Layout, each layer calling only downward: [`api`] (tonic handlers) → [`service`] (use cases,
//! who may do what, background work) → [`calendar`] (working days, delivery rules),
//! [`evidence`] (record format, Merkle proofs, signatures, offline verification), [`notices`]
//! (SMTP), [`blobs`] (attachment content on disk) and [`store`] (sqlx); [`incoming`] serves an
//! institution's incoming messages through the platform's inbox streams. [`address`] parses
//! mailbox addresses, [`model`] holds the domain's records and [`error`] is where errors become
//! gRPC statuses.

pub mod address;
pub mod api;
pub mod blobs;
pub mod calendar;
pub mod error;
pub mod evidence;
pub mod incoming;
pub mod model;
pub mod notices;
pub mod service;
pub mod store;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use onestop_platform::config::{AdminConfig, DatabaseConfig, ServerConfig, TelemetryConfig};
use onestop_platform::identity::SpiffeId;
use onestop_platform::requests::Requests;
use onestop_platform::server::Services;
use onestop_proto::eaddress::v1::evidence_service_server::EvidenceServiceServer;
use onestop_proto::eaddress::v1::mailbox_service_server::MailboxServiceServer;
use onestop_proto::eaddress::v1::message_service_server::MessageServiceServer;
use serde::Deserialize;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::calendar::{Calendar, DeliveryRule};
use crate::service::{Eaddress, Gauges, Parts, Rules, Signer};

/// The configuration of one e-address process.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EaddressConfig {
    /// Listener, TLS and limits.
    pub server: ServerConfig,
    /// The e-address database.
    pub database: DatabaseConfig,
    /// Logs and traces.
    #[serde(default)]
    pub telemetry: TelemetryConfig,
    /// Metrics, liveness and readiness.
    #[serde(default)]
    pub admin: AdminConfig,
    /// Service settings.
    pub eaddress: EaddressSettings,
}

/// The `[eaddress]` section.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EaddressSettings {
    /// Where attachment content is kept (shared by all replicas).
    pub attachments_dir: PathBuf,
    /// Where the evidence signing keys are (`<key id>.p8`, PKCS#8 Ed25519): the newest file
    /// name signs; add a newer file to rotate. Shared by all replicas.
    pub evidence_key_dir: PathBuf,
    /// Whether to make a first key when the directory has none (development). Without a key,
    /// messages are still accepted and their evidence waits until a key is there.
    #[serde(default)]
    pub generate_evidence_key: bool,
    /// The largest attachment, bytes.
    #[serde(default = "default_max_attachment")]
    pub max_attachment_bytes: u64,
    /// The delivery rule of document types not listed in `delivery_rules`: `working-days:N`
    /// (deemed delivered on the N-th working day after placement) or `opened[:D]` (delivered
    /// only when opened; not delivered after D days, 30 by default).
    #[serde(default = "default_rule")]
    pub default_delivery_rule: String,
    /// Delivery rules by document type.
    #[serde(default)]
    pub delivery_rules: BTreeMap<String, String>,
    /// The time zone in which working days are counted.
    #[serde(default = "default_timezone")]
    pub timezone: String,
    /// Public holidays (`YYYY-MM-DD`) instead of Latvia's, which are built in.
    #[serde(default)]
    pub holidays: Option<Vec<String>>,
    /// Platform components (their names, such as `routing`) that may send in any institution's
    /// name.
    #[serde(default = "default_trusted")]
    pub trusted_senders: Vec<String>,
    /// The SMTP server for notices; without it no notices are sent.
    #[serde(default)]
    pub smtp: Option<notices::SmtpSettings>,
    /// The delay before a failed notice is tried again, milliseconds; it doubles with each
    /// failure up to an hour.
    #[serde(default = "default_first_retry")]
    pub notice_first_retry_ms: u64,
    /// How long an institution's incoming stream holds a message unacknowledged before it is
    /// delivered again, seconds (1-3600).
    #[serde(default = "default_incoming_lease")]
    pub incoming_lease_s: u64,
}

fn default_max_attachment() -> u64 {
    1 << 30
}
fn default_rule() -> String {
    "working-days:2".to_owned()
}
fn default_timezone() -> String {
    "Europe/Riga".to_owned()
}
fn default_trusted() -> Vec<String> {
    vec!["routing".to_owned()]
}
fn default_first_retry() -> u64 {
    30_000
}
fn default_incoming_lease() -> u64 {
    60
}

impl EaddressSettings {
    /// The settings with every default, keeping attachments and keys under `data_dir`.
    pub fn new(data_dir: &std::path::Path) -> Self {
        Self {
            attachments_dir: data_dir.join("attachments"),
            evidence_key_dir: data_dir.join("evidence-keys"),
            generate_evidence_key: true,
            max_attachment_bytes: default_max_attachment(),
            default_delivery_rule: default_rule(),
            delivery_rules: BTreeMap::new(),
            timezone: default_timezone(),
            holidays: None,
            trusted_senders: default_trusted(),
            smtp: None,
            notice_first_retry_ms: default_first_retry(),
            incoming_lease_s: default_incoming_lease(),
        }
    }
}

/// Why the service could not run.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The configuration is unusable.
    #[error("configuration: {0}")]
    Config(String),
    /// The database could not be opened.
    #[error(transparent)]
    Database(#[from] onestop_platform::db::DbError),
    /// The service failed at start.
    #[error(transparent)]
    Start(#[from] error::EaddressError),
    /// Serving failed.
    #[error(transparent)]
    Serve(#[from] onestop_platform::server::ServeError),
}

/// The process's e-address figures, registered once.
fn gauges() -> &'static Gauges {
    static GAUGES: OnceLock<Gauges> = OnceLock::new();
    GAUGES.get_or_init(|| {
        let gauges = Gauges::default();
        onestop_platform::metrics::register(
            "eaddress_evidence_pending",
            "Evidence events accepted but not yet signed into the log",
            gauges.evidence_pending.clone(),
        );
        onestop_platform::metrics::register(
            "eaddress_notices_unsent",
            "E-mail notices not yet sent (waiting or being retried)",
            gauges.notices_unsent.clone(),
        );
        onestop_platform::metrics::register(
            "eaddress_messages_awaiting_deemed_delivery",
            "Messages placed and not opened that will be deemed delivered at their deadline (the same on every replica of one database)",
            gauges.awaiting_deemed_delivery.clone(),
        );
        gauges
    })
}

/// Opens the store, the attachment store and the evidence key.
pub async fn open(config: &EaddressConfig) -> Result<Arc<Eaddress>, ServeError> {
    let settings = &config.eaddress;
    let bad = |key: &str, e: String| ServeError::Config(format!("eaddress.{key}: {e}"));
    if settings.incoming_lease_s == 0 || settings.incoming_lease_s > 3600 {
        return Err(bad("incoming_lease_s", "1-3600 seconds".into()));
    }
    if settings.max_attachment_bytes == 0 || settings.max_attachment_bytes > 64 << 30 {
        return Err(bad("max_attachment_bytes", "1 byte to 64 GiB".into()));
    }
    let default = DeliveryRule::parse(&settings.default_delivery_rule)
        .map_err(|e| bad("default_delivery_rule", e))?;
    let mut by_type = HashMap::new();
    for (document_type, rule) in &settings.delivery_rules {
        by_type.insert(
            document_type.clone(),
            DeliveryRule::parse(rule).map_err(|e| bad("delivery_rules", e))?,
        );
    }
    let calendar = match &settings.holidays {
        None if settings.timezone == "Europe/Riga" => Calendar::latvia(),
        None => Calendar::new(&settings.timezone, Calendar::latvia().holidays())
            .map_err(|e| bad("timezone", e))?,
        Some(days) => {
            let days = days
                .iter()
                .map(|d| {
                    chrono::NaiveDate::parse_from_str(d, "%Y-%m-%d")
                        .map_err(|e| bad("holidays", format!("`{d}`: {e}")))
                })
                .collect::<Result<Vec<_>, _>>()?;
            Calendar::new(&settings.timezone, days).map_err(|e| bad("timezone", e))?
        }
    };
    let trusted_senders = settings
        .trusted_senders
        .iter()
        .map(|name| SpiffeId::platform(&config.server.trust_domain, name))
        .collect();
    let mailer = match &settings.smtp {
        Some(smtp) => Some((
            notices::Mailer::new(smtp).map_err(|e| bad("smtp", e))?,
            Duration::from_millis(settings.notice_first_retry_ms.max(1)),
        )),
        None => None,
    };
    let signer = Signer::open(&settings.evidence_key_dir, settings.generate_evidence_key)
        .map_err(|e| bad("evidence_key_dir", e))?;
    let blobs = blobs::Blobs::open(&settings.attachments_dir)
        .await
        .map_err(|e| {
            bad(
                "attachments_dir",
                format!("{}: {e}", settings.attachments_dir.display()),
            )
        })?;
    let db = onestop_platform::db::open(&config.database, &store::MIGRATIONS).await?;
    let requests = Requests::new(&db, config.database.request_retention());
    let mut eaddress = Eaddress::new(Parts {
        store: store::Store::new(db),
        requests,
        blobs,
        calendar,
        rules: Rules { default, by_type },
        max_attachment_bytes: settings.max_attachment_bytes,
        trusted_senders,
        signer,
        mailer,
        incoming_lease: Duration::from_secs(settings.incoming_lease_s),
    })
    .await?;
    eaddress.gauges = gauges().clone();
    Ok(Arc::new(eaddress))
}

/// Serves the e-address contract, and does its background work, until `shutdown`.
pub async fn serve(
    config: &EaddressConfig,
    eaddress: Arc<Eaddress>,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<(), ServeError> {
    tokio::spawn(eaddress.requests().clone().keep_pruned(shutdown.clone()));
    tokio::spawn(keep_delivering(eaddress.clone(), shutdown.clone()));
    tokio::spawn(keep_noticing(eaddress.clone(), shutdown.clone()));
    tokio::spawn(keep_deadlines(eaddress.clone(), shutdown.clone()));
    tokio::spawn(keep_figures(eaddress.clone(), shutdown.clone()));
    if eaddress.store().database().backend == onestop_platform::db::Backend::Postgres {
        eaddress.inboxes().follow_postgres(
            config.database.url.clone(),
            store::INCOMING_CHANNEL,
            shutdown.clone(),
        );
    }
    let mut services = Services::new(&config.server);
    services
        .health()
        .follow_database(eaddress.store().database().clone(), shutdown.clone());
    let api = api::EaddressApi::new(eaddress, shutdown.clone());
    services
        .add(MailboxServiceServer::new(api.clone()))
        .add(MessageServiceServer::new(api.clone()))
        .add(EvidenceServiceServer::new(api));
    onestop_platform::server::serve(&config.server, services, listener, shutdown).await?;
    Ok(())
}

/// How often background work looks for what other replicas (or a restart) left, besides being
/// woken by this replica's own changes.
const SWEEP: Duration = Duration::from_secs(1);
/// How often deadlines and unused uploads are looked at.
const DEADLINE_SWEEP: Duration = Duration::from_secs(60);

/// A failed pass is logged and tried again at the next wake-up or sweep.
fn logged<T>(what: &str, result: Result<T, error::EaddressError>) {
    if let Err(error) = result {
        tracing::warn!(%error, "{what} failed; it is tried again");
    }
}

/// Places accepted messages and signs evidence into the log.
async fn keep_delivering(eaddress: Arc<Eaddress>, shutdown: CancellationToken) {
    loop {
        loop {
            match eaddress.dispatch(onestop_platform::clock::now()).await {
                Ok(0) => break,
                Ok(_) => {}
                Err(error) => {
                    logged::<()>("placing messages", Err(error));
                    break;
                }
            }
        }
        logged("signing evidence", eaddress.sign_evidence().await);
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = eaddress.wake.dispatch.notified() => {}
            () = eaddress.wake.evidence.notified() => {}
            () = tokio::time::sleep(SWEEP) => {}
        }
    }
}

/// Sends notices as they fall due.
async fn keep_noticing(eaddress: Arc<Eaddress>, shutdown: CancellationToken) {
    if !eaddress.has_mailer() {
        return;
    }
    loop {
        logged(
            "sending notices",
            eaddress.send_notices(onestop_platform::clock::now()).await,
        );
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = eaddress.wake.notices.notified() => {}
            () = tokio::time::sleep(SWEEP) => {}
        }
    }
}

/// How often the figures counted from the database are counted again: one cheap aggregate,
/// however often `/metrics` is scraped.
const FIGURES_REFRESH: Duration = Duration::from_secs(10);

/// Counts the messages awaiting deemed delivery every [`FIGURES_REFRESH`] until `shutdown`.
async fn keep_figures(eaddress: Arc<Eaddress>, shutdown: CancellationToken) {
    loop {
        match eaddress.store().awaiting_deemed_delivery().await {
            Ok(awaiting) => {
                eaddress
                    .gauges
                    .awaiting_deemed_delivery
                    .set(i64::try_from(awaiting).unwrap_or(i64::MAX));
            }
            Err(error) => tracing::warn!(%error, "counting the deliveries failed; tried again"),
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(FIGURES_REFRESH) => {}
        }
    }
}

/// Records passed deadlines and removes unused uploads.
async fn keep_deadlines(eaddress: Arc<Eaddress>, shutdown: CancellationToken) {
    loop {
        let now = onestop_platform::clock::now();
        logged("recording deadlines", eaddress.pass_deadlines(now).await);
        logged(
            "removing unused uploads",
            eaddress.remove_unused_uploads(now).await,
        );
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(DEADLINE_SWEEP) => {}
        }
    }
}
