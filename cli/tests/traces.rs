//! Traces as an operator sees them: `onestop up --otlp-endpoint` exports to a real OTLP
//! receiver (the official `opentelemetry-proto` TraceService), and one application submitted
//! through the gateway is one trace, found by the `x-trace-id` its caller got, through the
//! gateway, routing, the store and forms, each span under its own service name.

// In tests a failed unwrap is a failed test, with its message.
#![allow(clippy::unwrap_used)]

mod support;

use std::collections::HashMap;
use std::process::Stdio;
use std::time::Duration;

use onestop_proto::eaddress::v1::SendMessageRequest;
use onestop_proto::eaddress::v1::message_service_client::MessageServiceClient;
use onestop_proto::routing::v1::application_service_client::ApplicationServiceClient;
use onestop_proto::routing::v1::inbox_service_client::InboxServiceClient;
use onestop_proto::routing::v1::{
    ApplicationStatus, OpenInbox, StreamInboxRequest, SubmitApplicationRequest,
    UpdateApplicationStatusRequest, stream_inbox_request,
};
use onestop_proto::r#type::v1::MemberId;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::KeyValue;
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::sync::mpsc;

/// One span as received, with the service it came from.
#[derive(Clone, Debug)]
struct Received {
    service: String,
    name: String,
    trace_id: String,
    span_id: String,
    parent: String,
    kind: i32,
    attributes: HashMap<String, String>,
    start: u64,
    end: u64,
    /// The trace ids this span links to.
    links: Vec<String>,
}

/// The receiver: every exported span goes into a channel.
struct Receiver(mpsc::UnboundedSender<Received>);

fn text(attributes: &[KeyValue]) -> HashMap<String, String> {
    attributes
        .iter()
        .map(|kv| {
            let value = match kv.value.as_ref().and_then(|v| v.value.as_ref()) {
                Some(Value::StringValue(s)) => s.clone(),
                Some(Value::IntValue(i)) => i.to_string(),
                Some(Value::BoolValue(b)) => b.to_string(),
                Some(Value::DoubleValue(d)) => d.to_string(),
                other => format!("{other:?}"),
            };
            (kv.key.clone(), value)
        })
        .collect()
}

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        for resource_spans in request.into_inner().resource_spans {
            let resource = resource_spans
                .resource
                .map(|r| text(&r.attributes))
                .unwrap_or_default();
            let service = resource.get("service.name").cloned().unwrap_or_default();
            for scope in resource_spans.scope_spans {
                for span in scope.spans {
                    let _ = self.0.send(Received {
                        service: service.clone(),
                        name: span.name.clone(),
                        trace_id: hex::encode(&span.trace_id),
                        span_id: hex::encode(&span.span_id),
                        parent: hex::encode(&span.parent_span_id),
                        kind: span.kind,
                        attributes: text(&span.attributes),
                        start: span.start_time_unix_nano,
                        end: span.end_time_unix_nano,
                        links: span
                            .links
                            .iter()
                            .map(|l| hex::encode(&l.trace_id))
                            .collect(),
                    });
                }
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

/// OpenTelemetry's span kinds, as the protocol numbers them.
const SERVER: i32 = 2;
const CLIENT: i32 = 3;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_submission_is_one_trace_across_every_service() {
    let (spans, mut received) = mpsc::unbounded_channel();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let otlp = listener.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(Receiver(spans)))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );

    let data = tempfile::tempdir().unwrap();
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_onestop"))
        .args(["up", "--listen", "127.0.0.1:0", "--otlp-endpoint"])
        .arg(format!("http://{otlp}"))
        .arg("--data-dir")
        .arg(data.path())
        .env("RUST_LOG", "warn")
        // Exported a moment after they end, not five seconds later.
        .env("OTEL_BSP_SCHEDULE_DELAY", "100")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let gateway = support::gateway_address(&mut lines).await;
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });

    let pki = data.path().join("pki");
    let channel = support::member_channel(&gateway, &pki, "demo-centre");
    let mut desk = ApplicationServiceClient::new(channel);
    let submission = SubmitApplicationRequest {
        request_id: "traced-1".into(),
        service_id: "vsaa-old-age-pension".into(),
        form_version: "1".into(),
        data_json: std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../services/forms/seed/examples/vsaa-old-age-pension.valid.json"
        ))
        .unwrap(),
        municipality_code: "gulbene".into(),
        paper_intake: None,
    };
    // The services may still be opening their stores: the first calls can be refused.
    let response = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            match desk.submit_application(submission.clone()).await {
                Ok(response) => return response,
                Err(_) => tokio::task::yield_now().await,
            }
        }
    })
    .await
    .expect("a submission within 30 s");
    let receipt_name = response
        .get_ref()
        .receipt
        .as_ref()
        .unwrap()
        .application
        .clone();
    let trace_id = response
        .metadata()
        .get("x-trace-id")
        .unwrap()
        .to_str()
        .unwrap()
        .to_owned();

    // Every span of the trace the caller was told, as they arrive.
    let mut trace: Vec<Received> = Vec::new();
    let complete = |trace: &[Received]| {
        let has = |service: &str, name: &str, kind: i32| {
            trace
                .iter()
                .any(|s| s.service == service && s.name == name && s.kind == kind)
        };
        has(
            "onestop-gateway",
            "onestop.routing.v1.ApplicationService/SubmitApplication",
            SERVER,
        ) && has(
            "onestop-routing",
            "onestop.routing.v1.ApplicationService/SubmitApplication",
            SERVER,
        ) && has(
            "onestop-routing",
            "onestop.forms.v1.FormsService/ValidateFormData",
            CLIENT,
        ) && has(
            "onestop-forms",
            "onestop.forms.v1.FormsService/ValidateFormData",
            SERVER,
        ) && trace.iter().any(|s| s.name == "forms.validate")
            && trace.iter().any(|s| s.name == "store.insert_application")
    };
    tokio::time::timeout(Duration::from_secs(30), async {
        while !complete(&trace) {
            let span = received.recv().await.expect("the receiver runs");
            if span.trace_id == trace_id {
                trace.push(span);
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("the trace is complete within 30 s: {trace:#?}"));

    eprintln!(
        "trace {trace_id}: {}",
        trace
            .iter()
            .map(|s| format!("{} {}", s.service, s.name))
            .collect::<Vec<_>>()
            .join(", ")
    );
    // Parents intact: each span's parent is in the trace, up to the gateway's, the root.
    let by_id: HashMap<&str, &Received> = trace.iter().map(|s| (s.span_id.as_str(), s)).collect();
    let find = |service: &str, name: &str, kind: i32| {
        *trace
            .iter()
            .find(|s| s.service == service && s.name == name && s.kind == kind)
            .as_ref()
            .unwrap()
    };
    let submit = "onestop.routing.v1.ApplicationService/SubmitApplication";
    let validate = "onestop.forms.v1.FormsService/ValidateFormData";
    let gateway_span = find("onestop-gateway", submit, SERVER);
    let routing_span = find("onestop-routing", submit, SERVER);
    let client_span = find("onestop-routing", validate, CLIENT);
    let forms_span = find("onestop-forms", validate, SERVER);
    assert_eq!(routing_span.parent, gateway_span.span_id);
    assert_eq!(client_span.parent, routing_span.span_id);
    assert_eq!(forms_span.parent, client_span.span_id);
    assert!(
        !by_id.contains_key(gateway_span.parent.as_str()),
        "the gateway's span is the trace's root here"
    );
    for span in [gateway_span, routing_span, client_span, forms_span] {
        assert_eq!(span.attributes["rpc.system"], "grpc", "{span:?}");
        assert_eq!(span.attributes["rpc.grpc.status_code"], "0", "{span:?}");
        assert!(span.end >= span.start, "{span:?}");
    }
    assert_eq!(
        gateway_span.attributes["rpc.service"],
        "onestop.routing.v1.ApplicationService"
    );
    assert_eq!(gateway_span.attributes["rpc.method"], "SubmitApplication");

    // The institution takes the application from its inbox: that delivery is work of its own
    // stream's trace, linked to the submission's.
    let channel = support::member_channel(&gateway, &pki, "demo-institution");
    let (acks, requests) = mpsc::channel(1);
    acks.send(StreamInboxRequest {
        kind: Some(stream_inbox_request::Kind::Open(OpenInbox {
            inbox: Some(MemberId {
                member_class: "GOV".into(),
                member_code: "VSAA".into(),
                subsystem: "pensions".into(),
            }),
            max_unacknowledged: 1,
        })),
    })
    .await
    .unwrap();
    let deliveries_channel = channel.clone();
    let deliveries_channel_for_mail = channel.clone();
    let mut deliveries = InboxServiceClient::new(channel)
        .stream_inbox(tokio_stream::wrappers::ReceiverStream::new(requests))
        .await
        .unwrap()
        .into_inner();
    deliveries.message().await.unwrap().expect("the delivery");
    let delivery = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            let span = received.recv().await.expect("the receiver runs");
            if span.name == "inbox.deliver" {
                return span;
            }
        }
    })
    .await
    .expect("the delivery's span within 30 s");
    assert_eq!(delivery.service, "onestop-routing");
    assert_ne!(
        delivery.trace_id, trace_id,
        "a trace of its own: the consumer's stream"
    );
    assert_eq!(
        delivery.links,
        std::slice::from_ref(&trace_id),
        "linked to the submission's trace"
    );

    // The institution decides; the decision reaches the e-address later, from routing's
    // outbox, in a trace of its own linked to the deciding call's.
    let decided = ApplicationServiceClient::new(deliveries_channel)
        .update_application_status(UpdateApplicationStatusRequest {
            request_id: "traced-decision".into(),
            name: receipt_name.clone(),
            status: ApplicationStatus::Decided as i32,
            note: "Granted".into(),
            decision: None,
        })
        .await
        .unwrap();
    let deciding = decided
        .metadata()
        .get("x-trace-id")
        .unwrap()
        .to_str()
        .unwrap()
        .to_owned();
    let sent = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            let span = received.recv().await.expect("the receiver runs");
            if span.name == "decision.send" {
                return span;
            }
        }
    })
    .await
    .expect("the decision's span within 30 s");
    assert_eq!(sent.service, "onestop-routing");
    assert_eq!(
        sent.links,
        std::slice::from_ref(&deciding),
        "linked to the deciding call"
    );

    // An official message: its evidence is signed into the log in a span of the e-address's.
    let mut mail = MessageServiceClient::new(deliveries_channel_for_mail);
    mail.send_message(SendMessageRequest {
        request_id: "traced-message".into(),
        sender: "member:GOV/VSAA/pensions".into(),
        recipients: vec!["lv:121282-11236".into()],
        subject: "Paziņojums".into(),
        body: "Teksts".into(),
        document_type: "notice".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let signed = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            let span = received.recv().await.expect("the receiver runs");
            if span.name == "evidence.sign" {
                return span;
            }
        }
    })
    .await
    .expect("the evidence signing span within 30 s");
    assert_eq!(signed.service, "onestop-eaddress");
    drop(acks);
    let _ = child.kill().await;
}
