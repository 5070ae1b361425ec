//! Rights that end while a caller holds them: a certificate revoked, or a right withdrawn from
//! the access policy, while the caller's streams and connections are open.

use std::time::Duration;

use onestop_integration_tests::echo::pb::EchoRequest;
use onestop_integration_tests::echo::pb::echo_service_client::EchoServiceClient;
use onestop_integration_tests::{Backend, TestFederation};
use onestop_platform::identity::{Member, SpiffeId};
use onestop_platform::pki::{Ca, IssueRequest};
use onestop_proto::routing::v1::application_service_client::ApplicationServiceClient;
use onestop_proto::routing::v1::inbox_service_client::InboxServiceClient;
use onestop_proto::routing::v1::{
    OpenInbox, StreamInboxRequest, StreamInboxResponse, SubmitApplicationRequest,
    stream_inbox_request, stream_inbox_response,
};
use onestop_proto::r#type::v1::MemberId;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;
use tonic::transport::Channel;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

use crate::reason;

const PENSIONS: &str = "GOV/VSAA/pensions";

fn submission(request_id: &str) -> SubmitApplicationRequest {
    SubmitApplicationRequest {
        request_id: request_id.into(),
        service_id: "vsaa-old-age-pension".into(),
        form_version: "1".into(),
        data_json: std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../services/forms/seed/examples/vsaa-old-age-pension.valid.json"
        ))
        .unwrap(),
        municipality_code: "gulbene".into(),
        paper_intake: None,
    }
}

/// Opens the pensions inbox as `system`; the sender keeps the stream's request side open.
async fn open_inbox(
    channel: Channel,
) -> (
    mpsc::Sender<StreamInboxRequest>,
    tonic::Streaming<StreamInboxResponse>,
) {
    let member = Member::parse(PENSIONS).unwrap();
    let (acks, requests) = mpsc::channel(4);
    acks.send(StreamInboxRequest {
        kind: Some(stream_inbox_request::Kind::Open(OpenInbox {
            inbox: Some(MemberId {
                member_class: member.class,
                member_code: member.code,
                subsystem: member.subsystem,
            }),
            max_unacknowledged: 8,
        })),
    })
    .await
    .unwrap();
    let responses = InboxServiceClient::new(channel)
        .stream_inbox(ReceiverStream::new(requests))
        .await
        .expect("the inbox opens")
        .into_inner();
    (acks, responses)
}

/// The next answer of a stream, within 20 s.
async fn next<T>(stream: &mut tonic::Streaming<T>) -> Result<Option<T>, tonic::Status> {
    tokio::time::timeout(Duration::from_secs(20), stream.message())
        .await
        .expect("an answer or an end within 20 s")
}

/// A consumer whose certificate is revoked while its inbox stream, a health watch and a
/// bidirectional stream are open: each ends with `UNAUTHENTICATED`, the connection is closed,
/// and the next application is not delivered to it but waits for a consumer that may have it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_consumer_loses_its_open_streams_and_its_connection() {
    let fed = TestFederation::start_with(Backend::Sqlite, |options| {
        options.reload_interval = Duration::from_millis(100);
    })
    .await;
    onestop_integration_tests::await_serving(
        fed.gateway_client("demo-centre"),
        "onestop.routing.v1.ApplicationService",
    )
    .await;
    fed.issue_member("consumer", PENSIONS);
    let channel = fed.gateway_client("consumer");
    let (_acks, mut inbox) = open_inbox(channel.clone()).await;
    let mut watch = HealthClient::new(channel.clone())
        .watch(HealthCheckRequest::default())
        .await
        .expect("a health watch")
        .into_inner();
    assert!(
        next(&mut watch).await.unwrap().is_some(),
        "the first status"
    );
    // A platform component's watch held at a service directly, not through the gateway.
    let component = SpiffeId::parse("spiffe://onestop.lv/platform/retired").unwrap();
    fed.issue(
        "retired",
        &IssueRequest::new("retired", Some(component), Duration::from_secs(3600)),
    );
    let mut direct = HealthClient::new(fed.forms_client("retired"))
        .watch(HealthCheckRequest::default())
        .await
        .expect("a component may watch a service")
        .into_inner();
    assert!(
        next(&mut direct).await.unwrap().is_some(),
        "the first status"
    );
    let mut echo = EchoServiceClient::new(channel.clone());
    let (_echoes, echo_requests) = mpsc::channel::<EchoRequest>(1);
    let mut echoes = echo
        .bidi(ReceiverStream::new(echo_requests))
        .await
        .expect("a stream")
        .into_inner();

    // The stream works: an application reaches it.
    let mut desk = ApplicationServiceClient::new(fed.gateway_client("demo-centre"));
    desk.submit_application(submission("before-revocation"))
        .await
        .unwrap();
    match next(&mut inbox).await.unwrap().and_then(|r| r.kind) {
        Some(stream_inbox_response::Kind::Delivery(_)) => {}
        other => panic!("expected a delivery, got {other:?}"),
    }

    let ca = Ca::load(&fed.pki).unwrap();
    for name in ["consumer", "retired"] {
        let pem = std::fs::read_to_string(fed.pki.join(format!("{name}.pem"))).unwrap();
        ca.revoke(&fed.pki, &pem).unwrap();
    }

    // Every open stream ends, saying why, once the list is reloaded.
    for (what, ended) in [
        ("inbox", next(&mut inbox).await.map(|_| ())),
        ("health watch", next(&mut watch).await.map(|_| ())),
        ("echo stream", next(&mut echoes).await.map(|_| ())),
    ] {
        let status = ended.expect_err(what);
        assert_eq!(status.code(), Code::Unauthenticated, "{what}: {status:?}");
        assert_eq!(
            reason(&status),
            "CERTIFICATE_UNUSABLE",
            "{what}: {status:?}"
        );
        assert!(status.message().contains("revoked"), "{what}: {status:?}");
    }
    // The service itself ends the component's watch the same way.
    let status = next(&mut direct).await.expect_err("the direct watch ends");
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    assert!(status.message().contains("revoked"), "{status:?}");

    // The connection itself is closed: a call on the channel no longer reaches the gateway's
    // per-call refusal but has to connect again, which the revoked certificate cannot.
    let status = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let status = echo.unary(EchoRequest::default()).await.unwrap_err();
            if reason(&status) != "CERTIFICATE_UNUSABLE" {
                break status;
            }
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("the connection is closed within 10 s");
    assert_ne!(status.code(), Code::Ok, "{status:?}");

    // An application submitted now waits for a consumer that may take it.
    let receipt = desk
        .submit_application(submission("after-revocation"))
        .await
        .unwrap()
        .into_inner()
        .receipt
        .unwrap();
    fed.issue_member("successor", PENSIONS);
    let (_acks, mut successor) = open_inbox(fed.gateway_client("successor")).await;
    let mut delivered = Vec::new();
    // The first application, never acknowledged, comes again; so does the second.
    while delivered.len() < 2 {
        match next(&mut successor).await.unwrap().and_then(|r| r.kind) {
            Some(stream_inbox_response::Kind::Delivery(d)) => {
                delivered.push(d.application.unwrap().name)
            }
            other => panic!("expected a delivery, got {other:?}"),
        }
    }
    assert!(
        delivered.contains(&receipt.application),
        "{delivered:?} lacks {}",
        receipt.application
    );
    fed.stop().await;
}

/// The access policy is read again when it changes: a member whose right is withdrawn loses its
/// open streams of that method (`PERMISSION_DENIED`) and may no longer call it, what it may still
/// call goes on, and a right granted is usable at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_right_withdrawn_from_the_policy_ends_the_members_streams() {
    let fed = TestFederation::start_with(Backend::Sqlite, |options| {
        options.reload_interval = Duration::from_millis(100);
    })
    .await;
    fed.issue_member("vid", "GOV/VID/taxes");
    let mut echo = EchoServiceClient::new(fed.gateway_client("demo-institution"));
    let (_echoes, echo_requests) = mpsc::channel::<EchoRequest>(1);
    let mut stream = echo
        .bidi(ReceiverStream::new(echo_requests))
        .await
        .expect("a stream")
        .into_inner();
    let mut vid = EchoServiceClient::new(fed.gateway_client("vid"));
    let status = vid.unary(EchoRequest::default()).await.unwrap_err();
    assert_eq!(reason(&status), "ACCESS_DENIED", "{status:?}");

    // The policy now lets the institution call only `Unary` of the test service, and lets
    // another institution call it all.
    let policy = fed.data_dir.join("policy.toml");
    let text = std::fs::read_to_string(&policy).unwrap();
    let mut narrowed = text.clone();
    for granted in ["onestop.testing.v1.EchoService/*", "onestop.testing.v1.*"] {
        narrowed = narrowed.replace(
            &format!("member = \"GOV/VSAA\"\nmethods = [\"{granted}\"]"),
            "member = \"GOV/VSAA\"\nmethods = [\"onestop.testing.v1.EchoService/Unary\"]",
        );
    }
    assert!(!narrowed.contains("\"onestop.testing.v1.*\""), "{narrowed}");
    narrowed.push_str("\n[[allow]]\nmember = \"GOV/VID\"\nmethods = [\"onestop.testing.v1.*\"]\n");
    std::fs::write(&policy, narrowed).unwrap();

    let status = next(&mut stream).await.expect_err("the stream ends");
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert_eq!(reason(&status), "ACCESS_DENIED", "{status:?}");
    let (_again, requests) = mpsc::channel::<EchoRequest>(1);
    let Err(status) = echo.bidi(ReceiverStream::new(requests)).await else {
        panic!("a new stream is refused");
    };
    assert_eq!(reason(&status), "ACCESS_DENIED", "{status:?}");
    echo.unary(EchoRequest::default())
        .await
        .expect("what is still allowed goes on, on the same connection");
    vid.unary(EchoRequest::default())
        .await
        .expect("a right granted is usable without a restart");
    fed.stop().await;
}
