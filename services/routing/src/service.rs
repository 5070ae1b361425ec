//! The use cases of routing and who may do what: the catalogue, submission with provenance,
//! reading applications, status steps, service cases and statistics, and the inbox operations
//! [`crate::inbox`] builds its streams on.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use onestop_platform::caller::Caller;
use onestop_platform::db::StoreError;
use onestop_platform::identity::{Member, Principal};
use onestop_platform::person::{self, EidasId, Level};
use onestop_platform::requests::{Request, Requests};
use onestop_platform::status::echo;
use onestop_platform::tokens::{Claims, Staff, Subject};
use ring::digest::{SHA256, digest};
use time::OffsetDateTime;
use tracing::Instrument;

use crate::catalogue::{self, Catalogue, CatalogueFile, Centre, Destination, EntryError, Service};
use crate::error::RoutingError;
use crate::forms::Forms;
use crate::model::{
    Application, CaseKind, Channel, ContactChannel, Decision, Delivery, Dimension, Identity,
    MandateReference, Parked, Provenance, ServiceCase, StatisticsRow, Status, StatusChange,
};
use crate::store::{Notification, Store};
use onestop_platform::inbox::{AckOutcome, Inboxes};

/// The largest application data, in bytes.
pub const MAX_DATA_BYTES: usize = 256 * 1024;
/// The longest status note, in characters.
pub const MAX_NOTE_CHARS: usize = 2_000;
/// The largest decision document, in bytes.
pub const MAX_DECISION_BYTES: usize = 1024 * 1024;
/// The longest a service case may last.
pub const MAX_CASE: Duration = Duration::from_secs(24 * 3600);
/// The longest statistics period.
pub const MAX_PERIOD: Duration = Duration::from_secs(366 * 24 * 3600);
/// Most ids in one acknowledgement or release.
pub const MAX_IDS: usize = 1_000;

/// How deliveries are leased.
#[derive(Clone, Copy, Debug)]
pub struct Leases {
    /// How long a delivery stays with a consumer unacknowledged.
    pub lease: Duration,
    /// Deliveries before an application is parked.
    pub max_attempts: u32,
}

/// Paper intake: the resident at the desk.
#[derive(Clone, Debug)]
pub struct PaperIntake {
    /// The resident's subject (`lv:...` or `eidas:...`).
    pub resident: String,
    /// The identity document checked.
    pub identity_document: String,
    /// SHA-256 of the scanned original, hex.
    pub paper_original_sha256: String,
}

/// An application as submitted.
#[derive(Clone, Debug)]
pub struct Submission {
    /// The catalogue service.
    pub service_id: String,
    /// The form version.
    pub form_version: String,
    /// The data, JSON.
    pub data_json: String,
    /// The applicant's municipality code.
    pub municipality_code: String,
    /// Set for paper intake.
    pub paper_intake: Option<PaperIntake>,
}

/// A status step as asked.
#[derive(Clone, Debug)]
pub struct StatusStep {
    /// The next status.
    pub status: Status,
    /// Why.
    pub note: String,
    /// A decision document (title, media type, content).
    pub decision: Option<(String, String, Vec<u8>)>,
}

/// The routing service.
pub struct Routing {
    store: Store,
    requests: Requests,
    forms: Forms,
    operators: Vec<Member>,
    leases: Leases,
    catalogue: RwLock<Arc<Catalogue>>,
    inboxes: Arc<Inboxes>,
    decided: Arc<tokio::sync::Notify>,
}

impl std::fmt::Debug for Routing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Routing").finish_non_exhaustive()
    }
}

/// The lower-case hex SHA-256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(digest(&SHA256, bytes))
}

/// JSON with object keys sorted and no insignificant white space: what the receipt's content
/// hash is taken over, whatever the order and spacing the client sent.
pub fn canonical_json(value: &serde_json::Value) -> String {
    fn write(value: &serde_json::Value, out: &mut String) {
        match value {
            serde_json::Value::Object(map) => {
                let mut keys: Vec<&String> = map.keys().collect();
                keys.sort();
                out.push('{');
                for (i, key) in keys.into_iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    out.push_str(&serde_json::Value::String(key.clone()).to_string());
                    out.push(':');
                    write(&map[key], out);
                }
                out.push('}');
            }
            serde_json::Value::Array(items) => {
                out.push('[');
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    write(item, out);
                }
                out.push(']');
            }
            scalar => out.push_str(&scalar.to_string()),
        }
    }
    let mut out = String::new();
    write(value, &mut out);
    out
}

fn new_id() -> String {
    uuid::Uuid::now_v7().to_string()
}

/// The member a caller is; platform components do not file or consume.
fn member_of(caller: &Caller) -> Result<&Member, RoutingError> {
    match &caller.identity.principal {
        Principal::Member(member) => Ok(member),
        Principal::Platform(component) => Err(RoutingError::denied(
            "MEMBER_REQUIRED",
            format!("the platform component `{component}` is not a member system"),
        )),
    }
}

fn identity_of(claims: &Claims) -> Identity {
    Identity {
        subject: claims.sub.clone(),
        level: claims.auth.level,
        provider_id: claims.auth.provider.clone(),
        country: claims.auth.country.clone(),
        auth_time: claims.auth.time,
    }
}

fn entry_error(error: EntryError) -> RoutingError {
    match error {
        EntryError::Invalid(fields) => RoutingError::Invalid(fields),
        EntryError::Missing(what) => RoutingError::refused("CATALOGUE_ENTRY_MISSING", what),
    }
}

impl Routing {
    /// The service over its store, with the catalogue loaded: the entries of `file` are put in
    /// (replacing those with the same ids); an empty store without a file gets the built-in
    /// seed.
    pub async fn open(
        store: Store,
        requests: Requests,
        forms: Forms,
        operators: Vec<Member>,
        leases: Leases,
        file: Option<CatalogueFile>,
    ) -> Result<Self, RoutingError> {
        let routing = Self {
            store,
            requests,
            forms,
            operators,
            leases,
            catalogue: RwLock::new(Arc::new(Catalogue::default())),
            inboxes: Arc::new(Inboxes::default()),
            decided: Arc::new(tokio::sync::Notify::new()),
        };
        let stored = routing.load_catalogue().await?;
        let file = match file {
            Some(file) => Some(file),
            None if stored.services.is_empty() && stored.destinations.is_empty() => Some(
                CatalogueFile::parse(catalogue::SEED)
                    .map_err(|e| RoutingError::Internal(format!("the seed catalogue: {e}")))?,
            ),
            None => None,
        };
        if let Some(file) = file {
            let mut merged = stored;
            let mut entries = Vec::new();
            for d in file.destination {
                entries.push(("destination", d.member.clone(), to_json(&d)?));
                merged.put_destination(d).map_err(entry_error)?;
            }
            for s in file.service {
                entries.push(("service", s.id.clone(), to_json(&s)?));
                merged.put_service(s).map_err(entry_error)?;
            }
            for c in file.centre {
                entries.push(("centre", c.id.clone(), to_json(&c)?));
                merged.put_centre(c).map_err(entry_error)?;
            }
            routing
                .store
                .put_catalogue_entries(&entries, onestop_platform::clock::now())
                .await?;
        }
        routing.reload_catalogue().await?;
        Ok(routing)
    }

    /// The store.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The record of requests.
    pub fn requests(&self) -> &Requests {
        &self.requests
    }

    /// The inboxes' wake-ups.
    pub fn inboxes(&self) -> &Arc<Inboxes> {
        &self.inboxes
    }

    /// Notified when a decision's notification is written, for the outbox's drain.
    pub fn decided(&self) -> &Arc<tokio::sync::Notify> {
        &self.decided
    }

    /// How deliveries are leased.
    pub fn leases(&self) -> Leases {
        self.leases
    }

    async fn load_catalogue(&self) -> Result<Catalogue, RoutingError> {
        let mut catalogue = Catalogue::default();
        let corrupt =
            |e: serde_json::Error| RoutingError::Store(StoreError::Corrupt(e.to_string()));
        let entries = self.store.catalogue_entries().await?;
        // Destinations before the services that name them, services before centres.
        for wanted in ["destination", "service", "centre"] {
            for (kind, body) in entries.iter().filter(|(kind, _)| kind == wanted) {
                match kind.as_str() {
                    "destination" => {
                        let d: Destination = serde_json::from_str(body).map_err(corrupt)?;
                        catalogue.destinations.insert(d.member.clone(), d);
                    }
                    "service" => {
                        let s: Service = serde_json::from_str(body).map_err(corrupt)?;
                        catalogue.services.insert(s.id.clone(), s);
                    }
                    _ => {
                        let c: Centre = serde_json::from_str(body).map_err(corrupt)?;
                        catalogue.centres.insert(c.id.clone(), c);
                    }
                }
            }
        }
        Ok(catalogue)
    }

    /// Reads the catalogue from the store again (after a change, or made by another replica).
    pub async fn reload_catalogue(&self) -> Result<(), RoutingError> {
        let catalogue = Arc::new(self.load_catalogue().await?);
        *self
            .catalogue
            .write()
            .map_err(|_| RoutingError::Internal("catalogue lock poisoned".into()))? = catalogue;
        Ok(())
    }

    /// The catalogue as it is now.
    pub fn catalogue(&self) -> Arc<Catalogue> {
        self.catalogue
            .read()
            .map(|c| c.clone())
            .unwrap_or_else(|poisoned| poisoned.into_inner().clone())
    }

    fn is_operator(&self, member: &Member) -> bool {
        self.operators.iter().any(|op| op.same_institution(member))
    }

    fn require_operator(&self, caller: &Caller) -> Result<(), RoutingError> {
        let member = member_of(caller)?;
        if self.is_operator(member) {
            Ok(())
        } else {
            Err(RoutingError::denied(
                "OPERATOR_REQUIRED",
                format!("{member} may not change the catalogue: only the platform's operators may"),
            ))
        }
    }

    /// Creates or replaces a catalogue entry (operators only). `put` checks it against the
    /// rest of the catalogue.
    pub async fn put_entry(
        &self,
        caller: &Caller,
        kind: &'static str,
        id: String,
        body: String,
        put: impl FnOnce(&mut Catalogue) -> Result<(), EntryError>,
    ) -> Result<(), RoutingError> {
        self.require_operator(caller)?;
        let mut catalogue = (*self.catalogue()).clone();
        put(&mut catalogue).map_err(entry_error)?;
        self.store
            .put_catalogue_entries(&[(kind, id, body)], onestop_platform::clock::now())
            .await?;
        self.reload_catalogue().await
    }

    // ---- Submission

    /// Validates, routes and stores an application; returns it as stored (or as stored by
    /// the first request with this id).
    pub async fn submit(
        &self,
        caller: &Caller,
        request: Request,
        submission: Submission,
    ) -> Result<Application, RoutingError> {
        let member = member_of(caller)?.clone();
        if let Some(id) = self.requests.earlier(&request).await? {
            return self.stored(&id).await;
        }
        let catalogue = self.catalogue();
        let service = catalogue
            .services
            .get(&submission.service_id)
            .ok_or_else(|| {
                RoutingError::NotFound(format!(
                    "no service `{}` in the catalogue",
                    echo(&submission.service_id)
                ))
            })?;
        check_submission(&submission)?;
        if !service.form_versions.contains(&submission.form_version) {
            return Err(RoutingError::refused(
                "FORM_VERSION_NOT_ACCEPTED",
                format!(
                    "service `{}` accepts form `{}` versions {:?}, not `{}`",
                    service.id,
                    service.form_id,
                    service.form_versions,
                    echo(&submission.form_version)
                ),
            ));
        }
        let now = onestop_platform::clock::now();
        let provenance = self.provenance(caller, &member, service, &catalogue, &submission, now)?;
        if !service.channels.contains(&provenance.channel) {
            return Err(RoutingError::refused(
                "CHANNEL_NOT_ALLOWED",
                format!(
                    "service `{}` cannot be applied for through the {:?} channel",
                    service.id, provenance.channel
                ),
            ));
        }
        // The data last: the checks above are cheap and need no other service.
        let data: serde_json::Value = serde_json::from_str(&submission.data_json)
            .map_err(|e| RoutingError::invalid("data_json", format!("is not JSON: {e}")))?;
        if !data.is_object() {
            return Err(RoutingError::invalid("data_json", "must be a JSON object"));
        }
        let subject_fields = self
            .forms
            .validate(
                &service.form_id,
                &submission.form_version,
                &submission.data_json,
            )
            .await?;
        check_subject(&data, &subject_fields, provenance.applicant.as_ref())?;
        let id = new_id();
        let application = Application {
            id: id.clone(),
            service_id: service.id.clone(),
            form_id: service.form_id.clone(),
            form_version: submission.form_version.clone(),
            content_sha256: sha256_hex(canonical_json(&data).as_bytes()),
            data_json: submission.data_json,
            municipality_code: submission.municipality_code.clone(),
            destination: service.route(&submission.municipality_code).to_owned(),
            accept_time: now,
            status: Status::Submitted,
            trace_context: onestop_platform::telemetry::current_traceparent(),
            history: vec![StatusChange {
                status: Status::Submitted,
                note: String::new(),
                time: now,
                by: "platform".into(),
                decision: None,
            }],
            provenance,
        };
        let case = self.case_of_submission(&application, service);
        // The one transaction that makes the application accepted, as a span of its own.
        let stored = tracing::info_span!("store.insert_application", onestop.component = "routing");
        match self
            .store
            .insert_application(&application, &new_id(), case.as_ref(), &request)
            .instrument(stored)
            .await
        {
            Ok(()) => {
                self.inboxes.wake(&application.destination);
                Ok(application)
            }
            // A retry with the same id raced this one and won: answer as it did.
            Err(StoreError::Conflict) => match self.requests.earlier(&request).await? {
                Some(id) => self.stored(&id).await,
                None => Err(RoutingError::Internal("application id collision".into())),
            },
            Err(e) => Err(e.into()),
        }
    }

    /// Who stands behind a submission, from the caller's verified person.
    fn provenance(
        &self,
        caller: &Caller,
        member: &Member,
        service: &Service,
        catalogue: &Catalogue,
        submission: &Submission,
        now: OffsetDateTime,
    ) -> Result<Provenance, RoutingError> {
        let mut provenance = Provenance {
            channel: Channel::System,
            submitted_by: member.to_string(),
            centre_id: None,
            clerk: None,
            applicant: None,
            mandate: None,
            paper_original_sha256: None,
            identity_document: None,
        };
        let Some(person) = caller.person.as_deref() else {
            if submission.paper_intake.is_some() {
                return Err(RoutingError::denied(
                    "CLERK_REQUIRED",
                    "paper intake is filed by a clerk: send the clerk's bearer token",
                ));
            }
            return Ok(provenance);
        };
        let level_at_least = |level: Level, who: &str| {
            if level < service.minimum_level {
                Err(RoutingError::refused(
                    "LEVEL_OF_ASSURANCE_TOO_LOW",
                    format!(
                        "service `{}` needs level {} and the {who} logged in at {level}",
                        service.id, service.minimum_level
                    ),
                ))
            } else {
                Ok(())
            }
        };
        if let (Some(actor), Some(mandate)) = (&person.act, &person.mandate) {
            // Authorised e-service: a clerk acting under the resident's mandate.
            if submission.paper_intake.is_some() {
                return Err(RoutingError::invalid(
                    "paper_intake",
                    "is for a clerk's own token, not one acting under a mandate",
                ));
            }
            if !mandate.services.contains(&service.id) {
                return Err(RoutingError::refused(
                    "MANDATE_DOES_NOT_COVER_SERVICE",
                    format!(
                        "mandates/{} does not cover service `{}`",
                        mandate.id, service.id
                    ),
                ));
            }
            level_at_least(person.auth.level, "clerk")?;
            let centre = self.centre_for(catalogue, member, Some(&actor.staff), service)?;
            provenance.channel = Channel::AuthorisedEService;
            provenance.centre_id = Some(centre.id.clone());
            provenance.clerk = Some(Identity {
                subject: actor.sub.clone(),
                ..identity_of(person)
            });
            // The resident was identified in person, against an identity document, when the
            // mandate was registered; the token's login is the clerk's.
            provenance.applicant = Some(Identity {
                subject: person.sub.clone(),
                level: Level::High,
                provider_id: "mandate".into(),
                country: None,
                auth_time: person.auth.time,
            });
            provenance.mandate = Some(MandateReference {
                mandate_id: mandate.id.clone(),
                authorisation_sha256: mandate.authorisation_sha256.clone(),
            });
            return Ok(provenance);
        }
        match person.subject() {
            Ok(Subject::Staff { .. }) => {
                let staff = person.staff.as_ref();
                let Some(intake) = &submission.paper_intake else {
                    return Err(RoutingError::refused(
                        "PAPER_INTAKE_REQUIRED",
                        "a clerk files either a paper intake (paper_intake) or under the \
                         resident's mandate (a token from ExchangeMandate)",
                    ));
                };
                if !staff.is_some_and(|s| s.has_role("clerk")) {
                    return Err(RoutingError::denied(
                        "CLERK_REQUIRED",
                        "only a clerk at a centre takes paper applications",
                    ));
                }
                level_at_least(person.auth.level, "clerk")?;
                let centre = self.centre_for(catalogue, member, staff, service)?;
                provenance.channel = Channel::Centre;
                provenance.centre_id = Some(centre.id.clone());
                provenance.clerk = Some(identity_of(person));
                provenance.applicant = Some(Identity {
                    subject: intake.resident.clone(),
                    // Identified in person against an official document.
                    level: Level::High,
                    provider_id: "desk".into(),
                    country: None,
                    auth_time: now.unix_timestamp(),
                });
                provenance.paper_original_sha256 = Some(intake.paper_original_sha256.clone());
                provenance.identity_document = Some(intake.identity_document.clone());
                Ok(provenance)
            }
            Ok(Subject::Resident(_) | Subject::Foreign(_)) => {
                if submission.paper_intake.is_some() {
                    return Err(RoutingError::denied(
                        "CLERK_REQUIRED",
                        "paper intake is filed by a clerk, not by the resident",
                    ));
                }
                level_at_least(person.auth.level, "resident")?;
                provenance.channel = Channel::Online;
                provenance.applicant = Some(identity_of(person));
                Ok(provenance)
            }
            Err(e) => Err(RoutingError::Internal(format!("verified subject: {e}"))),
        }
    }

    /// The clerk's centre, which must exist and offer the service.
    fn centre_for<'c>(
        &self,
        catalogue: &'c Catalogue,
        desk: &Member,
        staff: Option<&Staff>,
        service: &Service,
    ) -> Result<&'c Centre, RoutingError> {
        let centre = clerk_centre(catalogue, desk, staff)?;
        if !centre.services.contains(&service.id) {
            return Err(RoutingError::refused(
                "SERVICE_NOT_OFFERED_AT_CENTRE",
                format!(
                    "centre `{}` does not take service `{}`",
                    centre.id, service.id
                ),
            ));
        }
        Ok(centre)
    }

    /// A submission made at a centre is a service case there.
    fn case_of_submission(
        &self,
        application: &Application,
        service: &Service,
    ) -> Option<ServiceCase> {
        let p = &application.provenance;
        let kind = match p.channel {
            Channel::Centre => CaseKind::Application,
            Channel::AuthorisedEService => CaseKind::AuthorisedEService,
            Channel::Online | Channel::System => return None,
        };
        Some(ServiceCase {
            id: new_id(),
            centre_id: p.centre_id.clone()?,
            clerk: p.clerk.as_ref()?.subject.clone(),
            service_id: service.id.clone(),
            institution: service.institution.clone(),
            topic: String::new(),
            channel: ContactChannel::InPerson,
            kind,
            start_time: application.accept_time,
            end_time: application.accept_time,
            application_id: Some(application.id.clone()),
        })
    }

    async fn stored(&self, id: &str) -> Result<Application, RoutingError> {
        self.store
            .application(id)
            .await?
            .ok_or_else(|| RoutingError::NotFound(format!("applications/{id} does not exist")))
    }

    // ---- Reading and status

    /// An application, to those who may see it: its applicant, the clerks of the centre it was
    /// filed at, its destination, and the system that filed it on its own.
    pub async fn application(
        &self,
        caller: &Caller,
        id: &str,
    ) -> Result<Application, RoutingError> {
        let member = member_of(caller)?;
        let not_found =
            || RoutingError::NotFound(format!("applications/{} does not exist", echo(id)));
        let application = self.store.application(id).await?.ok_or_else(not_found)?;
        let p = &application.provenance;
        let visible = member.to_string() == application.destination
            || match caller.person.as_deref() {
                Some(person) => {
                    p.applicant
                        .as_ref()
                        .is_some_and(|a| a.subject == person.sub && person.act.is_none())
                        || person
                            .staff
                            .as_ref()
                            .or(person.act.as_ref().map(|actor| &actor.staff))
                            .is_some_and(|staff| {
                                clerk_centre(&self.catalogue(), member, Some(staff))
                                    .is_ok_and(|c| p.centre_id.as_ref() == Some(&c.id))
                            })
                }
                None => p.channel == Channel::System && p.submitted_by == member.to_string(),
            };
        if visible {
            Ok(application)
        } else {
            Err(not_found())
        }
    }

    /// Moves an application to its next status: only its destination, only forward.
    pub async fn change_status(
        &self,
        caller: &Caller,
        request: Request,
        id: &str,
        step: StatusStep,
    ) -> Result<StatusChange, RoutingError> {
        let member = member_of(caller)?.to_string();
        if let Some(done) = self.requests.earlier(&request).await? {
            return self.recorded_change(&done).await;
        }
        check_step(&step)?;
        // To whom it is not visible at all, it does not exist.
        let application = self.application(caller, id).await?;
        if application.destination != member {
            return Err(RoutingError::denied(
                "NOT_THE_DESTINATION",
                format!("only the subsystem applications/{id} was routed to moves its status"),
            ));
        }
        if !application.status.may_become(step.status) {
            return Err(RoutingError::refused(
                "STATUS_STEP_BACKWARDS",
                format!(
                    "applications/{id} is {} and cannot become {}",
                    application.status.as_str(),
                    step.status.as_str()
                ),
            ));
        }
        let now = onestop_platform::clock::now();
        let change = StatusChange {
            status: step.status,
            note: step.note,
            time: now,
            by: member,
            decision: step.decision.map(|(title, media_type, content)| Decision {
                content_sha256: sha256_hex(&content),
                title,
                media_type,
                content,
            }),
        };
        let notification =
            (step.status == Status::Decided).then(|| decision_notice(&application, &change));
        match self
            .store
            .change_status(
                id,
                application.status,
                &change,
                notification.as_ref(),
                &request,
            )
            .await
        {
            Ok(()) => {
                if notification.is_some() {
                    self.decided.notify_one();
                }
                Ok(change)
            }
            Err(StoreError::Conflict) => match self.requests.earlier(&request).await? {
                Some(done) => self.recorded_change(&done).await,
                None => Err(RoutingError::refused(
                    "STATUS_CHANGED_CONCURRENTLY",
                    format!("applications/{id} changed meanwhile; read it and try again"),
                )),
            },
            Err(e) => Err(e.into()),
        }
    }

    /// The step recorded as `<id>#<seq>`.
    async fn recorded_change(&self, done: &str) -> Result<StatusChange, RoutingError> {
        let (id, seq) = done
            .split_once('#')
            .and_then(|(id, seq)| Some((id, seq.parse::<usize>().ok()?)))
            .ok_or_else(|| RoutingError::Internal(format!("request record `{done}`")))?;
        let application = self.stored(id).await?;
        application
            .history
            .get(seq.saturating_sub(1))
            .cloned()
            .ok_or_else(|| RoutingError::Internal(format!("status step {done} is missing")))
    }

    // ---- Inboxes

    /// The inbox the caller may consume: its own subsystem only.
    pub fn own_inbox(&self, caller: &Caller, inbox: &str) -> Result<String, RoutingError> {
        let member = member_of(caller)?;
        let asked =
            Member::parse(inbox).map_err(|e| RoutingError::invalid("inbox", e.to_string()))?;
        if *member != asked {
            return Err(RoutingError::denied(
                "NOT_YOUR_INBOX",
                format!("{member} may not consume the inbox of {asked}"),
            ));
        }
        Ok(asked.to_string())
    }

    /// The inbox whose parked deliveries the caller may handle: its institution's, or any for
    /// an operator.
    pub fn managed_inbox(&self, caller: &Caller, inbox: &str) -> Result<String, RoutingError> {
        let member = member_of(caller)?;
        let asked =
            Member::parse(inbox).map_err(|e| RoutingError::invalid("inbox", e.to_string()))?;
        if asked.subsystem.is_empty() {
            return Err(RoutingError::invalid("inbox", "must name a subsystem"));
        }
        if !member.same_institution(&asked) && !self.is_operator(member) {
            return Err(RoutingError::denied(
                "NOT_YOUR_INBOX",
                format!("{member} may not manage the inbox of {asked}"),
            ));
        }
        Ok(asked.to_string())
    }

    /// Leases up to `limit` deliveries of `inbox` to `consumer`.
    pub async fn claim(
        &self,
        inbox: &str,
        consumer: &str,
        limit: u32,
    ) -> Result<Vec<Delivery>, RoutingError> {
        let now = onestop_platform::clock::now();
        let claimed = self
            .store
            .claim(
                inbox,
                consumer,
                limit,
                now,
                now + self.leases.lease,
                self.leases.max_attempts,
            )
            .await?;
        if !claimed.is_empty() {
            crate::inbox::figures()
                .sent
                .get_or_create(&crate::inbox::destination_label(&self.catalogue(), inbox))
                .inc_by(claimed.len() as u64);
        }
        Ok(claimed)
    }

    /// Acknowledges several acknowledgements' deliveries for `consumer` in one transaction,
    /// answering each acknowledgement apart; `was_sent` says whether this consumer was sent a
    /// delivery (when it knows), to tell a late ack from a stranger's.
    pub async fn ack(
        &self,
        inbox: &str,
        consumer: &str,
        acks: &[Vec<String>],
        was_sent: &(dyn Fn(&str) -> bool + Sync),
    ) -> Result<Vec<Vec<(String, AckOutcome)>>, RoutingError> {
        onestop_platform::inbox::check_acks(acks)
            .map_err(|e| RoutingError::invalid("delivery_ids", e))?;
        let ids: Vec<String> = acks.iter().flatten().cloned().collect();
        let (found, newly) = self
            .store
            .ack_counted(inbox, consumer, &ids, onestop_platform::clock::now())
            .await?;
        if newly > 0 {
            crate::inbox::figures()
                .acknowledged
                .get_or_create(&crate::inbox::destination_label(&self.catalogue(), inbox))
                .inc_by(newly);
        }
        Ok(onestop_platform::inbox::outcomes(acks, found, was_sent))
    }

    /// A page of parked deliveries.
    pub async fn parked(
        &self,
        inbox: &str,
        after: &str,
        limit: u32,
    ) -> Result<Vec<Parked>, RoutingError> {
        Ok(self.store.parked(inbox, after, limit).await?)
    }

    /// Releases parked deliveries, waking the inbox's consumers.
    pub async fn release_parked(
        &self,
        inbox: &str,
        ids: &[String],
    ) -> Result<Vec<String>, RoutingError> {
        if ids.is_empty() || ids.len() > MAX_IDS {
            return Err(RoutingError::invalid(
                "delivery_ids",
                format!("must name 1-{MAX_IDS} deliveries"),
            ));
        }
        let released = self.store.release_parked(inbox, ids).await?;
        if !released.is_empty() {
            self.inboxes.wake(inbox);
        }
        Ok(released)
    }

    // ---- Service cases

    /// Registers a contact at the clerk's centre.
    pub async fn register_case(
        &self,
        caller: &Caller,
        request: Request,
        mut case: ServiceCase,
    ) -> Result<ServiceCase, RoutingError> {
        let member = member_of(caller)?;
        let person = caller.person.as_deref();
        let staff = person.and_then(|p| p.staff.as_ref());
        let catalogue = self.catalogue();
        let centre = clerk_centre(&catalogue, member, staff)?.id.clone();
        if let Some(id) = self.requests.earlier(&request).await? {
            return self.store.case(&id).await?.ok_or_else(|| {
                RoutingError::NotFound(format!("service-cases/{id} does not exist"))
            });
        }
        let mut violations = Vec::new();
        if let Err(why) = onestop_platform::text::check(&case.topic) {
            violations.push(("service_case.topic".into(), why.into()));
        }
        if case.service_id.is_empty() {
            if case.topic.trim().is_empty() || case.topic.chars().count() > 200 {
                violations.push((
                    "service_case.topic".into(),
                    "without a service, a topic of 1-200 characters is required".into(),
                ));
            }
        } else {
            match catalogue.services.get(&case.service_id) {
                Some(service) => case.institution = service.institution.clone(),
                None => {
                    return Err(RoutingError::NotFound(format!(
                        "no service `{}` in the catalogue",
                        echo(&case.service_id)
                    )));
                }
            }
        }
        let now = onestop_platform::clock::now();
        if case.end_time < case.start_time || case.end_time - case.start_time > MAX_CASE {
            violations.push((
                "service_case.end_time".into(),
                "must be after start_time, within 24 hours".into(),
            ));
        }
        if case.start_time > now + Duration::from_secs(300) {
            violations.push(("service_case.start_time".into(), "is in the future".into()));
        }
        if !violations.is_empty() {
            return Err(RoutingError::Invalid(violations));
        }
        case.id = new_id();
        case.centre_id = centre;
        case.clerk = person.map(|p| p.sub.clone()).unwrap_or_default();
        case.application_id = None;
        match self.store.insert_case(&case, &request).await {
            Ok(()) => Ok(case),
            Err(StoreError::Conflict) => match self.requests.earlier(&request).await? {
                Some(id) => self.store.case(&id).await?.ok_or_else(|| {
                    RoutingError::NotFound(format!("service-cases/{id} does not exist"))
                }),
                None => Err(RoutingError::Internal("service case id collision".into())),
            },
            Err(e) => Err(e.into()),
        }
    }

    /// Statistics of a period: every centre for an operator, a municipality's own centres for
    /// the municipality.
    pub async fn statistics(
        &self,
        caller: &Caller,
        from: OffsetDateTime,
        to: OffsetDateTime,
        by: &[Dimension],
    ) -> Result<Vec<StatisticsRow>, RoutingError> {
        let member = member_of(caller)?;
        if to <= from || to - from > MAX_PERIOD {
            return Err(RoutingError::invalid(
                "end_time",
                "must be after start_time, at most 366 days",
            ));
        }
        let centres: Option<Vec<String>> = if self.is_operator(member) {
            None
        } else {
            let own: Vec<String> = self
                .catalogue()
                .centres
                .values()
                .filter(|c| {
                    Member::parse(&c.municipality).is_ok_and(|m| m.same_institution(member))
                })
                .map(|c| c.id.clone())
                .collect();
            if own.is_empty() {
                return Err(RoutingError::denied(
                    "NOT_PERMITTED",
                    format!("{member} runs no centre and is not an operator"),
                ));
            }
            Some(own)
        };
        Ok(self
            .store
            .statistics(from, to, by, centres.as_deref())
            .await?)
    }
}

/// The centre a staff member works at: named by their token, in the catalogue, run by their
/// own institution (a municipality's staff provider vouches for its own centres only) and by
/// the institution of the desk system calling (a municipality's desk files for its own centres
/// only, whoever logs in at it): the centre is what a case is credited to, and municipalities
/// are paid on their centres' cases.
fn clerk_centre<'c>(
    catalogue: &'c Catalogue,
    desk: &Member,
    staff: Option<&Staff>,
) -> Result<&'c Centre, RoutingError> {
    let (staff, id) = staff
        .and_then(|s| Some((s, s.centre.as_deref()?)))
        .ok_or_else(|| {
            RoutingError::denied("CLERK_REQUIRED", "the clerk's token names no centre")
        })?;
    let centre = catalogue.centres.get(id).ok_or_else(|| {
        RoutingError::refused(
            "CENTRE_UNKNOWN",
            format!("centre `{}` is not in the catalogue", echo(id)),
        )
    })?;
    let runner = Member::parse(&centre.municipality).ok();
    let runs_it = runner
        .as_ref()
        .zip(Member::parse(&staff.institution).ok())
        .is_some_and(|(runner, employer)| runner.same_institution(&employer));
    if !runs_it {
        return Err(RoutingError::denied(
            "NOT_THE_CLERKS_CENTRE",
            format!(
                "centre `{}` is run by {}, not by the clerk's institution",
                centre.id, centre.municipality
            ),
        ));
    }
    if !runner.is_some_and(|runner| runner.same_institution(desk)) {
        return Err(RoutingError::denied(
            "NOT_THE_DESKS_CENTRE",
            format!(
                "centre `{}` is run by {}, not by {desk}: a desk files for its own \
                 institution's centres only",
                centre.id, centre.municipality
            ),
        ));
    }
    Ok(centre)
}

fn to_json<T: serde::Serialize>(value: &T) -> Result<String, RoutingError> {
    serde_json::to_string(value).map_err(|e| RoutingError::Internal(e.to_string()))
}

fn check_submission(submission: &Submission) -> Result<(), RoutingError> {
    let mut violations = Vec::new();
    if submission.data_json.len() > MAX_DATA_BYTES {
        violations.push((
            "data_json".into(),
            format!("is larger than {MAX_DATA_BYTES} bytes"),
        ));
    }
    if !submission.municipality_code.is_empty()
        && !catalogue::is_id(&submission.municipality_code, 64)
    {
        violations.push((
            "municipality_code".into(),
            "must be 1-64 lower-case letters, digits and `-`".into(),
        ));
    }
    if let Some(intake) = &submission.paper_intake {
        let hash = &intake.paper_original_sha256;
        if hash.len() != 64
            || !hash
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            violations.push((
                "paper_intake.paper_original_sha256".into(),
                "must be a SHA-256 in lower-case hex (64 characters)".into(),
            ));
        }
    }
    if violations.is_empty() {
        Ok(())
    } else {
        Err(RoutingError::Invalid(violations))
    }
}

/// The data is about the applicant: every subject field of the form version (a JSON Pointer)
/// that the data has names the person the provenance says applies (the resident filing online,
/// the mandator under a mandate, the resident identified at the desk). An application a system
/// files on its own names no person and is not checked.
fn check_subject(
    data: &serde_json::Value,
    subject_fields: &[String],
    applicant: Option<&Identity>,
) -> Result<(), RoutingError> {
    let Some(applicant) = applicant else {
        return Ok(());
    };
    let names_applicant = |value: &serde_json::Value| {
        value.as_str().is_some_and(|text| {
            person::normalize_personal_code(text)
                .map(Subject::Resident)
                .or_else(|_| EidasId::parse(text).map(Subject::Foreign))
                .is_ok_and(|named| named.to_string() == applicant.subject)
        })
    };
    let violations: Vec<(String, String)> = subject_fields
        .iter()
        .filter(|pointer| data.pointer(pointer).is_some_and(|v| !names_applicant(v)))
        .map(|pointer| {
            (
                pointer.clone(),
                "must name the applicant: the person filing the application (under a mandate, \
                 the mandator; at a desk, the resident identified there)"
                    .to_owned(),
            )
        })
        .collect();
    if violations.is_empty() {
        Ok(())
    } else {
        Err(RoutingError::Invalid(violations))
    }
}

fn check_step(step: &StatusStep) -> Result<(), RoutingError> {
    let mut violations = Vec::new();
    if step.note.chars().count() > MAX_NOTE_CHARS {
        violations.push((
            "note".into(),
            format!("is longer than {MAX_NOTE_CHARS} characters"),
        ));
    }
    if let Err(why) = onestop_platform::text::check(&step.note) {
        violations.push(("note".into(), why.into()));
    }
    if let Some((title, media_type, content)) = &step.decision {
        if step.status != Status::Decided {
            violations.push((
                "decision".into(),
                "goes with the DECIDED status only".into(),
            ));
        }
        if title.trim().is_empty() || title.chars().count() > 500 {
            violations.push(("decision.title".into(), "must be 1-500 characters".into()));
        }
        for (field, value) in [
            ("decision.title", title),
            ("decision.media_type", media_type),
        ] {
            if let Err(why) = onestop_platform::text::check(value) {
                violations.push((field.into(), why.into()));
            }
        }
        if media_type.is_empty() || media_type.len() > 100 || !media_type.contains('/') {
            violations.push((
                "decision.media_type".into(),
                "must be a media type such as application/pdf".into(),
            ));
        }
        if content.is_empty() || content.len() > MAX_DECISION_BYTES {
            violations.push((
                "decision.content".into(),
                format!("must be 1-{MAX_DECISION_BYTES} bytes"),
            ));
        }
    }
    if violations.is_empty() {
        Ok(())
    } else {
        Err(RoutingError::Invalid(violations))
    }
}

/// The notice of a decision for the applicant's e-address (or the filing system).
fn decision_notice(application: &Application, change: &StatusChange) -> Notification {
    let p = &application.provenance;
    let payload = serde_json::json!({
        "application": application.name(),
        "service_id": application.service_id,
        "status": change.status.as_str(),
        "note": change.note,
        "time": onestop_platform::db::millis(change.time),
        "by": change.by,
        "decision": change.decision.as_ref().map(|d| serde_json::json!({
            "title": d.title,
            "media_type": d.media_type,
            "content_sha256": d.content_sha256,
        })),
        // The deciding call's trace, which sending the decision later links to.
        "traceparent": onestop_platform::telemetry::current_traceparent(),
    });
    Notification {
        id: new_id(),
        application_id: application.id.clone(),
        recipient: p
            .applicant
            .as_ref()
            .map_or_else(|| p.submitted_by.clone(), |a| a.subject.clone()),
        pickup_centre: p.centre_id.clone().unwrap_or_default(),
        status: change.status,
        payload: payload.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_content_hash_ignores_key_order_and_spacing() {
        let a: serde_json::Value =
            serde_json::from_str(r#"{"b": [1, {"y": 2, "x": "é"}], "a": true}"#)
                .unwrap_or_default();
        let b: serde_json::Value =
            serde_json::from_str(r#"{"a":true,"b":[1,{"x":"é","y":2}]}"#).unwrap_or_default();
        assert_eq!(canonical_json(&a), r#"{"a":true,"b":[1,{"x":"é","y":2}]}"#);
        assert_eq!(canonical_json(&a), canonical_json(&b));
    }
}
