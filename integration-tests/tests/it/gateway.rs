//! The gateway: who gets in, who may call what, and that every kind of call passes intact.

use std::time::Duration;

use onestop_integration_tests::echo::pb::EchoRequest;
use onestop_integration_tests::echo::pb::echo_service_client::EchoServiceClient;
use onestop_integration_tests::{Backend, TestFederation, anonymous_channel, tls_refusal};
use onestop_platform::identity::SpiffeId;
use onestop_platform::pki::{Ca, IssueRequest};
use onestop_proto::forms::v1::forms_service_client::FormsServiceClient;
use onestop_proto::forms::v1::{CreateFormRequest, GetFormRequest};
use time::OffsetDateTime;
use tonic::Code;

const INSTITUTION: &str = "demo-institution";
const CENTRE: &str = "demo-centre";

fn get_form() -> GetFormRequest {
    GetFormRequest {
        name: "forms/vsaa-old-age-pension".into(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_institution_reaches_forms_through_the_gateway() {
    let fed = TestFederation::start(Backend::Sqlite).await;
    let mut forms = FormsServiceClient::new(fed.gateway_client(INSTITUTION));
    let response = forms
        .get_form(get_form())
        .await
        .expect("GetForm through the gateway");
    let trace_id = response
        .metadata()
        .get("x-trace-id")
        .expect("every answer names its trace")
        .to_str()
        .unwrap()
        .to_owned();
    assert_eq!(trace_id.len(), 32, "a W3C trace id: {trace_id}");
    let form = response.into_inner().form.unwrap();
    assert_eq!(form.name, "forms/vsaa-old-age-pension");
    assert_eq!(form.owner.unwrap().member_code, "VSAA");

    // A caller that sends its own W3C trace context gets its trace continued.
    let theirs = "4bf92f3577b34da6a3ce929d0e0e4736";
    let mut request = tonic::Request::new(get_form());
    request.metadata_mut().insert(
        "traceparent",
        format!("00-{theirs}-00f067aa0ba902b7-01").parse().unwrap(),
    );
    let response = forms.get_form(request).await.unwrap();
    assert_eq!(response.metadata().get("x-trace-id").unwrap(), theirs);
    fed.stop().await;
}

/// The refusal a client whose certificate names no member gets on a new connection. Such a
/// connection is closed after its refusal; now and then, under load, the client's connection
/// fails with a transport error before the refusal reaches it (not understood yet): the call is
/// then made again on a new connection, at most three times.
async fn stranger_refusal(connect: impl Fn() -> tonic::transport::Channel) -> tonic::Status {
    let mut last = None;
    for _ in 0..3 {
        let status = FormsServiceClient::new(connect())
            .get_form(get_form())
            .await
            .unwrap_err();
        if status.code() != Code::Unknown {
            return status;
        }
        last = Some(status);
    }
    last.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_that_name_no_member_are_refused() {
    let fed = TestFederation::start(Backend::Sqlite).await;
    let day = Duration::from_secs(86_400);

    // No certificate at all: the TLS session is allowed so that the answer can say why.
    let status = stranger_refusal(|| anonymous_channel(&fed.gateway.to_string(), &fed.pki)).await;
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    assert!(status.message().contains("certificate"), "{status:?}");

    // A valid certificate without a member identity.
    fed.issue("nameless", &IssueRequest::new("nameless", None, day));
    let status = stranger_refusal(|| fed.gateway_client("nameless")).await;
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    assert!(status.message().contains("no spiffe"), "{status:?}");

    // An identity of another trust domain.
    let foreign_domain = SpiffeId::parse("spiffe://example.org/member/GOV/VSAA/pensions").unwrap();
    fed.issue(
        "foreign-domain",
        &IssueRequest::new("foreign-domain", Some(foreign_domain), day),
    );
    let status = stranger_refusal(|| fed.gateway_client("foreign-domain")).await;
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");

    // An expired certificate of a real member: the handshake fails.
    let vsaa = SpiffeId::parse("spiffe://onestop.lv/member/GOV/VSAA/pensions").unwrap();
    let mut expired = IssueRequest::new("expired", Some(vsaa.clone()), day);
    expired.not_before = OffsetDateTime::now_utc() - time::Duration::days(30);
    expired.not_after = OffsetDateTime::now_utc() - time::Duration::days(1);
    fed.issue("expired", &expired);
    let refusal = tls_refusal(&fed.gateway.to_string(), &fed.pki, &fed.pki, "expired").await;
    assert!(refusal.contains("CertificateExpired"), "{refusal}");

    // A member certificate from another CA: the handshake fails. Once from an unrelated CA,
    // once from a lookalike CA with the very name of the real one (its signature gives it away).
    for (trust_domain, alert) in [
        ("other.example", "UnknownCA"),
        ("onestop.lv", "DecryptError"),
    ] {
        let other = tempfile::tempdir().unwrap();
        let other_ca = Ca::generate(trust_domain).unwrap();
        other_ca.save(other.path()).unwrap();
        other_ca
            .issue(&IssueRequest::new("impostor", Some(vsaa.clone()), day))
            .unwrap()
            .save(other.path(), "impostor")
            .unwrap();
        let refusal =
            tls_refusal(&fed.gateway.to_string(), &fed.pki, other.path(), "impostor").await;
        assert!(refusal.contains(alert), "{refusal}");
    }

    // Nothing above disturbed a legitimate member.
    let mut forms = FormsServiceClient::new(fed.gateway_client(INSTITUTION));
    forms
        .get_form(get_form())
        .await
        .expect("the demo institution still gets in");
    fed.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_without_the_right_is_denied_by_name() {
    let fed = TestFederation::start(Backend::Sqlite).await;
    let mut centre = FormsServiceClient::new(fed.gateway_client(CENTRE));
    // The centre may read forms ...
    centre
        .get_form(get_form())
        .await
        .expect("the centre may read forms");
    // ... but not create them.
    let status = centre
        .create_form(CreateFormRequest {
            request_id: "r1".into(),
            form_id: "centre-form".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    assert!(status.message().contains("MUN/GULBENE/kac"), "{status:?}");
    assert!(
        status.message().contains("FormsService/CreateForm"),
        "{status:?}"
    );
    assert_eq!(crate::reason(&status), "ACCESS_DENIED");

    // A member the policy does not name at all gets nothing.
    fed.issue_member("stranger", "GOV/VID/eds");
    let mut stranger = FormsServiceClient::new(fed.gateway_client("stranger"));
    let status = stranger.get_form(get_form()).await.unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    fed.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_gateway_may_name_a_caller_to_a_service() {
    let fed = TestFederation::start(Backend::Sqlite).await;
    // A member's system goes around the gateway straight to the forms service and claims to
    // be another institution.
    let mut direct = FormsServiceClient::new(fed.forms_client(CENTRE));
    let mut request = tonic::Request::new(get_form());
    request.metadata_mut().insert(
        "x-onestop-caller",
        "spiffe://onestop.lv/member/GOV/VSAA/pensions"
            .parse()
            .unwrap(),
    );
    let status = direct.get_form(request).await.unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert_eq!(crate::reason(&status), "CALLER_CLAIM_REFUSED");

    // Nor may it go around the gateway as itself: its access rights live at the gateway.
    let status = direct.get_form(get_form()).await.unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert_eq!(crate::reason(&status), "NOT_THROUGH_GATEWAY");
    // Not even for health or reflection: the service answers no member directly.
    let mut health = tonic_health::pb::health_client::HealthClient::new(fed.forms_client(CENTRE));
    let status = health
        .check(tonic_health::pb::HealthCheckRequest::default())
        .await
        .unwrap_err();
    assert_eq!(crate::reason(&status), "NOT_THROUGH_GATEWAY", "{status:?}");
    let mut reflection =
        tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient::new(
            fed.forms_client(CENTRE),
        );
    let status = reflection
        .server_reflection_info(tokio_stream::iter([
            tonic_reflection::pb::v1::ServerReflectionRequest::default(),
        ]))
        .await
        .unwrap_err();
    assert_eq!(crate::reason(&status), "NOT_THROUGH_GATEWAY", "{status:?}");
    // A platform component may ask (the gateway watches each service's health).
    let mut health =
        tonic_health::pb::health_client::HealthClient::new(fed.forms_client("gateway"));
    health
        .check(tonic_health::pb::HealthCheckRequest::default())
        .await
        .expect("platform components may check health");

    // Through the gateway, a claim of the caller's own is replaced by the verified identity.
    let mut echo = EchoServiceClient::new(fed.gateway_client(INSTITUTION));
    let mut request = tonic::Request::new(EchoRequest {
        text: "who am I".into(),
        ..Default::default()
    });
    request.metadata_mut().insert(
        "x-onestop-caller",
        "spiffe://onestop.lv/member/GOV/VID/eds".parse().unwrap(),
    );
    let answer = echo.unary(request).await.expect("echo").into_inner();
    assert_eq!(
        answer.caller,
        "spiffe://onestop.lv/member/GOV/VSAA/pensions"
    );
    fed.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_kind_of_stream_passes_through_intact() {
    let fed = TestFederation::start(Backend::Sqlite).await;
    let mut echo = EchoServiceClient::new(fed.gateway_client(INSTITUTION));
    let caller = "spiffe://onestop.lv/member/GOV/VSAA/pensions";

    // Server stream: many answers, in order, each with a 64 KiB payload.
    let payload = vec![7u8; 64 * 1024];
    let mut answers = echo
        .server_stream(EchoRequest {
            text: "s".into(),
            repeat: 50,
            payload: payload.clone(),
        })
        .await
        .expect("server stream")
        .into_inner();
    let mut seen = 0;
    while let Some(answer) = answers.message().await.expect("answer") {
        assert_eq!(answer.sequence, seen);
        assert_eq!(answer.caller, caller);
        assert_eq!(answer.payload, payload);
        seen += 1;
    }
    assert_eq!(seen, 50);

    // Client stream: many messages in, one answer that saw them all.
    let messages: Vec<_> = (0..100)
        .map(|i| EchoRequest {
            text: i.to_string(),
            repeat: 0,
            payload: vec![1u8; 10_000],
        })
        .collect();
    let answer = echo
        .client_stream(tokio_stream::iter(messages))
        .await
        .expect("client stream")
        .into_inner();
    let expected: Vec<String> = (0..100).map(|i: i32| i.to_string()).collect();
    assert_eq!(answer.text, expected.join(","));
    assert_eq!(answer.sequence, 1_000_000);

    // Bidirectional: each message is answered before the next is sent.
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    let mut answers = echo
        .bidi(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .expect("bidi")
        .into_inner();
    for i in 1..=20u32 {
        tx.send(EchoRequest {
            text: format!("ping {i}"),
            ..Default::default()
        })
        .await
        .unwrap();
        let answer = answers
            .message()
            .await
            .unwrap()
            .expect("an answer per message");
        assert_eq!(answer.text, format!("ping {i}"));
        assert_eq!(answer.sequence, i);
    }
    drop(tx);
    assert!(
        answers.message().await.unwrap().is_none(),
        "the stream ends when the caller's does"
    );
    fed.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_services_and_unreachable_ones_are_told_apart() {
    let fed = TestFederation::start(Backend::Sqlite).await;
    // A service no route names.
    let channel = fed.gateway_client(INSTITUTION);
    onestop_integration_tests::await_serving(channel.clone(), "onestop.forms.v1.FormsService")
        .await;

    let status = crate::refusal_of_path(
        channel.clone(),
        "/onestop.nothing.v1.NothingService/Nothing",
    )
    .await;
    assert_eq!(status.code(), Code::Unimplemented, "{status:?}");

    // A routed service that is down.
    let path = format!("/{}/Call", onestop_integration_tests::UNREACHABLE_SERVICE);
    let status = crate::refusal_of_path(channel, &path).await;
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert_eq!(crate::reason(&status), "UPSTREAM_UNAVAILABLE");
    fed.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_member_cannot_hold_more_than_its_share_of_calls() {
    let fed = TestFederation::start_with(Backend::Sqlite, |options| {
        options.member_in_flight = 2;
    })
    .await;
    let mut echo = EchoServiceClient::new(fed.gateway_client(INSTITUTION));

    // Two open streams, each answered once so that both are known to be in flight.
    let mut open = Vec::new();
    for i in 0..2 {
        open.push(answered_stream(&mut echo, format!("open {i}")).await);
    }

    // A third call of the same institution, from another subsystem and connection, is refused.
    fed.issue_member("vsaa-other", "GOV/VSAA/benefits");
    let mut other = EchoServiceClient::new(fed.gateway_client("vsaa-other"));
    let status = other
        .unary(EchoRequest::default())
        .await
        .expect_err("over the member's share");
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert_eq!(crate::reason(&status), "TOO_MANY_CALLS");

    // Another member is not affected.
    let mut centre = FormsServiceClient::new(fed.gateway_client(CENTRE));
    centre
        .get_form(get_form())
        .await
        .expect("another member's call");

    // When a stream ends, its slot is free again (the release follows the end of the stream
    // by a moment, so the call is retried until then, within a bound).
    let (tx, mut answers) = open.pop().unwrap();
    drop(tx);
    assert!(answers.message().await.unwrap().is_none());
    let again = async {
        loop {
            match other.unary(EchoRequest::default()).await {
                Ok(_) => return,
                Err(status) if status.code() == Code::ResourceExhausted => {
                    tokio::task::yield_now().await;
                }
                Err(status) => panic!("{status:?}"),
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), again)
        .await
        .expect("the slot was freed");
    // Streams still open would hold the shutdown for its whole drain time.
    drop(open);
    fed.stop().await;
}

/// Lists the services a server describes through reflection of one protocol version.
macro_rules! reflected_services {
    ($version:ident, $channel:expr) => {{
        use tonic_reflection::pb::$version::ServerReflectionRequest;
        use tonic_reflection::pb::$version::server_reflection_client::ServerReflectionClient;
        use tonic_reflection::pb::$version::server_reflection_request::MessageRequest;
        use tonic_reflection::pb::$version::server_reflection_response::MessageResponse;
        let request = ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        };
        let mut answers = ServerReflectionClient::new($channel)
            .server_reflection_info(tokio_stream::iter([request]))
            .await
            .expect("reflection answers")
            .into_inner();
        let answer = answers.message().await.unwrap().expect("one answer");
        match answer.message_response {
            Some(MessageResponse::ListServicesResponse(list)) => {
                list.service.into_iter().map(|s| s.name).collect::<Vec<_>>()
            }
            other => panic!("not a service list: {other:?}"),
        }
    }};
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reflection_describes_the_contract_in_both_protocol_versions() {
    let fed = TestFederation::start(Backend::Sqlite).await;
    // Through the gateway, for members' tools (v1: buf curl, grpcurl 1.9; v1alpha: grpcurl 1.8).
    let through_v1 = reflected_services!(v1, fed.gateway_client(CENTRE));
    let through_v1alpha = reflected_services!(v1alpha, fed.gateway_client(CENTRE));
    // On the service itself, for operators inside the platform.
    let direct_v1alpha = reflected_services!(v1alpha, fed.forms_client("gateway"));
    for services in [&through_v1, &through_v1alpha, &direct_v1alpha] {
        assert!(
            services
                .iter()
                .any(|s| s == "onestop.forms.v1.FormsService"),
            "{services:?}"
        );
        assert!(
            services.iter().any(|s| s == "grpc.health.v1.Health"),
            "{services:?}"
        );
    }
    fed.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_over_the_size_limit_is_refused_and_harms_nothing() {
    let fed = TestFederation::start(Backend::Sqlite).await;
    let mut forms = FormsServiceClient::new(fed.gateway_client(CENTRE));
    // 5 MiB, past the services' 4 MiB limit on one message.
    let huge = onestop_proto::forms::v1::ValidateFormDataRequest {
        name: "forms/pmlp-residence-declaration/versions/latest".into(),
        data_json: "x".repeat(5 * 1024 * 1024),
    };
    let status = forms.validate_form_data(huge).await.unwrap_err();
    assert_eq!(status.code(), Code::OutOfRange, "{status:?}");
    assert_eq!(crate::reason(&status), "MESSAGE_TOO_LARGE");
    forms
        .get_form(get_form())
        .await
        .expect("the same connection still serves");
    fed.stop().await;
}

/// An echo stream that has answered its first message (`text`), so it is known to be open
/// end to end: the sender of further messages and the answers.
async fn answered_stream(
    echo: &mut EchoServiceClient<tonic::transport::Channel>,
    text: String,
) -> (
    tokio::sync::mpsc::Sender<EchoRequest>,
    tonic::Streaming<onestop_integration_tests::echo::pb::EchoResponse>,
) {
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    let mut answers = echo
        .bidi(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .expect("a stream")
        .into_inner();
    let first = EchoRequest {
        text: text.clone(),
        ..Default::default()
    };
    tx.send(first).await.unwrap();
    let answer = answers.message().await.unwrap().expect("an answer");
    assert_eq!(answer.text, text);
    (tx, answers)
}

/// Two replicas of the forms service behind one route; one dies (its host vanishes) while
/// calls are running. Calls go on on the other, and at most those in flight on the dead one
/// at that moment fail.
async fn calls_continue_when_a_replica_dies(backend: Backend) {
    use onestop_integration_tests::relay::Relay;
    let relay = Relay::bind().await.unwrap();
    let address = relay.address.to_string();
    let fed = TestFederation::start_with(backend, |options| {
        options.replicas.push(("forms".into(), address));
    })
    .await;
    let replica = tokio_util::sync::CancellationToken::new();
    relay.point_to(fed.start_forms_replica(replica.clone()).await);

    const WORKERS: usize = 4;
    let calls = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let load = |calls: std::sync::Arc<std::sync::atomic::AtomicUsize>, count: usize| {
        let channel = fed.gateway_client(CENTRE);
        tokio::spawn(async move {
            let mut forms = FormsServiceClient::new(channel);
            let mut failed = Vec::new();
            for _ in 0..count {
                match forms.get_form(get_form()).await {
                    Ok(_) => {}
                    Err(status) => failed.push(status),
                }
                calls.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            failed
        })
    };
    let workers: Vec<_> = (0..WORKERS).map(|_| load(calls.clone(), 400)).collect();
    // Kill the relayed replica once it has carried calls and the load is well under way.
    let killed = async {
        while relay.relayed() == 0 || calls.load(std::sync::atomic::Ordering::Relaxed) < 400 {
            tokio::task::yield_now().await;
        }
        relay.kill();
    };
    tokio::time::timeout(Duration::from_secs(30), killed)
        .await
        .expect("the second replica took calls");
    let mut failed = Vec::new();
    for worker in workers {
        failed.extend(worker.await.unwrap());
    }
    assert!(
        failed.len() <= WORKERS,
        "{} calls failed: {:?}",
        failed.len(),
        failed.first()
    );
    for status in &failed {
        // Not delivered, or lost with the replica mid-answer: both a status, never a reset.
        assert_eq!(status.code(), Code::Unavailable, "{status:?}");
        let reason = crate::reason(status);
        assert!(
            reason == "UPSTREAM_UNAVAILABLE" || reason == "UPSTREAM_LOST",
            "{status:?}"
        );
    }
    // Afterwards, every call is served by the replica left.
    let mut forms = FormsServiceClient::new(fed.gateway_client(CENTRE));
    for _ in 0..50 {
        forms
            .get_form(get_form())
            .await
            .expect("served by the other replica");
    }
    replica.cancel();
    fed.stop().await;
}

crate::on_both_backends!(calls_continue_when_a_replica_dies);

/// Streams open on a replica whose host vanishes end with `UNAVAILABLE` / `UPSTREAM_LOST`, a
/// status the caller can act on (not a reset stream that reaches it as `INTERNAL`); streams on
/// the other replica go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_on_a_replica_that_dies_end_with_a_status() {
    use onestop_integration_tests::relay::Relay;
    let relay = Relay::bind().await.unwrap();
    let address = relay.address.to_string();
    let fed = TestFederation::start_with(Backend::Sqlite, |options| {
        options.replicas.push(("echo".into(), address));
    })
    .await;
    // The second replica is the same server reached through the relay.
    relay.point_to(fed.echo);
    let mut echo = EchoServiceClient::new(fed.gateway_client(INSTITUTION));
    // Replicas take turns: of four streams, two run through the relay.
    let mut streams = Vec::new();
    for i in 0..4 {
        streams.push(answered_stream(&mut echo, format!("stream {i}")).await);
    }
    assert!(relay.relayed() > 0, "a stream ran through the relay");
    relay.kill();
    let (mut lost, mut alive) = (0, 0);
    for (i, (tx, mut answers)) in streams.into_iter().enumerate() {
        let again = EchoRequest {
            text: format!("again {i}"),
            ..Default::default()
        };
        // A stream already ended may refuse the message; its answer says why.
        let _ = tx.send(again).await;
        match answers.message().await {
            Ok(Some(answer)) => {
                assert_eq!(answer.text, format!("again {i}"));
                alive += 1;
            }
            Ok(None) => panic!("stream {i} ended without a status"),
            Err(status) => {
                assert_eq!(status.code(), Code::Unavailable, "{status:?}");
                assert_eq!(crate::reason(&status), "UPSTREAM_LOST", "{status:?}");
                lost += 1;
            }
        }
    }
    assert!(
        lost >= 1 && alive >= 1,
        "{lost} streams lost, {alive} alive"
    );
    fed.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transport_errors_come_in_the_platform_shape() {
    let fed = TestFederation::start(Backend::Sqlite).await;
    // Bytes that are no protobuf message at all: the caller's mistake, not the service's.
    let config = onestop_integration_tests::attack::client_tls(&fed.pki, Some(INSTITUTION));
    let mut raw = onestop_integration_tests::attack::raw_h2(
        fed.gateway,
        std::net::IpAddr::from([127, 0, 0, 1]),
        config,
        1 << 20,
    )
    .await
    .unwrap();
    let answer = raw
        .start_call(
            "/onestop.forms.v1.FormsService/GetForm",
            &[0xff, 0xff, 0xff, 0xff, 0x0f],
        )
        .await
        .unwrap()
        .await
        .unwrap();
    let status = tonic::Status::from_header_map(answer.headers()).expect("a trailers-only status");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert_eq!(crate::reason(&status), "MALFORMED_MESSAGE");

    // A method the service does not have, though the policy lets the member call the service.
    let status = crate::refusal_of_path(
        fed.gateway_client(INSTITUTION),
        "/onestop.forms.v1.FormsService/NoSuchMethod",
    )
    .await;
    assert_eq!(status.code(), Code::Unimplemented, "{status:?}");
    assert_eq!(crate::reason(&status), "UNKNOWN_METHOD");
    fed.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_joins_through_its_registration_alone() {
    // The echo service is not named anywhere but in its registration, which the test adds to
    // the federation's services: it gets a certificate, a route, access rights, health and
    // the server's message limit (set low here, far below tonic's own default of 4 MiB).
    let fed = TestFederation::start_with(Backend::Sqlite, |options| {
        options.limits.max_message_bytes = 64 * 1024;
    })
    .await;
    let pem = std::fs::read_to_string(fed.pki.join("echo.pem")).unwrap();
    let summary = onestop_platform::pki::summarize(&pem).unwrap();
    assert_eq!(summary.uris, ["spiffe://onestop.lv/platform/echo"]);
    onestop_integration_tests::await_serving(
        fed.gateway_client(INSTITUTION),
        onestop_integration_tests::echo::SERVICE,
    )
    .await;
    let mut echo = EchoServiceClient::new(fed.gateway_client(INSTITUTION));
    let answer = echo
        .unary(EchoRequest {
            text: "registered".into(),
            ..Default::default()
        })
        .await
        .expect("routed and allowed by its registration")
        .into_inner();
    assert_eq!(answer.text, "registered");
    // The server's message limit applies to it without the service setting it.
    let status = echo
        .unary(EchoRequest {
            text: "x".repeat(100 * 1024),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::OutOfRange, "{status:?}");
    assert_eq!(crate::reason(&status), "MESSAGE_TOO_LARGE");
    fed.stop().await;
}

/// A service whose database stops answering reports NOT_SERVING, and the gateway, which
/// follows it, reports the same to members.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_follows_the_database() {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
    let mut fed = TestFederation::start(Backend::Postgres).await;
    let mut watch = HealthClient::new(fed.gateway_client(CENTRE))
        .watch(HealthCheckRequest {
            service: "onestop.forms.v1.FormsService".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let mut next = async || watch.message().await.unwrap().expect("a status").status;
    // The gateway starts NOT_SERVING until the service says otherwise.
    let mut status = next().await;
    if status != ServingStatus::Serving as i32 {
        status = next().await;
    }
    assert_eq!(status, ServingStatus::Serving as i32);
    fed.stop_database();
    // Seen at the next probe (every 5 s).
    let status = tokio::time::timeout(Duration::from_secs(15), next())
        .await
        .expect("health changes within 15 s");
    assert_eq!(status, ServingStatus::NotServing as i32);
    fed.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_streams_end_promptly_on_shutdown() {
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_client::HealthClient;
    let fed = TestFederation::start(Backend::Sqlite).await;
    // A watch on the service itself and one through the gateway, both with a first answer.
    let mut direct = HealthClient::new(fed.forms_client("gateway"))
        .watch(HealthCheckRequest::default())
        .await
        .unwrap()
        .into_inner();
    direct.message().await.unwrap().expect("a first status");
    let mut through = HealthClient::new(fed.gateway_client(CENTRE))
        .watch(HealthCheckRequest::default())
        .await
        .unwrap()
        .into_inner();
    through.message().await.unwrap().expect("a first status");

    // The drain allows 10 s; open streams must not take it.
    let started = std::time::Instant::now();
    fed.stop().await;
    let took = started.elapsed();
    assert!(took < Duration::from_secs(5), "shutdown took {took:?}");
    for stream in [&mut direct, &mut through] {
        let ended = async {
            loop {
                match stream.message().await {
                    Ok(Some(_)) => continue,
                    Ok(None) => return None,
                    Err(status) => return Some(status.code()),
                }
            }
        };
        let code = tokio::time::timeout(Duration::from_secs(5), ended)
            .await
            .expect("the stream ended");
        assert!(
            matches!(
                code,
                None | Some(Code::Unavailable | Code::Unknown | Code::Cancelled)
            ),
            "{code:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_move_as_calls_are_made() {
    use onestop_integration_tests::{http_get, sample};
    let fed = TestFederation::start_with(Backend::Sqlite, |options| {
        options.admin = Some("127.0.0.1:0".parse().unwrap());
    })
    .await;
    let admin = fed.admin.expect("an admin listener");
    assert_eq!(http_get(admin, "/healthz").await.0, 200);
    // Readiness is the process's: another test's federation stopping at this moment makes it
    // 503 for that moment, so it is asked again until it is 200, within a bound.
    let ready = async {
        loop {
            let (status, body) = http_get(admin, "/readyz").await;
            if status == 200 {
                return body;
            }
            assert!(body.starts_with("not ready"), "{body}");
            tokio::task::yield_now().await;
        }
    };
    tokio::time::timeout(Duration::from_secs(10), ready)
        .await
        .expect("ready within 10 s");

    let served = r#"onestop_server_calls_total{service="onestop.forms.v1.FormsService",method="GetForm",code="OK"}"#;
    let forwarded = r#"onestop_gateway_calls_total{service="onestop.forms.v1.FormsService",method="GetForm",code="OK"}"#;
    let denied = r#"onestop_gateway_refusals_total{reason="ACCESS_DENIED",member="MUN/GULBENE"}"#;
    let (_, before) = http_get(admin, "/metrics").await;

    let mut centre = FormsServiceClient::new(fed.gateway_client(CENTRE));
    centre.get_form(get_form()).await.expect("a call");
    centre
        .create_form(CreateFormRequest {
            request_id: "m1".into(),
            form_id: "m".into(),
            ..Default::default()
        })
        .await
        .expect_err("the centre may not create forms");

    // Other tests in this process count too: the figures must have grown, at least by ours. A
    // call is counted as its answer's body is dropped, a moment after the client has it.
    let moved = async {
        loop {
            let (_, after) = http_get(admin, "/metrics").await;
            if [served, forwarded, denied]
                .iter()
                .all(|series| sample(&after, series) >= sample(&before, series) + 1.0)
            {
                return after;
            }
            tokio::task::yield_now().await;
        }
    };
    let after = tokio::time::timeout(Duration::from_secs(10), moved)
        .await
        .expect("every series moved within 10 s");
    assert!(
        after.contains("onestop_gateway_call_duration_seconds_bucket"),
        "{after}"
    );
    assert!(
        after.contains("onestop_gateway_upstream_connections"),
        "{after}"
    );
    assert_eq!(http_get(admin, "/nothing").await.0, 404);
    fed.stop().await;
}

/// While the federation drains on shutdown, `/readyz` answers 503 (so that a load balancer
/// stops sending calls) instead of the admin listener going away with the first signal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_answers_not_ready_while_the_servers_drain() {
    use onestop_integration_tests::http_get;
    let fed = TestFederation::start_with(Backend::Sqlite, |options| {
        options.admin = Some("127.0.0.1:0".parse().unwrap());
    })
    .await;
    let admin = fed.admin.expect("an admin listener");
    // A client stream never finished holds the drain open.
    let mut echo = EchoServiceClient::new(fed.gateway_client(INSTITUTION));
    let (sender, messages) = tokio::sync::mpsc::channel(1);
    sender.send(EchoRequest::default()).await.unwrap();
    let held = tokio::spawn(async move {
        echo.client_stream(tokio_stream::wrappers::ReceiverStream::new(messages))
            .await
    });
    // In flight at the service (health watches are not counted there).
    let in_flight = async {
        loop {
            let (_, metrics) = http_get(admin, "/metrics").await;
            if onestop_integration_tests::sample(&metrics, "onestop_server_calls_in_flight") >= 1.0
            {
                return;
            }
            tokio::task::yield_now().await;
        }
    };
    tokio::time::timeout(Duration::from_secs(10), in_flight)
        .await
        .expect("the stream reaches the service within 10 s");
    let stopping = tokio::spawn(fed.stop());
    let not_ready = async {
        loop {
            let (status, body) = http_get(admin, "/readyz").await;
            if status == 503 {
                return body;
            }
            tokio::task::yield_now().await;
        }
    };
    let body = tokio::time::timeout(Duration::from_secs(10), not_ready)
        .await
        .expect("503 within 10 s");
    assert!(body.starts_with("not ready"), "{body}");
    assert!(!stopping.is_finished(), "still draining");
    drop(sender);
    let _ = held.await;
    stopping.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_still_running_when_the_drain_ends_is_answered_and_serve_returns() {
    use onestop_integration_tests::echo::{HANG, HANGING};
    let fed = TestFederation::start_with(Backend::Sqlite, |options| {
        options.drain = Duration::from_millis(300);
    })
    .await;
    // Straight to the service, as a platform component, so that only the service's drain counts.
    let channel =
        onestop_integration_tests::mtls_channel(&fed.echo.to_string(), &fed.pki, "gateway");
    let mut echo = EchoServiceClient::new(channel);
    let call = tokio::spawn(async move {
        echo.unary(EchoRequest {
            text: HANG.into(),
            ..Default::default()
        })
        .await
    });
    tokio::time::timeout(Duration::from_secs(10), HANGING.notified())
        .await
        .expect("the call began");
    let started = std::time::Instant::now();
    fed.stop().await;
    let took = started.elapsed();
    assert!(took < Duration::from_secs(3), "stopping took {took:?}");
    let status = tokio::time::timeout(Duration::from_secs(5), call)
        .await
        .expect("the call was answered, not left running")
        .unwrap()
        .expect_err("cut off");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
}
