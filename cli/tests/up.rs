//! `onestop up` as a user runs it: the real binary starts the federation, answers a health
//! check through the gateway with the demo institution's certificate, keeps what it
//! acknowledged when it is killed, and stops cleanly on SIGTERM.

// In tests a failed unwrap is a failed test, with its message.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use onestop_platform::tls::{self, TlsFiles, TlsMaterial};
use onestop_proto::forms::v1::forms_service_client::FormsServiceClient;
use onestop_proto::forms::v1::{CreateFormRequest, GetFormRequest};
use onestop_proto::r#type::v1::{LocalizedText, MemberId};
use tokio::io::{AsyncBufReadExt, BufReader, Lines};
use tokio::process::{Child, ChildStdout, Command};
use tonic::transport::Channel;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

struct Running {
    child: Child,
    lines: Lines<BufReader<ChildStdout>>,
    channel: Channel,
}

/// Starts `onestop up` on a free port and waits until forms serves through the gateway.
async fn up(data: &Path) -> Running {
    let mut child = Command::new(env!("CARGO_BIN_EXE_onestop"))
        .args(["up", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(data)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("onestop starts");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();

    // The gateway's address is printed once everything is listening.
    let gateway = tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(line) = lines.next_line().await.unwrap() {
            if let Some(rest) = line.strip_prefix("gateway: ") {
                return rest.split_whitespace().next().unwrap().to_owned();
            }
        }
        panic!("onestop exited without printing the gateway address");
    })
    .await
    .expect("onestop printed its address within 60 s");

    // The printed command names the demo certificate; use it.
    let pki = data.join("pki");
    let material = TlsMaterial::load(&TlsFiles::in_pki_dir(&pki, "demo-institution")).unwrap();
    let config = tls::client_config(&material, None).unwrap();
    let channel =
        onestop_platform::client::channel(&gateway, "localhost", config, Duration::from_secs(30))
            .unwrap();
    let mut health = HealthClient::new(channel.clone());
    let mut updates = health
        .watch(HealthCheckRequest {
            service: "onestop.forms.v1.FormsService".into(),
        })
        .await
        .expect("health through the gateway")
        .into_inner();
    tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(update) = updates.message().await.unwrap() {
            if update.status() == ServingStatus::Serving {
                return;
            }
        }
        panic!("the health stream ended");
    })
    .await
    .expect("forms is serving through the gateway");
    Running {
        child,
        lines,
        channel,
    }
}

fn signal(child: &Child, name: &str) {
    let pid = child.id().unwrap().to_string();
    let sent = std::process::Command::new("kill")
        .args([&format!("-{name}"), &pid])
        .status()
        .unwrap();
    assert!(sent.success());
}

fn text(en: &str) -> Option<LocalizedText> {
    Some(LocalizedText {
        lv: format!("{en} (lv)"),
        en: en.into(),
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn up_serves_keeps_what_it_acknowledged_and_stops_on_sigterm() {
    let data = tempfile::tempdir().unwrap();

    // Acknowledged, then killed without warning.
    let mut first = up(data.path()).await;
    let mut forms = FormsServiceClient::new(first.channel.clone());
    forms
        .create_form(CreateFormRequest {
            request_id: "durable-1".into(),
            form_id: "durable-form".into(),
            owner: Some(MemberId {
                member_class: "GOV".into(),
                member_code: "VSAA".into(),
                subsystem: String::new(),
            }),
            title: text("Durable"),
            description: text("Survives a killed process"),
            schema_json: r#"{"type": "object", "properties": {"a": {"type": "string"}}}"#.into(),
            fields: Vec::new(),
        })
        .await
        .expect("the form is created");
    signal(&first.child, "KILL");
    first.child.wait().await.unwrap();

    // The second start finds the PKI, the policy and the acknowledged form.
    let mut second = up(data.path()).await;
    let mut forms = FormsServiceClient::new(second.channel.clone());
    let form = forms
        .get_form(GetFormRequest {
            name: "forms/durable-form".into(),
        })
        .await
        .expect("the acknowledged form survived the kill")
        .into_inner()
        .form
        .unwrap();
    assert_eq!(form.title.unwrap().en, "Durable");

    // SIGTERM: a clean stop, exit status 0.
    signal(&second.child, "TERM");
    let status = tokio::time::timeout(Duration::from_secs(30), second.child.wait())
        .await
        .expect("onestop stopped within 30 s of SIGTERM")
        .unwrap();
    assert!(status.success(), "onestop exited with {status}");
    let mut rest = Vec::new();
    while let Some(line) = second.lines.next_line().await.unwrap() {
        rest.push(line);
    }
    assert!(rest.iter().any(|l| l == "onestop stopped."), "{rest:?}");
}
