//! Application routing through the gateway, on SQLite and PostgreSQL: applications filed
//! online, at a centre's desk, under a mandate and by a member system reach their institution
//! with their provenance, by territory; inbox streams deliver at least once with flow control,
//! leases, redelivery, parking and release; status flows back to the applicant; bad input is
//! refused and stores nothing; service cases are counted.

use std::collections::BTreeSet;

use onestop_integration_tests::oidc;
use onestop_integration_tests::{Backend, TestFederation};
use onestop_platform::config::DatabaseConfig;
use onestop_platform::identity::Member;
use onestop_platform::inbox::AckFound;
use onestop_platform::requests::{Fingerprint, Request as Once};
use onestop_proto::forms::v1::GetFormVersionRequest;
use onestop_proto::forms::v1::forms_service_client::FormsServiceClient;
use onestop_proto::identity::v1::{
    ExchangeMandateRequest, IdentityDocument, LevelOfAssurance, RegisterMandateRequest,
};
use onestop_proto::routing::v1::application_service_client::ApplicationServiceClient;
use onestop_proto::routing::v1::inbox_service_client::InboxServiceClient;
use onestop_proto::routing::v1::service_case_service_client::ServiceCaseServiceClient;
use onestop_proto::routing::v1::*;
use onestop_proto::r#type::v1::{MemberId, PersonId, PersonIdScheme};
use onestop_routing::model::{Application, Channel as AppChannel, Provenance, Status};
use onestop_routing::store::Store;
use sqlx::Row;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use tonic::{Code, Streaming};

use crate::identity::{
    CENTRE, INSTITUTION, World, bearer, identity, in_days, login, tokens, world,
};
use crate::{on_both_backends, reason, violations};

on_both_backends!(
    applications_reach_their_institution_with_provenance,
    inbox_streams_deliver_at_least_once,
    bad_input_is_refused_and_stores_nothing,
    leases_expire_and_deliveries_park,
    the_inbox_stream_outlives_the_gateway_deadline_cap,
    a_desk_files_for_its_own_municipalitys_centres_only,
    an_application_is_about_the_person_filing_it,
    control_characters_and_foreign_identifiers_are_refused_at_their_field,
);

const PENSION: &str = "vsaa-old-age-pension";
const PENSIONS: &str = "GOV/VSAA/pensions";

fn pension_data() -> String {
    std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../services/forms/seed/examples/vsaa-old-age-pension.valid.json"
    ))
    .unwrap()
}

/// The pension form's example about the person with `personal_code`.
fn pension_data_about(personal_code: &str) -> String {
    let mut data: serde_json::Value = serde_json::from_str(&pension_data()).unwrap();
    data["applicant"]["personal_code"] = personal_code.into();
    data.to_string()
}

fn paper_intake(personal_code: &str) -> PaperIntake {
    PaperIntake {
        resident: Some(PersonId {
            scheme: PersonIdScheme::LvPersonalCode as i32,
            value: personal_code.into(),
        }),
        identity_document: IdentityDocument::Passport as i32,
        paper_original_sha256: "5e".repeat(32),
    }
}

fn member_id(text: &str) -> MemberId {
    let m = Member::parse(text).unwrap();
    MemberId {
        member_class: m.class,
        member_code: m.code,
        subsystem: m.subsystem,
    }
}

fn member_text(id: &Option<MemberId>) -> String {
    let id = id.as_ref().unwrap();
    Member::new(&id.member_class, &id.member_code, &id.subsystem)
        .unwrap()
        .to_string()
}

fn applications(fed: &TestFederation, system: &str) -> ApplicationServiceClient<Channel> {
    ApplicationServiceClient::new(fed.gateway_client(system))
}

fn submission(request_id: &str, municipality: &str) -> SubmitApplicationRequest {
    SubmitApplicationRequest {
        request_id: request_id.into(),
        service_id: PENSION.into(),
        form_version: "1".into(),
        data_json: pension_data(),
        municipality_code: municipality.into(),
        paper_intake: None,
    }
}

/// Files an application as the demo centre's own system.
async fn submit_as_system(fed: &TestFederation, request_id: &str) -> Receipt {
    applications(fed, CENTRE)
        .submit_application(submission(request_id, "gulbene"))
        .await
        .unwrap()
        .into_inner()
        .receipt
        .unwrap()
}

/// An open inbox stream: send acks, receive deliveries and ack results.
struct Consumer {
    acks: mpsc::Sender<StreamInboxRequest>,
    responses: Streaming<StreamInboxResponse>,
}

impl Consumer {
    async fn open(
        fed: &TestFederation,
        system: &str,
        inbox: &str,
        window: u32,
    ) -> Result<Self, tonic::Status> {
        let (acks, requests) = mpsc::channel(16);
        acks.send(StreamInboxRequest {
            kind: Some(stream_inbox_request::Kind::Open(OpenInbox {
                inbox: Some(member_id(inbox)),
                max_unacknowledged: window,
            })),
        })
        .await
        .unwrap();
        let mut client = InboxServiceClient::new(fed.gateway_client(system));
        let mut responses = client
            .stream_inbox(ReceiverStream::new(requests))
            .await?
            .into_inner();
        // A refusal of the open comes as the stream's first answer.
        let _ = &mut responses;
        Ok(Self { acks, responses })
    }

    async fn next(&mut self) -> stream_inbox_response::Kind {
        tokio::time::timeout(std::time::Duration::from_secs(20), self.responses.message())
            .await
            .expect("a message within 20 s")
            .expect("the stream works")
            .expect("the stream is open")
            .kind
            .unwrap()
    }

    async fn delivery(&mut self) -> Delivery {
        match self.next().await {
            stream_inbox_response::Kind::Delivery(d) => d,
            other => panic!("expected a delivery, got {other:?}"),
        }
    }

    async fn ack(&mut self, ids: &[&str]) -> AckResult {
        self.acks
            .send(StreamInboxRequest {
                kind: Some(stream_inbox_request::Kind::Ack(Acknowledge {
                    delivery_ids: ids.iter().map(|s| s.to_string()).collect(),
                })),
            })
            .await
            .unwrap();
        match self.next().await {
            stream_inbox_response::Kind::AckResult(r) => r,
            other => panic!("expected an ack result, got {other:?}"),
        }
    }
}

async fn routing_db(fed: &TestFederation) -> onestop_platform::db::Database {
    onestop_platform::db::open(
        &DatabaseConfig::at(&fed.databases["routing"]),
        &onestop_routing::store::MIGRATIONS,
    )
    .await
    .unwrap()
}

async fn count(fed: &TestFederation, table: &str) -> i64 {
    let db = routing_db(fed).await;
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT COUNT(*) AS n FROM {table}"
    )))
    .fetch_one(&db.pool)
    .await
    .unwrap()
    .try_get("n")
    .unwrap()
}

fn provenance(d: &Delivery) -> &onestop_proto::routing::v1::Provenance {
    d.application.as_ref().unwrap().provenance.as_ref().unwrap()
}

async fn applications_reach_their_institution_with_provenance(backend: Backend) {
    let World { fed, providers } = world(backend).await;
    onestop_integration_tests::await_serving(
        fed.gateway_client(CENTRE),
        "onestop.routing.v1.ApplicationService",
    )
    .await;
    let any = LevelOfAssurance::Unspecified;
    let mut desk = applications(&fed, CENTRE);

    // A resident online, logged in at level high.
    let resident = login(
        &fed,
        CENTRE,
        "residents",
        oidc::LV_RESIDENT,
        oidc::ACR_HIGH,
        any,
    )
    .await
    .unwrap();
    let resident_token = tokens(&resident).access_token.clone();
    let online_data = pension_data_about(oidc::LV_RESIDENT_PERSONAL_CODE);
    let online = desk
        .submit_application(bearer(
            SubmitApplicationRequest {
                data_json: online_data.clone(),
                ..submission("online-1", "gulbene")
            },
            &resident_token,
        ))
        .await
        .unwrap()
        .into_inner()
        .receipt
        .unwrap();
    assert_eq!(member_text(&online.destination), PENSIONS);
    assert_eq!(online.content_sha256.len(), 64);

    // The same resident at level low is refused for a service that needs substantial.
    let weak = login(
        &fed,
        CENTRE,
        "residents",
        oidc::LV_RESIDENT,
        oidc::ACR_LOW,
        any,
    )
    .await
    .unwrap();
    let status = desk
        .submit_application(bearer(
            submission("online-weak", "gulbene"),
            &tokens(&weak).access_token,
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert_eq!(reason(&status), "LEVEL_OF_ASSURANCE_TOO_LOW");

    // A clerk at the Gulbene centre takes a paper application from a resident at the desk.
    let clerk = login(
        &fed,
        CENTRE,
        "staff",
        oidc::CLERK_GULBENE,
        oidc::ACR_SUBSTANTIAL,
        any,
    )
    .await
    .unwrap();
    let clerk_token = tokens(&clerk).access_token.clone();
    let scan = "5e".repeat(32);
    let paper = desk
        .submit_application(bearer(
            SubmitApplicationRequest {
                paper_intake: Some(PaperIntake {
                    resident: Some(PersonId {
                        scheme: PersonIdScheme::LvPersonalCode as i32,
                        value: oidc::LV_RESIDENT_2_PERSONAL_CODE.into(),
                    }),
                    identity_document: IdentityDocument::Passport as i32,
                    paper_original_sha256: scan.clone(),
                }),
                data_json: pension_data_about(oidc::LV_RESIDENT_2_PERSONAL_CODE),
                ..submission("paper-1", "gulbene")
            },
            &clerk_token,
        ))
        .await
        .unwrap()
        .into_inner()
        .receipt
        .unwrap();

    // A clerk of another municipality whose token names the Gulbene centre (a provider that
    // claims a centre its municipality does not run) neither files there nor reads its
    // applications.
    providers
        .tamper_next_id_token(
            oidc::STAFF_PROVIDER,
            serde_json::json!({ "centre": oidc::GULBENE_CENTRE }),
        )
        .await
        .unwrap();
    let forged = login(
        &fed,
        CENTRE,
        "staff",
        oidc::CLERK_RUGAJI,
        oidc::ACR_SUBSTANTIAL,
        any,
    )
    .await
    .unwrap();
    let forged_token = tokens(&forged).access_token.clone();
    let status = desk
        .submit_application(bearer(
            SubmitApplicationRequest {
                paper_intake: Some(PaperIntake {
                    resident: Some(PersonId {
                        scheme: PersonIdScheme::LvPersonalCode as i32,
                        value: oidc::LV_RESIDENT_2_PERSONAL_CODE.into(),
                    }),
                    identity_document: IdentityDocument::Passport as i32,
                    paper_original_sha256: scan.clone(),
                }),
                ..submission("paper-forged", "gulbene")
            },
            &forged_token,
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert_eq!(reason(&status), "NOT_THE_CLERKS_CENTRE");
    let status = desk
        .get_application(bearer(
            GetApplicationRequest {
                name: paper.application.clone(),
            },
            &forged_token,
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
    // The Gulbene clerk reads it.
    desk.get_application(bearer(
        GetApplicationRequest {
            name: paper.application.clone(),
        },
        &clerk_token,
    ))
    .await
    .unwrap();

    // The clerk files for a resident without eID under the resident's mandate; a mandate
    // that does not cover the service is refused.
    let mut mandates = identity(&fed, CENTRE);
    let mandate_for = |id: &str, services: Vec<&str>| RegisterMandateRequest {
        request_id: id.into(),
        principal: Some(PersonId {
            scheme: PersonIdScheme::LvPersonalCode as i32,
            value: oidc::LV_RESIDENT_2_PERSONAL_CODE.into(),
        }),
        services: services.into_iter().map(String::from).collect(),
        valid_from: None,
        valid_until: Some(in_days(30)),
        document_sha256: "ad".repeat(32),
        identity_document: IdentityDocument::IdCard as i32,
    };
    let mut acting = Vec::new();
    for (id, service) in [
        ("m-pension", PENSION),
        ("m-benefit", "vsaa-parental-benefit"),
    ] {
        let mandate = mandates
            .register_mandate(bearer(mandate_for(id, vec![service]), &clerk_token))
            .await
            .unwrap()
            .into_inner()
            .mandate
            .unwrap();
        let token = mandates
            .exchange_mandate(bearer(
                ExchangeMandateRequest {
                    name: mandate.name.clone(),
                    services: vec![],
                },
                &clerk_token,
            ))
            .await
            .unwrap()
            .into_inner()
            .access_token;
        acting.push((mandate.name, token));
    }
    let status = desk
        .submit_application(bearer(submission("mandate-wrong", "gulbene"), &acting[1].1))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert_eq!(reason(&status), "MANDATE_DOES_NOT_COVER_SERVICE");
    let authorised = desk
        .submit_application(bearer(
            SubmitApplicationRequest {
                data_json: pension_data_about(oidc::LV_RESIDENT_2_PERSONAL_CODE),
                ..submission("mandate-1", "gulbene")
            },
            &acting[0].1,
        ))
        .await
        .unwrap()
        .into_inner()
        .receipt
        .unwrap();

    // A member system on its own, for an applicant in Riga: routed to the Riga region.
    let riga = desk
        .submit_application(submission("system-riga", "riga"))
        .await
        .unwrap()
        .into_inner()
        .receipt
        .unwrap();
    assert_eq!(member_text(&riga.destination), "GOV/VSAA/pensions-riga");

    // The institution's consumer receives the three for its inbox, oldest first, each with
    // its provenance, and acknowledges them.
    let mut consumer = Consumer::open(&fed, INSTITUTION, PENSIONS, 10)
        .await
        .unwrap();
    let mut received = Vec::new();
    for _ in 0..3 {
        received.push(consumer.delivery().await);
    }
    let names: Vec<&str> = received
        .iter()
        .map(|d| d.application.as_ref().unwrap().name.as_str())
        .collect();
    assert_eq!(
        names,
        [
            online.application.as_str(),
            paper.application.as_str(),
            authorised.application.as_str()
        ]
    );
    let resident_subject = format!("lv:{}", oidc::LV_RESIDENT_PERSONAL_CODE);
    let resident_2 = format!("lv:{}", oidc::LV_RESIDENT_2_PERSONAL_CODE);
    let clerk_subject = format!(
        "staff:{}/{}",
        oidc::GULBENE_INSTITUTION,
        oidc::CLERK_GULBENE_STAFF_ID
    );

    let p = provenance(&received[0]);
    assert_eq!(
        p.channel,
        onestop_proto::routing::v1::Channel::Online as i32
    );
    let applicant = p.applicant.as_ref().unwrap();
    assert_eq!(applicant.subject, resident_subject);
    assert_eq!(applicant.level, LevelOfAssurance::High as i32);
    assert_eq!(member_text(&p.submitted_by), "MUN/GULBENE/kac");
    assert!(p.clerk.is_none() && p.mandate.is_none());

    let p = provenance(&received[1]);
    assert_eq!(
        p.channel,
        onestop_proto::routing::v1::Channel::Centre as i32
    );
    assert_eq!(p.centre_id, oidc::GULBENE_CENTRE);
    assert_eq!(p.clerk.as_ref().unwrap().subject, clerk_subject);
    assert_eq!(
        p.clerk.as_ref().unwrap().level,
        LevelOfAssurance::Substantial as i32
    );
    assert_eq!(p.applicant.as_ref().unwrap().subject, resident_2);
    assert_eq!(p.applicant.as_ref().unwrap().provider_id, "desk");
    assert_eq!(p.paper_original_sha256, scan);
    assert_eq!(p.identity_document, IdentityDocument::Passport as i32);

    let p = provenance(&received[2]);
    assert_eq!(
        p.channel,
        onestop_proto::routing::v1::Channel::AuthorisedEService as i32
    );
    assert_eq!(p.centre_id, oidc::GULBENE_CENTRE);
    assert_eq!(p.clerk.as_ref().unwrap().subject, clerk_subject);
    assert_eq!(p.applicant.as_ref().unwrap().provider_id, "mandate");
    assert_eq!(p.applicant.as_ref().unwrap().subject, resident_2);
    let mandate = p.mandate.as_ref().unwrap();
    assert_eq!(format!("mandates/{}", mandate.mandate_id), acting[0].0);
    assert_eq!(mandate.authorisation_sha256, "ad".repeat(32));

    let data = &received[0].application.as_ref().unwrap().data_json;
    assert_eq!(data, &online_data, "the data travels as submitted");
    let ids: Vec<&str> = received.iter().map(|d| d.delivery_id.as_str()).collect();
    let acked = consumer.ack(&ids).await;
    assert_eq!(acked.acknowledged, ids);

    // The Riga region's system pulls its one delivery and acknowledges it.
    fed.issue_member("vsaa-riga", "GOV/VSAA/pensions-riga");
    let mut riga_inbox = InboxServiceClient::new(fed.gateway_client("vsaa-riga"));
    let pulled = riga_inbox
        .pull_deliveries(PullDeliveriesRequest {
            inbox: Some(member_id("GOV/VSAA/pensions-riga")),
            max_deliveries: 10,
        })
        .await
        .unwrap()
        .into_inner()
        .deliveries;
    assert_eq!(pulled.len(), 1);
    assert_eq!(
        pulled[0].application.as_ref().unwrap().name,
        riga.application
    );
    let result = riga_inbox
        .ack_deliveries(AckDeliveriesRequest {
            inbox: Some(member_id("GOV/VSAA/pensions-riga")),
            delivery_ids: vec![pulled[0].delivery_id.clone()],
        })
        .await
        .unwrap()
        .into_inner()
        .result
        .unwrap();
    assert_eq!(result.acknowledged, [pulled[0].delivery_id.clone()]);

    // The institution decides the online application; the resident sees it.
    let mut institution = applications(&fed, INSTITUTION);
    for (i, status) in [ApplicationStatus::Received, ApplicationStatus::Decided]
        .into_iter()
        .enumerate()
    {
        institution
            .update_application_status(UpdateApplicationStatusRequest {
                request_id: format!("status-{i}"),
                name: online.application.clone(),
                status: status as i32,
                note: "Pension granted from 1 March".into(),
                decision: (status == ApplicationStatus::Decided).then(|| Decision {
                    title: "Decision on old-age pension".into(),
                    media_type: "application/pdf".into(),
                    content: b"%PDF-1.7 decision".to_vec(),
                    content_sha256: String::new(),
                }),
            })
            .await
            .unwrap();
    }
    let seen = desk
        .get_application(bearer(
            GetApplicationRequest {
                name: online.application.clone(),
            },
            &resident_token,
        ))
        .await
        .unwrap()
        .into_inner()
        .application
        .unwrap();
    assert_eq!(seen.status, ApplicationStatus::Decided as i32);
    let steps: Vec<i32> = seen.history.iter().map(|c| c.status).collect();
    assert_eq!(
        steps,
        [
            ApplicationStatus::Submitted as i32,
            ApplicationStatus::Received as i32,
            ApplicationStatus::Decided as i32
        ]
    );
    let decision = seen.history[2].decision.as_ref().unwrap();
    assert_eq!(
        decision.content_sha256,
        onestop_routing::service::sha256_hex(b"%PDF-1.7 decision")
    );
    // Another resident does not see it; the decision waits in the outbox for the e-address.
    let other = login(
        &fed,
        CENTRE,
        "residents",
        oidc::EE_VISITOR,
        oidc::ACR_HIGH,
        any,
    )
    .await
    .unwrap();
    let status = desk
        .get_application(bearer(
            GetApplicationRequest {
                name: online.application.clone(),
            },
            &tokens(&other).access_token,
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
    assert_eq!(count(&fed, "notifications").await, 1);

    // The centre's cases: the paper intake and the authorised e-service were registered on
    // their own; the clerk registers a consultation. The municipality reads its statistics.
    let mut cases = ServiceCaseServiceClient::new(fed.gateway_client(CENTRE));
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    cases
        .register_service_case(bearer(
            RegisterServiceCaseRequest {
                request_id: "case-1".into(),
                service_case: Some(ServiceCase {
                    topic: "Pension age".into(),
                    channel: ContactChannel::Phone as i32,
                    kind: CaseKind::Consultation as i32,
                    start_time: Some(prost_types::Timestamp {
                        seconds: now - 600,
                        nanos: 0,
                    }),
                    end_time: Some(prost_types::Timestamp {
                        seconds: now - 300,
                        nanos: 0,
                    }),
                    ..Default::default()
                }),
            },
            &clerk_token,
        ))
        .await
        .unwrap();
    let rows = cases
        .get_service_case_statistics(GetServiceCaseStatisticsRequest {
            start_time: Some(prost_types::Timestamp {
                seconds: now - 3600,
                nanos: 0,
            }),
            end_time: Some(prost_types::Timestamp {
                seconds: now + 3600,
                nanos: 0,
            }),
            group_by: vec![
                StatisticsDimension::Centre as i32,
                StatisticsDimension::Kind as i32,
            ],
        })
        .await
        .unwrap()
        .into_inner()
        .rows;
    let summary: Vec<(String, i32, u64, u64)> = rows
        .iter()
        .map(|r| {
            (
                r.centre_id.clone(),
                r.kind,
                r.cases,
                r.total_duration_seconds,
            )
        })
        .collect();
    assert_eq!(
        summary,
        [
            (
                oidc::GULBENE_CENTRE.to_owned(),
                CaseKind::Application as i32,
                1,
                0
            ),
            (
                oidc::GULBENE_CENTRE.to_owned(),
                CaseKind::AuthorisedEService as i32,
                1,
                0
            ),
            (
                oidc::GULBENE_CENTRE.to_owned(),
                CaseKind::Consultation as i32,
                1,
                300
            ),
        ]
    );
    fed.stop().await;
}

async fn inbox_streams_deliver_at_least_once(backend: Backend) {
    let fed = TestFederation::start(backend).await;
    onestop_integration_tests::await_serving(
        fed.gateway_client(CENTRE),
        "onestop.routing.v1.InboxService",
    )
    .await;
    let mut filed = Vec::new();
    for i in 0..3 {
        filed.push(
            submit_as_system(&fed, &format!("app-{i}"))
                .await
                .application,
        );
    }

    // A consumer with a window of two gets two, then nothing more until it acks; killed before
    // acking, its two go to the next consumer at once, as second attempts.
    let mut first = Consumer::open(&fed, INSTITUTION, PENSIONS, 2)
        .await
        .unwrap();
    let a = first.delivery().await;
    let b = first.delivery().await;
    assert_eq!((a.attempt, b.attempt), (1, 1));
    let unknown = first.ack(&["no-such-delivery"]).await;
    assert_eq!(unknown.refused[0].reason, "DELIVERY_NOT_SENT");
    drop(first);

    let mut second = Consumer::open(&fed, INSTITUTION, PENSIONS, 10)
        .await
        .unwrap();
    let mut again = Vec::new();
    for _ in 0..3 {
        let d = second.delivery().await;
        again.push((d.application.unwrap().name, d.attempt, d.delivery_id));
    }
    again.sort();
    let names: Vec<&str> = again.iter().map(|(n, _, _)| n.as_str()).collect();
    let mut expected: Vec<&str> = filed.iter().map(String::as_str).collect();
    expected.sort();
    assert_eq!(names, expected, "every application, none lost");
    let attempts: BTreeSet<(String, u32)> =
        again.iter().map(|(_, a, id)| (id.clone(), *a)).collect();
    assert!(
        attempts.contains(&(a.delivery_id.clone(), 2)),
        "{attempts:?}"
    );
    assert!(
        attempts.contains(&(b.delivery_id.clone(), 2)),
        "{attempts:?}"
    );

    // Acks are idempotent; a third consumer of the same inbox cannot ack what it was not sent.
    let ids: Vec<&str> = again.iter().map(|(_, _, id)| id.as_str()).collect();
    let mut third = Consumer::open(&fed, INSTITUTION, PENSIONS, 10)
        .await
        .unwrap();
    let stranger = third.ack(&ids[..1]).await;
    assert_eq!(stranger.refused.len(), 1, "{stranger:?}");
    assert!(second.ack(&ids).await.refused.is_empty());
    assert_eq!(second.ack(&ids).await.acknowledged, ids, "acked twice");

    // Two consumers on one inbox share the work: each delivery goes to exactly one.
    drop((second, third));
    let (got, mut arrivals) = mpsc::unbounded_channel();
    let mut consumers = tokio::task::JoinSet::new();
    for _ in 0..2 {
        let mut consumer = Consumer::open(&fed, INSTITUTION, PENSIONS, 1)
            .await
            .unwrap();
        let got = got.clone();
        consumers.spawn(async move {
            loop {
                let d = consumer.delivery().await;
                consumer.ack(&[d.delivery_id.as_str()]).await;
                got.send(d.application.unwrap().name).unwrap();
            }
        });
    }
    let mut more = BTreeSet::new();
    for i in 0..6 {
        more.insert(
            submit_as_system(&fed, &format!("more-{i}"))
                .await
                .application,
        );
    }
    let mut delivered = Vec::new();
    while delivered.len() < 6 {
        delivered.push(arrivals.recv().await.unwrap());
    }
    consumers.abort_all();
    let unique: BTreeSet<String> = delivered.iter().cloned().collect();
    assert_eq!(unique.len(), 6, "no delivery went to both: {delivered:?}");
    assert_eq!(unique, more);

    // Another subsystem may not consume this inbox.
    fed.issue_member("vsaa-benefits", "GOV/VSAA/benefits");
    let mut stranger = Consumer::open(&fed, "vsaa-benefits", PENSIONS, 1).await;
    let status = match &mut stranger {
        Err(status) => status.clone(),
        Ok(consumer) => consumer.responses.message().await.unwrap_err(),
    };
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert_eq!(reason(&status), "NOT_YOUR_INBOX");
    fed.stop().await;
}

async fn bad_input_is_refused_and_stores_nothing(backend: Backend) {
    let fed = TestFederation::start(backend).await;
    onestop_integration_tests::await_serving(
        fed.gateway_client(CENTRE),
        "onestop.routing.v1.ApplicationService",
    )
    .await;
    let mut desk = applications(&fed, CENTRE);
    let refused = |request: SubmitApplicationRequest| {
        let mut desk = desk.clone();
        async move { desk.submit_application(request).await.unwrap_err() }
    };
    let status = refused(SubmitApplicationRequest {
        service_id: "no-such-service".into(),
        ..submission("bad-1", "gulbene")
    })
    .await;
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
    let status = refused(SubmitApplicationRequest {
        form_version: "2".into(),
        ..submission("bad-2", "gulbene")
    })
    .await;
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert_eq!(reason(&status), "FORM_VERSION_NOT_ACCEPTED");
    // Invalid data: the forms service's field violations, unchanged.
    let mut data: serde_json::Value = serde_json::from_str(&pension_data()).unwrap();
    data["applicant"]["personal_code"] = "051287-13178".into(); // a wrong check digit
    data.as_object_mut().unwrap().remove("payment");
    let status = refused(SubmitApplicationRequest {
        data_json: data.to_string(),
        ..submission("bad-3", "gulbene")
    })
    .await;
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    let fields: Vec<String> = violations(&status).into_iter().map(|v| v.field).collect();
    assert!(
        fields.contains(&"/applicant/personal_code".to_owned()),
        "{fields:?}"
    );
    assert!(fields.contains(&"/payment".to_owned()), "{fields:?}");
    let status = refused(SubmitApplicationRequest {
        municipality_code: "Rīga; DROP".into(),
        ..submission("bad-4", "gulbene")
    })
    .await;
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    // Paper intake without a clerk.
    let status = refused(SubmitApplicationRequest {
        paper_intake: Some(PaperIntake {
            resident: Some(PersonId {
                scheme: PersonIdScheme::LvPersonalCode as i32,
                value: oidc::LV_RESIDENT_PERSONAL_CODE.into(),
            }),
            identity_document: IdentityDocument::Passport as i32,
            paper_original_sha256: "00".repeat(32),
        }),
        ..submission("bad-5", "gulbene")
    })
    .await;
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert_eq!(reason(&status), "CLERK_REQUIRED");
    assert_eq!(count(&fed, "applications").await, 0, "nothing stored");
    assert_eq!(count(&fed, "deliveries").await, 0, "nothing stored");

    // A retry returns the first receipt; the same id with other content is refused.
    let first = submit_as_system(&fed, "once").await;
    let retry = submit_as_system(&fed, "once").await;
    assert_eq!(first, retry);
    let status = refused(submission("once", "riga")).await;
    assert_eq!(reason(&status), "REQUEST_ID_REUSED");
    assert_eq!(count(&fed, "applications").await, 1);

    // Status: only the destination, only forward.
    let step = |id: &str, status: ApplicationStatus| UpdateApplicationStatusRequest {
        request_id: id.into(),
        name: first.application.clone(),
        status: status as i32,
        note: String::new(),
        decision: None,
    };
    let status = desk
        .update_application_status(step("s-0", ApplicationStatus::Received))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert_eq!(reason(&status), "NOT_THE_DESTINATION");
    let mut institution = applications(&fed, INSTITUTION);
    institution
        .update_application_status(step("s-1", ApplicationStatus::Decided))
        .await
        .unwrap();
    let status = institution
        .update_application_status(step("s-2", ApplicationStatus::InProgress))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert_eq!(reason(&status), "STATUS_STEP_BACKWARDS");
    let seen = institution
        .get_application(GetApplicationRequest {
            name: first.application.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .application
        .unwrap();
    assert_eq!(seen.history.len(), 2, "the refused steps left no trace");
    fed.stop().await;
}

/// Leases and parking against the store itself, with the time given explicitly: what a
/// consumer sees when time passes, without waiting for it.
async fn leases_expire_and_deliveries_park(backend: Backend) {
    let database = onestop_integration_tests::TestDatabase::start(backend).await;
    let db = onestop_platform::db::open(
        &DatabaseConfig::at(&database.url),
        &onestop_routing::store::MIGRATIONS,
    )
    .await
    .unwrap();
    let store = Store::new(db);
    let t0 = time::OffsetDateTime::from_unix_timestamp(1_800_000_000).unwrap();
    let lease = time::Duration::seconds(60);
    let application = Application {
        id: "0192c0de-0000-7000-8000-000000000001".into(),
        service_id: PENSION.into(),
        form_id: PENSION.into(),
        form_version: "1".into(),
        data_json: "{}".into(),
        municipality_code: String::new(),
        destination: PENSIONS.into(),
        provenance: Provenance {
            channel: AppChannel::System,
            submitted_by: "MUN/GULBENE/kac".into(),
            centre_id: None,
            clerk: None,
            applicant: None,
            mandate: None,
            paper_original_sha256: None,
            identity_document: None,
        },
        content_sha256: "00".repeat(32),
        accept_time: t0,
        status: Status::Submitted,
        history: Vec::new(),
        trace_context: None,
    };
    let once = Once::new(
        &"test",
        "r-1",
        "SubmitApplication",
        Fingerprint::of_bytes(b"1"),
    )
    .unwrap();
    store
        .insert_application(&application, "d-1", None, &once)
        .await
        .unwrap();
    let claim = |consumer: &'static str, at: time::OffsetDateTime| {
        let store = store.clone();
        async move {
            store
                .claim(PENSIONS, consumer, 10, at, at + lease, 2)
                .await
                .unwrap()
                .into_iter()
                .map(|d| (d.id, d.attempt))
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(claim("c1", t0).await, [("d-1".to_owned(), 1)]);
    // Leased: nobody else gets it before the lease ends.
    assert!(
        claim("c2", t0 + time::Duration::seconds(59))
            .await
            .is_empty()
    );
    // The lease ended: another consumer gets it, as a second attempt; the first consumer's
    // late ack is then refused, and the holder's accepted.
    let t1 = t0 + time::Duration::seconds(61);
    assert_eq!(claim("c2", t1).await, [("d-1".to_owned(), 2)]);
    let late = store
        .ack(PENSIONS, "c1", &["d-1".into()], t1)
        .await
        .unwrap();
    assert_eq!(late, [AckFound::OtherConsumer]);
    // Unacknowledged after the last attempt: parked, not delivered again.
    let t2 = t1 + time::Duration::seconds(61);
    assert!(claim("c3", t2).await.is_empty());
    let parked = store.parked(PENSIONS, "", 10).await.unwrap();
    assert_eq!(parked.len(), 1);
    assert_eq!((parked[0].id.as_str(), parked[0].attempts), ("d-1", 2));
    // Released, it starts over.
    let released = store
        .release_parked(PENSIONS, &["d-1".into(), "d-x".into()])
        .await
        .unwrap();
    assert_eq!(released, ["d-1"]);
    assert_eq!(claim("c3", t2).await, [("d-1".to_owned(), 1)]);
    let acked = store
        .ack(PENSIONS, "c3", &["d-1".into()], t2)
        .await
        .unwrap();
    assert_eq!(acked, [AckFound::Acknowledged]);
    assert!(
        claim("c4", t2 + time::Duration::hours(1)).await.is_empty(),
        "acked for good"
    );
    // An ack in another inbox's name is unknown.
    let other = store
        .ack("GOV/VSAA/benefits", "c3", &["d-1".into()], t2)
        .await
        .unwrap();
    assert_eq!(other, [AckFound::Unknown]);
}

/// The gateway caps every call's deadline, but not an inbox stream's: it stays open and keeps
/// delivering past the cap, while another stream (the echo service's) is cut at it.
async fn the_inbox_stream_outlives_the_gateway_deadline_cap(backend: Backend) {
    let cap = std::time::Duration::from_millis(1000);
    let fed = TestFederation::start_with(backend, move |options| options.max_deadline = cap).await;
    onestop_integration_tests::await_serving(
        fed.gateway_client(CENTRE),
        "onestop.routing.v1.InboxService",
    )
    .await;
    let opened = std::time::Instant::now();
    // A stream of the echo service, which the gateway holds to the cap.
    let (_keep_open, requests) =
        mpsc::channel::<onestop_integration_tests::echo::pb::EchoRequest>(1);
    let mut echo =
        onestop_integration_tests::echo::pb::echo_service_client::EchoServiceClient::new(
            fed.gateway_client(INSTITUTION),
        )
        .bidi(ReceiverStream::new(requests))
        .await
        .unwrap()
        .into_inner();
    let mut consumer = Consumer::open(&fed, INSTITUTION, PENSIONS, 10)
        .await
        .unwrap();
    let mut desk = applications(&fed, CENTRE);
    let mut filed = 0;
    while opened.elapsed() < cap + cap / 2 {
        let receipt = desk
            .submit_application(submission(&format!("long-{filed}"), "gulbene"))
            .await
            .unwrap()
            .into_inner()
            .receipt
            .unwrap();
        let d = consumer.delivery().await;
        assert_eq!(d.application.unwrap().name, receipt.application);
        consumer.ack(&[d.delivery_id.as_str()]).await;
        filed += 1;
    }
    let cut = loop {
        match echo.message().await {
            Ok(Some(_)) => continue,
            Ok(None) => panic!("the echo stream ended without a status"),
            Err(status) => break status,
        }
    };
    assert_eq!(cut.code(), Code::DeadlineExceeded, "{cut:?}");
    fed.stop().await;
}

/// A clerk of Rugāji logged in at Gulbene's desk (its token names Rugāji's centre, which
/// Rugāji runs) credits nothing to Rugāji's centre through Gulbene's desk: no paper intake, no
/// application under a mandate, no service case. A Gulbene clerk at the same desk does.
async fn a_desk_files_for_its_own_municipalitys_centres_only(backend: Backend) {
    let World { fed, providers: _p } = world(backend).await;
    onestop_integration_tests::await_serving(
        fed.gateway_client(CENTRE),
        "onestop.routing.v1.ApplicationService",
    )
    .await;
    let any = LevelOfAssurance::Unspecified;
    let mut desk = applications(&fed, CENTRE);
    let visitor = login(
        &fed,
        CENTRE,
        "staff",
        oidc::CLERK_RUGAJI,
        oidc::ACR_SUBSTANTIAL,
        any,
    )
    .await
    .unwrap();
    let visitor_token = tokens(&visitor).access_token.clone();
    let resident = oidc::LV_RESIDENT_2_PERSONAL_CODE;
    let paper = |request_id: &str| SubmitApplicationRequest {
        paper_intake: Some(paper_intake(resident)),
        data_json: pension_data_about(resident),
        ..submission(request_id, "gulbene")
    };

    let status = desk
        .submit_application(bearer(paper("visitor-paper"), &visitor_token))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert_eq!(reason(&status), "NOT_THE_DESKS_CENTRE");

    // Under a mandate: refused at identity when the mandate is registered, or here.
    let mut mandates = identity(&fed, CENTRE);
    let registered = mandates
        .register_mandate(bearer(
            RegisterMandateRequest {
                request_id: "visitor-mandate".into(),
                principal: Some(PersonId {
                    scheme: PersonIdScheme::LvPersonalCode as i32,
                    value: resident.into(),
                }),
                services: vec![PENSION.into()],
                valid_from: None,
                valid_until: Some(in_days(30)),
                document_sha256: "ad".repeat(32),
                identity_document: IdentityDocument::IdCard as i32,
            },
            &visitor_token,
        ))
        .await;
    match registered {
        Ok(mandate) => {
            let acting = mandates
                .exchange_mandate(bearer(
                    ExchangeMandateRequest {
                        name: mandate.into_inner().mandate.unwrap().name,
                        services: vec![],
                    },
                    &visitor_token,
                ))
                .await
                .unwrap()
                .into_inner()
                .access_token;
            let status = desk
                .submit_application(bearer(
                    SubmitApplicationRequest {
                        data_json: pension_data_about(resident),
                        ..submission("visitor-mandate", "gulbene")
                    },
                    &acting,
                ))
                .await
                .unwrap_err();
            assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
            assert_eq!(reason(&status), "NOT_THE_DESKS_CENTRE");
        }
        Err(status) => assert_eq!(status.code(), Code::PermissionDenied, "{status:?}"),
    }

    let mut cases = ServiceCaseServiceClient::new(fed.gateway_client(CENTRE));
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let consultation = |request_id: &str| RegisterServiceCaseRequest {
        request_id: request_id.into(),
        service_case: Some(ServiceCase {
            topic: "Pension age".into(),
            channel: ContactChannel::InPerson as i32,
            kind: CaseKind::Consultation as i32,
            start_time: Some(prost_types::Timestamp {
                seconds: now - 600,
                nanos: 0,
            }),
            end_time: Some(prost_types::Timestamp {
                seconds: now - 300,
                nanos: 0,
            }),
            ..Default::default()
        }),
    };
    let status = cases
        .register_service_case(bearer(consultation("visitor-case"), &visitor_token))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert_eq!(reason(&status), "NOT_THE_DESKS_CENTRE");
    assert_eq!(count(&fed, "applications").await, 0, "nothing filed");
    assert_eq!(count(&fed, "service_cases").await, 0, "nothing counted");

    // The same requests by Gulbene's own clerk are credited to Gulbene's centre.
    let clerk = login(
        &fed,
        CENTRE,
        "staff",
        oidc::CLERK_GULBENE,
        oidc::ACR_SUBSTANTIAL,
        any,
    )
    .await
    .unwrap();
    let clerk_token = tokens(&clerk).access_token.clone();
    desk.submit_application(bearer(paper("own-paper"), &clerk_token))
        .await
        .unwrap();
    let case = cases
        .register_service_case(bearer(consultation("own-case"), &clerk_token))
        .await
        .unwrap()
        .into_inner()
        .service_case
        .unwrap();
    assert_eq!(case.centre_id, oidc::GULBENE_CENTRE);
    assert_eq!(
        count(&fed, "service_cases").await,
        2,
        "the paper intake and the case"
    );
    fed.stop().await;
}

/// The data's subject (the form version's `x-onestop-subject` fields) is the person filing:
/// a resident online files about themselves, a clerk under a mandate about the mandator, a
/// clerk at the desk about the resident identified there; anything else is refused at the
/// field and stores nothing.
async fn an_application_is_about_the_person_filing_it(backend: Backend) {
    let World { fed, providers: _p } = world(backend).await;
    onestop_integration_tests::await_serving(
        fed.gateway_client(CENTRE),
        "onestop.routing.v1.ApplicationService",
    )
    .await;
    let any = LevelOfAssurance::Unspecified;
    let version = FormsServiceClient::new(fed.gateway_client(CENTRE))
        .get_form_version(GetFormVersionRequest {
            name: format!("forms/{PENSION}/versions/1"),
        })
        .await
        .unwrap()
        .into_inner()
        .version
        .unwrap();
    assert_eq!(version.subject_fields, ["/applicant/personal_code"]);

    let mut desk = applications(&fed, CENTRE);
    let about = |request_id: &str, personal_code: &str| SubmitApplicationRequest {
        data_json: pension_data_about(personal_code),
        ..submission(request_id, "gulbene")
    };
    let refused_at_subject = |status: tonic::Status| {
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        let fields: Vec<String> = violations(&status).into_iter().map(|v| v.field).collect();
        assert_eq!(fields, ["/applicant/personal_code"], "{status:?}");
    };
    let (me, someone_else) = (
        oidc::LV_RESIDENT_PERSONAL_CODE,
        oidc::LV_RESIDENT_2_PERSONAL_CODE,
    );

    // Online: the resident about someone else is refused, about themselves accepted.
    let resident = login(
        &fed,
        CENTRE,
        "residents",
        oidc::LV_RESIDENT,
        oidc::ACR_HIGH,
        any,
    )
    .await
    .unwrap();
    let resident_token = tokens(&resident).access_token.clone();
    refused_at_subject(
        desk.submit_application(bearer(about("online-other", someone_else), &resident_token))
            .await
            .unwrap_err(),
    );
    // The example's own applicant is nobody who logged in.
    refused_at_subject(
        desk.submit_application(bearer(
            submission("online-example", "gulbene"),
            &resident_token,
        ))
        .await
        .unwrap_err(),
    );
    desk.submit_application(bearer(about("online-own", me), &resident_token))
        .await
        .unwrap();

    // A visitor identified by another country's eID has no personal code here.
    let visitor = login(
        &fed,
        CENTRE,
        "residents",
        oidc::EE_VISITOR,
        oidc::ACR_HIGH,
        any,
    )
    .await
    .unwrap();
    refused_at_subject(
        desk.submit_application(bearer(about("visitor", me), &tokens(&visitor).access_token))
            .await
            .unwrap_err(),
    );

    // At the desk: about the resident identified there.
    let clerk = login(
        &fed,
        CENTRE,
        "staff",
        oidc::CLERK_GULBENE,
        oidc::ACR_SUBSTANTIAL,
        any,
    )
    .await
    .unwrap();
    let clerk_token = tokens(&clerk).access_token.clone();
    let paper = |request_id: &str, personal_code: &str| SubmitApplicationRequest {
        paper_intake: Some(paper_intake(someone_else)),
        ..about(request_id, personal_code)
    };
    refused_at_subject(
        desk.submit_application(bearer(paper("paper-other", me), &clerk_token))
            .await
            .unwrap_err(),
    );
    desk.submit_application(bearer(paper("paper-own", someone_else), &clerk_token))
        .await
        .unwrap();

    // Under a mandate: about the mandator.
    let mut mandates = identity(&fed, CENTRE);
    let mandate = mandates
        .register_mandate(bearer(
            RegisterMandateRequest {
                request_id: "m-subject".into(),
                principal: Some(PersonId {
                    scheme: PersonIdScheme::LvPersonalCode as i32,
                    value: someone_else.into(),
                }),
                services: vec![PENSION.into()],
                valid_from: None,
                valid_until: Some(in_days(30)),
                document_sha256: "ad".repeat(32),
                identity_document: IdentityDocument::IdCard as i32,
            },
            &clerk_token,
        ))
        .await
        .unwrap()
        .into_inner()
        .mandate
        .unwrap();
    let acting = mandates
        .exchange_mandate(bearer(
            ExchangeMandateRequest {
                name: mandate.name,
                services: vec![],
            },
            &clerk_token,
        ))
        .await
        .unwrap()
        .into_inner()
        .access_token;
    refused_at_subject(
        desk.submit_application(bearer(about("mandate-other", me), &acting))
            .await
            .unwrap_err(),
    );
    desk.submit_application(bearer(about("mandate-own", someone_else), &acting))
        .await
        .unwrap();

    // A member system filing on its own names no person: its data is not compared.
    desk.submit_application(about("system", someone_else))
        .await
        .unwrap();
    assert_eq!(
        count(&fed, "applications").await,
        4,
        "only the accepted ones"
    );
    fed.stop().await;
}

/// Text and identifiers the platform refuses anywhere are not stored here either: a control
/// character (other than tab and line breaks) in form data, a status note or a service case's
/// topic, and an eIDAS identifier Latvia does not accept (`LV/LV/...`) for the resident at the
/// desk; each refused at its field.
async fn control_characters_and_foreign_identifiers_are_refused_at_their_field(backend: Backend) {
    let World { fed, providers: _p } = world(backend).await;
    onestop_integration_tests::await_serving(
        fed.gateway_client(CENTRE),
        "onestop.routing.v1.ApplicationService",
    )
    .await;
    let any = LevelOfAssurance::Unspecified;
    let mut desk = applications(&fed, CENTRE);
    let refused_at = |status: tonic::Status| {
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        violations(&status)
            .into_iter()
            .map(|v| v.field)
            .collect::<Vec<_>>()
    };

    // Form data: a NUL (PostgreSQL's `jsonb` refuses it) and an escape sequence, each at its
    // JSON Pointer; tab and line breaks are text.
    let mut data: serde_json::Value = serde_json::from_str(&pension_data()).unwrap();
    data["applicant"]["given_name"] = "Jānis\u{0}".into();
    data["insurance_periods"][1]["employer"] = "\u{1b}[8mKolhozs".into();
    data["insurance_periods"][0]["occupation"] = "noliktavas\tdarbinieks\r\n".into();
    let status = desk
        .submit_application(SubmitApplicationRequest {
            data_json: data.to_string(),
            ..submission("nul", "gulbene")
        })
        .await
        .unwrap_err();
    assert_eq!(reason(&status), "INVALID_FORM_DATA", "{status:?}");
    assert_eq!(
        refused_at(status),
        ["/applicant/given_name", "/insurance_periods/1/employer"]
    );

    // The resident at the desk named by an eIDAS identifier that Latvia itself issued.
    let clerk = login(
        &fed,
        CENTRE,
        "staff",
        oidc::CLERK_GULBENE,
        oidc::ACR_SUBSTANTIAL,
        any,
    )
    .await
    .unwrap();
    let clerk_token = tokens(&clerk).access_token.clone();
    let status = desk
        .submit_application(bearer(
            SubmitApplicationRequest {
                paper_intake: Some(PaperIntake {
                    resident: Some(PersonId {
                        scheme: PersonIdScheme::Eidas as i32,
                        value: "LV/LV/38001085718".into(),
                    }),
                    ..paper_intake(oidc::LV_RESIDENT_2_PERSONAL_CODE)
                }),
                ..submission("lv-lv", "gulbene")
            },
            &clerk_token,
        ))
        .await
        .unwrap_err();
    assert_eq!(refused_at(status), ["paper_intake.resident.value"]);
    assert_eq!(count(&fed, "applications").await, 0, "nothing stored");

    // A status note.
    let filed = submit_as_system(&fed, "clean").await;
    let status = applications(&fed, INSTITUTION)
        .update_application_status(UpdateApplicationStatusRequest {
            request_id: "note".into(),
            name: filed.application.clone(),
            status: ApplicationStatus::Received as i32,
            note: "Saņemts\u{0}".into(),
            decision: None,
        })
        .await
        .unwrap_err();
    assert_eq!(refused_at(status), ["note"]);
    assert_eq!(count(&fed, "status_changes").await, 1, "only SUBMITTED");

    // A service case's topic.
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let status = ServiceCaseServiceClient::new(fed.gateway_client(CENTRE))
        .register_service_case(bearer(
            RegisterServiceCaseRequest {
                request_id: "topic".into(),
                service_case: Some(ServiceCase {
                    topic: "Pensijas\u{7} vecums".into(),
                    channel: ContactChannel::InPerson as i32,
                    kind: CaseKind::Consultation as i32,
                    start_time: Some(prost_types::Timestamp {
                        seconds: now - 600,
                        nanos: 0,
                    }),
                    end_time: Some(prost_types::Timestamp {
                        seconds: now - 300,
                        nanos: 0,
                    }),
                    ..Default::default()
                }),
            },
            &clerk_token,
        ))
        .await
        .unwrap_err();
    assert_eq!(refused_at(status), ["service_case.topic"]);
    assert_eq!(count(&fed, "service_cases").await, 0);

    // Tab and line breaks pass.
    desk.submit_application(SubmitApplicationRequest {
        data_json: {
            data["applicant"]["given_name"] = "Jānis".into();
            data["insurance_periods"][1]["employer"] = "Kolhozs".into();
            data.to_string()
        },
        ..submission("clean-2", "gulbene")
    })
    .await
    .unwrap();
    fed.stop().await;
}
