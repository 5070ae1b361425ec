//! The client commands a member's IT runs against the platform: submit an application, consume
//! an institution's inbox, read and move an application's status, export service-case
//! statistics. Every call goes through the gateway over mutual TLS with a member certificate,
//! and carries a person's token when one is given.
//!
//! Output is meant for scripts: JSON (one value, or one line per item for streams and lists) or
//! CSV on standard output; notes and errors (the gRPC code, the message, every field violation
//! and the stable `ErrorInfo` reason) on standard error.

use std::fmt::Write as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use onestop_platform::tls::{self, TlsFiles, TlsMaterial};
use onestop_proto::identity::v1::IdentityDocument;
use onestop_proto::routing::v1 as routing;
use onestop_proto::r#type::v1::{MemberId, PersonId, PersonIdScheme};
use routing::application_service_client::ApplicationServiceClient;
use routing::inbox_service_client::InboxServiceClient;
use routing::service_case_service_client::ServiceCaseServiceClient;
use routing::{stream_inbox_request, stream_inbox_response};
use serde_json::{Value, json};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::metadata::AsciiMetadataValue;
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic_types::StatusExt;

use crate::federation;

// ---------------------------------------------------------------------------------------------
// The connection

/// How to reach the gateway and whom to present to it.
#[derive(Clone, clap::Args)]
pub struct Connection {
    /// The gateway, `host:port`.
    #[arg(long, env = "ONESTOP_GATEWAY", default_value = "127.0.0.1:7443")]
    gateway: String,
    /// The name the gateway's certificate must carry.
    #[arg(long, default_value = "localhost")]
    server_name: String,
    /// The PKI directory with `ca.pem` and the member certificate `<NAME>.pem`, `<NAME>.key`.
    #[arg(long, default_value = "onestop-data/pki")]
    pki: PathBuf,
    /// The member certificate to present: its file name in `--pki`, without `.pem`.
    #[arg(long = "as", value_name = "NAME", default_value = federation::DEMO_CENTRE)]
    name: String,
    /// The member certificate (PEM), instead of `--as`.
    #[arg(long, requires = "key")]
    cert: Option<PathBuf>,
    /// The private key of `--cert` (PEM).
    #[arg(long, requires = "cert")]
    key: Option<PathBuf>,
    /// The CA certificate (PEM), instead of `<PKI>/ca.pem`.
    #[arg(long)]
    ca: Option<PathBuf>,
    /// A person's platform token, sent as `authorization: Bearer <TOKEN>` on every call. For
    /// the token `onestop login` printed, the session it kept in `--sessions` is renewed as
    /// needed and its current token sent.
    #[arg(long, env = "ONESTOP_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Where `onestop login` keeps sessions (one file each, readable by the owner only).
    #[arg(
        long,
        env = "ONESTOP_SESSIONS",
        default_value = "onestop-data/sessions"
    )]
    sessions: PathBuf,
}

/// Adds the person's token to every call: the gateway checks it on each one, streams included.
#[derive(Clone)]
pub struct Bearer(Option<AsciiMetadataValue>);

impl Interceptor for Bearer {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(value) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        Ok(request)
    }
}

/// A channel to the gateway that carries the token, for any of the generated clients.
pub type Gateway = InterceptedService<Channel, Bearer>;

impl Connection {
    /// The TLS files: those of `--pki` and `--as`, with the explicitly given ones in their place.
    fn files(&self) -> TlsFiles {
        let mut files = TlsFiles::in_pki_dir(&self.pki, &self.name);
        if let (Some(cert), Some(key)) = (&self.cert, &self.key) {
            files.cert = cert.clone();
            files.key = key.clone();
        }
        if let Some(ca) = &self.ca {
            // The PKI directory's revocation list belongs to its own CA, not to this one.
            files.ca = ca.clone();
            files.crl = None;
        }
        files
    }

    /// The person's token given, if any.
    pub fn token(&self) -> Option<&str> {
        self.token.as_deref()
    }

    /// Where `onestop login` keeps sessions.
    pub fn sessions_dir(&self) -> &Path {
        &self.sessions
    }

    /// A lazily connecting channel without the person's token, set up the way every platform
    /// client is.
    pub fn channel(&self) -> anyhow::Result<Channel> {
        let files = self.files();
        let material = TlsMaterial::load(&files)
            .with_context(|| format!("loading the member certificate {}", files.cert.display()))?;
        let config = tls::client_config(&material, None)?;
        let channel = onestop_platform::client::channel(
            &self.gateway,
            &self.server_name,
            config,
            Duration::from_secs(30),
        )?;
        Ok(channel)
    }

    /// A channel that carries the person's token, when one is given: that of the session
    /// `onestop login` kept for it, renewed first when it is about to expire.
    pub async fn open(&self) -> anyhow::Result<Gateway> {
        let channel = self.channel()?;
        let token = match &self.token {
            Some(given) => Some(crate::session::current_token(self, given).await?),
            None => None,
        };
        let token = token
            .map(|token| format!("Bearer {token}").parse::<AsciiMetadataValue>())
            .transpose()
            .context("the token is not printable ASCII")?;
        Ok(InterceptedService::new(channel, Bearer(token)))
    }
}

/// A failed call as a person or a script needs it: the code, the message, every field violation
/// and the stable reason, so that the input can be fixed and causes told apart.
pub fn describe(status: &tonic::Status) -> String {
    let mut text = format!("{}: {}", code_name(status.code()), status.message());
    // A transport failure says what failed only in its sources.
    let mut source = std::error::Error::source(status);
    while let Some(cause) = source {
        let _ = write!(text, ": {cause}");
        source = cause.source();
    }
    if let Some(bad) = status.get_details_bad_request() {
        for violation in bad.field_violations {
            let _ = write!(text, "\n  {}: {}", violation.field, violation.description);
        }
    }
    if let Some(info) = status.get_details_error_info() {
        let _ = write!(text, "\n  reason: {} ({})", info.reason, info.domain);
    }
    if let Some(trace) = status
        .metadata()
        .get("x-trace-id")
        .and_then(|v| v.to_str().ok())
    {
        let _ = write!(text, "\n  trace: {trace}");
    }
    text
}

/// `InvalidArgument` as `invalid_argument`: the canonical name other gRPC tools print.
fn code_name(code: tonic::Code) -> String {
    let mut name = String::new();
    for letter in format!("{code:?}").chars() {
        if letter.is_ascii_uppercase() && !name.is_empty() {
            name.push('_');
        }
        name.push(letter.to_ascii_lowercase());
    }
    name
}

/// A failed call, described, with its stable reason.
#[derive(Debug)]
pub struct CallFailed {
    text: String,
    reason: Option<String>,
}

impl std::fmt::Display for CallFailed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.text)
    }
}

impl std::error::Error for CallFailed {}

impl CallFailed {
    /// Whether a command failed because the gateway refused the person's token as expired.
    pub fn token_expired(error: &anyhow::Error) -> bool {
        error.chain().any(|cause| {
            cause
                .downcast_ref::<CallFailed>()
                .is_some_and(|failed| failed.reason.as_deref() == Some("TOKEN_EXPIRED"))
        })
    }
}

/// A failed call as the command's error; `main` prints it to standard error and exits with 1.
pub(crate) fn failed(status: tonic::Status) -> anyhow::Error {
    let reason = status.get_details_error_info().map(|info| info.reason);
    anyhow::Error::new(CallFailed {
        text: describe(&status),
        reason,
    })
}

/// Writes one line to standard output and flushes it, so that a program reading the pipe sees
/// each item as soon as it comes.
pub(crate) fn emit(text: &str) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{text}")?;
    out.flush()?;
    Ok(())
}

/// Writes one JSON value, indented, for a person reading a single answer.
pub(crate) fn emit_pretty(value: &Value) -> anyhow::Result<()> {
    emit(&serde_json::to_string_pretty(value)?)
}

/// Writes a note to standard error, apart from the output a script reads.
pub(crate) fn note(text: &str) {
    let _ = writeln!(std::io::stderr(), "{text}");
}

// ---------------------------------------------------------------------------------------------
// Values of the contract, both ways

/// Parses a member id as certificates and the catalogue write it: `CLASS/CODE/subsystem`, or
/// `CLASS/CODE` for the whole member.
pub fn parse_member(text: &str) -> anyhow::Result<MemberId> {
    let mut parts = text.split('/');
    let (class, code) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let subsystem = parts.next().unwrap_or("");
    if class.is_empty() || code.is_empty() || parts.next().is_some() {
        bail!(
            "`{text}` is not a member id: CLASS/CODE/subsystem, such as {}",
            federation::DEMO_INSTITUTION_MEMBER
        );
    }
    Ok(MemberId {
        member_class: class.to_owned(),
        member_code: code.to_owned(),
        subsystem: subsystem.to_owned(),
    })
}

/// Writes a member id the way [`parse_member`] reads it.
pub fn format_member(member: &MemberId) -> String {
    let whole = format!("{}/{}", member.member_class, member.member_code);
    if member.subsystem.is_empty() {
        whole
    } else {
        format!("{whole}/{}", member.subsystem)
    }
}

/// An application's name from `applications/<id>` or the bare id, as people copy either.
fn application_name(text: &str) -> String {
    if text.starts_with("applications/") {
        text.to_owned()
    } else {
        format!("applications/{text}")
    }
}

/// Parses `--from`/`--to`: RFC 3339, or a date meaning its midnight UTC.
pub fn parse_time(text: &str) -> anyhow::Result<OffsetDateTime> {
    if let Ok(time) = OffsetDateTime::parse(text, &Rfc3339) {
        return Ok(time);
    }
    let date = time::Date::parse(
        text,
        time::macros::format_description!("[year]-[month]-[day]"),
    )
    .with_context(|| format!("`{text}` is neither RFC 3339 nor YYYY-MM-DD"))?;
    Ok(date.midnight().assume_utc())
}

/// A time in the contract's form.
fn timestamp(time: OffsetDateTime) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: time.unix_timestamp(),
        nanos: i32::try_from(time.nanosecond()).unwrap_or(0),
    }
}

/// SHA-256 of a file's bytes, lower-case hex: how the platform fingerprints a scanned paper
/// original, so that the copy kept at the centre can be checked against the application later.
pub fn sha256_file(path: &Path) -> anyhow::Result<String> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    Ok(hex::encode(ring::digest::digest(
        &ring::digest::SHA256,
        &bytes,
    )))
}

/// The request id given, or a fresh UUIDv7 printed to standard error so that a retry after a
/// lost answer can send the same one and get the first answer instead of a duplicate.
pub(crate) fn request_id(given: Option<String>) -> String {
    given.unwrap_or_else(|| {
        let id = uuid::Uuid::now_v7().to_string();
        note(&format!("request id: {id} (retry with --request-id {id})"));
        id
    })
}

/// A contract enum value as a lower-case word (`CHANNEL_AUTHORISED_E_SERVICE` is
/// `authorised_e_service`), as the platform's records and documents name them.
fn word(name: &str, prefix: &str) -> String {
    name.strip_prefix(prefix)
        .unwrap_or(name)
        .to_ascii_lowercase()
}

/// A protobuf time as RFC 3339, or null when absent.
pub(crate) fn time_json(time: Option<&prost_types::Timestamp>) -> Value {
    time.and_then(|time| {
        let nanos = i128::from(time.seconds) * 1_000_000_000 + i128::from(time.nanos);
        OffsetDateTime::from_unix_timestamp_nanos(nanos).ok()
    })
    .and_then(|time| time.format(&Rfc3339).ok())
    .map_or(Value::Null, Value::String)
}

/// A text, or null when empty: proto3 cannot tell an absent text from an empty one.
fn text_json(text: &str) -> Value {
    if text.is_empty() {
        Value::Null
    } else {
        Value::String(text.to_owned())
    }
}

/// A member id as `CLASS/CODE/subsystem`, or null when absent.
fn member_json(member: Option<&MemberId>) -> Value {
    member.map_or(Value::Null, |member| Value::String(format_member(member)))
}

/// A person named in a provenance.
fn identity_json(identity: Option<&routing::Identity>) -> Value {
    let Some(identity) = identity else {
        return Value::Null;
    };
    json!({
        "subject": identity.subject,
        "level": word(identity.level().as_str_name(), "LEVEL_OF_ASSURANCE_"),
        "provider_id": identity.provider_id,
        "country": text_json(&identity.country),
        "auth_time": time_json(identity.auth_time.as_ref()),
    })
}

/// Where an application came from and who stands behind it.
fn provenance_json(provenance: Option<&routing::Provenance>) -> Value {
    let Some(p) = provenance else {
        return Value::Null;
    };
    let document = match p.identity_document() {
        IdentityDocument::Unspecified => Value::Null,
        document => Value::String(word(document.as_str_name(), "IDENTITY_DOCUMENT_")),
    };
    json!({
        "channel": word(p.channel().as_str_name(), "CHANNEL_"),
        "submitted_by": member_json(p.submitted_by.as_ref()),
        "centre_id": text_json(&p.centre_id),
        "clerk": identity_json(p.clerk.as_ref()),
        "applicant": identity_json(p.applicant.as_ref()),
        "mandate": p.mandate.as_ref().map_or(Value::Null, |m| json!({
            "mandate_id": m.mandate_id,
            "authorisation_sha256": m.authorisation_sha256,
        })),
        "paper_original_sha256": text_json(&p.paper_original_sha256),
        "identity_document": document,
    })
}

/// A receipt: the proof of what was filed, when, and where it went.
pub fn receipt_json(receipt: Option<&routing::Receipt>) -> Value {
    let Some(receipt) = receipt else {
        return Value::Null;
    };
    json!({
        "application": receipt.application,
        "content_sha256": receipt.content_sha256,
        "accept_time": time_json(receipt.accept_time.as_ref()),
        "destination": member_json(receipt.destination.as_ref()),
    })
}

/// An application without its history, the data as JSON rather than text, as an institution's
/// system processes it.
pub fn application_json(a: &routing::Application) -> Value {
    // The platform stores only JSON objects; text it could not parse is shown as it is.
    let data = serde_json::from_str(&a.data_json).unwrap_or_else(|_| json!(a.data_json));
    json!({
        "name": a.name,
        "service_id": a.service_id,
        "form_id": a.form_id,
        "form_version": a.form_version,
        "data": data,
        "municipality_code": text_json(&a.municipality_code),
        "destination": member_json(a.destination.as_ref()),
        "status": word(a.status().as_str_name(), "APPLICATION_STATUS_"),
        "provenance": provenance_json(a.provenance.as_ref()),
        "receipt": receipt_json(a.receipt.as_ref()),
    })
}

/// One step of an application's status; the decision by its fingerprint, not its bytes.
pub fn change_json(change: &routing::StatusChange) -> Value {
    json!({
        "status": word(change.status().as_str_name(), "APPLICATION_STATUS_"),
        "note": change.note,
        "time": time_json(change.time.as_ref()),
        "by": member_json(change.by.as_ref()),
        "decision": change.decision.as_ref().map_or(Value::Null, |d| json!({
            "title": d.title,
            "media_type": d.media_type,
            "content_sha256": d.content_sha256,
        })),
    })
}

/// One delivery, as a consumer prints it on one line.
pub fn delivery_json(delivery: &routing::Delivery) -> Value {
    json!({
        "delivery_id": delivery.delivery_id,
        "attempt": delivery.attempt,
        "lease_expire_time": time_json(delivery.lease_expire_time.as_ref()),
        "application": delivery.application.as_ref().map_or(Value::Null, application_json),
    })
}

// ---------------------------------------------------------------------------------------------
// onestop submit

/// Submit an application.
#[derive(clap::Args)]
pub struct SubmitArgs {
    #[command(flatten)]
    connection: Connection,
    /// The catalogue service, such as `vsaa-old-age-pension`.
    #[arg(long)]
    service: String,
    /// The form version the data fills in, such as `1`.
    #[arg(long)]
    form_version: String,
    /// A file holding the form's data: one JSON object.
    #[arg(long)]
    data: PathBuf,
    /// The applicant's municipality code, which chooses the route (such as `gulbene`).
    #[arg(long)]
    municipality: Option<String>,
    /// This request's id; a retry with the same id returns the first answer (default: a new
    /// UUIDv7, printed to standard error).
    #[arg(long)]
    request_id: Option<String>,
    #[command(flatten)]
    paper: PaperArgs,
}

/// Paper intake at a centre's desk: all three options, or none.
#[derive(clap::Args)]
struct PaperArgs {
    /// Paper intake: the resident's Latvian personal code, as the clerk identified them.
    #[arg(long, requires_all = ["paper_original", "identity_document"])]
    paper_resident: Option<String>,
    /// Paper intake: the scanned signed paper application (its SHA-256 is sent).
    #[arg(long, requires_all = ["paper_resident", "identity_document"])]
    paper_original: Option<PathBuf>,
    /// Paper intake: the identity document the clerk checked.
    #[arg(long, value_enum, requires_all = ["paper_resident", "paper_original"])]
    identity_document: Option<Document>,
}

/// An identity document a clerk checks at the desk.
#[derive(Clone, Copy, clap::ValueEnum)]
enum Document {
    Passport,
    IdCard,
    ResidencePermit,
}

impl PaperArgs {
    /// The paper intake, when the options name one.
    fn intake(&self) -> anyhow::Result<Option<routing::PaperIntake>> {
        let (Some(resident), Some(original), Some(document)) = (
            &self.paper_resident,
            &self.paper_original,
            self.identity_document,
        ) else {
            return Ok(None);
        };
        let document = match document {
            Document::Passport => IdentityDocument::Passport,
            Document::IdCard => IdentityDocument::IdCard,
            Document::ResidencePermit => IdentityDocument::ResidencePermit,
        };
        Ok(Some(routing::PaperIntake {
            resident: Some(PersonId {
                scheme: PersonIdScheme::LvPersonalCode.into(),
                value: resident.clone(),
            }),
            identity_document: document.into(),
            paper_original_sha256: sha256_file(original)?,
        }))
    }
}

/// Reads the form's data and returns the file's text unchanged (the platform hashes its own
/// canonical form); checking it is a JSON object here gives a clearer error than the server's.
fn read_object(path: &Path) -> anyhow::Result<String> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let value: Value =
        serde_json::from_str(&text).with_context(|| format!("{} is not JSON", path.display()))?;
    if !value.is_object() {
        bail!(
            "{} must hold one JSON object, the form's data",
            path.display()
        );
    }
    Ok(text)
}

/// `onestop submit`: files the application and prints its receipt.
pub async fn submit(args: SubmitArgs) -> anyhow::Result<()> {
    let data_json = read_object(&args.data)?;
    let paper_intake = args.paper.intake()?;
    let mut client = ApplicationServiceClient::new(args.connection.open().await?);
    let request = routing::SubmitApplicationRequest {
        request_id: request_id(args.request_id),
        service_id: args.service,
        form_version: args.form_version,
        data_json,
        municipality_code: args.municipality.unwrap_or_default(),
        paper_intake,
    };
    let answer = client.submit_application(request).await.map_err(failed)?;
    emit_pretty(&receipt_json(answer.into_inner().receipt.as_ref()))
}

// ---------------------------------------------------------------------------------------------
// onestop inbox

/// What an institution's system does with its inbox.
#[derive(clap::Subcommand)]
pub enum InboxCommand {
    /// Hold a stream open: print each delivery as one JSON line, then acknowledge it.
    Consume(ConsumeArgs),
    /// Lease deliveries once and print them as JSON lines, for systems that cannot hold a
    /// stream.
    Pull(PullArgs),
    /// List the deliveries parked after too many attempts, as JSON lines.
    Parked(InboxArgs),
    /// Put parked deliveries back in the inbox; prints the ids released.
    Release(ReleaseArgs),
}

/// The inbox and how to reach it.
#[derive(clap::Args)]
pub struct InboxArgs {
    #[command(flatten)]
    connection: Connection,
    /// The inbox: the subsystem of the certificate, CLASS/CODE/subsystem.
    #[arg(long, value_parser = parse_member)]
    inbox: MemberId,
}

/// Consume an inbox.
#[derive(clap::Args)]
pub struct ConsumeArgs {
    #[command(flatten)]
    target: InboxArgs,
    /// Deliveries the platform may send before earlier ones are acknowledged (1-1000).
    #[arg(long, default_value_t = 10)]
    max_unacknowledged: u32,
    /// Stop after this many deliveries.
    #[arg(long)]
    count: Option<u64>,
    /// Only print: unacknowledged deliveries are delivered again when the stream ends.
    #[arg(long)]
    no_ack: bool,
}

/// Lease deliveries once.
#[derive(clap::Args)]
pub struct PullArgs {
    #[command(flatten)]
    target: InboxArgs,
    /// At most this many deliveries (1-100).
    #[arg(long, default_value_t = 10)]
    max: u32,
    /// Acknowledge them once printed.
    #[arg(long)]
    ack: bool,
}

/// Release parked deliveries.
#[derive(clap::Args)]
pub struct ReleaseArgs {
    #[command(flatten)]
    target: InboxArgs,
    /// The parked deliveries' ids.
    #[arg(required = true)]
    delivery_ids: Vec<String>,
}

/// `onestop inbox ...`.
pub async fn inbox(command: InboxCommand) -> anyhow::Result<()> {
    match command {
        InboxCommand::Consume(args) => consume(args).await,
        InboxCommand::Pull(args) => pull(args).await,
        InboxCommand::Parked(args) => parked(args).await,
        InboxCommand::Release(args) => release(args).await,
    }
}

/// Says which acknowledgements the platform refused; they will be delivered again.
fn report_refused(result: &routing::AckResult) {
    for refused in &result.refused {
        note(&format!(
            "delivery {} not acknowledged: {}",
            refused.delivery_id, refused.reason
        ));
    }
}

/// One consumer stream: what it has printed and which acknowledgements await their answer.
struct Consumer {
    requests: mpsc::Sender<routing::StreamInboxRequest>,
    ack: bool,
    count: Option<u64>,
    received: u64,
    pending_acks: u64,
}

impl Consumer {
    /// Done once `--count` deliveries are printed and every acknowledgement answered, so that
    /// ending the stream loses none of them.
    fn done(&self) -> bool {
        self.pending_acks == 0 && self.count.is_some_and(|count| self.received >= count)
    }

    /// Prints a delivery and acknowledges it, or takes an acknowledgement's answer.
    async fn handle(&mut self, message: routing::StreamInboxResponse) -> anyhow::Result<()> {
        match message.kind {
            Some(stream_inbox_response::Kind::Delivery(delivery)) => {
                // Past the count: left unacknowledged, delivered again when the stream ends.
                if self.count.is_some_and(|count| self.received >= count) {
                    return Ok(());
                }
                emit(&delivery_json(&delivery).to_string())?;
                self.received += 1;
                if self.ack {
                    let ack = routing::Acknowledge {
                        delivery_ids: vec![delivery.delivery_id],
                    };
                    self.send(stream_inbox_request::Kind::Ack(ack)).await?;
                    self.pending_acks += 1;
                }
            }
            Some(stream_inbox_response::Kind::AckResult(result)) => {
                self.pending_acks = self.pending_acks.saturating_sub(1);
                report_refused(&result);
            }
            None => {}
        }
        Ok(())
    }

    /// Sends a message on the request stream.
    async fn send(&self, kind: stream_inbox_request::Kind) -> anyhow::Result<()> {
        let request = routing::StreamInboxRequest { kind: Some(kind) };
        self.requests
            .send(request)
            .await
            .map_err(|_| anyhow::anyhow!("the inbox stream has closed"))
    }
}

/// `onestop inbox consume`: until `--count` deliveries, Ctrl-C or SIGTERM. Dropping the stream
/// ends it; whatever was not acknowledged goes back to the inbox at once.
pub async fn consume(args: ConsumeArgs) -> anyhow::Result<()> {
    let mut client = InboxServiceClient::new(args.target.connection.open().await?);
    let (requests, receiver) = mpsc::channel(16);
    // No more in flight than will be printed, so that fewer are delivered only to go back.
    let window = args.count.map_or(args.max_unacknowledged, |count| {
        let count = u32::try_from(count).unwrap_or(u32::MAX);
        args.max_unacknowledged.min(count).max(1)
    });
    let mut consumer = Consumer {
        requests,
        ack: !args.no_ack,
        count: args.count,
        received: 0,
        pending_acks: 0,
    };
    let open = routing::OpenInbox {
        inbox: Some(args.target.inbox),
        max_unacknowledged: window,
    };
    consumer
        .send(stream_inbox_request::Kind::Open(open))
        .await?;
    let mut responses = client
        .stream_inbox(ReceiverStream::new(receiver))
        .await
        .map_err(failed)?
        .into_inner();
    let stop = onestop_platform::shutdown_signal();
    tokio::pin!(stop);
    while !consumer.done() {
        let message = tokio::select! {
            () = &mut stop => return Ok(()),
            message = responses.message() => message.map_err(failed)?,
        };
        let Some(message) = message else {
            bail!("the platform ended the inbox stream");
        };
        consumer.handle(message).await?;
    }
    Ok(())
}

/// `onestop inbox pull`.
pub async fn pull(args: PullArgs) -> anyhow::Result<()> {
    let mut client = InboxServiceClient::new(args.target.connection.open().await?);
    let inbox = args.target.inbox;
    let request = routing::PullDeliveriesRequest {
        inbox: Some(inbox.clone()),
        max_deliveries: args.max,
    };
    let deliveries = client
        .pull_deliveries(request)
        .await
        .map_err(failed)?
        .into_inner()
        .deliveries;
    for delivery in &deliveries {
        emit(&delivery_json(delivery).to_string())?;
    }
    if !args.ack || deliveries.is_empty() {
        return Ok(());
    }
    let request = routing::AckDeliveriesRequest {
        inbox: Some(inbox),
        delivery_ids: deliveries.into_iter().map(|d| d.delivery_id).collect(),
    };
    let answer = client.ack_deliveries(request).await.map_err(failed)?;
    report_refused(&answer.into_inner().result.unwrap_or_default());
    Ok(())
}

/// `onestop inbox parked`: every page.
pub async fn parked(args: InboxArgs) -> anyhow::Result<()> {
    let mut client = InboxServiceClient::new(args.connection.open().await?);
    let mut page_token = String::new();
    loop {
        let request = routing::ListParkedDeliveriesRequest {
            inbox: Some(args.inbox.clone()),
            // The largest page the platform serves.
            page_size: i32::try_from(onestop_platform::paging::MAX_PAGE_SIZE).unwrap_or(100),
            page_token,
        };
        let page = client
            .list_parked_deliveries(request)
            .await
            .map_err(failed)?
            .into_inner();
        for parked in &page.deliveries {
            let line = json!({
                "delivery_id": parked.delivery_id,
                "application": parked.application,
                "attempts": parked.attempts,
                "park_time": time_json(parked.park_time.as_ref()),
            });
            emit(&line.to_string())?;
        }
        if page.next_page_token.is_empty() {
            return Ok(());
        }
        page_token = page.next_page_token;
    }
}

/// `onestop inbox release`: prints each id released; says which were not parked here.
pub async fn release(args: ReleaseArgs) -> anyhow::Result<()> {
    let mut client = InboxServiceClient::new(args.target.connection.open().await?);
    let request = routing::ReleaseParkedDeliveriesRequest {
        inbox: Some(args.target.inbox),
        delivery_ids: args.delivery_ids.clone(),
    };
    let released = client
        .release_parked_deliveries(request)
        .await
        .map_err(failed)?
        .into_inner()
        .released;
    for id in &released {
        emit(id)?;
    }
    for id in args.delivery_ids.iter().filter(|id| !released.contains(id)) {
        note(&format!("delivery {id} is not parked in this inbox"));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// onestop status

/// Read an application or move its status.
#[derive(clap::Subcommand)]
pub enum StatusCommand {
    /// Move an application to its next status (only its destination may); prints the step.
    Set(StatusSetArgs),
    /// Print an application with its status history.
    Get(StatusGetArgs),
}

/// The statuses an institution moves an application to.
#[derive(Clone, Copy, clap::ValueEnum)]
enum StatusArg {
    Received,
    InProgress,
    MoreInformationNeeded,
    Decided,
    Closed,
}

impl StatusArg {
    /// The contract's value.
    fn contract(self) -> routing::ApplicationStatus {
        match self {
            StatusArg::Received => routing::ApplicationStatus::Received,
            StatusArg::InProgress => routing::ApplicationStatus::InProgress,
            StatusArg::MoreInformationNeeded => routing::ApplicationStatus::MoreInformationNeeded,
            StatusArg::Decided => routing::ApplicationStatus::Decided,
            StatusArg::Closed => routing::ApplicationStatus::Closed,
        }
    }
}

/// Move an application's status.
#[derive(clap::Args)]
pub struct StatusSetArgs {
    #[command(flatten)]
    connection: Connection,
    /// The application, `applications/<id>`.
    #[arg(long)]
    application: String,
    /// The next status.
    #[arg(long, value_enum)]
    status: StatusArg,
    /// Why, or what is needed from the applicant.
    #[arg(long, default_value = "")]
    note: String,
    /// A decision document to attach (at most 1 MiB).
    #[arg(long, requires = "decision_title")]
    decision: Option<PathBuf>,
    /// The decision document's title.
    #[arg(long, requires = "decision")]
    decision_title: Option<String>,
    /// The decision document's media type.
    #[arg(long, default_value = "application/pdf")]
    decision_media_type: String,
    /// This request's id, as for `submit`.
    #[arg(long)]
    request_id: Option<String>,
}

impl StatusSetArgs {
    /// The decision document, when one is given.
    fn decision(&self) -> anyhow::Result<Option<routing::Decision>> {
        let (Some(path), Some(title)) = (&self.decision, &self.decision_title) else {
            return Ok(None);
        };
        let content = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        Ok(Some(routing::Decision {
            title: title.clone(),
            media_type: self.decision_media_type.clone(),
            content,
            content_sha256: String::new(),
        }))
    }
}

/// Read an application.
#[derive(clap::Args)]
pub struct StatusGetArgs {
    #[command(flatten)]
    connection: Connection,
    /// The application, `applications/<id>`.
    #[arg(long)]
    application: String,
}

/// `onestop status ...`.
pub async fn status(command: StatusCommand) -> anyhow::Result<()> {
    match command {
        StatusCommand::Set(args) => set_status(args).await,
        StatusCommand::Get(args) => get_status(args).await,
    }
}

/// `onestop status set`.
async fn set_status(args: StatusSetArgs) -> anyhow::Result<()> {
    let decision = args.decision()?;
    let mut client = ApplicationServiceClient::new(args.connection.open().await?);
    let request = routing::UpdateApplicationStatusRequest {
        request_id: request_id(args.request_id),
        name: application_name(&args.application),
        status: args.status.contract().into(),
        note: args.note,
        decision,
    };
    let answer = client
        .update_application_status(request)
        .await
        .map_err(failed)?;
    let change = answer.into_inner().change.unwrap_or_default();
    emit_pretty(&change_json(&change))
}

/// `onestop status get`.
async fn get_status(args: StatusGetArgs) -> anyhow::Result<()> {
    let mut client = ApplicationServiceClient::new(args.connection.open().await?);
    let request = routing::GetApplicationRequest {
        name: application_name(&args.application),
    };
    let answer = client.get_application(request).await.map_err(failed)?;
    let application = answer.into_inner().application.unwrap_or_default();
    let mut value = application_json(&application);
    value["history"] = application.history.iter().map(change_json).collect();
    emit_pretty(&value)
}

// ---------------------------------------------------------------------------------------------
// onestop stats

/// Service-case statistics.
#[derive(clap::Subcommand)]
pub enum StatsCommand {
    /// Counts and durations of service cases in a period, grouped: JSON lines, or CSV with
    /// `--csv`.
    Export(ExportArgs),
}

/// What statistics are grouped by; declared in the order of the columns.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, clap::ValueEnum)]
enum Dimension {
    Centre,
    Institution,
    Service,
    Channel,
    Kind,
}

impl Dimension {
    /// The contract's value.
    fn contract(self) -> routing::StatisticsDimension {
        match self {
            Dimension::Centre => routing::StatisticsDimension::Centre,
            Dimension::Institution => routing::StatisticsDimension::Institution,
            Dimension::Service => routing::StatisticsDimension::Service,
            Dimension::Channel => routing::StatisticsDimension::Channel,
            Dimension::Kind => routing::StatisticsDimension::Kind,
        }
    }

    /// The column's name.
    fn column(self) -> &'static str {
        match self {
            Dimension::Centre => "centre",
            Dimension::Institution => "institution",
            Dimension::Service => "service",
            Dimension::Channel => "channel",
            Dimension::Kind => "kind",
        }
    }

    /// A row's value in this column.
    fn value(self, row: &routing::StatisticsRow) -> String {
        match self {
            Dimension::Centre => row.centre_id.clone(),
            Dimension::Institution => row.institution.clone(),
            Dimension::Service => row.service.clone(),
            Dimension::Channel => word(row.channel().as_str_name(), "CONTACT_CHANNEL_"),
            Dimension::Kind => word(row.kind().as_str_name(), "CASE_KIND_"),
        }
    }
}

/// Export statistics.
#[derive(clap::Args)]
pub struct ExportArgs {
    #[command(flatten)]
    connection: Connection,
    /// CSV with a header row instead of JSON lines.
    #[arg(long)]
    csv: bool,
    /// Cases starting at or after this: RFC 3339, or YYYY-MM-DD (midnight UTC).
    #[arg(long, value_parser = parse_time)]
    from: OffsetDateTime,
    /// Cases starting before this (at most 366 days after `--from`): RFC 3339, or YYYY-MM-DD;
    /// now when not given.
    #[arg(long, value_parser = parse_time)]
    to: Option<OffsetDateTime>,
    /// Group by these, comma-separated; none gives one total row.
    #[arg(long, value_enum, value_delimiter = ',')]
    group_by: Vec<Dimension>,
}

/// `onestop stats ...`.
pub async fn stats(command: StatsCommand) -> anyhow::Result<()> {
    match command {
        StatsCommand::Export(args) => export(args).await,
    }
}

/// A CSV field, quoted when it holds a comma, a quote or a line break (quotes doubled).
fn csv_field(text: &str) -> String {
    if text.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", text.replace('"', "\"\""))
    } else {
        text.to_owned()
    }
}

/// The mean duration of a group's cases, in seconds.
fn mean_seconds(row: &routing::StatisticsRow) -> f64 {
    if row.cases == 0 {
        0.0
    } else {
        row.total_duration_seconds as f64 / row.cases as f64
    }
}

/// `onestop stats export`: the dimensions in a fixed order, whatever order they were given in.
async fn export(args: ExportArgs) -> anyhow::Result<()> {
    let mut dimensions = args.group_by.clone();
    dimensions.sort();
    dimensions.dedup();
    let mut client = ServiceCaseServiceClient::new(args.connection.open().await?);
    let request = routing::GetServiceCaseStatisticsRequest {
        start_time: Some(timestamp(args.from)),
        end_time: Some(timestamp(args.to.unwrap_or_else(OffsetDateTime::now_utc))),
        group_by: dimensions.iter().map(|d| d.contract().into()).collect(),
    };
    let answer = client
        .get_service_case_statistics(request)
        .await
        .map_err(failed)?;
    let rows = with_total(&dimensions, answer.into_inner().rows);
    if args.csv {
        write_csv(&dimensions, &rows)
    } else {
        write_json_lines(&dimensions, &rows)
    }
}

/// The rows, and without grouping always the one total row, of zero cases when there were none
/// (the platform returns no groups then), so that a script reads a count either way.
fn with_total(
    dimensions: &[Dimension],
    mut rows: Vec<routing::StatisticsRow>,
) -> Vec<routing::StatisticsRow> {
    if dimensions.is_empty() && rows.is_empty() {
        rows.push(routing::StatisticsRow::default());
    }
    rows
}

/// The rows as CSV with a header row.
fn write_csv(dimensions: &[Dimension], rows: &[routing::StatisticsRow]) -> anyhow::Result<()> {
    let mut header: Vec<&str> = dimensions.iter().map(|d| d.column()).collect();
    header.extend(["cases", "total_duration_seconds", "mean_duration_seconds"]);
    emit(&header.join(","))?;
    for row in rows {
        let mut fields: Vec<String> = dimensions
            .iter()
            .map(|d| csv_field(&d.value(row)))
            .collect();
        fields.push(row.cases.to_string());
        fields.push(row.total_duration_seconds.to_string());
        fields.push(format!("{:.1}", mean_seconds(row)));
        emit(&fields.join(","))?;
    }
    Ok(())
}

/// The rows as JSON lines, with the same names as the CSV columns.
fn write_json_lines(
    dimensions: &[Dimension],
    rows: &[routing::StatisticsRow],
) -> anyhow::Result<()> {
    for row in rows {
        let mut line = serde_json::Map::new();
        for dimension in dimensions {
            line.insert(dimension.column().into(), dimension.value(row).into());
        }
        line.insert("cases".into(), row.cases.into());
        line.insert(
            "total_duration_seconds".into(),
            row.total_duration_seconds.into(),
        );
        let mean = (mean_seconds(row) * 10.0).round() / 10.0;
        line.insert("mean_duration_seconds".into(), mean.into());
        emit(&Value::Object(line).to_string())?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::{CommandFactory, Parser};

    use super::*;

    /// The client commands as `main.rs` mounts them.
    #[derive(Parser)]
    enum Cli {
        Submit(SubmitArgs),
        Inbox {
            #[command(subcommand)]
            command: InboxCommand,
        },
        Status {
            #[command(subcommand)]
            command: StatusCommand,
        },
        Stats {
            #[command(subcommand)]
            command: StatsCommand,
        },
    }

    fn parse(line: &str) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("onestop").chain(line.split_whitespace()))
    }

    #[test]
    fn the_arguments_are_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn submit_takes_paper_intake_whole_or_not_at_all() {
        let Cli::Submit(args) =
            parse("submit --service s --form-version 1 --data d.json --as demo-institution")
                .unwrap()
        else {
            panic!("not submit");
        };
        assert_eq!(args.connection.name, "demo-institution");
        assert!(args.paper.intake().unwrap().is_none());
        let partial = "submit --service s --form-version 1 --data d.json --paper-resident x";
        assert!(parse(partial).is_err());
        let whole = format!("{partial} --paper-original p.pdf --identity-document id-card");
        assert!(parse(&whole).is_ok());
    }

    #[test]
    fn inboxes_statuses_and_dimensions_parse() {
        let Cli::Inbox {
            command: InboxCommand::Consume(args),
        } = parse("inbox consume --inbox GOV/VSAA/pensions --count 1 --no-ack").unwrap()
        else {
            panic!("not consume");
        };
        assert_eq!(args.target.inbox.subsystem, "pensions");
        assert!(args.no_ack && args.count == Some(1) && args.max_unacknowledged == 10);
        assert!(parse("inbox consume --inbox GOV").is_err());
        assert!(parse("inbox release --inbox GOV/VSAA/pensions").is_err());
        let Cli::Status {
            command: StatusCommand::Set(args),
        } = parse("status set --application a --status in-progress").unwrap()
        else {
            panic!("not status set");
        };
        assert!(matches!(args.status, StatusArg::InProgress));
        assert_eq!(application_name(&args.application), "applications/a");
        assert!(parse("status set --application a --status decided --decision d.pdf").is_err());
        let Cli::Stats {
            command: StatsCommand::Export(args),
        } = parse("stats export --from 2026-01-01 --to 2026-02-01 --group-by kind,centre").unwrap()
        else {
            panic!("not stats export");
        };
        assert_eq!(args.group_by, [Dimension::Kind, Dimension::Centre]);
    }

    #[test]
    fn member_ids_parse_and_format_the_same_way() {
        let member = parse_member("GOV/VSAA/pensions").unwrap();
        assert_eq!(member.subsystem, "pensions");
        assert_eq!(format_member(&member), "GOV/VSAA/pensions");
        assert_eq!(
            format_member(&parse_member("MUN/GULBENE").unwrap()),
            "MUN/GULBENE"
        );
        for bad in ["", "GOV", "GOV//x", "/VSAA/x", "GOV/VSAA/a/b"] {
            assert!(parse_member(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn without_grouping_there_is_always_a_total_row() {
        let total = with_total(&[], Vec::new());
        assert_eq!(total.len(), 1);
        assert_eq!((total[0].cases, total[0].total_duration_seconds), (0, 0));
        assert!(with_total(&[Dimension::Centre], Vec::new()).is_empty());
        let one = routing::StatisticsRow {
            cases: 3,
            ..Default::default()
        };
        assert_eq!(with_total(&[], vec![one.clone()]), vec![one]);
    }

    #[test]
    fn csv_fields_are_quoted_only_when_needed() {
        assert_eq!(csv_field("gulbene-kac"), "gulbene-kac");
        assert_eq!(csv_field("topic:a, b"), "\"topic:a, b\"");
        assert_eq!(csv_field("say \"hi\""), "\"say \"\"hi\"\"\"");
    }

    #[test]
    fn times_are_rfc_3339_or_dates_at_midnight_utc() {
        let date = parse_time("2026-01-31").unwrap();
        assert_eq!(date.format(&Rfc3339).unwrap(), "2026-01-31T00:00:00Z");
        let time = parse_time("2026-01-31T12:30:00+02:00").unwrap();
        assert_eq!(
            time_json(Some(&timestamp(time))),
            json!("2026-01-31T10:30:00Z")
        );
        assert!(parse_time("31.01.2026").is_err());
    }

    #[test]
    fn codes_and_enum_values_read_as_words() {
        assert_eq!(code_name(tonic::Code::InvalidArgument), "invalid_argument");
        assert_eq!(code_name(tonic::Code::Ok), "ok");
        let channel = routing::Channel::AuthorisedEService.as_str_name();
        assert_eq!(word(channel, "CHANNEL_"), "authorised_e_service");
    }
}
