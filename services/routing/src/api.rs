//! The tonic handlers: the contract's messages to and from the domain's, and nothing else.

use std::pin::Pin;
use std::sync::Arc;

use futures_util::{Stream, StreamExt};
use onestop_platform::caller::Caller;
use onestop_platform::clock::{from_timestamp, timestamp};
use onestop_platform::contract::{
    document_of, document_pb, level_of, level_pb, member_of, member_text_pb, subject_of,
};
use onestop_platform::paging;
use onestop_platform::requests::{Fingerprint, Request as Once};
use onestop_proto::routing::v1 as pb;
use onestop_proto::routing::v1::application_service_server::ApplicationService;
use onestop_proto::routing::v1::catalogue_service_server::CatalogueService;
use onestop_proto::routing::v1::inbox_service_server::InboxService;
use onestop_proto::routing::v1::service_case_service_server::ServiceCaseService;
use time::OffsetDateTime;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument;

use crate::catalogue::{self, Tier};
use crate::error::RoutingError;
use crate::model::{
    Application, CaseKind, Channel, ContactChannel, Delivery, Dimension, Identity, ServiceCase,
    Status as AppStatus, StatusChange,
};
use crate::service::{PaperIntake, Routing, StatusStep, Submission};
use onestop_platform::inbox::{self, AckOutcome, Incoming, MAX_WINDOW, Outgoing};

/// The handlers of the four routing services.
#[derive(Clone, Debug)]
pub struct RoutingApi {
    routing: Arc<Routing>,
    shutdown: CancellationToken,
}

impl RoutingApi {
    /// Handlers over the service; open streams end at `shutdown`.
    pub fn new(routing: Arc<Routing>, shutdown: CancellationToken) -> Self {
        Self { routing, shutdown }
    }
}

fn once<T: prost::Message>(
    caller: &Caller,
    request_id: &str,
    method: &'static str,
    message: &T,
) -> Result<Once, RoutingError> {
    Ok(Once::new(
        &caller.request_key(),
        request_id,
        method,
        Fingerprint::of(message),
    )?)
}

fn time_of(
    field: &str,
    t: Option<&prost_types::Timestamp>,
) -> Result<OffsetDateTime, RoutingError> {
    t.and_then(from_timestamp)
        .ok_or_else(|| RoutingError::invalid(field, "a valid time is required"))
}

fn member_field(
    field: &str,
    id: Option<&onestop_proto::r#type::v1::MemberId>,
) -> Result<String, RoutingError> {
    member_of(id)
        .map(|m| m.to_string())
        .map_err(|e| RoutingError::invalid(field, e))
}

// ---- Catalogue

fn channel_pb(channel: Channel) -> i32 {
    (match channel {
        Channel::Online => pb::Channel::Online,
        Channel::Centre => pb::Channel::Centre,
        Channel::AuthorisedEService => pb::Channel::AuthorisedEService,
        Channel::System => pb::Channel::System,
    }) as i32
}

fn channel_of(value: i32) -> Option<Channel> {
    match pb::Channel::try_from(value) {
        Ok(pb::Channel::Online) => Some(Channel::Online),
        Ok(pb::Channel::Centre) => Some(Channel::Centre),
        Ok(pb::Channel::AuthorisedEService) => Some(Channel::AuthorisedEService),
        Ok(pb::Channel::System) => Some(Channel::System),
        _ => None,
    }
}

fn text_pb(lv: &str, en: &str) -> Option<onestop_proto::r#type::v1::LocalizedText> {
    Some(onestop_proto::r#type::v1::LocalizedText {
        lv: lv.to_owned(),
        en: en.to_owned(),
    })
}

fn service_pb(s: &catalogue::Service) -> pb::Service {
    pb::Service {
        service_id: s.id.clone(),
        title: text_pb(&s.title_lv, &s.title_en),
        institution: member_text_pb(&s.institution),
        form_id: s.form_id.clone(),
        form_versions: s.form_versions.clone(),
        minimum_level: level_pb(s.minimum_level),
        channels: s.channels.iter().map(|c| channel_pb(*c)).collect(),
        default_destination: member_text_pb(&s.default_destination),
        routes: s
            .routes
            .iter()
            .map(|r| pb::Route {
                municipality_codes: r.municipalities.clone(),
                destination: member_text_pb(&r.destination),
            })
            .collect(),
    }
}

fn service_of(s: pb::Service) -> Result<catalogue::Service, RoutingError> {
    let title = s.title.unwrap_or_default();
    let mut routes = Vec::with_capacity(s.routes.len());
    for (i, r) in s.routes.into_iter().enumerate() {
        routes.push(catalogue::Route {
            municipalities: r.municipality_codes,
            destination: member_field(
                &format!("service.routes[{i}].destination"),
                r.destination.as_ref(),
            )?,
        });
    }
    let channels = s
        .channels
        .iter()
        .map(|c| {
            channel_of(*c).ok_or_else(|| {
                RoutingError::invalid("service.channels", format!("unknown channel {c}"))
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(catalogue::Service {
        id: s.service_id,
        title_lv: title.lv,
        title_en: title.en,
        institution: member_field("service.institution", s.institution.as_ref())?,
        form_id: s.form_id,
        form_versions: s.form_versions,
        minimum_level: level_of(s.minimum_level)
            .map_err(|e| RoutingError::invalid("service.minimum_level", e))?
            .ok_or_else(|| RoutingError::invalid("service.minimum_level", "is required"))?,
        channels,
        default_destination: member_field(
            "service.default_destination",
            s.default_destination.as_ref(),
        )?,
        routes,
    })
}

fn centre_pb(c: &catalogue::Centre) -> pb::Centre {
    pb::Centre {
        centre_id: c.id.clone(),
        municipality: member_text_pb(&c.municipality),
        municipality_name: c.municipality_name.clone(),
        address: c.address.clone(),
        tier: (match c.tier {
            Tier::Regional => pb::CentreTier::Regional,
            Tier::Local => pb::CentreTier::Local,
        }) as i32,
        service_ids: c.services.clone(),
    }
}

fn centre_of(c: pb::Centre) -> Result<catalogue::Centre, RoutingError> {
    Ok(catalogue::Centre {
        id: c.centre_id,
        municipality: member_field("centre.municipality", c.municipality.as_ref())?,
        municipality_name: c.municipality_name,
        address: c.address,
        tier: match pb::CentreTier::try_from(c.tier) {
            Ok(pb::CentreTier::Regional) => Tier::Regional,
            Ok(pb::CentreTier::Local) => Tier::Local,
            _ => return Err(RoutingError::invalid("centre.tier", "regional or local")),
        },
        services: c.service_ids,
    })
}

fn destination_pb(d: &catalogue::Destination) -> pb::Destination {
    pb::Destination {
        member: member_text_pb(&d.member),
        title: text_pb(&d.title_lv, &d.title_en),
    }
}

#[tonic::async_trait]
impl CatalogueService for RoutingApi {
    async fn get_catalogue(
        &self,
        _request: Request<pb::GetCatalogueRequest>,
    ) -> Result<Response<pb::GetCatalogueResponse>, Status> {
        let catalogue = self.routing.catalogue();
        Ok(Response::new(pb::GetCatalogueResponse {
            services: catalogue.services.values().map(service_pb).collect(),
            centres: catalogue.centres.values().map(centre_pb).collect(),
            destinations: catalogue
                .destinations
                .values()
                .map(destination_pb)
                .collect(),
        }))
    }

    async fn put_service(
        &self,
        request: Request<pb::PutServiceRequest>,
    ) -> Result<Response<pb::PutServiceResponse>, Status> {
        let caller = Caller::of(&request)?.clone();
        let service = service_of(
            request
                .into_inner()
                .service
                .ok_or_else(|| RoutingError::invalid("service", "is required"))?,
        )?;
        let body =
            serde_json::to_string(&service).map_err(|e| RoutingError::Internal(e.to_string()))?;
        let stored = service.clone();
        self.routing
            .put_entry(&caller, "service", service.id.clone(), body, |c| {
                c.put_service(service)
            })
            .await?;
        Ok(Response::new(pb::PutServiceResponse {
            service: Some(service_pb(&stored)),
        }))
    }

    async fn put_centre(
        &self,
        request: Request<pb::PutCentreRequest>,
    ) -> Result<Response<pb::PutCentreResponse>, Status> {
        let caller = Caller::of(&request)?.clone();
        let centre = centre_of(
            request
                .into_inner()
                .centre
                .ok_or_else(|| RoutingError::invalid("centre", "is required"))?,
        )?;
        let body =
            serde_json::to_string(&centre).map_err(|e| RoutingError::Internal(e.to_string()))?;
        let stored = centre.clone();
        self.routing
            .put_entry(&caller, "centre", centre.id.clone(), body, |c| {
                c.put_centre(centre)
            })
            .await?;
        Ok(Response::new(pb::PutCentreResponse {
            centre: Some(centre_pb(&stored)),
        }))
    }

    async fn put_destination(
        &self,
        request: Request<pb::PutDestinationRequest>,
    ) -> Result<Response<pb::PutDestinationResponse>, Status> {
        let caller = Caller::of(&request)?.clone();
        let d = request
            .into_inner()
            .destination
            .ok_or_else(|| RoutingError::invalid("destination", "is required"))?;
        let title = d.title.unwrap_or_default();
        let destination = catalogue::Destination {
            member: member_field("destination.member", d.member.as_ref())?,
            title_lv: title.lv,
            title_en: title.en,
        };
        let body = serde_json::to_string(&destination)
            .map_err(|e| RoutingError::Internal(e.to_string()))?;
        let stored = destination.clone();
        self.routing
            .put_entry(
                &caller,
                "destination",
                destination.member.clone(),
                body,
                |c| c.put_destination(destination),
            )
            .await?;
        Ok(Response::new(pb::PutDestinationResponse {
            destination: Some(destination_pb(&stored)),
        }))
    }
}

// ---- Applications

fn identity_pb(i: &Identity) -> pb::Identity {
    pb::Identity {
        subject: i.subject.clone(),
        level: level_pb(i.level),
        provider_id: i.provider_id.clone(),
        country: i.country.clone().unwrap_or_default(),
        auth_time: Some(prost_types::Timestamp {
            seconds: i.auth_time,
            nanos: 0,
        }),
    }
}

fn status_pb(status: AppStatus) -> i32 {
    (match status {
        AppStatus::Submitted => pb::ApplicationStatus::Submitted,
        AppStatus::Received => pb::ApplicationStatus::Received,
        AppStatus::InProgress => pb::ApplicationStatus::InProgress,
        AppStatus::MoreInformationNeeded => pb::ApplicationStatus::MoreInformationNeeded,
        AppStatus::Decided => pb::ApplicationStatus::Decided,
        AppStatus::Closed => pb::ApplicationStatus::Closed,
    }) as i32
}

fn status_of(value: i32) -> Result<AppStatus, RoutingError> {
    match pb::ApplicationStatus::try_from(value) {
        Ok(pb::ApplicationStatus::Received) => Ok(AppStatus::Received),
        Ok(pb::ApplicationStatus::InProgress) => Ok(AppStatus::InProgress),
        Ok(pb::ApplicationStatus::MoreInformationNeeded) => Ok(AppStatus::MoreInformationNeeded),
        Ok(pb::ApplicationStatus::Decided) => Ok(AppStatus::Decided),
        Ok(pb::ApplicationStatus::Closed) => Ok(AppStatus::Closed),
        _ => Err(RoutingError::invalid(
            "status",
            "received, in progress, more information needed, decided or closed",
        )),
    }
}

fn change_pb(c: &StatusChange) -> pb::StatusChange {
    pb::StatusChange {
        status: status_pb(c.status),
        note: c.note.clone(),
        time: Some(timestamp(c.time)),
        by: member_text_pb(&c.by),
        decision: c.decision.as_ref().map(|d| pb::Decision {
            title: d.title.clone(),
            media_type: d.media_type.clone(),
            content: d.content.clone(),
            content_sha256: d.content_sha256.clone(),
        }),
    }
}

fn receipt_pb(a: &Application) -> pb::Receipt {
    pb::Receipt {
        application: a.name(),
        content_sha256: a.content_sha256.clone(),
        accept_time: Some(timestamp(a.accept_time)),
        destination: member_text_pb(&a.destination),
    }
}

fn application_pb(a: &Application) -> pb::Application {
    let p = &a.provenance;
    pb::Application {
        name: a.name(),
        service_id: a.service_id.clone(),
        form_id: a.form_id.clone(),
        form_version: a.form_version.clone(),
        data_json: a.data_json.clone(),
        municipality_code: a.municipality_code.clone(),
        destination: member_text_pb(&a.destination),
        provenance: Some(pb::Provenance {
            channel: channel_pb(p.channel),
            submitted_by: member_text_pb(&p.submitted_by),
            centre_id: p.centre_id.clone().unwrap_or_default(),
            clerk: p.clerk.as_ref().map(identity_pb),
            applicant: p.applicant.as_ref().map(identity_pb),
            mandate: p.mandate.as_ref().map(|m| pb::MandateReference {
                mandate_id: m.mandate_id.clone(),
                authorisation_sha256: m.authorisation_sha256.clone(),
            }),
            paper_original_sha256: p.paper_original_sha256.clone().unwrap_or_default(),
            identity_document: p.identity_document.as_deref().map_or(0, document_pb),
        }),
        receipt: Some(receipt_pb(a)),
        status: status_pb(a.status),
        history: a.history.iter().map(change_pb).collect(),
    }
}

/// `applications/<id>` → the id.
fn application_id(name: &str) -> Result<&str, RoutingError> {
    name.strip_prefix("applications/")
        .filter(|id| !id.is_empty() && id.len() <= 64 && !id.contains('/'))
        .ok_or_else(|| RoutingError::invalid("name", "must be `applications/<id>`"))
}

#[tonic::async_trait]
impl ApplicationService for RoutingApi {
    async fn submit_application(
        &self,
        request: Request<pb::SubmitApplicationRequest>,
    ) -> Result<Response<pb::SubmitApplicationResponse>, Status> {
        let caller = Caller::of(&request)?.clone();
        let message = request.into_inner();
        let once = once(&caller, &message.request_id, "SubmitApplication", &message)?;
        let paper_intake = match message.paper_intake {
            None => None,
            Some(intake) => Some(PaperIntake {
                resident: subject_of(intake.resident.as_ref())
                    .map_err(|(part, why)| {
                        RoutingError::invalid(&format!("paper_intake.resident.{part}"), why)
                    })?
                    .to_string(),
                identity_document: document_of(intake.identity_document)
                    .map_err(|e| RoutingError::invalid("paper_intake.identity_document", e))?
                    .to_owned(),
                paper_original_sha256: intake.paper_original_sha256,
            }),
        };
        let application = self
            .routing
            .submit(
                &caller,
                once,
                Submission {
                    service_id: message.service_id,
                    form_version: message.form_version,
                    data_json: message.data_json,
                    municipality_code: message.municipality_code,
                    paper_intake,
                },
            )
            .await?;
        Ok(Response::new(pb::SubmitApplicationResponse {
            receipt: Some(receipt_pb(&application)),
        }))
    }

    async fn get_application(
        &self,
        request: Request<pb::GetApplicationRequest>,
    ) -> Result<Response<pb::GetApplicationResponse>, Status> {
        let caller = Caller::of(&request)?.clone();
        let id = application_id(&request.get_ref().name)?;
        let application = self.routing.application(&caller, id).await?;
        Ok(Response::new(pb::GetApplicationResponse {
            application: Some(application_pb(&application)),
        }))
    }

    async fn update_application_status(
        &self,
        request: Request<pb::UpdateApplicationStatusRequest>,
    ) -> Result<Response<pb::UpdateApplicationStatusResponse>, Status> {
        let caller = Caller::of(&request)?.clone();
        let message = request.into_inner();
        let once = once(
            &caller,
            &message.request_id,
            "UpdateApplicationStatus",
            &message,
        )?;
        let id = application_id(&message.name)?;
        let step = StatusStep {
            status: status_of(message.status)?,
            note: message.note,
            decision: message.decision.map(|d| (d.title, d.media_type, d.content)),
        };
        let change = self.routing.change_status(&caller, once, id, step).await?;
        Ok(Response::new(pb::UpdateApplicationStatusResponse {
            change: Some(change_pb(&change)),
        }))
    }
}

// ---- Inboxes

fn delivery_pb(d: &Delivery) -> pb::Delivery {
    pb::Delivery {
        delivery_id: d.id.clone(),
        attempt: d.attempt,
        lease_expire_time: Some(timestamp(d.lease_until)),
        application: Some(application_pb(&d.application)),
    }
}

fn ack_result_pb(outcomes: Vec<(String, AckOutcome)>) -> pb::AckResult {
    let mut result = pb::AckResult::default();
    for (id, outcome) in outcomes {
        if outcome == AckOutcome::Acknowledged {
            result.acknowledged.push(id);
        } else {
            result.refused.push(pb::RefusedAck {
                delivery_id: id,
                reason: outcome.reason().to_owned(),
            });
        }
    }
    result
}

fn inbox_text(inbox: Option<&onestop_proto::r#type::v1::MemberId>) -> Result<String, RoutingError> {
    member_field("inbox", inbox)
}

/// The consumer of a subsystem's unary pulls: one for all its pullers.
fn pull_consumer(inbox: &str) -> String {
    format!("pull:{inbox}")
}

type InboxStream = Pin<Box<dyn Stream<Item = Result<pb::StreamInboxResponse, Status>> + Send>>;

#[tonic::async_trait]
impl InboxService for RoutingApi {
    type StreamInboxStream = InboxStream;

    async fn stream_inbox(
        &self,
        request: Request<Streaming<pb::StreamInboxRequest>>,
    ) -> Result<Response<Self::StreamInboxStream>, Status> {
        let caller = Caller::of(&request)?.clone();
        let mut incoming = request.into_inner();
        let open = match incoming.message().await? {
            Some(pb::StreamInboxRequest {
                kind: Some(pb::stream_inbox_request::Kind::Open(open)),
            }) => open,
            Some(_) => {
                return Err(
                    RoutingError::invalid("kind", "the first message must be `open`").into(),
                );
            }
            None => {
                return Err(RoutingError::invalid("kind", "the stream ended before `open`").into());
            }
        };
        let inbox = self
            .routing
            .own_inbox(&caller, &inbox_text(open.inbox.as_ref())?)?;
        if open.max_unacknowledged == 0 || open.max_unacknowledged > MAX_WINDOW {
            return Err(RoutingError::invalid(
                "open.max_unacknowledged",
                format!("must be 1-{MAX_WINDOW}"),
            )
            .into());
        }
        let incoming = incoming.map(|message| match message {
            Ok(pb::StreamInboxRequest {
                kind: Some(pb::stream_inbox_request::Kind::Ack(ack)),
            }) => Ok(Incoming::Ack(ack.delivery_ids)),
            Ok(pb::StreamInboxRequest {
                kind: Some(pb::stream_inbox_request::Kind::Open(_)),
            }) => Ok(Incoming::Misplaced("`open` comes only first")),
            Ok(_) => Ok(Incoming::Misplaced("a message must be `open` or `ack`")),
            Err(status) => Err(RoutingError::Unavailable(format!(
                "the consumer's stream failed: {}",
                status.message()
            ))),
        });
        // Small: what is queued here is already leased; the window is the consumer's own.
        let (sender, receiver) = tokio::sync::mpsc::channel(2);
        // The stream's work stays in the stream's span, so each delivery's span is under it.
        tokio::spawn(
            inbox::run(
                self.routing.clone(),
                inbox,
                open.max_unacknowledged,
                Box::pin(incoming),
                sender,
                self.shutdown.clone(),
            )
            .instrument(tracing::Span::current()),
        );
        let responses = ReceiverStream::new(receiver).map(|item| match item {
            Ok(Outgoing::Delivery(delivery)) => Ok(pb::StreamInboxResponse {
                kind: Some(pb::stream_inbox_response::Kind::Delivery(delivery_pb(
                    &delivery,
                ))),
            }),
            Ok(Outgoing::AckResult(outcomes)) => Ok(pb::StreamInboxResponse {
                kind: Some(pb::stream_inbox_response::Kind::AckResult(ack_result_pb(
                    outcomes,
                ))),
            }),
            Err(error) => Err(Status::from(error)),
        });
        Ok(Response::new(Box::pin(responses)))
    }

    async fn pull_deliveries(
        &self,
        request: Request<pb::PullDeliveriesRequest>,
    ) -> Result<Response<pb::PullDeliveriesResponse>, Status> {
        let caller = Caller::of(&request)?.clone();
        let message = request.into_inner();
        let inbox = self
            .routing
            .own_inbox(&caller, &inbox_text(message.inbox.as_ref())?)?;
        if message.max_deliveries == 0 || message.max_deliveries > 100 {
            return Err(RoutingError::invalid("max_deliveries", "must be 1-100").into());
        }
        let deliveries = self
            .routing
            .claim(&inbox, &pull_consumer(&inbox), message.max_deliveries)
            .await?;
        Ok(Response::new(pb::PullDeliveriesResponse {
            deliveries: deliveries.iter().map(delivery_pb).collect(),
        }))
    }

    async fn ack_deliveries(
        &self,
        request: Request<pb::AckDeliveriesRequest>,
    ) -> Result<Response<pb::AckDeliveriesResponse>, Status> {
        let caller = Caller::of(&request)?.clone();
        let message = request.into_inner();
        let inbox = self
            .routing
            .own_inbox(&caller, &inbox_text(message.inbox.as_ref())?)?;
        let outcomes = self
            .routing
            .ack(
                &inbox,
                &pull_consumer(&inbox),
                &[message.delivery_ids],
                &|_| false,
            )
            .await?;
        Ok(Response::new(pb::AckDeliveriesResponse {
            result: outcomes.into_iter().next().map(ack_result_pb),
        }))
    }

    async fn list_parked_deliveries(
        &self,
        request: Request<pb::ListParkedDeliveriesRequest>,
    ) -> Result<Response<pb::ListParkedDeliveriesResponse>, Status> {
        let caller = Caller::of(&request)?.clone();
        let message = request.into_inner();
        let inbox = self
            .routing
            .managed_inbox(&caller, &inbox_text(message.inbox.as_ref())?)?;
        let size = paging::page_size(message.page_size)
            .map_err(|e| RoutingError::invalid("page_size", e))?;
        // Delivery ids are ordered and opaque; the last one is the page token.
        let after = message.page_token;
        if after.len() > 64 {
            return Err(
                RoutingError::invalid("page_token", "is not one this service issued").into(),
            );
        }
        let mut parked = self.routing.parked(&inbox, &after, size + 1).await?;
        let more = parked.len() > size as usize;
        parked.truncate(size as usize);
        Ok(Response::new(pb::ListParkedDeliveriesResponse {
            next_page_token: if more {
                parked.last().map(|p| p.id.clone()).unwrap_or_default()
            } else {
                String::new()
            },
            deliveries: parked
                .iter()
                .map(|p| pb::ParkedDelivery {
                    delivery_id: p.id.clone(),
                    application: format!("applications/{}", p.application_id),
                    attempts: p.attempts,
                    park_time: Some(timestamp(p.park_time)),
                })
                .collect(),
        }))
    }

    async fn release_parked_deliveries(
        &self,
        request: Request<pb::ReleaseParkedDeliveriesRequest>,
    ) -> Result<Response<pb::ReleaseParkedDeliveriesResponse>, Status> {
        let caller = Caller::of(&request)?.clone();
        let message = request.into_inner();
        let inbox = self
            .routing
            .managed_inbox(&caller, &inbox_text(message.inbox.as_ref())?)?;
        let released = self
            .routing
            .release_parked(&inbox, &message.delivery_ids)
            .await?;
        Ok(Response::new(pb::ReleaseParkedDeliveriesResponse {
            released,
        }))
    }
}

// ---- Service cases

fn contact_pb(c: ContactChannel) -> i32 {
    (match c {
        ContactChannel::InPerson => pb::ContactChannel::InPerson,
        ContactChannel::Phone => pb::ContactChannel::Phone,
        ContactChannel::Email => pb::ContactChannel::Email,
        ContactChannel::RemoteVideo => pb::ContactChannel::RemoteVideo,
    }) as i32
}

fn kind_pb(k: CaseKind) -> i32 {
    (match k {
        CaseKind::Application => pb::CaseKind::Application,
        CaseKind::Consultation => pb::CaseKind::Consultation,
        CaseKind::EServiceHelp => pb::CaseKind::EServiceHelp,
        CaseKind::AuthorisedEService => pb::CaseKind::AuthorisedEService,
    }) as i32
}

fn case_pb(c: &ServiceCase) -> pb::ServiceCase {
    pb::ServiceCase {
        name: format!("service-cases/{}", c.id),
        centre_id: c.centre_id.clone(),
        clerk: c.clerk.clone(),
        service_id: c.service_id.clone(),
        topic: c.topic.clone(),
        channel: contact_pb(c.channel),
        kind: kind_pb(c.kind),
        start_time: Some(timestamp(c.start_time)),
        end_time: Some(timestamp(c.end_time)),
        application: c
            .application_id
            .as_ref()
            .map(|id| format!("applications/{id}"))
            .unwrap_or_default(),
    }
}

fn case_of(c: pb::ServiceCase) -> Result<ServiceCase, RoutingError> {
    let channel = match pb::ContactChannel::try_from(c.channel) {
        Ok(pb::ContactChannel::InPerson) => ContactChannel::InPerson,
        Ok(pb::ContactChannel::Phone) => ContactChannel::Phone,
        Ok(pb::ContactChannel::Email) => ContactChannel::Email,
        Ok(pb::ContactChannel::RemoteVideo) => ContactChannel::RemoteVideo,
        _ => return Err(RoutingError::invalid("service_case.channel", "is required")),
    };
    let kind = match pb::CaseKind::try_from(c.kind) {
        Ok(pb::CaseKind::Application) => CaseKind::Application,
        Ok(pb::CaseKind::Consultation) => CaseKind::Consultation,
        Ok(pb::CaseKind::EServiceHelp) => CaseKind::EServiceHelp,
        Ok(pb::CaseKind::AuthorisedEService) => CaseKind::AuthorisedEService,
        _ => return Err(RoutingError::invalid("service_case.kind", "is required")),
    };
    if c.service_id.len() > 64 {
        return Err(RoutingError::invalid(
            "service_case.service_id",
            "is not a service id",
        ));
    }
    Ok(ServiceCase {
        id: String::new(),
        centre_id: String::new(),
        clerk: String::new(),
        service_id: c.service_id,
        institution: String::new(),
        topic: c.topic,
        channel,
        kind,
        start_time: time_of("service_case.start_time", c.start_time.as_ref())?,
        end_time: time_of("service_case.end_time", c.end_time.as_ref())?,
        application_id: None,
    })
}

fn dimension_of(value: i32) -> Result<Dimension, RoutingError> {
    match pb::StatisticsDimension::try_from(value) {
        Ok(pb::StatisticsDimension::Centre) => Ok(Dimension::Centre),
        Ok(pb::StatisticsDimension::Institution) => Ok(Dimension::Institution),
        Ok(pb::StatisticsDimension::Service) => Ok(Dimension::Service),
        Ok(pb::StatisticsDimension::Channel) => Ok(Dimension::Channel),
        Ok(pb::StatisticsDimension::Kind) => Ok(Dimension::Kind),
        _ => Err(RoutingError::invalid(
            "group_by",
            format!("unknown dimension {value}"),
        )),
    }
}

#[tonic::async_trait]
impl ServiceCaseService for RoutingApi {
    async fn register_service_case(
        &self,
        request: Request<pb::RegisterServiceCaseRequest>,
    ) -> Result<Response<pb::RegisterServiceCaseResponse>, Status> {
        let caller = Caller::of(&request)?.clone();
        let message = request.into_inner();
        let once = once(
            &caller,
            &message.request_id,
            "RegisterServiceCase",
            &message,
        )?;
        let case = case_of(
            message
                .service_case
                .ok_or_else(|| RoutingError::invalid("service_case", "is required"))?,
        )?;
        let case = self.routing.register_case(&caller, once, case).await?;
        Ok(Response::new(pb::RegisterServiceCaseResponse {
            service_case: Some(case_pb(&case)),
        }))
    }

    async fn get_service_case_statistics(
        &self,
        request: Request<pb::GetServiceCaseStatisticsRequest>,
    ) -> Result<Response<pb::GetServiceCaseStatisticsResponse>, Status> {
        let caller = Caller::of(&request)?.clone();
        let message = request.into_inner();
        let from = time_of("start_time", message.start_time.as_ref())?;
        let to = time_of("end_time", message.end_time.as_ref())?;
        let mut by = Vec::new();
        for value in message.group_by {
            let dimension = dimension_of(value)?;
            if by.contains(&dimension) {
                return Err(RoutingError::invalid("group_by", "names a dimension twice").into());
            }
            by.push(dimension);
        }
        let rows = self.routing.statistics(&caller, from, to, &by).await?;
        Ok(Response::new(pb::GetServiceCaseStatisticsResponse {
            rows: rows
                .into_iter()
                .map(|r| pb::StatisticsRow {
                    centre_id: r.centre_id.unwrap_or_default(),
                    institution: r.institution.unwrap_or_default(),
                    service: r.service.unwrap_or_default(),
                    channel: r.channel.map_or(0, contact_pb),
                    kind: r.kind.map_or(0, kind_pb),
                    cases: r.cases,
                    total_duration_seconds: r.total_duration_seconds,
                })
                .collect(),
        }))
    }
}
